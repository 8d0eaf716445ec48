"""No leaks: a long generation under a cgroup budget keeps peak memory at the planned level.

    python scripts/leak_check.py MODEL [--budget BYTES] [--ctx 2048] [--tokens 100,2000]

Runs `flexinfer run` once per token count, each in a fresh process inside a memory cgroup whose
limit is the budget (streaming: the budget holds the fixed costs and ~60% of the weights unless
given), and prints the cgroup's peak and the run's planned total for each. Peak memory that grew
with the number of tokens would be a leak. The cgroup's peak includes reclaimable page cache, which
grows to whatever room the limit leaves; the process's own peak RSS (VmHWM) is the leak signal.
"""

import argparse
import json
import sys

from flexinfer.cgroup import drop_page_cache, run_limited


def _json(argv, limit):
    r = run_limited(argv, limit, timeout=1800)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}, oom {r.oom_killed}): {r.stderr.strip()[-300:]}")
    text = r.stdout.strip()  # `plan --json` is indented; `run --json` is one line after the text
    return json.loads(text if text.startswith("{") else text.splitlines()[-1]), r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--budget", type=int)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--tokens", default="100,2000")
    a = p.parse_args()
    base = [sys.executable, "-m", "flexinfer"]
    plan, _ = _json(base + ["plan", a.model, "-c", str(a.ctx), "--json", "--memory-budget",
                            str(1 << 40)], None)
    budget = a.budget or plan["fixed_bytes"] + int(0.6 * plan["resident_bytes"])
    print("| tokens | process peak RSS MB | cgroup peak MB (incl. page cache) | planned total MB |"
          " budget MB | decode tok/s | OOM kills |")
    print("|---|---|---|---|---|---|---|")
    for n in map(int, a.tokens.split(",")):
        drop_page_cache()
        out, r = _json(base + ["run", a.model, "-c", str(a.ctx), "-n", str(n), "--ignore-eos",
                               "--temp", "0.8", "-s", "1", "-p", "Tell me a long story.",
                               "--memory-budget", str(budget), "--json"], budget)
        planned = _json(base + ["plan", a.model, "-c", str(a.ctx), "--json", "--memory-budget",
                                str(budget)], None)[0]["planned_total_bytes"]
        print(f"| {len(out['tokens'])} | {out['peak_memory_bytes'] / 1e6:.1f} | "
              f"{r.peak_bytes / 1e6:.1f} | {planned / 1e6:.1f} | {budget / 1e6:.1f} | "
              f"{out['decode_tokens_per_s']:.1f} | {int(r.oom_killed)} |", flush=True)


if __name__ == "__main__":
    main()
