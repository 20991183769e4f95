"""Triton kernels for DTW_Ω (CUDA; CPU tensors only through the interpreter), ``op="dtw"``, name ``"triton"``.

ICML 2018 App. B.3, Alg. 5 (value, E) and Alg. 6 (⟨E, Z⟩, Ė), on the anti-diagonal wavefront of
:mod:`structattn.ops.dtw`: the cells (i, d − i) of diagonal d depend only on diagonals d − 1 and d − 2. One program
owns one pair (its own lengths n, m) and walks its n + m − 1 diagonals; the lanes of the program hold the cells of
one diagonal (in chunks of ``BLOCK`` cells when a diagonal is longer), so a diagonal is one vector step. Lanes
exchange values through global memory: each diagonal is written, then ``tl.debug_barrier()`` (a CTA barrier, which
also makes the writes visible to the whole program), then read shifted by one lane by the next diagonal. Loads of
rows written in the same launch use ``cache_modifier=".cg"`` (L2, never a stale L1 line).

Storage (memory linear in the DP size):

* ``W`` (B, D, N), D = N + M − 1, the saved state: the smoothed values v_{i,j} by diagonals, W[b, d, i] = v_{i, d−i}
  (skewed: one diagonal is a contiguous row, so a diagonal step reads and writes consecutive addresses). Slots
  outside a pair's cells are never written nor read (parents that do not exist are masked to −∞ by their index),
  so W needs no initialisation: D·N ≤ 2·N·M numbers per pair. The backward and the HVP recompute q = ∇max_Ω from W.
* The reverse sweeps keep, per pair, the *messages* that the cells of the last three diagonals send to their
  parents (ē_c·q_c[k] for k = left, diag, up; and the ė messages in the HVP) in a rotating (3, K, N) scratch, so a
  cell's ē is three loads; three rows (not two) so that one barrier per diagonal separates every read of a row from
  its next overwrite.
* The HVP stores the forward tangent v̇ by diagonals (like W) and reads it back in its reverse sweep for q̇.

θ and Z are read through their strides (the transposed view that :mod:`structattn.ops.dtw` passes when N > M costs
no copy); E and Ė are written in the natural (B, N, M) layout into zero-filled outputs (padding stays 0). The
arithmetic mirrors the C kernel (:mod:`._cpu_dtw_source`: the same sparsemax of 3 without sorting, the same
⟨q, z⟩ − ‖q‖²/2 = τ + ‖q‖²/2 form of the ℓ2 value), so results agree with the other backends to float rounding;
``tl.exp``/``tl.log`` on CUDA use the fast approximations for float32 (≈1–2 ulp), libdevice for float64.

``triton`` is imported when this module is, which the backend registry does only when :mod:`structattn.ops.dtw`
sees a CUDA tensor (or ``backend="triton"``); ``TRITON_INTERPRET=1`` (read when Triton is first imported) runs the
kernels on CPU tensors, which is how the tests run them without a GPU.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["available", "unavailable_reason", "forward", "backward", "marginals", "hvp", "DTYPES"]

#: Compute dtypes of the kernels (half precision arrives as float32: structattn.ops.dtw upcasts it).
DTYPES = (torch.float32, torch.float64)
_MAX_BLOCK = 1024  # lanes per program (the tests lower it to run the chunked path in the interpreter)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """True when triton imports and can run here (a CUDA device, or the interpreter)."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    if _IMPORT_ERROR is not None:
        return f"triton does not import ({_IMPORT_ERROR})"
    if not (torch.cuda.is_available() or _interpreting()):
        return "no CUDA device (and TRITON_INTERPRET is not 1)"
    return None


