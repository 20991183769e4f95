"""The attention variants the recipes compare: the one table of their names, labels and flags (fairseq and
OpenNMT-py spellings).

A variant is a name on the recipes' command line (``--variants "softmax viterbi-l2"``) and a run folder
(``work/runs/<name>`` for fairseq, ``work/runs/onmt-<name>`` for OpenNMT-py: :data:`RUN_PREFIX`); its label names
it in the result tables; its flags select the attention of the structattn fairseq plugin (``fairseq-train
--user-dir "$(structattn-user-dir)" ...``) or of the OpenNMT-py glue (``structattn-onmt-train ...``,
docs/onmt.md). A Viterbi variant also gets the temperature γ of its regulariser (default: the paper's,
:data:`structattn.attention.PAPER_GAMMA`) and, when the recipe sets one, an ``--attention-form``
(``-attention_form``).

The shell recipes read the table through this file's command line (``recipes/lib.sh``)::

    python -m structattn.evaluation.variants shell
        variants_all='softmax sparsemax viterbi-entropy viterbi-l2 viterbi-l2-nochain ...'   (shell assignments)
        variants_main='softmax sparsemax viterbi-entropy viterbi-l2'    (the recipes' default set)
        variants_study='... viterbi-l2-nochain viterbi-l2-paper'        (the --size study set)
        paper_gamma_entropy=2
        paper_gamma_l2=10
    python -m structattn.evaluation.variants flags viterbi-l2 --gamma-l2 5 --form stable   (several names: a line each)
        --attention viterbi --attention-reg l2 --attention-gamma 5 --attention-form stable
    python -m structattn.evaluation.variants flags viterbi-l2 --toolkit onmt --form stable
        -global_attention_function viterbi -attention_reg l2 -attention_gamma 10 -attention_form stable

``results_table.py`` imports :data:`LABELS`, :data:`TOOLKITS`, :func:`run_name` and :func:`run_label`.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import NamedTuple, Optional

from .. import __version__


class Variant(NamedTuple):
    label: str  # in the result tables and reports
    flags: str  # fairseq attention flags
    onmt: str  # the same attention in OpenNMT-py's spelling (structattn-onmt-train, docs/onmt.md)
    reg: Optional[str] = None  # Viterbi regulariser (a key of PAPER_GAMMA): adds the γ (and form) flags
    form: Optional[str] = None  # a form of its own (ablations), whatever form the recipe sets for the others
    main: bool = True  # in the recipes' default set (the ablations are asked for by name)
    temperature: Optional[float] = None  # τ of its own (ablations); else the attention's default, spelt out


#: name → variant, in the order the recipes run and tabulate them.
VARIANTS = {
    "softmax": Variant("softmax", "--attention softmax", "-global_attention_function softmax"),
    "sparsemax": Variant("sparsemax", "--attention sparsemax", "-global_attention_function sparsemax"),
    "viterbi-entropy": Variant("Viterbi −H (negentropy)", "--attention viterbi --attention-reg entropy",
                               "-global_attention_function viterbi -attention_reg entropy", "entropy"),
    "viterbi-l2": Variant("Viterbi ℓ2²", "--attention viterbi --attention-reg l2",
                          "-global_attention_function viterbi -attention_reg l2", "l2"),
    # softmax on the raw bilinear scores (τ = 1), as published and as every softmax row was trained before the
    # default became τ = 10 (docs/sparse_init.md): the study keeps it beside the default
    "softmax-t1": Variant("softmax, τ = 1", "--attention softmax", "-global_attention_function softmax",
                          main=False, temperature=1.0),
    # Ablations of the multi-seed study (recipes/bible_fr_en/STUDY.md): what the chain buys (the same unary scores,
    # κ held at 0: independent positions), and the paper's exact parametrisation beside the default form.
    "viterbi-l2-nochain": Variant("Viterbi ℓ2², chain off", "--attention viterbi --attention-reg l2 "
                                  "--attention-chain off", "-global_attention_function viterbi -attention_reg "
                                  "l2 -attention_chain off", "l2", main=False),
    "viterbi-entropy-nochain": Variant("Viterbi −H, chain off", "--attention viterbi --attention-reg entropy "
                                       "--attention-chain off", "-global_attention_function viterbi "
                                       "-attention_reg entropy -attention_chain off", "entropy", main=False),
    "viterbi-l2-paper": Variant("Viterbi ℓ2², paper form", "--attention viterbi --attention-reg l2",
                                "-global_attention_function viterbi -attention_reg l2", "l2", "paper", main=False),
    "viterbi-l2-stable": Variant("Viterbi ℓ2², stable form", "--attention viterbi --attention-reg l2",
                                 "-global_attention_function viterbi -attention_reg l2", "l2", "stable", main=False),
    # The structured and sparse attentions beside the paper's (docs/choosing_attention.md), at their default λ / γ;
    # asked for by name, so that the quickstart and study presets stay as they are.
    "fusedmax": Variant("fusedmax", "--attention fusedmax", "-global_attention_function fusedmax", main=False),
    "oscarmax": Variant("oscarmax", "--attention oscarmax", "-global_attention_function oscarmax", main=False),
    "entmax15": Variant("1.5-entmax", "--attention entmax15", "-global_attention_function entmax15", main=False),
    "sparsemap": Variant("SparseMAP", "--attention sparsemap", "-global_attention_function sparsemap", main=False),
}

LABELS = {name: v.label for name, v in VARIANTS.items()}
MAIN_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.main)
#: the multi-seed study's variants (recipes/bible_fr_en/STUDY.md; the recipes' --size study): the main ones, what
#: the chain buys (ℓ2 with the chain off) and the other form of ℓ2 (the paper's, beside the default stable form)
STUDY_VARIANTS = MAIN_VARIANTS + ("softmax-t1", "viterbi-l2-nochain", "viterbi-l2-paper")
REGULARISERS = tuple(dict.fromkeys(v.reg for v in VARIANTS.values() if v.reg))

#: toolkit (the recipes' --toolkit) → its name in the result tables
TOOLKITS = {"fairseq": "fairseq", "onmt": "OpenNMT-py"}
#: toolkit → prefix of its run folders (work/runs/<prefix><variant>), so that both can share one work folder
RUN_PREFIX = {"fairseq": "", "onmt": "onmt-"}
#: toolkit → its spelling of the Viterbi variants' γ and form options
_GAMMA_FORM = {"fairseq": ("--attention-gamma", "--attention-form"), "onmt": ("-attention_gamma", "-attention_form")}
#: toolkit → its spelling of τ, the temperature of the bilinear attentions (softmax, sparsemax, fusedmax, ...)
_TEMPERATURE = {"fairseq": "--attention-temperature", "onmt": "-attention_temperature"}


def run_name(variant: str, toolkit: str = "fairseq") -> str:
    """The run folder (under work/runs) of ``variant`` trained with ``toolkit``."""
    return RUN_PREFIX[toolkit] + variant


def split_run(run: str) -> tuple[str, str]:
    """A run folder name → (variant, toolkit); names that are no run of a known variant are fairseq's."""
    for toolkit, prefix in RUN_PREFIX.items():
        if prefix and run.startswith(prefix) and run[len(prefix):] in VARIANTS:
            return run[len(prefix):], toolkit
    return run, "fairseq"


