"""Task ``structattn_translation``: fairseq's translation task plus ``--dump-attention PATH``.

With ``fairseq-generate --user-dir "$(structattn-user-dir)" --task structattn_translation --dump-attention PATH`` every
translated sentence's n-best hypotheses (``--nbest``, default 1) are written with their full attention matrix
to ``PATH`` in the format of :mod:`structattn.export` (read it with ``structattn.export.read_dump``). Without
the flag the task is exactly fairseq's ``translation`` (a checkpoint trained with ``--task translation``
generates with this task unchanged).

Column layout. The exporter relies on the attention contract of ``structattn_lstm``: the decoder's ``attn``
(bsz, tgt_len, src_len) is indexed like ``src_tokens`` (left- or right-padded, as the task pads) and is exactly
0 on padding columns. So fairseq's ``hypo["attention"]`` (src_len × tgt_len) columns are ``src_tokens``
positions, and dropping the columns where ``src_tokens == pad`` gives the matrix over the real source tokens.
fairseq's built-in ``lstm`` breaks that contract for left-padded sources (its encoder right-pads internally,
fairseq issue #3625): the dump is then misaligned. This is not patched here; instead every record stores the
attention mass found on padding columns (``extra.pad_mass``), a warning is logged when it is not 0, and the
footer summary records ``max_pad_mass``. (With ``--left-pad-source False`` the built-in ``lstm`` is consistent.)

Multi-head models (``structattn_transformer``). The dumped attention is the encoder-decoder attention of one decoder
layer — ``--dump-attention-layer`` (0-based, negative from the end; default: the last, the layer
``--print-alignment`` uses) — averaged over its heads, fairseq's alignment convention; ``--dump-attention-heads all``
also writes every head (records' ``heads``, see :mod:`structattn.export`; the model then returns the heads packed
side by side, so beam search reorders them with the hypotheses). The header records ``attention_layer``,
``attention_heads`` and ``num_heads``. Models with a single attention (``structattn_lstm``) refuse both options, and
their dumps are exactly what they were before these options existed.

End of the run. fairseq-generate has no end-of-run hook; this task wraps the batch iterator that
``get_batch_iterator`` returns. When that iterator is exhausted, fairseq-generate has run ``inference_step`` on
every batch it yielded (its loop asks for the next batch only after finishing the current one), so the dump is
finalised there, after checking that every sentence id of every yielded batch was dumped. A run that dies
before (exception, Ctrl-C, SIGKILL) never renames the temporary file onto PATH; Python-level failures also
delete it (atexit), so nothing a reader accepts is left. A stale PATH from an earlier run is removed when the
new run starts, so a failed run cannot leave an older complete dump that looks like its output.
"""

# no `from __future__ import annotations`: fairseq reads the dataclass field types at runtime
import atexit
import datetime
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from structattn.export import AttentionRecord, DumpWriter, plain_options

logger = logging.getLogger(__name__)

PAD_MASS_TOLERANCE = 1e-6
DUMP_HEADS = ("mean", "all")


@dataclass
class StructAttnTranslationConfig(TranslationConfig):
    dump_attention: Optional[str] = field(
        default=None,
        metadata={
            "help": "fairseq-generate only: write every n-best hypothesis' full attention matrix (target x source "
            "tokens, EOS included) to this file (structattn attention dump, JSON Lines; read with "
            "structattn.export.read_dump). Written to a temporary name and renamed on successful completion."
        },
    )
    dump_attention_layer: Optional[int] = field(
        default=None,
        metadata={
            "help": "multi-head models (structattn_transformer) only: the decoder layer whose encoder-decoder "
            "attention --dump-attention writes (0-based; negative counts from the end); default: the last, the "
            "layer fairseq's --print-alignment uses"
        },
    )
    dump_attention_heads: Optional[ChoiceEnum(DUMP_HEADS)] = field(
        default=None,
        metadata={
            "help": "multi-head models only: 'mean' (default) writes the average of the layer's heads, 'all' "
            "also every head (the records' 'heads'; the structattn-stats/-report commands then show each head)"
        },
    )
    dump_post_process: Optional[str] = field(
        default=None,
        metadata={
            "help": "the --post-process value to apply to src/hyp texts in the dump (e.g. sentencepiece, "
            "subword_nmt); the task cannot see fairseq-generate's own --post-process, so pass it again here"
        },
    )


