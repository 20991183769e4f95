"""torch.compile(fullgraph=True) of the Viterbi attention and of a whole structattn_lstm decoder step (issue 13,
item 1).

``fullgraph=True`` turns any graph break into an error, so each test proves that Dynamo traces the code in one graph
(the Viterbi passes enter it as the ``structattn::`` custom ops); the numbers, forward and backward, must be those of
eager mode. Most tests use the ``aot_eager`` backend (Dynamo + AOTAutograd, the part that decides graph breaks and
derivatives, in seconds); one runs the default Inductor backend, which adds C++ code generation (~20 s on CPU).
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import pytest
import torch

from structattn.attention import ViterbiAttention, viterbi_attention


def _scores(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    trans = torch.randn(2, 2, generator=g, dtype=torch.float64)
    pm = torch.zeros(B, T, dtype=torch.bool)
    pm[1, 5:] = True  # right padding
    pm[2, :3] = True  # left padding
    pm[3, 1] = True  # a hole
    return s, trans, pm


def _run(f, s, trans, pm):
    s = s.clone().requires_grad_(True)
    trans = trans.clone().requires_grad_(True)
    w, p = f(s, trans, pm)
    gs, gt = torch.autograd.grad((w * torch.arange(w.shape[1], dtype=w.dtype)).sum() + p.sum(), (s, trans))
    return w.detach(), p.detach(), gs, gt


def _attention(reg):
    return lambda s, trans, pm: viterbi_attention(s, trans, pm, reg, 1.0, return_marginals=True)


def _assert_same(got, ref, tol):
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("reg", ["entropy", "l2"])
@pytest.mark.parametrize("mask", ["padded", "all-real", "none"])
def test_viterbi_attention_fullgraph_equals_eager(reg, mask):
    s, trans, pm = _scores(seed=1)
    if reg == "l2":
        s[0] -= 50.0  # a dead row: every position loses to the all-zero path, the weights fall back to softmax
    pm = {"padded": pm, "all-real": torch.zeros_like(pm), "none": None}[mask]
    torch._dynamo.reset()
    compiled = torch.compile(_attention(reg), fullgraph=True, backend="aot_eager")
    ref = _run(_attention(reg), s, trans, pm)
    _assert_same(_run(compiled, s, trans, pm), ref, 1e-12)
    if reg == "l2":
        assert ref[1][0].sum() == 0, "the test meant to include a dead (fallback) row"


def test_viterbi_attention_varying_batch_shapes():
    """NMT batches change (B, T) every step: after one recompilation with dynamic shapes (the fake kernels take
    symbolic sizes), every shape runs in the same graph, forward and backward equal to eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_attention("l2"), fullgraph=True, backend="aot_eager")
    for B, T in ((4, 7), (5, 9), (6, 12), (7, 5)):
        s, trans, pm = _scores(B=B, T=T, seed=B)
        _assert_same(_run(compiled, s, trans, pm), _run(_attention("l2"), s, trans, pm), 1e-12)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_viterbi_attention_inductor_equals_eager():
    s, trans, pm = _scores(seed=2)
    s, trans = s.float(), trans.float()
    torch._dynamo.reset()
    compiled = torch.compile(_attention("entropy"), fullgraph=True)
    _assert_same(_run(compiled, s, trans, pm), _run(_attention("entropy"), s, trans, pm), 1e-5)


def test_viterbi_attention_module_counts_under_compile():
    """The module's running counts (buffers mutated in the graph) are the same compiled and eager."""
    torch.manual_seed(0)
    att = ViterbiAttention(5, 6, reg="l2", gamma=1.0).double()
    q, k = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    pm = torch.tensor([[False] * 4, [False, False, True, True], [True, False, False, False]])
    ctx_ref, w_ref = att(q, k, pm)
    counts_ref = att.pop_fallback_counts()
    torch._dynamo.reset()
    ctx, w = torch.compile(att, fullgraph=True, backend="aot_eager")(q, k, pm)
    _assert_same((ctx, w), (ctx_ref, w_ref), 1e-12)
    assert att.pop_fallback_counts() == counts_ref


# ---- a whole structattn_lstm decoder step ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lstm_model():
    pytest.importorskip("fairseq")
    from fairseq_helpers import ROOT

    sys.path.insert(0, str(ROOT))
    from fairseq.data import Dictionary

    from structattn_fairseq.structattn_lstm import StructAttnLSTMModel, structattn_lstm

    d = Dictionary()
    for i in range(10):
        d.add_symbol(f"w{i}")
    args = argparse.Namespace(
        arch="structattn_lstm", criterion="cross_entropy", dropout=0.0, encoder_embed_dim=8, encoder_hidden_size=6,
        decoder_embed_dim=8, decoder_hidden_size=10, decoder_out_embed_dim=8, attention="viterbi",
        attention_reg="l2", attention_gamma=1.0,
    )
    structattn_lstm(args)
    torch.manual_seed(0)
    model = StructAttnLSTMModel.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(d.nspecial, len(d), (3, 5), generator=g)
    src[1, :2] = d.pad()  # left-padded
    src[2, 4:] = d.pad()  # right-padded
    prev = torch.randint(d.nspecial, len(d), (3, 4), generator=g)
    prev[:, 0] = d.eos()
    return model, src, (~src.eq(d.pad())).sum(1), prev


def test_decoder_incremental_steps_fullgraph_equal_eager(lstm_model):
    """Beam-search style decoding: each call is one decoder step (LSTM cells, Viterbi attention, output projection)
    reading and writing fairseq's incremental state; compiled in one graph per step shape."""
    model, src, lengths, prev = lstm_model
    model.eval()
    with torch.no_grad():
        enc = model.encoder(src, lengths)

    def step(tokens, enc, state):
        return model.decoder(tokens, encoder_out=enc, incremental_state=state)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for f in (step, compiled):
        state, steps = {}, []
        with torch.no_grad():
            for t in range(prev.shape[1]):
                logits, attn = f(prev[:, : t + 1], enc, state)
                steps.append((logits, attn))
        outs.append(steps)
    for (l_ref, a_ref), (l, a) in zip(*outs):
        torch.testing.assert_close(l, l_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-12)
    model.decoder.attention.attention.pop_fallback_counts()


def test_decoder_training_step_fullgraph_equals_eager(lstm_model):
    """Teacher-forced decoder forward + backward (the training step after the encoder): same loss and gradients."""
    model, src, lengths, prev = lstm_model
    model.train()
    enc = model.encoder(src, lengths)
    enc = tuple(t.detach() for t in enc)

    def loss(prev, enc):
        logits, _ = model.decoder(prev, encoder_out=enc)
        return torch.log_softmax(logits, -1)[..., 4].sum()

    torch._dynamo.reset()
    results = []
    for f in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        model.zero_grad()
        y = f(prev, enc)
        y.backward()
        results.append((y.detach(), [p.grad.clone() for p in model.decoder.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-12)
    assert len(results[1][1]) == len(results[0][1]) > 0
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    model.decoder.attention.attention.pop_fallback_counts()
