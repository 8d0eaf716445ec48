"""The qwen3 architecture: qwen2's block without q/k/v biases, with an RMS norm over each head of q
and of k before rope (attn_q_norm / attn_k_norm, one (head_dim,) weight each), as llama.cpp's
src/models/qwen3.cpp. The head size is attention.key_length (128 for Qwen3-0.6B, whose
n_embd / n_head is 64), so q is wider than n_embd and attn_output maps n_embd_q back to n_embd."""

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
        specs += llama.block_specs(cfg, i, bias=False, qk_norm=True)
    return specs + base.head_specs(cfg, tied)


def build_layer(ops: Ops, cfg: ModelConfig, il: int, w: dict, x: Tensor, batch: Batch,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
    return llama.block(ops, cfg, w, x, batch, k_cache, v_cache, ROPE_MODE)
