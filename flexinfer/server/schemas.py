"""Validation of the request bodies of /v1/chat/completions and /v1/completions.

Every check names the field (`param`) and says what is wrong, as OpenAI does; a body that passes
becomes a `Parsed`. Unknown fields are ignored (clients send many), except those whose silent
omission would change the answer (n > 1, tools, logprobs, echo, suffix): those are refused.
Extensions as llama-server has them: top_k, min_p, repeat_penalty, ignore_eos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flexinfer.server.errors import bad

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 16


@dataclass
class Parsed:
    kind: str  # "chat" | "completion"
    model: str | None
    messages: list[dict] | None = None  # chat: [{"role", "content": str}]
    prompt: str | list[int] | None = None  # completion: text or token ids
    max_tokens: int | None = None  # None: the rest of the context
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    sampling: dict = field(default_factory=dict)  # SamplingOptions fields other than max_tokens


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return None
    ok = _is_num(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad(f"'{name}' must be a number in {rng}, got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise bad(f"'{name}' must be an integer, got {v!r}", name)
    if v < lo or (hi is not None and v > hi):
        more = f" and at most {hi}" if hi is not None else ""
        raise bad(f"'{name}' must be at least {lo}{more}, got {v}", name)
    return v


def _boolean(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {v!r}", name)
    return v


def _refuse_unsupported(body: dict) -> None:
    if body.get("n") not in (None, 1):
        raise bad(f"'n' must be 1 (one choice per request), got {body['n']!r}", "n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(f"'{name}' is not supported by this server", name)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise bad("'logprobs' is not supported by this server", "logprobs")
    if body.get("echo"):
        raise bad("'echo' is not supported by this server", "echo")
    if body.get("suffix"):
        raise bad("'suffix' is not supported by this server", "suffix")
    if body.get("best_of") not in (None, 1):
        raise bad("'best_of' must be 1", "best_of")


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,) if v else ()
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad(f"'stop' must be a string or a list of strings, got {v!r}", "stop")
    if len(v) > MAX_STOPS:
        raise bad(f"'stop' may hold at most {MAX_STOPS} strings, got {len(v)}", "stop")
    return tuple(s for s in v if s)


def _common(body: dict, n_ctx: int) -> dict:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {model!r}", "model")
    _refuse_unsupported(body)
    max_tokens = _integer(body, "max_tokens", 1, n_ctx)
    mct = _integer(body, "max_completion_tokens", 1, n_ctx)
    if mct is not None:
        max_tokens = mct if max_tokens is None else min(max_tokens, mct)
    stream = _boolean(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad(f"'stream_options' must be an object, got {so!r}", "stream_options")
    include_usage = _boolean(so or {}, "include_usage")
    sampling = {k: v for k, v in (
        ("temperature", _number(body, "temperature", 0, 2)),
        ("top_p", _number(body, "top_p", 0, 1, lo_open=True)),
        ("min_p", _number(body, "min_p", 0, 1)),
        ("top_k", _integer(body, "top_k", 0)),
        ("repeat_penalty", _number(body, "repeat_penalty", 0, 10, lo_open=True)),
        ("presence_penalty", _number(body, "presence_penalty", -2, 2)),
        ("frequency_penalty", _number(body, "frequency_penalty", -2, 2)),
        ("seed", _integer(body, "seed", 0, 2**63 - 1)),
    ) if v is not None}
    if _boolean(body, "ignore_eos"):
        sampling["ignore_eos"] = True
    return dict(model=model, max_tokens=max_tokens, stop=_stop(body), stream=stream,
                include_usage=include_usage and stream, sampling=sampling)


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    param = f"messages[{i}].content"
    if c is None:
        if msg["role"] == "assistant":
            return ""
        raise bad(f"'{param}' is missing", param)
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad(f"'{param}[{j}]' must be a text part {{\"type\": \"text\", \"text\": "
                          "...}: this server reads text only", param)
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"'{param}' must be a string or a list of text parts, got {c!r}", param)


def parse_chat(body, n_ctx: int) -> Parsed:
    common = _common(body, n_ctx)
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is a required field", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"'messages[{i}]' must be an object, got {m!r}", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got {role!r}",
                      f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m, i)})
    return Parsed("chat", messages=out, **common)


def parse_completion(body, n_ctx: int) -> Parsed:
    common = _common(body, n_ctx)
    p = body.get("prompt")
    if p is None:
        raise bad("'prompt' is a required field", "prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    ok = isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p))
    if not ok:
        raise bad("'prompt' must be a string or a non-empty list of token ids (one prompt per "
                  "request)", "prompt")
    return Parsed("completion", prompt=p, **common)
