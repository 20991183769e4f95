"""fairseq model ``structattn_transformer``: fairseq's Transformer whose encoder-decoder attention normalises its
scores with any attention of :data:`structattn.options.ATTENTIONS` (softmax, sparsemax, the smoothed-Viterbi
segmentation attention, fusedmax, oscarmax, 1.5-entmax, SparseMAP), per head (see docs/transformer.md).

Mensch & Blondel, ICML 2018, §5 apply the segmentation attention to an LSTM (App. C.3, ``structattn_lstm``); here
the same normalisers (:mod:`structattn.attention`, which holds all the maths) replace the softmax of every decoder
layer's encoder-decoder attention, independently for each head: head h of a layer turns its scaled dot products
s_t = q·k_t/√d into weights over the source with its own chain (one learned 2×2 transition matrix per head and
layer, :class:`structattn.attention.ViterbiNormalizer`; SparseMAP likewise, :class:`~structattn.attention.
SparsemapNormalizer`; the others per head row, :class:`~structattn.attention.HeadNormalizer`). Self-attention (encoder and decoder) stays softmax. This
file is glue only: it subclasses fairseq 0.12's Transformer and replaces nothing but

* the encoder-decoder attention module (:class:`StructAttnEncoderAttention`, a ``MultiheadAttention`` that keeps
  the parent's projections, its static key/value cache for incremental decoding and its beam handling and swaps
  only the softmax over the source positions),
* the decoder layer and decoder that build it (:class:`StructAttnTransformerDecoderLayer`,
  :class:`StructAttnTransformerDecoder`), which also log the Viterbi training metrics and choose the attention that
  generation returns (``--print-alignment``, ``--dump-attention``).

Options are those of fairseq's ``transformer`` plus the ``--attention*`` flags every structattn model shares
(:mod:`structattn_fairseq.attention_options`). With ``--attention softmax`` the model computes what fairseq's ``transformer``
computes, with the same parameter names (its checkpoints load into it).
"""

from __future__ import annotations

from typing import Optional

import torch
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerModel
from fairseq.models.transformer import base_architecture as transformer_base_architecture
from fairseq.models.transformer import transformer_iwslt_de_en as fairseq_transformer_iwslt_de_en
from fairseq.modules import MultiheadAttention
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from torch import Tensor, nn

from structattn.attention import SparsemapNormalizer, ViterbiNormalizer
from structattn.options import DEFAULT_GAMMA_MODE, GAMMA_MODES

from .attention_options import (AttentionOptions, add_attention_args, attention_defaults, build_normalizer,
                                check_transition_keys, log_attention_metrics, resolve_attention_args)
from .distributed import check_data_parallel_launch

#: values of :meth:`StructAttnTransformerDecoder.set_attention_export`'s ``heads``
EXPORT_HEADS = ("mean", "all")
#: --attention-transitions: one Viterbi transition matrix per head, or one per layer shared by its heads
TRANSITIONS = ("head", "layer")
DEFAULT_TRANSITIONS = "head"
# --attention-gamma-mode: the values and the default are structattn.options' (GAMMA_MODES, DEFAULT_GAMMA_MODE)


