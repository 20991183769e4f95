"""Smoothed max operators max_Ω over the last dimension (Mensch & Blondel, ICML 2018, §1 and App. B.1).

For x ∈ R^S and a strongly convex regulariser Ω on the simplex △^S,

    max_Ω(x) = max_{q ∈ △^S} ⟨q, x⟩ − Ω(q),        ∇max_Ω(x) = argmax of the same problem,

and the Hessian is ∇²max_Ω(x) = J_Ω(∇max_Ω(x)) (App. B.1). Two regularisers, each with a temperature γ > 0:

* ``"entropy"`` — Ω(q) = γ Σ q_i log q_i (negentropy −γH):
  max_Ω(x) = γ logsumexp(x/γ), ∇max_Ω(x) = softmax(x/γ), J_Ω(q) = (Diag(q) − q qᵀ)/γ.
* ``"l2"`` — Ω(q) = (γ/2)‖q‖²:
  ∇max_Ω(x) = q* = argmin_{q ∈ △} ‖q − x/γ‖² (Euclidean projection, i.e. sparsemax of x/γ),
  max_Ω(x) = ⟨q*, x⟩ − (γ/2)‖q*‖², J_Ω(q) = (Diag(s) − s sᵀ/‖s‖₁)/γ with s the support of q.

All functions work on a trailing dimension of any size S ≥ 1 and broadcast over leading dimensions. S = 2 takes
closed forms (no sort), which is the case of the segmentation attention.

The functions here are plain differentiable tensor code, so autograd through them is exact wherever the
operators are differentiable (everywhere for entropy; almost everywhere, i.e. off the kinks of the support, for
ℓ2). That is what lets the Viterbi backward passes be differentiated once more for third-order checks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

REGULARIZERS = ("entropy", "l2")

__all__ = [
    "REGULARIZERS",
    "check_reg_gamma",
    "max_omega",
    "argmax_omega",
    "max_argmax_omega",
    "jacobian_product",
    "sparsemax",
    "smoothed_max",
    "SmoothedMax",
]


def check_reg_gamma(reg: str, gamma: float) -> float:
    """Validate ``reg`` and ``gamma``; return ``gamma`` as a Python float. Raises ``ValueError``/``TypeError``."""
    if reg not in REGULARIZERS:
        raise ValueError(f"reg must be one of {REGULARIZERS}, got {reg!r}")
    if isinstance(gamma, Tensor):
        if gamma.numel() != 1:
            raise ValueError(f"gamma must be a scalar, got a tensor of shape {tuple(gamma.shape)}")
        gamma = gamma.item()
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
    gamma = float(gamma)
    # Comparisons rather than math.isfinite: when Dynamo traces γ symbolically it cannot put math.isfinite in the
    # graph (seen once in benchmarks/compiled.py: "torch.* op returned non-Tensor ... isfinite", not reproduced
    # since), while a comparison only adds a guard. NaN fails both comparisons.
    if not (0.0 < gamma < math.inf):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
    return gamma


def sparsemax(x: Tensor) -> Tensor:
    """Euclidean projection of each row (last dim) onto the simplex: argmin_{q ∈ △} ‖q − x‖² (sparsemax).

    Sort-based O(S log S) algorithm (Held et al. / Duchi et al.), closed form for S = 2. Differentiable almost
    everywhere by autograd (the threshold τ is a differentiable function of the sorted entries on a fixed support).
    """
    S = x.shape[-1]
    if S == 1:
        # The constant 1, but still a function of x (zero gradient), so that backward through a one-element row
        # (a one-token source) works like for any other length instead of failing for lack of a graph.
        return torch.where(torch.ones_like(x, dtype=torch.bool), torch.ones_like(x), x)
    if S == 2:
        # q1 = clip((1 + x1 - x0)/2, 0, 1): the projection of a 2-vector, no sort needed.
        q1 = ((1.0 + x[..., 1] - x[..., 0]) * 0.5).clamp(0.0, 1.0)
        return torch.stack((1.0 - q1, q1), dim=-1)
    # sparsemax(x − c) = sparsemax(x): work on x − max(x) (≤ 0, largest entry exactly 0). Without the shift the
    # cumulative sums of large entries (|x| ~ 1e4 in float32) lose the digits of τ, and the weights no longer sum
    # to 1; near the float maximum the support test even fails for every k. The shift is detached: the Jacobian of
    # sparsemax annihilates constant vectors, so the gradient is unchanged.
    x = x - x.detach().amax(dim=-1, keepdim=True)
    z, _ = torch.sort(x, dim=-1, descending=True)
    k = torch.arange(1, S + 1, device=x.device, dtype=x.dtype)
    cssv = z.cumsum(-1) - 1.0
    support = (z * k) > cssv  # the support size is the largest k with z_k > (Σ_{i≤k} z_i − 1)/k
    k_sup = support.sum(-1, keepdim=True)
    tau = cssv.gather(-1, k_sup - 1) / k_sup.to(x.dtype)
    return (x - tau).clamp_min(0.0)


def argmax_omega(x: Tensor, reg: str = "entropy", gamma: float = 1.0) -> Tensor:
    """∇max_Ω(x): softmax(x/γ) for ``"entropy"``, sparsemax(x/γ) for ``"l2"`` (App. B.1)."""
    gamma = check_reg_gamma(reg, gamma)
    return _argmax(x, reg, gamma)


def max_omega(x: Tensor, reg: str = "entropy", gamma: float = 1.0) -> Tensor:
    """max_Ω(x) over the last dimension (App. B.1); result has the leading shape of ``x``."""
    gamma = check_reg_gamma(reg, gamma)
    return _max_argmax(x, reg, gamma)[0]


def max_argmax_omega(x: Tensor, reg: str = "entropy", gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """Both max_Ω(x) and ∇max_Ω(x), sharing the work."""
    gamma = check_reg_gamma(reg, gamma)
    return _max_argmax(x, reg, gamma)


def jacobian_product(q: Tensor, z: Tensor, reg: str = "entropy", gamma: float = 1.0) -> Tensor:
    """J_Ω(q)·z = ∇²max_Ω(x)·z where q = ∇max_Ω(x) (App. B.1), batched over leading dims."""
    gamma = check_reg_gamma(reg, gamma)
    return _jacobian_product(q, z, reg, gamma)


# ---- unchecked internals (callers validated reg/gamma) -------------------------------------------------------


def _argmax(x: Tensor, reg: str, gamma: float) -> Tensor:
    if reg == "entropy":
        return torch.softmax(x / gamma, dim=-1)
    return sparsemax(x / gamma)


def _max_argmax(x: Tensor, reg: str, gamma: float) -> tuple[Tensor, Tensor]:
    # Both operators commute with adding a constant (max_Ω(x + c) = max_Ω(x) + c), so we work on x − max(x):
    # the shifted values are ≤ 0 and O(spread), which keeps float32 exact digits when |x| is large
    # (Viterbi values grow linearly in T).
    m = x.detach().amax(dim=-1, keepdim=True)
    xs = x - m
    if reg == "entropy":
        lse = torch.logsumexp(xs / gamma, dim=-1, keepdim=True)
        q = torch.exp(xs / gamma - lse)
        value = gamma * lse.squeeze(-1) + m.squeeze(-1)
        return value, q
    q = sparsemax(xs / gamma)
    value = (q * xs).sum(-1) - 0.5 * gamma * (q * q).sum(-1) + m.squeeze(-1)
    return value, q


def _jacobian_product(q: Tensor, z: Tensor, reg: str, gamma: float) -> Tensor:
    if reg == "entropy":
        qz = q * z
        return (qz - q * qz.sum(-1, keepdim=True)) / gamma
    s = (q > 0).to(z.dtype)
    sz = s * z
    return (sz - s * sz.sum(-1, keepdim=True) / s.sum(-1, keepdim=True)) / gamma


class _SmoothedMaxFunction(torch.autograd.Function):
    """max_Ω with backward ∇max_Ω(x)·g; the backward is itself differentiable (giving J_Ω) for double backward."""

    @staticmethod
    def forward(ctx, x: Tensor, reg: str, gamma: float) -> Tensor:
        value, q = _max_argmax(x, reg, gamma)
        ctx.reg, ctx.gamma = reg, gamma
        ctx.save_for_backward(x)
        return value

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        q = _argmax(x, ctx.reg, ctx.gamma)
        return g.unsqueeze(-1) * q, None, None


def smoothed_max(x: Tensor, reg: str = "entropy", gamma: float = 1.0) -> Tensor:
    """Differentiable max_Ω(x) over the last dimension; gradient ∇max_Ω(x), Hessian J_Ω(∇max_Ω(x))."""
    gamma = check_reg_gamma(reg, gamma)
    return _SmoothedMaxFunction.apply(x, reg, gamma)


class SmoothedMax(torch.nn.Module):
    """``nn.Module`` form of :func:`smoothed_max` with fixed ``reg`` and ``gamma``."""

    def __init__(self, reg: str = "entropy", gamma: float = 1.0):
        super().__init__()
        self.gamma = check_reg_gamma(reg, gamma)
        self.reg = reg

    def forward(self, x: Tensor) -> Tensor:
        return _SmoothedMaxFunction.apply(x, self.reg, self.gamma)

    def extra_repr(self) -> str:
        return f"reg={self.reg!r}, gamma={self.gamma}"
