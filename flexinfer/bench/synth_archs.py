"""Per-architecture parts of a synthetic model: each block's tensors, the non-layer rope factors, and
the metadata keys beyond the common ones, with the names and shapes llama.cpp's loader expects
(src/models/{llama,qwen2,qwen3,gemma3,phi3}.cpp); llama.cpp refuses a file that differs.

Weights are strong enough that each feature moves the logits: norm weights 1 + N(0, norm_noise),
rope factors spread over [1, 16] on every pair (llama3's rope_freqs) or [1, 8] / [1, 2] (LongRoPE
long / short), so dropping any of them changes the output (tests/test_fidelity.py breaks each).
"""

from __future__ import annotations

import math

VOCAB_FILES = {"llama": "ggml-vocab-llama-spm.gguf", "qwen2": "ggml-vocab-qwen2.gguf",
               "qwen3": "ggml-vocab-qwen2.gguf", "gemma3": "ggml-vocab-llama-spm.gguf",
               "phi3": "ggml-vocab-phi-3.gguf"}
RMS_EPS = {"llama": 1e-5, "qwen2": 1e-6, "qwen3": 1e-6, "gemma3": 1e-6, "phi3": 1e-5}
ROPE_FACTOR_ARCHS = ("llama", "phi3")  # llama: rope_freqs; phi3: rope_factors_long / _short
FACTOR_SPANS = {"rope_freqs.weight": (1.0, 16.0), "rope_factors_long.weight": (1.0, 8.0),
                "rope_factors_short.weight": (1.0, 2.0)}


LLAMA_BIAS = 0.5  # rms of llama's synthetic output/FFN biases (activations have rms ~1)


def head_dim(spec) -> int:
    return spec.head_dim or spec.n_embd // spec.n_head


def layer_tensors(spec, i: int, matrix, vector) -> list:
    """Block i's tensors. matrix(spec, base, ne0, ne1) and vector(name, n, spec, bias) make them."""
    p, e, ff, a = f"blk.{i}", spec.n_embd, spec.n_ff, spec.arch
    hd = head_dim(spec)
    q, kv = hd * spec.n_head, hd * spec.n_head_kv
    out = [vector(f"{p}.attn_norm.weight", e, spec)]
    if a == "phi3":  # fused q | k | v rows
        out.append(matrix(spec, f"{p}.attn_qkv", e, q + 2 * kv))
    else:
        out += [matrix(spec, f"{p}.attn_q", e, q), matrix(spec, f"{p}.attn_k", e, kv),
                matrix(spec, f"{p}.attn_v", e, kv)]
    if a == "qwen2":
        out += [vector(f"{p}.attn_q.bias", q, spec, True), vector(f"{p}.attn_k.bias", kv, spec, True),
                vector(f"{p}.attn_v.bias", kv, spec, True)]
    if a in ("qwen3", "gemma3"):
        out += [vector(f"{p}.attn_q_norm.weight", hd, spec),
                vector(f"{p}.attn_k_norm.weight", hd, spec)]
    out.append(matrix(spec, f"{p}.attn_output", q, e))
    if spec.biases:  # llama's optional output and FFN biases, strong enough to matter
        out.append(vector(f"{p}.attn_output.bias", e, spec, LLAMA_BIAS))
    if a == "gemma3":
        out.append(vector(f"{p}.post_attention_norm.weight", e, spec))
    out.append(vector(f"{p}.ffn_norm.weight", e, spec))
    if a == "phi3":  # fused gate | up rows
        out.append(matrix(spec, f"{p}.ffn_up", e, 2 * ff))
    else:
        out += [matrix(spec, f"{p}.ffn_gate", e, ff), matrix(spec, f"{p}.ffn_up", e, ff)]
    if spec.biases:
        out += [vector(f"{p}.ffn_gate.bias", ff, spec, LLAMA_BIAS),
                vector(f"{p}.ffn_up.bias", ff, spec, LLAMA_BIAS)]
    out.append(matrix(spec, f"{p}.ffn_down", ff, e))
    if spec.biases:
        out.append(vector(f"{p}.ffn_down.bias", e, spec, LLAMA_BIAS))
    if a == "gemma3":
        out.append(vector(f"{p}.post_ffw_norm.weight", e, spec))
    return out


def factor_names(spec) -> tuple[str, ...]:
    if not spec.rope_factors:
        return ()
    return ("rope_freqs.weight",) if spec.arch == "llama" else (
        "rope_factors_long.weight", "rope_factors_short.weight")


def arch_metadata(spec) -> dict[str, tuple[str, object]]:
    """Keys beyond the common ones, each only when the spec asks for its feature, so files of the
    earlier specs keep their bytes."""
    a, out = spec.arch, {}
    if spec.head_dim:
        out[f"{a}.attention.key_length"] = ("uint32", spec.head_dim)
        out[f"{a}.attention.value_length"] = ("uint32", spec.head_dim)
    if spec.n_swa:
        out[f"{a}.attention.sliding_window"] = ("uint32", spec.n_swa)
    if spec.attn_factor is not None:
        out[f"{a}.rope.scaling.attn_factor"] = ("float32", float(spec.attn_factor))
    if spec.orig_ctx is not None:
        out[f"{a}.rope.scaling.original_context_length"] = ("uint32", spec.orig_ctx)
    if spec.rope_scaling is not None:
        out[f"{a}.rope.scaling.type"] = ("string", spec.rope_scaling)
    if spec.rope_factor is not None:
        out[f"{a}.rope.scaling.factor"] = ("float32", float(spec.rope_factor))
    return out


def check_arch_spec(spec) -> str | None:
    """Why llama.cpp could not load this spec, or None."""
    if spec.rope_factors and spec.arch not in ROPE_FACTOR_ARCHS:
        return f"rope_factors: {spec.arch} has none (only {', '.join(ROPE_FACTOR_ARCHS)})"
    if spec.n_swa and spec.arch not in ("gemma3", "gpt-oss"):
        return f"n_swa {spec.n_swa}: only gemma3 and gpt-oss have a sliding window"
    if spec.biases and spec.arch != "llama":
        return "biases: only llama has optional output and FFN biases"
    if spec.n_swa < 0:
        return f"n_swa {spec.n_swa}: must be >= 0"
    if spec.head_dim is not None and (spec.head_dim <= 0 or spec.head_dim % 2):
        return f"head_dim {spec.head_dim}: must be even and > 0"
    if spec.arch == "phi3" and spec.head_dim and spec.head_dim * spec.n_head != spec.n_embd:
        return f"head_dim {spec.head_dim}: phi3's q must be n_embd wide"
    if spec.arch == "llama" and spec.head_dim and spec.head_dim * spec.n_head != spec.n_embd:
        return f"head_dim {spec.head_dim}: llama's heads must tile n_embd"
    return None


def factor_values(rng, name: str, n: int):
    lo, hi = FACTOR_SPANS[name]
    import numpy as np
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n)).astype(np.float32)
