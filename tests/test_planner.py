"""Planner invariants: a pure function of sizes, so every claim is checked on model shapes alone.

Shapes: Llama-2-7B in Q4_0 (32 identical blocks, a head smaller than a block), a SmolLM2-135M-like
Q4_1 model whose tied head (token_embd, 17.7 MB) is 8x a block (2.2 MB), and a mixed-quant model
(every other block has Q6_K attn_v/ffn_down, so blocks differ in size; a head of 32003 rows, not a
multiple of ROW_ALIGN). Machine speeds are those of the brief: 1.6 GB/s disk, 14 GB/s compute,
8 GB/s repack.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flexinfer import planner
from flexinfer.planner import (PIECE_SLACK, POLICIES, ROW_ALIGN, STREAM_CHUNK, BudgetError,
                               Machine, PlanTensor, block_rows, plan, simulate)

MACHINE = Machine(disk_bw=1.6e9, compute_bw=14e9, repack_bw=8e9)
ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")
FFN = ("ffn_gate", "ffn_up", "ffn_down")


def _t(layer, kind, rows, row_bytes, repacked=True, name=None):
    return PlanTensor(name or f"blk.{layer}.{kind}.weight", layer, kind, rows, row_bytes, repacked)


def llama7b() -> list[PlanTensor]:
    """4096 x 4096 Q4_0 rows are 128 blocks of 18 bytes = 2304; ffn_down rows (11008) are 6192."""
    out = []
    for il in range(32):
        out += [_t(il, k, 4096, 2304) for k in ATTN]
        out += [_t(il, "ffn_gate", 11008, 2304), _t(il, "ffn_up", 11008, 2304),
                _t(il, "ffn_down", 4096, 6192)]
    return out + [_t(32, "output", 32000, 2304, name="output.weight")]


def smollm2() -> list[PlanTensor]:
    """n_embd 576 (Q4_1 rows: 18 blocks of 20 bytes = 360), n_ff 1536 (ffn_down rows 960), GQA 9/3
    heads, tied head of 49152 rows; Q4_1 is not repacked."""
    out = []
    for il in range(30):
        out += [_t(il, "attn_q", 576, 360, False), _t(il, "attn_k", 192, 360, False),
                _t(il, "attn_v", 192, 360, False), _t(il, "attn_output", 576, 360, False),
                _t(il, "ffn_gate", 1536, 360, False), _t(il, "ffn_up", 1536, 360, False),
                _t(il, "ffn_down", 576, 960, False)]
    return out + [_t(30, "output", 49152, 360, False, name="token_embd.weight")]


def mixed() -> list[PlanTensor]:
    """Q4_K_M-like: even blocks keep attn_v and ffn_down in Q6_K (3360 / 9030 bytes a row)."""
    out = []
    for il in range(12):
        big = il % 2 == 0
        out += [_t(il, "attn_q", 4096, 2304), _t(il, "attn_k", 1024, 2304),
                _t(il, "attn_v", 1024, 3360 if big else 2304), _t(il, "attn_output", 4096, 2304),
                _t(il, "ffn_gate", 11008, 2304), _t(il, "ffn_up", 11008, 2304),
                _t(il, "ffn_down", 4096, 9030 if big else 6192, repacked=not big)]
    return out + [_t(12, "output", 32003, 3360, False, name="output.weight")]


SHAPES = {"llama7b": (llama7b(), 300_000_000), "smollm2": (smollm2(), 12_000_000),
          "mixed": (mixed(), 150_000_000)}  # (tensors, fixed bytes)


def total(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def budget_at(shape: str, frac: float) -> tuple[list[PlanTensor], int, int]:
    tensors, fixed = SHAPES[shape]
    return tensors, fixed, fixed + int(frac * total(tensors))


def resident_per_layer(p) -> list[int]:
    return [b - s for b, s in zip(p.layer_bytes, p.streamed_per_layer)]


shapes = st.sampled_from(sorted(SHAPES))
fracs = st.floats(0.0, 1.1)
modes = st.sampled_from(["flexinfer", "sync", "prefetch"])
windows = st.sampled_from([None, 1, 3])
FAST = settings(max_examples=40, deadline=None)


# ---- never over budget
@FAST
@given(shapes, fracs, modes, st.booleans(), st.sampled_from(["auto", "ffn", "attn"]), windows)
def test_never_over_budget(shape, frac, mode, balance, preserve, window):
    tensors, fixed, budget = budget_at(shape, frac)
    kw = dict(mode=mode, preserve=preserve, balance=balance, window=window)
    try:
        p = plan(tensors, budget, fixed, MACHINE, **kw)
    except BudgetError as e:
        assert e.minimum > budget and e.budget == budget
        p = plan(tensors, e.minimum, fixed, MACHINE, **kw)  # the minimum it names is enough
        assert p.total_bytes() <= e.minimum
        return
    assert p.total_bytes() <= budget


def test_minimum_working_set_is_well_below_a_model_with_a_large_tied_head():
    """Streaming SmolLM2's 17.7 MB head whole would need 2 slots of it (35 MB, 42% of the model);
    keeping head rows resident and streaming a block's worth needs far less."""
    tensors, fixed = SHAPES["smollm2"]
    with pytest.raises(BudgetError) as e:
        plan(tensors, fixed + 1, fixed, MACHINE)
    assert e.value.minimum - fixed < 0.35 * total(tensors)
    with pytest.raises(BudgetError):
        plan(tensors, e.value.minimum - 1, fixed, MACHINE)
    p = plan(tensors, e.value.minimum, fixed, MACHINE)
    assert p.streamed_per_layer[-1] < p.layer_bytes[-1]  # head rows resident at the minimum


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("extra", [0, 1, 10**9])
def test_whole_model_that_fits_stays_resident(shape, extra):
    tensors, fixed = SHAPES[shape]
    bounce = planner._bounce(tensors)  # kept all along: the store converts blocks it reads home
    p = plan(tensors, fixed + total(tensors) + bounce + extra, fixed, MACHINE)
    assert (p.window, p.streamed_bytes, p.slot_bytes, p.ring_bytes) == (0,) * 4
    assert p.bounce_bytes == bounce
    assert p.resident_bytes == total(tensors)
    assert all(p.resident_rows[t.name] == t.rows for t in tensors)
    assert p.predicted_s == pytest.approx(total(tensors) / MACHINE.compute_bw)


