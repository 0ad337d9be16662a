#!/usr/bin/env python3
"""An application with real connection pools, driven by one JSON request
per line on stdin (one JSON answer line each: {"ok": true, ...} or
{"ok": false, "error": "..."}). The adapter tests spawn it so that they know
the pid whose pools and connections the agent reports on.

The pool adapter (adapters/python, on PYTHONPATH) is used only when a pool
is created with "adapter": true; it sends to $POOLSCOPE_ADAPTER_SOCKET.
Every count this app answers is its own (what it did), independent of the
adapter, so that the tests can compare the agent's view with the truth.

  {"op": "pid"}                        -> {"pid": N, "tid": main thread's native id}
  {"op": "sqlalchemy", "engine": E, "port": P, "pool_size": 5,
   "max_overflow": 10, "pool_timeout": 30, "poolclass": "queue"|"null",
   "adapter": true, "pool_name": "orders", "state_interval": 30,
   "sslmode": "disable"}
      a SQLAlchemy engine (psycopg 3) named E -> {"pool_name": ...};
      libpq's sslmode ("require": TLS without verifying the certificate)
  {"op": "psycopg_pool", "engine": E, "port": P, "min_size": 2, "max_size": 4,
   "adapter": true, "pool_name": "billing", "state_interval": 30}
      a psycopg_pool.ConnectionPool named E (opened, waits for min_size)
  {"op": "sqlite_pool", "engine": E, "path": FILE, "max_size": 2, "timeout": 30,
   "adapter": true, "pool_name": "handles"}
      a hand-rolled pool of SQLite handles on FILE (HandlePool below),
      reported with the generic reporter (report_pool)
  {"op": "pool_state", "engine": E}  -> {"used", "idle", "max"} of a HandlePool
  {"op": "checkout", "engine": E, "id": ID}
      holds one connection under ID, does nothing with it
      -> {"fd", "local_port", "local_address"}
  {"op": "query", "id": ID, "sql": "SELECT 1", "commit": true,
   "autocommit": false}
      one statement on a held connection (and COMMIT unless commit=false);
      with autocommit=true the connection is switched to autocommit first
      (SQLAlchemy's AUTOCOMMIT isolation level), so that the statement goes
      alone, with no BEGIN before it nor COMMIT after it
  {"op": "idle_in_transaction", "id": ID}  BEGIN and a SELECT, left open
  {"op": "busy", "id": ID, "interval": 0.1}
      a thread runs SELECT + COMMIT on the held connection every interval
  {"op": "busy_stop", "id": ID}       -> {"queries": N}
  {"op": "release", "id": ID, "after": 0.0}
      returns the connection to its pool (after sleeping `after` seconds)
  {"op": "waiter", "engine": E, "id": ID}
      a thread asks the pool for a connection (and holds it if it gets one)
  {"op": "waiter_result", "id": ID}   waits for it
      -> {"result": "ok"|"timeout"|"error", "waited": s, "tid": the waiting thread}
  {"op": "churn_start", "engine": E, "interval": 1.0}
      a thread keeps one fresh connection of E open and busy: every
      interval it opens a new one and closes the previous one
  {"op": "churn_stop"}                -> {"local_ports": [...]}
  {"op": "load", "engine": E, "threads": 4, "seconds": 120, "pause": 0.01}
      starts threads doing short transactions (checkout, 3 statements,
      checkin) until the time is up
  {"op": "load_wait"}                 -> {"transactions", "errors"}
  {"op": "counts", "engine": E}      -> {"acquires", "releases"} done by this app
  {"op": "adapter_stats"}            -> the adapter sender's counters
      {"sent", "dropped", "dropped_by", "deferred", "backlogged"}
  {"op": "hidden_pools", "port": P, "threads": 8, "per_thread": 3,
   "noisy_threads": 2, "queries": 20}
      two pools, "alpha" and "beta", whose connections are reported by id
      alone (generic reporter, connected_here=True), opened by many threads
      at once, each alternating between the pools; the first noisy_threads
      threads first open a connection of their own (unpooled); then every
      thread runs `queries` checkouts with SELECT 1 on each of its
      connections, all at once. With "hold": true, the first and the last
      thread then keep their last connection checked out, unused (leaks).
      Everything stays open.
      -> {"connections": [{"pool", "conn", "local_address", "tid", "noisy", "held"}]}
  {"op": "pool_checkouts", "engine": E, "n": N}
      N sequential checkout/SELECT/checkin (psycopg_pool: half through
      connection(), half through getconn/putconn)
"""

