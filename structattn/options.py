"""Toolkit-neutral attention options: the defaults, the value checks and the module they describe.

Every toolkit entry point offers the same choices, under its own spelling (fairseq: ``--attention``,
``--attention-reg``, ``--attention-gamma``, ``--attention-form``, ``--attention-contiguity``,
``--attention-chain``, ``--attention-lambda``, ``--attention-temperature``; OpenNMT-py:
``-global_attention_function``, ``-attention_reg``, ``-attention_gamma``, ``-attention_form``,
``-attention_contiguity``, ``-attention_chain``, ``-attention_lambda``, ``-attention_temperature``):

========================  =======================================  ================================================
choice                    values                                   default
========================  =======================================  ================================================
attention kind            :data:`structattn.attention.ATTENTIONS`  the toolkit's own (fairseq plugin: ``viterbi``;
                                                                   OpenNMT-py: ``softmax``, OpenNMT's default)
regulariser Ω (Viterbi)   :data:`structattn.ops.REGULARIZERS`      :data:`DEFAULT_REG` (``entropy``)
temperature γ (Viterbi,   a finite number > 0                      the paper's γ per Ω (:data:`PAPER_GAMMA`);
SparseMAP)                                                         SparseMAP: :data:`SPARSEMAP_GAMMA` (10)
form (Viterbi, SparseMAP) :data:`VITERBI_FORMS`                    :data:`DEFAULT_FORM` (``stable``)
contiguity c (stable)     a finite number                          :data:`DEFAULT_CONTIGUITY`
chain (Viterbi,           :data:`CHAIN_MODES`                      :data:`DEFAULT_CHAIN` (``on``; ``off`` is the
SparseMAP)
                                                                   chain-off ablation: κ ≡ 0, independent
                                                                   positions on the same scores)
λ (fusedmax, oscarmax)    a finite number ≥ 0 (0: sparsemax)       per attention, :data:`DEFAULT_LAMBDA` (fusedmax
                                                                   0.1, oscarmax 0.01: the ops module's
                                                                   ``DEFAULT_FUSEDMAX_LAMBDA`` /
                                                                   ``DEFAULT_OSCARMAX_LAMBDA``)
τ (softmax, sparsemax,    a finite number > 0                      per attention, :data:`DEFAULT_TEMPERATURE`
fusedmax, oscarmax,                                                (softmax, sparsemax and fusedmax 10, the
entmax15: the LSTM's                                               others 1); the LSTM's bilinear scores only
bilinear attention)                                                (fairseq: ``--attention-temperature``,
                                                                   OpenNMT-py: ``-attention_temperature``)
γ mode (multi-head        :data:`GAMMA_MODES`                      :data:`DEFAULT_GAMMA_MODE` (``fixed``, the
Viterbi normaliser)                                                paper's; ``learned``, ``scaled``: one learned γ
                                                                   per head; fairseq Transformer only:
                                                                   ``--attention-gamma-mode``)
========================  =======================================  ================================================

The attentions (:data:`ATTENTIONS`): ``softmax``, ``sparsemax``, ``viterbi`` (smoothed-Viterbi segmentation
attention), ``fusedmax`` and ``oscarmax`` (sparsemax with a total-variation / OSCAR penalty, λ above), ``entmax15``
(1.5-entmax, no option) and ``sparsemap`` (SparseMAP over the Viterbi attention's 2-state chain: a sparse mixture of
whole segmentations). The SparseMAP attention learns its transition matrix T exactly as the Viterbi attention does
(one per head in a Transformer), so γ, form, contiguity and chain apply to it too, with the same defaults except γ:
its regulariser is fixed, (γ/2)‖u‖² on the state marginals (Ω does not apply), and γ defaults to
:data:`SPARSEMAP_GAMMA` (:class:`structattn.attention.SparsemapAttention`).

**The defaults are defined here and only here.** The library (:class:`structattn.attention.ViterbiAttention`,
:class:`~structattn.attention.ViterbiNormalizer`, :func:`~structattn.attention.build_attention`, γ = None of
:func:`~structattn.attention.viterbi_attention` and :func:`~structattn.attention.multihead_viterbi_attention`),
the fairseq plugin and the OpenNMT-py glue all read them (``tests/test_defaults.py`` checks every entry point).
They are the settings every committed result was produced with. They are *provisional*: the stable form departs
from the paper (it removes the per-query level of the scores, see :mod:`structattn.attention`), and which form
should be the default is the open question of the form study in ``recipes/bible_fr_en/RESULTS.md``.

This module is a leaf of the package: it imports no toolkit (argparse only for the ``type=`` callables' error
class) and not :mod:`structattn.attention` at import time (which imports the defaults from here), so that glue for
any toolkit can share one definition of the values and their checks: the fairseq plugin's flags
(``user_dir/attention_options.py``) and the OpenNMT-py options (``structattn_onmt/options.py``) are spellings of it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable, Optional

from .ops.smoothed_max import REGULARIZERS
# the λ defaults live beside the operators they parametrise (structattn.ops, already imported by the line above:
# no new import cost, and no import of structattn.attention)
from .ops.structured_sparsemax import DEFAULT_FUSEDMAX_LAMBDA, DEFAULT_OSCARMAX_LAMBDA

__all__ = [
    "ATTENTIONS",
    "REGULARIZERS",
    "VITERBI_FORMS",
    "PAPER_GAMMA",
    "DEFAULT_REG",
    "DEFAULT_FORM",
    "DEFAULT_CONTIGUITY",
    "CHAIN_MODES",
    "DEFAULT_CHAIN",
    "LAMBDA_ATTENTIONS",
    "SPARSEMAP_GAMMA",
    "CHAIN_ATTENTIONS",
    "DEFAULT_LAMBDA",
    "GAMMA_MODES",
    "DEFAULT_GAMMA_MODE",
    "SCALED_GAMMA",
    "paper_gamma",
    "AttentionOptions",
    "positive_float",
    "finite_float",
    "nonnegative_float",
    "resolve_options",
    "build_from_options",
    "build_normalizer",
]

#: Attention kinds (the layers of :mod:`structattn.attention`; the plugins' ``--attention`` choices). The first
#: three are the paper's comparison; the others are the structured and sparse attentions beside it
#: (docs/choosing_attention.md).
ATTENTIONS = ("softmax", "sparsemax", "viterbi", "fusedmax", "oscarmax", "entmax15", "sparsemap")

#: The attentions with a penalty weight λ (``--attention-lambda``) and its default for each: the values the
#: operators themselves default to (:mod:`structattn.ops.structured_sparsemax`, where the reasons are given).
DEFAULT_LAMBDA = {"fusedmax": DEFAULT_FUSEDMAX_LAMBDA, "oscarmax": DEFAULT_OSCARMAX_LAMBDA}
LAMBDA_ATTENTIONS = tuple(DEFAULT_LAMBDA)

#: The bilinear attentions that normalise s/τ (``--attention-temperature``; the LSTM's attention layer,
#: :class:`structattn.attention._TemperedAttention`) and the default τ of each. τ does not change the model: s/τ
#: with M is s with M/τ, the same family of functions; it changes how Adam moves through it (the raw scores must
#: spread τ times further before the normaliser closes or saturates). sparsemax: 10, because at τ = 1 its support
#: closes before the alignment forms and it learns late (reversal toy). softmax: 10, because at τ = 1 it saturates
#: early the same way and, on the Bible quick preset, one seed in three never learnt to align (validation BLEU 16.7 /
#: 3.7 / 19.0 for seeds 1–3, the second parked on the source's end) while τ = 10 aligned for every seed (16.2 / 17.3
#: / 17.8, validation loss 3.665–3.682) — both in docs/sparse_init.md. 10 is the squared-ℓ2 scale of the paper's
#: ℓ2 chain (γ = 10) and was the one value tried. fusedmax: 10, on the same evidence for its own model: at τ = 10
#: seeds 1–3 aligned (validation BLEU 16.6 / 15.2 / 17.5, loss 3.70–3.83; test diagonality ρ 0.89–0.92, 0.8 BLEU
#: behind softmax) where τ = 1 seed 1 did not (validation 10.5, loss 4.16, ρ 0.39;
#: docs/choosing_attention.md). oscarmax, 1.5-entmax: 1, the raw scores as published, until their own seeds are in.
#: The Viterbi and SparseMAP attentions have γ instead; the Transformer's scaled dot products have no τ (their 1/√d
#: is its analogue).
DEFAULT_TEMPERATURE = {"softmax": 10.0, "sparsemax": 10.0, "fusedmax": 10.0, "oscarmax": 1.0, "entmax15": 1.0}
TEMPERATURE_ATTENTIONS = tuple(DEFAULT_TEMPERATURE)

#: Temperatures used in the paper (App. C.3): γ = 2 for negentropy, γ = 10 for squared ℓ2. γ = None anywhere in
#: the library or the plugins means this value for the chosen Ω.
PAPER_GAMMA = {"entropy": 2.0, "l2": 10.0}

#: Parametrisations of the Viterbi attention (:mod:`structattn.attention`): the paper's, and the trainable one.
VITERBI_FORMS = ("paper", "stable")

#: Default temperature γ of the SparseMAP attention, whose regulariser (γ/2)‖u‖² is a squared ℓ2: the scale the
#: library uses for every squared-ℓ2 attention (the ℓ2 Viterbi chain's paper γ and the sparsemax temperature,
#: docs/sparse_init.md). At γ = 1 (SparseMAP on the raw scores) the toy LSTM of tests/test_fairseq_e2e.py froze: 84 %
#: of its rows had one structure (zero Jacobian) after 500 updates, and its validation loss went back up to 2.1
#: bits; with γ = 10 in the stable form it learns (docs/choosing_attention.md).
SPARSEMAP_GAMMA = PAPER_GAMMA["l2"]

#: The attentions with a chain over the source and a learned transition matrix (γ, form, contiguity, chain).
CHAIN_ATTENTIONS = ("viterbi", "sparsemap")

#: Default regulariser Ω of the Viterbi attention.
DEFAULT_REG = "entropy"

#: Default form of the Viterbi attention (provisional: see the module docstring).
DEFAULT_FORM = "stable"

#: Contiguity prior c of the stable form: τ = T/γ starts at [[c, 0], [0, c]].
DEFAULT_CONTIGUITY = 1.0

#: The chain of the Viterbi attention: ``on`` (the model), ``off`` (the chain-off ablation: T projected onto
#: the matrices f(i) + g(j), so the coupling κ is 0 and positions are independent gates on the same scores;
#: :meth:`structattn.attention.ViterbiAttention.effective_transitions`).
CHAIN_MODES = ("on", "off")
DEFAULT_CHAIN = "on"

#: The temperature of the multi-head Viterbi normaliser (:class:`structattn.attention.ViterbiNormalizer`):
#: ``fixed`` (one γ for every head, as in the paper, App. C.3), ``learned`` (a parameter log γ_h per transition
#: matrix, i.e. per head, initialised at log γ) or ``scaled`` (the same parameter, initialised on the first training
#: batch at γ_h = γ·σ_h, σ_h the head's score scale: γ is then in units of the head's scores, default
#: :data:`SCALED_GAMMA`). ``learned`` and ``scaled`` depart from the paper (docs/transformer.md). Only the multi-head
#: normaliser has them: the bilinear :class:`~structattn.attention.ViterbiAttention` of the LSTM keeps γ fixed (its
#: scores are initialised on the γ scale, so it has no scale mismatch to correct).
GAMMA_MODES = ("fixed", "learned", "scaled")
DEFAULT_GAMMA_MODE = "fixed"
#: γ of ``gamma_mode="scaled"`` when none is given: each head starts with γ_h = σ_h, its scores' own scale — the
#: regime the LSTM's initialisation of M reaches (score std on the γ scale, :class:`structattn.attention.ViterbiAttention`).
SCALED_GAMMA = 1.0


def paper_gamma(reg: str) -> float:
    """The paper's γ for Ω = ``reg`` (:data:`PAPER_GAMMA`); ``ValueError`` naming the choices otherwise."""
    if reg not in PAPER_GAMMA:
        raise ValueError(f"reg must be one of {REGULARIZERS}, got {reg!r}")
    return PAPER_GAMMA[reg]


