"""Sparsity statistics of attention matrices (the quantities behind the paper's Fig. 4/8 remark that ℓ2 maps
are sparse and structured).

For a matrix A (target rows × source columns) we count, with *exact* zeros (A == 0, no threshold):

* zero fraction: #{(i, j): A_ij = 0} / #cells;
* support size of row i: #{j: A_ij ≠ 0};
* segments of row i: the number of maximal runs of consecutive non-zero cells (1 for a contiguous block,
  0 for an all-zero row; the segmentation attention of Mensch & Blondel §5 tends to give few segments);
* empty rows: rows with no non-zero cell (possible with ℓ2 Viterbi attention, where all p(y_t = 1) can be 0);
* EOS mass: the mean weight a target row puts on the source's end-of-sentence column (the target's own EOS row
  excluded, which rightly attends there). A model that *parks* its attention on the source EOS — whose encoder state
  summarises the whole sentence, so a decoder can ignore the alignment and behave like a language model — shows
  a mass near 1 (a quickstart softmax model once had 0.91 and wrote fluent text unrelated to the source); n/a when
  no record's source ends with the EOS symbol;
* diagonality ρ and top-fifth share (:mod:`structattn.report.diagonality`): a model can also park its attention on
  a fixed *region* of the source, which the EOS mass does not see. ρ = Spearman's correlation of target position
  and argmax source position (near 1: the attention walks along the source; near 0: it does not move), the
  top-fifth share = the share of target rows whose argmax lies in the most visited fifth of the source (≈ 0.2
  for a diagonal, near 1 when parked). Both per sentence on the matrix without the source ``</s>`` column and
  the target ``</s>`` row (whatever ``exclude_eos`` says, as the EOS mass ignores it), sentences with fewer than
  5 usable rows or source columns skipped, then averaged over sentences (each weighing the same; how many
  counted: ``alignment_sentences``);
* fallback rows: the fraction of rows where the Viterbi attention had p(y_t = 1) = 0 for every t and fell back to
  softmax (:func:`structattn.attention.dead_rows`). A fallback row is a dense softmax row, which the matrix alone
  cannot tell from a live one, so this is read from the records' ``extra["fallback_rows"]`` (indices of the rows
  that fell back, written by ``structattn-health`` from a forced decoding of the dumped
  hypotheses); it is n/a when a record does not carry it (softmax/sparsemax dumps, or dumps not annotated).

κ (``structattn-stats``' last column): the coupling of neighbouring positions of the model's learned transitions,
κ = (T₀₀ + T₁₁ − T₀₁ − T₁₀)/γ (:func:`structattn.ops.segmentation.chain_coupling`; |κ| < 0.25: independent
positions), read from the dump's metadata (``couplings``, written by both toolkits' dump writers since this
column exists; n/a for older dumps and for models without Viterbi attention): the mean over the first model's
matrices, and for the head rows of a multi-head dump the κ of that head in the dumped layer. Each matrix is divided
by its own γ: models that learn a γ per head (``--attention-gamma-mode learned|scaled``) get a γ column too
(:func:`dump_gamma`, same convention: the mean over the first model's matrices, the head's γ on head rows).

Active structures per row (SparseMAP attention only; ``structattn-stats``' column "structures/row", shown when a
dump has it): the mean number of whole segmentations in the SparseMAP solution of a row, over every attention row
the decoder computed while the dump was written (all beam hypotheses and steps, not only the dumped ones: the
weights alone cannot tell it), read from the dump's footer (``summary["structures_per_row"]``).

Dump-level numbers pool over cells (zero fraction) or over target rows (means), i.e. long sentences weigh more.

Multi-head dumps (records with ``heads``, :mod:`structattn.export`): the statistics above describe ``attention``, the
heads' average; :func:`dump_stats` with ``head=h`` computes the same statistics on head h's matrices, and
:func:`dump_head_count` says how many heads the records of a dump have.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..export import DEFAULT_EOS
from .diagonality import aggregate_alignment, matrix_alignment

__all__ = ["row_support", "row_segments", "matrix_stats", "dump_stats", "dump_head_count", "select_records",
           "record_fallback_rows", "eos_mass_rows", "dump_kappa", "dump_gamma", "dump_structures", "STAT_COLUMNS"]

# (key, column title, format) in the order tables show them
STAT_COLUMNS = [
    ("n_sentences", "sentences", "{:d}"),
    ("n_rows", "target rows", "{:d}"),
    ("zero_fraction", "exact zeros", "{:.3f}"),
    ("mean_support", "support/row", "{:.2f}"),
    ("mean_relative_support", "support/src len", "{:.3f}"),
    ("mean_segments", "segments/row", "{:.2f}"),
    ("empty_rows", "empty rows", "{:d}"),
    ("fallback_fraction", "fallback rows", "{:.3f}"),
    ("eos_mass", "EOS mass", "{:.3f}"),
    ("diagonality", "diagonality ρ", "{:.2f}"),
    ("top_fifth_share", "top-fifth share", "{:.2f}"),
]

FALLBACK_KEY = "fallback_rows"


def _as_matrix(a) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"attention must be a 2-D matrix, got shape {a.shape}")
    return a


def row_support(a) -> np.ndarray:
    """Number of exactly non-zero cells in each row."""
    return (_as_matrix(a) != 0).sum(axis=1)


def row_segments(a) -> np.ndarray:
    """Number of maximal runs of consecutive non-zero cells in each row."""
    nz = _as_matrix(a) != 0
    if nz.shape[1] == 0:
        return np.zeros(nz.shape[0], dtype=np.int64)
    starts = nz[:, 1:] & ~nz[:, :-1]
    return nz[:, 0].astype(np.int64) + starts.sum(axis=1)


def eos_mass_rows(a, src_tokens, tgt_tokens, eos: str = DEFAULT_EOS) -> np.ndarray | None:
    """The weight each target row (the final EOS row excluded) puts on the source EOS column of the full matrix
    ``a``; None when the source does not end with ``eos``."""
    a = _as_matrix(a)
    if not len(src_tokens) or src_tokens[-1] != eos or a.shape[1] == 0:
        return None
    if len(tgt_tokens) and tgt_tokens[-1] == eos:
        a = a[:-1]
    return a[:, -1]


def _trim_eos(a: np.ndarray, src_tokens, tgt_tokens, eos: str) -> np.ndarray:
    if len(tgt_tokens) and tgt_tokens[-1] == eos:
        a = a[:-1]
    if len(src_tokens) and src_tokens[-1] == eos:
        a = a[:, :-1]
    return a


def matrix_stats(a) -> dict:
    """Statistics of one matrix (see the module docstring)."""
    a = _as_matrix(a)
    T, S = a.shape
    support = row_support(a)
    segments = row_segments(a)
    cells = T * S
    return {
        "n_rows": int(T),
        "n_cols": int(S),
        "zero_fraction": float((a == 0).sum() / cells) if cells else float("nan"),
        "mean_support": float(support.mean()) if T else float("nan"),
        "mean_relative_support": float((support / S).mean()) if T and S else float("nan"),
        "mean_segments": float(segments.mean()) if T else float("nan"),
        "empty_rows": int((support == 0).sum()),
    }


def record_fallback_rows(record, n_rows: int | None = None):
    """Row indices of ``record`` that fell back to softmax (``extra["fallback_rows"]``), or None when the record
    does not say. ``n_rows`` (e.g. after trimming the EOS row) drops indices ≥ n_rows. Raises ValueError on
    indices that are not integers within the record's rows."""
    extra = getattr(record, "extra", None) or {}
    if FALLBACK_KEY not in extra:
        return None
    rows = extra[FALLBACK_KEY]
    total = np.asarray(record.attention).shape[0]
    if not isinstance(rows, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in rows):
        raise ValueError(f"record {record.id}: extra.{FALLBACK_KEY} must be a list of row indices, got {rows!r}")
    if any(i < 0 or i >= total for i in rows) or len(set(rows)) != len(rows):
        raise ValueError(f"record {record.id}: extra.{FALLBACK_KEY} {rows!r} are not distinct rows of a "
                         f"{total}-row matrix")
    limit = total if n_rows is None else n_rows
    return sorted(i for i in rows if i < limit)


