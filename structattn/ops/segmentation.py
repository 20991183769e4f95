"""The segmentation attention normaliser of ICML 2018 §5 on rows of scores, and its fused CPU kernel.

For a row of scores s ∈ R^L (the real positions of one attention row) and a transition matrix T ∈ R^{2×2}, the
2-state chain y_t ∈ {0, 1} ("attend to x_t") has the potentials

    θ[t, 1, j] = s_t + T[1, j],    θ[t, 0, j] = T[0, j]                                   (§5),

E = ∇Vit_Ω(θ) (Alg. 3, :func:`structattn.viterbi_marginals`), p_t = p(y_t = 1) = Σ_j E[t, 1, j] and the weights are
w = p / Σ_t p_t. A *dead* row (Σ_t p_t ≤ tiny: every position lost to the all-zero path, possible with ℓ2) falls back
to softmax(s). Derivatives: through w = p/Σp (or the softmax), then ∂L/∂θ = ∇²Vit_Ω(θ)·Z (Alg. 4) with the direction
Z[t, 1, j] = ∂L/∂p_t, Z[t, 0, j] = 0, then ∂L/∂s_t = Σ_j ∂L/∂θ[t, 1, j] and ∂L/∂T = Σ_t ∂L/∂θ[t].

:func:`segmentation_weights` is the one implementation behind :func:`structattn.attention.viterbi_attention` and
:func:`~structattn.attention.multihead_viterbi_attention` (which check their arguments and own the public API). It
has two paths that agree to float rounding (tests/test_segmentation.py):

* **fused** (CPU tensors, float32/float64, when the Viterbi backend resolves to the C kernel): the whole map —
  compaction of the real positions, centring, θ, Alg. 3, the normalisation, the fallback, the scatter back — is one C
  call, and its backward (Alg. 4 included) a second one (``kernels/_cpu_segment_source.py``), entered through an
  ``autograd.Function`` in eager mode and through the custom ops ``structattn::segmentation_attention`` and
  ``::segmentation_attention_backward`` inside a graph being compiled. A gradient of this gradient (``create_graph``)
  is computed by the unfused path, recomputed from the saved inputs with autograd recording.
* **unfused** (any device, any backend, and the reference for the tests): tensor operations around
  :func:`~structattn.viterbi_marginals`, each with its own autograd node.

The fused path exists for speed: at B = 64 rows of T = 50 the unfused path spends ~0.37 ms in ~20 small tensor
operations and their autograd nodes around a Viterbi kernel of ~0.06 ms (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import cpu as _cpu
from .viterbi import _interpreting, _resolve, get_default_backend, viterbi_marginals

__all__ = ["check_transitions", "segmentation_potentials", "segmentation_weights", "row_flags", "masked_softmax",
           "centre_rows", "fused_path_available", "chain_coupling", "coupling_verdict", "INDEPENDENT_KAPPA",
           "COUPLED_KAPPA",
           "HAS_REAL", "DEAD", "FROZEN"]

#: Rows × positions per thread below which the fused kernel does not split its blocks between threads (when torch
#: has more than one): measured on a 2-core VM, a second thread made 512 rows × 50 positions (25.6k chain steps,
#: 0.26 ms forward + backward) slower, 0.36 ms, and 11200 × 45 faster, 8.0 → 5.6 ms (benchmarks/RESULTS.md).
_THREAD_MIN_WORK = 131072


#: Bits of the row flags (:func:`row_flags`): the row has a real position; it is *dead* (p(y_t = 1) ≤ tiny, the
#: smallest normal float, at every real t: it falls back to softmax); it is *frozen* (every real p(y_t = 1) exactly 0
#: or 1: a hard path, whose ℓ2 Jacobian is 0). Dead and frozen rows have a real position.
HAS_REAL, DEAD, FROZEN = 1, 2, 4


def row_flags(p: Tensor, mask: Tensor | None) -> Tensor:
    """(N,) int32 flags (:data:`HAS_REAL` | :data:`DEAD` | :data:`FROZEN`) of rows of marginals p (N, T), ``mask``
    True at padding (already checked). The fused kernel computes the same flags in C."""
    p = p.detach()
    if mask is None:
        has_real = torch.full((p.shape[0],), p.shape[1] > 0, dtype=torch.bool, device=p.device)
    else:
        p, has_real = p.masked_fill(mask, 0.0), ~mask.all(-1)
    dead = (p.sum(-1) <= torch.finfo(p.dtype).tiny) & has_real
    frozen = ((p == 0) | (p == 1)).all(-1) & has_real  # padding was set to 0: binary
    return has_real.int() * HAS_REAL + dead.int() * DEAD + frozen.int() * FROZEN


def masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(s) over the real positions of each row (``mask`` True at padding, already checked); exactly 0 on
    padding, all 0 on a row without real position."""
    if mask is None:
        return torch.softmax(scores, dim=-1)
    # A finite fill (not −inf) keeps all-padding rows free of NaN, in the value and in the gradient.
    filled = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1).masked_fill(mask, 0.0)


