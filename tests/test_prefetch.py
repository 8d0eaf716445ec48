"""Prefetcher with fake I/O: no ggml, no file. A small weight store stands in for weights.py.

read(job, slot) writes a job's raw bytes (here a tag: layer, part, how many times it was read) into
its slot and returns their "address"; upload(job, slot, src) converts them there and points the
part's header at them, as weights.py does. Writing a slot the consumer computes from, by either, is
a violation. The consumer checks, between acquire
and release, that every part of its layer is in a slot, is this pass's copy, and stays unchanged
while it computes.
"""

from __future__ import annotations

import _thread
import errno
import signal
import threading
import time

import pytest

from flexinfer.errors import FlexInferError, StreamError
from flexinfer.prefetch import Prefetcher


def flexinfer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("flexinfer-")}


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    """Every test's prefetchers; closed after WATCHDOG_S so that a broken prefetcher fails a test
    (acquire raises "closed") instead of hanging the run; no flexinfer-* thread outlives a test."""
    before = flexinfer_threads()
    made: list[Prefetcher] = []
    watchdog = threading.Timer(WATCHDOG_S, lambda: [p.close() for p in list(made)])
    watchdog.start()
    yield made
    watchdog.cancel()
    for p in made:  # a failed test must not leak threads into the next one
        p.close()
    assert not flexinfer_threads() - before


WATCHDOG_S = 10.0


class Store:
    """A miniature weight store: `parts` jobs per layer, of 1 and 2 cells in turn, read into a
    ring of `ring` cells (default: `window` layers' worth), mapped twice (`wraps`) or not."""

    def __init__(self, order, parts=2, window=2, read_s=0.0, upload_s=0.0, fail=None,
                 threaded=True, made=None, gate=None, empty=(), upload_error=None, ring=None,
                 wraps=True):
        self.order, self.parts, self.window, self.wraps = order, parts, window, wraps
        self.read_s, self.upload_s, self.fail = read_s, upload_s, fail  # fail: (k, exception)
        self.gate, self.empty, self.upload_error = gate, empty, upload_error
        self.size = {i: 1 + i % 2 for i in range(parts)}  # cells each part takes
        self.ring = ring or window * sum(self.size.values())
        self.cells: list = [None] * self.ring  # ("raw", tag) once read, tag once converted
        self.owner = [-1] * self.ring  # the visit (sequence number) whose job wrote each cell
        self.header: dict = {}  # job -> its first cell
        self.seq_of: dict = {}  # job -> the visit it was last read for
        self.next_seq = 0
        self.times_read: dict = {}
        self.reads: list = []  # jobs in read order
        self.read_threads: set = set()
        self.lock = threading.Lock()
        self.released = 0  # layers the consumer has released (counted before release())
        self.violations: list[str] = []
        self.layer_reads = 0  # layer visits the reader started
        self.p = Prefetcher(order, window, self.ring * CELL, self.jobs, self.read, self.upload,
                            threaded, wraps)
        if made is not None:
            made.append(self.p)

    def jobs(self, layer):
        return [] if layer in self.empty else [((layer, i), self.size[i] * CELL)
                                               for i in range(self.parts)]

    def _cells(self, first: int, job) -> list[int]:
        return [(first + j) % self.ring for j in range(self.size[job[1]])]

    def forget(self) -> None:
        """After reset(): the prefetcher counts visits from 0 again."""
        with self.lock:
            self.released, self.next_seq, self.owner = 0, 0, [-1] * self.ring
            self.layer_reads = 0

    def read(self, job, offset):
        if self.gate is not None:
            self.gate.wait(5.0)  # a read stuck on a slow disk, until the test lets it go
        first = offset // CELL
        with self.lock:
            if self.fail and len(self.reads) == self.fail[0]:
                raise self.fail[1]
            if job[1] == 0:
                if self.layer_reads >= self.released + self.window:
                    self.violations.append(f"read visit {self.layer_reads} with "
                                           f"{self.released} released, window {self.window}")
                self.layer_reads += 1
                while self.order[self.next_seq % len(self.order)] != job[0]:
                    self.next_seq += 1
                self.next_seq += 1
            self.seq_of[job] = seq = self.next_seq - 1
            if offset % CELL or not self.wraps and first + self.size[job[1]] > self.ring:
                self.violations.append(f"{job} placed at {offset}, across the end of the ring")
            self.reads.append(job)
            self.read_threads.add(threading.get_ident())
            self.times_read[job] = self.times_read.get(job, 0) + 1
            tag = (*job, self.times_read[job])
        time.sleep(self.read_s)
        with self.lock:
            for c in self._cells(first, job):
                if self.released <= self.owner[c] != seq:
                    self.violations.append(f"cell {c} of visit {self.owner[c]} overwritten by "
                                           f"{job} (visit {seq}) with {self.released} released")
                self.cells[c], self.owner[c] = ("raw", tag), seq
        return first

    def upload(self, job, src):
        if self.upload_error is not None:
            raise self.upload_error
        time.sleep(self.upload_s)
        with self.lock:
            cells = self._cells(src, job)
            raw = {self.cells[c] for c in cells}
            if len(raw) != 1 or next(iter(raw))[0] != "raw" or next(iter(raw))[1][:2] != job:
                self.violations.append(f"{job} converted from {raw}")
            for c in cells:
                self.cells[c] = next(iter(raw))[1]
            self.header[job] = src

    def in_ring(self, layer) -> list:
        """What the headers of `layer`'s parts point at now (call with the lock held)."""
        out = []
        for i in range(self.parts):
            seen = {self.cells[c] for c in self._cells(self.header[(layer, i)], (layer, i))}
            out.append(seen.pop() if len(seen) == 1 else ("torn", seen))
        return out

    def consume(self, layers: int, compute_s: float = 0.0, first: int = 0,
                count_visits: bool = True) -> None:
        """Acquire, check, compute, check again, release: `layers` layers from visit `first`.
        The parts must be the latest read and (count_visits) the read of this pass over the layers,
        not a copy left from the previous token."""
        for k in range(first, first + layers):
            layer, visit = self.order[k % len(self.order)], k // len(self.order) + 1
            self.p.acquire(layer)
            with self.lock:
                seen = self.in_ring(layer)
                latest = [(layer, i, self.times_read[(layer, i)]) for i in range(self.parts)]
            assert seen == latest, (k, seen, latest)
            if count_visits:
                assert seen == [(layer, i, visit) for i in range(self.parts)], (k, seen)
            time.sleep(compute_s)
            with self.lock:
                again = self.in_ring(layer)
                self.released += 1
            assert again == seen, f"layer {layer} changed under the consumer: {seen} -> {again}"
            self.p.release(layer)


