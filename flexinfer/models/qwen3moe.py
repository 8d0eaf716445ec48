"""The qwen3moe architecture (Qwen3-30B-A3B, Qwen3-235B-A22B): qwen3's attention (RMS norms on each
query and key head before rope, NEOX rope, no biases) and a mixture-of-experts FFN with softmax
routing, top-K and the K weights normalized to sum 1 (models/moe.py); no shared expert.

As llama.cpp's qwen3moe graph: the weights are always normalized there (the file's
expert_weights_norm is not read), and expert_weights_scale is not applied.
"""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import ROPE_NEOX, Ops, Tensor
from flexinfer.models import moe
from flexinfer.models.llama import Batch, TensorSpec, _attention, _rope, build_head  # noqa: F401

ROPE_MODE = ROPE_NEOX
QKV_BIAS = False


def layer_specs(cfg: ModelConfig, i: int) -> list[TensorSpec]:
    e, kv, hd, b = cfg.n_embd, cfg.n_embd_kv, cfg.head_dim, f"blk.{i}."
    q = hd * cfg.n_head
    return [TensorSpec(b + "attn_norm.weight", (e,), "norm", i, False),
            TensorSpec(b + "attn_q.weight", (e, q), "attn", i),
            TensorSpec(b + "attn_k.weight", (e, kv), "attn", i),
            TensorSpec(b + "attn_v.weight", (e, kv), "attn", i),
            TensorSpec(b + "attn_output.weight", (q, e), "attn", i),
            TensorSpec(b + "attn_q_norm.weight", (hd,), "norm", i, False),
            TensorSpec(b + "attn_k_norm.weight", (hd,), "norm", i, False),
            TensorSpec(b + "ffn_norm.weight", (e,), "norm", i, False),
            *moe.moe_specs(cfg, i, cfg.n_ff_exp)]


def tensor_specs(cfg: ModelConfig, tied: bool, qkv_bias: bool = QKV_BIAS) -> list[TensorSpec]:
    specs = [TensorSpec("token_embd.weight", (cfg.n_embd, cfg.n_vocab), "embd", None)]
    for i in range(cfg.n_layer):
        specs += layer_specs(cfg, i)
    specs.append(TensorSpec("output_norm.weight", (cfg.n_embd,), "norm", None, False))
    if not tied:
        specs.append(TensorSpec("output.weight", (cfg.n_embd, cfg.n_vocab), "output", None))
    return specs


def build_layer(ops: Ops, cfg: ModelConfig, w: dict[str, Tensor], x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor, rope_mode: int = ROPE_MODE) -> Tensor:
    """One block over x (n_embd, T): normed q/k heads, rope, attention, then the experts."""
    T, hd, eps = batch.n_tokens, cfg.head_dim, cfg.norm_eps
    cur = ops.mul(ops.rms_norm(x, eps), w["attn_norm.weight"])
    q = ops.reshape_3d(ops.mul_mat(w["attn_q.weight"], cur), hd, cfg.n_head, T)
    k = ops.reshape_3d(ops.mul_mat(w["attn_k.weight"], cur), hd, cfg.n_head_kv, T)
    v = ops.mul_mat(w["attn_v.weight"], cur)
    q = _rope(ops, cfg, ops.mul(ops.rms_norm(q, eps), w["attn_q_norm.weight"]), batch, rope_mode)
    k = _rope(ops, cfg, ops.mul(ops.rms_norm(k, eps), w["attn_k_norm.weight"]), batch, rope_mode)
    ops.expand(ops.set_rows(k_cache, ops.reshape_2d(k, cfg.n_embd_kv, T), batch.kv_rows))
    ops.expand(ops.set_rows(v_cache, v, batch.kv_rows))
    attn = _attention(ops, cfg, q, k_cache, v_cache, batch)
    x = ops.add(ops.mul_mat(w["attn_output.weight"], attn), x)
    cur = ops.mul(ops.rms_norm(x, eps), w["ffn_norm.weight"])
    return ops.add(moe.ffn_moe(ops, cfg, w, cur, norm_weights=True), x)
