"""The structured loss for DTW_Ω, ℓ_Ω(θ; Y) = DTW_Ω(θ) − ⟨θ, Y⟩ + Ω_G(Y) (structattn.losses; ICML 2018 §4.1 on the DTW
DAG of §3.2).

Oracles: enumeration of every monotone alignment for tiny sizes (the Gibbs likelihood of −γH and the hard max are
their definitions, and every 0/1 matrix is enumerated to check which ones the validator accepts), a plain Python
recursion over the cells with max_Ω from App. B.1 (structattn.ops.reference) for the ℓ2 loss as a sum of local gaps,
structattn.dtw_marginals for the gradient E − Y, and finite differences (gradcheck)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from structattn import dtw_marginals
from structattn.losses import (
    DTWAreaLoss,
    DTWLoss,
    check_alignment,
    dtw_area_loss,
    dtw_loss,
    dtw_path_regularization,
    hard_dtw,
)
from structattn.ops.reference import max_omega_reference

REGS = ["entropy", "l2", None]


def _rand(seed, B=2, N=4, M=5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, M, generator=g, dtype=torch.float64) * scale


def alignments(n, m):
    """Every monotone alignment (0, 0) → (n−1, m−1) with →, ↘, ↓ moves, as 0/1 matrices (float64)."""
    out = []

    def walk(path):
        i, j = path[-1]
        if (i, j) == (n - 1, m - 1):
            A = torch.zeros(n, m, dtype=torch.float64)
            for c in path:
                A[c] = 1.0
            out.append(A)
            return
        for di, dj in ((0, 1), (1, 1), (1, 0)):
            if i + di < n and j + dj < m:
                walk(path + [(i + di, j + dj)])

    walk([(0, 0)])
    return out


def _path_of(A):
    """The cells of a 0/1 path matrix in path order (sorted by i + j: a monotone path visits each cell once)."""
    cells = [tuple(int(k) for k in c) for c in A.nonzero()]
    return sorted(cells, key=lambda c: (c[0] + c[1], c[0]))


# ---- the validator --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(1, 1), (1, 3), (3, 1), (2, 3), (3, 3), (3, 4), (4, 4)])
def test_validator_accepts_exactly_the_alignments(n, m):
    """Every 0/1 matrix of the size, in one batch: well formed iff it is one of the enumerated alignments (Delannoy
    many); the raising form agrees on a sample."""
    paths = {tuple(A.flatten().tolist()) for A in alignments(n, m)}
    bits = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n * m)), dtype=torch.float64).view(-1, n, m)
    ok = check_alignment(bits, return_mask=True)
    expected = torch.tensor([tuple(b.flatten().tolist()) in paths for b in bits])
    assert torch.equal(ok, expected)
    assert int(ok.sum()) == len(paths)
    g = torch.Generator().manual_seed(n * 10 + m)
    for k in torch.randint(len(bits), (20,), generator=g).tolist() + [int(ok.nonzero()[0])]:
        if bool(ok[k]):
            check_alignment(bits[k:k + 1])
        else:
            with pytest.raises(ValueError, match="not a monotone path"):
                check_alignment(bits[k:k + 1])


def test_validator_uses_lengths_and_ignores_padding():
    Y = torch.zeros(2, 4, 5)
    Y[0, [0, 1, 2, 3], [0, 1, 2, 4]] = 1  # not a path: (2, 2) → (3, 4) jumps a column
    with pytest.raises(ValueError, match="pair 0 is not a monotone path"):
        check_alignment(Y)
    Y[0, 3, 3] = 1  # now (2, 2) → (3, 3) → (3, 4)
    Y[1, [0, 1], [0, 1]] = 1
    Y[1, 3, 4] = 7.0  # junk in a padded cell of pair 1
    with pytest.raises(ValueError, match="pair 1"):
        check_alignment(Y)
    out = check_alignment(Y, torch.tensor([4, 2]), torch.tensor([5, 2]))
    assert out[1, 3, 4] == 0 and out.sum() == 5 + 2
    Y[1, 1, 1] = 0.5
    with pytest.raises(ValueError, match="not a 0/1 matrix"):
        check_alignment(Y, torch.tensor([4, 2]), torch.tensor([5, 2]))


# ---- the value against enumeration ------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,gamma", [(2, 3, 1.0), (3, 3, 0.5), (3, 4, 2.0), (4, 2, 1.0)])
def test_entropy_loss_is_the_alignment_nll_by_enumeration(n, m, gamma):
    theta = _rand(1, B=1, N=n, M=m, scale=2.0)
    paths = alignments(n, m)
    A = torch.stack(paths)
    scores = (A * theta[0]).sum((1, 2))
    logp = torch.log_softmax(scores / gamma, 0)
    losses = dtw_loss(theta.expand(len(paths), n, m), A, reg="entropy", gamma=gamma)
    torch.testing.assert_close(losses, -gamma * logp, rtol=0, atol=1e-12)
    assert bool((losses > 0).all())  # several alignments exist: none has probability 1
    torch.testing.assert_close(torch.exp(-losses / gamma).sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("n,m", [(2, 3), (3, 3), (4, 3)])
def test_hard_loss_and_argmax_by_enumeration(n, m):
    theta = _rand(2, B=1, N=n, M=m, scale=2.0)
    paths = alignments(n, m)
    A = torch.stack(paths)
    scores = (A * theta[0]).sum((1, 2))
    value, Ystar = hard_dtw(theta)
    torch.testing.assert_close(value[0], scores.max(), rtol=0, atol=1e-12)
    torch.testing.assert_close(Ystar[0], A[scores.argmax()])
    losses = dtw_loss(theta.expand(len(paths), n, m), A, reg=None)
    torch.testing.assert_close(losses, scores.max() - scores, rtol=0, atol=1e-12)


def _local_gaps(theta, paths, gamma):
    """ℓ2: the loss of each path as Σ over its cells of max_Ω(x_c) − x_c[pred] + γ/2, where x_c are the DP values of
    the existing parents of c (0 for the start node) from the plain recursion; each gap is ≥ 0, 0 iff the local
    sparsemax is one-hot on the gold predecessor."""
    n, m = theta.shape
    v, parents, smax = {}, {}, {}
    for i in range(n):
        for j in range(m):
            cells = [c for c in ((i, j - 1), (i - 1, j - 1), (i - 1, j)) if c in v]
            x = torch.stack([v[c] for c in cells]) if cells else theta.new_zeros(1)
            parents[i, j] = (cells, x)
            smax[i, j] = max_omega_reference(x, "l2", gamma)
            v[i, j] = theta[i, j] + smax[i, j]
    out = []
    for path in paths:
        gaps = []
        for k, c in enumerate(path):
            cells, x = parents[c]
            gold = x[0] if k == 0 else x[cells.index(path[k - 1])]
            gaps.append(smax[c] - gold + gamma / 2)
        out.append(torch.stack(gaps))
    return out


@pytest.mark.parametrize("n,m,gamma", [(3, 3, 1.0), (3, 4, 0.3), (4, 2, 2.0)])
def test_l2_loss_is_the_sum_of_local_gaps(n, m, gamma):
    theta = _rand(3, B=1, N=n, M=m, scale=1.5)
    A = torch.stack(alignments(n, m))
    gaps = _local_gaps(theta[0], [_path_of(a) for a in A], gamma)
    losses = dtw_loss(theta.expand(len(A), n, m), A, reg="l2", gamma=gamma)
    for loss, gap in zip(losses, gaps):
        assert bool((gap >= -1e-9).all())
        torch.testing.assert_close(loss, gap.sum(), rtol=0, atol=1e-7)  # bisection-projection accuracy
    assert bool((losses > 1e-3).any())  # not all zero: the identity is not checked on trivial values only


def test_zero_loss_conditions():
    n, m = 4, 5
    A = alignments(n, m)[7]
    # The gold path's cells score +3, the others −3: every gold predecessor's value beats the other parents by far
    # more than γ, so every local sparsemax is one-hot (ℓ2 loss 0) and the hard max is the gold path (loss 0).
    theta = (6 * A - 3)[None]
    assert float(dtw_loss(theta, A[None], reg="l2", gamma=1.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(dtw_loss(theta, A[None], reg=None)) == pytest.approx(0.0, abs=1e-12)
    assert float(dtw_loss(theta, A[None], reg="entropy", gamma=1.0)) > 1e-6  # −γH: dense, never 0 here
    # A larger γ (a margin of 6 < γ) breaks the ℓ2 equality: the loss becomes positive.
    assert float(dtw_loss(theta, A[None], reg="l2", gamma=20.0)) > 1e-6
    # With one alignment only (N = 1 or M = 1) every loss is 0 whatever θ.
    for shape in ((1, 1, 4), (1, 3, 1)):
        th = _rand(4, B=1, N=shape[1], M=shape[2])
        Y = torch.ones(shape, dtype=torch.float64)
        for reg in REGS:
            assert float(dtw_loss(th, Y, reg=reg, gamma=0.7)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("reg", REGS)
def test_loss_is_nonnegative_on_every_alignment(reg):
    theta = _rand(5, B=1, N=4, M=4, scale=3.0)
    A = torch.stack(alignments(4, 4))
    for gamma in (0.1, 1.0, 10.0):
        losses = dtw_loss(theta.expand(len(A), 4, 4), A, reg=reg, gamma=gamma)
        assert bool((losses >= -1e-12).all()), losses.min()


def test_path_regularization_counts_cells():
    A = torch.stack(alignments(3, 4))
    sizes = A.flatten(1).sum(1)
    torch.testing.assert_close(dtw_path_regularization(A, reg="l2", gamma=0.4), 0.2 * sizes)
    assert bool((dtw_path_regularization(A, reg="entropy", gamma=0.4) == 0).all())
    assert bool((dtw_path_regularization(A, reg=None) == 0).all())


# ---- gradients -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", ["entropy", "l2"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradient_is_marginals_minus_target(reg, backend):
    theta = _rand(6, B=3, N=5, M=4).requires_grad_()
    _, Y = hard_dtw(_rand(7, B=3, N=5, M=4))
    dtw_loss(theta, Y, reg=reg, gamma=0.5, backend=backend).sum().backward()
    torch.testing.assert_close(theta.grad, dtw_marginals(theta.detach(), reg=reg, gamma=0.5) - Y, rtol=0, atol=1e-12)


def test_hard_gradient_is_argmax_minus_target():
    theta = _rand(8, B=3, N=5, M=4).requires_grad_()
    _, Y = hard_dtw(_rand(9, B=3, N=5, M=4))
    dtw_loss(theta, Y, reg=None).sum().backward()
    torch.testing.assert_close(theta.grad, hard_dtw(theta.detach())[1] - Y)


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_gradcheck_and_gradgradcheck_float64(reg):
    theta = _rand(10, B=2, N=3, M=4).requires_grad_()
    _, Y = hard_dtw(_rand(11, B=2, N=3, M=4))
    lx, ly = torch.tensor([3, 2]), torch.tensor([4, 3])
    Y = check_alignment(hard_dtw(_rand(11, B=2, N=3, M=4), lx, ly)[1], lx, ly)

    def f(t):
        return dtw_loss(t, Y, lx, ly, reg=reg, gamma=0.7)

    assert torch.autograd.gradcheck(f, (theta,))
    assert torch.autograd.gradgradcheck(f, (theta,))


# ---- padding, modules, dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
def test_padded_batch_equals_unpadded(reg):
    B, N, M = 4, 6, 5
    lx, ly = torch.tensor([6, 2, 4, 1]), torch.tensor([5, 5, 1, 3])
    theta = _rand(12, B=B, N=N, M=M, scale=2.0)
    targets = [hard_dtw(_rand(13 + b, B=1, N=int(lx[b]), M=int(ly[b])))[1][0] for b in range(B)]
    Y = torch.full((B, N, M), 5.0, dtype=torch.float64)  # junk in padded cells
    padded = theta.clone()
    for b in range(B):
        Y[b, :lx[b], :ly[b]] = 0.0
        Y[b, :lx[b], :ly[b]] = targets[b]
        padded[b, lx[b]:] = float("nan")
        padded[b, :, ly[b]:] = float("nan")
    padded.requires_grad_()
    loss = dtw_loss(padded, Y, lx, ly, reg=reg, gamma=0.5)
    loss.sum().backward()
    for b in range(B):
        t = theta[b:b + 1, :lx[b], :ly[b]].clone().requires_grad_()
        ref = dtw_loss(t, targets[b][None], reg=reg, gamma=0.5)
        ref.backward()
        torch.testing.assert_close(loss[b], ref[0], rtol=0, atol=1e-12)
        g = padded.grad[b]
        torch.testing.assert_close(g[:lx[b], :ly[b]], t.grad[0], rtol=0, atol=1e-12)
        assert float(g.abs().sum() - g[:lx[b], :ly[b]].abs().sum()) == 0.0  # padded cells get exactly 0


def test_module_reductions_and_float32():
    theta = _rand(20, B=3, N=5, M=6)
    _, Y = hard_dtw(_rand(21, B=3, N=5, M=6))
    for reg in REGS:
        ref = dtw_loss(theta, Y, reg=reg, gamma=0.5)
        torch.testing.assert_close(DTWLoss(reg, 0.5, "none")(theta, Y), ref)
        torch.testing.assert_close(DTWLoss(reg, 0.5, "sum")(theta, Y), ref.sum())
        torch.testing.assert_close(DTWLoss(reg, 0.5)(theta, Y), ref.mean())
        f32 = dtw_loss(theta.float(), Y.float(), reg=reg, gamma=0.5)
        assert f32.dtype == torch.float32
        torch.testing.assert_close(f32.double(), ref, rtol=1e-4, atol=1e-4)
        half = dtw_loss(theta.half(), Y, reg=reg, gamma=0.5)  # computed in float32, returned in half
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.double(), ref, rtol=1e-2, atol=2e-2)
    assert "reg='l2'" in repr(DTWLoss("l2"))


def test_hard_dtw_is_the_small_gamma_limit():
    theta = _rand(22, B=2, N=7, M=9, scale=2.0)
    value, Ystar = hard_dtw(theta)
    for reg in ("entropy", "l2"):
        E = dtw_marginals(theta, reg=reg, gamma=1e-3)
        torch.testing.assert_close(E, Ystar, rtol=0, atol=1e-6)
    # and the loss of the argmax alignment is 0 for the perceptron
    assert bool((dtw_loss(theta, Ystar, reg=None).abs() < 1e-12).all())
    assert math.isfinite(float(value.sum()))


# ---- §4.3's relaxed loss Δ(Y_true, ∇DTW_Ω(θ)) = ‖L(E − Y_true)ᵀ‖²_F ------------------------------------------------------


def test_area_loss_is_the_area_between_paths():
    """With θ that makes E exactly a 0/1 path A (ℓ2, every gold predecessor ahead by ≫ γ), Δ(Y, A) is the area
    between the paths, Σ_i |j_i(A) − j_i(Y)|, for paths with one column per row (↓ and ↘ moves only)."""
    n, m = 5, 3
    paths = [A for A in alignments(n, m) if bool((A.sum(1) == 1).all())]
    assert len(paths) >= 5
    for A in paths:
        theta = (60 * A - 30)[None]
        assert bool((dtw_marginals(theta, reg="l2", gamma=1.0)[0] == A).all())
        for Y in paths:
            area = float((A.argmax(1) - Y.argmax(1)).abs().sum())
            assert float(dtw_area_loss(theta, Y[None], reg="l2", gamma=1.0)) == area


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_area_loss_matches_the_matrix_formula_padded(reg):
    B, N, M = 3, 6, 5
    lx, ly = torch.tensor([6, 3, 4]), torch.tensor([5, 5, 2])
    theta = _rand(40, B=B, N=N, M=M)
    Y = hard_dtw(_rand(41, B=B, N=N, M=M), lx, ly)[1]
    padded = theta.clone()
    for b in range(B):
        padded[b, lx[b]:] = float("nan")
        padded[b, :, ly[b]:] = float("nan")
    padded.requires_grad_()
    loss = dtw_area_loss(padded, Y, lx, ly, reg=reg, gamma=0.5)
    loss.sum().backward()
    for b in range(B):
        n, m = int(lx[b]), int(ly[b])
        t = theta[b:b + 1, :n, :m].clone().requires_grad_()
        E = dtw_marginals(t, reg=reg, gamma=0.5)[0]
        L = torch.tril(torch.ones(m, m, dtype=torch.float64))
        ref = ((L @ (E - Y[b, :n, :m]).T) ** 2).sum()  # the paper's ‖L(Y − Y_true)ᵀ‖²_F, literally
        ref.backward()
        torch.testing.assert_close(loss[b], ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(padded.grad[b, :n, :m], t.grad[0], rtol=0, atol=1e-12)
        assert float(padded.grad[b].abs().sum() - padded.grad[b, :n, :m].abs().sum()) == 0.0
    torch.testing.assert_close(DTWAreaLoss(reg, 0.5, "none")(theta, Y, lx, ly), loss.detach())


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_area_loss_gradcheck(reg):
    theta = _rand(42, B=2, N=3, M=4).requires_grad_()
    Y = hard_dtw(_rand(43, B=2, N=3, M=4))[1]
    assert torch.autograd.gradcheck(lambda t: dtw_area_loss(t, Y, reg=reg, gamma=0.7), (theta,))


# ---- errors ------------------------------------------------------------------------------------------------------


def test_errors():
    theta = _rand(30, B=2, N=3, M=4)
    _, Y = hard_dtw(theta)
    with pytest.raises(ValueError, match="reg must be one of"):
        dtw_loss(theta, Y, reg="hinge")
    with pytest.raises(ValueError, match="gamma"):
        dtw_loss(theta, Y, reg="l2", gamma=-1.0)
    with pytest.raises(ValueError, match="theta's shape"):
        dtw_loss(theta, Y[:, :2])
    with pytest.raises(ValueError, match=r"shape \(B, N, M\)"):
        dtw_loss(theta[0], Y[0])
    with pytest.raises(TypeError, match="floating-point"):
        dtw_loss(theta.long(), Y)
    with pytest.raises(TypeError, match="torch.Tensor"):
        dtw_loss(theta, Y.tolist())
    with pytest.raises(ValueError, match="lengths_x must lie"):
        dtw_loss(theta, Y, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="lengths_y must lie"):
        dtw_loss(theta, Y, None, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer dtype"):
        dtw_loss(theta, Y, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="not a 0/1 matrix"):
        dtw_loss(theta, 0.5 * Y)
    broken = Y.clone()
    broken[:, 0, 0] = 0  # the path must start at (0, 0)
    with pytest.raises(ValueError, match="not a monotone path"):
        dtw_loss(theta, broken)
    backwards = torch.zeros_like(Y)
    backwards[:, 0, 0] = backwards[:, 1, 0] = backwards[:, 0, 1] = backwards[:, 2, 3] = 1  # a fork, not a path
    with pytest.raises(ValueError, match="not a monotone path"):
        dtw_loss(theta, backwards)
    bad = theta.clone()
    bad[1, 2, 3] = float("inf")
    for reg in REGS:
        with pytest.raises(ValueError, match="non-finite"):
            dtw_loss(bad, Y, reg=reg)
    with pytest.raises(ValueError, match="reduction"):
        DTWLoss(reduction="avg")
    with pytest.raises(ValueError, match="needs E"):
        dtw_area_loss(theta, Y, reg=None)
    with pytest.raises(ValueError, match="not a monotone path"):
        dtw_area_loss(theta, broken)
    with pytest.raises(ValueError, match="theta's shape"):
        dtw_area_loss(theta, Y[:, :2])
