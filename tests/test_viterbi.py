"""Vit_Ω value, marginals (Alg. 3) and Hessian products (Alg. 4) against slow references."""

import pytest
import torch

from structattn import SmoothedViterbi, ViterbiMarginals, viterbi_hvp, viterbi_marginals, viterbi_value
from structattn.ops.reference import viterbi_bruteforce, viterbi_value_reference

REGS = ["entropy", "l2"]


def rand_theta(B, T, S, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, S, S, generator=g, dtype=torch.float64) * scale).to(dtype)


def rand_lengths(B, T, seed):
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T  # at least one full chain
    return lengths


# ---- exactness -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [2, 3])
@pytest.mark.parametrize("T", [1, 2, 4, 6])
@pytest.mark.parametrize("gamma", [0.1, 1.0, 5.0])
def test_entropy_marginals_are_gibbs_marginals(S, T, gamma):
    theta = rand_theta(2, T, S, seed=S * 10 + T, scale=2.0)
    value = viterbi_value(theta, reg="entropy", gamma=gamma)
    E = viterbi_marginals(theta, reg="entropy", gamma=gamma)
    for b in range(2):
        v_bf, m_bf = viterbi_bruteforce(theta[b], gamma=gamma)
        torch.testing.assert_close(value[b], v_bf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(E[b], m_bf, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("S,T", [(2, 1), (2, 17), (2, 50), (3, 9), (3, 30), (5, 12)])
def test_marginals_equal_autograd_of_reference(reg, S, T):
    B = 4
    theta = rand_theta(B, T, S, seed=S * 1000 + T, scale=1.5).requires_grad_()
    lengths = rand_lengths(B, T, seed=T)
    gamma = 0.7
    ref = viterbi_value_reference(theta, lengths, reg, gamma)
    (g_ref,) = torch.autograd.grad(ref.sum(), theta)
    value = viterbi_value(theta, lengths, reg, gamma)
    torch.testing.assert_close(value, ref.detach(), rtol=1e-12, atol=1e-11)
    E = viterbi_marginals(theta, lengths, reg, gamma)
    torch.testing.assert_close(E, g_ref, rtol=1e-10, atol=1e-12)
    # the custom backward of the value gives the same marginals
    (g,) = torch.autograd.grad(value.sum(), theta)
    torch.testing.assert_close(g, E)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("S,T", [(2, 8), (2, 25), (3, 7), (5, 5)])
def test_hvp_equals_double_autograd_of_reference(reg, S, T):
    B = 3
    theta = rand_theta(B, T, S, seed=7 * T + S, scale=1.0).requires_grad_()
    lengths = rand_lengths(B, T, seed=S)
    Z = rand_theta(B, T, S, seed=99)
    gamma = 1.3
    ref = viterbi_value_reference(theta, lengths, reg, gamma)
    (g_ref,) = torch.autograd.grad(ref.sum(), theta, create_graph=True)
    (h_ref,) = torch.autograd.grad((g_ref * Z).sum(), theta)
    # through autograd of the marginals (custom backward = Alg. 4)
    E = viterbi_marginals(theta, lengths, reg, gamma)
    (h,) = torch.autograd.grad((E * Z).sum(), theta)
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-11)
    # directly
    dot, h2 = viterbi_hvp(theta.detach(), Z, lengths, reg, gamma)
    torch.testing.assert_close(h2, h_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dot, (g_ref * Z).sum((1, 2, 3)).detach(), rtol=1e-10, atol=1e-11)
    # and through double backward of the value
    value = viterbi_value(theta, lengths, reg, gamma)
    (g,) = torch.autograd.grad(value.sum(), theta, create_graph=True)
    (h3,) = torch.autograd.grad((g * Z).sum(), theta)
    torch.testing.assert_close(h3, h_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("S", [2, 3])
def test_gradcheck_and_gradgradcheck(reg, S):
    theta = rand_theta(2, 4, S, seed=S, scale=0.5).requires_grad_()
    lengths = torch.tensor([4, 2])
    for fn in (viterbi_value, viterbi_marginals):
        f = lambda t: fn(t, lengths, reg, 0.9)  # noqa: E731
        assert torch.autograd.gradcheck(f, (theta,))
        assert torch.autograd.gradgradcheck(f, (theta,))


# ---- padding ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("S", [2, 4])
def test_padded_equals_unpadded(reg, dtype, tol, S):
    B, T = 6, 23
    theta = rand_theta(B, T, S, seed=5, scale=2.0, dtype=dtype).requires_grad_()
    lengths = torch.tensor([23, 1, 0, 10, 22, 5])
    Z = rand_theta(B, T, S, seed=6, dtype=dtype)
    value = viterbi_value(theta, lengths, reg, 0.5)
    E = viterbi_marginals(theta, lengths, reg, 0.5)
    (H,) = torch.autograd.grad((E * Z).sum(), theta)
    for b in range(B):
        L = int(lengths[b])
        tb = theta[b : b + 1, :L].detach().clone().requires_grad_()
        vb = viterbi_value(tb, None, reg, 0.5)
        Eb = viterbi_marginals(tb, None, reg, 0.5)
        (Hb,) = torch.autograd.grad((Eb * Z[b : b + 1, :L]).sum(), tb) if L else (torch.zeros_like(tb),)
        torch.testing.assert_close(value[b : b + 1], vb, rtol=tol, atol=tol)
        torch.testing.assert_close(E[b : b + 1, :L], Eb, rtol=tol, atol=tol)
        torch.testing.assert_close(H[b : b + 1, :L], Hb, rtol=tol, atol=tol)
        # padding: exactly zero marginals and zero Hessian rows
        assert (E[b, L:] == 0).all() and (H[b, L:] == 0).all()


def test_padding_content_is_ignored():
    theta = rand_theta(3, 10, 2, seed=1)
    lengths = torch.tensor([10, 4, 7])
    other = theta.clone()
    for b, L in enumerate(lengths.tolist()):
        other[b, L:] = torch.randn_like(other[b, L:]) * 100
    for reg in REGS:
        assert torch.equal(viterbi_value(theta, lengths, reg), viterbi_value(other, lengths, reg))
        assert torch.equal(viterbi_marginals(theta, lengths, reg), viterbi_marginals(other, lengths, reg))


def test_zero_length_is_defined():
    theta = rand_theta(2, 3, 3, seed=2)
    lengths = torch.tensor([0, 3])
    v = viterbi_value(theta, lengths, "entropy", 2.0)
    torch.testing.assert_close(v[0], torch.tensor(2.0 * torch.log(torch.tensor(3.0)).item(), dtype=torch.float64))
    v = viterbi_value(theta, lengths, "l2", 2.0)
    torch.testing.assert_close(v[0], torch.tensor(-2.0 / (2 * 3), dtype=torch.float64))
    E = viterbi_marginals(theta, lengths, "l2", 2.0)
    assert (E[0] == 0).all()


# ---- structure of the marginals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("S", [2, 3, 5])
def test_marginals_in_marginal_polytope(reg, S):
    B, T = 5, 40
    theta = rand_theta(B, T, S, seed=S, scale=3.0)
    lengths = rand_lengths(B, T, seed=3)
    E = viterbi_marginals(theta, lengths, reg, 1.0)
    assert (E >= 0).all()
    mask = torch.arange(T)[None] < lengths[:, None]
    sums = E.sum((2, 3))
    torch.testing.assert_close(sums[mask], torch.ones(int(mask.sum()), dtype=torch.float64), rtol=0, atol=1e-12)
    assert (sums[~mask] == 0).all()
    # consistency of consecutive steps: Σ_i E_t[i, j] = Σ_k E_{t−1}[j, k] (flow conservation on the trellis)
    for b in range(B):
        L = int(lengths[b])
        if L > 1:
            torch.testing.assert_close(E[b, 1:L].sum(1), E[b, : L - 1].sum(2), rtol=0, atol=1e-12)


def test_l2_marginals_exactly_sparse_on_peaked_input():
    # one path dominates by a wide margin: ℓ2 marginals are exactly one-hot (entropy's are only close)
    B, T, S = 2, 12, 3
    theta = torch.zeros(B, T, S, S)
    path = torch.randint(0, S, (T + 1,), generator=torch.Generator().manual_seed(0))
    for t in range(T):
        theta[:, t, path[t + 1], path[t]] = 5.0
    E = viterbi_marginals(theta, reg="l2", gamma=1.0)
    assert ((E == 0) | (E == 1)).all()
    assert (E.sum((2, 3)) == 1).all()
    for t in range(T):
        assert (E[:, t, path[t + 1], path[t]] == 1).all()
    Ee = viterbi_marginals(theta, reg="entropy", gamma=1.0)
    assert (Ee > 0).all()
    # ... and in the attention-like regime, a good part of the entries are exact zeros
    theta = rand_theta(4, 30, 2, seed=11, scale=4.0, dtype=torch.float32)
    E = viterbi_marginals(theta, reg="l2", gamma=1.0)
    assert (E == 0).float().mean() > 0.4


# ---- numerics, dtypes, API ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("gamma", [0.01, 1.0, 100.0])
def test_large_scores_long_chains_are_finite(reg, gamma):
    theta = rand_theta(2, 2000, 2, seed=0, dtype=torch.float32) * 1e4
    theta.requires_grad_()
    v = viterbi_value(theta, reg=reg, gamma=gamma)
    E = viterbi_marginals(theta, reg=reg, gamma=gamma)
    (H,) = torch.autograd.grad((E * torch.ones_like(E)).sum(), theta)
    assert torch.isfinite(v).all() and torch.isfinite(E).all() and torch.isfinite(H).all()
    torch.testing.assert_close(E.sum((2, 3)), torch.ones(2, 2000), rtol=0, atol=1e-5)


def test_float32_matches_float64():
    theta = rand_theta(3, 30, 3, seed=4, scale=2.0)
    for reg in REGS:
        E64 = viterbi_marginals(theta, reg=reg)
        E32 = viterbi_marginals(theta.float(), reg=reg)
        assert E32.dtype == torch.float32
        torch.testing.assert_close(E32.double(), E64, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    theta = rand_theta(2, 15, 2, seed=8, scale=2.0, dtype=torch.float32)
    th = theta.to(dtype).requires_grad_()
    E = viterbi_marginals(th, reg="entropy")
    v = viterbi_value(th, reg="l2")
    assert E.dtype == dtype and v.dtype == dtype
    ref = viterbi_marginals(th.detach().float(), reg="entropy")
    torch.testing.assert_close(E.float(), ref.to(dtype).float())
    (g,) = torch.autograd.grad(v.float().sum(), th)
    assert g.dtype == dtype and torch.isfinite(g.float()).all()


def test_batch_of_one_and_noncontiguous():
    base = rand_theta(4, 10, 3, seed=3)
    nc = base.transpose(2, 3)  # non-contiguous view
    E = viterbi_marginals(nc, reg="l2")
    torch.testing.assert_close(E, viterbi_marginals(nc.contiguous(), reg="l2"))
    one = viterbi_marginals(nc[1:2], reg="l2")
    torch.testing.assert_close(one, E[1:2])
    expanded = base[:1].expand(3, -1, -1, -1)
    Ee = viterbi_marginals(expanded)
    torch.testing.assert_close(Ee, viterbi_marginals(base[:1]).expand(3, -1, -1, -1))


def test_modules():
    theta = rand_theta(2, 5, 2, seed=1)
    m = ViterbiMarginals("l2", 2.0)
    torch.testing.assert_close(m(theta), viterbi_marginals(theta, reg="l2", gamma=2.0))
    v = SmoothedViterbi("entropy", 0.5)
    torch.testing.assert_close(v(theta, torch.tensor([5, 3])), viterbi_value(theta, torch.tensor([5, 3]), gamma=0.5))
    assert "l2" in repr(m)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(theta=torch.zeros(2, 3, 2)), ValueError, "shape"),
        (dict(theta=torch.zeros(2, 3, 2, 3)), ValueError, "shape"),
        (dict(theta=torch.zeros(2, 3, 1, 1)), ValueError, "S >= 2"),
        (dict(theta=torch.zeros(2, 3, 2, 2, dtype=torch.long)), TypeError, "floating"),
        (dict(theta=torch.zeros(2, 3, 2, 2), lengths=torch.tensor([1.0, 2.0])), TypeError, "integer"),
        (dict(theta=torch.zeros(2, 3, 2, 2), lengths=torch.tensor([1, 2, 3])), ValueError, r"shape \(2,\)"),
        (dict(theta=torch.zeros(2, 3, 2, 2), lengths=torch.tensor([1, 4])), ValueError, r"\[0, T=3\]"),
        (dict(theta=torch.zeros(2, 3, 2, 2), lengths=torch.tensor([-1, 2])), ValueError, r"\[0, T=3\]"),
        (dict(theta=torch.zeros(2, 3, 2, 2), reg="L2"), ValueError, "reg must be one of"),
        (dict(theta=torch.zeros(2, 3, 2, 2), gamma=0.0), ValueError, "gamma"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    for fn in (viterbi_value, viterbi_marginals):
        with pytest.raises(exc, match=match):
            fn(**kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_theta_raises(bad):
    theta = torch.zeros(2, 3, 2, 2)
    theta[1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 2, 0, 1\)"):
        viterbi_marginals(theta)


def test_lengths_as_list_and_int32():
    theta = rand_theta(2, 4, 2, seed=0)
    a = viterbi_marginals(theta, [4, 2])
    b = viterbi_marginals(theta, torch.tensor([4, 2], dtype=torch.int32))
    torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("reg", REGS)
def test_cuda_equals_cpu(reg):
    theta = rand_theta(16, 40, 2, seed=3, scale=2.0, dtype=torch.float32)
    lengths = rand_lengths(16, 40, seed=3)
    Z = rand_theta(16, 40, 2, seed=4, dtype=torch.float32)
    tc = theta.cuda().requires_grad_()
    E = viterbi_marginals(tc, lengths.cuda(), reg)
    (H,) = torch.autograd.grad((E * Z.cuda()).sum(), tc)
    t = theta.clone().requires_grad_()
    E0 = viterbi_marginals(t, lengths, reg)
    (H0,) = torch.autograd.grad((E0 * Z).sum(), t)
    torch.testing.assert_close(E.cpu(), E0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(H.cpu(), H0, rtol=1e-4, atol=1e-5)
