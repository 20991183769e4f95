#!/usr/bin/env bash
# The project's test command (README): the whole suite, CPU only; Triton kernels run through TRITON_INTERPRET=1
# inside the tests that need it. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -p no:cacheprovider "$@" tests
rc=$?
[ "$rc" -eq 5 ] && { echo "no tests collected" >&2; exit 1; }
exit "$rc"
