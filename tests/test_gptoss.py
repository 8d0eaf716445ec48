"""gpt-oss (models/gptoss.py) against llama.cpp, each of its features broken on purpose, expert
streaming against resident runs, and the synthetic writer's gpt-oss and MXFP4.

The reference (tests/data/reference_gptoss_synth.json, scripts/make_reference.py SYNTH_GPTOSS)
holds the spec of a tiny synthetic gpt-oss rebuilt here byte for byte: 4 layers of 128 (layers 0
and 2 slide, window 16), heads of 64, 8 MXFP4 experts of 128 (2 used), Q8_0 attention, yarn 4x.
Its sinks, expert biases, router bias, swiglu_oai's clamp at 7 and the window each move the
logits far past the fidelity limits when left out (test_a_broken_feature_is_caught).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

import flexinfer.model as fm
from flexinfer import config
from flexinfer.bench import synth
from flexinfer.bench.synth import SynthSpec, shared_dir, write_synthetic
from flexinfer.config import ModelConfig
from flexinfer.errors import FlexInferError, GGUFError
from flexinfer.ggml_ops import Ops
from flexinfer.gguf_file import read_gguf
from flexinfer.models import base, gptoss
from tests.test_engine import _squeeze_budget
from tests.references import load_reference
from tests.test_fidelity import compare, greedy_mismatches, sha256
from tests.test_moe import PROMPT, decode_run

REFERENCE = "reference_gptoss_synth.json"
MIN_TOP1_AGREEMENT = 0.99  # over the 256 teacher-forced positions
MAX_LOGIT_DIFF = 0.5  # on llama.cpp's top-8 ids
N_CTX = 512
MXFP4 = 39


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(reference, path of the rebuilt model)."""
    try:
        shared_dir()
    except FlexInferError as e:
        pytest.skip(str(e))
    ref = load_reference(REFERENCE)
    spec = SynthSpec(**ref["spec"])
    path = write_synthetic(tmp_path_factory.mktemp("gptoss") / "gpt-oss.gguf", spec)
    assert sha256(path) == ref["sha256"], (
        f"{path} is not the model {REFERENCE} was made from (a synthetic writer change?): rerun "
        f"scripts/make_reference.py {REFERENCE}")
    return ref, path


@pytest.fixture(scope="module")
def model(built):
    ref, path = built
    with fm.load(path, n_ctx=N_CTX, n_threads=2) as m:
        yield ref, m


def _forced(path, ref, **opts) -> tuple[float, float]:
    tf = ref["teacher_forced"]
    with fm.load(path, n_ctx=N_CTX, n_threads=2, **opts) as m:
        return compare(m.logits(tf["ids"]), tf["top8_flash_attn_on"])


def test_the_model_is_gpt_oss(model):
    ref, m = model
    cfg = m.cfg
    assert (cfg.arch, cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp) == ("gpt-oss", 8, 2, 128)
    assert cfg.n_swa == 16 and cfg.swa_layers == (True, False, True, False)
    assert cfg.head_dim == 64 and cfg.n_embd_q == 256 and cfg.rope_scaling == "yarn"
    g = m.g
    assert all(g.tensors[f"blk.{i}.{k}.weight"].type == MXFP4
               for i in range(cfg.n_layer) for k in gptoss.EXPERT_KINDS)
    assert list(g.tensors["blk.0.ffn_down_exps.bias"].shape) == [128, 8]


def test_the_even_layers_keep_rings(built):
    """gpt-oss's sliding layers hold only their rings (kv_cache.py): window 16 plus micro-batches
    of 32, rounded up to 256 cells, on layers 0 and 2; the global ones hold the context."""
    _, path = built
    with fm.load(path, n_ctx=1024, n_ubatch=32, n_threads=2) as m:
        assert m.cache.swa_ctx == 256 and m.cache.layer_cells == [256, 1024, 256, 1024]


def test_greedy_continuations_match_llamacpp(model):
    ref, m = model
    wrong = greedy_mismatches(m, ref["greedy"])
    assert not wrong, "greedy continuations differ:\n" + "\n".join(wrong)


