"""Per-head attention dumps (multi-head models, ``--dump-attention-heads all``): the optional ``heads`` of the dump
format (structattn.export) and what structattn-stats / structattn-report show for them. No fairseq needed; the
real fairseq-generate dump is tested in test_transformer_e2e.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from structattn.export import AttentionRecord, DumpError, read_dump, write_dump
from structattn.report.cli import report_main, stats_main
from structattn.report.stats import dump_head_count, dump_stats

# Two heads of a 3 × 4 map: head 0 contiguous and sparse, head 1 dense.
H0 = np.array([[0.5, 0.5, 0.0, 0.0],
               [0.0, 0.0, 1.0, 0.0],
               [0.0, 0.0, 0.4, 0.6]], dtype=np.float32)
H1 = np.full((3, 4), 0.25, dtype=np.float32)


def _rec(i, heads=None, attention=None, rank=0):
    a = attention if attention is not None else heads.mean(0)
    T, S = a.shape
    return AttentionRecord(id=i, nbest_rank=rank, src_tokens=[f"s{j}" for j in range(S - 1)] + ["</s>"],
                           tgt_tokens=[f"t{j}" for j in range(T - 1)] + ["</s>"], src_text="s", hyp_text="t",
                           attention=a, score=-1.0, extra={"pad_mass": 0.0}, heads=heads)


def test_records_without_heads_keep_their_bytes_and_old_dumps_read(tmp_path):
    """A record without heads is written with exactly the keys of the format before heads existed (so the LSTM's
    dumps are unchanged), and such a dump reads back with heads = None."""
    path = tmp_path / "old.jsonl"
    write_dump(path, {"arch": "structattn_lstm"}, [_rec(0, attention=H0)])
    line = json.loads(path.read_text().splitlines()[1])
    assert list(line) == ["type", "id", "nbest_rank", "src_tokens", "tgt_tokens", "src_text", "hyp_text", "score",
                          "attention", "extra"]
    _, (rec,) = read_dump(path)
    assert rec.heads is None and np.array_equal(rec.attention, H0)
    assert dump_head_count([rec]) is None


def test_heads_round_trip_bit_exactly(tmp_path):
    heads = np.stack([H0, H1])
    path = tmp_path / "heads.jsonl"
    write_dump(path, {"arch": "structattn_transformer", "attention_layer": 1, "attention_heads": "all",
                      "num_heads": 2}, [_rec(0, heads), _rec(1, heads[:, :2, :3].copy(), rank=0)])
    meta, recs = read_dump(path)
    assert (meta["attention_layer"], meta["num_heads"]) == (1, 2)
    assert np.array_equal(recs[0].heads.view(np.uint32), heads.view(np.uint32))
    assert recs[1].heads.shape == (2, 2, 3) and dump_head_count(recs) == 2


def test_bad_heads_are_refused(tmp_path):
    with pytest.raises(DumpError, match=r"heads must be a numpy array of shape \(H, 3, 4\)"):
        write_dump(tmp_path / "x.jsonl", {}, [_rec(0, np.stack([H0, H1])[:, :2], attention=H0)])
    with pytest.raises(DumpError, match="heads have non-finite values"):
        write_dump(tmp_path / "y.jsonl", {}, [_rec(0, np.stack([H0, np.full_like(H1, np.nan)]), attention=H0)])
    assert not list(tmp_path.iterdir())


def test_per_head_statistics_by_hand(tmp_path):
    heads = np.stack([H0, H1])
    recs = [_rec(0, heads)]
    h0, h1, mean = dump_stats(recs, head=0), dump_stats(recs, head=1), dump_stats(recs)
    assert h0["zero_fraction"] == pytest.approx(7 / 12) and h0["mean_segments"] == 1.0
    assert h0["mean_support"] == pytest.approx(5 / 3)
    assert h1["zero_fraction"] == 0.0 and h1["mean_support"] == 4.0
    assert mean["zero_fraction"] == 0.0  # the average of a dense head is dense
    with pytest.raises(ValueError, match="head 2: record 0 has no such head"):
        dump_stats(recs, head=2)
    with pytest.raises(ValueError, match="no such head"):
        dump_stats([_rec(0, attention=H0)], head=0)


@pytest.fixture
def head_dump(tmp_path):
    heads = np.stack([H0, H1])
    path = tmp_path / "tr.jsonl"
    write_dump(path, {"arch": "structattn_transformer", "attention": "viterbi", "attention_layer": 1,
                      "attention_heads": "all", "num_heads": 2}, [_rec(0, heads), _rec(1, heads)])
    old = tmp_path / "lstm.jsonl"
    write_dump(old, {"arch": "structattn_lstm", "attention": "viterbi"}, [_rec(0, attention=H0), _rec(1, attention=H0)])
    return path, old


def test_stats_cli_adds_one_row_per_head(head_dump, capsys):
    path, old = head_dump
    assert stats_main([f"tr={path}", f"lstm={old}"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == ["tr", "tr/h0", "tr/h1", "lstm"]
    assert rows["tr/h0"][3] == f"{7 / 12:.3f}" and rows["tr/h1"][3] == "0.000"
    assert stats_main([f"tr={path}", f"lstm={old}", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert [h["zero_fraction"] for h in js[0]["heads"]] == pytest.approx([7 / 12, 0.0])
    assert "heads" not in js[1], "dumps without heads keep their JSON"


def test_report_shows_each_head(head_dump, tmp_path):
    path, old = head_dump
    out = tmp_path / "report"
    assert report_main([f"tr={path}", f"lstm={old}", "-o", str(out), "--ids", "0"]) == 0
    html = (out / "index.html").read_text()
    images = sorted(p.name for p in (out / "img").iterdir())
    assert images == ["s0_m0.png", "s0_m0_heads.png", "s0_m1.png"]
    assert "tr/h0" in html and "tr/h1" in html and "each head" in html and "layer 1, 2 heads (all)" in html
    assert "lstm/h0" not in html
