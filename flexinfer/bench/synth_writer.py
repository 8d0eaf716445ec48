"""Writes a GGUF file whose tensor data arrives in chunks, with gguf-py's writer for the header.

gguf-py (the reference writer) lays out the header, metadata and tensor infos; its add_tensor wants
every tensor in memory, so we declare tensors with add_tensor_info and stream the data ourselves,
padding each tensor to the file's alignment (32) exactly as write_tensors_to_file would.
gguf-py takes shapes in numpy order: ggml (ne0, ne1) is given as (ne1, ne0), and it writes them back
reversed, so the file says [ne0, ne1].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from flexinfer.errors import FlexInferError


def _gguf():
    try:
        import gguf
    except ImportError:
        raise FlexInferError("writing synthetic models needs gguf-py: pip install "
                             "'flexinfer[bench]'") from None
    return gguf


def _add_value(w, key: str, value):
    """Adds one metadata value with the GGUF type llama.cpp expects for it."""
    t = _gguf().GGUFValueType
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int) and 0 <= value < 1 << 32:
        w.add_uint32(key, value)  # token ids: llama.cpp reads them as uint32
    elif isinstance(value, int):
        w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_key_value(key, value, t.STRING)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        w.add_key_value(key, value, t.ARRAY, sub_type=t.STRING)
    elif isinstance(value, np.ndarray) and value.ndim == 1:
        w.add_key_value(key, value.tolist(), t.ARRAY, sub_type=_array_type(key, value.dtype))
    else:
        raise FlexInferError(f"vocab metadata '{key}': cannot copy a {type(value).__name__}")


def _array_type(key: str, dtype: np.dtype):
    t = _gguf().GGUFValueType
    kinds = {np.dtype(np.float32): t.FLOAT32, np.dtype(np.int32): t.INT32,
             np.dtype(np.uint32): t.UINT32, np.dtype(np.uint8): t.UINT8, np.dtype(np.int8): t.INT8,
             np.dtype(np.int64): t.INT64, np.dtype(np.float64): t.FLOAT64, np.dtype(bool): t.BOOL}
    if np.dtype(dtype) not in kinds:
        raise FlexInferError(f"vocab metadata '{key}': cannot copy an array of {dtype}")
    return kinds[np.dtype(dtype)]


def _typed_value(w, key: str, vtype: str, value):
    getattr(w, f"add_{vtype}")(key, value)


def _declare(w, plan):
    q = _gguf().GGMLQuantizationType
    for t in plan:  # tensor_dtype float32 keeps gguf-py from reading the shape as bytes
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes,
                          raw_dtype=q[t.type])


def _pad(f, n: int, align: int):
    f.write(b"\0" * (-n % align))


def _stream(f, plan, chunks, progress, align: int):
    total, done = sum(t.nbytes for t in plan), 0
    for i, t in enumerate(plan):
        written = 0
        for chunk in chunks(i, t):
            f.write(memoryview(chunk))
            written += chunk.nbytes
            done += chunk.nbytes
            if progress:
                progress(done, total)
        if written != t.nbytes:
            raise AssertionError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
        _pad(f, written, align)


def write_gguf(out: Path, arch: str, model_meta: dict, tokenizer_meta: dict, plan,
               chunks: Callable[[int, object], Iterable[np.ndarray]], progress=None):
    """Writes OUT.part, renamed to OUT once complete: a half-written model never looks done."""
    gguf = _gguf()
    part = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(part, arch)
    for key, (vtype, value) in model_meta.items():
        _typed_value(w, key, vtype, value)
    for key, value in tokenizer_meta.items():
        _add_value(w, key, value)
    _declare(w, plan)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        _pad(f, f.tell(), w.data_alignment)
        _stream(f, plan, chunks, progress, w.data_alignment)
        w.close()
        os.replace(part, out)
    except BaseException:
        w.close()
        part.unlink(missing_ok=True)
        raise
