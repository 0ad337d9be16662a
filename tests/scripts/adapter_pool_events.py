#!/usr/bin/env python3
"""One pool's life told over the adapter socket, as an adapter would tell it.

Usage: adapter_pool_events.py SOCKET PORT POOL

Opens one real connection (psycopg 3, autocommit, no TLS) to PostgreSQL on
127.0.0.1:PORT and reports, for pool POOL, over the agent's adapter socket
(version 1 of docs/adapter-protocol.md, the connection named by its fd):

  pool                 postgresql 127.0.0.1:PORT/postgres, max 5, min_idle 1,
                       idle_max 5
  connection_created   the connection
  acquire_start 1      1.5 s ago (mono_ns in the past; the process first
                       lives that long, because the agent never dates a
                       message before its sender started)
  acquire_end 1        ok, the connection: a slow acquire of 1.5 s
  release              the connection
  acquire_start 2      0.2 s ago
  acquire_end 2        timeout

No statement is sent, so the port's round-trip counts stay the test's own.
Then it prints one JSON line {"pid": N, "fd": FD, "messages": 7} and waits
for stdin to close, keeping the pool (and its connection) alive.
"""

import json
import os
import socket
import sys
import time

import psycopg

STARTED = time.monotonic()


def main():
    sock_path, port, pool = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conn = psycopg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        dbname="postgres",
        sslmode="disable",
        gssencmode="disable",
        autocommit=True,
    )
    fd = conn.fileno()
    out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sent = 0

    def send(kind, ago_s=0.0, **fields):
        nonlocal sent
        message = {
            "v": 1,
            "kind": kind,
            "pool": pool,
            "mono_ns": time.monotonic_ns() - int(ago_s * 1e9),
        }
        message.update(fields)
        out.sendto(json.dumps(message).encode(), sock_path)
        sent += 1

    send(
        "pool",
        db_system="postgresql",
        server_address="127.0.0.1",
        server_port=port,
        namespace="postgres",
        max=5,
        min_idle=1,
        idle_max=5,
        library="poolscope-tests",
    )
    send("connection_created", fd=fd)
    time.sleep(max(0.0, 1.6 - (time.monotonic() - STARTED)))
    send("acquire_start", ago_s=1.5, request=1)
    send("acquire_end", request=1, result="ok", fd=fd)
    send("release", fd=fd)
    send("acquire_start", ago_s=0.2, request=2)
    send("acquire_end", request=2, result="timeout")
    sys.stdout.write(json.dumps({"pid": os.getpid(), "fd": fd, "messages": sent}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()
    conn.close()


if __name__ == "__main__":
    main()
