"""Calibration: how fast this machine reads the model's disk and multiplies its weights.

Measured once and cached in $FLEXINFER_HOME/machine.json, keyed by CPU model, thread count, weight
type and disk device, so a later run plans without measuring. Disk bandwidth is read with O_DIRECT
(no page cache involved); compute is timed on a matrix of the model's main weight type: 4096x4096
for a model whose token reads fewer weights than the CPU's last-level cache holds, and one larger
than that cache otherwise, so the weights come from memory as the model's do (cache_bytes).
"""

from __future__ import annotations

import json
import os
import platform
import time

from flexinfer import ggml_ops
from flexinfer.budget import proc_field
from flexinfer.config import ModelConfig
from flexinfer.direct_io import ALIGN, DirectReader
from flexinfer.ggml_ops import TYPE_F32, Backend, Buffer, Ops, TensorTable
from flexinfer.errors import FlexInferError
from flexinfer.gguf_file import GGUFFile, read_gguf, row_bytes
from flexinfer.hub import home
from flexinfer.planner import CAP_PAUSE_CREDIT_S, MOE_LAYER_S, Machine

DISK_SAMPLE = 256 << 20  # bytes read to measure the disk (about 0.15 s at 1.6 GB/s)
CHUNK = 8 << 20  # bytes per O_DIRECT read, as the streaming reads of large tensors
CAL_DIM = 4096  # the calibration matrix is CAL_DIM x CAL_DIM
COMPUTE_REPS = 20  # mat-vecs timed one by one; the fastest counts
# A model whose token computes more weight bytes than the last-level cache holds is timed on a
# matrix of the cache's size at least (MEMORY_CAL_MIN..MEMORY_CAL_MAX bytes): on a 2-core VM with a
# 260 MB L3, a 9 MB Q4_0 matrix multiplied at 28 GB/s from the cache and a 151-604 MB one at 15
# GB/s from memory, and a 3.8 GB 7B decoded at 3.5 tok/s in RAM where the small matrix's rate
# predicted 8.3
MEMORY_CAL_MIN = 64 << 20
MEMORY_CAL_MAX = 512 << 20
CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"


def cpu_model() -> str:
    return proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown"


def _cache_path():
    return home() / "machine.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(data: dict) -> None:
    try:
        p = _cache_path()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, p)
    except OSError:
        pass  # a read-only home only costs a re-measure next time


def measure_disk(path: str, size: int) -> float:
    reader = DirectReader(path, size)
    buf = Buffer(CHUNK + 2 * ALIGN)
    try:
        n = min(DISK_SAMPLE, size)
        t0 = time.perf_counter()
        for off in range(0, n, CHUNK):
            reader.read_span(buf.base, off, min(CHUNK, n - off))
        return reader.bytes_read / max(time.perf_counter() - t0, 1e-6)
    finally:
        buf.free()
        reader.close()


def measure_compute(type_id: int, repack: bool, n_threads: int,
                    rows: int = CAL_DIM) -> tuple[float, float]:
    """(weight bytes/s of a mat-vec, repack bytes/s) for a CAL_DIM x `rows` matrix of this type.
    The repack rate is timed on the first CAL_DIM rows; the rest are zeros, as uploaded ones are."""
    table, backend = TensorTable(4), Backend(n_threads)
    shape = (CAL_DIM, rows)
    use_repack = repack and ggml_ops.repacks(type_id, shape)
    rb = row_bytes(type_id, CAL_DIM)
    nbytes, small = rb * rows, rb * min(rows, CAL_DIM)
    w, buf = table.new("w", type_id, shape), Buffer(nbytes, use_repack)
    part = table.new("part", type_id, (CAL_DIM, min(rows, CAL_DIM)))
    src, xbuf = Buffer(small), Buffer(4 * CAL_DIM)
    try:
        src.clear()  # zeros: finite in every type
        buf.clear()  # every page touched before timing (zeros are zeros in the repacked layout too)
        ggml_ops.place(part, buf, buf.base)
        ggml_ops.upload(part, src.base, small)  # first touch
        t0 = time.perf_counter()
        ggml_ops.upload(part, src.base, small)
        repack_bw = small / max(time.perf_counter() - t0, 1e-9)
        ggml_ops.place(w, buf, buf.base)
        ops = Ops(8)
        ops.output(ops.mul_mat(w, ops.input(TYPE_F32, (CAL_DIM, 1), xbuf.base)))
        alloc = ggml_ops.Allocator()
        alloc.alloc(ops)
        backend.compute(ops.graph)
        times = []
        for _ in range(COMPUTE_REPS):
            t0 = time.perf_counter()
            backend.compute(ops.graph)
            times.append(time.perf_counter() - t0)
        # the fastest rep: the machine's speed when this process has its cores. A total (or even
        # the median) takes in every time another process held a core while ggml's two threads
        # waited at a barrier: with builds running on the 2 cores it measured 0.3-1.2 GB/s for
        # a Q4_0 matrix that multiplies at 35 GB/s, and every later plan predicted from that
        compute_bw = nbytes / max(min(times), 1e-9)
        alloc.free()
        ops.free()
        return compute_bw, repack_bw
    finally:
        for b in (buf, src, xbuf):
            b.free()
        table.free()
        backend.close()


