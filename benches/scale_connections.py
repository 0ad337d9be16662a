#!/usr/bin/env python3
"""Scale check for a running poolscope agent: many open connections and churn.

Opens CONNECTIONS TCP connections from client processes (15,000 each: the
fd limit here cannot be raised) to listener processes (over several loopback
addresses, since one address pair has only ~28k ephemeral ports), holds them, then replaces RATE of them per second for
SECONDS (a connect and a close each). Meanwhile it samples the agent's RSS,
and at the end checks that the agent lists every open connection of the client
processes (no silent eviction) and that its kernel counters show no refused or
dropped connections. Prints one JSON object.

Usage (root; the agent must already run with its API on --api):
  benches/scale_connections.py --api 127.0.0.1:9464 --agent-pid PID \
      [--connections 100000] [--rate 5000] [--seconds 30]
"""

import argparse
import json
import os
import resource
import selectors
import socket
import sys
import time
import urllib.request

ADDRESSES = [f"127.0.0.{i}" for i in range(2, 8)]


def rss_kib(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def serve(port):
    """Accept and hold connections; close each when its client closes."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    listeners = []
    sel = selectors.DefaultSelector()
    for address in ADDRESSES:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(65535)
        listener.setblocking(False)
        sel.register(listener, selectors.EVENT_READ, "listen")
        listeners.append(listener)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "listen":
                while True:
                    try:
                        conn, _ = key.fileobj.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
            else:
                try:
                    data = key.fileobj.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()


def metric(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def get(api, path):
    with urllib.request.urlopen(f"http://{api}{path}", timeout=30) as response:
        return response.read().decode()


def open_connections(pid_port, count, start_index):
    """Non-blocking connects, spread over the loopback addresses."""
    conns = []
    for i in range(count):
        address = ADDRESSES[(start_index + i) % len(ADDRESSES)]
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex((address, pid_port))
        if err not in (0, 115):  # EINPROGRESS
            s.close()
            raise OSError(err, f"connect to {address}:{pid_port}")
        conns.append(s)
    return conns


def agent_connections_of(api, pid):
    """Open connections of `pid` that the agent lists, following pages."""
    seen = 0
    cursor = None
    for _ in range(10000):
        path = "/api/v1/connections?limit=10000"
        if cursor:
            path += f"&after={cursor}"
        body = json.loads(get(api, path))
        rows = body if isinstance(body, list) else body.get("connections", [])
        seen += sum(1 for c in rows if c.get("pid") == pid and not c.get("closed_at"))
        cursor = None if isinstance(body, list) else body.get("next")
        if not cursor:
            break
    return seen


PER_PROCESS = 15_000  # below the fd limit (RLIMIT_NOFILE) that root may not raise here


def worker(port, count, rate, seconds):
    """One client process: open `count`, wait for "go", churn, report, hold."""
    conns = []
    while len(conns) < count:
        n = min(1000, count - len(conns))
        conns.extend(open_connections(port, n, len(conns)))
        time.sleep(0.005)  # let the listener keep up with its backlog
    print("ready", flush=True)
    sys.stdin.readline()
    churned = 0
    next_index = len(conns)
    deadline = time.monotonic() + seconds
    tick = 0.05
    per_tick = max(1, int(rate * tick))
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        for s in conns[:per_tick]:
            s.close()
        del conns[:per_tick]
        conns.extend(open_connections(port, per_tick, next_index))
        next_index += per_tick
        churned += per_tick
        spare = tick - (time.monotonic() - t0)
        if spare > 0:
            time.sleep(spare)
    print(f"done {churned} {len(conns)}", flush=True)
    sys.stdin.readline()


def free_port():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def main():
    import subprocess

    parser = argparse.ArgumentParser()
    parser.add_argument("--api")
    parser.add_argument("--agent-pid", type=int)
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        serve(args.serve)
        return 0
    if args.worker:
        worker(args.worker, args.connections, args.rate, args.seconds)
        return 0
    if not args.api or not args.agent_pid:
        parser.error("--api and --agent-pid are required")

    workers = max(1, -(-args.connections // PER_PROCESS))
    me = os.path.abspath(__file__)
    servers, clients = [], []
    result = {"connections": args.connections, "rate_per_s": args.rate, "seconds": args.seconds,
              "client_processes": workers}
    try:
        ports = []
        for _ in range(workers):
            port = free_port()
            servers.append(subprocess.Popen([sys.executable, me, "--serve", str(port)],
                                            stdout=subprocess.PIPE, text=True))
            ports.append(port)
        for s in servers:
            if s.stdout.readline().strip() != "ready":
                raise RuntimeError("a listener process failed to start")
        before = get(args.api, "/metrics")
        rss_start = rss_kib(args.agent_pid)
        started = time.monotonic()
        share = args.connections // workers
        for i, port in enumerate(ports):
            count = share if i < workers - 1 else args.connections - share * (workers - 1)
            clients.append(subprocess.Popen(
                [sys.executable, me, "--worker", str(port), "--connections", str(count),
                 "--rate", str(args.rate // workers), "--seconds", str(args.seconds)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for c in clients:
            if c.stdout.readline().strip() != "ready":
                raise RuntimeError("a client process failed to open its connections")
        result["open_seconds"] = round(time.monotonic() - started, 1)
        time.sleep(3)
        result["agent_open_after_fill"] = sum(agent_connections_of(args.api, c.pid) for c in clients)
        result["rss_after_fill_kib"] = rss_kib(args.agent_pid)
        for c in clients:
            c.stdin.write("go\n")
            c.stdin.flush()
        churned, expected = 0, 0
        for c in clients:
            _, n, still_open = c.stdout.readline().split()
            churned += int(n)
            expected += int(still_open)
        result["churned"] = churned
        result["churn_rate_achieved_per_s"] = round(churned / args.seconds)
        time.sleep(3)
        result["agent_open_after_churn"] = sum(agent_connections_of(args.api, c.pid) for c in clients)
        result["expected_open"] = expected
        result["rss_end_kib"] = rss_kib(args.agent_pid)
        result["rss_start_kib"] = rss_start
        after = get(args.api, "/metrics")
        for name in (
            "poolscope_kernel_connections_untracked_total",
            "poolscope_kernel_events_dropped_total",
        ):
            result[name] = metric(after, name) - metric(before, name)
    finally:
        for c in clients:
            try:
                c.stdin.write("exit\n")
                c.stdin.flush()
            except OSError:
                pass
            c.wait(timeout=60)
        for s in servers:
            s.kill()
            s.wait()
    ok = (
        result["agent_open_after_churn"] == result["expected_open"]
        and result["poolscope_kernel_connections_untracked_total"] == 0
    )
    result["ok"] = ok
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
