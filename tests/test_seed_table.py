"""structattn-seed-table: one table over the work folders of several seeds (means ± std, per-seed rows,
significance over seeds and sentences)."""

import json
import os
import random

import pytest

from structattn.evaluation import seed_table

REFS = [" ".join(random.Random(i).choice("the lord said unto moses and aaron speak".split()) for _ in range(8))
        for i in range(40)]


def _noisy(p, seed):
    rng = random.Random(seed)
    return [" ".join(w if rng.random() > p else "xyz" for w in r.split()) for r in REFS]


def _work(root, seed, runs):
    """A recipe work folder with scored runs: {variant: (BLEU, chrF2, hypotheses, health or None, stats)}."""
    work = root / f"seed{seed}"
    (work / "data" / "raw").mkdir(parents=True)
    (work / "data" / "raw" / "test.en").write_text("\n".join(REFS) + "\n")
    for v, (bleu, chrf, hyps, health, stats) in runs.items():
        run = work / "runs" / v
        run.mkdir(parents=True)
        (run / "score.json").write_text(json.dumps([{"name": "BLEU", "score": bleu, "signature": "s"},
                                                    {"name": "chrF2", "score": chrf, "signature": "c"}]))
        (run / "hyp.test.en").write_text("\n".join(hyps) + "\n")
        (run / "attention_stats.json").write_text(json.dumps(stats))
        if health is not None:
            (run / "health.json").write_text(json.dumps(health))
    return work


def test_means_std_per_seed_and_significance(tmp_path):
    works = []
    for s, (b_sm, b_l2) in enumerate(((20.0, 18.0), (22.0, 19.0), (24.0, 23.0)), start=1):
        runs = {"softmax": (b_sm, 40.0 + s, _noisy(0.1, s), None, {"zero_fraction": 0.0, "eos_mass": 0.1 * s}),
                "viterbi-l2": (b_l2, 38.0, _noisy(0.4, 10 + s),
                               {"fallback_fraction": 0.0, "T_over_gamma": [[1.0, 0.0], [0.0, 0.2 * s]]},
                               {"zero_fraction": 0.8, "mean_segments": 2.0, "eos_mass": 0.05})}
        if s == 3:
            del runs["viterbi-l2"]  # a seed whose l2 run has no score yet
        works.append(_work(tmp_path, s, runs))
    out = tmp_path / "R.md"
    assert seed_table.main(["--works", *map(str, works), "--variants", "softmax", "viterbi-l2", "--n", "200",
                            "--out", str(out)]) == 0
    text = out.read_text()
    sm = next(line for line in text.splitlines() if line.startswith("| softmax | 3 |"))
    assert "| 22.0 ± 2.0 | 42.0 ± 1.0 | 0.000 ± 0.000 |" in sm  # BLEU mean ± sample std over the three seeds
    assert "| 0.200 ± 0.100 |" in sm  # EOS mass
    l2 = next(line for line in text.splitlines() if line.startswith("| Viterbi ℓ2² | 2 |"))
    assert "| 18.5 ± 0.7 |" in l2 and "| 1.30 ± 0.14 |" in l2  # κ = 1 + 0.2 s for s = 1, 2
    assert text.count("| `seed") == 5  # per-seed rows
    assert "Viterbi ℓ2²: no scored run in seed3" in text
    sig = next(line for line in text.splitlines() if line.startswith("| Viterbi ℓ2² | 2 | ") and "±" in line
               and "Δ" not in line and line.count("|") == 9)
    assert "-" in sig.split("|")[4]  # a negative Δ BLEU on the real hypotheses


def test_bad_inputs(tmp_path):
    with pytest.raises(SystemExit):
        seed_table.main(["--works", str(tmp_path / "nope"), "--variants", "softmax", "--out", str(tmp_path / "o")])
    w = _work(tmp_path, 1, {"softmax": (1.0, 2.0, REFS, None, {})})
    with pytest.raises(SystemExit):
        seed_table.main(["--works", str(w), "--variants", "viterbi-l2", "--out", str(tmp_path / "o")])
    assert seed_table.mean_std([None, float("nan")]) == (None, None, 0)
    assert seed_table.mean_std([2.0]) == (2.0, 0.0, 1)


def test_study_preset_dry_run_one_stopping_rule_three_seeds(tmp_path):
    """--size study: every variant of every seed under the same stopping rule (patience 3, at most 40 epochs), no
    wall-clock cap, three seeds in their own folders, then one seed table."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # $PYTHON logs each start: a start imports structattn (torch), ~2 s of CPU, so the recipe reads the variant
    # table, the attention flags and the plugin folder in one start per invocation (recipes/lib.sh: variants_load)
    starts = tmp_path / "starts"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\necho start >> "{starts}"\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    out = subprocess.run(["bash", str(root / "recipes" / "offline_fr_en.sh"), "--size", "study", "--dry-run",
                          "--work", str(tmp_path / "w")], capture_output=True, text=True,
                         env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": str(python),
                              **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}})
    assert out.returncode == 0, out.stderr
    assert len(starts.read_text().splitlines()) == 4  # the --seeds driver, then one per seed (three)
    trains = [line for line in out.stdout.splitlines() if "fairseq-train" in line]
    assert len(trains) == 21  # 7 variants x 3 seeds
    for s in (1, 2, 3):
        mine = [t for t in trains if f"/w/seed{s}/" in t]
        assert len(mine) == 7 and all(f"--seed {s} " in t for t in mine)
    assert not any("--stop-time-hours" in t for t in trains)
    rules = {re.sub(r".*(--patience \S+).*(--max-epoch \S+).*", r"\1 \2", t) for t in trains}
    assert rules == {"--patience 3 --max-epoch 40"}
    assert any("--attention-chain off" in t for t in trains)
    assert any("--attention-form paper" in t for t in trains)
    # softmax at its default τ (10) and as published (τ = 1), side by side
    assert sum("--attention softmax --attention-temperature 10 " in t for t in trains) == 3
    assert sum("--attention softmax --attention-temperature 1 " in t for t in trains) == 3
    table = [line for line in out.stdout.splitlines() if line.startswith("structattn-seed-table")]
    assert len(table) == 1 and "--baseline softmax" in table[0] and f"{tmp_path}/w/seed3 " in table[0]
