"""Real memory cgroups (v1 and v2): run a process under a hard memory limit and read what it used.

The benchmark's budgets mean what the paper's do: a cgroup whose limit is the budget, so page cache
and mmapped weights count against it exactly as on a small device. v1 (memory.limit_in_bytes) and
v2 (memory.max) are both handled; which one is in use is read from /proc/self/mountinfo. Where no
cgroup can be written (not root, read-only mount, v2 without the memory controller), run_limited
still runs the command and says constrained=False, never pretending a limit held.

`--memory-budget auto` reads the limits through find_hierarchy and parse_limit (follow.py).
"""

from __future__ import annotations

import itertools
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flexinfer.errors import FlexInferError

UNLIMITED = 1 << 60  # v1 writes "no limit" as 9223372036854771712; anything this big means none
RMDIR_WAIT_S = 2.0  # a cgroup can stay busy for a moment after its last process exits
_counter = itertools.count()


@dataclass(frozen=True)
class Hierarchy:
    """Where the memory controller is mounted and where this process sits in it."""

    version: int  # 1 or 2
    mount: Path  # e.g. /sys/fs/cgroup/memory (v1) or /sys/fs/cgroup (v2)
    own: Path  # this process's cgroup directory under mount


@dataclass(frozen=True)
class LimitedRun:
    """What run_limited saw.

    No max RSS from wait4: Linux charges a forked child with its parent's high-water RSS at exec, so
    ru_maxrss of a child of a 500 MB harness reads >= 500 MB. The cgroup's own peak is exact.
    """

    returncode: int  # negative: killed by that signal (-9 for the OOM killer or a timeout)
    stdout: str
    stderr: str
    peak_bytes: int | None  # cgroup peak incl. page cache; None: unconstrained, or v2 < 5.19
    oom_killed: bool  # the cgroup's OOM killer killed a process
    seconds: float  # wall time from start to exit
    constrained: bool  # False: ran without a memory limit (see note)
    timed_out: bool = False  # killed because the timeout passed
    note: str = ""  # why constrained is False


# ---- parsing /proc files (pure functions, tested on fake files) ----

def parse_limit(text: str) -> int | None:
    """A limit file's value in bytes, None for no limit ("max" in v2, ~2^63 in v1)."""
    text = text.strip()
    if text == "max":
        return None
    value = int(text)
    return None if value >= UNLIMITED else value


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup -> {controller: path}; the v2 line ("0::/path") is under the key ""."""
    out = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                out[controller] = parts[2]
    return out


def parse_mountinfo(text: str) -> list[tuple[str, str, str, set[str]]]:
    """/proc/self/mountinfo -> [(root, mount point, fs type, super options)] of cgroup mounts."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            out.append((fields[3], fields[4], tail[0], set(tail[2].split(","))))
    return out


def find_controller(mountinfo_text: str, proc_cgroup_text: str, v1: str,
                    v2: str) -> tuple[int, Path, Path] | None:
    """(version, mount, this process's cgroup dir) of a v1 mount with option `v1`, else of a v2
    mount offering controller `v2`; None when there is neither."""
    paths = parse_proc_cgroup(proc_cgroup_text)
    mounts = parse_mountinfo(mountinfo_text)
    for root, point, fstype, opts in mounts:
        if fstype == "cgroup" and v1 in opts:
            return 1, Path(point), _own_dir(point, root, paths.get(v1, "/"))
    for root, point, fstype, _ in mounts:
        if fstype == "cgroup2" and v2 in _read(Path(point, "cgroup.controllers"), "").split():
            return 2, Path(point), _own_dir(point, root, paths.get("", "/"))
    return None


def find_hierarchy(mountinfo_text: str, proc_cgroup_text: str) -> Hierarchy | None:
    """The memory hierarchy: a v1 mount with the memory option, else a v2 mount offering memory."""
    found = find_controller(mountinfo_text, proc_cgroup_text, "memory", "memory")
    return Hierarchy(*found) if found else None


