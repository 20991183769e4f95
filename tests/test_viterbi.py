"""Vit_Ω value, marginals (Alg. 3) and Hessian products (Alg. 4) against slow references.

The oracles — brute force over all S^(T+1) paths, autograd through the plain recursion of
:mod:`structattn.ops.reference`, double autograd of it for the Hessian products, float64 gradcheck and
gradgradcheck — and the structural checks run on every backend (``backend`` parameter, tests/viterbi_backends.py):
``reference`` (the tensor code that CUDA uses for S ≠ 2, third derivatives use, and every machine without a C
compiler uses) and ``cpu`` (the C kernel), each passed explicitly; ``triton`` runs a subset of them through
Triton's interpreter in a subprocess. test_kernels.py compares the fast backends with ``reference`` on more shapes.
"""

import os
import subprocess
import sys

import pytest
import torch

import structattn.ops.viterbi as V
from structattn import SmoothedViterbi, ViterbiMarginals, viterbi_hvp, viterbi_marginals, viterbi_value
from structattn.ops.reference import viterbi_bruteforce, viterbi_value_reference
from viterbi_backends import BACKENDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def test_backend_parameter_selects_the_backend():
    """The oracle tests below pass ``backend=`` explicitly: each name resolves to itself (no silent fallback)."""
    theta = rand_theta(2, 3, 2, seed=0)
    for p in BACKENDS:
        if not p.marks:
            assert V.resolve_backend(p.values[0], theta) == p.values[0]
    assert V.resolve_backend("reference", rand_theta(2, 3, 5, seed=0)) == "reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S", [2, 3])
