"""Sparsemax attention as a fair baseline: our sparsemax against an independent implementation (the ``entmax``
package, Peters, Niculae & Martins 2019) on hand-made padded rows, forward and backward."""

from __future__ import annotations

import os

import pytest
import torch

from structattn.attention import sparsemax_attention

if os.environ.get("CI") == "true":
    import entmax  # CI installs the `test` extra: a missing oracle must fail there, not skip
else:
    entmax = pytest.importorskip("entmax")


# Hand-made rows (NaN marks padding): ties, a one-position support, a full support, a large common offset, negative
# scores, a single real position, and padding on the left, the right and in the middle.
ROWS = [
    [0.3, 0.1, -0.2, 0.05, float("nan"), float("nan")],        # right padding, support 2
    [float("nan"), float("nan"), 1.0, 1.0, 0.2, -3.0],         # left padding, a tie at the top
    [2.5, float("nan"), 0.0, float("nan"), -0.4, 0.1],         # holes, support 1
    [0.01, 0.02, -0.01, 0.0, 0.015, -0.005],                   # no padding, full support
    [100.3, 100.1, float("nan"), 99.95, 100.0, float("nan")],  # a large offset (shift invariance)
    [float("nan"), -5.0, float("nan"), float("nan"), float("nan"), float("nan")],  # one real position
    [-1.0, -1.2, -0.9, float("nan"), -1.1, -1.05],             # all negative
]


def _rows(dtype):
    s = torch.tensor(ROWS, dtype=dtype)
    pad = torch.isnan(s)
    return s.masked_fill(pad, 0.0), pad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparsemax_matches_entmax_forward_and_backward_on_padded_rows(dtype):
    s, pad = _rows(dtype)
    g = torch.Generator().manual_seed(5)
    upstream = torch.randn(s.shape, generator=g, dtype=dtype)
    ours_in = s.clone().requires_grad_(True)
    w = sparsemax_attention(ours_in, pad)
    w.backward(upstream)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    supports = []
    for b in range(s.shape[0]):
        real = ~pad[b]
        row = s[b, real].clone().requires_grad_(True)
        ref = entmax.sparsemax(row, dim=-1)
        ref.backward(upstream[b, real])
        torch.testing.assert_close(w[b, real].detach(), ref.detach(), **tol)
        torch.testing.assert_close(ours_in.grad[b, real], row.grad, **tol)
        assert (w[b, pad[b]] == 0).all() and (ours_in.grad[b, pad[b]] == 0).all()
        supports.append(int((ref > 0).sum()))
    # the rows exercise every regime: a single position, partial and full supports
    assert 1 in supports and max(supports) == 6 and any(1 < k < int((~pad[i]).sum()) for i, k in enumerate(supports))


def test_sparsemax_attention_module_temperature_against_entmax():
    from structattn.attention import SPARSEMAX_TEMPERATURE, SparsemaxAttention

    torch.manual_seed(3)
    att = SparsemaxAttention(5, 4).double()
    assert float(att.temperature) == SPARSEMAX_TEMPERATURE == 10.0
    q, k = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 6, 4, dtype=torch.float64) * 4
    _, pad = _rows(torch.float64)
    _, w = att(q, k, pad)
    s = torch.bmm(k, att.proj(q).unsqueeze(2)).squeeze(2)
    for b in range(7):
        real = ~pad[b]
        torch.testing.assert_close(w[b, real], entmax.sparsemax(s[b, real] / 10.0, dim=-1))
        assert (w[b, pad[b]] == 0).all()
    plain = SparsemaxAttention(5, 4, temperature=1).double()
    plain.proj.weight.data.copy_(att.proj.weight.data)
    torch.testing.assert_close(plain(q, k, pad)[1], sparsemax_attention(s, pad))
    for bad in (0, -1.0, float("inf"), float("nan"), True, "10"):
        with pytest.raises(ValueError, match="temperature"):
            SparsemaxAttention(5, 4, temperature=bad)


def test_temperature_keeps_the_support_open_at_the_spread_adam_reaches_early():
    # On the reversal toy (docs/sparse_init.md) the scores' spread is ~5–15 after 10–20 Adam updates. At that spread
    # plain sparsemax is (nearly) one-hot — zero gradient to every other position — while sparsemax(s/10) still
    # covers several positions and passes gradient to each of them.
    from structattn.attention import SparsemaxAttention

    g = torch.Generator().manual_seed(11)
    s = torch.rand(64, 12, generator=g, dtype=torch.float64) * 5.0  # spread ≤ 5 per row
    for tau, lo, hi in ((1.0, 1.0, 3.5), (10.0, 6.0, 12.0)):
        att = SparsemaxAttention(1, 1, temperature=tau)
        x = s.clone().requires_grad_(True)
        w = att.normalize(x, None)
        support = (w > 0).sum(-1).double()
        assert lo <= float(support.mean()) <= hi, (tau, float(support.mean()))
        w[:, 0].sum().backward()  # gradient of one weight per row reaches exactly the support's scores
        torch.testing.assert_close((x.grad != 0).sum(-1).double(), torch.where(w[:, 0] > 0, support, 0 * support))


def test_temperature_is_in_the_checkpoint_and_old_checkpoints_keep_plain_sparsemax():
    from structattn.attention import SPARSEMAX_TEMPERATURE, SparsemaxAttention

    new = SparsemaxAttention(4, 3)
    state = new.state_dict()
    assert float(state["temperature"]) == SPARSEMAX_TEMPERATURE
    restored = SparsemaxAttention(4, 3, temperature=2.0)
    restored.load_state_dict(state)
    assert float(restored.temperature) == SPARSEMAX_TEMPERATURE
    old = {k: v for k, v in state.items() if k != "temperature"}  # a checkpoint from before τ existed
    model = SparsemaxAttention(4, 3)
    model.load_state_dict(old)  # strict: the missing key is filled, not an error
    assert float(model.temperature) == 1.0
    q, k = torch.randn(2, 4, dtype=torch.float64) * 3, torch.randn(2, 5, 3, dtype=torch.float64) * 3
    model, plain = model.double(), SparsemaxAttention(4, 3, temperature=1.0).double()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(q, k)[1], plain(q, k)[1], rtol=0, atol=0)
    ten = SparsemaxAttention(4, 3).double()
    ten.load_state_dict({**model.state_dict(), "temperature": torch.tensor([10.0])})
    assert not torch.equal(model(q, k)[1], ten(q, k)[1])  # the same M at τ = 10 is another attention
    assert "temperature=1" in repr(model)
