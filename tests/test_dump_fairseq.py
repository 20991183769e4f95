"""End-to-end tests of ``fairseq-generate --task structattn_translation --dump-attention`` (structattn_fairseq/dump_task.py).

A tiny ``structattn_lstm`` (Viterbi ℓ2 attention, sparse) is trained for a few updates on a copy task; the
dumps of real fairseq-generate runs are compared with the attention recomputed by running the model on each
sentence alone (no padding at all), teacher-forced on the dumped hypothesis. Batches deliberately mix
sentences of 1 to 30 tokens so that short sentences carry many padding columns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # real fairseq CLIs: about 2 minutes for the whole file on 2 cores

torch = pytest.importorskip("torch")
pytest.importorskip("fairseq")

from structattn.export import DumpError, IncompleteDumpError, read_dump, write_dump  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = ROOT / "structattn_fairseq"
TEST_LENGTHS = [1, 20, 2, 3, 18, 4, 6, 15, 9, 12, 16, 20]  # very different lengths in one batch
WORDS = [f"w{i}" for i in range(10)]
SMALL_MODEL = [
    "--encoder-embed-dim", "32", "--encoder-hidden-size", "32", "--decoder-embed-dim", "32",
    "--decoder-hidden-size", "32", "--decoder-out-embed-dim", "32",
]
ATOL = 2e-5


def _env():
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # checkpoints must load through the plugin's allow-list
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    return env


def _cmd(name, *args):
    return [sys.executable, "-m", f"fairseq_cli.{name}", *[str(a) for a in args]]


def _run(name, *args, check=True, timeout=300):
    proc = subprocess.run(_cmd(name, *args), env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"fairseq-{name} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Binarised copy-task data (splits: train, valid, test = 12 mixed-length sentences, test1 = 40 'slow'
    sentences) and two checkpoints: structattn_lstm with Viterbi ℓ2 attention, fairseq's built-in lstm."""
    root = tmp_path_factory.mktemp("dump_toy")
    rng = random.Random(0)
    raw = root / "raw"
    raw.mkdir()

    def write(split, lengths):
        sents = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]
        (raw / f"{split}.src").write_text("\n".join(sents) + "\n")
        (raw / f"{split}.tgt").write_text("\n".join(s.upper() for s in sents) + "\n")

    write("train", [rng.randint(1, 20) for _ in range(1000)])
    write("valid", [rng.randint(1, 30) for _ in range(10)])
    write("test", TEST_LENGTHS)
    write("slow", [rng.randint(5, 10) for _ in range(40)])
    data = root / "bin"
    _run("preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", raw / "train",
         "--validpref", raw / "valid", "--testpref", f"{raw / 'test'},{raw / 'slow'}", "--destdir", data,
         "--workers", "1")

    def train(save, arch_args, updates):
        _run("train", data, "--user-dir", USER_DIR, "--task", "structattn_translation", *arch_args,
             "--optimizer", "adam", "--lr", "0.01", "--batch-size", "64", "--max-update", str(updates),
             "--save-dir", root / save, "--no-epoch-checkpoints", "--disable-validation", "--seed", "1", "--cpu",
             "--num-workers", "0", "--no-progress-bar", "--criterion", "cross_entropy", "--dropout", "0")
        return root / save / "checkpoint_last.pt"

    # ~100 updates: enough for sparse, position-dependent ℓ2 attention (about a third of the cells exactly 0)
    l2 = train("l2", ["--arch", "structattn_lstm", "--attention", "viterbi", "--attention-reg", "l2"], 100)
    lstm = train("lstm", ["--arch", "lstm", *SMALL_MODEL], 1)
    return {"root": root, "data": data, "l2": l2, "lstm": lstm}


def _generate(toy, ckpt, dump, *extra, subset="test", check=True):
    return _run("generate", toy["data"], "--user-dir", USER_DIR, "--task", "structattn_translation", "--path", ckpt,
                "--gen-subset", subset, "--cpu", "--num-workers", "0", "--dump-attention", dump,
                # fairseq drops the sentences beyond the last multiple of --required-batch-size-multiple (default 8)
                "--required-batch-size-multiple", "1", "--max-len-a", "1", "--max-len-b", "5", *extra,
                check=check)