@pytest.mark.parametrize("T", [1, 2, 4, 6])
@pytest.mark.parametrize("gamma", [0.1, 1.0, 5.0])
def test_entropy_marginals_are_gibbs_marginals(backend, S, T, gamma):
    theta = rand_theta(2, T, S, seed=S * 10 + T, scale=2.0)
    value = viterbi_value(theta, reg="entropy", gamma=gamma, backend=backend)
    E = viterbi_marginals(theta, reg="entropy", gamma=gamma, backend=backend)
    for b in range(2):
        v_bf, m_bf = viterbi_bruteforce(theta[b], gamma=gamma)
        torch.testing.assert_close(value[b], v_bf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(E[b], m_bf, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("S,T", [(2, 1), (2, 17), (2, 50), (3, 9), (3, 30), (5, 12)])
def test_marginals_equal_autograd_of_reference(backend, reg, S, T):
    B = 4
    theta = rand_theta(B, T, S, seed=S * 1000 + T, scale=1.5).requires_grad_()
    lengths = rand_lengths(B, T, seed=T)
    gamma = 0.7
    ref = viterbi_value_reference(theta, lengths, reg, gamma)
    (g_ref,) = torch.autograd.grad(ref.sum(), theta)
    value = viterbi_value(theta, lengths, reg, gamma, backend=backend)
    torch.testing.assert_close(value, ref.detach(), rtol=1e-12, atol=1e-11)
    E = viterbi_marginals(theta, lengths, reg, gamma, backend=backend)
    torch.testing.assert_close(E, g_ref, rtol=1e-10, atol=1e-12)
    # the custom backward of the value gives the same marginals
    (g,) = torch.autograd.grad(value.sum(), theta)
    torch.testing.assert_close(g, E)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("S,T", [(2, 8), (2, 25), (3, 7), (5, 5)])
def test_hvp_equals_double_autograd_of_reference(backend, reg, S, T):
    B = 3
    theta = rand_theta(B, T, S, seed=7 * T + S, scale=1.0).requires_grad_()
    lengths = rand_lengths(B, T, seed=S)
    Z = rand_theta(B, T, S, seed=99)
    gamma = 1.3
    ref = viterbi_value_reference(theta, lengths, reg, gamma)
    (g_ref,) = torch.autograd.grad(ref.sum(), theta, create_graph=True)
    (h_ref,) = torch.autograd.grad((g_ref * Z).sum(), theta)
    # through autograd of the marginals (custom backward = Alg. 4)
    E = viterbi_marginals(theta, lengths, reg, gamma, backend=backend)
    (h,) = torch.autograd.grad((E * Z).sum(), theta)
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-11)
    # directly
    dot, h2 = viterbi_hvp(theta.detach(), Z, lengths, reg, gamma, backend=backend)
    torch.testing.assert_close(h2, h_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(dot, (g_ref * Z).sum((1, 2, 3)).detach(), rtol=1e-10, atol=1e-11)
    # and through double backward of the value
    value = viterbi_value(theta, lengths, reg, gamma, backend=backend)
    (g,) = torch.autograd.grad(value.sum(), theta, create_graph=True)
    (h3,) = torch.autograd.grad((g * Z).sum(), theta)
    torch.testing.assert_close(h3, h_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("S", [2, 3])
def test_gradcheck_and_gradgradcheck(backend, reg, S):
    """Finite differences of the value (gradient = Alg. 3 backward; its derivative = Alg. 4) and of the marginals
    (gradient = Alg. 4; its derivative, a third derivative of Vit_Ω, = the differentiable reference code)."""
    theta = rand_theta(2, 4, S, seed=S, scale=0.5).requires_grad_()
    lengths = torch.tensor([4, 2])
    for fn in (viterbi_value, viterbi_marginals):
        f = lambda t: fn(t, lengths, reg, 0.9, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(f, (theta,))
        assert torch.autograd.gradgradcheck(f, (theta,))


# ---- padding ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("S", [2, 4])
def test_padded_equals_unpadded(backend, reg, dtype, tol, S):
    B, T = 6, 23
    theta = rand_theta(B, T, S, seed=5, scale=2.0, dtype=dtype).requires_grad_()
    lengths = torch.tensor([23, 1, 0, 10, 22, 5])
    Z = rand_theta(B, T, S, seed=6, dtype=dtype)
    kw = dict(reg=reg, gamma=0.5, backend=backend)
    value = viterbi_value(theta, lengths, **kw)
    E = viterbi_marginals(theta, lengths, **kw)
    (H,) = torch.autograd.grad((E * Z).sum(), theta)
    for b in range(B):
        L = int(lengths[b])
        tb = theta[b : b + 1, :L].detach().clone().requires_grad_()
        vb = viterbi_value(tb, None, **kw)
        Eb = viterbi_marginals(tb, None, **kw)
        (Hb,) = torch.autograd.grad((Eb * Z[b : b + 1, :L]).sum(), tb) if L else (torch.zeros_like(tb),)
        torch.testing.assert_close(value[b : b + 1], vb, rtol=tol, atol=tol)
        torch.testing.assert_close(E[b : b + 1, :L], Eb, rtol=tol, atol=tol)
        torch.testing.assert_close(H[b : b + 1, :L], Hb, rtol=tol, atol=tol)
        # padding: exactly zero marginals and zero Hessian rows
        assert (E[b, L:] == 0).all() and (H[b, L:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_content_is_ignored(backend):
    theta = rand_theta(3, 10, 2, seed=1)
    lengths = torch.tensor([10, 4, 7])
    other = theta.clone()
    g = torch.Generator().manual_seed(2)
    for b, L in enumerate(lengths.tolist()):
        other[b, L:] = torch.randn(other[b, L:].shape, generator=g, dtype=other.dtype) * 100
    for reg in REGS:
        kw = dict(reg=reg, backend=backend)
        assert torch.equal(viterbi_value(theta, lengths, **kw), viterbi_value(other, lengths, **kw))
        assert torch.equal(viterbi_marginals(theta, lengths, **kw), viterbi_marginals(other, lengths, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_is_defined(backend):
    """An empty chain: v_0 = 0_S, so Vit_Ω = max_Ω(0_S) = γ log S (entropy) or −γ/(2S) (ℓ2, q uniform)."""
    theta = rand_theta(2, 3, 3, seed=2)
    lengths = torch.tensor([0, 3])
    v = viterbi_value(theta, lengths, "entropy", 2.0, backend=backend)
    torch.testing.assert_close(v[0], torch.tensor(2.0 * torch.log(torch.tensor(3.0)).item(), dtype=torch.float64))
    v = viterbi_value(theta, lengths, "l2", 2.0, backend=backend)
    torch.testing.assert_close(v[0], torch.tensor(-2.0 / (2 * 3), dtype=torch.float64))
    E = viterbi_marginals(theta, lengths, "l2", 2.0, backend=backend)
    assert (E[0] == 0).all()


# ---- structure of the marginals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("S", [2, 3, 5])
def test_marginals_in_marginal_polytope(backend, reg, S):
    B, T = 5, 40
    theta = rand_theta(B, T, S, seed=S, scale=3.0)
    lengths = rand_lengths(B, T, seed=3)
    E = viterbi_marginals(theta, lengths, reg, 1.0, backend=backend)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_marginals_exactly_sparse_on_peaked_input(backend):
    # one path dominates by a wide margin: ℓ2 marginals are exactly one-hot (entropy's are only close)
    B, T, S = 2, 12, 3
    theta = torch.zeros(B, T, S, S)
    path = torch.randint(0, S, (T + 1,), generator=torch.Generator().manual_seed(0))
    for t in range(T):
        theta[:, t, path[t + 1], path[t]] = 5.0
    E = viterbi_marginals(theta, reg="l2", gamma=1.0, backend=backend)
    assert ((E == 0) | (E == 1)).all()
    assert (E.sum((2, 3)) == 1).all()
    for t in range(T):
        assert (E[:, t, path[t + 1], path[t]] == 1).all()
    Ee = viterbi_marginals(theta, reg="entropy", gamma=1.0, backend=backend)
    assert (Ee > 0).all()
    # ... and in the attention-like regime, a good part of the entries are exact zeros
    theta = rand_theta(4, 30, 2, seed=11, scale=4.0, dtype=torch.float32)
    E = viterbi_marginals(theta, reg="l2", gamma=1.0, backend=backend)
    assert (E == 0).float().mean() > 0.4


# ---- numerics, dtypes, API ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("gamma", [0.01, 1.0, 100.0])
def test_large_scores_long_chains_are_finite(backend, reg, gamma):
    theta = rand_theta(2, 2000, 2, seed=0, dtype=torch.float32) * 1e4
    theta.requires_grad_()
    v = viterbi_value(theta, reg=reg, gamma=gamma, backend=backend)
    E = viterbi_marginals(theta, reg=reg, gamma=gamma, backend=backend)
    (H,) = torch.autograd.grad((E * torch.ones_like(E)).sum(), theta)
    assert torch.isfinite(v).all() and torch.isfinite(E).all() and torch.isfinite(H).all()
    torch.testing.assert_close(E.sum((2, 3)), torch.ones(2, 2000), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_float64(backend):
    theta = rand_theta(3, 30, 3, seed=4, scale=2.0)
    for reg in REGS:
        E64 = viterbi_marginals(theta, reg=reg, backend=backend)
        E32 = viterbi_marginals(theta.float(), reg=reg, backend=backend)
        assert E32.dtype == torch.float32
        torch.testing.assert_close(E32.double(), E64, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(backend, dtype):
    theta = rand_theta(2, 15, 2, seed=8, scale=2.0, dtype=torch.float32)
    th = theta.to(dtype).requires_grad_()
    E = viterbi_marginals(th, reg="entropy", backend=backend)
    v = viterbi_value(th, reg="l2", backend=backend)
    assert E.dtype == dtype and v.dtype == dtype
    ref = viterbi_marginals(th.detach().float(), reg="entropy", backend=backend)
    torch.testing.assert_close(E.float(), ref.to(dtype).float())
    (g,) = torch.autograd.grad(v.float().sum(), th)
    assert g.dtype == dtype and torch.isfinite(g.float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_one_and_noncontiguous(backend):
    base = rand_theta(4, 10, 3, seed=3)
    nc = base.transpose(2, 3)  # non-contiguous view
    E = viterbi_marginals(nc, reg="l2", backend=backend)
    torch.testing.assert_close(E, viterbi_marginals(nc.contiguous(), reg="l2", backend=backend))
    one = viterbi_marginals(nc[1:2], reg="l2", backend=backend)
    torch.testing.assert_close(one, E[1:2])
    expanded = base[:1].expand(3, -1, -1, -1)
    Ee = viterbi_marginals(expanded, backend=backend)
    torch.testing.assert_close(Ee, viterbi_marginals(base[:1], backend=backend).expand(3, -1, -1, -1))


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


# ---- Triton (interpreter) and CUDA ----------------------------------------------------------------------------------

_TRITON_ORACLES = """
import sys
sys.path.insert(0, "tests")
import torch
import structattn.ops.viterbi as V
from structattn.ops.kernels import triton_viterbi
import test_viterbi as tv
assert triton_viterbi.available(), triton_viterbi.unavailable_reason()
assert V.resolve_backend("triton", tv.rand_theta(2, 3, 2, seed=0)) == "triton"
n = 0
for reg in tv.REGS:
    for T in (1, 4):
        tv.test_entropy_marginals_are_gibbs_marginals("triton", 2, T, 1.0); n += 1
    for S, T in ((2, 1), (2, 17)):
        tv.test_marginals_equal_autograd_of_reference("triton", reg, S, T); n += 1
    tv.test_hvp_equals_double_autograd_of_reference("triton", reg, 2, 8); n += 1
    tv.test_padded_equals_unpadded("triton", reg, torch.float64, 1e-12, 2); n += 1
print("ok", n)
"""


def test_oracles_on_triton_through_the_interpreter():
    """The Triton kernels (S = 2) against brute force, autograd and double autograd of the plain recursion, and
    padded = unpadded: the oracle tests above, called with backend="triton" in a process with TRITON_INTERPRET=1
    (read when Triton compiles the kernels). test_kernels.py compares them with ``reference`` on more cases."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _TRITON_ORACLES], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.strip() == "ok 12"


@pytest.mark.cuda
@pytest.mark.parametrize("reg", REGS)
def test_cuda_general_S_reference_backend_against_the_oracles(reg):
    """On CUDA, S ≠ 2 runs the reference backend: its value, marginals and Hessian products equal autograd and
    double autograd of the plain recursion (float64, on the CPU)."""
    B, T, S, gamma = 3, 9, 3, 0.8
    theta = rand_theta(B, T, S, seed=21, scale=1.5).requires_grad_()
    lengths = rand_lengths(B, T, seed=21)
    Z = rand_theta(B, T, S, seed=22)
    ref = viterbi_value_reference(theta, lengths, reg, gamma)
    (g_ref,) = torch.autograd.grad(ref.sum(), theta, create_graph=True)
    (h_ref,) = torch.autograd.grad((g_ref * Z).sum(), theta)
    tc = theta.detach().cuda().requires_grad_()
    assert V.resolve_backend("auto", tc) == "reference"
    value = viterbi_value(tc, lengths.cuda(), reg, gamma, backend="auto")
    E = viterbi_marginals(tc, lengths.cuda(), reg, gamma, backend="auto")
    (H,) = torch.autograd.grad((E * Z.cuda()).sum(), tc)
    torch.testing.assert_close(value.cpu(), ref.detach(), rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(E.detach().cpu(), g_ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H.cpu(), h_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.cuda
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
