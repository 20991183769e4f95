"""Fast backends of the smoothed Viterbi (same maths as :mod:`structattn.ops.viterbi`'s reference passes).

* :mod:`.cpu` — C kernels loaded with ctypes, compiled once per user at first use (CPU tensors).
* :mod:`.triton_viterbi` — fused Triton kernels for CUDA tensors (S = 2); ``triton`` is imported only when this
  module is imported, never by ``import structattn``.

Nothing here is imported eagerly: :mod:`structattn.ops.viterbi` picks a backend per call.
"""
