#!/usr/bin/env bash
# What the agent costs a busy PostgreSQL client, measured in one run.
#
# Alternates pgbench -S runs without and with the agent (ROUNDS pairs of
# DURATION seconds each), so that machine noise hits both sides alike, and
# reports: the TPS ratio (with / without), the agent's own CPU time per
# 10,000 queries per second, how many SELECTs the agent counted against
# pgbench's transactions, and the agent's mean round-trip latency against
# pgbench's average latency.
#
# The overhead across workloads (PostgreSQL, MariaDB, Redis, file and pipe
# I/O), with CPU per operation from cgroups, is `cargo xtask bench` (see
# benches/README.md); this script stays for its latency comparison.
#
# Usage (root, after `cargo xtask setup`):
#   benches/pgbench-overhead.sh [ROUNDS] [DURATION] [CLIENTS]
set -euo pipefail
ROUNDS=${1:-5}
DURATION=${2:-10}
CLIENTS=${3:-4}
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d /tmp/poolscope-bench.XXXXXX)
chown postgres "$WORK"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
API=127.0.0.1:$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
AGENT_PID=""

cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null || true
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release -q -p poolscope
AGENT=target/release/poolscope

runuser -u postgres -- "$PGBIN/initdb" -A trust -U postgres -D "$WORK/data" >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -w -l "$WORK/pg.log" \
  -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=50" start >/dev/null
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s 10 postgres >/dev/null 2>&1

# pgbench prints "tps = N (without initial connection time)",
# "number of transactions actually processed: N" and "latency average = N ms".
run_pgbench() {
  "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -S -c "$CLIENTS" -j 2 -T "$DURATION" postgres 2>/dev/null
}
field() { sed -n "s/^$1 = \([0-9.]*\).*/\1/p"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
metric() {
  curl -s "http://$API/metrics" |
    awk -v prefix="$1" -v port="server_port=\"$PORT\"" \
      'index($0, prefix) == 1 && index($0, port) {s += $2} END {printf "%.9f", s + 0}'
}

echo "round without_tps with_tps agent_cpu_s selects_seen pgbench_txns agent_mean_ms pgbench_mean_ms"
for round in $(seq 1 "$ROUNDS"); do
  without=$(run_pgbench | field tps)

  "$AGENT" run --listen "$API" >"$WORK/agent.log" 2>&1 &
  AGENT_PID=$!
  for _ in $(seq 1 100); do curl -sf "http://$API/healthz" >/dev/null && break; sleep 0.1; done
  count0=$(metric 'db_client_operation_duration_seconds_count{db_operation_name="SELECT"')
  sum0=$(metric 'db_client_operation_duration_seconds_sum{db_operation_name="SELECT"')
  ticks0=$(cpu_ticks "$AGENT_PID")
  out=$(run_pgbench)
  ticks1=$(cpu_ticks "$AGENT_PID")
  sleep 0.2  # let the last events drain (the reader ticks every 20 ms)
  count1=$(metric 'db_client_operation_duration_seconds_count{db_operation_name="SELECT"')
  sum1=$(metric 'db_client_operation_duration_seconds_sum{db_operation_name="SELECT"')
  kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true; AGENT_PID=""

  with=$(echo "$out" | field tps)
  txns=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
  pg_lat=$(echo "$out" | field 'latency average')
  python3 - "$round" "$without" "$with" "$ticks0" "$ticks1" "$count0" "$count1" "$sum0" "$sum1" "$txns" "$pg_lat" <<'EOF'
import sys
r, without, with_, t0, t1, c0, c1, s0, s1, txns, pg_lat = sys.argv[1:]
cpu = (float(t1) - float(t0)) / 100.0
seen = float(c1) - float(c0)
mean_ms = (float(s1) - float(s0)) / seen * 1e3 if seen else 0.0
print(f"{r} {float(without):.0f} {float(with_):.0f} {cpu:.2f} {seen:.0f} {txns} {mean_ms:.3f} {float(pg_lat):.3f}")
EOF
done | tee "$WORK/rounds.txt"

python3 - "$WORK/rounds.txt" "$DURATION" <<'EOF'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l[0].isdigit()]
duration = float(sys.argv[2])
without = sum(float(r[1]) for r in rows) / len(rows)
with_ = sum(float(r[2]) for r in rows) / len(rows)
cpu = sum(float(r[3]) for r in rows)
queries = sum(float(r[5]) for r in rows)
seen = sum(float(r[4]) for r in rows)
qps = queries / (duration * len(rows))
core_share = cpu / (duration * len(rows))
per_10k = core_share / (qps / 10_000) * 100
mean_agent = sum(float(r[6]) for r in rows) / len(rows)
mean_pg = sum(float(r[7]) for r in rows) / len(rows)
print()
print(f"TPS without agent (mean): {without:.0f}")
print(f"TPS with agent (mean):    {with_:.0f}")
print(f"ratio with/without:       {with_ / without:.3f}")
print(f"agent CPU:                {core_share * 100:.2f}% of a core at {qps:.0f} queries/s = {per_10k:.2f}% of a core per 10,000 queries/s")
print(f"SELECTs seen / pgbench transactions: {seen:.0f} / {queries:.0f} = {seen / queries:.4f}")
print(f"mean latency, agent / pgbench: {mean_agent:.3f} ms / {mean_pg:.3f} ms = {mean_agent / mean_pg:.3f}")
EOF
