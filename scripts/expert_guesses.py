"""How well can an expert cache's misses be read before the router asks for them?

    python scripts/expert_guesses.py /work/models/qwen3-30b-a3b-uniform.gguf \
        --caches 1.04G,3.04G,7.04G -n 32 --temp 1

Decodes the MoE bench's prompt (bench_moe.py's: 16 tokens, then -n tokens, seeded sampling) in
this process, recording each layer's picks and the residual its attention made (the read-ahead's
input), as the engine hands them to the expert store. Then, for caches of the given sizes (least
recently used, empty before the prompt, as the bench's points at 2 and 4 GB pin nothing), it
replays the picks and asks, for each decode step's layer l: had layer l's router been applied to
the residual of layer l - d (d layers ahead, as `--expert-prefetch` does with d = 1) and its
top r experts been read when not cached, how many of those reads would the step use (precision),
and how many of the step's misses would they have covered (recall)?

A miss costs its read on the computing thread (2.65 ms at 1 GB/s for Qwen3-30B-A3B, about two
layers' compute); a guess read in time hides it, a wrong one holds the disk from the next miss.
The wrapped method is the engine's own; nothing else in the run changes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flexinfer  # noqa: E402
import flexinfer.engine as en  # noqa: E402
import flexinfer.experts as ex  # noqa: E402
from flexinfer.bench.sweep import prompt_text  # noqa: E402
from flexinfer.budget import parse_size  # noqa: E402
from flexinfer.config import ModelConfig  # noqa: E402
from flexinfer.errors import FlexInferError  # noqa: E402
from flexinfer.gguf_file import read_gguf  # noqa: E402
from flexinfer.models import specs_for  # noqa: E402


@contextlib.contextmanager
def recording():
    """Inside, every MoE step the engine runs is recorded as it hands it to the expert store
    (Engine._experts_step, after graph A): yields ([(layer, (T, K) picks)], {step index: (T,
    n_embd) residual}), filled as the steps run."""
    picks, residual = [], {}
    step = en.Engine._experts_step

    def on_step(self, gs, il, T):
        k = self.cfg.n_expert_used
        picks.append((il, np.array(self.inputs.ids[:T * k], dtype=np.int64).reshape(T, k)))
        residual[len(picks) - 1] = np.array(self.inputs.residual(T), dtype=np.float32)
        return step(self, gs, il, T)

    en.Engine._experts_step = on_step
    try:
        yield picks, residual
    finally:
        en.Engine._experts_step = step


def record(model: str, a) -> tuple[list, dict]:
    """recording()'s picks and residuals of a decode of the bench's prompt."""
    with recording() as (picks, residual):
        with flexinfer.load(model, n_ctx=a.ctx, n_threads=a.threads,
                            memory_budget=a.budget) as m:
            for _ in m.generate(prompt_text(a.prompt_tokens), max_tokens=a.tokens,
                                temperature=a.temp, seed=a.seed, ignore_eos=True):
                pass
    return picks, residual


def routers(model: str) -> tuple[dict[int, tuple], dict[int, int], int, float]:
    """(layer -> its router as the read-ahead holds it, experts.host_router; layer -> its
    experts' bytes; E; the norm's epsilon)."""
    g = read_gguf(model)
    cfg = ModelConfig.from_gguf(g)
    names = ex.expert_names(specs_for(g, cfg))
    if not names:
        raise FlexInferError(f"{model}: no expert tensors (not a mixture of experts)")
    out = {int(r.split(".")[1]): ex.host_router(g, r, nm) for r, nm in ex.router_names(names, g)}
    return out, ex.layer_expert_bytes(g, names), ex.g_n_expert(g, names), cfg.norm_eps


def guess_logits(x: np.ndarray, router: tuple, eps: float) -> np.ndarray:
    """A router's logits for residual rows x, as ExpertStore.prefetch ranks them: the rms norm
    only matters with a bias after it (gpt-oss)."""
    wn, bias = router
    logits = x @ wn
    if bias is not None:
        logits = logits / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps) + bias
    return logits


def replay(picks, residual, R, unit: int, capacity: int, distances, ranks, eps: float) -> dict:
    """{(d, r): [useful reads, reads, misses]} over the decode steps' layers d and up."""
    order: OrderedDict = OrderedDict()
    out = {(d, r): [0, 0, 0] for d in distances for r in ranks}
    for i, (layer, ids) in enumerate(picks):
        need = set(np.unique(ids).tolist())
        cached = {e for (l, e) in order if l == layer}
        miss = need - cached
        for e in need:
            order[(layer, e)] = None
            order.move_to_end((layer, e))
        while len(order) * unit > capacity:
            order.popitem(last=False)
        if ids.shape[0] != 1:  # a prompt batch: not a decode step
            continue
        for d in distances:
            j = i - d  # the fetch d layers before, in the same step
            if layer - d < 0 or j not in residual or picks[j][0] != layer - d:
                continue
            logits = guess_logits(residual[j][:1], R[layer], eps)[0]
            ranked = np.argsort(-logits)
            for r in ranks:
                reads = set(ranked[:r].tolist()) - cached
                st = out[(d, r)]
                st[0] += len(reads & miss)
                st[1] += len(reads)
                st[2] += len(miss)
    return out


def counts(text: str, option: str) -> list[int]:
    """'1,2' -> [1, 2]: positive whole numbers, else FlexInferError naming the option."""
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise FlexInferError(f"{option}: expected positive whole numbers separated by commas, "
                             f"got {text!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--caches", default="1.04G,3.04G,7.04G", help="expert cache sizes replayed "
                   "(the bench's 2, 4 and 8 GB points hold about these)")
    p.add_argument("--distances", default="1,2", help="layers ahead the guess is made")
    p.add_argument("--ranks", default="2,4,8,12,16", help="top-r guesses read")
    p.add_argument("--budget", default="8G", help="the recording run's budget (the picks do not "
                   "depend on it: streamed runs are bit-exact)")
    p.add_argument("--threads", "-t", type=int, default=2)
    p.add_argument("--ctx", "-c", type=int, default=256)
    p.add_argument("--tokens", "-n", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--temp", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    try:
        caches = [parse_size(c, "--caches") for c in a.caches.split(",")]
        distances, ranks = counts(a.distances, "--distances"), counts(a.ranks, "--ranks")
        R, per_layer, n_expert, eps = routers(a.model)
        picks, residual = record(a.model, a)
    except FlexInferError as e:
        print(f"expert_guesses: {e}", file=sys.stderr)
        return 2
    if not R:
        print(f"expert_guesses: {a.model}: no router this reads (F32/F16)", file=sys.stderr)
        return 2
    unit = max(per_layer.values()) // n_expert
    steps = sum(1 for _, ids in picks if ids.shape[0] == 1) / len(per_layer)
    if not steps:
        print(f"expert_guesses: {a.model}: no decode step was recorded (-n {a.tokens})",
              file=sys.stderr)
        return 2
    print(f"{Path(a.model).name}: {steps:.0f} decode tokens, an expert {unit / 1e6:.2f} MB\n")
    print("| cache | layers ahead | top r read | reads/token | of them used | precision | "
          "misses/token | recall of misses |")
    print("|---|---|---|---|---|---|---|---|")
    for cap in caches:
        res = replay(picks, residual, R, unit, cap, distances, ranks, eps)
        for (d, r), (used, reads, misses) in sorted(res.items()):
            print(f"| {cap / 1e9:.2f} GB | {d} | {r} | {reads / steps:.1f} | {used / steps:.1f} | "
                  f"{used / max(reads, 1):.2f} | {misses / steps:.1f} | "
                  f"{used / max(misses, 1):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
