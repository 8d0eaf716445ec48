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
from flexinfer.engine_inputs import Inputs, grouped, mask_offsets, pad as _pad, pieces, starts
from flexinfer.ggml_ops import (KQ_MASK_PAD, TYPE_F16, TYPE_F32, TYPE_I32, TYPE_I64, Allocator,
                                Backend, Ops, Tensor, TensorTable)
from flexinfer.gguf_file import row_bytes
from flexinfer.batch import TokenBatch
from flexinfer.kv_cache import CacheLayout, KVCache
from flexinfer.models.base import Batch, Group, layer_weights
from flexinfer.models import moe

KV_BUCKET = 256  # attention reads the cache in buckets of this many cells; the mask hides the rest
MAX_LOGIT_ROWS = 64  # logits for every position are computed this many rows at a time
MAX_GRAPH_SETS = 3  # cached (batch size, bucket) graph sets, least recently used dropped first:
# a 30-layer set is ~3 MB and decoding never goes back to a smaller bucket (keeping 8 grew the
# process by 7 MB over 2,000 tokens at context 2048, memory the planner had not counted)


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
    parts: list = None  # ... and B in three parts (moe.up_part ...), or None (gpt-oss)

    def free(self) -> None:
        for ops in [self.embed, self.head, *self.layers, *_ffn_graphs(self.ffn, self.parts)]:
            ops.free()


