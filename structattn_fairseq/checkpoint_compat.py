"""Let fairseq 0.12 load its own checkpoints under torch >= 2.6 (``torch.load`` defaults to ``weights_only=True``).

fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` calls ``torch.load(f, map_location=...)`` with no
``weights_only`` argument, so on torch >= 2.6 the restricted unpickler refuses anything that is not a tensor or a
plain container. Instead of switching that safety off (``weights_only=False`` / TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD),
the plugin allows exactly the non-tensor globals found in checkpoints written by fairseq-train 0.12, and only
while fairseq loads a checkpoint (:func:`allow_fairseq_checkpoints`, entered around fairseq's loaders by
``structattn_fairseq/fairseq_patches.py``; torch's allow-list for the rest of the process is left as it was) (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` and by loading, for
``structattn_lstm`` trained with and without ``--eval-bleu``, last/best/interval checkpoints):

* ``argparse.Namespace`` — the model configuration of models declared with ``add_args`` (``cfg.model``);
* with ``--eval-bleu``, the BLEU count meters in ``extra_state.metrics`` hold integer numpy arrays:
  ``numpy.ndarray``, ``numpy._core.multiarray._reconstruct`` (``numpy.core.multiarray._reconstruct`` in files
  written under numpy 1.x), ``numpy.dtype`` and the dtype class of numpy's default integer (``Int64DType``).

* in data-parallel training, rank 0 loads the checkpoint and sends the state to the other ranks through
  ``torch.save``/``torch.load`` (``fairseq.distributed.utils.broadcast_object``); that state holds the OmegaConf
  config, whose pickle names ``omegaconf.DictConfig``, ``ListConfig``, ``base.ContainerMetadata``,
  ``base.Metadata``, ``nodes.AnyNode``, ``typing.Any``, ``collections.defaultdict`` and the builtin types
  ``dict``, ``list`` and ``int`` (as metadata ``ref_type``/``object_type`` values); the tensors themselves travel
  separately and are replaced in that pickle by ``fairseq.distributed.utils._TensorPlaceholder``.

Everything else in a fairseq checkpoint (dicts, lists, OrderedDict, tensors, numbers, strings) is already allowed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import typing

import numpy as np
import omegaconf
import omegaconf.base
import omegaconf.nodes
import torch


def fairseq_checkpoint_globals() -> list:
    """The allow-list entries (objects, or (object, pickled name) pairs) registered by :func:`register`."""
    try:
        reconstruct = np._core.multiarray._reconstruct  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        reconstruct = np.core.multiarray._reconstruct
    entries = [
        argparse.Namespace,
        np.ndarray,
        np.dtype,
        type(np.array([0]).dtype),  # numpy.dtypes.Int64DType on Linux: what np.array(list of ints) produces
        reconstruct,
        # the OmegaConf config broadcast from rank 0 when a data-parallel run resumes
        omegaconf.DictConfig,
        omegaconf.ListConfig,
        omegaconf.base.ContainerMetadata,
        omegaconf.base.Metadata,
        omegaconf.nodes.AnyNode,
        typing.Any,
        collections.defaultdict,
        dict,
        list,
        int,
    ]
    try:  # fairseq is always there when fairseq loads a checkpoint; keep this module importable without it
        from fairseq.distributed.utils import _TensorPlaceholder

        entries.append(_TensorPlaceholder)
    except ImportError:  # pragma: no cover
        pass
    name = f"{reconstruct.__module__}.{reconstruct.__name__}"
    for alias in ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"):
        if alias != name:
            entries.append((reconstruct, alias))
    return entries


@contextlib.contextmanager
def allow_fairseq_checkpoints():
    """Within the block, ``torch.load`` (``weights_only=True``) also accepts :func:`fairseq_checkpoint_globals`.

    Use it to load a fairseq checkpoint outside fairseq's CLIs::

        with allow_fairseq_checkpoints():
            state = torch.load("checkpoint_best.pt", map_location="cpu")
    """
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: no scoped allow-list, nothing to widen
        yield
        return
    with torch.serialization.safe_globals(fairseq_checkpoint_globals()):
        yield
