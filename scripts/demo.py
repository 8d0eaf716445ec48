"""What `bash scripts/demo.sh` shows without arguments: the default model answering one prompt
twice, greedy so the answers match, first with every weight in RAM, then under a memory budget
too small for it, so that part of its weights streams from disk for every token. Each run is
the plain `flexinfer run` command, printed before it runs, and prints its own stats line.

The budget comes from the model's plan at this context: `flexinfer plan --json` with room to spare
gives what a run with every weight resident needs (planned_total_bytes: weights, KV cache,
compute buffers, the interpreter, headroom); taking half the weights' bytes off that leaves a
budget between the minimum working set (the ring holds 2-3 layers, a few MB here) and the full
size. SmolLM2-135M Q4_1: 98 MB of weights, 0.22 GB in all at context 512, so a 0.17 GB budget;
the run keeps 0.06 GB resident and reads 0.033 GB per token (part of the budget holds the ring).
The first run gets a budget too, the same total with IN_RAM_ROOM to spare, rounded up to 100 MB
(0.3 GB): without one it would follow the machine (--memory-budget auto), and under another
program's memory pressure it would give up weights and stream as well.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

MODEL = "smollm2"
PROMPT = "What is the capital of France? Answer in one sentence."
CTX = "512"  # a short context keeps the KV cache small, so the budget is mostly weights
RUN = ["--chat", "-p", PROMPT, "--temp", "0", "-n", "32", "-c", CTX]  # greedy: the same answer
ROOM = "1T"  # a budget that holds everything, for the plan of the all-in-RAM run
STREAMED_SHARE = 0.5  # of the weights' bytes, taken off the all-resident total
IN_RAM_ROOM = 0.25  # of the all-resident total, added for the first run's budget


def flexinfer(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flexinfer", *args]
    if not capture:
        print(f"$ flexinfer {shlex.join(args)}", flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if done.returncode:
        sys.exit(done.returncode)  # its one-line error is already on stderr
    return done


def streaming_budget(plan: dict) -> int:
    """Bytes: the all-resident plan's total less STREAMED_SHARE of the weights, in whole MB."""
    full, weights = plan["planned_total_bytes"], plan["model_bytes"]
    return int(full - STREAMED_SHARE * weights) // 10**6 * 10**6


def in_ram_budget(plan: dict) -> int:
    """Bytes: the all-resident plan's total and IN_RAM_ROOM of it, rounded up to 100 MB."""
    return -int(-plan["planned_total_bytes"] * (1 + IN_RAM_ROOM) // 10**8) * 10**8


def main(model: str = MODEL) -> None:
    plan = json.loads(flexinfer("plan", model, "--memory-budget", ROOM, "--json", "-c", CTX,
                                capture=True).stdout)
    budget = streaming_budget(plan)
    gb = 1e9
    room = in_ram_budget(plan)
    print(f"\n1. All in RAM: {plan['model_bytes'] / gb:.2f} GB of weights, "
          f"{plan['planned_total_bytes'] / gb:.2f} GB in all, under a {room / gb:.2f} GB budget "
          "that holds it.", flush=True)
    flexinfer("run", model, *RUN, "--memory-budget", f"{room // 10**6}M")
    print(f"\n2. The same under a {budget / gb:.2f} GB budget, too small for it: part of the "
          "weights stays in RAM, the rest is read from disk for every token.", flush=True)
    flexinfer("run", model, *RUN, "--memory-budget", f"{budget // 10**6}M")
    print("\nSame answer. 'resident' is what each run kept in RAM; 'read ... GB/token at ... "
          "GB/s' is what the second streamed from disk for every token, and how fast.")


if __name__ == "__main__":
    main(*sys.argv[1:2])  # another model: a .gguf path or a cached name (the tests pass a path)
