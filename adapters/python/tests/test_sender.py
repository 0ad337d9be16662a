import os
import socket
import threading
import time
import unittest
from unittest import mock

from poolscope_adapter import DEFAULT_SOCKET, ENV_SOCKET, PoolReporter, Sender, connection_ref, socket_path
from poolscope_adapter._conn import local_address_of_fd

from .support import Receiver, TcpPeer


class SocketPathTest(unittest.TestCase):
    def test_environment_wins_over_the_default(self):
        with mock.patch.dict(os.environ, {ENV_SOCKET: "/tmp/elsewhere.sock"}):
            self.assertEqual(socket_path(), "/tmp/elsewhere.sock")
            self.assertEqual(Sender().path, "/tmp/elsewhere.sock")
        env = {k: v for k, v in os.environ.items() if k != ENV_SOCKET}
        with mock.patch.dict(os.environ, env, clear=True):
            self.assertEqual(socket_path(), DEFAULT_SOCKET)
            self.assertEqual(DEFAULT_SOCKET, "/run/poolscope/adapter.sock")


def sender_for(test, path):
    s = Sender(path)
    test.addCleanup(s.close)
    return s


class SenderTest(unittest.TestCase):
    def setUp(self):
        # The transport, with hand-made payloads: no golden shapes.
        self.receiver = Receiver(golden=False)
        self.addCleanup(self.receiver.close)

    def test_sends_one_json_datagram_and_the_kernel_names_us(self):
        sender = sender_for(self, self.receiver.path)
        self.assertTrue(sender.send({"v": 1, "kind": "release", "pool": "p", "fd": 3}))
        self.receiver.drain()
        [(pid, message)] = self.receiver.received
        self.assertEqual(pid, os.getpid())
        self.assertEqual(message, {"v": 1, "kind": "release", "pool": "p", "fd": 3})
        self.assertEqual((sender.sent, sender.dropped), (1, 0))

    def test_missing_socket_is_dropped_silently(self):  # ENOENT
        sender = sender_for(self, os.path.join(self.receiver.dir, "nobody.sock"))
        self.assertFalse(sender.send({"v": 1, "kind": "pool", "pool": "p"}))
        self.assertEqual(sender.dropped, 1)
        self.assertEqual(sender.dropped_by, {"ENOENT": 1})

    def test_socket_without_a_reader_is_dropped_silently(self):  # ECONNREFUSED
        path = os.path.join(self.receiver.dir, "gone.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
        s.close()
        self.assertTrue(os.path.exists(path))
        sender = sender_for(self, path)
        self.assertFalse(sender.send({"v": 1, "kind": "pool", "pool": "p"}))
        self.assertEqual(sender.dropped_by, {"ECONNREFUSED": 1})

    def tiny_send_buffer(self, sender):
        """Our datagrams in the agent's queue count against our send buffer:
        a minimal one makes the queue "full" (EAGAIN) after a few, whatever
        net.unix.max_dgram_qlen is."""
        sender._state().sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)

    def test_a_full_queue_is_backlogged_in_order_and_never_blocks(self):  # EAGAIN
        sender = sender_for(self, self.receiver.path)
        self.tiny_send_buffer(sender)
        started = time.monotonic()
        results = [sender.send({"v": 1, "kind": "pool", "pool": "p", "n": i}) for i in range(2000)]
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertTrue(all(results))
        stats = sender.stats()
        self.assertGreater(stats["deferred"], 0, "the queue filled up: %r" % stats)
        self.assertEqual(stats["dropped"], 0)
        # The agent reads again: everything arrives, in order.
        self.receiver.start()
        msgs = self.receiver.wait_for(lambda ms: len(ms) >= 2000)
        self.assertEqual([m["n"] for m in msgs], list(range(2000)))
        self.assertEqual(sender.stats()["backlogged"], 0)
        self.assertEqual((sender.sent, sender.dropped), (2000, 0))

    def test_the_backlog_is_given_up_when_the_agent_stops_reading(self):
        sender = sender_for(self, self.receiver.path)
        sender.BACKLOG_GIVE_UP = 0.2
        self.tiny_send_buffer(sender)
        for i in range(100):
            self.assertTrue(sender.send({"v": 1, "kind": "pool", "pool": "p", "n": i}))
        deferred = sender.deferred
        self.assertGreater(deferred, 0)
        deadline = time.monotonic() + 5
        while sender.stats()["backlogged"] and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(sender.stats()["backlogged"], 0)
        self.assertEqual(sender.dropped_by, {"EAGAIN": sender.dropped})
        self.assertEqual(sender.sent + sender.dropped, 100)
        self.assertEqual([m["n"] for m in self.receiver.messages()], list(range(sender.sent)))

    def test_the_backlog_is_bounded(self):
        sender = sender_for(self, self.receiver.path)
        sender.BACKLOG_MAX = 20
        self.tiny_send_buffer(sender)
        results = [sender.send({"v": 1, "kind": "pool", "pool": "p", "n": i}) for i in range(500)]
        self.assertIn(False, results)
        self.assertGreater(sender.dropped_by.get("backlog_full", 0), 0)
        self.assertLessEqual(sender.stats()["backlogged"], 20)

    def test_order_is_kept_across_threads(self):
        sender = sender_for(self, self.receiver.path)
        self.tiny_send_buffer(sender)
        self.receiver.start()

        def work(t):
            for i in range(300):
                sender.send({"v": 1, "kind": "pool", "pool": "t%d" % t, "n": i})

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        msgs = self.receiver.wait_for(lambda ms: len(ms) >= 1200)
        for t in range(4):
            self.assertEqual([m["n"] for m in msgs if m["pool"] == "t%d" % t], list(range(300)))
        self.assertEqual(sender.dropped, 0)

    def test_close_gives_the_backlog_up(self):
        sender = Sender(self.receiver.path)
        self.tiny_send_buffer(sender)
        for i in range(50):
            sender.send({"v": 1, "kind": "pool", "pool": "p", "n": i})
        waiting = sender.stats()["backlogged"]
        sender.close()
        self.assertGreater(waiting, 0)
        self.assertEqual(sender.dropped_by.get("closed", 0), waiting)

    def test_flush_waits_for_the_backlog(self):
        sender = sender_for(self, self.receiver.path)
        self.tiny_send_buffer(sender)
        for i in range(200):
            sender.send({"v": 1, "kind": "pool", "pool": "p", "n": i})
        self.assertFalse(sender.flush(0.05), "nobody reads yet")
        self.receiver.start()
        self.assertTrue(sender.flush(5.0))
        self.assertEqual(len(self.receiver.wait_for(lambda ms: len(ms) >= 200)), 200)

    def test_oversized_and_unserializable_messages_are_dropped(self):
        sender = sender_for(self, self.receiver.path)
        self.assertFalse(sender.send({"v": 1, "kind": "pool", "pool": "x" * 5000}))
        self.assertFalse(sender.send({"v": 1, "kind": "pool", "pool": object()}))
        self.assertEqual(sender.dropped_by, {"too_large": 1, "unserializable": 1})
        self.assertEqual(self.receiver.messages(), [])

    def test_a_forked_child_sends_as_itself(self):
        sender = sender_for(self, self.receiver.path)
        sender.send({"v": 1, "kind": "pool", "pool": "parent"})
        pid = os.fork()
        if pid == 0:
            try:
                sender.send({"v": 1, "kind": "pool", "pool": "child"})
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        self.receiver.drain()
        by_pool = {m["pool"]: p for p, m in self.receiver.received}
        self.assertEqual(by_pool, {"parent": os.getpid(), "child": pid})


