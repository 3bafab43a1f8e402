#!/usr/bin/env bash
# Peers for the L1 lease comparison of benches/fleet (PERFORMANCE.md):
# PostgreSQL 15 and etcd from Debian packages, each started on 127.0.0.1 in a
# directory the caller owns, and stopped again. The bench program calls it;
# it can also be used by hand:
#
#   benches/fleet/peers.sh install                      apt-get install what is missing
#   benches/fleet/peers.sh pg-start   DIR PORT          initdb + start on 127.0.0.1:PORT, create the table
#   benches/fleet/peers.sh pg-bench   DIR PORT CLIENTS SECONDS renew|refused
#   benches/fleet/peers.sh pg-stop    DIR
#   benches/fleet/peers.sh etcd-start DIR CLIENT_PORT PEER_PORT
#   benches/fleet/peers.sh etcd-stop  DIR
#   benches/fleet/peers.sh stop       DIR               both, whatever is running
#
# Nothing listens beyond loopback; nothing outside DIR is written except by
# `install`. Every wait is bounded.
set -euo pipefail

die() { echo "peers.sh: $*" >&2; exit 1; }

pg_bindir() {
    local dir
    for dir in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

have_pg() { pg_bindir >/dev/null && command -v pgbench >/dev/null; }
have_etcd() { command -v etcd >/dev/null; }

install() {
    local packages=()
    have_pg || packages+=(postgresql postgresql-client)
    have_etcd || packages+=(etcd-server)
    if [ ${#packages[@]} -eq 0 ]; then
        echo "peers.sh: postgresql and etcd-server are installed"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "installing ${packages[*]} needs root (apt-get)"
    command -v apt-get >/dev/null || die "no apt-get here: install ${packages[*]} by hand"
    echo "peers.sh: apt-get install -y ${packages[*]}" >&2
    apt-get update -qq >&2 || die "apt-get update failed"
    # Debian's maintainer scripts would start the distribution's own services;
    # policy-rc.d (if the image has one) or the missing init keeps them down,
    # and the bench starts its own instances in DIR anyway.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" >&2 ||
        die "apt-get install ${packages[*]} failed"
}

# Runs a command as the postgres user (initdb and postgres refuse root).
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_start() {
    local dir=$1 port=$2
    local bin
    bin=$(pg_bindir) || die "PostgreSQL is not installed (run: $0 install)"
    command -v pgbench >/dev/null || die "pgbench is not installed (run: $0 install)"
    mkdir -p "$dir/pg"
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || die "no postgres user (the Debian package creates it)"
        chown postgres: "$dir" "$dir/pg"
    fi
    as_postgres "$bin/initdb" -D "$dir/pg/data" -U postgres --auth=trust \
        --no-instructions -E UTF8 >"$dir/pg/initdb.log" 2>&1 ||
        die "initdb failed: $(tail -5 "$dir/pg/initdb.log")"
    # Durable commits as in PERFORMANCE.md: fsync and synchronous_commit on
    # (the defaults, spelled out).
    as_postgres "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w -t 30 \
        -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir/pg \
            -c fsync=on -c synchronous_commit=on -c max_connections=40" \
        start >/dev/null || die "PostgreSQL did not start: $(tail -5 "$dir/pg/server.log")"
    psql_do "$port" <<'SQL' >/dev/null
CREATE TABLE leases (
    resource_id   text PRIMARY KEY,
    resource_type text NOT NULL,
    holder_id     text NOT NULL,
    generation    bigint NOT NULL,
    acquired_at   timestamptz NOT NULL,
    renewed_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    transitions   bigint NOT NULL
);
-- The refused case: every resource is held by a rival for an hour.
INSERT INTO leases
SELECT 'rival-' || n, 'bench', 'rival', 1, now(), now(), now() + interval '1 hour', 1
FROM generate_series(0, 63) AS n;
SQL
    # The granted case: one lease per pgbench client, each the client's own.
    cat >"$dir/pg/renew.sql" <<'SQL'
INSERT INTO leases AS l (resource_id, resource_type, holder_id, generation, acquired_at, renewed_at, expires_at, transitions)
VALUES ('r-' || :client_id, 'bench', 'h-' || :client_id, 1, now(), now(), now() + interval '30 seconds', 1)
ON CONFLICT (resource_id) DO UPDATE SET
    generation  = CASE WHEN l.holder_id = excluded.holder_id AND l.expires_at >= now() THEN l.generation ELSE l.generation + 1 END,
    transitions = CASE WHEN l.holder_id = excluded.holder_id AND l.expires_at >= now() THEN l.transitions ELSE l.transitions + 1 END,
    acquired_at = CASE WHEN l.holder_id = excluded.holder_id AND l.expires_at >= now() THEN l.acquired_at ELSE now() END,
    holder_id   = excluded.holder_id,
    renewed_at  = now(),
    expires_at  = excluded.expires_at
WHERE l.holder_id = excluded.holder_id OR l.expires_at < now();
SQL
    sed "s/'r-' || :client_id/'rival-' || :client_id/" "$dir/pg/renew.sql" >"$dir/pg/refused.sql"
    chmod a+r "$dir/pg/renew.sql" "$dir/pg/refused.sql"
    echo "peers.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
}

psql_do() {
    local port=$1
    PGCONNECT_TIMEOUT=5 psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres
}

# Prints pgbench's tps (without connection time) and mean latency in ms.
pg_bench() {
    local dir=$1 port=$2 clients=$3 seconds=$4 mode=$5
    [ -f "$dir/pg/$mode.sql" ] || die "unknown mode $mode (renew|refused) or PostgreSQL not started"
    local out
    out=$(PGCONNECT_TIMEOUT=5 timeout $((seconds + 30)) pgbench -n -M prepared -h 127.0.0.1 -p "$port" \
        -U postgres -c "$clients" -j "$clients" -T "$seconds" -f "$dir/pg/$mode.sql" postgres 2>&1) ||
        die "pgbench failed: $out"
    local tps latency failed
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | tail -1)
    latency=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out" | tail -1)
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out" | tail -1)
    [ -n "$tps" ] || die "no tps in pgbench output: $out"
    echo "tps=$tps latency_ms=${latency:-0} failed=${failed:-0}"
}

pg_stop() {
    local dir=$1
    local bin
    [ -d "$dir/pg/data" ] || return 0
    bin=$(pg_bindir) || return 0
    if [ -f "$dir/pg/data/postmaster.pid" ]; then
        as_postgres "$bin/pg_ctl" -D "$dir/pg/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
    fi
}

etcd_start() {
    local dir=$1 client_port=$2 peer_port=$3
    have_etcd || die "etcd is not installed (run: $0 install)"
    mkdir -p "$dir/etcd"
    local client="http://127.0.0.1:$client_port" peer="http://127.0.0.1:$peer_port"
    # Defaults otherwise: every write is a Raft entry fsynced to the WAL.
    setsid etcd --name bench --data-dir "$dir/etcd/data" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "bench=$peer" --initial-cluster-state new \
        --log-level warn \
        </dev/null >"$dir/etcd/etcd.log" 2>&1 &
    echo $! >"$dir/etcd/etcd.pid"
    local tries
    for tries in $(seq 1 150); do
        if curl -fsS --max-time 1 "$client/health" 2>/dev/null | grep -q '"health":"true"'; then
            echo "peers.sh: etcd $(etcd --version | sed -n 's/^etcd Version: //p') on $client" >&2
            return 0
        fi
        kill -0 "$(cat "$dir/etcd/etcd.pid")" 2>/dev/null || die "etcd exited: $(tail -5 "$dir/etcd/etcd.log")"
        sleep 0.1
    done
    etcd_stop "$dir"
    die "etcd was not healthy within 15 s: $(tail -5 "$dir/etcd/etcd.log")"
}

etcd_stop() {
    local dir=$1
    [ -f "$dir/etcd/etcd.pid" ] || return 0
    local pid tries
    pid=$(cat "$dir/etcd/etcd.pid")
    if kill -TERM "$pid" 2>/dev/null; then
        for tries in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/etcd/etcd.pid"
}

command=${1:-}
case "$command" in
install) install ;;
pg-start) [ $# -eq 3 ] || die "usage: $0 pg-start DIR PORT"; pg_start "$2" "$3" ;;
pg-bench) [ $# -eq 6 ] || die "usage: $0 pg-bench DIR PORT CLIENTS SECONDS renew|refused"; pg_bench "$2" "$3" "$4" "$5" "$6" ;;
pg-stop) [ $# -eq 2 ] || die "usage: $0 pg-stop DIR"; pg_stop "$2" ;;
etcd-start) [ $# -eq 4 ] || die "usage: $0 etcd-start DIR CLIENT_PORT PEER_PORT"; etcd_start "$2" "$3" "$4" ;;
etcd-stop) [ $# -eq 2 ] || die "usage: $0 etcd-stop DIR"; etcd_stop "$2" ;;
stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; etcd_stop "$2"; pg_stop "$2" ;;
*) die "usage: $0 install|pg-start|pg-bench|pg-stop|etcd-start|etcd-stop|stop ..." ;;
esac
