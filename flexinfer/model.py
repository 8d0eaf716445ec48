"""load(path, **options) -> Model: the Python API, and the one place the parts are wired together.

File to token: check the file (nothing allocated yet) -> tokenizer -> measure the fixed costs and plan
the budget -> load resident weights and start the prefetcher -> generate.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from flexinfer import ggml_ops, machine
from flexinfer.budget import HEADROOM, resolve_budget, rss_bytes
from flexinfer.config import ModelConfig
from flexinfer.direct_io import DirectReader
from flexinfer.engine import Engine, measure_compute_bytes
from flexinfer.errors import FlexInferError
from flexinfer.ggml_ops import Backend
from flexinfer.kv_cache import KVCache, kv_bytes, kv_growth
from flexinfer.model_check import check_model
from flexinfer.models import ARCHS
from flexinfer.planner import BudgetError, Machine, Plan, plan
from flexinfer.stats import Stats
from flexinfer.tokenizer import Tokenizer
from flexinfer.weights import WeightStore, matrices

OFFLOAD_MODES = ("flexinfer", "prefetch", "sync", "mmap")
DEFAULT_CTX = 4096  # like llama.cpp's default; never more than the model was trained for


@dataclass(frozen=True)
class Options:
    n_ctx: int | None = None  # context length; default min(4096, trained)
    n_threads: int | None = None  # compute threads; default: every core
    memory_budget: int | str | None = None  # bytes or "1.5GiB"; default cgroup limit/MemAvailable
    offload: str = "flexinfer"  # flexinfer | prefetch | sync | mmap
    balance: bool = True  # False: lock whole layers from the first (ablation)
    preserve: str = "auto"  # auto | ffn | attn
    prefetch_window: int | None = None  # slots in the ring; default chosen by the planner
    repack: bool = True  # use ggml's repacked kernels where the type allows
    n_ubatch: int | None = None  # prompt tokens per batch; default 512, fewer when streaming
    direct_io: bool = True  # O_DIRECT reads
    notes: list = field(default_factory=list)
    progress: object = None  # None or called with (bytes read, bytes to read) while loading


def _check_options(o: Options) -> None:
    if o.offload not in OFFLOAD_MODES:
        raise FlexInferError(f"--offload: {o.offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
    if o.preserve not in ("auto", "ffn", "attn"):
        raise FlexInferError(f"--preserve: {o.preserve!r} is not one of auto, ffn, attn")
    for name, v, lo in (("--ctx-size", o.n_ctx, 1), ("--threads", o.n_threads, 1),
                        ("--prefetch-window", o.prefetch_window, 1), ("n_ubatch", o.n_ubatch, 1)):
        if v is not None and (not isinstance(v, int) or v < lo):
            raise FlexInferError(f"{name}: must be a whole number >= {lo}, got {v!r}")


class Model:
    """A loaded model. Use as a context manager or call close(): it owns threads and memory."""

    def __init__(self, path: str, **options):
        opts = Options(**options)
        _check_options(opts)
        t0 = time.perf_counter()
        self.path = os.fspath(path)
        self.g, self.cfg, self.specs = check_model(self.path)
        self.tokenizer = Tokenizer.from_gguf(self.g)
        self.arch = ARCHS[self.cfg.arch]
        self.n_ctx = opts.n_ctx or min(DEFAULT_CTX, self.cfg.n_ctx_train)
        self.n_threads = opts.n_threads or os.cpu_count() or 1
        self.stats = Stats()
        self._closed = False
        self._engine = self._store = self._kv = self._backend = self._reader = None
        try:
            self._load(opts)
        except MemoryError as e:  # the OS refused an allocation the plan expected to fit
            self.close()
            raise FlexInferError(f"{self.path}: out of memory while loading ({e}); try a smaller "
                                 "--memory-budget or --ctx-size") from None
        except BaseException:
            self.close()
            raise
        self.stats.load_s = time.perf_counter() - t0

    def _note(self, text: str) -> None:
        if text not in self.stats.notes:
            self.stats.notes.append(text)
            print(f"flexinfer: {text}", file=sys.stderr)

    def _load(self, o: Options) -> None:
        planned = make_plan(self.g, self.cfg, self.specs, o, self.n_ctx, self.n_threads)
        self.plan, repack = planned.plan, planned.repack
        self.stats.set_plan(self.plan, planned.budget, planned.source, planned.machine)
        self._reader = DirectReader(self.path, self.g.file_size, direct=o.direct_io,
                                    note=self._note)
        self._store = WeightStore(self.g, self.cfg, self.specs, self.plan, repack=repack,
                                  reader=self._reader)
        self._store.load(o.offload, o.progress)
        if self._store.mlock_errno:
            self._note(f"mlock refused (errno {self._store.mlock_errno}, RLIMIT_MEMLOCK?); "
                       "resident weights are not locked")
        self._kv = KVCache(self.cfg, self.n_ctx)
        self._backend = Backend(self.n_threads)
        self._engine = Engine(self.cfg, self.arch, self._store, self._kv, self._backend,
                              planned.n_ubatch)
        self.stats.compute_bytes = self._engine.compute_bytes

    # ---- the API
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits, one row per position: (len(ids), n_vocab)."""
        self._check_tokens(ids)
        return self._forward(list(ids), 0, all_logits=True)

    def _check_tokens(self, ids) -> None:
        if not ids:
            raise FlexInferError("no tokens to evaluate")
        if len(ids) > self.n_ctx:
            raise FlexInferError(f"{len(ids)} tokens do not fit the context of {self.n_ctx} "
                                 "(use --ctx-size or --truncate)")
        bad = [t for t in ids if not 0 <= t < self.cfg.n_vocab]
        if bad:
            raise FlexInferError(f"token id {bad[0]} is outside the vocabulary "
                                 f"(0..{self.cfg.n_vocab - 1})")

    def _forward(self, ids: list[int], pos: int, all_logits: bool = False) -> np.ndarray:
        if self._closed:
            raise FlexInferError("the model is closed")
        out = self._engine.forward(ids, pos, all_logits)
        if self.plan.mode != "mmap":  # less as the KV cache grows
            self.stats.resident_bytes = self._store.resident_bytes
            self.stats.stage = self._store.stage
        return out

    def generate(self, prompt, **kw):
        from flexinfer.generate import generate
        return generate(self, prompt, **kw)

    def chat(self, messages: list[dict], **kw):
        from flexinfer.generate import chat
        return chat(self, messages, **kw)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for part in (self._engine, self._store, self._kv, self._backend, self._reader):
            if part is not None:
                part.close()

    @property
    def prefetch_threads_alive(self) -> int:
        p = self._store.prefetcher if self._store else None
        return p.alive if p else 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Planned(NamedTuple):
    plan: Plan
    budget: int
    source: str  # where the budget came from
    machine: Machine
    repack: bool
    n_ubatch: int  # prompt tokens per batch the engine will use


