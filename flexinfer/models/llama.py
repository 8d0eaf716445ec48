"""The llama architecture (Llama 2/3/3.1+, Mistral-style grouped-query attention, SmolLM2), and the
block qwen2 and qwen3 share with it.

Graph shapes are ggml order, innermost first: x is (n_embd, T) for a batch of T tokens.
The op sequence follows llama.cpp's llama graph (src/models/llama.cpp) so that results agree with it
to rounding: rms_norm -> q/k/v -> rope (with rope_freqs when the file has them) -> KV store ->
flash attention -> wo -> residual -> rms_norm -> swiglu(gate, up) -> down -> residual.

Llama 3.1+ files carry `rope_freqs.weight` (n_rot / 2 F32 factors, the llama3 rope scaling
precomputed by the converter: llama.cpp has no "llama3" scaling type at run time); every rope
divides pair i's angle by factor i.
"""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import ROPE_NORM, Ops, Tensor
from flexinfer.models import base, moe
from flexinfer.models.base import Batch, TensorSpec

ROPE_MODE = ROPE_NORM  # rotate adjacent pairs (GPT-J style); qwen2/qwen3 rotate halves (NEOX)
ROPE_FREQS = "rope_freqs.weight"


def tensor_specs(cfg: ModelConfig, tied: bool, names=frozenset()) -> list[TensorSpec]:
    """Every tensor the model reads. q/k/v biases and rope_freqs only when the file has them (as
    llama.cpp's loader, which makes them optional); a tied output reuses token_embd."""
    specs = base.embd_specs(cfg)
    if ROPE_FREQS in names:
        specs.append(base.vec(ROPE_FREQS, cfg.n_rot // 2, None, base.ROPE_ROLE))
    bias = "blk.0.attn_q.bias" in names
    for i in range(cfg.n_layer):
        specs += block_specs(cfg, i, bias) + optional_biases(cfg, i, names)
    return specs + base.head_specs(cfg, tied)


OPTIONAL_BIASES = ("attn_output", "ffn_gate", "ffn_up", "ffn_down")  # llama.cpp: TENSOR_NOT_REQUIRED


def optional_biases(cfg: ModelConfig, i: int, names) -> list[TensorSpec]:
    """Layer i's attn_output / ffn_gate / ffn_up / ffn_down biases, each where the file has it (as
    llama.cpp's llama loader takes them); the graph adds each after its matmul (base.proj)."""
    if cfg.n_expert:  # mixtral's experts have none
        return []
    sizes = {"attn_output": cfg.n_embd, "ffn_gate": cfg.n_ff, "ffn_up": cfg.n_ff,
             "ffn_down": cfg.n_embd}
    role = {"attn_output": "attn"}
    return [base.vec(f"blk.{i}.{n}.bias", sizes[n], i, role.get(n, "ffn"))
            for n in OPTIONAL_BIASES if f"blk.{i}.{n}.bias" in names]


def block_specs(cfg: ModelConfig, i: int, bias: bool, qk_norm: bool = False) -> list[TensorSpec]:
    b = f"blk.{i}."
    specs = [base.vec(b + "attn_norm.weight", cfg.n_embd, i), *base.qkv_specs(cfg, i, bias)]
    if qk_norm:  # qwen3: one (head_dim,) weight shared by every head
        specs += [base.vec(b + "attn_q_norm.weight", cfg.head_dim, i),
                  base.vec(b + "attn_k_norm.weight", cfg.head_dim, i)]
    ffn = moe.ffn_specs(cfg, i) if cfg.n_expert else base.ffn_specs(cfg, i)  # experts: moe.py
    return specs + [base.vec(b + "ffn_norm.weight", cfg.n_embd, i), *ffn]


def build_layer(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
    return block(ops, cfg, w, x, batch, k_cache, v_cache, ROPE_MODE)


def block(ops: Ops, cfg: ModelConfig, w: dict, x: Tensor, batch: Batch, k_cache: Tensor,
          v_cache: Tensor, mode: int) -> Tensor:
    """One pre-norm transformer block over x (n_embd, T); returns the new residual (n_embd, T).
    q/k norms (qwen3) apply when w has them, rope_freqs when w has it."""
    x = attention_block(ops, cfg, w, x, batch, k_cache, v_cache, mode)
    cur = base.rms_norm(ops, cfg, x, w["ffn_norm.weight"])
    if cfg.n_expert:  # mixtral, qwen2moe, qwen3moe: experts as llama.cpp's build_moe_ffn
        return ops.add(moe.ffn(ops, cfg, w, cur), x)
    return ops.add(base.swiglu_ffn(ops, w, cur), x)


def attention_block(ops: Ops, cfg: ModelConfig, w: dict, x: Tensor, batch: Batch,
                    k_cache: Tensor, v_cache: Tensor, mode: int) -> Tensor:
    """The attention half of `block`: x + attention(rms_norm(x)), (n_embd, T). Expert streaming
    computes it in a graph of its own (moe.split_layer)."""
    T = batch.n_tokens
    cur = base.rms_norm(ops, cfg, x, w["attn_norm.weight"])
    q, k, v = base.qkv(ops, cfg, w, cur, T)  # (hd, heads, T)
    q = base.head_norm(ops, cfg, q, w, "attn_q_norm.weight")
    k = base.head_norm(ops, cfg, k, w, "attn_k_norm.weight")
    factors = w.get(ROPE_FREQS)
    q = base.rope(ops, cfg, q, batch, mode, factors=factors)
    k = base.rope(ops, cfg, k, batch, mode, factors=factors)
    base.store_kv(ops, cfg, k, v, k_cache, v_cache, batch)
    attn = base.attention(ops, cfg, q, k_cache, v_cache, batch, 1.0 / cfg.head_dim ** 0.5)
    return ops.add(base.proj(ops, w, "attn_output", attn), x)  # + attn_output.bias when present


def build_head(ops: Ops, cfg: ModelConfig, w: dict, x: Tensor) -> Tensor:
    """Final norm and the output projection: (n_embd, T) -> logits (n_vocab, T)."""
    return base.output_head(ops, cfg, w, x)
