"""Interrupted training: fairseq-train killed with SIGKILL and resumed ends bit-identical to an uninterrupted run.

Real subprocesses on CPU: structattn_lstm with Viterbi attention, dropout on (so the dropout RNG matters), tiny
data, --save-interval-updates, --num-workers 0. The run is killed twice: mid-epoch (4 updates after the checkpoint
of update 6, so work is lost and redone) and in the second epoch (resuming from the end-of-epoch checkpoint). The
kill comes from the process itself at the start of a chosen update (a wrapper around fairseq's
``Trainer.train_step`` that sends itself SIGKILL: no Python cleanup runs, as with an out-of-memory kill), which
makes the point of death deterministic. Every tensor of the final checkpoint's model and optimizer state is
compared with torch.equal.

Why it holds (docs/reliability.md): fairseq reseeds torch with seed + num_updates before every update (dropout
masks depend only on the update number), the checkpoint stores the epoch, the position in the epoch and the
shuffling seed of the data iterator, and the Adam state and LR schedule. Across an epoch boundary it needs
``--update-epoch-batch-itr`` (see _args): without it, the run resumed in epoch 2 trains on batches of other
sentences than the uninterrupted run (same sizes; measured: models differ by up to 5e-2 after 20 updates).

The generate side (a killed fairseq-generate leaves no dump a reader accepts) is tested in test_dump_fairseq.py.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from fairseq_helpers import ROOT, USER_DIR, cli_env, make_toy_data, preprocess

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
pytest.importorskip("fairseq")

KILLER = '''
import os, signal, sys
kill_at = int(sys.argv[1])
import fairseq.trainer
_train_step = fairseq.trainer.Trainer.train_step
def train_step(self, *args, **kwargs):
    if self.get_num_updates() == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return _train_step(self, *args, **kwargs)
fairseq.trainer.Trainer.train_step = train_step
from fairseq_cli.train import cli_main
sys.argv = ["fairseq-train"] + sys.argv[2:]
cli_main()
'''

MAX_UPDATE = 20


def _args(data, save_dir, seed=3):
    # 200 sentences / batches of 16 = 13 updates per epoch: checkpoints at 6, 12, 13 (end of epoch 1), 18, 20
    return [str(a) for a in (
        data, "--user-dir", USER_DIR, "--arch", "structattn_lstm", "--attention", "viterbi", "--attention-reg", "l2",
        "--encoder-embed-dim", "16", "--encoder-hidden-size", "16", "--decoder-embed-dim", "16",
        "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16", "--dropout", "0.3",
        "--optimizer", "adam", "--lr", "0.01", "--clip-norm", "1.0", "--batch-size", "16",
        "--max-update", MAX_UPDATE, "--save-interval-updates", "6", "--no-epoch-checkpoints",
        "--seed", seed, "--cpu", "--num-workers", "0", "--no-progress-bar", "--criterion", "cross_entropy",
        "--save-dir", save_dir,
        # fairseq 0.12 builds the batches with numpy seed (seed + epoch at which the batch iterator is created) and
        # reuses that iterator in later epochs: an uninterrupted run keeps epoch 1's batches in epoch 2, a run
        # resumed in epoch 2 builds new ones. This flag makes every run rebuild them each epoch (docs/reliability.md).
        "--update-epoch-batch-itr", "True",
    )]


def _run(args, kill_at=None):
    if kill_at is None:
        cmd = [sys.executable, "-m", "fairseq_cli.train", *args]
    else:
        cmd = [sys.executable, "-c", KILLER, str(kill_at), *args]
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)


def _load(path):
    sys.path.insert(0, str(ROOT))
    from structattn_fairseq.checkpoint_compat import allow_fairseq_checkpoints

    with allow_fairseq_checkpoints():
        return torch.load(path, map_location="cpu")


def _tensors(obj, prefix=""):
    """Flatten nested dicts/lists of a state into {path: tensor}."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_toy_data(root / "raw", n_train=200, n_valid=16, n_test=4)
    preprocess(root / "raw", root / "bin")
    return root


def test_sigkilled_training_resumes_bit_identically(data):
    bin_ = data / "bin"
    straight = _run(_args(bin_, data / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = data / "killed"
    first = _run(_args(bin_, killed), kill_at=10)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert _load(killed / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"] == 6
    second = _run(_args(bin_, killed), kill_at=17)
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch 1 @ 6 updates\)", second.stdout + second.stderr)
    assert _load(killed / "checkpoint_last.pt")["extra_state"]["train_iterator"]["epoch"] == 2  # end of epoch 1
    third = _run(_args(bin_, killed))
    assert third.returncode == 0, third.stderr[-3000:]
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch 2 @ 13 updates\)", third.stdout + third.stderr)

    a = _load(data / "straight" / "checkpoint_last.pt")
    b = _load(killed / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == MAX_UPDATE
    assert a["extra_state"]["train_iterator"] == b["extra_state"]["train_iterator"]
    for part in ("model", "last_optimizer_state"):
        ta, tb = _tensors(a[part]), _tensors(b[part])
        assert ta.keys() == tb.keys() and len(ta) > 5
        different = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not different, f"{part}: {different}"

    # The comparison can tell runs apart: another seed (other dropout masks and data order) ends elsewhere.
    other = _run(_args(bin_, data / "other", seed=4))
    assert other.returncode == 0, other.stderr[-3000:]
    c = _load(data / "other" / "checkpoint_last.pt")
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
