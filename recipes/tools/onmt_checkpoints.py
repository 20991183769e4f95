"""The checkpoints of an OpenNMT-py run of the recipes (``--toolkit onmt``): resume, and pick the best one.

``structattn-onmt-train -save_model RUN/model`` writes ``RUN/model_step_N.pt`` every ``-save_checkpoint_steps``
and at the last step, keeps all of them (``-keep_checkpoint -1``) and, unlike fairseq, neither a
``checkpoint_last.pt`` nor a ``checkpoint_best.pt``. This tool gives the recipe both::

    python recipes/tools/onmt_checkpoints.py trained --run RUN --steps N
        exit 0 (and a line on stderr) when the newest RUN/model_step_K.pt has K >= N: the training is done and is
        not run again (OpenNMT-py would train one more step); exit 1 otherwise
    python recipes/tools/onmt_checkpoints.py resume --run RUN
        prints "-train_from RUN/model_step_K.pt" for the newest K (nothing for a fresh run): the training goes on
        from there, as fairseq's from checkpoint_last.pt (model, optimiser and step restored)
    python recipes/tools/onmt_checkpoints.py best --run RUN --steps N
        RUN/model_best.pt -> model_step_K.pt (a relative symlink) for the saved step K <= N of lowest validation
        perplexity in RUN/train.log (ties: the later step, as fairseq's checkpoint_best.pt), and RUN/best.json
        {"step", "valid_ppl", "checkpoint", "validations": [[step, ppl], ...]}

The validation perplexities come from the log (:func:`structattn.evaluation.results_table.parse_onmt_train_log`):
OpenNMT-py logs
``Validation perplexity: X`` after the ``Step N/M; ...`` line of the step it validated.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from structattn.evaluation.results_table import parse_onmt_train_log

_STEP = re.compile(r"^model_step_(\d+)\.pt$")


def saved_steps(run: Path) -> dict[int, Path]:
    """step → RUN/model_step_<step>.pt, for every checkpoint file in ``run``."""
    out = {}
    if run.is_dir():
        for p in run.iterdir():
            m = _STEP.match(p.name)
            if m and p.is_file():
                out[int(m.group(1))] = p
    return out


def newest(run: Path) -> tuple[int, Path] | None:
    steps = saved_steps(run)
    if not steps:
        return None
    k = max(steps)
    return k, steps[k]


def pick_best(validations, saved, max_step: int):
    """(step, ppl) of lowest perplexity among ``validations`` [(step, ppl)] whose step is in ``saved`` and at most
    ``max_step``; the later step on ties; None without a candidate."""
    cands = [(ppl, -step) for step, ppl in validations if step in saved and step <= max_step]
    if not cands:
        return None
    ppl, neg = min(cands)
    return -neg, ppl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trained", help="exit 0 when the newest checkpoint holds at least --steps steps")
    r = sub.add_parser("resume", help="print -train_from NEWEST (nothing for a fresh run)")
    b = sub.add_parser("best", help="link RUN/model_best.pt to the saved step of lowest validation perplexity")
    for s in (t, r, b):
        s.add_argument("--run", required=True, type=Path, help="the run folder (-save_model RUN/model)")
    for s in (t, b):
        s.add_argument("--steps", required=True, type=int, help="the training budget (-train_steps)")
    args = p.parse_args(argv)
    run = args.run
    last = newest(run)

    if args.cmd == "trained":
        if last and last[0] >= args.steps:
            print(f"{run.name}: {last[1]} already holds step {last[0]} >= {args.steps}: not trained further",
                  file=sys.stderr)
            return 0
        return 1

    if args.cmd == "resume":
        if last:
            if any(c.isspace() for c in str(last[1])):  # printed for the shell's word splitting
                p.error(f"cannot resume from {last[1]}: the path contains white space")
            print(f"-train_from {last[1]}")
            print(f"{run.name}: resuming from {last[1]} (step {last[0]})", file=sys.stderr)
        return 0

    log = run / "train.log"
    if not log.is_file():
        p.error(f"{log} does not exist: train first")
    validations = parse_onmt_train_log(log).get("validations", [])
    saved = saved_steps(run)
    best = pick_best(validations, saved, args.steps)
    if best is None:
        p.error(f"no saved checkpoint of step <= {args.steps} in {run} has a validation perplexity in {log} "
                f"(validated steps: {[s for s, _ in validations] or 'none'}; saved: {sorted(saved) or 'none'})")
    step, ppl = best
    link = run / "model_best.pt"
    tmp = run / "model_best.pt.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(saved[step].name, tmp)
    os.replace(tmp, link)
    (run / "best.json").write_text(json.dumps(
        {"step": step, "valid_ppl": ppl, "checkpoint": saved[step].name, "validations": validations}, indent=1) + "\n")
    print(f"{run.name}: best checkpoint {saved[step].name} (validation perplexity {ppl:g}; "
          f"{len(validations)} validation(s) in the log)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
