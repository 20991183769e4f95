"""Every change structattn makes to OpenNMT-py's behaviour, installed by :func:`install`.

``structattn-onmt-train`` and ``structattn-onmt-translate`` call :func:`install` before OpenNMT parses anything,
and every training worker process calls it again first thing (``CPU data-parallel training`` below), so the
patches are in force wherever OpenNMT builds, trains, loads or runs a model. Plain ``onmt_train`` /
``onmt_translate`` in other processes are unaffected: nothing is changed at import time, and OpenNMT's files on
disk are never edited. :func:`install` is idempotent.

Checked against: OpenNMT-py 3.5.1 (the last release; :data:`CHECKED_ONMT_VERSIONS`), torch 2.13, CPython 3.11.
Another OpenNMT-py version gets a warning and the same patches; each patch refuses to install (with an error naming
it) if the OpenNMT function it wraps is missing.

Patches
-------
``attention layer`` (:func:`_global_attention_factory`, :func:`_build_base_model`)
    *What OpenNMT does.* ``onmt/decoders/decoder.py`` (``RNNDecoderBase.__init__``) builds its attention with the
    module-level name ``GlobalAttention`` (imported from ``onmt.modules``), whose constructor asserts
    ``attn_func in ["softmax", "sparsemax"]``.
    *What we do.* Rebind that name in ``onmt.decoders.decoder`` to a factory, and wrap
    ``onmt.model_builder.build_base_model`` (the one function every model construction goes through: training,
    ``-train_from``, translation, ensembles) so that the factory knows the model's options: a model whose ``opt``
    carries the structattn options (trained by ``structattn-onmt-train``) gets
    :class:`structattn_onmt.layer.StructuredGlobalAttention`; any other model (plain ``onmt_train``) gets
    OpenNMT's ``GlobalAttention`` unchanged, so ``structattn-onmt-translate`` also translates stock checkpoints.

``attention parameters keep the library's initialisation`` (:func:`_build_model`)
    *What OpenNMT does.* ``onmt.model_builder.build_model`` re-initialises every parameter of a new model with
    U(−param_init, param_init) (default 0.1) or Xavier after construction.
    *What we do.* For a new model (no checkpoint) give the structattn modules' M and transition parameters the
    library's initialisation again afterwards (``StructuredGlobalAttention.reset_attention_parameters``): the
    Viterbi attention's scale of M and the stable form's contiguity prior (T/γ = [[c, 0], [0, c]]) would otherwise
    be erased. Resumed models (``-train_from``) keep their checkpoint's values. Wrapped in ``onmt.model_builder``
    and where ``onmt.train_single`` imported it.

``attention options on the training parser`` (:func:`add_train_options`)
    *What OpenNMT does.* ``onmt.opts.model_opts`` declares ``-global_attention_function`` with
    ``choices=["softmax", "sparsemax"]``.
    *What we do.* On the parser of ``structattn-onmt-train`` only: add ``viterbi``, ``fusedmax``, ``oscarmax``,
    ``entmax15`` and ``sparsemap`` (:data:`structattn.options.ATTENTIONS`) to those choices and add
    ``-attention_reg``, ``-attention_gamma``, ``-attention_form``, ``-attention_contiguity``,
    ``-attention_chain``, ``-attention_lambda`` to the same
    "Model- Attention" group (:mod:`structattn_onmt.options`), so they work on the command line and in YAML configs
    and are saved in the checkpoint's ``opt``.

``checkpoints load under torch's weights-only unpickler`` (:func:`_load_checkpoint`)
    *What OpenNMT does.* ``onmt.models.model_saver.load_checkpoint`` (used by ``-train_from`` and by translation)
    calls ``torch.load`` without ``weights_only``; torch ≥ 2.6 then uses the restricted unpickler, which refuses
    OpenNMT's own checkpoints: ``opt`` is an ``argparse.Namespace``.
    *What we do.* Run it inside ``torch.serialization.safe_globals(ONMT_CHECKPOINT_GLOBALS)``: exactly
    ``argparse.Namespace`` (the only non-tensor, non-container global in an OpenNMT 3.5.1 checkpoint, found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``), allowed only for the duration of that call. Wrapped
    where ``onmt.model_builder`` and ``onmt.train_single`` imported it too.

``non-persistent buffers are not expected in checkpoints`` (:func:`_load_state_dict`)
    *What OpenNMT does.* ``BaseModel.load_state_dict`` / ``load_safe_state_dict`` walk ``named_buffers()``, which
    includes non-persistent buffers, and with ``strict`` raise "Missing key in checkpoint" for any of them — but
    ``state_dict()`` (what OpenNMT saves) leaves them out. ``ViterbiAttention`` keeps its fallback-row counters in
    non-persistent buffers.
    *What we do.* Hide non-persistent buffers from those two methods while they run and put them back afterwards
    (moved to the model's device).

``attention layout of the input-feeding RNN decoder`` (:func:`_rnn_decoder_forward`)
    *What OpenNMT does.* ``InputFeedRNNDecoder`` (the default RNN decoder) collects one attention vector per step
    and ``RNNDecoderBase.forward`` stacks them with ``torch.stack(list)``, i.e. time-major (tgt_len, batch,
    src_len), while every consumer — beam and greedy search, ``-attn_debug``, ``-report_align``, the copy loss —
    indexes batch-major (batch, tgt_len, src_len), as ``StdRNNDecoder`` and the Transformer return it. With one
    decoding step this makes ``BeamSearch.advance`` fail (``IndexError`` in ``attn[self.select_indices]``)
    whenever batch × beam > 1 and attention is asked for (``-attn_debug``, ``-replace_unk``, attention export): an
    OpenNMT 3.5.1 bug.
    *What we do.* After ``RNNDecoderBase.forward`` of an ``InputFeedRNNDecoder``, transpose the stacked entries
    (``std``, ``copy``, ``coverage``) to batch-major; and when the caller asks ``with_align=True`` (``-report_align``)
    return the standard attention as ``attns["align"]`` (OpenNMT's RNN decoders have none). OpenNMT's coverage
    loss reads the time-major layout, so ``structattn-onmt-train`` refuses ``-coverage_attn``.

``source length of a finished beam hypothesis`` (:func:`_beams_non_finished`)
    *What OpenNMT does.* ``BeamSearchBase.beams_non_finished(i, …)`` stores a finished hypothesis of sentence ``i``
    with ``attention[i, j, :, :self.src_len[i]]`` (and ``-ratio`` uses ``self.src_len[i]``), but ``self.src_len``
    holds one length per beam row (batch × beam, tiled), so for ``i`` > 0 it reads the length of sentence
    ``i // beam``: with batch and beam > 1, ``-attn_debug``, ``-replace_unk`` and the exported attention get too
    many or too few source columns (an OpenNMT 3.5.1 bug).
    *What we do.* While that method runs, ``self.src_len`` is the per-sentence view (the first row of each
    sentence's beam; every row of a beam has the same length).

``-report_align with RNN decoders`` (:func:`_align_forward`)
    *What OpenNMT does.* ``Translator._align_forward`` re-runs the decoder over the n-best predictions and tiles
    the encoder's final state with ``tile(enc_states, n_best, dim=0)``; an RNN's final state is a tuple (LSTM) or
    has the batch on dimension 1, so this raises (``'tuple' object has no attribute 'repeat_interleave'``) or
    tiles the wrong dimension.
    *What we do.* For RNN decoders, the same steps with the state tiled by the decoder's own ``map_state`` (as beam
    search does); other decoders run OpenNMT's method unchanged.

``CPU data-parallel training`` (:func:`_spawned_train` and the four wrappers it activates)
    *What OpenNMT does.* ``onmt_train`` with ``-world_size N -gpu_ranks 0 … N-1`` spawns one process per rank, and
    treats every rank as a CUDA device: ``torch.cuda.set_device`` (``train_single.configure_process``),
    ``use_gpu(opt)`` → the model and the loss on CUDA (``model_builder.build_model``, ``LossCompute.from_opts``), batches on ``torch.device(rank)``
    (``build_dynamic_dataset_iter``), and ``all_gather_list`` gathers through ``torch.cuda.ByteTensor``. Without
    CUDA it cannot train with more than one process. The workers are started with ``spawn``, so they import
    OpenNMT afresh, without any patch installed in the parent.
    *What we do.* The spawned target becomes :func:`_spawned_train`, a function of this module: unpickling it in
    the worker imports this module, and it calls :func:`install` before OpenNMT's ``spawned_train`` runs — every
    patch above is in force in every worker. When the machine has no CUDA device it also switches on CPU mode for
    that worker: no ``set_device``, model and batches on the CPU, ``all_gather_list`` through
    ``torch.distributed.all_gather_object``. The process group is OpenNMT's (``-gpu_backend gloo``), gradients
    are all-reduced by OpenNMT's trainer as on GPUs, the data is sharded by rank as on GPUs.

``Viterbi attention health in the training log`` (:func:`_maybe_report_training`)
    *What OpenNMT does.* Every ``-report_every`` steps ``Trainer._maybe_report_training`` logs accuracy,
    perplexity and speed.
    *What we do.* After that line, for models with a Viterbi attention, one more line with what the fairseq plugin
    logs as ``attn_fallback``, ``attn_frozen`` and ``T00/g … T11/g``: the share of attention rows since the last
    report whose ℓ2 marginals were all 0 (softmax fallback) or all 0/1 (no gradient), and the learned transitions
    T/γ (rank 0's rows in data-parallel training). Nothing else changes.

``attention export`` (:func:`_translate`, :func:`_from_batch`, :func:`_translate_batch`, :func:`_load_test_model`)
    *What OpenNMT does.* Nothing: the attention of a translation is only printed (``-attn_debug``).
    *What we do.* Only while ``structattn-onmt-translate -dump_attention PATH`` runs
    (:mod:`structattn_onmt.dump`): ask the search for the attention (``translate_batch`` with ``attn_debug``
    forced on, which is all that flag does there), capture each model's ``opt`` (``load_test_model``), the
    bucket of each batch (``Inference._translate``'s iterator) and the ``Translation`` objects
    (``TranslationBuilder.from_batch``), and write them to the dump. Without ``-dump_attention`` these wrappers
    call OpenNMT's functions unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import warnings

import torch

logger = logging.getLogger(__name__)

CHECKED_ONMT_VERSIONS = ("3.5.1",)
"""OpenNMT-py versions whose code the patches were read and tested against."""

ONMT_CHECKPOINT_GLOBALS = [argparse.Namespace]
"""What ``torch.load(weights_only=True)`` must additionally allow for an OpenNMT 3.5.1 checkpoint."""

_installed = False
_building_options: list = []  # options of the model(s) being built (a stack: build_base_model may nest)
_cpu_parallel = False  # set in a spawned training worker on a machine without CUDA
_originals: dict = {}
_dump = None  # the active structattn_onmt.dump.DumpCollector, if any


# ---- installation ---------------------------------------------------------------------------------------------


def _replace(module, name: str, new):
    """Rebind ``module.name`` to ``new`` (remembering the original once); returns the original."""
    key = (module.__name__, name)
    if not hasattr(module, name):
        raise RuntimeError(f"structattn_onmt.patches: {module.__name__}.{name} not found; this OpenNMT-py version "
                           f"is not supported (checked: {', '.join(CHECKED_ONMT_VERSIONS)})")
    if key not in _originals:
        _originals[key] = getattr(module, name)
    setattr(module, name, new)
    return _originals[key]


def original(module, name: str):
    """OpenNMT's own object that a patch replaced (or the current one if none did)."""
    return _originals.get((module.__name__, name), getattr(module, name))


