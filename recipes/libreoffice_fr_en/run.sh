#!/usr/bin/env bash
# LibreOffice help fr→en (technical domain, Debian packages libreoffice-help-fr/-en-us, MPL-2.0), offline via apt.
# Options: see `bash recipes/offline_fr_en.sh --help`; e.g. `bash recipes/libreoffice_fr_en/run.sh --size small`.
exec bash "$(dirname "${BASH_SOURCE[0]}")/../offline_fr_en.sh" --corpus libreoffice "$@"
