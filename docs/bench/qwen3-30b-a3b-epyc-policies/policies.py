"""Would another expert cache policy hold the 4 GB point's text better than the store's
least-recently-used one? (issue 14, twentieth session.) Run from a checkout of main:

    python docs/bench/qwen3-30b-a3b-epyc-policies/policies.py MODEL [--tokens 128]
        [--cache 3.0245G] [--sizes 2.65G,3.32G,3.58G,3.98G,5.31G]

As pins_replay.py (next door) does: in this process the bench's warm-up (which the picks do not
depend on), then the point's text (POINT_PROMPT, --tokens tokens, temperature 1, seed 1), every
MoE step's picks recorded with each token's choices and the router's softmax. Then the steps are
replayed through caches of `--cache` bytes (the expert capacity of the bench's 4 GB plan), empty
before the prompt, as the bench's points start with no pins at 4 GB:

- the store's policy (least recently used) and Belady's (the expert used furthest ahead evicted:
  the floor of any policy that reads only what a step misses), through pins_replay.replay;
- textbook policies: segmented LRU, LRU-K, ARC, bimodal insertion (BIP), random;
- LRU with recency counted in tokens (a prompt's experts ordered by how many of its tokens
  picked them, across layers, instead of by layer);
- the cache split between layers (equal quotas, or by how many experts the prompt used there);
- the router's latest softmax as the score (the expert it rates least likely evicted);
- read-ahead of the router's runners-up (ranked 9th and on at a decode step, read when not
  cached, to the recent end of the cache or to the old one), with the guesses it reads a token.

and the LRU and Belady misses at other cache sizes (--sizes). Prints misses a decode token.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "qwen3-30b-a3b-epyc-pins"))
from pins_replay import as_sets, record_steps, replay, warm_counts  # noqa: E402

from flexinfer import experts as ex  # noqa: E402
from flexinfer.budget import parse_size  # noqa: E402
from flexinfer.errors import FlexInferError  # noqa: E402
from one_line import run  # noqa: E402
from flexinfer.gguf_file import read_gguf  # noqa: E402


class Policy:
    """A cache of `slots` experts: step() takes a step's picks, returns the ones it missed; evict()
    names the victim among the residents not picked by this step."""

    def __init__(self, slots: int):
        self.slots, self.res, self.token = slots, {}, 0

    def step(self, i, il, ids, p) -> int:
        self.token += il == 0
        es, cs = np.unique(ids, return_counts=True)
        missed, now = 0, set()
        for e, c in zip(es.tolist(), cs.tolist()):
            key = (il, e)
            now.add(key)
            missed += not self.has(key)
            self.touch(key, c / ids.shape[0], i, p)
        self.after(il, ids, p, now)
        while self.size() > self.slots:
            self.drop(self.evict(now))
        return missed

    def has(self, key) -> bool:
        return key in self.res

    def size(self) -> int:
        return len(self.res)

    def after(self, il, ids, p, now):
        pass

    def drop(self, key):
        del self.res[key]

    def evict(self, now):
        return min((k for k in self.res if k not in now), key=self.res.__getitem__)


class TokenLRU(Policy):
    """Recency in tokens; within a token, the experts its step picked least often go first."""

    def touch(self, key, share, i, p):
        self.res[key] = (self.token, share, key[0])


class RouterScore(Policy):
    """The expert the router's latest softmax at its layer rates least likely goes first."""

    def __init__(self, slots):
        super().__init__(slots)
        self.score = {}

    def touch(self, key, share, i, p):
        self.res[key] = i

    def after(self, il, ids, p, now):
        self.score[il] = p.max(axis=0)

    def evict(self, now):
        return min((k for k in self.res if k not in now),
                   key=lambda k: (self.score[k[0]][k[1]], self.res[k]))


class Quotas(Policy):
    """LRU within layers; the victim comes from the layer furthest over its quota."""

    def __init__(self, slots, quota):
        super().__init__(slots)
        self.quota, self.n = quota, Counter()

    def touch(self, key, share, i, p):
        self.n[key[0]] += key not in self.res
        self.res[key] = i

    def drop(self, key):
        del self.res[key]
        self.n[key[0]] -= 1

    def evict(self, now):
        return min((k for k in self.res if k not in now),
                   key=lambda k: (self.quota[k[0]] - self.n[k[0]], self.res[k]))


class Ordered(Policy):
    """Policies kept as ordered lists (the old end first)."""

    def __init__(self, slots):
        super().__init__(slots)
        self.res = OrderedDict()

    def evict(self, now):
        return next(k for k in self.res if k not in now)


