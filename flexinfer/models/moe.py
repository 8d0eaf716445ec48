"""The mixture-of-experts feed-forward block, computed as llama.cpp's build_moe_ffn computes it
(src/llama-graph.cpp), for qwen3moe, qwen2moe, olmoe and mixtral (llama with experts).

Shapes, ggml order (innermost first), for T tokens, E experts of which K are used, ff = n_ff_exp:
  router   ffn_gate_inp.weight   (n_embd, E)          logits = router @ x       -> (E, T)
  experts  ffn_gate_exps.weight  (n_embd, ff, E)      each expert a contiguous slab of
           ffn_up_exps.weight    (n_embd, ff, E)      ff rows (gate/up) or n_embd rows (down):
           ffn_down_exps.weight  (ff, n_embd, E)      expert e starts at byte e * nb[2]

  probs    = softmax(logits)                                        (E, T)
  selected = top-K of probs per token (descending argsort, a view)  (K, T) i32
  weights  = probs[selected]                                        (1, K, T)
             / sum over the K (clamped below at 2^-14)  when normalized (qwen3moe, mixtral;
                                                        not qwen2moe, olmoe)
  out_k    = down_k(swiglu(gate_k x, up_k x)) * weights_k           (n_embd, K, T) by mul_mat_id
  moe_out  = out_0 + out_1 + ... + out_{K-1}                        (n_embd, T), in that order

The sum runs over the K chosen experts in the order top-K returned them, exactly as llama.cpp adds
its views, so the float rounding is the same. qwen2moe adds a shared expert, a dense SwiGLU FFN
gated per token by sigmoid(ffn_gate_inp_shexp . x), the sigmoid computed as silu(g) / g as in
llama.cpp's qwen2moe graph.

The router and the shared expert are matrices like any other (split in row blocks when streamed).
The *_exps tensors are either planned whole with the rest (mmap, or --experts whole) or owned by
an ExpertStore (experts.py), which reads only the slabs of the chosen experts: then the engine
computes a layer in two graphs, attn_graph and ffn_graph, split after the router, and a step whose
picks are not all cached runs ffn_graph as three parts (up_part, gate_part, down_part), each once
its tensor's missing slabs are read.
"""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer import ggml_ops
from flexinfer.ggml_ops import Ops, Tensor
from flexinfer.models import base
from flexinfer.models.base import TensorSpec

# the K weights divided by their sum, per arch, as llama.cpp's graphs pass norm_w (not the file's
# expert_weights_norm, which they do not read); expert_weights_scale is not applied by any of them
NORMALIZED = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}
SHARED_EXPERT = ("qwen2moe",)
F16_TINY = 6.103515625e-5  # 2^-14, the smallest normal f16: llama.cpp's floor for the weight sum
# graph nodes a MoE FFN adds beyond a dense one (router, softmax, top-k, weights and their norm,
# three mul_mat_id, the weighting), plus a view and an add per used expert
MOE_NODES = 32


def graph_nodes(cfg: ModelConfig) -> int:
    """Extra graph nodes (and tensor headers) one layer's MoE FFN takes: 32 + 2 per used expert
    (Qwen3-30B-A3B, 8 used: 48)."""
    return MOE_NODES + 2 * cfg.n_expert_used if cfg.n_expert else 0


def ffn_specs(cfg: ModelConfig, i: int) -> list[TensorSpec]:
    """Layer i's FFN tensors when cfg.n_expert > 0 (llama.block_specs calls this): the router,
    the three expert tensors (3-D: (ne0, rows, n_expert)) and qwen2moe's shared expert."""
    e, n, ff, b = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp, f"blk.{i}."
    specs = [base.mat(b + "ffn_gate_inp.weight", e, n, "ffn", i),
             TensorSpec(b + "ffn_gate_exps.weight", (e, ff, n), "ffn", i),
             TensorSpec(b + "ffn_up_exps.weight", (e, ff, n), "ffn", i),
             TensorSpec(b + "ffn_down_exps.weight", (ff, e, n), "ffn", i)]
    if cfg.arch in SHARED_EXPERT:  # its gate vector (n_embd,) and a dense FFN of n_ff_shexp
        sh = cfg.n_ff_shexp
        specs += [base.vec(b + "ffn_gate_inp_shexp.weight", e, i),
                  base.mat(b + "ffn_gate_shexp.weight", e, sh, "ffn", i),
                  base.mat(b + "ffn_up_shexp.weight", e, sh, "ffn", i),
                  base.mat(b + "ffn_down_shexp.weight", sh, e, "ffn", i)]
    return specs