def main_type(g: GGUFFile) -> int:
    sizes: dict[int, int] = {}
    for t in g.tensors.values():
        if len(t.shape) == 2 and t.name != "token_embd.weight":
            sizes[t.type] = sizes.get(t.type, 0) + t.nbytes
    return max(sizes, key=sizes.get) if sizes else TYPE_F32


def disk_key(path: str, disk_rate: int | None = None) -> str:
    """The cache key of a file's disk; under a read cap (FLEXINFER_DISK_RATE, set by
    `--disk-rate`), the disk at that cap is another disk."""
    rate = disk_rate or os.environ.get("FLEXINFER_DISK_RATE")
    return f"disk|{os.stat(path).st_dev}" + (f"|cap{int(rate)}" if rate else "")


def expert_read_key(path: str, disk_rate: int | None = None) -> str:
    """The cache key of the rate an expert cache's misses read at on this disk (Machine.expert_bw),
    under the same cap as disk_key."""
    return disk_key(path, disk_rate) + "|expert-misses"


def cache_bytes(root: str = CACHE_DIR) -> int | None:
    """The size of the CPU's largest (last-level) cache, from sysfs; None where it does not say."""
    best = None
    try:
        entries = os.listdir(root)
    except OSError:
        return None
    for d in entries:
        try:
            with open(os.path.join(root, d, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        try:
            n = int(text.rstrip("KkMmGg")) * unit
        except ValueError:
            continue
        best = n if best is None else max(best, n)
    return best


def calibration_rows(g: GGUFFile) -> int:
    """Rows of the calibration matrix for this model: CAL_DIM when a token's weights fit the
    last-level cache (or its size is unknown), else enough that the matrix outgrows it."""
    llc = cache_bytes()
    if not llc or token_bytes(g) <= llc:
        return CAL_DIM
    rb = row_bytes(main_type(g), CAL_DIM)
    want = min(max(llc, MEMORY_CAL_MIN), MEMORY_CAL_MAX)
    return max(CAL_DIM, -(-want // rb // 64) * 64)


def _compute_key(g: GGUFFile, repack: bool, n_threads: int, rows: int | None = None) -> str:
    rows = calibration_rows(g) if rows is None else rows
    where = "" if rows == CAL_DIM else "|memory"  # timed from memory, not from the cache
    return f"{cpu_model()}|t{n_threads}|type{main_type(g)}|repack{int(repack)}{where}"


def calibrate(g: GGUFFile, repack: bool, n_threads: int, refresh: bool = False,
              room: int | None = None) -> Machine:
    """This machine's rates for g, measured once and cached. `room`: the bytes the process may
    still allocate (its budget less what it holds); a calibration matrix that does not fit is
    measured at CAL_DIM instead, for this plan only (not cached)."""
    cache = _load_cache()
    tid = main_type(g)
    rows = calibration_rows(g)
    ckey = _compute_key(g, repack, n_threads, rows)
    dkey = disk_key(g.path)
    compute = None
    if refresh or ckey not in cache:
        # twice the matrix: a margin for what the process allocates besides
        if room is not None and rows > CAL_DIM and row_bytes(tid, CAL_DIM) * rows * 2 > room:
            compute = measure_compute(tid, repack, n_threads)  # the cache's rate: too fast
        else:
            cache[ckey] = measure_compute(tid, repack, n_threads, rows)
    if refresh or dkey not in cache:
        cache[dkey] = measure_disk(g.path, g.file_size)
        cache.pop(expert_read_key(g.path), None)  # measured with the old disk figure: stale
    _save_cache(cache)
    compute_bw, repack_bw = compute or cache[ckey]
    capped = bool(os.environ.get("FLEXINFER_DISK_RATE"))  # a blkio cap refunds pauses
    return Machine(disk_bw=cache[dkey], compute_bw=compute_bw, repack_bw=repack_bw,
                   pause_credit_s=CAP_PAUSE_CREDIT_S if capped else 0.0,
                   expert_bw=cache.get(expert_read_key(g.path), 0.0))


def calibrate_compute(g: GGUFFile, repack: bool, n_threads: int, rounds: int,
                      pause: float) -> float:
    """Measure compute `rounds` times, `pause` seconds apart, and cache the median for the plans
    that follow (a benchmark's). One measurement takes ~5 ms: a moment when another process
    held a core gave half the speed (22 against 41 GB/s for Q4_0 here, between two benchmark
    runs), and every plan after it predicted half the tok/s. The fastest round is no better a
    guess: on the AVX2 EPYC two sets of nine rounds ranged 10.8-15.8 GB/s (medians 14.1 and 14.4),
    and a table whose plans kept the fastest of five (18.0) predicted up to 22% more tok/s than
    its runs computed.
    Returns the bytes/s kept."""
    rows = calibration_rows(g)
    ms = []
    for i in range(rounds):
        if i:
            time.sleep(pause)
        ms.append(measure_compute(main_type(g), repack, n_threads, rows))
    kept = sorted(ms, key=lambda m: m[0])[(len(ms) - 1) // 2]  # the median (the lower of two)
    cache = _load_cache()
    cache[_compute_key(g, repack, n_threads, rows)] = list(kept)
    _save_cache(cache)
    return kept[0]


def record_calibration(path: str, n_threads: int, disk_bw: float | None,
                       t_cpu: float | None, repack: bool = True,
                       disk_rate: int | None = None, expert_bw: float | None = None) -> None:
    """Store bandwidths measured elsewhere (the bench's disk passes, its resident decode run, its
    reads shaped like an expert cache's misses: expert_bw) as this machine's calibration, so later
    plans predict from the same run's numbers."""
    try:
        g = read_gguf(path)
    except FlexInferError:
        return
    cache = _load_cache()
    if disk_bw:
        cache[disk_key(path, disk_rate)] = disk_bw
    if expert_bw:
        cache[expert_read_key(path, disk_rate)] = expert_bw
    ckey = _compute_key(g, repack, n_threads)
    if t_cpu and ckey in cache:
        cache[ckey] = [token_bytes(g) / compute_seconds(g, t_cpu), cache[ckey][1]]
    _save_cache(cache)


def compute_seconds(g: GGUFFile, t_cpu: float) -> float:
    """Of a decode token's measured compute seconds, those the planner charges at compute_bw: all
    but MOE_LAYER_S for each layer with experts (a mixture of experts' fixed cost a layer). A T_cpu
    measured on an MoE model divided by the matrices alone gave a compute_bw several times too
    low, which every later plan of a model of that weight type on this machine then used."""
    layers = len({t.name.split(".")[1] for t in g.tensors.values()
                  if len(t.shape) == 3 and t.name.startswith("blk.")})
    return max(t_cpu - layers * MOE_LAYER_S, t_cpu / 4)


def token_bytes(g: GGUFFile) -> float:
    """The weight bytes a decode token multiplies: every matrix (the embedding only when it is the
    head too) and, in a mixture of experts, the K of E experts it picks (each 3-D *_exps tensor's
    K/E)."""
    dense = sum(t.nbytes for t in g.tensors.values()
                if len(t.shape) == 2 and (t.name != "token_embd.weight"
                                          or "output.weight" not in g.tensors))
    experts = sum(t.nbytes for t in g.tensors.values() if len(t.shape) == 3)
    if not experts:
        return dense
    try:
        cfg = ModelConfig.from_gguf(g)
    except FlexInferError:
        return dense
    share = cfg.n_expert_used / cfg.n_expert if cfg.n_expert else 1.0
    return dense + experts * share
