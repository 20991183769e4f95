"""Smoothed dynamic time warping DTW_Ω, its gradient (Alg. 5) and its Hessian-vector product (Alg. 6).

Mensch & Blondel, "Differentiable Dynamic Programming for Structured Prediction and Attention", ICML 2018, §3.2 and
App. B.3. For a score matrix θ ∈ R^{N×M} (θ[i, j] scores aligning x_i with y_j) the smoothed recursion over the DTW
DAG (Figure 3) is

    v_{0,0} = 0,   v_{i,0} = v_{0,j} = −∞,
    v_{i,j} = θ_{i,j} + max_Ω(v_{i,j−1}, v_{i−1,j−1}, v_{i−1,j})     (i ∈ [N], j ∈ [M]),     DTW_Ω(θ) = v_{N,M},

with max_Ω the smoothed max of :mod:`structattn.ops.smoothed_max` (over the finite arguments: a −∞ argument gets
weight 0). DTW_Ω is convex in θ (Prop. 2) and its gradient E = ∇DTW_Ω(θ) ∈ conv(Y) is the expected alignment matrix
of the random walk of Prop. 3 over the monotone alignments Y (↓, →, ↘ moves from (1, 1) to (N, M)); for Ω = −γH it is
the Gibbs expectation under p(Y) ∝ exp(⟨Y, θ⟩/γ), for Ω = (γ/2)‖·‖² it is sparse (exact zeros).

Where we depart from the paper's text. App. B.3 writes the recursion for a *cost* matrix with a smoothed *min*; we
keep the max over *scores* like Vit_Ω (:mod:`structattn.ops.viterbi`), so soft-DTW (Cuturi & Blondel 2017) of a cost
matrix C is ``-dtw_value(-C, reg="entropy", gamma=γ)`` and its gradient w.r.t. C is ``dtw_marginals(-C, ...)``.
Alg. 5's loop order (row by row) is replaced by anti-diagonals i + j = d: all cells of a diagonal depend only on the
two previous diagonals, so a diagonal is one vectorised step (tensor ops in the reference backend, a SIMD loop in the
C kernel). The ℓ2 value is *not* the smoothed max of ⟨Y, θ⟩ over alignments (max_{γ‖·‖²/2} is not associative,
Prop. 2.3); only −γH has that form, γ·logsumexp_Y(⟨Y, θ⟩/γ).

Batched layout: θ is (B, N, M); ``lengths_x`` (B,) in [1, N] and ``lengths_y`` (B,) in [1, M] give each pair's
real size (right padding of both axes, any layout). Padded cells of θ are ignored (they may even hold NaN) and get
E = 0 and Ė = 0 exactly. An empty series has no alignment, so lengths 0 are an error.

Memory: the passes work on θ transposed when N > M (DTW_Ω(θ) = DTW_Ω(θᵀ)), so that a diagonal has at most
min(N, M) cells; the reference stores 3 weights per cell of its (N + M − 1)·min(N, M) ≤ 2·N·M diagonal slots, the C
kernel one value per cell plus two guards per diagonal, the Triton kernel one value per diagonal slot: linear in the
DP size. The value's autograd node keeps E (B·N·M) instead: when θ needs a gradient its forward runs both sweeps.

Backends (registered with ``op="dtw"`` in :mod:`structattn.ops.kernels`): ``"reference"`` (the plain tensor code
below, any device and dtype), ``"cpu"`` (:mod:`structattn.ops.kernels.cpu_dtw`, C: value, E and the HVP) and
``"triton"`` (:mod:`structattn.ops.kernels.triton_dtw`, CUDA: value, E and the HVP, one program per pair; its saved
state is the values by diagonals, (B, N + M − 1, N)). ``backend="auto"`` picks the C kernel for CPU tensors when it
compiles and the Triton kernel for CUDA float32/float64 tensors when Triton imports, else the reference.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import kernels as _kernels
from .smoothed_max import _jacobian_product, check_reg_gamma, sparsemax

__all__ = ["dtw_value", "dtw_marginals", "dtw_hvp", "SmoothedDTW", "DTWMarginals", "resolve_dtw_backend"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_OP = "dtw"


# ---- input checks ---------------------------------------------------------------------------------------------


def _lengths(lengths, B: int, size: int, name: str, device) -> Tensor:
    if lengths is None:
        return torch.full((B,), size, dtype=torch.long, device=device)
    if not isinstance(lengths, Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise TypeError(f"{name} must be a 1-D integer tensor of size B={B}: {exc}") from None
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"{name} must have shape ({B},), got {tuple(lengths.shape)}")
    lengths = lengths.to(device=device, dtype=torch.long)
    if B:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > size:
            raise ValueError(f"{name} must lie in [1, {size}] (an empty series has no alignment), "
                             f"got values in [{lo}, {hi}]")
    return lengths


def _real_mask(lx: Tensor, ly: Tensor, N: int, M: int) -> Tensor:
    """(B, N, M) bool, True on the real cells of each pair."""
    i = torch.arange(N, device=lx.device)
    j = torch.arange(M, device=lx.device)
    return (i[None, :, None] < lx[:, None, None]) & (j[None, None, :] < ly[:, None, None])


def _prepare(theta: Tensor, lengths_x, lengths_y, reg: str, gamma: float):
    """Validate; return (θ in its compute dtype, lx, ly, γ, output dtype). Non-finite values in *real* cells raise."""
    gamma = check_reg_gamma(reg, gamma)
    if not isinstance(theta, Tensor):
        raise TypeError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dim() != 3:
        raise ValueError(f"theta must have shape (B, N, M), got {tuple(theta.shape)}")
    B, N, M = theta.shape
    if N < 1 or M < 1:
        raise ValueError(f"theta needs N >= 1 and M >= 1 (an empty series has no alignment), got {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got {theta.dtype}")
    out_dtype = theta.dtype
    if theta.dtype in _LOW_PRECISION:
        # Values grow linearly in N + M and the weights get tiny: half precision cannot hold them; compute in float32.
        theta = theta.float()
    lx = _lengths(lengths_x, B, N, "lengths_x", theta.device)
    ly = _lengths(lengths_y, B, M, "lengths_y", theta.device)
    # One read pass without a (B, N, M) temporary in the common case: NaN and ±inf propagate through a sum, so a
    # finite sum proves every cell finite; only a non-finite sum (or an overflow of huge finite values) pays the
    # cell-by-cell check, which also ignores padding.
    # (math.isfinite of .item(): one tensor op fewer than torch.isfinite + bool, which shows on small pairs.)
    if theta.numel() and not math.isfinite(theta.detach().sum().item()):
        bad = ~torch.isfinite(theta.detach())
        if bool(bad.any()):
            bad &= _real_mask(lx, ly, N, M)
            if bool(bad.any()):
                idx = tuple(int(k) for k in bad.nonzero()[0])
                raise ValueError(f"theta contains {int(bad.sum())} non-finite value(s) (NaN or ±inf) in real cells, "
                                 f"first at index {idx}: {theta[idx].item()}; DTW_Ω needs finite scores (mark "
                                 "padding with lengths_x / lengths_y instead)")
    return theta, lx, ly, gamma, out_dtype


# ---- the reference passes (plain tensor ops, anti-diagonal wavefront) -------------------------------------------
# Layout ("skewed"): diagonal d = i + j (0 ≤ d < D = N + M − 1) is a (B, N) row indexed by i, cell (i, d − i). The
# three parents of (i, j) are then left (i, j−1) = row d−1 at i, diag (i−1, j−1) = row d−2 at i−1, up (i−1, j) = row
# d−1 at i−1: shifts by one index. Rows are stored with one extra slot in front (index i + 1 holds i, slot 0 the
# virtual row i = −1), so the shifts are plain slices. Non-real cells hold −∞ (value) and 0 (weights q), so they never
# contribute. q[..., k] is ∇max_Ω over (left, diag, up), the paper's order (q_{i,j,1..3} of Alg. 5).

_NEG = float("-inf")


def _max3(x: Tensor, reg: str, gamma: float):
    """max_Ω and its gradient over the last dim (3) where some entries may be −∞ (weight 0). Rows that are all −∞
    give garbage (the callers mask them)."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = (x - m) / gamma
    if reg == "entropy":
        e = torch.exp(z)
        s = e.sum(-1, keepdim=True)
        return (m + gamma * torch.log(s)).squeeze(-1), e / s
    # −∞ → a finite −1e30 (far below any threshold τ ≥ −1, so still weight 0): the sort-based sparsemax needs at least
    # one entry in its support, which an all-−∞ (masked) row would not have.
    q = sparsemax(torch.where(torch.isfinite(z), z, torch.full_like(z, -1e30)))
    # Σ q_k z_k = Σ q_k (q_k + τ) = ‖q‖² + τ on the support; written with q only, so that 0·(−∞) never appears.
    q2 = (q * q).sum(-1)
    zs = torch.where(q > 0, z, torch.zeros_like(z))
    return m.squeeze(-1) + gamma * ((q * zs).sum(-1) - 0.5 * q2), q


