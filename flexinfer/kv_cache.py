"""The KV cache: per-layer K and V tensors shared by every sequence, in fixed slots of cells.

Sequence s (0 <= s < n_seq) owns cells [s * n_ctx, (s + 1) * n_ctx) and keeps position p in cell
s * n_ctx + p, like llama-server's slots (`-np`). Fixed slots rather than llama.cpp's unified free
list, because:
- a sequence's cells stay in position order, so flash attention visits its keys in the same order as
  when the sequence runs alone (a free list hands out cells out of order once sequences finish and
  give theirs back); the engine also runs attention once per sequence over its own slot, n_kv
  padded as alone (base.Group), so ggml picks the same kernel: a sequence's logits in a batch equal
  its logits alone, bit for bit, wherever the other kernels are batch-invariant;
- nothing fragments, and admission is one question: is a slot free.

The memory is zeroed anonymous memory charged page by page as it is first written
(ggml_ops.LazyMemory): the cache costs the cells in use, not the whole context, and the planner spends
the rest on weights until they are used (planner.py, "Stages"). Cells are F16 like llama.cpp's, or
Q8_0/Q4_0 (`--cache-type-k/-v`): Llama-2-7B's cache at 4096 positions is 2.1 GB in F16, 1.1 GB in
Q8_0, 0.6 GB in Q4_0.

The cache also remembers each slot's tokens, so a prompt that starts with them starts after them
(prefix reuse, `reusable_prefix`).

Sliding-window layers (gemma3's five of six, `base.window`) hold only the window: a ring of
W cells per sequence, where sequence s keeps position p in cell s * W + p % W. A micro-batch of
T <= n_ubatch tokens of one sequence at positions p..p+T-1 is written before its attention reads,
and its queries see positions p - n_swa + 1 .. p + T - 1: n_swa - 1 + T distinct positions, so
W >= n_swa - 1 + n_ubatch keeps them apart; W = n_swa + n_ubatch rounded up to 256, as llama.cpp
sizes its own (`swa_cells`). Gemma 3 4B's shape (34 layers, n_swa 1024) at context 4096 and
n_ubatch 512: the 29 sliding layers hold 1536 cells instead of 4096, and the F16 cache is 254 MiB
instead of 544 MiB (`flexinfer plan`, docs/design.md). Once a ring wraps its cells are not in
position order: the mask says which position each holds (`swa_positions`). A prefix can be reused
only while the rings still hold the window before it (`reusable`): a slot that went on W positions
past it overwrote that, and is recomputed from position 0 (as llama-server does for SWA models).
"""

from __future__ import annotations

import numpy as np

from flexinfer.config import ModelConfig
from flexinfer.errors import FlexInferError
from flexinfer.ggml_ops import PAGE, LazyMemory, Placement, Tensor, TensorTable, point
from flexinfer.gguf_file import GGML_TYPES, row_bytes
from flexinfer.models.base import window

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


SWA_PAD = 256  # ring sizes are whole multiples of this many cells, as llama.cpp pads its own