@dataclass(frozen=True)
class AttentionOptions:
    """Validated attention options (γ filled in for the Viterbi and SparseMAP attentions, λ with
    :data:`DEFAULT_LAMBDA` for fusedmax and oscarmax; ``reg`` is carried but used by the Viterbi attention only,
    ``gamma``, ``form``, ``contiguity`` and ``chain`` by it and SparseMAP, ``lam`` by fusedmax and oscarmax)."""

    attention: str
    reg: str = DEFAULT_REG
    gamma: Optional[float] = None
    form: str = DEFAULT_FORM
    contiguity: Optional[float] = DEFAULT_CONTIGUITY
    chain: str = DEFAULT_CHAIN
    lam: Optional[float] = None
    gamma_mode: str = DEFAULT_GAMMA_MODE
    temperature: Optional[float] = None


def positive_float(text) -> float:
    """argparse ``type`` for γ: a finite number > 0 (the messages are the fairseq plugin's)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (value > 0.0 and value != math.inf):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def finite_float(text) -> float:
    """argparse ``type`` for the contiguity prior: any finite number."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def nonnegative_float(text) -> float:
    """argparse ``type`` for λ: a finite number ≥ 0."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not (0.0 <= value < math.inf):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def check_temperature(value) -> float:
    """τ of a bilinear attention: a finite number > 0 (``ValueError`` otherwise), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


