#!/usr/bin/env bash
# One-command GPU validation of structattn: install what is missing, run the CUDA tests, the
# step-level and normaliser benchmarks and a short fairseq training on the GPU, and write one report file with
# the numbers (ratios to softmax measured in the same run). Budget: under 10 minutes on a GPU machine with the
# packages already installed (building fairseq from its sdist adds ~4 min once). Report format: docs/speed.md.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/gpu_check.sh [options]

  --out FILE       report file (default: gpu_check_<host>_<UTC date-time>.md in the repository root)
  --updates N      fairseq-train updates per attention (default 200)
  --python PY      Python interpreter to use (default: $PYTHON, else python3)
  --device DEV     cuda (default), or cpu to rehearse the pipeline on a machine without a GPU
                   (numbers meaningless; the report says so)
  --skip LIST      comma-separated steps to skip: tests,step,normaliser,train
  --no-install     never install anything (a missing package fails the steps that need it)
  -h, --help       this text

Steps: environment probe; install (editable structattn without touching the installed torch, pytest, triton;
fairseq built from its sdist with --no-build-isolation against the torch found, via scripts/install_fairseq.sh);
CUDA tests (pytest on every test file holding a CUDA test, and the AOT test file); step-level benchmark
(benchmarks/run.py --quick --no-e2e); normaliser benchmark (benchmarks/normalizer.py); fairseq-train for every
attention (benchmarks/run.py --e2e-only); report (benchmarks/gpu_report.py).

Exit status: 0 every step that ran passed; 1 a step failed; 2 usage error; 3 no CUDA device (report written,
GPU steps skipped).
EOF
}

die_usage() { echo "gpu_check.sh: $1" >&2; echo "Try 'scripts/gpu_check.sh --help'." >&2; exit 2; }

root="$(cd "$(dirname "$0")/.." && pwd)"
out=""
updates=200
py="${PYTHON:-python3}"
device="cuda"
skip=""
install=1
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [ $# -ge 2 ] || die_usage "--out needs a file"; out="$2"; shift 2 ;;
    --updates) [ $# -ge 2 ] || die_usage "--updates needs a number"; updates="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || die_usage "--python needs an interpreter"; py="$2"; shift 2 ;;
    --device) [ $# -ge 2 ] || die_usage "--device needs cuda or cpu"; device="$2"; shift 2 ;;
    --skip) [ $# -ge 2 ] || die_usage "--skip needs a list"; skip="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done
case "$updates" in ''|*[!0-9]*) die_usage "--updates must be a positive integer, got '$updates'" ;; esac
[ "$updates" -ge 1 ] || die_usage "--updates must be a positive integer, got '$updates'"
case "$device" in cuda|cpu) ;; *) die_usage "--device must be cuda or cpu, got '$device'" ;; esac
for s in ${skip//,/ }; do
  case "$s" in tests|step|normaliser|train) ;; *) die_usage "--skip: unknown step '$s' (tests,step,normaliser,train)" ;; esac
done
command -v "$py" >/dev/null 2>&1 || die_usage "--python: '$py' not found"
[ -n "$out" ] || out="$root/gpu_check_$(hostname -s 2>/dev/null || echo host)_$(date -u +%Y%m%dT%H%MZ).md"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac

work="$(mktemp -d "${TMPDIR:-/tmp}/structattn-gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
steps="$work/steps.tsv"
: > "$steps"
cd "$root"
start_all=$(date +%s)
failed=0

# record NAME STATUS SECONDS NOTE ARTIFACT — one line of the summary table (artifact: a file in $work or "-").
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$steps"; }
skipped() { case ",$skip," in *",$1,"*) return 0 ;; esac; return 1; }

# run_step NAME TIMEOUT_S ARTIFACT CMD... — runs CMD (stdout+stderr to $work/NAME.log), times it, records the result.
run_step() {
  local name="$1" limit="$2" artifact="$3"; shift 3
  if skipped "$name"; then record "$name" SKIP 0 "--skip" -; return; fi
  echo "== $name: $*" >&2
  local t0=$(date +%s) rc
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then record "$name" PASS "$dt" "" "$artifact"
  elif [ $rc -eq 124 ]; then record "$name" FAIL "$dt" "timed out after ${limit}s" "$artifact"; failed=1
  else record "$name" FAIL "$dt" "exit status $rc" "$artifact"; failed=1; fi
  echo "   $name: rc=$rc in ${dt}s" >&2
}

