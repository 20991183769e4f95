"""The Triton DTW_Ω kernels (structattn.ops.kernels.triton_dtw): through Triton's interpreter on CPU tensors against
the oracles of tests/test_dtw.py and the reference backend, compiled ahead of time for sm_80/sm_90 without a GPU,
and on CUDA against the reference (GPU machines only: scripts/gpu_check.sh runs this file).

The interpreter runs each program's block as numpy arrays, a few ms per diagonal step, so its cases are small; they
run in one subprocess with TRITON_INTERPRET=1 (Triton reads it when it is first imported). Each oracle call is the
oracle test of tests/test_dtw.py itself, called with backend="triton": soft-dtw and tslearn (−γH value and gradient),
brute-force enumeration (−γH, and the hard limit for both Ω), autograd and double autograd of the plain recursion
(ℓ2 values and gradients, every Hessian product).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

triton = pytest.importorskip("triton")

from structattn import dtw_hvp, dtw_marginals, dtw_value  # noqa: E402
from structattn.ops import dtw as DTW  # noqa: E402
from structattn.ops.kernels import triton_dtw as td  # noqa: E402
from structattn.ops.smoothed_max import REGULARIZERS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def test_explicit_triton_needs_cuda_or_the_interpreter():
    theta = torch.randn(2, 3, 4)
    assert DTW.resolve_dtw_backend("auto", theta) in ("cpu", "reference")  # auto never interprets
    if not INTERPRETING:
        with pytest.raises(ValueError, match=r"needs a CUDA tensor \(or a CPU tensor with TRITON_INTERPRET=1\)"):
            dtw_value(theta, backend="triton")
    with pytest.raises(TypeError, match="supports float32/float64"):
        DTW.resolve_dtw_backend("triton", theta.to(torch.float16))


# ---- the interpreter (CPU tensors) -----------------------------------------------------------------------------------

_ORACLES = r"""
import itertools, sys, torch
sys.path.insert(0, "tests")
import test_dtw as T
from structattn import dtw_hvp, dtw_marginals, dtw_value
from structattn.ops import dtw as DTW
from structattn.ops.kernels import triton_dtw as td

class Rec:  # stands in for pytest's record_property
    def __init__(self): self.oracles = set()
    def __call__(self, key, value): self.oracles.add(value)

rec = Rec()
assert td.available(), td.unavailable_reason()
assert DTW.resolve_dtw_backend("triton", torch.zeros(1, 2, 3)) == "triton"
assert DTW.resolve_dtw_backend("auto", torch.zeros(1, 2, 3)) != "triton"
n = 0
# −γH against the soft-DTW packages (value and gradient), brute force, and the hard limit
T.test_entropy_against_softdtw_packages("sdtw", "triton", 4, 7, 1.0, rec); n += 1
T.test_entropy_against_softdtw_packages("tslearn", "triton", 5, 3, 0.1, rec); n += 1
T.test_entropy_equals_bruteforce_over_alignments("triton", 3, 4, 0.3, rec); n += 1
for reg in T.REGS:
    T.test_small_gamma_tends_to_the_hard_alignment("triton", reg, 4, 3, rec); n += 1
    # ℓ2 and −γH values and gradients, and every Hessian product, against autograd of the plain recursion
    T.test_value_and_gradient_against_the_recursion("triton", reg, 4, 3, rec); n += 1
    T.test_hvp_against_double_autograd_of_the_recursion("triton", reg, 2, 3, rec); n += 1

