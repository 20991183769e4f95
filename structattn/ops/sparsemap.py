"""SparseMAP over the segmentation attention's 2-state chain, by the active-set method, and its backward.

Niculae, Martins, Blondel & Cardie, "SparseMAP: Differentiable Sparse Structured Inference", ICML 2018 (section and
proposition numbers below are the published paper's; our copy, ../shared/seeds/002_*, holds only its first page and
tutorial slides, so they were not re-checked against the text). A structure
is a path y = (y_0, y_1, …, y_L) ∈ {0, 1}^{L+1} of the chain of the segmentation attention (Mensch & Blondel 2018,
§5), scored ⟨θ, E_y⟩ = Σ_{t=1..L} θ[t, y_t, y_{t−1}] with

    θ[t, 1, j] = s_t + T[1, j],    θ[t, 0, j] = T[0, j],

i.e. score(y) = Σ_t s_t y_t + Σ_{i,j} T[i, j]·#{t : y_t = i, y_{t−1} = j}. As in the smoothed Viterbi (v_0 = 0), the
start state y_0 is free: it enters only through the first transition T[y_1, y_0].

Which marginals are regularised. We follow the paper's form for sequences: the structure's indicator vector is split
into a unary part u_y ∈ {0, 1}^{L×2} (u_y[t, i] = [y_t = i], t = 1..L, both states) and a pairwise part (the
transition indicators); only the unary part is regularised, the pairwise scores stay linear:

    SparseMAP(θ) = argmax_{μ = [u; v] ∈ conv{[u_y; v_y]}} ⟨θ, μ⟩ − ½‖u‖².

Since u[t, 0] + u[t, 1] = 1, ½‖u‖² = Σ_t (p_t² − p_t) + L/2 with p_t = u[t, 1] = p(y_t = 1): the state marginals are
what the attention uses (w_t ∝ p_t), and u — hence p — is unique (the objective is strictly concave in u), while the
distribution α over structures need not be. Regularising all edge marginals of θ's (L, 2, 2) representation instead
would be a different mapping (it also penalises mixing transitions); we do not ship it.

Solver (the paper's §3.1: the active-set method, Nocedal & Wright 2006, Alg. 16.3, on the vertex form). With G the
Gram matrix of the active structures' unary vectors, G_ab = ⟨u_a, u_b⟩ = #{t : y_{a,t} = y_{b,t}}, and s_a their
scores, the problem is max_{α ∈ △} sᵀα − ½αᵀGα. Each iteration solves the equality-constrained problem on the active
set I, the KKT system [[G_I, 1], [1ᵀ, 0]]·[β; τ] = [s_I; 1], and either

* moves α towards β and drops the blocking structure if β has a negative entry, or
* sets α = β and calls the MAP oracle with the unary potentials shifted by the gradient, −u: the hard Viterbi argmax
  y* of s_y − ⟨u_y, u⟩ (θ[t, 1, ·] − p_t, θ[t, 0, ·] − (1 − p_t)). Its Frank–Wolfe gap
  (s_{y*} − ⟨u_{y*}, u⟩) − Σ_a α_a (s_a − ⟨u_a, u⟩) ≥ 0 bounds the suboptimality; below ``tol``·(1 + |objective
  part|) the row has converged, otherwise y* joins the active set — with weight 0, or, when u_{y*} lies in the affine
  hull of the active unary vectors (common: 0/1 vectors such as 111000 + 000111 = 111111 + 000000), by a pivot that
  swaps it for one active structure, so that the KKT matrices stay nonsingular. (This degenerate case is our
  addition; without it such rows cycled or stopped early on small scores.)

The iteration starts from the oracle's structure at p = 0 (α = 1). Two implementations of this one algorithm:

* **C** (``kernels/_cpu_sparsemap_source.py``, loaded by :mod:`.kernels.cpu_sparsemap`; CPU tensors, whenever a C
  compiler works): row by row, the same steps, slots, tie rules, tolerance, cap and non-convergence report, with the
  KKT systems solved through a Cholesky factor of G_I that is updated when a structure joins or leaves (O(K²) per
  iteration) and the hard Viterbi oracle in the same loop. It returns the same p (to float rounding, ~1e-14) and,
  where the row's optimum is not degenerate, the same structures and α; on degenerate rows (many structures tie at
  the optimum, typical when T ≈ 0) rounding can make the two implementations pick different, equally optimal
  decompositions of the same p (tests/test_sparsemap_c.py). Its backward is the one KKT solve below, in C.
* **tensor** (:func:`_solve`, the reference, and the fallback when no compiler works or on other devices): the oracle
  is a batched tensor Viterbi argmax; all rows run together: each iteration solves the small KKT systems of the rows
  that have not converged yet as one batched solve (float64) and runs one oracle pass over them.

Speed (benchmarks/RESULTS.md, "SparseMAP normaliser"): the C path is what makes SparseMAP usable in training; it does
not reach the 2× softmax goal on CPU (measured ratios there): a row needs about one oracle pass per active structure.
Rows that reach ``max_iter`` iterations keep their last α — a feasible point, not the optimum — and are reported
(``converged`` False, and a RuntimeWarning); they are never silently returned as if solved.

Backward (the paper's §3.2, Prop. 1: the Jacobian on the support). On the final support I (α_a > 0), α = P s_I + c
with P the top-left block of the inverse KKT matrix (= Z − Z11ᵀZ/(1ᵀZ1), Z = G_I⁻¹, when G_I is invertible), and
u = M_I α. For a gradient g_p = ∂L/∂p (so g_u = [0; g_p]), β = P·(M_Iᵀ g_u), i.e. β_a = Σ_t y_{a,t} g_{p,t}
projected by one KKT solve, and ∂L/∂θ = Σ_a β_a E_a: ∂L/∂s_t = Σ_a β_a y_{a,t}, ∂L/∂T[i, j] = Σ_a β_a #{t : y_{a,t} = i,
y_{a,t−1} = j}. It is the exact derivative wherever the support does not change under a small perturbation of θ
(almost everywhere); no autograd through the solver's iterations. Gradients of gradients are not supported.

Entry point: :func:`sparsemap_weights` (compaction of the real positions, w ∝ p, the softmax fallback), used by
:func:`structattn.attention.sparsemap_attention`. The solver and its backward are the ``torch.library`` custom ops
``structattn::sparsemap_segmentation`` and ``::sparsemap_segmentation_backward`` (fake kernels registered), so
``torch.compile(fullgraph=True)`` traces the data-dependent loop as one opaque node.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .segmentation import masked_softmax, row_flags

__all__ = ["sparsemap_weights", "sparsemap_chain", "DEFAULT_TOL", "DEFAULT_MAX_ITER"]

#: Default tolerance on the relative Frank–Wolfe gap (the active set normally ends with a gap at rounding level).
DEFAULT_TOL = 1e-9
#: Default cap on active-set iterations per row (each adds or drops one structure).
DEFAULT_MAX_ITER = 100

# A transition score that no path takes: padded steps of a compacted row use [[0, −BIG], [−BIG, 0]], so the Viterbi
# argmax carries its state through them unchanged (finite, so that no inf − inf appears in float64).
_BIG = 1e30


def _slots(max_iter: int, T: int) -> int:
    """Capacity of the active set: one structure added per iteration at most (plus the initial MAP), and at most
    L + 1 affinely independent unary vectors in dimension L (+1 for slack on degenerate ties)."""
    return min(max_iter + 1, T + 2)


# ---- the MAP oracle: hard Viterbi on the 2-state chain -------------------------------------------------------------


def _viterbi_argmax(unary: Tensor, from0: Tensor, from1: Tensor) -> tuple[Tensor, Tensor]:
    """argmax_y Σ_t (unary[t, y_t] + T_t[y_t, y_{t−1}]) over paths (y_0, …, y_T), y_0 free (v_0 = 0).

    unary (n, T, 2); from0 / from1 (n, T, 2) the transition scores T_t[·, 0] / T_t[·, 1] (identity-like on padded
    steps) → y (n, T) long, y0 (n,) long. Ties go to the lower previous state. Written with torch.maximum and a
    comparison rather than ``max(dim)``, which costs ~25x more per call on these (n, 2, 2) tensors."""
    n, T, _ = unary.shape
    v = unary.new_zeros(n, 2)
    bps = []
    for u_t, a_t, b_t in zip(unary.unbind(1), from0.unbind(1), from1.unbind(1)):
        a = a_t + v[:, :1]  # from state 0: v[0] + T[i, 0]
        b = b_t + v[:, 1:]  # from state 1: v[1] + T[i, 1]
        bps.append(b > a)
        v = torch.maximum(a, b) + u_t
    y = (v[:, 1:] > v[:, :1]).long()
    if not bps:
        return unary.new_zeros(n, 0, dtype=torch.long), y.squeeze(1)
    out = []
    for bp in reversed(torch.stack(bps, 1).long().unbind(1)):
        out.append(y)
        y = bp.gather(1, y)
    out.reverse()
    return torch.cat(out, 1), y.squeeze(1)


def _structure_counts(Y: Tensor, Y0: Tensor, real: Tensor) -> Tensor:
    """Transition counts n[i, j] = #{t real : y_t = i, y_{t−1} = j} of structures Y (n, K, T) float, Y0 (n, K)
    float → (n, K, 2, 2)."""
    prev = torch.cat([Y0.unsqueeze(-1), Y[..., :-1]], -1)
    r = real.unsqueeze(1)
    one, zero = Y * r, (1 - Y) * r
    n11, n10 = (one * prev).sum(-1), (one * (1 - prev)).sum(-1)
    n01, n00 = (zero * prev).sum(-1), (zero * (1 - prev)).sum(-1)
    return torch.stack([torch.stack([n00, n01], -1), torch.stack([n10, n11], -1)], -2)


def _scores_of(Y: Tensor, Y0: Tensor, s: Tensor, trans: Tensor, real: Tensor) -> Tensor:
    """⟨θ, E_y⟩ of structures Y (n, K, T), Y0 (n, K) for scores s (n, T) (0 on padding) and T (n, 2, 2)."""
    return (Y * s.unsqueeze(1)).sum(-1) + (_structure_counts(Y, Y0, real) * trans.unsqueeze(1)).sum((-1, -2))


def _gram(Y: Tensor, realf: Tensor) -> Tensor:
    """G_ab = ⟨u_a, u_b⟩ = #{t real : y_{a,t} = y_{b,t}} for Y (n, K, T) float (0 on padding)."""
    Z = realf.unsqueeze(1) - Y  # [y_t = 0] on real steps
    return Y @ Y.transpose(1, 2) + Z @ Z.transpose(1, 2)


