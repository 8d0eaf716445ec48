"""Several sequences per weight pass (issue 10): a sequence in a batch gives exactly its tokens alone
(SmolLM2's kernels are batch-invariant), streamed batches equal resident ones bit for bit, prefix
reuse evaluates only what is new, and the scheduler admits, cancels and queues without disturbing
the others."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import flexinfer.model as fm
from flexinfer.batch import TokenBatch
from flexinfer.errors import FlexInferError
from flexinfer.generate import SamplingOptions
from flexinfer.scheduler import BatchLoop, QueueFull, Request
from tests.test_engine import PROMPT, _squeeze_budget

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "1, 2, 3, 4,",
           "def fibonacci(n):"]
N = 12  # tokens generated per sequence


def _greedy(max_tokens=N, **kw):
    return SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def alone(smollm2_path):
    """Each prompt's greedy tokens, run alone in a one-sequence model."""
    with fm.load(smollm2_path, n_ctx=128, n_threads=2) as m:
        return [[p.token for p in m.generate(text, max_tokens=N, temperature=0, ignore_eos=True)]
                for text in PROMPTS]


@pytest.fixture(scope="module")
def smol4(smollm2_path):
    with fm.load(smollm2_path, n_ctx=128, n_threads=2, n_seq=4) as m:
        yield m


def _submit(loop, m, text, opts, out, key, **kw):
    out[key] = {"tokens": [], "done": None}

    def on_event(e):
        if e.kind == "piece" and e.token >= 0:
            out[key]["tokens"].append(e.token)
        elif e.kind != "piece":
            out[key]["done"] = e
    return loop.add(Request(m.tokenize(text), opts, **kw), on_event)


def test_a_sequence_in_a_batch_gives_its_tokens_alone(smol4, alone):
    """Sequences join one per step while the others decode; the third is cancelled midway."""
    loop, out = BatchLoop(smol4), {}
    handles = []
    for i, text in enumerate(PROMPTS):
        handles.append(_submit(loop, smol4, text, _greedy(), out, i))
        loop.step()
    for _ in range(4):
        loop.step()
    handles[2].cancel()
    while not loop.idle:
        loop.step()
    for i in (0, 1, 3):
        assert out[i]["tokens"] == alone[i], f"sequence {i} differs from its run alone"
        assert out[i]["done"].finish_reason == "length"
    assert out[2]["done"].finish_reason == "cancelled"
    assert 0 < len(out[2]["tokens"]) < N
    assert out[2]["tokens"] == alone[2][:len(out[2]["tokens"])]


def test_batched_logits_equal_logits_alone(smol4, smollm2_path):
    """Two sequences prefilled in one step and decoded together: each row is its run alone."""
    a, b = smol4.tokenize(PROMPTS[0]), smol4.tokenize(PROMPTS[1])
    for s in range(2):
        smol4.cache.keep(s, 0)
    batch = TokenBatch()
    batch.add_run(a, 0, 0, all_logits=True)
    batch.add_run(b, 1, 0, all_logits=True)
    both = smol4.step(batch)
    with fm.load(smollm2_path, n_ctx=128, n_threads=2) as m:
        np.testing.assert_array_equal(both[:len(a)], m.logits(a))
        np.testing.assert_array_equal(both[len(a):], m.logits(b))


def test_same_seed_same_text_as_alone(smol4, smollm2_path):
    opts = SamplingOptions(max_tokens=N, temperature=0.9, seed=1234, ignore_eos=True)
    with fm.load(smollm2_path, n_ctx=128, n_threads=2) as m:
        ref = [p.token for p in m.generate(PROMPTS[1], **vars(opts))]
    loop, out = BatchLoop(smol4), {}
    _submit(loop, smol4, PROMPTS[0], _greedy(), out, "other")
    _submit(loop, smol4, PROMPTS[1], opts, out, "seeded")
    while not loop.idle:
        loop.step()
    assert out["seeded"]["tokens"] == ref


