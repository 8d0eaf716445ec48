"""The sweep's outputs in OUT_DIR: results.json (everything), results.md (tables), throughput.png
(tokens/s against budget, one line per mode and disk rate, each rate's bound dashed, like the
paper's figure).

With repeats, a cell is the median of the point's runs and the spread is (min-max); with disk
rates, each rate gets its own tables.

Decode tables and the plot use the rows of the first prompt length; each prompt length gets its own
prefill table (prompt processing tokens/s).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict
from pathlib import Path

GB = 10**9  # budgets are decimal GB, as the issue and the paper state them
MARKERS = ("s", "o", "v", "^", "D", "P", "X", "*")  # mmap, sync, prefetch, no-balance, flexinfer...


def gib(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / GB:.2f}"


def rate_label(rate: int | None) -> str:
    return "uncapped" if rate is None else f"{rate / 1e9:g} GB/s"


def disk_fields(disk, disk_bw: float) -> dict:
    """The machine entries of the disk measurement (disk is None when --disk-bw was given)."""
    fields = {"disk_bw_bytes_per_s": disk_bw}
    if disk is not None:
        fields.update(disk_bw_samples=list(disk.samples), disk_direct_io=disk.direct,
                      disk_cache_dropped=disk.cache_dropped)
    return fields


def new_results(opts, model_bytes: int, machine: dict, resident, notes: list[str]) -> dict:
    return {
        "command": opts.command_line,
        "model": {"path": os.path.abspath(opts.model), "bytes": model_bytes},
        "machine": machine,
        "options": {"budgets_bytes": list(opts.budgets), "modes": opts.labels,
                    "parallel": list(opts.parallel),
                    "tokens": opts.tokens, "prompt_tokens": list(opts.prompt_tokens),
                    "threads": opts.threads, "ctx": opts.ctx, "timeout_s": opts.timeout_s,
                    "disk_rates_bytes_per_s": list(opts.disk_rates), "repeats": opts.repeats},
        "disks": [],  # per disk rate: its cap, calibrated bandwidth, and the load when it began
        "resident_run": asdict(resident) if resident else None,
        "notes": notes,
        "rows": [],
    }


def write_json(out: Path, results: dict):
    tmp = out / "results.json.part"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out / "results.json")


def write_all(out: Path, results: dict):
    write_json(out, results)
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "throughput.png")


def bound_tokens_per_s(model_bytes: int, budget: int | None, t_cpu: float | None,
                       disk_bw: float | None) -> float | None:
    """The paper's P_async = 1 / max(T_cpu, T_io), T_io = bytes that do not fit / bandwidth."""
    t_io = max(0, model_bytes - budget) / disk_bw if budget is not None and disk_bw else 0.0
    slowest = max(t_cpu or 0.0, t_io)
    return 1.0 / slowest if slowest > 0 else None


# ---- tables ----

