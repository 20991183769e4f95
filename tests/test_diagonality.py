"""Aligned or parked: diagonality ρ and top-fifth share of attention matrices (structattn.report.diagonality), on
hand-made matrices with known answers, against scipy's Spearman, padded == unpadded, and in the commands that
report them (structattn-stats, the results and seed tables, structattn-health's verdict)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from structattn.export import AttentionRecord, write_dump
from structattn.report.diagonality import (
    EOS_MASS_PARKED,
    MIN_POSITIONS,
    PARKED_SHARE,
    VERDICTS,
    aggregate_alignment,
    argmax_positions,
    matrix_alignment,
    padded_alignment,
    parked_verdict,
    source_fifths,
    spearman,
)
from structattn.report.stats import dump_stats

EOS = "</s>"


def _with_eos(core, eos_row=None):
    """``core`` (T × S, no EOS) framed as a dump matrix: a source </s> column of zeros and a target </s> row (on the
    source </s> unless ``eos_row`` says otherwise)."""
    core = np.asarray(core, dtype=np.float64)
    T, S = core.shape
    a = np.zeros((T + 1, S + 1))
    a[:T, :S] = core
    a[T] = np.eye(1, S + 1, S)[0] if eos_row is None else eos_row
    return a


def _rec(i, a, rank=0):
    a = np.asarray(a, dtype=np.float32)
    T, S = a.shape
    return AttentionRecord(id=i, nbest_rank=rank, src_tokens=[f"s{j}" for j in range(S - 1)] + [EOS],
                           tgt_tokens=[f"t{j}" for j in range(T - 1)] + [EOS], src_text="", hyp_text="",
                           attention=a, score=0.0)


def _tokens(a):
    T, S = a.shape
    return [f"s{j}" for j in range(S - 1)] + [EOS], [f"t{j}" for j in range(T - 1)] + [EOS]


def _on(cols, S):
    """One-hot rows: row i on column cols[i]."""
    out = np.zeros((len(cols), S))
    out[np.arange(len(cols)), cols] = 1.0
    return out


# ---- hand-made matrices with known answers ----------------------------------------------------------------------


def test_perfect_diagonal_and_anti_diagonal():
    a = _with_eos(np.eye(10))
    src, tgt = _tokens(a)
    d = matrix_alignment(a, src, tgt)
    # fifths of 10 columns: two each, so a diagonal visits every fifth twice
    assert d["counted"] and d["diagonality"] == pytest.approx(1.0) and d["top_fifth_share"] == pytest.approx(0.2)
    assert (d["rows"], d["cols"]) == (10, 10)
    anti = matrix_alignment(_with_eos(np.eye(10)[::-1]), src, tgt)
    assert anti["diagonality"] == pytest.approx(-1.0) and anti["top_fifth_share"] == pytest.approx(0.2)
    # unequal lengths: a monotone walk (two source words per target word) is still ρ = 1
    assert matrix_alignment(_on([0, 2, 4, 6, 8, 10], 12))["diagonality"] == pytest.approx(1.0)


def test_all_on_one_source_column_is_parked_on_a_region():
    a = _with_eos(_on([7] * 10, 10))
    d = matrix_alignment(a, *_tokens(a))
    # Spearman's ρ is 0/0 for a constant argmax: defined as 0 (the target position says nothing)
    assert d["diagonality"] == 0.0 and d["top_fifth_share"] == 1.0 and d["top_fifth"] == 3
    st = dump_stats([_rec(0, a)])
    assert st["eos_mass"] == 0.0 and st["top_fifth_share"] == 1.0
    assert parked_verdict(st["eos_mass"], st["top_fifth_share"]) == "parked on a source region"


def test_all_on_eos_follows_the_eos_rule():
    T, S = 10, 10
    a = np.zeros((T + 1, S + 1))
    a[:, S] = 1.0  # every row on the source </s>
    d = matrix_alignment(a, *_tokens(a))
    # no weight left off </s>: no row has an argmax, the sentence does not count
    assert d["rows"] == 0 and not d["counted"] and math.isnan(d["diagonality"])
    st = dump_stats([_rec(0, a)])
    assert st["eos_mass"] == 1.0 and st["alignment_sentences"] == 0 and math.isnan(st["top_fifth_share"])
    assert parked_verdict(st["eos_mass"], st["top_fifth_share"]) == "parked on </s>"
    # mostly on </s> with a diagonal remainder: the EOS rule decides first
    b = _with_eos(np.eye(10) * 0.1)
    b[:10, 10] = 0.9
    st = dump_stats([_rec(0, b)])
    assert st["diagonality"] == pytest.approx(1.0) and st["eos_mass"] == pytest.approx(0.9)
    assert parked_verdict(st["eos_mass"], st["top_fifth_share"]) == "parked on </s>"


def test_sparse_rows_exact_zeros_and_ties():
    a = np.array([[0.0, 0.5, 0.5, 0.0, 0.0, 0.0],     # tie: midpoint 1.5
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],     # all-zero row (ℓ2 / sparsemax): no argmax
                  [0.2, 0.2, 0.2, 0.2, 0.2, 0.0],     # uniform over 0..4: midpoint 2.0
                  [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
                  [0.0, 0.0, 0.0, 0.4, 0.6, 0.0],
                  [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    pos = argmax_positions(a)
    np.testing.assert_array_equal(pos, [1.5, np.nan, 2.0, 3.0, 4.0, 5.0])
    d = matrix_alignment(a)
    assert d["rows"] == 5 and d["counted"] and d["diagonality"] == pytest.approx(1.0)
    # fifths of 6 columns by their centres: 1.5 → 1, 2 → 2, 3 → 2, 4 → 3, 5 → 4: fifth 2 holds two of five rows
    np.testing.assert_array_equal(source_fifths([1.5, 2.0, 3.0, 4.0, 5.0], 6), [1, 2, 2, 3, 4])
    assert d["top_fifth_share"] == pytest.approx(2 / 5) and d["top_fifth"] == 2
    # the order of equal weights never matters: mirrored columns give mirrored positions
    np.testing.assert_array_equal(argmax_positions(a[:, ::-1]), 5 - pos)


def _slow_argmax_positions(a):
    """Row by row: all columns equal to the row's maximum, their midpoint (the definition, spelled out)."""
    out = []
    for row in a:
        m = max(row) if len(row) else 0
        tied = [j for j, x in enumerate(row) if x == m]
        out.append((tied[0] + tied[-1]) / 2 if m > 0 else math.nan)
    return np.array(out)