def _gram_column(Y: Tensor, y: Tensor, L: Tensor) -> Tensor:
    """⟨u_a, u_y⟩ = L − |y_a| − |y| + 2⟨y_a, y⟩ for structures Y (n, K, T) and one y (n, T) (0 on padding)."""
    return 2 * (Y * y.unsqueeze(1)).sum(-1) + (L - y.sum(-1)).unsqueeze(1) - Y.sum(-1)


@contextlib.contextmanager
def _one_thread():
    """Run the solver on one intra-op thread. It is a long chain of tiny tensor operations (rows × ≤ K slots × T);
    measured on the 2-core VM under load, letting them fan out made single ops 100–1000x slower (a (512, 8, 50)
    batched matmul took 2.5 ms and an (8, 2, 2) reduction 10 ms with 2 threads, vs 2.2 ms / 4 µs with one), because
    every parallel region waits for a descheduled thread. Restored on exit; torch.set_num_threads costs ~0.2 µs."""
    k = torch.get_num_threads()
    if k == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(k)


def _kkt_solve(G: Tensor, act: Tensor, rhs_top: Tensor, rhs_last: float) -> tuple[Tensor, Tensor]:
    """Solve [[G_I, 1], [1ᵀ, 0]]·[β; τ] = [r; rhs_last] on the active slots ``act`` (n, K) bool of each row, β = 0 on
    the inactive ones (their rows/columns replaced by the identity). Rows whose system is singular (ties between
    structures with affinely dependent unary vectors) fall back to the least-norm solution."""
    n, K, _ = G.shape
    a = act.to(G.dtype)
    A = G.new_zeros(n, K + 1, K + 1)
    A[:, :K, :K] = G * a.unsqueeze(1) * a.unsqueeze(2) + torch.diag_embed(1 - a)
    A[:, :K, K] = a
    A[:, K, :K] = a
    b = torch.cat([rhs_top * a, G.new_full((n, 1), rhs_last)], 1).unsqueeze(-1)
    x, info = torch.linalg.solve_ex(A, b)
    bad = info != 0
    if bool(bad.any()):
        x = x.clone()
        x[bad] = torch.linalg.pinv(A[bad]) @ b[bad]
    x = x.squeeze(-1)
    return x[:, :K] * a, x[:, K]