import json
import os
import socket
import sys
import threading
import time

engines = {}  # name -> Engine
kinds = {}  # engine name -> "sqlalchemy" | "psycopg_pool"
held = {}  # id -> (engine name, connection object)
busy = {}  # id -> (thread, stop event, counter list)
waiters = {}  # id -> (thread, result dict)
churn = None
load = None
counts = {}  # engine name -> {"acquires": n, "releases": n}
count_lock = threading.Lock()


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def count(engine, key):
    with count_lock:
        counts.setdefault(engine, {"acquires": 0, "releases": 0})[key] += 1


def dbapi_of(name, conn):
    if kinds[name] == "sqlite":
        return conn
    if kinds[name] == "sqlalchemy":
        return conn.connection.dbapi_connection
    return conn


def describe(name, conn):
    if kinds[name] == "sqlite":
        return {}  # a handle has no socket
    fd = dbapi_of(name, conn).pgconn.socket
    s = socket.socket(fileno=fd)
    try:
        host, port = s.getsockname()[:2]
    finally:
        s.detach()
    return {"fd": fd, "local_port": port, "local_address": "%s:%d" % (host, port)}


def acquire(name):
    """One checkout through the pool's usual front door."""
    engine = engines[name]
    if kinds[name] == "sqlalchemy":
        conn = engine.connect()
    elif kinds[name] == "sqlite":
        conn = engine.get()
    else:
        conn = engine.getconn()
    count(name, "acquires")
    return conn


def give_back(name, conn):
    if kinds[name] == "sqlalchemy":
        conn.close()
    elif kinds[name] == "sqlite":
        engines[name].put(conn)
    else:
        engines[name].putconn(conn)
    count(name, "releases")


def run(name, conn, sql, commit=True, autocommit=False):
    if autocommit:
        if kinds[name] == "sqlalchemy":
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql(sql)
        else:
            conn.autocommit = True
            conn.execute(sql)
        return
    if kinds[name] == "sqlalchemy":
        conn.exec_driver_sql(sql)
        if commit:
            conn.commit()
    else:
        conn.execute(sql)
        if commit:
            conn.commit()


def op_sqlalchemy(req):
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    name = req.get("engine", "main")
    url = "postgresql+psycopg://postgres@127.0.0.1:%d/postgres" % int(req["port"])
    sslmode = req.get("sslmode", "disable")
    options = {"connect_args": {"sslmode": sslmode, "gssencmode": "disable"}}
    if req.get("poolclass", "queue") == "null":
        options["poolclass"] = NullPool
    else:
        options.update(
            pool_size=int(req.get("pool_size", 5)),
            max_overflow=int(req.get("max_overflow", 10)),
            pool_timeout=float(req.get("pool_timeout", 30)),
        )
    engine = sqlalchemy.create_engine(url, **options)
    engines[name] = engine
    kinds[name] = "sqlalchemy"
    pool_name = None
    if req.get("adapter"):
        from poolscope_adapter import instrument_sqlalchemy

        inst = instrument_sqlalchemy(
            engine, pool_name=req.get("pool_name"), state_interval=req.get("state_interval")
        )
        if inst is None:
            raise RuntimeError("instrument_sqlalchemy failed")
        pool_name = inst.name
    return {"pool_name": pool_name}