class ReporterTest(unittest.TestCase):
    def setUp(self):
        self.receiver = Receiver()
        self.addCleanup(self.receiver.close)
        self.reporter = PoolReporter(
            "orders",
            {
                "db_system": "postgresql",
                "server_address": "127.0.0.1",
                "server_port": 5432,
                "namespace": "shop",
                "max": 15,
                "min_idle": None,
                "idle_max": 5,
                "library": "sqlalchemy",
            },
            sender=sender_for(self, self.receiver.path),
        )

    def test_registration_has_the_pools_settings(self):
        self.reporter.register()
        [m] = self.receiver.messages()
        del m["mono_ns"]
        self.assertEqual(
            m,
            {
                "v": 1,
                "kind": "pool",
                "pool": "orders",
                "db_system": "postgresql",
                "server_address": "127.0.0.1",
                "server_port": 5432,
                "namespace": "shop",
                "max": 15,
                "idle_max": 5,
                "library": "sqlalchemy",
            },
        )

    def test_malformed_db_systems_and_bounds_are_left_out(self):
        reporter = PoolReporter("p", {"db_system": "SQL Server", "max": -1}, sender=self.reporter.sender)
        reporter.register()
        [m] = self.receiver.messages()
        self.assertNotIn("db_system", m)
        self.assertNotIn("max", m)
        # Any semantic-convention name is taken, not only the systems whose
        # protocol the agent reads.
        PoolReporter("q", {"db_system": "sqlite"}, sender=self.reporter.sender).register()
        m = self.receiver.messages()[-1]
        self.assertEqual(m["pool"], "q")
        self.assertEqual(m["db_system"], "sqlite")

    def test_acquire_messages_carry_request_tid_and_monotonic_time(self):
        self.reporter.register()
        before = time.monotonic_ns()
        r = self.reporter.next_request()
        self.reporter.acquire_start(r)
        self.reporter.acquire_end(r, "ok", {"fd": 7, "local_address": "127.0.0.1:40000"})
        self.reporter.acquire_end(self.reporter.next_request(), "timeout")
        after = time.monotonic_ns()
        start, ok, timeout = self.receiver.messages()[1:]
        self.assertEqual(start["kind"], "acquire_start")
        self.assertEqual(start["request"], r)
        self.assertEqual(ok["request"], r)
        self.assertEqual((ok["result"], ok["fd"], ok["local_address"]), ("ok", 7, "127.0.0.1:40000"))
        self.assertEqual(timeout["result"], "timeout")
        self.assertNotIn("fd", timeout)
        self.assertNotEqual(timeout["request"], r)
        for m in (start, ok, timeout):
            self.assertEqual(m["tid"], threading.get_native_id())
            self.assertTrue(before <= m["mono_ns"] <= after)

    def test_connections_without_a_name_are_not_sent(self):
        self.reporter.register()
        self.reporter.acquire_end(1, "ok", None)
        self.reporter.release(None)
        self.reporter.connection_created({})
        self.assertEqual([m["kind"] for m in self.receiver.messages()], ["pool"])

    def test_registration_is_repeated_after_a_while(self):
        self.reporter.register()
        self.reporter.release({"fd": 3})
        self.reporter._registered_at -= PoolReporter.REREGISTER_SECONDS + 1
        self.reporter.release({"fd": 3})
        kinds = [m["kind"] for m in self.receiver.messages()]
        self.assertEqual(kinds, ["pool", "release", "pool", "release"])


