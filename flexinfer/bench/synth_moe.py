"""Synthetic mixture-of-experts models: the tensors and metadata of qwen3moe, qwen2moe, olmoe and
mixtral (llama.cpp's arch "llama" with llama.expert_count) conversions, for synth.py.

Expert tensors are 3-D, ggml order (ne0, rows, n_expert): expert e is the contiguous slab
[e * rows * row_bytes, (e + 1) * rows * row_bytes) of the tensor's data, as in real files.

The router (ffn_gate_inp.weight, F32 as llama.cpp's quantizer leaves it) decides which experts a
token uses, by the largest of n_expert logits w_e . x. Its rows are Gaussian; `router` shapes them:
  uniform   every row the same rms: every expert wins as often as any other (the worst case for an
            expert cache);
  zipf:S    row e (in a per-layer random order of the experts) scaled by (rank + 1)^-S and the
            whole rescaled to the same total rms: a larger row gives logits of larger spread, so
            it is in the top K far more often. 128 experts, 8 used, random inputs: the 16 most
            picked experts take 68% of the picks at S = 1 and 80% at S = 2, against 16% with the
            uniform router (12.5% if perfectly even). A row's logits are as often very
            negative as very positive (a linear router over inputs with no mean direction), so an
            expert is picked for at most about half the tokens, however large S.
ROUTER_GAIN makes the logits spread about 2 (their std over experts for a unit-rms input), so the
softmax weights differ clearly and a wrong choice or a missed normalization moves the output.
"""

from __future__ import annotations

import math
import re

import numpy as np

from flexinfer.bench import synth_blocks as blocks
from flexinfer.errors import FlexInferError

MOE_ARCHS = ("qwen3moe", "qwen2moe", "mixtral", "olmoe")
N_FF_EXPERTS = ("mixtral", "olmoe")  # experts --ff wide; llama.cpp reads no expert width for them
GGUF_ARCH = {"mixtral": "llama"}  # general.architecture written to the file
VOCAB_FILES = {"qwen3moe": "ggml-vocab-qwen2.gguf", "qwen2moe": "ggml-vocab-qwen2.gguf",
               "mixtral": "ggml-vocab-llama-spm.gguf",
               "olmoe": "ggml-vocab-gpt-2.gguf"}  # OLMoE's GPT-NeoX BPE: gpt-2's regex, 50k tokens
RMS_EPS = {"qwen3moe": 1e-6, "qwen2moe": 1e-6, "mixtral": 1e-5, "olmoe": 1e-5}
EXPERT_ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp",
                "ffn_up_shexp", "ffn_down_shexp")
ROUTER_GAIN = 2.0
# gpt-oss: experts too; synth_gptoss.py writes its layers, these its metadata and checks
MOE_ARCHS += ("gpt-oss",)
VOCAB_FILES["gpt-oss"] = "ggml-vocab-llama-spm.gguf"
RMS_EPS["gpt-oss"] = 1e-5


def gguf_arch(arch: str) -> str:
    return GGUF_ARCH.get(arch, arch)


def parse_router(text: str) -> float:
    """'uniform' -> 0.0, 'zipf:S' -> S (0 < S <= 8); anything else is refused in one line."""
    if text == "uniform":
        return 0.0
    m = re.fullmatch(r"zipf:([0-9.]+)", text)
    s = float(m[1]) if m and re.fullmatch(r"\d+(\.\d*)?|\.\d+", m[1]) else -1.0
    if not 0 < s <= 8:
        raise FlexInferError(f"router {text!r}: expected 'uniform' or 'zipf:S' with 0 < S <= 8")
    return s


def check(spec) -> None:
    """Refuses a MoE spec llama.cpp could not load, naming the field at fault."""
    if spec.arch == "mixtral" and spec.head_dim:  # arch_metadata would write mixtral.* keys
        raise FlexInferError(f"head-dim {spec.head_dim}: mixtral's heads are n_embd / n_head")
    if spec.arch not in MOE_ARCHS:
        if spec.n_expert:
            raise FlexInferError(f"experts {spec.n_expert}: arch {spec.arch!r} has none (MoE "
                                 f"archs: {', '.join(MOE_ARCHS)})")
        return
    if not 1 <= spec.n_expert <= 1024:
        raise FlexInferError(f"experts {spec.n_expert}: must be in [1, 1024] for {spec.arch}")
    if not 1 <= spec.n_expert_used <= spec.n_expert:
        raise FlexInferError(f"experts-used {spec.n_expert_used}: must be in [1, experts "
                             f"{spec.n_expert}]")
    if spec.n_ff_exp < 0 or spec.n_ff_shexp < 0:
        raise FlexInferError("expert-ff: must be > 0")
    if spec.arch in N_FF_EXPERTS and spec.n_ff_exp not in (0, spec.n_ff):
        raise FlexInferError(f"expert-ff {spec.n_ff_exp}: {spec.arch}'s experts are --ff wide "
                             f"({spec.n_ff})")
    if spec.arch == "olmoe":
        _check_olmoe(spec)
    parse_router(spec.router)


