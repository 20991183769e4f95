#!/usr/bin/env bash
# Bible fr→en (Louis Segond 1910 → World English Bible, King James as second reference), offline.
# Options: see `bash recipes/offline_fr_en.sh --help`; e.g. `bash recipes/bible_fr_en/run.sh --size small`.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../offline_fr_en.sh" --corpus bible "$@"
