"""Memory cgroups: real limits on real children (skipped where no cgroup can be written), and the
/proc parsing behind cgroup_limit_bytes on fake files."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from flexinfer import cgroup, disk_cap
from flexinfer.errors import FlexInferError
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


# ---- the disk cap (disk_cap.py): device lookup, v1 and v2 files, missing controller ----

def fake_sysfs(tmp_path) -> Path:
    """/sys/dev/block with a disk 8:0 (sda), its partition 8:1 (sda1) and a dm device 253:2, as
    symlinks into a /sys/devices tree, the way the kernel lays them out."""
    devices = tmp_path / "devices" / "pci0" / "block" / "sda"
    write(devices / "dev", "8:0\n")
    write(devices / "sda1" / "dev", "8:1\n")
    write(devices / "sda1" / "partition", "1\n")
    write(tmp_path / "devices" / "virtual" / "block" / "dm-2" / "dev", "253:2\n")
    sysfs = tmp_path / "dev" / "block"
    sysfs.mkdir(parents=True)
    (sysfs / "8:0").symlink_to(devices)
    (sysfs / "8:1").symlink_to(devices / "sda1")
    (sysfs / "253:2").symlink_to(tmp_path / "devices" / "virtual" / "block" / "dm-2")
    return sysfs


def test_whole_disk_of_a_partition_and_of_a_disk(tmp_path):
    sysfs = fake_sysfs(tmp_path)
    assert disk_cap.whole_disk(8, 1, sysfs) == (8, 0)  # the throttle takes whole disks only
    assert disk_cap.whole_disk(8, 0, sysfs) == (8, 0)
    assert disk_cap.whole_disk(253, 2, sysfs) == (253, 2)  # dm: its own whole disk
    with pytest.raises(FlexInferError, match="0:45 is not a block device"):
        disk_cap.whole_disk(0, 45, sysfs)  # tmpfs, overlay: no block device to throttle


def test_file_device_is_this_disk():
    dev = os.stat(__file__).st_dev
    if not Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").exists():
        pytest.skip("this test file is not on a block device")
    major, minor = disk_cap.file_device(__file__)
    assert Path(f"/sys/dev/block/{major}:{minor}/dev").read_text().strip() == f"{major}:{minor}"
    assert not Path(f"/sys/dev/block/{major}:{minor}/partition").exists()
    with pytest.raises(FlexInferError, match="no-such.gguf: cannot stat"):
        disk_cap.file_device("/no-such.gguf")


def test_cap_file_contents():
    assert disk_cap.cap_file(1, (254, 0), 500_000_000) == (
        "blkio.throttle.read_bps_device", "254:0 500000000")
    assert disk_cap.cap_file(2, (8, 16), 10**9) == ("io.max", "8:16 rbps=1000000000")
    assert disk_cap.parse_rate("500M") == 5 * 10**8 and disk_cap.parse_rate("1G") == 10**9
    with pytest.raises(FlexInferError, match="--disk-rate"):
        disk_cap.parse_rate("fast")


def test_io_hierarchy_v1_v2_and_none(tmp_path):
    blk, uni = tmp_path / "blkio", tmp_path / "unified"
    write(blk / "cgroup.procs", "")
    write(uni / "cgroup.controllers", "cpu io memory\n")
    v1 = f"35 31 0:33 / {blk} rw - cgroup cgroup rw,blkio\n"
    v2 = f"41 31 0:38 / {uni} rw - cgroup2 cgroup2 rw\n"
    assert disk_cap.find_io_hierarchy(v1 + v2, "7:blkio:/\n0::/\n").version == 1
    h = disk_cap.find_io_hierarchy(v2, "0::/\n")
    assert h.version == 2 and h.mount == uni
    write(uni / "cgroup.controllers", "cpu memory\n")  # v2 without io: nothing to write
    assert disk_cap.find_io_hierarchy(v2, "0::/\n") is None


@pytest.mark.parametrize("version", [1, 2])
def test_cap_written_in_a_new_cgroup(tmp_path, version, monkeypatch):
    """On a plain directory standing in for the cgroup mount: the files a kernel would get."""
    sysfs = fake_sysfs(tmp_path / "sys")
    monkeypatch.setattr(disk_cap, "_st_dev", lambda path: os.makedev(8, 1))  # on sda1
    mount = tmp_path / "cg"
    write(mount / "cgroup.subtree_control", "")
    h = disk_cap.IOHierarchy(version, mount, mount)
    with disk_cap.DiskCap.create("model.gguf", 500_000_000, hierarchy=h, sysfs=sysfs) as cap:
        assert cap.device == (8, 0) and cap.path.parent == mount
        name = "blkio.throttle.read_bps_device" if version == 1 else "io.max"
        text = "8:0 500000000" if version == 1 else "8:0 rbps=500000000"
        assert (cap.path / name).read_text() == text
        if version == 2:
            assert (mount / "cgroup.subtree_control").read_text() == "+io"
        (cap.path / name).unlink()  # a real cgroup directory empties itself on rmdir
    assert not cap.path.exists()


def test_no_io_controller_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(disk_cap, "current_io_hierarchy", lambda: None)
    with pytest.raises(FlexInferError, match="no blkio .* or io .* controller"):
        disk_cap.DiskCap.create(__file__, 10**8)
    reason = disk_cap.io_cap_unavailable_reason(__file__)
    assert reason and "cannot be capped" in reason
    with pytest.raises(FlexInferError, match="cannot be capped"):  # never run uncapped
        run_limited([sys.executable, "-c", "print(1)"], None, disk_rate=(__file__, 10**8))


def test_unwritable_cgroup_says_it_needs_root(tmp_path, monkeypatch):
    mount = tmp_path / "ro"
    mount.mkdir()
    mount.chmod(0o500)
    h = disk_cap.IOHierarchy(1, mount, mount)
    if os.access(mount, os.W_OK):  # root ignores the mode bits: make mkdir fail another way
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied")))
    with pytest.raises(FlexInferError, match="needs root or a delegated cgroup"):
        disk_cap.DiskCap.create(__file__, 10**8, hierarchy=h)


IO_REASON = disk_cap.io_cap_unavailable_reason(__file__)

READ_CHILD = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf, done, t0 = mmap.mmap(-1, 1 << 20), 0, time.perf_counter()
while done < int(sys.argv[2]):
    done += os.preadv(fd, [buf], done)
print(done / (time.perf_counter() - t0), os.environ.get("FLEXINFER_DISK_RATE"))
"""


