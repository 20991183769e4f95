"""Toolkit-neutral attention options: the defaults, the value checks and the module they describe.

Every toolkit entry point offers the same five choices, under its own spelling (fairseq: ``--attention``,
``--attention-reg``, ``--attention-gamma``, ``--attention-form``, ``--attention-contiguity``; OpenNMT-py:
``-global_attention_function``, ``-attention_reg``, ``-attention_gamma``, ``-attention_form``,
``-attention_contiguity``):

========================  =======================================  ================================================
choice                    values                                   default
========================  =======================================  ================================================
attention kind            :data:`structattn.attention.ATTENTIONS`  the toolkit's own (fairseq plugin: ``viterbi``;
                                                                   OpenNMT-py: ``softmax``, OpenNMT's default)
regulariser Ω (Viterbi)   :data:`structattn.ops.REGULARIZERS`      :data:`DEFAULT_REG` (``entropy``)
temperature γ (Viterbi)   a finite number > 0                      the paper's γ per Ω (:data:`PAPER_GAMMA`)
form (Viterbi)            :data:`VITERBI_FORMS`                    :data:`DEFAULT_FORM` (``stable``)
contiguity c (stable)     a finite number                          :data:`DEFAULT_CONTIGUITY`
========================  =======================================  ================================================

This module imports no toolkit (argparse only for the ``type=`` callables' error class), so that glue for any
toolkit can share one definition of the values and their checks: the fairseq plugin's flags
(``user_dir/attention_options.py``) and the OpenNMT-py options (``structattn_onmt/options.py``) are spellings of it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .attention import ATTENTIONS, DEFAULT_CONTIGUITY, PAPER_GAMMA, VITERBI_FORMS, ViterbiNormalizer, build_attention
from .ops.smoothed_max import REGULARIZERS

__all__ = [
    "ATTENTIONS",
    "REGULARIZERS",
    "VITERBI_FORMS",
    "PAPER_GAMMA",
    "DEFAULT_REG",
    "DEFAULT_FORM",
    "DEFAULT_CONTIGUITY",
    "AttentionOptions",
    "positive_float",
    "finite_float",
    "resolve_options",
    "build_from_options",
    "build_normalizer",
]

DEFAULT_REG = "entropy"
DEFAULT_FORM = "stable"


@dataclass(frozen=True)
class AttentionOptions:
    """Validated attention options (γ filled in with the paper's value for the Viterbi attention; ``reg``,
    ``gamma``, ``form`` and ``contiguity`` are carried but unused by softmax and sparsemax)."""

    attention: str
    reg: str = DEFAULT_REG
    gamma: Optional[float] = None
    form: str = DEFAULT_FORM
    contiguity: Optional[float] = DEFAULT_CONTIGUITY


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


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_options(attention: str, reg: str = DEFAULT_REG, gamma=None, form: str = DEFAULT_FORM,
                    contiguity=DEFAULT_CONTIGUITY, flag: Callable[[str], str] = _dash) -> AttentionOptions:
    """Check the five values and fill in γ's paper default for the Viterbi attention.

    ``flag`` spells an option for the error messages: it receives ``"attention"``, ``"attention_reg"``,
    ``"attention_gamma"``, ``"attention_form"`` or ``"attention_contiguity"`` (default: fairseq's
    ``--attention-reg`` spelling). Raises ``ValueError`` naming the option and the value."""
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
    if attention == "viterbi" and gamma is None:
        gamma = PAPER_GAMMA[reg]
    return AttentionOptions(attention, reg, gamma, form, contiguity)


def build_from_options(options: AttentionOptions, query_dim: int, source_dim: int) -> nn.Module:
    """The :mod:`structattn.attention` module the options describe (query of ``query_dim`` scored against sources
    of ``source_dim``): exactly what the fairseq plugin builds for the same options."""
    if options.attention != "viterbi":
        return build_attention(options.attention, query_dim, source_dim)
    contiguity = options.contiguity if options.form == "stable" else None
    return build_attention(options.attention, query_dim, source_dim, options.reg, options.gamma, options.form,
                           contiguity)


def build_normalizer(options: AttentionOptions, num_heads: int) -> Optional[ViterbiNormalizer]:
    """The Viterbi normaliser of a multi-head attention with ``num_heads`` transition matrices (one per head, or 1
    shared by the heads; :class:`structattn.attention.ViterbiNormalizer`), or None for softmax/sparsemax
    (parameter-free: the caller applies :func:`structattn.attention.softmax_attention` / ``sparsemax_attention``)."""
    if options.attention != "viterbi":
        return None
    contiguity = options.contiguity if options.form == "stable" else None
    return ViterbiNormalizer(num_heads, options.reg, options.gamma, options.form, contiguity)
