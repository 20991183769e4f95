"""Paired bootstrap significance of each system against a baseline (sacrebleu's test), as JSON.

    structattn-significance --refs test.en [test.kjv.en] --baseline softmax=hyp_a \
        --system viterbi-l2=hyp_b [--system ...] --n 1000 --seed 12345 --out significance.json

For BLEU and chrF2, with sacrebleu's ``PairedTest(test_type="bs")`` (Koehn 2004, as ``sacrebleu --paired-bs``):
each system's score, the bootstrap mean and 95% confidence interval, and (for non-baselines) the p-value of the
difference to the baseline. ``sacrebleu --paired-bs -f json`` cannot be used directly: it fails to serialise
numpy floats (sacrebleu 2.6.0). Output: {"baseline", "n_samples", "seed", "signatures", "systems": {name:
{metric: {"score", "mean", "ci", "p_value"}}}}.
"""
from __future__ import annotations

import argparse
import json
import sys

from .. import __version__


def _named(text: str):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r}")
    return name, path


def read_lines(path: str) -> list[str]:
    """The lines of a text file (references or hypotheses), without their newlines."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def emit_json(result: dict, out: str | None) -> None:
    """Write ``result`` as indented JSON to the file ``out``, or print it when ``out`` is None."""
    text = json.dumps(result, indent=1)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)


def paired_bootstrap(refs: list[list[str]], systems: list[tuple[str, list[str]]], n: int, seed: int) -> dict:
    """``systems[0]`` is the baseline; every hypothesis list must have one line per reference line."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    n_lines = len(refs[0])
    for r in refs[1:]:
        if len(r) != n_lines:
            raise ValueError(f"references differ in length: {n_lines} vs {len(r)} lines")
    for name, hyps in systems:
        if len(hyps) != n_lines:
            raise ValueError(f"{name}: {len(hyps)} hypotheses for {n_lines} reference lines")
    if n < 1:
        raise ValueError("the number of bootstrap samples must be >= 1")
    import os

    # sacrebleu reads the seed of its resampling from the environment (default 12345).
    os.environ["SACREBLEU_SEED"] = str(seed)
    metrics = {"BLEU": BLEU(references=refs), "chrF2": CHRF(references=refs)}
    test = PairedTest(systems, metrics, references=None, test_type="bs", n_samples=n)
    signatures, scores = test()
    out = {"baseline": systems[0][0], "n_samples": n, "seed": seed,
           "signatures": {k: str(v) for k, v in signatures.items()}, "systems": {}}
    for i, (name, hyps) in enumerate(systems):
        entry = {}
        # sacrebleu's bootstrap counts resamples whose difference *exceeds* the observed one, so a system identical
        # to the baseline (difference 0 in every resample) gets the smallest p-value, 1/(n+1): no evidence of any
        # difference reads as the strongest. The honest p-value of identical outputs is 1.
        identical = i > 0 and hyps == systems[0][1]
        for metric in metrics:
            res = scores[metric][i]
            p = 1.0 if identical else getattr(res, "p_value", None)
            entry[metric] = {"score": float(res.score), "mean": float(res.mean) if res.mean is not None else None,
                             "ci": float(res.ci) if res.ci is not None else None,
                             "p_value": None if i == 0 or p is None else float(p)}
        out["systems"][name] = entry
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="structattn-significance", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"structattn {__version__}")
    p.add_argument("--refs", nargs="+", required=True, help="reference file(s), one line per test sentence")
    p.add_argument("--baseline", type=_named, required=True, help="NAME=FILE of the baseline hypotheses")
    p.add_argument("--system", type=_named, action="append", default=[], help="NAME=FILE (repeatable)")
    p.add_argument("--n", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--out", help="write JSON here (default: stdout)")
    args = p.parse_args(argv)
    if not args.system:
        p.error("give at least one --system to compare with the baseline")
    names = [args.baseline[0]] + [s[0] for s in args.system]
    if len(set(names)) != len(names):
        p.error(f"system names must be distinct, got {names}")
    try:
        refs = [read_lines(r) for r in args.refs]
        systems = [(name, read_lines(path)) for name, path in [args.baseline] + args.system]
        result = paired_bootstrap(refs, systems, args.n, args.seed)
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
