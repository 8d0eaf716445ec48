"""Limits on one chat-template render: time, output, memory, loop iterations, call depth (issue 17).

A chat template is code from the model file. The sandbox (chat.py) keeps it away from Python's
internals; this module bounds the work it may do. Every render gets a `Budget`, held in a ContextVar
so that renders on different threads (the server's workers) never see each other's budget, and the
compiled template calls back into it:

- every `{% for %}` iterable is wrapped (GuardedCodeGenerator) so each iteration is counted and the
  clock read: loops, nested loops, loops over long strings and `loop(...)` recursion stop at the loop
  or time limit;
- everything that can build a large value is priced *before* it runs and charged after, in bytes
  (1 a character for ASCII text, 4 otherwise, 8 a list slot): `+ * % **`, `~` (the generated code's
  join), filters, method calls, `{{ }}` output of non-text values and the buffers of macros and
  `{% set %}` blocks. The memory limit is on the sum, so doubling a string 60 times stops after a
  few doublings instead of asking for 2**60 bytes;
- every call (macro, method, global) counts its nesting depth and reads the clock, so recursion with
  fan-out stops at the time limit and deep recursion at the depth limit.

A limit crossed raises TemplateLimit; render_chat turns it into one FlexInferError line.
"""

import time
from collections.abc import ItemsView, KeysView, ValuesView
from contextvars import ContextVar
from dataclasses import dataclass

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.utils import Namespace

LOOP_FILTER = "flexinfer loop guard"  # filter names no template can spell (they have spaces)
OPERAND_FILTER = "flexinfer operand guard"
MAX_PARTS = 100_000  # a value with more parts than this is never turned into text or compared
MAX_NESTING = 64  # nor one nested deeper
MAX_INT_BITS = 65_536  # integers above ~19,700 digits are refused (their arithmetic gets slow)


class TemplateLimit(Exception):
    """A render crossed a limit; str(e) says which ("the time limit (1 s)")."""


@dataclass(frozen=True)
class Limits:
    """What one render may use. `output_chars` is on the final text; `memory_bytes` on the sum of
    everything the template builds while rendering (see the module docstring)."""
    seconds: float = 1.0
    output_chars: int = 8 * 4096
    memory_bytes: int = 32 << 20
    iterations: int = 1_000_000
    depth: int = 64


_BUDGET: ContextVar["Budget | None"] = ContextVar("flexinfer_template_budget", default=None)


# current() -> the budget of the render running in this thread or task (None outside
# render_chat); the ContextVar's own method, as it is called for every operator and filter.
current = _BUDGET.get


