"""The adapter's one rule for its own failures: they never reach the
application. A pool event that cannot be reported (an odd pool object, a
closed socket, a bug of ours) is dropped, and the application's call goes
on as if no adapter were there.

Every such place runs its work under ``quietly()``: what it swallows is
counted (``suppressed_errors()``) and logged at debug level on the
``poolscope_adapter`` logger, so that a silent adapter can still be
diagnosed. Only ``Exception`` is swallowed: KeyboardInterrupt and
SystemExit pass through.
"""

import logging
import threading

_log = logging.getLogger("poolscope_adapter")
_lock = threading.Lock()
_suppressed = 0


def suppressed_errors():
    """How many errors of the adapter's own were swallowed so far."""
    return _suppressed


class _Quietly:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None or not issubclass(exc_type, Exception):
            return False
        global _suppressed
        with _lock:
            _suppressed += 1
        _log.debug("poolscope adapter: ignored %r", exc, exc_info=(exc_type, exc, tb))
        return True


_QUIETLY = _Quietly()


def quietly():
    """``with quietly(): ...`` runs the block and swallows (and counts) an
    Exception it raises."""
    return _QUIETLY
