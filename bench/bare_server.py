#!/usr/bin/env python3
"""The baseline of `make bench`: the least a single-threaded stdlib `selectors` finger
server can do per query.

    python3 bench/bare_server.py --users FILE --port PORT

Accept, read the query line, look the name up in a dict, send the status, close.  No
deadlines, no limits, no logging, no /W, no lists: finger.py's TCPService is measured
against this loop, so it must stay this small.  Stops on SIGTERM or SIGINT.
Standard library only; Python 3.9 or newer.
"""

import argparse
import selectors
import signal
import socket
import sys


def load_users(path):
    users = {}
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            name, colon, status = line.partition(":")
            if colon and not name.lstrip().startswith("#"):
                users[name.strip()] = (status.strip() + "\r\n").encode()
    return users


def serve(users, port):
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    select, register, unregister = sel.select, sel.register, sel.unregister
    EVENT_READ = selectors.EVENT_READ
    unknown = b"No such user\r\n"
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print("serving finger on 127.0.0.1:%d" % listener.getsockname()[1], file=sys.stderr,
          flush=True)
    while True:
        for key, _ in select():
            sock = key.fileobj
            if sock is listener:
                for _ in range(64):
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    register(conn, EVENT_READ, b"")
                continue
            data = key.data + sock.recv(4096)
            end = data.find(b"\n")
            if end < 0 and data:
                sel.modify(sock, EVENT_READ, data)
                continue
            name = data[:end].strip().decode("utf-8", "replace")
            try:
                sock.send(users.get(name, unknown))
            except OSError:
                pass
            unregister(sock)
            sock.close()


def command_line(serve, description, argv=None):
    """--users FILE --port PORT, then serve(users, port) until SIGTERM or SIGINT: the
    command line of both baselines."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--users", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        serve(load_users(args.users), args.port)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv=None):
    return command_line(serve, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
