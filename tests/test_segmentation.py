"""The fused segmentation-attention normaliser (structattn.ops.segmentation, issue 13 item 5) against the unfused
tensor-op path it replaces on CPU: values, gradients, padding in every layout, dead rows and the softmax fallback,
per-head transitions, the centring of the stable form, threads, bad inputs, and its custom ops (opcheck,
torch.compile). The unfused path is itself checked against brute force and autograd through the plain recursion in
test_viterbi.py and test_attention.py.
"""

from __future__ import annotations

import pytest
import torch

from structattn.attention import multihead_viterbi_attention, viterbi_attention
from structattn.ops import segmentation as S
from structattn.ops.kernels import cpu as C
from structattn.ops.viterbi import viterbi_backend

# Only a machine without a C compiler skips: a kernel that fails to compile must fail these tests, not skip them.
pytestmark = pytest.mark.skipif(C._compiler() is None, reason="no C compiler on this machine ($CC, cc, gcc, clang)")

REGS = [("entropy", 2.0), ("l2", 10.0), ("l2", 0.3)]


def _mask(N, T, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    m = torch.zeros(N, T, dtype=torch.bool)
    pads = torch.randint(0, T, (N,), generator=g)
    for b in range(N):
        if kind == "left":
            m[b, : pads[b]] = True
        elif kind == "right":
            m[b, T - pads[b]:] = True
        else:  # holes anywhere
            m[b] = torch.rand(T, generator=g) < 0.35
    m[0] = True  # a row without real position
    m[1] = False  # and one without padding
    return m


def _both(scores, trans, mask, reg, gamma, centre=False, tdiv=1, gw=None, gp=None):
    """(w, p, ∂s, ∂T) from the fused and from the unfused path."""
    out = []
    for fused in (True, False):
        s, t = scores.detach().clone().requires_grad_(), trans.detach().clone().requires_grad_()
        if fused:
            w, p = S.segmentation_weights(s, t, mask, reg, gamma, centre=centre, tdiv=tdiv)
            assert type(w.grad_fn).__name__ == "_FusedFunctionBackward"
        else:
            w, p = S._unfused(s, t, mask, reg, gamma, centre, tdiv)
        outs, grads = zip(*[(o, g) for o, g in ((w, gw), (p, gp)) if g is not None])
        gs, gt = torch.autograd.grad(outs, (s, t), grads, allow_unused=True)
        out.append((w.detach(), p.detach(), gs, gt))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reg,gamma", REGS)
@pytest.mark.parametrize("layout", ["none", "left", "right", "holes"])
@pytest.mark.parametrize("centre", [False, True])
def test_fused_equals_unfused(dtype, reg, gamma, layout, centre):
    g = torch.Generator().manual_seed(1)
    N, T = 70, 13  # more than one block of 64 chains, a partial last block
    scores = (torch.randn(N, T, generator=g) * 4).to(dtype)
    trans = torch.randn(1, 2, 2, generator=g).to(dtype)
    mask = _mask(N, T, 2, layout)
    if mask is not None:  # padded entries are never read: garbage there must not matter
        scores = scores.masked_fill(mask, float("nan"))
    gw, gp = torch.randn(N, T, generator=g).to(dtype), torch.randn(N, T, generator=g).to(dtype)
    fused, ref = _both(scores, trans, mask, reg, gamma, centre, gw=gw, gp=gp)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, b, name in zip(fused, ref, ("w", "p", "dL/ds", "dL/dT")):
        torch.testing.assert_close(a, b, **tol, msg=f"{name} differs")
    # the row flags (real position, dead, frozen) of the C kernel = those computed with tensor ops
    flags = S.segmentation_weights(scores, trans, mask, reg, gamma, centre=centre, flags=True)[2]
    assert flags.dtype == torch.int32 and torch.equal(flags, S.row_flags(ref[1], mask))
    w = fused[0]
    if mask is not None:
        assert (w[mask] == 0).all() and (fused[2][mask] == 0).all()
        assert (w[0] == 0).all()  # no real position: no attention at all


@pytest.mark.parametrize("reg,gamma", REGS)
@pytest.mark.parametrize("M,tdiv", [(70, 1), (5, 3), (5, 1), (2, 7)])
def test_per_row_and_per_head_transitions(reg, gamma, M, tdiv):
    """Row b uses trans[(b // tdiv) % M]: one matrix per row, per head of (batch, head, query) rows, …"""
    g = torch.Generator().manual_seed(3)
    N, T = 70, 9
    scores = torch.randn(N, T, generator=g, dtype=torch.float64) * 3
    trans = torch.randn(M, 2, 2, generator=g, dtype=torch.float64)
    mask = _mask(N, T, 4, "left")
    gw = torch.randn(N, T, generator=g, dtype=torch.float64)
    fused, ref = _both(scores, trans, mask, reg, gamma, tdiv=tdiv, gw=gw)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dead_rows_fall_back_to_softmax_with_its_gradient():
    """ℓ2 rows whose every position loses to the all-zero path (p ≡ 0) get softmax(s), and softmax's Jacobian."""
    g = torch.Generator().manual_seed(5)
    N, T = 6, 8
    scores = torch.randn(N, T, generator=g, dtype=torch.float64)
    scores[:3] -= 50.0  # dead with γ = 1 and T = 0
    trans = torch.zeros(1, 2, 2, dtype=torch.float64)
    mask = _mask(N, T, 6, "right")
    gw = torch.randn(N, T, generator=g, dtype=torch.float64)
    fused, ref = _both(scores, trans, mask, "l2", 1.0, gw=gw, gp=gw.flip(0))
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    w, p = fused[0], fused[1]
    assert (p[1:3] == 0).all()
    flags = S.segmentation_weights(scores, trans, mask, "l2", 1.0, flags=True)[2]
    assert torch.equal(flags, S.row_flags(ref[1], mask))
    assert flags[:3].tolist() == [0, S.HAS_REAL | S.DEAD | S.FROZEN, S.HAS_REAL | S.DEAD | S.FROZEN]
    soft = torch.softmax(scores[1:3].masked_fill(mask[1:3], -1e300), -1).masked_fill(mask[1:3], 0)
    torch.testing.assert_close(w[1:3], soft, rtol=1e-14, atol=1e-14)
    assert fused[2][1:3].abs().sum() > 0  # the fallback keeps a gradient


@pytest.mark.parametrize("reg,gamma", REGS[:2])
@pytest.mark.parametrize("centre", [False, True])
def test_gradcheck_and_gradgradcheck_through_the_fused_path(reg, gamma, centre):
    """First derivatives from the fused backward (C); second ones by the unfused path recomputed under autograd."""
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(4, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(2, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, :2] = True
    mask[2, 3] = True

    def f(s, t):
        w, p = S.segmentation_weights(s, t, mask, reg, gamma, centre=centre, tdiv=2)
        return w, p

    assert torch.autograd.gradcheck(f, (s, t))
    assert torch.autograd.gradgradcheck(f, (s, t))


def test_gradient_of_one_output_only():
    """Only w, or only p, reaching the loss (the other's gradient is None, not zeros)."""
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(1, 2, 2, dtype=torch.float64, requires_grad=True)
    for pick in (0, 1):
        out = S.segmentation_weights(s, t, None, "entropy", 1.0)[pick]
        gs, = torch.autograd.grad(out.pow(2).sum(), s)
        ref = S._unfused(s, t, None, "entropy", 1.0, False, 1)[pick]
        gr, = torch.autograd.grad(ref.pow(2).sum(), s)
        torch.testing.assert_close(gs, gr, rtol=1e-12, atol=1e-12)


def test_threads_give_the_same_numbers():
    """Blocks split between threads: every output written by one thread, ∂L/∂T reduced in row order afterwards."""
    g = torch.Generator().manual_seed(9)
    N, T = 64 * 40 + 5, 160  # 410k chain steps: three threads' worth
    s = torch.randn(N, T, generator=g).requires_grad_()
    t = torch.randn(3, 2, 2, generator=g).requires_grad_()
    mask = _mask(N, T, 10, "left")
    old = torch.get_num_threads()
    results = []
    try:
        for k in (1, 3):
            torch.set_num_threads(k)
            assert S._threads(N, T) == k  # large enough to split
            w, p = S.segmentation_weights(s, t, mask, "entropy", 2.0, tdiv=5)
            gs, gt = torch.autograd.grad((w * torch.arange(T)).sum(), (s, t))
            results.append((w, p, gs, gt))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_non_finite_real_scores_or_transitions_are_refused():
    s = torch.randn(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 0] = True
    s[1, 0] = float("inf")  # padding: fine
    viterbi_attention(s, torch.zeros(2, 2), mask)
    s[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"1 attention row\(s\) have non-finite"):
        viterbi_attention(s, torch.zeros(2, 2), mask)
    with pytest.raises(ValueError, match="non-finite"):
        viterbi_attention(torch.randn(3, 4), torch.tensor([[0.0, float("inf")], [0.0, 0.0]]))
    # finite scores whose sum overflows float32 are not non-finite scores: the stable form centres them
    mixed = torch.tensor([[3e38, 3e38, -1.0]])
    w = S.segmentation_weights(mixed, torch.zeros(2, 2), None, "l2", 1.0, centre=True)[0]
    ref = S._unfused(mixed.double(), torch.zeros(2, 2, dtype=torch.float64), None, "l2", 1.0, True, 1)[0]
    torch.testing.assert_close(w.double(), ref)
    # finite scores and transitions whose potentials s_t + T[1, j], or the path values summing them, overflow are
    # refused, not turned into NaN marginals and a silent softmax fallback
    big = torch.full((1, 4), 3e38)
    with pytest.raises(ValueError, match="overflow"):
        viterbi_attention(big[:, :1], torch.tensor([[0.0, 0.0], [1e38, 1e38]]))
    with pytest.raises(ValueError, match="overflow"):
        viterbi_attention(big, torch.zeros(2, 2))


def test_transitions_or_mask_on_another_device_are_refused():
    """A C kernel given a pointer to another device's memory would crash the process: refused with a clear error."""
    s = torch.randn(3, 4)
    with pytest.raises(ValueError, match="transitions is on meta, the scores on cpu"):
        viterbi_attention(s, torch.zeros(2, 2, device="meta"))
    with pytest.raises(ValueError, match="padding_mask is on meta"):
        S.segmentation_weights(s, torch.zeros(2, 2), torch.zeros(3, 4, dtype=torch.bool, device="meta"), "l2", 1.0)


def test_public_functions_take_the_fused_path_and_the_reference_backend_turns_it_off():
    s = torch.randn(4, 7, requires_grad=True)
    w = viterbi_attention(s, torch.zeros(2, 2), None, "l2", 10.0)
    assert type(w.grad_fn).__name__ == "_FusedFunctionBackward"
    m = multihead_viterbi_attention(torch.randn(2, 3, 4, 7, requires_grad=True), torch.zeros(3, 2, 2))
    assert type(m.grad_fn).__name__ == "ViewBackward0"
    with viterbi_backend("reference"):
        assert not S.fused_path_available(s)
        w2 = viterbi_attention(s, torch.zeros(2, 2), None, "l2", 10.0)
        assert type(w2.grad_fn).__name__ != "_FusedFunctionBackward"
    torch.testing.assert_close(w, w2)
    assert not S.fused_path_available(s.half())


@pytest.mark.parametrize("reg", ["entropy", "l2"])
@pytest.mark.parametrize("padded", [False, True])
def test_opcheck(reg, padded):
    """Schema, fake kernels, autograd registration and AOT dispatch of the two custom ops."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    mask = _mask(5, 6, 12, "left") if padded else None
    result = torch.library.opcheck(S._forward_op, (s, t, mask, reg, 0.7, True, 1))
    assert set(result.values()) == {"SUCCESS"}, result
    with torch.no_grad():
        w, p, flags, ws, iws = S._forward_op(s, t, mask, reg, 0.7, True, 1)
    args = (torch.randn_like(w), torch.randn_like(w), w, ws, iws, 5, reg, 0.7, True, 1)
    result = torch.library.opcheck(S._backward_op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_compiled_fullgraph_uses_the_custom_op_and_equals_eager():
    s = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    mask = _mask(6, 9, 13, "left")

    def loss(s, t):
        w = viterbi_attention(s, t, mask, "entropy", 2.0)
        return (w * torch.arange(9)).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    a, b = loss(s, t), compiled(s, t)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ga, gb = torch.autograd.grad(a, (s, t)), torch.autograd.grad(b, (s, t))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    explained = torch._dynamo.explain(loss)(s, t)
    assert explained.graph_break_count == 0
    assert any("segmentation_attention" in str(n.target) for gm in explained.graphs for n in gm.graph.nodes)
