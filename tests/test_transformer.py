"""In-process tests of the fairseq model ``structattn_transformer`` (structattn_fairseq/structattn_transformer.py): padding,
parity with fairseq's ``transformer`` for softmax, incremental decoding and beam search against a forced full
forward, per-head transitions, the exported attention (layer, heads), low precision, training metrics, options and
errors. The real CLIs are exercised in test_transformer_e2e.py."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from types import SimpleNamespace

import pytest
import torch

from fairseq_helpers import ROOT, pad_batch, random_prev_output, random_sentences, toy_dictionary

fairseq = pytest.importorskip("fairseq")

sys.path.insert(0, str(ROOT))
from fairseq import options  # noqa: E402
from fairseq.logging import metrics  # noqa: E402
from fairseq.models.transformer import TransformerModel  # noqa: E402
from fairseq.models.transformer import tiny_architecture as fairseq_tiny  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

from structattn.attention import ViterbiNormalizer  # noqa: E402
from structattn_fairseq.structattn_transformer import (  # noqa: E402
    StructAttnTransformerModel,
    structattn_transformer,
    structattn_transformer_iwslt_de_en,
    structattn_transformer_tiny,
)

VARIANTS = {
    "softmax": dict(attention="softmax"),
    "sparsemax": dict(attention="sparsemax"),
    "viterbi-entropy": dict(attention="viterbi", attention_reg="entropy", attention_gamma=1.0),
    "viterbi-l2": dict(attention="viterbi", attention_reg="l2", attention_gamma=1.0),
    "viterbi-l2-paper": dict(attention="viterbi", attention_reg="l2", attention_gamma=1.0, attention_form="paper"),
    "fusedmax": dict(attention="fusedmax", attention_lambda=0.2),
    "oscarmax": dict(attention="oscarmax"),
    "entmax15": dict(attention="entmax15"),
    "sparsemap": dict(attention="sparsemap", attention_gamma=1.0),
}
HEADS, LAYERS = 4, 2
# fairseq computes the decoder's self-attention softmax in float32 (utils.softmax) and the generator keeps scores in
# float32: comparisons across different computations of a float64 model (incremental vs full, beam vs forced) hold
# to float32 rounding only. A padding or beam-indexing error shows as differences of order 1e-2.
F32 = dict(rtol=1e-5, atol=1e-6)


def _args(arch=structattn_transformer_tiny, **kw):
    args = argparse.Namespace(arch="structattn_transformer_tiny", dropout=0.0, encoder_embed_dim=16,
                              encoder_ffn_embed_dim=24, encoder_attention_heads=2, decoder_attention_heads=HEADS,
                              encoder_layers=1, decoder_layers=LAYERS, **kw)
    arch(args)
    return args


def _task(d):
    return SimpleNamespace(source_dictionary=d, target_dictionary=d)


def _model(variant, seed=0, **kw):
    torch.manual_seed(seed)
    d = toy_dictionary()
    model = StructAttnTransformerModel.build_model(_args(**VARIANTS[variant], **kw), _task(d)).double().eval()
    # Larger random weights than fairseq's initialisation: peaked (and, for l2, sparse) attention, so that a
    # mis-indexed column, a leaked padding position or a wrong head would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0.0, 0.6)
        for n in model.decoder.normalizers():
            t = n.transitions if n.form == "paper" else n.transitions_over_gamma
            t.copy_(torch.randn(t.shape) * 0.5)
    return model, d


def _forward(model, src, lengths, prev):
    logits, extra = model(src, lengths, prev)
    return logits, extra["attn"][0]


# ---- the model ----------------------------------------------------------------------------------------------------


def test_architectures_and_parameters():
    d = toy_dictionary()
    model = StructAttnTransformerModel.build_model(_args(attention="viterbi", attention_reg="l2"), _task(d))
    norms = model.decoder.normalizers()
    assert len(norms) == LAYERS and all(n.num_heads == HEADS for n in norms)
    assert norms[0].transitions_over_gamma.shape == (HEADS, 2, 2) and norms[0].gamma == 10.0
    assert torch.equal(norms[0].transitions_over_gamma, torch.eye(2).expand(HEADS, 2, 2))  # contiguity prior
    keys = {k for k in model.state_dict() if ".encoder_attn." in k and ".layers.0." in k}
    assert keys == {f"decoder.layers.0.encoder_attn.{p}_proj.{w}" for p in "qkv" + "o" for w in ("weight", "bias")
                    if p != "o"} | {"decoder.layers.0.encoder_attn.out_proj.weight",
                                    "decoder.layers.0.encoder_attn.out_proj.bias",
                                    "decoder.layers.0.encoder_attn.normalizer.transitions_over_gamma"}
    # self-attention stays fairseq's softmax attention
    assert type(model.decoder.layers[0].self_attn).__name__ == "MultiheadAttention"
    # every other attention: a normaliser per layer, per head; SparseMAP with one T per head, parametrised as the
    # Viterbi attention's; the others without parameters (their state dict is fairseq's transformer's)
    for attention, lam in (("fusedmax", 0.1), ("oscarmax", 0.01), ("entmax15", None), ("sparsemap", None)):
        args = _args(attention=attention)
        m = StructAttnTransformerModel.build_model(args, _task(d))
        layer = m.decoder.layers[0].encoder_attn.normalizer
        assert getattr(layer, "lam", None) == lam == args.attention_lambda, attention
        extra = {k for k in m.state_dict() if ".normalizer." in k}
        if attention == "sparsemap":
            assert layer.transitions_over_gamma.shape == (HEADS, 2, 2) and layer.gamma == args.attention_gamma == 10
            assert len(extra) == LAYERS and len(m.decoder.normalizers()) == LAYERS
        else:
            assert not extra and not m.decoder.normalizers()
    for arch, dims in ((structattn_transformer, (512, 2048, 8, 6)), (structattn_transformer_iwslt_de_en,
                                                                     (512, 1024, 4, 6))):
        args = argparse.Namespace()
        arch(args)
        assert (args.encoder_embed_dim, args.encoder_ffn_embed_dim, args.decoder_attention_heads,
                args.decoder_layers) == dims
        assert (args.attention, args.attention_reg, args.attention_form, args.attention_transitions) == (
            "viterbi", "entropy", "stable", "head")


def test_softmax_equals_fairseq_transformer():
    """--attention softmax computes fairseq's own transformer: same parameter names, same outputs."""
    model, d = _model("softmax")
    args = _args(**VARIANTS["softmax"])
    fairseq_tiny(args)
    ref = TransformerModel.build_model(args, _task(d)).double().eval()
    ref.load_state_dict(model.state_dict())  # strict: the same parameters
    src, lengths = pad_batch(d, random_sentences(d, [6, 3, 5]), "left")
    prev = random_prev_output(d, 3, 5)
    with torch.no_grad():
        logits, attn = _forward(model, src, lengths, prev)
        logits_ref, attn_ref = _forward(ref, src, lengths, prev)
    # fairseq rounds the attention scores to float32 before its softmax (utils.softmax), hence the tolerance.
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn, attn_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["left", "right"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_batch_equals_single_sentences(variant, layout):
    model, d = _model(variant)
    sents = random_sentences(d, [6, 3, 5, 1])
    src, lengths = pad_batch(d, sents, layout)
    prev = random_prev_output(d, len(sents), 5)
    with torch.no_grad():
        logits, attn = _forward(model, src, lengths, prev)
    pad = src.eq(d.pad())
    assert attn.shape == (len(sents), 5, src.shape[1])
    assert (attn.masked_select(pad[:, None, :].expand_as(attn)) == 0).all(), "padding columns must be exactly 0"
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:2], dtype=attn.dtype))
    for b, s in enumerate(sents):
        with torch.no_grad():
            logits1, attn1 = _forward(model, s[None], torch.tensor([len(s)]), prev[b: b + 1])
        torch.testing.assert_close(logits[b], logits1[0], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(attn[b][:, ~pad[b]], attn1[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_decoding_equals_full_forward(variant):
    model, d = _model(variant)
    src, lengths = pad_batch(d, random_sentences(d, [5, 2, 4]), "left")
    prev = random_prev_output(d, 3, 6)
    state = {}
    with torch.no_grad():
        logits, attn = _forward(model, src, lengths, prev)
        enc = model.encoder(src, lengths)
        steps = [model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state) for t in range(6)]
    torch.testing.assert_close(torch.cat([s[0] for s in steps], 1), logits, **F32)
    torch.testing.assert_close(torch.cat([s[1]["attn"][0] for s in steps], 1), attn, **F32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_beam_search_equals_forced_full_forward(variant):
    """Beam search (incremental, beams sharing the encoder keys, reordered states) scores every hypothesis as a
    non-incremental forward of that hypothesis does, and its attention is that forward's, in src_tokens columns."""
    model, d = _model(variant)
    sents = random_sentences(d, [6, 4, 2])
    src, lengths = pad_batch(d, sents, "left")
    gen = SequenceGenerator([model], d, beam_size=3, max_len_b=6, max_len_a=0)
    with torch.no_grad():
        hypos = gen.forward({"net_input": {"src_tokens": src, "src_lengths": lengths}})
    pad = src.eq(d.pad())
    for b, s in enumerate(sents):
        assert len(hypos[b]) == 3
        for hypo in hypos[b]:
            tokens = hypo["tokens"]
            prev = torch.cat([tokens.new_tensor([d.eos()]), tokens[:-1]])[None]
            with torch.no_grad():
                logits, attn = _forward(model, s[None], torch.tensor([len(s)]), prev)
                lprobs = model.get_normalized_probs((logits, None), log_probs=True)
            forced = lprobs[0].gather(1, tokens[:, None]).squeeze(1)
            torch.testing.assert_close(hypo["positional_scores"], forced.float(), **F32)
            att = hypo["attention"]  # (src_len, hyp_len) in the batch's src_tokens columns
            assert (att[pad[b]] == 0).all()
            torch.testing.assert_close(att[~pad[b]], attn[0].t().float(), **F32)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_matches_cpu(variant):
    """The model on CUDA (the multi-head normaliser's unfused path, Triton kernels for the chains) gives the CPU's
    logits, attention and gradients of every parameter (the per-head transitions included), and beam search runs."""
    model, d = _model(variant)
    src, lengths = pad_batch(d, random_sentences(d, [6, 3, 5]), "left")
    prev = random_prev_output(d, 3, 5)
    g = torch.Generator().manual_seed(3)

    def run(m, *inputs):
        m.zero_grad()
        logits, attn = _forward(m, *inputs)
        (logits * torch.randn(logits.shape, generator=g, dtype=logits.dtype).to(logits.device)).sum().backward()
        return logits.detach().cpu(), attn.detach().cpu(), {n: p.grad.cpu() for n, p in m.named_parameters()}

    g.manual_seed(3)
    logits, attn, grads = run(model, src, lengths, prev)
    model.cuda()
    g.manual_seed(3)
    logits_c, attn_c, grads_c = run(model, src.cuda(), lengths.cuda(), prev.cuda())
    torch.testing.assert_close(logits_c, logits, **F32)
    torch.testing.assert_close(attn_c, attn, **F32)
    assert grads_c.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], **F32, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():
        gen = SequenceGenerator([model], d, beam_size=2, max_len_b=6, max_len_a=0)
        hyp = gen.forward({"net_input": {"src_tokens": src.cuda(), "src_lengths": lengths.cuda()}})
    assert len(hyp) == 3 and all(len(h) == 2 for h in hyp)


def test_transitions_shared_by_the_heads_of_a_layer():
    """--attention-transitions layer: one (1, 2, 2) matrix per layer, applied to every head; equal to per-head
    transitions that all hold that matrix."""
    shared, d = _model("viterbi-l2", attention_transitions="layer")
    per_head, _ = _model("viterbi-l2")
    assert [tuple(n.transitions_over_gamma.shape) for n in shared.decoder.normalizers()] == [(1, 2, 2)] * LAYERS
    state = shared.state_dict()
    for k in [k for k in state if k.endswith("transitions_over_gamma")]:
        state[k] = state[k].expand(HEADS, 2, 2).clone()
    per_head.load_state_dict(state)
    src, lengths = pad_batch(d, random_sentences(d, [6, 3]), "left")
    prev = random_prev_output(d, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(_forward(shared, src, lengths, prev), _forward(per_head, src, lengths, prev),
                                   rtol=1e-12, atol=1e-12)


def test_per_head_transitions_get_their_own_gradients():
    model, d = _model("viterbi-entropy")
    model.train()
    src, lengths = pad_batch(d, random_sentences(d, [6, 4]), "left")
    logits, _ = _forward(model, src, lengths, random_prev_output(d, 2, 4))
    logits.sum().backward()
    for n in model.decoder.normalizers():
        g = n.transitions_over_gamma.grad
        assert g is not None and g.shape == (HEADS, 2, 2) and bool((g.abs().sum((1, 2)) > 0).all())
        assert not torch.allclose(g[0], g[1]), "each head has its own chain"


# ---- the attention returned for alignments and dumps --------------------------------------------------------------


def test_attention_export_layer_and_heads():
    model, d = _model("viterbi-l2")
    src, lengths = pad_batch(d, random_sentences(d, [6, 3]), "left")
    prev = random_prev_output(d, 2, 4)
    S = src.shape[1]
    with torch.no_grad():
        _, last = _forward(model, src, lengths, prev)
        _, first = _forward(model, src, lengths, prev)
        model.decoder.set_attention_export(layer=0)
        _, layer0 = _forward(model, src, lengths, prev)
        model.decoder.set_attention_export(layer=-LAYERS, heads="all")
        _, packed = _forward(model, src, lengths, prev)
        model.decoder.set_attention_export(layer=-1)
        _, back = _forward(model, src, lengths, prev)
    assert torch.equal(back, last) and not torch.allclose(layer0, last)
    assert packed.shape == (2, 4, HEADS * S)
    heads = packed.view(2, 4, HEADS, S)
    torch.testing.assert_close(heads.mean(2), layer0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(heads.sum(-1), torch.ones(2, 4, HEADS, dtype=heads.dtype))
    pad = src.eq(d.pad())
    assert (heads.masked_select(pad[:, None, None, :].expand_as(heads)) == 0).all()
    assert not torch.allclose(heads[:, :, 0], heads[:, :, 1]), "heads differ"
    assert (heads.masked_select(~pad[:, None, None, :].expand_as(heads)) == 0).any(), "l2 heads are sparse"
    with pytest.raises(ValueError, match="the decoder has 2 layers"):
        model.decoder.set_attention_export(layer=2)
    with pytest.raises(ValueError, match="heads must be one of"):
        model.decoder.set_attention_export(heads="max")
    del first


# ---- precision, metrics -------------------------------------------------------------------------------------------


def test_low_precision_runs_the_chain_in_float32():
    model, d = _model("viterbi-l2")
    model = model.float()
    src, lengths = pad_batch(d, random_sentences(d, [6, 3]), "left")
    prev = random_prev_output(d, 2, 4)
    with torch.no_grad():
        _, attn32 = _forward(model, src, lengths, prev)
    seen = []
    hooks = [n.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype)) for n in model.decoder.normalizers()]
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        logits, attn = _forward(model, src, lengths, prev)
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.float32}, "the normaliser must see float32 scores"
    assert torch.isfinite(logits).all() and attn.dtype == torch.bfloat16
    assert (attn.float() - attn32).abs().max() < 0.15  # bfloat16 projections; the normalisation is float32


def test_training_metrics_pool_layers_and_heads():
    model, d = _model("viterbi-entropy")
    model.train()
    src, lengths = pad_batch(d, random_sentences(d, [6, 4, 3]), "left")
    with metrics.aggregate(new_root=True) as agg:
        _forward(model, src, lengths, random_prev_output(d, 3, 5))
    values = agg.get_smoothed_values()
    assert values["attn_fallback"] == 0 and values["attn_frozen"] == 0
    taus = torch.cat([n.transitions_over_gamma.detach() for n in model.decoder.normalizers()]).mean(0)
    for i in range(2):
        for j in range(2):
            assert values[f"T{i}{j}/g"] == pytest.approx(round(float(taus[i, j]), 3), abs=1e-3)
    rows, _, _ = model.decoder.normalizers()[0].pop_fallback_counts()
    assert rows == 0, "logging popped the counts"


# ---- options and errors -------------------------------------------------------------------------------------------


def _parse(*extra, arch="structattn_transformer_tiny"):
    parser = options.get_training_parser()
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            args = options.parse_args_and_arch(
                parser, [str(ROOT), "--user-dir", str(ROOT / "structattn_fairseq"), "--arch", arch, *extra])
            code = None
        except SystemExit as exc:
            args, code = None, exc.code
    return args, code, out.getvalue() + err.getvalue()


def test_options_parse_with_fairseq_transformer_options():
    args, code, _ = _parse("--attention", "viterbi", "--attention-reg", "l2", "--attention-gamma", "3.5",
                           "--decoder-attention-heads", "8", "--attention-dropout", "0.1", "--attention-transitions",
                           "layer")
    assert code is None
    assert (args.attention, args.attention_reg, args.attention_gamma) == ("viterbi", "l2", 3.5)
    assert args.attention_transitions == "layer"
    assert (args.decoder_attention_heads, args.attention_dropout) == (8, 0.1)
    args, code, _ = _parse(arch="structattn_transformer_iwslt_de_en")
    assert code is None and (args.attention, args.attention_form, args.decoder_ffn_embed_dim) == ("viterbi", "stable",
                                                                                                    1024)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attention-gamma", "0"], "argument --attention-gamma: must be a finite number > 0, got '0'"),
        (["--attention", "dot"], "argument --attention: invalid choice: 'dot'"),
        (["--attention-reg", "l1"], "argument --attention-reg: invalid choice: 'l1'"),
        (["--attention-form", "exact"], "argument --attention-form: invalid choice: 'exact'"),
        (["--attention-transitions", "model"], "argument --attention-transitions: invalid choice: 'model'"),
        (["--attention-lambda", "-0.1"], "argument --attention-lambda: must be a finite number >= 0, got '-0.1'"),
    ],
)
def test_bad_options_give_short_clear_errors(extra, message):
    _, code, text = _parse(*extra)
    assert code == 2
    last = text.strip().splitlines()[-1]
    assert message in last and len(last) < 200 and "Traceback" not in text