# ---- environment ------------------------------------------------------------------------------------------------
"$py" - > "$work/env.txt" 2>&1 <<'EOF'
import platform, subprocess
print(f"python\t{platform.python_version()}")
try:
    import torch
    print(f"torch\t{torch.__version__}")
    print(f"torch CUDA\t{torch.version.cuda}")
    ok = torch.cuda.is_available()
    print(f"cuda available\t{ok}")
    if ok:
        p = torch.cuda.get_device_properties(0)
        print(f"gpu\t{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")
except Exception as exc:
    print(f"torch\tdoes not import: {exc}")
    print("cuda available\tFalse")
try:
    import triton
    print(f"triton\t{triton.__version__}")
except Exception as exc:
    print(f"triton\tnot importable ({type(exc).__name__})")
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    print(f"nvidia-smi\t{smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else 'n/a'}")
except Exception:
    print("nvidia-smi\tn/a")
EOF
printf 'commit\t%s\n' "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)" >> "$work/env.txt"
printf 'cpu\t%s\n' "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || uname -m)" >> "$work/env.txt"
printf 'device\t%s\n' "$device" >> "$work/env.txt"
has_cuda=0
grep -q $'^cuda available\tTrue' "$work/env.txt" && has_cuda=1
gpu_ok=1
if [ "$device" = cuda ] && [ $has_cuda -eq 0 ]; then gpu_ok=0; fi

# ---- install ----------------------------------------------------------------------------------------------------
if [ $gpu_ok -eq 1 ]; then
  need=()
  "$py" -c 'import structattn, pytest' >/dev/null 2>&1 || need+=(structattn)
  [ "$device" = cuda ] && { "$py" -c 'import triton' >/dev/null 2>&1 || need+=(triton); }
  skipped train || "$py" -c 'import fairseq' >/dev/null 2>&1 || need+=(fairseq)
  if [ ${#need[@]} -eq 0 ]; then
    record install PASS 0 "nothing missing" -
  elif [ $install -eq 0 ]; then
    record install FAIL 0 "missing: ${need[*]} (--no-install)" -; failed=1
  else
    echo "== install: ${need[*]}" >&2
    t0=$(date +%s)
    (
      set -e
      for n in "${need[@]}"; do
        case "$n" in
          # --no-deps: never let pip replace the machine's (CUDA) torch with the version pinned in pyproject.toml.
          structattn) "$py" -m pip install -q --no-deps -e . && "$py" -m pip install -q pytest hypothesis numpy ;;
          triton) "$py" -m pip install -q triton ;;
          fairseq) PYTHON="$py" bash scripts/install_fairseq.sh ;;
        esac
      done
    ) > "$work/install.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then record install PASS $(( $(date +%s) - t0 )) "installed: ${need[*]}" install.log
    else record install FAIL $(( $(date +%s) - t0 )) "installing ${need[*]}: exit status $rc" install.log; failed=1; fi
  fi
fi

# ---- measurements -------------------------------------------------------------------------------------------------
if [ $gpu_ok -eq 1 ]; then
  # Every file holding a @pytest.mark.cuda test (tests/test_gpu_check.py checks that none is missing), plus the
  # AOT compilation of the Triton kernels.
  tests=(tests/test_kernels.py tests/test_viterbi.py tests/test_custom_ops.py tests/test_mixed_precision.py
         tests/test_triton_aot.py tests/test_attention.py tests/test_reliability_attention.py
         tests/test_fairseq_model.py tests/test_transformer.py tests/test_triton_dtw.py)
  run_step tests 600 tests.log "$py" -m pytest -q -p no:cacheprovider -rs "${tests[@]}"
  run_step step 180 step.md "$py" benchmarks/run.py --quick --no-e2e --device "$device" --output "$work/step.md"
  run_step normaliser 180 normaliser.log "$py" benchmarks/normalizer.py --device "$device"
  run_step train 420 train.md "$py" benchmarks/run.py --e2e-only --device "$device" --e2e-updates "$updates" \
    --output "$work/train.md"
else
  for s in tests step normaliser train; do record "$s" SKIP 0 "no CUDA device" -; done
fi

# ---- report -------------------------------------------------------------------------------------------------------
total=$(( $(date +%s) - start_all ))
cmdline="scripts/gpu_check.sh"
[ -n "$skip" ] && cmdline="$cmdline --skip $skip"
[ "$device" != cuda ] && cmdline="$cmdline --device $device"
[ "$updates" != 200 ] && cmdline="$cmdline --updates $updates"
[ $install -eq 0 ] && cmdline="$cmdline --no-install"
if ! "$py" benchmarks/gpu_report.py --work "$work" --out "$out" --total-seconds "$total" --command "$cmdline"; then
  echo "gpu_check.sh: could not write the report" >&2
  exit 1
fi
echo "report: $out" >&2
[ $gpu_ok -eq 0 ] && exit 3
exit $failed