@pytest.mark.parametrize("experts", ["auto", "whole"])
def test_teacher_forced_logits_match_llamacpp(built, experts):
    """auto: expert-level streaming (experts.py, the layer split after the router); whole: the
    expert tensors resident whole, one graph per layer."""
    ref, path = built
    agree, diff = _forced(path, ref, experts=experts)
    print(f"\ngpt-oss ({experts}): {len(ref['teacher_forced']['ids'])} positions: top-1 "
          f"agreement {agree:.4f}, largest logit difference {diff:.3g}")
    assert agree >= MIN_TOP1_AGREEMENT, f"top-1 agreement {agree:.4f}"
    assert diff <= MAX_LOGIT_DIFF, f"largest logit difference {diff:.3g}"


def _no_sinks(mp):
    real = base.attention
    mp.setattr(base, "attention", lambda *a, sinks=None: real(*a))


def _no_router_bias(mp):
    def route(ops, cfg, w, cur):
        logits = ops.mul_mat(w["ffn_gate_inp.weight"], cur)
        return logits, ops.argsort_top_k(logits, cfg.n_expert_used)
    mp.setattr(gptoss, "route", route)


BREAKS = {
    "sinks": _no_sinks,
    "swiglu clamp": lambda mp: mp.setattr(gptoss, "SWIGLU_LIMIT", 1e30),
    "expert biases": lambda mp: mp.setattr(Ops, "add_id", lambda self, a, b, ids: a),
    "router bias": _no_router_bias,
    "sliding window": lambda mp: mp.setattr(config, "_swa_gptoss", lambda *a: {}),
}


@pytest.mark.parametrize("broken", sorted(BREAKS))
def test_a_broken_feature_is_caught(built, broken, monkeypatch):
    """Each gpt-oss feature left out fails the teacher-forced check above by far (measured: top-1
    agreement 0.07-0.67, largest differences 3.6-5.7)."""
    ref, path = built
    BREAKS[broken](monkeypatch)
    agree, diff = _forced(path, ref, experts="whole")
    print(f"\nwithout the {broken}: top-1 agreement {agree:.4f}, diff {diff:.3g}")
    assert agree < MIN_TOP1_AGREEMENT and diff > MAX_LOGIT_DIFF


# ---- expert streaming: equal to the resident run bit for bit



@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXINFER_HOME", str(tmp_path / "home"))


def _run(path, **opts):
    return decode_run(path, PROMPT, **opts)


@pytest.fixture(scope="module")
def resident(built):
    return built[1], _run(built[1], experts="whole")[0]


@pytest.mark.parametrize("mode,fraction", [("flexinfer", 0.7), ("sync", 0.5)])
def test_expert_streaming_is_bit_exact(resident, mode, fraction, monkeypatch, home):
    """The cache at its floor (one layer's experts: every step evicts), dense rows squeezed; the
    expert biases stay resident, the read-ahead predicts with the router bias and
    post_attention_norm."""
    path, want = resident
    _squeeze_budget(monkeypatch, fraction)
    got, stats = _run(path, offload=mode, expert_cache=0, expert_prefetch=True)
    assert np.array_equal(got, want), f"{mode} {fraction} differs"
    assert stats["misses"] > 0 and stats["capacity_bytes"] < stats["expert_bytes"]
    assert stats["prefetched"] > 0 and 0 < stats["prefetch_recall"] <= 1


def test_streaming_without_repack_too(resident, home):
    """MXFP4 experts are repacked by ggml's CPU_REPACK buffer (slab by slab when streamed: the
    test above); without repacking, streamed equals resident too."""
    from flexinfer.ggml_ops import repacks
    path, _ = resident
    assert repacks(MXFP4, (128, 128, 8))
    plain = _run(path, repack=False, experts="whole")[0]
    assert np.array_equal(_run(path, repack=False, expert_cache=0)[0], plain)


def test_mmap_and_whole_streaming_match_resident(resident, monkeypatch, home):
    """--offload mmap (no repack, as mmap) and the expert tensors streamed whole (--experts
    whole, dense rows squeezed) equal their resident runs."""
    path, want = resident
    plain = _run(path, repack=False, experts="whole")[0]
    assert np.array_equal(_run(path, offload="mmap")[0], plain)
    _squeeze_budget(monkeypatch, 0.5)
    assert np.array_equal(_run(path, offload="sync", experts="whole")[0], want)


