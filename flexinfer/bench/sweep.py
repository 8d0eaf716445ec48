"""The throughput sweep: every (prompt length, budget, mode) point in a fresh process, in a memory
cgroup whose limit is the budget, after dropping the page cache, as the paper measures.

Every point is one `python -m flexinfer run ... --json` (or the llama.cpp peer) whose JSON line
becomes a row. A point that is OOM-killed, crashes or times out becomes a row saying so, and the
sweep goes on. The bound of each budget is the paper's:
    tokens/s <= 1 / max(T_cpu, max(0, model_bytes - budget) / disk_bw)
with T_cpu the decode seconds per token of a fully resident run and disk_bw the O_DIRECT
sequential read bandwidth of the model file.

With disk rates (--disk-rate), every point and the disk calibration run in an I/O cgroup capping
reads of the model's disk at that rate (disk_cap.py), each rate its own sweep with its own
calibration and bound; a rate that cannot be capped stops the bench (FlexInferError). With
repeats, the points run that many times, modes alternating within each repeat; tables show the
median and the spread.

The command builder and the runner are injected (Deps), so the tests drive the whole sweep with a
fake runner and no model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flexinfer.bench import report
from flexinfer.bench.report import bound_tokens_per_s
from flexinfer.bench.machine import machine_info, measure_disk_capped
from flexinfer.bench.progress import ProgressBar
from flexinfer.machine import record_calibration
from flexinfer.cgroup import LimitedRun, cgroup_unavailable_reason, drop_page_cache, run_limited

MODES = ("mmap", "sync", "prefetch", "no-balance", "flexinfer")
PEERS = {"llama.cpp": ("llama.cpp-mmap", "llama.cpp-repack"),  # --peer NAME: its modes
         "llama.cpp-mmap": ("llama.cpp-mmap",),  # alone: repacking is OOM-killed under a budget
         "llama.cpp-repack": ("llama.cpp-repack",)}  # alone: llama.cpp's default, in RAM
RESIDENT_MODE = "flexinfer"  # the T_cpu run: no budget, everything resident


@dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    mode: str  # a MODES entry or a peer mode ("llama.cpp-mmap")
    budget_bytes: int | None  # the cgroup limit and --memory-budget; None: unlimited
    prompt_tokens: int  # prompt length P
    disk_rate: int | None = None  # bytes/s the disk is capped at; None: uncapped
    repeat: int = 0  # 0, 1, ... of BenchOptions.repeats
    parallel: int = 1  # sequences decoded together (`flexinfer batch -np`); 1: `flexinfer run`

    @property
    def label(self) -> str:
        """The mode as the tables and the plot show it: one line per mode and B."""
        return self.mode if self.parallel == 1 else f"{self.mode} x{self.parallel}"


@dataclass(frozen=True)
class BenchOptions:
    model: str  # GGUF path
    budgets: tuple[int, ...]  # bytes, ascending
    modes: tuple[str, ...]  # flexinfer modes then peer modes
    out_dir: str
    tokens: int = 32  # tokens generated per point
    prompt_tokens: tuple[int, ...] = (16,)  # prompt lengths; decode tables use the first
    threads: int = 2
    ctx: int | None = None  # None: the smallest multiple of 256 holding prompt + tokens
    timeout_s: float = 1800.0  # per point
    disk_bw: float | None = None  # bytes/s; None: measure it
    t_cpu: float | None = None  # decode s/token fully resident; None: measure it
    command_line: str = ""  # as typed, for results.json
    notes: tuple[str, ...] = ()  # said while parsing the options (a peer skipped), for the report
    disk_rates: tuple[int | None, ...] = (None,)  # bytes/s caps, each its own sweep; None: none
    repeats: int = 1  # runs of every point
    parallel: tuple[int, ...] = (1,)  # sequences per weight pass, each its own row (--parallel)

    @property
    def labels(self) -> list[str]:
        return [Point(m, None, 0, parallel=b).label for b in self.parallel for m in self.modes]


@dataclass(frozen=True)
class Row:
    mode: str
    budget_bytes: int | None
    prompt_tokens: int
    status: str  # "ok", "oom", "timeout" or "crashed: <last stderr line>"
    constrained: bool  # False: no cgroup limit held this run
    decode_tokens_per_s: float | None = None
    prefill_tokens_per_s: float | None = None
    bound_tokens_per_s: float | None = None
    ratio_to_bound: float | None = None
    peak_memory_bytes: int | None = None  # as the run reports it, else the cgroup's peak
    cgroup_peak_bytes: int | None = None  # page cache included
    bytes_read_per_token: float | None = None
    io_gbps: float | None = None
    stall_fraction: float | None = None
    load_s: float | None = None
    seconds: float = 0.0  # wall time of the whole process
    command: list[str] = field(default_factory=list)
    predicted_tokens_per_s: float | None = None  # what `flexinfer plan` predicted for this point
    disk_rate_bytes_per_s: int | None = None  # the cap this point ran under; None: uncapped
    repeat: int = 0
    disk_read_bytes_per_token: float | None = None  # /proc/self/io read_bytes while decoding
    compute_s_per_token: float | None = None
    convert_s_per_token: float | None = None
    window: int | None = None  # the plan's layers read ahead
    load_avg: list | None = None  # 1, 5, 15 min load when the point started
    parallel: int = 1  # sequences per weight pass; decode_tokens_per_s is their aggregate


# ---- commands ----

def prompt_text(n: int) -> str:
    """About n tokens in both vocabularies: "the" then " the" n - 1 times (one token each)."""
    return "the" + " the" * (n - 1)


def context_length(opts: BenchOptions) -> int:
    need = max(opts.prompt_tokens) + opts.tokens + 8  # + BOS and a little slack
    return opts.ctx if opts.ctx else -(-need // 256) * 256


def prompts_file(opts: BenchOptions, point: Point) -> str:
    """B copies of the point's prompt as `flexinfer batch` input, in the output directory."""
    path = Path(opts.out_dir) / f"prompts-p{point.prompt_tokens}-b{point.parallel}.jsonl"
    line = json.dumps({"prompt": prompt_text(point.prompt_tokens), "max_tokens": opts.tokens,
                       "temperature": 0})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((line + "\n") * point.parallel)
    return str(path)


