"""Property tests (hypothesis) for Vit_Ω over random shapes, lengths, Ω and γ, plus operator edge cases, on every
backend (``backend`` parameter, tests/viterbi_backends.py: the plain tensor code and the C kernel, each passed
explicitly)."""

import math

import pytest
import torch
from hypothesis import given  # examples per test: the profile in tests/conftest.py
from hypothesis import strategies as st

from structattn import viterbi_marginals, viterbi_value
from structattn.ops.reference import viterbi_value_reference
from viterbi_backends import BACKENDS

@st.composite
def problems(draw, max_T=12, max_S=5, max_B=4):
    B = draw(st.integers(1, max_B))
    T = draw(st.integers(1, max_T))
    S = draw(st.integers(2, max_S))
    reg = draw(st.sampled_from(["entropy", "l2"]))
    gamma = draw(st.sampled_from([1e-3, 0.05, 0.5, 1.0, 4.0, 50.0, 1e3]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(B, T, S, S, generator=g, dtype=torch.float64) * scale
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    return theta, lengths, reg, gamma


@pytest.mark.parametrize("backend", BACKENDS)
@given(problems())
def test_marginals_in_conv_Y(backend, p):
    theta, lengths, reg, gamma = p
    E = viterbi_marginals(theta, lengths, reg, gamma, backend=backend)
    assert torch.isfinite(E).all()
    assert (E >= 0).all()
    real = torch.arange(theta.shape[1])[None] < lengths[:, None]
    sums = E.sum((2, 3))
    assert torch.allclose(sums[real], torch.ones_like(sums[real]), atol=1e-9)
    assert (sums[~real] == 0).all()
    assert (E <= 1 + 1e-12).all()


@pytest.mark.parametrize("backend", BACKENDS)
@given(problems())
def test_padded_equals_unpadded(backend, p):
    theta, lengths, reg, gamma = p
    v = viterbi_value(theta, lengths, reg, gamma, backend=backend)
    E = viterbi_marginals(theta, lengths, reg, gamma, backend=backend)
    for b in range(theta.shape[0]):
        L = int(lengths[b])
        vb = viterbi_value(theta[b : b + 1, :L], None, reg, gamma, backend=backend)
        Eb = viterbi_marginals(theta[b : b + 1, :L], None, reg, gamma, backend=backend)
        assert torch.allclose(v[b], vb[0], rtol=1e-12, atol=1e-12 * (1 + vb.abs().item()))
        assert torch.allclose(E[b, :L], Eb[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@given(problems(), st.floats(0.0, 5.0))
def test_value_monotone_in_theta(backend, p, bump):
    theta, lengths, reg, gamma = p
    g = torch.Generator().manual_seed(1)
    delta = torch.rand(theta.shape, generator=g, dtype=theta.dtype) * bump
    v0 = viterbi_value(theta, lengths, reg, gamma, backend=backend)
    v1 = viterbi_value(theta + delta, lengths, reg, gamma, backend=backend)
    tol = 1e-12 * (1 + v0.abs())
    assert (v1 >= v0 - tol).all()
    # and Vit_Ω(θ + c) = Vit_Ω(θ) + c·L for a constant shift (each path crosses L edges)
    c = 0.75
    vc = viterbi_value(theta + c, lengths, reg, gamma, backend=backend)
    torch.testing.assert_close(vc, v0 + c * lengths.double(), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@given(problems(max_T=6, max_S=3, max_B=2))
def test_gradient_of_value_equals_marginals(backend, p):
    theta, lengths, reg, gamma = p
    if gamma < 0.01 and reg == "l2":
        gamma = 0.05  # the bisection reference needs a threshold resolvable in float64
    theta = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(viterbi_value(theta, lengths, reg, gamma, backend=backend).sum(), theta)
    E = viterbi_marginals(theta.detach(), lengths, reg, gamma, backend=backend)
    assert torch.equal(g, E)
    # (+ 0·Σθ keeps a graph when every chain is empty)
    ref = viterbi_value_reference(theta, lengths, reg, gamma) + 0 * theta.sum()
    (g_ref,) = torch.autograd.grad(ref.sum(), theta)
    torch.testing.assert_close(E, g_ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", ["entropy", "l2"])
@pytest.mark.parametrize("S", range(2, 9))
def test_all_state_counts_and_tiny_chains(backend, reg, S):
    g = torch.Generator().manual_seed(S)
    for T in (1, 2):
        theta = torch.randn(1, T, S, S, generator=g)
        E = viterbi_marginals(theta, reg=reg, gamma=1e-3, backend=backend)
        assert torch.isfinite(E).all() and torch.allclose(E.sum((2, 3)), torch.ones(1, T))
        E = viterbi_marginals(theta, reg=reg, gamma=1e3, backend=backend)
        assert torch.isfinite(E).all() and torch.allclose(E.sum((2, 3)), torch.ones(1, T))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_large_gamma_tends_to_uniform_and_small_gamma_to_map(backend, reg):
    theta = torch.randn(1, 5, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    E = viterbi_marginals(theta, reg=reg, gamma=1e6, backend=backend)
    torch.testing.assert_close(E, torch.full_like(E, 0.25), rtol=0, atol=1e-5)
    E = viterbi_marginals(theta, reg=reg, gamma=1e-6, backend=backend)
    # hard Viterbi path: one-hot per step
    assert torch.allclose(E.amax((2, 3)), torch.ones(1, 5, dtype=torch.float64), atol=1e-6)
    best = -math.inf
    for path in range(2 ** 6):
        ys = [(path >> k) & 1 for k in range(6)]
        s = sum(theta[0, t, ys[t + 1], ys[t]].item() for t in range(5))
        if s > best:
            best, arg = s, ys
    for t in range(5):
        assert E[0, t, arg[t + 1], arg[t]] > 1 - 1e-6
