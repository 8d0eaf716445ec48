"""The gpt-oss architecture (gpt-oss-20b, gpt-oss-120b; GGUF arch "gpt-oss", llama.cpp's
LLM_ARCH_OPENAI_MOE), as llama.cpp's src/models/openai-moe-iswa.cpp and build_moe_ffn build it.

A llama-like pre-norm block with, in graph order:
- q, k, v and attn_output projections with biases; NEOX rope (the file's yarn scaling: factor 32
  over 4096 positions in the real models), on every layer with the same base and scaling;
- attention sinks: one learned logit per query head (attn_sinks.weight, (n_head,) F32), an extra
  term in each softmax denominator that takes no value (ggml_flash_attn_ext_add_sinks), scale
  1/sqrt(head_dim);
- a sliding window (attention.sliding_window, 128 in the real models) on the even layers, the odd
  ones global (llama.cpp's swa pattern 2): the sliding layers keep their K/V in the rings of
  kv_cache.py, as gemma3's do;
- post_attention_norm (RMS) as the FFN's input norm (llama's ffn_norm);
- a mixture of experts routed by "softmax weight": logits = router x + router bias (E, T); the top
  K of the logits; their K logits softmaxed into the weights (no normalization after);
- each expert: up = W_up x + b_up[e], gate = W_gate x + b_gate[e] (ggml_add_id adds expert e's
  bias row), swiglu_oai(gate, up) = min(gate, 7) * sigmoid(1.702 min(gate, 7)) * (clamp(up, -7,
  7) + 1), down = W_down h + b_down[e]; outputs weighted and added in top-K order (moe.py).
No shared expert, no q/k norms, an untied output.

Shapes for gpt-oss-20b: n_embd 2880, 24 layers, 64 query and 8 KV heads of 64, 32 experts of 2880
of which 4 are used, vocab 201088. The expert weights are MXFP4 in the released files (ggml type
39: 17 bytes per 32 values); the expert biases are F32 (n_ff_exp or n_embd, E): resident like a
norm (weights.py keeps every F32-only tensor whole), so expert streaming (experts.py) reads only
the *_exps.weight slabs.
"""

from __future__ import annotations

import sys

from flexinfer import ggml_ops
from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import ROPE_NEOX, Ops, Tensor
from flexinfer.models import base, moe
from flexinfer.models.base import Batch, TensorSpec

ROPE_MODE = ROPE_NEOX
SWIGLU_ALPHA = 1.702  # llama.cpp's constants for LLM_FFN_SWIGLU_OAI_MOE
SWIGLU_LIMIT = 7.0
EXPERT_KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def tensor_specs(cfg: ModelConfig, tied: bool, names=frozenset()) -> list[TensorSpec]:
    specs = base.embd_specs(cfg)
    for i in range(cfg.n_layer):
        specs += block_specs(cfg, i)
    return specs + base.head_specs(cfg, tied)


def block_specs(cfg: ModelConfig, i: int) -> list[TensorSpec]:
    """Layer i's tensors, all required (llama.cpp's loader has none optional for gpt-oss)."""
    e, n, ff, b = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp, f"blk.{i}."
    specs = [base.vec(b + "attn_norm.weight", e, i), *base.qkv_specs(cfg, i, bias=True),
             base.vec(b + "attn_output.bias", e, i, "attn"),
             base.vec(b + "attn_sinks.weight", cfg.n_head, i, "attn"),
             base.vec(b + "post_attention_norm.weight", e, i),
             base.mat(b + "ffn_gate_inp.weight", e, n, "ffn", i),
             base.vec(b + "ffn_gate_inp.bias", n, i, "ffn")]
    for kind, ne0, ne1 in (("ffn_gate_exps", e, ff), ("ffn_up_exps", e, ff),
                           ("ffn_down_exps", ff, e)):
        specs += [TensorSpec(f"{b}{kind}.weight", (ne0, ne1, n), "ffn", i),
                  # (rows, E) F32: one bias row per expert; kept whole and resident (weights.py)
                  TensorSpec(f"{b}{kind}.bias", (ne1, n), "ffn", i, quantizable=False)]
    return specs


