"""Backends of the smoothed Viterbi: the registry, and one line per backend.

* ``reference`` — the differentiable tensor-op passes of :mod:`structattn.ops.viterbi` (any device, dtype and S).
* ``cpu`` — :mod:`.cpu`, C kernels loaded with ctypes, compiled once per user at first use (CPU tensors).
* ``triton`` — :mod:`.triton_viterbi`, fused Triton kernels for CUDA tensors (S = 2); ``triton`` is imported only
  when that module is, never by ``import structattn``.

DTW_Ω (:mod:`structattn.ops.dtw`) has its own namespace (``op="dtw"``): ``reference`` (the tensor passes of
:mod:`structattn.ops.dtw`), ``cpu`` (:mod:`.cpu_dtw`, C kernels through ctypes, compiled like the Viterbi ones) and
``triton`` (:mod:`.triton_dtw`, one program per pair, for CUDA tensors; value, E and the HVP all in Triton).

What a backend implements is the :class:`~.registry.ViterbiBackend` protocol; what it serves is declared below, so
that :mod:`structattn.ops.viterbi` can choose without importing anything. Adding a backend = one module implementing
the protocol + one :func:`register` line here. docs/kernels.md maps the names used inside the kernels to the paper.
"""

from .registry import BackendSpec, ViterbiBackend, find, get, names, register, spec, specs, unregister

__all__ = ["BackendSpec", "ViterbiBackend", "find", "get", "names", "register", "spec", "specs", "unregister"]

# Registration order = the order in which backend="auto" tries them; "reference" is the fallback when none serves.
register("reference", "..viterbi:_Reference", devices=None, dtypes=None)
register("cpu", ".cpu", devices=("cpu",), auto=True)
register("triton", ".triton_viterbi", devices=("cuda",), interpreter_devices=("cpu",), states=2, auto=True,
         chain_minor=True)
# DTW_Ω (structattn.ops.dtw): its own namespace of names.
register("reference", "..dtw:_Reference", devices=None, dtypes=None, op="dtw")
register("cpu", ".cpu_dtw", devices=("cpu",), auto=True, op="dtw")
register("triton", ".triton_dtw", devices=("cuda",), interpreter_devices=("cpu",), auto=True, op="dtw")
