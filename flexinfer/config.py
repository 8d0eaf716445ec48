"""ModelConfig.from_gguf: the one place GGUF metadata keys become fields, each checked for range."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flexinfer.errors import GGUFError
from flexinfer.gguf_file import GGUFFile

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "qwen3moe", "qwen2moe", "olmoe")
ARCHITECTURES += ("gpt-oss",)  # models/gptoss.py
MAX_LAYERS = 1024  # the largest public models have ~130
MAX_EMBD = 1 << 16
MAX_CTX = 1 << 24
ROPE_SCALINGS = ("none", "linear", "longrope", "yarn")  # as llama.cpp applies them
YARN_BETA = (32.0, 1.0)  # llama.cpp's yarn_beta_fast / yarn_beta_slow when the file has none
# yarn keys whose llama.cpp computation is not built here (DeepSeek's mscale, overrides): refused
YARN_UNBUILT = ("rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_ext_factor",
                "rope.scaling.yarn_attn_factor")
FULL_ROPE = ("llama", "olmoe")  # llama.cpp: n_rot must equal the head size


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # general.architecture: one of ARCHITECTURES
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
    # {arch}.attention.key_length (= value_length: files where they differ are refused); else
    # n_embd / n_head. 64 for SmolLM2, 128 for Qwen3-0.6B (whose n_embd / n_head is 64)
    head_dim: int = 0
    rope_scaling: str = "linear"  # {arch}.rope.scaling.type: none | linear | longrope | yarn
    # rope's cos/sin multiplier: {arch}.rope.scaling.attn_factor, times yarn's correction (_yarn)
    rope_attn_factor: float = 1.0
    rope_ext_factor: float = 0.0  # yarn's extrapolation mix: 1 for yarn (llama.cpp's), else 0
    # {arch}.rope.scaling.yarn_beta_fast / yarn_beta_slow: yarn's correction range (32, 1)
    rope_yarn_beta: tuple[float, float] = YARN_BETA
    n_ctx_orig: int = 0  # {arch}.rope.scaling.original_context_length; n_ctx_train when absent
    n_swa: int = 0  # {arch}.attention.sliding_window (gemma3: 512 or 1024); 0 = no sliding window
    swa_layers: tuple[bool, ...] = ()  # per layer: True where the window applies (gemma3: 5 of 6)
    rope_base_swa: float = 10000.0  # {arch}.rope.freq_base_swa: the base on sliding layers
    logit_softcap: float = 0.0  # {arch}.final_logit_softcapping (gemma): 0 = none
    # mixture of experts (0 experts: a dense FFN); Qwen3-30B-A3B: 128 experts, 8 used, 768 wide
    n_expert: int = 0  # {arch}.expert_count
    n_expert_used: int = 0  # {arch}.expert_used_count: experts each token goes through
    n_ff_exp: int = 0  # {arch}.expert_feed_forward_length; n_ff / n_expert_used when absent
    # (mixtral, arch llama, and olmoe: n_ff, as llama.cpp builds their expert tensors)
    n_ff_shexp: int = 0  # qwen2moe's shared expert: {arch}.expert_shared_feed_forward_length, n_ff

    @property
    def n_embd_kv(self) -> int:
        """Width of one K row and one V row of a layer's cache: head_dim * n_head_kv."""
        return self.head_dim * self.n_head_kv

    @property
    def n_embd_q(self) -> int:
        """Width of Q and of attention's output: head_dim * n_head (!= n_embd for qwen3, gemma3)."""
        return self.head_dim * self.n_head

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[il]

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
        if f"{arch}.attention.key_length" not in m and n_embd % n_head:  # else heads are that
            raise GGUFError(g.path, f"metadata '{arch}.attention.head_count': {n_head} heads do "
                                    f"not divide the embedding length {n_embd}")
        n_head_kv = get("attention.head_count_kv", int, n_head, lo=1, hi=n_head)
        if n_head % n_head_kv:
            raise GGUFError(g.path, f"metadata '{arch}.attention.head_count_kv': {n_head_kv} "
                                    f"does not divide head_count {n_head}")
        head_dim = get("attention.key_length", int, n_embd // n_head, lo=1, hi=MAX_EMBD)
        if get("attention.value_length", int, head_dim, lo=1, hi=MAX_EMBD) != head_dim:
            raise GGUFError(g.path, f"metadata '{arch}.attention.value_length' differs from "
                                    f"'{arch}.attention.key_length' {head_dim} (not supported)")
        scaling = m.get(f"{arch}.rope.scaling.type", "linear")  # llama.cpp's default
        if not isinstance(scaling, str) or scaling not in ROPE_SCALINGS:
            raise GGUFError(g.path, f"metadata '{arch}.rope.scaling.type': {_show(scaling)} is "
                                    f"not supported (supported: {', '.join(ROPE_SCALINGS)})")
        # the older key name, as llama.cpp reads it when rope.scaling.factor is absent
        factor = get("rope.scale_linear", float, 0.0, lo=0.0, hi=1e6)
        factor = get("rope.scaling.factor", float, factor, lo=0.0, hi=1e6)
        n_ctx_train = get("context_length", int, lo=1, hi=MAX_CTX)
        n_layer = get("block_count", int, lo=1, hi=MAX_LAYERS)
        embd = g.tensors.get("token_embd.weight")
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=get("feed_forward_length", int, lo=1, hi=1 << 20),
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_vocab=embd.shape[1] if embd and len(embd.shape) == 2 else 0,
            n_ctx_train=n_ctx_train,
            n_rot=_n_rot(g, arch, get("rope.dimension_count", int, head_dim, lo=2, hi=head_dim),
                         head_dim),
            rope_base=get("rope.freq_base", float, 10000.0, lo=1e-3, hi=1e12),
            # llama.cpp: 1 / factor for every type but none (0 or absent: 1)
            rope_freq_scale=1.0 / factor if factor and scaling != "none" else 1.0,
            norm_eps=get("attention.layer_norm_rms_epsilon", float, 1e-5, lo=1e-12, hi=1.0),
            head_dim=head_dim,
            rope_scaling=scaling,
            **_yarn(g, arch, scaling, factor, get),
            n_ctx_orig=get("rope.scaling.original_context_length", int, n_ctx_train, lo=1,
                           hi=MAX_CTX),
            **_swa(g, arch, n_layer, get),
            logit_softcap=get("final_logit_softcapping", float, 0.0, lo=0.0, hi=1e6)
            if arch == "gemma3" else 0.0,
            **_experts(g, arch, get),
        )