def _diag_index(N: int, M: int, d: int, device):
    i = torch.arange(N, device=device)
    j = d - i
    return i, j, (j >= 0) & (j < M)


def _ref_forward(theta: Tensor, lx: Tensor, ly: Tensor, reg: str, gamma: float):
    """Alg. 5 forward on anti-diagonals: (value (B,), Q (B, D, N, 3))."""
    B, N, M = theta.shape
    D = N + M - 1
    dev, dt = theta.device, theta.dtype
    prev2 = theta.new_full((B, N + 1), _NEG)
    prev2[:, 0] = 0.0  # the start node v_{0,0} = 0 (the diag parent of cell (0, 0))
    prev1 = theta.new_full((B, N + 1), _NEG)
    neg_col = theta.new_full((B, 1), _NEG)
    value = theta.new_zeros(B)
    dend = lx + ly - 2
    qs = []
    for d in range(D):
        i, j, inside = _diag_index(N, M, d, dev)
        real = inside[None, :] & (i[None, :] < lx[:, None]) & (j[None, :] < ly[:, None])
        th = theta[:, i, j.clamp(0, M - 1)]
        x = torch.stack((prev1[:, 1:], prev2[:, :-1], prev1[:, :-1]), -1)  # (left, diag, up)
        val, q = _max3(x, reg, gamma)
        v = torch.where(real, th + val, torch.full_like(val, _NEG))
        qs.append(torch.where(real[..., None], q, torch.zeros_like(q)))
        at_end = dend == d
        if bool(at_end.any()):
            value = torch.where(at_end, v.gather(1, (lx - 1)[:, None]).squeeze(1), value)
        prev2, prev1 = prev1, torch.cat((neg_col, v), 1)
    return value, torch.stack(qs, 1).to(dt)