_MODELS = {}


def _load_model(toy, ckpt):
    """The checkpoint's model in eval mode, loaded in this process (the plugin registered once)."""
    key = str(ckpt)
    if key not in _MODELS:
        from fairseq import checkpoint_utils, utils

        utils.import_user_module(argparse.Namespace(user_dir=str(USER_DIR)))
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(ckpt)], arg_overrides={"data": str(toy["data"])}
        )
        _MODELS[key] = (models[0].eval(), task)
    return _MODELS[key]


def _teacher_forced_attention(toy, ckpt, rec) -> np.ndarray:
    """Attention of the model run on this sentence alone (no padding), teacher-forced on rec.tgt_tokens."""
    model, task = _load_model(toy, ckpt)
    sd, td = task.source_dictionary, task.target_dictionary
    src = torch.tensor([[sd.index(t) for t in rec.src_tokens]])
    tgt = torch.tensor([td.index(t) for t in rec.tgt_tokens])
    assert sd.unk() not in src and td.unk() not in tgt
    prev = torch.cat([torch.tensor([td.eos()]), tgt[:-1]])[None]
    with torch.no_grad():
        out = model(src, torch.tensor([src.size(1)]), prev)
    attn = out[1]
    if isinstance(attn, dict):
        attn = attn["attn"][0] if isinstance(attn["attn"], list) else attn["attn"]
    return attn[0].float().numpy()


def _hypotheses(stdout: str) -> dict:
    """{(id, rank): (base-2 score, text)} from fairseq-generate's H- lines (printed in n-best order)."""
    out, rank = {}, {}
    for line in stdout.splitlines():
        m = re.match(r"^H-(\d+)\t(\S+)\t(.*)$", line)
        if m:
            i = int(m.group(1))
            out[(i, rank.get(i, 0))] = (float(m.group(2)), m.group(3))
            rank[i] = rank.get(i, 0) + 1
    return out


def _check_against_model(toy, ckpt, records, stdout, nbest):
    hyps = _hypotheses(stdout)
    assert sorted((r.id, r.nbest_rank) for r in records) == sorted(hyps), "dump and H- lines disagree"
    assert sorted({r.id for r in records}) == list(range(len(TEST_LENGTHS)))
    for rec in records:
        assert len(rec.src_tokens) == TEST_LENGTHS[rec.id] + 1 and rec.src_tokens[-1] == "</s>"
        assert rec.tgt_tokens[-1] == "</s>"
        score2, text = hyps[(rec.id, rec.nbest_rank)]
        assert rec.hyp_text == text and rec.tgt_tokens[:-1] == text.split()
        assert math.isclose(rec.score / math.log(2), score2, rel_tol=1e-5, abs_tol=1e-6)
        assert rec.extra["pad_mass"] == 0.0
        ref = _teacher_forced_attention(toy, ckpt, rec)
        assert ref.shape == rec.attention.shape
        np.testing.assert_allclose(rec.attention, ref, atol=ATOL, rtol=0,
                                   err_msg=f"sentence {rec.id} rank {rec.nbest_rank}")
        # the model's exact zeros are the dump's exact zeros (apart from cells within rounding of 0)
        assert not np.any((rec.attention == 0) & (np.abs(ref) > ATOL))
        assert not np.any((rec.attention != 0) & (np.abs(rec.attention) > ATOL) & (ref == 0))
    for i in {r.id for r in records}:
        ranks = sorted((r for r in records if r.id == i), key=lambda r: r.nbest_rank)
        assert [r.nbest_rank for r in ranks] == list(range(nbest))
        assert all(a.score >= b.score for a, b in zip(ranks, ranks[1:]))
    # The comparison can tell misplaced columns apart: the attention of most long sentences changes by more than
    # the tolerance when its columns are shifted by one, and it is sparse, as ℓ2 attention should be.
    long = [r for r in records if len(r.src_tokens) > 10]
    shifted = [np.abs(r.attention - np.roll(r.attention, 1, axis=1)).max() > 1e-2 for r in long]
    assert sum(shifted) >= 0.75 * len(long)
    assert np.mean(np.concatenate([(r.attention == 0).ravel() for r in records])) > 0.02


