"""olmoe (OLMoE-1B-7B's architecture) against llama.cpp, and streamed against resident.

The reference (tests/data/reference_olmoe_synth.json, scripts/make_reference.py SYNTH_OLMOE) holds
the spec and seed of a tiny synthetic olmoe: 3 layers, n_embd 128, 4 heads of 32 (no GQA, as
llama.cpp's olmoe), 8 experts of 256 of which 2 are used, Q4_0, the gpt-2 vocab (50257 tokens),
norm weights 1 + N(0, 0.1). It is rebuilt here byte for byte (sha256 checked).

What makes olmoe olmoe moves its logits far past the fidelity thresholds, so each is caught
(test_a_broken_olmoe_is_caught): the q/k RMS norms over the whole q and k vectors (normed per head
instead: top-1 ~0.65, largest difference ~2.3), the expert weights left unnormalized (normalized:
~0.55 / 3.0), NEOX rope, and top-K routing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import flexinfer.model as fm
from flexinfer import experts as ex
from flexinfer import ggml_ops
from flexinfer.bench.synth import SynthSpec, shared_dir, write_synthetic
from flexinfer.config import ModelConfig
from flexinfer.errors import FlexInferError, GGUFError
from flexinfer.ggml_ops import ROPE_NORM
from flexinfer.gguf_file import read_gguf
from flexinfer.models import moe, olmoe
from tests.test_engine import _squeeze_budget
from tests.test_fidelity import compare, greedy_mismatches, sha256
from tests.references import check_sets, read_reference
from tests.test_moe import MAX_LOGIT_DIFF, MIN_TOP1_AGREEMENT, N_CTX, PROMPT, decode_run

NAME = "reference_olmoe_synth.json"
REFERENCE = read_reference(NAME)
SPEC = SynthSpec(**REFERENCE["spec"])


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> Path:
    """The reference's model, rebuilt from its spec and seed."""
    check_sets(NAME, REFERENCE)  # made with this ggml's instruction sets
    try:
        shared_dir()
    except FlexInferError as e:
        pytest.skip(str(e))
    out = write_synthetic(tmp_path_factory.mktemp("olmoe") / "olmoe.gguf", SPEC)
    assert sha256(out) == REFERENCE["sha256"], (
        f"{out} is not the model the reference was made from (a synthetic writer change?): rerun "
        "scripts/make_reference.py reference_olmoe_synth.json")
    return out


@pytest.fixture(scope="module")
def model(path):
    with fm.load(path, n_ctx=N_CTX, n_threads=2) as m:
        yield m


def test_the_model_is_olmoe(model):
    """Experts n_ff wide (llama.cpp reads no expert width for olmoe), q/k norms of whole vectors."""
    cfg, shapes = model.cfg, {s.name: s.shape for s in model.specs}
    assert (cfg.arch, cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp) == ("olmoe", 8, 2, cfg.n_ff)
    assert shapes["blk.0.attn_q_norm.weight"] == (cfg.n_embd_q,) == (cfg.n_embd,)
    assert shapes["blk.0.attn_k_norm.weight"] == (cfg.n_embd_kv,)
    assert shapes["blk.2.ffn_down_exps.weight"] == (cfg.n_ff, cfg.n_embd, cfg.n_expert)
    assert not moe.NORMALIZED["olmoe"]


def test_greedy_continuations_match_llamacpp(model):
    wrong = greedy_mismatches(model, REFERENCE["greedy"])
    assert not wrong, "olmoe: greedy continuations differ:\n" + "\n".join(wrong)


def _forced(model) -> tuple[float, float]:
    tf = REFERENCE["teacher_forced"]
    return compare(model.logits(tf["ids"]), tf["top8_flash_attn_on"])


def test_teacher_forced_logits_match_llamacpp(model):
    agree, diff = _forced(model)
    print(f"\nolmoe: {len(REFERENCE['teacher_forced']['ids'])} positions: top-1 agreement "
          f"{agree:.4f}, largest logit difference {diff:.3g}")
    assert agree >= MIN_TOP1_AGREEMENT, f"olmoe: top-1 agreement {agree:.4f}"
    assert diff <= MAX_LOGIT_DIFF, f"olmoe: largest logit difference {diff:.3g}"


