"""Collect a recipe run (scores, training logs, attention statistics, commands) into a Markdown RESULTS file.

Reads, for every variant ``V`` in ``<work>/runs/V/``: ``score.json`` (and ``score.multiref.json``) written by
``sacrebleu -f json``, ``train.log`` (``fairseq-train --log-format json``) and ``attention_stats.json``
(``structattn-stats --json``), ``health.json`` (``structattn-health``: fallback rows and learned transitions T/γ
of Viterbi models) and ``hyp.test.en`` (degenerate-output checks); the data sizes from
``<work>/data``; the commands from ``<work>/stamps``.
Nothing is estimated: a missing file is shown as "–" and listed under "Missing".

OpenNMT-py runs (``--toolkit onmt``: ``<work>/runs/onmt-V/``, :data:`variants.RUN_PREFIX`) have the same files;
their ``train.log`` is ``structattn-onmt-train``'s (:func:`parse_onmt_train_log`: the ``Step N/M; ... tok/s; T
sec`` lines, ``Validation perplexity``, saved checkpoints, the parameter count and the Viterbi attention's
``structattn attention: attn_fallback ...`` lines). The table holds the rows of ``--toolkit`` for every variant
and, next to them, those of the other toolkit that have a ``score.json`` (one work folder, one table; a
*toolkit* and a *params* column appear when an OpenNMT-py row is present).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

from .. import __version__
from ..ops.segmentation import COUPLED_KAPPA, INDEPENDENT_KAPPA, coupling_verdict
from ..report.diagonality import EOS_MASS_PARKED, PARKED_SHARE, VERDICTS, parked_verdict

# the variant table (structattn/evaluation/variants.py): variant name → its label; toolkits and run folders
from .variants import LABELS, TOOLKITS, run_label, run_name

_JSON = re.compile(r"\|\s*(train|valid|train_inner)\s*\|\s*(\{.*\})\s*$")
# fairseq 0.12's messages when --stop-time-hours or --patience ends a training (its config dump, which also names
# stop_time_hours, must not match)
_TIME_STOP = re.compile(r"exceeded --stop-time-hours|Stopping training due to cumulative_training_time")
_EARLY_STOP = re.compile(r"early stop since valid performance hasn't improved")
_FAIRSEQ_PARAMS = re.compile(r"num\. shared model params: ([\d,]+)")
# OpenNMT-py 3.5 (onmt/utils/statistics.py, report_manager.py, model_saver.py, trainer.py, models/model.py) and the
# structattn_onmt health line (structattn_onmt/patches.py: viterbi_health)
_ONMT_STEP = re.compile(r"\bStep\s+(\d+)/\s*\d+;(.*)$")
_ONMT_FIELD = re.compile(r"(acc|ppl|xent|lr|sents):\s*([-+0-9.eEinfa]+);")
_ONMT_BSZ = re.compile(r"bsz:\s*(\d+)/\s*(\d+)/\s*(\d+);")
_ONMT_SEC = re.compile(r"([\d.]+)\s+sec;")
_ONMT_VALID = re.compile(r"Validation perplexity:\s*([-+0-9.eEinfa]+)")
_ONMT_SAVED = re.compile(r"Saving checkpoint \S*_step_(\d+)\.pt")
_ONMT_START = re.compile(r"Start training loop")
_ONMT_PARAMS = re.compile(r"\* number of parameters:\s*(\d+)")
_ONMT_EARLY_STOP = re.compile(r"earlystopper has_stopped")
_ONMT_HEALTH = re.compile(r"Step (\d+); structattn attention: attn_fallback ([0-9.]+); attn_frozen ([0-9.]+); "
                          r"T/g \[\[([-0-9.e]+), ([-0-9.e]+)\], \[([-0-9.e]+), ([-0-9.e]+)\]\]")

#: a Viterbi model spending more than this fraction of its attention rows on the softmax fallback is flagged
FALLBACK_WARN = 0.05
#: a hypothesis with one token this many times in a row counts as degenerate (looping) output
REPEAT_RUN = 4
#: ... and so does one with a phrase of 2 to PHRASE_MAX tokens repeated PHRASE_RUN times in a row ("and he said to
#: him, and he said to him, and he said to him"), which the token count misses
PHRASE_MAX, PHRASE_RUN = 4, 3
#: a model whose target rows put more than this mean weight on the source's end-of-sentence column is flagged as
#: parked on EOS (its decoder can ignore the alignment: the EOS state summarises the sentence); one definition with
#: structattn-health's verdict (:data:`structattn.report.diagonality.EOS_MASS_PARKED`)
EOS_MASS_WARN = EOS_MASS_PARKED


def looping(tokens) -> bool:
    """True if ``tokens`` has one token :data:`REPEAT_RUN` times in a row, or a phrase of 2 to :data:`PHRASE_MAX`
    tokens :data:`PHRASE_RUN` times in a row."""
    t = list(tokens)
    if any(len(set(t[i:i + REPEAT_RUN])) == 1 for i in range(len(t) - REPEAT_RUN + 1)):
        return True
    for n in range(2, PHRASE_MAX + 1):
        for i in range(len(t) - n * PHRASE_RUN + 1):
            if all(t[i + k * n:i + (k + 1) * n] == t[i:i + n] for k in range(1, PHRASE_RUN)):
                return True
    return False


def kappa_of(health: dict):
    """κ of a health report (``structattn-health``): its own ``kappa``, else computed from ``T_over_gamma`` (reports
    written before κ existed); None for softmax/sparsemax."""
    if health.get("kappa") is not None:
        return health["kappa"]
    t = health.get("T_over_gamma")
    return None if not t else t[0][0] + t[1][1] - t[0][1] - t[1][0]


def read_scores(path: Path) -> dict:
    """``sacrebleu -m bleu chrf -f json`` output → {"BLEU": record, "chrF2": record}."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = [data]
    return {rec["name"]: rec for rec in data}


