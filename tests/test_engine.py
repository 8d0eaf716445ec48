"""The engine on small synthetic models: it computes every architecture and quant type, and streaming
changes no bit of the result, in every offload mode and at every budget."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

import flexinfer.model as fm
from flexinfer.errors import FlexInferError
from flexinfer.planner import ROW_ALIGN, Stage, plan as real_plan

PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]


def _squeeze_budget(monkeypatch, fraction: float, window: int = 2):
    """Replace the planner's choice by a plan that keeps `fraction` of every matrix's rows resident
    (in ROW_ALIGN groups, varied per tensor so parts of every size occur) and streams the rest.
    Tiny models are smaller than the process's memory noise, and bit-exactness is a property of
    the streaming machinery, not of the budget policy (tests/test_planner.py covers that)."""
    def plan(mats, budget, fixed, mach, **kw):
        base = real_plan(mats, 1 << 50, fixed, mach, **{**kw, "mode": "flexinfer"})
        rows = {}
        for i, t in enumerate(mats):
            f = 0.0 if kw.get("mode") == "prefetch" else min(1.0, fraction * (0.5 + (i % 3) / 2))
            r = int(t.rows * f) // ROW_ALIGN * ROW_ALIGN
            rows[t.name] = t.rows if f >= 1.0 else r
        return dataclasses.replace(base, resident_rows=rows, window=window, mode=kw["mode"],
                                   policy=kw.get("preserve", "auto"))
    monkeypatch.setattr(fm, "plan", plan)


class Run:
    def __init__(self, plan, streamed: int):
        self.plan, self.streamed = plan, streamed  # streamed layer loads the forward pass used


BUDGET = "4G"  # a fixed budget that holds every tiny model: an auto one follows the machine, and
# another program's memory pressure would make it stream (tests/test_experts.py's too)


def _logits(path, prompt=PROMPT, **opts):
    with fm.load(path, n_ctx=64, n_threads=2, **{"memory_budget": BUDGET, **opts}) as m:
        ids = [t % m.cfg.n_vocab for t in prompt]
        out = m.logits(ids)
        assert m.prefetch_threads_alive in (0, 2)
        p = m._residency.prefetcher
        run = Run(m.plan, p.layers_loaded if p else 0)
    return out, run


MODELS = ["tiny_llama_path", "tiny_qwen2_path", "tiny_llama_tied_path", "tiny_mixed_path"]


@pytest.mark.parametrize("model", MODELS)
def test_resident_logits_are_finite_and_shaped(model, request):
    path = request.getfixturevalue(model)
    logits, run = _logits(path)
    assert logits.shape[0] == len(PROMPT)
    assert np.isfinite(logits).all()
    assert run.streamed == 0
    assert logits.std() > 0  # a broken graph tends to give constant rows


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mode,fraction,balance", [
    ("flexinfer", 0.0, True), ("flexinfer", 0.35, True), ("flexinfer", 0.8, True),
    ("flexinfer", 0.5, False), ("prefetch", 0.0, True), ("sync", 0.4, True)])
def test_streaming_is_bit_exact(model, mode, fraction, balance, request, monkeypatch):
    path = request.getfixturevalue(model)
    resident, _ = _logits(path)
    _squeeze_budget(monkeypatch, fraction)
    streamed, run = _logits(path, offload=mode, balance=balance, preserve="auto")
    assert run.streamed > 0, "the test plan must force streaming"
    assert np.array_equal(streamed, resident)


@pytest.mark.parametrize("model", ["tiny_llama_path", "tiny_mixed_path"])
def test_mmap_matches_resident_without_repack(model, request):
    path = request.getfixturevalue(model)
    plain, _ = _logits(path, repack=False)
    mapped, run = _logits(path, offload="mmap")
    assert run.plan.mode == "mmap" and run.streamed == 0
    assert np.array_equal(mapped, plain)


def test_repack_changes_only_rounding(tiny_llama_path):
    repacked, _ = _logits(tiny_llama_path)
    plain, _ = _logits(tiny_llama_path, repack=False)
    assert np.abs(repacked - plain).max() < 1e-2 * max(1.0, np.abs(plain).max())


@pytest.mark.parametrize("preserve", ["ffn", "attn"])
def test_preserve_policies_are_bit_exact(tiny_mixed_path, preserve, monkeypatch):
    resident, _ = _logits(tiny_mixed_path)
    _squeeze_budget(monkeypatch, 0.5)
    streamed, run = _logits(tiny_mixed_path, preserve=preserve)
    assert run.plan.policy == preserve and run.streamed > 0
    assert np.array_equal(streamed, resident)


def test_decode_equals_batch(tiny_qwen2_path):
    """Token-by-token decoding through the KV cache gives the batch's logits (same kernels: the
    batch of one)."""
    with fm.load(tiny_qwen2_path, n_ctx=64, n_threads=2) as m:
        batch = m.logits(PROMPT[:6])
    with fm.load(tiny_qwen2_path, n_ctx=64, n_threads=2) as m:
        steps = np.concatenate([m.evaluate([t], i) for i, t in enumerate(PROMPT[:6])])
    assert np.allclose(steps, batch, atol=1e-3 * np.abs(batch).max())


def test_greedy_generation_is_deterministic_and_streams_the_same(tiny_llama_path, monkeypatch):
    def run(**opts):
        with fm.load(tiny_llama_path, n_ctx=64, n_threads=2, **opts) as m:
            return [p.token for p in m.generate(PROMPT, max_tokens=12, temperature=0)]
    first = run()
    assert len(first) > 0 and first == run()
    _squeeze_budget(monkeypatch, 0.3)
    assert run() == first


def test_close_stops_every_thread(tiny_llama_path, monkeypatch):
    _squeeze_budget(monkeypatch, 0.2)
    before = {t.name for t in threading.enumerate()}
    m = fm.load(tiny_llama_path, n_ctx=64, n_threads=2)
    m.logits(PROMPT[:4])
    assert m.prefetch_threads_alive == 2
    m.close()
    m.close()  # idempotent
    left = {t.name for t in threading.enumerate()} - before
    assert not [n for n in left if n.startswith("flexinfer")]
    with pytest.raises(FlexInferError, match="closed"):
        m.logits(PROMPT[:2])


def test_prompt_longer_than_context(tiny_llama_path):
    with fm.load(tiny_llama_path, n_ctx=16, n_threads=2) as m:
        long = list(range(100, 140))
        with pytest.raises(FlexInferError, match="context"):
            list(m.generate(long, max_tokens=4, temperature=0))
        pieces = list(m.generate(long, max_tokens=4, temperature=0, truncate=True))
        assert 0 < len([p for p in pieces if p.token >= 0]) <= 4


def test_bad_token_ids_are_refused(tiny_llama_path):
    with fm.load(tiny_llama_path, n_ctx=16, n_threads=2) as m:
        with pytest.raises(FlexInferError, match="vocabulary"):
            m.logits([1, 10**9])


def test_budget_below_minimum_names_the_minimum(tiny_llama_path):
    with pytest.raises(FlexInferError, match=r"minimum working set .* \d+\.\d+ GB"):
        fm.load(tiny_llama_path, n_ctx=64, memory_budget="10M")


def test_context_too_large_for_the_budget_is_refused_before_allocating(tiny_llama_path):
    with pytest.raises(FlexInferError, match=r"context 999999999: at least .* KV cache and attention mask alone need"):
        fm.load(tiny_llama_path, n_ctx=999_999_999, memory_budget="4G")


def test_bad_options_are_one_line_errors(tiny_llama_path):
    for opts, frag in [({"offload": "nope"}, "--offload"), ({"preserve": "x"}, "--preserve"),
                       ({"n_ctx": 0}, "--ctx-size"), ({"memory_budget": "lots"}, "--memory-budget")]:
        with pytest.raises(FlexInferError, match=frag):
            fm.load(tiny_llama_path, **opts)


def test_many_streamed_pieces_fit_the_header_table(tiny_mixed_path, monkeypatch):
    """Every streamed piece gets a header; shrinking pieces to one 16-row group multiplies them far
    beyond two per tensor, and loading and computing must still work, bit for bit."""
    import flexinfer.weights as weights
    resident, _ = _logits(tiny_mixed_path)
    monkeypatch.setattr(weights, "block_starts", lambda rows, rb: range(0, rows, ROW_ALIGN))
    _squeeze_budget(monkeypatch, 0.0)
    streamed, run = _logits(tiny_mixed_path)
    assert run.streamed > 0 and np.array_equal(streamed, resident)


def _staged_budget(monkeypatch, keep=(0.8, 0.3), positions=16):
    """A plan with one earlier stage: while the cache holds at most `positions` positions, keep[0]
    of every matrix's rows resident, then keep[1] (the store reads only rows and positions)."""
    def plan(mats, budget, fixed, mach, **kw):
        base = real_plan(mats, 1 << 50, fixed, mach, **{**kw, "mode": "flexinfer", "kv_growth": ()})

        def rows(f):
            out = {}
            for i, t in enumerate(mats):
                r = int(t.rows * min(1.0, f * (0.5 + (i % 3) / 2))) // ROW_ALIGN * ROW_ALIGN
                out[t.name] = t.rows if f * (0.5 + (i % 3) / 2) >= 1.0 else r
            return out
        late = rows(keep[1])
        early = {n: max(r, late[n]) for n, r in rows(keep[0]).items()}
        stage = Stage(positions, 0, early, 0, (), 0.0, 0.0, 0.0, 0)
        return dataclasses.replace(base, resident_rows=late, window=2, mode=kw["mode"],
                                   stages=(stage,))
    monkeypatch.setattr(fm, "plan", plan)


