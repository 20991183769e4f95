"""The real-sentence picture of docs/choosing_attention.md: what trained models attend to on one test sentence.

    python docs/scripts/sentence_maps.py --sentence 196 --out docs/img/sentence_maps.png \\
        softmax=runs/softmax/attention.jsonl "Viterbi ℓ2=runs/viterbi-l2/attention.jsonl" ...

Each ``LABEL=DUMP`` is an attention dump written by ``fairseq-generate --dump-attention`` (the recipes write one per
model: ``<work>/runs/<variant>/attention.jsonl``). For each dump the best hypothesis (n-best rank 0) of sentence
``--sentence`` is drawn with its own target words (each model translates the sentence its own way, so the rows
differ), the source words as columns, exact zeros in white with non-zero cells outlined (structattn.report.plot).
A table of the same statistics as ``structattn-stats`` (exact zeros, support and segments per row) for that
sentence is printed beside, in Markdown.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from structattn.export import read_dump
from structattn.report.plot import draw_attention, save_figure
from structattn.report.stats import matrix_stats


def _record(path: str, sentence: int):
    _, records = read_dump(path)
    for r in records:
        if r.id == sentence and r.nbest_rank == 0:
            return r
    raise SystemExit(f"error: sentence {sentence} is not in {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dumps", nargs="+", metavar="LABEL=DUMP")
    p.add_argument("--sentence", type=int, required=True, help="the sentence id in the dumps")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "img" / "sentence_maps.png"))
    p.add_argument("--ncols", type=int, default=3)
    args = p.parse_args(argv)
    panels = []
    for item in args.dumps:
        label, sep, path = item.rpartition("=")  # labels may hold "=" (τ = 1), paths do not
        if not sep or not label or not path:
            raise SystemExit(f"error: expected LABEL=DUMP, got {item!r}")
        panels.append((label, _record(path, args.sentence)))
    sources = {" ".join(r.src_tokens) for _, r in panels}
    if len(sources) != 1:
        raise SystemExit("error: the dumps disagree on the source sentence (different test sets?)")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(args.ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    S = len(panels[0][1].src_tokens)
    T = max(len(r.tgt_tokens) for _, r in panels)
    fig = Figure(figsize=(ncols * (0.28 * S + 1.4), nrows * (0.28 * T + 1.6)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    print("| model | target words | exact zeros | support / row | segments / row |")
    print("|---|---|---|---|---|")
    for k, ax in enumerate(axes.ravel()):
        if k >= len(panels):
            ax.set_axis_off()
            continue
        label, r = panels[k]
        w = np.asarray(r.attention, dtype=float)
        draw_attention(ax, w, r.src_tokens, r.tgt_tokens, fontsize=7)
        ax.set_title(label, fontsize=9)
        st = matrix_stats(w)
        print(f"| {label} | {len(r.tgt_tokens)} | {st['zero_fraction']:.2f} | {st['mean_support']:.2f} | "
              f"{st['mean_segments']:.2f} |")
    fig.suptitle(f"test sentence {args.sentence}: {' '.join(panels[0][1].src_tokens)}", fontsize=10)
    save_figure(fig, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
