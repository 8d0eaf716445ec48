"""The engine's input memory and how a batch is laid out in it (engine.py computes over it).

A batch's tokens are grouped by sequence (`grouped`), each sequence's run is cut into pieces of at
most n_ubatch tokens from its start, as alone (`pieces`), and a micro-batch's layout is one group
per sequence: (seq, n_tokens, n_kv, n_kv_swa). `Inputs` is memory sized once for the largest
micro-batch, written through numpy views: token rows, positions, cache cells, and each group's
mask, the groups' masks one after another (`mask_offsets`).
"""

from __future__ import annotations

import numpy as np

from flexinfer import ggml_ops
from flexinfer.batch import TokenBatch
from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import KQ_MASK_PAD, Buffer
from flexinfer.kv_cache import CacheLayout
from flexinfer.models import moe


def pad(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def starts(layout: tuple):
    """(seq, t0, n_tokens, n_kv, n_kv_swa) per group of a layout, t0 its first token."""
    t0 = 0
    for seq, n, n_kv, n_swa in layout:
        yield seq, t0, n, n_kv, n_swa
        t0 += n


def mask_offsets(layout: tuple) -> list[tuple[int, int]]:
    """Each group's mask and ring mask, in f16 elements from the start of their inputs: the groups'
    (n_kv, T_s padded to KQ_MASK_PAD) masks one after another. At most n_seq * n_ctx * pad(T)
    elements, what Inputs holds (each group's n_kv <= n_ctx and T_s <= T)."""
    out, off, off_swa = [], 0, 0
    for _, n, n_kv, n_swa in layout:
        out.append((off, off_swa))
        off += n_kv * pad(n, KQ_MASK_PAD)
        off_swa += n_swa * pad(n, KQ_MASK_PAD)
    return out


def grouped(batch: TokenBatch) -> tuple[TokenBatch, np.ndarray | None]:
    """The batch with each sequence's tokens together (in order of first appearance, each
    sequence's tokens in their order), and the order that puts its logit rows back in the
    batch's order (None: it was grouped already)."""
    seqs = np.asarray(batch.seqs)
    runs = np.r_[True, seqs[1:] != seqs[:-1]]
    if len(np.unique(seqs)) == int(runs.sum()):
        return batch, None
    first = {s: i for i, s in reversed(list(enumerate(batch.seqs)))}
    idx = sorted(range(len(seqs)), key=lambda i: (first[batch.seqs[i]], i))
    out = TokenBatch(*([getattr(batch, f)[i] for i in idx]
                       for f in ("tokens", "seqs", "pos", "logits")))
    wanted = [i for i in idx if batch.logits[i]]  # original index of each logit row
    return out, np.argsort(wanted)


def pieces(seqs: list[int], U: int):
    """(a, e): each run of one sequence's tokens cut every U tokens from its start."""
    a = 0
    for e in range(1, len(seqs) + 1):
        if e == len(seqs) or seqs[e] != seqs[e - 1] or e - a == U:
            yield a, e
            a = e


class Inputs:
    """Engine-owned input memory, sized once for the largest batch: numpy views write it.
    Sliding-window layers (kv_cache.py's rings, n_cells_swa cells) have rows and a mask of their
    own."""

    @staticmethod
    def sizes(cfg: ModelConfig, n_cells: int, n_cells_swa: int, n_ubatch: int,
              embd_row_bytes: int) -> dict:
        t_pad = pad(n_ubatch, KQ_MASK_PAD)
        return {"x": 4 * cfg.n_embd * n_ubatch, "emb": embd_row_bytes * n_ubatch,
                "pos": 4 * n_ubatch, "rows": 8 * n_ubatch, "idx": 4 * n_ubatch,
                "out": 4 * n_ubatch, "mask": 2 * n_cells * t_pad,
                **({"rows_swa": 8 * n_ubatch, "mask_swa": 2 * n_cells_swa * t_pad}
                   if n_cells_swa else {}),
                **({"xa": 4 * cfg.n_embd * n_ubatch, "ids": 4 * cfg.n_expert_used * n_ubatch}
                   if cfg.n_expert else {}),  # expert streaming: graph A's outputs
                # graph B's parts' (moe.up_part): the normed input, weights, up and gate products
                # (not gpt-oss's, whose graph B is never cut: moe.SPLIT)
                **({"cur": 4 * cfg.n_embd * n_ubatch, "wts": 4 * cfg.n_expert_used * n_ubatch,
                    "up": 4 * cfg.n_ff_exp * cfg.n_expert_used * n_ubatch,
                    "gate": 4 * cfg.n_ff_exp * cfg.n_expert_used * n_ubatch}
                   if cfg.n_expert and cfg.arch not in moe.SPLIT else {})}

    def __init__(self, cfg: ModelConfig, n_cells: int, n_cells_swa: int, n_ubatch: int,
                 embd_row_bytes: int):
        self.n_ubatch, self.n_cells = n_ubatch, n_cells
        sizes = self.sizes(cfg, n_cells, n_cells_swa, n_ubatch, embd_row_bytes)
        self.addr, off = {}, 0
        self._buf = Buffer(sum(pad(s, 64) for s in sizes.values()))
        for k, s in sizes.items():
            self.addr[k] = self._buf.base + off
            off += pad(s, 64)
        self.nbytes = off
        mv = ggml_ops.memview
        self.pos = np.frombuffer(mv(self.addr["pos"], sizes["pos"]), dtype=np.int32)
        self.rows = np.frombuffer(mv(self.addr["rows"], sizes["rows"]), dtype=np.int64)
        self.out = np.frombuffer(mv(self.addr["out"], sizes["out"]), dtype=np.int32)
        self._idx = np.frombuffer(mv(self.addr["idx"], sizes["idx"]), dtype=np.int32)
        self._idx[:] = np.arange(n_ubatch)
        self._mask = mv(self.addr["mask"], sizes["mask"])
        self.n_swa = cfg.n_swa  # sliding-window layers read their own rows and mask (gemma3)
        self._mask_swa = self.rows_swa = None
        if n_cells_swa:
            self._mask_swa = mv(self.addr["mask_swa"], sizes["mask_swa"])
            self.rows_swa = np.frombuffer(mv(self.addr["rows_swa"], sizes["rows_swa"]),
                                          dtype=np.int64)
        self.ids = (np.frombuffer(mv(self.addr["ids"], sizes["ids"]), dtype=np.int32)
                    if cfg.n_expert else None)  # the router's top-K picks, (T, K) row-major
        self.sizes_xa = sizes.get("xa", 0) // 4  # floats of graph A's residual, n_embd a token

    def residual(self, T: int) -> np.ndarray:
        """Graph A's residual of the T tokens (T, n_embd) float32, a view (expert read-ahead)."""
        n = self.sizes_xa // self.n_ubatch
        return np.frombuffer(ggml_ops.memview(self.addr["xa"], 4 * n * T),
                             dtype=np.float32).reshape(T, n)

    def release(self) -> None:
        """Give the pages a prompt batch wrote back to the OS (decode steps write only the first
        rows of each input again); the constant row indices are written anew."""
        ggml_ops.release_pages(self._buf.base, self.nbytes)
        self._idx[:] = np.arange(self.n_ubatch)

    @staticmethod
    def decode_bytes(cfg: ModelConfig, n_cells: int, n_cells_swa: int, n_decode: int,
                     embd_row_bytes: int) -> int:
        """What a decode step of n_decode tokens writes of the inputs, at most: their rows, a page
        more for each of the seven (nine with rings) inputs (they start inside pages), and the
        first page, which holds idx."""
        one = Inputs.sizes(cfg, n_cells, n_cells_swa, n_decode, embd_row_bytes)
        return sum(pad(s, ggml_ops.PAGE) + ggml_ops.PAGE for s in one.values()) + ggml_ops.PAGE

    def set_batch(self, b: TokenBatch, kv: CacheLayout, layout: tuple) -> None:
        """Write positions, cache cells and each group's masks (layout: engine._layout; a group
        is one sequence's tokens, its mask covers its own slot's first n_kv cells): token t sees
        its slot's cell c (position c) when c <= pos_t; ring cell c (sliding layers) when it holds
        a position p with 0 <= pos_t - p < n_swa (llama.cpp: a key is hidden when pos_q - pos_k
        >= n_swa). (The rows whose logits are wanted go to `out` before each head computation.)"""
        T = len(b)
        pos = np.asarray(b.pos, dtype=np.int32)
        self.pos[:T] = pos
        self.rows[:T] = kv.cells(b.seqs, b.pos)
        if self.rows_swa is not None:
            self.rows_swa[:T] = kv.cells_swa(b.seqs, b.pos)
        for (seq, t0, n, n_kv, n_swa), (off, off_swa) in zip(starts(layout),
                                                              mask_offsets(layout)):
            p = pos[t0:t0 + n, None]
            self._write_mask(self._mask, np.arange(n_kv)[None, :] <= p, off)
            if self.rows_swa is not None:
                ring = seq * kv.swa_ctx
                held = kv.swa_positions(b.seqs, b.pos, ring + n_swa)[None, ring:]  # (1, n_swa)
                near = (held >= 0) & (held <= p) & (p - held < self.n_swa)
                self._write_mask(self._mask_swa, near, off_swa)

    @staticmethod
    def _write_mask(mem, visible: np.ndarray, offset: int) -> None:
        """visible (T, n_kv) -> f16 rows of 0 / -inf at element `offset`, the padding rows -inf."""
        (T, n_kv), t_pad = visible.shape, pad(len(visible), KQ_MASK_PAD)
        mask = np.frombuffer(mem, dtype=np.float16, count=t_pad * n_kv,
                             offset=2 * offset).reshape(t_pad, n_kv)
        mask[:T] = np.where(visible, np.float16(0), np.float16(-np.inf))
        mask[T:] = np.float16(-np.inf)

    def close(self) -> None:
        del self.pos, self.rows, self.out, self._mask, self._idx, self._mask_swa, self.rows_swa
        del self.ids
        self._buf.free()