# ---- slots, rows
@FAST
@given(shapes, fracs, st.booleans(), windows)
def test_every_streamed_layer_fits_its_slot(shape, frac, balance, window):
    """A slot holds the largest layer's streamed pieces, each with up to PIECE_SLACK of block
    alignment around it (tests/test_engine.py checks the store's real allocations against it)."""
    tensors, fixed, budget = budget_at(shape, frac)
    try:
        p = plan(tensors, budget, fixed, MACHINE, balance=balance, window=window)
    except BudgetError:
        return
    if not p.streamed_bytes:
        assert (p.slot_bytes, p.ring_bytes, p.window) == (0, 0, 0)
        assert p.bounce_bytes == planner._bounce(tensors)
        return
    pieces = max(sum(-(-(t.rows - p.resident_rows[t.name]) // block_rows(t.rows, t.row_bytes)) + 1
                     for t in tensors if t.layer == layer) for layer in {t.layer for t in tensors})
    assert max(p.streamed_per_layer) < p.slot_bytes
    assert p.slot_bytes <= max(p.streamed_per_layer) + PIECE_SLACK * pieces
    repacked = [t.nbytes for t in tensors if t.repacked]  # the bounce holds one row group of one
    assert p.bounce_bytes <= max(repacked, default=0) and (p.bounce_bytes > 0) == bool(repacked)
    assert p.resident_bytes + p.streamed_bytes == total(tensors)
    n_streamed = sum(1 for s in p.streamed_per_layer if s)
    assert (p.window >= 1) == (n_streamed > 0) and p.window <= n_streamed
    assert p.total_bytes() == fixed + p.resident_bytes + p.ring_bytes + p.bounce_bytes
    # the ring: one layer, and room to read ahead, a piece at least, a layer at most
    piece = max(min(t.rows - p.resident_rows[t.name], block_rows(t.rows, t.row_bytes)) * t.row_bytes
                for t in tensors)
    if p.window == 1:
        assert p.ring_bytes == p.slot_bytes
    else:
        assert p.slot_bytes + piece < p.ring_bytes <= p.window * p.slot_bytes


@FAST
@given(shapes, fracs, st.booleans(), st.sampled_from(sorted(POLICIES)))
def test_resident_rows_are_whole_blocks(shape, frac, balance, preserve):
    tensors, fixed, budget = budget_at(shape, frac)
    try:
        p = plan(tensors, budget, fixed, MACHINE, balance=balance, preserve=preserve)
    except BudgetError:
        return
    assert set(p.resident_rows) == {t.name for t in tensors}
    for t in tensors:
        r = p.resident_rows[t.name]
        step = block_rows(t.rows, t.row_bytes)
        assert 0 <= r <= t.rows and (r == t.rows or r % step == 0), (t.name, r)
        assert step % ROW_ALIGN == 0 or step == t.rows
        assert step * t.row_bytes <= STREAM_CHUNK + ROW_ALIGN * t.row_bytes or t.rows == 1


# ---- balance
@FAST
@given(shapes, st.floats(0.0, 1.0), st.sampled_from(sorted(POLICIES)))
def test_balanced_blocks_stream_the_same_bytes(shape, frac, preserve):
    """Every layer keeps `size - S` bytes, filled tensor by tensor in policy order in whole blocks
    (planner.block_rows); what a layer cannot place (less than a block) is carried to the next.
    So a layer that keeps anything streams S, less what it was carried, plus less than a block:
    layers differ by less than two of the largest blocks. A layer that keeps nothing streams its
    size, which is no more than the others."""
    tensors, fixed, budget = budget_at(shape, frac)
    try:
        p = plan(tensors, budget, fixed, MACHINE, balance=True, preserve=preserve)
    except BudgetError:
        return
    blocks = list(zip(p.streamed_per_layer[:-1], p.layer_bytes[:-1]))  # the head is apart
    tol = 2 * max(block_rows(t.rows, t.row_bytes) * t.row_bytes for t in tensors
                  if t.kind != "output")
    top = max(s for s, _ in blocks)
    keeping = [s for s, size in blocks if s < size]
    assert all(top - s < tol for s in keeping), (top, keeping, tol)
    assert all(s <= top for s, size in blocks)


@FAST
@given(shapes, st.floats(0.0, 1.0))
def test_unbalanced_keeps_whole_layers_from_the_first(shape, frac):
    tensors, fixed, budget = budget_at(shape, frac)
    try:
        p = plan(tensors, budget, fixed, MACHINE, balance=False)
    except BudgetError:
        return
    res = resident_per_layer(p)
    for i in range(len(res) - 1):  # anything resident in layer i+1 means layer i is whole
        assert res[i + 1] == 0 or res[i] == p.layer_bytes[i], (i, res)
    if shape == "llama7b":
        assert all(res[i] >= res[i + 1] for i in range(31))


# ---- more memory never hurts
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("balance", [True, False])
def test_more_budget_never_means_less_resident_or_slower(shape, balance):
    tensors, fixed = SHAPES[shape]
    prev = None
    for i in range(41):
        budget = fixed + int(total(tensors) * (0.25 + i * 0.02))
        try:
            p = plan(tensors, budget, fixed, MACHINE, balance=balance)
        except BudgetError:
            assert prev is None  # once a budget works, every larger one does
            continue
        if prev is not None:  # a longer lookahead may take resident rows for its ring, but only
            # when it is predicted faster (SmolLM2's whole-matrix blocks: window 2 at 48 MB)
            assert p.resident_bytes >= prev.resident_bytes or p.window > prev.window, budget
            assert p.predicted_tok_s >= prev.predicted_tok_s * (1 - 1e-9), budget
        prev = p
    assert prev.policy == "all-resident"


GRAIN_SLACK = 0.05  # how much slower a plan for a slightly larger budget may be predicted: the
# search keeps the most resident rows that fit (whole blocks), and the ring follows the largest
# layer streamed, so a budget a block larger can move the ring's size and the lookahead the cost
# model credits it. In 5,000 random pairs (2026-11-30) the larger budget was predicted up to 3.3%
# slower and kept up to 3.3% fewer resident bytes; the sweep above, 2% of the model a step, holds
# strictly. Two seeds in 160 of the strict version of this test failed (1.25% of CI runs).


@settings(max_examples=25, deadline=None)
@given(shapes, st.floats(0.0, 1.1), st.floats(0.0, 0.3))
@example("llama7b", 0.8524560349154776, 0.001)  # the head stops setting the slot: 0.3% slower
@example("llama7b", 0.6328125, 0.0011)  # 2.1% slower
@example("mixed", 0.8125, 0.001953125)  # 0.1% fewer resident bytes, the same window
def test_more_budget_is_never_much_slower_for_any_pair(shape, frac, more):
    tensors, fixed, budget = budget_at(shape, frac)
    try:
        lo = plan(tensors, budget, fixed, MACHINE)
    except BudgetError:
        return
    hi = plan(tensors, budget + int(more * total(tensors)), fixed, MACHINE)
    assert hi.predicted_tok_s >= lo.predicted_tok_s * (1 - GRAIN_SLACK)
    if more >= 0.05:  # far past the grain: as the sweep above
        assert hi.resident_bytes >= lo.resident_bytes or hi.window > lo.window
        assert hi.predicted_tok_s >= lo.predicted_tok_s * (1 - 1e-9)


# ---- flexible preservation
def _full(p, tensors, kinds) -> bool:
    return all(p.resident_rows[t.name] == t.rows for t in tensors if t.kind in kinds)


def test_ffn_policy_at_a_high_budget_keeps_ffn_and_streams_attention():
    tensors, fixed, budget = budget_at("llama7b", 0.9)
    p = plan(tensors, budget, fixed, MACHINE, preserve="ffn")
    blocks = [t for t in tensors if t.kind != "output"]
    assert p.policy == "ffn" and p.streamed_bytes > 0
    assert _full(p, blocks, FFN)
    assert all(p.resident_rows[t.name] < t.rows for t in blocks if t.kind == "attn_output")


def test_attn_policy_at_a_low_budget_keeps_attention_and_streams_ffn():
    """At 30% of the model a block keeps ~24 MB, less than its 37.7 MB of attention: all of it goes
    to attention (attn_q first, whole), no FFN row stays; the ffn policy does the opposite: FFN
    first, and what is left of a layer's share after its whole FFN blocks (less than one, 6.3 MB)
    goes on to the next tensors in the order."""
    tensors, fixed, budget = budget_at("llama7b", 0.3)
    blocks = [t for t in tensors if t.kind != "output"]
    p = plan(tensors, budget, fixed, MACHINE, preserve="attn")
    assert p.policy == "attn" and 0 < resident_per_layer(p)[0]
    assert all(p.resident_rows[t.name] == 0 for t in blocks if t.kind in FFN)
    assert _full(p, blocks, ("attn_q",))
    q = plan(tensors, budget, fixed, MACHINE, preserve="ffn")
    for layer in {t.layer for t in blocks}:
        ts = [t for t in blocks if t.layer == layer]
        later = sum(q.resident_rows[t.name] * t.row_bytes for t in ts
                    if t.kind in ATTN + ("ffn_down",))
        gate = next(t for t in ts if t.kind == "ffn_gate")
        assert later < block_rows(gate.rows, gate.row_bytes) * gate.row_bytes
        assert q.resident_rows[gate.name] > 0


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("frac", [0.4, 0.6, 0.9, 0.98])
def test_auto_takes_the_fastest_candidate(shape, frac):
    tensors, fixed, budget = budget_at(shape, frac)
    auto = plan(tensors, budget, fixed, MACHINE, preserve="auto")
    each = {name: plan(tensors, budget, fixed, MACHINE, preserve=name) for name in POLICIES}
    assert auto.policy in POLICIES
    assert auto.predicted_s == min(p.predicted_s for p in each.values())
    assert auto.resident_rows == each[auto.policy].resident_rows


def test_auto_keeps_attention_at_a_low_budget():
    """Streaming FFN leaves 3 reads a block, streaming attention first 5: the paper's low-memory
    choice falls out of the per-read latency. In whole blocks, attn and kv-ffn (K and V first)
    come within 0.3% of each other here, kv-ffn placing 4 MB more: either keeps attention."""
    tensors, fixed, budget = budget_at("llama7b", 0.3)
    p = plan(tensors, budget, fixed, MACHINE)
    assert p.policy in ("attn", "kv-ffn")
    assert p.predicted_s < plan(tensors, budget, fixed, MACHINE, preserve="ffn").predicted_s


# ---- simulate: the pipeline model
def test_simulate_io_bound_is_the_sum_of_reads():
    loads, computes = [(0.1, 0.0)] * 33, [0.001] * 33
    assert simulate(loads, computes, 2) == pytest.approx(33 * 0.1, rel=1e-9)


def test_simulate_compute_bound_is_the_sum_of_compute_and_conversion():
    loads, computes = [(0.001, 0.002)] * 33, [0.1] * 33
    assert simulate(loads, computes, 2) == pytest.approx(33 * (0.1 + 0.002), rel=1e-9)


def test_simulate_window_one_cannot_overlap_a_layer_with_its_read():
    loads, computes = [(0.1, 0.0)] * 8, [0.1] * 8
    assert simulate(loads, computes, 1) == pytest.approx(8 * 0.2)
    assert simulate(loads, computes, 2) == pytest.approx(8 * 0.1)


def test_simulate_reader_works_ahead_through_resident_layers():
    """One streamed layer among resident ones: its next read overlaps the resident layers, as the
    prefetcher does (a slot is freed by the streamed layer `window` streamed layers back)."""
    loads, computes = [(0.0, 0.0)] * 3 + [(1.0, 0.0)], [1.0] * 4
    assert simulate(loads, computes, 1) == pytest.approx(4.0)


def test_simulate_averages_a_pipeline_that_cycles_over_two_tokens():
    """This pipeline alternates 1.7 s and 1.9 s tokens; one measured token would say either."""
    loads, computes = [(0.7, 0.3), (0.0, 0.0), (1.0, 0.1)], [0.2, 0.5, 0.5]
    assert simulate(loads, computes, 2) == pytest.approx(1.8)
    assert simulate(loads, computes, 2, tokens=9) == pytest.approx(1.8)


def test_simulate_unbalanced_is_clearly_slower_than_balanced():
    """Same bytes read per token: half the layers resident and the others read at 2x compute, versus
    every layer reading its share. Balanced overlaps all of it; unbalanced computes the resident
    half with only `window` reads to overlap, then waits on I/O."""
    n, c = 32, 0.01
    unbalanced = [(0.0, 0.0)] * 16 + [(2 * c, 0.0)] * 16
    balanced = [(c, 0.0)] * n
    t_bal, t_unb = simulate(balanced, [c] * n, 2), simulate(unbalanced, [c] * n, 2)
    assert t_bal == pytest.approx(n * c)
    assert t_unb > 1.3 * t_bal


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 0.2), st.floats(0.001, 1)),
                min_size=1, max_size=12), st.integers(2, 4))
