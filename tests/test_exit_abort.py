"""fairseq-train must exit 0 after training stops mid-epoch (issue 11; the patch is in structattn_fairseq/fairseq_patches.py).

fairseq's prefetch thread (``BackgroundConsumer``, a daemon thread behind ``BufferedIterator``) used to be left
running when training stopped in the middle of an epoch; at interpreter exit CPython ends such a thread with
``pthread_exit``, and if the thread is inside torch's C++ code at that moment the forced unwind hits a ``noexcept``
frame: "terminate called without an active exception", SIGABRT, exit status 134, after the checkpoint was written.

* The mechanism, deterministically: a ``BufferedIterator`` over a source that spends its time in torch ops, one
  batch taken, then the process exits — fairseq alone aborts every time, with the plugin's patch it exits 0.
* The patch leaves prefetching as it was: same items, same end of epoch, exceptions still reach the reader.
* The real CLI, several times: fairseq-train with the plugin stopped after 1, 2, 3 and 7 updates and by a tiny
  ``--stop-time-hours``, two runs each, side by side, every run exit 0 with "done training" logged and a loadable
  checkpoint_last.pt. The abort was intermittent in the CLI; the stress run is
  ``bash scripts/repro_exit_abort.sh --plugin --runs 50`` (a tally of exit statuses), the deterministic check is
  the mechanism test.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fairseq_helpers import ROOT, USER_DIR, cli_env, parse_log, run_cli, run_clis

torch = pytest.importorskip("torch")
pytest.importorskip("fairseq")

MECHANISM = '''
import sys, torch
sys.path.insert(0, {root!r})
from fairseq.data import iterators
if sys.argv[1] == "patched":
    import structattn_fairseq  # loading the plugin installs the patches, as --user-dir does
    assert getattr(iterators.BackgroundConsumer, "_structattn_closable", False)

class Source:
    """Batches that take a while to build in torch code (each op releases the GIL)."""
    def __len__(self):
        return 1000
    def __iter__(self):
        x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
        for _ in range(1000):
            for _ in range(20):
                x = torch.tanh(x @ x)
            yield x.sum()

it = iterators.BufferedIterator(10, Source())
next(it)
print("took one batch; exiting mid-epoch", flush=True)
'''


def _mechanism(tmp_path, mode):
    script = tmp_path / "mechanism.py"
    script.write_text(MECHANISM.format(root=str(ROOT)))
    return subprocess.run([sys.executable, str(script), mode], env=cli_env(), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def test_prefetch_thread_in_torch_code_aborts_exit_unless_the_plugin_is_loaded(tmp_path):
    for _ in range(3):
        plain = _mechanism(tmp_path, "plain")
        assert plain.returncode == -6, (plain.returncode, plain.stderr[-2000:])  # SIGABRT: the bug, reproduced
        assert "terminate called without an active exception" in plain.stderr
        patched = _mechanism(tmp_path, "patched")
        assert patched.returncode == 0, patched.stderr[-4000:]
        assert "took one batch" in patched.stdout and "terminate called" not in patched.stderr


def test_patched_prefetch_yields_the_same_epoch_and_closes():
    import structattn_fairseq  # noqa: F401
    from fairseq.data import iterators

    from structattn_fairseq import fairseq_patches

    assert getattr(iterators.BackgroundConsumer, "_structattn_closable", False)
    items = list(range(37))
    it = iterators.BufferedIterator(4, items)
    assert list(it) == items  # whole epoch, in order, then StopIteration

    class Boom:
        def __len__(self):
            return 3

        def __iter__(self):
            yield 1
            raise RuntimeError("bad batch")

    it = iterators.BufferedIterator(4, Boom())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad batch"):
        next(it)

    # A consumer blocked on a full queue (the reader stopped mid-epoch) is closed quickly by the exit hook.
    it = iterators.BufferedIterator(2, list(range(1000)))
    assert next(it) == 0
    consumer = it._consumer
    deadline = time.monotonic() + 10
    while it._queue.qsize() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert consumer.is_alive()
    t0 = time.monotonic()
    assert fairseq_patches.close_prefetch_threads(timeout=10) >= 1
    assert not consumer.is_alive() and time.monotonic() - t0 < 5
    assert fairseq_patches.close_prefetch_threads(timeout=10) == 0  # nothing left to stop; idempotent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """1,000 copy-task sentences of 1-20 tokens: ~16 batches of 64 per epoch, so every stop below is mid-epoch."""
    import random

    root = tmp_path_factory.mktemp("exit_abort")
    raw = root / "raw"
    raw.mkdir()
    rng = random.Random(0)
    words = [f"w{i}" for i in range(20)]
    for split, n in (("train", 1000), ("valid", 20)):
        sents = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 20))) for _ in range(n)]
        (raw / f"{split}.src").write_text("\n".join(sents) + "\n")
        (raw / f"{split}.tgt").write_text("\n".join(s.upper() for s in sents) + "\n")
    run_cli("preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", raw / "train",
            "--validpref", raw / "valid", "--destdir", root / "bin", "--workers", "1")
    return root


# Two runs per way of stopping (10 in all, run two at a time); scripts/repro_exit_abort.sh is the stress test.
STOPS = [("--max-update", str(u)) for u in (1, 2, 3, 7) for _ in range(2)] + [("--stop-time-hours", "1e-7")] * 2


@pytest.mark.slow
def test_fairseq_train_with_the_plugin_exits_zero_whenever_it_stops_mid_epoch(data):
    from structattn_fairseq.checkpoint_compat import allow_fairseq_checkpoints

    commands = [("train", [
        data / "bin", "--user-dir", USER_DIR, "--arch", "structattn_lstm", "--attention", "viterbi",
        "--attention-reg", "l2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--decoder-out-embed-dim", "32", "--optimizer", "adam", "--lr", "0.01", "--batch-size", "64",
        flag, value, "--save-dir", data / f"ck{i}", "--no-epoch-checkpoints", "--disable-validation", "--cpu",
        "--num-workers", "0", "--dropout", "0", "--log-format", "json", "--log-interval", "1"])
        for i, (flag, value) in enumerate(STOPS)]
    failures = []
    for i, ((flag, value), proc) in enumerate(zip(STOPS, run_clis(commands, check=False))):
        save = data / f"ck{i}"
        if proc.returncode != 0:
            failures.append(f"run {i} {flag} {value}: exit {proc.returncode}: {proc.stderr[-300:]!r}")
            continue
        assert "done training" in proc.stdout + proc.stderr
        with allow_fairseq_checkpoints():
            state = torch.load(save / "checkpoint_last.pt", map_location="cpu")
        updates = state["optimizer_history"][-1]["num_updates"]
        logged = parse_log(proc.stdout + proc.stderr)["train"]
        assert logged and int(logged[-1]["train_num_updates"]) == updates  # the log and the checkpoint agree
        if flag == "--max-update":
            assert updates == int(value)  # stopped where asked, mid-epoch
        else:
            assert 1 <= updates < 16  # the time limit stopped it in the first epoch
    assert not failures, "\n".join(failures)
