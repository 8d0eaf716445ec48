"""The sweep's outputs in OUT_DIR: results.json (everything), results.md (tables), throughput.png
(tokens/s against budget, one line per mode, the bound dashed, like the paper's figure).

Decode tables and the plot use the rows of the first prompt length; each prompt length gets its own
prefill table (prompt processing tokens/s).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

GB = 10**9  # budgets are decimal GB, as the issue and the paper state them
MARKERS = ("s", "o", "v", "^", "D", "P", "X", "*")  # mmap, sync, prefetch, no-balance, flexinfer...


def gib(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / GB:.2f}"


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
        "options": {"budgets_bytes": list(opts.budgets), "modes": list(opts.modes),
                    "tokens": opts.tokens, "prompt_tokens": list(opts.prompt_tokens),
                    "threads": opts.threads, "ctx": opts.ctx, "timeout_s": opts.timeout_s},
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

def cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"].split(":")[0]  # oom, timeout, crashed
    value = row.get(key)
    return "" if value is None else format(value, fmt)


def table(rows: list[dict], modes: list[str], key: str, fmt: str, bound: bool) -> list[str]:
    by = {(r["budget_bytes"], r["mode"]): r for r in rows}
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


def markdown(results: dict) -> str:
    rows, modes = results["rows"], results["options"]["modes"]
    prompts = results["options"]["prompt_tokens"]
    first = [r for r in rows if r["prompt_tokens"] == prompts[0]]
    m, model = results["machine"], results["model"]
    out = [f"# flexinfer bench: {Path(model['path']).name} ({model['bytes'] / 1e9:.2f} GB)", "",
           f"{m.get('cores')} cores ({m.get('cpu_model')}), Linux {m.get('kernel')}, disk "
           f"{m.get('disk_bw_bytes_per_s', 0) / 1e9:.2f} GB/s (O_DIRECT), T_cpu "
           f"{_fmt(m.get('t_cpu_s_per_token'), '.3f')} s/token fully resident.", "",
           f"    {results['command']}", "",
           f"## Decode tokens/s (prompt {prompts[0]} tokens, {results['options']['tokens']} "
           "generated)", "", *table(first, modes, "decode_tokens_per_s", ".2f", True), "",
           "## Ratio to bound (decode tokens/s / bound)", "",
           *table(first, modes, "ratio_to_bound", ".0%", False), ""]
    for p in prompts:
        out += [f"## Prefill tokens/s (prompt {p} tokens)", "",
                *table([r for r in rows if r["prompt_tokens"] == p], modes,
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
    return ["## Notes", "", *lines]


def _fmt(value, fmt: str) -> str:
    return "?" if value is None else format(value, fmt)


# ---- plot ----

def bound_curve(results: dict, budgets: list[int], n: int = 200) -> list[tuple[float, float]]:
    """(GB, tokens/s) of the bound over the budgets' range, dense enough to show its knee."""
    m = results["machine"]
    if not budgets:
        return []
    lo, hi = min(budgets), max(budgets)
    xs = [lo + (hi - lo) * i / (n - 1) for i in range(n)] if hi > lo else [lo]
    ys = [bound_tokens_per_s(results["model"]["bytes"], int(x), m.get("t_cpu_s_per_token"),
                             m.get("disk_bw_bytes_per_s")) for x in xs]
    return [(x / GB, y if y is not None else math.nan) for x, y in zip(xs, ys)]


def plot(results: dict, path: Path):
    """tokens/s against budget GB: one line per mode with markers, the bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results["options"]["prompt_tokens"][0]
    rows = [r for r in results["rows"] if r["prompt_tokens"] == first and r["budget_bytes"]]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, mode in enumerate(results["options"]["modes"]):
        pts = sorted((r["budget_bytes"] / GB, r["decode_tokens_per_s"] or math.nan)
                     for r in rows if r["mode"] == mode)
        if pts:
            ax.plot(*zip(*pts), marker=MARKERS[i % len(MARKERS)], label=mode)
    curve = bound_curve(results, [r["budget_bytes"] for r in rows])
    if curve:
        ax.plot(*zip(*curve), "k--", label="bound")
    name = Path(results["model"]["path"]).name
    ax.set(xlabel="memory budget (GB)", ylabel="decode tokens/s", ylim=(0, None),
           title=f"{name} ({results['model']['bytes'] / 1e9:.2f} GB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
