"""CPU fast path: plain C kernels (one call per pass over all chains) loaded with ctypes.

Why C through ctypes: at attention sizes (S = 2, T ≤ a few hundred, B ≤ a few hundred) the work of one pass is a
few hundred thousand flops, far below the cost of the ≈10 tensor-op launches × T steps of the reference path.
A ~200-line C file compiles with the system C compiler in well under a second and needs no Python headers, no
torch headers and no build system (torch.utils.cpp_extension takes ~1 min). The shared object is cached per user
under ``$XDG_CACHE_HOME/structattn/kernels`` (default ``~/.cache``), keyed by a hash of source, flags and
compiler; ``STRUCTATTN_KERNEL_CACHE`` overrides the folder. If no compiler works, :func:`available` returns
False, a one-time warning says why, and :mod:`structattn.ops.viterbi` uses the reference path. :class:`CLibrary`
does this compile / cache / load / warn for every C kernel of the package (the other kernel modules call it).

All functions take contiguous float32/float64 CPU tensors and return new tensors; they do not validate (the
public functions in :mod:`structattn.ops.viterbi` do).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import torch
from torch import Tensor

from ...fileio import atomic_path
from ._cpu_source import CHAINS_PER_BLOCK, source

__all__ = ["CLibrary", "c_library", "available", "unavailable_reason", "load", "forward", "marginals", "backward", "hvp",
           "segment_forward", "segment_backward", "segment_workspace", "library_path"]

_CFLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-pthread", "-fno-math-errno",
           "-Werror=implicit-function-declaration"]
# Honour the `#pragma omp simd` loops (vectorised across chains) without OpenMP's runtime; a compiler that does not
# know the flag gets a second try without it (same code, scalar loops).
_SIMD_FLAGS = ["-fopenmp-simd"]


def _cache_dir() -> str:
    override = os.environ.get("STRUCTATTN_KERNEL_CACHE")
    if override:
        return override
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "structattn", "kernels")


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


class CLibrary:
    """One C library of the package: compiled on first use, cached on disk, loaded with ctypes, once per process.

    Every C kernel (Viterbi and segmentation here, DTW in :mod:`.cpu_dtw`, the proxes in :mod:`.cpu_prox`, SparseMAP
    in :mod:`.cpu_sparsemap`) is one of these; they differ only in what the arguments say.

    Args:
        prefix: the file names: ``<prefix>_<hash>.so`` in the cache folder, ``<prefix>.c`` for the compiler.
        what: the kernel's name in messages ("the C <what> kernel is unavailable …").
        source: zero-argument callable returning the C source.
        cflags: zero-argument callable returning (the flags always passed, the extra-flag sets tried in order until
            one compiles). Called at build time, so a test can swap a module's flags. The cache key hashes the
            always-passed flags with the first extra set (the preferred build).
        timeout: seconds one compiler run may take (only a guard against a hung compiler).
        declare: ``declare(lib)`` sets the ctypes argtypes/restypes of the library's functions.
        fallback: what is used instead, for the warning ("the slower reference path").
        hint: appended to the warning (how to enable the kernel), or "".

    :meth:`load` returns the library, or None — after one RuntimeWarning per process that says why — when no
    compiler works; the reason stays in :attr:`error`. A cached file that does not load (corrupt, foreign) is rebuilt once.
    """

    def __init__(self, prefix: str, what: str, source, cflags, timeout: float, declare, fallback: str,
                 hint: str = "") -> None:
        self.prefix, self.what, self._source, self._cflags = prefix, what, source, cflags
        self.timeout, self._declare, self.fallback, self.hint = timeout, declare, fallback, hint
        self._lock = threading.Lock()
        self.lib = None
        self.error: str | None = None
        self._warned = False

    def path(self) -> str | None:
        """Where the compiled library is (or would be) cached; None if there is no C compiler."""
        cc = _compiler()
        if cc is None:
            return None
        base, extras = self._cflags()
        key = hashlib.sha256(
            "\0".join([self._source(), " ".join([*base, *extras[0]]), cc, platform.machine(), sys.platform]).encode()
        ).hexdigest()[:16]
        return os.path.join(_cache_dir(), f"{self.prefix}_{key}.so")

    def _compile(self, path: str, cc: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        base, extras = self._cflags()
        # The source in a private temp dir, the library under a temporary name then renamed (structattn.fileio):
        # concurrent processes (several workers, pytest -n) never see a half-written library.
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp, atomic_path(path) as out:
            src = os.path.join(tmp, f"{self.prefix}.c")
            with open(src, "w") as f:
                f.write(self._source())
            for extra in extras:
                proc = subprocess.run([cc, *base, *extra, src, "-o", out, "-lm"], capture_output=True, text=True,
                                      timeout=self.timeout)
                if proc.returncode == 0:
                    break
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[:2000]}")

    def load(self, stacklevel: int = 3):
        """Compile (first use only) and load the library. Returns it, or None (with a one-time warning) if that is
        impossible. ``stacklevel`` as for :func:`warnings.warn`, counted from this method."""
        if self.lib is not None or self.error is not None:
            return self.lib
        with self._lock:
            if self.lib is not None or self.error is not None:
                return self.lib
            try:
                path = self.path()
                if path is None:
                    raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
                if not os.path.exists(path):
                    self._compile(path, _compiler())
                try:
                    lib = ctypes.CDLL(path)
                except OSError:
                    # A corrupt or foreign cached file: rebuild once.
                    os.remove(path)
                    self._compile(path, _compiler())
                    lib = ctypes.CDLL(path)
                self._declare(lib)
                self.lib = lib
            except Exception as exc:  # noqa: BLE001 - any failure means: use the reference path
                self.error = f"{type(exc).__name__}: {exc}"
        if self.lib is None and not self._warned:
            self._warned = True
            warnings.warn(f"structattn: the C {self.what} kernel is unavailable ({self.error}); using "
                          f"{self.fallback}.{' ' + self.hint if self.hint else ''}", RuntimeWarning,
                          stacklevel=stacklevel)
        return self.lib

    def available(self) -> bool:
        return self.load(stacklevel=4) is not None

    def unavailable_reason(self) -> str | None:
        self.load(stacklevel=4)
        return self.error

    def require(self, stacklevel: int = 3):
        """The loaded library, or RuntimeError("the C <what> kernel is unavailable: <why>") — for a caller that has
        no fallback at that point. ``stacklevel`` as for :meth:`load`'s warning, counted from this method."""
        lib = self.load(stacklevel=stacklevel + 1)
        if lib is None:
            raise RuntimeError(f"the C {self.what} kernel is unavailable: {self.error}")
        return lib

    def function(self, name: str, dtype: torch.dtype, check_dtype: bool = True):
        """The library's ``<name>_f32`` or ``<name>_f64`` for ``dtype``: RuntimeError if the library is unavailable
        (:meth:`require`), TypeError for another dtype (unless not ``check_dtype``: then float64 for anything but
        float32)."""
        lib = self.require(stacklevel=4)
        if dtype == torch.float32:
            return getattr(lib, f"{name}_f32")
        if dtype == torch.float64 or not check_dtype:
            return getattr(lib, f"{name}_f64")
        raise TypeError(f"the C {self.what} kernel supports float32 and float64, got {dtype}")