def select_records(records: Iterable, nbest_rank: int | None = 0) -> list:
    """Records of one n-best rank (default: the final hypotheses, rank 0); ``None`` keeps all."""
    return [r for r in records if nbest_rank is None or r.nbest_rank == nbest_rank]


def dump_head_count(records: Iterable) -> int | None:
    """The number of heads of a multi-head dump (every record has ``heads``, all with that many), else None."""
    counts = {None if getattr(r, "heads", None) is None else r.heads.shape[0] for r in records}
    return counts.pop() if len(counts) == 1 else None


def dump_stats(records: Sequence, *, nbest_rank: int | None = 0, exclude_eos: bool = False, eos: str = DEFAULT_EOS,
               head: int | None = None) -> dict:
    """Pooled statistics over the records of a dump.

    ``exclude_eos`` drops the final EOS row and the EOS source column before counting. ``head``: the statistics of
    that head's matrices (records' ``heads[head]``) instead of ``attention``. Returns the keys of
    :data:`STAT_COLUMNS` plus ``n_records`` and ``n_cells``; means are NaN when there is no row, and
    ``fallback_fraction`` (fallback rows / rows) is NaN unless every chosen record says which of its rows fell
    back (:func:`record_fallback_rows`). ``eos_mass`` is measured on the full matrices (before ``exclude_eos``);
    ``diagonality``, ``top_fifth_share`` and ``alignment_sentences`` (:mod:`.diagonality`) always without the EOS
    row and column.
    """
    chosen = select_records(records, nbest_rank)
    if head is not None:
        missing = [r.id for r in chosen if getattr(r, "heads", None) is None or not 0 <= head < r.heads.shape[0]]
        if missing:
            raise ValueError(f"head {head}: record {missing[0]} has no such head (dump without per-head attention?)")
    n_cells = zeros = 0
    n_fallback, fallback_known = 0, bool(chosen)
    supports, rel_supports, segments, eos_masses, alignments = [], [], [], [], []
    for r in chosen:
        a = np.asarray(r.attention if head is None else r.heads[head])
        em = eos_mass_rows(a, r.src_tokens, r.tgt_tokens, eos)
        if em is not None:
            eos_masses.append(em)
        alignments.append(matrix_alignment(a, r.src_tokens, r.tgt_tokens, eos))
        if exclude_eos:
            a = _trim_eos(a, r.src_tokens, r.tgt_tokens, eos)
        fb = record_fallback_rows(r, a.shape[0])
        if fb is None:
            fallback_known = False
        else:
            n_fallback += len(fb)
        n_cells += a.size
        zeros += int((a == 0).sum())
        if a.shape[0]:
            sup = row_support(a)
            supports.append(sup)
            rel_supports.append(sup / a.shape[1] if a.shape[1] else np.full(a.shape[0], np.nan))
            segments.append(row_segments(a))
    sup = np.concatenate(supports) if supports else np.zeros(0)
    rel = np.concatenate(rel_supports) if rel_supports else np.zeros(0)
    seg = np.concatenate(segments) if segments else np.zeros(0)
    em = np.concatenate(eos_masses) if eos_masses else np.zeros(0)
    nan = float("nan")
    return {
        "n_sentences": len({r.id for r in chosen}),
        "n_records": len(chosen),
        "n_rows": int(sup.size),
        "n_cells": int(n_cells),
        "zero_fraction": zeros / n_cells if n_cells else nan,
        "mean_support": float(sup.mean()) if sup.size else nan,
        "mean_relative_support": float(rel.mean()) if rel.size else nan,
        "mean_segments": float(seg.mean()) if seg.size else nan,
        "empty_rows": int((sup == 0).sum()),
        "fallback_fraction": n_fallback / sup.size if fallback_known and sup.size else nan,
        "eos_mass": float(em.mean()) if em.size else nan,
        **aggregate_alignment(alignments),
    }


