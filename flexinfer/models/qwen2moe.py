"""The qwen2moe architecture (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): qwen2's attention (biases on q, k
and v, NEOX rope) and a mixture-of-experts FFN: softmax routing and top-K whose weights are NOT
normalized, plus a shared expert gated per token by a sigmoid (models/moe.py), as llama.cpp's
src/models/qwen2moe.cpp."""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import ROPE_NEOX, Ops, Tensor
from flexinfer.models import base, llama
from flexinfer.models.base import Batch, TensorSpec
from flexinfer.models.llama import build_head  # noqa: F401 (the contract)

ROPE_MODE = ROPE_NEOX


def tensor_specs(cfg: ModelConfig, tied: bool, names=frozenset()) -> list[TensorSpec]:
    """llama.cpp requires output.weight for qwen2moe: a file without one is refused as missing."""
    specs = base.embd_specs(cfg)
    for i in range(cfg.n_layer):
        specs += llama.block_specs(cfg, i, bias=True)  # experts: cfg.n_expert > 0
    return specs + base.head_specs(cfg, tied=False)


def build_layer(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
    return llama.block(ops, cfg, w, x, batch, k_cache, v_cache, ROPE_MODE)
