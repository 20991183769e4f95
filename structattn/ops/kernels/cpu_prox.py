"""CPU fast path of fusedmax / oscarmax / 1.5-entmax: the C kernels of ``_cpu_prox_source`` loaded with ctypes.

Compiled and cached exactly like the Viterbi kernels (:mod:`.cpu`: the system C compiler, a per-user cache keyed by a
hash of source, flags and compiler, atomic install), as a separate small library so that neither invalidates the
other's cache. Both proxes are sequential within a row (Condat's TV algorithm, pool adjacent violators): in tensor
operations they would be a Python loop over positions. If no compiler works, :func:`available` is False, a one-time
warning says why, and :mod:`structattn.ops.structured_sparsemax` runs its plain-Python reference instead.

The functions take contiguous float32/float64 CPU tensors and do not validate (the public functions do).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import cpu as _cpu
from ._cpu_prox_source import source

__all__ = ["available", "unavailable_reason", "load", "library_path", "forward", "backward", "entmax15_forward",
           "entmax15_backward", "TV", "FUSEDMAX", "OSCARMAX"]

#: Kinds of :func:`forward`: the TV prox alone, sparsemax ∘ prox_TV, the exact OSCAR argmin over the simplex.
TV, FUSEDMAX, OSCARMAX = 0, 1, 2

# -fno-trapping-math: lets the compiler turn `d > t ? w : 0` into a vectorised select (it would otherwise keep the
# branch, in case computing the unused side raised a floating-point exception that no one reads); the arithmetic and
# its rounding are unchanged.
_CFLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
           "-Werror=implicit-function-declaration"]


def _declare(lib) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for sfx in ("f32", "f64"):
        f = getattr(lib, f"psm_forward_{sfx}")
        f.argtypes, f.restype = [i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_double, ptr, ptr], i64
        f = getattr(lib, f"psm_backward_{sfx}")
        f.argtypes, f.restype = [i64, i64, ptr, ptr, ptr, ctypes.c_int, ptr], ctypes.c_int
        f = getattr(lib, f"entmax15_forward_{sfx}")
        f.argtypes, f.restype = [i64, i64, ptr, ptr, ptr], i64
        f = getattr(lib, f"entmax15_backward_{sfx}")
        f.argtypes, f.restype = [i64, i64, ptr, ptr, ptr], None


# The one loader of the package's C kernels (cpu.CLibrary: lock, compile if missing, rebuild once if corrupt, warn
# once). One function has an AVX2 clone (the rank sort's count); a compiler that refuses target_clones gets a second
# try without it.
_LIB = _cpu.c_library("prox", "fusedmax/oscarmax", source, lambda: (_CFLAGS, ([], ["-DSTRUCTATTN_NO_CLONES"])), 120,
                      _declare, "the slow plain-Python reference", "Install a C compiler (gcc) or set CC to enable it.")


def library_path() -> str | None:
    """Where the compiled library is (or would be) cached; None if there is no C compiler."""
    return _LIB.path()


def load():
    """Compile (first use only) and load the library; None (with a one-time warning) if impossible."""
    return _LIB.load(stacklevel=4)


def available() -> bool:
    """True if the C kernels are compiled and loaded (compiling them on first call)."""
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _LIB.error


_fns: dict = {}  # (name, dtype) -> the ctypes function: a dict hit instead of CLibrary.function on every call


def _fn(name: str, dtype: torch.dtype):
    f = _fns.get((name, dtype))
    if f is None:
        f = _fns[(name, dtype)] = _LIB.function(name, dtype, check_dtype=False)
    return f


def forward(x: Tensor, mask: Tensor | None, kind: int, lam: float) -> tuple[int, Tensor, Tensor]:
    """(number of rows with a non-finite real entry, P (N, T), groups (N, T) int32) for ``x`` (N, T) contiguous,
    ``mask`` (N, T) contiguous bool (True at padding) or None."""
    N, T = x.shape
    P, G = torch.empty_like(x), torch.empty(N, T, dtype=torch.int32)
    bad = _fn("psm_forward", x.dtype)(N, T, x.data_ptr(), None if mask is None else mask.data_ptr(), kind, lam,
                                  P.data_ptr(), G.data_ptr())
    if bad < 0:
        raise MemoryError("the fusedmax/oscarmax kernel could not allocate its workspace")
    return bad, P, G


def backward(g: Tensor, P: Tensor, G: Tensor, sparse: bool) -> Tensor:
    """∂L/∂x (N, T) from ∂L/∂P (contiguous, of P's dtype), P and the groups; ``sparse``: P is a sparsemax output
    (kinds 1, 2), so its Jacobian comes first."""
    N, T = P.shape
    out = torch.empty_like(P)
    if _fn("psm_backward", P.dtype)(N, T, g.data_ptr(), P.data_ptr(), G.data_ptr(), int(sparse), out.data_ptr()) < 0:
        raise MemoryError("the fusedmax/oscarmax kernel could not allocate its workspace")
    return out


def entmax15_forward(x: Tensor, mask: Tensor | None) -> tuple[int, Tensor]:
    """(number of rows with a NaN/+inf real entry or no finite one — their real outputs are NaN —, P (N, T)): 1.5-entmax
    of each row of ``x`` (N, T) contiguous over its real positions (``mask`` (N, T) contiguous bool, True at padding,
    or None); −inf entries get weight 0."""
    N, T = x.shape
    P = torch.empty_like(x)
    bad = _fn("entmax15_forward", x.dtype)(N, T, x.data_ptr(), None if mask is None else mask.data_ptr(), P.data_ptr())
    if bad < 0:
        raise MemoryError("the entmax15 kernel could not allocate its workspace")
    return bad, P


def entmax15_backward(g: Tensor, P: Tensor) -> Tensor:
    """∂L/∂x = g ⊙ s − (⟨g, s⟩ / Σ s)·s, s = √P, per row; ``g`` contiguous, of P's dtype."""
    N, T = P.shape
    out = torch.empty_like(P)
    _fn("entmax15_backward", P.dtype)(N, T, g.data_ptr(), P.data_ptr(), out.data_ptr())
    return out
