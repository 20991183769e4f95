#!/usr/bin/env bash
# Online recipes (need internet): the paper's WMT14 fr↔en set-up and IWSLT14 de→en, with the structattn plugin.
#
#   WMT14 (Mensch & Blondel 2018, §5 + App. C.3): Europarl v7 + Common Crawl + News Commentary v9, Moses
#   tokenisation, sentences of ≤ 50 tokens, a random 1M-pair subset, word vocabularies of 50k (OpenNMT-py's
#   default), 2-layer 2×500 biLSTM encoder / 500 decoder with input feeding (--arch structattn_lstm_paper), SGD lr 1
#   decayed by 0.65 per epoch after epoch 8 up to epoch 15, batch 256, outputs < 100 tokens, the paper's γ per
#   regulariser (structattn.attention.PAPER_GAMMA);
#   valid newstest2013, test newstest2014 (sacrebleu's wmt14/full), detokenised BLEU.
#   IWSLT14 de→en: fairseq's split (valid = every 23rd training pair, test = dev2010 + tst2010-2012 + TEDX dev2012),
#   joint sentencepiece 10k, --arch structattn_lstm at width 256, Adam; or (--arch) a Transformer with structured
#   cross-attention per head (docs/transformer.md) trained with the settings of fairseq's IWSLT14 example.
# Steps, stamps and re-runs as in recipes/lib.sh (a step whose stamp holds its command is skipped, a changed
# setting re-runs it and what depends on it, training resumes from checkpoint_last.pt). Options: --help.
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
usage: bash recipes/online_nmt.sh --corpus wmt14|iwslt14 [options]

  --corpus NAME        wmt14 (paper set-up) | iwslt14 (de→en); set by recipes/{wmt14_fr_en,iwslt14_de_en}/run.sh
  --direction D        wmt14: fr-en (default) or en-fr; iwslt14: de-en only
  --variants "A B ..." subset of: $variants_all
                       (default: $default_variants, the paper's Table 3)
  --work DIR           working folder (default recipes/<corpus>_<direction>/work)
  --arch NAME          iwslt14: structattn_lstm (default, width 256) | structattn_transformer_iwslt_de_en (fairseq's
                       transformer_iwslt_de_en sizes) | structattn_transformer (Transformer-Base) |
                       structattn_transformer_tiny; Transformers share all embeddings and train with fairseq's IWSLT14
                       example settings (Adam, lr 5e-4, inverse_sqrt with 4000 warm-up updates, dropout 0.3, label
                       smoothing 0.1, 4096 tokens per batch). wmt14: the paper's structattn_lstm_paper only
  --subset N           wmt14 training pairs after the length filter (default 1000000; 0 = all)
  --epochs N           override the number of epochs (paper: 15)
  --threads N          torch CPU threads (default \$OMP_NUM_THREADS or all); fairseq uses a GPU when present
  --dry-run            print every command (downloads included) and exit
  --force              ignore the step stamps
EOF
}

default_variants="softmax viterbi-entropy viterbi-l2"
corpus="" direction="" variants="$default_variants" work="" subset=1000000 epochs="" arch="" dry_run=0 force=0
threads="${OMP_NUM_THREADS:-$(nproc)}"
py="${PYTHON:-python}"
invocation="bash recipes/online_nmt.sh$(printf ' %q' "$@")"
parse_options "--corpus --direction --variants --work --subset --epochs --threads --arch" "--dry-run --force" "$@"
case "$corpus" in
  wmt14) direction="${direction:-fr-en}"
    case "$direction" in fr-en|en-fr) ;; *) die "--direction for wmt14 must be fr-en or en-fr, not '$direction'" ;; esac
    arch="${arch:-structattn_lstm_paper}"
    [ "$arch" = structattn_lstm_paper ] || die "--arch for wmt14 must be structattn_lstm_paper (the paper's set-up; \
its separate 50k word vocabularies do not suit a Transformer's shared embeddings), not '$arch'" ;;
  iwslt14) direction="${direction:-de-en}"
    [ "$direction" = de-en ] || die "--direction for iwslt14 must be de-en, not '$direction'"
    arch="${arch:-structattn_lstm}"
    case "$arch" in structattn_lstm|structattn_transformer|structattn_transformer_iwslt_de_en|structattn_transformer_tiny) ;;
      *) die "--arch for iwslt14 must be structattn_lstm, structattn_transformer_iwslt_de_en, structattn_transformer or \
structattn_transformer_tiny, not '$arch'" ;; esac ;;
  "") die "--corpus is required (wmt14 or iwslt14)" ;;
  *) die "--corpus must be wmt14 or iwslt14, not '$corpus'" ;;
