#!/usr/bin/env bash
# Reproduce fairseq-train's abort at exit (SIGABRT, exit 134, "terminate called without an active exception")
# after a training that stops in the middle of an epoch, and count exit statuses over N runs.
#
#   bash scripts/repro_exit_abort.sh [--runs N] [--plugin | --no-plugin] [--max-update "1 2 3 7"] [--work DIR]
#                                    [--data-buffer-size K]
#
# Each run trains a tiny LSTM on a toy copy task (1000 sentences, batches of 64: ~16 batches an epoch) and stops
# after --max-update updates, i.e. mid-epoch, cycling through the given values. --no-plugin (default) runs
# fairseq's own `--arch lstm`; --plugin loads the plugin with `--user-dir` (it carries the fix, see
# structattn_fairseq/fairseq_patches.py) and trains `--arch structattn_lstm`. The root cause is written up in
# docs/reliability.md ("fairseq-train aborting at exit"). Prints one line per run and a tally; exits 1 if any
# run exited non-zero.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs=50 plugin=0 updates="1 2 3 7" work="" buffer=""
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --plugin) plugin=1; shift ;;
    --no-plugin) plugin=0; shift ;;
    --max-update) updates="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --data-buffer-size) buffer="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "error: --runs must be a positive integer, got '$runs'" >&2; exit 2; }
for u in $updates; do
  [[ "$u" =~ ^[1-9][0-9]*$ ]] || { echo "error: --max-update values must be positive integers, got '$u'" >&2; exit 2; }
done
python -c 'import fairseq' 2>/dev/null || { echo "error: fairseq is not importable (bash scripts/install_fairseq.sh)" >&2; exit 2; }
work="${work:-$(mktemp -d -t structattn-abort-XXXXXX)}"
mkdir -p "$work"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" CUDA_VISIBLE_DEVICES=""

if [ ! -f "$work/bin/dict.src.txt" ]; then
  python - "$work/raw" <<'PY'
import os, random, sys
raw = sys.argv[1]; os.makedirs(raw, exist_ok=True)
rng = random.Random(0)
words = [f"w{i}" for i in range(20)]
for split, n in (("train", 1000), ("valid", 20)):
    sents = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 20))) for _ in range(n)]
    open(f"{raw}/{split}.src", "w").write("\n".join(sents) + "\n")
    open(f"{raw}/{split}.tgt", "w").write("\n".join(s.upper() for s in sents) + "\n")
PY
  python -m fairseq_cli.preprocess --source-lang src --target-lang tgt --trainpref "$work/raw/train" \
    --validpref "$work/raw/valid" --destdir "$work/bin" --workers 1 >"$work/preprocess.log" 2>&1
fi

model=(--arch lstm --encoder-embed-dim 32 --encoder-hidden-size 32 --decoder-embed-dim 32 --decoder-hidden-size 32
       --decoder-out-embed-dim 32)
[ "$plugin" = 1 ] && model=(--user-dir "$repo/structattn_fairseq" --arch structattn_lstm --attention viterbi --attention-reg l2
                            --encoder-embed-dim 32 --decoder-embed-dim 32 --decoder-out-embed-dim 32)
extra=()
[ -n "$buffer" ] && extra=(--data-buffer-size "$buffer")
read -r -a ups <<<"$updates"
declare -A tally=()
echo "runs=$runs plugin=$plugin max-update cycle=(${updates}) work=$work"
for i in $(seq 1 "$runs"); do
  u=${ups[$(( (i - 1) % ${#ups[@]} ))]}
  rm -rf "$work/ck"
  set +e
  python -m fairseq_cli.train "$work/bin" "${model[@]}" --optimizer adam --lr 0.01 --batch-size 64 \
    --max-update "$u" --save-dir "$work/ck" --no-epoch-checkpoints --disable-validation --cpu --num-workers 0 \
    --dropout 0 "${extra[@]}" >"$work/run.log" 2>&1
  rc=$?
  set -e
  ckpt=missing
  [ -s "$work/ck/checkpoint_last.pt" ] && ckpt=written
  echo "run $i max-update $u exit $rc checkpoint $ckpt$( [ "$rc" != 0 ] && printf ' | %s' "$(tail -n 1 "$work/run.log")")"
  tally[$rc]=$(( ${tally[$rc]:-0} + 1 ))
done
summary=""
for rc in "${!tally[@]}"; do summary+=" exit $rc: ${tally[$rc]};"; done
echo "tally (plugin=$plugin, $runs runs):$summary"
[ "${#tally[@]}" = 1 ] && [ -n "${tally[0]:-}" ]