def _per_head(ops, cfg, t, weight):
    """The break: q/k normed per head (qwen3's way) with the same (n_embd_q,) weight."""
    T, hd = ggml_ops.ne(t, 1), cfg.head_dim
    heads = ops.rms_norm(ops.reshape_3d(t, hd, ggml_ops.ne(t, 0) // hd, T), cfg.norm_eps)
    return ops.mul(ops.reshape_2d(heads, ggml_ops.ne(t, 0), T), weight)


BREAKS = {
    "per-head q/k norm": lambda mp: mp.setattr(olmoe, "qk_norm", _per_head),
    "normalized weights": lambda mp: mp.setitem(moe.NORMALIZED, "olmoe", True),
    "rope not NEOX": lambda mp: mp.setattr(olmoe, "ROPE_MODE", ROPE_NORM),
    "top-1 routing": lambda mp: mp.setattr(
        moe, "ffn_moe", lambda ops, cfg, w, cur, norm, real=moe.ffn_moe:
        real(ops, dataclasses.replace(cfg, n_expert_used=1), w, cur, norm)),
}


@pytest.mark.parametrize("broken", BREAKS)
def test_a_broken_olmoe_is_caught(path, broken, monkeypatch):
    """Each olmoe-specific part broken on purpose fails the teacher-forced check above."""
    BREAKS[broken](monkeypatch)
    with fm.load(path, n_ctx=N_CTX, n_threads=2) as m:
        agree, diff = _forced(m)
    print(f"\nolmoe with {broken}: top-1 agreement {agree:.4f}, largest difference {diff:.3g}")
    assert agree < MIN_TOP1_AGREEMENT and diff > MAX_LOGIT_DIFF


# ---- streaming: every run equals the resident one bit for bit

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(path, resident logits) of the reference's model with 2 layers and the llama-spm vocab
    (32000 tokens; streaming does not care), every expert tensor resident whole."""
    try:
        vocab = shared_dir() / "vocab" / "ggml-vocab-llama-spm.gguf"
    except FlexInferError as e:
        pytest.skip(str(e))
    spec = dataclasses.replace(SPEC, n_layer=2, vocab_file=str(vocab))
    out = write_synthetic(tmp_path_factory.mktemp("olmoe") / "small.gguf", spec)
    return out, _run(out, experts="whole")[0]


def _run(path, **opts):
    return decode_run(path, PROMPT, **opts)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Each test its own $FLEXINFER_HOME: saved expert counts never warm another test's run."""
    monkeypatch.setenv("FLEXINFER_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("mode,fraction", [("flexinfer", 0.7), ("sync", 0.5)])
def test_expert_streaming_is_bit_exact(small, mode, fraction, monkeypatch):
    """Dense rows squeezed to `fraction`, the expert cache at its floor (one layer's experts:
    every step evicts and reads the picked experts' slabs): each layer runs as two graphs, olmoe's
    attention and router, then the experts."""
    path, want = small
    _squeeze_budget(monkeypatch, fraction)
    got, stats = _run(path, offload=mode, expert_cache=0)
    assert stats["misses"] > 0 and stats["capacity_bytes"] < stats["expert_bytes"]
    assert np.array_equal(got, want), f"olmoe: {mode} {fraction} differs"


def test_whole_expert_tensors_stream_bit_exact(small, monkeypatch):
    path, want = small
    _squeeze_budget(monkeypatch, 0.7)
    assert np.array_equal(_run(path, offload="flexinfer", experts="whole")[0], want)


def test_a_wrong_slab_is_caught(small, monkeypatch):
    """Break the streaming on purpose: each run read from its neighbour's slab moves the logits."""
    path, want = small
    real = ex.ExpertStore._read_run

    def shifted(self, s, run, stage, headers):
        d = s.nb2 if run[-1] + 1 < self.n_expert else -s.nb2
        return real(self, ex._Slab(s.header, s.offset + d, s.nb2, s.rows, s.rb, s.home, s.repack),
                    run, stage, headers)
    monkeypatch.setattr(ex.ExpertStore, "_read_run", shifted)
    got = _run(path, expert_cache=0)[0]
    assert np.abs(got - want).max() > 0.1


# ---- synthetic olmoe specs llama.cpp could not load are refused in one line

@pytest.mark.parametrize("changes,expect", [
    (dict(n_head_kv=2), "kv-heads 2: olmoe has no grouped-query attention"),
    (dict(head_dim=64), "head-dim 64: olmoe's heads must tile n_embd"),
    (dict(n_ff_exp=128), "expert-ff 128: olmoe's experts are --ff wide"),
])
def test_bad_olmoe_specs_are_refused(changes, expect, tmp_path):
    with pytest.raises(FlexInferError, match=expect) as e:
        write_synthetic(tmp_path / "x.gguf", dataclasses.replace(SPEC, **changes))
    assert "\n" not in str(e.value)


def test_olmoe_metadata_as_llamacpp_reads_it(small):
    """Experts are required; expert_feed_forward_length is not olmoe's (llama.cpp builds the
    experts feed_forward_length wide and never reads it), so a file's value does not change them."""
    g = read_gguf(small[0])
    g.metadata["olmoe.expert_feed_forward_length"] = 64
    assert ModelConfig.from_gguf(g).n_ff_exp == g.metadata["olmoe.feed_forward_length"] == 256
    del g.metadata["olmoe.expert_count"]
    with pytest.raises(GGUFError, match="metadata 'olmoe.expert_count' is missing"):
        ModelConfig.from_gguf(g)
