"""SparseMAP segmentation attention (structattn.ops.sparsemap, structattn.attention.sparsemap_attention; issue 22).

Oracles, and which one ran (each test's name says it):

* **brute-force enumeration** (always): for rows of n ≤ 8 positions, all 2^(n+1) paths (y_0, y_1, …, y_n) are listed
  with their scores Σ_t θ[t, y_t, y_{t−1}] computed term by term from the §5 formula. The returned point is checked
  against all of them with the optimality certificate of the QP over conv(Y) in its vertex form
  (max_{α ∈ △} sᵀα − ½‖Mα‖², M the unary indicator vectors): every vertex has a Frank–Wolfe value
  s_y − ⟨u_y, u⟩ at most that of the returned mixture (≤ 1e-12), α ∈ △, u = Σ α_a u_a, and each returned structure is
  a vertex whose score is recomputed from the enumeration. By convexity this proves optimality; u is unique.
* **SciPy** (an independent QP solver, in the ``test`` extra): the same vertex-form QP over all 2^(n+1) paths
  solved by ``scipy.optimize.minimize(method="SLSQP", ftol=1e-12)`` in float64 (it reaches ~6e-7; tighter ftol
  ends in line-search failures), p compared to 1e-6. Under CI=true a missing
  SciPy fails the test instead of skipping it.
* **the project's ℓ2 smoothed Viterbi** at T = 0, where the chain factorises and SparseMAP's p_t = clip((1 + s_t)/2)
  is the ℓ2 attention's p with γ = 1 (a code path written independently of this one), values and ∂/∂s.
* ``lp-sparsemap`` (the SparseMAP authors' package) does NOT run: its only release on PyPI, 1.0 (an sdist, no
  wheels), does not build on Python 3.11 (checked 2026-12-03): its setup.py imports ``setuptools.convert_path``,
  which current setuptools removed, and with setuptools < 70 and Cython the sdist lacks
  ``lpsmap/ad3qp/factor_graph.pyx`` (without Cython: "No module named 'Cython'"). It is therefore not in the
  ``test`` extra (it would break ``pip install .[test]``), and no test pretends to use it.

Also: float64 gradcheck of the backward (closed form on the active set) w.r.t. scores and T, padding of any layout ==
unpadded (values, gradients, structures), the softmax fallback and its flag, non-convergence reported, clear errors on
bad input, the module, the custom ops (opcheck) and torch.compile(fullgraph=True) without a graph break.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

import structattn
from structattn.attention import SparsemapAttention, sparsemap_attention, viterbi_attention
from structattn.ops import sparsemap as SM
from structattn.ops.segmentation import DEAD, FROZEN, HAS_REAL

D = torch.float64


def _scipy_optimize():
    if os.environ.get("CI") == "true":
        import scipy.optimize  # CI installs the test extra: a missing oracle must fail, not skip

        return scipy.optimize
    return pytest.importorskip("scipy.optimize")


# ---- the brute-force oracle ---------------------------------------------------------------------------------------


def _enumerate(s: list[float], T: list[list[float]]):
    """All paths (y_0, …, y_n) of the chain with their scores, term by term: θ[t, i, j] = s_t [i = 1] + T[i][j]."""
    n = len(s)
    paths, scores = [], []
    for path in itertools.product((0, 1), repeat=n + 1):
        score = 0.0
        for t in range(1, n + 1):
            i, j = path[t], path[t - 1]
            score += (s[t - 1] if i == 1 else 0.0) + T[i][j]
        paths.append(path)
        scores.append(score)
    return paths, scores


def _fw_value(path, score, p):
    """s_y − ⟨u_y, u⟩ with u[t, 1] = p_t, u[t, 0] = 1 − p_t (the regulariser acts on both states' indicators)."""
    y = path[1:]
    return score - sum(p[t] if y[t] else 1.0 - p[t] for t in range(len(y)))


def _certify(s_row, T, p, alpha, Y, Y0):
    """Assert that (α, structures) is optimal for the vertex-form QP of one unpadded row (module docstring)."""
    s_row, T = [float(v) for v in s_row], [[float(v) for v in r] for r in T]
    paths, scores = _enumerate(s_row, T)
    index = {path: k for k, path in enumerate(paths)}
    p = [float(v) for v in p]
    support = [(float(a), (int(y0),) + tuple(int(v) for v in y)) for a, y, y0 in zip(alpha, Y, Y0) if a > 0]
    assert support, "no structure returned"
    assert all(a > 0 for a, _ in support) and math.isclose(sum(a for a, _ in support), 1.0, abs_tol=1e-12)
    for t in range(len(p)):  # u = Σ α_a u_a
        assert math.isclose(p[t], sum(a * path[t + 1] for a, path in support), abs_tol=1e-12)
    mix = sum(a * _fw_value(path, scores[index[path]], p) for a, path in support)
    best = max(_fw_value(path, score, p) for path, score in zip(paths, scores))
    assert best - mix <= 1e-12 * (1 + abs(mix)), (best, mix)


def _rows(N, n, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, n, generator=g, dtype=D) * scale, torch.randn(2, 2, generator=g, dtype=D)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_brute_force_enumeration_certifies_the_optimum(n, seed):
    s, T = _rows(6, n, seed + 10 * n)
    T = T.expand(6, 2, 2).clone()
    T[1] = 0.0  # factorised chain: the start state y_0 ties
    T[2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D)  # the stable form's contiguity prior
    s[3] = 0.3  # all-equal scores
    s[4] = torch.randint(-2, 3, (n,), generator=torch.Generator().manual_seed(seed), dtype=D)  # integer ties
    s[5] = 0.0
    T[5] = 0.0  # every path scores 0
    w, info = sparsemap_attention(s, T, return_structures=True)
    alpha, Y = info.probabilities, info.structures
    _, _, _, Y0, _, _ = SM._forward_impl(s, T, torch.full((6,), n), SM.DEFAULT_TOL, SM.DEFAULT_MAX_ITER)
    assert info.converged.all()
    for b in range(6):
        _certify(s[b], T[b], info.marginals[b], alpha[b], Y[b], Y0[b, : alpha.shape[1]])
    torch.testing.assert_close(w.sum(-1), torch.ones(6, dtype=D), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0.01, 0.1])
