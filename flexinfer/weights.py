"""WeightStore: where every weight's bytes live, and when they come and go.

Each matrix of the plan becomes one or two tensor headers: rows [0, r) resident, rows [r, N) streamed
(see planner.py). Resident parts live in one engine-allocated buffer, of the CPU_REPACK type when
repacking is on, loaded once with O_DIRECT and mlocked where the OS allows. Streamed parts are read
into a ring of bytes by the prefetcher (prefetch.py) and re-pointed there before their layer is
computed. In `mmap` mode the headers point into a read-only mapping of the file and the OS pages.

A streamed piece is read with O_DIRECT straight into the ring, in the whole 4096-byte blocks that
cover it, so it lands at its file offset's place inside its first block (up to 8 KB of slack per
piece, planner.PIECE_SLACK). Repacked types are then converted where they lie, a few hundred rows at
a time through a small bounce buffer: no staging buffer the size of a piece. Loading reads resident
parts the same way, about 8 MiB at a time through one staging buffer.

get(layer)/release(layer) bracket the use of a layer's weights; the head (output_norm, output) is
layer n_layer. token_embd is never loaded whole: embed_rows reads the rows of the tokens in use.

Stages (a plan for a growing KV cache, planner.py): a matrix's rows that only the earlier stages keep
are parts of their own from the start, chunked as they will stream, and the resident buffer holds
them in one page-aligned region per stage. prepare(positions) moves to the stage that holds those
positions: it frees the regions of the stages left behind (their pages go back to the OS at once,
before the KV cache grows into them) and from then on streams those parts like the others. Every
matrix keeps the same row blocks all along, so the engine's graphs stay valid.

The loan (planner.py): rows resident while decoding but not while a prompt batch runs are parts of
their own too, in a page-aligned region; begin_prompt releases it and streams them, end_prompt reads
them back into it.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from flexinfer import ggml_ops
from flexinfer.config import ModelConfig
from flexinfer.direct_io import ALIGN, DirectReader, span
from flexinfer.errors import StreamError
from flexinfer.gguf_file import GGUFFile, TensorInfo, row_bytes
from flexinfer.ggml_ops import Buffer, Tensor, TensorTable
from flexinfer.planner import STREAM_CHUNK, Plan, PlanTensor, chunk_rows, convert_rows
from flexinfer.prefetch import Prefetcher

TENSOR_ALIGN = 64  # bytes between tensors inside a buffer (ggml needs 32; AVX-512 likes 64)


def _a(n: int) -> int:
    return (n + TENSOR_ALIGN - 1) // TENSOR_ALIGN * TENSOR_ALIGN


def _page(n: int) -> int:
    return (n + ggml_ops.PAGE - 1) // ggml_ops.PAGE * ggml_ops.PAGE


@dataclass(frozen=True)
class Part:
    """A run of rows of one tensor, with its own header: where it is on disk and its size."""

    header: Tensor
    offset: int  # absolute file offset of its first row
    rows: int
    row_bytes: int  # a vector is one row
    repack: bool  # the whole tensor is repackable: every part of it uses the repacked kernels

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def place(self, buf: Buffer | ggml_ops.Ring, addr: int) -> None:
        if self.repack:
            ggml_ops.place(self.header, buf, addr)
        else:  # plain memory, even inside a repack buffer: same kernels as the resident run
            ggml_ops.point(self.header, ggml_ops.Placement(addr, None, None))


def matrices(g: GGUFFile, cfg: ModelConfig, specs, repackable) -> list[PlanTensor]:
    """The plannable matrices: every layer's attn/ffn weights and the output head (token_embd when
    tied). `repackable(info)` says whether a tensor's type is converted on upload."""
    out = []
    for s in specs:
        if s.role in ("attn", "ffn") and len(s.shape) >= 2:
            kind = s.name.split(".")[2]
            out.append(_plan_tensor(g.tensors[s.name], s.layer, kind, repackable))
    head = g.tensors.get("output.weight") or g.tensors["token_embd.weight"]
    out.append(_plan_tensor(head, cfg.n_layer, "output", repackable))
    return out


def _plan_tensor(info: TensorInfo, layer: int, kind: str, repackable) -> PlanTensor:
    rows, rb = plan_rows(info)
    # a whole expert tensor is repacked too, but a row group at a time like any part; the plan's
    # flag would size its bounce buffer as the whole tensor (one plan row), so it says no
    return PlanTensor(info.name, layer, kind, rows, rb, repackable(info) and len(info.shape) == 2)


