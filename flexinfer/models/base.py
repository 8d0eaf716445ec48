"""The architecture contract: the types every arch module shares and the graph pieces they build with.

Each arch module (llama.py, qwen2.py, qwen3.py, gemma3.py, phi3.py, ...) provides

    tensor_specs(cfg, tied) -> list[TensorSpec]
        every tensor the model reads, by GGUF name and ggml shape; the file must hold exactly these
        (models.specs_for refuses a missing one and an unused one). Optional tensors (biases,
        rope factors) are decided by the arch from the file: `tensor_specs` gets `names`, the
        file's tensor names, as a keyword argument.
    build_layer(ops, cfg, il, w, x, batch, k_cache, v_cache) -> Tensor
        one block over the residual x (n_embd, T); returns the new residual (n_embd, T). w is the
        layer's weights keyed by GGUF name without "blk.N." ("attn_q.weight"); a weight split into
        row blocks is a tuple, which ops.mul_mat takes as is.
    build_head(ops, cfg, w, x) -> logits (n_vocab, T)
        w holds "output_norm.weight" and "output.weight" (token_embd's when tied).

Non-layer tensors a layer reads (llama's "rope_freqs.weight", phi3's "rope_factors_long.weight"
and "rope_factors_short.weight") are specs with layer=None and role "rope": the store keeps them
with the head's tensors, and the engine hands every layer `layer_weights(store.layers, il)`, its
own dict plus those, under their full GGUF names.

K/V caches are one tensor per layer, (n_embd_kv, n_cells), of any type ggml's set_rows writes
(F16, Q8_0, Q4_0): views take their strides from the tensor, never from an assumed element size.
A sliding-window layer's tensor holds only its rings (n_seq * W cells) and its graph reads
`for_layer(batch, cfg, il)`, whose cells, rows and mask are the rings' (Batch.swa); store_kv and
attention work on either unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import Ops, Tensor, ne, row_size, stride, type_of

ROLES = ("attn", "ffn", "norm", "embd", "output", "rope")
ROPE_ROLE = "rope"  # a non-layer tensor every layer reads (rope frequency factors)


@dataclass(frozen=True)
class TensorSpec:
    name: str  # GGUF name: "blk.3.ffn_up.weight"
    shape: tuple[int, ...]  # ggml order: (ne0, ne1)
    role: str  # one of ROLES: what the planner reasons about ("attn_qkv" is "attn", fused up "ffn")
    layer: int | None  # block index, None for token_embd / output_norm / output / rope factors
    quantizable: bool = True  # False: must be F32 (norms, biases, rope factors)


@dataclass(frozen=True)
class Group:
    """One sequence's tokens in a micro-batch and the cells its attention reads: tokens t0 ..
    t0 + n_tokens - 1 (contiguous in the batch), cache cells cell0 .. cell0 + n_kv - 1 of its own
    slot, n_kv padded as it would be alone (engine.py). Attention runs once per group, so a
    sequence's queries meet the same K/V shapes and the same ggml kernel (one thread's untiled
    loop, the 64-row tiles, or the split-KV decode path once n_kv >= 512) in a batch as alone."""

    t0: int
    n_tokens: int
    cell0: int
    n_kv: int
    mask: Tensor  # (n_kv, n_tokens padded to KQ_MASK_PAD) f16: 0 where visible, -inf elsewhere


@dataclass(frozen=True)
class Batch:
    """The per-batch inputs every layer graph shares; their data is rewritten for each batch.

    A sliding-window layer (window(cfg, il) > 0) holds its K/V in rings of W cells per sequence
    (kv_cache.py: position p of sequence s in cell s * W + p % W), so it reads `swa`: the same
    tokens and positions with the rings' own rows and groups (`for_layer` picks it)."""

    n_tokens: int  # T
    pos: Tensor  # (T,) i32 positions, for rope
    kv_rows: Tensor  # (T,) i64 the cache cells the new K/V go to
    groups: tuple[Group, ...]  # one per sequence, in token order: what attention reads
    # the sliding layers' Batch: each token's ring cell, and groups over the rings' cells whose
    # masks hide keys with pos_q - pos_k >= cfg.n_swa; None when no layer slides
    swa: Batch | None = None


