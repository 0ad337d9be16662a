"""Re-sending a pool's checkouts (``checkout_state``) so that an agent that
restarted learns the checkouts that began before it
(docs/adapter-protocol.md, Re-sending state after an agent restart)."""

import json
import os
import socket
import threading
import time
import unittest
from unittest import mock

from poolscope_adapter import PoolReporter, Sender
from poolscope_adapter._sender import DEFAULT_STATE_INTERVAL, ENV_STATE_INTERVAL

from .support import Receiver


def conn(i):
    return {"fd": 100 + i, "local_address": "127.0.0.1:%d" % (40000 + i)}


class CheckoutStateTest(unittest.TestCase):
    def setUp(self):
        self.receiver = Receiver()
        self.addCleanup(self.receiver.close)
        self.sender = Sender(self.receiver.path)
        self.addCleanup(self.sender.close)

    def reporter(self, **kwargs):
        kwargs.setdefault("state_interval", 0)
        return PoolReporter("orders", {"db_system": "postgresql", "max": 200}, sender=self.sender, **kwargs)

    def forget(self):
        """Forgets what was received so far."""
        self.receiver.drain()
        self.receiver.received.clear()

    def checkouts(self):
        return [e for m in self.receiver.messages("checkout_state") for e in m["checkouts"]]

    def test_state_lists_what_is_out_since_its_acquire_and_by_whom(self):
        r = self.reporter()
        for i in range(3):
            r.acquire_end(r.next_request(), "ok", conn(i))
        r.release(conn(0))
        r.connection_closed({"fd": 102})
        acquired = {m["fd"]: m["mono_ns"] for m in self.receiver.messages("acquire_end")}
        self.forget()
        r.send_state()
        kinds = [m["kind"] for m in self.receiver.messages()]
        self.assertEqual(kinds, ["pool", "checkout_state"])
        self.assertEqual(
            self.checkouts(),
            [dict(conn(1), mono_ns=acquired[101], tid=threading.get_native_id())],
        )

    def test_nothing_out_sends_only_the_registration(self):
        r = self.reporter()
        r.acquire_end(r.next_request(), "ok", conn(0))
        r.release({"local_address": conn(0)["local_address"]})  # named by address only
        self.forget()
        r.send_state()
        self.assertEqual([m["kind"] for m in self.receiver.messages()], ["pool"])

    def test_a_large_pool_splits_its_state_to_fit_the_datagram_limit(self):
        r = PoolReporter("p" * 128, {"max": 200}, sender=self.sender, state_interval=0)
        for i in range(150):
            r.acquire_end(r.next_request(), "ok", {"fd": 1000 + i, "local_address": "[2001:db8::1234:5678]:%d" % (40000 + i)})
        self.forget()
        r.send_state()
        states = self.receiver.messages("checkout_state")
        self.assertGreaterEqual(len(states), 5)
        for m in states:
            self.assertLessEqual(len(json.dumps(m, separators=(",", ":"))), 4096)
            self.assertLessEqual(len(m["checkouts"]), 32)
        self.assertEqual(sorted(e["fd"] for e in self.checkouts()), list(range(1000, 1150)))
        self.assertEqual(self.sender.dropped, 0)

    def _agent_stops(self, unlink):
        """The agent exits: its socket is closed (ECONNREFUSED) or gone (ENOENT)."""
        self.receiver.drain()
        self.receiver.sock.close()
        if unlink:
            os.unlink(self.receiver.path)

    def _agent_starts(self):
        if os.path.exists(self.receiver.path):
            os.unlink(self.receiver.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self.receiver.path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        self.receiver.sock = sock
        self.receiver.received.clear()

    def _comeback(self, unlink, errno_name):
        r = self.reporter()
        r.acquire_end(r.next_request(), "ok", conn(0))
        r.acquire_end(r.next_request(), "ok", conn(1))
        self._agent_stops(unlink)
        r.release(conn(1))  # lost: no agent
        self.assertEqual(self.sender.dropped_by, {errno_name: 1})
        self._agent_starts()
        r.acquire_start(r.next_request())  # the first message the new agent gets
        kinds = [m["kind"] for m in self.receiver.messages()]
        self.assertEqual(kinds, ["acquire_start", "pool", "checkout_state"])
        self.assertEqual([e["fd"] for e in self.checkouts()], [100])
        self.assertEqual(self.sender.comebacks, 1)
        # Only once per comeback.
        r.acquire_start(r.next_request())
        self.assertEqual(len(self.receiver.messages("checkout_state")), 1)

    def test_an_agent_that_comes_back_gets_the_state_enoent(self):
        self._comeback(unlink=True, errno_name="ENOENT")

    def test_an_agent_that_comes_back_gets_the_state_econnrefused(self):
        self._comeback(unlink=False, errno_name="ECONNREFUSED")

    def test_an_application_that_starts_before_the_agent(self):
        self._agent_stops(unlink=True)
        r = self.reporter()
        r.register()
        r.acquire_end(r.next_request(), "ok", conn(5))
        self._agent_starts()
        r.release(conn(9))
        kinds = [m["kind"] for m in self.receiver.messages()]
        self.assertEqual(kinds, ["release", "pool", "checkout_state"])
        self.assertEqual([e["fd"] for e in self.checkouts()], [105])

    def test_state_is_resent_periodically_only_while_connections_are_out(self):
        r = self.reporter(state_interval=0.2)
        r.register()
        time.sleep(0.5)
        self.assertEqual(self.receiver.messages("checkout_state"), [])
        r.acquire_end(r.next_request(), "ok", conn(0))
        self.receiver.wait_for(lambda ms: sum(m["kind"] == "checkout_state" for m in ms) >= 3, timeout=5)
        registrations = len(self.receiver.messages("pool"))
        self.assertGreaterEqual(registrations, 4)  # re-registered each time
        r.release(conn(0))
        time.sleep(0.3)  # a state already taken may still arrive
        count = len(self.receiver.messages("checkout_state"))
        time.sleep(0.6)
        self.assertEqual(len(self.receiver.messages("checkout_state")), count)

    def test_periodic_state_can_be_turned_off(self):
        r = self.reporter(state_interval=0)
        r.acquire_end(r.next_request(), "ok", conn(0))
        time.sleep(0.3)
        self.assertEqual(self.receiver.messages("checkout_state"), [])

    def test_interval_from_the_environment(self):
        with mock.patch.dict(os.environ, {ENV_STATE_INTERVAL: "2.5"}):
            self.assertEqual(PoolReporter("p", {}, sender=self.sender).state_interval, 2.5)
        for bad in ("soon", "-1"):
            with mock.patch.dict(os.environ, {ENV_STATE_INTERVAL: bad}):
                self.assertEqual(PoolReporter("p", {}, sender=self.sender).state_interval, DEFAULT_STATE_INTERVAL)
        self.assertEqual(DEFAULT_STATE_INTERVAL, 30.0)
        self.assertEqual(PoolReporter("p", {}, sender=self.sender, state_interval=1).state_interval, 1.0)


if __name__ == "__main__":
    unittest.main()
