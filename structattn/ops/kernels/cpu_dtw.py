"""CPU DTW_Ω backend (``op="dtw"``, name ``"cpu"``): the C kernels of :mod:`._cpu_dtw_source` through ctypes.

Compiled, cached and loaded by the Viterbi C kernels' loader (:class:`.cpu.CLibrary`: same compiler search, flags,
cache folder and fallbacks, a separate library file ``dtw_<hash>.so``). The forward (Alg. 5) saves the values W by
anti-diagonals, (B, N·M + 2(N + M − 1) + 6): one number per cell and two guards per diagonal; the backward (Alg. 5)
and the Hessian product (Alg. 6) recompute the weights q (and q̇) from W diagonal by diagonal. :func:`marginals` runs
both sweeps in one call, pair by pair; for pairs up to 256 × 256 cells its forward also keeps the pair's q (3 numbers
per cell, one pair at a time) for its backward sweep, three exponentials per cell fewer.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import cpu as _vcpu
from ._cpu_dtw_source import source

__all__ = ["available", "unavailable_reason", "forward", "backward", "marginals", "hvp", "library_path"]


def _flag_sets():
    # The Viterbi kernels' flags and fallbacks, read at build time (tests swap cpu._SIMD_FLAGS).
    return _vcpu._flag_sets()


def _declare(lib) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for sfx in ("f32", "f64"):
        f = getattr(lib, f"dtw_forward_{sfx}")
        f.argtypes = [i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_double, ptr, ptr]
        f.restype = ctypes.c_int
        f = getattr(lib, f"dtw_backward_{sfx}")
        f.argtypes = [i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_double, ptr]
        f.restype = ctypes.c_int
        f = getattr(lib, f"dtw_marginals_{sfx}")
        f.argtypes = [i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_double, ptr, ptr, ptr]
        f.restype = ctypes.c_int
        f = getattr(lib, f"dtw_hvp_{sfx}")
        f.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int, ctypes.c_double, ptr, ptr]
        f.restype = ctypes.c_int


# One translation unit, two types × three target clones: over two minutes on a loaded 2-core machine (measured 130 s
# at load 9); the 600 s limit only guards against a hung compiler.
_LIB = _vcpu.c_library("dtw", "DTW", source, _flag_sets, 600, _declare, "the slower reference path")


def library_path() -> str | None:
    return _LIB.path()


def _load():
    return _LIB.load(stacklevel=4)


def available() -> bool:
    return _LIB.load() is not None


def unavailable_reason() -> str | None:
    _LIB.load()
    return _LIB.error


def _fn(name: str, dtype: torch.dtype):
    return _LIB.function(f"dtw_{name}", dtype)


def _lens(x: Tensor) -> Tensor:
    if x.dtype == torch.int64 and x.device.type == "cpu" and x.is_contiguous():
        return x  # the usual case (structattn.ops.dtw checked them): no conversion ops on the small-pair path
    return x.to(device="cpu", dtype=torch.int64).contiguous()


def forward(theta: Tensor, lx: Tensor, ly: Tensor, reg: str, gamma: float):
    """Alg. 5 forward: (value (B,), W (B, N·M + 2(N + M − 1) + 6): the values by diagonals, see _cpu_dtw_source)."""
    theta = theta.contiguous()
    B, N, M = theta.shape
    lx, ly = _lens(lx), _lens(ly)
    value = theta.new_empty(B)
    W = theta.new_empty(B, N * M + 2 * (N + M - 1) + 6)
    rc = _fn("forward", theta.dtype)(B, N, M, theta.data_ptr(), lx.data_ptr(), ly.data_ptr(), int(reg == "l2"),
                                     gamma, value.data_ptr(), W.data_ptr())
    if rc < 0:
        raise MemoryError("the C DTW kernel could not allocate its workspace")
    return value, W


def backward(theta: Tensor, W: Tensor, lx: Tensor, ly: Tensor, reg: str, gamma: float) -> Tensor:
    """Alg. 5 backward sweep from the forward's W: E (B, N, M), zero on padding."""
    B, N, M = theta.shape
    lx, ly = _lens(lx), _lens(ly)
    E = W.new_empty(B, N, M)  # the kernel writes every cell, padding included
    rc = _fn("backward", W.dtype)(B, N, M, W.contiguous().data_ptr(), lx.data_ptr(), ly.data_ptr(),
                                  int(reg == "l2"), gamma, E.data_ptr())
    if rc < 0:
        raise MemoryError("the C DTW kernel could not allocate its workspace")
    return E


def marginals(theta: Tensor, lx: Tensor, ly: Tensor, reg: str, gamma: float):
    """Alg. 5 forward + backward in one call, pair by pair (a pair's W is still in cache for its backward sweep):
    (value, W, E)."""
    theta = theta.contiguous()
    B, N, M = theta.shape
    lx, ly = _lens(lx), _lens(ly)
    value = theta.new_empty(B)
    W = theta.new_empty(B, N * M + 2 * (N + M - 1) + 6)
    E = theta.new_empty(B, N, M)  # the kernel writes every cell, padding included
    rc = _fn("marginals", theta.dtype)(B, N, M, theta.data_ptr(), lx.data_ptr(), ly.data_ptr(), int(reg == "l2"),
                                       gamma, value.data_ptr(), W.data_ptr(), E.data_ptr())
    if rc < 0:
        raise MemoryError("the C DTW kernel could not allocate its workspace")
    return value, W, E


def hvp(theta: Tensor, W: Tensor, E: Tensor, Z: Tensor, lx: Tensor, ly: Tensor, reg: str, gamma: float):
    """Alg. 6 from the forward's W: (⟨E, Z⟩ (B,), Ė (B, N, M), zero on padding). E is recomputed in the same
    reverse sweep as Ė (cheaper than reading it back skewed), so the ``E`` argument is not used."""
    B, N, M = theta.shape
    lx, ly = _lens(lx), _lens(ly)
    Z = Z.to(W.dtype).contiguous()
    dot = W.new_empty(B)
    E_dot = W.new_empty(B, N, M)  # the kernel writes every cell, padding included
    rc = _fn("hvp", W.dtype)(B, N, M, W.contiguous().data_ptr(), Z.data_ptr(), lx.data_ptr(), ly.data_ptr(),
                             int(reg == "l2"), gamma, dot.data_ptr(), E_dot.data_ptr())
    if rc < 0:
        raise MemoryError("the C DTW kernel could not allocate its workspace")
    return dot, E_dot
