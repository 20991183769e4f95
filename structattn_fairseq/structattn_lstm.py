"""fairseq model ``structattn_lstm``: fairseq's LSTM encoder-decoder with a selectable attention layer.

Mensch & Blondel, ICML 2018, §5 and App. C.3: an LSTM encoder-decoder with input feeding whose attention is
softmax, sparsemax, the smoothed-Viterbi segmentation attention or another of :data:`structattn.options.ATTENTIONS`
(:mod:`structattn.attention`, which holds all the maths). This file is glue only: it subclasses ``fairseq.models.lstm`` and replaces nothing but

* the attention layer of the decoder (:class:`StructAttnLayer`), and
* the encoder's padding handling, so that encoder states, the padding mask and therefore the returned attention
  are laid out like the ``src_tokens`` the model was given (fairseq's ``LSTMEncoder`` silently switches left
  padding to right padding, which is why fairseq's own alignment output mis-indexes, fairseq issue #3625).

Options (``fairseq-train --user-dir "$(structattn-user-dir)" --arch structattn_lstm --help`` lists them) and the training metrics a
Viterbi attention logs (``attn_fallback``, ``attn_frozen``, ``T00/g`` …) are shared by every structattn model and
defined once, in :mod:`structattn_fairseq.attention_options`.
"""

from __future__ import annotations

from typing import Optional

import torch
from fairseq import utils
from fairseq.models import register_model, register_model_architecture
from fairseq.models.lstm import DEFAULT_MAX_SOURCE_POSITIONS, DEFAULT_MAX_TARGET_POSITIONS, Embedding, Linear
from fairseq.models.lstm import LSTMDecoder, LSTMEncoder, LSTMModel
from fairseq.models.lstm import base_architecture as lstm_base_architecture
from torch import Tensor, nn

from structattn.attention import ViterbiAttention

from .attention_options import (AttentionOptions, add_attention_args, add_temperature_arg, attention_defaults,
                                build_from_options, check_transition_keys, log_attention_metrics, resolve_attention_args)
from .distributed import check_data_parallel_launch


