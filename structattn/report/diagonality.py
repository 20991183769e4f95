"""Is a translation model's attention aligned, or parked? Diagonality and concentration of attention matrices.

The EOS mass (:func:`structattn.report.stats.eos_mass_rows`) catches a model that parks its attention on the
source's end-of-sentence column. A model can also park it on a fixed *region* of the source: a quickstart softmax
model (seed 2) put only 0.17 of its weight on ``</s>``, yet 70 % of its target words attended most to the last fifth
of the source and it translated badly (BLEU 4.9 against 18.7 for seed 1). Two numbers per sentence tell such a
model from one that aligns, both computed on the matrix without the source ``</s>`` column and without the
target's final ``</s>`` row (the row of the step that ends the sentence, which rightly looks at the end):

* **diagonality** ρ — Spearman's rank correlation between the target position i and the row's *argmax source
  position* j*(i). An aligned model walks through the source as it writes the target: ρ near 1 for a language pair
  in the same word order (fr→en: local swaps only), −1 for a reversed order; a parked model's j*(i) does not
  move with i: ρ near 0. Spearman, not Pearson: the relation of i and j* is monotone but not linear (unequal
  lengths, one source word giving two target words), and ranks do not let one wild row dominate a short sentence.
  Ties in the ranks (several rows on one source word) get average ranks, the usual Spearman convention.
* **top-fifth share** c — the source is cut into five equal fifths by relative position (the fifth of column j is
  ⌊5 (j + ½) / S⌋, S the number of source columns without ``</s>``); c is the share of target rows whose argmax
  falls in the fifth that holds the most of them. An aligned model spreads its argmaxes over the source: c ≈ 0.2
  for a perfect diagonal whatever the word order; a model parked on one region gives c near 1.

Definitions at the edges (decided, not accidents):

* **ties within a row** (a uniform row, equal sparsemax weights): j*(i) is the *midpoint* of the tied columns, so
  the answer does not depend on which of equal weights a sort happens to put first; a row of equal weights
  everywhere gives the source's centre.
* **rows with no weight off ``</s>``** (all-zero rows of sparse attentions, ℓ2 Viterbi rows with every p = 0,
  rows that put all their weight on ``</s>`` after that column is removed) have no argmax: they are left out, and
  so they count towards neither number (the EOS mass is the number that sees rows parked on ``</s>``). A row with
  some weight off ``</s>`` keeps its argmax over the other columns, however small that weight is: for a model
  parked on ``</s>`` the two numbers describe the remainder, and the EOS verdict comes first.
* **constant argmax** (every usable row on the same column, S ≥ 2): Spearman's ρ is 0/0; we define ρ = 0 —
  the target position says nothing about where the model looks, which is what "parked" means; c is then 1.
* **short sentences**: a correlation of two or three points is ±1 or close to it by chance, and fifths of a
  three-word source are not fifths. A sentence counts only when it has at least :data:`MIN_POSITIONS` usable
  target rows *and* :data:`MIN_POSITIONS` source columns (``</s>`` excluded); otherwise both numbers are NaN for
  it and the model's means are over the sentences that count (their number is reported).
* **padding**: the dumps of :mod:`structattn.export` hold unpadded matrices; :func:`padded_alignment` takes a padded
  batch with masks of any layout (left, right, or holes) and gives the same numbers as the unpadded matrices.

Per model: the mean of ρ and of c over the sentences that count, each sentence weighing the same (not each target
row: a long sentence is not more evidence of parking than a short one, and it keeps the mean of ρ a mean of
correlations). With n-best dumps, the hypotheses of the rank chosen (default: the final translations) are the
"sentences".

Failure cases, stated so the numbers are not over-read. ρ measures *monotonicity*, not alignment quality: a pair
with long-range reordering (verb-final vs verb-initial, ja↔en) gives a low |ρ| for a model that aligns perfectly,
and a model can walk down the diagonal and still translate badly. c is word-order free but blind to a model
that moves its attention over the source at random (c near 0.2, ρ near 0). Neither says anything about a model
whose attention is parked on ``</s>`` (the EOS mass does); very short sentences are skipped, so a test set of
short sentences gives few counted sentences (see ``alignment_sentences``).

:func:`parked_verdict` turns the per-model numbers into "aligned" / "parked on </s>" / "parked on a source
region", with the thresholds :data:`EOS_MASS_PARKED` and :data:`PARKED_SHARE` (how they were calibrated on real
dumps: docs/attention_maps.md, section "Aligned or parked").

numpy only, no plotting: :mod:`structattn.report.stats` adds these numbers to every ``structattn-stats`` row.
"""

