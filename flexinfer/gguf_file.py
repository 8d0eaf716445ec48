"""GGUF header, metadata and tensor infos: parsed and validated, no ggml.

Every length in a GGUF file is checked against the bytes that are left before anything is read or
allocated for it, so a crafted file (a string length of 2^64, an array of a billion arrays) ends in a
GGUFError naming the file and the key, never in a huge allocation or a hang. Tensor data is not read
here: TensorInfo says where each tensor's bytes are (offset, nbytes) and the weight store decides when
and where they go (llama.cpp's loader keeps the same split).

Numeric arrays come back as numpy arrays (a 150k-token vocabulary's scores and types in one copy each),
string arrays as lists of str, so a large vocabulary parses in a fraction of a second.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexinfer.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16  # 64 KiB; real files use 32
MAX_KV = 1 << 16  # metadata keys; real files have ~40
MAX_TENSORS = 1 << 16  # a 70B llama has 723
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 63  # GGML_MAX_NAME is 64 including the NUL
MAX_ARRAY_DEPTH = 2  # arrays of arrays exist (merges in old files); deeper is hostile
# Elements in one metadata array: the largest vocabularies have ~260k tokens and merges. With the
# bytes-left check this also bounds memory: a list of 4M two-byte strings is ~250 MB of Python.
MAX_ARRAY = 1 << 22
MAX_NESTED = 1 << 16  # arrays in one array of arrays: each is a Python object ten times its bytes

# GGML type id -> (name, block size in elements, bytes per block). Checked against ggml in the tests.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),  # gpt-oss's experts: an E8M0 scale byte and 32 4-bit E2M1 values
}

# GGUF metadata value types: id -> (name, struct format or None for string/array)
_SCALARS = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are. shape is ggml order: shape[0] is the contiguous row length."""

    name: str  # as GGUF names it: "blk.0.attn_q.weight"
    type: int  # ggml type id, a key of GGML_TYPES
    shape: tuple[int, ...]  # (ne0, ne1, ...), 1 to 4 dims
    offset: int  # absolute byte offset in the file (data section start + relative offset)
    nbytes: int  # bytes on disk: rows * row_bytes

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type][0]


@dataclass(frozen=True)
class GGUFFile:
    """A parsed, validated GGUF header. Reading it opens nothing that stays open."""

    path: str
    version: int  # 2 or 3
    metadata: dict[str, Any]  # key -> int | float | bool | str | list[str] | np.ndarray | list
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int  # general.alignment or 32
    data_offset: int  # start of the tensor data section
    file_size: int

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")


def show_name(name: str) -> str:
    """A key or tensor name from the file, fit for a one-line message: quoted, escaped, short."""
    return repr(name if len(name) <= 80 else name[:80] + "...")


def _show(v) -> str:
    """A metadata value for a one-line message: its repr, cut short (it may be a 150k-item list)."""
    s = repr(v).replace("\n", " ")
    return s if len(s) <= 40 else s[:37] + "..."


def row_bytes(type_id: int, ne0: int) -> int:
    """Bytes of one row of ne0 elements (ne0 must be a multiple of the block size)."""
    _, blck, size = GGML_TYPES[type_id]
    return ne0 // blck * size


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; every length is checked before use."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def fail(self, what: str):
        raise GGUFError(self.path, what)

    def need(self, n: int, what: str):
        if n < 0 or n > self.end - self.pos:
            left = self.end - self.pos
            self.fail(f"{what}: needs {n} bytes at offset {self.pos}, only {left} left "
                      "(truncated or corrupt file)")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what): return self.scalar("<I", what)
    def u64(self, what): return self.scalar("<Q", what)

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(what)
        if limit is not None and n > limit:
            self.fail(f"{what}: length {n} exceeds {limit} bytes")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what}: string is not valid UTF-8 ({e.reason} at byte {e.start})")


