#!/usr/bin/env python3
"""`make soak`: a bounded soak run of one finger.py server with every service under load.

    python3 bench/soak.py                 # 120 s; prints one Markdown table and puts
                                          # it in bench/RESULTS.md
    python3 bench/soak.py --seconds 600   # longer (10 to 3600 s)
    make soak SOAK_ARGS="--seconds 60 --no-results"   # print it only

One `finger.py --serve` child serves finger, the setter (TCP and a unix socket), the web
site, HTTPS (a self-signed certificate made with the openssl CLI; skipped without it),
Perspective Broker and, when `ngircd` is on PATH, the IRC bot against a private ngircd.
Everything listens on 127.0.0.1, on port 0.  For the whole run, at bounded rates and all at
once: finger queries, setter writes over TCP and over the unix socket (a unique status per
write; every write answered OK is remembered), web pages and JSON, HTTPS, XML-RPC getUser,
PB getUser (a small stdlib PB client below), IRC private messages to the bot, a hand edit of
the users file every few seconds, and a SIGHUP every 10 s (the users file re-read at once
besides the --reload 1 polling).

Every answer is checked.  A user nobody writes has a fixed status.  A user the setter writes
must be answered with a status that was really written for it, and never one older than the
last write acknowledged before the request was sent (no stale or lost update is served).

At the end: requests, correct answers, errors, p50/p99 latency per service; the server's RSS,
open fds and threads after the warm-up and at the end; whether the users file on disk (read
with finger.parse_users) holds every acknowledged write's final value; the WARNING and ERROR
lines the server logged; a verdict.  It reports and never fails: the exit status is 0 once the
table is printed, whatever it shows (1 only if the harness itself breaks).

The hand edits, and why they append.  finger.py's setter writes through to the users file by
reading it, writing a temp file and renaming it over the old one, under its own lock, which
an editor outside the process cannot take.  A hand edit that rewrites the file
(read-modify-os.replace) races with that: if the setter renames its file between the edit's
read and the edit's rename, the edit's rename throws the acknowledged setter write away.  That
loss would be the harness's doing, not finger.py's, so the soak does not edit that way.  It
appends one line for a new user (`mark-NNNN`) with open(path, "a"): an append goes to the file
the path names at open() time and never replaces it, so a setter write can never be lost.
What can happen is the mirror image: when the append lands in the old file after the setter
read it and before its rename, the *marker* is lost (the rename discards the old file).  Each
marker is therefore checked (is it served within a few seconds? is it in the file at the
end?), and a lost marker is counted apart: it is the known limit of editing a file a server
rewrites, not an error of the server.  New names (rather than one marker user edited again
and again) keep the file free of duplicate users, which the server rightly warns about.
The clients start at random phases and the edits come at random times (--seed), so the
edits do not fall in step with the setter writes: in step, they hit those races on purpose
nearly every time (which is how to reproduce them, not what a soak should measure).

Bounded: every loop stops at the deadline and after a maximum count, every socket has a
timeout, every process started here is stopped by its PID at the end (Ctrl-C included).
Loopback only.  Linux only (/proc).  Standard library only; Python 3.9 or newer.
"""

import argparse
import http.client
import json
import math
import os
import pwd
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FINGER = os.path.join(ROOT, "finger.py")
PYTHON = sys.executable
HOST = "127.0.0.1"                 # loopback only, by design
OP_TIMEOUT = 10.0                  # seconds any one request may take
START_TIMEOUT = 30.0               # seconds for the server (and ngircd, the bot) to be ready
STOP_GRACE = 10.0                  # seconds after SIGTERM before SIGKILL
HUP_EVERY = 10.0                   # seconds between SIGHUPs
EDIT_EVERY = 5.0                   # seconds between hand edits of the users file
MARKER_WAIT = 2.0                  # seconds a hand-edited marker has to be served
                                   # (--reload 1; the edits fall between SIGHUPs)
SAMPLE_EVERY = 1.0                 # seconds between /proc samples of the server
MAX_LOG_LINES_KEPT = 200           # WARNING/ERROR lines kept for the report
STATIC_USERS = 20                  # users nobody writes: fixed statuses
SETTER_USERS = 25                  # users each setter writer cycles through
EXPECTED_WARNINGS = (re.compile(r"staying root \(--user root\)"),)
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) (.*)$")
WRITTEN = re.compile(r"\b((?:tcp\d+|unix)) write (\d{6}) café")

sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from load import proc_fd_count, proc_status_kb  # noqa: E402  (bench/load.py)
import results  # noqa: E402  (bench/results.py: the soak section of bench/RESULTS.md)
import finger  # noqa: E402  (parse_users, to read the users file as the server does)

now = time.monotonic


def log(message):
    print("soak: " + message, file=sys.stderr, flush=True)


def static_name(index):
    return "static%02d" % index


def static_status(index):
    return "static status %02d of the soak – café" % index


# == what was written, and what an answer may be =============================================

class Ledger:
    """Every setter write: attempted statuses by sequence number, and the last one answered
    OK, per user.  A user belongs to one writer thread, so its sequence numbers grow."""

    def __init__(self):
        self.lock = threading.Lock()
        self.attempted = {}          # user -> {seq: status}
        self.acked = {}              # user -> (seq, status) of the last write answered OK
        self.acked_count = {}        # writer kind -> writes answered OK

    def attempt(self, user, seq, status):
        with self.lock:
            self.attempted.setdefault(user, {})[seq] = status

    def ack(self, kind, user, seq, status):
        with self.lock:
            self.acked[user] = (seq, status)
            self.acked_count[kind] = self.acked_count.get(kind, 0) + 1

    def floor(self, user):
        """The sequence number an answer for `user` must reach (None: no write acked)."""
        with self.lock:
            got = self.acked.get(user)
            return None if got is None else got[0]

    def acked_users(self):
        with self.lock:
            return list(self.acked)

    def written(self, user, seq):
        with self.lock:
            return self.attempted.get(user, {}).get(seq)


STATIC = {static_name(i): static_status(i) for i in range(STATIC_USERS)}


def check_status(ledger, user, text, floor):
    """None when `text` is a right answer for `user`, else what is wrong with it."""
    if user in STATIC:
        return None if text == STATIC[user] else "wrong status %r" % text[:60]
    found = WRITTEN.search(text)
    if found is None:
        return "not a written status: %r" % text[:60]
    seq = int(found.group(2))
    status = ledger.written(user, seq)
    if status != text:
        return "status never written for %s: %r" % (user, text[:60])
    if floor is not None and seq < floor:
        return "stale: write %d served after write %d was acknowledged" % (seq, floor)
    return None


