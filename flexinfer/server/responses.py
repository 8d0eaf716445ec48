"""The OpenAI response shapes: whole responses, stream chunks and usage, for chat and completions."""

from __future__ import annotations

import time
import uuid


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def finish(reason: str | None) -> str:
    """The scheduler's "cancelled" (a timeout or shutdown cut the sequence) is reported as "length"."""
    return "stop" if reason == "stop" else "length"


def usage(u: dict) -> dict:
    p, c = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": int(u.get("cached_tokens") or 0)}}


class Shape:
    """Builds the JSON of one request's responses (the same id, model and created in each)."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
        self.id, self.created = new_id(kind), int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, reason: str | None, u: dict) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish(reason)}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage(u)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish(reason)}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(u)}

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False,
              with_usage: bool = False) -> dict:
        """One streamed chunk; with stream_options.include_usage every chunk carries usage: null."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text or ""} if first else \
                ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish(reason) if reason else None}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish(reason) if reason else None}
            out = {**self._head("text_completion"), "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, u: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(u)}
