"""WeightStore: the weights' headers and bytes. Which blocks are resident, and how that changes, is
residency.py's; this module cuts the matrices into blocks, reads them, and serves embedding rows.

Every matrix is cut once, at load, into row blocks (planner.block_rows: at most STREAM_CHUNK
bytes, the 7B's FFN matrices into 4, plus a cut wherever the load plan put a boundary), each with
its own tensor header. A block is either resident, in its home, or streamed, read by the
prefetcher into the ring before its layer is computed (prefetch.py), which re-points its header.
The graphs hold those headers (and the run headers below), so they stay valid whatever becomes
resident later; the engine keys its graphs by the view of resident runs they were built on.

Homes: each matrix has a region of one Arena (ggml_ops): address space reserved for the whole
model and charged only where a block is read. Its blocks lie there as in the file, one after
another, so a run of adjacent resident blocks is one contiguous matrix and the graphs get one header
over it (view(): a matrix resident whole is one mul_mat, not one per block and a concat each). A
block is read with O_DIRECT into its region, in the whole 4096-byte pages that cover it (its home
is the first); a neighbour's bytes in a page they share are kept. Repacked types are then converted
where they lie, a few hundred rows at a time through a small bounce buffer. Releasing a block
munlocks its pages and gives them back to the OS (MADV_DONTNEED): uncharged at once, but for a page
shared with a resident neighbour. In `mmap` mode the headers point into a read-only mapping of the
file and the OS pages.

get(layer)/release(layer) bracket the use of a layer's weights; the head (output_norm, output) is
layer n_layer. token_embd is never loaded whole: embed_rows reads the rows of the tokens in use.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from flexinfer import ggml_ops
from flexinfer.config import ModelConfig
from flexinfer.direct_io import DirectReader, span
from flexinfer.errors import StreamError
from flexinfer.gguf_file import GGUFFile, TensorInfo, row_bytes
from flexinfer.ggml_ops import Arena, Buffer, Tensor, TensorTable
from flexinfer.planner import Plan, PlanTensor, block_starts, convert_rows
from flexinfer.residency import Residency

RUN_TABLE = 256  # run headers (WeightStore.view) per table, tables made as needed


@dataclass(eq=False)
class Block:
    """A run of rows of one tensor, with its own header: where it is on disk, its size, and its
    home (the page-aligned region its aligned span is read into; 0 in mmap mode)."""

    header: Tensor
    offset: int  # absolute file offset of its first row
    rows: int
    row_bytes: int  # a vector is one row
    repack: bool  # the whole tensor is repackable: every block of it uses the repacked kernels
    layer: int
    name: str  # the tensor's GGUF name
    row0: int  # its first row in the tensor
    home: int = 0
    index: int = 0  # its place among its matrix's blocks

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def span(self) -> int:
        """Bytes its home takes: the whole 4096-byte blocks covering it on disk."""
        return span(self.offset, self.nbytes)[1]

    def place(self, buf, addr: int) -> None:
        if self.repack:
            ggml_ops.place(self.header, buf, addr)
        else:  # plain memory, even inside a repack buffer: same kernels as the resident run
            ggml_ops.point(self.header, ggml_ops.Placement(addr, None, None))


def matrices(g: GGUFFile, cfg: ModelConfig, specs, repackable) -> list[PlanTensor]:
    """The plannable matrices: every layer's attn/ffn weights and the output head (token_embd when
    tied). `repackable(info)` says whether a tensor's type is converted on upload."""
    out = []
    for s in specs:
        if s.role in ("attn", "ffn") and len(s.shape) >= 2 and s.quantizable:  # not F32-only
            kind = s.name.split(".")[2]
            out.append(_plan_tensor(g.tensors[s.name], s.layer, kind, repackable))
    head = g.tensors.get("output.weight") or g.tensors["token_embd.weight"]
    out.append(_plan_tensor(head, cfg.n_layer, "output", repackable))
    return out


def _plan_tensor(info: TensorInfo, layer: int, kind: str, repackable) -> PlanTensor:
    rows, rb = plan_rows(info)
    # a whole expert tensor is repacked too, but a row group at a time like any block; the plan's
    # flag would size its bounce buffer as the whole tensor (one plan row), so it says no
    return PlanTensor(info.name, layer, kind, rows, rb, repackable(info) and len(info.shape) == 2)


def plan_rows(info: TensorInfo) -> tuple[int, int]:
    """(rows, bytes per row) as the plan splits a tensor. A 3-D expert tensor (ne0, ne1, n_expert)
    is one row of all its bytes: resident whole or streamed whole, never split (mul_mat_id needs
    every expert in one tensor)."""
    if len(info.shape) == 3:
        return 1, info.nbytes
    return info.shape[1], row_bytes(info.type, info.shape[0])


