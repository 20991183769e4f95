"""The attention options every structattn fairseq model shares: one definition of the flags, their defaults and
their validation, of how they become an attention module, and of the training metrics a Viterbi attention logs.

``--attention {softmax,sparsemax,viterbi,fusedmax,oscarmax,entmax15,sparsemap}`` (one name for the attention kind,
from the command line through ``args.attention`` to :func:`structattn.attention.build_attention`'s ``attention``),
``--attention-reg {entropy,l2}``, ``--attention-gamma FLOAT`` (default: the paper's γ per Ω,
:data:`structattn.attention.PAPER_GAMMA`), ``--attention-form {stable,paper}``, ``--attention-contiguity FLOAT``,
``--attention-chain {on,off}`` (``off``: the chain-off ablation) and ``--attention-lambda FLOAT`` (λ of fusedmax
and oscarmax; default per attention, :data:`structattn.options.DEFAULT_LAMBDA`). Models call :func:`add_attention_args` in
``add_args``, :func:`attention_defaults` in their architecture functions, :func:`resolve_attention_args` in
``build_model`` and build the module with :func:`build_from_options` (a bilinear attention layer, the LSTM) or
:func:`build_normalizer` (the normaliser of a multi-head attention, the Transformer); the maths stays in
:mod:`structattn.attention`.
"""

from __future__ import annotations

import torch
from fairseq.logging import metrics

from structattn.attention import ATTENTIONS, DEFAULT_CONTIGUITY, PAPER_GAMMA, VITERBI_FORMS, SparsemapAttention, \
    SparsemapNormalizer, ViterbiAttention, ViterbiNormalizer
# The values, defaults and checks are toolkit-neutral and shared with the OpenNMT-py glue (structattn.options);
# this module adds what is fairseq's: the flags, the architecture defaults, the metrics.
from structattn.ops.segmentation import chain_coupling
from structattn.options import (DEFAULT_FORM, DEFAULT_LAMBDA, DEFAULT_TEMPERATURE, DEFAULT_REG, DEFAULT_CHAIN, DEFAULT_GAMMA_MODE,
                                REGULARIZERS, SPARSEMAP_GAMMA, CHAIN_MODES, AttentionOptions, build_from_options,
                                build_normalizer, nonnegative_float, positive_float, resolve_options)

DEFAULT_ATTENTION = "viterbi"


def _choices(values) -> str:
    return "{" + ",".join(values) + "}"


