"""check_tokenizer_metadata: the tokenizer arrays and special token ids of a GGUF file, checked
before anything is built from them.

llama.cpp reads `tokenizer.ggml.scores` and `token_type` through a raw float/int pointer whatever
their element type, and indexes the vocabulary with the special ids as given; a crafted file turns
either into an out-of-bounds read. Here every array must have the element type the format gives
it (tokens: string, scores: float32, token_type: int32, merges: string) and the tokens' length, and
every `tokenizer.ggml.*_token_id` must be an integer inside the vocabulary.
"""

from __future__ import annotations

import numpy as np

from flexinfer.errors import GGUFError
from flexinfer.gguf_file import GGUFFile, show_name

TOKENS = "tokenizer.ggml.tokens"
# key -> numpy dtype its array must have; each as long as the tokens
_PER_TOKEN = {"tokenizer.ggml.scores": np.dtype("<f4"),
              "tokenizer.ggml.token_type": np.dtype("<i4")}
_STRINGS = ("tokenizer.ggml.model", "tokenizer.ggml.pre")  # a plain string when present


def check_tokenizer_metadata(g: GGUFFile) -> None:
    """Raise GGUFError naming the key if the tokenizer metadata is malformed; absent keys are fine
    here (whether a tokenizer can be built without them is the tokenizer's question)."""
    m = g.metadata
    for key in _STRINGS:
        if key in m and not isinstance(m[key], str):
            _fail(g, key, f"is {_kind(m[key])}, expected a string")
    n = _string_list(g, TOKENS)
    _string_list(g, "tokenizer.ggml.merges")
    for key, dtype in _PER_TOKEN.items():
        if key not in m:
            continue
        v = m[key]
        if not isinstance(v, np.ndarray) or v.dtype != dtype:
            _fail(g, key, f"is {_kind(v)}, expected an array of {dtype.name}")
        if n is None:
            _fail(g, key, f"is present but '{TOKENS}' is not")
        if len(v) != n:
            _fail(g, key, f"has {len(v)} entries but '{TOKENS}' has {n}")
    for key in m:
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            _check_id(g, key, n)


def _string_list(g: GGUFFile, key: str) -> int | None:
    """The length of the string array at key (None when absent); anything else is refused."""
    v = g.metadata.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(type(s) is str for s in v):
        _fail(g, key, f"is {_kind(v)}, expected an array of strings")
    if key == TOKENS and not v:
        _fail(g, key, "is empty")
    return len(v)


def _check_id(g: GGUFFile, key: str, n: int | None) -> None:
    v = g.metadata[key]
    if not isinstance(v, int) or isinstance(v, bool):
        _fail(g, key, f"is {_kind(v)}, expected an integer token id")
    if v < 0:
        _fail(g, key, f"token id {v} is negative")
    if n is not None and v >= n:
        _fail(g, key, f"token id {v} is outside the vocabulary of {n} tokens")


def _kind(v) -> str:
    """What a metadata value is, for a message: 'an array of int32', 'a string', ..."""
    if isinstance(v, np.ndarray):
        return f"an array of {v.dtype.name}"
    if isinstance(v, list):
        return "an empty array" if not v else "an array of " + (
            "strings" if isinstance(v[0], str) else "arrays")
    names = {str: "a string", bool: "a bool", int: "an integer", float: "a float"}
    return names.get(type(v), "a value")


def _fail(g: GGUFFile, key: str, what: str):
    raise GGUFError(g.path, f"metadata {show_name(key)} {what}")
