"""ExpertStore: the `ffn_{gate,up,down}_exps` tensors of a mixture of experts, read an expert at a
time, only for the experts the router chose, and cached.

Layout. Each 3-D expert tensor (ne0, ne1, E) has one header of its full shape at a home address
inside one lazily charged anonymous arena (ggml_ops.LazyMemory: virtual, a page charged when first
written). Expert e's slab is the tensor's file bytes [offset + e*nb2, offset + (e+1)*nb2),
nb2 = ne1 * row bytes, and lives at home + e*nb2, where mul_mat_id reads it (data + e*nb[2]). Only
the slabs of cached experts hold data; the others are never read by the kernels (mul_mat_id visits
only the experts in `ids`). Qwen3-30B-A3B Q4_0: 48 layers x 3 tensors x 128 slabs of 0.88 MB
(2048 x 768 Q4_0, exactly 216 pages); one expert of one layer is 2.65 MB, a layer's 128 are 340 MB.

The unit of the cache is an expert of a layer: its three slabs come and go together. Evicting one
gives its whole pages back at once (MADV_DONTNEED): a slab that is not a whole number of pages
shares its first and last pages with its neighbours, which stay charged (at most 2 pages a slab).
When repacking is on, headers carry a one-page CPU_REPACK buffer's handle (as ggml_ops.Ring does)
and slabs are converted on arrival; a slab of ne1 rows is whole 8-row groups, independent of the
others, so converting slab by slab gives the bytes converting the whole tensor gives.

Reading (begin, wait, finish; fetch). The engine computes a layer's attention and router first
(engine.py) and gives begin the top-K ids of the step's tokens (a prompt batch: their union, read
once). begin starts reading the missing experts with O_DIRECT (direct_io.DirectReader), runs of
adjacent experts of a tensor in one read of at most STAGE bytes, through a staging buffer, tensor
by tensor in the order the FFN multiplies them (LOAD_ORDER: up, gate, down), and returns; the
engine computes the layer's experts in three parts (models/moe.py up_part, gate_part, down_part),
each after wait(its tensor), so the up and gate products compute while the next tensor's slabs are
read (synthetic Qwen3-30B-A3B, reads capped at 1 GB/s, interleaved A/B medians: zipf:1 2.78 ->
3.32 tok/s at 2 GB and 7.92 -> 9.42 at 4 GB; uniform 3.27 -> 3.26 and 9.42 -> 8.52, within this
machine's noise; docs/benchmarks.md, twelfth session); finish marks them cached. Two loaders (prefetch.Workers
threads) take the runs in turn, each through half of the stage, so the disk reads one run while
the other is converted (at 2 GB it was idle 15% of a token with one loader, 4% with two). fetch
reads them all before returning, on the same loaders: the read-ahead's steps, and gpt-oss, whose
FFN is one graph of its own.

The cache. `capacity` bytes (the planner gives what the budget leaves after the dense plan, at
least one layer's E experts: a prompt may need them all). Experts counted most often in earlier
runs (saved per model under $FLEXINFER_HOME/experts, hub.home()) are read at load, up to the share
of the capacity pin_share chooses (none, a quarter or half: the one with the highest expected hit
rate, when it clearly beats none), and pinned while the rest of the cache is least recently used.
Counts are per layer (picks of each expert by the tokens of each step) and are saved when the
store closes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from flexinfer import ggml_ops
from flexinfer.direct_io import ALIGN, DirectReader, span
from flexinfer.errors import StreamError  # noqa: F401 (raised by the read-ahead)
from flexinfer.gguf_file import GGUFFile, row_bytes
from flexinfer.ggml_ops import Buffer, LazyMemory, TensorTable
from flexinfer.planner import convert_rows
from flexinfer.prefetch import Background, Workers

KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
STAGE = 8 << 20  # bytes read at a time (a run of adjacent slabs); a slab larger than this alone
PIN_SHARES = (0.0, 0.25, 0.5)  # of the capacity, at most, pinned to the experts counted most in
# earlier runs: the one whose expected hit rate is highest (pin_share), when it beats no pins by
PIN_MARGIN = 0.2  # of the unpinned cache's expected misses, at least. The estimate replays another
# text (the last run's picks); on the synthetic Qwen3-30B-A3B at 4 GB (zipf:1) it promised a
# quarter pinned 13% fewer misses than none, where the bench's text missed 32% more with them
# (13.1 against 9.9 a token over 32 tokens): pins chosen from one text's counts hold room that
# another text's recent picks would use. Where pins won there (8 GB, a cache the run never fills:
# the pins are its first uses, read at load) the estimate promised 22-71% fewer misses
ROUTER_TYPES = {0: np.float32, 1: np.float16}  # GGML F32, F16: routers read to the host as they are
TRACE_LEN = 48 * 256  # fetches kept (a layer's picks each) for the planner's replay: 256 steps of
# a 48-layer model, ~100,000 numbers in the counts file
SMALL_STEP = 64  # a step of at most this many picks (a decode step's K a sequence) is counted in
# Python: numpy's cost per call, 25-60 us on a core just out of a layer's matmuls (against 5-10
# us measured alone), made counting a layer's eight picks 160-180 us (docs/benchmarks.md)
PREFETCH_SHARE = 0.5  # read ahead only when a step's predicted picks are at most this share of E
# (a decode step's K of E; a prompt batch picks most experts anyway)


def expert_names(specs) -> set[str]:
    """The names of every 3-D expert tensor (the ones an ExpertStore owns)."""
    return {s.name for s in specs if len(s.shape) == 3 and s.name.split(".")[2] in KINDS}


def layer_expert_bytes(g: GGUFFile, names) -> dict[int, int]:
    """layer -> bytes of its expert tensors (all E experts of the three)."""
    out: dict[int, int] = {}
    for n in names:
        layer = int(n.split(".")[1])
        out[layer] = out.get(layer, 0) + g.tensors[n].nbytes
    return out


def min_capacity(g: GGUFFile, names) -> int:
    """The least cache that works: one layer's experts, all of them (a prompt batch may pick every
    expert of a layer; 340 MB for Qwen3-30B-A3B)."""
    return max(layer_expert_bytes(g, names).values(), default=0)


def router_names(names, g: GGUFFile) -> list[tuple[str, str]]:
    """(router, FFN input norm) names of every layer with experts, for the read-ahead's
    prediction: ffn_norm, or gpt-oss's post_attention_norm."""
    layers = sorted({int(n.split(".")[1]) for n in names})
    if not layers:
        return []
    norm = "ffn_norm" if f"blk.{layers[0]}.ffn_norm.weight" in g.tensors else "post_attention_norm"
    return [(f"blk.{l}.ffn_gate_inp.weight", f"blk.{l}.{norm}.weight") for l in layers]


def prefetch_bytes(g: GGUFFile, names) -> int:
    """Host memory the read-ahead takes: every layer's router and ffn_norm as float32 (48 MB for
    Qwen3-30B-A3B: 48 x 2048 x 128 x 4 bytes) and a second staging buffer. 0 when a router is of a
    type read-ahead does not read (it is then off)."""
    pairs = router_names(names, g)
    if not pairs or any(g.tensors[r].type not in ROUTER_TYPES for r, _ in pairs):
        return 0
    bias = {r: g.tensors[b].shape[0] if (b := r.replace(".weight", ".bias")) in g.tensors else 0
            for r, _ in pairs}  # gpt-oss's router bias (E,)
    return sum(4 * (int(np.prod(g.tensors[r].shape)) + g.tensors[n].shape[0] + bias[r])
               for r, n in pairs) + STAGE + 2 * ALIGN


