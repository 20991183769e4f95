r"""Sparsemax with a structured penalty: the 1-D total-variation prox, fusedmax and oscarmax.

M. Blondel's lecture "Structured Attention & Differentiable Dynamic Programming" (4 January 2019,
``shared/seeds/004_*``; slides "Fusedmax attention", "Fusedmax: computation", "Jacobian of prox_TV", "Oscarmax
attention"), after Niculae & Blondel, "A Regularized Framework for Sparse and Structured Neural Attention" (NeurIPS
2017), defines for a row θ ∈ R^n of scores the mappings argmin_{p ∈ △} ½‖p − θ‖² + λ·R(p) — argmax_Ω(θ) with
Ω(p) = ½‖p‖² + λR(p) — with

* **fusedmax** — R(p) = Σ_{i<n} |p_{i+1} − p_i| (fused lasso / 1-D total variation): contiguous positions get equal
  weights, segments of the source are attended as a whole;
* **oscarmax** — R(p) = Σ_{i<j} max(|p_i|, |p_j|) (OSCAR without its ℓ1 part): positions with close scores get
  equal weights, wherever they are (clusters, not segments).

λ ≥ 0 is a fixed hyper-parameter (no gradient w.r.t. it). λ = 0 gives sparsemax for both.

**prox_TV** (:func:`prox_tv`): argmin_{x ∈ R^n} ½‖x − θ‖² + λ Σ|x_{i+1} − x_i|, computed exactly by Condat's direct
algorithm (L. Condat, IEEE Signal Processing Letters 20(11), 2013; its published routine, in C). The lecture's
slide writes the prox with ‖x − y‖² (no ½); with that scaling its λ is twice ours. The groups of the solution are its
maximal runs of equal value; the Jacobian of prox_TV is the averaging within each group (the proposition of Niculae &
Blondel 2017 on the lecture's slide "Jacobian of prox_TV": block-diagonal, each block the constant matrix 1/|G|). At
λ = 0 the prox is the identity and every position is its own group, even where inputs tie.

**fusedmax** (:func:`fusedmax`) = sparsemax(prox_TV(θ)), *exactly* the argmin above (the proposition of Niculae &
Blondel 2017 on the slide "Fusedmax: computation", "fusedmax = sparsemax ∘ prox_TV"; the slide adds "not true for all
regularizers!" — it is not for OSCAR, below). Why: let v = prox_TV(θ) and p = sparsemax(v) = max(v − τ, 0).
Then θ − v ∈ λ∂TV(v) and v − p ∈ N_△(p). p is a non-decreasing function of v entrywise, so wherever
p_{i+1} ≠ p_i the jump has the sign of v_{i+1} − v_i, and ∂TV(v) ⊆ ∂TV(p) (where p is flat the subdifferential
allows any slope in [−1, 1]). Adding, θ − p ∈ λ∂TV(p) + N_△(p): the optimality condition of the fusedmax problem.
Backward: J = J_sparsemax(v)·J_TV(θ); as a vector-Jacobian product, h = s ⊙ (g − mean_s g) (s = the support of p),
then the average of h over each fused group.

**oscarmax** (:func:`oscarmax`) is the *exact* argmin of the lecture's formula over the simplex, computed as
sparsemax(v) with v the pool-adjacent-violators fit below. This is **not** what the authors' code (torchsparseattn
0.2, ``Oscarmax``) computes: that is sparsemax ∘ prox_OSCAR, with the unconstrained OSCAR prox (sign folding, a
non-negativity clip), and it is not always the argmin: θ = (0.246, 0.246, −0.391), λ = 0.2 gives (0.396, 0.396,
0.207) with objective 0.4392 by the composition, while the argmin is (0.4457, 0.4457, 0.1087), objective 0.4319
(tests/test_structured_sparsemax.py checks both against a QP solver). Derivation (n real positions):

1. On △, p ≥ 0, so Σ_{i<j} max(p_i, p_j) = Σ_k (n − k)·p_(k) with p_(1) ≥ … ≥ p_(n) (the k-th largest is the max
   of its pairs with the n − k smaller ones): an ordered weighted ℓ1 norm with weights w_k = λ(n − k), non-increasing.
2. The minimiser p is ordered like θ: swapping two entries keeps the penalty and the constraint and, if p_i < p_j
   while θ_i > θ_j, lowers ‖p − θ‖²; tied θ_i = θ_j give p_i = p_j (the minimiser is unique and the problem is
   symmetric in i, j). So with θ sorted decreasingly, the problem is min ½‖p − u‖² over △ ∩ K, u = θ_sorted − w,
   K = {p_1 ≥ … ≥ p_n} (on K the penalty is the linear ⟨w, p⟩).
3. proj_{△∩K}(u) = sparsemax(proj_K(u)): let v = proj_K(u) (isotonic regression, by PAV: v is the mean of u on
   each pooled block) and p = sparsemax(v) = max(v − τ, 0), which lies in K (sparsemax keeps the order). For
   q ∈ △ ∩ K, ⟨u − p, q − p⟩ = ⟨u − v, q⟩ − ⟨u − v, p⟩ + ⟨v − p, q − p⟩: the first term is ≤ 0 (K is a convex cone
   and v its projection), the second is 0 (p is constant on each block, where u − v sums to 0), the third ≤ 0
   (p is the projection of v on △). So p is the projection.

So oscarmax(θ) = sparsemax(v), v put back in θ's order; no sign folding, no clipping. Backward: v is the block
average of u, so J_v is the averaging over the pooled groups (ties of v), then sparsemax's Jacobian: the same
vector-Jacobian product as for fusedmax with the OSCAR groups.

Padding (``mask`` True at padded positions, any layout): the real positions of a row are compacted in order and the
problem is solved over them only — the TV chain links consecutive *real* positions, and OSCAR's weights use n = the
number of real positions. Padded outputs are exactly 0; a row without real positions is all 0.

sparsemax's threshold is found by Michelot's (1986) iteration (the lecture's table: sparsemax forward by Michelot,
prox_TV by Condat), started from the entries within 1 of the maximum and made monotone (each pass filters only the
previous pass's survivors: the plain iteration can cycle for ever when an entry lies at the threshold up to one
rounding); entries off the final support get exactly 0.

Implementations: one C call per pass over all rows (``kernels/_cpu_prox_source.py``) on CPU, float32/float64;
half-precision inputs are computed in float32; tensors on another device make a round trip through the host (the
proxes are sequential within a row: no GPU kernel here). Without a C compiler a plain-Python reference runs (slow;
also the reference of the tests). Eager mode enters the kernels through a private ``autograd.Function``; a graph
being compiled through the custom ops ``structattn::prox_sparsemax`` and ``::prox_sparsemax_backward``. A gradient of
the gradient (``create_graph``) is computed with tensor operations (the map is piecewise linear: its second
derivative is 0 almost everywhere).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


__all__ = ["prox_tv", "fusedmax", "oscarmax", "ProxTV", "Fusedmax", "Oscarmax", "check_lambda",
           "DEFAULT_FUSEDMAX_LAMBDA", "DEFAULT_OSCARMAX_LAMBDA"]

#: The kinds of :func:`structattn.ops.kernels.cpu_prox.forward` (same numbers there; a test checks): the TV prox
#: alone, sparsemax ∘ prox_TV, the exact OSCAR argmin over the simplex.
TV, FUSEDMAX, OSCARMAX = 0, 1, 2


_KERNEL = None


def _kernel():
    """The C kernels' module, imported on first use: ``import structattn`` loads no backend module and runs no
    compiler (tests/test_backends.py), exactly as the Viterbi kernels (``kernels/registry.py``) are found. Kept in a
    global after that: an import statement costs a few µs on every forward and backward."""
    global _KERNEL
    if _KERNEL is None:
        from .kernels import cpu_prox

        _KERNEL = cpu_prox
    return _KERNEL

#: Default λ of fusedmax. Attention scores are O(1) and prox_TV fuses neighbours whose scores differ by less than
#: about 2λ, so λ = 0.1 fuses near-equal neighbours without flattening the row. (torchsparseattn's class default,
#: α = 1, fuses nearly everything at these scales.)
DEFAULT_FUSEDMAX_LAMBDA = 0.1
#: Default λ of oscarmax. OSCAR's weights grow with the length (w_1 = λ(n − 1)): λ = 0.01 keeps the largest offset
#: about 0.5 for a 50-token source; λ = 0.1 (or torchsparseattn's default β = 1) would pool nearly every score.
DEFAULT_OSCARMAX_LAMBDA = 0.01


def check_lambda(lam) -> float:
    """``lam`` as a Python float; TypeError if it is not a real number, ValueError if it is negative or not finite."""
    if isinstance(lam, Tensor):
        if lam.numel() != 1:
            raise ValueError(f"lam must be a scalar, got a tensor of shape {tuple(lam.shape)}")
        lam = lam.item()
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a real number, got {type(lam).__name__}")
    lam = float(lam)
    if not (0.0 <= lam < math.inf):  # comparisons, not math.isfinite: traceable by Dynamo (ops/smoothed_max.py)
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    return lam


def _check(x, mask) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the positions are the last one)")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor (True at padded positions)")
        if mask.shape != x.shape:
            raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device}, x on {x.device}: put them on one device")


# ---- plain-Python reference (no compiler; tests) --------------------------------------------------------------------


def _tv1d_reference(y: list[float], lam: float) -> list[float]:
    """Condat's algorithm line by line in Python (same control flow as the C routine)."""
    width = len(y)
    if lam <= 0 or width == 0:
        return list(y)
    out = [0.0] * width
    k = k0 = kplus = kminus = 0
    umin, umax = lam, -lam
    vmin, vmax = y[0] - lam, y[0] + lam
    while True:
        while k == width - 1:
            if umin < 0.0:
                while True:
                    out[k0] = vmin
                    k0 += 1
                    if k0 > kminus:
                        break
                k = kminus = k0
                vmin = y[k0]
                umin = lam
                umax = vmin + umin - vmax
            elif umax > 0.0:
                while True:
                    out[k0] = vmax
                    k0 += 1
                    if k0 > kplus:
                        break
                k = kplus = k0
                vmax = y[k0]
                umax = -lam
                umin = vmax + umax - vmin
            else:
                vmin += umin / (k - k0 + 1)
                while k0 <= k:
                    out[k0] = vmin
                    k0 += 1
                return out
        umin += y[k + 1] - vmin
        if umin < -lam:
            while True:
                out[k0] = vmin
                k0 += 1
                if k0 > kminus:
                    break
            k = kplus = kminus = k0
            vmin = y[k0]
            vmax = vmin + 2 * lam
            umin, umax = lam, -lam
            continue
        umax += y[k + 1] - vmax
        if umax > lam:
            while True:
                out[k0] = vmax
                k0 += 1
                if k0 > kplus:
                    break
            k = kplus = kminus = k0
            vmax = y[k0]
            vmin = vmax - 2 * lam
            umin, umax = lam, -lam
        else:
            k += 1
            if umin >= lam:
                kminus = k
                vmin += (umin - lam) / (kminus - k0 + 1)
                umin = lam
            if umax <= -lam:
                kplus = k
                vmax += (umax + lam) / (kplus - k0 + 1)
                umax = -lam