def _check_olmoe(spec) -> None:
    """llama.cpp's olmoe loader: attn_k_norm is (n_embd,) and attn_q / attn_output are
    (n_embd, n_embd), so no grouped-query attention and heads that tile n_embd."""
    if spec.n_head_kv != spec.n_head:
        raise FlexInferError(f"kv-heads {spec.n_head_kv}: olmoe has no grouped-query attention "
                             f"(llama.cpp needs kv-heads = heads = {spec.n_head})")
    if spec.head_dim and spec.head_dim * spec.n_head != spec.n_embd:
        raise FlexInferError(f"head-dim {spec.head_dim}: olmoe's heads must tile n_embd "
                             f"{spec.n_embd}")


def n_ff_exp(spec) -> int:
    """Expert width: mixtral's and olmoe's are n_ff; qwen's expert_feed_forward_length
    (spec.n_ff_exp, or n_ff / experts used when 0, as llama.cpp derives it)."""
    if spec.arch in N_FF_EXPERTS:
        return spec.n_ff
    return spec.n_ff_exp or max(1, spec.n_ff // spec.n_expert_used)


def metadata(spec) -> dict[str, tuple[str, object]]:
    if spec.arch not in MOE_ARCHS:
        return {}
    a = gguf_arch(spec.arch)
    out = {f"{a}.expert_count": ("uint32", spec.n_expert),
           f"{a}.expert_used_count": ("uint32", spec.n_expert_used)}
    if spec.arch not in N_FF_EXPERTS:
        out[f"{a}.expert_feed_forward_length"] = ("uint32", n_ff_exp(spec))
    if spec.arch == "qwen2moe":
        out[f"{a}.expert_shared_feed_forward_length"] = ("uint32", spec.n_ff_shexp or spec.n_ff)
    return out


def layer_tensors(spec, i: int, matrix, vector, tensor) -> list:
    """One block's tensors. matrix/vector are synth.py's makers; tensor is SynthTensor."""
    p, e, kv, hd = f"blk.{i}", spec.n_embd, spec.n_embd_kv, (spec.head_dim or spec.n_embd // spec.n_head)
    q = hd * spec.n_head  # n_embd unless head_dim says otherwise (Qwen3-30B-A3B: 4096)
    out = [vector(f"{p}.attn_norm.weight", e, spec),
           matrix(spec, f"{p}.attn_q", e, q), matrix(spec, f"{p}.attn_k", e, kv),
           matrix(spec, f"{p}.attn_v", e, kv)]
    if spec.arch == "qwen2moe":
        out += [vector(f"{p}.attn_q.bias", q, spec, True),
                vector(f"{p}.attn_k.bias", kv, spec, True),
                vector(f"{p}.attn_v.bias", kv, spec, True)]
    out.append(matrix(spec, f"{p}.attn_output", q, e))
    if spec.arch == "qwen3moe":  # one weight per head
        out += [vector(f"{p}.attn_q_norm.weight", hd, spec),
                vector(f"{p}.attn_k_norm.weight", hd, spec)]
    if spec.arch == "olmoe":  # one weight over the whole q / k vector
        out += [vector(f"{p}.attn_q_norm.weight", q, spec),
                vector(f"{p}.attn_k_norm.weight", kv, spec)]
    out.append(vector(f"{p}.ffn_norm.weight", e, spec))
    ff, n = n_ff_exp(spec), spec.n_expert
    out.append(tensor(f"{p}.ffn_gate_inp.weight", (e, n), "F32", ROUTER_GAIN / math.sqrt(e),
                      "router"))
    for role, ne0, ne1 in (("ffn_gate_exps", e, ff), ("ffn_up_exps", e, ff),
                           ("ffn_down_exps", ff, e)):
        m = matrix(spec, f"{p}.{role}", ne0, ne1)
        out.append(tensor(m.name, (ne0, ne1, n), m.type, m.rms))
    if spec.arch == "qwen2moe":
        sh = spec.n_ff_shexp or spec.n_ff
        out += [tensor(f"{p}.ffn_gate_inp_shexp.weight", (e,), "F32", 1.0 / math.sqrt(e)),
                matrix(spec, f"{p}.ffn_gate_shexp", e, sh), matrix(spec, f"{p}.ffn_up_shexp", e, sh),
                matrix(spec, f"{p}.ffn_down_shexp", sh, e)]
    return out


def router_values(spec, t, rng: np.random.Generator) -> np.ndarray:
    """The router's F32 values, (n_expert rows of n_embd): Gaussian rows of rms t.rms, each scaled
    by its expert's zipf factor (1 for uniform), in a random order of the experts per layer."""
    ne0, n = t.shape
    w = rng.standard_normal((n, ne0), dtype=np.float32) * np.float32(t.rms)
    s = parse_router(spec.router)
    if s:
        f = (np.arange(n, dtype=np.float64) + 1.0) ** -s
        f /= math.sqrt(np.mean(f * f))  # the same total rms as uniform
        w *= f[rng.permutation(n)].astype(np.float32)[:, None]
    return w.reshape(-1)


def expert_bytes(t) -> int:
    """Bytes of one expert's slab of a 3-D tensor."""
    return blocks.tensor_nbytes(t.type, t.shape[0] * t.shape[1])
