"""Continuous batching: requests join a running batch when a sequence slot is free and leave at
end-of-generation, max_tokens, a stop string or cancellation, without disturbing the others.

Every step is one weight pass (Model.step) carrying the next token of every decoding sequence plus
chunks of new prompts (chunked prefill), so streamed weights are read once for all of them. Each
request has its own sampler (its own seed: the same seed gives the same text as a run alone, where the
kernels are batch-invariant) and its own stop strings; its pieces go to its callback as they are made.

Prefix reuse: a new request takes the free slot whose cached tokens share the longest prefix with its
prompt, and starts after them (usage["cached_tokens"]); ties go to the slot used least recently.
When every slot is busy, requests wait in order in a bounded queue (QueueFull past max_queue): none is
dropped, and memory never grows past the plan, which counts every slot's cells.

`BatchLoop` is the loop itself, driven step by step by its caller (`flexinfer batch`); `Scheduler`
runs a BatchLoop on an engine thread of its own for callers on other threads (the server). That thread
is the one place besides prefetch.py that starts a thread: the engine must be driven from a single
thread, and a server's request handlers must not be it.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from flexinfer.batch import TokenBatch
from flexinfer.errors import FlexInferError
from flexinfer.generate import SamplingOptions, sampler_for
from flexinfer.tokenizer import StreamDecoder


@dataclass
class Request:
    ids: list[int]  # the prompt, tokenized (a chat template already rendered)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: tuple[str, ...] = ()  # stop strings; the text returned excludes them
    id: str = ""  # the caller's id, for logs


@dataclass(frozen=True)
class Event:
    kind: str  # "piece" | "done" | "error"
    text: str = ""  # piece: new text ("" while a UTF-8 character is split)
    token: int = -1
    finish_reason: str | None = None  # done: "stop" | "length" | "cancelled"
    usage: dict | None = None  # done: prompt_tokens, completion_tokens, cached_tokens, ttft_s,
    # decode_s
    message: str = ""  # error: one line


class QueueFull(FlexInferError):
    pass


class Handle:
    def __init__(self):
        self.cancelled = False

    def cancel(self) -> None:
        """The sequence leaves before the next step; its slot is free again."""
        self.cancelled = True


class _Seq:
    """One request in flight: where it is in its prompt, its sampler and its text so far."""

    def __init__(self, req: Request, on_event, handle: Handle, slot: int, cached: int, model):
        self.req, self.on_event, self.handle, self.slot = req, on_event, handle, slot
        self.cached = self.done_prompt = cached  # prompt tokens in the cache
        self.sampler = sampler_for(req.sampling)
        self.history = list(req.ids)
        self.decoder = StreamDecoder(model.tokenizer)
        self.held = ""  # text held back: it may be the start of a stop string
        self.generated = 0
        self.next_token: int | None = None  # sampled, to be evaluated in the next step
        self.t0 = time.perf_counter()
        self.t_first: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.done_prompt < len(self.req.ids)


class BatchLoop:
    """The scheduler's state and one step at a time; no threads (see Scheduler)."""

    def __init__(self, model, n_parallel: int | None = None, max_queue: int = 64):
        n = n_parallel or model.n_seq
        if not 1 <= n <= model.n_seq:
            raise FlexInferError(f"--parallel: {n} sequences, but the model was loaded for "
                                 f"{model.n_seq}")
        self.model, self.n_parallel, self.max_queue = model, n, max_queue
        self.waiting: collections.deque = collections.deque()
        self.running: dict[int, _Seq] = {}  # slot -> sequence
        self._last_used = [0.0] * n  # when each slot's sequence last ran, for ties
        self.totals = collections.Counter()  # requests, prompt/cached/decode tokens, times, bytes

    # ---- joining
    def add(self, req: Request, on_event: Callable[[Event], None]) -> Handle:
        self._check(req)
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests wait)")
        handle = Handle()
        self.waiting.append((req, on_event, handle))
        return handle

    def _check(self, req: Request) -> None:
        m = self.model
        if not req.ids:
            raise FlexInferError(f"request {req.id or ''}: the prompt is empty".replace("  ", " "))
        if len(req.ids) >= m.n_ctx:
            raise FlexInferError(f"request {req.id}: the prompt is {len(req.ids)} tokens but the "
                                 f"context holds {m.n_ctx}")
        m.check_token_ids(req.ids)

    def _admit(self) -> None:
        """Cancelled waiting requests leave the queue; then the first ones take free slots."""
        for item in [w for w in self.waiting if w[2].cancelled]:
            self.waiting.remove(item)
            item[1](Event("done", finish_reason="cancelled", usage=self._usage(None, item[0])))
        while self.waiting and len(self.running) < self.n_parallel:
            req, on_event, handle = self.waiting.popleft()
            slot, cached = self._pick_slot(req.ids)
            self.model.cache.keep(slot, cached)
            self.running[slot] = _Seq(req, on_event, handle, slot, cached, self.model)
            self.totals["prompt_tokens"] += len(req.ids)  # tokens in, cached ones included
            self.totals["cached_tokens"] += cached

    def _pick_slot(self, ids: list[int]) -> tuple[int, int]:
        """The free slot holding the longest prefix of ids (least recently used on ties), and how
        many of its tokens to keep: all but the prompt's last, whose logits are needed, and none
        where a sliding-window layer's ring no longer holds them (kv_cache.reusable)."""
        cache = self.model.cache
        free = [s for s in range(self.n_parallel) if s not in self.running]
        best = max(free, key=lambda s: (cache.reusable_prefix(s, ids), -self._last_used[s]))
        return best, cache.reusable_prefix(best, ids)

    # ---- stepping
    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def step(self, admit: bool = True) -> None:
        """Admit who can join, drop the cancelled, then one weight pass for everyone."""
        if admit:
            self._admit()
        for seq in [s for s in self.running.values() if s.handle.cancelled]:
            self._finish(seq, "cancelled")
        if not self.running:
            return
        batch, rows, prompt_tokens = self._build()
        more = any(s.prefilling for s in self.running.values())
        t0 = time.perf_counter()
        r0 = self.model.io_counters()[0]
        try:
            logits = self.model.step(batch, more_prompt=more)
        except FlexInferError as e:  # an I/O fault: those in the step fail, the loop goes on
            for seq in {id(s): s for s in rows}.values():
                self._fail(seq, str(e))
            return
        dt, now = time.perf_counter() - t0, time.perf_counter()
        kind = "prompt" if prompt_tokens else "decode"
        self.totals[kind + "_s"] += dt
        self.totals[kind + "_steps"] += 1
        self.totals["prefill_tokens"] += prompt_tokens  # evaluated
        self.totals["bytes_read"] += self.model.io_counters()[0] - r0
        for seq, row in zip(rows, logits):
            self._last_used[seq.slot] = now
            self._sample(seq, row, decoded_in=kind)

    def _build(self) -> tuple[TokenBatch, list[_Seq], int]:
        """The next token of every decoding sequence, then prompt chunks in arrival order up to
        the engine's micro-batch (n_batch). A chunk is whole pieces of n_ubatch tokens counted
        from where the prompt started (its last piece may be shorter): the pieces the engine
        cuts for the prompt alone, so its rows are its rows alone (engine._chunks). The first
        prompt always gets a piece: n_batch leaves n_ubatch beside the other sequences' tokens.
        Returns the batch, the sequence of each logits row, and how many prompt tokens it
        carries."""
        b, rows, cache, U = TokenBatch(), [], self.model.cache, self.model.n_ubatch
        for seq in self.running.values():
            if not seq.prefilling and seq.next_token is not None:
                b.add(seq.next_token, seq.slot, len(cache.tokens[seq.slot]), True)
                rows.append(seq)
        room, prompt = self.model.n_batch - len(b), 0
        for seq in self.running.values():
            left = len(seq.req.ids) - seq.done_prompt
            n = left if left <= room else room // U * U
            if not seq.prefilling or n <= 0:
                continue
            chunk = seq.req.ids[seq.done_prompt:seq.done_prompt + n]
            last = seq.done_prompt + len(chunk) == len(seq.req.ids)
            b.add_run(chunk, seq.slot, seq.done_prompt, last_logits=last)
            if last:
                rows.append(seq)
            seq.done_prompt += len(chunk)
            room -= len(chunk)
            prompt += len(chunk)
        return b, rows, prompt

    def _sample(self, seq: _Seq, logits: np.ndarray, decoded_in: str) -> None:
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
        opts, m = seq.req.sampling, self.model
        if seq.generated >= opts.max_tokens:
            return self._finish(seq, "length")
        tok = seq.sampler(logits, seq.history, len(seq.req.ids))
        if tok in m.tokenizer.eog_ids and not opts.ignore_eos:
            return self._finish(seq, "stop")
        seq.history.append(tok)
        seq.generated += 1
        self.totals["decode_tokens"] += 1
        self.totals["decode_tokens_in_" + decoded_in] += 1
        if self._emit(seq, seq.decoder.feed(tok), tok):
            return self._finish(seq, "stop")
        if seq.generated >= opts.max_tokens or len(seq.history) >= m.n_ctx:
            return self._finish(seq, "length")
        seq.next_token = tok

    def _emit(self, seq: _Seq, text: str, tok: int) -> bool:
        """Send the text that can no longer be part of a stop string; True at a stop string."""
        text = seq.held + text
        stops = seq.req.stop
        for s in stops:
            at = text.find(s) if s else -1
            if at >= 0:
                seq.held = ""
                seq.on_event(Event("piece", text[:at], tok))
                return True
        keep = max((_overlap(text, s) for s in stops), default=0)
        seq.held = text[len(text) - keep:] if keep else ""
        seq.on_event(Event("piece", text[:len(text) - keep], tok))
        return False

    def _finish(self, seq: _Seq, reason: str) -> None:
        tail = seq.held + seq.decoder.flush() if reason != "cancelled" else ""
        if tail:
            seq.on_event(Event("piece", tail, -1))
        del self.running[seq.slot]
        self.totals["requests"] += 1
        seq.on_event(Event("done", finish_reason=reason, usage=self._usage(seq, seq.req)))

    def _fail(self, seq: _Seq, message: str) -> None:
        self.running.pop(seq.slot, None)
        self.totals["requests"] += 1
        self.model.cache.keep(seq.slot, 0)
        seq.on_event(Event("error", message=message))

    def _usage(self, seq: _Seq | None, req: Request) -> dict:
        if seq is None:
            return {"prompt_tokens": len(req.ids), "completion_tokens": 0, "cached_tokens": 0,
                    "ttft_s": 0.0, "decode_s": 0.0}
        first = seq.t_first or time.perf_counter()
        return {"prompt_tokens": len(req.ids), "completion_tokens": seq.generated,
                "cached_tokens": seq.cached, "ttft_s": round(first - seq.t0, 4),
                "decode_s": round(time.perf_counter() - first, 4)}

    def cancel_all(self, reason: str = "cancelled") -> None:
        for req, on_event, _ in self.waiting:
            on_event(Event("done", finish_reason=reason, usage=self._usage(None, req)))
        self.waiting.clear()
        for seq in list(self.running.values()):
            self._finish(seq, reason)

    def stats(self) -> dict:
        """requests: finished (any reason); prompt_tokens: tokens in, of which cached_tokens came
        from the cache; decode_tok_s: tokens sampled in decode-only steps over their time."""
        t, m = self.totals, self.model
        decoded = t["decode_tokens_in_decode"]
        return {
            "running": len(self.running), "queued": len(self.waiting),
            "requests": t["requests"], "prompt_tokens": t["prompt_tokens"],
            "decode_tokens": t["decode_tokens"], "cached_tokens": t["cached_tokens"],
            "decode_tok_s": round(decoded / t["decode_s"], 3) if t["decode_s"] else 0.0,
            "prefill_tok_s": round(t["prefill_tokens"] / t["prompt_s"], 3) if t["prompt_s"] else 0.0,
            "bytes_read_per_token": int(t["bytes_read"] / max(1, t["decode_tokens"])),
            "resident_bytes": m.stats.resident_bytes, "budget_bytes": m.stats.budget_bytes,
            "budget_source": m.stats.budget_source,
        }


