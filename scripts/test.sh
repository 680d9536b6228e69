#!/usr/bin/env bash
# The test suite against the real RabbitMQ and Postgres, plus lint and type checks.
set -euo pipefail
# bps: lsst-ctrl-bps, for tests/test_bps.py; peers: the peers benchmark's, for tests/test_peers.py
EXTRAS=test,bps,peers source "$(dirname "$0")/setup.sh"
cd "$ROOT"
"$ROOT/scripts/install-tools.sh"  # chromium (browser tests), curl (pilot tests), redis-server (peers test)

say "ruff"
ruff check .
say "mypy"
mypy
say "pytest"
pytest "$@"