_LIBRARIES: dict[str, CLibrary] = {}
_LIBRARIES_LOCK = threading.Lock()


def c_library(prefix: str, *args, **kwargs) -> CLibrary:
    """The one :class:`CLibrary` of this process named ``prefix``, created from the arguments on first call (later
    calls return it unchanged): for a module that builds its loader on first use."""
    with _LIBRARIES_LOCK:
        lib = _LIBRARIES.get(prefix)
        if lib is None:
            lib = _LIBRARIES[prefix] = CLibrary(prefix, *args, **kwargs)
        return lib


def _flag_sets():
    # Fallbacks for older compilers: without the per-ISA clones of the vectorised loops (GCC's target_clones), then
    # without -fopenmp-simd too (same code, scalar loops). Read at build time: tests swap _SIMD_FLAGS.
    return _CFLAGS, (_SIMD_FLAGS, [*_SIMD_FLAGS, "-DSTRUCTATTN_NO_CLONES"], ["-DSTRUCTATTN_NO_CLONES"])


def _declare(lib) -> None:
    i64, ptr, c_int, c_double = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    for sfx in ("f32", "f64"):
        getattr(lib, f"vit_forward_{sfx}").argtypes = [i64, i64, i64, ptr, ptr, c_int, c_double, ptr, ptr, ptr]
        getattr(lib, f"vit_backward_{sfx}").argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr]
        getattr(lib, f"vit_marginals_{sfx}").argtypes = [i64, i64, i64, ptr, ptr, c_int, c_double] + [ptr] * 5
        getattr(lib, f"vit_hvp_{sfx}").argtypes = [i64, i64, i64] + [ptr] * 5 + [c_int, c_double, ptr, ptr]
        for name in ("forward", "backward", "marginals", "hvp"):
            getattr(lib, f"vit_{name}_{sfx}").restype = None
        getattr(lib, f"seg_forward_{sfx}").argtypes = [i64, i64, ptr, ptr, ptr, i64, i64, c_int, c_int, c_double,
                                                       c_int] + [ptr] * 9
        getattr(lib, f"seg_backward_{sfx}").argtypes = [i64, i64] + [ptr] * 9 + [i64, i64, c_int, c_int, c_double,
                                                                                 c_int, ptr, ptr]
        getattr(lib, f"seg_forward_{sfx}").restype = c_int
        getattr(lib, f"seg_backward_{sfx}").restype = c_int