def pick_user(rng_state, ledger):
    """Mostly a static user, sometimes one the setters write: (user, floor)."""
    rng_state[0] = (rng_state[0] * 1103515245 + 12345) & 0x7FFFFFFF
    roll = rng_state[0]
    if roll % 10 < 3:
        users = ledger.acked_users()
        if users:
            user = users[(roll // 10) % len(users)]
            return user, ledger.floor(user)
    return static_name((roll // 10) % STATIC_USERS), None


# == statistics per service ===================================================================

class Stats:
    def __init__(self, name, load):
        self.name, self.load = name, load
        self.lock = threading.Lock()
        self.sent = self.ok = 0
        self.errors = {}             # kind -> count
        self.examples = []           # the first few error descriptions
        self.latencies = []          # seconds, correct answers only
        self.skipped = None          # why the service did not run

    def record(self, started, problem):
        """One request: `problem` None when the answer was right."""
        elapsed = now() - started
        with self.lock:
            self.sent += 1
            if problem is None:
                self.ok += 1
                self.latencies.append(elapsed)
                return
            kind = problem.split(":")[0][:60]
            self.errors[kind] = self.errors.get(kind, 0) + 1
            if len(self.examples) < 5:
                self.examples.append(problem[:200])

    def percentile(self, fraction):
        with self.lock:
            values = sorted(self.latencies)
        if not values:
            return None
        return values[min(len(values) - 1, max(0, math.ceil(fraction * len(values)) - 1))]


def describe(error):
    text = str(error).strip().splitlines()
    return "%s: %s" % (type(error).__name__, text[-1] if text else "")


class Worker(threading.Thread):
    """Calls `step()` at `rate` per second until the deadline, the stop event or `limit`
    calls.  `step` returns a problem (or None) and is timed here."""

    def __init__(self, stats, rate, limit, stop, deadline, step, close=None, phase=0.0):
        super().__init__(daemon=True, name="soak-" + stats.name)
        self.stats, self.interval, self.limit = stats, 1.0 / rate, limit
        self.stop, self.deadline, self.step, self.close = stop, deadline, step, close
        self.phase = phase * self.interval     # clients of one rate do not fire in step

    def run(self):
        if self.stop.wait(self.phase):
            return
        next_at = now()
        try:
            for _ in range(self.limit):
                if self.stop.is_set() or now() >= self.deadline:
                    break
                started = now()
                try:
                    problem = self.step()
                except Exception as error:            # a failed request, not the harness
                    problem = describe(error)
                self.stats.record(started, problem)
                next_at += self.interval
                wait = next_at - now()
                if wait < -1.0:
                    next_at = now()                   # fell behind: do not burst to catch up
                if wait > 0 and self.stop.wait(min(wait, max(0.0, self.deadline - now()))):
                    break
        finally:
            if self.close is not None:
                try:
                    self.close()
                except Exception:
                    pass


# == clients ==================================================================================

def finger_query(port, line):
    """One RFC 1288 exchange: the reply as text (read to EOF)."""
    with socket.create_connection((HOST, port), timeout=OP_TIMEOUT) as sock:
        sock.sendall(line.encode("utf-8") + b"\r\n")
        return read_to_eof(sock).decode("utf-8", "replace")


def read_to_eof(sock, limit=1 << 20):
    chunks, size = [], 0
    while size < limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def set_status(family, address, user, status):
    """The setter: two lines, half-close, one line back."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(OP_TIMEOUT)
        sock.connect(address)
        sock.sendall(("%s\n%s\n" % (user, status)).encode("utf-8"))
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock, 4096).decode("utf-8", "replace").strip()


class HTTPClient:
    """Keep-alive GETs of /, /NAME and /api/users/NAME over http.client; a new connection
    every `renew` requests, so connects (and TLS handshakes) are part of the soak."""

    def __init__(self, port, ledger, context=None, renew=25):
        self.port, self.ledger, self.context, self.renew = port, ledger, context, renew
        self.conn, self.used, self.turn = None, 0, 0
        self.rng = [hash((port, id(self))) & 0x7FFFFFFF]

    def step(self):
        if self.conn is None or self.used >= self.renew:
            self.close()
            if self.context is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=OP_TIMEOUT)
            else:
                self.conn = http.client.HTTPSConnection(HOST, self.port, timeout=OP_TIMEOUT,
                                                        context=self.context)
            self.used = 0
        self.used += 1
        self.turn += 1
        kind = self.turn % 3
        user, floor = pick_user(self.rng, self.ledger)
        path = "/" if kind == 0 else "/" + user if kind == 1 else "/api/users/" + user
        try:
            self.conn.request("GET", path)
            response = self.conn.getresponse()
            body = response.read().decode("utf-8", "replace")
        except Exception:
            self.close()
            raise
        if response.status != 200:
            return "HTTP %d for %s" % (response.status, path)
        if kind == 0:
            want = static_name(3)
            return None if want in body and STATIC[want] in body else "/ lacks %s" % want
        if kind == 1:
            if user in STATIC:
                return None if STATIC[user] in body else "/%s lacks its status" % user
            found = WRITTEN.search(body)
            return check_status(self.ledger, user, found.group(0) if found else body, floor)
        value = json.loads(body)
        if value.get("user") != user:
            return "JSON for %r names %r" % (user, value.get("user"))
        return check_status(self.ledger, user, value.get("status", ""), floor)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- Perspective Broker: a minimal client, copied in spirit from test_finger.py's
#    PBTestClient, with its own Banana codec (so a codec bug in finger.py is not mirrored) --

B_LIST, B_INT, B_STRING, B_NEG, B_FLOAT, B_LONGINT, B_LONGNEG, B_VOCAB = range(0x80, 0x88)
PB_VOCAB = (None, b"None", b"class", b"dereference", b"reference", b"dictionary", b"function",
            b"instance", b"list", b"module", b"persistent", b"tuple", b"unpersistable",
            b"copy", b"cache", b"cached", b"remote", b"local", b"lcache", b"version", b"login",
            b"password", b"challenge", b"logged_in", b"not_logged_in", b"cachemessage",
            b"message", b"answer", b"error", b"decref", b"decache", b"uncache")
VOCAB_INDEX = {word: index for index, word in enumerate(PB_VOCAB) if word}


class Incomplete(Exception):
    pass


def b_prefix(number):
    digits = bytearray()
    while True:
        digits.append(number & 0x7F)
        number >>= 7
        if not number:
            return bytes(digits)


def b_encode(value):
    """bytes, non-negative int and lists -> Banana, vocabulary words as VOCAB (dialect pb)."""
    if isinstance(value, bytes):
        if value in VOCAB_INDEX:
            return b_prefix(VOCAB_INDEX[value]) + bytes([B_VOCAB])
        return b_prefix(len(value)) + bytes([B_STRING]) + value
    if isinstance(value, int):
        return b_prefix(value) + bytes([B_INT])
    return b_prefix(len(value)) + bytes([B_LIST]) + b"".join(b_encode(v) for v in value)


def b_decode(data, position=0, depth=0):
    """One expression from `data` at `position` -> (value, next position); Incomplete when
    more bytes are needed."""
    if depth > 64:
        raise ValueError("Banana nested too deep")
    end = position
    while end < len(data) and data[end] < 0x80:
        end += 1
    if end >= len(data):
        raise Incomplete()
    number = 0
    for digit in reversed(data[position:end]):
        number = (number << 7) | digit
    kind, start = data[end], end + 1
    if kind == B_LIST:
        items = []
        for _ in range(number):
            item, start = b_decode(data, start, depth + 1)
            items.append(item)
        return items, start
    if kind == B_STRING:
        if len(data) < start + number:
            raise Incomplete()
        return bytes(data[start:start + number]), start + number
    if kind in (B_INT, B_LONGINT):
        return number, start
    if kind in (B_NEG, B_LONGNEG):
        return -number, start
    if kind == B_FLOAT:
        if len(data) < start + 8:
            raise Incomplete()
        return struct.unpack("!d", bytes(data[start:start + 8]))[0], start + 8
    if kind == B_VOCAB:
        return PB_VOCAB[number], start
    raise ValueError("unknown Banana type byte 0x%02x" % kind)


def unjelly_text(value):
    if isinstance(value, list) and len(value) == 2 and value[0] == b"unicode":
        return value[1].decode("utf-8")
    if isinstance(value, bytes):
        return value.decode("utf-8")
    raise ValueError("not text: %r" % (value,))


class PBClient:
    """Dialect pick and version like Twisted's PBClientFactory, then getUser calls on the
    root object; a new connection every `renew` calls."""

    def __init__(self, port, ledger, renew=50):
        self.port, self.ledger, self.renew = port, ledger, renew
        self.sock, self.buffer, self.used, self.next_id = None, bytearray(), 0, 0
        self.rng = [hash(("pb", id(self))) & 0x7FFFFFFF]

    def connect(self):
        self.close()
        self.sock = socket.create_connection((HOST, self.port), timeout=OP_TIMEOUT)
        self.buffer = bytearray()
        greeting = self.read()
        if not isinstance(greeting, list) or b"pb" not in greeting:
            raise ValueError("PB greeting %r" % (greeting,))
        self.sock.sendall(b_encode(b"pb") + b_encode([b"version", 6]))
        self.used = 0

    def read(self):
        for _ in range(10000):
            if self.buffer:
                try:
                    value, used = b_decode(self.buffer)
                except Incomplete:
                    pass
                else:
                    del self.buffer[:used]
                    return value
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the PB server closed the connection")
            self.buffer += data
        raise ValueError("no whole Banana expression in 10000 reads")

    def step(self):
        if self.sock is None or self.used >= self.renew:
            self.connect()
        self.used += 1
        user, floor = pick_user(self.rng, self.ledger)
        self.next_id += 1
        try:
            self.sock.sendall(b_encode([b"message", self.next_id, b"root", b"getUser", 1,
                                        [b"tuple", [b"unicode", user.encode("utf-8")]],
                                        [b"dictionary"]]))
            for _ in range(100):
                reply = self.read()
                if not isinstance(reply, list) or not reply or reply[0] == b"version":
                    continue
                if reply[0] == b"answer" and reply[1] == self.next_id:
                    return check_status(self.ledger, user, unjelly_text(reply[2]), floor)
                if reply[0] == b"error":
                    return "PB error: %r" % (reply[2:],)[:120]
            return "no PB answer"
        except Exception:
            self.close()
            raise

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class XMLRPCClient:
    def __init__(self, port, ledger):
        self.port, self.ledger = port, ledger
        self.proxy = None
        self.rng = [hash(("rpc", id(self))) & 0x7FFFFFFF]

    def step(self):
        if self.proxy is None:
            self.proxy = xmlrpc.client.ServerProxy("http://%s:%d/RPC2" % (HOST, self.port))
        user, floor = pick_user(self.rng, self.ledger)
        try:
            return check_status(self.ledger, user, self.proxy.getUser(user), floor)
        except Exception:
            self.close()
            raise

    def close(self):
        if self.proxy is not None:
            self.proxy("close")()
            self.proxy = None


class FingerClient:
    def __init__(self, port, ledger, seed):
        self.port, self.ledger, self.turn = port, ledger, 0
        self.rng = [seed]

    def step(self):
        self.turn += 1
        if self.turn % 20 == 0:                        # now and then the list of everybody
            reply = finger_query(self.port, "")
            want = "%s  %s\r\n" % (static_name(0), STATIC[static_name(0)])
            return None if want in reply else "list lacks %s" % static_name(0)
        user, floor = pick_user(self.rng, self.ledger)
        reply = finger_query(self.port, user)
        if not reply.endswith("\r\n"):
            return "reply without CRLF: %r" % reply[-40:]
        return check_status(self.ledger, user, reply[:-2], floor)


class SetterWriter:
    """Writes unique statuses to its own users, one at a time; remembers what was OK."""

    def __init__(self, kind, family, address, users, ledger):
        self.kind, self.family, self.address = kind, family, address
        self.users, self.ledger, self.seq = users, ledger, 0

    def step(self):
        self.seq += 1
        user = self.users[(self.seq * 7) % len(self.users)]
        status = "%s write %06d café" % (self.kind, self.seq)
        self.ledger.attempt(user, self.seq, status)
        answer = set_status(self.family, self.address, user, status)
        if answer != "OK":
            return "answer %r" % answer[:80]
        self.ledger.ack(self.kind, user, self.seq, status)
        return None


class IRCClient:
    """A raw IRC client that PRIVMSGs the bot a user name and waits for 'Status of ...'."""

    def __init__(self, port, bot, ledger):
        self.port, self.bot, self.ledger = port, bot, ledger
        self.sock, self.buffer = None, b""
        self.nick = "soakclient"
        self.rng = [4242]

    def lines(self, deadline):
        for _ in range(100000):
            if b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                text = line.rstrip(b"\r").decode("utf-8", "replace")
                if text.startswith("PING"):
                    self.sock.sendall(("PONG" + text[4:] + "\r\n").encode("utf-8"))
                    continue
                yield text
                continue
            left = deadline - now()
            if left <= 0:
                raise TimeoutError("no IRC answer in %.0f s" % OP_TIMEOUT)
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the IRC server closed the connection")
            self.buffer += data
        raise ValueError("too many IRC lines without an answer")

    def connect(self):
        self.close()
        self.sock = socket.create_connection((HOST, self.port), timeout=OP_TIMEOUT)
        self.buffer = b""
        self.sock.sendall(("NICK %s\r\nUSER soak 0 * :soak client\r\n" % self.nick).encode())
        for text in self.lines(now() + OP_TIMEOUT):
            parts = text.split()
            if len(parts) > 1 and parts[1] == "001":
                return
            if len(parts) > 1 and parts[1] == "433":
                self.nick += "_"
                self.sock.sendall(("NICK %s\r\n" % self.nick).encode())

    def step(self):
        if self.sock is None:
            self.connect()
        user, floor = pick_user(self.rng, self.ledger)
        try:
            self.sock.sendall(("PRIVMSG %s :%s\r\n" % (self.bot, user)).encode("utf-8"))
            want = "Status of %s: " % user
            for text in self.lines(now() + OP_TIMEOUT):
                if text.startswith(":"):
                    prefix, _, rest = text[1:].partition(" ")
                    parts = rest.split(" ", 2)
                    if parts[0] == "401":
                        return "the bot is not on the server (401)"
                    if (parts[0] == "PRIVMSG" and prefix.split("!")[0] == self.bot
                            and len(parts) == 3 and parts[2].startswith(":" + want)):
                        return check_status(self.ledger, user, parts[2][1 + len(want):], floor)
        except Exception:
            self.close()
            raise

    def close(self):
        if self.sock is not None:
            try:
                self.sock.sendall(b"QUIT :soak over\r\n")
            except OSError:
                pass
            self.sock.close()
            self.sock = None


# == processes ================================================================================

def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def stop_process(proc, grace=STOP_GRACE):
    """SIGTERM, then SIGKILL after `grace`, by PID through our own Popen object.
    Returns (exit status, seconds it took) or None if it had already exited."""
    if proc is None or proc.poll() is not None:
        return None
    started = now()
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
    return proc.returncode, now() - started


class ServerLog:
    """Reads the server's stderr in a thread: per-query lines are counted and dropped;
    WARNING/ERROR lines (and traceback lines after them) are kept; events are noted."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.levels = {}
        self.kept = []                  # WARNING/ERROR/CRITICAL, unexpected ones
        self.expected = []              # WARNING lines we expect (staying root)
        self.problem_count = 0
        self.serving = {}               # service name -> "HOST:PORT" or path
        self.events = {"loaded": 0, "cert": 0, "registered": 0}
        self.first_lines = []           # for a failed start
        self.thread = threading.Thread(target=self.run, daemon=True, name="soak-log")
        self.thread.start()

    def run(self):
        last_kept = False
        for raw in self.stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self.lock:
                if len(self.first_lines) < 40:
                    self.first_lines.append(line)
                match = LOG_LINE.match(line)
                if match is None:               # a traceback line: belongs to the last record
                    if last_kept and self.kept and len(self.kept[-1]) < 4000:
                        self.kept[-1] += "\n" + line
                    continue
                level, message = match.groups()
                self.levels[level] = self.levels.get(level, 0) + 1
                last_kept = False
                if level in ("WARNING", "ERROR", "CRITICAL"):
                    if any(p.search(message) for p in EXPECTED_WARNINGS):
                        self.expected.append(line)
                    else:
                        self.problem_count += 1
                        if len(self.kept) < MAX_LOG_LINES_KEPT:
                            self.kept.append(line)
                            last_kept = True
                elif message.startswith("serving "):
                    found = re.match(r"serving (\S+) on (\S+)$", message)
                    if found:
                        self.serving[found.group(1)] = found.group(2)
                elif message.startswith("loaded "):
                    self.events["loaded"] += 1
                elif "reloaded the certificate" in message:
                    self.events["cert"] += 1
                elif message.startswith("irc: registered"):
                    self.events["registered"] += 1
                self.changed.notify_all()

    def wait_for(self, predicate, timeout, proc=None):
        deadline = now() + timeout
        with self.lock:
            while not predicate():
                left = deadline - now()
                if left <= 0 or (proc is not None and proc.poll() is not None):
                    return predicate()
                self.changed.wait(min(left, 0.2))
            return True


def port_of(address):
    return int(address.rpartition(":")[2])


def make_cert(tmp):
    """A self-signed certificate for 127.0.0.1 with the openssl CLI: (pem with key and
    certificate, certificate alone) or None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    key, crt, pem = (os.path.join(tmp, name) for name in ("key.pem", "cert.pem", "server.pem"))
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", crt], check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(pem, "wb") as out:
        for part in (key, crt):
            with open(part, "rb") as f:
                out.write(f.read())
    return pem, crt


def start_ngircd(tmp):
    """A private ngircd on a free loopback port (recipe: shared/specs/irc.md):
    (Popen, port) or None when ngircd is not on PATH."""
    ngircd = shutil.which("ngircd")
    if ngircd is None:
        return None
    directory = os.path.join(tmp, "ngircd")
    os.makedirs(os.path.join(directory, "conf.d"))
    os.chmod(directory, 0o755)
    port = free_port()
    conf = os.path.join(directory, "ngircd.conf")
    with open(conf, "w") as out:
        out.write("\n".join([
            "[Global]", "\tName = irc.soak", "\tInfo = finger soak server",
            "\tAdminInfo1 = soak", "\tAdminInfo2 = soak", "\tAdminEMail = soak@invalid",
            "\tListen = %s" % HOST, "\tPorts = %d" % port, '\tMotdPhrase = "soak"',
            "[Limits]", "\tMaxConnectionsIP = 0", "\tMaxNickLength = 30",
            "\tMaxPenaltyTime = 0", "\tPingTimeout = 120", "\tPongTimeout = 20",
            "[Options]", "\tDNS = no", "\tIdent = no", "\tPAM = no",
            "\tIncludeDir = %s" % os.path.join(directory, "conf.d"), ""]))
    with open(os.path.join(directory, "ngircd.log"), "wb") as out:
        proc = subprocess.Popen([ngircd, "--nodaemon", "--config", conf],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    deadline = now() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError("ngircd exited with status %d" % proc.returncode)
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return proc, port
        except OSError:
            if now() > deadline:
                stop_process(proc)
                raise RuntimeError("ngircd not listening after %.0f s" % START_TIMEOUT)
            time.sleep(0.05)


def sample(pid):
    """(VmRSS kB, open fds, threads) of process `pid`, or None once it is gone."""
    try:
        return (proc_status_kb(pid, "VmRSS"), proc_fd_count(pid),
                proc_status_kb(pid, "Threads"))
    except (OSError, TypeError, ValueError):
        return None


class Sampler(threading.Thread):
    def __init__(self, pid, stop):
        super().__init__(daemon=True, name="soak-sampler")
        self.pid, self.stop = pid, stop
        self.samples = []                # (t, rss kB, fds, threads)
        self.died_at = None

    def run(self):
        started = now()
        for _ in range(100000):
            got = sample(self.pid)
            if got is None:
                self.died_at = now() - started
                return
            self.samples.append((now() - started,) + got)
            if self.stop.wait(SAMPLE_EVERY):
                return


# == the hand edits and SIGHUP =================================================================

class Chaos(threading.Thread):
    """Every EDIT_EVERY s appends a new marker user to the users file and waits (at most
    MARKER_WAIT s) until finger serves it; every HUP_EVERY s a SIGHUP.  The edits fall
    between the SIGHUPs, so a marker served in time was found by the --reload polling."""

    def __init__(self, proc, users_path, finger_port, stop, deadline, rng):
        super().__init__(daemon=True, name="soak-chaos")
        self.rng = rng                   # edits at random phases: not in step with writes
        self.proc, self.path, self.port = proc, users_path, finger_port
        self.stop, self.deadline = stop, deadline
        self.markers = {}                # name -> status, in the order appended
        self.served = {}                 # name -> seconds from the append to being served
        self.late = {}                   # name -> the last answer within MARKER_WAIT
        self.failed = {}                 # name -> why the append failed
        self.hups = 0
        self.next_hup = None

    def hup_if_due(self):
        if now() >= self.next_hup:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGHUP)
                self.hups += 1
            self.next_hup += HUP_EVERY

    def run(self):
        started = now()
        self.next_hup = started + HUP_EVERY
        edits = 0

        def edit_time(number):
            """Half-way between SIGHUPs, give or take: a marker's wait ends before the
            next SIGHUP (HUP_EVERY is twice EDIT_EVERY)."""
            return started + EDIT_EVERY * (number + 0.5) + self.rng.uniform(-0.9, 0.4)

        next_edit = edit_time(0)
        for _ in range(100000):
            if self.stop.is_set() or now() >= self.deadline:
                return
            self.hup_if_due()
            if now() >= next_edit:
                if self.deadline - now() > MARKER_WAIT + 0.5:   # time to see it served
                    self.edit()
                edits += 1
                next_edit = max(edit_time(edits), now())
            wait = min(self.next_hup, next_edit, self.deadline) - now()
            if wait > 0 and self.stop.wait(wait):
                return

    def edit(self):
        number = len(self.markers) + 1
        name, status = "mark-%04d" % number, "hand edit %04d café" % number
        self.markers[name] = status
        started = now()
        try:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write("%s: %s\n" % (name, status))
        except OSError as error:
            self.failed[name] = describe(error)
            return
        last = None
        for _ in range(10000):
            if now() >= started + MARKER_WAIT:
                break
            if self.stop.is_set():
                return                          # interrupted: neither served nor late
            try:
                last = finger_query(self.port, name)
            except OSError as error:
                last = describe(error)
            if last == status + "\r\n":
                self.served[name] = now() - started
                return
            self.hup_if_due()
            time.sleep(0.05)
        self.late[name] = last

    def served_now(self):
        """The markers finger serves now (asked once the load is over)."""
        got = set()
        for name, status in self.markers.items():
            try:
                if finger_query(self.port, name) == status + "\r\n":
                    got.add(name)
            except OSError:
                pass
        return got


# == the run ===================================================================================

def write_users(path):
    with open(path, "w", encoding="utf-8") as out:
        out.write("# finger.py soak: %d users nobody writes; the setters add theirs\n"
                  % STATIC_USERS)
        for index in range(STATIC_USERS):
            out.write("%s: %s\n" % (static_name(index), static_status(index)))


def final_check(ledger, users_path, markers):
    """Read the users file as the server does: every acknowledged write's final value?"""
    with open(users_path, encoding="utf-8", errors="replace") as lines:
        table, problems = finger.parse_users(lines, users_path)
    with ledger.lock:
        acked = dict(ledger.acked)
        attempted = {user: dict(seqs) for user, seqs in ledger.attempted.items()}
    missing, later = [], 0
    for user, (seq, status) in sorted(acked.items()):
        got = table.get(user)
        if got == status:
            continue
        # a write that got no answer (timeout) may have landed after the last OK one
        if got is not None and any(s > seq and text == got
                                   for s, text in attempted.get(user, {}).items()):
            later += 1
            continue
        missing.append("%s: want %r, file has %r" % (user, status, got))
    static_wrong = [name for name, status in STATIC.items() if table.get(name) != status]
    markers_in_file = {name for name, status in markers.items() if table.get(name) == status}
    return {"users": len(acked), "missing": missing, "later": later, "problems": problems,
            "static_wrong": static_wrong, "markers_in_file": markers_in_file,
            "lines": len(table)}


def served_check(ledger, web_port):
    """With the load stopped: the web API serves every user's last acknowledged status."""
    wrong = []
    conn = http.client.HTTPConnection(HOST, web_port, timeout=OP_TIMEOUT)
    try:
        with ledger.lock:
            acked = dict(ledger.acked)
        for user, (_, status) in sorted(acked.items()):
            conn.request("GET", "/api/users/" + user)
            response = conn.getresponse()
            body = response.read()
            got = json.loads(body).get("status") if response.status == 200 else None
            if got != status:
                wrong.append("%s: want %r, served %r" % (user, status, got))
    except Exception as error:
        wrong.append("could not ask: %s" % describe(error))
    finally:
        conn.close()
    return wrong


def run(args):
    seconds = args.seconds
    warmup = args.warmup if args.warmup is not None else min(10.0, seconds / 6)
    report = {"seconds": seconds, "warmup": warmup, "notes": [], "interrupted": False}
    ledger = Ledger()
    procs = {}
    stop = threading.Event()
    tmp = tempfile.mkdtemp(prefix="finger-soak-")
    try:
        os.chmod(tmp, 0o755)
        users_path = os.path.join(tmp, "users")
        socket_path = os.path.join(tmp, "setter.sock")
        write_users(users_path)
        cert = None
        try:
            cert = make_cert(tmp)
            if cert is None:
                report["https_skip"] = "skipped (no openssl on PATH)"
        except (OSError, subprocess.SubprocessError) as error:
            report["https_skip"] = "skipped (openssl failed: %s)" % describe(error)
        irc = None
        if args.no_irc:
            report["irc_skip"] = "skipped (--no-irc)"
        else:
            try:
                irc = start_ngircd(tmp)
                if irc is None:
                    report["irc_skip"] = "skipped (no ngircd)"
                else:
                    procs["ngircd"] = irc[0]
            except (OSError, RuntimeError) as error:
                report["irc_skip"] = "skipped (ngircd failed: %s)" % describe(error)

        argv = [PYTHON, FINGER, "--serve", "--users", users_path,
                "--finger", HOST + ":0", "--setter", HOST + ":0",
                "--setter-socket", socket_path, "--web", HOST + ":0", "--pb", HOST + ":0",
                "--reload", "1", "--log-level", "info"]
        if os.geteuid() == 0:
            argv += ["--user", "root"]
        if cert is not None:
            argv += ["--https", HOST + ":0", "--cert", cert[0]]
        bot = "soakbot"
        if irc is not None:
            argv += ["--irc", "%s:%d" % (HOST, irc[1]), "--irc-nick", bot]
        report["server_argv"] = " ".join(argv[2:]).replace(tmp, "$TMP")
        server = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  start_new_session=True)
        procs["finger.py"] = server
        slog = ServerLog(server.stderr)
        wanted = {"finger", "setter", "setter-socket", "web", "pb"} | (
            {"https"} if cert is not None else set())
        if not slog.wait_for(lambda: wanted <= set(slog.serving), START_TIMEOUT, server):
            raise RuntimeError("the server did not serve %s within %.0f s: %s" % (
                ", ".join(sorted(wanted - set(slog.serving))), START_TIMEOUT,
                " | ".join(slog.first_lines[-5:]) or "(no output)"))
        ports = {name: port_of(address) for name, address in slog.serving.items()
                 if name != "setter-socket"}
        if irc is not None and not slog.wait_for(lambda: slog.events["registered"] > 0,
                                                 START_TIMEOUT, server):
            report["irc_skip"] = "failed: the bot did not register within %.0f s" % \
                START_TIMEOUT
            irc = None
        report["idle_before"] = sample(server.pid)

        # -- the load ---------------------------------------------------------------------
        scale = args.scale
        rng = random.Random(args.seed)
        started = now()
        deadline = started + seconds
        stats, workers = [], []

        def add(name, load, threads, rate, make):
            s = Stats(name, "%d × %g/s: %s" % (threads, rate * scale, load))
            stats.append(s)
            for index in range(threads):
                client = make(index)
                workers.append(Worker(s, rate * scale, int(seconds * rate * scale * 1.5) + 50,
                                      stop, deadline, client.step,
                                      getattr(client, "close", None), rng.random()))
            return s

        add("finger", "a user; 1 in 20 the list", 4, 20,
            lambda i: FingerClient(ports["finger"], ledger, 1000 + i))
        tcp_users = [["tcp%d-%02d" % (i, k) for k in range(SETTER_USERS)] for i in range(2)]
        add("setter (TCP)", "unique statuses", 2, 4,
            lambda i: SetterWriter("tcp%d" % i, socket.AF_INET, (HOST, ports["setter"]),
                                   tcp_users[i], ledger))
        if os.geteuid() == 0:
            unix_users = ["unix-%02d" % k for k in range(SETTER_USERS)]
        else:
            unix_users = [pwd.getpwuid(os.geteuid()).pw_name]
        add("setter (unix socket)", "unique statuses", 1, 4,
            lambda i: SetterWriter("unix", socket.AF_UNIX, socket_path, unix_users, ledger))
        add("web", "/, /NAME, /api/users/NAME", 2, 10,
            lambda i: HTTPClient(ports["web"], ledger))
        if cert is not None:
            context = ssl.create_default_context(cafile=cert[1])
            add("https", "the same, TLS", 2, 5,
                lambda i: HTTPClient(ports["https"], ledger, context, renew=10))
        else:
            skipped = Stats("https", "")
            skipped.skipped = report["https_skip"]
            stats.append(skipped)
        add("XML-RPC", "getUser", 1, 10,
            lambda i: XMLRPCClient(ports["web"], ledger))
        add("PB", "getUser", 2, 10,
            lambda i: PBClient(ports["pb"], ledger))
        if irc is not None:
            add("IRC bot", "a PRIVMSG", 1, 0.4 / scale,
                lambda i: IRCClient(irc[1], bot, ledger))
        else:
            skipped = Stats("IRC bot", "")
            skipped.skipped = report["irc_skip"]
            stats.append(skipped)
        chaos = Chaos(server, users_path, ports["finger"], stop, deadline, rng)
        sampler = Sampler(server.pid, stop)
        log("serving; %d client threads for %.0f s (warm-up %.0f s)%s%s" % (
            len(workers), seconds, warmup,
            "; https " + report["https_skip"] if "https_skip" in report else "",
            "; irc " + report["irc_skip"] if "irc_skip" in report else ""))
        for worker in workers:
            worker.start()
        chaos.start()
        sampler.start()
        try:
            next_progress = started + 30
            while now() < deadline:
                if server.poll() is not None:
                    report["notes"].append("**the server exited with status %d after %.0f s**"
                                           % (server.returncode, now() - started))
                    break
                left = deadline - now()
                time.sleep(min(1.0, max(0.0, left)))
                if now() >= next_progress and now() < deadline:
                    next_progress += 30
                    log("%.0f s of %.0f: %d requests so far" % (
                        now() - started, seconds, sum(s.sent for s in stats)))
        except KeyboardInterrupt:
            report["interrupted"] = True
            log("interrupted: stopping the load and reporting what ran")
        report["ran"] = now() - started
        stop.set()
        joined_by = now() + OP_TIMEOUT + MARKER_WAIT + 5     # one bound for all of them
        for thread in workers + [chaos, sampler]:
            thread.join(max(0.0, joined_by - now()))
        stuck = [t.name for t in workers + [chaos] if t.is_alive()]
        if stuck:
            report["notes"].append("client threads still running after the stop: %s"
                                   % ", ".join(stuck))
        time.sleep(2.0)                                      # let connections wind down
        report["idle_after"] = sample(server.pid)
        report["served_wrong"] = served_check(ledger, ports["web"]) \
            if server.poll() is None else ["the server is not running"]
        report["markers_served_end"] = chaos.served_now() if server.poll() is None else set()
        report["stop"] = stop_process(server)
        report["socket_left"] = os.path.exists(socket_path)
        slog.thread.join(5)
        stop_process(procs.get("ngircd"))
        report["file"] = final_check(ledger, users_path, chaos.markers)
        report.update(stats=stats, chaos=chaos, ledger=ledger, slog=slog,
                      samples=sampler.samples, died_at=sampler.died_at)
        return report
    finally:
        stop.set()
        for proc in procs.values():
            stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# == the report ================================================================================

def ms(value):
    return "–" if value is None else "%.1f ms" % (value * 1e3) if value >= 0.1 else \
        "%.2f ms" % (value * 1e3)


def window_median(samples, index, first, last):
    """Median of column `index` of the samples taken from `first` to `last` s."""
    got = [sample_[index] for sample_ in samples if first <= sample_[0] <= last]
    return statistics.median(got) if got else None


def render(report, command):
    slog, chaos, ledger, f = report["slog"], report["chaos"], report["ledger"], report["file"]
    attention = []
    rows = []

    def row(part, load, result, expected=""):
        rows.append("| %s | %s | %s | %s |" % tuple(
            str(cell).replace("|", "/").replace("\n", " ") for cell in
            (part, load, result, expected)))

    for s in report["stats"]:
        if s.skipped:
            row(s.name, "–", s.skipped, "")
            continue
        errors = s.sent - s.ok
        if errors:
            attention.append("%s: %d errors" % (s.name, errors))
        row(s.name, s.load, "%s sent, %s correct, %s; p50 %s, p99 %s" % (
            format(s.sent, ","), format(s.ok, ","),
            "**%d errors**" % errors if errors else "0 errors",
            ms(s.percentile(0.5)), ms(s.percentile(0.99))), "0 errors")

    # hand edits: markers served in time by --reload, or not; lost ones lost the race
    appended = len(chaos.markers) - len(chaos.failed)
    in_file = f["markers_in_file"]
    lost = [name for name in chaos.markers if name not in in_file and name not in chaos.failed]
    late_in_file = [name for name in chaos.late if name in in_file]
    later = [name for name in late_in_file if name in report["markers_served_end"]]
    pending = appended - len(chaos.served) - len(chaos.late)    # their wait was interrupted
    latencies = sorted(chaos.served.values())
    if late_in_file or chaos.failed:
        attention.append("hand edits: %d in the file but not served within %.0f s" % (
            len(late_in_file), MARKER_WAIT) + ("; %d appends failed" % len(chaos.failed)
                                               if chaos.failed else ""))
    row("hand edits", "a user appended every %.0f s" % EDIT_EVERY,
        "%d appended: %d served within %.0f s (p50 %s); %s in the file, not served within "
        "%.0f s (%d served by the end); %d lost to a setter's rename%s" % (
            appended, len(latencies), MARKER_WAIT,
            ms(latencies[len(latencies) // 2]) if latencies else "–",
            "**%d**" % len(late_in_file) if late_in_file else "0", MARKER_WAIT,
            len(later), len(lost), "; %d interrupted" % pending if pending else ""),
        "served within %.0f s" % MARKER_WAIT)
    row("SIGHUP", "every %.0f s" % HUP_EVERY,
        "%d sent; %d users file loads, %d certificate reloads logged" % (
            chaos.hups, slog.events["loaded"], slog.events["cert"]), "")

    # the server process
    samples, warmup = report["samples"], report["warmup"]
    ran = samples[-1][0] if samples else 0
    before, after = report.get("idle_before"), report.get("idle_after")
    for index, (name, unit, scale, fmt, slack) in enumerate((
            ("server RSS (VmRSS)", " MB", 1 / 1024, "%.1f", None),
            ("server open fds", "", 1, "%d", 5),
            ("server threads", "", 1, "%d", 3))):
        def show(value):
            return "–" if value is None else (fmt % (value * scale)) + unit
        first = window_median(samples, index + 1, warmup, warmup + 5)
        last = window_median(samples, index + 1, ran - 5, ran)
        peak = max((sample_[index + 1] for sample_ in samples), default=None)
        row(name, "after warm-up → end",
            "%s → %s (peak %s; idle %s before, %s after)" % (
                show(first), show(last), show(peak), show(before[index] if before else None),
                show(after[index] if after else None)),
            "no growth")
        if first is not None and last is not None:
            grown = last - first
            if (slack is None and grown > max(4096, 0.1 * first)) or \
                    (slack is not None and grown > slack):
                attention.append("%s grew from %s to %s" % (name, show(first), show(last)))

    # what the setters wrote, on disk and served
    acked = sum(ledger.acked_count.values())
    tcp = sum(v for k, v in ledger.acked_count.items() if k != "unix")
    row("setter writes answered `OK`", "",
        "%s (TCP %s, unix %s) to %d users" % (
            format(acked, ","), format(tcp, ","), format(ledger.acked_count.get("unix", 0), ","),
            f["users"]), "")
    row("users file on disk (finger.parse_users)", "each user's last `OK` write",
        "%d of %d users hold it; %s%s" % (
            f["users"] - len(f["missing"]), f["users"],
            "**%d missing**" % len(f["missing"]) if f["missing"] else "0 missing",
            "; %d hold a later write whose answer was lost" % f["later"] if f["later"] else ""),
        "0 missing")
    if f["missing"]:
        attention.append("%d acknowledged writes missing from the file" % len(f["missing"]))
    row("the same over /api/users/NAME after the load", "",
        "all %d right" % f["users"] if not report["served_wrong"] else
        "**%d wrong**: %s" % (len(report["served_wrong"]),
                              "; ".join(report["served_wrong"][:3])), "all right")
    if report["served_wrong"]:
        attention.append("%d users served a wrong final status" % len(report["served_wrong"]))
    row("users nobody wrote; parse problems", "",
        "%d of %d intact; %d problems" % (STATIC_USERS - len(f["static_wrong"]), STATIC_USERS,
                                          len(f["problems"])), "all intact; 0")
    if f["static_wrong"] or f["problems"]:
        attention.append("users file: %d static users changed, %d parse problems" % (
            len(f["static_wrong"]), len(f["problems"])))

    # the log and the end
    shown = "; ".join("`%s`" % line.split("\n")[0][24:][:120] for line in slog.kept[:3])
    row("WARNING/ERROR log lines", "but `staying root`",
        "%d%s" % (slog.problem_count, ": " + shown if shown else ""), "0")
    if slog.problem_count:
        attention.append("%d WARNING/ERROR log lines" % slog.problem_count)
    stopped = report.get("stop")
    row("SIGTERM at the end", "",
        "%s; unix socket file %s" % (
            "exit status %d in %.2f s" % stopped if stopped else
            "**the server had already exited**",
            "**left behind**" if report["socket_left"] else "removed"),
        "exit status 0; removed")
    if not stopped or stopped[0] != 0:
        attention.append("server exit: %s" % (stopped,))
    if report["socket_left"]:
        attention.append("unix socket file left behind")
    if report.get("died_at") is not None and stopped is None:
        attention.append("server died after %.0f s" % report["died_at"])
    attention.extend(report["notes"])
    row("**verdict**", "", "no problem seen: every answer right, no `OK` write lost, "
        "no warning, no growth" if not attention else
        "**look at**: " + "; ".join(attention), "")

    head = ["```", "$ " + command] + results.run_facts() + [
            "ran %.0f s%s (warm-up %.0f s), %s" % (
                report["ran"], " (interrupted)" if report["interrupted"] else "",
                report["warmup"], "as root (--user root)" if os.geteuid() == 0 else "not root"),
            "server: finger.py " + report["server_argv"], "```", "",
            "| part | load | result | expected |", "|---|---|---|---|"]
    tail = ["", "- latency: to the checked answer, timed by the harness's threads on the same "
            "machine; server figures: medians of 5 s windows of samples taken every 1 s; idle: "
            "before the load and 2 s after it (the setters' worker threads stay)",
            "- a written user's answer must be a status written for it, no older than its last "
            "`OK` before the request",
            "- hand edits append a line, so no setter write can be lost by them; an append that "
            "lands between a setter's read and its rename is lost itself (not counted as an "
            "error); one in the file but not served means --reload missed a change"]
    for s in report["stats"]:
        if s.examples:
            tail.append("- %s errors: %s; first: %s" % (s.name, ", ".join(
                "%s × %d" % item for item in sorted(s.errors.items()))[:300], s.examples[0]))
    for name in list(chaos.late)[:3]:
        tail.append("- %s: not served within %.0f s, last answer %r%s" % (
            name, MARKER_WAIT, (chaos.late[name] or "")[:60],
            "" if name in in_file else " (lost from the file)"))
    for name, why in list(chaos.failed.items())[:3]:
        tail.append("- %s: append failed: %s" % (name, why))
    for problem in f["missing"][:5]:
        tail.append("- missing: %s" % problem)
    for problem in f["problems"][:5]:
        tail.append("- users file: %s" % problem)
    if slog.kept:
        tail.append("- first WARNING/ERROR lines:")
        tail.extend("      " + line.replace("\n", "\n      ")[:1500] for line in slog.kept[:5])
    return "\n".join(head + rows + tail)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0,
                        help="length of the load (10 to 3600; default 120)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the 'after warm-up' sample (default: "
                             "min(10, seconds / 6))")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every client's rate (0.1 to 10; default 1)")
    parser.add_argument("--no-irc", action="store_true", help="leave the IRC bot out")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the clients' phases and the edits' times (default 1)")
    parser.add_argument("--no-results", action="store_true",
                        help="print the table only; do not write it into bench/RESULTS.md")
    parser.add_argument("--results", metavar="FILE", default=results.RESULTS,
                        help="the file whose 'soak' section the table replaces (default: "
                             "bench/RESULTS.md); an interrupted run writes nothing")
    return parser


def interrupt(signum, frame):
    raise KeyboardInterrupt()


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not 10 <= args.seconds <= 3600:
        build_parser().error("--seconds must be between 10 and 3600")
    if not 0.1 <= args.scale <= 10:
        build_parser().error("--scale must be between 0.1 and 10")
    if args.warmup is not None and not 0 <= args.warmup < args.seconds:
        build_parser().error("--warmup must be between 0 and --seconds")
    if not sys.platform.startswith("linux"):
        log("needs Linux (/proc); nothing run")
        return 0
    # SIGTERM ends the run like Ctrl-C: the children are stopped by PID in run()'s finally.
    signal.signal(signal.SIGTERM, interrupt)
    command = results.command_line("soak.py", sys.argv[1:] if argv is None else argv)
    try:
        report = run(args)
    except KeyboardInterrupt:
        log("interrupted before the load ran; every process stopped")
        return 1
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        log("the harness failed: %s; every process stopped" % describe(error))
        return 1
    section = "## `make soak`\n\n" + render(report, command)
    print()
    print(section)
    sys.stdout.flush()
    if args.no_results or report["interrupted"]:
        log("%s: %s left as it is" % ("--no-results" if args.no_results else "interrupted",
                                      results.shown(args.results)))
    else:
        try:
            results.replace_section("soak", section, args.results)
            log("the table replaces the 'soak' section of %s" % results.shown(args.results))
        except OSError as error:
            log("could not write %s: %s" % (results.shown(args.results), error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