DEFAULT_UBATCH = 512  # llama.cpp's
MIN_UBATCH = 128  # 7B under 1 GB, 512-token prompt: 16.9 tok/s at 128, 18.4 at 512, 15.8 at 64
PREFILL_SPEEDUP = 2  # per token, a prompt batch computes this much faster than a decode step
# (measured on the 7B here: 20.0 prompt tok/s against 9.44 decode tok/s, docs/benchmarks.md)


def make_plan(g, cfg: ModelConfig, specs, o: Options, n_ctx: int, n_threads: int) -> Planned:
    """Budget -> Plan, from sizes and calibration only (no weight is read).

    A prompt batch's compute buffer grows with the batch (the 7B: 0.2 MB per token, 100 MB at
    512). Where rows are locked (flexinfer, sync) the plan lends it resident rows that are read
    back after the prompt (planner.py), so decoding does not pay for it and llama.cpp's 512 stays
    the batch. Elsewhere (prefetch) it is charged all along: when weights stream and the caller
    left n_ubatch open, the batch shrinks to the tokens whose compute hides one pass of reads,
    t_io / (t_cpu / PREFILL_SPEEDUP), but not below MIN_UBATCH (small batches run the kernels less
    efficiently: 32-64 tokens cost 14-16% of prompt speed). A budget too small for the default
    batch's buffer tries smaller ones, down to MIN_UBATCH, before it is refused."""
    budget, source = resolve_budget(o.memory_budget)
    ubatch = min(o.n_ubatch or DEFAULT_UBATCH, n_ctx)
    kv = kv_bytes(cfg, n_ctx)
    by_ctx = kv + 2 * n_ctx * ubatch  # KV cache + f16 attention mask rows
    if by_ctx > budget:  # checked before anything sized by the context is allocated
        least = by_ctx + rss_bytes() + HEADROOM
        raise FlexInferError(f"--memory-budget: {_gb(budget)} ({source}) is below the minimum "
                             f"working set for {os.path.basename(g.path)} at context {n_ctx}: at "
                             f"least {_gb(least)}; the KV cache and attention mask alone need "
                             f"{_gb(by_ctx)} (try a smaller --ctx-size)")
    repack = o.repack and o.offload != "mmap"  # a mapping of the file cannot be repacked
    mats = matrices(g, cfg, specs, lambda info: repack and ggml_ops.repacks(info.type, info.shape))
    gc.collect()  # the parser's and tokenizer builder's garbage, then the heap it leaves behind
    ggml_ops.trim_heap()
    runtime = rss_bytes()  # interpreter, libraries, tokenizer: resident now
    mach = machine.calibrate(g, repack, n_threads)
    growth = kv_growth(cfg, n_ctx) if o.offload in ("flexinfer", "sync") else ()

    def planned(ub: int) -> Plan:
        keep, prompt = measure_compute_bytes(g, cfg, ARCHS[cfg.arch], specs, n_ctx, ub, n_threads)
        fixed_parts = {  # what the weights cannot use while decoding, in bytes
            "runtime": runtime, "kv_cache": kv, "compute": keep,
            "vectors": sum(g.tensors[s.name].nbytes for s in specs if len(s.shape) == 1),
            "headroom": HEADROOM,
        }
        p = plan(mats, budget, sum(fixed_parts.values()), mach, mode=o.offload,
                 preserve=o.preserve, balance=o.balance, window=o.prefetch_window,
                 kv_growth=growth, prompt_extra=prompt)
        return dataclasses.replace(p, fixed_parts={**fixed_parts, "prompt_compute": prompt})

    while True:
        try:
            p = planned(ubatch)
            break
        except BudgetError as e:
            if o.n_ubatch is None and ubatch > MIN_UBATCH:
                ubatch = max(MIN_UBATCH, ubatch // 2)  # a smaller prompt buffer may fit
                continue
            raise FlexInferError(f"--memory-budget: {_gb(e.budget)} is below the minimum working "
                                 f"set for {os.path.basename(g.path)} at context {n_ctx}: "
                                 f"{_gb(e.minimum)} (try a smaller --ctx-size)") from None
    if o.n_ubatch is None and p.streamed_bytes and p.mode == "prefetch":  # no loan there
        need = p.t_io / (p.t_cpu_bound / PREFILL_SPEEDUP)  # tokens whose compute hides the reads
        small = MIN_UBATCH
        while small < need and small < ubatch:
            small *= 2
        if small < ubatch:  # less compute memory: fits wherever the larger batch did
            p, ubatch = planned(small), small
    return Planned(p, budget, source, mach, repack, ubatch)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def load(path, **options) -> Model:
    """Load a GGUF model. Options: n_ctx, n_threads, memory_budget, offload, balance, preserve,
    prefetch_window, repack, n_ubatch, direct_io, progress (see Options)."""
    return Model(path, **options)
