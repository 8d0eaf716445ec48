"""Model.set_memory_budget (issue 11): a new plan while the model runs, reached by moving blocks
between resident and streamed (residency.py). The logits never change by a bit; resident bytes
follow the budget; a budget below the minimum changes nothing; and no moment of a change holds more
than the larger of the two budgets allows.

The models here have 8 layers, so that the layers, not the 32000-token head, are most of the
weights (as in real models), and their matrices are cut into 16 KiB blocks (planner STREAM_CHUNK)
to give the planner and the store many blocks to move, as a 7B's 8 MiB blocks do."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import flexinfer.model as fm
from flexinfer import planner
from flexinfer.bench.synth import SynthSpec, write_synthetic
from flexinfer.errors import FlexInferError

PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]
ROOMY = 1 << 40  # everything fits


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(planner, "STREAM_CHUNK", 16 << 10)


@pytest.fixture(scope="module")
def layered_path(tmp_path_factory):
    spec = SynthSpec("llama", 8, 256, 1024, 4, 2, seed=11)
    return write_synthetic(tmp_path_factory.mktemp("layered") / "layered.gguf", spec)


@pytest.fixture(scope="module")
def layered_tied_path(tmp_path_factory):
    spec = SynthSpec("llama", 8, 256, 1024, 4, 2, tied=True, seed=12)
    return write_synthetic(tmp_path_factory.mktemp("layered") / "layered-tied.gguf", spec)


def _load(path, **opts):
    # 16-token prompt batches: a small prompt buffer, so the minimum is set by the weights
    return fm.load(path, n_ctx=64, n_threads=2, memory_budget=ROOMY, n_ubatch=16, **opts)


def _greedy(m, n_steps: int, changes: dict[int, int] | None = None):
    """The prompt's logits and n_steps greedy steps' logits; before step k (1-based), the budget
    changes to changes[k]. Returns the logits and the resident bytes after every step."""
    ids = [t % m.cfg.n_vocab for t in PROMPT]
    out, held = [m.evaluate(ids, 0)], [m.resident_weight_bytes()]
    for k in range(1, n_steps + 1):
        if changes and k in changes:
            m.set_memory_budget(changes[k])
            assert m.plan.total_bytes() <= changes[k]
        ids.append(int(out[-1][-1].argmax()))
        out.append(m.evaluate(ids[-1:], len(ids) - 1))
        held.append(m.resident_weight_bytes())
    return np.concatenate(out), held


@pytest.mark.parametrize("model", ["layered_path", "layered_tied_path"])
@pytest.mark.parametrize("mode", ["flexinfer", "sync"])
def test_shrinking_and_growing_mid_generation_is_bit_exact(model, mode, request):
    path = request.getfixturevalue(model)
    with _load(path, offload=mode) as m:
        reference, held0 = _greedy(m, 12)
    with _load(path, offload=mode) as m:
        least = m.minimum_budget()
        whole = m.plan.total_bytes()  # all resident
        mid = (least + whole) // 2
        changed, held = _greedy(m, 12, {3: least, 6: mid, 9: ROOMY})
        assert m.stats.budget_changes == 3
        reads = m._reader.bytes_read
    assert held0[-1] == held[0]  # everything resident at first
    assert held[3] < held[6] < held[9] == held[0]  # the minimum keeps least, then more, then all
    assert reads > 0  # the minimum's plan streamed
    assert np.array_equal(changed, reference)


def test_a_budget_below_the_minimum_changes_nothing(layered_path):
    with _load(layered_path) as m:
        least = m.minimum_budget()
        plan, held = m.plan, m.resident_weight_bytes()
        with pytest.raises(FlexInferError, match="below the minimum working set"):
            m.set_memory_budget(least - 1)
        with pytest.raises(FlexInferError, match="memory budget: cannot read"):
            m.set_memory_budget("lots")
        assert m.plan is plan and m.resident_weight_bytes() == held
        assert m.memory_budget == ROOMY and m.budget_source == "--memory-budget"
        change = m.set_memory_budget(least, source="test")
        assert (change.old, change.new, change.source) == (ROOMY, least, "test")
        assert change.released_bytes > 0 and change.read_bytes == 0
        assert m.memory_budget == least and m.stats.budget_bytes == least


def _room(plan, stage: int) -> int:
    """What a plan leaves the weights (resident rows, ring, bounce) at a stage: its budget less its
    fixed costs, of which the KV cache bytes not yet written at that stage are not charged."""
    unused = plan.stages[stage].kv_unused if stage < len(plan.stages) else 0
    return plan.budget_bytes - plan.fixed_bytes + unused


def test_no_moment_of_a_change_exceeds_the_larger_budget(layered_path):
    """Random budget sequences: after each change the plan fits its budget, the resident blocks
    are the plan's target, the ring is the plan's; and while blocks are being read back, what
    the weights hold (resident rows, the ring, the bounce buffer) never exceeds the larger of the
    two budgets' room for them. The logits after all of it equal the first ones."""
    with _load(layered_path) as m:
        r, store = m._residency, m._store
        least, whole = m.minimum_budget(), m.plan.total_bytes()
        ids = [t % m.cfg.n_vocab for t in PROMPT]
        first = m.logits(ids)
        peaks = []
        read_home = store.read_home

        def watched(b):
            read_home(b)
            ring = r.ring.size if r.ring is not None else 0
            bounce = store.bounce.size if store.bounce is not None else 0
            peaks.append((r.resident_bytes + b.nbytes + ring + bounce, "read", r.lent, ring, bounce))
        store.read_home = watched

        copy_home = r._copy_home

        def watched_copy(layer):  # growing through the ring: within the new budget as it goes
            copy_home(layer)
            peaks.append((r.resident_bytes + r._grown_bytes + r.ring.size + store.bounce.size, "copy", r.ring.size, store.bounce.size))
        r._copy_home = watched_copy

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.tuples(st.integers(least, whole + (1 << 20)), st.booleans()),
                        min_size=1, max_size=4))
        def check(changes):
            for budget, step in changes:
                before = m.plan
                peaks.clear()
                m.set_memory_budget(budget)
                if step:  # the blocks arriving grow through the ring, or are read at its end
                    m.logits(ids[:1])
                m.settle()
                room = max(_room(before, r.stage), _room(m.plan, r.stage))
                assert all(p[0] <= room for p in peaks), ([p for p in peaks if p[0] > room], room, m.plan.bounce_bytes, m.plan.ring_bytes, before.ring_bytes)
                assert m.plan.total_bytes() <= budget
                assert r.resident == r.target() and r.pending_bytes() == 0
                if r.ring is not None:
                    assert r.ring.size == -(-m.plan.ring_bytes // 4096) * 4096
            assert np.array_equal(m.logits(ids), first)
        check()


def test_growing_through_the_ring_reads_nothing_more(layered_path):
    """From the minimum to all resident while decoding: the call reads nothing; the next step
    streams as a step at the minimum does (its read-ahead cut short at the change and at its end)
    and copies the arriving blocks home; after it everything is resident and nothing is read."""
    with _load(layered_path) as m:
        reference, _ = _greedy(m, 6)
    with _load(layered_path) as m:
        m.set_memory_budget(m.minimum_budget())
        ids = [t % m.cfg.n_vocab for t in PROMPT]
        out, reads = [m.evaluate(ids, 0)], []
        for k in range(1, 7):
            if k == 3:
                change = m.set_memory_budget(ROOMY)
                assert change.read_bytes == 0 and change.pending_bytes > 0
            ids.append(int(out[-1][-1].argmax()))
            r0 = m._reader.bytes_read
            out.append(m.evaluate(ids[-1:], len(ids) - 1))
            reads.append(m._reader.bytes_read - r0)
        assert m._residency.pending_bytes() == 0 and m._residency.ring is None
        assert m.resident_weight_bytes() == sum(b.nbytes for b in m._store.all_blocks())
    assert min(reads[:2]) > 0 and reads[2] < 2 * max(reads[:2]) and reads[3:] == [0, 0, 0]
    assert np.array_equal(np.concatenate(out), reference)


def _split_matrices(m) -> int:
    """Matrices the graphs now see as more than one header (a tuple of runs and blocks)."""
    _, layers = m._residency.view()
    return sum(isinstance(w, tuple) for d in layers for w in d.values())


def test_a_matrix_resident_whole_is_one_header(layered_path):
    """Blocks are the unit of residency, but a run of resident blocks is one header over them
    (weights.WeightStore.view): whole matrices multiply as one mul_mat, split ones as their runs
    and streamed blocks, and the view follows the budget both ways."""
    with _load(layered_path) as m:
        assert max(len(bs) for bs in m._store.blocks.values()) > 2  # 16 KiB blocks: many
        assert _split_matrices(m) == 0
        ids = [t % m.cfg.n_vocab for t in PROMPT]
        whole = m.evaluate(ids, 0)
        m.set_memory_budget(m.minimum_budget())
        assert _split_matrices(m) > 0
        streamed = m.evaluate(ids, 0)
        m.set_memory_budget(ROOMY)
        m.settle()
        assert _split_matrices(m) == 0
        again = m.evaluate(ids, 0)
    assert np.array_equal(whole, streamed) and np.array_equal(whole, again)
