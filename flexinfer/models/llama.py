"""The llama architecture (Llama 2/3, Mistral-style grouped-query attention, SmolLM2): the tensors it
needs, by GGUF name and ggml shape, and the graph of one layer.

Graph shapes are ggml order, innermost first: x is (n_embd, T) for a batch of T tokens.
The op sequence follows llama.cpp's llm_build_llama so that results agree with it to rounding:
rms_norm -> q/k/v -> rope -> KV store (f16) -> flash attention -> wo -> residual -> rms_norm ->
swiglu(gate, up) -> down -> residual.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import ROPE_NORM, Ops, Tensor
from flexinfer.models import moe

ROPE_MODE = ROPE_NORM  # rotate adjacent pairs (GPT-J style); qwen2 rotates halves (NEOX)
QKV_BIAS = False  # qwen2 adds biases to q, k and v


@dataclass(frozen=True)
class TensorSpec:
    name: str  # GGUF name: "blk.3.ffn_up.weight"
    shape: tuple[int, ...]  # ggml order: (ne0, ne1)
    role: str  # "attn" | "ffn" | "norm" | "embd" | "output": what the planner reasons about
    layer: int | None  # block index, None for token_embd / output_norm / output
    quantizable: bool = True  # False: must be F32 (norms and biases)


def layer_specs(cfg: ModelConfig, i: int, qkv_bias: bool) -> list[TensorSpec]:
    e, kv, ff = cfg.n_embd, cfg.n_embd_kv, cfg.n_ff
    b = f"blk.{i}."
    specs = [
        TensorSpec(b + "attn_norm.weight", (e,), "norm", i, False),
        TensorSpec(b + "attn_q.weight", (e, e), "attn", i),
        TensorSpec(b + "attn_k.weight", (e, kv), "attn", i),
        TensorSpec(b + "attn_v.weight", (e, kv), "attn", i),
        TensorSpec(b + "attn_output.weight", (e, e), "attn", i),
        TensorSpec(b + "ffn_norm.weight", (e,), "norm", i, False),
    ]
    if cfg.n_expert:  # mixtral: the FFN is n_expert experts of n_ff (models/moe.py)
        specs += moe.moe_specs(cfg, i, cfg.n_ff_exp)
    else:
        specs += [TensorSpec(b + "ffn_gate.weight", (e, ff), "ffn", i),
                  TensorSpec(b + "ffn_up.weight", (e, ff), "ffn", i),
                  TensorSpec(b + "ffn_down.weight", (ff, e), "ffn", i)]
    if qkv_bias:
        specs += [TensorSpec(b + "attn_q.bias", (e,), "attn", i, False),
                  TensorSpec(b + "attn_k.bias", (kv,), "attn", i, False),
                  TensorSpec(b + "attn_v.bias", (kv,), "attn", i, False)]
    return specs


def tensor_specs(cfg: ModelConfig, tied: bool, qkv_bias: bool = QKV_BIAS) -> list[TensorSpec]:
    """Every tensor the model reads. A tied output (no output.weight) reuses token_embd."""
    specs = [TensorSpec("token_embd.weight", (cfg.n_embd, cfg.n_vocab), "embd", None)]
    for i in range(cfg.n_layer):
        specs += layer_specs(cfg, i, qkv_bias)
    specs.append(TensorSpec("output_norm.weight", (cfg.n_embd,), "norm", None, False))
    if not tied:
        specs.append(TensorSpec("output.weight", (cfg.n_embd, cfg.n_vocab), "output", None))
    return specs


@dataclass(frozen=True)
class Batch:
    """The per-batch inputs every layer graph shares; their data is rewritten for each batch."""

    n_tokens: int  # T
    n_kv: int  # cache cells attention reads: positions 0..n_kv-1 (padded; the mask hides the rest)
    pos: Tensor  # (T,) i32 positions, for rope
    kv_rows: Tensor  # (T,) i64 cache rows the new K/V go to
    mask: Tensor  # (n_kv, T padded to KQ_MASK_PAD) f16: 0 where visible, -inf elsewhere


def build_layer(ops: Ops, cfg: ModelConfig, w: dict[str, Tensor], x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor, rope_mode: int = ROPE_MODE) -> Tensor:
    """One transformer block over x (n_embd, T); returns the new residual stream (n_embd, T)."""
    T, hd = batch.n_tokens, cfg.head_dim
    cur = ops.mul(ops.rms_norm(x, cfg.norm_eps), w["attn_norm.weight"])
    q, k, v = (_proj(ops, w, name, cur) for name in ("attn_q", "attn_k", "attn_v"))
    q = _rope(ops, cfg, ops.reshape_3d(q, hd, cfg.n_head, T), batch, rope_mode)
    k = _rope(ops, cfg, ops.reshape_3d(k, hd, cfg.n_head_kv, T), batch, rope_mode)
    ops.expand(ops.set_rows(k_cache, ops.reshape_2d(k, cfg.n_embd_kv, T), batch.kv_rows))
    ops.expand(ops.set_rows(v_cache, v, batch.kv_rows))
    attn = _attention(ops, cfg, q, k_cache, v_cache, batch)
    x = ops.add(ops.mul_mat(w["attn_output.weight"], attn), x)
    cur = ops.mul(ops.rms_norm(x, cfg.norm_eps), w["ffn_norm.weight"])
    if cfg.n_expert:  # mixtral: softmax top-K, weights normalized, as llama.cpp's llama graph
        return ops.add(moe.ffn_moe(ops, cfg, w, cur, norm_weights=True), x)
    gate = ops.mul_mat(w["ffn_gate.weight"], cur)  # (n_ff, T)
    up = ops.mul_mat(w["ffn_up.weight"], cur)
    return ops.add(ops.mul_mat(w["ffn_down.weight"], ops.swiglu(gate, up)), x)


def _proj(ops: Ops, w: dict[str, Tensor], name: str, cur: Tensor) -> Tensor:
    out = ops.mul_mat(w[name + ".weight"], cur)
    bias = w.get(name + ".bias")
    return ops.add(out, bias) if bias is not None else out


def _rope(ops: Ops, cfg: ModelConfig, t: Tensor, batch: Batch, mode: int) -> Tensor:
    return ops.rope(t, batch.pos, cfg.n_rot, mode, cfg.n_ctx_train, cfg.rope_base,
                    cfg.rope_freq_scale)


def _attention(ops: Ops, cfg: ModelConfig, q: Tensor, k_cache: Tensor, v_cache: Tensor,
               batch: Batch) -> Tensor:
    """Flash attention over the first n_kv cache rows; GQA heads share K/V by broadcast."""
    hd, row = cfg.head_dim, cfg.n_embd_kv * 2  # f16 cache rows
    q = ops.permute(q, 0, 2, 1, 3)  # (hd, T, n_head)
    k = ops.view_3d(k_cache, hd, batch.n_kv, cfg.n_head_kv, row, hd * 2)  # (hd, n_kv, n_head_kv)
    v = ops.view_3d(v_cache, hd, batch.n_kv, cfg.n_head_kv, row, hd * 2)
    out = ops.flash_attn(q, k, v, batch.mask, 1.0 / hd ** 0.5)  # (hd, n_head, T)
    return ops.reshape_2d(out, cfg.n_embd, batch.n_tokens)


def build_head(ops: Ops, cfg: ModelConfig, output_norm: Tensor, output: Tensor, x: Tensor) -> Tensor:
    """Final norm and the output projection: (n_embd, T) -> logits (n_vocab, T)."""
    return ops.mul_mat(output, ops.mul(ops.rms_norm(x, cfg.norm_eps), output_norm))