class BIP(Ordered):
    """A new expert goes to the recent end with probability eps, else to the old end."""

    def __init__(self, slots, eps, seed=0):
        super().__init__(slots)
        self.eps, self.rng = eps, random.Random(seed)

    def touch(self, key, share, i, p):
        new = key not in self.res
        self.res[key] = None
        self.res.move_to_end(key, last=not new or self.rng.random() < self.eps)


class SLRU(Ordered):
    """A probation list and a protected one (a share of the slots); a hit on probation
    promotes, the protected list's overflow goes back to probation's recent end."""

    def __init__(self, slots, share):
        super().__init__(slots)
        self.cap, self.prot = int(slots * share), OrderedDict()

    def touch(self, key, share, i, p):
        if key in self.prot:
            self.prot.move_to_end(key)
        elif key in self.res:
            del self.res[key]
            self.prot[key] = None
            if len(self.prot) > self.cap:
                self.res[self.prot.popitem(last=False)[0]] = None
        else:
            self.res[key] = None

    def has(self, key) -> bool:
        return key in self.res or key in self.prot

    def size(self) -> int:
        return len(self.res) + len(self.prot)

    def evict(self, now):
        for k in self.res:
            if k not in now:
                return k
        return next(k for k in self.prot if k not in now)

    def drop(self, key):
        if key in self.res:
            del self.res[key]
        else:
            del self.prot[key]


class LRUK(Policy):
    """LRU-K: the expert whose K-th most recent use is oldest goes first (fewer than K uses:
    first, by their last); its history outlives its eviction."""

    def __init__(self, slots, k):
        super().__init__(slots)
        self.k, self.hist = k, {}

    def touch(self, key, share, i, p):
        h = self.hist.setdefault(key, [])
        h.append(i)
        del h[:-self.k]
        self.res[key] = None

    def evict(self, now):
        def age(k):
            h = self.hist[k]
            return (h[0] if len(h) >= self.k else -1, h[-1])
        return min((k for k in self.res if k not in now), key=age)


class RandomEvict(Policy):
    def __init__(self, slots, seed=0):
        super().__init__(slots)
        self.rng = random.Random(seed)

    def touch(self, key, share, i, p):
        self.res[key] = None

    def evict(self, now):
        while True:
            k = self.rng.choice(list(self.res))
            if k not in now:
                return k


def count(steps, policy) -> float:
    """Misses a decode token."""
    missed = tokens = 0
    for i, (il, ids, p) in enumerate(steps):
        one = ids.shape[0] == 1
        tokens += one and il == 0
        missed += policy.step(i, il, ids, p) * one
    return missed / tokens


def arc(steps, slots) -> float:
    """ARC (Megiddo and Modha): recency and frequency lists whose split adapts to ghost hits."""
    t1, t2, b1, b2, target = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict(), 0.0
    missed = tokens = 0

    def replace(now, in_b2):
        first = (t1, b1) if t1 and (len(t1) > target or (in_b2 and len(t1) == target)) else (t2, b2)
        for src, ghost in (first, (t2, b2) if first[0] is t1 else (t1, b1)):
            for k in src:
                if k not in now:
                    del src[k]
                    ghost[k] = None
                    return

    for il, ids, p in steps:
        one = ids.shape[0] == 1
        tokens += one and il == 0
        now = {(il, e) for e in np.unique(ids).tolist()}
        for x in sorted(now):
            if x in t1:
                del t1[x]
                t2[x] = None
            elif x in t2:
                t2.move_to_end(x)
            else:
                missed += one
                if x in b1 or x in b2:
                    if x in b1:
                        target = min(slots, target + max(len(b2) / max(len(b1), 1), 1))
                        del b1[x]
                    else:
                        target = max(0.0, target - max(len(b1) / max(len(b2), 1), 1))
                        del b2[x]
                    replace(now, x in b2)
                    t2[x] = None
                    continue
                if len(t1) + len(b1) >= slots:
                    if len(t1) < slots and b1:
                        b1.popitem(last=False)
                        replace(now, False)
                    else:
                        del t1[next(k for k in t1 if k not in now)]
                elif len(t1) + len(t2) + len(b1) + len(b2) >= slots:
                    if len(t1) + len(t2) + len(b1) + len(b2) >= 2 * slots and b2:
                        b2.popitem(last=False)
                    if len(t1) + len(t2) >= slots:
                        replace(now, False)
                t1[x] = None
    return missed / tokens


