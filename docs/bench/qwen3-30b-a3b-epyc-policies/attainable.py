"""What share of the MoE bound the 4 GB points could reach with fewer misses (issue 14, twentieth
session): each run of the second table (../qwen3-30b-a3b-epyc-cap250/table-plan/results.json)
waited (token time - compute) for its misses (the expert bytes it read a token / an expert's
bytes); at that wait a miss, a run that missed M a token would take compute + M x wait.
M from policies.txt: the store's LRU, the best online policy replayed, Belady's floor.

    python docs/bench/qwen3-30b-a3b-epyc-policies/attainable.py
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPERT = 3 * 884736  # bytes of one expert of the synthetic Qwen3-30B-A3B (Q4_0)
MISSES = {"uniform": {"LRU": 6.36, "token recency": 5.98, "Belady": 4.05},  # policies.txt
          "zipf1": {"LRU": 10.00, "LRU-2": 9.04, "Belady": 4.82}}


def main() -> None:
    rows = json.loads((HERE.parent / "qwen3-30b-a3b-epyc-cap250/table-plan/results.json")
                      .read_text())["rows"]
    print("| router | run | compute ms | wait ms | misses | wait a miss ms | "
          + " | ".join(f"at {p}" for p in ("LRU", "best online", "Belady")) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["budget_bytes"] != 4_000_000_000:
            continue
        router = "zipf1" if "zipf1" in r["model"] else "uniform"
        cpu = r["result"]["compute_s_per_token"]
        wait = 1 / r["decode_tokens_per_s"] - cpu
        missed = r["result"]["experts"]["decode_expert_bytes_per_token"] / EXPERT
        per = wait / missed
        shares = [cpu / (cpu + m * per) for m in MISSES[router].values()]
        print(f"| {router} | {r['run']} | {cpu * 1e3:.1f} | {wait * 1e3:.1f} | {missed:.2f} | "
              f"{per * 1e3:.2f} | " + " | ".join(f"{s:.1%}" for s in shares) + " |")


if __name__ == "__main__":
    main()
