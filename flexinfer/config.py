"""ModelConfig.from_gguf: the one place GGUF metadata keys become fields, each checked for range."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flexinfer.errors import GGUFError
from flexinfer.gguf_file import GGUFFile

ARCHITECTURES = ("llama", "qwen2", "qwen3moe", "qwen2moe")
MAX_LAYERS = 1024  # the largest public models have ~130
MAX_EMBD = 1 << 16
MAX_CTX = 1 << 24


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # general.architecture: "llama" or "qwen2"
    n_layer: int  # {arch}.block_count: 30 for SmolLM2-135M, 32 for Llama-2-7B
    n_embd: int  # {arch}.embedding_length: 576 / 4096
    n_ff: int  # {arch}.feed_forward_length: 1536 / 11008
    n_head: int  # {arch}.attention.head_count: 9 / 32
    n_head_kv: int  # {arch}.attention.head_count_kv, grouped-query attention; n_head when absent
    n_vocab: int  # rows of token_embd.weight
    n_ctx_train: int  # {arch}.context_length: 8192 / 4096
    n_rot: int  # {arch}.rope.dimension_count; head_dim when absent
    rope_base: float  # {arch}.rope.freq_base: 10000 for Llama 2, 100000 for SmolLM2
    rope_freq_scale: float  # 1 / {arch}.rope.scaling.factor for linear scaling, else 1
    norm_eps: float  # {arch}.attention.layer_norm_rms_epsilon: 1e-5 for llama, 1e-6 for qwen2
    # mixture of experts (0 experts: a dense FFN); Qwen3-30B-A3B: 128 experts, 8 used, 768 wide
    n_expert: int = 0  # {arch}.expert_count
    n_expert_used: int = 0  # {arch}.expert_used_count: experts each token goes through
    n_ff_exp: int = 0  # {arch}.expert_feed_forward_length; n_ff / n_expert_used when absent
    # (mixtral, arch llama: n_ff)
    n_ff_shexp: int = 0  # qwen2moe's shared expert: {arch}.expert_shared_feed_forward_length, n_ff

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> ModelConfig:
        m, arch = g.metadata, g.metadata.get("general.architecture")
        if arch is None:
            raise GGUFError(g.path, "metadata 'general.architecture' is missing")
        if not isinstance(arch, str) or arch not in ARCHITECTURES:  # a crafted file may hold a list
            raise GGUFError(g.path, f"metadata 'general.architecture': {_show(arch)} is not "
                                    f"supported (supported: {', '.join(ARCHITECTURES)})")

        def get(key, kind, default=None, lo=None, hi=None):
            full = f"{arch}.{key}"
            v = m.get(full, default)
            if v is None:
                raise GGUFError(g.path, f"metadata '{full}' is missing")
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if kind is int:
                ok = ok and float(v).is_integer()
            if not ok or not math.isfinite(v):
                noun = "an integer" if kind is int else "a finite number"
                raise GGUFError(g.path, f"metadata '{full}': {_show(v)} is not {noun}")
            v = kind(v)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise GGUFError(g.path, f"metadata '{full}': {v} is out of range [{lo}, {hi}]")
            return v

        n_embd = get("embedding_length", int, lo=1, hi=MAX_EMBD)
        n_head = get("attention.head_count", int, lo=1, hi=n_embd)
        if n_embd % n_head:
            raise GGUFError(g.path, f"metadata '{arch}.attention.head_count': {n_head} heads do "
                                    f"not divide the embedding length {n_embd}")
        n_head_kv = get("attention.head_count_kv", int, n_head, lo=1, hi=n_head)
        if n_head % n_head_kv:
            raise GGUFError(g.path, f"metadata '{arch}.attention.head_count_kv': {n_head_kv} "
                                    f"does not divide head_count {n_head}")
        head_dim = n_embd // n_head
        scaling = m.get(f"{arch}.rope.scaling.type", "none")
        if not isinstance(scaling, str):
            raise GGUFError(g.path, f"metadata '{arch}.rope.scaling.type': {_show(scaling)} is "
                                    "not a string")
        factor = get("rope.scaling.factor", float, 1.0, lo=1e-6, hi=1e6)
        embd = g.tensors.get("token_embd.weight")
        return cls(
            arch=arch,
            n_layer=get("block_count", int, lo=1, hi=MAX_LAYERS),
            n_embd=n_embd,
            n_ff=get("feed_forward_length", int, lo=1, hi=1 << 20),
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_vocab=embd.shape[1] if embd and len(embd.shape) == 2 else 0,
            n_ctx_train=get("context_length", int, lo=1, hi=MAX_CTX),
            n_rot=_even(g, arch, get("rope.dimension_count", int, head_dim, lo=2, hi=head_dim)),
            rope_base=get("rope.freq_base", float, 10000.0, lo=1e-3, hi=1e12),
            rope_freq_scale=1.0 / factor if scaling == "linear" else 1.0,
            norm_eps=get("attention.layer_norm_rms_epsilon", float, 1e-5, lo=1e-12, hi=1.0),
            **_experts(g, arch, get),
        )


MOE_ARCHS = ("qwen3moe", "qwen2moe")  # experts required; llama has them when expert_count > 0
MAX_EXPERTS = 1024  # llama.cpp's LLAMA_MAX_EXPERTS


def _experts(g: GGUFFile, arch: str, get) -> dict:
    """The MoE fields, checked as llama.cpp checks them: qwen3moe/qwen2moe need experts, llama has
    them only when expert_count > 0 (mixtral), and expert_used_count is in [1, expert_count]."""
    lo = 1 if arch in MOE_ARCHS else 0
    n_expert = get("expert_count", int, None if lo else 0, lo=lo, hi=MAX_EXPERTS)
    if not n_expert:
        return {}
    n_used = get("expert_used_count", int, lo=1, hi=n_expert)
    n_ff = get("feed_forward_length", int, lo=1, hi=1 << 20)
    out = {"n_expert": n_expert, "n_expert_used": n_used}
    if arch == "llama":  # mixtral: the experts are n_ff wide
        out["n_ff_exp"] = n_ff
    else:
        out["n_ff_exp"] = get("expert_feed_forward_length", int, max(1, n_ff // n_used), lo=1,
                              hi=1 << 20)
    if arch == "qwen2moe":
        out["n_ff_shexp"] = get("expert_shared_feed_forward_length", int, n_ff, lo=1, hi=1 << 20)
    return out


def _even(g: GGUFFile, arch: str, n_rot: int) -> int:
    if n_rot % 2:
        raise GGUFError(g.path, f"metadata '{arch}.rope.dimension_count': {n_rot} is odd")
    return n_rot


def _show(v) -> str:
    s = repr(v).replace("\n", " ")  # numpy breaks long reprs over lines; messages are one line
    return s if len(s) < 40 else s[:37] + "..."
