"""In-process tests of the fairseq model ``structattn_lstm`` (structattn_fairseq/structattn_lstm.py): padding layouts and the
attention column contract, parity with fairseq's ``lstm`` for softmax, incremental decoding, beam reordering, beam
search, options and errors. The real CLIs are exercised in test_fairseq_e2e.py."""

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
from fairseq.models.lstm import LSTMModel, base_architecture  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

from structattn_fairseq.structattn_lstm import (  # noqa: E402
    StructAttnLSTMModel,
    structattn_lstm,
    structattn_lstm_paper,
)

VARIANTS = {
    "softmax": dict(attention="softmax"),
    "sparsemax": dict(attention="sparsemax"),
    "viterbi-entropy": dict(attention="viterbi", attention_reg="entropy", attention_gamma=1.0),
    "viterbi-l2": dict(attention="viterbi", attention_reg="l2", attention_gamma=1.0),
    "fusedmax": dict(attention="fusedmax", attention_lambda=0.2),
    "oscarmax": dict(attention="oscarmax"),
    "entmax15": dict(attention="entmax15"),
    "sparsemap": dict(attention="sparsemap", attention_gamma=1.0),
}


def _args(arch=structattn_lstm, **kw):
    args = argparse.Namespace(
        arch="structattn_lstm", criterion="cross_entropy", dropout=0.0, encoder_embed_dim=16,
        encoder_hidden_size=12, decoder_embed_dim=16, decoder_hidden_size=20, decoder_out_embed_dim=16, **kw,
    )
    arch(args)
    return args


def _model(variant, seed=0, **kw):
    torch.manual_seed(seed)
    d = toy_dictionary()
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    model = StructAttnLSTMModel.build_model(_args(**VARIANTS[variant], **kw), task).double().eval()
    # fairseq's initialisation gives near-uniform attention; larger random weights make it peaked enough that a
    # mis-indexed column or a leaked padding state would show.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        if hasattr(model.decoder.attention.attention, "transitions"):
            model.decoder.attention.attention.transitions.copy_(torch.tensor([[0.3, -0.2], [-0.4, 0.1]]))
    return model, d


# ---- padding and the attention column contract ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["left", "right", "mixed"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_batch_equals_single_sentences(variant, layout):
    model, d = _model(variant)
    sents = random_sentences(d, [6, 3, 5, 1, 6])
    src, lengths = pad_batch(d, sents, layout)
    prev = random_prev_output(d, len(sents), 5)
    with torch.no_grad():
        logits, attn = model(src, lengths, prev)
    assert attn.shape == (len(sents), 5, src.shape[1])
    pad = src.eq(d.pad())
    assert (attn.masked_select(pad[:, None, :].expand_as(attn)) == 0).all(), "padding columns must be exactly 0"
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:2], dtype=attn.dtype))
    for b, s in enumerate(sents):
        with torch.no_grad():
            logits1, attn1 = model(s[None], torch.tensor([len(s)]), prev[b : b + 1])
        torch.testing.assert_close(logits[b], logits1[0], rtol=1e-9, atol=1e-10)
        # Column j of attn is the weight of src_tokens[:, j]: the real columns, in order, are the sentence's.
        torch.testing.assert_close(attn[b][:, ~pad[b]], attn1[0], rtol=1e-9, atol=1e-10)


def test_same_sentence_left_and_right_padded_in_one_batch():
    model, d = _model("viterbi-l2")
    s = random_sentences(d, [4])[0]
    T = 7
    left = torch.cat([torch.full((T - 4,), d.pad()), s])
    right = torch.cat([s, torch.full((T - 4,), d.pad())])
    src = torch.stack([left, right])
    prev = random_prev_output(d, 1, 4).expand(2, 4)
    with torch.no_grad():
        _, attn = model(src, torch.tensor([4, 4]), prev)
    torch.testing.assert_close(attn[0, :, T - 4 :], attn[1, :, :4], rtol=1e-12, atol=1e-12)
    assert (attn[0, :, : T - 4] == 0).all() and (attn[1, :, 4:] == 0).all()
    assert attn[0, :, T - 4 :].amax() > attn[0, :, T - 4 :].amin(), "test needs non-uniform attention"


