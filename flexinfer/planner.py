"""plan(tensors, budget, fixed, machine) -> Plan: which weight rows stay resident, the prefetch window,
and the predicted tokens/s. A pure function of sizes and machine speeds: nothing here touches a file.

The budget is spent as FlexInfer spends it:
- balanced locking: every layer streams about the same number of bytes S, so I/O and compute stay
  overlapped layer after layer (fixing whole layers in memory leaves I/O waits: --no-balance);
- flexible preservation: inside each layer, which tensors (by role) stay resident follows a priority
  order; FFN-first at high budgets, attention-first at low ones. Rather than a fixed threshold, every
  candidate order is simulated with the cost model and the fastest is kept (`preserve="auto"`).
- granularity is blocks of rows: a tensor keeps rows [0, r) resident and streams rows [r, N), r a
  block boundary (block_rows: blocks of at most STREAM_CHUNK bytes, whole ROW_ALIGN groups, so
  the 8x8-interleaved repacked layout stays whole). Output rows are independent dot products, so
  splitting rows changes no bit of the result. Blocks are fixed at load (weights.py), so a plan at
  any other budget (Model.set_memory_budget) is reached by moving whole blocks (residency.py).

Memory, for a per-layer streamed amount S:
  fixed + resident(S) + ring(S) + bounce(S) <= budget, with slot(S) = max_l streamed_l plus, for
  each streamed piece, the block alignment O_DIRECT needs, and ring(S) = slot(S) + (window - 1) *
  ahead(S): one layer while it is computed, and room to read `ahead` bytes of the next meanwhile
  (a piece at least; what the disk reads in one layer's compute time if more; at most a layer).
Pieces are read straight into the ring, then repacked in place through a small bounce buffer
(weights.py, prefetch.py).
A larger S frees resident bytes faster than it grows the slots (there are more layers than slots),
so the smallest S that fits is found by bisection, up to the S where that stops being true (a
layer much larger than the rest, see _solve).

Stages (a growing KV cache): the plan above is what holds at the full context, with the whole KV
cache counted. But the cache is charged as it is written, position after position, and most runs
use a fraction of the context (a 7B at llama.cpp's default 4096 has a 2.1 GB cache). So the caller
may give `kv_growth`: for some position counts P < n_ctx, the cache bytes still unwritten while at
most P positions are held. Each such stage keeps extra rows resident in those bytes, by the same
priority order, and always a superset of the next stage's rows: moving on only releases rows (the
engine frees their pages and streams them from then on; nothing is read back in). A run
starts in the first stage; the plan's own fields describe the last (the whole context).

The prompt loan: a prompt batch needs far more compute memory than a decode step (the 7B: 25 MB at
128 tokens, 50 MB at 512, against 0.5 MB), and only while it runs. So `fixed` counts a decode
step's, and the plan is first made as if the prompt's were charged too: those rows (`prompt_rows`)
are what stays resident during a prompt. Then it keeps, by the same priority order, as many more
rows as the decode room allows (the loan). The engine releases the loan before a prompt batch,
streams it with the rest while the batch runs, and reads it back once before decoding: one read of
a few tens of MB per prompt, instead of streaming that much more on every decoded token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

ROW_ALIGN = 16  # rows; repacked Q4_0/Q4_K interleave 8 rows, 16 keeps every kernel's tiling whole
STREAM_CHUNK = 8 << 20  # bytes: a streamed part is read in pieces of at most this (two 4 MiB
# reads each, direct_io.READ_CHUNK), so that the converter repacks one piece while the next is read
PIECE_SLACK = 8192  # bytes a piece may take in its slot beyond its own: O_DIRECT reads whole
# 4096-byte blocks, so the piece lands at its file offset's place inside the first block
CONVERT_CHUNK = 512 << 10  # bytes: a repacked piece is converted in place this many rows at a time,
# each group copied out to a bounce buffer first (ggml repacks from one buffer into another); small
# enough to stay in the core's L2 cache
CREDIT_FLOOR = 0.6  # a read the disk refunds a pause for still takes this share of its time: under
# a 0.5 GB/s blkio cap, a reader pausing 40-75 ms between 75 MB reads read at 1.35-1.71x the cap
# (docs/benchmarks.md, scripts/cap_burst.py)
CAP_PAUSE_CREDIT_S = 0.1  # s: a blkio cap refunded pauses of up to 75 ms almost whole (62 of 75 ms)
# and 150 ms pauses not at all (a new throttle slice starts), measured as above
POLICIES = {
    "ffn": ("ffn_gate", "ffn_up", "ffn_down", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output",
            "output"),
    "attn": ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
             "output"),
    "kv-ffn": ("attn_k", "attn_v", "attn_qkv", "ffn_gate", "ffn_up", "ffn_down", "attn_q", "attn_output",
               "output"),
    "ffn-attn": ("ffn_down", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up",
                 "output"),
}  # attn_qkv: phi3's fused q|k|v, an attention matrix; phi3's fused gate|up is ffn_up


@dataclass(frozen=True)
class PlanTensor:
    name: str  # GGUF name; "output.weight" or the tied "token_embd.weight" for the head
    layer: int  # block index; n_layer for the output head
    kind: str  # "ffn_up", "attn_q", ... "output": the policy key
    rows: int  # ne1: rows of the matrix
    row_bytes: int  # bytes per row on disk
    repacked: bool  # converted to the interleaved layout on upload (CPU work per streamed byte)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass(frozen=True)
class Machine:
    disk_bw: float  # bytes/s, O_DIRECT sequential reads
    compute_bw: float  # weight bytes/s a decode step multiplies through, all resident
    repack_bw: float  # bytes/s the converter repacks
    read_latency: float = 100e-6  # s per read request, on top of the bandwidth
    pause_credit_s: float = 0.0  # a reader's pause up to this long is refunded by the next reads
    # (they may run faster than disk_bw, down to CREDIT_FLOOR of their time): 0 for a real disk,
    # CAP_PAUSE_CREDIT_S under a blkio read cap, whose token bucket lends what a pause saved
    expert_bw: float = 0.0  # bytes/s an expert cache's misses read at, measured as they come: a
    # layer's few slabs at random offsets after the computing thread's pause (the MoE bench's
    # measure_expert_reads with a pause). 0: unmeasured, disk_bw less what a cap refunds


class RingSpec(NamedTuple):
    """What sizes the prefetcher's ring beyond the rows: the machine, for the lookahead wanted:
    what the disk reads while a layer computes (its repacking included: the converter shares the
    cores)."""

    machine: Machine


@dataclass(frozen=True)
class Stage:
    """While the KV cache holds at most `positions` positions, `kv_unused` bytes of it are not yet
    charged and hold extra resident rows: resident_rows here is a superset of every later stage's."""

    positions: int
    kv_unused: int
    resident_rows: dict[str, int]
    resident_bytes: int
    streamed_per_layer: tuple[int, ...]
    t_io: float
    t_cpu: float
    predicted_s: float
    planned_bytes: int  # everything planned, at this stage

    @property
    def streamed_bytes(self) -> int:
        return sum(self.streamed_per_layer)

    @property
    def predicted_tok_s(self) -> float:
        return 1.0 / self.predicted_s if self.predicted_s > 0 else float("inf")

    def total_bytes(self) -> int:
        return self.planned_bytes


