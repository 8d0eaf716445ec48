"""step(batch) -> logits: for each layer get, compute, release, for every token of the batch at once,
whatever sequence it belongs to (batch.py; the cache's slots: kv_cache.py).

Graphs are built once per (batch size, KV bucket, logit rows) and kept: a decode step rebuilds
nothing, it only rewrites the inputs (token rows, positions, cache cells, the per-sequence mask, the
rows whose logits are wanted) in engine-owned memory and runs one cached graph per layer. Streaming re-points weight headers at slots; the graphs hold the headers, so they stay
valid. Every layer graph ends by writing the new residual stream back into the same x buffer.

The layer-at-a-time structure is the same whether weights are resident or streamed, so a streamed run
executes exactly the ops of a resident one: its logits are identical, bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from flexinfer import ggml_ops
from flexinfer.config import ModelConfig
from flexinfer.ggml_ops import (KQ_MASK_PAD, TYPE_F16, TYPE_F32, TYPE_I32, TYPE_I64, Allocator,
                                Backend, Buffer, Ops, Tensor, TensorTable)
from flexinfer.gguf_file import row_bytes
from flexinfer.batch import TokenBatch
from flexinfer.kv_cache import CacheLayout, KVCache
from flexinfer.models.base import Batch, layer_weights
from flexinfer.models import moe

KV_BUCKET = 256  # attention reads the cache in buckets of this many cells; the mask hides the rest
MAX_LOGIT_ROWS = 64  # logits for every position are computed this many rows at a time
MAX_GRAPH_SETS = 3  # cached (batch size, bucket) graph sets, least recently used dropped first:
# a 30-layer set is ~3 MB and decoding never goes back to a smaller bucket (keeping 8 grew the
# process by 7 MB over 2,000 tokens at context 2048, memory the planner had not counted)


def _pad(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _node_budget(weights: dict, base: int) -> int:
    """Graph nodes for one layer: `base` for the ops, plus a mul_mat and a concat per extra row
    block of a split weight (streamed pieces), with room to spare."""
    extra = sum(len(w) - 1 for w in weights.values() if isinstance(w, tuple))
    return base + 4 * extra


@dataclass
class GraphSet:
    embed: Ops
    layers: list[Ops]
    head: Ops
    logits: Tensor
    n_out: int
    ffn: list = None  # expert streaming: each MoE layer's graph B (moe.ffn_graph), else None

    def free(self) -> None:
        for ops in [self.embed, self.head, *self.layers, *[f for f in self.ffn or () if f]]:
            ops.free()


class Inputs:
    """Engine-owned input memory, sized once for the largest batch: numpy views write it.
    Sliding-window layers (kv_cache.py's rings, n_cells_swa cells) have rows and a mask of their
    own."""

    @staticmethod
    def sizes(cfg: ModelConfig, n_cells: int, n_cells_swa: int, n_ubatch: int,
              embd_row_bytes: int) -> dict:
        pad = _pad(n_ubatch, KQ_MASK_PAD)
        return {"x": 4 * cfg.n_embd * n_ubatch, "emb": embd_row_bytes * n_ubatch,
                "pos": 4 * n_ubatch, "rows": 8 * n_ubatch, "idx": 4 * n_ubatch,
                "out": 4 * n_ubatch, "mask": 2 * n_cells * pad,
                **({"rows_swa": 8 * n_ubatch, "mask_swa": 2 * n_cells_swa * pad}
                   if n_cells_swa else {}),
                **({"xa": 4 * cfg.n_embd * n_ubatch, "ids": 4 * cfg.n_expert_used * n_ubatch}
                   if cfg.n_expert else {})}  # expert streaming: graph A's outputs

    def __init__(self, cfg: ModelConfig, n_cells: int, n_cells_swa: int, n_ubatch: int,
                 embd_row_bytes: int):
        self.n_ubatch, self.n_cells = n_ubatch, n_cells
        sizes = self.sizes(cfg, n_cells, n_cells_swa, n_ubatch, embd_row_bytes)
        self.addr, off = {}, 0
        self._buf = Buffer(sum(_pad(s, 64) for s in sizes.values()))
        for k, s in sizes.items():
            self.addr[k] = self._buf.base + off
            off += _pad(s, 64)
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
        return sum(_pad(s, ggml_ops.PAGE) + ggml_ops.PAGE for s in one.values()) + ggml_ops.PAGE

    def set_batch(self, b: TokenBatch, kv: CacheLayout, n_kv: int, n_kv_swa: int) -> None:
        """Write positions, cache cells and the masks: token t sees full-layer cell c when c is in
        its sequence's slot at a position <= its own; ring cell c (sliding layers) when c is in its
        sequence's ring and holds a position p with 0 <= pos_t - p < n_swa (llama.cpp: a key is
        hidden when pos_q - pos_k >= n_swa). (The rows whose logits are wanted go to `out` before
        each head computation.)"""
        T = len(b)
        pos, seqs = np.asarray(b.pos, dtype=np.int32), np.asarray(b.seqs)
        self.pos[:T] = pos
        self.rows[:T] = kv.cells(b.seqs, b.pos)
        c = np.arange(n_kv)
        visible = (c[None, :] // kv.n_ctx == seqs[:, None]) & (c[None, :] % kv.n_ctx <= pos[:, None])
        self._write_mask(self._mask, visible, n_kv)
        if self.rows_swa is not None:
            self.rows_swa[:T] = kv.cells_swa(b.seqs, b.pos)
            held = kv.swa_positions(b.seqs, b.pos, n_kv_swa)[None, :]  # (1, n_kv_swa)
            ring = np.arange(n_kv_swa) // kv.swa_ctx
            near = (ring[None, :] == seqs[:, None]) & (held >= 0) & (held <= pos[:, None]) & \
                (pos[:, None] - held < self.n_swa)
            self._write_mask(self._mask_swa, near, n_kv_swa)

    @staticmethod
    def _write_mask(mem, visible: np.ndarray, n_kv: int) -> None:
        """visible (T, n_kv) -> f16 rows of 0 / -inf, the padding rows -inf."""
        T, t_pad = len(visible), _pad(len(visible), KQ_MASK_PAD)
        mask = np.frombuffer(mem, dtype=np.float16, count=t_pad * n_kv).reshape(t_pad, n_kv)
        mask[:T] = np.where(visible, np.float16(0), np.float16(-np.inf))
        mask[T:] = np.float16(-np.inf)

    def close(self) -> None:
        del self.pos, self.rows, self.out, self._mask, self._idx, self._mask_swa, self.rows_swa
        del self.ids
        self._buf.free()


class Engine:
    """step(batch) -> logits: one weight pass for every token of the batch, whatever sequences
    they belong to. Steps of at most n_decode tokens (one per running sequence) use the decode
    compute buffer, kept all along; larger ones (prompts) a prompt buffer made for them, whose
    memory resident weight rows lend (the loan, weights.py)."""

    def __init__(self, cfg: ModelConfig, arch, store, kv: KVCache, backend: Backend | None,
                 n_ubatch: int, warm: bool = True, experts=None, split: bool | None = None):
        self.cfg, self.arch, self.store, self.kv, self.backend = cfg, arch, store, kv, backend
        # experts: an ExpertStore (experts.py) owning the *_exps tensors: each MoE layer runs as
        # two graphs split after the router, its picks fetched in between (split; a header-only
        # store sizing graphs splits without one)
        self.experts = experts
        self.split = (experts is not None) if split is None else split
        self.n_decode = max(1, kv.n_seq)  # a decode step: one token per sequence
        # never more than the sliding layers' rings were sized for (kv_cache.swa_cells)
        self.n_ubatch = max(min(n_ubatch, kv.n_cells, kv.n_ubatch), self.n_decode)
        self.inputs = Inputs(cfg, kv.n_cells, kv.n_cells_swa, self.n_ubatch, store.embd_row_bytes)
        self._sets: OrderedDict[tuple[int, int, int, int], GraphSet] = OrderedDict()
        self._max_sets = MAX_GRAPH_SETS + self.n_decode - 1  # a decode set for each width
        self.alloc, self._prompt_alloc = Allocator(), None
        self._reserve()
        if warm:
            self._graphs(1, min(kv.n_cells, KV_BUCKET), min(kv.n_cells_swa, KV_BUCKET), 1)
            # the decode graphs, built before timing

    def _reserve(self) -> None:
        """Two compute buffers, each sized once for its largest graphs so that cached graphs never
        move: a decode step's (n_decode tokens), kept, and a prompt batch's, made when a batch
        comes and freed before decoding goes on (end_prompt). The 7B's are 0.5 MB and 25 MB
        (128 tokens): decoding does not hold the larger one, and the planner lends it resident
        weight rows (planner.py). compute_bytes is what stays (the decode buffer, the CPU
        backend's work buffer, which grows to the largest batch's and stays, and what decoding
        writes of the inputs); prompt_bytes is what a prompt batch adds (its buffer, and the rest
        of the inputs)."""
        n_cells, n_swa, work = self.kv.n_cells, self.kv.n_cells_swa, 0
        threads = self.backend.n_threads if self.backend else 1
        self.prompt_bytes = 0
        for T in sorted({self.n_decode, self.n_ubatch}):
            worst = self._build(T, n_cells, n_swa, min(T, MAX_LOGIT_ROWS), alloc=False)
            alloc = self.alloc if T <= self.n_decode else Allocator()
            for ops in (worst.layers[0], worst.head, *[f for f in worst.ffn[:1] if f]):
                alloc.reserve(ops)
                work = max(work, ops.work_size(threads))
            if T > self.n_decode:
                self.prompt_bytes = alloc.size()
                alloc.free()  # reserved only to be measured: nothing was written to it
            worst.free()
        decode_inputs = min(self.inputs.nbytes, Inputs.decode_bytes(
            self.cfg, n_cells, n_swa, self.n_decode, self.store.embd_row_bytes))
        self.compute_bytes = self.alloc.size() + work + decode_inputs
        if self.prompt_bytes:
            self.prompt_bytes += self.inputs.nbytes - decode_inputs
        else:  # no prompt batches: decoding is all there is
            self.compute_bytes += self.inputs.nbytes - decode_inputs

    def _view(self) -> tuple[int, list[dict]]:
        """(id, weights by layer) for what is resident now: a run of resident row blocks is one
        header (WeightStore.view); a store of headers only has one view."""
        residency = getattr(self.store, "residency", None)
        return residency.view() if residency is not None else (-1, self.store.layers)

    def _build(self, T: int, n_kv: int, n_kv_swa: int, n_out: int,
               alloc: bool = True, weights: list[dict] | None = None) -> GraphSet:
        """The graphs of a batch shape on `weights` (by layer; default every block apart, the
        most nodes and intermediates: what buffers are reserved for)."""
        cfg, a = self.cfg, self.inputs.addr
        weights = self.store.layers if weights is None else weights
        layers, ffns = [], []
        for il in range(cfg.n_layer):
            ops = Ops(_node_budget(self.store.layers[il], 96 + moe.graph_nodes(cfg)))
            pos = ops.input(TYPE_I32, (T,), a["pos"])
            swa = None if not self.kv.n_cells_swa else Batch(  # the rings' cells (kv_cache.py)
                T, n_kv_swa, pos, ops.input(TYPE_I64, (T,), a["rows_swa"]),
                ops.input(TYPE_F16, (n_kv_swa, _pad(T, KQ_MASK_PAD)), a["mask_swa"]))
            batch = Batch(T, n_kv, pos, ops.input(TYPE_I64, (T,), a["rows"]),
                          ops.input(TYPE_F16, (n_kv, _pad(T, KQ_MASK_PAD)), a["mask"]), swa)
            x = ops.input(TYPE_F32, (cfg.n_embd, T), a["x"])
            w = layer_weights(weights, il)
            if self.split:
                ffns.append(self._split_layer(ops, il, w, x, batch))
            else:
                out = self.arch.build_layer(ops, cfg, il, w, x, batch, self.kv.k[il],
                                            self.kv.v[il])
                ops.output(ops.cpy(out, x))
                ffns.append(None)
            layers.append(ops)
            if not alloc:
                break
        embed, head, logits = self._embed_graph(T), *self._head_graph(T, n_out, weights)
        if alloc:
            for ops in (embed, *layers, *[f for f in ffns if f], head):
                (self.alloc if T <= self.n_decode else self._prompt_alloc).alloc(ops)
        return GraphSet(embed, layers, head, logits, n_out, ffns)

    def _split_layer(self, ops: Ops, il: int, w: dict, x: Tensor, batch: Batch) -> Ops:
        """Expert streaming: `ops` becomes layer il's graph A (attention and router, moe.attn_graph)
        and the returned Ops its graph B (the experts, moe.ffn_graph), with the expert store's
        headers for the *_exps tensors."""
        cfg, a, T = self.cfg, self.inputs.addr, batch.n_tokens
        if self.experts is not None:
            w = {**w, **self.experts.layers[il]}
        xa = ops.input(TYPE_F32, (cfg.n_embd, T), a["xa"])
        ids = ops.input(TYPE_I32, (cfg.n_expert_used, T), a["ids"])
        moe.attn_graph(ops, self.arch, cfg, w, x, batch, self.kv.k[il], self.kv.v[il], xa, ids,
                       il=il)
        ffn = Ops(_node_budget(self.store.layers[il], 48 + moe.graph_nodes(cfg)))
        moe.ffn_graph(ffn, cfg, w, ffn.input(TYPE_F32, (cfg.n_embd, T), a["xa"]),
                      ffn.input(TYPE_F32, (cfg.n_embd, T), a["x"]))
        return ffn

    def _embed_graph(self, T: int) -> Ops:
        ops, a = Ops(16), self.inputs.addr
        rows = ops.input(self.store.embd_type, (self.cfg.n_embd, T), a["emb"])
        idx = ops.input(TYPE_I32, (T,), a["idx"])
        x = ops.input(TYPE_F32, (self.cfg.n_embd, T), a["x"])
        ops.output(ops.cpy(ops.get_rows(rows, idx), x))
        return ops

    def _head_graph(self, T: int, n_out: int, weights: list[dict]) -> tuple[Ops, Tensor]:
        """The head over the n_out rows of x the batch wants logits for (inputs["out"])."""
        ops, e, a = Ops(_node_budget(self.store.layers[self.cfg.n_layer], 32)), self.cfg.n_embd, \
            self.inputs.addr
        x = ops.input(TYPE_F32, (e, T), a["x"])
        if n_out < T:
            x = ops.get_rows(x, ops.input(TYPE_I32, (n_out,), a["out"]))
        logits = self.arch.build_head(ops, self.cfg, weights[self.cfg.n_layer], x)
        return ops, ops.output(logits)

    def _graphs(self, T: int, n_kv: int, n_kv_swa: int, n_out: int) -> GraphSet:
        view, weights = self._view()
        key = (T, n_kv, n_kv_swa, n_out, view)
        gs = self._sets.get(key)
        if gs is not None:
            self._sets.move_to_end(key)
            return gs
        while len(self._sets) >= self._max_sets:
            self._sets.popitem(last=False)[1].free()
        if T > self.n_decode and self._prompt_alloc is None:
            self._prompt_alloc = Allocator()
            worst = self._build(self.n_ubatch, self.kv.n_cells, self.kv.n_cells_swa,
                                min(self.n_ubatch, MAX_LOGIT_ROWS), alloc=False)
            for ops in (worst.layers[0], worst.head, *[f for f in worst.ffn[:1] if f]):
                self._prompt_alloc.reserve(ops)
            worst.free()
        gs = self._sets[key] = self._build(T, n_kv, n_kv_swa, n_out, weights=weights)
        return gs

    def end_prompt(self) -> None:
        """Free the prompt buffer and its graphs, then let the store read its loan back."""
        if self._prompt_alloc is not None:
            for key in [k for k in self._sets if k[0] > self.n_decode]:
                self._sets.pop(key).free()
            self._prompt_alloc.free()
            self._prompt_alloc = None
            self.inputs.release()
        self.store.residency.end_prompt()

    def step(self, batch: TokenBatch, more_prompt: bool = False) -> np.ndarray:
        """Run the batch's tokens through the model, writing their K/V to their cells; returns the
        float32 logits of the tokens that want them, in batch order: (n_logits, n_vocab).
        A batch of more than n_decode tokens is a prompt step: the loan goes before it and comes
        back after it, unless more_prompt says another prompt step follows at once."""
        for seq, pos in zip(batch.seqs, batch.pos):
            self.kv.note_written(seq, pos + 1)
        self.store.residency.prepare(self.kv.cells_charged())  # a later stage, if the cache grows into it
        prompt = len(batch) > self.n_decode
        if prompt:
            self.store.residency.begin_prompt()  # the loan goes before the prompt buffer comes
        else:
            self.end_prompt()  # after a prompt step: decoding needs the loan back
        out = [self._forward_chunk(chunk) for chunk in self._chunks(batch)]
        if prompt and not more_prompt:  # the buffer goes before the loan comes back, in the
            self.end_prompt()  # prompt's time
        self.store.residency.end_step()  # blocks grown through the ring this step: resident now
        out = [o for o in out if o is not None]
        if not out:
            return np.zeros((0, self.cfg.n_vocab), dtype=np.float32)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _chunks(self, batch: TokenBatch):
        """Pieces of at most n_ubatch tokens: llama.cpp's micro-batches. Each piece runs through
        the layers whole, however many logit rows it wants (they come out MAX_LOGIT_ROWS at a
        time), so a prompt's attention runs over the same batch shapes as llama.cpp's (a short
        last piece takes ggml's untiled flash attention, which rounds differently)."""
        for i in range(0, len(batch), self.n_ubatch):
            yield batch.slice(i, i + self.n_ubatch)

    def _forward_chunk(self, b: TokenBatch) -> np.ndarray | None:
        T, kv = len(b), self.kv
        n_kv = min(kv.n_cells, _pad(int(kv.cells(b.seqs, b.pos).max()) + 1, KV_BUCKET))
        n_kv_swa = kv.n_cells_swa and min(kv.n_cells_swa,
                                          _pad(kv.swa_extent(b.seqs, b.pos), KV_BUCKET))
        wanted = np.flatnonzero(b.logits)
        gs = self._graphs(T, n_kv, n_kv_swa, min(max(len(wanted), 1), MAX_LOGIT_ROWS))
        self.store.embed_rows(b.tokens, self.inputs.addr["emb"])
        self.inputs.set_batch(b, kv, n_kv, n_kv_swa)
        self.backend.compute(gs.embed.graph)
        out = []
        try:
            for il, ops in enumerate(gs.layers):
                self.store.get(il)
                self.backend.compute(ops.graph)
                if gs.ffn[il] is not None:  # expert streaming: read the picked experts, then B
                    self.experts.fetch(il, self.inputs.ids[:T * self.cfg.n_expert_used])
                    self.experts.prefetch(il + 1, self.inputs.residual(T))  # read-ahead
                    self.backend.compute(gs.ffn[il].graph)
                self.store.release(il)
            self.store.get(self.cfg.n_layer)  # even when unused: the prefetch order includes it
            for i in range(0, len(wanted), gs.n_out):  # the head, n_out rows at a time
                rows = wanted[i:i + gs.n_out]
                self.inputs.out[:gs.n_out] = np.pad(rows, (0, gs.n_out - len(rows)), mode="edge")
                self.backend.compute(gs.head.graph)
                out.append(ggml_ops.as_numpy(gs.logits, (gs.n_out, self.cfg.n_vocab))[:len(rows)])
            self.store.release(self.cfg.n_layer)
        except BaseException:
            self.store.reset()  # the prefetcher restarts at layer 0 for the next forward pass
            raise
        if not out:
            return None
        return np.concatenate(out) if len(out) > 1 else out[0]

    def close(self) -> None:
        for gs in self._sets.values():
            gs.free()
        self._sets.clear()
        self.alloc.free()
        if self._prompt_alloc is not None:
            self._prompt_alloc.free()
        self.inputs.close()


class _HeaderStore:
    """Weight headers with the file's types and shapes and a placeholder data address: enough for
    the allocator to size graphs (it never reads weights), without a byte of weight memory."""

    def __init__(self, g, cfg: ModelConfig, specs, n_layer_graphs: int = 1):
        self._table = TensorTable(len(specs) + 4)
        self.layers: list[dict] = [{} for _ in range(cfg.n_layer + 1)]
        for s in specs:
            layer = cfg.n_layer if s.layer is None else s.layer
            if s.role == "embd" or layer >= n_layer_graphs and layer != cfg.n_layer:
                continue
            info = g.tensors[s.name]
            key = s.name.split(".", 2)[-1] if s.name.startswith("blk.") else s.name
            self.layers[layer][key] = self._header(info)
        embd = g.tensors["token_embd.weight"]
        self.layers[cfg.n_layer].setdefault("output.weight", self._header(embd))
        self.embd_type, self.embd_row_bytes = embd.type, row_bytes(embd.type, embd.shape[0])

    def _header(self, info):
        t = self._table.new(info.name, info.type, info.shape)
        ggml_ops.point(t, ggml_ops.Placement(_PLACEHOLDER, None, None))
        return t

    def close(self) -> None:
        self._table.free()


_PLACEHOLDER = 1 << 12  # never dereferenced: the allocator skips tensors that have data


class _HeaderKV(CacheLayout):
    """Cache headers of the real types and shapes (full layers', rings') over a placeholder
    address."""

    def __init__(self, cfg: ModelConfig, n_ctx: int, n_seq: int, type_k: int, type_v: int,
                 n_ubatch: int):
        super().__init__(cfg, n_ctx, n_seq, n_ubatch)
        self._table = TensorTable(4)
        heads = {}
        for n in set(self.layer_cells):
            heads[n] = [self._table.new(name, t, (cfg.n_embd_kv, n))
                        for name, t in (("k", type_k), ("v", type_v))]
            for t in heads[n]:
                ggml_ops.point(t, ggml_ops.Placement(_PLACEHOLDER, None, None))
        self.k = [heads[n][0] for n in self.layer_cells]
        self.v = [heads[n][1] for n in self.layer_cells]

    def close(self) -> None:
        self._table.free()


def measure_compute_bytes(g, cfg: ModelConfig, arch, specs, n_ctx: int, n_ubatch: int,
                          n_threads: int, n_seq: int = 1, type_k: int = TYPE_F16,
                          type_v: int = TYPE_F16, split: bool = False) -> tuple[int, int]:
    """(bytes the engine keeps for computing, bytes a prompt batch takes on top while it runs),
    measured on header-only weights, so the planner subtracts the real figures before any weight
    loads (the 7B at context 256 and 128-token batches: 3 MB and 25 MB)."""
    store = _HeaderStore(g, cfg, specs)
    kv = _HeaderKV(cfg, n_ctx, n_seq, type_k, type_v, n_ubatch)
    try:  # no backend is created: the engine only reads its thread count to size the work buffer
        eng = Engine(cfg, arch, store, kv, SimpleNamespace(n_threads=n_threads), n_ubatch,
                     warm=False, split=split)
        sizes = eng.compute_bytes, eng.prompt_bytes
        eng.close()
        return sizes
    finally:
        store.close()
        kv.close()