def _oscar_v_reference(y: list[float], lam: float) -> tuple[list[float], list[int]]:
    """v (original order) and group labels: stable decreasing sort, u_k = y_(k) − λ(n−1−k), PAV (non-increasing,
    merging strict violators), block means put back."""
    n = len(y)
    order = sorted(range(n), key=lambda i: -y[i])  # stable: ties keep their order
    blocks: list[list] = []  # [start, sum, count]
    for k, i in enumerate(order):
        blocks.append([k, y[i] - lam * (n - 1 - k), 1])
        # mean(prev) < mean(last), cross-multiplied exactly as the C kernel does, so that blocks whose means tie up
        # to rounding are pooled (or not) identically in both and the groups — hence the gradients — agree
        while len(blocks) > 1 and blocks[-2][1] * blocks[-1][2] < blocks[-1][1] * blocks[-2][2]:
            s, c = blocks[-1][1], blocks[-1][2]
            blocks.pop()
            blocks[-1][1] += s
            blocks[-1][2] += c
    v, grp = [0.0] * n, [0] * n
    for start, s, c in blocks:
        for k in range(start, start + c):
            v[order[k]], grp[order[k]] = s / c, start
    return v, grp


def _sparsemax_reference(v: list[float]) -> list[float]:
    """Sort-based projection onto the simplex (Held et al. 1974)."""
    order = sorted(range(len(v)), key=lambda i: -v[i])
    cs, tau, ksup = 0.0, 0.0, 1
    for k, i in enumerate(order, 1):
        cs += v[i]
        if v[i] > (cs - 1.0) / k:
            tau, ksup = (cs - 1.0) / k, k
    p = [0.0] * len(v)
    for i in order[:ksup]:  # exactly 0 past the support, as in the C kernel
        p[i] = max(v[i] - tau, 0.0)
    return p