def install() -> None:
    """Install every patch of the module docstring (idempotent). Long because it is the one list of them, in the
    order they go in (each line names the OpenNMT function or method it replaces)."""
    global _installed
    if _installed:
        return
    import onmt

    version = getattr(onmt, "__version__", "?")
    if version not in CHECKED_ONMT_VERSIONS:
        warnings.warn(f"structattn_onmt: OpenNMT-py {version} is installed; the patches were checked against "
                      f"{', '.join(CHECKED_ONMT_VERSIONS)} (scripts/install_onmt.sh installs 3.5.1)", stacklevel=2)
    import onmt.bin.train
    import onmt.decoders.decoder
    import onmt.model_builder
    import onmt.models.model
    import onmt.models.model_saver
    import onmt.train_single
    import onmt.trainer
    import onmt.translate.beam_search
    import onmt.translate.translation
    import onmt.translate.translator
    import onmt.utils
    import onmt.utils.distributed
    import onmt.utils.misc

    # attention layer and its initialisation
    _replace(onmt.decoders.decoder, "GlobalAttention", _global_attention_factory)
    _replace(onmt.model_builder, "build_base_model", _build_base_model)
    _replace(onmt.model_builder, "build_model", _build_model)
    _replace(onmt.train_single, "build_model", _build_model)
    # checkpoints
    _replace(onmt.models.model_saver, "load_checkpoint", _load_checkpoint)
    _replace(onmt.model_builder, "load_checkpoint", _load_checkpoint)
    _replace(onmt.train_single, "load_checkpoint", _load_checkpoint)
    base = onmt.models.model.BaseModel
    _replace_method(base, "load_state_dict", _load_state_dict)
    _replace_method(base, "load_safe_state_dict", _load_state_dict)
    # attention layout and -report_align
    _replace_method(onmt.decoders.decoder.RNNDecoderBase, "forward", _rnn_decoder_forward)
    _replace_method(onmt.translate.translator.Translator, "_align_forward", _align_forward)
    _replace_method(onmt.translate.beam_search.BeamSearchBase, "beams_non_finished", _beams_non_finished)
    _replace_method(onmt.trainer.Trainer, "_maybe_report_training", _maybe_report_training)
    # CPU data-parallel training
    _replace(onmt.bin.train, "spawned_train", _spawned_train)
    _replace(onmt.train_single, "configure_process", _configure_process)
    _replace(onmt.utils.misc, "use_gpu", _use_gpu)
    _replace(onmt.utils, "use_gpu", _use_gpu)
    _replace(onmt.model_builder, "use_gpu", _use_gpu)
    _replace(onmt.train_single, "build_dynamic_dataset_iter", _build_dynamic_dataset_iter)
    _replace(onmt.utils.distributed, "all_gather_list", _all_gather_list)
    # attention export
    _replace(onmt.model_builder, "load_test_model", _load_test_model)
    _replace_method(onmt.translate.translator.Inference, "_translate", _translate)
    _replace_method(onmt.translate.translator.Translator, "translate_batch", _translate_batch)
    _replace_method(onmt.translate.translation.TranslationBuilder, "from_batch", _from_batch)
    _installed = True


