"""The console commands' ``--version`` (one version, structattn.__version__), ``python -m structattn.report.cli``
and the progress display of structattn-plot / structattn-report."""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import structattn
from structattn.export import AttentionRecord, write_dump
from structattn.report.cli import main, plot_main, report_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
VERSION_LINE = f"structattn {structattn.__version__}"


def _console_scripts() -> dict[str, str]:
    """name → "module:function" of pyproject's [project.scripts] (read without tomllib: Python 3.10 has none)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, flags=re.M | re.S).group(1)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, flags=re.M))


def test_version_is_defined_once():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic\s*=\s*\[[^]]*"version"', text, flags=re.M)
    assert not re.search(r"^version\s*=", text.split("[project.optional-dependencies]")[0], flags=re.M)
    assert re.search(r'^version\s*=\s*\{\s*attr\s*=\s*"structattn.__version__"\s*\}', text, flags=re.M)
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", structattn.__version__)
    # the files that must repeat it (they cannot import it) do
    assert re.search(rf'^version: "{re.escape(structattn.__version__)}"$', (ROOT / "CITATION.cff").read_text(),
                     flags=re.M)
    assert f"version = {{{structattn.__version__}}}" in (ROOT / "README.md").read_text()
    assert f"## [{structattn.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_every_console_command_prints_its_version(name, capsys):
    module, _, function = _console_scripts()[name].partition(":")
    fn = getattr(importlib.import_module(module), function)
    try:
        code = fn(["--version"])
    except SystemExit as exc:  # argparse's version action exits
        code = exc.code
    assert code in (0, None), name
    assert capsys.readouterr().out.strip() == VERSION_LINE, name


def test_onmt_version_needs_no_onmt(capsys):
    """structattn-onmt-train/-translate answer --version (and OpenNMT's -version spelling) before importing
    OpenNMT-py: it is not imported afterwards if it was not before."""
    code = ("import sys; from structattn_onmt.cli import train_main, translate_main; "
            "assert train_main(['-version']) == 0 and translate_main(['--version']) == 0; "
            "print('onmt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [VERSION_LINE, VERSION_LINE, "False"]


def test_python_m_report_cli():
    run = [sys.executable, "-m", "structattn.report.cli"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    for command in ("stats", "plot", "report"):
        assert re.search(rf"^\s+{command}\s", out.stderr, flags=re.M), out.stderr
    out = subprocess.run(run + ["nonsense"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown command 'nonsense'" in out.stderr
    out = subprocess.run(run + ["plot", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == VERSION_LINE
    out = subprocess.run(run + ["stats"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "structattn-stats" in out.stderr  # the command's own usage error


def test_main_dispatches(tmp_path, capsys):
    dump = _dump(tmp_path, 2)
    assert main(["stats", str(dump)]) == 0
    assert "exact zeros" in capsys.readouterr().out
    assert main([]) == 2 and "usage: python -m structattn.report.cli" in capsys.readouterr().err


def _dump(tmp_path, n):
    recs = [AttentionRecord(id=i, nbest_rank=0, src_tokens=["a", "b", "</s>"], tgt_tokens=["x", "</s>"],
                            src_text="a b", hyp_text="x", attention=np.eye(2, 3, dtype=np.float32), score=0.0)
            for i in range(n)]
    return write_dump(tmp_path / "d.jsonl", {"arch": "structattn_lstm", "attention": "viterbi"}, recs)


@pytest.mark.parametrize("tqdm_installed", [True, False])
def test_progress_only_when_asked_or_on_a_terminal(tmp_path, capsys, monkeypatch, tqdm_installed):
    if tqdm_installed:
        pytest.importorskip("tqdm") if os.environ.get("CI") != "true" else importlib.import_module("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm → ImportError: the plain fallback
    dump = _dump(tmp_path, 12)
    assert plot_main([str(dump), "-o", str(tmp_path / "quiet")]) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest: no progress in test logs
    assert plot_main([str(dump), "-o", str(tmp_path / "loud"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "structattn-plot: images" in err and "12/12" in err
    if not tqdm_installed:
        assert [line for line in err.splitlines() if "images" in line][-1] == "structattn-plot: images 12/12"
    assert report_main([str(dump), "-o", str(tmp_path / "report"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "structattn-report: sentences" in err and "structattn-report: reading dumps" in err
    assert report_main([str(dump), "-o", str(tmp_path / "report2")]) == 0
    assert capsys.readouterr().err == ""
    assert len(os.listdir(tmp_path / "loud")) == 12
