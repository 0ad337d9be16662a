"""psycopg_pool: ``ConnectionPool`` and ``AsyncConnectionPool`` (and their
null-pool variants), by wrapping the pool's methods on the instance.

``getconn`` brackets the wait (``acquire_start`` / ``acquire_end``, with
``timeout`` on ``PoolTimeout``), ``putconn`` is the release, and the
``connection()`` context manager goes through both. New and closed
connections come from the pool's ``_connect`` and ``_close_connection``
when this psycopg_pool version has them (they are internal, so their
absence only loses those two messages).
"""

import functools
import inspect
import logging
import weakref

from ._conn import connection_ref
from ._sender import PoolReporter
from ._failsoft import quietly

log = logging.getLogger("poolscope_adapter")

_ATTR = "_poolscope_instrumentation"
_WRAPPED = ("getconn", "putconn", "_connect", "_close_connection", "resize")


def _server_info(pool):
    """(host, port, dbname) from the pool's conninfo and kwargs, best effort."""
    params = {}
    with quietly():
        conninfo = pool.conninfo
        if isinstance(conninfo, str):
            try:
                from psycopg.conninfo import conninfo_to_dict

                params.update(conninfo_to_dict(conninfo))
            except Exception:
                for part in conninfo.split():
                    if "=" in part:
                        key, value = part.split("=", 1)
                        params[key] = value.strip("'")
    with quietly():
        kwargs = pool.kwargs
        if isinstance(kwargs, dict):
            params.update({k: v for k, v in kwargs.items() if v is not None})
    host = params.get("host") or params.get("hostaddr")
    if isinstance(host, str) and "," in host:
        host = host.split(",", 1)[0]
    port = params.get("port")
    try:
        port = int(str(port).split(",", 1)[0]) if port is not None else None
    except ValueError:
        port = None
    if port is None and host:
        port = 5432
    dbname = params.get("dbname") or params.get("user")
    return host or None, port, dbname


