"""Where a decode token's time goes with and without the runner-up read-ahead (issue 14,
seventeenth session; the read-ahead is runners.patch in this directory, not on main). Run from a
checkout with the patch applied, as root:

    AHEAD=runners|'' URGENT=1|'' THREADS=2|1 chrt -f 10 python \
        docs/bench/qwen3-30b-a3b-epyc-runners/insitu.py MODEL BUDGET

Decodes 32 tokens after the bench's POINT_PROMPT (temperature 1, seed 1, an empty
FLEXINFER_HOME) at BUDGET, in an I/O cgroup capping reads of the model's disk at 1 GB/s, page
cache dropped first. AHEAD picks the read-ahead (Options.expert_prefetch), URGENT=1 runs its
thread one real-time priority above the caller's, THREADS sets ggml's threads (2). Prints one
line: tok/s, ggml's compute and the waits for expert reads (ms a token), the layers a token
that waited or repacked a guess, and the read-ahead's experts read and of them picked.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from decode_timing import Timer, decode  # noqa: E402  (the working directory's flexinfer)
import flexinfer.experts as ex  # noqa: E402
import flexinfer.ggml_ops as go  # noqa: E402

timer = Timer()
timer.wrap(go.Backend, "compute")
timer.wrap(ex.ExpertStore, "wait")
timer.wrap(ex.ExpertStore, "finish")  # once per layer that waited for reads or repacked a guess
model, budget = sys.argv[1], sys.argv[2]
tok, seconds, experts = decode(model, budget, timer, rate=1 << 30,
                               threads=int(os.environ.get("THREADS") or 2),
                               expert_prefetch=os.environ.get("AHEAD") or False)
print(f"{os.path.basename(model)} {budget} ahead={os.environ.get('AHEAD') or 'off'} "
      f"urgent={os.environ.get('URGENT') or 0}: {tok / seconds:.3f} tok/s, compute "
      f"{timer.ms_a_token('compute', tok):.1f} ms, waits {timer.ms_a_token('wait', tok):.1f} ms, "
      f"{timer.calls['finish'] / tok:.1f} layers waited a token; read ahead "
      f"{experts.get('prefetched', 0)}, picked {experts.get('prefetch_used', 0)}")
