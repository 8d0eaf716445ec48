"""Mixture of experts: qwen3moe, qwen2moe and mixtral against llama.cpp, streamed runs against
resident ones, and the checks on expert metadata and synthetic routers.

The references (tests/data/reference_*moe*_synth.json, reference_mixtral_synth.json) were written by
scripts/make_reference.py (moe_references) with llama-cpp-python; each holds the spec and seed of a
tiny synthetic model (3 layers, n_embd 128, 8 experts of which 2 are used), rebuilt here byte for
byte (its sha256 is checked). Routing matters in them: computing with the wrong number of experts
or without normalizing their weights is caught (test_a_broken_router_is_caught).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import flexinfer.model as fm
from flexinfer.bench import synth_moe
from flexinfer.bench.synth import SynthSpec, shared_dir, write_synthetic
from flexinfer.config import ModelConfig
from flexinfer.errors import FlexInferError, GGUFError
from flexinfer.gguf_file import read_gguf
from flexinfer.models import moe
from tests.test_engine import _squeeze_budget
from tests.references import load_reference
from tests.test_fidelity import compare, greedy_mismatches, sha256

REFERENCES = ("reference_qwen3moe_synth.json", "reference_qwen2moe_synth.json",
              "reference_mixtral_synth.json")
MIN_TOP1_AGREEMENT = 0.99  # over the 256 teacher-forced positions
MAX_LOGIT_DIFF = 0.5  # on llama.cpp's top-8 ids (measured: docs/fidelity.md)
N_CTX = 512


def _spec(name: str) -> SynthSpec:
    ref = load_reference(name)
    return SynthSpec(**ref["spec"])


@pytest.fixture(scope="module", params=REFERENCES)
def built(request, tmp_path_factory):
    """(reference, path of the rebuilt model, reference file name)."""
    try:
        shared_dir()
    except FlexInferError as e:
        pytest.skip(str(e))
    ref = load_reference(request.param)
    spec = SynthSpec(**ref["spec"])
    path = write_synthetic(tmp_path_factory.mktemp("moe") / f"{spec.arch}.gguf", spec)
    assert sha256(path) == ref["sha256"], (
        f"{path} is not the model {request.param} was made from (a synthetic writer change?): "
        "rerun scripts/make_reference.py --moe")
    return ref, path, request.param


@pytest.fixture(scope="module")
def case(built):
    ref, path, name = built
    with fm.load(path, n_ctx=N_CTX, n_threads=2) as model:
        yield ref, model, name


def test_the_model_is_a_mixture_of_experts(case):
    ref, model, name = case
    cfg = model.cfg
    assert (cfg.n_expert, cfg.n_expert_used) == (ref["spec"]["n_expert"], ref["spec"]["n_expert_used"])
    exps = [s for s in model.specs if s.name.endswith("_exps.weight")]
    assert len(exps) == 3 * cfg.n_layer and all(s.shape[2] == cfg.n_expert for s in exps)


def decode_run(path, prompt: list[int], **opts):
    """(logits of the prompt then of a decode step on each of its first 6 tokens, stacked; the
    expert stats): what expert streaming must reproduce bit for bit."""
    with fm.load(path, n_ctx=64, n_threads=2, **opts) as m:
        out = [m.logits(prompt)]
        for t in prompt[:6]:
            out.append(m.evaluate([t], len(m.cache.tokens[0])))
        return np.concatenate(out), dict(m.stats.experts)


def test_greedy_continuations_match_llamacpp(case):
    ref, model, name = case
    wrong = greedy_mismatches(model, ref["greedy"])
    assert not wrong, f"{name}: greedy continuations differ:\n" + "\n".join(wrong)


def test_teacher_forced_logits_match_llamacpp(case):
    ref, model, name = case
    tf = ref["teacher_forced"]
    agree, diff = compare(model.logits(tf["ids"]), tf["top8_flash_attn_on"])
    print(f"\n{name}: {len(tf['ids'])} positions: top-1 agreement {agree:.4f}, "
          f"largest logit difference {diff:.3g}")
    assert agree >= MIN_TOP1_AGREEMENT, f"{name}: top-1 agreement {agree:.4f}"
    assert diff <= MAX_LOGIT_DIFF, f"{name}: largest logit difference {diff:.3g}"


@pytest.mark.parametrize("broken", ["top-1", "unnormalized", "normalized"])
def test_a_broken_router_is_caught(built, broken, monkeypatch):
    """The reference models are routed strongly enough that a wrong top-K or a wrong choice of
    weight normalization fails the teacher-forced check: the test above would catch it."""
    ref, path, name = built
    normalized = ref["spec"]["arch"] != "qwen2moe"  # as llama.cpp: qwen2moe's are not
    if broken != "top-1" and (broken == "normalized") == normalized:
        pytest.skip(f"{name} computes {broken} weights")
    real = moe.ffn_moe

    def wrong(ops, cfg, w, cur, norm_weights):
        if broken == "top-1":
            return real(ops, dataclasses.replace(cfg, n_expert_used=1), w, cur, norm_weights)
        return real(ops, cfg, w, cur, not norm_weights)
    monkeypatch.setattr(moe, "ffn_moe", wrong)
    tf = ref["teacher_forced"]
    with fm.load(path, n_ctx=N_CTX, n_threads=2) as model:
        agree, diff = compare(model.logits(tf["ids"]), tf["top8_flash_attn_on"])
    print(f"\n{name} with a {broken} router: top-1 agreement {agree:.4f}, diff {diff:.3g}")
    assert agree < MIN_TOP1_AGREEMENT and diff > MAX_LOGIT_DIFF


# ---- streaming: expert tensors stream whole (--experts whole; expert-level streaming:
# tests/test_experts.py); every run equals the resident one bit for bit

PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889, 13, 29871]


@pytest.fixture(scope="module", params=REFERENCES)
def small(request, tmp_path_factory):
    """(path, resident logits) of a reference's model with the llama-spm vocab (32000 tokens: it
    loads in 1 s where the qwen2 vocab takes 4) and 2 layers: streaming does not care."""
    try:
        vocab = shared_dir() / "vocab" / "ggml-vocab-llama-spm.gguf"
    except FlexInferError as e:
        pytest.skip(str(e))
    spec = dataclasses.replace(_spec(request.param), n_layer=2, vocab_file=str(vocab))
    path = write_synthetic(tmp_path_factory.mktemp("moe") / f"{spec.arch}.gguf", spec)
    return path, _logits(path)[0]


def _logits(path, **opts):
    """(logits of PROMPT, layer loads streamed, names of the streamed parts)."""
    with fm.load(path, n_ctx=64, n_threads=2, **opts) as m:
        out = m.logits(PROMPT)
        p = m._residency.prefetcher
        names = {part.header.contents.name.decode() for parts in m._residency.streamed_layers().values()
                 for part in parts}
        return out, (p.layers_loaded if p else 0), names


@pytest.mark.parametrize("mode,fraction", [("flexinfer", 0.7), ("prefetch", 0.0), ("sync", 0.5)])
def test_streaming_is_bit_exact(small, mode, fraction, monkeypatch):
    """0.7: a third of the tensors (experts included) stay resident whole, the rest stream."""
    path, resident = small
    _squeeze_budget(monkeypatch, fraction)
    streamed, loads, names = _logits(path, offload=mode, experts="whole")
    assert loads > 0, "the test plan must force streaming"
    assert any(n.endswith("_exps.weight") for n in names), "no expert tensor was streamed"
    assert np.array_equal(streamed, resident), f"{path.name}: {mode} {fraction} differs"


def test_mmap_matches_resident_without_repack(small):
    path, _ = small
    plain, _, _ = _logits(path, repack=False)
    mapped, _, _ = _logits(path, offload="mmap")
    assert np.array_equal(mapped, plain)


def test_an_expert_tensor_is_planned_whole(small):
    """A 3-D expert tensor is one plan row of all its bytes: resident whole or streamed whole."""
    from flexinfer.weights import matrices
    path, _ = small
    g = read_gguf(path)
    cfg = ModelConfig.from_gguf(g)
    from flexinfer.models import specs_for
    mats = {t.name: t for t in matrices(g, cfg, specs_for(g, cfg), lambda info: False)}
    t = mats["blk.0.ffn_up_exps.weight"]
    assert (t.rows, t.row_bytes) == (1, g.tensors[t.name].nbytes)
    assert mats["blk.0.ffn_gate_inp.weight"].rows == cfg.n_expert


# ---- metadata and synthetic routers

@pytest.mark.parametrize("key,value,expect", [
    ("expert_count", 0, "expert_count': 0 is out of range"),
    ("expert_count", 2000, "out of range"),
    ("expert_used_count", 9, r"expert_used_count': 9 is out of range \[1, 8\]"),
    ("expert_used_count", 0, "out of range"),
    ("expert_feed_forward_length", -1, "out of range"),
    ("expert_count", "eight", "is not an integer"),
])
def test_bad_expert_metadata_is_refused_in_one_line(small, key, value, expect):
    path, _ = small
    g = read_gguf(path)
    arch = g.metadata["general.architecture"]
    if key == "expert_feed_forward_length" and arch == "llama":
        pytest.skip("mixtral's experts are feed_forward_length wide")
    g.metadata[f"{arch}.{key}"] = value
    if arch == "llama" and (key, value) == ("expert_count", 0):  # a dense llama: no FFN tensors
        from flexinfer.models import specs_for
        expect, check = "'blk.0.ffn_gate.weight' is missing", lambda: specs_for(g, cfg_of(g))
    else:
        check = lambda: ModelConfig.from_gguf(g)  # noqa: E731
    with pytest.raises(GGUFError, match=expect) as e:
        check()
    assert "\n" not in str(e.value)


def cfg_of(g):
    return ModelConfig.from_gguf(g)


def test_qwen_moe_without_experts_is_refused(small):
    path, _ = small
    g = read_gguf(path)
    arch = g.metadata["general.architecture"]
    del g.metadata[f"{arch}.expert_count"]
    if arch == "llama":  # no experts: a dense llama, whose FFN tensors are then missing
        assert ModelConfig.from_gguf(g).n_expert == 0
        return
    with pytest.raises(GGUFError, match=f"'{arch}.expert_count' is missing"):
        ModelConfig.from_gguf(g)


def _picks(path: Path, layer: int, k: int, n_tokens: int = 4000) -> np.ndarray:
    """How often each expert is in the top k for random unit-rms inputs, by the file's router."""
    g = read_gguf(path)
    info = g.tensors[f"blk.{layer}.ffn_gate_inp.weight"]
    n_embd, n = info.shape
    w = np.fromfile(path, np.float32, n_embd * n, offset=info.offset).reshape(n, n_embd)
    x = np.random.default_rng(0).standard_normal((n_tokens, n_embd)).astype(np.float32)
    top = np.argsort(-(x @ w.T), axis=1)[:, :k]
    return np.bincount(top.ravel(), minlength=n) / top.size