def _reference_forward(x: Tensor, mask: Tensor | None, kind: int, lam: float) -> tuple[int, Tensor, Tensor]:
    """Same contract as :func:`structattn.ops.kernels.cpu_prox.forward`, in plain Python (float64 arithmetic)."""
    N, T = x.shape
    P, G = torch.zeros(N, T, dtype=x.dtype), torch.full((N, T), -1, dtype=torch.int32)
    rows, masks = x.tolist(), (None if mask is None else mask.tolist())
    bad = 0
    for b in range(N):
        idx = [t for t in range(T) if masks is None or not masks[b][t]]
        y = [rows[b][t] for t in idx]
        if not y:
            continue
        if not all(math.isfinite(a) for a in y):
            bad += 1
            continue
        if kind == OSCARMAX:
            v, grp = _oscar_v_reference(y, lam)
        else:
            v = _tv1d_reference(y, lam)
            grp = [0] * len(v)
            for i in range(1, len(v)):  # λ = 0: the identity, one group per position (as in the C kernel)
                grp[i] = i if (v[i] != v[i - 1] or not lam > 0) else grp[i - 1]
        p = v if kind == TV else _sparsemax_reference(v)
        for i, t in enumerate(idx):
            P[b, t], G[b, t] = p[i], grp[i]
    return bad, P, G


