"""Structured losses ℓ_Ω(θ; Y) = Vit_Ω(θ) − ⟨θ, Y⟩ + Ω_G(Y) (structattn.losses; ICML 2018 §4.1).

Oracles: enumeration of every path (the CRF likelihood and the hard max are their definitions), the marginals of
structattn.viterbi_marginals for the gradient E − Y, finite differences (gradcheck), and a hand-derived margin for
the ℓ2 loss of a one-step chain."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from structattn import viterbi_marginals
from structattn.losses import (
    ViterbiLoss,
    hard_viterbi,
    perspective_regularization,
    tags_to_path,
    viterbi_loss,
    viterbi_path_regularization,
)

REGS = ["entropy", "l2", None]


def _rand(seed, B=3, T=5, S=3, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(B, T, S, S, generator=g, dtype=torch.float64) * scale
    tags = torch.randint(0, S, (B, T), generator=g)
    return theta, tags


def _paths(L, S):
    """Every path (y_start, y_0, ..., y_{L−1}) of a chain with L steps."""
    return itertools.product(range(S), repeat=L + 1)


def _score(theta_b, path):
    return sum(theta_b[t, path[t + 1], path[t]] for t in range(len(path) - 1))


# ---- the path tensor -----------------------------------------------------------------------------------------


def test_tags_to_path_matches_loops():
    _, tags = _rand(0, B=3, T=6, S=4)
    lengths = torch.tensor([6, 3, 0])
    for start in ("uniform", 2, torch.tensor([0, 3, 1])):
        Y = tags_to_path(tags, 4, lengths, start=start, dtype=torch.float64)
        ref = torch.zeros(3, 6, 4, 4, dtype=torch.float64)
        for b in range(3):
            L = int(lengths[b])
            for t in range(1, L):
                ref[b, t, tags[b, t], tags[b, t - 1]] = 1
            if L:
                if start == "uniform":
                    ref[b, 0, tags[b, 0], :] = 0.25
                else:
                    k = start if isinstance(start, int) else int(start[b])
                    ref[b, 0, tags[b, 0], k] = 1
        assert torch.equal(Y, ref)


def test_tags_to_path_ignores_padded_tag_values():
    tags = torch.tensor([[1, 0, -100, -100]])
    Y = tags_to_path(tags, 2, torch.tensor([2]), dtype=torch.float64)
    assert Y[:, 2:].abs().sum() == 0 and Y.sum() == 2


# ---- values against enumeration --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_entropy_loss_is_crf_nll_by_enumeration(seed):
    """ℓ_{−γH} with a one-hot start: γ logΣ_paths exp(score/γ) − score(gold); with θ[:, 0] independent of the
    previous state and start='uniform': −γ log p(y_0..y_{L−1}) with the start state marginalised."""
    theta, tags = _rand(seed, B=2, T=4, S=3)
    gamma = 0.7
    loss_k = viterbi_loss(theta, tags, None, "entropy", gamma, start=1)
    theta_u = theta.clone()
    theta_u[:, 0] = theta[:, 0, :, :1]  # θ[:, 0, i, j] = θ[:, 0, i, 0] for every j
    loss_u = viterbi_loss(theta_u, tags, None, "entropy", gamma)
    for b in range(2):
        scores = {p: _score(theta[b], p) for p in _paths(4, 3)}
        lse = gamma * torch.logsumexp(torch.stack(list(scores.values())) / gamma, 0)
        gold = (1, *tags[b].tolist())
        assert torch.allclose(loss_k[b], lse - scores[gold], atol=1e-12, rtol=0)
        # p(y_0..y_{L−1}) = Σ_start p(start, y): enumerate the tag sequences, marginalising the start state.
        su = {p: _score(theta_u[b], p) for p in _paths(4, 3)}
        allv = torch.stack(list(su.values())) / gamma
        gold_v = torch.stack([su[(k, *tags[b].tolist())] for k in range(3)]) / gamma
        nll = -gamma * (torch.logsumexp(gold_v, 0) - torch.logsumexp(allv, 0))
        assert torch.allclose(loss_u[b], nll, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_perceptron_loss_by_enumeration(seed):
    theta, tags = _rand(seed, B=2, T=4, S=3)
    loss = viterbi_loss(theta, tags, None, None, start=2)
    value, best = hard_viterbi(theta)
    for b in range(2):
        scores = {p: float(_score(theta[b], p)) for p in _paths(4, 3)}
        top = max(scores.values())
        assert math.isclose(float(value[b]), top, abs_tol=1e-12)
        assert math.isclose(float(loss[b]), top - scores[(2, *tags[b].tolist())], abs_tol=1e-12)
        argmax = max(scores, key=lambda p: (scores[p], [-s for s in p]))  # lowest index on ties (none here)
        assert best[b].tolist() == list(argmax[1:])


# ---- non-negativity and when the loss is zero -------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
def test_loss_nonnegative_for_paths_and_mixtures(reg):
    for seed in range(10):
        theta, tags = _rand(seed, B=4, T=6, S=4, scale=3.0)
        lengths = torch.tensor([6, 4, 1, 0])
        for start in ("uniform", 0):
            assert (viterbi_loss(theta, tags, lengths, reg, 0.5, start=start) >= -1e-12).all()
        # a mixture of two paths is a flow in conv(Y): the bound still holds
        _, other = _rand(seed + 100, B=4, T=6, S=4)
        Y = 0.3 * tags_to_path(tags, 4, lengths, start=1, dtype=torch.float64) + 0.7 * tags_to_path(
            other, 4, lengths, start=3, dtype=torch.float64)
        assert (viterbi_loss(theta, Y, lengths, reg, 0.5) >= -1e-12).all()


def test_l2_loss_zero_iff_margin_one_step():
    """T = 1, S = 3, start k, θ[0, g, k] = c, every other entry 0. The gold node's sparsemax is one-hot iff c ≥ γ;
    then v_g = c − γ/2, the other nodes v_i = max_Ω(0_S) = −γ/(2S), and the end node is one-hot iff
    c − γ/2 + γ/(2S) ≥ γ. So ℓ_{ℓ2} = 0 iff c ≥ 3γ/2 − γ/(2S)."""
    S, gamma, g, k = 3, 0.8, 2, 1
    c_star = 1.5 * gamma - gamma / (2 * S)
    tags = torch.tensor([[g]])
    for c, zero in ((c_star + 1e-6, True), (c_star + 1.0, True), (c_star - 1e-3, False), (0.5 * gamma, False)):
        theta = torch.zeros(1, 1, S, S, dtype=torch.float64)
        theta[0, 0, g, k] = c
        loss = float(viterbi_loss(theta, tags, None, "l2", gamma, start=k))
        assert (abs(loss) < 1e-12) == zero, (c, loss)
        assert loss >= -1e-12


def test_l2_loss_zero_when_gold_path_wins_by_margin_and_entropy_never():
    _, tags = _rand(5, B=2, T=7, S=4)
    Y = tags_to_path(tags, 4, start=0, dtype=torch.float64)
    theta = 3.0 * Y  # the gold move beats every other by 3 ≥ the needed margins for γ = 1
    assert torch.allclose(viterbi_loss(theta, tags, None, "l2", 1.0, start=0), torch.zeros(2, dtype=torch.float64),
                          atol=1e-12, rtol=0)
    assert (viterbi_loss(theta, tags, None, "entropy", 1.0, start=0) > 1e-3).all()
    assert (viterbi_loss(theta, tags, None, None, start=0).abs() < 1e-12).all()
    # uniform start: zero too when θ[:, 0] ignores the previous state (§4.2's θ_1)
    theta_u = theta.clone()
    theta_u[:, 0] = 3.0 * (theta[:, 0].sum(-1, keepdim=True) > 0).to(theta.dtype)
    assert (viterbi_loss(theta_u, tags, None, "l2", 1.0).abs() < 1e-12).all()
    assert (viterbi_loss(0.2 * theta, tags, None, "l2", 1.0, start=0) > 1e-3).all()  # step 0: margin 0.6 < γ


def test_empty_chain_has_zero_loss():
    theta = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tags = torch.zeros(2, 3, dtype=torch.long)
    for reg in REGS:
        loss = viterbi_loss(theta, tags, torch.tensor([0, 2]), reg, 0.9)
        assert abs(float(loss[0])) < 1e-12


# ---- gradients ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_gradient_is_marginals_minus_target(reg):
    theta, tags = _rand(7, B=3, T=6, S=4)
    lengths = torch.tensor([6, 3, 1])
    th = theta.clone().requires_grad_()
    viterbi_loss(th, tags, lengths, reg, 0.6).sum().backward()
    E = viterbi_marginals(theta, lengths, reg, 0.6)
    Y = tags_to_path(tags, 4, lengths, dtype=torch.float64)
    assert torch.allclose(th.grad, E - Y, atol=1e-12, rtol=0)
    assert th.grad[1, 3:].abs().sum() == 0  # padding gets no gradient


def test_perceptron_gradient_is_argmax_path_minus_target():
    theta, tags = _rand(8, B=3, T=5, S=3)
    lengths = torch.tensor([5, 2, 4])
    th = theta.clone().requires_grad_()
    viterbi_loss(th, tags, lengths, None).sum().backward()
    _, best = hard_viterbi(theta, lengths)
    # the argmax start state: the one Y*'s step 0 uses, by enumeration
    Ystar = torch.zeros_like(theta)
    for b in range(3):
        L = int(lengths[b])
        scores = {p: float(_score(theta[b, :L], p)) for p in _paths(L, 3)}
        p = max(scores, key=lambda q: scores[q])
        assert list(p[1:]) == best[b, :L].tolist()
        Ystar[b, :L] = tags_to_path(torch.tensor([p[1:]]), 3, start=p[0], dtype=torch.float64)[0]
    Y = tags_to_path(tags, 3, lengths, dtype=torch.float64)
    assert torch.equal(th.grad, Ystar - Y)


@pytest.mark.parametrize("reg", REGS)
def test_gradcheck_float64(reg):
    theta, tags = _rand(9, B=2, T=4, S=3)
    lengths = torch.tensor([4, 2])
    th = theta.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: viterbi_loss(x, tags, lengths, reg, 0.8), (th,))


def test_gradgradcheck_entropy():
    theta, tags = _rand(10, B=2, T=3, S=3)
    th = theta.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: viterbi_loss(x, tags, None, "entropy", 0.8), (th,))


# ---- padding, module, backends ------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
def test_padded_batch_equals_per_sentence(reg):
    theta, tags = _rand(11, B=3, T=7, S=4)
    lengths = torch.tensor([7, 4, 2])
    th = theta.clone().requires_grad_()
    batch = viterbi_loss(th, tags, lengths, reg, 0.5)
    batch.sum().backward()
    for b in range(3):
        L = int(lengths[b])
        one = theta[b:b + 1, :L].clone().requires_grad_()
        single = viterbi_loss(one, tags[b:b + 1, :L], None, reg, 0.5)
        single.sum().backward()
        assert torch.allclose(batch[b], single[0], atol=1e-12, rtol=0)
        assert torch.allclose(th.grad[b, :L], one.grad[0], atol=1e-12, rtol=0)
        assert th.grad[b, L:].abs().sum() == 0


def test_path_tensor_target_equals_tags_target():
    theta, tags = _rand(12)
    for reg in REGS:
        Y = tags_to_path(tags, 3, dtype=torch.float64)
        assert torch.allclose(viterbi_loss(theta, Y, None, reg), viterbi_loss(theta, tags, None, reg), atol=1e-13)


def test_reference_backend_agrees():
    theta, tags = _rand(13, B=2, T=6, S=3)
    for reg in ("entropy", "l2"):
        a = viterbi_loss(theta, tags, None, reg, 0.9, backend="reference")
        b = viterbi_loss(theta, tags, None, reg, 0.9)
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_module_reductions_and_float32():
    theta, tags = _rand(14)
    per = viterbi_loss(theta, tags, None, "l2", 0.5)
    assert torch.allclose(ViterbiLoss("l2", 0.5)(theta, tags), per.mean())
    assert torch.allclose(ViterbiLoss("l2", 0.5, reduction="sum")(theta, tags), per.sum())
    assert torch.allclose(ViterbiLoss("l2", 0.5, reduction="none")(theta, tags), per)
    assert "reg='l2'" in repr(ViterbiLoss("l2", 0.5))
    f32 = viterbi_loss(theta.float(), tags, None, "l2", 0.5)
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), per, atol=1e-4)


def test_path_regularization_of_vertices():
    _, tags = _rand(15, B=2, T=5, S=3)
    lengths = torch.tensor([5, 3])
    Y = tags_to_path(tags, 3, lengths, start=0, dtype=torch.float64)
    assert torch.allclose(viterbi_path_regularization(Y, lengths, "l2", 0.4),
                          0.2 * (lengths + 1).double(), atol=1e-14)  # (L + 1)·γ/2
    assert viterbi_path_regularization(Y, lengths, "entropy", 0.4).abs().max() < 1e-14
    y = torch.tensor([[0.5, 0.25, 0.25, 0.0]], dtype=torch.float64)  # u = 1: Ω(y) itself
    assert torch.allclose(perspective_regularization(y, "entropy", 2.0), 2.0 * (y * y.clamp_min(1e-300).log()).sum())


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_errors():
    theta, tags = _rand(16, B=2, T=3, S=3)
    with pytest.raises(ValueError, match="reg must be one of"):
        viterbi_loss(theta, tags, reg="hinge")
    with pytest.raises(ValueError, match="gamma"):
        viterbi_loss(theta, tags, reg="l2", gamma=0.0)
    with pytest.raises(ValueError, match=r"tags on real steps must lie in \[0, 3\)"):
        viterbi_loss(theta, tags + 3)
    with pytest.raises(ValueError, match="integer tags must have shape"):
        viterbi_loss(theta, tags[:, :2])
    with pytest.raises(ValueError, match="theta's shape"):
        viterbi_loss(theta, theta[:, :2])
    with pytest.raises(TypeError, match="floating-point"):
        viterbi_loss(theta.long(), tags)
    with pytest.raises(ValueError, match=r"shape \(B, T, S, S\)"):
        viterbi_loss(theta[0], tags)
    with pytest.raises(ValueError, match="lengths must lie"):
        viterbi_loss(theta, tags, torch.tensor([4, 1]))
    with pytest.raises(TypeError, match="integer dtype"):
        viterbi_loss(theta, tags, torch.tensor([1.0, 2.0]))
    Y = tags_to_path(tags, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="sum to 1"):
        viterbi_loss(theta, 2 * Y)
    with pytest.raises(ValueError, match=">= 0"):
        viterbi_loss(theta, Y - 0.1)
    broken = Y.clone()
    broken[:, 1] = broken[:, 1].roll(1, dims=2)  # step 1 now leaves a state that step 0 did not reach
    with pytest.raises(ValueError, match="not a flow"):
        viterbi_loss(theta, broken)
    bad = theta.clone()
    bad[0, 1, 0, 0] = float("nan")
    for reg in REGS:
        with pytest.raises(ValueError, match="non-finite"):
            viterbi_loss(bad, tags, reg=reg)
    with pytest.raises(ValueError, match="start must be"):
        tags_to_path(tags, 3, start="first")
    with pytest.raises(ValueError, match=r"start states must lie in \[0, 3\)"):
        tags_to_path(tags, 3, start=3)
    with pytest.raises(ValueError, match="num_states"):
        tags_to_path(tags, 1)
    with pytest.raises(TypeError, match="integer dtype"):
        tags_to_path(tags.double(), 3)
    with pytest.raises(ValueError, match="reduction"):
        ViterbiLoss(reduction="avg")
