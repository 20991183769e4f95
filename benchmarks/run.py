#!/usr/bin/env python
"""Speed of structured attention vs softmax: one command → a table on stdout and benchmarks/RESULTS.md.

    python benchmarks/run.py              # step level, all shapes, + end-to-end fairseq-train (if fairseq imports)
    python benchmarks/run.py --quick      # step level at B=64, T=50 only, fewer repetitions, small e2e run
    python benchmarks/run.py --no-e2e     # step level only
    python benchmarks/run.py --device cuda --quick --no-e2e   # step level on a GPU (scripts/gpu_check.sh)

Step level: one decoder-step attention, forward + backward, with the modules of structattn.attention: bilinear
scores s_t = x_t·(M z), weights, context c = Σ_t w_t x_t, then the gradient of a scalar loss of c w.r.t. x, z, M
(and the 2×2 transitions T for Viterbi), which for Viterbi runs the Alg. 4 Hessian-vector product through the
marginals. Methods are timed in interleaved repetitions (each repetition runs every method once, in turn), and the
table reports medians and ratios to softmax from the same run. Anchors: a naive tensor-API Vit_Ω (autograd through
the recursion, double backward for the HVP), the library's own reference backend (Alg. 3/4 as tensor ops), and
torch-struct's LinearChainCRF marginals (−H only) where it is installed.

End to end: fairseq-train with the structattn_lstm plugin (structattn_fairseq/) on small synthetic data generated here,
one process per attention, CPU; tokens/s (wps) and peak resident memory, as ratios to softmax.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from structattn.attention import PAPER_GAMMA, build_attention, segmentation_potentials  # noqa: E402
from structattn.ops.viterbi import resolve_backend, viterbi_backend  # noqa: E402

GAMMA = PAPER_GAMMA  # the paper's temperatures (App. C.3), as the attention modules default to


# ---- step-level methods -------------------------------------------------------------------------------------------


def _naive_value(theta, reg, gamma):
    """Vit_Ω by the plain recursion, every op recorded by autograd (the "tensor-API" implementation)."""
    B, T, S, _ = theta.shape
    v = theta.new_zeros(B, S)
    for t in range(T):
        x = theta[:, t] + v[:, None, :]
        v = _naive_max(x, reg, gamma)
    return _naive_max(v, reg, gamma)


def _naive_max(x, reg, gamma):
    if reg == "entropy":
        return gamma * torch.logsumexp(x / gamma, dim=-1)
    q1 = ((1.0 + (x[..., 1] - x[..., 0]) / gamma) * 0.5).clamp(0.0, 1.0)
    q = torch.stack((1.0 - q1, q1), -1)
    return (q * x).sum(-1) - 0.5 * gamma * (q * q).sum(-1)


def _normalise(p):
    total = p.sum(-1, keepdim=True)
    return p / total.clamp_min(torch.finfo(p.dtype).tiny)


class Step:
    """One method: ``run()`` does forward + backward of one attention step on fixed inputs."""

    def __init__(self, name, weights_fn, module, x, z, params, backend=None):
        self.name, self.module, self.x, self.z, self.backend = name, module, x, z, backend
        self.weights_fn = weights_fn
        self.inputs = [x, z, *params]
        self.r = torch.randn(x.shape[0], x.shape[2], generator=torch.Generator().manual_seed(1)).to(x.device)

    def forward(self):
        if self.weights_fn is None:
            context, w = self.module(self.z, self.x)
        else:
            scores = torch.bmm(self.x, self.module.proj(self.z).unsqueeze(2)).squeeze(2)
            w = self.weights_fn(scores)
            context = torch.bmm(w.unsqueeze(1), self.x).squeeze(1)
        return context, w

    def run(self):
        if self.backend is not None:
            with viterbi_backend(self.backend):
                return self._run()
        return self._run()

    def _run(self):
        context, _ = self.forward()
        loss = (context * self.r).sum()
        return torch.autograd.grad(loss, self.inputs)


def build_steps(B, T, H, seed, with_naive=True, with_torch_struct=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, T, H, generator=g) * 2 - 1).to(device).requires_grad_(True)
    z = (torch.rand(B, H, generator=g) * 2 - 1).to(device).requires_grad_(True)
    steps = []
    for kind in ("softmax", "sparsemax"):
        torch.manual_seed(seed)
        m = build_attention(kind, H, H).to(device)
        steps.append(Step(kind, None, m, x, z, [m.proj.weight]))
    vit = {}
    for reg in ("entropy", "l2"):
        torch.manual_seed(seed)
        # the paper form (raw T), like the naive anchor whose θ it is timed against
        m = build_attention("viterbi", H, H, reg, GAMMA[reg], "paper").to(device)
        with torch.no_grad():
            m.transitions.copy_(torch.tensor([[0.5, -0.5], [-0.5, 0.5]]))  # some contiguity, not the zero init
        vit[reg] = m
        label = "-H" if reg == "entropy" else "l2"
        steps.append(Step(f"viterbi {label}", None, m, x, z, [m.proj.weight, m.transitions]))
        steps.append(Step(f"viterbi {label} [reference backend]", None, m, x, z, [m.proj.weight, m.transitions],
                          backend="reference"))
        if with_naive:
            def naive(scores, m=m, reg=reg):
                theta = segmentation_potentials(scores, m.transitions)
                value = _naive_value(theta, reg, GAMMA[reg])
                (E,) = torch.autograd.grad(value.sum(), theta, create_graph=True)
                return _normalise(E[:, :, 1, :].sum(-1))

            steps.append(Step(f"viterbi {label} [naive tensor-API]", naive, m, x, z, [m.proj.weight, m.transitions]))
    if with_torch_struct:
        try:
            import torch_struct  # noqa: F401
        except Exception:  # noqa: BLE001
            pass
        else:
            m = vit["entropy"]

            def ts(scores, m=m):
                import torch_struct

                theta = segmentation_potentials(scores, m.transitions) / GAMMA["entropy"]
                E = torch_struct.LinearChainCRF(theta).marginals
                return _normalise(E[:, :, 1, :].sum(-1))

            steps.append(Step("viterbi -H [torch-struct]", ts, m, x, z, [m.proj.weight, m.transitions]))
    return steps


def check_agreement(steps):
    """All Viterbi variants of one Ω must give the same weights (the benchmark compares equal computations)."""
    out = {}
    for s in steps:
        if not s.name.startswith("viterbi"):
            continue
        key = s.name.split(" [")[0]
        if s.backend is not None:
            with viterbi_backend(s.backend):
                w = s.forward()[1]
        else:
            w = s.forward()[1]
        out.setdefault(key, []).append((s.name, w.detach()))
    worst = 0.0
    for key, ws in out.items():
        for name, w in ws[1:]:
            err = (w - ws[0][1]).abs().max().item()
            worst = max(worst, err)
            if err > 1e-4:
                raise RuntimeError(f"{name} disagrees with {ws[0][0]}: max weight difference {err:.3g}")
    return worst


def _sync(device):
    # CUDA launches are asynchronous: time until the device has finished.
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_shape(B, T, H, reps, warmup, seed=0, with_naive=True, device="cpu"):
    steps = build_steps(B, T, H, seed, with_naive=with_naive, device=device)
    agree = check_agreement(steps)
    times = {s.name: [] for s in steps}
    for _ in range(warmup):
        for s in steps:
            s.run()
    for _ in range(reps):
        for s in steps:  # interleaved: machine noise hits every method alike
            _sync(device)
            t0 = time.perf_counter()
            s.run()
            _sync(device)
            times[s.name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return med, agree


# ---- end to end ---------------------------------------------------------------------------------------------------


def run_e2e(args):
    import e2e  # benchmarks/e2e.py

    return e2e.run(quick=args.quick, threads=args.threads, updates=args.e2e_updates, workdir=args.e2e_dir,
                   device=args.device)


# ---- report -------------------------------------------------------------------------------------------------------


def machine_info(threads):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def fmt_ms(s):
    return f"{s * 1e3:8.2f}"


def step_table(results):
    names = list(next(iter(results.values()))[0].keys())
    lines = ["| method | " + " | ".join(f"B={B} T={T}" for (B, T) in results) + " |",
             "|---|" + "---|" * len(results)]
    for n in names:
        cells = []
        for (B, T), (med, _) in results.items():
            base = med["softmax"]
            cells.append(f"{med[n] * 1e3:.2f} ms ({med[n] / base:.2f}×)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="B=64, T=50 only, fewer repetitions, short e2e run")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; recorded)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per method and shape")
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--no-e2e", action="store_true", help="skip the fairseq-train part")
    ap.add_argument("--e2e-only", action="store_true", help="only the fairseq-train part")
    ap.add_argument("--e2e-updates", type=int, default=None, help="updates per fairseq-train run")
    ap.add_argument("--e2e-dir", default=None, help="work folder for the e2e data/checkpoints (default: a temp dir)")
    ap.add_argument("--no-naive", action="store_true", help="skip the slow naive tensor-API anchor")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the step-level tensors live and "
                    "where fairseq-train runs")
    ap.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    probe = torch.zeros(1, 1, 2, 2, device=args.device)
    info["viterbi_backend"] = resolve_backend("auto", probe)
    info["device"] = args.device
    print(f"# machine: {info}")

    results = {}
    if not args.e2e_only:
        shapes = [(64, 50)] if args.quick else [(B, T) for B in (32, 64, 128) for T in (20, 50, 100)]
        reps = args.reps or (15 if args.quick else 25)
        for B, T in shapes:
            med, agree = bench_shape(B, T, args.hidden, reps, warmup=3, with_naive=not args.no_naive,
                                     device=args.device)
            results[(B, T)] = (med, agree)
            base = med["softmax"]
            print(f"\nB={B} T={T} H={args.hidden} (median of {reps}; Viterbi variants agree to {agree:.1e})")
            for n, t in med.items():
                print(f"  {n:40s} {fmt_ms(t)} ms   {t / base:6.2f}× softmax")
    e2e_res = None
    if not args.no_e2e:
        sys.path.insert(0, HERE)
        e2e_res = run_e2e(args)

    cmd = "python benchmarks/" + os.path.basename(sys.argv[0]) + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    write_results(args.output, info, cmd, results, e2e_res, args)
    print(f"\nwrote {os.path.relpath(args.output, ROOT)}")


def write_results(path, info, cmd, results, e2e_res, args):
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = [
        "# Benchmark results",
        "",
        f"Generated by `{cmd}` on {now}.",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores visible, CUDA: {info['cuda']}",
        f"- torch {info['torch']}, Python {info['python']}, `torch.set_num_threads({info['threads']})`",
        f"- device: {info['device']}; Viterbi backend chosen by `auto` there: `{info['viterbi_backend']}`",
    ]
    if torch.device(info["device"]).type == "cpu":
        out.append("- GPU numbers: **not measured yet** in this file (a CPU run); `scripts/gpu_check.sh` measures them "
                   "on a GPU machine.")
    out.append("")
    if results:
        out += [
            "## Step level (one decoder-step attention, forward + backward, hidden "
            f"{args.hidden}, {info['device']})",
            "",
            "Median time per step and ratio to softmax measured in the same run (interleaved repetitions). "
            "Viterbi rows use γ = 2 (−H) and γ = 10 (ℓ2); the backward of the Viterbi rows includes the Alg. 4 "
            "Hessian-vector product through the marginals. `[reference backend]` = the library's tensor-op Alg. "
            "3/4; `[naive tensor-API]` = autograd through the recursion (double backward); `[torch-struct]` = "
            "torch-struct 0.5 LinearChainCRF marginals.",
            "",
            step_table(results),
            "",
        ]
        if (64, 50) in results:
            med = results[(64, 50)][0]
            out += ["### Targets at B=64, T=50", ""]
            for label in ("-H", "l2"):
                fast = med[f"viterbi {label}"]
                r = fast / med["softmax"]
                line = f"- Viterbi {label}: {r:.2f}× softmax (target ≤ 1.3×: {'met' if r <= 1.3 else 'MISSED'})"
                naive = med.get(f"viterbi {label} [naive tensor-API]")
                if naive is not None:
                    sp = naive / fast
                    line += f"; {sp:.1f}× faster than the naive tensor-API anchor (target ≥ 5×: " \
                            f"{'met' if sp >= 5 else 'MISSED'})"
                ref = med.get(f"viterbi {label} [reference backend]")
                if ref is not None:
                    line += f"; {ref / fast:.1f}× faster than the reference backend"
                out.append(line)
            out.append("")
    if e2e_res is not None:
        out += ["## End to end (fairseq-train, CPU)", "", e2e_res["markdown"], ""]
    elif not args.e2e_only:
        out += ["## End to end", "", "Not run in this invocation (`--no-e2e`).", ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