def test_small_scores_affinely_dependent_structures_converge_to_the_optimum(scale):
    """Small scores make every position fractional; the active set then meets structures whose unary vectors are
    affinely dependent on the active ones (e.g. 111000 + 000111 = 111111 + 000000). Before the pivot of
    ops/sparsemap.py, 57 / 39 of these 150 rows (scale 0.01 / 0.1) did not converge (15 / 10 cycled to max_iter,
    the others stopped on a y* already active)."""
    g = torch.Generator().manual_seed(42)
    s = torch.randn(150, 6, generator=g, dtype=D) * scale
    T = torch.randn(150, 2, 2, generator=g, dtype=D) * scale
    T[::5] = 0.0
    lengths = torch.full((150,), 6)
    p, alpha, Y, Y0, iters, conv = SM._forward_impl(s, T, lengths, SM.DEFAULT_TOL, SM.DEFAULT_MAX_ITER)
    assert conv.all() and iters.max() < 40
    for b in range(0, 150, 3):
        _certify(s[b], T[b], p[b], alpha[b], Y[b], Y0[b])


def _scipy_vertex_qp(s_row, T):
    """p of argmax_{α ∈ △} sᵀα − ½‖Mα‖² over all paths, by SciPy's SLSQP (float64)."""
    opt = _scipy_optimize()
    import numpy as np

    paths, scores = _enumerate([float(v) for v in s_row], [[float(v) for v in r] for r in T])
    n = len(s_row)
    M = np.array([[1.0 * (path[t + 1] == i) for path in paths] for t in range(n) for i in (0, 1)])
    sc = np.array(scores)
    G = M.T @ M
    k = len(paths)
    res = opt.minimize(lambda a: 0.5 * a @ G @ a - sc @ a, np.full(k, 1.0 / k), jac=lambda a: G @ a - sc,
                       method="SLSQP", bounds=[(0, None)] * k,
                       constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(k)}],
                       options={"ftol": 1e-12, "maxiter": 2000})
    assert res.success, res.message
    P = np.array([[path[t + 1] for path in paths] for t in range(n)], dtype=float)
    return torch.tensor(P @ res.x, dtype=D)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scipy_vertex_form_qp_gives_the_same_marginals(seed):
    n = 5
    s, T = _rows(3, n, 100 + seed)
    _, info = sparsemap_attention(s, T, return_structures=True)
    for b in range(3):
        torch.testing.assert_close(info.marginals[b], _scipy_vertex_qp(s[b], T), rtol=0, atol=1e-6)


