"""instrument_psycopg_pool: its wrapping on a stand-in pool with the same
methods (no server needed), and its registration on a real, unopened
psycopg_pool.ConnectionPool."""

import asyncio
import contextlib
import threading
import time
import unittest

try:
    import psycopg_pool
except ImportError:  # pragma: no cover
    psycopg_pool = None

from poolscope_adapter import Sender, instrument_psycopg_pool

from .support import Receiver, TcpPeer


class PoolTimeoutStandIn(Exception):
    pass


TIMEOUT_ERROR = psycopg_pool.PoolTimeout if psycopg_pool else PoolTimeoutStandIn


class PgConn:
    def __init__(self, sock):
        self.sock = sock

    @property
    def socket(self):
        if self.sock.fileno() < 0:
            raise OSError("the connection is closed")
        return self.sock.fileno()


class FakeConnection:
    def __init__(self, sock):
        self.pgconn = PgConn(sock)

    def close(self):
        self.pgconn.sock.close()


class FakePool:
    """The methods of psycopg_pool.ConnectionPool that the adapter wraps,
    called the way the real pool calls them (through self)."""

    def __init__(self, peer, max_size=2):
        self.name = "pool-1"
        self.conninfo = "host=127.0.0.1 port=5433 dbname=shop"
        self.kwargs = {}
        self.min_size = 1
        self.max_size = max_size
        self.peer = peer
        self.idle = []
        self.out = 0
        self.lock = threading.Lock()

    def _connect(self, timeout=None):
        return FakeConnection(self.peer.connect())

    def _close_connection(self, conn):
        conn.close()

    def getconn(self, timeout=None):
        with self.lock:
            if self.idle:
                self.out += 1
                return self.idle.pop()
            if self.out < self.max_size:
                self.out += 1
                new = True
            else:
                new = False
        if new:
            return self._connect()
        time.sleep(timeout or 0.1)
        raise TIMEOUT_ERROR("couldn't get a connection after %.2f sec" % (timeout or 0.1))

    def putconn(self, conn):
        with self.lock:
            self.out -= 1
            self.idle.append(conn)

    @contextlib.contextmanager
    def connection(self, timeout=None):
        conn = self.getconn(timeout=timeout)
        try:
            yield conn
        finally:
            self.putconn(conn)

    def resize(self, min_size, max_size=None):
        self.min_size = min_size
        self.max_size = max_size or min_size

    def drain(self):
        for conn in self.idle:
            self._close_connection(conn)
        self.idle = []


class FakeAsyncPool(FakePool):
    async def _connect(self, timeout=None):
        return FakeConnection(self.peer.connect())

    async def _close_connection(self, conn):
        conn.close()

    async def getconn(self, timeout=None):
        if self.idle:
            self.out += 1
            return self.idle.pop()
        if self.out < self.max_size:
            self.out += 1
            return await self._connect()
        await asyncio.sleep(timeout or 0.1)
        raise TIMEOUT_ERROR("timed out")

    async def putconn(self, conn):
        self.out -= 1
        self.idle.append(conn)