def runners(steps, slots, r, warm) -> tuple[float, float]:
    """LRU plus, after each decode step, the router's next r experts (ranked after its picks)
    read when not cached, to the recent end (warm) or the old end: (misses, guesses) a token."""
    res, missed, guessed, tokens = OrderedDict(), 0, 0, 0
    for il, ids, p in steps:
        one = ids.shape[0] == 1
        tokens += one and il == 0
        now = {(il, e) for e in np.unique(ids).tolist()}
        for x in sorted(now):
            missed += one and x not in res
            res[x] = None
            res.move_to_end(x)
        if one:
            k = ids.shape[1]
            for e in np.argsort(-p[0])[k:k + r].tolist():
                if (il, e) not in res:
                    guessed += 1
                    res[(il, e)] = None
                    res.move_to_end((il, e), last=warm)
                    now.add((il, e))
        while len(res) > slots:
            del res[next(x for x in res if x not in now)]
    return missed / tokens, guessed / tokens


def lru_belady(sets, slots, k, shape) -> tuple[float, float]:
    return (replay(sets, set(), slots, k, shape, lambda x, t, s: t[x][0])[0],
            replay(sets, set(), slots, k, shape, lambda x, t, s: -t[x][1])[0])


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("model")
    a.add_argument("--tokens", type=int, default=128)
    a.add_argument("--cache", default="3.0245G")
    a.add_argument("--sizes", default="2.65G,3.32G,3.58G,3.98G,5.31G")
    o = a.parse_args()
    cache = parse_size(o.cache, "--cache")  # before minutes of recording
    sizes = [parse_size(x, "--sizes") for x in o.sizes.split(",")]
    g = read_gguf(o.model)
    names = [n for n in g.tensors if n.endswith("_exps.weight")]
    if not names:
        raise FlexInferError(f"{o.model}: no expert tensors (ffn_*_exps): not a mixture of experts")
    unit = max(b // ex.g_n_expert(g, names) for b in ex.layer_expert_bytes(g, names).values())
    warm_counts(o.model)
    steps = record_steps(o.model, o.tokens)
    sets = as_sets(steps)
    k, n_layer, n_expert = steps[-1][1].shape[1], max(s[0] for s in steps) + 1, steps[0][2].shape[1]
    shape = (n_layer, n_expert)
    slots = cache // unit
    prompt = {il: len(np.unique(ids)) for il, ids, p in steps if ids.shape[0] > 1}
    print(f"{os.path.basename(o.model)}: {o.tokens} tokens after the bench's prompt; a cache of "
          f"{slots} experts ({slots * unit / 1e9:.3f} GB); misses a decode token\n")
    print("| policy | misses a token | guesses read a token |\n|---|---|---|")
    lru, belady = lru_belady(sets, slots, k, shape)
    rows = [("least recently used (the store's)", lru), ("Belady (the floor)", belady),
            ("least recently used, recency in tokens, a token's least picked first",
             count(steps, TokenLRU(slots))),
            ("segmented LRU, a fifth protected", count(steps, SLRU(slots, 0.2))),
            ("segmented LRU, half protected", count(steps, SLRU(slots, 0.5))),
            ("segmented LRU, four fifths protected", count(steps, SLRU(slots, 0.8))),
            ("LRU-2", count(steps, LRUK(slots, 2))), ("LRU-3", count(steps, LRUK(slots, 3))),
            ("ARC", arc(steps, slots)),
            ("bimodal insertion, 1/4 to the recent end", count(steps, BIP(slots, 0.25))),
            ("bimodal insertion, 1/2 to the recent end", count(steps, BIP(slots, 0.5))),
            ("random eviction", count(steps, RandomEvict(slots))),
            ("equal quotas a layer", count(steps, Quotas(slots, {l: slots / n_layer
                                                                  for l in range(n_layer)}))),
            ("quotas by the prompt's experts a layer",
             count(steps, Quotas(slots, {l: slots * prompt[l] / sum(prompt.values())
                                         for l in range(n_layer)}))),
            ("the router's latest softmax, the least likely first",
             count(steps, RouterScore(slots)))]
    for name, m in rows:
        print(f"| {name} | {m:.2f} | |", flush=True)
    for r in (1, 2, 4):
        for warm in (True, False):
            m, guesses = runners(steps, slots, r, warm)
            print(f"| LRU + the next {r} of the router read ahead, to the "
                  f"{'recent' if warm else 'old'} end | {m:.2f} | {guesses:.2f} |", flush=True)
    print("\n| cache | experts | LRU | Belady |\n|---|---|---|---|")
    for size in sizes:
        n = size // unit
        m, b = lru_belady(sets, n, k, shape)
        print(f"| {n * unit / 1e9:.2f} GB | {n} | {m:.2f} | {b:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    run(main)
