#!/bin/bash
# An interleaved A/B of scripts/bench_moe.py between two checkouts of flexinfer (git worktrees):
# each round runs OLD's bench then NEW's, flexinfer only, at 2 threads, -c 256, 32 tokens,
# temperature 1, reads capped at 1 GB/s, under SCHED_FIFO (docs/benchmarks.md's A/Bs). Needs root.
#
#   bash scripts/ab_moe.sh OLD_DIR NEW_DIR OUT_DIR [BUDGETS [ROUNDS]]     (default 4G,8G and 3)
#
# MODELS (default: the synthetic Qwen3-30B-A3B uniform and zipf:1 files under /work/models) and
# PYTHON (default: python) may be set. Each run's results go to OUT_DIR/rK-old.json and
# rK-new.json, its log beside them; summarise with
#   python docs/bench/qwen3-30b-a3b-xeon-ab/summary.py OUT_DIR
set -eu
old=$(realpath "$1") new=$(realpath "$2") out=$(realpath -m "$3")
budgets=${4:-4G,8G} rounds=${5:-3} py=${PYTHON:-python}
models=${MODELS:-/work/models/qwen3-30b-a3b-uniform.gguf /work/models/qwen3-30b-a3b-zipf1.gguf}
mkdir -p "$out"
for round in $(seq 1 "$rounds"); do
  for side in old new; do
    tree=$old
    [ "$side" = new ] && tree=$new
    run="$out/r$round-$side"
    # shellcheck disable=SC2086 # MODELS is a list of paths
    (cd "$tree" && PYTHONPATH="$tree" chrt -f 10 "$py" scripts/bench_moe.py $models \
        --budgets "$budgets" -t 2 -c 256 -n 32 --no-peer --disk-rate 1G --temp 1 \
        --out "$run") > "$run.log" 2>&1
    cp "$run/results.json" "$run.json"
  done
done
echo "done: $out"
