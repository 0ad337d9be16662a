"""poolscope pool adapters for Python.

Tell a local poolscope agent what your connection pool does: which thread
checked out which connection and since when, how long callers wait, when
connections are created and closed. Messages go to a Unix datagram socket
(``$POOLSCOPE_ADAPTER_SOCKET``, else ``/run/poolscope/adapter.sock``)
without ever waiting; without an agent they are dropped and the
application runs on unchanged.

    from poolscope_adapter import instrument_sqlalchemy
    engine = create_engine("postgresql+psycopg://db/shop", pool_size=5)
    instrument_sqlalchemy(engine, pool_name="orders")

Only the standard library is imported here; SQLAlchemy and psycopg_pool
are used only if you instrument their pools.
"""

from ._conn import connection_ref
from ._generic import ReportedPool, Waiting, report_pool
from ._psycopg_pool import instrument_psycopg_pool
from ._sender import (
    DEFAULT_SOCKET,
    ENV_SOCKET,
    MAX_MESSAGE_BYTES,
    VERSION,
    PoolReporter,
    Sender,
    default_sender,
    socket_path,
)
from ._sqlalchemy import instrument_sqlalchemy

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "ENV_SOCKET",
    "MAX_MESSAGE_BYTES",
    "VERSION",
    "PoolReporter",
    "ReportedPool",
    "Sender",
    "connection_ref",
    "default_sender",
    "instrument_psycopg_pool",
    "instrument_sqlalchemy",
    "report_pool",
    "socket_path",
    "Waiting",
]
