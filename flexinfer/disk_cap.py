"""A disk of known speed: an I/O cgroup that caps reads from a model file's block device.

This machine's virtual disk reads at anything from 0.7 to 3 GB/s from one minute to the next (the
host caches behind it), so a benchmark against "the disk" measures the host. The cgroup I/O
controller makes the rate a setting (measured here: a 500 MB/s cap gave 512 MB/s to O_DIRECT and
buffered reads alike, where the uncapped disk read 1.0 GB/s):
- v1: `blkio.throttle.read_bps_device` holds "MAJ:MIN BYTES_PER_S";
- v2: `io.max` holds "MAJ:MIN rbps=BYTES_PER_S" (the io controller enabled in the parent).
The device is the whole disk the file lives on: st_dev names a partition for a file on /dev/sda1,
and the throttle only takes whole disks (a dm or md device is its own whole disk in sysfs).

Where no controller can be written this stops with one line (FlexInferError): a capped benchmark
measured uncapped would be a wrong number with a right-looking label.

The throttle is a token bucket: a reader that pauses gets a burst of saved-up allowance afterwards
(scripts/cap_burst.py measures how much). A real disk gives no such credit.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from flexinfer.budget import parse_size
from flexinfer.cgroup import _read, find_controller, rmdir_waiting
from flexinfer.errors import FlexInferError

ENV = "FLEXINFER_DISK_RATE"  # bytes/s of the cap a process runs under (machine.py keys its
# disk calibration by it, so a capped run plans with the capped rate)
SYS_DEV_BLOCK = Path("/sys/dev/block")
_counter = itertools.count()


def parse_rate(text: str, option: str = "--disk-rate") -> int:
    """'500M', '1G', '100M' -> bytes/s (decimal units, as the issue's GB/s)."""
    return parse_size(text, option)


def rate_label(rate: int | None) -> str:
    return "uncapped" if rate is None else f"{rate / 1e9:g} GB/s"


# ---- the device (pure given a sysfs root; tested on fake trees) ----

def whole_disk(major: int, minor: int, sysfs: Path = SYS_DEV_BLOCK) -> tuple[int, int]:
    """The whole disk holding block device MAJ:MIN: itself, or its parent for a partition
    (/sys/dev/block/8:1 -> .../block/sda/sda1, with a `partition` file; its parent sda has `dev`)."""
    node = sysfs / f"{major}:{minor}"
    if not node.exists():
        raise FlexInferError(f"device {major}:{minor} is not a block device (no {node}): the file "
                             "is on a virtual filesystem (tmpfs, overlay, network) that no I/O "
                             "cgroup can throttle")
    if not (node / "partition").exists():
        return major, minor
    parent = node.resolve().parent
    text = _read(parent / "dev", "").strip()
    if ":" not in text:
        raise FlexInferError(f"device {major}:{minor} is a partition, but {parent}/dev does not "
                             "name its disk")
    a, b = text.split(":")
    return int(a), int(b)


def file_device(path: str, sysfs: Path = SYS_DEV_BLOCK) -> tuple[int, int]:
    """MAJ:MIN of the whole disk that `path` is read from."""
    dev = _st_dev(path)
    return whole_disk(os.major(dev), os.minor(dev), sysfs)


def _st_dev(path: str) -> int:
    try:
        return os.stat(path).st_dev
    except OSError as e:
        raise FlexInferError(f"{path}: cannot stat it to find its disk: {e.strerror}") from None


def cap_file(version: int, device: tuple[int, int], rate: int) -> tuple[str, str]:
    """(file name, contents) that cap reads from `device` at `rate` bytes/s."""
    dev = f"{device[0]}:{device[1]}"
    if version == 1:
        return "blkio.throttle.read_bps_device", f"{dev} {rate}"
    return "io.max", f"{dev} rbps={rate}"


# ---- the hierarchy ----

@dataclass(frozen=True)
class IOHierarchy:
    version: int  # 1: blkio, 2: io
    mount: Path
    own: Path  # this process's cgroup under mount


def find_io_hierarchy(mountinfo_text: str, proc_cgroup_text: str) -> IOHierarchy | None:
    """A v1 mount with the blkio option, else a v2 mount offering the io controller."""
    found = find_controller(mountinfo_text, proc_cgroup_text, "blkio", "io")
    return IOHierarchy(*found) if found else None


def current_io_hierarchy() -> IOHierarchy | None:
    return find_io_hierarchy(_read(Path("/proc/self/mountinfo"), ""),
                             _read(Path("/proc/self/cgroup"), ""))


class DiskCap:
    """An I/O cgroup we created that caps reads of one device; removed on exit."""

    def __init__(self, path: Path, h: IOHierarchy, device: tuple[int, int], rate: int):
        self.path, self.hierarchy, self.device, self.rate = path, h, device, rate

    @classmethod
    def create(cls, model_path: str, rate: int, *, hierarchy: IOHierarchy | None = None,
               sysfs: Path = SYS_DEV_BLOCK) -> DiskCap:
        """A cgroup capping reads of model_path's disk at rate bytes/s; FlexInferError if none
        can be made (no controller, not root, a file on no block device)."""
        device = file_device(model_path, sysfs)
        h = hierarchy or current_io_hierarchy()
        if h is None:
            raise FlexInferError("--disk-rate: no blkio (cgroup v1) or io (cgroup v2) controller "
                                 "is mounted here, so reads cannot be capped")
        name = f"flexinfer-io-{os.getpid()}-{next(_counter)}"
        errors = []
        for parent in dict.fromkeys((h.mount, h.own)):
            try:
                return cls._make(parent / name, h, device, rate)
            except OSError as e:
                errors.append(f"{parent}: {e.strerror or e}")
        raise FlexInferError(f"--disk-rate: cannot create an I/O cgroup to cap reads "
                             f"({'; '.join(errors)}); it needs root or a delegated cgroup")

    @classmethod
    def _make(cls, path: Path, h: IOHierarchy, device, rate: int) -> DiskCap:
        if h.version == 2:
            control = path.parent / "cgroup.subtree_control"
            if "io" not in _read(control, "").split():
                control.write_text("+io")
        path.mkdir()
        cap = cls(path, h, device, rate)
        name, text = cap_file(h.version, device, rate)
        try:
            (path / name).write_text(text)
            written = _read(path / name, "")
        except OSError:
            cap.remove()
            raise
        if str(rate) not in written:  # a kernel that took the write and kept nothing
            cap.remove()
            raise OSError(0, f"{name} reads back {written.strip()!r} after writing {text!r}")
        return cap

    @staticmethod
    def apply_to(group: Path, h: IOHierarchy, device, rate: int):
        """Writes the cap into an existing cgroup `group` (v2: one process sits in one cgroup of
        the unified hierarchy, so a memory cgroup there carries io.max itself)."""
        control = group.parent / "cgroup.subtree_control"
        if h.version == 2 and "io" not in _read(control, "").split():
            control.write_text("+io")
        name, text = cap_file(h.version, device, rate)
        (group / name).write_text(text)

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def join(self, pid: int | None = None):
        """Moves a process (all its threads) into the cap; this one by default."""
        self.procs_file.write_text(str(pid or os.getpid()))

    def leave(self):
        """Moves this process back to the cgroup it came from."""
        (self.hierarchy.own / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> bool:
        """rmdir, waiting a moment for processes that just exited to leave. False if busy."""
        return rmdir_waiting(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class capped:
    """`with capped(path, rate):` this process reads path's disk at most at rate bytes/s inside
    (flexinfer run --disk-rate); FLEXINFER_DISK_RATE says so to the calibration. None: no cap."""

    def __init__(self, path: str, rate: int | None):
        self.path, self.rate, self.cap, self._env = path, rate, None, None

    def __enter__(self):
        if self.rate is not None:
            self.cap = DiskCap.create(self.path, self.rate)
            try:
                self.cap.join()
            except OSError as e:
                self.cap.remove()
                raise FlexInferError(f"--disk-rate: cannot join the I/O cgroup {self.cap.path}: "
                                     f"{e.strerror or e}") from None
            self._env = os.environ.get(ENV)
            os.environ[ENV] = str(self.rate)
        return self.cap

    def __exit__(self, *exc):
        if self.cap is None:
            return
        if self._env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self._env
        try:
            self.cap.leave()
        except OSError:
            return  # still inside: the directory cannot go; the kernel frees it when we exit
        self.cap.remove()


def io_cap_unavailable_reason(model_path: str) -> str | None:
    """None when reads of model_path can be capped here, else one line saying why not."""
    try:
        DiskCap.create(model_path, 1 << 30).remove()
    except FlexInferError as e:
        return str(e)
    return None
