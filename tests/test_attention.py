"""Tests of structattn.attention: softmax / sparsemax / smoothed-Viterbi segmentation attention (ICML 2018 §5).

References the tests trust: torch.softmax on the unpadded row; the bisection simplex projection of
structattn.ops.reference for sparsemax; enumeration of all 2^(T+1) segmentations for the entropy Viterbi attention
and autograd through the literal Alg. 3 recursion (viterbi_value_reference) for ℓ2. The Viterbi references and
gradcheck run on both paths of the normaliser (``path``): the fused C kernel (CPU default) and the unfused tensor
code (what CUDA and machines without a C compiler run; here with the reference backend's chains).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

from structattn.attention import (
    PAPER_GAMMA,
    VITERBI_FORMS,
    SoftmaxAttention,
    SparsemaxAttention,
    ViterbiAttention,
    ViterbiNormalizer,
    build_attention,
    centre_scores,
    segmentation_potentials,
    softmax_attention,
    sparsemax_attention,
    viterbi_attention,
)
from structattn.ops import segmentation as SEG
from structattn.ops.kernels import cpu as C
from structattn.ops.reference import _project_simplex_bisection, viterbi_value_reference
from structattn.ops.viterbi import viterbi_backend
from viterbi_backends import NO_COMPILER

KINDS = ["softmax", "sparsemax", "viterbi-entropy", "viterbi-l2"]
PATHS = [pytest.param("fused", marks=pytest.mark.skipif(C._compiler() is None, reason=NO_COMPILER)), "unfused"]


@contextlib.contextmanager
def _on_path(path):
    """Run the block on the normaliser's fused or unfused path (checked, not assumed)."""
    with contextlib.nullcontext() if path == "fused" else viterbi_backend("reference"):
        assert SEG.fused_path_available(torch.zeros(1, 2, dtype=torch.float64)) == (path == "fused")
        yield


def _weights(kind, scores, padding_mask, transitions=None, gamma=1.0):
    if kind == "softmax":
        return softmax_attention(scores, padding_mask)
    if kind == "sparsemax":
        return sparsemax_attention(scores, padding_mask)
    reg = kind.split("-")[1]
    if transitions is None:
        transitions = torch.tensor([[0.3, -0.5], [-0.2, 0.4]], dtype=scores.dtype)
    return viterbi_attention(scores, transitions, padding_mask, reg, gamma)


