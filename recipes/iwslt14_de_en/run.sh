#!/usr/bin/env bash
# IWSLT14 de→en (needs internet). Options: see `bash recipes/online_nmt.sh --help`; `--dry-run` prints the commands.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../online_nmt.sh" --corpus iwslt14 "$@"
