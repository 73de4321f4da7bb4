#!/usr/bin/env bash
# Sets everything up and runs the demo: 4 local analyzers (weights 0.4/0.3/0.2/0.1), the distributor
# and a built-in emitter load of skewed packets, with a live table; stops everything it started.
# Extra flags go to the demo, e.g. ./run.sh --duration 60 --workers 2 --rate 0
set -euo pipefail
cd "$(dirname "$0")"
scripts/venv.sh
exec .venv/bin/distributor demo "$@"
