"""flexinfer against llama.cpp: tokens, greedy continuations and teacher-forced logits.

The references (tests/data/reference_*.json) were written by scripts/make_reference.py with
llama-cpp-python, flash attention on (as llama.cpp's CLI runs on CPU); this test needs only
flexinfer. What is compared and the numbers measured: docs/fidelity.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import flexinfer.model as fm
from flexinfer.bench.synth import SynthSpec, shared_dir, write_synthetic
from flexinfer.errors import FlexInferError
from flexinfer.generate import chat_prompt
from tests.references import load_reference

REFERENCES = ("reference_smollm2.json", "reference_qwen2_synth.json",
              "reference_llama_tied_synth.json", "reference_llama_rope_freqs_synth.json",
              "reference_qwen3_synth.json", "reference_gemma3_synth.json",
              "reference_phi3_synth.json", "reference_gemma3_ring_synth.json",
              "reference_llama_yarn_synth.json", "reference_llama_biases_synth.json")
SYNTH_REFERENCES = [r for r in REFERENCES if r.endswith("_synth.json")]
MIN_TOP1_AGREEMENT = 0.99  # over the 256 teacher-forced positions
MAX_LOGIT_DIFF = 0.5  # on llama.cpp's top-8 ids; measured 0 with flash attention (bit-identical)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_file(ref: dict, request, tmp_path_factory) -> Path:
    """The file the reference was made from: SmolLM2 if present, or the synthetic model rebuilt
    from its spec and seed, which must give the very same bytes."""
    if ref["model"] != "synthetic":
        return request.getfixturevalue("smollm2_path")
    try:
        shared_dir()
    except FlexInferError as e:
        pytest.skip(str(e))
    spec = SynthSpec(**ref["spec"])
    return write_synthetic(tmp_path_factory.mktemp("fidelity") / f"{spec.arch}.gguf", spec)


def load(path: Path, s: dict, **kw):
    """flexinfer with the reference's settings: context, threads and llama.cpp's micro-batch."""
    return fm.load(path, n_ctx=s["n_ctx"], n_threads=s["n_threads"], n_ubatch=s.get("n_ubatch"),
                   **kw)


def checked_file(name: str, request, tmp_path_factory) -> tuple[dict, Path]:
    """The reference and its model file, whose digest must be the reference's."""
    ref = load_reference(name)
    path = model_file(ref, request, tmp_path_factory)
    assert sha256(path) == ref["sha256"], (
        f"{path} is not the model {name} was made from (a synthetic writer change, or "
        "another SmolLM2 file): rerun scripts/make_reference.py")
    return ref, path


@pytest.fixture(scope="module", params=REFERENCES)
def case(request, tmp_path_factory):
    """(reference, loaded model, name), one model at a time."""
    ref, path = checked_file(request.param, request, tmp_path_factory)
    with load(path, ref["settings"]) as model:
        yield ref, model, request.param


def test_prompt_tokens_match_llamacpp(case):
    ref, model, name = case
    wrong = []
    for c in ref["greedy"]["cases"]:
        if model.tokenize(c["text"], special=c["special"]) != c["ids"]:
            wrong.append(c["name"])
        if "messages" in c and chat_prompt(model, c["messages"]) != c["ids"]:
            wrong.append(f"{c['name']} (chat template)")
    assert not wrong, f"{name}: tokens differ from llama.cpp's for {', '.join(wrong)}"


def test_end_of_generation_ids_match_llamacpp(case):
    ref, model, name = case
    assert sorted(model.tokenizer.eog_ids) == ref["eog_ids"], f"{name}: EOG ids differ"


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy_mismatches(model, greedy: dict) -> list[str]:
    """A line for each of a reference's greedy cases (tokenized as llama.cpp did) that the model
    continues otherwise than llama.cpp: where, and the two tokens there."""
    wrong = []
    for c in greedy["cases"]:
        assert model.tokenize(c["text"], special=c["special"]) == c["ids"], c["name"]
        got = [p.token for p in model.generate(c["ids"], max_tokens=greedy["max_tokens"],
                                               temperature=0) if p.token >= 0]
        if got != c["continuation"]:
            i = first_difference(got, c["continuation"])
            wrong.append(f"{c['name']}: token {i} is {got[i:i + 1]}, llama.cpp "
                         f"{c['continuation'][i:i + 1]}")
    return wrong


def test_greedy_continuations_match_llamacpp(case):
    ref, model, name = case
    g, wrong = ref["greedy"], []
    for c in g["cases"]:
        pieces = model.generate(c["ids"], max_tokens=g["max_tokens"], temperature=0)
        got = [p.token for p in pieces if p.token >= 0]
        if got != c["continuation"]:
            i = first_difference(got, c["continuation"])
            wrong.append(f"{c['name']}: token {i} is {got[i:i + 1]}, llama.cpp "
                         f"{c['continuation'][i:i + 1]} (llama.cpp stop: {c['stop']})")
    assert not wrong, f"{name}: greedy continuations differ:\n" + "\n".join(wrong)


