"""Mutation fuzzing of a valid GGUF header: whatever the bytes, check_model either accepts the file
or raises GGUFError (one line, naming the file), and it neither hangs nor blows up memory.

The seed file is test_malformed's valid model. Five mutators, 3000 cases in all, derandomized so
CI runs the same cases every time (hypothesis derives its seed from the test; no example database):
  flips   xor 1 to 8 bytes anywhere in the header (everything before the tensor data)
  cuts    truncate the file at any point
  splices copy a fragment of the header over, or into, another place in the header
  fields  overwrite 1 to 3 of the header's length, count, type, dimension and offset fields with
          extreme values (0, 2^31, 2^32-1, 2^62, 2^63, 2^64-1, ...) or random ones
  values  give 1 to 3 keys (present or meaningful when added) a well-formed value of another type:
          another key's value, an extreme number, NaN, an odd string, an array of the wrong kind.
          Byte-level mutation almost never yields a well-formed value of the wrong type (a string
          turned into an array reads its length as the element type), so the checks after the
          parser (config, tokenizer, tensor specs) get their own mutator.
FLEXINFER_FUZZ_SCALE=10 runs ten times as many cases (a nightly or pre-release run).
A case that runs longer than HANG_SECONDS is stopped by SIGALRM and fails; peak RSS may grow by at
most RSS_GROWTH_MB over a mutator's whole run (ru_maxrss only rises, so this bounds every case).
"""

from __future__ import annotations

import os
import resource
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexinfer.errors import GGUFError
from flexinfer.model_check import check_model
from tests.test_malformed import (ARR, BOOL, F32, F64, I8, I16, I32, I64, STR, U8, U16, U32, U64,
                                  Model, gstr, kv, u32, u64, valid_model)

HANG_SECONDS = 5.0
RSS_GROWTH_MB = 200
SCALE = float(os.environ.get("FLEXINFER_FUZZ_SCALE", "1"))
U64_EXTREMES = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 32, 2**64 - 1]
U32_EXTREMES = [0, 1, 2, 4, 5, 7, 8, 9, 12, 13, 99, 2**31, 2**32 - 1]


