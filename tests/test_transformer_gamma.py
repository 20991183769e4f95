"""Per-head temperature of the multi-head Viterbi normaliser (``gamma_mode`` learned / scaled,
``--attention-gamma-mode``): each head is exactly a single-head normaliser with its own γ, the gradient reaches
log γ (float64 gradcheck), κ and T/γ use each head's own γ, fixed-γ state dicts and checkpoints load as before, and
a short toy training through the real fairseq CLI makes the ℓ2 heads sparser than the paper's fixed γ."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from structattn import options
from structattn.attention import ViterbiNormalizer, coupling_report
from structattn.ops.segmentation import chain_coupling

HEAD_GAMMAS = [0.3, 1.0, 4.0, 25.0]


def _scores(seed=0, B=3, H=4, Q=5, S=7, scale=(0.5, 3.0, 10.0, 40.0)):
    """(B, H, Q, S) float64 scores, each head on its own scale, with padding (right, left, none) filled with −inf as
    fairseq fills it."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, H, Q, S, generator=g, dtype=torch.float64) * torch.tensor(scale, dtype=torch.float64).view(
        1, H, 1, 1)
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., 5:] = True
    mask[1, ..., :2] = True
    return s.masked_fill(mask, float("-inf")), mask


def _param(m):
    return m.transitions if m.form == "paper" else m.transitions_over_gamma


def _learned(form, reg, transitions, gammas=HEAD_GAMMAS, mode="learned"):
    m = ViterbiNormalizer(len(gammas), reg, form=form, gamma_mode=mode).double()
    with torch.no_grad():
        m.log_gamma.copy_(torch.tensor(gammas, dtype=torch.float64).log())
        _param(m).copy_(transitions)
    return m


@pytest.mark.parametrize("form", ["stable", "paper"])
@pytest.mark.parametrize("reg", ["l2", "entropy"])
def test_each_head_is_a_single_head_normaliser_with_its_own_gamma(form, reg):
    scores, mask = _scores()
    g = torch.Generator().manual_seed(1)
    trans = torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
    if form == "paper" and reg == "l2":
        trans[0] = torch.tensor([[0.0, 0.0], [-3.0, -3.0]])  # attending costs 10γ on head 0: its rows die
    m = _learned(form, reg, trans)
    w = m(scores, mask)
    rows, dead, _ = m.pop_fallback_counts()
    for h, gamma in enumerate(HEAD_GAMMAS):
        single = ViterbiNormalizer(1, reg, gamma=gamma, form=form).double()
        with torch.no_grad():
            _param(single).copy_(trans[h:h + 1] if form == "stable" else trans[h:h + 1])
        ref = single(scores[:, h:h + 1], mask)
        torch.testing.assert_close(w[:, h:h + 1], ref, rtol=0, atol=1e-12)
    assert torch.all(w.masked_select(mask.expand_as(w)) == 0)
    if form == "paper" and reg == "l2":
        # dead rows fall back to softmax(s), as with a fixed γ (not to softmax(s/γ_h) of the scaled rows)
        assert dead > 0
        real = ~mask.expand_as(scores)
        soft = torch.softmax(scores[:, 0], -1)
        torch.testing.assert_close(w[:, 0], soft.masked_fill(~real[:, 0], 0.0), rtol=0, atol=1e-12)


def test_a_shared_matrix_has_one_gamma_for_every_head():
    scores, mask = _scores()
    m = _learned("stable", "l2", torch.eye(2, dtype=torch.float64)[None], gammas=[0.7])
    ref = ViterbiNormalizer(1, "l2", gamma=0.7).double()
    torch.testing.assert_close(m(scores, mask), ref(scores, mask), rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", ["stable", "paper"])
@pytest.mark.parametrize("reg", ["l2", "entropy"])
def test_gradcheck_through_log_gamma(form, reg):
    g = torch.Generator().manual_seed(3)
    B, H, Q, S = 2, 3, 2, 5
    scores = torch.randn(B, H, Q, S, generator=g, dtype=torch.float64) * 2
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., 3:] = True
    trans = torch.randn(H, 2, 2, generator=g, dtype=torch.float64) * 0.5
    log_gamma = torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64).log()
    m = ViterbiNormalizer(H, reg, form=form, gamma_mode="learned").double()
    name = "transitions" if form == "paper" else "transitions_over_gamma"
    probe = torch.randn(B, H, Q, S, generator=g, dtype=torch.float64)

    def f(s, lg, t):
        w = torch.func.functional_call(m, {"log_gamma": lg, name: t}, (s, mask))
        return (w * probe).sum()

    inputs = (scores.requires_grad_(), log_gamma.requires_grad_(), trans.requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)
    (_, grad_lg, _) = torch.autograd.grad(f(*inputs), inputs)
    assert torch.all(grad_lg != 0)  # every head's γ is reached


