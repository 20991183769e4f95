"""Slow, obviously-right reference implementations that the tests trust (not used by the library).

* :func:`viterbi_value_reference` — the plain recursion of ICML 2018 Alg. 3 (forward only), one sequence at a
  time, with max_Ω written from its definition in App. B.1 (logsumexp; ℓ2 via an independent bisection on the
  simplex threshold). Gradients and Hessian products are obtained from it by ordinary autograd.
* :func:`viterbi_bruteforce` — enumeration of all S^{T+1} paths (y_0, …, y_T): for Ω = −γH, Vit_Ω(θ) is
  γ·log Σ_y exp(⟨Y, θ⟩/γ) and the marginals are the exact Gibbs marginals p(y_t = i, y_{t−1} = j).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def _project_simplex_bisection(y: Tensor, iters: int = 200) -> Tensor:
    """argmin_{q ∈ △} ‖q − y‖² for a 1-D ``y``: q = max(y − τ, 0) with Σ q = 1, τ found by bisection, then
    made exact on the found support (so autograd sees q = y − mean-correction on the support)."""
    lo = (y.min() - 1.0).detach()
    hi = y.max().detach()
    for _ in range(iters):
        mid = (lo + hi) / 2
        if (y.detach() - mid).clamp_min(0).sum() > 1:
            lo = mid
        else:
            hi = mid
    support = (y.detach() - (lo + hi) / 2) > 0
    tau = (y[support].sum() - 1) / support.sum()
    return torch.where(support, y - tau, torch.zeros_like(y))


def max_omega_reference(x: Tensor, reg: str, gamma: float) -> Tensor:
    """max_Ω of a 1-D vector straight from App. B.1."""
    if reg == "entropy":
        return gamma * torch.logsumexp(x / gamma, dim=0)
    q = _project_simplex_bisection(x / gamma)
    return (q * x).sum() - 0.5 * gamma * (q * q).sum()


def viterbi_value_reference(theta: Tensor, lengths=None, reg: str = "entropy", gamma: float = 1.0) -> Tensor:
    """Vit_Ω(θ) for a batch, by the literal loops of Alg. 3 (t, then i), sequence by sequence. Differentiable by
    autograd (slowly)."""
    B, T, S, _ = theta.shape
    out = []
    for b in range(B):
        L = T if lengths is None else int(lengths[b])
        v = [theta.new_zeros(()) for _ in range(S)]
        for t in range(L):
            vprev = torch.stack(v)
            v = [max_omega_reference(theta[b, t, i] + vprev, reg, gamma) for i in range(S)]
        out.append(max_omega_reference(torch.stack(v), reg, gamma))
    return torch.stack(out)


def viterbi_bruteforce(theta: Tensor, length: int | None = None, gamma: float = 1.0):
    """Entropy-regularised Vit and exact Gibbs marginals of ONE chain θ (T, S, S) by enumerating all paths.

    Returns (value, marginals (T, S, S)); steps ≥ ``length`` get zero marginals."""
    T, S, _ = theta.shape
    L = T if length is None else length
    scores, paths = [], []
    for path in itertools.product(range(S), repeat=L + 1):  # path[0] = y_0, free (v_0 = 0_S)
        s = theta.new_zeros(())
        for t in range(1, L + 1):
            s = s + theta[t - 1, path[t], path[t - 1]]
        scores.append(s)
        paths.append(path)
    scores = torch.stack(scores) / gamma
    value = gamma * torch.logsumexp(scores, 0)
    p = torch.softmax(scores, 0)
    marg = theta.new_zeros(T, S, S)
    for w, path in zip(p, paths):
        for t in range(1, L + 1):
            marg[t - 1, path[t], path[t - 1]] += w
    return value, marg
