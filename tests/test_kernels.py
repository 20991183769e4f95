"""Fast Viterbi backends (C kernel, Triton) against the reference tensor code, and backend dispatch.

The reference passes of structattn.ops.viterbi are themselves checked against brute force and autograd in
test_viterbi.py; here every fast path must reproduce them to float rounding: value, marginals and the Alg. 4 HVP
(through the public functions and through autograd), for both regularisers, S = 2 and general S, padding with
zero lengths, T = 1, scores of ±1e4 and γ from 0.01 to 100.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import structattn.ops.viterbi as V
from structattn import viterbi_hvp, viterbi_marginals, viterbi_value
from structattn.ops.kernels import cpu

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_close(got, ref, dtype, what):
    """max |got − ref| ≤ tol · max(1, max |ref|): relative to the tensor's scale (marginals live in [0, 1], values
    grow like |θ|·T, Hessian products like |Z|/γ)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    if ref.numel() == 0:
        return
    err = (got - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} at scale {scale:.3g}"


def make_case(B, T, S, scale, dtype, seed, with_lengths=True):
    g = torch.Generator().manual_seed(seed)
    theta = (torch.randn(B, T, S, S, generator=g, dtype=torch.float64) * scale).to(dtype)
    Z = torch.randn(B, T, S, S, generator=g, dtype=torch.float64).to(dtype)
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        lengths[0] = 0  # an empty chain
        lengths[-1] = T  # a full one
    return theta, Z, lengths


def compare_backends(backend, theta, Z, lengths, reg, gamma, what):
    dtype = theta.dtype
    kw = dict(lengths=lengths, reg=reg, gamma=gamma)
    # value and marginals
    v_ref = viterbi_value(theta, backend="reference", **kw)
    v = viterbi_value(theta, backend=backend, **kw)
    assert_close(v, v_ref, dtype, f"{what} value")
    E_ref = viterbi_marginals(theta, backend="reference", **kw)
    E = viterbi_marginals(theta, backend=backend, **kw)
    assert_close(E, E_ref, dtype, f"{what} marginals")
    if lengths is not None:
        pad = torch.arange(theta.shape[1])[None, :] >= lengths[:, None]
        assert (E[pad] == 0).all(), f"{what}: padded marginals must be exactly 0"
    # Alg. 4, directly
    d_ref, H_ref = viterbi_hvp(theta, Z, backend="reference", **kw)
    d, H = viterbi_hvp(theta, Z, backend=backend, **kw)
    assert_close(d, d_ref, dtype, f"{what} <E, Z>")
    assert_close(H, H_ref, dtype, f"{what} HVP")
    # the same through autograd: value backward (= E), marginals backward (= HVP)
    grads = []
    for b in ("reference", backend):
        th = theta.clone().requires_grad_(True)
        (gv,) = torch.autograd.grad(viterbi_value(th, backend=b, **kw).sum(), th)
        (gE,) = torch.autograd.grad(viterbi_marginals(th, backend=b, **kw), th, Z)
        grads.append((gv, gE))
    assert_close(grads[1][0], grads[0][0], dtype, f"{what} value backward")
    assert_close(grads[1][1], grads[0][1], dtype, f"{what} marginals backward (HVP)")
    assert_close(grads[1][1], H_ref, dtype, f"{what} autograd HVP vs viterbi_hvp")


# ---- the C kernel -------------------------------------------------------------------------------------------------

# Skip only when there is no C compiler at all (the documented fallback case). With a compiler, a kernel that fails
# to build must fail these tests, not skip them.
needs_c = pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler on this machine ($CC, cc, gcc, clang)")


