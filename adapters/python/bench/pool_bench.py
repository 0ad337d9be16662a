"""The adapter bench's Python side (`cargo xtask bench --only adapters`,
xtask/src/bench/adapters.rs): one loop over a real psycopg_pool pool, then
one JSON line on stdout.

MODE=pairs only: N getconn()/putconn() pairs, no query, after WARMUP pairs,
paced at RATE pairs a second at most (0: unpaced). ADAPTER=on instruments
the pool (instrument_psycopg_pool) right after creating it; off does not:
the loop is the same code either way. The loop runs 20 frames below the
program's top, as a request handler runs in a web framework, so that a
holder stack (captured at every checkout unless POOLSCOPE_ADAPTER_STACKS is
off) has as many frames to walk as in an application.

CPU time is the whole process's (time.process_time(): all threads, the
adapter's background threads included); wall time from time.monotonic_ns().

Environment: MODE, ADAPTER, AGENT, N, RATE, WARMUP, PG_PORT, and the
adapter's own (POOLSCOPE_ADAPTER_SOCKET, POOLSCOPE_ADAPTER_STACKS).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import psycopg_pool  # noqa: E402

from poolscope_adapter import instrument_psycopg_pool  # noqa: E402

PAIRS_PER_CHECK = 64
FRAMES_BELOW_TOP = 20


def env(name, default):
    return os.environ.get(name) or default


def pairs(pool, n, rate):
    start = time.monotonic_ns()
    for i in range(n):
        conn = pool.getconn()
        pool.putconn(conn)
        if rate > 0 and i % PAIRS_PER_CHECK == PAIRS_PER_CHECK - 1:
            ahead = (i + 1) / rate - (time.monotonic_ns() - start) / 1e9
            if ahead > 0.001:
                time.sleep(ahead)
    return n


def below(depth, fn):
    if depth == 0:
        return fn()
    return below(depth - 1, fn)


def main():
    if env("MODE", "pairs") != "pairs":
        sys.exit("the Python bench runs MODE=pairs only")
    adapter = env("ADAPTER", "off") == "on"
    n = int(env("N", "100000"))
    warmup = int(env("WARMUP", "20000"))
    rate = int(env("RATE", "0"))
    url = "host=127.0.0.1 port=%s user=postgres dbname=postgres" % env("PG_PORT", "5432")
    pool = psycopg_pool.ConnectionPool(url, min_size=4, max_size=4, open=False)
    reporter = instrument_psycopg_pool(pool, pool_name="bench-python") if adapter else None
    pool.open(wait=True)
    below(FRAMES_BELOW_TOP, lambda: pairs(pool, warmup, rate))
    sender = reporter.reporter.sender if reporter is not None else None
    before = sender.stats() if sender else None
    cpu0, wall0 = time.process_time_ns(), time.monotonic_ns()
    ops = below(FRAMES_BELOW_TOP, lambda: pairs(pool, n, rate))
    cpu, wall = time.process_time_ns() - cpu0, time.monotonic_ns() - wall0
    result = {"ops": ops, "cpu_ns": cpu, "wall_ns": wall}
    if sender is not None:
        after = sender.stats()
        result["sent"] = after["sent"] - before["sent"]
        result["dropped"] = after["dropped"] - before["dropped"]
        result["sent_total"] = after["sent"]
    pool.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
