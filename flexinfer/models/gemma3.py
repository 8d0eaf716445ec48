"""The gemma3 architecture, as llama.cpp's src/models/gemma3.cpp builds it.

Differences from llama, in graph order:
- the embeddings are scaled by sqrt(n_embd) (done at the start of layer 0: the engine's embedding
  graph is shared by every arch);
- RMS norms over each head of q and k before rope (attn_q_norm / attn_k_norm, (head_dim,));
- sliding-window attention on the layers cfg.swa_layers marks (five of six: il % 6 < 5), with the
  window's Batch (batch.swa: the rings' cells and mask, kv_cache.py), rope base rope.freq_base_swa (10000) and no rope scaling there;
  the global layers use rope.freq_base (1e6) and the file's linear scaling (factor 8 on 4B+);
- q scaled by 1/sqrt(head_dim) before attention (1/sqrt(n_embd / n_head) for the 62-layer 27B, as
  llama.cpp decides by layer count), attention itself unscaled;
- RMS norms on the attention output and on the FFN output before each residual add
  (post_attention_norm, post_ffw_norm); gemma's (1 + w) norm weights are stored with the 1 added;
- a GELU-gated FFN (ggml_geglu_split);
- usually a tied output; final_logit_softcapping when the file sets it.
"""

from __future__ import annotations

import math

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import ROPE_NEOX, Ops, Tensor
from flexinfer.models import base
from flexinfer.models.base import Batch, TensorSpec

ROPE_MODE = ROPE_NEOX
IGNORED = {  # llama.cpp loads these for EmbeddingGemma and applies them only to embeddings output
    "dense_2_out.weight": "embedding projection (pooled embeddings only)",
    "dense_3_out.weight": "embedding projection (pooled embeddings only)",
}
LAYERS_27B = 62  # llama.cpp's gemma3 27B query scale uses n_embd / n_head


def tensor_specs(cfg: ModelConfig, tied: bool, names=frozenset()) -> list[TensorSpec]:
    specs = base.embd_specs(cfg)
    e, hd = cfg.n_embd, cfg.head_dim
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        specs += [base.vec(b + "attn_norm.weight", e, i), *base.qkv_specs(cfg, i, bias=False),
                  base.vec(b + "attn_q_norm.weight", hd, i), base.vec(b + "attn_k_norm.weight", hd, i),
                  base.vec(b + "post_attention_norm.weight", e, i), base.vec(b + "ffn_norm.weight", e, i),
                  *base.ffn_specs(cfg, i), base.vec(b + "post_ffw_norm.weight", e, i)]
    return specs + base.head_specs(cfg, tied)


def query_scale(cfg: ModelConfig) -> float:
    if cfg.n_layer == LAYERS_27B:
        return 1.0 / math.sqrt(cfg.n_embd // cfg.n_head)
    return 1.0 / math.sqrt(cfg.head_dim)


def build_layer(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
    if il == 0:
        x = ops.scale(x, math.sqrt(cfg.n_embd))  # the embedding scale
    swa = cfg.is_swa(il)
    base_l = cfg.rope_base_swa if swa else cfg.rope_base
    scale_l = 1.0 if swa else cfg.rope_freq_scale
    batch = base.for_layer(batch, cfg, il)  # a sliding layer's cache is its rings
    T = batch.n_tokens
    cur = base.rms_norm(ops, cfg, x, w["attn_norm.weight"])
    q, k, v = base.qkv(ops, cfg, w, cur, T)
    q = base.rope(ops, cfg, base.head_norm(ops, cfg, q, w, "attn_q_norm.weight"), batch,
                  ROPE_MODE, base=base_l, freq_scale=scale_l)
    k = base.rope(ops, cfg, base.head_norm(ops, cfg, k, w, "attn_k_norm.weight"), batch,
                  ROPE_MODE, base=base_l, freq_scale=scale_l)
    q = ops.scale(q, query_scale(cfg))
    base.store_kv(ops, cfg, k, v, k_cache, v_cache, batch)
    attn = base.attention(ops, cfg, q, k_cache, v_cache, batch, 1.0)
    cur = base.rms_norm(ops, cfg, ops.mul_mat(w["attn_output.weight"], attn),
                        w["post_attention_norm.weight"])
    x = ops.add(cur, x)
    cur = base.geglu_ffn(ops, w, base.rms_norm(ops, cfg, x, w["ffn_norm.weight"]))
    return ops.add(base.rms_norm(ops, cfg, cur, w["post_ffw_norm.weight"]), x)


def build_head(ops: Ops, cfg: ModelConfig, w: dict, x: Tensor) -> Tensor:
    logits = base.output_head(ops, cfg, w, x)
    if cfg.logit_softcap:
        c = cfg.logit_softcap
        logits = ops.scale(ops.tanh(ops.scale(logits, 1.0 / c)), c)
    return logits
