"""DTW_Ω (−γH, i.e. soft-DTW) value + gradient on CPU against the soft-DTW packages that install here.

    python benchmarks/dtw.py [--lengths 64 256 1024] [--batches 1 16 256] [--max-cells 20000000] [--reps 2]

For each (length L, batch B) with B·L² ≤ --max-cells: a cost matrix C (B, L, L) float64 in [0, 1), and the time of
soft-DTW value + gradient w.r.t. C (one value per pair, the gradient of their sum) by
* ``structattn``: ``-dtw_value(-C)`` + backward (the C kernel, the library's default on CPU; 1 thread), also in
  float32 (``structattn f32``) for reference;
* ``soft-dtw``: the authors' package (Cython), ``sdtw.SoftDTW(C[b]).compute(); .grad()``, one pair at a time;
* ``tslearn``: ``tslearn.metrics.SoftDTW`` (numba), one pair at a time;
* ``pysdtw``: ``pysdtw.SoftDTWcpu`` (numba, batched, ``parallel=True``: all cores);
* ``ddtw``: ``ddtw.SDTW(backend="cpu_numba")`` (batched).
The packages that are not installed are left out (the table says which ran). Every package's value is checked
against structattn's (1e-6 relative) before its time is recorded. Time: the best of --reps interleaved repetitions
after one warm-up (numba compiles then); a repetition times as many calls as fill about 50 ms, each alone, and keeps
the fastest (one call for the large sizes; up to 1000 for the small ones, where one call per repetition on a shared
machine would time the scheduler). Peak memory, in one more call per implementation after the timed ones: the
growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set before
the call, inputs excluded.
Prints a markdown table; ratios are package time / structattn time, from the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import os
import platform
import time

# pysdtw and ddtw run numba `parallel=True` loops; with OpenMP's default wait policy their worker threads spin for a
# while after each call and steal the 2 cores from whatever runs next (we measured +200 ms on the following call).
# Passive waiting keeps their parallelism and removes the spill-over. Set before numba is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_BLOCKTIME", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from structattn import dtw_marginals, dtw_value  # noqa: E402

GAMMA = 1.0


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


_libc = ctypes.CDLL(None)


def timed(fn, calls: int = 1) -> float:
    """The fastest of ``calls`` calls, each timed alone (a call that the scheduler interrupted is only slower)."""
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def calls_for(fn, target: float = 0.05) -> int:
    """How many calls one repetition makes: as many as fill about ``target`` seconds (1 for the large sizes, up to
    1000 for the small ones, where one call per repetition on a shared machine would time the scheduler). The same
    rule for every package."""
    return max(1, min(1000, int(target / max(timed(fn), 1e-6))))


def ms(t: float) -> str:
    return f"{t * 1e3:.3g}" if t < 1 else f"{t * 1e3:.0f}"


def peak_mib(fn) -> float:
    """Peak extra resident MiB of one call. Run apart from the timed calls: giving the heap back first
    (malloc_trim) makes the next calls fault their pages in again, which would distort their times."""
    gc.collect()
    _libc.malloc_trim(0)  # give freed heap back so that the baseline is what is really held
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        pass
    rss0 = _kib("VmRSS")
    fn()
    return (_kib("VmHWM") - rss0) / 1024


def runners(C: torch.Tensor):
    """name → callable returning the (B,) soft-DTW values (gradients computed and kept alive until return)."""
    B = C.shape[0]
    Cn = C.numpy()
    out = {}

    def ours(dtype):
        Cg = C.to(dtype, copy=True).requires_grad_()  # a leaf made once, outside the timed call

        def f():
            Cg.grad = None
            v = -dtw_value(-Cg, gamma=GAMMA)  # soft-DTW of a cost = −DTW_{−γH} of the scores −C
            v.sum().backward()
            return v.detach().double().numpy(), Cg.grad
        return f

    out["structattn"] = ours(torch.float64)
    out["structattn f32"] = ours(torch.float32)
    if importlib.util.find_spec("sdtw"):
        import sdtw

        def f_sdtw():
            vals, grads = [], []
            for b in range(B):
                s = sdtw.SoftDTW(Cn[b], gamma=GAMMA)
                vals.append(s.compute())
                grads.append(s.grad())
            return np.array(vals), grads
        out["soft-dtw"] = f_sdtw
    if importlib.util.find_spec("tslearn"):
        from tslearn.metrics import SoftDTW as TsSoftDTW

        def f_tslearn():
            vals, grads = [], []
            for b in range(B):
                s = TsSoftDTW(Cn[b], gamma=GAMMA)
                vals.append(s.compute())
                grads.append(s.grad())
            return np.array(vals), grads
        out["tslearn"] = f_tslearn
    if importlib.util.find_spec("pysdtw"):
        from pysdtw import SoftDTWcpu

        Cp = C.clone().requires_grad_()

        def f_pysdtw():
            Cg = Cp
            Cg.grad = None
            lengths = torch.tensor([[C.shape[1], C.shape[2]]] * B)
            v = SoftDTWcpu.apply(Cg, lengths, GAMMA, 0)
            v.sum().backward()
            return v.detach().numpy(), Cg.grad
        out["pysdtw"] = f_pysdtw
    if importlib.util.find_spec("ddtw"):
        from ddtw import SDTW

        m = SDTW(gamma=GAMMA, normalization="none", backend="cpu_numba", dtype_float=torch.float64)

        Cd = C.clone().requires_grad_()

        def f_ddtw():
            Cg = Cd
            Cg.grad = None
            v = m(C=Cg)  # the batch mean
            v.backward()
            return None, Cg.grad
        out["ddtw"] = f_ddtw
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--max-cells", type=int, default=20_000_000)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread; gamma={GAMMA}, float64 unless said")
    rows = []
    for L in a.lengths:
        for B in a.batches:
            if B * L * L > a.max_cells:
                continue
            g = torch.Generator().manual_seed(L * 1000 + B)
            C = torch.rand(B, L, L, generator=g, dtype=torch.float64)
            fns = runners(C)
            ref_val = -dtw_value(-C, gamma=GAMMA).numpy()
            ref_grad = dtw_marginals(-C, gamma=GAMMA)
            best = {k: (float("inf"), 0.0) for k in fns}
            for k, f in fns.items():  # warm-up (numba JIT) + correctness
                val, grad = f()
                if val is not None:
                    tol = 1e-3 if k.endswith("f32") else 1e-6
                    assert np.allclose(val, ref_val, rtol=tol, atol=tol), (k, val[:3], ref_val[:3])
                g0 = grad[0] if isinstance(grad, list) else grad[0].double().numpy()
                scale = B if k == "ddtw" else 1  # ddtw differentiates the batch mean
                assert np.allclose(np.asarray(g0) * scale, ref_grad[0].numpy(), atol=1e-3), k
                del val, grad
            calls = {k: calls_for(f) for k, f in fns.items()}
            for _ in range(a.reps):
                for k, f in fns.items():
                    t, m = best[k]
                    best[k] = (min(t, timed(f, calls[k])), m)
            for k, f in fns.items():
                best[k] = (best[k][0], peak_mib(f))
            base = best["structattn"][0]
            for k, (t, m) in best.items():
                rows.append((L, B, k, t, m, t / base))
            print(f"L={L} B={B}: " + ", ".join(f"{k} {ms(t)} ms ({t / base:.2f}x)" for k, (t, _) in best.items()),
                  flush=True)
            del C, fns
    print()
    print("| L | B | implementation | time (ms) | peak extra memory (MiB) | time / structattn |")
    print("|---:|---:|---|---:|---:|---:|")
    for L, B, k, t, m, r in rows:
        print(f"| {L} | {B} | {k} | {ms(t)} | {m:.1f} | {r:.2f} |")


if __name__ == "__main__":
    main()
