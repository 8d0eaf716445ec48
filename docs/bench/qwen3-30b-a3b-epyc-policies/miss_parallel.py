"""Does a miss read faster with its slabs read at once, or cut smaller? (issue 14, twentieth
session.) An expert of the model (one slab of each of ffn_{gate,up,down}_exps, at random
page-aligned offsets, as flexinfer.bench.machine.measure_expert_reads places them) is read
with O_DIRECT after a pause like a decode step's computing, its slabs cut into `split` pieces
and read by `threads` threads at once; uncapped and with reads capped at --rate (a blkio or
io.max cgroup, flexinfer.disk_cap) in turn, each row at fresh offsets (the host caches behind
this virtual disk serve bytes read before faster), the page cache dropped before each. Run as
root from a checkout of main:

    python docs/bench/qwen3-30b-a3b-epyc-policies/miss_parallel.py MODEL --rate 250M
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_moe import expert_piece  # noqa: E402
from flexinfer.budget import parse_size  # noqa: E402
from one_line import run  # noqa: E402
from flexinfer.cgroup import drop_page_cache  # noqa: E402
from flexinfer.disk_cap import capped  # noqa: E402

SHAPES = ((1, 1), (2, 1), (3, 1), (3, 2), (6, 2), (4, 4), (12, 4))  # (threads, split)


def experts(path: str, piece: int, threads: int, split: int, count: int, pause: float,
            seed: int) -> tuple[float, float]:
    """(GB/s while reading, ms an expert)."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    chunk = piece // split
    bufs = [mmap.mmap(-1, chunk) for _ in range(3 * split)]
    top = (os.fstat(fd).st_size - piece) // 4096
    seconds = done = 0.0
    with ThreadPoolExecutor(threads) as pool:
        try:
            for _ in range(count):
                time.sleep(pause)
                at = [base + j * chunk for base in (rng.randrange(top) * 4096 for _ in range(3))
                      for j in range(split)]
                start = time.perf_counter()
                done += sum(pool.map(lambda i: os.preadv(fd, [bufs[i]], at[i]), range(len(at))))
                seconds += time.perf_counter() - start
        finally:
            os.close(fd)
    return done / seconds / 1e9, seconds / count * 1e3


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("model")
    a.add_argument("--rate", default="250M")
    a.add_argument("--count", type=int, default=60, help="experts a row")
    a.add_argument("--pause", type=float, default=20.0, help="ms before each expert")
    o = a.parse_args()
    if o.count < 1 or o.pause < 0:
        a.error(f"--count must be >= 1 and --pause >= 0, got {o.count} and {o.pause:g}")
    rate, piece = parse_size(o.rate, "--rate"), expert_piece(o.model)
    if piece % 4096:
        print(f"{o.model}: slabs of {piece} bytes are not whole pages", file=sys.stderr)
        return 2
    print(f"{o.model}: experts of 3 x {piece} bytes, {o.count} a row, {o.pause:g} ms before each")
    print("\n| cap | threads | pieces a slab | GB/s while reading | ms an expert |")
    print("|---|---|---|---|---|")
    seed = 0
    for threads, split in SHAPES:  # the two caps take turns, at fresh offsets each row
        for cap in (None, rate):
            seed += 1
            drop_page_cache()
            with capped(o.model, cap):
                bw, ms = experts(o.model, piece, threads, split, o.count, o.pause / 1e3, seed)
            label = f"{cap / 1e6:.0f} MB/s" if cap else "none"
            print(f"| {label} | {threads} | {split} | {bw:.3f} | {ms:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    run(main)
