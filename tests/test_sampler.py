import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flexinfer.errors import FlexInferError
from flexinfer.sampler import make_sampler


def _logits(n=1000, seed=0):
    return np.random.default_rng(seed).normal(0, 3, n).astype(np.float32)


def _draws(sampler, logits, n=2000):
    return np.array([sampler(logits, []) for _ in range(n)])


def test_greedy_picks_argmax_and_ignores_other_settings():
    logits = _logits()
    s = make_sampler(temperature=0, top_k=5, top_p=0.1, min_p=0.9, seed=1)
    assert s(logits, []) == int(np.argmax(logits))


def test_greedy_ties_go_to_lowest_id():
    logits = np.zeros(10, np.float32)
    logits[[7, 3, 9]] = 5.0
    assert make_sampler(temperature=0)(logits, []) == 3


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=st.floats(-50, 50, width=32)),
       st.integers(0, 2**32))
def test_top_k_1_equals_greedy(logits, seed):
    greedy = make_sampler(temperature=0)(logits, [])
    assert make_sampler(temperature=1.5, top_k=1, top_p=1, min_p=0, seed=seed)(logits, []) == greedy


def test_same_seed_same_draws_different_seeds_differ():
    logits = np.zeros(500, np.float32)  # uniform: every draw is pure randomness
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = _draws(make_sampler(seed=42, **kw), logits, 200)
    b = _draws(make_sampler(seed=42, **kw), logits, 200)
    c = _draws(make_sampler(seed=43, **kw), logits, 200)
    assert (a == b).all()
    assert (a != c).sum() > 150


def test_seed_none_is_random():
    logits = np.zeros(500, np.float32)
    a = _draws(make_sampler(temperature=1, top_k=0, min_p=0, top_p=1), logits, 50)
    b = _draws(make_sampler(temperature=1, top_k=0, min_p=0, top_p=1), logits, 50)
    assert (a != b).any()


def test_top_k_keeps_only_the_k_best():
    logits = _logits()
    best5 = set(np.argsort(-logits)[:5].tolist())
    drawn = set(_draws(make_sampler(temperature=5.0, top_k=5, top_p=1, min_p=0, seed=0), logits))
    assert drawn == best5


def test_small_top_p_keeps_only_the_top_token():
    logits = _logits()
    s = make_sampler(temperature=2.0, top_k=0, top_p=1e-6, min_p=0, seed=0)
    assert set(_draws(s, logits, 300)) == {int(np.argmax(logits))}


def test_top_p_keeps_the_smallest_head_reaching_the_mass():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps 2 tokens, 0.81 keeps 3
    logits = np.log(np.array([0.05, 0.3, 0.5, 0.15], np.float32))
    kw = dict(temperature=1.0, top_k=0, min_p=0, seed=0)
    assert set(_draws(make_sampler(top_p=0.79, **kw), logits)) == {2, 1}
    assert set(_draws(make_sampler(top_p=0.81, **kw), logits)) == {2, 1, 3}


def test_top_p_without_top_k_on_a_flat_tail_widens_its_search():
    logits = np.zeros(5000, np.float32)  # no head: top-p 0.5 needs 2500 tokens, past the first 64
    s = make_sampler(temperature=1.0, top_k=0, top_p=0.5, min_p=0, seed=0)
    assert len(set(_draws(s, logits, 3000))) > 1000


def test_top_p_follows_the_draw_probabilities():
    logits = np.log(np.array([0.6, 0.4], np.float32))
    draws = _draws(make_sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=3), logits, 20000)
    assert abs((draws == 0).mean() - 0.6) < 0.02


def test_min_p_filters_relative_to_the_max():
    # p relative to max: 1.0, 0.5, 0.2, 0.01
    logits = np.log(np.array([1.0, 0.5, 0.2, 0.01], np.float32))
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, seed=0)
    assert set(_draws(make_sampler(min_p=0.3, **kw), logits)) == {0, 1}
    assert set(_draws(make_sampler(min_p=0.1, **kw), logits)) == {0, 1, 2}
    assert set(_draws(make_sampler(min_p=1.0, **kw), logits)) == {0}


def test_temperature_sharpens_and_flattens():
    logits = np.array([1.0, 0.0], np.float32)
    kw = dict(top_k=0, top_p=1.0, min_p=0, seed=0)
    cold = (_draws(make_sampler(temperature=0.25, **kw), logits, 5000) == 0).mean()
    hot = (_draws(make_sampler(temperature=4.0, **kw), logits, 5000) == 0).mean()
    assert cold > 0.95  # e^4 / (1 + e^4) = 0.982
    assert 0.5 < hot < 0.6  # e^0.25 / (1 + e^0.25) = 0.562


def test_repeat_penalty_lowers_a_repeated_tokens_logit():
    logits = np.array([2.0, 1.9, -1.0, -1.2], np.float32)
    s = make_sampler(temperature=0, repeat_penalty=1.5)
    assert s(logits, []) == 0
    assert s(logits, [0]) == 1  # 2.0 / 1.5 = 1.33 < 1.9
    logits2 = np.array([-1.0, -1.2, -5, -5], np.float32)
    assert make_sampler(temperature=0, repeat_penalty=1.5)(logits2, [0]) == 1  # -1.0 * 1.5 = -1.5


def test_repeat_penalty_window_and_caller_array_untouched():
    logits = np.array([2.0, 1.9, 0.0], np.float32)
    before = logits.copy()
    s = make_sampler(temperature=0, repeat_penalty=1.5, repeat_last_n=2)
    assert s(logits, [0, 2, 2]) == 0  # token 0 is outside the last 2
    assert s(logits, [2, 0, 2]) == 1
    assert make_sampler(temperature=0, repeat_penalty=1.5, repeat_last_n=-1)(logits, [0] + [2] * 99) == 1
    assert make_sampler(temperature=0, repeat_penalty=1.5, repeat_last_n=0)(logits, [0]) == 0
    np.testing.assert_array_equal(logits, before)