# Padding of any layout (rows, columns, both; NaN in the padded cells; tall and wide θ) equals the unpadded pair,
# float64 and float32, and equals the reference backend on the whole batch; the chunked path (diagonals longer
# than the block) through a 2-lane block.
def check(theta, lx, ly, reg, gamma, Z, tol):
    N, M = theta.shape[1:]
    pad = T._pad_mask(lx, ly, N, M)
    padded = theta.clone()
    padded[pad] = float("nan")
    th = padded.clone().requires_grad_()
    v = dtw_value(th, lx, ly, reg, gamma, backend="triton")
    (g,) = torch.autograd.grad(v.sum(), th)
    E = dtw_marginals(padded, lx, ly, reg, gamma, backend="triton")
    dot, H = dtw_hvp(padded, Z, lx, ly, reg, gamma, backend="triton")
    assert v.dtype == E.dtype == H.dtype == theta.dtype
    assert (E[pad] == 0).all() and (H[pad] == 0).all() and torch.equal(g, E)
    ref = (dtw_value(padded, lx, ly, reg, gamma, backend="reference"),
           dtw_marginals(padded, lx, ly, reg, gamma, backend="reference"),
           *dtw_hvp(padded, Z, lx, ly, reg, gamma, backend="reference"))
    for a, b in zip((v, E, dot, H), ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for b in (1,):  # rows and columns padded
        nb, mb = int(lx[b]), int(ly[b])
        sub = theta[b:b + 1, :nb, :mb]
        torch.testing.assert_close(v[b], dtw_value(sub, reg=reg, gamma=gamma, backend="triton")[0], rtol=tol, atol=tol)
        torch.testing.assert_close(E[b, :nb, :mb], dtw_marginals(sub, reg=reg, gamma=gamma, backend="triton")[0],
                                   rtol=tol, atol=tol)
        d1, h1 = dtw_hvp(sub, Z[b:b + 1, :nb, :mb], reg=reg, gamma=gamma, backend="triton")
        torch.testing.assert_close(H[b, :nb, :mb], h1[0], rtol=tol, atol=tol)

# float64 on a wide θ, float32 on a tall one (transposed by dtw.py); pair 1 padded in rows and columns, 2 in rows, 3
# in columns
for (dtype, tol, N, M), reg in itertools.product(((torch.float64, 1e-12, 4, 6), (torch.float32, 2e-5, 6, 3)),
                                                 T.REGS):
    theta = T.rand(4, N, M, seed=N + M, scale=1.5, dtype=dtype)
    Z = T.rand(4, N, M, seed=N * M, dtype=dtype)
    check(theta, torch.tensor([N, N - 1, 2, N]), torch.tensor([M, 2, M, M - 2]), reg, 0.6, Z, tol); n += 1
# a transposed (non-contiguous) θ and Z are read through their strides
theta = T.rand(3, 7, 5, seed=3).transpose(1, 2)
Z = T.rand(3, 7, 5, seed=4).transpose(1, 2)
check(theta, torch.tensor([5, 3, 2]), torch.tensor([7, 7, 4]), "entropy", 2.0, Z, 1e-12); n += 1
td._MAX_BLOCK = 2
for reg in T.REGS:
    theta = T.rand(3, 5, 6, seed=9, scale=2.0)
    check(theta, torch.tensor([5, 4, 3]), torch.tensor([6, 6, 5]), reg, 0.5, T.rand(3, 5, 6, seed=10), 1e-12); n += 1
td._MAX_BLOCK = 1024
# the saved state: the value keeps θ and E; the marginals θ, E and W (B, N + M − 1, N) for N ≤ M (tall θ transposed)
theta = T.rand(2, 9, 4, seed=1).requires_grad_()
assert T.saved_sizes(dtw_value(theta, backend="triton").grad_fn) == [2 * 9 * 4] * 2
sizes = T.saved_sizes(T.marginals_node(dtw_marginals(theta, backend="triton")))
assert sizes == sorted([2 * 9 * 4, 2 * 9 * 4, 2 * (9 + 4 - 1) * 4]), sizes
print("ok", n, "|", "; ".join(sorted(rec.oracles)))
"""


def test_triton_kernels_against_the_oracles_through_the_interpreter(record_property):
    """One subprocess with TRITON_INTERPRET=1: the oracle tests of test_dtw.py with backend="triton", padding of any
    layout == unpadded == the reference backend (float64 and float32, both Ω), strided inputs, the chunked path."""
    if os.environ.get("CI") != "true":  # the oracle packages; under CI=true their absence fails (test_dtw._need)
        pytest.importorskip("sdtw")
        pytest.importorskip("tslearn")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", _ORACLES], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout.strip().splitlines()[-1]
    assert out.startswith("ok 16 |"), out
    record_property("oracle", out.split("|", 1)[1].strip())
    print(f"interpreter: {time.time() - t0:.0f} s; oracles: {out.split('|', 1)[1]}")


# ---- ahead-of-time compilation for GPU targets ---------------------------------------------------------------------

TARGETS = (80, 90)
_TRITON_TYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.int64: "i64"}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.kernel, args, kwargs))

        return launch


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPE[value.dtype]
    if isinstance(value, int) and not isinstance(value, bool):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    raise TypeError(f"unexpected kernel argument type {type(value).__name__}")


def launched_variants(shapes=((2, 3, 5), (2, 1500, 1600))):
    """Every distinct (kernel, signature, constexprs, num_warps) that the wrappers launch, recorded at their call
    sites with a real GPU's launch configuration, over every dtype, Ω and pass, for a short and a long diagonal
    (the smallest and the largest block)."""
    calls = []
    kernels = {name: obj for name, obj in vars(td).items() if name.endswith("_kernel")}
    saved = {"unavailable_reason": td.unavailable_reason, "_interpreting": td._interpreting, **kernels}
    try:
        td.unavailable_reason = lambda: None
        td._interpreting = lambda: False
        for name, k in kernels.items():
            setattr(td, name, _Recorder(k, calls))
        for B, N, M in shapes:
            lx, ly = torch.full((B,), N), torch.full((B,), M)
            for dtype in td.DTYPES:
                for reg in REGULARIZERS:
                    theta = torch.zeros(B, N, M, dtype=dtype)
                    W = torch.zeros(B, N + M - 1, N, dtype=dtype)
                    td.forward(theta, lx, ly, reg, 1.0)
                    td.marginals(theta, lx, ly, reg, 1.0)
                    td.backward(theta, W, lx, ly, reg, 1.0)
                    td.hvp(theta, W, theta, theta, lx, ly, reg, 1.0)
    finally:
        for name, obj in saved.items():
            setattr(td, name, obj)
    variants = {}
    for kernel, args, kwargs in calls:
        names = kernel.arg_names
        options = {"num_warps": kwargs.pop("num_warps")}
        sig = {n: _arg_type(a) for n, a in zip(names, args)}
        sig.update({n: "constexpr" for n in kwargs})
        assert list(sig) == names, f"{kernel.__name__}: launch does not bind every parameter"
        key = (kernel.__name__, tuple(sig.items()), tuple(sorted(kwargs.items())), tuple(options.items()))
        variants[key] = (kernel, sig, dict(kwargs), options)
    return kernels, list(variants.values())


@pytest.mark.skipif(INTERPRETING, reason="kernels are interpreted objects")
def test_every_kernel_is_launched():
    kernels, variants = launched_variants()
    assert set(kernels) == {"_dtw_kernel", "_hvp_kernel"}, f"kernels changed: {sorted(kernels)}; recheck this test"
    assert {v[0].__name__ for v in variants} == set(kernels)
    # _dtw_kernel: (FWD, BWD) ∈ {forward, marginals, backward} × Ω; _hvp_kernel: Ω — per dtype and block size
    assert len(variants) == (3 + 1) * len(REGULARIZERS) * len(td.DTYPES) * 2
    assert {v[3]["num_warps"] for v in variants} == {1, 8} and {v[2]["BLOCK"] for v in variants} == {32, 1024}


@pytest.mark.skipif(INTERPRETING, reason="kernels are interpreted objects")
@pytest.mark.parametrize("cc", TARGETS)
def test_kernels_compile_for_gpu_targets(cc):
    """Each launched variant lowers to a cubin for compute capability ``cc`` (Triton's wheel ships ptxas, so this
    runs the frontend, the MLIR passes, LLVM and ptxas). The largest block gets every variant on both targets, the
    smallest block (one warp) its float32 variants on sm_90: about a second per variant on a 2-core machine."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, variants = launched_variants()
    variants = [v for v in variants
                if v[2]["BLOCK"] == 1024 or (cc == 90 and v[1][v[0].arg_names[0]] == "*fp32")]
    failures, start = [], time.time()
    for kernel, sig, constexprs, options in variants:
        what = f"{kernel.__name__} sm_{cc} {sig[kernel.arg_names[0]]} {constexprs}"
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", cc, 32), options=options)
        except Exception as exc:  # noqa: BLE001 - collect all failures, report them together
            failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:500]}")
            continue
        if len(compiled.asm.get("cubin", b"")) == 0:
            failures.append(f"{what}: no cubin produced")
    assert not failures, "\n".join(failures)
    print(f"sm_{cc}: {len(variants)} variants compiled in {time.time() - start:.1f}s")


