"""Per-layer K and V caches in f16, like llama.cpp: one (n_embd_kv, n_ctx) tensor each, row p holding
position p. Allocated once, zeroed (attention skips masked cells, but never reads garbage)."""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import TYPE_F16, Buffer, Tensor, TensorTable, place


def kv_bytes(cfg: ModelConfig, n_ctx: int) -> int:
    """Bytes of the whole cache: K and V, f16, every layer. Llama-2-7B at n_ctx 256: 128 MiB."""
    return 2 * cfg.n_layer * n_ctx * cfg.n_embd_kv * 2


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int):
        self.n_ctx = n_ctx
        self.nbytes = kv_bytes(cfg, n_ctx)
        self._buf = Buffer(self.nbytes)
        self._buf.clear()
        self._table = TensorTable(2 * cfg.n_layer)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        layer_bytes = n_ctx * cfg.n_embd_kv * 2
        for i in range(cfg.n_layer):
            for j, (name, out) in enumerate((("k", self.k), ("v", self.v))):
                t = self._table.new(f"cache_{name}_l{i}", TYPE_F16, (cfg.n_embd_kv, n_ctx))
                place(t, self._buf, self._buf.base + (2 * i + j) * layer_bytes)
                out.append(t)

    def close(self) -> None:
        self._table.free()
        self._buf.free()