CELL = 4096  # bytes in a cell of the fake ring


ORDER = [0, 1, 2, 3, 4]


def wait_for(cond, timeout=2.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


# ---- order, ring, window
@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_reads_follow_layer_order_and_wrap_across_tokens(no_thread_left_behind, window):
    s = Store(ORDER, window=window, made=no_thread_left_behind)
    s.consume(4 * len(ORDER))
    s.p.close()
    expected = [(layer, i) for _ in range(5) for layer in ORDER for i in range(2)]
    n = len(s.reads)
    assert s.reads == expected[:n] and n >= 4 * len(ORDER) * 2
    assert n <= (4 * len(ORDER) + window) * 2  # at most `window` layers read past the end
    assert not s.violations
    assert s.read_threads and threading.get_ident() not in s.read_threads


@pytest.mark.parametrize("window", [1, 2, 3, 4])
@pytest.mark.parametrize("ring", [None, 4, 5, 7], ids=["layers", "layer", "layer+1", "layer+3"])
@pytest.mark.parametrize("wraps", [True, False])
def test_no_ring_byte_rewritten_while_in_use(no_thread_left_behind, window, ring, wraps):
    """A slow consumer and a fast reader: the reader is always waiting for ring bytes. A layer is
    3 parts of 1, 2 and 1 cells here, so the ring holds one layer and 0-3 cells of the next, or
    `window` layers."""
    s = Store(ORDER, parts=3, window=window, ring=ring, wraps=wraps, made=no_thread_left_behind)
    s.consume(3 * len(ORDER), compute_s=0.003)
    assert not s.violations, s.violations[:3]


def test_the_reader_reads_ahead_into_what_the_ring_has_left(no_thread_left_behind):
    """A ring of one layer (4 cells) and 3 more: while the consumer holds layer 0, the reader reads
    the first part of layer 1 (1 cell) and the second (2 cells), and no further: the third would
    overwrite layer 0."""
    s = Store(ORDER, parts=3, window=2, ring=7, made=no_thread_left_behind)
    s.p.acquire(0)
    assert wait_for(lambda: len(s.reads) == 5)
    time.sleep(0.15)  # three poll periods: nothing more may be read
    assert s.reads == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    s.released += 1
    s.p.release(0)  # 4 cells free: the rest of layer 1 (1 cell), layer 2's first two parts (3)
    assert wait_for(lambda: len(s.reads) == 8)
    time.sleep(0.15)
    assert s.reads[5:] == [(1, 2), (2, 0), (2, 1)] and not s.violations


def test_no_ring_byte_rewritten_with_a_slow_reader_and_slow_converter(no_thread_left_behind):
    s = Store([2, 5, 7], parts=2, window=2, read_s=0.002, upload_s=0.002,
              made=no_thread_left_behind)
    s.consume(12, compute_s=0.001)
    assert not s.violations, s.violations[:3]
    assert s.p.io_busy_s > 0.002 * 20 and s.p.stall_s > 0


@pytest.mark.parametrize("window", [1, 2, 4])
def test_reader_stops_window_layers_ahead_of_a_stalled_consumer(no_thread_left_behind, window):
    s = Store(ORDER, window=window, made=no_thread_left_behind)
    assert wait_for(lambda: len(s.reads) == window * 2)
    time.sleep(0.15)  # three poll periods: nothing more may be read
    assert s.reads == [(layer, i) for layer in ORDER[:window] for i in range(2)]
    s.consume(1)  # one layer released: exactly one more layer read
    assert wait_for(lambda: len(s.reads) == (window + 1) * 2)
    time.sleep(0.1)
    assert len(s.reads) == (window + 1) * 2 and not s.violations


def test_a_layer_with_nothing_to_read_does_not_stall(no_thread_left_behind):
    s = Store(ORDER, empty=(2,), made=no_thread_left_behind)
    for _ in range(2):
        for layer in ORDER:
            s.p.acquire(layer)
            s.p.release(layer)
    assert (2, 0) not in s.reads


# ---- errors reach the caller
def failing(exc, k, parts=2):
    return dict(parts=parts, fail=(k, exc))


@pytest.mark.parametrize("k", [0, 3, 7])
def test_an_os_error_in_the_reader_reaches_acquire(no_thread_left_behind, k):
    err = OSError(errno.EIO, "Input/output error")
    s = Store(ORDER, **failing(err, k), made=no_thread_left_behind)
    with pytest.raises(StreamError) as e:
        s.consume(3 * len(ORDER))
    assert "Input/output error" in str(e.value) and "flexinfer-reader" in str(e.value)
    assert e.value.__cause__ is err and isinstance(e.value, FlexInferError)
    assert wait_for(lambda: s.p.alive == 0, 1.0)  # both threads end on their own
    with pytest.raises(StreamError):  # and the error stays until reset()
        s.p.acquire(s.order[s.p._released % len(s.order)])
    s.p.close()
    assert s.p.alive == 0


@pytest.mark.parametrize("err", [StreamError("m.gguf: short read at offset 4096 (truncated?)"),
                                 FlexInferError("m.gguf: changed while in use")])
def test_a_flexinfer_error_in_the_reader_is_raised_as_is(no_thread_left_behind, err):
    s = Store(ORDER, **failing(err, 4), made=no_thread_left_behind)
    with pytest.raises(FlexInferError) as e:
        s.consume(len(ORDER))
    assert e.value is err
    s.p.close()


def test_an_error_in_the_converter_reaches_acquire(no_thread_left_behind):
    s = Store(ORDER, upload_error=ValueError("ggml refused the tensor"),
              made=no_thread_left_behind)
    with pytest.raises(StreamError, match="flexinfer-converter.*ggml refused the tensor"):
        s.p.acquire(0)
    s.p.close()


def test_a_slow_read_that_fails_wakes_a_waiting_consumer(no_thread_left_behind):
    s = Store(ORDER, read_s=0.05, **failing(OSError(errno.EIO, "EIO"), 1),
              made=no_thread_left_behind)
    t0 = time.monotonic()
    with pytest.raises(StreamError):
        s.consume(3)
    assert time.monotonic() - t0 < 1.0
    s.p.close()


# ---- close, reset, guards
def test_close_is_prompt_while_reader_waits_for_a_slot_and_converter_for_work(
        no_thread_left_behind):
    s = Store(ORDER, window=2, made=no_thread_left_behind)
    assert wait_for(lambda: len(s.reads) == 4)  # two layers read, nobody consumes
    time.sleep(0.02)
    t0 = time.monotonic()
    s.p.close()
    assert time.monotonic() - t0 < 1.0 and s.p.alive == 0
    s.p.close()  # twice is fine
    with pytest.raises(StreamError, match="closed"):
        s.p.acquire(0)


def test_close_is_prompt_while_the_converter_lags(no_thread_left_behind):
    """A slow converter: the reader has read parts that wait to be converted."""
    s = Store(ORDER, parts=4, window=3, upload_s=0.05, made=no_thread_left_behind)
    assert wait_for(lambda: len(s.reads) >= 2)
    t0 = time.monotonic()
    s.p.close()
    assert time.monotonic() - t0 < 1.0 and s.p.alive == 0


def test_reset_restarts_from_the_first_layer(no_thread_left_behind):
    s = Store(ORDER, window=3, made=no_thread_left_behind)
    s.consume(7)  # a token and a half, then abandoned mid-layer
    s.p.acquire(ORDER[2])
    s.p.close()  # (so that the fake can start counting visits again in step: reset restarts)
    n = len(s.reads)
    s.forget()
    s.p.reset()
    with pytest.raises(RuntimeError):
        s.p.acquire(ORDER[3])
    s.consume(len(ORDER) + 2, count_visits=False)  # some parts were read before the reset
    assert s.reads[n:n + 4] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not s.violations, s.violations[:3]
    s.p.close()


def test_reset_is_prompt_while_the_reader_waits(no_thread_left_behind):
    s = Store(ORDER, window=2, made=no_thread_left_behind)
    assert wait_for(lambda: len(s.reads) == 4)
    t0 = time.monotonic()
    s.p.reset()
    assert time.monotonic() - t0 < 1.0 and s.p.alive == 2
    s.p.close()


def test_acquire_of_the_wrong_layer_is_a_bug(no_thread_left_behind):
    s = Store(ORDER, made=no_thread_left_behind)
    with pytest.raises(RuntimeError, match="layer 1 asked, 0 due"):
        s.p.acquire(1)
    s.consume(len(ORDER) + 1)  # nothing was disturbed
    with pytest.raises(RuntimeError, match="layer 2 asked, 1 due"):
        s.p.acquire(2)
    s.p.close()


def test_release_without_acquire_is_a_bug(no_thread_left_behind):
    s = Store(ORDER, made=no_thread_left_behind)
    with pytest.raises(RuntimeError):
        s.p.release(0)  # would let the reader overwrite a slot the consumer never had
    s.p.acquire(0)
    with pytest.raises(RuntimeError):
        s.p.release(1)
    s.p.release(0)
    with pytest.raises(RuntimeError):
        s.p.release(0)
    s.consume(len(ORDER) - 1, first=1)
    s.p.close()


# ---- sync mode
def test_sync_mode_loads_inline_and_starts_no_thread(no_thread_left_behind):
    before = set(threading.enumerate())
    s = Store(ORDER, window=1, read_s=0.001, threaded=False,
              made=no_thread_left_behind)
    assert set(threading.enumerate()) <= before and s.p.alive == 0
    s.consume(2 * len(ORDER))
    assert s.read_threads == {threading.get_ident()}
    assert s.reads == [(layer, i) for _ in range(2) for layer in ORDER for i in range(2)]
    # every layer is read from the start of the ring: part 0 at cell 0, part 1 (1 cell) after it
    assert set(s.header.values()) == {0, 1} and s.p.stall_s >= s.p.io_busy_s >= 0.001 * 20
    s.p.reset()
    assert set(threading.enumerate()) <= before
    s.p.close()


def test_sync_mode_errors_reach_the_caller_as_in_threaded_mode(no_thread_left_behind):
    err = OSError(errno.EIO, "Input/output error")
    s = Store(ORDER, window=1, threaded=False, **failing(err, 3),
              made=no_thread_left_behind)
    with pytest.raises(StreamError, match="layer 1.*Input/output error") as e:
        s.consume(len(ORDER))
    assert e.value.__cause__ is err
    s.p.reset()
    s.fail, s.times_read = None, {}
    s.consume(len(ORDER))


# ---- Ctrl-C
def test_ctrl_c_while_waiting_in_acquire(no_thread_left_behind):
    """interrupt_main sets the flag a SIGINT sets; the consumer polls, so it is seen at once."""
    gate = threading.Event()
    before = flexinfer_threads()
    s = Store(ORDER, gate=gate, made=no_thread_left_behind)
    # interrupt_main raises KeyboardInterrupt only under Python's own SIGINT handler, which a
    # runner that inherited an ignored SIGINT (started in the background) never installed
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, _thread.interrupt_main)
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            s.p.acquire(0)
        waited = time.monotonic() - t0
    finally:
        timer.cancel()
        gate.set()
        signal.signal(signal.SIGINT, old)
    assert waited < 1.2
    t0 = time.monotonic()
    s.p.close()
    assert time.monotonic() - t0 < 1.0 and s.p.alive == 0
    assert flexinfer_threads() <= before


