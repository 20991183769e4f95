"""The benchmark suite's machinery (not its timings): every method runs, all Viterbi variants compute the same
weights, and the report is written. Tiny shapes; timing targets live in benchmarks/RESULTS.md, not in tests."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_run():
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_methods_agree_and_report_is_written(tmp_path):
    run = _load_run()
    torch.manual_seed(0)
    steps = run.build_steps(B=3, T=6, H=8, seed=0)
    names = {s.name for s in steps}
    for n in ("softmax", "sparsemax", "viterbi -H", "viterbi l2", "viterbi -H [reference backend]",
              "viterbi l2 [naive tensor-API]"):
        assert n in names
    assert run.check_agreement(steps) < 1e-4
    for s in steps:
        grads = s.run()
        assert all(torch.isfinite(g).all() for g in grads), s.name
    out = tmp_path / "R.md"
    run.main(["--quick", "--no-e2e", "--reps", "1", "--hidden", "8", "--output", str(out)])
    text = out.read_text()
    assert "torch.set_num_threads(1)" in text and "not measured yet" in text and "| viterbi -H |" in text


def test_naive_anchor_matches_library_gradients():
    """The naive anchor (autograd through the recursion) is a real Vit_Ω: its gradient equals the marginals."""
    run = _load_run()
    from structattn import viterbi_marginals

    theta = torch.randn(4, 7, 2, 2, dtype=torch.float64, requires_grad=True)
    for reg in ("entropy", "l2"):
        (E,) = torch.autograd.grad(run._naive_value(theta, reg, 0.7).sum(), theta)
        torch.testing.assert_close(E, viterbi_marginals(theta.detach(), reg=reg, gamma=0.7), rtol=1e-10, atol=1e-12)
