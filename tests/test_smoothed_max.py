"""max_Ω, ∇max_Ω and J_Ω against their definitions (App. B.1)."""

import pytest
import torch

from structattn import argmax_omega, jacobian_product, max_argmax_omega, max_omega, smoothed_max, sparsemax
from structattn.ops.reference import _project_simplex_bisection, max_omega_reference

REGS = ["entropy", "l2"]
GAMMAS = [0.01, 0.3, 1.0, 7.0, 100.0]


@pytest.mark.parametrize("S", [2, 3, 5, 8])
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_value_and_argmax_match_definition(S, reg, gamma):
    g = torch.Generator().manual_seed(S * 100 + int(gamma * 10))
    x = torch.randn(20, S, generator=g, dtype=torch.float64) * 3
    value, q = max_argmax_omega(x, reg, gamma)
    for b in range(x.shape[0]):
        ref = max_omega_reference(x[b], reg, gamma)
        torch.testing.assert_close(value[b], ref, rtol=1e-12, atol=1e-10)
    if reg == "entropy":
        torch.testing.assert_close(q, torch.softmax(x / gamma, -1), rtol=0, atol=1e-14)
    else:
        for b in range(x.shape[0]):
            torch.testing.assert_close(q[b], _project_simplex_bisection(x[b] / gamma), rtol=0, atol=1e-12)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(20, dtype=torch.float64))
    torch.testing.assert_close(max_omega(x, reg, gamma), value)
    torch.testing.assert_close(argmax_omega(x, reg, gamma), q)


def test_value_is_the_maximised_objective():
    # max_Ω(x) = ⟨q*, x⟩ − Ω(q*) ≥ ⟨q, x⟩ − Ω(q) for any other q in the simplex.
    x = torch.randn(50, 4, dtype=torch.float64)
    for reg, omega in [("entropy", lambda q: 0.5 * (q * q.clamp_min(1e-300).log()).sum(-1)),
                       ("l2", lambda q: 0.25 * (q * q).sum(-1))]:
        value = max_omega(x, reg, 0.5)
        for _ in range(20):
            q = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((50,))
            assert ((q * x).sum(-1) - omega(q) <= value + 1e-12).all()


def test_sparsemax_two_state_closed_form_equals_sort():
    x = torch.randn(1000, 2, dtype=torch.float64) * 2
    closed = sparsemax(x)
    # the generic sort path, forced by padding with a state at −∞-like score
    padded = torch.cat([x, torch.full((1000, 1), -1e6, dtype=torch.float64)], -1)
    torch.testing.assert_close(closed, sparsemax(padded)[:, :2], rtol=0, atol=1e-15)


def test_l2_is_sparse_on_peaked_inputs():
    x = torch.tensor([[10.0, 0.0, -3.0], [0.1, 0.0, 0.05]])
    q = argmax_omega(x, "l2", 1.0)
    assert q[0].tolist() == [1.0, 0.0, 0.0]
    assert (q[1] > 0).all()


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("S", [2, 3, 6])
def test_jacobian_product_is_hessian(reg, S):
    torch.manual_seed(S)
    x = torch.randn(7, S, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, S, dtype=torch.float64)
    gamma = 0.8
    q = argmax_omega(x, reg, gamma)
    (hz,) = torch.autograd.grad((q * z).sum(), x)  # ∇²max_Ω(x) z (the Hessian is symmetric)
    torch.testing.assert_close(jacobian_product(q.detach(), z, reg, gamma), hz, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
def test_smoothed_max_gradcheck(reg):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: smoothed_max(t, reg, 0.7), x)
    assert torch.autograd.gradgradcheck(lambda t: smoothed_max(t, reg, 0.7), x)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_gamma(bad):
    with pytest.raises(ValueError, match="gamma"):
        max_omega(torch.zeros(2, 2), "entropy", bad)


def test_bad_reg():
    with pytest.raises(ValueError, match="reg must be one of"):
        max_omega(torch.zeros(2, 2), "sparsemax", 1.0)
    with pytest.raises(TypeError, match="gamma"):
        max_omega(torch.zeros(2, 2), "l2", "1.0")


def test_extreme_scales_are_finite():
    for reg in REGS:
        for gamma in [1e-3, 1e3]:
            x = torch.tensor([[1e4, -1e4], [1e4, 1e4 - 1e-3], [-1e4, -1e4]])
            v, q = max_argmax_omega(x, reg, gamma)
            assert torch.isfinite(v).all() and torch.isfinite(q).all()
            torch.testing.assert_close(q.sum(-1), torch.ones(3))