def add_attention_args(parser) -> None:
    """The ``--attention*`` flags (no defaults on the parser: :func:`attention_defaults` fills them per
    architecture, as fairseq does for its own model options)."""
    gammas = ", ".join(f"{g:g} for {reg}" for reg, g in PAPER_GAMMA.items())
    parser.add_argument(
        "--attention", choices=ATTENTIONS, metavar=_choices(ATTENTIONS),
        help="attention normaliser of the model's scores (the LSTM's bilinear scores, the Transformer's per-head "
             "scaled dot products over the source): softmax, sparsemax (sparse projection of the same scores), "
             "viterbi (segmentation attention with smoothed Viterbi marginals, Mensch & Blondel 2018 §5), fusedmax "
             "(sparsemax with a total-variation penalty: contiguous segments of equal weight), oscarmax (OSCAR "
             "penalty: clusters of equal weight), entmax15 (1.5-entmax, Peters et al. 2019) or sparsemap (SparseMAP "
             "over the segmentation chain: a few whole segmentations); docs/choosing_attention.md; default: "
             f"{DEFAULT_ATTENTION}",
    )
    parser.add_argument(
        "--attention-reg", choices=REGULARIZERS, metavar=_choices(REGULARIZERS),
        help="regulariser of the smoothed max in the Viterbi attention: entropy (dense, CRF marginals) or l2 "
             f"(sparse); only used with --attention viterbi; default: {DEFAULT_REG}",
    )
    parser.add_argument(
        "--attention-gamma", type=positive_float, metavar="FLOAT",
        help="temperature gamma > 0 of the Viterbi and SparseMAP attentions (smaller is sparser; l2 turns into "
             f"hard, non-differentiable Viterbi when gamma is too small); default: the paper's {gammas}; "
             f"{SPARSEMAP_GAMMA:g} for sparsemap; only used with --attention viterbi/sparsemap",
    )
    parser.add_argument(
        "--attention-form", choices=VITERBI_FORMS, metavar=_choices(VITERBI_FORMS),
        help="parametrisation of the Viterbi and SparseMAP attentions: stable (scores centred per row, "
             "transitions T = gamma * tau with a contiguity prior; keeps the scores' level from drifting, so rows neither die nor "
             "freeze, see structattn.attention) or "
             f"paper (raw scores, T learned from 0, exactly as in the paper); default: {DEFAULT_FORM}",
    )
    parser.add_argument(
        "--attention-contiguity", type=float, metavar="FLOAT",
        help="stable form only: initial T/gamma = [[c, 0], [0, c]] (staying in a state is worth c*gamma); "
             f"default: {DEFAULT_CONTIGUITY}",
    )
    parser.add_argument(
        "--attention-chain", choices=CHAIN_MODES, metavar=_choices(CHAIN_MODES),
        help="Viterbi and SparseMAP attentions only: on (the chain) or off (the chain-off ablation: the coupling kappa of "
             "neighbouring positions held at 0, so positions are independent gates on the same scores; what the "
             f"chain buys is the difference); default: {DEFAULT_CHAIN}",
    )
    lambdas = ", ".join(f"{lam:g} for {name}" for name, lam in DEFAULT_LAMBDA.items())
    parser.add_argument(
        "--attention-lambda", type=nonnegative_float, metavar="FLOAT",
        help="weight lambda >= 0 of the structured penalty of fusedmax (total variation) and oscarmax (OSCAR); "
             f"0 gives sparsemax; only used with --attention fusedmax/oscarmax; default: {lambdas}",
    )


def add_temperature_arg(parser) -> None:
    """``--attention-temperature``: τ of the bilinear attentions (the LSTM's attention layer; the Transformer's
    scaled dot products have none, so its parser does not offer the flag)."""
    taus = ", ".join(f"{tau:g} for {name}" for name, tau in DEFAULT_TEMPERATURE.items())
    parser.add_argument(
        "--attention-temperature", type=positive_float, metavar="FLOAT",
        help="temperature tau > 0 of softmax, sparsemax, fusedmax, oscarmax and entmax15: the attention normalises "
             "the bilinear scores divided by tau (a larger tau keeps the attention open longer early in training; "
             "docs/sparse_init.md); the Viterbi and SparseMAP attentions use --attention-gamma instead; the "
             f"checkpoint records tau; default: {taus}",
    )


def attention_defaults(args) -> None:
    """Architecture defaults of the attention options (fills what the command line left unset)."""
    args.attention = getattr(args, "attention", DEFAULT_ATTENTION)
    args.attention_reg = getattr(args, "attention_reg", DEFAULT_REG)
    args.attention_gamma = getattr(args, "attention_gamma", None)
    args.attention_form = getattr(args, "attention_form", DEFAULT_FORM)
    args.attention_contiguity = getattr(args, "attention_contiguity", DEFAULT_CONTIGUITY)
    args.attention_chain = getattr(args, "attention_chain", DEFAULT_CHAIN)
    args.attention_lambda = getattr(args, "attention_lambda", None)
    # None: the attention's own τ (structattn.options.DEFAULT_TEMPERATURE); the LSTM's flag, None elsewhere
    args.attention_temperature = getattr(args, "attention_temperature", None)