def test_argmax_positions_against_a_slow_reference():
    rng = np.random.default_rng(0)
    for _ in range(50):
        T, S = rng.integers(1, 9, size=2)
        a = rng.integers(0, 3, size=(T, S)) / 2.0  # many exact zeros and ties
        np.testing.assert_array_equal(argmax_positions(a), _slow_argmax_positions(a))


def test_spearman_against_scipy_with_ties():
    if os.environ.get("CI") == "true":
        import scipy.stats  # in the test extra: must be there under CI
    else:
        scipy = pytest.importorskip("scipy.stats")  # noqa: F841
        import scipy.stats
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(3, 30))
        x = rng.integers(0, 6, size=n).astype(float)
        y = rng.integers(0, 6, size=n) / 2.0
        if len(set(x)) < 2 or len(set(y)) < 2:
            continue
        assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_edge_cases():
    assert spearman([0, 1, 2], [5, 5, 5]) == 0.0  # constant y: parked, by definition 0
    assert math.isnan(spearman([1, 1, 1], [0, 1, 2]))
    assert math.isnan(spearman([1], [2]))
    assert spearman([0, 1, 2, 3], [0, 10, 11, 1000]) == pytest.approx(1.0)  # monotone, not linear: ranks make it 1
    with pytest.raises(ValueError, match="1-D of one length"):
        spearman([1, 2], [1, 2, 3])


