"""Synthetic models: names, shapes, types and metadata as llama.cpp writes them; values that stay
finite through many layers; errors that name the field at fault."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flexinfer import cli
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from flexinfer.bench import synth
from flexinfer.bench.synth import SynthSpec, tensor_plan, write_synthetic
from flexinfer.errors import FlexInferError
from flexinfer.gguf_file import read_gguf
from tests.conftest import MIXED_TYPES

LAYER_SHAPES = {  # role -> shape for n_embd 64, n_embd_kv 32, n_ff 128
    "attn_norm.weight": (64,), "attn_q.weight": (64, 64), "attn_k.weight": (64, 32),
    "attn_v.weight": (64, 32), "attn_output.weight": (64, 64), "ffn_norm.weight": (64,),
    "ffn_gate.weight": (64, 128), "ffn_up.weight": (64, 128), "ffn_down.weight": (128, 64),
}


def values(path, info) -> np.ndarray:
    """A tensor's values as float32, (ne1, ne0), by gguf-py's reference dequantizer."""
    raw = np.fromfile(path, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    rows = raw.reshape(info.shape[1] if len(info.shape) > 1 else 1, -1)
    return dequantize(rows, GGMLQuantizationType[info.type_name]).astype(np.float32)


def vocab_meta(name: str) -> dict:
    path = synth.shared_dir() / "vocab" / f"ggml-vocab-{name}.gguf"
    return {k: v for k, v in read_gguf(path).metadata.items() if k.startswith("tokenizer.")}


def assert_same_meta(got: dict, want: dict):
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            assert got[key] == value, key


def test_tiny_llama_names_shapes_types(tiny_llama_path):
    g = read_gguf(tiny_llama_path)
    assert g.tensors["token_embd.weight"].shape == (64, 32000)
    assert g.tensors["output.weight"].shape == (64, 32000)
    assert g.tensors["output_norm.weight"].shape == (64,)
    for i in range(2):
        for role, shape in LAYER_SHAPES.items():
            info = g.tensors[f"blk.{i}.{role}"]
            assert info.shape == shape, info.name
            assert info.type_name == ("F32" if "norm" in role else "Q4_0"), info.name
    assert len(g.tensors) == 3 + 2 * 9


def test_tiny_llama_metadata(tiny_llama_path):
    m = read_gguf(tiny_llama_path).metadata
    assert m["general.architecture"] == "llama"
    assert m["general.file_type"] == 2  # MOSTLY_Q4_0
    assert (m["llama.block_count"], m["llama.embedding_length"], m["llama.feed_forward_length"],
            m["llama.attention.head_count"], m["llama.attention.head_count_kv"],
            m["llama.context_length"], m["llama.rope.dimension_count"]) == (2, 64, 128, 4, 2,
                                                                              4096, 16)
    assert m["llama.rope.freq_base"] == 10000.0
    assert math.isclose(m["llama.attention.layer_norm_rms_epsilon"], 1e-5, rel_tol=1e-6)
    tok = {k: v for k, v in m.items() if k.startswith("tokenizer.")}
    assert_same_meta(tok, vocab_meta("llama-spm"))
    assert tok["tokenizer.ggml.model"] == "llama" and tok["tokenizer.ggml.bos_token_id"] == 1


def test_tiny_qwen2_biases_and_bpe_tokenizer(tiny_qwen2_path):
    g = read_gguf(tiny_qwen2_path)
    m = g.metadata
    assert m["general.architecture"] == "qwen2" and m["general.file_type"] == 7
    assert math.isclose(m["qwen2.attention.layer_norm_rms_epsilon"], 1e-6, rel_tol=1e-6)
    assert g.tensors["token_embd.weight"].shape == (64, 151936)
    for i in range(2):
        assert g.tensors[f"blk.{i}.attn_q.bias"].shape == (64,)
        assert g.tensors[f"blk.{i}.attn_k.bias"].shape == (32,)
        assert g.tensors[f"blk.{i}.attn_v.bias"].shape == (32,)
        assert g.tensors[f"blk.{i}.attn_v.bias"].type_name == "F32"
        assert g.tensors[f"blk.{i}.ffn_up.weight"].type_name == "Q8_0"
    tok = {k: v for k, v in m.items() if k.startswith("tokenizer.")}
    assert_same_meta(tok, vocab_meta("qwen2"))
    assert "tokenizer.chat_template" in tok and len(tok["tokenizer.ggml.merges"]) == 151387


def test_tied_has_no_output(tiny_llama_tied_path):
    names = read_gguf(tiny_llama_tied_path).tensors
    assert "output.weight" not in names and "token_embd.weight" in names


def test_mixed_types_and_values(tiny_mixed_path):
    """Every quant type: the planned type, finite values, rms 1/sqrt(row length) within 15%."""
    g = read_gguf(tiny_mixed_path)
    seen = set()
    for name, info in g.tensors.items():
        base = name.rsplit(".", 1)[0]
        want = "F32" if "norm" in name else MIXED_TYPES.get(base, MIXED_TYPES.get(
            base.split(".")[-1], "q4_0")).upper()
        assert info.type_name == want, name
        seen.add(info.type_name)
        w = values(tiny_mixed_path, info)
        assert np.isfinite(w).all(), name
        if "norm" in name:
            assert 0.05 < w.std() < 0.15 and abs(w.mean() - 1) < 0.05, name
        else:
            rms = float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
            assert rms == pytest.approx(1 / math.sqrt(info.shape[0]), rel=0.15), name
    assert seen >= {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                    "Q6_K", "F16", "BF16", "F32"}


def rms_norm(x, w, eps=1e-5):
    return x / np.sqrt(np.mean(x * x) + eps) * w


def one_token_forward(path, token: int) -> tuple[np.ndarray, list[float]]:
    """Logits for one token at position 0 (attention over one position returns v) in numpy."""
    g = read_gguf(path)
    t = {name: values(path, info) for name, info in g.tensors.items()}
    m = g.metadata
    n_head, n_kv = m["llama.attention.head_count"], m["llama.attention.head_count_kv"]
    x, rms = t["token_embd.weight"][token].copy(), []
    for i in range(m["llama.block_count"]):
        p = f"blk.{i}."
        h = rms_norm(x, t[p + "attn_norm.weight"][0])
        v = (t[p + "attn_v.weight"] @ h).reshape(n_kv, -1)
        x = x + t[p + "attn_output.weight"] @ np.repeat(v, n_head // n_kv, axis=0).ravel()
        h = rms_norm(x, t[p + "ffn_norm.weight"][0])
        gate, up = t[p + "ffn_gate.weight"] @ h, t[p + "ffn_up.weight"] @ h
        x = x + t[p + "ffn_down.weight"] @ (gate / (1 + np.exp(-gate)) * up)
        rms.append(float(np.sqrt(np.mean(x * x))))
    return t["output.weight"] @ rms_norm(x, t["output_norm.weight"][0]), rms


def test_activations_stay_finite_through_48_layers(tmp_path):
    spec = SynthSpec("llama", 48, 256, 512, 8, 2, seed=7)
    logits, rms = one_token_forward(write_synthetic(tmp_path / "deep.gguf", spec), 100)
    assert np.isfinite(logits).all()
    assert max(rms) < 30  # residual grows ~sqrt(2 * layers): about 10 after 48
    assert 0.3 < logits.std() < 10  # logits neither flat nor saturated


def test_same_seed_same_bytes(tmp_path):
    spec = SynthSpec(n_layer=1)
    a = write_synthetic(tmp_path / "a.gguf", spec).read_bytes()
    assert write_synthetic(tmp_path / "b.gguf", spec).read_bytes() == a
    assert write_synthetic(tmp_path / "c.gguf", SynthSpec(n_layer=1, seed=9)).read_bytes() != a


def test_presets_plan_sizes():
    plan = {t.name: t for t in tensor_plan(synth.PRESETS["llama2-7b"], 32000)}
    assert sum(t.nbytes for t in plan.values()) == 3_791_273_984  # 4.5 bits a weight: 3.8 GB
    assert plan["blk.31.ffn_down.weight"].shape == (11008, 4096)
    code = {t.name: t for t in tensor_plan(synth.PRESETS["codellama-34b"], 32000)}
    assert code["blk.47.attn_k.weight"].shape == (8192, 1024)  # 8 KV heads of 128
    assert len(code) == 3 + 48 * 9


@pytest.mark.parametrize("spec, words", [
    (SynthSpec(n_vocab=32001), "n_vocab 32001"),
    (SynthSpec(type="q4_k"), "row length 64"),
    (SynthSpec(overrides={"blk.5.attn_q": "q8_0"}), "blk.5.attn_q"),
    (SynthSpec(overrides={"attn_z": "q8_0"}), "attn_z"),
    (SynthSpec(type="q9_9"), "q9_9"),
    (SynthSpec(arch="gpt2"), "gpt2"),
    (SynthSpec(n_head=3), "heads 3/2"),
    (SynthSpec(arch="qwen2", rope_factors=True), "qwen2 has none"),
    (SynthSpec(n_swa=16), "only gemma3"),
    (SynthSpec(arch="phi3", head_dim=32), "phi3's q must be n_embd wide"),
])
def test_bad_specs_name_the_fault(tmp_path, spec, words):
    with pytest.raises(FlexInferError, match=words.replace(".", r"\.")):
        write_synthetic(tmp_path / "x.gguf", spec)
    assert not list(tmp_path.iterdir())


def test_missing_shared_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXINFER_SHARED", str(tmp_path / "nowhere"))
    with pytest.raises(FlexInferError, match="FLEXINFER_SHARED"):
        write_synthetic(tmp_path / "x.gguf", SynthSpec())


def test_failed_write_leaves_no_file(tmp_path):
    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_synthetic(tmp_path / "x.gguf", SynthSpec(n_layer=1), progress=stop)
    assert not list(tmp_path.iterdir())


def test_cli(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    argv = [str(out), "--preset", "tiny", "--layers", "1", "--type", "q8_0", "--tied",
            "--override", "ffn_down=f16"]
    assert _flexinfer(["synth", *argv]) == 0
    g = read_gguf(out)
    assert g.metadata["llama.block_count"] == 1 and "output.weight" not in g.tensors
    assert g.tensors["blk.0.ffn_down.weight"].type_name == "F16"
    assert g.tensors["blk.0.ffn_up.weight"].type_name == "Q8_0"
    assert "wrote" in capsys.readouterr().err
    assert _flexinfer(["synth", str(out), "--override", "ffn_down"]) == 2


def _flexinfer(argv) -> int:
    """`flexinfer ARGV` in-process: the exit code main() ends with."""
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    return done.value.code


ARCH_CASES = {  # arch -> SynthSpec changes beyond TINY_SHAPE
    "qwen3": dict(head_dim=32),
    "gemma3": dict(head_dim=32, n_swa=8, tied=True),
    "phi3": dict(rope_factors=True, attn_factor=1.19, orig_ctx=64),
    "llama": dict(rope_factors=True),
}


@pytest.mark.parametrize("arch", sorted(ARCH_CASES))
def test_each_arch_writes_what_flexinfer_checks(arch, tmp_path):
    """Names and shapes as llama.cpp's loader wants them (the fidelity references prove llama.cpp
    loads them); check_model accepts every tensor: none is unused, none missing."""
    from flexinfer.model_check import check_model

    spec = SynthSpec(arch, **TINY_SHAPE, **ARCH_CASES[arch], seed=5)
    g, cfg, specs = check_model(write_synthetic(tmp_path / f"{arch}.gguf", spec))
    assert sorted(s.name for s in specs) == sorted(g.tensors)
    t, m = g.tensors, g.metadata
    hd = spec.head_dim or 16
    if arch in ("qwen3", "gemma3"):
        assert t["blk.0.attn_q.weight"].shape == (64, 4 * hd)
        assert t["blk.0.attn_output.weight"].shape == (4 * hd, 64)
        assert t["blk.0.attn_q_norm.weight"].shape == (hd,) and cfg.head_dim == hd
        assert m[f"{arch}.attention.key_length"] == hd
    if arch == "gemma3":
        assert t["blk.1.post_ffw_norm.weight"].shape == (64,) and cfg.n_swa == 8
        assert cfg.swa_layers == (True, True)  # five of six slide: layers 0-4
    if arch == "phi3":
        assert t["blk.0.attn_qkv.weight"].shape == (64, 64 + 2 * 32)
        assert t["blk.0.ffn_up.weight"].shape == (64, 2 * 128)
        assert "blk.0.ffn_gate.weight" not in t
        assert t["rope_factors_long.weight"].shape == (8,)
        assert cfg.n_ctx_orig == 64 and math.isclose(cfg.rope_attn_factor, 1.19, rel_tol=1e-6)
        assert values(g.path, t["rope_factors_short.weight"]).min() >= 1.0
    if arch == "llama":
        f = values(g.path, t["rope_freqs.weight"])
        assert f.shape == (1, 8) and f.min() >= 1.0 and f.max() > 2.0  # every pair moved


TINY_SHAPE = dict(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2)