def resolve_attention_args(args) -> AttentionOptions:
    """Validate the attention options on ``args`` (also for models built without the command line) and fill in
    γ's paper default (:data:`structattn.attention.PAPER_GAMMA`) when the Viterbi attention is used without
    --attention-gamma, and λ's default (:data:`structattn.options.DEFAULT_LAMBDA`) for fusedmax/oscarmax without
    --attention-lambda; the filled-in values are written back to ``args`` so that the checkpoint records them.
    A checkpoint written before --attention-lambda existed has no λ: it can only hold softmax, sparsemax or
    Viterbi attention, which do not use it."""
    options = resolve_options(getattr(args, "attention", DEFAULT_ATTENTION), getattr(args, "attention_reg", DEFAULT_REG),
                              getattr(args, "attention_gamma", None), getattr(args, "attention_form", DEFAULT_FORM),
                              getattr(args, "attention_contiguity", DEFAULT_CONTIGUITY),
                              chain=getattr(args, "attention_chain", None) or DEFAULT_CHAIN,
                              lam=getattr(args, "attention_lambda", None),
                              # --attention-gamma-mode is the Transformer's (its multi-head normaliser): fixed elsewhere
                              gamma_mode=getattr(args, "attention_gamma_mode", None) or DEFAULT_GAMMA_MODE,
                              # τ is not written back to args: the module's buffer records it in the checkpoint,
                              # and a checkpoint without it loads with τ = 1 (structattn.attention._TemperedAttention)
                              temperature=getattr(args, "attention_temperature", None))
    if options.attention in ("viterbi", "sparsemap") and getattr(args, "attention_gamma", None) is None:
        args.attention_gamma = options.gamma
    if options.lam is not None and getattr(args, "attention_lambda", None) is None:
        args.attention_lambda = options.lam
    return options


#: the modules whose rows and transitions :func:`log_attention_metrics` logs
VITERBI_MODULES = (ViterbiAttention, ViterbiNormalizer)
#: the modules whose rows and active structures :func:`log_attention_metrics` logs
SPARSEMAP_MODULES = (SparsemapAttention, SparsemapNormalizer)


def log_attention_metrics(att, prefix: str = "") -> None:
    """Log the fallback and frozen-row rates and the learned transitions on the γ scale of a Viterbi attention
    (no-op for the attentions without a chain) into fairseq's active metric aggregators (train_inner/train while
    training, valid during validation): ``attn_fallback``, ``attn_frozen``, ``T00/g T01/g T10/g T11/g`` (T[i, j]:
    state j at t−1 → state i at t) and ``kappa``, the coupling κ = (T00 + T11 − T01 − T10)/γ (each matrix on its own
    γ when γ is learned per head, ``--attention-gamma-mode learned|scaled``) — the one direction of T that links
    neighbouring positions (|κ| < 0.25: independent positions, :func:`structattn.ops.segmentation.
    chain_coupling`; the other three directions only shift the scores). ``prefix`` distinguishes several attention
    layers. A SparseMAP attention logs ``attn_fallback``, ``attn_frozen`` (rows with one structure), ``attn_structures``
    (mean number of active segmentations per row) and ``attn_unconverged`` (share of rows whose active-set solver
    hit its iteration cap).

    ``att`` is one module or a list of them (e.g. the normalisers of every decoder layer of a Transformer, None
    where a layer has none): the rates then pool the rows of all of them and T/γ and ``kappa`` are the means over
    all their transition matrices (one per head for a :class:`structattn.attention.ViterbiNormalizer`); with more
    than one matrix, κ of each is logged too, as ``kappa_L<layer>H<head>`` (layer: the position in ``att``). When a
    module learns its γ (``gamma_mode`` ``"learned"`` or ``"scaled"``), ``gamma`` (the mean over the matrices) and each matrix's
    ``gamma_L<layer>H<head>`` are logged as well.

    Reads the counts on the host: callers skip it inside compiled graphs (the counts keep accumulating in the
    module's buffers and are logged by the next eager call)."""
    modules = list(att if isinstance(att, (list, tuple)) else (att,))
    sparsemaps = [m for m in modules if isinstance(m, SPARSEMAP_MODULES)]
    if sparsemaps:
        _log_sparsemap_metrics(sparsemaps, prefix)
    layers = [(i, m) for i, m in enumerate(modules) if isinstance(m, VITERBI_MODULES)]
    atts = [m for _, m in layers]
    if not atts:
        return
    rows, dead, frozen = (sum(c) for c in zip(*(m.pop_fallback_counts() for m in atts)))
    if rows == 0:
        return
    metrics.log_scalar(f"{prefix}attn_fallback", dead / rows, weight=rows, round=4)
    metrics.log_scalar(f"{prefix}attn_frozen", frozen / rows, weight=rows, round=4)
    gammas = [m.matrix_gammas().detach() for m in atts]
    taus = [m.effective_transitions().detach().reshape(-1, 2, 2) / g.view(-1, 1, 1) for m, g in zip(atts, gammas)]
    kappas = [chain_coupling(t).cpu().tolist() for t in taus]
    tau = torch.cat(taus).mean(0).cpu().tolist()
    for i in range(2):
        for j in range(2):
            metrics.log_scalar(f"{prefix}T{i}{j}/g", tau[i][j], weight=0, round=3)
    flat = [k for layer in kappas for k in layer]
    metrics.log_scalar(f"{prefix}kappa", sum(flat) / len(flat), weight=0, round=3)
    if len(flat) > 1:
        for (layer, _), ks in zip(layers, kappas):
            for head, k in enumerate(ks):
                metrics.log_scalar(f"{prefix}kappa_L{layer}H{head}", k, weight=0, round=3)
    if any(getattr(m, "gamma_mode", "fixed") != "fixed" for m in atts):
        gs = [g.cpu().tolist() for g in gammas]
        flat = [g for layer in gs for g in layer]
        metrics.log_scalar(f"{prefix}gamma", sum(flat) / len(flat), weight=0, round=3)
        if len(flat) > 1:
            for (layer, _), ls in zip(layers, gs):
                for head, g in enumerate(ls):
                    metrics.log_scalar(f"{prefix}gamma_L{layer}H{head}", g, weight=0, round=3)


