"""The phi3 architecture (Phi-3, Phi-3.5, Phi-4-mini), as llama.cpp's src/models/phi3.cpp builds it.

Differences from llama:
- q, k and v come from one fused attn_qkv matrix (rows q | k | v, n_embd + 2 n_embd_kv), viewed
  apart without a copy (older files have separate attn_q/k/v; both load, as in llama.cpp);
- gate and up are one fused ffn_up matrix (rows gate | up, 2 n_ff), split by ggml_swiglu;
- NEOX rope with LongRoPE: rope_factors_long.weight / rope_factors_short.weight (n_rot / 2 F32
  each) divide each pair's frequency; llama.cpp takes the long ones when the context (the cache's
  cells) exceeds rope.scaling.original_context_length, else the short ones, and scales cos/sin by
  rope.scaling.attn_factor;
- q scaled by 1/sqrt(head_dim) before attention, attention itself unscaled;
- the sliding window some files declare is ignored, as llama.cpp does (it disables phi3's SWA).
"""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import ROPE_NEOX, Ops, Tensor, ne
from flexinfer.models import base
from flexinfer.models.base import Batch, TensorSpec
from flexinfer.models.llama import build_head  # noqa: F401 (the contract)

ROPE_MODE = ROPE_NEOX
LONG, SHORT = "rope_factors_long.weight", "rope_factors_short.weight"


def tensor_specs(cfg: ModelConfig, tied: bool, names=frozenset()) -> list[TensorSpec]:
    specs = base.embd_specs(cfg)
    specs += [base.vec(n, cfg.n_rot // 2, None, base.ROPE_ROLE) for n in (LONG, SHORT) if n in names]
    fused = "blk.0.attn_qkv.weight" in names
    e = cfg.n_embd
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        specs += [base.vec(b + "attn_norm.weight", e, i), *base.qkv_specs(cfg, i, False, fused),
                  base.vec(b + "ffn_norm.weight", e, i), *base.ffn_specs(cfg, i, fused=True)]
    return specs + base.head_specs(cfg, tied)


def rope_factors(cfg: ModelConfig, w: dict, k_cache: Tensor):
    """llama.cpp's get_rope_factors: long when the context exceeds the original one."""
    return w.get(LONG if ne(k_cache, 1) > cfg.n_ctx_orig else SHORT)


def build_layer(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
    factors = rope_factors(cfg, w, k_cache)
    cur = base.rms_norm(ops, cfg, x, w["attn_norm.weight"])
    q, k, v = base.qkv(ops, cfg, w, cur, batch.n_tokens)
    q = base.rope(ops, cfg, q, batch, ROPE_MODE, factors=factors)
    k = base.rope(ops, cfg, k, batch, ROPE_MODE, factors=factors)
    q = ops.scale(q, 1.0 / cfg.head_dim ** 0.5)
    base.store_kv(ops, cfg, k, v, k_cache, v_cache, batch)
    attn = base.attention(ops, cfg, q, k_cache, v_cache, batch, 1.0)
    x = ops.add(ops.mul_mat(w["attn_output.weight"], attn), x)
    cur = base.rms_norm(ops, cfg, x, w["ffn_norm.weight"])
    return ops.add(x, base.swiglu_ffn(ops, w, cur))
