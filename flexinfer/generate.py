"""Generation as a ladder of small steps (mlx-lm's generate_step): encode, prefill, then decode one
token at a time, yielding each piece of text with its token id as soon as it exists."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from flexinfer.chat import DEFAULT_CHATML, render_chat
from flexinfer.errors import FlexInferError
from flexinfer.sampler import make_sampler
from flexinfer.stats import RunTimes
from flexinfer.tokenizer import StreamDecoder


@dataclass(frozen=True)
class Piece:
    text: str  # the text this token completes ("" while a multi-byte character is split)
    token: int  # the token id


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 128  # -n: stop after this many generated tokens
    temperature: float = 0.8  # 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None  # same seed, same output
    truncate: bool = False  # cut a prompt longer than the context instead of refusing it
    ignore_eos: bool = False  # keep generating past end-of-generation tokens (benchmarks)
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens: -= (count > 0) * this
    frequency_penalty: float = 0.0  # OpenAI's, over generated tokens: -= count * this


def fit_prompt(ids: list[int], n_ctx: int, max_tokens: int, truncate: bool) -> list[int]:
    """The prompt must leave room for at least one generated token."""
    room = n_ctx - 1
    if len(ids) <= room:
        return ids
    if not truncate:
        raise FlexInferError(f"the prompt is {len(ids)} tokens but the context holds {n_ctx} "
                             "(use a larger --ctx-size, or --truncate to keep its end)")
    keep = max(1, n_ctx - max(1, min(max_tokens, n_ctx // 2)))
    return ids[-keep:]


def sampler_for(opts: SamplingOptions):
    return make_sampler(opts.temperature, opts.top_k, opts.top_p, opts.min_p, opts.repeat_penalty,
                        opts.repeat_last_n, opts.seed, opts.presence_penalty,
                        opts.frequency_penalty)


def prefill(model, ids: list[int], times: RunTimes, seq: int = 0):
    """Evaluate the prompt in sequence `seq`, after the tokens the cache already holds for it
    (at least the last token is evaluated, for its logits); returns the last logits."""
    t0 = time.perf_counter()
    cached = model.cache.reusable_prefix(seq, ids)
    logits = model.evaluate(ids[cached:], cached, seq=seq)[-1]
    times.prompt_tokens, times.cached_tokens = len(ids), cached
    times.prefill_s = time.perf_counter() - t0
    return logits


def generate_ids(model, ids: list[int], opts: SamplingOptions,
                 times: RunTimes | None = None, seq: int = 0) -> Iterator[int]:
    """Yield generated token ids until an end-of-generation token, max_tokens, or a full context."""
    times = times if times is not None else RunTimes()
    model.check_tokens(ids)
    sampler = sampler_for(opts)
    history = list(ids)
    logits = prefill(model, ids, times, seq)
    r0, io0, st0, cv0, d0 = model.io_counters()
    e0 = model.expert_counters()
    t0 = time.perf_counter()
    try:
        for _ in range(opts.max_tokens):
            tok = sampler(logits, history, len(ids))
            if tok in model.tokenizer.eog_ids and not opts.ignore_eos:
                return
            history.append(tok)
            times.decode_tokens += 1
            yield tok
            if len(history) >= model.n_ctx:
                return
            logits = model.evaluate([tok], len(history) - 1, seq=seq)[-1]
    finally:
        r1, io1, st1, cv1, d1 = model.io_counters()
        times.decode_s = time.perf_counter() - t0
        times.bytes_read, times.io_busy_s, times.stall_s = r1 - r0, io1 - io0, st1 - st0
        times.convert_s, times.disk_read = cv1 - cv0, d1 - d0
        times.experts = tuple(b - a for a, b in zip(e0, model.expert_counters()))


def generate(model, prompt: str | list[int], *, add_bos: bool | None = None,
             special: bool = False, times: RunTimes | None = None, **sampling) -> Iterator[Piece]:
    """Text (or ids) in, pieces of text out, as they are made."""
    opts = SamplingOptions(**sampling)
    if opts.max_tokens < 0:
        raise FlexInferError(f"--max-tokens must be >= 0, got {opts.max_tokens}")
    ids = model.tokenize(prompt, add_bos=add_bos, special=special) if isinstance(prompt, str) \
        else list(prompt)
    ids = fit_prompt(ids, model.n_ctx, opts.max_tokens, opts.truncate)
    decoder = StreamDecoder(model.tokenizer)
    for tok in generate_ids(model, ids, opts, times):
        yield Piece(decoder.feed(tok), tok)
    tail = decoder.flush()
    if tail:
        yield Piece(tail, -1)


def chat_prompt(model, messages: list[dict]) -> list[int]:
    """Render the model's chat template (sandboxed) and tokenize it with control tokens parsed."""
    md, tok = model.g.metadata, model.tokenizer
    template = md.get("tokenizer.chat_template") or DEFAULT_CHATML
    text = render_chat(template, messages, source=model.path, n_ctx=model.n_ctx,
                       bos_token=tok.tokens[tok.bos_id] if tok.bos_id is not None else "",
                       eos_token=tok.tokens[tok.eos_id] if tok.eos_id is not None else "")
    ids = model.tokenize(text, special=True)
    if len(ids) > 1 and ids[0] == ids[1] == tok.bos_id:  # the template wrote BOS too
        ids = ids[1:]
    return ids


def chat(model, messages: list[dict], **kw) -> Iterator[Piece]:
    return generate(model, chat_prompt(model, messages), **kw)
