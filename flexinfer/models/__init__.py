"""One module per architecture, each with the same small contract (models/base.py):
tensor_specs(cfg, tied, names=...), build_layer(...), build_head(...); optionally IGNORED, the
tensors llama.cpp loads but never computes with, each with the reason."""

from types import ModuleType

from flexinfer.models import gemma3, llama, olmoe, phi3, qwen2, qwen2moe, qwen3, qwen3moe
from flexinfer.models import gptoss

ARCHS: dict[str, ModuleType] = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma3": gemma3,
                                "phi3": phi3, "qwen3moe": qwen3moe, "qwen2moe": qwen2moe,
                                "olmoe": olmoe}
ARCHS["gpt-oss"] = gptoss

from flexinfer.config import ModelConfig  # noqa: E402
from flexinfer.errors import GGUFError  # noqa: E402
from flexinfer.gguf_file import GGML_TYPES, GGUFFile, TensorInfo  # noqa: E402

# Types ggml's CPU backend multiplies by (the storage types; Q8_1/Q8_K and integers are not).
WEIGHT_TYPES = frozenset(t for t, (name, _, _) in GGML_TYPES.items()
                         if name not in ("Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64"))
F32 = 0


def specs_for(g: GGUFFile, cfg: ModelConfig) -> list:
    """The architecture's tensor specs for this file, checked against it before any allocation:
    every required tensor present, with the shape and a type the architecture can compute; every
    tensor of the file used (or one llama.cpp knowingly ignores, arch.IGNORED): a tensor nothing
    reads would be a silent wrong answer (Llama 3.1's rope_freqs was once one); and as many
    embedding rows (and output columns) as the tokenizer has tokens."""
    arch = ARCHS[cfg.arch]
    tied = "output.weight" not in g.tensors
    specs = arch.tensor_specs(cfg, tied, names=frozenset(g.tensors))
    for s in specs:
        t = g.tensors.get(s.name)
        if t is None:
            raise GGUFError(g.path, f"tensor '{s.name}' is missing ({cfg.arch} needs it)")
        _check_one(g, s, t)
    used = {s.name for s in specs} | set(getattr(arch, "IGNORED", {}))
    unused = [name for name in g.tensors if name not in used]
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise GGUFError(g.path, f"tensor '{unused[0]}' is not used by {cfg.arch}{more}: flexinfer "
                                "does not know what it does, so the answers would be wrong")
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != cfg.n_vocab:  # output.weight matched above
        raise GGUFError(g.path, f"tensor 'token_embd.weight' has {cfg.n_vocab} rows but "
                                f"'tokenizer.ggml.tokens' has {len(tokens)} tokens")
    return specs


def _check_one(g: GGUFFile, s, t: TensorInfo) -> None:
    if tuple(t.shape) != s.shape:
        raise GGUFError(g.path, f"tensor '{s.name}' has shape {list(t.shape)}, "
                                f"expected {list(s.shape)}")
    if not s.quantizable and t.type != F32:
        raise GGUFError(g.path, f"tensor '{s.name}' is {t.type_name}, expected F32")
    if t.type not in WEIGHT_TYPES:
        raise GGUFError(g.path, f"tensor '{s.name}' has type {t.type_name}, which cannot be "
                                "used as a weight")
