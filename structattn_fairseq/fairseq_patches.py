"""Deliberate changes to fairseq's behaviour, installed by :func:`install` when the plugin is loaded
(``--user-dir`` imports ``structattn_fairseq/__init__.py``, which calls it).

Each patch says what fairseq does, why we change it, and the fairseq version it was checked against. They are
idempotent and process-wide: once fairseq has imported the plugin, every later use of fairseq in the process
(training, validation, fairseq-generate) sees them.

Checked against: fairseq 0.12.2 and ``fairseq-fixed`` 0.12.3.1 (the build that imports on Python 3.11; same
``fairseq/data/iterators.py``), torch 2.13, CPython 3.11.

Patches
-------
All of them are installed here (this module):

``command-line checks`` (:func:`_install_cli_checks`)
    *What fairseq does.* ``fairseq.options.parse_args_and_arch`` parses the command line and returns; most bad
    inputs (a missing data directory or checkpoint, ``--fp16 --cpu``, ``--dump-attention`` given to fairseq-train)
    surface only deep inside the run, as a traceback, sometimes after files were created.
    *What we do.* Wrap it: after parsing, command lines that load this plugin (``--user-dir`` is this folder) go
    through :func:`structattn_fairseq.cli_checks.check_args`, and a failed check exits like argparse (one line, status 2).
    Other command lines in the same process, and partial namespaces (``suppress_defaults``), parse exactly as before.

``--help lists model options`` (:func:`_install_model_help`)
    *What fairseq does.* ``fairseq-train --arch A --help`` prints the help page before
    ``fairseq.options.add_model_args`` has added the options of model A, so the options of no model are listed.
    *What we do.* Wrap ``add_model_args``: when ``-h``/``--help`` is on the command line and ``--arch`` names a model
    defined in this plugin, add that model's options to the parser up front (argparse then prints them and exits, so
    the regular registration never happens). Without ``--help`` nothing changes; fairseq's own models are untouched.

``checkpoints load under torch's weights-only unpickler`` (:func:`_install_checkpoint_loading`)
    *What fairseq does.* ``checkpoint_utils.load_checkpoint_to_cpu`` (every CLI's checkpoint loading, and
    ``load_model_ensemble_and_task``), ``checkpoint_utils.load_ema_from_checkpoint`` and, in data-parallel runs,
    ``distributed.utils._broadcast_object_slow`` (rank 0 sends the loaded state to the others) call ``torch.load``
    without ``weights_only``; since torch 2.6 that means the restricted unpickler, which refuses fairseq's own
    checkpoints (``argparse.Namespace``, OmegaConf configs, numpy meters).
    *What we do.* Run those three functions inside :func:`structattn_fairseq.checkpoint_compat.allow_fairseq_checkpoints`,
    which allows exactly the globals fairseq checkpoints hold (listed and justified in that module) for the
    duration of the call, rather than turning the safety off or widening torch's allow-list for the whole process.

``prefetch thread closed at exit`` (:class:`ClosableBackgroundConsumer`)
    *What fairseq does.* ``EpochBatchIterator`` wraps each epoch in a ``BufferedIterator`` (``--data-buffer-size``,
    default 10) whose ``BackgroundConsumer`` — a *daemon* thread — collates batches ahead of the training loop.
    Nothing ever stops that thread: when training stops in the middle of an epoch (``--max-update``,
    ``--stop-time-hours``, early stopping) the process exits while it is still collating.

    *What goes wrong.* At interpreter exit, CPython ≤ 3.13 ends a daemon thread that tries to take the GIL back with
    ``pthread_exit``, which unwinds the thread's stack with a forced unwind. If the thread is inside torch's C++
    code at that moment — collating calls tensor ops that release the GIL; a core dump of fairseq-train caught it
    in ``THPVariable_dealloc`` → ``PyEval_RestoreThread`` → ``take_gil`` → ``PyThread_exit_thread``, Python stack
    ``BackgroundConsumer.run`` → ``collate_tokens`` (``data_utils.py:70``) — the unwind meets a ``noexcept`` C++
    frame and the C++ runtime calls ``std::terminate``: "terminate called without an active exception", SIGABRT,
    exit status 134, *after* the checkpoint was written and "done training" was logged. It only happens mid-epoch
    (at the end of an epoch the thread has already queued everything and returned) and only while the thread is
    still filling its queue (with a full queue it waits on a plain lock, which exits harmlessly), so it depends on
    timing: on a quiet 2-core machine ``--max-update 1`` aborted every time; under load, rarely
    (``scripts/repro_exit_abort.sh`` counts it; docs/reliability.md has the numbers).

    *What we do.* Upstream-style: the consumer thread becomes closable — it checks a stop flag after each batch it
    queues — and an ``atexit`` hook closes every live consumer before the interpreter starts finalising (CPython
    runs ``atexit`` callbacks while daemon threads still run normally). Closing sets the flag, empties the queue so
    that a thread blocked on a full queue wakes up, and joins it (the batch being collated finishes first, so the
    thread never sits in torch code when the process exits). Prefetching is unchanged during training; the
    batch-queue contents are only ever dropped at exit, after fairseq has finished.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import queue
import sys
import threading
import time
import weakref

logger = logging.getLogger(__name__)

CHECKED_FAIRSEQ_VERSIONS = ("0.12.2", "0.12.3.1")
"""fairseq versions whose code the patches below were read against (others get a warning, and the patches)."""

CLOSE_TIMEOUT_S = 60.0
"""How long the exit hook waits for one prefetch thread to finish the batch it is collating."""

_installed = False


def install() -> None:
    """Install every patch of this module (idempotent)."""
    global _installed
    if _installed:
        return
    import fairseq

    if fairseq.__version__ not in CHECKED_FAIRSEQ_VERSIONS:
        logger.warning("structattn: fairseq %s is not one of the versions its fairseq patches were checked "
                       "against (%s); see structattn_fairseq/fairseq_patches.py", fairseq.__version__,
                       ", ".join(CHECKED_FAIRSEQ_VERSIONS))
    _install_checkpoint_loading()
    _install_closable_prefetch()
    _install_model_help()
    _install_cli_checks()
    _installed = True


# --- command-line checks -------------------------------------------------------------------------------------------

def _install_cli_checks() -> None:
    """Wrap ``fairseq.options.parse_args_and_arch`` once (idempotent)."""
    import fairseq.options as fairseq_options

    from . import cli_checks

    original = fairseq_options.parse_args_and_arch
    if getattr(original, "_structattn_checks", False):
        return

    def parse_args_and_arch(parser, input_args=None, parse_known=False, suppress_defaults=False,
                            modify_parser=None):
        result = original(parser, input_args=input_args, parse_known=parse_known,
                          suppress_defaults=suppress_defaults, modify_parser=modify_parser)
        args = result[0] if parse_known else result
        # The wrapper stays installed for the whole process once the plugin is imported: check only command lines
        # that load this plugin.
        if not suppress_defaults and cli_checks.loads_this_plugin(args):
            message = cli_checks.check_args(args)
            if message:
                cli_checks.fail(parser, message)
        return result

    parse_args_and_arch._structattn_checks = True
    fairseq_options.parse_args_and_arch = parse_args_and_arch


# --- --help lists model options ------------------------------------------------------------------------------------

def arch_from_argv(argv) -> str | None:
    """The value of ``--arch``/``-a`` in a command line, or None."""
    for i, a in enumerate(argv):
        if a in ("--arch", "-a") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--arch="):
            return a.split("=", 1)[1]
    return None


def _install_model_help() -> None:
    import fairseq.options as fairseq_options

    original = fairseq_options.add_model_args
    if getattr(original, "_structattn_help_hook", False):
        return

    def add_model_args(parser):
        group = original(parser)
        argv = sys.argv[1:]
        if "-h" in argv or "--help" in argv:
            from fairseq.models import ARCH_MODEL_REGISTRY

            arch = arch_from_argv(argv)
            model = ARCH_MODEL_REGISTRY.get(arch) if arch is not None else None
            if model is not None and model.__module__.split(".")[0] == __name__.split(".")[0]:
                model.add_args(parser.add_argument_group(
                    f"Model-specific configuration (--arch {arch})", argument_default=argparse.SUPPRESS))
        return group

    add_model_args._structattn_help_hook = True
    fairseq_options.add_model_args = add_model_args


# --- checkpoints load under torch's weights-only unpickler ---------------------------------------------------------

def _scoped_allow_list(fn):
    """``fn`` run inside :func:`checkpoint_compat.allow_fairseq_checkpoints`."""
    import functools

    from .checkpoint_compat import allow_fairseq_checkpoints

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with allow_fairseq_checkpoints():
            return fn(*args, **kwargs)

    wrapper._structattn_allow_list = True
    return wrapper


CHECKPOINT_LOADERS = (
    ("fairseq.checkpoint_utils", "load_checkpoint_to_cpu"),
    ("fairseq.checkpoint_utils", "load_ema_from_checkpoint"),
    ("fairseq.distributed.utils", "_broadcast_object_slow"),
)
"""The fairseq functions that call ``torch.load`` on checkpoint state (module, name), checked in 0.12.x."""


def _install_checkpoint_loading() -> None:
    import importlib

    for module_name, name in CHECKPOINT_LOADERS:
        module = importlib.import_module(module_name)
        fn = getattr(module, name)
        if not getattr(fn, "_structattn_allow_list", False):
            # Callers look these up as module attributes at call time (checkpoint_utils.load_checkpoint_to_cpu,
            # the module-global call in load_model_ensemble_and_task and broadcast_object), so this reaches them.
            setattr(module, name, _scoped_allow_list(fn))


# --- prefetch thread closed at exit ------------------------------------------------------------------------------

_live_consumers: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


def _consumer_class():
    """The closable subclass of fairseq's ``BackgroundConsumer`` (built lazily: this module imports without
    fairseq)."""
    from fairseq.data import iterators

    base = getattr(iterators, "_StructattnOriginalBackgroundConsumer", iterators.BackgroundConsumer)

    class ClosableBackgroundConsumer(base):
        """fairseq's prefetch thread with a :meth:`close`: the same loop as ``BackgroundConsumer.run`` (0.12.x),
        plus a stop flag checked after each queued batch."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._stop_requested = threading.Event()
            _live_consumers.add(self)

        def run(self):
            # Same statements as fairseq 0.12.x BackgroundConsumer.run, plus the two stop checks.
            if self.cuda_device is not None:
                import torch

                torch.cuda.set_device(self.cuda_device)
            try:
                for item in self._source:
                    self._queue.put(item)
                    if self._stop_requested.is_set():
                        return
                    self.count += 1
                    if self._max_len is not None and self.count >= self._max_len:
                        break
                self._queue.put(_sentinel())
            except Exception as e:  # noqa: BLE001 - handed to the training loop, as fairseq does
                if not self._stop_requested.is_set():
                    self._queue.put(e)

        def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
            """Stop prefetching and wait for the thread to return; True if it did within ``timeout`` seconds.
            Queued batches are dropped, so call it only when nobody will read this epoch any more."""
            self._stop_requested.set()
            deadline = time.monotonic() + timeout
            while self.is_alive() and time.monotonic() < deadline:
                _drain(self._queue)  # wakes a thread blocked on a full queue
                self.join(0.05)
            return not self.is_alive()

    ClosableBackgroundConsumer.__module__ = __name__
    ClosableBackgroundConsumer.__qualname__ = "ClosableBackgroundConsumer"
    return ClosableBackgroundConsumer


def _sentinel():
    from fairseq.data import iterators

    return iterators._sentinel


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def close_prefetch_threads(timeout: float = CLOSE_TIMEOUT_S) -> int:
    """Close every live prefetch thread (the ``atexit`` hook; also callable directly). Returns how many were
    still running and had to be stopped; logs any that did not stop within ``timeout`` seconds."""
    stopped = 0
    for consumer in list(_live_consumers):
        if consumer.is_alive():
            stopped += 1
            if not consumer.close(timeout):
                logger.warning("structattn: a fairseq prefetch thread did not stop within %.0f s; the process may "
                               "abort at exit (see structattn_fairseq/fairseq_patches.py)", timeout)
    return stopped


def _install_closable_prefetch() -> None:
    from fairseq.data import iterators

    if getattr(iterators.BackgroundConsumer, "_structattn_closable", False):
        return
    iterators._StructattnOriginalBackgroundConsumer = iterators.BackgroundConsumer
    cls = _consumer_class()
    cls._structattn_closable = True
    # BufferedIterator._create_consumer looks the class up in the module's globals at call time.
    iterators.BackgroundConsumer = cls
    atexit.register(close_prefetch_threads)
