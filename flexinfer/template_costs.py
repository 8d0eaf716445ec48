"""What a template operation will allocate, in bytes, priced before it runs (issue 17).

Each rule gets the operation's arguments and returns an upper bound (1 byte a character of ASCII
text, 4 otherwise, 8 a list slot, ~64 a new small string). The sandbox (chat.py) reserves the bound
against the render's memory limit, runs the operation, then charges what it really built. Rules
read only sizes (len, count, bit_length) and never build the result themselves.

Every filter and global of jinja2 3.1 has a rule here; tests/test_template_limits.py checks that
no new one slips in unpriced when jinja2 is upgraded.
"""

import re
import string

from flexinfer.template_guard import MAX_INT_BITS, Shape, TemplateLimit, text_bytes

_SLOT = 8  # a list slot
_SMALL_STR = 64  # a new short str object: header plus text


def _width(chars: int, *texts) -> int:
    """Bytes of a new text of `chars` characters, 4 a character if any of `texts` is not ASCII."""
    wide = any(isinstance(t, str) and not t.isascii() for t in texts)
    return chars << 2 if wide else chars


def _text_len(x) -> int:
    return len(x) if isinstance(x, str) else Shape(x).chars


def _int_arg(x, default: int = 0) -> int:
    return abs(x) if isinstance(x, int) else default


def _check_int_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimit(f"the memory limit (an integer of {bits} bits; at most {MAX_INT_BITS})")


# ---- binary operators: + * % ** (the ones that can grow a value)

def binop(op: str, a, b) -> int:
    if op == "+":
        if isinstance(a, str) and isinstance(b, str):
            return _width(len(a) + len(b), a, b)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return _SLOT * (len(a) + len(b)) + 56
        if isinstance(a, int) and isinstance(b, int):
            _check_int_bits(max(a.bit_length(), b.bit_length()) + 1)
        return len(a) + len(b) if isinstance(a, bytes) and isinstance(b, bytes) else 0
    if op == "*":
        return _repeat(a, b) if isinstance(b, int) else _repeat(b, a) if isinstance(a, int) else 0
    if op == "%":
        return percent_format(a, b) if isinstance(a, str) else 0
    if op == "**" and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        _check_int_bits(a.bit_length() * b)
    return 0


def _repeat(seq, n: int) -> int:
    if isinstance(seq, bool) or n <= 0:
        return 0
    if isinstance(seq, str):
        return _width(len(seq) * n, seq)
    if isinstance(seq, (list, tuple)):
        return _SLOT * len(seq) * n
    if isinstance(seq, bytes):
        return len(seq) * n
    if isinstance(seq, int):
        _check_int_bits(seq.bit_length() + n.bit_length())
    return 0


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)


def percent_format(fmt: str, args) -> int:
    """`fmt % args`: each conversion may print all of args, padded to its width and precision
    (`*` takes the largest integer among the args)."""
    values = args if isinstance(args, tuple) else (args,)
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    arg = text_bytes(args)
    total = len(fmt) << 2
    for width, precision, conv in _PERCENT.findall(fmt):
        if conv != "%":
            total += arg + 4 * (_spec_num(width, star) + _spec_num(precision, star))
    return total


def _spec_num(field: str, star: int) -> int:
    return star if field == "*" else int(field) if field else 0


def brace_format(fmt: str, args: tuple, kwargs: dict) -> int:
    """`fmt.format(*args, **kwargs)`: each field may print all the arguments, padded by the numbers
    in its spec (a nested `{}` in a spec takes the largest integer among the arguments)."""
    try:
        fields = [spec for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None]
    except ValueError:
        return 0  # the call itself raises the same error
    values = list(args) + list(kwargs.values())
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    arg = text_bytes(values)
    total = len(fmt) << 2
    for spec in fields:
        pad = sum(int(d) for d in re.findall(r"\d+", spec or ""))
        total += arg + 4 * (pad + (star if "{" in (spec or "") else 0))
    return total


# ---- filters: value is the first argument

def _f_center(v, width=80, *_a, **_k):
    return _width(max(_text_len(v), _int_arg(width)), v)


