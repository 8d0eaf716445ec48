"""A budget that changes while the model runs (issue 11): random budget sequences against the
planner, and the orchestrator's protocol in real memory cgroups (skipped where none can be written).

The protocol tests drive a child process that generates greedily, one command a line on its stdin
(gen N, budget BYTES, settle, status, quit), answering each with a JSON status line; this process
plays the orchestrator and writes the cgroup's limit files between commands:
  shrink: lower the soft signal or call the API; flexinfer shrinks; then lower the hard limit;
  grow:   raise the hard limit first; then the soft signal or the API.
Each ends without an OOM kill, with an unconstrained run's tokens, and with resident weight bytes
(and mlocked bytes, VmLck) that follow the budget. The model (conftest's stream_model_path) keeps
every weight resident at twice the minimum working set and streams some at 1.2 times it.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexinfer.cgroup import MemoryCgroup, cgroup_unavailable_reason
from flexinfer.planner import BudgetError, plan
from tests.test_planner import MACHINE, SHAPES, total

# ---- the planner: every budget of a random sequence, and every move between two of them


def _resident(p, tensors) -> int:
    return sum(p.resident_rows[t.name] * t.row_bytes for t in tensors)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(sorted(SHAPES)), st.lists(st.floats(0.0, 1.2), min_size=2, max_size=5),
       st.sampled_from(["flexinfer", "sync", "prefetch"]), st.booleans())
def test_random_budget_sequences_never_exceed_the_budget(shape, fracs, mode, balance):
    """For each budget of the sequence the plan (each KV stage, a prompt's loan) fits it; a move
    from one plan to the next that first releases the rows the next keeps no longer, and keeps the
    larger ring while it moves, never holds more than the larger of the two budgets."""
    tensors, fixed = SHAPES[shape]
    prev = None
    for frac in fracs:
        budget = fixed + int(frac * total(tensors))
        try:
            p = plan(tensors, budget, fixed, MACHINE, mode=mode, balance=balance)
        except BudgetError as e:
            assert e.minimum > budget  # nothing changes: the previous plan stays
            continue
        assert p.total_bytes() <= budget and p.budget_bytes == budget
        assert all(s.total_bytes() <= budget for s in p.stages)
        if prev is not None:
            both = {t.name: min(prev.resident_rows[t.name], p.resident_rows[t.name])
                    for t in tensors}
            kept = sum(both[t.name] * t.row_bytes for t in tensors)
            moving = fixed + kept + max(prev.ring_bytes + prev.bounce_bytes,
                                        p.ring_bytes + p.bounce_bytes)
            assert moving <= max(prev.budget_bytes, budget)
        prev = p


# ---- the orchestrator's protocol in real cgroups

REASON = cgroup_unavailable_reason()
needs_cgroup = pytest.mark.skipif(REASON is not None,
                                  reason=f"no writable memory cgroup: {REASON}")
START = 1 << 30  # the cgroup's limit while the child loads: well above anything it needs
TIMEOUT_S = 120  # per command: a step takes ~0.1 s here, a change well under a second

CHILD = r"""
import functools, json, sys
import flexinfer
from flexinfer import follow
budget = sys.argv[2] if sys.argv[2] == "auto" else int(sys.argv[2])
# auto follows the group's limits, the subject here, and the machine's memory pressure (PSI is
# the whole machine's under cgroup v1), which another program's work would add: not read
follow.Paths = functools.partial(follow.Paths, pressure="/nonexistent/pressure")
m = flexinfer.load(sys.argv[1], n_ctx=256, n_threads=2, memory_budget=budget)
ids = m.tokenize("The capital of France is")
logits, out = m.evaluate(ids, 0), []

def vmlck():
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0

def status(**extra):
    print(json.dumps({"budget": m.memory_budget, "source": m.budget_source,
                      "minimum": m.minimum_budget(), "resident": m.resident_weight_bytes(),
                      "locked": vmlck(), "tokens": out, **extra}), flush=True)

status()
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "gen":
        for _ in range(int(args[0])):
            out.append(int(logits[-1].argmax()))
            logits = m.evaluate([out[-1]], len(ids) + len(out) - 1)
        status()
    elif cmd == "budget":
        c = m.set_memory_budget(int(args[0]))
        status(seconds=c.seconds, released=c.released_bytes, read=c.read_bytes,
               pending=c.pending_bytes)
    elif cmd == "settle":
        status(settled=m.settle())
    elif cmd == "status":
        status()
    else:
        break
m.close()
"""


class Child:
    """The generating child, inside `group` from its first instruction (None: no cgroup)."""

    def __init__(self, model: Path, budget: str, group: MemoryCgroup | None, tmp_path: Path):
        argv = [sys.executable, "-c", CHILD, str(model), budget]
        if group is not None:
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group.procs_file), *argv]
        self.err_path = tmp_path / f"child-{time.monotonic_ns()}.err"
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True)
        self.first = self._read()

    def _read(self) -> dict:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(TIMEOUT_S):
            self.proc.kill()
            raise AssertionError(f"the child did not answer in {TIMEOUT_S} s: {self.stderr()}")
        line = self.proc.stdout.readline()
        assert line, f"the child ended ({self.proc.wait()}): {self.stderr()}"
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def wait_for(self, ok, within: float = 10.0) -> tuple[dict, float]:
        """Asks for the status until ok(status) (the idle follower's work), and how long it took."""
        t0 = time.monotonic()
        while True:
            s = self.ask("status")
            if ok(s) or time.monotonic() - t0 > within:
                return s, time.monotonic() - t0
            time.sleep(0.05)

    def quit(self) -> int:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        code = self.proc.wait(TIMEOUT_S)
        self.err.close()
        return code

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text()[-2000:]


def _files(group: MemoryCgroup) -> tuple[Path, Path]:
    """(soft, hard) limit files of the group."""
    if group.version == 1:
        return group.path / "memory.soft_limit_in_bytes", group.path / "memory.limit_in_bytes"
    return group.path / "memory.high", group.path / "memory.max"


def _write_limit(path: Path, value: int) -> None:
    """The orchestrator's write. A hard limit below what the child holds locked is refused by v1
    (EBUSY) and OOM-kills on v2: after flexinfer has shrunk, it must succeed."""
    try:
        path.write_text(str(value))
    except OSError as e:
        raise AssertionError(f"writing {value} to {path}: {e.strerror} (the child did not shrink "
                             "under it)") from None


def _pages(n: float) -> int:
    """n bytes rounded down to whole pages, as the kernel stores a limit."""
    return int(n) // os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def reference(stream_model_path, tmp_path_factory) -> list[int]:
    """The 24 greedy tokens of an unconstrained run (fixed budget, no cgroup)."""
    child = Child(stream_model_path, str(2 << 30), None, tmp_path_factory.mktemp("reference"))
    tokens = child.ask("gen 24")["tokens"]
    assert child.quit() == 0, child.stderr()
    return tokens


def _end(child: Child, group: MemoryCgroup, want: list[int]) -> None:
    tokens = child.ask("status")["tokens"]
    code = child.quit()
    assert code == 0 and not group.oom_killed(), (code, group.oom_killed(), child.stderr())
    assert tokens == want


@needs_cgroup
def test_shrink_with_the_api_then_the_hard_limit_and_grow_back(stream_model_path, reference,
                                                               tmp_path):
    """(a) 2x -> 1.2x the minimum with the API, then the hard limit; (b) back: the limit first."""
    with MemoryCgroup.create("flexinfer-follow", START) as group:
        child = Child(stream_model_path, str(START), group, tmp_path)
        soft, hard = _files(group)
        least = child.first["minimum"]
        big, small = _pages(2 * least), _pages(1.2 * least)
        at_big = child.ask(f"budget {big}")
        _write_limit(hard, big)
        at_big = child.ask("gen 8")
        assert at_big["budget"] == big and at_big["source"] == "api"
        shrunk = child.ask(f"budget {small}")
        assert shrunk["budget"] == small and shrunk["pending"] == 0 and shrunk["released"] > 0
        assert shrunk["resident"] < at_big["resident"] and shrunk["locked"] < at_big["locked"]
        _write_limit(hard, small)  # the rows are released: the kernel takes the lower limit
        child.ask("gen 8")
        _write_limit(hard, big)  # growing: the hard limit first
        back = child.ask(f"budget {big}")  # the blocks arriving grow through the ring in the
        assert back["read"] + back["pending"] > 0  # next step, or are read by settle
        grown = child.ask("settle")
        assert grown["settled"] and grown["budget"] == big
        grown = child.ask("gen 8")
        assert grown["resident"] == at_big["resident"] and grown["locked"] >= shrunk["locked"]
        _end(child, group, reference)


@needs_cgroup
def test_the_soft_limit_alone_moves_an_auto_budget(stream_model_path, reference, tmp_path):
    """(c) No API call: the soft limit goes down and the follower shrinks within a poll, idle or
    generating; then the hard limit follows. Up again: the hard limit, then the soft one; the
    follower grows after its hold."""
    with MemoryCgroup.create("flexinfer-follow", START) as group:
        child = Child(stream_model_path, "auto", group, tmp_path)
        soft, hard = _files(group)
        first = child.first
        assert first["budget"] <= START and first["source"].startswith("auto: ")
        least = first["minimum"]
        big, small = _pages(2 * least), _pages(1.2 * least)
        _write_limit(soft, big)
        at_big, waited = child.wait_for(lambda s: s["budget"] == big)  # idle: the thread's poll
        assert at_big["budget"] == big, f"no shrink in {waited:.1f} s: {child.stderr()}"
        assert at_big["source"] == f"auto: cgroup {soft.name}"
        _write_limit(hard, big)
        at_big = child.ask("gen 8")
        _write_limit(soft, small)
        child.ask("gen 8")  # the step's poll (or the thread's) shrinks before or while it runs
        shrunk, waited = child.wait_for(lambda s: s["budget"] == small)
        assert shrunk["budget"] == small, f"no shrink in {waited:.1f} s: {child.stderr()}"
        assert shrunk["resident"] < at_big["resident"] and shrunk["locked"] < at_big["locked"]
        _write_limit(hard, small)
        _write_limit(hard, big)  # growing: the hard limit first ...
        _write_limit(soft, big)  # ... then the soft signal
        grown, waited = child.wait_for(lambda s: s["budget"] == big, within=30)
        assert grown["budget"] == big, f"no growth in {waited:.1f} s: {child.stderr()}"
        assert child.ask("settle")["settled"]
        grown = child.ask("gen 8")
        assert grown["resident"] == at_big["resident"]
        err = child.stderr()
        assert (f"cgroup {soft.name} lowered to {small / 1e9:.2f} GB)" in err
                and f"cgroup {soft.name} raised to {big / 1e9:.2f} GB" in err), err
        _end(child, group, reference)

