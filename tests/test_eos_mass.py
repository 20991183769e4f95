"""structattn-stats' EOS mass: how much attention target rows park on the source end-of-sentence column."""

import math

import numpy as np

from structattn.export import AttentionRecord
from structattn.report.stats import dump_stats, eos_mass_rows


def _rec(i, a, src, tgt, rank=0):
    return AttentionRecord(id=i, nbest_rank=rank, src_tokens=src, tgt_tokens=tgt, src_text="", hyp_text="",
                           attention=np.asarray(a, dtype=np.float32), score=0.0)


def test_eos_mass_on_hand_made_matrices():
    parked = [[0.0, 0.1, 0.9], [0.0, 0.0, 1.0], [0.2, 0.0, 0.8]]       # rows 1-2 words, row 3 the target EOS
    aligned = [[1.0, 0.0, 0.0], [0.0, 0.7, 0.3], [0.0, 0.0, 1.0]]
    src, tgt = ["a", "b", "</s>"], ["x", "y", "</s>"]
    np.testing.assert_allclose(eos_mass_rows(np.array(parked), src, tgt), [0.9, 1.0])
    st = dump_stats([_rec(0, parked, src, tgt), _rec(1, aligned, src, tgt), _rec(1, parked, src, tgt, rank=1)])
    assert math.isclose(st["eos_mass"], (0.9 + 1.0 + 0.0 + 0.3) / 4, rel_tol=1e-6)
    # the same whether or not the EOS row/column are excluded from the sparsity counts
    assert dump_stats([_rec(0, parked, src, tgt)], exclude_eos=True)["eos_mass"] == dump_stats(
        [_rec(0, parked, src, tgt)])["eos_mass"]


def test_eos_mass_unknown_without_source_eos():
    st = dump_stats([_rec(0, [[0.5, 0.5]], ["a", "b"], ["x"])])
    assert math.isnan(st["eos_mass"])
    assert eos_mass_rows(np.ones((1, 2)), ["a", "b"], ["x"]) is None


def test_kappa_from_dump_metadata():
    import torch

    from structattn.attention import ViterbiAttention, ViterbiNormalizer, coupling_report
    from structattn.report.stats import dump_kappa

    class Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
            for layer in self.layers:
                layer.norm = ViterbiNormalizer(2, "l2")

    dec = Dec()
    with torch.no_grad():
        dec.layers[1].norm.transitions_over_gamma[1] = torch.tensor([[0.25, 0.0], [0.0, 0.25]])
    report = coupling_report(dec)
    assert [r["module"] for r in report] == ["layers.0.norm", "layers.1.norm"]
    assert report[1]["kappa"] == [2.0, 0.5] and report[0]["chain"] is True
    mean, heads = dump_kappa({"couplings": [report], "attention_layer": 1})
    assert math.isclose(mean, (2 + 2 + 2 + 0.5) / 4) and heads == [2.0, 0.5]
    single = coupling_report(ViterbiAttention(3, 3, chain=False))
    assert single[0]["kappa"] == [0.0] and single[0]["chain"] is False
    assert math.isnan(dump_kappa({})[0]) and dump_kappa({"couplings": [[]]})[1] is None
    assert coupling_report(torch.nn.Linear(2, 2)) == []