def _parsed(value, parse: Callable[[str], float], option: str, what: str) -> float:
    """``value`` read as the command line would read it (``parse``: an argparse ``type`` above), for options given
    in code or restored from a checkpoint; ``ValueError`` naming ``option`` otherwise (also for a bool, which
    ``float`` would take for 0 or 1)."""
    if isinstance(value, bool):
        raise ValueError(f"{option} must be {what}, got {value!r}")
    try:
        return parse(str(value))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{option} {exc}") from None


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_options(attention: str, reg: str = DEFAULT_REG, gamma=None, form: str = DEFAULT_FORM,
                    contiguity=DEFAULT_CONTIGUITY, flag: Callable[[str], str] = _dash,
                    chain: str = DEFAULT_CHAIN, lam=None, gamma_mode: str = DEFAULT_GAMMA_MODE,
                    temperature=None) -> AttentionOptions:
    """Check the values and fill in γ's default for the Viterbi attention (the paper's; :data:`SCALED_GAMMA` for
    ``gamma_mode="scaled"``, where γ is relative to the heads' score scale) and the SparseMAP attention
    (:data:`SPARSEMAP_GAMMA`), and λ's default (:data:`DEFAULT_LAMBDA`) for fusedmax and oscarmax.

    ``flag`` spells an option for the error messages: it receives ``"attention"``, ``"attention_reg"``,
    ``"attention_gamma"``, ``"attention_form"``, ``"attention_contiguity"``, ``"attention_chain"``,
    ``"attention_lambda"``, ``"attention_gamma_mode"`` or ``"attention_temperature"`` (default: fairseq's
    ``--attention-reg`` spelling). τ (``temperature``) is filled in with :data:`DEFAULT_TEMPERATURE` for the
    attentions that have one and must be None for the others (the Viterbi and SparseMAP attentions' temperature
    is γ). Raises ``ValueError`` naming the option and the value."""
    if attention not in ATTENTIONS:
        raise ValueError(f"{flag('attention')} must be one of {', '.join(ATTENTIONS)}; got {attention!r}")
    if reg not in REGULARIZERS:
        raise ValueError(f"{flag('attention_reg')} must be one of {', '.join(REGULARIZERS)}; got {reg!r}")
    if gamma is not None:
        try:
            gamma = positive_float(str(gamma))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"{flag('attention_gamma')} {exc}") from None
    if form not in VITERBI_FORMS:
        raise ValueError(f"{flag('attention_form')} must be one of {', '.join(VITERBI_FORMS)}; got {form!r}")
    if contiguity is not None:
        if isinstance(contiguity, bool) or not isinstance(contiguity, (int, float)) or not math.isfinite(contiguity):
            raise ValueError(f"{flag('attention_contiguity')} must be a finite number; got {contiguity!r}")
        contiguity = float(contiguity)
    if chain not in CHAIN_MODES:
        raise ValueError(f"{flag('attention_chain')} must be one of {', '.join(CHAIN_MODES)}; "
                         f"got {chain!r}")
    if lam is not None:
        lam = _parsed(lam, nonnegative_float, flag("attention_lambda"), "a number >= 0")
    if gamma_mode not in GAMMA_MODES:
        raise ValueError(f"{flag('attention_gamma_mode')} must be one of {', '.join(GAMMA_MODES)}; "
                         f"got {gamma_mode!r}")
    if temperature is not None:
        temperature = _parsed(temperature, positive_float, flag("attention_temperature"), "a finite number > 0")
        if attention not in DEFAULT_TEMPERATURE:
            raise ValueError(f"{flag('attention_temperature')} is an option of {', '.join(TEMPERATURE_ATTENTIONS)} "
                             f"(the LSTM's bilinear attention); the {attention} attention's temperature is "
                             f"{flag('attention_gamma')}")
    elif attention in DEFAULT_TEMPERATURE:
        temperature = DEFAULT_TEMPERATURE[attention]
    if attention == "viterbi" and gamma is None:
        gamma = SCALED_GAMMA if gamma_mode == "scaled" else PAPER_GAMMA[reg]
    if attention == "sparsemap" and gamma is None:
        gamma = SPARSEMAP_GAMMA
    if attention in DEFAULT_LAMBDA and lam is None:
        lam = DEFAULT_LAMBDA[attention]
    return AttentionOptions(attention, reg, gamma, form, contiguity, chain, lam, gamma_mode, temperature)


