"""The native boundary: the only module that imports ggml or ctypes.

Everything flexinfer does with native memory goes through here: the CPU backend and its persistent
thread pool, host buffers the engine allocates (plain or of the CPU_REPACK type), tensor headers that
point into those buffers, graph building (`Ops`), graph memory (`Allocator`), and the few libc calls
(mlock) that Python's os module lacks. Model code builds graphs with `Ops` methods named like the ggml
ops they wrap and never sees a ctypes object.

Two ggml-python 0.0.45 quirks are handled here and nowhere else:
- `ggml_backend_cpu_buffer_type()` is bound with a 32-bit return type and truncates the pointer; we
  take the CPU device's buffer type from the registry instead.
- the repack buffer type announces every tensor it converts on ggml's log at debug level; the log is
  filtered to warnings and errors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from dataclasses import dataclass

import numpy as np

# ggml computes with OpenMP, whose idle threads spin (libgomp: 300,000 rounds) after every graph
# before they sleep. A mixture of experts runs two graphs a layer with reads, repacking and
# routing between them (98 graphs a token for Qwen3-30B-A3B); the spinning thread held one of two
# cores through those gaps, and page faults of the expert read-ahead ran 2-11 us a page instead of
# 2. A short spin still bridges back-to-back graphs (SmolLM2 in RAM: 90-101 tok/s against 86-92
# with the default; OMP_WAIT_POLICY=passive halves it). libgomp reads this once, when ggml loads
# it, so it is set here, before the import, and taken back after (processes this one starts, such
# as the llama.cpp peer of the benchmarks, keep their own default); a value the user set wins.
_SPIN_SET = "GOMP_SPINCOUNT" not in os.environ
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import ggml  # noqa: E402 (after GOMP_SPINCOUNT)

if _SPIN_SET:
    del os.environ["GOMP_SPINCOUNT"]

Tensor = ggml.ggml_tensor_p  # opaque to callers: they pass these between Ops methods
TYPE_F32, TYPE_F16, TYPE_I32, TYPE_I64 = 0, 1, 26, 27
ROPE_NORM, ROPE_NEOX = 0, ggml.GGML_ROPE_TYPE_NEOX
KQ_MASK_PAD = ggml.GGML_KQ_MASK_PAD  # rows of the attention mask are padded to this
_LOG_WARN = 3

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@ggml.ggml_log_callback
def _log(level, text, _user):
    if level >= _LOG_WARN and level != 5 and text:  # 5 = GGML_LOG_LEVEL_CONT
        sys.stderr.write("ggml: " + text.decode(errors="replace"))


ggml.ggml_log_set(_log, None)


def _cpu_device():
    return ggml.ggml_backend_reg_dev_get(ggml.ggml_backend_cpu_reg(), 0)


def _buffer_types() -> tuple[int, int | None]:
    """(plain CPU buffer type, CPU_REPACK buffer type or None). AMX is never used: it crashes on
    batches of two or more tokens on these machines, in llama.cpp and ggml-python alike."""
    reg, dev = ggml.ggml_backend_cpu_reg(), _cpu_device()
    fn_addr = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    repack = None
    if fn_addr:
        fn = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn_addr)
        extra = fn(dev)
        i = 0
        while extra and extra[i]:
            if ggml.ggml_backend_buft_name(extra[i]) == b"CPU_REPACK":
                repack = extra[i]
            i += 1
    return ggml.ggml_backend_dev_buffer_type(dev), repack


CPU_BUFT, REPACK_BUFT = _buffer_types()


class Backend:
    """The CPU backend with a persistent thread pool (a pool per compute call would spawn threads for
    every layer of every token). ggml releases the GIL while it computes, so I/O threads overlap."""

    def __init__(self, n_threads: int):
        self.n_threads = n_threads
        self._backend = ggml.ggml_backend_cpu_init()
        params = ggml.ggml_threadpool_params_default(n_threads)
        self._pool = ggml.ggml_threadpool_new(ctypes.byref(params))
        ggml.ggml_backend_cpu_set_threadpool(self._backend, self._pool)
        ggml.ggml_backend_cpu_set_n_threads(self._backend, n_threads)

    def compute(self, graph) -> None:
        status = ggml.ggml_backend_graph_compute(self._backend, graph)
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")

    def close(self) -> None:
        if self._backend:
            ggml.ggml_backend_free(self._backend)
            ggml.ggml_threadpool_free(self._pool)
            self._backend = self._pool = None


class Buffer:
    """Host memory the engine allocates as a ggml backend buffer, plain or CPU_REPACK. Tensors placed
    in a repack buffer are converted to the interleaved layout when uploaded."""

    def __init__(self, size: int, repack: bool = False):
        buft = REPACK_BUFT if repack else CPU_BUFT
        if buft is None:
            raise RuntimeError("this ggml build has no CPU_REPACK buffer type")
        self.size = max(size, 1)
        self.repack = repack
        self._buf = ggml.ggml_backend_buft_alloc_buffer(buft, self.size + 4096)
        if not self._buf:
            raise MemoryError(f"cannot allocate a {self.size} byte buffer")
        raw = ggml.ggml_backend_buffer_get_base(self._buf)
        self.base = (raw + 4095) & ~4095  # page-aligned, so O_DIRECT can read straight into it
        self.handle = self._buf

    def clear(self) -> None:
        ggml.ggml_backend_buffer_clear(self._buf, 0)

    def free(self) -> None:
        if self._buf:
            ggml.ggml_backend_buffer_free(self._buf)
            self._buf = self.handle = None


X86_SETS = ("AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
            "AVX512_BF16", "AVX_VNNI")  # as llama.cpp's system info names them


def instruction_sets() -> tuple[str, ...]:
    """The x86 instruction sets this ggml was built to use (ggml_cpu_has_*), named as llama.cpp's
    system info names them: which kernels compute, and so how the last bits of a result round."""
    return tuple(n for n in X86_SETS if getattr(ggml, f"ggml_cpu_has_{n.lower()}")())


def memview(addr: int, nbytes: int) -> memoryview:
    """A writable memoryview over native memory, for os.preadv and numpy."""
    return memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")


def mlock(addr: int, nbytes: int) -> int:
    """Lock pages in RAM. Returns 0 or the errno (EPERM/ENOMEM when RLIMIT_MEMLOCK refuses)."""
    if _libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes)) == 0:
        return 0
    return ctypes.get_errno()


def munlock(addr: int, nbytes: int) -> None:
    _libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes))


PAGE = 4096
MADV_DONTNEED = 4


def trim_heap() -> None:
    """Return free heap memory to the OS (glibc's malloc_trim; nothing elsewhere). Building a
    tokenizer leaves ~4 MB of freed heap that would otherwise count as runtime in the plan."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def release_pages(addr: int, nbytes: int) -> None:
    """Give the whole pages of [addr, addr + nbytes) back to the OS (unlocking them first): the
    memory is uncharged at once and reads as zeros if ever touched again."""
    start = (addr + PAGE - 1) // PAGE * PAGE
    end = (addr + nbytes) // PAGE * PAGE
    if end > start:
        munlock(start, end - start)
        if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED):
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")


