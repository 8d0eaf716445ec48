"""In-RAM speed against llama.cpp's default configuration, measured in the same run.

    python -m flexinfer.bench.inram MODEL [-n 64] [-t 2] [--rounds 3] [--prompt-tokens 32]

Each round runs flexinfer (`flexinfer run --json`, everything resident) and the llama.cpp peer
(llama-cpp-python with its default repacking and flash attention auto) as fresh processes, one after
the other, so both see the same machine load; the medians over rounds are compared. Prints a markdown
table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def _json_line(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON in output: {out[-300:]!r}")


def run_flexinfer(model: str, n: int, threads: int, ctx: int, prompt: str) -> dict:
    argv = [sys.executable, "-m", "flexinfer", "run", model, "--json", "-n", str(n), "-t",
            str(threads), "-c", str(ctx), "--temp", "0", "-p", prompt]
    return _json_line(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def run_llamacpp(model: str, n: int, threads: int, ctx: int, prompt: str) -> dict:
    argv = [sys.executable, "-m", "flexinfer.bench.peer_llamacpp", model, "-n", str(n), "-t",
            str(threads), "-c", str(ctx), "-p", prompt, "--repack"]
    return _json_line(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexinfer.bench.inram")
    p.add_argument("model")
    p.add_argument("-n", "--tokens", type=int, default=64)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    a = p.parse_args(argv)
    prompt = " ".join(["the"] * a.prompt_tokens)
    ctx = 256 * ((a.prompt_tokens + a.tokens + 255) // 256)
    runs: dict[str, list[dict]] = {"flexinfer": [], "llama.cpp": []}
    for r in range(a.rounds):
        runs["flexinfer"].append(run_flexinfer(a.model, a.tokens, a.threads, ctx, prompt))
        runs["llama.cpp"].append(run_llamacpp(a.model, a.tokens, a.threads, ctx, prompt))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(
            f"{k} {v[-1]['decode_tokens_per_s']:.2f} tok/s" for k, v in runs.items()),
            file=sys.stderr)
    med = {k: {m: statistics.median(x[m] for x in v)
               for m in ("decode_tokens_per_s", "prefill_tokens_per_s")} for k, v in runs.items()}
    ratio = med["flexinfer"]["decode_tokens_per_s"] / med["llama.cpp"]["decode_tokens_per_s"]
    print(f"| engine | decode tok/s (median of {a.rounds}) | prefill tok/s ({a.prompt_tokens}"
          " tokens) | all decode runs |")
    print("|---|---|---|---|")
    for k, v in runs.items():
        each = ", ".join(f"{x['decode_tokens_per_s']:.2f}" for x in v)
        print(f"| {k} | {med[k]['decode_tokens_per_s']:.2f} | {med[k]['prefill_tokens_per_s']:.1f}"
              f" | {each} |")
    print(f"\nflexinfer / llama.cpp decode: **{ratio:.2f}x**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
