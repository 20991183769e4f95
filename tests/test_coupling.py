"""κ, the one direction of the 2×2 transition matrix that couples neighbouring positions (chain_coupling)."""

import pytest
import torch

from structattn import argmax_omega, viterbi_marginals
from structattn.ops.segmentation import (INDEPENDENT_KAPPA, chain_coupling, coupling_verdict,
                                         segmentation_potentials)


def _p_attend(scores, trans, reg, gamma):
    theta = segmentation_potentials(scores, trans)
    return viterbi_marginals(theta, reg=reg, gamma=gamma)[..., 1, :].sum(-1)


@pytest.mark.parametrize("reg,gamma", [("entropy", 1.0), ("entropy", 2.0), ("l2", 1.0), ("l2", 10.0)])
def test_kappa_zero_is_independent_positions(reg, gamma):
    # T[i, j] = f(i) + g(j): κ = 0, and p(y_t = 1) is a per-position gate argmax_Ω(0, s_t + shift) with
    # shift = f(1) − f(0) + g(1) − g(0) inside the chain and f(1) − f(0) at its last position (no step after it).
    g = torch.Generator().manual_seed(0)
    scale = gamma * 2.0
    scores = torch.randn(5, 9, generator=g, dtype=torch.float64) * scale
    f, gg = torch.randn(2, generator=g, dtype=torch.float64) * scale, torch.randn(2, generator=g, dtype=torch.float64)
    trans = f[:, None] + gg[None, :]
    assert abs(float(chain_coupling(trans, gamma))) < 1e-12
    p = _p_attend(scores, trans, reg, gamma)
    shift = torch.full_like(scores, float(f[1] - f[0] + gg[1] - gg[0]))
    shift[:, -1] = float(f[1] - f[0])
    gate = argmax_omega(torch.stack([torch.zeros_like(scores), scores + shift], -1), reg, gamma)[..., 1]
    torch.testing.assert_close(p, gate, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_kappa_away_from_zero_couples_neighbours(reg):
    # The same scores under κ = 4 and κ = 0 (the same f, g shift otherwise): the chain is no longer per-position.
    scores = torch.tensor([[2.0, -1.0, 2.0, -1.0, 2.0, -3.0, -3.0]], dtype=torch.float64)
    indep = _p_attend(scores, torch.zeros(2, 2, dtype=torch.float64), reg, 1.0)
    coupled = _p_attend(scores, torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64), reg, 1.0)
    assert float(chain_coupling(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), 1.0)) == 4.0
    # contiguity: the position between two attended ones is pulled up, the lone ones at the end pulled down
    assert coupled[0, 1] > indep[0, 1] + 0.05 and coupled[0, 3] > indep[0, 3] + 0.05


def test_kappa_values_and_verdicts():
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.3, 0.2], [0.1, 0.05]], [[0.0, 1.0], [1.0, 0.0]]])
    torch.testing.assert_close(chain_coupling(t, 2.0), torch.tensor([1.0, 0.025, -1.0]))
    assert coupling_verdict(0.0) == "independent positions"
    assert coupling_verdict(INDEPENDENT_KAPPA * 0.99) == "independent positions"
    assert coupling_verdict(-INDEPENDENT_KAPPA * 0.99) == "independent positions"
    assert coupling_verdict(INDEPENDENT_KAPPA) == "contiguous"
    assert coupling_verdict(-0.5) == "alternating"
    # the committed converged l2 model: entries up to 1.43γ, yet κ = 1.43 − 0.17 − 0.53 − 0.45 = 0.28
    assert coupling_verdict(chain_coupling(torch.tensor([[1.43, 0.53], [0.45, -0.17]]))) == "contiguous"
    assert abs(float(chain_coupling(torch.tensor([[1.43, 0.53], [0.45, -0.17]]))) - 0.28) < 1e-6


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        chain_coupling(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="gamma"):
        chain_coupling(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="gamma"):
        chain_coupling(torch.zeros(2, 2), float("nan"))