class HandlePool:
    """A pool of SQLite handles as services keep them by hand: at most
    `max_size` open, handed out idle first, callers waiting up to `timeout`
    seconds for one when all are out. Reported through the generic
    reporter when `report` is given."""

    def __init__(self, path, max_size, timeout, report=None):
        import sqlite3

        self.connect = lambda: sqlite3.connect(path, check_same_thread=False)
        self.max_size = max_size
        self.timeout = timeout
        self.report = report
        self.cond = threading.Condition()
        self.idle = []
        self.open = 0
        self.used = 0

    def get(self):
        waiting = self.report.acquire() if self.report else None
        deadline = time.monotonic() + self.timeout
        created = None
        with self.cond:
            while not self.idle and self.open >= self.max_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if waiting:
                        waiting.timeout()
                    raise TimeoutError("pool full: %d of %d handles out" % (self.used, self.max_size))
                self.cond.wait(remaining)
            if self.idle:
                handle = self.idle.pop()
            else:
                handle = created = self.connect()
                self.open += 1
            self.used += 1
        if self.report:
            if created is not None:
                self.report.connection_created(created)
            waiting.ok(handle)
        return handle

    def put(self, handle):
        if self.report:
            self.report.released(handle)
        with self.cond:
            self.used -= 1
            self.idle.append(handle)
            self.cond.notify()

    def state(self):
        with self.cond:
            return {"used": self.used, "idle": len(self.idle), "max": self.max_size}


def op_sqlite_pool(req):
    name = req.get("engine", "main")
    report = None
    if req.get("adapter"):
        from poolscope_adapter import report_pool

        report = report_pool(
            req.get("pool_name") or name,
            db_system="sqlite",
            server_address=req["path"],
            max=int(req.get("max_size", 2)),
            library="handle_pool",
            state_interval=req.get("state_interval"),
        )
    engines[name] = HandlePool(
        req["path"], int(req.get("max_size", 2)), float(req.get("timeout", 30)), report
    )
    kinds[name] = "sqlite"
    return {"pool_name": report.name if report else None}


hidden = []  # connections of op_hidden_pools, kept open


def local_address_of(conn):
    s = socket.socket(fileno=conn.pgconn.socket)
    try:
        host, port = s.getsockname()[:2]
    finally:
        s.detach()
    return "%s:%d" % (host, port)


def op_hidden_pools(req):
    import psycopg
    from poolscope_adapter import report_pool

    port = int(req["port"])
    threads = int(req.get("threads", 8))
    per_thread = int(req.get("per_thread", 3))
    noisy_threads = int(req.get("noisy_threads", 2))
    queries = int(req.get("queries", 20))
    hold = bool(req.get("hold", False))
    conninfo = "host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=disable gssencmode=disable" % port
    pools = [
        (name, report_pool(name, db_system="postgresql", server_address="127.0.0.1",
                           server_port=port, max=threads * per_thread, library="hidden_pool"))
        for name in ("alpha", "beta")
    ]
    truth = []
    errors = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(i):
        try:
            noisy = i < noisy_threads
            tid = threading.get_native_id()
            mine = []
            start.wait()
            if noisy:
                own = psycopg.connect(conninfo, autocommit=True)
                with lock:
                    hidden.append(own)
            for _ in range(per_thread):
                for name, report in pools:
                    conn = psycopg.connect(conninfo, autocommit=True)
                    report.connection_created(conn, connected_here=True)
                    mine.append((report, conn))
                    with lock:
                        hidden.append(conn)
                        truth.append({"pool": name, "conn": report.conn_id(conn),
                                      "local_address": local_address_of(conn),
                                      "tid": tid, "noisy": noisy, "held": False})
            for _ in range(queries):
                for report, conn in mine:
                    waiting = report.acquire()
                    waiting.ok(conn)
                    conn.execute("SELECT 1").fetchone()
                    report.released(conn)
            if hold and i in (0, threads - 1):
                report, conn = mine[-1]
                report.acquire().ok(conn)
                with lock:
                    for entry in truth:
                        if entry["conn"] == report.conn_id(conn) and entry["pool"] == report.name:
                            entry["held"] = True
        except Exception as e:  # the answer says so
            with lock:
                errors.append("%s: %s" % (type(e).__name__, e))

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return {"connections": truth}


def op_pool_state(req):
    return engines[req.get("engine", "main")].state()