if triton is not None:

    @triton.jit
    def _parents(Wb, d, i, j, live, N):
        # v of the parents left (i, j−1), diag (i−1, j−1), up (i−1, j) of the cells (i, j) on diagonal d; a parent
        # outside the grid is −∞ (weight 0), except the start node v_{0,0} = 0, the diag parent of cell (0, 0).
        has_l = live & (j >= 1)
        has_u = live & (i >= 1)
        a = tl.load(Wb + (d - 1) * N + i, mask=has_l, other=float("-inf"), cache_modifier=".cg")
        b = tl.load(Wb + (d - 2) * N + (i - 1), mask=has_l & has_u, other=float("-inf"), cache_modifier=".cg")
        c = tl.load(Wb + (d - 1) * N + (i - 1), mask=has_u, other=float("-inf"), cache_modifier=".cg")
        b = tl.where((i == 0) & (j == 0), 0.0, b)
        return a, b, c

    @triton.jit
    def _max3(a, b, c, g, L2: tl.constexpr):
        # max_Ω(a, b, c) and q = ∇max_Ω (App. B.1) after shifting by the max; −∞ entries get weight 0.
        mx = tl.maximum(tl.maximum(a, b), c)
        za = (a - mx) / g
        zb = (b - mx) / g
        zc = (c - mx) / g
        if L2:
            # sparsemax of 3 without sorting: the largest z is 0, s2 the median, s3 the smallest; supports of size
            # 1, 2, 3 have thresholds −1, (s2 − 1)/2, (s2 + s3 − 1)/3 (nested tests), as in the C kernel.
            mn = tl.minimum(za, zb)
            t = tl.minimum(tl.maximum(za, zb), zc)
            s2 = tl.maximum(mn, t)
            s3 = tl.minimum(mn, zc)
            t2 = (s2 - 1.0) * 0.5
            tau = tl.where(s3 > t2, (s2 + s3 - 1.0) / 3.0, tl.where(s2 > -1.0, t2, -1.0))
            qa = tl.maximum(za - tau, 0.0)
            qb = tl.maximum(zb - tau, 0.0)
            qc = tl.maximum(zc - tau, 0.0)
            # ⟨q, z⟩ − ‖q‖²/2 = τ + ‖q‖²/2 on the support (Σq = 1): no 0·(−∞)
            val = mx + g * (tau + 0.5 * (qa * qa + qb * qb + qc * qc))
        else:
            ea = tl.exp(za)
            eb = tl.exp(zb)
            ec = tl.exp(zc)
            s = ea + eb + ec
            qa = ea / s
            qb = eb / s
            qc = ec / s
            val = mx + g * tl.log(s)
        return val, qa, qb, qc

    @triton.jit
    def _jac3(qa, qb, qc, xa, xb, xc, g, L2: tl.constexpr):
        # q̇ = J_Ω(q)·x, the Hessian of max_Ω at the point whose gradient is q (App. B.1).
        if L2:
            sa = (qa > 0).to(qa.dtype)
            sb = (qb > 0).to(qa.dtype)
            sc = (qc > 0).to(qa.dtype)
            # |support| ≥ 1 on real cells; the clamp only keeps masked-off lanes from computing 0/0.
            mean = (sa * xa + sb * xb + sc * xc) / tl.maximum(sa + sb + sc, 1.0)
            oa = sa * (xa - mean) / g
            ob = sb * (xb - mean) / g
            oc = sc * (xc - mean) / g
        else:
            s = qa * xa + qb * xb + qc * xc
            oa = qa * (xa - s) / g
            ob = qb * (xb - s) / g
            oc = qc * (xc - s) / g
        return oa, ob, oc

    @triton.jit
    def _dtw_kernel(
        theta_ptr, lx_ptr, ly_ptr, gamma_ptr, value_ptr, W_ptr, E_ptr, S_ptr, N, M, D, s_tb, s_ti, s_tj,
        L2: tl.constexpr, FWD: tl.constexpr, BWD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Alg. 5 for one pair per program: forward (value, W) if FWD, backward (E) if BWD (from the W just
        written, or given). S: the (3, 3, N) message scratch of the pair (rows d mod 3; k = left, diag, up)."""
        pid = tl.program_id(0).to(tl.int64)
        n = tl.load(lx_ptr + pid)
        m = tl.load(ly_ptr + pid)
        g = tl.load(gamma_ptr)
        lanes = tl.arange(0, BLOCK)
        Wb = W_ptr + pid * D * N
        Db = n + m - 1
        if FWD:
            tb = theta_ptr + pid * s_tb
            for d in range(0, Db):
                lo = tl.maximum(d - m + 1, 0)
                hi = tl.minimum(d, n - 1)
                for i0 in range(lo - lo % BLOCK, hi + 1, BLOCK):
                    i = i0 + lanes
                    j = d - i
                    live = (i >= lo) & (i <= hi)
                    a, b, c = _parents(Wb, d, i, j, live, N)
                    val, _qa, _qb, _qc = _max3(a, b, c, g, L2)
                    v = tl.load(tb + i * s_ti + j * s_tj, mask=live, other=0.0) + val
                    tl.store(Wb + d * N + i, v, mask=live)
                    # the end cell (n − 1, m − 1), alone on the pair's last diagonal: its value is DTW_Ω
                    tl.store(value_ptr + pid + lanes * 0, v, mask=live & (i == n - 1) & (j == m - 1))
                tl.debug_barrier()
        if BWD:
            Sb = S_ptr + pid * 9 * N
            Eb = E_ptr + pid * N * M
            for k in range(0, Db):
                d = Db - 1 - k
                lo = tl.maximum(d - m + 1, 0)
                hi = tl.minimum(d, n - 1)
                r0 = (d % 3) * 3 * N
                r1 = ((d + 1) % 3) * 3 * N
                r2 = ((d + 2) % 3) * 3 * N
                for i0 in range(lo - lo % BLOCK, hi + 1, BLOCK):
                    i = i0 + lanes
                    j = d - i
                    live = (i >= lo) & (i <= hi)
                    # ē(i, j) = Σ over the children of ē_c·q_c[k]: (i, j+1) sends its left message (row d+1, slot
                    # i), (i+1, j) its up message (row d+1, slot i+1), (i+1, j+1) its diag message (row d+2).
                    has_r = live & (j + 1 < m)
                    has_dn = live & (i + 1 < n)
                    e = (tl.load(Sb + r1 + i, mask=has_r, other=0.0, cache_modifier=".cg")
                         + tl.load(Sb + r1 + 2 * N + (i + 1), mask=has_dn, other=0.0, cache_modifier=".cg")
                         + tl.load(Sb + r2 + N + (i + 1), mask=has_r & has_dn, other=0.0, cache_modifier=".cg"))
                    e = tl.where((i == n - 1) & (j == m - 1), 1.0, e)  # the end cell seeds the sweep
                    tl.store(Eb + i * M + j, e, mask=live)
                    a, b, c = _parents(Wb, d, i, j, live, N)
                    _val, qa, qb, qc = _max3(a, b, c, g, L2)
                    tl.store(Sb + r0 + i, e * qa, mask=live)
                    tl.store(Sb + r0 + N + i, e * qb, mask=live)
                    tl.store(Sb + r0 + 2 * N + i, e * qc, mask=live)
                tl.debug_barrier()

    @triton.jit
    def _hvp_kernel(
        W_ptr, Z_ptr, lx_ptr, ly_ptr, gamma_ptr, dot_ptr, E_dot_ptr, Vd_ptr, S_ptr, N, M, D, s_zb, s_zi, s_zj,
        L2: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Alg. 6 for one pair per program from the forward's W: the tangent sweep v̇ = z + ⟨q, v̇_parents⟩ (stored
        by diagonals in Vd), then one reverse sweep computing ē and ė together from the messages of the children
        (S: (3, 6, N) per pair; k = 0..2 the ē messages ē_c·q_c[k], 3..5 the ė messages q_c[k]·ė_c + q̇_c[k]·ē_c)."""
        pid = tl.program_id(0).to(tl.int64)
        n = tl.load(lx_ptr + pid)
        m = tl.load(ly_ptr + pid)
        g = tl.load(gamma_ptr)
        lanes = tl.arange(0, BLOCK)
        Wb = W_ptr + pid * D * N
        Vb = Vd_ptr + pid * D * N
        zb = Z_ptr + pid * s_zb
        Db = n + m - 1
        for d in range(0, Db):
            lo = tl.maximum(d - m + 1, 0)
            hi = tl.minimum(d, n - 1)
            for i0 in range(lo - lo % BLOCK, hi + 1, BLOCK):
                i = i0 + lanes
                j = d - i
                live = (i >= lo) & (i <= hi)
                a, b, c = _parents(Wb, d, i, j, live, N)
                _val, qa, qb, qc = _max3(a, b, c, g, L2)
                # v̇ of the parents; the borders and the start node have v̇ = 0
                has_l = live & (j >= 1)
                has_u = live & (i >= 1)
                ta = tl.load(Vb + (d - 1) * N + i, mask=has_l, other=0.0, cache_modifier=".cg")
                tb = tl.load(Vb + (d - 2) * N + (i - 1), mask=has_l & has_u, other=0.0, cache_modifier=".cg")
                tc = tl.load(Vb + (d - 1) * N + (i - 1), mask=has_u, other=0.0, cache_modifier=".cg")
                vd = tl.load(zb + i * s_zi + j * s_zj, mask=live, other=0.0) + (qa * ta + qb * tb + qc * tc)
                tl.store(Vb + d * N + i, vd, mask=live)
                # ⟨E, Z⟩ = v̇ at the end cell
                tl.store(dot_ptr + pid + lanes * 0, vd, mask=live & (i == n - 1) & (j == m - 1))
            tl.debug_barrier()
        Sb = S_ptr + pid * 18 * N
        Eb = E_dot_ptr + pid * N * M
        for k in range(0, Db):
            d = Db - 1 - k
            lo = tl.maximum(d - m + 1, 0)
            hi = tl.minimum(d, n - 1)
            r0 = (d % 3) * 6 * N
            r1 = ((d + 1) % 3) * 6 * N
            r2 = ((d + 2) % 3) * 6 * N
            for i0 in range(lo - lo % BLOCK, hi + 1, BLOCK):
                i = i0 + lanes
                j = d - i
                live = (i >= lo) & (i <= hi)
                has_r = live & (j + 1 < m)
                has_dn = live & (i + 1 < n)
                has_dg = has_r & has_dn
                e = (tl.load(Sb + r1 + i, mask=has_r, other=0.0, cache_modifier=".cg")
                     + tl.load(Sb + r1 + 2 * N + (i + 1), mask=has_dn, other=0.0, cache_modifier=".cg")
                     + tl.load(Sb + r2 + N + (i + 1), mask=has_dg, other=0.0, cache_modifier=".cg"))
                e = tl.where((i == n - 1) & (j == m - 1), 1.0, e)
                ed = (tl.load(Sb + r1 + 3 * N + i, mask=has_r, other=0.0, cache_modifier=".cg")
                      + tl.load(Sb + r1 + 5 * N + (i + 1), mask=has_dn, other=0.0, cache_modifier=".cg")
                      + tl.load(Sb + r2 + 4 * N + (i + 1), mask=has_dg, other=0.0, cache_modifier=".cg"))
                tl.store(Eb + i * M + j, ed, mask=live)
                a, b, c = _parents(Wb, d, i, j, live, N)
                _val, qa, qb, qc = _max3(a, b, c, g, L2)
                has_l = live & (j >= 1)
                has_u = live & (i >= 1)
                ta = tl.load(Vb + (d - 1) * N + i, mask=has_l, other=0.0, cache_modifier=".cg")
                tb = tl.load(Vb + (d - 2) * N + (i - 1), mask=has_l & has_u, other=0.0, cache_modifier=".cg")
                tc = tl.load(Vb + (d - 1) * N + (i - 1), mask=has_u, other=0.0, cache_modifier=".cg")
                pa, pb, pc = _jac3(qa, qb, qc, ta, tb, tc, g, L2)
                tl.store(Sb + r0 + i, e * qa, mask=live)
                tl.store(Sb + r0 + N + i, e * qb, mask=live)
                tl.store(Sb + r0 + 2 * N + i, e * qc, mask=live)
                tl.store(Sb + r0 + 3 * N + i, qa * ed + pa * e, mask=live)
                tl.store(Sb + r0 + 4 * N + i, qb * ed + pb * e, mask=live)
                tl.store(Sb + r0 + 5 * N + i, qc * ed + pc * e, mask=live)
            tl.debug_barrier()


def _block(N: int) -> tuple[int, int]:
    """(BLOCK, num_warps): one lane per cell of a diagonal (at most N cells), up to 1024 lanes (longer diagonals are
    done in chunks); the interpreter runs a block as numpy arrays, so it gets the smallest power of two ≥ N."""
    b = triton.next_power_of_2(max(int(N), 1))
    if _interpreting():
        return max(min(b, _MAX_BLOCK), 2), 1
    b = min(max(b, 32), _MAX_BLOCK)
    return b, max(1, min(b // 32, 8))


def _launch(kernel, n_pairs: int, args: tuple, constexprs: dict, N: int) -> None:
    """Launch ``kernel`` with one program per pair. Every launch of this module goes through here, so that
    tests/test_triton_dtw.py can record the variants the wrappers really produce and compile them for sm_80/sm_90."""
    BLOCK, num_warps = _block(N)
    kernel[(n_pairs,)](*args, **constexprs, BLOCK=BLOCK, num_warps=num_warps)


def _check(x: Tensor) -> None:
    if unavailable_reason() is not None:
        raise RuntimeError(f"the Triton DTW kernel is unavailable: {unavailable_reason()}")
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton DTW kernel supports {', '.join(map(str, DTYPES))}, got {x.dtype}")


def _lens(x: Tensor, like: Tensor) -> Tensor:
    return x.to(device=like.device, dtype=torch.int64).contiguous()


def _gamma(gamma: float, like: Tensor) -> Tensor:
    # Passed through memory in θ's dtype: a Python float argument would be lowered to float32.
    return torch.full((1,), gamma, dtype=like.dtype, device=like.device)


def _run(theta, W, lx, ly, reg, gamma, fwd: bool, bwd: bool):
    """(value or None, W, E or None): one launch of _dtw_kernel."""
    B, N = W.shape[0], W.shape[2]
    D = W.shape[1]
    M = D - N + 1
    value = W.new_empty(B) if fwd else None
    E = W.new_zeros(B, N, M) if bwd else None
    if B == 0:
        return value, W, E
    S = W.new_empty(B, 3, 3, N) if bwd else W  # the message scratch; a dummy pointer when not read
    th = theta if fwd else W
    st = theta.stride() if fwd else (0, 0, 0)
    _launch(
        _dtw_kernel, B,
        (th, _lens(lx, W), _lens(ly, W), _gamma(gamma, W), value if fwd else W, W, E if bwd else W, S, N, M, D,
         *st),
        dict(L2=(reg == "l2"), FWD=fwd, BWD=bwd), N,
    )
    return value, W, E


def forward(theta: Tensor, lx: Tensor, ly: Tensor, reg: str, gamma: float):
    """Alg. 5 forward, one launch: (value (B,), W (B, N + M − 1, N): the values by diagonals)."""
    _check(theta)
    B, N, M = theta.shape
    W = theta.new_empty(B, N + M - 1, N)
    value, W, _ = _run(theta, W, lx, ly, reg, gamma, True, False)
    return value, W


def backward(theta: Tensor, W: Tensor, lx: Tensor, ly: Tensor, reg: str, gamma: float) -> Tensor:
    """Alg. 5 backward sweep from the forward's W, one launch: E (B, N, M), zero on padding."""
    _check(W)
    return _run(None, W.contiguous(), lx, ly, reg, gamma, False, True)[2]


def marginals(theta: Tensor, lx: Tensor, ly: Tensor, reg: str, gamma: float):
    """Alg. 5 forward + backward in one launch: (value, W, E)."""
    _check(theta)
    B, N, M = theta.shape
    W = theta.new_empty(B, N + M - 1, N)
    return _run(theta, W, lx, ly, reg, gamma, True, True)


def hvp(theta: Tensor, W: Tensor, E: Tensor, Z: Tensor, lx: Tensor, ly: Tensor, reg: str, gamma: float):
    """Alg. 6 from the forward's W, one launch: (⟨E, Z⟩ (B,), Ė (B, N, M), zero on padding). E is recomputed in the
    same reverse sweep as Ė (as in the C kernel), so the ``E`` argument is not read."""
    _check(W)
    W = W.contiguous()
    B, D, N = W.shape
    M = D - N + 1
    dot = W.new_empty(B)
    E_dot = W.new_zeros(B, N, M)
    if B == 0:
        return dot, E_dot
    Z = Z.to(W.dtype)
    Vd = torch.empty_like(W)
    S = W.new_empty(B, 3, 6, N)
    _launch(
        _hvp_kernel, B,
        (W, Z, _lens(lx, W), _lens(ly, W), _gamma(gamma, W), dot, E_dot, Vd, S, N, M, D, *Z.stride()),
        dict(L2=(reg == "l2")), N,
    )
    return dot, E_dot