@needs_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reg", ["entropy", "l2"])
@pytest.mark.parametrize("S", [2, 3, 5])
@pytest.mark.parametrize("gamma", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_cpu_kernel_matches_reference(dtype, reg, S, gamma, scale):
    theta, Z, lengths = make_case(6, 9, S, scale, dtype, seed=S * 7 + int(gamma * 3))
    compare_backends("cpu", theta, Z, lengths, reg, gamma, f"cpu {dtype} {reg} S={S} γ={gamma} scale={scale}")


@needs_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reg", ["entropy", "l2"])
@pytest.mark.parametrize("shape", [(3, 1, 2), (1, 1, 3), (4, 0, 2), (0, 5, 2), (5, 40, 2)])
def test_cpu_kernel_edge_shapes(dtype, reg, shape):
    B, T, S = shape
    theta, Z, lengths = make_case(B, T, S, 2.0, dtype, seed=B + T + S, with_lengths=B > 1)
    compare_backends("cpu", theta, Z, lengths, reg, 0.5, f"cpu {dtype} {reg} shape={shape}")
    compare_backends("cpu", theta, Z, None, reg, 0.5, f"cpu {dtype} {reg} shape={shape} no lengths")


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_cpu_kernel_several_simd_blocks(dtype, reg):
    """The S = 2 forward runs blocks of 64 chains vectorised across chains: 150 chains = two full blocks and a ragged
    one, with lengths 0..T mixed inside each block, scores of ±1e3 (ties and saturated ℓ2 rows included)."""
    theta, Z, lengths = make_case(150, 23, 2, 1e3, dtype, seed=150)
    theta[7, :, :, 1] = theta[7, :, :, 0]  # exact ties x0 == x1 at t = 0 (v_0 = 0): the select branches meet
    compare_backends("cpu", theta, Z, lengths, reg, 0.5, f"cpu {dtype} {reg} 150 chains")
    compare_backends("cpu", theta, Z, None, reg, 3.0, f"cpu {dtype} {reg} 150 chains no lengths")


@needs_c
def test_cpu_kernel_half_precision_and_noncontiguous():
    theta, Z, lengths = make_case(4, 6, 2, 1.0, torch.float32, seed=3)
    half = theta.to(torch.bfloat16)
    assert_close(
        viterbi_marginals(half, lengths, backend="cpu").float(),
        viterbi_marginals(half, lengths, backend="reference").float(),
        torch.float32,
        "bf16 marginals",
    )
    wide = torch.randn(4, 6, 2, 2, 3, dtype=torch.float64)[..., 1]  # non-contiguous view
    assert not wide.is_contiguous()
    assert_close(viterbi_value(wide, backend="cpu"), viterbi_value(wide, backend="reference"), torch.float64, "nc")


@needs_c
@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_third_order_falls_back_to_differentiable_reference(reg):
    """create_graph through the marginals' backward must still give exact third derivatives."""
    theta, Z, lengths = make_case(3, 4, 2, 1.0, torch.float64, seed=11)
    W = torch.randn_like(theta)
    out = []
    for b in ("reference", "cpu"):
        th = theta.clone().requires_grad_(True)
        (H,) = torch.autograd.grad(viterbi_marginals(th, lengths, reg, 0.7, backend=b), th, Z, create_graph=True)
        (T3,) = torch.autograd.grad((H * W).sum(), th)
        out.append((H, T3))
    assert_close(out[1][0], out[0][0], torch.float64, "HVP under create_graph")
    assert_close(out[1][1], out[0][1], torch.float64, "third derivative")
    th = theta.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda x: viterbi_marginals(x, lengths, "entropy", 0.7, backend="cpu"), (th,), eps=1e-6, atol=1e-5
    )


@needs_c
def test_cpu_kernel_is_cached_on_disk():
    path = cpu.library_path()
    assert path is not None and os.path.exists(path)


