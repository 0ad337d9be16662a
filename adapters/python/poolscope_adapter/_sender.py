"""Sending adapter messages: one JSON object per Unix datagram, never
waiting.

Everything here fails soft and nothing is ever raised into the application.
With no agent (``ENOENT``, ``ECONNREFUSED``, ...) a message is dropped and
counted. When the agent's queue is momentarily full (``EAGAIN``: a pool
under load sends bursts) the message joins a small, bounded, ordered
backlog that a background thread sends on as the agent makes room, and
that is given up if the agent makes none for a while
(docs/adapter-protocol.md, Transport).
"""

import collections
import errno
import json
import os
import re
import socket
import threading
import time
import weakref

from . import _stacks
from ._failsoft import quietly

#: Protocol version this adapter speaks (docs/adapter-protocol.md).
VERSION = 1
#: Where the agent listens unless ``POOLSCOPE_ADAPTER_SOCKET`` says otherwise.
DEFAULT_SOCKET = "/run/poolscope/adapter.sock"
#: The agent drops larger datagrams.
MAX_MESSAGE_BYTES = 4096
#: Pool names (and other short texts) longer than this are refused.
MAX_NAME_CHARS = 128
#: A ``db_system`` the agent takes: a ``db.system.name`` of the semantic
#: conventions (``postgresql``, ``sqlite``...).
_SYSTEM_NAME = re.compile(r"^[a-z0-9._]{1,32}$")

ENV_SOCKET = "POOLSCOPE_ADAPTER_SOCKET"

# sendto() results.
_OK, _FULL, _FAILED = 0, 1, 2
# The agent's queue (or our socket's send buffer) is full: try again soon.
_FULL_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
# No agent listens: after these, the next successful send means it came back.
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED})

ENV_STATE_INTERVAL = "POOLSCOPE_ADAPTER_STATE_INTERVAL"
#: How often (seconds) a pool with connections checked out re-sends its
#: registration and checkouts, so that an agent that restarted while the
#: application was idle learns them back.
DEFAULT_STATE_INTERVAL = 30.0
#: Entries per ``checkout_state`` datagram (the agent takes up to 64).
STATE_ENTRIES_PER_MESSAGE = 32


def socket_path():
    """The agent's socket: ``$POOLSCOPE_ADAPTER_SOCKET``, else the default."""
    return os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET


def mono_ns():
    """CLOCK_MONOTONIC in nanoseconds: the kernel's (and the agent's) clock."""
    return time.monotonic_ns()


def _encode(message):
    """A message's datagram: compact JSON in UTF-8 (raises if it cannot be
    serialized)."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


class _ProcessState:
    """A sender's socket and backlog in one process. A forked child makes
    its own: what the parent had backlogged is the parent's to send."""

    def __init__(self):
        self.pid = os.getpid()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            # Datagrams waiting in the agent's queue count against our send
            # buffer: room for a few hundred more (the kernel caps it).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        except OSError:
            pass
        self.sock = sock
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.backlog = collections.deque()
        self.thread_started = False
        self.closed = False


