#!/usr/bin/env bash
# The project's test command (README): the whole suite, CPU only; Triton kernels run through TRITON_INTERPRET=1
# inside the tests that need it. Two pytest-xdist workers (CI has 2 cores; tests are independent of order and
# worker: seeded per test, temporary directories, free ports, an atomically written kernel cache), each taking
# whole modules (--dist loadscope: a module's shared trainings run once) in the order tests/conftest.py gives
# them, the longest first (--no-loadscope-reorder: xdist's own order, by number of tests, left the long modules of
# few tests to the end, on one worker); set STRUCTATTN_TEST_WORKERS=0 for one process. The 25 slowest tests are listed at
# the end. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
workers=${STRUCTATTN_TEST_WORKERS:-2}
xdist=()
if [ "$workers" != 0 ]; then
  python -c 'import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split(".")[:2])) < (3, 6))' 2>/dev/null \
    || { echo "pytest-xdist >= 3.6 is not installed (the test extra): bash scripts/test.sh needs it, or STRUCTATTN_TEST_WORKERS=0" >&2; exit 1; }
  xdist=(-n "$workers" --dist loadscope --no-loadscope-reorder)
fi
python -m pytest -q -p no:cacheprovider --durations=25 "${xdist[@]}" "$@" tests
rc=$?
[ "$rc" -eq 5 ] && { echo "no tests collected" >&2; exit 1; }
exit "$rc"
