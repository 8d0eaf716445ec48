"""SINGLE-SEQUENCE STAND-IN for the scheduler of CONTRACT.md section 2 (issue 12's server helper).

The lead's continuous-batching scheduler replaces this file at merge: same names, same signatures, same
events. Until then this one serves ONE request at a time: an engine thread pulls requests from a
bounded queue and runs `flexinfer.generate.generate_ids` on the model with the request's sampling
options, applies its stop strings, honours cancel between tokens and counts usage. `cached_tokens` is
always 0 here (no prefix reuse); `running` is 0 or 1; there is no `set_memory_budget` (the server
answers 501 until the live budget lands).

Threads: the engine loop needs a thread of its own so that the HTTP event loop never waits on a
forward pass; it is the single thread that touches the model (threads otherwise live in prefetch.py).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Callable

from flexinfer.errors import FlexInferError
from flexinfer.generate import SamplingOptions, generate_ids
from flexinfer.tokenizer import StreamDecoder


@dataclass
class Request:
    ids: list[int]  # the prompt, tokenized (chat template already rendered)
    sampling: SamplingOptions
    stop: tuple[str, ...] = ()  # stop strings; the text returned excludes them
    id: str = ""  # caller's id, for logs


@dataclass(frozen=True)
class Event:
    kind: str  # "piece" | "done" | "error"
    text: str = ""  # piece: new text (may be "" while UTF-8 is split or a stop string may begin)
    token: int = -1
    finish_reason: str | None = None  # done: "stop" | "length" | "cancelled"
    usage: dict | None = None  # done: prompt_tokens, completion_tokens, cached_tokens, ttft_s, decode_s
    message: str = ""  # error: one line


class QueueFull(FlexInferError):
    """max_queue requests are already waiting."""


class Handle:
    def __init__(self, sched: Scheduler, req: Request, on_event: Callable[[Event], None]):
        self.sched, self.req, self.on_event = sched, req, on_event
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """A running sequence leaves before its next token; a waiting one leaves the queue now."""
        self.cancelled.set()
        self.sched._drop(self)


class StopMatcher:
    """Holds back text that may be the start of a stop string; finds the first stop string.

    feed(text) -> (text safe to emit, stopped). Held-back text is at most max(len(stop)) - 1 chars."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(self.pending) + 1))
                    if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Scheduler:
    def __init__(self, model, n_parallel: int = 4, max_queue: int = 64):
        if max_queue < 1:
            raise FlexInferError(f"--max-queue must be >= 1, got {max_queue}")
        self.model, self.n_parallel, self.max_queue = model, n_parallel, max_queue
        self._queue: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._running = 0
        self._totals = dict(requests=0, prompt_tokens=0, decode_tokens=0, cached_tokens=0,
                            prefill_s=0.0, decode_s=0.0, bytes_read=0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="flexinfer-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for h in waiting:
            h.cancel()
            self._finish(h, "cancelled", 0, 0, None, 0.0)
        if self._thread is not None:
            self._thread.join()

    def submit(self, req: Request, on_event: Callable[[Event], None]) -> Handle:
        h = Handle(self, req, on_event)
        with self._cond:
            if self._closing:
                raise FlexInferError("the scheduler is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue "
                                f"{self.max_queue}); retry later")
            self._queue.append(h)
            self._cond.notify()
        return h

    def _drop(self, h: Handle) -> None:
        with self._cond:
            try:
                self._queue.remove(h)
            except ValueError:
                return  # running, finished or never queued: the engine loop sees the flag
        self._finish(h, "cancelled", 0, 0, None, 0.0)

    def stats(self) -> dict:
        t, st = self._totals, self.model.stats
        with self._cond:
            running, queued = self._running, len(self._queue)
        return dict(running=running, queued=queued, requests=t["requests"],
                    prompt_tokens=t["prompt_tokens"], decode_tokens=t["decode_tokens"],
                    cached_tokens=t["cached_tokens"],
                    decode_tok_s=t["decode_tokens"] / t["decode_s"] if t["decode_s"] else 0.0,
                    prefill_tok_s=t["prompt_tokens"] / t["prefill_s"] if t["prefill_s"] else 0.0,
                    bytes_read_per_token=t["bytes_read"] / max(t["decode_tokens"], 1),
                    resident_bytes=st.resident_bytes, budget_bytes=st.budget_bytes)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                h = self._queue.popleft()
                self._running = 1
            try:
                self._serve(h)
            finally:
                with self._cond:
                    self._running = 0

    def _serve(self, h: Handle) -> None:
        """One request start to end; every path sends exactly one done or error event."""
        from flexinfer.stats import RunTimes
        req, times = h.req, RunTimes()
        if h.cancelled.is_set() or self._closing:
            return self._finish(h, "cancelled", 0, 0, None, 0.0)
        decoder, stops = StreamDecoder(self.model.tokenizer), StopMatcher(req.stop)
        n, ttft, reason = 0, None, None
        gen = generate_ids(self.model, req.ids, req.sampling, times)
        try:
            for tok in gen:
                n += 1
                ttft = ttft if ttft is not None else time.perf_counter() - h.submitted
                text, stopped = stops.feed(decoder.feed(tok))
                h.on_event(Event("piece", text, tok))
                if stopped:
                    reason = "stop"
                    break
                if h.cancelled.is_set() or self._closing:
                    reason = "cancelled"
                    break
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the engine thread
            gen.close()
            self._count(times)
            msg = str(e) if isinstance(e, FlexInferError) else f"{type(e).__name__}: {e}"
            return h.on_event(Event("error", message=msg.splitlines()[0] if msg else "error"))
        gen.close()  # runs generate_ids' finally: the timings and byte counters
        if reason is None:
            tail = stops.feed(decoder.flush())[0] + stops.flush()
            if tail:
                h.on_event(Event("piece", tail))
            full = n >= req.sampling.max_tokens or len(req.ids) + n >= self.model.n_ctx
            reason = "length" if full else "stop"
        self._count(times)
        self._finish(h, reason, len(req.ids), n, ttft, times.decode_s)

    def _count(self, times) -> None:
        t = self._totals
        t["prompt_tokens"] += times.prompt_tokens
        t["decode_tokens"] += times.decode_tokens
        t["prefill_s"] += times.prefill_s
        t["decode_s"] += times.decode_s
        t["bytes_read"] += times.bytes_read

    def _finish(self, h: Handle, reason: str, n_prompt: int, n_out: int, ttft, decode_s) -> None:
        with self._cond:  # also called from the thread that cancels a waiting request
            self._totals["requests"] += 1
        usage = dict(prompt_tokens=n_prompt, completion_tokens=n_out, cached_tokens=0,
                     ttft_s=ttft, decode_s=decode_s)
        h.on_event(Event("done", finish_reason=reason, usage=usage))