def _replace_method(cls, name: str, new):
    """Patch a method: ``new(original, self, *args, **kwargs)``."""
    orig = _replace_attr_original(cls, name)

    @functools.wraps(orig)
    def method(self, *args, **kwargs):
        return new(orig, self, *args, **kwargs)

    method.__structattn_patch__ = True
    setattr(cls, name, method)


def _replace_attr_original(cls, name: str):
    key = (f"{cls.__module__}.{cls.__qualname__}", name)
    if name not in cls.__dict__:
        raise RuntimeError(f"structattn_onmt.patches: {cls.__qualname__}.{name} not found; this OpenNMT-py version "
                           f"is not supported (checked: {', '.join(CHECKED_ONMT_VERSIONS)})")
    if key not in _originals:
        _originals[key] = cls.__dict__[name]
    return _originals[key]


# ---- attention options on the training parser ---------------------------------------------------------------


def add_train_options(parser) -> None:
    """Add structattn's attentions to ``-global_attention_function``'s choices and the structattn options to OpenNMT's training parser
    (built by ``onmt.opts.train_opts``)."""
    from structattn.options import finite_float, positive_float

    from .options import add_attention_options

    action = next((a for a in parser._actions if a.dest == "global_attention_function"), None)
    if action is None:
        raise RuntimeError("structattn_onmt: OpenNMT's parser has no -global_attention_function option")
    from structattn.attention import ATTENTIONS

    action.choices = list(dict.fromkeys(list(action.choices or []) + list(ATTENTIONS)))
    action.help = ("attention weights: softmax, sparsemax (OpenNMT's functions, computed by structattn), "
                   "viterbi (structattn: segmentation attention with smoothed Viterbi marginals, Mensch & Blondel "
                   "2018 section 5; see -attention_reg/-attention_gamma), fusedmax, oscarmax (sparsemax with a "
                   "total-variation / OSCAR penalty, see -attention_lambda), entmax15 (1.5-entmax) or sparsemap "
                   "(SparseMAP over the segmentation chain); docs/choosing_attention.md")
    group = next(g for g in parser._action_groups if action in g._group_actions)
    add_attention_options(group, positive_float, finite_float)