class Sender:
    """A non-blocking sender of adapter messages to one socket path.

    ``path`` defaults to :func:`socket_path` at construction. Thread-safe;
    messages from all threads reach the agent in the order they were sent.
    ``send()`` never waits: it hands the datagram to the kernel, puts it in
    the backlog, or drops it.
    """

    #: Most messages kept while the agent's queue is full.
    BACKLOG_MAX = 16384
    #: Give the backlog up after this long without the agent making room.
    BACKLOG_GIVE_UP = 5.0
    #: How often the background thread retries a full queue (seconds).
    BACKLOG_RETRY = 0.001
    #: Messages sent per hold of the lock.
    BACKLOG_BATCH = 64

    def __init__(self, path=None):
        self.path = path or socket_path()
        #: Handed to the kernel (queued at the agent's socket).
        self.sent = 0
        #: Given up, in all.
        self.dropped = 0
        #: Given up, by reason: an errno name ("ENOENT", "ECONNREFUSED";
        #: "EAGAIN" for a backlog the agent never made room for),
        #: "backlog_full", "closed", "too_large" or "unserializable".
        self.dropped_by = {}
        #: Ever put in the backlog (sent later, or given up).
        self.deferred = 0
        #: Times a send succeeded after sends had failed for want of an
        #: agent: each is an agent (re)starting, and pools re-send their state.
        self.comebacks = 0
        self._agent_gone = False
        self._state_lock = threading.Lock()
        self._st = None

    # -- per-process state ------------------------------------------------

    def _state(self):
        st = self._st
        if st is not None and st.pid == os.getpid():
            return st
        with self._state_lock:
            st = self._st
            if st is None or st.pid != os.getpid():
                if st is not None:
                    # Inherited over fork(): this process's copy of the fd.
                    with quietly():
                        st.sock.close()
                st = _ProcessState()
                self._st = st
            return st

    def _drop(self, reason, n=1):
        self.dropped += n
        self.dropped_by[reason] = self.dropped_by.get(reason, 0) + n
        return False

    def _try_send(self, st, data):
        try:
            st.sock.sendto(data, socket.MSG_DONTWAIT, self.path)
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                return _FULL
            if e.errno in _GONE_ERRNOS:
                self._agent_gone = True
            self._drop(errno.errorcode.get(e.errno, "error") if e.errno else "error")
            return _FAILED
        self.sent += 1
        if self._agent_gone:
            self._agent_gone = False
            self.comebacks += 1
        return _OK

    def _drain(self, st, limit):
        """Sends backlogged messages (at most ``limit``) until the agent's
        queue is full; ``st.lock`` held. True if the backlog is empty."""
        backlog = st.backlog
        for _ in range(limit):
            if not backlog:
                return True
            if self._try_send(st, backlog[0]) == _FULL:
                return False
            backlog.popleft()
        return not backlog

    # -- API ----------------------------------------------------------------

    def send(self, message):
        """Sends one message (a dict): True if it was sent or backlogged,
        False if it was dropped. Never blocks, never raises."""
        try:
            data = _encode(message)
        except Exception:
            return self._drop("unserializable")
        if len(data) > MAX_MESSAGE_BYTES:
            return self._drop("too_large")
        try:
            st = self._state()
            with st.lock:
                # Behind whatever waits already, so that order is kept.
                if not st.backlog or self._drain(st, self.BACKLOG_BATCH):
                    result = self._try_send(st, data)
                    if result != _FULL:
                        return result == _OK
                if len(st.backlog) >= self.BACKLOG_MAX:
                    return self._drop("backlog_full")
                st.backlog.append(data)
                self.deferred += 1
                self._start_thread(st)
                st.wake.notify()
                return True
        except Exception:
            return self._drop("error")

    def _start_thread(self, st):
        if st.thread_started:
            return
        st.thread_started = True
        try:
            threading.Thread(
                target=_send_backlog,
                args=(weakref.ref(self), st),
                name="poolscope-adapter",
                daemon=True,
            ).start()
        except Exception:
            # No thread: later sends drain the backlog instead.
            st.thread_started = False

    def stats(self):
        """The counters, and how many messages wait in the backlog now."""
        st = self._st
        waiting = len(st.backlog) if st is not None and st.pid == os.getpid() else 0
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "dropped_by": dict(self.dropped_by),
            "deferred": self.deferred,
            "backlogged": waiting,
            "comebacks": self.comebacks,
        }

    def flush(self, timeout=1.0):
        """Waits up to ``timeout`` seconds for the backlog to be sent (for a
        clean exit). True if it is empty. Never raises."""
        try:
            st = self._state()
            deadline = time.monotonic() + timeout
            while True:
                with st.lock:
                    if self._drain(st, self.BACKLOG_BATCH):
                        return True
                if time.monotonic() >= deadline:
                    return False
                time.sleep(self.BACKLOG_RETRY)
        except Exception:
            return False

    def close(self):
        """Closes the socket; what waits in the backlog is dropped."""
        with self._state_lock:
            st, self._st = self._st, None
        if st is None:
            return
        with st.lock:
            st.closed = True
            if st.backlog and st.pid == os.getpid():
                self._drop("closed", len(st.backlog))
            st.backlog.clear()
            st.wake.notify()
        with quietly():
            st.sock.close()


