"""The picture of docs/choosing_attention.md: every attention of structattn on the same score matrix.

    python docs/scripts/attention_gallery.py            # writes docs/img/attention_gallery.png, prints a table

The scores are **synthetic** (no model is trained): a fixed 9 × 9 pattern z for the sentence pair "le chat noir dort
sur le tapis rouge </s>" → "the black cat sleeps on the red rug </s>", z[i, j] = 1 on the aligned source word of
target word i, ½ on its two neighbours, plus N(0, (1/6)²) noise (seed 0). The attentions work at different
temperatures (the plain ones at 1, the Viterbi attention at its γ = 2 or 10, SparseMAP at γ = 10), so each gets the
same pattern at three times its own temperature, s = 3·γ·z (γ = 1 for the plain ones): a model learns the scale of
its scores; the pattern is what is compared. Each attention normalises the rows with the library's per-head
normaliser at its defaults (structattn.options: λ, γ, the stable form's centring and contiguity prior τ = I for the
Viterbi and SparseMAP attentions, untrained), exactly as a Transformer head with these scores would. The table gives, per attention, the exact zeros, the support and the segments per row
(structattn.report.stats) and, for SparseMAP, the active structures per row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from structattn.options import ATTENTIONS, build_normalizer, resolve_options
from structattn.report.plot import heads_figure, save_figure
from structattn.report.stats import matrix_stats

SRC = "le chat noir dort sur le tapis rouge </s>".split()
TGT = "the black cat sleeps on the red rug </s>".split()
ALIGN = [0, 2, 1, 3, 4, 5, 7, 6, 8]  # target word i ↔ source word ALIGN[i]
#: s = SCALE·γ·z (see the module docstring)
SCALE = 3.0

#: (title, --attention, extra resolve_options arguments) in the order of the picture; γ is the resolved option
PANELS = [
    ("softmax", "softmax", {}),
    ("sparsemax", "sparsemax", {}),
    ("1.5-entmax", "entmax15", {}),
    ("fusedmax (λ = 0.1)", "fusedmax", {}),
    ("oscarmax (λ = 0.01)", "oscarmax", {}),
    ("Viterbi −H (γ = 2)", "viterbi", {"reg": "entropy"}),
    ("Viterbi ℓ2 (γ = 10)", "viterbi", {"reg": "l2"}),
    ("SparseMAP (γ = 10)", "sparsemap", {}),
]


def pattern() -> torch.Tensor:
    """z (T, S): the synthetic alignment pattern (module docstring)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(len(TGT), len(SRC), generator=g, dtype=torch.float64) / 6
    for i, j in enumerate(ALIGN):
        z[i, j] += 1.0
        for k in (j - 1, j + 1):
            if 0 <= k < len(SRC):
                z[i, k] += 0.5
    return z


def maps() -> list:
    """[(title, weights (T, S) numpy, structures per row or None)] for every panel."""
    assert {a for _, a, _ in PANELS} == set(ATTENTIONS)  # every attention of the option table is drawn
    z = pattern()[None, None]  # (B = 1, H = 1, T, S)
    out = []
    for title, attention, kw in PANELS:
        options = resolve_options(attention, **kw)
        norm = build_normalizer(options, 1).double()
        gamma = options.gamma if attention in ("viterbi", "sparsemap") else 1.0
        with torch.no_grad():
            w = norm(SCALE * gamma * z)[0, 0]
        structures = None
        if hasattr(norm, "pop_structure_counts"):
            rows, total, _ = norm.pop_structure_counts()
            structures = total / rows
        out.append((title, w.numpy(), structures))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "img" / "attention_gallery.png"))
    args = p.parse_args(argv)
    panels = maps()
    import numpy as np

    fig = heads_figure(np.stack([w for _, w, _ in panels]), SRC, TGT, titles=[t for t, _, _ in panels], ncols=4,
                       title="synthetic scores s = 3·γ·z: the same 9 × 9 pattern z for every attention, at 3× its temperature γ")
    save_figure(fig, args.out)
    print("| attention | exact zeros | support / row | segments / row | structures / row |")
    print("|---|---|---|---|---|")
    for title, w, structures in panels:
        st = matrix_stats(w)
        print(f"| {title} | {st['zero_fraction']:.2f} | {st['mean_support']:.2f} | {st['mean_segments']:.2f} | "
              f"{'' if structures is None else format(structures, '.2f')} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