def parse_train_log(path: Path) -> dict:
    """Training summary from a ``--log-format json`` log (possibly several resumed runs appended)."""
    epochs, inner, valid = {}, [], []
    stopped_by_time = early_stop = False
    for line in path.read_text(errors="replace").splitlines():
        m = _JSON.search(line)
        if m:
            try:
                rec = json.loads(m.group(2))
            except json.JSONDecodeError:
                continue
            kind = m.group(1)
            if kind == "train":
                epochs[int(rec["epoch"])] = rec  # a resumed run re-logs an epoch: keep the last
            elif kind == "valid":
                valid.append(rec)
            else:
                inner.append(rec)
        elif _TIME_STOP.search(line):
            stopped_by_time = True
        elif _EARLY_STOP.search(line):
            early_stop = True
    out = {"stopped_by_time": stopped_by_time, "early_stop": early_stop}
    if not epochs:
        return out
    prev_updates, tokens, compute = 0, 0.0, 0.0
    for ep in sorted(epochs):
        rec = epochs[ep]
        upd = int(float(rec["train_num_updates"]))
        tokens += float(rec["train_wpb"]) * (upd - prev_updates)
        compute += float(rec.get("train_train_wall", 0))
        prev_updates = upd
    last = epochs[max(epochs)]
    out.update(updates=prev_updates, epochs=max(epochs), target_tokens=tokens, compute_s=compute,
               wall_s=float(last.get("train_wall", 0)),
               tokens_per_s=tokens / compute if compute > 0 else None,
               final_train_loss=float(last["train_loss"]))
    if valid:
        out["best_valid_loss"] = min(float(v["valid_loss"]) for v in valid)
        last_valid = valid[-1]
        if "valid_attn_fallback" in last_valid:  # a Viterbi model's metrics (structattn_fairseq/attention_options.py)
            out["valid_health"] = {
                "fallback_fraction": float(last_valid["valid_attn_fallback"]),
                "T_over_gamma": [[float(last_valid.get(f"valid_T{i}{j}/g", "nan")) for j in range(2)] for i in range(2)],
                "source": "the last validation of train.log (pooled over layers and heads)",
            }
    return out


def fairseq_params(path: Path) -> int | None:
    """The model's parameter count from a fairseq-train log (``num. shared model params: N``; the last run's)."""
    hits = _FAIRSEQ_PARAMS.findall(path.read_text(errors="replace"))
    return int(hits[-1].replace(",", "")) if hits else None


