"""The math core: smoothed max operators, the smoothed Viterbi, fusedmax / oscarmax (no fairseq, matplotlib or Triton imports)."""

from .smoothed_max import (
    REGULARIZERS,
    SmoothedMax,
    argmax_omega,
    jacobian_product,
    max_argmax_omega,
    max_omega,
    smoothed_max,
    sparsemax,
)
from .structured_sparsemax import Fusedmax, Oscarmax, ProxTV, fusedmax, oscarmax, prox_tv
from .viterbi import SmoothedViterbi, ViterbiMarginals, viterbi_hvp, viterbi_marginals, viterbi_value

# DTW_Ω (ICML 2018 §3.2)
from .dtw import DTWMarginals, SmoothedDTW, dtw_hvp, dtw_marginals, dtw_value

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
    # DTW_Ω (ICML 2018 §3.2)
    "DTWMarginals",
    "SmoothedDTW",
    "dtw_hvp",
    "dtw_marginals",
    "dtw_value",
    # structured sparsemax (fusedmax, oscarmax; the structured-attention lecture)
    "Fusedmax",
    "Oscarmax",
    "ProxTV",
    "fusedmax",
    "oscarmax",
    "prox_tv",
]
