"""recipes/timeseries/run.py at a tiny size: DTW_Ω barycentres of the Trace series that tslearn bundles.

Needs tslearn (the data) and matplotlib (the figures); under CI=true their absence fails the test instead of
skipping it."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _need(module: str):
    if os.environ.get("CI") == "true":
        return __import__(module, fromlist=["_"])
    return pytest.importorskip(module)


def _load():
    spec = importlib.util.spec_from_file_location("timeseries_run", ROOT / "recipes" / "timeseries" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dataset_is_bundled_and_checked():
    _need("tslearn")
    run = _load()
    Xtr, ytr, Xte, yte = run.load_dataset("Trace", downsample=2)
    assert Xtr.shape == (100, 137) and Xte.shape == (100, 137)
    assert sorted(torch.unique(ytr).tolist()) == [1, 2, 3, 4] and Xtr.dtype == torch.float64
    full = run.load_dataset("Trace", downsample=1)[0]
    torch.testing.assert_close(Xtr[:, 0], full[:, :2].mean(1))  # the averaging of consecutive samples


def test_discrepancy_is_soft_dtw_of_the_squared_cost():
    """D_{−H}(z, x) = −DTW_{−H}(−C) is tslearn's soft-DTW with the squared Euclidean cost (an oracle no one here
    wrote)."""
    tslearn_metrics = _need("tslearn.metrics")
    run = _load()
    g = torch.Generator().manual_seed(0)
    z, X = torch.randn(9, generator=g, dtype=torch.float64), torch.randn(3, 11, generator=g, dtype=torch.float64)
    ours = run.discrepancy(z, X, "entropy", 0.5)
    ref = [tslearn_metrics.soft_dtw(z.numpy()[:, None], x.numpy()[:, None], gamma=0.5) for x in X]
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_tiny_run_writes_sane_outputs(tmp_path):
    _need("tslearn")
    _need("matplotlib")
    run = _load()
    res = run.main(["--downsample", "11", "--max-per-class", "3", "--test-limit", "12", "--iters", "4",
                    "--gammas", "0.1", "1", "--seeds", "0", "--seed-gammas", "1", "--out", str(tmp_path)])
    for name in ("RESULTS.md", "results.json", "barycentres.png", "alignments.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "results.json").read_text())["length"] == 25
    md = (tmp_path / "RESULTS.md").read_text()
    assert "Nearest-centroid accuracy" in md and "exact zeros" in md and "--max-per-class 3" in md
    # L-BFGS from the Euclidean mean never ends above where it started (it only accepts decreasing steps), and
    # strictly decreases on at least one class for each (Ω, γ).
    for reg in ("entropy", "l2"):
        for gamma in (0.1, 1.0):
            rs = [r for r in res["runs"] if r["reg"] == reg and r["gamma"] == gamma and r["init"] == "mean"]
            assert len(rs) == 4
            assert all(r["F_final"] <= r["F_init"] + 1e-12 for r in rs)
            assert any(r["F_final"] < r["F_init"] - 1e-6 for r in rs)
    # ℓ2 alignments have exact zeros, −H ones none at these sizes; every accuracy is a proportion.
    assert res["sparsity"]["l2 0.1"]["zeros_pct"] > 10.0
    assert res["sparsity"]["entropy 1"]["zeros_pct"] == 0.0
    assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
    assert {"euclidean mean, Euclidean distance", "l2 1 0, hard DTW", "entropy 0.1 mean, own D"} <= set(res["accuracy"])
