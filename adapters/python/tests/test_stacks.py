"""Holder stacks (docs/adapter-protocol.md, "Holder stacks"): the code that
checked a connection out, captured at every checkout and sent only for a
checkout still held ``stack_after`` later."""

import os
import time
import unittest
from unittest import mock

try:
    import sqlalchemy
    from sqlalchemy.pool import QueuePool
except ImportError:  # pragma: no cover
    sqlalchemy = None

from poolscope_adapter import PoolReporter, Sender, instrument_sqlalchemy
from poolscope_adapter import _stacks

from .support import Receiver, TcpPeer
from .test_sqlalchemy import NetworkedSqlite

HERE = os.path.abspath(__file__)
LATER = 10 * 10**9


def conn(i):
    return {"fd": 100 + i, "local_address": "127.0.0.1:%d" % (40000 + i)}


def take_and_keep_for_a_report(reporter, i):
    """The application's code that checks a connection out and keeps it."""
    reporter.acquire_end(reporter.next_request(), "ok", conn(i))


class StackTest(unittest.TestCase):
    def setUp(self):
        self.receiver = Receiver()
        self.addCleanup(self.receiver.close)
        self.sender = Sender(self.receiver.path)
        self.addCleanup(self.sender.close)

    def reporter(self, **kwargs):
        kwargs.setdefault("state_interval", 0)
        # Every checkout captures, unless a test says otherwise.
        kwargs.setdefault("stack_interval_us", 0)
        return PoolReporter("orders", {"max": 10}, sender=self.sender, **kwargs)

    def stacks(self):
        return self.receiver.messages("holder_stack")

    def test_a_long_checkout_sends_its_stack_once_naming_the_code(self):
        r = self.reporter(stack_after=1.0)
        take_and_keep_for_a_report(r, 0)
        [end] = self.receiver.messages("acquire_end")
        # Not yet due: nothing formatted, nothing sent.
        self.assertAlmostEqual(r.send_stacks(end["mono_ns"] + 10**8), 0.9, places=3)
        self.assertEqual(self.stacks(), [])
        self.assertIsNone(r.send_stacks(end["mono_ns"] + LATER))
        [m] = self.stacks()
        self.assertEqual((m["fd"], m["local_address"]), (100, "127.0.0.1:40000"))
        self.assertEqual(m["since_ns"], end["mono_ns"])
        self.assertRegex(m["stack"][0], r"^take_and_keep_for_a_report \(.*test_stacks\.py:\d+\)$")
        self.assertIn("test_a_long_checkout_sends_its_stack_once_naming_the_code", m["stack"][1])
        self.assertLessEqual(len(m["stack"]), _stacks.CAPTURED_FRAMES)
        # Once per checkout.
        r.send_stacks(end["mono_ns"] + 2 * LATER)
        self.assertEqual(len(self.stacks()), 1)

    def test_a_sent_stack_goes_again_with_every_checkout_state(self):
        # An agent that restarts learns the checkouts from checkout_state,
        # and their stacks from what follows it.
        r = self.reporter()
        take_and_keep_for_a_report(r, 0)
        r.send_stacks(time.monotonic_ns() + LATER)
        [first] = self.stacks()
        self.receiver.drain()
        self.receiver.received.clear()
        r.send_state()
        kinds = [m["kind"] for m in self.receiver.messages()]
        self.assertEqual(kinds, ["pool", "checkout_state", "holder_stack"])
        [again] = self.stacks()
        self.assertEqual(
            (again["since_ns"], again["stack"], again["fd"]), (first["since_ns"], first["stack"], first["fd"])
        )
        # Returned: the next state has no stack (nor checkout) for it.
        r.release(conn(0))
        self.receiver.drain()
        self.receiver.received.clear()
        r.send_state()
        self.assertEqual([m["kind"] for m in self.receiver.messages()], ["pool"])

    def test_a_short_checkout_sends_no_stack(self):
        r = self.reporter()
        take_and_keep_for_a_report(r, 0)
        r.release(conn(0))
        self.assertIsNone(r.send_stacks(time.monotonic_ns() + LATER))
        self.assertEqual(self.stacks(), [])

    def test_checkout_state_does_not_carry_the_frames(self):
        r = self.reporter()
        take_and_keep_for_a_report(r, 0)
        r.send_state()
        [state] = self.receiver.messages("checkout_state")
        self.assertEqual(sorted(state["checkouts"][0]), ["fd", "local_address", "mono_ns", "tid"])

    def test_off_captures_nothing(self):
        switched_off = [self.reporter(stacks=False)]
        with mock.patch.dict(os.environ, {"POOLSCOPE_ADAPTER_STACKS": "off"}):
            switched_off.append(self.reporter())
        for i, r in enumerate(switched_off):
            take_and_keep_for_a_report(r, i)
            self.assertFalse(r.stacks)
            self.assertFalse([e for e in r._out.values() if "_frames" in e])
            self.assertIsNone(r.send_stacks(time.monotonic_ns() + LATER))
        self.assertEqual(self.stacks(), [])

    def test_captures_are_at_most_one_per_interval_in_the_process(self):
        r = self.reporter(stack_interval_us=200_000)
        other = self.reporter(stack_interval_us=200_000)

        def captured(p):
            return len([e for e in p._out.values() if "_frames" in e])

        _stacks.last_capture.at_ns = 0
        # 50 checkouts within 200 ms, taking turns between two pools: the
        # process captures once (the first, of `other`).
        for i in range(50):
            take_and_keep_for_a_report(r if i % 2 else other, i)
        self.assertEqual((captured(other), captured(r)), (1, 0))
        time.sleep(0.21)
        take_and_keep_for_a_report(r, 99)
        self.assertEqual(captured(r), 1, "the interval passed: captured again")

    def test_settings_from_the_environment(self):
        with mock.patch.dict(os.environ, {"POOLSCOPE_ADAPTER_STACK_AFTER_MS": "250"}):
            self.assertEqual(self.reporter().stack_after, 0.25)
        with mock.patch.dict(os.environ, {"POOLSCOPE_ADAPTER_STACK_AFTER_MS": "soon"}):
            self.assertEqual(self.reporter().stack_after, _stacks.DEFAULT_STACK_AFTER)
        with mock.patch.dict(os.environ, {"POOLSCOPE_ADAPTER_STACKS": ""}):
            self.assertTrue(self.reporter().stacks)
        env = PoolReporter("p", {}, sender=self.sender, state_interval=0)
        self.assertEqual(env.stack_interval_ns, _stacks.DEFAULT_STACK_INTERVAL_NS)
        with mock.patch.dict(os.environ, {"POOLSCOPE_ADAPTER_STACK_INTERVAL_US": "250"}):
            self.assertEqual(PoolReporter("p", {}, sender=self.sender).stack_interval_ns, 250_000)
        with mock.patch.dict(os.environ, {"POOLSCOPE_ADAPTER_STACK_INTERVAL_US": "often"}):
            self.assertEqual(
                PoolReporter("p", {}, sender=self.sender).stack_interval_ns, _stacks.DEFAULT_STACK_INTERVAL_NS
            )

    def test_the_background_thread_sends_it_after_stack_after(self):
        r = self.reporter(stack_after=0.2)
        started = time.monotonic()
        take_and_keep_for_a_report(r, 2)
        deadline = started + 5
        while not self.stacks() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(len(self.stacks()), 1, "no holder_stack within 5 s")
        self.assertGreaterEqual(time.monotonic() - started, 0.2)

    def test_frames_keep_within_the_protocols_limits(self):
        code = (lambda: None).__code__.replace(co_name="f\nforged", co_qualname="f\nforged" + "x" * 300)
        stack = _stacks.format_frames([(code, 7)] * 40)
        self.assertEqual(len(stack), _stacks.MAX_FRAMES)
        self.assertEqual(len(stack[0]), _stacks.MAX_FRAME_CHARS)
        self.assertTrue(stack[0].startswith("f?forged"))


