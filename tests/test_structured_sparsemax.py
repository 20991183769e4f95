"""prox_TV, fusedmax, oscarmax and the entmax-1.5 normaliser against oracles no one here wrote.

Oracles (each test records the one it ran with ``record_property("oracle", ...)`` and prints its error):

* ``prox-tv`` (Barbero & Sra's proxTV: the classic taut string and Johnson's dynamic programme, two algorithms other
  than our Condat) for prox_TV;
* ``torchsparseattn`` 0.2 (Niculae & Blondel's own code) for fusedmax and for the authors' OSCAR composition. Its
  ``Fusedmax``/``Oscarmax`` modules no longer run on torch 2.13 (they are legacy ``autograd.Function``s with a
  non-static ``forward``: "Legacy autograd function with non-static forward method is deprecated"), so the tests call
  the per-row maths they wrap: ``FusedProxFunction(α).project`` / ``.project_jv``, ``OscarProxFunction(beta=λ)
  .project``, ``sparsemax.project_simplex`` / ``sparsemax_grad``. At λ = 0 its fused backward averages tied
  neighbours (it groups by equal values whatever α is), which is not the Jacobian of the identity prox there: the
  backward oracle at λ = 0 is sparsemax's Jacobian (its ``sparsemax_grad``), the λ = 0 definition;
* brute-force QPs (scipy's SLSQP on the smooth reformulation with one slack per |·| or max term) for the argmins of
  both problems, and the KKT certificate of prox_TV;
* the ``entmax`` package for entmax15 (and its sparsemax as a cross-check of ours).

Under CI=true a missing oracle package fails the test instead of skipping it.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import structattn
from structattn.options import DEFAULT_TEMPERATURE
from structattn.attention import (
    Entmax15Attention,
    FusedmaxAttention,
    OscarmaxAttention,
    entmax15_attention,
    fusedmax_attention,
    oscarmax_attention,
    sparsemax_attention,
)
from structattn.ops import structured_sparsemax as S
from structattn.ops.kernels import cpu_prox as K

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _need(module: str):
    """Import an oracle package; skip without it, except under CI=true, where its absence is a failure."""
    if os.environ.get("CI") == "true":
        try:
            return __import__(module, fromlist=["_"])
        except ImportError as exc:
            pytest.fail(f"oracle package {module!r} is missing under CI=true: {exc}")
    return pytest.importorskip(module)


def _rows(seed: int, count: int = 60, nmax: int = 12):
    """Random float64 rows with every kind of tie: rounded entries (ties), all-equal rows, a length-1 row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = 1 if i == 0 else int(torch.randint(2, nmax + 1, (1,), generator=g))
        x = torch.randn(n, generator=g, dtype=torch.float64)
        if i % 4 == 1:
            x = torch.round(x * 2) / 2  # many ties
        elif i % 4 == 2:
            x = torch.full((n,), float(x[0]), dtype=torch.float64)  # all equal
        lam = [0.0, 0.01, 0.1, 0.3, 1.0][i % 5]
        out.append((x, lam))
    return out


def _report(name: str, err: float):
    print(f"oracle {name}: max abs difference {err:.2e}")


# ---- brute-force QPs --------------------------------------------------------------------------------------------


def _qp(theta: np.ndarray, lam: float, pairs: list[tuple[int, int]], kind: str) -> np.ndarray:
    """argmin_{p ∈ △} ½‖p − θ‖² + λ Σ_k t_k with t_k ≥ |p_i − p_j| (kind "tv") or t_k ≥ max(p_i, p_j) (kind
    "oscar"; p ≥ 0 on △): a smooth QP, solved by SLSQP to its tolerance."""
    from scipy.optimize import minimize

    n, m = len(theta), len(pairs)
    A = []  # rows a with a·z ≥ 0
    for k, (i, j) in enumerate(pairs):
        for si, sj in ((1, -1), (-1, 1)) if kind == "tv" else ((1, 0), (0, 1)):
            a = np.zeros(n + m)
            a[n + k], a[i], a[j] = 1.0, a[i] - si, a[j] - sj
            A.append(a)
    A = np.array(A).reshape(-1, n + m)

    def f(z):
        return 0.5 * np.sum((z[:n] - theta) ** 2) + lam * np.sum(z[n:])

    def jac(z):
        return np.concatenate([z[:n] - theta, np.full(m, lam)])

    z0 = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0)])
    cons = [{"type": "eq", "fun": lambda z: np.sum(z[:n]) - 1.0, "jac": lambda z: np.r_[np.ones(n), np.zeros(m)]}]
    if m:
        cons.append({"type": "ineq", "fun": lambda z: A @ z, "jac": lambda z: A})
    res = minimize(f, z0, jac=jac, constraints=cons, bounds=[(0, None)] * n + [(None, None)] * m, method="SLSQP",
                   options={"ftol": 1e-16, "maxiter": 1000})
    # status 8 ("positive directional derivative") = SLSQP stopped at its precision limit, at the optimum
    assert res.status in (0, 8), res.message
    return res.x[:n]