_LIB = c_library("viterbi", "Viterbi", source, _flag_sets, 120, _declare, "the slower reference path",
                "Install a C compiler (gcc) or set CC to enable it.")


def library_path() -> str | None:
    """Where the compiled library is (or would be) cached; None if there is no C compiler."""
    return _LIB.path()


def load():
    """Compile (first use only) and load the library. Returns it, or None (with a one-time warning) if that is
    impossible."""
    return _LIB.load(stacklevel=4)


def available() -> bool:
    """True if the C kernels are compiled and loaded (compiling them on first call)."""
    return _LIB.load() is not None


def unavailable_reason() -> str | None:
    _LIB.load()
    return _LIB.error


def _fn(name: str, dtype: torch.dtype, prefix: str = "vit"):
    return _LIB.function(f"{prefix}_{name}", dtype)


def _p(x: Tensor | None):
    return None if x is None else x.data_ptr()


def _lens(lengths: Tensor | None) -> Tensor | None:
    return None if lengths is None else lengths.to(device="cpu", dtype=torch.int64).contiguous()


def forward(theta: Tensor, lengths: Tensor | None, reg: str, gamma: float):
    """Alg. 3 forward: (value (B,), Q (B,T,S,S), r (B,S))."""
    theta = theta.contiguous()
    B, T, S, _ = theta.shape
    lens = _lens(lengths)
    value = theta.new_empty(B)
    Q = theta.new_empty(B, T, S, S)
    r = theta.new_empty(B, S)
    _fn("forward", theta.dtype)(B, T, S, _p(theta), _p(lens), int(reg == "l2"), gamma, _p(value), _p(Q), _p(r))
    return value, Q, r


def backward(Q: Tensor, r: Tensor, lengths: Tensor | None):
    """Alg. 3 backward: (E (B,T,S,S), U (B,T,S))."""
    Q, r = Q.contiguous(), r.contiguous()
    B, T, S, _ = Q.shape
    lens = _lens(lengths)
    E = torch.empty_like(Q)
    U = Q.new_empty(B, T, S)
    _fn("backward", Q.dtype)(B, T, S, _p(Q), _p(r), _p(lens), _p(E), _p(U))
    return E, U


def marginals(theta: Tensor, lengths: Tensor | None, reg: str, gamma: float):
    """Alg. 3 forward + backward in one call: (value, Q, r, E, U)."""
    theta = theta.contiguous()
    B, T, S, _ = theta.shape
    lens = _lens(lengths)
    value = theta.new_empty(B)
    Q = theta.new_empty(B, T, S, S)
    r = theta.new_empty(B, S)
    E = theta.new_empty(B, T, S, S)
    U = theta.new_empty(B, T, S)
    _fn("marginals", theta.dtype)(
        B, T, S, _p(theta), _p(lens), int(reg == "l2"), gamma, _p(value), _p(Q), _p(r), _p(E), _p(U)
    )
    return value, Q, r, E, U


def hvp(Q: Tensor, U: Tensor, r: Tensor, Z: Tensor, lengths: Tensor | None, reg: str, gamma: float):
    """Alg. 4: (⟨E, Z⟩ (B,), Ė = ∇²Vit_Ω(θ)·Z (B,T,S,S)) from the saved forward/backward quantities."""
    Q, U, r = Q.contiguous(), U.contiguous(), r.contiguous()
    Z = Z.to(Q.dtype).contiguous()
    B, T, S, _ = Q.shape
    lens = _lens(lengths)
    dot = Q.new_empty(B)
    E_dot = torch.empty_like(Q)
    _fn("hvp", Q.dtype)(
        B, T, S, _p(Q), _p(U), _p(r), _p(Z), _p(lens), int(reg == "l2"), gamma, _p(dot), _p(E_dot)
    )
    return dot, E_dot


