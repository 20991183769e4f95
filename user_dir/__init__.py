"""Shim for clones: ``--user-dir user_dir`` (the path every command before version 0.1.0's wheel used) loads the
fairseq plugin, which is the package :mod:`structattn_fairseq` (installed with structattn; ``structattn-user-dir``
prints its folder, to pass to ``--user-dir`` from anywhere). See docs/plugin.md.

fairseq imports a ``--user-dir`` folder by its base name, so this folder is the module ``user_dir``; it registers
nothing itself (a second registration of the same model name would fail) and only imports the package. The old
submodule names (``user_dir.checkpoint_compat``, ``user_dir.structattn_lstm``, ...) stay importable as aliases of
the package's modules, so scripts written against them keep working.
"""

import importlib
import os
import pkgutil
import sys

import structattn_fairseq
from structattn_fairseq import cli_checks

# `--user-dir user_dir` is this plugin too: the command-line checks apply (structattn_fairseq/cli_checks.py).
cli_checks.PLUGIN_DIRS.add(os.path.dirname(os.path.realpath(__file__)))

for _name in sorted(m.name for m in pkgutil.iter_modules(structattn_fairseq.__path__)):
    _module = importlib.import_module(f"structattn_fairseq.{_name}")
    sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
