"""Malformed GGUF files: every one refused by check_model with one GGUFError line, quickly.

A small valid llama model (2 layers, n_embd 64, 4 heads, 2 KV heads, n_ff 128, a 300-token SPM-like
vocabulary, Q8_0 matrices and F32 norms) is written with gguf-py's GGUFWriter, then split by gguf-py's
reader into its parts: header, each key/value entry, each tensor info, the data section. Each case
rebuilds the file from those parts with exactly one thing broken (or edits a few bytes in place), so
the error it must give is known. The split is checked by rebuilding the valid file byte for byte.

Byte layout reminders (GGUF v3, little endian): header = "GGUF", u32 version, u64 n_tensors, u64 n_kv;
a string = u64 length + bytes; a kv = string key, u32 value type, value; an array = u32 element type,
u64 count, elements; a tensor info = string name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset.
gguf-py takes numpy shapes (rows, cols) and writes them reversed: ggml shape (ne0, ne1) = (cols, rows).
"""

from __future__ import annotations

import functools
import os
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

from flexinfer.errors import GGUFError
from flexinfer.model_check import check_model

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF = 2, 64, 4, 2, 128
N_EMBD_KV = N_EMBD // N_HEAD * N_HEAD_KV  # 32
TOKENS = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
          + [f"\u2581w{i}" for i in range(41)])  # 300 tokens, SPM style: unk, bos, eos, bytes, words
N_VOCAB = len(TOKENS)
TIME_LIMIT = 2.0  # seconds per case

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
        U64: "Q", I64: "q", F64: "d"}
Q8_0 = 8  # ggml tensor type


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_num(key: str, vtype: int, v) -> bytes:
    return kv(key, vtype, struct.pack("<" + _FMT[vtype], v))


def kv_str(key: str, s: str | bytes) -> bytes:
    return kv(key, STR, gstr(s))


def kv_arr(key: str, etype: int, values) -> bytes:
    if etype == STR:
        body = b"".join(gstr(v) for v in values)
    else:
        body = struct.pack(f"<{len(values)}{_FMT[etype]}", *values)
    return kv(key, ARR, u32(etype) + u64(len(values)) + body)


def tinfo(name: str | bytes, dims, ttype: int, offset: int) -> bytes:
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ttype) + u64(offset)


@dataclass
class Model:
    """A valid GGUF file and its parts; `build` reassembles it with any part replaced."""

    raw: bytes
    kvs: dict[str, bytes]  # key -> the whole entry's bytes, in file order
    infos: dict[str, tuple]  # tensor name -> (dims, type, relative offset), in file order
    kv_at: dict[str, int]  # key -> offset of its entry in raw
    info_at: dict[str, int]  # tensor name -> offset of its info in raw
    data_offset: int
    data: bytes = field(repr=False)

    def build(self, kvs=None, infos=None, *, version=3, n_tensors=None, n_kv=None,
              align=32) -> bytes:
        kvs = list(self.kvs.values()) if kvs is None else kvs
        infos = [(n, *v) for n, v in self.infos.items()] if infos is None else infos
        head = (b"GGUF" + u32(version) + u64(len(infos) if n_tensors is None else n_tensors)
                + u64(len(kvs) if n_kv is None else n_kv))
        body = head + b"".join(kvs) + b"".join(tinfo(*i) for i in infos)
        return body + bytes(-len(body) % align) + self.data

    def with_kv(self, key: str, entry: bytes | None, **kw) -> bytes:
        """The file with key's entry replaced (None: removed; a new key is appended)."""
        kvs = dict(self.kvs)
        if entry is None:
            del kvs[key]
        else:
            kvs[key] = entry
        return self.build(list(kvs.values()), **kw)

    def with_info(self, name: str, new_name: str | None = None, drop=False, **change) -> bytes:
        """The file with one tensor info changed: dims=, type=, offset=, a new name, or dropped."""
        infos = []
        for n, (dims, ttype, off) in self.infos.items():
            if n == name:
                if drop:
                    continue
                n = new_name or n
                dims, ttype = change.get("dims", dims), change.get("type", ttype)
                off = change.get("offset", off)
            infos.append((n, dims, ttype, off))
        return self.build(infos=infos)

    def set_num(self, key: str, vtype: int, v) -> bytes:
        """The file with key (new or not) holding the number v of value type vtype."""
        return self.with_kv(key, kv_num(key, vtype, v))

    def set_str(self, key: str, v: str | bytes) -> bytes:
        return self.with_kv(key, kv_str(key, v))

    def value_at(self, key: str) -> int:
        """Offset of key's value (after key and type) in raw."""
        return self.kv_at[key] + 8 + len(key.encode()) + 4

    def patch(self, at: int, new: bytes) -> bytes:
        return self.raw[:at] + new + self.raw[at + len(new):]