def _send_backlog(sender_ref, st):
    """The background thread: sends the backlog in order as the agent makes
    room, gives it up when the agent makes none for ``BACKLOG_GIVE_UP``, and
    ends with its sender (or its process's state)."""
    stuck_since = None
    while True:
        sender = sender_ref()
        if sender is None or st.closed or st.pid != os.getpid():
            return
        with st.lock:
            if not st.backlog:
                stuck_since = None
                # Wake now and then to notice a sender that is gone.
                st.wake.wait(0.5)
                empty = True
            else:
                before = len(st.backlog)
                empty = sender._drain(st, sender.BACKLOG_BATCH)
                if empty or len(st.backlog) < before:
                    stuck_since = None
                else:
                    now = time.monotonic()
                    if stuck_since is None:
                        stuck_since = now
                    elif now - stuck_since >= sender.BACKLOG_GIVE_UP:
                        sender._drop("EAGAIN", len(st.backlog))
                        st.backlog.clear()
                        stuck_since = None
        retry = sender.BACKLOG_RETRY
        del sender
        if not empty:
            time.sleep(retry)


_default = None
_default_lock = threading.Lock()


def default_sender():
    """The process's shared sender to :func:`socket_path`."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Sender()
    return _default


def _short(text):
    if text is None:
        return None
    text = str(text)
    if not text or len(text) > MAX_NAME_CHARS:
        return None
    return text


def normalize_db_system(name):
    """The agent's db_system for a dialect or driver name, or None."""
    if not name:
        return None
    name = str(name).lower()
    if name.startswith("postgres") or name in ("psycopg", "psycopg2", "asyncpg", "pg8000"):
        return "postgresql"
    if name in ("mysql", "mariadb") or name.startswith("mysql") or name == "pymysql":
        return "mysql"
    if name == "redis":
        return "redis"
    # Systems the agent reads no protocol of, by their semantic-convention
    # names.
    return {
        "sqlite": "sqlite",
        "pysqlite": "sqlite",
        "aiosqlite": "sqlite",
        "mssql": "microsoft.sql_server",
        "oracle": "oracle.db",
        "duckdb": "duckdb",
    }.get(name)


