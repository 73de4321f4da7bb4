#!/usr/bin/env bash
# Sets everything up and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/venv.sh test,load
# promtool and a real Prometheus server for tests/test_deploy.py (Debian's prometheus package)
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "test.sh: promtool/prometheus missing; install them with: apt-get install -y prometheus" >&2
    fi
fi
exec .venv/bin/python -m pytest "$@"
