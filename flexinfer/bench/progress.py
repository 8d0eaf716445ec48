"""A one-line progress bar on stderr: points done / total, elapsed, estimated time left.

    bench [########------------]  4/10  elapsed 3:12  left ~4:48  sync @ 1.50 GB, P=16

Redrawn in place with \\r when stderr is a terminal; one line per point otherwise (logs, CI).
"""

from __future__ import annotations

import sys
import time

WIDTH = 20  # characters of bar


def clock(seconds: float) -> str:
    """1:02:03 or 3:12."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class ProgressBar:
    def __init__(self, total: int, stream=None):
        self.total, self.done, self.label = total, 0, ""
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        filled = WIDTH * self.done // max(self.total, 1)
        left = f"~{clock(elapsed / self.done * (self.total - self.done))}" if self.done else "?"
        return (f"bench [{'#' * filled}{'-' * (WIDTH - filled)}] {self.done:2d}/{self.total}  "
                f"elapsed {clock(elapsed)}  left {left}  {self.label}")

    def draw(self):
        if self.tty:
            self.stream.write("\r\033[K" + self.line())  # back to column 0, clear, redraw
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def start(self, label: str):
        """A point begins: shows what runs now."""
        self.label = label
        self.draw()

    def step(self):
        """A point ended."""
        self.done += 1
        if self.tty:
            self.draw()

    def finish(self):
        self.label = "done"
        self.draw()
        if self.tty:
            self.stream.write("\n")