def _ffn_graphs(ffn, parts) -> list:
    """Every graph B and part of B there is."""
    return [f for f in ffn or () if f] + [p for ps in parts or () if ps for p in ps]


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
        # a micro-batch: one sequence's piece of n_ubatch prompt tokens and a token of each other
        # sequence, so a prompt cut as alone goes on beside the others' decoding (scheduler.py)
        self.n_batch = self.n_ubatch + self.n_decode - 1
        self.inputs = Inputs(cfg, kv.n_cells, kv.n_cells_swa, self.n_batch, store.embd_row_bytes)
        self._sets: OrderedDict[tuple[int, tuple, int], GraphSet] = OrderedDict()
        self._max_sets = MAX_GRAPH_SETS + self.n_decode - 1  # a decode set for each width
        self.alloc, self._prompt_alloc = Allocator(), None
        self._reserve()
        if warm:
            self._graphs(1, ((0, 1, min(kv.n_ctx, KV_BUCKET), min(kv.swa_ctx, KV_BUCKET)),), 1)
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
        for T in sorted({self.n_decode, self.n_batch}):
            alloc = self.alloc if T <= self.n_decode else Allocator()
            for layout in self._worst(T):
                worst = self._build(T, layout, min(T, MAX_LOGIT_ROWS), alloc=False)
                for ops in (worst.layers[0], worst.head,
                            *_ffn_graphs(worst.ffn[:1], worst.parts[:1])):
                    alloc.reserve(ops)
                    work = max(work, ops.work_size(threads))
                worst.free()
            if T > self.n_decode:
                self.prompt_bytes = alloc.size()
                alloc.free()  # reserved only to be measured: nothing was written to it
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

    def _worst(self, T: int) -> list[tuple]:
        """The layouts whose graphs need the most memory for T tokens, reserved before any graph
        is placed: one sequence reading a whole slot, and T tokens of min(T, n_seq) sequences
        each reading a whole slot (one attention and its output per sequence, and the concats)."""
        kv = self.kv
        out = [((0, T, kv.n_ctx, kv.swa_ctx),)]
        g = min(T, kv.n_seq)
        if g > 1:
            out.append(tuple((s, T // g + (s < T % g), kv.n_ctx, kv.swa_ctx) for s in range(g)))
        return out

    def _layout(self, b: TokenBatch) -> tuple:
        """(seq, n_tokens, n_kv, n_kv_swa) for each run of one sequence's tokens, in batch order
        (step groups a batch so each sequence has one run): n_kv what the sequence alone would
        read, its slot's cells up to its highest position here padded to KV_BUCKET, at most
        n_ctx; n_kv_swa its ring's cells likewise, at most W."""
        kv, seqs, pos = self.kv, np.asarray(b.seqs), np.asarray(b.pos)
        starts = np.flatnonzero(np.r_[True, seqs[1:] != seqs[:-1]])
        out = []
        for a, e in zip(starts, np.r_[starts[1:], len(seqs)]):
            top = int(pos[a:e].max()) + 1
            n_swa = kv.swa_ctx and min(kv.swa_ctx, _pad(min(top, kv.swa_ctx), KV_BUCKET))
            out.append((int(seqs[a]), int(e - a), min(kv.n_ctx, _pad(top, KV_BUCKET)), n_swa))
        return tuple(out)

    def _batch(self, ops: Ops, T: int, layout: tuple) -> Batch:
        """The layer graph's batch inputs: one Group per sequence, its mask at its offset."""
        a, kv, swa = self.inputs.addr, self.kv, self.kv.n_cells_swa
        pos = ops.input(TYPE_I32, (T,), a["pos"])
        groups, rings = [], []
        for (seq, t0, n, n_kv, n_swa), (off, off_swa) in zip(starts(layout),
                                                              mask_offsets(layout)):
            tp = _pad(n, KQ_MASK_PAD)
            groups.append(Group(t0, n, kv.cell(seq, 0), n_kv,
                                ops.input(TYPE_F16, (n_kv, tp), a["mask"] + 2 * off)))
            if swa:
                rings.append(Group(t0, n, seq * kv.swa_ctx, n_swa, ops.input(
                    TYPE_F16, (n_swa, tp), a["mask_swa"] + 2 * off_swa)))
        ring = None if not swa else Batch(  # the rings' cells (kv_cache.py)
            T, pos, ops.input(TYPE_I64, (T,), a["rows_swa"]), tuple(rings))
        return Batch(T, pos, ops.input(TYPE_I64, (T,), a["rows"]), tuple(groups), ring)

    def _build(self, T: int, layout: tuple, n_out: int, alloc: bool = True,
               weights: list[dict] | None = None) -> GraphSet:
        """The graphs of a batch shape on `weights` (by layer; default every block apart, the
        most nodes and intermediates: what buffers are reserved for)."""
        cfg, a = self.cfg, self.inputs.addr
        weights = self.store.layers if weights is None else weights
        layers, ffns, parts = [], [], []
        for il in range(cfg.n_layer):
            ops = Ops(_node_budget(self.store.layers[il], 96 + moe.graph_nodes(cfg))
                      + 12 * len(layout))  # views, attention and a concat per sequence
            batch = self._batch(ops, T, layout)
            x = ops.input(TYPE_F32, (cfg.n_embd, T), a["x"])
            w = layer_weights(weights, il)
            if self.split:
                if self.experts is not None:  # the store's headers for the *_exps tensors
                    w = {**w, **self.experts.layers[il]}
                ffns.append(self._split_layer(ops, il, w, x, batch))
                parts.append(self._ffn_parts(il, w, T))
            else:
                out = self.arch.build_layer(ops, cfg, il, w, x, batch, self.kv.k[il],
                                            self.kv.v[il])
                ops.output(ops.cpy(out, x))
                ffns.append(None)
                parts.append(None)
            layers.append(ops)
            if not alloc:
                break
        embed, head, logits = self._embed_graph(T), *self._head_graph(T, n_out, weights)
        if alloc:
            for ops in (embed, *layers, *_ffn_graphs(ffns, parts), head):
                (self.alloc if T <= self.n_decode else self._prompt_alloc).alloc(ops)
        return GraphSet(embed, layers, head, logits, n_out, ffns, parts)

    def _split_layer(self, ops: Ops, il: int, w: dict, x: Tensor, batch: Batch) -> Ops:
        """Expert streaming: `ops` becomes layer il's graph A (attention and router, moe.attn_graph)
        and the returned Ops its graph B (the experts, moe.ffn_graph)."""
        cfg, a, T = self.cfg, self.inputs.addr, batch.n_tokens
        xa = ops.input(TYPE_F32, (cfg.n_embd, T), a["xa"])
        ids = ops.input(TYPE_I32, (cfg.n_expert_used, T), a["ids"])
        moe.attn_graph(ops, self.arch, cfg, w, x, batch, self.kv.k[il], self.kv.v[il], xa, ids,
                       il=il)
        ffn = Ops(_node_budget(self.store.layers[il], 48 + moe.graph_nodes(cfg)))
        moe.ffn_graph(ffn, cfg, w, ffn.input(TYPE_F32, (cfg.n_embd, T), a["xa"]),
                      ffn.input(TYPE_F32, (cfg.n_embd, T), a["x"]))
        return ffn

    def _ffn_parts(self, il: int, w: dict, T: int) -> tuple[Ops, Ops, Ops] | None:
        """Layer il's graph B in three parts (moe.up_part, gate_part, down_part), run while the
        step's missing experts are read tensor by tensor; None for an arch with graphs of its
        own (gpt-oss)."""
        cfg, a = self.cfg, self.inputs.addr
        if cfg.arch in moe.SPLIT:
            return None
        e, k, ff = cfg.n_embd, cfg.n_expert_used, cfg.n_ff_exp
        nodes = self.store.layers[il]  # streamed row blocks of the router and shared expert
        up, gate = Ops(_node_budget(nodes, 40)), Ops(16)
        down = Ops(_node_budget(nodes, 40 + 2 * k))

        def get(ops: Ops, name: str, t: int, shape: tuple) -> Tensor:
            return ops.input(t, shape, a[name])
        moe.up_part(up, cfg, w, get(up, "xa", TYPE_F32, (e, T)), get(up, "ids", TYPE_I32, (k, T)),
                    get(up, "cur", TYPE_F32, (e, T)), get(up, "wts", TYPE_F32, (1, k, T)),
                    get(up, "up", TYPE_F32, (ff, k, T)))
        moe.gate_part(gate, cfg, w, get(gate, "cur", TYPE_F32, (e, T)),
                      get(gate, "ids", TYPE_I32, (k, T)), get(gate, "gate", TYPE_F32, (ff, k, T)))
        moe.down_part(down, cfg, w, get(down, "xa", TYPE_F32, (e, T)),
                      get(down, "cur", TYPE_F32, (e, T)), get(down, "ids", TYPE_I32, (k, T)),
                      get(down, "wts", TYPE_F32, (1, k, T)), get(down, "up", TYPE_F32, (ff, k, T)),
                      get(down, "gate", TYPE_F32, (ff, k, T)), get(down, "x", TYPE_F32, (e, T)))
        return up, gate, down

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

    def _graphs(self, T: int, layout: tuple, n_out: int) -> GraphSet:
        view, weights = self._view()
        key = (T, layout, n_out, view)
        gs = self._sets.get(key)
        if gs is not None:
            self._sets.move_to_end(key)
            return gs
        while len(self._sets) >= self._max_sets:
            self._sets.popitem(last=False)[1].free()
        if T > self.n_decode and self._prompt_alloc is None:
            self._prompt_alloc = Allocator()
            for worst_layout in self._worst(self.n_batch):
                worst = self._build(self.n_batch, worst_layout,
                                    min(self.n_batch, MAX_LOGIT_ROWS), alloc=False)
                for ops in (worst.layers[0], worst.head,
                            *_ffn_graphs(worst.ffn[:1], worst.parts[:1])):
                    self._prompt_alloc.reserve(ops)
                worst.free()
        alloc = self.alloc if T <= self.n_decode else self._prompt_alloc
        size = alloc.size()
        gs = self._build(T, layout, n_out, weights=weights)
        while alloc.size() != size:  # the buffer moved (a graph the worst case did not cover):
            # ggml freed the old one, where every cached set of this kind and this set's graphs
            # placed before the move (the embed graph first) still point, so all are rebuilt
            for k in [k for k in self._sets if (k[0] <= self.n_decode) == (T <= self.n_decode)]:
                self._sets.pop(k).free()
            gs.free()
            size = alloc.size()  # now fits each of the set's graphs: the rebuild does not move it
            gs = self._build(T, layout, n_out, weights=weights)
        self._sets[key] = gs
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
        batch, order = grouped(batch)
        out = [self._forward_chunk(chunk) for chunk in self._chunks(batch)]
        if prompt and not more_prompt:  # the buffer goes before the loan comes back, in the
            self.end_prompt()  # prompt's time
        self.store.residency.end_step()  # blocks grown through the ring this step: resident now
        out = [o for o in out if o is not None]
        if not out:
            return np.zeros((0, self.cfg.n_vocab), dtype=np.float32)
        out = np.concatenate(out) if len(out) > 1 else out[0]
        return out if order is None else out[order]

    def _chunks(self, batch: TokenBatch):
        """Micro-batches of at most n_batch tokens, cut as each sequence's tokens would be cut
        alone (llama.cpp's micro-batches): a sequence's run is cut every n_ubatch tokens from its
        start, and the pieces are packed whole, in order. Each piece runs through the layers
        whole, however many logit rows it wants (they come out MAX_LOGIT_ROWS at a time), so a
        prompt's attention runs over the same batch shapes as llama.cpp's (a piece shorter than
        64 tokens takes ggml's untiled flash attention, which rounds differently)."""
        start = 0
        for a, e in pieces(batch.seqs, self.n_ubatch):
            if e - start > self.n_batch:  # the piece does not fit: a new micro-batch
                yield batch.slice(start, a)
                start = a
        yield batch.slice(start, len(batch))

    def _forward_chunk(self, b: TokenBatch) -> np.ndarray | None:
        T, layout = len(b), self._layout(b)
        wanted = np.flatnonzero(b.logits)
        gs = self._graphs(T, layout, min(max(len(wanted), 1), MAX_LOGIT_ROWS))
        self.store.embed_rows(b.tokens, self.inputs.addr["emb"])
        self.inputs.set_batch(b, self.kv, layout)
        self.backend.compute(gs.embed.graph)
        out = []
        try:
            for il, ops in enumerate(gs.layers):
                self.store.get(il)
                self.backend.compute(ops.graph)
                if gs.ffn[il] is not None:  # expert streaming: read the picked experts, then B
                    self._experts_step(gs, il, T)
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
            if self.experts is not None:
                self.experts.abandon()
            raise
        if not out:
            return None
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _experts_step(self, gs: GraphSet, il: int, T: int) -> None:
        """Graph B of MoE layer il: with every pick cached, at once; with misses, in three parts,
        each once its tensor's slabs are read, the next tensor's being read meanwhile."""
        ids = self.inputs.ids[:T * self.cfg.n_expert_used]
        parts = gs.parts[il]
        if parts is None:
            self.experts.fetch(il, ids)
        elif self.experts.begin(il, ids):
            for ops, kind in zip(parts, moe.PART_TENSORS):
                self.experts.wait(kind)
                self.backend.compute(ops.graph)
            self.experts.finish()
            return
        if self.experts.reads_ahead:
            self.experts.prefetch(il + 1, self.inputs.residual(T))
        self.backend.compute(gs.ffn[il].graph)

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
