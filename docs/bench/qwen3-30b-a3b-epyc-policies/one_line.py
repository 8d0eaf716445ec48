"""The scripts of this directory end through run(main): a bad model, size or rate (or a file that
cannot be read) is one line on stderr, not a traceback."""
import sys
from pathlib import Path

from flexinfer.errors import FlexInferError


def run(main) -> None:
    try:
        sys.exit(main())
    except (FlexInferError, OSError) as e:
        sys.exit(f"{Path(sys.argv[0]).name}: {e}")
