"""SQLAlchemy: pool events and a wrapper around ``Pool.connect``.

SQLAlchemy fires ``checkout`` when a caller has its connection but has no
event for "a caller started waiting", so the engine's pool gets its
``connect`` method wrapped (on the instance, again after ``dispose()``):
``acquire_start`` before, ``acquire_end`` with ``timeout`` or ``error`` if
it raises. The ``checkout`` event sends the matching ``acquire_end ok``
under the same request id, carried in a context variable (per thread,
asyncio task and greenlet).
"""

import contextvars
import logging

from ._conn import connection_ref
from ._sender import PoolReporter, normalize_db_system
from ._failsoft import quietly

log = logging.getLogger("poolscope_adapter")

_INFO_KEY = "poolscope"
_ATTR = "_poolscope_instrumentation"

# The request that the innermost Pool.connect() of this context waits for:
# a one-element list holding its id, emptied once acquire_end went out.
_current_request = contextvars.ContextVar("poolscope_request", default=None)

# Default names handed out in this process, to keep them unique.
_names = set()


def _default_name(url):
    host = url.host or "localhost"
    base = "%s:%s" % (host, url.port) if url.port else host
    if url.database:
        base = "%s/%s" % (base, url.database)
    name, n = base, 1
    while name in _names:
        n += 1
        name = "%s#%d" % (base, n)
    return name


def _pool_settings(pool):
    """(max, idle_max) of a SQLAlchemy pool, None where unbounded/unknown."""
    size = None
    overflow = None
    with quietly():
        size = pool.size()
    with quietly():
        overflow = pool._max_overflow
    if not isinstance(size, int) or size <= 0:
        return None, None
    if isinstance(overflow, int) and overflow >= 0:
        return size + overflow, size
    if overflow is None and type(pool).__name__ in ("SingletonThreadPool", "StaticPool"):
        return size, size
    return None, size


class SQLAlchemyInstrumentation:
    """What :func:`instrument_sqlalchemy` installed on one engine."""

    def __init__(self, engine, reporter):
        self.engine = engine
        self.reporter = reporter
        self.name = reporter.name
        self._listeners = []
        self._wrapped = []

    # -- hooks ------------------------------------------------------------

    def _record_state(self, dbapi_connection, record):
        """The connection reference cached on the pool's record (its info
        dict lives as long as the DBAPI connection), refreshed when the
        record holds another DBAPI connection."""
        try:
            info = record.info
        except Exception:
            info = None
        state = info.get(_INFO_KEY) if info is not None else None
        if dbapi_connection is not None and (
            state is None or state.get("conn_id") != id(dbapi_connection)
        ):
            state = {
                "conn_id": id(dbapi_connection),
                "ref": connection_ref(dbapi_connection),
                "out": False,
                "closed": False,
            }
            if info is not None:
                info[_INFO_KEY] = state
        return state

    def on_connect(self, dbapi_connection, record):
        with quietly():
            state = self._record_state(dbapi_connection, record)
            if state is not None:
                self.reporter.connection_created(state["ref"])

    def on_checkout(self, dbapi_connection, record, proxy):
        with quietly():
            state = self._record_state(dbapi_connection, record)
            current = _current_request.get()
            if current:
                request = current.pop()
            else:
                # Checked out without Pool.connect() (another path into
                # the pool): report it as an acquire that did not wait.
                request = self.reporter.next_request()
            if state is None:
                return
            state["out"] = True
            self.reporter.acquire_end(request, "ok", state["ref"])

    def on_checkin(self, dbapi_connection, record):
        with quietly():
            state = self._record_state(dbapi_connection, record)
            if state is not None and state["out"]:
                state["out"] = False
                self.reporter.release(state["ref"])

    def _closing(self, dbapi_connection, record):
        with quietly():
            state = self._record_state(dbapi_connection, record)
            if state is None or state["closed"]:
                return
            if state["out"]:
                # Closed while checked out (invalidated): returned and closed,
                # so that acquires and releases still pair up.
                state["out"] = False
                self.reporter.release(state["ref"])
            state["closed"] = True
            self.reporter.connection_closed(state["ref"])

    def on_close(self, dbapi_connection, record):
        self._closing(dbapi_connection, record)

    def on_invalidate(self, dbapi_connection, record, exception):
        self._closing(dbapi_connection, record)

    def on_detach(self, dbapi_connection, record):
        # The pool lets go of it: from now on it is the caller's own
        # connection, not a pooled one that could leak.
        self._closing(dbapi_connection, record)

    # soft_invalidate only marks the connection to be replaced at its next
    # checkout; it is still open (and may still be held). Its real close
    # fires `close`, which reports it then.

    # -- Pool.connect wrapper ----------------------------------------------

    def _wrap_connect(self, pool):
        if getattr(pool, "_poolscope_connect", None) is not None:
            return
        original = pool.connect
        reporter = self.reporter
        try:
            from sqlalchemy.exc import TimeoutError as PoolTimeout
        except Exception:  # pragma: no cover - SQLAlchemy is there if we are
            PoolTimeout = ()

        def connect():
            request = None
            token = None
            with quietly():
                request = reporter.next_request()
                token = _current_request.set([request])
                reporter.acquire_start(request)
            try:
                fairy = original()
            except BaseException as e:
                with quietly():
                    if request is not None:
                        result = "timeout" if PoolTimeout and isinstance(e, PoolTimeout) else "error"
                        reporter.acquire_end(request, result)
                raise
            finally:
                if token is not None:
                    try:
                        pending = _current_request.get()
                        _current_request.reset(token)
                    except Exception:
                        pending = None
            with quietly():
                if token is not None and pending:
                    # No checkout event for this one (a pool handing out a
                    # connection the caller already holds): end it here.
                    record = getattr(fairy, "_connection_record", None)
                    state = self._record_state(fairy.dbapi_connection, record)
                    if state is not None:
                        state["out"] = True
                        reporter.acquire_end(pending.pop(), "ok", state["ref"])
            return fairy

        connect._poolscope_original = original
        with quietly():
            pool.connect = connect
            pool._poolscope_connect = connect
            self._wrapped.append(pool)

    def _on_engine_disposed(self, engine):
        # dispose() recreates the pool: events carry over, the wrapper and
        # the registration are renewed.
        with quietly():
            self._wrap_connect(engine.pool)
            self.reporter.register()

    def install(self):
        from sqlalchemy import event

        pool = self.engine.pool
        for name, fn in (
            ("connect", self.on_connect),
            ("checkout", self.on_checkout),
            ("checkin", self.on_checkin),
            ("close", self.on_close),
            ("invalidate", self.on_invalidate),
            ("detach", self.on_detach),
        ):
            event.listen(pool, name, fn)
            self._listeners.append((pool, name, fn))
        event.listen(self.engine, "engine_disposed", self._on_engine_disposed)
        self._listeners.append((self.engine, "engine_disposed", self._on_engine_disposed))
        self._wrap_connect(pool)

    def uninstall(self):
        """Removes the listeners and the wrapper; nothing more is sent."""
        try:
            from sqlalchemy import event
        except Exception:
            return
        for target, name, fn in self._listeners:
            with quietly():
                # Pool listeners live on whichever pool the engine has now.
                if target is not self.engine:
                    target = self.engine.pool
                event.remove(target, name, fn)
        self._listeners = []
        for pool in self._wrapped + [self.engine.pool]:
            with quietly():
                wrapper = pool.__dict__.get("connect")
                if wrapper is not None and hasattr(wrapper, "_poolscope_original"):
                    del pool.connect
                pool.__dict__.pop("_poolscope_connect", None)
        self._wrapped = []
        with quietly():
            delattr(self.engine, _ATTR)
        _names.discard(self.name)