def test_simulate_is_never_faster_than_its_busiest_resource_and_balance_attains_it(layers, window):
    loads = [(io, conv if io else 0.0) for io, conv, _ in layers]
    computes = [c for _, _, c in layers]
    window = min(window, len(layers))
    t_io, t_cpu = sum(io for io, _ in loads), sum(computes) + sum(cv for _, cv in loads)
    assert simulate(loads, computes, window) >= max(t_io, t_cpu) * (1 - 1e-9)
    n, c = len(layers), sum(computes) / len(layers)
    if window >= 2 and t_io > 0:  # the same reads, spread evenly over even layers
        assert simulate([(t_io / n, 0.0)] * n, [c] * n, window) == pytest.approx(
            max(t_io, c * n), rel=1e-9)


# ---- modes
@pytest.mark.parametrize("frac", [0.3, 0.8, 1.5])
def test_prefetch_mode_keeps_nothing_resident(frac):
    tensors, fixed, budget = budget_at("llama7b", frac)
    p = plan(tensors, budget, fixed, MACHINE, mode="prefetch")
    assert p.resident_bytes == 0 and all(r == 0 for r in p.resident_rows.values())
    assert p.streamed_bytes == total(tensors) and p.window == 2


@pytest.mark.parametrize("frac", [0.1, 0.5, 1.5])
def test_mmap_mode_streams_nothing_and_pages_what_does_not_fit(frac):
    tensors, fixed, budget = budget_at("llama7b", frac)
    p = plan(tensors, budget, fixed, MACHINE, mode="mmap")
    assert (p.streamed_bytes, p.window, p.slot_bytes, p.bounce_bytes) == (0, 0, 0, 0)
    paged = max(0, total(tensors) - (budget - fixed))
    assert p.t_io == pytest.approx(paged / MACHINE.disk_bw)
    assert p.predicted_s == pytest.approx(p.t_io + p.t_cpu)


