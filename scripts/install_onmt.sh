#!/usr/bin/env bash
# Install OpenNMT-py into the active Python environment next to the torch already there, without touching torch
# (the counterpart of scripts/install_fairseq.sh). OpenNMT-py 3.5.1, the last release, declares torch<2.3, so pip
# would replace torch 2.13; instead OpenNMT-py is installed with --no-deps, then the packages it imports (the
# `onmt` extra of pyproject.toml) with torch and numpy pinned to the installed versions.
#
# Checked: OpenNMT-py 3.5.1 with torch 2.13 (CPU) on CPython 3.11. Another torch or Python still installs, with a
# warning. Not installed (OpenNMT imports them only for features structattn does not use): tensorboard (-tensorboard),
# ctranslate2 (LM priors, ct2 inference), flask/waitress (onmt_server).
# Usage: bash scripts/install_onmt.sh   (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
py="${PYTHON:-python}"
ONMT_VERSION=3.5.1
CHECKED_TORCH=2.13
CHECKED_PYTHON=3.11
# The `onmt` extra of pyproject.toml (tests/test_onmt_install.py keeps the two lists equal).
DEPS=(configargparse "pyonmttok>=1.37,<2" pyyaml sacrebleu regex rapidfuzz pyahocorasick fasttext-wheel spacy)

if ! torch_version=$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  echo "install_onmt.sh: torch is not importable with $py; install torch first (pip install torch==2.13.0)" >&2
  exit 1
fi
numpy_version=$("$py" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || true)
py_version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$torch_version" in
  "$CHECKED_TORCH".*) ;;
  *) echo "WARNING: torch $torch_version: structattn's OpenNMT-py route was checked with torch $CHECKED_TORCH" \
          "(OpenNMT-py $ONMT_VERSION itself declares torch<2.3); installing anyway" >&2 ;;
esac
[ "$py_version" = "$CHECKED_PYTHON" ] || echo "WARNING: Python $py_version: checked with $CHECKED_PYTHON" >&2

installed=$("$py" -c 'import importlib.metadata as m; print(m.version("OpenNMT-py"))' 2>/dev/null || true)
if [ "$installed" = "$ONMT_VERSION" ]; then
  echo "OpenNMT-py $ONMT_VERSION already installed"
else
  [ -z "$installed" ] || echo "WARNING: replacing OpenNMT-py $installed with $ONMT_VERSION (the version checked)" >&2
  "$py" -m pip install -q --no-deps "OpenNMT-py==$ONMT_VERSION"
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"
[ -z "$numpy_version" ] || echo "numpy==$numpy_version" >>"$constraints"
# pip's resolver then lists what OpenNMT-py 3.5.1 declares and we leave out (torch<2.3, tensorboard, ...): expected,
# so those lines are dropped from its output; any real failure still stops the script.
"$py" -m pip install -q -c "$constraints" "${DEPS[@]}" 2>&1 \
  | { grep -v -E "^(ERROR: pip's dependency resolver|opennmt-py $ONMT_VERSION requires)" || true; }

"$py" - <<'EOF'
import warnings
warnings.filterwarnings("ignore", category=FutureWarning)
import onmt, onmt.bin.build_vocab, onmt.bin.train, onmt.bin.translate, torch
print(f"OpenNMT-py {onmt.__version__} installed next to torch {torch.__version__} "
      "(use structattn-onmt-train / structattn-onmt-translate; see docs/onmt.md)")
EOF