def _settings(n: int):
    return settings(max_examples=int(n * SCALE), derandomize=True, database=None, deadline=2000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _fields(m: Model) -> list[tuple[int, int]]:
    """(offset, size 4 or 8) of every length, count, type, dimension and offset field in the header,
    found by walking the valid file's parts."""
    out = [(4, 4), (8, 8), (16, 8)]
    for key, at in m.kv_at.items():
        v = m.value_at(key)
        vtype = struct.unpack_from("<I", m.raw, v - 4)[0]
        out += [(at, 8), (v - 4, 4)]
        if vtype == STR:
            out.append((v, 8))
        elif vtype == ARR:
            out += [(v, 4), (v + 4, 8)]
            if struct.unpack_from("<I", m.raw, v)[0] == STR:
                out.append((v + 12, 8))  # the first element's length
    for name, (dims, _, _) in m.infos.items():
        at = m.info_at[name]
        nd = at + 8 + len(name.encode())
        out += [(at, 8), (nd, 4)] + [(nd + 4 + 8 * i, 8) for i in range(len(dims))]
        out += [(nd + 4 + 8 * len(dims), 4), (nd + 8 + 8 * len(dims), 8)]
    return out


@contextmanager
def _alarm(seconds: float):
    def hang(signum, frame):
        raise TimeoutError(f"check_model still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _only_our_error(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    with _alarm(HANG_SECONDS):
        try:
            check_model(path)
        except GGUFError as e:  # the one allowed outcome besides acceptance; anything else fails
            msg = str(e)
            assert type(e) is GGUFError and msg.startswith(f"{path}: ") and "\n" not in msg, msg


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "mutant.gguf"


M = valid_model()
HEADER = M.data_offset  # bytes before the tensor data: what the parser reads
FIELDS = _fields(M)


def _flip(raw: bytes, flips) -> bytes:
    b = bytearray(raw)
    for at, mask in flips:
        b[at] ^= mask
    return bytes(b)


def _splice(raw: bytes, src: int, n: int, dst: int, insert: bool) -> bytes:
    frag = raw[src:src + n]
    return raw[:dst] + frag + raw[dst + (0 if insert else len(frag)):]


def _arr(etype: int, items: list[bytes]) -> tuple[int, bytes]:
    return ARR, u32(etype) + u64(len(items)) + b"".join(items)


def _num(vtype: int, fmt: str, v) -> tuple[int, bytes]:
    return vtype, struct.pack("<" + fmt, v)


# (value type, encoded value): the file's own values, moved to other keys, and odd ones
ODD_VALUES = [
    _num(U8, "B", 0), _num(I8, "b", -1), _num(U16, "H", 65535), _num(I16, "h", -1),
    _num(U32, "I", 0), _num(U32, "I", 2**32 - 1), _num(I32, "i", -1), _num(I32, "i", 2**31 - 1),
    _num(F32, "f", float("nan")), _num(F32, "f", float("inf")), _num(F32, "f", -0.0),
    _num(BOOL, "?", True), _num(U64, "Q", 2**64 - 1), _num(I64, "q", -2**63),
    _num(F64, "d", float("nan")), _num(F64, "d", 1e308), _num(F64, "d", 2.5),
    (STR, gstr("")), (STR, gstr("llama")), (STR, gstr("qwen2")), (STR, gstr("linear")),
    (STR, gstr("\x00\n")), (STR, gstr("x" * 1000)),
    _arr(U8, []), _arr(I32, [u32(1), u32(2)]), _arr(F32, [struct.pack("<f", float("nan"))]),
    _arr(STR, [gstr("a"), gstr("b")]), _arr(STR, []), _arr(ARR, [u32(U8) + u64(1) + b"\x01"]),
    _arr(BOOL, [b"\x01"] * 3), _arr(I32, [u32(0)] * 300), _arr(F32, [b"\0" * 4] * 300),
]
FILE_VALUES = [(struct.unpack_from("<I", M.raw, M.value_at(k) - 4)[0],
                e[8 + len(k.encode()) + 4:]) for k, e in M.kvs.items()]
EXTRA_KEYS = ["general.alignment", "llama.rope.scaling.type", "llama.rope.scaling.factor",
              "llama.rope.dimension_count", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
              "tokenizer.ggml.eot_token_id"]


def _revalue(changes) -> bytes:
    kvs = dict(M.kvs)
    for key, (vtype, payload) in changes:
        kvs[key] = kv(key, vtype, payload)
    return M.build(list(kvs.values()))


def _overwrite(raw: bytes, writes) -> bytes:
    b = bytearray(raw)
    for (at, size), value in writes:
        b[at:at + size] = value.to_bytes(8, "little")[:size]
    return bytes(b)


flips = st.lists(st.tuples(st.integers(0, HEADER - 1), st.integers(1, 255)), min_size=1, max_size=8)
cuts = st.integers(0, len(M.raw) - 1)
splices = st.tuples(st.integers(0, HEADER - 1), st.integers(1, 64), st.integers(0, HEADER - 1),
                    st.booleans())
values = st.sampled_from(U64_EXTREMES) | st.integers(0, 2**64 - 1)
writes = st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=3)
revalues = st.lists(st.tuples(st.sampled_from(list(M.kvs) + EXTRA_KEYS),
                              st.sampled_from(ODD_VALUES + FILE_VALUES)), min_size=1, max_size=3)


def _run(fuzz, target: Path):
    rss = _max_rss_mb()
    fuzz(target)
    assert _max_rss_mb() - rss < RSS_GROWTH_MB


def test_seed_is_accepted(target):
    _only_our_error(target, M.raw)
    check_model(target)


def test_fuzz_flips(target):
    @_settings(800)
    @given(flips)
    def fuzz(path, f):
        _only_our_error(path, _flip(M.raw, f))
    _run(fuzz, target)


def test_fuzz_cuts(target):
    @_settings(300)
    @given(cuts)
    def fuzz(path, n):
        _only_our_error(path, M.raw[:n])
    _run(fuzz, target)


def test_fuzz_splices(target):
    @_settings(500)
    @given(splices)
    def fuzz(path, s):
        _only_our_error(path, _splice(M.raw, *s))
    _run(fuzz, target)


def test_fuzz_fields(target):
    @_settings(800)
    @given(writes)
    def fuzz(path, w):
        _only_our_error(path, _overwrite(M.raw, w))
    _run(fuzz, target)


def test_fuzz_values(target):
    @_settings(600)
    @given(revalues)
    def fuzz(path, changes):
        _only_our_error(path, _revalue(changes))
    _run(fuzz, target)
