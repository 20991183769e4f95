"""Fused Triton kernels for the smoothed Viterbi with S = 2 states (CUDA; CPU tensors only via the interpreter).

One launch per pass: :func:`marginals` runs Alg. 3 forward and backward in a single kernel, :func:`hvp` runs both
sweeps of Alg. 4 in a single kernel. Each program owns a block of chains (one lane per chain) and walks the T steps
sequentially, holding v, u, v̇, u̇ (two scalars each per chain) in registers; at S = 2 every max_Ω, ∇max_Ω and J_Ω
is a closed form (no sort, no reduction). The arithmetic mirrors the reference tensor code
(:mod:`structattn.ops.viterbi`) operation by operation, so results agree to float rounding. ``tl.exp``/``tl.log``
on CUDA use the fast hardware approximations for float32 (≈1–2 ulp); float64 uses libdevice. Names are the paper's
symbols, shared with the reference and the C kernel (docs/kernels.md): ``v0``/``v1`` is v_t for states 0/1, ``q01``
is q_t[0, 1], ``u_dot1`` is u̇_t[1], ``e_dot10`` is ė_t[1, 0], and so on.

Layout. The kernels address per-step tensors chain-minor: element (t, k) of chain b at (K·t + k)·B + b (θ, Q, E, Z, Ė
with K = 4, U with K = 2), so that at every step the 32 lanes of a warp, which hold 32 consecutive chains, touch 32
consecutive elements: one 128-byte transaction per warp load in float32, instead of 32 sectors 16·T bytes apart in the
batch-major (B, T, 2, 2) layout. Outputs are returned as (B, T, …) views of their chain-minor buffers (no copy; the
custom ops' fake kernels declare these strides); a batch-major input (θ, Z) costs one transposing copy
(:func:`chain_minor`). docs/speed.md counts the bytes per chain step.

``triton`` is imported when this module is imported, which the backend registry (:mod:`structattn.ops.kernels`)
does only when :mod:`structattn.ops.viterbi` sees a CUDA tensor with S = 2 (or ``backend="triton"``). Tests run the
kernels on CPU through ``TRITON_INTERPRET=1``, which triton reads when it is first imported.
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

__all__ = ["available", "unavailable_reason", "forward", "backward", "marginals", "hvp"]


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
    def _maxarg2(x0, x1, g, L2: tl.constexpr):
        # max_Ω(x0, x1) and its gradient, after shifting by the max (values grow linearly in T).
        m = tl.maximum(x0, x1)
        a = x0 - m
        b = x1 - m
        ya = a / g
        yb = b / g
        if L2:
            p1 = (1.0 + yb - ya) * 0.5
            p1 = tl.minimum(tl.maximum(p1, 0.0), 1.0)
            p0 = 1.0 - p1
            val = (p0 * a + p1 * b) - (0.5 * g) * (p0 * p0 + p1 * p1) + m
        else:
            mx = tl.maximum(ya, yb)
            lse = tl.log(tl.exp(ya - mx) + tl.exp(yb - mx)) + mx
            p0 = tl.exp(ya - lse)
            p1 = tl.exp(yb - lse)
            val = g * lse + m
        return val, p0, p1

    @triton.jit
    def _jac2(q0, q1, x0, x1, g, L2: tl.constexpr):
        # J_Ω(q)·x, the Hessian of max_Ω at the point whose gradient is q.
        if L2:
            s0 = q0 > 0
            s1 = q1 > 0
            ssum = tl.where(s0, x0, 0.0) + tl.where(s1, x1, 0.0)
            # n ≥ 1 on real lanes (q sums to 1); the clamp only keeps masked-off lanes from computing 0/0.
            n = tl.maximum(s0.to(x0.dtype) + s1.to(x0.dtype), 1.0)
            o0 = tl.where(s0, (x0 - ssum / n) / g, 0.0)
            o1 = tl.where(s1, (x1 - ssum / n) / g, 0.0)
        else:
            s = q0 * x0 + q1 * x1
            o0 = (q0 * x0 - q0 * s) / g
            o1 = (q1 * x1 - q1 * s) / g
        return o0, o1

    @triton.jit
    def _vit_kernel(
        theta_ptr, lens_ptr, gamma_ptr, value_ptr, Q_ptr, r_ptr, E_ptr, U_ptr, B, T,
        HAS_LENS: tl.constexpr, L2: tl.constexpr, FWD: tl.constexpr, BWD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Alg. 3 for a block of chains: forward (value, Q, r) if FWD, backward (E, U) if BWD (from the Q, r just
        written, or given). Long because it is one fused GPU kernel: both sweeps in one launch keep v, u and the
        2×2 state in registers; helper functions would not save a line of what runs per step."""
        bidx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        bm = bidx < B
        b64 = bidx.to(tl.int64)
        sB = B.to(tl.int64)  # chain-minor layout: element (t, k) of chain b at (K·t + k)·B + b
        if HAS_LENS:
            L = tl.load(lens_ptr + b64, mask=bm, other=0)
        else:
            L = tl.zeros([BLOCK], dtype=tl.int64) + T
        g = tl.load(gamma_ptr)
        qbase = Q_ptr + b64
        if FWD:
            tbase = theta_ptr + b64
            v0 = tl.zeros([BLOCK], dtype=g.dtype)
            v1 = tl.zeros([BLOCK], dtype=g.dtype)
            for t in range(0, T):
                act = t < L
                lm = bm & act
                th00 = tl.load(tbase + (4 * t + 0) * sB, mask=lm, other=0.0)
                th01 = tl.load(tbase + (4 * t + 1) * sB, mask=lm, other=0.0)
                th10 = tl.load(tbase + (4 * t + 2) * sB, mask=lm, other=0.0)
                th11 = tl.load(tbase + (4 * t + 3) * sB, mask=lm, other=0.0)
                v_next0, q00, q01 = _maxarg2(th00 + v0, th01 + v1, g, L2)
                v_next1, q10, q11 = _maxarg2(th10 + v0, th11 + v1, g, L2)
                tl.store(qbase + (4 * t + 0) * sB, tl.where(act, q00, 0.0), mask=bm)
                tl.store(qbase + (4 * t + 1) * sB, tl.where(act, q01, 0.0), mask=bm)
                tl.store(qbase + (4 * t + 2) * sB, tl.where(act, q10, 0.0), mask=bm)
                tl.store(qbase + (4 * t + 3) * sB, tl.where(act, q11, 0.0), mask=bm)
                v0 = tl.where(act, v_next0, v0)
                v1 = tl.where(act, v_next1, v1)
            val, r0, r1 = _maxarg2(v0, v1, g, L2)
            tl.store(value_ptr + b64, val, mask=bm)
            tl.store(r_ptr + 2 * b64, r0, mask=bm)
            tl.store(r_ptr + 2 * b64 + 1, r1, mask=bm)
        if BWD:
            tl.debug_barrier()
            u0 = tl.load(r_ptr + 2 * b64, mask=bm, other=0.0)
            u1 = tl.load(r_ptr + 2 * b64 + 1, mask=bm, other=0.0)
            ebase = E_ptr + b64
            ubase = U_ptr + b64
            for k in range(0, T):
                t = T - 1 - k
                act = t < L
                lm = bm & act
                tl.store(ubase + (2 * t) * sB, u0, mask=bm)
                tl.store(ubase + (2 * t + 1) * sB, u1, mask=bm)
                q00 = tl.load(qbase + (4 * t + 0) * sB, mask=lm, other=0.0)
                q01 = tl.load(qbase + (4 * t + 1) * sB, mask=lm, other=0.0)
                q10 = tl.load(qbase + (4 * t + 2) * sB, mask=lm, other=0.0)
                q11 = tl.load(qbase + (4 * t + 3) * sB, mask=lm, other=0.0)
                e00 = q00 * u0
                e01 = q01 * u0
                e10 = q10 * u1
                e11 = q11 * u1
                tl.store(ebase + (4 * t + 0) * sB, tl.where(act, e00, 0.0), mask=bm)
                tl.store(ebase + (4 * t + 1) * sB, tl.where(act, e01, 0.0), mask=bm)
                tl.store(ebase + (4 * t + 2) * sB, tl.where(act, e10, 0.0), mask=bm)
                tl.store(ebase + (4 * t + 3) * sB, tl.where(act, e11, 0.0), mask=bm)
                u0 = tl.where(act, e00 + e10, u0)
                u1 = tl.where(act, e01 + e11, u1)

    @triton.jit
    def _hvp_kernel(
        Q_ptr, U_ptr, r_ptr, Z_ptr, lens_ptr, gamma_ptr, dot_ptr, E_dot_ptr, B, T,
        HAS_LENS: tl.constexpr, L2: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Alg. 4 for a block of chains. The tangent q̇_t is parked in Ė[t] by the forward sweep and consumed in
        place by the reverse sweep (ė_t depends on q̇_t only). Long for the same reason as ``_vit_kernel``: one
        fused launch, the per-step state in registers."""
        bidx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        bm = bidx < B
        b64 = bidx.to(tl.int64)
        sB = B.to(tl.int64)  # chain-minor layout: element (t, k) of chain b at (K·t + k)·B + b
        if HAS_LENS:
            L = tl.load(lens_ptr + b64, mask=bm, other=0)
        else:
            L = tl.zeros([BLOCK], dtype=tl.int64) + T
        g = tl.load(gamma_ptr)
        qbase = Q_ptr + b64
        zbase = Z_ptr + b64
        e_dot_base = E_dot_ptr + b64
        ubase = U_ptr + b64
        v_dot0 = tl.zeros([BLOCK], dtype=g.dtype)
        v_dot1 = tl.zeros([BLOCK], dtype=g.dtype)
        for t in range(0, T):
            act = t < L
            lm = bm & act
            q00 = tl.load(qbase + (4 * t + 0) * sB, mask=lm, other=0.0)
            q01 = tl.load(qbase + (4 * t + 1) * sB, mask=lm, other=0.0)
            q10 = tl.load(qbase + (4 * t + 2) * sB, mask=lm, other=0.0)
            q11 = tl.load(qbase + (4 * t + 3) * sB, mask=lm, other=0.0)
            x_dot00 = tl.load(zbase + (4 * t + 0) * sB, mask=lm, other=0.0) + v_dot0
            x_dot01 = tl.load(zbase + (4 * t + 1) * sB, mask=lm, other=0.0) + v_dot1
            x_dot10 = tl.load(zbase + (4 * t + 2) * sB, mask=lm, other=0.0) + v_dot0
            x_dot11 = tl.load(zbase + (4 * t + 3) * sB, mask=lm, other=0.0) + v_dot1
            v_dot_next0 = q00 * x_dot00 + q01 * x_dot01
            v_dot_next1 = q10 * x_dot10 + q11 * x_dot11
            q_dot00, q_dot01 = _jac2(q00, q01, x_dot00, x_dot01, g, L2)
            q_dot10, q_dot11 = _jac2(q10, q11, x_dot10, x_dot11, g, L2)
            tl.store(e_dot_base + (4 * t + 0) * sB, tl.where(act, q_dot00, 0.0), mask=bm)
            tl.store(e_dot_base + (4 * t + 1) * sB, tl.where(act, q_dot01, 0.0), mask=bm)
            tl.store(e_dot_base + (4 * t + 2) * sB, tl.where(act, q_dot10, 0.0), mask=bm)
            tl.store(e_dot_base + (4 * t + 3) * sB, tl.where(act, q_dot11, 0.0), mask=bm)
            v_dot0 = tl.where(act, v_dot_next0, v_dot0)
            v_dot1 = tl.where(act, v_dot_next1, v_dot1)
        r0 = tl.load(r_ptr + 2 * b64, mask=bm, other=0.0)
        r1 = tl.load(r_ptr + 2 * b64 + 1, mask=bm, other=0.0)
        tl.store(dot_ptr + b64, r0 * v_dot0 + r1 * v_dot1, mask=bm)
        u_dot0, u_dot1 = _jac2(r0, r1, v_dot0, v_dot1, g, L2)
        tl.debug_barrier()
        for k in range(0, T):
            t = T - 1 - k
            act = t < L
            lm = bm & act
            q00 = tl.load(qbase + (4 * t + 0) * sB, mask=lm, other=0.0)
            q01 = tl.load(qbase + (4 * t + 1) * sB, mask=lm, other=0.0)
            q10 = tl.load(qbase + (4 * t + 2) * sB, mask=lm, other=0.0)
            q11 = tl.load(qbase + (4 * t + 3) * sB, mask=lm, other=0.0)
            q_dot00 = tl.load(e_dot_base + (4 * t + 0) * sB, mask=lm, other=0.0)
            q_dot01 = tl.load(e_dot_base + (4 * t + 1) * sB, mask=lm, other=0.0)
            q_dot10 = tl.load(e_dot_base + (4 * t + 2) * sB, mask=lm, other=0.0)
            q_dot11 = tl.load(e_dot_base + (4 * t + 3) * sB, mask=lm, other=0.0)
            u0 = tl.load(ubase + (2 * t) * sB, mask=lm, other=0.0)
            u1 = tl.load(ubase + (2 * t + 1) * sB, mask=lm, other=0.0)
            e_dot00 = q00 * u_dot0 + q_dot00 * u0
            e_dot01 = q01 * u_dot0 + q_dot01 * u0
            e_dot10 = q10 * u_dot1 + q_dot10 * u1
            e_dot11 = q11 * u_dot1 + q_dot11 * u1
            tl.store(e_dot_base + (4 * t + 0) * sB, e_dot00, mask=lm)
            tl.store(e_dot_base + (4 * t + 1) * sB, e_dot01, mask=lm)
            tl.store(e_dot_base + (4 * t + 2) * sB, e_dot10, mask=lm)
            tl.store(e_dot_base + (4 * t + 3) * sB, e_dot11, mask=lm)
            u_dot0 = tl.where(act, e_dot00 + e_dot10, u_dot0)
            u_dot1 = tl.where(act, e_dot01 + e_dot11, u_dot1)

#: Input dtypes the kernels are compiled for (half precision is upcast to float32 by structattn.ops.viterbi).
DTYPES = (torch.float32, torch.float64)
_NUM_WARPS = 4


def _block() -> int:
    # One lane per chain; 128 lanes = 4 warps. The interpreter runs whole blocks with numpy, so keep them small
    # there (fewer wasted lanes on tiny test batches).
    return 16 if _interpreting() else 32 * _NUM_WARPS


def _launch(kernel, n_chains: int, args: tuple, constexprs: dict) -> None:
    """Launch ``kernel`` over ``n_chains`` chains, one lane each. Every launch in this module goes through here, so
    that tests/test_triton_aot.py can record the (kernel, argument types, constexprs, num_warps) that the wrappers
    below really produce and compile exactly those ahead of time for sm_80/sm_90: a new variant cannot be missed."""
    BLOCK = _block()
    kernel[(triton.cdiv(n_chains, BLOCK),)](*args, **constexprs, BLOCK=BLOCK, num_warps=_NUM_WARPS)


def _check(x: Tensor) -> None:
    if unavailable_reason() is not None:
        raise RuntimeError(f"the Triton Viterbi kernel is unavailable: {unavailable_reason()}")
    if x.shape[-1] != 2:
        raise ValueError(f"the Triton Viterbi kernel is specialised to S=2, got S={x.shape[-1]}")
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton Viterbi kernel supports {', '.join(map(str, DTYPES))}, got {x.dtype}")


def _lens(lengths: Tensor | None, like: Tensor):
    if lengths is None:
        return like, False  # dummy pointer, never read (HAS_LENS=False)
    return lengths.to(device=like.device, dtype=torch.int64).contiguous(), True


def _gamma(gamma: float, like: Tensor) -> Tensor:
    # Passed through memory in θ's dtype: a Python float argument would be lowered to float32.
    return torch.full((1,), gamma, dtype=like.dtype, device=like.device)


def new_chain_minor(B: int, *shape: int, like: Tensor) -> Tensor:
    """An uninitialised (B, *shape) tensor stored chain-minor: a (B, …) view of a contiguous (*shape, B) buffer, so
    that element [b, t, …] of consecutive chains b are neighbours in memory (see :func:`chain_minor`)."""
    buf = like.new_empty(*shape, B)
    return buf.permute(buf.dim() - 1, *range(buf.dim() - 1))


def chain_minor(x: Tensor) -> Tensor:
    """The contiguous (T, …, B) storage of a (B, T, …) tensor, which is what the kernels address: element (t, k) of
    chain b at (K·t + k)·B + b, so that the lanes of a warp (consecutive chains) read and write consecutive
    addresses at every step. No copy for the outputs of this module (already stored so); one transposing copy for
    a batch-major input such as θ or Z."""
    return x.permute(*range(1, x.dim()), 0).contiguous()


def _out(x: Tensor) -> Tensor:
    """The (T, …, B) storage of an output made by :func:`new_chain_minor`, written in place by a kernel."""
    y = x.permute(*range(1, x.dim()), 0)
    if not y.is_contiguous():  # a copy would silently drop the kernel's writes
        raise RuntimeError("kernel output is not stored chain-minor")
    return y


def _run_vit(theta, Q, r, lengths, reg, gamma, fwd: bool, bwd: bool, value=None, E=None, U=None):
    """Launch _vit_kernel. Q, E, U are chain-minor (B, …) views (:func:`new_chain_minor`); θ any layout."""
    B, T = Q.shape[0], Q.shape[1]
    if B == 0:
        return
    ref = theta if theta is not None else Q
    lens, has = _lens(lengths, ref)
    # Q is an output of the forward (FWD) or the input of the backward sweep (chain-minor if it came from here).
    Qc = _out(Q) if fwd else chain_minor(Q)
    dummy = Qc
    _launch(
        _vit_kernel, B,
        (chain_minor(theta) if theta is not None else dummy, lens, _gamma(gamma, ref),
         value if value is not None else dummy, Qc, r,
         _out(E) if E is not None else dummy, _out(U) if U is not None else dummy, B, T),
        dict(HAS_LENS=has, L2=(reg == "l2"), FWD=fwd, BWD=bwd),
    )


def forward(theta: Tensor, lengths: Tensor | None, reg: str, gamma: float):
    """Alg. 3 forward, one launch: (value (B,), Q (B,T,2,2) chain-minor, r (B,2))."""
    _check(theta)
    B, T = theta.shape[:2]
    value = theta.new_empty(B)
    Q = new_chain_minor(B, T, 2, 2, like=theta)
    r = theta.new_empty(B, 2)
    _run_vit(theta, Q, r, lengths, reg, gamma, True, False, value=value)
    return value, Q, r


def backward(Q: Tensor, r: Tensor, lengths: Tensor | None):
    """Alg. 3 backward, one launch: (E (B,T,2,2), U (B,T,2)), both chain-minor."""
    _check(Q)
    r = r.contiguous()
    B, T = Q.shape[:2]
    E = new_chain_minor(B, T, 2, 2, like=Q)
    U = new_chain_minor(B, T, 2, like=Q)
    _run_vit(None, Q, r, lengths, "entropy", 1.0, False, True, E=E, U=U)
    return E, U


def marginals(theta: Tensor, lengths: Tensor | None, reg: str, gamma: float):
    """Alg. 3 forward + backward in one launch: (value, Q, r, E, U); Q, E, U chain-minor."""
    _check(theta)
    B, T = theta.shape[:2]
    value = theta.new_empty(B)
    Q = new_chain_minor(B, T, 2, 2, like=theta)
    r = theta.new_empty(B, 2)
    E = new_chain_minor(B, T, 2, 2, like=theta)
    U = new_chain_minor(B, T, 2, like=theta)
    _run_vit(theta, Q, r, lengths, reg, gamma, True, True, value=value, E=E, U=U)
    return value, Q, r, E, U


def hvp(Q: Tensor, U: Tensor, r: Tensor, Z: Tensor, lengths: Tensor | None, reg: str, gamma: float):
    """Alg. 4 (both sweeps) in one launch: (⟨E, Z⟩ (B,), Ė = ∇²Vit_Ω(θ)·Z (B,T,2,2) chain-minor)."""
    _check(Q)
    r = r.contiguous()
    B, T = Q.shape[:2]
    dot = Q.new_empty(B)
    E_dot = new_chain_minor(B, T, 2, 2, like=Q)
    if B == 0:
        return dot, E_dot
    lens, has = _lens(lengths, Q)
    _launch(
        _hvp_kernel, B,
        (chain_minor(Q), chain_minor(U), r, chain_minor(Z.to(Q.dtype)), lens, _gamma(gamma, Q), dot,
         _out(E_dot), B, T),
        dict(HAS_LENS=has, L2=(reg == "l2")),
    )
    return dot, E_dot