def counts_path(g: GGUFFile) -> Path:
    """Where a model's expert counts are kept: by file name and size (a copy elsewhere shares
    them, another quantization does not)."""
    from flexinfer.hub import home
    return home() / "experts" / f"{os.path.basename(g.path)}-{g.file_size}.json"


def expected_hit_rate(g: GGUFFile, names, capacity: int, counts_file: Path | None,
                      n_used: int = 0, n_seq: int = 1) -> float:
    """The planner's estimate of the share of a decode token's picks the cache holds before the
    step (the read-ahead's own hits not counted), with the pins warm() chooses (pin_share), when
    n_seq sequences decode together."""
    return _best(g, names, capacity, counts_file, n_used, n_seq)[0]


def pin_share(g: GGUFFile, names, capacity: int, counts_file: Path | None, n_used: int,
              n_seq: int = 1) -> float:
    """The share of the capacity warm() pins: of PIN_SHARES, the one whose expected hit rate is
    highest (the smaller on a tie), when its expected misses are at most 1 - PIN_MARGIN of no
    pins' (_best). Pins always hit but take their room from the least-recently-used part, which
    holds the picks of the token before only while its room outlasts a token's picks (K x layers
    experts): the synthetic Qwen3-30B-A3B at 2 GB (a cache of 391 experts, a token picking 384)
    held 78% of a decode's picks with no pins and 3% with half of the cache pinned; at 8 GB the
    pins, read at load, spare the first uses' misses. Several sequences decoding together pick
    more a step: the LRU part must outlast all their picks."""
    return _best(g, names, capacity, counts_file, n_used, n_seq)[1]


def _best(g: GGUFFile, names, capacity: int, counts_file: Path | None, n_used: int,
          n_seq: int = 1) -> tuple[float, float]:
    """(the expected hit rate, the share of PIN_SHARES that gives it): no pins unless a share's
    expected misses are at most 1 - PIN_MARGIN of the unpinned cache's, then the share with the
    highest rate (the smaller on a tie)."""
    rates = _hit_rates(g, names, capacity, counts_file, n_used, n_seq, PIN_SHARES)
    if PIN_SHARES[0] == 0.0:
        bar = 1.0 - (1.0 - rates[0]) * (1.0 - PIN_MARGIN)
        rates = [rates[0]] + [r if r >= bar else -1.0 for r in rates[1:]]
    return max(rates), PIN_SHARES[rates.index(max(rates))]


def _hit_rates(g: GGUFFile, names, capacity: int, counts_file: Path | None,
               n_used: int, n_seq: int = 1, shares=PIN_SHARES) -> list[float]:
    """_hit_rate at each of `shares`, the counts file read once."""
    per_layer = layer_expert_bytes(g, names)
    counts, trace = None, []
    if per_layer:
        n = g_n_expert(g, names)
        counts = _load_counts(counts_file, (max(per_layer) + 1, n))
        trace = _load_trace(counts_file, n)
    return [_hit_rate(g, names, capacity, counts, trace, n_used, share, n_seq)
            for share in shares]


