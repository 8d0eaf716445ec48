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
import tempfile
import time

sys.path.insert(0, os.getcwd())
os.environ["FLEXINFER_HOME"] = tempfile.mkdtemp(prefix="runners-")
import flexinfer  # noqa: E402
import flexinfer.experts as ex  # noqa: E402
import flexinfer.ggml_ops as go  # noqa: E402
from flexinfer.disk_cap import DiskCap  # noqa: E402

PROMPT = ("The committee met on Tuesday morning to review the budget for the new public "
          "library, and after a long debate they agreed to")
T0 = time.perf_counter
on = [False]
spent = {"compute": 0.0, "wait": 0.0, "finish": 0}


def wrap(cls, name, key):
    real = getattr(cls, name)

    def timed(*a, **k):
        t = T0()
        try:
            return real(*a, **k)
        finally:
            if on[0]:
                spent[key] += T0() - t if key != "finish" else 1
    setattr(cls, name, timed)


wrap(go.Backend, "compute", "compute")
wrap(ex.ExpertStore, "wait", "wait")
wrap(ex.ExpertStore, "finish", "finish")  # once per layer that had misses
model, budget = sys.argv[1], sys.argv[2]
cap = DiskCap.create(model, 1 << 30)
cap.join()
os.system("sync; echo 3 > /proc/sys/vm/drop_caches")
try:
    with flexinfer.load(model, n_ctx=256, n_threads=int(os.environ.get("THREADS") or 2),
                        memory_budget=budget,
                        expert_prefetch=os.environ.get("AHEAD") or False) as m:
        n = 0
        for _ in m.generate(PROMPT, max_tokens=33, temperature=1.0, seed=1, ignore_eos=True):
            n += 1
            if n == 1:
                on[0], t = True, T0()
        seconds = T0() - t
        st = m._experts
        ahead = (st.prefetched, st.prefetch_used)
finally:
    cap.leave()
    cap.remove()
tok = n - 1
print(f"{os.path.basename(model)} {budget} ahead={os.environ.get('AHEAD') or 'off'} "
      f"urgent={os.environ.get('URGENT') or 0}: {tok / seconds:.3f} tok/s, compute "
      f"{1e3 * spent['compute'] / tok:.1f} ms, waits {1e3 * spent['wait'] / tok:.1f} ms, "
      f"{spent['finish'] / tok:.1f} layers waited a token; read ahead {ahead[0]}, picked {ahead[1]}")
