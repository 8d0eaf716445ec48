"""Synthetic GGUF models: real shapes, names, metadata and tokenizer; random weights.

The benchmark needs 7B, 13B and 34B llama models without downloading them: a synthetic file has the
exact tensor names, shapes and quant types of a llama.cpp conversion, a real tokenizer copied from a
vocab-only GGUF, and random weights scaled so activations stay finite, so flexinfer and llama.cpp
read and run it like the real thing at the real speed. The file is streamed to disk in 16 MiB chunks
(flexinfer.bench.synth_blocks): a 3.8 GB model never sits in memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from flexinfer.bench import synth_archs as archs
from flexinfer.bench import synth_blocks as blocks
from flexinfer.bench import synth_gptoss as gptoss
from flexinfer.bench import synth_moe as moe
from flexinfer.errors import FlexInferError
from flexinfer.gguf_file import read_gguf

ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3")
MATRIX_ROLES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output",
                "ffn_gate", "ffn_up", "ffn_down")
VOCAB_FILES, RMS_EPS = archs.VOCAB_FILES, archs.RMS_EPS
ARCHS += moe.MOE_ARCHS  # mixture of experts: synth_moe.py
MATRIX_ROLES += moe.EXPERT_ROLES
VOCAB_FILES.update(moe.VOCAB_FILES)
RMS_EPS.update(moe.RMS_EPS)
# general.file_type (llama.cpp's LLAMA_FTYPE_MOSTLY_*) of a file whose matrices are mostly this type
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
              "Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "BF16": 32}
FILE_TYPES["MXFP4"] = 38  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE
Progress = Callable[[int, int], None]  # (bytes written, total bytes)


@dataclass(frozen=True)
class SynthSpec:
    """What to write. Shapes follow llama.cpp: n_embd_kv = head_dim * n_head_kv."""

    arch: str = "llama"  # one of ARCHS (qwen2: q, k, v biases; qwen3/gemma3: q/k norms; ...)
    n_layer: int = 2  # transformer blocks
    n_embd: int = 64  # hidden size
    n_ff: int = 128  # feed-forward size
    n_head: int = 4  # query heads
    n_head_kv: int = 2  # key/value heads (GQA when < n_head)
    n_vocab: int | None = None  # None: the vocab file's size; any other value must equal it
    type: str = "q4_0"  # every matrix's type unless overridden: q4_0, q8_0, q4_k, f16, ...
    # (name, type) pairs, or a dict: name is a role ("ffn_down", "token_embd") or one layer's
    # tensor ("blk.1.attn_q"); the layer's entry wins over the role's. Norms and biases stay F32.
    overrides: tuple[tuple[str, str], ...] | Mapping[str, str] = ()
    tied: bool = False  # True: no output.weight, the output reuses token_embd
    ctx_len: int = 4096  # {arch}.context_length
    rope_base: float = 10000.0  # {arch}.rope.freq_base
    seed: int = 0  # same seed and spec: the same bytes
    vocab_file: str | None = None  # None: shared/vocab/ggml-vocab-llama-spm.gguf or -qwen2.gguf
    norm_noise: float = 0.0  # norm weights are 1 + N(0, norm_noise); 0 writes exactly 1.0
    head_dim: int | None = None  # attention.key_length/value_length; None: n_embd / n_head, unwritten
    rope_factors: bool = False  # llama: rope_freqs.weight; phi3: rope_factors_long/short.weight
    n_swa: int = 0  # gemma3: attention.sliding_window (0: unwritten, no window)
    attn_factor: float | None = None  # rope.scaling.attn_factor (phi3's LongRoPE writes one)
    orig_ctx: int | None = None  # rope.scaling.original_context_length (phi3: long factors above)
    biases: bool = False  # llama: attn_output and ffn_gate/up/down biases (optional in llama.cpp)
    rope_scaling: str | None = None  # rope.scaling.type ("yarn", "linear"); None: unwritten
    rope_factor: float | None = None  # rope.scaling.factor; None: unwritten
    # mixture of experts (qwen3moe, qwen2moe, mixtral, olmoe; synth_moe.py)
    n_expert: int = 0  # experts per layer
    n_expert_used: int = 0  # experts each token uses (top K)
    n_ff_exp: int = 0  # expert width (qwen); 0: n_ff / n_expert_used. Mixtral's, OLMoE's are n_ff
    n_ff_shexp: int = 0  # qwen2moe's shared expert width; 0: n_ff
    router: str = "uniform"  # "uniform" or "zipf:S": how unevenly the router picks experts

    def __post_init__(self):
        if isinstance(self.overrides, Mapping):
            object.__setattr__(self, "overrides", tuple(sorted(self.overrides.items())))

    @property
    def n_embd_kv(self) -> int:
        return archs.head_dim(self) * self.n_head_kv


PRESETS: dict[str, SynthSpec] = {
    # the paper's models (Llama2-7B is 3.8 GB in Q4_0); vocab 32000 is llama-spm's size
    "llama2-7b": SynthSpec("llama", 32, 4096, 11008, 32, 32, 32000),
    "llama2-13b": SynthSpec("llama", 40, 5120, 13824, 40, 40, 32000),
    "codellama-34b": SynthSpec("llama", 48, 8192, 22016, 64, 8, 32000),
    "tiny": SynthSpec("llama", 2, 64, 128, 4, 2, None),
    # Qwen3-30B-A3B (17 GB in Q4_0): 128 experts of 768, 8 used; heads of 128 (q is 4096 wide)
    "qwen3-30b-a3b": SynthSpec("qwen3moe", 48, 2048, 6144, 32, 4, None, ctx_len=40960,
                               rope_base=1e6, n_expert=128, n_expert_used=8, n_ff_exp=768,
                               head_dim=128),
    # Mixtral-8x7B-v0.1 (26 GB in Q4_0): 8 experts of 14336, 2 used; rope base 1e6
    "mixtral-8x7b": SynthSpec("mixtral", 32, 4096, 14336, 32, 8, 32000, ctx_len=32768,
                              rope_base=1e6, n_expert=8, n_expert_used=2),
    # OLMoE-1B-7B-0924 (3.9 GB in Q4_0): 64 experts of 1024, 8 used; 16 heads of 128, no GQA;
    # the gpt-2 vocab (50257 tokens; the real model's GPT-NeoX BPE pads it to 50304)
    "olmoe-1b-7b": SynthSpec("olmoe", 16, 2048, 1024, 16, 16, None, n_expert=64,
                             n_expert_used=8),
}
# gpt-oss-20b: 24 layers of 2880, 64 query / 8 KV heads of 64, 32 experts of 2880 (4 used) in
# MXFP4 (10.2 GB of the 10.9), the rest Q8_0; window 128 on even layers; yarn 32x over 4096.
# The vocab is the synthetic default's (llama-spm, 32000), not o200k's 201088.
PRESETS["gpt-oss-20b"] = SynthSpec("gpt-oss", 24, 2880, 2880, 64, 8, None, type="q8_0",
                                   ctx_len=131072, rope_base=150000.0, head_dim=64, n_swa=128,
                                   rope_scaling="yarn", rope_factor=32.0, orig_ctx=4096,
                                   n_expert=32, n_expert_used=4, n_ff_exp=2880)


@dataclass(frozen=True)
class SynthTensor:
    """One tensor to write. shape is ggml order (ne0, ne1): ne0 is the contiguous row length."""

    name: str  # "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # (ne0,), (ne0, ne1) or, experts, (ne0, ne1, n_expert)
    type: str  # ggml type name: "Q4_0", "F32", ...
    rms: float  # target rms of the values; 0 with fill == "ones"
    fill: str = "random"  # "random", "ones" for norm weights, "factors" for rope factors,
    # "router" for a MoE router (synth_moe.py)

    @property
    def n_elems(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return blocks.tensor_nbytes(self.type, self.n_elems)


def shared_dir() -> Path:
    """$FLEXINFER_SHARED, else shared/ beside the repository."""
    env = os.environ.get("FLEXINFER_SHARED")
    path = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"
    if not path.is_dir():
        raise FlexInferError(f"shared directory {path} not found: set FLEXINFER_SHARED to the "
                             "folder holding vocab/")
    return path


def vocab_path(spec: SynthSpec) -> Path:
    if spec.vocab_file:
        return Path(spec.vocab_file)
    return shared_dir() / "vocab" / VOCAB_FILES[spec.arch]


def tokenizer_metadata(path: Path) -> dict:
    """Every tokenizer.* key of a vocab-only GGUF, read with our parser (0.2 s for 150k tokens)."""
    if not path.is_file():
        raise FlexInferError(f"vocab file {path} not found")
    meta = {k: v for k, v in read_gguf(path).metadata.items() if k.startswith("tokenizer.")}
    if not isinstance(meta.get("tokenizer.ggml.tokens"), list):
        raise FlexInferError(f"vocab file {path} has no tokenizer.ggml.tokens")
    return meta


def resolve_vocab(spec: SynthSpec, tokens: list[str], path: Path) -> int:
    if spec.n_vocab is not None and spec.n_vocab != len(tokens):
        raise FlexInferError(f"n_vocab {spec.n_vocab} does not match the {len(tokens)} tokens of "
                             f"vocab file {path}")
    return len(tokens)


def check_spec(spec: SynthSpec):
    """Refuses a spec llama.cpp could not load, naming the field at fault."""
    if spec.arch not in ARCHS:
        raise FlexInferError(f"arch {spec.arch!r}: must be one of {', '.join(ARCHS)}")
    why = archs.check_arch_spec(spec)
    if why:
        raise FlexInferError(why)
    if spec.type.upper() not in FILE_TYPES:
        raise FlexInferError(f"type {spec.type!r}: must be one of "
                             f"{', '.join(t.lower() for t in blocks.supported_types())}")
    for field in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "ctx_len"):
        if getattr(spec, field) <= 0:
            raise FlexInferError(f"{field} {getattr(spec, field)}: must be > 0")
    if (spec.head_dim is None and spec.n_embd % spec.n_head) or spec.n_head % spec.n_head_kv:
        raise FlexInferError(f"heads {spec.n_head}/{spec.n_head_kv}: n_embd {spec.n_embd} must "
                             "divide by n_head and n_head by n_head_kv")
    moe.check(spec)
    gptoss.check(spec)
    for name, _ in spec.overrides:
        m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)", name)
        if not m or m[2] not in MATRIX_ROLES or (m[1] and int(m[1]) >= spec.n_layer):
            raise FlexInferError(f"type override {name!r}: not a role ({', '.join(MATRIX_ROLES)}) "
                                 f"or blk.N.role with N < {spec.n_layer}")


def type_of(spec: SynthSpec, base: str, role: str) -> str:
    """The ggml type name of a matrix: its own override, its role's, or spec.type."""
    overrides = dict(spec.overrides)
    name = overrides.get(base, overrides.get(role, spec.type)).upper()
    if name not in blocks.supported_types():
        raise FlexInferError(f"type {name.lower()!r} for {base}: must be one of "
                             f"{', '.join(t.lower() for t in blocks.supported_types())}")
    return name