def test_factorised_chain_equals_the_l2_viterbi_attention_with_unit_temperature():
    """T = 0: p_t = clip((1 + s_t)/2, 0, 1) = the ℓ2 (γ = 1) Viterbi marginals; weights and ∂/∂s agree."""
    s, _ = _rows(5, 30, 7)
    T = torch.zeros(2, 2, dtype=D)
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    w1, info = sparsemap_attention(a, T, return_structures=True)
    w2, p2 = viterbi_attention(b, T, reg="l2", gamma=1.0, return_marginals=True)
    torch.testing.assert_close(info.marginals, p2, rtol=0, atol=1e-10)
    torch.testing.assert_close(info.marginals, ((1 + s) / 2).clamp(0, 1), rtol=0, atol=1e-10)
    torch.testing.assert_close(w1, w2, rtol=0, atol=1e-10)
    z = torch.randn(5, 30, generator=torch.Generator().manual_seed(1), dtype=D)
    g1, = torch.autograd.grad((w1 * z).sum(), a)
    g2, = torch.autograd.grad((w2 * z).sum(), b)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10)


# ---- derivatives -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_row", [False, True])
def test_gradcheck_float64(per_row):
    """The closed form on the active set (one KKT solve) against finite differences, w.r.t. scores and T. The random
    inputs are away from support changes (checked: the support is the same at ±1e-4 around them)."""
    s, T = _rows(4, 9, 4, scale=1.0)
    if per_row:
        T = T + 0.3 * torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(5), dtype=D)
    pm = torch.zeros(4, 9, dtype=torch.bool)
    pm[1, :3] = True
    pm[2, 6:] = True
    pm[3, 4] = True
    _, info = sparsemap_attention(s, T, pm, return_structures=True)
    for d in (1e-4, -1e-4):
        _, other = sparsemap_attention(s + d, T + d, pm, return_structures=True)
        assert torch.equal(other.num_structures, info.num_structures)
        assert torch.equal(other.structures, info.structures)
    assert (info.num_structures > 1).all()  # non-trivial Jacobians

    def f(s, T):
        w, info = sparsemap_attention(s, T, pm, return_structures=True)
        return w, info.marginals

    assert torch.autograd.gradcheck(f, (s.requires_grad_(True), T.requires_grad_(True)), atol=1e-7, rtol=1e-6)


def test_single_structure_rows_have_zero_jacobian_and_are_frozen():
    s = torch.tensor([[5.0, -5.0, 5.0, 5.0]], dtype=D, requires_grad=True)
    T = torch.zeros(2, 2, dtype=D, requires_grad=True)
    w, info = sparsemap_attention(s, T, return_structures=True)
    assert int(info.num_structures) == 1 and info.flags.item() == HAS_REAL | FROZEN
    gs, gT = torch.autograd.grad((w * torch.arange(4.0, dtype=D)).sum(), (s, T))
    assert gs.abs().max() == 0 and gT.abs().max() == 0