# ---- fused segmentation attention (structattn.ops.segmentation) -------------------------------------------------
# What the forward saves for the backward lives in two flat buffers, a real one (Q, U, r, tot) and an int32 one (idx,
# len), passed to C as pointers at offsets: at attention sizes every tensor allocated or viewed per call costs ~1 µs.


def segment_workspace(N: int, T: int) -> tuple[int, int]:
    """Sizes (reals, int32s) of the two buffers that :func:`segment_forward` returns for N rows of T positions."""
    nblk = -(-N // CHAINS_PER_BLOCK)
    return nblk * CHAINS_PER_BLOCK * (6 * T + 2) + N, N * (T + 1)


def _segment_pointers(ws: Tensor, iws: Tensor, N: int, T: int):
    """(Q, U, r, tot, idx, len) as addresses into the buffers (layouts in ``_cpu_segment_source``)."""
    nblk = -(-N // CHAINS_PER_BLOCK)
    q, u, r, tot = 0, nblk * CHAINS_PER_BLOCK * 4 * T, nblk * CHAINS_PER_BLOCK * 6 * T, \
        nblk * CHAINS_PER_BLOCK * (6 * T + 2)
    base, size, ibase = ws.data_ptr(), ws.element_size(), iws.data_ptr()
    return base + q * size, base + u * size, base + r * size, base + tot * size, ibase, ibase + 4 * N * T


def segment_forward(scores: Tensor, mask: Tensor | None, trans: Tensor, tdiv: int, centre: bool, reg: str,
                    gamma: float, nthreads: int = 1):
    """Weights and marginals of the segmentation attention of every row of ``scores`` (N, T), in one call.

    ``scores`` contiguous float32/float64; ``mask`` (N, T) contiguous bool (True at padding) or None; ``trans``
    (2, 2) or (M, 2, 2) contiguous, of the scores' dtype: row b uses ``trans[(b // tdiv) % M]``. Returns (number of rows with a
    non-finite real score or transition, (w, p, flags, ws, iws)): the weights and marginals (N, T), the rows' flags
    (N,) int32 (1: has a real position, 2: dead, 4: frozen) and the two buffers that :func:`segment_backward`
    needs."""
    N, T = scores.shape
    n_real, n_int = segment_workspace(N, T)
    w, p, ws = scores.new_empty(N, T), scores.new_empty(N, T), scores.new_empty(n_real)
    iws, flags = torch.empty(n_int, dtype=torch.int32), torch.empty(N, dtype=torch.int32)
    bad = _fn("forward", scores.dtype, "seg")(
        N, T, scores.data_ptr(), _p(mask), trans.data_ptr(), tdiv, 1 if trans.dim() == 2 else trans.shape[0],
        int(centre), int(reg == "l2"),
        gamma, nthreads, w.data_ptr(), p.data_ptr(), flags.data_ptr(), *_segment_pointers(ws, iws, N, T))
    if bad < 0:
        raise MemoryError("the fused segmentation kernel could not allocate its workspace")
    return bad, (w, p, flags, ws, iws)


def segment_backward(gw: Tensor, gp: Tensor | None, w: Tensor, ws: Tensor, iws: Tensor, M: int, tdiv: int,
                     centre: bool, reg: str, gamma: float, nthreads: int = 1):
    """(∂L/∂s (N, T), ∂L/∂T (M, 2, 2)) from ∂L/∂w, ∂L/∂p (or None; both contiguous, of w's dtype) and what
    :func:`segment_forward` returned. M = 0: one matrix shared by the rows, ∂L/∂T of shape (2, 2)."""
    N, T = w.shape
    gs, gT = torch.empty_like(w), (w.new_empty(M, 2, 2) if M else w.new_empty(2, 2))
    rc = _fn("backward", w.dtype, "seg")(
        N, T, gw.data_ptr(), _p(gp), w.data_ptr(), *_segment_pointers(ws, iws, N, T), tdiv, max(M, 1), int(centre),
        int(reg == "l2"), gamma, nthreads, gs.data_ptr(), gT.data_ptr())
    if rc < 0:
        raise MemoryError("the fused segmentation kernel could not allocate its workspace")
    return gs, gT
