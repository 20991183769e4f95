"""The smoothed Viterbi passes as torch.library custom ops (issue 13, item 1): registration, opcheck, autograd wiring,
torch.compile / torch.export of the public functions on CPU.

The numbers themselves are checked elsewhere (test_viterbi.py against brute force and autograd of the reference,
test_kernels.py backend against backend); here the question is whether torch sees the ops correctly: schema, fake
(meta) shapes, registered derivatives, and whether Dynamo traces the public functions in one graph with the same
results as eager.
"""

from __future__ import annotations

import pytest
import torch

import structattn.ops.viterbi as V
from structattn import viterbi_hvp, viterbi_marginals, viterbi_value

OPS = ("viterbi_value", "viterbi_marginals", "viterbi_backward", "viterbi_hvp")


def _case(B=3, T=5, S=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(B, T, S, S, generator=g, dtype=dtype)
    Z = torch.randn(B, T, S, S, generator=g, dtype=dtype)
    return theta, Z, torch.tensor([T, 2, 0])[:B]


def test_ops_are_registered_in_the_structattn_namespace():
    for name in OPS:
        op = getattr(torch.ops.structattn, name)
        assert op.default._schema.name == f"structattn::{name}"


_CUDA = pytest.mark.cuda  # skipped without a device by tests/conftest.py


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("triton", marks=_CUDA)])
@pytest.mark.parametrize("reg", ["entropy", "l2"])
@pytest.mark.parametrize("padded", [False, True])
def test_opcheck(backend, reg, padded):
    """torch.library.opcheck: schema (no mutation, no aliasing), fake kernels agree with the real ones on shapes
    and dtypes, autograd registration, and AOT dispatch with dynamic shapes (which runs the registered backward).
    ``triton`` runs on CUDA tensors (scripts/gpu_check.sh runs this file on a GPU)."""
    theta, Z, lengths = _case()
    lengths = lengths if padded else None
    if backend == "triton":
        theta, Z, lengths = theta.cuda(), Z.cuda(), None if lengths is None else lengths.cuda()
    th = theta.clone().requires_grad_(True)
    for op, args in (
        (V._value_op, (th, lengths, reg, 0.7, backend)),
        (V._marginals_op, (th, lengths, reg, 0.7, backend)),
    ):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, result
    with torch.no_grad():
        _, Q, U, r = V._marginals_op(theta, lengths, reg, 0.7, backend)
    for op, args in (
        (V._backward_op, (Q, r, lengths, backend)),
        (V._hvp_op, (Q, U, r, Z, lengths, reg, 0.7, backend)),
    ):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, result


def test_fake_kernels_give_the_real_shapes_on_meta_tensors():
    theta = torch.empty(4, 7, 3, 3, device="meta", dtype=torch.float32)
    value, Q, r = torch.ops.structattn.viterbi_value(theta, None, "entropy", 1.0, "reference")
    E, Q2, U, r2 = torch.ops.structattn.viterbi_marginals(theta, None, "l2", 1.0, "reference")
    assert (value.shape, Q.shape, r.shape) == ((4,), (4, 7, 3, 3), (4, 3))
    assert (E.shape, Q2.shape, U.shape, r2.shape) == ((4, 7, 3, 3), (4, 7, 3, 3), (4, 7, 3), (4, 3))
    dot, Edot = torch.ops.structattn.viterbi_hvp(Q, U, r, E, None, "l2", 1.0, "reference")
    assert (dot.shape, Edot.shape) == ((4,), (4, 7, 3, 3))
    assert all(t.dtype == torch.float32 and t.device.type == "meta" for t in (value, E, U, dot, Edot))


def test_backend_must_belong_to_the_device():
    theta = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match="cannot run on cpu"):
        torch.ops.structattn.viterbi_value(theta, None, "entropy", 1.0, "auto")