@pytest.mark.parametrize("mode", ["flexinfer", "sync", "prefetch", "mmap"])
def test_streamed_batches_equal_resident_batches(tiny_llama_path, monkeypatch, mode):
    def run(**opts):
        with fm.load(tiny_llama_path, n_ctx=64, n_threads=2, n_seq=3, **opts) as m:
            b = TokenBatch()
            for s in range(3):
                b.add_run(PROMPT[s:s + 6], s, 0, all_logits=True)
            first = m.step(b)
            d = TokenBatch()
            for s in range(3):
                d.add(PROMPT[s + 6], s, 6, True)
            return np.concatenate([first, m.step(d)]), m.io_counters()[0]
    resident, _ = run(repack=mode != "mmap")  # a mapping cannot be repacked: compare plain kernels
    _squeeze_budget(monkeypatch, 0.5)
    streamed, bytes_read = run(offload=mode)
    if mode != "mmap":
        assert bytes_read > 0  # weights did stream
    np.testing.assert_array_equal(streamed, resident)


def test_prefix_reuse_evaluates_only_what_is_new(smol4, smollm2_path):
    loop, out = BatchLoop(smol4, n_parallel=1), {}
    _submit(loop, smol4, PROMPTS[1], _greedy(4), out, "first")
    while not loop.idle:
        loop.step()
    longer = PROMPTS[1] + " there lived an old man"
    _submit(loop, smol4, longer, _greedy(), out, "second")
    while not loop.idle:
        loop.step()
    cached = out["second"]["done"].usage["cached_tokens"]
    assert cached >= len(smol4.tokenize(PROMPTS[1])) - 1
    with fm.load(smollm2_path, n_ctx=128, n_threads=2) as m:
        ref = [p.token for p in m.generate(longer, max_tokens=N, temperature=0, ignore_eos=True)]
    assert out["second"]["tokens"] == ref


def test_chat_turns_prefill_only_the_new_turn(smollm2_path):
    from flexinfer.stats import RunTimes
    with fm.load(smollm2_path, n_ctx=256, n_threads=2) as m:
        msgs = [{"role": "user", "content": "Hi"}]
        t1 = RunTimes()
        reply = "".join(p.text for p in m.chat(msgs, max_tokens=8, temperature=0, times=t1))
        msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And?"}]
        t2 = RunTimes()
        list(m.chat(msgs, max_tokens=4, temperature=0, times=t2))
    assert t1.cached_tokens == 0
    assert t2.cached_tokens >= t1.prompt_tokens
    assert t2.as_dict(m.stats)["cached_tokens"] == t2.cached_tokens


def test_requests_wait_in_order_when_slots_run_out(smol4):
    loop, out = BatchLoop(smol4, n_parallel=2, max_queue=3), {}
    for i in range(2):
        _submit(loop, smol4, PROMPTS[i], _greedy(3), out, i)
    loop.step()  # both run; the next three wait
    for i in range(2, 5):
        _submit(loop, smol4, PROMPTS[i % 4], _greedy(3), out, i)
    with pytest.raises(QueueFull):
        _submit(loop, smol4, PROMPTS[0], _greedy(3), out, "one too many")
    assert loop.stats()["running"] == 2 and loop.stats()["queued"] == 3
    finished = []
    while not loop.idle:
        loop.step()
        finished += [k for k, v in out.items() if v["done"] and k not in finished]
    assert finished[:2] in ([0, 1], [1, 0]) and finished[2:] == [2, 3, 4]
    assert all(len(out[i]["tokens"]) == 3 for i in range(5))


def test_stop_strings_end_the_text_before_them(smol4, alone):
    text = smol4.detokenize(alone[2])  # 1, 2, 3, 4, -> " 5, 6, ..."
    stop = text.strip().split(" ")[1]  # the second number and its comma
    loop, out, pieces = BatchLoop(smol4), {}, []
    loop.add(Request(smol4.tokenize(PROMPTS[2]), _greedy(), (stop,)),
             lambda e: pieces.append(e))
    while not loop.idle:
        loop.step()
    got = "".join(e.text for e in pieces if e.kind == "piece")
    assert pieces[-1].finish_reason == "stop"
    assert stop not in got and text.startswith(got)


def test_bad_batches_and_requests_are_refused(smol4):
    b = TokenBatch()
    b.add(1, 7, 0)
    with pytest.raises(FlexInferError, match="sequence 7 is outside"):
        smol4.step(b)
    smol4.cache.keep(0, 0)
    b = TokenBatch()
    b.add(1, 0, 5)
    with pytest.raises(FlexInferError, match="continues at position 0"):
        smol4.step(b)
    loop = BatchLoop(smol4)
    with pytest.raises(FlexInferError, match="context holds 128"):
        loop.add(Request([1] * 200), print)
    with pytest.raises(FlexInferError, match="--parallel: 5"):
        BatchLoop(smol4, n_parallel=5)