def centre_rows(scores: Tensor, mask: Tensor | None) -> Tensor:
    """s_t − mean_{t' real} s_{t'} on the real positions (padding and rows without real position unchanged)."""
    if mask is None:
        return scores - scores.mean(-1, keepdim=True)
    real = (~mask).to(scores.dtype)
    n = real.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (scores.masked_fill(mask, 0.0) * real).sum(-1, keepdim=True) / n
    return torch.where(mask, scores, scores - mean)


def check_transitions(transitions, batch: int) -> Tensor:
    """``transitions`` itself if it is a tensor of shape (2, 2) or (``batch``, 2, 2); TypeError/ValueError
    otherwise."""
    if not isinstance(transitions, Tensor):
        raise TypeError("transitions must be a torch.Tensor")
    if transitions.shape[-2:] != (2, 2) or transitions.dim() not in (2, 3):
        raise ValueError(f"transitions must have shape (2, 2) or (B, 2, 2), got {tuple(transitions.shape)}")
    if transitions.dim() == 3 and transitions.shape[0] != batch:
        raise ValueError(f"transitions has batch size {transitions.shape[0]}, scores has {batch}")
    return transitions


def segmentation_potentials(scores: Tensor, transitions: Tensor) -> Tensor:
    """θ (B, T, 2, 2) of the segmentation attention (§5): θ[t, 1, j] = s_t + T[1, j], θ[t, 0, j] = T[0, j].

    ``transitions`` is T, of shape (2, 2) or (B, 2, 2); T[i, j] scores state j at t−1 → state i at t."""
    check_transitions(transitions, scores.shape[0])
    trans = transitions if transitions.dim() == 2 else transitions[:, None]
    # θ = T + s ⊗ [[0, 0], [1, 1]] (state 0 has no unary score): one fused op; the equivalent stack + broadcast
    # add runs ~5x slower on CPU with these size-2 inner dimensions, and this was on every decoder step.
    rows = scores.new_tensor([[0.0, 0.0], [1.0, 1.0]])
    return torch.addcmul(trans.to(scores.dtype), scores[:, :, None, None], rows)


#: |κ| below which :func:`coupling_verdict` calls a chain "independent positions", and from which it calls it coupled
#: (in between: weakly). For Ω = −γH, κ is the log odds ratio of the pairwise factor of two neighbours: |κ| < 0.25
#: means that attending to x_{t−1} changes the odds of attending to x_t by less than e^0.25 ≈ 1.28×, whatever the
#: scores — a chain that adds next to nothing to independent per-position gates; |κ| ≥ 1 changes them by e ≈ 2.7×
#: or more. (The stable form's contiguity prior c = 1 starts at κ = 2c = 2.)
INDEPENDENT_KAPPA = 0.25
COUPLED_KAPPA = 1.0


