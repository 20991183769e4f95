"""Significance over seeds *and* test sentences: a two-level paired bootstrap of mean BLEU/chrF2 across seeds.

    structattn-multiseed --refs test.en --baseline softmax=s1/hyp,s2/hyp,s3/hyp \
        --system viterbi-l2=s1/hyp,s2/hyp,s3/hyp [--system ...] --n 1000 --seed 12345 --out multiseed.json

The paired bootstrap of one run (sacrebleu's ``PairedTest``, :mod:`structattn.evaluation.significance`) resamples the test set only: it
says whether *these two trained models* differ, not whether the *training recipes* do — a change of random seed moved
the quick preset's softmax by 10 BLEU. Here each system is given as one hypothesis file per seed, and its score is
the mean over seeds of the corpus score. Each bootstrap resample draws

* the test sentences with replacement (the same sentences for every system: paired over sentences, as Koehn 2004),
* and, independently for every system, as many seeds as it has, with replacement (the seeds of two systems are not
  paired: seed k of one recipe has nothing in common with seed k of another),

and recomputes every system's mean-over-seeds corpus score from sentence-level sufficient statistics (as sacrebleu
does). The p-value of a system against the baseline is two-sided: the fraction of resampled differences, centred on
their mean, at least as large in magnitude as the observed difference, (c + 1)/(n + 1). With k seeds per system the
seed level has only C(2k−1, k) distinct draws (10 for k = 3): the test is conservative when seeds are few, which is
the point — it cannot call a difference significant that one lucky seed made. Identical inputs give p = 1.

Output JSON: {"baseline", "n_samples", "seed", "systems": {name: {"seeds": k, metric: {"per_seed": [...], "mean",
"std" (sample std over seeds, ddof = 1; 0 for one seed), "ci" (half-width of the 95 % bootstrap interval of the mean),
"delta" (mean − baseline mean), "p_value"}}}}.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .. import __version__
from .significance import emit_json, read_lines


def _named_list(text: str):
    name, sep, paths = text.partition("=")
    files = [p for p in paths.split(",") if p]
    if not sep or not name or not files:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE[,FILE...] (one file per seed), got {text!r}")
    return name, files


def seed_bootstrap(refs: list[list[str]], systems: list[tuple[str, list[list[str]]]], n: int = 1000,
                   seed: int = 12345) -> dict:
    """``systems[0]`` is the baseline; each system is (name, [hypotheses of seed 1, of seed 2, ...]), every
    hypothesis list with one line per reference line. Returns the JSON structure of the module docstring."""
    from sacrebleu.metrics import BLEU, CHRF

    if not refs or not refs[0]:
        raise ValueError("no reference lines")
    n_lines = len(refs[0])
    for r in refs[1:]:
        if len(r) != n_lines:
            raise ValueError(f"references differ in length: {n_lines} vs {len(r)} lines")
    if len(systems) < 2:
        raise ValueError("give a baseline and at least one system")
    names = [name for name, _ in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"system names must be unique, got {names}")
    for name, runs in systems:
        if not runs:
            raise ValueError(f"{name}: no seed")
        for k, hyps in enumerate(runs):
            if len(hyps) != n_lines:
                raise ValueError(f"{name}, seed file {k + 1}: {len(hyps)} hypotheses for {n_lines} reference lines")
    if n < 1:
        raise ValueError("the number of bootstrap samples must be >= 1")
    metrics = {"BLEU": BLEU(references=refs), "chrF2": CHRF(references=refs)}
    rng = np.random.default_rng(seed)
    sent_idx = rng.integers(0, n_lines, size=(n, n_lines))
    seed_idx = {name: rng.integers(0, len(runs), size=(n, len(runs))) for name, runs in systems}
    baseline = systems[0][0]
    out = {"baseline": baseline, "n_samples": n, "seed": seed, "systems": {}}
    for mname, metric in metrics.items():
        stats, observed, boot = {}, {}, {}
        for name, runs in systems:
            st = np.stack([np.asarray(metric._extract_corpus_statistics(h, None), dtype=np.float64) for h in runs])
            stats[name] = st  # (seeds, sentences, statistics)
            observed[name] = [float(metric._compute_score_from_stats(s.sum(0)).score) for s in st]
            # per resample: every seed's corpus score on the resampled sentences, then the mean of the drawn seeds
            per_seed = np.array([[metric._compute_score_from_stats(st[k][idx].sum(0)).score for k in range(len(runs))]
                                 for idx in sent_idx])  # (n, seeds)
            boot[name] = np.take_along_axis(per_seed, seed_idx[name], axis=1).mean(1)
        base_mean = float(np.mean(observed[baseline]))
        for name, runs in systems:
            mean = float(np.mean(observed[name]))
            entry = out["systems"].setdefault(name, {"seeds": len(runs)})
            lo, hi = np.percentile(boot[name], [2.5, 97.5])
            res = {"per_seed": [round(x, 4) for x in observed[name]], "mean": mean,
                   "std": float(np.std(observed[name], ddof=1)) if len(runs) > 1 else 0.0,
                   "ci": float((hi - lo) / 2), "delta": None, "p_value": None}
            if name != baseline:
                res["delta"] = mean - base_mean
                if runs == systems[0][1]:
                    res["p_value"] = 1.0  # identical outputs: no evidence of a difference
                else:
                    diffs = boot[name] - boot[baseline]
                    count = int(np.sum(np.abs(diffs - diffs.mean()) >= abs(res["delta"])))
                    res["p_value"] = (count + 1) / (n + 1)
            entry[mname] = res
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="structattn-multiseed", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"structattn {__version__}")
    p.add_argument("--refs", nargs="+", required=True, help="reference file(s), one line per test sentence")
    p.add_argument("--baseline", type=_named_list, required=True, help="NAME=FILE,FILE,... (one file per seed)")
    p.add_argument("--system", type=_named_list, action="append", default=[],
                   help="NAME=FILE,FILE,... (one file per seed; repeatable)")
    p.add_argument("--n", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--out", help="write JSON here (default: stdout)")
    args = p.parse_args(argv)
    if not args.system:
        p.error("give at least one --system to compare with the baseline")
    try:
        refs = [read_lines(r) for r in args.refs]
        systems = [(name, [read_lines(f) for f in files]) for name, files in [args.baseline] + args.system]
        result = seed_bootstrap(refs, systems, args.n, args.seed)
    except (OSError, ValueError) as exc:
        print(f"multiseed: {exc}", file=sys.stderr)
        return 2
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
