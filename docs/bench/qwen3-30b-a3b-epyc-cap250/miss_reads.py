"""How fast an expert cache's misses read under a blkio cap, by the pause before each (issue 14,
nineteenth session): reads shaped like a layer's misses (one slab of each *_exps tensor at random
offsets, flexinfer.bench.machine.measure_expert_reads), in a child process capped at --rate, with
no pause and with pauses like a decode step's computing between two layers with misses; then the
same uncapped.

    python docs/bench/qwen3-30b-a3b-epyc-cap250/miss_reads.py MODEL --rate 250M
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_moe import expert_piece  # noqa: E402
from flexinfer.bench.machine import measure_expert_reads_capped  # noqa: E402
from flexinfer.budget import parse_size  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--rate", default="250M")
    p.add_argument("--pauses", default="0,5,20,50", help="ms before each expert")
    a = p.parse_args()
    rate, piece = parse_size(a.rate, "--rate"), expert_piece(a.model)
    print(f"{a.model}: experts of 3 x {piece} bytes")
    print("| cap | pause before each expert | experts | GB/s while reading |")
    print("|---|---|---|---|")
    for cap in (rate, None):
        for ms in (int(x) for x in a.pauses.split(",")):
            n = 200 if ms == 0 else 100
            bw = measure_expert_reads_capped(a.model, piece, cap, n, ms / 1000)
            print(f"| {f'{cap / 1e6:.0f} MB/s' if cap else 'none'} | {ms} ms | {n} | "
                  f"{bw / 1e9:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
