"""load(path, **options) -> Model: the Python API, and the one place the parts are wired together.

File to token: check the file (nothing allocated yet) -> tokenizer -> measure the fixed costs and plan
the budget -> load resident weights and start the prefetcher -> generate.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from flexinfer import follow, ggml_ops, machine
from flexinfer.budget import HEADROOM, parse_size, resolve_budget, rss_bytes
from flexinfer.config import ModelConfig
from flexinfer.direct_io import DirectReader
from flexinfer.engine import Engine, measure_compute_bytes
from flexinfer.errors import FlexInferError
from flexinfer import experts as ex
from flexinfer.ggml_ops import Backend
from flexinfer.batch import TokenBatch
from flexinfer.kv_cache import (KVCache, cache_type, check_cache_type, kv_bytes,
                                 kv_growth, swa_total)
from flexinfer.model_check import check_model
from flexinfer.models import ARCHS
from flexinfer.planner import BudgetError, Machine, Plan, plan, with_experts
from flexinfer.stats import Stats, process_read_bytes
from flexinfer.tokenizer import Tokenizer
from flexinfer.weights import WeightStore, matrices

OFFLOAD_MODES = ("flexinfer", "prefetch", "sync", "mmap")
DEFAULT_CTX = 4096  # like llama.cpp's default; never more than the model was trained for


@dataclass(frozen=True)
class Options:
    n_ctx: int | None = None  # context length; default min(4096, trained)
    n_threads: int | None = None  # compute threads; default: every core
    memory_budget: int | str | None = None  # bytes or "1.5GiB": fixed; None or "auto": follow the
    # cgroup's limits, MemAvailable and memory pressure while loaded (follow.py)
    offload: str = "flexinfer"  # flexinfer | prefetch | sync | mmap
    balance: bool = True  # False: lock whole layers from the first (ablation)
    preserve: str = "auto"  # auto | ffn | attn
    prefetch_window: int | None = None  # slots in the ring; default chosen by the planner
    repack: bool = True  # use ggml's repacked kernels where the type allows
    n_ubatch: int | None = None  # prompt tokens per batch; default 512, fewer when streaming
    direct_io: bool = True  # O_DIRECT reads
    n_seq: int = 1  # sequences decoded together (--parallel); each has n_ctx cells of the cache
    cache_type_k: str = "f16"  # --cache-type-k: f16 | q8_0 | q4_0
    cache_type_v: str = "f16"  # --cache-type-v
    progress: object = None  # None or called with (bytes read, bytes to read) while loading
    experts: str = "auto"  # MoE: auto (an expert cache reads only the picked experts, experts.py)
    # | whole (expert tensors planned whole with the rest); mmap always maps them whole
    expert_cache: int | None = None  # bytes of expert cache instead of what the plan leaves
    # (at least one layer's experts; an ablation and for tests)
    expert_prefetch: bool = False  # read layer l+1's likely experts while layer l's compute:
    # off by default, slower at every budget measured on two cores (docs/benchmarks.md)
    expert_fill: bool = False  # fill the expert cache at load with the experts earlier runs
    # counted most (ExpertStore.fill): more read at load, fewer misses in the first tokens


def _check_options(o: Options) -> None:
    if o.offload not in OFFLOAD_MODES:
        raise FlexInferError(f"--offload: {o.offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
    if o.experts not in ("auto", "whole"):
        raise FlexInferError(f"--experts: {o.experts!r} is not one of auto, whole")
    if o.preserve not in ("auto", "ffn", "attn"):
        raise FlexInferError(f"--preserve: {o.preserve!r} is not one of auto, ffn, attn")
    for name, v, lo in (("--ctx-size", o.n_ctx, 1), ("--threads", o.n_threads, 1),
                        ("--prefetch-window", o.prefetch_window, 1), ("n_ubatch", o.n_ubatch, 1),
                        ("--parallel", o.n_seq, 1), ("--expert-cache", o.expert_cache, 0)):
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
        self.n_ctx = opts.n_ctx or min(DEFAULT_CTX, self.cfg.n_ctx_train)  # per sequence
        self.n_seq = opts.n_seq
        self.n_threads = opts.n_threads or os.cpu_count() or 1
        self.stats = Stats()
        self._closed = False
        self._engine = self._store = self.cache = self._backend = self._reader = None
        self._residency = None
        self._experts = None
        self._lock = threading.RLock()  # a step and a change of budget never overlap
        self._follower = None  # follow.Follower with --memory-budget auto
        try:
            self._load(opts)
            if follow.is_auto(opts.memory_budget):
                self._follower = follow.follow(self)
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
        if planned.n_ctx != self.n_ctx:  # the default context did not fit the budget
            self._note(f"context {planned.n_ctx} (the default {self.n_ctx} does not fit "
                       f"{_gb(planned.budget)}; -c sets it)")
            self.n_ctx = planned.n_ctx
        self.plan, repack = planned.plan, planned.repack
        self._planned = planned
        self.memory_budget, self.budget_source = planned.budget, planned.source
        self.stats.set_plan(self.plan, planned.budget, planned.source, planned.machine)
        self._reader = DirectReader(self.path, self.g.file_size, direct=o.direct_io,
                                    note=self._note)
        if planned.experts:  # the expert cache owns the *_exps tensors (experts.py)
            self._experts = ex.ExpertStore(self.g, self.cfg, planned.experts,
                                           self.plan.expert_cache_bytes, self._reader,
                                           repack=repack, counts_file=ex.counts_path(self.g),
                                           note=self._note, n_seq=o.n_seq)
            self._experts.warm()
            if o.expert_fill:
                self._note(f"expert cache: {self._experts.fill()} experts read at load "
                           "(--expert-fill)")
            self._experts.make_pool()  # the rest of the cache, faulted in now, not per token
            if planned.expert_prefetch:
                self._experts.enable_prefetch()
            self.stats.experts = self._experts.summary()
        self._store = WeightStore(self.g, self.cfg, self.specs, self.plan, repack=repack,
                                  reader=self._reader, skip=planned.experts)
        self._store.load(self.plan, 0, o.progress)  # flexinfer may have chosen sync's schedule
        self._residency = self._store.residency
        if self._residency.mlock_errno:
            self._note(f"mlock refused (errno {self._residency.mlock_errno}, RLIMIT_MEMLOCK?); "
                       "resident weights are not locked")
        self.cache = KVCache(self.cfg, self.n_ctx, self.n_seq, *_cache_types(self.cfg, o),
                             n_ubatch=planned.n_ubatch)
        self._backend = Backend(self.n_threads)
        self._engine = Engine(self.cfg, self.arch, self._store, self.cache, self._backend,
                              planned.n_ubatch, experts=self._experts)
        self.stats.compute_bytes = self._engine.compute_bytes
        self.n_ubatch = self._engine.n_ubatch  # a sequence's prompt tokens per micro-batch
        self.n_batch = self._engine.n_batch  # tokens one micro-batch computes (n_ubatch + n_seq - 1)

    # ---- the API
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits, one row per position: (len(ids), n_vocab), evaluated from position 0
        in sequence 0."""
        self.check_tokens(ids)
        return self.evaluate(list(ids), 0, all_logits=True)

    def check_tokens(self, ids) -> None:
        """A prompt of token ids one sequence can evaluate: not empty, within the context, every
        id in the vocabulary (FlexInferError saying which is not)."""
        if not ids:
            raise FlexInferError("no tokens to evaluate")
        if len(ids) > self.n_ctx:
            raise FlexInferError(f"{len(ids)} tokens do not fit the context of {self.n_ctx} "
                                 "(use --ctx-size or --truncate)")
        self.check_token_ids(ids)

    def step(self, batch: TokenBatch, more_prompt: bool = False) -> np.ndarray:
        """One weight pass for every token of the batch (each with its sequence and position):
        the float32 logits of the tokens that want them, in batch order (n_logits, n_vocab).
        A sequence's tokens continue it: the first is at the position after what the cache holds
        for it (cache.keep(seq, n) forgets the rest first). more_prompt: another prompt step
        follows at once (the prompt loan stays out, weights.py)."""
        if self._follower is not None:  # outside the step's lock: it may change the budget
            self._follower.poll()
        with self._lock:
            if self._closed:
                raise FlexInferError("the model is closed")
            self._check_batch(batch)
            try:
                out = self._engine.step(batch, more_prompt)
            except BaseException:
                for seq in set(batch.seqs):  # what this step wrote is not to be trusted
                    self.cache.keep(seq, min(p for s, p in zip(batch.seqs, batch.pos) if s == seq))
                raise
            for tok, seq in zip(batch.tokens, batch.seqs):
                self.cache.tokens[seq].append(tok)
            self._note_residency()
            return out

    def _note_residency(self) -> None:
        if self.plan.mode != "mmap":  # less as the KV cache grows, or the budget changes
            self.stats.resident_bytes = self._residency.resident_bytes
            self.stats.stage = self._residency.stage
        if self._experts is not None:
            self.stats.experts = self._experts.summary()

    # ---- the memory budget, while running (issue 11)
    def set_memory_budget(self, size: int | str, source: str = "api") -> "BudgetChange":
        """Re-plan at `size` bytes (or a size such as "1.5G") and move there now, between steps
        (a running step finishes first): blocks leaving are released (munlock, MADV_DONTNEED)
        before this returns, so the process is within the new budget when it does. Blocks
        arriving grow through the ring during the next step (copied home as they stream,
        residency.py), or are read at its end, or by settle(). The logits do not change. A
        budget below the minimum working set raises FlexInferError, and nothing changes."""
        nbytes = parse_size(size, "memory budget") if isinstance(size, str) else int(size)
        with self._lock:
            if self._closed:
                raise FlexInferError("the model is closed")
            t0, old = time.perf_counter(), self.memory_budget
            if self.plan.mode == "mmap":  # the OS pages the file: nothing of ours to move
                self.memory_budget, self.budget_source = nbytes, source
                self.stats.budget_bytes, self.stats.budget_source = nbytes, source
                return BudgetChange(old, nbytes, source, 0.0, 0, 0)
            try:
                new = self._planned.replan(nbytes)
            except BudgetError as e:
                raise FlexInferError(
                    f"memory budget {_gb(nbytes)} ({source}) is below the minimum working set for "
                    f"{os.path.basename(self.path)} at context {self.n_ctx}{_seqs(self.n_seq)}: "
                    f"{_gb(e.minimum)}; the budget stays {_gb(old)}") from None
            released, read, pending = self._residency.set_plan(new, self.cache.cells_charged())
            if self._experts is not None:  # the expert cache shrinks or grows with the budget
                released += self._experts.set_capacity(new.expert_cache_bytes)
            self.plan, self.memory_budget, self.budget_source = new, nbytes, source
            self.stats.set_plan(new, nbytes, source, self._planned.machine)
            self._note_residency()
            self.stats.budget_changes += 1
            return BudgetChange(old, nbytes, source, time.perf_counter() - t0, released, read,
                                pending)

    def minimum_budget(self) -> int:
        """The smallest budget a plan exists for, at this context, sequence count and cache
        types (with the prompt batch size this model was loaded with)."""
        if self.plan.mode == "mmap":
            return 0
        try:
            self._planned.replan(0)
        except BudgetError as e:
            return e.minimum
        return 0

    def settle(self, timeout_s: float = 10.0) -> bool:
        """Finish growing now (idle: no step will stream the blocks arriving): they are read into
        their homes. True when nothing is left pending (always, once this returns; timeout_s is
        for callers that wait on a model another thread uses)."""
        if not self._lock.acquire(timeout=timeout_s):
            return False
        try:
            if self._residency is not None and not self._closed:
                self._residency.finish_growth()
                self._note_residency()
            return True
        finally:
            self._lock.release()

    def resident_weight_bytes(self) -> int:
        """Matrix bytes resident now (0 in mmap mode, where the OS decides)."""
        return self._residency.resident_bytes if self._residency and self.plan.mode != "mmap" \
            else 0

    def _check_batch(self, b: TokenBatch) -> None:
        if not b.tokens:
            raise FlexInferError("no tokens to evaluate")
        if not len(b.tokens) == len(b.seqs) == len(b.pos) == len(b.logits):
            raise FlexInferError("batch: tokens, seqs, pos and logits differ in length")
        self.check_token_ids(b.tokens)
        nxt = {}
        for seq, pos in zip(b.seqs, b.pos):
            if not 0 <= seq < self.n_seq:
                raise FlexInferError(f"batch: sequence {seq} is outside 0..{self.n_seq - 1} "
                                     "(--parallel)")
            want = nxt.get(seq, len(self.cache.tokens[seq]))
            if pos != want:
                raise FlexInferError(f"batch: sequence {seq} continues at position {want}, "
                                     f"not {pos}")
            if pos >= self.n_ctx:
                raise FlexInferError(f"batch: sequence {seq} is full (context {self.n_ctx})")
            nxt[seq] = pos + 1

    def check_token_ids(self, ids) -> None:
        """Every id in the vocabulary (FlexInferError naming the first that is not)."""
        bad = [t for t in ids if not 0 <= t < self.cfg.n_vocab]
        if bad:
            raise FlexInferError(f"token id {bad[0]} is outside the vocabulary "
                                 f"(0..{self.cfg.n_vocab - 1})")

    def evaluate(self, ids: list[int], pos: int, all_logits: bool = False,
                 seq: int = 0) -> np.ndarray:
        """ids at positions pos.. of one sequence (what it held from pos on is forgotten): the
        last token's logits (1, n_vocab), or every token's with all_logits. One sequence's step
        (generate.py's prefill and decode); `step` takes several."""
        self.cache.keep(seq, pos)
        b = TokenBatch()
        b.add_run(list(ids), seq, pos, all_logits=all_logits)
        return self.step(b)

    def io_counters(self) -> tuple[int, float, float, float, int]:
        """(bytes our reader read from the model file, reader busy s, compute stalled s,
        converter busy s, bytes the process read from storage, page faults included: what mmap
        reads) since load: differences of two readings give a stretch of work's figures."""
        p = self._residency.prefetcher if self._store else None
        fetch = self._experts.fetch_s if self._experts else 0.0  # expert reads stall compute
        return (self._reader.bytes_read if self._reader else 0,
                (p.io_busy_s if p else 0.0) + fetch, (p.stall_s if p else 0.0) + fetch,
                p.convert_busy_s if p else 0.0, process_read_bytes())

    def expert_counters(self) -> tuple[int, int, int, int]:
        """(hits, misses, bytes read, hits the read-ahead made) of the expert cache since load
        (zeros without one): the differences of two readings give a stretch of work's figures."""
        e = self._experts
        return (e.hits, e.misses, e.bytes_read, e.prefetch_used) if e else (0, 0, 0, 0)

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
        if self._follower is not None:
            self._follower.stop()
        for part in (self._engine, self._store, self._experts, self.cache, self._backend,
                     self._reader):
            if part is not None:
                part.close()

    @property
    def prefetch_threads_alive(self) -> int:
        p = self._residency.prefetcher if self._store and self._residency else None
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
    n_ctx: int  # cells per sequence: the one asked for, or the largest default that fits
    replan: Callable[[int], Plan]  # the plan at another budget, everything else the same
    # (raises planner.BudgetError below the minimum)
    experts: frozenset = frozenset()  # *_exps tensors an ExpertStore owns (experts.py); its
    # capacity is the plan's expert_cache_bytes
    expert_prefetch: bool = False  # read-ahead planned (its routers and staging charged)


