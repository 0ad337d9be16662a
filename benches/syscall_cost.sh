#!/usr/bin/env bash
# CPU time of one cheap syscall (getppid) with no agent, with the agent
# watching TCP only (kernel.unix_sockets = false: no syscall tracepoint) and
# with it watching Unix sockets too (sys_enter/exit_connect and
# sys_enter_close attached, which sends every syscall of every task through
# the kernel's slow path). Alternates the three, ROUNDS times; prints ns per
# call, median of the rounds. Root; run on a quiet machine.
#
#   benches/syscall_cost.sh [ROUNDS] [CALLS]
set -euo pipefail
ROUNDS=${1:-7}
CALLS=${2:-20000000}
cd "$(dirname "$0")/.."
BIN=${POOLSCOPE_BIN:-target/release/poolscope}
WORK=$(mktemp -d /tmp/poolscope-syscall-cost.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

cat > "$WORK/loop.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    struct timespec a, b;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
C
gcc -O2 -o "$WORK/loop" "$WORK/loop.c"

run_with() { # $1: none | tcp | unix
    local agent=""
    if [ "$1" != none ]; then
        local unix=false
        [ "$1" = unix ] && unix=true
        printf '[http]\nlisten = "127.0.0.1:0"\n[adapter]\nenabled = false\n[kernel]\nunix_sockets = %s\n' \
            "$unix" > "$WORK/agent.toml"
        "$BIN" run --config "$WORK/agent.toml" > "$WORK/agent-$1.log" 2>&1 &
        agent=$!
        for _ in $(seq 100); do
            grep -q "kernel probes attached" "$WORK/agent-$1.log" && break
            sleep 0.1
        done
        sleep 1
    fi
    taskset -c 0 "$WORK/loop" "$CALLS"
    if [ -n "$agent" ]; then kill -INT "$agent"; wait "$agent" || true; fi
}

declare -A results
for round in $(seq "$ROUNDS"); do
    for mode in none tcp unix; do
        results[$mode]+="$(run_with $mode) "
    done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)] " [" a[1] ".." a[NR] "]"}'; }
echo "getppid CPU ns per call, median [min..max] of $ROUNDS rounds of $CALLS calls:"
for mode in none tcp unix; do
    echo "  $mode: $(echo "${results[$mode]}" | median)"
done