def _skew(X: Tensor) -> Tensor:
    """(B, N, M) → (B, D, N) with [b, d, i] = X[b, i, d − i] (0 outside the matrix)."""
    B, N, M = X.shape
    D = N + M - 1
    i = torch.arange(N, device=X.device)
    d = torch.arange(D, device=X.device)
    j = d[:, None] - i[None, :]
    inside = (j >= 0) & (j < M)
    out = X[:, i[None, :].expand(D, N), j.clamp(0, M - 1)]
    return torch.where(inside[None], out, torch.zeros_like(out))


def _unskew(S: Tensor, M: int) -> Tensor:
    """(B, D, N) → (B, N, M), inverse of :func:`_skew`."""
    B, D, N = S.shape
    i = torch.arange(N, device=S.device)
    j = torch.arange(M, device=S.device)
    return S[:, i[:, None] + j[None, :], i[:, None].expand(N, M)]


def _ref_backward(Q: Tensor, lx: Tensor, ly: Tensor) -> Tensor:
    """Alg. 5 backward on anti-diagonals: E (B, N, M). ē of a cell = Σ over its children c of ē_c·q_c[k] (k: which
    parent of c the cell is), seeded with ē = 1 at the end cell (N_b, M_b) of each pair."""
    B, D, N, _ = Q.shape
    M = D - N + 1
    Qp = torch.cat((Q, Q.new_zeros(B, D, 1, 3)), 2)  # slot N: the child row i + 1 = N does not exist
    zero = Q.new_zeros(B, N + 1, 3)
    e1 = Q.new_zeros(B, N + 1)  # ē on diagonal d + 1 (slot N always 0)
    e2 = Q.new_zeros(B, N + 1)  # ē on diagonal d + 2
    q1, q2 = zero, zero
    dend = lx + ly - 2
    seed = torch.nn.functional.one_hot(lx - 1, N).to(Q.dtype)
    es = [None] * D
    for d in range(D - 1, -1, -1):
        e = e1[:, :N] * q1[:, :N, 0] + e1[:, 1:] * q1[:, 1:, 2] + e2[:, 1:] * q2[:, 1:, 1]
        e = torch.where((dend == d)[:, None], seed, e)
        es[d] = e
        e2, e1 = e1, torch.cat((e, Q.new_zeros(B, 1)), 1)
        q2, q1 = q1, Qp[:, d]
    return _unskew(torch.stack(es, 1), M)


