"""`--memory-budget auto` (follow.py) on fake /sys and /proc trees: v1 and v2 limits on the path to
the root, MemAvailable, PSI, bad and missing files, and the hysteresis on a fake clock, against a
fake model that records what it was asked; then the hooks in a real model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flexinfer import follow
from flexinfer.errors import FlexInferError
from flexinfer.follow import (GROW_HOLD_S, POLL_S, PSI_HOLD_S, Follower, Paths, parse_psi,
                              read_environment, target)

GB = 10 ** 9


def kb(n: int) -> int:
    """What a /proc file in kB says of n bytes."""
    return n // 1024 * 1024
UNLIMITED_V1 = "9223372036854771712"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class Tree:
    """A fake /proc and /sys/fs/cgroup: this process in cgroup /a/b of a v1 or v2 hierarchy."""

    def __init__(self, root: Path, version: int = 1, available: int = 16 * GB,
                 total: int = 24 * GB, rss: int = GB // 2, psi: str | None = "some avg10=0.00 "
                 "avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"):
        self.root, self.version = root, version
        self.mount = root / ("memory" if version == 1 else "unified")
        self.own = self.mount / "a" / "b"
        self.own.mkdir(parents=True)
        if version == 1:
            info = f"35 31 0:32 / {self.mount} rw,relatime - cgroup cgroup rw,memory\n"
            cg = "4:memory:/a/b\n0::/\n"
            for d in (self.mount, self.mount / "a", self.own):
                write(d / "memory.limit_in_bytes", UNLIMITED_V1 + "\n")
                write(d / "memory.soft_limit_in_bytes", UNLIMITED_V1 + "\n")
        else:
            info = f"41 31 0:38 / {self.mount} rw - cgroup2 cgroup2 rw\n"
            cg = "0::/a/b\n"
            write(self.mount / "cgroup.controllers", "cpuset cpu io memory pids\n")
            for d in (self.mount / "a", self.own):
                write(d / "memory.max", "max\n")
                write(d / "memory.high", "max\n")
        write(root / "mountinfo", "22 1 0:5 / /proc rw - proc proc rw\n" + info)
        write(root / "cgroup", cg)
        self.meminfo(available, total)
        write(root / "status", f"Name:\tpython\nVmHWM:\t{rss // 1024} kB\nVmRSS:\t{rss // 1024} kB\n")
        if psi is not None:
            write(root / "pressure", psi)
        self.paths = Paths(str(root / "mountinfo"), str(root / "cgroup"), str(root / "meminfo"),
                           str(root / "pressure"), str(root / "status"))

    def limit(self, name: str, value, where: str = "own") -> None:
        d = {"own": self.own, "parent": self.own.parent}[where]
        write(d / name, f"{value}\n")

    def meminfo(self, available: int, total: int = 24 * GB) -> None:
        write(self.root / "meminfo", f"MemTotal:       {total // 1024} kB\nMemFree:        1 kB\n"
                                     f"MemAvailable:   {available // 1024} kB\n")

    def pressure(self, some10: float) -> None:
        write(self.root / "pressure", f"some avg10={some10:.2f} avg60=0.00 avg300=0.00 total=1\n"
                                      "full avg10=0.00 avg60=0.00 avg300=0.00 total=1\n")


@dataclass
class Change:
    old: int
    new: int
    source: str


class FakeModel:
    """What the follower uses of a Model: the budget, its source, the minimum, set_memory_budget."""

    def __init__(self, budget: int, source: str = "auto: cgroup memory.max", minimum: int = GB // 4):
        self.memory_budget, self.budget_source, self.minimum = budget, source, minimum
        self.calls: list[Change] = []
        self.plan = None

    def minimum_budget(self) -> int:
        return self.minimum

    def set_memory_budget(self, size: int, source: str = "api") -> Change:
        if size < self.minimum:
            raise FlexInferError(f"--memory-budget: {size} is below the minimum {self.minimum}")
        c = Change(self.memory_budget, size, source)
        self.memory_budget, self.budget_source = size, source
        self.calls.append(c)
        return c


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def follower(tree: Tree, model: FakeModel) -> tuple[Follower, Clock, list[str]]:
    clock, lines = Clock(), []
    return Follower(model, tree.paths, clock, lines.append), clock, lines


def run_for(f: Follower, clock: Clock, seconds: float, step: float = POLL_S) -> None:
    """Poll every `step` for `seconds` of fake time."""
    end = clock.t + seconds
    while clock.t < end:
        clock.t += step
        f.poll()


# ---- reading

def test_v1_soft_and_hard_limits_smallest_on_the_path(tmp_path):
    t = Tree(tmp_path)
    t.limit("memory.limit_in_bytes", 3 * GB, "parent")
    t.limit("memory.soft_limit_in_bytes", 2 * GB)
    limits = {x.name: (x.bytes, x.hard) for x in read_environment(t.paths).limits}
    assert limits == {"cgroup memory.soft_limit_in_bytes": (2 * GB, False),
                      "cgroup memory.limit_in_bytes": (3 * GB, True)}
    got = target(read_environment(t.paths))
    assert (got.bytes, got.name, got.exact) == (2 * GB, "cgroup memory.soft_limit_in_bytes", True)


def test_v2_high_and_max(tmp_path):
    t = Tree(tmp_path, version=2)
    t.limit("memory.max", 4 * GB)
    t.limit("memory.high", 3 * GB, "parent")
    got = target(read_environment(t.paths))
    assert (got.bytes, got.name) == (3 * GB, "cgroup memory.high")
    t.limit("memory.high", "max", "parent")
    assert target(read_environment(t.paths)).name == "cgroup memory.max"


def test_no_limit_falls_back_to_this_process_share_of_the_machine(tmp_path):
    for version in (1, 2):
        t = Tree(tmp_path / str(version), version=version, available=8 * GB, rss=GB // 2)
        r = read_environment(t.paths)
        assert r.limits == ()  # "max" and v1's 2^63 mean no limit
        got = target(r)
        keep = int(follow.KEEP_FREE * kb(24 * GB))
        assert (got.bytes, got.name, got.exact) == (kb(8 * GB) + kb(GB // 2) - keep, "MemAvailable",
                                                    False)


def test_bad_and_missing_files_limit_nothing(tmp_path):
    t = Tree(tmp_path, psi="some avg10=lots\n")
    t.limit("memory.soft_limit_in_bytes", "garbage")
    t.limit("memory.limit_in_bytes", "", "parent")
    (tmp_path / "status").unlink()
    r = read_environment(t.paths)
    assert r.limits == () and r.pressure is None and r.footprint == 0
    (tmp_path / "meminfo").write_text("MemTotal: lots\n")
    assert target(read_environment(t.paths)) is None
    assert target(read_environment(Paths(*(str(tmp_path / "nothing" / n) for n in "abcde")))) is None


def test_the_limit_larger_than_machine_share_loses(tmp_path):
    t = Tree(tmp_path, available=GB, rss=GB // 2)
    t.limit("memory.limit_in_bytes", 3 * GB)
    assert target(read_environment(t.paths)).name == "MemAvailable"


def test_parse_psi():
    assert parse_psi("some avg10=12.50 avg60=3.00 avg300=1.00 total=99\nfull avg10=1.00\n") == 12.5
    assert parse_psi("full avg10=1.00 avg60=0 avg300=0 total=0\n") is None
    assert parse_psi("") is None and parse_psi("some avg10=x\n") is None


def test_initial_budget_and_is_auto(tmp_path):
    t = Tree(tmp_path, version=2)
    t.limit("memory.high", 2 * GB)
    assert follow.initial_budget(t.paths) == (2 * GB, "auto: cgroup memory.high")
    empty = Paths(*(str(tmp_path / "nothing" / n) for n in "abcde"))
    assert follow.initial_budget(empty)[0] == 1 << 62
    assert follow.is_auto(None) and follow.is_auto("auto") and follow.is_auto(" AUTO ")
    assert not follow.is_auto("2G") and not follow.is_auto(2 * GB)


# ---- the hysteresis

def test_shrinks_at_once_and_says_one_line(tmp_path):
    t = Tree(tmp_path, version=2)
    m = FakeModel(3 * GB)
    f, clock, lines = follower(t, m)
    assert f.poll() is None and m.calls == []  # no limit, plenty of memory: stays
    t.limit("memory.high", int(1.6 * GB))
    clock.t += POLL_S
    change = f.poll()
    assert change.new == int(1.6 * GB) and m.budget_source == "auto: cgroup memory.high"
    assert lines == ["memory budget 3.00 GB -> 1.60 GB (cgroup memory.high lowered to 1.60 GB)"]


def test_polls_at_most_every_poll_s(tmp_path):
    t = Tree(tmp_path)
    m = FakeModel(3 * GB)
    f, clock, _ = follower(t, m)
    f.poll()
    t.limit("memory.soft_limit_in_bytes", 2 * GB)
    clock.t += POLL_S / 2
    assert f.poll() is None and m.calls == []  # too soon: the file was not read
    clock.t += POLL_S / 2
    assert f.poll().new == 2 * GB


def test_grows_only_after_the_target_held_above_the_margin(tmp_path):
    t = Tree(tmp_path)
    t.limit("memory.soft_limit_in_bytes", 2 * GB)
    m = FakeModel(2 * GB, "auto: cgroup memory.soft_limit_in_bytes")
    f, clock, lines = follower(t, m)
    t.limit("memory.soft_limit_in_bytes", int(2.1 * GB))  # 5% more: under the margin
    run_for(f, clock, 3 * GROW_HOLD_S)
    assert m.calls == []
    t.limit("memory.soft_limit_in_bytes", 3 * GB)
    run_for(f, clock, GROW_HOLD_S - 1)
    assert m.calls == []  # not yet
    t.limit("memory.soft_limit_in_bytes", int(2.8 * GB))  # moved down, still above: the floor
    run_for(f, clock, 1.5)
    assert [c.new for c in m.calls] == [int(2.8 * GB)]
    assert lines[-1] == ("memory budget 2.00 GB -> 2.80 GB (cgroup memory.soft_limit_in_bytes "
                         f"raised to 2.80 GB for {GROW_HOLD_S:.0f} s)")


def test_a_target_that_flaps_never_grows_and_never_oscillates(tmp_path):
    """A limit that comes and goes every 2 s: the budget goes down with it once and stays there."""
    t = Tree(tmp_path, version=2)
    m = FakeModel(3 * GB)
    f, clock, _ = follower(t, m)
    for k in range(30):
        t.limit("memory.high", 2 * GB if k % 4 < 2 else "max")
        run_for(f, clock, 1.0)
    assert [c.new for c in m.calls] == [2 * GB]


def test_machine_jitter_within_the_slack_is_ignored(tmp_path):
    keep = int(follow.KEEP_FREE * kb(24 * GB))
    t = Tree(tmp_path, available=4 * GB + keep, rss=0)
    m = FakeModel(4 * GB, "auto: MemAvailable")
    f, clock, lines = follower(t, m)
    for avail in (3.95, 4.05, 3.93, 4.1, 3.99):  # +-2%
        t.meminfo(int(avail * GB) + keep)
        run_for(f, clock, 1.0)
    assert m.calls == []
    t.meminfo(3 * GB + keep)  # another program took a gigabyte
    run_for(f, clock, 1.0)
    assert [c.new for c in m.calls] == [kb(3 * GB + keep) - keep]
    assert m.budget_source == "auto: MemAvailable"
    assert lines[-1].startswith("memory budget 4.00 GB -> 3.00 GB (MemAvailable 4.20 GB + own")


def test_pressure_gives_back_a_step_per_window_and_blocks_growth(tmp_path):
    t = Tree(tmp_path, available=20 * GB, rss=kb(5 * GB))
    t.limit("memory.limit_in_bytes", 4 * GB)
    m = FakeModel(4 * GB, "auto: cgroup memory.limit_in_bytes")
    f, clock, lines = follower(t, m)
    t.pressure(25.0)
    run_for(f, clock, PSI_HOLD_S - 1)  # one shrink in the first window, not one per poll
    assert [c.new for c in m.calls] == [int(3.6 * GB)]
    assert m.budget_source == "auto: memory pressure"
    assert "memory pressure: some avg10 25.0%" in lines[-1]
    run_for(f, clock, 1.5)
    assert [c.new for c in m.calls] == [int(3.6 * GB), int(3.24 * GB)]
    t.pressure(5.0)  # easing, not calm: no more shrinking, and no growth either
    run_for(f, clock, 3 * GROW_HOLD_S)
    assert len(m.calls) == 2
    t.pressure(0.0)  # calm: back to the limit after the hold
    run_for(f, clock, GROW_HOLD_S + 1)
    assert [c.new for c in m.calls][2:] == [4 * GB]


def test_pressure_gives_back_a_share_of_what_the_process_holds(tmp_path):
    """A budget far above what the process uses: a share of its footprint, not of the budget."""
    t = Tree(tmp_path, available=20 * GB, rss=kb(GB))
    m = FakeModel(16 * GB, "auto: MemAvailable")
    f, clock, _ = follower(t, m)
    t.pressure(30.0)
    run_for(f, clock, 1.0)
    assert [c.new for c in m.calls] == [int(kb(GB) * 0.9)]


def test_below_the_minimum_holds_the_minimum_and_says_so_once(tmp_path):
    t = Tree(tmp_path, version=2)
    m = FakeModel(2 * GB, minimum=GB)
    f, clock, lines = follower(t, m)
    t.limit("memory.high", GB // 2)
    run_for(f, clock, 3.0)
    assert [c.new for c in m.calls] == [GB]
    assert len(lines) == 2 and "below the minimum working set 1.00 GB" in lines[0]
    assert lines[1] == ("memory budget 2.00 GB -> 1.00 GB (cgroup memory.high lowered to 0.50 GB, "
                        "held at the minimum 1.00 GB)")


def test_a_budget_set_by_the_api_is_left_alone_until_auto(tmp_path):
    t = Tree(tmp_path, version=2)
    t.limit("memory.high", 2 * GB)
    m = FakeModel(3 * GB, source="api")
    f, clock, lines = follower(t, m)
    run_for(f, clock, 3 * GROW_HOLD_S)
    assert m.calls == []
    assert f.poll(force=True).new == 2 * GB  # "auto" again: the target at once
    assert m.budget_source == "auto: cgroup memory.high"
    assert lines == ["memory budget 3.00 GB -> 2.00 GB (cgroup memory.high at 2.00 GB)"]


def test_nothing_moves_while_everything_stays_resident(tmp_path):
    class Whole:
        streamed_bytes = 0

        def total_bytes(self):
            return GB

    t = Tree(tmp_path, available=20 * GB, rss=0)
    m = FakeModel(12 * GB, "auto: MemAvailable")
    m.plan = Whole()
    f, clock, lines = follower(t, m)
    t.meminfo(8 * GB)  # a third less: but the model needs 1 GB
    run_for(f, clock, 2.0)
    assert m.calls == [] and lines == []
    t.meminfo(int(0.8 * GB) + int(follow.KEEP_FREE * 24 * GB))
    run_for(f, clock, 1.0)
    assert [c.new for c in m.calls] == [int(0.8 * GB)]


def test_a_refused_change_is_one_line_and_following_goes_on(tmp_path):
    t = Tree(tmp_path, version=2)
    m = FakeModel(3 * GB)
    f, clock, lines = follower(t, m)
    m.minimum_budget = lambda: GB // 4  # the follower's idea of the minimum ...
    m.minimum = GB  # ... is below the model's: set_memory_budget refuses
    t.limit("memory.high", GB // 2)
    run_for(f, clock, 2.0)
    assert m.calls == [] and len(lines) == 1 and "memory budget not changed" in lines[0]
    t.limit("memory.high", int(1.5 * GB))
    run_for(f, clock, 1.0)
    assert [c.new for c in m.calls] == [int(1.5 * GB)]


def test_the_idle_thread_follows_and_stops(tmp_path):
    t = Tree(tmp_path, version=2)
    m = FakeModel(3 * GB)
    lines: list[str] = []
    f = Follower(m, t.paths, time.monotonic, lines.append, poll_s=0.05).start()
    try:
        assert f.alive
        t.limit("memory.high", 2 * GB)
        deadline = time.monotonic() + 10
        while not m.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [c.new for c in m.calls] == [2 * GB]
    finally:
        f.stop()
    assert not f.alive


# ---- the hooks in a real model (load, step, close)

def test_auto_loads_a_follower_and_a_fixed_budget_none(tiny_llama_path):
    import flexinfer
    with flexinfer.load(tiny_llama_path, n_ctx=64, n_threads=1, memory_budget="2G") as m:
        assert m._follower is None and m.stats.budget_source == "--memory-budget"
    for option in (None, "auto"):
        with flexinfer.load(tiny_llama_path, n_ctx=64, n_threads=1, memory_budget=option) as m:
            assert m._follower is not None and m._follower.alive
            assert m.stats.budget_source.startswith("auto: ")
            f = m._follower
        assert not f.alive  # close stopped it


def test_a_model_nobody_closes_is_still_collected(tiny_llama_path):
    """The follower's thread holds the model weakly: dropping the model closes it (Model.__del__)
    and ends the thread."""
    import gc
    import weakref

    import flexinfer
    m = flexinfer.load(tiny_llama_path, n_ctx=64, n_threads=1)
    f, ref = m._follower, weakref.ref(m)
    assert f is not None and f.alive
    del m
    gc.collect()
    assert ref() is None
    assert not f.alive


def _swap_follower(m, tree: Tree) -> tuple[Follower, Clock, list[str]]:
    m._follower.stop()
    f, clock, lines = follower(tree, m)
    m._follower = f
    return f, clock, lines


def test_a_step_polls_and_changes_the_model_budget(stream_model_path, tmp_path):
    """Through the real Model.set_memory_budget: needs issue 11's part 1 (the lead's)."""
    import flexinfer
    t = Tree(tmp_path, version=2)
    with flexinfer.load(stream_model_path, n_ctx=64, n_threads=1) as m:
        want = [int(m.logits(m.tokenize("Hello there"))[-1].argmax())]
        f, clock, lines = _swap_follower(m, t)
        low = m.minimum_budget()
        assert low < m.plan.total_bytes()  # all resident now: the minimum streams some rows
        t.limit("memory.high", low)
        clock.t += POLL_S
        got = [int(m.logits(m.tokenize("Hello there"))[-1].argmax())]  # the step polls first
        assert m.memory_budget == low and m.budget_source == "auto: cgroup memory.high"
        assert m.stats.budget_bytes == low and m.stats.budget_source == "auto: cgroup memory.high"
        assert len(lines) == 1 and "cgroup memory.high lowered to" in lines[0]
        assert got == want


def test_cli_takes_auto_and_a_size(tiny_llama_path):
    import json
    import subprocess
    import sys
    base = [sys.executable, "-m", "flexinfer", "plan", str(tiny_llama_path), "-c", "64", "--json",
            "--memory-budget"]
    auto = subprocess.run(base + ["auto"], capture_output=True, text=True, timeout=120)
    assert auto.returncode == 0, auto.stderr
    assert json.loads(auto.stdout)["budget_source"].startswith("auto: ")
    fixed = subprocess.run(base + ["1G"], capture_output=True, text=True, timeout=120)
    assert json.loads(fixed.stdout)["budget_source"] == "--memory-budget"
    bad = subprocess.run(base + ["often"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--memory-budget" in bad.stderr