def run_label(run: str) -> str:
    """The label of a run folder name in tables: the variant's label, and the toolkit unless it is fairseq."""
    variant, toolkit = split_run(run)
    label = LABELS.get(variant, variant)
    return label if toolkit == "fairseq" else f"{label} ({TOOLKITS[toolkit]})"


def paper_gamma() -> dict:
    """The paper's γ per regulariser (imported on demand: structattn brings torch)."""
    from structattn.attention import PAPER_GAMMA

    return dict(PAPER_GAMMA)


def _kind(v: Variant) -> str:
    return v.flags.split()[1]  # "--attention KIND ..."


def attention_flags(name: str, gamma: dict, form: str | None = None, toolkit: str = "fairseq",
                    temperature: bool = True) -> str:
    """The attention flags of variant ``name`` for ``toolkit``; ``gamma`` maps each regulariser to its γ as written on
    the command line (a string: the recipes' commands, hence their stamps, keep the user's spelling). The bilinear
    attentions' τ is spelt out (the variant's own, else :data:`structattn.options.DEFAULT_TEMPERATURE`), so that a
    change of the default changes the training command, hence its stamp, and a finished run of the old default is not
    taken for one of the new; ``temperature=False`` leaves it out (the Transformer, whose scores have no τ)."""
    v = VARIANTS[name]
    flags = v.flags if toolkit == "fairseq" else v.onmt
    if not v.reg:
        from structattn.options import DEFAULT_TEMPERATURE  # on demand: structattn brings torch

        if temperature and _kind(v) in DEFAULT_TEMPERATURE:
            tau = DEFAULT_TEMPERATURE[_kind(v)] if v.temperature is None else v.temperature
            flags += f" {_TEMPERATURE[toolkit]} {_number(tau)}"
        return flags
    gamma_flag, form_flag = _GAMMA_FORM[toolkit]
    form = v.form or form
    return f"{flags} {gamma_flag} {gamma[v.reg]}" + (f" {form_flag} {form}" if form else "")