def _overlap(text: str, stop: str) -> int:
    """The longest end of text that is a start of stop (held back until it is decided)."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


class Scheduler:
    """A BatchLoop on its own engine thread: submit() from any thread; callbacks run on the
    engine thread (hand them to your own thread or event loop)."""

    def __init__(self, model, n_parallel: int | None = None, max_queue: int = 64):
        self.loop = BatchLoop(model, n_parallel, max_queue)
        self._lock = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flexinfer-engine", daemon=True)
        self._thread.start()

    def submit(self, req: Request, on_event: Callable[[Event], None]) -> Handle:
        with self._lock:
            if self._closed:
                raise FlexInferError("the scheduler is closed")
            handle = self.loop.add(req, on_event)
            self._lock.notify()
        return handle

    def _run(self) -> None:
        while True:
            with self._lock:
                while self.loop.idle and not self._closed:
                    self._lock.wait()
                if self._closed:
                    self.loop.cancel_all()
                    return
                self.loop._admit()  # under the lock: the queue is shared with submit()
            self.loop.step(admit=False)

    def stats(self) -> dict:
        return self.loop.stats()

    def set_memory_budget(self, size: int | str):
        """From any thread (the server's workers): Model.set_memory_budget waits for the step under
        way, then re-plans; the engine thread goes on at the next step. "auto" hands the budget
        back to the environment (follow.py) at once. A size below the minimum raises
        FlexInferError naming both, and nothing changes. Returns the BudgetChange (None: "auto"
        found no target: no cgroup limit and no /proc/meminfo)."""
        from flexinfer import follow
        if follow.is_auto(size):
            return follow.resume(self.loop.model)
        return self.loop.model.set_memory_budget(size, source="server")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