def _fused_obj(p, theta, lam):
    return 0.5 * float(((p - theta) ** 2).sum()) + lam * float((p[1:] - p[:-1]).abs().sum())


def _oscar_obj(p, theta, lam):
    n = len(p)
    pen = sum(max(abs(float(p[i])), abs(float(p[j]))) for i in range(n) for j in range(i + 1, n))
    return 0.5 * float(((p - theta) ** 2).sum()) + lam * pen


# ---- prox_TV ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["classictautstring", "dp"])
def test_prox_tv_matches_prox_tv_package(method, record_property):
    ptv = _need("prox_tv")
    record_property("oracle", f"prox-tv tv1_1d(method={method!r})")
    err = 0.0
    for x, lam in _rows(1):
        ours = S.prox_tv(x, lam)
        ref = ptv.tv1_1d(x.numpy().copy(), lam, method=method)
        err = max(err, float(np.abs(ours.numpy() - ref).max()))
    _report(f"prox-tv tv1_1d(method={method!r})", err)
    assert err <= 1e-6


def test_prox_tv_kkt_certificate(record_property):
    """x = prox_TV(θ) iff θ − x = λDᵀs with s_k ∈ sign(x_{k+1} − x_k) ((Dx)_k = x_{k+1} − x_k), i.e. iff the partial
    sums u_k = Σ_{i≤k} (θ_i − x_i) = −λ s_k satisfy |u_k| ≤ λ, u_k = −λ·sign(x_{k+1} − x_k) at every jump, and
    Σ(θ − x) = 0: an exact optimality check, independent of any algorithm."""
    record_property("oracle", "KKT certificate of prox_TV")
    for x, lam in _rows(2, count=200, nmax=40):
        y = S.prox_tv(x, lam)
        u = torch.cumsum(x - y, 0)
        tol = 1e-9 * (1 + x.abs().max())
        assert abs(float(u[-1])) <= tol
        d = y[1:] - y[:-1]
        assert bool((u[:-1].abs() <= lam + tol).all())
        jump = d != 0
        assert torch.allclose(u[:-1][jump], -lam * torch.sign(d[jump]), atol=float(tol), rtol=0)


# ---- fusedmax ---------------------------------------------------------------------------------------------------


def test_fusedmax_matches_torchsparseattn_forward_and_backward(record_property):
    tsa = _need("torchsparseattn")
    from torchsparseattn.sparsemax import project_simplex, sparsemax_grad

    record_property("oracle", "torchsparseattn 0.2 FusedProxFunction + project_simplex / project_jv + sparsemax_grad; "
                              "at λ = 0 sparsemax_grad alone")
    g = torch.Generator().manual_seed(3)
    err_f = err_b = 0.0
    zero_rows = 0
    for x, lam in _rows(3):
        v = tsa.FusedProxFunction(lam).project(x)
        ref = project_simplex(v)
        xr = x.clone().requires_grad_(True)
        ours = S.fusedmax(xr, lam)
        err_f = max(err_f, float((ours.detach() - ref).abs().max()))
        if len(x) == 1:
            continue
        dout = torch.randn(len(x), generator=g, dtype=torch.float64)
        (gx,) = torch.autograd.grad(ours, xr, dout)
        if lam == 0:  # prox_TV is the identity: fusedmax = sparsemax, Jacobian and all (module docstring above)
            zero_rows += 1
            gref = sparsemax_grad(dout, ref)
        else:
            gref = tsa.FusedProxFunction(lam).project_jv(sparsemax_grad(dout, ref), v)
        err_b = max(err_b, float((gx - gref).abs().max()))
    _report("torchsparseattn 0.2 fusedmax forward", err_f)
    _report(f"torchsparseattn 0.2 fusedmax backward ({zero_rows} rows at λ = 0 against sparsemax_grad)", err_b)
    assert zero_rows >= 5
    assert err_f <= 1e-6 and err_b <= 1e-6