class PoolReporter:
    """Builds and sends the messages of one pool.

    The library integrations call its methods from their hooks; each method
    swallows every error. ``conn`` arguments are connection references as
    :func:`poolscope_adapter._conn.connection_ref` returns them: a dict with
    ``fd`` and/or ``local_address``, or None when the connection could not
    be named (then nothing is sent: the agent would reject it).
    """

    #: Send the registration again this often (seconds), so that an agent
    #: that restarted learns the pool's settings back.
    REREGISTER_SECONDS = 60.0

    def __init__(
        self,
        name,
        info,
        sender=None,
        state_interval=None,
        stacks=None,
        stack_after=None,
        stack_interval_us=None,
    ):
        self.name = str(name)[:MAX_NAME_CHARS] or "pool"
        self.info = {k: v for k, v in info.items() if v is not None}
        self.sender = sender or default_sender()
        #: Seconds between periodic re-sends of the checkouts (while there
        #: are any); 0 turns them off (re-sends after a comeback remain).
        self.state_interval = _state_interval(state_interval)
        #: Capture the stack of the code that checks each connection out,
        #: and send it for checkouts still held ``stack_after`` seconds
        #: later (``POOLSCOPE_ADAPTER_STACKS``, ``_STACK_AFTER_MS``).
        self.stacks = _stacks.stacks_enabled(stacks)
        self.stack_after = _stacks.stack_after(stack_after)
        #: At most one capture per this long in the process (ns).
        self.stack_interval_ns = _stacks.stack_interval_ns(stack_interval_us)
        # Frames of these files (the pool library's, ours) are skipped
        # above the application's first.
        self._stack_skip = _stacks.library_prefixes() if self.stacks else ()
        self._last_checkout_ns = 0
        # The process whose state ticker watches this pool.
        self._watched_pid = None
        self._requests = iter(range(1, 1 << 62))
        self._request_lock = threading.Lock()
        self._registered_at = None
        self._registered_pid = None
        # Connections checked out now: key -> checkout_state entry.
        self._out = {}
        self._out_lock = threading.Lock()
        self._out_pid = os.getpid()
        self._comebacks_seen = getattr(self.sender, "comebacks", 0)
        self._state_sent_at = time.monotonic()

    # -- plumbing ---------------------------------------------------------

    def _send(self, kind, fields, at_ns=None):
        message = {
            "v": VERSION,
            "kind": kind,
            "pool": self.name,
            "mono_ns": at_ns if at_ns is not None else mono_ns(),
        }
        message.update(fields)
        sent = self.sender.send(message)
        comebacks = getattr(self.sender, "comebacks", 0)
        if comebacks != self._comebacks_seen:
            # The agent came back: it knows nothing of this pool.
            self._comebacks_seen = comebacks
            self.send_state()
        return sent

    def _out_here(self):
        """The checked-out entries of this process, by key; ``_out_lock``
        held. A forked child starts with none of its parent's."""
        if self._out_pid != os.getpid():
            self._out_pid = os.getpid()
            self._out = {}
        return self._out

    def _has_checkouts(self):
        """Whether this process has connections checked out (no copy: the
        state ticker asks every half stack_after while a pool is busy)."""
        with self._out_lock:
            return bool(self._out_here())

    def send_stacks(self, now_ns=None):
        """Sends the stacks of checkouts held ``stack_after`` or longer
        (once each). Returns the seconds until the next one is due, or
        None when no checkout waits for its stack."""
        if not self.stacks:
            return None
        now_ns = mono_ns() if now_ns is None else now_ns
        after_ns = int(self.stack_after * 1e9)
        due, next_due = [], None
        with self._out_lock:
            for entry in self._out_here().values():
                frames = entry.get(_FRAMES)
                if frames is None:
                    continue
                left = entry["mono_ns"] + after_ns - now_ns
                if left <= 0:
                    del entry[_FRAMES]
                    due.append((entry, frames))
                elif next_due is None or left < next_due:
                    next_due = left
        for entry, frames in due:
            with quietly():
                # Formatted once, outside the lock, and kept while held: it
                # goes again with every checkout_state, so that an agent
                # that restarted has it too.
                entry[_SENT_STACK] = _stacks.format_frames(frames)
                self._send_stack(entry)
        return None if next_due is None else next_due / 1e9

    def _send_stack(self, entry):
        with quietly():
            stack = entry.get(_SENT_STACK)
            if not stack:
                return
            fields = {k: entry[k] for k in ("local_address", "fd", "conn") if k in entry}
            fields["since_ns"] = entry["mono_ns"]
            fields["stack"] = stack
            self._send("holder_stack", fields)

    def _checked_out(self, conn, at_ns, tid):
        entry = {k: conn[k] for k in ("local_address", "fd", "conn") if k in conn}
        entry["mono_ns"] = at_ns
        entry["tid"] = tid
        if self.stacks:
            last = _stacks.last_capture
            if at_ns - last.at_ns >= self.stack_interval_ns:
                last.at_ns = at_ns
                # Sent (and formatted) only if still held stack_after from now.
                frames = _stacks.capture(self._stack_skip, 3)
                if frames:
                    entry[_FRAMES] = frames
            self._last_checkout_ns = at_ns
        with self._out_lock:
            out = self._out_here()
            was_idle = not out
            out[_conn_key(conn)] = entry
        if was_idle:
            # Only on idle -> busy, to keep the ticker's lock off the hot path.
            _ticker.watch(self)

    def _returned(self, conn):
        with self._out_lock:
            out = self._out_here()
            if out.pop(_conn_key(conn), None) is None and conn.get("local_address"):
                # Named differently than when it was handed out.
                address = conn["local_address"]
                for key, entry in list(out.items()):
                    if entry.get("local_address") == address:
                        del out[key]

    def _maybe_reregister(self):
        now = time.monotonic()
        if (
            self._registered_pid != os.getpid()
            or self._registered_at is None
            or now - self._registered_at >= self.REREGISTER_SECONDS
        ):
            self.register()

    def next_request(self):
        with self._request_lock:
            return next(self._requests)

    # -- messages ---------------------------------------------------------

    def register(self):
        with quietly():
            fields = {}
            for key in ("db_system", "server_address", "namespace", "library"):
                value = _short(self.info.get(key))
                if value is not None:
                    fields[key] = value
            if "db_system" in fields and not _SYSTEM_NAME.match(fields["db_system"]):
                del fields["db_system"]
            for key in ("server_port", "max", "min_idle", "idle_max"):
                value = self.info.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    if key == "server_port" and value > 65535:
                        continue
                    if value > 0xFFFFFFFF:
                        continue
                    fields[key] = value
            self._registered_at = time.monotonic()
            self._registered_pid = os.getpid()
            self._send("pool", fields)

    def update(self, **info):
        """Changes the registration (e.g. a new max) and sends it again."""
        with quietly():
            self.info.update({k: v for k, v in info.items() if v is not None})
            self.register()

    def acquire_start(self, request):
        with quietly():
            self._maybe_reregister()
            self._send("acquire_start", {"request": request, "tid": threading.get_native_id()})

    def acquire_end(self, request, result, conn=None):
        with quietly():
            self._maybe_reregister()
            tid = threading.get_native_id()
            fields = {"request": request, "result": result, "tid": tid}
            at_ns = mono_ns()
            if result == "ok":
                if not conn:
                    return
                fields.update(conn)
                # Before sending: a comeback noticed by this very send
                # re-sends the state, this checkout included.
                self._checked_out(conn, at_ns, tid)
            self._send("acquire_end", fields, at_ns)

    def _conn_event(self, kind, conn):
        with quietly():
            if not conn:
                return
            self._maybe_reregister()
            if kind in ("release", "connection_closed"):
                self._returned(conn)
            self._send(kind, dict(conn))

    def release(self, conn):
        self._conn_event("release", conn)

    def connection_created(self, conn, connected_here=False):
        """``connected_here``: this thread's connect() opened the socket
        (the agent may then tie a connection named by ``conn`` alone to it)."""
        if connected_here and conn:
            conn = dict(conn, tid=threading.get_native_id())
        self._conn_event("connection_created", conn)

    def connection_closed(self, conn):
        self._conn_event("connection_closed", conn)

    def send_state(self):
        """Sends the registration and the connections checked out now
        (``checkout_state``, split to fit the datagram limit). Sent when the
        agent comes back and periodically; the agent takes it idempotently."""
        with quietly():
            self._state_sent_at = time.monotonic()
            self.register()
            with self._out_lock:
                held = list(self._out_here().values())
            entries = [{k: v for k, v in e.items() if k not in _PRIVATE} for e in held]
            if not entries:
                return
            entries.sort(key=lambda e: e["mono_ns"])
            base = len(
                _encode(
                    {"v": VERSION, "kind": "checkout_state", "pool": self.name,
                     "mono_ns": mono_ns(), "checkouts": []}
                )
            )
            chunk, size = [], base
            for entry in entries:
                n = len(_encode(entry)) + 1
                if chunk and (
                    len(chunk) >= STATE_ENTRIES_PER_MESSAGE or size + n > MAX_MESSAGE_BYTES
                ):
                    self._send("checkout_state", {"checkouts": chunk})
                    chunk, size = [], base
                chunk.append(entry)
                size += n
            self._send("checkout_state", {"checkouts": chunk})
            # The stacks already sent, after the checkouts they belong to.
            for entry in held:
                if _SENT_STACK in entry:
                    self._send_stack(entry)

    def _state_due(self, now):
        """Seconds until the next periodic state is due (0: now), or None
        when there is nothing to send."""
        if self.state_interval <= 0 or not self._has_checkouts():
            return None
        return max(0.0, self._state_sent_at + self.state_interval - now)


