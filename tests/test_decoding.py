"""Sparse decoding (structattn.decoding; ICML 2018 §2.3, App. C.1): the tag sequences with non-zero probability.

Oracles: the local distributions q recomputed independently (the plain recursion of Alg. 3 with the simplex
projection by bisection of structattn.ops.reference, or softmax for −γH), every path of a tiny chain enumerated with
its probability as the product of those q's (§2.3); the marginals E of structattn.viterbi_marginals (Prop. 3: the
expected path); the Gibbs distribution for −γH."""

from __future__ import annotations

import itertools

import pytest
import torch

import structattn
from structattn import (
    count_sequences,
    sequence_marginals,
    sequence_probability,
    sparse_decode,
    viterbi_decode,
    viterbi_marginals,
)
from structattn.ops.reference import _project_simplex_bisection


def _theta(seed, B=2, T=4, S=3, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, S, S, generator=g, dtype=torch.float64) * scale


def _local_q(theta_b, L, reg, gamma):
    """Alg. 3's q_{t,i} and r for one chain, by the literal loops with independent max_Ω/∇max_Ω."""
    S = theta_b.shape[-1]

    def grad(x):
        return torch.softmax(x / gamma, 0) if reg == "entropy" else _project_simplex_bisection(x / gamma)

    def mx(x):
        q = grad(x)
        if reg == "entropy":
            return gamma * torch.logsumexp(x / gamma, 0)
        return (q * x).sum() - 0.5 * gamma * (q * q).sum()

    v = torch.zeros(S, dtype=theta_b.dtype)
    qs = []
    for t in range(L):
        rows = [theta_b[t, i] + v for i in range(S)]
        qs.append(torch.stack([grad(x) for x in rows]))
        v = torch.stack([mx(x) for x in rows])
    return qs, grad(v)


def _bruteforce(theta_b, L, reg, gamma):
    """{(y_start, y_0, .., y_{L−1}): p} over every path with p > 0, p = r[y_{L−1}] Π_t q_t[y_t, y_{t−1}]."""
    S = theta_b.shape[-1]
    qs, r = _local_q(theta_b, L, reg, gamma)
    out = {}
    for path in itertools.product(range(S), repeat=L + 1):
        p = float(r[path[-1]]) if L else 1.0 / S
        for t in range(L):
            p *= float(qs[t][path[t + 1], path[t]])
        if p > 0:
            out[path] = p
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma", [0.5, 1.5])
def test_l2_support_and_probabilities_against_enumeration(seed, gamma):
    theta = _theta(seed, B=3, T=4, S=3)
    lengths = torch.tensor([4, 3, 1])
    full = sparse_decode(theta, lengths, gamma, include_start=True, max_sequences=81)
    tags_only = sparse_decode(theta, lengths, gamma, max_sequences=81)
    for b in range(3):
        L = int(lengths[b])
        ref = _bruteforce(theta[b], L, "l2", gamma)
        got = {s.tags: s.probability for s in full[b]}
        assert set(got) == {p for p, v in ref.items() if v > 1e-14}
        for p, v in got.items():
            assert abs(v - ref[p]) < 1e-12
        # without the start state: the same paths summed over it
        marg = {}
        for p, v in ref.items():
            marg[p[1:]] = marg.get(p[1:], 0.0) + v
        got2 = {s.tags: s.probability for s in tags_only[b]}
        assert set(got2) == {p for p, v in marg.items() if v > 1e-14}
        for p, v in got2.items():
            assert abs(v - marg[p]) < 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_probabilities_sum_to_one_and_imply_the_marginals(seed):
    theta = _theta(seed, B=3, T=6, S=4, scale=3.0)
    lengths = torch.tensor([6, 4, 0])
    E = viterbi_marginals(theta, lengths, "l2", 0.7)
    full = sparse_decode(theta, lengths, 0.7, include_start=True, max_sequences=4096)
    tags_only = sparse_decode(theta, lengths, 0.7, max_sequences=4096)
    for b in range(3):
        assert abs(sum(s.probability for s in full[b]) - 1) < 1e-12
        assert abs(sum(s.probability for s in tags_only[b]) - 1) < 1e-12
        M = sequence_marginals(full[b], 6, 4, include_start=True)
        assert torch.allclose(M, E[b], atol=1e-12, rtol=0)
        M2 = sequence_marginals(tags_only[b], 6, 4)
        assert torch.allclose(M2[1:], E[b, 1:], atol=1e-12, rtol=0)
        assert torch.allclose(M2[0].sum(-1), E[b, 0].sum(-1), atol=1e-12, rtol=0)  # p(y_0 = i)
        probs = [s.probability for s in full[b]]
        assert probs == sorted(probs, reverse=True)