def test_short_and_one_word_sentences_do_not_count():
    assert not matrix_alignment(np.eye(MIN_POSITIONS - 1, 10))["counted"]  # too few target rows
    assert not matrix_alignment(np.eye(10, MIN_POSITIONS - 1))["counted"]  # too few source columns
    assert matrix_alignment(np.eye(MIN_POSITIONS))["counted"]
    # six rows, but two are all-zero: four usable rows, not enough
    z = np.eye(6)
    z[[1, 3]] = 0
    assert matrix_alignment(z)["rows"] == 4 and not matrix_alignment(z)["counted"]
    one = np.array([[1.0, 0.0], [0.0, 1.0]])  # "oui </s>" → "yes </s>"
    st = dump_stats([_rec(0, one), _rec(1, one)])
    assert st["alignment_sentences"] == 0 and math.isnan(st["diagonality"]) and math.isnan(st["top_fifth_share"])
    assert st["eos_mass"] == 0.0 and parked_verdict(st["eos_mass"], st["top_fifth_share"]) is None


def test_model_mean_weighs_sentences_equally_and_skips_other_ranks():
    short = _with_eos(np.eye(5))             # ρ = 1, 5 rows
    long_ = _with_eos(np.eye(20)[::-1])      # ρ = −1, 20 rows
    parked = _with_eos(_on([0] * 8, 8))      # a rank-1 hypothesis, parked
    recs = [_rec(0, short), _rec(1, long_), _rec(1, parked, rank=1)]
    st = dump_stats(recs)
    assert st["alignment_sentences"] == 2 and st["diagonality"] == pytest.approx(0.0)  # not (5 − 20)/25
    assert st["top_fifth_share"] == pytest.approx(0.2)
    every = dump_stats(recs, nbest_rank=None)
    assert every["alignment_sentences"] == 3 and every["top_fifth_share"] == pytest.approx((0.2 + 0.2 + 1) / 3)
    # the numbers never depend on --exclude-eos (always computed without the </s> row and column)
    assert dump_stats(recs, exclude_eos=True)["diagonality"] == st["diagonality"]
    agg = aggregate_alignment([matrix_alignment(np.eye(5)), matrix_alignment(np.eye(2))])
    assert agg == {"diagonality": pytest.approx(1.0), "top_fifth_share": pytest.approx(0.2), "alignment_sentences": 1}


def test_sources_without_eos_keep_every_column():
    # OpenNMT-py: the source has no </s>, the target ends with it
    a = np.vstack([np.eye(6), np.eye(1, 6, 5)])
    d = matrix_alignment(a, [f"s{j}" for j in range(6)], [f"t{j}" for j in range(6)] + [EOS])
    assert (d["rows"], d["cols"], d["diagonality"]) == (6, 6, pytest.approx(1.0))


