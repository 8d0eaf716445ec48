"""Random weight bytes for synthetic models, written chunk by chunk at disk speed.

A quantized block is random bytes (every bit pattern of the quant fields is a valid block) with its
fp16 scale fields overwritten by small values, so weights come out with a chosen rms and a forward
pass through 48 layers stays finite. Random bytes come from SFC64 (2-3 GB/s here; PCG64 manages
0.3-1.6 GB/s), so a 3.8 GB 7B model is generated faster than the disk takes it.

Scales: each block's d is target_rms / unit_rms(type) * u, u uniform in [-sqrt 3, sqrt 3]
(E[u^2] = 1, random sign), where unit_rms(type) is the rms of the dequantized weights when d ~ 1,
measured once with gguf-py's reference dequantizer (the tests check the rms that comes out).
A type's min field (m or dmin) is set from d so every block's weights average zero in expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# 16 MiB chunks: 2.5 GB/s generated here against 1.7 GB/s with 64 MiB ones, since glibc recycles
# blocks this size instead of unmapping them (no page faults on every chunk)
CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class BlockLayout:
    """Where the fp16 scale fields are inside one block of a ggml quant type."""

    block_elems: int  # weights per block: 32, or 256 for K-quants
    block_bytes: int  # bytes per block on disk
    d_offset: int  # byte offset of the fp16 scale d
    min_offset: int | None = None  # byte offset of the fp16 min (m or dmin), if the type has one
    min_per_d: float = 0.0  # min = min_per_d * d; chosen so the expected weight is 0


# Offsets from ggml-common.h (block_q4_0 ... block_q6_K).
LAYOUTS: dict[str, BlockLayout] = {
    "Q4_0": BlockLayout(32, 18, 0),  # d, qs[16]: w = d * (q - 8)
    "Q4_1": BlockLayout(32, 20, 0, 2, -7.5),  # d, m, qs[16]: w = d * q + m, q in 0..15
    "Q5_0": BlockLayout(32, 22, 0),  # d, qh[4], qs[16]: w = d * (q - 16)
    "Q5_1": BlockLayout(32, 24, 0, 2, -15.5),  # d, m, qh[4], qs[16]: q in 0..31
    "Q8_0": BlockLayout(32, 34, 0),  # d, qs[32] int8
    "Q2_K": BlockLayout(256, 84, 80, 82, 1.5),  # scales[16], qs[64], d, dmin: w = d*sc*q - dmin*m
    "Q3_K": BlockLayout(256, 110, 108),  # hmask[32], qs[64], scales[12], d
    "Q4_K": BlockLayout(256, 144, 0, 2, 7.5),  # d, dmin, scales[12], qs[128]; sc, m in 0..63
    "Q5_K": BlockLayout(256, 176, 0, 2, 15.5),  # d, dmin, scales[12], qh[32], qs[128]
    "Q6_K": BlockLayout(256, 210, 208),  # ql[128], qh[64], scales[16] int8, d
}
FLOAT_TYPES = {"F32": 4, "F16": 2, "BF16": 2}  # bytes per element
SQRT3 = math.sqrt(3.0)
# MXFP4 (gpt-oss's experts): an E8M0 exponent byte e, then 16 bytes of 32 E2M1 nibbles;
# w = KVALUES[nibble] * 2^(e - 128) (ggml's kvalues_mxfp4 are twice the E2M1 values)
MXFP4 = BlockLayout(32, 17, 0)
MXFP4_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float64)
MXFP4_UNIT_RMS = float(np.sqrt(np.mean(MXFP4_KVALUES ** 2)))  # 5.85: random nibbles, e = 128


def supported_types() -> tuple[str, ...]:
    return tuple(FLOAT_TYPES) + tuple(LAYOUTS) + ("MXFP4",)


def block_elems(type_name: str) -> int:
    """Values per block: a row's length must be a multiple of it (1 for float types)."""
    if type_name == "MXFP4":
        return MXFP4.block_elems
    return LAYOUTS[type_name].block_elems if type_name in LAYOUTS else 1


def make_rng(seed: int, stream: int) -> np.random.Generator:
    """One independent generator per tensor: changing one tensor's type leaves the others alone."""
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, stream])))


