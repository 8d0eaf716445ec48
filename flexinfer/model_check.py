"""check_model: everything flexinfer checks about a model file before any ggml call touches it.

The file is parsed and validated (gguf_file), its architecture and hyperparameters read and range
checked (config), its tokenizer metadata checked (vocab_check), and the tensors the architecture
needs matched against the file by name, shape and type (models.specs_for). Nothing here allocates memory
sized by the file beyond the header itself, and the only error that leaves is GGUFError.
"""

from __future__ import annotations

import os

from flexinfer.config import ModelConfig
from flexinfer.gguf_file import GGUFFile, read_gguf
from flexinfer.models import specs_for
from flexinfer.models.base import TensorSpec
from flexinfer.vocab_check import check_tokenizer_metadata


def check_model(path: str | os.PathLike) -> tuple[GGUFFile, ModelConfig, list[TensorSpec]]:
    """Parse and check a model file; raises GGUFError naming the file and the first fault found.
    The architecture comes first (a file we cannot run at all says so before anything finer)."""
    g = read_gguf(path)
    cfg = ModelConfig.from_gguf(g)
    check_tokenizer_metadata(g)
    return g, cfg, specs_for(g, cfg)
