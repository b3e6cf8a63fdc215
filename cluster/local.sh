#!/usr/bin/env bash
# Runs N branchd nodes on this machine as one cluster over one Postgres.
#
#   cluster/local.sh start [N]   build, then start N nodes (default 3) in the background
#   cluster/local.sh status      the cluster view of every node
#   cluster/local.sh stop        SIGTERM every node (each drains) and wait
#
# Node i (1-based) is `node-i`: HTTP on 127.0.0.1:$((HTTP_BASE+i)), cluster
# port $((CLUSTER_BASE+i)), data in $RUN_DIR/node-i, log in $RUN_DIR/node-i.log.
# Settings (environment): DATABASE_URL (default postgres://postgres@127.0.0.1:5432/branchd_local,
# created if missing), BRANCHD_BIN (default: target/release/branchd, built),
# RUN_DIR (default .cluster), HTTP_BASE (18080), CLUSTER_BASE (14370),
# BRANCHD_CLUSTER_COOKIE (default local-cookie), BRANCHD_ADMIN_PASSWORD
# (default admin-password). Any other BRANCHD_* variable is passed through.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${RUN_DIR:-$here/.cluster}"
HTTP_BASE="${HTTP_BASE:-18080}"
CLUSTER_BASE="${CLUSTER_BASE:-14370}"
DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/branchd_local}"
export BRANCHD_CLUSTER_COOKIE="${BRANCHD_CLUSTER_COOKIE:-local-cookie}"
export BRANCHD_ADMIN_PASSWORD="${BRANCHD_ADMIN_PASSWORD:-admin-password}"

ensure_database() {
    local base="${DATABASE_URL%/*}" name="${DATABASE_URL##*/}"
    name="${name%%\?*}"
    if command -v psql >/dev/null; then
        psql "$base/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname = '$name'" | grep -q 1 \
            || psql "$base/postgres" -qc "CREATE DATABASE \"$name\""
    fi
}

start() {
    local count="${1:-3}"
    local bin="${BRANCHD_BIN:-}"
    if [[ -z "$bin" ]]; then
        (cd "$here" && cargo build --release --locked)
        bin="$here/target/release/branchd"
    fi
    for pidfile in "$RUN_DIR"/node-*.pid; do
        if [[ -e "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            echo "nodes from $RUN_DIR are still running; run '$0 stop' first" >&2
            exit 1
        fi
    done
    ensure_database
    mkdir -p "$RUN_DIR"
    for i in $(seq 1 "$count"); do
        local tag="node-$i"
        BRANCHD_SERVER_TAG="$tag" \
        BRANCHD_DATABASE_URL="$DATABASE_URL" \
        BRANCHD_DATA_DIR="$RUN_DIR/$tag" \
        BRANCHD_LISTEN="127.0.0.1:$((HTTP_BASE + i))" \
        BRANCHD_CLUSTER_PORT="$((CLUSTER_BASE + i))" \
        BRANCHD_CLUSTER_BIND=127.0.0.1 \
        BRANCHD_ADVERTISE_HOST=127.0.0.1 \
            "$bin" serve >"$RUN_DIR/$tag.log" 2>&1 &
        echo $! >"$RUN_DIR/$tag.pid"
        echo "$tag: http://127.0.0.1:$((HTTP_BASE + i)) cluster 127.0.0.1:$((CLUSTER_BASE + i)) pid $! log $RUN_DIR/$tag.log"
    done
}

token() {
    curl -sf -X POST "http://127.0.0.1:$((HTTP_BASE + 1))/api/auth/login" \
        -H 'content-type: application/json' \
        -d "{\"username\":\"admin\",\"password\":\"$BRANCHD_ADMIN_PASSWORD\"}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}

status() {
    local tok
    tok="$(token)"
    for pidfile in "$RUN_DIR"/node-*.pid; do
        local tag i
        tag="$(basename "$pidfile" .pid)"
        i="${tag#node-}"
        echo "== $tag"
        curl -sf -H "authorization: Bearer $tok" "http://127.0.0.1:$((HTTP_BASE + i))/ops/api/cluster" || echo "(not answering)"
        echo
    done
}

stop() {
    for pidfile in "$RUN_DIR"/node-*.pid; do
        [[ -e "$pidfile" ]] || continue
        kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
    done
    for pidfile in "$RUN_DIR"/node-*.pid; do
        [[ -e "$pidfile" ]] || continue
        local pid
        pid="$(cat "$pidfile")"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
        rm -f "$pidfile"
    done
}

case "${1:-}" in
    start) start "${2:-3}" ;;
    status) status ;;
    stop) stop ;;
    *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
