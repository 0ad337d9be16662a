#!/usr/bin/env bash
# What the agent costs pgbench -S over TLS (sslmode=require) against a
# PostgreSQL started here, runs alternating without and with the release
# agent (the order flips every pair), in one of two ways:
#
# - `pinned`: the workload (server and pgbench) on CPU 0, the agent on
#   CPU 1; prints pgbench's throughput per run and the with/without ratio
#   per pair. CPU 0 is saturated, so the ratio is the inverse of the
#   workload's CPU per query, and, unlike two CPUs shared by everything,
#   it does not flip between the states of cross-CPU wake-ups.
# - `profile`: unpinned, under `perf record -e cpu-clock -a -g` (no
#   hardware counters needed); each sample is put in a category by its
#   call stack (the uprobe entry trap, the return probe, the socket
#   tracepoints' programs, the rest of the kernel, user space) and summed
#   per process name as CPU microseconds per pgbench transaction, mean of
#   the with-agent runs against the mean without.
#
# Root, perf (profile), PostgreSQL 15 (cargo xtask setup) and a release
# build (cargo build --release -p poolscope); run on a quiet machine.
#
#   benches/tls_profile.sh pinned|profile [PAIRS] [SECONDS] ['KERNEL_SETTING' ...]
#   e.g. benches/tls_profile.sh pinned 3 8 'tls_hook_scope = "file"'
set -euo pipefail
MODE=${1:?pinned or profile}
PAIRS=${2:-2}
SECONDS_PER_RUN=${3:-8}
shift $(( $# > 3 ? 3 : $# ))
case $MODE in
    pinned) WORKLOAD_CPU=(taskset -c 0) AGENT_CPU=(taskset -c 1) ;;
    profile) WORKLOAD_CPU=() AGENT_CPU=() ;;
    *) echo "mode: pinned or profile" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
AGENT=${POOLSCOPE_BIN:-$ROOT/target/release/poolscope}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PORT=${PORT:-55432}
WORK=$(mktemp -d /tmp/poolscope-tls-profile.XXXXXX)
chown postgres:postgres "$WORK"
chmod 755 "$WORK"
AGENT_PID=
cleanup() {
    [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"

runuser -u postgres -- "$PG_BIN/initdb" -A trust -U postgres --no-sync --no-locale -E UTF8 \
    -D "$WORK/data" >/dev/null
openssl req -new -x509 -nodes -days 2 -subj /CN=localhost \
    -keyout "$WORK/server.key" -out "$WORK/server.crt" 2>/dev/null
chmod 600 "$WORK/server.key"
chown postgres:postgres "$WORK/server.key" "$WORK/server.crt"
"${WORKLOAD_CPU[@]}" runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w -o \
    "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on \
     -c ssl_cert_file=$WORK/server.crt -c ssl_key_file=$WORK/server.key" start >/dev/null
"$PG_BIN/pgbench" -h "$WORK" -p "$PORT" -U postgres -i -s 10 postgres >/dev/null 2>&1

printf '[adapter]\nsocket = "%s/adapter.sock"\nstream_socket = "%s/stream.sock"\n' \
    "$WORK" "$WORK" > "$WORK/agent.toml"
if [ $# -gt 0 ]; then
    printf '\n[kernel]\n' >> "$WORK/agent.toml"
    printf '%s\n' "$@" >> "$WORK/agent.toml"
fi

pgbench_tls() { # SECONDS OUTPUT [perf record ARGS]
    local seconds=$1 output=$2
    shift 2
    PGSSLMODE=require "${WORKLOAD_CPU[@]}" "$@" "$PG_BIN/pgbench" -h 127.0.0.1 -p "$PORT" \
        -U postgres -n -S -c 4 -j 2 -T "$seconds" postgres > "$output" 2>&1
}

one_run() { # NAME with|without
    if [ "$2" = with ]; then
        "${AGENT_CPU[@]}" "$AGENT" run -c "$WORK/agent.toml" \
            --listen "127.0.0.1:${AGENT_PORT:-19998}" > "$WORK/agent-$1.log" 2>&1 &
        AGENT_PID=$!
        # Up, probes attached, the start-up over.
        sleep 6
    fi
    pgbench_tls 2 /dev/null # warm-up; with the agent, a first process hooks libssl
    if [ "$MODE" = profile ]; then
        pgbench_tls "$SECONDS_PER_RUN" "$WORK/pgbench-$1.out" \
            perf record -q -e cpu-clock -F 4999 -a -g -o "$WORK/perf-$1.data" --
    else
        pgbench_tls "$SECONDS_PER_RUN" "$WORK/pgbench-$1.out"
    fi
    if [ "$2" = with ]; then
        kill "$AGENT_PID"
        wait "$AGENT_PID" 2>/dev/null || true
        AGENT_PID=
    fi
}

tps() { awk '/^tps/ {print $3}' "$WORK/pgbench-$1.out"; }

echo "uptime: $(uptime)"
WITH=() WITHOUT=()
for i in $(seq "$PAIRS"); do
    if [ $((i % 2)) -eq 1 ]; then
        one_run "with$i" with; one_run "without$i" without
    else
        one_run "without$i" without; one_run "with$i" with
    fi
    WITH+=("with$i"); WITHOUT+=("without$i")
    echo "pair $i: queries/s without $(tps "without$i"), with $(tps "with$i"), ratio" \
        "$(awk -v a="$(tps "with$i")" -v b="$(tps "without$i")" 'BEGIN {printf "%.3f", a / b}')"
done
if [ "$MODE" = profile ]; then
    python3 "$ROOT/benches/tls_profile_categories.py" "$WORK" \
        "$(IFS=,; echo "${WITHOUT[*]}")" "$(IFS=,; echo "${WITH[*]}")"
fi