_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p)
_MREMAP_MAYMOVE, _MREMAP_FIXED, _MREMAP_DONTUNMAP = 1, 2, 4  # Linux values


def move_pages(src: int, dst: int, nbytes: int) -> bool:
    """Move the pages of [src, src + nbytes) to dst (both page-aligned, inside private anonymous
    mappings such as LazyMemory) without copying or faulting: the page table entries move, src is
    left mapped and empty (zeros when next touched) and dst's old pages are dropped. An expert cache
    hands an evicted expert's pages to the one it loads this way (experts.py): a page first touched
    costs 2-11 us on the virtual machines measured (4 KB; the host backs it), a move a few us for
    hundreds of pages. False (nothing moved) where the kernel refuses (before Linux 5.7, or
    mlocked pages): the caller writes into dst as it would have."""
    if src % PAGE or dst % PAGE or nbytes % PAGE or not nbytes:
        return False
    got = _libc.mremap(ctypes.c_void_p(src), nbytes, nbytes,
                       _MREMAP_MAYMOVE | _MREMAP_FIXED | _MREMAP_DONTUNMAP, ctypes.c_void_p(dst))
    return got not in (None, _MAP_FAILED) and got == dst


_MADV_POPULATE_WRITE = 23  # Linux 5.14


def populate(addr: int, nbytes: int) -> bool:
    """Fault in (and zero) the whole pages of [addr, addr + nbytes) in one call: 1.5 us a page
    here, against 2-11 us when each is first touched while ggml computes. False where the
    kernel lacks MADV_POPULATE_WRITE or cannot charge the memory (nothing is then promised)."""
    return _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), _MADV_POPULATE_WRITE) == 0


