"""Scheduler events -> asyncio. The scheduler calls `on_event` on its engine thread; the job hands
each event to the event loop with call_soon_threadsafe, and the route awaits them in order.

A job ends in exactly one way: the scheduler's done or error event; the deadline (--timeout) passing,
which cancels the sequence and ends with finish_reason "length"; or the client leaving, which cancels
the sequence (the scheduler drops it at its next step)."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable

from flexinfer.scheduler import Event, Request

POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class Job:
    def __init__(self, scheduler, req: Request, timeout: float | None):
        loop = asyncio.get_running_loop()
        self.req, self.queue = req, asyncio.Queue()
        self.t0 = time.perf_counter()
        self.deadline = time.monotonic() + timeout if timeout else None
        self.n_out, self.ttft_s = 0, None
        self.next_poll = time.monotonic() + POLL_S  # when to ask next whether the client left
        self.ended = ""  # "done" | "error" | "timeout" | "disconnected"

        def on_event(ev: Event) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        self.handle = scheduler.submit(req, on_event)  # QueueFull propagates

    def local_usage(self) -> dict:
        """Usage as counted here, for a job cut short before the scheduler's done event."""
        return dict(prompt_tokens=len(self.req.ids), completion_tokens=self.n_out,
                    cached_tokens=0, ttft_s=self.ttft_s, decode_s=None)

    async def events(self, disconnected: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[Event]:
        """Pieces, then one final done (or error) event. Leaving the loop early, by the consumer's
        cancellation (an SSE client gone) or otherwise, cancels the sequence."""
        try:
            while True:
                ev = await self._next(disconnected)
                if ev is None:
                    return
                if ev.kind == "piece" and ev.token >= 0:
                    self.n_out += 1
                    if self.ttft_s is None:
                        self.ttft_s = time.perf_counter() - self.t0
                if ev.kind != "piece":
                    self.ended = self.ended or ev.kind
                yield ev
                if ev.kind != "piece":
                    return
        finally:
            if self.ended not in ("done", "error"):
                self.handle.cancel()
                self.ended = self.ended or "disconnected"

    async def _next(self, disconnected) -> Event | None:
        """The next event, or None once the client has left. The client is asked every POLL_S
        whether events come or not: a fast stream of pieces must not hide a client that left."""
        while True:
            wait = None if self.deadline is None else self.deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self.handle.cancel()
                self.ended = "timeout"
                return Event("done", finish_reason="length", usage=self.local_usage())
            if disconnected is not None:
                if time.monotonic() >= self.next_poll:
                    self.next_poll = time.monotonic() + POLL_S
                    if await disconnected():
                        self.handle.cancel()
                        self.ended = "disconnected"
                        return None
                left = max(0.0, self.next_poll - time.monotonic())
                wait = left if wait is None else min(wait, left)
            try:
                return await asyncio.wait_for(self.queue.get(), wait)
            except asyncio.TimeoutError:
                continue
