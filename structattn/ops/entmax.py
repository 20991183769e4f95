r"""1.5-entmax (Peters, Niculae & Martins, ACL 2019): exact forward and backward, a C kernel on CPU.

entmax15(x) = argmax_{p ∈ △} ⟨p, x⟩ + H^T_{1.5}(p), with the Tsallis entropy H^T_α(p) = (1 − Σ p_i^α) / (α(α − 1));
the solution is p = [z − τ]₊² with z = (x − max x)/2 and τ the unique threshold making Σ p = 1 (the paper's §3,
Alg. 2 with α = 1.5). τ ≥ −1 (no weight exceeds 1), so only the entries with z > −1 — a few of an attention row —
can be in the support. On a support S, τ solves the quadratic Σ_S (z_i − τ)² = 1 in closed form,
τ_S = mean_S(z) − √((1 − Σ_S (z_i − mean_S)²) / |S|). The paper (and the `entmax` package) finds S by sorting the
whole row and evaluating τ on every prefix; the CPU kernel here (``kernels/_cpu_prox_source.py``,
``entmax15_forward``) does not sort: it finds S by Newton's method on f(τ) = Σ [z_i − τ]₊² − 1 from τ = −1 — f is
convex and decreasing, so the iterates climb to τ* without overshooting and the candidate set only shrinks — and
returns τ_S by the closed form as soon as every candidate lies at or above it (then S is the support), which is
exact, not an approximation to a tolerance; a stalled iteration (rounding) finishes with the paper's sorted-prefix
rule on the few remaining candidates.

Backward (the paper's Prop. 2 at α = 1.5): ∂L/∂x = g ⊙ s − (⟨g, s⟩ / Σ s)·s with s = √p, 0 off the support.

Padding: ``mask`` (True at padded positions, any layout) removes positions from the problem; −inf entries get
weight 0 as if padded. Rows without real positions are all 0. A row with a NaN or +inf real entry, or whose real
entries are all −inf, has NaN weights on its real positions (as ``torch.softmax`` gives).

Implementations: the C kernel (float32/float64 CPU tensors; half precision is computed in float32); on other devices,
or without a C compiler, a tensor implementation of the paper's sort-based algorithm (:func:`_forward_tensor`). The
`entmax` package is not needed at run time; the tests use it as the independent oracle. Eager calls enter through a
private ``autograd.Function``; a graph being compiled reaches the kernel through the custom op
``structattn::entmax15`` (opaque to Dynamo, so ``torch.compile(fullgraph=True)`` has no graph break). A gradient of
the gradient (``create_graph``) is computed with tensor operations on the saved output.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entmax15"]


def _kernel():
    """The C kernels' module (shared with fusedmax/oscarmax), imported on first use: ``import structattn`` runs no
    compiler."""
    from .kernels import cpu_prox

    return cpu_prox


def _forward_tensor(x: Tensor, mask: Tensor | None) -> Tensor:
    """The paper's sort-based exact algorithm in tensor operations, rows of ``x`` (N, T) (any device)."""
    real = torch.ones_like(x, dtype=torch.bool) if mask is None else ~mask
    xm = x.masked_fill(~real, float("-inf"))
    top = xm.amax(-1, keepdim=True)
    bad = ((x.isnan() | (x == float("inf"))) & real).any(-1, keepdim=True) | ((top == float("-inf")) & real.any(-1, keepdim=True))
    z = ((xm - torch.where(bad | (top == float("-inf")), torch.zeros_like(top), top)) / 2).nan_to_num(nan=float("-inf"))
    zs = z.sort(-1, descending=True).values
    finite = zs > float("-inf")
    zf = torch.where(finite, zs, torch.zeros_like(zs))
    n = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    mean = zf.cumsum(-1) / n
    ss = n * ((zf * zf).cumsum(-1) / n - mean * mean)
    tau = mean - ((1 - ss) / n).clamp_min(0).sqrt()
    k = ((tau <= zs) & finite).sum(-1, keepdim=True).clamp_min(1)
    t = tau.gather(-1, k - 1)
    p = (z - t).clamp_min(0).square()
    p = torch.where(real, p, torch.zeros_like(p))
    return torch.where(bad & real, torch.full_like(p, float("nan")), p)


def _backward_tensor(g: Tensor, P: Tensor) -> Tensor:
    """The vector-Jacobian product in tensor operations, differentiable in g and (through P) in x."""
    pos = P > 0
    s = torch.where(pos, torch.where(pos, P, torch.ones_like(P)).sqrt(), torch.zeros_like(P))  # no 0·∞ at P = 0
    gs = g * s
    return gs - gs.sum(-1, keepdim=True) / s.sum(-1, keepdim=True).clamp_min(torch.finfo(P.dtype).tiny) * s


def _forward_impl(x: Tensor, mask: Tensor | None) -> Tensor:
    """P for x (N, T) float32/float64: the C kernel on CPU, the tensor algorithm elsewhere or without a compiler."""
    x = x.detach()
    if x.device.type == "cpu" and _kernel().available():
        return _kernel().entmax15_forward(x.contiguous(), None if mask is None else mask.contiguous())[1]
    return _forward_tensor(x, mask)


def _backward_impl(g: Tensor, P: Tensor) -> Tensor:
    if P.device.type == "cpu" and _kernel().available():
        return _kernel().entmax15_backward(g.detach().to(P.dtype).contiguous(), P.contiguous())
    return _backward_tensor(g, P)


_op = torch.library.custom_op("structattn::entmax15", _forward_impl, mutates_args=())
_backward_op = torch.library.custom_op("structattn::entmax15_backward", _backward_impl, mutates_args=())


@_op.register_fake
def _(x, mask):
    return torch.empty_like(x)


@_backward_op.register_fake
def _(g, P):
    return torch.empty_like(P)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _grad(ctx, g, backward_pass):
    (P,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a differentiable expression of g and of P (hence of x)
        return _backward_tensor(g, P), None
    return backward_pass(g, P), None


_op.register_autograd(lambda ctx, g: _grad(ctx, g, _backward_op), setup_context=_setup)


class _Entmax15Function(torch.autograd.Function):
    """The eager twin of the custom op (torch.library's Python layers cost tens of µs per call)."""

    @staticmethod
    def forward(ctx, x, mask):
        out = _forward_impl(x, mask)
        _setup(ctx, (x, mask), out)
        return out

    @staticmethod
    def backward(ctx, g):
        return _grad(ctx, g, _backward_impl)


def entmax15(x: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """1.5-entmax of ``x`` along ``dim`` (module docstring: exact; C kernel on CPU).

    Args:
        x: floating-point tensor.
        dim: the dimension that sums to 1.
        mask: optional bool tensor of x's shape, True at positions to leave out (weight exactly 0; any layout).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor (True at padded positions)")
        if mask.shape != x.shape:
            raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    last = dim in (-1, x.dim() - 1)
    xt = x if last else x.movedim(dim, -1)
    mt = mask if (mask is None or last) else mask.movedim(dim, -1)
    shape, T = xt.shape, xt.shape[-1]
    if xt.numel() == 0:
        return x * 0
    work = xt.float() if xt.dtype in (torch.float16, torch.bfloat16) else xt
    rows = work.reshape(-1, T)
    m = None if mt is None else mt.reshape(-1, T)
    if torch.compiler.is_compiling():
        P = _op(rows, m)
    else:
        P = _Entmax15Function.apply(rows, m)
    P = P.reshape(shape).to(x.dtype)
    return P if last else P.movedim(-1, dim)
