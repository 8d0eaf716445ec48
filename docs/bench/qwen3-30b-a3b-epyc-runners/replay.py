"""Would the router's runners-up have covered an expert cache's misses? (issue 14, seventeenth
session.) Run from a checkout of main:

    python docs/bench/qwen3-30b-a3b-epyc-runners/replay.py MODEL [--caches 3.04G,7.04G]
        [--ranks 1,2,4,8]

Decodes 32 tokens after the bench's POINT_PROMPT in this process (temperature 1, seed 1, 8 GB,
no cap) and records, for every MoE layer of every step, its picks and the residual its attention
made. Each layer's router applied to that residual on the host (scripts/expert_guesses.py's
guess_logits) ranks the experts; the replay checks first that its top K are the picks. Then, for
least-recently-used caches of the given sizes (empty before the prompt, as the bench's 4 and 8
GB points hold about 3.04 and 7.04 GB of experts), after each step's layer l it "reads" the
experts ranked K+1..K+r there that are not cached, for layer l's next steps, in three ways:

- free: only into room the cache has free, evicting nothing (runners.patch's policy);
- cold: at the least recently used end, evicting as needed;
- warm: at the most recently used end, evicting as needed.

and prints per decode token the misses left (picks not cached when asked for), how many of the
picks a guess had read, and the guesses read. A guess is taken as read the moment it is made: the
replay counts what the guesses could cover, not what a disk would read in time.
"""
import argparse
import os
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from decode_timing import decode  # noqa: E402  (the working directory's flexinfer)
from expert_guesses import guess_logits, recording, routers  # noqa: E402
from flexinfer.budget import parse_size  # noqa: E402


def record(model: str) -> list:
    """[(layer, (T, K) picks, the last token's residual (1, n_embd))] of every MoE step."""
    with recording() as (picks, residual):
        decode(model, "8G")
    return [(il, ids, residual[i][-1:]) for i, (il, ids) in enumerate(picks)]


def replay(rec, ranked, unit: int, capacity: float, k: int, r: int, policy: str):
    order, guessed = OrderedDict(), set()
    misses = covered = reads = tokens = 0
    for (il, ids, _), rank in zip(rec, ranked):
        need = set(ids.reshape(-1).tolist())
        stepping = ids.shape[0] == 1  # a decode step, not the prompt's batch
        if stepping:
            tokens += il == 0
            misses += sum((il, e) not in order for e in need)
            covered += sum((il, e) in guessed for e in need)
        for e in need:
            guessed.discard((il, e))
            order[(il, e)] = None
            order.move_to_end((il, e))
        for e in rank[k:k + r]:
            if (il, e) in order or policy == "free" and (len(order) + 1) * unit > capacity:
                continue
            order[(il, e)] = None
            order.move_to_end((il, e), last=policy == "warm")
            guessed.add((il, e))
            reads += stepping
        while len(order) * unit > capacity:
            guessed.discard(order.popitem(last=False)[0])
    return misses / tokens, covered / tokens, reads / tokens


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--caches", default="3.04G,7.04G")
    p.add_argument("--ranks", default="1,2,4,8")
    a = p.parse_args()
    R, per_layer, n_expert, eps = routers(a.model)
    from flexinfer.config import ModelConfig
    from flexinfer.gguf_file import read_gguf
    k = ModelConfig.from_gguf(read_gguf(a.model)).n_expert_used
    unit = max(per_layer.values()) // n_expert
    rec = record(a.model)
    ranked = [np.argsort(-guess_logits(x, R[il], eps)[0], kind="stable").tolist()
              for il, _, x in rec]
    same = sum(set(rk[:k]) == set(ids[-1].tolist()) for (_, ids, _), rk in zip(rec, ranked))
    print(f"{os.path.basename(a.model)}: the host router's top {k} are the picks at {same} of "
          f"{len(rec)} steps\n")
    print("| cache | policy | r | misses a token | of the picks, read by a guess | guesses read a token |")
    print("|---|---|---|---|---|---|")
    for cap in (parse_size(c, "--caches") for c in a.caches.split(",")):
        base = replay(rec, ranked, unit, cap, k, 0, "free")
        print(f"| {cap / 1e9:.2f} GB | none | 0 | {base[0]:.1f} | 0 | 0 |")
        for policy in ("free", "cold", "warm"):
            for r in (int(x) for x in a.ranks.split(",")):
                m, c, n = replay(rec, ranked, unit, cap, k, r, policy)
                print(f"| {cap / 1e9:.2f} GB | {policy} | {r} | {m:.1f} | {c:.1f} | {n:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
