"""Vit_Ω under torch.autocast: low-precision potentials are computed in float32 and match float32 results to the
documented tolerance (bf16 potentials carry ~3 significant digits: |ΔE| ≤ 2e-2 absolute)."""

import pytest
import torch

from structattn import viterbi_marginals, viterbi_value

BF16_ATOL = 2e-2


def _theta_from_linear(dtype_ctx):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 4)
    x = torch.randn(8, 30, 16)
    return lin, x


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_cpu_bf16_autocast_matches_float32(reg):
    lin, x = _theta_from_linear(None)
    lengths = torch.tensor([30, 29, 1, 0, 15, 30, 7, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theta = lin(x).view(8, 30, 2, 2)
        assert theta.dtype == torch.bfloat16
        E = viterbi_marginals(theta, lengths, reg, 1.0)
        v = viterbi_value(theta, lengths, reg, 1.0)
    assert E.dtype == torch.bfloat16 and v.dtype == torch.bfloat16
    theta32 = lin(x).view(8, 30, 2, 2)
    E32 = viterbi_marginals(theta32, lengths, reg, 1.0)
    v32 = viterbi_value(theta32, lengths, reg, 1.0)
    torch.testing.assert_close(E.float(), E32, rtol=0, atol=BF16_ATOL)
    torch.testing.assert_close(v.float(), v32, rtol=2e-2, atol=BF16_ATOL)
    # the same bf16 potentials computed exactly in float32 and rounded once: our result is that rounding
    ref = viterbi_marginals(theta.float(), lengths, reg, 1.0).to(torch.bfloat16)
    assert torch.equal(E, ref)


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_bf16_backward_through_autocast(reg):
    lin, x = _theta_from_linear(None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theta = lin(x).view(8, 30, 2, 2)
        E = viterbi_marginals(theta, None, reg, 1.0)
        loss = (E[..., 1, :].sum(-1) * torch.linspace(0, 1, 30)).sum()
    loss.float().backward()
    grads = [p.grad for p in lin.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    lin.zero_grad()
    E32 = viterbi_marginals(lin(x).view(8, 30, 2, 2), None, reg, 1.0)
    (E32[..., 1, :].sum(-1) * torch.linspace(0, 1, 30)).sum().backward()
    for g, p in zip(grads, lin.parameters()):
        scale = p.grad.abs().max().item() + 1e-6
        assert (g - p.grad).abs().max().item() <= 0.1 * scale


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_float32(dtype):
    lin = torch.nn.Linear(16, 4).cuda()
    x = torch.randn(8, 50, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        theta = lin(x).view(8, 50, 2, 2)
        E = viterbi_marginals(theta, None, "entropy", 1.0)
    E32 = viterbi_marginals(lin(x).view(8, 50, 2, 2).float(), None, "entropy", 1.0)
    torch.testing.assert_close(E.float(), E32, rtol=0, atol=BF16_ATOL)