def test_dump_is_the_attention_the_model_used_left_padded_beam_nbest(toy):
    dump = toy["root"] / "left.jsonl"
    proc = _generate(toy, toy["l2"], dump, "--beam", "4", "--nbest", "3", "--batch-size", "12")
    meta, records = read_dump(dump)
    assert meta["arch"] == "structattn_lstm" and meta["attention"] == "viterbi"
    assert meta["left_pad_source"] is True and meta["generation"]["beam"] == 4 and meta["generation"]["nbest"] == 3
    assert meta["gen_subset"] == "test" and meta["model_args"][0]["attention_reg"] == "l2"
    assert meta["summary"]["contract_ok"] is True and meta["summary"]["n_sentences"] == 12
    assert len(records) == 3 * len(TEST_LENGTHS)
    # one batch of 12 sentences: the 1-token sentence sits among 30-token ones, i.e. behind 29 padding columns
    _check_against_model(toy, toy["l2"], records, proc.stdout, nbest=3)
    assert not list(toy["root"].glob("left.jsonl.tmp-*"))


def test_dump_right_padded_small_batches(toy):
    dump = toy["root"] / "right.jsonl"
    # fairseq 0.12 turns a bool option that defaults to True into a store_false flag: --left-pad-source alone
    # means right-padded sources
    proc = _generate(toy, toy["l2"], dump, "--beam", "2", "--nbest", "2", "--batch-size", "5", "--left-pad-source")
    meta, records = read_dump(dump)
    assert meta["left_pad_source"] is False
    _check_against_model(toy, toy["l2"], records, proc.stdout, nbest=2)


def test_dump_score_reference_rows_follow_the_reference(toy):
    dump = toy["root"] / "ref.jsonl"
    _generate(toy, toy["l2"], dump, "--score-reference", "--batch-size", "12")
    meta, records = read_dump(dump)
    assert meta["generator"] == "SequenceScorer" and len(records) == len(TEST_LENGTHS)
    for rec in records:
        assert rec.hyp_text == rec.extra["ref_text"] == rec.src_text.upper()
        np.testing.assert_allclose(rec.attention, _teacher_forced_attention(toy, toy["l2"], rec), atol=ATOL, rtol=0)


def test_builtin_lstm_breaks_the_column_contract_and_is_flagged(toy):
    """fairseq's lstm right-pads internally (issue #3625): with left-padded batches its attention lands on
    padding columns. The exporter does not patch that; it records the mass and warns."""
    dump = toy["root"] / "lstm.jsonl"
    proc = _generate(toy, toy["lstm"], dump, "--beam", "1", "--batch-size", "12")
    meta, records = read_dump(dump)
    assert meta["summary"]["contract_ok"] is False and meta["summary"]["max_pad_mass"] > 0.1
    assert "does not index attention like src_tokens" in proc.stderr + proc.stdout
    assert max(r.extra["pad_mass"] for r in records) > 0.1


