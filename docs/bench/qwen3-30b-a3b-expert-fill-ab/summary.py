import json, statistics as st
rows = {}
for mode in ("off", "on"):
    for r in (1, 2, 3):
        d = json.load(open(f"docs/bench/qwen3-30b-a3b-expert-fill-ab/{mode}-{r}/results.json"))
        for x in d["rows"]:
            if x["mode"] != "flexinfer" or not x.get("decode_tokens_per_s"):
                continue
            res = x["result"]
            k = (x["model"].split("-")[-1].split(".")[0], x["budget_bytes"] // 10**9)
            pct = x["decode_tokens_per_s"] / x["moe_bound_tokens_per_s"]
            rows.setdefault(k, {}).setdefault(mode, []).append(
                (x["decode_tokens_per_s"], pct, x["hit_rate"], res["load_s"], res["compute_s_per_token"], x["expert_bytes_per_token"]))
print("| router | budget | off: tok/s (3 runs) | on: tok/s (3 runs) | % of bound off / on (medians) | hit rate off / on | expert MB read a token off / on | load s off / on (medians) |")
print("|---|---|---|---|---|---|---|---|")
for k in sorted(rows):
    o, n = rows[k]["off"], rows[k]["on"]
    med = lambda l, i: st.median(v[i] for v in l)
    fmt = lambda l: f"{med(l,0):.3f} ({', '.join(f'{v[0]:.2f}' for v in l)})"
    print(f"| {k[0]} | {k[1]} GB | {fmt(o)} | {fmt(n)} | {med(o,1):.0%} / {med(n,1):.0%} | {med(o,2):.3f} / {med(n,2):.3f} | {med(o,5)/1e6:.1f} / {med(n,5)/1e6:.1f} | {med(o,3):.1f} / {med(n,3):.1f} |")