@pytest.mark.skipif(IO_REASON is not None, reason=f"reads cannot be capped here: {IO_REASON}")
def test_capped_read_runs_at_the_cap(tmp_path):
    """A child reading 24 MiB with O_DIRECT under a 24 MB/s cap takes about a second."""
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(24 << 20))
    os.sync()
    cgroup.drop_page_cache()
    rate = 24_000_000
    run = run_limited([sys.executable, "-c", READ_CHILD, str(path), str(24 << 20)], None,
                      timeout=60, disk_rate=(str(path), rate))
    assert run.returncode == 0, run.stderr
    speed, env = run.stdout.split()
    assert env == str(rate)  # the child knows its cap (machine.py keys its calibration by it)
    assert 0.6 * rate < float(speed) < 1.35 * rate  # uncapped, this disk reads 0.7-3 GB/s
    left = [p for p in disk_cap.current_io_hierarchy().mount.iterdir()
            if p.name.startswith(f"flexinfer-io-{os.getpid()}-")]
    assert left == []


def run_cli(argv) -> int:
    from flexinfer import cli
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


def test_run_disk_rate_bad_value_or_no_controller_is_one_line(tiny_llama_path, capsys,
                                                               monkeypatch):
    base = ["run", str(tiny_llama_path), "-p", "hi", "-n", "1", "--temp", "0", "-c", "64"]
    assert run_cli(base + ["--disk-rate", "fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--disk-rate" in err[0] and "'fast'" in err[0]
    monkeypatch.setattr(disk_cap, "current_io_hierarchy", lambda: None)
    assert run_cli(base + ["--disk-rate", "100M"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be capped" in err[0]


@pytest.mark.skipif(IO_REASON is not None, reason=f"reads cannot be capped here: {IO_REASON}")
def test_run_under_a_cap_joins_it_and_leaves(tiny_llama_path, capsys):
    before = Path("/proc/self/cgroup").read_text()
    argv = ["run", str(tiny_llama_path), "-p", "hi", "-n", "2", "--temp", "0", "-c", "64",
            "--json", "--disk-rate", "100M"]
    assert run_cli(argv) == 0
    assert capsys.readouterr().out.strip().startswith("{")
    assert Path("/proc/self/cgroup").read_text() == before  # back where it came from
    assert "FLEXINFER_DISK_RATE" not in os.environ
    mount = disk_cap.current_io_hierarchy().mount
    assert not [p for p in mount.iterdir() if p.name.startswith(f"flexinfer-io-{os.getpid()}-")]


@pytest.mark.skipif(IO_REASON is not None, reason=f"reads cannot be capped here: {IO_REASON}")
def test_capped_moves_this_process_in_and_out():
    before = Path("/proc/self/cgroup").read_text()
    with disk_cap.capped(__file__, 123_000_000) as cap:
        inside = Path("/proc/self/cgroup").read_text()
        assert f"/{cap.path.name}\n" in inside and cap.path.name not in before
        name, _ = disk_cap.cap_file(cap.hierarchy.version, cap.device, cap.rate)
        assert "123000000" in (cap.path / name).read_text()
        assert os.environ["FLEXINFER_DISK_RATE"] == "123000000"
    assert Path("/proc/self/cgroup").read_text() == before and not cap.path.exists()
