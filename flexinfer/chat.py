"""Render a GGUF `tokenizer.chat_template` into the prompt text, the way HF transformers does.

A chat template is code shipped inside a model file, so it is untrusted: it runs in jinja2's
ImmutableSandboxedEnvironment (CVE-2024-34359 was llama-cpp-python rendering it unsandboxed), reaching
for any `_`-prefixed attribute fails at once instead of rendering as empty, and `*`/`**` are bounded so
a template cannot ask for gigabytes. Every failure becomes one FlexInferError line naming `source`.
"""

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError, TemplateSyntaxError, UndefinedError, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from flexinfer.errors import FlexInferError

# What llama.cpp falls back to when a model has no template: ChatML, one block per message.
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_MAX_REPEAT = 1_000_000  # `'x' * n` or `[..] * n` may build at most 1M items
_MAX_EXPONENT = 1_000  # `a ** b` with |b| > 1000 is refused (2 ** 10**9 would hang the render)


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The jinja2 sandbox, stricter: unsafe attributes raise, repetition and powers are bounded."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        if operator == "**" and _is_number(right) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is larger than {_MAX_EXPONENT}")
        if operator == "*" and _repeat_size(left, right) > _MAX_REPEAT:
            raise SecurityError(f"repetition would build more than {_MAX_REPEAT} items")
        return super().call_binop(context, operator, left, right)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _repeat_size(left, right) -> int:
    if isinstance(left, (str, list, tuple)) and isinstance(right, int):
        return len(left) * right
    if isinstance(right, (str, list, tuple)) and isinstance(left, int):
        return len(right) * left
    return 0


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """HF's tojson: plain json.dumps, non-ASCII kept, no HTML escaping (jinja's own escapes <>&')."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_env() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_env()


@lru_cache(maxsize=8)
def _compile(template: str):
    return _ENV.from_string(template)  # a chat runs one template many times: compile it once


def render_chat(template: str, messages: list[dict], *, bos_token: str, eos_token: str,
                add_generation_prompt: bool = True, source: str = "model") -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]) under `template`.
    `source` (the model file's name) starts every error message."""
    def raise_exception(message):
        raise FlexInferError(f"{source}: chat template raised: {_one_line(message)}")

    try:
        return _compile(template).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt, raise_exception=raise_exception)
    except FlexInferError:
        raise
    except Exception as e:  # the template is untrusted code: whatever it provokes is its fault
        raise FlexInferError(f"{source}: chat template {_reason(e)}") from e


def _reason(e: Exception) -> str:
    if isinstance(e, TemplateSyntaxError):
        return f"syntax error on line {e.lineno}: {_one_line(e.message)}"
    if isinstance(e, SecurityError):
        return f"refused unsafe access: {_one_line(e)}"
    if isinstance(e, UndefinedError):
        return f"uses an undefined value: {_one_line(e)}"
    if isinstance(e, TemplateError):
        return f"failed: {_one_line(e)}"
    return f"failed: {type(e).__name__}: {_one_line(e)}"


def _one_line(x) -> str:
    return " ".join(str(x).split())