def _backward_tensor(g: Tensor, P: Tensor, G: Tensor, sparse: bool) -> Tensor:
    """The vector-Jacobian product in tensor operations (differentiable in g): sparsemax's Jacobian over the support
    (if ``sparse``), then the average over each group; 0 on padding (G < 0)."""
    real = G >= 0
    if sparse:
        s = (P > 0) & real
        sf = s.to(g.dtype)
        mean = (g * sf).sum(-1, keepdim=True) / sf.sum(-1, keepdim=True).clamp_min(1.0)
        h = torch.where(s, g - mean, torch.zeros_like(g))
    else:
        h = torch.where(real, g, torch.zeros_like(g))
    lab = G.clamp_min(0).long()
    acc = torch.zeros_like(h).scatter_add(-1, lab, h)
    cnt = torch.zeros_like(h).scatter_add(-1, lab, real.to(h.dtype))
    return torch.where(real, acc.gather(-1, lab) / cnt.gather(-1, lab).clamp_min(1.0), torch.zeros_like(h))


# ---- the kernels as one operation with its derivative ---------------------------------------------------------------


def _host(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` as a contiguous CPU tensor (of ``dtype``), without a call when it already is one: this runs on every
    forward and backward, where each skipped no-op ``.to``/``.contiguous`` saves a few µs of a ~0.5 ms call
    (``is_cpu``, not ``device.type``: no device object is built)."""
    if not t.is_cpu or (dtype is not None and t.dtype != dtype):
        t = t.to("cpu", dtype)
    return t if t.is_contiguous() else t.contiguous()


def _forward_impl(x: Tensor, mask: Tensor | None, kind: int, lam: float) -> tuple[Tensor, Tensor]:
    """(P, groups) for x (N, T) float32/float64 on any device (computed on the host). ``x`` is read through its data
    pointer only (no detach needed: this runs inside the autograd Function's forward or the custom op)."""
    xc = _host(x)
    mc = None if mask is None else _host(mask)
    kernel = _kernel()
    bad, P, G = (kernel.forward if kernel.available() else _reference_forward)(xc, mc, kind, lam)
    if bad:
        raise ValueError(f"{bad} row(s) have non-finite (NaN or ±inf) entries at real (non-padded) positions; "
                         "mark padding with the mask instead")
    return (P, G) if x.is_cpu else (P.to(x.device), G.to(x.device))


def _backward_impl(g: Tensor, P: Tensor, G: Tensor, sparse: bool) -> Tensor:
    kernel = _kernel()
    if not kernel.available():
        return _backward_tensor(g, P, G, sparse)
    if P.is_cpu:  # P and G as the forward made them (contiguous, on the host): only g needs a look
        return kernel.backward(_host(g, P.dtype), P, G, sparse)
    return kernel.backward(_host(g, P.dtype), _host(P), _host(G), sparse).to(P.device)


_NS = "structattn"
_forward_op = torch.library.custom_op(f"{_NS}::prox_sparsemax", _forward_impl, mutates_args=())
_backward_op = torch.library.custom_op(f"{_NS}::prox_sparsemax_backward", _backward_impl, mutates_args=())


@_forward_op.register_fake
def _(x, mask, kind, lam):
    return torch.empty_like(x), torch.empty(x.shape, dtype=torch.int32, device=x.device)


@_backward_op.register_fake
def _(g, P, G, sparse):
    return torch.empty_like(P)


def _setup(ctx, inputs, output):
    ctx.kind = inputs[2]
    P, G = output
    ctx.mark_non_differentiable(G)
    ctx.save_for_backward(P, G)


def _grad(ctx, gP, backward_pass):
    P, G = ctx.saved_tensors
    sparse = ctx.kind != TV
    if torch.is_grad_enabled():  # create_graph: a differentiable expression of gP
        return _backward_tensor(gP, P, G, sparse), None, None, None
    return backward_pass(gP, P, G, sparse), None, None, None


_forward_op.register_autograd(lambda ctx, gP, gG: _grad(ctx, gP, _backward_op), setup_context=_setup)


class _ProxSparsemaxFunction(torch.autograd.Function):
    """The eager twin of the custom op (torch.library's Python layers cost tens of µs per call, ops/viterbi.py).
    It returns P alone and keeps the group labels on ``ctx`` (they get no gradient): a second output would cost
    autograd its bookkeeping on every call."""

    @staticmethod
    def forward(ctx, x, mask, kind, lam):
        P, G = _forward_impl(x, mask, kind, lam)
        ctx.kind, ctx.groups = kind, G
        ctx.save_for_backward(P)
        return P

    @staticmethod
    def backward(ctx, gP):
        (P,) = ctx.saved_tensors
        sparse = ctx.kind != TV
        if torch.is_grad_enabled():  # create_graph: a differentiable expression of gP
            return _backward_tensor(gP, P, ctx.groups, sparse), None, None, None
        return _backward_impl(gP, P, ctx.groups, sparse), None, None, None


def _apply(x: Tensor, mask: Tensor | None, kind: int, lam: float) -> Tensor:
    _check(x, mask)
    lam = check_lambda(lam)
    shape, T = x.shape, x.shape[-1]
    if x.numel() == 0:
        return x * 0  # empty rows: nothing to solve, still a function of x
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    # (B, T), the common case, as it is: a reshape of a tensor that requires grad records a view node (~5 µs forward,
    # more backward)
    rows = work if work.dim() == 2 else work.reshape(-1, T)
    m = mask if mask is None or mask.dim() == 2 else mask.reshape(-1, T)
    if torch.compiler.is_compiling():
        P = _forward_op(rows, m, kind, lam)[0]
    else:
        P = _ProxSparsemaxFunction.apply(rows, m, kind, lam)
    if work is x and x.dim() == 2:  # the common (B, T) case: no reshape or cast nodes for autograd to record
        return P
    return P.reshape(shape).to(x.dtype)


# ---- public functions and modules -----------------------------------------------------------------------------------


def prox_tv(x: Tensor, lam: float, mask: Tensor | None = None) -> Tensor:
    """prox_TV(x) = argmin_y ½‖y − x‖² + λ Σ_i |y_{i+1} − y_i| over the last dimension (Condat 2013).

    Args:
        x: (..., T) floating-point tensor.
        lam: λ ≥ 0.
        mask: optional bool tensor of x's shape, True at padded positions (any layout): the chain runs over the real
            positions of each row in order; padded outputs are 0.

    Differentiable w.r.t. x: the Jacobian averages within each run of equal output values (Niculae & Blondel 2017,
    the lecture's slide "Jacobian of prox_TV"; at λ = 0 the identity)."""
    return _apply(x, mask, TV, lam)


def fusedmax(x: Tensor, lam: float = DEFAULT_FUSEDMAX_LAMBDA, mask: Tensor | None = None) -> Tensor:
    """fusedmax(x) = argmin_{p ∈ △} ½‖p − x‖² + λ Σ_i |p_{i+1} − p_i| = sparsemax(prox_TV(x)), over the last
    dimension (exact; module docstring). Same arguments as :func:`prox_tv`; rows sum to 1 over their real positions
    (all 0 without any)."""
    return _apply(x, mask, FUSEDMAX, lam)


def oscarmax(x: Tensor, lam: float = DEFAULT_OSCARMAX_LAMBDA, mask: Tensor | None = None) -> Tensor:
    """oscarmax(x) = argmin_{p ∈ △} ½‖p − x‖² + λ Σ_{i<j} max(|p_i|, |p_j|), over the last dimension — the exact
    argmin, sparsemax of the sorted-PAV fit (module docstring), not the authors' sparsemax ∘ prox_OSCAR. Same
    arguments as :func:`prox_tv`; the sum runs over the real positions of each row."""
    return _apply(x, mask, OSCARMAX, lam)


class _ProxModule(nn.Module):
    _fn = None

    def __init__(self, lam: float):
        super().__init__()
        self.lam = check_lambda(lam)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return type(self)._fn(x, self.lam, mask)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


class ProxTV(_ProxModule):
    """``nn.Module`` form of :func:`prox_tv` with a fixed λ."""

    _fn = staticmethod(prox_tv)


class Fusedmax(_ProxModule):
    """``nn.Module`` form of :func:`fusedmax` with a fixed λ."""

    _fn = staticmethod(fusedmax)

    def __init__(self, lam: float = DEFAULT_FUSEDMAX_LAMBDA):
        super().__init__(lam)


class Oscarmax(_ProxModule):
    """``nn.Module`` form of :func:`oscarmax` with a fixed λ."""

    _fn = staticmethod(oscarmax)

    def __init__(self, lam: float = DEFAULT_OSCARMAX_LAMBDA):
        super().__init__(lam)