def plan_rows(info: TensorInfo) -> tuple[int, int]:
    """(rows, bytes per row) as the plan splits a tensor. A 3-D expert tensor (ne0, ne1, n_expert)
    is one row of all its bytes: resident whole or streamed whole, never split (mul_mat_id needs
    every expert in one tensor; expert-level streaming will split it by experts instead)."""
    if len(info.shape) == 3:
        return 1, info.nbytes
    return info.shape[1], row_bytes(info.type, info.shape[0])


class WeightStore:
    def __init__(self, g: GGUFFile, cfg: ModelConfig, specs, plan: Plan, *, repack: bool,
                 reader: DirectReader, skip=frozenset()):
        self.g, self.cfg, self.plan, self.repack = g, cfg, plan, repack
        specs = [s for s in specs if s.name not in skip]  # tensors an ExpertStore owns (experts.py)
        self.reader = reader
        self.n_head_layer = cfg.n_layer
        self._embd = g.tensors["token_embd.weight"]
        # one header per resident part and per streamed piece (a 70B's 132 MB FFN matrices are 9
        # pieces each): counted, since running out of headers would abort inside ggml
        infos = [g.tensors[s.name] for s in specs] + [self._embd]
        n_cuts = len(plan.stages) + 2  # each stage or loan boundary inside a matrix: one more part
        self._table = TensorTable(sum(n_cuts + 1 + t.nbytes // STREAM_CHUNK for t in infos) + 8)
        self._stage_rows = [st.resident_rows for st in plan.stages] + [plan.resident_rows]
        self._prompt_rows = plan.prompt_rows or plan.resident_rows
        self._loan: list[tuple[int, Part]] = []  # resident while decoding, streamed in a prompt
        self._loan_addr: list[int] = []  # where each loan part lives while resident
        self.lent = False
        self.prompts = 0  # prompt batches that borrowed the loan
        self.stage_positions = [st.positions for st in plan.stages]
        self.stage = 0
        self._elastic: list[list[tuple[int, Part]]] = [[] for _ in plan.stages]
        self._regions: list[tuple[int, int]] = []  # (address, bytes) of each stage's extra rows
        self.resident_bytes = 0
        self._vector_bytes = 0
        self.layers: list[dict[str, object]] = [{} for _ in range(cfg.n_layer + 1)]
        self._resident: list[Part] = []
        self._streamed: dict[int, list[Part]] = {}
        self._build_headers(specs)
        self._buffers: list[Buffer] = []
        self._mmap = None
        self.mlock_errno = 0
        self.prefetcher: Prefetcher | None = None
        self._convert_table: TensorTable | None = None  # headers ggml_ops.repack_rows uses
        self._convert: dict = {}
        # token_embd rows are a few hundred bytes each: O_DIRECT would cost a disk round trip per
        # token (1.7 ms measured on SmolLM2), so they go through the page cache, which holds only the
        # pages of tokens in use (4 KiB each).
        self._rows_fd = os.open(g.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    # ---- headers: one per resident part and one per streamed part
    def _build_headers(self, specs) -> None:
        head_name = "output.weight" if "output.weight" in self.g.tensors else "token_embd.weight"
        for s in specs:
            if s.role == "embd":
                continue
            layer = s.layer if s.layer is not None else self.n_head_layer
            self._add(self.g.tensors[s.name], layer, s.name)
        if head_name == "token_embd.weight":  # tied: the head multiplies by token_embd
            self._add(self._embd, self.n_head_layer, "output.weight")

    def _add(self, info: TensorInfo, layer: int, key_name: str) -> None:
        key = key_name.split(".", 2)[-1] if key_name.startswith("blk.") else key_name
        if len(info.shape) == 1:
            part = self._part(info, 0, info.shape[0], vector=True)
            self._resident.append(part)
            self._vector_bytes += part.nbytes
            self.layers[layer][key] = part.header
            return
        n, rb = plan_rows(info)
        rs = [rows.get(info.name, n) for rows in self._stage_rows]  # never growing, stage by stage
        parts = []
        kept = self._prompt_rows.get(info.name, rs[-1])
        if kept > 0:  # kept at every stage, and while a prompt runs
            parts.append(self._part(info, 0, kept))
            self._resident.append(parts[-1])
        step = chunk_rows(rb)
        for r0 in range(kept, rs[-1], step):  # the loan: streamed only while a prompt runs
            parts.append(self._part(info, r0, min(rs[-1], r0 + step)))
            self._loan.append((layer, parts[-1]))
        for k in reversed(range(len(rs) - 1)):  # kept until stage k ends, then streamed
            for r0 in range(rs[k + 1], rs[k], step):
                parts.append(self._part(info, r0, min(rs[k], r0 + step)))
                self._elastic[k].append((layer, parts[-1]))
        for r0 in range(rs[0], n, step):  # streamed rows, in pieces of at most STREAM_CHUNK bytes
            parts.append(self._part(info, r0, min(n, r0 + step)))
            self._streamed.setdefault(layer, []).append(parts[-1])
        self.layers[layer][key] = parts[0].header if len(parts) == 1 else tuple(p.header for p in parts)

    def _part(self, info: TensorInfo, r0: int, r1: int, vector: bool = False) -> Part:
        if vector:
            h = self._table.new(info.name, info.type, info.shape)
            return Part(h, info.offset, 1, info.nbytes, False)
        if len(info.shape) == 3:  # an expert tensor: one part, the whole tensor (plan_rows),
            # counted in ggml rows so that loading goes through the staging buffer ~8 MiB at a time
            h = self._table.new(info.name, info.type, info.shape)
            ne0, ne1, ne2 = info.shape
            repack = self.repack and ggml_ops.repacks(info.type, info.shape)
            return Part(h, info.offset, ne1 * ne2, row_bytes(info.type, ne0), repack)
        rb = row_bytes(info.type, info.shape[0])
        h = self._table.new(f"{info.name}[{r0}:{r1}]", info.type, (info.shape[0], r1 - r0))
        repack = self.repack and ggml_ops.repacks(info.type, info.shape)
        return Part(h, info.offset + r0 * rb, r1 - r0, rb, repack)

    # ---- loading
    def load(self, mode: str, progress=None) -> None:
        """progress: None or called with (bytes read, bytes to read) as resident weights load."""
        if mode == "mmap":
            self._map_file()
            return
        self._make_converter()
        self._load_resident(progress)
        if self._final_streamed():
            self._make_ring(threaded=mode != "sync")

    def _map_file(self) -> None:
        fd = os.open(self.g.path, os.O_RDONLY)
        try:
            self._mmap = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._map_array = np.frombuffer(self._mmap, dtype=np.uint8)
        base = self._map_array.ctypes.data
        for p in self._resident + [p for ps in self._streamed.values() for p in ps]:
            ggml_ops.point(p.header, ggml_ops.Placement(base + p.offset, None, None))
        self._streamed = {}

    def _make_converter(self) -> None:
        """One scratch header for each size of row group that repack_rows converts."""
        groups = set()  # (type, ne0, rows)
        parts = self._resident + [p for ps in [*self._elastic, self._loan] for _, p in ps]
        for p in parts + [p for ps in self._streamed.values() for p in ps]:
            if not p.repack:
                continue
            c, step = p.header.contents, convert_rows(p.row_bytes)
            for n in {min(step, p.rows), p.rows % step or step}:
                if ggml_ops.repack_traits(c.type, (c.ne[0], n)) != \
                        ggml_ops.repack_traits(c.type, (c.ne[0], p.rows)):  # ROW_ALIGN prevents it
                    raise RuntimeError(f"ggml repacks {n} rows of type {c.type} unlike {p.rows}")
                groups.add((c.type, c.ne[0], n))
        self._convert_table = TensorTable(max(1, len(groups)))
        self._convert = {k: self._convert_table.new("convert", k[0], k[1:]) for k in groups}

    def _load_resident(self, progress=None) -> None:
        """Read the resident parts into one buffer, each stage's in a page-aligned region of its
        own, through one staging buffer of at most STREAM_CHUNK: a part is read and converted a
        chunk of rows at a time, so loading never needs room for a whole large tensor (a 150k-token
        tied head is 140 MB) on top of what the plan counts."""
        groups = ([self._resident, [p for _, p in self._loan]]
                  + [[p for _, p in parts] for parts in self._elastic])
        spans, size = [], 0
        for i, parts in enumerate(groups):  # the loan's and each stage's region in whole pages
            if i:
                size = _page(size)
            spans.append((size, sum(_a(p.nbytes) for p in parts)))
            size += spans[-1][1]
        buf = self._resident_buf = Buffer(size, repack=self.repack)
        self._buffers.append(buf)
        parts = [p for ps in groups for p in ps]
        stage = Buffer(max((self._load_rows(p) * p.row_bytes for p in parts), default=0)
                       + 2 * ALIGN)
        done, total = 0, sum(p.nbytes for p in parts)  # for progress(done, total), part by part
        try:
            for i, ((start, _), ps) in enumerate(zip(spans, groups)):
                addr = buf.base + start
                for p in ps:
                    if i == 1:
                        self._loan_addr.append(addr)
                    p.place(buf, addr)
                    self._load_part(p, buf, addr, stage.base, stage.size)
                    addr += _a(p.nbytes)
                    done += p.nbytes
                    if progress:
                        progress(done, total)
        finally:
            stage.free()
        self._loan_region = (buf.base + spans[1][0], spans[1][1])
        self._regions = [(buf.base + start, n) for start, n in spans[2:]]
        # matrix bytes, as the plan counts them (vectors are among its fixed costs)
        self.resident_bytes = sum(p.nbytes for p in parts) - self._vector_bytes
        self.mlock_errno = ggml_ops.mlock(buf.base, size) if size else 0

    @staticmethod
    def _load_rows(p: Part) -> int:
        """Rows read at a time when loading p: whole conversion groups, about STREAM_CHUNK bytes."""
        step = convert_rows(p.row_bytes)
        return min(p.rows, step * max(1, STREAM_CHUNK // (step * p.row_bytes)))

    def _load_part(self, p: Part, buf: Buffer, addr: int, stage: int, room: int) -> None:
        """Read p into buf at addr through `room` bytes of staging at `stage`."""
        step = convert_rows(p.row_bytes)
        fit = (room - 2 * ALIGN) // p.row_bytes // step * step  # whole conversion groups
        chunk = min(self._load_rows(p), max(fit, min(step, p.rows)))
        if chunk * p.row_bytes + 2 * ALIGN > room:
            raise RuntimeError(f"{chunk} rows of {p.row_bytes} bytes do not fit {room} bytes")
        for r0 in range(0, p.rows, chunk):
            n = min(chunk, p.rows - r0)
            src = self.reader.read_span(stage, p.offset + r0 * p.row_bytes, n * p.row_bytes)
            if p.repack:
                ggml_ops.repack_rows(p.header, buf, self._convert, addr + r0 * p.row_bytes, src, n,
                                     step)
            else:
                ggml_ops.copy(addr + r0 * p.row_bytes, src, n * p.row_bytes)

    def _final_streamed(self) -> dict[int, list[Part]]:
        """Each layer's streamed parts at the last stage during a prompt (the largest set)."""
        out = {l: list(ps) for l, ps in self._streamed.items()}
        for parts in [*self._elastic, self._loan]:  # and the loan, streamed while a prompt runs
            for layer, p in parts:
                out.setdefault(layer, []).append(p)
        return out

    def _make_ring(self, threaded: bool) -> None:
        """The ring the prefetcher reads into, as the plan sized it for the most streaming there is
        (the last stage's, with the loan while a prompt runs), and the converter's bounce buffer.
        The reader goes round all of the ring whatever a stage streams: the plan counts all of it
        in every stage."""
        final = self._final_streamed()
        window = self.plan.window if threaded else 1
        layer = max(self._span(ps) for ps in final.values())  # the most one layer takes
        piece = max(span(p.offset, p.nbytes)[1] for ps in final.values() for p in ps)
        size = self.plan.ring_bytes if threaded else layer
        if size < layer:  # a plan made without a ring (tests force rows): a layer per window
            size = window * layer
        self._ring = ggml_ops.Ring(size, piece, self.repack)
        self._buffers.append(self._ring)
        groups = [min(convert_rows(p.row_bytes), p.rows) * p.row_bytes
                  for ps in final.values() for p in ps if p.repack]
        if groups:  # the converter's copy of one row group, for repacking in place
            self._bounce = Buffer(max(groups))
            self._buffers.append(self._bounce)
        self._job_lists = {l: self._jobs_of(ps) for l, ps in self._streamed.items()}
        self.prefetcher = Prefetcher(sorted(self._streamed), window, self._ring.size,
                                     self._jobs, self._read, self._upload, threaded=threaded,
                                     wraps=self._ring.wraps)

    def prepare(self, positions: int) -> None:
        """Before the KV cache holds `positions` positions: move on to the stage that holds them.
        Called between forward passes, when no layer is held."""
        while self.stage < len(self.stage_positions) and positions > self.stage_positions[self.stage]:
            self._leave_stage(self.stage)
            self.stage += 1

    def _leave_stage(self, k: int) -> None:
        self.prefetcher.close()  # it may be reading ahead with the old layouts
        for layer, p in self._elastic[k]:
            self._streamed.setdefault(layer, []).append(p)
            self.resident_bytes -= p.nbytes
        ggml_ops.release_pages(*self._regions[k])
        self._restream()

    def _restream(self) -> None:
        """The streamed set changed: read in file order, list each layer's jobs again, restart."""
        for parts in self._streamed.values():
            parts.sort(key=lambda p: p.offset)
        self._job_lists = {l: self._jobs_of(ps) for l, ps in self._streamed.items()}
        self.prefetcher.restart(sorted(self._streamed))

    def begin_prompt(self) -> None:
        """Before a prompt batch: release the loan (its memory is the prompt buffer's) and stream
        it with the rest until end_prompt. Called between forward passes."""
        if not self._loan or self.lent:
            return
        self.prefetcher.close()
        for layer, p in self._loan:
            self._streamed.setdefault(layer, []).append(p)
            self.resident_bytes -= p.nbytes
        ggml_ops.release_pages(*self._loan_region)
        self.lent = True
        self.prompts += 1
        self._restream()

    def end_prompt(self) -> None:
        """Before decoding: read the loan back into its region (through the ring, free while the
        prefetcher is stopped) and stop streaming it."""
        if not self.lent:
            return
        self.prefetcher.close()
        loan = {id(p) for _, p in self._loan}
        for layer in list(self._streamed):
            self._streamed[layer] = [p for p in self._streamed[layer] if id(p) not in loan]
            if not self._streamed[layer]:
                del self._streamed[layer]
        for (_, p), addr in zip(self._loan, self._loan_addr):
            p.place(self._resident_buf, addr)
            self._load_part(p, self._resident_buf, addr, self._ring.base, self._ring.size)
            self.resident_bytes += p.nbytes
        if not self.mlock_errno:
            ggml_ops.mlock(*self._loan_region)
        self.lent = False
        self._restream()

    @staticmethod
    def _jobs_of(parts: list[Part]) -> list[tuple[Part, int]]:
        """A layer's jobs: each part with the ring bytes its block span takes (whole blocks, so
        every job starts block-aligned, as O_DIRECT needs)."""
        return [(p, span(p.offset, p.nbytes)[1]) for p in parts]

    @classmethod
    def _span(cls, parts: list[Part]) -> int:
        return sum(nbytes for _, nbytes in cls._jobs_of(parts))

    def _jobs(self, layer: int):
        return self._job_lists[layer]

    def _read(self, part: Part, offset: int) -> int:
        return self.reader.read_span(self._ring.base + offset, part.offset, part.nbytes)

    def _upload(self, part: Part, src: int) -> None:
        """The part's bytes are at src, in the ring: point its header there, and repack them in
        place where the kernels want them repacked."""
        part.place(self._ring, src)
        if part.repack:
            ggml_ops.repack_in_place(part.header, self._ring, self._convert, self._bounce.base,
                                     convert_rows(part.row_bytes))

    # ---- use
    def get(self, layer: int) -> dict[str, object]:
        if self.prefetcher and layer in self._streamed:
            self.prefetcher.acquire(layer)
        return self.layers[layer]

    def release(self, layer: int) -> None:
        if self.prefetcher and layer in self._streamed:
            self.prefetcher.release(layer)

    def reset(self) -> None:
        if self.prefetcher:
            self.prefetcher.reset()

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
        if self.prefetcher:
            self.prefetcher.close()
            self.prefetcher = None
        for b in self._buffers:
            b.free()
        self._buffers = []
        if self._rows_fd >= 0:
            os.close(self._rows_fd)
            self._rows_fd = -1
        if self._mmap is not None:
            del self._map_array
            self._mmap.close()
            self._mmap = None
        self._table.free()
        if self._convert_table is not None:
            self._convert_table.free()
