"""In-process timing of a decode run, for the measurement scripts kept under docs/bench: the MoE
bench's prompt and setup in this process, and a timer that wraps methods.

    from decode_timing import Timer, decode
    timer = Timer()
    timer.wrap(flexinfer.ggml_ops.Backend, "compute")
    tokens, seconds, experts = decode(MODEL, "8G", timer, rate=1 << 30, expert_prefetch=...)
    timer.ms_a_token("compute", tokens)

Run the scripts from a checkout: the flexinfer measured is the working directory's.
"""
from __future__ import annotations

import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.insert(1, str(Path(__file__).resolve().parent))

import flexinfer  # noqa: E402
from bench_moe import POINT_PROMPT  # noqa: E402
from flexinfer.cgroup import drop_page_cache  # noqa: E402
from flexinfer.disk_cap import capped  # noqa: E402

__all__ = ["POINT_PROMPT", "Timer", "decode"]


class Timer:
    """Seconds and calls of wrapped methods, counted while `on` (decode turns it on after the
    first token, so the prompt is not counted)."""

    def __init__(self):
        self.on = False
        self.spent: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def wrap(self, cls, name: str, key: str | None = None) -> None:
        real, key = getattr(cls, name), key or name

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                if self.on:
                    self.spent[key] += time.perf_counter() - t
                    self.calls[key] += 1
        setattr(cls, name, timed)

    def ms_a_token(self, key: str, tokens: int) -> float:
        return 1e3 * self.spent[key] / tokens


def decode(model: str, budget: str, timer: Timer | None = None, *, rate: int | None = None,
           tokens: int = 32, threads: int = 2, **options) -> tuple[int, float, dict]:
    """Decode `tokens` after POINT_PROMPT (temperature 1, seed 1, -c 256, an empty
    FLEXINFER_HOME) at `budget`; with `rate`, in an I/O cgroup capping reads of the model's disk
    at rate bytes/s, the page cache dropped first (root). Returns (tokens timed, their seconds,
    the expert cache's summary at the end)."""
    os.environ["FLEXINFER_HOME"] = tempfile.mkdtemp(prefix="decode-timing-")
    with capped(model, rate):
        if rate is not None:
            drop_page_cache()
        with flexinfer.load(model, n_ctx=256, n_threads=threads, memory_budget=budget,
                            **options) as m:
            n = 0
            for _ in m.generate(POINT_PROMPT, max_tokens=tokens + 1, temperature=1.0, seed=1,
                                ignore_eos=True):
                n += 1
                if n == 1:
                    t0 = time.perf_counter()
                    if timer is not None:
                        timer.on = True
            seconds = time.perf_counter() - t0
            if timer is not None:
                timer.on = False
            return n - 1, seconds, dict(m.stats.experts or {})