@dataclass(frozen=True)
class BudgetChange:
    """What Model.set_memory_budget did."""

    old: int  # bytes
    new: int
    source: str
    seconds: float  # the whole change: re-plan, release, read back
    released_bytes: int  # weight bytes given back to the OS
    read_bytes: int  # weight bytes read from disk during the call
    pending_bytes: int = 0  # weight bytes left to grow through the ring in the next step


DEFAULT_UBATCH = 512  # llama.cpp's
MIN_UBATCH = 128  # 7B under 1 GB, 512-token prompt: 16.9 tok/s at 128, 18.4 at 512, 15.8 at 64
MIN_DEFAULT_CTX = 256  # a default context is never cut below this to fit the budget
PREFILL_SPEEDUP = 2  # per token, a prompt batch computes this much faster than a decode step
# (measured on the 7B here: 20.0 prompt tok/s against 9.44 decode tok/s, docs/benchmarks.md)


def _cache_types(cfg: ModelConfig, o: Options) -> tuple[int, int]:
    tk = cache_type(o.cache_type_k, "--cache-type-k")
    tv = cache_type(o.cache_type_v, "--cache-type-v")
    check_cache_type(cfg, tk, "--cache-type-k")
    check_cache_type(cfg, tv, "--cache-type-v")
    return tk, tv


