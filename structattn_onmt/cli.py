"""Console commands ``structattn-onmt-train`` and ``structattn-onmt-translate``.

Each is OpenNMT-py's own command (``onmt.bin.train`` / ``onmt.bin.translate``: same parser, same YAML configs,
same behaviour) with :func:`structattn_onmt.patches.install` run first, plus:

* ``structattn-onmt-train``: ``-global_attention_function viterbi`` and ``-attention_reg``, ``-attention_gamma``,
  ``-attention_form``, ``-attention_contiguity``, ``-attention_chain`` (:mod:`structattn_onmt.options`);
  every problem with them, and with the options they combine with, stops the command with one ``error:`` line
  before any data is read.
  Unknown options are ignored, as ``onmt_train`` ignores them, except misspelt attention options (any unknown
  option whose name starts with ``attention``), which are errors.
* ``structattn-onmt-translate``: ``-dump_attention PATH`` writes the attention of every hypothesis in the format
  of :mod:`structattn.export` (:mod:`structattn_onmt.dump`).
* both: ``--version`` (or ``-version``) prints ``structattn <version>`` and exits, before OpenNMT is imported.
"""

from __future__ import annotations

import sys
import time

__all__ = ["train_main", "translate_main"]


def _print_version(argv) -> bool:
    """Print the version for ``--version``/``-version`` (OpenNMT's parser has no such option, and importing it
    takes seconds and needs OpenNMT-py installed); True if printed."""
    args = sys.argv[1:] if argv is None else argv
    if "--version" not in args and "-version" not in args:
        return False
    from structattn import __version__

    print(f"structattn {__version__}")
    return True


def _train_parser():
    from onmt.bin.train import _get_parser

    from . import patches

    parser = _get_parser()
    parser.prog = "structattn-onmt-train"
    patches.add_train_options(parser)
    return parser


def _parallel_problems(opt) -> list[str]:
    import torch

    from . import patches

    if opt.world_size <= 1 and opt.gpu_ranks and not torch.cuda.is_available():
        return [f"-gpu_ranks {' '.join(map(str, opt.gpu_ranks))} needs CUDA, which this machine does not have: "
                "leave -gpu_ranks out to train on the CPU (or add -world_size N -gpu_backend gloo for N processes)"]
    if not patches.cpu_parallel(opt):
        return []
    problems = []
    n = opt.world_size
    ranks = " ".join(str(r) for r in range(n))
    if not opt.gpu_ranks:
        problems.append(f"-world_size {n} on a machine without CUDA trains one CPU process per rank: give the ranks "
                        f"of this machine with -gpu_ranks (e.g. -gpu_ranks {ranks}) and -gpu_backend gloo")
    if opt.gpu_backend != "gloo":
        problems.append(f"-world_size {n} on a machine without CUDA needs -gpu_backend gloo (got {opt.gpu_backend}; "
                        "nccl needs CUDA)")
    if getattr(opt, "parallel_mode", "data_parallel") != "data_parallel":
        problems.append("CPU processes support -parallel_mode data_parallel only")
    return problems


def train_main(argv=None) -> int:
    """``structattn-onmt-train``: ``onmt_train`` with the structattn attentions."""
    if _print_version(argv):
        return 0
    from . import patches
    from .options import OPTION_NAMES, check_train_opt, options_from_opt

    patches.quiet_onmt_warnings()
    patches.install()
    parser = _train_parser()
    opt, unknown = parser.parse_known_args(argv)
    misspelt = [u for u in unknown if u.startswith("-") and u.lstrip("-").startswith("attention")]
    if misspelt:
        parser.error(f"unrecognized arguments: {' '.join(misspelt)} (the structattn options are "
                     f"{', '.join('-' + n for n in OPTION_NAMES)})")
    problems = check_train_opt(opt) + _parallel_problems(opt)
    if problems:
        parser.error("; ".join(problems))
    options = options_from_opt(opt)
    if options.attention == "viterbi":
        opt.attention_gamma = options.gamma  # the paper's default, filled in: the checkpoint records the γ used
    from onmt.bin.train import train

    train(opt)
    return 0


def _translate_parser():
    from onmt.bin.translate import _get_parser

    parser = _get_parser()
    parser.prog = "structattn-onmt-translate"
    group = parser.add_argument_group("structattn")
    group.add("--dump_attention", "-dump_attention", type=str, default=None, metavar="PATH",
              help="write every n-best hypothesis' attention matrix (target x source tokens) with its tokens and "
                   "texts to PATH, in the structattn attention-dump format read by structattn-stats, "
                   "structattn-plot and structattn-report (written to a temporary name, renamed when complete)")
    return parser


def translate_main(argv=None) -> int:
    """``structattn-onmt-translate``: ``onmt_translate`` that loads structattn models (and stock ones), with
    ``-dump_attention``."""
    if _print_version(argv):
        return 0
    from . import patches

    patches.quiet_onmt_warnings()
    patches.install()
    parser = _translate_parser()
    opt = parser.parse_args(argv)
    collector = None
    if opt.dump_attention:
        if opt.world_size > 1:
            parser.error("-dump_attention works with one translation process (-world_size 1)")
        from .dump import DumpCollector

        try:
            collector = DumpCollector(opt.dump_attention, opt)
        except OSError as exc:
            parser.error(str(exc))
    from onmt.bin.translate import translate

    patches.set_dump_collector(collector)
    try:
        start = time.time()
        translate(opt)
        print("Time w/o python interpreter load/terminate: ", time.time() - start)
        if collector is not None and not collector.done:
            raise RuntimeError("-dump_attention: OpenNMT finished without translating through the hooked search; "
                               "no dump written")
    except BaseException:
        if collector is not None:
            collector.abort()
        raise
    finally:
        patches.set_dump_collector(None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
