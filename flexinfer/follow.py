"""`--memory-budget auto`: a budget that follows where the process runs.

Read, at most every POLL_S:
- its memory cgroup and the ones above it: v2 `memory.high` (soft) and `memory.max` (hard), v1
  `memory.soft_limit_in_bytes` and `memory.limit_in_bytes` ("max", or v1's ~2^63, mean none);
- the machine: MemAvailable (/proc/meminfo), and memory pressure (PSI, /proc/pressure/memory).

The budget covers the whole process, as everywhere in flexinfer (budget.py: the plan's fixed part
counts the interpreter's RSS, the KV cache and compute buffers). So a cgroup limit is a budget as it
stands, and the machine's share is what this process holds now (VmRSS) plus what is still free
(MemAvailable) less KEEP_FREE of MemTotal for everybody else. That sum does not move when flexinfer
itself grows or shrinks (what it takes leaves MemAvailable), so following it cannot feed back.

Hysteresis (Hysteresis.decide), so that the budget never oscillates:
- shrink at once when the target falls below the budget: a limit under the budget is a promise
  about to be broken (throttling above memory.high, the OOM killer at memory.max). A target from
  MemAvailable alone moves with every allocation on the machine: it shrinks the budget only once it
  is SLACK below it;
- grow only when the target has stayed GROW_MARGIN above the budget for GROW_HOLD_S, and then to
  the lowest target seen in that time, and never while PSI says memory is short;
- memory pressure (PSI "some avg10" >= PSI_SHRINK percent) gives back PSI_STEP of what the process
  holds (or of the budget, if less), at most once per PSI_HOLD_S: avg10 is a 10-second average and
  lags the relief a shrink brings.
A budget set by the API or the server (source not "auto: ...") is left alone until "auto" again.

Every path is injectable (Paths), so the tests drive this with fake /sys and /proc trees.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from flexinfer.cgroup import find_hierarchy, parse_limit
from flexinfer.errors import FlexInferError

AUTO = "auto"
SOURCE_PREFIX = "auto: "  # Model.budget_source while following
POLL_S = 0.5  # read the environment at most twice a second: "within a second" with room to act
GROW_MARGIN = 0.10  # grow to a target at least 10% above the budget: every growth costs a re-plan
# and reads rows back, and on the 7B a step of 10% buys under 8% (docs/benchmarks.md: 0.41 -> 0.52
# tok/s from 1.5 to 2 GB, +27% for +33%)
GROW_HOLD_S = 5.0  # ... that has held 5 s: 10 polls, longer than a burst of another program's
# allocations (a compiler's, a browser tab's) and short next to a conversation
SLACK = 0.02  # MemAvailable's target must fall 2% under the budget before it shrinks it
KEEP_FREE = 0.05  # of MemTotal, left to the rest of the machine (1.2 GB of 24 GiB)
PSI_SHRINK = 10.0  # "some avg10" percent: tasks waited on memory 10% of the last 10 s
PSI_CALM = 1.0  # at or above this, no growth
PSI_STEP = 0.10  # a shrink under pressure gives back 10% of what the process holds...
PSI_HOLD_S = 10.0  # ... at most once per avg10 window


@dataclass(frozen=True)
class Paths:
    """Where the environment is read; the tests point these into a temporary directory."""

    mountinfo: str = "/proc/self/mountinfo"
    proc_cgroup: str = "/proc/self/cgroup"
    meminfo: str = "/proc/meminfo"
    pressure: str = "/proc/pressure/memory"
    status: str = "/proc/self/status"


@dataclass(frozen=True)
class Limit:
    bytes: int
    name: str  # e.g. "cgroup memory.high"
    hard: bool


@dataclass(frozen=True)
class Reading:
    """One look at the environment. None: not there (no cgroup, no PSI, unreadable file)."""

    limits: tuple[Limit, ...] = ()  # the smallest soft and hard limit on the path to the root
    mem_available: int | None = None
    mem_total: int | None = None
    footprint: int = 0  # this process's VmRSS
    pressure: float | None = None  # PSI "some avg10", percent


@dataclass(frozen=True)
class Target:
    bytes: int
    name: str  # what set it: "cgroup memory.high", "MemAvailable", "memory pressure"
    detail: str  # its numbers, for the change's line: "MemAvailable 3.10 GB + own 0.52 GB - ..."
    exact: bool  # True: a limit; shrink to it however small the step


# ---- reading (pure functions of the files; every failure means "not there")

def _text(path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _limit(path: Path) -> int | None:
    try:
        return parse_limit(_text(path)) if _text(path).strip() else None
    except ValueError:  # not a number, not "max": a file we do not understand limits nothing
        return None


LIMIT_FILES = {1: (("memory.soft_limit_in_bytes", False), ("memory.limit_in_bytes", True)),
               2: (("memory.high", False), ("memory.max", True))}


def cgroup_limits(paths: Paths) -> tuple[Limit, ...]:
    """The smallest soft and smallest hard limit on this process's cgroup and those above it."""
    h = find_hierarchy(_text(paths.mountinfo), _text(paths.proc_cgroup))
    if h is None:
        return ()
    out = []
    for name, hard in LIMIT_FILES[h.version]:
        found = []
        for d in (h.own, *h.own.parents):
            value = _limit(d / name)
            if value is not None:
                found.append(value)
            if d == h.mount:
                break
        if found:
            out.append(Limit(min(found), f"cgroup {name}", hard))
    return tuple(out)


