#!/usr/bin/env python3
"""A connection client driven line by line over stdin/stdout (stdlib only).

The integration tests spawn it so that they know the pid that opens, holds
and closes sockets. One command per line, one answer line per command:

  open HOST PORT      -> "fd LOCALPORT"            (blocking TCP connect)
  open HOST PORT      -> "err ERRNAME FD"          (connect failed; fd left open)
  open_unix PATH      -> "fd"  or "err ERRNAME FD"
  close FD            -> "ok"
  shutdown FD         -> "ok"                      (shutdown(SHUT_WR); fd stays open)
  pid                 -> "PID"
  exit                -> leaves at once with os._exit(0), closing nothing
  quit                -> "bye", closes everything and exits
Errors in a command answer "error MESSAGE" and the client keeps going.
"""

import errno
import os
import socket
import sys

socks = {}


def reply(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def connect(family, address):
    s = socket.socket(family, socket.SOCK_STREAM)
    fd = s.fileno()
    try:
        s.connect(address)
    except OSError as e:
        socks[fd] = s
        return "err %s %d" % (errno.errorcode.get(e.errno, str(e.errno)), fd)
    socks[fd] = s
    if family == socket.AF_UNIX:
        return "%d" % fd
    return "%d %d" % (fd, s.getsockname()[1])


def handle(words):
    cmd = words[0]
    if cmd == "open" and len(words) == 3:
        return connect(socket.AF_INET, (words[1], int(words[2])))
    if cmd == "open_unix" and len(words) == 2:
        return connect(socket.AF_UNIX, words[1])
    if cmd == "close" and len(words) == 2:
        socks.pop(int(words[1])).close()
        return "ok"
    if cmd == "shutdown" and len(words) == 2:
        socks[int(words[1])].shutdown(socket.SHUT_WR)
        return "ok"
    if cmd == "pid":
        return "%d" % os.getpid()
    if cmd == "exit":
        os._exit(0)
    if cmd == "quit":
        for s in socks.values():
            s.close()
        reply("bye")
        sys.exit(0)
    return "error unknown command %r" % " ".join(words)


def main():
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            reply(handle(words))
        except SystemExit:
            raise
        except Exception as e:  # keep serving; the test reads the error
            reply("error %s" % e)


if __name__ == "__main__":
    main()