@needs_c
def test_compiler_without_the_simd_flag_still_builds_the_kernel(tmp_path):
    """A compiler that rejects -fopenmp-simd gets a second try without it (scalar loops, same numbers)."""
    proc = _run_py(
        """
        import torch
        from structattn.ops.kernels import cpu
        from structattn import viterbi_marginals
        cpu._SIMD_FLAGS = ["-fstructattn-no-such-flag"]
        assert cpu.available(), cpu.unavailable_reason()
        torch.manual_seed(0)
        th = torch.randn(70, 9, 2, 2, dtype=torch.float64)
        L = torch.randint(0, 10, (70,))
        d = (viterbi_marginals(th, L, backend="cpu") - viterbi_marginals(th, L, backend="reference")).abs().max()
        assert d < 1e-12, d
        print("ok")
        """,
        {"STRUCTATTN_KERNEL_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


@needs_c
@pytest.mark.parametrize("flags", [["-DSTRUCTATTN_NO_CLONES"], ["-fstructattn-no-such-flag"]])
def test_fused_segmentation_kernel_without_clones_or_simd(tmp_path, flags):
    """The fallback builds (no per-ISA clones; no clones and no -fopenmp-simd) give the fused segmentation attention
    the numbers of the unfused path."""
    proc = _run_py(
        f"""
        import torch
        from structattn.ops.kernels import cpu
        from structattn.ops import segmentation as S
        cpu._SIMD_FLAGS = {flags!r}
        assert cpu.available(), cpu.unavailable_reason()
        torch.manual_seed(0)
        s = torch.randn(70, 9, dtype=torch.float64, requires_grad=True)
        t = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
        mask = torch.rand(70, 9) < 0.3
        for reg in ("entropy", "l2"):
            outs = []
            for f in (S.segmentation_weights, lambda *a, **k: S._unfused(*a, k["centre"], 1)):
                w, p = f(s, t, mask, reg, 1.5, centre=True)
                outs.append((w, p, *torch.autograd.grad((w * torch.arange(9)).sum(), (s, t))))
            for a, b in zip(*outs):
                assert (a - b).abs().max() < 1e-12
        print("ok")
        """,
        {"STRUCTATTN_KERNEL_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


# ---- dispatch ------------------------------------------------------------------------------------------------------


@needs_c
def test_auto_dispatch_and_forcing_reference():
    theta = torch.randn(2, 3, 2, 2)
    assert V.resolve_backend("auto", theta) == "cpu"
    assert V.resolve_backend("reference", theta) == "reference"
    assert V.resolve_backend("auto", theta.to(torch.int32)) == "reference"  # not a fast dtype
    prev = V.get_default_backend()
    with V.viterbi_backend("reference"):
        assert V.resolve_backend(None, theta) == "reference"
        assert V.get_default_backend() == "reference"
    assert V.get_default_backend() == prev
    old = V.set_default_backend("reference")
    try:
        assert V.resolve_backend(None, theta) == "reference"
        assert V.resolve_backend("cpu", theta) == "cpu"  # an explicit backend beats the default
    finally:
        V.set_default_backend(old)


def test_backend_errors():
    theta = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        viterbi_value(theta, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        V.set_default_backend("fast")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            viterbi_value(theta, backend="triton")
    with pytest.raises(ValueError, match="needs a CPU tensor"):
        V.resolve_backend("cpu", torch.randn(2, 3, 2, 2, device="meta"))


def _run_py(code: str, env_extra: dict, timeout=240):
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=timeout,
    )


def test_every_c_library_warns_once_without_a_compiler(tmp_path):
    """The one loader (cpu.CLibrary) behind every C kernel: without a compiler each library is unavailable with the
    reason, warns exactly once with its own text, and its functions raise a RuntimeError saying why."""
    proc = _run_py(
        """
        import warnings, torch
        from structattn.ops.kernels import cpu, cpu_dtw, cpu_prox
        texts = {cpu: "C Viterbi kernel is unavailable", cpu_dtw: "C DTW kernel is unavailable",
                 cpu_prox: "C fusedmax/oscarmax kernel is unavailable"}
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for m in texts:
                assert not m.available() and not m.available()
                assert "no C compiler" in m.unavailable_reason(), m.unavailable_reason()
                assert m.library_path() is None
        for m, text in texts.items():
            msgs = [str(x.message) for x in w if text in str(x.message)]
            assert len(msgs) == 1 and "no C compiler" in msgs[0], msgs
        # Every kernel module's "give me the function" goes through CLibrary.require: one message.
        from structattn.ops.kernels import cpu_sparsemap
        for m, fn in ((cpu, lambda: cpu._fn("forward", torch.float64)),
                      (cpu_dtw, lambda: cpu_dtw._fn("forward", torch.float64)),
                      (cpu_prox, lambda: cpu_prox._fn("psm_forward", torch.float64)),
                      (cpu_sparsemap, lambda: cpu_sparsemap._lib())):
            try:
                fn()
            except RuntimeError as e:
                assert str(e).startswith(f"the C {m._LIB.what} kernel is unavailable: "), e
                assert "no C compiler" in str(e), e
            else:
                raise AssertionError(m)
        print("ok")
        """,
        {"PATH": "", "CC": "", "STRUCTATTN_KERNEL_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


@needs_c
def test_a_corrupt_cached_library_is_rebuilt_once(tmp_path):
    """A cached file that does not load (here: text) is removed and compiled again, for every C library."""
    proc = _run_py(
        """
        from structattn.ops.kernels import cpu, cpu_dtw, cpu_prox
        for m in (cpu, cpu_dtw, cpu_prox):
            import os
            path = m.library_path()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write("not a shared object")
            assert m.available(), m.unavailable_reason()
            assert os.path.getsize(path) > 1000
        print("ok")
        """,
        {"STRUCTATTN_KERNEL_CACHE": str(tmp_path / "cache")},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_env_var_forces_reference():
    proc = _run_py(
        """
        import torch, structattn.ops.viterbi as V
        print(V.resolve_backend(None, torch.randn(1, 2, 2, 2)))
        """,
        {"STRUCTATTN_VITERBI_BACKEND": "reference"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "reference"


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """Without a C compiler (empty PATH, empty cache) auto uses the reference path and warns exactly once."""
    proc = _run_py(
        """
        import warnings, torch
        from structattn import viterbi_marginals
        import structattn.ops.viterbi as V
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            th = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            E1 = viterbi_marginals(th)
            E2 = viterbi_marginals(th)
        msgs = [str(x.message) for x in w if "C Viterbi kernel is unavailable" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert V.resolve_backend(None, th) == "reference"
        assert torch.equal(E1, viterbi_marginals(th, backend="reference"))
        try:
            viterbi_marginals(th, backend="cpu")
        except RuntimeError as e:
            assert "no C compiler" in str(e), e
        else:
            raise AssertionError("explicit backend='cpu' should raise")
        print("ok")
        """,
        {"PATH": "", "CC": "", "STRUCTATTN_KERNEL_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_import_structattn_does_not_import_triton():
    """``import structattn`` never imports Triton, and the CPU path works where Triton cannot be imported at all.
    (Calling a torch.library custom op makes torch import torch._dynamo, which imports triton if it is installed:
    that is torch's doing, so the second half blocks the import instead of checking sys.modules.)"""
    proc = _run_py("import sys, structattn; print('triton' in sys.modules)", {})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    proc = _run_py(
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import torch, structattn\n"
        "torch.manual_seed(0)\n"
        "th = torch.randn(3, 4, 2, 2, requires_grad=True)\n"
        "v = structattn.viterbi_value(th, torch.tensor([4, 1, 0]))\n"
        "ref = structattn.viterbi_value(th, torch.tensor([4, 1, 0]), backend='reference')\n"
        "v.sum().backward()\n"
        "print(torch.allclose(v, ref), th.grad.shape)",
        {},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True torch.Size([3, 4, 2, 2])"


# ---- Triton, through the interpreter on CPU tensors ----------------------------------------------------------------

_TRITON_SCRIPT = """
import itertools, torch
import structattn.ops.viterbi as V
from structattn.ops.kernels import triton_viterbi
import tests.test_kernels as tk
assert triton_viterbi.available(), triton_viterbi.unavailable_reason()
torch.manual_seed(0)
th = torch.randn(2, 3, 2, 2)
assert V.resolve_backend("triton", th) == "triton"
try:
    V.resolve_backend("triton", torch.randn(2, 3, 3, 3))
except ValueError as e:
    assert "specialised to S=2" in str(e)
else:
    raise AssertionError("triton with S=3 should raise")
n = 0
cases = [(torch.float64, 1.0, 1.0), (torch.float64, 1e4, 0.01), (torch.float64, 3.0, 100.0),
         (torch.float32, 1.0, 1.0), (torch.float32, 1e4, 0.01)]
for (dtype, scale, gamma), reg in itertools.product(cases, ["entropy", "l2"]):
    theta, Z, lengths = tk.make_case(19, 5, 2, scale, dtype, seed=n)  # 19 chains: two blocks, a ragged one
    tk.compare_backends("triton", theta, Z, lengths, reg, gamma, f"triton {dtype} {reg} γ={gamma} x{scale}")
    n += 1
for shape in [(3, 1), (2, 0), (0, 3)]:
    theta, Z, lengths = tk.make_case(shape[0], shape[1], 2, 2.0, torch.float64, seed=n, with_lengths=shape[0] > 1)
    tk.compare_backends("triton", theta, Z, lengths, "entropy", 0.5, f"triton shape {shape}")
    tk.compare_backends("triton", theta, Z, None, "l2", 0.5, f"triton shape {shape}")
# The Triton outputs are stored chain-minor (strides (1, …)); the custom ops' fake kernels must say so (opcheck
# compares fake and real strides), or a compiled graph would mis-address them.
theta, Z, lengths = tk.make_case(3, 4, 2, 1.0, torch.float64, seed=n)
theta.requires_grad_(True)
for reg, lens in itertools.product(["entropy", "l2"], [None, lengths]):
    for op in (V._value_op, V._marginals_op):
        assert set(torch.library.opcheck(op, (theta, lens, reg, 0.7, "triton")).values()) == {"SUCCESS"}
    with torch.no_grad():
        E, Q, U, r = V._marginals_op(theta, lens, reg, 0.7, "triton")
    assert Q.stride()[0] == 1 and E.stride()[0] == 1 and U.stride()[0] == 1, (Q.stride(), E.stride(), U.stride())
    assert set(torch.library.opcheck(V._backward_op, (Q, r, lens, "triton")).values()) == {"SUCCESS"}
    assert set(torch.library.opcheck(V._hvp_op, (Q, U, r, Z, lens, reg, 0.7, "triton")).values()) == {"SUCCESS"}
print("ok", n)
"""


def test_triton_kernels_through_interpreter():
    pytest.importorskip("triton")
    proc = _run_py(_TRITON_SCRIPT, {"TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.strip().startswith("ok")


# ---- CUDA ----------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_triton_on_cuda_matches_reference(dtype, reg):
    pytest.importorskip("triton")
    for scale, gamma in [(1.0, 1.0), (1e4, 0.01), (3.0, 100.0)]:
        theta, Z, lengths = make_case(300, 37, 2, scale, dtype, seed=5)
        theta, Z, lengths = theta.cuda(), Z.cuda(), lengths.cuda()
        assert V.resolve_backend("auto", theta) == "triton"
        compare_backends("triton", theta, Z, lengths, reg, gamma, f"cuda {dtype} {reg} γ={gamma}")


@pytest.mark.cuda
def test_cuda_general_S_uses_reference():
    theta = torch.randn(3, 4, 3, 3, device="cuda")
    assert V.resolve_backend("auto", theta) == "reference"
