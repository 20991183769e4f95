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
    assert coupling_verdict(INDEPENDENT_KAPPA) == "weakly contiguous"
    assert coupling_verdict(-0.5) == "weakly alternating"
    assert coupling_verdict(1.0) == "contiguous" and coupling_verdict(-2.0) == "alternating"
    assert coupling_verdict(float("nan")) == "n/a"
    # the committed converged l2 model: entries up to 1.43γ, yet κ = 1.43 − 0.17 − 0.53 − 0.45 = 0.28
    assert coupling_verdict(chain_coupling(torch.tensor([[1.43, 0.53], [0.45, -0.17]]))) == "weakly contiguous"
    # the quickstart's l2 model, whose matrix was read as "rewards entering, penalises staying": κ = −0.05
    assert coupling_verdict(chain_coupling(torch.tensor([[1.40, 0.47], [0.40, -0.58]]))) == "independent positions"
    assert abs(float(chain_coupling(torch.tensor([[1.43, 0.53], [0.45, -0.17]]))) - 0.28) < 1e-6


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        chain_coupling(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="gamma"):
        chain_coupling(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="gamma"):
        chain_coupling(torch.zeros(2, 2), float("nan"))


# ---- the chain-off ablation (chain=False / --attention-chain off) --------------------------------------------------

from structattn import options  # noqa: E402
from structattn.attention import ViterbiAttention, ViterbiNormalizer, build_attention  # noqa: E402


@pytest.mark.parametrize("form", ["paper", "stable"])
@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_chain_off_is_independent_gates_on_the_same_scores(form, reg):
    torch.manual_seed(0)
    on = ViterbiAttention(6, 5, reg=reg, form=form).double()
    off = ViterbiAttention(6, 5, reg=reg, form=form, chain=False).double()
    off.load_state_dict(on.state_dict())  # same parameters, same names: only the projection differs
    with torch.no_grad():
        (on.transitions if form == "paper" else on.transitions_over_gamma).add_(
            torch.tensor([[0.7, -0.2], [0.4, 1.1]], dtype=torch.float64))
        off.load_state_dict(on.state_dict())
    assert float(chain_coupling(on.effective_transitions(), on.gamma)) != 0.0
    assert float(chain_coupling(off.effective_transitions(), off.gamma)) == pytest.approx(0.0, abs=1e-12)
    q, k = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 8, 5, dtype=torch.float64)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[1, 6:] = True
    mask[2, :2] = True
    _, w = off(q, k, mask)
    # independent gates: p_t = argmax_Ω(0, s̃_t + shift_t) with the shift of the projected T (f, g as in
    # test_kappa_zero_is_independent_positions), on the same (centred, in the stable form) scores
    t = off.effective_transitions()
    scores = torch.einsum("btd,bd->bt", k, off.proj(q))
    for b in range(3):
        real = ~mask[b]
        s = scores[b, real]
        if form == "stable":
            s = s - s.mean()
        f1, g1 = t[1, 0] - t[0, 0], t[0, 1] - t[0, 0]  # f(1) − f(0) and g(1) − g(0) of t = f(i) + g(j)
        shift = torch.full_like(s, float(f1 + g1))
        shift[-1] = float(f1)
        p = argmax_omega(torch.stack([torch.zeros_like(s), s + shift], -1), reg, off.gamma)[..., 1]
        if float(p.sum()) > 0:
            torch.testing.assert_close(w[b, real], p / p.sum(), rtol=0, atol=1e-10)
        assert torch.all(w[b, ~real] == 0)


def test_chain_off_keeps_kappa_zero_under_training():
    torch.manual_seed(1)
    m = ViterbiNormalizer(2, reg="l2", chain=False)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    target = torch.softmax(torch.randn(4, 2, 3, 7), -1)
    for _ in range(20):
        w = m(torch.randn(4, 2, 3, 7) * 5)
        loss = ((w - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    kappa = chain_coupling(m.effective_transitions(), m.gamma)
    assert torch.all(kappa.abs() < 1e-6)
    assert m.transitions_over_gamma.grad is not None and m.transitions_over_gamma.grad.abs().sum() > 0
    assert "chain=False" in repr(m)


def test_chain_option_in_options_and_factories():
    assert options.CHAIN_MODES == ("on", "off") and options.DEFAULT_CHAIN == "on"
    o = options.resolve_options("viterbi", "l2", chain="off")
    assert o.chain == "off"
    assert options.build_from_options(o, 3, 4).chain is False
    assert options.build_normalizer(o, 2).chain is False
    assert options.build_from_options(options.resolve_options("viterbi"), 3, 4).chain is True
    assert build_attention("viterbi", 3, 4, chain=False).chain is False
    with pytest.raises(ValueError, match="--attention-chain must be one of on, off"):
        options.resolve_options("viterbi", chain="maybe")
    with pytest.raises(TypeError, match="chain must be a bool"):
        ViterbiAttention(3, 4, chain="no")


def test_health_report_reads_kappa_not_the_entries():
    from structattn.evaluation.attention_health import transitions_report

    m = ViterbiAttention(4, 4, reg="l2", form="paper")
    with torch.no_grad():  # large entries, all along the shift directions: f(i) + g(j)
        m.transitions.copy_(torch.tensor([[0.0, 9.0], [-14.0, -5.0]]))
    r = transitions_report(m)
    assert r["kappa"] == 0.0 and r["independent_positions"] and r["coupling"] == "independent positions"
    with torch.no_grad():  # small entries, but coupled: κ = (1.5 + 1.5) / 10
        m.transitions.copy_(torch.tensor([[1.5, 0.0], [0.0, 1.5]]))
    r = transitions_report(m)
    assert r["kappa"] == pytest.approx(0.3) and not r["independent_positions"]
    assert r["coupling"] == "weakly contiguous" and r["chain"] is True
    off = ViterbiAttention(4, 4, reg="l2", chain=False)
    r = transitions_report(off)
    assert r["chain"] is False and r["kappa"] == pytest.approx(0.0, abs=1e-9) and r["independent_positions"]
