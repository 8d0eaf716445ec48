#!/bin/bash
# A/B of --expert-prefetch at 2 and 4 GB on this machine, alternating off/on, two rounds.
cd /work/bench-wt
export PYTHONPATH=/work/bench-wt
for round in 1 2; do
  for mode in off on; do
    extra=""; [ $mode = on ] && extra="--expert-prefetch"
    chrt -f 10 /work/main/.venv/bin/python scripts/bench_moe.py /work/models/qwen3-30b-a3b-uniform.gguf \
      /work/models/qwen3-30b-a3b-zipf1.gguf --budgets 2G,4G -t 2 -c 256 -n 32 --no-peer \
      --disk-rate 1G --temp 1 $extra --out /work/ab/r$round-$mode > /work/ab/r$round-$mode.log 2>&1
  done
done
echo done
