#!/usr/bin/env bash
# The Rubin-shaped example end to end: control plane + two workers + submit --wait.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
cd "$ROOT"

DEMO="$ROOT/var/demo"
mkdir -p "$DEMO"
export DISPATCHER_WORK_DIR="${DISPATCHER_WORK_DIR:-$DEMO/work}"
export DISPATCHER_LOG_DIR="${DISPATCHER_LOG_DIR:-$DEMO/logs}"

dispatcher db upgrade
pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
trap stop EXIT
dispatcher start >"$DEMO/control.log" 2>&1 & pids+=($!)
dispatcher worker --slots 2 >"$DEMO/worker-1.log" 2>&1 & pids+=($!)
dispatcher worker --slots 2 >"$DEMO/worker-2.log" 2>&1 & pids+=($!)

say "submitting examples/rubin-isr.yaml (pipeinit -> 1000 isr events -> final)"
workflow=$(dispatcher submit examples/rubin-isr.yaml --wait)
say "workflow $workflow finished (see: dispatcher status $workflow); one log per job in $DISPATCHER_LOG_DIR/workflow-$workflow/"
say "control plane and worker logs in $DEMO/"