class ConnectionRefTest(unittest.TestCase):
    def test_tcp_socket_is_named_by_fd_and_local_address(self):
        peer = TcpPeer()
        self.addCleanup(peer.close)
        sock = peer.connect()
        self.addCleanup(sock.close)

        class Psycopg2Like:
            def fileno(self):
                return sock.fileno()

        ref = connection_ref(Psycopg2Like())
        self.assertEqual(ref, {"fd": sock.fileno(), "local_address": "127.0.0.1:%d" % sock.getsockname()[1]})
        # The fd is untouched: still open, still blocking.
        sock.sendall(b"x")
        self.assertIsNone(sock.gettimeout())

    def test_known_driver_shapes(self):
        peer = TcpPeer()
        self.addCleanup(peer.close)
        sock = peer.connect()
        self.addCleanup(sock.close)
        fd = sock.fileno()

        class PgConn:
            socket = fd

        class Psycopg3Like:
            pgconn = PgConn()

        class PyMySQLLike:
            _sock = sock

        class Holder:
            pass

        connector = Holder()
        connector._socket = Holder()
        connector._socket.sock = sock

        class Adapted:
            driver_connection = Psycopg3Like()

        for conn in (Psycopg3Like(), PyMySQLLike(), connector, Adapted()):
            self.assertEqual(connection_ref(conn)["fd"], fd, conn)

    def test_unix_sockets_have_only_an_fd(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)

        class Conn:
            def fileno(self):
                return a.fileno()

        self.assertEqual(connection_ref(Conn()), {"fd": a.fileno()})

    def test_no_socket_no_name(self):
        self.assertIsNone(connection_ref(None))
        self.assertIsNone(connection_ref(object()))

        class Closed:
            def fileno(self):
                raise ValueError("closed")

        self.assertIsNone(connection_ref(Closed()))

    def test_default_timeout_does_not_make_the_fd_non_blocking(self):
        peer = TcpPeer()
        self.addCleanup(peer.close)
        sock = peer.connect()
        self.addCleanup(sock.close)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(5.0)
        try:
            self.assertIsNotNone(local_address_of_fd(sock.fileno()))
        finally:
            socket.setdefaulttimeout(old)
        self.assertTrue(sock.getblocking())
        import fcntl

        self.assertFalse(fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)


if __name__ == "__main__":
    unittest.main()