from __future__ import annotations

import math

import numpy as np

from ..export import DEFAULT_EOS

__all__ = ["argmax_positions", "source_fifths", "spearman", "matrix_alignment", "padded_alignment",
           "aggregate_alignment", "parked_verdict", "MIN_POSITIONS", "FIFTHS", "PARKED_SHARE", "EOS_MASS_PARKED",
           "VERDICTS"]

#: a sentence needs this many usable target rows and this many source columns (``</s>`` excluded) to count
MIN_POSITIONS = 5
#: the source is cut into this many equal parts for the top-fifth share
FIFTHS = 5
#: a model whose mean top-fifth share exceeds this is "parked on a source region". Calibrated on the quickstart's
#: dumps (docs/attention_maps.md, "Aligned or parked"): the five models that translate (BLEU 15-21) have 0.32-0.35,
#: the parked softmax of seed 2 (BLEU 4.9) 0.67. 0.5 is about the middle of that gap and reads plainly: on an
#: average sentence more than half of the target words look at one fifth of the source (a perfect diagonal: 0.2)
PARKED_SHARE = 0.5
#: a model whose target rows put more than this mean weight on the source ``</s>`` column is "parked on </s>" (the
#: results table's warning threshold since the EOS mass exists: more than half of the attention on one column that
#: summarises the sentence)
EOS_MASS_PARKED = 0.5
VERDICTS = ("aligned", "parked on </s>", "parked on a source region")


def _matrix(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"attention must be a 2-D matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("attention has non-finite values")
    return a


def argmax_positions(a) -> np.ndarray:
    """Per row of ``a`` (rows × columns), the column of its largest weight: the midpoint of the tied columns when
    several share the maximum exactly; NaN for a row with no positive weight (all zeros) or no column."""
    a = _matrix(a)
    out = np.full(a.shape[0], np.nan)
    if a.shape[1] == 0:
        return out
    top = a.max(axis=1, keepdims=True)
    tied = a == top
    cols = np.arange(a.shape[1], dtype=np.float64)
    first = np.where(tied, cols, np.inf).min(axis=1)
    last = np.where(tied, cols, -np.inf).max(axis=1)
    live = top[:, 0] > 0
    out[live] = (first[live] + last[live]) / 2
    return out


def source_fifths(positions, n_cols: int) -> np.ndarray:
    """The fifth (0–4) of the source that each (possibly fractional) column position falls in:
    ⌊:data:`FIFTHS` · (j + ½) / n_cols⌋, i.e. by the centre of the column."""
    p = np.asarray(positions, dtype=np.float64)
    if n_cols < 1:
        raise ValueError(f"need at least one source column, got {n_cols}")
    return np.minimum(np.floor(FIFTHS * (p + 0.5) / n_cols), FIFTHS - 1).astype(np.int64)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n−1 of ``x``, ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(len(x))
    start = 0
    for k in range(1, len(x) + 1):  # runs of equal values; n is a sentence length, a loop is clear and cheap
        if k == len(x) or xs[k] != xs[start]:
            ranks[order[start:k]] = (start + k - 1) / 2
            start = k
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties): the Pearson correlation of the ranks. 0 when ``y`` is
    constant and ``x`` is not (see the module docstring: "constant argmax"); NaN for fewer than two points or a
    constant ``x``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return math.nan
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    sx, sy = math.sqrt((rx * rx).sum()), math.sqrt((ry * ry).sum())
    if sx == 0:
        return math.nan
    if sy == 0:
        return 0.0
    return float(np.clip((rx * ry).sum() / (sx * sy), -1.0, 1.0))


