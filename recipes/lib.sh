# recipes/lib.sh: what the recipe drivers (offline_fr_en.sh, online_nmt.sh) share. Sourced inside their { } block
# (a whole block is parsed before it runs, so editing a driver or this file during a long run is safe).
#
# Re-running a recipe (the same rules for every recipe):
#   * Every step writes work/stamps/<step>.done holding its exact command; work/commands.sh logs every command
#     run, work/pipeline.log what happened to every step.
#   * A step whose stamp holds exactly its command is skipped; a missing stamp or a changed command runs it.
#   * A step that ran makes everything downstream of it stale: the rest of its chain runs too. The chains: the
#     data (downloads → … → fairseq-preprocess); then one per variant (train → generate → detok → BLEU → … →
#     stats), stale when a data step ran; then the summary (significance, report), stale when any chain ran. The
#     results table is always rebuilt.
#   * When a data step ran because its command changed (or its stamp was deleted), work/runs is moved to
#     work/runs.stale-<date>: models of other data are neither resumed nor deleted. A data step of one toolkit
#     only (after `data_shared`: fairseq-preprocess, OpenNMT's vocabulary) moves aside only that toolkit's run
#     folders (the ones given to `data_done`), so fairseq and OpenNMT-py runs can share one work folder.
#   * Training resumes from fairseq's runs/<variant>/checkpoints/checkpoint_last.pt: a larger budget continues a
#     finished model; after changing the model itself delete that folder. A training that finished and then died
#     at exit (fairseq's abort, tools/train_exit.py) is kept, once, with a loud report. OpenNMT-py trainings
#     (steps train.onmt-<variant>, folders runs/onmt-<variant>) resume from their newest model_step_N.pt the same
#     way (tools/onmt_checkpoints.py).
#   * --force runs every step whatever its stamp says; since no command changed, runs/ stays and training still
#     resumes from checkpoint_last.pt.
#   * --dry-run prints every step ("# NAME", then its command) and touches nothing.
#
# A driver defines `usage` and sets py, tools, work, dry_run and force; then it runs the data steps (optionally
# `data_shared` after those every toolkit uses) and `data_done`; per variant `chain_start`, `train_step`, the
# other steps, `chain_end` (or every `train_step` first, `train_wait`, then the chains with `chain_start
# train.V`); `summary_start` and the summary steps; last `step_always results ...`.