def op_psycopg_pool(req):
    import psycopg_pool

    name = req.get("engine", "main")
    conninfo = "host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=disable gssencmode=disable" % int(
        req["port"]
    )
    pool = psycopg_pool.ConnectionPool(
        conninfo,
        min_size=int(req.get("min_size", 2)),
        max_size=int(req.get("max_size", 4)),
        timeout=float(req.get("timeout", 30)),
        name=req.get("pool_name") or name,
        open=False,
    )
    pool_name = None
    if req.get("adapter"):
        from poolscope_adapter import instrument_psycopg_pool

        inst = instrument_psycopg_pool(
            pool, pool_name=req.get("pool_name"), state_interval=req.get("state_interval")
        )
        if inst is None:
            raise RuntimeError("instrument_psycopg_pool failed")
        pool_name = inst.name
    pool.open(wait=True, timeout=30)
    engines[name] = pool
    kinds[name] = "psycopg_pool"
    return {"pool_name": pool_name}


def take_and_keep_for_later(name):
    """The code a leak report's holder stack must name."""
    return acquire(name)


def op_checkout(req):
    name = req.get("engine", "main")
    conn = take_and_keep_for_later(name)
    held[req["id"]] = (name, conn)
    return describe(name, conn)


def op_query(req):
    name, conn = held[req["id"]]
    run(
        name,
        conn,
        req.get("sql", "SELECT 1"),
        commit=req.get("commit", True),
        autocommit=req.get("autocommit", False),
    )
    return {}


def op_idle_in_transaction(req):
    name, conn = held[req["id"]]
    if kinds[name] == "sqlalchemy":
        conn.begin()
        conn.exec_driver_sql("SELECT 1")
    else:
        conn.execute("SELECT 1")  # psycopg opens the transaction itself
    return {}


def op_busy(req):
    name, conn = held[req["id"]]
    interval = float(req.get("interval", 0.1))
    stop = threading.Event()
    done = [0]

    def loop():
        while not stop.is_set():
            run(name, conn, "SELECT 1")
            done[0] += 1
            stop.wait(interval)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    busy[req["id"]] = (t, stop, done)
    return {}


def op_busy_stop(req):
    t, stop, done = busy.pop(req["id"])
    stop.set()
    t.join()
    return {"queries": done[0]}


def op_release(req):
    after = float(req.get("after", 0))
    if after:
        time.sleep(after)
    name, conn = held.pop(req["id"])
    give_back(name, conn)
    return {}


def op_waiter(req):
    name = req.get("engine", "main")
    result = {}

    def wait():
        result["tid"] = threading.get_native_id()
        t0 = time.monotonic()
        try:
            conn = acquire(name)
        except Exception as e:
            result["waited"] = time.monotonic() - t0
            timeout = type(e).__name__ in ("TimeoutError", "PoolTimeout")
            result["result"] = "timeout" if timeout else "error"
            result["error"] = "%s: %s" % (type(e).__name__, e)
            return
        result["waited"] = time.monotonic() - t0
        result["result"] = "ok"
        held[req["id"]] = (name, conn)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    waiters[req["id"]] = (t, result)
    return {}


def op_waiter_result(req):
    t, result = waiters.pop(req["id"])
    t.join(timeout=float(req.get("timeout", 60)))
    if t.is_alive():
        raise RuntimeError("the waiter is still waiting")
    return dict(result)


def op_churn_start(req):
    global churn
    name = req.get("engine", "main")
    interval = float(req.get("interval", 1.0))
    stop = threading.Event()
    ports = []

    def loop():
        current = None
        while not stop.is_set():
            new = acquire(name)
            run(name, new, "SELECT 1")
            ports.append(describe(name, new)["local_port"])
            if current is not None:
                give_back(name, current)
            current = new
            deadline = time.monotonic() + interval
            while not stop.is_set() and time.monotonic() < deadline:
                run(name, current, "SELECT 1")
                stop.wait(0.1)
        if current is not None:
            give_back(name, current)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    churn = (t, stop, ports)
    return {}