def flexinfer_command(opts: BenchOptions, point: Point) -> list[str]:
    if opts.parallel != (1,):  # every B through `batch`, so the rows compare like with like
        argv = [sys.executable, "-m", "flexinfer", "batch", opts.model,
                prompts_file(opts, point), "-o", os.devnull, "-np", str(point.parallel),
                "--json", "--ignore-eos"]
    else:
        argv = [sys.executable, "-m", "flexinfer", "run", opts.model, "--json",
                "-n", str(opts.tokens)]
    argv += ["-t", str(opts.threads), "-c", str(context_length(opts)), "--temp", "0"]
    if point.budget_bytes is not None:
        argv += ["--memory-budget", str(point.budget_bytes)]
    argv += ["--offload", "flexinfer" if point.mode == "no-balance" else point.mode]
    if point.mode == "no-balance":
        argv.append("--no-balance")
    return argv if opts.parallel != (1,) else argv + ["-p", prompt_text(point.prompt_tokens)]


def peer_command(opts: BenchOptions, point: Point) -> list[str]:
    if opts.parallel != (1,):
        argv = [sys.executable, "-m", "flexinfer.bench.peer_batched", opts.model,
                "--parallel", str(point.parallel), "--tokens", str(opts.tokens),
                "--threads", str(opts.threads), "--ctx", str(context_length(opts)),
                "-p", prompt_text(point.prompt_tokens)]
        return argv + (["--repack"] if point.mode == "llama.cpp-repack" else [])
    argv = [sys.executable, "-m", "flexinfer.bench.peer_llamacpp", opts.model,
            "--tokens", str(opts.tokens), "--threads", str(opts.threads),
            "--ctx", str(context_length(opts)), "-p", prompt_text(point.prompt_tokens)]
    return argv + (["--repack"] if point.mode == "llama.cpp-repack" else [])


def build_command(opts: BenchOptions, point: Point) -> list[str]:
    return peer_command(opts, point) if point.mode.startswith("llama.cpp") else \
        flexinfer_command(opts, point)


def _stderr(text: str):
    sys.stderr.write(text + "\n")


@dataclass(frozen=True)
class Deps:
    """Everything the sweep touches outside itself; the tests replace these."""

    command: Callable[[BenchOptions, Point], list[str]] = build_command
    run: Callable[..., LimitedRun] = run_limited  # (argv, limit_bytes, timeout=) -> LimitedRun
    drop_caches: Callable[[], bool] = drop_page_cache
    disk_bandwidth: Callable = measure_disk_capped  # (path, rate or None) -> DiskBandwidth
    cgroup_reason: Callable[[], str | None] = cgroup_unavailable_reason
    machine: Callable[[], dict] = machine_info
    log: Callable[[str], None] = _stderr
    progress_stream: object = None  # default sys.stderr
    # stores the same-run disk bandwidth and T_cpu in the machine cache that every point's plan
    # reads, so predictions use this run's calibration
    calibrate: Callable = record_calibration


# ---- one point ----

def parse_result(stdout: str) -> dict | None:
    """The run's JSON object: the whole stdout, else its last line that is one."""
    for text in (stdout, *reversed(stdout.splitlines())):
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def status_of(run: LimitedRun, result: dict | None) -> str:
    if run.timed_out:
        return "timeout"
    if run.oom_killed:
        return "oom"
    if run.returncode != 0:
        lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {run.returncode}"
        return f"crashed: {last[:200]}"
    return "ok" if result is not None else "crashed: no JSON object on stdout"


