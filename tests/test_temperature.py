"""τ of the bilinear attentions (softmax, sparsemax, fusedmax, oscarmax, 1.5-entmax): w = normaliser(s/τ).

Checked against the normalisers applied by hand to s/τ and, for sparsemax and 1.5-entmax, against the ``entmax``
package (code no one here wrote); defaults from the one definition; checkpoints record τ and old ones load τ = 1;
the toolkits' flags and their refusals. The toolkit parts need fairseq / OpenNMT-py: skipped where they are not
installed, but a failure under CI (``CI=true``), which installs both."""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import re

import pytest
import torch

from structattn import options
from structattn.attention import (
    Entmax15Attention,
    FusedmaxAttention,
    OscarmaxAttention,
    SoftmaxAttention,
    SparsemaxAttention,
    build_attention,
    entmax15_attention,
    fusedmax_attention,
    oscarmax_attention,
    softmax_attention,
    sparsemax_attention,
)

KINDS = {
    "softmax": (SoftmaxAttention, lambda s, m: softmax_attention(s, m)),
    "sparsemax": (SparsemaxAttention, lambda s, m: sparsemax_attention(s, m)),
    "fusedmax": (FusedmaxAttention, lambda s, m: fusedmax_attention(s, m, options.DEFAULT_LAMBDA["fusedmax"])),
    "oscarmax": (OscarmaxAttention, lambda s, m: oscarmax_attention(s, m, options.DEFAULT_LAMBDA["oscarmax"])),
    "entmax15": (Entmax15Attention, lambda s, m: entmax15_attention(s, m)),
}


def _toolkit(module: str):
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module.split('.')[0]} is not installed")


def _rows(seed=0, B=6, T=9, scale=4.0, ties=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):  # left padding on even rows, right padding on odd rows, 0–3 positions
        k = b % 4
        if k:
            mask[b, :k] = b % 2 == 0
            mask[b, T - k:] = b % 2 == 1
    if ties:  # fusedmax/oscarmax are not differentiable at ties (groups fuse there): not for gradcheck
        s[2, 3] = s[2, 4]  # a tie
        s[5] = 0.7  # an all-equal row
    return s, mask


def test_the_defaults_are_the_one_definition():
    assert options.DEFAULT_TEMPERATURE == {"softmax": 10.0, "sparsemax": 10.0, "fusedmax": 10.0, "oscarmax": 1.0,
                                           "entmax15": 1.0}
    assert set(options.TEMPERATURE_ATTENTIONS) == set(KINDS) == set(options.ATTENTIONS) - {"viterbi", "sparsemap"}
    from structattn.attention import SPARSEMAX_TEMPERATURE

    assert SPARSEMAX_TEMPERATURE == options.DEFAULT_TEMPERATURE["sparsemax"]
    for name, (cls, _) in KINDS.items():
        assert float(cls(4, 3).temperature[0]) == options.DEFAULT_TEMPERATURE[name], name
        assert float(build_attention(name, 4, 3).temperature[0]) == options.DEFAULT_TEMPERATURE[name], name
        assert options.resolve_options(name).temperature == options.DEFAULT_TEMPERATURE[name], name
    assert options.resolve_options("viterbi").temperature is None
    assert options.resolve_options("sparsemap").temperature is None


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0, 10.0])
def test_module_normalises_the_scores_over_tau(name, tau):
    cls, fn = KINDS[name]
    s, mask = _rows(seed=int(tau * 10))
    att = cls(4, 3, temperature=tau).double()
    w = att.normalize(s, mask)
    assert torch.allclose(w, fn(s / tau, mask), atol=1e-12, rtol=0)
    assert torch.all(w[mask] == 0)
    assert torch.allclose(w.sum(-1), torch.ones(len(s), dtype=s.dtype), atol=1e-12)
    # the whole layer: scores x_t·M·z, divided by τ
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 9, 3, generator=g, dtype=torch.float64)
    ctx, w = att(q, k, mask)
    scores = torch.einsum("btd,bd->bt", k, att.proj(q))
    assert torch.allclose(w, fn(scores / tau, mask), atol=1e-12, rtol=0)
    assert torch.allclose(ctx, torch.einsum("bt,btd->bd", w, k), atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 2.0, 10.0])
def test_sparsemax_and_entmax15_against_the_entmax_package(tau):
    if os.environ.get("CI") == "true":
        import entmax
    else:
        entmax = pytest.importorskip("entmax")
    s, _ = _rows(seed=3)
    s = s.requires_grad_()
    for cls, ref in ((SparsemaxAttention, entmax.sparsemax), (Entmax15Attention, entmax.entmax15)):
        att = cls(4, 3, temperature=tau).double()
        w = att.normalize(s, None)
        r = ref(s / tau, dim=-1)
        assert torch.allclose(w, r, atol=1e-10), cls.__name__
        g = torch.randn_like(w)
        gw, = torch.autograd.grad((w * g).sum(), s)
        gr, = torch.autograd.grad((r * g).sum(), s)
        assert torch.allclose(gw, gr, atol=1e-10), cls.__name__


@pytest.mark.parametrize("name", list(KINDS))
def test_gradcheck_through_tau(name):
    cls, _ = KINDS[name]
    s, mask = _rows(seed=5, B=4, T=6, scale=1.5, ties=False)
    att = cls(4, 3, temperature=2.5).double()
    s = s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: att.normalize(x, mask), (s,), atol=1e-7)