# ---- padding ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["left", "right", "holes"])
def test_padding_of_any_layout_equals_unpadded(kind):
    N, T_ = 6, 11
    g = torch.Generator().manual_seed(11)
    s = torch.randn(N, T_, generator=g, dtype=D) * 2
    T = torch.randn(N, 2, 2, generator=g, dtype=D)
    pm = torch.zeros(N, T_, dtype=torch.bool)
    for b in range(N):
        k = int(torch.randint(0, T_, (1,), generator=g))
        if kind == "left":
            pm[b, :k] = True
        elif kind == "right":
            pm[b, T_ - k:] = True
        else:
            pm[b] = torch.rand(T_, generator=g) < 0.35
    pm[0] = True  # no real position
    pm[1] = False  # no padding
    s_pad = s.masked_fill(pm, float("nan"))  # padded entries are never read
    a, Ta = s_pad.clone().requires_grad_(True), T.clone().requires_grad_(True)
    w, info = sparsemap_attention(a, Ta, pm, return_structures=True)
    z = torch.randn(N, T_, generator=g, dtype=D)
    gs, gT = torch.autograd.grad((w * z).sum(), (a, Ta))
    assert (w[pm] == 0).all() and (gs[pm] == 0).all() and not info.structures[pm.unsqueeze(1).expand_as(
        info.structures)].any()
    assert (w[0] == 0).all() and info.num_structures[0] == 0 and info.flags[0] == 0
    for b in range(1, N):
        keep = ~pm[b]
        sb, Tb = s[b, keep][None].clone().requires_grad_(True), T[b].clone().requires_grad_(True)
        wb, ib = sparsemap_attention(sb, Tb, return_structures=True)
        torch.testing.assert_close(w[b, keep], wb[0], rtol=0, atol=1e-12)
        k = int(ib.num_structures[0])
        assert int(info.num_structures[b]) == k
        torch.testing.assert_close(info.probabilities[b, :k], ib.probabilities[0, :k], rtol=0, atol=1e-12)
        assert torch.equal(info.structures[b, :k][:, keep], ib.structures[0, :k])
        gsb, gTb = torch.autograd.grad((wb * z[b, keep]).sum(), (sb, Tb))
        torch.testing.assert_close(gs[b, keep], gsb[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(gT[b], gTb, rtol=0, atol=1e-10)


# ---- outputs, fallback, convergence -------------------------------------------------------------------------------


def test_structures_and_probabilities_describe_the_weights():
    s, T = _rows(8, 20, 4)
    w, info = sparsemap_attention(s, T, return_structures=True)
    K = info.probabilities.shape[1]
    assert K == int(info.num_structures.max())
    assert (info.probabilities[:, :-1] >= info.probabilities[:, 1:]).all()  # sorted
    torch.testing.assert_close(info.probabilities.sum(-1), torch.ones(8, dtype=D), rtol=0, atol=1e-12)
    p = (info.probabilities.unsqueeze(-1) * info.structures.to(D)).sum(1)
    torch.testing.assert_close(p, info.marginals, rtol=0, atol=1e-12)
    torch.testing.assert_close(w, p / p.sum(-1, keepdim=True), rtol=0, atol=1e-12)
    for b in range(8):
        k = int(info.num_structures[b])
        assert len({tuple(y.tolist()) for y in info.structures[b, :k]}) == k  # distinct within a row


def test_all_mass_on_the_empty_segmentation_falls_back_to_softmax():
    s = torch.tensor([[-10.0, -12.0, -9.0], [3.0, -1.0, 0.5]], dtype=D, requires_grad=True)
    T = torch.zeros(2, 2, dtype=D)
    w, info = sparsemap_attention(s, T, return_structures=True)
    assert (info.marginals[0] == 0).all() and info.flags[0] == HAS_REAL | DEAD | FROZEN
    assert info.flags[1] & DEAD == 0
    torch.testing.assert_close(w[0], torch.softmax(s[0].detach(), -1), rtol=0, atol=1e-15)
    (g,) = torch.autograd.grad(w[0, 2], s)
    assert g[0].abs().sum() > 0  # the fallback keeps a gradient


def test_non_convergence_is_reported():
    s, T = _rows(3, 12, 6)
    _, ref = sparsemap_attention(s, T, return_structures=True)
    assert (ref.iterations > 2).all()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        w, info = sparsemap_attention(s, T, max_iter=2, return_structures=True)
    assert not info.converged.any() and (info.iterations == 2).all()
    # still a proper (feasible) distribution over structures
    torch.testing.assert_close(info.probabilities.sum(-1), torch.ones(3, dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=D), rtol=0, atol=1e-12)


def test_float32_and_half_scores():
    s, T = _rows(4, 15, 8)
    w64 = sparsemap_attention(s, T)
    w32 = sparsemap_attention(s.float(), T.float())
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), w64, rtol=0, atol=1e-6)
    wb = sparsemap_attention(s.bfloat16(), T.float())
    assert wb.dtype == torch.bfloat16


