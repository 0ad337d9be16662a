#!/usr/bin/env python3
"""CPU per pgbench transaction by process and category, from perf profiles.

Used by benches/tls_profile.sh:
    tls_profile_categories.py WORKDIR WITHOUT_RUNS WITH_RUNS
where WORKDIR holds perf-NAME.data and pgbench-NAME.out for each run name
and the run lists are comma-separated. A sample's category comes from its
call stack: the uprobe entry trap (`asm_exc_int3`), the return probe
(`uretprobe` / `uprobe_handle_trampoline`), BPF programs run from the
socket tracepoints, the rest of the kernel, or user space.
"""
import collections
import re
import subprocess
import sys


def category(frames):
    symbols = [symbol for _, symbol in frames]
    if any("asm_exc_int3" in s for s in symbols):
        return "uprobe entry trap (+ its program)"
    if any("uretprobe" in s or "uprobe_handle_trampoline" in s for s in symbols):
        return "uprobe return (+ its program)"
    if any(s.startswith("bpf_prog_") or "bpf_trace_run" in s for s in symbols):
        return "socket tracepoint programs"
    if frames and frames[0][0].startswith("ffffffff"):
        return "kernel, other"
    return "user space"


def per_transaction(workdir, name):
    out = open(f"{workdir}/pgbench-{name}.out").read()
    transactions = int(re.search(r"actually processed: (\d+)", out).group(1))
    script = subprocess.run(
        ["perf", "script", "-i", f"{workdir}/perf-{name}.data", "-F", "comm,period,ip,sym"],
        capture_output=True, text=True, check=True,
    ).stdout
    ns = collections.Counter()
    for block in script.split("\n\n"):
        lines = block.strip("\n").split("\n")
        head = lines[0].split()
        if len(head) < 2 or not head[-1].isdigit():
            continue
        comm, period = " ".join(head[:-1]), int(head[-1])
        frames = []
        for line in lines[1:]:
            parts = line.split(None, 1)
            if parts:
                frames.append((parts[0], parts[1] if len(parts) > 1 else "?"))
        if comm.startswith("tokio") or comm == "poolscope":
            comm = "agent"
        ns[(comm, category(frames))] += period
    return {key: value / transactions / 1000 for key, value in ns.items()}


def mean(workdir, names):
    total = collections.Counter()
    for name in names:
        for key, value in per_transaction(workdir, name).items():
            total[key] += value / len(names)
    return total


def main():
    workdir, without, with_agent = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
    before, after = mean(workdir, without), mean(workdir, with_agent)
    print("| process | category | us/transaction without | with | difference |")
    print("|---|---|---:|---:|---:|")
    keys = sorted(set(before) | set(after), key=lambda k: -(after[k] + before[k]))
    for key in keys:
        if before[key] + after[key] < 0.05:
            continue
        print(f"| {key[0]} | {key[1]} | {before[key]:.2f} | {after[key]:.2f} | "
              f"{after[key] - before[key]:+.2f} |")
    print(f"| all | all | {sum(before.values()):.2f} | {sum(after.values()):.2f} | "
          f"{sum(after.values()) - sum(before.values()):+.2f} |")


if __name__ == "__main__":
    main()