# ---- CUDA ----------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reg", REGULARIZERS)
def test_triton_on_cuda_matches_reference(dtype, reg):
    """auto picks the Triton kernel for CUDA tensors; value, E (both autograd paths), ⟨E, Z⟩ and Ė equal the
    reference backend's on the same device, with padding of any layout, short and long diagonals (chunked)."""
    # float32: exponents of differences of values that grow like N + M, and fast exp/log on CUDA: compare relative to
    # the largest entry of each output
    tol = 1e-10 if dtype == torch.float64 else 2e-3
    for B, N, M, gamma in ((37, 23, 40, 0.5), (3, 1100, 1300, 1.0), (5, 60, 9, 0.05)):
        g = torch.Generator().manual_seed(N + M)
        theta = torch.randn(B, N, M, generator=g, dtype=torch.float64).to(dtype).cuda()
        Z = torch.randn(B, N, M, generator=g, dtype=torch.float64).to(dtype).cuda()
        lx = torch.randint(1, N + 1, (B,), generator=g).cuda()
        ly = torch.randint(1, M + 1, (B,), generator=g).cuda()
        lx[0], ly[0] = N, M
        assert DTW.resolve_dtw_backend("auto", theta) == "triton"
        out = {}
        for backend in ("triton", "reference"):
            th = theta.clone().requires_grad_()
            v = dtw_value(th, lx, ly, reg, gamma, backend=backend)
            (gv,) = torch.autograd.grad(v.sum(), th)
            E = dtw_marginals(th, lx, ly, reg, gamma, backend=backend)
            (H2,) = torch.autograd.grad(E, th, grad_outputs=Z)
            dot, H = dtw_hvp(theta, Z, lx, ly, reg, gamma, backend=backend)
            out[backend] = (v, gv, E, H2, dot, H)
        for what, a, b in zip(("value", "grad", "E", "E backward", "dot", "hvp"), out["triton"], out["reference"]):
            err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
            assert err <= tol, (what, B, N, M, err)