# ---------------------------------------------------------------------------------------------------- arguments
die() { echo "error: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_pos() { [[ "$1" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] && python3 -c "import sys; sys.exit(not float('$1') > 0)"; }
is_prob() { [[ "$1" =~ ^[0-9]*\.?[0-9]+$ ]] && python3 -c "import sys; sys.exit(not float('$1') < 1)"; }

# help_usage: the driver's `usage`, also on a fresh clone before the set-up: where no python can read the variant
# table yet (structattn not installed, or no `python`), its values are shown as placeholders instead of failing.
help_usage() {
  local defs
  defs="$( (variants_load && printf 'variants_all=%q variants_main=%q variants_study=%q paper_gamma_entropy=%q \
paper_gamma_l2=%q' "$variants_all" "$variants_main" "$variants_study" "$paper_gamma_entropy" "$paper_gamma_l2") \
    2>/dev/null )" || defs="variants_all='(listed once structattn is installed)' variants_main='(the main four)' \
variants_study='(the study set)' paper_gamma_entropy='γ for −H' paper_gamma_l2='γ for ℓ2'"
  eval "$defs"
  usage
}

# parse_options "VALUE-OPTIONS" "FLAG-OPTIONS" ARG...: `--some-option VALUE` sets $some_option, a flag `--some-flag`
# sets $some_flag=1; -h/--help prints the driver's `usage` and exits; anything else is an error.
parse_options() {
  local _values=" $1 " _flags=" $2 "; shift 2
  while [ $# -gt 0 ]; do
    case "$1" in -h|--help) help_usage; exit 0 ;; esac
    local _var="${1#--}"; _var="${_var//-/_}"
    if [[ "$_values" == *" $1 "* ]]; then
      [ $# -ge 2 ] || die "$1 needs a value"
      printf -v "$_var" '%s' "$2"; shift 2
    elif [[ "$_flags" == *" $1 "* ]]; then
      printf -v "$_var" 1; shift
    else
      die "unknown option '$1' (see --help)"
    fi
  done
}

# ---------------------------------------------------------------------------------------------------- variants
# The table is structattn/evaluation/variants.py (names, labels, fairseq flags; the paper's γ from structattn).
# variants_load: sets variants_all (every variant name), variants_main (the default set: the ablations are asked for
# by name), variants_study (--size study's set) and paper_gamma_entropy, paper_gamma_l2.
# The same Python start also reads what attention_load and plugin_load would (each start imports structattn, hence
# torch: ~2 s of CPU, three of them were most of a --dry-run or --help and ~5 s of every recipe invocation): the
# plugin folder, and the attention flags of every variant for the toolkit ($toolkit, default fairseq), γ
# ($gamma_entropy, $gamma_l2; unset: the paper's), form ($viterbi_form) and architecture ($arch) set at this point. attention_load uses
# them when those settings are still the same, and asks Python again otherwise.
declare -A attention_cache=()
attention_cache_key=""
variants_load() {
  [ -z "${variants_all:-}" ] || return 0
  local defs
  defs="$("$py" - "${toolkit:-fairseq}" "${gamma_entropy-}" "${gamma_l2-}" "${viterbi_form:-}" "${arch:-}" <<'EOF'
import contextlib, io, shlex, sys
from structattn.evaluation import variants as v
toolkit, form, given, arch = sys.argv[1], sys.argv[4], {"entropy": sys.argv[2], "l2": sys.argv[3]}, sys.argv[5]
v.main(["shell"])
try:
    from structattn.userdir import plugin_dir
    print(f"plugin={shlex.quote(plugin_dir())}")
except ModuleNotFoundError:
    pass  # plugin_load says so, if the recipe needs the plugin
if toolkit in v.TOOLKITS and set(v.REGULARISERS) == set(given):
    gamma = {reg: given[reg] or format(v.paper_gamma()[reg], "g") for reg in v.REGULARISERS}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        v.main(["flags", *v.VARIANTS, "--toolkit", toolkit, *(f for reg in v.REGULARISERS for f in
                (f"--gamma-{reg}", gamma[reg])), *(["--form", form] if form else []),
                *(["--arch", arch] if arch else [])])
    for name, line in zip(v.VARIANTS, out.getvalue().splitlines()):
        print(f"attention_cache[{shlex.quote(name)}]={shlex.quote(line)}")
    print("attention_cache_key=" + shlex.quote("|".join([toolkit, gamma["entropy"], gamma["l2"], form, arch])))
EOF
)" || die "cannot read the variant table with $py -m structattn.evaluation.variants"
  eval "$defs"
}
# plugin_load: plugin = the folder of the installed fairseq plugin (structattn_fairseq, what `structattn-user-dir`
# prints), for fairseq's --user-dir.
plugin_load() {
  [ -z "${plugin:-}" ] || return 0
  plugin="$("$py" -m structattn.userdir)" || die "cannot find structattn's fairseq plugin with $py -m structattn.userdir"
}
# check_variants "A B ...": dies unless the list is a non-empty list of known variants.
check_variants() {
  variants_load
  local v
  [ -n "${1// /}" ] || die "--variants is empty"
  for v in $1; do
    [[ " $variants_all " == *" $v "* ]] || die "unknown variant '$v' (choose from: $variants_all)"
  done
}
# attention_load "A B ..." [TOOLKIT]: attention[V] = the attention flags of each variant (fairseq's, or with TOOLKIT
# onmt structattn-onmt-train's), with γ $gamma_entropy / $gamma_l2 and, when set, the form $viterbi_form; the
# fairseq architecture $arch, when set, decides whether the bilinear attentions' τ is spelt out (not for a Transformer).
declare -A attention=()
attention_load() {
  local v out lines i=0
  if [ -n "$attention_cache_key" ] \
      && [ "$attention_cache_key" = "${2:-fairseq}|$gamma_entropy|$gamma_l2|${viterbi_form:-}|${arch:-}" ]; then
    for v in $1; do
      [ -n "${attention_cache[$v]:-}" ] || die "no attention flags for variant '$v' (structattn/evaluation/variants.py)"
      attention[$v]="${attention_cache[$v]}"
    done
    return 0
  fi
  # shellcheck disable=SC2086  # $1: the variant names, one word each
  out="$("$py" -m structattn.evaluation.variants flags $1 --gamma-entropy "$gamma_entropy" --gamma-l2 "$gamma_l2" \
    ${viterbi_form:+--form "$viterbi_form"} ${2:+--toolkit "$2"} ${arch:+--arch "$arch"})" \
    || die "no attention flags for the variants '$1' (structattn/evaluation/variants.py)"
  mapfile -t lines <<< "$out"
  for v in $1; do
    [ -n "${lines[i]:-}" ] || die "no attention flags for variant '$v' (structattn/evaluation/variants.py)"
    attention[$v]="${lines[i]}"; i=$((i + 1))
  done
}

# ---------------------------------------------------------------------------------------------------- steps
# say MESSAGE: a time-stamped line on stderr and in work/pipeline.log.
say() {
  local line; line="[$(date '+%H:%M:%S')] $*"
  echo "$line" >&2
  [ "$dry_run" = 1 ] || echo "$line" >> "$work/pipeline.log"
}

redo=0           # a step of the current chain ran in this invocation: the rest of the chain is stale
stamp_changed=0  # a step ran because its stamp was missing or held another command (not merely --force or redo)
shared_changed=""  # stamp_changed at `data_shared` (empty: the driver has no toolkit-specific data steps)
data_redo=0 any_redo=0 trained=" " batch=()
train_jobs=1 train_threads=1

stamp_matches() { [ -f "$work/stamps/$1.done" ] && [ "$(cat "$work/stamps/$1.done")" = "$2" ]; }
# step_current NAME COMMAND: true if `step` would skip it (stamp holds this command, nothing upstream ran, no --force).
step_current() { [ "$force" = 0 ] && [ "$redo" = 0 ] && stamp_matches "$1" "$2"; }

# step NAME COMMAND: run COMMAND (a bash string, pipefail on) unless step_current; a step that ran sets redo=1.
step() {
  local name="$1" cmd="$2" stamp="$work/stamps/$1.done"
  if [ "$dry_run" = 1 ]; then printf '# %s\n%s\n\n' "$name" "$cmd"; return 0; fi
  if step_current "$name" "$cmd"; then say "skip $name (done; delete $stamp to redo)"; return 0; fi
  stamp_matches "$name" "$cmd" || stamp_changed=1
  say "run  $name"
  echo "$cmd" >> "$work/commands.sh"
  local t0 rc=0 log0=0 run="$work/runs/${name#train.}"; t0=$(date +%s)
  case "$name" in train.*) log0=$(stat -c %s "$run/train.log" 2>/dev/null || echo 0) ;; esac
  bash -o pipefail -c "$cmd" || rc=$?
  if [ "$rc" != 0 ]; then case "$name" in train.onmt-*) ;; train.*)
    # finished, then died at exit? (fairseq's abort after a mid-epoch stop; tools/train_exit.py decides, loudly)
    "$py" "$tools/train_exit.py" --name "$name" --status "$rc" --offset "$log0" --since "$t0" --log "$run/train.log" \
      --checkpoint "$run/checkpoints/checkpoint_last.pt" 2>&1 | tee -a "$work/pipeline.log" >&2 && rc=0 ;; esac
  fi
  if [ "$rc" != 0 ]; then
    say "FAILED $name (command in $work/commands.sh)"
    case "$name" in
      train.onmt-*) say "hint: training resumes from the newest $run/model_step_*.pt;" \
        "after changing model settings delete that folder" ;;
      train.*) say "hint: training resumes from $run/checkpoints/checkpoint_last.pt;" \
        "after changing model settings delete that folder" ;;
    esac
    exit 1
  fi
  say "done $name in $(( $(date +%s) - t0 ))s"
  printf '%s' "$cmd" > "$stamp"
  redo=1
}
# step_always NAME COMMAND: a step that runs every time (cheap, reads the files of the others).
step_always() { redo=1; step "$@"; }

