"""Pick the next token from a vector of logits, the way llama.cpp users expect.

The chain is llama.cpp's default order: penalties (repeat, then OpenAI's presence/frequency), top-k, top-p, min-p, temperature, draw.
Temperature 0 is greedy argmax and skips everything after the penalty. Every step works on a
candidate subset as soon as one exists, so a 150k vocabulary is touched by O(n) numpy passes only
(one argpartition for top-k, one exp for probabilities); there is no Python loop over the vocab and
no full sort unless top-p is asked for without top-k, and even then the sort grows only as needed.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

from flexinfer.errors import FlexInferError

_NUCLEUS_FIRST_K = 64  # top-p looks at 64 candidates first, then 8x more, until the mass is reached


@dataclass(frozen=True)
class Sampler:
    """A callable `sampler(logits, history) -> token id`; build it with `make_sampler`."""

    temperature: float  # 0: greedy argmax (ties: lowest id); >0 divides logits before the draw
    top_k: int  # keep the k highest logits; 0: off
    top_p: float  # keep the smallest head whose probability mass reaches top_p; 1.0: off
    min_p: float  # drop tokens with p < min_p * p_max; 0.0: off
    repeat_penalty: float  # llama.cpp-style: positive logits / penalty, negative * penalty; 1.0: off
    repeat_last_n: int  # how many recent history tokens are penalized; 0: off, -1: all history
    seed: int | None  # the seed given; None drew one from the OS
    rng: np.random.Generator = field(repr=False, compare=False)  # PCG64(seed): same seed, same draws
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often the token was generated

    def __call__(self, logits: np.ndarray, history: Sequence[int] = (), n_prompt: int = 0) -> int:
        """history: prompt then generated ids; the first n_prompt of them are the prompt, which
        the presence and frequency penalties skip (they count generated tokens only)."""
        logits = _penalize(np.asarray(logits, dtype=np.float32), history,
                           self.repeat_penalty, self.repeat_last_n)
        logits = _penalize_counts(logits, history[n_prompt:], self.presence_penalty,
                                  self.frequency_penalty)
        if self.temperature == 0 or self.top_k == 1:
            return _argmax(logits)
        ids = _top_k(logits, self.top_k)  # (k,) candidate token ids
        vals = logits[ids].astype(np.float64)
        top = vals.max()
        if not np.isfinite(top):
            raise FlexInferError(f"sampler: logits have no finite maximum (got {top})")
        weights = np.exp(vals - top)  # unnormalized probabilities, the best is 1.0
        total = weights.sum()
        # min-p before top-p gives the same set as llama.cpp's top-p then min-p: both keep a head of
        # the same order, min-p's threshold is relative to p_max, and top-p's mass uses `total`.
        keep = np.flatnonzero(weights >= self.min_p) if self.min_p > 0 else None
        if keep is not None:
            ids, weights = ids[keep], weights[keep]
        if self.top_p < 1.0:
            head = _nucleus(weights, self.top_p * total)
            ids, weights = ids[head], weights[head]
        return self._draw(ids, logits[ids].astype(np.float64))

    def _draw(self, ids: np.ndarray, vals: np.ndarray) -> int:
        probs = np.exp((vals - vals.max()) / self.temperature)
        cum = np.cumsum(probs)
        i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return int(ids[min(i, len(ids) - 1)])


def make_sampler(temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 seed: int | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0) -> Sampler:
    """Validate the options (FlexInferError names the flag at fault) and build a Sampler."""
    _check(_is_real(temperature) and temperature >= 0, "--temperature", ">= 0", temperature)
    _check(_is_int(top_k) and top_k >= 0, "--top-k", "an integer >= 0 (0 = off)", top_k)
    _check(_is_real(top_p) and 0 < top_p <= 1, "--top-p", "in (0, 1]", top_p)
    _check(_is_real(min_p) and 0 <= min_p <= 1, "--min-p", "in [0, 1]", min_p)
    _check(_is_real(repeat_penalty) and repeat_penalty > 0, "--repeat-penalty", "> 0",
           repeat_penalty)
    _check(_is_int(repeat_last_n) and repeat_last_n >= -1, "--repeat-last-n",
           "an integer >= -1 (-1 = all history)", repeat_last_n)
    _check(seed is None or (_is_int(seed) and seed >= 0), "--seed", "an integer >= 0", seed)
    for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        _check(_is_real(v) and -2 <= v <= 2, name, "in [-2, 2] (OpenAI's range)", v)
    return Sampler(float(temperature), int(top_k), float(top_p), float(min_p),
                   float(repeat_penalty), int(repeat_last_n), seed,
                   np.random.Generator(np.random.PCG64(seed)),
                   float(presence_penalty), float(frequency_penalty))


def _check(ok: bool, option: str, rule: str, value) -> None:
    if not ok:
        raise FlexInferError(f"{option} must be {rule}, got {value!r}")


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and bool(np.isfinite(x))


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _penalize(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int) -> np.ndarray:
    """llama.cpp's repeat penalty over the distinct tokens among the last `last_n`; copies, never
    writes the caller's array."""
    if penalty == 1.0 or last_n == 0 or len(history) == 0:
        return logits
    recent = np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64)
    ids = np.unique(recent)
    ids = ids[(ids >= 0) & (ids < logits.shape[0])]
    out = logits.copy()
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def _penalize_counts(logits: np.ndarray, generated: Sequence[int], presence: float,
                     frequency: float) -> np.ndarray:
    """OpenAI's penalties: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, count[j]
    being how many times token j was generated so far. Copies, never writes the caller's array."""
    if (presence == 0.0 and frequency == 0.0) or len(generated) == 0:
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    keep = (ids >= 0) & (ids < logits.shape[0])
    ids, counts = ids[keep], counts[keep]
    out = logits.copy()
    out[ids] -= (counts * frequency + presence).astype(np.float32)
    return out


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))  # numpy returns the first maximum: ties go to the lowest id


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k highest logits in no particular order (all ids when k is 0 or >= n_vocab)."""
    n = logits.shape[0]
    if k == 0 or k >= n:
        return np.arange(n)
    return np.argpartition(logits, n - k)[n - k:]  # O(n_vocab), no sort


def _nucleus(weights: np.ndarray, target: float) -> np.ndarray:
    """Positions of the smallest highest-weight head whose summed weight reaches `target` (at
    least one). Sorts 64 candidates first and widens 8x only when their mass falls short."""
    n = weights.shape[0]
    k = min(_NUCLEUS_FIRST_K, n)
    while True:
        head = np.arange(n) if k == n else np.argpartition(-weights, k - 1)[:k]
        head = head[np.argsort(-weights[head], kind="stable")]
        cut = int(np.searchsorted(np.cumsum(weights[head]), target, side="left"))
        if cut < k or k == n:
            return head[:cut + 1]
        k = min(k * 8, n)