def _steps(path, n_steps=20, **opts):
    """The prompt's logits, then greedy decoding one token at a time: every step's logits."""
    with fm.load(path, n_ctx=64, n_threads=2, **opts) as m:
        ids = [t % m.cfg.n_vocab for t in PROMPT]
        out = [m.evaluate(ids, 0)]
        stages, resident = [m._residency.stage], [m.stats.resident_bytes]
        for _ in range(n_steps):
            ids.append(int(out[-1][-1].argmax()))
            out.append(m.evaluate(ids[-1:], len(ids) - 1))
            stages.append(m._residency.stage)
            resident.append(m.stats.resident_bytes)
        threads = m.prefetch_threads_alive
    return np.concatenate(out), stages, resident, threads


@pytest.mark.parametrize("model", ["tiny_llama_path", "tiny_llama_tied_path", "tiny_mixed_path"])
@pytest.mark.parametrize("mode", ["flexinfer", "sync"])
@pytest.mark.parametrize("keep", [(0.8, 0.3), (2.0, 0.3)], ids=["part-resident", "all-resident"])
def test_a_growing_cache_releases_rows_bit_exactly(model, mode, keep, request, monkeypatch):
    """Crossing a stage boundary mid-generation frees rows and streams them from then on; no logit
    changes, and the prefetcher runs again afterwards. The first stage may stream nothing at all
    (a short context that fits): the prefetcher then starts at the boundary."""
    path = request.getfixturevalue(model)
    resident, _, _, _ = _steps(path)
    _staged_budget(monkeypatch, keep=keep, positions=16)
    streamed, stages, held, threads = _steps(path, offload=mode)
    assert stages[0] == 0 and stages[-1] == 1  # the prompt (12) fits 16 positions; 32 do not
    assert stages.index(1) == 16 - len(PROMPT) + 1  # the step that writes position 16 moved on
    assert held[-1] < held[0]
    assert threads == (2 if mode == "flexinfer" else 0)
    assert np.array_equal(streamed, resident)


