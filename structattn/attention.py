"""Attention layers over a padded source: softmax, sparsemax and smoothed-Viterbi segmentation attention.

Mensch & Blondel, "Differentiable Dynamic Programming for Structured Prediction and Attention", ICML 2018, §5 and
App. C.3. Given encoder states X = (x_1, …, x_T) and the decoder state z, an attention layer produces weights
w ∈ △^T over the *real* source positions and the context c = Xᵀw. All three layers score positions with the same
bilinear form s_t = x_t·(M z) (fairseq's LSTM attention, Luong et al. 2015 "general"):

* softmax   — w = softmax(s)                                 (argmax of ⟨w, s⟩ + H(w) over △^T)
* sparsemax — w = sparsemax(s) = argmin_{w ∈ △^T} ‖w − s‖²     (Martins & Astudillo 2016; sparse)
* viterbi   — segmentation attention (§5): a 2-state chain y_t ∈ {0, 1} ("attend to x_t") with potentials

      θ[t, 1, j] = s_t + T[1, j],    θ[t, 0, j] = T[0, j]      (T ∈ R^{2×2} a learned transition matrix),

  E = ∇Vit_Ω(θ) (:func:`structattn.viterbi_marginals`) and w_t ∝ p(y_t = 1) = Σ_j E[t, 1, j]. With Ω = −γH this
  is the CRF segmentation attention of Kim et al. (2017); with Ω = (γ/2)‖·‖² the marginals are sparse.

Padding. Every function takes ``padding_mask`` (B, T), True at padded positions, in *any* layout (left-padded,
right-padded, or even holes). Padded positions get weight exactly 0 and do not change the others: for the Viterbi
chain the real positions are compacted (stable, order-preserving) to the front, the chain runs over them only
(``lengths`` of :func:`~structattn.viterbi_marginals`), and the marginals are scattered back to their columns. A row
with no real position at all gets all-zero weights (and context 0).

Fallback of the Viterbi attention. With ℓ2 (and, after float underflow, even with entropy) the smoothed Viterbi can
put all its mass on the path y = 0…0, so p(y_t = 1) = 0 for every t and w_t ∝ p(y_t = 1) is 0/0. The weights then
fall back to softmax(s) over the real positions: a proper distribution that still depends on the scores, so the
gradient w.r.t. M stays non-zero and training can leave the degenerate region (the ℓ2 chain itself has zero
derivative there). The switch is discontinuous; :func:`viterbi_attention` with ``return_marginals=True`` exposes
p(y_t = 1) so callers can count how often it happens.

Initialisation (:class:`ViterbiAttention`). θ/γ is what matters (for entropy p ∝ exp(⟨Y, θ⟩/γ); ℓ2 collapses to a
hard, zero-derivative Viterbi when |θ| ≫ γ, App. C.3). M starts at U(−a, a) with a = γ·√(3/(d_x d_z)), so that
for encoder/decoder states with entries in [−1, 1] (LSTM outputs) the initial score std is at most γ, whatever γ
and the sizes; in the paper form T starts at 0 (no preference between attending or not, nor for contiguity).

The level of the scores matters in the paper's form. Unlike softmax, w = p/Σp is *not* invariant to a common
shift s_t → s_t + b of a row's scores: the shift raises θ[t, 1, ·] against θ[t, 0, ·], i.e. makes attending
cheaper everywhere, and so changes how many positions are attended. With −H and T = 0 the positions are
independent and p(y_t = 1) = sigmoid(s_t/γ), so w ∝ exp(s_t/γ) = softmax(s/γ) for a very negative level and
w → uniform for a very positive one (γ = 1, b = −10, 0, +10: from softmax(s) to uniform); with ℓ2 a low enough level
puts every row on the all-zero path. In the paper's model the level is thus a per-query degree of freedom: each
query chooses, through it, how broad its attention is.

Dead rows and the stable form (a documented departure from the paper, selectable, and the *provisional*
default). In the paper's form (``form="paper"``: θ built from the raw scores s and a raw T initialised at 0)
training can *kill* ℓ2 rows: nothing anchors the level of s, which drifts; once every position loses to the
all-zero path by ≥ γ (two states: q = clip((1 + Δ/γ)/2, 0, 1)), p ≡ 0, the Jacobian of the row is 0, the row
falls back to softmax, and no gradient pushes it back. And T, moved by Adam by about lr per update while it
matters only on the γ scale, stays ≈ 0: the chain factorises into independent positions. The ``form="stable"``
attention changes two things, both measured on Bible fr→en (``recipes/bible_fr_en/RESULTS.md``):

* scores are **centred per row** over the real positions, s̃_t = s_t − mean_{t' real} s_{t'}, before θ is built.
  This is not a reparameterisation: it removes the per-query level described above, so the weights no longer
  depend on a common shift of a row's scores (only on their differences, as softmax's do), and how broad a row's
  attention is can only be learned through the spread of its scores and the shared transitions T. In exchange
  the level cannot drift: max_t s̃_t ≥ 0, so a row dies only if the *learned* transitions make attending cost
  ≥ γ everywhere. The softmax fallback is unchanged by the centring;
* **transitions on the γ scale**, T = γ·τ with τ the parameter (``transitions_over_gamma``), initialised with a
  contiguity prior τ = [[c, 0], [0, c]] (staying in a state is worth c·γ): Adam's ~lr steps on τ move T/γ at a
  useful speed and the chain starts out preferring contiguous segments.

Defaults (:mod:`structattn.options`, one definition for the library and both plugins): the stable form, the
paper's γ per Ω (:data:`PAPER_GAMMA`), c = :data:`~structattn.options.DEFAULT_CONTIGUITY`, and Ω = −γH where no
``reg`` is given — the form, γ and prior every committed result used. They are provisional: the evidence for the stable form is one quick ℓ2 run (paper
form 12.9 vs stable 13.7 BLEU, p = 0.10, ``recipes/bible_fr_en/QUICKSTART.md``); the study that decides between
the forms (run to convergence, more than one seed) goes into ``recipes/bible_fr_en/RESULTS.md``, and its winner
becomes the default in :mod:`structattn.options`. Pass ``form="paper"`` for the paper's model.

:func:`dead_rows` counts the rows that fell back (the modules keep running counts, see
:meth:`ViterbiAttention.pop_fallback_counts`; the fairseq plugin logs them as ``attn_fallback``).

Multi-head attention (:func:`multihead_viterbi_attention`, :class:`ViterbiNormalizer`). A Transformer's
encoder-decoder attention scores the source itself — the scaled dot products s_t = q·k_t/√d of each head — so only
the normaliser is replaced: every (sentence, head, target position) row is one chain with the unary scores s_t of §5,
and each head has its own transition matrix T_h (both forms as above) and, optionally (``gamma_mode`` learned or
scaled, a departure from the paper's fixed γ: see :class:`ViterbiNormalizer`), its own learned γ_h. The fairseq glue is
``user_dir/structattn_transformer.py`` (docs/transformer.md).

Where the computation lives. This module holds the checks, the public functions and the modules; the Viterbi
normaliser itself (θ, compaction, w ∝ p, fallback, row flags) is :func:`structattn.ops.segmentation.segmentation_weights`,
which runs it as two fused C calls (forward, backward with Alg. 4) on CPU and as the tensor operations described above
elsewhere (docs/speed.md). This module does not import fairseq; the fairseq glue lives in ``user_dir/``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .ops.segmentation import (
    DEAD,
    FROZEN,
    HAS_REAL,
    centre_rows,
    check_transitions,
    masked_softmax,
    row_flags,
    segmentation_potentials,
    segmentation_weights,
)
from .ops.smoothed_max import check_reg_gamma, sparsemax
from .options import (ATTENTIONS, DEFAULT_CONTIGUITY, DEFAULT_FORM, DEFAULT_GAMMA_MODE, DEFAULT_LAMBDA, DEFAULT_REG,
                      DEFAULT_TEMPERATURE, GAMMA_MODES, PAPER_GAMMA, SPARSEMAP_GAMMA, TEMPERATURE_ATTENTIONS,
                      VITERBI_FORMS, check_temperature, paper_gamma)
from .ops.sparsemap import DEFAULT_MAX_ITER as SPARSEMAP_MAX_ITER
from .ops.sparsemap import DEFAULT_TOL as SPARSEMAP_TOL
from .ops.sparsemap import sparsemap_weights
from .ops.entmax import entmax15
from .ops.structured_sparsemax import (
    DEFAULT_FUSEDMAX_LAMBDA,
    DEFAULT_OSCARMAX_LAMBDA,
    check_lambda,
    fusedmax,
    oscarmax,
)

__all__ = [
    "ATTENTIONS",
    "PAPER_GAMMA",
    "bilinear_scores",
    "softmax_attention",
    "sparsemax_attention",
    "fusedmax_attention",
    "oscarmax_attention",
    "entmax15_attention",
    "segmentation_potentials",
    "viterbi_attention",
    "centre_scores",
    "dead_rows",
    "frozen_rows",
    "VITERBI_FORMS",
    "DEFAULT_REG",
    "DEFAULT_FORM",
    "DEFAULT_CONTIGUITY",
    "SoftmaxAttention",
    "SparsemaxAttention",
    "SPARSEMAX_TEMPERATURE",
    "FusedmaxAttention",
    "OscarmaxAttention",
    "Entmax15Attention",
    "ViterbiAttention",
    "build_attention",
    "multihead_viterbi_attention",
    "ViterbiNormalizer",
    "HeadNormalizer",
    "build_normalizer",
    "coupling_report",
    # SparseMAP segmentation attention
    "sparsemap_attention",
    "SparsemapAttention",
    "SparsemapNormalizer",
    "SparsemapStructures",
    "SPARSEMAP_GAMMA",
    "structure_totals",
]

# ATTENTIONS, PAPER_GAMMA, VITERBI_FORMS and the defaults are defined once, in structattn.options (imported above).


# ---- input checks -------------------------------------------------------------------------------------------------


def _check_scores(scores: Tensor, padding_mask: Tensor | None, name: str = "scores",
                  drop_empty: bool = True) -> Tensor | None:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if scores.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(scores.shape)}")
    if padding_mask is None:
        return None
    if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
        raise TypeError("padding_mask must be a bool tensor (True at padded positions)")
    if padding_mask.shape != scores.shape:
        raise ValueError(
            f"padding_mask must have the shape of {name} {tuple(scores.shape)}, got {tuple(padding_mask.shape)}"
        )
    # No padding: take the unmasked path. Reading the mask on the host is a data-dependent branch that
    # torch.compile cannot trace; compiled code keeps the (equivalent) masked path instead.
    # drop_empty=False: the caller handles any mask at no extra cost (the fusedmax/oscarmax kernels), so skip this
    # pass over the mask (~25 µs at B = 512, T = 50: a tenth of softmax's forward + backward there).
    if drop_empty and not torch.compiler.is_compiling() and not bool(padding_mask.any()):
        return None
    return padding_mask


def bilinear_scores(query: Tensor, keys: Tensor, proj: nn.Linear | Tensor) -> Tensor:
    """s[b, t] = keys[b, t] · (M query[b]) with M = ``proj`` (a Linear d_z → d_x, or its (d_x, d_z) weight).

    query (B, d_z), keys (B, T, d_x) → (B, T)."""
    mz = proj(query) if isinstance(proj, nn.Module) else query @ proj.t()
    return torch.bmm(keys, mz.unsqueeze(2)).squeeze(2)


# ---- the three normalisers ------------------------------------------------------------------------------------------


def softmax_attention(scores: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """w = softmax(s) over the real positions of each row (the maximiser of ⟨w, s⟩ + H(w) on △).

    Args:
        scores: (B, T) scores s.
        padding_mask: optional (B, T) bool, True at padded positions (any layout).

    Returns:
        (B, T) weights: non-negative, summing to 1 over real positions, exactly 0 on padding (all 0 on a row that
        has no real position).
    """
    return masked_softmax(scores, _check_scores(scores, padding_mask))


def sparsemax_attention(scores: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """w = sparsemax(s) = argmin_{w ∈ △} ‖w − s‖² over the real positions of each row (Martins & Astudillo 2016).

    Same arguments and guarantees as :func:`softmax_attention`; the weights are typically sparse.
    """
    padding_mask = _check_scores(scores, padding_mask)
    if padding_mask is None:
        return sparsemax(scores)
    real = ~padding_mask
    # The threshold τ of the projection satisfies τ ≥ max(s) − 1, so any entry below max(s) − 1 is outside the
    # support and does not move τ: filling padding with max_real − 2 is the same as removing it.
    top = scores.detach().masked_fill(padding_mask, float("-inf")).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    filled = torch.where(padding_mask, top - 2.0, scores)
    w = sparsemax(filled)
    return w.masked_fill(~real, 0.0)


# ---- structured and sparse normalisers beyond sparsemax: fusedmax, oscarmax, entmax-1.5 ------------------


def fusedmax_attention(scores: Tensor, padding_mask: Tensor | None = None,
                       lam: float = DEFAULT_FUSEDMAX_LAMBDA) -> Tensor:
    """w = fusedmax(s) = argmin_{w ∈ △} ½‖w − s‖² + λ Σ_t |w_{t+1} − w_t| over the real positions of each row
    (Niculae & Blondel 2017; = sparsemax ∘ prox_TV, :func:`structattn.ops.structured_sparsemax.fusedmax`).

    The total variation links consecutive *real* positions (padding of any layout is compacted away), so contiguous
    source positions get equal weights. Same guarantees as :func:`softmax_attention`; ``lam`` = λ ≥ 0 (λ = 0:
    sparsemax). The default 0.1 fuses neighbours whose scores differ by less than about 0.2 (the reason for this value
    is given at :data:`structattn.ops.structured_sparsemax.DEFAULT_FUSEDMAX_LAMBDA`).
    """
    return fusedmax(scores, lam, _check_scores(scores, padding_mask, drop_empty=False))


def oscarmax_attention(scores: Tensor, padding_mask: Tensor | None = None,
                       lam: float = DEFAULT_OSCARMAX_LAMBDA) -> Tensor:
    """w = argmin_{w ∈ △} ½‖w − s‖² + λ Σ_{t<t'} max(|w_t|, |w_t'|) over the real positions of each row: the exact
    oscarmax of the lecture's formula (:func:`structattn.ops.structured_sparsemax.oscarmax`; *not* the authors'
    sparsemax ∘ prox_OSCAR, which is not always that argmin). Positions with close scores get equal weights,
    wherever they are. Same guarantees as :func:`softmax_attention`; the pairs run over the real positions. The
    default λ = 0.01 scales with the length (the largest OSCAR weight is λ(n − 1), see
    :data:`structattn.ops.structured_sparsemax.DEFAULT_OSCARMAX_LAMBDA`).
    """
    return oscarmax(scores, lam, _check_scores(scores, padding_mask, drop_empty=False))


def entmax15_attention(scores: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """w = 1.5-entmax(s) = argmax_{w ∈ △} ⟨w, s⟩ + H^T_{1.5}(w) over the real positions of each row (Peters, Niculae
    & Martins 2019), computed exactly by :func:`structattn.ops.entmax.entmax15` (a sort-free C kernel on CPU; the
    padding goes into the kernel, which leaves padded positions out of the problem).

    Same guarantees as :func:`softmax_attention`; sparse, but with a smoother support than sparsemax. Compiles with
    ``fullgraph=True`` (:mod:`structattn.ops.entmax` says how).
    """
    return entmax15(scores, -1, _check_scores(scores, padding_mask, drop_empty=False))


def viterbi_attention(
    scores: Tensor,
    transitions: Tensor,
    padding_mask: Tensor | None = None,
    reg: str = DEFAULT_REG,
    gamma: float | None = None,
    return_marginals: bool = False,
):
    """Smoothed-Viterbi segmentation attention, w_t ∝ p_{θ,Ω}(y_t = 1) = Σ_j ∇Vit_Ω(θ)[t, 1, j] (ICML 2018 §5).

    θ is built by :func:`segmentation_potentials`; the chain runs over the real positions only (padding in any
    layout is compacted away and the result scattered back). If p(y_t = 1) = 0 for every real t (possible for
    ``reg="l2"``), the row falls back to softmax(s) over its real positions (see the module docstring).

    Args:
        scores: (B, T) unary scores s_t (e.g. x_t·M·z).
        transitions: (2, 2) or (B, 2, 2) transition matrix T.
        padding_mask: optional (B, T) bool, True at padded positions.
        reg: ``"entropy"`` (Ω = −γH) or ``"l2"`` (Ω = (γ/2)‖·‖²); default :data:`structattn.options.DEFAULT_REG`.
        gamma: temperature γ > 0; None (default): the paper's γ for ``reg`` (:data:`PAPER_GAMMA`).
        return_marginals: also return p(y_t = 1) (B, T) (before normalisation and fallback).

    Returns:
        (B, T) weights (and the marginals if asked): non-negative, summing to 1 over real positions, exactly 0 on
        padding. Differentiable w.r.t. ``scores`` and ``transitions`` (the backward of the marginals is the
        Hessian-vector product of Alg. 4).

    This function is the paper's form: it uses ``scores`` and ``transitions`` as given. The stable form of the
    modules is this function on :func:`centre_scores` with T = γ·τ (module docstring).
    """
    gamma = _gamma(reg, gamma)
    padding_mask = _check_scores(scores, padding_mask)
    w, p = _viterbi_rows(scores, check_transitions(transitions, scores.shape[0]), 1, padding_mask, reg, gamma)
    return (w, p) if return_marginals else w


def _gamma(reg: str, gamma: float | None) -> float:
    """γ checked, None meaning the paper's γ for ``reg`` (the one default of every entry point)."""
    if gamma is None:
        check_reg_gamma(reg, 1.0)  # an unknown reg raises the standard error
        gamma = paper_gamma(reg)
    return check_reg_gamma(reg, gamma)


