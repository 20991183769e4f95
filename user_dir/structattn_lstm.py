"""fairseq model ``structattn_lstm``: fairseq's LSTM encoder-decoder with a selectable attention layer.

Mensch & Blondel, ICML 2018, §5 and App. C.3: an LSTM encoder-decoder with input feeding whose attention is
softmax, sparsemax or the smoothed-Viterbi segmentation attention (:mod:`structattn.attention`, which holds all the
maths). This file is glue only: it subclasses ``fairseq.models.lstm`` and replaces nothing but

* the attention layer of the decoder (:class:`StructAttnLayer`), and
* the encoder's padding handling, so that encoder states, the padding mask and therefore the returned attention
  are laid out like the ``src_tokens`` the model was given (fairseq's ``LSTMEncoder`` silently switches left
  padding to right padding, which is why fairseq's own alignment output mis-indexes, fairseq issue #3625).

Options (``fairseq-train --user-dir user_dir --arch structattn_lstm --help`` lists them):
``--attention {softmax,sparsemax,viterbi}``, ``--attention-reg {entropy,l2}``, ``--attention-gamma FLOAT``,
``--attention-form {stable,paper}`` and ``--attention-contiguity FLOAT`` (the stable form's prior on T/γ).

Training metrics. With Viterbi attention the decoder logs, through fairseq's ``metrics.log_scalar``, in the
train/valid lines of fairseq's log: ``attn_fallback`` (fraction of attention rows that fell back to softmax
because every p(y_t = 1) was 0, see :func:`structattn.attention.dead_rows`), ``attn_frozen`` (rows whose
marginals are all 0 or 1, so no gradient flows through them: dead, saturated or hard rows,
:func:`structattn.attention.frozen_rows`) and the learned transitions on the
γ scale ``T00/g T01/g T10/g T11/g`` (T[i, j]: state j at t−1 → state i at t; all ≈ 0 = independent positions).
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from fairseq import utils
from fairseq.models import register_model, register_model_architecture
from fairseq.models.lstm import Linear, LSTMDecoder, LSTMEncoder, LSTMModel
from fairseq.models.lstm import base_architecture as lstm_base_architecture
from torch import Tensor, nn

from fairseq.logging import metrics

from structattn.attention import (ATTENTIONS, DEFAULT_CONTIGUITY, PAPER_GAMMA, VITERBI_FORMS, ViterbiAttention,
                                  build_attention)
from structattn.ops.smoothed_max import REGULARIZERS

from .distributed import check_data_parallel_launch

DEFAULT_ATTENTION = "viterbi"
DEFAULT_REG = "entropy"
DEFAULT_FORM = "stable"


def _positive_float(text: str) -> float:
    """argparse type for --attention-gamma: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (value > 0.0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def resolve_attention_args(args) -> tuple[str, str, Optional[float]]:
    """Validate the attention options on ``args`` (also for models built without the command line) and fill in
    γ's paper default (2 for entropy, 10 for ℓ2) when the Viterbi attention is used without --attention-gamma."""
    attention = getattr(args, "attention", DEFAULT_ATTENTION)
    reg = getattr(args, "attention_reg", DEFAULT_REG)
    gamma = getattr(args, "attention_gamma", None)
    if attention not in ATTENTIONS:
        raise ValueError(f"--attention must be one of {', '.join(ATTENTIONS)}; got {attention!r}")
    if reg not in REGULARIZERS:
        raise ValueError(f"--attention-reg must be one of {', '.join(REGULARIZERS)}; got {reg!r}")
    if gamma is not None:
        try:
            gamma = _positive_float(str(gamma))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--attention-gamma {exc}") from None
    form = getattr(args, "attention_form", DEFAULT_FORM)
    if form not in VITERBI_FORMS:
        raise ValueError(f"--attention-form must be one of {', '.join(VITERBI_FORMS)}; got {form!r}")
    contiguity = getattr(args, "attention_contiguity", DEFAULT_CONTIGUITY)
    if contiguity is not None and not (isinstance(contiguity, (int, float)) and abs(float(contiguity)) < float("inf")):
        raise ValueError(f"--attention-contiguity must be a finite number; got {contiguity!r}")
    if attention == "viterbi" and gamma is None:
        gamma = PAPER_GAMMA[reg]
        args.attention_gamma = gamma  # recorded in the checkpoint's config
    return attention, reg, gamma


class StructAttnLayer(nn.Module):
    """Drop-in replacement for ``fairseq.models.lstm.AttentionLayer``: same call and output, any attention.

    ``forward(input, source_hids, encoder_padding_mask)`` with input (bsz, d_z), source_hids (srclen, bsz, d_x),
    encoder_padding_mask (srclen, bsz) bool → (tanh(W_out [context; input]) (bsz, d_out), weights (srclen, bsz)).
    """

    def __init__(self, input_embed_dim, source_embed_dim, output_embed_dim, attention, reg, gamma,
                 form=DEFAULT_FORM, contiguity=DEFAULT_CONTIGUITY):
        super().__init__()
        if attention == "viterbi":
            self.attention = build_attention(attention, input_embed_dim, source_embed_dim, reg, gamma, form,
                                             contiguity if form == "stable" else None)
        else:
            self.attention = build_attention(attention, input_embed_dim, source_embed_dim)
        self.output_proj = Linear(input_embed_dim + source_embed_dim, output_embed_dim, bias=False)

    def forward(self, input: Tensor, source_hids: Tensor, encoder_padding_mask: Optional[Tensor]):
        mask = None
        if encoder_padding_mask is not None and encoder_padding_mask.numel() > 0:
            mask = encoder_padding_mask.t()
        context, weights = self.attention(input, source_hids.transpose(0, 1), mask)
        x = torch.tanh(self.output_proj(torch.cat((context, input), dim=1)))
        return x, weights.t().to(input.dtype)


class StructAttnLSTMEncoder(LSTMEncoder):
    """fairseq's ``LSTMEncoder`` that keeps the caller's padding layout.

    ``src_tokens`` may be left-padded (fairseq's default), right-padded or mixed. The LSTM runs on the real tokens
    (packed), and the outputs and ``encoder_padding_mask`` are returned in the columns of ``src_tokens``: output
    row t belongs to ``src_tokens[:, t]`` (0 on padding). Batches need not be sorted by length. The lengths are
    read off the padding of ``src_tokens`` (``src_lengths`` is accepted for fairseq's interface; in fairseq's data
    pipeline the two always agree).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.left_pad = False  # the parent's left→right conversion is replaced by the layout-preserving one below

    def forward(self, src_tokens: Tensor, src_lengths: Tensor, enforce_sorted: bool = False):
        pad = src_tokens.eq(self.padding_idx)  # (bsz, srclen)
        lengths = (~pad).sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("structattn_lstm: a source sentence has no token (every position is padding)")
        order = None
        seqlen = src_tokens.size(1)
        if bool(pad.any()):
            # Real tokens first, in order (stable sort): the right-padded view that pack_padded_sequence needs,
            # cut to the longest sentence (the parent asserts that its output is as long as its input).
            order = torch.sort(pad.to(torch.uint8), dim=1, stable=True).indices
            src_tokens = src_tokens.gather(1, order)[:, : int(lengths.max())]
        x, final_hiddens, final_cells, _ = super().forward(src_tokens, lengths, enforce_sorted=enforce_sorted)
        if x.size(0) < seqlen:
            x = torch.cat((x, x.new_zeros(seqlen - x.size(0), x.size(1), x.size(2))), 0)
        if order is not None:
            # Scatter the states back to their original columns: x[t] ↔ src_tokens[:, t] of the caller.
            index = order.t().unsqueeze(2).expand_as(x)
            x = torch.zeros_like(x).scatter(0, index, x)
        x = x.masked_fill(pad.t().unsqueeze(2), 0.0)
        return tuple((x, final_hiddens, final_cells, pad.t()))


class StructAttnLSTMDecoder(LSTMDecoder):
    """fairseq's ``LSTMDecoder`` (input feeding, incremental decoding, beam reordering unchanged) whose attention
    layer is :class:`StructAttnLayer` (softmax, sparsemax or smoothed-Viterbi segmentation attention).

    Attention contract: the returned ``attn`` (bsz, tgt_len, src_len) is indexed like the ``src_tokens`` given to
    the model — column j is the weight of ``src_tokens[:, j]``, exactly 0 on padding columns — for left- and
    right-padded sources alike (unlike fairseq's ``lstm``, whose columns follow its internal right padding).
    As in fairseq, ``attn`` is returned in eval mode only (None while training).
    """

    def __init__(self, *args, attention_type=DEFAULT_ATTENTION, attention_reg=DEFAULT_REG, attention_gamma=None,
                 attention_form=DEFAULT_FORM, attention_contiguity=DEFAULT_CONTIGUITY, **kwargs):
        kwargs["attention"] = True
        super().__init__(*args, **kwargs)
        self.attention = StructAttnLayer(
            self.hidden_size, self.encoder_output_units, self.hidden_size, attention_type, attention_reg,
            attention_gamma, attention_form, attention_contiguity,
        )

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        # Logging reads the counts on the host and calls into fairseq's metrics: outside any compiled graph (the
        # counts keep accumulating in the module's buffers and are logged by the next eager forward).
        if not torch.compiler.is_compiling():
            self._log_attention_metrics()
        return out

    def _log_attention_metrics(self):
        """Log the fallback rate and T/γ of a Viterbi attention (no-op for softmax/sparsemax) into fairseq's
        active metric aggregators: train_inner/train while training, valid during validation. Called once per
        forward (one per batch in training; once per decoder step in incremental decoding, where it only feeds
        fairseq's default aggregator, which nothing prints)."""
        att = self.attention.attention
        if not isinstance(att, ViterbiAttention):
            return
        rows, dead, frozen = att.pop_fallback_counts()
        if rows == 0:
            return
        metrics.log_scalar("attn_fallback", dead / rows, weight=rows, round=4)
        metrics.log_scalar("attn_frozen", frozen / rows, weight=rows, round=4)
        tau = (att.effective_transitions().detach() / att.gamma).cpu().tolist()
        for i in range(2):
            for j in range(2):
                metrics.log_scalar(f"T{i}{j}/g", tau[i][j], weight=0, round=3)


@register_model("structattn_lstm")
class StructAttnLSTMModel(LSTMModel):
    """LSTM encoder-decoder with softmax / sparsemax / smoothed-Viterbi segmentation attention (ICML 2018 §5)."""

    @staticmethod
    def add_args(parser):
        LSTMModel.add_args(parser)
        parser.add_argument(
            "--attention", choices=ATTENTIONS, metavar="{" + ",".join(ATTENTIONS) + "}",
            help="attention layer: softmax (fairseq's bilinear attention), sparsemax (sparse projection of the "
                 "same scores) or viterbi (segmentation attention with smoothed Viterbi marginals, Mensch & "
                 f"Blondel 2018 §5); default: {DEFAULT_ATTENTION}",
        )
        parser.add_argument(
            "--attention-reg", choices=REGULARIZERS, metavar="{" + ",".join(REGULARIZERS) + "}",
            help="regulariser of the smoothed max in the Viterbi attention: entropy (dense, CRF marginals) or l2 "
                 f"(sparse); only used with --attention viterbi; default: {DEFAULT_REG}",
        )
        parser.add_argument(
            "--attention-gamma", type=_positive_float, metavar="FLOAT",
            help="temperature gamma > 0 of the Viterbi attention (smaller is sparser; l2 turns into hard, "
                 "non-differentiable Viterbi when gamma is too small); default: the paper's 2 for entropy, "
                 "10 for l2; only used with --attention viterbi",
        )
        parser.add_argument(
            "--attention-form", choices=VITERBI_FORMS, metavar="{" + ",".join(VITERBI_FORMS) + "}",
            help="parametrisation of the Viterbi attention: stable (scores centred per row, transitions T = "
                 "gamma * tau with a contiguity prior; keeps the scores' level from drifting, so rows neither die nor "
                 "freeze, see structattn.attention) or "
                 f"paper (raw scores, T learned from 0, exactly as in the paper); default: {DEFAULT_FORM}",
        )
        parser.add_argument(
            "--attention-contiguity", type=float, metavar="FLOAT",
            help="stable form only: initial T/gamma = [[c, 0], [0, c]] (staying in a state is worth c*gamma); "
                 f"default: {DEFAULT_CONTIGUITY}",
        )

    @classmethod
    def build_model(cls, args, task):
        check_data_parallel_launch()  # torchrun ranks that fairseq left single-process: fail, naming the fix
        structattn_lstm(args)
        attention, reg, gamma = resolve_attention_args(args)
        if not utils.eval_bool(args.decoder_attention):
            raise ValueError("structattn_lstm always uses attention: do not pass --decoder-attention 0/False")
        # fairseq builds and checks the embeddings (pretrained, frozen, shared); we reuse them and build our own
        # encoder/decoder around them with the same settings.
        base = super().build_model(args, task)
        encoder = StructAttnLSTMEncoder(
            dictionary=task.source_dictionary,
            embed_dim=args.encoder_embed_dim,
            hidden_size=args.encoder_hidden_size,
            num_layers=args.encoder_layers,
            dropout_in=args.encoder_dropout_in,
            dropout_out=args.encoder_dropout_out,
            bidirectional=args.encoder_bidirectional,
            pretrained_embed=base.encoder.embed_tokens,
            max_source_positions=base.encoder.max_source_positions,
        )
        decoder = StructAttnLSTMDecoder(
            dictionary=task.target_dictionary,
            embed_dim=args.decoder_embed_dim,
            hidden_size=args.decoder_hidden_size,
            out_embed_dim=args.decoder_out_embed_dim,
            num_layers=args.decoder_layers,
            dropout_in=args.decoder_dropout_in,
            dropout_out=args.decoder_dropout_out,
            encoder_output_units=encoder.output_units,
            pretrained_embed=base.decoder.embed_tokens,
            share_input_output_embed=args.share_decoder_input_output_embed,
            adaptive_softmax_cutoff=(
                utils.eval_str_list(args.adaptive_softmax_cutoff, type=int)
                if args.criterion == "adaptive_loss"
                else None
            ),
            max_target_positions=base.decoder.max_target_positions,
            attention_type=attention,
            attention_reg=reg,
            attention_gamma=gamma,
            attention_form=args.attention_form,
            attention_contiguity=args.attention_contiguity,
        )
        return cls(encoder, decoder)

    def upgrade_state_dict_named(self, state_dict, name):
        """A checkpoint holds ``transitions`` (paper form, raw T) or ``transitions_over_gamma`` (stable form,
        τ = T/γ). Checkpoints written before the stable form existed record no --attention-form and are built
        with the new default; say how to load them instead of fairseq's bare missing-key error."""
        super().upgrade_state_dict_named(state_dict, name)
        att = self.decoder.attention.attention
        if not isinstance(att, ViterbiAttention):
            return
        prefix = (name + "." if name else "") + "decoder.attention.attention."
        has_paper, has_stable = prefix + "transitions" in state_dict, prefix + "transitions_over_gamma" in state_dict
        if att.form == "stable" and has_paper and not has_stable:
            raise ValueError("this checkpoint's Viterbi attention is in the paper form (raw transitions T, from a "
                             "version before --attention-form existed or trained with --attention-form paper); "
                             "load it with --model-overrides \"{'attention_form': 'paper'}\"")
        if att.form == "paper" and has_stable and not has_paper:
            raise ValueError("this checkpoint's Viterbi attention is in the stable form (transitions_over_gamma); "
                             "load it with --model-overrides \"{'attention_form': 'stable'}\"")


def _attention_defaults(args):
    args.attention = getattr(args, "attention", DEFAULT_ATTENTION)
    args.attention_reg = getattr(args, "attention_reg", DEFAULT_REG)
    args.attention_gamma = getattr(args, "attention_gamma", None)
    args.attention_form = getattr(args, "attention_form", DEFAULT_FORM)
    args.attention_contiguity = getattr(args, "attention_contiguity", DEFAULT_CONTIGUITY)


@register_model_architecture("structattn_lstm", "structattn_lstm")
def structattn_lstm(args):
    """Small, CPU-friendly defaults: 64-dim embeddings, 1-layer bidirectional encoder (2×64), 1-layer decoder (64)."""
    _attention_defaults(args)
    args.dropout = getattr(args, "dropout", 0.1)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_hidden_size = getattr(args, "encoder_hidden_size", args.encoder_embed_dim)
    args.encoder_layers = getattr(args, "encoder_layers", 1)
    args.encoder_bidirectional = getattr(args, "encoder_bidirectional", True)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 64)
    args.decoder_hidden_size = getattr(args, "decoder_hidden_size", args.decoder_embed_dim)
    args.decoder_layers = getattr(args, "decoder_layers", 1)
    args.decoder_out_embed_dim = getattr(args, "decoder_out_embed_dim", 64)
    lstm_base_architecture(args)


@register_model_architecture("structattn_lstm", "structattn_lstm_paper")
def structattn_lstm_paper(args):
    """App. C.3 (OpenNMT-py setting): 2-layer bidirectional LSTM encoder with 500 units per direction, 2-layer
    500-unit decoder with input feeding, 500-dim embeddings, dropout 0.3."""
    _attention_defaults(args)
    args.dropout = getattr(args, "dropout", 0.3)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 500)
    args.encoder_hidden_size = getattr(args, "encoder_hidden_size", 500)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_bidirectional = getattr(args, "encoder_bidirectional", True)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 500)
    args.decoder_hidden_size = getattr(args, "decoder_hidden_size", 500)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_out_embed_dim = getattr(args, "decoder_out_embed_dim", 500)
    structattn_lstm(args)
