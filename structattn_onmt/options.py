"""The attention options of ``structattn-onmt-train``: names, defaults, help and the checks run before training.

OpenNMT-py spells options with underscores (``-attention_reg l2`` on the command line, ``attention_reg: l2`` in
a YAML config). The values, defaults and checks are the fairseq plugin's (:mod:`structattn.options`):

=============================  ==============================  ===========================================
option                         values                          default
=============================  ==============================  ===========================================
``global_attention_function``  ``softmax``, ``sparsemax``,     ``softmax`` (OpenNMT's own default)
                               ``viterbi``, ``fusedmax``,
                               ``oscarmax``, ``entmax15``,
                               ``sparsemap``
``attention_reg``              ``entropy``, ``l2``             ``entropy``
``attention_gamma``            a finite number > 0             the paper's γ: 2 for entropy, 10 for l2;
                                                               10 for sparsemap
``attention_form``             ``stable``, ``paper``           ``stable``
``attention_contiguity``       a finite number                 1.0
``attention_chain``            ``on``, ``off``                 ``on`` (``off``: the chain-off ablation)
``attention_lambda``           a finite number ≥ 0             per attention: 0.1 for fusedmax, 0.01 for
                                                               oscarmax
``attention_temperature``      a finite number > 0             per attention: 10 for sparsemax, 1 for
                                                               softmax, fusedmax, oscarmax, entmax15
=============================  ==============================  ===========================================

``attention_reg``, ``attention_gamma``, ``attention_form``, ``attention_contiguity`` and ``attention_chain``
are used by the Viterbi attention (all but ``attention_reg`` also by SparseMAP, whose transitions are parametrised
as the Viterbi attention's), ``attention_lambda`` by fusedmax and oscarmax only (ignored otherwise, as
in the fairseq plugin), ``attention_temperature`` τ by the attentions without a chain on the bilinear ``general``
score only (refused with the Viterbi and SparseMAP attentions, whose temperature is γ, and with ``dot``/``mlp``,
whose scores are OpenNMT's and are normalised as they are). The Viterbi and SparseMAP attentions need ``-global_attention general`` (their chain scores
the bilinear s_t = h_t·M q); the others also work with ``dot`` and ``mlp``. This module defines the options and reads option
namespaces; putting the options on OpenNMT's parser (and ``viterbi`` among ``-global_attention_function``'s
choices) is a change to OpenNMT and lives in ``patches.py`` (:func:`structattn_onmt.patches.add_train_options`).
"""

from __future__ import annotations

from structattn.options import (ATTENTIONS, DEFAULT_CONTIGUITY, DEFAULT_FORM, DEFAULT_LAMBDA, DEFAULT_REG,
                                DEFAULT_TEMPERATURE,
                                DEFAULT_CHAIN, PAPER_GAMMA, REGULARIZERS, CHAIN_MODES, VITERBI_FORMS,
                                AttentionOptions, nonnegative_float, resolve_options)

__all__ = ["OPTION_NAMES", "MARKER", "add_attention_options", "options_from_opt", "check_train_opt", "flag"]

#: the options this package adds to onmt_train's (``global_attention_function`` exists there already)
OPTION_NAMES = ("attention_reg", "attention_gamma", "attention_form", "attention_contiguity", "attention_chain",
                "attention_lambda", "attention_temperature")

#: the attentions whose chain scores the bilinear "general" score (their transitions live in the library module)
CHAIN_ATTENTIONS = ("viterbi", "sparsemap")

#: an option every model trained by ``structattn-onmt-train`` has in its checkpoint's ``opt``; models without it
#: (trained by plain ``onmt_train``) keep OpenNMT's own attention layer when translated
MARKER = "attention_form"


def flag(name: str) -> str:
    """OpenNMT's spelling of an option in messages (``attention`` is ``-global_attention_function``)."""
    return "-global_attention_function" if name == "attention" else f"-{name}"


