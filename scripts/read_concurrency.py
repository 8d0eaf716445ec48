"""Does more than one outstanding read raise the read rate? (issue 15, item 4)

    python scripts/read_concurrency.py MODEL.gguf [--bytes 1G] [--depths 1,2,4] [--rates 0,1G,500M]
        [--block 4M] [--passes 2]

Reads BYTES of MODEL with O_DIRECT in BLOCK-sized preadv calls, from DEPTH threads at once (each
takes the next block from a shared counter, so DEPTH reads are in flight), with the page cache
dropped before every pass; under each read cap (0: uncapped) in an I/O cgroup (disk_cap.py).
Prints GB/s per (cap, depth): the median of PASSES, and the passes. Every pass starts at another
offset so no pass reads what the one before did (the host caches behind this virtual disk).

Threads outside flexinfer/prefetch.py: this is a measuring script, not the engine; preadv releases
the GIL, so the threads' reads really are in flight together.
"""

from __future__ import annotations

import argparse
import itertools
import mmap
import os
import statistics
import sys
import threading
import time

from flexinfer.budget import parse_size
from flexinfer.cgroup import drop_page_cache
from flexinfer.disk_cap import capped


def one_pass(path: str, start: int, nbytes: int, block: int, depth: int) -> float:
    """GB/s of reading [start, start + nbytes) with `depth` reads in flight."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    size = os.fstat(fd).st_size
    blocks = itertools.count()
    n_blocks = nbytes // block

    def worker():
        buf = mmap.mmap(-1, block)
        while (i := next(blocks)) < n_blocks:
            at = (start + i * block) % (size - block) // 4096 * 4096
            os.preadv(fd, [buf], at)

    drop_page_cache()
    threads = [threading.Thread(target=worker) for _ in range(depth)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    os.close(fd)
    return n_blocks * block / seconds / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/read_concurrency.py")
    p.add_argument("model")
    p.add_argument("--bytes", default="1G")
    p.add_argument("--depths", default="1,2,4")
    p.add_argument("--rates", default="0,1G,500M", help="read caps, bytes/s; 0: uncapped")
    p.add_argument("--block", default="4M")
    p.add_argument("--passes", type=int, default=2)
    a = p.parse_args(argv)
    nbytes, block = parse_size(a.bytes, "--bytes"), parse_size(a.block.replace("M", "MiB"),
                                                                "--block")
    offset = 0
    for rate_text in a.rates.split(","):
        rate = None if rate_text == "0" else parse_size(rate_text, "--rates")
        with capped(a.model, rate):
            for depth in (int(d) for d in a.depths.split(",")):
                rates = []
                for _ in range(a.passes):
                    rates.append(one_pass(a.model, offset, nbytes, block, depth))
                    offset += nbytes
                print(f"cap {rate_text:>5}  depth {depth}  {statistics.median(rates):.3f} GB/s  "
                      f"(passes {', '.join(f'{r:.3f}' for r in rates)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
