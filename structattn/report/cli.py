"""Console commands ``structattn-stats``, ``structattn-plot`` and ``structattn-report`` (see docs/attention_maps.md).

Outputs are built in a hidden staging directory next to the destination and moved into place only when
everything was written, so a failed or interrupted command leaves no partial files behind. Exit status: 0 on
success, 1 for unusable inputs/outputs (message on stderr), 2 for usage errors (argparse). Every command takes
``--version``; ``structattn-plot`` and ``structattn-report`` show progress on stderr (a tqdm bar, or plain lines
without tqdm) when stderr is a terminal or ``--progress`` is given. ``python -m structattn.report.cli COMMAND …``
runs ``stats``, ``plot`` or ``report`` as the console commands do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

__all__ = ["stats_main", "plot_main", "report_main", "main"]


class CliError(Exception):
    """A user-facing error: printed as ``<prog>: error: <message>``, exit status 1."""


# ---- shared helpers ------------------------------------------------------------------------------------------


def _version() -> str:
    from .. import __version__

    return f"structattn {__version__}"


def _add_common_options(p, progress: bool = False) -> None:
    p.add_argument("--version", action="version", version=_version())
    if progress:
        p.add_argument("--progress", action="store_true",
                       help="show progress on stderr (default: only when stderr is a terminal)")


def _progress(enabled: bool, prog: str):
    """``wrap(iterable, total, desc)`` → the iterable, shown as a tqdm bar on stderr when ``enabled`` (plain
    "prog: desc i/n" lines about every 10 % when tqdm is not installed), or unchanged."""
    if not enabled:
        return lambda iterable, total=None, desc="": iterable
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    def wrap(iterable, total=None, desc=""):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        if tqdm is not None:
            return tqdm(iterable, total=total, desc=f"{prog}: {desc}", unit="", file=sys.stderr)
        return _plain_progress(iterable, total, f"{prog}: {desc}")

    return wrap


def _plain_progress(iterable, total, desc):
    step = max(1, (total or 0) // 10)
    n = 0
    for n, item in enumerate(iterable, 1):
        yield item
        if n % step == 0 or n == total:
            print(f"{desc} {n}/{total if total is not None else '?'}", file=sys.stderr, flush=True)


def _show_progress(args) -> bool:
    return bool(args.progress) or sys.stderr.isatty()


def _load(spec: str):
    """``PATH`` or ``LABEL=PATH`` → ModelDump (label defaults to the file name without extension)."""
    from ..export import DumpError, read_dump
    from .html import ModelDump

    if os.path.exists(spec) or "=" not in spec:
        label, path = os.path.splitext(os.path.basename(spec))[0], spec
    else:
        label, path = spec.split("=", 1)
        if not label:
            raise CliError(f"empty label in {spec!r} (use LABEL=PATH)")
    if not os.path.exists(path):
        raise CliError(f"dump not found: {path}")
    if os.path.isdir(path):
        raise CliError(f"{path} is a directory, not an attention dump")
    try:
        metadata, records = read_dump(path)
    except DumpError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    return ModelDump(label, metadata, records, path)


def _load_all(specs):
    models = [_load(s) for s in specs]
    labels = [m.label for m in models]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise CliError(f"duplicate label(s) {', '.join(dup)}: name the dumps with LABEL=PATH")
    return models


def _ids(text: str) -> list:
    """'3,5,10-12' → [3, 5, 10, 11, 12]."""
    out = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            a, _, b = part.partition("-")
            lo, hi = int(a), int(b or a)
            if lo < 0 or hi < lo:
                raise ValueError
            out.extend(range(lo, hi + 1))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected ids like 3,5,10-12; got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("no id given")
    return out


def _rank(text: str):
    if text == "all":
        return None
    try:
        r = int(text)
    except ValueError:
        r = -1
    if r < 0:
        raise argparse.ArgumentTypeError(f"expected a rank >= 0 or 'all', got {text!r}")
    return r


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def _vmax(text: str):
    if text == "auto":
        return None
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'auto', got {text!r}")
    return v


def _add_plot_options(p):
    p.add_argument("--format", choices=("png", "svg"), default="png", help="image format (default: png)")
    p.add_argument("--dpi", type=_positive_int, default=100, help="resolution of PNG images (default: 100)")
    p.add_argument("--cmap", default="viridis_r", help="matplotlib colour map for weights > 0 (default: viridis_r; "
                   "exact zeros are always white, so pick a map without white)")
    p.add_argument("--vmax", type=_vmax, default=1.0,
                   help="weight mapped to the darkest colour: a number or 'auto' (per-matrix maximum); default 1")
    p.add_argument("--no-outline", action="store_true", help="do not outline non-zero cells")


def _plot_kwargs(args) -> dict:
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise CliError(f"unknown colour map {args.cmap!r} (see matplotlib.colormaps)")
    return {"cmap": args.cmap, "vmax": args.vmax, "outline": not args.no_outline}


def _staging_dir(outdir: str) -> str:
    """A fresh hidden directory beside ``outdir`` (same file system, so the final move is a rename)."""
    outdir = os.path.abspath(outdir)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise CliError(f"output {outdir} exists and is not a directory")
    parent = os.path.dirname(outdir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(outdir)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the published folder private
        return staging
    except OSError as e:
        raise CliError(f"cannot write to output directory {outdir}: {e.strerror or e}") from None


def _run(prog: str, fn, argv) -> int:
    try:
        return fn(argv)
    except CliError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130


# ---- structattn-stats ----------------------------------------------------------------------------------------


def _stats(argv) -> int:
    from ..export import eos_symbol
    from .diagonality import parked_verdict
    from .stats import STAT_COLUMNS, dump_gamma, dump_head_count, dump_kappa, dump_stats, dump_structures, format_stat

    p = argparse.ArgumentParser(
        prog="structattn-stats",
        description="Sparsity statistics of attention dumps: fraction of exact zeros, mean support size and "
        "mean number of contiguous non-zero segments per target row; EOS mass, diagonality (Spearman's rho of "
        "target position and argmax source position) and top-fifth share (target rows whose argmax lies in the "
        "most visited fifth of the source), and the verdict 'aligned', 'parked on </s>' or 'parked on a source "
        "region' (docs/attention_maps.md). Dumps of multi-head models written with "
        "every head (--dump-attention-heads all) get one more row per head, LABEL/hN.",
    )
    p.add_argument("dumps", nargs="+", metavar="[LABEL=]DUMP", help="attention dump(s) (fairseq-generate --dump-attention)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--exclude-eos", action="store_true", help="leave out the EOS row and the EOS source column")
    p.add_argument("--nbest-rank", type=_rank, default=0, metavar="R|all",
                   help="which hypotheses to count: n-best rank R (default 0, the final translation) or all")
    _add_common_options(p)
    args = p.parse_args(argv)
    models = _load_all(args.dumps)
    rows = []
    any_learned_gamma = False
    for m in models:
        kw = dict(nbest_rank=args.nbest_rank, exclude_eos=args.exclude_eos, eos=eos_symbol(m.metadata))
        heads = [dump_stats(m.records, head=h, **kw) for h in range(dump_head_count(m.records) or 0)]
        kappa, head_kappa = dump_kappa(m.metadata)
        gamma, head_gamma, learned = dump_gamma(m.metadata)
        any_learned_gamma |= learned
        st = dict(dump_stats(m.records, **kw), kappa=kappa, gamma=gamma)
        structures = dump_structures(m.metadata)
        if structures == structures:  # SparseMAP dumps only: the column exists where some dump has it
            st["structures_per_row"] = structures
        for stat in [st] + heads:
            verdict = parked_verdict(stat["eos_mass"], stat["top_fifth_share"])
            stat["parked"] = float("nan") if verdict is None else verdict
        for h, hs in enumerate(heads):
            hs["kappa"] = head_kappa[h] if head_kappa is not None and h < len(head_kappa) else float("nan")
            hs["gamma"] = head_gamma[h] if head_gamma is not None and h < len(head_gamma) else float("nan")
        rows.append((m, st, heads))

    def plain(st):
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in st.items()}

    if args.json:
        out = [
            {"label": m.label, "path": m.path, "arch": m.metadata.get("arch"), "attention": m.metadata.get("attention"),
             **plain(st), **({"heads": [plain(h) for h in heads]} if heads else {})}
            for m, st, heads in rows
        ]
        print(json.dumps(out, indent=2))
        return 0
    columns = list(STAT_COLUMNS) + [("parked", "verdict", "{}"), ("kappa", "κ", "{:.2f}")]
    if any("structures_per_row" in st for _, st, _ in rows):
        columns.append(("structures_per_row", "structures/row", "{:.2f}"))
        for _, st, heads in rows:
            for stat in [st] + heads:
                stat.setdefault("structures_per_row", float("nan"))
    if any_learned_gamma:  # per-head γ (--attention-gamma-mode learned|scaled); a fixed γ is in the dump's options
        columns.append(("gamma", "γ", "{:.3g}"))
    header = ["model"] + [name for _, name, _ in columns]
    table = [header]
    for m, st, heads in rows:
        for label, stat in [(m.label, st)] + [(f"{m.label}/h{h}", hs) for h, hs in enumerate(heads)]:
            table.append([label] + [format_stat(stat[k], f) for k, _, f in columns])
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for n, r in enumerate(table):
        print("  ".join(r[0].ljust(widths[0]) if c == 0 else r[c].rjust(widths[c]) for c in range(len(r))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def stats_main(argv=None) -> int:
    return _run("structattn-stats", _stats, argv)  # the console-script wrapper passes this to sys.exit


# ---- structattn-plot -----------------------------------------------------------------------------------------


def _plot(argv) -> int:
    p = argparse.ArgumentParser(
        prog="structattn-plot",
        description="Draw attention heatmaps (source on x, target on y; exact zeros white, non-zero cells "
        "outlined) from an attention dump, one image per hypothesis, named s<ID>_n<RANK>.<format>.",
    )
    p.add_argument("dump", help="attention dump (fairseq-generate --dump-attention)")
    p.add_argument("-o", "--output-dir", required=True, help="directory for the images (created if missing)")
    p.add_argument("--ids", type=_ids, help="sentence ids to draw, e.g. 3,5,10-12 (default: all)")
    p.add_argument("--max-sentences", type=_positive_int, help="draw at most this many sentences (lowest ids first)")
    p.add_argument("--nbest-rank", type=_rank, default=0, metavar="R|all",
                   help="n-best rank to draw (default 0, the final translation) or all")
    p.add_argument("--title", help="title on every image (default: the dump's arch/attention)")
    _add_plot_options(p)
    _add_common_options(p, progress=True)
    args = p.parse_args(argv)
    kw = _plot_kwargs(args)
    progress = _progress(_show_progress(args), "structattn-plot")
    from .plot import attention_figure, save_figure

    if _show_progress(args):
        print(f"structattn-plot: reading {args.dump}", file=sys.stderr, flush=True)
    m = _load(args.dump)
    recs = _records_to_draw(m, args)
    title = args.title if args.title is not None else m.describe()
    outdir = os.path.abspath(args.output_dir)
    staging = _staging_dir(outdir)
    try:
        names = []
        for r in progress(recs, desc="images"):
            name = f"s{r.id}_n{r.nbest_rank}.{args.format}"
            fig = attention_figure(r.attention, r.src_tokens, r.tgt_tokens, title=f"{title} · sentence {r.id}",
                                   dpi=args.dpi, **kw)
            save_figure(fig, os.path.join(staging, name))
            names.append(name)
        if not os.path.exists(outdir):
            os.rename(staging, outdir)
        else:
            for name in names:
                os.replace(os.path.join(staging, name), os.path.join(outdir, name))
            os.rmdir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {len(names)} images to {outdir}")
    return 0


def _records_to_draw(m, args) -> list:
    """The records of ``m`` that structattn-plot draws: the chosen n-best rank, --ids (each must exist), at most
    --max-sentences sentences (lowest ids first)."""
    recs = [r for r in m.records if args.nbest_rank is None or r.nbest_rank == args.nbest_rank]
    if args.ids is not None:
        have = {r.id for r in recs}
        missing = [i for i in args.ids if i not in have]
        if missing:
            raise CliError(f"{args.dump} has no sentence with id {missing[0]}"
                           + (f" at n-best rank {args.nbest_rank}" if args.nbest_rank is not None else ""))
        wanted = set(args.ids)
        recs = [r for r in recs if r.id in wanted]
    if args.max_sentences is not None:
        keep = sorted({r.id for r in recs})[: args.max_sentences]
        recs = [r for r in recs if r.id in set(keep)]
    if not recs:
        raise CliError(f"{args.dump}: no hypothesis to draw")
    return recs


def plot_main(argv=None) -> int:
    return _run("structattn-plot", _plot, argv)  # the console-script wrapper passes this to sys.exit


# ---- structattn-report ---------------------------------------------------------------------------------------


def _report(argv) -> int:
    p = argparse.ArgumentParser(
        prog="structattn-report",
        description="Static HTML report showing the same sentences under several models side by side (heatmaps "
        "and per-model sparsity statistics). The output folder is self-contained (index.html + img/).",
    )
    p.add_argument("dumps", nargs="+", metavar="[LABEL=]DUMP",
                   help="attention dumps in display order, e.g. softmax=a.jsonl l2=b.jsonl")
    p.add_argument("-o", "--output-dir", required=True, help="report folder (index.html and img/)")
    p.add_argument("--ids", type=_ids, help="sentence ids to show, e.g. 3,5,10-12 (each must be in every dump)")
    p.add_argument("--max-sentences", type=_positive_int, default=10,
                   help="without --ids: show the first N sentences common to all dumps (default: 10)")
    p.add_argument("--nbest-rank", type=_rank, default=0, metavar="R", help="n-best rank to show (default 0)")
    p.add_argument("--title", help="page title")
    p.add_argument("--exclude-eos", action="store_true", help="statistics without the EOS row and column")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty output folder")
    _add_plot_options(p)
    _add_common_options(p, progress=True)
    args = p.parse_args(argv)
    if args.nbest_rank is None:
        p.error("--nbest-rank all is not supported by the report; give one rank")
    kw = _plot_kwargs(args)
    from ..fileio import replace_dir
    from .html import build_report

    outdir = os.path.abspath(args.output_dir)
    if os.path.isdir(outdir) and os.listdir(outdir) and not args.force:
        raise CliError(f"output folder {outdir} exists and is not empty (use --force to replace it)")
    progress = _progress(_show_progress(args), "structattn-report")
    models = _load_all(progress(args.dumps, desc="reading dumps"))
    staging = _staging_dir(outdir)
    try:
        try:
            index = build_report(models, staging, ids=args.ids, max_sentences=args.max_sentences,
                                 nbest_rank=args.nbest_rank, fmt=args.format, title=args.title,
                                 exclude_eos=args.exclude_eos, dpi=args.dpi, progress=progress, **kw)
        except ValueError as e:
            raise CliError(str(e)) from None
        n_images = len(os.listdir(os.path.join(staging, "img")))
        replace_dir(staging, outdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {os.path.join(outdir, os.path.basename(index))} ({n_images} images)")
    return 0


def report_main(argv=None) -> int:
    return _run("structattn-report", _report, argv)  # the console-script wrapper passes this to sys.exit


# ---- python -m structattn.report.cli ---------------------------------------------------------------------------

COMMANDS = {"stats": stats_main, "plot": plot_main, "report": report_main}

_USAGE = """usage: python -m structattn.report.cli {stats,plot,report} ... [--help]

The attention-dump commands (installed as console commands):
  stats    sparsity statistics of attention dumps (= structattn-stats)
  plot     heatmaps of one dump, one image per hypothesis (= structattn-plot)
  report   side-by-side HTML report of several dumps (= structattn-report)
"""


def main(argv=None) -> int:
    """``python -m structattn.report.cli COMMAND ARGS…``: the command's exit status; usage and 2 without a known
    command, ``--version`` and ``--help`` as usual."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if argv[:1] == ["--version"]:
        print(_version())
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        print(_USAGE, end="")
        return 0
    print(_USAGE, end="", file=sys.stderr)
    if argv:
        print(f"python -m structattn.report.cli: error: unknown command {argv[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