def _wait_for_records(tmp_glob, proc, n, timeout=90.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in tmp_glob():
            with open(p, "rb") as fh:
                if fh.read().count(b"\n") >= 1 + n:  # header + n records
                    return p
        if proc.poll() is not None:
            raise AssertionError(f"generate ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("no records appeared in the temporary dump")


def _slow_generate(toy, dump):
    # 40 sentences, one per batch, hypotheses forced to 150+ tokens: tens of seconds, killed after a few
    args = [toy["data"], "--user-dir", USER_DIR, "--task", "structattn_translation", "--path", toy["l2"],
            "--gen-subset", "test1", "--cpu", "--num-workers", "0", "--dump-attention", dump, "--batch-size", "1",
            "--beam", "5", "--min-len", "150", "--max-len-b", "160", "--required-batch-size-multiple", "1"]
    # SIGINT at its default in the child: a parent that ignores it (a pytest-xdist worker can) would pass SIG_IGN on,
    # and Python then installs no KeyboardInterrupt handler — the run ignores Ctrl-C and ends with 0
    return subprocess.Popen(_cmd("generate", *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_killed_generate_leaves_nothing_a_reader_accepts(toy):
    dump = toy["root"] / "killed.jsonl"
    # an older complete dump at the same path must not survive as if it were this run's output
    write_dump(dump, {"stale": True}, [])
    assert read_dump(dump)[0]["stale"] is True
    proc = _slow_generate(toy, dump)
    try:
        tmp = _wait_for_records(lambda: list(toy["root"].glob("killed.jsonl.tmp-*")), proc, n=2)
        assert not dump.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not dump.exists()
    with pytest.raises(IncompleteDumpError, match="no completion footer"):
        read_dump(tmp)
    tmp.unlink()


def test_interrupted_generate_removes_its_temporary_file(toy):
    dump = toy["root"] / "interrupted.jsonl"
    proc = _slow_generate(toy, dump)
    try:
        _wait_for_records(lambda: list(toy["root"].glob("interrupted.jsonl.tmp-*")), proc, n=1)
        # KeyboardInterrupt inside fairseq-generate, repeated as a user presses Ctrl-C again
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not dump.exists()
    assert not list(toy["root"].glob("interrupted.jsonl.tmp-*"))


def test_unwritable_dump_path_fails_before_generating(toy):
    dump = toy["root"] / "no_such_dir" / "x.jsonl"
    proc = _generate(toy, toy["l2"], dump, check=False)
    assert proc.returncode != 0
    assert "cannot write attention dump" in proc.stderr and "does not exist" in proc.stderr
    assert "H-" not in proc.stdout
    with pytest.raises(FileNotFoundError):
        read_dump(dump)
    with pytest.raises(DumpError):
        bad = toy["root"] / "not_a_dump.jsonl"
        bad.write_text('{"hello": 1}\n')
        read_dump(bad)


def test_attention_health_annotates_fallback_rows(toy, tmp_path):
    """structattn-health on a real checkpoint and dump: the forced decoding reproduces the dumped
    attention, every record gets extra.fallback_rows, structattn-stats then reports the fallback fraction, and the
    report carries T/γ."""
    dump = tmp_path / "l2.jsonl"
    _generate(toy, toy["l2"], dump, "--beam", "2")
    out = tmp_path / "health.json"
    r = subprocess.run([sys.executable, "-m", "structattn.evaluation.attention_health", "--checkpoint",
                        str(toy["l2"]), "--data", str(toy["data"]), "--dump", str(dump), "--annotate", "--json",
                        str(out), "--batch-size", "5"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    health = json.loads(out.read_text())
    assert health["attention"] == "ViterbiAttention" and health["reg"] == "l2" and health["form"] == "stable"
    assert health["max_abs_diff"] < 1e-5
    _, records = read_dump(dump)
    assert all("fallback_rows" in rec.extra for rec in records)
    n_rows = sum(len(rec.tgt_tokens) for rec in records if rec.nbest_rank == 0)
    assert health["rows"] == n_rows
    assert health["fallback_fraction"] == health["fallback_rows"] / n_rows
    assert len(health["T_over_gamma"]) == 2 and isinstance(health["independent_positions"], bool)
    from structattn.report.diagonality import VERDICTS, parked_verdict
    from structattn.report.stats import dump_stats

    st = dump_stats(records)
    # the aligned-or-parked verdict of the dump's final hypotheses, from the numbers structattn-stats reports
    assert health["parked"] in VERDICTS + (None,)
    assert health["parked"] == parked_verdict(st["eos_mass"], st["top_fifth_share"])
    assert health["alignment_sentences"] == st["alignment_sentences"]
    # known once annotated (NaN otherwise), and the same fraction the health check found over the same rows
    assert st["n_rows"] == n_rows and st["fallback_fraction"] == health["fallback_fraction"]
