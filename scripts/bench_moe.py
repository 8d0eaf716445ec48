"""The mixture-of-experts benchmark of issue 14: flexinfer's expert cache against llama.cpp mmap and
the MoE bound, budget by budget, for one or more MoE models (the uniform and zipf routers).

    sudo python scripts/bench_moe.py /work/models/qwen3-30b-a3b-uniform.gguf \
        /work/models/qwen3-30b-a3b-zipf1.gguf --budgets 2G,4G,8G -t 2 -c 256 -n 32 --out DIR

Each point is a fresh process (`flexinfer run --json`, or flexinfer.bench.peer_llamacpp) in a
memory cgroup whose limit is the budget, after the page cache is dropped (cgroup.run_limited, as
`flexinfer bench` runs its points). The disk's O_DIRECT bandwidth is measured once per model file (under --disk-rate's cap, which
every point then runs under too: an I/O cgroup, as `flexinfer bench --disk-rate`).
--temp > 0 samples (both engines, seeded): a synthetic model's greedy output repeats itself, so
greedy decoding picks the same experts again and again, far more locality than text has.
Per flexinfer point:
  MoE bound = 1 / max(T_cpu, missed expert bytes per token / disk bandwidth)
and the same bound at the disk's rate for reads shaped like the cache's (random reads of one
expert slab, three an expert: bench.machine.measure_expert_reads), which waits on latency too
with T_cpu given by --t-cpu (decode s/token with all weights resident, measured apart), else the
point's own compute seconds per decode token (decode time less the time spent waiting for expert
and weight reads) and the missed bytes what its expert cache read per decode
token; the point's hit rate, its plan's predicted tok/s and the prediction's error.

Before a model's points, compute is calibrated COMPUTE_ROUNDS times a second apart and the
median kept for every point's plan (one calibration once caught the machine at half speed, and
the fastest of five once made plans up to 22% optimistic). The plans read the disk at the
bench's own measurement of it, the bound's, and a layer's misses at the rate measured as a decode
step reads them (MISS_READS experts, each after MISS_PAUSE_S: planner.Machine.expert_bw).

A flexinfer run saves its expert counts under $FLEXINFER_HOME (experts.py) and the next run starts
warm from them. The bench runs in a FLEXINFER_HOME of its own: per model, one warm-up run (not in
the table: another prompt, WARMUP_PROMPT, at the largest budget) writes counts, and every point starts
from exactly those (restored before each point); --cold starts every point from none. The points
decode after POINT_PROMPT, a sentence of another text (--prompt, --prompt-tokens).

Single runs here move by up to 15%: --repeats N runs each flexinfer point N times (every point
once, then again, so a point's runs are minutes apart) and the table gives its median run (that
run's bound, hit rate and plan) and the range of the N.
Writes DIR/results.json after every point and DIR/table.md at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexinfer.bench.machine import (machine_info, measure_disk_capped,  # noqa: E402
                                     measure_expert_reads_capped)
from flexinfer.bench.sweep import parse_result, prompt_text, status_of  # noqa: E402
from flexinfer.budget import parse_size  # noqa: E402
from flexinfer.cgroup import cgroup_unavailable_reason, drop_page_cache, run_limited  # noqa: E402
from flexinfer.errors import FlexInferError  # noqa: E402
from flexinfer.gguf_file import read_gguf  # noqa: E402
from flexinfer.machine import calibrate_compute, record_calibration  # noqa: E402

MISS_READS, MISS_PAUSE_S = 100, 0.02  # experts read, each after this pause, for the plans' rate of
# a layer's misses: a decode token at 4 GB computes ~0.15 s between its 6-10 layers with misses
COMPUTE_ROUNDS = 5  # compute calibrations, a second apart, before a model's points: the median


def flexinfer_argv(a, model: str, budget: int) -> list[str]:
    return [sys.executable, "-m", "flexinfer", "run", model, "--json", "-n", str(a.tokens),
            "-t", str(a.threads), "-c", str(a.ctx), "--temp", str(a.temp), "-s", str(a.seed),
            "--ignore-eos", *(["--expert-prefetch"] if getattr(a, "expert_prefetch", None) else []),
            *(["--expert-fill"] if getattr(a, "expert_fill", None) else []),
            "--memory-budget", str(budget), "-p", point_prompt(a)]


WARMUP_PROMPT = ("Once upon a time in a small village by the sea, an old sailor told the children "
                 "stories of storms, islands, whales and lighthouses, and of the long way home")
POINT_PROMPT = ("The committee met on Tuesday morning to review the budget for the new public "
                "library, and after a long debate they agreed to")  # 24 tokens, not the warm-up's:
# the counts the points start from are another text's. Until the fifteenth session the points'
# prompt was "the" 16 times (--prompt-tokens 16): a context of one token repeated, whose routing
# repeats too. At 2 GB it held 0.77 / 0.71 of a token's picks (uniform / zipf:1 router) where this
# text holds 0.69 / 0.62, as the warm-up's own picks replayed (the plans' estimate) predict


def point_prompt(a) -> str:
    """The prompt of a point: a.prompt (the warm-up's, or --prompt), else 'the' --prompt-tokens
    times when given, else POINT_PROMPT."""
    if getattr(a, "prompt", None):
        return a.prompt
    if getattr(a, "prompt_tokens", None):
        return prompt_text(a.prompt_tokens)
    return POINT_PROMPT


def peer_argv(a, model: str) -> list[str]:
    return [sys.executable, "-m", "flexinfer.bench.peer_llamacpp", model, "--tokens",
            str(a.peer_tokens or a.tokens), "--threads", str(a.threads), "--ctx", str(a.ctx),
            "--temp", str(a.temp), "--seed", str(a.seed), "-p", point_prompt(a)]


def expert_piece(model: str) -> int:
    """Bytes of one expert's slab of an *_exps tensor (what the cache reads at a time)."""
    from flexinfer.gguf_file import read_gguf
    g = read_gguf(model)
    exps = [t for n, t in g.tensors.items() if n.endswith("_exps.weight") and len(t.shape) == 3]
    if not exps:
        raise FlexInferError(f"{model}: no expert tensors (ffn_*_exps): not a mixture of experts")
    return exps[0].nbytes // exps[0].shape[2]


def moe_bound(r: dict, disk_bw: float, t_cpu: float | None = None) -> float | None:
    """1 / max(T_cpu, missed expert bytes per token / disk bandwidth), from a flexinfer point
    (T_cpu: the given one, else the point's own compute seconds per token)."""
    e = r.get("experts")
    t_cpu = t_cpu or r.get("compute_s_per_token")
    if not e or not t_cpu:
        return None
    return 1.0 / max(t_cpu, e["decode_expert_bytes_per_token"] / disk_bw)


def run_point(a, model: str, mode: str, budget: int, disk_bw: float, home: str,
              expert_bw: float | None = None) -> dict:
    argv = flexinfer_argv(a, model, budget) if mode == "flexinfer" else peer_argv(a, model)
    drop_page_cache()
    env = {**os.environ, "FLEXINFER_HOME": home}
    rate = (model, a.disk_rate) if a.disk_rate else None
    run = run_limited(argv, budget, env=env, timeout=a.timeout, disk_rate=rate)
    r = parse_result(run.stdout) if run.returncode == 0 else None
    row = {"model": os.path.basename(model), "mode": mode, "budget_bytes": budget,
           "status": status_of(run, r), "cgroup_peak_bytes": run.peak_bytes,
           "disk_rate_bytes_per_s": a.disk_rate,
           "seconds": round(run.seconds, 1), "argv": argv, "result": r or {},
           "load_avg": [round(x, 2) for x in os.getloadavg()]}
    if r:
        row["decode_tokens_per_s"] = r.get("decode_tokens_per_s")
        if mode == "flexinfer":
            row["moe_bound_tokens_per_s"] = moe_bound(r, disk_bw, a.t_cpu)
            if expert_bw:
                row["moe_bound_expert_reads_tokens_per_s"] = moe_bound(r, expert_bw, a.t_cpu)
            row["predicted_tokens_per_s"] = (r.get("plan") or {}).get("predicted_tokens_per_s")
            e = r.get("experts") or {}
            row["hit_rate"] = e.get("decode_hit_rate")
            row["cached_rate"] = e.get("decode_cached_rate")
            row["pin_share"] = e.get("pin_share")
            row["expert_bytes_per_token"] = e.get("decode_expert_bytes_per_token")
    if run.returncode != 0:
        row["stderr_tail"] = run.stderr[-600:]
    return row


def medians(rows: list[dict]) -> list[tuple[dict, list[float]]]:
    """Each point's median run (by decode tok/s; of an even number the lower middle) and the
    tok/s of all its runs (--repeats), points in the order they first ran. The median run's own
    bound, hit rate and plan go in the table with it, so a row's numbers come from one run."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["budget_bytes"], r["mode"]), []).append(r)
    out = []
    for runs in groups.values():
        ok = sorted((r for r in runs if r.get("decode_tokens_per_s")),
                    key=lambda r: r["decode_tokens_per_s"])
        if not ok:  # none ran: the first failure speaks for the point
            out.append((runs[0], []))
            continue
        out.append((ok[(len(ok) - 1) // 2], [r["decode_tokens_per_s"] for r in ok]))
    return out


def table(rows: list[dict]) -> str:
    out = ["| model | budget | mode | tok/s | MoE bound | % of bound | bound at expert reads | "
           "% of it | vs llama.cpp mmap | plan tok/s (error) | decode hit rate (cached) | "
           "pinned share | expert GB read/token | peak GB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    peer = {(r["model"], r["budget_bytes"]): r.get("decode_tokens_per_s")
            for r, _ in medians(rows) if r["mode"] == "llama.cpp-mmap"}
    f = lambda v, fmt: "" if v is None else fmt.format(v)  # noqa: E731
    pct = lambda a, b: f(a / b * 100 if a and b else None, "{:.0f}%")  # noqa: E731
    for r, runs in medians(rows):
        tps, bound = r.get("decode_tokens_per_s"), r.get("moe_bound_tokens_per_s")
        spread = f" ({min(runs):.3f}-{max(runs):.3f}, {len(runs)} runs)" if len(runs) > 1 else ""
        ebound = r.get("moe_bound_expert_reads_tokens_per_s")
        p = peer.get((r["model"], r["budget_bytes"]))
        pred = r.get("predicted_tokens_per_s")
        err = f" ({100 * (pred - tps) / tps:+.0f}%)" if pred and tps else ""
        status = "" if r["status"] == "ok" else f" ({r['status']})"
        cached = r.get("cached_rate")
        hit = f(r.get("hit_rate"), "{:.2f}") + (f" ({cached:.2f})" if cached is not None else "")
        out.append(
            f"| {r['model']} | {r['budget_bytes'] / 1e9:.1f} GB | {r['mode']}{status} | "
            f"{f(tps, '{:.3f}')}{spread} | {f(bound, '{:.3f}')} | {pct(tps, bound)} | "
            f"{f(ebound, '{:.3f}')} | {pct(tps, ebound)} | "
            f"{f(tps / p if tps and p and r['mode'] == 'flexinfer' else None, '{:.2f}x')} | "
            f"{f(pred, '{:.3f}')}{err} | {hit} | {f(r.get('pin_share'), '{:g}')} | "
            f"{f((r.get('expert_bytes_per_token') or 0) / 1e9 if 'hit_rate' in r else None, '{:.3f}')}"
            f" | {f((r['cgroup_peak_bytes'] or 0) / 1e9, '{:.2f}')} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="MoE GGUF files")
    p.add_argument("--budgets", default="2G,4G,8G")
    p.add_argument("--threads", "-t", type=int, default=2)
    p.add_argument("--ctx", "-c", type=int, default=256)
    p.add_argument("--tokens", "-n", type=int, default=32)
    p.add_argument("--prompt", help="the points' prompt, both engines (default: POINT_PROMPT, "
                   "a sentence; the warm-up keeps its own, WARMUP_PROMPT)")
    p.add_argument("--prompt-tokens", type=int, help="the points' prompt is instead the word "
                   "'the' this many times, as before the fifteenth session (a context of one "
                   "token repeated, whose routing repeats too)")
    p.add_argument("--peer-tokens", type=int, help="tokens llama.cpp decodes (default: -n); "
                   "mmap re-reads the model every token, 13 s a token at 2 GB")
    p.add_argument("--warmup-tokens", type=int, default=48, help="tokens of the warm-up run "
                   "whose counts and picks every point starts from (the plan replays its picks)")
    p.add_argument("--no-peer", action="store_true", help="flexinfer points only")
    p.add_argument("--peer-budgets", help="the budgets llama.cpp runs at (default: all of "
                   "--budgets); under a slow cap its mmap takes minutes a token")
    p.add_argument("--repeats", "--repeat", type=int, default=1, help="runs of each flexinfer "
                   "point (as `flexinfer bench --repeats`; fresh "
                   "processes, the same counts restored before each); the table gives the median "
                   "run and the range. llama.cpp runs once: under a cap its mmap is disk-bound")
    p.add_argument("--expert-prefetch", action="store_true", help="flexinfer with its expert "
                   "read-ahead (off by default), for the A/B of the ninth session's table")
    p.add_argument("--expert-fill", action="store_true", help="flexinfer fills its expert cache "
                   "at load (off by default for run), for the thirteenth session's A/B")
    p.add_argument("--cold", action="store_true", help="no expert counts carried between points")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--t-cpu", type=float, help="decode s/token with every weight resident (the "
                   "bound's T_cpu); default: each point's own compute s/token")
    p.add_argument("--disk-rate", help="cap reads of the models' disk at this many bytes/s (an I/O "
                   "cgroup, as `flexinfer bench --disk-rate`), e.g. 1G; the disk is measured "
                   "under the same cap")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature of both engines "
                   "(0: greedy; a synthetic model's greedy output repeats itself, and so do its "
                   "experts: > 0 routes like varied text)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        a.disk_rate = parse_size(a.disk_rate, "--disk-rate") if a.disk_rate else None
        budgets = [parse_size(b, "--budgets") for b in a.budgets.split(",")]
        peer_budgets = set(budgets if a.peer_budgets is None else
                           (parse_size(b, "--peer-budgets") for b in a.peer_budgets.split(",")))
    except FlexInferError as e:
        print(f"bench_moe: {e}", file=sys.stderr)
        return 2
    if not peer_budgets <= set(budgets):
        print(f"bench_moe: --peer-budgets {a.peer_budgets}: each must be one of --budgets "
              f"{a.budgets}", file=sys.stderr)
        return 2
    if a.temp < 0:
        print(f"bench_moe: --temp must be >= 0, got {a.temp}", file=sys.stderr)
        return 2
    for name in ("tokens", "peer_tokens", "warmup_tokens", "repeats", "prompt_tokens"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            print(f"bench_moe: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    reason = cgroup_unavailable_reason()
    if reason:
        print(f"bench_moe: no memory cgroup: {reason}", file=sys.stderr)
        return 2
    for m in a.models:
        if not os.path.isfile(m):
            print(f"bench_moe: {m}: no such file", file=sys.stderr)
            return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(sys.argv), "machine": machine_info(), "disk": {}, "rows": [],
               "prompt": point_prompt(a), "warmup_prompt": None if a.cold else WARMUP_PROMPT}
    modes = ["flexinfer"] + ([] if a.no_peer else ["llama.cpp-mmap"])
    # expert counts and calibration of this run: compute and the disk (under the cap) are
    # calibrated here, afresh, so plans never predict from an old measurement
    home = tempfile.mkdtemp(prefix="bench-moe-home-")
    os.environ["FLEXINFER_HOME"] = home  # where this process's compute calibration goes too
    try:
        for m in a.models:
            # the median of COMPUTE_ROUNDS a second apart: a plan's compute is measured in ~5 ms,
            # and once it caught the machine at half speed and every point's plan with it
            results.setdefault("compute_bytes_per_s", {})[os.path.basename(m)] = \
                calibrate_compute(read_gguf(m), True, a.threads, COMPUTE_ROUNDS, 1.0)
            bw = measure_disk_capped(m, a.disk_rate).bytes_per_s
            results["disk"][os.path.basename(m)] = bw
            piece = expert_piece(m)  # reads the file's header: once a model
            ebw = measure_expert_reads_capped(m, piece, a.disk_rate)
            results.setdefault("expert_reads", {})[os.path.basename(m)] = ebw
            # the plans' rate for a layer's misses: read as a decode step reads them, a few
            # slabs after a pause (under a cap: 0.50-0.62 GB/s after 5-50 ms at a 250 MB/s cap)
            miss_bw = measure_expert_reads_capped(m, piece, a.disk_rate, MISS_READS, MISS_PAUSE_S)
            results.setdefault("miss_reads", {})[os.path.basename(m)] = miss_bw
            # the points' plans read the disk at the rate the bound uses (as flexinfer bench
            # stores its own), not at one 256 MB measurement of their own: under the same cap
            # that gave 0.76 GB/s in a plan where this gave 0.98
            record_calibration(m, a.threads, bw, None, disk_rate=a.disk_rate, expert_bw=miss_bw)
            counts = Path(home) / "experts"
            shutil.rmtree(counts, ignore_errors=True)
            if not a.cold:  # the warm-up: counts from another prompt, kept for every point
                warm = run_point(argparse.Namespace(**{**vars(a), "prompt": WARMUP_PROMPT,
                                                       "tokens": a.warmup_tokens}),
                                 m, "flexinfer", max(budgets), bw, home)
                results.setdefault("warmup", []).append(warm)
                shutil.copytree(counts, Path(home) / "warm", dirs_exist_ok=True)
            for i in range(a.repeats):  # every point once, then again: a point's runs fall
                # minutes apart, so a slow spell of the machine does not take all of them
                for budget, mode in ((b, md) for b in budgets for md in modes
                                     if md == "flexinfer" or (i == 0 and b in peer_budgets)):
                    shutil.rmtree(counts, ignore_errors=True)
                    if not a.cold:
                        shutil.copytree(Path(home) / "warm", counts)
                    row = {**run_point(a, m, mode, budget, bw, home, ebw), "run": i}
                    results["rows"].append(row)
                    print(f"bench_moe: {row['model']} {budget / 1e9:.1f} GB {mode}: "
                          f"{row['status']} {row.get('decode_tokens_per_s')} tok/s",
                          file=sys.stderr)
                    (out / "results.json").write_text(json.dumps(results, indent=1))
    except FlexInferError as e:  # e.g. --disk-rate where no I/O cgroup can be made: one line
        print(f"bench_moe: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(home, ignore_errors=True)
    (out / "table.md").write_text(table(results["rows"]))
    print(table(results["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
