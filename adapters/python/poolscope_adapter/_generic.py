"""A reporter for pools no integration covers: hand-rolled pools, pools of
SQLite handles, pools whose library hides its sockets. The pool's own code
calls it at each step; the reporter numbers the connections (the protocol's
``conn`` id), beside their socket when the pool can name one.

    from poolscope_adapter import report_pool

    report = report_pool("handles", db_system="sqlite",
                         server_address="/var/lib/app/app.db", max=4)
    handle = sqlite3.connect(path); report.connection_created(handle)
    waiting = report.acquire()          # before the pool may wait
    ...                                 # the pool finds or waits for a handle
    waiting.ok(handle)                  # or waiting.timeout() / waiting.error()
    report.released(handle)             # back in the pool
    report.connection_closed(handle)    # closed or discarded
"""

import itertools
import threading

from ._failsoft import quietly
from ._sender import _SYSTEM_NAME, PoolReporter

#: Connections remembered per pool; past this the oldest one not checked
#: out is forgotten (a pool that never reports closes cannot grow without
#: bound).
MAX_REMEMBERED = 4096


class Waiting:
    """One caller waiting for a connection: end it once with :meth:`ok`,
    :meth:`timeout` or :meth:`error`."""

    __slots__ = ("_pool", "_request")

    def __init__(self, pool, request):
        self._pool = pool
        self._request = request

    def ok(self, connection, sock=None):
        """The caller got ``connection`` (``sock`` as in
        :meth:`ReportedPool.connection_created`)."""
        with quietly():
            pool = self._pool
            ref = pool._ref(connection, sock)
            with pool._lock:
                pool._out.add(ref["conn"])
            if self._request is not None:
                pool.reporter.acquire_end(self._request, "ok", ref)

    def timeout(self):
        """The pool gave up waiting."""
        self._end("timeout")

    def error(self):
        """The pool failed, or the caller stopped waiting."""
        self._end("error")

    def _end(self, result):
        with quietly():
            if self._request is not None:
                self._pool.reporter.acquire_end(self._request, result)


class ReportedPool:
    """The messages of one hand-rolled pool. Every method swallows its own
    errors and never blocks: reporting never breaks the pool.

    Connections are named by the objects the pool passes (the handle
    itself, or any hashable that stands for it), numbered in the order they
    are first seen. They are remembered (a strong reference when the handle
    itself is passed) until :meth:`connection_closed`.
    """

    def __init__(self, name, info, sender=None, state_interval=None):
        self.reporter = PoolReporter(name, info, sender=sender, state_interval=state_interval)
        self.name = self.reporter.name
        self._ids = {}
        self._out = set()
        self._next = itertools.count(1)
        self._lock = threading.Lock()

    def _ref(self, connection, sock=None):
        """The message fields naming ``connection``: its number, and its
        socket's fd and local address when ``sock`` gives them."""
        with self._lock:
            number = self._ids.get(connection)
            if number is None:
                if len(self._ids) >= MAX_REMEMBERED:
                    self._forget_one()
                number = next(self._next)
                self._ids[connection] = number
        ref = {"conn": number}
        if sock is not None:
            from ._conn import connection_ref

            named = connection_ref(sock)
            if named:
                ref.update(named)
        return ref

    def _forget_one(self):
        """Forgets the oldest connection not checked out (``_lock`` held)."""
        for key, number in self._ids.items():
            if number not in self._out:
                del self._ids[key]
                return
        self._ids.pop(next(iter(self._ids)))

    def connection_created(self, connection, sock=None, connected_here=False):
        """The pool opened ``connection``. ``sock``: its socket (a socket
        object, an fd, or a driver connection with one) if the pool can name
        it; the agent then joins it to the kernel's view of that socket.

        ``connected_here=True`` says that this thread opened the socket (a
        driver that connects on the calling thread, as psycopg2 does): the
        agent may then find the socket itself, when exactly one fits. Leave
        it False if the connect may have run on another thread."""
        with quietly():
            ref = self._ref(connection, sock)
            self.reporter.connection_created(ref, connected_here=connected_here)

    def conn_id(self, connection):
        """The number the agent knows ``connection`` by (its ``conn`` id in
        the API and reports), or None if it was never reported."""
        with self._lock:
            return self._ids.get(connection)

    def acquire(self):
        """A caller asks for a connection: call before the pool may wait."""
        try:
            request = self.reporter.next_request()
            self.reporter.acquire_start(request)
            return Waiting(self, request)
        except Exception:
            return Waiting(self, None)

    def released(self, connection):
        """The caller gave ``connection`` back to the pool."""
        with quietly():
            ref = self._ref(connection)
            with self._lock:
                self._out.discard(ref["conn"])
            self.reporter.release(ref)

    def connection_closed(self, connection):
        """The pool closed or discarded ``connection``; it is forgotten."""
        with quietly():
            with self._lock:
                number = self._ids.pop(connection, None)
                if number is not None:
                    self._out.discard(number)
            if number is not None:
                self.reporter.connection_closed({"conn": number})

    def update(self, **info):
        """Changes the registration (e.g. a new ``max``)."""
        self.reporter.update(**info)


def report_pool(
    name,
    db_system=None,
    server_address=None,
    server_port=None,
    namespace=None,
    max=None,
    min_idle=None,
    library=None,
    sender=None,
    state_interval=None,
):
    """Registers a hand-rolled pool with the agent and returns its
    :class:`ReportedPool`. ``db_system`` is the semantic conventions' name
    (``sqlite``, ``postgresql``, ...); ``server_address`` what it talks to
    (host, or the database file). Never raises."""
    if db_system is not None and not _SYSTEM_NAME.match(str(db_system)):
        db_system = None
    info = {
        "db_system": db_system,
        "server_address": server_address,
        "server_port": server_port,
        "namespace": namespace,
        "max": max,
        "min_idle": min_idle,
        "library": library,
    }
    pool = ReportedPool(name, info, sender=sender, state_interval=state_interval)
    with quietly():
        pool.reporter.register()
    return pool