def _ref_hvp(Q: Tensor, E: Tensor, Z: Tensor, lx: Tensor, ly: Tensor, reg: str, gamma: float):
    """Alg. 6 on anti-diagonals: (⟨E, Z⟩ (B,), Ė (B, N, M)). Forward tangent v̇_{i,j} = z_{i,j} + Σ_k q_k v̇_parent_k
    with q̇ = J_Ω(q)·(v̇_left, v̇_diag, v̇_up); reverse ė = Σ_children (q_c[k] ė_c + q̇_c[k] e_c)."""
    B, D, N, _ = Q.shape
    M = D - N + 1
    Zs = _skew(Z.to(Q.dtype))
    Es = _skew(E.to(Q.dtype))
    zcol = Q.new_zeros(B, 1)
    p1 = Q.new_zeros(B, N + 1)  # v̇ of the border nodes is 0
    p2 = Q.new_zeros(B, N + 1)
    dend = lx + ly - 2
    dot = Q.new_zeros(B)
    qdots = []
    for d in range(D):
        q = Q[:, d]
        xd = torch.stack((p1[:, 1:], p2[:, :-1], p1[:, :-1]), -1)
        real = q.sum(-1) > 0  # real cells have weights summing to 1, the others 0
        vd = torch.where(real, Zs[:, d] + (q * xd).sum(-1), torch.zeros_like(Zs[:, d]))
        qd = _jacobian_product(q, xd, reg, gamma)
        qdots.append(torch.where(real[..., None], qd, torch.zeros_like(qd)))
        at_end = dend == d
        if bool(at_end.any()):
            dot = torch.where(at_end, vd.gather(1, (lx - 1)[:, None]).squeeze(1), dot)
        p2, p1 = p1, torch.cat((zcol, vd), 1)
    Qd = torch.stack(qdots, 1)
    Qp = torch.cat((Q, Q.new_zeros(B, D, 1, 3)), 2)
    Qdp = torch.cat((Qd, Qd.new_zeros(B, D, 1, 3)), 2)
    Esp = torch.cat((Es, Es.new_zeros(B, D, 1)), 2)
    zero3 = Q.new_zeros(B, N + 1, 3)
    zero1 = Q.new_zeros(B, N + 1)
    ed1, ed2 = zero1, zero1  # ė on diagonals d + 1, d + 2
    ee1, ee2 = zero1, zero1  # e on diagonals d + 1, d + 2
    q1, q2, qd1, qd2 = zero3, zero3, zero3, zero3
    eds = [None] * D
    for d in range(D - 1, -1, -1):
        ed = (ed1[:, :N] * q1[:, :N, 0] + ee1[:, :N] * qd1[:, :N, 0]
              + ed1[:, 1:] * q1[:, 1:, 2] + ee1[:, 1:] * qd1[:, 1:, 2]
              + ed2[:, 1:] * q2[:, 1:, 1] + ee2[:, 1:] * qd2[:, 1:, 1])
        eds[d] = ed
        ed2, ed1 = ed1, torch.cat((ed, zcol), 1)
        ee2, ee1 = ee1, Esp[:, d]
        q2, q1 = q1, Qp[:, d]
        qd2, qd1 = qd1, Qdp[:, d]
    return dot, _unskew(torch.stack(eds, 1), M)