@pytest.mark.parametrize("tau", [1.0, 10.0])
def test_softmax_variant_equals_fairseq_lstm_with_realigned_attention(tau):
    """With the same weights, --attention softmax computes exactly fairseq's `lstm` (same logits); fairseq's attn
    columns follow its internal right padding (fairseq issue #3625), ours follow src_tokens. At τ ≠ 1 it is fairseq's
    `lstm` with M/τ: the temperature is a reparametrisation of M, the same model family."""
    model, d = _model("softmax", attention_temperature=tau)
    assert float(model.decoder.attention.attention.temperature[0]) == tau
    args = _args(**VARIANTS["softmax"])
    base_architecture(args)
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    ref = LSTMModel.build_model(args, task).double().eval()
    state = dict(model.state_dict())
    state["decoder.attention.input_proj.weight"] = state.pop("decoder.attention.attention.proj.weight") / tau
    del state["decoder.attention.attention.temperature"]
    ref.load_state_dict(state)
    sents = random_sentences(d, [6, 5, 3, 2])  # fairseq's encoder wants lengths sorted, descending
    src, lengths = pad_batch(d, sents, "left")
    prev = random_prev_output(d, 4, 6)
    with torch.no_grad():
        logits, attn = model(src, lengths, prev)
        logits_ref, attn_ref = ref(src, lengths, prev)
    # fairseq rounds the attention scores to float32 before its softmax (its fp16 guard), hence the tolerance.
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-6)
    pad = src.eq(d.pad())
    for b, L in enumerate(lengths.tolist()):
        torch.testing.assert_close(attn[b][:, ~pad[b]], attn_ref[b][:, :L], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(attn, attn_ref), "fairseq's lstm attn should be misaligned on left padding"


# ---- incremental decoding and beam reordering -------------------------------------------------------------------------


def _incremental(model, enc, prev, state=None):
    state = {} if state is None else state
    steps = [model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state) for t in range(prev.size(1))]
    return torch.cat([s[0] for s in steps], 1), torch.cat([s[1] for s in steps], 1), state


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_decoding_equals_full_forward(variant):
    model, d = _model(variant)
    src, lengths = pad_batch(d, random_sentences(d, [5, 2, 4]), "left")
    prev = random_prev_output(d, 3, 6)
    with torch.no_grad():
        logits, attn = model(src, lengths, prev)
        enc = model.encoder(src, lengths)
        inc_logits, inc_attn, _ = _incremental(model, enc, prev)
    torch.testing.assert_close(inc_logits, logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inc_attn, attn, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reorder_incremental_state(variant):
    model, d = _model(variant)
    src, lengths = pad_batch(d, random_sentences(d, [5, 2, 4]), "left")
    prev = random_prev_output(d, 3, 5)
    new_order = torch.tensor([2, 0, 0])  # what beam search does: drop, keep and duplicate hypotheses
    with torch.no_grad():
        enc = model.encoder(src, lengths)
        _, _, state = _incremental(model, enc, prev[:, :3])
        model.decoder.reorder_incremental_state_scripting(state, new_order)
        enc_r = model.encoder.reorder_encoder_out(enc, new_order)
        prev_r = prev[new_order]
        cont = [model.decoder(prev_r[:, : t + 1], encoder_out=enc_r, incremental_state=state) for t in (3, 4)]
        logits_ref, attn_ref = model(src[new_order], lengths[new_order], prev_r)
    torch.testing.assert_close(torch.cat([c[0] for c in cont], 1), logits_ref[:, 3:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([c[1] for c in cont], 1), attn_ref[:, 3:], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_beam_search_batch_equals_single_and_attention_is_aligned(variant):
    model, d = _model(variant)
    sents = random_sentences(d, [6, 4, 2])
    src, lengths = pad_batch(d, sents, "left")
    gen = SequenceGenerator([model], d, beam_size=3, max_len_b=8, max_len_a=0)
    with torch.no_grad():
        hypos = gen.forward({"net_input": {"src_tokens": src, "src_lengths": lengths}})
    pad = src.eq(d.pad())
    for b, s in enumerate(sents):
        assert len(hypos[b]) == 3
        scores = [h["score"].item() for h in hypos[b]]
        assert scores == sorted(scores, reverse=True)
        with torch.no_grad():
            single = gen.forward({"net_input": {"src_tokens": s[None], "src_lengths": torch.tensor([len(s)])}})
        assert torch.equal(hypos[b][0]["tokens"], single[0][0]["tokens"])
        att = hypos[b][0]["attention"]  # (src_len, hyp_len), columns of src_tokens
        assert att.shape[0] == src.shape[1]
        assert (att[pad[b]] == 0).all()
        torch.testing.assert_close(att[~pad[b]], single[0][0]["attention"], rtol=1e-8, atol=1e-10)


# ---- options and errors -------------------------------------------------------------------------------------------------


def _parse(*extra):
    parser = options.get_training_parser()
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            args = options.parse_args_and_arch(
                parser, [str(ROOT), "--user-dir", str(ROOT / "structattn_fairseq"), "--arch", "structattn_lstm",
                         *extra])
            code = None
        except SystemExit as exc:
            args, code = None, exc.code
    return args, code, out.getvalue() + err.getvalue()


def test_options_parse_and_defaults():
    args, code, _ = _parse("--attention", "viterbi", "--attention-reg", "l2", "--attention-gamma", "3.5")
    assert code is None
    assert (args.attention, args.attention_reg, args.attention_gamma) == ("viterbi", "l2", 3.5)
    args, code, _ = _parse()
    assert (args.attention, args.attention_reg, args.attention_gamma) == ("viterbi", "entropy", None)


def test_help_describes_the_attention_options(monkeypatch):
    # fairseq prints --help before adding model options; the plugin's hook (which reads sys.argv, like
    # fairseq-train) adds them.
    monkeypatch.setattr(sys, "argv", ["fairseq-train", "data", "--arch", "structattn_lstm", "--help"])
    _, code, text = _parse("--help")
    assert code == 0
    for opt, words in (("--attention", "sparsemax"), ("--attention-reg", "entropy"), ("--attention-gamma", "gamma")):
        assert opt in text
    flat = " ".join(text.split())
    assert "segmentation attention" in flat and "temperature gamma > 0" in flat and "default: the paper" in flat
    assert "--attention-form" in text and "--attention-contiguity" in text


def test_help_hook_leaves_fairseq_models_alone(monkeypatch):
    """The --help hook (structattn_fairseq/fairseq_patches.py) adds options only for the plugin's own architectures."""
    from fairseq import options

    from structattn_fairseq.fairseq_patches import arch_from_argv

    assert arch_from_argv(["x", "--arch", "lstm"]) == "lstm" and arch_from_argv(["--arch=a"]) == "a"
    assert arch_from_argv(["-a", "b", "--help"]) == "b" and arch_from_argv(["--help"]) is None
    assert getattr(options.add_model_args, "_structattn_help_hook", False)
    monkeypatch.setattr(sys, "argv", ["fairseq-train", "data", "--arch", "lstm", "--help"])
    parser = options.get_training_parser()  # calls add_model_args
    assert not any("--attention-reg" in a.option_strings for a in parser._actions)
    monkeypatch.setattr(sys, "argv", ["fairseq-train", "data", "--arch", "structattn_lstm", "--help"])
    parser = options.get_training_parser()
    assert any("--attention-reg" in a.option_strings for a in parser._actions)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attention-gamma", "0"], "argument --attention-gamma: must be a finite number > 0, got '0'"),
        (["--attention-gamma", "-2"], "argument --attention-gamma: must be a finite number > 0"),
        (["--attention-gamma", "abc"], "argument --attention-gamma: must be a number > 0, got 'abc'"),
        (["--attention", "dot"], "argument --attention: invalid choice: 'dot'"),
        (["--attention-reg", "l1"], "argument --attention-reg: invalid choice: 'l1'"),
        (["--attention-lambda", "-1"], "argument --attention-lambda: must be a finite number >= 0, got '-1'"),
        (["--attention-lambda", "nan"], "argument --attention-lambda: must be a finite number >= 0, got 'nan'"),
        (["--attention-lambda", "x"], "argument --attention-lambda: must be a number >= 0, got 'x'"),
        (["--attention", "fusedmaxx"], "argument --attention: invalid choice: 'fusedmaxx'"),
    ],
)
def test_bad_options_give_short_clear_errors(extra, message):
    _, code, text = _parse(*extra)
    assert code == 2
    assert message in text
    last = text.strip().splitlines()[-1]  # argparse prints fairseq's usage, then one error line
    assert message in last and len(last) < 200 and "Traceback" not in text


def test_build_model_validates_programmatic_args_and_fills_paper_gamma():
    d = toy_dictionary()
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    with pytest.raises(ValueError, match="--attention must be one of"):
        StructAttnLSTMModel.build_model(_args(attention="dot"), task)
    with pytest.raises(ValueError, match="--attention-gamma must be a finite number > 0"):
        StructAttnLSTMModel.build_model(_args(attention="viterbi", attention_gamma=-1.0), task)
    with pytest.raises(ValueError, match="always uses attention"):
        StructAttnLSTMModel.build_model(_args(decoder_attention="0"), task)
    for reg, gamma in (("entropy", 2.0), ("l2", 10.0)):
        args = _args(attention="viterbi", attention_reg=reg)
        model = StructAttnLSTMModel.build_model(args, task)
        assert args.attention_gamma == gamma and model.decoder.attention.attention.gamma == gamma
    with pytest.raises(ValueError, match="--attention-lambda must be a finite number >= 0"):
        StructAttnLSTMModel.build_model(_args(attention="fusedmax", attention_lambda=-0.5), task)
    # λ's default per attention and SparseMAP's γ are filled in, so that the checkpoint records them
    for attention, lam, gamma in (("fusedmax", 0.1, None), ("oscarmax", 0.01, None), ("sparsemap", None, 10.0),
                                  ("entmax15", None, None)):
        args = _args(attention=attention)
        att = StructAttnLSTMModel.build_model(args, task).decoder.attention.attention
        assert (args.attention_lambda, args.attention_gamma) == (lam, gamma), attention
        assert (getattr(att, "lam", None), getattr(att, "gamma", None)) == (lam, gamma), attention
    args = _args(attention="oscarmax", attention_lambda=0.3)
    assert StructAttnLSTMModel.build_model(args, task).decoder.attention.attention.lam == 0.3


def test_empty_source_sentence_is_rejected():
    model, d = _model("softmax")
    src = torch.tensor([[d.pad(), d.pad()], [4, d.eos()]])
    with pytest.raises(ValueError, match="no token"):
        model(src, torch.tensor([0, 2]), random_prev_output(d, 2, 3))


def test_paper_architecture():
    d = toy_dictionary()
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    args = argparse.Namespace(arch="structattn_lstm_paper", criterion="cross_entropy", attention="viterbi",
                              attention_reg="l2")
    structattn_lstm_paper(args)
    model = StructAttnLSTMModel.build_model(args, task)
    enc, dec = model.encoder, model.decoder
    assert enc.lstm.num_layers == 2 and enc.lstm.bidirectional and enc.lstm.hidden_size == 500
    assert enc.output_units == 1000 and enc.embed_tokens.embedding_dim == 500
    assert len(dec.layers) == 2 and dec.hidden_size == 500
    assert dec.layers[0].input_size == 500 + 500, "input feeding: previous attentional output joins the embedding"
    assert dec.attention.attention.proj.weight.shape == (1000, 500)
    assert dec.attention.attention.gamma == 10.0 and args.dropout == 0.3


@pytest.mark.cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_matches_cpu(variant):
    model, d = _model(variant)
    src, lengths = pad_batch(d, random_sentences(d, [6, 3, 5]), "left")
    prev = random_prev_output(d, 3, 5)
    with torch.no_grad():
        logits, attn = model(src, lengths, prev)
        model.cuda()
        logits_c, attn_c = model(src.cuda(), lengths.cuda(), prev.cuda())
        gen = SequenceGenerator([model], d, beam_size=2, max_len_b=6, max_len_a=0)
        hyp = gen.forward({"net_input": {"src_tokens": src.cuda(), "src_lengths": lengths.cuda()}})
    torch.testing.assert_close(logits_c.cpu(), logits, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(attn_c.cpu(), attn, rtol=1e-7, atol=1e-8)
    assert len(hyp) == 3


def test_chain_off_flag_and_kappa_in_the_training_log():
    from fairseq.logging import metrics

    from structattn.attention import ViterbiNormalizer
    from structattn_fairseq.attention_options import log_attention_metrics, resolve_attention_args

    args, code, _ = _parse("--attention", "viterbi", "--attention-reg", "l2", "--attention-chain", "off")
    assert code is None and args.attention_chain == "off"
    assert resolve_attention_args(args).chain == "off"
    args, code, text = _parse("--attention-chain", "maybe")
    assert code == 2 and "--attention-chain" in text
    args, _, _ = _parse()
    assert args.attention_chain == "on"

    norms = [ViterbiNormalizer(2, "l2"), None, ViterbiNormalizer(2, "l2", chain=False)]
    with torch.no_grad():
        norms[0].transitions_over_gamma[1] = torch.tensor([[0.5, 0.0], [0.0, 0.25]])  # κ = 0.75 for head 1
    for m in norms[::2]:
        m(torch.randn(1, 2, 3, 5))
    with metrics.aggregate() as agg:
        log_attention_metrics(norms)
    logged = agg.get_smoothed_values()
    # layer 0: heads at the prior (κ = 2) and 0.75; layer 2 (the chain-off one): κ = 0 for both heads
    assert logged["kappa_L0H0"] == pytest.approx(2.0) and logged["kappa_L0H1"] == pytest.approx(0.75)
    assert logged["kappa_L2H0"] == pytest.approx(0.0, abs=1e-6) and logged["kappa_L2H1"] == pytest.approx(0, abs=1e-6)
    assert logged["kappa"] == pytest.approx((2.0 + 0.75) / 4, abs=1e-3)
    single = ViterbiNormalizer(1, "entropy")
    single(torch.randn(1, 1, 2, 4))
    with metrics.aggregate() as agg:
        log_attention_metrics(single)
    values = agg.get_smoothed_values()
    assert values["kappa"] == pytest.approx(2.0) and not any(k.startswith("kappa_L") for k in values)