def _viterbi_rows(scores: Tensor, trans: Tensor, tdiv: int, padding_mask: Tensor | None, reg: str, gamma: float,
                  centre: bool = False, flags: bool = False):
    """:func:`structattn.ops.segmentation.segmentation_weights` on checked arguments, computed in float32 for
    half-precision scores, w and p returned in their dtype."""
    out = segmentation_weights(_upcast_half(scores), trans, padding_mask, reg, gamma, centre=centre, tdiv=tdiv,
                               flags=flags)
    if out[0].dtype != scores.dtype:
        out = (out[0].to(scores.dtype), out[1].to(scores.dtype), *out[2:])
    return out


def _upcast_half(x: Tensor) -> Tensor:
    """float16/bfloat16 → float32, other dtypes unchanged. θ = T + s must not be rounded to half precision: with T
    of order γ (the stable form's contiguity prior), a bfloat16 θ keeps about two significant digits of s. The
    Viterbi kernels compute in float32 anyway, so this costs one small cast per row."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def centre_scores(scores: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """s̃_t = s_t − mean_{t' real} s_{t'}: each row centred over its real positions (padding left as it is, a row
    without real positions unchanged). Used by the stable form of :class:`ViterbiAttention` (module docstring)."""
    return centre_rows(scores, _check_scores(scores, padding_mask))


def dead_rows(marginals: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Rows of the Viterbi attention that fall back to softmax: p(y_t = 1) ≤ tiny (float) for every real t.

    Args:
        marginals: (B, T) p(y_t = 1) as returned by ``viterbi_attention(..., return_marginals=True)``.
        padding_mask: optional (B, T) bool, True at padding.

    Returns:
        (B,) bool, True on dead rows. A row without any real position is not counted as dead (it has no
        attention at all, nothing fell back)."""
    return (row_flags(marginals, _check_scores(marginals, padding_mask, "marginals")) & DEAD) != 0