def test_bad_input_raises_clear_errors():
    s, T = _rows(2, 4, 9)
    with pytest.raises(ValueError, match="non-finite"):
        sparsemap_attention(s.clone().index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("inf"),
                                                                                                       dtype=D)), T)
    with pytest.raises(ValueError, match="non-finite"):
        sparsemap_attention(s, torch.tensor([[0.0, float("nan")], [0.0, 0.0]], dtype=D))
    with pytest.raises(ValueError, match="transitions must have shape"):
        sparsemap_attention(s, torch.zeros(3, 3, dtype=D))
    with pytest.raises(ValueError, match="batch size"):
        sparsemap_attention(s, torch.zeros(3, 2, 2, dtype=D))
    with pytest.raises(TypeError, match="transitions must be a torch.Tensor"):
        sparsemap_attention(s, [[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(TypeError, match="floating-point"):
        sparsemap_attention(torch.ones(2, 4, dtype=torch.long), T)
    with pytest.raises(ValueError, match="shape"):
        sparsemap_attention(s[0], T)
    with pytest.raises(TypeError, match="bool"):
        sparsemap_attention(s, T, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="tol"):
        sparsemap_attention(s, T, tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        sparsemap_attention(s, T, max_iter=0)
    with pytest.raises(ValueError, match="max_iter"):
        SparsemapAttention(3, 4, max_iter=1.5)


# ---- module, exports, custom ops, compile --------------------------------------------------------------------------


def test_module_learns_transitions_and_counts_rows():
    torch.manual_seed(0)
    m = SparsemapAttention(3, 4, form="paper", gamma=1.0)  # SparseMAP of the raw scores and a raw T from 0
    assert torch.equal(m.transitions.detach(), torch.zeros(2, 2))
    q, k = torch.rand(5, 3) * 2 - 1, torch.rand(5, 7, 4) * 2 - 1
    pm = torch.zeros(5, 7, dtype=torch.bool)
    pm[2, 4:] = True
    pm[4] = True
    with torch.no_grad():
        m.proj.weight.mul_(8.0)  # scores beyond the unit scale: several structures per row
    ctx, w = m(q, k, pm)
    assert ctx.shape == (5, 4) and w.shape == (5, 7) and (w[pm] == 0).all()
    ctx.pow(2).sum().backward()
    assert m.transitions.grad is not None and m.transitions.grad.abs().sum() > 0
    assert m.proj.weight.grad.abs().sum() > 0
    rows, dead, frozen = m.pop_fallback_counts()
    srows, structures, unconverged = m.pop_structure_counts()
    assert rows == srows == 4 and unconverged == 0 and structures >= 4
    assert m.pop_fallback_counts() == (0, 0, 0) and m.pop_structure_counts() == (0, 0, 0)
    assert "max_iter" in repr(m)


@pytest.mark.parametrize("form", ["stable", "paper"])
def test_module_forms_are_the_viterbi_attentions(form):
    """The modules parametrise T as the Viterbi attention does (structattn.options defaults: stable form, τ = T/γ
    from the contiguity prior, centred scores; γ = SPARSEMAP_GAMMA): weights = sparsemap_attention(s̃/γ, T/γ)."""
    from structattn.attention import SparsemapNormalizer, ViterbiAttention, centre_scores
    from structattn.options import DEFAULT_CONTIGUITY, DEFAULT_FORM, SPARSEMAP_GAMMA

    torch.manual_seed(1)
    m = SparsemapAttention(3, 4, form=form)
    assert m.gamma == SPARSEMAP_GAMMA and SparsemapAttention(3, 4).form == DEFAULT_FORM
    v = ViterbiAttention(3, 4, "l2", SPARSEMAP_GAMMA, form)
    assert {n for n, _ in m.named_parameters()} == {n for n, _ in v.named_parameters()}
    if form == "stable":
        assert torch.equal(m.transitions_over_gamma.detach(), torch.eye(2) * DEFAULT_CONTIGUITY)
    q, k = torch.rand(4, 3) * 2 - 1, torch.rand(4, 6, 4) * 2 - 1
    pm = torch.zeros(4, 6, dtype=torch.bool)
    pm[1, :2] = True
    with torch.no_grad():
        m.proj.weight.mul_(5.0)
    _, w = m(q, k, pm)
    s = torch.bmm(k, m.proj(q).unsqueeze(2)).squeeze(2)
    s = centre_scores(s, pm) if form == "stable" else s
    ref = sparsemap_attention(s / m.gamma, m.effective_transitions() / m.gamma, pm)
    torch.testing.assert_close(w, ref)
    # the multi-head normaliser: head h of every row uses its own T_h
    n = SparsemapNormalizer(2, form=form)
    with torch.no_grad():
        for p in n.parameters():
            p.copy_(torch.randn_like(p))
    s4 = torch.randn(2, 2, 3, 5) * 10
    w4 = n(s4)
    for h in range(2):
        rows = s4[:, h].reshape(-1, 5)
        rows = centre_scores(rows) if form == "stable" else rows
        torch.testing.assert_close(w4[:, h].reshape(-1, 5),
                                   sparsemap_attention(rows / n.gamma, n.effective_transitions()[h] / n.gamma))


def test_top_level_exports():
    assert structattn.sparsemap_attention is sparsemap_attention
    assert structattn.SparsemapAttention is SparsemapAttention
    assert "sparsemap_attention" in structattn.__all__


def test_opcheck_of_the_custom_ops():
    s, T = _rows(3, 6, 12)
    lengths = torch.tensor([6, 4, 0])
    res = torch.library.opcheck(SM._forward_op, (s.clone().requires_grad_(True), T, lengths, 1e-9, 20))
    assert set(res.values()) == {"SUCCESS"}, res
    p, alpha, Y, Y0, _, _ = SM._forward_impl(s, T, lengths, 1e-9, 20)
    gp = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=D)
    res = torch.library.opcheck(SM._backward_op, (gp, Y, Y0, alpha, lengths, T))
    assert set(res.values()) == {"SUCCESS"}, res
    meta = torch.empty(3, 6, device="meta", dtype=D)
    outs = torch.ops.structattn.sparsemap_segmentation(meta, torch.empty(2, 2, device="meta", dtype=D),
                                                      torch.empty(3, device="meta", dtype=torch.long), 1e-9, 20)
    assert [tuple(o.shape) for o in outs] == [(3, 6), (3, 8), (3, 8, 6), (3, 8), (3,), (3,)]


@pytest.mark.parametrize("mask", ["padded", "none"])
def test_compile_fullgraph_equals_eager(mask):
    s, T = _rows(4, 7, 13)
    pm = torch.zeros(4, 7, dtype=torch.bool)
    pm[1, 5:] = True
    pm[2, :3] = True
    pm[3, 1] = True
    pm = pm if mask == "padded" else None

    def f(s, T, pm):
        w, info = sparsemap_attention(s, T, pm, return_structures=True)
        return w, info.marginals

    def run(fn):
        a, Ta = s.clone().requires_grad_(True), T.clone().requires_grad_(True)
        w, p = fn(a, Ta, pm)
        g = torch.autograd.grad((w * torch.arange(7, dtype=D)).sum() + p.sum(), (a, Ta))
        return w.detach(), p.detach(), *g

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for x, y in zip(run(compiled), run(f)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