def parse_onmt_train_log(path: Path) -> dict:
    """Training summary from a ``structattn-onmt-train`` log (possibly several resumed runs appended), in the keys of
    :func:`parse_train_log` plus ``sentences``, ``validations`` [(step, perplexity)], ``saved`` [steps],
    ``best_valid_ppl``, ``params`` and ``train_health`` (the last ``structattn attention`` line: fallback, frozen,
    T/γ). ``compute_s`` is the training loop's wall time (OpenNMT-py's ``T sec``, validation and checkpointing
    included) summed over the runs; target tokens = Σ mean target tokens per batch × steps of each report
    interval; ``epochs`` stays None (OpenNMT-py logs none: the caller divides ``sentences`` by the training
    pairs)."""
    out = {"stopped_by_time": False, "early_stop": False, "validations": [], "saved": []}
    sessions, sec = [], None  # the last "T sec" of each training run in the log
    tokens, sentences, last_step, fields = 0.0, 0, 0, {}
    for line in path.read_text(errors="replace").splitlines():
        h = _ONMT_HEALTH.search(line)
        if h:
            v = [float(x) for x in h.groups()[1:]]
            out["train_health"] = {"step": int(h.group(1)), "fallback": v[0], "frozen": v[1],
                                   "T_over_gamma": [[v[2], v[3]], [v[4], v[5]]]}
            continue
        m = _ONMT_STEP.search(line)
        if m:
            step, rest = int(m.group(1)), m.group(2)
            fields = dict(_ONMT_FIELD.findall(rest))
            bsz, t = _ONMT_BSZ.search(rest), _ONMT_SEC.search(rest)
            if bsz:
                tokens += float(bsz.group(2)) * max(step - last_step, 0)
            if "sents" in fields:
                sentences += int(float(fields["sents"]))
            if t:
                if sec is not None and float(t.group(1)) < sec:  # a new run without its start line
                    sessions.append(sec)
                sec = float(t.group(1))
            last_step = step
            continue
        if _ONMT_START.search(line):
            if sec is not None:
                sessions.append(sec)
            sec = None
        elif (v := _ONMT_VALID.search(line)):
            out["validations"].append((last_step, float(v.group(1))))
        elif (s := _ONMT_SAVED.search(line)):
            out["saved"].append(int(s.group(1)))
        elif (n := _ONMT_PARAMS.search(line)):
            out["params"] = int(n.group(1))
        elif _ONMT_EARLY_STOP.search(line):
            out["early_stop"] = True
    if sec is not None:
        sessions.append(sec)
    if last_step == 0:
        return out
    compute = sum(sessions)
    out.update(updates=last_step, epochs=None, sentences=sentences, target_tokens=tokens, compute_s=compute,
               wall_s=compute, tokens_per_s=tokens / compute if compute > 0 else None)
    if "xent" in fields:
        out["final_train_loss"] = float(fields["xent"])
    if out["validations"]:
        out["best_valid_ppl"] = min(p for _, p in out["validations"])
    return out


