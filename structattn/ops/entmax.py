r"""1.5-entmax (Peters, Niculae & Martins, ACL 2019) from the maintained ``entmax`` package, made compilable.

entmax15(x) = argmax_{p ∈ △} ⟨p, x⟩ + H^T_{1.5}(p), with the Tsallis entropy H^T_α(p) = (1 − Σ p_i^α) / (α(α − 1));
the solution is p = [x/2 − τ]₊² with τ the unique threshold making Σ p = 1 (the package finds τ exactly by sorting).

We depend on the package instead of re-deriving the threshold (it is the reference implementation of the paper's
authors). One thing it does not do: its ``Entmax15Function`` is an ``autograd.Function`` with a *classmethod*
``forward``, which ``torch.compile`` cannot trace (Dynamo: "failed to bind arguments when attempting to inline
autograd.Function", torch 2.13, entmax 1.3). So, as :mod:`.structured_sparsemax` does for its C kernels, a graph being
compiled reaches the package through a torch.library custom op ``structattn::entmax15`` (opaque to Dynamo) whose
backward is the paper's closed form in tensor operations (Peters et al. 2019, Prop. 2 with α = 1.5):
∂L/∂x = g ⊙ s − (⟨g, s⟩ / Σ s) · s with s = √p — the package's own backward, written out. Eager calls go straight to
the package (a custom op costs tens of µs of Python per call).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entmax15", "entmax_package"]


def entmax_package():
    """The ``entmax`` module, imported at first use, or an ImportError that says how to install it."""
    try:
        import entmax
    except ImportError as exc:  # a --no-deps install: say what is missing and how to get it
        raise ImportError("entmax15 needs the `entmax` package (a dependency of structattn): pip install entmax") from exc
    return entmax


def _forward_impl(x: Tensor) -> Tensor:
    return entmax_package().entmax15(x.detach(), dim=-1)


_op = torch.library.custom_op("structattn::entmax15", _forward_impl, mutates_args=())


@_op.register_fake
def _(x):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward(ctx, g):
    (p,) = ctx.saved_tensors
    s = p.sqrt()  # = 1 / the second derivative of the regulariser at p, 0 off the support
    gs = g * s
    return gs - gs.sum(-1, keepdim=True) / s.sum(-1, keepdim=True) * s


_op.register_autograd(_backward, setup_context=_setup)


def entmax15(x: Tensor, dim: int = -1) -> Tensor:
    """1.5-entmax of ``x`` along ``dim`` (module docstring); the ``entmax`` package's exact sort-based algorithm."""
    if torch.compiler.is_compiling():
        return _op(x.movedim(dim, -1).contiguous()).movedim(-1, dim)
    return entmax_package().entmax15(x, dim=dim)