def cut_points(info: TensorInfo, plan: Plan) -> list[int]:
    """Where a matrix's blocks begin: every block_rows rows, and wherever the plan (its stages and
    its loan) puts a boundary that is not already one (a plan made by the planner never does; one
    forced by a test may)."""
    n, rb = plan_rows(info)
    cuts = set(block_starts(n, rb))
    for rows in [plan.resident_rows, plan.prompt_rows, *(st.resident_rows for st in plan.stages)]:
        r = rows.get(info.name, n)
        if 0 < r < n:
            cuts.add(r)
    return sorted(cuts)


class WeightStore:
    def __init__(self, g: GGUFFile, cfg: ModelConfig, specs, plan: Plan, *, repack: bool,
                 reader: DirectReader, skip=frozenset()):
        self.g, self.cfg, self.repack, self.reader = g, cfg, repack, reader
        specs = [s for s in specs if s.name not in skip]  # tensors an ExpertStore owns (experts.py)
        self.n_head_layer = cfg.n_layer
        self._embd = g.tensors["token_embd.weight"]
        infos = [g.tensors[s.name] for s in specs] + [self._embd]
        self._table = TensorTable(sum(len(cut_points(t, plan)) if len(t.shape) > 1 else 1
                                      for t in infos) + 8)
        self.layers: list[dict[str, object]] = [{} for _ in range(cfg.n_layer + 1)]
        self.vectors: list[Block] = []  # always resident
        self.blocks: dict[str, list[Block]] = {}  # a matrix's blocks, in row order
        self._keys: dict[str, tuple[int, str]] = {}  # a matrix's (layer, key in self.layers)
        self._build_headers(specs, plan)
        self._mmap = None
        self.arena: Arena | None = None
        self.bounce: Buffer | None = None
        self._convert_table: TensorTable | None = None  # headers ggml_ops.repack_rows uses
        self._convert: dict = {}
        self.residency: Residency | None = None
        self._runs: dict[tuple[str, int, int], Tensor] = {}  # (name, first, last block): header
        self._run_tables: list[tuple[TensorTable, int]] = []  # tables of run headers, room left
        self._views: dict[bytes, tuple[int, list]] = {}  # resident pattern -> (id, layers)
        # token_embd rows are a few hundred bytes each: O_DIRECT would cost a disk round trip per
        # token (1.7 ms measured on SmolLM2), so they go through the page cache, which holds only the
        # pages of tokens in use (4 KiB each).
        self._rows_fd = os.open(g.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    # ---- headers: one per vector and one per block of a matrix
    def _build_headers(self, specs, plan: Plan) -> None:
        head_name = "output.weight" if "output.weight" in self.g.tensors else "token_embd.weight"
        for s in specs:
            if s.role == "embd":
                continue
            layer = s.layer if s.layer is not None else self.n_head_layer
            self._add(self.g.tensors[s.name], layer, s.name, plan, whole=not s.quantizable)
        if head_name == "token_embd.weight":  # tied: the head multiplies by token_embd
            self._add(self._embd, self.n_head_layer, "output.weight", plan)

    def _add(self, info: TensorInfo, layer: int, key_name: str, plan: Plan,
             whole: bool = False) -> None:
        """whole: an F32-only tensor (a norm, a bias; gpt-oss's (rows, E) expert biases too) is
        one always-resident vector block, never split."""
        key = key_name.split(".", 2)[-1] if key_name.startswith("blk.") else key_name
        if len(info.shape) == 1 or whole:
            h = self._table.new(info.name, info.type, info.shape)
            self.vectors.append(Block(h, info.offset, 1, info.nbytes, False, layer, info.name, 0))
            self.layers[layer][key] = h
            return
        n, _ = plan_rows(info)
        cuts = cut_points(info, plan) + [n]
        blocks = [self._block(info, layer, r0, r1) for r0, r1 in zip(cuts, cuts[1:])]
        for i, b in enumerate(blocks):
            b.index = i
        self.blocks[info.name] = blocks
        self._keys[info.name] = (layer, key)
        self.layers[layer][key] = blocks[0].header if len(blocks) == 1 else \
            tuple(b.header for b in blocks)

    def _block(self, info: TensorInfo, layer: int, r0: int, r1: int) -> Block:
        repack = self.repack and ggml_ops.repacks(info.type, info.shape)
        if len(info.shape) == 3:  # an expert tensor: one block, the whole tensor (plan_rows),
            # counted in ggml rows so that it converts a row group at a time
            h = self._table.new(info.name, info.type, info.shape)
            ne0, ne1, ne2 = info.shape
            return Block(h, info.offset, ne1 * ne2, row_bytes(info.type, ne0), repack, layer,
                         info.name, 0)
        rb = row_bytes(info.type, info.shape[0])
        h = self._table.new(f"{info.name}[{r0}:{r1}]", info.type, (info.shape[0], r1 - r0))
        return Block(h, info.offset + r0 * rb, r1 - r0, rb, repack, layer, info.name, r0)

    def all_blocks(self) -> list[Block]:
        return [b for bs in self.blocks.values() for b in bs]

    # ---- loading
    def load(self, plan: Plan, positions: int = 0, progress=None) -> None:
        """Give every block a home, read the vectors and the blocks the plan keeps resident at
        `positions` cached positions, and start streaming the rest. progress: None or called with
        (bytes read, bytes to read) as resident weights load."""
        if plan.mode == "mmap":
            self._map_file()
            self.residency = Residency(self, plan, mapped=True)
            return
        self._make_converter()
        size = 0
        for v in self.vectors:
            v.home = size  # an offset for now
            size += v.span
        for bs in self.blocks.values():  # a matrix's blocks lie as in the file: one region
            first = span(bs[0].offset, 0)[0]
            for b in bs:
                b.home = size + span(b.offset, 0)[0] - first
            size += span(bs[0].offset, sum(b.nbytes for b in bs))[1]
        self.arena = Arena(size, self.repack)
        for b in self.vectors + self.all_blocks():
            b.home += self.arena.base
        if any(b.repack for b in self.all_blocks()):  # one row group of the widest repacked block
            self.bounce = Buffer(max(min(convert_rows(b.row_bytes), b.rows) * b.row_bytes
                                     for b in self.all_blocks() if b.repack))
        for v in self.vectors:
            self.read_home(v)
        self.residency = Residency(self, plan, progress=progress, positions=positions)

    def _map_file(self) -> None:
        fd = os.open(self.g.path, os.O_RDONLY)
        try:
            self._mmap = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._map_array = np.frombuffer(self._mmap, dtype=np.uint8)
        base = self._map_array.ctypes.data
        for b in self.vectors + self.all_blocks():
            ggml_ops.point(b.header, ggml_ops.Placement(base + b.offset, None, None))

    def _make_converter(self) -> None:
        """One scratch header for each size of row group that repack_rows converts."""
        groups = set()  # (type, ne0, rows)
        for b in self.all_blocks():
            if not b.repack:
                continue
            c, step = b.header.contents, convert_rows(b.row_bytes)
            for n in {min(step, b.rows), b.rows % step or step}:
                if ggml_ops.repack_traits(c.type, (c.ne[0], n)) != \
                        ggml_ops.repack_traits(c.type, (c.ne[0], b.rows)):  # ROW_ALIGN prevents it
                    raise RuntimeError(f"ggml repacks {n} rows of type {c.type} unlike {b.rows}")
                groups.add((c.type, c.ne[0], n))
        self._convert_table = TensorTable(max(1, len(groups)))
        self._convert = {k: self._convert_table.new("convert", k[0], k[1:]) for k in groups}

    def data_addr(self, b: Block) -> int:
        """Where b's bytes are when it is resident (in the file's mapping in mmap mode)."""
        if self._mmap is not None:
            return self._map_array.ctypes.data + b.offset
        return b.home + b.offset % ggml_ops.PAGE

    def read_home(self, b: Block) -> None:
        """Read b into its home with O_DIRECT, convert it there if repacked, point its header at
        it. Called between forward passes only (the prefetcher may re-point streamed headers).
        Its first and last pages may hold a neighbour's bytes (a matrix's blocks lie as in the
        file, and a block boundary need not fall on a page): the read would overwrite them with
        the file's raw bytes, so they are kept and put back."""
        data = self.data_addr(b)
        end = data + b.nbytes
        keep = [(b.home, data - b.home), (end, -end % ggml_ops.PAGE)]
        saved = [bytes(ggml_ops.memview(a, n)) if n else b"" for a, n in keep]
        src = self.reader.read_span(b.home, b.offset, b.nbytes)
        for (a, n), old in zip(keep, saved):
            if n:
                ggml_ops.memview(a, n)[:] = old
        self.finish(b, self.arena, src)

    def release_home(self, b: Block, resident) -> None:
        """Give b's pages back to the OS: munlock and MADV_DONTNEED (uncharged at once), except
        a first or last page it shares with a neighbour in `resident` (still in use)."""
        bs, i = self.blocks[b.name], b.index
        data = self.data_addr(b)
        page = ggml_ops.PAGE
        start = b.home if i == 0 or bs[i - 1] not in resident else -(-data // page) * page
        end = b.home + b.span if i == len(bs) - 1 or bs[i + 1] not in resident else \
            (data + b.nbytes) // page * page
        if end > start:
            ggml_ops.release_pages(start, end - start)

    # ---- the headers the graphs use: one per run of resident blocks
    def view(self, resident) -> tuple[int, list[dict]]:
        """(id, layers) for this set of resident blocks: like self.layers, but each run of
        adjacent resident blocks of a matrix is one header over them all (their bytes lie one
        after another in its home region), so a matrix resident whole is one mul_mat, as
        unsplit, not one per block and a concat each (21 blocks of a 151936-row head took 10.9 ms
        a token against 5.6 ms as one header, measured on a Qwen3-MoE shape). The same pattern
        gives the same id, so graphs built on a view are reused when residency comes back to
        it (the prompt loan goes and returns each prompt)."""
        mapped = self._mmap is not None
        sig = bytes(mapped or b in resident for bs in self.blocks.values() for b in bs)
        got = self._views.get(sig)
        if got is not None:
            return got
        layers = [dict(d) for d in self.layers]
        for name, bs in self.blocks.items():
            parts, i = [], 0
            while i < len(bs):
                j = i
                if mapped or bs[i] in resident:
                    while j + 1 < len(bs) and (mapped or bs[j + 1] in resident):
                        j += 1
                parts.append(bs[i].header if j == i else self._run(name, i, j))
                i = j + 1
            layer, key = self._keys[name]
            layers[layer][key] = parts[0] if len(parts) == 1 else tuple(parts)
        got = self._views[sig] = (len(self._views), layers)
        return got

    def _run(self, name: str, i: int, j: int) -> Tensor:
        """The header over blocks i..j of a matrix (resident, so at their homes), made once."""
        h = self._runs.get((name, i, j))
        if h is not None:
            return h
        bs = self.blocks[name]
        first, c = bs[i], bs[i].header.contents
        if not self._run_tables or self._run_tables[-1][1] == 0:
            self._run_tables.append((TensorTable(RUN_TABLE), RUN_TABLE))
        table, room = self._run_tables[-1]
        self._run_tables[-1] = (table, room - 1)
        rows = sum(b.rows for b in bs[i:j + 1])
        h = self._runs[(name, i, j)] = table.new(f"{name}[{first.row0}:{first.row0 + rows}]",
                                                 c.type, (c.ne[0], rows))
        addr = self.data_addr(first)
        if first.repack and self._mmap is None:
            ggml_ops.place(h, self.arena, addr)
        else:
            ggml_ops.point(h, ggml_ops.Placement(addr, None, None))
        return h

    def finish(self, b: Block, buf, src: int) -> None:
        """b's raw bytes are at src inside buf (its home, or the ring): point its header there and
        repack them in place where the kernels want them repacked."""
        b.place(buf, src)
        if b.repack:
            ggml_ops.repack_in_place(b.header, buf, self._convert, self.bounce.base,
                                     convert_rows(b.row_bytes))

    # ---- use (the residency decides what streams)
    def get(self, layer: int) -> dict[str, object]:
        self.residency.acquire(layer)
        return self.layers[layer]

    def release(self, layer: int) -> None:
        self.residency.release(layer)

    def reset(self) -> None:
        self.residency.reset()

    def embed_rows(self, tokens: list[int], dst: int) -> None:
        """Copy the token_embd rows of `tokens` (raw, still quantized) to dst, one after another."""
        info = self._embd
        rb = row_bytes(info.type, info.shape[0])
        self.reader.check_unchanged()
        view = ggml_ops.memview(dst, rb * len(tokens))
        for i, tok in enumerate(tokens):
            got = os.preadv(self._rows_fd, [view[i * rb:(i + 1) * rb]], info.offset + tok * rb)
            if got != rb:
                raise StreamError(f"{self.g.path}: short read of token_embd row {tok} "
                                  "(file truncated or changed while in use?)")

    @property
    def embd_type(self) -> int:
        return self._embd.type

    @property
    def embd_row_bytes(self) -> int:
        return row_bytes(self._embd.type, self._embd.shape[0])

    def close(self) -> None:
        if self.residency is not None:
            self.residency.close()
            self.residency = None
        for b in (self.bounce, self.arena):
            if b is not None:
                b.free()
        self.bounce = self.arena = None
        if self._rows_fd >= 0:
            os.close(self._rows_fd)
            self._rows_fd = -1
        if self._mmap is not None:
            del self._map_array
            self._mmap.close()
            self._mmap = None
        self._table.free()
        for table, _ in self._run_tables:
            table.free()
        self._run_tables = []
        if self._convert_table is not None:
            self._convert_table.free()