# ---- attention layer -----------------------------------------------------------------------------------------


def _global_attention_factory(dim, coverage=False, attn_type="dot", attn_func="softmax"):
    """Stands for ``GlobalAttention`` in ``onmt.decoders.decoder`` (``attention layer``)."""
    options = _building_options[-1] if _building_options else None
    if options is None:
        from onmt.modules.global_attention import GlobalAttention

        return GlobalAttention(dim, coverage=coverage, attn_type=attn_type, attn_func=attn_func)
    from .layer import StructuredGlobalAttention

    return StructuredGlobalAttention(dim, options, coverage=coverage, attn_type=attn_type, attn_func=attn_func)


def _build_base_model(model_opt, vocabs, *args, **kwargs):
    import onmt.model_builder

    from .options import options_from_opt

    _building_options.append(options_from_opt(model_opt))
    try:
        return original(onmt.model_builder, "build_base_model")(model_opt, vocabs, *args, **kwargs)
    finally:
        _building_options.pop()


def _build_model(model_opt, opt, vocabs, checkpoint, *args, **kwargs):
    import onmt.model_builder

    from .layer import StructuredGlobalAttention

    model = original(onmt.model_builder, "build_model")(model_opt, opt, vocabs, checkpoint, *args, **kwargs)
    if checkpoint is None:
        for module in model.modules():
            if isinstance(module, StructuredGlobalAttention):
                module.reset_attention_parameters()
    return model


