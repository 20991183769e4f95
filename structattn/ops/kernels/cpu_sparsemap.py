"""CPU fast path of the SparseMAP segmentation attention: the C active-set solver of ``_cpu_sparsemap_source``.

Compiled, cached and loaded by the package's one C loader (:class:`.cpu.CLibrary`: the system C compiler, a per-user
cache keyed by a hash of source, flags and compiler, atomic install, one rebuild of a corrupt cached file), as its own
small library ``sparsemap_<hash>.so``. If no compiler works, :func:`available` is False, a one-time warning says why,
and :mod:`structattn.ops.sparsemap` runs its tensor solver instead (the reference; both return the same structures).

The functions take CPU tensors and do not validate (:func:`structattn.ops.sparsemap.sparsemap_chain`'s callers do);
the solver works in float64.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import cpu as _cpu
from ._cpu_sparsemap_source import source

__all__ = ["available", "unavailable_reason", "load", "library_path", "forward", "backward"]

# No vectorised loops here (the work is a data-dependent loop per row): the Viterbi kernels' base flags only.
_CFLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-fno-math-errno", "-Werror=implicit-function-declaration"]


def _declare(lib) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sm_forward.argtypes = [i64, i64, i64, ptr, ptr, i64, ptr, ctypes.c_double, i64] + [ptr] * 6
    lib.sm_forward.restype = ctypes.c_int
    lib.sm_backward.argtypes = [i64, i64, i64] + [ptr] * 7
    lib.sm_backward.restype = ctypes.c_int


_LIB = _cpu.c_library("sparsemap", "SparseMAP", source, lambda: (_CFLAGS, ([],)), 120, _declare,
                      "the slower tensor solver", "Install a C compiler (gcc) or set CC to enable it.")


def library_path() -> str | None:
    """Where the compiled library is (or would be) cached; None if there is no C compiler."""
    return _LIB.path()


def load():
    """Compile (first use only) and load the library; None (with a one-time warning) if impossible."""
    return _LIB.load(stacklevel=4)


def available() -> bool:
    """True if the C solver is compiled and loaded (compiling it on first call)."""
    return _LIB.load() is not None


def unavailable_reason() -> str | None:
    _LIB.load()
    return _LIB.error


def _lib():
    return _LIB.require(stacklevel=5)


def _lens(lengths: Tensor) -> Tensor:
    return lengths.to(device="cpu", dtype=torch.int64).contiguous()


def forward(s: Tensor, trans: Tensor, lengths: Tensor, tol: float, max_iter: int, K: int):
    """(α (N, K) float64, Y (N, K, T) bool, Y0 (N, K) bool, iterations (N,) int32, converged (N,) bool, p (N, T)
    float64) of compacted rows: ``s`` (N, T) float64 (0 on padding), ``trans`` (2, 2) or (N, 2, 2) float64,
    ``lengths`` (N,); K slots (the tensor solver's ``_slots``). Slots sorted by decreasing α, as the tensor solver."""
    s = s.to(torch.float64).contiguous()
    trans = trans.to(torch.float64).contiguous()
    lens = _lens(lengths)
    N, T = s.shape
    alpha = s.new_empty(N, K)
    Y = torch.empty(N, K, T, dtype=torch.bool)
    Y0 = torch.empty(N, K, dtype=torch.bool)
    p = s.new_empty(N, T)
    iters = torch.empty(N, dtype=torch.int32)
    conv = torch.empty(N, dtype=torch.bool)
    rc = _lib().sm_forward(N, T, K, s.data_ptr(), trans.data_ptr(), 0 if trans.dim() == 2 else 4, lens.data_ptr(),
                           float(tol), int(max_iter), alpha.data_ptr(), Y.data_ptr(), Y0.data_ptr(), p.data_ptr(),
                           iters.data_ptr(), conv.data_ptr())
    if rc < 0:
        raise MemoryError("the C SparseMAP kernel could not allocate its workspace")
    return alpha, Y, Y0, iters, conv, p


def backward(gp: Tensor, Y: Tensor, Y0: Tensor, alpha: Tensor, lengths: Tensor):
    """(∂L/∂s (N, T) float64, ∂L/∂T per row (N, 2, 2) float64) from ∂L/∂p and the forward's outputs, or None when a
    support's Gram matrix is not numerically positive definite (the caller then runs the tensor backward)."""
    gp = gp.to(torch.float64).contiguous()
    Y, Y0, alpha = Y.contiguous(), Y0.contiguous(), alpha.to(torch.float64).contiguous()
    lens = _lens(lengths)  # held in a name: a temporary's memory would be freed before the C call reads it
    N, K, T = Y.shape
    gs, gT = gp.new_empty(N, T), gp.new_empty(N, 2, 2)
    rc = _lib().sm_backward(N, T, K, gp.data_ptr(), Y.data_ptr(), Y0.data_ptr(), alpha.data_ptr(),
                            lens.data_ptr(), gs.data_ptr(), gT.data_ptr())
    if rc == -1:
        raise MemoryError("the C SparseMAP kernel could not allocate its workspace")
    return None if rc < 0 else (gs, gT)