esac
[[ "$subset" =~ ^[0-9]+$ ]] || die "--subset must be a non-negative integer, not '$subset'"
[ -z "$epochs" ] || { [[ "$epochs" =~ ^[1-9][0-9]*$ ]] || die "--epochs must be a positive integer, not '$epochs'"; }
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer, not '$threads'"
check_variants "$variants"
gamma_entropy=$paper_gamma_entropy gamma_l2=$paper_gamma_l2  # the paper's γ; no --attention-form: the plugin's
attention_load "$variants"
plugin_load
src="${direction%-*}" tgt="${direction#*-}"
work="${work:-$here/${corpus}_${src}_${tgt}/work}"
export OMP_NUM_THREADS="$threads" PYTHONUNBUFFERED=1
if [ "$dry_run" = 0 ]; then mkdir -p "$work/stamps"; work="$(cd "$work" && pwd)"; fi
dl="$work/download" raw="$work/data/raw" tok="$work/data/tok" bin="$work/data/bin"
fetch() { # fetch NAME URL: resumable download with a progress bar
  step "download.$1" "mkdir -p '$dl' && curl -fL --retry 3 -C - --progress-bar -o '$dl/$1' '$2'"
}

# ---------------------------------------------------------------------------------------------------- data
if [ "$corpus" = wmt14 ]; then
  fetch europarl.tgz http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz
  fetch commoncrawl.tgz http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz
  fetch nc-v9.tgz http://www.statmt.org/wmt14/training-parallel-nc-v9.tgz
  step unpack "cd '$dl' && for f in europarl.tgz commoncrawl.tgz nc-v9.tgz; do tar xzf \$f; done"
  step extract "$py '$tools/online_corpus.py' wmt14 '$dl' --out '$raw'"
  # Test/valid come from sacrebleu's own copies (the BLEU reference is then exactly sacrebleu's).
  step testsets "sacrebleu -t wmt14/full -l $src-$tgt --echo src > '$raw/test.$src' && \
sacrebleu -t wmt14/full -l $src-$tgt --echo ref > '$raw/test.$tgt' && \
sacrebleu -t wmt13 -l $src-$tgt --echo src > '$raw/valid.$src' && sacrebleu -t wmt13 -l $src-$tgt --echo ref > '$raw/valid.$tgt'"
  # Pre-filter on raw words (never more than Moses tokens) to tokenise only a candidate pool, then the exact
  # filter on Moses tokens (≤ 50, App. C.3) and the 1M subset.
  pool=$(( subset > 0 ? subset * 13 / 10 : 0 ))
  step pool "$py '$tools/paper_setup.py' select --src '$raw/train.fr' --tgt '$raw/train.en' --max-len 50 --n $pool \
--out-src '$raw/pool.fr' --out-tgt '$raw/pool.en'"
  for l in fr en; do step "tok.pool.$l" "mkdir -p '$tok' && $py '$tools/textproc.py' tok --lang $l < '$raw/pool.$l' > '$tok/pool.$l'"; done
  step select "$py '$tools/paper_setup.py' select --src '$tok/pool.fr' --tgt '$tok/pool.en' --max-len 50 --n $subset \
--out-src '$tok/train.fr' --out-tgt '$tok/train.en'"
  for split in valid test; do for l in fr en; do
    step "tok.$split.$l" "$py '$tools/textproc.py' tok --lang $l < '$raw/$split.$l' > '$tok/$split.$l'"
  done; done
  # Word-level vocabularies of 50k per language, like OpenNMT-py's preprocess defaults.
  step preprocess "rm -rf '$bin' && fairseq-preprocess --source-lang $src --target-lang $tgt --trainpref '$tok/train' \
--validpref '$tok/valid' --testpref '$tok/test' --destdir '$bin' --nwordssrc 50000 --nwordstgt 50000 --workers $threads"
  arch_flags="--arch structattn_lstm_paper"
  train_flags="$($py "$tools/paper_setup.py" flags ${epochs:+--epochs $epochs}) --dropout 0.3 --criterion cross_entropy"
  gen_flags="--beam 5 --max-len-a 0 --max-len-b 100"
  spm_model=""