def build_layer(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
    h = attention_block(ops, cfg, il, w, x, batch, k_cache, v_cache)
    return ops.add(ffn(ops, cfg, w, base.rms_norm(ops, cfg, h, w["post_attention_norm.weight"])), h)


def attention_block(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch: Batch,
                    k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """x + attn_output(attention with sinks over rope(q), rope(k), v), (n_embd, T); a sliding
    layer reads its rings' cells and mask (base.for_layer)."""
    batch = base.for_layer(batch, cfg, il)
    cur = base.rms_norm(ops, cfg, x, w["attn_norm.weight"])
    q, k, v = base.qkv(ops, cfg, w, cur, batch.n_tokens)  # + biases: (hd, heads, T)
    q = base.rope(ops, cfg, q, batch, ROPE_MODE)
    k = base.rope(ops, cfg, k, batch, ROPE_MODE)
    base.store_kv(ops, cfg, k, v, k_cache, v_cache, batch)
    attn = base.attention(ops, cfg, q, k_cache, v_cache, batch, 1.0 / cfg.head_dim ** 0.5,
                          sinks=w["attn_sinks.weight"])
    return ops.add(base.proj(ops, w, "attn_output", attn), x)


def route(ops: Ops, cfg: ModelConfig, w: dict, cur: Tensor) -> tuple[Tensor, Tensor]:
    """(logits + router bias (E, T), the top-K expert ids (K, T) i32): llama.cpp's softmax-weight
    gating picks by the raw logits."""
    logits = ops.add(ops.mul_mat(w["ffn_gate_inp.weight"], cur), w["ffn_gate_inp.bias"])
    return logits, ops.argsort_top_k(logits, cfg.n_expert_used)


def ffn(ops: Ops, cfg: ModelConfig, w: dict, cur: Tensor) -> Tensor:
    """The routed experts over cur (n_embd, T), the post-attention-normed residual; (n_embd, T)."""
    e, n, k = cfg.n_embd, cfg.n_expert, cfg.n_expert_used
    T = ggml_ops.ne(cur, 1)
    logits, selected = route(ops, cfg, w, cur)
    weights = ops.get_rows(ops.reshape_3d(logits, 1, n, T), selected)  # (1, K, T)
    weights = ops.reshape_3d(ops.soft_max(ops.reshape_2d(weights, k, T)), 1, k, T)
    x = ops.reshape_3d(cur, e, 1, T)
    up = ops.add_id(ops.mul_mat_id(w["ffn_up_exps.weight"], x, selected), w["ffn_up_exps.bias"],
                    selected)  # (ff, K, T)
    gate = ops.add_id(ops.mul_mat_id(w["ffn_gate_exps.weight"], x, selected),
                      w["ffn_gate_exps.bias"], selected)
    h = ops.swiglu_oai(gate, up, SWIGLU_ALPHA, SWIGLU_LIMIT)
    experts = ops.add_id(ops.mul_mat_id(w["ffn_down_exps.weight"], h, selected),
                         w["ffn_down_exps.bias"], selected)  # (n_embd, K, T)
    return moe.sum_experts(ops, cfg, ops.mul(experts, weights), T)


def build_head(ops: Ops, cfg: ModelConfig, w: dict, x: Tensor) -> Tensor:
    return base.output_head(ops, cfg, w, x)


# ---- expert streaming: the layer in two graphs split after the router (moe.attn_graph and
# moe.ffn_graph hand gpt-oss layers to these)

def attn_graph(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch, k_cache: Tensor,
               v_cache: Tensor, xa: Tensor, ids: Tensor) -> None:
    """Graph A: attention and the residual to xa, the router's top-K to ids (engine memory)."""
    h = attention_block(ops, cfg, il, w, x, batch, k_cache, v_cache)
    _, selected = route(ops, cfg, w, base.rms_norm(ops, cfg, h, w["post_attention_norm.weight"]))
    ops.output(ops.cpy(h, xa))
    ops.output(ops.cpy(selected, ids))


def ffn_graph(ops: Ops, cfg: ModelConfig, w: dict, xa: Tensor, x: Tensor) -> None:
    """Graph B: the experts over the saved residual xa, written to x; it routes again from the
    same bytes with the same ops, so it computes what build_layer computes."""
    cur = base.rms_norm(ops, cfg, xa, w["post_attention_norm.weight"])
    ops.output(ops.cpy(ops.add(ffn(ops, cfg, w, cur), xa), x))


moe.SPLIT["gpt-oss"] = sys.modules[__name__]