# ---------------------------------------------------------------------------------------------------- chains
# data_shared: the data steps so far are every toolkit's; those after it (up to data_done) are one toolkit's.
data_shared() { shared_changed=$stamp_changed; }
# data_done [FOLDER ...]: the end of the data chain. If a data step's command changed, the models of the old data
# are moved aside (runs.stale-<date>) so that no training resumes from them: all of work/runs, or, when only steps
# after data_shared changed, just the run folders FOLDER... (that toolkit's).
data_done() {
  data_redo=$redo any_redo=$redo
  if [ "$stamp_changed" = 1 ] && [ "$dry_run" = 0 ] && [ -d "$work/runs" ]; then
    local stale f moved=0; stale="$work/runs.stale-$(date +%Y%m%d-%H%M%S)"
    if [ "$shared_changed" = 0 ] && [ $# -gt 0 ]; then
      for f in "$@"; do
        [ -e "$work/runs/$f" ] || continue
        mkdir -p "$stale"
        mv "$work/runs/$f" "$stale/"
        moved=1
      done
    else
      mv "$work/runs" "$stale"
      moved=1
    fi
    [ "$moved" = 0 ] || say "the data changed: previous models moved to $stale"
  fi
}
# chain_start [STEP]: a variant's chain begins, stale if the data ran or if STEP (a train_step) ran.
chain_start() {
  redo=$data_redo
  if [ -n "${1:-}" ] && [[ "$trained" == *" $1 "* ]]; then redo=1; fi
}
# chain_end: a chain in which a step ran makes the summary stale.
chain_end() { [ "$redo" = 0 ] || any_redo=1; }
# summary_start: the steps over all variants (significance, report) begin.
summary_start() { redo=$any_redo; }

# train_step NAME COMMAND: `step` for a training; with train_jobs > 1 up to that many run at a time in the
# background, each with $train_threads torch threads (two small LSTMs on two cores train faster side by side than
# one after the other with two threads each); train_wait waits for them. chain_start NAME knows whether it ran.
train_step() {
  step_current "$1" "$2" || trained="$trained$1 "
  if [ "$train_jobs" -gt 1 ] && [ "$dry_run" = 0 ]; then
    OMP_NUM_THREADS=$train_threads MKL_NUM_THREADS=$train_threads step "$1" "$2" &
    batch+=("$!")
    [ "${#batch[@]}" -lt "$train_jobs" ] || train_wait
  else
    step "$1" "$2"
  fi
}
train_wait() {
  local pid failed=0
  for pid in "${batch[@]}"; do wait "$pid" || failed=1; done
  batch=()
  [ "$failed" = 0 ] || { say "a training failed (see above)"; exit 1; }
}
