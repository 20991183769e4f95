#!/usr/bin/env bash
# The main job in one command, from a fresh clone:
#
#   bash recipes/quickstart.sh
#
# 1. set-up: a virtual environment (.venv, or $STRUCTATTN_VENV) with torch 2.13 (CPU), fairseq (via
#    scripts/install_fairseq.sh) and structattn with its plot/recipes extras — skipped where already present;
# 2. the quick preset of the offline Bible fr→en recipe (recipes/offline_fr_en.sh --size quick): softmax and
#    Viterbi ℓ2 attention trained side by side on the two cores (the Bible verses of at most 60 subword tokens,
#    a 128-unit LSTM, 3,000 updates each with an 800-update warm-up and a linear decay: ~11 min of training on a
#    quiet 2-core machine), then a seeded random 200
#    of the 1,280 test verses translated, scored (sacrebleu BLEU/chrF,
#    paired bootstrap against softmax) and drawn (HTML attention report); the table says how sparse and how
#    alive the structured attention is (exact zeros, fallback rows, learned transitions T/γ).
#
# Extra arguments go to recipes/offline_fr_en.sh, e.g. all four attentions, or three seeds and their spread:
#   bash recipes/quickstart.sh --variants "softmax sparsemax viterbi-entropy viterbi-l2"
#   bash recipes/quickstart.sh --seeds "1 2 3"
# Everything is written under recipes/bible_fr_en/work/quickstart/ (git-ignored); re-running skips finished steps.
{
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for arg in "$@"; do  # --help: before any set-up (a fresh clone has no environment yet)
  case "$arg" in -h|--help)
    echo "usage: bash recipes/quickstart.sh [options of recipes/offline_fr_en.sh]"
    echo
    echo "Sets up .venv (or \$STRUCTATTN_VENV) unless an environment is active, then runs"
    echo "bash recipes/offline_fr_en.sh --size quick --work recipes/bible_fr_en/work/quickstart [options]:"
    echo
    exec bash recipes/offline_fr_en.sh --help ;;
  esac
done
export PIP_DISABLE_PIP_VERSION_CHECK=1
t0=$(date +%s)
venv="${STRUCTATTN_VENV:-.venv}"
if [ -z "${VIRTUAL_ENV:-}" ]; then  # inside an activated environment: install into that one
  [ -x "$venv/bin/python" ] || { echo "== creating $venv"; python3 -m venv "$venv"; }
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi
if ! python -c 'import torch' 2>/dev/null; then
  echo "== installing torch 2.13 (CPU) and build tools"
  python -m pip install -q --upgrade pip setuptools wheel
  python -m pip install -q -c constraints.txt torch numpy cython
fi
bash scripts/install_fairseq.sh
if ! python -c 'import structattn, sentencepiece, sacremoses, sacrebleu, matplotlib' 2>/dev/null \
    || ! command -v structattn-report >/dev/null; then
  echo "== installing structattn with the plot and recipes extras"
  python -m pip install -q -c constraints.txt -e ".[plot,recipes]"
fi
echo "== set-up took $(( $(date +%s) - t0 ))s; running the quick Bible fr→en recipe"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
bash recipes/offline_fr_en.sh --size quick --work recipes/bible_fr_en/work/quickstart "$@"
echo
echo "== quickstart finished in $(( $(date +%s) - t0 ))s"
echo "   results table : recipes/bible_fr_en/work/quickstart/RESULTS.md"
[ -f recipes/bible_fr_en/work/quickstart/report/index.html ] && \
  echo "   attention maps: recipes/bible_fr_en/work/quickstart/report/index.html"
echo "   longer runs   : bash recipes/bible_fr_en/run.sh --size converge --stop-hours 1.5   (the README's BLEU table; several hours)"
echo "                   bash recipes/bible_fr_en/run.sh --size full   (all data, paper-sized training; many hours)"
exit 0
}