else
  fetch de-en.tgz http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz
  step unpack "cd '$dl' && tar xzf de-en.tgz"
  step extract "$py '$tools/online_corpus.py' iwslt14 '$dl/de-en' --out '$raw'"
  for split in train valid test; do for l in de en; do
    step "tok.$split.$l" "mkdir -p '$tok' && $py '$tools/textproc.py' tok --lang $l < '$raw/$split.$l' > '$tok/$split.$l'"
  done; done
  step spm-train "$py '$tools/textproc.py' spm-train --input '$tok/train.de' '$tok/train.en' --model-prefix '$tok/spm' \
--vocab-size 10000"
  for split in train valid test; do for l in de en; do
    step "spm.$split.$l" "$py '$tools/textproc.py' spm-encode --model '$tok/spm.model' < '$tok/$split.$l' > '$tok/$split.spm.$l'"
  done; done
  step preprocess "rm -rf '$bin' && fairseq-preprocess --source-lang de --target-lang en --trainpref '$tok/train.spm' \
--validpref '$tok/valid.spm' --testpref '$tok/test.spm' --destdir '$bin' --joined-dictionary --workers $threads"
  if [ "$arch" = structattn_lstm ]; then
    arch_flags="--arch structattn_lstm --encoder-embed-dim 256 --decoder-embed-dim 256 --decoder-out-embed-dim 256"
    train_flags="--optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.002 --lr-scheduler inverse_sqrt --warmup-updates 2000 \
--warmup-init-lr 1e-5 --clip-norm 1.0 --dropout 0.3 --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
--max-tokens 8000 --max-epoch ${epochs:-30}"
  else
    # fairseq's examples/translation IWSLT14 Transformer recipe; one joined dictionary, so all embeddings are shared.
    arch_flags="--arch $arch --share-all-embeddings"
    train_flags="--optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 0.0 --lr 5e-4 --lr-scheduler inverse_sqrt \
--warmup-updates 4000 --dropout 0.3 --weight-decay 0.0001 --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
--max-tokens 4096 --max-epoch ${epochs:-50}"
  fi
  gen_flags="--beam 5 --max-len-a 1.2 --max-len-b 10"
  spm_model="--model '$tok/spm.model'"
fi

data_done  # a changed data set moves the old models aside (recipes/lib.sh)

# ---------------------------------------------------------------------------------------------------- models
n_test=$( [ "$dry_run" = 1 ] && echo '$(wc -l < test)' || wc -l < "$raw/test.$src")
for v in $variants; do
  chain_start
  run="$work/runs/$v"
  train_step "train.$v" "mkdir -p '$run' && fairseq-train '$bin' --user-dir '$plugin' $arch_flags ${attention[$v]} $train_flags \
--seed 1 --log-format json --log-interval 100 --no-epoch-checkpoints --save-dir '$run/checkpoints' \
2>&1 | tee -a '$run/train.log' | $py '$tools/progress.py' --name $v"
  step "generate.$v" "fairseq-generate '$bin' --user-dir '$plugin' --task structattn_translation \
--path '$run/checkpoints/checkpoint_best.pt' --gen-subset test $gen_flags --batch-size 64 \
--required-batch-size-multiple 1 --dump-attention '$run/attention.jsonl' > '$run/generate.test.txt' 2> '$run/generate.log'"
  step "detok.$v" "$py '$tools/textproc.py' hyp --expected $n_test < '$run/generate.test.txt' \
| $py '$tools/textproc.py' detok --lang $tgt $spm_model > '$run/hyp.test.$tgt'"
  step "bleu.$v" "sacrebleu '$raw/test.$tgt' -i '$run/hyp.test.$tgt' -m bleu chrf -f json > '$run/score.json'"
  step "stats.$v" "structattn-stats '$v=$run/attention.jsonl' --json > '$run/attention_stats.json'"
  chain_end
done
summary_start
dumps=""; for v in $variants; do dumps="$dumps '$v=$work/runs/$v/attention.jsonl'"; done
step report "structattn-report $dumps -o '$work/report' --force --max-sentences 20"
step_always results "$py -m structattn.evaluation.results_table --work '$work' --variants $variants --out '$work/RESULTS.md' \
--corpus $corpus --direction $direction --src $src --ref-label $corpus --size paper --arch $arch \
--threads $threads --invocation $(printf '%q' "$invocation")"
[ "$dry_run" = 1 ] || cat "$work/RESULTS.md"
exit 0
}