# ---- several reads in flight (ReadPool, direct_io.READ_DEPTH)
def test_read_pool_runs_calls_at_once_in_order_and_joins(no_thread_left_behind):
    from flexinfer.prefetch import ReadPool
    pool = ReadPool(2)
    both = threading.Barrier(2, timeout=5)  # only passes if two calls are in flight together
    assert pool.map(lambda x: (both.wait(), x * 10)[1], [1, 2, 3, 4]) == [10, 20, 30, 40]
    with pytest.raises(ZeroDivisionError):  # the first error reaches the caller
        pool.map(lambda x: 1 / x, [1, 0, 2])
    ended = []  # ...once the other calls ended: a read in flight must not outlive the map

    def slow(x):
        if x == 0:
            raise OSError("disk gone")
        time.sleep(0.3)
        ended.append(x)
    with pytest.raises(OSError, match="disk gone"):
        pool.map(slow, [0, 1])
    assert ended == [1]
    pool.close()
    assert not any(t.name.startswith("flexinfer-read") and t.is_alive()
                   for t in threading.enumerate())


def test_workers_share_the_work_and_join(no_thread_left_behind):
    """Workers.start: fn(0) and fn(1) on the pool's threads, at once, while the caller goes on;
    join() raises a call's error (as a StreamError, a FlexInferError as it is) only once every
    call ended."""
    from flexinfer.prefetch import Workers
    w = Workers("loads", 1)
    both = threading.Barrier(3, timeout=5)  # only passes if both calls run with the caller
    seen = {}

    def fn(i):
        both.wait()
        seen[i] = threading.current_thread() is threading.main_thread()
    join = w.start(fn)
    both.wait()  # the caller went on while they ran
    join()
    assert seen == {0: False, 1: False}
    ended = []

    def fails(who, err):  # call `who` raises err; the other ends 0.3 s later
        def fn(i):
            if i == who:
                raise err
            time.sleep(0.3)
            ended.append(i)
        return fn
    with pytest.raises(StreamError, match="loads failed: OSError: disk gone"):
        w.start(fails(1, OSError("disk gone")))()
    assert ended == [0]
    with pytest.raises(StreamError, match="loads failed: ValueError: bad"):
        w.start(fails(0, ValueError("bad")))()
    assert ended == [0, 1]  # the other call ended before the error was raised
    with pytest.raises(FlexInferError, match="as is"):
        w.start(fails(1, FlexInferError("as is")))()
    w.close()
    assert not any(t.name.startswith("flexinfer-loads") and t.is_alive()
                   for t in threading.enumerate())


@pytest.mark.parametrize("offset, nbytes", [(0, 9 << 20), (5000, (12 << 20) + 1234 - 5000), (100, 3000)])
def test_reads_in_flight_give_the_same_bytes(tmp_path, no_thread_left_behind, offset, nbytes):
    """A span of several 4 MiB chunks read two at a time lands exactly as one at a time; a span
    running past the end of the file stops there."""
    import os

    from flexinfer.direct_io import DirectReader, span
    from flexinfer.ggml_ops import Buffer, memview
    data = os.urandom((12 << 20) + 1234)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    got = []
    for depth in (1, 2):
        reader = DirectReader(str(path), len(data), depth=depth)
        buf = Buffer(span(offset, nbytes)[1] + 8192)
        try:
            at = reader.read_span(buf.base, offset, nbytes)
            got.append(bytes(memview(at, nbytes)))
        finally:
            buf.free()
            reader.close()
    assert got[0] == got[1] == data[offset:offset + nbytes]