# ---- checkpoints ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def allow_onmt_checkpoints():
    """Within the block, ``torch.load`` (weights-only) also accepts :data:`ONMT_CHECKPOINT_GLOBALS`."""
    with torch.serialization.safe_globals(ONMT_CHECKPOINT_GLOBALS):
        yield


def _load_checkpoint(ckpt_path, *args, **kwargs):
    import onmt.models.model_saver

    with allow_onmt_checkpoints():
        return original(onmt.models.model_saver, "load_checkpoint")(ckpt_path, *args, **kwargs)


def _load_state_dict(orig, self, *args, **kwargs):
    checkpoint = args[0] if args else kwargs.get("checkpoint")
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        from structattn.attention import _TemperedAttention

        for name, module in self.named_modules():
            key = f"{name}.temperature"
            if isinstance(module, _TemperedAttention) and key not in checkpoint["model"]:
                # a model saved before the temperature existed normalised the raw scores (τ = 1)
                checkpoint["model"][key] = torch.tensor([1.0])
    hidden = []
    for module in self.modules():
        for name in list(module._non_persistent_buffers_set):
            if name in module._buffers:
                hidden.append((module, name, module._buffers.pop(name)))
    try:
        return orig(self, *args, **kwargs)
    finally:
        device = next((p.device for p in self.parameters()), None)
        for module, name, buf in hidden:
            module._buffers[name] = buf if buf is None or device is None else buf.to(device)


# ---- attention layout and -report_align ---------------------------------------------------------------------


def _rnn_decoder_forward(orig, self, tgt, enc_out, *args, **kwargs):
    from onmt.decoders.decoder import InputFeedRNNDecoder

    dec_outs, attns = orig(self, tgt, enc_out, *args, **kwargs)
    if isinstance(self, InputFeedRNNDecoder):
        for key in ("std", "copy", "coverage"):
            value = attns.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 3:
                attns[key] = value.transpose(0, 1)  # (tgt_len, batch, src_len) -> (batch, tgt_len, src_len)
    if kwargs.get("with_align") and "std" in attns and "align" not in attns:
        attns["align"] = attns["std"]
    return dec_outs, attns