def test_a_larger_tau_keeps_a_sparse_support_open():
    s = torch.tensor([[6.0, 4.0, 1.0, 0.0, -2.0]])
    for cls in (SparsemaxAttention, Entmax15Attention, FusedmaxAttention):
        supports = [int((cls(1, 1, temperature=t).normalize(s, None) > 0).sum()) for t in (1.0, 10.0)]
        assert supports[0] == 1 and supports[1] >= 3, (cls.__name__, supports)
    # softmax: never sparse; a larger τ is flatter (lower maximum)
    m1, m10 = (float(SoftmaxAttention(1, 1, temperature=t).normalize(s, None).max()) for t in (1.0, 10.0))
    assert m1 > 0.85 and m10 < 0.4


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, True, "2"])
def test_bad_temperatures_are_refused(bad):
    for cls, _ in KINDS.values():
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            cls(4, 3, temperature=bad)


def test_chain_attentions_have_gamma_not_tau():
    for name in ("viterbi", "sparsemap"):
        with pytest.raises(ValueError, match="temperature is gamma"):
            build_attention(name, 4, 3, temperature=2.0)
        with pytest.raises(ValueError, match=r"--attention-temperature is an option of .*--attention-gamma"):
            options.resolve_options(name, temperature=2.0)
    with pytest.raises(ValueError, match="--attention-temperature must be a finite number > 0, got '0'"):
        options.resolve_options("softmax", temperature=0)
    with pytest.raises(ValueError, match="--attention-temperature must be a finite number > 0"):
        options.resolve_options("softmax", temperature=True)
    assert options.resolve_options("softmax", temperature="3").temperature == 3.0


@pytest.mark.parametrize("name", list(KINDS))
def test_checkpoints_record_tau_and_old_ones_load_the_raw_scores(name):
    cls, fn = KINDS[name]
    trained = cls(4, 3, temperature=7.0)
    state = trained.state_dict()
    assert float(state["temperature"][0]) == 7.0
    fresh = cls(4, 3)
    fresh.load_state_dict(state)
    assert float(fresh.temperature[0]) == 7.0
    old = {k: v for k, v in state.items() if k != "temperature"}  # written before τ existed
    fresh.load_state_dict(old)  # strict: no missing key
    assert float(fresh.temperature[0]) == 1.0 and re.search(r"temperature=1\b", repr(fresh))
    s, mask = _rows(seed=7)
    assert torch.allclose(fresh.double().normalize(s, mask), fn(s, mask), atol=1e-12)


def test_half_precision_scores_are_normalised_in_float32():
    s, mask = _rows(seed=9)
    for name, (cls, fn) in KINDS.items():
        att = cls(4, 3, temperature=3.0)
        w = att.normalize(s.to(torch.bfloat16), mask)
        assert w.dtype == torch.bfloat16
        ref = fn(s.to(torch.bfloat16).float() / 3.0, mask)
        assert torch.allclose(w.float(), ref, atol=1e-2), name


def test_fairseq_lstm_flag_reaches_the_module_and_the_transformer_has_none():
    fairseq_options = _toolkit("fairseq.options")
    from fairseq_helpers import ROOT, USER_DIR

    plugin = importlib.import_module(f"{USER_DIR.name}.attention_options")

    def parse(*argv):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return fairseq_options.parse_args_and_arch(
                fairseq_options.get_training_parser(), [str(ROOT), "--user-dir", str(USER_DIR), *argv])

    args = parse("--arch", "structattn_lstm", "--attention", "softmax", "--attention-temperature", "4")
    o = plugin.resolve_attention_args(args)
    assert o.temperature == 4.0
    assert float(plugin.build_from_options(o, 8, 6).temperature[0]) == 4.0
    args = parse("--arch", "structattn_lstm", "--attention", "sparsemax")
    assert args.attention_temperature is None and plugin.resolve_attention_args(args).temperature == 10.0
    args = parse("--arch", "structattn_lstm", "--attention", "viterbi", "--attention-temperature", "4")
    with pytest.raises(ValueError, match="--attention-gamma"):
        plugin.resolve_attention_args(args)
    with pytest.raises(SystemExit):
        parse("--arch", "structattn_lstm", "--attention", "softmax", "--attention-temperature", "0")
    with pytest.raises(SystemExit):  # the Transformer's scaled dot products have no τ: not a flag there
        parse("--arch", "structattn_transformer_tiny", "--attention", "softmax", "--attention-temperature", "4")


def test_onmt_option_reaches_the_module_and_bad_combinations_are_refused():
    _toolkit("onmt")
    from structattn_onmt.cli import _train_parser
    from structattn_onmt.options import check_train_opt, options_from_opt

    def parse(*argv):
        return _train_parser().parse_known_args(list(argv) + ["-data", "{}", "-src_vocab", "unused"])[0]

    opt = parse("-global_attention_function", "entmax15", "-attention_temperature", "2.5")
    assert options_from_opt(opt).temperature == 2.5 and check_train_opt(opt) == []
    assert options_from_opt(parse("-global_attention_function", "sparsemax")).temperature == 10.0
    for argv, message in (
        (("-global_attention_function", "softmax", "-global_attention", "dot", "-attention_temperature", "2"),
         "-attention_temperature applies to the RNN decoder's bilinear score"),
        (("-global_attention_function", "viterbi", "-attention_temperature", "2"), "-attention_gamma"),
    ):
        problems = check_train_opt(parse(*argv))
        assert any(message in p for p in problems), (argv, problems)