class _Reference:
    """The tensor passes above behind the DTW backend interface (registered as "reference", ``op="dtw"``); the
    saved state is Q (B, D, N, 3), ∇max_Ω at every cell in the skewed layout."""

    @staticmethod
    def available() -> bool:
        return True

    @staticmethod
    def unavailable_reason() -> None:
        return None

    @staticmethod
    def forward(theta, lx, ly, reg, gamma):
        return _ref_forward(theta, lx, ly, reg, gamma)

    @staticmethod
    def backward(theta, saved, lx, ly, reg, gamma):
        return _ref_backward(saved, lx, ly)

    @staticmethod
    def marginals(theta, lx, ly, reg, gamma):
        value, Q = _ref_forward(theta, lx, ly, reg, gamma)
        return value, Q, _ref_backward(Q, lx, ly)

    @staticmethod
    def hvp(theta, saved, E, Z, lx, ly, reg, gamma):
        return _ref_hvp(saved, E, Z, lx, ly, reg, gamma)


# ---- backend choice ------------------------------------------------------------------------------------------------


def resolve_dtw_backend(backend, theta: Tensor) -> str:
    """The concrete DTW backend a call uses. ``None`` or ``"auto"``: the first registered ``auto`` backend that serves
    θ's device and dtype and is available (the C kernel for CPU, the Triton kernel for CUDA float32/float64), else
    ``"reference"``. An explicit name that cannot serve θ raises (TypeError for the dtype, ValueError for the
    device, RuntimeError if unavailable) instead of silently falling back."""
    names = ("auto", *_kernels.names(_OP))
    if backend is None:
        backend = "auto"
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    dev, dt = theta.device.type, theta.dtype
    if backend == "auto":
        for entry in _kernels.specs(_OP):
            if entry.serves(dev, dt, 0) and entry.load().available():
                return entry.name
        return "reference"
    # Under TRITON_INTERPRET=1 an explicit "triton" runs on CPU tensors (the tests); "auto" never picks it there.
    _kernels.spec(backend, _OP).check(dev, dt, 0, interpreting=os.environ.get("TRITON_INTERPRET") == "1")
    return backend


def _impl(name: str):
    return _kernels.get(name, _OP)


# ---- autograd --------------------------------------------------------------------------------------------------------


class _DTWValueFunction(torch.autograd.Function):
    """θ ↦ DTW_Ω(θ); backward g·E (Alg. 5), itself differentiable (through _DTWMarginalsFunction, whose backward is
    Alg. 6), so double backward works.

    When θ needs a gradient the forward runs the backend's ``marginals`` (Alg. 5 forward and backward sweeps in one
    call or launch) and keeps E, not the backend's state: the backward is then one product, without a second kernel
    call and its Python overhead (what dominated small pairs), and a pair's values are still in cache for its
    backward sweep. Memory is the same order: E is B·N·M numbers, the C kernel's state B·(N·M + 2(N + M − 1) + 6)."""

    @staticmethod
    def forward(ctx, theta, lx, ly, reg, gamma, backend, with_grad):
        ctx.reg, ctx.gamma, ctx.backend = reg, gamma, backend
        if not with_grad:  # no graph will be built: the forward sweep only
            return _impl(backend).forward(theta, lx, ly, reg, gamma)[0]
        value, _, E = _impl(backend).marginals(theta, lx, ly, reg, gamma)
        ctx.save_for_backward(theta, E, lx, ly)
        return value

    @staticmethod
    def backward(ctx, g):
        theta, E, lx, ly = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: E must be differentiable in θ, so it comes from the marginals Function.
            E = _DTWMarginalsFunction.apply(theta, lx, ly, ctx.reg, ctx.gamma, ctx.backend)
        return g[:, None, None] * E, None, None, None, None, None, None


