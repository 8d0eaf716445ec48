"""Render a GGUF `tokenizer.chat_template` into the prompt text, the way HF transformers does.

A chat template is code shipped inside a model file, so it is untrusted: it runs in jinja2's
ImmutableSandboxedEnvironment (CVE-2024-34359 was llama-cpp-python rendering it unsandboxed), reaching
for any `_`-prefixed attribute fails at once instead of rendering as empty, and every render is
bounded in time, output, memory, loop iterations and call depth (template_guard.py, issue 17).
Every failure becomes one FlexInferError line naming `source`.
"""

import json
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache
from types import BuiltinMethodType

from jinja2 import TemplateError, TemplateSyntaxError, UndefinedError, nodes, pass_context
from jinja2.ext import Extension
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import _PassArg, generate_lorem_ipsum

from flexinfer import template_costs as costs
from flexinfer.errors import FlexInferError
from flexinfer.template_guard import (LOOP_FILTER, OPERAND_FILTER, Budget, Counted, GuardedCodeGenerator, Limits,
                                      Shape, TemplateLimit, check_operand, counted, current,
                                      materialize, shallow_bytes, text_bytes)

# What llama.cpp falls back to when a model has no template: ChatML, one block per message.
DEFAULT_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_N_CTX = 4096  # the context length assumed when the caller gives none
CHARS_PER_TOKEN = 8  # output limit: 8 characters a context token (text averages ~4), plus twice
MIN_MEMORY = 32 << 20  # the messages; memory: 8 bytes an output character, at least 32 MiB
MAX_RANGE = 100_000  # jinja2's own cap on range(), kept


def default_limits(n_ctx: int | None = None, given_chars: int = 0, seconds: float = 1.0) -> Limits:
    """The limits of a render for a model of context `n_ctx` given `given_chars` characters of
    messages and tools: a template may always echo what it was given, plus 8 characters a context
    token."""
    output = CHARS_PER_TOKEN * (n_ctx or DEFAULT_N_CTX) + 2 * given_chars
    return Limits(seconds=seconds, output_chars=output, memory_bytes=max(MIN_MEMORY, 8 * output))


def _input_chars(x, level: int) -> int:
    """Characters of text in the caller's messages or tools (all of it: it is not the template's)."""
    if isinstance(x, str):
        return len(x)
    if level > 32 or not isinstance(x, (dict, list, tuple)):
        return 0
    n = 0
    for v in (x.values() if isinstance(x, dict) else x):
        n += len(v) if isinstance(v, str) else _input_chars(v, level + 1)
    return n


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
    for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The jinja2 sandbox, stricter: unsafe attributes raise, and the hooks below price every
    operation that can grow a value against the render's Budget (template_guard.py)."""

    code_generator_class = GuardedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        b = current()
        if b is None:
            return super().call_binop(context, operator, left, right)
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, fast
            n = len(left) + len(right)
            n = n if left.isascii() and right.isascii() else n << 2
            if b.used + n > b.limits.memory_bytes:
                b.reserve(n, "'+'")  # raises, unless the limits grow with the input
            b.used += n
            return left + right
        b.reserve(costs.binop(operator, left, right), f"'{operator}'")
        result = self.binop_table[operator](left, right)
        b.charge(shallow_bytes(result))
        return result

    def getitem(self, obj, argument):
        if type(argument) is tuple:  # a tuple key is hashed: check its size first
            check_operand(argument)
        return super().getitem(obj, argument)

    def call(self, context, obj, /, *args, **kwargs):
        """Every call from the template: depth and clock checked, its result priced first."""
        b = current()
        if b is None:
            return super().call(context, obj, *args, **kwargs)
        b.enter()
        try:
            if isinstance(obj, LoopContext) and args:  # loop(children) in a recursive for
                args = (counted(args[0]),) + args[1:]
            cost, args = _price_call(obj, args, kwargs)
            b.reserve(cost, f"calling {getattr(obj, '__name__', type(obj).__name__)}()")
            result = super().call(context, obj, *args, **kwargs)
        finally:
            b.leave()
        if not isinstance(obj, (Macro, LoopContext)) and not _returns_a_part(obj):
            b.charge(shallow_bytes(result))  # (a macro's text was charged when it was joined)
        return result

    def concat(self, pieces) -> str:
        """The text of a macro, a `{% set %}` block or a block: priced before it is joined."""
        b = current()
        return "".join(pieces) if b is None else b.join(pieces)

    def guarded_concat(self, values) -> str:
        """`a ~ b ~ c` (the generated code calls this instead of jinja2's str_join)."""
        b = current()
        if b is None:
            return "".join(map(str, values))
        return b.join([v if isinstance(v, str) else _priced_text(v, b) for v in values])


def _returns_a_part(obj) -> bool:
    """A method of a dict, list or tuple (get, index, items...) returns what it holds, not a new
    value; only copy() builds one."""
    return isinstance(getattr(obj, "__self__", None), (dict, list, tuple)) and \
        getattr(obj, "__name__", "") != "copy"


def _priced_text(value, b: Budget) -> str:
    """str(value) for a value that is not text (its repr, for a container), priced first."""
    b.reserve(text_bytes(value), "printing a value")
    text = str(value)
    b.charge(shallow_bytes(text))
    return text


def _finalize(value):
    """Every `{{ value }}`: text passes as is, anything else is priced before str()."""
    if isinstance(value, str):
        return value
    b = current()
    return value if b is None else _priced_text(value, b)