def test_a_quantized_cache_is_smaller_and_close(smollm2_path):
    from flexinfer.kv_cache import kv_bytes
    with fm.load(smollm2_path, n_ctx=128, n_threads=2) as m:
        ids = m.tokenize(" ".join(PROMPTS) + " The quick brown fox jumps over the lazy dog.")
        ref = m.logits(ids)
        f16 = kv_bytes(m.cfg, 4096)
        assert kv_bytes(m.cfg, 4096, 8, 8) < 0.6 * f16
    with fm.load(smollm2_path, n_ctx=128, n_threads=2, cache_type_k="q8_0",
                 cache_type_v="q8_0") as m:
        q8 = m.logits(ids)
    assert not np.array_equal(q8, ref)  # the cache really is quantized
    assert (q8.argmax(1) == ref.argmax(1)).mean() >= 0.8
    with pytest.raises(FlexInferError, match="--cache-type-k: 'q5' is not one of"):
        fm.load(smollm2_path, cache_type_k="q5")


def test_the_default_context_shrinks_to_fit_and_an_explicit_one_is_refused(smollm2_path, capsys):
    with fm.load(smollm2_path, n_threads=2) as m:
        fixed, kv = m.plan.fixed_bytes, m.plan.fixed_parts["kv_cache"]
    assert m.n_ctx == 4096
    budget = fixed - kv // 2 + (40 << 20)  # room for half the cache, and a little for weights
    with fm.load(smollm2_path, n_threads=2, memory_budget=budget) as m:
        assert 256 <= m.n_ctx < 4096 and m.n_ctx % 256 == 0
    assert f"context {m.n_ctx} (the default 4096 does not fit" in capsys.readouterr().err
    with pytest.raises(FlexInferError, match="below the minimum working set"):
        fm.load(smollm2_path, n_threads=2, n_ctx=4096, memory_budget=budget)


def _batch_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "flexinfer", "batch", *map(str, args)],
                          capture_output=True, text=True, timeout=300, **kw)


def test_batch_command(smollm2_path, tmp_path):
    src = tmp_path / "prompts.jsonl"
    lines = [{"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0},
             {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 3},
             {"prompt": PROMPTS[2], "stop": [","], "max_tokens": 9, "temperature": 0}]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "out.jsonl"
    r = _batch_cli(smollm2_path, src, "-o", out, "-np", 2, "-c", 128, "-t", 2, "--json")
    assert r.returncode == 0, r.stderr
    rows = sorted((json.loads(x) for x in out.read_text().splitlines()), key=lambda x: x["index"])
    assert [x["index"] for x in rows] == [0, 1, 2]
    assert set(rows[0]) == {"index", "prompt_tokens", "tokens", "text", "cached_tokens",
                            "finish_reason"}
    assert rows[0]["finish_reason"] == "length" and len(rows[0]["tokens"]) == 5
    assert rows[2]["finish_reason"] == "stop" and "," not in rows[2]["text"]
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["sequences"] == 3 and summary["decode_tokens"] > 0
    assert {"decode_tokens_per_s", "prefill_tokens_per_s", "peak_memory_bytes",
            "bytes_read_per_token", "budget_bytes"} <= set(summary)
    assert summary["budget_source"].startswith("auto: ")  # no --memory-budget: it follows


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ('{"prompt": 3}', '"prompt" must be a string'),
    ('{"prompt": "a", "messages": []}', 'give exactly one of "prompt" and "messages"'),
    ('{"prompt": "a", "max_tokens": "x"}', '"max_tokens" must be a number'),
    ('{"prompt": "a", "stop": [1]}', '"stop" must be a string or a list'),
    ('{"prompt": "a", "bogus": 1}', "unknown field 'bogus'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_batch_bad_line_names_file_and_line(smollm2_path, tmp_path, line, message):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "ok"}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    r = _batch_cli(smollm2_path, src, "-o", out)
    assert r.returncode == 2
    assert r.stderr.startswith(f"flexinfer: {src}:2: {message}")
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and not out.exists()
