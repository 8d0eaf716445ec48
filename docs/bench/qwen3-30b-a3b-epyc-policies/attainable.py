"""What share of the MoE bound the 4 GB points could reach with fewer misses (issue 14, twentieth
session): each run of the second table (../qwen3-30b-a3b-epyc-cap250/table-plan/results.json)
waited (token time - compute) for its misses (the expert bytes it read a token / an expert's
bytes); at that wait a miss, a run that missed M a token would take compute + M x wait.
M from policies.txt: the store's LRU, the best online policy replayed, Belady's floor.
Part of the wait is a token's own (the store's books in every layer, not misses): the second
table splits it into a part a token and a part a miss, fitted on the same run's 4 and 8 GB
points, and projects with the part a token kept and with it gone.

    python docs/bench/qwen3-30b-a3b-epyc-policies/attainable.py
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPERT = 3 * 884736  # bytes of one expert of the synthetic Qwen3-30B-A3B (Q4_0)
MISSES = {"uniform": {"LRU": 6.36, "token recency": 5.98, "Belady": 4.05},  # policies.txt
          "zipf1": {"LRU": 10.00, "LRU-2": 9.04, "Belady": 4.82}}


def waits(r) -> tuple[str, int, float, float, float]:
    """(router, run, compute s, wait s, misses) of a row, a decode token's."""
    cpu = r["result"]["compute_s_per_token"]
    return ("zipf1" if "zipf1" in r["model"] else "uniform", r["run"], cpu,
            1 / r["decode_tokens_per_s"] - cpu,
            r["result"]["experts"]["decode_expert_bytes_per_token"] / EXPERT)


def main() -> None:
    rows = json.loads((HERE.parent / "qwen3-30b-a3b-epyc-cap250/table-plan/results.json")
                      .read_text())["rows"]
    at = {(r["budget_bytes"], *waits(r)[:2]): waits(r) for r in rows}
    policies = " | ".join(f"at {p}" for p in ("LRU", "best online", "Belady"))
    print(f"| router | run | compute ms | wait ms | misses | wait a miss ms | {policies} |")
    print("|---|---|---|---|---|---|---|---|---|")
    fits = []
    for (budget, router, run), (_, _, cpu, wait, missed) in sorted(at.items()):
        if budget != 4_000_000_000:
            continue
        per = wait / missed
        shares = [cpu / (cpu + m * per) for m in MISSES[router].values()]
        print(f"| {router} | {run} | {cpu * 1e3:.1f} | {wait * 1e3:.1f} | {missed:.2f} | "
              f"{per * 1e3:.2f} | " + " | ".join(f"{s:.1%}" for s in shares) + " |")
        _, _, _, wait8, missed8 = at[(8_000_000_000, router, run)]
        per = (wait - wait8) / (missed - missed8)
        fits.append((router, run, cpu, wait8 - missed8 * per, per))
    cols = [f"{p}, {w}" for w in ("a token's part kept", "gone")
            for p in ("LRU", "best online", "Belady")]
    print("\n| router | run | a token ms | a miss ms | " + " | ".join(cols) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for router, run, cpu, fixed, per in fits:
        kept = [cpu / (cpu + fixed + m * per) for m in MISSES[router].values()]
        gone = [cpu / (cpu + m * per) for m in MISSES[router].values()]
        print(f"| {router} | {run} | {fixed * 1e3:.2f} | {per * 1e3:.2f} | "
              + " | ".join(f"{s:.1%}" for s in kept + gone) + " |")


if __name__ == "__main__":
    main()
