#!/usr/bin/env bash
# Creates .venv when missing and installs this package with the extras given ("" or "test,load").
# Shared by run.sh and test.sh so that both set a fresh machine up the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# A C compiler for the packet contract's fast path (setup.py; without one the install still works and
# the contract runs in Python alone, at more CPU per packet).
# Best effort: a machine without a compiler or without its package mirrors still gets its venv.
if ! command -v cc >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null; }; then
        echo "venv.sh: could not install gcc; the hot path's C modules are skipped (pure Python, more CPU)" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${1:+[$1]}"
