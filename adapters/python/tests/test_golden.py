"""Every kind of message the adapter sends has the shape of the golden
messages (adapters/protocol/golden/): the Receiver checks each message it
reads (support.check_message); this makes sure every kind is sent."""

import time
import unittest

from poolscope_adapter import PoolReporter, Sender

from .support import KINDS, Receiver


class GoldenShapeTest(unittest.TestCase):
    def test_every_kind_sent_has_the_golden_shape(self):
        receiver = Receiver()
        self.addCleanup(receiver.close)
        sender = Sender(receiver.path)
        self.addCleanup(sender.close)
        info = {
            "db_system": "postgresql",
            "server_address": "127.0.0.1",
            "server_port": 5432,
            "namespace": "shop",
            "max": 10,
            "min_idle": 2,
            "idle_max": 5,
            "library": "sqlalchemy",
        }
        r = PoolReporter("orders", info, sender=sender, state_interval=0)
        tcp = {"fd": 12, "local_address": "127.0.0.1:40000"}
        unix = {"fd": 13}
        r.register()
        for conn in (tcp, unix):
            r.connection_created(conn)
            request = r.next_request()
            r.acquire_start(request)
            r.acquire_end(request, "ok", conn)
        r.send_state()
        # Both are still out well past stack_after: their stacks go.
        r.send_stacks(time.monotonic_ns() + 10**10)
        r.release(tcp)
        r.connection_closed(unix)
        for result in ("timeout", "error"):
            request = r.next_request()
            r.acquire_start(request)
            r.acquire_end(request, result)
        # Each message was checked against the golden shapes as it was read.
        sent = {m["kind"] for m in receiver.messages()}
        # `checkout` and `checkouts` (short checkouts in one message) are
        # for adapters that batch; this one sends each message as its own
        # datagram at once.
        self.assertEqual(sent, KINDS - {"checkout", "checkouts"})


if __name__ == "__main__":
    unittest.main()
