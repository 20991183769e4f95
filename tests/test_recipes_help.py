"""Every recipe script answers --help on a fresh clone, before any set-up: without a python that imports
structattn (none at all, or one that cannot import it), with no traceback and without creating anything."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# script → the usage line it prints (the per-corpus run.sh files forward to a driver)
SCRIPTS = {
    "recipes/offline_fr_en.sh": "usage: bash recipes/offline_fr_en.sh",
    "recipes/online_nmt.sh": "usage: bash recipes/online_nmt.sh",
    "recipes/quickstart.sh": "usage: bash recipes/quickstart.sh",
    "recipes/bible_fr_en/run.sh": "usage: bash recipes/offline_fr_en.sh",
    "recipes/libreoffice_fr_en/run.sh": "usage: bash recipes/offline_fr_en.sh",
    "recipes/wmt14_fr_en/run.sh": "usage: bash recipes/online_nmt.sh",
    "recipes/iwslt14_de_en/run.sh": "usage: bash recipes/online_nmt.sh",
}


def test_every_recipe_script_is_listed():
    found = {str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*.sh")} | {
        str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*/run.sh")}
    assert found - {"recipes/lib.sh"} == set(SCRIPTS)


def _bare_env(tmp_path, python: str | None) -> dict:
    """A fresh clone's environment: no virtual environment, no PYTHONPATH, PATH without the running python's
    folder; ``python`` (and ``PYTHON``, which the recipes use) replaced by ``python`` if given."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    venv_bin = str(pathlib.Path(sys.executable).parent)
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != venv_bin]
    env = {"HOME": str(tmp_path), "PATH": os.pathsep.join([str(bindir)] + path), "LANG": "C.UTF-8",
           "STRUCTATTN_VENV": str(tmp_path / "venv")}
    if python is not None:
        shim = bindir / "python"
        shim.write_text(f"#!/bin/sh\nexec {python} \"$@\"\n")
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return env


@pytest.mark.parametrize("python", [
    None,  # whatever `python` the bare PATH has, if any
    "/bin/false",  # a python that fails outright
    f"{sys.executable} -I -S",  # a python that runs but cannot import structattn (nor torch): no site-packages
])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_before_setup(script, python, tmp_path):
    env = _bare_env(tmp_path, python)
    if python is None:
        probe = subprocess.run(["bash", "-c", "python -c 'import structattn' 2>/dev/null"], env=env, cwd=REPO)
        assert probe.returncode != 0, "the bare PATH's python imports structattn: not a fresh set-up"
    r = subprocess.run(["bash", script, "--help"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(SCRIPTS[script]), r.stdout[:200]
    assert "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr
    assert "--variants" in r.stdout and "(listed once structattn is installed)" in r.stdout
    assert not (tmp_path / "venv").exists()  # quickstart.sh set nothing up


def test_help_lists_the_variants_once_installed():
    """With the environment that imports structattn, the same --help lists the variant table's names."""
    from structattn.options import PAPER_GAMMA

    r = subprocess.run(["bash", "recipes/offline_fr_en.sh", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert "subset of: softmax sparsemax viterbi-entropy viterbi-l2" in r.stdout
    assert f"the paper's {PAPER_GAMMA['entropy']:g}" in r.stdout and f"the paper's {PAPER_GAMMA['l2']:g}" in r.stdout