def test_the_zipf_router_concentrates_the_picks(tmp_path):
    base = SynthSpec("qwen3moe", n_layer=1, n_embd=64, n_ff=64, n_head=2, n_head_kv=1,
                     n_expert=32, n_expert_used=4, n_ff_exp=32, seed=5)
    shares = {}
    for router in ("uniform", "zipf:1"):
        path = write_synthetic(tmp_path / f"{router}.gguf", dataclasses.replace(base, router=router))
        shares[router] = np.sort(_picks(path, 0, 4))[::-1][:8].sum()  # the 8 most picked's share
    # 8 of 32 experts: 25% of the picks if even; measured 29% (uniform) and 66% (zipf:1)
    assert shares["uniform"] < 0.35 and shares["zipf:1"] > 0.6, shares


@pytest.mark.parametrize("text,ok", [("uniform", 0.0), ("zipf:1", 1.0), ("zipf:0.5", 0.5),
                                     ("zipf:0", None), ("zipf:x", None), ("zipf", None),
                                     ("zipf:9", None), ("random", None)])
def test_router_option(text, ok):
    if ok is None:
        with pytest.raises(FlexInferError, match=f"router '{text}'"):
            synth_moe.parse_router(text)
    else:
        assert synth_moe.parse_router(text) == ok


@pytest.mark.parametrize("changes,expect", [
    (dict(n_expert=0), "experts 0"), (dict(n_expert_used=9), "experts-used 9"),
    (dict(arch="llama"), "arch 'llama' has none"), (dict(router="zipf:-1"), "router")])
def test_bad_moe_specs_are_refused(changes, expect, tmp_path):
    spec = dataclasses.replace(SynthSpec("qwen3moe", n_expert=8, n_expert_used=2), **changes)
    with pytest.raises(FlexInferError, match=expect):
        write_synthetic(tmp_path / "x.gguf", spec)