@pytest.mark.parametrize("entry", ["op", "eager"])
def test_value_backward_is_the_marginals_pass_and_marginals_backward_the_hvp(entry):
    """First derivatives come from the sweep over saved intermediates, gradients of gradients from the marginals
    pass (whose backward is Alg. 4): g·E and ∇²Vit_Ω·Z, matching viterbi_marginals / viterbi_hvp. ``op`` calls
    structattn::viterbi_value (what a compiled graph runs), ``eager`` the public function (its autograd.Function
    twin, built from the same derivative functions)."""
    theta, Z, lengths = _case(seed=1)
    th = theta.clone().requires_grad_(True)
    if entry == "op":
        v = torch.ops.structattn.viterbi_value(th, lengths, "entropy", 0.5, "cpu")[0]
    else:
        v = viterbi_value(th, lengths, "entropy", 0.5)
    (g,) = torch.autograd.grad(v.sum(), th, create_graph=True)
    torch.testing.assert_close(g, viterbi_marginals(theta, lengths, "entropy", 0.5), rtol=0, atol=1e-13)
    marginals_node = type(g.grad_fn.next_functions[1][0]).__name__
    assert ("viterbi_marginals" if entry == "op" else "_MarginalsFunction") in marginals_node, marginals_node
    (h,) = torch.autograd.grad(g, th, Z)
    torch.testing.assert_close(h, viterbi_hvp(theta, Z, lengths, "entropy", 0.5)[1], rtol=0, atol=1e-12)


def test_data_checks_run_inside_the_ops():
    """Non-finite θ and out-of-range lengths are caught by the op bodies, so also under torch.compile, where the
    public function's Python runs only at trace time."""
    theta = torch.randn(2, 3, 2, 2)
    theta[1, 2, 0, 1] = float("nan")
    f = torch.compile(viterbi_marginals, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="non-finite"):
        f(theta, None, "entropy", 1.0)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=3\]"):
        f(torch.randn(2, 3, 2, 2), torch.tensor([3, 4]), "entropy", 1.0)


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_compiled_fullgraph_value_marginals_and_gradients_equal_eager(reg):
    """Dynamo traces value, marginals and their backward (the HVP) into one graph (fullgraph=True: any graph break
    raises) on the C backend, with the same numbers as eager."""
    theta, Z, lengths = _case(B=4, T=6, seed=2)
    lengths = torch.tensor([6, 3, 0, 6])

    def loss(th, lengths, Z):
        return viterbi_value(th, lengths, reg, 0.8).sum() + (viterbi_marginals(th, lengths, reg, 0.8) * Z).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = []
    for f in (loss, compiled):
        th = theta.clone().requires_grad_(True)
        y = f(th, lengths, Z)
        (g,) = torch.autograd.grad(y, th)
        out.append((y.detach(), g))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=0, atol=1e-12)


def test_export():
    """torch.export sees the custom ops (no graph break, no opaque Python) and the exported program reruns them."""

    class M(torch.nn.Module):
        def forward(self, theta, lengths):
            return viterbi_marginals(theta, lengths, "l2", 1.0)

    theta, _, lengths = _case(seed=3)
    ep = torch.export.export(M(), (theta, lengths))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "structattn.viterbi_marginals.default" in targets, targets
    torch.testing.assert_close(ep.module()(theta, lengths), M()(theta, lengths), rtol=0, atol=0)


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_op_gradcheck_and_gradgradcheck(reg):
    """Through the ops alone: value' (marginals op), value'' (HVP op) and marginals'' (the differentiable
    reference rerun) agree with finite differences."""
    theta, _, lengths = _case(B=3, T=3, seed=4)
    theta = theta * 0.3  # keep ℓ2 away from its kinks, where finite differences are meaningless
    th = theta.clone().requires_grad_(True)
    value = lambda t: torch.ops.structattn.viterbi_value(t, lengths, reg, 1.0, "cpu")[0]  # noqa: E731
    marginals = lambda t: torch.ops.structattn.viterbi_marginals(t, lengths, reg, 1.0, "cpu")[0]  # noqa: E731
    assert torch.autograd.gradcheck(value, (th,))
    assert torch.autograd.gradgradcheck(value, (th,))
    assert torch.autograd.gradgradcheck(marginals, (th,))


@_CUDA
def test_cuda_graphs_through_compile_reduce_overhead():
    """mode="reduce-overhead" captures CUDA graphs: the ops must not read values back to the host while capturing
    (their data checks are skipped then), and replays give the eager numbers."""
    theta, Z, lengths = (t.cuda() for t in _case(B=3, T=6, seed=5))

    def f(th, lengths):
        return viterbi_marginals(th, lengths, "entropy", 1.0)

    torch._dynamo.reset()
    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    ref = f(theta, lengths)
    for _ in range(4):  # warm-up runs, capture, replays
        got = compiled(theta, lengths)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