@dataclass(frozen=True)
class Plan:
    mode: str  # flexinfer | prefetch | sync | mmap | resident
    budget_bytes: int
    fixed_bytes: int  # runtime overhead + KV cache + compute buffers, measured by the caller
    resident_rows: dict[str, int]  # name -> r: rows [0, r) resident, [r, rows) streamed
    window: int  # slots in the prefetch ring (0: nothing streams)
    slot_bytes: int  # the streamed pieces of any one layer, block-aligned
    ring_bytes: int  # what the prefetcher reads into: a layer, and `window - 1` times a lookahead
    bounce_bytes: int  # the converter's buffer for repacking in place
    resident_bytes: int  # weight bytes kept in memory
    streamed_per_layer: tuple[int, ...]  # bytes streamed for block 0..n_layer-1 and the head
    policy: str  # the preservation order chosen
    t_io: float  # s per token reading streamed bytes
    t_cpu: float  # s per token computing (plus repacking streamed bytes)
    predicted_s: float  # s per token, simulated
    t_io_bound: float  # the paper's bound: (model bytes - budget) / disk bandwidth
    t_cpu_bound: float  # ... and all-resident compute time per token
    layer_bytes: tuple[int, ...]  # matrix bytes of block 0..n_layer-1 and the head
    fixed_parts: dict = field(default_factory=dict)  # the caller's breakdown of fixed_bytes
    stages: tuple[Stage, ...] = ()  # earlier stages of a growing KV cache, fewest positions first
    prompt_rows: dict = field(default_factory=dict)  # resident while a prompt batch runs (the
    # rows beyond them are the loan); empty: the same as resident_rows
    prompt_extra_bytes: int = 0  # compute memory a prompt batch takes beyond `fixed_bytes`
    loan_bytes: int = 0  # weight bytes resident while decoding, released while a prompt runs
    expert_cache_bytes: int = 0  # MoE: the expert cache's capacity (with_experts, experts.py)
    expert_hit_rate: float = 0.0  # MoE: the share of a decode token's picks expected cached
    expert_pin_share: float = 0.0  # MoE: the share of the cache pinned (experts.pin_share)

    @property
    def first(self):
        """What a run starts with: the first stage, or the plan itself when it has none."""
        return self.stages[0] if self.stages else self

    @property
    def streamed_bytes(self) -> int:
        return sum(self.streamed_per_layer)

    @property
    def bound_tok_s(self) -> float:
        return 1.0 / max(self.t_io_bound, self.t_cpu_bound)

    @property
    def predicted_tok_s(self) -> float:
        return 1.0 / self.predicted_s if self.predicted_s > 0 else float("inf")


    def total_bytes(self) -> int:
        return self.fixed_bytes + self.resident_bytes + self.ring_bytes + self.bounce_bytes


