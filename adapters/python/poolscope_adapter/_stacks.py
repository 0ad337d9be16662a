"""Holder stacks: which code checked a connection out
(docs/adapter-protocol.md, "Holder stacks").

Capturing is cheap: a walk over the caller's frames keeping each frame's
code object and line, no text. Formatting happens only for a checkout
still held ``stack_after`` later, on the adapter's background thread, so
the usual short checkout never formats anything.
"""

import os
import re
import sys

ENV_STACKS = "POOLSCOPE_ADAPTER_STACKS"
ENV_STACK_AFTER_MS = "POOLSCOPE_ADAPTER_STACK_AFTER_MS"
ENV_STACK_INTERVAL_US = "POOLSCOPE_ADAPTER_STACK_INTERVAL_US"
#: At most one capture per this long in a process (nanoseconds): the
#: capture's CPU stays bounded (2 us x 1,000 a second at most) whatever
#: the checkout rate; a service checking out fewer connections than that
#: gets a stack for every one.
DEFAULT_STACK_INTERVAL_NS = 1_000_000
#: A checkout held this long (seconds) sends its stack.
DEFAULT_STACK_AFTER = 1.0
#: The protocol's limits.
MAX_FRAMES = 32
MAX_FRAME_CHARS = 256
#: Frames captured per checkout: the application's innermost frames are
#: the ones that say which code took the connection.
CAPTURED_FRAMES = 16

#: Packages whose innermost frames are the pool's, not the application's.
_LIBRARIES = ("poolscope_adapter", "sqlalchemy", "psycopg_pool", "psycopg", "psycopg2")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def stacks_enabled(value=None):
    """Whether stacks are on: ``value`` if given, else the environment (on
    unless ``POOLSCOPE_ADAPTER_STACKS`` is off, 0, false or no)."""
    if value is not None:
        return bool(value)
    setting = os.environ.get(ENV_STACKS, "").strip().lower()
    return setting not in ("off", "0", "false", "no")


def stack_after(value=None):
    """Seconds a checkout is held before its stack is sent: ``value`` if
    given, else ``POOLSCOPE_ADAPTER_STACK_AFTER_MS``, else 1 s."""
    if value is None:
        raw = os.environ.get(ENV_STACK_AFTER_MS)
        if not raw:
            return DEFAULT_STACK_AFTER
        try:
            value = float(raw) / 1000.0
        except ValueError:
            return DEFAULT_STACK_AFTER
    try:
        value = float(value)
    except (TypeError, ValueError):
        return DEFAULT_STACK_AFTER
    # At least 50 ms: the stack must leave after its checkout's acquire_end.
    return max(value, 0.05) if value >= 0 else DEFAULT_STACK_AFTER


def stack_interval_ns(value=None):
    """Nanoseconds between two captures in this process: ``value`` (in
    microseconds) if given, else ``POOLSCOPE_ADAPTER_STACK_INTERVAL_US``,
    else 1 ms; 0 captures at every checkout."""
    if value is None:
        value = os.environ.get(ENV_STACK_INTERVAL_US)
        if not value:
            return DEFAULT_STACK_INTERVAL_NS
    try:
        us = int(value)
    except (TypeError, ValueError):
        return DEFAULT_STACK_INTERVAL_NS
    return us * 1000 if us >= 0 else DEFAULT_STACK_INTERVAL_NS


class _LastCapture:
    """When this process last captured a stack (mono ns); shared by every
    pool. A race between threads costs at most an extra capture."""

    at_ns = -(1 << 62)


last_capture = _LastCapture()


def library_prefixes():
    """The file prefixes of the pool libraries loaded now and of this
    adapter (and ``<...>`` files: code that libraries generate), whose
    frames are left out above the application's first."""
    prefixes = ["<"]
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            prefixes.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    # contextlib: `with pool.connect()` enters through it.
    import contextlib

    prefixes.append(os.path.abspath(contextlib.__file__))
    return tuple(prefixes)


def capture(skip, depth=2):
    """The caller's frames as (code, line) pairs, innermost first, from the
    first one whose file does not start with one of ``skip``; at most
    :data:`CAPTURED_FRAMES`. ``depth`` frames of the adapter's own are
    stepped over without looking."""
    try:
        f = sys._getframe(depth)
    except ValueError:
        return None
    while f is not None and f.f_code.co_filename.startswith(skip):
        f = f.f_back
    frames = []
    append = frames.append
    n = CAPTURED_FRAMES
    while f is not None and n:
        append((f.f_code, f.f_lineno))
        f = f.f_back
        n -= 1
    return frames or None


def _frame_text(code, line):
    name = getattr(code, "co_qualname", None) or code.co_name
    text = "%s (%s:%s)" % (name, code.co_filename, line)
    text = _CONTROL.sub("?", text)
    return text[:MAX_FRAME_CHARS]


def format_frames(frames):
    """The protocol's ``stack``: one text per frame, within its limits."""
    return [_frame_text(code, line) for code, line in frames[:MAX_FRAMES]]
