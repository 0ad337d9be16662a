#!/usr/bin/env bash
# What one uprobe hit costs on this machine, without poolscope: CPU time per
# call of a function called in a loop, with no probe, with a tracefs uprobe
# on a function whose first instruction the kernel must single-step (`sub
# $0x18,%rsp`, as OpenSSL's SSL_read/SSL_write start on Debian) and with one
# whose first instruction it emulates (`push %rbp`), and with a return probe
# (uretprobe) on the latter: a breakpoint at its entry plus the return
# trampoline, as each hooked TLS call pays. A single-step is a trap that
# hypervisors may intercept (a VM exit each). Alternates the four, ROUNDS
# times; prints microseconds per call, median of the rounds.
# Root (tracefs); run on a quiet machine.
#
#   benches/uprobe_cost.sh [ROUNDS] [CALLS]
set -euo pipefail
ROUNDS=${1:-5}
CALLS=${2:-200000}
TRACEFS=/sys/kernel/tracing
WORK=$(mktemp -d /tmp/poolscope-uprobe-cost.XXXXXX)
GROUP=poolscope_uprobe_cost
cleanup() {
    for e in stepped emulated returned; do
        echo 0 > "$TRACEFS/events/$GROUP/$e/enable" 2>/dev/null || true
        echo "-:$GROUP/$e" >> "$TRACEFS/uprobe_events" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
mountpoint -q "$TRACEFS" || mount -t tracefs nodev "$TRACEFS"

cat > "$WORK/loop.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
/* First instruction single-stepped by the kernel's uprobes (x86-64). */
int stepped(int x);
__asm__(".globl stepped\n.type stepped,@function\nstepped:\n"
        " sub $0x18,%rsp\n lea 1(%rdi),%eax\n add $0x18,%rsp\n ret\n");
/* First instruction emulated by the kernel's uprobes (no single-step). */
int emulated(int x);
__asm__(".globl emulated\n.type emulated,@function\nemulated:\n"
        " push %rbp\n lea 1(%rdi),%eax\n pop %rbp\n ret\n");
int main(int argc, char **argv) {
    long n = atol(argv[2]);
    int (*f)(int) = argv[1][0] == 's' ? stepped : emulated;
    struct timespec a, b;
    int s = 0;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
    for (long i = 0; i < n; i++) s = f(s);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
    printf("%.3f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n / 1000.0 + s * 0.0);
    return 0;
}
C
gcc -O2 -o "$WORK/loop" "$WORK/loop.c"

# The file offset of a symbol (what a uprobe takes), from its address.
file_offset() {
    python3 - "$WORK/loop" "$1" <<'PY'
import subprocess, sys
path, name = sys.argv[1], sys.argv[2]
addr = next(int(l.split()[0], 16) for l in subprocess.check_output(["nm", path], text=True).splitlines()
            if l.split()[-1] == name)
for l in subprocess.check_output(["readelf", "-lW", path], text=True).splitlines():
    f = l.split()
    if f and f[0] == "LOAD":
        off, vaddr, filesz = int(f[1], 16), int(f[2], 16), int(f[4], 16)
        if vaddr <= addr < vaddr + filesz:
            print(hex(addr - vaddr + off))
PY
}
for e in stepped emulated; do
    echo "p:$GROUP/$e $WORK/loop:$(file_offset $e)" >> "$TRACEFS/uprobe_events"
done
echo "r:$GROUP/returned $WORK/loop:$(file_offset emulated)" >> "$TRACEFS/uprobe_events"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A results
for round in $(seq "$ROUNDS"); do
    results[none]+="$("$WORK/loop" s "$CALLS") "
    for e in stepped emulated returned; do
        echo 1 > "$TRACEFS/events/$GROUP/$e/enable"
        # "returned" probes the emulated function ('e'); 's' the other.
        results[$e]+="$("$WORK/loop" "$([ $e = stepped ] && echo s || echo e)" "$CALLS") "
        echo 0 > "$TRACEFS/events/$GROUP/$e/enable"
    done
done
echo > "$TRACEFS/trace"
for k in none stepped emulated returned; do
    printf '%-9s %s us/call (median of %s rounds: %s)\n' "$k" \
        "$(tr ' ' '\n' <<<"${results[$k]}" | grep . | median)" "$ROUNDS" "${results[$k]}"
done