def output_health(path: Path) -> dict | None:
    """Degenerate-output checks of a hypothesis file: the fraction of hypotheses with a whitespace token repeated
    :data:`REPEAT_RUN` times in a row (``repeat_fraction``), of those that loop by :func:`looping` (a token or a
    2–4-token phrase; ``loop_fraction``), the fraction of distinct hypotheses and of empty ones."""
    try:
        hyps = [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError:
        return None
    if not hyps:
        return None

    def loops(t):
        return any(len(set(t[i:i + REPEAT_RUN])) == 1 for i in range(len(t) - REPEAT_RUN + 1))

    n = len(hyps)
    return {"repeat_fraction": sum(map(loops, hyps)) / n, "loop_fraction": sum(map(looping, hyps)) / n,
            "distinct_fraction": len(set(map(tuple, hyps))) / n, "empty_fraction": sum(not h for h in hyps) / n}


def fmt_transitions(t) -> str:
    return "–" if not t else "[[{:.2f}, {:.2f}], [{:.2f}, {:.2f}]]".format(t[0][0], t[0][1], t[1][0], t[1][1])


def health_warnings(rows) -> list[str]:
    """Loud lines for models whose structured attention did not do its job (a fallback-heavy or an
    independent-positions Viterbi model; looping or empty output)."""
    warn = []
    for r in rows:
        h, o, label = r.get("health") or {}, r.get("output") or {}, run_label(r.get("run", r["variant"]))
        fb = h.get("fallback_fraction")
        if fb is not None and fb > FALLBACK_WARN:
            warn.append(f"{label}: {fb:.1%} of attention rows fell back to softmax (> {FALLBACK_WARN:.0%}): this "
                        "model's attention is largely a softmax attention, not a structured one.")
        th = (r.get("train") or {}).get("train_health") or {}  # OpenNMT-py's training log
        if th.get("fallback", 0) > FALLBACK_WARN:
            warn.append(f"{label}: {th['fallback']:.1%} of attention rows fell back to softmax in the last logged "
                        f"training steps (step {th['step']}, train.log; > {FALLBACK_WARN:.0%}).")
        kappa = kappa_of(h)
        if kappa is not None and abs(kappa) < INDEPENDENT_KAPPA and h.get("chain", True):
            warn.append(f"{label}: coupling κ = {kappa:.2f} of the learned transitions T/γ = "
                        f"{fmt_transitions(h.get('T_over_gamma'))} (|κ| < {INDEPENDENT_KAPPA}): an "
                        "independent-positions model (the chain is not used).")
        loops_ = o.get("loop_fraction", o.get("repeat_fraction", 0))
        if loops_ > 0.05:
            warn.append(f"{label}: {loops_:.0%} of hypotheses repeat a token {REPEAT_RUN} times or a 2–{PHRASE_MAX}-"
                        f"token phrase {PHRASE_RUN} times in a row (looping output).")
        eos = (r.get("stats") or {}).get("eos_mass")
        if eos is not None and eos == eos and eos > EOS_MASS_WARN:
            warn.append(f"{label}: its target rows put {eos:.0%} of their attention on the source's end of sentence "
                        "on average: attention parked on EOS, not aligned.")
        stats = r.get("stats") or {}
        if parked_verdict(eos, stats.get("top_fifth_share")) == VERDICTS[2]:
            rho = stats.get("diagonality")
            warn.append(f"{label}: on an average sentence {stats['top_fifth_share']:.0%} of its target words attend "
                        f"most to one fifth of the source (> {PARKED_SHARE:.0%}; diagonality ρ = "
                        + ("n/a" if rho is None or rho != rho else f"{rho:.2f}")
                        + "): attention parked on a source region, not aligned.")
        if o.get("empty_fraction", 0) > 0.05:
            warn.append(f"{label}: {o['empty_fraction']:.0%} of hypotheses are empty (the model does not translate).")
    return warn


def significance_lines(work: Path, ref_labels: dict) -> list[str]:
    """Markdown table of ``significance*.json`` (``structattn-significance``): each system's BLEU/chrF2 bootstrap mean
    ± 95% CI, its difference to the baseline and the p-value."""
    out = []
    for name, label in ref_labels.items():
        p = work / name
        if not p.is_file():
            continue
        sig = json.loads(p.read_text())
        base = sig["baseline"]
        if not out:
            out += ["## Significance", "",
                    f"Paired bootstrap resampling against {run_label(base)} (sacrebleu `PairedTest`, "
                    f"{sig['n_samples']} resamples, seed {sig['seed']}; Koehn 2004): mean ± half-width of the 95% "
                    "confidence interval, Δ = score − baseline score, p = probability of a difference at least this "
                    "large by chance (p < 0.05: significant).", ""]
        out += [f"References: {label}.", "", "| attention | BLEU | Δ BLEU | p (BLEU) | chrF2 | Δ chrF2 | p (chrF2) |",
                "|---|---|---|---|---|---|---|"]
        b = sig["systems"][base]
        for sysname, m in sig["systems"].items():
            cells = [run_label(sysname)]
            for metric in ("BLEU", "chrF2"):
                r = m[metric]
                cells.append(f"{r['mean']:.1f} ± {r['ci']:.1f}" if r.get("ci") is not None else fmt(r["score"]))
                if sysname == base:
                    cells += ["(baseline)", "–"]
                else:
                    cells += [f"{r['score'] - b[metric]['score']:+.1f}", f"{r['p_value']:.3f}"]
            out.append("| " + " | ".join(cells) + " |")
        out += ["", "Test signatures: " + "; ".join(f"{k} `{v}`" for k, v in sig.get("signatures", {}).items()), ""]
    return out


def fmt(x, spec="{:.1f}"):
    return "–" if x is None else spec.format(x)


def line_count(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def token_count(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return sum(len(line.split()) for line in f)
    except OSError:
        return None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _last_train_command(work: Path, run: str, toolkit: str = "fairseq"):
    """The last training command of run folder ``run`` in work/commands.sh (every command the recipe ran, in
    order)."""
    log = work / "commands.sh"
    if not log.is_file():
        return None
    tool = "structattn-onmt-train" if toolkit == "onmt" else "fairseq-train"
    hits = [line for line in log.read_text().splitlines() if tool in line and f"/runs/{run}/" in line]
    return hits[-1].strip() if hits else None


def collect(work: Path, variants, toolkit: str = "fairseq"):
    """One row per variant of ``toolkit``, each followed by the other toolkit's run of that variant when it has a
    score (fairseq rows first)."""
    rows, missing = [], []
    train_pairs = None
    for v in variants:
        for tk in TOOLKITS:
            name = run_name(v, tk)
            run = work / "runs" / name
            if tk != toolkit and not (run / "score.json").is_file():
                continue
            row = {"variant": v, "toolkit": tk, "run": name}
            for key, fname in (("single", "score.json"), ("multi", "score.multiref.json")):
                p = run / fname
                if p.is_file():
                    row[key] = read_scores(p)
                elif key == "single" or (work / "data" / "raw" / "test.kjv.en").is_file():
                    missing.append(str(p))
            p = run / "train.log"
            if not p.is_file():
                row["train"] = {}
                missing.append(str(p))
            elif tk == "onmt":
                row["train"] = parse_onmt_train_log(p)
                if train_pairs is None:
                    train_pairs = line_count(next(iter(sorted((work / "data" / "spm").glob("train.len.*"))),
                                                  work / "missing"))
                if row["train"].get("sentences") is not None and train_pairs:
                    row["train"]["epochs"] = row["train"]["sentences"] / train_pairs
            else:
                row["train"] = parse_train_log(p)
                row["train"]["params"] = fairseq_params(p)
            p = run / "attention_stats.json"
            if p.is_file():
                stats = json.loads(p.read_text())
                row["stats"] = stats[0] if isinstance(stats, list) else stats
            else:
                missing.append(str(p))
            p = run / "health.json"
            if p.is_file():
                row["health"] = json.loads(p.read_text())
            elif row["train"].get("valid_health"):  # models attention_health.py does not read (the Transformer)
                row["health"] = row["train"]["valid_health"]
            elif v.startswith("viterbi"):
                missing.append(str(p))
            row["output"] = output_health(run / "hyp.test.en")
            stamp = work / "stamps" / f"train.{name}.done"
            row["train_cmd"] = stamp.read_text().strip() if stamp.is_file() else _last_train_command(work, name, tk)
            rows.append(row)
    return rows, missing


def render(work: Path, rows, missing, args) -> str:
    """The whole RESULTS.md: header (machine, data, model), the table, warnings, column notes, significance,
    signatures, commands."""
    has_multi = any("multi" in r for r in rows)
    has_onmt = any(r.get("toolkit") == "onmt" for r in rows)
    table, sigs = _table(rows, args, has_multi)
    out = _header(work, args, has_multi, rows) + table
    warnings = health_warnings(rows)
    if warnings:
        out += ["**Warnings**", ""] + [f"* **WARNING** {w}" for w in warnings] + [""]
    out += [COLUMN_NOTES + (" " + ONMT_COLUMN_NOTES if has_onmt else ""), ""]
    r1, r2, onmt = args.ref_label, args.ref2_label, TOOLKITS["onmt"]
    out += significance_lines(work, {"significance.json": r1, "significance.multiref.json": f"{r1}+{r2}",
                                     "significance.onmt.json": f"{r1}; {onmt} runs",
                                     "significance.onmt.multiref.json": f"{r1}+{r2}; {onmt} runs"})
    out += ["Signatures:", ""] + [f"* {s}" for s in sorted(sigs)] + [""]
    for folder, what in (("report", ""), ("report.onmt", f", {onmt} runs")):
        report = work / folder / "index.html"
        if report.is_file():
            out += [f"Attention report (side-by-side maps of the first test sentences{what}): `{report}`.", ""]
    out += _commands(rows, missing, args)
    return "\n".join(out) + "\n"


def _fairseq_arch(rows) -> str:
    """The --arch of the fairseq rows' training commands (when they agree), else "?"."""
    found = {m.group(1) for r in rows if r.get("toolkit", "fairseq") == "fairseq" and r.get("train_cmd")
             for m in [re.search(r"--arch (\S+)", r["train_cmd"])] if m}
    return found.pop() if len(found) == 1 else "?"


def _header(work: Path, args, has_multi: bool, rows=()) -> list[str]:
    """Title, provenance, machine, data sizes, corpus split and model."""
    raw, spm = work / "data" / "raw", work / "data" / "spm"
    corpus_info = {}
    if (raw / "corpus.json").is_file():
        corpus_info = json.loads((raw / "corpus.json").read_text())
    sizes = {s: line_count(raw / f"{s}.{args.src}") for s in ("train", "valid", "test")}
    if sizes["train"] is None:
        sizes["train"] = line_count(work / "data" / "tok" / f"train.{args.src}")
    tgt = args.direction.split("-")[-1]
    toks = {f"{s}.{l}": token_count(spm / f"{s}.{l}") for s in ("train", "test") for l in (args.src, tgt)}
    out = [f"# Results: {args.corpus} {args.direction.replace('-', '→')} ({args.size} size)", ""]
    out.append(f"Generated by `structattn-results` on {datetime.datetime.now():%Y-%m-%d %H:%M} from the "
               f"run in `{work}`. Every number below is read from that run's files; nothing is estimated.")
    out.append("")
    jobs = f"; {args.jobs} trainings at a time" if str(args.jobs) not in ("1", "?") else ""
    out.append(f"* Machine: {machine()}; torch threads per training: {args.threads}{jobs}.")
    if args.note:
        out.append(f"* Note: {args.note}")
    data = f"* Data: {sizes['train']} training / {sizes['valid']} validation / {sizes['test']} test pairs"
    kept = line_count(spm / f"train.len.{args.src}")
    if kept is not None and kept != sizes["train"]:
        data += f" ({kept} training pairs of at most {args.max_len or '?'} subword tokens per side used)"
    if toks[f"train.{args.src}"] is not None:
        data += (f"; sentencepiece tokens: train {args.src} {toks[f'train.{args.src}']}, {tgt} {toks[f'train.{tgt}']}; "
                 f"test {args.src} {toks[f'test.{args.src}']}")
    out.append(data + ".")
    if corpus_info.get("valid_books"):
        out.append(f"* Split by whole books: validation books {corpus_info['valid_books']}, test books "
                   f"{corpus_info['test_books']} (numbers 1 = Genesis … 66 = Revelation), the rest train. Source "
                   f"{corpus_info.get('source')}, reference {corpus_info.get('target')}"
                   + (f", second reference {corpus_info['second_reference']}" if has_multi else "") + ".")
    toolkits = {r.get("toolkit", "fairseq") for r in rows} or {args.toolkit}
    if "fairseq" in toolkits:
        arch = args.arch if args.toolkit == "fairseq" else _fairseq_arch(rows)
        out.append(f"* Model: `--arch {arch}`; identical data, optimiser, batch and update budget for every "
                   f"variant (full commands below).")
    if "onmt" in toolkits:
        out.append(ONMT_MODEL)
    out.append("")
    return out


ONMT_MODEL = ("* OpenNMT-py rows (`--toolkit onmt`): `structattn-onmt-train` (docs/onmt.md), a 1-layer bidirectional "
    "LSTM encoder and a 1-layer input-feeding LSTM decoder with the bilinear (`general`) score; identical data (the "
    "same sentencepiece pairs), optimiser, batch and update budget for every variant (full commands below). Not as "
    "in the fairseq rows: the decoder is twice as wide (OpenNMT-py needs encoder and decoder of one size: see "
    "*params*), no weight decay, no wall-clock cap, `--schedule fixed` without warm-up (`inverse_sqrt` = OpenNMT's "
    "`noam` with the same warm-up and peak); validation and checkpoints every `-valid_steps` only, the test set "
    "translated with the saved step of lowest validation perplexity (`runs/onmt-*/best.json`); the length limit of "
    "a translation is per batch (1.5 × its longest source + 5, at most 256).")


def _table(rows, args, has_multi: bool) -> tuple[list[str], set]:
    """The results table (one row per variant) and the sacrebleu signatures it used."""
    r1, r2 = args.ref_label, args.ref2_label
    has_onmt = any(r.get("toolkit") == "onmt" for r in rows)
    head = ["attention"] + (["toolkit"] if has_onmt else []) + [f"BLEU ({r1})"] + (
        [f"BLEU ({r1}+{r2})"] if has_multi else []) + [f"chrF2 ({r1})"] + (["params"] if has_onmt else []) + [
        "updates", "epochs", "train time", "tokens/s", "exact zeros", "support/row",
        "segments/row", "EOS mass", "diagonality ρ", "top-fifth share", "fallback rows", "T/γ", "κ", "looping hyps", "distinct hyps"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sigs = set()
    for r in rows:
        cells, row_sigs = _row_cells(r, has_multi, has_onmt)
        sigs |= row_sigs
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    return out, sigs


def _measured(stats: dict, key: str, spec: str) -> str:
    """A ``structattn-stats`` number: "–" when the file (or, for statistics older than the file, the key) is
    missing, "n/a" when it was computed but has nothing to measure (null: e.g. no sentence long enough)."""
    if not stats or key not in stats:
        return "–"
    return "n/a" if stats[key] is None else fmt(stats[key], spec)


def _row_cells(r: dict, has_multi: bool, has_onmt: bool = False) -> tuple[list[str], set]:
    """One variant's cells, in the order of the table's head, and its sacrebleu signatures."""
    t, s = r.get("train", {}), r.get("stats", {})
    single = r.get("single", {})
    sigs = {f"{rec['name']} (1 ref): `{rec['signature']}`" for rec in single.values()}
    cells = [LABELS.get(r["variant"], r["variant"])] + ([TOOLKITS[r.get("toolkit", "fairseq")]] if has_onmt else [])
    cells.append(fmt(single.get("BLEU", {}).get("score")))
    if has_multi:
        mb = r.get("multi", {}).get("BLEU", {})
        if mb:
            sigs.add(f"BLEU (2 refs): `{mb['signature']}`")
        cells.append(fmt(mb.get("score")))
    wall = t.get("compute_s")
    cells.append(fmt(single.get("chrF2", {}).get("score")))
    if has_onmt:
        cells.append(fmt(t.get("params"), "{:,}"))
    epochs = t.get("epochs")
    cells += [fmt(t.get("updates"), "{}") + (" (time cap)" if t.get("stopped_by_time") else "")
              + (" (early stop)" if t.get("early_stop") else ""),
              fmt(epochs, "{:.1f}" if isinstance(epochs, float) else "{}"),
              "–" if wall is None else f"{wall / 60:.1f} min",
              fmt(t.get("tokens_per_s"), "{:.0f}"), fmt(s.get("zero_fraction"), "{:.3f}"),
              fmt(s.get("mean_support"), "{:.2f}"), fmt(s.get("mean_segments"), "{:.2f}"),
              "n/a" if s and s.get("eos_mass") is None else fmt(s.get("eos_mass"), "{:.3f}"),
              _measured(s, "diagonality", "{:.2f}"), _measured(s, "top_fifth_share", "{:.2f}")]
    h, o = r.get("health") or {}, r.get("output") or {}
    kappa = kappa_of(h)
    cells += [fmt(h.get("fallback_fraction"), "{:.3f}"), fmt_transitions(h.get("T_over_gamma")),
              "–" if kappa is None else f"{kappa:.2f} ({coupling_verdict(kappa)})"
              + ("" if h.get("chain", True) else ", chain off"),
              fmt(o.get("loop_fraction", o.get("repeat_fraction")), "{:.3f}"), fmt(o.get("distinct_fraction"), "{:.3f}")]
    return cells, sigs


COLUMN_NOTES = ("Columns: BLEU/chrF2 by sacrebleu on detokenised output (sentencepiece decode + Moses detok) against "
    "the untokenised reference(s); *train time* = fairseq's time spent in training steps, summed over epochs "
    "(validation, checkpointing and start-up excluded; robust to interrupted and resumed runs); *tokens/s* = "
    "target tokens per second of training steps; *exact zeros* = fraction of "
    "attention cells that are exactly 0, *support/row* = non-zero source positions per target token, "
    "*segments/row* = contiguous non-zero blocks per target token (`structattn-stats`, test set, EOS "
    "included); *EOS mass* = mean attention weight of a target row on the source's end-of-sentence column (the "
    "target's EOS row excluded; near 1: attention parked on EOS; n/a where the source has no EOS token, as in "
    "OpenNMT-py); *diagonality ρ* = Spearman's correlation of target position and argmax source position, "
    "*top-fifth share* = share of target rows whose argmax lies in the sentence's most visited fifth of the source "
    "(both without the `</s>` row and column, sentences of < 5 words skipped, mean over sentences; ≈ 1 and ≈ 0.2 "
    f"for a diagonal; > {PARKED_SHARE}: attention parked on a source region; `structattn-stats`, "
    "docs/attention_maps.md). *fallback rows* = fraction of target rows where "
    "the Viterbi attention had p(y_t = 1) = 0 everywhere and fell back to softmax; *T/γ* = learned transitions on "
    "the temperature scale (T[i, j]: state j at t−1 → i at t) and *κ* = T₀₀ + T₁₁ − T₀₁ − T₁₀ on that scale, the "
    "one direction of T that couples neighbouring positions (the others only shift the scores; |κ| < "
    f"{INDEPENDENT_KAPPA}: independent positions, < {COUPLED_KAPPA}: weakly coupled) (`structattn-health`); "
    f"*looping hyps* = fraction of hypotheses with a token {REPEAT_RUN} times or a 2–{PHRASE_MAX}-token phrase "
    f"{PHRASE_RUN} times in a row; *distinct hyps* = distinct hypotheses / "
    "test sentences. \"(time cap)\" marks a training stopped by `--stop-time-hours` before its update budget, "
    "\"(early stop)\" one stopped by `--patience` (validation loss no longer improving: a plateau).")

ONMT_COLUMN_NOTES = ("*toolkit*: the trainer; *params*: the model's parameters (its training log). OpenNMT-py rows: "
    "*train time* = the training loop's wall time (its log's `T sec`: validation and checkpointing included), "
    "*tokens/s* = target tokens of its logged batches per second of that time, *epochs* = training sentences seen / "
    "training pairs (OpenNMT-py logs no epochs); *fallback rows* and *T/γ* by the same forced decoding of the "
    "dumped hypotheses (`attention_health.py --toolkit onmt`).")


def _commands(rows, missing, args) -> list[str]:
    """The recipe invocation, the training commands as run, and what was missing."""
    out = ["## Commands", "", "```bash", args.invocation or "bash recipes/offline_fr_en.sh", "```", ""]
    out += ["Training commands as run (from the step stamps, else the last one in commands.sh):", ""]
    for r in rows:
        if r["train_cmd"]:
            cmd = r["train_cmd"]
            if "structattn-onmt-train" in cmd:  # after the recipe's "already trained?" check
                cmd = cmd[cmd.index("structattn-onmt-train"):]
            cmd = cmd.split(" 2>&1 ")[0]
            out += ["```bash", cmd, "```"]
    if missing:
        out += ["", "## Missing", ""] + [f"* `{m}`" for m in missing]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="structattn-results", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"structattn {__version__}")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--corpus", default="bible")
    p.add_argument("--size", default="?")
    p.add_argument("--arch", default="?", help="fairseq architecture (of --toolkit fairseq runs)")
    p.add_argument("--toolkit", default="fairseq", choices=list(TOOLKITS),
                   help="the toolkit of the --variants runs (the other toolkit's runs with a score are added)")
    p.add_argument("--threads", default="?", help="torch threads of each training")
    p.add_argument("--jobs", default="1", help="trainings run at the same time")
    p.add_argument("--max-len", default=None, help="longest training pair kept (subword tokens per side)")
    p.add_argument("--direction", default="fr-en")
    p.add_argument("--src", default="fr", help="source language suffix of the data files")
    p.add_argument("--ref-label", default="WEB", help="name of the (first) reference in the table")
    p.add_argument("--ref2-label", default="KJV", help="name of the second reference (multi-reference BLEU)")
    p.add_argument("--invocation", help="the recipe command line to print")
    p.add_argument("--note", default=os.environ.get("STRUCTATTN_RESULTS_NOTE", ""),
                   help="free text (e.g. machine load) for the header; default $STRUCTATTN_RESULTS_NOTE")
    args = p.parse_args(argv)
    if not (args.work / "runs").is_dir():
        p.error(f"{args.work}/runs does not exist: run the recipe first")
    rows, missing = collect(args.work, args.variants, args.toolkit)
    if not any("single" in r for r in rows):
        p.error("no variant has a score.json yet: nothing to tabulate")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.work, rows, missing, args))
    for w in health_warnings(rows):
        print(f"WARNING: {w}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
