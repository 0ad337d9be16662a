"""Naming a DBAPI connection the way the agent sees it: its socket's file
descriptor in this process and, for TCP, the local ``ip:port``."""

import fcntl
import socket

from ._failsoft import quietly


def _fd_of(obj):
    """The socket fd behind a driver connection, or None."""
    # SQLAlchemy's adapted (asyncio) connections wrap the driver's own.
    inner = getattr(obj, "driver_connection", None)
    if inner is not None and inner is not obj:
        fd = _fd_of(inner)
        if fd is not None:
            return fd
    # psycopg 3: the libpq connection's socket (raises once closed).
    pgconn = getattr(obj, "pgconn", None)
    if pgconn is not None:
        with quietly():
            fd = pgconn.socket
            if isinstance(fd, int) and fd >= 0:
                return fd
    # psycopg2 and psycopg 3 both have fileno().
    fileno = getattr(obj, "fileno", None)
    if callable(fileno):
        with quietly():
            fd = fileno()
            if isinstance(fd, int) and fd >= 0:
                return fd
    # PyMySQL: _sock; mysql-connector (pure Python): _socket.sock.
    for path in (("_sock",), ("_socket", "sock")):
        target = obj
        for attr in path:
            target = getattr(target, attr, None)
            if target is None:
                break
        if target is not None:
            with quietly():
                fd = target.fileno()
                if isinstance(fd, int) and fd >= 0:
                    return fd
    # asyncpg: the transport's socket.
    transport = getattr(obj, "_transport", None)
    if transport is not None:
        with quietly():
            sock = transport.get_extra_info("socket")
            if sock is not None:
                fd = sock.fileno()
                if isinstance(fd, int) and fd >= 0:
                    return fd
    return None


def local_address_of_fd(fd):
    """``"ip:port"`` of a TCP socket's local end, or None (Unix sockets,
    anything else). Reads the fd in place: no dup, nothing closed."""
    # With a process-wide default timeout, wrapping an fd in a socket
    # object makes it non-blocking, which would break a driver doing
    # blocking I/O on it: keep its flags and put them back.
    flags = None
    if socket.getdefaulttimeout() is not None:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except Exception:
            return None
    try:
        sock = socket.socket(fileno=fd)
    except Exception:
        _restore_flags(fd, flags)
        return None
    try:
        if sock.family == socket.AF_INET:
            host, port = sock.getsockname()[:2]
            return "%s:%d" % (host, port)
        if sock.family == socket.AF_INET6:
            host, port = sock.getsockname()[:2]
            return "[%s]:%d" % (host.split("%", 1)[0], port)
        return None
    except Exception:
        return None
    finally:
        # Hand the fd back untouched: detach() stops the socket object from
        # closing it, now or when it is garbage collected.
        with quietly():
            sock.detach()
        _restore_flags(fd, flags)


def _restore_flags(fd, flags):
    if flags is None:
        return
    with quietly():
        if fcntl.fcntl(fd, fcntl.F_GETFL) != flags:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def connection_ref(dbapi_connection):
    """``{"fd": N, "local_address": "ip:port"}`` (the address only for TCP)
    for a driver connection, or None when it has no socket we can name."""
    try:
        if dbapi_connection is None:
            return None
        fd = _fd_of(dbapi_connection)
        if fd is None:
            return None
        ref = {"fd": fd}
        local = local_address_of_fd(fd)
        if local is not None:
            ref["local_address"] = local
        return ref
    except Exception:
        return None
