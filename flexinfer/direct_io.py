"""Reading weight bytes from the model file with O_DIRECT, so streamed weights never fill the page cache.

O_DIRECT wants the file offset, the length and the destination address aligned to the logical block
size; 4096 covers every disk seen so far. A tensor's bytes are read as the aligned span that covers
them, into an aligned buffer, and the caller is told where inside it the tensor starts. Where the
filesystem refuses O_DIRECT (tmpfs, some network filesystems) reads are buffered and followed by
posix_fadvise(DONTNEED), which drops the pages again; that fallback is reported once through `note`.
"""

from __future__ import annotations

import errno
import os
import threading

from flexinfer.errors import StreamError
from flexinfer.ggml_ops import memview
from flexinfer.prefetch import ReadPool

ALIGN = 4096  # bytes; O_DIRECT offset, length and address alignment
READ_CHUNK = 4 << 20  # bytes per preadv: 4 MiB reads ran 5-25% faster than 16 MiB ones here
READ_DEPTH = 2  # preadv calls in flight for a span of several chunks (a streamed piece is two):
# here one 4 MiB read at a time got 0.69-0.75 GB/s, two 0.86-0.99 (under a 1 GB/s cap: 0.69 ->
# 0.99), four no more than two; under a 0.5 GB/s cap all the same (docs/benchmarks.md,
# scripts/read_concurrency.py). NVMe wants depth to pass about 2 GB/s.


def align_down(n: int) -> int:
    return n & ~(ALIGN - 1)


def align_up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def span(offset: int, nbytes: int) -> tuple[int, int]:
    """(aligned start, aligned length) of the block span covering [offset, offset + nbytes)."""
    start = align_down(offset)
    return start, align_up(offset + nbytes) - start


class DirectReader:
    """Positional reads of a model file. Thread-safe: preadv carries its own offset."""

    def __init__(self, path: str, expect_size: int, direct: bool = True, note=None,
                 depth: int = READ_DEPTH):
        self.path, self.expect_size = path, expect_size
        self.fd = -1
        self._pool = ReadPool(depth) if depth > 1 else None  # threads start on first use
        self.direct = False
        self.bytes_read = 0
        self._lock = threading.Lock()
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise StreamError(f"{path}: cannot open: {e.strerror}") from None
        if not self.direct:
            try:
                self.fd = os.open(path, flags)
            except OSError as e:
                raise StreamError(f"{path}: cannot open: {e.strerror}") from None
            if direct and note:
                note(f"{path}: O_DIRECT refused by this filesystem; using buffered reads "
                     "with posix_fadvise(DONTNEED)")
        st = os.fstat(self.fd)
        self._identity = (st.st_size, st.st_mtime_ns)
        if st.st_size != expect_size:
            raise StreamError(f"{path}: file changed size from {expect_size} to {st.st_size} "
                              "bytes since its header was read")

    def check_unchanged(self) -> None:
        """A file rewritten in place would hand us other bytes: refuse them (fstat costs ~1 us).
        A file replaced by rename is fine: our descriptor keeps reading the original."""
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) != self._identity:
            raise StreamError(f"{self.path}: the file was modified while in use (size "
                              f"{self._identity[0]} -> {st.st_size} bytes)")

    def read_span(self, dst: int, offset: int, nbytes: int) -> int:
        """Read the aligned span covering [offset, offset+nbytes) into dst (ALIGN-aligned, with
        room for span(offset, nbytes)[1] bytes). Returns the address where the bytes start."""
        self.check_unchanged()
        start, length = span(offset, nbytes)
        need = offset + nbytes - start  # the span may run past EOF; those bytes are not needed
        got = self._pread_full(dst, start, length, need)
        if got < need:
            raise StreamError(f"{self.path}: short read at offset {offset}: {got - (offset - start)}"
                              f" of {nbytes} bytes (file truncated or changed while in use?)")
        with self._lock:
            self.bytes_read += got
        if not self.direct:
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)
        return dst + (offset - start)

    def _pread_full(self, dst: int, start: int, length: int, need: int) -> int:
        """Bytes read from start on, in READ_CHUNK pieces, READ_DEPTH of them in flight; stops
        at the end of the file (the count of contiguous bytes read is returned)."""
        chunks = [(off, min(READ_CHUNK, length - off)) for off in range(0, need, READ_CHUNK)]
        if self._pool is None or len(chunks) < 2:
            got = [self._pread_chunk(dst, start, c) for c in chunks]
        else:
            got = self._pool.map(lambda c: self._pread_chunk(dst, start, c), chunks)
        done = 0
        for (off, size), n in zip(chunks, got):
            done += n
            if n < size:  # the end of the file: nothing after this chunk counts
                break
        return done

    def _pread_chunk(self, dst: int, start: int, chunk: tuple[int, int]) -> int:
        """Reads one chunk (offset from start, size) whole unless the file ends; bytes read."""
        off, size = chunk
        done = 0
        while done < size:
            try:
                n = os.preadv(self.fd, [memview(dst + off + done, size - done)],
                              start + off + done)
            except OSError as e:
                raise StreamError(f"{self.path}: read failed at offset {start + off + done}: "
                                  f"{e.strerror or e}") from None
            if n == 0:
                break
            done += n
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
