"""Benchmark for issue 11: a memory budget that changes while a model decodes.

One process decodes --tokens tokens greedily; before the tokens named in --changes it calls
Model.set_memory_budget. Each token's time, the process's RSS and the resident weight bytes are
recorded; each change's duration and bytes released/read back. Then, with --fresh, a fresh process
at each budget decodes the same way with no change, for the throughput to compare against. Every
run is a child process in a memory cgroup whose limit is the largest budget, page cache dropped
first (flexinfer.cgroup.run_limited).

    python scripts/bench_budget_change.py /work/models/llama2-7b-q4_0.gguf --start 3G \
        --changes 20:1.5G,40:3G --tokens 60 -t 2 --fresh --out budget11.json --plot docs/budget11.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def child(a) -> None:
    from flexinfer import model as fm
    from flexinfer.budget import parse_size, rss_bytes
    from flexinfer.generate import SamplingOptions, generate_ids
    changes = {k: parse_size(v) for k, v in parse_changes(a.changes)}
    t_load = time.perf_counter()
    with fm.load(a.model, memory_budget=a.start, n_ctx=a.ctx, n_threads=a.threads) as m:
        load_s = time.perf_counter() - t_load
        ids = m.tokenize("Once upon a time, in a land far away,")
        opts = SamplingOptions(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
        rows, events, t0 = [], [], time.perf_counter()
        for k, tok in enumerate(generate_ids(m, ids, opts)):
            rows.append((round(time.perf_counter() - t0, 4), rss_bytes(), m.resident_weight_bytes(),
                         tok))
            if k + 1 in changes:
                c = m.set_memory_budget(changes[k + 1], source="benchmark")
                events.append({"before_token": k + 1, "at_s": round(time.perf_counter() - t0, 4),
                               "old": c.old, "new": c.new, "seconds": round(c.seconds, 4),
                               "released_bytes": c.released_bytes, "read_bytes": c.read_bytes,
                               "rss_after": rss_bytes(), "resident_after": m.resident_weight_bytes(),
                               "predicted_tok_s": round(m.plan.predicted_tok_s, 3)})
        print(json.dumps({"load_s": load_s, "tokens": rows, "changes": events,
                          "predicted_tok_s": round(m.plan.predicted_tok_s, 3)}))


def parse_changes(text: str) -> list[tuple[int, str]]:
    """"20:1.5G,40:3G" -> [(20, "1.5G"), (40, "3G")]; a malformed one is a one-line exit."""
    out = []
    for c in (c for c in text.split(",") if c):
        k, sep, v = c.partition(":")
        if not sep or not k.strip().isdigit() or int(k) < 1 or not v:
            raise SystemExit(f"bench_budget_change: --changes: {c!r} is not TOKEN:SIZE "
                             "(e.g. 20:1.5G)")
        out.append((int(k), v))
    return out


def run(a, start: str, changes: str, limit: int) -> dict:
    from flexinfer.cgroup import drop_page_cache, run_limited
    drop_page_cache()
    argv = [sys.executable, os.path.abspath(__file__), a.model, "--child", "--start", start,
            "--changes", changes, "--tokens", str(a.tokens), "-t", str(a.threads),
            "-c", str(a.ctx)]
    res = run_limited(argv, limit, timeout=3600,
                      disk_rate=(a.model, a.disk_rate) if a.disk_rate else None)
    if res.returncode != 0:
        raise SystemExit(f"bench_budget_change: the run failed ({res.returncode}): "
                         f"{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out.update(peak_bytes=res.peak_bytes, oom_killed=res.oom_killed, limit=limit)
    return out


def steady_tok_s(tokens: list, lo: int, hi: int) -> float:
    """Tokens lo..hi-1 (0-based), by their completion times: (hi - lo) / time."""
    t = [r[0] for r in tokens]
    return (hi - lo) / (t[hi - 1] - t[lo - 1]) if lo > 0 else hi / t[hi - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--start", default="3G")
    ap.add_argument("--changes", default="20:1.5G,40:3G", help="TOKEN:SIZE,... (before that token)")
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx", type=int, default=256)
    ap.add_argument("--disk-rate", type=int, default=None, help="bytes/s read cap (blkio/io.max)")
    ap.add_argument("--fresh", action="store_true", help="also a fresh process at each budget")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return 0
    from flexinfer.budget import parse_size
    from flexinfer.errors import FlexInferError
    sizes = [a.start] + [v for _, v in parse_changes(a.changes)]
    try:
        limit = max(parse_size(s, "--start/--changes") for s in sizes)
    except FlexInferError as e:
        raise SystemExit(f"bench_budget_change: {e}") from None
    result = {"model": a.model, "threads": a.threads, "ctx": a.ctx, "start": a.start,
              "changes": a.changes, "disk_rate": a.disk_rate, "changing": run(a, a.start, a.changes, limit)}
    if a.fresh:
        result["fresh"] = {s: run(a, s, "", parse_size(s)) for s in dict.fromkeys(sizes)}
    report(result)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    if a.plot:
        plot(result, a.plot)
    return 0


def report(r: dict) -> None:
    ch = r["changing"]
    toks = ch["tokens"]
    marks = [0] + [e["before_token"] for e in ch["changes"]] + [len(toks)]
    gaps = [toks[i][0] - toks[i - 1][0] for i in range(1, len(toks))]
    print(f"load {ch['load_s']:.1f} s, peak {ch['peak_bytes'] / 1e9:.2f} GB, "
          f"OOM {ch['oom_killed']}")
    for e in ch["changes"]:
        k = e["before_token"]
        after = sorted(gaps[k:k + 8])  # the new budget's token time: the median of the next 8
        typical = after[len(after) // 2]
        stall = gaps[k - 1] - typical  # the interval holding the change, less a typical one
        print(f"before token {k}: {e['old'] / 1e9:.2f} -> {e['new'] / 1e9:.2f} GB in "
              f"{e['seconds']:.2f} s (released {e['released_bytes'] / 1e9:.2f} GB, read "
              f"{e['read_bytes'] / 1e9:.2f} GB); stall {stall:.2f} s = {stall / typical:.2f} tokens")
    sizes = [r["start"]] + [v for _, v in parse_changes(r["changes"])]
    for (lo, hi), size in zip(zip(marks, marks[1:]), sizes):
        skip = 2 if lo else 5  # settle: after a change, and after the prompt
        got = steady_tok_s(toks, lo + skip, hi)
        fresh = r.get("fresh", {}).get(size)
        line = f"tokens {lo + skip}-{hi}: {got:.3f} tok/s at {size}"
        if fresh:
            f = steady_tok_s(fresh["tokens"], 5, len(fresh["tokens"]))
            line += f"; a fresh process at {size}: {f:.3f} tok/s ({got / f:.2f}x)"
        print(line)


def plot(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    toks = r["changing"]["tokens"]
    t = [row[0] for row in toks]
    rate = [1 / (t[i] - t[i - 1]) if i else None for i in range(len(t))]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    ax1.plot(t[1:], rate[1:], marker=".", label="tok/s (each token)")
    for e in r["changing"]["changes"]:
        for ax in (ax1, ax2):
            ax.axvline(e["at_s"], color="grey", ls="--")
        ax1.annotate(f"{e['new'] / 1e9:.1f} GB", (e["at_s"], max(x for x in rate[1:])), fontsize=8)
    for size, fresh in r.get("fresh", {}).items():
        ft = [row[0] for row in fresh["tokens"]]
        ax1.axhline(steady_tok_s(fresh["tokens"], 5, len(ft)), ls=":", lw=1,
                    label=f"fresh process at {size}")
    ax1.set_ylabel("tokens/s")
    ax1.legend(fontsize=7)
    ax2.plot(t, [row[1] / 1e9 for row in toks], label="process RSS")
    ax2.plot(t, [row[2] / 1e9 for row in toks], label="resident weights")
    ax2.set_ylabel("GB")
    ax2.set_xlabel("seconds since the first token")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{os.path.basename(r['model'])}: budget {r['start']}, then {r['changes']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
