#!/usr/bin/env bash
# The paper's WMT14 set-up (needs internet and, realistically, a GPU): fr→en by default, --direction en-fr for
# the other column of Table 3. Options: see `bash recipes/online_nmt.sh --help`; `--dry-run` prints the commands.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../online_nmt.sh" --corpus wmt14 "$@"
