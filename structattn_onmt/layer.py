"""The attention layer that OpenNMT-py's RNN decoders get from ``structattn-onmt-train``.

:class:`StructuredGlobalAttention` is OpenNMT's ``GlobalAttention`` (Luong et al. 2015: scores, context
c = Σ_t w_t h_t, output tanh(W_out [c; q])) whose weights w come from :mod:`structattn.attention` instead of
OpenNMT's softmax/sparsemax:

* ``global_attention general`` (OpenNMT's default): the whole scoring-and-normalising step is the library's
  module (``SoftmaxAttention`` / ``SparsemaxAttention`` / ``ViterbiAttention`` / ``FusedmaxAttention`` / …, built by
  :func:`structattn.options.build_from_options` exactly as the fairseq plugin builds it). Its bilinear form
  M = ``attention.proj`` takes the place of OpenNMT's ``linear_in`` (s_t = h_t·(M q), the same "general" score),
  and the Viterbi transitions are parameters of that module, so both are in the checkpoint
  (``decoder.attn.attention.proj.weight``, ``decoder.attn.attention.transitions_over_gamma`` or
  ``…transitions``, the latter also SparseMAP's T). M and T keep the library's initialisation (restored after
  OpenNMT's ``-param_init``, see ``patches.py``).
* ``global_attention dot`` / ``mlp`` with the attentions without a chain (softmax, sparsemax, fusedmax, oscarmax,
  entmax15): OpenNMT's scores, the library's normalisers (:class:`structattn.attention.HeadNormalizer`'s
  functions). The Viterbi and SparseMAP attentions need the bilinear score (``general``); other combinations are
  refused when the model is built.

Padding: OpenNMT pads sources on the right and passes their lengths; the layer turns them into the library's
``padding_mask`` (True at padding), so padded positions get weight exactly 0 and a sentence gets the same weights
alone or in a padded batch (the Viterbi chain runs over the real positions only). Nothing of the maths is
re-implemented here.

The layer returns its weights batch-major, ``(batch, tgt_len, src_len)`` (``(batch, src_len)`` for one step),
like OpenNMT's own layer; the RNN decoder stacks the per-step weights of input feeding time-major, which
``patches.py`` corrects (``attention layout``).
"""

from __future__ import annotations

import torch
from onmt.modules.global_attention import GlobalAttention
from onmt.utils.misc import sequence_mask
from torch import Tensor

from structattn.attention import HeadNormalizer
from structattn.options import AttentionOptions, build_from_options

__all__ = ["StructuredGlobalAttention"]

ATTN_TYPES = ("dot", "general", "mlp")


