"""Where a decode token's MoE layers spend their time, in-process (issue 14, sixteenth session).

    python miss_layers.py MODEL BUDGET RATE [--old] [--one]

Decodes 32 tokens after the bench's POINT_PROMPT (temperature 1, seed 1) with reads capped at
RATE bytes/s (an I/O cgroup, as bench_moe --disk-rate), the page cache dropped and an empty
FLEXINFER_HOME (no counts: every point starts cold), and prints tok/s, the layers with misses a
token, a miss layer's time, a hit layer's begin(), and the expert reads' start, read and
conversion times. With hits-first.patch applied (on f332bc0): --old turns the cached picks first
off (the three parts, as on main), --one computes them on one thread. Needs root (the cgroup).
"""
import os
import statistics as st
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())
import flexinfer  # noqa: E402
import flexinfer.engine as en  # noqa: E402
import flexinfer.experts as ex  # noqa: E402
from flexinfer.disk_cap import DiskCap  # noqa: E402

PROMPT = ("The committee met on Tuesday morning to review the budget for the new public "
          "library, and after a long debate they agreed to")
T0 = time.perf_counter
model, budget, rate = sys.argv[1], sys.argv[2], int(float(sys.argv[3]))
os.environ["FLEXINFER_DISK_RATE"] = str(rate)
os.environ["FLEXINFER_HOME"] = tempfile.mkdtemp(prefix="miss-layers-")
events, step, decoding = [], {}, [False]

read_run = ex.ExpertStore._read_run


def timed_read_run(self, s, run, stage, headers):
    a = T0()
    read_run(self, s, run, stage, headers)
    if decoding[0]:
        events.append(("run", a - step.get("t0", a), T0() - a, len(run) * s.nb2))


begin, wait, experts_step = ex.ExpertStore.begin, ex.ExpertStore.wait, en.Engine._experts_step


def timed_begin(self, layer, ids):
    step["t0"] = a = T0()
    step["miss"] = begin(self, layer, ids)
    step["begin"] = T0() - a
    return step["miss"]


def timed_step(self, gs, il, T):
    a = T0()
    experts_step(self, gs, il, T)
    if decoding[0]:
        events.append(("miss" if step["miss"] else "hit", step["begin"], T0() - a, 0))


ex.ExpertStore._read_run, ex.ExpertStore.begin = timed_read_run, timed_begin
en.Engine._experts_step = timed_step
if "--old" in sys.argv:
    en.Engine._hits_then_misses = lambda self, first, il, ids: False
if "--one" in sys.argv:
    en.HITS_THREADS = 1
cap = DiskCap.create(model, rate)
cap.join()
os.system("sync; echo 3 > /proc/sys/vm/drop_caches")
try:
    with flexinfer.load(model, n_ctx=256, n_threads=2, memory_budget=budget) as m:
        tokens = []
        for piece in m.generate(PROMPT, max_tokens=33, temperature=1.0, seed=1, ignore_eos=True):
            tokens.append(piece.token)
            if len(tokens) == 1:
                decoding[0], t = True, T0()
        seconds = T0() - t
finally:
    cap.leave()
    cap.remove()
n = len(tokens) - 1
kinds = {k: [e for e in events if e[0] == k] for k in ("hit", "miss", "run")}
print(f"tokens {' '.join(map(str, tokens))}")
print(f"{n / seconds:.3f} tok/s; layers with misses a token {len(kinds['miss']) / n:.2f}; "
      f"a miss layer {1e3 * st.median(e[2] for e in kinds['miss']):.2f} ms; "
      f"a hit layer's begin {1e3 * st.median(e[1] for e in kinds['hit']):.3f} ms; "
      f"expert MB read a token {sum(e[3] for e in kinds['run']) / n / 1e6:.1f}; "
      f"a read starts {1e3 * st.median(e[1] for e in kinds['run']):.2f} ms after begin and "
      f"takes {1e3 * st.median(e[2] for e in kinds['run']):.2f} ms (median)")