def test_build_model_errors():
    task = _task(toy_dictionary())
    with pytest.raises(ValueError, match="--attention must be one of"):
        StructAttnTransformerModel.build_model(_args(attention="dot"), task)
    with pytest.raises(ValueError, match="--attention-gamma must be a finite number > 0"):
        StructAttnTransformerModel.build_model(_args(attention_gamma=-1.0), task)
    with pytest.raises(ValueError, match="do not pass --no-cross-attention"):
        StructAttnTransformerModel.build_model(_args(no_cross_attention=True), task)
    with pytest.raises(ValueError, match="--attention-transitions must be one of head, layer"):
        StructAttnTransformerModel.build_model(_args(attention_transitions="model"), task)
    with pytest.raises(ValueError, match="--encoder-xformers-att-config"):
        StructAttnTransformerModel.build_model(_args(encoder_xformers_att_config="{'name': 'scaled_dot_product'}"),
                                               task)  # refused before fairseq would try to import xFormers


def test_checkpoint_of_the_other_form_names_the_override():
    paper, _ = _model("viterbi-l2-paper")
    stable, _ = _model("viterbi-l2")
    with pytest.raises(ValueError, match="'attention_form': 'paper'"):
        stable.load_state_dict(paper.state_dict(), model_cfg=None)
    with pytest.raises(ValueError, match="'attention_form': 'stable'"):
        paper.load_state_dict(stable.state_dict(), model_cfg=None)


