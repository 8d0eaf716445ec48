"""Per-layer K and V caches in f16, like llama.cpp: one (n_embd_kv, n_ctx) tensor each, row p holding
position p. Allocated once as zeroed memory that is charged as it is written (ggml_ops.LazyMemory):
a cache holding P positions costs kv_charged(cfg, P), not the whole context, and the planner spends
the difference on weights until the positions are used (planner.py, "Stages")."""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import PAGE, TYPE_F16, LazyMemory, Placement, Tensor, TensorTable, point


def kv_bytes(cfg: ModelConfig, n_ctx: int) -> int:
    """Bytes of the whole cache: K and V, f16, every layer, each tensor in whole pages.
    Llama-2-7B at n_ctx 256: 128 MiB."""
    return kv_charged(cfg, n_ctx)


def kv_charged(cfg: ModelConfig, positions: int) -> int:
    """Bytes of memory the cache is charged for once `positions` positions are written: whole pages
    of each of the 2 * n_layer tensors."""
    per_tensor = (positions * cfg.n_embd_kv * 2 + PAGE - 1) // PAGE * PAGE
    return 2 * cfg.n_layer * per_tensor


KV_STAGE_MIN = 64  # positions: the first stage of a growing cache holds at least this many
KV_STAGE_STEP = 4  # each stage holds this many times more positions than the one before


def kv_growth(cfg: ModelConfig, n_ctx: int) -> tuple[tuple[int, int], ...]:
    """(positions, bytes not yet charged) for the stages before the full context: n_ctx/4,
    n_ctx/16, ... down to KV_STAGE_MIN positions. Few stages, because every stage boundary inside
    a matrix is one more row block to multiply (a 4x step gives 3 stages at 4096)."""
    out, p = [], n_ctx // KV_STAGE_STEP
    while p >= KV_STAGE_MIN:
        out.append((p, kv_bytes(cfg, n_ctx) - kv_charged(cfg, p)))
        p //= KV_STAGE_STEP
    return tuple(sorted(out))


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int):
        self.n_ctx = n_ctx
        self.nbytes = kv_bytes(cfg, n_ctx)
        self._mem = LazyMemory(self.nbytes)
        self._table = TensorTable(2 * cfg.n_layer)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        stride = self.nbytes // (2 * cfg.n_layer)  # page-aligned, so pages are charged per tensor
        for i in range(cfg.n_layer):
            for j, (name, out) in enumerate((("k", self.k), ("v", self.v))):
                t = self._table.new(f"cache_{name}_l{i}", TYPE_F16, (cfg.n_embd_kv, n_ctx))
                point(t, Placement(self._mem.base + (2 * i + j) * stride, None, None))
                out.append(t)

    def close(self) -> None:
        self._table.free()
        self._mem.free()
