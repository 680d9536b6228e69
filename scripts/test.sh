#!/usr/bin/env bash
# The test suite against the real RabbitMQ and Postgres, plus lint and type checks.
set -euo pipefail
EXTRAS=test,bps source "$(dirname "$0")/setup.sh"  # bps: lsst-ctrl-bps, for tests/test_bps.py
cd "$ROOT"
"$ROOT/scripts/install-tools.sh"  # chromium (the browser tests) and curl (the PanDA pilot tests)

say "ruff"
ruff check .
say "mypy"
mypy
say "pytest"
pytest "$@"
