"""The attention variants the recipes compare: the one table of their names, labels and fairseq flags.

A variant is a name on the recipes' command line (``--variants "softmax viterbi-l2"``) and a run folder
(``work/runs/<name>``); its label names it in the result tables; its flags select the attention of the structattn
fairseq plugin (``fairseq-train --user-dir user_dir ...``). A Viterbi variant also gets the temperature γ of its
regulariser (default: the paper's, :data:`structattn.attention.PAPER_GAMMA`) and, when the recipe sets one, an
``--attention-form``.

The shell recipes read the table through this file's command line (``recipes/lib.sh``)::

    python recipes/tools/variants.py shell
        variants_all='softmax sparsemax viterbi-entropy viterbi-l2'   (shell assignments, for eval)
        paper_gamma_entropy=2
        paper_gamma_l2=10
    python recipes/tools/variants.py flags viterbi-l2 --gamma-l2 5 --form stable
        --attention viterbi --attention-reg l2 --attention-gamma 5 --attention-form stable

``results_table.py`` imports :data:`LABELS`.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import NamedTuple, Optional


class Variant(NamedTuple):
    label: str  # in the result tables and reports
    flags: str  # fairseq attention flags
    reg: Optional[str] = None  # Viterbi regulariser (a key of PAPER_GAMMA): adds --attention-gamma (and -form)


#: name → variant, in the order the recipes run and tabulate them.
VARIANTS = {
    "softmax": Variant("softmax", "--attention softmax"),
    "sparsemax": Variant("sparsemax", "--attention sparsemax"),
    "viterbi-entropy": Variant("Viterbi −H (negentropy)", "--attention viterbi --attention-reg entropy", "entropy"),
    "viterbi-l2": Variant("Viterbi ℓ2²", "--attention viterbi --attention-reg l2", "l2"),
}

LABELS = {name: v.label for name, v in VARIANTS.items()}
REGULARISERS = tuple(v.reg for v in VARIANTS.values() if v.reg)


def paper_gamma() -> dict:
    """The paper's γ per regulariser (imported on demand: structattn brings torch)."""
    from structattn.attention import PAPER_GAMMA

    return dict(PAPER_GAMMA)


def fairseq_flags(name: str, gamma: dict, form: str | None = None) -> str:
    """The attention flags of variant ``name``; ``gamma`` maps each regulariser to its γ as written on the command
    line (a string: the recipes' commands, hence their stamps, keep the user's spelling)."""
    v = VARIANTS[name]
    if not v.reg:
        return v.flags
    return f"{v.flags} --attention-gamma {gamma[v.reg]}" + (f" --attention-form {form}" if form else "")


def _number(x: float) -> str:
    return format(x, "g")  # 2.0 → "2", as the recipes have always written it


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("shell", help="the variant names and the paper's γ as shell assignments")
    f = sub.add_parser("flags", help="the fairseq attention flags of one variant")
    f.add_argument("variant", choices=list(VARIANTS))
    for reg in REGULARISERS:
        f.add_argument(f"--gamma-{reg}", metavar="G", help="γ of this regulariser (default: the paper's)")
    f.add_argument("--form", help="--attention-form of the Viterbi variants (default: none, the plugin's)")
    args = p.parse_args(argv)
    if args.cmd == "shell":
        print(f"variants_all={shlex.quote(' '.join(VARIANTS))}")
        for reg, g in paper_gamma().items():
            print(f"paper_gamma_{reg}={shlex.quote(_number(g))}")
        return 0
    gamma = {reg: getattr(args, f"gamma_{reg}") for reg in REGULARISERS}
    reg = VARIANTS[args.variant].reg
    if reg and gamma[reg] is None:
        gamma[reg] = _number(paper_gamma()[reg])
    print(fairseq_flags(args.variant, gamma, args.form))
    return 0


if __name__ == "__main__":
    sys.exit(main())
