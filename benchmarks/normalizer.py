"""Attention normaliser alone (no matmuls): scores (B, T) → weights, forward + backward, CPU, 1 thread.

    python benchmarks/normalizer.py [--B 64] [--T 50] [--reps 300] [--device cpu|cuda]

Prints a markdown table of medians (interleaved repetitions), unpadded and with left padding (0–19 pads per row),
plus the Viterbi −H normaliser on the reference tensor backend. This isolates what the structured attention adds
to a decoder step: the step-level table of benchmarks/run.py also contains the bilinear scores and the context,
which are the same for every method and dominate at hidden 500.
"""

import argparse
import statistics
import time

import torch

from structattn.attention import softmax_attention, sparsemax_attention, viterbi_attention
from structattn.ops.viterbi import viterbi_backend


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
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
        "viterbi -H (γ=2)": lambda m: viterbi_attention(s, tr, m, "entropy", 2.0),
        "viterbi l2 (γ=10)": lambda m: viterbi_attention(s, tr, m, "l2", 10.0),
    }
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


if __name__ == "__main__":
    main()
