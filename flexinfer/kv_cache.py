"""The KV cache: per-layer K and V tensors shared by every sequence, in fixed slots of cells.

Sequence s (0 <= s < n_seq) owns cells [s * n_ctx, (s + 1) * n_ctx) and keeps position p in cell
s * n_ctx + p, like llama-server's slots (`-np`). Fixed slots rather than llama.cpp's unified free
list, because:
- a sequence's cells stay in position order, so flash attention visits its keys in the same order as
  when the sequence runs alone: a sequence's logits in a batch equal its logits alone, bit for bit,
  wherever the kernels are batch-invariant (a free list hands out cells out of order once sequences
  finish and give theirs back);
- nothing fragments, and admission is one question: is a slot free.

The memory is zeroed anonymous memory charged page by page as it is first written
(ggml_ops.LazyMemory): the cache costs the cells in use, not the whole context, and the planner spends
the rest on weights until they are used (planner.py, "Stages"). Cells are F16 like llama.cpp's, or
Q8_0/Q4_0 (`--cache-type-k/-v`): Llama-2-7B's cache at 4096 positions is 2.1 GB in F16, 1.1 GB in
Q8_0, 0.6 GB in Q4_0.

The cache also remembers each slot's tokens, so a prompt that starts with them starts after them
(prefix reuse, `common_prefix`).
"""

from __future__ import annotations

from flexinfer.config import ModelConfig
from flexinfer.errors import FlexInferError
from flexinfer.ggml_ops import PAGE, LazyMemory, Placement, Tensor, TensorTable, point
from flexinfer.gguf_file import GGML_TYPES, row_bytes

CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # --cache-type-k/-v: name -> ggml type id


def cache_type(name: str, option: str) -> int:
    t = CACHE_TYPES.get(str(name).lower())
    if t is None:
        raise FlexInferError(f"{option}: {name!r} is not one of {', '.join(CACHE_TYPES)}")
    return t


def check_cache_type(cfg: ModelConfig, type_id: int, option: str) -> None:
    """A quantized cache stores each head's row in whole blocks (32 values for Q8_0/Q4_0)."""
    block = GGML_TYPES[type_id][1]
    if cfg.head_dim % block:
        raise FlexInferError(f"{option}: {GGML_TYPES[type_id][0]} needs a head size that is a "
                             f"multiple of {block}, this model's is {cfg.head_dim}")


def _tensor_bytes(cfg: ModelConfig, type_id: int, cells: int) -> int:
    return (cells * row_bytes(type_id, cfg.n_embd_kv) + PAGE - 1) // PAGE * PAGE


def kv_bytes(cfg: ModelConfig, n_cells: int, type_k: int = 1, type_v: int = 1) -> int:
    """Bytes of the whole cache: K and V, every layer, each tensor in whole pages.
    Llama-2-7B with 256 F16 cells: 128 MiB."""
    return kv_charged(cfg, n_cells, type_k, type_v)


def kv_charged(cfg: ModelConfig, cells: int, type_k: int = 1, type_v: int = 1) -> int:
    """Bytes of memory the cache is charged for once `cells` cells (in one slot) are written:
    whole pages of each of the 2 * n_layer tensors."""
    return cfg.n_layer * (_tensor_bytes(cfg, type_k, cells) + _tensor_bytes(cfg, type_v, cells))


KV_STAGE_MIN = 64  # cells: the first stage of a growing cache holds at least this many
KV_STAGE_STEP = 4  # each stage holds this many times more cells than the one before


def kv_growth(cfg: ModelConfig, n_cells: int, type_k: int = 1,
              type_v: int = 1) -> tuple[tuple[int, int], ...]:
    """(cells, bytes not yet charged) for the stages before the full cache: n_cells/4,
    n_cells/16, ... down to KV_STAGE_MIN cells. Few stages, because every stage boundary inside
    a matrix is one more row block to multiply (a 4x step gives 3 stages at 4096)."""
    out, p = [], n_cells // KV_STAGE_STEP
    full = kv_bytes(cfg, n_cells, type_k, type_v)
    while p >= KV_STAGE_MIN:
        out.append((p, full - kv_charged(cfg, p, type_k, type_v)))
        p //= KV_STAGE_STEP
    return tuple(sorted(out))


class KVCache:
    """K/V tensors of (n_embd_kv, n_seq * n_ctx) cells per layer, and each slot's tokens."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, n_seq: int = 1, type_k: int = 1,
                 type_v: int = 1):
        self.n_ctx, self.n_seq = n_ctx, n_seq
        self.n_cells = n_ctx * n_seq
        self.type_k, self.type_v = type_k, type_v
        self.tokens: list[list[int]] = [[] for _ in range(n_seq)]  # what each slot holds
        self.high = [0] * n_seq  # positions each slot has ever written (its charged pages)
        self._row_bytes = [row_bytes(type_k, cfg.n_embd_kv), row_bytes(type_v, cfg.n_embd_kv)]
        sizes = [_tensor_bytes(cfg, type_k, self.n_cells), _tensor_bytes(cfg, type_v, self.n_cells)]
        self.nbytes = cfg.n_layer * sum(sizes)
        self._mem = LazyMemory(self.nbytes)
        self._table = TensorTable(2 * cfg.n_layer)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        addr = self._mem.base  # page-aligned tensors, so pages are charged per tensor
        for i in range(cfg.n_layer):
            for name, out, t, size in (("k", self.k, type_k, sizes[0]),
                                       ("v", self.v, type_v, sizes[1])):
                h = self._table.new(f"cache_{name}_l{i}", t, (cfg.n_embd_kv, self.n_cells))
                point(h, Placement(addr, None, None))
                out.append(h)
                addr += size

    # ---- cells
    def cell(self, seq: int, pos: int) -> int:
        return seq * self.n_ctx + pos

    def cells_charged(self) -> int:
        """Cells' worth of memory written so far, for the plan's stages (which count one slot's
        pages): the positions each slot has written, plus a page of slack for every slot after the
        first, since each slot's last page is charged whole."""
        used = [h for h in self.high if h]
        slack = -(-PAGE // min(self._row_bytes))
        return sum(used) + slack * max(0, len(used) - 1)

    def note_written(self, seq: int, end: int) -> None:
        """Positions up to `end` of slot `seq` are about to be written: pages stay charged once
        written, so the high-water mark never falls (not even when the slot is cleared)."""
        self.high[seq] = max(self.high[seq], end)

    # ---- what each slot holds
    def common_prefix(self, seq: int, ids: list[int]) -> int:
        """How many leading tokens of ids slot `seq` already holds."""
        held, n = self.tokens[seq], 0
        for a, b in zip(held, ids):
            if a != b:
                break
            n += 1
        return n

    def keep(self, seq: int, n: int) -> None:
        """Forget slot `seq`'s tokens from position n on (their cells are simply overwritten)."""
        del self.tokens[seq][n:]

    def close(self) -> None:
        self._table.free()
        self._mem.free()
