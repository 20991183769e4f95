"""The OpenNMT-py install route and packaging (issue 16): runs without OpenNMT-py installed."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install_onmt.sh"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_install_script_installs_the_onmt_extra():
    text = SCRIPT.read_text()
    deps = re.search(r"^DEPS=\((.*?)\)$", text, re.M).group(1)
    script_deps = [d.strip('"') for d in re.findall(r'"[^"]+"|\S+', deps)]
    assert script_deps == _pyproject()["project"]["optional-dependencies"]["onmt"]
    assert 'pip install -q --no-deps "OpenNMT-py==$ONMT_VERSION"' in text and "ONMT_VERSION=3.5.1" in text
    assert '-c "$constraints"' in text  # torch (and numpy) pinned to the installed versions
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_ci_installs_the_onmt_route():
    assert "bash scripts/install_onmt.sh" in (ROOT / ".ci" / "run").read_text()


def test_console_scripts_and_package():
    project = _pyproject()
    scripts = project["project"]["scripts"]
    assert scripts["structattn-onmt-train"] == "structattn_onmt.cli:train_main"
    assert scripts["structattn-onmt-translate"] == "structattn_onmt.cli:translate_main"
    assert "structattn_onmt" in project["tool"]["setuptools"]["packages"]["find"]["include"]


def test_core_and_glue_import_without_opennmt():
    """structattn never imports OpenNMT; the glue imports it only when installed into OpenNMT (install/CLIs)."""
    code = ("import sys, structattn, structattn.attention, structattn.options, structattn.export, "
            "structattn.report.cli, structattn_onmt, structattn_onmt.cli, structattn_onmt.options, "
            "structattn_onmt.patches, structattn_onmt.dump\n"
            "bad = sorted(m for m in sys.modules if m == 'onmt' or m.startswith('onmt.') or m.startswith('fairseq'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_readme_and_docs_describe_the_route():
    readme = (ROOT / "README.md").read_text()
    assert "## Train and translate with OpenNMT-py" in readme
    for needle in ("bash scripts/install_onmt.sh", "structattn-onmt-train", "structattn-onmt-translate",
                   "onmt_build_vocab", "-dump_attention", "docs/onmt.md"):
        assert needle in readme, needle
    doc = (ROOT / "docs" / "onmt.md").read_text()
    for needle in ("global_attention_function", "attention_reg", "attention_gamma", "structattn_onmt/patches.py",
                   "world_size", "-train_from", "-attn_debug", "-report_align", "eole"):
        assert needle in doc, needle