class StructAttnEncoderAttention(MultiheadAttention):
    """fairseq's encoder-decoder ``MultiheadAttention`` with the softmax over source positions replaced, per head,
    by the normaliser of ``options.attention`` (:mod:`structattn.attention`).

    The parent computes the projections, the scaled scores q·k/√d of every head (``before_softmax=True``) — with the
    key/value cache of incremental decoding and the shared keys of beams — and fills the padded source positions
    with −inf. This class normalises each (sentence, head, target position) row over the real positions (the
    Viterbi chain runs over them only, whatever the padding side; in float32 for half-precision models), then
    applies fairseq's attention dropout, the weighted sum of the values and the output projection as the parent
    does. The keys are the encoder states: always static (``static_kv=True``, which also keeps fairseq's fused
    softmax path, ``F.multi_head_attention_forward``, from ever being taken). Returned weights: (bsz, tgt, src)
    averaged over heads, or (heads, bsz, tgt, src) with ``need_head_weights``, as fairseq's.
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int, vdim: int, dropout: float, q_noise: float,
                 qn_block_size: int, options: AttentionOptions, per_head_transitions: bool = True):
        super().__init__(embed_dim, num_heads, kdim=kdim, vdim=vdim, dropout=dropout, encoder_decoder_attention=True,
                         q_noise=q_noise, qn_block_size=qn_block_size)
        self.attention = options.attention  # the attention kind, as --attention names it
        # Parameters of fairseq's MultiheadAttention, plus (Viterbi) ``normalizer.transitions[_over_gamma]`` or
        # (SparseMAP) ``normalizer.transitions``, (heads, 2, 2) or, shared by the heads, (1, 2, 2); the other
        # normalisers have no parameter (a softmax model's state dict is fairseq's transformer's).
        self.normalizer: nn.Module = build_normalizer(options, num_heads if per_head_transitions else 1)

    def normalize(self, scores: Tensor, padding_mask: Tensor) -> Tensor:
        """scores (bsz, heads, tgt, src) (float32 or float64) and padding_mask (bsz, heads, tgt, src) bool →
        weights of the scores' shape and dtype."""
        return self.normalizer(scores, padding_mask)

    def forward(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                key_padding_mask: Optional[Tensor] = None, incremental_state=None, need_weights: bool = True,
                static_kv: bool = False, attn_mask: Optional[Tensor] = None, before_softmax: bool = False,
                need_head_weights: bool = False):
        if attn_mask is not None:
            raise ValueError("the encoder-decoder attention takes no attn_mask (padding goes in key_padding_mask)")
        scores, v = super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                    incremental_state=incremental_state, need_weights=False, static_kv=True,
                                    before_softmax=True)
        if before_softmax:
            return scores, v
        tgt_len, bsz, embed_dim = query.size()
        heads, src_len = self.num_heads, scores.size(-1)
        # (bsz·heads, tgt, src) → (bsz, heads, tgt, src); with shared beam keys (bsz = kv_bsz·beam) the rows are
        # ordered (sentence, beam, head), so the view holds too. The parent filled exactly the key padding
        # (cached and beam-reduced as it keeps it) with −inf: that is the padding mask of every row.
        scores = scores.view(bsz, heads, tgt_len, src_len)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # normalise (and run the Viterbi chain) in float32, as fairseq's softmax
        weights = self.normalize(scores, torch.isneginf(scores))
        probs = self.dropout_module(weights.type_as(v))
        # The rest of the parent's forward: weighted sum of the values, heads concatenated, output projection.
        kv_bsz = v.size(0) // heads
        if bsz != kv_bsz:  # each sentence's keys shared by its beam hypotheses
            attn = torch.einsum("bxhts,bhsd->bxhtd", probs.view(kv_bsz, -1, heads, tgt_len, src_len),
                                v.view(kv_bsz, heads, src_len, self.head_dim))
            attn = attn.reshape(bsz * heads, tgt_len, self.head_dim)
        else:
            attn = torch.bmm(probs.view(bsz * heads, tgt_len, src_len), v)
        attn = self.out_proj(attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim))
        if not (need_weights or need_head_weights):
            return attn, None
        weights = weights.transpose(1, 0)  # (heads, bsz, tgt, src)
        return attn, (weights if need_head_weights else weights.mean(dim=0))


class StructAttnTransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's decoder layer with :class:`StructAttnEncoderAttention` as ``encoder_attn``.

    ``pack_head_weights`` (set by :meth:`StructAttnTransformerDecoder.set_attention_export`): when the layer
    returns per-head weights (heads, bsz, tgt, src) it returns them as (1, bsz, tgt, heads·src) instead — column
    h·src + j is head h on source position j — so that fairseq's decoder (which averages dim 0) and its sequence
    generator (which keeps, reorders and returns one (bsz, tgt, ·) attention per hypothesis) carry every head
    through beam search unchanged."""

    def __init__(self, cfg, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        self.pack_head_weights = False

    def build_encoder_attention(self, embed_dim, cfg):
        return StructAttnEncoderAttention(
            embed_dim, cfg.decoder.attention_heads, kdim=cfg.encoder.embed_dim, vdim=cfg.encoder.embed_dim,
            dropout=cfg.attention_dropout, q_noise=self.quant_noise, qn_block_size=self.quant_noise_block_size,
            options=resolve_attention_args(cfg),
            per_head_transitions=getattr(cfg, "attention_transitions", DEFAULT_TRANSITIONS) == "head",
        )

    def forward(self, *args, **kwargs):
        x, attn, state = super().forward(*args, **kwargs)
        if self.pack_head_weights and attn is not None and attn.dim() == 4:
            heads, bsz, tgt_len, src_len = attn.shape
            attn = attn.permute(1, 2, 0, 3).reshape(1, bsz, tgt_len, heads * src_len)
        return x, attn, state


class StructAttnTransformerDecoder(TransformerDecoderBase):
    """fairseq's Transformer decoder built from :class:`StructAttnTransformerDecoderLayer`.

    Attention contract (as fairseq's Transformer): the returned ``attn`` (bsz, tgt, src) is the encoder-decoder
    attention of the alignment layer (default: the last layer, or the one chosen with :meth:`set_attention_export`)
    averaged over its heads, indexed like ``src_tokens`` (left- or right-padded) and exactly 0 on padding.
    """

    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn,
                         output_projection=output_projection)
        self.export_layer: Optional[int] = None  # None: fairseq's default alignment layer, the last

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        layer = StructAttnTransformerDecoderLayer(cfg, no_encoder_attn)
        # The wrapping of TransformerDecoderBase.build_decoder_layer (fairseq 0.12), around our layer class.
        checkpoint = cfg.checkpoint_activations
        if checkpoint:
            layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
        min_params_to_wrap = cfg.min_params_to_wrap if not checkpoint else 0
        return fsdp_wrap(layer, min_num_params=min_params_to_wrap)

    def normalizers(self) -> list:
        """The normalisers with a chain (Viterbi, SparseMAP) of the layers, first to last (empty for the others)."""
        return [m for m in self.modules() if isinstance(m, (ViterbiNormalizer, SparsemapNormalizer))]

    def set_attention_export(self, layer: Optional[int] = None, heads: str = "mean") -> None:
        """Choose the attention the decoder returns (``extra["attn"]``, so ``hypo["attention"]`` and
        ``--print-alignment``): the encoder-decoder attention of decoder layer ``layer`` (0-based; negative counts
        from the end; None: the last) averaged over heads (``heads="mean"``, fairseq's convention) or every head
        packed as (bsz, tgt, heads·src) (``heads="all"``, see :class:`StructAttnTransformerDecoderLayer`)."""
        if heads not in EXPORT_HEADS:
            raise ValueError(f"heads must be one of {EXPORT_HEADS}, got {heads!r}")
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, int) or not -self.num_layers <= layer < self.num_layers:
                raise ValueError(f"the decoder has {self.num_layers} layers (0 … {self.num_layers - 1}, or negative "
                                 f"from the end); got layer {layer!r}")
            layer %= self.num_layers
        self.export_layer = layer
        for module in self.modules():
            if isinstance(module, StructAttnTransformerDecoderLayer):
                module.pack_head_weights = heads == "all"

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                         full_context_alignment: bool = False, alignment_layer: Optional[int] = None,
                         alignment_heads: Optional[int] = None):
        if alignment_layer is None:
            alignment_layer = self.export_layer
        return super().extract_features(prev_output_tokens, encoder_out, incremental_state, full_context_alignment,
                                        alignment_layer, alignment_heads)

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if not torch.compiler.is_compiling():
            # pooled over layers and heads: one attn_fallback / attn_frozen and the mean T/γ (docs/transformer.md)
            log_attention_metrics(self.normalizers())
        return out


@register_model("structattn_transformer")
class StructAttnTransformerModel(TransformerModel):
    """Transformer (Vaswani et al. 2017) whose encoder-decoder attention is softmax, sparsemax, the smoothed-Viterbi
    segmentation attention (Mensch & Blondel 2018 §5), fusedmax, oscarmax, 1.5-entmax or SparseMAP, per head."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_attention_args(parser)
        parser.add_argument(
            "--attention-transitions", choices=TRANSITIONS, metavar="{" + ",".join(TRANSITIONS) + "}",
            help="Viterbi and SparseMAP attention only: one transition matrix T per head of each decoder layer (head) "
                 f"or one per layer shared by its heads (layer); default: {DEFAULT_TRANSITIONS} (docs/transformer.md)")
        parser.add_argument(
            "--attention-gamma-mode", choices=GAMMA_MODES, metavar="{" + ",".join(GAMMA_MODES) + "}",
            help="Viterbi attention only: fixed (one temperature gamma, --attention-gamma, for every head, as in the "
                 "paper), learned (one learned log gamma per transition matrix, i.e. per head, starting at "
                 "--attention-gamma) or scaled (the same, starting at --attention-gamma times the head's score "
                 "scale on the first training batch; default gamma then 1); learned and scaled depart from the paper "
                 f"for the O(1) scale of q.k/sqrt(d); default: {DEFAULT_GAMMA_MODE} (docs/transformer.md)")

    @classmethod
    def build_model(cls, args, task):
        check_data_parallel_launch()  # torchrun ranks that fairseq left single-process: fail, naming the fix
        _transformer_attention_defaults(args)
        resolve_attention_args(args)  # validates; fills the paper's γ into args (recorded in the checkpoint)
        if args.attention_transitions not in TRANSITIONS:
            raise ValueError(f"--attention-transitions must be one of {', '.join(TRANSITIONS)}; got "
                             f"{args.attention_transitions!r}")
        if getattr(args, "no_cross_attention", False):
            raise ValueError("structattn_transformer replaces the encoder-decoder attention: do not pass "
                             "--no-cross-attention")
        if getattr(args, "encoder_xformers_att_config", None):  # fairseq would use it for the cross attention too
            raise ValueError("structattn_transformer: --encoder-xformers-att-config would replace the "
                             "encoder-decoder attention, whose normaliser is --attention; remove it")
        return super().build_model(args, task)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        # ``args`` is fairseq's TransformerConfig here; it carries the --attention* values (from_namespace copies
        # the options it does not know), which each layer reads in build_encoder_attention.
        cfg = TransformerConfig.from_namespace(args)
        return StructAttnTransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        prefix = (name + "." if name else "") + "decoder."
        for full_name, module in self.decoder.named_modules():
            if isinstance(module, ViterbiNormalizer):
                check_transition_keys(state_dict, f"{prefix}{full_name}.", module.form)


# ---- architectures ---------------------------------------------------------------------------------------------------


def _transformer_attention_defaults(args) -> None:
    """The shared --attention* defaults and those of --attention-transitions and --attention-gamma-mode."""
    attention_defaults(args)
    args.attention_transitions = getattr(args, "attention_transitions", DEFAULT_TRANSITIONS)
    # checkpoints written before the option existed record none: fixed, the γ they were trained with
    args.attention_gamma_mode = getattr(args, "attention_gamma_mode", DEFAULT_GAMMA_MODE)


@register_model_architecture("structattn_transformer", "structattn_transformer")
def structattn_transformer(args):
    """fairseq's ``transformer`` (base: 6+6 layers, 512-dim, 2048 FFN, 8 heads, dropout 0.1) with the structattn
    attention defaults (Viterbi, entropy, stable form) and one transition matrix per head."""
    _transformer_attention_defaults(args)
    transformer_base_architecture(args)


@register_model_architecture("structattn_transformer", "structattn_transformer_iwslt_de_en")
def structattn_transformer_iwslt_de_en(args):
    """fairseq's ``transformer_iwslt_de_en``: 6+6 layers, 512-dim, 1024 FFN, 4 heads."""
    _transformer_attention_defaults(args)
    fairseq_transformer_iwslt_de_en(args)


@register_model_architecture("structattn_transformer", "structattn_transformer_tiny")
def structattn_transformer_tiny(args):
    """CPU-sized for tests and toy runs: 2+2 layers, 32-dim, 64 FFN, 4 heads, dropout 0.1."""
    _transformer_attention_defaults(args)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 32)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 64)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    transformer_base_architecture(args)