def test_all_minus_inf_but_one():
    logits = np.full(100, -np.inf, np.float32)
    logits[17] = 0.0
    assert set(_draws(make_sampler(temperature=1, top_k=0, top_p=1, min_p=0, seed=0), logits, 100)) == {17}


def test_no_finite_logit_raises():
    with pytest.raises(FlexInferError, match="finite"):
        make_sampler(temperature=1, top_k=0, seed=0)(np.full(10, np.nan, np.float32), [])


@pytest.mark.parametrize("kwargs, option", [
    (dict(temperature=-0.1), "--temperature"),
    (dict(temperature=float("nan")), "--temperature"),
    (dict(top_k=-1), "--top-k"),
    (dict(top_k=2.5), "--top-k"),
    (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"),
    (dict(min_p=-0.01), "--min-p"),
    (dict(min_p=1.1), "--min-p"),
    (dict(repeat_penalty=0.0), "--repeat-penalty"),
    (dict(repeat_last_n=-2), "--repeat-last-n"),
    (dict(seed=-1), "--seed"),
    (dict(seed="7"), "--seed"),
])
def test_invalid_args_raise_naming_the_option(kwargs, option):
    with pytest.raises(FlexInferError, match=f"^{option} must be"):
        make_sampler(**kwargs)


def test_error_message_shape():
    with pytest.raises(FlexInferError) as e:
        make_sampler(top_p=1.5)
    assert str(e.value) == "--top-p must be in (0, 1], got 1.5"


def test_fast_on_a_150k_vocab():
    logits = _logits(150_000)
    history = list(range(0, 4096, 7))
    for kw in (dict(), dict(top_k=0), dict(top_k=0, min_p=0), dict(repeat_penalty=1.1)):
        s = make_sampler(seed=0, **kw)
        s(logits, history)
        t = time.perf_counter()
        for _ in range(20):
            s(logits, history)
        per_token = (time.perf_counter() - t) / 20
        assert per_token < 0.05, (kw, per_token)  # 1-12 ms here; 50 ms leaves room for a busy CI


def test_frequency_penalty_subtracts_count_times_penalty():
    logits = np.array([3.0, 2.0, 0.0], np.float32)
    assert make_sampler(temperature=0, frequency_penalty=0.4)(logits, [0, 0]) == 0  # 3 - 0.8 = 2.2
    assert make_sampler(temperature=0, frequency_penalty=0.6)(logits, [0, 0]) == 1  # 3 - 1.2 = 1.8
    assert make_sampler(temperature=0, frequency_penalty=0.4)(logits, [0, 0, 0]) == 1  # 3 - 1.2


def test_presence_penalty_is_once_per_token_whatever_the_count():
    logits = np.array([3.0, 2.0, 0.0], np.float32)
    assert make_sampler(temperature=0, presence_penalty=0.9)(logits, [0] * 5) == 0  # 3 - 0.9
    assert make_sampler(temperature=0, presence_penalty=1.1)(logits, [0]) == 1  # 3 - 1.1
    both = make_sampler(temperature=0, presence_penalty=0.3, frequency_penalty=0.3)
    assert both(logits, [0, 0]) == 0  # 3 - 0.6 - 0.3 = 2.1
    assert both(logits, [0, 0, 0]) == 1  # 3 - 0.9 - 0.3 = 1.8
    assert make_sampler(temperature=0, presence_penalty=-1.5)(logits, [1]) == 1  # 2 + 1.5 > 3


def test_penalties_skip_the_prompt_and_leave_the_callers_array():
    logits = np.array([3.0, 2.0, 0.0], np.float32)
    before = logits.copy()
    s = make_sampler(temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    assert s(logits, [0, 0, 0], n_prompt=3) == 0  # only prompt tokens: nothing generated yet
    assert s(logits, [0, 0, 0, 0], n_prompt=3) == 1
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [-2.1, 2.5, float("nan"), "1"])
def test_penalty_range_checked(name, value):
    with pytest.raises(FlexInferError, match=f"^{name} must be in \\[-2, 2\\]"):
        make_sampler(**{name: value})


class _FixedLogitsModel:
    """A stand-in for Model in generate_ids: every step the same logits (token 5 best, then 4)."""
    n_ctx = 64

    class tokenizer:
        eog_ids = {0}

    class cache:
        @staticmethod
        def reusable_prefix(seq, ids):
            return 0

    def check_tokens(self, ids):
        pass

    def io_counters(self):
        return 0, 0.0, 0.0, 0.0, 0

    def expert_counters(self):
        return 0, 0, 0, 0

    def evaluate(self, ids, pos, seq=0):
        row = np.zeros(8, np.float32)
        row[5], row[4] = 2.0, 1.5
        return row[None, :]


def test_generate_ids_applies_the_penalties_to_generated_tokens_only():
    from flexinfer.generate import SamplingOptions, generate_ids
    model, prompt = _FixedLogitsModel(), [5, 5, 5, 5]
    plain = SamplingOptions(max_tokens=4, temperature=0)
    assert list(generate_ids(model, prompt, plain)) == [5, 5, 5, 5]
    freq = SamplingOptions(max_tokens=4, temperature=0, frequency_penalty=0.4)
    # 5 then (2 - 0.4 = 1.6 > 1.5) 5 then (2 - 0.8 < 1.5) 4 then (1.5 - 0.4 = 1.1 < 1.2) 5
    assert list(generate_ids(model, prompt, freq)) == [5, 5, 4, 5]
