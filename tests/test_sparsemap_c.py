"""The C active-set solver of the SparseMAP segmentation attention (structattn/ops/kernels/cpu_sparsemap.py) against the
tensor solver it replaces on CPU (structattn.ops.sparsemap._solve, the reference) and against brute force.

Oracles, and which ran:

* **brute-force enumeration** (always): rows of n ≤ 8 positions, all 2^(n+1) paths with their scores from the §5
  formula; the C output is certified optimal for the vertex-form QP over conv(Y) (``_certify`` of
  tests/test_sparsemap.py: no vertex has a larger Frank–Wolfe value than the returned mixture, α ∈ △, p = Σ α_a y_a),
  including ties (integer scores, all-equal rows, every path scoring 0), T = 0 and T = 3·I.
* **the tensor solver** (always): p to 1e-9 in float64 on every row. The active set itself agrees exactly (same
  structures, same order, α to 1e-9) where the row's optimal face is a simplex — checked on rows with a strong
  contiguity prior (T = 3·I), where we found no exception. On rows with many fractional positions (T ≈ 0) the optimum
  is degenerate: near the end many structures tie in the oracle up to float rounding, and the C solver (Cholesky
  updates) and the tensor solver (a batched LU solve) can pick different ones; both then return optimal
  decompositions of the same unique p (certified here with brute force on short rows), not the same α.
* ``lp-sparsemap``: not importable on Python 3.11 (see tests/test_sparsemap.py); not used.

Also: float64 gradcheck of the C backward, the C backward == the tensor backward on the same support, padding (left,
right) == unpadded through the C path, non-convergence reported for the same rows with the same iteration counts as
the tensor solver, and the fallback to the tensor solver (with one warning) when no C compiler works.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from structattn.attention import sparsemap_attention
from structattn.ops import sparsemap as SM
from structattn.ops.kernels import cpu as _cpu
from structattn.ops.kernels import cpu_sparsemap as C
from test_sparsemap import _certify

D = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Without any C compiler the kernel cannot exist (the documented fallback, tested below in a subprocess); with one,
# a kernel that fails to build is a failure, not a skip.
needs_c = pytest.mark.skipif(_cpu._compiler() is None, reason="no C compiler on this machine ($CC, cc, gcc, clang)")


def _batch(N, T, seed, trans_scale, scale=1.0, ties=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, T, generator=g, dtype=D) * scale
    if ties:
        s[::5] = torch.round(s[::5])  # integer ties
        s[1] = 0.5  # all-equal row
        s[2] = 0.0
    lengths = torch.randint(0, T + 1, (N,), generator=g)
    lengths[0], lengths[3] = T, 0
    s = s.masked_fill(torch.arange(T) >= lengths[:, None], 0.0)
    tr = trans_scale + 0.1 * torch.randn(N, 2, 2, generator=g, dtype=D)
    return s, tr, lengths


def _both(s, tr, lengths, max_iter=SM.DEFAULT_MAX_ITER):
    K = SM._slots(max_iter, s.shape[1])
    ref = SM._solve(s, tr, lengths, SM.DEFAULT_TOL, max_iter)
    out = C.forward(s, tr, lengths, SM.DEFAULT_TOL, max_iter, K)
    return ref, out


@needs_c
def test_the_kernel_builds():
    assert C.available(), C.unavailable_reason()
    assert SM._kernel() is C


@needs_c
@pytest.mark.parametrize("T_", [0.0, 3.0])
def test_marginals_equal_the_tensor_solver(T_):
    s, tr, lengths = _batch(200, 30, 1 + int(T_), T_ * torch.eye(2, dtype=D))
    (a1, Y1, Y01, it1, c1), (a2, Y2, Y02, it2, c2, p2) = _both(s, tr, lengths)
    # Both solvers fail on the same rare degenerate rows (T = 0: seen on 1 row of 200, cycling until the cap)
    assert torch.equal(c2, c1) and c1.float().mean() > 0.98
    assert torch.equal(it2[~c1], it1[~c1])
    p1 = (a1.unsqueeze(-1) * Y1).sum(1)
    torch.testing.assert_close(p2[c1], p1[c1], rtol=0, atol=1e-9)
    # every C decomposition is a proper one of its p
    torch.testing.assert_close(a2.sum(1)[lengths > 0], torch.ones(int((lengths > 0).sum()), dtype=D), rtol=0,
                               atol=1e-12)
    assert (a2 >= 0).all() and (a2[lengths == 0] == 0).all()
    torch.testing.assert_close((a2.unsqueeze(-1) * Y2.to(D)).sum(1), p2, rtol=0, atol=1e-12)
    pad = (torch.arange(30) >= lengths[:, None]).unsqueeze(1).expand_as(Y2)
    assert not Y2[pad].any()


@needs_c
def test_active_sets_equal_the_tensor_solver_with_a_contiguity_prior():
    """T = 3·I: on almost every row the same structures in the same order, start states, α and iteration counts
    (measured: 297 of 300 rows; the others are degenerate rows where rounding picks another optimal decomposition,
    module docstring); p on every row."""
    s, tr, lengths = _batch(300, 40, 7, 3 * torch.eye(2, dtype=D), ties=False)
    (a1, Y1, Y01, it1, c1), (a2, Y2, Y02, it2, c2, p2) = _both(s, tr, lengths)
    assert c1.all() and c2.all()
    torch.testing.assert_close(p2, (a1.unsqueeze(-1) * Y1).sum(1), rtol=0, atol=1e-9)
    k = (a1 > 0) | (a2 > 0)
    same = ((a2 - a1).abs() <= 1e-9).all(1) & ((Y2 == Y1.bool()).all(-1) | ~k).all(1) & \
        ((Y02 == Y01.bool()) | ~k).all(1) & (it2 == it1)
    assert same.float().mean() >= 0.97, same.float().mean()


@needs_c
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_brute_force_enumeration_certifies_the_c_optimum(n, seed):
    """Ties (integer scores, all-equal rows, every path scoring 0), T = 0 and T = 3·I, through the public function
    (which takes the C path here)."""
    g = torch.Generator().manual_seed(100 * n + seed)
    s = torch.randn(8, n, generator=g, dtype=D) * 2
    T = torch.randn(8, 2, 2, generator=g, dtype=D)
    T[1] = 0.0
    T[2] = 3 * torch.eye(2, dtype=D)
    s[3] = 0.3
    s[4] = torch.randint(-2, 3, (n,), generator=g).to(D)
    s[5] = 0.0
    T[5] = 0.0
    s[6] = 0.5
    T[6] = 3 * torch.eye(2, dtype=D)
    s[7] = s[7] * 0.05  # small scores: affinely dependent structures, the pivot
    lengths = torch.full((8,), n)
    p, alpha, Y, Y0, _, conv = SM._forward_impl(s, T, lengths, SM.DEFAULT_TOL, SM.DEFAULT_MAX_ITER)
    assert conv.all()
    ref = SM._solve(s, T, lengths, SM.DEFAULT_TOL, SM.DEFAULT_MAX_ITER)
    torch.testing.assert_close(p, (ref[0].unsqueeze(-1) * ref[1]).sum(1), rtol=0, atol=1e-9)
    for b in range(8):
        _certify(s[b], T[b], p[b], alpha[b], Y[b], Y0[b])


@needs_c
@pytest.mark.parametrize("T_", [0.0, 3.0])
def test_non_convergence_is_reported_for_the_same_rows(T_):
    s, tr, lengths = _batch(60, 25, 3, T_ * torch.eye(2, dtype=D), ties=False)
    for max_iter in (1, 3):
        (a1, Y1, _, it1, c1), (a2, Y2, _, it2, c2, _) = _both(s, tr, lengths, max_iter)
        assert torch.equal(c2, c1) and torch.equal(it2, it1)
        assert (~c2).sum() >= 5 and (it2 <= max_iter).all()
        torch.testing.assert_close(a2, a1, rtol=0, atol=1e-9)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, info = sparsemap_attention(s, tr, torch.arange(25) >= lengths[:, None], max_iter=2,
                                      return_structures=True)
    assert not info.converged[lengths > 2].all()


# ---- backward ------------------------------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("per_row", [False, True])
def test_gradcheck_of_the_c_backward(per_row):
    g = torch.Generator().manual_seed(27)  # a seed whose rows are away from support changes (checked below)
    s = torch.randn(5, 9, generator=g, dtype=D)
    T = torch.randn(5, 2, 2, generator=g, dtype=D) if per_row else torch.randn(2, 2, generator=g, dtype=D)
    pm = torch.zeros(5, 9, dtype=torch.bool)
    pm[1, :3] = True
    pm[2, 6:] = True
    _, info = sparsemap_attention(s, T, pm, return_structures=True)
    for d in (1e-4, -1e-4):  # away from support changes
        _, other = sparsemap_attention(s + d, T + d, pm, return_structures=True)
        assert torch.equal(other.structures, info.structures)
    assert (info.num_structures > 1).all()

    def f(s, T):
        w, info = sparsemap_attention(s, T, pm, return_structures=True)
        return w, info.marginals

    assert torch.autograd.gradcheck(f, (s.requires_grad_(True), T.requires_grad_(True)), atol=1e-7, rtol=1e-6)


@needs_c
def test_c_backward_equals_the_tensor_backward():
    s, tr, lengths = _batch(80, 20, 5, torch.eye(2, dtype=D))
    p, alpha, Y, Y0, _, _ = SM._forward_impl(s, tr, lengths, SM.DEFAULT_TOL, SM.DEFAULT_MAX_ITER)
    gp = torch.randn(80, 20, generator=torch.Generator().manual_seed(2), dtype=D)
    gs, gT = C.backward(gp, Y, Y0, alpha, lengths)
    real = torch.arange(20) < lengths[:, None]
    k = max(int((alpha > 0).sum(1).max()), 1)
    a = alpha[:, :k]
    Yf, Y0f = Y[:, :k].to(D), Y0[:, :k].to(D)
    beta, _ = SM._kkt_solve(SM._gram(Yf, real.to(D)), a > 0, (Yf * gp.masked_fill(~real, 0).unsqueeze(1)).sum(-1),
                            0.0)
    torch.testing.assert_close(gs, (beta.unsqueeze(-1) * Yf).sum(1), rtol=0, atol=1e-9)
    torch.testing.assert_close(gT, (beta[:, :, None, None] * SM._structure_counts(Yf, Y0f, real.to(D))).sum(1),
                               rtol=0, atol=1e-9)


# ---- padding, public path, fallback ------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("T_", [0.0, 3.0])
def test_padding_equals_unpadded(side, T_):
    g = torch.Generator().manual_seed(31)
    N, n = 12, 14
    s = torch.randn(N, n, generator=g, dtype=D)
    T = T_ * torch.eye(2, dtype=D) + 0.1 * torch.randn(2, 2, generator=g, dtype=D)
    pm = torch.zeros(N, n, dtype=torch.bool)
    for b in range(1, N):
        k = int(torch.randint(0, n, (1,), generator=g))
        if side == "left":
            pm[b, :k] = True
        else:
            pm[b, n - k:] = True
    a = s.masked_fill(pm, float("nan")).requires_grad_(True)
    w, info = sparsemap_attention(a, T, pm, return_structures=True)
    z = torch.randn(N, n, generator=g, dtype=D)
    (gs,) = torch.autograd.grad((w * z).sum(), a)
    for b in range(N):
        keep = ~pm[b]
        sb = s[b, keep][None].clone().requires_grad_(True)
        wb, ib = sparsemap_attention(sb, T, return_structures=True)
        torch.testing.assert_close(w[b, keep], wb[0], rtol=0, atol=1e-12)
        kb = int(ib.num_structures[0])
        assert int(info.num_structures[b]) == kb
        assert torch.equal(info.structures[b, :kb][:, keep], ib.structures[0, :kb])
        (gsb,) = torch.autograd.grad((wb * z[b, keep]).sum(), sb)
        torch.testing.assert_close(gs[b, keep], gsb[0], rtol=0, atol=1e-10)
        assert (gs[b, pm[b]] == 0).all()


@needs_c
def test_public_path_equals_the_tensor_solver(monkeypatch):
    """sparsemap_attention with the C path and with the tensor solver forced (as when no compiler works): the same
    weights and gradients."""
    g = torch.Generator().manual_seed(41)
    s = torch.randn(16, 12, generator=g, dtype=D)
    T = 2 * torch.eye(2, dtype=D)
    pm = torch.rand(16, 12, generator=g) < 0.2
    z = torch.randn(16, 12, generator=g, dtype=D)
    outs = []
    for kernel in (SM._kernel, lambda: None):
        monkeypatch.setattr(SM, "_kernel", kernel)
        a, t = s.clone().requires_grad_(True), T.clone().requires_grad_(True)
        w = sparsemap_attention(a, t, pm)
        outs.append((w, *torch.autograd.grad((w * z).sum(), (a, t))))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-9)


def test_without_a_compiler_the_tensor_solver_runs_with_one_warning(tmp_path):
    code = textwrap.dedent(
        """
        import warnings, torch
        from structattn.attention import sparsemap_attention
        from structattn.ops import sparsemap as SM
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            s = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            a = sparsemap_attention(s, torch.eye(2, dtype=torch.float64))
            b = sparsemap_attention(s, torch.eye(2, dtype=torch.float64))
        msgs = [str(x.message) for x in w if "C SparseMAP kernel is unavailable" in str(x.message)]
        assert len(msgs) == 1 and "no C compiler" in msgs[0], msgs
        assert SM._kernel() is None and torch.equal(a, b)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, dtype=torch.float64))
        print("ok")
        """
    )
    env = dict(os.environ, PATH="", CC="", STRUCTATTN_KERNEL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