def op_churn_stop(req):
    global churn
    t, stop, ports = churn
    churn = None
    stop.set()
    t.join()
    return {"local_ports": ports}


def op_load(req):
    global load
    name = req.get("engine", "main")
    seconds = float(req.get("seconds", 10))
    pause = float(req.get("pause", 0.01))
    nthreads = int(req.get("threads", 4))
    deadline = time.monotonic() + seconds
    stats = {"transactions": 0, "errors": 0}
    lock = threading.Lock()

    def work(n):
        import random

        rnd = random.Random(n)
        while time.monotonic() < deadline:
            try:
                conn = acquire(name)
                try:
                    aid = rnd.randint(1, 100)
                    delta = rnd.randint(-50, 50)
                    if kinds[name] == "sqlalchemy":
                        conn.exec_driver_sql(
                            "UPDATE accounts SET balance = balance + %(d)s WHERE aid = %(a)s",
                            {"d": delta, "a": aid},
                        )
                        conn.exec_driver_sql("SELECT balance FROM accounts WHERE aid = %(a)s", {"a": aid})
                        conn.exec_driver_sql(
                            "INSERT INTO history (aid, delta) VALUES (%(a)s, %(d)s)", {"a": aid, "d": delta}
                        )
                        conn.commit()
                    else:
                        conn.execute("UPDATE accounts SET balance = balance + %s WHERE aid = %s", (delta, aid))
                        conn.execute("SELECT balance FROM accounts WHERE aid = %s", (aid,))
                        conn.execute("INSERT INTO history (aid, delta) VALUES (%s, %s)", (aid, delta))
                        conn.commit()
                finally:
                    give_back(name, conn)
                with lock:
                    stats["transactions"] += 1
            except Exception:
                with lock:
                    stats["errors"] += 1
            time.sleep(pause)

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(nthreads)]
    for t in threads:
        t.start()
    load = (threads, stats)
    return {}


def op_load_wait(req):
    global load
    threads, stats = load
    for t in threads:
        t.join()
    load = None
    return dict(stats)


def op_counts(req):
    name = req.get("engine", "main")
    with count_lock:
        return dict(counts.get(name, {"acquires": 0, "releases": 0}))


def op_pool_checkouts(req):
    name = req.get("engine", "main")
    n = int(req.get("n", 10))
    pool = engines[name]
    for i in range(n):
        if kinds[name] == "psycopg_pool" and i % 2 == 0:
            with pool.connection() as conn:
                count(name, "acquires")
                conn.execute("SELECT 1")
            count(name, "releases")
        else:
            conn = acquire(name)
            run(name, conn, "SELECT 1")
            give_back(name, conn)
    return {}


def op_adapter_stats(req):
    from poolscope_adapter import default_sender

    return default_sender().stats()


OPS = {
    "adapter_stats": op_adapter_stats,
    "pid": lambda req: {"pid": os.getpid(), "tid": threading.get_native_id()},
    "sqlalchemy": op_sqlalchemy,
    "psycopg_pool": op_psycopg_pool,
    "sqlite_pool": op_sqlite_pool,
    "pool_state": op_pool_state,
    "checkout": op_checkout,
    "query": op_query,
    "idle_in_transaction": op_idle_in_transaction,
    "busy": op_busy,
    "busy_stop": op_busy_stop,
    "release": op_release,
    "waiter": op_waiter,
    "waiter_result": op_waiter_result,
    "churn_start": op_churn_start,
    "churn_stop": op_churn_stop,
    "load": op_load,
    "load_wait": op_load_wait,
    "counts": op_counts,
    "pool_checkouts": op_pool_checkouts,
    "hidden_pools": op_hidden_pools,
}


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            answer = OPS[req["op"]](req)
            answer["ok"] = True
        except ImportError as e:
            answer = {"ok": False, "error": "%s (run cargo xtask setup)" % e}
        except Exception as e:  # keep serving; the test reads the error
            answer = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        reply(answer)
    # stdin closed: leave at once, without waiting for pools' threads.
    os._exit(0)


if __name__ == "__main__":
    main()