@pytest.mark.parametrize("frac", [0.3, 0.8])
def test_sync_mode_adds_io_and_compute(frac):
    tensors, fixed, budget = budget_at("llama7b", frac)
    p = plan(tensors, budget, fixed, MACHINE, mode="sync")
    assert p.window == 1 and p.streamed_bytes > 0
    assert p.predicted_s == pytest.approx(p.t_io + p.t_cpu, rel=1e-12)
    assert p.predicted_s > plan(tensors, budget, fixed, MACHINE).predicted_s


def test_window_larger_than_the_model_is_capped():
    """A window past the 13 layers of `mixed` buys nothing: it must not inflate the minimum."""
    tensors, fixed = SHAPES["mixed"]
    minima = []
    for window in (13, 100):
        with pytest.raises(BudgetError) as e:
            plan(tensors, fixed, fixed, MACHINE, window=window)
        minima.append(e.value.minimum)
    assert minima[0] == minima[1] <= fixed + total(tensors)  # all resident beats 13 slots
    p = plan(tensors, minima[1], fixed, MACHINE, window=100)
    assert p.total_bytes() <= minima[1]


# ---- the paper's bound
@settings(max_examples=60, deadline=None)
@given(shapes, fracs, st.sampled_from(["flexinfer", "sync", "prefetch", "mmap"]), st.booleans())
def test_prediction_never_beats_the_bound(shape, frac, mode, balance):
    tensors, fixed, budget = budget_at(shape, frac)
    try:
        p = plan(tensors, budget, fixed, MACHINE, mode=mode, balance=balance)
    except BudgetError:
        return
    assert p.t_io_bound == max(0, total(tensors) - budget) / MACHINE.disk_bw
    assert p.t_cpu_bound == total(tensors) / MACHINE.compute_bw
    assert p.bound_tok_s == 1 / max(p.t_io_bound, p.t_cpu_bound)
    assert p.predicted_tok_s <= p.bound_tok_s * 1.0001
    assert math.isfinite(p.predicted_tok_s) and p.predicted_s >= max(p.t_io, p.t_cpu) * (1 - 1e-9)