def swa_cells(cfg: ModelConfig, n_ctx: int, n_ubatch: int | None) -> int:
    """W, the cells per sequence of a sliding layer's ring: n_swa + n_ubatch (see above), rounded
    up to a multiple of SWA_PAD, at most n_ctx (then p % W = p: no ring); 0 when no layer slides.
    n_ubatch None: the whole context. The rounding is llama.cpp's (its SWA cache holds
    GGML_PAD(n_swa + n_ubatch, 256) cells and fills them in turn): keys then sit in llama.cpp's
    order once the ring wraps, and flash attention, which sums V in F16 in cell order, gives its
    bits (an unpadded ring of 48 cells moved a synthetic gemma3's logits by up to 0.08). Real
    gemma3 costs nothing: 1024 + 512 and 512 + 512 are already multiples of 256."""
    if not any(window(cfg, il) for il in range(cfg.n_layer)):
        return 0
    if n_ubatch is None:
        return n_ctx
    return min(n_ctx, -(-(cfg.n_swa + n_ubatch) // SWA_PAD) * SWA_PAD)


def swa_total(cfg: ModelConfig, n_ctx: int, n_seq: int, n_ubatch: int | None) -> int:
    """Ring cells of a sliding layer for n_seq sequences (n_seq * W; a decode step's n_seq tokens
    are a micro-batch too), 0 when no layer slides."""
    return n_seq * swa_cells(cfg, n_ctx, None if n_ubatch is None else max(n_ubatch, n_seq))


def _layer_cells(cfg: ModelConfig, il: int, cells: int, swa: int) -> int:
    """Cells of layer il's tensors once `cells` are written: a sliding layer's stop at its rings'
    `swa` cells (n_seq * W; 0: no rings)."""
    return min(cells, swa) if swa and window(cfg, il) else cells


def kv_bytes(cfg: ModelConfig, n_cells: int, type_k: int = 1, type_v: int = 1,
             swa: int = 0) -> int:
    """Bytes of the whole cache: K and V, every layer, each tensor in whole pages; sliding layers
    hold `swa` cells (n_seq * W). Llama-2-7B with 256 F16 cells: 128 MiB."""
    return kv_charged(cfg, n_cells, type_k, type_v, swa)


def kv_charged(cfg: ModelConfig, cells: int, type_k: int = 1, type_v: int = 1,
               swa: int = 0) -> int:
    """Bytes of memory the cache is charged for once `cells` cells are written (KVCache's
    cells_charged): whole pages of each of the 2 * n_layer tensors, a sliding layer's at most its
    rings' `swa` cells. An upper bound with several slots too: their rings hold at most
    min(cells, swa) cells, and cells_charged counts a page of slack per slot."""
    return sum(_tensor_bytes(cfg, type_k, n) + _tensor_bytes(cfg, type_v, n)
               for n in (_layer_cells(cfg, il, cells, swa) for il in range(cfg.n_layer)))


KV_STAGE_MIN = 64  # cells: the first stage of a growing cache holds at least this many
KV_STAGE_STEP = 4  # each stage holds this many times more cells than the one before


def kv_growth(cfg: ModelConfig, n_cells: int, type_k: int = 1, type_v: int = 1,
              swa: int = 0) -> tuple[tuple[int, int], ...]:
    """(cells, bytes not yet charged) for the stages before the full cache: n_cells/4,
    n_cells/16, ... down to KV_STAGE_MIN cells. Few stages, because every stage boundary inside
    a matrix is one more row block to multiply (a 4x step gives 3 stages at 4096)."""
    out, p = [], n_cells // KV_STAGE_STEP
    full = kv_bytes(cfg, n_cells, type_k, type_v, swa)
    while p >= KV_STAGE_MIN:
        out.append((p, full - kv_charged(cfg, p, type_k, type_v, swa)))
        p //= KV_STAGE_STEP
    return tuple(sorted(out))


class CacheLayout:
    """Where each position lives: cell s * n_ctx + p in a full layer, s * W + p % W in a sliding
    layer's ring (W = swa_ctx; n_cells_swa = n_seq * W cells in all)."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, n_seq: int, n_ubatch: int | None):
        self.n_ctx, self.n_seq = n_ctx, n_seq
        self.n_cells = n_ctx * n_seq
        self.n_swa = cfg.n_swa  # the window, in positions
        self.n_cells_swa = swa_total(cfg, n_ctx, n_seq, n_ubatch)
        self.swa_ctx = self.n_cells_swa // n_seq
        # the largest micro-batch the rings were sized for (engine.py never cuts a larger one)
        ring = 0 < self.swa_ctx < n_ctx
        self.n_ubatch = self.swa_ctx - self.n_swa + 1 if ring else self.n_cells
        self.layer_cells = [self.n_cells_swa if window(cfg, il) else self.n_cells
                            for il in range(cfg.n_layer)]

    def cell(self, seq: int, pos: int) -> int:
        return seq * self.n_ctx + pos

    def cells(self, seqs, pos) -> np.ndarray:
        """(T,) i64: the full layers' cell of each token."""
        return np.asarray(seqs, dtype=np.int64) * self.n_ctx + np.asarray(pos, dtype=np.int64)

    def cells_swa(self, seqs, pos) -> np.ndarray:
        """(T,) i64: the sliding layers' cell of each token, in its sequence's ring."""
        w = self.swa_ctx
        return np.asarray(seqs, dtype=np.int64) * w + np.asarray(pos, dtype=np.int64) % w

    def swa_extent(self, seqs, pos) -> int:
        """Ring cells attention must read for these tokens: up to the end of the highest slot's
        used part (slot s uses min(p + 1, W) cells once position p is written)."""
        w = self.swa_ctx
        s, p = np.asarray(seqs, dtype=np.int64), np.asarray(pos, dtype=np.int64)
        return int((s * w + np.minimum(p + 1, w)).max())

    def swa_positions(self, seqs, pos, n_kv: int) -> np.ndarray:
        """(n_kv,) i64: the position each of the first n_kv ring cells holds once these tokens
        are written, -1 for none: in slot s, the highest p <= hi_s (s's last position here) with
        p % W = cell % W, since a sequence writes its positions in order. Cells of slots not
        among the tokens get -1 (no token may see them anyway)."""
        w = self.swa_ctx
        hi = np.full(self.n_seq, -1, dtype=np.int64)
        np.maximum.at(hi, np.asarray(seqs, dtype=np.int64), np.asarray(pos, dtype=np.int64))
        c = np.arange(n_kv, dtype=np.int64)
        h = hi[c // w]
        p = h - (h - c % w) % w
        return np.where((h >= 0) & (p >= 0), p, -1)


class KVCache(CacheLayout):
    """K/V tensors per layer, (n_embd_kv, n_seq * n_ctx) cells or a sliding layer's
    (n_embd_kv, n_seq * W), and each slot's tokens."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, n_seq: int = 1, type_k: int = 1,
                 type_v: int = 1, n_ubatch: int | None = None):
        super().__init__(cfg, n_ctx, n_seq, n_ubatch)
        self.type_k, self.type_v = type_k, type_v
        self.tokens: list[list[int]] = [[] for _ in range(n_seq)]  # what each slot holds
        self.high = [0] * n_seq  # positions each slot has ever written (its charged pages)
        # positions window_from[s].. of slot s are all still in their ring cells (0 without rings)
        self.window_from = [0] * n_seq
        self._row_bytes = [row_bytes(type_k, cfg.n_embd_kv), row_bytes(type_v, cfg.n_embd_kv)]
        sizes = [(_tensor_bytes(cfg, type_k, n), _tensor_bytes(cfg, type_v, n))
                 for n in self.layer_cells]
        self.nbytes = sum(map(sum, sizes))
        self._mem = LazyMemory(self.nbytes)
        self._table = TensorTable(2 * cfg.n_layer)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        addr = self._mem.base  # page-aligned tensors, so pages are charged per tensor
        for i, n in enumerate(self.layer_cells):
            for name, out, t, size in (("k", self.k, type_k, sizes[i][0]),
                                       ("v", self.v, type_v, sizes[i][1])):
                h = self._table.new(f"cache_{name}_l{i}", t, (cfg.n_embd_kv, n))
                point(h, Placement(addr, None, None))
                out.append(h)
                addr += size

    # ---- charged memory
    def cells_charged(self) -> int:
        """Cells' worth of memory written so far, for the plan's stages (which count one slot's
        pages, kv_charged): the positions each slot has written, plus a page of slack for every
        slot after the first, since each slot's last page is charged whole."""
        used = [h for h in self.high if h]
        slack = -(-PAGE // min(self._row_bytes))
        return sum(used) + slack * max(0, len(used) - 1)

    def note_written(self, seq: int, end: int) -> None:
        """Positions up to `end` of slot `seq` are about to be written: pages stay charged once
        written, so the high-water mark never falls (not even when the slot is cleared). In the
        rings, position end - 1 overwrites end - 1 - W and everything before it is gone."""
        self.high[seq] = max(self.high[seq], end)
        if self.swa_ctx:
            self.window_from[seq] = max(self.window_from[seq], end - self.swa_ctx)

    # ---- what each slot holds
    def common_prefix(self, seq: int, ids: list[int]) -> int:
        """How many leading tokens of ids slot `seq` already holds."""
        held, n = self.tokens[seq], 0
        for a, b in zip(held, ids):
            if a != b:
                break
            n += 1
        return n

    def reusable(self, seq: int, n: int) -> bool:
        """Can slot `seq` go on after its first n tokens? Always in full layers; in the rings
        only while they still hold the n_swa - 1 positions before n, which the next token sees
        (a slot that went on W or more positions past n - n_swa + 1 overwrote them)."""
        return n == 0 or self.window_from[seq] <= max(0, n - self.n_swa + 1)

    def reusable_prefix(self, seq: int, ids: list[int]) -> int:
        """How many leading tokens of ids to keep in slot `seq`: those it holds, but not the last
        of ids (its logits are wanted), and none when the rings no longer hold them."""
        n = min(self.common_prefix(seq, ids), len(ids) - 1)
        return n if self.reusable(seq, n) else 0

    def keep(self, seq: int, n: int) -> int:
        """Forget slot `seq`'s tokens from position n on (their cells are simply overwritten), or
        all of them when the rings cannot go on after n (reusable); returns the tokens kept."""
        if not self.reusable(seq, n):
            n = 0
        if n == 0:
            self.window_from[seq] = 0
        del self.tokens[seq][n:]
        return n

    def close(self) -> None:
        self._table.free()
        self._mem.free()
