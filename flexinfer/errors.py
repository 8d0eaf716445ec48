"""The one error type that flexinfer lets reach a user.

Every failure a user can cause (a bad file, a bad flag, a budget that cannot work, an I/O fault while
streaming) is raised as a FlexInferError whose message names the thing at fault and what is wrong.
The CLI prints that one line and exits with code 2; anything else escaping is a bug.
"""


class FlexInferError(Exception):
    """A user-facing error: `str(err)` is one line that names the file or option and the problem."""


class GGUFError(FlexInferError):
    """A model file that flexinfer refuses: malformed, truncated, or not what its architecture needs."""

    def __init__(self, path, what: str):
        self.path = str(path)
        self.what = what
        super().__init__(f"{self.path}: {what}")


class StreamError(FlexInferError):
    """An I/O fault while streaming weights (EIO, short read, file changed underneath us)."""