class Budget:
    """The running totals of one render, checked against its Limits. `grow`, when given, makes the
    limits the render may need beyond the first ones (they depend on the size of the input, which
    is only measured if a first limit is reached)."""

    __slots__ = ("limits", "deadline", "used", "loops", "depth", "_grow")

    def __init__(self, limits: Limits, grow=None):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.used = 0  # bytes charged so far
        self.loops = 0
        self.depth = 0
        self._grow = grow

    def activate(self):
        """Make this the budget of the calling thread's render; returns the token for `reset`."""
        return _BUDGET.set(self)

    @staticmethod
    def reset(token) -> None:
        _BUDGET.reset(token)

    def _regrow(self) -> bool:
        if self._grow is None:
            return False
        self.limits, self._grow = self._grow(), None
        return True

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"the time limit ({self.limits.seconds:g} s)")

    def step(self) -> None:
        """One loop iteration."""
        self.loops += 1
        if self.loops > self.limits.iterations:
            raise TemplateLimit(f"the loop limit ({self.limits.iterations} iterations)")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"the time limit ({self.limits.seconds:g} s)")

    def reserve(self, nbytes: int, what: str = "") -> None:
        """Refuse, before it is built, a value of `nbytes` that would go over the memory limit."""
        if self.used + nbytes > self.limits.memory_bytes:
            if not (self._regrow() and self.used + nbytes <= self.limits.memory_bytes):
                self._over(nbytes, what)

    def charge(self, nbytes: int) -> None:
        """Count `nbytes` just built (refused afterwards if over: the build was priced before)."""
        self.used += nbytes
        if self.used > self.limits.memory_bytes:
            if not (self._regrow() and self.used <= self.limits.memory_bytes):
                self.used -= nbytes
                self._over(nbytes, "")

    def _over(self, nbytes: int, what: str) -> None:
        detail = f"{what} needs {_mib(nbytes)} with {_mib(self.used)} used" if what else \
            f"{_mib(nbytes)} more with {_mib(self.used)} used"
        raise TemplateLimit(f"the memory limit ({_mib(self.limits.memory_bytes)}: {detail})")

    def enter(self) -> None:
        """A call begins (macro, method, global)."""
        self.depth += 1
        if self.depth > self.limits.depth:
            raise TemplateLimit(f"the recursion limit ({self.limits.depth} nested calls)")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"the time limit ({self.limits.seconds:g} s)")

    def leave(self) -> None:
        self.depth -= 1

    def join(self, pieces, output: bool = False) -> str:
        """"".join(pieces) of strings (a macro's buffer, a render stream), priced before the join.
        With `output`, the render's own stream: stopped at the first piece over the output limit."""
        if output:
            parts, chars, limit = [], 0, self.limits.output_chars
            append = parts.append
            for p in pieces:
                append(p)
                chars += len(p)
                if chars > limit:
                    if self._regrow():
                        limit = self.limits.output_chars
                    if chars > limit:
                        raise TemplateLimit(f"the output limit ({limit} characters)")
        else:
            parts = pieces if type(pieces) is list else list(pieces)
            chars = sum(map(len, parts))
        if self.used + (chars << 2) > self.limits.memory_bytes:  # near the limit: exact width
            self.reserve(chars if all(p.isascii() for p in parts) else chars << 2, "joining text")
        text = "".join(parts)
        self.charge(chars if text.isascii() else chars << 2)
        return text


def _mib(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"


class Counted:
    """An iterable whose iterations are counted against the budget (a `{% for %}` iterable, a
    generator a filter returns). Keeps `len` so jinja's `loop.length` does not copy it."""

    __slots__ = ("_it", "_budget")

    def __init__(self, iterable, budget: Budget):
        self._it = iterable
        self._budget = budget

    def __iter__(self):
        step = self._budget.step
        for x in self._it:
            step()
            yield x

    def __len__(self) -> int:
        return len(self._it)  # TypeError for generators: LoopContext then counts as it goes


def counted(iterable):
    """`iterable`, counted by the current budget."""
    b = _BUDGET.get()
    return iterable if b is None else Counted(iterable, b)


def text_bytes(x) -> int:
    """Bytes of str(x) (1 a character if ASCII, else 4), without building it."""
    if isinstance(x, str):
        return len(x) if x.isascii() else len(x) << 2
    return Shape(x).text_bytes


class Shape:
    """A bound on the text of a value (str() of a container is its repr), walked without recursion:
    `chars` (an upper bound on the characters), `wide` (some text is not ASCII), `parts` (values
    visited) and `nesting`. Refuses more than MAX_PARTS parts or MAX_NESTING levels, so a list
    that contains itself twice 60 times over (2**60 parts, built in 60 steps) costs nothing to
    refuse."""

    __slots__ = ("chars", "wide", "parts", "nesting")

    def __init__(self, x):
        self.chars, self.wide, self.parts, self.nesting = 0, False, 0, 0
        stack = [(x, 0)]
        while stack:
            v, level = stack.pop()
            self.parts += 1
            if self.parts > MAX_PARTS or level > MAX_NESTING:
                raise TemplateLimit(f"the memory limit (a value of more than {MAX_PARTS} parts "
                                    f"or {MAX_NESTING} levels, to print, compare or hash)")
            self.nesting = max(self.nesting, level)
            self.chars += self._leaf(v, level, stack)

    @property
    def text_bytes(self) -> int:
        return self.chars << 2 if self.wide else self.chars

    def _leaf(self, v, level: int, stack: list) -> int:
        if isinstance(v, str):
            self.wide = self.wide or not v.isascii()
            return _quoted_chars(v) if level else len(v)
        if isinstance(v, (bool, float)) or v is None:
            return 24
        if isinstance(v, int):
            return v.bit_length() * 3 // 10 + 2
        if isinstance(v, (bytes, bytearray)):
            return 4 * len(v) + 3
        if isinstance(v, dict):
            stack.extend((k, level + 1) for k in v.keys())
            stack.extend((w, level + 1) for w in v.values())
            return 2 + 4 * len(v)
        if isinstance(v, Namespace):
            return 14 + self._leaf(object.__getattribute__(v, "_Namespace__attrs"), level, stack)
        if isinstance(v, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
            stack.extend((w, level + 1) for w in v)
            return 16 + 2 * len(v)
        return 200  # other objects print as "<jinja2.utils.Cycler object at 0x7f...>" and the like


def _quoted_chars(s: str) -> int:
    """Characters of repr(s) or json.dumps(s) at most: quotes, escaped quotes and backslashes,
    two for \\n \\t \\r, ten for anything else unprintable (\\U0001f600)."""
    n = len(s) + 2 + s.count("\\") + s.count("'") + s.count('"')
    if s.isprintable():
        return n
    n += s.count("\n") + s.count("\t") + s.count("\r")
    return n if s.translate(_COMMON_ESCAPES).isprintable() else 10 * len(s) + 2


_COMMON_ESCAPES = str.maketrans("", "", "\n\t\r")


def shallow_bytes(x) -> int:
    """Bytes a new result takes, its own slots and any new text directly in it."""
    if isinstance(x, str):
        return len(x) if x.isascii() else len(x) << 2
    if isinstance(x, (list, tuple)):
        return 56 + 8 * len(x) + sum(len(v) for v in x if isinstance(v, str))
    if isinstance(x, dict):
        return 100 * len(x)
    if isinstance(x, (bytes, bytearray)):
        return len(x)
    if isinstance(x, int):
        return x.bit_length() >> 3
    return 0


_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})