def fairseq_flags(name: str, gamma: dict, form: str | None = None) -> str:
    """The fairseq attention flags of variant ``name`` (:func:`attention_flags`)."""
    return attention_flags(name, gamma, form, "fairseq")


def onmt_flags(name: str, gamma: dict, form: str | None = None) -> str:
    """The ``structattn-onmt-train`` attention flags of variant ``name`` (:func:`attention_flags`)."""
    return attention_flags(name, gamma, form, "onmt")


def _number(x: float) -> str:
    return format(x, "g")  # 2.0 → "2", as the recipes have always written it


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m structattn.evaluation.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"structattn {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("shell", help="the variant names and the paper's γ as shell assignments")
    f = sub.add_parser("flags", help="the attention flags of the variants, one line each, in the order given (one "
                       "call for all: each call costs a Python start with torch)")
    f.add_argument("variant", nargs="+", choices=list(VARIANTS))
    f.add_argument("--toolkit", choices=list(TOOLKITS), default="fairseq",
                   help="fairseq (fairseq-train --user-dir ...) or onmt (structattn-onmt-train); default fairseq")
    for reg in REGULARISERS:
        f.add_argument(f"--gamma-{reg}", metavar="G", help="γ of this regulariser (default: the paper's)")
    f.add_argument("--form", help="--attention-form of the Viterbi variants (default: none, the plugin's)")
    f.add_argument("--arch", default="structattn_lstm",
                   help="the fairseq architecture: a structattn_transformer* gets no τ flag (its scaled dot products "
                        "have none); default structattn_lstm")
    args = p.parse_args(argv)
    if args.cmd == "shell":
        print(f"variants_all={shlex.quote(' '.join(VARIANTS))}")
        print(f"variants_main={shlex.quote(' '.join(MAIN_VARIANTS))}")
        print(f"variants_study={shlex.quote(' '.join(STUDY_VARIANTS))}")
        for reg, g in paper_gamma().items():
            print(f"paper_gamma_{reg}={shlex.quote(_number(g))}")
        return 0
    gamma = {reg: getattr(args, f"gamma_{reg}") for reg in REGULARISERS}
    for reg in REGULARISERS:
        if gamma[reg] is None:
            gamma[reg] = _number(paper_gamma()[reg])
    for name in args.variant:
        print(attention_flags(name, gamma, args.form, args.toolkit,
                              temperature=not (args.toolkit == "fairseq" and args.arch.startswith("structattn_transformer"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