def test_kappa_and_reports_use_each_heads_gamma():
    m = ViterbiNormalizer(2, "l2", form="paper", gamma_mode="learned").double()
    with torch.no_grad():
        m.log_gamma.copy_(torch.tensor([2.0, 0.5], dtype=torch.float64).log())
        m.transitions.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 2, dtype=torch.float64))  # ⟨T, K⟩ = 2
    [report] = coupling_report(torch.nn.ModuleDict({"norm": m}))
    assert report["gamma_mode"] == "learned" and report["gammas"] == [2.0, 0.5]
    assert report["kappa"] == [1.0, 4.0]  # 2/γ_h, not 2/γ
    # stable form: T_h = γ_h τ_h, so κ_h = κ(τ_h) whatever γ_h
    s = _learned("stable", "l2", torch.eye(2, dtype=torch.float64).expand(4, 2, 2) * 0.75)
    assert coupling_report(torch.nn.ModuleDict({"n": s}))[0]["kappa"] == [1.5] * 4
    torch.testing.assert_close(chain_coupling(s.effective_transitions().detach() / s.matrix_gammas().detach()
                                              .view(-1, 1, 1)), torch.full((4,), 1.5, dtype=torch.float64))
    fixed = coupling_report(torch.nn.ModuleDict({"n": ViterbiNormalizer(2, "l2")}))[0]
    assert fixed["gamma_mode"] == "fixed" and fixed["gammas"] == [10.0, 10.0] and fixed["kappa"] == [2.0, 2.0]


def test_fairseq_logs_gamma_and_kappa_per_head():
    pytest.importorskip("fairseq")
    from fairseq.logging import metrics

    from structattn_fairseq.attention_options import log_attention_metrics

    m = ViterbiNormalizer(2, "l2", form="paper", gamma_mode="learned")
    with torch.no_grad():
        m.log_gamma.copy_(torch.tensor([2.0, 0.5]).log())
        m.transitions.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 2))
    m(torch.randn(1, 2, 3, 4))
    with metrics.aggregate() as agg:
        log_attention_metrics([None, m])
    logged = agg.get_smoothed_values()
    assert logged["gamma_L1H0"] == pytest.approx(2.0) and logged["gamma_L1H1"] == pytest.approx(0.5)
    assert logged["kappa_L1H0"] == pytest.approx(1.0) and logged["kappa_L1H1"] == pytest.approx(4.0)
    assert logged["gamma"] == pytest.approx(1.25)
    fixed = ViterbiNormalizer(2, "l2")
    fixed(torch.randn(1, 2, 3, 4))
    with metrics.aggregate() as agg:
        log_attention_metrics([fixed])
    assert "gamma" not in agg.get_smoothed_values() and "kappa_L0H1" in agg.get_smoothed_values()


def test_scaled_gamma_starts_at_the_heads_score_scale_once():
    scores, mask = _scores(scale=(0.5, 3.0, 10.0, 40.0))
    m = ViterbiNormalizer(4, "l2", gamma=2.0, gamma_mode="scaled").double()
    m.eval()
    m(scores, mask)  # evaluation does not set γ from the scores
    torch.testing.assert_close(m.matrix_gammas().detach(), torch.full((4,), 2.0, dtype=torch.float64))
    m.train()
    m(scores, mask)
    real = ~mask.expand_as(scores)
    x = scores.masked_fill(~real, float("nan"))
    var = (x - x.nanmean(-1, keepdim=True)).pow(2).nanmean(-1)  # population variance of each row's real scores
    sigma = var.mean((0, 2)).sqrt()
    torch.testing.assert_close(m.matrix_gammas().detach(), 2.0 * sigma)
    assert bool(m.gamma_scaled)
    before = m.log_gamma.detach().clone()
    m(scores * 100, mask)  # only the first training batch sets it
    torch.testing.assert_close(m.log_gamma.detach(), before, rtol=0, atol=0)
    # a reloaded scaled model keeps its γ (the flag is in the state dict)
    again = ViterbiNormalizer(4, "l2", gamma=2.0, gamma_mode="scaled").double()
    again.load_state_dict(m.state_dict())
    again.train()
    again(scores * 100, mask)
    torch.testing.assert_close(again.log_gamma.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["learned", "scaled"])