class PsycopgPoolInstrumentation:
    """What :func:`instrument_psycopg_pool` installed on one pool."""

    def __init__(self, pool, reporter):
        self.pool = pool
        self.reporter = reporter
        self.name = reporter.name
        # Connection -> its reference, taken while its socket was open.
        self._refs = weakref.WeakKeyDictionary()

    def _ref(self, conn, refresh=False):
        try:
            if not refresh:
                ref = self._refs.get(conn)
                if ref is not None:
                    return ref
            ref = connection_ref(conn)
            if ref is not None:
                self._refs[conn] = ref
            return ref
        except Exception:
            return None

    def _start(self):
        try:
            request = self.reporter.next_request()
            self.reporter.acquire_start(request)
            return request
        except Exception:
            return None

    def _end(self, request, error=None, conn=None):
        with quietly():
            if request is None:
                return
            if error is None:
                self.reporter.acquire_end(request, "ok", self._ref(conn, refresh=True))
                return
            try:
                from psycopg_pool import PoolTimeout
            except Exception:
                PoolTimeout = ()
            result = "timeout" if PoolTimeout and isinstance(error, PoolTimeout) else "error"
            self.reporter.acquire_end(request, result)

    def _release(self, conn):
        with quietly():
            self.reporter.release(self._ref(conn))

    def _created(self, conn):
        with quietly():
            self.reporter.connection_created(self._ref(conn, refresh=True))

    def _closed(self, conn):
        with quietly():
            self.reporter.connection_closed(self._ref(conn))

    def _resized(self):
        with quietly():
            self.reporter.update(max=self.pool.max_size, min_idle=self.pool.min_size)

    # -- wrappers -----------------------------------------------------------

    def _wrap_sync(self, name, original):
        inst = self
        if name == "getconn":

            @functools.wraps(original)
            def getconn(*args, **kwargs):
                request = inst._start()
                try:
                    conn = original(*args, **kwargs)
                except BaseException as e:
                    inst._end(request, error=e)
                    raise
                inst._end(request, conn=conn)
                return conn

            return getconn
        if name == "putconn":

            @functools.wraps(original)
            def putconn(conn, *args, **kwargs):
                inst._release(conn)
                return original(conn, *args, **kwargs)

            return putconn
        if name == "_connect":

            @functools.wraps(original)
            def _connect(*args, **kwargs):
                conn = original(*args, **kwargs)
                inst._created(conn)
                return conn

            return _connect
        if name == "_close_connection":

            @functools.wraps(original)
            def _close_connection(conn, *args, **kwargs):
                inst._closed(conn)
                return original(conn, *args, **kwargs)

            return _close_connection
        if name == "resize":

            @functools.wraps(original)
            def resize(*args, **kwargs):
                result = original(*args, **kwargs)
                inst._resized()
                return result

            return resize
        return None

    def _wrap_async(self, name, original):
        inst = self
        if name == "getconn":

            @functools.wraps(original)
            async def getconn(*args, **kwargs):
                request = inst._start()
                try:
                    conn = await original(*args, **kwargs)
                except BaseException as e:
                    inst._end(request, error=e)
                    raise
                inst._end(request, conn=conn)
                return conn

            return getconn
        if name == "putconn":

            @functools.wraps(original)
            async def putconn(conn, *args, **kwargs):
                inst._release(conn)
                return await original(conn, *args, **kwargs)

            return putconn
        if name == "_connect":

            @functools.wraps(original)
            async def _connect(*args, **kwargs):
                conn = await original(*args, **kwargs)
                inst._created(conn)
                return conn

            return _connect
        if name == "_close_connection":

            @functools.wraps(original)
            async def _close_connection(conn, *args, **kwargs):
                inst._closed(conn)
                return await original(conn, *args, **kwargs)

            return _close_connection
        if name == "resize":

            @functools.wraps(original)
            async def resize(*args, **kwargs):
                result = await original(*args, **kwargs)
                inst._resized()
                return result

            return resize
        return None

    def install(self):
        for name in _WRAPPED:
            original = getattr(self.pool, name, None)
            if original is None or not callable(original):
                continue
            if inspect.iscoroutinefunction(original):
                wrapper = self._wrap_async(name, original)
            else:
                wrapper = self._wrap_sync(name, original)
            if wrapper is None:
                continue
            wrapper._poolscope_original = original
            setattr(self.pool, name, wrapper)

    def uninstall(self):
        """Restores the pool's own methods; nothing more is sent."""
        for name in _WRAPPED:
            with quietly():
                wrapper = self.pool.__dict__.get(name)
                if wrapper is not None and hasattr(wrapper, "_poolscope_original"):
                    delattr(self.pool, name)
        with quietly():
            delattr(self.pool, _ATTR)


def instrument_psycopg_pool(pool, pool_name=None, sender=None, state_interval=None):
    """Reports a psycopg_pool pool to the poolscope agent.

    ``pool_name`` defaults to the pool's own ``name``. Call it right after
    creating the pool (connections opened before are not announced as
    created, but are still joined to the kernel's view when handed out).
    Returns the instrumentation, or None if the pool could not be
    instrumented; never raises. ``state_interval`` (seconds, default
    ``$POOLSCOPE_ADAPTER_STATE_INTERVAL`` or 30; 0 turns it off) is how
    often the connections checked out are re-sent while there are any.
    """
    try:
        existing = getattr(pool, _ATTR, None)
        if existing is not None:
            return existing
        name = str(pool_name or getattr(pool, "name", None) or "psycopg_pool")
        host, port, dbname = _server_info(pool)
        max_size = getattr(pool, "max_size", None)
        min_size = getattr(pool, "min_size", None)
        info = {
            "db_system": "postgresql",
            "server_address": host,
            "server_port": port,
            "namespace": dbname,
            "max": max_size if isinstance(max_size, int) and max_size > 0 else None,
            "min_idle": min_size if isinstance(min_size, int) else None,
            "library": "psycopg_pool",
        }
        reporter = PoolReporter(name, info, sender=sender, state_interval=state_interval)
        instrumentation = PsycopgPoolInstrumentation(pool, reporter)
        instrumentation.install()
        setattr(pool, _ATTR, instrumentation)
        reporter.register()
        return instrumentation
    except Exception as e:
        log.warning("poolscope: cannot instrument %r: %s", pool, e)
        return None