def _meminfo_kib(text: str, key: str) -> int | None:
    for line in text.splitlines():
        k, _, rest = line.partition(":")
        if k == key:
            try:
                return int(rest.split()[0]) * 1024
            except (ValueError, IndexError):
                return None
    return None


def parse_psi(text: str) -> float | None:
    """`some avg10=1.23 avg60=... total=...` -> 1.23 (percent); None when absent or malformed."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "some":
            for p in parts[1:]:
                key, _, value = p.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


def read_environment(paths: Paths = Paths()) -> Reading:
    meminfo = _text(paths.meminfo)
    return Reading(cgroup_limits(paths), _meminfo_kib(meminfo, "MemAvailable"),
                   _meminfo_kib(meminfo, "MemTotal"),
                   _meminfo_kib(_text(paths.status), "VmRSS") or 0,
                   parse_psi(_text(paths.pressure)))


def target(r: Reading) -> Target | None:
    """The budget the environment allows: the tightest limit, or the machine's share; None when
    nothing is known (no cgroup limit, no /proc/meminfo)."""
    options = [Target(x.bytes, x.name, f"{x.name} {_gb(x.bytes)}", True) for x in r.limits]
    if r.mem_available is not None:
        keep = int(KEEP_FREE * (r.mem_total or 0))
        share = max(r.footprint + r.mem_available - keep, 0)
        options.append(Target(share, "MemAvailable", f"MemAvailable {_gb(r.mem_available)} + own "
                                     f"{_gb(r.footprint)} - {_gb(keep)} kept free", False))
    return min(options, key=lambda t: t.bytes, default=None)


def initial_budget(paths: Paths = Paths()) -> tuple[int, str]:
    """(bytes, source) that loading with `auto` plans for: the same target the follower uses."""
    t = target(read_environment(paths))
    if t is None:
        return 1 << 62, "unlimited (no cgroup limit or MemAvailable found)"
    return t.bytes, SOURCE_PREFIX + t.name


def is_auto(option) -> bool:
    return option is None or (isinstance(option, str) and option.strip().lower() == AUTO)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ---- deciding

@dataclass
class Hysteresis:
    """When to move the budget to the target: shrink at once, grow slowly (module docstring)."""

    since: float | None = None  # when the target first stood GROW_MARGIN above the budget
    floor: int = 0  # the lowest target since then
    last_pressure_shrink: float = float("-inf")

    def decide(self, budget: int, t: Target, pressure: float | None, now: float,
               footprint: int = 0) -> tuple[int, str, str] | None:
        """(new budget, the target's name, why) or None to stay. footprint: what the process
        holds (VmRSS); under pressure it gives back a share of that, not of a budget it may not
        be using."""
        if pressure is not None and pressure >= PSI_SHRINK and \
                now - self.last_pressure_shrink >= PSI_HOLD_S:
            squeezed = int(min(budget, footprint or budget) * (1 - PSI_STEP))
            if squeezed < t.bytes:
                self.last_pressure_shrink = now
                t = Target(squeezed, "memory pressure", f"memory pressure: some avg10 "
                                                         f"{pressure:.1f}%", True)
        if t.bytes < budget and (t.exact or t.bytes < budget * (1 - SLACK)):
            self.since = None
            return t.bytes, t.name, _why(t, "lowered to")
        if t.bytes < budget * (1 + GROW_MARGIN) or (pressure or 0.0) >= PSI_CALM:
            self.since = None
            return None
        if self.since is None:
            self.since, self.floor = now, t.bytes
        self.floor = min(self.floor, t.bytes)
        if now - self.since < GROW_HOLD_S:
            return None
        self.since = None
        held = f" for {GROW_HOLD_S:.0f} s"
        return self.floor, t.name, _why(Target(self.floor, t.name, t.detail, t.exact), "raised to",
                                        held)


def _why(t: Target, verb: str, held: str = "") -> str:
    """'cgroup memory.high lowered to 1.60 GB'; MemAvailable's says its sum."""
    if t.name.startswith("cgroup "):
        return f"{t.name} {verb} {_gb(t.bytes)}{held}"
    return t.detail + (f",{held}" if held else "")


# ---- following

class Follower:
    """Moves a model's budget to the environment's target.

    poll() is called at the start of every Model.step (rate-limited to one reading per POLL_S, so a
    step pays a clock read) and by a daemon thread while no step runs. The thread lives here, not in
    prefetch.py: the prefetcher's threads serve the ring in lock-step with compute and stop with
    the store, while this one must run when nothing computes (an idle chat, a server between
    requests) for as long as the model is loaded; it only reads a few small files and calls
    set_memory_budget, which waits for a running step under the model's lock. It holds the model
    weakly: a model nobody closes is still collected (Model.__del__ closes it, stopping this)."""

    def __init__(self, model, paths: Paths | None = None, clock=time.monotonic, say=None,
                 poll_s: float = POLL_S):
        self._model = weakref.ref(model)
        self.paths, self.clock, self.poll_s = paths or Paths(), clock, poll_s
        self.say = say  # called with each change's line; None: stderr
        self.changes: list = []  # the BudgetChanges made, in order
        self.hysteresis = Hysteresis()
        self._last = float("-inf")
        self._busy = threading.Lock()  # one poll at a time (the step's and the thread's)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said: set = set()

    def poll(self, force: bool = False):
        """Read the environment and move the budget if the hysteresis says so. Returns the
        BudgetChange made, else None. force: now, whatever the rate limit and the hysteresis."""
        now = self.clock()
        if not force and now - self._last < self.poll_s:
            return None
        model = self._model()
        if model is None or not self._busy.acquire(blocking=force):
            return None  # gone, or the other thread is polling now
        try:
            self._last = now
            if not force and not str(model.budget_source).startswith(SOURCE_PREFIX):
                return None  # the API or the server set it: theirs until "auto" again
            return self._apply(model, read_environment(self.paths), now, force)
        except FlexInferError as e:  # a refused re-plan: say so once, keep following
            self._say_once(f"memory budget not changed: {e}")
            return None
        finally:
            self._busy.release()

    def _apply(self, model, reading: Reading, now: float, force: bool):
        t = target(reading)
        if t is None:
            return None
        budget = model.memory_budget
        if force:  # "auto" again: the target now, and the source says auto even if nothing moves
            decision = t.bytes, t.name, _why(t, "at")
            self.hysteresis.since = None
        else:
            decision = self.hysteresis.decide(budget, t, reading.pressure, now, reading.footprint)
        if decision is None:
            return None
        new, name, why = decision
        need = _whole_need(model)
        if name == "MemAvailable" and not force and need is not None and new >= need <= budget:
            return None  # all resident at either budget: the machine's jitter moves nothing
            # (a limit is always followed: the budget in the stats must not exceed it)
        least = model.minimum_budget()
        if new < least:
            self._say_once(f"the environment allows {_gb(new)} ({why}), below the minimum "
                           f"working set {_gb(least)}: the budget stays at or above it")
            new, why = least, why + f", held at the minimum {_gb(least)}"
        if new == budget and not force:
            return None
        change = model.set_memory_budget(new, source=SOURCE_PREFIX + name)
        self.changes.append(change)
        self._line(f"memory budget {_gb(budget)} -> {_gb(new)} ({why})")
        return change

    def _line(self, text: str) -> None:
        if self.say is not None:
            self.say(text)
        else:
            print(f"flexinfer: {text}", file=sys.stderr, flush=True)

    def _say_once(self, text: str) -> None:
        key = text.split(" (")[0]
        if key not in self._said:
            self._said.add(key)
            self._line(text)

    # ---- the idle thread
    def start(self) -> Follower:
        self._thread = threading.Thread(target=self._run, name="flexinfer-follow", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s) and self._model() is not None:
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - one line, never a dead thread's traceback
                self._line(f"following the memory budget stopped: {type(e).__name__}: {e}")
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _whole_need(model) -> int | None:
    """What the model's plan takes when it streams nothing (then a larger budget changes nothing),
    else None."""
    p = getattr(model, "plan", None)
    if p is None or p.streamed_bytes:
        return None
    return p.total_bytes()


def follow(model, paths: Paths | None = None) -> Follower:
    """Start following for a loaded model (its budget came from initial_budget)."""
    return Follower(model, paths or Paths()).start()


def resume(model):
    """Hand the budget back to the environment at once (after the API or the server set it):
    returns the BudgetChange made. Starts a follower for a model loaded with a fixed budget."""
    if model._follower is None:
        model._follower = follow(model)
    return model._follower.poll(force=True)
