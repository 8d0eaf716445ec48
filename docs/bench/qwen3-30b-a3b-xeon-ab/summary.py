"""Summarise alternating A/B runs of scripts/bench_moe.py: DIR/rK-TAG.json (each run's
results.json). Usage: python summary.py docs/bench/qwen3-30b-a3b-xeon-ab/abl"""
import json, statistics, sys
from pathlib import Path
root, tags = Path(sys.argv[1]), sys.argv[2:]
rows = {}
for d in sorted(root.glob("r*-*.json")):
    tag = d.stem.split("-", 1)[1]
    for r in json.loads(d.read_text())["rows"]:
        if r["mode"] != "flexinfer" or r.get("status") != "ok":
            continue
        x = r["result"]
        n_tok = 1 / r["decode_tokens_per_s"]
        key = (r["model"].split("-")[-1].split(".")[0], r["budget_bytes"] // 10**9, tag)
        rows.setdefault(key, []).append((r["decode_tokens_per_s"], r["decode_tokens_per_s"] / r["moe_bound_tokens_per_s"],
                                          x["compute_s_per_token"], x["stall_fraction"] * n_tok,
                                          r["hit_rate"], r["predicted_tokens_per_s"]))
print("| router | budget | tree | tok/s runs | median | % of bound (median) | compute s/token | stall s/token | hit | plan (error vs median) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for key in sorted(rows):
    v = rows[key]; med = statistics.median(t[0] for t in v)
    print(f"| {key[0]} | {key[1]} GB | {key[2]} | {', '.join(f'{t[0]:.2f}' for t in v)} | {med:.3f} | "
          f"{100*statistics.median(t[1] for t in v):.0f}% | {statistics.median(t[2] for t in v):.3f} | "
          f"{statistics.median(t[3] for t in v):.3f} | {statistics.median(t[4] for t in v):.3f} | "
          f"{v[0][5]:.3f} ({100*(v[0][5]/med-1):+.0f}%) |")
