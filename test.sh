#!/usr/bin/env bash
# Sets everything up and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/venv.sh test,load
# Debian packages some tests run for real:
# * prometheus: promtool and a real Prometheus server for tests/test_deploy.py;
# * haproxy: deploy/haproxy/haproxy.cfg checked by tests/test_deploy.py and run by tests/fleet;
# * iproute2: `ip netns` hosts for tests/fleet (multi-host scenarios; they need root);
# * nginx-light, wrk: free analyzers, the nginx proxy baseline and the closed loop of the benchmark tests.
missing=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then missing+=(prometheus); fi
if ! command -v haproxy >/dev/null 2>&1; then missing+=(haproxy); fi
if ! command -v ip >/dev/null 2>&1; then missing+=(iproute2); fi
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then missing+=(nginx-light); fi
if ! command -v wrk >/dev/null 2>&1; then missing+=(wrk); fi
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "test.sh: missing ${missing[*]}; install with: apt-get install -y ${missing[*]}" >&2
    fi
fi
exec .venv/bin/python -m pytest "$@"