def test_fixed_gamma_state_dicts_load_as_before(mode):
    """A fixed-γ normaliser's state dict (every checkpoint written before gamma_mode existed) has no log γ; it
    loads strictly into a fixed model as before, and into a learned/scaled one as the same model (γ = its γ)."""
    scores, mask = _scores()
    old = ViterbiNormalizer(4, "l2").double()
    with torch.no_grad():
        old.transitions_over_gamma.copy_(torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(5)))
    state = old.state_dict()
    assert set(state) == {"transitions_over_gamma"}
    fixed = ViterbiNormalizer(4, "l2").double()
    fixed.load_state_dict(state)
    new = ViterbiNormalizer(4, "l2", gamma_mode=mode).double()
    new.load_state_dict(dict(state))
    new.train()  # scaled: the loaded γ is not reset from the scores
    for m in (fixed, new):
        torch.testing.assert_close(m(scores, mask), old(scores, mask), rtol=0, atol=1e-12)
    torch.testing.assert_close(new.matrix_gammas().detach(), torch.full((4,), 10.0, dtype=torch.float64))


def test_options_parse_and_refuse():
    assert options.resolve_options("viterbi", "l2", gamma_mode="learned").gamma_mode == "learned"
    with pytest.raises(ValueError, match="--attention-gamma-mode must be one of fixed, learned, scaled"):
        options.resolve_options("viterbi", gamma_mode="relative")
    with pytest.raises(ValueError, match="multi-head"):
        options.build_from_options(options.resolve_options("viterbi", gamma_mode="learned"), 3, 3)
    n = options.build_normalizer(options.resolve_options("viterbi", "l2", gamma_mode="scaled"), 4)
    assert n.gamma_mode == "scaled" and n.gamma == options.SCALED_GAMMA and n.log_gamma.shape == (4,)
    with pytest.raises(ValueError, match="gamma_mode must be one of"):
        ViterbiNormalizer(2, gamma_mode="free")


# ---- through the real fairseq CLI --------------------------------------------------------------------------------


def _head_zeros(checkpoint, data):
    """% exact zeros of every decoder layer's cross-attention heads over the teacher-forced validation set."""
    from fairseq import checkpoint_utils, utils

    from fairseq_helpers import USER_DIR

    utils.import_user_module(argparse.Namespace(user_dir=str(USER_DIR)))
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)],
                                                                    arg_overrides={"data": str(data)})
    model = models[0].eval()
    task.load_dataset("valid")
    counts = []
    for layer in model.decoder.layers:
        att, seen = layer.encoder_attn, []
        counts.append(seen)

        def hook(scores, mask, orig=att.normalize, seen=seen):
            w = orig(scores, mask)
            seen.append((((w == 0) & ~mask).sum((0, 2, 3)), (~mask).sum((0, 2, 3))))
            return w
        att.normalize = hook
    with torch.no_grad():
        for sample in task.get_batch_iterator(task.dataset("valid"), max_sentences=64).next_epoch_itr(shuffle=False):
            model(**sample["net_input"])
    return model, torch.cat([sum(z for z, _ in seen) / sum(n for _, n in seen) for seen in counts])


