"""DTW_Ω barycentres of real time series (ICML 2018 §3.2; soft-DTW barycentres of Cuturi & Blondel 2017), −H vs ℓ2.

Data: the "Trace" data set of the UEA & UCR Time Series Classification Repository (Bagnall, Lines, Vickers, Keogh;
www.timeseriesclassification.com; originally D. Roverso's synthetic transients of nuclear-plant instrumentation), as
bundled inside the PyPI package ``tslearn`` (BSD-2-Clause; file ``tslearn/.cached_datasets/Trace.npz``, read with
``tslearn.datasets.CachedDatasets().load_dataset("Trace")``, no network). 4 classes, 100 train / 100 test univariate
series of length 275, z-normalised. The recipe checks the file's sha256 and, to keep the run to minutes on 2 cores,
averages every ``--downsample`` (default 2) consecutive samples (275 → 137).

For each class c with training series x_1..x_K and each Ω ∈ {−γH, (γ/2)‖·‖²} and γ, the barycentre solves

    min_z  F(z) = (1/K) Σ_k D_Ω(z, x_k),     D_Ω(z, x) = −DTW_Ω(−C(z, x)),   C(z, x)[i, j] = (z_i − x_j)²,

(DTW_Ω over scores θ = −C, so D_{−γH} is soft-DTW) by L-BFGS (torch.optim.LBFGS, strong-Wolfe line search) from the
Euclidean mean of the class; ∇F comes from structattn.dtw_value's custom backward: ∇_θ DTW_Ω = E, the expected
alignment, chained through C. With ``--seeds`` the γ's in ``--seed-gammas`` are also solved from a random training
series of the class (seeded), to show the spread over starting points. Then:

* the objective F at the start and the end, and the mean hard-DTW distance of each barycentre to its class (the same
  yardstick for every method, the Euclidean mean included);
* nearest-centroid classification of the test split: each test series goes to the class whose barycentre is nearest
  by hard DTW, and by the barycentre's own D_Ω; the Euclidean mean with the Euclidean distance and with hard DTW;
* the sparsity of the alignments E = ∇DTW_Ω(−C(z_c, x_k)) between each barycentre and its class's training series:
  the share of exact zeros (ℓ2 gives exact zeros; −H none, up to float64 underflow);
* figures: the barycentres per class, and −H vs ℓ2 alignment matrices drawn with structattn.report.plot (zeros
  white, non-zero cells outlined).

    python recipes/timeseries/run.py                     # a few minutes on 2 cores; writes recipes/timeseries/work/

Writes ``--out``: RESULTS.md (the tables, with the command, machine and date), results.json, barycentres.png and
alignments.png.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import structattn
from structattn import dtw_marginals, dtw_value, hard_dtw

DATASET = "Trace"
SHA256 = {"Trace": "0de0b7fa727cfabaf8481552db2b95fcccd12e54b67058aea79ff05b483cf807"}  # checked in load_dataset
REGS = ("entropy", "l2")
REG_NAME = {"entropy": "−H", "l2": "ℓ2"}


# ---- data ----------------------------------------------------------------------------------------------------------


def dataset_file(name: str = DATASET) -> Path:
    """The .npz file that tslearn bundles (raises ImportError without tslearn)."""
    import tslearn.datasets

    path = Path(tslearn.datasets.CachedDatasets().path) / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in this tslearn install; cached data sets: "
                                f"{tslearn.datasets.CachedDatasets().list_datasets()}")
    return path


def load_dataset(name: str = DATASET, downsample: int = 2):
    """(X_train (K, T'), y_train (K,), X_test, y_test) as float64 / int64 tensors, every ``downsample`` consecutive
    samples averaged (T' = T // downsample), after checking the file's sha256."""
    from tslearn.datasets import CachedDatasets

    path = dataset_file(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if name in SHA256 and digest != SHA256[name]:
        raise RuntimeError(f"{path}: sha256 {digest} differs from the one this recipe was run with ({SHA256[name]})")
    Xtr, ytr, Xte, yte = CachedDatasets().load_dataset(name)

    def prep(X):
        X = torch.as_tensor(np.asarray(X)[..., 0], dtype=torch.float64)
        T = X.shape[1] // downsample * downsample
        return X[:, :T].reshape(X.shape[0], -1, downsample).mean(-1)

    return prep(Xtr), torch.as_tensor(ytr).long(), prep(Xte), torch.as_tensor(yte).long()


# ---- discrepancies ----------------------------------------------------------------------------------------------------


def cost(z: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """C[k, i, j] = (z_i − X[k, j])², (K, N, M)."""
    return (z[..., :, None] - X[:, None, :]) ** 2


def discrepancy(z, X, reg, gamma):
    """D_Ω(z, x_k) = −DTW_Ω(−C(z, x_k)) for every k: soft-DTW for −γH."""
    return -dtw_value(-cost(z, X), reg=reg, gamma=gamma)


def pairwise(Z: torch.Tensor, X: torch.Tensor, reg=None, gamma=1.0, chunk=200) -> torch.Tensor:
    """(len(X), len(Z)) discrepancies between every series of X and every centroid of Z: hard DTW (reg=None) or
    D_Ω."""
    C = len(Z)
    out = []
    with torch.no_grad():
        pairs = [(x, c) for x in range(len(X)) for c in range(C)]
        for s in range(0, len(pairs), chunk):
            xs = torch.tensor([p[0] for p in pairs[s:s + chunk]])
            cs = torch.tensor([p[1] for p in pairs[s:s + chunk]])
            Cm = (Z[cs][:, :, None] - X[xs][:, None, :]) ** 2
            if reg is None:
                out.append(-hard_dtw(-Cm)[0])
            else:
                out.append(-dtw_value(-Cm, reg=reg, gamma=gamma))
    return torch.cat(out).view(len(X), C)


# ---- barycentres --------------------------------------------------------------------------------------------------------


def barycentre(X: torch.Tensor, reg: str, gamma: float, init: torch.Tensor, iters: int):
    """L-BFGS on F(z) = mean_k D_Ω(z, x_k) from ``init``; returns (z, F(init), F(z), evaluations)."""
    z = init.clone().requires_grad_()
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=iters, max_eval=int(iters * 1.5), history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-12)
    evals = [0]

    def closure():
        opt.zero_grad()
        F = discrepancy(z, X, reg, gamma).mean()
        F.backward()
        evals[0] += 1
        return F

    with torch.no_grad():
        F0 = float(discrepancy(init, X, reg, gamma).mean())
    opt.step(closure)
    with torch.no_grad():
        F1 = float(discrepancy(z, X, reg, gamma).mean())
    return z.detach(), F0, F1, evals[0]


def nearest_centroid_accuracy(D: torch.Tensor, y: torch.Tensor, classes) -> float:
    pred = torch.as_tensor(classes)[D.argmin(1)]
    return float((pred == y).double().mean())


def _mean_sd(xs):
    xs = list(xs)
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ---- figures (matplotlib only here and in structattn.report.plot) ------------------------------------------------------


def figure_barycentres(path, Xtr, ytr, classes, bary, gamma):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from structattn.report.plot import save_figure

    methods = [("euclidean", None, "Euclidean mean")] + [(r, gamma, f"{REG_NAME[r]} barycentre, γ = {gamma:g}")
                                                        for r in REGS]
    fig = Figure(figsize=(3.2 * len(methods), 1.9 * len(classes)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(classes), len(methods), sharex=True, squeeze=False)
    for r, c in enumerate(classes):
        members = Xtr[ytr == c]
        for k, (reg, g, title) in enumerate(methods):
            ax = axes[r][k]
            for x in members:
                ax.plot(x.numpy(), color="0.8", lw=0.6)
            ax.plot(bary[(reg, g, "mean")][c].numpy(), color="C3", lw=1.6)
            if r == 0:
                ax.set_title(title, fontsize=9)
            if k == 0:
                ax.set_ylabel(f"class {c}", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def figure_alignments(path, z, x, gammas, title):
    """E = ∇DTW_Ω(−C(z, x)) for −H and ℓ2 at each γ, drawn by structattn.report.plot.draw_attention (zeros white,
    non-zero cells outlined): rows are the barycentre's time steps, columns the series'."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from structattn.report.plot import draw_attention, save_figure

    fig = Figure(figsize=(3.6 * len(gammas), 7.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(gammas), squeeze=False)
    C = cost(z, x[None])
    for r, reg in enumerate(REGS):
        for k, g in enumerate(gammas):
            E = dtw_marginals(-C, reg=reg, gamma=g)[0]
            ax = axes[r][k]
            draw_attention(ax, E.numpy(), outline=reg == "l2", vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("training series (time →)", fontsize=8)
            ax.set_ylabel("barycentre (time →)", fontsize=8)
            zeros = 100.0 * float((E == 0).double().mean())
            ax.set_title(f"{REG_NAME[reg]}, γ = {g:g}: {zeros:.1f} % zeros", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


# ---- the run ------------------------------------------------------------------------------------------------------------------


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    t_start = time.time()
    Xtr, ytr, Xte, yte = load_dataset(args.dataset, args.downsample)
    classes = sorted(int(c) for c in torch.unique(ytr))
    if args.max_per_class:
        keep = torch.cat([(ytr == c).nonzero()[: args.max_per_class, 0] for c in classes])
        Xtr, ytr = Xtr[keep], ytr[keep]
    if args.test_limit:
        Xte, yte = Xte[: args.test_limit], yte[: args.test_limit]
    members = {c: Xtr[ytr == c] for c in classes}
    res = {"dataset": args.dataset, "downsample": args.downsample, "length": Xtr.shape[1],
           "train": len(Xtr), "test": len(Xte), "classes": classes, "runs": [], "accuracy": {}, "sparsity": {}}
    bary = {("euclidean", None, "mean"): {c: members[c].mean(0) for c in classes}}

    # Barycentres: from the Euclidean mean for every (Ω, γ); from seeded random members for --seed-gammas.
    inits = [("mean", None)] + [("seed", s) for s in args.seeds]
    for reg in REGS:
        for gamma in args.gammas:
            for kind, seed in inits:
                if kind == "seed" and gamma not in args.seed_gammas:
                    continue
                key = (reg, gamma, "mean" if kind == "mean" else seed)
                bary[key] = {}
                for c in classes:
                    Xc = members[c]
                    if kind == "mean":
                        init = Xc.mean(0)
                    else:
                        g = torch.Generator().manual_seed(1000 * seed + c)
                        init = Xc[int(torch.randint(len(Xc), (1,), generator=g))]
                    t0 = time.time()
                    z, F0, F1, evals = barycentre(Xc, reg, gamma, init, args.iters)
                    hard = float(pairwise(z[None], Xc)[:, 0].mean())
                    bary[key][c] = z
                    res["runs"].append({"reg": reg, "gamma": gamma, "init": kind, "seed": seed, "class": c,
                                        "F_init": F0, "F_final": F1, "evals": evals, "hard_dtw_to_class": hard,
                                        "seconds": time.time() - t0})
                    print(f"{REG_NAME[reg]} γ={gamma:g} init={kind}{'' if seed is None else seed} class {c}: "
                          f"F {F0:.4f} → {F1:.4f} ({evals} evals), hard DTW to class {hard:.4f}", flush=True)
    res["euclidean_hard_dtw_to_class"] = {c: float(pairwise(bary[("euclidean", None, "mean")][c][None],
                                                              members[c])[:, 0].mean()) for c in classes}

    # Nearest-centroid classification of the test split.
    def stack(key):
        return torch.stack([bary[key][c] for c in classes])

    E_mean = stack(("euclidean", None, "mean"))
    acc = res["accuracy"]
    acc["euclidean mean, Euclidean distance"] = nearest_centroid_accuracy(
        torch.cdist(Xte, E_mean), yte, classes)
    acc["euclidean mean, hard DTW"] = nearest_centroid_accuracy(pairwise(E_mean, Xte), yte, classes)
    for key in bary:
        reg, gamma, init = key
        if reg == "euclidean":
            continue
        Z = stack(key)
        name = f"{reg} {gamma:g} {init}"
        acc[f"{name}, hard DTW"] = nearest_centroid_accuracy(pairwise(Z, Xte), yte, classes)
        acc[f"{name}, own D"] = nearest_centroid_accuracy(pairwise(Z, Xte, reg, gamma), yte, classes)

    # Sparsity of the alignments between each barycentre (from the mean) and its class's training series.
    for reg in REGS:
        for gamma in args.gammas:
            zeros, support = [], []
            for c in classes:
                with torch.no_grad():
                    E = dtw_marginals(-cost(bary[(reg, gamma, "mean")][c], members[c]), reg=reg, gamma=gamma)
                zeros.append((E == 0).double().mean(dim=(1, 2)))
                support.append((E > 0).double().sum(2).mean(1))  # non-zero cells per barycentre time step
            zeros, support = torch.cat(zeros), torch.cat(support)
            res["sparsity"][f"{reg} {gamma:g}"] = {"zeros_pct": 100 * float(zeros.mean()),
                                                   "zeros_pct_min": 100 * float(zeros.min()),
                                                   "support_per_row": float(support.mean())}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_figures:
        g = 0.1 if 0.1 in args.gammas else args.gammas[0]
        figure_barycentres(out / "barycentres.png", Xtr, ytr, classes, bary, g)
        c = classes[0]
        figure_alignments(out / "alignments.png", bary[("l2", g, "mean")][c], members[c][0], args.gammas,
                          f"{args.dataset} class {c}: ℓ2 barycentre (γ = {g:g}) vs a training series")
    res["seconds"] = time.time() - t_start
    res["command"] = " ".join(["python recipes/timeseries/run.py", *map(shlex.quote, args.argv)])
    res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                      "torch": torch.__version__, "tslearn": importlib.metadata.version("tslearn"),
                      "structattn": structattn.__version__, "threads": args.threads,
                      "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    res["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "RESULTS.md").write_text(results_markdown(res, args))
    return res


def results_markdown(res, args) -> str:
    classes = res["classes"]
    m = res["machine"]
    lines = [
        f"# DTW_Ω barycentres on {res['dataset']} (−H vs ℓ2)",
        "",
        f"Command: `{res['command']}` — {res['seconds']:.0f} s wall. Date: {res['date']}.",
        f"Machine: {m['cpus']} CPUs ({m['platform']}), {m['threads']} torch thread(s), shared with other jobs "
        f"(load average at the end {', '.join(f'{x:.1f}' for x in m['load_average'] or [])}); Python {m['python']}, "
        f"torch {m['torch']}, tslearn {m['tslearn']}, structattn {m['structattn']}.",
        "",
        f"Data: {res['dataset']} from the UEA & UCR Time Series Classification Repository, as bundled in `tslearn` "
        f"(BSD-2-Clause; `tslearn/.cached_datasets/{res['dataset']}.npz`, sha256 checked), {len(classes)} classes, "
        f"{res['train']} train / {res['test']} test series, averaged over {res['downsample']} samples to length "
        f"{res['length']}. Barycentres: L-BFGS (≤ {args.iters} iterations) on F(z) = mean_k D_Ω(z, x_k), "
        "D_Ω = −DTW_Ω(−C), C = squared differences (D_{−H} is soft-DTW). No randomness except the random starting "
        f"series of the seeded runs (seeds {', '.join(map(str, args.seeds)) or 'none'}).",
        "",
        "## Objective (mean over classes; from the Euclidean mean)",
        "",
        "F is each method's own objective (not comparable across Ω or γ: D_{−H} ≤ hard DTW can be negative, D_{ℓ2} ≥ hard DTW); the mean hard-DTW distance of the barycentre "
        "to its class's training series is the common yardstick (lower is better).",
        "",
        "| Ω | γ | F at start | F at end | mean hard DTW to class | L-BFGS evaluations |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    eu = statistics.mean(res["euclidean_hard_dtw_to_class"].values())
    lines.append(f"| Euclidean mean | — | — | — | {eu:.3f} | — |")
    for reg in REGS:
        for gamma in args.gammas:
            rs = [r for r in res["runs"] if r["reg"] == reg and r["gamma"] == gamma and r["init"] == "mean"]
            lines.append(f"| {REG_NAME[reg]} | {gamma:g} | {statistics.mean(r['F_init'] for r in rs):.3f} | "
                         f"{statistics.mean(r['F_final'] for r in rs):.3f} | "
                         f"{statistics.mean(r['hard_dtw_to_class'] for r in rs):.3f} | "
                         f"{sum(r['evals'] for r in rs)} |")
    seeded = [r for r in res["runs"] if r["init"] == "seed"]
    if seeded:
        lines += ["", "From a random training series of the class (seeds "
                  f"{', '.join(map(str, args.seeds))}; mean ± sd over seeds of the class-averaged numbers):", "",
                  "| Ω | γ | F at start | F at end | mean hard DTW to class | test accuracy, hard DTW | "
                  "test accuracy, own D_Ω |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for reg in REGS:
            for gamma in args.seed_gammas:
                per = {}
                for s in args.seeds:
                    rs = [r for r in seeded if r["reg"] == reg and r["gamma"] == gamma and r["seed"] == s]
                    if not rs:
                        continue
                    per[s] = (statistics.mean(r["F_init"] for r in rs), statistics.mean(r["F_final"] for r in rs),
                              statistics.mean(r["hard_dtw_to_class"] for r in rs),
                              100 * res["accuracy"][f"{reg} {gamma:g} {s}, hard DTW"],
                              100 * res["accuracy"][f"{reg} {gamma:g} {s}, own D"])
                if per:
                    cols = ["{:.3f} ± {:.3f}".format(*_mean_sd(v[i] for v in per.values())) for i in range(3)]
                    cols += ["{:.1f} ± {:.1f}".format(*_mean_sd(v[i] for v in per.values())) for i in (3, 4)]
                    lines.append(f"| {REG_NAME[reg]} | {gamma:g} | " + " | ".join(cols) + " |")
    lines += ["", f"## Nearest-centroid accuracy on the test split ({res['test']} series)", "",
              "| centroid | γ | hard DTW to the centroid (%) | the centroid's own discrepancy (%) |",
              "| --- | --- | --- | --- |",
              f"| Euclidean mean | — | {100 * res['accuracy']['euclidean mean, hard DTW']:.1f} | "
              f"{100 * res['accuracy']['euclidean mean, Euclidean distance']:.1f} (Euclidean distance) |"]
    for reg in REGS:
        for gamma in args.gammas:
            a = res["accuracy"]
            lines.append(f"| {REG_NAME[reg]} barycentre | {gamma:g} | {100 * a[f'{reg} {gamma:g} mean, hard DTW']:.1f} | "
                         f"{100 * a[f'{reg} {gamma:g} mean, own D']:.1f} |")
    lines += ["", "## Sparsity of the alignments E = ∇DTW_Ω(−C(z_c, x_k)) (barycentre vs its class's training series)",
              "", "| Ω | γ | exact zeros (%), mean | lowest over series | non-zero cells per barycentre step |",
              "| --- | --- | --- | --- | --- |"]
    for reg in REGS:
        for gamma in args.gammas:
            s = res["sparsity"][f"{reg} {gamma:g}"]
            lines.append(f"| {REG_NAME[reg]} | {gamma:g} | {s['zeros_pct']:.2f} | {s['zeros_pct_min']:.2f} | "
                         f"{s['support_per_row']:.2f} |")
    if not args.no_figures:
        lines += ["", "![barycentres](barycentres.png)", "", "![alignments](alignments.png)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=DATASET, help="a data set that tslearn bundles (default Trace)")
    p.add_argument("--downsample", type=int, default=2, help="average every k samples (default 2: 275 → 137)")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--iters", type=int, default=40, help="L-BFGS iterations per barycentre")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="seeds of the random-start runs (random training series of the class)")
    p.add_argument("--seed-gammas", type=float, nargs="*", default=None,
                   help="the γ's that get random-start runs (default: every γ of --gammas)")
    p.add_argument("--max-per-class", type=int, default=0, help="use at most this many training series per class")
    p.add_argument("--test-limit", type=int, default=0, help="classify only the first n test series")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "work")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.downsample < 1 or args.iters < 1:
        p.error("--downsample and --iters must be >= 1")
    if any(g <= 0 for g in args.gammas):
        p.error("--gammas must be > 0")
    if args.seed_gammas is None:
        args.seed_gammas = list(args.gammas)
    return run(args)


if __name__ == "__main__":
    main()
