"""OpenNMT-py glue for structattn: softmax / sparsemax / smoothed-Viterbi attention in OpenNMT's RNN decoders,
without a fork.

* ``structattn-onmt-train`` / ``structattn-onmt-translate`` (:mod:`structattn_onmt.cli`): OpenNMT-py's
  ``onmt_train`` / ``onmt_translate`` with the same arguments and YAML configs, plus
  ``global_attention_function: viterbi``, ``attention_reg``, ``attention_gamma``, ``attention_form``,
  ``attention_contiguity``, ``attention_chain`` (:mod:`structattn_onmt.options`) and ``-dump_attention PATH``
  (:mod:`structattn_onmt.dump`). Vocabularies come from OpenNMT's own ``onmt_build_vocab``.
* :mod:`structattn_onmt.layer`: the attention layer (OpenNMT's ``GlobalAttention`` with the weights of
  :mod:`structattn.attention`).
* :mod:`structattn_onmt.patches`: every change to OpenNMT-py's behaviour, each with what OpenNMT does, why we
  change it and the version checked (OpenNMT-py 3.5.1); installed by :func:`install`.

Install OpenNMT-py next to torch 2.13 with ``bash scripts/install_onmt.sh`` (OpenNMT-py 3.5.1 declares
``torch<2.3``). Importing this package does not import OpenNMT; ``structattn`` itself never imports it.
Guide: docs/onmt.md.
"""

from __future__ import annotations

__all__ = ["install"]


def install() -> None:
    """Install the OpenNMT-py patches (:mod:`structattn_onmt.patches`); idempotent."""
    from .patches import install as _install

    _install()
