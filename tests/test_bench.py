"""The bench harness, driven by a fake runner (no model, no engine): rows, tables, plot, failures
recorded while the sweep goes on, unconstrained runs marked. One real run of the llama.cpp peer on
a tiny model where llama_cpp is installed."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import os
import sys

import pytest

from flexinfer.bench import cli_bench, sweep
from flexinfer.bench.machine import DiskBandwidth
from flexinfer.bench.progress import ProgressBar
from flexinfer.bench.sweep import BenchOptions, Deps, Point, bound_tokens_per_s, run_sweep
from flexinfer.cgroup import LimitedRun
from flexinfer.errors import FlexInferError

GiB = 1 << 30
GB = 10**9  # the bench labels budgets in decimal GB


def fake_json(decode: float, prefill: float = 50.0) -> str:
    return json.dumps({"prompt_tokens": [1, 2], "tokens": [3], "text": "x",
                       "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                       "load_s": 0.5, "peak_memory_bytes": 123, "bytes_read_per_token": 1e9,
                       "io_gbps": 1.2, "compute_s_per_token": 0.1, "stall_fraction": 0.3,
                       "resident_bytes": 5, "budget_bytes": 6, "offload_mode": "x"})


def mode_of(argv: list[str]) -> str:
    if "flexinfer.bench.peer_llamacpp" in argv or "flexinfer.bench.peer_batched" in argv:
        return "llama.cpp-repack" if "--repack" in argv else "llama.cpp-mmap"
    return "no-balance" if "--no-balance" in argv else argv[argv.index("--offload") + 1]


class FakeRunner:
    """Resident run: 10 tokens/s. sync @ 1 GB: OOM; prefetch @ 1 GB: crash; mmap @ 2 GB:
    timeout; anything else: budget GB * 0.2 tokens/s (constrained as told)."""

    def __init__(self, constrained: bool = True):
        self.constrained, self.calls, self.rates = constrained, [], []

    def __call__(self, argv, limit, *, timeout=None, disk_rate=None) -> LimitedRun:
        self.calls.append((argv, limit, timeout))
        self.rates.append(disk_rate)
        mode, c = mode_of(argv), self.constrained and limit is not None
        if limit is None:
            return LimitedRun(0, fake_json(10.0), "", None, False, 1.0, False)
        if (mode, limit) == ("sync", GB):
            return LimitedRun(-9, "", "", GB, True, 2.0, c)
        if (mode, limit) == ("prefetch", GB):
            return LimitedRun(1, "", "Traceback:\n  ...\nRuntimeError: boom\n", 9, False, 1.0, c)
        if (mode, limit) == ("mmap", 2 * GB):
            return LimitedRun(-9, "", "", 7, False, 9.0, c, timed_out=True)
        return LimitedRun(0, "log line\n" + fake_json(limit / GB * 0.2), "", limit // 2, False,
                          1.0, c)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.gguf"
    with open(path, "wb") as f:
        f.truncate(3 * GB)  # sparse: 3 GB long, no disk used
    return path


def options(model, out, **kw) -> BenchOptions:
    base = dict(model=str(model), budgets=(GB, 2 * GB, 4 * GB), modes=sweep.MODES,
                out_dir=str(out), tokens=4, disk_bw=float(GB), command_line="flexinfer bench x")
    return BenchOptions(**{**base, **kw})


def deps(runner, reason=None, log=None) -> Deps:
    return Deps(run=runner, calibrate=lambda *a, **k: None, drop_caches=lambda: True, cgroup_reason=lambda: reason,
                machine=lambda: {"cores": 2, "cpu_model": "fake", "kernel": "6.0"},
                log=log or (lambda s: None), progress_stream=io.StringIO())


def test_sweep_rows_table_and_plot(model, tmp_path):
    runner = FakeRunner()
    results = run_sweep(options(model, tmp_path / "out"), deps(runner))
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == results["rows"] and len(saved["rows"]) == 15
    assert saved["machine"]["t_cpu_s_per_token"] == pytest.approx(0.1)
    assert saved["machine"]["disk_bw_bytes_per_s"] == GB and saved["machine"]["cores"] == 2
    assert saved["model"]["bytes"] == 3 * GB and saved["command"] == "flexinfer bench x"
    row = {(r["mode"], r["budget_bytes"]): r for r in saved["rows"]}
    fx = row[("flexinfer", 2 * GB)]
    assert fx["status"] == "ok" and fx["constrained"] and fx["decode_tokens_per_s"] == 0.4
    assert fx["bound_tokens_per_s"] == pytest.approx(1.0)  # 1 GB left over at 1 GB/s
    assert fx["ratio_to_bound"] == pytest.approx(0.4)
    assert fx["peak_memory_bytes"] == 123 and fx["cgroup_peak_bytes"] == GB
    assert row[("flexinfer", 4 * GB)]["bound_tokens_per_s"] == pytest.approx(10.0)  # T_cpu
    md = (out / "results.md").read_text()
    assert "| budget GB | mmap | sync | prefetch | no-balance | flexinfer | bound |" in md
    assert "| 2.00 | timeout | 0.40 | 0.40 | 0.40 | 0.40 | 1.00 |" in md
    assert "| 2.00 | timeout | 40% | 40% | 40% | 40% |" in md
    assert "## Prefill tokens/s (prompt 16 tokens)" in md
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failures_are_rows_and_the_sweep_goes_on(model, tmp_path):
    results = run_sweep(options(model, tmp_path), deps(FakeRunner()))
    row = {(r["mode"], r["budget_bytes"]): r for r in results["rows"]}
    assert row[("sync", GB)]["status"] == "oom"
    assert row[("prefetch", GB)]["status"] == "crashed: RuntimeError: boom"
    assert row[("mmap", 2 * GB)]["status"] == "timeout"
    assert row[("sync", GB)]["decode_tokens_per_s"] is None
    assert row[("flexinfer", 4 * GB)]["status"] == "ok"  # points after the failures still ran
    assert sum(r["status"] == "ok" for r in results["rows"]) == 12
    md = (tmp_path / "results.md").read_text()
    assert "| 1.00 | 0.20 | oom | crashed | 0.20 | 0.20 | 0.50 |" in md
    assert "- prefetch @ 1.00 GB, prompt 16: crashed: RuntimeError: boom" in md


def test_unconstrained_runs_are_marked_and_said_once(model, tmp_path):
    said = []
    results = run_sweep(options(model, tmp_path), deps(FakeRunner(False), "not root", said.append))
    assert all(not r["constrained"] for r in results["rows"])
    assert len([s for s in said if "NOT memory-limited" in s]) == 1
    assert "not root" in results["notes"][0]
    assert "NOT memory-limited" in (tmp_path / "results.md").read_text()


def test_failed_resident_run_leaves_io_only_bounds(model, tmp_path):
    def runner(argv, limit, *, timeout=None, disk_rate=None):
        if limit is None:
            return LimitedRun(1, "", "ImportError: no engine yet\n", None, False, 0.1, False)
        return FakeRunner()(argv, limit, timeout=timeout)

    results = run_sweep(options(model, tmp_path, modes=("flexinfer",)), deps(runner))
    assert results["resident_run"]["status"] == "crashed: ImportError: no engine yet"
    assert "T_cpu failed" in results["notes"][0]
    bounds = [r["bound_tokens_per_s"] for r in results["rows"]]
    assert bounds[0] == pytest.approx(0.5) and bounds[2] is None  # 4 GB: no I/O, T_cpu unknown
    assert "| 4.00 | 0.80 | ? |" in (tmp_path / "results.md").read_text()


def test_every_point_gets_its_budget_as_limit_and_flag(model, tmp_path):
    runner = FakeRunner()
    run_sweep(options(model, tmp_path, modes=("sync", "no-balance"), budgets=(GB,)),
              deps(runner))
    (resident, _, _), *points = runner.calls
    assert "--memory-budget" not in resident and "--offload" in resident
    for argv, limit, timeout in points:
        assert argv[argv.index("--memory-budget") + 1] == str(GB) and limit == GB
        assert timeout == 1800.0
    assert points[1][0][points[1][0].index("--offload") + 1] == "flexinfer"
    assert "--no-balance" in points[1][0]


def test_prompt_lengths_are_points_with_prefill_tables(model, tmp_path):
    opts = options(model, tmp_path, modes=("flexinfer",), prompt_tokens=(8, 64), t_cpu=0.2)
    runner = FakeRunner()
    results = run_sweep(opts, deps(runner))
    assert [(r["prompt_tokens"], r["budget_bytes"]) for r in results["rows"]] == [
        (8, GB), (8, 2 * GB), (8, 4 * GB), (64, GB), (64, 2 * GB), (64, 4 * GB)]
    assert len(runner.calls) == 6  # t_cpu given: no resident run
    prompt = runner.calls[3][0][-1]
    assert prompt.split() == ["the"] * 64
    md = (tmp_path / "results.md").read_text()
    assert "## Prefill tokens/s (prompt 64 tokens)" in md and "| 4.00 | 50.0 |" in md


class RateRunner(FakeRunner):
    """Decode tokens/s = the cap in GB/s times (1 + repeat / 10): repeats differ, rates too."""

    def __call__(self, argv, limit, *, timeout=None, disk_rate=None) -> LimitedRun:
        super().__call__(argv, limit, timeout=timeout, disk_rate=disk_rate)
        if limit is None:
            return LimitedRun(0, fake_json(10.0), "", None, False, 1.0, False)
        runs = sum(1 for r in self.rates if r == disk_rate) - 1
        k = runs // 2  # two budgets per repeat
        return LimitedRun(0, fake_json(disk_rate[1] / GB * (1 + k / 10)), "", 1, False, 1.0, True)


def test_disk_rates_cap_every_point_and_calibration(model, tmp_path):
    runner, measured, calibrated = RateRunner(), [], []

    def disk(path, rate):
        measured.append((path, rate))
        return DiskBandwidth(rate * 0.98, (rate * 0.98,), 1, True, True)

    d = dataclasses.replace(deps(runner), disk_bandwidth=disk,
                            calibrate=lambda *a, **k: calibrated.append(k["disk_rate"]))
    opts = options(model, tmp_path, modes=("flexinfer",), budgets=(GB, 2 * GB), disk_bw=None,
                   disk_rates=(GB // 2, GB), repeats=3, t_cpu=0.1)
    results = run_sweep(opts, d)
    assert measured == [(str(model), GB // 2), (str(model), GB)] and calibrated == [GB // 2, GB]
    assert runner.rates == [(str(model), GB // 2)] * 6 + [(str(model), GB)] * 6
    rows = results["rows"]
    assert [r["disk_rate_bytes_per_s"] for r in rows] == [GB // 2] * 6 + [GB] * 6
    assert [r["repeat"] for r in rows[:6]] == [0, 0, 1, 1, 2, 2]
    # the bound at 1 GB budget: 2 GB left to read at the rate's calibrated 0.98 of the cap
    assert rows[0]["bound_tokens_per_s"] == pytest.approx(0.49 / 2)
    assert rows[6]["bound_tokens_per_s"] == pytest.approx(0.98 / 2)
    assert [x["disk_rate_bytes_per_s"] for x in results["disks"]] == [GB // 2, GB]
    md = (tmp_path / "results.md").read_text()
    assert "## Disk 0.5 GB/s: reads 0.490 GB/s" in md and "## Disk 1 GB/s: reads 0.980" in md
    assert "| 1.00 | 0.55 (0.50-0.60) | 0.24 |" in md  # median of 0.5, 0.55, 0.6
    assert "| 1.00 | 1.10 (1.00-1.20) | 0.49 |" in md
    assert (tmp_path / "throughput.png").exists()


def test_disk_rate_option_stops_where_no_cap_can_be_set(model, tmp_path, monkeypatch):
    monkeypatch.setattr(cli_bench, "io_cap_unavailable_reason", lambda path: "no blkio here")
    with pytest.raises(FlexInferError, match="no blkio here"):
        cli_bench.options_from_args(bench_args(model, tmp_path, "--budgets", "1G",
                                               "--disk-rate", "500M"))
    monkeypatch.setattr(cli_bench, "io_cap_unavailable_reason", lambda path: None)
    opts = cli_bench.options_from_args(bench_args(model, tmp_path, "--budgets", "1G",
                                                  "--disk-rate", "500M,1G", "--repeats", "3"))
    assert opts.disk_rates == (5 * 10**8, 10**9) and opts.repeats == 3
    with pytest.raises(FlexInferError, match="--disk-rate"):
        cli_bench.options_from_args(bench_args(model, tmp_path, "--budgets", "1G",
                                               "--disk-rate", "fast"))


def test_commands():
    opts = BenchOptions("m.gguf", (GB,), sweep.MODES, "out", tokens=32, prompt_tokens=(200,))
    argv = sweep.flexinfer_command(opts, Point("prefetch", GB, 200))
    assert argv[:5] == [sys.executable, "-m", "flexinfer", "run", "m.gguf"]
    for flag, value in (("-n", "32"), ("-t", "2"), ("-c", "256"), ("--temp", "0"),
                        ("--memory-budget", str(GB)), ("--offload", "prefetch")):
        assert argv[argv.index(flag) + 1] == value
    assert "--json" in argv and argv[-2] == "-p"
    peer = sweep.peer_command(opts, Point("llama.cpp-repack", GB, 200))
    assert peer[1:4] == ["-m", "flexinfer.bench.peer_llamacpp", "m.gguf"] and "--repack" in peer
    assert sweep.context_length(BenchOptions("m", (1,), (), "o", tokens=32,
                                             prompt_tokens=(512,))) == 768


def test_bound():
    assert bound_tokens_per_s(4 * GB, GB, 0.1, GB) == pytest.approx(1 / 3)
    assert bound_tokens_per_s(4 * GB, 8 * GB, 0.1, GB) == pytest.approx(10)
    assert bound_tokens_per_s(4 * GB, None, None, GB) is None


@pytest.mark.parametrize("text, value", [("1.5G", 1_500_000_000), ("800M", 800_000_000),
                                         ("2147483648", 2 * GiB), ("1GiB", GiB), ("2gb", 2 * GB),
                                         ("1.5GiB", 3 * GiB // 2)])
def test_parse_size(text, value):
    assert cli_bench.parse_size(text) == value


def bench_args(model, out, *extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_bench.add_bench_parser(parser.add_subparsers())
    return parser.parse_args(["bench", str(model), "--out", str(out), *extra])


def test_cli_options(model, tmp_path, monkeypatch):
    args = bench_args(model, tmp_path, "--budgets", "2G,1G", "--modes", "sync,flexinfer",
                      "--prompt-tokens", "16,128", "-n", "8")
    opts = cli_bench.options_from_args(args)
    assert opts.budgets == (10**9, 2 * 10**9) and opts.modes == ("sync", "flexinfer")
    assert opts.prompt_tokens == (16, 128) and opts.tokens == 8
    for bad, words in ((["--budgets", "lots"], "'lots'"),
                       (["--budgets", "1G", "--modes", "x"], "--modes: x"),
                       (["--budgets", "1G", "--modes", ""], "nothing to run"),
                       (["--budgets", "1G", "--ctx", "64", "-n", "80"], "--ctx 64")):
        with pytest.raises(FlexInferError, match=words):
            cli_bench.options_from_args(bench_args(model, tmp_path, *bad))


def test_missing_peer_is_a_note(model, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "llama_cpp" else real(name))
    said = []
    opts = cli_bench.options_from_args(bench_args(model, tmp_path, "--budgets", "1G", "--peer",
                                                  "llama.cpp"), log=said.append)
    assert opts.modes == sweep.MODES and "llama_cpp is not importable" in opts.notes[0]
    assert len(said) == 1


def test_progress_bar(tmp_path):
    path = tmp_path / "p.txt"
    with open(path, "w") as stream:
        bar = ProgressBar(3, stream)
        for label in ("a", "b", "c"):
            bar.start(label)
            bar.step()
        bar.finish()
    lines = path.read_text().splitlines()
    assert lines[0].startswith("bench [--------------------]  0/3") and "left ?" in lines[0]
    assert "2/3" in lines[2] and "left ~0:00" in lines[2] and lines[-1].endswith("done")


def test_parallel_points_run_batches_of_b_sequences(model, tmp_path):
    """--parallel 1,4: every point once per B, flexinfer through `flexinfer batch -np B` with B
    prompts, the peer through the batched llama.cpp peer; one table column (and plot line) per
    mode and B; the bound grows with B while reads dominate."""
    runner = FakeRunner()
    opts = options(model, tmp_path / "out", modes=("flexinfer", "llama.cpp-mmap"),
                   budgets=(2 * GB,), parallel=(1, 4))
    results = run_sweep(opts, deps(runner))
    rows = {r["mode"]: r for r in results["rows"]}
    assert set(rows) == {"flexinfer", "flexinfer x4", "llama.cpp-mmap", "llama.cpp-mmap x4"}
    assert rows["flexinfer x4"]["parallel"] == 4
    assert rows["flexinfer x4"]["bound_tokens_per_s"] == pytest.approx(4 * 1.0)
    batch = [a for a, limit, _ in runner.calls if limit and "batch" in a and "-np" in a]
    argv = next(a for a in batch if a[a.index("-np") + 1] == "4")
    prompts = argv[argv.index("batch") + 2]
    lines = [json.loads(x) for x in open(prompts).read().splitlines()]
    assert len(lines) == 4 and all(x["max_tokens"] == 4 for x in lines)
    peer = [a for a, limit, _ in runner.calls if "flexinfer.bench.peer_batched" in a]
    assert sorted(a[a.index("--parallel") + 1] for a in peer) == ["1", "4"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| flexinfer | llama.cpp-mmap | flexinfer x4 | llama.cpp-mmap x4 |" in md


def test_parallel_batch_point_for_real(tiny_llama_path, tmp_path):
    """A B = 2 point in a real `flexinfer batch` subprocess: an aggregate decode rate comes back."""
    opts = BenchOptions(str(tiny_llama_path), (512 << 20,), ("flexinfer",), str(tmp_path),
                        tokens=4, disk_bw=1e9, t_cpu=0.001, timeout_s=300, parallel=(2,))
    quiet = Deps(drop_caches=lambda: True, log=lambda s: None, progress_stream=io.StringIO())
    row = run_sweep(opts, quiet)["rows"][0]
    assert row["status"] == "ok", row["status"]
    assert row["mode"] == "flexinfer x2" and row["decode_tokens_per_s"] > 0


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp not installed")
def test_llamacpp_peer_for_real(tiny_llama_path, tmp_path):
    """The peer in a real subprocess (and cgroup where one can be made) on a tiny model."""
    modes = ("llama.cpp-mmap", "llama.cpp-repack")
    opts = BenchOptions(str(tiny_llama_path), (512 << 20,), modes, str(tmp_path), tokens=4,
                        disk_bw=1e9, t_cpu=0.001, timeout_s=120)
    # no cache drop: other work on this machine keeps its page cache
    quiet = Deps(drop_caches=lambda: True, log=lambda s: None, progress_stream=io.StringIO())
    results = run_sweep(opts, quiet)
    for row in results["rows"]:
        assert row["status"] == "ok", row["status"]
        assert row["decode_tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0


MMAP_CHILD = """
import mmap, sys
from flexinfer.stats import process_read_bytes
f = open(sys.argv[1], 'rb')
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
before = process_read_bytes()
total = sum(m[i] for i in range(0, len(m), 4096))  # one byte a page: every page faulted in
print(process_read_bytes() - before)
"""


def test_mmap_reads_are_counted(tmp_path):
    """Page faults of a mapping read from disk show in /proc/self/io, which mmap rows report."""
    from flexinfer.cgroup import drop_page_cache, run_limited
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(16 << 20))
    if not drop_page_cache():
        pytest.skip("cannot drop the page cache (not root): the pages would be cached")
    run = run_limited([sys.executable, "-c", MMAP_CHILD, str(path)], None, timeout=60)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) >= 15 << 20


def test_mmap_stats_report_process_reads(tmp_path):
    from flexinfer.stats import RunTimes, Stats, process_read_bytes
    io = tmp_path / "io"
    io.write_text("rchar: 10\nwchar: 0\nread_bytes: 123456\nwrite_bytes: 0\n")
    assert process_read_bytes(str(io)) == 123456 and process_read_bytes(str(tmp_path / "x")) == 0
    times = RunTimes(decode_tokens=4, decode_s=2.0, bytes_read=0, disk_read=4 * 10**9)
    mmap_row = times.as_dict(Stats(offload_mode="mmap"))
    assert mmap_row["bytes_read_per_token"] == 10**9 and mmap_row["io_gbps"] == 2.0
    times.bytes_read, times.io_busy_s = 8 * 10**8, 1.0
    direct_row = times.as_dict(Stats(offload_mode="flexinfer"))  # the reader's own count
    assert direct_row["bytes_read_per_token"] == 2 * 10**8 and direct_row["io_gbps"] == 0.8
    assert direct_row["disk_read_bytes_per_token"] == 10**9
