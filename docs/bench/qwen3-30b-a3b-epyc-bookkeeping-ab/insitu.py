"""Per-token time of the expert store's calls and of ggml's computes, in a decode run
(issue 14, sixteenth session). Run from a checkout (its flexinfer is the one measured):

    chrt -f 10 python docs/bench/qwen3-30b-a3b-epyc-bookkeeping-ab/insitu.py MODEL [BUDGET]

Decodes 32 tokens after the bench's POINT_PROMPT (temperature 1, seed 1, an empty
FLEXINFER_HOME, no disk cap) at BUDGET (default 8G), and prints for each wrapped call its ms a
token, us a call and calls a token. Wrapping adds a few us a call.
"""
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())
os.environ["FLEXINFER_HOME"] = tempfile.mkdtemp(prefix="insitu-")
import flexinfer  # noqa: E402
import flexinfer.experts as ex  # noqa: E402
import flexinfer.ggml_ops as go  # noqa: E402

PROMPT = ("The committee met on Tuesday morning to review the budget for the new public "
          "library, and after a long debate they agreed to")
T0 = time.perf_counter
spent, calls, on = collections.defaultdict(float), collections.Counter(), [False]


def wrap(cls, name):
    real = getattr(cls, name)

    def timed(*a, **k):
        t = T0()
        try:
            return real(*a, **k)
        finally:
            if on[0]:
                spent[name] += T0() - t
                calls[name] += 1
    setattr(cls, name, timed)


for n in ("begin", "_count", "_lookup", "_release_spares", "finish"):
    wrap(ex.ExpertStore, n)
wrap(go.Backend, "compute")
budget = sys.argv[2] if len(sys.argv) > 2 else "8G"
with flexinfer.load(sys.argv[1], n_ctx=256, n_threads=2, memory_budget=budget) as m:
    n = 0
    for _ in m.generate(PROMPT, max_tokens=33, temperature=1.0, seed=1, ignore_eos=True):
        n += 1
        if n == 1:
            on[0], t = True, T0()
    seconds = T0() - t
tokens = n - 1
print(f"decode {tokens / seconds:.3f} tok/s, {1e3 * seconds / tokens:.1f} ms a token")
for k in spent:
    print(f"  {k:16s} {1e3 * spent[k] / tokens:7.2f} ms/token {1e6 * spent[k] / calls[k]:8.1f} "
          f"us/call {calls[k] / tokens:6.1f} calls/token")
