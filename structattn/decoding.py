"""The few best tag sequences of a sparse model: every path with non-zero probability under the smoothed Viterbi's
path distribution, with its probability (ICML 2018 §2.3 "Associated path distribution", App. C.1 and Figure 6).

Mensch & Blondel, "Differentiable Dynamic Programming for Structured Prediction and Attention", ICML 2018. Alg. 3's
forward pass records the local distributions q_{t,i} = ∇max_Ω(θ_{t,i} + v_{t−1}) ∈ △^S and r = ∇max_Ω(v_T). §2.3
reads them as a random walk that starts from the end node and moves backwards: the last state is i with probability
r_i, and from state i at step t the walk hops to state j at step t−1 with probability q_{t,i,j}. A path's
probability is the product of the q's along it, and the expected path is E = ∇Vit_Ω(θ) (Prop. 3). For Ω = −γH every
q is dense (the Gibbs distribution, all S^L paths have p > 0); for Ω = (γ/2)‖·‖² the q's are sparsemax outputs with
exact zeros, so the support is typically a handful of paths, which :func:`sparse_decode` lists, most probable first.

How: (1) one counting pass over the non-zero pattern of (r, q) gives the exact support size of each chain (the
number of walks with non-zero probability), so that a support larger than ``max_sequences`` is refused before any
enumeration; (2) a depth-first backtracking from the end over the non-zero q's lists the paths. Every partial walk
extends to at least one complete path (each q row sums to 1), so the work is O(support · L · S).

The start state. Our trellis has a free state before step 0 (v_0 = 0_S, App. B.2), which a tagger whose θ[:, 0]
ignores the previous state (§4.2's θ_1) reaches uniformly: listing it would repeat every tag sequence S times. By
default the walk stops at step 0 (its last hop sums to 1 and is not taken), so the listed sequences are the L tags
and their probabilities the marginals over the start state. ``include_start=True`` lists the full paths (start state
first, L + 1 states), whose implied transition marginals are all of E.

Also :func:`viterbi_decode`, the hard Viterbi (the MAP path Y*(θ), eq. (4)) that taggers use for prediction.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .losses import hard_viterbi
from .ops.smoothed_max import check_reg_gamma
from .ops.viterbi import _marginals, _prepare, resolve_backend

__all__ = ["TagSequence", "count_sequences", "sequence_probability", "sparse_decode", "viterbi_decode",
           "sequence_marginals"]


class TagSequence(NamedTuple):
    """One path of the smoothed Viterbi's path distribution: the states (tags) and the probability."""

    tags: tuple[int, ...]
    probability: float


def viterbi_decode(theta: Tensor, lengths=None) -> Tensor:
    """The highest-scoring tags Y*(θ) (eq. (4), hard max-product Viterbi), (B, T) long, −1 at padded steps; ties go
    to the lowest state index. Same θ/``lengths`` conventions as :func:`structattn.viterbi_value`."""
    with torch.no_grad():
        return hard_viterbi(theta.detach() if isinstance(theta, Tensor) else theta, lengths)[1]


def _local_distributions(theta, lengths, reg, gamma, backend):
    """Alg. 3's q's and r (float64, CPU) and the chain lengths, from one forward pass (no autograd)."""
    theta_c, lengths_t, gamma, _ = _prepare(theta, lengths, reg, gamma)
    name = resolve_backend(backend, theta_c)
    with torch.no_grad():
        _, Q, _, r = _marginals(theta_c.detach(), lengths_t, reg, gamma, name)
    B, T = Q.shape[:2]
    Ls = [T] * B if lengths_t is None else [int(x) for x in lengths_t]
    return Q.double().cpu(), r.double().cpu(), Ls


def count_sequences(
    theta: Tensor, lengths=None, gamma: float = 1.0, *, reg: str = "l2", include_start: bool = False,
    backend: str | None = None,
) -> list[int]:
    """The number of tag sequences with non-zero probability per chain (exact Python ints, no enumeration): what
    :func:`sparse_decode` would list. Same arguments as :func:`sparse_decode`."""
    gamma = check_reg_gamma(reg, gamma)
    Q, r, Ls = _local_distributions(theta, lengths, reg, gamma, backend)
    S = Q.shape[-1]
    return [_support_size(Q[b, :L].tolist(), r[b].tolist(), L, S, include_start) for b, L in enumerate(Ls)]


def sequence_probability(
    theta: Tensor, tags: Tensor, lengths=None, gamma: float = 1.0, *, reg: str = "l2", backend: str | None = None
) -> Tensor:
    """The probability (B,) float64 of given tag sequences (B, T) under the path distribution of §2.3, the start
    state marginalised: p(y) = r[y_{L−1}] · Π_{t=1}^{L−1} q_t[y_t, y_{t−1}]. Zero exactly when :func:`sparse_decode`
    would not list ``y``; a chain of length 0 gets 1. Entries of ``tags`` at padded steps are ignored."""
    gamma = check_reg_gamma(reg, gamma)
    Q, r, Ls = _local_distributions(theta, lengths, reg, gamma, backend)
    if not isinstance(tags, Tensor) or tags.is_floating_point() or tuple(tags.shape) != tuple(Q.shape[:2]):
        raise ValueError(f"tags must be an integer tensor of shape {tuple(Q.shape[:2])}")
    S = Q.shape[-1]
    tags = tags.cpu().long()
    out = torch.ones(len(Ls), dtype=torch.float64)
    for b, L in enumerate(Ls):
        if L == 0:
            continue
        y = tags[b, :L]
        if int(y.min()) < 0 or int(y.max()) >= S:
            raise ValueError(f"tags of chain {b} must lie in [0, {S})")
        p = r[b, y[-1]]
        if L > 1:
            t = torch.arange(1, L)
            p = p * Q[b, t, y[1:], y[:-1]].prod()
        out[b] = p
    return out