def matrix_alignment(a, src_tokens=None, tgt_tokens=None, eos: str = DEFAULT_EOS) -> dict:
    """Diagonality and top-fifth share of one attention matrix (target rows × source columns).

    With ``src_tokens``/``tgt_tokens`` (a dump record's tokens), the source's final ``eos`` column and the
    target's final ``eos`` row are removed first when present (OpenNMT-py's sources have no ``</s>``: nothing to
    remove); without them ``a`` is taken as already trimmed. Returns ``{"rows": usable rows, "cols": source
    columns, "counted": whether the sentence counts, "diagonality": ρ, "top_fifth_share": c, "top_fifth": the
    fifth (0–4) holding the most argmaxes}`` (NaN / −1 when it does not count); see the module docstring.
    """
    a = _matrix(a)
    if src_tokens is not None or tgt_tokens is not None:
        src, tgt = list(src_tokens or []), list(tgt_tokens or [])
        if a.shape != (len(tgt), len(src)):
            raise ValueError(f"attention shape {a.shape} does not match (len(tgt_tokens), len(src_tokens)) = "
                             f"({len(tgt)}, {len(src)})")
        if tgt and tgt[-1] == eos:
            a = a[:-1]
        if src and src[-1] == eos:
            a = a[:, :-1]
    pos = argmax_positions(a)
    live = ~np.isnan(pos)
    rows, cols = int(live.sum()), int(a.shape[1])
    out = {"rows": rows, "cols": cols, "counted": False, "diagonality": math.nan, "top_fifth_share": math.nan,
           "top_fifth": -1}
    if rows < MIN_POSITIONS or cols < MIN_POSITIONS:
        return out
    target = np.arange(a.shape[0], dtype=np.float64)[live]
    fifths = np.bincount(source_fifths(pos[live], cols), minlength=FIFTHS)
    out.update(counted=True, diagonality=spearman(target, pos[live]),
               top_fifth_share=float(fifths.max() / rows), top_fifth=int(fifths.argmax()))
    return out


def padded_alignment(attn, tgt_mask, src_mask) -> list[dict]:
    """:func:`matrix_alignment` of each sentence of a padded batch: ``attn`` (B, T, S), ``tgt_mask`` (B, T) and
    ``src_mask`` (B, S) boolean, True at real tokens, in any layout (left or right padding, or holes: the real
    positions are taken in order). ``attn`` is taken as already trimmed of ``</s>`` (mask it out to drop it).
    numpy arrays or CPU tensors."""
    attn = np.asarray(attn, dtype=np.float64)
    tgt_mask, src_mask = np.asarray(tgt_mask), np.asarray(src_mask)
    if attn.ndim != 3:
        raise ValueError(f"attn must be (batch, target, source), got shape {attn.shape}")
    if tgt_mask.dtype != bool or src_mask.dtype != bool:
        raise TypeError("tgt_mask and src_mask must be boolean (True at real tokens)")
    if tgt_mask.shape != attn.shape[:2] or src_mask.shape != (attn.shape[0], attn.shape[2]):
        raise ValueError(f"masks {tgt_mask.shape} and {src_mask.shape} do not fit attn {attn.shape}")
    return [matrix_alignment(attn[b][tgt_mask[b]][:, src_mask[b]]) for b in range(attn.shape[0])]


def aggregate_alignment(per_sentence) -> dict:
    """The per-model numbers from :func:`matrix_alignment` results: ``diagonality`` and ``top_fifth_share`` (means
    over the sentences that count, each weighing the same; NaN when none counts) and ``alignment_sentences``
    (how many counted)."""
    counted = [s for s in per_sentence if s["counted"]]
    if not counted:
        return {"diagonality": math.nan, "top_fifth_share": math.nan, "alignment_sentences": 0}
    return {"diagonality": float(np.mean([s["diagonality"] for s in counted])),
            "top_fifth_share": float(np.mean([s["top_fifth_share"] for s in counted])),
            "alignment_sentences": len(counted)}


def parked_verdict(eos_mass, top_fifth_share) -> str | None:
    """"parked on </s>" when ``eos_mass`` > :data:`EOS_MASS_PARKED` (checked first: for such a model the other
    numbers describe only the remainder), "parked on a source region" when ``top_fifth_share`` >
    :data:`PARKED_SHARE`, "aligned" when neither holds and the share is known; None when the numbers do not
    decide (the share unknown — no sentence counted — and the EOS mass unknown or low). A missing EOS mass (sources
    without ``</s>``, as in OpenNMT-py) does not prevent the other verdicts. NaN and None both mean unknown.

    The verdict uses the top-fifth share, not ρ: the share does not depend on the language pair's word order, so
    a model that aligns through heavy reordering is not called parked; ρ is reported beside it to read the
    monotonicity (a parked model also has ρ near 0, a reordering one need not be parked)."""
    def known(x):
        return x is not None and not (isinstance(x, float) and math.isnan(x))

    if known(eos_mass) and eos_mass > EOS_MASS_PARKED:
        return VERDICTS[1]
    if not known(top_fifth_share):
        return None
    return VERDICTS[2] if top_fifth_share > PARKED_SHARE else VERDICTS[0]
