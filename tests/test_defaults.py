"""One set of attention defaults: every entry point — the library's functions and modules, the fairseq plugin's
flags and the OpenNMT-py options — reads the values defined once in :mod:`structattn.options`.

The toolkit parts need fairseq / OpenNMT-py: skipped where they are not installed, but a failure under CI
(``CI=true``), which installs both."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os

import pytest
import torch

from structattn import attention, options
from structattn.attention import (
    ViterbiAttention,
    ViterbiNormalizer,
    build_attention,
    multihead_viterbi_attention,
    viterbi_attention,
)
from structattn.options import DEFAULT_CONTIGUITY, DEFAULT_FORM, DEFAULT_REG, PAPER_GAMMA, REGULARIZERS

#: the defaults, spelt out once here so that a change to them is a deliberate change to this test as well
EXPECTED = {"reg": "entropy", "form": "stable", "contiguity": 1.0, "gamma": {"entropy": 2.0, "l2": 10.0},
            "lam": {"fusedmax": 0.1, "oscarmax": 0.01}, "sparsemap_gamma": 10.0, "gamma_mode": "fixed",
            "scaled_gamma": 1.0}


def _toolkit(module: str):
    """Import a toolkit module; skip without it, except under CI, where its absence is an install failure."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module.split('.')[0]} is not installed")


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_the_one_definition_is_the_one_every_committed_result_used():
    assert (DEFAULT_REG, DEFAULT_FORM, DEFAULT_CONTIGUITY, PAPER_GAMMA) == (
        EXPECTED["reg"], EXPECTED["form"], EXPECTED["contiguity"], EXPECTED["gamma"])
    assert set(PAPER_GAMMA) == set(REGULARIZERS)
    assert (options.DEFAULT_GAMMA_MODE, options.SCALED_GAMMA) == (EXPECTED["gamma_mode"], EXPECTED["scaled_gamma"])
    # attention.py re-exports the same objects; it does not define its own
    for name in ("ATTENTIONS", "PAPER_GAMMA", "VITERBI_FORMS", "DEFAULT_REG", "DEFAULT_FORM", "DEFAULT_CONTIGUITY",
                 "SPARSEMAP_GAMMA"):
        assert getattr(attention, name) is getattr(options, name), name
    assert (options.DEFAULT_LAMBDA, options.SPARSEMAP_GAMMA) == (EXPECTED["lam"], EXPECTED["sparsemap_gamma"])
    # λ's defaults are the operators' own (one definition, beside the operators)
    from structattn.ops import structured_sparsemax as ssm

    assert options.DEFAULT_LAMBDA == {"fusedmax": ssm.DEFAULT_FUSEDMAX_LAMBDA, "oscarmax": ssm.DEFAULT_OSCARMAX_LAMBDA}


@pytest.mark.parametrize("name", ["fusedmax", "oscarmax"])
def test_lambda_defaults_of_the_library(name):
    lam = options.DEFAULT_LAMBDA[name]
    assert _default(getattr(attention, f"{name}_attention"), "lam") == lam
    cls = getattr(attention, f"{name.capitalize()}Attention")
    assert _default(cls.__init__, "lam") == lam and cls(3, 4).lam == lam
    assert build_attention(name, 3, 4).lam == lam and attention.build_normalizer(name, 2).lam == lam
    assert options.resolve_options(name).lam == lam
    assert options.build_from_options(options.resolve_options(name), 3, 4).lam == lam
    assert options.build_normalizer(options.resolve_options(name), 2).lam == lam
    assert options.build_from_options(options.resolve_options(name, lam=0.5), 3, 4).lam == 0.5
    assert options.resolve_options("softmax").lam is None  # λ belongs to fusedmax and oscarmax only


def test_sparsemap_defaults_of_the_library():
    g = options.SPARSEMAP_GAMMA
    for m in (attention.SparsemapAttention(3, 4), attention.SparsemapNormalizer(2), build_attention("sparsemap", 3, 4),
              attention.build_normalizer("sparsemap", 2),
              options.build_from_options(options.resolve_options("sparsemap"), 3, 4),
              options.build_normalizer(options.resolve_options("sparsemap"), 2)):
        assert (m.gamma, m.form, m.contiguity, m.chain) == (g, DEFAULT_FORM, DEFAULT_CONTIGUITY, True), m
    assert options.resolve_options("sparsemap").gamma == g


@pytest.mark.parametrize("bad, message", [(-0.1, "must be a finite number >= 0"), (float("inf"), "finite"),
                                          (float("nan"), "finite"), ("x", "must be a number >= 0"),
                                          (True, "number >= 0")])
def test_bad_lambda_and_attention_are_refused(bad, message):
    with pytest.raises(ValueError, match=f"--attention-lambda .*{message}"):
        options.resolve_options("fusedmax", lam=bad)
    with pytest.raises(ValueError, match="--attention must be one of .*sparsemap.*; got 'fusedmaxx'"):
        options.resolve_options("fusedmaxx")


