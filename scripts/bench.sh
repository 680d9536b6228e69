#!/usr/bin/env bash
# Every benchmark scenario against the local RabbitMQ and Postgres; the report lands in
# benchmarks/results/ (report.md, report.json, report.png). Arguments go to
# `python -m benchmarks.run` (--quick, --runs N, --only throughput,celery,...).
set -euo pipefail
EXTRAS=test source "$(dirname "$0")/setup.sh"  # the test extras hold Celery and matplotlib
cd "$ROOT"
python -m benchmarks.run "$@"
