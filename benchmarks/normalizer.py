"""Attention normaliser alone (no matmuls): scores (B, T) → weights, forward + backward, CPU, 1 thread.

    python benchmarks/normalizer.py [--B 64] [--T 50] [--reps 300] [--device cpu|cuda] [--sparsemap-reps 5]

Prints a markdown table of medians (interleaved repetitions), unpadded and with left padding (0–19 pads per row):
softmax, sparsemax, fusedmax, oscarmax, 1.5-entmax and the Viterbi normalisers, plus the Viterbi −H normaliser on the
reference tensor backend; with --sparsemap-reps, a SparseMAP block timed beside softmax in its own loop. This isolates what the structured attention adds
to a decoder step: the step-level table of benchmarks/run.py also contains the bilinear scores and the context,
which are the same for every method and dominate at hidden 500.
"""

import argparse
import statistics
import time

import torch

from structattn.attention import (
    entmax15_attention,
    fusedmax_attention,
    oscarmax_attention,
    softmax_attention,
    sparsemax_attention,
    viterbi_attention,
)
from structattn.ops.viterbi import viterbi_backend


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sparsemap-reps", type=int, default=0,
                    help="also time SparseMAP beside softmax, this many repetitions (0: skip)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="SparseMAP block: wall time (perf_counter) or this thread's CPU time (thread_time), which a "
                         "machine busy with other jobs inflates less for the long calls")
    ap.add_argument("--sparsemap-only", action="store_true",
                    help="only the SparseMAP block (needs --sparsemap-reps), not the main table")
    ap.add_argument("--sparsemap-tensor", action="store_true",
                    help="in the SparseMAP block, also time the tensor solver (the fallback) in the same loop")
    a = ap.parse_args()
    if a.sparsemap_only and not a.sparsemap_reps:
        ap.error("--sparsemap-only needs --sparsemap-reps N")
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    cuda = torch.device(a.device).type == "cuda"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    s = torch.randn(a.B, a.T).to(a.device).requires_grad_(True)
    tr = torch.zeros(2, 2, device=a.device, requires_grad=True)
    pm = torch.zeros(a.B, a.T, dtype=torch.bool)
    for b in range(a.B):
        pm[b, : b % min(20, a.T)] = True
    pm = pm.to(a.device)

    def sync():
        if cuda:  # CUDA launches are asynchronous: time until the device has finished
            torch.cuda.synchronize()

    fns = {
        "softmax": lambda m: softmax_attention(s, m),
        "sparsemax": lambda m: sparsemax_attention(s, m),
        # the structured sparsemaxes at their default λ (fusedmax 0.1, oscarmax 0.01) and 1.5-entmax
        "fusedmax (λ=0.1)": lambda m: fusedmax_attention(s, m),
        "oscarmax (λ=0.01)": lambda m: oscarmax_attention(s, m),
        "entmax15": lambda m: entmax15_attention(s, m),
        "viterbi -H (γ=2)": lambda m: viterbi_attention(s, tr, m, "entropy", 2.0),
        "viterbi l2 (γ=10)": lambda m: viterbi_attention(s, tr, m, "l2", 10.0),
    }
    if a.sparsemap_only:
        sparsemap_block(s, pm, a.sparsemap_reps, sync, a.sparsemap_tensor, a.clock)
        return
    res = {k: {"none": [], "pad": []} for k in fns}
    for _ in range(a.reps):
        for k, f in fns.items():
            for key, m in (("none", None), ("pad", pm)):
                sync()
                t0 = time.perf_counter()
                f(m).pow(2).sum().backward()
                sync()
                res[k][key].append(time.perf_counter() - t0)
    ref = []
    with viterbi_backend("reference"):
        for _ in range(max(a.reps // 3, 10)):
            sync()
            t0 = time.perf_counter()
            viterbi_attention(s, tr, pm, "entropy", 2.0).pow(2).sum().backward()
            sync()
            ref.append(time.perf_counter() - t0)
    base = statistics.median(res["softmax"]["pad"])
    print(f"B={a.B}, T={a.T}, device {a.device}, torch {torch.__version__}, 1 thread, medians of {a.reps} "
          "interleaved repetitions\n")
    print("| normaliser (fwd + bwd) | unpadded | left-padded | padded / softmax padded |")
    print("|---|---|---|---|")
    for k in fns:
        p = statistics.median(res[k]["pad"])
        print(f"| {k} | {statistics.median(res[k]['none']) * 1e3:.3f} ms | {p * 1e3:.3f} ms | {p / base:.1f}× |")
    r = statistics.median(ref)
    print(f"| viterbi -H, reference backend | | {r * 1e3:.3f} ms | {r / base:.1f}× |")
    if a.sparsemap_reps:
        sparsemap_block(s, pm, a.sparsemap_reps, sync, a.sparsemap_tensor, a.clock)


# ---- SparseMAP: its own block, timed against softmax in the same loop ------------------------------------


def sparsemap_block(s, pm, reps, sync, tensor=False, clock="wall"):
    """SparseMAP segmentation attention, fwd + bwd, beside softmax measured in the same interleaved loop (SparseMAP
    is 10²–10³x slower, so it gets fewer repetitions than the main table), with T = 0 (SparsemapAttention's
    initialisation) and T = 3·I (a contiguity prior); then the mean number of active structures per row for score
    scales std 1 and 2 and T ∈ {0, I, 3·I}. The solver is the C one where it is available (else the tensor solver, and
    the rows say so); ``tensor``: the tensor solver too, in the same loop."""
    from structattn.attention import sparsemap_attention
    from structattn.ops import sparsemap as SM

    kernel = SM._kernel
    solver = "C" if s.device.type == "cpu" and kernel() is not None else "tensor"

    eye = torch.eye(2, device=s.device)
    fns = {"softmax": lambda m: softmax_attention(s, m),
           f"sparsemap ({solver} solver), T = 0": lambda m: sparsemap_attention(s, 0 * eye, m),
           f"sparsemap ({solver} solver), T = 3·I": lambda m: sparsemap_attention(s, 3 * eye, m)}
    if tensor and solver == "C":
        fns["sparsemap (tensor solver), T = 0"] = lambda m: sparsemap_attention(s, 0 * eye, m)
        fns["sparsemap (tensor solver), T = 3·I"] = lambda m: sparsemap_attention(s, 3 * eye, m)
    now = time.thread_time if clock == "cpu" else time.perf_counter
    res = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            SM._kernel = (lambda: None) if "tensor solver" in k else kernel  # forward and backward alike
            sync()
            t0 = now()
            f(pm).pow(2).sum().backward()
            sync()
            res[k].append(now() - t0)
    SM._kernel = kernel
    base = statistics.median(res["softmax"])
    B, T = s.shape
    print(f"\nSparseMAP block: B={B}, T={T}, left-padded, medians of {reps} interleaved repetitions, "
          f"{'CPU time of the thread' if clock == 'cpu' else 'wall time'}\n")
    print("| normaliser (fwd + bwd) | left-padded | / softmax padded (same loop) | active structures / row |")
    print("|---|---|---|---|")
    for k, v in res.items():
        n = ""
        if k != "softmax":
            with torch.no_grad():
                SM._kernel = (lambda: None) if "tensor solver" in k else kernel
                _, info = sparsemap_attention(s, (0 if "= 0" in k else 3) * eye, pm, return_structures=True)
                SM._kernel = kernel
            n = f"{info.num_structures.float().mean().item():.2f}"
        m = statistics.median(v)
        print(f"| {k} | {m * 1e3:.3f} ms | {m / base:.1f}× | {n} |")
    print("\nActive structures per row (mean, max), unpadded, s ~ N(0, std²):\n")
    print("| std | T = 0 | T = I | T = 3·I |")
    print("|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    for std in (1.0, 2.0):
        x = (torch.randn(B, T, generator=g) * std).to(s.device)
        cells = []
        for c in (0.0, 1.0, 3.0):
            with torch.no_grad():
                _, info = sparsemap_attention(x, c * eye, return_structures=True)
            k = info.num_structures.float()
            cells.append(f"{k.mean().item():.2f} ({int(k.max())})")
        print(f"| {std:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