def instrument_sqlalchemy(engine, pool_name=None, sender=None, state_interval=None):
    """Reports ``engine``'s connection pool to the poolscope agent.

    ``engine`` is a SQLAlchemy ``Engine`` (or an ``AsyncEngine``, whose
    ``sync_engine`` is used). ``pool_name`` defaults to
    ``host:port/database``. Returns the instrumentation (its ``name`` is the
    pool name the agent shows), or None if the engine could not be
    instrumented; never raises. ``state_interval`` (seconds, default
    ``$POOLSCOPE_ADAPTER_STATE_INTERVAL`` or 30; 0 turns it off) is how
    often the connections checked out are re-sent while there are any.
    """
    try:
        engine = getattr(engine, "sync_engine", engine)
        existing = getattr(engine, _ATTR, None)
        if existing is not None:
            return existing
        url = engine.url
        if pool_name:
            name = str(pool_name)
        else:
            name = _default_name(url)
        _names.add(name)
        max_size, idle_max = _pool_settings(engine.pool)
        try:
            dialect = engine.dialect.name
        except Exception:
            dialect = url.get_backend_name()
        info = {
            "db_system": normalize_db_system(dialect),
            "server_address": url.host,
            "server_port": url.port or (_default_port(dialect) if url.host else None),
            "namespace": url.database,
            "max": max_size,
            "idle_max": idle_max,
            "library": "sqlalchemy",
        }
        reporter = PoolReporter(name, info, sender=sender, state_interval=state_interval)
        instrumentation = SQLAlchemyInstrumentation(engine, reporter)
        instrumentation.install()
        setattr(engine, _ATTR, instrumentation)
        reporter.register()
        return instrumentation
    except Exception as e:
        log.warning("poolscope: cannot instrument %r: %s", engine, e)
        return None


def _default_port(dialect):
    system = normalize_db_system(dialect)
    if system == "postgresql":
        return 5432
    if system == "mysql":
        return 3306
    return None