def for_layer(batch: Batch, cfg: ModelConfig, il: int) -> Batch:
    """The Batch layer il reads: the rings' (batch.swa) on a sliding layer."""
    return batch.swa if window(cfg, il) and batch.swa is not None else batch


def window(cfg: ModelConfig, il: int) -> int:
    """Layer il's attention kind for the cache and the planner: its sliding window in positions
    (gemma3's sliding layers: cfg.n_swa; a query sees keys pos_q - n_swa < pos_k <= pos_q), or 0
    for full causal attention. Every layer's K/V rows are cfg.n_embd_kv wide; a sliding layer's
    cache holds n_seq * W cells, W = n_swa + n_ubatch (kv_cache.swa_cells), a full one
    n_seq * n_ctx."""
    return cfg.n_swa if cfg.is_swa(il) else 0


def layer_weights(layers: list[dict], il: int) -> dict:
    """Layer il's weights plus the non-layer tensors layers read (role "rope"), which the store
    keeps in the head's dict (layers[-1]) under their full names."""
    head = layers[-1]
    shared = {k: v for k, v in head.items() if k.startswith("rope_")}
    return {**shared, **layers[il]} if shared else layers[il]


# ---- tensor specs

def vec(name: str, n: int, layer: int | None, role: str = "norm") -> TensorSpec:
    """An F32 vector: a norm weight, a bias, rope factors."""
    return TensorSpec(name, (n,), role, layer, False)


def mat(name: str, ne0: int, ne1: int, role: str, layer: int | None) -> TensorSpec:
    return TensorSpec(name, (ne0, ne1), role, layer)


def embd_specs(cfg: ModelConfig) -> list[TensorSpec]:
    return [mat("token_embd.weight", cfg.n_embd, cfg.n_vocab, "embd", None)]


def head_specs(cfg: ModelConfig, tied: bool) -> list[TensorSpec]:
    """output_norm and, unless tied (the head multiplies by token_embd), output."""
    out = [vec("output_norm.weight", cfg.n_embd, None)]
    if not tied:
        out.append(mat("output.weight", cfg.n_embd, cfg.n_vocab, "output", None))
    return out


def qkv_specs(cfg: ModelConfig, i: int, bias: bool, fused: bool = False) -> list[TensorSpec]:
    """q, k, v (or one fused attn_qkv: rows q | k | v) and attn_output; biases when `bias`."""
    e, q, kv, b = cfg.n_embd, cfg.n_embd_q, cfg.n_embd_kv, f"blk.{i}."
    if fused:
        out = [mat(b + "attn_qkv.weight", e, q + 2 * kv, "attn", i)]
        if bias:
            out.append(vec(b + "attn_qkv.bias", q + 2 * kv, i, "attn"))
    else:
        out = [mat(b + "attn_q.weight", e, q, "attn", i), mat(b + "attn_k.weight", e, kv, "attn", i),
               mat(b + "attn_v.weight", e, kv, "attn", i)]
        if bias:
            out += [vec(b + "attn_q.bias", q, i, "attn"), vec(b + "attn_k.bias", kv, i, "attn"),
                    vec(b + "attn_v.bias", kv, i, "attn")]
    return out + [mat(b + "attn_output.weight", q, e, "attn", i)]


def ffn_specs(cfg: ModelConfig, i: int, fused: bool = False) -> list[TensorSpec]:
    """gate, up, down; or phi3's fused ffn_up (rows gate | up, 2 * n_ff) and down."""
    e, ff, b = cfg.n_embd, cfg.n_ff, f"blk.{i}."
    ups = ([mat(b + "ffn_up.weight", e, 2 * ff, "ffn", i)] if fused else
           [mat(b + "ffn_gate.weight", e, ff, "ffn", i), mat(b + "ffn_up.weight", e, ff, "ffn", i)])
    return ups + [mat(b + "ffn_down.weight", ff, e, "ffn", i)]


# ---- graph pieces

