#!/usr/bin/env bash
# Create (or update) the two RabbitMQ users of a deployment and give each only what its
# role needs (DESIGN.md, "Trust model"). Safe to run again: an existing user gets the
# password given, and the permissions are set anew.
#
#   scripts/rabbitmq-roles.sh [--vhost V] [--prefix P] WORKER_USER WORKER_PASSWORD CONTROL_USER CONTROL_PASSWORD
#   ES_WORKER_PASSWORD=... ES_CONTROL_PASSWORD=... scripts/rabbitmq-roles.sh [...] WORKER_USER CONTROL_USER
#
# Passwords on the command line show in ps(1): prefer the environment. They reach
# rabbitmqctl on its standard input, never as an argument.
# RABBITMQCTL may name another command, e.g. "docker compose exec -T rabbitmq rabbitmqctl".
#
# The worker user may (measured on RabbitMQ 3.10, tests/test_permissions.py):
#   configure  its control queue: server-named amq.gen-... (RabbitMQ checks the name it
#              generates; clients may not choose amq.* names) or amq_<uuid hex>, the name
#              aio-pika's robust channel gives a nameless queue
#   write      its control queue (queue.bind checks write on the queue) and the
#              <prefix>es.status exchange (basic.publish checks write on the exchange;
#              not amq.default, through which it could publish into any queue)
#   read       <prefix>es.job.<id>, <prefix>es.jobs (basic.consume/get), <prefix>es.control
#              (queue.bind checks read on the exchange) and its control queue
# Passive declares, acks and rejects need no permission; a reject's dead-lettering is done
# by RabbitMQ and checks none either.
# The control user gets everything under the prefix (and publishing through the default
# exchange), or the whole vhost when there is no prefix.
set -euo pipefail

usage() {
    sed -n '6,7p' "$0" | sed 's/^# *//' >&2
    exit 2
}

vhost=/
prefix=
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --vhost) [ $# -ge 2 ] || usage; vhost="$2"; shift 2 ;;
        --vhost=*) vhost="${1#*=}"; shift ;;
        --prefix) [ $# -ge 2 ] || usage; prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#*=}"; shift ;;
        -h|--help) usage ;;
        --) shift; args+=("$@"); break ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) args+=("$1"); shift ;;
    esac
done
case ${#args[@]} in
    4) worker_user="${args[0]}" worker_password="${args[1]}" control_user="${args[2]}" control_password="${args[3]}" ;;
    2) worker_user="${args[0]}" control_user="${args[1]}"
       worker_password="${ES_WORKER_PASSWORD:?set ES_WORKER_PASSWORD or pass WORKER_PASSWORD}"
       control_password="${ES_CONTROL_PASSWORD:?set ES_CONTROL_PASSWORD or pass CONTROL_PASSWORD}" ;;
    *) usage ;;
esac
if [ -z "$worker_password" ] || [ -z "$control_password" ]; then
    echo "an empty password would disable password sign-in: refusing" >&2
    exit 2
fi
if [ "$worker_user" = "$control_user" ]; then
    echo "the worker and the control plane need two users" >&2
    exit 2
fi

read -r -a ctl <<< "${RABBITMQCTL:-rabbitmqctl}"
say() { printf '==> %s\n' "$*" >&2; }

# every regex metacharacter of the prefix escaped: "t1." must not also grant "t1xes.jobs"
p="$(printf '%s' "$prefix" | sed -e 's/[][\\.^$*+?(){}|]/\\&/g')"

# a worker's own control queue: named by RabbitMQ (amq.gen-...) or, on a robust aio-pika
# channel, by aio-pika itself (amq_ and a uuid4's hex, so that it can declare it again
# after a reconnect)
own='amq\.gen-.*|amq_[0-9a-f]{32}'
worker_configure="^(${own})\$"
worker_write="^(${own}|${p}es\\.status)\$"
worker_read="^(${p}es\\.job\\.[0-9]+|${p}es\\.jobs|${p}es\\.control|${own})\$"
if [ -z "$prefix" ]; then
    control_configure='.*' control_write='.*' control_read='.*'
else
    control_configure="^${p}.*\$"
    control_write="^(${p}.*|amq\\.default)\$"
    control_read="^${p}.*\$"
fi

# "-q list_*" prints one row per line, the name first (tab-separated)
exists() {  # exists KIND NAME
    local names
    names="$("${ctl[@]}" -q "list_$1" --no-table-headers | cut -f1)"
    # read whole before matching: grep -q stopping early would fail the pipe (pipefail)
    grep -qxF -- "$2" <<< "$names"
}

ensure_user() {  # ensure_user NAME PASSWORD
    if exists users "$1"; then
        say "user $1 exists: setting its password"
        printf '%s\n' "$2" | "${ctl[@]}" -q change_password "$1" >/dev/null
    else
        say "adding user $1"
        printf '%s\n' "$2" | "${ctl[@]}" -q add_user "$1" >/dev/null
    fi
}

if ! exists vhosts "$vhost"; then
    say "adding vhost $vhost"
    "${ctl[@]}" -q add_vhost "$vhost" >/dev/null
fi
ensure_user "$worker_user" "$worker_password"
ensure_user "$control_user" "$control_password"

say "worker  $worker_user on $vhost: configure '$worker_configure' write '$worker_write' read '$worker_read'"
"${ctl[@]}" -q set_permissions -p "$vhost" "$worker_user" "$worker_configure" "$worker_write" "$worker_read" >/dev/null
say "control $control_user on $vhost: configure '$control_configure' write '$control_write' read '$control_read'"
"${ctl[@]}" -q set_permissions -p "$vhost" "$control_user" "$control_configure" "$control_write" "$control_read" \
    >/dev/null