def check_operand(x):
    """A value about to be compared or hashed: containers of at most MAX_PARTS parts (equality
    of two distinct lists nested in themselves 60 times is 2**60 comparisons)."""
    t = type(x)
    if t is str or t is int:
        return x
    if (t in _CONTAINERS or isinstance(x, (list, tuple, dict))) and _BUDGET.get() is not None:
        Shape(x)
    return x


def materialize(iterable) -> list:
    """A list of the items, each counted as a loop iteration (what `join` is about to read)."""
    if isinstance(iterable, (list, tuple, str)):
        return iterable  # sized already (a str is joined character by character, as jinja2 does)
    b = _BUDGET.get()
    out = []
    for x in iterable:
        if b is not None:
            b.step()
        out.append(x)
    return out


class GuardedCodeGenerator(CodeGenerator):
    """jinja2's code generator with three changes, made on the parsed template before any code is
    written: every for-loop iterable goes through the LOOP_FILTER, every operand of a comparison
    and key of a dict literal through the OPERAND_FILTER (check_operand), and `a ~ b` calls
    `environment.guarded_concat` instead of jinja2's str_join."""

    def visit_Template(self, node: nodes.Template, frame=None) -> None:
        for loop in node.find_all(nodes.For):
            loop.iter = self._through(LOOP_FILTER, loop.iter)
        for compare in node.find_all(nodes.Compare):
            compare.expr = self._through(OPERAND_FILTER, compare.expr)
            for op in compare.ops:
                op.expr = self._through(OPERAND_FILTER, op.expr)
        for literal in node.find_all(nodes.Dict):
            for pair in literal.items:
                pair.key = self._through(OPERAND_FILTER, pair.key)
        super().visit_Template(node, frame)

    def _through(self, name: str, expr: nodes.Expr) -> nodes.Expr:
        if isinstance(expr, nodes.Const):  # 'user' in `role == 'user'`: nothing to check
            return expr
        guard = nodes.Filter(expr, name, [], [], None, None, lineno=expr.lineno)
        return guard.set_environment(self.environment)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")