def _beams_non_finished(orig, self, i, *args, **kwargs):
    tiled = self.src_len
    if isinstance(tiled, torch.Tensor) and tiled.dim() == 1 and tiled.numel() % self.beam_size == 0:
        self.src_len = tiled.view(-1, self.beam_size)[:, 0]
    try:
        return orig(self, i, *args, **kwargs)
    finally:
        self.src_len = tiled


def _align_forward(orig, self, batch, predictions):
    from onmt.decoders.decoder import RNNDecoderBase
    from onmt.utils.alignment import extract_alignment
    from onmt.utils.misc import tile

    if not isinstance(self.model.decoder, RNNDecoderBase):
        return orig(self, batch, predictions)
    # OpenNMT's Translator._align_forward (3.5.1), steps (0)-(3), with the RNN state tiled by map_state.
    if "tgt" in batch.keys() and self.gold_align:
        batch_tgt_idxs = batch["tgt"].transpose(1, 2)
    else:
        batch_tgt_idxs = self._align_pad_prediction(predictions, bos=self._tgt_bos_idx, pad=self._tgt_pad_idx)
    tgt_mask = (batch_tgt_idxs.eq(self._tgt_pad_idx) | batch_tgt_idxs.eq(self._tgt_eos_idx)
                | batch_tgt_idxs.eq(self._tgt_bos_idx))
    n_best = batch_tgt_idxs.size(1)
    src, enc_states, enc_out, src_len = self._run_encoder(batch)
    self.model.decoder.init_state(src, enc_out, enc_states)
    self.model.decoder.map_state(lambda state, dim: tile(state, n_best, dim=dim))
    enc_out = tile(enc_out, n_best, dim=0)
    src_len = tile(src_len, n_best)
    tgt = batch_tgt_idxs.view(-1, batch_tgt_idxs.size(-1)).T.unsqueeze(-1)
    dec_in = tgt[:-1].transpose(0, 1)  # batch first, without the last target
    _, attns = self.model.decoder(dec_in, enc_out, src_len=src_len, with_align=True)
    prediction_mask = tgt_mask.view(-1, tgt_mask.size(-1))[:, 1:]
    return extract_alignment(attns["align"], prediction_mask, src_len, n_best)


def _maybe_report_training(orig, self, step, *args, **kwargs):
    result = orig(self, step, *args, **kwargs)
    every = getattr(self.report_manager, "report_every", 0)
    if every and step % every == 0:
        line = viterbi_health(self.model)
        if line:
            from onmt.utils.logging import logger as onmt_logger

            onmt_logger.info("Step %d; %s", step, line)
    return result


def viterbi_health(model) -> str | None:
    """``attn_fallback …; attn_frozen …; T/g [[…], […]]`` for the Viterbi and SparseMAP attentions of ``model``
    since the last call (their counters are read and reset; SparseMAP adds ``attn_structures …``, the mean number
    of active segmentations per row), or None when the model has none or they saw no row."""
    from structattn.attention import SparsemapAttention, ViterbiAttention

    rows = dead = frozen = srows = structures = 0
    taus = []
    for module in model.modules():
        if isinstance(module, (ViterbiAttention, SparsemapAttention)):
            r, d, f = module.pop_fallback_counts()
            rows, dead, frozen = rows + r, dead + d, frozen + f
            taus.append((module.effective_transitions().detach() / module.gamma).cpu())
        if isinstance(module, SparsemapAttention):
            sr, st, _ = module.pop_structure_counts()
            srows, structures = srows + sr, structures + st
    if not taus or rows == 0:
        return None
    tau = torch.stack(taus).mean(0).tolist()
    t = "[[" + "], [".join(", ".join(f"{x:.3f}" for x in row) for row in tau) + "]]"
    line = f"structattn attention: attn_fallback {dead / rows:.4f}; attn_frozen {frozen / rows:.4f}; T/g {t}"
    return line + (f"; attn_structures {structures / srows:.3f}" if srows else "")