def matrix(spec: SynthSpec, base: str, ne0: int, ne1: int) -> SynthTensor:
    role = base.rsplit(".", 1)[-1]
    ttype = type_of(spec, base, role)
    block = blocks.block_elems(ttype)
    if ne0 % block:
        raise FlexInferError(f"{base}: row length {ne0} is not a multiple of the {ttype} block "
                             f"size {block} (use an n_embd / n_ff that is)")
    # rms 1/sqrt(ne0): each output of a matmul over a unit-rms input has rms ~1, so the residual
    # grows like sqrt(2 * n_layer) (about 8 after 32 layers) and logits have rms ~1
    return SynthTensor(f"{base}.weight", (ne0, ne1), ttype, 1.0 / math.sqrt(ne0))


def vector(name: str, n: int, spec: SynthSpec, bias: bool | float = False) -> SynthTensor:
    """A norm weight (1 + noise), or a bias: N(0, 0.05) (qwen2's q, k, v), or N(0, bias)."""
    if bias:
        return SynthTensor(name, (n,), "F32", 0.05 if bias is True else float(bias))
    return SynthTensor(name, (n,), "F32", spec.norm_noise, "ones")


def layer_tensors(spec: SynthSpec, i: int) -> list[SynthTensor]:
    if spec.arch == gptoss.ARCH:
        return gptoss.layer_tensors(spec, i, matrix, vector, SynthTensor)
    if spec.arch in moe.MOE_ARCHS:
        return moe.layer_tensors(spec, i, matrix, vector, SynthTensor)
    return archs.layer_tensors(spec, i, matrix, vector)


