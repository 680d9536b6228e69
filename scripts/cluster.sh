#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on loopback, beside the machine's own node (never touched):
#   scripts/cluster.sh start        start es1..es3 and join them (about 20 s)
#   scripts/cluster.sh stop         stop every node and remove its files
#   scripts/cluster.sh kill N       SIGKILL node N (as a crash would)
#   scripts/cluster.sh up N         start node N again (it rejoins its cluster)
#   scripts/cluster.sh urls         the AMQP URLs, comma-separated (DISPATCHER_AMQP_URL)
#   scripts/cluster.sh ctl N ARGS   rabbitmqctl against node N
#   scripts/cluster.sh leaders      every quorum queue and the node leading it (1..3)
#   scripts/cluster.sh leader Q     the node leading quorum queue Q
#   scripts/cluster.sh rebalance    spread the quorum queues' leaders over the nodes again
# Ports: AMQP 5701..5703, distribution 25701..25703 (ES_CLUSTER_PORT moves both); nodes
# es5700_1..3@localhost.
# Files: $ES_CLUSTER_DIR (default /tmp/es-cluster). Needs rabbitmq-server installed.
set -euo pipefail

DIR="${ES_CLUSTER_DIR:-/tmp/es-cluster}"
BASE="${ES_CLUSTER_PORT:-5700}"
NODES=(1 2 3)
SBIN=/usr/lib/rabbitmq/bin  # not /usr/sbin's wrappers: they switch user and cookie

say() { printf '==> %s\n' "$*" >&2; }

node() {  # node N: its Erlang name, unique per base port (epmd knows every node of the host)
    echo "es${BASE}_$1@localhost"
}

in_node() {  # in_node N CMD...: run CMD in node N's environment
    local n=$1 d="$DIR/es$1"
    shift
    (
        export HOME="$DIR/home" \
            RABBITMQ_NODENAME="$(node "$n")" \
            RABBITMQ_NODE_PORT=$((BASE + n)) \
            RABBITMQ_DIST_PORT=$((BASE + 20000 + n)) \
            RABBITMQ_MNESIA_BASE="$d/mnesia" \
            RABBITMQ_LOG_BASE="$d/log" \
            RABBITMQ_PID_FILE="$d/pid" \
            RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
            RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
            RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
            RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
            ERL_EPMD_ADDRESS=127.0.0.1 \
            ERL_CRASH_DUMP_SECONDS=0 \
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        "$@"
    )
}

ctl() {  # ctl N ARGS...
    local n=$1
    shift
    in_node "$n" "$SBIN/rabbitmqctl" -n "$(node "$n")" "$@"
}

prepare() {
    local n=$1 d="$DIR/es$1"
    mkdir -p "$d/mnesia" "$d/log" "$DIR/home"
    if [ ! -f "$DIR/home/.erlang.cookie" ]; then
        head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DIR/home/.erlang.cookie"
        chmod 400 "$DIR/home/.erlang.cookie"
    fi
    cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$((BASE + n))
loopback_users.guest = true
vm_memory_high_watermark.absolute = 512MiB
disk_free_limit.absolute = 50MB
cluster_partition_handling = pause_minority
queue_leader_locator = balanced
EOF
    : >"$d/rabbitmq-env.conf"  # not /etc/rabbitmq's: it pins port 5672 and the node name
    echo '[].' >"$d/enabled_plugins"
    echo '[].' >"$d/advanced.config"
}

start_node() {
    local n=$1 d="$DIR/es$1"
    if ctl "$n" status >/dev/null 2>&1; then
        say "node $(node "$n") is running already"
        return 0
    fi
    prepare "$n"
    # the node must not hold our file descriptors (a caller waiting on a pipe would hang)
    in_node "$n" python3 -c 'import os, sys; os.closerange(3, 65536); os.execv(sys.argv[1], sys.argv[1:])' \
        "$SBIN/rabbitmq-server" -detached </dev/null >>"$d/log/start.out" 2>&1
    for _ in $(seq 1 60); do
        if ctl "$n" await_startup --timeout 2 >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    say "node $(node "$n") did not start: see $d/log"
    return 1
}

case "${1:-}" in
start)
    for n in "${NODES[@]}"; do start_node "$n"; done
    for n in "${NODES[@]:1}"; do
        ctl "$n" stop_app >/dev/null
        ctl "$n" join_cluster "$(node 1)" >/dev/null
        ctl "$n" start_app >/dev/null
    done
    ctl 1 cluster_status --formatter json | python3 -c \
        'import json,sys; s=json.load(sys.stdin); print("running:", " ".join(sorted(s["running_nodes"])))'
    ;;
stop)
    for n in "${NODES[@]}"; do
        if [ -f "$DIR/es$n/pid" ]; then
            pid=$(cat "$DIR/es$n/pid")
            ctl "$n" stop >/dev/null 2>&1 || true
            kill -9 "$pid" 2>/dev/null || true  # (one that would not stop)
        fi
    done
    # epmd keeps the names until their nodes are gone; the machine's own epmd stays
    rm -rf "$DIR"
    ;;
kill)
    kill -9 "$(cat "$DIR/es$2/pid")"
    ;;
up)
    start_node "$2"
    ;;
urls)
    urls=()
    for n in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$((BASE + n))/"); done
    (IFS=,; echo "${urls[*]}")
    ;;
ctl)
    n=$2
    shift 2
    ctl "$n" "$@"
    ;;
leaders)
    # every quorum queue and the node (1..3) leading it, a line each
    ctl 1 list_queues name type leader --formatter json 2>/dev/null | python3 -c \
        'import json,sys
for r in json.load(sys.stdin):
    if r.get("type") == "quorum" and "@" in (r.get("leader") or ""):
        print(r["name"], r["leader"].split("@")[0].rsplit("_", 1)[-1])'
    ;;
leader)
    "$0" leaders | awk -v q="$2" '$1 == q {print $2}'
    ;;
rebalance)
    # leaders stay where a failover put them when their node returns: spread them again
    in_node 1 "$SBIN/rabbitmq-queues" -n "$(node 1)" rebalance quorum >/dev/null
    ;;
*)
    sed -n "2,12p" "$0"
    exit 2
    ;;
esac
