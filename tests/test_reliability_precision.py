"""Mixed precision of the attention layers and of the fairseq model (docs/reliability.md, "Mixed precision").

* The four attention layers under CPU bf16 autocast match float32 to the documented tolerance.
* The whole ``structattn_lstm`` cast to bf16 (what fairseq's ``--bf16`` does) or fp16 (``--memory-efficient-fp16``)
  gives a finite loss and finite gradients close to float32.
* ``fairseq-train --memory-efficient-fp16 --cpu`` trains the Viterbi attention without NaN loss (slow, real CLI).
  ``--bf16`` and ``--fp16`` cannot run on CPU in fairseq 0.12; that they stop with a clear message is tested in
  test_reliability_cli.py.

The operator itself under autocast (CPU bf16, CUDA fp16/bf16) is covered by test_mixed_precision.py.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch

from structattn.attention import build_attention

# Documented tolerances (docs/reliability.md): bf16 keeps 8 significant bits.
BF16_WEIGHT_ATOL = 2e-2  # |w_bf16 − w_fp32| (measured ≤ 1.2e-2, sparsemax)
BF16_CONTEXT_ATOL = 3e-2  # |c_bf16 − c_fp32| for keys in [−1, 1] (measured ≤ 2.1e-2)
BF16_SUM_TOL = 1e-2  # |Σ_t w_t − 1| of weights returned in bf16 (measured ≤ 7.8e-3)
GRAD_REL_TOL = 0.05  # max |g_low − g_fp32| / max |g_fp32|, per parameter tensor (measured ≤ 2e-2)

KINDS = [("softmax", None), ("sparsemax", None), ("viterbi", "entropy"), ("viterbi", "l2")]


@pytest.mark.parametrize("kind,reg", KINDS, ids=["softmax", "sparsemax", "viterbi-entropy", "viterbi-l2"])
def test_attention_modules_under_cpu_bf16_autocast_match_float32(kind, reg):
    torch.manual_seed(0)
    att = build_attention(kind, 32, 48, reg or "entropy")
    B, T = 6, 20
    z = torch.rand(B, 32) * 2 - 1
    keys = torch.rand(B, T, 48) * 2 - 1
    pm = torch.zeros(B, T, dtype=torch.bool)
    pm[1, :5] = True  # left padding
    pm[2, 9:] = True  # right padding
    pm[3, 1:] = True  # one real token
    pm[4] = True  # no real token
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx16, w16 = att(z, keys, pm)
        loss16 = ctx16.float().square().sum() + (w16.float() * torch.linspace(-1, 1, T)).sum()
    ctx32, w32 = att(z, keys, pm)
    loss32 = ctx32.square().sum() + (w32 * torch.linspace(-1, 1, T)).sum()
    assert w16.dtype == torch.bfloat16, "autocast runs the layer in bf16 (else this test checks nothing)"
    assert torch.isfinite(w16).all() and (w16 >= 0).all() and torch.isfinite(ctx16).all()
    assert (w16[pm] == 0).all()
    sums = w16.float().sum(-1)
    assert (sums[4] == 0) and (sums[:4] - 1).abs().max() <= BF16_SUM_TOL and (sums[5] - 1).abs() <= BF16_SUM_TOL
    torch.testing.assert_close(w16.float(), w32, rtol=0, atol=BF16_WEIGHT_ATOL)
    torch.testing.assert_close(ctx16.float(), ctx32, rtol=0, atol=BF16_CONTEXT_ATOL)
    params = list(att.parameters())
    g16 = torch.autograd.grad(loss16, params)
    g32 = torch.autograd.grad(loss32, params)
    for a, b in zip(g16, g32):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a - b).abs().max() <= GRAD_REL_TOL * b.abs().max() + 1e-6




def _model_and_batch(attention):
    pytest.importorskip("fairseq")
    from fairseq_helpers import ROOT

    sys.path.insert(0, str(ROOT))
    from fairseq.data import Dictionary

    from structattn_fairseq.structattn_lstm import StructAttnLSTMModel, structattn_lstm

    d = Dictionary()
    for i in range(12):
        d.add_symbol(f"w{i}")
    args = SimpleNamespace(arch="structattn_lstm", criterion="cross_entropy", dropout=0.0, encoder_embed_dim=16,
                           encoder_hidden_size=12, decoder_embed_dim=16, decoder_hidden_size=20,
                           decoder_out_embed_dim=16, **attention)
    structattn_lstm(args)
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)

    def build():
        torch.manual_seed(0)
        return StructAttnLSTMModel.build_model(args, task)

    g = torch.Generator().manual_seed(1)
    B, S, T = 6, 9, 7
    src = torch.randint(d.nspecial, len(d), (B, S), generator=g)
    src[1, :4] = d.pad()
    src[3, :8] = d.pad()  # one real token
    tgt = torch.randint(d.nspecial, len(d), (B, T), generator=g)
    prev = torch.cat([torch.full((B, 1), d.eos()), tgt[:, :-1]], 1)
    return build, (src, src.ne(d.pad()).sum(1), prev, tgt)


MODEL_VARIANTS = {
    "softmax": dict(attention="softmax"),
    "sparsemax": dict(attention="sparsemax"),
    "viterbi-entropy": dict(attention="viterbi", attention_reg="entropy"),
    "viterbi-l2": dict(attention="viterbi", attention_reg="l2"),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_whole_model_in_half_precision_matches_float32(variant, dtype):
    """What fairseq does with --bf16 / --(memory-efficient-)fp16: the model and its inputs in half precision, the
    loss summed over tokens and (fp16) multiplied by a loss scale before backward."""
    import torch.nn.functional as F

    build, (src, lengths, prev, tgt) = _model_and_batch(MODEL_VARIANTS[variant])

    def loss_and_grads(model, scale):
        out, _ = model(src, lengths, prev)
        loss = F.cross_entropy(out.float().view(-1, out.size(-1)), tgt.view(-1), reduction="sum")
        grads = torch.autograd.grad(loss * scale, list(model.parameters()))
        return loss, [g.float() / scale for g in grads]

    l32, g32 = loss_and_grads(build(), 1.0)
    low = build().to(dtype)
    assert all(p.dtype == dtype for p in low.parameters())
    l16, g16 = loss_and_grads(low, 8.0 if dtype == torch.float16 else 1.0)
    assert math.isfinite(l16.item())
    assert abs(l16.item() - l32.item()) <= 1e-2 * abs(l32.item())
    for a, b in zip(g16, g32):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() <= GRAD_REL_TOL * b.abs().max() + 1e-6


@pytest.fixture(scope="module")
def toy_bin(tmp_path_factory):
    pytest.importorskip("fairseq")
    from fairseq_helpers import make_toy_data, preprocess

    root = tmp_path_factory.mktemp("fp16")
    make_toy_data(root / "raw", n_train=120, n_valid=12, n_test=4)
    preprocess(root / "raw", root / "bin")
    return root / "bin"


@pytest.mark.slow
@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_fairseq_train_memory_efficient_fp16_on_cpu_has_no_nan_loss(toy_bin, tmp_path, reg):
    from fairseq_helpers import parse_log, run_cli, train_args

    args = train_args(toy_bin, tmp_path / "ck", ["--attention", "viterbi", "--attention-reg", reg], 8,
                      ["--memory-efficient-fp16", "--log-interval", "1", "--no-save", "--disable-validation"])
    proc = run_cli("train", *args)
    log = parse_log(proc.stdout + proc.stderr)["train_inner"]
    assert [int(r["num_updates"]) for r in log] == list(range(1, 9))
    losses = [float(r["loss"]) for r in log]
    assert all(math.isfinite(x) for x in losses), losses
    assert all("loss_scale" in r for r in log), "fp16 optimizer (loss scaling) was not used"
    assert losses[-1] < losses[0]
