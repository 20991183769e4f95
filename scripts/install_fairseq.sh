#!/usr/bin/env bash
# Install fairseq into the active Python environment, the route that works on Python 3.11 + torch 2.13:
# official fairseq 0.12.2 does not import on 3.11 (a dataclass mutable default), so we build the
# `fairseq-fixed==0.12.3.1` sdist against the already-installed torch (--no-build-isolation), and install it
# with --no-deps (it declares torchaudio, which it does not need to import) plus its real dependencies.
# The built wheel is cached in $STRUCTATTN_WHEEL_CACHE (default ~/.cache/structattn/wheels): ~4 min once.
set -euo pipefail
cache="${STRUCTATTN_WHEEL_CACHE:-$HOME/.cache/structattn/wheels}"
mkdir -p "$cache"
py="${PYTHON:-python}"
tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if "$py" -c 'import fairseq' 2>/dev/null; then
  echo "fairseq already importable: $("$py" -c 'import fairseq; print(fairseq.__file__)')"
  exit 0
fi
whl=$(ls "$cache"/fairseq_fixed-0.12.3.1-"$tag"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$whl" ]; then
  echo "building fairseq-fixed==0.12.3.1 (one-off, a few minutes) into $cache"
  "$py" -m pip install -q numpy cython setuptools wheel
  "$py" -m pip wheel --no-build-isolation --no-deps -w "$cache" fairseq-fixed==0.12.3.1
  whl=$(ls "$cache"/fairseq_fixed-0.12.3.1-"$tag"-*.whl | head -n 1)
fi
"$py" -m pip install -q --no-deps "$whl"
"$py" -m pip install -q -c "$(dirname "$0")/../constraints.txt" hydra-core omegaconf regex "sacrebleu>=2" tqdm bitarray scikit-learn packaging cffi
"$py" -c 'import fairseq; print("fairseq", fairseq.__version__)'