@unittest.skipUnless(sqlalchemy is not None, "SQLAlchemy is not installed")
class SqlalchemyStackTest(unittest.TestCase):
    def test_the_stack_starts_at_the_application_not_in_sqlalchemy(self):
        receiver = Receiver()
        self.addCleanup(receiver.close)
        peer = TcpPeer()
        self.addCleanup(peer.close)
        sender = Sender(receiver.path)
        self.addCleanup(sender.close)
        engine = sqlalchemy.create_engine(
            "sqlite://", creator=lambda: NetworkedSqlite(peer.connect()), poolclass=QueuePool, pool_size=1
        )
        self.addCleanup(engine.dispose)
        reporter = instrument_sqlalchemy(engine, pool_name="orders", sender=sender).reporter
        # The capture interval is the process's: no capture just before.
        _stacks.last_capture.at_ns = -(1 << 62)

        def open_report_connection():
            return engine.connect()

        held = open_report_connection()
        self.addCleanup(held.close)
        reporter.send_stacks(time.monotonic_ns() + LATER)
        [m] = receiver.messages("holder_stack")
        self.assertRegex(m["stack"][0], r"^.*open_report_connection \(%s:\d+\)$" % HERE)
        library = os.path.dirname(sqlalchemy.__file__)
        self.assertFalse([f for f in m["stack"] if library in f or "poolscope_adapter" in f], m["stack"])


if __name__ == "__main__":
    unittest.main()
