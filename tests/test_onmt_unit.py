"""The OpenNMT-py glue in-process (issue 16): options and their errors, the attention layer (padding, parameters,
initialisation), the patched decoder's attention layout and checkpoint loading. Seconds, no data files; the
command-line runs are in test_onmt_e2e.py. Skipped only when OpenNMT-py is not installed."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from structattn_onmt.patches import quiet_onmt_warnings

quiet_onmt_warnings()  # OpenNMT 3.5.1's torch.cuda.amp deprecation warnings, raised on import
try:
    import onmt  # noqa: F401
except ImportError:
    pytest.skip("OpenNMT-py is not installed (bash scripts/install_onmt.sh installs it; CI does)",
                allow_module_level=True)

from structattn.options import AttentionOptions, resolve_options
from structattn_onmt import patches
from structattn_onmt.cli import _train_parser, train_main
from structattn_onmt.layer import StructuredGlobalAttention
from structattn_onmt.options import MARKER, check_train_opt, options_from_opt

patches.quiet_onmt_warnings()
patches.install()

OPTIONS = {
    "softmax": AttentionOptions("softmax"),
    "sparsemax": AttentionOptions("sparsemax"),
    "viterbi-entropy": resolve_options("viterbi", "entropy"),
    "viterbi-l2": resolve_options("viterbi", "l2"),
    "viterbi-l2-paper": resolve_options("viterbi", "l2", 3.0, "paper", None),
    "fusedmax": resolve_options("fusedmax", lam=0.2),
    "oscarmax": resolve_options("oscarmax"),
    "entmax15": resolve_options("entmax15"),
    "sparsemap": resolve_options("sparsemap"),
}


REQUIRED = ["-data", "{}", "-src_vocab", "unused"]  # onmt_train's required options (never read here)


def _parse(*argv):
    return _train_parser().parse_known_args(list(argv) + REQUIRED)[0]


# ---- options ----------------------------------------------------------------------------------------------------


def test_defaults_are_the_fairseq_plugins():
    opt = _parse()
    assert opt.global_attention_function == "softmax"  # OpenNMT's own default is kept
    assert (opt.attention_reg, opt.attention_gamma, opt.attention_form, opt.attention_contiguity) == (
        "entropy", None, "stable", 1.0)
    assert options_from_opt(_parse("-global_attention_function", "viterbi")).gamma == 2.0
    assert options_from_opt(_parse("-global_attention_function", "viterbi", "-attention_reg", "l2")).gamma == 10.0
    from structattn_fairseq import attention_options as fairseq_options
    assert (fairseq_options.DEFAULT_REG, fairseq_options.DEFAULT_FORM) == (opt.attention_reg, opt.attention_form)
    from structattn.attention import DEFAULT_CONTIGUITY

    assert opt.attention_contiguity == DEFAULT_CONTIGUITY
    for text in ("0", "-1", "inf", "nan", "abc", "1e-3", "2"):  # the same accepted values and messages as fairseq's
        def outcome(fn):
            try:
                return fn(text)
            except argparse.ArgumentTypeError as exc:
                return str(exc)

        from structattn.options import positive_float

        a, b = outcome(positive_float), outcome(fairseq_options.positive_float)
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (text, a, b)


def test_options_reach_the_checkpoint_opt_and_stock_models_have_none():
    opt = _parse("-global_attention_function", "viterbi", "-attention_reg", "l2", "-attention_gamma", "5",
                 "-attention_form", "paper")
    assert options_from_opt(opt) == AttentionOptions("viterbi", "l2", 5.0, "paper", 1.0)
    stock = argparse.Namespace(global_attention_function="softmax")
    assert not hasattr(stock, MARKER) and options_from_opt(stock) is None


@pytest.mark.parametrize("argv, message", [
    (["-attention_gamma", "0"], "argument --attention_gamma/-attention_gamma: must be a finite number > 0, got '0'"),
    (["-attention_gamma", "inf"], "must be a finite number > 0, got 'inf'"),
    (["-attention_gamma", "ten"], "must be a number > 0, got 'ten'"),
    (["-attention_reg", "l1"], "argument --attention_reg/-attention_reg: invalid choice: 'l1'"),
    (["-global_attention_function", "dot"], "argument --global_attention_function/-global_attention_function: "
                                            "invalid choice: 'dot'"),
    (["-attention_form", "raw"], "argument --attention_form/-attention_form: invalid choice: 'raw'"),
    (["-attention_contiguity", "nan"], "must be a finite number, got 'nan'"),
    (["-attention_chain", "maybe"], "argument --attention_chain/-attention_chain: invalid choice"),
    (["-attention_gama", "3"], "unrecognized arguments: -attention_gama"),
    (["-global_attention_function", "viterbi", "-global_attention", "mlp"],
     "-global_attention_function viterbi needs -global_attention general"),
    (["-global_attention_function", "viterbi", "-decoder_type", "transformer", "-encoder_type", "transformer"],
     "-global_attention_function viterbi is an attention of the RNN decoder"),
    (["-global_attention_function", "sparsemap", "-global_attention", "dot"],
     "-global_attention_function sparsemap needs -global_attention general"),
    (["-global_attention_function", "fusedmax", "-decoder_type", "transformer", "-encoder_type", "transformer"],
     "-global_attention_function fusedmax is an attention of the RNN decoder"),
    (["-global_attention_function", "oscarmax", "-attention_lambda", "-1"],
     "argument --attention_lambda/-attention_lambda: must be a finite number >= 0, got '-1'"),
    (["-global_attention_function", "fusedmaxx"], "argument --global_attention_function/-global_attention_function: "
                                                  "invalid choice: 'fusedmaxx'"),
    (["-coverage_attn"], "-coverage_attn is not supported by structattn-onmt-train"),
    (["-copy_attn"], "-copy_attn is not supported by structattn-onmt-train"),
    (["-world_size", "2"], "give the ranks of this machine with -gpu_ranks (e.g. -gpu_ranks 0 1)"),
    (["-world_size", "2", "-gpu_ranks", "0", "1"], "needs -gpu_backend gloo (got nccl"),
    (["-gpu_ranks", "0"], "-gpu_ranks 0 needs CUDA, which this machine does not have"),
])
def test_bad_values_stop_with_one_error_line(argv, message, capsys, tmp_path, monkeypatch):
    if "-world_size" in argv or "-gpu_ranks" in argv:
        # The CPU data-parallel checks apply on a machine without CUDA: be one, also on a GPU machine.
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        train_main(argv + REQUIRED + ["-save_model", str(tmp_path / "m")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.strip().splitlines()[-1].startswith("structattn-onmt-train: error: ")
    assert not list(tmp_path.iterdir())


def test_check_train_opt_accepts_every_attention():
    for argv in (["-global_attention_function", "softmax", "-global_attention", "dot"],
                 ["-global_attention_function", "sparsemax", "-global_attention", "mlp"],
                 ["-global_attention_function", "viterbi", "-attention_reg", "l2", "-attention_gamma", "1e-3"],
                 ["-global_attention_function", "viterbi", "-attention_form", "paper"],
                 ["-global_attention_function", "fusedmax", "-global_attention", "dot", "-attention_lambda", "0"],
                 ["-global_attention_function", "oscarmax", "-global_attention", "mlp"],
                 ["-global_attention_function", "entmax15"],
                 ["-global_attention_function", "sparsemap", "-attention_gamma", "3"]):
        assert check_train_opt(_parse(*argv)) == [], argv


# ---- the layer ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIONS))
def test_layer_is_the_library_attention_and_padding_is_exact(name):
    torch.manual_seed(0)
    options = OPTIONS[name]
    dim, lengths = 6, [5, 3, 1]
    layer = StructuredGlobalAttention(dim, options, attn_type="general", attn_func=options.attention)
    from structattn.attention import build_attention

    kind = type(build_attention(options.attention, dim, dim))
    assert type(layer.attention) is kind and layer.linear_in is layer.attention.proj
    keys = set(layer.state_dict())
    assert "attention.proj.weight" in keys and "linear_out.weight" in keys and "linear_in.weight" not in keys
    if options.attention in ("viterbi", "sparsemap"):
        assert ("attention.transitions_over_gamma" if options.form == "stable" else "attention.transitions") in keys
    enc = torch.randn(3, 5, dim)
    for b, n in enumerate(lengths):
        enc[b, n:] = 1e3  # padding garbage must not matter
    src_len = torch.tensor(lengths)
    for t_len in (None, 4):  # one decoder step (input feeding) and a whole target (no input feeding)
        query = torch.randn(3, dim) if t_len is None else torch.randn(3, t_len, dim)
        out, w = layer(query, enc, src_len)
        rows = w.reshape(-1, 5) if t_len else w
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[0]), atol=1e-5, rtol=0)
        for b, n in enumerate(lengths):
            wb = w[b]
            assert torch.all(wb[..., n:] == 0)
            out_1, w_1 = layer(query[b:b + 1], enc[b:b + 1, :n], torch.tensor([n]))
            torch.testing.assert_close(wb[..., :n], w_1[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out[b], out_1[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn_type", ["dot", "mlp"])
@pytest.mark.parametrize("func", ["softmax", "sparsemax", "fusedmax", "oscarmax", "entmax15"])
def test_dot_and_mlp_scores_with_the_library_normalisers(attn_type, func):
    from structattn import attention

    torch.manual_seed(0)
    layer = StructuredGlobalAttention(4, resolve_options(func), attn_type=attn_type, attn_func=func)
    assert layer.attention is None
    q, enc = torch.randn(2, 4), torch.randn(2, 3, 4) * 3
    _, w = layer(q, enc, torch.tensor([3, 2]))
    assert torch.all(w[1, 2] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    # the library's function of OpenNMT's scores, each row over its real positions
    scores = layer.score(q.unsqueeze(1), enc).squeeze(1)
    fn = getattr(attention, f"{func}_attention")
    for b, n in enumerate((3, 2)):
        torch.testing.assert_close(w[b, :n], fn(scores[b:b + 1, :n])[0])


@pytest.mark.parametrize("name", ["viterbi-l2", "sparsemap"])
def test_chain_attentions_need_the_bilinear_score(name):
    func = name.split("-")[0]
    with pytest.raises(ValueError, match=f"{func} needs -global_attention general"):
        StructuredGlobalAttention(4, OPTIONS[name], attn_type="dot", attn_func=func)


# ---- models built by OpenNMT with the patches ----------------------------------------------------------------------


def _vocabs():
    import pyonmttok

    tokens = ["<unk>", "<blank>", "<s>", "</s>"] + [f"w{i}" for i in range(6)]
    v = pyonmttok.build_vocab_from_tokens(tokens)
    v.default_id = v["<unk>"]
    return {"src": v, "tgt": v, "data_task": "seq2seq", "decoder_start_token": "<s>"}


def _model(*argv, checkpoint=None):
    import onmt.model_builder
    from onmt.utils.parse import ArgumentParser

    opt = _parse("-encoder_type", "brnn", "-hidden_size", "8", "-word_vec_size", "4", "-layers", "1", "-dropout", "0",
                 *argv)
    ArgumentParser.update_model_opts(opt)
    ArgumentParser.validate_model_opts(opt)
    return opt, onmt.model_builder.build_model(opt, opt, _vocabs(), checkpoint, -1)


def test_new_models_keep_the_library_initialisation():
    torch.manual_seed(0)
    _, model = _model("-global_attention_function", "viterbi", "-attention_reg", "l2", "-attention_contiguity", "0.5")
    att = model.decoder.attn
    assert isinstance(att, StructuredGlobalAttention)
    # OpenNMT's -param_init 0.1 drew every parameter from U(-0.1, 0.1); the prior and M's scale are back
    assert torch.equal(att.attention.transitions_over_gamma.detach(), torch.eye(2) * 0.5)
    bound = 10.0 * math.sqrt(3.0 / (8 * 8))
    w = att.attention.proj.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.1
    assert model.decoder.embeddings.word_lut.weight.abs().max() <= 0.1  # the rest is OpenNMT's


def test_chain_off_option_builds_the_ablation():
    _, model = _model("-global_attention_function", "viterbi", "-attention_reg", "l2", "-attention_chain", "off")
    assert model.decoder.attn.attention.chain is False
    _, model = _model("-global_attention_function", "viterbi")
    assert model.decoder.attn.attention.chain is True


def test_sparsemax_checkpoints_from_before_the_temperature_load_with_plain_sparsemax():
    _, model = _model("-global_attention_function", "sparsemax")
    att = model.decoder.attn.attention
    assert float(att.temperature[0]) == 10.0
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "generator": None}
    old = {"model": {k: v for k, v in state["model"].items() if not k.endswith("attention.temperature")},
           "generator": None}
    model.load_state_dict(old, strict=True)  # OpenNMT's own loader, through structattn_onmt's patch
    assert float(att.temperature[0]) == 1.0
    model.load_state_dict({"model": dict(state["model"]), "generator": None}, strict=True)
    assert float(att.temperature[0]) == 10.0


def test_stock_models_keep_onmt_layer():
    from onmt.modules.global_attention import GlobalAttention

    _building = patches._building_options
    _building.append(None)
    try:
        layer = patches._global_attention_factory(8, attn_type="general", attn_func="sparsemax")
    finally:
        _building.pop()
    assert type(layer) is GlobalAttention


@pytest.mark.parametrize("input_feed", ["1", "0"])
def test_rnn_decoders_return_batch_major_attention(input_feed):
    torch.manual_seed(0)
    _, model = _model("-global_attention_function", "viterbi", "-input_feed", input_feed)
    model.eval()
    src = torch.randint(4, 10, (3, 5, 1))
    src_len = torch.tensor([5, 4, 2])
    enc_out, enc_final, src_len = model.encoder(src, src_len)
    model.decoder.init_state(src, enc_out, enc_final)
    _, attns = model.decoder(torch.randint(4, 10, (3, 2, 1)), enc_out, src_len=src_len, with_align=True)
    assert attns["std"].shape == (3, 2, 5) and attns["align"] is attns["std"]
    assert torch.all(attns["std"][2, :, 2:] == 0)
    _, step = model.decoder(torch.randint(4, 10, (3, 1, 1)), enc_out, src_len=src_len, step=2)
    assert step["std"].shape == (3, 1, 5)


def test_checkpoint_state_loads_back_with_non_persistent_buffers(tmp_path):
    torch.manual_seed(0)
    opt, model = _model("-global_attention_function", "viterbi")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("generator")}
    assert not any(k.endswith("_rows") for k in state)  # the fallback counters are not saved
    checkpoint = {"model": state, "generator": {k[len("generator."):]: v for k, v in model.state_dict().items()
                                                if k.startswith("generator")}, "opt": opt}
    torch.manual_seed(1)
    _, other = _model("-global_attention_function", "viterbi", checkpoint=checkpoint)
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert isinstance(other.decoder.attn.attention._rows, torch.Tensor)  # still there after loading
    path = tmp_path / "ck.pt"
    torch.save(checkpoint, path)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)
    from onmt.models.model_saver import load_checkpoint

    assert load_checkpoint(str(path))["opt"].global_attention_function == "viterbi"  # patched: weights-only + 1 class
