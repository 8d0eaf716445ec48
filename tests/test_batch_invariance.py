"""A sequence's logits in a batch equal its logits alone, bit for bit, past 256 positions (issue 10's
bug: from position 256 on, a sequence decoded beside another stopped matching its run alone).

ggml's CPU flash attention picks its kernel from the shapes it is given: one token over 512 or
more cells splits the cells among the threads and merges the partial sums (its split-KV path),
64 or more query rows take the tiled kernel, anything else the untiled loop; the three round
differently. One attention call over every slot gave a sequence decoded beside others the untiled
loop where alone, at position 256 and on (a 512-cell bucket), it took the split path; and a short
prompt beside a long one took the tiles. The engine now runs attention once per sequence, over its
own slot's cells padded as alone, and cuts each sequence's tokens into micro-batches as alone.

Every comparison here is exact (assert_array_equal): on a tiny synthetic llama (2 layers, GQA; the
same ggml kernels, a second in all) and, for decoding across 256, on SmolLM2 too."""

from __future__ import annotations

import numpy as np
import pytest

import flexinfer.model as fm
from flexinfer.batch import TokenBatch

N_CTX = 512
rng = np.random.default_rng(10)
A = [1] + [int(t) for t in rng.integers(100, 30000, 320)]  # token ids: any text will do
B = [1] + [int(t) for t in rng.integers(100, 30000, 320)]


def _load(path, n_seq, n_ubatch):
    return fm.load(path, n_ctx=N_CTX, n_threads=2, n_seq=n_seq, n_ubatch=n_ubatch)


def _alone(path, ids, n_prompt, end, n_ubatch, rows=None):
    """ids[:n_prompt] as one prompt step (logits of `rows`, default the last), then ids[n_prompt:
    end] decoded one step each: the logits rows, in order."""
    with _load(path, 1, n_ubatch) as m:
        b = TokenBatch()
        for p in range(n_prompt):
            b.add(ids[p], 0, p, p in rows if rows is not None else p == n_prompt - 1)
        out = [m.step(b)]
        for p in range(n_prompt, end):
            out.append(m.step(TokenBatch([ids[p]], [0], [p], [True])))
        return np.concatenate(out)


@pytest.mark.parametrize("model, U", [("tiny_llama_path", 512), ("tiny_llama_path", 128),
                                      ("smollm2_path", 512)])
def test_decoding_beside_another_sequence_past_256_equals_alone(model, U, request):
    """A (slot 1) decodes from 250 to 258 beside B (slot 0, 40 to 48) after both prompts ran in
    one step (U 512: one micro-batch; U 128: three, each sequence cut as alone: B's 40, A's 128
    and 122), one token each per step, in alternating order. Every logits row of each equals its
    row alone, before and after position 256 (where A alone reads 512 cells)."""
    path = request.getfixturevalue(model)
    na, nb, steps = 250, 40, 8
    with _load(path, 2, U) as m:
        b = TokenBatch()
        b.add_run(B[:nb], 0, 0)
        b.add_run(A[:na], 1, 0)
        first = m.step(b)
        got_a, got_b = [first[1:]], [first[:1]]
        for i in range(steps):
            d = TokenBatch()
            for seq, ids, p in sorted([(0, B, nb + i), (1, A, na + i)], reverse=i % 2 == 1):
                d.add(ids[p], seq, p, True)
            rows = m.step(d)
            got_b.append(rows[:1] if i % 2 == 0 else rows[1:])
            got_a.append(rows[1:] if i % 2 == 0 else rows[:1])
    want_a = _alone(path, A, na, na + steps, U)
    want_b = _alone(path, B, nb, nb + steps, U)
    got_a, got_b = np.concatenate(got_a), np.concatenate(got_b)
    assert got_a.shape == want_a.shape == (steps + 1, m.cfg.n_vocab)
    for name, got, want, n in (("A", got_a, want_a, na), ("B", got_b, want_b, nb)):
        for i in range(steps + 1):  # the first row that differs, by position, if one does
            np.testing.assert_array_equal(got[i], want[i], err_msg=f"{name} at position {n + i - 1}")


def test_a_prompt_step_past_256_beside_a_short_prompt_equals_alone(tiny_llama_path):
    """A's 300-token prompt and B's 20-token prompt in one step (320 tokens: one micro-batch):
    A's rows on both sides of 256 and all of B's equal their rows alone (A: 300 rows, tiled; B:
    20 rows, untiled, as alone), and so does the next decode step of each."""
    na, nb = 300, 20
    rows_a = [0, 63, 64, 200, 255, 256, 257, 299]
    with _load(tiny_llama_path, 2, 512) as m:
        b = TokenBatch()
        for p in range(na):
            b.add(A[p], 0, p, p in rows_a)
        b.add_run(B[:nb], 1, 0, all_logits=True)
        got = m.step(b)
        nxt = m.step(TokenBatch([B[nb], A[na]], [1, 0], [nb, na], [True, True]))
    want_a = _alone(tiny_llama_path, A, na, na + 1, 512, rows=rows_a)
    want_b = _alone(tiny_llama_path, B, nb, nb + 1, 512, rows=range(nb))
    np.testing.assert_array_equal(got[:len(rows_a)], want_a[:-1])
    np.testing.assert_array_equal(got[len(rows_a):], want_b[:-1])
    np.testing.assert_array_equal(nxt[1], want_a[-1])
    np.testing.assert_array_equal(nxt[0], want_b[-1])


