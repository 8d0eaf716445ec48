"""Which expert cache policy would have held the bench's text best? (issue 14, eighteenth
session.) Run from a checkout of main:

    python docs/bench/qwen3-30b-a3b-epyc-pins/pins_replay.py MODEL [--tokens 128]
        [--caches 3.0245G,7.024G]

In this process (no cap, 8 GB, temperature 1, seed 1, -c 256), as scripts/bench_moe.py sets a
point up: the warm-up (48 tokens of WARMUP_PROMPT in an empty FLEXINFER_HOME, whose counts and
trace the points start from), then the point's text (POINT_PROMPT, --tokens tokens), its picks
recorded with each MoE step's residual. The picks do not depend on the cache: they are the bench
run's. Then, for caches of the given sizes (the expert capacity of the bench's 4 and 8 GB plans),
it replays the point's picks through:

- the store's policy: the most counted experts of the warm-up pinned (a share of the capacity:
  0, 0.25, 0.5), the rest least recently used; the share the plan chooses is marked;
- Belady's (the expert used furthest in the future evicted: no online policy does better);
- frequency with recency: each layer's scores decay by D a step and a pick adds 1/K, plus W times
  the router's softmax over every expert (its runners-up too, from the residual on the host);
  the lowest score evicted, the least recent on a tie (unpinned).

and prints the misses a decode token and the decode hit rate of each.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from bench_moe import WARMUP_PROMPT  # noqa: E402
from decode_timing import decode  # noqa: E402
from expert_guesses import guess_logits, recording, routers  # noqa: E402

import flexinfer  # noqa: E402
from flexinfer import experts as ex  # noqa: E402
from flexinfer.budget import parse_size  # noqa: E402
from flexinfer.config import ModelConfig  # noqa: E402
from flexinfer.gguf_file import read_gguf  # noqa: E402


def warm_counts(model: str) -> np.ndarray:
    """The warm-up's counts, as the bench's points read them."""
    os.environ["FLEXINFER_HOME"] = home = tempfile.mkdtemp(prefix="pins-warm-")
    with flexinfer.load(model, n_ctx=256, n_threads=2, memory_budget="8G") as m:
        for _ in m.generate(WARMUP_PROMPT, max_tokens=48, temperature=1.0, seed=1,
                            ignore_eos=True):
            pass
    f = next((Path(home) / "experts").glob("*.json"))
    return np.asarray(json.loads(f.read_text())["counts"]), f


def record_steps(model: str, tokens: int):
    """[(layer, (T, K) picks, the router's softmax (T, E))] of the point's steps."""
    R, _, _, eps = routers(model)
    with recording() as (picks, residual):
        decode(model, "8G", tokens=tokens)
    out = []
    for i, (il, ids) in enumerate(picks):
        lg = guess_logits(residual[i], R[il], eps)
        p = np.exp(lg - lg.max(axis=1, keepdims=True))
        out.append((il, ids, p / p.sum(axis=1, keepdims=True)))
    return out


def as_sets(steps):
    """record_steps' steps as replay() takes them: [(layer, sorted picks, a decode step?, the
    router's softmax (E,))] (a prompt step's softmax: the largest over its tokens)."""
    return [(il, sorted(set(ids.ravel().tolist())), ids.shape[0] == 1, p.max(axis=0))
            for il, ids, p in steps]


def record(model: str, tokens: int):
    """The point's steps, as replay() takes them."""
    return as_sets(record_steps(model, tokens))


def replay(steps, pins, slots: int, k: int, shape, key, update=None):
    """(misses a decode token, decode hit rate) of a cache of `slots` experts, `pins` held, the
    rest evicted lowest `key` first."""
    res, last, score = set(), {}, np.zeros(shape)
    nxt, seen = [None] * len(steps), {}
    for i in range(len(steps) - 1, -1, -1):
        il, need = steps[i][0], steps[i][1]
        nxt[i] = {e: seen.get((il, e), 1 << 60) for e in need}
        for e in need:
            seen[(il, e)] = i
    free = slots - len(pins)
    hits = misses = tokens = 0
    first = min(s[0] for s in steps)
    for i, (il, need, single, p) in enumerate(steps):
        tokens += single and il == first
        if update:
            update(score, il, need, p)
        for e in need:
            if (il, e) in pins or (il, e) in res:
                hits += single
            else:
                misses += single
                res.add((il, e))
            last[(il, e)] = (i, nxt[i][e])
        over = len(res) - free
        if over > 0:
            now = {(il, e) for e in need}
            cand = sorted((x for x in res if x not in now), key=lambda x: key(x, last, score))
            res.difference_update(cand[:over])
    return misses / tokens, hits / (hits + misses)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--caches", default="3.0245G,7.024G")
    a = p.parse_args()
    g = read_gguf(a.model)
    names = [n for n in g.tensors if n.endswith("_exps.weight")]
    k = ModelConfig.from_gguf(g).n_expert_used
    unit = {l: b // ex.g_n_expert(g, names) for l, b in ex.layer_expert_bytes(g, names).items()}
    counts, counts_file = warm_counts(a.model)
    steps = record(a.model, a.tokens)
    print(f"{os.path.basename(a.model)}: {a.tokens} tokens after the bench's prompt\n")
    print("| cache | policy | misses a token | decode hit rate |\n|---|---|---|---|")
    for cap in (parse_size(c) for c in a.caches.split(",")):
        slots = cap // max(unit.values())
        chosen = ex.pin_share(g, names, cap, counts_file, k)
        rows = []
        for share in ex.PIN_SHARES:
            pins = ex._pins(counts, unit, cap, share)
            mark = " (the plan's)" if share == chosen else ""
            rows.append((f"pins {share}, LRU{mark}",
                         replay(steps, pins, slots, k, counts.shape, lambda x, t, s: t[x][0])))
        rows.append(("Belady (no pins)",
                     replay(steps, set(), slots, k, counts.shape, lambda x, t, s: -t[x][1])))
        pins = ex._pins(counts, unit, cap, chosen)
        for d, w in ((0.9, 0.0), (0.9, 0.05), (0.95, 0.05), (0.9, 0.2)):
            def up(s, il, need, prob, d=d, w=w):
                s[il] *= d
                s[il] += w * prob
                s[il, need] += 1.0 / k
            rows.append((f"pins {chosen}, decay {d} + {w} x router",
                         replay(steps, pins, slots, k, counts.shape,
                                lambda x, t, s: (s[x], t[x][0]), up)))
        for name, (m, h) in rows:
            print(f"| {cap / 1e9:.3f} GB | {name} | {m:.2f} | {h:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