# ---- stages of a growing KV cache
def _growth(fixed: int) -> tuple[tuple[int, int], ...]:
    """A cache that is a third of `fixed`: 1/16 of it written at 64 positions, 1/4 at 256."""
    kv = fixed // 3
    return ((64, kv - kv // 16), (256, kv - kv // 4))


def _used_at(p, tensors, stage) -> int:
    """Independent of the planner: the stage's resident rows, the ring (sized for the plan's own
    streaming, the most there is: the prefetcher goes round all of it in every stage; a slot of
    the largest layer's pieces,
    each with its alignment slack, and one more slack per tensor; plus, with a
    window of 2 or more, a lookahead: the largest piece at least, what the disk reads in a layer's
    compute if more, a slot at most) and the bounce buffer."""
    layers: dict[int, int] = {}
    busy: dict[int, float] = {}  # seconds a layer computes and repacks
    piece = 0
    for t in tensors:
        n = t.rows - p.resident_rows[t.name]
        pieces = -(-n // block_rows(t.rows, t.row_bytes)) + 1 if n else 0
        layers[t.layer] = layers.get(t.layer, 0) + n * t.row_bytes + pieces * PIECE_SLACK
        busy[t.layer] = (busy.get(t.layer, 0.0) + t.nbytes / MACHINE.compute_bw
                         + (n * t.row_bytes / MACHINE.repack_bw if t.repacked else 0.0))
        piece = max(piece, min(n, block_rows(t.rows, t.row_bytes)) * t.row_bytes + PIECE_SLACK)
    n = sum(1 for s in layers.values() if s)
    if not n:
        return stage.resident_bytes + p.bounce_bytes
    slot, win = max(layers.values()), min(p.window, n)
    ahead = int(MACHINE.disk_bw * max(busy.values()))
    ring = slot + (win - 1) * min(slot, max(piece, ahead))
    return stage.resident_bytes + ring + p.bounce_bytes


@FAST
@given(shapes, fracs, st.booleans(), st.sampled_from(["flexinfer", "sync"]))
def test_stages_only_release_rows_and_each_fits_the_budget(shape, frac, balance, mode):
    tensors, fixed, budget = budget_at(shape, frac)
    growth = _growth(fixed)
    try:
        p = plan(tensors, budget, fixed, MACHINE, balance=balance, mode=mode, kv_growth=growth)
    except BudgetError:
        return
    unused = dict(growth)
    chain = [*p.stages, p]
    for earlier, later in zip(chain, chain[1:]):
        assert earlier.positions < getattr(later, "positions", 1 << 30)
        assert all(earlier.resident_rows[n] >= r for n, r in later.resident_rows.items())
        assert earlier.resident_bytes > later.resident_bytes  # a stage that keeps nothing more is dropped
        assert earlier.predicted_s <= later.predicted_s * (1 + 1e-9)
        assert all(r % ROW_ALIGN == 0 or r == t.rows
                   for t in tensors for r in [earlier.resident_rows[t.name]])
    for s in p.stages:
        assert s.kv_unused == unused[s.positions]
        assert s.total_bytes() == fixed - s.kv_unused + _used_at(p, tensors, s)
        assert s.total_bytes() <= budget
        assert s.resident_bytes + s.streamed_bytes == total(tensors)


def test_stages_turn_unwritten_cache_into_resident_weights():
    tensors, fixed, budget = budget_at("llama7b", 0.8)
    growth = _growth(fixed)
    p = plan(tensors, budget, fixed, MACHINE, kv_growth=growth)
    assert [s.positions for s in p.stages] == [64, 256]
    first = p.stages[0]
    # nearly all of the unwritten cache holds weights (less what the slots give up)
    assert first.resident_bytes - p.resident_bytes > 0.9 * first.kv_unused
    assert first.predicted_s < p.predicted_s
    assert p.first is first and plan(tensors, budget, fixed, MACHINE).first.resident_bytes == p.resident_bytes


@pytest.mark.parametrize("mode", ["mmap", "prefetch"])
def test_no_stages_where_nothing_is_locked(mode):
    tensors, fixed, budget = budget_at("llama7b", 0.8)
    assert plan(tensors, budget, fixed, MACHINE, mode=mode, kv_growth=_growth(fixed)).stages == ()


def test_no_stages_when_everything_is_resident():
    tensors, fixed = SHAPES["smollm2"]
    p = plan(tensors, fixed + total(tensors), fixed, MACHINE, kv_growth=_growth(fixed))
    assert p.stages == () and p.first is p


# ---- the prompt loan
def _prompt_total(p, tensors, rows) -> int:
    """Independent of the planner: memory while a prompt batch runs with `rows` resident."""
    resident = sum(rows[t.name] * t.row_bytes for t in tensors)
    return p.fixed_bytes + p.prompt_extra_bytes + resident + p.ring_bytes + p.bounce_bytes


@FAST
@given(shapes, fracs, st.booleans(), st.sampled_from(["flexinfer", "sync"]),
       st.sampled_from([1 << 20, 25 << 20, 100 << 20]), st.booleans())
def test_the_loan_fits_the_budget_while_decoding_and_while_a_prompt_runs(shape, frac, balance, mode,
                                                                        extra, staged):
    tensors, fixed, budget = budget_at(shape, frac)
    growth = _growth(fixed) if staged else ()
    try:
        p = plan(tensors, budget, fixed, MACHINE, balance=balance, mode=mode, kv_growth=growth,
                 prompt_extra=extra)
    except BudgetError as e:  # the prompt's compute counts in the minimum
        assert e.minimum > budget
        return
    if not p.prompt_rows:  # everything resident even during a prompt, or nothing to lend
        assert p.fixed_bytes == fixed + extra and p.total_bytes() <= budget
        return
    prompt, rows = p.prompt_rows, p.resident_rows
    assert all(prompt[n] <= r for n, r in rows.items())  # the loan only adds rows
    assert all(prompt[t.name] % ROW_ALIGN == 0 or prompt[t.name] == t.rows for t in tensors)
    loan = sum((rows[t.name] - prompt[t.name]) * t.row_bytes for t in tensors)
    assert p.loan_bytes == loan and p.fixed_bytes == fixed and p.prompt_extra_bytes == extra
    assert p.total_bytes() <= budget
    assert _prompt_total(p, tensors, prompt) <= budget
    for s in p.stages:  # a prompt in an earlier stage lends the same rows
        assert all(s.resident_rows[n] >= r for n, r in rows.items())
        assert s.total_bytes() <= budget and s.total_bytes() - loan + extra <= budget
    # the slots hold a prompt's streaming, the most there is
    most = max(sum((t.rows - prompt[t.name]) * t.row_bytes for t in tensors if t.layer == l)
               for l in {t.layer for t in tensors})
    assert p.slot_bytes >= most


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("frac", [0.3, 0.6, 0.9])
def test_the_loan_keeps_more_resident_while_decoding(shape, frac):
    """Lending the prompt's compute memory: decoding keeps about that much more resident than a
    plan that charges it all the time, and never less."""
    tensors, fixed, budget = budget_at(shape, frac)
    extra = total(tensors) // 20  # the 7B at 128-token batches: 25 MB of 3.7 GB
    charged = plan(tensors, budget, fixed + extra, MACHINE)
    lent = plan(tensors, budget, fixed, MACHINE, prompt_extra=extra)
    assert lent.resident_bytes >= charged.resident_bytes
    if charged.streamed_bytes > extra:
        assert lent.loan_bytes > 0.9 * extra and lent.predicted_s <= charged.predicted_s
    assert plan(tensors, budget, fixed, MACHINE).prompt_rows == {}  # no prompt memory: no loan


@pytest.mark.parametrize("mode", ["mmap", "prefetch"])
def test_no_loan_where_nothing_is_locked(mode):
    tensors, fixed, budget = budget_at("llama7b", 0.8)
    p = plan(tensors, budget, fixed, MACHINE, mode=mode, prompt_extra=25 << 20)
    assert p.prompt_rows == {} and p.fixed_bytes == fixed + (25 << 20)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("frac", [0.4, 0.8])
def test_the_default_window_is_the_fastest_of_one_two_and_three(shape, frac):
    tensors, fixed, budget = budget_at(shape, frac)
    chosen = plan(tensors, budget, fixed, MACHINE)
    fits = []
    for w in (1, 2, 3):
        try:
            fits.append(plan(tensors, budget, fixed, MACHINE, window=w))
        except BudgetError:  # three layers' lookahead may not fit where two do
            assert w == 3
    assert chosen.predicted_s == min(p.predicted_s for p in fits)
    assert chosen.window in {p.window for p in fits}
    if len(fits) == 3 and fits[2].window == 3:
        assert fits[2].ring_bytes > fits[1].ring_bytes > fits[0].ring_bytes  # lookaheads


# ---- issue 18: never slower than sync; less lookahead where compute is short
FAST_CPU = Machine(disk_bw=1.0e9, compute_bw=2e12, repack_bw=2e12)  # T_cpu 2 ms on the 7B: less
# than reading one lookahead (8 MB, 8 ms)
CAPPED = Machine(disk_bw=1.0e9, compute_bw=34e9, repack_bw=8e9,  # this machine, T_cpu 0.11 s
                 pause_credit_s=planner.CAP_PAUSE_CREDIT_S)


@pytest.mark.parametrize("machine", [FAST_CPU, CAPPED], ids=["short-compute", "blkio-cap"])
@pytest.mark.parametrize("frac", [0.3, 0.6])
def test_short_compute_picks_less_lookahead_and_more_resident(machine, frac):
    """T_cpu much smaller than T_io (or refunded by a cap): a lookahead layer's ring bytes would be
    read again on every token, for little overlap; the plan reads one layer at a time and keeps
    those bytes resident."""
    tensors, fixed, budget = budget_at("llama7b", frac)
    chosen = plan(tensors, budget, fixed, machine)
    ahead = plan(tensors, budget, fixed, machine, window=2)
    assert chosen.t_cpu_bound < 0.1 * chosen.t_io
    assert chosen.window == 1 and chosen.ring_bytes < ahead.ring_bytes
    assert chosen.resident_bytes > ahead.resident_bytes
    assert chosen.streamed_bytes < ahead.streamed_bytes
    assert chosen.predicted_s < ahead.predicted_s
    assert chosen.total_bytes() <= budget  # the invariants still hold


@pytest.mark.parametrize("frac", [0.3, 0.9])
def test_long_compute_keeps_a_lookahead(frac):
    """Compute as long as the reads (a fast disk): overlapping them is worth the ring bytes."""
    tensors, fixed, budget = budget_at("llama7b", frac)
    fast_disk = Machine(disk_bw=8e9, compute_bw=14e9, repack_bw=8e9)
    assert plan(tensors, budget, fixed, fast_disk).window >= 2


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(0.05, 1.0), st.sampled_from([MACHINE, FAST_CPU, CAPPED]), st.booleans())
def test_flexinfer_is_never_predicted_slower_than_sync_or_prefetch(shape, frac, machine, balance):
    tensors, fixed, budget = budget_at(shape, frac)
    try:
        chosen = plan(tensors, budget, fixed, machine, balance=balance)
    except BudgetError:
        return
    for mode in ("sync", "prefetch"):
        try:
            other = plan(tensors, budget, fixed, machine, mode=mode, balance=balance)
        except BudgetError:
            continue
        # within 0.5%: window 1 waits for the conversion of a layer's last piece before its
        # compute, and the model also charges conversion to the cores (simulate)
        assert chosen.predicted_s <= other.predicted_s * 1.005, mode


def test_a_cap_refunds_short_pauses_only():
    """Reads of 0.1 s after 40 ms of compute: refunded under a cap (down to CREDIT_FLOOR of the
    read), not on a disk; pauses longer than the credit are not refunded."""
    assert planner.refunded(0.1, 0.04, 0.0) == 0.1
    assert planner.refunded(0.1, 0.04, 0.1) == pytest.approx(0.06)
    assert planner.refunded(0.1, 0.09, 0.1) == pytest.approx(0.1 * planner.CREDIT_FLOOR)
    assert planner.refunded(0.1, 0.2, 0.1) == 0.1
    loads, computes = [(0.1, 0.0)] * 8, [0.04] * 8
    assert simulate(loads, computes, 1) == pytest.approx(8 * 0.14)
    assert simulate(loads, computes, 1, credit=0.1) == pytest.approx(8 * 0.1)