def test_library_normalizer_matches_rows_of_viterbi_attention():
    """ViterbiNormalizer = viterbi_attention on each (sentence, head, query) row with that head's T."""
    from structattn.attention import centre_scores, viterbi_attention

    torch.manual_seed(0)
    n = ViterbiNormalizer(3, "l2", 1.0, "stable").double()
    with torch.no_grad():
        n.transitions_over_gamma.copy_(torch.randn(3, 2, 2))
    scores = torch.randn(2, 3, 4, 6, dtype=torch.float64) * 3
    mask = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., :2] = True
    w = n(scores, mask)
    for b in range(2):
        for h in range(3):
            m = mask[b, 0].expand(4, 6)
            ref = viterbi_attention(centre_scores(scores[b, h], m), n.gamma * n.transitions_over_gamma[h], m, "l2",
                                    1.0)
            # The normaliser centres inside the fused kernel, centre_scores with torch's reduction: the means may
            # differ in the last bit.
            torch.testing.assert_close(w[b, h], ref, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="built for 3 heads"):
        n(scores[:, :2], mask)


@pytest.mark.parametrize("reg", ["entropy", "l2"])
def test_multihead_viterbi_attention_gradcheck_and_errors(reg):
    from structattn.attention import multihead_viterbi_attention

    torch.manual_seed(1)
    scores = (torch.randn(2, 2, 2, 4, dtype=torch.float64) * 2).requires_grad_()
    trans = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, False, True, True], [False, False, False, False]])[:, None, None, :]
    # ℓ2 is piecewise smooth: gradcheck at a point away from its kinks (γ large against the scores' gaps)
    gamma = 1.0 if reg == "entropy" else 20.0
    torch.autograd.gradcheck(lambda s, t: multihead_viterbi_attention(s, t, mask, reg, gamma), (scores, trans))
    with pytest.raises(ValueError, match=r"transitions must have shape \(2, 2\), \(1, 2, 2\) or \(H, 2, 2\)"):
        multihead_viterbi_attention(scores, torch.zeros(3, 2, 2, dtype=torch.float64), mask, reg, gamma)
    with pytest.raises(ValueError, match="does not broadcast"):
        multihead_viterbi_attention(scores, trans, mask[:, :, :, :3], reg, gamma)
    with pytest.raises(ValueError, match=r"shape \(B, H, Q, S\)"):
        multihead_viterbi_attention(scores[0], trans, None, reg, gamma)
