"""A byte progress bar on stderr, shared by `flexinfer pull` (the download) and loading (the
resident weights):

    [#############                 ]  45% 44.1/98.4 MB resident weights

Redrawn in place with \\r. Loading draws it only when stderr is a terminal and loading has already
taken more than FLEXINFER_PROGRESS_AFTER seconds (default 1.0; 0 shows it for every load), so a
quick load, a log file, a pipe and --json stay clean.
"""

from __future__ import annotations

import os
import sys
import time

from flexinfer.errors import FlexInferError

BAR_WIDTH = 30  # characters of '#' at 100%
AFTER_ENV = "FLEXINFER_PROGRESS_AFTER"
AFTER_S = 1.0  # a load shorter than this shows no bar
REDRAW_S = 0.1  # seconds between redraws


def bar_text(done: int, total: int) -> str:
    """`[#####     ]  45% 44.1/98.4 MB`: done of total bytes."""
    frac = done / total if total else 1.0
    bar = "#" * int(frac * BAR_WIDTH)
    return f"[{bar:<{BAR_WIDTH}}] {frac:4.0%} {done / 1e6:.1f}/{total / 1e6:.1f} MB"


def _after_s() -> float:
    text = os.environ.get(AFTER_ENV)
    if text is None:
        return AFTER_S
    try:
        after = float(text)
    except ValueError:
        after = -1.0
    if not after >= 0:  # also NaN
        raise FlexInferError(f"{AFTER_ENV}: {text!r} is not a number of seconds >= 0")
    return after


class LoadProgress:
    """The callback `load(..., progress=...)` calls with (bytes done, bytes total) as resident
    weights are read. Silent unless `stream` is a terminal and `after` seconds have passed since
    it was made (made just before loading starts, so the file check and planning count too)."""

    def __init__(self, stream=None, label: str = "resident weights", after: float | None = None):
        self.stream = stream or sys.stderr
        self.label = label
        self.after = _after_s() if after is None else after
        self.t0 = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.shown = self.ended = False  # a bar is on the screen; its line ended
        self.drawn = 0.0  # when it was last drawn

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.tty or now - self.t0 < self.after:
            return
        if self.shown and done < total and now - self.drawn < REDRAW_S:
            return  # a 7B has ~300 resident parts: redrawn at most 10 times a second
        self.shown, self.drawn = True, now
        self.stream.write(f"\r\033[K{bar_text(done, total)} {self.label}")  # column 0, clear
        if done >= total:
            self.end()
        self.stream.flush()

    def end(self) -> None:
        """Ends the bar's line (once): what follows, an error too, starts on a line of its own."""
        if self.shown and not self.ended:
            self.ended = True
            self.stream.write("\n")
            self.stream.flush()
