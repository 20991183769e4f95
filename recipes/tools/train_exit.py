"""Decide what a failed fairseq-train step of a recipe means: a training that failed, or one that finished and then
died at exit.

    python recipes/tools/train_exit.py --log RUN/train.log --offset BYTES --since EPOCH \
        --checkpoint RUN/checkpoints/checkpoint_last.pt --status N

fairseq 0.12 can abort at exit (SIGABRT, status 134, "terminate called without an active exception") after a
training stopped mid-epoch: its prefetch thread is unwound inside torch's C++ code (docs/reliability.md; the plugin
closes that thread, see structattn_fairseq/fairseq_patches.py). A recipe must neither hide such a death nor throw away a
finished model, nor loop retrying. This tool looks at the part of the log written by this attempt (from byte
``--offset``) and at the checkpoint:

* exit 0 — the training finished: "done training" was logged, ``--checkpoint`` was written by this attempt (mtime
  ≥ ``--since``) and holds as many updates as the last update count in the log. A loud report goes to stderr; the
  recipe keeps the model and goes on, once.
* exit 1 — anything else (the training failed before finishing): the reason goes to stderr; the recipe stops.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys

_UPDATES = re.compile(r'"(?:train_)?num_updates":\s*"?(\d+)')


def describe_status(status: int) -> str:
    """'status 134 (SIGABRT)' for a shell exit status; negative statuses are Python's signal convention."""
    sig = -status if status < 0 else status - 128 if status > 128 else 0
    try:
        return f"status {status} ({signal.Signals(sig).name})" if sig else f"status {status}"
    except ValueError:
        return f"status {status}"


def logged_updates(text: str) -> int | None:
    """The last update count in fairseq's JSON log records (train_inner, train, valid), None if there is none."""
    found = _UPDATES.findall(text)
    return int(found[-1]) if found else None


def checkpoint_updates(path: str) -> int:
    """Number of updates stored in a fairseq checkpoint (loaded through the plugin's narrow allow-list)."""
    import torch

    from structattn_fairseq.checkpoint_compat import fairseq_checkpoint_globals

    with torch.serialization.safe_globals(fairseq_checkpoint_globals()):
        state = torch.load(path, map_location="cpu")
    return int(state["optimizer_history"][-1]["num_updates"])


def verdict(log_text: str, checkpoint: str, since: float) -> tuple[bool, str]:
    """(finished, explanation) for the log text of one attempt and the checkpoint it should have written."""
    if "done training" not in log_text:
        return False, "the log of this attempt has no 'done training': the training itself did not finish"
    if not os.path.isfile(checkpoint):
        return False, f"{checkpoint} does not exist"
    if os.path.getmtime(checkpoint) < since:
        return False, f"{checkpoint} is older than this attempt: it was not written by it"
    try:
        stored = checkpoint_updates(checkpoint)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means "not finished"
        return False, f"{checkpoint} cannot be loaded ({type(e).__name__}: {e})"
    logged = logged_updates(log_text)
    if logged is None:
        return False, "the log of this attempt reports no update count (use --log-format json)"
    if stored != logged:
        return False, f"{checkpoint} holds update {stored} but the log's last record is update {logged}"
    return True, f"'done training' logged and {checkpoint} holds update {stored}, the last one logged"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", required=True, help="the training log the recipe appends to")
    ap.add_argument("--offset", type=int, default=0, help="size of the log in bytes before this attempt")
    ap.add_argument("--since", type=float, required=True, help="start of this attempt (seconds since the epoch)")
    ap.add_argument("--checkpoint", required=True, help="the checkpoint_last.pt this attempt should have written")
    ap.add_argument("--status", type=int, required=True, help="exit status of the training command")
    ap.add_argument("--name", default="train", help="step name for the messages")
    args = ap.parse_args(argv)
    try:
        with open(args.log, "rb") as f:
            f.seek(max(args.offset, 0))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        print(f"{args.name}: cannot read the training log {args.log!r} ({e.strerror})", file=sys.stderr)
        return 1
    finished, why = verdict(text, args.checkpoint, args.since)
    status = describe_status(args.status)
    if not finished:
        print(f"{args.name}: fairseq-train failed with {status}: {why}.", file=sys.stderr)
        return 1
    print("\n".join([
        "!" * 100,
        f"!! {args.name}: fairseq-train exited with {status} AFTER it finished: {why}.",
        "!! The model is complete; the recipe keeps it and goes on. This is fairseq's abort at exit after a",
        "!! mid-epoch stop (docs/reliability.md), which the plugin's patch (structattn_fairseq/fairseq_patches.py) should",
        "!! prevent: please report it with the log " + json.dumps(args.log) + ".",
        "!" * 100,
    ]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