class BudgetError(ValueError):
    """The budget is below the minimum working set; `minimum` says how much is needed."""

    def __init__(self, minimum: int, budget: int):
        self.minimum, self.budget = minimum, budget
        super().__init__(f"budget {budget} bytes is below the minimum working set {minimum} bytes")


def _layers(tensors: list[PlanTensor]) -> dict[int, list[PlanTensor]]:
    out: dict[int, list[PlanTensor]] = {}
    for t in tensors:
        out.setdefault(t.layer, []).append(t)
    return out


def _fill(layer: list[PlanTensor], keep: int, order: tuple[str, ...]) -> tuple[dict[str, int], int]:
    """Resident rows per tensor when up to `keep` bytes of this layer stay resident, by priority
    order, in whole blocks (block_rows); and the bytes of `keep` left over, less than a block of
    every tensor not kept whole. What the first tensor cut short cannot use (less than one of
    its blocks) goes on to the next ones in the order, so that few bytes are carried."""
    rank = {k: i for i, k in enumerate(order)}
    rows = {}
    for t in sorted(layer, key=lambda t: rank.get(t.kind, len(order))):
        r = min(t.rows, max(0, keep) // t.row_bytes)
        r = t.rows if r == t.rows else r - r % block_rows(t.rows, t.row_bytes)
        rows[t.name] = r
        keep -= r * t.row_bytes
    return rows, max(0, keep)


def _assign(layers, target_stream: int, order, whole_layers: bool) -> dict[str, int]:
    """Balanced: every layer streams about target_stream bytes. Rows go in whole blocks, so what a
    layer cannot keep of its share (less than a block) is carried to the next layer: the total
    resident is the balanced one within a block, and no layer streams a block more than another
    would."""
    rows = {}
    if whole_layers:  # --no-balance: keep whole layers from the first, stream the rest
        budget = target_stream  # here: resident bytes to place, first layers first
        for l in sorted(layers):
            size = sum(t.nbytes for t in layers[l])
            got, _ = _fill(layers[l], min(size, budget), order)
            rows.update(got)
            budget -= min(size, budget)  # the first layer cut short ends it: whole layers only
        return rows
    carry = 0
    for l in sorted(layers):
        ts = layers[l]
        size = sum(t.nbytes for t in ts)
        got, carry = _fill(ts, max(0, size - target_stream) + carry, order)
        rows.update(got)
    return rows


def _streamed(layers, rows) -> dict[int, int]:
    return {l: sum((t.rows - rows[t.name]) * t.row_bytes for t in ts) for l, ts in layers.items()}


def refunded(io: float, idle: float, credit: float) -> float:
    """A read of io seconds after the reader idled `idle` seconds, on a disk that refunds pauses
    up to `credit` seconds (a blkio cap; 0: a real disk, which refunds nothing)."""
    if not credit or idle <= 0 or idle > credit:
        return io
    return max(io - idle, io * CREDIT_FLOOR)


def simulate(loads: list[tuple[float, float]], computes: list[float], window: int,
             tokens: int = 5, early: list[float] | None = None,
             lag: list[float] | None = None, credit: float = 0.0) -> float:
    """Seconds per token in steady state for a layer pipeline: one reader thread (io), one converter
    (repack, which shares the cores with compute), compute in layer order, `window` layers ahead.

    Only layers with io > 0 count, as in the prefetcher: the j-th streamed layer may be read once
    the (j - window)-th streamed layer has been computed, so the reader works ahead through
    resident layers (and across the token boundary) instead of waiting for them. With a ring
    smaller than `window` layers, only the fraction early[j] of layer j fits before the previous
    streamed layer is released; the rest is read after that layer is computed. The converter
    works piece by piece behind the reader: lag[j] of layer j's conversion is left when its last
    read ends (1: all of it, as if it waited for the whole layer).
    The pipeline can settle into a cycle longer than one token, so the first token (the warm-up)
    is dropped and the others are averaged. credit: pauses of the reader up to that long are
    refunded by its next read (refunded(); a blkio cap does that, a disk does not)."""
    assert tokens >= 2, "one warm-up token, then at least one measured"
    n = len(computes)
    read_end = conv_end = 0.0
    comp_end: list[float] = []
    streamed: list[int] = []  # positions k of the streamed layers so far
    for k in range(n * tokens):
        io, conv = loads[k % n]
        ready = 0.0
        if io > 0:
            slot_free = comp_end[streamed[-window]] if window and len(streamed) >= window else 0.0
            part = early[k % n] if early else 1.0
            begin = max(read_end, slot_free)
            read_end = begin + refunded(io * part, begin - read_end, credit)
            if part < 1.0:
                read_end = max(read_end, comp_end[streamed[-1]] if streamed else 0.0)
                read_end += io * (1.0 - part)
            conv_end = max(conv_end + conv, read_end + conv * (lag[k % n] if lag else 1.0))
            ready = conv_end
            streamed.append(k)
        start = max(ready, comp_end[-1] if comp_end else 0.0)
        comp_end.append(start + computes[k % n] + conv)
    return (comp_end[-1] - comp_end[n - 1]) / (tokens - 1)


def _cost(layers, rows, machine: Machine, window: int, sync: bool,
          ring: int = 0) -> tuple[float, float, float]:
    loads, computes, sizes = [], [], []
    for l in sorted(layers):
        ts = layers[l]
        streamed = [(t.rows - rows[t.name]) * t.row_bytes for t in ts]
        io = sum(streamed) / machine.disk_bw + sum(1 for s in streamed if s) * machine.read_latency
        conv = sum(s for s, t in zip(streamed, ts) if t.repacked) / machine.repack_bw
        loads.append((io, conv))
        computes.append(sum(t.nbytes for t in ts) / machine.compute_bw)
        sizes.append(sum(streamed))
    t_io = sum(io for io, _ in loads)
    t_cpu = sum(computes) + sum(c for _, c in loads)
    if sync:
        return t_io, t_cpu, _sync_time(loads, computes, machine.pause_credit_s)
    lag = [min(1.0, STREAM_CHUNK / s) if s else 1.0 for s in sizes]  # the last piece's share
    return t_io, t_cpu, simulate(loads, computes, window, early=_early(sizes, window, ring),
                                 lag=lag, credit=machine.pause_credit_s)


def _sync_time(loads, computes, credit: float) -> float:
    """Seconds per token reading each layer, then converting and computing it, on one thread: the
    sum of everything, less what a disk that refunds pauses (a blkio cap) gives back for the
    compute between reads (the second of two tokens, so the first read's pause counts too)."""
    if not credit:
        return sum(io for io, _ in loads) + sum(computes) + sum(c for _, c in loads)
    now = read_end = start = 0.0
    for k in range(2 * len(loads)):
        if k == len(loads):
            start = now
        (io, conv), comp = loads[k % len(loads)], computes[k % len(loads)]
        if io > 0:
            now = read_end = now + refunded(io, now - read_end, credit)
        now += conv + comp
    return now - start


def _early(sizes: list[int], window: int, ring: int) -> list[float] | None:
    """For each streamed layer, the fraction of it the ring holds while the `window - 1` streamed
    layers before it are still in use (simulate); None when a ring of `ring` bytes always does."""
    streamed = [s for s in sizes if s]
    if not ring or not streamed or window < 2:
        return None
    out, prev = [], streamed[-(window - 1):]  # the last ones, before the first
    for s in sizes:
        if s:
            out.append(min(1.0, max(0.0, ring - sum(prev)) / s))
            prev = (prev + [s])[-(window - 1):]
        else:
            out.append(1.0)
    return out if min(out) < 1.0 else None


def plan(tensors: list[PlanTensor], budget: int, fixed: int, machine: Machine, *,
         mode: str = "flexinfer", window: int | None = None, **kw) -> Plan:
    """The plan for `mode`. The flexinfer mode weighs every schedule it may run, the sync one
    included (read a layer, then compute it), and keeps the fastest by the cost model: its plan
    then says mode "sync" and runs as sync does, so flexinfer is never predicted slower than
    sync (issue 18). A fixed window leaves the schedule to the caller."""
    best = _plan(tensors, budget, fixed, machine, mode=mode, window=window, **kw)
    if mode != "flexinfer" or window is not None:
        return best
    try:
        alt = _plan(tensors, budget, fixed, machine, mode="sync", **kw)
    except BudgetError:
        return best
    return alt if alt.predicted_s < best.predicted_s else best


def _plan(tensors: list[PlanTensor], budget: int, fixed: int, machine: Machine, *,
          mode: str = "flexinfer", preserve: str = "auto", balance: bool = True,
          window: int | None = None, kv_growth: tuple[tuple[int, int], ...] = (),
          prompt_extra: int = 0) -> Plan:
    """Choose resident rows and the window for `tensors` (the matrices of every layer and the head;
    vectors are in `fixed`). Raises BudgetError when even streaming everything does not fit.
    kv_growth: (positions, KV bytes not yet charged at that many positions), fewest first; the
    stages they allow are in Plan.stages. prompt_extra: the compute memory a prompt batch takes
    beyond the decode step's that `fixed` counts; lent by resident rows where rows are locked
    (module docstring)."""
    layers = _layers(tensors)
    total = sum(t.nbytes for t in tensors)
    t_cpu_bound = total / machine.compute_bw
    t_io_bound = max(0, total - budget) / machine.disk_bw  # the paper's bound: model - budget
    spec = RingSpec(machine)

    def finish(rows, win, policy, fx, slot_rows=None):
        """The plan that keeps `rows` resident; slots sized for slot_rows' streaming (a prompt's,
        which streams the loan too)."""
        streamed = _streamed(layers, rows)
        most = _streamed(layers, slot_rows) if slot_rows else streamed
        slot = _slot(layers, slot_rows or rows) if any(most.values()) else 0
        win = min(win, sum(1 for s in most.values() if s)) if slot else 0
        ring = _ring(layers, slot_rows or rows, spec, win) if slot else 0
        t_io, t_cpu, pred = _cost(layers, rows, machine, max(win, 1), mode == "sync", ring)
        if mode == "mmap":  # page faults block the computing thread: sync I/O of what misses
            t_io = max(0, total - max(0, budget - fx)) / machine.disk_bw
            pred = t_io + t_cpu
        return Plan(
            mode=mode, budget_bytes=budget, fixed_bytes=fx, resident_rows=rows, window=win,
            slot_bytes=slot, ring_bytes=ring, bounce_bytes=_bounce(tensors) if mode != "mmap" else 0,
            resident_bytes=total - sum(streamed.values()),
            streamed_per_layer=tuple(streamed[l] for l in sorted(streamed)), policy=policy,
            t_io=t_io, t_cpu=t_cpu, predicted_s=pred, t_io_bound=t_io_bound,
            t_cpu_bound=t_cpu_bound,
            layer_bytes=tuple(sum(t.nbytes for t in layers[l]) for l in sorted(layers)))

    fx = fixed + prompt_extra  # what a prompt batch needs: the plan must hold then too
    all_rows = {t.name: t.rows for t in tensors}
    if mode == "mmap":  # the OS pages weights in; predicted as if the page cache kept
        return finish(all_rows, 0, "mmap", fx)  # budget - fixed bytes
    if mode != "prefetch" and fx + total + _bounce(tensors) <= budget:
        return finish(all_rows, 0, "all-resident", fx)
    # layers read ahead: the caller's, else for flexinfer the fastest of 1, 2 and 3 by the cost
    # model: a lookahead in the ring displaces resident rows, so it costs reads on every token,
    # and with compute short (or refunded, under a blkio cap) one layer at a time wins (issue 18);
    # more than there are layers would be unused
    wins = [window] if window else {"sync": [1], "flexinfer": [1, 2, 3]}.get(mode, [2])
    wins = sorted({min(w, len(layers)) for w in wins})
    orders = POLICIES if preserve == "auto" else {preserve: POLICIES[preserve]}
    if mode == "prefetch":  # asynchronous, nothing locked
        nothing = {t.name: 0 for t in tensors}
        minimum = fx + _ring(layers, nothing, spec, wins[0]) + _bounce(tensors)
        if minimum > budget:
            raise BudgetError(minimum, budget)
        return finish(nothing, wins[0], "none", fx)
    best, minimum = None, None
    for win in wins:
        for name, order in orders.items():
            rows, least = _solve(layers, tensors, budget - fx, win, order, balance, spec)
            minimum = fx + least if minimum is None else min(minimum, fx + least)
            if rows is None:
                continue
            cand = finish(rows, win, name if balance else f"{name}, whole layers", fx)
            if cand.total_bytes() <= budget and (best is None
                                                 or cand.predicted_s < best.predicted_s):
                best = cand
    if best is None:  # keeping everything resident always works, whatever the window
        raise BudgetError(min(minimum, fx + total + _bounce(tensors)), budget)
    order = POLICIES[best.policy.split(",")[0]]
    prompt = best.resident_rows
    if prompt_extra:  # decode keeps more: the loan, released while a prompt batch runs
        rows = _grow(layers, tensors, prompt, budget - fixed, best.window, order, balance, spec,
                     prompt)
        best = finish(rows, best.window, best.policy, fixed, slot_rows=prompt)
        best = dataclasses.replace(
            best, prompt_rows=prompt, prompt_extra_bytes=prompt_extra,
            loan_bytes=best.resident_bytes - (total - sum(_streamed(layers, prompt).values())))
    if kv_growth:
        short = max(0, best.prompt_extra_bytes - best.loan_bytes)  # a prompt in an earlier stage
        # every stage counts the whole ring: the prefetcher goes round all of it, whatever a
        # stage streams (sized for the most streaming: the last stage's, or a prompt's)
        stages = _stages(layers, tensors, best, budget - short, kv_growth, machine, order, balance,
                         spec, prompt)
        best = dataclasses.replace(best, stages=stages)
    return best


def _grow(layers, tensors, base: dict[str, int], room: int, win: int, order, balance: bool,
          spec: RingSpec, slot_rows: dict[str, int]) -> dict[str, int]:
    """The most rows, by the priority order and always a superset of `base`, whose resident bytes,
    slots (sized for slot_rows' streaming) and bounce buffer fit in `room` (as _solve searches)."""
    total = sum(t.nbytes for t in tensors)

    def grown(x):  # balanced: x = bytes streamed per layer; else x = resident bytes
        fresh = _assign(layers, x, order, not balance)
        return {k: max(r, fresh[k]) for k, r in base.items()}

    def fits(x):
        return _used(layers, tensors, win, grown(x), spec, slot_rows) <= room

    if balance:  # the smallest per-layer stream that fits; base's always does
        largest = max(sum(t.nbytes for t in ts) for ts in layers.values())
        return grown(0 if fits(0) else _search(largest, 0, fits))
    kept = total - sum(_streamed(layers, base).values())
    return grown(total if fits(total) else _search(kept, total, fits))


def _stages(layers, tensors, last: Plan, budget: int, kv_growth, machine: Machine, order,
            balance: bool, spec: RingSpec, slot_rows) -> tuple[Stage, ...]:
    """Walk back from the full context: each earlier stage has `kv_unused` more bytes of room and
    keeps, on top of the next stage's rows, as many more as fit (_grow). The ring stays sized for
    slot_rows (the most streaming there is)."""
    out: list[Stage] = []
    nxt = last.resident_rows
    total = sum(t.nbytes for t in tensors)
    for positions, unused in sorted(kv_growth, reverse=True):
        room = budget - last.fixed_bytes + unused
        rows = _grow(layers, tensors, nxt, room, last.window, order, balance, spec, slot_rows)
        if rows == nxt:
            continue  # no room for another row group: the next stage starts right away
        streamed = _streamed(layers, rows)
        win = min(last.window, sum(1 for s in streamed.values() if s)) or 1
        t_io, t_cpu, pred = _cost(layers, rows, machine, win, last.mode == "sync", last.ring_bytes)
        used = _used(layers, tensors, last.window, rows, spec, slot_rows)
        out.append(Stage(positions, unused, rows, total - sum(streamed.values()),
                         tuple(streamed[l] for l in sorted(streamed)), t_io, t_cpu, pred,
                         last.fixed_bytes - unused + used))
        nxt = rows
    return tuple(reversed(out))


def block_rows(rows: int, row_bytes: int) -> int:
    """Rows per block of a matrix: the unit of residency (weights.py). A matrix is cut into
    ceil(bytes / STREAM_CHUNK) blocks of nearly equal rows, in whole ROW_ALIGN groups (the 7B's
    25 MB FFN matrices into 4 blocks of 2752 rows, its 9.4 MB attention ones into 2 of 2048); each
    block is resident or streamed as one piece, so blocks fixed at load serve every budget and the
    graphs built on them stay valid. A 3-D expert tensor (one plan row) is one block."""
    n = max(1, -(-rows * row_bytes // STREAM_CHUNK))
    step = -(-rows // n)
    return min(rows, -(-step // ROW_ALIGN) * ROW_ALIGN) if rows > 1 else 1


def block_starts(rows: int, row_bytes: int) -> range:
    """Where the blocks of a matrix begin (block_rows)."""
    return range(0, rows, block_rows(rows, row_bytes))


def convert_rows(row_bytes: int) -> int:
    """Rows repacked at a time through the bounce buffer: whole ROW_ALIGN groups, at most
    CONVERT_CHUNK bytes (or one group)."""
    return max(ROW_ALIGN, CONVERT_CHUNK // row_bytes // ROW_ALIGN * ROW_ALIGN)


def _bounce(tensors) -> int:
    """The converter's bounce buffer: one row group of the widest repacked matrix."""
    return max((min(t.rows, convert_rows(t.row_bytes)) * t.row_bytes for t in tensors
                if t.repacked), default=0)


def _slot(layers, rows) -> int:
    """One slot: the largest layer's streamed bytes plus PIECE_SLACK for each block they are read
    in (rows are resident in whole blocks, block_rows; a forced plan's odd boundary adds one)."""
    def need(t):
        n = t.rows - rows[t.name]
        return n * t.row_bytes + (-(-n // block_rows(t.rows, t.row_bytes)) + 1) * PIECE_SLACK \
            if n else 0
    return max(sum(need(t) for t in ts) for ts in layers.values())


def _ring(layers, rows, spec: RingSpec, win: int) -> int:
    """The prefetcher's ring for `rows` streaming with up to `win` layers ahead: one slot, and
    win - 1 times the lookahead: what the disk reads while the longest layer computes and
    repacks, but a piece at least (a piece is read whole) and a slot at most."""
    slot = _slot(layers, rows)
    if win <= 1:
        return slot
    m = spec.machine
    piece = max(min(t.rows - rows[t.name], block_rows(t.rows, t.row_bytes)) * t.row_bytes
                for ts in layers.values() for t in ts) + PIECE_SLACK
    busy = max(sum(t.nbytes / m.compute_bw + (t.rows - rows[t.name]) * t.row_bytes * t.repacked
                   / m.repack_bw for t in ts) for ts in layers.values())
    return slot + (win - 1) * min(slot, max(piece, int(m.disk_bw * busy)))


def _used(layers, tensors, win: int, rows, spec: RingSpec, slot_rows=None) -> int:
    """Bytes a plan takes beyond `fixed`: resident rows, the ring (sized for slot_rows' streaming,
    by default the rows' own) and the bounce buffer."""
    streamed = _streamed(layers, rows)
    resident = sum(t.nbytes for t in tensors) - sum(streamed.values())
    slot_rows = slot_rows or rows
    n_str = sum(1 for s in _streamed(layers, slot_rows).values() if s)
    if not n_str:
        return resident + _bounce(tensors)  # the store converts blocks it reads home through it
    return resident + _ring(layers, slot_rows, spec, min(win, n_str)) + _bounce(tensors)


def _solve(layers, tensors, room: int, win: int, order, balance: bool, spec: RingSpec):
    """(rows, least): the smallest per-layer streamed amount (or, unbalanced, the largest resident
    prefix) that fits in `room`, None when nothing fits; and the least room any choice needs.

    Balanced, the room used as a function of the streamed amount S falls while every layer larger
    than S gives up S and only `win` slots grow with it; once S passes the size of
    all but a few layers, it rises again. A tied head (token_embd as output) is often 8x a block
    (SmolLM2: 17.7 MB vs 2.2 MB), so streaming it whole would need a ring the size of the head
    and more. The bottom of that valley lies at a layer size; only the falling side below it is
    bisected."""
    def used(rows):
        return _used(layers, tensors, win, rows, spec)

    if not balance:
        least = used(_assign(layers, 0, order, True))
        if least > room:
            return None, least
        # resident bytes, whole layers first: the most that fit
        best = _search(0, sum(t.nbytes for t in tensors),
                       lambda x: used(_assign(layers, x, order, True)) <= room)
        return _assign(layers, best, order, True), least
    # below the size of the (win + 2)-th largest layer, more layers give up bytes than the slots
    # take: only the largest sizes can be the bottom
    sizes = sorted((sum(t.nbytes for t in ts) for ts in layers.values()), reverse=True)
    tops = set(sizes[:win + 2])
    least, hi = min((used(_assign(layers, s, order, False)), s) for s in tops)
    if least > room:
        return None, least
    best = _search(hi, 0, lambda s: used(_assign(layers, s, order, False)) <= room)
    return _assign(layers, best, order, False), least


def _search(good: int, bad: int, ok) -> int:
    """Bisect between a value that satisfies ok and one that need not, to within 4096 bytes of the
    boundary; returns the satisfying end (either side may be the larger)."""
    while abs(good - bad) > 4096:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good


# ---- mixtures of experts: the expert cache's cost (experts.py owns the *_exps tensors)

@dataclass(frozen=True)
class ExpertCost:
    """What a decode token costs in the expert cache: the K picked experts of every layer
    (active_bytes = K/E of the expert bytes; Qwen3-30B-A3B Q4_0: 8/128 x 16.3 GB = 1.02 GB), the
    share of them missing from the cache (1 - hit rate) read from disk, the layers where at least
    one of the K misses, and whether converting the missed slabs (repacking) waits on the
    computing thread: with one loader; two convert one while the other reads (experts.py)."""

    active_bytes: int
    miss_rate: float
    miss_layers: float  # layers a token with at least one missed expert
    converted: bool
    pin_share: float = 0.0  # of the cache pinned to the experts counted most (experts.pin_share)
    layers: int = 0  # layers with experts
    overlapped: bool = False  # the up and gate products compute while the misses are read
    # (ExpertStore.begin; not for gpt-oss's graphs, nor with the read-ahead)

    @property
    def missed_bytes(self) -> float:
        return self.active_bytes * self.miss_rate


MOE_LAYER_S = 0.5e-3  # s a token's MoE layer costs beyond multiplying its picked experts' bytes at
# compute_bw: two graphs a layer instead of one, the router's picks brought to the host, top-k and
# mul_mat_id's grouping. Fitted on Qwen3-30B-A3B synthetic (48 layers) on two machines: one
# multiplying at 41 GB/s (from cache and memory alike) computed 0.063-0.092 s a token where its
# 1.75 GB at that rate take 0.043; one at 13-15 GB/s from memory, 0.146-0.166 where they take
# 0.117-0.135. An extra ~24 ms a token fits both within 10%; the multiplier it replaces (2x the
# experts' bytes), fitted on the first, predicted 0.213 s on the second
MISS_LATENCY = 1.1e-3  # s a layer with misses waits beyond reading them at disk_bw: the first
# read's latency and the last slab's conversion, which nothing overlaps. Fitted on six capped
# runs (Qwen3-30B-A3B synthetic, uniform and zipf:1, 2/4/8 GB, disk capped at 1 GB/s; measured
# compute and cache hits) with the misses' bytes at disk_bw: 1.02 x their read plus 1.1 ms a
# layer gave every point within 10%; the read-ahead's overlap is not counted


OVERLAP_SHARE = 2 / 3  # of a layer's expert compute and of its misses' reads that can overlap: a
# step with misses reads them up, gate, down, computing the up product while the gate slabs are
# read and the gate product while the down slabs are (models/moe.py up_part ...)


def _miss_refund(read: float, layers: float, idle: float, credit: float) -> float:
    """Seconds of a token's miss reads (`read` seconds at disk_bw, in `layers` layers) that a disk
    refunding pauses of up to `credit` seconds (machine.pause_credit_s: a blkio cap) gives back.
    Between two layers' misses the disk idles, `idle` seconds a token in all (what the computing
    thread does that no read overlaps, MISS_LATENCY included); each such pause no longer than the
    credit lets the next layer's reads run faster than disk_bw, down to CREDIT_FLOOR of their time
    (refunded, as for a dense model's reads under the cap). 0 on a real disk."""
    if not credit or layers <= 0 or idle <= 0:
        return 0.0
    io = read / layers  # a layer's misses
    return layers * (io - refunded(io, idle / layers, credit))


def with_experts(p, cost: ExpertCost, machine: Machine, capacity: int = 0):
    """p (a Plan or a Stage) with the expert cache's time added to its cost model: computing the
    active experts (at compute_bw, MOE_LAYER_S a layer on top) and, on the computing thread, reading
    the missed ones (MISS_LATENCY a layer on top), converting them too with one loader, less what
    of both overlaps in a layer with misses (OVERLAP_SHARE of the shorter of its compute and its
    reads, when cost.overlapped). The misses read at machine.expert_bw where it was measured, and
    a token then reads no faster than disk_bw on average (a cap's rate: its token bucket lends a
    layer's few slabs after a pause the disk's own speed, never more than the cap over time);
    else at disk_bw, less what a blkio cap refunds of the reads for the disk's pauses between them
    (_miss_refund; none on a real disk). A Plan's bound becomes the MoE bound, 1 / max(T_cpu,
    missed bytes / disk_bw), with the active experts at compute_bw; it records the cache's
    `capacity` (expert_cache_bytes)."""
    t_cpu = cost.active_bytes / machine.compute_bw + cost.layers * MOE_LAYER_S
    sustained = cost.missed_bytes / machine.disk_bw
    read = cost.missed_bytes / machine.expert_bw if machine.expert_bw else sustained
    latency = cost.miss_layers * MISS_LATENCY
    t_io = read + latency
    conv = cost.missed_bytes / machine.repack_bw if cost.converted else 0.0
    hidden = 0.0
    if cost.overlapped and cost.layers and cost.miss_layers:
        per_read = read / cost.miss_layers  # a layer with misses
        hidden = cost.miss_layers * OVERLAP_SHARE * min(t_cpu / cost.layers, per_read)
    # the disk idles while the computing thread does what no read overlaps: the dense part too,
    # unless it streams (then the disk reads it meanwhile)
    dense = p.t_cpu if not p.t_io else 0.0
    predicted = p.predicted_s + t_cpu + t_io + conv - hidden
    if machine.expert_bw:  # measured as misses read: no refund, and no faster than disk_bw
        predicted = max(predicted, p.t_io + sustained)
    else:
        predicted -= _miss_refund(read, cost.miss_layers, dense + t_cpu + conv - hidden + latency,
                                  machine.pause_credit_s)
    out = dataclasses.replace(p, t_cpu=p.t_cpu + t_cpu + conv, t_io=p.t_io + t_io,
                              predicted_s=predicted)
    if isinstance(p, Plan):
        out = dataclasses.replace(out, t_cpu_bound=p.t_cpu_bound + cost.active_bytes /
                                  machine.compute_bw, expert_cache_bytes=capacity,
                                  expert_hit_rate=1.0 - cost.miss_rate,
                                  expert_pin_share=cost.pin_share,
                                  t_io_bound=p.t_io_bound + sustained,
                                  stages=tuple(with_experts(s, cost, machine) for s in p.stages))
    return out
