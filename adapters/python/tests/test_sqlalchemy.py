"""instrument_sqlalchemy against a real SQLAlchemy QueuePool whose DBAPI
connections are SQLite in memory, each paired with a real TCP socket (so
that they have an fd and a local address as a network driver's would)."""

import sqlite3
import threading
import time
import unittest

try:
    import sqlalchemy
    from sqlalchemy import exc
    from sqlalchemy.pool import NullPool, QueuePool
except ImportError:  # pragma: no cover
    sqlalchemy = None

from poolscope_adapter import Sender, instrument_sqlalchemy

from .support import Receiver, TcpPeer


class NetworkedSqlite:
    """A sqlite3 connection that also holds a TCP socket, like a driver."""

    def __init__(self, sock):
        object.__setattr__(self, "_db", sqlite3.connect(":memory:", check_same_thread=False))
        object.__setattr__(self, "_sock", sock)

    def fileno(self):
        return self._sock.fileno()

    def close(self):
        self._db.close()
        self._sock.close()

    def __getattr__(self, name):
        return getattr(self._db, name)

    def __setattr__(self, name, value):
        setattr(self._db, name, value)


@unittest.skipUnless(sqlalchemy is not None, "SQLAlchemy is not installed")
class SQLAlchemyTest(unittest.TestCase):
    def setUp(self):
        self.receiver = Receiver()
        self.addCleanup(self.receiver.close)
        self.peer = TcpPeer()
        self.addCleanup(self.peer.close)
        self.sender = Sender(self.receiver.path)
        self.addCleanup(self.sender.close)
        self.socks = []

    def engine(self, **kw):
        def creator():
            sock = self.peer.connect()
            self.socks.append(sock)
            return NetworkedSqlite(sock)

        options = dict(poolclass=QueuePool, pool_size=2, max_overflow=1, pool_timeout=0.3)
        options.update(kw)
        options = {k: v for k, v in options.items() if v is not None}
        engine = sqlalchemy.create_engine("sqlite://", creator=creator, **options)
        self.addCleanup(engine.dispose)
        return engine

    def local(self, connection):
        """fd and local address of a checked-out Connection's socket."""
        raw = connection.connection.dbapi_connection
        sock = raw._sock
        return sock.fileno(), "127.0.0.1:%d" % sock.getsockname()[1]

    def test_registers_the_pool(self):
        engine = self.engine()
        inst = instrument_sqlalchemy(engine, pool_name="orders", sender=self.sender)
        self.assertEqual(inst.name, "orders")
        [m] = self.receiver.messages()
        self.assertEqual(m["kind"], "pool")
        self.assertEqual(m["pool"], "orders")
        self.assertEqual(m["library"], "sqlalchemy")
        self.assertEqual((m["max"], m["idle_max"]), (3, 2))
        self.assertEqual(m["db_system"], "sqlite")
        # Instrumenting twice changes nothing.
        self.assertIs(instrument_sqlalchemy(engine, sender=self.sender), inst)
        self.assertEqual(len(self.receiver.messages()), 1)

    def test_checkout_and_checkin(self):
        engine = self.engine()
        instrument_sqlalchemy(engine, pool_name="orders", sender=self.sender)
        self.receiver.drain()
        self.receiver.received.clear()

        conn = engine.connect()
        fd, local = self.local(conn)
        conn.exec_driver_sql("SELECT 1")
        start, created, end = self.receiver.messages()
        self.assertEqual(start["kind"], "acquire_start")
        self.assertEqual(created["kind"], "connection_created")
        self.assertEqual((created["fd"], created["local_address"]), (fd, local))
        self.assertEqual(end["kind"], "acquire_end")
        self.assertEqual(end["request"], start["request"])
        self.assertEqual((end["result"], end["fd"], end["local_address"]), ("ok", fd, local))
        self.assertEqual(end["tid"], threading.get_native_id())
        self.assertLessEqual(start["mono_ns"], created["mono_ns"])
        self.assertLessEqual(created["mono_ns"], end["mono_ns"])

        conn.close()
        release = self.receiver.messages()[-1]
        self.assertEqual(release["kind"], "release")
        self.assertEqual((release["fd"], release["local_address"]), (fd, local))

        # The same connection again: no new connection_created.
        conn = engine.connect()
        self.assertEqual(self.local(conn), (fd, local))
        conn.close()
        kinds = [m["kind"] for m in self.receiver.messages()[4:]]
        self.assertEqual(kinds, ["acquire_start", "acquire_end", "release"])

    def test_request_ids_pair_up_across_threads(self):
        self.receiver.start()
        engine = self.engine(pool_size=3, max_overflow=0, pool_timeout=5)
        instrument_sqlalchemy(engine, pool_name="orders", sender=self.sender)
        barrier = threading.Barrier(3)
        tids = []

        def work():
            tids.append(threading.get_native_id())
            barrier.wait()
            for _ in range(20):
                with engine.connect() as c:
                    c.exec_driver_sql("SELECT 1")

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertTrue(self.sender.flush(5.0))
        # 1 pool, a connection_created per connection the pool opened (up
        # to 3), 60 x (acquire_start, acquire_end, release).
        expected = 1 + len(self.socks) + 180
        msgs = self.receiver.wait_for(lambda ms: len(ms) >= expected)
        self.assertEqual((len(msgs), self.sender.dropped), (expected, 0))
        starts = {m["request"]: m for m in msgs if m["kind"] == "acquire_start"}
        ends = {m["request"]: m for m in msgs if m["kind"] == "acquire_end"}
        self.assertEqual(len(starts), 60)
        self.assertEqual(set(starts), set(ends))
        for request, end in ends.items():
            self.assertEqual(end["result"], "ok")
            self.assertEqual(end["tid"], starts[request]["tid"], "ended by the thread that started it")
        self.assertEqual(sorted({m["tid"] for m in starts.values()}), sorted(tids))
        self.assertEqual(len([m for m in msgs if m["kind"] == "release"]), 60)

    def test_timeout_is_reported_with_its_request(self):
        engine = self.engine()
        instrument_sqlalchemy(engine, pool_name="orders", sender=self.sender)
        held = [engine.connect() for _ in range(3)]
        self.receiver.drain()
        self.receiver.received.clear()
        t0 = time.monotonic()
        with self.assertRaises(exc.TimeoutError):
            engine.connect()
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)
        start, end = self.receiver.messages()
        self.assertEqual(start["kind"], "acquire_start")
        self.assertEqual((end["kind"], end["request"], end["result"]), ("acquire_end", start["request"], "timeout"))
        self.assertNotIn("fd", end)
        self.assertGreaterEqual(end["mono_ns"] - start["mono_ns"], 300_000_000)
        for c in held:
            c.close()

    def test_failed_connect_is_an_error(self):
        def creator():
            raise sqlite3.OperationalError("no route to the database")

        engine = sqlalchemy.create_engine("sqlite://", creator=creator, poolclass=QueuePool)
        self.addCleanup(engine.dispose)
        instrument_sqlalchemy(engine, pool_name="broken", sender=self.sender)
        with self.assertRaises(exc.OperationalError):
            engine.connect()
        kinds = [(m["kind"], m.get("result")) for m in self.receiver.messages()]
        self.assertEqual(kinds, [("pool", None), ("acquire_start", None), ("acquire_end", "error")])

    def test_invalidated_connection_is_returned_then_closed_once(self):
        engine = self.engine()
        instrument_sqlalchemy(engine, pool_name="orders", sender=self.sender)
        conn = engine.connect()
        fd, local = self.local(conn)
        self.receiver.drain()
        self.receiver.received.clear()
        conn.invalidate()
        conn.close()
        msgs = self.receiver.messages()
        self.assertEqual([m["kind"] for m in msgs], ["release", "connection_closed"])
        self.assertTrue(all(m["fd"] == fd and m["local_address"] == local for m in msgs))

    def test_dispose_closes_and_the_new_pool_is_still_instrumented(self):
        engine = self.engine()
        instrument_sqlalchemy(engine, pool_name="orders", sender=self.sender)
        with engine.connect() as c:
            fd, local = self.local(c)
        self.receiver.drain()
        self.receiver.received.clear()
        engine.dispose()
        msgs = self.receiver.messages()
        closed = [m for m in msgs if m["kind"] == "connection_closed"]
        self.assertEqual([(m["fd"], m["local_address"]) for m in closed], [(fd, local)])
        self.assertIn("pool", [m["kind"] for m in msgs], "registered again")
        self.receiver.received.clear()
        with engine.connect():
            pass
        kinds = [m["kind"] for m in self.receiver.messages()]
        self.assertEqual(kinds, ["acquire_start", "connection_created", "acquire_end", "release"])

    def test_default_name_and_unbounded_pools(self):
        engine = self.engine(poolclass=NullPool, pool_size=None, max_overflow=None, pool_timeout=None)
        inst = instrument_sqlalchemy(engine, sender=self.sender)
        [m] = self.receiver.messages()
        self.assertEqual(m["pool"], inst.name)
        self.assertEqual(inst.name, "localhost")
        self.assertNotIn("max", m)
        with engine.connect():
            pass
        kinds = [m["kind"] for m in self.receiver.messages()]
        self.assertEqual(
            kinds,
            ["pool", "acquire_start", "connection_created", "acquire_end", "release", "connection_closed"],
        )

    def test_uninstrument_stops_messages(self):
        engine = self.engine()
        inst = instrument_sqlalchemy(engine, pool_name="orders", sender=self.sender)
        inst.uninstall()
        self.receiver.drain()
        self.receiver.received.clear()
        with engine.connect():
            pass
        self.assertEqual(self.receiver.messages(), [])
        self.assertNotIn("connect", engine.pool.__dict__)

    def test_without_an_agent_the_app_runs_on(self):
        sender = Sender(self.receiver.dir + "/missing.sock")
        self.addCleanup(sender.close)
        engine = self.engine()
        instrument_sqlalchemy(engine, pool_name="orders", sender=sender)
        for _ in range(5):
            with engine.connect() as c:
                c.exec_driver_sql("SELECT 1")
        self.assertEqual(sender.sent, 0)
        self.assertGreater(sender.dropped, 10)

    def test_a_broken_engine_is_not_instrumented_and_nothing_raises(self):
        with self.assertLogs("poolscope_adapter", "WARNING"):
            self.assertIsNone(instrument_sqlalchemy(object(), sender=self.sender))


if __name__ == "__main__":
    unittest.main()
