"""What the bench machine is: cores, CPU, kernel, memory, and the disk's sequential read bandwidth.

The bandwidth is the BW of the paper's T_IO = (model - budget) / BW: read with O_DIRECT from the
model file itself after dropping the page cache, in 4 MiB blocks (flexinfer's streaming unit), so
neither the cache nor readahead flatters it.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

from flexinfer.cgroup import drop_page_cache, run_limited
from flexinfer.direct_io import READ_DEPTH
from flexinfer.prefetch import ReadPool
from flexinfer.errors import FlexInferError
from flexinfer.machine import cpu_model

BLOCK = 4 << 20  # 4 MiB reads: at 1.6 GB/s a read takes 2.6 ms, syscall cost is noise
MAX_BYTES = 8 << 30  # a pass reads the whole model (up to 8 GiB): streaming reads every region,
# and on this VM's disk regions differ (the first GiB of the 7B read 1.2-1.5 GB/s, the next 1.8-2.1)
REPEATS = 3  # this VM's disk gives 1.0-2.0 GB/s pass to pass: the median of 3 is the number


@dataclass(frozen=True)
class DiskBandwidth:
    bytes_per_s: float  # sequential read bandwidth: the median pass
    samples: tuple[float, ...]  # bytes/s of every pass
    bytes_read: int  # per pass
    direct: bool  # True: O_DIRECT; False: buffered (O_DIRECT refused, e.g. tmpfs)
    cache_dropped: bool  # False: not root, a buffered number may be the page cache's


def measure_disk_bandwidth(path, *, max_bytes: int = MAX_BYTES, block: int = BLOCK,
                           repeats: int = REPEATS) -> DiskBandwidth:
    """Reads path (at most max_bytes) sequentially, repeats times, caches dropped each time."""
    passes = [_one_pass(path, max_bytes, block) for _ in range(max(1, repeats))]
    samples = tuple(sorted(p[0] for p in passes))
    _, done, direct, dropped = passes[0]
    return DiskBandwidth(samples[len(samples) // 2], samples, done, direct, dropped)


def measure_disk_capped(path, rate: int | None) -> DiskBandwidth:
    """measure_disk_bandwidth, in a child process whose reads are capped at rate bytes/s (an I/O
    cgroup, disk_cap.py; FlexInferError where none can be made); in this process when uncapped."""
    if rate is None:
        return measure_disk_bandwidth(path)
    d = _capped_child(path, rate, [], "disk measurement")
    return DiskBandwidth(d["bytes_per_s"], tuple(d["samples"]), d["bytes_read"], d["direct"],
                         d["cache_dropped"])


def _capped_child(path, rate: int, args: list[str], what: str) -> dict:
    """`python -m flexinfer.bench.machine PATH ARGS...` with its reads capped at rate bytes/s:
    the JSON it prints."""
    argv = [sys.executable, "-m", "flexinfer.bench.machine", os.fspath(path), *args]
    run = run_limited(argv, None, timeout=3600, disk_rate=(os.fspath(path), rate))
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines() or [f"exit status {run.returncode}"]
        raise FlexInferError(f"{path}: the capped {what} failed: {lines[-1]}")
    return json.loads(run.stdout)


def measure_expert_reads(path, piece: int, pieces: int = 3, count: int = 500,
                         seed: int = 0, pause: float = 0.0) -> float:
    """Bytes/s of reads shaped like an expert cache's misses: `count` experts, each `pieces`
    O_DIRECT reads of `piece` bytes (one slab of each of ffn_{gate,up,down}_exps) at random
    page-aligned offsets of the file, one after another. Random reads of this size wait on the
    disk's latency as well as its bandwidth: here 2.65 MB experts read at 0.6-0.7 GB/s where
    sequential reads ran at 0.96 GB/s under the same 1 GB/s cap. 500 experts of 2.65 MB read
    1.3 GB: a cap lets a short burst through faster (64 experts measured 1.16 GB/s there).
    `pause` > 0: the reader sleeps that many seconds before each expert, as a decode step's
    computing does between two layers' misses, and only the reads are timed."""
    import random
    rng = random.Random(seed)
    drop_page_cache()
    length = (piece + 4095) // 4096 * 4096
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        fd = _open_buffered(path)
    buf = mmap.mmap(-1, length)
    try:
        top = (os.fstat(fd).st_size - length) // 4096
        if top <= 0:
            raise FlexInferError(f"{path}: too small to measure reads of {piece} bytes")
        seconds, done = 0.0, 0
        for _ in range(count):
            if pause:
                time.sleep(pause)
            start = time.perf_counter()
            for _ in range(pieces):
                done += os.preadv(fd, [buf], rng.randrange(top) * 4096)
            seconds += time.perf_counter() - start
    finally:
        os.close(fd)
        buf.close()
    return done / seconds if seconds > 0 else 0.0


def measure_expert_reads_capped(path, piece: int, rate: int | None, count: int = 500,
                                pause: float = 0.0) -> float:
    """measure_expert_reads, in a child process capped at rate bytes/s (as measure_disk_capped)."""
    if rate is None:
        return measure_expert_reads(path, piece, count=count, pause=pause)
    return float(_capped_child(path, rate, ["--expert-reads", str(piece), str(count), str(pause)],
                               "expert-read measurement")["bytes_per_s"])


def _one_pass(path, max_bytes: int, block: int) -> tuple[float, int, bool, bool]:
    dropped = drop_page_cache()
    try:
        fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        fd, direct = _open_buffered(path), False
    try:
        size = min(os.fstat(fd).st_size, max_bytes)
        start = time.perf_counter()
        done = _read_span(fd, size, block)
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return (done / seconds if seconds > 0 else 0.0), done, direct, dropped


def _open_buffered(path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise FlexInferError(f"{path}: cannot read it to measure disk bandwidth: "
                             f"{e.strerror}") from None


def _read_span(fd: int, size: int, block: int, depth: int = READ_DEPTH) -> int:
    """Reads [0, size) in block-sized preadv calls, `depth` in flight as the engine's reader has
    them (direct_io.READ_DEPTH), into page-aligned buffers (O_DIRECT needs an aligned address,
    offset and length; an anonymous mmap is page-aligned)."""
    bufs = [mmap.mmap(-1, block) for _ in range(depth)]
    pool = ReadPool(depth)
    try:
        done = 0
        while done < size:
            offsets = [done + i * block for i in range(depth) if done + i * block < size]
            got = pool.map(lambda i: os.preadv(fd, [bufs[i]], offsets[i]), range(len(offsets)))
            done += sum(got)
            if sum(got) < block * len(offsets):  # the end of the file
                break
        return done
    finally:
        pool.close()
        for b in bufs:
            b.close()


def memory_total_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def machine_info() -> dict:
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "memory_total_bytes": memory_total_bytes(),
        "python": platform.python_version(),
    }


# python -m flexinfer.bench.machine MODEL [--expert-reads PIECE COUNT PAUSE]: JSON on stdout
if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[2] == "--expert-reads":
        print(json.dumps({"bytes_per_s": measure_expert_reads(
            sys.argv[1], int(sys.argv[3]), count=int(sys.argv[4]), pause=float(sys.argv[5]))}))
    else:
        print(json.dumps(asdict(measure_disk_bandwidth(sys.argv[1]))))