class PsycopgPoolTest(unittest.TestCase):
    def setUp(self):
        self.receiver = Receiver()
        self.addCleanup(self.receiver.close)
        self.peer = TcpPeer()
        self.addCleanup(self.peer.close)
        self.sender = Sender(self.receiver.path)
        self.addCleanup(self.sender.close)

    def test_registers_with_sizes_and_server(self):
        pool = FakePool(self.peer, max_size=4)
        inst = instrument_psycopg_pool(pool, sender=self.sender)
        self.assertEqual(inst.name, "pool-1")
        [m] = self.receiver.messages()
        del m["mono_ns"]
        self.assertEqual(
            m,
            {
                "v": 1,
                "kind": "pool",
                "pool": "pool-1",
                "db_system": "postgresql",
                "server_address": "127.0.0.1",
                "server_port": 5433,
                "namespace": "shop",
                "max": 4,
                "min_idle": 1,
                "library": "psycopg_pool",
            },
        )
        self.assertIs(instrument_psycopg_pool(pool, sender=self.sender), inst)

    def test_getconn_putconn_and_the_context_manager(self):
        pool = FakePool(self.peer)
        instrument_psycopg_pool(pool, pool_name="billing", sender=self.sender)
        conn = pool.getconn()
        fd = conn.pgconn.sock.fileno()
        local = "127.0.0.1:%d" % conn.pgconn.sock.getsockname()[1]
        pool.putconn(conn)
        with pool.connection() as again:
            self.assertIs(again, conn)
        msgs = self.receiver.messages()[1:]
        kinds = [(m["kind"], m.get("result")) for m in msgs]
        self.assertEqual(
            kinds,
            [
                ("acquire_start", None),
                ("connection_created", None),
                ("acquire_end", "ok"),
                ("release", None),
                ("acquire_start", None),
                ("acquire_end", "ok"),
                ("release", None),
            ],
        )
        for m in msgs:
            self.assertEqual(m["pool"], "billing")
            if m["kind"] != "acquire_start":
                self.assertEqual((m["fd"], m["local_address"]), (fd, local))
        self.assertEqual(msgs[0]["request"], msgs[2]["request"])
        self.assertEqual(msgs[4]["request"], msgs[5]["request"])
        self.assertNotEqual(msgs[0]["request"], msgs[4]["request"])

    def test_timeout_and_close(self):
        pool = FakePool(self.peer, max_size=1)
        instrument_psycopg_pool(pool, sender=self.sender)
        conn = pool.getconn()
        fd = conn.pgconn.sock.fileno()
        with self.assertRaises(TIMEOUT_ERROR):
            pool.getconn(timeout=0.05)
        pool.putconn(conn)
        pool.drain()
        msgs = self.receiver.messages()
        start, end = [m for m in msgs if m["kind"].startswith("acquire")][2:]
        self.assertEqual((end["request"], end["result"]), (start["request"], "timeout" if psycopg_pool else "error"))
        closed = [m for m in msgs if m["kind"] == "connection_closed"]
        self.assertEqual([m["fd"] for m in closed], [fd], "named while its socket was still open")

    def test_resize_registers_again(self):
        pool = FakePool(self.peer)
        instrument_psycopg_pool(pool, sender=self.sender)
        pool.resize(2, 8)
        registrations = self.receiver.messages("pool")
        self.assertEqual([(m["min_idle"], m["max"]) for m in registrations], [(1, 2), (2, 8)])

    def test_async_pool(self):
        pool = FakeAsyncPool(self.peer, max_size=1)
        instrument_psycopg_pool(pool, pool_name="async", sender=self.sender)

        async def run():
            conn = await pool.getconn()
            with self.assertRaises(TIMEOUT_ERROR):
                await pool.getconn(timeout=0.05)
            await pool.putconn(conn)
            return conn

        conn = asyncio.run(run())
        kinds = [(m["kind"], m.get("result")) for m in self.receiver.messages()]
        self.assertEqual(
            kinds,
            [
                ("pool", None),
                ("acquire_start", None),
                ("connection_created", None),
                ("acquire_end", "ok"),
                ("acquire_start", None),
                ("acquire_end", "timeout" if psycopg_pool else "error"),
                ("release", None),
            ],
        )
        self.assertEqual(self.receiver.messages("release")[0]["fd"], conn.pgconn.sock.fileno())

    def test_uninstall_restores_the_pool(self):
        pool = FakePool(self.peer)
        inst = instrument_psycopg_pool(pool, sender=self.sender)
        inst.uninstall()
        self.assertNotIn("getconn", pool.__dict__)
        pool.putconn(pool.getconn())
        self.assertEqual(len(self.receiver.messages()), 1)

    def test_errors_in_the_adapter_never_reach_the_app(self):
        class Exploding(Sender):
            def send(self, message):
                raise RuntimeError("boom")

        pool = FakePool(self.peer)
        instrument_psycopg_pool(pool, sender=Exploding(self.receiver.path))
        with pool.connection():
            pass

    @unittest.skipUnless(psycopg_pool is not None, "psycopg_pool is not installed")
    def test_real_pool_registration(self):
        pool = psycopg_pool.ConnectionPool(
            "host=127.0.0.1 port=5999 dbname=shop user=app",
            min_size=2,
            max_size=7,
            open=False,
            name="billing",
        )
        inst = instrument_psycopg_pool(pool, sender=self.sender)
        self.assertIsNotNone(inst)
        [m] = self.receiver.messages()
        self.assertEqual(
            (m["pool"], m["server_address"], m["server_port"], m["namespace"], m["max"], m["min_idle"]),
            ("billing", "127.0.0.1", 5999, "shop", 7, 2),
        )
        for name in ("getconn", "putconn", "_connect", "_close_connection"):
            self.assertIn(name, pool.__dict__, "wrapped %s" % name)


if __name__ == "__main__":
    unittest.main()
