"""End-to-end training speed: fairseq-train tokens/s (wps) and peak memory per attention, as ratios to softmax.

Small synthetic translation data (a deterministic word mapping + local reordering, so attention has something to
learn) is generated and binarised once; then one fairseq-train process per attention trains the same model
(``--arch structattn_lstm`` with 256-dim layers; with ``model="transformer"``, ``--arch structattn_transformer``
with 2+2 layers of 256 dims and 8 heads on sources of 30–50 tokens) for the same number of updates on CPU (or,
with ``device="cuda"``, on the GPU) with the same seed. wps is the median of fairseq's ``train_inner`` logs after
the first interval (which includes start-up); peak memory is the child's maximum resident set size.

``python benchmarks/e2e.py [--quick] [--transformer] [--attentions softmax,fusedmax,...] [--steps-only]`` prints the
table (``benchmarks/run.py`` runs the LSTM one; ``--steps-only``: the in-process step timings alone, for either model);
the Transformer's also times one training step per attention in-process, interleaved (:func:`step_times`), which
says how much of a step the normaliser costs more robustly than wps under machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = [
    ("softmax", ["--attention", "softmax"]),
    ("sparsemax", ["--attention", "sparsemax"]),
    ("viterbi -H", ["--attention", "viterbi", "--attention-reg", "entropy"]),
    ("viterbi l2", ["--attention", "viterbi", "--attention-reg", "l2"]),
    # the structured sparsemaxes at their default λ and 1.5-entmax (only with --attentions, which names them)
    ("fusedmax", ["--attention", "fusedmax"]),
    ("oscarmax", ["--attention", "oscarmax"]),
    ("entmax15", ["--attention", "entmax15"]),
    ("sparsemap", ["--attention", "sparsemap"]),
]
#: the rows run by default (the table of benchmarks/run.py); --attentions picks any of CONFIGS
DEFAULT = ("softmax", "sparsemax", "viterbi -H", "viterbi l2")


def _bin(name: str) -> str:
    cand = os.path.join(os.path.dirname(sys.executable), name)
    return cand if os.path.exists(cand) else name


#: fairseq-train model arguments of each benchmarked model
MODELS = {
    "lstm": ["--arch", "structattn_lstm", "--encoder-embed-dim", "256", "--encoder-hidden-size", "256",
             "--decoder-embed-dim", "256", "--decoder-hidden-size", "256", "--decoder-out-embed-dim", "256"],
    "transformer": ["--arch", "structattn_transformer", "--encoder-layers", "2", "--decoder-layers", "2",
                    "--encoder-embed-dim", "256", "--encoder-ffn-embed-dim", "512", "--encoder-attention-heads", "8",
                    "--decoder-attention-heads", "8"],
}
#: source (and target) lengths of the synthetic data of each model
LENGTHS = {"lstm": (5, 40), "transformer": (30, 50)}


def make_data(workdir: str, n_train: int = 3000, n_valid: int = 100, seed: int = 0,
              lengths: tuple[int, int] = LENGTHS["lstm"]) -> str:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(60)]
    mapping = {w: f"v{(7 * i + 3) % 60}" for i, w in enumerate(vocab)}
    raw = os.path.join(workdir, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid)):
        with open(os.path.join(raw, f"{split}.src"), "w") as fs, open(os.path.join(raw, f"{split}.tgt"), "w") as ft:
            for _ in range(n):
                src = [rng.choice(vocab) for _ in range(rng.randint(*lengths))]
                tgt = [mapping[w] for w in src]
                for i in range(0, len(tgt) - 1, 3):  # local swaps: a non-monotone but segmentable alignment
                    tgt[i], tgt[i + 1] = tgt[i + 1], tgt[i]
                fs.write(" ".join(src) + "\n")
                ft.write(" ".join(tgt) + "\n")
    dest = os.path.join(workdir, "data-bin")
    subprocess.run(
        [_bin("fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
         "--trainpref", os.path.join(raw, "train"), "--validpref", os.path.join(raw, "valid"),
         "--destdir", dest, "--workers", "1"],
        check=True, capture_output=True, text=True,
    )
    return dest


_WRAPPER = (
    "import resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr)\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(p.returncode)\n"
)


def train_once(data: str, extra: list[str], updates: int, threads: int, log_interval: int,
               device: str = "cpu", model: str = "lstm") -> dict:
    cmd = [
        _bin("fairseq-train"), data, "--user-dir", os.path.join(ROOT, "structattn_fairseq"), *MODELS[model],
        "--task", "translation", "--optimizer", "adam", "--lr", "1e-3", "--clip-norm", "1.0", "--criterion",
        "cross_entropy", "--max-tokens", "1500", "--max-update", str(updates), "--seed", "1", "--num-workers", "0",
        "--no-save", "--disable-validation", "--log-format", "json", "--log-interval", str(log_interval),
        "--no-progress-bar", *(["--cpu"] if device == "cpu" else []), *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"fairseq-train failed ({' '.join(extra)}):\n{log[-4000:]}")
    wps = []
    for line in log.splitlines():
        if '"wps"' in line and "train_inner" in line:
            try:
                wps.append(float(json.loads(line[line.index("{"):])["wps"]))
            except (ValueError, KeyError):
                pass
    maxrss = [int(x.split()[1]) for x in log.splitlines() if x.startswith("MAXRSS_KB")]
    if len(wps) < 2:
        raise RuntimeError(f"could not read wps from the fairseq-train log:\n{log[-3000:]}")
    return {"wps": statistics.median(wps[1:]), "n_logs": len(wps) - 1, "maxrss_mb": maxrss[-1] / 1024}


def step_times(data: str, model: str, reps: int, threads: int, names=DEFAULT) -> dict:
    """Median seconds of one training step (forward + backward of the loss on the same batch of ``--max-tokens
    1500``) of ``model`` with each attention, in this process on CPU, the variants interleaved so that machine load
    hits them alike. Everything but the normaliser is the same computation, so the time a variant adds to softmax's
    is the cost of its normaliser (forward, and backward: for Viterbi, Alg. 4's Hessian-vector product)."""
    import torch
    from fairseq import options, tasks, utils

    torch.set_num_threads(threads)
    utils.import_user_module(argparse.Namespace(user_dir=os.path.join(ROOT, "structattn_fairseq")))
    steps, tokens = {}, 0
    for name, extra in [c for c in CONFIGS if c[0] in names]:
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(parser, [data, "--user-dir", os.path.join(ROOT, "structattn_fairseq"),
                                                    *MODELS[model], "--criterion", "cross_entropy", "--cpu",
                                                    "--max-tokens", "1500", "--seed", "1", *extra])
        torch.manual_seed(1)
        task = tasks.setup_task(args)
        task.load_dataset("train")
        net, criterion = task.build_model(args).train(), task.build_criterion(args)
        batches = task.get_batch_iterator(task.dataset("train"), max_tokens=1500, seed=1).next_epoch_itr(
            shuffle=False)
        sample = next(iter(batches))
        tokens = int(sample["ntokens"])

        def step(net=net, criterion=criterion, sample=sample):
            net.zero_grad()
            loss, _, _ = criterion(net, sample)
            loss.backward()

        steps[name] = step
    times = {name: [] for name in steps}
    for rep in range(reps + 1):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(t) for name, t in times.items()}
    step_times.tokens = tokens  # target tokens of the timed batch (the same batch for every attention)
    return out


