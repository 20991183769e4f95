"""Dead (fallback) rows, frozen rows, score centring and the stable form of the Viterbi attention (issue 12):
hand-made marginals and rows, and references computed from the paper-form function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from structattn.attention import (
    ViterbiAttention,
    build_attention,
    centre_scores,
    dead_rows,
    frozen_rows,
    viterbi_attention,
)
from structattn.export import AttentionRecord
from structattn.report.stats import dump_stats, record_fallback_rows

# ---- dead / frozen rows on hand-made marginals ------------------------------------------------------------------


def test_dead_rows_by_hand():
    p = torch.tensor([[0.0, 0.0, 0.0],    # dead
                      [0.0, 0.3, 0.0],    # alive
                      [1e-45, 0.0, 0.0],  # denormal mass: ≤ tiny, dead (w = p / Σp would be garbage)
                      [0.0, 0.0, 0.7]])   # alive only through a padded column? see the mask below
    assert dead_rows(p).tolist() == [True, False, True, False]
    pm = torch.tensor([[False, False, False], [False, False, True], [True, True, True], [False, False, True]])
    # row 2 has no real position: not dead (nothing fell back); row 3's only mass sits on padding: dead
    assert dead_rows(p, pm).tolist() == [True, False, False, True]


def test_frozen_rows_by_hand():
    p = torch.tensor([[0.0, 0.0, 0.0],   # dead: frozen
                      [1.0, 1.0, 1.0],   # saturated (uniform weights): frozen
                      [1.0, 0.0, 1.0],   # hard path: frozen
                      [1.0, 0.5, 0.0],   # one interior marginal: gradient flows
                      [0.2, 1.0, 0.5]])  # interior but the interior ones are padding below
    assert frozen_rows(p).tolist() == [True, True, True, False, False]
    pm = torch.zeros(5, 3, dtype=torch.bool)
    pm[4, [0, 2]] = True
    assert frozen_rows(p, pm).tolist() == [True, True, True, False, True]


def test_dead_rows_errors():
    with pytest.raises(ValueError, match="marginals must have shape"):
        dead_rows(torch.zeros(3))
    with pytest.raises(ValueError, match="padding_mask must have the shape of marginals"):
        frozen_rows(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.bool))


# ---- centring ---------------------------------------------------------------------------------------------------


def test_centre_scores_by_hand():
    s = torch.tensor([[1.0, 2.0, 6.0], [4.0, -7.0, 9.0]])
    pm = torch.tensor([[False, False, False], [False, True, False]])
    out = centre_scores(s, pm)
    torch.testing.assert_close(out[0], torch.tensor([-2.0, -1.0, 3.0]))
    assert out[1, 0].item() == pytest.approx(-2.5) and out[1, 2].item() == pytest.approx(2.5)
    assert out[1, 1].item() == -7.0  # padding untouched
    torch.testing.assert_close(centre_scores(s), s - s.mean(-1, keepdim=True))
    all_pad = centre_scores(s[:1], torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(all_pad, s[:1])


# ---- modules ----------------------------------------------------------------------------------------------------


def _inputs(seed=0, B=5, T=7, d_z=6, d_x=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, d_z, generator=g) * 2 - 1, torch.rand(B, T, d_x, generator=g) * 2 - 1


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_stable_form_equals_paper_function_on_centred_scores(reg):
    z, keys = _inputs()
    pm = torch.zeros(5, 7, dtype=torch.bool)
    pm[1, :3] = True
    pm[3, 5:] = True
    att = ViterbiAttention(6, 4, reg, None, form="stable", contiguity=0.7).double()
    with torch.no_grad():
        att.transitions_over_gamma.copy_(torch.tensor([[0.4, -0.3], [0.1, 0.9]]))
    _, w = att(z.double(), keys.double(), pm)
    s = torch.bmm(keys.double(), att.proj(z.double()).unsqueeze(2)).squeeze(2)
    s_c = s - (s.masked_fill(pm, 0).sum(-1, keepdim=True) / (~pm).sum(-1, keepdim=True))
    ref = viterbi_attention(s_c, att.gamma * att.transitions_over_gamma, pm, reg, att.gamma)
    torch.testing.assert_close(w, ref)
    assert sorted(n for n, _ in att.named_parameters()) == ["proj.weight", "transitions_over_gamma"]


def test_stable_form_initial_prior_and_factory():
    att = build_attention("viterbi", 3, 4, "l2", 10.0, "stable", 1.5)
    torch.testing.assert_close(att.effective_transitions(), torch.tensor([[15.0, 0.0], [0.0, 15.0]]))
    assert "form='stable'" in repr(att) and "contiguity=1.5" in repr(att)
    paper = build_attention("viterbi", 3, 4, "l2", 10.0, "paper")
    assert paper.form == "paper" and torch.equal(paper.effective_transitions(), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="form must be one of"):
        ViterbiAttention(3, 4, "l2", 1.0, form="centred")
    with pytest.raises(ValueError, match="contiguity is a prior of the stable form"):
        ViterbiAttention(3, 4, "l2", 1.0, form="paper", contiguity=1.0)
    with pytest.raises(ValueError, match="contiguity must be a finite number"):
        ViterbiAttention(3, 4, "l2", 1.0, form="stable", contiguity=float("nan"))


def test_common_shift_kills_paper_rows_but_not_stable_rows():
    """The drift of issue 12: the weights ignore a common shift of the scores, the paper-form ℓ2 chain does not.
    Shifting every score by −3γ kills every paper-form row (all p(y_t = 1) = 0 → softmax fallback, counted);
    the stable form centres the scores, so the same shift changes nothing."""
    z, keys = _inputs(1)
    gamma = 2.0
    for form in ("paper", "stable"):
        att = ViterbiAttention(6, 4, "l2", gamma, form=form, contiguity=0.0 if form == "stable" else None)
        att.pop_fallback_counts()
        base = att.normalize(torch.bmm(keys, att.proj(z).unsqueeze(2)).squeeze(2), None)
        rows, dead, _ = att.pop_fallback_counts()
        assert (rows, dead) == (5, 0)
        s = torch.bmm(keys, att.proj(z).unsqueeze(2)).squeeze(2) - 3 * gamma
        w = att.normalize(s, None)
        rows, dead, frozen = att.pop_fallback_counts()
        if form == "paper":
            assert (rows, dead, frozen) == (5, 5, 5)
            torch.testing.assert_close(w, torch.softmax(s, -1))  # the fallback
        else:
            assert (rows, dead) == (5, 0)
            torch.testing.assert_close(w, base)
    assert att.pop_fallback_counts() == (0, 0, 0)  # popping resets


def test_counts_skip_rows_without_real_positions_and_record_flags():
    z, keys = _inputs(2, B=3)
    att = ViterbiAttention(6, 4, "l2", 1.0, form="paper")
    with torch.no_grad():
        att.transitions.copy_(torch.tensor([[0.0, 0.0], [-1e4, -1e4]]))  # attending costs 1e4: every row dies
    pm = torch.zeros(3, 7, dtype=torch.bool)
    pm[2] = True
    att.recorded_dead = []
    att(z, keys, pm)
    assert att.pop_fallback_counts() == (2, 2, 2)
    assert [f.tolist() for f in att.recorded_dead] == [[True, True, False]]


# ---- the stats column -------------------------------------------------------------------------------------------


def _rec(i, a, fallback=None):
    a = np.asarray(a, np.float32)
    T, S = a.shape
    extra = {} if fallback is None else {"fallback_rows": fallback}
    return AttentionRecord(id=i, nbest_rank=0, src_tokens=[f"s{j}" for j in range(S - 1)] + ["</s>"],
                           tgt_tokens=[f"t{j}" for j in range(T - 1)] + ["</s>"], src_text="s", hyp_text="t",
                           attention=np.asarray(a, np.float32), score=0.0, extra=extra)


def test_fallback_fraction_and_segments_on_hand_made_rows():
    # rows: a contiguous block (1 segment), two blocks (2), a dense softmax-like fallback row (1), EOS row
    a = [[0.5, 0.5, 0.0, 0.0], [0.4, 0.0, 0.0, 0.6], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 1.0]]
    b = [[0.0, 1.0], [1.0, 0.0]]
    st = dump_stats([_rec(0, a, [2]), _rec(1, b, [])])
    assert st["n_rows"] == 6 and st["fallback_fraction"] == pytest.approx(1 / 6)
    assert st["mean_segments"] == pytest.approx((1 + 2 + 1 + 1 + 1 + 1) / 6)
    # without EOS the last row of each record is dropped (a fallback row index beyond it is dropped too)
    ne = dump_stats([_rec(0, a, [2, 3]), _rec(1, b, [1])], exclude_eos=True)
    assert ne["n_rows"] == 4 and ne["fallback_fraction"] == pytest.approx(1 / 4)
    # one record that does not say: the fraction is unknown, not 0
    unknown = dump_stats([_rec(0, a, [2]), _rec(1, b)])
    assert unknown["fallback_fraction"] != unknown["fallback_fraction"]
    assert record_fallback_rows(_rec(1, b)) is None


def test_fallback_rows_validation():
    a = np.eye(3)
    with pytest.raises(ValueError, match="are not distinct rows"):
        record_fallback_rows(_rec(0, a, [3]))
    with pytest.raises(ValueError, match="are not distinct rows"):
        record_fallback_rows(_rec(0, a, [1, 1]))
    with pytest.raises(ValueError, match="must be a list of row indices"):
        record_fallback_rows(_rec(0, a, [True]))