def _hit_rate(g: GGUFFile, names, capacity: int, counts: np.ndarray | None,
              trace: list[list[int]], n_used: int, share: float, n_seq: int = 1) -> float:
    """The share of a decode token's picks a cache holds whose `share` of the capacity, at most,
    is pinned to the experts counted most in earlier runs, the rest least recently used.

    - The pins hold what the router prefers whatever the text (router_prior): counts of earlier
      texts pick the pins, but what made those texts pick them beyond the router's own preference
      does not carry to the next. On the synthetic Qwen3-30B-A3B, pins chosen from the bench's
      warm-up held 2.7 / 9.7 / 19.7% of another prompt's picks at 2 / 4 / 8 GB with the uniform
      router (the router's prior: 3.2 / 9.3 / 21.6%) and 18.3 / 42.3 / 73.5% with zipf:1 (prior
      16.3 / 40.1 / 71.2%), where the warm-up's own picks promised 30-50% at 2 GB.
    - The rest of the picks share the rest of the cache: with the picks an earlier run recorded
      (the counts file's trace), a least-recently-used cache of the rest's bytes replayed over
      them (replayed_hit_rate; its capacity scaled by 1 / (1 - pinned share): it serves that
      share of the picks). A recorded run carries the router's locality in time, which counts
      alone lose; how much of it the next text has, it cannot know (on the synthetic model at 4
      GB: 0.88 replayed over the warm-up's text, 0.94 on the bench's prompt).
    - Without a trace, from counts alone: each layer's pick probabilities are its counts smoothed
      toward uniform with as many pseudo-picks as it has picks, and the least-recently-used part
      holds the most probable of the unpinned experts only when it outlasts a token: each token
      loads about n_used x layers x (1 - pinned share) experts, and a smaller part has evicted a
      layer's experts before that layer runs again (2 GB: 185 slots against ~380 loads a token).
    Without counts: capacity / expert bytes under the same turnover rule."""
    per_layer = layer_expert_bytes(g, names)
    total = sum(per_layer.values())
    if not total or capacity >= total:
        return 1.0
    n = g_n_expert(g, names)
    k = n_used or max(1, n // 16)
    if counts is None:
        counts = np.zeros((max(per_layer) + 1, n), dtype=np.int64)
    unit_of = {l: b // n for l, b in per_layer.items()}
    pins = _pins(counts, unit_of, capacity, share)
    layers = sorted(per_layer)
    prior = router_prior(g, names, k) if pins else None
    if prior is None:  # every expert alike (or nothing pinned)
        prior = np.full((max(per_layer) + 1, n), 1.0 / n)
    h_pin = sum(float(prior[l, e]) for l, e in pins) / len(layers)
    lru = capacity - sum(unit_of[l] for l, _ in pins)
    if trace and h_pin < 1.0:
        replayed = replayed_hit_rate(trace, unit_of, int(lru / (1.0 - h_pin)), k,
                                     n_seq=n_seq)
        if replayed is not None:
            return h_pin + (1.0 - h_pin) * replayed
    row = {l: i for i, l in enumerate(layers)}
    pinned = np.zeros(len(layers) * n, dtype=bool)  # as warm() loads them
    for l, e in pins:
        pinned[row[l] * n + e] = True
    counts = counts[layers]
    picks = counts.sum(axis=1, keepdims=True)
    smooth = np.maximum(picks, 1) / n  # pseudo-picks per expert: as many in all as real picks
    prob = (counts + smooth) / (picks + smooth * n)  # each layer's row sums to 1
    unit = np.array([per_layer[l] / n for l in layers])
    units = np.repeat(unit, n)
    flat = prob.ravel() / len(layers)  # a share of all of a token's picks
    held_share = (prob * pinned.reshape(prob.shape)).sum(axis=1)  # per layer, pinned
    loads = n_seq * float((k * unit * (1 - held_share)).sum())  # bytes a step loads
    if lru < loads:
        return h_pin
    rest = np.flatnonzero(~pinned)
    rest = rest[np.argsort(-flat[rest], kind="stable")]
    held = rest[np.cumsum(units[rest]) <= lru]
    return min(1.0, h_pin + float(flat[held].sum()))


PRIOR_INPUTS = 512  # random inputs each router is applied to (router_prior)
_priors: dict[tuple[str, int, int], np.ndarray | None] = {}


def router_prior(g: GGUFFile, names, k: int) -> np.ndarray | None:
    """Each layer's pick probabilities (layers x E, rows of layers without experts zero) when the
    router sees inputs that carry no text: its top-k over PRIOR_INPUTS random normal vectors,
    rms-normed and scaled by the FFN norm as a token's are (gpt-oss's bias added). What a router
    prefers whatever it reads; a text adds its own preferences, which another text does not
    share. None when a router or norm is of a type this does not read (F32/F16 only). Computed
    once per model file (~0.2 s for Qwen3-30B-A3B: 48 MB of routers)."""
    key = (str(g.path), getattr(g, "file_size", 0), k)
    if key in _priors:
        return _priors[key]
    pairs = router_names(names, g)
    out = None
    if pairs and all(r in g.tensors and nm in g.tensors and g.tensors[r].type in ROUTER_TYPES
                     and g.tensors[nm].type in ROUTER_TYPES for r, nm in pairs):
        n_embd, n = g.tensors[pairs[0][0]].shape[:2]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((PRIOR_INPUTS, n_embd)).astype(np.float32)
        x /= np.sqrt(np.mean(x * x, axis=1, keepdims=True))
        out = np.zeros((max(int(r.split(".")[1]) for r, _ in pairs) + 1, n))
        for r, nm in pairs:
            layer = int(r.split(".")[1])
            w = _host(g, r).reshape(n, n_embd)
            logits = (x * _host(g, nm)) @ w.T
            bias = r.replace(".weight", ".bias")
            if bias in g.tensors:
                logits += _host(g, bias)
            top = np.argpartition(-logits, min(k, n) - 1, axis=1)[:, :k]
            np.add.at(out[layer], top.ravel(), 1.0 / top.size)
    _priors[key] = out
    return out


def host_router(g: GGUFFile, router: str, norm: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A layer's router as the read-ahead applies it on the host: (n_embd, E) float32 with the
    FFN norm's weights folded in, and gpt-oss's router bias (E,) or None."""
    w = _host(g, router).reshape(g.tensors[router].shape[1], -1) * _host(g, norm)
    bias = router.replace(".weight", ".bias")
    return np.ascontiguousarray(w.T), _host(g, bias) if bias in g.tensors else None


def _host(g: GGUFFile, name: str) -> np.ndarray:
    """A F32 or F16 tensor of the file, as float32."""
    info = g.tensors[name]
    n = int(np.prod(info.shape))
    a = np.fromfile(g.path, dtype=ROUTER_TYPES[info.type], count=n, offset=info.offset)
    if a.size != n:
        raise RuntimeError(f"{g.path}: short read of {name}")
    return a.astype(np.float32)


def _pins(counts: np.ndarray, unit: dict[int, int], capacity: int,
          share: float) -> set[tuple[int, int]]:
    """The (layer, expert)s warm() pins for these counts (rows: layers, a layer without experts
    absent from `unit`): the most counted, while they fit `share` of the capacity."""
    out, room = set(), capacity * share
    for flat in np.argsort(-counts, axis=None, kind="stable"):
        layer, e = divmod(int(flat), counts.shape[1])
        if counts[layer, e] == 0:
            break
        if layer not in unit:
            continue
        if unit[layer] > room:
            break
        room -= unit[layer]
        out.add((layer, e))
    return out


def _load_trace(f: Path | None, n_expert: int) -> list[list[int]]:
    """The picks a counts file recorded ([layer, experts...] per fetch), [] when it has none or
    any of them is not a layer and experts of this model (a damaged file)."""
    if f is None or not f.is_file():
        return []
    try:
        trace = json.loads(f.read_text(encoding="utf-8")).get("trace") or []
        trace = [[int(x) for x in t] for t in trace if isinstance(t, list) and len(t) > 1]
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    if any(t[0] < 0 or min(t[1:]) < 0 or max(t[1:]) >= n_expert for t in trace):
        return []
    return trace


def replayed_hit_rate(trace: list[list[int]], unit: dict[int, int], capacity: int,
                      k: int, n_seq: int = 1) -> float | None:
    """The share of decode steps' picks a least-recently-used cache of `capacity` bytes held
    when the recorded picks are replayed (Mattson: one replay per capacity). A recorded run
    carries the router's locality in time, which counts alone lose: on the synthetic
    Qwen3-30B-A3B, a cache of 18% of the experts held 91% of a decode's picks (uniform router),
    where their frequencies promise half that. With n_seq, that many sequences decode together
    (lockstep). None without decode steps (single-token steps: at most k picks)."""
    decode = [len(step) - 1 <= k for step in trace]
    if n_seq > 1:
        trace, decode = lockstep(trace, k, n_seq)
    order: OrderedDict[tuple[int, int], None] = OrderedDict()
    used = hits = looked = 0
    for step, single in zip(trace, decode):
        layer, picks = step[0], step[1:]
        if layer not in unit:
            return None
        for e in picks:
            key = (layer, e)
            if key in order:
                order.move_to_end(key)
                hits += single
            else:
                order[key] = None
                used += unit[layer]
            looked += single
        keep, victims, over = {(layer, e) for e in picks}, [], used - max(capacity, 0)
        for key in order:  # least recently used first, never this step's picks
            if over <= 0:
                break
            if key not in keep:
                victims.append(key)
                over -= unit[key[0]]
        for key in victims:
            del order[key]
            used -= unit[key[0]]
    return hits / looked if looked else None


def lockstep(trace: list[list[int]], k: int, n_seq: int) -> tuple[list[list[int]], list[bool]]:
    """A trace of one sequence as n_seq sequences decoding together: its decode tokens (runs of
    single-token steps, a new token where the layer does not grow) cut into n_seq stretches, and
    step i of layer l the union of the stretches' i-th tokens' picks at l; the prompt steps
    first, as they were. Returns (steps, which of them are decode steps). Stretches of one text
    share more experts than other texts would: an optimistic stand-in."""
    prompt = [step for step in trace if len(step) - 1 > k]
    tokens: list[dict[int, set[int]]] = []
    last = None
    for step in trace:
        if len(step) - 1 > k:
            continue
        if last is None or step[0] <= last:
            tokens.append({})
        tokens[-1].setdefault(step[0], set()).update(step[1:])
        last = step[0]
    n = min(n_seq, len(tokens)) or 1
    per = len(tokens) // n
    steps = []
    for i in range(per):
        group = [tokens[j * per + i] for j in range(n)]
        for layer in sorted(set().union(*group)):
            steps.append([layer] + sorted(set().union(*(t.get(layer, set()) for t in group))))
    return prompt + steps, [False] * len(prompt) + [True] * len(steps)


def g_n_expert(g: GGUFFile, names) -> int:
    return g.tensors[next(iter(names))].shape[2]


def _load_counts(f: Path | None, shape) -> np.ndarray | None:
    """A counts file's array, or None when missing, unreadable or of another shape."""
    if f is None or not f.is_file():
        return None
    try:
        arr = np.asarray(json.loads(f.read_text(encoding="utf-8"))["counts"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arr if arr.shape == tuple(shape) and not (arr < 0).any() else None


def expert_cost(g: GGUFFile, cfg, names, capacity: int, repack: bool,
                counts_file: Path | None, n_seq: int = 1, read_ahead: bool = False):
    """planner.ExpertCost of a decode token with this cache, n_seq sequences decoding (with the
    read-ahead, a step's misses are read before its experts compute: fetch)."""
    from flexinfer.models import moe
    from flexinfer.planner import ExpertCost
    per_layer = layer_expert_bytes(g, names)
    total = sum(per_layer.values())
    k_share = cfg.n_expert_used / cfg.n_expert
    hit, share = _best(g, names, capacity, counts_file, cfg.n_expert_used, n_seq)
    miss = 1.0 - hit
    rp = repack and any(ggml_ops.repacks(g.tensors[n].type, g.tensors[n].shape) for n in names)
    big = max(g.tensors[n].nbytes // g.tensors[n].shape[2] for n in names)
    layers = len(per_layer) * (1.0 - (1.0 - miss) ** cfg.n_expert_used)
    return ExpertCost(int(total * k_share), miss, layers, rp and not _two_loaders(big), share,
                      len(per_layer), not read_ahead and cfg.arch not in moe.SPLIT)


def _stage_bytes(big: int) -> int:
    """The staging buffer's size for expert slabs of at most `big` bytes."""
    return max(span(0, big)[1] + ALIGN, STAGE + 2 * ALIGN)


def _two_loaders(big: int) -> bool:
    """Whether fetch's misses load on two threads, each through half of the stage: where a half
    holds the largest slab read at any offset."""
    return _stage_bytes(big) // 2 // ALIGN * ALIGN >= span(0, big)[1] + 2 * ALIGN


class _Job:
    """A read-ahead: the experts of `layer` to read, most likely first; the ones read so far, the
    one being read, and whether fetch told it to stop (all under the store's lock)."""

    def __init__(self, layer: int, todo: list[int]):
        self.layer, self.todo = layer, todo
        self.done: list[int] = []
        self.inflight: int | None = None
        self.stop = False


# begin reads a step's missing slabs tensor by tensor, in the order the FFN multiplies them
LOAD_ORDER = {"ffn_up_exps": 0, "ffn_gate_exps": 1, "ffn_down_exps": 2}


class _Loads:
    """begin's reads of one layer's missing experts: the runs not yet taken, the runs of each
    tensor not yet done, whether one failed (all under `done`), and join (Workers.start)."""

    def __init__(self, layer: int, experts: list[int], runs: list):
        self.layer, self.experts, self.runs = layer, experts, runs
        self.left: dict[str, int] = {}
        for s, _ in runs:
            self.left[s.kind] = self.left.get(s.kind, 0) + 1
        self.done = threading.Condition()
        self.failed = False
        self.join = None


class _Slab:
    """One expert tensor: its header, file offset, bytes per expert, rows per expert."""

    def __init__(self, header, offset: int, nb2: int, rows: int, rb: int, home: int, repack: bool,
                 kind: str = ""):
        self.header, self.offset, self.nb2, self.rows, self.rb = header, offset, nb2, rows, rb
        self.home, self.repack = home, repack
        self.kind = kind  # the tensor's name in the layer: ffn_up_exps, ffn_gate_exps, ...


class ExpertStore:
    def __init__(self, g: GGUFFile, cfg, names, capacity: int, reader: DirectReader, *,
                 repack: bool, counts_file: Path | None = None, note=None, n_seq: int = 1):
        self.g, self.cfg, self.reader, self.note = g, cfg, reader, note or (lambda s: None)
        self.n_seq = n_seq  # sequences decoded together: what the pins are chosen for
        self.n_expert = cfg.n_expert
        # a layer's tensors in LOAD_ORDER: _runs gives a step's reads in the order begin wants
        names = sorted(names, key=lambda n: (int(n.split(".")[1]),
                                             LOAD_ORDER.get(n.split(".")[2], len(LOAD_ORDER)), n))
        self._names = names
        self._lock = threading.Lock()
        self._table = TensorTable(len(names) + 1)
        self.layers: list[dict] = [{} for _ in range(cfg.n_layer + 1)]
        self._slabs: dict[int, list[_Slab]] = {}
        addr = 0
        homes = []
        for n in names:
            info = g.tensors[n]
            homes.append(addr)
            addr += _page(info.nbytes)
        self._arena = LazyMemory(addr)
        self._tag = Buffer(ggml_ops.PAGE, repack=True) if repack else None
        for n, off in zip(names, homes):
            self._add(n, self._arena.base + off, repack)
        self.unit_bytes = {l: sum(s.nb2 for s in ss) for l, ss in self._slabs.items()}
        self.total_bytes = sum(self.unit_bytes.values()) * self.n_expert
        self._floor = min_capacity(g, names)
        self.capacity = max(min(capacity, self.total_bytes), self._floor)
        self._make_converter()
        big = max(s.nb2 for ss in self._slabs.values() for s in ss)
        self._stage = Buffer(_stage_bytes(big))
        # a step's missing experts are loaded by two workers, each through half of the stage, so
        # one reads while the other converts (Workers)
        self._half = self._stage.size // 2 // ALIGN * ALIGN
        self._loaders = Workers("expert loads", 1 if _two_loaders(big) else 0)
        self._loads: _Loads | None = None  # misses being read while the step computes (begin)
        # picks of each expert by each layer in this run (counts), as Python lists: a decode
        # step adds its few picks faster to a list than to an array (SMALL_STEP)
        self._tally = [[0] * self.n_expert for _ in range(cfg.n_layer)]
        self._saved = np.zeros_like(self.counts)  # counts of earlier runs, read from the file
        self._trace: list[list[int]] = []  # [layer, picked experts...] of each fetch, in order
        self.counts_file = counts_file
        self._resident: set[tuple[int, int]] = set()  # (layer, expert) held (or being read)
        self._pinned: set[tuple[int, int]] = set()
        self.pin_share = 0.0  # of the capacity pinned by warm() (pin_share)
        # least recently used first, pinned ones apart (evicted last): eviction takes from the
        # front, never sorting the cache (at 8 GB it holds ~2,700 of Qwen3-30B-A3B's 6,144
        # experts, and a sort per layer per token cost tens of ms a token)
        self._order: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._pinned_order: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._now: set[tuple[int, int]] = set()  # touched by this step
        self.used_bytes = 0
        # pages of evicted slabs kept for the loads that follow (size -> page-aligned addresses):
        # a load takes them by moving them to its home (ggml_ops.move_pages) instead of touching
        # fresh pages, and whatever is left is released after the step's loads (_release_spares)
        self._spare: dict[int, dict[int, None]] = {}
        self._recycle = _can_recycle(self._slabs)
        self.recycled = 0  # slabs written into an evicted slab's pages (or the pool's)
        self._pool: LazyMemory | None = None  # pages faulted in at load for the cache to fill
        self._pool_next = self._pool_end = 0  # into (make_pool)
        self.hits = self.misses = 0  # expert lookups per layer per step (a unit counts once)
        self.bytes_read = 0
        self.fetch_s = 0.0  # time spent reading and converting, on the computing thread
        self._bg: Background | None = None  # the read-ahead thread (prefetch.py), when enabled
        self._routers: dict[int, tuple] = {}  # layer -> (router x ffn_norm, transposed; bias)
        self._ahead: tuple[int, set[int], set[int]] | None = None  # (layer, predicted, to read)
        self._job: _Job | None = None  # the read-ahead in progress
        self._detached: set[tuple[int, int]] = set()  # being read by a stopped read-ahead, not
        # picked: fetch went on without waiting; never evicted until read
        self._abandoned: list[tuple[int, int]] = []  # left half read by a stopped read-ahead
        # (its next slab not begun): still charged, evicted by the next fetch
        self._wanted: set[tuple[int, int]] = set()  # the last fetch's picks: a stopped
        # read-ahead reads these to the end
        self.predicted = self.predicted_used = 0
        self.prefetched = self.prefetch_used = 0  # experts read ahead; of them, picked
        self.abandoned = 0  # experts the read-ahead left half read when stopped

    def _add(self, name: str, home: int, repack: bool) -> None:
        info = self.g.tensors[name]
        ne0, ne1, ne2 = info.shape
        h = self._table.new(name, info.type, info.shape)
        rp = repack and ggml_ops.repacks(info.type, info.shape)
        if rp:
            ggml_ops.place(h, self._tag, home)
        else:
            ggml_ops.point(h, ggml_ops.Placement(home, None, None))
        layer = int(name.split(".")[1])
        rb = row_bytes(info.type, ne0)
        kind = name.split(".")[2]
        self._slabs.setdefault(layer, []).append(_Slab(h, info.offset, ne1 * rb, ne1, rb, home, rp,
                                                       kind))
        self.layers[layer][name.split(".", 2)[-1]] = h

    def _make_converter(self) -> None:
        """Scratch headers for the row groups of one slab that ggml_ops.repack_rows converts."""
        groups = set()
        for ss in self._slabs.values():
            for s in ss:
                if not s.repack:
                    continue
                c, step = s.header.contents, convert_rows(s.rb)
                for n in {min(step, s.rows), s.rows % step or step}:
                    if ggml_ops.repack_traits(c.type, (c.ne[0], n)) != \
                            ggml_ops.repack_traits(c.type, (c.ne[0], s.rows)):
                        raise RuntimeError(f"ggml repacks {n} rows of type {c.type} unlike "
                                           f"{s.rows}")
                    groups.add((c.type, c.ne[0], n))
        # one set for each loader (fetch's two) and one for the read-ahead
        self._convert_table = TensorTable(max(1, 3 * len(groups)))
        self._converts = [{k: self._convert_table.new("convert", k[0], k[1:]) for k in groups}
                          for _ in range(3)]

    # ---- warm start
    def warm(self) -> None:
        """Read the counts of earlier runs and load the experts used most, up to the share of the
        capacity pin_share chooses (all of them when the capacity holds every expert), pinned
        from then on."""
        self._saved = self._read_counts()
        if self.capacity >= self.total_bytes:
            keys = [(layer, e) for layer in self._slabs for e in range(self.n_expert)]
        else:
            if self._saved.any():
                self.pin_share = pin_share(self.g, self._names, self.capacity, self.counts_file,
                                           self.cfg.n_expert_used, self.n_seq)
            keys = sorted(_pins(self._saved, self.unit_bytes, self.capacity, self.pin_share),
                          key=lambda k: (-self._saved[k], k[0] * self.n_expert + k[1]))
        want: dict[int, list[int]] = {}
        for layer, e in keys:
            want.setdefault(layer, []).append(e)
        for layer, es in want.items():
            self._load(layer, sorted(es))
            for e in es:
                self._pinned.add((layer, e))
                del self._order[(layer, e)]
                self._pinned_order[(layer, e)] = None

    def fill(self) -> int:
        """After warm(): load the room the pins leave with the experts earlier runs counted most,
        then those the router prefers whatever the text (router_prior), unpinned, at the least
        recently used end (the first a step's misses evict: they are guesses). Reads up to the
        whole cache at load (3.5 GB of Qwen3-30B-A3B at 8 GB, ~3.5 s at 1 GB/s), so a run starts
        with a full cache instead of filling it with misses (`--expert-fill`). Returns the
        experts loaded."""
        room = self.capacity - self.used_bytes
        if room <= 0 or self.capacity >= self.total_bytes:
            return 0
        prior = router_prior(self.g, self._names, self.cfg.n_expert_used)
        # counts first (an expert counted once outranks any prior, which sums to K a layer)
        score = self._saved * (self.cfg.n_expert_used + 1.0)
        if prior is not None:
            n = min(len(prior), len(score))
            score[:n] += prior[:n]
        keys = sorted(((l, e) for l in self._slabs for e in range(self.n_expert)
                       if (l, e) not in self._resident),
                      key=lambda k: (-score[k], k))
        want: dict[int, list[int]] = {}
        for key in keys:
            unit = self.unit_bytes[key[0]]
            if unit > room:
                break
            room -= unit
            want.setdefault(key[0], []).append(key[1])
        for layer, es in want.items():
            self._load(layer, sorted(es))
        n = sum(map(len, want.values()))  # keys[:n]: the ones loaded
        for key in keys[:n]:  # the least counted ends first in line
            self._order.move_to_end(key, last=False)
        return n

    def make_pool(self) -> int:
        """Fault in, at load, the pages the cache has left to fill (capacity less what warm()
        loaded), in one call (ggml_ops.populate), for loads to take as they take an evicted
        slab's (_claim): a page first touched while ggml computes cost 11 us on this machine's
        virtual machine, a whole slab 2.4 ms against 0.1 ms to repack it. The pool is memory the
        budget already gives the cache; its pages move into the cache as it fills. Returns its
        bytes (0: recycling is off, the cache is full, or the kernel refused)."""
        size = (self.capacity - self.used_bytes) // ggml_ops.PAGE * ggml_ops.PAGE
        if not self._recycle or size <= 0:
            return 0
        pool = LazyMemory(size)
        if not ggml_ops.populate(pool.base, size):
            pool.free()
            return 0
        self._pool, self._pool_next, self._pool_end = pool, pool.base, pool.base + size
        return size

    def _drop_pool(self) -> None:
        """Give the pool's pages back (a smaller capacity, or close)."""
        with self._lock:
            pool, self._pool, self._pool_next, self._pool_end = self._pool, None, 0, 0
        if pool is not None:
            pool.free()

    def _read_counts(self) -> np.ndarray:
        zero = np.zeros((self.cfg.n_layer, self.n_expert), dtype=np.int64)
        f = self.counts_file
        if f is None or not f.is_file():
            return zero
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            arr = np.asarray(data["counts"], dtype=np.int64)
            if arr.shape != zero.shape or (arr < 0).any():
                raise ValueError(f"shape {arr.shape}, expected {zero.shape}")
            return arr
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.note(f"{f}: expert counts ignored ({type(e).__name__}: {e}); they will be "
                      "written anew")
            return zero

    def save_counts(self) -> None:
        """Add this run's counts to the saved ones (written atomically, by rename)."""
        f = self.counts_file
        counts = self.counts
        if f is None or not counts.any():
            return
        total = self._read_counts() + counts
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".{os.getpid()}.tmp")
            trace = self._trace or _load_trace(f, self.n_expert)  # the last run's, where it made one
            tmp.write_text(json.dumps({"model": os.path.basename(self.g.path),
                                       "counts": total.tolist(), "trace": trace}),
                           encoding="utf-8")
            os.replace(tmp, f)
            self._tally = [[0] * self.n_expert for _ in self._tally]
            self._trace = []
        except OSError as e:
            self.note(f"{f}: expert counts not saved ({e.strerror or e})")

    # ---- use
    def _count(self, layer: int, ids: np.ndarray) -> list[int]:
        """Count the step's picks of the layer (and record them); returns the experts picked,
        sorted. A decode step's few picks are counted in Python (SMALL_STEP)."""
        picks = ids if isinstance(ids, np.ndarray) and ids.ndim == 1 else np.asarray(ids).ravel()
        if picks.size <= SMALL_STEP:
            flat = picks.tolist()
            need = sorted(set(flat))
            if need and (need[0] < 0 or need[-1] >= self.n_expert):
                self._bad_pick(layer, need[0] if need[0] < 0 else need[-1])
            tally = self._tally[layer]
            for e in flat:
                tally[e] += 1
        else:
            picks = picks.astype(np.int64)
            if picks.min() < 0 or picks.max() >= self.n_expert:
                self._bad_pick(layer, picks.min() if picks.min() < 0 else picks.max())
            experts, n = np.unique(picks, return_counts=True)
            need = experts.tolist()
            tally = self._tally[layer]
            for e, c in zip(need, n.tolist()):
                tally[e] += c
        if len(self._trace) < TRACE_LEN:
            self._trace.append([layer] + need)
        self._now = set()
        return need

    @property
    def counts(self) -> np.ndarray:
        """This run's picks of each expert by each layer, (n_layer, E) int64 (a copy)."""
        return np.array(self._tally, dtype=np.int64)

    def _bad_pick(self, layer: int, e: int) -> None:
        raise RuntimeError(f"layer {layer}: router picked expert {e} of {self.n_expert}")

    def _lookup(self, layer: int, need: list[int]) -> list[int]:
        """Count hits and misses of the picked experts; returns the missing ones."""
        missing, resident, now, pinned = [], self._resident, self._now, self._pinned
        for e in need:
            key = (layer, e)
            if key in resident:  # cached, or read (or being read) ahead: a hit
                now.add(key)  # _touch, for a key already resident
                (self._pinned_order if key in pinned else self._order).move_to_end(key)
            else:
                missing.append(e)
        self.hits += len(need) - len(missing)
        self.misses += len(missing)
        return missing

    def begin(self, layer: int, ids: np.ndarray) -> bool:
        """fetch, with the misses read while the step computes what it already holds: True when
        some are being read; then wait(kind) before each mul_mat_id of that tensor
        (ffn_up_exps, ffn_gate_exps, ffn_down_exps; read in that order) and finish() after the
        last. With the read-ahead on, this is fetch (its books are kept there)."""
        if self._bg is not None:
            self.fetch(layer, ids)
            return False
        t0 = time.perf_counter()
        need = self._count(layer, ids)
        missing = self._lookup(layer, need)
        if missing:
            self._make_room({(layer, e) for e in need}, len(missing) * self.unit_bytes[layer])
            self._start(layer, missing)
        else:
            self._release_spares()
        self.fetch_s += time.perf_counter() - t0
        return bool(missing)

    def _start(self, layer: int, experts: list[int]) -> None:
        """Begin reading `experts` (sorted) of the layer on the loaders, tensor by tensor."""
        room = self._half - 2 * ALIGN if self._loaders.n else STAGE
        loads = self._loads = _Loads(layer, experts, self._runs(layer, experts, room))
        loads.join = self._loaders.start(lambda i: self._loader(loads, i))

    def _loader(self, loads: _Loads, i: int) -> None:
        """Loader i: takes the runs in order, each through its part of the stage."""
        base = self._stage.base + i * self._half
        while True:
            with loads.done:
                if loads.failed or not loads.runs:
                    return
                s, run = loads.runs.pop(0)
            try:
                self._read_run(s, run, base, self._converts[i])
            except BaseException:
                with loads.done:
                    loads.failed = True
                    loads.done.notify_all()
                raise
            with loads.done:
                loads.left[s.kind] -= 1
                loads.done.notify_all()

    def wait(self, kind: str) -> None:
        """Block until begin's reads of this tensor's slabs are done; a failed read raises here
        (after every loader has stopped)."""
        loads = self._loads
        if loads is None:
            return
        t0 = time.perf_counter()
        with loads.done:
            while loads.left.get(kind, 0) and not loads.failed:
                loads.done.wait()
            failed = loads.failed
        self.fetch_s += time.perf_counter() - t0
        if failed:
            self.finish()

    def finish(self) -> None:
        """After begin's reads: the loaders joined (their first error raised), the experts read
        marked resident, the pages no load took given back."""
        t0 = time.perf_counter()
        try:
            self._finish()
        finally:
            self.fetch_s += time.perf_counter() - t0
        self._release_spares()

    def _finish(self) -> None:
        loads, self._loads = self._loads, None
        if loads is None:
            return
        loads.join()
        for e in loads.experts:
            self._touch((loads.layer, e))
            self.used_bytes += self.unit_bytes[loads.layer]

    def abandon(self) -> None:
        """A step failed between begin and finish: stop the loaders and wait for them; what they
        read stays out of the cache (its room is still charged to no one)."""
        loads, self._loads = self._loads, None
        if loads is None:
            return
        with loads.done:
            loads.failed = True
        try:
            loads.join()
        except BaseException:  # noqa: BLE001 - the step's own error is the one raised
            pass
        self._release_spares()

    def fetch(self, layer: int, ids: np.ndarray) -> None:
        """Make the experts in `ids` (the step's top-K picks of this layer, any shape) resident
        before mul_mat_id reads them. Counts each pick; reads the missing ones."""
        t0 = time.perf_counter()
        need = self._count(layer, ids)
        ahead, late = None, False
        if self._bg is not None:  # the read-ahead's books
            self._drop_abandoned({(layer, e) for e in need})
            ahead = self._settle(layer, need)
            with self._lock:  # picked now, still being read by a read-ahead that was stopped
                late = any((layer, e) in self._detached for e in need)
        # the pages the read-ahead's evictions left (for experts it charged and did not read,
        # forgotten by _settle) stay spare for this step's misses: released before the loads, the
        # misses would fault in fresh ones (0.47 ms a slab against 0.15 ms at 2 GB)
        missing = self._lookup(layer, need)
        try:
            if missing:
                self._make_room({(layer, e) for e in need}, len(missing) * self.unit_bytes[layer])
                self._load(layer, missing)
        finally:
            if late:  # after the misses' reads began: the disk serves both at once
                self._wait_ahead(ahead)
        self._release_spares()
        self.fetch_s += time.perf_counter() - t0

    def _settle(self, layer: int, need: list[int]) -> tuple[int, set[int]] | None:
        """Stop the read-ahead: the step's picks are known now. What it has not begun leaves the
        cache (a picked one is read now, as a miss); the expert it is reading stays charged and
        finishes on its own (kept from eviction until then): fetch waits for it after starting
        its misses' reads when it was picked (_wait_ahead), and goes on otherwise. Returns what
        _wait_ahead drops if the read-ahead failed: (its layer, the experts it charged)."""
        if self._ahead is None:
            return None
        at, predicted, read = self._ahead
        job, self._ahead, self._job = self._job, None, None
        done, inflight = set(), None
        if job is not None:
            with self._lock:
                job.stop = True
                done, inflight = set(job.done), job.inflight
                if inflight is not None:
                    self._detached.add((at, inflight))
        try:
            self._bg.errors()
        except BaseException:  # what it was reading is not to be trusted
            self._drop_unread(read, at)
            self._drop_detached()  # the stopped ones' experts in flight, this one's included
            raise
        for e in read:
            if e not in done and e != inflight:  # charged by prefetch, never begun
                self._forget((at, e))
        self.prefetched += len(done) + (inflight is not None)
        if at != layer:
            return None
        self.predicted += len(need)
        self.predicted_used += len(predicted & set(need))
        self.prefetch_used += len((done | {inflight}) & set(need))
        return at, read

    def _wait_ahead(self, ahead: tuple[int, set[int]] | None) -> None:
        """Wait for the read-ahead (an expert fetch picked is still in flight); if it failed, drop
        what it read and was reading, and raise."""
        try:
            self._bg.wait()
        except BaseException:
            if ahead is not None:
                self._drop_unread(ahead[1], ahead[0])
            self._drop_detached()
            raise

    def _drop_unread(self, experts, layer: int) -> None:
        for e in experts:
            if (layer, e) in self._resident:
                self._evict((layer, e))
        self._release_spares()

    def _drop_abandoned(self, wanted: set[tuple[int, int]] | None = None) -> None:
        """Evict the experts a stopped read-ahead left half read. With `wanted` (a fetch's
        picks, set in the same breath): from now on it leaves none of those, so any it left
        before is evicted here and read again as a miss."""
        with self._lock:
            keys, self._abandoned = self._abandoned, []
            if wanted is not None:
                self._wanted = wanted
        for key in keys:
            if key in self._resident:
                self._evict(key)

    def _drop_detached(self) -> None:
        """After a read-ahead failed: the experts stopped read-aheads were still reading are not
        to be trusted either."""
        with self._lock:
            keys, self._detached = set(self._detached), set()
        for key in keys:
            if key in self._resident:
                self._evict(key)
        self._release_spares()

    def _forget(self, key: tuple[int, int]) -> None:
        """Take an expert out of the cache's books (its pages are _evict's business; one that was
        charged but never written holds none: they went with its last eviction)."""
        self._resident.remove(key)
        (self._pinned_order if key in self._pinned else self._order).pop(key)
        self._pinned.discard(key)
        self.used_bytes -= self.unit_bytes[key[0]]

    # ---- read-ahead: layer l+1's likely experts while layer l's experts compute
    @property
    def reads_ahead(self) -> bool:
        """The read-ahead is on (enable_prefetch): prefetch wants each layer's residual."""
        return self._bg is not None

    def enable_prefetch(self) -> bool:
        """Read every layer's router and ffn_norm to the host (prefetch_bytes); False (and no
        read-ahead) when a router's type is not F32/F16 or the cache holds every expert."""
        if self.capacity >= self.total_bytes or not prefetch_bytes(self.g, self._names):
            return False
        for r, n in router_names(self._names, self.g):
            self._routers[int(r.split(".")[1])] = host_router(self.g, r, n)
        self._stage2 = Buffer(self._stage.size)
        self._bg = Background("expert read-ahead")
        return True

    def prefetch(self, layer: int, xa: np.ndarray) -> None:
        """After layer `layer - 1`'s experts were fetched, while they compute: predict layer's
        picks by its router applied to the residual xa (T, n_embd) that layer - 1's attention made
        (rms_norm, ffn_norm, top-K of the logits: softmax keeps the order) and read the missing
        ones on the read-ahead thread, most likely first, until fetch(layer) stops it. Experts
        the current step needs are never evicted for it."""
        if self._bg is None or layer not in self._routers:
            return
        wn, bias = self._routers[layer]  # (n_embd, E) with ffn_norm's weights folded in
        k = self.cfg.n_expert_used
        if xa.shape[0] * k > PREFETCH_SHARE * self.n_expert:
            return
        logits = xa @ wn  # (T, E); a token's rms scales its row and keeps its order...
        if bias is not None:  # ...unless a bias is added after the norm (gpt-oss)
            rms = np.sqrt(np.mean(xa * xa, axis=1, keepdims=True) + self.cfg.norm_eps)
            logits = logits / rms + bias
        if xa.shape[0] == 1:
            row = logits[0]
            top = np.argpartition(-row, k - 1)[:k]
            top = top[np.argsort(-row[top])]  # most likely first
        else:
            top = np.unique(np.argpartition(-logits, k - 1, axis=1)[:, :k])  # each token's top K
            top = top[np.argsort(-logits.max(axis=0)[top], kind="stable")]
        predicted = set(top.tolist())
        read = [e for e in top.tolist() if (layer, e) not in self._resident]
        if read:
            self._make_room(self._now | {(layer, e) for e in predicted},
                            len(read) * self.unit_bytes[layer])
            for e in read:  # charged now; what is not read by fetch(layer) is forgotten then
                self._touch((layer, e))
                self.used_bytes += self.unit_bytes[layer]
            job = self._job = _Job(layer, read)
            try:
                self._bg.submit(lambda: self._read_ahead(job))
            except BaseException:  # an earlier, stopped read-ahead failed
                self._job = None
                self._drop_unread(set(read), layer)
                self._drop_detached()
                raise
        self._ahead = (layer, predicted, set(read))

    def _read_ahead(self, job: _Job) -> None:
        """On the read-ahead thread: the experts one at a time, until told to stop. Told to stop
        while reading one the last fetch did not pick, it leaves it after the slab in flight (to
        be evicted, _drop_abandoned) rather than hold the disk from fetch's misses; a picked one
        it reads to the end (fetch waits for it)."""
        for e in job.todo:
            with self._lock:
                if job.stop:
                    return
                job.inflight = e
            left = False
            for s, run in self._runs(job.layer, [e], STAGE):
                with self._lock:
                    left = job.stop and (job.layer, e) not in self._wanted
                if left:
                    break
                self._read_run(s, run, self._stage2.base, self._converts[2])
            with self._lock:
                job.inflight = None
                self._detached.discard((job.layer, e))
                if left:
                    self._abandoned.append((job.layer, e))
                    self.abandoned += 1
                    return
                job.done.append(e)

    def _touch(self, key: tuple[int, int]) -> None:
        """key is resident and used now: the most recently used of its order."""
        self._resident.add(key)
        self._now.add(key)
        order = self._pinned_order if key in self._pinned else self._order
        order[key] = None
        order.move_to_end(key)

    def _make_room(self, keep: set[tuple[int, int]], nbytes: int) -> None:
        """Evict the least recently used experts (pinned ones last), never one in `keep` (the
        step's picks, and what is read ahead), until nbytes more fit the capacity."""
        over = self.used_bytes + nbytes - self.capacity
        victims = []
        with self._lock:
            keep = keep | self._detached
        for order in (self._order, self._pinned_order):
            for key in order:
                if over <= 0:
                    break
                if key not in keep:
                    victims.append(key)
                    over -= self.unit_bytes[key[0]]
        for key in victims:
            self._evict(key)

    def _evict(self, key: tuple[int, int]) -> None:
        layer, e = key
        self._forget(key)
        for s in self._slabs[layer]:
            addr = s.home + e * s.nb2
            if self._recycle:  # charged still: the loads this eviction makes room for take them
                with self._lock:
                    self._spare.setdefault(s.nb2, {})[addr] = None
            else:
                ggml_ops.release_pages(addr, s.nb2)

    def _claim(self, dst: int, nbytes: int) -> None:
        """Before a slab is written at dst: give it an evicted slab's pages (its own when it was
        just evicted), so the write faults no fresh page."""
        with self._lock:
            bucket = self._spare.get(nbytes)
            if bucket and dst in bucket:  # its own pages
                del bucket[dst]
                self.recycled += 1
                return
            if bucket:
                src = bucket.popitem()[0]
            elif self._pool_next + nbytes <= self._pool_end:
                src, self._pool_next = self._pool_next, self._pool_next + nbytes
            else:
                return
            self.recycled += 1
        if not ggml_ops.move_pages(src, dst, nbytes):  # refused: it would be every time
            ggml_ops.release_pages(src, nbytes)
            with self._lock:
                self.recycled -= 1
                self._recycle = False

    def _release_spares(self) -> None:
        """Give back the pages of evicted slabs no load took."""
        with self._lock:
            if not self._spare:  # a step without misses: nothing was evicted
                return
            left = [(a, n) for n, b in self._spare.items() for a in b]
            self._spare = {}
        for a, n in left:
            ggml_ops.release_pages(a, n)

    def _load(self, layer: int, experts: list[int]) -> None:
        """Read `experts` (sorted) of the layer and mark them resident, before returning: the
        loaders of begin (two take the runs in turn, each through its half of the stage, so the
        disk reads one while the other is converted)."""
        self._start(layer, experts)
        self._finish()

    def _runs(self, layer: int, experts: list[int], room: int) -> list[tuple[_Slab, list[int]]]:
        """The reads of `experts` (sorted) of each of the layer's tensors: runs of adjacent
        experts of at most `room` bytes (one slab at least)."""
        out = []
        for s in self._slabs[layer]:
            per = max(1, room // s.nb2)
            run: list[int] = []
            for e in experts + [-1]:
                if run and (e != run[-1] + 1 or len(run) == per):
                    out.append((s, run))
                    run = []
                if e >= 0:
                    run.append(e)
        return out

    def _read_run(self, s: _Slab, run: list[int], stage: int, headers: dict) -> None:
        """Slabs run[0]..run[-1] (adjacent) of s: one read into the staging memory at `stage`,
        then each slab copied (or converted, with these scratch headers) to its home."""
        n = len(run) * s.nb2
        src = self.reader.read_span(stage, s.offset + run[0] * s.nb2, n)
        with self._lock:  # the read-ahead thread counts too
            self.bytes_read += n
        dst = s.home + run[0] * s.nb2
        if self._recycle:
            for i in range(len(run)):
                self._claim(dst + i * s.nb2, s.nb2)
        if not s.repack:
            ggml_ops.copy(dst, src, n)
            return
        step = convert_rows(s.rb)
        for i in range(len(run)):  # slab by slab: the converter's groups are those of one slab
            ggml_ops.repack_rows(s.header, self._tag, headers, dst + i * s.nb2,
                                 src + i * s.nb2, s.rows, step)

    def set_capacity(self, capacity: int) -> int:
        """A new capacity (a change of budget, between steps; never below the floor): evicts the
        least recently used experts until the cache fits. Returns the bytes given back."""
        if self._bg is not None:
            self._bg.wait()
        self._drop_abandoned()
        self.capacity = max(min(capacity, self.total_bytes), self._floor)
        self._drop_pool()
        before = self.used_bytes
        self._repin()
        self._make_room(set(), 0)
        self._release_spares()
        return before - self.used_bytes

    def _repin(self) -> None:
        """After a change of capacity: the pins warm() would choose for it (pin_share, on the
        counts of earlier runs and this one's), of those cached; no read. Unpinned experts join
        the least recently used end. A cache shrunk below a token's picks keeps its pinned part
        (an LRU part smaller than a token's picks evicts each before its layer comes again); one
        grown past them gives the LRU its room back."""
        counts = self._saved + self.counts
        if self.capacity >= self.total_bytes or not counts.any():
            return
        self.pin_share = pin_share(self.g, self._names, self.capacity, self.counts_file,
                                   self.cfg.n_expert_used, self.n_seq)
        want = _pins(counts, self.unit_bytes, self.capacity, self.pin_share) & self._resident
        for key in [k for k in self._pinned_order if k not in want]:
            self._pinned.discard(key)
            del self._pinned_order[key]
            self._order[key] = None
            self._order.move_to_end(key, last=False)
        for key in want - self._pinned:
            del self._order[key]
            self._pinned.add(key)
            self._pinned_order[key] = None

    def resident(self, layer: int) -> list[int]:
        """The layer's cached experts, in order (for tests and stats)."""
        return sorted(e for (l, e) in self._resident if l == layer)

    def summary(self) -> dict:
        looked = self.hits + self.misses
        ahead = {"prefetch_recall": round(self.predicted_used / self.predicted, 4)
                 if self.predicted else 0.0, "prefetched": self.prefetched,
                 "prefetch_used": self.prefetch_used} if self._bg else {}
        return {**ahead, "capacity_bytes": self.capacity, "expert_bytes": self.total_bytes,
                "cached_bytes": self.used_bytes, "hits": self.hits, "misses": self.misses,
                "hit_rate": round(self.hits / looked, 4) if looked else 0.0,
                "bytes_read": self.bytes_read, "fetch_s": round(self.fetch_s, 4),
                "recycled_slabs": self.recycled,
                "pinned": len(self._pinned), "pin_share": self.pin_share}

    def close(self) -> None:
        if self._arena is None:
            return
        if self._bg is not None:
            try:
                self._bg.close()
            except Exception:  # noqa: BLE001 - a read-ahead's error no longer matters
                pass
            self._stage2.free()
        self.save_counts()
        self._drop_pool()
        self._arena.free()
        self._arena = None
        for b in (self._stage, self._tag):
            if b is not None:
                b.free()
        self._loaders.close()
        self._table.free()
        self._convert_table.free()


def _can_recycle(slabs: dict) -> bool:
    """Evicted slabs' pages can move to the next load's home when every slab is whole pages at a
    page-aligned home, and the moves cannot run the process out of mappings: each moved slab may
    split the arena's mapping in two (vm.max_map_count, 65,530 by default; Qwen3-30B-A3B has
    18,432 slabs)."""
    all_slabs = [s for ss in slabs.values() for s in ss]
    if not all_slabs or any(s.nb2 % ggml_ops.PAGE or s.home % ggml_ops.PAGE for s in all_slabs):
        return False
    n = sum(s.header.contents.ne[2] for s in all_slabs)
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return False
    return 2 * n + 10_000 < limit


def _page(n: int) -> int:
    return (n + ggml_ops.PAGE - 1) // ggml_ops.PAGE * ggml_ops.PAGE
