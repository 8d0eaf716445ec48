"""The only module that starts threads: it fills a ring of bytes with layers, ahead of compute,
and runs a reader's several reads at once (ReadPool).

Two threads, so reading and converting overlap:
- the reader reads each job (a streamed tensor piece) straight into the ring, in layer order;
- the converter finishes it there (ggml repacks it in place, weights.py) while the next one is read.
Layers come in the endless sequence order[0], order[1], ..., order[n-1], order[0], ... (decoding
wraps from the last layer to the first of the next token). Each job takes the ring bytes right
after the previous job's, and only once they are free: every byte of a layer stays in use from its
read until the consumer releases the layer. So nothing in use is overwritten, reads keep their
order, and the reader stays at most `window` layers ahead. A ring of one layer's bytes plus one
piece lets the reader read a piece of the next layer while the consumer computes the current one,
for far less memory than a second layer-sized slot (weights.py sizes it, planner.py plans it).
With `wraps` (the ring is mapped twice, back to back) a job may run past the end; without, a job
that would cross the end starts over at 0.

The consumer calls acquire(layer) before computing a layer and release(layer) right after; either
out of order is a bug (RuntimeError). Any error in a thread is kept and raised by the next acquire:
a FlexInferError as it is, anything else as a StreamError naming the thread, with the original as
its cause. close() stops and joins both threads. With threaded=False (the `sync` ablation) acquire
loads the layer itself: no overlap at all, errors reported the same way.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from flexinfer.errors import FlexInferError, StreamError

POLL_S = 0.05  # the consumer wakes this often while waiting, so Ctrl-C is seen within a second


class Prefetcher:
    """jobs(layer) -> [(job, ring bytes it takes)]; read(job, offset) reads a job into the ring at
    `offset` and returns where its bytes start; upload(job, src) finishes it there."""

    def __init__(self, order: list[int], window: int, ring: int,
                 jobs: Callable[[int], list[tuple[Any, int]]], read: Callable[[Any, int], int],
                 upload: Callable[[Any, int], None], threaded: bool = True, wraps: bool = True):
        assert window > 0, "the reader must be allowed the layer the consumer waits for"
        self.threaded, self._most, self._ring, self._wraps = threaded, window, ring, wraps
        self._set_order(order)
        self._jobs, self._read, self._upload = jobs, read, upload
        self._cv = threading.Condition()
        self.stall_s = 0.0  # consumer time spent waiting for I/O
        self.io_busy_s = 0.0  # reader time spent reading
        self.layers_loaded = 0  # layer loads completed (a layer counts again on every token)
        self.convert_busy_s = 0.0  # converter time spent repacking in the ring
        self.started_over = 0  # jobs placed at 0 because they would have crossed the ring's end
        self._threads: list[threading.Thread] = []
        self._reset_state()
        self._start()

    def _set_order(self, order: list[int]) -> None:
        """Layers to stream, in compute order; never more than one pass ahead (an empty order:
        nothing streams yet, see restart)."""
        self.order, self.window = list(order), min(self._most, len(order))

    def _reset_state(self) -> None:
        self._released = 0  # layers the consumer has released: the next one to acquire
        self._held = False  # the consumer has acquired layer number _released and not released it
        self._done = -1  # the highest sequence number fully loaded
        self._stop = False
        self._error: BaseException | None = None
        self._error_in = ""  # the thread it happened in
        self._queue: deque = deque()
        self._tail = 0  # ring bytes handed out so far: the next job goes at _tail % ring
        self._starts: dict[int, int] = {}  # sequence number -> where its first job went

    def _start(self) -> None:
        if not (self.threaded and self.order):
            return
        self._threads = [threading.Thread(target=self._guard, args=(f,), name=f"flexinfer-{n}",
                                          daemon=True)
                         for n, f in (("reader", self._reader), ("converter", self._converter))]
        for t in self._threads:
            t.start()

    def _guard(self, loop) -> None:
        try:
            loop()
        except BaseException as e:  # noqa: BLE001 - every thread error must reach the caller
            with self._cv:
                if self._error is None:
                    self._error, self._error_in = e, threading.current_thread().name
                self._cv.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> bool:
        """Wait (holding the lock) until ready() or stop; False when stopped or failed."""
        while not ready():
            if self._stop or self._error:
                return False
            self._cv.wait(POLL_S)
        return not (self._stop or self._error)

    def _place(self, nbytes: int) -> int | None:
        """Where the next job goes (in bytes handed out, the offset being that % ring), or None
        while the ring has no room for it yet. Called with the lock held."""
        if nbytes > self._ring:
            raise RuntimeError(f"a {nbytes} byte job cannot fit a {self._ring} byte ring")
        pos = self._tail
        if not self._wraps and pos % self._ring + nbytes > self._ring:
            pos += self._ring - pos % self._ring  # it would cross the end: start over at 0
        head = self._starts.get(self._released, self._tail)  # the oldest byte still in use
        return pos if pos + nbytes - head <= self._ring else None

    def _reader(self) -> None:
        seq = 0
        while True:
            layer = self.order[seq % len(self.order)]
            with self._cv:
                if not self._wait(lambda: seq < self._released + self.window):
                    return
                self._starts[seq] = self._tail
            jobs = self._jobs(layer)
            if not jobs:  # nothing to read: still mark it loaded, in order, through the converter
                with self._cv:
                    self._queue.append((seq, None, None, True))
                    self._cv.notify_all()
            for i, (job, nbytes) in enumerate(jobs):
                with self._cv:
                    if not self._wait(lambda: self._place(nbytes) is not None):
                        return
                    pos = self._place(nbytes)
                    self.started_over += pos != self._tail
                    self._tail = pos + nbytes
                t0 = time.perf_counter()
                src = self._read(job, pos % self._ring)
                self.io_busy_s += time.perf_counter() - t0
                with self._cv:
                    self._queue.append((seq, job, src, i == len(jobs) - 1))
                    self._cv.notify_all()
            seq += 1

    def _converter(self) -> None:
        while True:
            with self._cv:
                if not self._wait(lambda: bool(self._queue)):
                    return
                seq, job, src, last = self._queue.popleft()
            if job is not None:
                t0 = time.perf_counter()
                self._upload(job, src)
                self.convert_busy_s += time.perf_counter() - t0
            with self._cv:
                if last:
                    self._done = seq
                    self.layers_loaded += 1
                self._cv.notify_all()

    def acquire(self, layer: int) -> None:
        seq = self._released
        expect = self.order[seq % len(self.order)]
        if layer != expect:
            raise RuntimeError(f"prefetch order broken: layer {layer} asked, {expect} due")
        if not self.threaded:
            try:
                self._load_inline(layer)
            except FlexInferError:
                raise
            except Exception as e:  # as the threads report it: one error type reaches the user
                raise StreamError(f"weight streaming failed (layer {layer}): "
                                  f"{type(e).__name__}: {e}") from e
            self._held = True
            return
        t0 = time.perf_counter()
        with self._cv:
            ok = self._wait(lambda: self._done >= seq)
            error = self._error
        self.stall_s += time.perf_counter() - t0
        if ok:
            self._held = True
            return
        if isinstance(error, FlexInferError):
            raise error
        if error is None:
            raise StreamError(f"weight streaming was closed (layer {layer} asked)")
        raise StreamError(f"weight streaming failed in {self._error_in} (layer {layer} awaited): "
                          f"{type(error).__name__}: {error}") from error

    def _load_inline(self, layer: int) -> None:
        t0 = time.perf_counter()
        self._tail = 0  # everything before was released: the whole ring is free
        self._starts = {self._released: 0}
        for job, nbytes in self._jobs(layer):
            pos = self._place(nbytes)
            if pos is None:
                raise RuntimeError(f"layer {layer} does not fit the {self._ring} byte ring")
            self._tail = pos + nbytes
            t1 = time.perf_counter()
            src = self._read(job, pos % self._ring)
            self.io_busy_s += time.perf_counter() - t1
            self._upload(job, src)
        self.layers_loaded += 1
        self.stall_s += time.perf_counter() - t0

    def release(self, layer: int) -> None:
        if not self._held or layer != self.order[self._released % len(self.order)]:
            raise RuntimeError(f"prefetch order broken: layer {layer} released, not acquired")
        self._held = False
        with self._cv:
            self._starts.pop(self._released, None)  # its bytes are free
            self._released += 1
            self._cv.notify_all()

    def reset(self) -> None:
        """Restart from the first layer (after a forward pass was abandoned half way)."""
        self.restart(self.order)

    def restart(self, order: list[int], ring: int | None = None, window: int | None = None,
                threaded: bool | None = None, wraps: bool | None = None) -> None:
        """Stream another set of layers from the next forward pass on, optionally into a ring of
        another size, with another window or schedule (residency.py moves blocks between resident
        and streamed). The counters go on."""
        self.close()
        if ring is not None:
            self._ring = ring
        if window is not None:
            assert window > 0, "the reader must be allowed the layer the consumer waits for"
            self._most = window
        if threaded is not None:
            self.threaded = threaded
        if wraps is not None:
            self._wraps = wraps
        self._set_order(order)
        self._reset_state()
        self._start()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []

    @property
    def alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)


class ReadPool:
    """`depth` calls in flight at once (direct_io.py: several preadv of one span, which a disk
    with a queue serves faster than one at a time). map() returns the results in order and raises
    the first call's error in the caller, once every call has ended (a read still running would
    write into a buffer the caller frees or reuses after the error); the threads start on first
    use, close() joins them."""

    def __init__(self, depth: int):
        self.depth = depth
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def map(self, fn: Callable[[Any], Any], items: list) -> list:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="flexinfer-read")
            pool = self._pool
        futures = [pool.submit(fn, x) for x in items]
        for f in futures:  # all end before anything is returned or raised
            f.exception()
        return [f.result() for f in futures]

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


class Workers:
    """Work shared by n + 1 pool threads while the caller goes on (the expert store's loads of a
    step's missing experts, experts.py): start(fn) calls fn(0)..fn(n) there at once, each pulling
    work from a queue of the caller's, so one reads while another converts, and returns join().
    join returns once every call has ended (none may still write into a buffer the caller reuses)
    and raises the first error: a FlexInferError as it is, anything else as a StreamError."""

    def __init__(self, name: str, n: int):
        self._name, self.n = name, n
        self._pool: ThreadPoolExecutor | None = None

    def start(self, fn: Callable[[int], Any]) -> Callable[[], None]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.n + 1,
                                            thread_name_prefix=f"flexinfer-{self._name}")
        futures = [self._pool.submit(fn, i) for i in range(self.n + 1)]

        def join() -> None:
            for f in futures:
                f.exception()
            for f in futures:
                _result(self._name, f)
        return join

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _result(name: str, f) -> Any:
    """A finished job's result; its error a FlexInferError as it is, anything else as a
    StreamError naming the job's threads."""
    try:
        return f.result()
    except FlexInferError:
        raise
    except Exception as e:
        raise StreamError(f"{name} failed: {type(e).__name__}: {e}") from e


class Background:
    """Jobs on one worker thread, run in the order given (the expert store's read-ahead of the next
    layer's likely experts, experts.py): submit(fn) queues fn() there without waiting for the
    jobs before it; wait() blocks until all are done and raises the first error, a
    FlexInferError as it is, anything else as a StreamError; errors() does the same for the jobs
    already done, without blocking. A job that is told to stop early polls a flag of its own."""

    def __init__(self, name: str):
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list = []

    def submit(self, fn: Callable[[], Any]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"flexinfer-{self._name}")
        self.errors()
        self._futures.append(self._pool.submit(fn))

    def errors(self) -> None:
        """Raise the error of a finished job, if one failed (the finished ones are forgotten)."""
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for f in done:
            _result(self._name, f)

    def wait(self) -> Any:
        futures, self._futures = self._futures, []
        out = None
        try:
            for f in futures:
                out = _result(self._name, f)
        finally:
            for f in futures:  # every job ends before the error is raised
                f.exception()
        return out

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
