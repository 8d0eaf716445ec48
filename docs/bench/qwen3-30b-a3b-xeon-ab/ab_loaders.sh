#!/bin/bash
# A/B of the loaders' turn-taking (d93e49d) against c990bc8, alternating, three rounds, 2 and 4 GB.
for round in 1 2 3; do
  for tree in old new; do
    wt=/work/bench-wt; [ $tree = new ] && wt=/work/bench-new
    cd $wt
    PYTHONPATH=$wt chrt -f 10 /work/main/.venv/bin/python scripts/bench_moe.py /work/models/qwen3-30b-a3b-uniform.gguf \
      /work/models/qwen3-30b-a3b-zipf1.gguf --budgets 2G,4G -t 2 -c 256 -n 32 --no-peer \
      --disk-rate 1G --temp 1 --out /work/abl/r$round-$tree > /work/abl/r$round-$tree.log 2>&1
  done
done
echo done
