"""How far a reader that pauses gets above a blkio read cap (issue 18).

    python scripts/cap_burst.py MODEL.gguf --rate 1G --read 150M --sleeps 0,5,20,50,150 \
        [--cycles 6] [--json]

Inside an I/O cgroup capping reads of MODEL's disk at RATE (flexinfer/disk_cap.py), a reader reads
READ bytes with O_DIRECT in 4 MiB preadv calls, then sleeps, again and again (the page cache is
dropped first and the reads walk through the file, so none is cached). Per sleep it prints the rate
while reading (bytes / seconds spent in reads) against the cap, and the duty cycle (share of the
time spent reading). A disk gives a reader at most its rate whatever it did before; the throttle
keeps a time slice of allowance, and what a paused reader did not use there it may spend after the
pause: flexinfer's sync mode (read a layer, compute it) and llama.cpp's page faults pause like this.
The first cycle is dropped (a new cgroup starts with a fresh slice).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time

from flexinfer.budget import parse_size
from flexinfer.cgroup import drop_page_cache
from flexinfer.disk_cap import capped, parse_rate

BLOCK = 4 << 20  # bytes per preadv, flexinfer's read size


def read_span(fd: int, buf, offset: int, nbytes: int, size: int) -> tuple[int, float]:
    """Reads nbytes from offset (wrapping at the file's end); (bytes, seconds)."""
    done, t0 = 0, time.perf_counter()
    while done < nbytes:
        at = (offset + done) % (size - BLOCK) // 4096 * 4096
        done += os.preadv(fd, [buf], at)
    return done, time.perf_counter() - t0


def one_sleep(fd: int, buf, size: int, start: int, read: int, sleep_s: float,
              cycles: int) -> dict:
    rates, read_s = [], []
    offset = start
    t_all = None
    for k in range(cycles):
        if k == 1:
            t_all = time.perf_counter()
        n, secs = read_span(fd, buf, offset, read, size)
        offset += n
        if k:
            rates.append(n / secs)
            read_s.append(secs)
        time.sleep(sleep_s)
    wall = time.perf_counter() - t_all
    return {"sleep_s": sleep_s, "read_bytes": read, "read_rate": statistics.median(rates),
            "read_rate_min": min(rates), "read_rate_max": max(rates),
            "duty": sum(read_s) / wall, "overall_rate": read * (cycles - 1) / wall,
            "end_offset": offset}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/cap_burst.py")
    p.add_argument("model")
    p.add_argument("--rate", default="1G", help="read cap, bytes/s (1G)")
    p.add_argument("--read", default="150M", help="bytes read per cycle (150M: a token of the "
                   "issue's Qwen at 400 MB)")
    p.add_argument("--sleeps", default="0,5,20,50,150", help="pauses in ms, comma-separated")
    p.add_argument("--cycles", type=int, default=6)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rate, read = parse_rate(a.rate), parse_size(a.read, "--read")
    size = os.path.getsize(a.model)
    drop_page_cache()
    out = []
    with capped(a.model, rate):
        fd = os.open(a.model, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
        offset = 0
        for ms in (float(x) for x in a.sleeps.split(",")):
            row = one_sleep(fd, buf, size, offset, read, ms / 1e3, a.cycles)
            offset = row.pop("end_offset")
            out.append(row)
            if not a.json:
                print(f"sleep {ms:6.0f} ms: reads at {row['read_rate'] / 1e9:.3f} GB/s "
                      f"({row['read_rate_min'] / 1e9:.3f}-{row['read_rate_max'] / 1e9:.3f}) = "
                      f"{row['read_rate'] / rate:.2f}x the cap, duty {row['duty']:.0%}, "
                      f"overall {row['overall_rate'] / 1e9:.3f} GB/s", flush=True)
        os.close(fd)
    if a.json:
        print(json.dumps({"rate": rate, "rows": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
