#!/usr/bin/env bash
# The agent's footprint as a container's limits see it, for the resources of
# deploy/kubernetes/daemonset.yaml: memory as its own memory cgroup counts it
# (process memory plus kernel memory: BPF maps, the ring buffer, programs,
# all charged to the cgroup that created them) and CPU time, while pgbench -S
# runs against a throwaway PostgreSQL (started as benches/pgbench-overhead.sh
# does).
#
# Usage (root, after `cargo xtask setup && cargo build --release -p poolscope`):
#   deploy/measure-footprint.sh [DURATION] [CLIENTS]
set -euo pipefail
DURATION=${1:-30}
CLIENTS=${2:-8}
cd "$(dirname "$0")/.."
AGENT=${POOLSCOPE_BIN:-target/release/poolscope}

PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d /tmp/poolscope-footprint.XXXXXX)
chown postgres "$WORK"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
API=127.0.0.1:$(free_port)

# A memory cgroup of our own, under the one we run in (v2 or v1).
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  CG=/sys/fs/cgroup$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup)/poolscope-footprint-$$
  mkdir "$CG"
  usage() { cat "$CG/memory.current"; }
  peak() { cat "$CG/memory.peak" 2>/dev/null || echo 0; }
else
  CG=/sys/fs/cgroup/memory$(awk -F: '$2=="memory"{print $3}' /proc/self/cgroup)/poolscope-footprint-$$
  mkdir "$CG"
  usage() { cat "$CG/memory.usage_in_bytes"; }
  peak() { cat "$CG/memory.max_usage_in_bytes"; }
fi
AGENT_PID=""
cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rmdir "$CG" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

runuser -u postgres -- "$PGBIN/initdb" -A trust -U postgres -D "$WORK/data" >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/data" -w -l "$WORK/pg.log" \
  -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=50" start >/dev/null
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s 10 postgres >/dev/null 2>&1

# The agent's own adapter socket path, so that a running agent's is left alone.
printf '[adapter]\nsocket = "%s/adapter.sock"\n' "$WORK" >"$WORK/poolscope.toml"
sh -c "echo \$\$ > $CG/cgroup.procs; exec $AGENT run --config $WORK/poolscope.toml --listen $API" \
  >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 100); do curl -sf "http://$API/healthz" >/dev/null && break; sleep 0.1; done
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
ticks() { awk '{print $14 + $15}' "/proc/$AGENT_PID/stat"; }
status() { awk -v f="$1:" '$1 == f {print $2}' "/proc/$AGENT_PID/status"; }
selects() {
  curl -s "http://$API/metrics" | awk -v port="server_port=\"$PORT\"" \
    'index($0, "db_client_operation_duration_seconds_count{") == 1 && index($0, port) && index($0, "SELECT") {s += $2} END {print s + 0}'
}

echo "after start: cgroup $(mib "$(usage)"), VmRSS $(status VmRSS) kB"
t0=$(ticks); s0=$(date +%s.%N)
out=$("$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -S -c "$CLIENTS" -j 2 -T "$DURATION" postgres 2>/dev/null)
t1=$(ticks); s1=$(date +%s.%N)
sleep 0.5
txns=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
echo "pgbench -S -c $CLIENTS -T $DURATION: $txns transactions, $(selects) SELECTs counted by the agent"
awk -v a="$t0" -v b="$t1" -v s="$s0" -v e="$s1" \
  'BEGIN {printf "agent CPU: %.2f s in %.1f s = %.1f%% of one core\n", (b - a) / 100, e - s, (b - a) / (e - s)}'
echo "memory: cgroup now $(mib "$(usage)"), cgroup peak $(mib "$(peak)"); VmRSS $(status VmRSS) kB, VmHWM $(status VmHWM) kB"
sleep 20
t2=$(ticks)
awk -v a="$t1" -v b="$t2" 'BEGIN {printf "idle 20 s: agent CPU %.2f s\n", (b - a) / 100}'