def _plain(cfg) -> dict:
    """Model config (argparse Namespace or omegaconf) as a dict of JSON-friendly values."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=False)
    except ImportError:  # pragma: no cover - omegaconf ships with fairseq
        pass
    return plain_options(cfg)


def _require_attention(models):
    """Make decoders return their attention: fairseq-generate switches it off (``make_generation_fast_(
    need_attn=False)``) unless --print-alignment is given, and fairseq's LSTM decoders then return None."""
    for model in models:
        for module in model.modules():
            if hasattr(module, "need_attn"):
                module.need_attn = True


class _FinalisingIterator:
    """Yields the wrapped iterator's batches and calls ``on_exhausted`` once it is used up."""

    def __init__(self, inner, on_batch, on_exhausted):
        self._inner = inner
        self._it = iter(inner)
        self._on_batch = on_batch
        self._on_exhausted = on_exhausted
        self._done = False

    def __len__(self):
        return len(self._inner)

    def __getattr__(self, name):  # n, has_next, skip, take ... of CountingIterator
        return getattr(self._inner, name)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            batch = next(self._it)
        except StopIteration:
            if not self._done:
                self._done = True
                self._on_exhausted()
            raise
        self._on_batch(batch)
        return batch


class _EpochIteratorProxy:
    def __init__(self, inner, task):
        self._inner = inner
        self._task = task

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self):
        return len(self._inner)

    def next_epoch_itr(self, *args, **kwargs):
        return _FinalisingIterator(
            self._inner.next_epoch_itr(*args, **kwargs), self._task._dump_on_batch, self._task._dump_finalise
        )


