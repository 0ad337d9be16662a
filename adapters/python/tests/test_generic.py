"""The generic reporter (``report_pool``): a hand-rolled pool of SQLite
handles, named by the ids the reporter gives them."""

import socket
import sqlite3
import threading
import unittest

from poolscope_adapter import Sender, report_pool
from poolscope_adapter import _generic

from .support import Receiver


class GenericReporterTest(unittest.TestCase):
    def setUp(self):
        self.receiver = Receiver()
        self.addCleanup(self.receiver.close)
        self.sender = Sender(self.receiver.path)
        self.addCleanup(self.sender.close)

    def pool(self, **kwargs):
        kwargs.setdefault("state_interval", 0)
        return report_pool(
            "handles",
            db_system="sqlite",
            server_address="/tmp/app.db",
            max=2,
            library="app",
            sender=self.sender,
            **kwargs
        )

    def test_a_checkout_of_sqlite_handles_names_them_by_id(self):
        pool = self.pool()
        a = sqlite3.connect(":memory:")
        b = sqlite3.connect(":memory:")
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        pool.connection_created(a)
        pool.connection_created(b)
        waiting = pool.acquire()
        waiting.ok(b)
        pool.released(b)
        pool.acquire().timeout()
        pool.connection_closed(a)
        pool.connection_closed(a)  # twice: sent once
        messages = self.receiver.messages()
        self.assertEqual(
            [(m["kind"], m.get("conn"), m.get("result")) for m in messages],
            [
                ("pool", None, None),
                ("connection_created", 1, None),
                ("connection_created", 2, None),
                ("acquire_start", None, None),
                ("acquire_end", 2, "ok"),
                ("release", 2, None),
                ("acquire_start", None, None),
                ("acquire_end", None, "timeout"),
                ("connection_closed", 1, None),
            ],
        )
        registration = messages[0]
        self.assertEqual(
            (registration["db_system"], registration["server_address"], registration["max"]),
            ("sqlite", "/tmp/app.db", 2),
        )
        self.assertNotIn("fd", messages[4], "a handle has no socket")
        self.assertEqual(messages[4]["tid"], threading.get_native_id())

    def test_a_handle_with_a_socket_is_named_by_both(self):
        pool = self.pool()
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        self.addCleanup(server.close)
        client = socket.create_connection(server.getsockname())
        self.addCleanup(client.close)
        pool.connection_created("handle-1", sock=client)
        [created] = self.receiver.messages("connection_created")
        self.assertEqual(created["conn"], 1)
        self.assertEqual(created["fd"], client.fileno())
        self.assertEqual(created["local_address"], "127.0.0.1:%d" % client.getsockname()[1])

    def test_checkout_state_names_handles_by_id(self):
        pool = self.pool()
        pool.acquire().ok("h1")
        pool.acquire().ok("h2")
        pool.released("h1")
        self.receiver.drain()
        self.receiver.received.clear()
        pool.reporter.send_state()
        [state] = self.receiver.messages("checkout_state")
        self.assertEqual([e["conn"] for e in state["checkouts"]], [2])

    def test_remembered_handles_are_bounded_and_checked_out_ones_kept(self):
        pool = self.pool()
        pool.acquire().ok("held")
        limit = _generic.MAX_REMEMBERED
        for i in range(limit + 10):
            pool.connection_created(("idle", i))
        self.assertEqual(len(pool._ids), limit)
        self.assertIn("held", pool._ids)

    def test_a_malformed_system_is_left_out_and_nothing_raises(self):
        pool = report_pool("p", db_system="SQL Server", sender=self.sender)
        [m] = self.receiver.messages()
        self.assertNotIn("db_system", m)
        unhashable = []
        pool.connection_created(unhashable)
        pool.acquire().ok(unhashable)
        pool.released(unhashable)
        pool.connection_closed(unhashable)


if __name__ == "__main__":
    unittest.main()
