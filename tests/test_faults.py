"""Faults while streaming: a read failing with EIO, a short read, the file truncated or rewritten
under the engine, Ctrl-C. Each ends in one clear error, with the prefetch threads stopped, no hang,
and the text generated so far kept."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import flexinfer.direct_io as dio
import flexinfer.model as fm
from flexinfer.errors import FlexInferError, StreamError
from tests.test_engine import PROMPT, _squeeze_budget


class FaultyReader(dio.DirectReader):
    """Fails the `fail_at`-th aligned read (counting from when the model is ready)."""

    fail_at = 10**9
    kind = "eio"
    armed = False
    reads = 0

    def _pread_full(self, dst, start, length, need):
        if FaultyReader.armed:
            FaultyReader.reads += 1
            if FaultyReader.reads >= FaultyReader.fail_at:
                if FaultyReader.kind == "eio":
                    raise StreamError(f"{self.path}: read failed at offset {start}: "
                                      f"{os.strerror(errno.EIO)}")
                return need - 1  # a short count
        return super()._pread_full(dst, start, length, need)


def _generate_until_error(model, n=40, arm_after=None):
    """Generate, arming the faulty reader after `arm_after` tokens; returns the tokens made and the
    error message."""
    got = []
    with pytest.raises(FlexInferError) as err:
        for piece in model.generate(PROMPT, max_tokens=n, temperature=0):
            got.append(piece.token)
            if arm_after is not None and len(got) == arm_after:
                FaultyReader.armed = True
    return got, str(err.value)


@pytest.mark.parametrize("kind,frag", [("eio", "Input/output error"), ("short", "short read")])
def test_read_fault_during_generation(tiny_llama_path, monkeypatch, kind, frag):
    _squeeze_budget(monkeypatch, 0.3)
    monkeypatch.setattr(fm, "DirectReader", FaultyReader)
    monkeypatch.setattr(FaultyReader, "kind", kind)
    monkeypatch.setattr(FaultyReader, "reads", 0)
    monkeypatch.setattr(FaultyReader, "fail_at", 3)
    model = fm.load(tiny_llama_path, n_ctx=64, n_threads=2)
    try:
        t0 = time.monotonic()
        got, msg = _generate_until_error(model, arm_after=2)
        assert time.monotonic() - t0 < 10
        assert frag in msg and str(tiny_llama_path) in msg
        assert len(got) >= 2, "tokens made before the fault are kept"
    finally:
        FaultyReader.armed = False
        model.close()
    assert model.prefetch_threads_alive == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("flexinfer")]


@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_file_changed_under_the_engine(tiny_llama_path, tmp_path, monkeypatch, how):
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_llama_path, path)
    _squeeze_budget(monkeypatch, 0.3)
    with fm.load(path, n_ctx=64, n_threads=2) as model:
        first = list(model.generate(PROMPT, max_tokens=2, temperature=0))
        assert first
        if how == "truncate":
            os.truncate(path, path.stat().st_size // 2)
        else:
            data = path.read_bytes()
            time.sleep(0.01)
            path.write_bytes(data[:-4096] + bytes(4096))  # same size, other bytes
            os.utime(path, ns=(time.time_ns(), time.time_ns()))
        got, msg = _generate_until_error(model)
        assert str(path) in msg and ("modified" in msg or "short read" in msg)
    assert model.prefetch_threads_alive == 0


def test_file_replaced_by_rename_keeps_working(tiny_llama_path, tmp_path, monkeypatch):
    """Replacing the file atomically (as a download does) leaves our descriptor on the original."""
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_llama_path, path)
    _squeeze_budget(monkeypatch, 0.3)
    with fm.load(path, n_ctx=64, n_threads=2) as model:
        before = [p.token for p in model.generate(PROMPT, max_tokens=6, temperature=0)]
        other = tmp_path / "other.gguf"
        other.write_bytes(b"GGUF" + bytes(100))
        os.replace(other, path)
        after = [p.token for p in model.generate(PROMPT, max_tokens=6, temperature=0)]
    assert before == after


def _default_sigint():
    """The child takes Ctrl-C as a user's shell gives it, whatever the test runner inherited: a
    runner started in the background by a shell without job control ignores SIGINT, and an
    ignored signal stays ignored across exec, so Python would never raise KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_within_a_second_and_keeps_output(tiny_llama_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "flexinfer", "run", str(tiny_llama_path), "-p", "Hello world",
           "-n", "100000", "-c", "4096", "--temp", "0", "--offload", "sync"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        out = b""
        while len(out) < 20 and time.monotonic() < deadline:  # wait for some streamed text
            out += os.read(proc.stdout.fileno(), 1)
        assert len(out) >= 20, "no output before Ctrl-C"
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rest, err = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 1.5
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert b"Traceback" not in err and b"interrupted" in err
    assert len(out + rest) >= 20
