"""Structured losses for supervised sequence tagging with the smoothed Viterbi Vit_Ω (ICML 2018 §4.1–4.2).

Mensch & Blondel, "Differentiable Dynamic Programming for Structured Prediction and Attention", ICML 2018. §4.1
relaxes the cost-augmented structured hinge loss (7) by replacing the hard max LP with DP_Ω:

    ℓ_{C,Ω}(Y_true; θ) = DP_Ω(θ + C_{Y_true}) − ⟨Y_true, θ⟩,

and recovers the structured perceptron with ℓ_{0,0} (Ω = 0, the hard max) and the CRF loss with ℓ_{0,−H}. We
implement the cost-free losses ℓ_{0,Ω} that §4.2 trains (the "surrogate convex loss" of Table 1) for DP_Ω = Vit_Ω,
with Ω ∈ {−γH, (γ/2)‖·‖²} and the unregularised perceptron (``reg=None``) as the paper's baseline.

Where we depart: a constant in θ. The paper's ℓ_{0,Ω} can be negative for Ω = (γ/2)‖·‖² (every smoothed max
along the gold path then subtracts Ω(e_j) = γ/2). We add the term Ω_G(Y) below, which does not depend on θ (same
gradient, same minimisers), so that the loss is a Fenchel–Young-type loss:

    ℓ_Ω(θ; Y) = Vit_Ω(θ) − ⟨θ, Y⟩ + Ω_G(Y) ≥ 0,                 ∇_θ ℓ_Ω(θ; Y) = E − Y,   E = ∇Vit_Ω(θ) (Prop. 3).

Ω_G(Y) is the regulariser of the random walk of §2.3 that visits Y: Alg. 3 computes, at each node, a smoothed max
max_Ω(x) = max_{q ∈ △} ⟨q, x⟩ − Ω(q) attained at q = ∇max_Ω(x), hence (by unrolling the recursion, with the walk's
local distributions q^Y read off Y) Vit_Ω(θ) ≥ ⟨θ, Y⟩ − Ω_G(Y) with

    Ω_G(Y) = Σ_{t, i} u_t[i] · Ω(Y[t, i, :] / u_t[i]) + Ω(u_{L−1}),        u_t[i] = Σ_j Y[t, i, j],

equality iff q^Y equals Alg. 3's q at every node the walk of Y visits. For a one-hot path Y, Ω_G(Y) = (L + 1)·Ω(e)
(0 for −γH, (L + 1)γ/2 for ℓ2); with a uniform free start state (see :func:`tags_to_path`) the start node contributes
Ω(1/S) instead. Consequences, all tested: the −γH loss is > 0 always and, when θ[:, 0, i, j] does not depend on j (as
in §4.2's θ_1), with ``start="uniform"`` it is exactly the CRF negative log-likelihood −γ log p(y_1..y_L); the ℓ2 loss
is 0 iff at every node of the gold path the gold predecessor wins the local smoothed max by a margin ≥ γ (so that the
local sparsemax is one-hot); the perceptron loss LP(θ) − ⟨θ, Y⟩ is 0 iff the gold path is a highest-scoring path.

Gradients. The Ω losses differentiate through :func:`structattn.viterbi_value`, whose custom backward is Alg. 3's
backward sweep (the marginals E, no autograd through the dynamic programme) and whose double backward is Alg. 4. The
perceptron's value LP(θ) is the hard Viterbi recursion with a custom backward returning the argmax path Y*(θ) (a
subgradient, eq. (5)), lowest state index on ties. The target is a constant: no gradient flows into ``Y``.

Generic part. :func:`structured_loss_from_value` and :func:`perspective_regularization` do not know the graph:
a loss for another DP_Ω (DTW_Ω) is its value, ⟨θ, Y⟩ and its own Ω_G from the same perspective sums.

DTW_Ω (§3.2, App. B.3; the supervised alignment of §4.3). The same construction on the DTW DAG: :func:`dtw_loss`
is ℓ_Ω(θ; Y) = DTW_Ω(θ) − ⟨θ, Y⟩ + Ω_G(Y) for a gold monotone alignment matrix Y ∈ Y (a 0/1 (N, M) matrix whose
ones form a path (0, 0) → (N−1, M−1) of →, ↓, ↘ moves), gradient E − Y with E = ∇DTW_Ω(θ) (Alg. 5's backward, through
:func:`structattn.dtw_value`). Every cell of the path has one incoming edge of mass 1 (the first cell's edge comes
from the start node v_{0,0}), so Ω_G(Y) = |Y|·Ω(e) = |Y|·γ/2 for ℓ2 (|Y| the number of cells of the path) and 0 for
−γH; there is no final max in DTW_Ω (the value is v_{N,M} itself), hence no end term. The −γH loss is exactly
−γ log p(Y), p(Y) ∝ exp(⟨Y, θ⟩/γ), the negative log-likelihood of the gold alignment under the Gibbs distribution
(DTW_{−γH}(θ) = γ log Σ_Y exp(⟨Y, θ⟩/γ)): > 0 unless Y is the only alignment (N = 1 or M = 1). The ℓ2 loss is 0 iff
at every cell of the path, the DP value v of the gold predecessor beats those of the other existing parents by ≥ γ.
``reg=None`` is the unregularised LP(θ) − ⟨θ, Y⟩ (max over alignments, a structured perceptron), subgradient
Y*(θ) − Y. Targets in conv(Y) (soft alignments) are refused: their edge flows, hence Ω_G, are not determined by the
cell masses. :func:`dtw_area_loss` is §4.3's non-convex relaxed loss Δ(Y_true, ∇DTW_Ω(θ)) = ‖L(E − Y_true)ᵀ‖²_F
(§4.1 "Non-convex losses"), differentiated through Alg. 6. The cost-augmented ℓ_{C,Ω} is not implemented.

Layout: θ is (B, T, S, S) with θ[b, t, i, j] scoring state j at step t−1 → state i at step t (the
:mod:`structattn.ops.viterbi` convention); the state before step 0 is free (v_0 = 0_S). ``lengths`` (B,) marks
steps t ≥ lengths[b] as padding: padded steps of θ and Y are ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops.dtw import _lengths as _dtw_lengths
from .ops.dtw import _real_mask as _dtw_real_mask
from .ops.dtw import dtw_marginals, dtw_value
from .ops.smoothed_max import check_reg_gamma
from .ops.viterbi import _check_lengths, viterbi_value

__all__ = [
    "LOSS_REGULARIZERS",
    "tags_to_path",
    "viterbi_loss",
    "ViterbiLoss",
    "hard_viterbi",
    "perspective_regularization",
    "viterbi_path_regularization",
    "structured_loss_from_value",
    "dtw_loss",
    "DTWLoss",
    "hard_dtw",
    "check_alignment",
    "dtw_path_regularization",
    "dtw_area_loss",
    "DTWAreaLoss",
]

LOSS_REGULARIZERS = ("entropy", "l2", None)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ---- input checks ----------------------------------------------------------------------------------------------


def _check_loss_reg(reg, gamma) -> float | None:
    if reg is None:  # the structured perceptron: Ω = 0, γ unused
        return None
    if reg not in LOSS_REGULARIZERS:
        raise ValueError(f"reg must be one of {LOSS_REGULARIZERS} (None: the unregularised perceptron), got {reg!r}")
    return check_reg_gamma(reg, gamma)


def _check_reduction(reduction) -> None:
    """The ``reduction`` of the loss modules: ``"mean"`` or ``"sum"`` over the batch, or ``"none"``."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    """``loss`` (per sequence) reduced as :func:`_check_reduction` accepted."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_theta(theta) -> None:
    if not isinstance(theta, Tensor):
        raise TypeError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dim() != 4 or theta.shape[-1] != theta.shape[-2]:
        raise ValueError(f"theta must have shape (B, T, S, S), got {tuple(theta.shape)}")
    if theta.shape[-1] < 2:
        raise ValueError(f"theta needs S >= 2 states, got S={theta.shape[-1]}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got {theta.dtype}")