def test_fusedmax_and_oscarmax_at_lambda_zero_are_sparsemax(record_property):
    """λ = 0 is sparsemax, forward and backward (ties and all-equal rows included), against the entmax package."""
    entmax = _need("entmax")
    record_property("oracle", "entmax.sparsemax (forward and autograd backward)")
    g = torch.Generator().manual_seed(16)
    err = 0.0
    for x, _ in _rows(16):
        dout = torch.randn(len(x), generator=g, dtype=torch.float64)
        xe = x.clone().requires_grad_(True)
        ref = entmax.sparsemax(xe, dim=-1)
        (gref,) = torch.autograd.grad(ref, xe, dout)
        for f in (S.fusedmax, S.oscarmax):
            xr = x.clone().requires_grad_(True)
            w = f(xr, 0.0)
            (gx,) = torch.autograd.grad(w, xr, dout)
            err = max(err, float((w - ref).detach().abs().max()), float((gx - gref).abs().max()))
    _report("entmax.sparsemax at λ = 0", err)
    assert err <= 1e-12


def test_sparsemax_threshold_tie_terminates_and_is_exact(record_property):
    """A row whose prox lands an entry exactly at sparsemax's threshold (up to one rounding). The plain Michelot
    iteration cycled for ever on it (the support grew back by that entry, then shrank, ...); the kernel's iteration
    now only shrinks its support, so it ends by construction. The entry's weight must be exactly 0 (not 1e-16), or
    the backward pass, which reads the support from P > 0, would use a different support than the forward."""
    tsa = _need("torchsparseattn")
    from torchsparseattn.sparsemax import project_simplex, sparsemax_grad

    record_property("oracle", "torchsparseattn 0.2 prox_tv1d + project_simplex + project_jv")
    x = torch.tensor([0.5, -0.5, -2.0, -1.5, 0.0, -0.5, 1.0, -1.0, 1.5, -0.0], dtype=torch.float64)
    v = tsa.FusedProxFunction(0.3).project(x)
    ref = project_simplex(v)
    dout = torch.linspace(-1, 1, 10, dtype=torch.float64)
    gref = tsa.FusedProxFunction(0.3).project_jv(sparsemax_grad(dout, ref), v)
    for dt in (torch.float64, torch.float32):
        xr = x.to(dt).requires_grad_(True)
        w = S.fusedmax(xr, 0.3)
        assert float(w[0].detach()) == 0.0, w
        (gx,) = torch.autograd.grad(w, xr, dout.to(dt))
        tol = 1e-12 if dt == torch.float64 else 1e-6
        torch.testing.assert_close(w.detach().double(), ref, atol=tol, rtol=0)
        torch.testing.assert_close(gx.double(), gref, atol=tol, rtol=0)


