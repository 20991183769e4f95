"""Static HTML report: the same sentences under several models, side by side, with sparsity statistics.

``build_report`` writes ``index.html`` and ``img/`` into a directory; images are referenced relatively, so the
folder can be moved, zipped or served as it is. The page carries a tiny script that counts the images that
loaded and shows a warning banner when some did not (it also records the counts on ``<body>`` as
``data-images-loaded`` / ``data-images-total``, which the tests read back from a headless browser).
"""

from __future__ import annotations

import datetime
import html
import os
from typing import Sequence

from ..export import eos_symbol
from ..fileio import atomic_write
from .stats import STAT_COLUMNS, dump_head_count, dump_stats, format_stat, matrix_stats, row_segments

__all__ = ["ModelDump", "build_report", "common_ids"]


class ModelDump:
    """A labelled dump: ``label``, ``metadata`` and ``records`` as returned by ``read_dump``."""

    def __init__(self, label: str, metadata: dict, records: list, path: str | None = None):
        self.label = label
        self.metadata = metadata
        self.records = records
        self.path = path
        self.by_key = {(r.id, r.nbest_rank): r for r in records}

    def describe(self) -> str:
        m = self.metadata
        parts = [str(m.get("arch") or "?")]
        args = (m.get("model_args") or [{}])[0] if m.get("model_args") else {}
        if m.get("attention"):
            parts.append(f"attention={m['attention']}")
        if m.get("attention") == "viterbi" and args.get("attention_reg"):
            parts.append(f"reg={args['attention_reg']}")
        if m.get("attention") in ("viterbi", "sparsemap") and args.get("attention_gamma") is not None:
            parts.append(f"γ={args['attention_gamma']}")
        if m.get("attention") in ("fusedmax", "oscarmax") and args.get("attention_lambda") is not None:
            parts.append(f"λ={args['attention_lambda']}")
        if m.get("attention_layer") is not None:  # multi-head models: which layer, heads averaged or all
            parts.append(f"layer {m['attention_layer']}, {m.get('num_heads')} heads ({m.get('attention_heads')})")
        gen = m.get("generation") or {}
        if gen.get("beam"):
            parts.append(f"beam={gen['beam']}")
        return ", ".join(parts)