def rms_norm(ops: Ops, cfg: ModelConfig, x: Tensor, weight: Tensor) -> Tensor:
    """llama.cpp's build_norm(LLM_NORM_RMS): rms_norm over ne0, then times the weight
    (broadcast: a (head_dim,) weight normalizes each head of a (head_dim, n_head, T) tensor)."""
    return ops.mul(ops.rms_norm(x, cfg.norm_eps), weight)


def head_norm(ops: Ops, cfg: ModelConfig, t: Tensor, w: dict, name: str) -> Tensor:
    """qwen3/gemma3's RMS norm over each head of q or k (t is (hd, heads, T)), when w has it."""
    weight = w.get(name)
    return t if weight is None else rms_norm(ops, cfg, t, weight)


def proj(ops: Ops, w: dict, name: str, cur: Tensor) -> Tensor:
    """w[name.weight] @ cur, plus w[name.bias] when the file has one."""
    out = ops.mul_mat(w[name + ".weight"], cur)
    bias = w.get(name + ".bias")
    return ops.add(out, bias) if bias is not None else out


def qkv(ops: Ops, cfg: ModelConfig, w: dict, cur: Tensor, T: int):
    """Q (hd, n_head, T), K and V (hd, n_head_kv, T) as llama.cpp's build_qkv makes them: separate
    projections reshaped, or views into one fused attn_qkv product (rows q | k | v)."""
    hd = cfg.head_dim
    if "attn_qkv.weight" in w:
        fused = proj(ops, w, "attn_qkv", cur)  # (n_embd_q + 2 n_embd_kv, T) f32
        rs, nb1 = row_size(type_of(fused), hd), stride(fused, 1)
        q = ops.view_3d(fused, hd, cfg.n_head, T, rs, nb1, 0)
        k = ops.view_3d(fused, hd, cfg.n_head_kv, T, rs, nb1, row_size(type_of(fused), cfg.n_embd_q))
        v = ops.view_3d(fused, hd, cfg.n_head_kv, T, rs, nb1,
                        row_size(type_of(fused), cfg.n_embd_q + cfg.n_embd_kv))
        return q, k, v
    q = ops.reshape_3d(proj(ops, w, "attn_q", cur), hd, cfg.n_head, T)
    k = ops.reshape_3d(proj(ops, w, "attn_k", cur), hd, cfg.n_head_kv, T)
    v = ops.reshape_3d(proj(ops, w, "attn_v", cur), hd, cfg.n_head_kv, T)
    return q, k, v


def rope(ops: Ops, cfg: ModelConfig, t: Tensor, batch: Batch, mode: int, *, base: float | None = None,
         freq_scale: float | None = None, factors: Tensor | None = None) -> Tensor:
    """ggml_rope_ext with the file's scaling as llama.cpp applies it: freq_scale = 1 / factor,
    attn_factor (rope.scaling.attn_factor, and yarn's correction), yarn's ext_factor and betas
    (config._yarn; ext_factor 0 without yarn), per-pair frequency factors (rope_freqs / LongRoPE)
    when given. ggml computes yarn's correction dims from n_ctx_orig, base and the betas."""
    return ops.rope(t, batch.pos, cfg.n_rot, mode, cfg.n_ctx_orig or cfg.n_ctx_train,
                    cfg.rope_base if base is None else base,
                    cfg.rope_freq_scale if freq_scale is None else freq_scale,
                    factors, ext_factor=cfg.rope_ext_factor, attn_factor=cfg.rope_attn_factor,
                    beta_fast=cfg.rope_yarn_beta[0], beta_slow=cfg.rope_yarn_beta[1])


def store_kv(ops: Ops, cfg: ModelConfig, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
             batch: Batch) -> None:
    """Write K and V (hd, n_head_kv, T) to the cache cells batch.kv_rows, as (n_embd_kv, T) rows;
    heads and dim merge without a copy (ne0's rows are contiguous: nb1 = row size of hd), which
    holds for a view into a fused qkv too, as llama.cpp's cpy_v relies on."""
    for t, cache in ((k, k_cache), (v, v_cache)):
        rows = ops.view_2d(t, cfg.n_embd_kv, batch.n_tokens, stride(t, 2))
        ops.expand(ops.set_rows(cache, rows, batch.kv_rows))


