"""The two-level (sentences × seeds) paired bootstrap of structattn.evaluation.multiseed."""

import json
import random

import pytest

from structattn.evaluation import multiseed

WORDS = "the lord said unto moses and aaron speak to the children of israel saying this is the thing".split()


def _refs(n=60, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(n)]


def _noisy(refs, p, seed):
    """Each word kept with probability 1 − p, else replaced: a system whose quality falls with p."""
    rng = random.Random(seed)
    return [" ".join(w if rng.random() > p else rng.choice(["foo", "bar", "baz"]) for w in r.split()) for r in refs]


def test_identical_systems_have_p_one_and_zero_delta():
    refs = _refs()
    runs = [_noisy(refs, 0.3, s) for s in (1, 2, 3)]
    out = multiseed.seed_bootstrap([refs], [("a", runs), ("b", [list(h) for h in runs])], n=200)
    b = out["systems"]["b"]["BLEU"]
    assert b["p_value"] == 1.0 and b["delta"] == 0.0
    assert out["systems"]["a"]["BLEU"]["p_value"] is None


def test_mean_std_and_a_clear_difference():
    refs = _refs()
    good = [_noisy(refs, 0.1, s) for s in (1, 2, 3)]
    bad = [_noisy(refs, 0.5, s) for s in (4, 5, 6)]
    out = multiseed.seed_bootstrap([refs], [("good", good), ("bad", bad)], n=300)
    g, b = out["systems"]["good"]["BLEU"], out["systems"]["bad"]["BLEU"]
    from sacrebleu.metrics import BLEU
    per_seed = [BLEU().corpus_score(h, [refs]).score for h in bad]
    assert b["per_seed"] == pytest.approx(per_seed, abs=1e-3)
    assert b["mean"] == pytest.approx(sum(per_seed) / 3)
    mean = sum(per_seed) / 3
    assert b["std"] == pytest.approx((sum((x - mean) ** 2 for x in per_seed) / 2) ** 0.5)
    assert b["delta"] < -20 and b["p_value"] < 0.01
    assert g["ci"] > 0


def test_one_lucky_seed_is_not_significant():
    # The system's seeds: one far better than the baseline, two slightly worse. The sentence-level bootstrap of
    # the lucky seed alone would call it significant; over seeds it is not.
    refs = _refs(120)
    base = [_noisy(refs, 0.3, s) for s in (1, 2, 3)]
    system = [_noisy(refs, 0.05, 7), _noisy(refs, 0.35, 8), _noisy(refs, 0.35, 9)]
    one = multiseed.seed_bootstrap([refs], [("base", base[:1]), ("sys", system[:1])], n=300)
    assert one["systems"]["sys"]["BLEU"]["p_value"] < 0.01
    out = multiseed.seed_bootstrap([refs], [("base", base), ("sys", system)], n=300)
    assert out["systems"]["sys"]["BLEU"]["p_value"] > 0.05


def test_cli_and_bad_inputs(tmp_path, capsys):
    refs = _refs(20)
    (tmp_path / "ref").write_text("\n".join(refs) + "\n")
    files = []
    for s in (1, 2):
        f = tmp_path / f"h{s}"
        f.write_text("\n".join(_noisy(refs, 0.2, s)) + "\n")
        files.append(str(f))
    out = tmp_path / "o.json"
    assert multiseed.main(["--refs", str(tmp_path / "ref"), "--baseline", f"a={files[0]},{files[1]}",
                           "--system", f"b={files[1]}", "--n", "50", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["systems"]["a"]["seeds"] == 2 and data["systems"]["b"]["seeds"] == 1
    short = tmp_path / "short"
    short.write_text("a b\n")
    assert multiseed.main(["--refs", str(tmp_path / "ref"), "--baseline", f"a={files[0]}",
                           "--system", f"b={short}", "--n", "5"]) == 2
    assert "1 hypotheses for 20 reference lines" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        multiseed.main(["--refs", str(tmp_path / "ref"), "--baseline", "nofiles="])
    with pytest.raises(ValueError, match="unique"):
        multiseed.seed_bootstrap([refs], [("a", [refs]), ("a", [refs])], n=5)
