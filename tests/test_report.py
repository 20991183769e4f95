"""structattn.report: sparsity statistics on hand-computed matrices, heatmap pixels, console commands."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from structattn.export import AttentionRecord, read_dump, write_dump
from structattn.report.cli import plot_main, report_main, stats_main
from structattn.report.stats import dump_stats, matrix_stats, row_segments, row_support

A = np.array([[0.5, 0.5, 0.0, 0.0],
              [0.2, 0.0, 0.3, 0.5],
              [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
B = np.array([[1.0]], dtype=np.float32)


def _rec(i, a, rank=0, score=0.0):
    T, S = a.shape
    return AttentionRecord(id=i, nbest_rank=rank, src_tokens=[f"s{j}" for j in range(S - 1)] + ["</s>"],
                           tgt_tokens=[f"t{j}" for j in range(T - 1)] + ["</s>"], src_text="s", hyp_text="t",
                           attention=a, score=score)


# ---- stats ---------------------------------------------------------------------------------------------------


def test_row_counts_by_hand():
    assert row_support(A).tolist() == [2, 3, 0]
    assert row_segments(A).tolist() == [1, 2, 0]
    assert row_segments(np.array([[1, 0, 1, 0, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])).tolist() == [3, 1, 1]
    assert row_segments(np.zeros((2, 0))).tolist() == [0, 0]
    # exact zeros only: 1e-30 counts as support
    assert row_support(np.array([[1e-30, 0.0]])).tolist() == [1]


def test_matrix_stats_by_hand():
    st = matrix_stats(A)
    assert st["zero_fraction"] == pytest.approx(7 / 12)
    assert st["mean_support"] == pytest.approx(5 / 3)
    assert st["mean_relative_support"] == pytest.approx((2 / 4 + 3 / 4 + 0) / 3)
    assert st["mean_segments"] == pytest.approx(1.0)
    assert st["empty_rows"] == 1


def test_dump_stats_pool_rows_and_cells_and_skip_other_ranks():
    recs = [_rec(0, A), _rec(1, B), _rec(1, np.zeros((2, 2), np.float32), rank=1)]
    st = dump_stats(recs)
    assert (st["n_sentences"], st["n_records"], st["n_rows"], st["n_cells"]) == (2, 2, 4, 13)
    assert st["zero_fraction"] == pytest.approx(7 / 13)
    assert st["mean_support"] == pytest.approx((2 + 3 + 0 + 1) / 4)
    assert st["mean_segments"] == pytest.approx((1 + 2 + 0 + 1) / 4)
    assert st["empty_rows"] == 1
    all_ranks = dump_stats(recs, nbest_rank=None)
    assert all_ranks["n_records"] == 3 and all_ranks["empty_rows"] == 3
    # without EOS: A loses its last row and column -> [[.5,.5,0],[.2,0,.3]]; B (1x1, EOS x EOS) loses everything
    ne = dump_stats(recs, exclude_eos=True)
    assert (ne["n_rows"], ne["n_cells"]) == (2, 6)
    assert ne["zero_fraction"] == pytest.approx(2 / 6)
    assert ne["mean_support"] == pytest.approx(2.0) and ne["mean_segments"] == pytest.approx(1.5)
    empty = dump_stats([])
    assert empty["n_rows"] == 0 and empty["zero_fraction"] != empty["zero_fraction"]  # NaN


# ---- heatmap pixels ------------------------------------------------------------------------------------------


def _pixel(img, fig, ax, x, y):
    """RGB of the saved image at data coordinates (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    h = img.shape[0]
    return img[int(round(h - py)), int(round(px)), :3]


@pytest.mark.parametrize("outline", [True, False])
def test_heatmap_pixels_zero_white_small_coloured_outlined(tmp_path, outline):
    import matplotlib
    import matplotlib.image as mpimg

    from structattn.report.plot import attention_figure, save_figure

    a = np.array([[1.0, 0.0, 0.0],
                  [1e-6, 0.0, 0.5],
                  [0.0, 0.0, 0.25]], dtype=np.float32)
    fig = attention_figure(a, ["a", "b", "</s>"], ["x", "y", "</s>"], title="t", dpi=100, outline=outline)
    fig.canvas.draw()
    ax = fig.axes[0]
    path = save_figure(fig, tmp_path / "h.png")
    img = mpimg.imread(path)
    assert img.shape[1] == round(fig.get_figwidth() * 100)
    cmap = matplotlib.colormaps["viridis_r"]
    for (i, j), v in np.ndenumerate(a):
        rgb = _pixel(img, fig, ax, j, i)
        if v == 0:
            assert np.all(rgb > 0.98), (i, j, rgb)  # exact zero: white
        else:
            np.testing.assert_allclose(rgb, cmap(float(v))[:3], atol=2 / 255)
            assert rgb.min() < 0.6  # even 1e-6 is far from white
    # the border between the non-zero cell (1, 0) and the zero cell (1, 1) is drawn dark only with outlines
    edge = _pixel(img, fig, ax, 0.5, 1.0)
    if outline:
        assert np.all(edge < 0.3), edge
    else:
        assert edge.min() > 0.3, edge
    svg = save_figure(fig, tmp_path / "h.svg")
    text = open(svg).read()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and "</svg>" in text


def test_plot_rejects_mismatched_labels():
    from structattn.report.plot import attention_figure

    with pytest.raises(ValueError, match="2 source tokens for 3 attention columns"):
        attention_figure(np.ones((2, 3)), ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="unknown matplotlib colour map"):
        attention_figure(np.ones((2, 2)), cmap="no_such_map")


# ---- console commands ----------------------------------------------------------------------------------------


@pytest.fixture
def dumps(tmp_path):
    dense = [_rec(i, np.full((2 + i, 3 + i), 1 / (3 + i), np.float32), score=-i) for i in range(3)]
    sparse = [_rec(i, np.eye(2 + i, 3 + i, dtype=np.float32), score=-i) for i in range(3)]
    a, b = tmp_path / "softmax.jsonl", tmp_path / "l2.jsonl"
    write_dump(a, {"arch": "structattn_lstm", "attention": "softmax"}, dense)
    write_dump(b, {"arch": "structattn_lstm", "attention": "viterbi"}, sparse)
    return a, b


def test_stats_cli_table_and_json(dumps, capsys):
    a, b = dumps
    assert stats_main([str(a), f"sparse={b}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "model" and "exact zeros" in out[0]
    rows = {line.split()[0]: line.split() for line in out[2:]}
    expected = dump_stats(read_dump(b)[1])
    assert rows["sparse"][3] == f"{expected['zero_fraction']:.3f}" and rows["softmax"][3] == "0.000"
    assert stats_main([str(a), str(b), "--json", "--exclude-eos"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert [d["label"] for d in js] == ["softmax", "l2"]
    assert js[1]["mean_support"] == pytest.approx(dump_stats(read_dump(b)[1], exclude_eos=True)["mean_support"])


def test_cli_errors_are_short_and_leave_nothing(dumps, tmp_path, capsys):
    a, b = dumps
    assert stats_main([str(tmp_path / "nope.jsonl")]) == 1
    assert capsys.readouterr().err.strip() == f"structattn-stats: error: dump not found: {tmp_path / 'nope.jsonl'}"
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(a.read_bytes()[:-30])
    assert plot_main([str(cut), "-o", str(tmp_path / "out")]) == 1
    assert "the writer did not finish" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = sorted(os.listdir(tmp_path))
    assert plot_main([str(a), "-o", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("structattn-plot: error: cannot write to output directory") and len(err.splitlines()) == 1
    assert report_main([str(a), "-o", str(blocker / "sub")]) == 1
    assert plot_main([str(a), "-o", str(tmp_path / "out"), "--ids", "7"]) == 1
    assert "no sentence with id 7" in capsys.readouterr().err
    assert report_main([str(a), str(a), "-o", str(tmp_path / "r")]) == 1
    assert "duplicate label" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(SystemExit) as e:
        plot_main([str(a)])  # -o missing: argparse usage error
    assert e.value.code == 2


def test_plot_cli_writes_one_image_per_sentence(dumps, tmp_path):
    a, _ = dumps
    out = tmp_path / "plots"
    assert plot_main([str(a), "-o", str(out), "--ids", "0,2"]) == 0
    assert sorted(os.listdir(out)) == ["s0_n0.png", "s2_n0.png"]
    assert plot_main([str(a), "-o", str(out), "--format", "svg", "--max-sentences", "1", "--no-outline"]) == 0
    assert sorted(os.listdir(out)) == ["s0_n0.png", "s0_n0.svg", "s2_n0.png"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_report_failure_midway_leaves_no_output(dumps, tmp_path, monkeypatch, capsys):
    import structattn.report.plot as plot

    a, b = dumps
    calls = {"n": 0}
    real = plot.save_figure

    def flaky(fig, path, dpi=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(fig, path, dpi)

    monkeypatch.setattr(plot, "save_figure", flaky)
    with pytest.raises(OSError):
        report_main([str(a), str(b), "-o", str(tmp_path / "rep")])
    assert calls["n"] == 3
    assert not (tmp_path / "rep").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_report_cli_refuses_to_clobber_without_force(dumps, tmp_path, capsys):
    a, b = dumps
    rep = tmp_path / "rep"
    assert report_main([f"soft={a}", f"l2={b}", "-o", str(rep), "--max-sentences", "2"]) == 0
    html = (rep / "index.html").read_text()
    imgs = sorted(os.listdir(rep / "img"))
    assert imgs == ["s0_m0.png", "s0_m1.png", "s1_m0.png", "s1_m1.png"]
    for name in imgs:
        assert f"src='img/{name}'" in html
    assert oct(os.stat(rep).st_mode & 0o777) != oct(0o700)
    assert report_main([str(a), "-o", str(rep)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (rep / "img" / "s1_m1.png").exists()
    assert report_main([str(a), "-o", str(rep), "--force", "--ids", "2"]) == 0
    assert sorted(os.listdir(rep / "img")) == ["s2_m0.png"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