def merged(rows: list[dict]) -> dict | None:
    """The repeats of one point as one row: medians of the figures, the decode spread added."""
    if not rows:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return rows[0]
    out = dict(ok[0])
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "ratio_to_bound",
                "bytes_read_per_token", "disk_read_bytes_per_token", "io_gbps", "stall_fraction",
                "predicted_tokens_per_s", "compute_s_per_token", "convert_s_per_token"):
        values = [r[key] for r in ok if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    decode = [r["decode_tokens_per_s"] for r in ok if r["decode_tokens_per_s"] is not None]
    out["spread"] = (min(decode), max(decode)) if decode else None
    out["runs"], out["failed"] = len(rows), len(rows) - len(ok)
    return out


def group(rows: list[dict]) -> dict:
    """(budget, mode) -> the merged repeats of that point."""
    keys: dict = {}
    for r in rows:
        keys.setdefault((r["budget_bytes"], r["mode"]), []).append(r)
    return {k: merged(v) for k, v in keys.items()}


def cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"].split(":")[0]  # oom, timeout, crashed
    value = row.get(key)
    text = "" if value is None else format(value, fmt)
    if key == "decode_tokens_per_s" and row.get("runs", 1) > 1 and row.get("spread"):
        text += f" ({format(row['spread'][0], fmt)}-{format(row['spread'][1], fmt)})"
    if row.get("failed"):
        text += f" [{row['failed']} of {row['runs']} failed]"
    return text


def table(rows: list[dict], modes: list[str], key: str, fmt: str, bound: bool) -> list[str]:
    by = group(rows)
    budgets = sorted({r["budget_bytes"] for r in rows}, key=lambda b: (b is None, b))
    head = ["budget GB", *modes] + (["bound"] if bound else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in budgets:
        cells = [cell(by.get((b, m)), key, fmt) for m in modes]
        if bound:
            some = next((by[(b, m)] for m in modes if (b, m) in by), {})
            cells.append(_fmt(some.get("bound_tokens_per_s"), ".2f"))
        lines.append("| " + " | ".join([gib(b), *cells]) + " |")
    return lines


def detail(rows: list[dict], modes: list[str]) -> list[str]:
    """Per point (medians): decode, plan's prediction and its error, bytes, rates, stalls."""
    by = group(rows)
    lines = ["| budget GB | mode | tok/s | predicted | error | GB read/token (reader) | "
             "GB read/token (/proc) | read GB/s | stall | compute s/tok | convert s/tok | window |",
             "|" + "---|" * 12]
    for (b, m), r in sorted(by.items(), key=lambda kv: (kv[0][0] or 0, modes.index(kv[0][1])
                                                        if kv[0][1] in modes else 99)):
        if r["status"] != "ok":
            continue
        d, p = r.get("decode_tokens_per_s"), r.get("predicted_tokens_per_s")
        err = f"{(p - d) / d:+.0%}" if d and p else ""
        lines.append(f"| {gib(b)} | {m} | {_fmt(d, '.2f')} | {_fmt(p, '.2f')} | {err} | "
                     f"{_gb(r.get('bytes_read_per_token'))} | "
                     f"{_gb(r.get('disk_read_bytes_per_token'))} | {_fmt(r.get('io_gbps'), '.2f')}"
                     f" | {_fmt(r.get('stall_fraction'), '.0%')} | "
                     f"{_fmt(r.get('compute_s_per_token'), '.3f')} | "
                     f"{_fmt(r.get('convert_s_per_token'), '.3f')} | {r.get('window', '')} |")
    return lines


def _gb(value) -> str:
    return "?" if value is None else f"{value / GB:.3f}"


def rates_of(results: dict) -> list:
    return results["options"].get("disk_rates_bytes_per_s") or [None]


def markdown(results: dict) -> str:
    rows, modes = results["rows"], results["options"]["modes"]
    prompts = results["options"]["prompt_tokens"]
    m, model = results["machine"], results["model"]
    out = [f"# flexinfer bench: {Path(model['path']).name} ({model['bytes'] / 1e9:.2f} GB)", "",
           f"{m.get('cores')} cores ({m.get('cpu_model')}), Linux {m.get('kernel')}, T_cpu "
           f"{_fmt(m.get('t_cpu_s_per_token'), '.3f')} s/token fully resident, "
           f"{results['options'].get('repeats', 1)} run(s) per point (median (min-max)).", "",
           f"    {results['command']}", ""]
    disks = results.get("disks") or [{"disk_rate_bytes_per_s": None,
                                      "disk_bw_bytes_per_s": m.get("disk_bw_bytes_per_s")}]
    for disk in disks:
        rate = disk.get("disk_rate_bytes_per_s")
        mine = [r for r in rows if r.get("disk_rate_bytes_per_s") == rate]
        first = [r for r in mine if r["prompt_tokens"] == prompts[0]]
        out += [f"## Disk {rate_label(rate)}: reads {_fmt(disk.get('disk_bw_bytes_per_s', 0) / GB, '.3f')}"
                f" GB/s (O_DIRECT, median of passes), load average "
                f"{' '.join(f'{x:.1f}' for x in disk.get('load_avg') or [])} at its start", "",
                f"### Decode tokens/s (prompt {prompts[0]} tokens, "
                f"{results['options']['tokens']} generated)", "",
                *table(first, modes, "decode_tokens_per_s", ".2f", True), "",
                "### Ratio to bound (median decode tokens/s / bound)", "",
                *table(first, modes, "ratio_to_bound", ".0%", False), "",
                "### Per point (medians)", "", *detail(first, modes), ""]
        for p in prompts:
            out += [f"### Prefill tokens/s (prompt {p} tokens)", "",
                    *table([r for r in mine if r["prompt_tokens"] == p], modes,
                           "prefill_tokens_per_s", ".1f", False), ""]
    out += _notes(results)
    return "\n".join(out) + "\n"


def _notes(results: dict) -> list[str]:
    lines = [f"- {n}" for n in results["notes"]]
    failed = [r for r in results["rows"] if r["status"] != "ok"]
    lines += [f"- {r['mode']} @ {gib(r['budget_bytes'])} GB, prompt {r['prompt_tokens']}: "
              f"{r['status']}" for r in failed]
    lines.append("- bound = 1 / max(T_cpu, max(0, model bytes - budget) / disk bandwidth); "
                 "budgets in GB (10^9 bytes); every point a fresh process in a memory cgroup "
                 "limited to its budget, page cache dropped first.")
    if any(rates_of(results)):
        lines.append("- disk rates: reads of the model's disk capped by the cgroup I/O controller "
                     "(blkio.throttle.read_bps_device / io.max), the calibration and the llama.cpp "
                     "peer included. The throttle lends a reader that pauses its saved-up "
                     "allowance, so bursty readers (sync, mmap) can read above the cap.")
    return ["## Notes", "", *lines]


def _fmt(value, fmt: str) -> str:
    return "?" if value is None else format(value, fmt)


# ---- plot ----

def bound_curve(results: dict, budgets: list[int], disk_bw, n: int = 200) -> list:
    """(GB, tokens/s) of the bound over the budgets' range, dense enough to show its knee."""
    m = results["machine"]
    if not budgets:
        return []
    lo, hi = min(budgets), max(budgets)
    xs = [lo + (hi - lo) * i / (n - 1) for i in range(n)] if hi > lo else [lo]
    ys = [bound_tokens_per_s(results["model"]["bytes"], int(x), m.get("t_cpu_s_per_token"),
                             disk_bw) for x in xs]
    return [(x / GB, y if y is not None else math.nan) for x, y in zip(xs, ys)]


def plot(results: dict, path: Path):
    """tokens/s against budget GB: one line per mode and disk rate (medians), each bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results["options"]["prompt_tokens"][0]
    rows = [r for r in results["rows"] if r["prompt_tokens"] == first and r["budget_bytes"]]
    disks = results.get("disks") or [{"disk_rate_bytes_per_s": None,
                                      "disk_bw_bytes_per_s":
                                      results["machine"].get("disk_bw_bytes_per_s")}]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = ("-", ":", "-.", "--")
    for j, disk in enumerate(disks):
        rate = disk.get("disk_rate_bytes_per_s")
        mine = [r for r in rows if r.get("disk_rate_bytes_per_s") == rate]
        tag = f" @ {rate_label(rate)}" if rate else ""
        by = group(mine)
        for i, mode in enumerate(results["options"]["modes"]):
            pts = sorted((b / GB, r.get("decode_tokens_per_s") or math.nan)
                         for (b, m), r in by.items() if m == mode)
            if pts:
                ax.plot(*zip(*pts), marker=MARKERS[i % len(MARKERS)],
                        linestyle=styles[j % 3], label=mode + tag)
        curve = bound_curve(results, [r["budget_bytes"] for r in mine],
                            disk.get("disk_bw_bytes_per_s"))
        if curve:
            ax.plot(*zip(*curve), "k--", alpha=1 - 0.3 * j, label="bound" + tag)
    name = Path(results["model"]["path"]).name
    ax.set(xlabel="memory budget (GB)", ylabel="decode tokens/s", ylim=(0, None),
           title=f"{name} ({results['model']['bytes'] / 1e9:.2f} GB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
