"""Synthetic gpt-oss models (GGUF arch "gpt-oss"): the tensors llama.cpp's loader requires for
LLM_ARCH_OPENAI_MOE, with llama.cpp's names and shapes, for synth.py (models/gptoss.py computes
them).

Per layer, in file order: attn_norm; attn_q/k/v/output with their biases; attn_sinks (n_head,);
post_attention_norm; the router ffn_gate_inp (F32, shaped by --router as synth_moe.py's) and its
bias (E,); the three 3-D expert tensors ffn_{gate,up,down}_exps, MXFP4 unless overridden (as in
the released files), each followed by its F32 bias (rows, E).

Values are strong enough that every gpt-oss feature moves the logits (tests/test_gptoss.py breaks
each): sinks N(0, SINK_RMS) against attention logits of rms ~1; gate/up outputs of rms EXPERT_GAIN
(about 3), so |gate| or |up| passes swiglu_oai's limit 7 on a few percent of the values; biases
of rms 0.5-1 against activations of rms ~1-3; the down projection scaled by DOWN_GAIN so the
residual stays moderate. The sliding window (--swa, required: llama.cpp reads it) covers the even
layers.
"""

from __future__ import annotations

import math

from flexinfer.bench import synth_blocks as blocks
from flexinfer.bench import synth_moe as moe
from flexinfer.errors import FlexInferError

ARCH = "gpt-oss"
SINK_RMS = 2.0  # attention sink logits
EXPERT_GAIN = 3.0  # gate/up weights' rms times 1/sqrt(n_embd): outputs of rms ~3
DOWN_GAIN = 0.3  # down weights' rms times 1/sqrt(n_ff_exp)
BIASES = {"attn": 0.5, "router": 1.0, "ffn_gate_exps": 1.0, "ffn_up_exps": 1.0,
          "ffn_down_exps": 0.5}
EXPERT_TYPE = "MXFP4"


def check(spec) -> None:
    """What llama.cpp needs of a gpt-oss file beyond the MoE checks (synth_moe.check)."""
    if spec.arch != ARCH:
        return
    if spec.n_swa <= 0:
        raise FlexInferError("swa: gpt-oss needs a sliding window (llama.cpp requires "
                             "attention.sliding_window; the real models use 128)")
    if spec.tied:
        raise FlexInferError("tied: gpt-oss has an output.weight (llama.cpp requires it)")


def expert_type(spec, base: str, role: str) -> str:
    """MXFP4 unless the spec overrides the layer's tensor or the role."""
    overrides = dict(spec.overrides)
    name = overrides.get(base, overrides.get(role, EXPERT_TYPE)).upper()
    if name not in blocks.supported_types():
        raise FlexInferError(f"type {name.lower()!r} for {base}: must be one of "
                             f"{', '.join(t.lower() for t in blocks.supported_types())}")
    return name


def layer_tensors(spec, i: int, matrix, vector, tensor) -> list:
    """Block i's tensors. matrix/vector are synth.py's makers; tensor is SynthTensor."""
    p, e, kv = f"blk.{i}", spec.n_embd, spec.n_embd_kv
    q = (spec.head_dim or e // spec.n_head) * spec.n_head
    b = BIASES["attn"]
    out = [vector(f"{p}.attn_norm.weight", e, spec),
           matrix(spec, f"{p}.attn_q", e, q), vector(f"{p}.attn_q.bias", q, spec, b),
           matrix(spec, f"{p}.attn_k", e, kv), vector(f"{p}.attn_k.bias", kv, spec, b),
           matrix(spec, f"{p}.attn_v", e, kv), vector(f"{p}.attn_v.bias", kv, spec, b),
           matrix(spec, f"{p}.attn_output", q, e), vector(f"{p}.attn_output.bias", e, spec, b),
           vector(f"{p}.attn_sinks.weight", spec.n_head, spec, SINK_RMS),
           vector(f"{p}.post_attention_norm.weight", e, spec)]
    ff, n = moe.n_ff_exp(spec), spec.n_expert
    out += [tensor(f"{p}.ffn_gate_inp.weight", (e, n), "F32", moe.ROUTER_GAIN / math.sqrt(e),
                   "router"),
            vector(f"{p}.ffn_gate_inp.bias", n, spec, BIASES["router"])]
    for role, ne0, ne1, gain in (("ffn_gate_exps", e, ff, EXPERT_GAIN),
                                 ("ffn_up_exps", e, ff, EXPERT_GAIN),
                                 ("ffn_down_exps", ff, e, DOWN_GAIN)):
        ttype = expert_type(spec, f"{p}.{role}", role)
        if ne0 % blocks.block_elems(ttype):
            raise FlexInferError(f"{p}.{role}: row length {ne0} is not a multiple of the "
                                 f"{ttype} block size {blocks.block_elems(ttype)}")
        out += [tensor(f"{p}.{role}.weight", (ne0, ne1, n), ttype, gain / math.sqrt(ne0)),
                tensor(f"{p}.{role}.bias", (ne1, n), "F32", BIASES[role])]
    return out