class StructAttnLayer(nn.Module):
    """Drop-in replacement for ``fairseq.models.lstm.AttentionLayer``: same call and output, any attention.

    ``forward(input, source_hids, encoder_padding_mask)`` with input (bsz, d_z), source_hids (srclen, bsz, d_x),
    encoder_padding_mask (srclen, bsz) bool → (tanh(W_out [context; input]) (bsz, d_out), weights (srclen, bsz)).
    """

    def __init__(self, input_embed_dim: int, source_embed_dim: int, output_embed_dim: int,
                 options: AttentionOptions):
        super().__init__()
        # The attribute name is part of the checkpoint format (decoder.attention.attention.*).
        self.attention = build_from_options(options, input_embed_dim, source_embed_dim)
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
    layer is :class:`StructAttnLayer` (any attention of :data:`structattn.options.ATTENTIONS`).

    Attention contract: the returned ``attn`` (bsz, tgt_len, src_len) is indexed like the ``src_tokens`` given to
    the model — column j is the weight of ``src_tokens[:, j]``, exactly 0 on padding columns — for left- and
    right-padded sources alike (unlike fairseq's ``lstm``, whose columns follow its internal right padding).
    As in fairseq, ``attn`` is returned in eval mode only (None while training).
    """

    def __init__(self, *args, attention: AttentionOptions, **kwargs):
        # fairseq's ``attention`` is a bool that builds its own AttentionLayer; ours is the attention options, and
        # the parent is built without an attention layer so that nothing is built to be thrown away.
        super().__init__(*args, attention=False, **kwargs)
        self.attention = StructAttnLayer(self.hidden_size, self.encoder_output_units, self.hidden_size, attention)
        # Registered where fairseq's AttentionLayer sits (right after the LSTM layers), so that the parameter order,
        # which fairseq's optimizer state in checkpoints is indexed by, is that of fairseq's LSTMDecoder.
        order = [name for name in self._modules if name != "attention"]
        order.insert(order.index("layers") + 1, "attention")
        modules = dict(self._modules)
        self._modules.clear()
        self._modules.update((name, modules[name]) for name in order)

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if not torch.compiler.is_compiling():
            log_attention_metrics(self.attention.attention)
        return out


@register_model("structattn_lstm")
class StructAttnLSTMModel(LSTMModel):
    """LSTM encoder-decoder with any attention of :data:`structattn.options.ATTENTIONS` (softmax, sparsemax, the
    smoothed-Viterbi segmentation attention of ICML 2018 §5, fusedmax, oscarmax, 1.5-entmax, SparseMAP)."""

    @staticmethod
    def add_args(parser):
        LSTMModel.add_args(parser)
        add_attention_args(parser)
        add_temperature_arg(parser)

    @classmethod
    def build_model(cls, args, task):
        check_data_parallel_launch()  # torchrun ranks that fairseq left single-process: fail, naming the fix
        structattn_lstm(args)
        options = resolve_attention_args(args)
        if not utils.eval_bool(args.decoder_attention):
            raise ValueError("structattn_lstm always uses attention: do not pass --decoder-attention 0/False")
        encoder_embed, decoder_embed = _build_embeddings(args, task)
        encoder = StructAttnLSTMEncoder(
            dictionary=task.source_dictionary,
            embed_dim=args.encoder_embed_dim,
            hidden_size=args.encoder_hidden_size,
            num_layers=args.encoder_layers,
            dropout_in=args.encoder_dropout_in,
            dropout_out=args.encoder_dropout_out,
            bidirectional=args.encoder_bidirectional,
            pretrained_embed=encoder_embed,
            max_source_positions=getattr(args, "max_source_positions", DEFAULT_MAX_SOURCE_POSITIONS),
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
            pretrained_embed=decoder_embed,
            share_input_output_embed=args.share_decoder_input_output_embed,
            adaptive_softmax_cutoff=(
                utils.eval_str_list(args.adaptive_softmax_cutoff, type=int)
                if args.criterion == "adaptive_loss"
                else None
            ),
            max_target_positions=getattr(args, "max_target_positions", DEFAULT_MAX_TARGET_POSITIONS),
            attention=options,
        )
        if args.encoder_freeze_embed:
            encoder.embed_tokens.weight.requires_grad = False
        if args.decoder_freeze_embed:  # also the table LSTMDecoder built (fairseq 0.12 fails on that case)
            decoder.embed_tokens.weight.requires_grad = False
        return cls(encoder, decoder)

    def upgrade_state_dict_named(self, state_dict, name):
        """A checkpoint holds ``transitions`` (paper form, raw T) or ``transitions_over_gamma`` (stable form,
        τ = T/γ). Checkpoints written before the stable form existed record no --attention-form and are built
        with the new default; say how to load them instead of fairseq's bare missing-key error."""
        super().upgrade_state_dict_named(state_dict, name)
        att = self.decoder.attention.attention
        if not isinstance(att, ViterbiAttention):
            return
        check_transition_keys(state_dict, (name + "." if name else "") + "decoder.attention.attention.", att.form)


def _build_embeddings(args, task) -> tuple[nn.Embedding, Optional[nn.Embedding]]:
    """The encoder's and (when shared or pretrained) the decoder's input embeddings, with the checks and options of
    fairseq's ``LSTMModel.build_model`` (fairseq 0.12): --encoder/--decoder-embed-path (pretrained vectors),
    --share-all-embeddings (one table, a joint dictionary). ``None`` for the decoder lets ``LSTMDecoder`` build its
    own table, as fairseq does; --encoder/--decoder-freeze-embed are applied to the built model."""
    if args.encoder_layers != args.decoder_layers:
        raise ValueError("--encoder-layers must match --decoder-layers")

    def table(dictionary, dim: int, path: Optional[str]) -> nn.Embedding:
        embed = Embedding(len(dictionary), dim, dictionary.pad())
        if path:
            vectors = utils.parse_embedding(path)
            utils.print_embed_overlap(vectors, dictionary)
            embed = utils.load_embedding(vectors, dictionary, embed)
        return embed

    encoder_embed = table(task.source_dictionary, args.encoder_embed_dim, args.encoder_embed_path)
    decoder_embed = None
    if args.share_all_embeddings:
        if task.source_dictionary != task.target_dictionary:
            raise ValueError("--share-all-embeddings requires a joint dictionary")
        if args.decoder_embed_path and args.decoder_embed_path != args.encoder_embed_path:
            raise ValueError("--share-all-embed not compatible with --decoder-embed-path")
        if args.encoder_embed_dim != args.decoder_embed_dim:
            raise ValueError("--share-all-embeddings requires --encoder-embed-dim to match --decoder-embed-dim")
        decoder_embed = encoder_embed
        args.share_decoder_input_output_embed = True
    elif args.decoder_embed_path:
        decoder_embed = table(task.target_dictionary, args.decoder_embed_dim, args.decoder_embed_path)
    if args.share_decoder_input_output_embed and args.decoder_embed_dim != args.decoder_out_embed_dim:
        raise ValueError("--share-decoder-input-output-embeddings requires --decoder-embed-dim to match "
                         "--decoder-out-embed-dim")
    return encoder_embed, decoder_embed


@register_model_architecture("structattn_lstm", "structattn_lstm")
def structattn_lstm(args):
    """Small, CPU-friendly defaults: 64-dim embeddings, 1-layer bidirectional encoder (2×64), 1-layer decoder (64)."""
    attention_defaults(args)
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
    attention_defaults(args)
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
