#!/bin/bash
# A/B of the hit layers' bookkeeping (693419b) against f332bc0, alternating, three rounds, 4 and 8 GB.
for round in 1 2 3; do
  for tree in old new; do
    wt=/work/bench-$tree
    cd $wt
    PYTHONPATH=$wt chrt -f 10 /work/main/.venv/bin/python scripts/bench_moe.py /work/models/qwen3-30b-a3b-uniform.gguf \
      /work/models/qwen3-30b-a3b-zipf1.gguf --budgets 4G,8G -t 2 -c 256 -n 32 --no-peer \
      --disk-rate 1G --temp 1 --out /work/abc/r$round-$tree > /work/abc/r$round-$tree.log 2>&1
  done
done
echo done
