"""recipes/tagging/run.py: the corpus reader, the split, the potentials of the tagger and a few training steps."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("tagging_run", ROOT / "recipes" / "tagging" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


run = _load()

CONLLU = """# sent_id = a
# text = Ev güzel .
1\tEv\tev\tNOUN\tNN\t_\t2\tnsubj\t_\t_
2\tgüzel\tgüzel\tADJ\tJJ\t_\t0\troot\t_\tSpaceAfter=No
3\t.\t.\tPUNCT\t.\t_\t2\tp\t_\t_

# sent_id = b
1-2\tGeldim\t_\t_\t_\t_\t_\t_\t_\t_
1\tGel\tgel\tVERB\tVB\t_\t0\troot\t_\t_
2\tdim\t_\tVERB\tVB\t_\t1\tig\t_\t_
2.1\tx\t_\tX\tX\t_\t_\t_\t_\t_
"""


def test_read_conllu_skips_comments_ranges_and_empty_nodes():
    sents = run.read_conllu(CONLLU)
    assert sents == [[("Ev", "NOUN"), ("güzel", "ADJ"), (".", "PUNCT")], [("Gel", "VERB"), ("dim", "VERB")]]
    with pytest.raises(ValueError, match="10 columns"):
        run.read_conllu("1\tEv\tNOUN\n")


def test_split_rule_is_the_packages():
    assert [run.split_of(k) for k in range(20)] == (["train"] * 8 + ["dev", "test"]) * 2


def _toy():
    g = torch.Generator().manual_seed(0)
    words = ["ev", "güzel", "gel", "dim", "."]
    tags = {"ev": "NOUN", "güzel": "ADJ", "gel": "VERB", "dim": "VERB", ".": "PUNCT"}
    sents = []
    for _ in range(40):
        n = int(torch.randint(2, 7, (1,), generator=g))
        ws = [words[int(i)] for i in torch.randint(0, 5, (n,), generator=g)]
        sents.append([(w, tags[w]) for w in ws])
    return sents


def test_tagger_potentials_follow_section_4_2():
    sents = _toy()
    vocabs = run.build_vocabs(sents)
    model = run.Tagger(vocabs, hidden=8).eval()
    with torch.no_grad():
        model.transition.normal_()
    feats, tags, lengths = run.encode(sents[:5], vocabs)
    theta = model(feats, lengths)
    S = len(vocabs["tag"])
    assert theta.shape == (5, int(lengths.max()), S, S)
    assert torch.equal(theta[:, 0], theta[:, 0, :, :1].expand(-1, -1, S))  # θ_1 ignores the previous tag
    # θ[t, i, j] − θ[t, i, j'] = T_ij − T_ij' for t ≥ 1
    d = theta[:, 1:, :, 0] - theta[:, 1:, :, 1]
    assert torch.allclose(d, (model.transition[:, 0] - model.transition[:, 1]).expand_as(d), atol=1e-6)


@pytest.mark.parametrize("loss", ["entropy", "l2", "perceptron"])
def test_training_steps_reduce_the_loss(loss):
    torch.manual_seed(0)
    sents = _toy()
    vocabs = run.build_vocabs(sents)
    model = run.Tagger(vocabs, hidden=8, dropout=0.0)
    crit = run.ViterbiLoss(run.LOSSES[loss], 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    feats, tags, lengths = run.encode(sents[:20], vocabs)
    first = None
    for _ in range(25):
        value = crit(model(feats, lengths), tags, lengths)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < 0.5 * first
    assert run.accuracy(model, [(feats, tags, lengths)]) > 0.95


def test_installed_corpus_matches_the_recipe():
    """The TWT wheel (test extra): its files' sha256, the sentence counts of the three splits."""
    if os.environ.get("CI") != "true":
        pytest.importorskip("turkish_treebanks")
    splits = run.load_splits(run.locate_corpus())
    assert {k: len(v) for k, v in splits.items()} == {"train": 3881, "dev": 485, "test": 485}
    assert sum(len(s) for v in splits.values() for s in v) == 81370
    assert len(run.build_vocabs(splits["train"])["tag"]) == 14
