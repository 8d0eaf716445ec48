"""The memory budget: parsed from `--memory-budget`, or found the way a small device would want it
(the cgroup limit, else MemAvailable), and the runtime overhead that the planner subtracts from it."""

from __future__ import annotations

import re

from flexinfer.errors import FlexInferError

_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?)?B?\s*$", re.IGNORECASE)
HEADROOM = 24 << 20  # bytes kept free for transient allocations (logits copies, sampler, Python);
# VmRSS, which `runtime` comes from, already overcounts: it includes shared library pages


def parse_size(text: str, option: str = "--memory-budget", zero: bool = False) -> int:
    """'1.5GiB', '800M', '2G', '123456' -> bytes. K/M/G are decimal, KiB/MiB/GiB binary.
    zero: 0 is taken too (an option whose 0 means its least, --expert-cache)."""
    m = _SIZE.match(str(text))
    if not m:
        raise FlexInferError(f"{option}: cannot read {text!r} as a size (examples: 1.5GiB, 800M, "
                             "2000000000)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if value < 1 and not (zero and value == 0):
        raise FlexInferError(f"{option}: {text!r} is not " + ("0 or at least one byte" if zero
                                                               else "a positive size"))
    return int(value)


def resolve_budget(option: int | str | None) -> tuple[int, str]:
    """(bytes, source): the flag's size when given; None or "auto": what the environment allows
    now (follow.py: the tightest cgroup limit, soft or hard, or this process's share of the
    machine), which the model then follows."""
    from flexinfer import follow  # it reads the cgroup through cgroup.py, as this module does
    if follow.is_auto(option):
        return follow.initial_budget()
    return (parse_size(option) if isinstance(option, str) else int(option)), "--memory-budget"


def proc_field(path: str, key: str) -> str | None:
    """The text after `key:` on the first line of a /proc file that starts with it, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":") or line.startswith(key + "\t"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _kib(path: str, key: str) -> int:
    value = proc_field(path, key)  # "123456 kB"
    return int(value.split()[0]) * 1024 if value else 0


def rss_bytes(status: str = "/proc/self/status") -> int:
    """Resident set size now: the interpreter, libraries, tokenizer: what the planner cannot move."""
    return _kib(status, "VmRSS")


def peak_rss_bytes(status: str = "/proc/self/status") -> int:
    return _kib(status, "VmHWM")
