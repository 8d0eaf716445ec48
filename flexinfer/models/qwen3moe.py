"""The qwen3moe architecture (Qwen3-30B-A3B, Qwen3-235B-A22B): qwen3's attention (an RMS norm over
each query and key head before rope, NEOX rope, no biases, head size attention.key_length) and a
mixture-of-experts FFN: softmax routing, top-K, the K weights normalized to sum 1; no shared expert
(models/moe.py), as llama.cpp's src/models/qwen3moe.cpp."""

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
        specs += llama.block_specs(cfg, i, bias=False, qk_norm=True)  # experts: cfg.n_expert > 0
    return specs + base.head_specs(cfg, tied)


def build_layer(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
    return llama.block(ops, cfg, w, x, batch, k_cache, v_cache, ROPE_MODE)