def test_import_loads_no_kernel_and_first_use_loads_the_prox_kernel():
    """``import structattn`` loads no backend module (no compiler runs) and not the entmax package; the first
    fusedmax on a CPU tensor loads the C prox kernel's module."""
    code = textwrap.dedent(
        """
        import sys, torch, structattn
        mods = lambda: [m in sys.modules for m in ("structattn.ops.kernels.cpu_prox", "entmax", "triton")]
        print(mods())
        structattn.fusedmax(torch.zeros(1, 3), 0.1)
        print(mods())
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[False, False, False]", "[True, False, False]"], proc.stdout


def test_kinds_agree_with_the_kernel_module():
    assert (S.TV, S.FUSEDMAX, S.OSCARMAX) == (K.TV, K.FUSEDMAX, K.OSCARMAX)


def test_fusedmax_is_the_argmin_brute_force_qp(record_property):
    _need("scipy")
    record_property("oracle", "brute-force QP (scipy SLSQP) for fusedmax")
    err = 0.0
    for x, lam in _rows(4, count=40, nmax=7):
        n = len(x)
        qp = torch.from_numpy(_qp(x.numpy(), lam, [(i, i + 1) for i in range(n - 1)], "tv"))
        ours = S.fusedmax(x, lam)
        assert _fused_obj(ours, x, lam) <= _fused_obj(qp, x, lam) + 1e-12
        err = max(err, float((ours - qp).abs().max()))
    _report("brute-force QP (scipy SLSQP), fusedmax", err)
    assert err <= 1e-6


# ---- oscarmax ---------------------------------------------------------------------------------------------------


def test_oscarmax_is_the_argmin_brute_force_qp(record_property):
    _need("scipy")
    record_property("oracle", "brute-force QP (scipy SLSQP) for oscarmax")
    err = 0.0
    for x, lam in _rows(5, count=40, nmax=6):
        n = len(x)
        qp = torch.from_numpy(_qp(x.numpy(), lam, list(itertools.combinations(range(n), 2)), "oscar"))
        ours = S.oscarmax(x, lam)
        assert _oscar_obj(ours, x, lam) <= _oscar_obj(qp, x, lam) + 1e-12
        err = max(err, float((ours - qp).abs().max()))
    _report("brute-force QP (scipy SLSQP), oscarmax", err)
    assert err <= 1e-6


def test_oscarmax_example_where_the_authors_composition_is_not_the_argmin(record_property):
    """θ = (0.246, 0.246, −0.391), λ = 0.2: our oscarmax is the QP's argmin; torchsparseattn's sparsemax ∘ prox_OSCAR
    is not. Expected values by hand (exact arithmetic):

    * ours: θ sorted (0.246, 0.246, −0.391), u = θ − λ(2, 1, 0) = (−0.154, 0.046, −0.391); PAV pools the first two:
      v = (−0.054, −0.054, −0.391); sparsemax keeps all three, τ = (Σv − 1)/3 = −1.499/3, so
      p = (−0.054 − τ, −0.054 − τ, −0.391 − τ) = (0.44567, 0.44567, 0.10867), objective 0.43210;
    * the composition: |θ| sorted (0.391, 0.246, 0.246) minus λ(2, 1, 0) = (−0.009, 0.046, 0.246), pooled to
      a = 0.283/3 everywhere, signs put back: (a, a, −a); sparsemax: τ = (a − 1)/3, p = ((2a + 1)/3, (2a + 1)/3,
      (1 − 4a)/3) = (0.39622, 0.39622, 0.20756), objective 0.43943 (a grid search had quoted 0.396/0.207 and
      objectives 0.4319 / 0.4392).
    """
    tsa = _need("torchsparseattn")
    _need("scipy")
    from torchsparseattn.sparsemax import project_simplex

    record_property("oracle", "brute-force QP (scipy SLSQP) + torchsparseattn 0.2 OscarProxFunction/project_simplex")
    x, lam = torch.tensor([0.246, 0.246, -0.391], dtype=torch.float64), 0.2
    ours = S.oscarmax(x, lam)
    comp = project_simplex(tsa.OscarProxFunction(beta=lam).project(x))
    qp = torch.from_numpy(_qp(x.numpy(), lam, [(0, 1), (0, 2), (1, 2)], "oscar"))
    print(f"oracle: QP {qp.tolist()}, ours {ours.tolist()}, torchsparseattn composition {comp.tolist()}")
    tau = (-0.054 * 2 - 0.391 - 1) / 3
    mine = torch.tensor([-0.054 - tau, -0.054 - tau, -0.391 - tau], dtype=torch.float64)
    a = 0.283 / 3
    theirs = torch.tensor([(2 * a + 1) / 3, (2 * a + 1) / 3, (1 - 4 * a) / 3], dtype=torch.float64)
    torch.testing.assert_close(ours, qp, atol=1e-7, rtol=0)
    torch.testing.assert_close(ours, mine, atol=1e-12, rtol=0)
    # torchsparseattn's OSCAR prox returns float32-rounded values (errors ~1e-8 here)
    torch.testing.assert_close(comp, theirs, atol=1e-6, rtol=0)
    assert _oscar_obj(ours, x, lam) <= _oscar_obj(qp, x, lam) + 1e-12
    assert _oscar_obj(ours, x, lam) < _oscar_obj(comp, x, lam) - 5e-3


def test_oscarmax_equals_authors_composition_where_it_is_exact(record_property):
    """Where prox_OSCAR neither folds a sign nor clips (all its outputs positive), the two agree: a cross-check of
    our PAV and grouping against the authors' isotonic regression, ties and all-equal rows included."""
    tsa = _need("torchsparseattn")
    from torchsparseattn.sparsemax import project_simplex

    record_property("oracle", "torchsparseattn 0.2 OscarProxFunction + project_simplex (rows without sign folding)")
    err, used = 0.0, 0
    for x, lam in _rows(6, count=200):
        x = x + 3.0  # positive scores, far above the OSCAR weights
        lam = min(lam, 0.1)
        v = tsa.OscarProxFunction(beta=lam).project(x)
        if not bool((v > 0).all()):
            continue
        used += 1
        err = max(err, float((S.oscarmax(x, lam) - project_simplex(v)).abs().max()))
    _report(f"torchsparseattn 0.2 sparsemax∘prox_OSCAR on {used} rows where it is exact", err)
    assert used > 100 and err <= 1e-6


# ---- C kernel vs the plain-Python reference, both dtypes ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", [S.TV, S.FUSEDMAX, S.OSCARMAX])
@pytest.mark.parametrize("N,T", [(40, 17), (8, 130)])  # OSCAR: rows of <= 96 real positions sort by ranks, longer merge
def test_kernel_matches_python_reference(kind, dtype, N, T):
    if not K.available():
        pytest.skip(f"no C kernel: {K.unavailable_reason()}")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, T, generator=g, dtype=torch.float64)
    x[::3] = torch.round(x[::3] * 2) / 2
    x[5] = 0.25
    mask = torch.rand(N, T, generator=g) < (0.3 if T < 100 else 0.05)
    mask[7] = True
    x = x.to(dtype)
    lam = 0.2 if kind != S.OSCARMAX or T < 100 else 0.01  # OSCAR's weights grow with n: keep some rows unpooled
    _, P, G = K.forward(x.contiguous(), mask.contiguous(), kind, lam)
    _, Pr, Gr = S._reference_forward(x, mask, kind, lam)
    torch.testing.assert_close(P, Pr, atol=1e-12 if dtype == torch.float64 else 2e-6, rtol=0)
    if dtype == torch.float64:
        # group labels may be named differently; the partition must be the same
        same = G[:, :, None] == G[:, None, :]
        assert torch.equal(same, Gr[:, :, None] == Gr[:, None, :])
    gout = torch.randn(N, T, generator=g, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(K.backward(gout, P, G, kind != S.TV), S._backward_tensor(gout, P, G, kind != S.TV),
                               atol=1e-12 if dtype == torch.float64 else 1e-6, rtol=0)


def test_without_compiler_the_reference_runs(monkeypatch):
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(8), dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(6, 9, dtype=torch.bool)
    mask[1, :4] = True
    outs = []
    for avail in (True, False):
        monkeypatch.setattr(K, "available", lambda a=avail: a)
        w = S.fusedmax(x, 0.2, mask)
        outs.append((w, *torch.autograd.grad((w * torch.arange(9.0, dtype=w.dtype)).sum(), x)))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-12, rtol=0)


