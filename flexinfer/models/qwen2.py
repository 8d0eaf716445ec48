"""The qwen2 architecture: llama's block with biases on q, k and v, and NEOX rope (halves rotate)."""

from flexinfer.ggml_ops import ROPE_NEOX
from flexinfer.models.llama import build_head, build_layer, tensor_specs  # noqa: F401 (the contract)

ROPE_MODE = ROPE_NEOX
QKV_BIAS = True
