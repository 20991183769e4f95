"""structattn: differentiable dynamic programming (smoothed Viterbi) as structured attention.

Mensch & Blondel, "Differentiable Dynamic Programming for Structured Prediction and Attention", ICML 2018.
"""

from .ops import (
    REGULARIZERS,
    SmoothedMax,
    SmoothedViterbi,
    ViterbiMarginals,
    argmax_omega,
    jacobian_product,
    max_argmax_omega,
    max_omega,
    smoothed_max,
    sparsemax,
    viterbi_hvp,
    viterbi_marginals,
    viterbi_value,
)
from .ops.viterbi import get_default_backend, set_default_backend, viterbi_backend

__version__ = "0.1.0"

__all__ = [
    "REGULARIZERS",
    "SmoothedMax",
    "SmoothedViterbi",
    "ViterbiMarginals",
    "argmax_omega",
    "get_default_backend",
    "jacobian_product",
    "max_argmax_omega",
    "max_omega",
    "set_default_backend",
    "smoothed_max",
    "sparsemax",
    "viterbi_backend",
    "viterbi_hvp",
    "viterbi_marginals",
    "viterbi_value",
]