def test_expert_biases_are_resident_vectors(built):
    """A (rows, E) F32 bias is one whole always-resident block, not a plannable matrix."""
    _, path = built
    with fm.load(path, n_ctx=64, n_threads=2) as m:
        names = {b.name for b in m._store.vectors}
        assert {f"blk.0.{k}.bias" for k in gptoss.EXPERT_KINDS} <= names
        assert not any(name.endswith("_exps.bias") for name in m.plan.resident_rows)
        assert not any(name.endswith("_exps.bias") for name in m._store.blocks)


# ---- metadata

def test_gpt_oss_needs_a_sliding_window(built):
    _, path = built
    g = read_gguf(path)
    del g.metadata["gpt-oss.attention.sliding_window"]
    with pytest.raises(GGUFError, match="'gpt-oss.attention.sliding_window' is missing") as e:
        ModelConfig.from_gguf(g)
    assert "\n" not in str(e.value)


def test_mxfp4_is_a_known_type():
    """The parser's MXFP4 block (32 values in 17 bytes) is ggml's."""
    from flexinfer.gguf_file import GGML_TYPES
    from flexinfer.ggml_ops import row_size
    name, blck, size = GGML_TYPES[MXFP4]
    assert name == "MXFP4" and row_size(MXFP4, blck) == size == 17


# ---- the synthetic writer

def test_mxfp4_weights_have_the_planned_rms(built):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    _, path = built
    g = read_gguf(path)
    for name in ("blk.0.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        info = g.tensors[name]
        raw = np.fromfile(path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        w = dequantize(raw.reshape(1, -1), GGMLQuantizationType.MXFP4).astype(np.float64)
        gain = gptoss_gain(name)
        assert float(np.sqrt(np.mean(w * w))) == pytest.approx(gain / math.sqrt(info.shape[0]),
                                                               rel=0.15), name


def gptoss_gain(name: str) -> float:
    from flexinfer.bench import synth_gptoss
    return synth_gptoss.DOWN_GAIN if "down" in name else synth_gptoss.EXPERT_GAIN


@pytest.mark.parametrize("changes,expect", [
    ({"n_swa": 0}, "swa: gpt-oss needs a sliding window"),
    ({"tied": True}, "tied: gpt-oss has an output.weight"),
    ({"n_expert": 0}, "experts 0: must be in"),
    ({"overrides": {"ffn_up_exps": "q9"}}, "type 'q9' for blk.0.ffn_up_exps"),
    ({"n_embd": 80, "type": "f16"}, "row length 80 is not a multiple of the MXFP4"),
])
def test_bad_gpt_oss_specs_are_refused(changes, expect, tmp_path):
    spec = dataclasses.replace(synth.preset("gpt-oss-20b"), n_layer=1, **changes)
    with pytest.raises(FlexInferError, match=expect):
        synth.tensor_plan(spec, 32000)


def test_the_gpt_oss_20b_preset_has_the_real_shape():
    plan = synth.tensor_plan(synth.preset("gpt-oss-20b"), 32000)
    by = {t.name: t for t in plan}
    assert by["blk.23.ffn_gate_exps.weight"].shape == (2880, 2880, 32)
    assert by["blk.0.ffn_gate_exps.weight"].type == "MXFP4"
    assert by["blk.0.attn_q.weight"].shape == (2880, 4096)
    assert by["blk.0.attn_sinks.weight"].shape == (64,)
    experts = sum(t.nbytes for t in plan if t.name.endswith("_exps.weight"))
    assert experts == 24 * 3 * 2880 * 2880 * 32 // 32 * 17  # 10.2 GB


def test_cli_writes_a_gpt_oss_model_flexinfer_runs(tmp_path):
    out = tmp_path / "g.gguf"
    args = [sys.executable, "-m", "flexinfer", "synth", str(out), "--arch", "gpt-oss",
            "--layers", "2", "--embd", "64", "--ff", "64", "--heads", "2", "--kv-heads", "1",
            "--experts", "4", "--experts-used", "2", "--expert-ff", "64", "--swa", "8"]
    try:
        shared_dir()
    except FlexInferError as e:
        pytest.skip(str(e))
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with fm.load(out, n_ctx=64, n_threads=2) as m:
        logits = m.logits(PROMPT[:4])
    assert m.cfg.arch == "gpt-oss" and np.isfinite(logits).all()
    r = subprocess.run(args[:-2], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "swa" in r.stderr