def _own_dir(point: str, root: str, path: str) -> Path:
    """The directory of cgroup `path` when the mount shows the hierarchy from `root` down."""
    rel = os.path.relpath(path, root) if path.startswith(root) else "."
    own = Path(point) / rel
    return own if own.is_dir() else Path(point)


def _read(path: Path, default: str | None = None) -> str:
    try:
        return path.read_text()
    except OSError:
        if default is None:
            raise
        return default


def current_hierarchy() -> Hierarchy | None:
    return find_hierarchy(_read(Path("/proc/self/mountinfo"), ""),
                          _read(Path("/proc/self/cgroup"), ""))


def cgroup_limit_bytes(*, mountinfo: str = "/proc/self/mountinfo",
                       proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """This process's memory limit: the smallest limit on its cgroup and the ones above it.

    None when unlimited or unknown. The engine takes this as the budget when none is given.
    """
    h = find_hierarchy(_read(Path(mountinfo), ""), _read(Path(proc_cgroup), ""))
    if h is None:
        return None
    name = "memory.limit_in_bytes" if h.version == 1 else "memory.max"
    limits = []
    for d in (h.own, *h.own.parents):
        text = _read(d / name, "")
        if text.strip():
            limits.append(parse_limit(text))
        if d == h.mount:
            break
    return min((x for x in limits if x is not None), default=None)


# ---- one cgroup ----

class MemoryCgroup:
    """A memory cgroup we created; a context manager that removes it on exit."""

    def __init__(self, path: Path, version: int, limit_bytes: int):
        self.path, self.version, self.limit_bytes = path, version, limit_bytes

    @classmethod
    def create(cls, name_prefix: str, limit_bytes: int) -> MemoryCgroup:
        """Creates NAME_PREFIX-PID-N with the given limit. Raises FlexInferError if it cannot."""
        h = current_hierarchy()
        if h is None:
            raise FlexInferError("memory cgroup: no v1 memory or v2 cgroup mount with the memory "
                                 "controller in /proc/self/mountinfo")
        name = f"{name_prefix}-{os.getpid()}-{next(_counter)}"
        errors = []
        # v1: the mount root, as a benchmark on a bare device would; the launcher's own cgroup
        # (h.own) only if the root is closed to us
        for parent in dict.fromkeys((h.mount, h.own)):
            try:
                return cls._make(parent / name, h.version, limit_bytes)
            except OSError as e:
                errors.append(f"{parent}: {e.strerror or e}")
        raise FlexInferError(f"memory cgroup: cannot create one ({'; '.join(errors)})")

    @classmethod
    def _make(cls, path: Path, version: int, limit_bytes: int) -> MemoryCgroup:
        if version == 2:
            _enable_memory(path.parent)
        path.mkdir()
        group = cls(path, version, limit_bytes)
        try:
            group._configure()
        except OSError:
            group.remove()
            raise
        return group

    def _configure(self):
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
            _try_write(self.path / "memory.swappiness", "0")  # no swapping out our pages
        else:
            (self.path / "memory.max").write_text(str(self.limit_bytes))
            _try_write(self.path / "memory.swap.max", "0")  # the budget is RAM, not RAM + swap

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def add(self, pid: int):
        self.procs_file.write_text(str(pid))

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        text = _read(self.path / name, "").strip()
        return int(text) if text.isdigit() else None

    def oom_killed(self) -> bool:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in _read(self.path / name, "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value) > 0
        return False

    def remove(self) -> bool:
        """rmdir once the processes inside have exited (moves nothing). False if still busy."""
        return rmdir_waiting(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def rmdir_waiting(path: Path) -> bool:
    """rmdir a cgroup, waiting up to RMDIR_WAIT_S for processes that just exited to leave it.
    False if it is still busy then."""
    deadline = time.monotonic() + RMDIR_WAIT_S
    while True:
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def _enable_memory(parent: Path):
    """v2: children get memory.max only if the parent lists memory in cgroup.subtree_control."""
    control = parent / "cgroup.subtree_control"
    if "memory" not in _read(control, "").split():
        control.write_text("+memory")


def _try_write(path: Path, value: str):
    try:
        path.write_text(value)
    except OSError:
        pass


def cgroup_unavailable_reason() -> str | None:
    """None when a memory cgroup can be created here, else one line saying why not."""
    try:
        MemoryCgroup.create("flexinfer-probe", 1 << 30).remove()
    except FlexInferError as e:
        return str(e)
    return None


def drop_page_cache() -> bool:
    """sync, then drop clean page cache, dentries and inodes. False if not permitted (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


# ---- running a command under a limit ----

# The child joins the cgroup before exec, so the first byte it allocates is already charged.
_JOIN_AND_EXEC = 'echo $$ > "$0" && exec "$@"'


def run_limited(argv: list[str], limit_bytes: int | None, *, env=None,
                timeout: float | None = None, disk_rate: tuple[str, int] | None = None
                ) -> LimitedRun:
    """Runs argv to completion inside a new memory cgroup of limit_bytes (None: no limit).

    disk_rate (model path, bytes/s): also cap reads from that file's disk (disk_cap.py). That cap
    is never dropped quietly: where it cannot be set, FlexInferError, and nothing runs."""
    from flexinfer import disk_cap  # it builds on this module's parsing
    group, note = None, "no limit asked for"
    cap = None
    if disk_rate is not None:  # first: the one that must not fail quietly
        cap = disk_cap.DiskCap.create(*disk_rate)
        env = {**(os.environ if env is None else env), disk_cap.ENV: str(disk_rate[1])}
    if limit_bytes is not None:
        try:
            group = MemoryCgroup.create("flexinfer", limit_bytes)
        except FlexInferError as e:
            note = str(e)
    try:
        joins = [group.procs_file] if group else []
        if cap and group and cap.hierarchy.version == 2 and group.version == 2:
            cap.remove()  # one unified hierarchy: the memory cgroup carries io.max too
            try:
                disk_cap.DiskCap.apply_to(group.path, cap.hierarchy, cap.device, cap.rate)
            except OSError as e:
                raise FlexInferError(f"--disk-rate: cannot write io.max in {group.path}: "
                                     f"{e.strerror or e}") from None
            finally:
                cap = None
        joins += [cap.procs_file] if cap else []
        full = list(argv)
        for procs in joins:
            full = ["/bin/sh", "-c", _JOIN_AND_EXEC, str(procs), *full]
        status, seconds, timed_out, out, err = _spawn_and_wait(full, env, timeout)
        peak = group.peak_bytes() if group else None
        oom = group.oom_killed() if group else False
        return LimitedRun(status, out, err, peak, oom, seconds, group is not None, timed_out,
                          "" if group else note)
    finally:
        if group:
            group.remove()
        if cap:
            cap.remove()


def _spawn_and_wait(argv, env, timeout):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_DUP2, err.fileno(), 2)]
        start = time.monotonic()
        try:
            pid = os.posix_spawnp(argv[0], argv, os.environ if env is None else env,
                                  file_actions=actions)
        except OSError as e:
            raise FlexInferError(f"cannot start {argv[0]}: {e.strerror or e}") from None
        status, timed_out = _wait(pid, None if timeout is None else start + timeout)
        seconds = time.monotonic() - start
        return status, seconds, timed_out, _text(out), _text(err)


def _wait(pid: int, deadline: float | None) -> tuple[int, bool]:
    """Reaps pid, SIGKILLing it at the deadline; polls from every 1 ms up to every 50 ms."""
    timed_out, delay = False, 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), timed_out
        if deadline is not None and not timed_out and time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            timed_out = True
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _text(f) -> str:
    f.seek(0)
    return f.read().decode("utf-8", "replace")