def _log_sparsemap_metrics(atts: list, prefix: str) -> None:
    rows, dead, frozen = (sum(c) for c in zip(*(m.pop_fallback_counts() for m in atts)))
    srows, structures, unconverged = (sum(c) for c in zip(*(m.pop_structure_counts() for m in atts)))
    if rows:
        metrics.log_scalar(f"{prefix}attn_fallback", dead / rows, weight=rows, round=4)
        metrics.log_scalar(f"{prefix}attn_frozen", frozen / rows, weight=rows, round=4)
    if srows:
        metrics.log_scalar(f"{prefix}attn_structures", structures / srows, weight=srows, round=3)
        metrics.log_scalar(f"{prefix}attn_unconverged", unconverged / srows, weight=srows, round=4)


def check_transition_keys(state_dict: dict, prefix: str, form: str) -> None:
    """Say which ``--model-overrides`` loads a checkpoint whose Viterbi attention (parameters under ``prefix``) is
    in the other form than the model being built (``transitions``: paper form, raw T; ``transitions_over_gamma``:
    stable form, τ = T/γ), instead of fairseq's bare missing-key error. Checkpoints written before the stable form
    existed record no --attention-form and are built with the new default."""
    has_paper, has_stable = prefix + "transitions" in state_dict, prefix + "transitions_over_gamma" in state_dict
    if form == "stable" and has_paper and not has_stable:
        raise ValueError("this checkpoint's Viterbi attention is in the paper form (raw transitions T, from a "
                         "version before --attention-form existed or trained with --attention-form paper); "
                         "load it with --model-overrides \"{'attention_form': 'paper'}\"")
    if form == "paper" and has_stable and not has_paper:
        raise ValueError("this checkpoint's Viterbi attention is in the stable form (transitions_over_gamma); "
                         "load it with --model-overrides \"{'attention_form': 'stable'}\"")


__all__ = [
    "AttentionOptions", "DEFAULT_ATTENTION", "DEFAULT_FORM", "DEFAULT_REG", "SPARSEMAP_MODULES", "VITERBI_MODULES",
    "add_attention_args",
    "add_temperature_arg", "attention_defaults", "build_from_options", "build_normalizer", "check_transition_keys", "log_attention_metrics",
    "positive_float", "resolve_attention_args",
]
