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

# Structured losses and sparse decoding (ICML 2018 §4.1, §2.3, App. C.1).
from .decoding import (
    TagSequence,
    count_sequences,
    sequence_marginals,
    sequence_probability,
    sparse_decode,
    viterbi_decode,
)
from .losses import (
    DTWAreaLoss,
    DTWLoss,
    ViterbiLoss,
    dtw_area_loss,
    dtw_loss,
    hard_dtw,
    hard_viterbi,
    tags_to_path,
    viterbi_loss,
)

# SparseMAP segmentation attention (Niculae et al. 2018 over the chain of ICML 2018 §5): imported on first use
# (PEP 562), because structattn.attention loads the fused kernels' module and ``import structattn`` loads no backend
# (tests/test_backends.py).
_LAZY = {name: "attention" for name in ("SparsemapAttention", "SparsemapStructures", "sparsemap_attention",
                                        "entmax15_attention", "fusedmax_attention", "oscarmax_attention")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# DTW_Ω (ICML 2018 §3.2)
from .ops import DTWMarginals, SmoothedDTW, dtw_hvp, dtw_marginals, dtw_value

# fusedmax and oscarmax (the structured-attention lecture): the operators; their attention functions are lazy (above)
from .ops.structured_sparsemax import Fusedmax, Oscarmax, ProxTV, fusedmax, oscarmax, prox_tv

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
    # structured losses and sparse decoding
    "DTWAreaLoss",
    "DTWLoss",
    "TagSequence",
    "ViterbiLoss",
    "count_sequences",
    "dtw_area_loss",
    "dtw_loss",
    "hard_dtw",
    "hard_viterbi",
    "sequence_marginals",
    "sequence_probability",
    "sparse_decode",
    "tags_to_path",
    "viterbi_decode",
    "viterbi_loss",
    # SparseMAP segmentation attention (Niculae et al. 2018 over the chain of ICML 2018 §5)
    "sparsemap_attention",
    "SparsemapAttention",
    "SparsemapStructures",
    # DTW_Ω (ICML 2018 §3.2)
    "DTWMarginals",
    "SmoothedDTW",
    "dtw_hvp",
    "dtw_marginals",
    "dtw_value",
    # fusedmax, oscarmax, entmax-1.5 (the structured-attention lecture; Peters et al. 2019)
    "Fusedmax",
    "Oscarmax",
    "ProxTV",
    "fusedmax",
    "oscarmax",
    "prox_tv",
    "fusedmax_attention",
    "oscarmax_attention",
    "entmax15_attention",
]