def frozen_rows(marginals: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Rows whose marginals are all exactly 0 or 1 on the real positions: a hard (unsmoothed) Viterbi path.

    With ℓ2 the marginals are piecewise linear in θ and such a row has a zero Jacobian, so no gradient reaches
    the scores or the transitions through it (App. C.3). Dead rows (:func:`dead_rows`, all 0) are frozen; so are
    *saturated* rows (all 1: uniform weights over the sentence) and any other binary path. Same arguments and
    return as :func:`dead_rows`."""
    return (row_flags(marginals, _check_scores(marginals, padding_mask, "marginals")) & FROZEN) != 0


def coupling_report(model: nn.Module) -> list[dict]:
    """The learned transitions of every Viterbi attention module of ``model``, as plain data (for attention dumps,
    logs and reports): ``[{"module": name in model.named_modules(), "form", "chain", "gamma", "gamma_mode",
    "gammas": one γ per matrix, "T_over_gamma": one (2, 2) list per matrix, "kappa": one κ per matrix}]`` with κ the
    coupling of neighbouring positions (:func:`structattn.ops.segmentation.chain_coupling`; one matrix per head for
    a :class:`ViterbiNormalizer`), each matrix divided by its own γ (``gammas``: all equal to ``gamma`` unless
    ``gamma_mode`` is ``"learned"``, where ``gamma`` is the initial value). Empty for a model without Viterbi
    attention."""
    from .ops.segmentation import chain_coupling

    out = []
    for name, m in model.named_modules():
        if isinstance(m, _ViterbiState):
            gammas = m.matrix_gammas().detach().double().cpu()
            tau = (m.effective_transitions().detach().double().reshape(-1, 2, 2).cpu() / gammas[:, None, None])
            out.append({"module": name, "form": m.form, "chain": m.chain, "gamma": m.gamma,
                        "gamma_mode": m.gamma_mode, "gammas": [round(g, 4) for g in gammas.tolist()],
                        "T_over_gamma": [[[round(x, 4) for x in row] for row in t] for t in tau.tolist()],
                        "kappa": [round(k, 4) for k in chain_coupling(tau).tolist()]})
    return out


# ---- modules ------------------------------------------------------------------------------------------------------


class _BilinearAttention(nn.Module):
    """Shared part: scores s_t = x_t·(M z), weights from :meth:`normalize`, context c = Σ_t w_t x_t."""

    def __init__(self, query_dim: int, source_dim: int):
        super().__init__()
        for name, v in (("query_dim", query_dim), ("source_dim", source_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.query_dim, self.source_dim = query_dim, source_dim
        self.proj = nn.Linear(query_dim, source_dim, bias=False)  # M (d_x × d_z)
        # fairseq's LSTM attention initialisation (fairseq.models.lstm.Linear).
        nn.init.uniform_(self.proj.weight, -0.1, 0.1)

    def normalize(self, scores: Tensor, padding_mask: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, query: Tensor, keys: Tensor, padding_mask: Tensor | None = None):
        """query (B, d_z), keys (B, T, d_x), padding_mask (B, T) bool or None → (context (B, d_x), weights (B, T))."""
        if query.dim() != 2 or keys.dim() != 3 or query.shape[0] != keys.shape[0]:
            raise ValueError(f"expected query (B, d_z) and keys (B, T, d_x), got {tuple(query.shape)}, "
                             f"{tuple(keys.shape)}")
        if query.shape[1] != self.query_dim or keys.shape[2] != self.source_dim:
            raise ValueError(f"{type(self).__name__} was built for d_z={self.query_dim}, d_x={self.source_dim}; "
                             f"got d_z={query.shape[1]}, d_x={keys.shape[2]}")
        scores = bilinear_scores(query, keys, self.proj)
        w = self.normalize(scores, padding_mask)
        context = torch.bmm(w.unsqueeze(1).to(keys.dtype), keys).squeeze(1)
        return context, w

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, source_dim={self.source_dim}"


class _TemperedAttention(_BilinearAttention):
    """A bilinear attention that normalises s/τ instead of s (softmax, sparsemax, fusedmax, oscarmax, 1.5-entmax):
    τ = ``temperature`` > 0, default per attention in :data:`structattn.options.DEFAULT_TEMPERATURE` (one
    definition for the library and every toolkit). τ is a persistent buffer of shape (1,) — not a 0-d tensor:
    OpenNMT-py's checkpoint loader slices every buffer along its first dimension — so checkpoints record it; a
    state dict without it (written before τ existed, when every one of these attentions normalised the raw scores)
    loads with τ = 1, so old models keep the attention they were trained with in every toolkit.

    Why a temperature at all (docs/sparse_init.md): under Adam the bilinear scores' spread grows from ~0.01 at
    initialisation to ~5–15 within 10–20 updates, before the alignment has formed; a sparse normaliser then has
    a support of one or two positions and passes exactly zero gradient to every other score, and softmax saturates
    the same way. Dividing by τ slows that: the raw scores must spread τ times further before the normaliser
    closes. For softmax, s/τ is the max_Ω of Ω = −τ·H, i.e. the temperature γ = τ of the paper's negentropy
    (§2); for sparsemax it is γ = τ of the squared ℓ2 Ω."""

    def __init__(self, query_dim: int, source_dim: int, temperature: float | None = None):
        super().__init__(query_dim, source_dim)
        if temperature is None:
            temperature = DEFAULT_TEMPERATURE[self.kind]
        self.register_buffer("temperature", torch.tensor([check_temperature(temperature)]))

    def tempered(self, scores: Tensor) -> Tensor:
        """s/τ, with float16/bfloat16 scores upcast to float32 (as the Viterbi rows are): the threshold of a wide
        sparse support is a sum of many scores, whose bf16 rounding would move every weight."""
        s = _upcast_half(scores)
        return s / self.temperature.to(s.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "temperature" not in state_dict:
            # written before τ existed: that model was trained, and must be read, with the raw scores (τ = 1)
            state_dict[prefix + "temperature"] = torch.tensor([1.0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={float(self.temperature[0]):g}"


class SoftmaxAttention(_TemperedAttention):
    """Bilinear softmax attention w = softmax(s/τ), s_t = x_t·M·z (fairseq's LSTM ``AttentionLayer`` scoring at
    τ = 1); see :func:`softmax_attention` and :class:`_TemperedAttention` (default τ:
    :data:`structattn.options.DEFAULT_TEMPERATURE`)."""

    kind = "softmax"

    def normalize(self, scores, padding_mask):
        return softmax_attention(self.tempered(scores), padding_mask).to(scores.dtype)


#: Default temperature of :class:`SparsemaxAttention` (kept under this name for the code that imports it; the
#: value lives in :data:`structattn.options.DEFAULT_TEMPERATURE`).
SPARSEMAX_TEMPERATURE = DEFAULT_TEMPERATURE["sparsemax"]


class SparsemaxAttention(_TemperedAttention):
    """Bilinear sparsemax attention w = sparsemax(s/τ), s_t = x_t·M·z; see :func:`sparsemax_attention`.

    τ = ``temperature`` (default :data:`SPARSEMAX_TEMPERATURE` = 10; τ = 1 is plain sparsemax(s), the earlier
    behaviour, and what a checkpoint without τ loads with: :class:`_TemperedAttention`). Why (a departure from
    Martins & Astudillo's attention, which uses τ = 1): sparsemax passes exactly zero gradient to every score
    outside its support, and under Adam the bilinear scores' spread grows from ~0.01 at initialisation to ~5–15
    within 10–20 updates (the whole network's states grow, not M alone: M = 0 at init changes nothing). At τ = 1 the
    support collapses to ~1.7 positions by update 20 and 84–90 % of the score entries get zero gradient, so the
    attention learns the alignment late (reversal toy, ``benchmarks/toy_alignment.py``, 504 updates: BLEU 66.5 /
    85.4 for seeds 1 / 2 against softmax's 96.8 / 92.8). With τ = 10 the support at update 20 is still ~5.5
    positions, 39 % of the entries get zero gradient, and seed 1 reaches BLEU 96.9 in the same budget
    (docs/sparse_init.md). The converged model is as sparse as before (support 1.02 per row)."""

    kind = "sparsemax"

    def normalize(self, scores, padding_mask):
        return sparsemax_attention(self.tempered(scores), padding_mask).to(scores.dtype)


class FusedmaxAttention(_TemperedAttention):
    """Bilinear fusedmax attention w = fusedmax_λ(s/τ), s_t = x_t·M·z; see :func:`fusedmax_attention` and
    :class:`_TemperedAttention`."""

    kind = "fusedmax"

    def __init__(self, query_dim: int, source_dim: int, lam: float = DEFAULT_FUSEDMAX_LAMBDA,
                 temperature: float | None = None):
        super().__init__(query_dim, source_dim, temperature)
        self.lam = check_lambda(lam)

    def normalize(self, scores, padding_mask):
        return fusedmax_attention(self.tempered(scores), padding_mask, self.lam).to(scores.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam}"


class OscarmaxAttention(FusedmaxAttention):
    """Bilinear oscarmax attention w = oscarmax_λ(s/τ), s_t = x_t·M·z; see :func:`oscarmax_attention` and
    :class:`_TemperedAttention`."""

    kind = "oscarmax"

    def __init__(self, query_dim: int, source_dim: int, lam: float = DEFAULT_OSCARMAX_LAMBDA,
                 temperature: float | None = None):
        super().__init__(query_dim, source_dim, lam, temperature)

    def normalize(self, scores, padding_mask):
        return oscarmax_attention(self.tempered(scores), padding_mask, self.lam).to(scores.dtype)


class Entmax15Attention(_TemperedAttention):
    """Bilinear 1.5-entmax attention w = entmax15(s/τ), s_t = x_t·M·z; see :func:`entmax15_attention` and
    :class:`_TemperedAttention`."""

    kind = "entmax15"

    def normalize(self, scores, padding_mask):
        return entmax15_attention(self.tempered(scores), padding_mask).to(scores.dtype)


class _ViterbiState:
    """What every Viterbi attention module holds (mixin of :class:`ViterbiAttention` and
    :class:`ViterbiNormalizer`): Ω, γ, the form and its transition parameter (``transitions`` = T in the paper
    form, ``transitions_over_gamma`` = τ = T/γ in the stable form, of shape ``shape``), and running counts of
    attention rows, dead (fallback) rows and frozen rows."""

    def _init_viterbi(self, reg: str, gamma: float | None, form: str, contiguity: float | None,
                      shape: tuple, chain: bool = True, gamma_mode: str = DEFAULT_GAMMA_MODE) -> None:
        if not isinstance(chain, bool):
            raise TypeError(f"chain must be a bool, got {chain!r}")
        if gamma_mode not in GAMMA_MODES:
            raise ValueError(f"gamma_mode must be one of {GAMMA_MODES}, got {gamma_mode!r}")
        #: False: the chain-off ablation (:meth:`effective_transitions`): independent positions, κ ≡ 0
        self.chain = chain
        self.gamma = _gamma(reg, gamma)
        self.reg = reg
        if form not in VITERBI_FORMS:
            raise ValueError(f"form must be one of {VITERBI_FORMS}, got {form!r}")
        self.form = form
        if form == "paper":
            if contiguity not in (None, 0, 0.0):
                raise ValueError("contiguity is a prior of the stable form; the paper form starts from T = 0")
            self.contiguity = 0.0
            self.transitions = nn.Parameter(torch.zeros(shape))
        else:
            c = DEFAULT_CONTIGUITY if contiguity is None else contiguity
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
                raise ValueError(f"contiguity must be a finite number, got {c!r}")
            self.contiguity = float(c)
            prior = torch.tensor([[self.contiguity, 0.0], [0.0, self.contiguity]])
            self.transitions_over_gamma = nn.Parameter(prior.expand(shape).clone())
        #: ``fixed``: γ (:attr:`gamma`) for every matrix; ``learned``/``scaled``: γ_m = exp(``log_gamma[m]``) per
        #: transition matrix (per head of a :class:`ViterbiNormalizer`), starting at :attr:`gamma` (``learned``) or
        #: at :attr:`gamma` times the head's score scale on the first training batch (``scaled``)
        self.gamma_mode = gamma_mode
        if gamma_mode != "fixed":
            # log γ, not γ: Adam's ~lr steps then change γ by a *factor*, the same relative speed whatever its size,
            # and γ stays > 0 without a constraint
            self.log_gamma = nn.Parameter(torch.full(shape[:-2] or (1,), math.log(self.gamma)))
        if gamma_mode == "scaled":
            # persistent: a checkpoint records that its γ was set from the scores (never re-done after loading)
            self.register_buffer("gamma_scaled", torch.zeros(1, dtype=torch.bool))
        self.register_buffer("_rows", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("_dead", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("_frozen", torch.zeros((), dtype=torch.long), persistent=False)
        #: set to a list to collect the (B,) dead-row flags of every forward (None: do not collect)
        self.recorded_dead: list | None = None

    def matrix_gammas(self) -> Tensor:
        """(M,) γ of each of the M transition matrices: :attr:`gamma` repeated (``gamma_mode="fixed"``) or the learned
        exp(``log_gamma``) (``"learned"``, differentiable)."""
        if self.gamma_mode != "fixed":
            return self.log_gamma.exp()
        p = self.transitions if self.form == "paper" else self.transitions_over_gamma
        return p.new_full((p.reshape(-1, 2, 2).shape[0],), self.gamma)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.gamma_mode != "fixed" and prefix + "log_gamma" not in state_dict \
                and (prefix + "transitions" in state_dict or prefix + "transitions_over_gamma" in state_dict):
            # A checkpoint of the fixed-γ model (every one written before gamma_mode existed): it was trained with
            # γ = self.gamma for every head, which is where a learned γ starts (and, scaled, stays: it is not reset
            # from the scores). Loading it into a learned-γ model (e.g. to fine-tune) gives the model it was.
            state_dict[prefix + "log_gamma"] = torch.full_like(self.log_gamma, math.log(self.gamma))
            if self.gamma_mode == "scaled":
                state_dict[prefix + "gamma_scaled"] = torch.ones(1, dtype=torch.bool)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def effective_transitions(self) -> Tensor:
        """T as used in θ (the paper's T; γ·τ in the stable form, with each matrix's own γ when γ is learned).

        With ``chain=False`` (the chain-off ablation) T is projected onto the matrices f(i) + g(j) — the
        orthogonal complement of K = [[1, −1], [−1, 1]], T − (⟨T, K⟩/4)·K — so that the coupling κ = ⟨T, K⟩/γ
        (:func:`structattn.ops.segmentation.chain_coupling`) is exactly 0 and stays 0 (the projection's gradient
        has no component along K): the chain factorises into independent per-position gates on the same
        unary scores, and the three remaining directions of T keep their job of shifting them (a learned bias of
        the attend state). What the chain itself buys is the difference between the two models."""
        if self.form == "paper":
            t = self.transitions
        elif self.gamma_mode != "fixed":
            g = self.matrix_gammas()
            t = g.reshape(self.transitions_over_gamma.shape[:-2] + (1, 1)) * self.transitions_over_gamma
        else:
            t = self.gamma * self.transitions_over_gamma
        if self.chain:
            return t
        k = t.new_tensor([[1.0, -1.0], [-1.0, 1.0]])
        return t - (t * k).sum((-2, -1), keepdim=True) / 4.0 * k

    def _normalize_rows(self, scores: Tensor, padding_mask: Tensor | None, trans: Tensor, tdiv: int = 1,
                        gamma: float | None = None, fallback_scores: Tensor | None = None) -> Tensor:
        """Weights of the rows ``scores`` (N, T) under this module's form, with T = ``trans`` (2, 2) or, for
        ``trans`` (M, 2, 2), T = ``trans[(b // tdiv) % M]`` for row b, and γ = ``gamma`` (None: :attr:`gamma`);
        counts the rows. Computed in float32 for half-precision scores, returned in their dtype.
        ``fallback_scores``: the rows' softmax fallback uses these scores instead of ``scores`` (the per-head γ
        path passes s/γ_h as ``scores`` and s here, so that a dead row falls back to softmax(s) as with a fixed γ)."""
        padding_mask = _check_scores(scores, padding_mask)
        w, _, flags = _viterbi_rows(scores, trans, tdiv, padding_mask, self.reg,
                                    self.gamma if gamma is None else gamma, centre=self.form == "stable", flags=True)
        if fallback_scores is not None:
            dead = (flags & DEAD) != 0
            if torch.compiler.is_compiling() or bool(dead.any()):
                w = torch.where(dead[:, None], masked_softmax(fallback_scores, padding_mask).to(w.dtype), w)
        self._count_rows(flags)
        return w

    def _count_rows(self, flags: Tensor) -> None:
        """Add rows to the running counts, given their (N,) flags (:func:`structattn.ops.segmentation.row_flags`)."""
        dead = (flags & DEAD) != 0
        # Tensors, not Python ints: no host synchronisation per decoder step on an accelerator.
        self._rows += (flags & HAS_REAL).sum()
        self._dead += dead.sum()
        self._frozen += ((flags & FROZEN) != 0).sum()
        if self.recorded_dead is not None:  # per-row flags for offline analysis (attention_health.py)
            self.recorded_dead.append(dead)

    def pop_fallback_counts(self) -> tuple[int, int, int]:
        """(rows, dead rows, frozen rows) seen by the forwards since the last call (:func:`dead_rows`,
        :func:`frozen_rows`); resets the counts."""
        rows, dead, frozen = int(self._rows), int(self._dead), int(self._frozen)
        for b in (self._rows, self._dead, self._frozen):
            b.zero_()
        return rows, dead, frozen


class ViterbiAttention(_ViterbiState, _BilinearAttention):
    """Segmentation attention with smoothed Viterbi marginals (ICML 2018 §5, App. C.3); see
    :func:`viterbi_attention`.

    ``form="paper"``: θ from the raw scores and a raw transition parameter ``transitions`` = T, initialised at 0,
    exactly as in the paper. ``form="stable"`` (the default, :data:`structattn.options.DEFAULT_FORM`; provisional,
    see the module docstring): θ from the row-centred scores (:func:`centre_scores`) and T = γ·τ with
    τ = ``transitions_over_gamma`` initialised at [[c, 0], [0, c]], c = ``contiguity`` (None:
    :data:`~structattn.options.DEFAULT_CONTIGUITY`). γ = None: the paper's γ for ``reg`` (:data:`PAPER_GAMMA`).
    Parameters: M (``proj``) and T or τ. ``chain=False``: the chain-off ablation (independent positions on the
    same scores, κ ≡ 0; :meth:`effective_transitions`).

    Every forward adds to running counts of attention rows and dead (fallback) rows, read and reset with
    :meth:`pop_fallback_counts`."""

    def __init__(self, query_dim: int, source_dim: int, reg: str = DEFAULT_REG, gamma: float | None = None,
                 form: str = DEFAULT_FORM, contiguity: float | None = None, chain: bool = True):
        super().__init__(query_dim, source_dim)
        self._init_viterbi(reg, gamma, form, contiguity, (2, 2), chain)
        # Score std ≤ γ at init for states in [−1, 1]^d (see the module docstring): never start in the collapsed,
        # zero-derivative regime of ℓ2, nor in a temperature-dependent one.
        a = self.gamma * math.sqrt(3.0 / (query_dim * source_dim))
        nn.init.uniform_(self.proj.weight, -a, a)

    def normalize(self, scores, padding_mask):
        return self._normalize_rows(scores, padding_mask, self.effective_transitions())

    def extra_repr(self) -> str:
        r = super().extra_repr() + f", reg={self.reg!r}, gamma={self.gamma}, form={self.form!r}"
        r += f", contiguity={self.contiguity}" if self.form == "stable" else ""
        return r + ("" if self.chain else ", chain=False")


def build_attention(attention: str, query_dim: int, source_dim: int, reg: str = DEFAULT_REG,
                    gamma: float | None = None, form: str = DEFAULT_FORM, contiguity: float | None = None,
                    chain: bool = True, lam: float | None = None, temperature: float | None = None):
    """Factory: ``attention`` in :data:`ATTENTIONS` (the same word as the ``--attention`` flag of the plugins);
    ``reg``/``gamma``/``form``/``contiguity``/``chain`` are used by ``"viterbi"`` (and all but ``reg`` by
    ``"sparsemap"``, whose γ = None is :data:`SPARSEMAP_GAMMA`), with the defaults of
    :mod:`structattn.options` (γ = None takes the paper's value, :data:`PAPER_GAMMA`; ``form`` in
    :data:`VITERBI_FORMS`; contiguity None: the stable form's :data:`~structattn.options.DEFAULT_CONTIGUITY`);
    ``lam`` = λ by ``"fusedmax"`` and ``"oscarmax"`` only (None: :data:`structattn.options.DEFAULT_LAMBDA`);
    ``temperature`` = τ by the attentions of :data:`~structattn.options.TEMPERATURE_ATTENTIONS` (None: their
    :data:`~structattn.options.DEFAULT_TEMPERATURE`; ``ValueError`` for the Viterbi and SparseMAP attentions, whose
    temperature is γ)."""
    if temperature is not None and attention not in TEMPERATURE_ATTENTIONS:
        raise ValueError(f"temperature is an option of {', '.join(TEMPERATURE_ATTENTIONS)}; the {attention} "
                         "attention's temperature is gamma")
    if attention == "softmax":
        return SoftmaxAttention(query_dim, source_dim, temperature)
    if attention == "sparsemax":
        return SparsemaxAttention(query_dim, source_dim, temperature)
    if attention == "viterbi":
        return ViterbiAttention(query_dim, source_dim, reg, gamma, form, contiguity, chain)
    if attention == "fusedmax":
        return FusedmaxAttention(query_dim, source_dim, DEFAULT_LAMBDA[attention] if lam is None else lam,
                                 temperature)
    if attention == "oscarmax":
        return OscarmaxAttention(query_dim, source_dim, DEFAULT_LAMBDA[attention] if lam is None else lam,
                                 temperature)
    if attention == "entmax15":
        return Entmax15Attention(query_dim, source_dim, temperature)
    if attention == "sparsemap":
        return SparsemapAttention(query_dim, source_dim, gamma=gamma, form=form, contiguity=contiguity, chain=chain)
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")


# ---- multi-head attention (scores given, one chain per head and query) ---------------------------------------------


def _head_rows(scores: Tensor, padding_mask: Tensor | None, transitions: Tensor):
    """(B, H, Q, S) scores → (B·H·Q, S) rows, their padding mask, the transitions and the divisor ``tdiv`` of
    :func:`~structattn.ops.segmentation.segmentation_weights`: (H, 2, 2) with tdiv = Q (row b, in (batch, head, query)
    order, uses ``trans[(b // Q) % H]``, its head's), or (2, 2) / (1, 2, 2) shared by the heads."""
    if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.dim() != 4:
        raise ValueError("scores must be a floating-point tensor of shape (B, H, Q, S), got "
                         f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}")
    B, H, Q, S = scores.shape
    mask = None
    if padding_mask is not None:
        if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
            raise TypeError("padding_mask must be a bool tensor (True at padded positions)")
        try:
            mask = padding_mask.expand(B, H, Q, S).reshape(-1, S)
        except RuntimeError:
            raise ValueError(f"padding_mask of shape {tuple(padding_mask.shape)} does not broadcast to the scores "
                             f"{tuple(scores.shape)}") from None
    if not isinstance(transitions, Tensor):
        raise TypeError("transitions must be a torch.Tensor")
    if transitions.dim() == 3 and transitions.shape[1:] == (2, 2) and transitions.shape[0] in (1, H):
        trans = transitions  # one per head (or shared): indexed per row by the kernel, no per-row copy
    elif transitions.shape == (2, 2):
        trans = transitions
    else:
        raise ValueError(f"transitions must have shape (2, 2), (1, 2, 2) or (H, 2, 2) with H = {H} heads, got "
                         f"{tuple(transitions.shape)}")
    return scores.reshape(-1, S), mask, trans, Q


def multihead_viterbi_attention(
    scores: Tensor,
    transitions: Tensor,
    padding_mask: Tensor | None = None,
    reg: str = DEFAULT_REG,
    gamma: float | None = None,
    return_marginals: bool = False,
):
    """Segmentation attention (ICML 2018 §5) for multi-head attention: one smoothed-Viterbi chain over the source
    per (sequence, head, query), w_t ∝ p(y_t = 1) as in :func:`viterbi_attention`.

    Args:
        scores: (B, H, Q, S) scores, e.g. a Transformer's scaled dot products q·k/√d of H heads and Q queries.
        transitions: (H, 2, 2) — one transition matrix T per head —, or (2, 2) / (1, 2, 2) shared by the heads.
        padding_mask: optional bool tensor broadcastable to (B, H, Q, S) (e.g. a key padding mask as
            (B, 1, 1, S)), True at padded positions, any layout.
        reg, gamma, return_marginals: as in :func:`viterbi_attention` (γ = None: the paper's γ for ``reg``).

    Returns:
        (B, H, Q, S) weights (and the marginals p(y_t = 1) if asked), each row as :func:`viterbi_attention` gives
        it: the chain runs over the real positions only, padding gets exactly 0, an all-zero ℓ2 row falls back to
        softmax.
    """
    gamma = _gamma(reg, gamma)
    rows, mask, trans, tdiv = _head_rows(scores, padding_mask, transitions)
    w, p = _viterbi_rows(rows, trans, tdiv, _check_scores(rows, mask), reg, gamma)
    return (w.view(scores.shape), p.view(scores.shape)) if return_marginals else w.view(scores.shape)


class ViterbiNormalizer(_ViterbiState, nn.Module):
    """The segmentation attention's normaliser on its own, for multi-head attention (e.g. a Transformer's
    encoder-decoder attention, whose scaled dot products replace the bilinear scores of §5): maps scores
    (B, H, Q, S) to weights with :func:`multihead_viterbi_attention`, with ``num_heads`` learned transition
    matrices (one per head; ``num_heads=1`` shares one across the heads).

    Same parametrisations and defaults as :class:`ViterbiAttention` (module docstring): ``form="paper"`` learns T
    (``transitions``, (num_heads, 2, 2), from 0) on the raw scores; ``form="stable"`` centres each row's scores
    over its real positions and learns τ = T/γ (``transitions_over_gamma``, from [[c, 0], [0, c]] per head). The
    chain runs in float32 for float16/bfloat16 scores; the weights come back in the scores' dtype. Every forward
    adds to the running counts of :meth:`pop_fallback_counts` (one row per sequence, head and query).

    ``gamma_mode`` (:data:`structattn.options.GAMMA_MODES`): ``"fixed"`` (default, the paper's: one γ for every
    head), ``"learned"``: each transition matrix m (each head, or the one shared matrix) has its own temperature
    γ_m = exp(``log_gamma[m]``), a parameter initialised at log γ, or ``"scaled"``: the same parameter, set once
    on the first training batch to log(γ·σ_m), σ_m the head's score scale (:meth:`_scale_gamma`), then learned.
    ``learned`` and ``scaled`` depart from the paper (App. C.3 fixes γ);
    why: a Transformer's scores q·k/√d are O(1) (row std 0.4 at initialisation, ~1 after 200 updates on the Bible
    data, docs/transformer.md) against the paper's γ = 10 of ℓ2, so θ/γ is ~0.1 and the ℓ2 chain is nearly dense;
    the bilinear LSTM attention starts its scores on the γ scale and has no such mismatch. γ_m is applied exactly:
    since Vit_{γΩ}(θ) = γ·Vit_Ω(θ/γ), the marginals with temperature γ_h are those with temperature 1 of θ/γ_h,
    so head h's rows are run as s/γ_h with T_h/γ_h at γ = 1 (the same weights, a row that falls back to softmax
    falls back to softmax(s) as with a fixed γ), and the gradient reaches log γ_h through that division. In the
    stable form T_h = γ_h·τ_h, so τ_h (and κ_h) stay on the head's own γ scale as γ_h moves."""

    def __init__(self, num_heads: int = 1, reg: str = DEFAULT_REG, gamma: float | None = None,
                 form: str = DEFAULT_FORM, contiguity: float | None = None, chain: bool = True,
                 gamma_mode: str = DEFAULT_GAMMA_MODE):
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.num_heads = num_heads
        self._init_viterbi(reg, gamma, form, contiguity, (num_heads, 2, 2), chain, gamma_mode)

    def forward(self, scores: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """scores (B, H, Q, S) with H = ``num_heads`` (or any H when ``num_heads`` is 1), padding_mask bool
        broadcastable to it (True at padding) or None → weights (B, H, Q, S)."""
        if scores.dim() == 4 and self.num_heads != 1 and scores.shape[1] != self.num_heads:
            raise ValueError(f"{type(self).__name__} was built for {self.num_heads} heads, got scores of shape "
                             f"{tuple(scores.shape)}")
        if self.gamma_mode == "fixed":
            rows, mask, trans, tdiv = _head_rows(scores, padding_mask, self.effective_transitions())
            return self._normalize_rows(rows, mask, trans, tdiv).view(scores.shape)
        # Per-head γ_h: run head h at γ = 1 on (s/γ_h, T_h/γ_h) (class docstring).
        _head_rows(scores, padding_mask, self.effective_transitions())  # the argument checks, before any arithmetic
        if self.gamma_mode == "scaled" and self.training and not torch.compiler.is_compiling() \
                and not bool(self.gamma_scaled):
            self._scale_gamma(scores, padding_mask)
        g = self.matrix_gammas().to(_upcast_half(scores).dtype)  # (M,), M = num_heads or 1
        scaled = _upcast_half(scores)
        if padding_mask is not None:
            # padded entries may be ±inf: 0 there, or their (zero) gradient times s/γ² would be NaN for log γ
            scaled = scaled.masked_fill(padding_mask, 0.0)
        scaled = scaled / g.view(1, -1, 1, 1)
        trans = self.effective_transitions().to(g.dtype) / g.view(-1, 1, 1)
        rows, mask, trans, tdiv = _head_rows(scaled, padding_mask, trans)
        w = self._normalize_rows(rows, mask, trans, tdiv, gamma=1.0, fallback_scores=scores.reshape(rows.shape))
        return w.to(scores.dtype).view(scores.shape)

    @torch.no_grad()
    def _scale_gamma(self, scores: Tensor, padding_mask: Tensor | None) -> None:
        """``gamma_mode="scaled"``: log γ_m ← log(γ·σ_m), once, from the first training batch. σ_m is the head's
        score scale: the root mean square over its rows (all rows for a shared matrix) of the standard deviation of
        a row's scores over its real positions — the spread that θ/γ compares with γ (the level is removed by the
        stable form's centring and does not decide sparsity). Averaged over the ranks of a distributed run, so that
        every replica starts from the same γ."""
        s = _upcast_half(scores).detach()
        B, H, Q, S = s.shape
        real = torch.ones_like(s, dtype=torch.bool) if padding_mask is None else ~padding_mask.expand(B, H, Q, S)
        n = real.sum(-1, keepdim=True)
        x = s.masked_fill(~real, 0.0)
        mean = x.sum(-1, keepdim=True) / n.clamp_min(1)
        var = ((x - mean).masked_fill(~real, 0.0).pow(2).sum(-1) / n.squeeze(-1).clamp_min(1))  # (B, H, Q)
        rows = (n.squeeze(-1) > 0).to(s.dtype)
        per_head = torch.stack([(var * rows).sum((0, 2)), rows.sum((0, 2))])  # (2, H): Σ var, row count
        if self.log_gamma.numel() == 1:
            per_head = per_head.sum(1, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(per_head)
        sigma = (per_head[0] / per_head[1].clamp_min(1)).sqrt()
        # a head whose scores are all equal (σ = 0) keeps γ itself: no scale to be relative to
        sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
        self.log_gamma.copy_((self.gamma * sigma).log().to(self.log_gamma.dtype))
        self.gamma_scaled.fill_(True)

    def extra_repr(self) -> str:
        r = f"num_heads={self.num_heads}, reg={self.reg!r}, gamma={self.gamma}, form={self.form!r}"
        r += f", contiguity={self.contiguity}" if self.form == "stable" else ""
        r += f", gamma_mode={self.gamma_mode!r}" if self.gamma_mode != "fixed" else ""
        return r + ("" if self.chain else ", chain=False")


# ---- SparseMAP segmentation attention -----------------------------------------------------------------------------


class SparsemapStructures(NamedTuple):
    """What :func:`sparsemap_attention` returns beside the weights when ``return_structures=True``.

    Attributes:
        structures: (B, K, T) bool, the active segmentations' masks (y_t = 1: attend to x_t), False on padding.
        probabilities: (B, K) float64, their probabilities α in decreasing order (0 on unused slots); Σ_k = 1 on
            rows with a real position. In eager mode K is trimmed to the largest support in the batch.
        marginals: (B, T) p(y_t = 1) = Σ_k α_k structures[:, k, t] (before normalisation and fallback).
        num_structures: (B,) int64, the support size of each row.
        iterations: (B,) int32, active-set iterations spent on each row.
        converged: (B,) bool, False where the iteration cap stopped the solver (a RuntimeWarning was issued).
        flags: (B,) int32 row flags of :func:`structattn.ops.segmentation.row_flags` (dead = fell back to softmax,
            frozen = one structure, zero Jacobian).
    """

    structures: Tensor
    probabilities: Tensor
    marginals: Tensor
    num_structures: Tensor
    iterations: Tensor
    converged: Tensor
    flags: Tensor


def _check_solver(tol, max_iter) -> tuple[float, int]:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    return float(tol), max_iter


def _sparsemap_parts(scores, transitions, padding_mask, tol, max_iter, structures: bool):
    """Checked arguments → :func:`sparsemap_weights` (w and p in the scores' dtype); the structures only if asked."""
    padding_mask = _check_scores(scores, padding_mask)
    trans = check_transitions(transitions, scores.shape[0])
    tol, max_iter = _check_solver(tol, max_iter)
    for name, x in (("transitions", trans), ("padding_mask", padding_mask)):
        if x is not None and x.device != scores.device:
            raise ValueError(f"{name} is on {x.device}, the scores on {scores.device}: put them on one device")
    w, p, flags, alpha, ys, iters, conv = sparsemap_weights(_upcast_half(scores), trans, padding_mask, tol, max_iter,
                                                           structures)
    if w.dtype != scores.dtype:
        w, p = w.to(scores.dtype), p.to(scores.dtype)
    return w, p, flags, alpha, ys, iters, conv


def sparsemap_attention(
    scores: Tensor,
    transitions: Tensor,
    padding_mask: Tensor | None = None,
    tol: float = SPARSEMAP_TOL,
    max_iter: int = SPARSEMAP_MAX_ITER,
    return_structures: bool = False,
):
    """SparseMAP segmentation attention: w_t ∝ μ*(y_t = 1) with μ* the SparseMAP point of the §5 chain.

    On the chain of :func:`viterbi_attention` (θ[t, 1, j] = s_t + T[1, j], θ[t, 0, j] = T[0, j], free start state),

        μ* = argmax_{μ = [u; v] ∈ conv(Y)} ⟨θ, μ⟩ − ½‖u‖²     (Niculae et al., ICML 2018),

    with u the *state* (unary) marginals u[t, i] = p(y_t = i), both states, and v the transition marginals, which
    enter linearly — the paper's form for sequences (we do not regularise all edge marginals of θ's (T, 2, 2)
    representation). μ* is a convex combination of a few whole segmentations, found by the active-set method with
    the hard Viterbi argmax as the oracle; the derivative is the closed form on the active set, not autograd through
    the iterations (:mod:`structattn.ops.sparsemap`). The regulariser has a fixed unit scale: scale the scores and T
    to change the sparsity (at T = 0 the chain factorises and p_t = clip((1 + s_t)/2, 0, 1), the ℓ2 Viterbi
    attention with γ = 1).

    The chain runs over the real positions only (padding in any layout is compacted away). If p(y_t = 1) = 0 for
    every real t (all mass on y = 0…0), the row falls back to softmax(s) over its real positions, as the Viterbi
    attention does.

    Args:
        scores: (B, T) unary scores s_t.
        transitions: (2, 2) or (B, 2, 2) transition matrix T (T[i, j] scores state j at t−1 → state i at t).
        padding_mask: optional (B, T) bool, True at padded positions.
        tol: tolerance on the Frank–Wolfe gap of the active set, relative to 1 + |objective|.
        max_iter: cap on active-set iterations per row; rows that hit it keep a feasible, suboptimal point, are
            flagged (``converged`` False) and a RuntimeWarning is issued.
        return_structures: also return a :class:`SparsemapStructures`.

    Returns:
        (B, T) weights (and the :class:`SparsemapStructures` if asked): non-negative, summing to 1 over real
        positions, exactly 0 on padding, all 0 on a row without real position. Differentiable w.r.t. ``scores``
        and ``transitions`` (once; not twice).
    """
    w, p, flags, alpha, ys, iters, conv = _sparsemap_parts(scores, transitions, padding_mask, tol, max_iter,
                                                           return_structures)
    if not return_structures:
        return w
    count = (alpha > 0).sum(1)
    if not torch.compiler.is_compiling() and alpha.shape[1]:
        k = max(int(count.max()), 1)
        alpha, ys = alpha[:, :k], ys[:, :k]
    return w, SparsemapStructures(ys, alpha, p, count, iters, conv, flags)


# SPARSEMAP_GAMMA (the SparseMAP modules' default γ) is defined, with its reason, in structattn.options.


class _SparsemapState(_ViterbiState):
    """What every SparseMAP attention module holds (mixin of :class:`SparsemapAttention` and
    :class:`SparsemapNormalizer`): the solver's tolerance and iteration cap, a temperature γ, the Viterbi
    attention's form and transition parameter, and running counts of rows, dead and frozen rows, active structures
    and rows that did not converge.

    How T is parametrised and learned: exactly as the Viterbi attention's (:class:`_ViterbiState`, the module
    docstring), with the same options and defaults (:mod:`structattn.options`) — T[i, j] scores state j at t−1 →
    state i at t, θ[t, 1, j] = s_t + T[1, j], θ[t, 0, j] = T[0, j]; ``form="stable"`` (default) centres each row's
    scores over its real positions and learns τ = T/γ (``transitions_over_gamma``) from the contiguity prior
    [[c, 0], [0, c]]; ``form="paper"`` learns a raw T (``transitions``) from 0 on the raw scores; ``chain=False``
    holds the coupling κ at 0. The temperature enters as the regulariser's weight,

        μ* = argmax_{μ ∈ conv(Y)} ⟨θ, μ⟩ − (γ/2)‖u‖² = SparseMAP(θ/γ)   (:func:`sparsemap_attention` of θ/γ),

    γ = :data:`SPARSEMAP_GAMMA` by default (``form="paper", gamma=1`` is :func:`sparsemap_attention` on the raw
    scores and T). T is learned by gradient steps through the closed-form derivative on the active set. A dead row
    (all mass on y = 0…0) falls back to softmax(s̃/γ), s̃ the (centred) scores."""

    def _init_sparsemap(self, tol: float, max_iter: int, shape: tuple, gamma: float | None, form: str,
                        contiguity: float | None, chain: bool) -> None:
        self.tol, self.max_iter = _check_solver(tol, max_iter)
        self._init_viterbi("l2", SPARSEMAP_GAMMA if gamma is None else gamma, form, contiguity, shape, chain)
        self.reg = None  # not a smoothed Viterbi: SparseMAP's own regulariser, (γ/2)‖u‖² on the state marginals
        # _total_*: never reset (read by the attention dumps through structure_totals, beside the training logs,
        # which pop the others)
        for name in ("_srows", "_structures", "_unconverged", "_total_rows", "_total_structures"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long), persistent=False)

    def _sparsemap_rows(self, scores: Tensor, padding_mask: Tensor | None, trans: Tensor) -> Tensor:
        padding_mask = _check_scores(scores, padding_mask)
        scores = _upcast_half(scores)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask, 0.0)  # −inf on padding (fairseq): ignored, no NaN gradient
        if self.form == "stable":
            scores = centre_rows(scores, padding_mask)
        # the statistics need the support sizes, not the structures themselves (not scattered back: see
        # sparsemap_weights)
        w, _, flags, alpha, _, _, conv = _sparsemap_parts(scores / self.gamma, trans / self.gamma, padding_mask,
                                                          self.tol, self.max_iter, False)
        count = (alpha > 0).sum(1)
        self._count_rows(flags)
        real = (flags & HAS_REAL) != 0
        self._srows += real.sum()
        self._structures += count.sum()
        self._unconverged += (~conv).sum()
        self._total_rows += real.sum()
        self._total_structures += count.sum()
        return w

    def _sparsemap_repr(self) -> str:
        r = f"gamma={self.gamma}, form={self.form!r}"
        r += f", contiguity={self.contiguity}" if self.form == "stable" else ""
        return r + ("" if self.chain else ", chain=False") + f", tol={self.tol}, max_iter={self.max_iter}"

    def pop_structure_counts(self) -> tuple[int, int, int]:
        """(rows, active structures summed over them, rows that did not converge) since the last call; resets
        them. structures / rows is the mean support size."""
        out = int(self._srows), int(self._structures), int(self._unconverged)
        for b in (self._srows, self._structures, self._unconverged):
            b.zero_()
        return out


class SparsemapAttention(_SparsemapState, _BilinearAttention):
    """Bilinear SparseMAP segmentation attention (:func:`sparsemap_attention` of θ/γ) with a learned transition
    matrix, parametrised as the Viterbi attention's (:class:`_SparsemapState`): ``gamma`` (None:
    :data:`SPARSEMAP_GAMMA`), ``form`` (stable: centred scores and τ = T/γ from the contiguity prior; paper: raw T
    from 0), ``contiguity``, ``chain``. M starts at U(−a, a), a = γ·√(3/(d_x d_z)), so that the initial score std
    is at most γ for states in [−1, 1]^d (as :class:`ViterbiAttention`). At unit score scale the support is large
    (every position with |s_t/γ| < 1 is fractional: ~27 structures per row of 50 positions at score std γ,
    benchmarks/RESULTS.md "SparseMAP normaliser"); larger scores or a contiguity preference in T make it sparser.

    Every forward adds to running counts read and reset by :meth:`pop_fallback_counts` (rows, dead rows that fell
    back to softmax, frozen rows with one structure), the same contract as the Viterbi modules, and by
    :meth:`pop_structure_counts` (rows, active structures, rows that did not converge)."""

    def __init__(self, query_dim: int, source_dim: int, tol: float = SPARSEMAP_TOL,
                 max_iter: int = SPARSEMAP_MAX_ITER, gamma: float | None = None, form: str = DEFAULT_FORM,
                 contiguity: float | None = None, chain: bool = True):
        super().__init__(query_dim, source_dim)
        self._init_sparsemap(tol, max_iter, (2, 2), gamma, form, contiguity, chain)
        a = self.gamma * math.sqrt(3.0 / (query_dim * source_dim))
        nn.init.uniform_(self.proj.weight, -a, a)

    def normalize(self, scores, padding_mask):
        return self._sparsemap_rows(scores, padding_mask, self.effective_transitions())

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._sparsemap_repr()


def structure_totals(model: nn.Module) -> tuple[int, int] | None:
    """(attention rows, active structures summed over them) of every SparseMAP module of ``model`` since it was
    built (counts that the training logs do not reset), or None when ``model`` has no SparseMAP attention. The
    attention dumps take the difference over a translation run: the mean number of active segmentations per row
    of every row the decoder computed (all beam hypotheses, all steps)."""
    mods = [m for m in model.modules() if isinstance(m, _SparsemapState)]
    if not mods:
        return None
    return sum(int(m._total_rows) for m in mods), sum(int(m._total_structures) for m in mods)


# ---- per-head normalisers of multi-head attention, for every attention -----------------------------------------


def _rows_of(scores: Tensor, padding_mask: Tensor | None):
    """(B, H, Q, S) scores and a mask broadcastable to them → (B·H·Q, S) rows and their mask (None: no mask)."""
    rows, mask, _, _ = _head_rows(scores, padding_mask, scores.new_zeros(2, 2))
    return rows, mask


class HeadNormalizer(nn.Module):
    """A parameter-free attention applied to every (sentence, head, query) row of multi-head scores (B, H, Q, S)
    over the source positions: ``softmax``, ``sparsemax`` (plain sparsemax(s); the bilinear module's temperature is
    a device of the LSTM's scores, not of the Transformer's scaled dot products), ``fusedmax`` / ``oscarmax``
    (λ = ``lam``; the total variation links neighbouring source positions of each head's row) or ``entmax15``.
    Padding (a bool mask broadcastable to the scores, True at padding, any layout) gets exactly 0; padded scores
    may be −inf (fairseq fills them so)."""

    KINDS = ("softmax", "sparsemax", "fusedmax", "oscarmax", "entmax15")

    def __init__(self, attention: str, lam: float | None = None):
        super().__init__()
        if attention not in self.KINDS:
            raise ValueError(f"HeadNormalizer: attention must be one of {self.KINDS}, got {attention!r}")
        self.attention = attention
        self.lam = check_lambda(DEFAULT_LAMBDA[attention] if lam is None else lam) \
            if attention in DEFAULT_LAMBDA else None

    def forward(self, scores: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        rows, mask = _rows_of(scores, padding_mask)
        mask = _check_scores(rows, mask)
        if self.attention == "softmax":
            w = softmax_attention(rows, mask)
        elif self.attention == "sparsemax":
            w = sparsemax_attention(rows, mask)
        else:
            if mask is not None:  # −inf on padding: the operators ignore padded entries, their gradient must be 0
                rows = rows.masked_fill(mask, 0.0)
            if self.attention == "fusedmax":
                w = fusedmax_attention(rows, mask, self.lam)
            elif self.attention == "oscarmax":
                w = oscarmax_attention(rows, mask, self.lam)
            else:
                w = entmax15_attention(rows, mask)
        return w.view(scores.shape)

    def extra_repr(self) -> str:
        return repr(self.attention) + ("" if self.lam is None else f", lam={self.lam}")


class SparsemapNormalizer(_SparsemapState, nn.Module):
    """SparseMAP segmentation attention (:func:`sparsemap_attention`) for multi-head attention: one SparseMAP chain
    over the source per (sentence, head, query) row of scores (B, H, Q, S), with ``num_heads`` learned transition
    matrices (``transitions``, (num_heads, 2, 2), from 0: one per head, or one shared by the heads with
    ``num_heads=1``), parametrised as in :class:`SparsemapAttention` (:class:`_SparsemapState`). Counts as
    :class:`SparsemapAttention` does."""

    def __init__(self, num_heads: int = 1, tol: float = SPARSEMAP_TOL, max_iter: int = SPARSEMAP_MAX_ITER,
                 gamma: float | None = None, form: str = DEFAULT_FORM, contiguity: float | None = None,
                 chain: bool = True):
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.num_heads = num_heads
        self._init_sparsemap(tol, max_iter, (num_heads, 2, 2), gamma, form, contiguity, chain)

    def forward(self, scores: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if scores.dim() == 4 and self.num_heads != 1 and scores.shape[1] != self.num_heads:
            raise ValueError(f"{type(self).__name__} was built for {self.num_heads} heads, got scores of shape "
                             f"{tuple(scores.shape)}")
        rows, mask = _rows_of(scores, padding_mask)
        Q = scores.shape[2]
        # row n is (sentence, head, query) in that order: its head is (n // Q) % H
        head = torch.arange(rows.shape[0], device=rows.device) // Q % self.num_heads
        return self._sparsemap_rows(rows, mask, self.effective_transitions()[head]).view(scores.shape)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, " + self._sparsemap_repr()


def build_normalizer(attention: str, num_heads: int = 1, reg: str = DEFAULT_REG, gamma: float | None = None,
                     form: str = DEFAULT_FORM, contiguity: float | None = None, chain: bool = True,
                     lam: float | None = None, gamma_mode: str = DEFAULT_GAMMA_MODE) -> nn.Module:
    """Factory of the per-head normaliser of a multi-head attention (maps scores (B, H, Q, S) and a padding mask
    broadcastable to them to weights): :class:`ViterbiNormalizer` (``reg``/``gamma``/``form``/``contiguity``/
    ``chain`` as in :func:`build_attention`) and :class:`SparsemapNormalizer` with ``num_heads`` transition
    matrices (SparseMAP: ``gamma``/``form``/``contiguity``/``chain`` as the Viterbi attention's, γ = None:
    :data:`SPARSEMAP_GAMMA`), :class:`HeadNormalizer` (λ = ``lam`` for fusedmax/oscarmax) for the others.
    ``gamma_mode`` (:data:`~structattn.options.GAMMA_MODES`) is the Viterbi normaliser's only."""
    if attention == "viterbi":
        return ViterbiNormalizer(num_heads, reg, gamma, form, contiguity, chain, gamma_mode)
    if gamma_mode != DEFAULT_GAMMA_MODE:
        raise ValueError(f"gamma_mode {gamma_mode!r} is an option of the Viterbi normaliser, not of {attention!r}")
    if attention == "sparsemap":
        return SparsemapNormalizer(num_heads, gamma=gamma, form=form, contiguity=contiguity, chain=chain)
    if attention in HeadNormalizer.KINDS:
        return HeadNormalizer(attention, lam)
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
