"""Evaluation of translation runs: the recipes' tools as an installed module (docs/recipes.md).

* :mod:`~structattn.evaluation.significance` — ``structattn-significance``: paired bootstrap (sacrebleu's) of each
  system against a baseline, BLEU and chrF2, as JSON.
* :mod:`~structattn.evaluation.multiseed` — ``structattn-multiseed``: significance over seeds *and* test sentences
  (two-level paired bootstrap of each system's mean-over-seeds BLEU and chrF2 against a baseline), as JSON.
* :mod:`~structattn.evaluation.seed_table` — ``structattn-seed-table``: the work folders of several seeds of one
  recipe as one table (per-seed rows, means ± std, the two-level bootstrap against the baseline).
* :mod:`~structattn.evaluation.results_table` — ``structattn-results``: a recipe's work folder (scores, training
  logs, attention statistics, commands) as a Markdown RESULTS file.
* :mod:`~structattn.evaluation.attention_health` — ``structattn-health``: fallback rows and learned transitions
  T/γ of a trained fairseq or OpenNMT-py model.
* :mod:`~structattn.evaluation.variants` — the one table of the attention variants the recipes compare (names,
  labels, fairseq and OpenNMT-py flags); ``python -m structattn.evaluation.variants`` prints it for the shell.

``import structattn`` does not import this package; its modules import sacrebleu, fairseq or OpenNMT-py only inside
the functions that need them, so ``--help`` and ``--version`` work without them.
"""
