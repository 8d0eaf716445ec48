"""The bench harness, driven by a fake runner (no model, no engine): rows, tables, plot, failures
recorded while the sweep goes on, unconstrained runs marked. One real run of the llama.cpp peer on
a tiny model where llama_cpp is installed."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys

import pytest

from flexinfer.bench import cli_bench, sweep
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
    if "flexinfer.bench.peer_llamacpp" in argv:
        return "llama.cpp-repack" if "--repack" in argv else "llama.cpp-mmap"
    return "no-balance" if "--no-balance" in argv else argv[argv.index("--offload") + 1]


class FakeRunner:
    """Resident run: 10 tokens/s. sync @ 1 GB: OOM; prefetch @ 1 GB: crash; mmap @ 2 GB:
    timeout; anything else: budget GB * 0.2 tokens/s (constrained as told)."""

    def __init__(self, constrained: bool = True):
        self.constrained, self.calls = constrained, []

    def __call__(self, argv, limit, *, timeout=None) -> LimitedRun:
        self.calls.append((argv, limit, timeout))
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
    return Deps(run=runner, calibrate=lambda *a: None, drop_caches=lambda: True, cgroup_reason=lambda: reason,
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
    def runner(argv, limit, *, timeout=None):
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