def ffn(ops: Ops, cfg: ModelConfig, w: dict[str, Tensor], cur: Tensor) -> Tensor:
    """The whole MoE FFN over cur (n_embd, T), the normed FFN input (llama.block calls this):
    routed experts, plus the gated shared expert where the arch has one."""
    out = ffn_moe(ops, cfg, w, cur, NORMALIZED[cfg.arch])
    if cfg.arch in SHARED_EXPERT:
        out = ops.add(out, shared_expert(ops, w, cur))
    return out


def ffn_moe(ops: Ops, cfg: ModelConfig, w: dict[str, Tensor], cur: Tensor,
            norm_weights: bool) -> Tensor:
    """The routed experts over cur (n_embd, T), the normed FFN input; returns (n_embd, T)."""
    e, n, k = cfg.n_embd, cfg.n_expert, cfg.n_expert_used
    T = ggml_ops.ne(cur, 1)
    probs, selected = route(ops, cfg, w, cur)
    weights = ops.get_rows(ops.reshape_3d(probs, 1, n, T), selected)  # (1, K, T)
    if norm_weights:
        weights = ops.reshape_2d(weights, k, T)
        total = ops.clamp(ops.sum_rows(weights), F16_TINY, float("inf"))  # (1, T)
        weights = ops.reshape_3d(ops.div(weights, total), 1, k, T)
    x = ops.reshape_3d(cur, e, 1, T)
    up = ops.mul_mat_id(w["ffn_up_exps.weight"], x, selected)  # (ff, K, T)
    gate = ops.mul_mat_id(w["ffn_gate_exps.weight"], x, selected)
    experts = ops.mul_mat_id(w["ffn_down_exps.weight"], ops.swiglu(gate, up), selected)
    return sum_experts(ops, cfg, ops.mul(experts, weights), T)


def sum_experts(ops: Ops, cfg: ModelConfig, experts: Tensor, T: int) -> Tensor:
    """The weighted expert outputs (n_embd, K, T), f32 and contiguous, added in top-K order."""
    e, k = cfg.n_embd, cfg.n_expert_used
    row, tok = 4 * e, 4 * e * k  # its strides: nb[1], nb[2]
    out = ops.view_2d(experts, e, T, tok, 0)
    for i in range(1, k):
        out = ops.add(out, ops.view_2d(experts, e, T, tok, i * row))
    return ops.cont(out) if k == 1 else out


def route(ops: Ops, cfg: ModelConfig, w: dict[str, Tensor], cur: Tensor) -> tuple[Tensor, Tensor]:
    """The router over cur (n_embd, T): (probs (E, T), the top-K expert ids (K, T) i32)."""
    probs = ops.soft_max(ops.mul_mat(w["ffn_gate_inp.weight"], cur))  # (E, T)
    return probs, ops.argsort_top_k(probs, cfg.n_expert_used)


# ---- expert streaming: a layer in two graphs, split after the router (engine.py, experts.py)

# archs with their own split graphs (gptoss.py registers itself): name -> module with
# attn_graph(ops, cfg, il, w, x, batch, k_cache, v_cache, xa, ids) and ffn_graph(ops, cfg, w, xa, x)
SPLIT: dict = {}


def attn_graph(ops: Ops, arch, cfg: ModelConfig, w: dict, x: Tensor, batch, k_cache: Tensor,
               v_cache: Tensor, xa: Tensor, ids: Tensor, il: int = 0) -> None:
    """Graph A of a layer: attention, the residual written to xa (n_embd, T) and the router's
    top-K ids to ids (K, T) i32, both engine memory: the host reads ids, the expert store reads
    the experts they name, then graph B runs. The attention is arch.attention_block where the
    arch has its own (olmoe: q/k norms over the whole vectors), else llama's with arch.ROPE_MODE
    (qwen3moe, qwen2moe, mixtral); gpt-oss its own split graphs (SPLIT)."""
    if cfg.arch in SPLIT:
        return SPLIT[cfg.arch].attn_graph(ops, cfg, il, w, x, batch, k_cache, v_cache, xa, ids)

    from flexinfer.models import llama
    attend = getattr(arch, "attention_block", llama.attention_block)
    h = attend(ops, cfg, w, x, batch, k_cache, v_cache, arch.ROPE_MODE)
    _, selected = route(ops, cfg, w, base.rms_norm(ops, cfg, h, w["ffn_norm.weight"]))
    ops.output(ops.cpy(h, xa))
    ops.output(ops.cpy(selected, ids))


