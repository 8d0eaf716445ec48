"""Calibration: measured once, cached, and safe on files of any size."""

from __future__ import annotations

import json

import flexinfer.machine as machine
from flexinfer.gguf_file import read_gguf


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