class _DTWMarginalsFunction(torch.autograd.Function):
    """θ ↦ E = ∇DTW_Ω(θ); backward Z ↦ ∇²DTW_Ω(θ)·Z (Alg. 6; the Hessian is symmetric). Third derivatives are not
    implemented (the backward is once-differentiable: asking for more raises)."""

    @staticmethod
    def forward(ctx, theta, lx, ly, reg, gamma, backend):
        _, saved, E = _impl(backend).marginals(theta, lx, ly, reg, gamma)
        ctx.reg, ctx.gamma, ctx.backend = reg, gamma, backend
        ctx.save_for_backward(theta, saved, E, lx, ly)
        return E

    @staticmethod
    @once_differentiable
    def backward(ctx, Z):
        theta, saved, E, lx, ly = ctx.saved_tensors
        E_dot = _impl(ctx.backend).hvp(theta, saved, E, Z, lx, ly, ctx.reg, ctx.gamma)[1]
        return E_dot, None, None, None, None, None


# ---- public functions ------------------------------------------------------------------------------------------------


def _oriented(theta: Tensor, lx: Tensor, ly: Tensor):
    """θ with N ≤ M (transposed if needed, a differentiable view) and the matching lengths; whether it was swapped."""
    if theta.shape[1] > theta.shape[2]:
        return theta.transpose(1, 2), ly, lx, True
    return theta, lx, ly, False


def dtw_value(theta: Tensor, lengths_x=None, lengths_y=None, reg: str = "entropy", gamma: float = 1.0, *,
              backend: str | None = None) -> Tensor:
    """Smoothed DTW value DTW_Ω(θ) (ICML 2018 §3.2, App. B.3, Alg. 5 forward), maximised over monotone alignments.

    Solves v_{i,j} = θ_{i,j} + max_Ω(v_{i,j−1}, v_{i−1,j−1}, v_{i−1,j}) from v_{0,0} = 0 (borders −∞) and returns
    v_{N,M}, where max_Ω(x) = max_{q ∈ △} ⟨q, x⟩ − Ω(q) with Ω = −γH (``reg="entropy"``) or (γ/2)‖·‖² (``"l2"``).
    θ are *scores*: soft-DTW of a cost matrix C (Cuturi & Blondel 2017) is ``-dtw_value(-C, gamma=γ)``.

    Args:
        theta: (B, N, M) scores; ``theta[b, i, j]`` scores aligning x_i with y_j in pair b.
        lengths_x: optional (B,) integers in [1, N]: rows i ≥ lengths_x[b] are padding (ignored).
        lengths_y: optional (B,) integers in [1, M]: columns j ≥ lengths_y[b] are padding (ignored).
        reg: ``"entropy"`` or ``"l2"``.
        gamma: temperature γ > 0.
        backend: ``None``/``"auto"``, ``"reference"`` (tensor code), ``"cpu"`` (C kernel, CPU tensors) or
            ``"triton"`` (Triton kernel, CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``); see
            :func:`resolve_dtw_backend`. All give the same numbers up to float rounding.

    Returns:
        (B,) values in θ's dtype (float16/bfloat16 computed in float32). Differentiable: the gradient is E of
        :func:`dtw_marginals` (custom backward), and that gradient is differentiable again (Alg. 6).

    Raises:
        ValueError: bad shape, N or M = 0, non-finite θ in a real cell, lengths out of range, unknown ``reg``,
            γ ≤ 0, unknown backend.
        TypeError: non-tensor or non-float θ, non-integer lengths.
    """
    theta_c, lx, ly, gamma, out_dtype = _prepare(theta, lengths_x, lengths_y, reg, gamma)
    name = resolve_dtw_backend(backend, theta_c)
    th, lx, ly, _ = _oriented(theta_c, lx, ly)
    with_grad = torch.is_grad_enabled() and th.requires_grad
    return _DTWValueFunction.apply(th, lx, ly, reg, gamma, name, with_grad).to(out_dtype)


