#!/usr/bin/env python3
"""The web baseline of `make bench`: what a bare stdlib `http.server` does with the same
keep-alive load as finger.py's web site.

    python3 bench/bare_http.py --users FILE --port PORT

A `ThreadingHTTPServer` (one thread per connection), HTTP/1.1 keep-alive: GET /NAME
answers the status of NAME (404 for no such user), GET / a plain HTML list of every user
and status, built once at start; each answer with its Content-Length.  The users file is
read as bare_server.py reads it.  No templates, no limits, no timeouts, no logging:
finger.py's web rows are measured against this server, so it must stay this small.
Stops on SIGTERM or SIGINT.
Standard library only; Python 3.9 or newer.
"""

import html
import http.server
import signal
import sys
import urllib.parse

from bare_server import command_line


def make_handler(users):
    statuses = {name: status.strip() + b"\n" for name, status in users.items()}
    index = ("<!DOCTYPE html>\n<html><head><title>Users</title></head><body><ul>\n%s"
             "</ul></body></html>\n" % "".join(
                 '<li><a href="/%s">%s</a> %s</li>\n' % (
                     urllib.parse.quote(name), html.escape(name),
                     html.escape(statuses[name].decode("utf-8", "replace").strip()))
                 for name in sorted(users))).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Head and body in one send: unbuffered (the default), the body waits for the
        # delayed ACK of the head, 40 ms, and /NAME makes 1,100 req/s.  TCP_NODELAY for an
        # answer longer than the buffer.
        wbufsize = 64 * 1024
        disable_nagle_algorithm = True

        def do_GET(self):
            path = urllib.parse.unquote(self.path.split("?", 1)[0])
            if path == "/":
                self.answer(200, "text/html; charset=utf-8", index)
            elif path[1:] in statuses:
                self.answer(200, "text/plain; charset=utf-8", statuses[path[1:]])
            else:
                self.answer(404, "text/plain; charset=utf-8", b"No such user\n")

        def answer(self, code, content_type, body):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    return Handler


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024          # the listen backlog of bare_server.py (stdlib's: 5)


def serve(users, port):
    server = Server(("127.0.0.1", port), make_handler(users))
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print("serving web on 127.0.0.1:%d" % server.server_address[1], file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv=None):
    return command_line(serve, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