def ffn_graph(ops: Ops, cfg: ModelConfig, w: dict, xa: Tensor, x: Tensor) -> None:
    """Graph B: the MoE FFN over the saved residual xa, written to x. It routes again from the
    same bytes with the same ops, so it picks what graph A picked and computes exactly what the
    unsplit block computes (llama.block, olmoe.build_layer)."""
    if cfg.arch in SPLIT:
        return SPLIT[cfg.arch].ffn_graph(ops, cfg, w, xa, x)
    ops.output(ops.cpy(residual_ffn(ops, cfg, w, xa), x))


# ---- graph B in three parts, for a step whose missing experts are being read (experts.begin):
# each part multiplies by one *_exps tensor once its slabs are in, while the next is read. The
# parts pass what they share through engine memory (f32, so nothing rounds differently): the
# normed input, the K weights, the up and gate products; the picks are graph A's ids.

PART_TENSORS = ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps")  # each part's, in order


def up_part(ops: Ops, cfg: ModelConfig, w: dict, xa: Tensor, ids: Tensor, cur_o: Tensor,
            wts_o: Tensor, up_o: Tensor) -> None:
    """Part 1: the normed input, the picks' weights and the up product, as ffn_moe makes them."""
    e, n, k = cfg.n_embd, cfg.n_expert, cfg.n_expert_used
    T = ggml_ops.ne(xa, 1)
    cur = base.rms_norm(ops, cfg, xa, w["ffn_norm.weight"])
    probs, _ = route(ops, cfg, w, cur)
    weights = ops.get_rows(ops.reshape_3d(probs, 1, n, T), ids)  # (1, K, T)
    if NORMALIZED[cfg.arch]:
        weights = ops.reshape_2d(weights, k, T)
        total = ops.clamp(ops.sum_rows(weights), F16_TINY, float("inf"))  # (1, T)
        weights = ops.reshape_3d(ops.div(weights, total), 1, k, T)
    ops.output(ops.cpy(cur, cur_o))
    ops.output(ops.cpy(weights, wts_o))
    ops.output(ops.cpy(ops.mul_mat_id(w["ffn_up_exps.weight"], ops.reshape_3d(cur, e, 1, T), ids),
                       up_o))


def gate_part(ops: Ops, cfg: ModelConfig, w: dict, cur: Tensor, ids: Tensor,
              gate_o: Tensor) -> None:
    """Part 2: the gate product."""
    T = ggml_ops.ne(cur, 1)
    x = ops.reshape_3d(cur, cfg.n_embd, 1, T)
    ops.output(ops.cpy(ops.mul_mat_id(w["ffn_gate_exps.weight"], x, ids), gate_o))


def down_part(ops: Ops, cfg: ModelConfig, w: dict, xa: Tensor, cur: Tensor, ids: Tensor,
              wts: Tensor, up: Tensor, gate: Tensor, x_o: Tensor) -> None:
    """Part 3: the down product, weighted and summed in top-K order, the shared expert where the
    arch has one, and the residual: written to x, as ffn_graph writes it."""
    T = ggml_ops.ne(cur, 1)
    experts = ops.mul_mat_id(w["ffn_down_exps.weight"], ops.swiglu(gate, up), ids)
    out = sum_experts(ops, cfg, ops.mul(experts, wts), T)
    if cfg.arch in SHARED_EXPERT:
        out = ops.add(out, shared_expert(ops, w, cur))
    ops.output(ops.cpy(ops.add(out, xa), x_o))


def residual_ffn(ops: Ops, cfg: ModelConfig, w: dict, h: Tensor) -> Tensor:
    """The FFN half of a MoE block: h + ffn(rms_norm(h) * ffn_norm), (n_embd, T)."""
    cur = base.rms_norm(ops, cfg, h, w["ffn_norm.weight"])
    return ops.add(ffn(ops, cfg, w, cur), h)


def shared_expert(ops: Ops, w: dict[str, Tensor], cur: Tensor) -> Tensor:
    """qwen2moe's shared expert over cur (n_embd, T): down(swiglu(gate x, up x)) * sigmoid(g . x),
    the sigmoid as silu(g.x) / (g.x), llama.cpp's way; returns (n_embd, T)."""
    g = ops.mul_mat(w["ffn_gate_inp_shexp.weight"], cur)  # (1, T)
    gate = ops.div(ops.silu(g), g)
    h = ops.swiglu(ops.mul_mat(w["ffn_gate_shexp.weight"], cur),
                   ops.mul_mat(w["ffn_up_shexp.weight"], cur))
    return ops.mul(ops.mul_mat(w["ffn_down_shexp.weight"], h), gate)
