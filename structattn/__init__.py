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

# DTW_Ω (issue 23)
from .ops import DTWMarginals, SmoothedDTW, dtw_hvp, dtw_marginals, dtw_value

__version__ = "0.1.0"

__all__ = [
    "REGULARIZERS",
    "SmoothedMax",
    "SmoothedViterbi",
    "ViterbiMarginals",
    "argmax_omega",
    "jacobian_product",
    "max_argmax_omega",
    "max_omega",
    "smoothed_max",
    "sparsemax",
    "viterbi_hvp",
    "viterbi_marginals",
    "viterbi_value",
    # DTW_Ω (issue 23)
    "DTWMarginals",
    "SmoothedDTW",
    "dtw_hvp",
    "dtw_marginals",
    "dtw_value",
]