def test_interleaved_tokens_come_back_in_batch_order(tiny_llama_path):
    """A batch whose sequences' tokens are interleaved runs as if grouped; its logits rows still
    follow the batch's order."""
    with _load(tiny_llama_path, 2, 64) as m:
        b = TokenBatch()
        for p in range(6):
            b.add(A[p], 0, p, True)
            b.add(B[p], 1, p, p % 2 == 0)
        mixed = m.step(b)
    with _load(tiny_llama_path, 2, 64) as m:
        g = TokenBatch()
        g.add_run(A[:6], 0, 0, all_logits=True)
        for p in range(6):
            g.add(B[p], 1, p, p % 2 == 0)
        grouped = m.step(g)
    order = [0, 6, 1, 2, 7, 3, 4, 8, 5]  # mixed rows: a0 b0 a1 a2 b2 a3 a4 b4 a5
    np.testing.assert_array_equal(mixed, grouped[order])


@pytest.mark.parametrize("seqs, U, n_batch, cuts", [
    ([0] * 5, 2, 2, [2, 2, 1]),
    ([0, 1, 1, 1], 3, 3, [1, 3]),  # B's three tokens do not join A's one: 3 is B's piece alone
    ([0, 0, 1, 2], 3, 3, [3, 1]),
    ([0, 1, 2], 1, 1, [1, 1, 1]),
    ([0, 1, 1, 1, 1], 3, 4, [4, 1]),  # A's token and B's first piece share a micro-batch
])
def test_micro_batches_cut_each_sequence_as_alone(seqs, U, n_batch, cuts):
    from flexinfer.engine import Engine
    eng = Engine.__new__(Engine)
    eng.n_ubatch, eng.n_batch = U, n_batch
    b = TokenBatch(list(range(len(seqs))), seqs, list(range(len(seqs))), [False] * len(seqs))
    assert [len(c) for c in eng._chunks(b)] == cuts


def _record_logits(monkeypatch) -> dict:
    """The samplers (the scheduler's and generate's) pick greedily and keep every logits row they
    see, by SamplingOptions."""
    from flexinfer import generate, scheduler
    seen = {}

    def sampler_for(opts):
        rows = seen.setdefault(id(opts), [])

        def sample(logits, history, n_prompt):
            rows.append(np.array(logits))
            return int(np.argmax(logits))
        return sample
    monkeypatch.setattr(scheduler, "sampler_for", sampler_for)
    monkeypatch.setattr(generate, "sampler_for", sampler_for)
    return seen


def test_a_long_prompt_beside_a_decoding_sequence_equals_alone(tiny_llama_path, monkeypatch):
    """BatchLoop: X decodes while Y's 150-token prompt goes in beside it, cut as alone (64, 64 and
    22 tokens at n_ubatch 64, each with X's token in one micro-batch of n_batch 65), not at the
    63 tokens X would leave of 64. Y's rows (its prompt's last, then each decode step) equal
    Y's run alone (Model.generate), and X's equal X's."""
    from flexinfer.generate import SamplingOptions
    from flexinfer.scheduler import BatchLoop, Request
    seen = _record_logits(monkeypatch)
    x_opts = SamplingOptions(max_tokens=12, temperature=0, ignore_eos=True)
    y_opts = SamplingOptions(max_tokens=4, temperature=0, ignore_eos=True)
    X, Y = A[:10], B[:150]
    with _load(tiny_llama_path, 2, 64) as m:
        loop = BatchLoop(m)
        for ids, opts in ((X, x_opts), (Y, y_opts)):
            loop.add(Request(ids, opts), lambda e: None)
            loop.step()
        while not loop.idle:
            loop.step()
    x_both, y_both = np.stack(seen.pop(id(x_opts))), np.stack(seen.pop(id(y_opts)))
    for ids, opts, both in ((X, x_opts, x_both), (Y, y_opts, y_both)):
        with _load(tiny_llama_path, 1, 64) as m:
            list(m.generate(ids, **vars(opts)))
        (alone,) = [np.stack(rows) for rows in seen.values()]
        seen.clear()
        assert both.shape == (opts.max_tokens, m.cfg.n_vocab)  # the prompt's last row, then decode
        np.testing.assert_array_equal(both, alone)