def common_ids(models: Sequence[ModelDump], nbest_rank: int = 0) -> list:
    """Sentence ids that every model has a record of rank ``nbest_rank`` for, ascending."""
    sets = [{i for (i, k) in m.by_key if k == nbest_rank} for m in models]
    return sorted(set.intersection(*sets)) if sets else []


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; border-top: 1px solid #ccc; padding-top: .8em; }
table.stats { border-collapse: collapse; font-size: .9em; }
table.stats th, table.stats td { border: 1px solid #bbb; padding: .25em .6em; text-align: right; }
table.stats th:first-child, table.stats td:first-child, table.stats .l { text-align: left; }
.row { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
figure { margin: 0; border: 1px solid #ddd; padding: .5em; background: #fff; }
figcaption { font-size: .85em; max-width: 40em; }
figure img { display: block; max-width: 100%; }
.label { font-weight: bold; }
.text { font-family: ui-monospace, monospace; font-size: .85em; white-space: pre-wrap; }
.note { color: #555; font-size: .85em; }
#img-warning { background: #fdd; border: 1px solid #c00; padding: .5em; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok));
  if (ok < imgs.length) {
    var w = document.getElementById('img-warning');
    w.textContent = (imgs.length - ok) + ' of ' + imgs.length +
      ' images did not load: keep index.html and the img/ folder together.';
    w.hidden = false;
  }
});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def build_report(
    models: Sequence[ModelDump],
    outdir: str | os.PathLike,
    *,
    ids: Sequence[int] | None = None,
    max_sentences: int | None = 10,
    nbest_rank: int = 0,
    fmt: str = "png",
    title: str | None = None,
    exclude_eos: bool = False,
    dpi: float = 100,
    progress=None,
    **plot_kwargs,
) -> str:
    """Write ``outdir/index.html`` and ``outdir/img/*``; returns the path of ``index.html``.

    ``ids``: sentence ids to show (each must exist in every dump); by default the first ``max_sentences``
    ids common to all dumps. ``outdir`` must exist and should be empty (the CLI builds into a fresh staging
    directory and renames it). ``progress``: optional ``wrap(iterable, total=None, desc="")`` returning the
    iterable (the CLI's progress display), applied to the per-model statistics and the sentences drawn.
    """
    if progress is None:
        progress = lambda iterable, total=None, desc="": iterable  # noqa: E731
    shown = _sentences_to_show(models, ids, max_sentences, nbest_rank, fmt)
    outdir = os.fspath(outdir)
    imgdir = os.path.join(outdir, "img")
    os.makedirs(imgdir, exist_ok=True)

    eos_of = {m.label: eos_symbol(m.metadata) for m in models}
    stats = [dump_stats(m.records, nbest_rank=nbest_rank, exclude_eos=exclude_eos, eos=eos_of[m.label])
             for m in progress(models, desc="statistics")]
    shown_stats = [
        dump_stats([m.by_key[(i, nbest_rank)] for i in shown], nbest_rank=nbest_rank, exclude_eos=exclude_eos,
                   eos=eos_of[m.label])
        for m in models
    ]
    head_stats = [  # per head, over all sentences (dumps written with every head)
        [dump_stats(m.records, nbest_rank=nbest_rank, exclude_eos=exclude_eos, eos=eos_of[m.label], head=h)
         for h in range(dump_head_count(m.records) or 0)]
        for m in models
    ]
    page_title = title or "Attention maps: " + " vs ".join(m.label for m in models)
    parts = [_page_head(page_title, exclude_eos, nbest_rank), _stats_table(models, stats, shown_stats, head_stats),
             *_contract_warnings(models)]
    if not shown:
        parts.append("<p>No sentence is present in every dump.</p>")
    parts += [_sentence_section(sid, models, nbest_rank, imgdir, fmt, dpi, plot_kwargs)
              for sid in progress(shown, desc="sentences")]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    parts.append(f"<p class='note'>Generated by structattn-report at {_e(stamp)}.</p>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    index = os.path.join(outdir, "index.html")
    with atomic_write(index) as fh:
        fh.write("\n".join(parts))
    return index


def _sentences_to_show(models, ids, max_sentences, nbest_rank, fmt) -> list[int]:
    """Check the arguments of :func:`build_report`; the sentence ids to show."""
    if not models:
        raise ValueError("build_report needs at least one dump")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be distinct, got {labels}")
    if fmt not in ("png", "svg"):
        raise ValueError(f"image format must be png or svg, got {fmt!r}")
    if ids is None:
        common = common_ids(models, nbest_rank)
        return common[: max_sentences] if max_sentences is not None else common
    shown = list(ids)
    for m in models:
        missing = [i for i in shown if (i, nbest_rank) not in m.by_key]
        if missing:
            raise ValueError(f"dump {m.label!r} has no sentence with id {missing[0]} (n-best rank {nbest_rank})")
    return shown


def _page_head(page_title: str, exclude_eos: bool, nbest_rank: int) -> str:
    return "\n".join([
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(page_title)}</title><style>{_CSS}</style></head><body>",
        "<div id='img-warning' hidden></div>",
        f"<h1>{_e(page_title)}</h1>",
        "<p class='note'>Rows: target (hypothesis) tokens; columns: source tokens; both end with EOS. "
        "White cells are exact zeros; every non-zero cell is outlined; colours use a fixed 0–1 scale "
        "unless stated otherwise. Statistics count exact zeros"
        + (" and exclude the EOS row and column" if exclude_eos else " (EOS row and column included)")
        + f"; n-best rank {nbest_rank}.</p>",
    ])


def _stats_table(models, stats, shown_stats, head_stats=None) -> str:
    """The sparsity table: one row per model, for all sentences and for the shown ones; then, for dumps with every
    head, one row per head (all sentences)."""
    out = ["<table class='stats'><tr><th>model</th><th class='l'>setting</th><th class='l'>dump</th>"]
    out += [f"<th>{_e(name)}</th>" for _, name, _ in STAT_COLUMNS]
    out.append("</tr>")
    for which, stat_list in (("all sentences", stats), ("shown sentences", shown_stats)):
        out.append(f"<tr><td colspan='{3 + len(STAT_COLUMNS)}'><i>{_e(which)}</i></td></tr>")
        for m, st in zip(models, stat_list):
            out.append(f"<tr><td class='label'>{_e(m.label)}</td><td class='l'>{_e(m.describe())}</td>"
                       f"<td class='l'>{_e(os.path.basename(m.path) if m.path else '')}</td>")
            out += [f"<td>{_e(format_stat(st[key], f))}</td>" for key, _, f in STAT_COLUMNS]
            out.append("</tr>")
    if any(head_stats or ()):
        out.append(f"<tr><td colspan='{3 + len(STAT_COLUMNS)}'><i>each head, all sentences (the rows above "
                   "describe the heads' average)</i></td></tr>")
        for m, heads in zip(models, head_stats):
            for h, st in enumerate(heads):
                out.append(f"<tr><td class='label'>{_e(m.label)}/h{h}</td><td class='l'>head {h}</td><td></td>")
                out += [f"<td>{_e(format_stat(st[key], f))}</td>" for key, _, f in STAT_COLUMNS]
                out.append("</tr>")
    out.append("</table>")
    return "\n".join(out)


def _contract_warnings(models) -> list[str]:
    """A warning for each dump whose attention lands on padding columns (columns not indexed like src_tokens)."""
    out = []
    for m in models:
        summary = m.metadata.get("summary") or {}
        if summary.get("contract_ok") is False:
            out.append(f"<p class='contract' style='color:#a00'>Warning: dump {_e(m.label)} has attention on padding "
                       f"columns (max mass {_e(summary.get('max_pad_mass'))}); its columns are not reliable "
                       "(the model does not index attention like src_tokens, e.g. fairseq's lstm, issue #3625).</p>")
    return out


def _heads_figure(rec, label, name, imgdir, dpi, plot_kwargs) -> str:
    """The grid of a record's per-head maps (written to ``imgdir``) with each head's sparsity in the caption."""
    from .plot import heads_figure, save_figure

    fig = heads_figure(rec.heads, rec.src_tokens, rec.tgt_tokens, title=f"{label}: every head", dpi=dpi,
                       **plot_kwargs)
    save_figure(fig, os.path.join(imgdir, name))
    per_head = " · ".join(
        f"h{h} zeros {st['zero_fraction']:.2f}, segments/row {st['mean_segments']:.2f}"
        for h, st in enumerate(matrix_stats(a) for a in rec.heads))
    return (f"<figure><img src='img/{_e(name)}' alt='attention of each head of {_e(label)} for sentence "
            f"{rec.id}'><figcaption><span class='label'>{_e(label)}</span>, each head: {_e(per_head)}"
            "</figcaption></figure>")


def _sentence_section(sid, models, nbest_rank, imgdir, fmt, dpi, plot_kwargs) -> str:
    """Source, reference and one heatmap per model (written to ``imgdir``) for sentence ``sid``; for a dump with
    every head, also the grid of its heads' maps."""
    from .plot import attention_figure, save_figure

    first = models[0].by_key[(sid, nbest_rank)]
    out = [f"<h2 id='s{sid}'>Sentence {sid}</h2>",
           f"<p><span class='label'>source</span> <span class='text'>{_e(first.src_text)}</span>"]
    ref = first.extra.get("ref_text")
    if ref is not None:
        out.append(f"<br><span class='label'>reference</span> <span class='text'>{_e(ref)}</span>")
    out.append("</p><div class='row'>")
    for k, m in enumerate(models):
        rec = m.by_key[(sid, nbest_rank)]
        name = f"s{sid}_m{k}.{fmt}"
        fig = attention_figure(rec.attention, rec.src_tokens, rec.tgt_tokens, title=m.label, dpi=dpi, **plot_kwargs)
        save_figure(fig, os.path.join(imgdir, name))
        st = matrix_stats(rec.attention)
        segs = row_segments(rec.attention)
        out += [
            "<figure>",
            f"<img src='img/{_e(name)}' alt='attention of {_e(m.label)} for sentence {sid}'>",
            f"<figcaption><span class='label'>{_e(m.label)}</span> "
            f"<span class='text'>{_e(rec.hyp_text)}</span><br>"
            f"score {rec.score:.3f} · exact zeros {st['zero_fraction']:.2f} · support/row "
            f"{st['mean_support']:.2f} · segments/row {st['mean_segments']:.2f} "
            f"(max {int(segs.max()) if segs.size else 0})</figcaption></figure>",
        ]
        if rec.heads is not None:
            out.append(_heads_figure(rec, m.label, f"s{sid}_m{k}_heads.{fmt}", imgdir, dpi, plot_kwargs))
    out.append("</div>")
    return "\n".join(out)