class LazyMemory:
    """Zeroed anonymous memory charged page by page as it is first written, never in huge pages (a
    2 MB page would charge a whole layer's KV cache at its first position). Not a ggml buffer:
    tensors point into it with no buffer, as the KV cache's do."""

    def __init__(self, size: int):
        self.size = max(size, 1)
        self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.base = ctypes.addressof(self._anchor)

    def free(self) -> None:
        if self._map is not None:
            del self._anchor
            self._map.close()
            self._map = None


_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10  # Linux values (mmap does not export them)
_PROT_NONE = 0


class Ring:
    """`size` bytes (whole pages) mapped twice, back to back, from one memfd: a piece placed near
    the end runs on into the second mapping, which is the start again, so the prefetcher lays
    pieces one after another with no gap (the "magic ring buffer"). Tensors placed here carry
    `handle`, a one-page CPU_REPACK buffer's when `repack`, so ggml repacks them on upload and uses
    the repacked kernels (it never checks a tensor's address against its buffer's). Where memfd or
    fixed mappings are refused, one plain mapping of size + `spare` bytes stands in and `wraps` is
    False: a piece that would cross the end starts over at 0 instead."""

    def __init__(self, size: int, spare: int, repack: bool):
        self.size = max(PAGE, (size + PAGE - 1) // PAGE * PAGE)
        self.repack = repack
        self._tag = Buffer(PAGE, repack=repack)  # only for its handle
        self.handle = self._tag.handle
        self._plain: LazyMemory | None = None
        self._base = None
        try:
            self.base = self._double_map()
            self.wraps = True
        except OSError:
            self._plain = LazyMemory(self.size + spare)
            self.base, self.wraps = self._plain.base, False

    def _double_map(self) -> int:
        fd = os.memfd_create("flexinfer-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.size)
            base = _libc.mmap(None, 2 * self.size, _PROT_NONE,
                              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            if base in (None, _MAP_FAILED):
                raise OSError(ctypes.get_errno(), "mmap of the ring's address range failed")
            self._base = base
            rw = mmap.PROT_READ | mmap.PROT_WRITE
            for at in (base, base + self.size):
                got = _libc.mmap(at, self.size, rw, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
                if got != at:
                    raise OSError(ctypes.get_errno(), "mmap of the ring's memfd failed")
            return base
        except OSError:
            self._unmap()
            raise
        finally:
            os.close(fd)

    def _unmap(self) -> None:
        if self._base is not None:
            _libc.munmap(self._base, 2 * self.size)
            self._base = None

    def free(self) -> None:
        self._unmap()
        if self._plain is not None:
            self._plain.free()
            self._plain = None
        self._tag.free()


_MAP_NORESERVE = 0x4000  # Linux
_MADV_NOHUGEPAGE = 15


class Arena:
    """Address space for every weight block's home (weights.py), reserved but not charged: a page
    is charged when a block is read into it and uncharged by release_pages. MAP_NORESERVE, so a
    model larger than RAM reserves its whole size; never huge pages, so reading one block never
    charges its neighbours'. Tensors placed here carry `handle` (a one-page CPU_REPACK buffer's
    when `repack`), as in the Ring."""

    def __init__(self, size: int, repack: bool):
        self.size = max(PAGE, (size + PAGE - 1) // PAGE * PAGE)
        self.repack = repack
        self._tag = Buffer(PAGE, repack=repack)
        self.handle = self._tag.handle
        base = _libc.mmap(None, self.size, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if base in (None, _MAP_FAILED):
            self._tag.free()
            raise MemoryError(f"cannot reserve {self.size} bytes of address space for weights")
        self.base = base
        _libc.madvise(ctypes.c_void_p(base), ctypes.c_size_t(self.size), _MADV_NOHUGEPAGE)

    def free(self) -> None:
        if self.base is not None:
            _libc.munmap(self.base, self.size)
            self.base = None
        self._tag.free()


def copy(dst: int, src: int, nbytes: int) -> None:
    ctypes.memmove(dst, src, nbytes)


class TensorTable:
    """A no_alloc context of tensor headers (weights, KV cache, inputs) whose data the engine sets."""

    def __init__(self, capacity: int):
        params = ggml.ggml_init_params(mem_size=ggml.ggml_tensor_overhead() * capacity,
                                       mem_buffer=None, no_alloc=True)
        self._ctx = ggml.ggml_init(params)

    def new(self, name: str, type_id: int, shape: tuple[int, ...]) -> Tensor:
        ne = (ctypes.c_int64 * len(shape))(*shape)
        t = ggml.ggml_new_tensor(self._ctx, type_id, len(shape), ne)
        ggml.ggml_set_name(t, name.encode()[:63])
        return t

    def free(self) -> None:
        if self._ctx:
            ggml.ggml_free(self._ctx)
            self._ctx = None


def nbytes(t: Tensor) -> int:
    return ggml.ggml_nbytes(t)


def place(t: Tensor, buf: Buffer, addr: int) -> bool:
    """Give tensor t the bytes at addr inside buf. Returns True when ggml will repack it on upload.

    The header is never cleared on the way: the prefetcher re-points headers while the main thread
    may be building a graph, and ggml's allocator would take a weight whose data is NULL for an
    intermediate and allocate it (seen as GGML_ASSERT(tensor->buffer == NULL) in CI). So instead of
    ggml_backend_tensor_alloc on the shared header, the `extra` pointer the repack buffer sets is
    probed once per type and shape on a private tensor, and the three fields are written directly."""
    c = t.contents
    extra = repack_traits(c.type, (c.ne[0], c.ne[1])) if buf.repack else None
    point(t, Placement(addr, buf.handle if extra else None, extra))
    return extra is not None


@dataclass
class Placement:
    """Where a tensor points; saved so streaming can re-point a tensor at a slot in one step."""

    data: int
    buffer: int | None
    extra: int | None


def placement(t: Tensor) -> Placement:
    c = t.contents
    return Placement(c.data, c.buffer, c.extra)


def point(t: Tensor, p: Placement) -> None:
    c = t.contents
    c.data, c.buffer, c.extra = p.data, p.buffer, p.extra


def upload(t: Tensor, src_addr: int, size: int) -> None:
    """Copy size bytes from src into t, converting to the repacked layout if t is in a repack buffer."""
    if t.contents.extra:
        ggml.ggml_backend_tensor_set(t, ctypes.c_void_p(src_addr), 0, size)
    else:
        ctypes.memmove(t.contents.data, src_addr, size)


def repack_rows(t: Tensor, buf: Buffer, headers: dict, dst: int, src: int, rows: int,
                step: int) -> None:
    """Convert `rows` rows of t's type and width from plain memory at src to the repacked layout at
    dst inside repack buffer `buf`. ggml converts whole tensors only, from one buffer into another,
    so the rows go in groups of `step`, each through the header `headers[(type, ne0, rows)]` for
    its size. The layout keeps every 8-row group in the bytes those rows had, so groups are
    independent."""
    c = t.contents
    rb = c.nb[1]
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        h = headers[(c.type, c.ne[0], n)]
        place(h, buf, dst + r0 * rb)
        ggml.ggml_backend_tensor_set(h, ctypes.c_void_p(src + r0 * rb), 0, n * rb)


def repack_in_place(t: Tensor, buf: Buffer, headers: dict, bounce: int, step: int) -> None:
    """Convert t, whose raw rows were read to where it points inside `buf`, where it lies: each
    group of `step` rows is copied to `bounce` and converted back (repack_rows)."""
    c = t.contents
    rb, rows = c.nb[1], c.ne[1] * c.ne[2] * c.ne[3]  # a 3-D expert tensor: all its experts' rows
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        at = c.data + r0 * rb
        ctypes.memmove(bounce, at, n * rb)
        repack_rows(t, buf, headers, at, bounce, n, step)


_TRAITS: dict[tuple, int | None] = {}


def repack_traits(type_id: int, shape: tuple[int, ...]) -> int | None:
    """The `extra` (repack traits) ggml's CPU_REPACK buffer gives a weight of this type and shape,
    None when it does not convert it. Probed once each on a private tensor (virtual memory only). A
    3-D expert tensor (ne0, ne1, E) gets a (ne0, ne1) matrix's (ggml looks at type and ne1; its
    ne1 * E rows are repacked as one run of 8-row groups, for the repacked mul_mat_id kernel)."""
    key = (type_id, *shape[:2])
    if REPACK_BUFT is None or len(key) != 3:
        return None
    if key not in _TRAITS:
        table = TensorTable(1)
        t = table.new("probe", type_id, key[1:])
        buf = Buffer(nbytes(t), repack=True)
        ggml.ggml_backend_tensor_alloc(buf.handle, t, buf.base)
        _TRAITS[key] = t.contents.extra or None
        buf.free()
        table.free()
    return _TRAITS[key]


def repacks(type_id: int, shape: tuple[int, ...]) -> bool:
    """Whether the CPU_REPACK buffer converts a weight of this type and shape."""
    return repack_traits(type_id, shape) is not None


def data_addr(t: Tensor) -> int:
    return t.contents.data or 0


def as_numpy(t: Tensor, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A copy of a tensor's contents (shape in numpy order)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(memview(t.contents.data, n), dtype=dtype).reshape(shape).copy()


class Ops:
    """Builds one graph in its own context. Method names follow ggml's ops."""

    def __init__(self, max_nodes: int = 256):
        size = (ggml.ggml_tensor_overhead() * max_nodes
                + ggml.ggml_graph_overhead_custom(max_nodes, False))
        self._ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=size, mem_buffer=None,
                                                         no_alloc=True))
        self.graph = ggml.ggml_new_graph_custom(self._ctx, max_nodes, False)

    def free(self) -> None:
        if self._ctx:
            ggml.ggml_free(self._ctx)
            self._ctx = self.graph = None

    def expand(self, t: Tensor) -> None:
        ggml.ggml_build_forward_expand(self.graph, t)

    def output(self, t: Tensor) -> Tensor:
        ggml.ggml_set_output(t)
        self.expand(t)
        return t

    def mul_mat(self, a, b):
        """a may be a tuple of row blocks (resident rows, streamed rows): their products are stacked
        along the output dimension; every output row is the same dot product as unsplit."""
        if not isinstance(a, tuple):
            return ggml.ggml_mul_mat(self._ctx, a, b)
        out = ggml.ggml_mul_mat(self._ctx, a[0], b)
        for part in a[1:]:
            out = ggml.ggml_concat(self._ctx, out, ggml.ggml_mul_mat(self._ctx, part, b), 0)
        return out

    def input(self, type_id: int, shape: tuple[int, ...], addr: int) -> Tensor:
        """A tensor over engine-owned memory (the allocator leaves tensors with data alone)."""
        ne = (ctypes.c_int64 * len(shape))(*shape)
        t = ggml.ggml_new_tensor(self._ctx, type_id, len(shape), ne)
        t.contents.data = addr
        return t

    def work_size(self, n_threads: int) -> int:
        """Scratch the CPU backend needs to compute this graph (quantized activations, FA rows)."""
        return ggml.ggml_graph_plan(self.graph, n_threads, None).work_size
    def add(self, a, b): return ggml.ggml_add(self._ctx, a, b)
    def mul(self, a, b): return ggml.ggml_mul(self._ctx, a, b)
    def scale(self, a, s: float): return ggml.ggml_scale(self._ctx, a, s)
    def rms_norm(self, a, eps: float): return ggml.ggml_rms_norm(self._ctx, a, eps)
    def swiglu(self, gate, up): return ggml.ggml_swiglu_split(self._ctx, gate, up)
    def get_rows(self, a, rows): return ggml.ggml_get_rows(self._ctx, a, rows)
    def set_rows(self, dst, src, rows): return ggml.ggml_set_rows(self._ctx, dst, src, rows)
    def cpy(self, a, b): return ggml.ggml_cpy(self._ctx, a, b)
    def cont(self, a): return ggml.ggml_cont(self._ctx, a)
    def concat(self, a, b, dim: int): return ggml.ggml_concat(self._ctx, a, b, dim)
    def reshape_2d(self, a, n0, n1): return ggml.ggml_reshape_2d(self._ctx, a, n0, n1)
    def reshape_3d(self, a, n0, n1, n2): return ggml.ggml_reshape_3d(self._ctx, a, n0, n1, n2)
    def permute(self, a, *axes): return ggml.ggml_permute(self._ctx, a, *axes)

    def view_2d(self, a, n0, n1, nb1, offset=0):
        return ggml.ggml_view_2d(self._ctx, a, n0, n1, nb1, offset)

    def view_3d(self, a, n0, n1, n2, nb1, nb2, offset=0):
        return ggml.ggml_view_3d(self._ctx, a, n0, n1, n2, nb1, nb2, offset)

    def rope(self, a, pos, n_rot: int, mode: int, n_ctx_orig: int, base: float, freq_scale: float,
             freq_factors=None, *, ext_factor: float = 0.0, attn_factor: float = 1.0,
             beta_fast: float = 32.0, beta_slow: float = 1.0):
        """ggml_rope_ext. freq_factors: None or an F32 (n_rot / 2,) tensor; pair i's angle is
        divided by freq_factors[i] (Llama 3.1's rope_freqs, phi3's LongRoPE factors). attn_factor
        multiplies cos and sin (llama.cpp's rope.scaling.attn_factor)."""
        return ggml.ggml_rope_ext(self._ctx, a, pos, freq_factors, n_rot, mode, n_ctx_orig, base,
                                  freq_scale, ext_factor, attn_factor, beta_fast, beta_slow)

    def swiglu_fused(self, a): return ggml.ggml_swiglu(self._ctx, a)  # silu(1st half) * 2nd half
    def geglu(self, gate, up): return ggml.ggml_geglu_split(self._ctx, gate, up)  # gelu(g) * up
    def tanh(self, a): return ggml.ggml_tanh(self._ctx, a)

    def flash_attn(self, q, k, v, mask, scale: float, sinks=None):
        """sinks: gpt-oss's (n_head,) F32 attention sink logits, one extra softmax term per head."""
        out = ggml.ggml_flash_attn_ext(self._ctx, q, k, v, mask, scale, 0.0, 0.0)
        if sinks is not None:
            ggml.ggml_flash_attn_ext_add_sinks(out, sinks)
        ggml.ggml_flash_attn_ext_set_prec(out, ggml.GGML_PREC_F32)
        return out
    def mul_mat_id(self, a, b, ids): return ggml.ggml_mul_mat_id(self._ctx, a, b, ids)  # moe.py
    def argsort_top_k(self, a, k: int): return ggml.ggml_argsort_top_k(self._ctx, a, k)
    def soft_max(self, a): return ggml.ggml_soft_max(self._ctx, a)
    def silu(self, a): return ggml.ggml_silu(self._ctx, a)
    def div(self, a, b): return ggml.ggml_div(self._ctx, a, b)
    def sum_rows(self, a): return ggml.ggml_sum_rows(self._ctx, a)
    def clamp(self, a, lo: float, hi: float): return ggml.ggml_clamp(self._ctx, a, lo, hi)
    # gpt-oss (models/gptoss.py): per-expert bias rows b[:, ids] added; the clamped swiglu
    def add_id(self, a, b, ids): return ggml.ggml_add_id(self._ctx, a, b, ids)
    def swiglu_oai(self, gate, up, alpha: float, limit: float):
        return ggml.ggml_swiglu_oai(self._ctx, gate, up, alpha, limit)


def row_stride(t: Tensor) -> int:
    return t.contents.nb[1]


def stride(t: Tensor, dim: int) -> int: return t.contents.nb[dim]  # bytes along dim
def ne(t: Tensor, dim: int) -> int: return t.contents.ne[dim]  # a cache's ne[1]: its cells
def type_of(t: Tensor) -> int: return t.contents.type
def row_size(type_id: int, n: int) -> int: return ggml.ggml_row_size(type_id, n)  # n elements


class Allocator:
    """Graph memory for intermediates. Reserved once for the worst case graph, so later graphs are
    placed in the same buffer and never move what earlier cached graphs point at."""

    def __init__(self):
        self._galloc = ggml.ggml_gallocr_new(CPU_BUFT)

    def reserve(self, ops: Ops) -> None:
        if not ggml.ggml_gallocr_reserve(self._galloc, ops.graph):
            raise MemoryError("cannot reserve the compute buffer")

    def alloc(self, ops: Ops) -> None:
        if not ggml.ggml_gallocr_alloc_graph(self._galloc, ops.graph):
            raise MemoryError("cannot allocate the compute graph")

    def size(self) -> int:
        return ggml.ggml_gallocr_get_buffer_size(self._galloc, 0)

    def free(self) -> None:
        if self._galloc:
            ggml.ggml_gallocr_free(self._galloc)
            self._galloc = None
