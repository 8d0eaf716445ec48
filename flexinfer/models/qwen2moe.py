"""The qwen2moe architecture (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): qwen2's attention (biases on q, k
and v, NEOX rope) and a mixture-of-experts FFN with softmax routing and top-K whose weights are NOT
normalized, plus a shared expert gated per token by a sigmoid (models/moe.py), as llama.cpp's
qwen2moe graph computes them.
"""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import ROPE_NEOX, Ops, Tensor
from flexinfer.models import moe
from flexinfer.models.llama import (Batch, TensorSpec, _attention, _proj, _rope,  # noqa: F401
                                    build_head)

ROPE_MODE = ROPE_NEOX
QKV_BIAS = True


def layer_specs(cfg: ModelConfig, i: int) -> list[TensorSpec]:
    e, kv, b = cfg.n_embd, cfg.n_embd_kv, f"blk.{i}."
    return [TensorSpec(b + "attn_norm.weight", (e,), "norm", i, False),
            TensorSpec(b + "attn_q.weight", (e, e), "attn", i),
            TensorSpec(b + "attn_k.weight", (e, kv), "attn", i),
            TensorSpec(b + "attn_v.weight", (e, kv), "attn", i),
            TensorSpec(b + "attn_q.bias", (e,), "attn", i, False),
            TensorSpec(b + "attn_k.bias", (kv,), "attn", i, False),
            TensorSpec(b + "attn_v.bias", (kv,), "attn", i, False),
            TensorSpec(b + "attn_output.weight", (e, e), "attn", i),
            TensorSpec(b + "ffn_norm.weight", (e,), "norm", i, False),
            *moe.moe_specs(cfg, i, cfg.n_ff_exp),
            *moe.shared_expert_specs(cfg, i)]


def tensor_specs(cfg: ModelConfig, tied: bool, qkv_bias: bool = QKV_BIAS) -> list[TensorSpec]:
    """llama.cpp requires output.weight for qwen2moe (no tied head)."""
    specs = [TensorSpec("token_embd.weight", (cfg.n_embd, cfg.n_vocab), "embd", None)]
    for i in range(cfg.n_layer):
        specs += layer_specs(cfg, i)
    specs.append(TensorSpec("output_norm.weight", (cfg.n_embd,), "norm", None, False))
    specs.append(TensorSpec("output.weight", (cfg.n_embd, cfg.n_vocab), "output", None))
    return specs


def build_layer(ops: Ops, cfg: ModelConfig, w: dict[str, Tensor], x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor, rope_mode: int = ROPE_MODE) -> Tensor:
    """One block over x (n_embd, T): attention, then routed experts + the gated shared expert."""
    T, hd, eps = batch.n_tokens, cfg.head_dim, cfg.norm_eps
    cur = ops.mul(ops.rms_norm(x, eps), w["attn_norm.weight"])
    q, k, v = (_proj(ops, w, name, cur) for name in ("attn_q", "attn_k", "attn_v"))
    q = _rope(ops, cfg, ops.reshape_3d(q, hd, cfg.n_head, T), batch, rope_mode)
    k = _rope(ops, cfg, ops.reshape_3d(k, hd, cfg.n_head_kv, T), batch, rope_mode)
    ops.expand(ops.set_rows(k_cache, ops.reshape_2d(k, cfg.n_embd_kv, T), batch.kv_rows))
    ops.expand(ops.set_rows(v_cache, v, batch.kv_rows))
    attn = _attention(ops, cfg, q, k_cache, v_cache, batch)
    x = ops.add(ops.mul_mat(w["attn_output.weight"], attn), x)
    cur = ops.mul(ops.rms_norm(x, eps), w["ffn_norm.weight"])
    out = ops.add(moe.ffn_moe(ops, cfg, w, cur, norm_weights=False), moe.shared_expert(ops, w, cur))
    return ops.add(out, x)