def tensor_plan(spec: SynthSpec, n_vocab: int) -> list[SynthTensor]:
    """Every tensor in llama.cpp's file order: embeddings, output, then the blocks."""
    check_spec(spec)
    out = [matrix(spec, "token_embd", spec.n_embd, n_vocab),
           vector("output_norm.weight", spec.n_embd, spec)]
    if not spec.tied:
        out.append(matrix(spec, "output", spec.n_embd, n_vocab))
    for i in range(spec.n_layer):
        out += layer_tensors(spec, i)
    # rope factors last: the tensors before them keep their index, hence their seed and bytes
    n_pairs = archs.head_dim(spec) // 2
    return out + [SynthTensor(n, (n_pairs,), "F32", 0.0, "factors") for n in archs.factor_names(spec)]


def model_metadata(spec: SynthSpec, n_vocab: int, name: str) -> dict[str, tuple[str, object]]:
    """General and architecture keys as (gguf value type, value)."""
    a = moe.gguf_arch(spec.arch)
    return moe.metadata(spec) | {
        "general.name": ("string", name),
        "general.file_type": ("uint32", FILE_TYPES[spec.type.upper()]),
        "general.quantization_version": ("uint32", 2),
        f"{a}.vocab_size": ("uint32", n_vocab),
        f"{a}.context_length": ("uint32", spec.ctx_len),
        f"{a}.embedding_length": ("uint32", spec.n_embd),
        f"{a}.block_count": ("uint32", spec.n_layer),
        f"{a}.feed_forward_length": ("uint32", spec.n_ff),
        f"{a}.attention.head_count": ("uint32", spec.n_head),
        f"{a}.attention.head_count_kv": ("uint32", spec.n_head_kv),
        f"{a}.attention.layer_norm_rms_epsilon": ("float32", RMS_EPS[a]),
        f"{a}.rope.freq_base": ("float32", float(spec.rope_base)),
        f"{a}.rope.dimension_count": ("uint32", archs.head_dim(spec)),
        **archs.arch_metadata(spec),
    }


