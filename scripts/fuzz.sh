#!/usr/bin/env bash
# Runs one atheris fuzz target for longer than ./test.sh does:
#   scripts/fuzz.sh TARGET MINUTES [libFuzzer flags...]      e.g. scripts/fuzz.sh http 30 -jobs=2
# TARGET is a tests/fuzz/targets/fuzz_<TARGET>.py; without arguments the targets are listed.
# It starts from the checked-in seeds and findings (tests/fuzz/corpus/TARGET, tests/fuzz/findings/TARGET,
# never written to) plus what earlier runs found, kept with the crash inputs in $FUZZ_WORK (default
# /tmp/distributor-fuzz/TARGET). A crash input that shows a real problem goes to tests/fuzz/findings/TARGET/
# (tests/fuzz/test_fuzz.py replays it) with a fix. libFuzzer's final stats (executions, exec/s) end the output.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=$(cd tests/fuzz/targets && ls fuzz_*.py | sed 's/^fuzz_//; s/\.py$//' | tr '\n' ' ')
if [ $# -lt 1 ]; then
    echo "usage: scripts/fuzz.sh TARGET [MINUTES=10] [libFuzzer flags...]; targets: $targets" >&2
    exit 2
fi
target=$1
minutes=${2:-10}
shift $(( $# >= 2 ? 2 : 1 ))
script=tests/fuzz/targets/fuzz_${target}.py
if [ ! -f "$script" ]; then
    echo "scripts/fuzz.sh: no target '$target'; targets: $targets" >&2
    exit 2
fi
if ! [[ "$minutes" =~ ^[0-9]+$ ]] || [ "$minutes" -lt 1 ]; then
    echo "scripts/fuzz.sh: MINUTES must be a positive integer, got '$minutes'" >&2
    exit 2
fi
python=.venv/bin/python
if ! "$python" -c "import atheris" 2>/dev/null; then
    echo "scripts/fuzz.sh: atheris is missing; install it with: $python -m pip install 'atheris>=2.3'" >&2
    exit 2
fi
work=${FUZZ_WORK:-/tmp/distributor-fuzz/$target}
mkdir -p "$work/corpus" "$work/artifacts"
seeds=("tests/fuzz/corpus/$target")
if [ -d "tests/fuzz/findings/$target" ]; then seeds+=("tests/fuzz/findings/$target"); fi
echo "fuzzing $target for $minutes min; new inputs in $work/corpus, crashes in $work/artifacts" >&2
exec "$python" "$script" -max_total_time=$((minutes * 60)) -print_final_stats=1 \
    -artifact_prefix="$work/artifacts/" "$@" "$work/corpus" "${seeds[@]}"
