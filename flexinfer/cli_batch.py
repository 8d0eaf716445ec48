"""`flexinfer batch MODEL PROMPTS.jsonl [-o OUT.jsonl] --parallel N [--json]`: the offline
throughput job, where offloading pays most: N sequences share every weight pass.

Input: one JSON object a line, `{"prompt": "..."}` or `{"messages": [...]}` (the chat template),
with optional max_tokens, temperature, top_p, seed, stop (a string or a list). Every line is checked,
tokenized and fitted to the context before anything runs, so a bad line stops the job with one error
naming the file and line, and nothing is half written. Output: one line a sequence as it finishes,
flushed, `{"index", "prompt_tokens", "tokens", "text", "cached_tokens", "finish_reason"}`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

from flexinfer.errors import FlexInferError
from flexinfer.generate import SamplingOptions, chat_prompt, fit_prompt
from flexinfer.scheduler import BatchLoop, Request

_FIELDS = {"prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop"}
_NUMBERS = {"max_tokens": int, "temperature": float, "top_p": float, "seed": int}


def read_jobs(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; errors name the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FlexInferError(f"{path}: cannot read the prompts: "
                             f"{getattr(e, 'strerror', None) or e}") from None
    jobs = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            jobs.append((n, _parse_line(path, n, line)))
    if not jobs:
        raise FlexInferError(f"{path}: no prompts (one JSON object a line)")
    return jobs


def _parse_line(path: str, n: int, line: str) -> dict:
    where = f"{path}:{n}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise FlexInferError(f"{where}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FlexInferError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise FlexInferError(f"{where}: unknown field {unknown[0]!r} (fields: "
                             f"{', '.join(sorted(_FIELDS))})")
    if ("prompt" in obj) == ("messages" in obj):
        raise FlexInferError(f"{where}: give exactly one of \"prompt\" and \"messages\"")
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise FlexInferError(f"{where}: \"prompt\" must be a string")
    if "messages" in obj and not _messages_ok(obj["messages"]):
        raise FlexInferError(f"{where}: \"messages\" must be a list of "
                             "{\"role\": str, \"content\": str} objects")
    for key, kind in _NUMBERS.items():
        v = obj.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or (kind is int and not float(v).is_integer())):
            raise FlexInferError(f"{where}: \"{key}\" must be a number"
                                 f"{' (whole)' if kind is int else ''}")
    if obj.get("max_tokens") is not None and obj["max_tokens"] < 0:
        raise FlexInferError(f"{where}: \"max_tokens\" must be >= 0")
    stop = obj.get("stop")
    if stop is not None and not (isinstance(stop, str) or (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise FlexInferError(f"{where}: \"stop\" must be a string or a list of strings")
    return obj


def _messages_ok(msgs) -> bool:
    return isinstance(msgs, list) and bool(msgs) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs)


def make_request(model, path: str, n: int, obj: dict, base: SamplingOptions) -> Request:
    """The line's prompt tokenized and fitted to the context, with its own sampling options."""
    where = f"{path}:{n}"
    opts = replace(base, **{k: _NUMBERS[k](obj[k]) for k in _NUMBERS if obj.get(k) is not None})
    try:
        ids = chat_prompt(model, obj["messages"]) if "messages" in obj \
            else model.tokenize(obj["prompt"])
        if not ids:
            raise FlexInferError("the prompt is empty")
        ids = fit_prompt(ids, model.n_ctx, opts.max_tokens, opts.truncate)
    except FlexInferError as e:
        raise FlexInferError(f"{where}: {e}") from None
    stop = obj.get("stop")
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return Request(ids, opts, tuple(s for s in stop if s), id=str(n))


def batch_command(a, options: dict, sampling: dict) -> int:
    from flexinfer.hub import resolve
    from flexinfer.model import load
    jobs = read_jobs(a.prompts)  # before the model loads: a bad file costs nothing
    out = open(a.output, "w", encoding="utf-8") if a.output else sys.stdout  # noqa: SIM115
    try:
        with load(resolve(a.model), **{**options, "n_seq": a.parallel}) as model:
            base = SamplingOptions(**sampling)
            reqs = [make_request(model, a.prompts, n, obj, base) for n, obj in jobs]
            summary = _run_all(model, reqs, out, a)
    finally:
        if out is not sys.stdout:
            out.close()
    if a.json:
        print(json.dumps(summary), flush=True)
    return 0


def _run_all(model, reqs: list[Request], out, a) -> dict:
    loop = BatchLoop(model, a.parallel, max_queue=len(reqs))
    results, bar = {}, _Progress(len(reqs), enabled=sys.stderr.isatty() and not a.json)
    for i, req in enumerate(reqs):
        results[i] = {"tokens": [], "text": []}
        loop.add(req, lambda e, i=i: _collect(e, i, reqs[i], results[i], out, bar, loop))
    t0 = time.perf_counter()
    while not loop.idle:
        loop.step()
        bar.draw(loop.stats()["decode_tokens"] / (time.perf_counter() - t0))
    bar.close()
    s = loop.stats()
    return {"sequences": len(reqs), "decode_tokens": s["decode_tokens"],
            "decode_tokens_per_s": s["decode_tok_s"], "prefill_tokens_per_s": s["prefill_tok_s"],
            "cached_tokens": s["cached_tokens"], "wall_s": round(time.perf_counter() - t0, 3),
            "peak_memory_bytes": _peak(), "bytes_read_per_token": s["bytes_read_per_token"],
            "budget_bytes": model.stats.budget_bytes, "budget_source": model.stats.budget_source,
            "parallel": a.parallel}


def _collect(e, i: int, req: Request, r: dict, out, bar, loop) -> None:
    if e.kind == "piece":
        if e.token >= 0:
            r["tokens"].append(e.token)
        r["text"].append(e.text)
        return
    line = {"index": i, "prompt_tokens": len(req.ids), "tokens": r["tokens"],
            "text": "".join(r["text"])}
    if e.kind == "error":
        line.update(cached_tokens=0, finish_reason="error", error=e.message)
    else:
        line.update(cached_tokens=e.usage["cached_tokens"], finish_reason=e.finish_reason)
    out.write(json.dumps(line, ensure_ascii=False) + "\n")
    out.flush()
    bar.done += 1


def _peak() -> int:
    from flexinfer.budget import peak_rss_bytes
    return peak_rss_bytes()


class _Progress:
    """`batch [#####-----] 12/40  38.2 tok/s` redrawn in place on a terminal's stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled

    def draw(self, tok_s: float) -> None:
        if self.enabled:
            filled = 20 * self.done // self.total
            sys.stderr.write(f"\r\033[Kbatch [{'#' * filled}{'-' * (20 - filled)}] "
                             f"{self.done}/{self.total}  {tok_s:.1f} tok/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