# experts required; llama has them when expert_count > 0
MOE_ARCHS = ("qwen3moe", "qwen2moe", "olmoe", "gpt-oss")
N_FF_EXPERTS = ("llama", "olmoe")  # experts feed_forward_length wide (llama.cpp's loaders)
MAX_EXPERTS = 1024  # llama.cpp's LLAMA_MAX_EXPERTS


def _experts(g: GGUFFile, arch: str, get) -> dict:
    """The MoE fields, checked as llama.cpp checks them: qwen3moe/qwen2moe/olmoe need experts,
    llama has them only when expert_count > 0 (mixtral), and expert_used_count is in
    [1, expert_count]. Mixtral's and OLMoE's experts are feed_forward_length wide (OLMoE-1B-7B:
    1024): llama.cpp reads no expert_feed_forward_length for them."""
    lo = 1 if arch in MOE_ARCHS else 0
    n_expert = get("expert_count", int, None if lo else 0, lo=lo, hi=MAX_EXPERTS)
    if not n_expert:
        return {}
    n_used = get("expert_used_count", int, lo=1, hi=n_expert)
    n_ff = get("feed_forward_length", int, lo=1, hi=1 << 20)
    out = {"n_expert": n_expert, "n_expert_used": n_used}
    if arch in N_FF_EXPERTS:
        out["n_ff_exp"] = n_ff
    else:
        out["n_ff_exp"] = get("expert_feed_forward_length", int, max(1, n_ff // n_used), lo=1,
                              hi=1 << 20)
    if arch == "qwen2moe":
        out["n_ff_shexp"] = get("expert_shared_feed_forward_length", int, n_ff, lo=1, hi=1 << 20)
    return out


def _n_rot(g: GGUFFile, arch: str, n_rot: int, head_dim: int) -> int:
    if n_rot % 2:
        raise GGUFError(g.path, f"metadata '{arch}.rope.dimension_count': {n_rot} is odd")
    if arch in FULL_ROPE and n_rot != head_dim:  # llama.cpp refuses these too
        raise GGUFError(g.path, f"metadata '{arch}.rope.dimension_count': {n_rot} is not the "
                                f"head size {head_dim}")
    return n_rot


def _swa(g: GGUFFile, arch: str, n_layer: int, get) -> dict:
    """The sliding window, as llama.cpp reads it: gemma3 only (phi3's is disabled in llama.cpp
    too). Layer il slides when il % pattern < pattern - 1 (pattern 6: five layers of six), or as a
    per-layer bool array says."""
    if arch == "gpt-oss":
        return _swa_gptoss(g, arch, n_layer, get)
    if arch != "gemma3":
        return {}
    n_swa = get("attention.sliding_window", int, 0, lo=0, hi=MAX_CTX)
    if n_swa == 0:
        return {}
    key = f"{arch}.attention.sliding_window_pattern"
    pattern = g.metadata.get(key, 6)
    if isinstance(pattern, (list, tuple)) or getattr(pattern, "ndim", 0) == 1:
        layers = tuple(bool(v) for v in pattern)
        if len(layers) != n_layer:
            raise GGUFError(g.path, f"metadata '{key}': {len(layers)} values for {n_layer} layers")
    else:
        n = get("attention.sliding_window_pattern", int, 6, lo=0, hi=MAX_LAYERS)
        layers = tuple(n == 0 or il % n < n - 1 for il in range(n_layer))
    return {"n_swa": n_swa, "swa_layers": layers,
            "rope_base_swa": get("rope.freq_base_swa", float, 10000.0, lo=1e-3, hi=1e12)}


def _swa_gptoss(g: GGUFFile, arch: str, n_layer: int, get) -> dict:
    """gpt-oss's window, as llama.cpp's loader reads it: attention.sliding_window required (128
    in gpt-oss-20b/120b), every other layer sliding from layer 0 (pattern 2: il % 2 == 0); the
    sliding layers rope like the others (same base and scaling)."""
    n_swa = get("attention.sliding_window", int, lo=1, hi=MAX_CTX)
    return {"n_swa": n_swa, "swa_layers": tuple(il % 2 == 0 for il in range(n_layer)),
            "rope_base_swa": get("rope.freq_base", float, 10000.0, lo=1e-3, hi=1e12)}


def _yarn(g: GGUFFile, arch: str, scaling: str, factor: float, get) -> dict:
    """rope_attn_factor, rope_ext_factor and the betas, as llama.cpp's context sets them: for yarn
    ext_factor 1 and attn_factor mscale(f) / (1 + 0.1 ln f), f = 1 / freq_scale, mscale(f) =
    1 + 0.1 ln f above 1 (so 1 for f >= 1), since ggml's rope multiplies by 1 + 0.1 ln f itself
    whenever ext_factor is not 0; then times rope.scaling.attn_factor."""
    attn = get("rope.scaling.attn_factor", float, 1.0, lo=1e-6, hi=1e6)
    if scaling != "yarn":
        return {"rope_attn_factor": attn}
    for key in YARN_UNBUILT:
        if f"{arch}.{key}" in g.metadata:
            raise GGUFError(g.path, f"metadata '{arch}.{key}': yarn with it is not supported "
                                    "(plain yarn is)")
    f = factor if factor else 1.0
    mscale = 1.0 + 0.1 * math.log(f) if f > 1.0 else 1.0
    beta = (get("rope.scaling.yarn_beta_fast", float, YARN_BETA[0], lo=0.0, hi=1e6),
            get("rope.scaling.yarn_beta_slow", float, YARN_BETA[1], lo=0.0, hi=1e6))
    return {"rope_attn_factor": attn * mscale / (1.0 + 0.1 * math.log(f)), "rope_ext_factor": 1.0,
            "rope_yarn_beta": beta}


def _show(v) -> str:
    s = repr(v).replace("\n", " ")  # numpy breaks long reprs over lines; messages are one line
    return s if len(s) < 40 else s[:37] + "..."