def _value(c: _Cursor, vtype: int, key: str, depth: int = 0):
    where = f"metadata {show_name(key)}"
    if vtype in _SCALARS:
        return c.scalar(_SCALARS[vtype][1], where)
    if vtype == _STRING:
        return c.string(where)
    if vtype != _ARRAY:
        c.fail(f"{where}: unknown value type {vtype}")
    if depth >= MAX_ARRAY_DEPTH:
        c.fail(f"{where}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
    etype = c.u32(f"{where} array type")
    count = c.u64(f"{where} array length")
    if count > MAX_ARRAY:
        c.fail(f"{where}: array length {count} exceeds {MAX_ARRAY}")
    if etype in _NUMPY:
        size = struct.calcsize(_SCALARS[etype][1])
        c.need(count * size, f"{where} array of {count} {_SCALARS[etype][0]}")
        arr = np.frombuffer(c.buf, dtype=_NUMPY[etype], count=count, offset=c.pos).copy()
        c.pos += count * size
        return arr.astype(bool) if etype == 7 else arr
    if etype == _STRING:
        # every string takes at least 8 bytes (its length): a count that cannot fit in what is
        # left is refused before the loop starts
        c.need(count * 8, f"{where} array of {count} strings")
        return _strings(c, count, key)
    if etype != _ARRAY:
        c.fail(f"{where}: unknown array element type {etype}")
    if count > MAX_NESTED:
        c.fail(f"{where}: array of {count} arrays exceeds {MAX_NESTED}")
    c.need(count * 12, f"{where} array of {count} arrays")  # each: u32 type + u64 count
    return [_value(c, _ARRAY, key, depth + 1) for _ in range(count)]


def _strings(c: _Cursor, count: int, key: str) -> list[str]:
    buf, pos, end, out = c.buf, c.pos, c.end, []
    unpack = struct.Struct("<Q").unpack_from
    for i in range(count):  # the hot loop of a 150k vocabulary: kept flat
        if end - pos < 8:
            c.pos = pos
            c.need(8, f"metadata {show_name(key)}[{i}]")
        (n,) = unpack(buf, pos)
        pos += 8
        if n > end - pos:
            c.pos = pos
            c.need(n, f"metadata {show_name(key)}[{i}]")
        try:
            out.append(str(buf[pos:pos + n], "utf-8"))
        except UnicodeDecodeError as e:
            c.fail(f"metadata {show_name(key)}[{i}]: string is not valid UTF-8 ({e.reason})")
        pos += n
    c.pos = pos
    return out


def _tensor_info(c: _Cursor, seen: set[str], i: int) -> tuple[str, int, tuple[int, ...], int]:
    name = c.string(f"tensor #{i} name", limit=MAX_NAME)
    where = f"tensor {show_name(name)}"
    if not name:
        c.fail(f"tensor #{i}: name is empty")
    if name in seen:
        c.fail(f"{where}: name appears twice")
    seen.add(name)
    n_dims = c.u32(f"{where} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        c.fail(f"{where}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    shape = tuple(c.u64(f"{where} shape") for _ in range(n_dims))
    ttype = c.u32(f"{where} type")
    offset = c.u64(f"{where} offset")
    return name, ttype, shape, offset


def _check_tensor(path: str, name: str, ttype: int, shape: tuple[int, ...]) -> int:
    """Returns the tensor's byte size after checking its type and shape."""
    where = f"tensor {show_name(name)}"
    if ttype not in GGML_TYPES:
        raise GGUFError(path, f"{where}: unknown ggml type {ttype}")
    tname, blck, size = GGML_TYPES[ttype]
    n = 1
    for d in shape:
        if d <= 0:
            raise GGUFError(path, f"{where}: dimension {d} in shape {list(shape)} must be > 0")
        n *= d
        if n >= 1 << 62:
            raise GGUFError(path, f"{where}: shape {list(shape)} overflows")
    if shape[0] % blck:
        raise GGUFError(path, f"{where}: row length {shape[0]} is not a multiple of the "
                              f"{tname} block size {blck}")
    return n // blck * size


def _alignment(path: str, metadata: dict) -> int:
    a = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(a, int) or isinstance(a, bool) or a <= 0 or a & (a - 1) or a > MAX_ALIGNMENT:
        raise GGUFError(path, f"metadata 'general.alignment': {_show(a)} is not a power of two "
                              f"from 1 to {MAX_ALIGNMENT}")
    return a


def _place_tensors(path, raw, data_offset, alignment, file_size) -> dict[str, TensorInfo]:
    tensors = {}
    for name, ttype, shape, rel in raw:
        nbytes = _check_tensor(path, name, ttype, shape)
        if rel % alignment:
            raise GGUFError(path, f"tensor {show_name(name)}: offset {rel} is not a multiple of "
                                  f"the alignment {alignment}")
        tensors[name] = TensorInfo(name, ttype, shape, data_offset + rel, nbytes)
    _check_spans(path, sorted(tensors.values(), key=lambda t: t.offset), file_size)
    return tensors


def _check_spans(path: str, spans: list[TensorInfo], file_size: int) -> None:
    """Tensors sorted by offset must not overlap and must end inside the file."""
    for a, b in zip(spans, spans[1:]):
        if a.offset + a.nbytes > b.offset:
            raise GGUFError(path, f"tensor {show_name(a.name)} overlaps tensor "
                                  f"{show_name(b.name)}")
    # sorted and disjoint: the first tensor past the end is the one to blame. A file cut short
    # ends inside a tensor (or at a tensor's start); a crafted offset points far beyond the end.
    for t in spans:
        end, where = t.offset + t.nbytes, f"tensor {show_name(t.name)}"
        if end > file_size and t.offset > file_size:
            raise GGUFError(path, f"{where}: data at bytes {t.offset}..{end} lies beyond the end "
                                  f"of the file ({file_size} bytes): bad offset or truncated file")
        if end > file_size:
            raise GGUFError(path, f"{where} ends at byte {end} but the file has {file_size} "
                                  "bytes (truncated file, incomplete download?)")


def _parse(buf, path: str, file_size: int) -> GGUFFile:
    c = _Cursor(buf, path)
    c.need(4, "magic")
    if bytes(buf[0:4]) != GGUF_MAGIC:
        c.fail(f"not a GGUF file (magic {bytes(buf[0:4])!r}, expected b'GGUF')")
    c.pos = 4
    version = c.u32("version")
    if version not in SUPPORTED_VERSIONS:
        c.fail(f"GGUF version {version} is not supported "
               f"(only {' and '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
    if n_tensors > MAX_TENSORS:
        c.fail(f"tensor count {n_tensors} exceeds {MAX_TENSORS}")
    if n_kv > MAX_KV:
        c.fail(f"metadata count {n_kv} exceeds {MAX_KV}")
    metadata: dict[str, Any] = {}
    key = ""
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}" + (f" (after {show_name(key)})" if i else ""))
        if key in metadata:
            c.fail(f"metadata {show_name(key)} appears twice")
        metadata[key] = _value(c, c.u32(f"metadata {show_name(key)} type"), key)
    seen: set[str] = set()
    raw = [_tensor_info(c, seen, i) for i in range(n_tensors)]
    alignment = _alignment(path, metadata)
    data_offset = (c.pos + alignment - 1) // alignment * alignment
    if n_tensors and data_offset > file_size:
        c.fail(f"tensor data section starts at byte {data_offset}, beyond the end of the file "
               f"({file_size} bytes; truncated file?)")
    tensors = _place_tensors(path, raw, data_offset, alignment, file_size)
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset, file_size)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate the header of a GGUF file. Raises GGUFError naming the file on any fault."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a FIFO would block open(), a device might never end
            raise GGUFError(path, "is a directory" if stat.S_ISDIR(mode) else "not a regular file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGUFError(path, "file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    return _parse(view, path, size)
                finally:
                    view.release()
    except OSError as e:
        raise GGUFError(path, f"cannot read: {e.strerror or e}") from None
