"""Calibration: measured once, cached, and safe on files of any size."""

from __future__ import annotations

import json

import pytest

import flexinfer.machine as machine
from flexinfer.gguf_file import read_gguf
from tests.test_moe import small  # noqa: F401 (a fixture)


def test_disk_measure_on_a_file_smaller_than_a_chunk(tmp_path):
    path = tmp_path / "small.bin"
    path.write_bytes(b"x" * 5000)
    assert machine.measure_disk(str(path), 5000) > 0


def test_calibration_is_cached(tiny_llama_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXINFER_HOME", str(tmp_path))
    g = read_gguf(tiny_llama_path)
    first = machine.calibrate(g, repack=True, n_threads=2)
    assert first.disk_bw > 0 and first.compute_bw > 0 and first.repack_bw > 0
    cached = json.loads((tmp_path / "machine.json").read_text())
    assert len(cached) == 2
    calls = []
    monkeypatch.setattr(machine, "measure_disk", lambda *a: calls.append(a) or 1.0)
    assert machine.calibrate(g, repack=True, n_threads=2) == first and not calls


def _resident_t_cpu(path) -> float:
    """The compute seconds per token a plan holding every weight predicts for `path`."""
    import flexinfer.model as fm
    from flexinfer.config import ModelConfig
    from flexinfer.models import specs_for
    g = read_gguf(path)
    cfg = ModelConfig.from_gguf(g)
    planned = fm.make_plan(g, cfg, specs_for(g, cfg), fm.Options(memory_budget="64G"), 64, 2)
    assert planned.plan.policy == "all-resident"
    return planned.plan.t_cpu


def test_a_recorded_t_cpu_is_what_the_next_plan_predicts(tiny_llama_path, small, tmp_path,
                                                          monkeypatch):
    """The bench stores its resident run's T_cpu as compute_bw (record_calibration): a plan of
    the same file made afterwards predicts about that T_cpu, for a dense model and for a mixture
    of experts, whose T_cpu also computes the picked experts (the matrices alone made compute_bw
    several times too low for every later plan on the machine)."""
    monkeypatch.setenv("FLEXINFER_HOME", str(tmp_path))
    for path in (tiny_llama_path, small[0]):
        machine.calibrate(read_gguf(path), repack=True, n_threads=2)
        machine.record_calibration(str(path), 2, None, 0.05)
        assert _resident_t_cpu(path) == pytest.approx(0.05, rel=0.01), path
    # the matrices alone (as it was): the MoE plan predicts more than was measured (9-19% for
    # these small models, whose 32000-row head outweighs their experts; 3.8x for Qwen3-30B-A3B)
    monkeypatch.setattr(machine, "token_bytes", lambda g: sum(
        t.nbytes for t in g.tensors.values() if len(t.shape) == 2 and t.name != "token_embd.weight"))
    monkeypatch.setattr(machine, "compute_seconds", lambda g, t_cpu: t_cpu)
    machine.record_calibration(str(small[0]), 2, None, 0.05)
    assert _resident_t_cpu(small[0]) > 0.05 * 1.05


def test_a_benchmark_calibrates_compute_on_its_median_round(tiny_llama_path, tmp_path,
                                                            monkeypatch):
    """calibrate_compute keeps the median of its rounds (neither a slow moment nor a fast one),
    and the next plan's machine uses it without measuring again."""
    monkeypatch.setenv("FLEXINFER_HOME", str(tmp_path))
    g = read_gguf(tiny_llama_path)
    rounds, pauses = iter([(10e9, 1e9), (30e9, 2e9), (20e9, 3e9), (5e9, 4e9), (40e9, 5e9)]), []
    monkeypatch.setattr(machine, "measure_compute", lambda *a: next(rounds))
    monkeypatch.setattr(machine.time, "sleep", pauses.append)
    assert machine.calibrate_compute(g, True, 2, rounds=5, pause=0.5) == 20e9
    assert pauses == [0.5] * 4
    monkeypatch.setattr(machine, "measure_disk", lambda *a: 1e9)
    got = machine.calibrate(g, repack=True, n_threads=2)
    assert (got.compute_bw, got.repack_bw) == (20e9, 3e9)


def test_the_rate_of_expert_misses_is_recorded_for_its_disk_and_cap(tiny_llama_path, tmp_path,
                                                                    monkeypatch):
    """record_calibration's expert_bw reaches the next plan's machine under the same cap only,
    until the disk is measured again; without one, the machine's expert_bw is 0 (the misses read
    at disk_bw)."""
    monkeypatch.setenv("FLEXINFER_HOME", str(tmp_path))
    monkeypatch.setattr(machine, "measure_compute", lambda *a: (30e9, 2e9))
    monkeypatch.setattr(machine, "measure_disk", lambda *a: 1e9)
    g = read_gguf(tiny_llama_path)
    assert machine.calibrate(g, repack=True, n_threads=2).expert_bw == 0
    machine.record_calibration(str(tiny_llama_path), 2, 0.25e9, None, disk_rate=250_000_000,
                               expert_bw=0.6e9)
    monkeypatch.setenv("FLEXINFER_DISK_RATE", "250000000")
    got = machine.calibrate(g, repack=True, n_threads=2)
    assert (got.disk_bw, got.expert_bw) == (0.25e9, 0.6e9)
    monkeypatch.setenv("FLEXINFER_DISK_RATE", "500000000")  # another cap: another disk
    assert machine.calibrate(g, repack=True, n_threads=2).expert_bw == 0
    monkeypatch.setenv("FLEXINFER_DISK_RATE", "250000000")  # measured again: the rate goes too
    assert machine.calibrate(g, repack=True, n_threads=2, refresh=True).expert_bw == 0


def test_the_last_level_cache_is_read_from_sysfs(tmp_path):
    for name, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "260M"),
                       ("index9", "garbage")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    (tmp_path / "uevent").write_text("")  # not a cache: ignored
    assert machine.cache_bytes(str(tmp_path)) == 260 << 20
    assert machine.cache_bytes(str(tmp_path / "missing")) is None