# ---- the active-set solver ---------------------------------------------------------------------------------------


def _solve(s: Tensor, trans: Tensor, lengths: Tensor, tol: float, max_iter: int):
    """Active set on compacted rows (module docstring). s (N, T) float64, 0 on padding; trans (N, 2, 2) float64;
    lengths (N,). Returns α (N, K), Y (N, K, T) float 0/1, Y0 (N, K), iterations (N,) int32, converged (N,) bool,
    slots sorted by decreasing α (inactive slots have α = 0)."""
    N, T = s.shape
    K_out = _slots(max_iter, T)
    K = min(K_out, 8)  # slots in use; 8 more when a live row has no free slot left (most rows need only a few)
    dev, dt = s.device, s.dtype
    real = torch.arange(T, device=dev) < lengths.unsqueeze(1)
    realf = real.to(dt)
    ident = torch.tensor([[0.0, -_BIG], [-_BIG, 0.0]], dtype=dt, device=dev)
    steps = torch.where(real[:, :, None, None], trans.unsqueeze(1), ident)  # (N, T, 2, 2)
    from0, from1 = steps[..., 0].contiguous(), steps[..., 1].contiguous()
    Lf = lengths.to(dt)

    def oracle(p, rows):
        """argmax_y s_y − ⟨u_y, u⟩ for rows ``rows`` with state marginals p (n, T)."""
        sr, rf = s[rows], realf[rows]
        unary = torch.stack([-(1 - p) * rf, (sr - p) * rf], -1)
        y, y0 = _viterbi_argmax(unary, from0[rows], from1[rows])
        return y.to(dt) * rf, y0.to(dt)

    Y = s.new_zeros(N, K, T)
    Y0 = s.new_zeros(N, K)
    G = s.new_zeros(N, K, K)  # Gram matrix of the slots, updated when a structure joins (stale on free slots)
    alpha = s.new_zeros(N, K)
    act = torch.zeros(N, K, dtype=torch.bool, device=dev)
    iters = torch.zeros(N, dtype=torch.int32, device=dev)
    converged = lengths == 0  # nothing to solve on an empty row
    done = converged.clone()
    rows0 = (~done).nonzero().squeeze(1)
    if rows0.numel():
        y, y0 = oracle(s.new_zeros(rows0.numel(), T), rows0)  # u = 0: the MAP structure of θ itself
        Y[rows0, 0], Y0[rows0, 0], alpha[rows0, 0], act[rows0, 0] = y, y0, 1.0, True
        G[rows0, 0, 0] = Lf[rows0]
    S = _scores_of(Y, Y0, s, trans, real)
    slot = torch.arange(K, device=dev)
    for _ in range(max_iter):
        rows = (~done).nonzero().squeeze(1)
        n = rows.numel()
        if n == 0:
            break
        if K < K_out and bool(act[rows].all(1).any()):
            # +8, not ×2: the batched KKT solve costs O(K³) per row and every state copy O(K·T)
            grow = min(K + 8, K_out) - K
            Y, Y0, G = F.pad(Y, (0, 0, 0, grow)), F.pad(Y0, (0, grow)), F.pad(G, (0, grow, 0, grow))
            S, alpha, act = F.pad(S, (0, grow)), F.pad(alpha, (0, grow)), F.pad(act, (0, grow))
            K += grow
            slot = torch.arange(K, device=dev)
        iters[rows] += 1
        every = n == N  # all rows still running: work on the tensors themselves, no gather / scatter copies
        if every:
            rows = slice(None)
        Yl, Y0l, Sl, al, actl, rf, Gl = Y[rows], Y0[rows], S[rows], alpha[rows], act[rows], realf[rows], G[rows]
        beta, _ = _kkt_solve(Gl, actl, Sl, 1.0)
        # 1. A negative entry: step from α towards β until the first α_a hits 0, drop that structure.
        neg = (beta < 0) & actl
        blocked = neg.any(1)
        ratio = torch.where(neg, al / (al - beta).clamp_min(1e-300), torch.full_like(al, float("inf")))
        step, drop = ratio.min(1)
        step = step.clamp(0, 1).where(blocked, torch.ones_like(step))
        al = (al + step.unsqueeze(1) * (beta - al)).clamp_min(0) * actl
        dropped = blocked.unsqueeze(1) & (slot == drop.unsqueeze(1))
        actl = actl & ~dropped
        al = al * actl
        al = al / al.sum(1, keepdim=True)
        # 2. Otherwise α = β (done above with step 1) and the oracle: add y* or stop.
        free = ~blocked
        p = (al.unsqueeze(-1) * Yl).sum(1)
        ys, y0s = oracle(p, rows)
        ss = _scores_of(ys.unsqueeze(1), y0s.unsqueeze(1), s[rows], trans[rows], real[rows]).squeeze(1)
        val_new = ss - (ys * p + (rf - ys) * (1 - p)).sum(-1)
        vals = Sl - (Yl * p.unsqueeze(1) + (rf.unsqueeze(1) - Yl) * (1 - p).unsqueeze(1)).sum(-1)
        cur = (al * vals).sum(1)
        gap = val_new - cur
        ok = free & (gap <= tol * (1 + cur.abs()))
        same = ((Yl == ys.unsqueeze(1)).all(-1) & (Y0l == y0s.unsqueeze(1)) & actl).any(1)
        full = actl.all(1)
        # Is u* in the affine hull of the active unary vectors (u* = Σ λ_a u_a, Σ λ_a = 1)? Then adding it would
        # make the KKT matrix singular, and the objective rises linearly, by gap per unit, along α + t(e_* − λ)
        # without moving u: step along it until the first α_a with λ_a > 0 hits 0, and swap that structure for y*
        # (a simplex-method pivot). This keeps the active unary vectors affinely independent, so every KKT system
        # the iteration solves is nonsingular. λ is the projection of u* on the hull, found by one more KKT solve.
        Lr = Lf[rows]
        col0 = _gram_column(Yl, ys, Lr)
        lam, _ = _kkt_solve(Gl, actl, col0, 1.0)
        r2 = Lr - 2 * (lam * col0).sum(1) + ((Gl @ lam.unsqueeze(-1)).squeeze(-1) * lam).sum(1)
        dep = r2 <= 1e-8 * (1 + Lr)
        # A y* already in the active set with a gap above tol (rounding), or no free slot: stop, not converged.
        stuck = free & ~ok & (same | (full & ~dep))
        add = free & ~ok & ~stuck
        ratio = torch.where(actl & (lam > 1e-12), al / lam.clamp_min(1e-300), torch.full_like(al, float("inf")))
        tp, pdrop = ratio.min(1)
        pivot = add & dep & torch.isfinite(tp)
        tp = torch.where(pivot, tp, torch.zeros_like(tp))
        al = torch.where(pivot.unsqueeze(1), (al - tp.unsqueeze(1) * lam).clamp_min(0), al)
        actl = actl & ~(pivot.unsqueeze(1) & (slot == pdrop.unsqueeze(1)))
        al = al * actl
        first_free = (~actl).to(torch.int8).argmax(1)
        target = torch.where(pivot, pdrop, first_free)
        put = add.unsqueeze(1) & (slot == target.unsqueeze(1))
        Yl = torch.where(put.unsqueeze(-1), ys.unsqueeze(1), Yl)
        Y0l = torch.where(put, y0s.unsqueeze(1), Y0l)
        Sl = torch.where(put, ss.unsqueeze(1), Sl)
        al = torch.where(put, tp.unsqueeze(1), al)  # y* enters with weight 0, or t after a pivot
        actl = actl | put
        col = _gram_column(Yl, ys, Lf[rows])
        Gl = torch.where(put.unsqueeze(2), col.unsqueeze(1), Gl)
        Gl = torch.where(put.unsqueeze(1), col.unsqueeze(2), Gl)
        if every:
            Y, Y0, S, alpha, act, G = Yl, Y0l, Sl, al, actl, Gl
        else:
            Y[rows], Y0[rows], S[rows], alpha[rows], act[rows], G[rows] = Yl, Y0l, Sl, al, actl, Gl
        converged[rows] = ok
        done[rows] = ok | stuck
    if K < K_out:  # the op's output has K_out slots (a shape known before running)
        grow = K_out - K
        Y, Y0, alpha = F.pad(Y, (0, 0, 0, grow)), F.pad(Y0, (0, grow)), F.pad(alpha, (0, grow))
    order = alpha.argsort(dim=1, descending=True, stable=True)
    alpha = alpha.gather(1, order)
    Y = Y.gather(1, order.unsqueeze(-1).expand_as(Y))
    Y0 = Y0.gather(1, order)
    return alpha, Y, Y0, iters, converged