def make_plan(g, cfg: ModelConfig, specs, o: Options, n_ctx: int, n_threads: int) -> Planned:
    """Budget -> Plan, from sizes and calibration only (no weight is read). When the context was
    not given (o.n_ctx is None) and the default does not fit, the largest context that does, in
    multiples of 256 down to MIN_DEFAULT_CTX; an explicit one that does not fit is refused."""
    try:
        return _make_plan(g, cfg, specs, o, n_ctx, n_threads)
    except FlexInferError:
        if o.n_ctx is not None or n_ctx <= MIN_DEFAULT_CTX:
            raise
    lo, hi = MIN_DEFAULT_CTX // 256, n_ctx // 256  # in units of 256 cells: lo fits? hi does not
    best = _make_plan(g, cfg, specs, o, lo * 256, n_threads)  # refused here: nothing fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            best, lo = _make_plan(g, cfg, specs, o, mid * 256, n_threads), mid
        except FlexInferError:
            hi = mid
    return best


def _make_plan(g, cfg: ModelConfig, specs, o: Options, n_ctx: int, n_threads: int) -> Planned:
    """The plan at one context.

    A prompt batch's compute buffer grows with the batch (the 7B: 0.2 MB per token, 100 MB at
    512). Where rows are locked (flexinfer, sync) the plan lends it resident rows that are read
    back after the prompt (planner.py), so decoding does not pay for it and llama.cpp's 512 stays
    the batch. Elsewhere (prefetch) it is charged all along: when weights stream and the caller
    left n_ubatch open, the batch shrinks to the tokens whose compute hides one pass of reads,
    t_io / (t_cpu / PREFILL_SPEEDUP), but not below MIN_UBATCH (small batches run the kernels less
    efficiently: 32-64 tokens cost 14-16% of prompt speed). A budget too small for the default
    batch's buffer tries smaller ones, down to MIN_UBATCH, before it is refused."""
    budget, source = resolve_budget(o.memory_budget)
    n_cells = n_ctx * o.n_seq
    types = _cache_types(cfg, o)
    ubatch = max(min(o.n_ubatch or DEFAULT_UBATCH, n_cells), o.n_seq)
    by_ctx = _kv_and_masks(cfg, n_ctx, o.n_seq, ubatch, types)[1]
    if by_ctx > budget:  # checked before anything sized by the context is allocated
        least = by_ctx + rss_bytes() + HEADROOM
        raise FlexInferError(f"--memory-budget: {_gb(budget)} ({source}) is below the minimum "
                             f"working set for {os.path.basename(g.path)} at context {n_ctx}"
                             f"{_seqs(o.n_seq)}: at least {_gb(least)}; the KV cache and "
                             f"attention mask alone need {_gb(by_ctx)} (try a smaller --ctx-size)")
    repack = o.repack and o.offload != "mmap"  # a mapping of the file cannot be repacked
    owned = frozenset(ex.expert_names(specs)) if (
        cfg.n_expert and o.experts == "auto" and o.offload != "mmap") else frozenset()
    mats = [m for m in matrices(g, cfg, specs,
                                lambda info: repack and ggml_ops.repacks(info.type, info.shape))
            if m.name not in owned]
    least = ex.min_capacity(g, owned) + ex.STAGE if owned else 0  # the expert cache's floor
    ahead = ex.prefetch_bytes(g, owned) if owned and o.expert_prefetch else 0  # its read-ahead
    gc.collect()  # the parser's and tokenizer builder's garbage, then the heap it leaves behind
    ggml_ops.trim_heap()
    runtime = rss_bytes()  # interpreter, libraries, tokenizer: resident now
    mach = machine.calibrate(g, repack, n_threads, room=budget - runtime - HEADROOM)

    measured: dict[int, tuple[int, int]] = {}

    def planned(ub: int, at: int = budget) -> Plan:
        if ub not in measured:
            measured[ub] = measure_compute_bytes(g, cfg, ARCHS[cfg.arch], specs, n_ctx, ub,
                                                 n_threads, o.n_seq, *types, split=bool(owned))
        keep, prompt = measured[ub]
        kv = _kv_and_masks(cfg, n_ctx, o.n_seq, ub, types)[0]  # sliding layers' rings: n_swa + ub
        growth = (kv_growth(cfg, n_cells, *types, swa=swa_total(cfg, n_ctx, o.n_seq, ub))
                  if o.offload in ("flexinfer", "sync") else ())
        fixed_parts = {  # what the weights cannot use while decoding, in bytes
            "runtime": runtime, "kv_cache": kv, "compute": keep,
            "vectors": sum(g.tensors[s.name].nbytes for s in specs
                           if len(s.shape) == 1 or not s.quantizable),  # F32-only: resident
            "headroom": HEADROOM,
            **({"experts": least + ahead} if owned else {}),  # one layer's experts, staging
            # buffers, the read-ahead's host routers
        }
        p = plan(mats, at, sum(fixed_parts.values()), mach, mode=o.offload,
                 preserve=o.preserve, balance=o.balance, window=o.prefetch_window,
                 kv_growth=growth, prompt_extra=prompt)
        p = dataclasses.replace(p, fixed_parts={**fixed_parts, "prompt_compute": prompt})
        return _expert_plan(p, at, g, cfg, o, owned, least, repack, mach) if owned else p

    while True:
        try:
            p = planned(ubatch)
            break
        except BudgetError as e:
            if o.n_ubatch is None and ubatch > MIN_UBATCH:
                ubatch = max(MIN_UBATCH, ubatch // 2, o.n_seq)  # a smaller prompt buffer may fit
                continue
            raise FlexInferError(f"--memory-budget: {_gb(e.budget)} is below the minimum working "
                                 f"set for {os.path.basename(g.path)} at context {n_ctx}"
                                 f"{_seqs(o.n_seq)}: {_gb(e.minimum)} (try a smaller "
                                 "--ctx-size)") from None
    if o.n_ubatch is None and p.streamed_bytes and p.mode == "prefetch":  # no loan there
        need = p.t_io / (p.t_cpu_bound / PREFILL_SPEEDUP)  # tokens whose compute hides the reads
        small = MIN_UBATCH
        while small < need and small < ubatch:
            small *= 2
        if small < ubatch:  # less compute memory: fits wherever the larger batch did
            p, ubatch = planned(small), small
    return Planned(p, budget, source, mach, repack, ubatch, n_ctx,
                   lambda at: planned(ubatch, at), owned, bool(ahead))


def _expert_plan(p: Plan, budget: int, g, cfg: ModelConfig, o: Options, owned, least: int,
                 repack: bool, mach: Machine) -> Plan:
    """The plan with its expert cache: its floor (one layer's experts) and whatever the dense plan
    left of the budget (or --expert-cache), and the cache's cost (planner.with_experts)."""
    # what a prompt batch's buffer takes beyond the loan the dense rows give it is not spare:
    # the cache keeps its experts while a prompt runs
    short = max(0, p.prompt_extra_bytes - p.loan_bytes)
    capacity = least - ex.STAGE + max(0, budget - p.total_bytes() - short)
    if o.expert_cache is not None:
        capacity = o.expert_cache
    capacity = max(least - ex.STAGE, capacity)  # ExpertStore raises it to the floor too
    return with_experts(p, ex.expert_cost(g, cfg, owned, capacity, repack, ex.counts_path(g),
                                          o.n_seq, o.expert_prefetch), mach, capacity)


def _kv_and_masks(cfg: ModelConfig, n_ctx: int, n_seq: int, ubatch: int, types) -> tuple[int, int]:
    """(the KV cache's bytes, those plus the f16 attention masks' rows): the sliding layers hold
    rings of W = n_swa + ubatch cells per sequence (kv_cache.swa_cells) and have a mask over them;
    a micro-batch holds ubatch + n_seq - 1 tokens (engine.n_batch)."""
    n_cells, swa = n_ctx * n_seq, swa_total(cfg, n_ctx, n_seq, ubatch)
    kv = kv_bytes(cfg, n_cells, *types, swa=swa)
    return kv, kv + 2 * (n_cells + swa) * (ubatch + n_seq - 1)


def _seqs(n_seq: int) -> str:
    return f" with {n_seq} sequences" if n_seq > 1 else ""


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def load(path, **options) -> Model:
    """Load a GGUF model. Options: n_ctx, n_threads, memory_budget, offload, balance, preserve,
    prefetch_window, repack, n_ubatch, direct_io, n_seq, cache_type_k, cache_type_v,
    progress (see Options)."""
    return Model(path, **options)
