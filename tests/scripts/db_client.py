#!/usr/bin/env python3
"""A database client driven by one JSON request per line on stdin.

The query round-trip tests spawn it so that they know the pid whose
connection the agent parses. It holds at most one connection, so that the
test can count exactly what went over it. Its command-line arguments are
ignored (tests add some to be seen in /proc/PID/cmdline). One JSON answer
line per request:
{"ok": true, ...} or {"ok": false, "error": "..."}; database errors are
answers, not failures: {"ok": true, "db_error": {"code": "42601", ...}}.

  {"op": "pid"}                                   -> {"pid": N}
  {"op": "connect", "system": "postgresql", "port": P, "tls": false}
      psycopg 3, autocommit, no automatic preparing, no TLS (with
      "tls": true, sslmode=require: TLS, the certificate not verified);
      with "driver": "psycopg2", psycopg2 instead (its binary wheel, pinned
      by cargo xtask setup, bundles libpq and OpenSSL 1.1)
  {"op": "connect", "system": "mysql", "port": P, "tls": false}
      mysql-connector-python (pure Python), user and database "poolscope"
      (MariaDb fixture), autocommit, no TLS (with "tls": true, TLS through
      Python's ssl module, the certificate not verified)
  {"op": "connect", "system": "redis", "port": P} a plain TCP socket
      each answers {"fd": FD, "local_port": PORT}
  {"op": "sql", "sql": "..."}                     one statement, no parameters
      (PostgreSQL: the simple query protocol; MySQL: COM_QUERY)
  {"op": "sql", "sql": "...", "params_list": [[...], ...], "prepared": true}
      the statement executed once per parameter list, prepared once on one
      cursor: PostgreSQL: cursor.execute(sql, params, prepare=True) (Parse
      and Sync once, then Bind/Describe/Execute/Sync each time); MySQL: a
      prepared cursor (COM_STMT_PREPARE once, then COM_STMT_RESET and
      COM_STMT_EXECUTE each time)
      each answers {"rows": [[...], ...] or null, "db_error": {...} or null}
      (rows of the last execution)
  {"op": "redis", "commands": [["SET", "k", "v"], ...]}
      sends every command, RESP-encoded, in ONE sendall, then reads one
      reply per command -> {"replies": [...]} (errors as {"error": "..."})
  {"op": "close"}                                 closes the connection
"""

import json
import os
import socket
import sys

conn = None  # (system, connection object or socket)


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def connect(req):
    global conn
    system, port = req["system"], int(req["port"])
    tls = bool(req.get("tls", False))
    if system == "postgresql":
        # What both drivers take alike (libpq's connection parameters).
        params = dict(
            host="127.0.0.1",
            port=port,
            user=req.get("user", "postgres"),
            dbname=req.get("database", "postgres"),
            sslmode="require" if tls else "disable",
            gssencmode="disable",
        )
        if req.get("driver") == "psycopg2":
            import psycopg2

            c = psycopg2.connect(**params)
            c.autocommit = True
            fd = c.fileno()
            system = "postgresql-psycopg2"
        else:
            import psycopg

            c = psycopg.connect(
                **params,
                autocommit=True,
                # No automatic preparing of repeated statements (None would
                # also turn prepare=True off).
                prepare_threshold=1_000_000,
            )
            fd = c.pgconn.socket
    elif system == "mysql":
        import mysql.connector

        c = mysql.connector.connect(
            host="127.0.0.1",
            port=port,
            user=req.get("user", "poolscope"),
            password="",
            database=req.get("database", "poolscope"),
            ssl_disabled=not tls,
            ssl_verify_cert=False,
            ssl_verify_identity=False,
            use_pure=True,
            autocommit=True,
        )
        fd = c._socket.sock.fileno()
    elif system == "redis":
        c = socket.create_connection(("127.0.0.1", port))
        fd = c.fileno()
    else:
        raise ValueError("unknown system %r" % system)
    conn = (system, c)
    return {"fd": fd, "local_port": local_port(fd)}


def local_port(fd):
    # getsockname on the fd itself, detached after: a dup would show up as
    # a second fd closing.
    s = socket.socket(fileno=fd)
    try:
        return s.getsockname()[1]
    finally:
        s.detach()


def jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    return str(value)


def run_sql(req):
    system, c = conn
    sql = req["sql"]
    prepared = bool(req.get("prepared"))
    # One str object for every execution: mysql-connector's prepared cursor
    # re-prepares when handed another object, even an equal one.
    params_list = req.get("params_list") or [[]]
    rows = None
    if system == "postgresql":
        import psycopg

        try:
            with c.cursor() as cur:
                for params in params_list:
                    if prepared:
                        cur.execute(sql, params, prepare=True)
                    else:
                        cur.execute(sql)
                    rows = cur.fetchall() if cur.description else None
        except psycopg.Error as e:
            code = e.diag.sqlstate if e.diag else None
            return {"rows": None, "db_error": {"code": code, "message": str(e)}}
    elif system == "postgresql-psycopg2":
        import psycopg2

        try:
            with c.cursor() as cur:
                cur.execute(sql)
                rows = cur.fetchall() if cur.description else None
        except psycopg2.Error as e:
            return {"rows": None, "db_error": {"code": e.pgcode, "message": str(e)}}
    elif system == "mysql":
        import mysql.connector

        try:
            cur = c.cursor(prepared=True) if prepared else c.cursor()
            try:
                for params in params_list:
                    if prepared:
                        cur.execute(sql, params)
                    else:
                        cur.execute(sql)
                    rows = cur.fetchall() if cur.description else None
            finally:
                cur.close()
        except mysql.connector.Error as e:
            return {"rows": None, "db_error": {"code": str(e.errno), "message": str(e)}}
    else:
        raise ValueError("sql on a %s connection" % system)
    rows = None if rows is None else [[jsonable(v) for v in row] for row in rows]
    return {"rows": rows, "db_error": None}


def resp_encode(command):
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        arg = arg.encode() if isinstance(arg, str) else bytes(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RespReader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def line(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exact(self, n):
        while len(self.buf) < n + 2:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.buf += data
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def reply(self):
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return {"error": rest.decode()}
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.exact(n).decode("utf-8", "replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ValueError("unexpected RESP line %r" % line)


def run_redis(req):
    system, sock = conn
    if system != "redis":
        raise ValueError("redis commands on a %s connection" % system)
    commands = req["commands"]
    payload = b"".join(resp_encode(c) for c in commands)
    sock.sendall(payload)
    reader = RespReader(sock)
    replies = [reader.reply() for _ in commands]
    if reader.buf:
        raise ValueError("unexpected bytes after the replies: %r" % reader.buf)
    return {"replies": replies, "bytes_sent": len(payload)}


def close():
    global conn
    if conn is not None:
        conn[1].close()
        conn = None
    return {}


def handle(req):
    op = req.get("op")
    if op == "pid":
        return {"pid": os.getpid()}
    if op == "connect":
        return connect(req)
    if op == "sql":
        return run_sql(req)
    if op == "redis":
        return run_redis(req)
    if op == "close":
        return close()
    raise ValueError("unknown op %r" % op)


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = handle(json.loads(line))
            answer["ok"] = True
        except ImportError as e:
            answer = {"ok": False, "error": "%s (run cargo xtask setup)" % e}
        except Exception as e:  # keep serving; the test reads the error
            answer = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        reply(answer)


if __name__ == "__main__":
    main()