def test_a_model_larger_than_the_cache_is_timed_from_memory(tiny_llama_path, tmp_path,
                                                            monkeypatch):
    """A model whose token multiplies more bytes than the last-level cache holds is calibrated on
    a matrix at least the cache's size (a 9 MB one is multiplied from the cache: 28 GB/s against
    15 from memory on this kind of machine, and a 7B's plan predicted 8.3 tok/s where it ran
    3.5), under a key of its own; one that fits keeps the CAL_DIM matrix. A calibration matrix
    that would not fit the process's room is not measured: the plan takes the small one's rate,
    uncached, and a later run with room measures it."""
    monkeypatch.setenv("FLEXINFER_HOME", str(tmp_path))
    monkeypatch.setattr(machine, "measure_disk", lambda *a: 1e9)
    calls = []
    monkeypatch.setattr(machine, "measure_compute",
                        lambda tid, repack, n, rows=machine.CAL_DIM: calls.append(rows) or (
                            (10e9 if rows > machine.CAL_DIM else 30e9), 1e9))
    g = read_gguf(tiny_llama_path)
    size = machine.token_bytes(g)
    rb = machine.row_bytes(machine.main_type(g), machine.CAL_DIM)

    monkeypatch.setattr(machine, "cache_bytes", lambda: int(size * 2))  # fits
    assert machine.calibrate(g, repack=True, n_threads=2).compute_bw == 30e9
    assert calls == [machine.CAL_DIM]

    monkeypatch.setattr(machine, "cache_bytes", lambda: int(size // 4))  # does not
    rows = machine.calibration_rows(g)
    assert rows * rb >= machine.MEMORY_CAL_MIN and rows % 64 == 0
    assert machine.calibrate(g, repack=True, n_threads=2, room=rows * rb).compute_bw == 30e9
    assert calls[-1] == machine.CAL_DIM  # no room for it: the cache's rate, for this plan only
    assert machine.calibrate(g, repack=True, n_threads=2).compute_bw == 10e9
    assert calls[-1] == rows
    keys = sorted(json.loads((tmp_path / "machine.json").read_text()))
    assert [k.endswith("|memory") for k in keys if "|t2|" in k] == [False, True]
    n = len(calls)
    assert machine.calibrate(g, repack=True, n_threads=2, room=0).compute_bw == 10e9  # cached
    assert len(calls) == n

    monkeypatch.setattr(machine, "cache_bytes", lambda: 1 << 40)  # larger than the maximum
    assert machine.calibration_rows(g) * rb <= machine.MEMORY_CAL_MAX + 64 * rb


def test_compute_is_measured_on_a_matrix_of_more_rows():
    """The memory calibration's matrix: real ggml, the repack rate timed on its first CAL_DIM
    rows, both rates positive and finite."""
    q4_0 = 2  # GGUF's type id
    bw, repack_bw = machine.measure_compute(q4_0, True, 2, rows=2 * machine.CAL_DIM)
    assert 0 < bw < 1e13 and 0 < repack_bw < 1e13