# A checkout entry's captured frames, until its stack is due, and then its
# formatted stack; neither is sent in checkout_state.
_FRAMES = "_frames"
_SENT_STACK = "_stack"
_PRIVATE = (_FRAMES, _SENT_STACK)


def _conn_key(conn):
    if conn.get("conn") is not None:
        return ("conn", conn["conn"])
    fd = conn.get("fd")
    return ("fd", fd) if fd is not None else ("addr", conn.get("local_address"))


def _state_interval(value):
    if value is None:
        value = os.environ.get(ENV_STATE_INTERVAL)
    if value is None or value == "":
        return DEFAULT_STATE_INTERVAL
    try:
        value = float(value)
    except (TypeError, ValueError):
        return DEFAULT_STATE_INTERVAL
    return value if value >= 0 else DEFAULT_STATE_INTERVAL


class _StateTicker:
    """One daemon thread per process that re-sends the state of pools with
    connections checked out, each at its own interval. Pools are held
    weakly; the thread sleeps while there is nothing to send."""

    #: Longest sleep, so that a pool watched later is not missed for long.
    MAX_SLEEP = 30.0
    #: A pool that checked a connection out this recently is looked at
    #: every half ``stack_after`` for stacks due.
    ACTIVE_NS = 60 * 10**9

    def __init__(self):
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.pools = weakref.WeakSet()
        self.pid = None
        #: When (time.monotonic) the thread wakes next at the latest.
        self.wakes_by = 0.0

    def watch(self, reporter):
        if reporter.state_interval <= 0 and not reporter.stacks:
            return
        pid = os.getpid()
        if reporter._watched_pid == pid and self.pid == pid:
            # Watched already: wake the thread only if it sleeps past when
            # this pool needs it.
            needed = reporter.stack_after / 2 if reporter.stacks else reporter.state_interval
            if self.wakes_by <= time.monotonic() + needed:
                return
        with self.lock:
            reporter._watched_pid = pid
            self.pools.add(reporter)
            if self.pid != os.getpid():
                # First use, or a forked child: threads do not survive fork.
                self.pid = os.getpid()
                try:
                    threading.Thread(
                        target=self._run, name="poolscope-adapter-state", daemon=True
                    ).start()
                except Exception:
                    self.pid = None
            self.wake.notify()

    def _run(self):
        pid = os.getpid()
        while True:
            with self.lock:
                if self.pid != pid:
                    return
                pools = list(self.pools)
            now = time.monotonic()
            sleep = self.MAX_SLEEP
            for reporter in pools:
                stack_due = reporter.send_stacks()
                if stack_due is not None:
                    sleep = min(sleep, stack_due)
                elif reporter.stacks and mono_ns() - reporter._last_checkout_ns < self.ACTIVE_NS:
                    # A pool in use: its next checkout does not wake this
                    # thread (that would cost every checkout a thread
                    # switch), so look again within half a stack_after.
                    sleep = min(sleep, reporter.stack_after / 2)
                due = reporter._state_due(now)
                if due is None:
                    continue
                if due == 0:
                    reporter.send_state()
                    due = reporter.state_interval
                sleep = min(sleep, due)
            del pools
            with self.lock:
                sleep = max(sleep, 0.01)
                self.wakes_by = time.monotonic() + sleep
                self.wake.wait(sleep)


_ticker = _StateTicker()