def _step_mask(lengths: Tensor | None, B: int, T: int, device) -> Tensor:
    if lengths is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in [0, T={T}], got values in [{int(lengths.min())}, {int(lengths.max())}]")
    return torch.arange(T, device=device)[None, :] < lengths[:, None]


# ---- gold tag sequences → path tensors --------------------------------------------------------------------------


def tags_to_path(tags: Tensor, num_states: int, lengths=None, *, start="uniform", dtype=None) -> Tensor:
    """The path tensor Y ∈ {0, 1}^{B×T×S×S} (App. B.2 "Representation") of gold tag sequences.

    ``Y[b, t, i, j] = 1`` iff the tag at step t is i and the tag at step t−1 is j, for 1 ≤ t < lengths[b]. Step 0
    moves from the free start state (the state before the first tag, v_0 = 0_S in Alg. 3) to ``tags[b, 0]``:

    * ``start="uniform"`` (default): ``Y[b, 0, tags[b, 0], :] = 1/S``, the average of the S paths that differ only in
      the start state. This is the right target when θ[:, 0] does not depend on the previous state (§4.2's
      θ_{1,i,j} = w_iᵀx_1 + b_i): all S start states are then equivalent, and ℓ_{−γH} is the exact CRF NLL.
    * ``start=k`` (int) or a (B,) integer tensor: the start state is k (one-hot Y, a vertex of conv(Y)).

    Args:
        tags: (B, T) integer tensor; entries at padded steps (t ≥ lengths[b]) are ignored (any value, e.g. −100).
        num_states: S ≥ 2.
        lengths: optional (B,) integer tensor in [0, T].
        dtype: floating dtype of Y (default: torch's default dtype).

    Returns:
        (B, T, S, S) tensor, zero at padded steps.
    """
    if not isinstance(tags, Tensor):
        raise TypeError(f"tags must be a torch.Tensor, got {type(tags).__name__}")
    if tags.is_floating_point() or tags.is_complex() or tags.dtype == torch.bool:
        raise TypeError(f"tags must have an integer dtype, got {tags.dtype}")
    if tags.dim() != 2:
        raise ValueError(f"tags must have shape (B, T), got {tuple(tags.shape)}")
    if isinstance(num_states, bool) or not isinstance(num_states, int) or num_states < 2:
        raise ValueError(f"num_states must be an int >= 2, got {num_states!r}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    B, T = tags.shape
    S = num_states
    device = tags.device
    lengths = None if lengths is None else _check_lengths(lengths, B, device)
    mask = _step_mask(lengths, B, T, device)
    tags = tags.long()
    real = tags[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= S):
        raise ValueError(
            f"tags on real steps must lie in [0, {S}), got values in [{int(real.min())}, {int(real.max())}]")
    cur = torch.where(mask, tags, torch.zeros_like(tags))  # padded entries → 0, masked out below
    Y = torch.zeros(B, T, S * S, dtype=dtype, device=device)
    if T > 1:
        flat = cur[:, 1:] * S + cur[:, :-1]
        Y[:, 1:].scatter_(2, flat[..., None], mask[:, 1:, None].to(dtype))
    Y = Y.view(B, T, S, S)
    if T == 0:
        return Y
    first = mask[:, 0]
    if isinstance(start, str):
        if start != "uniform":
            raise ValueError(f"start must be 'uniform', an int state or a (B,) integer tensor, got {start!r}")
        row = torch.full((B, S), 1.0 / S, dtype=dtype, device=device) * first[:, None].to(dtype)
        Y[torch.arange(B, device=device), 0, cur[:, 0]] = row
        return Y
    if isinstance(start, bool):
        raise TypeError("start must be 'uniform', an int state or a (B,) integer tensor, got a bool")
    start_t = torch.as_tensor(start, device=device)
    if start_t.is_floating_point() or start_t.dtype == torch.bool:
        raise TypeError(f"start must be an integer state, got dtype {start_t.dtype}")
    start_t = start_t.long().expand(B) if start_t.dim() == 0 else start_t.long()
    if start_t.shape != (B,):
        raise ValueError(f"start must be an int or have shape ({B},), got {tuple(start_t.shape)}")
    if B and (int(start_t.min()) < 0 or int(start_t.max()) >= S):
        raise ValueError(
            f"start states must lie in [0, {S}), got values in [{int(start_t.min())}, {int(start_t.max())}]")
    Y[torch.arange(B, device=device), 0, cur[:, 0], start_t] = first.to(dtype)
    return Y


def _check_path(Y: Tensor, theta: Tensor, mask: Tensor) -> None:
    """Y must be a flow of mass 1 on the trellis (an element of conv(Y)): ≥ 0, each real step sums to 1 and the
    mass entering each state at step t−1 leaves it at step t. Otherwise ℓ_Ω has no lower bound and means nothing."""
    if not isinstance(Y, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(Y).__name__}")
    if Y.shape != theta.shape:
        raise ValueError(f"a path-tensor target must have theta's shape {tuple(theta.shape)}, got {tuple(Y.shape)}")
    if not Y.is_floating_point():
        raise TypeError(f"a path-tensor target must be floating point, got {Y.dtype}")
    if Y.numel() == 0:
        return
    Ym = torch.where(mask[:, :, None, None], Y, torch.zeros_like(Y))
    if not bool(torch.isfinite(Ym).all()) or bool((Ym < 0).any()):
        raise ValueError("the path-tensor target must be finite and >= 0 on real steps")
    tol = 1e3 * torch.finfo(Y.dtype).eps * Y.shape[-1]
    sums = Ym.sum((2, 3))
    if bool(((sums - mask.to(Y.dtype)).abs() > tol).any()):
        raise ValueError("each real step of the path-tensor target must sum to 1 (a path or a convex combination "
                         "of paths); build it with tags_to_path")
    inflow = Ym[:, 1:].sum(2)  # (B, T−1, S_j): mass leaving state j of step t−1 along step t
    node = Ym[:, :-1].sum(3)  # (B, T−1, S_i): mass in state i at step t−1
    both = mask[:, 1:, None]
    if bool((((inflow - node).abs() > tol) & both).any()):
        raise ValueError("the path-tensor target is not a flow: the mass entering a state at step t−1 differs from "
                         "the mass leaving it at step t; build it with tags_to_path")


# ---- the regulariser of the target's walk ------------------------------------------------------------------------


def perspective_regularization(edges: Tensor, reg: str, gamma: float) -> Tensor:
    """Σ over the nodes of u·Ω(y/u), u = Σ_k y_k, for nodes' incoming-edge masses ``edges`` (..., K) ≥ 0; returns the
    per-node terms (...) (0 where u = 0). The generic piece of Ω_G: any DAG, given the masses its target puts on each
    node's incoming edges. Ω = −γH: γ(Σ_k y_k log y_k − u log u); Ω = (γ/2)‖·‖²: (γ/2)‖y‖²/u."""
    u = edges.sum(-1)
    if reg == "entropy":
        return gamma * (torch.special.xlogy(edges, edges).sum(-1) - torch.special.xlogy(u, u))
    sq = (edges * edges).sum(-1)
    return 0.5 * gamma * torch.where(u > 0, sq / torch.where(u > 0, u, torch.ones_like(u)), torch.zeros_like(u))


def viterbi_path_regularization(Y: Tensor, lengths=None, reg: str = "entropy", gamma: float = 1.0) -> Tensor:
    """Ω_G(Y) (B,) for the Viterbi trellis: the perspective terms of every (t, i) node (incoming edges Y[t, i, :])
    plus the end node Ω(u_{L−1}) (App. B.2's final max_Ω(v_T)). A chain of length 0 gets Ω(1/S) (its walk only
    picks the start state, uniformly: then ℓ = max_Ω(0_S) + Ω(1/S) = 0). 0 for ``reg=None``."""
    B, T, S, _ = Y.shape
    if reg is None:
        return Y.new_zeros(B)
    gamma = check_reg_gamma(reg, gamma)
    lengths = None if lengths is None else _check_lengths(lengths, B, Y.device)
    mask = _step_mask(lengths, B, T, Y.device)
    Y = torch.where(mask[:, :, None, None], Y, torch.zeros_like(Y)).detach()
    nodes = perspective_regularization(Y, reg, gamma).sum((1, 2)) if T else Y.new_zeros(B)
    L = mask.sum(1)
    if T:
        last = Y[torch.arange(B, device=Y.device), (L - 1).clamp_min(0)].sum(-1)  # (B, S): the last state's law
    else:
        last = Y.new_zeros(B, S)
    uniform = torch.full_like(last, 1.0 / S)
    last = torch.where((L > 0)[:, None], last, uniform)
    end = perspective_regularization(last, reg, gamma)  # u = 1: Ω(last) itself
    return nodes + end


def structured_loss_from_value(value: Tensor, theta: Tensor, Y: Tensor, target_regularization: Tensor) -> Tensor:
    """DP_Ω(θ) − ⟨θ, Y⟩ + Ω_G(Y) per chain, for any DP_Ω whose ``value`` (B,) was computed with a custom backward:
    the gradient in θ is then ∇DP_Ω(θ) − Y. ``Y`` must already be zero where θ is padding."""
    score = (theta * Y.detach()).flatten(1).sum(1)
    return value - score + target_regularization.detach()


# ---- the hard Viterbi (the perceptron's LP(θ)) -------------------------------------------------------------------


def _hard_viterbi(theta: Tensor, mask: Tensor):
    """Max-product Viterbi: LP(θ) (B,), argmax tags (B, T) (−1 at padding) and the argmax start state (B,).
    Ties: the lowest state index (torch.max returns the first maximal index)."""
    B, T, S, _ = theta.shape
    v = theta.new_zeros(B, S)
    backs = []
    for t in range(T):
        best, arg = (theta[:, t] + v[:, None, :]).max(-1)  # (B, S_i)
        m = mask[:, t, None]
        v = torch.where(m, best, v)
        backs.append(arg)
    value, y = v.max(-1)
    tags = torch.full((B, T), -1, dtype=torch.long, device=theta.device)
    ar = torch.arange(B, device=theta.device)
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        tags[:, t] = torch.where(m, y, tags[:, t])
        y = torch.where(m, backs[t][ar, y], y)
    return value, tags, y


class _HardViterbiFunction(torch.autograd.Function):
    """LP(θ) = max_Y ⟨Y, θ⟩ with backward g·Y*(θ) (a subgradient, eq. (5)); also returns the argmax tags
    (not differentiable)."""

    @staticmethod
    def forward(ctx, theta, mask):
        value, tags, start = _hard_viterbi(theta, mask)
        Ystar = tags_to_path(tags, theta.shape[-1], mask.sum(1), start=start, dtype=theta.dtype)
        ctx.save_for_backward(Ystar)
        ctx.mark_non_differentiable(tags)
        return value, tags

    @staticmethod
    def backward(ctx, g, g_tags):
        (Ystar,) = ctx.saved_tensors
        return g[:, None, None, None] * Ystar, None


def hard_viterbi(theta: Tensor, lengths=None) -> tuple[Tensor, Tensor]:
    """The unregularised Viterbi: LP(θ) = max_{Y ∈ Y} ⟨Y, θ⟩ (eq. (3)) and the argmax tags Y*(θ) (eq. (4)).

    Args: θ (B, T, S, S) and optional ``lengths`` as in :func:`structattn.viterbi_value`.
    Returns: (values (B,), tags (B, T) long, −1 at padded steps). ``values`` is differentiable, with the argmax path
    tensor as (sub)gradient; ties go to the lowest state index."""
    _check_theta(theta)
    B, T = theta.shape[:2]
    lengths = None if lengths is None else _check_lengths(lengths, B, theta.device)
    mask = _step_mask(lengths, B, T, theta.device)
    if theta.numel() and not bool(torch.isfinite(theta).all()):
        raise ValueError("theta contains non-finite values; mask padding with `lengths` instead")
    return _HardViterbiFunction.apply(theta, mask)


# ---- the loss ----------------------------------------------------------------------------------------------------


def viterbi_loss(
    theta: Tensor, target: Tensor, lengths=None, reg: str | None = "entropy", gamma: float = 1.0, *,
    start="uniform", backend: str | None = None,
) -> Tensor:
    """Structured loss ℓ_Ω(θ; Y) = Vit_Ω(θ) − ⟨θ, Y⟩ + Ω_G(Y) per chain (ICML 2018 §4.1, ℓ_{0,Ω}; see the module
    docstring for the constant Ω_G(Y) we add so that ℓ ≥ 0).

    Args:
        theta: (B, T, S, S) potentials, θ[b, t, i, j] scoring state j at step t−1 → state i at step t.
        target: the gold tags (B, T) (an integer tensor, turned into Y by :func:`tags_to_path` with ``start``) or a
            path tensor Y (B, T, S, S) in conv(Y) (a non-negative flow of mass 1 per step). A constant: no
            gradient flows into it.
        lengths: optional (B,) integer tensor in [0, T]; steps t ≥ lengths[b] are padding, ignored in θ and Y.
        reg: ``"entropy"`` (Ω = −γH, the CRF loss ℓ_{0,−H}), ``"l2"`` (Ω = (γ/2)‖·‖², sparse marginals) or ``None``
            (Ω = 0: the structured perceptron ℓ_{0,0}, the paper's baseline; γ unused).
        gamma: temperature γ > 0.
        start: how integer ``target`` treats the free start state (see :func:`tags_to_path`).
        backend: Viterbi backend for the Ω losses (see :func:`structattn.viterbi_value`).

    Returns:
        (B,) losses ≥ 0 (up to rounding), in θ's dtype (float16/bfloat16 computed in float32). Gradient in θ:
        E − Y with E = ∇Vit_Ω(θ) (Alg. 3), or Y*(θ) − Y for the perceptron; padded steps get 0.

    Raises:
        ValueError / TypeError: bad shapes or dtypes, tags out of [0, S), a path tensor that is not a flow of mass 1,
        lengths out of [0, T], unknown ``reg``, γ ≤ 0, non-finite θ.
    """
    gamma = _check_loss_reg(reg, gamma)
    _check_theta(theta)
    B, T, S, _ = theta.shape
    out_dtype = theta.dtype
    theta_c = theta.float() if theta.dtype in _LOW_PRECISION else theta
    lengths = None if lengths is None else _check_lengths(lengths, B, theta.device)
    mask = _step_mask(lengths, B, T, theta.device)
    if isinstance(target, Tensor) and not target.is_floating_point() and target.dim() == 2:
        if tuple(target.shape) != (B, T):
            raise ValueError(f"integer tags must have shape ({B}, {T}), got {tuple(target.shape)}")
        Y = tags_to_path(target, S, lengths, start=start, dtype=theta_c.dtype)
    else:
        _check_path(target, theta, mask)
        Y = torch.where(mask[:, :, None, None], target, torch.zeros_like(target)).to(theta_c.dtype)
    if reg is None:
        if theta.numel() and not bool(torch.isfinite(theta_c).all()):
            raise ValueError("theta contains non-finite values; mask padding with `lengths` instead")
        value = _HardViterbiFunction.apply(theta_c, mask)[0]
    else:
        value = viterbi_value(theta_c, lengths, reg, gamma, backend=backend)
    omega_Y = viterbi_path_regularization(Y, lengths, reg, gamma if reg is not None else 1.0)
    return structured_loss_from_value(value, theta_c, Y, omega_Y).to(out_dtype)


class ViterbiLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`viterbi_loss` with fixed ``reg``, ``gamma``, ``start`` and a ``reduction``
    (``"mean"`` over chains, ``"sum"`` or ``"none"``)."""

    def __init__(self, reg: str | None = "entropy", gamma: float = 1.0, reduction: str = "mean", start="uniform"):
        super().__init__()
        gamma = _check_loss_reg(reg, gamma)
        _check_reduction(reduction)
        self.reg, self.gamma, self.reduction, self.start = reg, gamma, reduction, start

    def forward(self, theta: Tensor, target: Tensor, lengths=None) -> Tensor:
        loss = viterbi_loss(theta, target, lengths, self.reg, 1.0 if self.gamma is None else self.gamma,
                            start=self.start)
        return _reduce(loss, self.reduction)

    def extra_repr(self) -> str:
        return f"reg={self.reg!r}, gamma={self.gamma}, reduction={self.reduction!r}"



# ---- DTW_Ω: the loss for monotone alignments (§4.1 on the DTW DAG of §3.2, used in §4.3) ---------------------------
# θ is (B, N, M) as in structattn.ops.dtw: θ[b, i, j] scores aligning x_i with y_j; lengths_x / lengths_y (B,) in
# [1, N] / [1, M] mark the real cells; padded cells of θ (even NaN) and of the target are ignored.


def _dtw_theta(theta) -> None:
    if not isinstance(theta, Tensor):
        raise TypeError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dim() != 3:
        raise ValueError(f"theta must have shape (B, N, M), got {tuple(theta.shape)}")
    if theta.shape[1] < 1 or theta.shape[2] < 1:
        raise ValueError(f"theta needs N >= 1 and M >= 1 (an empty series has no alignment), got {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got {theta.dtype}")


def check_alignment(Y: Tensor, lengths_x=None, lengths_y=None, *, return_mask: bool = False) -> Tensor:
    """Check that ``Y`` (B, N, M) is a batch of monotone alignment matrices and return it as 0/1 in its dtype (float
    dtypes) with padded cells zeroed. On the real cells of pair b, Y must be 0/1 and its ones must form one path
    (0, 0) → (N_b − 1, M_b − 1) of →, ↘, ↓ moves. Raises ValueError naming the first bad pair; with
    ``return_mask=True`` returns instead the (B,) bool tensor of the pairs whose path is well formed (a 0/1 matrix is
    still required)."""
    if not isinstance(Y, Tensor):
        raise TypeError(f"the target alignment must be a torch.Tensor, got {type(Y).__name__}")
    if Y.dim() != 3:
        raise ValueError(f"the target alignment must have shape (B, N, M), got {tuple(Y.shape)}")
    B, N, M = Y.shape
    lx = _dtw_lengths(lengths_x, B, N, "lengths_x", Y.device)
    ly = _dtw_lengths(lengths_y, B, M, "lengths_y", Y.device)
    real = _dtw_real_mask(lx, ly, N, M)
    Yr = torch.where(real, Y, torch.zeros_like(Y))
    if bool(((Yr != 0) & (Yr != 1)).any()):
        b = int(((Yr != 0) & (Yr != 1)).flatten(1).any(1).nonzero()[0])
        raise ValueError(f"the target alignment of pair {b} is not a 0/1 matrix on its real cells (soft targets in "
                         "conv(Y) are not supported: their edge flows are not determined by the cell masses)")
    # Row by row, a monotone path is a non-empty run of ones [s_i, e_i] (its → moves); it leaves row i by ↓
    # (s_{i+1} = e_i) or ↘ (s_{i+1} = e_i + 1); s_0 = 0 and e_{N_b−1} = M_b − 1. That is also sufficient.
    P = Yr != 0
    j = torch.arange(M, device=Y.device)
    count = P.sum(2)  # (B, N)
    first = torch.where(P, j, M).amin(2)
    last = torch.where(P, j, -1).amax(2)
    rows = torch.arange(N, device=Y.device)[None, :] < lx[:, None]
    ok_row = (count >= 1) & (count == last - first + 1)
    step = first[:, 1:] - last[:, :-1]
    ok_step = (step == 0) | (step == 1) | ~rows[:, 1:]
    ar = torch.arange(B, device=Y.device)
    good = ((ok_row | ~rows).all(1) & ok_step.all(1) & (first[:, 0] == 0) & (last[ar, lx - 1] == ly - 1))
    if return_mask:
        return good
    if not bool(good.all()):
        b = int((~good).nonzero()[0])
        raise ValueError(
            f"the target alignment of pair {b} is not a monotone path from (0, 0) to ({int(lx[b]) - 1}, "
            f"{int(ly[b]) - 1}) with steps (0, 1), (1, 1), (1, 0) on its real cells (lengths_x, lengths_y)")
    return Yr


def dtw_path_regularization(Y: Tensor, lengths_x=None, lengths_y=None, reg: str = "entropy",
                            gamma: float = 1.0) -> Tensor:
    """Ω_G(Y) (B,) for the DTW DAG: Σ over the cells the alignment Y visits of the perspective term of their incoming
    edges; on a path each visited cell has one incoming edge of mass 1 (the first one from the start node), so this is
    |Y|·Ω(e): |Y|·γ/2 for ℓ2, 0 for −γH and ``reg=None``. ``Y`` is checked by :func:`check_alignment`."""
    Y = check_alignment(Y, lengths_x, lengths_y).detach()
    if reg is None:
        return Y.new_zeros(Y.shape[0])
    return _dtw_omega_g(Y, reg, check_reg_gamma(reg, gamma))


def _dtw_omega_g(Y: Tensor, reg: str, gamma: float) -> Tensor:
    vertex = perspective_regularization(Y.new_tensor([1.0, 0.0, 0.0]), reg, gamma)  # Ω(e): one edge of mass 1
    return Y.flatten(1).sum(1) * vertex


def _hard_dtw(theta: Tensor, lx: Tensor, ly: Tensor):
    """Max-plus DTW: LP(θ) = max_Y ⟨Y, θ⟩ (B,) and an argmax alignment matrix (B, N, M).

    Row by row: with a_j = max(v_{i−1,j−1}, v_{i−1,j}) and S_j = Σ_{l ≤ j} θ_{i,l}, the row recursion
    v_{i,j} = θ_{i,j} + max(v_{i,j−1}, a_j) unrolls to v_{i,j} = S_j + max_{k ≤ j}(a_k − S_{k−1}), a cumulative max,
    so each row is a few vectorised ops; they run in float64 (S_j − S_{k−1} cancels: float32 would lose digits on
    long series). The backtrack from (N_b−1, M_b−1) takes the best of the existing parents of each cell; ties go to
    the first of (diag, left, up)."""
    B, N, M = theta.shape
    real = _dtw_real_mask(lx, ly, N, M)
    # padded cells may be NaN; they never feed real ones
    th = torch.where(real, theta, torch.zeros_like(theta)).to(torch.float64)
    neg = torch.finfo(th.dtype).min
    V = th.new_empty(B, N, M)
    prev = th.new_full((B, M + 1), float("-inf"))
    prev[:, 0] = 0.0  # the start node, the diag parent of (0, 0)
    for i in range(N):
        a = torch.maximum(prev[:, :-1], prev[:, 1:])
        S = th[:, i].cumsum(1)
        Sm1 = S - th[:, i]
        v = S + torch.cummax(a - Sm1, 1).values
        V[:, i] = v
        prev = torch.cat((th.new_full((B, 1), float("-inf")), v), 1)
    ar = torch.arange(B, device=theta.device)
    value = V[ar, lx - 1, ly - 1].to(theta.dtype)
    Vp = torch.nn.functional.pad(V, (1, 0, 1, 0), value=float("-inf"))  # [i + 1, j + 1] holds V[i, j]
    Ystar = torch.zeros_like(th)
    i, j = lx - 1, ly - 1
    Ystar[ar, i, j] = 1.0
    for _ in range(N + M - 2):
        live = (i > 0) | (j > 0)
        if not bool(live.any()):
            break
        cand = torch.stack((Vp[ar, i, j], Vp[ar, i + 1, j], Vp[ar, i, j + 1]), 1)  # diag, left, up
        cand = torch.nan_to_num(cand, nan=neg)
        k = cand.argmax(1)
        di = torch.where(k == 1, 0, 1)
        dj = torch.where(k == 2, 0, 1)
        i = torch.where(live, i - di, i)
        j = torch.where(live, j - dj, j)
        Ystar[ar[live], i[live], j[live]] = 1.0
    return value, Ystar.to(theta.dtype)


class _HardDTWFunction(torch.autograd.Function):
    """LP(θ) = max_Y ⟨Y, θ⟩ over monotone alignments; backward g·Y*(θ) (a subgradient, eq. (5)). Also returns Y*
    (not differentiable)."""

    @staticmethod
    def forward(ctx, theta, lx, ly):
        value, Ystar = _hard_dtw(theta, lx, ly)
        ctx.save_for_backward(Ystar)
        ctx.mark_non_differentiable(Ystar)
        return value, Ystar

    @staticmethod
    def backward(ctx, g, g_Y):
        (Ystar,) = ctx.saved_tensors
        return g[:, None, None] * Ystar, None, None


def _dtw_finite(theta: Tensor, lx: Tensor, ly: Tensor) -> None:
    bad = ~torch.isfinite(theta.detach()) & _dtw_real_mask(lx, ly, *theta.shape[1:])
    if bool(bad.any()):
        raise ValueError("theta contains non-finite values in real cells; mark padding with lengths_x / lengths_y")


def hard_dtw(theta: Tensor, lengths_x=None, lengths_y=None) -> tuple[Tensor, Tensor]:
    """The unregularised DTW over scores: LP(θ) = max_{Y ∈ Y} ⟨Y, θ⟩ (eq. (3) on the DTW DAG) and an argmax alignment
    matrix Y*(θ) (eq. (4)), (B,) and (B, N, M) (0 on padded cells). ``values`` is differentiable with Y* as
    subgradient. Same arguments as :func:`structattn.dtw_value`."""
    _dtw_theta(theta)
    B, N, M = theta.shape
    lx = _dtw_lengths(lengths_x, B, N, "lengths_x", theta.device)
    ly = _dtw_lengths(lengths_y, B, M, "lengths_y", theta.device)
    _dtw_finite(theta, lx, ly)
    return _HardDTWFunction.apply(theta, lx, ly)


def dtw_loss(theta: Tensor, target: Tensor, lengths_x=None, lengths_y=None, reg: str | None = "entropy",
             gamma: float = 1.0, *, backend: str | None = None) -> Tensor:
    """Structured loss ℓ_Ω(θ; Y) = DTW_Ω(θ) − ⟨θ, Y⟩ + Ω_G(Y) per pair (ICML 2018 §4.1's ℓ_{0,Ω} with DP_Ω = DTW_Ω
    of §3.2, plus the θ-free constant Ω_G(Y) = |Y|·Ω(e) of the module docstring so that ℓ ≥ 0).

    Args:
        theta: (B, N, M) scores, θ[b, i, j] scoring the alignment of x_i with y_j (for a cost matrix C, θ = −C).
        target: (B, N, M) gold alignment matrices, 0/1 with their ones on a monotone path (0, 0) → (N_b−1, M_b−1)
            (checked by :func:`check_alignment`; padded cells ignored). A constant: no gradient flows into it.
        lengths_x, lengths_y: optional (B,) integers in [1, N] and [1, M] (right padding of either axis).
        reg: ``"entropy"`` (Ω = −γH: ℓ = −γ log p_θ(Y), the alignment's negative log-likelihood), ``"l2"``
            (Ω = (γ/2)‖·‖², sparse E) or ``None`` (LP(θ) − ⟨θ, Y⟩, the structured perceptron; γ unused).
        gamma: temperature γ > 0.
        backend: DTW backend for the Ω losses (see :func:`structattn.dtw_value`).

    Returns:
        (B,) losses ≥ 0 (up to rounding), in θ's dtype (float16/bfloat16 computed in float32). Gradient in θ: E − Y
        with E = ∇DTW_Ω(θ) (Alg. 5), or Y*(θ) − Y for ``reg=None``; 0 on padded cells. Twice differentiable for Ω
        (the Hessian of DTW_Ω, Alg. 6).

    Raises:
        ValueError / TypeError: bad shapes or dtypes, a target that is not a monotone alignment, lengths out of range,
        unknown ``reg``, γ ≤ 0, non-finite θ in a real cell.
    """
    gamma = _check_loss_reg(reg, gamma)
    _dtw_theta(theta)
    B, N, M = theta.shape
    out_dtype = theta.dtype
    theta_c = theta.float() if theta.dtype in _LOW_PRECISION else theta
    lx = _dtw_lengths(lengths_x, B, N, "lengths_x", theta.device)
    ly = _dtw_lengths(lengths_y, B, M, "lengths_y", theta.device)
    if not isinstance(target, Tensor):
        raise TypeError(f"the target alignment must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != theta.shape:
        raise ValueError(f"the target alignment must have theta's shape {tuple(theta.shape)}, "
                         f"got {tuple(target.shape)}")
    Y = check_alignment(target.detach().to(theta_c.dtype), lx, ly)
    if reg is None:
        _dtw_finite(theta_c, lx, ly)
        value = _HardDTWFunction.apply(theta_c, lx, ly)[0]
    else:
        value = dtw_value(theta_c, lx, ly, reg, gamma, backend=backend)
    # Padded cells of θ may hold anything (NaN included): zero them before the product with Y.
    theta_r = torch.where(_dtw_real_mask(lx, ly, N, M), theta_c, torch.zeros_like(theta_c))
    omega_Y = Y.new_zeros(B) if reg is None else _dtw_omega_g(Y, reg, gamma)
    return structured_loss_from_value(value, theta_r, Y, omega_Y).to(out_dtype)


class DTWLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`dtw_loss` with fixed ``reg``, ``gamma`` and a ``reduction`` (``"mean"`` over
    pairs, ``"sum"`` or ``"none"``)."""

    def __init__(self, reg: str | None = "entropy", gamma: float = 1.0, reduction: str = "mean"):
        super().__init__()
        gamma = _check_loss_reg(reg, gamma)
        _check_reduction(reduction)
        self.reg, self.gamma, self.reduction = reg, gamma, reduction

    def forward(self, theta: Tensor, target: Tensor, lengths_x=None, lengths_y=None) -> Tensor:
        loss = dtw_loss(theta, target, lengths_x, lengths_y, self.reg, 1.0 if self.gamma is None else self.gamma)
        return _reduce(loss, self.reduction)

    def extra_repr(self) -> str:
        return f"reg={self.reg!r}, gamma={self.gamma}, reduction={self.reduction!r}"


def dtw_area_loss(theta: Tensor, target: Tensor, lengths_x=None, lengths_y=None, reg: str = "entropy",
                  gamma: float = 1.0, *, backend: str | None = None) -> Tensor:
    """§4.3's relaxed loss Δ(Y_true, E) = ‖L (E − Y_true)ᵀ‖²_F with E = ∇DTW_Ω(θ) (ICML 2018 §4.1 "Non-convex losses",
    §4.3), L the lower-triangular matrix of ones: Σ_i Σ_j (Σ_{j' ≤ j} (E − Y_true)[i, j'])², per pair.

    For 0/1 alignments E and Y_true that align each x_i with exactly one y_j, this is Σ_i |j_i − j_i^true|, the area
    between the two paths (the mean absolute deviation of audio-to-score alignment, times N); for E ∈ conv(Y) a
    smooth relaxation of it. Non-convex in θ. Its gradient goes through :func:`structattn.dtw_marginals`, whose
    backward is the Hessian product of Alg. 6 (twice the cost of the value's gradient, §2.4).

    Args: as :func:`dtw_loss` (θ (B, N, M) scores, ``target`` a 0/1 monotone alignment, lengths, Ω ∈ {"entropy",
    "l2"}, γ, backend). The cumulative sums run over the real columns j < lengths_y[b] only.

    Returns: (B,) losses ≥ 0 in θ's dtype.
    """
    if reg not in ("entropy", "l2"):
        raise ValueError(f"reg must be 'entropy' or 'l2' (the relaxed loss needs E = ∇DTW_Ω), got {reg!r}")
    _dtw_theta(theta)
    B, N, M = theta.shape
    lx = _dtw_lengths(lengths_x, B, N, "lengths_x", theta.device)
    ly = _dtw_lengths(lengths_y, B, M, "lengths_y", theta.device)
    if not isinstance(target, Tensor):
        raise TypeError(f"the target alignment must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != theta.shape:
        raise ValueError(f"the target alignment must have theta's shape {tuple(theta.shape)}, "
                         f"got {tuple(target.shape)}")
    E = dtw_marginals(theta, lx, ly, reg, gamma, backend=backend)  # padded cells exactly 0
    Y = check_alignment(target.detach().to(E.dtype), lx, ly)
    real = _dtw_real_mask(lx, ly, N, M)
    # Past the last real column the cumulative sum would repeat the row's total: keep the real cells only.
    D = torch.where(real, (E - Y).cumsum(2), torch.zeros_like(E))
    return (D * D).flatten(1).sum(1)


class DTWAreaLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`dtw_area_loss` with fixed ``reg``, ``gamma`` and a ``reduction``."""

    def __init__(self, reg: str = "entropy", gamma: float = 1.0, reduction: str = "mean"):
        super().__init__()
        if reg not in ("entropy", "l2"):
            raise ValueError(f"reg must be 'entropy' or 'l2', got {reg!r}")
        self.gamma = check_reg_gamma(reg, gamma)
        _check_reduction(reduction)
        self.reg, self.reduction = reg, reduction

    def forward(self, theta: Tensor, target: Tensor, lengths_x=None, lengths_y=None) -> Tensor:
        loss = dtw_area_loss(theta, target, lengths_x, lengths_y, self.reg, self.gamma)
        return _reduce(loss, self.reduction)

    def extra_repr(self) -> str:
        return f"reg={self.reg!r}, gamma={self.gamma}, reduction={self.reduction!r}"
