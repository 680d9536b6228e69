# Sourced by demo.sh and test.sh: a virtualenv with the project installed, and the
# services reachable. Safe to run again; it only does what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-}"

say() { printf '==> %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    say "installing the project${EXTRAS:+ with [$EXTRAS]}"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"

AMQP_URL="${DISPATCHER_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
DATABASE_URL="${DISPATCHER_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}"

reachable() {  # reachable URL DEFAULT_PORT
    "$VENV/bin/python" - "$1" "$2" <<'PY'
import socket, sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
try:
    socket.create_connection((u.hostname or "127.0.0.1", u.port or int(sys.argv[2])), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}

wait_for() {  # wait_for NAME URL PORT
    for _ in $(seq 1 60); do reachable "$2" "$3" && return 0; sleep 1; done
    say "$1 is still not reachable at $2"; return 1
}

ensure_services() {
    local need_mq=0 need_pg=0
    reachable "$AMQP_URL" 5672 || need_mq=1
    reachable "$DATABASE_URL" 5432 || need_pg=1
    [ $need_mq = 0 ] && [ $need_pg = 0 ] && return 0
    if [ $need_mq = 1 ] && command -v rabbitmq-server >/dev/null; then
        say "starting RabbitMQ (rabbitmq-server -detached)"
        rabbitmq-server -detached || true
    fi
    if [ $need_pg = 1 ] && command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        say "starting Postgres (pg_ctlcluster)"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
    fi
    if ! { reachable "$AMQP_URL" 5672 && reachable "$DATABASE_URL" 5432; } \
        && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        say "starting RabbitMQ and Postgres with docker compose"
        docker compose -f "$ROOT/compose.yaml" up -d --wait
    fi
    wait_for RabbitMQ "$AMQP_URL" 5672 && wait_for Postgres "$DATABASE_URL" 5432 || {
        say "start RabbitMQ and Postgres (see README: 'Services'), or set DISPATCHER_AMQP_URL / DISPATCHER_DATABASE_URL"
        exit 1
    }
}
ensure_services