@pytest.mark.slow
def test_toy_training_scaled_gamma_makes_l2_heads_sparser(tmp_path):
    pytest.importorskip("fairseq")
    from fairseq_helpers import USER_DIR, make_toy_data, parse_log, preprocess, run_clis

    make_toy_data(tmp_path / "raw", task="reverse", n_train=600, n_valid=60, n_test=4)
    preprocess(tmp_path / "raw", tmp_path / "bin")
    common = [tmp_path / "bin", "--user-dir", USER_DIR, "--arch", "structattn_transformer_tiny", "--dropout", "0",
              "--attention", "viterbi", "--attention-reg", "l2", "--optimizer", "adam", "--lr", "0.005",
              "--clip-norm", "1.0", "--batch-size", "32", "--max-update", "100", "--seed", "1", "--cpu",
              "--num-workers", "0", "--no-progress-bar", "--log-format", "json", "--log-interval", "10",
              "--no-epoch-checkpoints", "--no-save-optimizer-state", "--criterion", "cross_entropy",
              "--validate-interval", "1000", "--validate-interval-updates", "100"]
    runs = {mode: tmp_path / f"ck-{mode}" for mode in ("fixed", "scaled")}
    procs = run_clis([("train", [*common, "--attention-gamma-mode", mode, "--save-dir", save])
                      for mode, save in runs.items()])
    logs = {mode: parse_log(p.stdout) for mode, p in zip(runs, procs)}
    valid = logs["scaled"]["valid"][-1]
    assert all(f"valid_gamma_L{l}H{h}" in valid for l in range(2) for h in range(4))
    assert "valid_gamma" not in logs["fixed"]["valid"][-1]
    zeros = {}
    for mode, save in runs.items():
        model, zeros[mode] = _head_zeros(save / "checkpoint_last.pt", tmp_path / "bin")
        gammas = torch.cat([layer.encoder_attn.normalizer.matrix_gammas().detach() for layer in model.decoder.layers])
        if mode == "fixed":
            assert torch.all(gammas == options.PAPER_GAMMA["l2"])
        else:  # started at the heads' score scale (O(1) for q·k/√d), far below the paper's 10
            assert torch.all(gammas < 2.0), gammas
    print({m: [round(100 * float(z), 1) for z in zs] for m, zs in zeros.items()})
    # measured 2026-12-03 (seed 1, 100 updates, 8 heads): fixed 1.1–14.0 % zeros per head (mean 7.1 %), scaled
    # 27.8–37.6 % (mean 31.7 %); asserted with room to spare: +15 points on the mean, every scaled head above
    # every fixed one
    assert zeros["scaled"].mean() > zeros["fixed"].mean() + 0.15, zeros
    assert zeros["scaled"].min() > zeros["fixed"].max(), zeros


@pytest.mark.slow
def test_old_transformer_checkpoint_loads_with_a_fixed_gamma(tmp_path):
    """A structattn_transformer checkpoint whose options do not mention --attention-gamma-mode (written before it
    existed) builds the fixed-γ model, loads strictly and computes what it computed."""
    pytest.importorskip("fairseq")
    from fairseq import checkpoint_utils, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_helpers import USER_DIR, make_toy_data, preprocess

    utils.import_user_module(argparse.Namespace(user_dir=str(USER_DIR)))
    make_toy_data(tmp_path / "raw", n_train=20, n_valid=4, n_test=2)
    preprocess(tmp_path / "raw", tmp_path / "bin")
    from fairseq import options as fairseq_options

    parser = fairseq_options.get_training_parser()
    args = fairseq_options.parse_args_and_arch(parser, [str(tmp_path / "bin"), "--user-dir", str(USER_DIR), "--arch",
                                                        "structattn_transformer_tiny", "--attention-reg", "l2"])
    del args.attention_gamma_mode  # as an old checkpoint records them
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    norms = [layer.encoder_attn.normalizer for layer in model.decoder.layers]
    assert all(n.gamma_mode == "fixed" and not hasattr(n, "log_gamma") for n in norms)
    assert not any("log_gamma" in k or "gamma_scaled" in k for k in model.state_dict())
    path = tmp_path / "old.pt"
    checkpoint_utils.torch_persistent_save({"cfg": cfg, "model": model.state_dict(), "args": None,
                                            "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                                                                  "lr_scheduler_state": {}, "num_updates": 0}],
                                            "extra_state": {}}, str(path))
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)],
                                                                 arg_overrides={"data": str(tmp_path / "bin")})
    loaded = models[0].eval()
    model.eval()
    src = torch.tensor([[4, 5, 6, 2]])
    prev = torch.tensor([[2, 6, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, torch.tensor([4]), prev)[0], model(src, torch.tensor([4]), prev)[0])
    assert all(layer.encoder_attn.normalizer.gamma_mode == "fixed" for layer in loaded.decoder.layers)