def dtw_marginals(theta: Tensor, lengths_x=None, lengths_y=None, reg: str = "entropy", gamma: float = 1.0, *,
                  backend: str | None = None) -> Tensor:
    """Expected alignment matrix E = ∇DTW_Ω(θ) ∈ conv(Y) (ICML 2018 Prop. 3, §3.2, Alg. 5).

    ``E[b, i, j]`` is the probability that the random walk of Prop. 3 aligns x_i with y_j (for −γH the Gibbs
    probability under p(Y) ∝ exp(⟨Y, θ⟩/γ)); E[b, 0, 0] = E[b, N_b−1, M_b−1] = 1, padded cells are exactly 0, and for
    ℓ2 most cells are exactly 0. Same arguments and errors as :func:`dtw_value`; returns (B, N, M) in θ's dtype.
    Differentiable once more: the backward is the Hessian product of Alg. 6. Third derivatives are not implemented:
    that backward is once-differentiable, so with ``create_graph=True`` the Hessian product comes back without a graph.
    """
    theta_c, lx, ly, gamma, out_dtype = _prepare(theta, lengths_x, lengths_y, reg, gamma)
    name = resolve_dtw_backend(backend, theta_c)
    th, lx, ly, swapped = _oriented(theta_c, lx, ly)
    E = _DTWMarginalsFunction.apply(th, lx, ly, reg, gamma, name)
    return (E.transpose(1, 2) if swapped else E).to(out_dtype)


def dtw_hvp(theta: Tensor, Z: Tensor, lengths_x=None, lengths_y=None, reg: str = "entropy", gamma: float = 1.0, *,
            backend: str | None = None):
    """Directional derivative ⟨∇DTW_Ω(θ), Z⟩ (B,) and Hessian product ∇²DTW_Ω(θ)·Z (B, N, M) by Alg. 6 (App. B.3),
    without autograd. Same arguments as :func:`dtw_value` plus the direction ``Z`` of θ's shape (its padded cells are
    ignored; Ė is 0 there)."""
    theta_c, lx, ly, gamma, out_dtype = _prepare(theta, lengths_x, lengths_y, reg, gamma)
    if not isinstance(Z, Tensor) or Z.shape != theta.shape:
        raise ValueError(f"Z must be a tensor of theta's shape {tuple(theta.shape)}")
    if not Z.is_floating_point():
        raise TypeError(f"Z must be a floating-point tensor, got {Z.dtype}")
    name = resolve_dtw_backend(backend, theta_c)
    th, lx, ly, swapped = _oriented(theta_c, lx, ly)
    Zc = Z.to(th.dtype)
    Zc = torch.where(_real_mask(lx, ly, *th.shape[1:]), Zc.transpose(1, 2) if swapped else Zc, torch.zeros_like(th))
    with torch.no_grad():
        impl = _impl(name)
        _, saved, E = impl.marginals(th, lx, ly, reg, gamma)
        dot, E_dot = impl.hvp(th, saved, E, Zc, lx, ly, reg, gamma)
    if swapped:
        E_dot = E_dot.transpose(1, 2)
    return dot.to(out_dtype), E_dot.to(out_dtype)


class SmoothedDTW(torch.nn.Module):
    """``nn.Module`` computing DTW_Ω(θ) (see :func:`dtw_value`) with fixed ``reg`` and ``gamma``."""

    def __init__(self, reg: str = "entropy", gamma: float = 1.0):
        super().__init__()
        self.gamma = check_reg_gamma(reg, gamma)
        self.reg = reg

    def forward(self, theta: Tensor, lengths_x=None, lengths_y=None) -> Tensor:
        return dtw_value(theta, lengths_x, lengths_y, self.reg, self.gamma)

    def extra_repr(self) -> str:
        return f"reg={self.reg!r}, gamma={self.gamma}"


class DTWMarginals(SmoothedDTW):
    """``nn.Module`` computing E = ∇DTW_Ω(θ) (see :func:`dtw_marginals`) with fixed ``reg`` and ``gamma``."""

    def forward(self, theta: Tensor, lengths_x=None, lengths_y=None) -> Tensor:
        return dtw_marginals(theta, lengths_x, lengths_y, self.reg, self.gamma)
