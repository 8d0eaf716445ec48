"""gemma3's sliding-window layers hold only their rings (kv_cache.py): cells, masks, prefix reuse,
batching, charged memory and the planner's KV figure, on the wrapping reference of
tests/test_fidelity.py (window 16, micro-batches of 32, rings of 256 cells, context 1024)."""

from __future__ import annotations

import numpy as np
import pytest

import flexinfer.model as fm
from flexinfer.batch import TokenBatch
from flexinfer.kv_cache import CacheLayout, KVCache, kv_bytes, kv_charged
from tests.test_fidelity import MAX_LOGIT_DIFF, MIN_TOP1_AGREEMENT, checked_file, compare, load

RING = "reference_gemma3_ring_synth.json"


@pytest.fixture(scope="module")
def ring(request, tmp_path_factory):
    """(reference, model file)"""
    return checked_file(RING, request, tmp_path_factory)


def _smaps_rss(base: int) -> int:
    """Bytes resident in the mapping that starts at `base` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) == base
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


def test_sliding_layers_hold_rings_and_the_plan_counts_them(ring):
    ref, path = ring
    with load(path, ref["settings"]) as m:
        kv, cfg = m.cache, m.cfg
        assert kv.swa_ctx == 256 and kv.n_cells == 1024  # 16 + 32 rounded up to 256
        assert kv.layer_cells == [256] * 5 + [1024]  # five sliding layers, one global
        assert kv.nbytes == kv_bytes(cfg, 1024, swa=256) < kv_bytes(cfg, 1024)
        assert m.plan.fixed_parts["kv_cache"] == kv.nbytes
    g, cfg, specs = fm.check_model(str(path))
    planned = fm.make_plan(g, cfg, specs, fm.Options(n_ctx=4096), 4096, 2)
    # one layer of 4096 cells, five of 16 + 512 rounded up to 768; a cell is K + V, 2 x 256 f16
    assert planned.plan.fixed_parts["kv_cache"] == (4096 + 5 * 768) * 1024 == 8_126_464
    assert kv_bytes(cfg, 4096) == 6 * 4096 * 1024  # what it was before the rings


def test_a_wrong_ring_cell_fails_the_reference(ring, monkeypatch):
    """Writing each key one cell off (p % (W - 1)) while the mask reads p % W: the comparison
    with llama.cpp that passes bit for bit fails by far."""
    ref, path = ring
    tf, n = ref["teacher_forced"], 400  # the rings wrap at 256
    with load(path, ref["settings"]) as m:
        assert compare(m.logits(tf["ids"][:n]), tf["top8_flash_attn_on"][:n]) == (1.0, 0.0)
    real = CacheLayout.cells_swa

    def off_by_one(self, seqs, pos):
        w = self.swa_ctx
        return real(self, seqs, pos) // w * w + np.asarray(pos) % (w - 1)
    monkeypatch.setattr(CacheLayout, "cells_swa", off_by_one)
    with load(path, ref["settings"]) as m:
        agree, diff = compare(m.logits(tf["ids"][:n]), tf["top8_flash_attn_on"][:n])
    assert agree < MIN_TOP1_AGREEMENT or diff > MAX_LOGIT_DIFF


def _fresh(path, ref, *runs):
    """Logits of the last run, each run (ids, pos) evaluated in turn in a fresh model."""
    with load(path, ref["settings"]) as m:
        for ids, pos in runs:
            out = m.evaluate(ids, pos, all_logits=True)
    return out


def test_prefix_reuse_only_while_the_rings_hold_it(ring, monkeypatch):
    """A slot that went on 20 positions past a 300-token prefix still holds the window before it:
    the prefix is reused and the logits are a fresh run's. One that went on 300 positions
    overwrote it (rings of 256): recomputed from 0. Reusing it anyway gives other logits."""
    ref, path = ring
    ids = ref["teacher_forced"]["ids"]
    a, b = ids[:300], ids[400:430]
    with load(path, ref["settings"]) as m:
        kv = m.cache
        m.evaluate(a, 0)
        m.evaluate(ids[300:320], 300)
        assert kv.reusable_prefix(0, a + b) == 300
        kv.keep(0, 300)
        near = m.evaluate(b, 300, all_logits=True)
        np.testing.assert_array_equal(near, _fresh(path, ref, (a, 0), (b, 300)))

        kv.keep(0, 300)
        m.evaluate(ids[300:600], 300)  # 600 positions: cells of 285..299 hold 541..555
        assert kv.common_prefix(0, a + b) == 300 and kv.reusable_prefix(0, a + b) == 0
        assert kv.keep(0, 300) == 0 and kv.tokens[0] == []  # keep refuses it too
        far = m.evaluate(a + b, 0, all_logits=True)
        fresh = _fresh(path, ref, (a + b, 0))
        np.testing.assert_array_equal(far, fresh)

        m.evaluate(ids[330:600], 330)
        monkeypatch.setattr(KVCache, "reusable", lambda self, seq, n: True)  # broken on purpose
        kv.keep(0, 300)
        stale = m.evaluate(b, 300, all_logits=True)
    assert not np.array_equal(stale, fresh[300:])


def _decode_two(path, ref, prompts, steps) -> list[np.ndarray]:
    """Two sequences prefilled one by one, then decoded together: each one's logits rows."""
    with load(path, ref["settings"], n_seq=2) as m:
        rows = [[m.evaluate(p, 0, seq=s)[-1]] for s, p in enumerate(prompts)]
        for i in range(len(steps[0]) - 1):
            b = TokenBatch()
            for s in range(2):
                b.add(steps[s][i], s, len(prompts[s]) + i, True)
            out = m.step(b)
            for s in range(2):
                rows[s].append(out[s])
    return [np.stack(r) for r in rows]


def test_sequences_decoded_together_keep_to_their_rings(ring):
    """Sequence 0 (the forced text from 0) decoded for 100 steps across its ring's end (256) next
    to sequence 1, then next to another sequence 1: its rows are the same bit for bit, and match
    llama.cpp's forced logits at those positions."""
    ref, path = ring
    ids, tf = ref["teacher_forced"]["ids"], ref["teacher_forced"]
    # sequence 1 at positions 190.. writes the cells of sequence 0's window, were they shared
    first = _decode_two(path, ref, [ids[:200], ids[300:490]], [ids[200:300], ids[490:590]])
    other = _decode_two(path, ref, [ids[:200], ids[100:290]], [ids[200:300], ids[600:700]])
    np.testing.assert_array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[1])
    agree, diff = compare(first[0], tf["top8_flash_attn_on"][199:299])
    assert agree >= MIN_TOP1_AGREEMENT and diff <= MAX_LOGIT_DIFF, (agree, diff)


def test_the_rings_are_charged_no_more_than_the_plan_counts(ring):
    """After 600 positions the sliding layers' pages stop at their 256 cells; what the memory
    holds is within kv_charged of the cache's cells_charged (the plan's stages use that)."""
    ref, path = ring
    ids = ref["teacher_forced"]["ids"]
    with load(path, ref["settings"]) as m:
        kv, cfg = m.cache, m.cfg
        m.evaluate(ids[:600], 0)
        rss, bound = _smaps_rss(kv._mem.base), kv_charged(cfg, kv.cells_charged(), swa=256)
        assert rss <= bound
        assert bound == (600 + 5 * 256) * 1024  # one global layer at 600 cells, five rings
        assert rss > 0.9 * bound
