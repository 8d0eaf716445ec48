"""Memory cgroups: real limits on real children (skipped where no cgroup can be written), and the
/proc parsing behind cgroup_limit_bytes on fake files."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from flexinfer import cgroup
from flexinfer.cgroup import (MemoryCgroup, cgroup_limit_bytes, cgroup_unavailable_reason,
                              find_hierarchy, parse_limit, parse_proc_cgroup, run_limited)

MiB = 1 << 20
REASON = cgroup_unavailable_reason()
needs_cgroup = pytest.mark.skipif(REASON is not None, reason=f"no memory cgroup: {REASON}")


def allocate(mib: int) -> list[str]:
    """A child that touches mib MiB (bytes * n writes every page), then prints ok."""
    return [sys.executable, "-c", f"b = b'x' * ({mib} << 20); print('ok', len(b))"]


def leftovers() -> list[str]:
    h = cgroup.current_hierarchy()
    prefix = f"flexinfer-{os.getpid()}-"
    return [p.name for d in {h.mount, h.own} for p in d.iterdir() if p.name.startswith(prefix)]


@needs_cgroup
def test_over_the_limit_is_oom_killed():
    run = run_limited(allocate(300), 150 * MiB, timeout=60)
    assert run.constrained and run.oom_killed
    assert run.returncode == -9 and "ok" not in run.stdout
    assert run.peak_bytes is None or run.peak_bytes <= 150 * MiB


@needs_cgroup
def test_under_the_limit_succeeds_and_reports_peak():
    run = run_limited(allocate(50), 200 * MiB, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("ok")
    assert run.constrained and not run.oom_killed and not run.timed_out
    if run.peak_bytes is not None:  # v2 before Linux 5.19 has no memory.peak
        assert 50 * MiB < run.peak_bytes < 200 * MiB


@needs_cgroup
def test_timeout_kills_the_child():
    start = time.monotonic()
    run = run_limited(["sleep", "30"], 100 * MiB, timeout=0.3)
    assert run.timed_out and run.returncode == -9 and not run.oom_killed
    assert time.monotonic() - start < 5


@needs_cgroup
def test_no_directory_left_behind():
    run_limited(["true"], 64 * MiB)
    run_limited(allocate(100), 64 * MiB, timeout=60)
    with MemoryCgroup.create("flexinfer", 64 * MiB) as group:
        assert group.path.is_dir()
        assert group.peak_bytes() is not None or group.version == 2
    assert not group.path.exists()
    assert leftovers() == []


def test_unconstrained_run_says_so():
    run = run_limited([sys.executable, "-c", "print('hi')"], None)
    assert run.returncode == 0 and run.stdout == "hi\n"
    assert not run.constrained and run.peak_bytes is None and run.note


def test_without_cgroups_runs_unconstrained_and_says_why(monkeypatch):
    monkeypatch.setattr(cgroup, "current_hierarchy", lambda: None)
    assert "no v1 memory or v2" in cgroup_unavailable_reason()
    run = run_limited([sys.executable, "-c", "print('hi')"], 64 * MiB)
    assert run.returncode == 0 and not run.constrained and "memory cgroup" in run.note


def test_missing_program_is_a_clear_error():
    with pytest.raises(cgroup.FlexInferError, match="no-such-program"):
        run_limited(["no-such-program-xyz"], None)


# ---- parsing, on fake /proc and /sys files ----

def test_parse_limit():
    assert parse_limit("max\n") is None
    assert parse_limit("9223372036854771712\n") is None  # v1's "no limit"
    assert parse_limit("1073741824\n") == 1 << 30


def test_parse_proc_cgroup():
    text = "12:cpu,cpuacct:/a\n4:memory:/process_api/x\n0::/user.slice/s.scope\n"
    got = parse_proc_cgroup(text)
    assert got["memory"] == "/process_api/x" and got["cpuacct"] == "/a"
    assert got[""] == "/user.slice/s.scope"


def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_proc(tmp_path, mountinfo: str, proc_cgroup: str) -> dict:
    write(tmp_path / "mountinfo", mountinfo)
    write(tmp_path / "cgroup", proc_cgroup)
    return dict(mountinfo=str(tmp_path / "mountinfo"), proc_cgroup=str(tmp_path / "cgroup"))


def test_limit_v1_smallest_on_the_path(tmp_path):
    mem = tmp_path / "memory"
    write(mem / "memory.limit_in_bytes", "9223372036854771712\n")
    write(mem / "a" / "memory.limit_in_bytes", "2147483648\n")
    write(mem / "a" / "b" / "memory.limit_in_bytes", "9223372036854771712\n")
    files = fake_proc(tmp_path, f"35 31 0:32 / {mem} rw,relatime - cgroup cgroup rw,memory\n",
                      "4:memory:/a/b\n0::/\n")
    assert cgroup_limit_bytes(**files) == 2 << 30


def test_limit_v1_unlimited(tmp_path):
    mem = tmp_path / "memory"
    write(mem / "memory.limit_in_bytes", "9223372036854771712\n")
    files = fake_proc(tmp_path, f"35 31 0:32 / {mem} rw - cgroup cgroup rw,memory\n",
                      "4:memory:/\n")
    assert cgroup_limit_bytes(**files) is None


def test_limit_v2(tmp_path):
    root = tmp_path / "unified"
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    write(root / "user.slice" / "memory.max", "1610612736\n")
    write(root / "user.slice" / "s.scope" / "memory.max", "max\n")
    files = fake_proc(tmp_path, f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n",
                      "0::/user.slice/s.scope\n")
    assert cgroup_limit_bytes(**files) == 1610612736
    write(root / "user.slice" / "memory.max", "max\n")
    assert cgroup_limit_bytes(**files) is None


def test_v2_without_memory_controller_is_no_hierarchy(tmp_path):
    root = tmp_path / "unified"
    write(root / "cgroup.controllers", "cpu io pids\n")
    assert find_hierarchy(f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n", "0::/\n") is None


def test_container_mount_shows_its_own_subtree(tmp_path):
    """A mount whose root is /docker/abc shows that cgroup at the mount point."""
    mem = tmp_path / "memory"
    write(mem / "sub" / "memory.limit_in_bytes", "1048576000\n")
    write(mem / "memory.limit_in_bytes", "4194304000\n")
    info = f"35 31 0:32 /docker/abc {mem} rw - cgroup cgroup rw,memory\n"
    h = find_hierarchy(info, "4:memory:/docker/abc/sub\n")
    assert h.version == 1 and h.own == mem / "sub"
    files = fake_proc(tmp_path, info, "4:memory:/docker/abc/sub\n")
    assert cgroup_limit_bytes(**files) == 1048576000


def test_no_cgroup_mounts(tmp_path):
    files = fake_proc(tmp_path, "22 1 0:5 / /proc rw - proc proc rw\n", "0::/\n")
    assert cgroup_limit_bytes(**files) is None