# ---- derivatives ------------------------------------------------------------------------------------------------


def _separated(B, T, seed):
    """Scores away from ties and kinks: distinct values on a 0.07 grid, shuffled."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g).to(torch.float64) * 0.07 + 0.013 * b for b in range(B)])


@pytest.mark.parametrize("fn", ["prox_tv", "fusedmax", "oscarmax", "fusedmax_attention", "oscarmax_attention",
                                "entmax15_attention"])
def test_gradcheck_float64(fn):
    if fn == "entmax15_attention":
        _need("entmax")
    x = _separated(4, 7, seed=9).requires_grad_(True)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[1, :2] = True
    mask[2, 5:] = True
    mask[3, 3] = True
    f = {
        "prox_tv": lambda s: S.prox_tv(s, 0.05, mask),
        "fusedmax": lambda s: S.fusedmax(s, 0.05, mask),
        "oscarmax": lambda s: S.oscarmax(s, 0.02, mask),
        "fusedmax_attention": lambda s: fusedmax_attention(s, mask, lam=0.05),
        "oscarmax_attention": lambda s: oscarmax_attention(s, mask, lam=0.02),
        "entmax15_attention": lambda s: entmax15_attention(s, mask),
    }[fn]
    if fn in ("prox_tv", "fusedmax", "fusedmax_attention"):
        # the TV prox must actually fuse some neighbours here, or this would only test sparsemax
        assert (S.prox_tv(x.detach(), 0.05, mask)[0].unique().numel()) < 7
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("fn", ["prox_tv", "fusedmax", "oscarmax", "entmax15"])
def test_double_backward_gradgradcheck(fn):
    """create_graph: the vector-Jacobian product is itself differentiable — in the incoming gradient, and in x, where
    its derivative is 0 almost everywhere (the maps are piecewise linear; entmax15's is not, and is checked too)."""
    if fn == "entmax15":
        _need("entmax")
    # generic scores (not _separated's 0.07 grid, where exact multiples put TV's dual variables on ±λ — kinks at
    # which the finite differences of the second pass jump), with fused groups and zeros in the outputs
    x = (torch.randn(3, 6, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 0.3)
    assert S.fusedmax(x, 0.05).unique().numel() < 15 and bool((S.oscarmax(x, 0.02) == 0).any())
    x.requires_grad_(True)
    f = {"prox_tv": lambda s: S.prox_tv(s, 0.05), "fusedmax": lambda s: S.fusedmax(s, 0.05),
         "oscarmax": lambda s: S.oscarmax(s, 0.02), "entmax15": lambda s: entmax15_attention(s, None)}[fn]
    assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-7)


# ---- attention functions: padding, ties, all-equal rows, modules ---------------------------------------------------


ATTN = {
    "fusedmax": lambda s, m: fusedmax_attention(s, m, lam=0.1),
    "oscarmax": lambda s, m: oscarmax_attention(s, m, lam=0.05),
    "entmax15": entmax15_attention,
    "sparsemax": sparsemax_attention,
}


def _layouts(B=5, T=8):
    m = torch.zeros(B, T, dtype=torch.bool)
    m[1, 5:] = True  # right
    m[2, :3] = True  # left
    m[3, [1, 4, 6]] = True  # holes
    m[4] = True  # no real position
    return m


@pytest.mark.parametrize("name", list(ATTN))
def test_padding_any_layout_equals_unpadded(name):
    if name == "entmax15":
        _need("entmax")
    f = ATTN[name]
    g = torch.Generator().manual_seed(11)
    s = torch.randn(5, 8, generator=g, dtype=torch.float64)
    s[0] = torch.round(s[0])  # ties
    s[1, :5] = 0.7  # an all-equal real part
    m = _layouts()
    s_pad = s.masked_fill(m, float("nan"))  # padded entries are never read
    s_pad = s_pad.requires_grad_(True)
    w = f(s_pad, m)
    gw = torch.randn(5, 8, generator=g, dtype=torch.float64)
    (gs,) = torch.autograd.grad(w, s_pad, gw)
    assert bool((w[m] == 0).all()) and bool((gs[m] == 0).all()) and not bool(gs.isnan().any())
    for b in range(4):
        real = ~m[b]
        sb = s[b, real][None].clone().requires_grad_(True)
        wb = f(sb, None)
        (gb,) = torch.autograd.grad(wb, sb, gw[b, real][None])
        torch.testing.assert_close(w[b, real], wb[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(gs[b, real], gb[0], atol=1e-12, rtol=0)
        assert abs(float(w[b].detach().sum()) - 1) < 1e-12
    assert float(w[4].detach().abs().sum()) == 0.0


@pytest.mark.parametrize("name", ["fusedmax", "oscarmax"])
def test_all_equal_rows_are_uniform(name):
    s = torch.full((3, 6), 2.5, dtype=torch.float64, requires_grad=True)
    w = ATTN[name](s, None)
    torch.testing.assert_close(w, torch.full_like(w, 1 / 6), atol=1e-15, rtol=0)
    (gs,) = torch.autograd.grad(w[:, 0].sum(), s)
    assert bool(gs.isfinite().all())


def test_entmax15_attention_matches_entmax_and_its_sparsemax_matches_ours(record_property):
    entmax = _need("entmax")
    record_property("oracle", "entmax 1.3 entmax15 and sparsemax on the unpadded rows")
    g = torch.Generator().manual_seed(12)
    s = torch.randn(5, 8, generator=g, dtype=torch.float64)
    s[0] = torch.round(s[0])
    s[2] = 1.0  # all equal
    m = _layouts()
    err_e = err_s = 0.0
    for b in range(4):
        real = ~m[b]
        err_e = max(err_e, float((entmax15_attention(s, m)[b, real] - entmax.entmax15(s[b, real], dim=-1)).abs().max()))
        err_s = max(err_s, float((sparsemax_attention(s, m)[b, real] - entmax.sparsemax(s[b, real], dim=-1)).abs().max()))
    _report("entmax.entmax15", err_e)
    _report("entmax.sparsemax (cross-check of sparsemax_attention)", err_s)
    assert err_e <= 1e-12 and err_s <= 1e-12


def _entmax_rows(dtype, seed):
    """(B, T) rows of every kind for 1.5-entmax: scales from 0.01 (full support) to 30 (one or two entries), rounded
    rows (ties), all-equal rows, a row with one real entry, and the -inf layouts (right, left, holes) beside them."""
    g = torch.Generator().manual_seed(seed)
    B, T = 64, 23
    scale = torch.logspace(-2, 1.5, B, dtype=torch.float64)[torch.randperm(B, generator=g)]
    x = torch.randn(B, T, generator=g, dtype=torch.float64) * scale[:, None]
    x[::5] = torch.round(x[::5] * 2) / 2  # ties
    x[1] = 0.3  # all equal
    x[2] = torch.full((T,), 2.0, dtype=torch.float64)
    x[2, 7] = 2.0 + 1e-3  # nearly all equal
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        layout = b % 4
        if layout == 1:
            mask[b, T - 1 - b % 11:] = True  # right
        elif layout == 2:
            mask[b, : 1 + b % 13] = True  # left
        elif layout == 3:
            mask[b, torch.randperm(T, generator=g)[: 1 + b % 17]] = True  # holes
    mask[5, 1:] = True  # one real entry
    return x.to(dtype), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entmax15_matches_the_entmax_package_with_inf_padding(dtype, record_property):
    """Our exact 1.5-entmax (sort-free C kernel on CPU, and the tensor algorithm other devices use) against the
    `entmax` package: -inf padding of any layout, the same rows with a mask, and each row with its padding removed;
    weights and gradients, to 1e-6 (float32) / 1e-12 (float64)."""
    entmax = _need("entmax")
    from structattn.ops import entmax as E

    record_property("oracle", f"entmax {getattr(entmax, '__version__', '?')} entmax15 (forward and its backward)")
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    x, mask = _entmax_rows(dtype, seed=31)
    xinf = x.masked_fill(mask, float("-inf"))
    gout = torch.randn(x.shape, generator=torch.Generator().manual_seed(32), dtype=torch.float64).to(dtype)

    def value_grad(f, inp):
        inp = inp.clone().requires_grad_(True)
        w = f(inp)
        (gx,) = torch.autograd.grad(w, inp, gout)
        return w.detach(), gx

    ref_w, ref_g = value_grad(lambda s: entmax.entmax15(s, dim=-1), xinf)
    ref_g = ref_g.masked_fill(mask, 0.0)
    assert bool(ref_w.isfinite().all()) and bool((ref_w[mask] == 0).all())
    assert int((ref_w == 0).sum()) > int(mask.sum()) + 100  # sparse outputs, not only padding: supports are tested
    assert int(((ref_w > 0).sum(-1) == 1).sum()) > 2  # and one-entry supports
    kernel = E._kernel().available()
    got = {
        "-inf padding": value_grad(lambda s: E.entmax15(s), xinf),
        "mask": value_grad(lambda s: entmax15_attention(s, mask), x),
        "mask, NaN under the padding": value_grad(lambda s: entmax15_attention(s, mask), x.masked_fill(mask, float("nan"))),
        "tensor algorithm (other devices)": (E._forward_tensor(xinf, None),
                                             E._backward_tensor(gout, E._forward_tensor(xinf, None))),
    }
    err = 0.0
    for name, (w, gx) in got.items():
        torch.testing.assert_close(w, ref_w, atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(gx.masked_fill(mask, 0.0), ref_g, atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")
        assert bool((w[mask] == 0).all())
        err = max(err, float((w - ref_w).abs().max()), float((gx.masked_fill(mask, 0.0) - ref_g).abs().max()))
    for b in range(x.shape[0]):  # the row with its padding removed: the same weights
        real = ~mask[b]
        torch.testing.assert_close(E.entmax15(x[b, real]), ref_w[b, real], atol=tol, rtol=0)
    _report(f"entmax.entmax15 ({dtype}, C kernel: {kernel})", err)


def test_entmax15_kernel_threshold_paths_and_degenerate_rows():
    """The kernel's Newton search and its sorted finish give the package's weights on rows built to end in each
    (ties at the threshold, huge and tiny spreads, long rows); +inf/NaN rows and all -inf rows are NaN (as
    torch.softmax gives), rows without real positions all 0."""
    entmax = _need("entmax")
    from structattn.ops import entmax as E

    g = torch.Generator().manual_seed(33)
    rows = [torch.randn(500, generator=g, dtype=torch.float64) * s for s in (1e-8, 1e-3, 1.0, 3.0, 1e3)]
    rows += [torch.tensor([0.0, 0.0, -2.0, -2.0, -2.0], dtype=torch.float64),  # entries exactly at z = -1
             torch.tensor([1.0, 1.0 - 2 / 3 ** 0.5 * 2, 0.5], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    for r in rows:
        for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
            torch.testing.assert_close(E.entmax15(r.to(dt)), entmax.entmax15(r.to(dt), dim=-1), atol=tol, rtol=0)
    x = torch.tensor([[1.0, float("inf"), 0.0], [1.0, float("nan"), 0.0], [float("-inf")] * 3, [1.0, 2.0, 3.0]])
    m = torch.tensor([[False] * 3, [False] * 3, [False] * 3, [True] * 3])
    w = entmax15_attention(x, m)
    assert bool(w[:3].isnan().all()) and bool((w[3] == 0).all())
    assert bool(E._forward_tensor(x, m)[:3].isnan().all()) and bool((E._forward_tensor(x, m)[3] == 0).all())
    assert bool(torch.softmax(x[:3], -1).isnan().all())  # the same convention (the package raises on such rows)


def test_entmax15_does_not_need_the_package_at_run_time():
    """The package is the tests' oracle only: with it unimportable, entmax15_attention runs (forward, backward)."""
    code = textwrap.dedent(
        """
        import sys, torch
        sys.modules["entmax"] = None  # import entmax now raises ImportError
        from structattn.attention import entmax15_attention
        x = torch.randn(3, 5, requires_grad=True)
        w = entmax15_attention(x, torch.tensor([[False] * 5, [True, False, False, False, True], [True] * 5]))
        w.pow(2).sum().backward()
        print(round(float(w.sum()), 5), bool(x.grad.isfinite().all()))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2.0", "True"], proc.stdout


def test_entmax15_dim_and_bad_input():
    from structattn.ops import entmax as E

    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(34), dtype=torch.float64)
    torch.testing.assert_close(E.entmax15(x, dim=1), E.entmax15(x.transpose(1, 2)).transpose(1, 2))
    w = E.entmax15(x.to(torch.bfloat16), dim=0)
    assert w.dtype == torch.bfloat16 and torch.allclose(w.double().sum(0), torch.ones(4, 5, dtype=torch.float64), atol=2e-2)
    with pytest.raises(TypeError):
        E.entmax15(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="bool"):
        E.entmax15(x, mask=torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        E.entmax15(x, mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        entmax15_attention(x, None)


def test_modules_and_top_level_names():
    torch.manual_seed(13)
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)
    pm = torch.zeros(3, 5, dtype=torch.bool)
    pm[1, 3:] = True
    for cls, fn in ((FusedmaxAttention, structattn.fusedmax_attention),
                    (OscarmaxAttention, structattn.oscarmax_attention),
                    (Entmax15Attention, structattn.entmax15_attention)):
        if cls is Entmax15Attention:
            _need("entmax")
        att = cls(4, 6).double()
        ctx, w = att(q, k, pm)
        scores = torch.bmm(k, att.proj(q).unsqueeze(2)).squeeze(2)
        tau = float(att.temperature[0])  # the module normalises s/τ (options.DEFAULT_TEMPERATURE: fusedmax 10)
        name = {FusedmaxAttention: "fusedmax", OscarmaxAttention: "oscarmax", Entmax15Attention: "entmax15"}[cls]
        assert tau == DEFAULT_TEMPERATURE[name]
        torch.testing.assert_close(w, fn(scores / tau, pm), atol=1e-12, rtol=0)
        torch.testing.assert_close(ctx, torch.bmm(w.unsqueeze(1), k).squeeze(1))
    assert FusedmaxAttention(4, 6).lam == S.DEFAULT_FUSEDMAX_LAMBDA
    assert OscarmaxAttention(4, 6, lam=0.2).lam == 0.2
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(structattn.Fusedmax(0.2)(x), structattn.fusedmax(x, 0.2))
    torch.testing.assert_close(structattn.Oscarmax(0.2)(x), structattn.oscarmax(x, 0.2))
    torch.testing.assert_close(structattn.ProxTV(0.2)(x), structattn.prox_tv(x, 0.2))
    assert "lam=0.2" in repr(structattn.Oscarmax(0.2))


def test_half_precision_computed_in_float32():
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(14))
    for dt in (torch.float16, torch.bfloat16):
        w = fusedmax_attention(x.to(dt), None)
        assert w.dtype == dt
        torch.testing.assert_close(w.float(), fusedmax_attention(x.to(dt).float(), None).to(dt).float())


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fusedmax", "oscarmax"])
def test_bad_input_errors(name):
    f = {"fusedmax": fusedmax_attention, "oscarmax": oscarmax_attention}[name]
    s = torch.randn(2, 4)
    for lam in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam"):
            f(s, None, lam=lam)
    for lam in (True, "0.1", None):
        with pytest.raises(TypeError, match="lam"):
            f(s, None, lam=lam)
    with pytest.raises(ValueError, match="lam must be a scalar"):
        f(s, None, lam=torch.ones(2))
    with pytest.raises(TypeError):
        f(torch.ones(2, 4, dtype=torch.long), None)
    with pytest.raises(ValueError, match="shape"):
        f(torch.randn(2, 3, 4), None)
    with pytest.raises(TypeError, match="bool"):
        f(s, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="shape"):
        f(s, torch.zeros(2, 5, dtype=torch.bool))
    bad = s.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        f(bad, None)
    m = torch.zeros(2, 4, dtype=torch.bool)
    m[1, 2] = True  # the same entry as padding is fine
    assert bool(f(bad, m).isfinite().all())
    with pytest.raises(TypeError):
        S.fusedmax([1.0, 2.0], 0.1)
    with pytest.raises(ValueError, match="mask"):
        S.oscarmax(torch.randn(3), 0.1, torch.zeros(4, dtype=torch.bool))


# ---- torch.compile ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fusedmax", "oscarmax", "entmax15"])
def test_compile_fullgraph_equals_eager(name):
    if name == "entmax15":
        _need("entmax")
    f = ATTN[name]
    g = torch.Generator().manual_seed(15)
    s = torch.randn(5, 8, generator=g, dtype=torch.float64)
    m = _layouts()

    def run(fn):
        x = s.clone().requires_grad_(True)
        w = fn(x, m)
        (gx,) = torch.autograd.grad((w * torch.arange(8, dtype=w.dtype)).sum(), x)
        return w.detach(), gx

    torch._dynamo.reset()
    got = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    ref = run(f)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
