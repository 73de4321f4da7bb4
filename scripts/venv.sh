#!/usr/bin/env bash
# Creates .venv when missing and installs this package with the extras given ("" or "test,load").
# Shared by run.sh and test.sh so that both set a fresh machine up the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${1:+[$1]}"