def compare(logits: np.ndarray, top8: list) -> tuple[float, float]:
    """(top-1 agreement, largest |difference| on the reference's top-8 ids) over every position."""
    ids = np.array([[i for i, _ in row] for row in top8])  # (T, 8)
    ref = np.array([[v for _, v in row] for row in top8], dtype=np.float32)
    ours = np.take_along_axis(logits, ids, axis=1)
    return float(np.mean(logits.argmax(1) == ids[:, 0])), float(np.abs(ours - ref).max())


def test_teacher_forced_logits_match_llamacpp(case):
    ref, model, name = case
    tf = ref["teacher_forced"]
    logits = model.logits(tf["ids"])  # (256, n_vocab)
    agree, diff = compare(logits, tf["top8_flash_attn_on"])
    agree_off, diff_off = compare(logits, tf["top8_flash_attn_off"])
    print(f"\n{name}: {len(tf['ids'])} positions; llama.cpp flash_attn=True: top-1 agreement "
          f"{agree:.4f}, max logit diff {diff:.3g}; flash_attn=False (information only): "
          f"{agree_off:.4f}, {diff_off:.3g}")
    assert agree >= MIN_TOP1_AGREEMENT, f"{name}: top-1 agreement {agree:.4f}"
    assert diff <= MAX_LOGIT_DIFF, f"{name}: largest logit difference {diff:.3g}"


def test_decode_steps_match_llamacpp(case):
    """Where the reference has them: the forced tokens from decode_from on, one decode step each
    (gemma3's rings wrap while decoding)."""
    ref, model, name = case
    dec = ref["teacher_forced"].get("decode")
    if dec is None:
        pytest.skip("no decode steps in this reference")
    ids, start = ref["teacher_forced"]["ids"][:dec["decode_to"]], dec["decode_from"]
    rows = [model.evaluate(ids[:start], 0)[-1]]
    rows += [model.evaluate([t], p)[-1] for p, t in enumerate(ids[start:], start)]
    agree, diff = compare(np.stack(rows), dec["top8_flash_attn_on"])
    print(f"\n{name}: {len(rows)} decode steps: top-1 agreement {agree:.4f}, max logit diff "
          f"{diff:.3g}")
    assert agree >= MIN_TOP1_AGREEMENT, f"{name}: top-1 agreement {agree:.4f}"
    assert diff <= MAX_LOGIT_DIFF, f"{name}: largest logit difference {diff:.3g}"


@pytest.mark.parametrize("name", SYNTH_REFERENCES)
def test_streamed_equals_resident(name, request, tmp_path_factory, monkeypatch):
    """Each architecture's teacher-forced logits, with most rows streamed, bit for bit."""
    from tests.test_engine import _squeeze_budget

    ref, path = checked_file(name, request, tmp_path_factory)
    s, ids = ref["settings"], ref["teacher_forced"]["ids"][:64]
    with load(path, s) as model:
        resident = model.logits(ids)
    _squeeze_budget(monkeypatch, 0.35)
    with load(path, s, offload="flexinfer") as model:
        streamed = model.logits(ids)
        assert model._residency.prefetcher.layers_loaded > 0, "the plan must stream"
    assert np.array_equal(streamed, resident)


def _wrap(module, change):
    """module.build_layer with (cfg, il, w, x, batch) changed by change() first."""
    real = module.build_layer

    def build_layer(ops, cfg, il, w, x, batch, k_cache, v_cache):
        cfg, w, x, batch = change(ops, cfg, il, dict(w), x, batch)
        return real(ops, cfg, il, w, x, batch, k_cache, v_cache)
    return build_layer


def _drop(*names):
    def change(ops, cfg, il, w, x, batch):
        for n in names:
            w.pop(n, None)
        return cfg, w, x, batch
    change.__name__ = "drop_" + "_".join(n.split(".")[0] for n in names)
    return change


def _unscale_embedding(ops, cfg, il, w, x, batch):
    return cfg, w, ops.scale(x, cfg.n_embd ** -0.5) if il == 0 else x, batch


def _global_base_everywhere(ops, cfg, il, w, x, batch):
    return dataclasses.replace(cfg, rope_base_swa=cfg.rope_base), w, x, batch


def _no_window(ops, cfg, il, w, x, batch):
    """The full layers' Batch (causal mask) on the sliding layers too: the same cells here, since
    this reference's rings hold the whole context (W = min(n_ctx, n_swa + n_ubatch) = 512)."""
    return cfg, w, x, dataclasses.replace(batch, swa=batch)


def _short_factors(ops, cfg, il, w, x, batch):
    w["rope_factors_long.weight"] = w["rope_factors_short.weight"]
    return cfg, w, x, batch


def _no_attn_factor(ops, cfg, il, w, x, batch):
    return dataclasses.replace(cfg, rope_attn_factor=1.0), w, x, batch


def _no_yarn(ops, cfg, il, w, x, batch):
    """Linear scaling instead of yarn: ext_factor 0 (ggml then skips yarn's ramp and mscale)."""
    return dataclasses.replace(cfg, rope_ext_factor=0.0), w, x, batch