def _mask(lengths, T, layout):
    """(B, T) padding mask, True on padding; layout 'right', 'left' or 'holes' (real positions scattered)."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for L in lengths:
        if layout == "right":
            real = torch.arange(T) < L
        elif layout == "left":
            real = torch.arange(T) >= T - L
        else:
            real = torch.zeros(T, dtype=torch.bool)
            real[torch.randperm(T, generator=g)[:L]] = True
        rows.append(~real)
    return torch.stack(rows)


# ---- references ------------------------------------------------------------------------------------------------


def _viterbi_entropy_bruteforce(s, trans, gamma):
    """p(y_t = 1) ∝ Σ_y exp(Σ_t θ[t, y_t, y_{t−1}]/γ) over all y ∈ {0,1}^{T+1} (y_0 free), normalised to w."""
    T = s.shape[0]
    theta = segmentation_potentials(s[None], trans)[0]
    logits, paths = [], []
    for y in itertools.product((0, 1), repeat=T + 1):
        logits.append(sum(theta[t - 1, y[t], y[t - 1]] for t in range(1, T + 1)) / gamma)
        paths.append(y)
    prob = torch.softmax(torch.stack(logits), 0)
    p = torch.zeros(T, dtype=s.dtype)
    for pr, y in zip(prob, paths):
        p += pr * torch.tensor(y[1:], dtype=s.dtype)
    return p / p.sum()


def _viterbi_marginal_reference(s, trans, reg, gamma):
    """p(y_t = 1) from E = ∇Vit_Ω(θ) by autograd through the literal recursion (Alg. 3)."""
    theta = segmentation_potentials(s[None].detach(), trans.detach()).requires_grad_(True)
    (E,) = torch.autograd.grad(viterbi_value_reference(theta, None, reg, gamma).sum(), theta)
    return E[0, :, 1, :].sum(-1)


# ---- padding: exact zeros, normalisation, independence of the padding ------------------------------------------------


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("kind", KINDS)
def test_padded_rows_equal_unpadded_rows(kind, layout):
    torch.manual_seed(0)
    lengths = [7, 3, 1, 5, 6]
    B, T = len(lengths), 7
    pm = _mask(lengths, T, layout)
    scores = torch.randn(B, T, dtype=torch.float64) * 2
    # Garbage on padding (huge, ±inf, NaN) must not leak into the result.
    garbage = torch.tensor([1e30, float("inf"), float("-inf"), float("nan")], dtype=torch.float64)
    scores = torch.where(pm, garbage[torch.arange(B * T) % 4].view(B, T), scores)
    w = _weights(kind, scores, pm)
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    assert (w[pm] == 0).all(), "padding must get exactly zero weight"
    torch.testing.assert_close(w.sum(-1), torch.ones(B, dtype=w.dtype))
    for b in range(B):
        real = ~pm[b]
        alone = _weights(kind, scores[b, real][None], None)[0]
        torch.testing.assert_close(w[b, real], alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_row_without_real_position_is_zero_and_finite(kind):
    scores = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    pm = torch.tensor([[False, False, True, True], [True, True, True, True]])
    w = _weights(kind, scores, pm)
    assert (w[1] == 0).all()
    torch.testing.assert_close(w[0].sum(), torch.tensor(1.0, dtype=w.dtype))
    (g,) = torch.autograd.grad((w * torch.randn_like(w)).sum(), scores)
    assert torch.isfinite(g).all() and (g[1] == 0).all()


# ---- against references --------------------------------------------------------------------------------------------


def test_softmax_matches_torch_softmax():
    torch.manual_seed(1)
    s = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(softmax_attention(s), torch.softmax(s, -1))


def test_sparsemax_matches_bisection_projection():
    torch.manual_seed(2)
    s = torch.randn(6, 9, dtype=torch.float64) * 1.5
    w = sparsemax_attention(s)
    ref = torch.stack([_project_simplex_bisection(row) for row in s])
    torch.testing.assert_close(w, ref)
    assert (w == 0).any(), "test scores should give a sparse result"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_viterbi_entropy_matches_enumeration(gamma, path):
    torch.manual_seed(3)
    trans = torch.randn(2, 2, dtype=torch.float64)
    for T in (1, 2, 5, 7):
        s = torch.randn(T, dtype=torch.float64) * 2
        with _on_path(path):
            w = viterbi_attention(s[None], trans, None, "entropy", gamma)[0]
        torch.testing.assert_close(w, _viterbi_entropy_bruteforce(s, trans, gamma))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_viterbi_marginals_match_reference_recursion(reg, path):
    torch.manual_seed(4)
    trans = torch.randn(2, 2, dtype=torch.float64)
    s = torch.randn(3, 8, dtype=torch.float64) * 2
    with _on_path(path):
        w, p = viterbi_attention(s, trans, None, reg, 1.0, return_marginals=True)
    for b in range(3):
        ref = _viterbi_marginal_reference(s[b], trans, reg, 1.0)
        torch.testing.assert_close(p[b], ref)
        torch.testing.assert_close(w[b], ref / ref.sum())


def test_viterbi_l2_is_sparse_and_entropy_is_dense():
    torch.manual_seed(5)
    s = torch.randn(4, 10, dtype=torch.float64) * 3
    trans = torch.zeros(2, 2, dtype=torch.float64)
    assert (viterbi_attention(s, trans, None, "entropy", 1.0) > 0).all()
    assert (viterbi_attention(s, trans, None, "l2", 1.0) == 0).any()


def test_batched_transitions_equal_shared_transitions():
    torch.manual_seed(6)
    s = torch.randn(3, 5, dtype=torch.float64)
    trans = torch.randn(2, 2, dtype=torch.float64)
    torch.testing.assert_close(
        viterbi_attention(s, trans.expand(3, 2, 2)), viterbi_attention(s, trans)
    )


# ---- the degenerate ℓ2 case: every p(y_t = 1) = 0 ------------------------------------------------------------------


def test_l2_all_zero_marginals_fall_back_to_softmax_with_finite_gradients():
    # Scores far below −γ and no transition bonus: the ℓ2-smoothed Viterbi puts all mass on y = 0…0.
    s = (torch.randn(3, 6, dtype=torch.float64) - 40.0).requires_grad_(True)
    trans = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    pm = _mask([6, 4, 2], 6, "left")
    w, p = viterbi_attention(s, trans, pm, "l2", 1.0, return_marginals=True)
    assert (p == 0).all(), "test setup: the chain should be all-zero"
    torch.testing.assert_close(w, softmax_attention(s.detach(), pm))
    assert (w[pm] == 0).all()
    gs, gt = torch.autograd.grad((w * torch.randn_like(w)).sum(), (s, trans))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert gs.abs().sum() > 0, "the fallback must still pass gradient to the scores"


def test_mixed_batch_only_degenerate_rows_fall_back():
    s = torch.tensor([[-40.0, -41.0, -39.0], [3.0, -2.0, 1.0]], dtype=torch.float64)
    trans = torch.zeros(2, 2, dtype=torch.float64)
    w, p = viterbi_attention(s, trans, None, "l2", 1.0, return_marginals=True)
    assert (p[0] == 0).all() and p[1].sum() > 0
    torch.testing.assert_close(w[0], torch.softmax(s[0], -1))
    torch.testing.assert_close(w[1], p[1] / p[1].sum())


# ---- gradients -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reg", ["entropy", "l2"])
@pytest.mark.parametrize("layout", ["right", "left"])
def test_viterbi_attention_gradcheck(reg, layout, path):
    torch.manual_seed(8)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    trans = (0.5 * torch.randn(2, 2, dtype=torch.float64)).requires_grad_(True)
    pm = _mask([5, 3, 4], 5, layout)
    fn = lambda s_, t_: viterbi_attention(s_, t_, pm, reg, 1.5)  # noqa: E731
    with _on_path(path):
        if reg == "l2":
            _, p = viterbi_attention(s, trans, pm, reg, 1.5, return_marginals=True)
            assert ((p > 1e-3) & (p < 1 - 1e-3)).any(), "test point must not be fully collapsed"
        assert torch.autograd.gradcheck(fn, (s, trans), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sparsemax"])
def test_softmax_sparsemax_gradcheck_with_padding(kind):
    torch.manual_seed(9)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    pm = _mask([5, 2, 4], 5, "left")
    assert torch.autograd.gradcheck(lambda x: _weights(kind, x, pm), (s,), eps=1e-6, atol=1e-6)


# ---- modules ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "sparsemax", "viterbi"])
def test_module_context_is_weighted_sum_and_padding_independent(kind):
    torch.manual_seed(10)
    att = build_attention(kind, 6, 4).double()
    z = torch.randn(3, 6, dtype=torch.float64)
    keys = torch.randn(3, 5, 4, dtype=torch.float64)
    pm = _mask([5, 2, 3], 5, "left")
    ctx, w = att(z, keys, pm)
    torch.testing.assert_close(ctx, torch.einsum("bt,btd->bd", w, keys))
    for b in range(3):
        real = ~pm[b]
        ctx1, w1 = att(z[b : b + 1], keys[b : b + 1, real])
        torch.testing.assert_close(ctx[b], ctx1[0])
        torch.testing.assert_close(w[b, real], w1[0])


@pytest.mark.parametrize("form", VITERBI_FORMS)
@pytest.mark.parametrize("reg", ["entropy", "l2"])
@pytest.mark.parametrize("gamma", [None, 0.1, 10.0])
def test_viterbi_init_is_not_collapsed(reg, gamma, form):
    """At initialisation, for states in [−1, 1] (LSTM outputs), the marginals must be interior (ℓ2 not collapsed
    to hard Viterbi, whose derivative is zero) and M must receive gradient, whatever γ, in both forms."""
    torch.manual_seed(11)
    d_z, d_x, T = 64, 128, 12
    att = ViterbiAttention(d_z, d_x, reg, gamma, form)
    assert att.gamma == (PAPER_GAMMA[reg] if gamma is None else gamma)
    z = torch.rand(8, d_z) * 2 - 1
    keys = torch.rand(8, T, d_x) * 2 - 1
    scores = torch.bmm(keys, att.proj(z).unsqueeze(2)).squeeze(2)
    assert scores.std() <= att.gamma
    if form == "stable":
        scores = centre_scores(scores)
    _, p = viterbi_attention(scores, att.effective_transitions(), None, reg, att.gamma, return_marginals=True)
    assert ((p > 0.01) & (p < 0.99)).float().mean() > 0.9
    _, w = att(z, keys)
    (g,) = torch.autograd.grad((w * torch.randn_like(w)).sum(), att.proj.weight)
    assert g.abs().sum() > 0


def test_level_of_the_scores_matters_in_the_paper_form_only():
    """A common shift s → s + b of a row's scores: in the paper's model it changes how many positions are attended
    (with −H and T = 0 the positions are independent, p(y_t = 1) = sigmoid(s_t/γ): softmax-like for a low level,
    uniform for a high one; module docstring); the stable form centres the scores and so ignores it."""
    torch.manual_seed(5)
    s = torch.randn(4, 7, dtype=torch.float64) * 2
    pm = torch.zeros(4, 7, dtype=torch.bool)
    pm[1, :3] = True  # left padded
    pm[2, 5:] = True  # right padded
    zero = torch.zeros(2, 2, dtype=torch.float64)
    levels = {}
    for b in (-10.0, 0.0, 10.0):
        w = viterbi_attention(s + b, zero, pm, "entropy", 1.0)
        oracle = torch.sigmoid(s + b).masked_fill(pm, 0.0)
        torch.testing.assert_close(w, oracle / oracle.sum(-1, keepdim=True))  # w_t ∝ sigmoid(s_t + b)
        levels[b] = w
    torch.testing.assert_close(levels[-10.0], softmax_attention(s, pm), rtol=0, atol=1e-4)
    uniform = (~pm).double() / (~pm).sum(-1, keepdim=True)
    torch.testing.assert_close(levels[10.0], uniform, rtol=0, atol=5e-3)  # sigmoid(s + 10) ≥ 0.99 here
    assert (levels[0.0] - levels[-10.0]).abs().max() > 0.05 and (levels[0.0] - uniform).abs().max() > 0.05
    # the modules: paper form shift-dependent, stable form shift-invariant (centred over the real positions only,
    # so a shift of the padded entries' values must not matter either)
    for reg in ("entropy", "l2"):
        paper = ViterbiAttention(3, 7, reg, 1.0, "paper").double()
        stable = ViterbiAttention(3, 7, reg, 1.0, "stable").double()
        heads = ViterbiNormalizer(2, reg, 1.0, "stable").double()
        assert not torch.allclose(paper.normalize(s - 1.0, pm), paper.normalize(s + 1.0, pm))
        ref = stable.normalize(s, pm)
        ref4 = heads(torch.stack([s, 2 * s], 1).unsqueeze(2), pm[:, None, None])
        for b in (-10.0, 3.0, 10.0):
            shift = torch.full((4, 1), b, dtype=torch.float64) * torch.arange(1, 5).unsqueeze(1)  # per row
            shifted = torch.where(pm, s + 1e3, s + shift)
            torch.testing.assert_close(stable.normalize(shifted, pm), ref)
            torch.testing.assert_close(heads(torch.stack([shifted, 2 * shifted], 1).unsqueeze(2), pm[:, None, None]),
                                       ref4)


def test_modules_and_factory():
    assert isinstance(build_attention("softmax", 3, 4), SoftmaxAttention)
    assert isinstance(build_attention("sparsemax", 3, 4), SparsemaxAttention)
    v = build_attention("viterbi", 3, 4, "l2", 0.5)
    assert isinstance(v, ViterbiAttention) and v.reg == "l2" and v.gamma == 0.5
    assert "gamma=0.5" in repr(v)
    # the default form (structattn.options.DEFAULT_FORM, stable) learns τ = T/γ; the paper form learns T
    assert sorted(n for n, _ in v.named_parameters()) == ["proj.weight", "transitions_over_gamma"]
    paper = build_attention("viterbi", 3, 4, "l2", 0.5, "paper")
    assert sorted(n for n, _ in paper.named_parameters()) == ["proj.weight", "transitions"]


def test_low_precision_viterbi_attention():
    torch.manual_seed(12)
    s = torch.randn(2, 6)
    pm = _mask([6, 3], 6, "left")
    ref = viterbi_attention(s, torch.zeros(2, 2), pm, "entropy", 1.0)
    out = viterbi_attention(s.bfloat16(), torch.zeros(2, 2), pm, "entropy", 1.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    assert (out[pm] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    torch.manual_seed(13)
    s = torch.randn(4, 9)
    pm = _mask([9, 4, 1, 6], 9, "left")
    cpu = _weights(kind, s, pm, torch.tensor([[0.3, -0.5], [-0.2, 0.4]]))
    gpu = _weights(kind, s.cuda(), pm.cuda(), torch.tensor([[0.3, -0.5], [-0.2, 0.4]]).cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


def _normaliser_on(device, dtype, reg, gamma, form, scores, mask, trans, grad_w):
    """A Transformer's multi-head normaliser (4 heads) on ``device``: weights, gradients of ⟨weights, grad_w⟩ in
    the scores and the per-head transitions, and the fallback counts."""
    from structattn.attention import ViterbiNormalizer

    n = ViterbiNormalizer(4, reg, gamma, form, contiguity=None if form == "paper" else 1.0).to(device, dtype)
    param = n.transitions if form == "paper" else n.transitions_over_gamma
    with torch.no_grad():
        param.copy_(trans)
    s = scores.to(device, dtype).requires_grad_()
    w = n(s, mask.to(device))
    gs, gt = torch.autograd.grad((w * grad_w.to(device, dtype)).sum(), (s, param))
    return w.detach().cpu(), gs.cpu(), gt.cpu(), n.pop_fallback_counts()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("form", ["paper", "stable"])
@pytest.mark.parametrize("reg,gamma", [("entropy", 2.0), ("l2", 10.0), ("l2", 0.3)])
def test_multihead_normaliser_cuda_matches_cpu(dtype, tol, form, reg, gamma):
    """The Transformer's normaliser (ViterbiNormalizer, one transition matrix per head) on CUDA — the unfused path
    through the Triton kernels — equals the CPU path (the fused C kernel): weights, the gradients in the scores and
    in the transitions, and the counts of dead (softmax fallback) and frozen rows (ℓ2 at γ = 0.3 has both). The key
    padding mask is (B, 1, 1, S), left-padded, with one sequence of a single real position."""
    g = torch.Generator().manual_seed(31)
    B, H, Q, S = 3, 4, 5, 9
    scores = torch.randn(B, H, Q, S, generator=g, dtype=torch.float64) * 3
    trans = torch.randn(H, 2, 2, generator=g, dtype=torch.float64) * 0.5
    grad_w = torch.randn(B, H, Q, S, generator=g, dtype=torch.float64)
    mask = _mask([9, 5, 1], S, "left")[:, None, None, :]
    cpu = _normaliser_on("cpu", dtype, reg, gamma, form, scores, mask, trans, grad_w)
    gpu = _normaliser_on("cuda", dtype, reg, gamma, form, scores, mask, trans, grad_w)
    for name, a, b in zip(("weights", "d/dscores", "d/dtransitions"), gpu[:3], cpu[:3]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    assert (gpu[0][mask.expand(B, H, Q, S)] == 0).all()
    assert gpu[3] == cpu[3] and gpu[3][0] == B * H * Q


# ---- errors --------------------------------------------------------------------------------------------------------


def test_errors():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="attention must be one of"):
        build_attention("dot", 3, 4)
    with pytest.raises(ValueError, match="reg must be one of"):
        ViterbiAttention(3, 4, "l1")
    with pytest.raises(ValueError, match="gamma must be"):
        ViterbiAttention(3, 4, "l2", 0.0)
    with pytest.raises(ValueError, match="gamma must be"):
        viterbi_attention(s, torch.zeros(2, 2), None, "entropy", -1.0)
    with pytest.raises(TypeError, match="padding_mask must be a bool"):
        softmax_attention(s, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="padding_mask must have the shape"):
        sparsemax_attention(s, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"scores must have shape \(B, T\)"):
        softmax_attention(torch.randn(3))
    with pytest.raises(ValueError, match="transitions must have shape"):
        viterbi_attention(s, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="non-finite"):
        viterbi_attention(torch.tensor([[0.0, math.nan]]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="query_dim must be a positive int"):
        SoftmaxAttention(0, 4)
    with pytest.raises(ValueError, match="built for d_z=3"):
        SoftmaxAttention(3, 4)(torch.randn(2, 5), torch.randn(2, 6, 4))