def sparse_decode(
    theta: Tensor, lengths=None, gamma: float = 1.0, *, reg: str = "l2", max_sequences: int = 100,
    include_start: bool = False, backend: str | None = None,
) -> list[list[TagSequence]]:
    """All tag sequences with non-zero probability under Vit_Ω's path distribution (§2.3), most probable first.

    Args:
        theta: (B, T, S, S) potentials (θ[b, t, i, j]: state j at step t−1 → state i at step t).
        lengths: optional (B,) integer tensor in [0, T]; chain b has lengths[b] tags.
        gamma: temperature γ > 0 of Ω (the model's).
        reg: ``"l2"`` (default; sparse) or ``"entropy"`` (dense: only usable for tiny S^L, e.g. to check against the
            Gibbs distribution).
        max_sequences: the most sequences to list per chain; a chain whose support is larger raises.
        include_start: also list the free start state (first entry; see the module docstring).
        backend: Viterbi backend for Alg. 3's forward pass (see :func:`structattn.viterbi_value`).

    Returns:
        One list per chain of :class:`TagSequence` ``(tags, probability)``, ``tags`` a tuple of lengths[b] states
        (lengths[b] + 1 with ``include_start``), sorted by decreasing probability, ties by the tags. Probabilities
        are products of the q's in float64 and sum to 1 (up to rounding); a chain of length 0 gives ``[((), 1.0)]``
        (or the S start states, 1/S each, with ``include_start``).

    Raises:
        ValueError: a chain's support has more than ``max_sequences`` sequences (the message gives its size), a bad
            ``max_sequences``, and everything :func:`structattn.viterbi_value` rejects.
    """
    gamma = check_reg_gamma(reg, gamma)
    if isinstance(max_sequences, bool) or not isinstance(max_sequences, int) or max_sequences < 1:
        raise ValueError(f"max_sequences must be an int >= 1, got {max_sequences!r}")
    Q64, r64, Ls = _local_distributions(theta, lengths, reg, gamma, backend)
    S = Q64.shape[-1]
    out = []
    for b, L in enumerate(Ls):
        q = Q64[b, :L].tolist()  # q[t][i][j]
        rb = r64[b].tolist()
        size = _support_size(q, rb, L, S, include_start)
        if size > max_sequences:
            raise ValueError(
                f"chain {b}: the path distribution has {size} sequences with non-zero probability, more than "
                f"max_sequences={max_sequences}; raise max_sequences (or, for a sparser model, train with a "
                f"smaller gamma)"
            )
        out.append(_enumerate(q, rb, L, S, include_start))
    return out


def _support_size(q, r, L: int, S: int, include_start: bool) -> int:
    """Number of backward walks with non-zero probability (exact Python ints: no overflow)."""
    if L == 0:
        return S if include_start else 1
    count = [1 if r[i] > 0 else 0 for i in range(S)]  # walks ending in state i at step L−1
    last = 0 if include_start else 1  # the hops taken: steps L−1 .. last (step 0's hop picks the start state)
    for t in range(L - 1, last - 1, -1):
        nxt = [0] * S
        for i in range(S):
            if count[i]:
                row = q[t][i]
                for j in range(S):
                    if row[j] > 0:
                        nxt[j] += count[i]
        count = nxt
    return sum(count)


def _enumerate(q, r, L: int, S: int, include_start: bool) -> list[TagSequence]:
    if L == 0:
        if include_start:
            return [TagSequence((j,), 1.0 / S) for j in range(S)]
        return [TagSequence((), 1.0)]
    last = 0 if include_start else 1
    found: list[TagSequence] = []
    # Depth-first from the end; `rev` holds the states from step L−1 down to the current one.
    stack = [(r[i], L - 1, (i,)) for i in range(S) if r[i] > 0]
    while stack:
        p, t, rev = stack.pop()
        if t < last:
            found.append(TagSequence(tuple(reversed(rev)), p))
            continue
        row = q[t][rev[-1]]
        for j in range(S):
            if row[j] > 0:
                stack.append((p * row[j], t - 1, rev + (j,)))
    found.sort(key=lambda s: (-s.probability, s.tags))
    return found


def sequence_marginals(sequences: list[TagSequence], T: int, S: int, *, include_start: bool = False) -> Tensor:
    """The transition marginals (T, S, S) float64 implied by listed sequences: Σ_y p(y)·1[y_t = i, y_{t−1} = j].

    With ``include_start=True`` sequences (start state first) this is the whole expected path E (Prop. 3). Without
    it, step 0's entries are p(y_0 = i) spread uniformly over j (the start state is not listed), which equals E[0]
    exactly when θ[:, 0] ignores the previous state."""
    M = torch.zeros(T, S, S, dtype=torch.float64)
    for tags, p in sequences:
        path = tags if include_start else (None, *tags)
        for t in range(1, len(path)):
            if path[t - 1] is None:
                M[0, path[1]] += p / S
            else:
                M[t - 1, path[t], path[t - 1]] += p
    return M
