"""Reliability of the attention layers (structattn.attention) on odd inputs: extreme, peaked and flat scores, one-token
and 500/2000-token sources, all-padding rows, the ℓ2 fallback, lengths of other dtypes/devices, and hypothesis
properties (simplex over the real positions, padded == unpadded) over random shapes, padding, Ω and γ.

Operator-level edge cases (NaN/inf → ValueError, ±1e4 with T = 2000, S = 2..8, γ from 1e-3 to 1e3, bad lengths,
non-contiguous input) are in test_viterbi.py / test_properties.py and are not repeated here. The contract checked
below is written down in docs/reliability.md.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given  # examples per test: the profile in tests/conftest.py
from hypothesis import strategies as st

from structattn import viterbi_marginals
from structattn.attention import (
    build_attention,
    softmax_attention,
    sparsemax_attention,
    viterbi_attention,
)

KINDS = ["softmax", "sparsemax", "viterbi-entropy", "viterbi-l2"]
TRANS = torch.tensor([[0.3, -0.5], [-0.2, 0.4]])
# Sum-to-one tolerance of the weights over the real positions (docs/reliability.md).
SUM_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _weights(kind, scores, padding_mask, transitions=None, gamma=1.0, return_marginals=False):
    if kind == "softmax":
        return softmax_attention(scores, padding_mask)
    if kind == "sparsemax":
        return sparsemax_attention(scores, padding_mask)
    if transitions is None:
        transitions = TRANS.to(scores.dtype)
    return viterbi_attention(scores, transitions, padding_mask, kind.split("-")[1], gamma,
                             return_marginals=return_marginals)


def _assert_simplex(w, padding_mask, dtype):
    """Finite, ≥ 0, exactly 0 on padding, summing to 1 over the real positions (0 for a row without any)."""
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    real = ~padding_mask
    assert (w[padding_mask] == 0).all()
    has_real = real.any(-1)
    sums = w.sum(-1)
    err = (sums[has_real] - 1).abs().max().item() if has_real.any() else 0.0
    assert err <= SUM_TOL[dtype], f"weights sum to 1 ± {err:.2e}"
    assert (sums[~has_real] == 0).all()


# ---- extreme, peaked, flat scores --------------------------------------------------------------------------------

T7 = 7
SCORE_CASES = {
    "all +1e4": torch.full((T7,), 1e4),
    "all -1e4": torch.full((T7,), -1e4),
    "alternating ±1e4": torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0, 1e4, -1e4]),
    "ties at 1e4": torch.tensor([1e4, 1e4, -1e4, 1e4, 1e4, 1e4, 1e4]),
    "one peak 1e4": torch.tensor([0.0, 0.0, 0.0, 1e4, 0.0, 0.0, 0.0]),
    "one survivor": torch.tensor([-1e4, -1e4, -1e4, 0.0, -1e4, -1e4, -1e4]),
    "flat zeros": torch.zeros(T7),
    "flat 1e-30": torch.full((T7,), 1e-30),
    "ramp 1e-7": torch.arange(T7, dtype=torch.float64) * 1e-7,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(SCORE_CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_scores_give_a_distribution_and_finite_gradients(kind, case, dtype):
    s = SCORE_CASES[case].to(dtype)
    # row 0 alone, row 1 the same scores with its first two positions padded (left padding)
    scores = s[None].repeat(2, 1)
    pm = torch.zeros(2, T7, dtype=torch.bool)
    pm[1, :2] = True
    transitions = {"zero": torch.zeros(2, 2, dtype=dtype), "±1e4": torch.tensor([[1e4, -1e4], [-1e4, 1e4]], dtype=dtype)}
    for tname, trans in transitions.items() if kind.startswith("viterbi") else [("-", None)]:
        for gamma in (1e-3, 2.0, 1e3) if kind.startswith("viterbi") else (1.0,):
            x = scores.clone().requires_grad_(True)
            inputs = [x]
            if trans is not None:
                trans = trans.clone().requires_grad_(True)
                inputs.append(trans)
            w = _weights(kind, x, pm, trans, gamma)
            _assert_simplex(w.detach(), pm, dtype)
            grads = torch.autograd.grad((w * torch.linspace(-1, 1, T7, dtype=dtype)).sum(), inputs)
            for g in grads:
                assert torch.isfinite(g).all(), f"{tname}, γ={gamma}: non-finite gradient"
            assert (grads[0][pm] == 0).all(), "padding must not receive gradient"


@pytest.mark.parametrize("kind", ["softmax", "sparsemax"])
def test_softmax_and_sparsemax_are_shift_invariant_up_to_the_float_maximum(kind):
    """sparsemax used to lose τ's digits at |s| ≈ 1e4 in float32 (weights summing to 1 ± 2e-3) and to raise an
    IndexError near the float maximum; both layers now only see score differences."""
    base = torch.tensor([[0.5, -1.0, 0.25, 2.0, 1.5]])
    ref = _weights(kind, base.double(), None)
    for shift in (1e4, -1e4, 1e30, 3e38):
        w = _weights(kind, (base + shift).float() if abs(shift) < 1e38 else torch.full_like(base, shift), None)
        _assert_simplex(w, torch.zeros_like(w, dtype=torch.bool), torch.float32)
        if abs(shift) <= 1e4:
            torch.testing.assert_close(w.double(), ref, rtol=0, atol=2e-3 if shift else 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_one_token_source_has_weight_one_and_a_gradient(kind):
    for s in (torch.tensor([[3.0]]), torch.tensor([[-1e4]]), torch.tensor([[1e4]])):
        s = s.requires_grad_(True)
        w = _weights(kind, s, None)
        assert w.item() == 1.0
        (g,) = torch.autograd.grad(w.sum(), s)  # must not fail for lack of a graph (sparsemax did)
        assert abs(g.item()) <= 1e-6  # w ≡ 1: zero up to the rounding of p / Σp
    # the same one real token inside a padded row, left and right padding
    s = torch.tensor([[9.0, 2.0, -4.0], [5.0, 7.0, 1.0]], requires_grad=True)
    pm = torch.tensor([[True, False, True], [False, True, True]])
    w = _weights(kind, s, pm)
    assert torch.equal(w, (~pm).float())
    (g,) = torch.autograd.grad((w * torch.randn(2, 3)).sum(), s)
    assert torch.isfinite(g).all() and g.abs().max() <= 1e-6 and (g[pm] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_all_padding_rows_in_a_batch_with_extreme_scores(kind):
    s = torch.tensor([[1e4, -1e4, 0.0], [float("nan"), float("inf"), -float("inf")], [0.0, 0.0, 0.0]])
    pm = torch.tensor([[False, False, False], [True, True, True], [True, True, True]])
    x = s.clone().requires_grad_(True)
    w = _weights(kind, x, pm)
    _assert_simplex(w.detach(), pm, torch.float32)
    (g,) = torch.autograd.grad((w * torch.randn(3, 3)).sum(), x)
    assert torch.isfinite(g).all() and (g[1:] == 0).all()


@pytest.mark.parametrize("gamma", [1e-3, 1.0, 10.0])
def test_l2_all_zero_marginals_fallback_in_modules(gamma):
    """Documented fallback: p(y_t = 1) = 0 for every real t → weights = softmax(s) over the real positions. The
    module is driven into it through its own parameters (a transition matrix that forbids attending)."""
    torch.manual_seed(0)
    att = build_attention("viterbi", 8, 6, "l2", gamma, "paper")  # raw T and raw scores: the chain sees T as set
    with torch.no_grad():
        att.transitions.copy_(torch.tensor([[0.0, 0.0], [-1e4, -1e4]]))  # entering or staying in y = 1 costs 1e4
    z = torch.randn(3, 8, requires_grad=True)
    keys = torch.randn(3, 5, 6, requires_grad=True)
    pm = torch.tensor([[False] * 5, [True, True, False, False, False], [True] * 4 + [False]])
    ctx, w = att(z, keys, pm)
    scores = torch.bmm(keys, att.proj(z).unsqueeze(2)).squeeze(2)
    _, p = viterbi_attention(scores, att.transitions, pm, "l2", gamma, return_marginals=True)
    assert (p == 0).all(), "test setup: the chain must be collapsed on y = 0"
    torch.testing.assert_close(w, softmax_attention(scores, pm))
    _assert_simplex(w.detach(), pm, torch.float32)
    grads = torch.autograd.grad(ctx.sum() + (w * torch.randn_like(w)).sum(), [z, keys, att.proj.weight])
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[2].abs().sum() > 0, "M must still get gradient in the fallback"


# ---- long sources through the modules -------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [500, 2000])
@pytest.mark.parametrize("kind", KINDS)
def test_long_sources_through_modules(kind, T):
    torch.manual_seed(T)
    name, reg = (kind.split("-") + ["entropy"])[:2]
    att = build_attention(name, 32, 48, reg)
    B = 4
    z = torch.rand(B, 32) * 2 - 1
    keys = (torch.rand(B, T, 48) * 2 - 1).requires_grad_(True)
    pm = torch.zeros(B, T, dtype=torch.bool)
    pm[1, : T // 2] = True  # left padded, half length
    pm[2, 1:] = True  # a one-token sentence among 2000-token ones
    pm[3, T - 3 :] = True  # right padded
    ctx, w = att(z, keys, pm)
    _assert_simplex(w.detach(), pm, torch.float32)
    torch.testing.assert_close(ctx, torch.einsum("bt,btd->bd", w, keys))
    params = [p for p in att.parameters()]
    grads = torch.autograd.grad(ctx.square().sum() + (w * torch.randn_like(w)).sum(), [keys, *params])
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][pm] == 0).all()
    for b in (1, 3):  # padded rows equal the sentence run alone
        real = ~pm[b]
        ctx1, w1 = att(z[b : b + 1], keys[b : b + 1, real])
        # atol 1e-6: both float32 runs are ~3e-7 from float64 here (the stable form's centring sums a padded row
        # in another order than the compacted one), far below the weights' 1/T ≈ 5e-4
        torch.testing.assert_close(w[b, real], w1[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ctx[b], ctx1[0], rtol=1e-5, atol=1e-6)


def test_long_source_viterbi_matches_float64():
    """2000 steps of the Viterbi chain in float32 agree with float64 (no drift along the chain)."""
    torch.manual_seed(1)
    s = torch.randn(2, 2000, dtype=torch.float64) * 3
    for reg in ("entropy", "l2"):
        w64 = viterbi_attention(s, TRANS.double(), None, reg, 1.0)
        w32 = viterbi_attention(s.float(), TRANS, None, reg, 1.0)
        torch.testing.assert_close(w32.double(), w64, rtol=0, atol=1e-5)


# ---- lengths of other integer dtypes / devices -------------------------------------------------------------------------


def test_lengths_of_any_integer_dtype_give_the_same_result():
    torch.manual_seed(2)
    theta = torch.randn(3, 6, 2, 2)
    ref = viterbi_marginals(theta, torch.tensor([6, 2, 0]), "l2", 1.0)
    for lengths in (torch.tensor([6, 2, 0], dtype=torch.int16), torch.tensor([6, 2, 0], dtype=torch.uint8),
                    torch.tensor([6, 2, 0], dtype=torch.int32), [6, 2, 0], (6, 2, 0)):
        assert torch.equal(viterbi_marginals(theta, lengths, "l2", 1.0), ref)
    with pytest.raises(TypeError, match="integer dtype"):
        viterbi_marginals(theta, torch.tensor([True, False, True]))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_lengths_and_masks_on_the_other_device(kind):
    torch.manual_seed(3)
    theta = torch.randn(3, 6, 2, 2)
    lengths = torch.tensor([6, 2, 0])
    ref = viterbi_marginals(theta, lengths, "entropy", 1.0)
    torch.testing.assert_close(viterbi_marginals(theta.cuda(), lengths, "entropy", 1.0).cpu(), ref)
    torch.testing.assert_close(viterbi_marginals(theta, lengths.cuda(), "entropy", 1.0), ref)
    s = torch.randn(2, 5)
    pm = torch.tensor([[False] * 5, [True, True, False, False, False]])
    w = _weights(kind, s.cuda(), pm.cuda(), TRANS.cuda() if kind.startswith("viterbi") else None)
    torch.testing.assert_close(w.cpu(), _weights(kind, s, pm), rtol=1e-5, atol=1e-6)


# ---- hypothesis: the attention modules ------------------------------------------------------------------------------


@st.composite
def attention_problems(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(KINDS))
    gamma = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3]))
    scale = draw(st.sampled_from([1e-6, 0.1, 1.0, 10.0, 1e4]))
    layout = draw(st.sampled_from(["right", "left", "holes", "none"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    trans = torch.randn(2, 2, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.0, 1.0, 10.0]))
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    rows = []
    for L in lengths.tolist():
        if layout in ("right", "none"):
            real = torch.arange(T) < (T if layout == "none" else L)
        elif layout == "left":
            real = torch.arange(T) >= T - L
        else:
            real = torch.zeros(T, dtype=torch.bool)
            real[torch.randperm(T, generator=g)[:L]] = True
        rows.append(~real)
    return kind, scores, torch.stack(rows), trans, gamma


@given(attention_problems())
def test_weights_in_simplex_over_real_positions(problem):
    kind, scores, pm, trans, gamma = problem
    w = _weights(kind, scores, pm, trans, gamma)
    _assert_simplex(w, pm, torch.float64)


@given(attention_problems())
def test_padded_equals_unpadded(problem):
    kind, scores, pm, trans, gamma = problem
    # garbage on padding must not matter
    scores = torch.where(pm, torch.full_like(scores, float("nan")), scores)
    w = _weights(kind, scores, pm, trans, gamma)
    for b in range(scores.shape[0]):
        real = ~pm[b]
        if not real.any():
            assert (w[b] == 0).all()
            continue
        alone = _weights(kind, scores[b, real][None], None, trans, gamma)[0]
        torch.testing.assert_close(w[b, real], alone, rtol=1e-9, atol=1e-12)


@given(attention_problems(), st.integers(1, 5))
def test_module_context_and_gradients_finite_and_padding_independent(problem, d):
    kind, scores, pm, _trans, gamma = problem
    name, reg = (kind.split("-") + ["entropy"])[:2]
    B, T = scores.shape
    g = torch.Generator().manual_seed(int(scores.abs().sum().item() * 1e3) % 2**31)
    att = build_attention(name, 3, d, reg, gamma if name == "viterbi" else None).double()
    z = torch.randn(B, 3, generator=g, dtype=torch.float64)
    keys = torch.randn(B, T, d, generator=g, dtype=torch.float64).requires_grad_(True)
    ctx, w = att(z, keys, pm)
    _assert_simplex(w.detach(), pm, torch.float64)
    torch.testing.assert_close(ctx, torch.einsum("bt,btd->bd", w, keys))
    grads = torch.autograd.grad(ctx.sum() + (w * torch.randn(B, T, generator=g, dtype=w.dtype)).sum(),
                                [keys, *att.parameters()])
    assert all(torch.isfinite(x).all() for x in grads)
    assert (grads[0][pm] == 0).all()
