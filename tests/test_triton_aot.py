"""Ahead-of-time compilation of the Triton Viterbi kernels for real GPUs (issue 13, item 2), without a GPU.

The interpreter tests (test_kernels.py, TRITON_INTERPRET=1) check the arithmetic of the kernels but not that
Triton can lower them to a cubin for an actual architecture. Here every kernel launch that the wrappers of
:mod:`structattn.ops.kernels.triton_viterbi` can make is compiled for sm_80 (A100) and sm_90 (H100/H200) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; Triton's wheel ships ptxas, so this goes all the
way to SASS and fails on any error of the frontend, the MLIR passes, LLVM or ptxas.

The variant list is not written down here: the wrappers (forward, backward, marginals, hvp) are called over their
whole input domain (each supported dtype, each regulariser, with and without ``lengths``) with the ``*_kernel``
objects replaced by recorders, so what gets compiled is exactly what the call sites launch (argument types,
constexprs, ``num_warps``). A new constexpr, dtype or kernel reaches this test by construction, and a kernel that
no wrapper launches fails it.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

triton = pytest.importorskip("triton")

from structattn.ops.kernels import triton_viterbi as tv  # noqa: E402
from structattn.ops.smoothed_max import REGULARIZERS  # noqa: E402

TARGETS = (80, 90)
# Under TRITON_INTERPRET=1 (read at import) ``@triton.jit`` makes interpreter objects that cannot be compiled; the
# CI's pytest process never sets it (test_kernels.py sets it in subprocesses only).
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted objects")

# torch dtype → Triton pointer element type, as Triton's launcher names them.
_TRITON_TYPE = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64",
}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.kernel, args, kwargs))

        return launch


def _arg_type(value) -> str:
    """Triton's signature type for a runtime argument (what its launcher would infer, minus value
    specialisation: integers are compiled as generic i32, so the code must not rely on e.g. T == 1)."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument type {type(value).__name__}")


def launched_variants():
    """Every distinct (kernel, signature, constexprs, num_warps) the wrappers launch, recorded at the call sites."""
    calls = []
    kernels = {name: obj for name, obj in vars(tv).items() if name.endswith("_kernel")}
    saved = {"unavailable_reason": tv.unavailable_reason, "_interpreting": tv._interpreting, **kernels}
    try:
        # Pretend a CUDA device is present and the interpreter is off: the launch configuration of a real GPU.
        tv.unavailable_reason = lambda: None
        tv._interpreting = lambda: False
        for name, k in kernels.items():
            setattr(tv, name, _Recorder(k, calls))
        B, T = 3, 5
        for dtype in tv.DTYPES:
            for reg in REGULARIZERS:
                for lengths in (None, torch.tensor([5, 2, 0])):
                    theta = torch.zeros(B, T, 2, 2, dtype=dtype)
                    tv.forward(theta, lengths, reg, 1.0)
                    tv.marginals(theta, lengths, reg, 1.0)
                    tv.backward(theta, torch.zeros(B, 2, dtype=dtype), lengths)
                    tv.hvp(theta, torch.zeros(B, T, 2, dtype=dtype), torch.zeros(B, 2, dtype=dtype), theta, lengths,
                           reg, 1.0)
    finally:
        for name, obj in saved.items():
            setattr(tv, name, obj)
    variants = {}
    for kernel, args, kwargs in calls:
        names = kernel.arg_names
        options = {"num_warps": kwargs.pop("num_warps")}
        assert not set(kwargs) - set(names), f"{kernel.__name__}: unknown launch options {set(kwargs) - set(names)}"
        sig = {n: _arg_type(a) for n, a in zip(names, args)}
        sig.update({n: "constexpr" for n in kwargs})
        assert list(sig) == names, f"{kernel.__name__}: launch does not bind every parameter ({list(sig)} vs {names})"
        key = (kernel.__name__, tuple(sig.items()), tuple(sorted(kwargs.items())), tuple(options.items()))
        variants[key] = (kernel, sig, dict(kwargs), options)
    return kernels, list(variants.values())


def test_every_kernel_is_launched_and_half_inputs_are_upcast():
    kernels, variants = launched_variants()
    assert set(kernels) == {"_vit_kernel", "_hvp_kernel"}, f"kernels changed: {sorted(kernels)}; recheck this test"
    assert {v[0].__name__ for v in variants} == set(kernels), "a kernel is defined but never launched"
    # vit: forward and marginals × {entropy, l2}, backward (reg-free) — each with/without lengths; hvp: reg × lengths.
    per_dtype = (2 * len(REGULARIZERS) + 1) * 2 + len(REGULARIZERS) * 2
    assert len(variants) == per_dtype * len(tv.DTYPES)
    # The kernels take float32/float64 only: float16/bfloat16 are computed in float32 by structattn.ops.viterbi
    # (whose half-precision tests run the float32 kernels), and the wrappers refuse them rather than mis-compile.
    for dtype in (torch.float16, torch.bfloat16):
        assert dtype not in tv.DTYPES
        saved = tv.unavailable_reason
        tv.unavailable_reason = lambda: None
        try:
            with pytest.raises(TypeError, match="supports"):
                tv.forward(torch.zeros(1, 2, 2, 2, dtype=dtype), None, "entropy", 1.0)
        finally:
            tv.unavailable_reason = saved


@pytest.mark.parametrize("cc", TARGETS)
def test_kernels_compile_for_gpu_targets(cc):
    """Each recorded variant compiles to a cubin for compute capability ``cc`` (fp32 and fp64, both Ω, with and
    without lengths, every FWD/BWD combination used)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, variants = launched_variants()
    target = GPUTarget("cuda", cc, 32)
    failures, start = [], time.time()
    for kernel, sig, constexprs, options in variants:
        what = f"{kernel.__name__} sm_{cc} {sig[kernel.arg_names[0]]} {constexprs}"
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=target,
                                      options=options)
        except Exception as exc:  # noqa: BLE001 - collect all failures, report them together
            failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:500]}")
            continue
        cubin = compiled.asm.get("cubin", b"")
        if len(cubin) == 0:
            failures.append(f"{what}: no cubin produced")
        elif compiled.metadata.num_warps != options["num_warps"]:
            failures.append(f"{what}: compiled for {compiled.metadata.num_warps} warps")
    assert not failures, "\n".join(failures)
    print(f"sm_{cc}: {len(variants)} variants compiled in {time.time() - start:.1f}s")


@triton.jit
def _not_lowerable(x_ptr, BLOCK: triton.language.constexpr):
    # Valid Python, invalid Triton: tl.dot needs 2-D operands. The interpreter would only notice when run.
    x = triton.language.load(x_ptr + triton.language.arange(0, BLOCK))
    triton.language.store(x_ptr + triton.language.arange(0, BLOCK), triton.language.dot(x, x))


def test_aot_check_catches_a_broken_kernel():
    """The check is not vacuous: the same compile call fails on a kernel that cannot be lowered."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=_not_lowerable, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 16})
    with pytest.raises(triton.compiler.errors.CompilationError):
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