def attention(ops: Ops, cfg: ModelConfig, q: Tensor, k_cache: Tensor, v_cache: Tensor,
              batch: Batch, scale: float, sinks: Tensor | None = None) -> Tensor:
    """Flash attention of q (hd, n_head, T), each sequence's tokens over its own slot's cells
    (batch.groups), the outputs concatenated in token order; GQA heads share K/V by broadcast.
    One flash_attn per group, not one over every slot: ggml picks its kernel and its split of the
    cells from the shapes (T = 1 and n_kv >= 512 splits the cells among the threads; T >= 64
    takes the tiled kernel), so a shared call would sum a sequence's keys in another order than
    its run alone. sinks: gpt-oss's (n_head,) sink logits. Returns (n_embd_q, T)."""
    outs = [_attend(ops, cfg, q, k_cache, v_cache, g, scale, sinks) for g in batch.groups]
    out = outs[0]
    for o in outs[1:]:
        out = ops.concat(out, o, 1)
    return out


def _attend(ops: Ops, cfg: ModelConfig, q: Tensor, k_cache: Tensor, v_cache: Tensor, g: Group,
            scale: float, sinks: Tensor | None = None) -> Tensor:
    """One group's attention: its queries over cells cell0 .. cell0 + n_kv - 1. Strides come from
    the cache tensors: nb1 per cell, the row size of hd per head. Returns (n_embd_q, n_tokens)."""
    hd = cfg.head_dim
    if g.t0 or g.n_tokens != ne(q, 2):  # the group's tokens of q
        q = ops.view_3d(q, hd, cfg.n_head, g.n_tokens, stride(q, 1), stride(q, 2),
                        g.t0 * stride(q, 2))
    q = ops.permute(q, 0, 2, 1, 3)  # (hd, T, n_head)
    k = ops.view_3d(k_cache, hd, g.n_kv, cfg.n_head_kv, stride(k_cache, 1),
                    row_size(type_of(k_cache), hd), g.cell0 * stride(k_cache, 1))
    v = ops.view_3d(v_cache, hd, g.n_kv, cfg.n_head_kv, stride(v_cache, 1),
                    row_size(type_of(v_cache), hd), g.cell0 * stride(v_cache, 1))
    out = ops.flash_attn(q, k, v, g.mask, scale, sinks)  # (hd, n_head, T)
    return ops.reshape_2d(out, cfg.n_embd_q, g.n_tokens)


def swiglu_ffn(ops: Ops, w: dict, cur: Tensor) -> Tensor:
    """down(silu(gate x) * up x); phi3's fused ffn_up (rows gate | up) through ggml_swiglu.
    Each projection adds its bias where w has one (llama's optional ffn_*.bias, as llama.cpp's
    build_ffn: up + b, gate + b, swiglu, down + b)."""
    if "ffn_gate.weight" not in w:
        return ops.mul_mat(w["ffn_down.weight"], ops.swiglu_fused(ops.mul_mat(w["ffn_up.weight"], cur)))
    gate = proj(ops, w, "ffn_gate", cur)  # (n_ff, T)
    up = proj(ops, w, "ffn_up", cur)
    return proj(ops, w, "ffn_down", ops.swiglu(gate, up))


def geglu_ffn(ops: Ops, w: dict, cur: Tensor) -> Tensor:
    """down(gelu(gate x) * up x): gemma's FFN (ggml_geglu_split, tanh-approximated gelu)."""
    gate = ops.mul_mat(w["ffn_gate.weight"], cur)
    up = ops.mul_mat(w["ffn_up.weight"], cur)
    return ops.mul_mat(w["ffn_down.weight"], ops.geglu(gate, up))


def output_head(ops: Ops, cfg: ModelConfig, w: dict, x: Tensor) -> Tensor:
    """Final RMS norm and the output projection: (n_embd, T) -> logits (n_vocab, T)."""
    return ops.mul_mat(w["output.weight"], rms_norm(ops, cfg, x, w["output_norm.weight"]))