def chain_coupling(transitions: Tensor, gamma: float = 1.0) -> Tensor:
    """κ = (T[0, 0] + T[1, 1] − T[0, 1] − T[1, 0]) / γ of transition matrices ``transitions`` (..., 2, 2) → (...).

    Why this number and not the entries of T: a transition matrix of the form T[i, j] = f(i) + g(j) makes the
    chain factorise into independent positions, for both Ω — the DP value of step t is then
    v_{t,i} = θ_t(i) + f(i) + max_Ω(g + v_{t−1}) (max_Ω commutes with adding a constant), so every local argmax_Ω
    of Alg. 3's backward pass is the same whatever the next state, and p(y_t = 1) is a per-position gate: T only
    shifts the scores. Of the four entries of T, three are such a shift (f(0), f(1), g(1) − g(0) and a common
    constant account for them); κ is the one direction that couples neighbours: κ > 0 rewards staying in a state
    (contiguous segments), κ < 0 rewards switching, κ = 0 is independent positions. For Ω = −γH, κ is the log odds
    ratio of the neighbours' pairwise factor; for ℓ2 it is the same scale-free measure (tested: κ = 0 gives the
    per-position marginals exactly for both Ω, tests/test_coupling.py)."""
    if not isinstance(transitions, Tensor) or transitions.shape[-2:] != (2, 2):
        raise ValueError(f"transitions must be a tensor of shape (..., 2, 2), got "
                         f"{getattr(transitions, 'shape', type(transitions))}")
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma > 0 and gamma < float("inf")):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    t = transitions.detach()
    return (t[..., 0, 0] + t[..., 1, 1] - t[..., 0, 1] - t[..., 1, 0]) / gamma


def coupling_verdict(kappa: float) -> str:
    """``"independent positions"`` if |κ| < :data:`INDEPENDENT_KAPPA`; else ``"contiguous"`` (κ > 0: staying in a
    state is rewarded) or ``"alternating"`` (κ < 0: switching is rewarded), prefixed by ``"weakly "`` while
    |κ| < :data:`COUPLED_KAPPA`. NaN (no Viterbi attention) gives ``"n/a"``."""
    kappa = float(kappa)
    if kappa != kappa:
        return "n/a"
    if abs(kappa) < INDEPENDENT_KAPPA:
        return "independent positions"
    word = "contiguous" if kappa > 0 else "alternating"
    return word if abs(kappa) >= COUPLED_KAPPA else "weakly " + word


def fused_path_available(scores: Tensor) -> bool:
    """Whether :func:`segmentation_weights` takes the fused C path for these scores (CPU, float32/float64, the
    process's Viterbi backend resolving to ``"cpu"``: ``viterbi_backend("reference")`` turns it off)."""
    if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64):
        return False
    # _resolve is evaluated at trace time under torch.compile (ops/viterbi.py): the choice is baked into the graph.
    return _resolve(get_default_backend(), "cpu", scores.dtype, 2, _interpreting()) == "cpu"


def segmentation_weights(scores: Tensor, trans: Tensor, mask: Tensor | None, reg: str, gamma: float, *,
                         centre: bool = False, tdiv: int = 1, flags: bool = False):
    """(w, p) — or (w, p, row flags) if ``flags`` — the segmentation attention weights and p(y_t = 1) of every row of
    ``scores`` (module docstring).

    Args (checked by the callers in :mod:`structattn.attention`):
        scores: (N, T) float32/float64 scores; padded entries may hold anything (±inf, NaN), they are not read.
        trans: (2, 2) transition matrix shared by the rows, or (M, 2, 2) matrices, row b using
            ``trans[(b // tdiv) % M]`` (M = N: one per row; M = heads with tdiv = queries: the rows of multi-head
            attention in (batch, head, query) order).
        mask: (N, T) bool, True at padding (any layout), or None.
        reg, gamma: Ω and γ > 0.
        centre: centre each row's real scores on their mean first (the stable form).
        flags: also return the (N,) int32 flags of :func:`row_flags` (free on the fused path).

    Returns:
        w (N, T) (0 on padding, rows summing to 1, all-padding rows all 0) and p (N, T) (before normalisation and
        fallback). Differentiable w.r.t. ``scores`` and ``trans``, twice where Vit_Ω is.
    """
    for name, x in (("transitions", trans), ("padding_mask", mask)):
        if x is not None and x.device != scores.device:
            raise ValueError(f"{name} is on {x.device}, the scores on {scores.device}: put them on one device")
    if scores.numel() > 0 and fused_path_available(scores):
        if torch.compiler.is_compiling():
            out = _forward_op(scores, trans, mask, reg, gamma, centre, tdiv)
        else:
            out = _FusedFunction.apply(scores, trans, mask, reg, gamma, centre, tdiv)
        return out[:3] if flags else out[:2]
    w, p = _unfused(scores, trans, mask, reg, gamma, centre, tdiv)
    return (w, p, row_flags(p, mask)) if flags else (w, p)