def test_options_is_a_leaf_module():
    """structattn.options does not import structattn.attention at import time (attention imports options): no
    module-level import of it in options.py (the package's __init__ may import both, attention first)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(options.__file__).read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [(n.module or "") if isinstance(n, ast.ImportFrom) else a.name for n in top
             for a in (n.names if isinstance(n, ast.Import) else [None])]
    assert names and not any(m in ("attention", "structattn.attention") or m.endswith(".attention") for m in names)
    assert "build_attention" in ast.unparse(tree)  # imported inside the functions that build modules


@pytest.mark.parametrize("fn", [ViterbiAttention.__init__, ViterbiNormalizer.__init__, build_attention])
def test_module_signatures(fn):
    assert _default(fn, "reg") == DEFAULT_REG
    assert _default(fn, "form") == DEFAULT_FORM
    assert _default(fn, "gamma") is None  # the paper's γ for the chosen Ω
    assert _default(fn, "contiguity") is None  # the stable form's DEFAULT_CONTIGUITY (the paper form has none)


@pytest.mark.parametrize("fn", [viterbi_attention, multihead_viterbi_attention])
def test_function_signatures(fn):
    assert _default(fn, "reg") == DEFAULT_REG
    assert _default(fn, "gamma") is None


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_built_modules_hold_the_defaults(reg):
    for m in (ViterbiAttention(3, 4, reg), ViterbiNormalizer(2, reg), build_attention("viterbi", 3, 4, reg),
              options.build_from_options(options.resolve_options("viterbi", reg), 3, 4),
              options.build_normalizer(options.resolve_options("viterbi", reg), 2)):
        assert (m.reg, m.gamma, m.form, m.contiguity) == (reg, PAPER_GAMMA[reg], DEFAULT_FORM, DEFAULT_CONTIGUITY)
        assert m.gamma_mode == options.DEFAULT_GAMMA_MODE and not hasattr(m, "log_gamma")
    assert _default(ViterbiNormalizer.__init__, "gamma_mode") == options.DEFAULT_GAMMA_MODE
    m = ViterbiAttention(3, 4)
    assert m.reg == DEFAULT_REG and m.gamma == PAPER_GAMMA[DEFAULT_REG]


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_functions_default_to_the_papers_gamma(reg):
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64) * 3
    trans = torch.randn(2, 2, dtype=torch.float64)
    torch.testing.assert_close(viterbi_attention(s, trans, None, reg),
                               viterbi_attention(s, trans, None, reg, PAPER_GAMMA[reg]), rtol=0, atol=0)
    assert not torch.allclose(viterbi_attention(s, trans, None, reg), viterbi_attention(s, trans, None, reg, 1.0))
    s4 = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 3
    trans4 = torch.randn(3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(multihead_viterbi_attention(s4, trans4, None, reg),
                               multihead_viterbi_attention(s4, trans4, None, reg, PAPER_GAMMA[reg]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="reg must be one of"):
        viterbi_attention(s, trans, None, "l1")


def test_resolve_options_defaults():
    o = options.resolve_options("viterbi")
    assert (o.reg, o.gamma, o.form, o.contiguity) == (DEFAULT_REG, PAPER_GAMMA[DEFAULT_REG], DEFAULT_FORM,
                                                      DEFAULT_CONTIGUITY)
    assert options.AttentionOptions("viterbi").form == DEFAULT_FORM
    assert o.gamma_mode == options.AttentionOptions("viterbi").gamma_mode == options.DEFAULT_GAMMA_MODE
    # γ = None in the scaled mode is relative to the heads' score scale: SCALED_GAMMA, not the paper's
    assert options.resolve_options("viterbi", "l2", gamma_mode="scaled").gamma == options.SCALED_GAMMA
    assert options.resolve_options("viterbi", "l2", gamma_mode="learned").gamma == PAPER_GAMMA["l2"]


def test_fairseq_plugin_defaults():
    fairseq_options = _toolkit("fairseq.options")
    from fairseq_helpers import ROOT, USER_DIR

    for arch in ("structattn_lstm", "structattn_transformer_tiny"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = fairseq_options.parse_args_and_arch(
                fairseq_options.get_training_parser(), [str(ROOT), "--user-dir", str(USER_DIR), "--arch", arch])
        assert (args.attention_reg, args.attention_gamma, args.attention_form, args.attention_contiguity) == (
            DEFAULT_REG, None, DEFAULT_FORM, DEFAULT_CONTIGUITY), arch
        assert args.attention_lambda is None, arch  # None: the chosen attention's default
        plugin = importlib.import_module(f"{USER_DIR.name}.attention_options")
        resolved = plugin.resolve_attention_args(args)
        assert resolved == options.resolve_options(args.attention), arch
        if args.attention == "viterbi":
            assert resolved.gamma == PAPER_GAMMA[DEFAULT_REG]
        assert resolved.gamma_mode == options.DEFAULT_GAMMA_MODE, arch
        if arch == "structattn_transformer_tiny":  # the option is the Transformer's (its multi-head normaliser)
            assert args.attention_gamma_mode == options.DEFAULT_GAMMA_MODE
        for name, lam in options.DEFAULT_LAMBDA.items():
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                args = fairseq_options.parse_args_and_arch(
                    fairseq_options.get_training_parser(),
                    [str(ROOT), "--user-dir", str(USER_DIR), "--arch", arch, "--attention", name])
            assert plugin.resolve_attention_args(args).lam == lam == args.attention_lambda, (arch, name)


def test_onmt_defaults():
    _toolkit("onmt")
    from structattn_onmt.cli import _train_parser
    from structattn_onmt.options import options_from_opt

    opt = _train_parser().parse_known_args(["-data", "{}", "-src_vocab", "unused"])[0]
    assert (opt.attention_reg, opt.attention_gamma, opt.attention_form, opt.attention_contiguity) == (
        DEFAULT_REG, None, DEFAULT_FORM, DEFAULT_CONTIGUITY)
    opt.global_attention_function = "viterbi"
    assert options_from_opt(opt) == options.resolve_options("viterbi")
    assert opt.attention_lambda is None  # None: the chosen attention's default
    for name, lam in options.DEFAULT_LAMBDA.items():
        opt.global_attention_function = name
        assert options_from_opt(opt).lam == lam == options.resolve_options(name).lam
    opt.global_attention_function = "sparsemap"
    assert options_from_opt(opt).gamma == options.SPARSEMAP_GAMMA