@register_task("structattn_translation", dataclass=StructAttnTranslationConfig)
class StructAttnTranslationTask(TranslationTask):
    """fairseq ``translation`` plus ``--dump-attention`` (see the module docstring)."""

    cfg: StructAttnTranslationConfig

    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self._dump_writer: Optional[DumpWriter] = None
        self._dump_started = False
        self._dump_done = False
        self._model_cfgs: list = []
        self._gen_cfg = None
        self._bpe = None
        self._tokenizer = None
        self._gen_subset = None
        self._expected: set = set()  # ids of every sentence in the batches handed to fairseq-generate
        self._written: dict = {}  # id -> records written
        self._batch_ids_total = None
        self._dataset_size = None
        self._max_pad_mass = 0.0
        self._warned_pad = False
        self._export: Optional[dict] = None  # multi-head models: {"layer", "heads", "num_heads"}

    # ---- capture what fairseq-generate builds -----------------------------------------------------------------

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self._model_cfgs.append(_plain(cfg))
        return model

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        self._gen_subset = split
        return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)

    def build_generator(self, models, args, **kwargs):
        self._gen_cfg = args
        if self.cfg.dump_attention:
            _require_attention(models)
            self._export = self._choose_exported_attention(models, args)
            from structattn.attention import coupling_report, structure_totals

            # the learned transitions and their coupling κ, per model of the ensemble (structattn-stats shows κ)
            self._couplings = [coupling_report(m) for m in models]
            # SparseMAP's active structures per row over this run (structattn-stats' "structures/row")
            self._structure_models = models
            self._structures_start = [structure_totals(m) for m in models]
        elif self.cfg.dump_attention_layer is not None or self.cfg.dump_attention_heads is not None:
            raise ValueError("--dump-attention-layer/--dump-attention-heads choose what --dump-attention writes; "
                             "give --dump-attention PATH too")
        return super().build_generator(models, args, **kwargs)

    def _choose_exported_attention(self, models, gen_args) -> Optional[dict]:
        """Multi-head models: make every model return the chosen layer's attention (heads averaged or packed) and
        return what the dump records about it; None for single-attention models (nothing changes for them)."""
        layer, heads = self.cfg.dump_attention_layer, self.cfg.dump_attention_heads
        heads = None if heads is None else str(heads)  # fairseq's ChoiceEnum value → plain str
        multi = [hasattr(getattr(m, "decoder", None), "set_attention_export") for m in models]
        if not any(multi):
            if layer is not None or heads is not None:
                raise ValueError("--dump-attention-layer/--dump-attention-heads apply to multi-head models "
                                 "(structattn_transformer); this model has a single attention layer")
            return None
        if not all(multi):
            raise ValueError("--dump-attention: an ensemble must not mix multi-head and single-attention models")
        heads = heads or "mean"
        if heads == "all" and getattr(gen_args, "print_alignment", None):
            raise ValueError("--dump-attention-heads all cannot be combined with --print-alignment (fairseq's "
                             "alignment needs the heads' average)")
        layers, n_heads = set(), set()
        for m in models:
            m.decoder.set_attention_export(layer, heads)  # validates the layer against the model
            index = m.decoder.num_layers - 1 if m.decoder.export_layer is None else m.decoder.export_layer
            layers.add(index)
            n_heads.add(m.decoder.layers[index].encoder_attn.num_heads)
        if heads == "all" and len(n_heads) > 1:
            raise ValueError(f"--dump-attention-heads all: the ensemble's models have different numbers of heads "
                             f"{sorted(n_heads)}")

        def one_or_all(values):  # an ensemble's models may differ (e.g. layer -1 of models of different depths)
            return min(values) if len(values) == 1 else sorted(values)

        return {"attention_layer": one_or_all(layers), "attention_heads": heads, "num_heads": one_or_all(n_heads)}

    def build_tokenizer(self, args):
        self._tokenizer = super().build_tokenizer(args)
        return self._tokenizer

    def build_bpe(self, args):
        self._bpe = super().build_bpe(args)
        return self._bpe

    # ---- the dump ---------------------------------------------------------------------------------------------

    def get_batch_iterator(self, dataset, *args, **kwargs):
        epoch_itr = super().get_batch_iterator(dataset, *args, **kwargs)
        if not self.cfg.dump_attention:
            return epoch_itr
        if self._dump_started:
            raise RuntimeError(
                "--dump-attention supports a single pass over one subset (fairseq-generate); a second batch "
                "iterator was requested (fairseq-train/validation or fairseq-interactive are not supported)"
            )
        self._dump_started = True
        path = self.cfg.dump_attention
        self._dump_writer = DumpWriter(path)  # fails now if the destination is a directory or not writable
        if os.path.exists(path):
            logger.info("--dump-attention: removing the previous %s (it would outlive a failed run)", path)
            os.unlink(path)
        atexit.register(self._dump_abort_at_exit)
        try:
            self._dataset_size = len(dataset)
            self._batch_ids_total = int(sum(len(b) for b in epoch_itr.frozen_batches))
        except Exception:  # iterators without frozen batches: rely on the per-batch bookkeeping only
            self._batch_ids_total = None
        return _EpochIteratorProxy(epoch_itr, self)

    def _nbest(self) -> int:
        return int(getattr(self._gen_cfg, "nbest", 1) or 1) if self._gen_cfg is not None else 1

    def _dump_on_batch(self, sample):
        if not isinstance(sample, dict) or "id" not in sample or "net_input" not in sample:
            return  # empty shard fillers: fairseq-generate skips them too
        self._expected.update(int(s) for s in sample["id"].tolist())

    def _metadata(self, generator) -> dict:
        import fairseq

        import structattn

        model_cfgs = self._model_cfgs
        first = model_cfgs[0] if model_cfgs else {}
        g = self._gen_cfg
        gen = {}
        for k in ("beam", "nbest", "max_len_a", "max_len_b", "min_len", "lenpen", "unkpen", "sampling",
                  "sampling_topk", "sampling_topp", "temperature", "prefix_size", "score_reference",
                  "match_source_len", "no_repeat_ngram_size"):
            if g is not None and hasattr(g, k):
                gen[k] = getattr(g, k)
        return {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command_line": list(sys.argv),
            "fairseq_version": getattr(fairseq, "__version__", None),
            "torch_version": torch.__version__,
            "structattn_version": getattr(structattn, "__version__", None),
            "task": "structattn_translation",
            "data": self.cfg.data,
            "gen_subset": self._gen_subset,
            "source_lang": self.cfg.source_lang,
            "target_lang": self.cfg.target_lang,
            "left_pad_source": bool(self.cfg.left_pad_source),
            "eos_symbol": self.tgt_dict[self.tgt_dict.eos()],
            "generator": type(generator).__name__ if generator is not None else None,
            "generation": gen,
            "arch": first.get("arch") or first.get("_name"),
            "attention": first.get("attention"),
            "ensemble_size": len(model_cfgs),
            "model_args": model_cfgs,
            "layout": "attention[i, j]: target token i (EOS last) x source token j (EOS last), padding removed; "
            "ensembles: the average of the models' attention as used by fairseq's generator",
            "couplings": getattr(self, "_couplings", None),
            **(self._export or {}),
        }

    def _text(self, dictionary, tokens) -> tuple[str, str]:
        bpe_str = dictionary.string(tokens)
        text = dictionary.string(tokens, self.cfg.dump_post_process) if self.cfg.dump_post_process else bpe_str
        if self._bpe is not None:
            text = self._bpe.decode(text)
        if self._tokenizer is not None:
            text = self._tokenizer.decode(text)
        return bpe_str, text

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        if self._dump_writer is not None:
            _require_attention(models)
        hypos = super().inference_step(generator, models, sample, prefix_tokens=prefix_tokens, constraints=constraints)
        if self._dump_writer is not None and not self._dump_done:
            self._dump_batch(generator, sample, hypos)
        return hypos

    def _dump_batch(self, generator, sample, hypos):
        """Write one record per (sentence, n-best rank) of a generated batch, un-padded exactly."""
        from fairseq.sequence_scorer import SequenceScorer

        w = self._dump_writer
        if not w.header_written:
            w.write_header(self._metadata(generator))
        scoring_reference = isinstance(generator, SequenceScorer)
        nbest = 1 if scoring_reference else self._nbest()
        src_all = sample["net_input"]["src_tokens"].cpu()
        target = sample.get("target")
        for i, sid in enumerate(sample["id"].tolist()):
            src = src_all[i]
            keep = src.ne(self.src_dict.pad())
            ref = target[i].cpu() if target is not None else None
            common = self._source_fields(src[keep], ref)
            for rank, hypo in enumerate(hypos[i][:nbest]):
                att = self._hypothesis_attention(hypo, sid, src.numel(), ref if scoring_reference else None)
                heads = None
                if att.dim() == 3:  # every head: (heads, hypothesis length, padded source length)
                    heads, att = att, att.mean(0)
                every = att[None] if heads is None else heads
                pad_mass = float(every[:, :, ~keep].abs().sum(dim=2).max()) if (~keep).any() else 0.0
                self._check_pad_mass(pad_mass, sid)
                kept_heads = None if heads is None else heads[:, :, keep]
                w.write(self._record(int(sid), rank, hypo, att[:, keep], pad_mass, common, kept_heads))
                self._written[int(sid)] = self._written.get(int(sid), 0) + 1
        w.flush()

    def _source_fields(self, src_ids, ref):
        """Source tokens and texts of one sentence (and its reference text, if the batch has targets)."""
        src_bpe, src_text = self._text(self.src_dict, src_ids)
        extra = {"src_bpe": src_bpe}
        if ref is not None:
            extra["ref_text"] = self._text(self.tgt_dict, ref[ref.ne(self.tgt_dict.pad())])[1]
        return {"src_tokens": [self.src_dict[int(t)] for t in src_ids], "src_text": src_text, "extra": extra}

    def _hypothesis_attention(self, hypo, sid, src_len, scored_ref):
        """The hypothesis' attention as (hypothesis length, padded source length), float32 on CPU; with every head
        dumped, (heads, hypothesis length, padded source length).

        ``scored_ref``: the padded reference when fairseq's SequenceScorer produced ``hypo`` (rows then follow
        the target's padded layout); None for SequenceGenerator output, which is (src_len x tgt_len)."""
        att = hypo.get("attention")
        if att is None or att.numel() == 0:
            raise RuntimeError(
                "--dump-attention: the model returned no attention (the decoder's second output must be "
                "the attention tensor (bsz, tgt_len, src_len) or a dict with 'attn')"
            )
        att = att.detach().float().cpu()
        att = att[scored_ref.ne(self.tgt_dict.pad())] if scored_ref is not None else att.t()
        n_tokens = len(hypo["tokens"])
        n_heads = self._export["num_heads"] if self._export and self._export["attention_heads"] == "all" else 1
        if att.shape != (n_tokens, n_heads * src_len):
            raise RuntimeError(
                f"--dump-attention: sentence {sid}: attention shape {tuple(att.shape)} does not match "
                f"(hypothesis length, padded source length{' x heads' if n_heads > 1 else ''}) = "
                f"({n_tokens}, {n_heads * src_len})"
            )
        if n_heads > 1:  # columns h·src_len + j: head h on source position j (StructAttnTransformerDecoderLayer)
            att = att.view(n_tokens, n_heads, src_len).transpose(0, 1)
        return att

    def _record(self, sid, rank, hypo, att, pad_mass, common, heads=None):
        tokens = hypo["tokens"].cpu()
        hyp_bpe, hyp_text = self._text(self.tgt_dict, tokens)
        extra = dict(common["extra"])
        extra.update(
            hyp_bpe=hyp_bpe,
            pad_mass=pad_mass,
            positional_scores=[float(x) for x in hypo["positional_scores"].float().cpu().tolist()],
        )
        return AttentionRecord(
            id=sid,
            nbest_rank=rank,
            src_tokens=common["src_tokens"],
            tgt_tokens=[self.tgt_dict[int(t)] for t in tokens],
            src_text=common["src_text"],
            hyp_text=hyp_text,
            attention=att.numpy().astype(np.float32),
            score=float(hypo["score"]),
            extra=extra,
            heads=None if heads is None else heads.numpy().astype(np.float32),
        )

    def _check_pad_mass(self, pad_mass, sid):
        self._max_pad_mass = max(self._max_pad_mass, pad_mass)
        if pad_mass > PAD_MASS_TOLERANCE and not self._warned_pad:
            self._warned_pad = True
            logger.warning(
                "--dump-attention: sentence %d puts attention mass %.3g on padding columns: the model does not "
                "index attention like src_tokens (fairseq's built-in lstm with left-padded sources, issue #3625); "
                "the dumped columns are NOT reliable for this model",
                sid,
                pad_mass,
            )

    def _dump_finalise(self):
        w = self._dump_writer
        if w is None or self._dump_done:
            return
        missing = sorted(set(self._expected) - set(self._written))
        if missing:
            w.abort()
            self._dump_done = True
            raise RuntimeError(
                f"--dump-attention: {len(missing)} sentences of the generated batches were not dumped "
                f"(e.g. ids {missing[:5]}); no dump written"
            )
        if self._batch_ids_total is not None and len(self._expected) != self._batch_ids_total:
            logger.warning(
                "--dump-attention: saw %d sentences, the batch sampler holds %d (sharded generation?)",
                len(self._expected), self._batch_ids_total,
            )
        if self._dataset_size is not None and len(self._written) < self._dataset_size:
            logger.warning(
                "--dump-attention: %d of the %d sentences of the subset were in no batch, so fairseq-generate did "
                "not translate them (too long for the model without --skip-invalid-size-inputs-valid-test, or "
                "fairseq drops the sentences beyond the last multiple of --required-batch-size-multiple (default "
                "8) when --batch-size is set); the dump holds the %d translated ones",
                self._dataset_size - len(self._written), self._dataset_size, len(self._written),
            )
        if not w.header_written:  # an empty subset: still a complete (empty) dump
            w.write_header(self._metadata(None))
        summary = {
            "n_sentences": len(self._written),
            "dataset_size": self._dataset_size,
            "skipped_sentences": (self._dataset_size - len(self._written)) if self._dataset_size is not None else None,
            "max_pad_mass": self._max_pad_mass,
            "contract_ok": self._max_pad_mass <= PAD_MASS_TOLERANCE,
        }
        per_row = _structures_per_row(getattr(self, "_structure_models", []), getattr(self, "_structures_start", []))
        if per_row is not None:
            summary["structures_per_row"] = per_row
        path = w.finalize(summary)
        self._dump_done = True
        logger.info("--dump-attention: wrote %d records for %d sentences to %s", w.n_records, len(self._written), path)

    def _dump_abort_at_exit(self):
        if self._dump_writer is not None and not self._dump_writer.closed:
            self._dump_writer.abort()


def _structures_per_row(models, start) -> Optional[float]:
    """Mean active SparseMAP structures per attention row computed since ``start`` (the models' totals then), or
    None for models without SparseMAP attention (:func:`structattn.attention.structure_totals`)."""
    from structattn.attention import structure_totals

    rows = structures = 0
    for model, before in zip(models, start):
        after = structure_totals(model)
        if after is None or before is None:
            continue
        rows, structures = rows + after[0] - before[0], structures + after[1] - before[1]
    return structures / rows if rows else None
