"""Smoothed Viterbi Vit_Ω, its gradient (Alg. 3) and its Hessian-vector product (Alg. 4).

Mensch & Blondel, "Differentiable Dynamic Programming for Structured Prediction and Attention", ICML 2018,
§2–3 and App. B.2. For potentials θ ∈ R^{T×S×S}, θ[t, i, j] scoring the move from state j at step t−1 to
state i at step t, the smoothed Bellman recursion is

    v_0 = 0_S,     v_{t,i} = max_Ω(θ_{t,i} + v_{t−1})   (t = 1..T),     Vit_Ω(θ) = max_Ω(v_T),

with max_Ω the smoothed max of :mod:`structattn.ops.smoothed_max`. Vit_Ω is convex (Prop. 2) and its gradient
E = ∇Vit_Ω(θ) ∈ conv(Y) is the expected transition tensor of a random walk on the trellis (Prop. 3): for
Ω = −γH it holds the exact Gibbs marginals p(y_t = i, y_{t−1} = j) of p(y) ∝ exp(⟨Y, θ⟩/γ); for ℓ2 it is sparse.

Batched layout: θ is (B, T, S, S); ``lengths`` (B,) marks steps t ≥ lengths[b] as right padding. Padded steps
carry v through unchanged, so the value and the real marginals are those of the unpadded chain, and the padded
marginals are exactly zero. A chain of length 0 has value max_Ω(0_S) (γ log S for entropy, −γ/(2S) for ℓ2)
and all-zero marginals.

The passes below are written with plain differentiable tensor ops so that the same code serves as the
backward of a backward (third derivatives, ``gradgradcheck`` of the marginals) when autograd records it.

Backends. The same passes also exist as fast kernels, registered by name in :mod:`structattn.ops.kernels` (see
docs/kernels.md): a C kernel for CPU tensors and a fused Triton kernel for CUDA tensors (S = 2), each running one
whole pass over all chains per call. They are picked automatically (``backend="auto"``) and agree with the
reference to float rounding; ``backend="reference"`` on a call, :func:`set_default_backend`, :func:`viterbi_backend`
or ``STRUCTATTN_VITERBI_BACKEND=reference`` force the tensor code. Third derivatives always run the differentiable
reference code.

torch.compile / torch.export. The passes are also ``torch.library`` custom ops, ``structattn::viterbi_value``,
``::viterbi_marginals``, ``::viterbi_backward`` (the Alg. 3 backward sweep) and ``::viterbi_hvp`` (Alg. 4), with fake
kernels and registered derivatives (value' = marginals, marginals' = HVP). Inside a graph being compiled or exported
the public functions call the ops, so Dynamo traces them without a graph break (``fullgraph=True``); in eager mode they
call autograd.Functions built from the same implementation and derivative functions, which skip torch.library's
~30 µs of Python per call. The data-dependent input checks (finite θ, lengths in [0, T]) run inside the ops, at run
time, in both modes.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from . import kernels as _kernels
from .smoothed_max import _jacobian_product, _max_argmax, check_reg_gamma

__all__ = [
    "viterbi_value",
    "viterbi_marginals",
    "viterbi_hvp",
    "SmoothedViterbi",
    "ViterbiMarginals",
    "BACKENDS",
    "set_default_backend",
    "get_default_backend",
    "viterbi_backend",
    "resolve_backend",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ---- input checks ---------------------------------------------------------------------------------------------


def _prepare(theta: Tensor, lengths, reg: str, gamma: float):
    """Validate what is known without reading tensor data (so that torch.compile traces it without a graph break);
    return (θ in a compute dtype, lengths as an int64 tensor on θ's device or None, gamma, output dtype). The checks
    that read the data (finite θ, lengths in [0, T]) run inside the value/marginals ops (:func:`_check_values`)."""
    gamma = check_reg_gamma(reg, gamma)
    if not isinstance(theta, Tensor):
        raise TypeError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dim() != 4 or theta.shape[-1] != theta.shape[-2]:
        raise ValueError(f"theta must have shape (B, T, S, S), got {tuple(theta.shape)}")
    B, T, S, _ = theta.shape
    if S < 2:
        raise ValueError(f"theta needs S >= 2 states, got S={S}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got {theta.dtype}")
    out_dtype = theta.dtype
    if theta.dtype in _LOW_PRECISION:
        # Half precision cannot hold values that grow linearly in T nor tiny marginals: compute in float32.
        theta = theta.float()
    if lengths is not None:
        lengths = _check_lengths(lengths, B, theta.device)
    return theta, lengths, gamma, out_dtype


def _check_lengths(lengths, B: int, device) -> Tensor:
    if not isinstance(lengths, Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise TypeError(f"lengths must be a 1-D integer tensor of size B={B}: {exc}") from None
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
    return lengths.to(device=device, dtype=torch.long)


def _check_values(theta: Tensor, lengths: Tensor | None) -> Tensor | None:
    """The data-dependent checks, run by the value and marginals ops on real tensors (also under torch.compile,
    where the op bodies run at run time): θ finite, lengths in [0, T] (the kernels index with them). Returns
    ``lengths``, or None when no chain is padded (the kernels' cheaper unmasked path).

    Skipped while a CUDA graph is being captured (``torch.compile(mode="reduce-overhead")``): reading a value back to
    the host is not allowed during capture, and the same inputs were checked by the eager warm-up runs that precede
    it; the replays then run the kernels only."""
    if theta.is_cuda and torch.cuda.is_current_stream_capturing():
        return lengths
    if theta.numel() > 0:
        bad = ~torch.isfinite(theta)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            n = int(bad.sum())
            raise ValueError(
                f"theta contains {n} non-finite value(s) (NaN or ±inf), first at index {idx}: "
                f"{theta[idx].item()}; Vit_Ω needs finite potentials (mask padding with `lengths` instead)"
            )
    if lengths is None or lengths.numel() == 0:
        return lengths
    T = theta.shape[1]
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0 or hi > T:
        raise ValueError(f"lengths must lie in [0, T={T}], got values in [{lo}, {hi}]")
    return None if lo == T else lengths


def _step_mask(lengths: Tensor | None, T: int) -> Tensor | None:
    """(B, T) bool, True on real steps."""
    if lengths is None:
        return None
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


# ---- the three passes (reference backend, plain tensor ops) -----------------------------------------------------
# Names follow the paper's symbols (docs/kernels.md has the table, shared with the C and Triton kernels): x, v, q, r,
# u, e for Alg. 3 and their tangents x_dot, v_dot, q_dot, u_dot, e_dot for Alg. 4 (lower case: one step; Q, U, E, Z,
# E_dot: stacked over the steps). Loop index t is 0-based: step t here is the paper's step t + 1.


def _forward(theta: Tensor, mask: Tensor | None, reg: str, gamma: float):
    """Alg. 3, forward pass. Returns value (B,), Q (B, T, S, S) with Q_t[i] = ∇max_Ω(θ_{t,i} + v_{t−1}), and
    r = ∇max_Ω(v_T) (B, S)."""
    B, T, S, _ = theta.shape
    v = theta.new_zeros(B, S)
    qs = []
    for t in range(T):
        x = theta[:, t] + v[:, None, :]  # (B, S_i, S_j): rows x_i = θ_{t,i} + v_{t−1}
        v_next, q = _max_argmax(x, reg, gamma)
        if mask is not None:
            v_next = torch.where(mask[:, t, None], v_next, v)  # padding: carry v_{t−1} through
        v = v_next
        qs.append(q)
    value, r = _max_argmax(v, reg, gamma)
    Q = torch.stack(qs, 1) if qs else theta.new_zeros(B, 0, S, S)
    return value, Q, r


def _backward(Q: Tensor, r: Tensor, mask: Tensor | None):
    """Alg. 3, backward pass: E_t[i, j] = Q_t[i, j]·u_t[i], u_{t−1}[j] = Σ_i E_t[i, j], from u_T = r.
    Returns E (B, T, S, S) and U (B, T, S) with U[:, t] = u_{t+1} (the adjoint of v at step t)."""
    B, T, S, _ = Q.shape
    u = r
    es = [None] * T
    us = [None] * T
    for t in range(T - 1, -1, -1):
        us[t] = u
        e = Q[:, t] * u[:, :, None]
        u_next = e.sum(1)
        if mask is not None:
            m = mask[:, t]
            e = torch.where(m[:, None, None], e, torch.zeros_like(e))
            u_next = torch.where(m[:, None], u_next, u)
        es[t] = e
        u = u_next
    if T == 0:
        return Q.new_zeros(B, 0, S, S), Q.new_zeros(B, 0, S)
    return torch.stack(es, 1), torch.stack(us, 1)


def _hvp(Q: Tensor, U: Tensor, r: Tensor, Z: Tensor, mask: Tensor | None, reg: str, gamma: float):
    """Alg. 4: ∇²Vit_Ω(θ)·Z by one forward tangent pass and one reverse pass. Returns (⟨E, Z⟩ (B,), Ė)."""
    B, T, S, _ = Q.shape
    v_dot = Q.new_zeros(B, S)
    q_dots = []
    for t in range(T):
        x_dot = Z[:, t] + v_dot[:, None, :]  # (B, S_i, S_j): tangent of x = θ_{t,i} + v_{t−1}
        q = Q[:, t]
        v_dot_next = (q * x_dot).sum(-1)
        q_dot = _jacobian_product(q, x_dot, reg, gamma)
        if mask is not None:
            v_dot_next = torch.where(mask[:, t, None], v_dot_next, v_dot)
        v_dot = v_dot_next
        q_dots.append(q_dot)
    dot = (r * v_dot).sum(-1)
    u_dot = _jacobian_product(r, v_dot, reg, gamma)  # tangent of u_T = r = ∇max_Ω(v_T)
    e_dots = [None] * T
    for t in range(T - 1, -1, -1):
        u = U[:, t]
        e_dot = Q[:, t] * u_dot[:, :, None] + q_dots[t] * u[:, :, None]
        u_dot_next = e_dot.sum(1)
        if mask is not None:
            m = mask[:, t]
            e_dot = torch.where(m[:, None, None], e_dot, torch.zeros_like(e_dot))
            u_dot_next = torch.where(m[:, None], u_dot_next, u_dot)
        e_dots[t] = e_dot
        u_dot = u_dot_next
    E_dot = torch.stack(e_dots, 1) if T else Q.new_zeros(B, 0, S, S)
    return dot, E_dot


def _hvp_from_theta(theta, Z, mask, reg, gamma):
    _, Q, r = _forward(theta, mask, reg, gamma)
    _, U = _backward(Q, r, mask)
    return _hvp(Q, U, r, Z, mask, reg, gamma)[1]


# ---- backends --------------------------------------------------------------------------------------------------
# Every backend implements the same four passes on (θ, lengths) with identical semantics (the ViterbiBackend protocol
# of structattn.ops.kernels.registry):
#   forward(θ, lengths, reg, γ) -> (value, Q, r)            marginals(...) -> (value, Q, r, E, U)
#   backward(Q, r, lengths) -> (E, U)                        hvp(Q, U, r, Z, lengths, reg, γ) -> (⟨E, Z⟩, Ė)
# They are registered by name in structattn/ops/kernels/__init__.py, one line each, with what they serve (devices,
# dtypes, S) and a lazy loader: "reference" is the tensor code above (_Reference: any device, dtype and S), "cpu" C via
# ctypes, "triton" a fused CUDA kernel for S = 2. The fast ones exist because the reference costs ≈10 tiny tensor ops
# × T steps × 3 passes, which dominates an attention step. Everything below reads the registry; nothing names a
# particular fast backend.

_ENV_BACKEND = "STRUCTATTN_VITERBI_BACKEND"


def _backend_names() -> tuple[str, ...]:
    return ("auto", *_kernels.names())


def __getattr__(name: str):
    # BACKENDS is computed from the registry, so that a backend registered later (a test's fake one) is listed too.
    if name == "BACKENDS":
        return _backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "BACKENDS"])


def _check_backend_name(name) -> str:
    names = _backend_names()
    if name not in names:
        raise ValueError(f"backend must be one of {names}, got {name!r}")
    return name


_default_backend = _check_backend_name(os.environ.get(_ENV_BACKEND, "auto") or "auto")


def set_default_backend(name: str) -> str:
    """Set the backend used when a call passes ``backend=None`` (the default); returns the previous one.

    ``set_default_backend("reference")`` forces the plain tensor code everywhere in the process (also inside
    :mod:`structattn.attention` and the fairseq plugin, which do not pass ``backend``). The initial default is
    ``"auto"``, or the value of the environment variable ``STRUCTATTN_VITERBI_BACKEND`` if set at import."""
    global _default_backend
    prev = _default_backend
    _default_backend = _check_backend_name(name)
    return prev


def get_default_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def viterbi_backend(name: str):
    """Context manager: ``with viterbi_backend("reference"): ...`` runs the block with that default backend."""
    prev = set_default_backend(name)
    try:
        yield
    finally:
        set_default_backend(prev)


class _Reference:
    """The tensor-op passes above behind the backend interface (lengths → step mask); registered as "reference"."""

    @staticmethod
    def available() -> bool:
        return True

    @staticmethod
    def unavailable_reason() -> None:
        return None

    @staticmethod
    def forward(theta, lengths, reg, gamma):
        return _forward(theta, _step_mask(lengths, theta.shape[1]), reg, gamma)

    @staticmethod
    def backward(Q, r, lengths):
        return _backward(Q, r, _step_mask(lengths, Q.shape[1]))

    @staticmethod
    def marginals(theta, lengths, reg, gamma):
        mask = _step_mask(lengths, theta.shape[1])
        value, Q, r = _forward(theta, mask, reg, gamma)
        E, U = _backward(Q, r, mask)
        return value, Q, r, E, U

    @staticmethod
    def hvp(Q, U, r, Z, lengths, reg, gamma):
        return _hvp(Q, U, r, Z, _step_mask(lengths, Q.shape[1]), reg, gamma)


def resolve_backend(backend, theta: Tensor) -> str:
    """The concrete backend ("reference" | "cpu" | "triton", or any other registered name) that a call with
    ``backend`` on ``theta`` (already in its compute dtype) uses. ``None`` means the process default
    (:func:`set_default_backend`).

    ``"auto"``: CUDA tensors with S = 2 → "triton" if Triton imports, CPU tensors → "cpu" if the C kernel
    compiles, anything else (or on failure, with a one-time warning for the C kernel) → "reference". In general: the
    first registered backend marked ``auto`` that serves θ's device, dtype and S and is available, else "reference".
    An explicit "cpu"/"triton" that cannot serve ``theta`` raises instead of silently falling back."""
    name = _default_backend if backend is None else _check_backend_name(backend)
    return _resolve(name, theta.device.type, theta.dtype, int(theta.shape[-1]), _interpreting())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _resolve(name: str, device_type: str, dtype: torch.dtype, S: int, interpreting: bool) -> str:
    if name == "auto":
        # serves() reads the registered declarations only: a backend is imported (and its availability checked, e.g.
        # the C kernel compiled) only if it could serve the call.
        for entry in _kernels.specs():
            if entry.serves(device_type, dtype, S) and entry.load().available():
                return entry.name
        return "reference"
    _kernels.spec(name).check(device_type, dtype, S, interpreting)
    return name


# torch.compile: the answer depends only on the arguments (and on the registry, which changes only when a backend is
# registered), but finding it may compile the C kernel (a subprocess, a lock) or import Triton, which Dynamo cannot
# trace. The marker is what torch.compiler.assume_constant_result sets (torch/_dynamo/decorators.py); calling that
# would import torch._dynamo (and Triton) with structattn. Dynamo then calls _resolve at trace time and bakes the
# answer into the graph (the default backend is a global that Dynamo guards on, so changing it recompiles). It must
# stay a plain module-level function (Dynamo honours the marker on Python functions only). tests/test_custom_ops.py
# compiles with fullgraph=True, which fails if this marker stops working.
_resolve._dynamo_marked_constant = True


# ---- custom ops ----------------------------------------------------------------------------------------------------
# The passes are torch.library custom ops (namespace ``structattn``) rather than autograd.Functions around ctypes or
# Triton calls, so that torch.compile / torch.export see them as single opaque nodes with known output shapes (the
# fake implementations) and known derivatives (register_autograd), instead of breaking the graph on code they cannot
# trace. Each op takes the concrete ``backend`` chosen by resolve_backend (a constant of the graph) and runs it, after
# checking that the backend is registered for the tensors' device (_backend_for): on CPU the C kernel ("cpu"; "triton"
# only under TRITON_INTERPRET=1), on CUDA the Triton kernel, and the reference tensor code anywhere.
#
#   structattn::viterbi_value      θ → (Vit_Ω(θ), Q, r)               Alg. 3 forward     backward: g·E (below)
#   structattn::viterbi_marginals  θ → (E, Q, U, r)                    Alg. 3 fwd + bwd   backward: ∇²Vit_Ω(θ)·Z
#   structattn::viterbi_backward   (Q, r) → (E, U)                     Alg. 3 backward sweep (value's first-order
#                                                                      backward: no second forward pass)
#   structattn::viterbi_hvp        (Q, U, r, Z) → (⟨E, Z⟩, ∇²Vit_Ω·Z)  Alg. 4
#
# Q, U, r are the intermediates of Alg. 3 that the backward passes reuse; they are returned (not differentiable) so
# that autograd can save them. Derivatives: value' = marginals op when the gradient must itself be differentiable
# (create_graph), else the backward sweep from the saved Q, r; marginals' = the HVP op, or, for a third derivative,
# the differentiable reference passes rerun with autograd recording (rare; tests only).

_NS = "structattn"


def _backend_for(device: torch.device, backend: str):
    """The implementation of ``backend``, if it can run on ``device`` at all (its registered devices, or its
    interpreter devices: the op does not re-read TRITON_INTERPRET; resolve_backend checked the call)."""
    entry = _kernels.find(backend) if isinstance(backend, str) else None
    if entry is None or not entry.runs_on(device.type):
        allowed = tuple(e.name for e in _kernels.specs() if e.runs_on(device.type))
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors (allowed: {allowed})")
    return entry.load()


def _value_impl(
    theta: Tensor, lengths: Tensor | None, reg: str, gamma: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Alg. 3 forward: (Vit_Ω(θ) (B,), Q (B,T,S,S), r = ∇max_Ω(v_T) (B,S))."""
    impl = _backend_for(theta.device, backend)
    lengths = _check_values(theta, lengths)
    value, Q, r = impl.forward(theta, lengths, reg, gamma)
    return value, Q, r


def _marginals_impl(
    theta: Tensor, lengths: Tensor | None, reg: str, gamma: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Alg. 3 forward + backward: (E = ∇Vit_Ω(θ) (B,T,S,S), Q (B,T,S,S), U (B,T,S), r (B,S))."""
    impl = _backend_for(theta.device, backend)
    lengths = _check_values(theta, lengths)
    _, Q, r, E, U = impl.marginals(theta, lengths, reg, gamma)
    return E, Q, U, r


_value_op = torch.library.custom_op(f"{_NS}::viterbi_value", _value_impl, mutates_args=())
_marginals_op = torch.library.custom_op(f"{_NS}::viterbi_marginals", _marginals_impl, mutates_args=())


def _backward_impl(Q: Tensor, r: Tensor, lengths: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    """Alg. 3 backward sweep from the saved Q, r: (E (B,T,S,S), U (B,T,S))."""
    return _backend_for(Q.device, backend).backward(Q, r, lengths)


def _hvp_impl(
    Q: Tensor, U: Tensor, r: Tensor, Z: Tensor, lengths: Tensor | None, reg: str, gamma: float, backend: str
) -> tuple[Tensor, Tensor]:
    """Alg. 4 from the saved Q, U, r: (⟨E, Z⟩ (B,), ∇²Vit_Ω(θ)·Z (B,T,S,S))."""
    return _backend_for(Q.device, backend).hvp(Q, U, r, Z.to(Q.dtype), lengths, reg, gamma)


_backward_op = torch.library.custom_op(f"{_NS}::viterbi_backward", _backward_impl, mutates_args=())
_hvp_op = torch.library.custom_op(f"{_NS}::viterbi_hvp", _hvp_impl, mutates_args=())


def _new(like: Tensor, backend: str, *shape: int) -> Tensor:
    """An empty per-chain (B, …) output laid out as the backend lays it out: a backend registered ``chain_minor``
    (the Triton kernels) stores per-step tensors as a (B, …) view of a contiguous (…, B) buffer (see
    kernels.triton_viterbi.chain_minor), the others batch-major. The fake kernels must reproduce the strides, not
    only the shapes."""
    entry = _kernels.find(backend)
    if entry is not None and entry.chain_minor and len(shape) > 1:
        buf = like.new_empty(*shape[1:], shape[0])
        return buf.permute(buf.dim() - 1, *range(buf.dim() - 1))
    return like.new_empty(*shape)


@_value_op.register_fake
def _(theta, lengths, reg, gamma, backend):
    B, T, S, _ = theta.shape
    return theta.new_empty(B), _new(theta, backend, B, T, S, S), theta.new_empty(B, S)


@_marginals_op.register_fake
def _(theta, lengths, reg, gamma, backend):
    B, T, S, _ = theta.shape
    return (_new(theta, backend, B, T, S, S), _new(theta, backend, B, T, S, S), _new(theta, backend, B, T, S),
            theta.new_empty(B, S))


@_backward_op.register_fake
def _(Q, r, lengths, backend):
    B, T, S, _ = Q.shape
    return _new(Q, backend, B, T, S, S), _new(Q, backend, B, T, S)


@_hvp_op.register_fake
def _(Q, U, r, Z, lengths, reg, gamma, backend):
    B, T, S, _ = Q.shape
    return Q.new_empty(B), _new(Q, backend, B, T, S, S)


# ---- derivatives ---------------------------------------------------------------------------------------------------
# Written once, parametrised by how the passes they need are called: as ops when registered with the ops (inside a
# compiled graph, AOTAutograd traces the backward with fake tensors and needs the ops' fake kernels), or directly in
# the eager twins below.


def _value_setup(ctx, inputs, output):
    theta, lengths, reg, gamma, backend = inputs
    _, Q, r = output
    ctx.reg, ctx.gamma, ctx.backend = reg, gamma, backend
    # Q, r are saved intermediates: no gradient flows into them, and none is materialised as zeros.
    ctx.mark_non_differentiable(Q, r)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(theta, Q, r, lengths)


def _value_grad(ctx, g, marginals, backward_pass):
    """∂Vit_Ω/∂θ · g = g·E (Alg. 3)."""
    if g is None:  # grads are not materialised: the value did not reach the loss
        return None, None, None, None, None
    theta, Q, r, lengths = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: E must be differentiable in θ, so it comes from the marginals pass (whose backward is
        # Alg. 4) instead of the sweep over the saved Q, r (whose dependence on θ autograd cannot see).
        E = marginals(theta, lengths, ctx.reg, ctx.gamma, ctx.backend)[0]
    else:
        E = backward_pass(Q, r, lengths, ctx.backend)[0]
    return g[:, None, None, None] * E, None, None, None, None


def _marginals_setup(ctx, inputs, output):
    theta, lengths, reg, gamma, backend = inputs
    _, Q, U, r = output
    ctx.reg, ctx.gamma, ctx.backend = reg, gamma, backend
    ctx.mark_non_differentiable(Q, U, r)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(theta, Q, U, r, lengths)


def _marginals_grad(ctx, Z, hvp_pass):
    """Z ↦ ∇²Vit_Ω(θ)·Z (Alg. 4; the Hessian is symmetric)."""
    if Z is None:  # grads are not materialised: the marginals did not reach the loss
        return None, None, None, None, None
    theta, Q, U, r, lengths = ctx.saved_tensors
    if torch.is_grad_enabled():
        # A third derivative was asked for: rerun Alg. 3 + 4 in the differentiable reference code with autograd
        # recording, whatever the backend (rare; tests only).
        with torch.enable_grad():
            E_dot = _hvp_from_theta(theta, Z, _step_mask(lengths, theta.shape[1]), ctx.reg, ctx.gamma)
    else:
        E_dot = hvp_pass(Q, U, r, Z, lengths, ctx.reg, ctx.gamma, ctx.backend)[1]
    return E_dot, None, None, None, None


_value_op.register_autograd(lambda ctx, g, gQ, gr: _value_grad(ctx, g, _marginals_op, _backward_op),
                            setup_context=_value_setup)
_marginals_op.register_autograd(lambda ctx, Z, gQ, gU, gr: _marginals_grad(ctx, Z, _hvp_op),
                                setup_context=_marginals_setup)


# ---- eager entry points ----------------------------------------------------------------------------------------------
# torch.library's Python layers around a custom op (dispatch, the generated autograd.Function, argument binding) add
# ~0.1 ms to a Viterbi attention forward + backward at B=64, T=50 on CPU, +25 % of the normaliser (measured with
# benchmarks/normalizer.py). Outside a graph being compiled or exported, the public functions therefore enter through
# these autograd.Functions, built from the same implementations, setup and derivative functions as the ops.


class _ValueFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, lengths, reg, gamma, backend):
        out = _value_impl(theta, lengths, reg, gamma, backend)
        _value_setup(ctx, (theta, lengths, reg, gamma, backend), out)
        return out

    @staticmethod
    def backward(ctx, g, gQ, gr):
        return _value_grad(ctx, g, _MarginalsFunction.apply, _backward_impl)


class _MarginalsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, lengths, reg, gamma, backend):
        out = _marginals_impl(theta, lengths, reg, gamma, backend)
        _marginals_setup(ctx, (theta, lengths, reg, gamma, backend), out)
        return out

    @staticmethod
    def backward(ctx, Z, gQ, gU, gr):
        return _marginals_grad(ctx, Z, _hvp_impl)


def _value(theta, lengths, reg, gamma, backend):
    if torch.compiler.is_compiling():
        return _value_op(theta, lengths, reg, gamma, backend)
    return _ValueFunction.apply(theta, lengths, reg, gamma, backend)


def _marginals(theta, lengths, reg, gamma, backend):
    if torch.compiler.is_compiling():
        return _marginals_op(theta, lengths, reg, gamma, backend)
    return _MarginalsFunction.apply(theta, lengths, reg, gamma, backend)


# ---- public functions ------------------------------------------------------------------------------------------


def viterbi_value(
    theta: Tensor, lengths=None, reg: str = "entropy", gamma: float = 1.0, *, backend: str | None = None
) -> Tensor:
    """Smoothed Viterbi value Vit_Ω(θ) (ICML 2018 §3.1, App. B.2, Alg. 3 forward).

    Solves the smoothed Bellman recursion v_0 = 0_S, v_{t,i} = max_Ω(θ_{t,i} + v_{t−1}), Vit_Ω(θ) = max_Ω(v_T),
    where max_Ω(x) = max_{q ∈ △} ⟨q, x⟩ − Ω(q) with Ω = −γH (``reg="entropy"``) or (γ/2)‖·‖² (``reg="l2"``).

    Args:
        theta: (B, T, S, S) potentials; ``theta[b, t, i, j]`` scores state j at step t−1 → state i at step t.
        lengths: optional (B,) integer tensor in [0, T]; steps t ≥ lengths[b] are right padding and are ignored.
        reg: ``"entropy"`` or ``"l2"``.
        gamma: temperature γ > 0.
        backend: ``None`` (the process default, see :func:`set_default_backend`), ``"auto"``, ``"reference"``
            (plain tensor ops), ``"cpu"`` (C kernel) or ``"triton"`` (CUDA, S = 2); see :func:`resolve_backend`.
            All give the same numbers up to float rounding.

    Returns:
        (B,) values, in θ's dtype (float16/bfloat16 are computed in float32). Differentiable: the gradient is
        the marginal tensor E of :func:`viterbi_marginals` (custom backward, Alg. 3), and the gradient is itself
        differentiable (Alg. 4).

    Raises:
        ValueError: on a bad shape, S < 2, non-finite θ, ``lengths`` out of [0, T], unknown ``reg`` or γ ≤ 0.
        TypeError: on a non-float θ or non-integer ``lengths``.
    """
    theta_c, lengths, gamma, out_dtype = _prepare(theta, lengths, reg, gamma)
    name = resolve_backend(backend, theta_c)
    return _value(theta_c, lengths, reg, gamma, name)[0].to(out_dtype)


def viterbi_marginals(
    theta: Tensor, lengths=None, reg: str = "entropy", gamma: float = 1.0, *, backend: str | None = None
) -> Tensor:
    """Smoothed Viterbi marginals E = ∇Vit_Ω(θ) ∈ conv(Y) (ICML 2018 Prop. 3, App. B.2, Alg. 3).

    ``E[b, t, i, j]`` is the expected indicator of the move j → i at step t under the random walk of Prop. 3
    (for Ω = −γH the Gibbs marginal p(y_t = i, y_{t−1} = j) with p(y) ∝ exp(⟨Y, θ⟩/γ)). Every real step sums to
    1 over (i, j); padded steps (t ≥ lengths[b]) are exactly 0.

    Same arguments and errors as :func:`viterbi_value`. Returns (B, T, S, S) in θ's dtype. Differentiable: the
    backward computes the Hessian-vector product ∇²Vit_Ω(θ)·Z with Alg. 4 (custom backward).
    """
    theta_c, lengths, gamma, out_dtype = _prepare(theta, lengths, reg, gamma)
    name = resolve_backend(backend, theta_c)
    return _marginals(theta_c, lengths, reg, gamma, name)[0].to(out_dtype)


def viterbi_hvp(
    theta: Tensor, Z: Tensor, lengths=None, reg: str = "entropy", gamma: float = 1.0, *, backend: str | None = None
):
    """Directional derivative ⟨∇Vit_Ω(θ), Z⟩ (B,) and Hessian product ∇²Vit_Ω(θ)·Z (B, T, S, S) by Alg. 4,
    without autograd. Same arguments as :func:`viterbi_value` plus the direction ``Z`` of θ's shape."""
    theta_c, lengths, gamma, out_dtype = _prepare(theta, lengths, reg, gamma)
    if not isinstance(Z, Tensor) or Z.shape != theta.shape:
        raise ValueError(f"Z must be a tensor of theta's shape {tuple(theta.shape)}")
    name = resolve_backend(backend, theta_c)
    with torch.no_grad():
        _, Q, U, r = _marginals(theta_c, lengths, reg, gamma, name)
        hvp = _hvp_op if torch.compiler.is_compiling() else _hvp_impl
        dot, E_dot = hvp(Q, U, r, Z.to(theta_c.dtype), lengths, reg, gamma, name)
    return dot.to(out_dtype), E_dot.to(out_dtype)


class SmoothedViterbi(torch.nn.Module):
    """``nn.Module`` computing Vit_Ω(θ) (see :func:`viterbi_value`) with fixed ``reg`` and ``gamma``."""

    def __init__(self, reg: str = "entropy", gamma: float = 1.0):
        super().__init__()
        self.gamma = check_reg_gamma(reg, gamma)
        self.reg = reg

    def forward(self, theta: Tensor, lengths=None) -> Tensor:
        return viterbi_value(theta, lengths, self.reg, self.gamma)

    def extra_repr(self) -> str:
        return f"reg={self.reg!r}, gamma={self.gamma}"


class ViterbiMarginals(SmoothedViterbi):
    """``nn.Module`` computing E = ∇Vit_Ω(θ) (see :func:`viterbi_marginals`) with fixed ``reg`` and ``gamma``."""

    def forward(self, theta: Tensor, lengths=None) -> Tensor:
        return viterbi_marginals(theta, lengths, self.reg, self.gamma)