# ---- padding of any layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_padded_batch_equals_unpadded(layout):
    rng = np.random.default_rng({"right": 2, "left": 3, "holes": 4}[layout])
    B, T, S = 5, 9, 11
    tl, sl = rng.integers(1, T + 1, size=B), rng.integers(1, S + 1, size=B)
    tl[0], sl[0] = T, S
    attn = rng.uniform(5, 9, size=(B, T, S))  # padding cells hold large garbage: they must be ignored
    tmask, smask = np.zeros((B, T), bool), np.zeros((B, S), bool)
    singles = []
    for b in range(B):
        core = rng.dirichlet(np.ones(sl[b]) * 0.3, size=tl[b])
        core[core < 0.1] = 0.0  # exact zeros, some all-zero rows
        if layout == "right":
            ti, si = np.arange(tl[b]), np.arange(sl[b])
        elif layout == "left":
            ti, si = np.arange(T - tl[b], T), np.arange(S - sl[b], S)
        else:
            ti, si = np.sort(rng.choice(T, tl[b], replace=False)), np.sort(rng.choice(S, sl[b], replace=False))
        tmask[b, ti], smask[b, si] = True, True
        attn[b][np.ix_(ti, si)] = core
        singles.append(matrix_alignment(core))
    got = padded_alignment(attn, tmask, smask)
    for g, s in zip(got, singles):
        assert g.keys() == s.keys()
        for k in g:
            assert g[k] == s[k] or (isinstance(g[k], float) and math.isnan(g[k]) and math.isnan(s[k])), k
    assert any(s["counted"] for s in singles)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        matrix_alignment(np.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        matrix_alignment(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="does not match"):
        matrix_alignment(np.eye(3), ["a", EOS], ["x", "y", EOS])
    with pytest.raises(TypeError, match="boolean"):
        padded_alignment(np.zeros((1, 2, 2)), np.ones((1, 2), int), np.ones((1, 2), bool))
    with pytest.raises(ValueError, match="do not fit"):
        padded_alignment(np.zeros((1, 2, 2)), np.ones((1, 3), bool), np.ones((1, 2), bool))
    with pytest.raises(ValueError, match="at least one source column"):
        source_fifths([0.0], 0)


# ---- the verdict and its thresholds ---------------------------------------------------------------------------


def test_verdict_thresholds():
    assert (EOS_MASS_PARKED, PARKED_SHARE) == (0.5, 0.5)  # the calibrated values docs/attention_maps.md explains
    assert parked_verdict(EOS_MASS_PARKED + 1e-9, 0.2) == "parked on </s>"
    assert parked_verdict(EOS_MASS_PARKED, 0.2) == "aligned"  # strictly above
    assert parked_verdict(0.1, PARKED_SHARE + 1e-9) == "parked on a source region"
    assert parked_verdict(0.1, PARKED_SHARE) == "aligned"
    assert parked_verdict(None, 0.9) == "parked on a source region"  # no source </s> (OpenNMT-py)
    assert parked_verdict(0.9, float("nan")) == "parked on </s>"
    assert parked_verdict(float("nan"), None) is None and parked_verdict(0.1, None) is None
    assert set(VERDICTS) == {"aligned", "parked on </s>", "parked on a source region"}


def test_verdict_on_matrices_either_side_of_the_share_threshold():
    # 10 target words over a 10-word source: k of them stuck on the last fifth, the others on the diagonal
    def model(k):
        cols = [9] * k + list(range(10 - k))
        return dump_stats([_rec(0, _with_eos(_on(cols, 10)))])
    above, below = model(6), model(4)  # fifth 4 (columns 8, 9) holds 6 and 4 rows (the diagonal stops at 3 and 5)
    assert above["top_fifth_share"] == pytest.approx(0.6) and below["top_fifth_share"] == pytest.approx(0.4)
    assert parked_verdict(above["eos_mass"], above["top_fifth_share"]) == "parked on a source region"
    assert parked_verdict(below["eos_mass"], below["top_fifth_share"]) == "aligned"


# ---- the commands --------------------------------------------------------------------------------------------


@pytest.fixture
def dumps(tmp_path):
    diag = [_rec(i, _with_eos(np.eye(6 + i))) for i in range(3)]
    parked = [_rec(i, _with_eos(_on([5 + i] * (6 + i), 6 + i))) for i in range(3)]
    a, b = tmp_path / "diag.jsonl", tmp_path / "parked.jsonl"
    write_dump(a, {"arch": "structattn_lstm", "attention": "softmax"}, diag)
    write_dump(b, {"arch": "structattn_lstm", "attention": "softmax"}, parked)
    return a, b


def test_stats_cli_has_the_new_columns_and_verdict(dumps, capsys):
    from structattn.report.cli import stats_main

    a, b = dumps
    assert stats_main([f"diag={a}", f"parked={b}"]) == 0
    out = capsys.readouterr().out.splitlines()
    for title in ("EOS mass", "diagonality ρ", "top-fifth share", "verdict"):
        assert title in out[0]
    rows = {line.split()[0]: line for line in out[2:]}
    assert "  1.00  " in rows["diag"] and "  0.29  " in rows["diag"]  # ρ, and the mean of 2/6, 2/7, 2/8
    assert "aligned" in rows["diag"] and "parked" not in rows["diag"]
    assert "  0.00  " in rows["parked"] and "  1.00  " in rows["parked"] and "parked on a source region" in rows[
        "parked"]
    assert stats_main([f"diag={a}", f"parked={b}", "--json"]) == 0
    js = {d["label"]: d for d in json.loads(capsys.readouterr().out)}
    assert js["diag"]["diagonality"] == pytest.approx(1.0) and js["diag"]["top_fifth_share"] == pytest.approx(
        np.mean([2 / 6, 2 / 7, 2 / 8]))  # fifths of 6, 7, 8 columns hold at most 2 of them
    assert js["diag"]["alignment_sentences"] == 3 and js["diag"]["parked"] == "aligned"
    assert js["parked"]["diagonality"] == 0.0 and js["parked"]["parked"] == "parked on a source region"


def test_results_and_seed_tables_carry_the_columns(tmp_path):
    from structattn.evaluation import results_table, seed_table

    stats_ok = {"eos_mass": 0.15, "diagonality": 0.84, "top_fifth_share": 0.33}
    stats_parked = {"eos_mass": 0.17, "diagonality": -0.02, "top_fifth_share": 0.67}
    rows = [{"variant": "softmax", "stats": stats_parked, "output": {"loop_fraction": 0.0}},
            {"variant": "viterbi-l2", "stats": stats_ok, "output": {"loop_fraction": 0.0}}]
    warn = results_table.health_warnings(rows)
    assert len(warn) == 1 and warn[0].startswith("softmax: on an average sentence 67% of its target words")
    assert "ρ = -0.02" in warn[0] and "parked on a source region" in warn[0]
    cells, _ = results_table._row_cells({"variant": "softmax", "stats": stats_parked}, has_multi=False)
    head = ["attention", "BLEU (r)", "chrF2 (r)", "updates", "epochs", "train time", "tokens/s", "exact zeros",
            "support/row", "segments/row", "EOS mass", "diagonality ρ", "top-fifth share"]
    assert dict(zip(head, cells))["diagonality ρ"] == "-0.02" and dict(zip(head, cells))["top-fifth share"] == "0.67"
    # computed but nothing to measure (no sentence of 5 words): n/a; statistics written before the columns: –
    cells = dict(zip(head, results_table._row_cells(
        {"variant": "softmax", "stats": {"eos_mass": 0.1, "diagonality": None, "top_fifth_share": None}}, False)[0]))
    assert cells["diagonality ρ"] == cells["top-fifth share"] == "n/a"
    cells = dict(zip(head, results_table._row_cells({"variant": "softmax", "stats": {"eos_mass": 0.1}}, False)[0]))
    assert cells["diagonality ρ"] == cells["top-fifth share"] == "–"
    # the seed table: both columns, and the per-seed verdict
    score = [{"name": "BLEU", "score": 5.0, "signature": "s"}, {"name": "chrF2", "score": 30.0, "signature": "c"}]
    works = []
    for s, st in ((1, stats_ok), (2, stats_parked)):
        run = tmp_path / f"seed{s}" / "runs" / "softmax"
        run.mkdir(parents=True)
        (run / "score.json").write_text(json.dumps(score))
        (run / "attention_stats.json").write_text(json.dumps([{"label": "softmax", **st}]))
        works.append(run.parents[1])
    text = seed_table.render(works, ["softmax"], "softmax", [], 10)
    assert "| diagonality ρ | top-fifth share |" in text and "| parked seeds |" in text
    assert "| 0.41 ± 0.61 | 0.50 ± 0.24 |" in text and "| 1 of 2 |" in text
    per_seed = [line for line in text.splitlines() if "| `seed" in line]
    assert "| aligned |" in per_seed[0] and "| parked on a source region |" in per_seed[1]


def test_health_parking_report_on_a_dump():
    from structattn.evaluation.attention_health import parking_report

    recs = [_rec(i, _with_eos(_on([5] * 8, 8))) for i in range(2)] + [_rec(0, _with_eos(np.eye(8)), rank=1)]
    rep = parking_report(recs, EOS)
    assert rep["parked"] == "parked on a source region" and rep["top_fifth_share"] == 1.0
    assert rep["alignment_sentences"] == 2 and rep["parked_thresholds"] == {"eos_mass": 0.5, "top_fifth_share": 0.5}
    short = parking_report([_rec(0, np.eye(2))], EOS)
    assert short["parked"] is None and short["diagonality"] is None  # JSON-friendly nulls, never NaN
    json.dumps(short, allow_nan=False)