# ---- custom ops: forward and backward --------------------------------------------------------------------------------


def _kernel():
    """The C solver's module if it is compiled and loaded (first use compiles it), else None: the tensor solver then
    runs (the reference). Imported on first use, so ``import structattn`` runs no compiler."""
    from .kernels import cpu_sparsemap

    return cpu_sparsemap if cpu_sparsemap.available() else None


def _row_trans(trans: Tensor, N: int) -> Tensor:
    return (trans.expand(N, 2, 2) if trans.dim() == 2 else trans).to(torch.float64)


def _forward_impl(scores: Tensor, trans: Tensor, lengths: Tensor, tol: float,
                  max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(p, α, structures, start states, iterations, converged) of compacted rows ``scores`` (N, T) (real positions
    first, ``lengths`` of them); computed in float64, p returned in the scores' dtype, α in float64."""
    N, T = scores.shape
    real = torch.arange(T, device=scores.device) < lengths.unsqueeze(1)
    s = scores.to(torch.float64).masked_fill(~real, 0.0)
    tr = _row_trans(trans, N)
    bad = int((~torch.isfinite(s)).sum()) + int((~torch.isfinite(tr)).sum())
    if bad:
        raise ValueError(f"{bad} non-finite (NaN or ±inf) score(s) at real (non-padded) positions or transition(s); "
                         "SparseMAP needs finite potentials (mark padding with padding_mask instead)")
    kernel = _kernel() if s.device.type == "cpu" else None
    if kernel is not None:
        alpha, Y, Y0, iters, converged, p = kernel.forward(s, trans.to(torch.float64), lengths, tol, max_iter,
                                                           _slots(max_iter, T))
    else:
        with _one_thread():
            alpha, Y, Y0, iters, converged = _solve(s, tr, lengths, tol, max_iter)
        p = (alpha.unsqueeze(-1) * Y).sum(1)
    n_bad = int((~converged).sum())
    if n_bad:
        warnings.warn(f"sparsemap: {n_bad} of {N} row(s) did not converge (active set, tol={tol}, "
                      f"max_iter={max_iter}); their weights are a feasible but suboptimal point. Raise max_iter or "
                      "tol, or check the scores' scale", RuntimeWarning, stacklevel=3)
    # α stays float64: the backward reads the support from α > 0, which a float32 rounding could change.
    return p.to(scores.dtype), alpha, Y.bool(), Y0.bool(), iters, converged


def _backward_impl(gp: Tensor, Y: Tensor, Y0: Tensor, alpha: Tensor, lengths: Tensor,
                   trans: Tensor) -> tuple[Tensor, Tensor]:
    """(∂L/∂s (N, T), ∂L/∂T of ``trans``'s shape) from ∂L/∂p on compacted rows, by one KKT solve on the support."""
    N, T = gp.shape
    kernel = _kernel() if gp.device.type == "cpu" else None
    out = kernel.backward(gp, Y, Y0, alpha, lengths) if kernel is not None else None
    if out is not None:
        gs, gT = out
        return gs.to(gp.dtype), (gT.sum(0) if trans.dim() == 2 else gT).to(trans.dtype)
    k = max(int((alpha > 0).sum(1).max()), 1) if N else 1  # slots are sorted by α: the support comes first
    a = alpha[:, :k].to(torch.float64)
    act = a > 0
    Yf = Y[:, :k].to(torch.float64)
    Y0f = Y0[:, :k].to(torch.float64)
    real = torch.arange(T, device=gp.device) < lengths.unsqueeze(1)
    realf = real.to(torch.float64)
    g = gp.to(torch.float64).masked_fill(~real, 0.0)
    with _one_thread():
        beta, _ = _kkt_solve(_gram(Yf, realf), act, (Yf * g.unsqueeze(1)).sum(-1), 0.0)
        gs = (beta.unsqueeze(-1) * Yf).sum(1)
        gT = (beta[:, :, None, None] * _structure_counts(Yf, Y0f, realf)).sum(1)
    if trans.dim() == 2:
        gT = gT.sum(0)
    return gs.to(gp.dtype), gT.to(trans.dtype)


_NS = "structattn"
_forward_op = torch.library.custom_op(f"{_NS}::sparsemap_segmentation", _forward_impl, mutates_args=())
_backward_op = torch.library.custom_op(f"{_NS}::sparsemap_segmentation_backward", _backward_impl, mutates_args=())


@_forward_op.register_fake
def _(scores, trans, lengths, tol, max_iter):
    N, T = scores.shape
    K = _slots(max_iter, T)
    b = torch.bool
    return (scores.new_empty(N, T), scores.new_empty(N, K, dtype=torch.float64), scores.new_empty(N, K, T, dtype=b),
            scores.new_empty(N, K, dtype=b), scores.new_empty(N, dtype=torch.int32), scores.new_empty(N, dtype=b))


@_backward_op.register_fake
def _(gp, Y, Y0, alpha, lengths, trans):
    return torch.empty_like(gp), torch.empty_like(trans)


def _setup(ctx, inputs, output):
    scores, trans, lengths, tol, max_iter = inputs
    p, alpha, Y, Y0, iters, converged = output
    ctx.mark_non_differentiable(alpha, Y, Y0, iters, converged)
    ctx.save_for_backward(Y, Y0, alpha, lengths, trans)


def _grad(ctx, gp, *rest):
    Y, Y0, alpha, lengths, trans = ctx.saved_tensors
    gs, gT = _backward_op(gp, Y, Y0, alpha, lengths, trans)
    return gs, gT, None, None, None


_forward_op.register_autograd(_grad, setup_context=_setup)


# ---- the attention rows ------------------------------------------------------------------------------------------


def sparsemap_chain(scores: Tensor, trans: Tensor, lengths: Tensor, tol: float = DEFAULT_TOL,
                    max_iter: int = DEFAULT_MAX_ITER):
    """SparseMAP of the segmentation chain on compacted rows: (p, α, structures, start states, iterations,
    converged) as in :func:`_forward_impl`, p differentiable w.r.t. ``scores`` and ``trans`` (backward on the
    support, module docstring). ``scores`` (N, T) float32/float64 with the ``lengths`` (N,) real positions first,
    ``trans`` (2, 2) or (N, 2, 2)."""
    return _forward_op(scores, trans, lengths, tol, max_iter)


def sparsemap_weights(scores: Tensor, trans: Tensor, mask: Tensor | None, tol: float = DEFAULT_TOL,
                      max_iter: int = DEFAULT_MAX_ITER, structures: bool = True):
    """(w, p, flags, α, structures, iterations, converged) of every row of ``scores`` (N, T) under the SparseMAP
    segmentation attention; arguments checked by :func:`structattn.attention.sparsemap_attention`.

    Padding (``mask`` True, any layout) is compacted away as in :func:`structattn.ops.segmentation._unfused` (a
    stable cumsum + scatter: the chain sees exactly the unpadded row), and p and the structures are scattered back to
    their columns (0/False on padding). w = p / Σp; a row with Σp ≤ tiny (all mass on y = 0…0) falls back to
    softmax(s) over its real positions, as the Viterbi attention does; ``flags`` are :func:`row_flags` of p
    (dead = fell back; frozen = a single structure, whose Jacobian is 0). α (N, K) are the structures' probabilities
    in decreasing order (0 on unused slots), structures (N, K, T) bool their masks y_t = 1 — or None with
    ``structures=False``: scattering them back to their padded columns (an (N, K, T) gather and mask, K = min(max_iter
    + 1, T + 2) slots) was most of the time around the C solver when the caller does not use them."""
    N, T = scores.shape
    if mask is None:
        lengths = torch.full((N,), T, dtype=torch.long, device=scores.device)
        p, alpha, Y, _, iters, conv = sparsemap_chain(scores, trans, lengths, tol, max_iter)
    else:
        real = ~mask
        rank = real.cumsum(1)
        lengths = rank[:, -1]
        pads_before = torch.arange(1, T + 1, device=scores.device) - rank
        dest = torch.where(real, rank - 1, lengths[:, None] + pads_before - 1)
        compact = torch.zeros_like(scores).scatter(1, dest, scores.masked_fill(mask, 0.0))
        p, alpha, Y, _, iters, conv = sparsemap_chain(compact, trans, lengths, tol, max_iter)
        p = p.gather(1, dest)
        if structures:
            Y = Y.gather(2, dest.unsqueeze(1).expand_as(Y)) & real.unsqueeze(1)
    if not structures:
        Y = None
    total = p.sum(-1, keepdim=True)
    ok = total > torch.finfo(p.dtype).tiny
    w = p / torch.where(ok, total, torch.ones_like(total))
    if torch.compiler.is_compiling() or not bool(ok.all()):
        w = torch.where(ok, w, masked_softmax(scores, mask))
    return w, p, row_flags(p, mask), alpha, Y, iters, conv
