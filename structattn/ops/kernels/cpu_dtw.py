"""CPU DTW_Ω backend (``op="dtw"``, name ``"cpu"``): the C kernels of :mod:`._cpu_dtw_source` through ctypes.

Compiled, cached and loaded exactly like the Viterbi C kernels (:mod:`.cpu`: same compiler search, flags, cache folder
and fallbacks, a separate library file ``dtw_<hash>.so``). The forward (Alg. 5) saves the values W by anti-diagonals,
(B, N·M + 2(N + M − 1) + 6): one number per cell and two guards per diagonal; the backward (Alg. 5) and the Hessian
product (Alg. 6) recompute the weights q (and q̇) from W diagonal by diagonal. :func:`marginals` runs both sweeps in
one call, pair by pair; for pairs up to 256 × 256 cells its forward also keeps the pair's q (3 numbers per cell, one
pair at a time) for its backward sweep, three exponentials per cell fewer.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import warnings

import torch
from torch import Tensor

from ...fileio import atomic_path
from . import cpu as _vcpu
from ._cpu_dtw_source import source

__all__ = ["available", "unavailable_reason", "forward", "backward", "marginals", "hvp", "library_path"]

_lock = threading.Lock()
_lib = None
_error: str | None = None
_warned = False


def library_path() -> str | None:
    cc = _vcpu._compiler()
    if cc is None:
        return None
    key = hashlib.sha256("\0".join([source(), " ".join(_vcpu._CFLAGS + _vcpu._SIMD_FLAGS), cc, platform.machine(),
                                    sys.platform]).encode()).hexdigest()[:16]
    return os.path.join(_vcpu._cache_dir(), f"dtw_{key}.so")


def _compile(path: str, cc: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp, atomic_path(path) as out:
        src = os.path.join(tmp, "dtw.c")
        with open(src, "w") as f:
            f.write(source())
        for extra in (_vcpu._SIMD_FLAGS, [*_vcpu._SIMD_FLAGS, "-DSTRUCTATTN_NO_CLONES"], ["-DSTRUCTATTN_NO_CLONES"]):
            # One translation unit, two types × three target clones: over two minutes on a loaded 2-core machine
            # (measured 130 s at load 9); the limit only guards against a hung compiler.
            proc = subprocess.run([cc, *_vcpu._CFLAGS, *extra, src, "-o", out, "-lm"], capture_output=True, text=True,
                                  timeout=600)
            if proc.returncode == 0:
                break
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[:2000]}")


def _load():
    global _lib, _error, _warned
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        try:
            path = library_path()
            if path is None:
                raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
            if not os.path.exists(path):
                _compile(path, _vcpu._compiler())
            lib = ctypes.CDLL(path)
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
            _lib = lib
        except Exception as exc:  # noqa: BLE001 - any failure means: use the reference path
            _error = f"{type(exc).__name__}: {exc}"
    if _lib is None and not _warned:
        _warned = True
        warnings.warn(f"structattn: the C DTW kernel is unavailable ({_error}); using the slower reference path.",
                      RuntimeWarning, stacklevel=3)
    return _lib


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _error


def _fn(name: str, dtype: torch.dtype):
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the C DTW kernel is unavailable: {_error}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the C DTW kernel supports float32 and float64, got {dtype}")
    return getattr(lib, f"dtw_{name}_{'f32' if dtype == torch.float32 else 'f64'}")


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
