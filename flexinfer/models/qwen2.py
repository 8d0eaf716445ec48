"""The qwen2 architecture: llama's block with biases on q, k and v, and NEOX rope (halves rotate)."""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import ROPE_NEOX, Ops, Tensor
from flexinfer.models import base, llama
from flexinfer.models.base import Batch, TensorSpec
from flexinfer.models.llama import build_head  # noqa: F401 (the contract)

ROPE_MODE = ROPE_NEOX


def tensor_specs(cfg: ModelConfig, tied: bool, names=frozenset()) -> list[TensorSpec]:
    specs = base.embd_specs(cfg)
    for i in range(cfg.n_layer):
        specs += llama.block_specs(cfg, i, bias=True)
    return specs + base.head_specs(cfg, tied)


def build_layer(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
    return llama.block(ops, cfg, w, x, batch, k_cache, v_cache, ROPE_MODE)