def _yarn_betas_default_swapped(ops, cfg, il, w, x, batch):
    return dataclasses.replace(cfg, rope_yarn_beta=cfg.rope_yarn_beta[::-1]), w, x, batch


BREAK_POSITIONS = 128  # the first half of the teacher-forced text: enough to see it, half the time
BREAKS = [  # (reference, arch module, the feature broken)
    ("reference_llama_rope_freqs_synth.json", "llama", _drop("rope_freqs.weight")),
    ("reference_qwen3_synth.json", "qwen3", _drop("attn_q_norm.weight", "attn_k_norm.weight")),
    ("reference_gemma3_synth.json", "gemma3", _drop("attn_q_norm.weight", "attn_k_norm.weight")),
    ("reference_gemma3_synth.json", "gemma3", _unscale_embedding),
    ("reference_gemma3_synth.json", "gemma3", _global_base_everywhere),
    ("reference_gemma3_synth.json", "gemma3", _no_window),
    ("reference_phi3_synth.json", "phi3", _short_factors),
    ("reference_phi3_synth.json", "phi3", _no_attn_factor),
    ("reference_llama_yarn_synth.json", "llama", _no_yarn),
    ("reference_llama_biases_synth.json", "llama", _drop("attn_output.bias")),
    ("reference_llama_biases_synth.json", "llama", _drop("ffn_gate.bias", "ffn_up.bias",
                                                         "ffn_down.bias")),
    ("reference_llama_yarn_synth.json", "llama", _yarn_betas_default_swapped),
]


@pytest.mark.parametrize("name,arch,change", BREAKS,
                         ids=[f"{a}-{c.__name__.strip('_')}" for _, a, c in BREAKS])
def test_each_feature_moves_the_logits(name, arch, change, request, tmp_path_factory, monkeypatch):
    """The synthetic weights are strong enough that the comparison with llama.cpp fails when one
    feature is left out: the fidelity tests above could not pass with it broken."""
    import importlib

    ref, path = checked_file(name, request, tmp_path_factory)
    module = importlib.import_module(f"flexinfer.models.{arch}")
    monkeypatch.setattr(module, "build_layer", _wrap(module, change))
    tf, s = ref["teacher_forced"], ref["settings"]
    n = BREAK_POSITIONS
    with fm.load(path, n_ctx=s["n_ctx"], n_threads=s["n_threads"]) as model:
        agree, diff = compare(model.logits(tf["ids"][:n]), tf["top8_flash_attn_on"][:n])
    print(f"\n{name} broken by {change.__name__.strip('_')}: top-1 {agree:.4f}, "
          f"max logit diff {diff:.3g}")
    assert agree < MIN_TOP1_AGREEMENT or diff > MAX_LOGIT_DIFF


def test_teacher_forced_length_not_a_multiple_of_64_is_bit_identical(request, tmp_path_factory):
    """250 positions: llama.cpp's rows 0-249 of its 256-token batch are what it gives for those
    250 tokens (attention is causal, and both batches take the tiled path). The engine used to cut
    all-logits runs into 64-token pieces, whose short last piece took ggml's untiled flash attention
    (GGML_FA_TILE_Q = 64): this failed then (docs/fidelity.md)."""
    ref, path = checked_file("reference_qwen3_synth.json", request, tmp_path_factory)
    tf, s = ref["teacher_forced"], ref["settings"]
    with fm.load(path, n_ctx=s["n_ctx"], n_threads=s["n_threads"]) as model:
        agree, diff = compare(model.logits(tf["ids"][:250]), tf["top8_flash_attn_on"][:250])
    print(f"\n250 positions: top-1 {agree:.4f}, max logit diff {diff:.3g}")
    assert diff == 0


def test_each_instruction_set_has_every_reference_made_with_it():
    """tests/data holds the references of llama.cpp built for AVX-512 (VNNI, BF16, VBMI),
    tests/data/avx2 the same files from a build for AVX2 alone; each records the sets it was made
    with, and a ggml is held to the directory of its own (tests/references.py)."""
    from tests.references import ROOT, llamacpp_sets, reference_dir
    names = sorted(p.name for p in ROOT.glob("reference_*.json"))
    assert len(names) >= len(REFERENCES) and set(REFERENCES) <= set(names)
    assert sorted(p.name for p in (ROOT / "avx2").glob("reference_*.json")) == names
    for where, want in ((ROOT, {"AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX512_VBMI"}),
                        (ROOT / "avx2", set())):
        for name in names:
            info = json.loads((where / name).read_text(encoding="utf-8"))["llama_cpp_system_info"]
            sets = llamacpp_sets(info)
            assert {"AVX", "AVX2", "FMA", "F16C"} <= set(sets), (where, name, info)
            assert set(sets) & {"AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX512_VBMI",
                                "AVX_VNNI"} == want, (where, name, info)
            assert reference_dir(sets) == where