def add_attention_options(group, positive_float, finite_float) -> None:
    """Add the five Viterbi options, λ and τ to an OpenNMT option group (``group.add`` of configargparse)."""
    gammas = ", ".join(f"{g:g} for {reg}" for reg, g in PAPER_GAMMA.items())
    group.add("--attention_reg", "-attention_reg", type=str, default=DEFAULT_REG, choices=list(REGULARIZERS),
              help="structattn: regulariser of the smoothed max in the Viterbi attention: entropy (dense, CRF "
                   "marginals) or l2 (sparse); only used with -global_attention_function viterbi")
    group.add("--attention_gamma", "-attention_gamma", type=positive_float, default=None, metavar="FLOAT",
              help="structattn: temperature gamma > 0 of the Viterbi attention (smaller is sparser; l2 turns into "
                   f"hard, non-differentiable Viterbi when gamma is too small); default: the paper's {gammas}; "
                   "10 for sparsemap; only used with -global_attention_function viterbi/sparsemap")
    group.add("--attention_form", "-attention_form", type=str, default=DEFAULT_FORM, choices=list(VITERBI_FORMS),
              help="structattn: parametrisation of the Viterbi and SparseMAP attentions: stable (scores centred per row, "
                   "transitions T = gamma * tau with a contiguity prior) or paper (raw scores, T learned from 0, "
                   "exactly as in the paper)")
    group.add("--attention_contiguity", "-attention_contiguity", type=finite_float, default=DEFAULT_CONTIGUITY,
              metavar="FLOAT",
              help="structattn: stable form only: initial T/gamma = [[c, 0], [0, c]] (staying in a state is worth "
                   "c*gamma)")
    group.add("--attention_chain", "-attention_chain", type=str, default=DEFAULT_CHAIN,
              choices=list(CHAIN_MODES),
              help="structattn: on (the Viterbi attention's chain) or off (the chain-off ablation: the "
                   "coupling kappa of neighbouring positions held at 0, independent gates on the same scores)")
    lambdas = ", ".join(f"{lam:g} for {name}" for name, lam in DEFAULT_LAMBDA.items())
    group.add("--attention_lambda", "-attention_lambda", type=nonnegative_float, default=None, metavar="FLOAT",
              help="structattn: weight lambda >= 0 of the structured penalty of fusedmax (total variation) and "
                   f"oscarmax (OSCAR); 0 gives sparsemax; default: {lambdas}; only used with "
                   "-global_attention_function fusedmax/oscarmax")
    taus = ", ".join(f"{tau:g} for {name}" for name, tau in DEFAULT_TEMPERATURE.items())
    group.add("--attention_temperature", "-attention_temperature", type=positive_float, default=None,
              metavar="FLOAT",
              help="structattn: temperature tau > 0 of softmax, sparsemax, fusedmax, oscarmax and entmax15 on the "
                   "bilinear (-global_attention general) score: the weights normalise s/tau (a larger tau keeps the "
                   "attention open longer early in training); the checkpoint records tau; not with viterbi/sparsemap "
                   f"(their temperature is -attention_gamma) nor with dot/mlp; default: {taus}")


def options_from_opt(opt) -> AttentionOptions | None:
    """The attention options of a model's ``opt`` (checked, γ filled in), or None for a model trained without
    structattn (no :data:`MARKER` option: OpenNMT's own layer). Raises ``ValueError`` naming the option."""
    if not hasattr(opt, MARKER):
        return None
    return resolve_options(
        getattr(opt, "global_attention_function", "softmax"),
        getattr(opt, "attention_reg", DEFAULT_REG),
        getattr(opt, "attention_gamma", None),
        getattr(opt, "attention_form", DEFAULT_FORM),
        getattr(opt, "attention_contiguity", DEFAULT_CONTIGUITY),
        flag=flag,
        chain=getattr(opt, "attention_chain", DEFAULT_CHAIN),
        lam=getattr(opt, "attention_lambda", None),  # None in checkpoints from before λ existed: the default
        # None in checkpoints from before τ existed: the default here, and the module's buffer (τ = 1 when the
        # checkpoint has none) decides what a loaded model uses
        temperature=getattr(opt, "attention_temperature", None),
    )


def check_train_opt(opt) -> list[str]:
    """Everything wrong with a training ``opt`` that OpenNMT would only find later (or never): one message per
    problem, empty when fine. Run before any data is read."""
    problems = []
    try:
        options = options_from_opt(opt)
    except ValueError as exc:
        return [str(exc)]
    attention = options.attention if options is not None else "softmax"
    if attention not in ATTENTIONS:  # pragma: no cover - resolve_options raised already
        problems.append(f"-global_attention_function must be one of {', '.join(ATTENTIONS)}")
    rnn_decoder = getattr(opt, "decoder_type", "rnn") == "rnn"
    if attention not in ("softmax", "sparsemax") and not rnn_decoder:
        problems.append(f"-global_attention_function {attention} is an attention of the RNN decoder (-decoder_type "
                        f"rnn); got -decoder_type {opt.decoder_type}")
    elif attention in CHAIN_ATTENTIONS and getattr(opt, "global_attention", "general") != "general":
        problems.append(f"-global_attention_function {attention} needs -global_attention general (the bilinear "
                        f"score of the paper); got -global_attention {opt.global_attention}")
    if getattr(opt, "attention_temperature", None) is not None and (
            not rnn_decoder or getattr(opt, "global_attention", "general") != "general"):
        problems.append("-attention_temperature applies to the RNN decoder's bilinear score (-decoder_type rnn, "
                        f"-global_attention general); got -decoder_type {getattr(opt, 'decoder_type', 'rnn')}, "
                        f"-global_attention {getattr(opt, 'global_attention', 'general')}")
    if rnn_decoder and getattr(opt, "global_attention", "general") != "none":
        if getattr(opt, "coverage_attn", False):
            problems.append("-coverage_attn is not supported by structattn-onmt-train (OpenNMT's coverage loss reads "
                            "the input-feeding decoder's attention in the time-major layout that structattn fixes)")
        if getattr(opt, "copy_attn", False):
            problems.append("-copy_attn is not supported by structattn-onmt-train (the copy attention is untested "
                            "with the structattn layer); use onmt_train")
    return problems
