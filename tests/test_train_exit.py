"""recipes/tools/train_exit.py: a failed training step is "finished, then died at exit" only when this attempt's log
says 'done training' and this attempt wrote a checkpoint holding the last logged update (issue 11). The recipe
path (a fake fairseq-train that aborts after / before training) is in tests/test_recipes_e2e.py."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fairseq")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "tools"))

import train_exit  # noqa: E402

DONE = ('| train | {"epoch": 1, "train_loss": "4.5", "train_num_updates": "7"}\n'
        "| fairseq_cli.train | done training in 1.0 seconds\n")


def _checkpoint(path: Path, updates: int) -> Path:
    # what fairseq-train writes, in miniature: the args Namespace needs the plugin's allow-list to load
    torch.save({"args": argparse.Namespace(arch="structattn_lstm"), "model": {},
                "optimizer_history": [{"num_updates": updates}]}, path)
    return path


def _main(tmp_path, log_text, ckpt, since, offset=0, status=134):
    log = tmp_path / "train.log"
    log.write_text(log_text)
    return train_exit.main(["--log", str(log), "--offset", str(offset), "--since", str(since), "--checkpoint",
                            str(ckpt), "--status", str(status), "--name", "train.x"])


def test_finished_then_aborted_is_accepted_loudly(tmp_path, capsys):
    since = time.time() - 1
    ckpt = _checkpoint(tmp_path / "checkpoint_last.pt", 7)
    assert _main(tmp_path, DONE, ckpt, since) == 0
    err = capsys.readouterr().err
    assert "exited with status 134 (SIGABRT) AFTER it finished" in err and "holds update 7" in err


@pytest.mark.parametrize("case, reason", [
    ("no_done", "has no 'done training'"),
    ("stale", "is older than this attempt"),
    ("mismatch", "holds update 5 but the log's last record is update 7"),
    ("missing", "does not exist"),
    ("earlier_attempt", "has no 'done training'"),
    ("garbage", "cannot be loaded"),
])
def test_anything_else_is_a_failure_with_its_reason(tmp_path, capsys, case, reason):
    since = time.time() - 1
    ckpt = tmp_path / "checkpoint_last.pt"
    log, offset = DONE, 0
    if case == "no_done":
        _checkpoint(ckpt, 7)
        log = DONE.splitlines()[0] + "\n"
    elif case == "stale":
        _checkpoint(ckpt, 7)
        os.utime(ckpt, (since - 100, since - 100))
    elif case == "mismatch":
        _checkpoint(ckpt, 5)
    elif case == "earlier_attempt":  # 'done training' is in the log, but from a previous attempt
        _checkpoint(ckpt, 7)
        log, offset = DONE + "| fairseq_cli.train | loaded checkpoint\n", len(DONE)
    elif case == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    assert _main(tmp_path, log, ckpt, since, offset=offset) == 1
    err = capsys.readouterr().err
    assert "fairseq-train failed with status 134 (SIGABRT)" in err and reason in err, err


def test_describe_status():
    assert train_exit.describe_status(134) == "status 134 (SIGABRT)"
    assert train_exit.describe_status(-9) == "status -9 (SIGKILL)"
    assert train_exit.describe_status(1) == "status 1"