def write_synthetic(out_path, spec: SynthSpec, *, progress: Progress | None = None) -> Path:
    """Writes a synthetic GGUF model and returns its path (written as OUT.part, then renamed)."""
    from flexinfer.bench.synth_writer import write_gguf

    check_spec(spec)
    vpath = vocab_path(spec)
    tok = tokenizer_metadata(vpath)
    n_vocab = resolve_vocab(spec, tok["tokenizer.ggml.tokens"], vpath)
    plan = tensor_plan(spec, n_vocab)
    name = f"synthetic {spec.arch} {spec.n_layer}L {spec.n_embd}d {spec.type}"
    out = Path(out_path)
    write_gguf(out, moe.gguf_arch(spec.arch), model_metadata(spec, n_vocab, name), tok, plan,
               lambda i, t: tensor_chunks(spec, i, t), progress)
    return out


def tensor_chunks(spec: SynthSpec, index: int, t: SynthTensor):
    """The bytes of tensor number index of the plan, in chunks; seeded by (seed, index)."""
    rng = blocks.make_rng(spec.seed, index)
    if t.fill == "router":
        yield moe.router_values(spec, t, rng).view(np.uint8)
        return
    if t.fill == "factors":
        yield archs.factor_values(rng, t.name, t.n_elems).view(np.uint8)
        return
    if t.fill == "ones":
        values = np.ones(t.n_elems, np.float32)
        if t.rms:
            values += rng.standard_normal(t.n_elems, dtype=np.float32) * np.float32(t.rms)
        yield values.view(np.uint8)
        return
    yield from blocks.iter_weight_bytes(rng, t.type, t.n_elems, t.rms)


def preset(name: str, **changes) -> SynthSpec:
    if name not in PRESETS:
        raise FlexInferError(f"preset {name!r}: must be one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **changes)