def _price_call(obj, args: tuple, kwargs: dict) -> tuple[int, tuple]:
    """(bytes the call may build, its arguments) for a method of text, str.format, int.to_bytes,
    a global; a method of a container gets its arguments checked (it may compare or hash them)."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if type(obj) is BuiltinMethodType and isinstance(owner, (str, bytes)):
        if name == "join" and args:
            items = materialize(args[0])
            shape = Shape(items)
            slots = 0 if isinstance(items, (list, tuple)) else 8 * len(items)  # a str's chars
            return shape.text_bytes + (len(owner) * 4) * len(items) + slots, (items,) + args[1:]
        return costs.STR_METHODS.get(name, costs.STR_METHOD_DEFAULT)(owner, *args, **kwargs), args
    wrapped = getattr(obj, "__wrapped__", None)  # the sandbox's wrapper of str.format(_map)
    if name in ("format", "format_map") and isinstance(getattr(wrapped, "__self__", None), str):
        fmt = wrapped.__self__
        if name == "format_map":
            return costs.brace_format(fmt, (), args[0] if args and isinstance(args[0], dict)
                                      else {"": args}), args
        return costs.brace_format(fmt, args, kwargs), args
    if type(obj) is BuiltinMethodType and isinstance(owner, int) and name == "to_bytes":
        return costs.int_to_bytes(owner, *args, **kwargs), args
    if type(obj) is BuiltinMethodType and owner is not None:
        for a in args:
            check_operand(a)
        return 0, args
    rule = _GLOBAL_RULES.get(id(obj))
    return (rule(*args, **kwargs) if rule else 0), args


def _guard_filter(name: str, func):
    """`func` with its result priced by costs.FILTERS[name] first, and counted if lazy."""
    rule = costs.FILTERS[name]
    pass_arg = _PassArg.from_obj(func)
    charge = name not in costs.REFERENCE_FILTERS

    @pass_context  # also keeps jinja2 from running it at compile time, outside any budget
    def guarded(context, value, *args, **kwargs):
        b = current()
        if b is not None:
            b.check_time()
            if name == "join":
                value = materialize(value)
                sep = args[0] if args else kwargs.get("d", "")
                # jinja2 joins map(str, value): a list of 8-byte slots, then the text
                cost = text_bytes(value) + (text_bytes(sep) + 8) * len(value)
            else:
                cost = rule(value, *args, **kwargs)
            b.reserve(cost, f"the filter '{name}'")
        if pass_arg is _PassArg.context:
            result = func(context, value, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        if b is None:
            return result
        if isinstance(result, Iterator):
            return Counted(result, b)
        if charge:
            b.charge(shallow_bytes(result))
        return result

    return guarded


def _loop_guard(value):
    return counted(value)


def _guard_comparison(test):
    def guarded(a, *args):
        return test(check_operand(a), *(check_operand(x) for x in args))
    return guarded


def _safe_range(*args) -> range:
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:  # longer than sys.maxsize
        n = MAX_RANGE + 1
    if n > MAX_RANGE:
        raise TemplateLimit(f"the loop limit (a range() of more than {MAX_RANGE} items)")
    return r


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """HF's tojson: plain json.dumps, non-ASCII kept, no HTML escaping (jinja's own escapes <>&')."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_COMPARISON_TESTS = ("==", "eq", "equalto", "!=", "ne", ">", "gt", "greaterthan", ">=", "ge",
                     "<", "lt", "lessthan", "<=", "le", "in")


def _make_env() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                   extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters[LOOP_FILTER] = _loop_guard
    env.filters[OPERAND_FILTER] = check_operand
    for name in _COMPARISON_TESTS:
        env.tests[name] = _guard_comparison(env.tests[name])
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _safe_range
    return env


_ENV = _make_env()
_GLOBAL_RULES = {id(generate_lorem_ipsum): costs.lipsum, id(_strftime_now): costs.strftime_now}


@lru_cache(maxsize=8)
def _compile(template: str):
    return _ENV.from_string(template)  # a chat runs one template many times: compile it once


def render_chat(template: str, messages: list[dict], *, bos_token: str, eos_token: str,
                add_generation_prompt: bool = True, source: str = "model", tools=None,
                n_ctx: int | None = None, limits: Limits | None = None) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]) under `template`.
    `source` (the model file's name) starts every error message. `tools` (HF's list of function
    schemas) is passed when given. The render is bounded by `limits`, by default
    default_limits(n_ctx, characters of messages and tools): 1 s, output of 8 characters a context
    token (n_ctx 4096 if None) plus twice the input, memory 8 bytes an output character and at
    least 32 MiB. Safe to call from several threads at once: only the offending render fails."""
    def raise_exception(message):
        raise FlexInferError(f"{source}: chat template raised: {_one_line(message)}")

    variables = dict(messages=messages, bos_token=bos_token, eos_token=eos_token,
                     add_generation_prompt=add_generation_prompt, raise_exception=raise_exception)
    if tools is not None:
        variables["tools"] = tools
    if limits is None:  # the input is measured only if the render goes over the first limits
        limits = default_limits(n_ctx)
        budget = Budget(limits, lambda: default_limits(
            n_ctx, _input_chars(messages, 0) + _input_chars(tools, 0), limits.seconds))
    else:
        budget = Budget(limits)
    token = budget.activate()
    try:
        t = _compile(template)
        return budget.join(t.root_render_func(t.new_context(variables)), output=True)
    except FlexInferError:
        raise
    except TemplateLimit as e:
        raise FlexInferError(f"{source}: chat template exceeded {e}") from None
    except RecursionError:
        raise FlexInferError(f"{source}: chat template recursed deeper than Python's stack "
                             "allows") from None
    except MemoryError:
        raise FlexInferError(f"{source}: chat template ran out of memory") from None
    except Exception as e:  # the template is untrusted code: whatever it provokes is its fault
        raise FlexInferError(f"{source}: chat template {_reason(e)}") from e
    finally:
        Budget.reset(token)


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
