"""The olmoe architecture (OLMoE-1B-7B: 16 layers, n_embd 2048, 16 heads of 128, 64 experts of
1024 of which 8 are used), as llama.cpp's src/models/olmoe.cpp builds it:

  attention  q, k, v without biases; an RMS norm over the WHOLE q vector (attn_q_norm, (n_embd_q,))
             and the whole k vector (attn_k_norm, (n_embd_kv,)) BEFORE they are cut into heads
             (qwen3 norms each head with one (head_dim,) weight instead); NEOX rope over the whole
             head (n_rot = head_dim); flash attention scaled 1/sqrt(head_dim); attn_output.
  FFN        a mixture of experts (models/moe.py): softmax routing, top-K, the K weights NOT
             normalized (llama.cpp passes norm_w = false; OLMoE's norm_topk_prob is false), no
             shared expert; the experts are feed_forward_length wide (config.N_FF_EXPERTS).
  head       output_norm and output.weight, which llama.cpp requires (never tied).

llama.cpp's loader makes attn_k_norm (n_embd,) and attn_q/attn_output (n_embd, n_embd), so the files
it runs have no grouped-query attention and n_embd_q = n_embd_kv = n_embd; the shapes here are those
of the tensors' roles (n_embd_q, n_embd_kv), which agree with it there and with the HF model's
k_norm of n_head_kv * head_dim elsewhere.
"""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import ROPE_NEOX, Ops, Tensor
from flexinfer.models import base, moe
from flexinfer.models.base import Batch, TensorSpec
from flexinfer.models.llama import build_head  # noqa: F401 (the contract)

ROPE_MODE = ROPE_NEOX


def tensor_specs(cfg: ModelConfig, tied: bool, names=frozenset()) -> list[TensorSpec]:
    """Every tensor of an OLMoE file; output.weight is required (a file without one is refused as
    missing, as llama.cpp refuses it)."""
    specs = base.embd_specs(cfg)
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        specs += [base.vec(b + "attn_norm.weight", cfg.n_embd, i),
                  *base.qkv_specs(cfg, i, bias=False),
                  base.vec(b + "attn_q_norm.weight", cfg.n_embd_q, i),
                  base.vec(b + "attn_k_norm.weight", cfg.n_embd_kv, i),
                  base.vec(b + "ffn_norm.weight", cfg.n_embd, i), *moe.ffn_specs(cfg, i)]
    return specs + base.head_specs(cfg, tied=False)


def build_layer(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """One block over x (n_embd, T): x + attention, then + the experts (moe.residual_ffn)."""
    h = attention_block(ops, cfg, w, x, batch, k_cache, v_cache, ROPE_MODE)
    return moe.residual_ffn(ops, cfg, w, h)


def attention_block(ops: Ops, cfg: ModelConfig, w: dict, x: Tensor, batch: Batch,
                    k_cache: Tensor, v_cache: Tensor, mode: int) -> Tensor:
    """x + attention(rms_norm(x)), (n_embd, T), with q and k normed whole (qk_norm) before the
    reshape to heads; expert streaming's graph A calls it too (moe.attn_graph)."""
    T, hd = batch.n_tokens, cfg.head_dim
    cur = base.rms_norm(ops, cfg, x, w["attn_norm.weight"])
    q = qk_norm(ops, cfg, ops.mul_mat(w["attn_q.weight"], cur), w["attn_q_norm.weight"])
    k = qk_norm(ops, cfg, ops.mul_mat(w["attn_k.weight"], cur), w["attn_k_norm.weight"])
    v = ops.mul_mat(w["attn_v.weight"], cur)  # (n_embd_kv, T)
    q = base.rope(ops, cfg, ops.reshape_3d(q, hd, cfg.n_head, T), batch, mode)
    k = base.rope(ops, cfg, ops.reshape_3d(k, hd, cfg.n_head_kv, T), batch, mode)
    base.store_kv(ops, cfg, k, ops.reshape_3d(v, hd, cfg.n_head_kv, T), k_cache, v_cache, batch)
    attn = base.attention(ops, cfg, q, k_cache, v_cache, batch, 1.0 / hd ** 0.5)
    return ops.add(ops.mul_mat(w["attn_output.weight"], attn), x)


def qk_norm(ops: Ops, cfg: ModelConfig, t: Tensor, weight: Tensor) -> Tensor:
    """RMS norm of each token's whole q (n_embd_q, T) or k (n_embd_kv, T), times the weight:
    one rms over all heads (2048 values for OLMoE-1B-7B), not one per head."""
    return base.rms_norm(ops, cfg, t, weight)