class StructuredGlobalAttention(GlobalAttention):
    """OpenNMT's global attention with the library's attention weights (module docstring).

    Args:
        dim: size of the decoder states and of the (bidirectional-concatenated) encoder states.
        options: the validated attention options (:func:`structattn_onmt.options.options_from_opt`).
        coverage: OpenNMT's coverage term; not supported (refused).
        attn_type: ``general`` (default, any attention), ``dot`` or ``mlp`` (not Viterbi nor SparseMAP).
        attn_func: OpenNMT's ``global_attention_function``; must equal ``options.attention``.
    """

    def __init__(self, dim: int, options: AttentionOptions, coverage: bool = False, attn_type: str = "general",
                 attn_func: str = "softmax"):
        if coverage:
            raise ValueError("structattn-onmt: -coverage_attn is not supported with the structattn attention layer")
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"structattn-onmt: -global_attention must be one of {', '.join(ATTN_TYPES)}; "
                             f"got {attn_type!r}")
        if attn_func != options.attention:
            raise ValueError(f"attention function {attn_func!r} differs from the options' {options.attention!r}")
        if options.attention in ("viterbi", "sparsemap") and attn_type != "general":
            raise ValueError(f"structattn-onmt: -global_attention_function {options.attention} needs -global_attention "
                             f"general (the bilinear score s_t = h_t . M q of the paper); got -global_attention "
                             f"{attn_type}")
        # OpenNMT's constructor builds linear_out (and, for mlp, its scoring layers); it only accepts its own two
        # functions, so it is given "softmax" and the real one is set afterwards.
        super().__init__(dim, coverage=False, attn_type=attn_type, attn_func="softmax")
        self.attn_func = attn_func
        self.options = options
        if attn_type == "general":
            del self.linear_in  # M is the library module's `proj` (see the `linear_in` property)
            self.attention = build_from_options(options, dim, dim)
            self.rows = None
        else:
            self.attention = None
            # the library's normaliser of OpenNMT's scores, applied to (N, S) rows as one (N, 1, 1, S) "head" each
            self.rows = HeadNormalizer(options.attention, options.lam)

    @property
    def linear_in(self):
        """OpenNMT's ``score()`` applies ``linear_in`` for the "general" score: here it is the library's M."""
        return self.attention.proj

    def reset_attention_parameters(self) -> None:
        """Give M and the transitions the library's initialisation again (a fresh module's values): OpenNMT
        re-initialises every parameter of a new model uniformly (``-param_init``), which would erase the stable
        form's contiguity prior and the scale of M that keeps ℓ2 out of its zero-gradient regime."""
        if self.attention is None:
            return
        fresh = build_from_options(self.options, self.dim, self.dim)
        with torch.no_grad():
            for name, p in self.attention.named_parameters():
                p.copy_(dict(fresh.named_parameters())[name])

    def normalize(self, scores: Tensor, padding_mask: Tensor | None) -> Tensor:
        """(N, S) scores → (N, S) weights, exactly 0 on padding."""
        if self.attention is not None:
            return self.attention.normalize(scores, padding_mask)
        mask = None if padding_mask is None else padding_mask[:, None, None, :]
        return self.rows(scores[:, None, None, :], mask).view(scores.shape)

    def forward(self, src, enc_out, src_len=None, coverage=None):
        """OpenNMT's interface: ``src`` queries (batch, tgt_len, dim) or (batch, dim), ``enc_out`` (batch,
        src_len, dim), ``src_len`` (batch,) lengths → (attentional outputs, weights), batch-major."""
        if coverage is not None:
            raise ValueError("structattn-onmt: coverage attention is not supported")
        one_step = src.dim() == 2
        if one_step:
            src = src.unsqueeze(1)
        batch, s_len, _ = enc_out.size()
        _, t_len, _ = src.size()
        scores = self.score(src, enc_out)  # (batch, t_len, s_len), M = attention.proj for "general"
        mask = None
        if src_len is not None:
            mask = sequence_mask(src_len, max_len=s_len)  # True at padding (OpenNMT 3.x convention)
            mask = mask.unsqueeze(1).expand(batch, t_len, s_len).reshape(batch * t_len, s_len)
        weights = self.normalize(scores.reshape(batch * t_len, s_len), mask).view(batch, t_len, s_len)
        context = torch.bmm(weights.to(enc_out.dtype), enc_out)
        concat = torch.cat([context, src], 2).view(batch * t_len, self.dim * 2)
        attn_h = self.linear_out(concat).view(batch, t_len, self.dim)
        if self.attn_type in ("general", "dot"):
            attn_h = torch.tanh(attn_h)
        if one_step:
            attn_h = attn_h.squeeze(1)
            weights = weights.squeeze(1)
        return attn_h, weights

    def extra_repr(self) -> str:
        o = self.options
        r = f"dim={self.dim}, attn_type={self.attn_type!r}, attention={o.attention!r}"
        if o.attention == "viterbi":
            r += f", reg={o.reg!r}, gamma={o.gamma}, form={o.form!r}"
        if o.lam is not None and o.attention in ("fusedmax", "oscarmax"):
            r += f", lam={o.lam}"
        return r