def dump_kappa(metadata: dict) -> tuple[float, list | None]:
    """(mean κ over the first model's transition matrices, [κ per head of the dumped layer] or None) from a dump's
    metadata (see the module docstring); (NaN, None) when the dump does not say."""
    couplings = (metadata or {}).get("couplings")
    if not couplings or not couplings[0]:
        return float("nan"), None
    modules = couplings[0]
    flat = [k for m in modules for k in m.get("kappa", [])]
    mean = sum(flat) / len(flat) if flat else float("nan")
    layer = metadata.get("attention_layer")
    heads = None
    if isinstance(layer, int):
        mine = [m for m in modules if f"layers.{layer}." in m.get("module", "") + "."]
        if len(mine) == 1:
            heads = list(mine[0].get("kappa", []))
    return mean, heads


def dump_structures(metadata: dict) -> float:
    """Mean active SparseMAP structures per attention row of a dump (module docstring), NaN when it does not say."""
    value = ((metadata or {}).get("summary") or {}).get("structures_per_row")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def dump_gamma(metadata: dict) -> tuple[float, list | None, bool]:
    """(mean γ over the first model's transition matrices, [γ per head of the dumped layer] or None, whether any of
    them is learned) from a dump's metadata (``couplings``' ``gammas`` and ``gamma_mode``, as :func:`dump_kappa`);
    (NaN, None, False) when the dump does not say (dumps written before per-head γ existed had a fixed γ)."""
    couplings = (metadata or {}).get("couplings")
    if not couplings or not couplings[0]:
        return float("nan"), None, False
    modules = couplings[0]
    learned = any(m.get("gamma_mode", "fixed") != "fixed" for m in modules)
    flat = [g for m in modules for g in m.get("gammas", [])]
    mean = sum(flat) / len(flat) if flat else float("nan")
    layer = metadata.get("attention_layer")
    heads = None
    if isinstance(layer, int):
        mine = [m for m in modules if f"layers.{layer}." in m.get("module", "") + "."]
        if len(mine) == 1 and "gammas" in mine[0]:
            heads = list(mine[0]["gammas"])
    return mean, heads, learned


def format_stat(value, fmt: str) -> str:
    if isinstance(value, float) and value != value:
        return "n/a"
    return fmt.format(value)