# ---- unfused path (tensor operations) -------------------------------------------------------------------------------


def _row_transitions(trans: Tensor, n: int, tdiv: int) -> Tensor:
    """(2, 2) when shared, else the (n, 2, 2) per-row matrices."""
    if trans.dim() == 2:
        return trans
    if trans.shape[0] == 1:
        return trans[0]
    if trans.shape[0] == n and tdiv == 1:
        return trans
    rows = (torch.arange(n, device=trans.device) // tdiv) % trans.shape[0]
    return trans[rows]


def _unfused(scores, trans, mask, reg, gamma, centre, tdiv):
    if centre:
        scores = centre_rows(scores, mask)
    N, T = scores.shape
    tr = _row_transitions(trans, N, tdiv)
    if mask is None:
        theta = segmentation_potentials(scores, tr)
        p = viterbi_marginals(theta, None, reg, gamma)[:, :, 1, :].sum(-1)
    else:
        # Compact real positions to the front, in order, so that the chain sees exactly the unpadded sentence
        # whatever the padding side: column t goes to `dest[b, t]` (its rank among the real positions, padding
        # after them). One cumsum and a scatter: a sort here cost more than the whole Viterbi kernel. Padded
        # scores are zeroed (callers may fill them with ±inf/NaN) and ignored by viterbi_marginals via `lengths`.
        real = ~mask
        rank = real.cumsum(1)
        lengths = rank[:, -1]
        pads_before = torch.arange(1, T + 1, device=scores.device) - rank
        dest = torch.where(real, rank - 1, lengths[:, None] + pads_before - 1)
        compact = torch.zeros_like(scores).scatter(1, dest, scores.masked_fill(mask, 0.0))
        theta = segmentation_potentials(compact, tr)
        p = viterbi_marginals(theta, lengths, reg, gamma)[:, :, 1, :].sum(-1).gather(1, dest)
    total = p.sum(-1, keepdim=True)
    ok = total > torch.finfo(p.dtype).tiny
    # A safe denominator: dividing by 0 in the branch that torch.where discards would still put NaN in the gradient.
    w = p / torch.where(ok, total, torch.ones_like(total))
    # Eager mode computes the fallback only when a row needs it; compiled code always does (no host read).
    if torch.compiler.is_compiling() or not bool(ok.all()):
        w = torch.where(ok, w, masked_softmax(scores, mask))
    return w, p


# ---- fused path (C kernel) ------------------------------------------------------------------------------------------


def _threads(n: int, t: int) -> int:
    k = torch.get_num_threads()
    if k <= 1 or n * t < _THREAD_MIN_WORK:
        return 1
    return max(1, min(k, n // _cpu.CHAINS_PER_BLOCK, n * t // _THREAD_MIN_WORK))


def _ready(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``x`` contiguous and of ``dtype`` for the C kernel, converting only when needed (each no-op tensor call
    costs ~1 µs at these sizes)."""
    if x is None:
        return None
    if x.dtype != dtype:
        x = x.to(dtype)
    return x if x.is_contiguous() else x.contiguous()


def _forward_impl(scores: Tensor, trans: Tensor, mask: Tensor | None, reg: str, gamma: float, centre: bool,
                  tdiv: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(w, p, flags, ws, iws): the outputs and the buffers the backward needs; raises on non-finite input."""
    scores = _ready(scores, scores.dtype)
    bad, out = _cpu.segment_forward(scores, _ready(mask, torch.bool), _ready(trans, scores.dtype), tdiv, centre,
                                    reg, gamma, _threads(*scores.shape))
    if bad:
        raise ValueError(
            f"{bad} attention row(s) have non-finite (NaN or ±inf) scores at real (non-padded) positions, non-finite "
            "transitions, or scores so large that the potentials overflow; Vit_Ω needs finite potentials (mark "
            "padding with padding_mask instead)")
    return out


def _backward_impl(gw: Tensor, gp: Tensor | None, w: Tensor, ws: Tensor, iws: Tensor, M: int, reg: str,
                   gamma: float, centre: bool, tdiv: int) -> tuple[Tensor, Tensor]:
    """(∂L/∂s (N, T), ∂L/∂T (M, 2, 2), or (2, 2) when M = 0: one shared matrix given as (2, 2))."""
    return _cpu.segment_backward(_ready(gw, w.dtype), _ready(gp, w.dtype), w, ws, iws, M, tdiv, centre, reg, gamma,
                                 _threads(*w.shape))


_NS = "structattn"
_forward_op = torch.library.custom_op(f"{_NS}::segmentation_attention", _forward_impl, mutates_args=())
_backward_op = torch.library.custom_op(f"{_NS}::segmentation_attention_backward", _backward_impl, mutates_args=())


@_forward_op.register_fake
def _(scores, trans, mask, reg, gamma, centre, tdiv):
    N, T = scores.shape
    n_real, n_int = _cpu.segment_workspace(N, T)
    return (scores.new_empty(N, T), scores.new_empty(N, T), scores.new_empty(N, dtype=torch.int32),
            scores.new_empty(n_real), scores.new_empty(n_int, dtype=torch.int32))


@_backward_op.register_fake
def _(gw, gp, w, ws, iws, M, reg, gamma, centre, tdiv):
    return torch.empty_like(w), (w.new_empty(M, 2, 2) if M else w.new_empty(2, 2))


def _setup(ctx, inputs, output):
    scores, trans, mask, reg, gamma, centre, tdiv = inputs
    w, p, flags, ws, iws = output
    ctx.reg, ctx.gamma, ctx.centre, ctx.tdiv = reg, gamma, centre, tdiv
    ctx.mark_non_differentiable(flags, ws, iws)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(scores, trans, mask, w, ws, iws)


def _grad(ctx, gw, gp, backward_pass):
    none = (None,) * 5
    if gw is None and gp is None:  # grads are not materialised: neither output reached the loss
        return (None, None) + none
    scores, trans, mask, w, ws, iws = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the gradient must itself be differentiable; rerun the unfused path with autograd
        # recording and differentiate it (its backward is Alg. 4, whose own backward is the reference code).
        return _grad_of_unfused(ctx, scores, trans, mask, gw, gp) + none
    gw = torch.zeros_like(w) if gw is None else gw
    M = 0 if trans.dim() == 2 else trans.shape[0]
    gs, gT = backward_pass(gw, gp, w, ws, iws, M, ctx.reg, ctx.gamma, ctx.centre, ctx.tdiv)
    return (gs if gs.dtype == scores.dtype else gs.to(scores.dtype)), \
        (gT if gT.dtype == trans.dtype else gT.to(trans.dtype)), *none


def _grad_of_unfused(ctx, scores, trans, mask, gw, gp):
    wanted = [x for x, need in zip((scores, trans), ctx.needs_input_grad[:2]) if need]
    with torch.enable_grad():
        w, p = _unfused(scores, trans, mask, ctx.reg, ctx.gamma, ctx.centre, ctx.tdiv)
        outs, grads = zip(*[(o, g) for o, g in ((w, gw), (p, gp)) if g is not None])
        got = iter(torch.autograd.grad(outs, wanted, grads, create_graph=True, allow_unused=True))
    return tuple(next(got) if need else None for need in ctx.needs_input_grad[:2])


_forward_op.register_autograd(lambda ctx, gw, gp, *rest: _grad(ctx, gw, gp, _backward_op), setup_context=_setup)


class _FusedFunction(torch.autograd.Function):
    """The eager twin of the custom op (torch.library's Python layers cost ~30 µs per call, ops/viterbi.py)."""

    @staticmethod
    def forward(ctx, scores, trans, mask, reg, gamma, centre, tdiv):
        out = _forward_impl(scores, trans, mask, reg, gamma, centre, tdiv)
        _setup(ctx, (scores, trans, mask, reg, gamma, centre, tdiv), out)
        return out

    @staticmethod
    def backward(ctx, gw, gp, *rest):
        return _grad(ctx, gw, gp, _backward_impl)