def _f_indent(v, width=4, first=False, blank=False, *_a, **_k):
    s = v if isinstance(v, str) else ""
    pad = len(width) if isinstance(width, str) else _int_arg(width)
    return _width(_text_len(v) + (s.count("\n") + 1) * pad, v, width)


def _f_format(v, *args, **kwargs):
    if isinstance(v, str):
        return percent_format(v, kwargs or args)
    return text_bytes(v) + percent_format("", kwargs or args)


def _f_replace(v, old="", new="", count=None, *_a, **_k):
    """Each of the (count of `old`) hits, or every position when `old` is empty, grows the text by
    len(new) - len(old). Values that are not text are priced as their text."""
    textlike = (str, bytes)
    n = len(v) if isinstance(v, textlike) else _text_len(v)
    new_len = len(new) if isinstance(new, textlike) else _text_len(new)
    same_kind = isinstance(v, textlike) and isinstance(old, str) == isinstance(v, str)
    hits = v.count(old) if same_kind and isinstance(old, textlike) and old else n + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    old_len = len(old) if isinstance(old, textlike) else 0
    return _width(n + hits * max(0, new_len - old_len), v, new)


def _f_wordwrap(v, width=79, break_long_words=True, wrapstring=None, *_a, **_k):
    """Output: every character on its own line at worst. Work: textwrap cuts a word longer than
    the width one line at a time, copying the rest each time: (word length)**2 / (2 width)."""
    s = v if isinstance(v, str) else ""
    w = max(_int_arg(width, 79), 1)
    longest = max(map(len, s.split()), default=0)
    sep = len(wrapstring) if isinstance(wrapstring, str) else 1
    return _width(len(s) * (1 + sep) + len(s) * longest // (2 * w), s, wrapstring)


def _f_urlize(v, *args, **kwargs):
    extra = sum(_text_len(a) for a in list(args) + list(kwargs.values()) if isinstance(a, str))
    return _width((_text_len(v) + 1) * (64 + extra), v)


def _f_tojson(v, ensure_ascii=False, indent=None, separators=None, *_a, **_k):
    shape = Shape(v)
    pad = len(indent) if isinstance(indent, str) else _int_arg(indent)
    seps = sum(len(s) for s in separators if isinstance(s, str)) if separators else 2
    chars = shape.chars * (6 if ensure_ascii else 1)
    return (chars + shape.parts * (pad * shape.nesting + seps + 1)) << (2 if shape.wide else 0)


def _f_pprint(v, *_a, **_k):
    shape = Shape(v)
    return (shape.chars + shape.parts * (shape.nesting + 2)) << (2 if shape.wide else 0)


def _f_batch(v, linecount=1, fill_with=None, *_a, **_k):
    return _SLOT * (_items(v) + _int_arg(linecount))


def _f_slice(v, slices=1, fill_with=None, *_a, **_k):
    return _SLOT * _items(v) + 64 * _int_arg(slices)


def _f_sum(v, attribute=None, start=0, *_a, **_k):
    """Summing n lists copies the growing prefix n times: n * (all their items) slots at most."""
    if not isinstance(v, (list, tuple)) or not v:
        return 0
    if attribute is None and not isinstance(start, (list, tuple)) and isinstance(v[0], (int, float)):
        return 0
    return _SLOT * Shape(v).parts * len(v)


def _f_reverse(v, *_a, **_k):
    return text_bytes(v) if isinstance(v, str) else _SLOT * _items(v)


def _items(v) -> int:
    try:
        return len(v)
    except TypeError:
        return 0  # an iterator: its items are counted as they are read


def _text_times(k: int):
    """A filter whose text is at most k times the text of its value (escape: '&' -> '&amp;')."""
    def rule(v, *args, **kwargs):
        return k * (text_bytes(v) + sum(text_bytes(a) for a in args)) + 64
    return rule


def _slots(v, *_a, **_k):
    return (_SLOT + 64) * _items(v)


def _nothing(*_a, **_k):
    return 0


FILTERS = {
    "center": _f_center, "indent": _f_indent, "format": _f_format, "replace": _f_replace,
    "wordwrap": _f_wordwrap, "urlize": _f_urlize, "tojson": _f_tojson, "pprint": _f_pprint,
    "batch": _f_batch, "slice": _f_slice, "sum": _f_sum,
    "string": _text_times(1), "trim": _text_times(1), "striptags": _text_times(1),
    "truncate": _text_times(1), "safe": _text_times(1), "reverse": _f_reverse,
    "lower": _text_times(3), "upper": _text_times(3), "capitalize": _text_times(3),
    "title": _text_times(3), "e": _text_times(6), "escape": _text_times(6),
    "forceescape": _text_times(6), "xmlattr": _text_times(6), "urlencode": _text_times(12),
    "filesizeformat": _text_times(1),
    "list": _slots, "sort": _slots, "unique": _slots, "dictsort": _slots, "groupby": _slots,
    "items": _slots,
    # results are parts of the value, numbers, or lazy generators (counted as they are read)
    **{name: _nothing for name in (
        "abs", "attr", "count", "d", "default", "first", "float", "int", "last", "length", "map",
        "max", "min", "random", "reject", "rejectattr", "round", "select", "selectattr",
        "wordcount", "join")},  # join: chat.py reads its items first and prices them itself
}

# Filters whose result is one of their arguments or a part of it: nothing new to charge.
REFERENCE_FILTERS = frozenset({"attr", "d", "default", "first", "last", "max", "min", "random"})


# ---- methods of str and bytes (self is the text), by name

def _m_pad(s, width=0, *_a, **_k):
    return _width(max(len(s), _int_arg(width)), s)


def _m_expandtabs(s, tabsize=8, *_a, **_k):
    return _width(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * _int_arg(tabsize), s)


def _m_translate(s, table=None, *_a, **_k):
    longest = 1
    if isinstance(table, dict):
        longest = max((_text_len(x) for x in table.values() if isinstance(x, str)), default=1)
    return _width(len(s) * max(longest, 1), s, *(table.values() if isinstance(table, dict) else ()))


def _m_split(s, sep=None, maxsplit=-1, *_a, **_k):
    pieces = s.count(sep) + 1 if isinstance(sep, (str, bytes)) and sep else len(s) // 2 + 1
    if isinstance(maxsplit, int) and maxsplit >= 0:
        pieces = min(pieces, maxsplit + 1)
    return pieces * (_SLOT + _SMALL_STR) + _width(len(s), s)


def _m_splitlines(s, *_a, **_k):
    breaks = sum(s.count(c) for c in ("\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85",
                                      "\u2028", "\u2029")) if isinstance(s, str) else s.count(b"\n")
    return (breaks + 1) * (_SLOT + _SMALL_STR) + _width(len(s), s)


def _m_times(k: int):
    def rule(s, *args, **kwargs):
        return k * (_width(len(s), s) + sum(text_bytes(a) for a in args if isinstance(a, str)))
    return rule


STR_METHODS = {
    "center": _m_pad, "ljust": _m_pad, "rjust": _m_pad, "zfill": _m_pad,
    "expandtabs": _m_expandtabs, "translate": _m_translate, "replace": _f_replace,
    "split": _m_split, "rsplit": _m_split, "splitlines": _m_splitlines,
    "upper": _m_times(3), "lower": _m_times(3), "title": _m_times(3), "capitalize": _m_times(3),
    "swapcase": _m_times(3), "casefold": _m_times(3), "encode": _m_times(4),
    "partition": _m_times(3), "rpartition": _m_times(3),
}
STR_METHOD_DEFAULT = _m_times(1)  # strip, removeprefix, ...: a copy of at most the text


def int_to_bytes(n: int, length=1, *_a, **_k) -> int:
    return _int_arg(length, 1)


# ---- globals

def lipsum(n=5, html=True, min=20, max=100, *_a, **_k) -> int:
    return _int_arg(n, 5) * (_int_arg(max, 100) + 1) * 16


def strftime_now(fmt="", *_a, **_k) -> int:
    return 32 * _text_len(fmt)


GLOBALS = {"lipsum": lipsum, "strftime_now": strftime_now, "range": _nothing, "dict": _nothing,
           "cycler": _nothing, "joiner": _nothing, "namespace": _nothing,
           "raise_exception": _nothing}
