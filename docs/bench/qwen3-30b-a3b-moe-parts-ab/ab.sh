#!/bin/bash
# interleaved A/B: the bench before (f91adbd) and after (main) the overlapped parts, same points
for i in 1 2 3; do
  for side in base new; do
    dir=/work/wt-base; [ $side = new ] && dir=/work/main
    cd $dir && chrt -f 10 /work/main/.venv/bin/python scripts/bench_moe.py \
      /work/models/qwen3-30b-a3b-uniform.gguf /work/models/qwen3-30b-a3b-zipf1.gguf \
      --budgets 2G,4G -t 2 -c 256 -n 32 --no-peer --disk-rate 1G --temp 1 --repeats 1 \
      --out OUT/$side-$i > OUT/$side-$i.log 2>&1
  done
done
echo done > OUT/done