def random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    words = rng.integers(0, 1 << 64, size=(n + 7) // 8, dtype=np.uint64, endpoint=False)
    return words.view(np.uint8)[:n]


def scale_table(scale: float, factor: float = 1.0) -> np.ndarray:
    """65536 fp16 bit patterns of factor * d, d evenly spread over [-sqrt3, sqrt3] * scale.

    Indexing it with the random uint16 already in a block's d field draws d without another rng
    call or a float conversion: 10 ms per 64 MiB instead of 110 ms.
    """
    u = (np.arange(65536, dtype=np.float64) + 0.5) / 32768.0 - 1.0
    return (u * (SQRT3 * scale * factor)).astype(np.float16).view(np.uint16)


def set_scales(blocks: np.ndarray, layout: BlockLayout, scale: float):
    """Overwrites the fp16 d (and min) fields of blocks, an (n_blocks, block_bytes) uint8 array."""
    words = blocks.view(np.uint16)  # every block size and field offset is even
    bits = words[:, layout.d_offset // 2].copy()
    words[:, layout.d_offset // 2] = scale_table(scale)[bits]
    if layout.min_offset is not None:
        words[:, layout.min_offset // 2] = scale_table(scale, layout.min_per_d)[bits]


def quant_chunk(rng, type_name: str, n_blocks: int, rms: float) -> np.ndarray:
    """n_blocks random blocks of a quant type whose weights have about the given rms."""
    layout = LAYOUTS[type_name]
    raw = random_bytes(rng, n_blocks * layout.block_bytes)
    set_scales(raw.reshape(n_blocks, layout.block_bytes), layout, rms / unit_rms(type_name))
    return raw


def mxfp4_chunk(rng, n_blocks: int, rms: float) -> np.ndarray:
    """n_blocks random MXFP4 blocks whose weights have the given rms in expectation: random
    nibbles, each block's exponent floor(x) or floor(x) + 1, x = 128 + log2(rms / 5.85), the
    upper one with probability (4^(x - floor x) - 1) / 3 so that E[2^(2(e - x))] = 1."""
    raw = random_bytes(rng, n_blocks * MXFP4.block_bytes).reshape(n_blocks, MXFP4.block_bytes)
    x = 128.0 + math.log2(rms / MXFP4_UNIT_RMS)
    lo = math.floor(x)
    up = rng.random(n_blocks) < (4.0 ** (x - lo) - 1.0) / 3.0
    raw[:, 0] = np.clip(lo + up, 1, 254).astype(np.uint8)
    return raw.reshape(-1)


def float_chunk(rng, type_name: str, n_elems: int, rms: float) -> np.ndarray:
    """Gaussian weights with the given rms as F32, F16 or BF16 (round to nearest even) bytes."""
    x = rng.standard_normal(n_elems, dtype=np.float32)
    x *= np.float32(rms)
    if type_name == "F32":
        return x.view(np.uint8)
    if type_name == "F16":
        return x.astype(np.float16).view(np.uint8)
    bits = x.view(np.uint32)
    bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return bf16.view(np.uint8)


def iter_weight_bytes(rng, type_name: str, n_elems: int, rms: float, chunk_bytes=CHUNK_BYTES):
    """Yields a tensor's bytes in chunks of about chunk_bytes: it is never whole in memory."""
    if type_name in FLOAT_TYPES:
        step = max(1, chunk_bytes // FLOAT_TYPES[type_name])
        for start in range(0, n_elems, step):
            yield float_chunk(rng, type_name, min(step, n_elems - start), rms)
        return
    layout = MXFP4 if type_name == "MXFP4" else LAYOUTS[type_name]
    n_blocks = n_elems // layout.block_elems
    step = max(1, chunk_bytes // layout.block_bytes)
    for start in range(0, n_blocks, step):
        if type_name == "MXFP4":
            yield mxfp4_chunk(rng, min(step, n_blocks - start), rms)
        else:
            yield quant_chunk(rng, type_name, min(step, n_blocks - start), rms)


def tensor_nbytes(type_name: str, n_elems: int) -> int:
    if type_name in FLOAT_TYPES:
        return n_elems * FLOAT_TYPES[type_name]
    layout = MXFP4 if type_name == "MXFP4" else LAYOUTS[type_name]
    return n_elems // layout.block_elems * layout.block_bytes


@lru_cache(maxsize=None)
def unit_rms(type_name: str) -> float:
    """rms of the dequantized weights of random blocks with |d| ~ 1, by gguf-py's dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    layout = LAYOUTS[type_name]
    rng = make_rng(0, 0)
    raw = random_bytes(rng, 4096 * layout.block_bytes)  # 4096 blocks: rms to within ~1%
    set_scales(raw.reshape(4096, layout.block_bytes), layout, 1.0)
    w = dequantize(raw.reshape(1, -1), GGMLQuantizationType[type_name])
    return float(np.sqrt(np.mean(np.square(w, dtype=np.float64))))