def make_row(point: Point, run: LimitedRun, argv: list[str], bound: float | None,
             load_avg=None) -> Row:
    result = parse_result(run.stdout) if run.returncode == 0 else None
    status = status_of(run, result)
    r = result if status == "ok" else {}
    decode = r.get("decode_tokens_per_s")
    return Row(point.label, point.budget_bytes, point.prompt_tokens, status, run.constrained,
               decode, r.get("prefill_tokens_per_s"), bound,
               decode / bound if decode and bound else None,
               r.get("peak_memory_bytes", run.peak_bytes), run.peak_bytes,
               r.get("bytes_read_per_token"), r.get("io_gbps"), r.get("stall_fraction"),
               r.get("load_s"), run.seconds, argv, (r.get("plan") or {}).get("predicted_tokens_per_s"),
               point.disk_rate, point.repeat, r.get("disk_read_bytes_per_token"),
               r.get("compute_s_per_token"), r.get("convert_s_per_token"),
               (r.get("plan") or {}).get("window"), load_avg, point.parallel)


def run_point(opts: BenchOptions, deps: Deps, point: Point, bound: float | None) -> Row:
    argv = deps.command(opts, point)
    deps.drop_caches()
    load_avg = [round(x, 2) for x in os.getloadavg()]
    rate = (opts.model, point.disk_rate) if point.disk_rate else None
    run = deps.run(argv, point.budget_bytes, timeout=opts.timeout_s, disk_rate=rate)
    return make_row(point, run, argv, bound, load_avg)


# ---- the sweep ----

def plan_points(opts: BenchOptions, rate: int | None = None) -> list[Point]:
    """One rate's points: repeat after repeat, each over every prompt, budget and mode."""
    return [Point(mode, budget, p, rate, k, b) for k in range(opts.repeats)
            for p in opts.prompt_tokens for budget in opts.budgets for b in opts.parallel
            for mode in opts.modes]


def measure_t_cpu(opts: BenchOptions, deps: Deps, notes: list[str]) -> tuple[float | None, Row]:
    """Decode seconds per token with everything resident (no budget, no cgroup)."""
    row = run_point(opts, deps, Point(RESIDENT_MODE, None, opts.prompt_tokens[0]), None)
    if row.status != "ok" or not row.decode_tokens_per_s:
        notes.append(f"the resident run for T_cpu failed ({row.status}): bounds use I/O only")
        return None, row
    return 1.0 / row.decode_tokens_per_s, row


def cgroup_notes(opts: BenchOptions, deps: Deps) -> list[str]:
    notes = list(opts.notes)
    reason = deps.cgroup_reason()
    if reason:
        notes.append(f"runs are NOT memory-limited (no cgroup could be written: {reason}); "
                     "rows say constrained: false")
        deps.log(f"bench: {notes[-1]}")
    return notes


def measure_disk(opts: BenchOptions, deps: Deps, rate: int | None = None):
    """(measurement or None when --disk-bw was given, bytes/s), under the cap `rate`."""
    if opts.disk_bw:
        return None, opts.disk_bw
    disk = deps.disk_bandwidth(opts.model, rate)
    deps.log(f"bench: disk reads {disk.bytes_per_s / 1e9:.2f} GB/s "
             f"({'O_DIRECT' if disk.direct else 'buffered'}, median of {len(disk.samples)}"
             f"{', capped at ' + report.rate_label(rate) if rate else ''})")
    return disk, disk.bytes_per_s


def run_sweep(opts: BenchOptions, deps: Deps = Deps()) -> dict:
    """Runs every point, writes results.json after each one and the table and plot at the end
    (also when interrupted: what ran is kept)."""
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_bytes = os.path.getsize(opts.model)
    n_points = len(plan_points(opts)) * len(opts.disk_rates)
    bar = ProgressBar(n_points + (opts.t_cpu is None), deps.progress_stream)
    notes = cgroup_notes(opts, deps)
    t_cpu, resident = opts.t_cpu, None
    if t_cpu is None:  # compute only: uncapped, everything resident
        bar.start("resident run for T_cpu")
        t_cpu, resident = measure_t_cpu(opts, deps, notes)
        bar.step()
    results = None
    try:
        for rate in opts.disk_rates:
            disk, disk_bw = measure_disk(opts, deps, rate)
            deps.calibrate(opts.model, opts.threads, disk_bw, t_cpu, disk_rate=rate)
            fields = {**report.disk_fields(disk, disk_bw), "disk_rate_bytes_per_s": rate,
                      "load_avg": list(os.getloadavg())}
            if results is None:
                machine = {**deps.machine(), **fields, "t_cpu_s_per_token": t_cpu}
                results = report.new_results(opts, model_bytes, machine, resident, notes)
            results["disks"].append(fields)
            for point in plan_points(opts, rate):
                bar.start(f"{point.mode} @ {report.gib(point.budget_bytes)} GB, "
                          f"P={point.prompt_tokens}{', ' + report.rate_label(rate) if rate else ''}"
                          f"{f', run {point.repeat + 1}' if opts.repeats > 1 else ''}")
                bound = bound_tokens_per_s(model_bytes, point.budget_bytes, t_cpu, disk_bw)
                if bound and point.parallel > 1:  # B sequences share each pass's reads: while
                    # reads dominate, B x the one-sequence bound (compute grows with B; see docs)
                    bound *= point.parallel
                results["rows"].append(dataclasses.asdict(run_point(opts, deps, point, bound)))
                report.write_json(out, results)
                bar.step()
    finally:
        bar.finish()
        if results is not None:
            report.write_all(out, results)
    return results
