"""DTW_Ω value, expected alignment E (Alg. 5) and Hessian products (Alg. 6) against oracles no one here wrote and
slow, obviously-right references; every backend is checked against the oracle, not only against the others.

Oracles (each test records the one it ran with ``record_property("oracle", ...)``):
* ``soft-dtw`` 0.1.6 (the authors of the soft-DTW paper; ``sdtw.SoftDTW``) and ``tslearn`` (``tslearn.metrics``):
  the −γH value and its gradient. soft-DTW of a cost matrix C is −DTW_{−γH}(−C) and its gradient is E(−C).
* brute-force enumeration of every monotone alignment (tiny N, M): for −γH, DTW is γ·logsumexp_Y(⟨Y, θ⟩/γ) and E the
  Gibbs expectation of Y; as γ → 0 both Ω tend to the hard max and its argmax. Not for ℓ2 (its DP value is not a
  smoothed max over alignments: max_{ℓ2} is not associative).
* a plain Python recursion over the cells with max_Ω written from App. B.1 (structattn.ops.reference: logsumexp,
  simplex projection by bisection), differentiated by autograd: ℓ2 values and gradients, and every HVP.

Under CI=true a missing oracle package fails the test instead of skipping it.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from structattn import DTWMarginals, SmoothedDTW, dtw_hvp, dtw_marginals, dtw_value
from structattn.ops import kernels
from structattn.ops.reference import max_omega_reference

REGS = ["entropy", "l2"]
BACKENDS = ["reference", "cpu"]


def _need(module: str):
    """Import an oracle package; skip if absent, except under CI=true, where its absence is a failure."""
    if os.environ.get("CI") == "true":
        return __import__(module, fromlist=["_"])
    return pytest.importorskip(module)


def rand(B, N, M, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, M, generator=g, dtype=torch.float64) * scale).to(dtype)


def rand_lengths(B, N, M, seed):
    g = torch.Generator().manual_seed(seed + 7)
    lx = torch.randint(1, N + 1, (B,), generator=g)
    ly = torch.randint(1, M + 1, (B,), generator=g)
    lx[0], ly[0] = N, M  # at least one full pair
    return lx, ly


# ---- obviously-right references ---------------------------------------------------------------------------------


def recursion_value(theta, n=None, m=None, reg="entropy", gamma=1.0):
    """DTW_Ω of ONE pair θ (N, M) by the literal double loop of Alg. 5 (scores, max), max_Ω over the existing parents
    only (App. B.1 definitions). Differentiable by autograd (slowly)."""
    N, M = theta.shape
    n = N if n is None else n
    m = M if m is None else m
    v = {}
    for i in range(n):
        for j in range(m):
            parents = [v[c] for c in ((i, j - 1), (i - 1, j - 1), (i - 1, j)) if c in v]
            if i == 0 and j == 0:
                parents = [theta.new_zeros(())]
            v[i, j] = theta[i, j] + max_omega_reference(torch.stack(parents), reg, gamma)
    return v[n - 1, m - 1]


def alignments(n, m):
    """Every monotone alignment of (0, 0) → (n−1, m−1) with →, ↓, ↘ moves, as lists of cells."""
    out = []

    def walk(path):
        i, j = path[-1]
        if (i, j) == (n - 1, m - 1):
            out.append(list(path))
            return
        for di, dj in ((0, 1), (1, 1), (1, 0)):
            if i + di < n and j + dj < m:
                path.append((i + di, j + dj))
                walk(path)
                path.pop()

    walk([(0, 0)])
    return out


def bruteforce(theta, gamma):
    """−γH value and Gibbs-expected alignment of ONE pair by enumeration; also the hard max and its argmax."""
    n, m = theta.shape
    paths = alignments(n, m)
    A = torch.zeros(len(paths), n, m, dtype=theta.dtype)
    for k, p in enumerate(paths):
        for c in p:
            A[k][c] = 1.0
    scores = (A * theta).sum((1, 2))
    w = torch.softmax(scores / gamma, 0)
    return gamma * torch.logsumexp(scores / gamma, 0), (w[:, None, None] * A).sum(0), scores.max(), A[scores.argmax()]


def test_alignment_count_is_delannoy():
    # |Y| = Delannoy(N−1, M−1) (App. B.3): 1, 3, 13, 63 on the diagonal; a check of the enumerator itself.
    assert [len(alignments(k, k)) for k in (1, 2, 3, 4)] == [1, 3, 13, 63]
    assert len(alignments(3, 5)) == len(alignments(5, 3)) == 41  # D(2, 4) = Σ_k C(2,k) C(4,k) 2^k


# ---- external oracles: −γH value and gradient ---------------------------------------------------------------------


def _oracle_softdtw(package, C, gamma):
    """(value, gradient w.r.t. C) of soft-DTW of one cost matrix C (numpy, float64) by ``package``."""
    if package == "sdtw":
        sdtw = _need("sdtw")
        s = sdtw.SoftDTW(C, gamma=gamma)
        return s.compute(), s.grad()
    metrics = _need("tslearn.metrics")
    s = metrics.SoftDTW(C, gamma=gamma)
    return s.compute(), s.grad()


@pytest.mark.parametrize("package", ["sdtw", "tslearn"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,M", [(1, 1), (1, 6), (5, 1), (4, 7), (9, 5), (16, 16), (23, 40)])
@pytest.mark.parametrize("gamma", [0.1, 1.0, 3.0])
def test_entropy_against_softdtw_packages(package, backend, N, M, gamma, record_property):
    record_property("oracle", {"sdtw": "soft-dtw 0.1.6 (sdtw.SoftDTW)", "tslearn": "tslearn.metrics.SoftDTW"}[package])
    g = torch.Generator().manual_seed(N * 100 + M)
    C = torch.rand(3, N, M, generator=g, dtype=torch.float64) * 4  # nonnegative costs like a distance matrix
    value = dtw_value(-C, gamma=gamma, backend=backend)
    E = dtw_marginals(-C, gamma=gamma, backend=backend)
    for b in range(3):
        v_or, g_or = _oracle_softdtw(package, C[b].numpy(), gamma)
        assert abs(-value[b].item() - v_or) <= 1e-8 * max(1.0, abs(v_or))
        torch.testing.assert_close(E[b], torch.from_numpy(g_or), rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_time_series_against_tslearn(backend, record_property):
    """The whole soft-DTW loss between two multivariate series (squared Euclidean cost), value and gradient w.r.t.
    the series, against tslearn.metrics.soft_dtw / SquaredEuclidean + SoftDTW."""
    record_property("oracle", "tslearn.metrics.soft_dtw + SquaredEuclidean")
    metrics = _need("tslearn.metrics")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(31, 3, generator=g, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    loss = -dtw_value(-C[None], gamma=0.5, backend=backend)[0]
    (gx,) = torch.autograd.grad(loss, x)
    ref = metrics.soft_dtw(x.detach().numpy(), y.numpy(), gamma=0.5)
    assert abs(loss.item() - ref) <= 1e-8 * max(1.0, abs(ref))
    D = metrics.SquaredEuclidean(x.detach().numpy(), y.numpy())
    s = metrics.SoftDTW(D, gamma=0.5)
    s.compute()
    gx_ref = D.jacobian_product(s.grad())
    torch.testing.assert_close(gx, torch.from_numpy(gx_ref), rtol=0, atol=1e-8)


# ---- brute force (−γH) and the hard limit (both Ω) ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,M", [(1, 1), (1, 4), (3, 1), (2, 2), (3, 4), (4, 4), (5, 3)])
@pytest.mark.parametrize("gamma", [0.3, 1.0, 4.0])
def test_entropy_equals_bruteforce_over_alignments(backend, N, M, gamma, record_property):
    record_property("oracle", "brute-force enumeration of all monotone alignments")
    theta = rand(2, N, M, seed=N * 10 + M, scale=2.0)
    value = dtw_value(theta, gamma=gamma, backend=backend)
    E = dtw_marginals(theta, gamma=gamma, backend=backend)
    for b in range(2):
        v_bf, e_bf, _, _ = bruteforce(theta[b], gamma)
        torch.testing.assert_close(value[b], v_bf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(E[b], e_bf, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("N,M", [(3, 4), (4, 4), (5, 3)])
def test_small_gamma_tends_to_the_hard_alignment(backend, reg, N, M, record_property):
    record_property("oracle", "brute-force enumeration: hard max and argmax alignment")
    theta = rand(3, N, M, seed=N + 31 * M, scale=3.0)
    gamma = 1e-4
    value = dtw_value(theta, reg=reg, gamma=gamma, backend=backend)
    E = dtw_marginals(theta, reg=reg, gamma=gamma, backend=backend)
    for b in range(3):
        _, _, vmax, amax = bruteforce(theta[b], 1.0)
        # Prop. 2.2: |DP_γΩ − LP| ≤ γ·(number of max_Ω on a path)·(range of Ω on △³) ≤ γ·(N + M)·log 3
        assert abs(value[b].item() - vmax.item()) <= gamma * (N + M) * 1.1
        torch.testing.assert_close(E[b], amax, rtol=0, atol=1e-6)


# ---- ℓ2 (and −γH) against the plain recursion ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("N,M", [(1, 1), (1, 5), (4, 1), (3, 3), (6, 4), (5, 9)])
def test_value_and_gradient_against_the_recursion(backend, reg, N, M, record_property):
    record_property("oracle", "autograd through a plain Python recursion (App. B.1 max_Ω)")
    B, gamma = 3, 0.8
    theta = rand(B, N, M, seed=N * 7 + M, scale=1.5).requires_grad_()
    value = dtw_value(theta, reg=reg, gamma=gamma, backend=backend)
    E = dtw_marginals(theta, reg=reg, gamma=gamma, backend=backend)
    for b in range(B):
        ref = recursion_value(theta[b], reg=reg, gamma=gamma)
        (g_ref,) = torch.autograd.grad(ref, theta)
        torch.testing.assert_close(value[b], ref.detach(), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(E[b], g_ref[b], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("N,M", [(1, 1), (2, 3), (4, 4), (6, 3)])
def test_hvp_against_double_autograd_of_the_recursion(backend, reg, N, M, record_property):
    record_property("oracle", "double autograd through a plain Python recursion")
    B, gamma = 2, 0.6
    theta = rand(B, N, M, seed=N * 5 + M + 1, scale=1.0).requires_grad_()
    Z = rand(B, N, M, seed=99 + N + M)
    dot, E_dot = dtw_hvp(theta, Z, reg=reg, gamma=gamma, backend=backend)
    for b in range(B):
        ref = recursion_value(theta[b], reg=reg, gamma=gamma)
        (g,) = torch.autograd.grad(ref, theta, create_graph=True)
        gz = (g[b] * Z[b]).sum()
        # N = M = 1: the value is θ + const, the gradient constant and the Hessian zero (no graph left)
        h = torch.autograd.grad(gz, theta)[0] if gz.requires_grad else torch.zeros_like(theta)
        torch.testing.assert_close(dot[b], gz.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(E_dot[b], h[b], rtol=1e-8, atol=1e-8)
    # the backward of the marginals is the same Hessian product
    E = dtw_marginals(theta, reg=reg, gamma=gamma, backend=backend)
    (h2,) = torch.autograd.grad(E, theta, grad_outputs=Z)
    torch.testing.assert_close(h2, E_dot, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_alignments_have_exact_zeros(backend, record_property):
    record_property("oracle", "autograd through a plain Python recursion (support of E)")
    theta = rand(2, 12, 15, seed=5, scale=2.0).requires_grad_()
    E = dtw_marginals(theta, reg="l2", gamma=0.5, backend=backend)
    zeros = E == 0
    assert zeros.float().mean() > 0.5  # mostly exactly sparse
    assert (E[:, 0, 0] == 1).all() and (E[:, -1, -1] == 1).all()
    assert ((E >= 0) & (E <= 1 + 1e-12)).all()
    (g_ref,) = torch.autograd.grad(recursion_value(theta[0], reg="l2", gamma=0.5), theta)
    assert torch.equal(zeros[0], g_ref[0] == 0)  # the same support as the oracle
    # −γH has no exact zeros at the same scores
    assert (dtw_marginals(theta, gamma=0.5, backend=backend) > 0).all()


# ---- batching, padding, orientation -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
def test_padding_equals_unpadded(backend, reg):
    B, N, M, gamma = 6, 7, 9, 0.7
    theta = rand(B, N, M, seed=11, scale=1.3)
    lx, ly = rand_lengths(B, N, M, seed=2)
    padded = theta.clone()
    padded[_pad_mask(lx, ly, N, M)] = float("nan")  # padded cells are ignored, whatever they hold
    value = dtw_value(padded, lx, ly, reg, gamma, backend=backend)
    E = dtw_marginals(padded, lx, ly, reg, gamma, backend=backend)
    Z = rand(B, N, M, seed=12)
    dot, E_dot = dtw_hvp(padded, Z, lx, ly, reg, gamma, backend=backend)
    assert (E[_pad_mask(lx, ly, N, M)] == 0).all() and (E_dot[_pad_mask(lx, ly, N, M)] == 0).all()
    for b in range(B):
        n, m = int(lx[b]), int(ly[b])
        sub = theta[b : b + 1, :n, :m]
        torch.testing.assert_close(value[b], dtw_value(sub, reg=reg, gamma=gamma, backend=backend)[0])
        torch.testing.assert_close(E[b, :n, :m], dtw_marginals(sub, reg=reg, gamma=gamma, backend=backend)[0])
        d1, h1 = dtw_hvp(sub, Z[b : b + 1, :n, :m], reg=reg, gamma=gamma, backend=backend)
        torch.testing.assert_close(dot[b], d1[0])
        torch.testing.assert_close(E_dot[b, :n, :m], h1[0])
    # the gradient of the value is E, zero on padding
    th = padded.clone().requires_grad_()
    (g,) = torch.autograd.grad(dtw_value(th, lx, ly, reg, gamma, backend=backend).sum(), th)
    torch.testing.assert_close(g, E)


def _pad_mask(lx, ly, N, M):
    i, j = torch.arange(N), torch.arange(M)
    return (i[None, :, None] >= lx[:, None, None]) | (j[None, None, :] >= ly[:, None, None])


@pytest.mark.parametrize("reg", REGS)
def test_backends_agree_and_transpose_is_symmetric(reg):
    theta = rand(4, 13, 6, seed=21)
    lx, ly = rand_lengths(4, 13, 6, seed=3)
    out = {}
    for backend in BACKENDS:
        out[backend] = (dtw_value(theta, lx, ly, reg, 0.4, backend=backend),
                        dtw_marginals(theta, lx, ly, reg, 0.4, backend=backend))
        vt = dtw_value(theta.transpose(1, 2), ly, lx, reg, 0.4, backend=backend)
        Et = dtw_marginals(theta.transpose(1, 2), ly, lx, reg, 0.4, backend=backend)
        torch.testing.assert_close(vt, out[backend][0])
        torch.testing.assert_close(Et.transpose(1, 2), out[backend][1])
    torch.testing.assert_close(out["cpu"][0], out["reference"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["cpu"][1], out["reference"][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
def test_float32_close_to_float64(backend, reg):
    theta = rand(3, 30, 41, seed=8)
    v64 = dtw_value(theta, reg=reg, gamma=0.5, backend=backend)
    E64 = dtw_marginals(theta, reg=reg, gamma=0.5, backend=backend)
    v32 = dtw_value(theta.float(), reg=reg, gamma=0.5, backend=backend)
    E32 = dtw_marginals(theta.float(), reg=reg, gamma=0.5, backend=backend)
    assert v32.dtype == E32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(E32.double(), E64, rtol=0, atol=1e-4)


def test_half_is_computed_in_float32():
    theta = rand(2, 5, 6, seed=4)
    for dt in (torch.float16, torch.bfloat16):
        v = dtw_value(theta.to(dt))
        E = dtw_marginals(theta.to(dt))
        assert v.dtype == E.dtype == dt
        torch.testing.assert_close(v, dtw_value(theta.to(dt).float()).to(dt))
        torch.testing.assert_close(E, dtw_marginals(theta.to(dt).float()).to(dt))


# ---- autograd ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reg", REGS)
def test_gradcheck_and_gradgradcheck(backend, reg):
    theta = rand(3, 4, 5, seed=17, scale=1.2).requires_grad_()
    lx, ly = torch.tensor([4, 2, 3]), torch.tensor([5, 5, 1])

    def f(t):
        return dtw_value(t, lx, ly, reg, 0.7, backend=backend)

    assert torch.autograd.gradcheck(f, (theta,))
    assert torch.autograd.gradgradcheck(f, (theta,))
    assert torch.autograd.gradcheck(lambda t: dtw_marginals(t, lx, ly, reg, 0.7, backend=backend), (theta,))


def test_hessian_product_carries_no_graph():
    # Third derivatives are not implemented: the backward of E (Alg. 6) is once-differentiable, so even with
    # create_graph=True the Hessian product comes back detached (documented in dtw_marginals), never wrong.
    theta = rand(1, 3, 3, seed=1).requires_grad_()
    E = dtw_marginals(theta)
    (h,) = torch.autograd.grad(E, theta, grad_outputs=torch.ones_like(E), create_graph=True)
    assert not h.requires_grad
    torch.testing.assert_close(h, dtw_hvp(theta.detach(), torch.ones_like(E))[1])


def test_modules_match_functions():
    theta = rand(2, 4, 6, seed=2)
    lx, ly = torch.tensor([4, 3]), torch.tensor([6, 2])
    m = SmoothedDTW("l2", 0.3)
    assert "l2" in repr(m) and "0.3" in repr(m)
    torch.testing.assert_close(m(theta, lx, ly), dtw_value(theta, lx, ly, "l2", 0.3))
    torch.testing.assert_close(DTWMarginals("entropy", 2.0)(theta), dtw_marginals(theta, gamma=2.0))


def test_registry_namespaces():
    assert kernels.names("dtw") == ("reference", "cpu", "triton")  # triton: tests/test_triton_dtw.py
    assert kernels.names()[:3] == ("reference", "cpu", "triton")  # Viterbi's, unchanged
    with pytest.raises(ValueError, match="op must be"):
        kernels.names("nope")


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_raises_clearly():
    theta = rand(2, 3, 4, seed=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        dtw_value(theta.numpy())
    with pytest.raises(ValueError, match="shape"):
        dtw_value(theta[0])
    with pytest.raises(ValueError, match="N >= 1"):
        dtw_value(theta[:, :0])
    with pytest.raises(TypeError, match="floating"):
        dtw_value(theta.long())
    bad = theta.clone()
    bad[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 2, 3\)"):
        dtw_marginals(bad)
    dtw_value(bad, lengths_y=torch.tensor([4, 3]))  # the same cell as padding is ignored
    with pytest.raises(ValueError, match=r"lengths_x must lie in \[1, 3\]"):
        dtw_value(theta, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"lengths_y must lie in \[1, 4\]"):
        dtw_value(theta, None, torch.tensor([5, 3]))
    with pytest.raises(TypeError, match="integer"):
        dtw_value(theta, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        dtw_value(theta, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="reg must be"):
        dtw_value(theta, reg="l1")
    with pytest.raises(ValueError, match="gamma"):
        dtw_value(theta, gamma=0.0)
    with pytest.raises(ValueError, match="gamma"):
        dtw_value(theta, gamma=-1.0)
    with pytest.raises(ValueError, match="backend must be"):
        dtw_value(theta, backend="gpu")
    with pytest.raises(ValueError, match="Z must"):
        dtw_hvp(theta, theta[:, :2])


def marginals_node(E):
    """The _DTWMarginalsFunction node behind an output of dtw_marginals (a transpose may come first)."""
    node = E.grad_fn
    while "DTWMarginals" not in type(node).__name__:
        node = node.next_functions[0][0]
    return node


def saved_sizes(node):
    return sorted(t.numel() for t in node.saved_tensors if t.is_floating_point() and t.dim() > 1)


def test_saved_state_is_linear_in_the_dp_size():
    """What the autograd nodes keep. The value's: θ and E (its forward runs both sweeps of Alg. 5 when θ needs a
    gradient), B·N·M each, for every backend. The marginals': θ, E and the backend's state for the Hessian product:
    the C kernel one value per cell plus two guards per diagonal, the reference 3 weights per diagonal slot; a tall
    θ is transposed first, so diagonals have min(N, M) slots."""
    B, N, M = 2, 40, 7
    theta = rand(B, N, M, seed=3).requires_grad_()
    for backend, per_pair in (("cpu", N * M + 2 * (N + M - 1) + 6), ("reference", 3 * (N + M - 1) * min(N, M))):
        v = dtw_value(theta, backend=backend)
        assert saved_sizes(v.grad_fn) == [B * N * M] * 2, backend
        E = dtw_marginals(theta, backend=backend)
        assert saved_sizes(marginals_node(E)) == sorted([B * N * M, B * N * M, B * per_pair]), backend