def run(quick: bool = False, threads: int = 1, updates: int | None = None, workdir: str | None = None,
        device: str = "cpu", model: str = "lstm", names=DEFAULT, steps_only: bool = False) -> dict:
    updates = updates or (60 if quick else 200)
    # wps is the median of the logs after the first, which includes start-up: keep ≥ 4 logs on short runs.
    log_interval = min(10 if quick else 20, max(1, updates // 4))
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="structattn-e2e-")
    try:
        data = make_data(workdir, lengths=LENGTHS[model])
        res = {}
        for name, extra in [c for c in CONFIGS if c[0] in names and not steps_only]:
            res[name] = train_once(data, extra, updates, threads, log_interval, device, model)
            r = res[name]
            print(f"  e2e {model} {name:12s} wps {r['wps']:8.0f}  peak RSS {r['maxrss_mb']:7.0f} MB  "
                  f"({r['n_logs']} log intervals)", flush=True)
        reps = 5 if quick else 15
        timed = (model == "transformer" or steps_only) and device == "cpu"
        steps = step_times(data, model, reps, threads, names) if timed else None
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    if steps_only:
        return {"results": res, "steps": steps, "markdown": _steps_markdown(model, steps, reps, threads)}
    base = res["softmax"]
    if model == "lstm":
        setting = ("`fairseq-train --arch structattn_lstm` (1-layer biLSTM encoder 2×256, 1-layer 256 decoder with "
                   "input feeding), synthetic data (3000 pairs, 5–40 tokens)")
    else:
        setting = ("`fairseq-train --arch structattn_transformer` (2+2 layers, 256 dims, FFN 512, 8 heads; the "
                   "normaliser replaces the softmax of the 2 encoder-decoder attentions, per head), synthetic data "
                   "(3000 pairs, 30–50 tokens)")
    lines = [
        f"{setting}, `--max-tokens 1500`, {updates} updates, {device}, OMP_NUM_THREADS={threads}; wps = median of "
        f"`train_inner` logs every {log_interval} updates after the first.",
        "",
        "| attention | wps | wps / softmax | peak RSS (MB) | RSS / softmax |",
        "|---|---|---|---|---|",
    ]
    for name, r in res.items():
        lines.append(f"| {name} | {r['wps']:.0f} | {r['wps'] / base['wps']:.2f} | {r['maxrss_mb']:.0f} | "
                     f"{r['maxrss_mb'] / base['maxrss_mb']:.2f} |")
    worst = min([res[n]["wps"] / base["wps"] for n in ("viterbi -H", "viterbi l2") if n in res] or [float("nan")])
    if model == "lstm":
        lines += ["", f"Target ≥ 0.9× softmax tokens/s: worst Viterbi ratio {worst:.2f} → "
                      f"{'met' if worst >= 0.9 else 'MISSED'}."]
    elif steps is not None:
        lines += ["", f"One training step (forward + backward, the same batch), in-process, variants interleaved, "
                      f"median of {reps}: the time a variant adds to softmax's is its normaliser's cost.", "",
                  "| attention | step (ms) | step / softmax | share of the step beyond softmax's |", "|---|---|---|---|"]
        for name, t in steps.items():
            lines.append(f"| {name} | {t * 1e3:.0f} | {t / steps['softmax']:.2f} | "
                         f"{max(0.0, 1 - steps['softmax'] / t):.0%} |")
    return {"results": res, "steps": steps, "markdown": "\n".join(lines)}


def _steps_markdown(model: str, steps: dict, reps: int, threads: int) -> str:
    """The in-process step table alone (``--steps-only``), with tokens/s = the batch's target tokens / step time."""
    tokens = step_times.tokens
    lines = [f"`{MODELS[model][1]}` ({model}, the model of the fairseq-train rows), one training step (forward + "
             f"backward of the loss on the same batch of `--max-tokens 1500`, {tokens} target tokens), in-process, "
             f"attentions interleaved, median of {reps}, {threads} thread(s); no optimiser step.", "",
             "| attention | step (ms) | tokens/s | tokens/s / softmax |", "|---|---|---|---|"]
    for name, t in steps.items():
        lines.append(f"| {name} | {t * 1e3:.1f} | {tokens / t:.0f} | {steps['softmax'] / t:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 updates per run (default 200), fewer step timings")
    ap.add_argument("--transformer", action="store_true", help="the Transformer rows instead of the LSTM's")
    ap.add_argument("--updates", type=int, default=None, help="updates per fairseq-train run")
    ap.add_argument("--attentions", default=",".join(DEFAULT),
                    help=f"comma-separated rows, softmax first (default {','.join(DEFAULT)}; any of "
                         f"{', '.join(n for n, _ in CONFIGS)})")
    ap.add_argument("--steps-only", action="store_true",
                    help="no fairseq-train runs: only the in-process training-step timings (tokens/s per attention)")
    cli = ap.parse_args()
    names = tuple(n.strip() for n in cli.attentions.split(","))
    unknown = [n for n in names if n not in dict(CONFIGS)]
    if unknown or names[0] != "softmax":
        ap.error(f"--attentions: softmax first, then any of {[n for n, _ in CONFIGS]}; got {list(names)}")
    print(run(quick=cli.quick, updates=cli.updates, model="transformer" if cli.transformer else "lstm",
              names=names, steps_only=cli.steps_only)["markdown"])
