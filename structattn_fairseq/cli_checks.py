"""Early checks of fairseq command lines that load this plugin: one clear line instead of a traceback, before
any work is done and before any file is created or removed.

fairseq 0.12 finds most bad inputs only deep inside a run, as a traceback (a missing data directory or checkpoint
in ``os.listdir``/``torch.load``; ``--bf16`` as an ``AttributeError`` about ``xla_device``; ``--fp16 --cpu`` as
"Torch not compiled with CUDA enabled"), and ``--dump-attention`` given to fairseq-train was only noticed at the
second batch iterator, after the dump's temporary file had been created. :func:`check_args` checks the parsed
arguments right after ``fairseq.options.parse_args_and_arch`` (which fairseq-train/-generate/-interactive call right
after importing ``--user-dir``); the wrapper that calls it is a patch of fairseq, and lives with the others in
``structattn_fairseq/fairseq_patches.py``. A failed check prints ``<prog>: error: <message>`` to
stderr and exits with status 2, like argparse. Nothing changes for command lines that pass the checks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

from structattn.export import check_dump_destination


def _kind(args) -> str:
    """Which fairseq CLI parsed ``args``: "train", "interactive", "generate" or "other" (told apart by the
    option groups each parser has)."""
    if hasattr(args, "max_update"):
        return "train"
    if hasattr(args, "buffer_size"):
        return "interactive"
    if hasattr(args, "beam"):
        return "generate"
    return "other"


def _local_paths(paths: str) -> list[str]:
    if not paths or "://" in paths:  # remote (s3://, manifold://): left to fairseq's PathManager
        return []
    return [p for p in paths.split(os.pathsep) if p]


def dump_destination_problem(path: str) -> str | None:
    """Why ``path`` cannot receive an attention dump (None if it can): :func:`structattn.export.check_dump_destination`
    with the probe, so that an unwritable destination fails before any work."""
    try:
        check_dump_destination(path, probe=True)
    except OSError as e:
        return str(e)
    return None


def check_args(args) -> str | None:
    """The first problem found in the parsed fairseq arguments, as a one-line message (None if none)."""
    kind = _kind(args)
    task = getattr(args, "task", None)
    if task in ("translation", "structattn_translation") and isinstance(getattr(args, "data", None), str):
        for p in _local_paths(args.data):
            if not os.path.isdir(p):
                what = "does not exist" if not os.path.exists(p) else "is not a directory"
                return (f"data directory {p!r} {what} (give the --destdir of fairseq-preprocess)")
    if kind in ("generate", "interactive") and isinstance(getattr(args, "path", None), str):
        for p in _local_paths(args.path):
            if not os.path.isfile(p):
                return f"--path: checkpoint file {p!r} not found"
    dump = getattr(args, "dump_attention", None)
    if not dump and (getattr(args, "dump_attention_layer", None) is not None
                     or getattr(args, "dump_attention_heads", None) is not None):
        return ("--dump-attention-layer/--dump-attention-heads choose what --dump-attention writes; give "
                "--dump-attention PATH too")
    if dump:
        if kind != "generate":
            return ("--dump-attention works with fairseq-generate only (one pass over --gen-subset); remove it "
                    f"from this fairseq-{kind} command")
        problem = dump_destination_problem(dump)
        if problem:
            return problem
    if kind == "train":
        # fairseq 0.12: --bf16 (and --memory-efficient-bf16) sets --tpu and the trainer then asks torch_xla for
        # the device, on any machine; --fp16's FP16Optimizer keeps its fp32 master weights on CUDA.
        if getattr(args, "bf16", False) and importlib.util.find_spec("torch_xla") is None:
            return ("--bf16 is not supported here: in fairseq 0.12 it implies --tpu and needs torch_xla (TPU only, "
                    "also on GPUs); use --fp16 on a GPU, or --memory-efficient-fp16 on CPU (see docs/reliability.md)")
        if getattr(args, "fp16", False) and not getattr(args, "memory_efficient_fp16", False):
            if getattr(args, "cpu", False) or not torch.cuda.is_available():
                return ("--fp16 needs a CUDA GPU (fairseq's FP16Optimizer keeps fp32 master weights on it); on CPU "
                        "use --memory-efficient-fp16, or train in float32")
    return None


# The folders whose ``--user-dir`` loads this plugin: this package's own, and the clone's ``structattn_fairseq/`` shim (which
# adds itself on import, so that ``--user-dir user_dir`` keeps the checks of the commands that predate the package).
PLUGIN_DIRS = {os.path.dirname(os.path.realpath(__file__))}


def loads_this_plugin(args) -> bool:
    """Whether the command line that produced ``args`` loads this plugin (``--user-dir`` is one of
    :data:`PLUGIN_DIRS`)."""
    user_dir = getattr(args, "user_dir", None)
    if not user_dir:
        return False
    return os.path.realpath(os.path.expanduser(str(user_dir))) in PLUGIN_DIRS


def fail(parser: argparse.ArgumentParser, message: str):
    """Exit like argparse does on a bad command line: ``<prog>: error: <message>``, status 2."""
    sys.stderr.write(f"{parser.prog}: error: {message}\n")
    sys.exit(2)