# ---- CPU data-parallel training ------------------------------------------------------------------------------


def cpu_parallel(opt) -> bool:
    """Whether ``opt`` asks for several training processes on a machine without CUDA."""
    return getattr(opt, "world_size", 1) > 1 and not torch.cuda.is_available()


def quiet_onmt_warnings() -> None:
    """Silence the FutureWarnings torch 2.13 raises for OpenNMT-py 3.5.1's use of ``torch.cuda.amp`` (decorators
    at import, ``autocast`` at every step): they say nothing about the user's run. Changes no behaviour."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.cuda\.amp\.")


def _spawned_train(process_fn, opt, device_id, error_queue):
    """Target of each training worker (spawned: runs in a fresh interpreter)."""
    global _cpu_parallel
    quiet_onmt_warnings()
    install()
    _cpu_parallel = cpu_parallel(opt)
    if _cpu_parallel:
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, len(opt.gpu_ranks))))
    import onmt.utils.distributed

    return onmt.utils.distributed.spawned_train(process_fn, opt, device_id, error_queue)


def _configure_process(opt, device_id):
    import onmt.train_single
    from onmt.utils.misc import set_random_seed

    if _cpu_parallel:
        set_random_seed(opt.seed, False)
        return
    return original(onmt.train_single, "configure_process")(opt, device_id)


def _use_gpu(opt):
    import onmt.utils.misc

    return False if _cpu_parallel else original(onmt.utils.misc, "use_gpu")(opt)


def _build_dynamic_dataset_iter(*args, **kwargs):
    import onmt.train_single

    if _cpu_parallel:
        kwargs["device_id"] = -1
    return original(onmt.train_single, "build_dynamic_dataset_iter")(*args, **kwargs)


def _all_gather_list(data, max_size=4096):
    import onmt.utils.distributed

    if not _cpu_parallel:
        return original(onmt.utils.distributed, "all_gather_list")(data, max_size=max_size)
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, data)
    return out


# ---- attention export ---------------------------------------------------------------------------------------


def set_dump_collector(collector) -> None:
    """Make ``collector`` (a :class:`structattn_onmt.dump.DumpCollector`, or None) receive the translations."""
    global _dump
    _dump = collector


def _load_test_model(opt, *args, **kwargs):
    import onmt.model_builder

    vocabs, model, model_opt = original(onmt.model_builder, "load_test_model")(opt, *args, **kwargs)
    if _dump is not None:
        _dump.add_model(model_opt, kwargs.get("model_path") or (opt.models[0] if opt.models else None))
    return vocabs, model, model_opt


class _BucketTracker:
    """Wraps OpenNMT's inference iterator: yields its (batch, bucket) pairs and tells the collector the bucket."""

    def __init__(self, inner, collector):
        self._inner, self._collector = inner, collector

    def __getattr__(self, name):  # bucket_size, transforms, ...
        return getattr(self._inner, name)

    def __iter__(self):
        for batch, bucket_idx in self._inner:
            self._collector.set_bucket(bucket_idx)
            yield batch, bucket_idx


def _translate(orig, self, infer_iter, *args, **kwargs):
    collector = _dump
    if collector is None:
        return orig(self, infer_iter, *args, **kwargs)
    transform = args[0] if args else kwargs.get("transform")
    collector.start(self, transform)
    if isinstance(infer_iter, list):
        tracked = list(infer_iter)  # OpenNMT's list form (one batch, bucket 0) is tested with isinstance
        if tracked:
            collector.set_bucket(tracked[0][1])
    else:
        tracked = _BucketTracker(infer_iter, collector)
    result = orig(self, tracked, *args, **kwargs)
    collector.translation_done()
    return result


def _translate_batch(orig, self, batch, attn_debug, *args, **kwargs):
    return orig(self, batch, attn_debug or _dump is not None, *args, **kwargs)


def _from_batch(orig, self, translation_batch, *args, **kwargs):
    translations = orig(self, translation_batch, *args, **kwargs)
    if _dump is not None:
        _dump.add_translations(translations, self.vocabs)
    return translations