@pytest.mark.parametrize("model", ["tiny_llama_path", "tiny_llama_tied_path", "tiny_mixed_path"])
@pytest.mark.parametrize("staged", [False, True])
def test_the_store_allocates_no_more_than_the_planner_counts(model, staged, request, monkeypatch):
    """The largest layer's pieces, each with its O_DIRECT block alignment and stage boundaries
    splitting pieces, fit the planner's slot; the ring is the planner's (one slot and a lookahead)
    and the bounce buffer no larger than its count; and streaming through them is bit-exact.
    (The tiny models are too small for a real budget to stream: the rows are forced.)"""
    from flexinfer import ggml_ops, planner
    from flexinfer.direct_io import span
    from flexinfer.weights import matrices
    path = request.getfixturevalue(model)
    resident, _ = _logits(path)
    if staged:
        _staged_budget(monkeypatch, keep=(0.8, 0.3), positions=16)
    else:
        _squeeze_budget(monkeypatch, 0.35)
    forced = fm.plan

    def with_ring(mats, budget, fixed, mach, **kw):
        p = forced(mats, budget, fixed, mach, **kw)
        spec = planner.RingSpec(mach)
        return dataclasses.replace(p, ring_bytes=planner._ring(planner._layers(mats),
                                                               p.resident_rows, spec, p.window))
    monkeypatch.setattr(fm, "plan", with_ring)
    with fm.load(path, n_ctx=64, n_threads=2) as m:
        mats = matrices(m.g, m.cfg, m.specs, lambda i: ggml_ops.repacks(i.type, i.shape))
        slot = planner._slot(planner._layers(mats), m.plan.resident_rows)
        s, r = m._store, m._residency
        layer = max(sum(span(b.offset, b.nbytes)[1] for b in bs)
                    for bs in r.streamed_layers().values())
        assert r.prefetcher and layer <= slot < m.plan.ring_bytes
        assert r.ring.size == -(-m.plan.ring_bytes // ggml_ops.PAGE) * ggml_ops.PAGE
        repacked = any(t.repacked and m.plan.resident_rows[t.name] < t.rows for t in mats)
        assert (s.bounce is not None) == repacked
        assert not repacked or s.bounce.size <= planner._bounce(mats)
        streamed = m.logits([t % m.cfg.n_vocab for t in PROMPT])
    assert np.array_equal(streamed, resident)


@pytest.mark.parametrize("model", ["tiny_llama_path", "tiny_mixed_path", "tiny_llama_tied_path"])
def test_loading_reads_into_homes_and_converts_in_small_groups(model, request, monkeypatch):
    """Loading reads each resident block straight into its home, with no staging buffer (the
    head here is 1.2 MB); resident and streamed rows are repacked 32 rows at a time through the
    one plain buffer there is, the bounce buffer. The logits stay bit-exact."""
    import flexinfer.weights as weights
    path = request.getfixturevalue(model)
    resident, _ = _logits(path)
    sizes = []

    class Recorded(weights.Buffer):
        def __init__(self, size, repack=False):
            super().__init__(size, repack)
            sizes.append((size, repack))
    monkeypatch.setattr(weights, "Buffer", Recorded)
    monkeypatch.setattr(weights, "convert_rows", lambda row_bytes: 32)
    _squeeze_budget(monkeypatch, 0.5)
    streamed, run = _logits(path)
    assert run.streamed > 0 and np.array_equal(streamed, resident)
    plain = [size for size, repack in sizes if not repack]  # the bounce buffer only
    assert len(plain) == 1 and plain[0] <= 32 * 4 * 1024  # 32 rows of the widest (f32, 1024)


def _loan_budget(monkeypatch, prompt=0.3, decode=0.7, stage=None):
    """A plan with a loan: `prompt` of every matrix's rows resident while a prompt batch runs,
    `decode` while decoding (and, with `stage`, (positions, fraction) an earlier KV stage keeps)."""
    def plan(mats, budget, fixed, mach, **kw):
        base = real_plan(mats, 1 << 50, fixed, mach, **{**kw, "mode": "flexinfer", "kv_growth": (),
                                                          "prompt_extra": 0})

        def rows(f):
            out = {}
            for i, t in enumerate(mats):
                g = f * (0.5 + (i % 3) / 2)
                out[t.name] = t.rows if g >= 1.0 else int(t.rows * g) // ROW_ALIGN * ROW_ALIGN
            return out
        late = rows(decode)
        kept = {n: min(r, late[n]) for n, r in rows(prompt).items()}
        stages = ()
        if stage:
            early = {n: max(r, late[n]) for n, r in rows(stage[1]).items()}
            stages = (Stage(stage[0], 0, early, 0, (), 0.0, 0.0, 0.0, 0),)
        return dataclasses.replace(base, resident_rows=late, prompt_rows=kept, window=2,
                                   mode=kw["mode"], stages=stages)
    monkeypatch.setattr(fm, "plan", plan)


def _chat(path, **opts):
    """A prompt, 6 decoded tokens, a second prompt (a chat turn), 6 more: every step's logits, and
    after each step the bytes it read and the resident bytes; the store's loan and prompt count."""
    with fm.load(path, n_ctx=64, n_threads=2, **opts) as m:
        s = m._residency

        def step(ids, pos):
            before = m._reader.bytes_read
            out.append(m.evaluate(ids, pos))
            reads.append(m._reader.bytes_read - before)
            held.append(s.resident_bytes)
            assert not s.lent  # outside a forward pass the loan is always back
        ids = [t % m.cfg.n_vocab for t in PROMPT]
        out, reads, held = [], [], []
        step(ids, 0)
        for turn in range(2):
            for _ in range(6):
                ids.append(int(out[-1][-1].argmax()))
                step(ids[-1:], len(ids) - 1)
            if turn == 0:
                more = [t % m.cfg.n_vocab for t in PROMPT[:5]]
                step(more, len(ids))
                ids += more
        loan = sum(b.nbytes for b in m._residency._loan)
        info = dict(prompts=s.prompts, loan=loan, threads=m.prefetch_threads_alive)
    return np.concatenate(out), reads, held, info


@pytest.mark.parametrize("model", ["tiny_llama_path", "tiny_llama_tied_path", "tiny_mixed_path"])
@pytest.mark.parametrize("mode", ["flexinfer", "sync"])
@pytest.mark.parametrize("fractions", [(0.3, 0.7), (0.0, 2.0)], ids=["part", "all-resident-decode"])
def test_the_prompt_loan_is_released_and_read_back_bit_exactly(model, mode, fractions, request,
                                                              monkeypatch):
    """The loan is streamed while a prompt batch runs and read back before the prompt's forward
    pass returns, turn after turn; no logit changes. With everything resident while decoding, only
    prompts read anything."""
    path = request.getfixturevalue(model)
    resident, _, _, _ = _chat(path)
    _loan_budget(monkeypatch, *fractions)
    streamed, reads, held, info = _chat(path, offload=mode)
    assert info["prompts"] == 2 and info["loan"] > 0
    assert reads[0] >= 2 * info["loan"] and reads[7] >= 2 * info["loan"]  # streamed, read back
    assert len(set(held)) == 1  # the same rows resident after every step
    streams_while_decoding = fractions[1] < 1
    decode_reads = [r for k, r in enumerate(reads) if k not in (0, 7)]  # (the reader reads ahead:
    assert (sum(decode_reads) > 0) == streams_while_decoding  # a step may find its layers read)
    assert info["threads"] == (2 if mode == "flexinfer" and streams_while_decoding else 0)
    assert np.array_equal(streamed, resident)


def test_the_loan_and_a_stage_boundary_together_are_bit_exact(tiny_mixed_path, monkeypatch):
    resident, _, _, _ = _chat(tiny_mixed_path)
    _loan_budget(monkeypatch, 0.2, 0.5, stage=(16, 0.9))
    streamed, reads, held, info = _chat(tiny_mixed_path)
    assert info["prompts"] == 2 and held[-1] < held[0]  # the stage's rows were given up
    assert np.array_equal(streamed, resident)


@pytest.mark.parametrize("model", ["tiny_llama_path", "tiny_mixed_path"])
def test_a_ring_without_the_double_mapping_streams_bit_exactly(model, request, monkeypatch):
    """Where memfd is refused the ring is one plain mapping with a piece to spare, and pieces that
    would cross its end start over at 0: the same logits."""
    import os
    path = request.getfixturevalue(model)
    resident, _ = _logits(path)

    def refused(*a, **k):
        raise OSError(38, "memfd_create refused")
    monkeypatch.setattr(os, "memfd_create", refused)
    _squeeze_budget(monkeypatch, 0.35)
    with fm.load(path, n_ctx=64, n_threads=2) as m:
        assert not m._residency.ring.wraps
        streamed = m.logits([t % m.cfg.n_vocab for t in PROMPT])
        for _ in range(3):  # a few passes, so that pieces go round the ring
            streamed = np.concatenate([streamed, m.logits([t % m.cfg.n_vocab for t in PROMPT])])
        assert m._residency.prefetcher.started_over > 0
    assert np.array_equal(streamed, np.concatenate([resident] * 4))


def test_graphs_placed_before_the_compute_buffer_moved_are_placed_again(tiny_llama_path,
                                                                         monkeypatch):
    """A graph of a set that outgrows the compute buffer makes ggml free it and allocate a larger
    one; the graphs of the set placed before it (the embedding's first) still point into the
    freed buffer and must be placed again before anything computes them. (The reservation for the
    worst case normally prevents a move; a streamed Qwen2 synth's head outgrew it by 7.8 MB and
    the embed graph then wrote into the unmapped old buffer: a segfault in CI under contention.)
    Here nothing is reserved, so the first layer graph of every set moves the buffer."""
    from flexinfer import engine as fe, ggml_ops
    resident, _ = _logits(tiny_llama_path)
    placed, generation, moves = {}, {}, []
    real_alloc, real_graphs = ggml_ops.Allocator.alloc, fe.Engine._graphs

    def alloc(self, ops):
        before = self.size()
        real_alloc(self, ops)
        if self.size() != before:  # a new buffer: what was placed before is in a freed one
            generation[id(self)] = generation.get(id(self), 0) + 1
            moves.append(before)
        placed[id(ops)] = (id(self), generation.get(id(self), 0))

    def graphs(self, T, layout, n_out):
        gs = real_graphs(self, T, layout, n_out)
        for ops in (gs.embed, *gs.layers, gs.head):
            a, g = placed[id(ops)]
            assert g == generation[a], f"a graph of the {T}-token set is in a freed buffer"
        return gs

    monkeypatch.setattr(ggml_ops.Allocator, "alloc", alloc)
    monkeypatch.setattr(fe.Engine, "_graphs", graphs)
    monkeypatch.setattr(fe.Engine, "_worst", lambda self, T: [])  # no reservation
    unreserved, _ = _logits(tiny_llama_path)
    assert len([b for b in moves if b]) >= 2  # the decode and the prompt buffer each moved
    assert np.array_equal(unreserved, resident)
