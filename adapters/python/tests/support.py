"""A stand-in for the agent: a Unix datagram socket in a temp dir that
collects what the adapter sends, with the sender's pid from the kernel."""

import json
import os
import shutil
import socket
import struct
import tempfile
import threading
import time

# The golden messages (adapters/protocol/golden/, one file per kind): every
# message the adapter sends must have the shape of that kind's examples.
GOLDEN_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "protocol", "golden"
)


def _json_type(value):
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    for kind, name in ((float, "number"), (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def _shape(examples):
    """What examples (JSON objects) have: each key's JSON types, the keys
    all of them have, and for lists of objects the shape of their items
    (lists of numbers, such as a `checkouts` message's, are checked as
    arrays)."""
    values = {}
    for example in examples:
        for key, value in example.items():
            values.setdefault(key, []).append(value)

    def objects(vs):
        return [item for v in vs if isinstance(v, list) for item in v if isinstance(item, dict)]

    return {
        "types": {k: {_json_type(v) for v in vs} for k, vs in values.items()},
        "required": set.intersection(*(set(e) for e in examples)) if examples else set(),
        "items": {k: _shape(objects(vs)) for k, vs in values.items() if objects(vs)},
    }


def _load_golden():
    by_kind = {}
    for name in sorted(os.listdir(GOLDEN_DIR)):
        if name.endswith(".json"):
            with open(os.path.join(GOLDEN_DIR, name), encoding="utf-8") as f:
                for message in json.load(f)["valid"]:
                    by_kind.setdefault(message["kind"], []).append(message)
    return {kind: _shape(examples) for kind, examples in by_kind.items()}


GOLDEN = _load_golden()
KINDS = set(GOLDEN)


def check_golden_shape(m, shape=None, where="message"):
    """Asserts that `m` has the golden shape of its kind: only keys the
    examples have, each with a JSON type they give it, and every key all of
    them have. Values (times, pids, fds) are compared by type only."""
    if shape is None:
        assert m.get("kind") in GOLDEN, "no golden file for %r" % m
        shape = GOLDEN[m["kind"]]
    missing = shape["required"] - set(m)
    assert not missing, "%s lacks %s: %r" % (where, sorted(missing), m)
    for key, value in m.items():
        assert key in shape["types"], "%s has %r, no golden example has: %r" % (where, key, m)
        assert _json_type(value) in shape["types"][key], "%s: %r is a %s, golden: %s (%r)" % (
            where, key, _json_type(value), sorted(shape["types"][key]), m)
        if key in shape["items"]:
            for item in value:
                check_golden_shape(item, shape["items"][key], "%s.%s[]" % (where, key))


class Receiver:
    """`golden=False` for tests of the transport that send hand-made
    payloads rather than the adapter's messages: their shapes are not the
    golden ones."""

    def __init__(self, golden=True):
        self.golden = golden
        self.dir = tempfile.mkdtemp(prefix="poolscope-adapter-test-")
        self.path = os.path.join(self.dir, "adapter.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        # (sender pid, decoded message) in arrival order.
        self.received = []
        self._lock = threading.RLock()
        self._thread = None

    def start(self):
        """Reads on a thread from now on, so that a burst of messages does
        not overflow the socket's queue (the adapter drops, never waits)."""
        self._stop = threading.Event()

        def run():
            import select

            while not self._stop.is_set():
                ready, _, _ = select.select([self.sock], [], [], 0.05)
                if ready:
                    with self._lock:
                        self._read()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def drain(self):
        """Reads everything queued now; returns the messages read."""
        with self._lock:
            return self._read()

    def _read(self):
        new = []
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(8192, socket.CMSG_SPACE(12))
            except BlockingIOError:
                break
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            assert len(data) <= 4096, "datagram of %d bytes" % len(data)
            message = json.loads(data.decode("utf-8"))
            check_message(message, self.golden)
            new.append((pid, message))
        self.received.extend(new)
        return [m for _, m in new]

    def messages(self, kind=None):
        self.drain()
        return [m for _, m in self.received if kind is None or m["kind"] == kind]

    def wait_for(self, predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages()
            if predicate(msgs):
                return msgs
            if time.monotonic() > deadline:
                raise AssertionError("timed out; got %r" % msgs)
            time.sleep(0.01)

    def close(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        try:
            self.sock.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def check_message(m, golden=True):
    """What every message must be, per docs/adapter-protocol.md and (unless
    told otherwise) the golden messages."""
    if golden:
        check_golden_shape(m)
    assert m["v"] == 1, m
    assert m["kind"] in KINDS, m
    assert isinstance(m["pool"], str) and 1 <= len(m["pool"]) <= 128, m
    assert "pid" not in m, "adapters never send pid: %r" % m
    if "mono_ns" in m:
        assert isinstance(m["mono_ns"], int) and m["mono_ns"] > 0, m
    if m["kind"] in ("acquire_start", "acquire_end"):
        assert isinstance(m["request"], int), m
    if m["kind"] == "acquire_end":
        assert m["result"] in ("ok", "timeout", "error"), m
    named = m["kind"] in ("release", "connection_created", "connection_closed") or (
        m["kind"] == "acquire_end" and m["result"] == "ok"
    )
    if named:
        assert "fd" in m or "local_address" in m or "conn" in m, m
    if m["kind"] == "checkout_state":
        assert isinstance(m["checkouts"], list) and len(m["checkouts"]) <= 64, m
        for entry in m["checkouts"]:
            assert "fd" in entry or "local_address" in entry or "conn" in entry, m
            assert isinstance(entry["mono_ns"], int) and entry["mono_ns"] > 0, m


class TcpPeer:
    """A listening socket on 127.0.0.1 so that fake driver connections have
    real TCP sockets (and real local addresses)."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.accepted = []

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port))
        peer, _ = self.listener.accept()
        self.accepted.extend((peer, sock))
        return sock

    def close(self):
        for s in self.accepted:
            s.close()
        self.listener.close()
