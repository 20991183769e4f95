"""Attention export for ``structattn-onmt-translate -dump_attention PATH``.

Writes the dump format of :mod:`structattn.export` (the one ``fairseq-generate --dump-attention`` writes), so
``structattn-stats``, ``structattn-plot`` and ``structattn-report`` read OpenNMT models' attention unchanged.

One record per sentence of ``-src`` and n-best rank (``-n_best``, default 1):

* ``id``: the sentence's 0-based line number in ``-src`` (the order of the ``-output`` file);
* ``src_tokens``: the source tokens the model saw (after OpenNMT's transforms; OpenNMT adds no EOS to the
  source); ``tgt_tokens``: the hypothesis' tokens followed by ``</s>`` when the search ended it with EOS;
* ``attention[i, j]``: the weight target step i put on source token j — the attention the search recorded
  (rows: every predicted token, EOS included; columns: the real source tokens, padding removed);
* ``src_text`` / ``hyp_text``: the tokens with OpenNMT's transforms reversed (as in ``-output``); ``extra``
  holds the token strings (``src_bpe``, ``hyp_bpe``) and, with ``-tgt``, ``ref_text``;
* ``score``: OpenNMT's hypothesis score (log-probability, length-penalised as in the search).

The header records the toolkit, the models' options (``model_args``: every option saved in each checkpoint), the
search options and ``eos_symbol`` ``</s>``. Nothing a reader accepts is left behind by a failed run: the dump is
written to a temporary file and renamed only once every sentence is in it (:class:`structattn.export.DumpWriter`).

The collector is fed by the hooks of ``patches.py`` (``attention export``): OpenNMT translates the input in
buckets, sorts each bucket by length for batching and restores the order with ``ind_in_bucket``; the collector
keeps the translations of the current bucket and writes them in input order when the next bucket starts.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys

import numpy as np
import torch

from structattn.export import AttentionRecord, DumpWriter, plain_options

logger = logging.getLogger(__name__)

EOS = "</s>"  # onmt.constants.DefaultTokens.EOS

#: generation options copied into the header's "generation" (OpenNMT names; "beam" and "nbest" as fairseq's)
GENERATION_KEYS = ("beam_size", "n_best", "min_length", "max_length", "max_length_ratio", "ratio", "alpha", "beta",
                   "length_penalty", "coverage_penalty", "block_ngram_repeat", "replace_unk", "random_sampling_topk",
                   "random_sampling_topp", "random_sampling_temp", "batch_size", "batch_type")


def _plain(opt) -> dict:
    """An option namespace as JSON-friendly values."""
    return plain_options(dict(sorted(vars(opt).items())))


def _strip_specials(tokens) -> list:
    """The reference tokens up to EOS, without padding (OpenNMT's gold sentence can keep both)."""
    out = []
    for tok in tokens:
        tok = str(tok)
        if tok == EOS:
            break
        if tok not in ("<blank>", "<s>"):
            out.append(tok)
    return out


class DumpCollector:
    """Collects the translations of one ``structattn-onmt-translate`` run and writes the dump (module docstring)."""

    def __init__(self, path: str, opt):
        if os.path.isdir(path):
            raise IsADirectoryError(f"-dump_attention {path!r} is a directory; give a file name")
        self.path = path
        self.opt = opt
        self.writer = DumpWriter(path)  # fails now if the destination is not writable
        if os.path.exists(path):
            logger.info("-dump_attention: removing the previous %s (it would outlive a failed run)", path)
            os.unlink(path)
        atexit.register(self.abort)
        self.model_opts: list = []
        self.model_paths: list = []
        self.translator = None
        self.pipe = None
        self.bucket = None
        self.pending: list = []  # (ind_in_bucket, record fields) of the current bucket
        self.next_id = 0
        self.n_sentences = 0
        self.done = False

    # ---- what the hooks report ------------------------------------------------------------------------------

    def add_model(self, model_opt, path) -> None:
        self.model_opts.append(model_opt)
        self.model_paths.append(path)

    def start(self, translator, transform) -> None:
        if self.translator is not None:
            raise RuntimeError("-dump_attention supports one pass over -src")
        self.translator = translator
        from structattn.attention import structure_totals

        model = getattr(translator, "model", None)
        # SparseMAP's active structures per row over this run (structattn-stats' "structures/row")
        self._structures_start = None if model is None else structure_totals(model)
        if transform:
            from onmt.transforms import TransformPipe

            self.pipe = TransformPipe.build_from([transform[name] for name in transform])

    def set_bucket(self, bucket_idx) -> None:
        if bucket_idx != self.bucket:
            self._flush()
            self.bucket = bucket_idx

    def add_translations(self, translations, vocabs) -> None:
        src_vocab = vocabs["src"].ids_to_tokens
        for trans in translations:
            n = int(trans.srclen)
            src_ids = trans.src[:n].tolist() if trans.src is not None else []
            src_tokens = [src_vocab[int(i)] for i in src_ids]
            hyps = []
            for rank, tokens in enumerate(trans.pred_sents):
                att = trans.attns[rank] if rank < len(trans.attns) else None
                if att is None or (isinstance(att, list) and not att):
                    raise RuntimeError("-dump_attention: the search returned no attention for a hypothesis")
                att = att.detach().float().cpu().numpy()
                hyps.append((list(tokens), att, float(trans.pred_scores[rank])))
            ref = _strip_specials(trans.gold_sent) if trans.gold_sent is not None else None
            self.pending.append((int(trans.ind_in_bucket), src_tokens, hyps, ref))

    def translation_done(self) -> None:
        """OpenNMT finished translating ``-src``: write the rest and the footer, rename the dump into place."""
        self._flush()
        if not self.writer.header_written:
            self.writer.write_header(self._metadata())
        summary = {"n_sentences": self.n_sentences, "toolkit": "opennmt-py"}
        per_row = self._structures_per_row()
        if per_row is not None:
            summary["structures_per_row"] = per_row
        self.writer.finalize(summary)
        self.done = True
        logger.info("-dump_attention: wrote %d records for %d sentences to %s", self.writer.n_records,
                    self.n_sentences, self.path)

    def abort(self) -> None:
        if not self.done:
            self.writer.abort()

    # ---- writing --------------------------------------------------------------------------------------------

    def _detok(self, tokens: list) -> str:
        text = " ".join(tokens)
        if self.pipe is not None:
            try:
                text = self.pipe.batch_apply_reverse([text])[0]
            except Exception:  # a transform without a reverse: keep the tokens
                pass
        return text

    def _flush(self) -> None:
        if not self.pending:
            return
        if not self.writer.header_written:
            self.writer.write_header(self._metadata())
        for _, src_tokens, hyps, ref in sorted(self.pending, key=lambda x: x[0]):
            sid = self.next_id
            self.next_id += 1
            self.n_sentences += 1
            extra_common = {"src_bpe": " ".join(src_tokens)}
            if ref is not None:
                extra_common["ref_text"] = self._detok(ref)
            for rank, (tokens, att, score) in enumerate(hyps):
                att = att[:, : len(src_tokens)]
                if att.shape[0] == len(tokens) + 1:
                    tgt_tokens = tokens + [EOS]
                elif att.shape[0] == len(tokens):  # stopped by -max_length before EOS
                    tgt_tokens = list(tokens)
                else:
                    raise RuntimeError(f"-dump_attention: sentence {sid}: {att.shape[0]} attention rows for a "
                                       f"hypothesis of {len(tokens)} tokens")
                extra = dict(extra_common, hyp_bpe=" ".join(tokens))
                self.writer.write(AttentionRecord(
                    id=sid, nbest_rank=rank, src_tokens=src_tokens, tgt_tokens=tgt_tokens,
                    src_text=self._detok(src_tokens), hyp_text=self._detok(tokens),
                    attention=np.ascontiguousarray(att, dtype=np.float32), score=score, extra=extra))
        self.pending = []
        self.writer.flush()

    def _metadata(self) -> dict:
        import onmt

        import structattn

        opt = self.opt
        first = self.model_opts[0] if self.model_opts else None
        gen = {k: getattr(opt, k) for k in GENERATION_KEYS if hasattr(opt, k)}
        gen["beam"] = getattr(opt, "beam_size", None)
        gen["nbest"] = getattr(opt, "n_best", None)
        arch = None
        if first is not None:
            arch = f"onmt_{getattr(first, 'encoder_type', '?')}_{getattr(first, 'decoder_type', '?')}"
            if getattr(first, "decoder_type", None) == "rnn":
                arch += f"_{str(getattr(first, 'rnn_type', '')).lower()}"
        return {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command_line": list(sys.argv),
            "toolkit": "opennmt-py",
            "onmt_version": getattr(onmt, "__version__", None),
            "torch_version": torch.__version__,
            "structattn_version": getattr(structattn, "__version__", None),
            "task": "structattn-onmt-translate",
            "src": getattr(opt, "src", None),
            "tgt": getattr(opt, "tgt", None),
            "models": list(self.model_paths),
            "eos_symbol": EOS,
            "generator": "BeamSearch" if (getattr(opt, "beam_size", 1) or 1) > 1 else "GreedySearch",
            "generation": gen,
            "arch": arch,
            "attention": getattr(first, "global_attention_function", None) if first is not None else None,
            "ensemble_size": len(self.model_opts),
            "model_args": [_plain(o) for o in self.model_opts],
            "layout": "attention[i, j]: target token i (EOS last when the search ended with EOS) x source token j "
                      "(OpenNMT adds no source EOS), padding removed; ensembles: the models' average attention as "
                      "used by OpenNMT's search",
            "couplings": self._couplings(),
        }

    def _structures_per_row(self):
        """Mean active SparseMAP structures per attention row since :meth:`start`, None without SparseMAP."""
        from structattn.attention import structure_totals

        model = getattr(self.translator, "model", None)
        before = getattr(self, "_structures_start", None)
        after = None if model is None else structure_totals(model)
        if before is None or after is None or after[0] == before[0]:
            return None
        return (after[1] - before[1]) / (after[0] - before[0])

    def _couplings(self):
        """The learned transitions and their coupling κ of the translator's model (structattn-stats shows κ)."""
        from structattn.attention import coupling_report

        model = getattr(self.translator, "model", None)
        return None if model is None else [coupling_report(model)]