def test_entropy_lists_the_gibbs_distribution():
    theta = _theta(3, B=1, T=3, S=2)
    gamma = 0.9
    seqs = sparse_decode(theta, None, gamma, reg="entropy", include_start=True, max_sequences=16)
    assert len(seqs[0]) == 16  # dense: every path
    scores = {}
    for p in itertools.product(range(2), repeat=4):
        scores[p] = sum(theta[0, t, p[t + 1], p[t]] for t in range(3)) / gamma
    z = torch.logsumexp(torch.stack(list(scores.values())), 0)
    for s in seqs[0]:
        assert abs(s.probability - float(torch.exp(scores[s.tags] - z))) < 1e-12


def test_bound_raises_with_the_support_size():
    theta = _theta(4, B=2, T=8, S=3, scale=0.3)  # flat potentials: a wide support
    full = sparse_decode(theta, None, 1.0, max_sequences=10**6)
    n = len(full[0])
    assert n > 5
    assert count_sequences(theta, None, 1.0) == [len(f) for f in full]
    assert count_sequences(theta, None, 1.0, include_start=True) == [
        len(f) for f in sparse_decode(theta, None, 1.0, include_start=True, max_sequences=10**6)]
    with pytest.raises(ValueError, match=rf"chain 0: .* has {n} sequences .*max_sequences=5"):
        sparse_decode(theta, None, 1.0, max_sequences=5)
    with pytest.raises(ValueError, match="max_sequences must be an int"):
        sparse_decode(theta, None, 1.0, max_sequences=0)
    with pytest.raises(ValueError, match="reg must be one of"):
        sparse_decode(theta, None, 1.0, reg="sparsemax")
    with pytest.raises(ValueError, match="lengths must lie"):
        sparse_decode(theta, torch.tensor([9, 1]), 1.0)


def test_padded_batch_equals_per_sentence_and_empty_chain():
    theta = _theta(5, B=3, T=6, S=4)
    lengths = torch.tensor([6, 2, 0])
    batch = sparse_decode(theta, lengths, 0.5, max_sequences=1000)
    for b in range(2):
        L = int(lengths[b])
        single = sparse_decode(theta[b:b + 1, :L], None, 0.5, max_sequences=1000)[0]
        assert [s.tags for s in single] == [s.tags for s in batch[b]]
        assert all(abs(a.probability - c.probability) < 1e-12 for a, c in zip(single, batch[b]))
    assert batch[2] == [((), 1.0)]


def test_peaked_model_lists_one_sequence_the_viterbi_path():
    theta = _theta(6, B=2, T=7, S=5, scale=8.0)
    seqs = sparse_decode(theta, None, 0.1)
    best = viterbi_decode(theta)
    for b in range(2):
        assert seqs[b][0].tags == tuple(best[b].tolist())


def test_viterbi_decode_by_enumeration():
    theta = _theta(7, B=2, T=4, S=3)
    lengths = torch.tensor([4, 2])
    best = viterbi_decode(theta, lengths)
    for b in range(2):
        L = int(lengths[b])
        scores = {p: float(sum(theta[b, t, p[t + 1], p[t]] for t in range(L)))
                  for p in itertools.product(range(3), repeat=L + 1)}
        top = max(scores, key=scores.get)
        assert best[b, :L].tolist() == list(top[1:])
        assert (best[b, L:] == -1).all()


def test_public_names():
    for name in ("viterbi_loss", "ViterbiLoss", "tags_to_path", "sparse_decode", "viterbi_decode", "TagSequence"):
        assert name in structattn.__all__ and hasattr(structattn, name)


def test_docs_losses_python_blocks_run():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "losses.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, "docs/losses.md", "exec"), {})


def test_sequence_probability_of_listed_and_unlisted_sequences():
    theta = _theta(8, B=2, T=4, S=3)
    lengths = torch.tensor([4, 2])
    listed = sparse_decode(theta, lengths, 0.8, max_sequences=81)
    for b in range(2):
        L = int(lengths[b])
        got = {s.tags: s.probability for s in listed[b]}
        for y in itertools.product(range(3), repeat=L):
            tags = torch.zeros(2, 4, dtype=torch.long)
            tags[b, :L] = torch.tensor(y)
            tags[b, L:] = -100  # padding: ignored
            p = float(sequence_probability(theta, tags, lengths, 0.8)[b])
            assert abs(p - got.get(y, 0.0)) < 1e-14
            assert (p == 0) == (y not in got)
    with pytest.raises(ValueError, match="tags must be an integer tensor"):
        sequence_probability(theta, torch.zeros(2, 3, dtype=torch.long))
