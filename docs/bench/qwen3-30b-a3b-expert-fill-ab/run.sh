#!/bin/bash
cd /work/main
for r in 1 2 3; do
 for mode in off on; do
  extra=""; [ $mode = on ] && extra="--expert-fill"
  chrt -f 10 .venv/bin/python scripts/bench_moe.py /work/models/qwen3-30b-a3b-uniform.gguf /work/models/qwen3-30b-a3b-zipf1.gguf --budgets 2G,4G,8G -t 2 -c 256 -n 32 --no-peer --disk-rate 1G --temp 1 $extra --out DIR/$mode-$r
  echo "$mode $r done $(date +%T)"
 done
done