def build_from_options(options: AttentionOptions, query_dim: int, source_dim: int):
    """The :mod:`structattn.attention` module the options describe (query of ``query_dim`` scored against sources
    of ``source_dim``): exactly what the fairseq plugin builds for the same options."""
    from .attention import build_attention  # here, not at the top: structattn.attention imports this module
    if options.attention == "viterbi" and options.gamma_mode != DEFAULT_GAMMA_MODE:
        raise ValueError(f"gamma_mode {options.gamma_mode!r} is an option of the multi-head Viterbi normaliser "
                         "(the Transformer); the bilinear Viterbi attention keeps γ fixed")
    if options.attention not in CHAIN_ATTENTIONS:
        return build_attention(options.attention, query_dim, source_dim, lam=options.lam,
                               temperature=options.temperature)
    contiguity = options.contiguity if options.form == "stable" else None
    return build_attention(options.attention, query_dim, source_dim, options.reg, options.gamma, options.form,
                           contiguity, options.chain == "on")


def build_normalizer(options: AttentionOptions, num_heads: int):
    """The normaliser of a multi-head attention, applied per head to scores (B, H, Q, S)
    (:func:`structattn.attention.build_normalizer`): for ``viterbi`` and ``sparsemap`` with ``num_heads``
    transition matrices (one per head, or 1 shared by the heads), parameter-free for the others."""
    from .attention import build_normalizer as build  # here, not at the top: structattn.attention imports this
    contiguity = options.contiguity if options.form == "stable" else None
    return build(options.attention, num_heads, options.reg, options.gamma, options.form, contiguity,
                 options.chain == "on", lam=options.lam, gamma_mode=options.gamma_mode)