def _weights(rng, rows: int, cols: int) -> np.ndarray:
    """A Q8_0 matrix of ggml shape (cols, rows), as gguf-py wants it: (rows, bytes per row)."""
    return quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.02,
                    GGMLQuantizationType.Q8_0)


def _write_valid(path: Path) -> None:
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny malformed-test llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([-float(i) for i in range(N_VOCAB)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (N_VOCAB - 259))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    rng = np.random.default_rng(0)
    q8 = GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", _weights(rng, N_VOCAB, N_EMBD), raw_dtype=q8)
    shapes = {"attn_q": (N_EMBD, N_EMBD), "attn_k": (N_EMBD_KV, N_EMBD),
              "attn_v": (N_EMBD_KV, N_EMBD), "attn_output": (N_EMBD, N_EMBD),
              "ffn_gate": (N_FF, N_EMBD), "ffn_up": (N_FF, N_EMBD), "ffn_down": (N_EMBD, N_FF)}
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for role, (rows, cols) in shapes.items():
            w.add_tensor(f"blk.{i}.{role}.weight", _weights(rng, rows, cols), raw_dtype=q8)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", _weights(rng, N_VOCAB, N_EMBD), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@functools.cache
def valid_model() -> Model:
    """The valid model, split into parts. Trailing padding after the last tensor is dropped so
    that cutting the file's last byte cuts the last tensor."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "valid.gguf"
        _write_valid(path)
        raw = path.read_bytes()
        r = GGUFReader(path)
        kvs, kv_at = {}, {}
        for f in r.fields.values():
            if not f.name.startswith("GGUF."):
                size = sum(int(p.nbytes) for p in f.parts)
                kvs[f.name], kv_at[f.name] = raw[f.offset:f.offset + size], f.offset
        infos = {t.name: (tuple(int(n) for n in t.shape), int(t.tensor_type),
                          int(t.data_offset) - r.data_offset) for t in r.tensors}
        info_at = {t.name: t.field.offset for t in r.tensors}
        start = int(r.data_offset)
        end = max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)
        del r  # the reader holds a memmap of the file
    return Model(raw[:end], kvs, infos, kv_at, info_at, start, raw[start:end])


# ---------------------------------------------------------------------------------------------
# The corpus: (id, make(model, tmp) -> bytes | Path, a fragment the message must contain)

def _nested(depth: int) -> bytes:
    inner = u32(U8) + u64(0)
    for _ in range(depth):
        inner = u32(ARR) + u64(1) + inner
    return inner


def _cut(where):
    """A case that cuts the file at where(model) bytes."""
    return lambda m, tmp: m.raw[:where(m)]


def _in_kv(key: str, frac: float):
    return _cut(lambda m: m.kv_at[key] + int(len(m.kvs[key]) * frac))


def _in_info(name: str, back: int):
    return _cut(lambda m: m.info_at[name] + len(tinfo(name, *m.infos[name])) - back)


def _dir(m, tmp):
    (tmp / "a-directory.gguf").mkdir()
    return tmp / "a-directory.gguf"


def _extra_tensor(name: str, n: int):
    """A case that adds an F32 tensor of n elements (data appended, aligned) to the valid file."""
    def make(m, tmp):
        off = len(m.data) + (-len(m.data) % 32)
        infos = [(k, *v) for k, v in m.infos.items()] + [(name, (n,), 0, off)]
        head = b"GGUF" + u32(3) + u64(len(infos)) + u64(len(m.kvs))
        body = head + b"".join(m.kvs.values()) + b"".join(tinfo(*i) for i in infos)
        data = m.data + bytes(off - len(m.data)) + np.ones(n, np.float32).tobytes()
        return body + bytes(-len(body) % 32) + data
    return make


TOK, SCORES, TTYPE = "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"
TRUNC = "truncated"
CASES = [
    # the header
    ("bad-magic", lambda m, t: b"GGML" + m.raw[4:], "not a GGUF file"),
    ("version-1", lambda m, t: m.patch(4, u32(1)), "version 1"),
    ("version-99", lambda m, t: m.patch(4, u32(99)), "version 99"),
    ("n-tensors-2^63", lambda m, t: m.patch(8, u64(1 << 63)), "tensor count"),
    ("n-kv-2^64-1", lambda m, t: m.patch(16, u64(2**64 - 1)), "metadata count"),
    ("n-kv-one-too-many", lambda m, t: m.build(n_kv=len(m.kvs) + 1), "tensor #0 name"),
    ("empty-file", lambda m, t: b"", "empty"),
    ("directory", _dir, "directory"),
    ("nonexistent", lambda m, t: t / "no-such-model.gguf", "No such file"),
    # metadata entries
    ("key-length-2^64-1", lambda m, t: m.patch(24, u64(2**64 - 1)), "metadata key #0"),
    ("string-length-2^63", lambda m, t: m.patch(m.value_at("general.name"), u64(1 << 63)),
     "'general.name'"),
    ("array-2^62-uint32", lambda m, t: m.patch(m.value_at(TTYPE), u32(U32) + u64(1 << 62)), TTYPE),
    ("string-array-2^64-1", lambda m, t: m.patch(m.value_at(TOK) + 4, u64(2**64 - 1)), TOK),
    ("49-bytes-2^60-arrays",
     lambda m, t: b"GGUF" + u32(3) + u64(0) + u64(1) + kv("", ARR, u32(ARR) + u64(1 << 60)) + b"\0",
     "metadata '': array length 1152921504606846976 exceeds"),
    ("arrays-nested-deep", lambda m, t: m.with_kv("x.nested", kv("x.nested", ARR, _nested(500))),
     "'x.nested': arrays nested deeper"),
    ("unknown-value-type", lambda m, t: m.with_kv("general.name", kv("general.name", 13, b"")),
     "'general.name': unknown value type 13"),
    ("unknown-array-type", lambda m, t: m.with_kv("x.arr", kv("x.arr", ARR, u32(13) + u64(1))),
     "'x.arr': unknown array element type 13"),
    ("duplicate-key", lambda m, t: m.build(list(m.kvs.values()) + [m.kvs["general.name"]]),
     "'general.name' appears twice"),
    ("non-utf8-string", lambda m, t: m.set_str("general.name", b"\xff\xfe"),
     "'general.name': string is not valid UTF-8"),
    ("non-utf8-token", lambda m, t: m.with_kv(TOK, kv_arr(TOK, STR, TOKENS[:-1] + [b"\xc3("])),
     f"'{TOK}'[299]"),
    ("non-utf8-key", lambda m, t: m.with_kv("x", kv(b"x\xff", U8, b"\x00")), "metadata key #"),
    # tensor infos
    ("unknown-tensor-type-99", lambda m, t: m.with_info("blk.0.attn_q.weight", type=99),
     "'blk.0.attn_q.weight': unknown ggml type 99"),
    ("removed-tensor-type-4", lambda m, t: m.with_info("blk.0.attn_q.weight", type=4),
     "'blk.0.attn_q.weight': unknown ggml type 4"),
    ("n-dims-0", lambda m, t: m.with_info("blk.0.attn_q.weight", dims=()),
     "'blk.0.attn_q.weight': 0 dimensions"),
    ("n-dims-5", lambda m, t: m.with_info("blk.0.attn_q.weight", dims=(64, 64, 1, 1, 1)),
     "'blk.0.attn_q.weight': 5 dimensions"),
    ("zero-dimension", lambda m, t: m.with_info("blk.0.attn_q.weight", dims=(64, 0)),
     "'blk.0.attn_q.weight': dimension 0"),
    ("shape-overflow", lambda m, t: m.with_info("blk.0.attn_q.weight", dims=(2**32,) * 3),
     "'blk.0.attn_q.weight': shape [4294967296, 4294967296, 4294967296] overflows"),
    ("dimension-2^64-1", lambda m, t: m.with_info("blk.0.attn_q.weight", dims=(2**64 - 1,)),
     "overflows"),
    ("q8_0-row-of-48", lambda m, t: m.with_info("blk.0.attn_q.weight", dims=(48, 64)),
     "'blk.0.attn_q.weight': row length 48 is not a multiple of the Q8_0 block size 32"),
    ("tensor-name-64-bytes", lambda m, t: m.with_info("blk.0.attn_q.weight", new_name="x" * 64),
     "name: length 64 exceeds 63"),
    ("duplicate-tensor-name",
     lambda m, t: m.with_info("blk.0.attn_k.weight", new_name="blk.0.attn_q.weight"),
     "'blk.0.attn_q.weight': name appears twice"),
    ("alignment-0", lambda m, t: m.set_num("general.alignment", U32, 0),
     "'general.alignment': 0"),
    ("alignment-3", lambda m, t: m.set_num("general.alignment", U32, 3),
     "'general.alignment': 3"),
    ("alignment-2^20", lambda m, t: m.set_num("general.alignment", U32, 1 << 20),
     "'general.alignment': 1048576"),
    ("alignment-string", lambda m, t: m.set_str("general.alignment", "32"),
     "'general.alignment'"),
    ("misaligned-offset",
     lambda m, t: m.with_info("blk.0.attn_k.weight", offset=m.infos["blk.0.attn_k.weight"][2] + 16),
     "'blk.0.attn_k.weight': offset"),
    ("offset-beyond-file", lambda m, t: m.with_info("blk.0.attn_q.weight", offset=1 << 40),
     "'blk.0.attn_q.weight': data at bytes"),
    ("offset-2^64-32", lambda m, t: m.with_info("blk.0.attn_q.weight", offset=2**64 - 32),
     "beyond the end of the file"),
    ("overlapping-tensors",
     lambda m, t: m.with_info("blk.0.attn_k.weight", offset=m.infos["blk.0.attn_q.weight"][2]),
     "overlaps tensor"),
    # truncation at ten points
    ("cut-in-magic", _cut(lambda m: 2), TRUNC),
    ("cut-in-tensor-count", _cut(lambda m: 12), TRUNC),
    ("cut-in-kv-count", _cut(lambda m: 20), TRUNC),
    ("cut-in-first-key", _in_kv("general.architecture", 0.5), TRUNC),
    ("cut-in-tokens", _in_kv(TOK, 0.5), TRUNC),
    ("cut-in-scores", _in_kv(SCORES, 0.7), TRUNC),
    ("cut-in-first-tensor-info", _in_info("token_embd.weight", 20), TRUNC),
    ("cut-in-last-tensor-info", _in_info("output.weight", 3), TRUNC),
    ("cut-at-data-start", _cut(lambda m: m.data_offset), TRUNC),
    ("cut-in-data", _cut(lambda m: m.data_offset + len(m.data) // 2), "incomplete download"),
    ("last-byte-missing", _cut(lambda m: len(m.raw) - 1), "'output.weight' ends at byte"),
    # architecture and hyperparameters
    ("unknown-architecture", lambda m, t: m.set_str("general.architecture", "gpt9"),
     "'general.architecture': 'gpt9' is not supported"),
    ("missing-architecture", lambda m, t: m.with_kv("general.architecture", None),
     "'general.architecture' is missing"),
    ("architecture-array",
     lambda m, t: m.with_kv("general.architecture", kv_arr("general.architecture", U8, [1, 2])),
     "'general.architecture'"),
    ("block-count-0", lambda m, t: m.set_num("llama.block_count", U32, 0),
     "'llama.block_count': 0 is out of range"),
    ("block-count-10^9", lambda m, t: m.set_num("llama.block_count", U32, 10**9),
     "'llama.block_count': 1000000000 is out of range"),
    ("block-count-string", lambda m, t: m.set_str("llama.block_count", "2"),
     "'llama.block_count': '2' is not an integer"),
    ("block-count-3-no-tensors", lambda m, t: m.set_num("llama.block_count", U32, 3),
     "'blk.2.attn_norm.weight' is missing"),
    ("head-count-5", lambda m, t: m.set_num("llama.attention.head_count", U32, 5),
     "'llama.attention.head_count': 5 heads do not divide the embedding length 64"),
    ("head-count-kv-3", lambda m, t: m.set_num("llama.attention.head_count_kv", U32, 3),
     "'llama.attention.head_count_kv': 3 does not divide head_count 4"),
    ("context-length-0", lambda m, t: m.set_num("llama.context_length", U32, 0),
     "'llama.context_length': 0 is out of range"),
    ("rms-eps-nan",
     lambda m, t: m.set_num("llama.attention.layer_norm_rms_epsilon", F32, float("nan")),
     "'llama.attention.layer_norm_rms_epsilon'"),
    # tensors the architecture needs
    ("missing-tensor", lambda m, t: m.with_info("blk.1.ffn_down.weight", drop=True),
     "'blk.1.ffn_down.weight' is missing"),
    ("wrong-shape", lambda m, t: m.with_info("blk.0.attn_k.weight", dims=(32, 64)),
     "'blk.0.attn_k.weight' has shape [32, 64], expected [64, 32]"),
    ("norm-quantized", lambda m, t: m.with_info("blk.0.attn_norm.weight", type=Q8_0),
     "'blk.0.attn_norm.weight' is Q8_0, expected F32"),
    ("weight-i8", lambda m, t: m.with_info("blk.0.attn_q.weight", type=24),
     "'blk.0.attn_q.weight' has type I8, which cannot be used as a weight"),
    ("output-shape", lambda m, t: m.with_info("output.weight", dims=(64, 299)),
     "'output.weight' has shape [64, 299], expected [64, 300]"),
    # tokenizer metadata
    ("vocab-299-tokens-300-rows",
     lambda m, t: m.build([m.kvs[k] for k in m.kvs if k not in (TOK, SCORES, TTYPE)]
                          + [kv_arr(TOK, STR, TOKENS[:299]), kv_arr(SCORES, F32, [0.0] * 299),
                             kv_arr(TTYPE, I32, [1] * 299)]),
     "'token_embd.weight' has 300 rows but 'tokenizer.ggml.tokens' has 299"),
    ("tokens-of-ints", lambda m, t: m.with_kv(TOK, kv_arr(TOK, I32, list(range(N_VOCAB)))),
     f"'{TOK}' is an array of int32, expected an array of strings"),
    ("tokens-empty", lambda m, t: m.with_kv(TOK, kv_arr(TOK, STR, [])), f"'{TOK}' is empty"),
    ("scores-length-299", lambda m, t: m.with_kv(SCORES, kv_arr(SCORES, F32, [0.0] * 299)),
     f"'{SCORES}' has 299 entries but '{TOK}' has 300"),
    ("scores-float64", lambda m, t: m.with_kv(SCORES, kv_arr(SCORES, F64, [0.0] * N_VOCAB)),
     f"'{SCORES}' is an array of float64, expected an array of float32"),
    ("token-type-uint8", lambda m, t: m.with_kv(TTYPE, kv_arr(TTYPE, U8, [1] * N_VOCAB)),
     f"'{TTYPE}' is an array of uint8, expected an array of int32"),
    ("bos-out-of-range", lambda m, t: m.set_num("tokenizer.ggml.bos_token_id", U32, N_VOCAB),
     "'tokenizer.ggml.bos_token_id' token id 300 is outside the vocabulary of 300 tokens"),
    ("eos-negative", lambda m, t: m.set_num("tokenizer.ggml.eos_token_id", I32, -1),
     "'tokenizer.ggml.eos_token_id' token id -1 is negative"),
    ("eos-2^32-1", lambda m, t: m.set_num("tokenizer.ggml.eos_token_id", U32, 2**32 - 1),
     "'tokenizer.ggml.eos_token_id' token id 4294967295 is outside"),
    ("padding-out-of-range", lambda m, t: m.set_num("tokenizer.ggml.padding_token_id", U32, 5000),
     "'tokenizer.ggml.padding_token_id' token id 5000 is outside"),
    ("id-key-with-newline",
     lambda m, t: m.with_kv("x", kv_num("tokenizer.ggml.x\ny_token_id", U32, 5000)),
     "'tokenizer.ggml.x\\ny_token_id' token id 5000 is outside"),
    ("bos-string", lambda m, t: m.set_str("tokenizer.ggml.bos_token_id", "<s>"),
     "'tokenizer.ggml.bos_token_id' is a string, expected an integer token id"),
    # tensors the architecture does not use: refused, not silently ignored (issue 13)
    ("unused-tensor", _extra_tensor("blk.0.post_ffw_norm.weight", N_EMBD),
     "tensor 'blk.0.post_ffw_norm.weight' is not used by llama"),
    ("unused-rope-factors", _extra_tensor("rope_factors_long.weight", 8),
     "tensor 'rope_factors_long.weight' is not used by llama"),
    ("rope-freqs-wrong-shape", _extra_tensor("rope_freqs.weight", 7),
     "tensor 'rope_freqs.weight' has shape [7], expected [8]"),
    ("value-length-differs", lambda m, t: m.set_num("llama.attention.value_length", U32, 32),
     "'llama.attention.value_length' differs from 'llama.attention.key_length' 16"),
    ("rope-scaling-unknown", lambda m, t: m.set_str("llama.rope.scaling.type", "dynamic"),
     "'llama.rope.scaling.type': 'dynamic' is not supported"),
    ("yarn-log-multiplier", lambda m, t: kv_pair(m, ("llama.rope.scaling.type", "yarn"),
                                                 ("llama.rope.scaling.yarn_log_multiplier", 0.1)),
     "'llama.rope.scaling.yarn_log_multiplier': yarn with it is not supported"),
    ("rope-dims-not-head", lambda m, t: m.set_num("llama.rope.dimension_count", U32, 8),
     "'llama.rope.dimension_count': 8 is not the head size 16"),
]


def kv_pair(m, text: tuple[str, str], number: tuple[str, float]) -> bytes:
    """The file with a string key and an F32 key set."""
    kvs = dict(m.kvs)
    kvs[text[0]] = kv_str(*text)
    kvs[number[0]] = kv_num(number[0], F32, number[1])
    return m.build(list(kvs.values()))


def _materialize(make, tmp: Path, case_id: str) -> Path:
    out = make(valid_model(), tmp)
    if isinstance(out, Path):
        return out
    path = tmp / f"{case_id}.gguf"
    path.write_bytes(out)
    return path


def test_parts_rebuild_the_valid_file():
    m = valid_model()
    assert m.build() == m.raw
    assert len(m.infos) == 3 + 9 * N_LAYER


def test_valid_model_passes(tmp_path):
    path = tmp_path / "valid.gguf"
    path.write_bytes(valid_model().raw)
    g, cfg, specs = check_model(path)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.n_ff, cfg.n_vocab) == (
        N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_VOCAB)
    assert sorted(s.name for s in specs) == sorted(g.tensors)  # every tensor, nothing else
    assert g.data_offset == valid_model().data_offset


@pytest.mark.parametrize("name", ["tiny_llama_path", "tiny_qwen2_path", "tiny_llama_tied_path",
                                  "tiny_mixed_path"])
def test_synthetic_models_pass(name, request):
    g, cfg, specs = check_model(request.getfixturevalue(name))
    assert len(specs) == len(g.tensors)


def test_cases_are_many_and_distinct():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 35


@pytest.mark.parametrize("make,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_file_is_refused(make, fragment, tmp_path, request):
    path = _materialize(make, tmp_path, request.node.callspec.id)
    start = time.perf_counter()
    with pytest.raises(GGUFError) as info:
        check_model(path)
    elapsed = time.perf_counter() - start
    msg = str(info.value)
    assert type(info.value) is GGUFError
    assert msg.startswith(f"{path}: "), msg
    assert fragment in msg, msg
    assert "\n" not in msg and len(msg) < 400, msg
    assert elapsed < TIME_LIMIT, f"{elapsed:.2f} s"


def _cli_available() -> bool:
    try:
        import flexinfer.cli  # noqa: F401
    except Exception:  # the CLI is being written elsewhere; until it imports, skip
        return False
    return True


@pytest.mark.skipif(not _cli_available(), reason="flexinfer.cli does not import yet")
@pytest.mark.parametrize("make,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_prints_one_line_and_exits_2(make, fragment, tmp_path, request):
    path = _materialize(make, tmp_path, request.node.callspec.id)
    env = dict(os.environ, FLEXINFER_HOME=str(tmp_path / "home"))
    argv = [sys.executable, "-m", "flexinfer", "run", str(path), "-p", "hi", "-n", "1"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and str(path) in lines[0], run.stderr
    assert "Traceback" not in run.stderr + run.stdout
