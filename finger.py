#!/usr/bin/env python3
"""finger.py - the finger service of Twisted's "Evolution of Finger", in one stdlib-only file.

It is both an RFC 1288 finger server and a finger client:

    python3 finger.py --serve --users users.example --finger 127.0.0.1:7979
    python3 finger.py moshez@127.0.0.1:7979
    python3 -m unittest test_finger

The user databases (back-ends) know nothing about the network; one small front-end per
protocol adapts them, and `build_services` assembles the lot, like the tutorial's
`makeService`.  Table of contents: `grep -n '^# ==' finger.py`.

Runs on CPython 3.9 and newer, with the standard library only.
"""

import argparse
import bisect
import collections
import contextlib
import errno
import functools
import grp
import heapq
import io
import itertools
import logging
import os
import pwd
import re
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Mapping

__version__ = "0.1.0"
__all__ = [
    "FingerError", "UsageError", "RequestError", "defang", "parse_users", "parse_query",
    "Query", "format_reply", "UserDatabase", "MemoryDatabase", "FileDatabase",
    "FingerProtocol", "Service", "TCPService", "ServiceGroup", "finger", "parse_target",
    "build_database", "build_services", "build_parser", "default_options", "serve_inetd",
    "main",
    "PBError", "PBProtocol", "banana_encode", "BananaDecoder", "jelly", "unjelly", "IRCBot",
]

log = logging.getLogger("finger")


# == 1. Constants, errors and small helpers ===================================================

FINGER_PORT = 79
MAX_QUERY_BYTES = 1024            # longest finger query line accepted (bsd fingerd: 1024)
MAX_REPLY_BYTES = 1 << 20         # the client stops reading a reply after this many bytes
MAX_USERS_LINE_CHARS = 64 * 1024  # users-file lines longer than this are skipped
DEFAULT_TIMEOUT = 10.0            # seconds a peer has to send its query or take its answer
DEFAULT_MAX_CONNECTIONS = 4096    # open connections per listener; more get a busy answer
DEFAULT_RELOAD = 30.0             # seconds between checks of the users file
SETTER_WORKERS = 64               # setter writes waiting at once, written in one rewrite
DEFAULT_WORKERS = 8               # threads answering queries for back-ends that may block
DEFAULT_USERS_FILE = "/etc/users"
TABLE_SHARDS = 256                # dicts a users table is split over (see UserTable)
RETIRE_ONE_BY_ONE = 4             # last shards of an old table freed entry by entry
USERS_DECODE_CHUNK = 1 << 20      # bytes of the users file decoded in one step (text_lines)
USERS_SEARCH_CHUNK = 64 * 1024    # bytes searched in one step for the line to rewrite
REWRITE_MAX_MISSES = 1000         # places of a name checked one by one before that search
SWITCH_INTERVAL = 0.0005          # sys.setswitchinterval while a long job runs (background_job)
SERVER_SWITCH_INTERVAL = 0.001    # ... and of the server always (run_server)
MAX_REPLY_CACHE_BYTES = 4 << 20   # finger replies remembered per version of the users

MAX_CACHED_REPLY = 64 * 1024      # a longer reply is never remembered
MAX_QUERY_NAMES = 64              # names in one query; more are answered QUERY_TOO_MANY
REPLY_CHUNK_LINES = 1000          # lines of a list answer formatted in one step
LISTEN_BACKLOG = 4096             # connections queued before accept (the kernel caps it at

ACCEPT_BATCH = 64                 # connections accepted per wake-up of the loop
MAX_WARNINGS_PER_SECOND = 10      # warnings about peers one service logs a second, at most
MAX_ERROR_SHOWN = 200             # characters of an error about a peer that a log line shows
ACCEPT_PAUSE = 0.1                # seconds a listener waits when out of file descriptors
RECV_SIZE = 4096
TLS_SEND_SIZE = 16 * 1024         # bytes given to one TLS send: a record
SEND_CHUNKS = 64                  # queued chunks a session connection sends in one call
HTTP_JOIN_BYTES = 16 * 1024       # a web body this short leaves in one send with its head
MAX_SESSION_OUTPUT = 1 << 20      # bytes a session peer may leave unread before it is dropped
STOP_GRACE = 1.0                  # seconds in-flight answers get to finish when stopping
DEFAULT_PER_CLIENT_CONNECTIONS = 64  # connections one client address may have open at once
DEFAULT_PER_CLIENT_RATE = 100.0   # requests a second one client address may make (burst 2 x)
DEFAULT_PER_CLIENT_EXEMPT = ("127.0.0.0/8", "::1/128")   # not limited: this machine
MAX_CLIENT_TABLE = 65536          # client addresses a listener remembers for those limits
CLIENT_EPISODE = 60               # seconds an address over a limit is not logged again
TOO_MANY_CONNECTIONS = "Too many connections from your address, try again later"
TOO_MANY_REQUESTS = "Too many requests from your address, try again later"
BUSY_BACKLOG = 256                # connections over the cap whose query is read before the


DEFAULT_BACKEND_TIMEOUT = 5.0     # seconds for a command, web lookup or forwarded query
MAX_PLAN_BYTES = 64 * 1024        # of a ~/.plan or ~/.project
MAX_COMMAND_OUTPUT = 64 * 1024    # bytes of --backend command output
MAX_WEB_LOOKUP_BYTES = 256 * 1024  # bytes of a --backend web page
MAX_FORWARD_REPLY = 64 * 1024     # bytes of a forwarded answer
MAX_FORWARD_HOPS = 3              # hosts in one forwarding query, user@h1@h2@h3
MAX_SETTER_BYTES = 8192           # a setter request (user line + status line) at most
DEFAULT_MAX_STATUS = 1024         # characters in a status sent to the setter
DEFAULT_MAX_USERS = 100_000       # users the setter may create, at most (updates always work)
DEFAULT_MAX_USERS_BYTES = 32 << 20  # bytes the setter may grow the users file to, at most
MAX_USER_NAME = 32
DEFAULT_SETTER_SOCKET = "/run/finger/setter.sock"

NO_SUCH_USER = "No such user"
INTERNAL_ERROR = "Internal error in server"
FORWARDING_DENIED = "Finger forwarding service denied"      # RFC 1288 section 3.2.1
LIST_DENIED = "Finger online user list denied"              # RFC 1288 section 3.2.2
SERVER_BUSY = "Server busy, try again later"
COULD_NOT_CONNECT = "Could not connect to remote host"
QUERY_TOO_LONG = "Query too long"
QUERY_TOO_MANY = "Too many names: at most %d in one query" % MAX_QUERY_NAMES

class FingerError(Exception):
    """An error for a person to read: one line, no traceback.  `exit_code` is what main returns."""
    exit_code = 1


class UsageError(FingerError):
    """Bad options or configuration: exit 2, like argparse."""
    exit_code = 2


class FieldError(UsageError):
    """A bad argument given to a class or function: `field` is its keyword argument and
    `value` what was given; fields written {like_this} in `problem` are others it depends
    on.  They are shown as the command-line options that set them (OPTION_OF_FIELD, in the
    command-line section): classes never name a flag."""

    def __init__(self, field, problem, value=None):
        super().__init__(problem)
        self.field, self.problem, self.value = field, problem, value

    def __str__(self):
        problem = re.sub(r"\{(\w+)\}", lambda match: option_of_field(match.group(1)),
                         self.problem)
        given = "" if self.value is None else " %s" % self.value
        return "%s%s: %s" % (option_of_field(self.field), given, problem)


class ListRefused(FingerError):
    """The list of users is private here (--no-list): every front-end answers its own way."""


class RequestError(FingerError):
    """A request a protocol refuses; `reply` is sent to the peer before the server closes."""

    def __init__(self, reply, outcome):
        super().__init__(reply)
        self.reply = reply
        self.outcome = outcome


def _caret_table():
    """Map every control character but tab and newline to a visible form (as bsd finger does)."""
    table = {code: "^" + chr(code ^ 0x40) for code in range(0x20) if code not in (9, 10)}
    table[0x7F] = "^?"
    table.update({code: "M-^" + chr((code - 0x80) ^ 0x40) for code in range(0x80, 0xA0)})
    # Unicode line separators and bidirectional overrides can disguise text on a terminal;
    # U+FFFE and U+FFFF are not characters (and not allowed in XML).
    for code in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFFFE,
                 0xFFFF):
        table[code] = "<U+%04X>" % code
    return table


_CARET = _caret_table()


def defang(text):
    """Make control characters harmless (RFC 1288 section 3.3): CRLF becomes a newline, tab and
    newline stay, every other control character is shown as ^X (C1 as M-^X)."""
    return text.replace("\r\n", "\n").translate(_CARET)


class TokenBucket:
    """A rate limit: `burst` at once, then one every `interval` seconds (the IRC flood
    limiter, the per-client request rate).  `clock` is for tests."""

    __slots__ = ("burst", "interval", "clock", "tokens", "stamp")

    def __init__(self, burst=5, interval=2.0, clock=time.monotonic):
        self.burst, self.interval, self.clock = max(1, burst), max(0.0, interval), clock
        self.tokens = float(self.burst)
        self.stamp = clock()

    def _refill(self, now):
        if self.interval:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) / self.interval)
        else:
            self.tokens = float(self.burst)
        self.stamp = now

    def delay(self, now=None):
        """Seconds until the next one may go; 0 when it may go now."""
        self._refill(self.clock() if now is None else now)
        return 0.0 if self.tokens >= 1 - 1e-9 else (1 - self.tokens) * self.interval

    def take(self, now=None):
        """Use up one token: True, or False when it has to wait."""
        if self.delay(now):
            return False
        self.tokens -= 1
        return True


class VersionedCache:
    """Answers remembered for one version of the users (a database's `version`; None: the
    database has none, and nothing is remembered): a new version forgets them all.  At
    most `budget` bytes in all (None: no limit), each entry's size as put() is told."""

    __slots__ = ("budget", "version", "entries", "used")

    def __init__(self, budget=None):
        self.budget = budget
        self.version, self.entries, self.used = None, {}, 0

    def get(self, version, key):
        """The answer remembered for `key` in `version`, or None."""
        if version != self.version:
            if version is None:
                return None
            self.version, self.entries, self.used = version, {}, 0
        return self.entries.get(key)

    def put(self, version, key, value, size=0):
        """Remember `value` if `version` is still the one of get() and there is room."""
        if version is None or version != self.version or (
                self.budget is not None and self.used + size > self.budget):
            return
        self.entries[key] = value
        self.used += size


def split_host_port(text, default_port):
    """'host', 'host:port', '[v6]', '[v6]:port' or a bare v6 address -> (host, port).

    A missing port is `default_port`; raises ValueError for anything else."""
    host, port = text, None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("unbalanced [ ] in %r" % text)
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif _looks_like_port(text):
        address, _, port = text.rpartition(":")
        raise ValueError("IPv6 addresses take brackets: write [%s]:%s for port %s of %s%s" % (
            address, port, port, address,
            "" if default_port is None else ", or [%s] for that address" % text))
    if port is None or port == "":
        if port == "" or default_port is None:
            raise ValueError("no port in %r" % text)
        return host, default_port
    if not port.isdigit() or int(port) > 65535:
        raise ValueError("bad port %r" % port)
    return host, int(port)


def _looks_like_port(text):
    """Whether a bare IPv6 text may end in a port: '::1:7979' is [::1]:7979 or an address."""
    import ipaddress
    address, _, tail = text.rpartition(":")
    if not tail.isdigit() or not tail.isascii():
        return False
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return True


def parse_listen(text):
    """A listener value: '[HOST:]PORT', '[v6]:PORT', 'off' -> (host, port) or None (off).

    An empty host means every address; port 0 means any free port."""
    text = text.strip()
    if text.lower() == "off":
        return None
    if text.isdigit():
        text = ":" + text
    host, port = split_host_port(text, None)
    return host, port


def format_address(address):
    """(host, port) -> 'host:port', with [ ] around IPv6 hosts; ('', 79) -> ':79'."""
    host, port = address[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def _plain_address(text):
    """An ipaddress address, an IPv4-mapped IPv6 one as IPv4, without a %zone."""
    import ipaddress
    address = ipaddress.ip_address(text.partition("%")[0])
    return address.ipv4_mapped or address if address.version == 6 else address


def _is_local_address(address):
    """True when `address` (an ipaddress address) is one of this machine's: it can be
    bound."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


# == 2. Pure codecs: the users file, finger queries, replies ==================================

class UsersFileError(FingerError):
    """The users file cannot be used at all (missing, unreadable, not text)."""


_ANY_KEYS = object()     # the first key of every UserTable shard: see there


class UserTable(Mapping):
    """name -> status, split over TABLE_SHARDS dicts by hash.

    With a million users, growing or freeing one dict holds the GIL for tens of
    milliseconds, stalling every other thread; a shard is small, so each step is short, and
    `retire()` frees an old table shard by shard, so other threads get the GIL in between.

    Each shard's first key is `_ANY_KEYS`, which is not a str.  From CPython 3.11 a dict whose
    keys are all str keeps no hashes of its own, and reads each key's hash from the string
    whenever it grows or two keys collide: a cache miss per key, as the names of one shard
    are scattered over the memory of the whole file.  A dict with any other key stores the
    hashes beside the keys: 8 bytes more a user, for a markedly faster load."""
    __slots__ = ("shards",)

    def __init__(self, items=()):
        self.shards = tuple({_ANY_KEYS: None} for _ in range(TABLE_SHARDS))
        for name, status in dict(items).items():
            self.shards[hash(name) % TABLE_SHARDS][name] = status

    def __getitem__(self, name):
        return self.shards[hash(name) % TABLE_SHARDS][name]

    def get(self, name, default=None):
        return self.shards[hash(name) % TABLE_SHARDS].get(name, default)

    def set(self, name, status):
        self.shards[hash(name) % TABLE_SHARDS][name] = status

    def __contains__(self, name):
        return name in self.shards[hash(name) % TABLE_SHARDS]

    def __len__(self):
        return sum(map(len, self.shards)) - TABLE_SHARDS

    def __iter__(self):
        for shard in self.shards:
            yield from itertools.islice(shard, 1, None)      # after _ANY_KEYS

    def sorted_names(self):
        """The names in order: each shard sorted, then merged.  sorted() of a million names
        would be one step that holds the GIL for a second; these steps are short."""
        return list(heapq.merge(*(sorted(itertools.islice(shard, 1, None))
                                  for shard in self.shards)))

    def retire(self):
        """Empty the table shard by shard (call it inside `background_job()`).

        Most of the memory goes back to the system with the last shards: an allocator arena
        holds users of every shard, and is returned only once all of them are gone.  Those
        shards are emptied one entry at a time, so that no single step takes long."""
        for shard in self.shards[:-RETIRE_ONE_BY_ONE]:
            shard.clear()
            shard[_ANY_KEYS] = None
        for shard in self.shards[-RETIRE_ONE_BY_ONE:]:
            while len(shard) > 1:              # the newest first: _ANY_KEYS stays
                shard.popitem()


def text_lines(f):
    """The lines of a users file opened in binary mode, as reading it in text mode gives
    them (UTF-8, a byte order mark skipped, bad bytes replaced, universal newlines), without
    their ends.

    Read and decoded USERS_DECODE_CHUNK bytes at a time: little memory on top of the table
    being built, and no single step that holds the GIL for long (see background_job).  The
    chunks' lists of lines are joined in C, not by a generator resumed for every line."""
    return itertools.chain.from_iterable(_line_lists(f))


def _line_lists(f):
    """text_lines, a list of lines per chunk read."""
    rest = f.read(USERS_DECODE_CHUNK)
    if rest.startswith(UTF8_BOM):
        rest = rest[len(UTF8_BOM):]
    while rest:
        more = f.read(USERS_DECODE_CHUNK)
        cut = rest.rfind(b"\n") + 1 if more else len(rest)
        if cut == 0:                       # no line end yet: a line longer than a chunk
            rest += more
            continue
        text = rest[:cut].decode("utf-8", "replace")
        rest = rest[cut:] + more
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if lines[-1] == "":
            lines.pop()                    # the end of the chunk's last line
        yield lines


def parse_users(lines, source="<users>"):
    """Parse `user: status` lines -> (UserTable, problems).

    The line is split at the first colon and both sides stripped; blank lines and lines whose
    first visible character is '#' are comments.  A malformed line is skipped and described in
    `problems` as 'FILE:LINE: reason'; for a duplicate user the last line wins.  A NUL byte
    means the file is not text at all: UsersFileError."""
    users = UserTable()
    shards = users.shards
    problems = []
    for number, line in enumerate(lines, 1):
        name, colon, status = line.partition(":")
        name = name.strip()
        if (colon and name and name[0] != "#" and " " not in name and name.isprintable()
                and "\x00" not in line and len(line) <= MAX_USERS_LINE_CHARS):
            shard = shards[hash(name) % TABLE_SHARDS]
            if name in shard:
                problems.append("%s:%d: duplicate user %r, this line wins"
                                % (source, number, name))
            shard[name] = status.strip()
            continue
        reason = _skipped_line(line, name, colon)      # the common case is above: one test
        if reason:
            problems.append("%s:%d: %s" % (source, number, reason))
        elif reason is None:
            raise UsersFileError("%s:%d: NUL byte: not a text file" % (source, number))
    return users, problems


def _skipped_line(line, name, colon):
    """Why parse_users skips a line: a reason, "" for a comment or a blank line, None for a
    NUL byte (not a text file)."""
    if not colon:
        return "no ':' between user and status" if name and name[0] != "#" else ""
    if not name or name[0] == "#":
        return "" if name else "empty user name"
    if "\x00" in line:
        return None
    if len(line) > MAX_USERS_LINE_CHARS:
        return "line longer than %d characters" % MAX_USERS_LINE_CHARS
    return "user name %r contains white space or control characters" % name


class Query:
    """One parsed finger query line (RFC 1288 section 2.3).

    `verbose` is the /W token; `names` the user names asked for (empty: list everybody);
    `hosts` the @host parts of a forwarding query {Q2}, left to right."""
    __slots__ = ("verbose", "names", "hosts")

    def __init__(self, verbose=False, names=(), hosts=()):
        self.verbose, self.names, self.hosts = verbose, tuple(names), tuple(hosts)

    def __eq__(self, other):
        return isinstance(other, Query) and (self.verbose, self.names, self.hosts) == (
            other.verbose, other.names, other.hosts)

    def __repr__(self):
        return "Query(verbose=%r, names=%r, hosts=%r)" % (self.verbose, self.names, self.hosts)


def parse_query(line):
    """Parse one query line, liberally: '/W' in any case, with or without the space after it,
    any white space between tokens, several names, user@host@host."""
    rest = line.strip()
    verbose = rest[:2].upper() == "/W"
    if verbose:
        rest = rest[2:].strip()
    if "@" in rest:
        user, _, hosts = rest.partition("@")
        return Query(verbose, [user.strip()] if user.strip() else [],
                     [host.strip() for host in hosts.split("@")])
    return Query(verbose, rest.split())


def format_reply(text):
    """Reply text -> bytes on the wire: control characters defanged, UTF-8, CRLF line ends."""
    lines = defang(text).split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


_USER_NAME = re.compile(r"[A-Za-z0-9._-]{1,%d}\Z" % MAX_USER_NAME)
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def valid_user_name(name):
    """The names the setter accepts: letters, digits, '.', '_' and '-', at most 32."""
    return bool(_USER_NAME.match(name))


def clean_status(text):
    """A status as the setter stores it: one line, control characters removed, stripped."""
    return _CONTROL_CHARS.sub("", text.replace("\t", " ")).strip()


UTF8_BOM = b"\xef\xbb\xbf"


_LINE_BREAK = re.compile(rb"[\r\n]")


def rewrite_users(data, name, status):
    """The users file `data` (bytes) with `name`'s status set: its last line is replaced (or
    a line is appended); every other byte, comments and order included, stays as it was.

    Returns the new file as a list of pieces (views of `data` and the new line), for
    write_file_atomically: no copy of a large file is made."""
    found = _last_line_of(data, name.encode("utf-8"))
    new_line = ("%s: %s" % (name, status)).encode("utf-8")
    view = memoryview(data)
    if found is None:
        ending = b"\n" if data and not data.endswith(b"\n") else b""
        return [view, ending + new_line + b"\n"]
    line_end = _LINE_BREAK.search(data, found)
    return [view[:found], new_line, view[line_end.start():] if line_end else b""]


def _last_line_of(data, name):
    """Where the last line of `data` whose user is `name` (bytes) starts, or None.

    No list of a million lines: the name's bytes are looked for from the end (rfind) and
    each one found is checked as a line; after REWRITE_MAX_MISSES that are not (a name
    that is in many statuses), a regular expression goes on, USERS_SEARCH_CHUNK bytes at a
    time.  So a write into a large file never holds the other threads up for long."""
    blank = rb"[ \t\x0b\x0c]*"
    key = blank + re.escape(name) + blank + b":"
    first = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    line = re.compile(key)
    end, misses = len(data), 0
    window = max(USERS_SEARCH_CHUNK, 2 * len(name))   # > the name: each step moves back
    while misses < REWRITE_MAX_MISSES:
        low = max(end - window, first)
        at = data.rfind(name, low, end)
        if at < 0:
            if low == first:
                return None
            end = low + len(name) - 1                 # a name across the edge: next time
            continue
        end = max(data.rfind(b"\n", first, at), data.rfind(b"\r", first, at), first - 1) + 1
        if line.match(data, end):                     # `end`: the start of that line
            return end
        misses += 1
    after_break = re.compile(rb"[\r\n](?=" + key + b")")
    while end > first:
        start = max(data.rfind(b"\n", first, max(end - USERS_SEARCH_CHUNK, first)), first)
        found = None
        for match in after_break.finditer(data, start, end):
            found = match.end()                       # the last one wins
        if found is not None:
            return found
        end = start
    return first if line.match(data, first) else None


# == 3. User databases (back-ends) ============================================================

_background_jobs = 0
_background_lock = threading.Lock()
_switch_interval = None


@contextlib.contextmanager
def background_job():
    """Around a long CPU-bound job in a thread of its own (parsing a users file, rewriting it,
    freeing an old table): a thread waiting for the GIL gets it after SWITCH_INTERVAL instead
    of CPython's 5 ms (the server always runs with 1 ms, see run_server).  A loop thread
    gives the GIL up at each of the half-dozen system calls of a query and must wait for it
    after each, so with 5 ms a query would take 30 ms while such a job runs.  The job itself
    must do no I/O inside its long loop: every release of the GIL restarts the interval,
    and the waiting thread waits on."""
    global _background_jobs, _switch_interval
    with _background_lock:
        if _background_jobs == 0:
            _switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(SWITCH_INTERVAL, _switch_interval))
        _background_jobs += 1
    try:
        yield
    finally:
        with _background_lock:
            _background_jobs -= 1
            if _background_jobs == 0:
                sys.setswitchinterval(_switch_interval)


def open_regular(path):
    """`path` opened for reading (binary) if it is a regular file, else OSError: opening
    never blocks (a FIFO without a writer) and nothing endless is read (a device)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def write_file_atomically(path, data):
    """Replace `path` by `data` (bytes, or a list of bytes-like pieces written one after
    another) so that a reader sees the old file or the new one, never a
    mix, and the new one survives a crash: temp file in the same directory, fsync, rename,
    fsync the directory.  Keeps the file's mode (and owner, where allowed).  Returns the
    os.stat of the new file, taken before anyone else could change it."""
    import tempfile
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    info = os.stat(path)
    fd, temp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=directory)
    try:
        with open(fd, "wb") as f:
            for piece in [data] if isinstance(data, bytes) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, stat.S_IMODE(info.st_mode))
        if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.chown(temp, info.st_uid, info.st_gid)
            except OSError:
                pass
        written = os.stat(temp)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return written


class UserDatabase:
    """Looks up user statuses.  Knows nothing about sockets.

    Methods for the caller:
        get_user(name) -> str or None      None: no such user
        get_user_verbose(name)             the answer to '/W name'; by default get_user(name)
        get_users() -> list of str         sorted names; [] where listing is not possible
        public_users()                     get_users() for a client: ListRefused when the
                                           list is private; every front-end asks this one
        count()                            how many users (without listing them, if it can)
        set_user(name, status)             writable databases only
    Lifecycle: start() and stop() (idempotent), reload() (SIGHUP and tests).
    Class variable `blocking`: True when a lookup may wait on I/O, so front-ends call it
    from a worker pool instead of their event loop.  `listable`: False (--no-list) keeps
    the list from every front-end, names asked for one by one are still answered."""

    blocking = False
    listable = True

    def get_user(self, name):
        raise NotImplementedError

    def get_user_verbose(self, name):
        return self.get_user(name)

    def get_users(self):
        return []

    def stored_bytes(self, name, status):
        """(bytes stored now, bytes once `name` has `status`) for a back-end that stores its
        users in a file, else None (nothing grows)."""
        return None

    def count(self):
        """How many users there are (metrics and /healthz: never their names)."""
        return len(self.get_users())

    def public_users(self):
        if not self.listable:
            raise ListRefused(LIST_DENIED)
        return self.get_users()

    def set_user(self, name, status):
        raise FingerError("this user database is read-only")

    def health(self):
        """(time of the last successful load or None, whether the last load worked)."""
        return None, True

    def relocate(self, inside):
        """After a chroot: `inside(path)` maps a path named outside to the same file inside."""

    def start(self):
        pass

    def stop(self):
        pass

    def reload(self, force=False):
        pass


class MemoryDatabase(UserDatabase):
    """Statuses kept in memory: the tutorial's MemoryFingerService.

    `version` changes whenever a status may have changed, so callers can cache answers."""

    def __init__(self, users=None):
        self._users = users if isinstance(users, UserTable) else UserTable(users or {})
        self._names = None            # sorted names, computed on first use per version
        self._lock = threading.Lock()  # serialises writers; readers never take it
        self.version = 0
        self.changed_at = time.time()  # of the last change (the web's Last-Modified)

    def get_user(self, name):
        table = self._users
        status = table.get(name)
        if status is None and table is not self._users:   # swapped and retired meanwhile
            status = self._users.get(name)
        return status

    def get_users(self):
        known = self._names                # (version, sorted names)
        if known is not None and known[0] == self.version:
            return known[1]
        while True:
            version = self.version
            try:
                names = self._users.sorted_names()
            except RuntimeError:          # changed while we read it: read it again
                continue
            if version == self.version:
                self._names = version, names
                return names

    def count(self):
        return len(self._users)

    def set_user(self, name, status):
        with self._lock:
            self._users.set(name, status)
            self._changed()

    def _swap(self, users):
        """Install a new table in one step (a lookup sees the old one or the new one);
        returns the old one, for the caller to retire."""
        old, self._users = self._users, users
        self._changed()
        return old

    def _changed(self):
        self._names = None
        self.version += 1
        self.changed_at = time.time()


class _Write:
    """A status set through FileDatabase.set_user, waiting for the rewrite that takes it:
    `done` once it is written, with the `error` that rewrite met (None: none)."""
    __slots__ = ("name", "status", "done", "error")

    def __init__(self, name, status):
        self.name, self.status, self.done, self.error = name, status, False, None


class FileDatabase(MemoryDatabase):
    """The tutorial's FingerService: `user: status` lines from a file, re-read every
    `reload_interval` seconds when the file changed (size, mtime or inode).

    The file is parsed outside any lock and the new table swapped in at once, so a lookup
    never waits for a parse.  A reload that fails keeps the last good table and is logged
    once per streak of failures.  set_user writes through to the file before it returns;
    reloads and writes take turns (a writer lock), lookups never wait for either.  Writes
    that arrive while one is being written go to the file together, in one rewrite."""

    def __init__(self, path, reload_interval=DEFAULT_RELOAD):
        super().__init__()
        self.path = path
        self.reload_interval = reload_interval
        self.loaded_at = None          # time.time() of the last successful load
        self.rewrites = 0              # times set_user has rewritten the file
        self._queued = []              # the _Writes waiting for a rewrite
        self._queue_lock = threading.Lock()
        self._signature = None
        self._trouble = LogStreak(path, level=logging.ERROR)   # while it cannot be loaded
        self._stopping = threading.Event()
        self._thread = None
        self._wake = threading.Event()       # reload now: a reload() from another thread
        self._asked = []                     # (force, Future) of those reload() calls
        self._asked_lock = threading.Lock()
        self.load()

    def load(self):
        """Read the file now; UsersFileError if it cannot be used."""
        with background_job():
            with self._lock:
                old = self._load()
            old.retire()

    def _load(self):
        try:
            with open_regular(self.path) as f:
                info = os.fstat(f.fileno())
                users, problems = parse_users(text_lines(f), self.path)
        except OSError as error:
            raise UsersFileError("cannot read users file %s: %s"
                                 % (self.path, error.strerror or error)) from None
        for problem in problems:
            log.warning("%s", problem)
        reserved = sorted(name for name in RESERVED_NAMES if name in users)
        if reserved:
            log.warning("%s: users named like the web site's own paths (%s): their web pages "
                        "are /~NAME", self.path, ", ".join(reserved))
        old = self._swap(users)
        self._signature = self._signature_of(info)
        self.loaded_at = time.time()
        log.info("loaded %d users from %s", len(users), self.path)
        return old

    @staticmethod
    def _signature_of(info):
        return info.st_size, info.st_mtime_ns, info.st_ino

    def reload(self, force=False):
        """Re-read the file if it changed (or `force`); True when a new table is in use.

        While the reload thread runs, that thread does it and the caller waits, and the
        reloads asked meanwhile are done together, once: a burst of SIGHUPs (a thread
        each) is one reload of a large file, not one per signal, one after the other."""
        from concurrent.futures import Future
        thread = self._thread
        if thread is None or thread is threading.current_thread() or not thread.is_alive():
            return self._reload(force)
        asked = force, Future()
        with self._asked_lock:
            if self._stopping.is_set():
                asked = None
            else:
                self._asked.append(asked)
        if asked is None:
            return self._reload(force)
        self._wake.set()
        return asked[1].result()

    def _reload(self, force):
        try:
            with self._lock:
                if not force and self._signature_of(os.stat(self.path)) == self._signature:
                    return False
                with background_job():
                    old = self._load()
            with background_job():
                old.retire()
        except (OSError, UsersFileError) as error:
            reason = error.strerror if isinstance(error, OSError) else error
            self._trouble.report("users file %s: %s; keeping the %d users loaded before",
                                 self.path, reason, len(self._users))
            return False
        if self._trouble.end() is not None:
            log.info("users file %s is usable again", self.path)
        return True

    def set_user(self, name, status):
        """Write the status through to the file, then serve it; OSError leaves both alone.

        The write is queued; whoever holds the writer lock next writes every queued one in
        one rewrite of the file (a group commit), so a burst of writes to a large file
        costs a few rewrites, not one each, and each returns once its status is on disk."""
        write = _Write(name, status)
        with self._queue_lock:
            self._queued.append(write)
        with self._lock, background_job():
            if not write.done:                 # not written by the one before us
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                self._write(batch)
        if write.error is not None:
            raise write.error

    def _write(self, batch):
        """Rewrite the file with the statuses of `batch` (the last one of a name wins)."""
        statuses = {write.name: write.status for write in batch}
        error = None
        try:
            with open_regular(self.path) as f:
                seen = self._signature_of(os.fstat(f.fileno())) == self._signature
                pieces = [f.read()]
            for name, status in statuses.items():
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces = rewrite_users(data, name, status)
            written = write_file_atomically(self.path, pieces)
            self.rewrites += 1
            # Edits nobody has loaded yet are in the new file too: leave them to the reload.
            # The signature is the new file's as written: an edit made after the rename
            # changes it, so the next reload sees that edit.
            self._signature = self._signature_of(written) if seen else None
            for name, status in statuses.items():
                self._users.set(name, status)
            self._changed()
        except Exception as failure:       # OSError, or a bug: every writer hears of it
            error = failure
        for write in batch:
            write.done, write.error = True, error

    def start(self):
        self._remove_crash_leftovers()
        if self._thread is None:
            self._stopping.clear()
            self._wake.clear()
            self._thread = threading.Thread(target=self._reload_forever, daemon=True,
                                            name="finger-reload")
            self._thread.start()

    def stop(self):
        with self._asked_lock:
            self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def health(self):
        return self.loaded_at, not self._trouble.in_streak()

    def stored_bytes(self, name, status):
        size = os.stat(self.path).st_size
        old = self._users.get(name)
        line = "%s: %s\n" % (name, status)
        return size, size + len(line.encode("utf-8")) - (
            0 if old is None else len(("%s: %s\n" % (name, old)).encode("utf-8")))

    def relocate(self, inside):
        self.path = inside(self.path)

    def _remove_crash_leftovers(self):
        """Remove the temp files of set_user (write_file_atomically) that a crash or kill -9
        left beside the users file: '.NAME.' and mkstemp's 8 characters."""
        directory, name = os.path.split(os.path.realpath(self.path))
        leftover = re.compile(r"\.%s\.[a-z0-9_]{8}\Z" % re.escape(name))
        try:
            names = [entry for entry in os.listdir(directory) if leftover.match(entry)]
        except OSError:
            return
        for entry in names:
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError as error:
                log.warning("cannot remove %s, left by a crash: %s",
                            os.path.join(directory, entry), error.strerror)
            else:
                log.warning("removed %s, left by a crash during a setter write",
                            os.path.join(directory, entry))

    def _reload_forever(self):
        """Every reload_interval (0: never by itself), and at once for a reload() asked in
        another thread; the reloads asked before stop() are done before the thread ends."""
        stopping = False
        while not stopping:
            self._wake.wait(self.reload_interval or None)
            self._wake.clear()
            with self._asked_lock:
                asked, self._asked = self._asked, []
                stopping = self._stopping.is_set()
            if not asked and (stopping or not self.reload_interval):
                continue
            reloaded = False
            try:
                reloaded = self._reload(any(force for force, _ in asked))
            except Exception:   # never let one bad reload end the reloads for good
                log.exception("reloading %s failed", self.path)
            finally:            # even as the thread dies: no caller waits for ever
                for _, future in asked:
                    future.set_result(reloaded)


class PlanDatabase(UserDatabase):
    """The standard thing (the tutorial's LocalFingerService): users from the password
    database, answered with their ~/.plan; '/W' adds what fingerd shows (login, real name,
    home, shell, ~/.project).  A user with ~/.nofinger is unknown.

    The files are opened relative to the home directory without following symlinks, and
    read only when they are regular files owned by that user, at most MAX_PLAN_BYTES."""

    blocking = True            # home directories may be on a slow or remote disk

    def __init__(self, list_users=False):
        self.list_users = list_users

    def get_user(self, name):
        entry = self._entry(name)
        if entry is None:
            return None
        plan = self._read(entry, ".plan")
        return "No Plan." if plan is None else plan

    def get_user_verbose(self, name):
        entry = self._entry(name)
        if entry is None:
            return None
        real_name = entry.pw_gecos.split(",")[0]
        lines = ["Login: %-24s Name: %s" % (entry.pw_name, real_name),
                 "Directory: %-20s Shell: %s" % (entry.pw_dir, entry.pw_shell)]
        project = self._read(entry, ".project")
        if project is not None:
            lines.append("Project: " + project.strip())
        plan = self._read(entry, ".plan")
        lines.append("No Plan." if plan is None else "Plan:\n" + plan)
        return "\n".join(lines)

    def get_users(self):
        """Nobody, unless `list_users`: then accounts with a uid of 1000 or more."""
        if not self.list_users:
            return []
        return sorted(entry.pw_name for entry in pwd.getpwall()
                      if entry.pw_uid >= 1000 and valid_user_name(entry.pw_name)
                      and self._entry(entry.pw_name) is not None)

    def _entry(self, name):
        if not valid_user_name(name):
            return None
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return None if self._home_has(entry, ".nofinger") else entry

    @staticmethod
    def _open_home(entry):
        return os.open(entry.pw_dir, os.O_RDONLY | os.O_DIRECTORY)

    def _home_has(self, entry, filename):
        try:
            home = self._open_home(entry)
        except OSError:
            return False
        try:
            os.stat(filename, dir_fd=home, follow_symlinks=False)
            return True
        except OSError:
            return False
        finally:
            os.close(home)

    def _read(self, entry, filename):
        """The file's text, or None when it is missing, a symlink, not a regular file or not
        the user's own."""
        try:
            home = self._open_home(entry)
        except OSError:
            return None
        try:
            fd = os.open(filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                         dir_fd=home)
        except OSError:
            return None
        finally:
            os.close(home)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != entry.pw_uid:
                log.warning("~%s/%s is not a regular file of its own: not shown",
                            entry.pw_name, filename)
                return None
            data = b""
            while len(data) < MAX_PLAN_BYTES:
                chunk = os.read(fd, MAX_PLAN_BYTES - len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
        return data.decode("utf-8", "replace")


class CommandDatabase(UserDatabase):
    """The tutorial's getProcessOutput("finger", [user]): run a local program, no shell,
    with the name (checked against a strict pattern) after '--', a timeout and an output cap."""

    blocking = True

    def __init__(self, program="finger", timeout=DEFAULT_BACKEND_TIMEOUT,
                 max_output=MAX_COMMAND_OUTPUT):
        import shutil
        self.program = shutil.which(program)
        if self.program is None:
            raise FieldError("program", "no such program (is it installed, and on PATH?)",
                             program)
        self.timeout = timeout
        self.max_output = max_output

    def get_user(self, name):
        if not valid_user_name(name):
            return None
        output = run_bounded([self.program, "--", name], self.timeout, self.max_output)
        text = output.decode("utf-8", "replace").strip("\n")
        return text or None


RUNNING_COMMANDS = set()          # programs run_bounded is waiting for (killed at a forced exit)


def run_bounded(argv, timeout, max_output):
    """Run a program (no shell, stdin and stderr closed) and return at most `max_output`
    bytes of its output; FingerError when it takes longer than `timeout` seconds."""
    import subprocess
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    RUNNING_COMMANDS.add(process)
    deadline = time.monotonic() + timeout
    output = b""
    try:
        while len(output) < max_output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selectors_wait(process.stdout.fileno(), remaining):
                raise FingerError("%s took longer than %g s" % (argv[0], timeout))
            chunk = os.read(process.stdout.fileno(), max_output - len(output))
            if not chunk:
                break
            output += chunk
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
        process.wait()
        RUNNING_COMMANDS.discard(process)
    return output


class WebDatabase(UserDatabase):
    """The tutorial's "Read Status from the Web": GET prefix + quoted name; the page, with
    HTML reduced to text, is the status; 404 is an unknown user; anything else fails."""

    blocking = True

    def __init__(self, prefix, timeout=DEFAULT_BACKEND_TIMEOUT, max_bytes=MAX_WEB_LOOKUP_BYTES):
        if not prefix or not prefix.startswith(("http://", "https://")):
            raise FieldError("prefix", "the web back-end needs an address that starts "
                             "http:// or https://", prefix)
        self.prefix, self.timeout, self.max_bytes = prefix, timeout, max_bytes

    def get_user(self, name):
        import urllib.error
        import urllib.parse
        import urllib.request
        request = urllib.request.Request(self.prefix + urllib.parse.quote(name, safe=""),
                                         headers={"User-Agent": "finger.py/" + __version__})
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 404:
                return None
            raise
        with response:
            data = response.read(self.max_bytes)
            charset = response.headers.get_content_charset() or "utf-8"
            html = response.headers.get_content_type() in ("text/html", "application/xhtml+xml")
        try:
            text = data.decode(charset, "replace")
        except LookupError:
            text = data.decode("utf-8", "replace")
        return (html_to_text(text) if html else text).strip()


def html_to_text(html):
    """The text of an HTML page: scripts and styles dropped, one line per block."""
    from html.parser import HTMLParser

    class TextOnly(HTMLParser):
        blocks = {"p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "title",
                  "pre", "blockquote", "section", "article", "header", "footer"}

        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts, self.skipping = [], 0

        def handle_starttag(self, tag, attrs):
            if tag in ("script", "style", "head"):
                self.skipping += 1
            elif tag in self.blocks:
                self.parts.append("\n")

        def handle_endtag(self, tag):
            if tag in ("script", "style", "head"):
                self.skipping = max(self.skipping - 1, 0)
            elif tag in self.blocks:
                self.parts.append("\n")

        def handle_data(self, data):
            if not self.skipping:
                self.parts.append(re.sub(r"\s+", " ", data))   # source line breaks are spaces

    parser = TextOnly()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


class ProxyDatabase(UserDatabase):
    """--backend proxy: every name is asked of another finger server (`target`)."""

    blocking = True

    def __init__(self, forwarder, target):
        self.forwarder, self.target = forwarder, target

    def get_user(self, name):
        return self.forwarder.forward(Query(False, [name]), self.target)[0]

    def get_user_verbose(self, name):
        return self.forwarder.forward(Query(True, [name]), self.target)[0]


class PluginDatabase(UserDatabase):
    """A plugin object that only has get_user (and maybe get_users, set_user, blocking),
    given the rest of the UserDatabase interface."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.blocking = bool(getattr(plugin, "blocking", False))

    def get_user(self, name):
        return self.plugin.get_user(name)

    def get_users(self):
        get_users = getattr(self.plugin, "get_users", None)
        return list(get_users()) if get_users else []

    def set_user(self, name, status):
        set_user = getattr(self.plugin, "set_user", None)
        if set_user is None:
            raise FingerError("this user database is read-only")
        set_user(name, status)


# == 4. The event loop, listeners and connections =============================================

class Timer:
    """A callback a Loop runs once at `when` (time.monotonic()), unless cancelled.  Loop.
    schedule() moves it; moving it later costs no heap entry (it is queued again when its
    old time comes), so a connection's deadline can move on every message."""
    __slots__ = ("when", "queued_at", "active", "callback", "args")

    def __init__(self, callback, args):
        self.callback, self.args = callback, args
        self.when = self.queued_at = 0.0
        self.active = False

    def cancel(self):
        self.active = False

    def discard(self):
        """Cancel it for good: what it would have been called with is let go now, not when
        its old time comes out of the heap (a closed connection's memory goes at once)."""
        self.active = False
        self.callback, self.args = None, ()


class Loop:
    """The event loop every service runs on (each service in its own thread, with its own
    Loop): a selector over its sockets, timers, a wake-up for other threads, and a bounded
    pool of worker threads for what may block, whose results come back to the loop thread.

    From the loop thread: watch(sock, events, callback, arg) (callback(arg, mask) runs when
    `sock` is ready; watching again changes the events, events 0 stops), timer(callback,
    *args) -> Timer, schedule(timer, seconds), run_in_worker(function, args, then) (then(
    future) runs in the loop thread), stop().  From any thread: call_soon(callback, *args),
    stop().  run() returns once stop() is called; close() frees the loop's resources.
    Timers follow `clock` (time.monotonic; a test's clock moves as the test says, and the
    test then wakes the loop with call_soon to have it look at its timers)."""

    def __init__(self, name, workers=DEFAULT_WORKERS, clock=time.monotonic):
        self.name = name
        self.workers = workers
        self.clock = clock
        self.in_flight = 0               # jobs handed to the pool and not yet back
        self._selector = selectors.DefaultSelector()
        self._waker, self._woken_by = socket.socketpair()
        self._waker.setblocking(False)
        self._woken_by.setblocking(False)
        self._selector.register(self._woken_by, selectors.EVENT_READ, (self._woken, None))
        self._timers = []                # heap of (when, sequence number, Timer)
        self._sequence = 0
        self._calls = collections.deque()    # (callback, args) from other threads
        self._pool = None
        self._running = True
        self.closed = False

    def watch(self, sock, events, callback=None, arg=None):
        """Call callback(arg, mask) when `sock` is ready for `events` (0: no longer watch it;
        the callback may be left out when only the events change)."""
        if not events:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            return
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            self._selector.register(sock, events, (callback, arg))
            return
        if key.events != events or callback is not None:
            self._selector.modify(sock, events, (callback, arg) if callback else key.data)

    def timer(self, callback, *args):
        """A Timer, not yet scheduled."""
        return Timer(callback, args)

    def schedule(self, timer, seconds):
        """Run `timer` `seconds` from now (moving it if it was scheduled already)."""
        when = self.clock() + seconds
        if timer.active and when >= timer.queued_at:
            timer.when = when                # later: found in the heap at its old time
            return
        timer.when = timer.queued_at = when
        timer.active = True
        self._push(timer)

    def call_later(self, seconds, callback, *args):
        timer = Timer(callback, args)
        self.schedule(timer, seconds)
        return timer

    def call_soon(self, callback, *args):
        """Run callback(*args) in the loop thread soon; the one method for other threads."""
        self._calls.append((callback, args))
        self._wake()

    def submit(self, function, *args):
        """Run function(*args) in the worker pool: a concurrent.futures.Future."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor   # preloaded by run_server
            self._pool = ThreadPoolExecutor(self.workers,
                                            thread_name_prefix="finger-%s-worker" % self.name)
        return self._pool.submit(function, *args)

    def run_in_worker(self, function, args, then):
        """Run function(*args) in the worker pool, then `then(future)` in the loop thread."""
        self.in_flight += 1
        future = self.submit(function, *args)
        future.add_done_callback(lambda future: self.call_soon(self._job_done, then, future))

    def run(self):
        select = self._selector.select
        while self._running:
            timeout = self._run_timers()
            if not self._running:
                break
            for key, mask in select(timeout):
                callback, arg = key.data
                try:
                    callback(arg, mask)
                except Exception:
                    log.exception("%s: an event handler failed", self.name)
            key = callback = arg = None       # hold no closed connection while it waits

    def stop(self):
        self._running = False
        self._wake()

    def close(self):
        self.closed = True
        self._selector.close()
        self._waker.close()
        self._woken_by.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _push(self, timer):
        self._sequence += 1
        heapq.heappush(self._timers, (timer.queued_at, self._sequence, timer))

    def _run_timers(self):
        """Run the timers that are due; seconds until the next one (None: there is none)."""
        timers = self._timers
        while timers:
            when, _, timer = timers[0]
            now = self.clock()
            if when > now:
                return when - now
            heapq.heappop(timers)
            if not timer.active or timer.queued_at != when:
                continue                     # cancelled, or moved earlier: queued again
            if timer.when > now:             # moved later: queued at its new time
                timer.queued_at = timer.when
                self._push(timer)
                continue
            timer.active = False
            try:
                timer.callback(*timer.args)
            except Exception:
                log.exception("%s: a timer failed", self.name)
        return None

    def _wake(self):
        try:
            self._waker.send(b"\0")
        except OSError:
            pass       # full (a wake-up is pending anyway) or closed (stopped)

    def _woken(self, _, mask):
        with contextlib.suppress(OSError):
            while self._woken_by.recv(RECV_SIZE):
                pass
        while self._calls:
            callback, args = self._calls.popleft()
            try:
                callback(*args)
            except Exception:
                log.exception("%s: a call failed", self.name)

    def _job_done(self, then, future):
        self.in_flight -= 1
        then(future)


class Service:
    """A thing that runs in its own thread.

    Methods for the caller: bind() (before privileges are dropped), start() (binds if need be
    and starts the thread), stop() (prompt and idempotent: no socket or thread left behind),
    `address` (the real (host, port) once bound).
    Methods subclasses override: bind(), serve() (runs in the thread until stop), close()."""

    name = "service"
    address = None
    on_failure = None      # called (in the service's thread) when serve() dies of an error
    latency = None         # a LatencyHistogram of its answers, for /metrics

    def __init__(self):
        self._thread = None

    def bind(self):
        pass

    def serve(self):
        raise NotImplementedError

    def close(self):
        pass

    def reload(self):
        """SIGHUP: re-read what can be re-read (certificates)."""

    def close_listener(self):
        """Close a bound listener of a service that will not start (a later bind failed)."""

    def relocate(self, inside):
        """After a chroot: `inside(path)` maps a path named outside to the same file inside."""

    def open_connections(self):
        return 0

    def alive(self):
        """Whether its thread runs (for /healthz)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        if self._thread is None:
            self.bind()
            self._thread = threading.Thread(target=self._run, name="finger-" + self.name,
                                            daemon=True)
            self._thread.start()

    def stop(self):
        thread, self._thread = self._thread, None
        if thread is not None:
            self.close()
            thread.join()

    def _run(self):
        try:
            self.serve()
        except Exception:
            log.exception("%s service died", self.name)
            if self.on_failure is not None:
                self.on_failure()


def bind_tcp(address, option="listener"):
    """Create a listening TCP socket on (host, port); '' means every address (IPv6 and IPv4
    where the system has both).  Raises FingerError naming the option on failure."""
    host, port = address
    try:
        if host in ("", "*"):
            if socket.has_dualstack_ipv6():
                return socket.create_server(("::", port), family=socket.AF_INET6,
                                            backlog=LISTEN_BACKLOG, dualstack_ipv6=True)
            host = "0.0.0.0"
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        return socket.create_server(sockaddr, family=family, backlog=LISTEN_BACKLOG)
    except OSError as error:
        message = "--%s %s: cannot listen: %s" % (option, format_address(address),
                                                  error.strerror or error)
        if error.errno == errno.EACCES and 0 < port < 1024:
            message += (" (ports below 1024 need root or CAP_NET_BIND_SERVICE; try a high"
                        " port such as --%s %s)" % (option, format_address((host, port + 7900))))
        raise FingerError(message) from None


def bind_unix(path, option="setter-socket"):
    """Listen on a unix socket at `path`, mode 0666 (peers are told apart by SO_PEERCRED):
    the mode comes from the umask at bind, never from a chmod of the path (which a symlink
    put there meanwhile would redirect).  A socket file left by a dead server is replaced;
    anything else there is an error, and so is a directory anyone may write to without the
    sticky bit (anyone could replace the socket)."""
    directory = os.path.dirname(os.path.abspath(path))
    with contextlib.suppress(OSError):
        mode = os.stat(directory).st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise UsageError("--%s %s: anyone may write to %s and it has no sticky bit, so "
                             "anyone could replace the socket; use a directory that only "
                             "root and the server's user may write to" % (option, path,
                                                                          directory))
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise UsageError("--%s %s: exists and is not a socket" % (option, path))
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(path) == 0:
                raise FingerError("--%s %s: a running server listens there" % (option, path))
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o111)            # at start, before any other thread makes files
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        raise FingerError("--%s %s: cannot listen: %s" % (option, path, error.strerror or error))
    finally:
        os.umask(umask)
    return sock


class PeerCredentials:
    """Who is at the other end of a unix socket (SO_PEERCRED)."""
    __slots__ = ("pid", "uid", "gid")

    def __init__(self, sock):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)

    def __str__(self):
        return "uid=%d,pid=%d" % (self.uid, self.pid)


def format_peer(peer):
    """A connection's peer for the log: host:port, or the credentials of a unix peer."""
    return format_address(peer) if isinstance(peer, tuple) else str(peer)


# -- the two kinds of protocol a TCPService serves --------------------------------------------

class Protocol:
    """What every protocol of a TCPService has: a `name`, its `counts` (outcome -> number,
    for the metrics; count() may be called from any thread) and `latency` (a
    LatencyHistogram of its answers)."""

    name = "protocol"

    def __init__(self):
        self.counts = {}
        self.latency = LatencyHistogram()
        self._counts_lock = threading.Lock()

    def count(self, outcome):
        with self._counts_lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def refusal(self, text, outcome):
        """The bytes that turn a new connection away (text: the reason; outcome: its word),
        or None to close it without a word."""
        return format_reply(text)

    @staticmethod
    def log_text(request):
        """What the query log shows of a request."""
        return request


class RequestProtocol(Protocol):
    """One request, one answer, close (finger, the setter, the proxy).  Methods to override:
    parse(data, eof) -> the request once `data` holds it whole, else None (RequestError:
    refused with its reply); respond(request, peer) -> (reply bytes, outcome word);
    needs_worker(request): whether respond may block or take long (then it runs in the
    worker pool); `max_request`: bytes of input kept."""

    max_request = MAX_QUERY_BYTES

    def parse(self, data, eof):
        raise NotImplementedError

    def respond(self, request, peer=None):
        raise NotImplementedError

    def needs_worker(self, request):
        return False


class Session:
    """One connection of a SessionProtocol.  feed(data) -> what to send back: bytes, or a
    list of them (raising drops the connection); while it has `pending` whole messages left
    (it stops early after a large answer, or before one that must run in a worker: then
    `slow`), resume() answers more of them once the answers so far are sent, and busy()
    answers the next one when no worker is free (None: drop the connection); `idle` when it
    holds no part of a message (the connection's deadline then starts again); `closing`
    once the connection should close after what is sent; close() when it has closed."""

    __slots__ = ()
    idle = True
    pending = slow = closing = False

    def greeting(self):
        return b""

    def feed(self, data):
        raise NotImplementedError

    def resume(self):
        return b""

    def busy(self):
        return None

    def close(self):
        pass


class SessionProtocol(Protocol):
    """A stream of messages on a connection that stays open (PB, HTTP): new_session(peer)
    makes its Session.  With `blocking` (a back-end that may block), every feed runs in the
    worker pool; a peer that leaves more than `max_output` bytes unread (None: no limit) is
    dropped."""

    blocking = False
    max_output = MAX_SESSION_OUTPUT

    def new_session(self, peer):
        raise NotImplementedError

    def refusal(self, text, outcome):
        return None

    @staticmethod
    def log_text(request):
        return b""                  # sessions log their messages themselves


class TCPService(Service):
    """A listener whose connections are all served by one Loop in the service's thread; it
    accepts, keeps deadlines, closes and logs, and its RequestConnection or SessionConnection
    does the rest (calling wait, set_deadline, in_worker, proxied, log and drop).
    `address` is (host, port), or a unix socket's path (peers known by their
    PeerCredentials); `sock` a listening socket made elsewhere (systemd, tests).  `protocol`
    is a RequestProtocol (needs_worker() requests go to the bounded worker pool) or a
    SessionProtocol (the connection stays open).  `tls_context`: TLS, handshakes on the loop.
    Limits: `timeout` seconds to send a request (and the handshake) and to take each part of
    the answer (for sessions, from the last whole message), at most `max_pending` (default 2
    x `workers`) answers waiting for the pool, and the Admission of `max_connections` and
    per-client `limits`.  The balancers of `proxy_headers` (ProxyHeaders) send a PROXY header
    first, whose client is then the peer.  `clock` is the deadlines' (tests)."""

    def __init__(self, protocol, address=("127.0.0.1", 0), *, sock=None, name=None,
                 timeout=DEFAULT_TIMEOUT, max_connections=DEFAULT_MAX_CONNECTIONS,
                 workers=DEFAULT_WORKERS, max_pending=None, limits=None, proxy_headers=None,
                 tls_context=None, clock=time.monotonic):
        super().__init__()
        self.clock = clock               # the Loop's, for deadlines
        self.protocol = protocol
        self.sessions = isinstance(protocol, SessionProtocol)
        self._connection = SessionConnection if self.sessions else RequestConnection
        self.proxy_headers = proxy_headers
        self.tls_context = tls_context
        self.name = name or protocol.name
        self.requested_address = address
        self.timeout = timeout
        self.workers = workers
        self.max_pending = max_pending or 2 * workers
        self.admission = Admission(self.name, max_connections, limits)
        self.loop = None
        self.stopping = False
        self.warnings = warning_throttle(self.name)
        self._listener = sock
        self._unix = False               # a unix socket listener: peers are credentials
        self._owns_path = False          # a unix socket file we made, removed at stop
        self._conns = {}                 # Connection -> None: those open
        self._lingering = {}             # Connection -> None: those turned away, still read

    @property
    def limits(self):
        return self.admission.limits

    @property
    def counts(self):
        return self.protocol.counts

    @property
    def latency(self):
        return self.protocol.latency

    def open_connections(self):
        return len(self._conns)

    def connections(self):
        """The connections open now (a copy; for tests and the curious)."""
        return list(self._conns)

    # -- lifecycle

    def close_listener(self):
        if self._listener is not None and self._thread is None:
            self._listener.close()
            if self._owns_path:
                with contextlib.suppress(OSError):
                    os.unlink(self.address)
        if self.loop is not None and self._thread is None:
            self.loop.close()

    def bind(self):
        if self._listener is None:
            if isinstance(self.requested_address, str):
                self._listener = bind_unix(self.requested_address, self.name)
                self._owns_path = True
            else:
                self._listener = bind_tcp(self.requested_address, self.name)
        self._listener.setblocking(False)
        self._unix = self._listener.family == socket.AF_UNIX
        address = self._listener.getsockname()
        self.address = address if isinstance(address, str) else address[:2]
        if self.loop is None:
            self.loop = Loop(self.name, self.workers, self.clock)

    def close(self):
        self.loop.call_soon(self._begin_stop)

    def stop(self):
        super().stop()
        if self._owns_path:                        # our unix socket file goes with us
            with contextlib.suppress(OSError):
                os.unlink(self.address)

    def serve(self):
        self.loop.watch(self._listener, selectors.EVENT_READ, self._accept)
        try:
            self.loop.run()
        finally:
            for conn in list(self._conns) + list(self._lingering):
                self.drop(conn)
            self.loop.close()
            self._listener.close()

    def _begin_stop(self):
        """Stop accepting; close the connections that have no answer on its way (a request
        not yet whole, an idle session); the others get STOP_GRACE seconds to finish."""
        self.stopping = True
        self.loop.watch(self._listener, 0)
        self._listener.close()
        for conn in list(self._conns) + list(self._lingering):
            if conn.lingering or not conn.answer_coming():
                self.drop(conn)
        self.loop.call_later(STOP_GRACE, self.loop.stop)
        self._stop_when_idle()

    def _stop_when_idle(self):
        if self.stopping and not self._conns:
            self.loop.stop()

    # -- accepting

    def _accept(self, _, mask):
        admission = self.admission
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    self._pause_accepting()
                    return
                if error.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.warning("%s: accept failed: %s", self.name, error)
                return
            if admission.out_of_descriptors:
                admission.descriptors_back()
            sock.setblocking(False)
            proxied = self.proxy_headers is not None and self.proxy_headers.expected_from(peer)
            refusal = admission.refusal(len(self._conns), None if proxied else peer)
            if admission.turn_away_now(refusal, self.sessions):
                self.protocol.count(refusal[1])
                self._turn_away(self._connection(self, sock, peer), refusal)
                continue
            if self._unix:
                peer = PeerCredentials(sock)
            elif self.sessions:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            admission.busy += refusal is not None
            conn = self._connection(self, sock, peer, refusal)
            self._conns[conn] = None
            if proxied:
                conn.awaiting_proxy = True
                conn.handler = conn.read_proxy          # the header first
            else:
                conn.handler = conn.begin
            self._serve(conn, selectors.EVENT_READ)

    def proxied(self, conn, peer):
        """A connection's PROXY header named its client, `peer`: admit it, and begin."""
        conn.awaiting_proxy = False
        conn.peer = peer
        admission = self.admission
        refusal = None if conn.refusal else admission.client_refusal(peer)
        if admission.turn_away_now(refusal, self.sessions):
            self.protocol.count(refusal[1])           # as _accept does: turned away at once
            del self._conns[conn]
            self.loop.watch(conn.sock, 0)
            conn.events = 0
            self._turn_away(conn, refusal)            # not admitted: nothing to release
            return
        if refusal is not None:
            conn.refusal = refusal
            admission.busy += 1
        conn.begin()

    def _turn_away(self, conn, refusal):
        """Send the protocol's refusal (on a TLS port: a TLS alert, never plain text), then
        let the connection linger, its input read and dropped, until the peer closes (at
        most a second; BUSY_BACKLOG of them at once): our close must not reset the
        connection before the peer has read the refusal."""
        answer = self.protocol.refusal(*refusal)
        with contextlib.suppress(OSError):
            if self.tls_context is not None:
                _refuse_tls(conn.sock)
            elif answer is not None:
                conn.sock.send(answer)
            conn.sock.shutdown(socket.SHUT_WR)
        if len(self._lingering) >= BUSY_BACKLOG or answer is None:
            conn.sock.close()
            return
        self._linger(conn)

    def _linger(self, conn):
        conn.lingering = True
        conn.handler = conn.linger
        self._lingering[conn] = None
        self.wait(conn, selectors.EVENT_READ, 1.0)

    def _pause_accepting(self):
        """Out of file descriptors: the listener stays readable, so stop watching it for
        ACCEPT_PAUSE seconds (no spinning); new clients wait in the listen backlog."""
        self.admission.descriptors_short(len(self._conns))
        self.loop.watch(self._listener, 0)
        self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self):
        if not self.stopping:
            self.loop.watch(self._listener, selectors.EVENT_READ, self._accept)

    # -- what connections ask of their service

    def _serve(self, conn, mask):
        """A connection is ready; a bug in serving one connection drops that one only."""
        try:
            conn.handler(mask)
        except Exception:
            log.exception("%s %s: dropped after an error", self.name, format_peer(conn.peer))
            self.drop(conn)

    def wait(self, conn, events, seconds=None):
        """Watch the connection for `events`, with its deadline `seconds` (default:
        `timeout`) from now, or as it was if it runs."""
        if conn.events != events:
            self.loop.watch(conn.sock, events, self._serve, conn)
            conn.events = events
        if seconds is not None or conn.deadline is None or not conn.deadline.active:
            self.set_deadline(conn, seconds)

    def set_deadline(self, conn, seconds=None):
        if conn.deadline is None:
            conn.deadline = self.loop.timer(self._expired, conn)
        self.loop.schedule(conn.deadline, self.timeout if seconds is None else seconds)

    def _expired(self, conn):
        if conn.lingering:
            self.drop(conn)                    # done with
        else:
            conn.expired()

    def in_worker(self, conn, function, args, then):
        """Run function(*args) in the pool, then then(future) in the loop thread; the
        connection is not watched meanwhile.  False, and nothing run, when `max_pending`
        jobs wait already."""
        if self.loop.in_flight >= self.max_pending:
            return False
        if conn.events:
            self.loop.watch(conn.sock, 0)
            conn.events = 0
        conn.working = True
        self.loop.run_in_worker(function, args, then)
        return True

    def log(self, conn, request, outcome):
        self.protocol.count(outcome)
        if conn.session is None:
            self.protocol.latency.observe(time.monotonic() - conn.started)
        if query_log.enabled:
            query_log.record(self.name, conn.peer, self.protocol.log_text(request), outcome,
                             conn.started)

    def drop(self, conn, linger=False):
        """Close a connection; with `linger` (and room for it), shut our side only and read
        and drop the peer's input until it closes (at most a second): a peer still sending
        must not get a reset that destroys the answer before it reads it."""
        if conn.closed or linger and conn.lingering:
            return
        if conn.events:
            self.loop.watch(conn.sock, 0)
        if conn.deadline is not None:
            conn.deadline.discard()
            conn.deadline = None
        if conn.session is not None and not (conn.working or conn.lingering):
            conn.session.close()               # one being fed: when its job is done
        if conn.lingering:
            del self._lingering[conn]
            conn.lingering = False
        else:
            del self._conns[conn]
            self.admission.release(conn)
        conn.closed = True
        conn.handler = None                    # its bound method: a cycle, freed at once
        if linger and not conn.tls and len(self._lingering) < BUSY_BACKLOG:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
                conn.closed = False
                conn.events = 0
                self._linger(conn)
                self._stop_when_idle()
                return
        if not conn.tls and not conn.inbuf.endswith(b"\n"):
            # The peer may have sent more than we read: read it, so close() sends no RST
            # that could destroy the answer before the peer reads it.
            with contextlib.suppress(OSError):
                conn.sock.recv(RECV_SIZE)
        conn.sock.close()
        if self.stopping:
            self._stop_when_idle()


class Admission:
    """Which new connections a listener serves: at most `max_connections` open, each within
    the per-client `limits` (a ClientLimits, or None).  A refused request is still read
    before its refusal is sent (closing at once would reset the answer), BUSY_BACKLOG of
    them at once; beyond that, and on session listeners, a refused connection is turned
    away at once.  Running out of file descriptors is logged once per streak."""

    def __init__(self, name, max_connections, limits):
        self.name, self.max_connections, self.limits = name, max_connections, limits
        self.busy = 0                  # connections being refused, their request read
        self.out_of_descriptors = False
        self._shortage = LogStreak(name)

    def refusal(self, open_connections, peer):
        """None to serve a new connection, else (the reason, the outcome) that refuses it:
        over the connection cap, or over the client's limits (a `peer` of None: not yet
        known, the cap only)."""
        if open_connections - self.busy >= self.max_connections:
            return SERVER_BUSY, "busy"
        return None if peer is None else self.client_refusal(peer)

    def client_refusal(self, peer):
        """None when the client's limits admit a connection (release() it when it closes),
        else the (reason, outcome) that refuses it."""
        refused = self.limits.admit(peer) if self.limits is not None else None
        if refused == "per-client connections":
            return TOO_MANY_CONNECTIONS, refused
        if refused is not None:
            return TOO_MANY_REQUESTS, refused
        return None

    def turn_away_now(self, refusal, sessions):
        """Whether a refused connection goes at once, unread."""
        return refusal is not None and (sessions or self.busy >= BUSY_BACKLOG)

    def release(self, conn):
        """A connection closes: what admitting it took is given back."""
        if conn.refusal is not None:
            self.busy -= 1
        elif self.limits is not None and not conn.awaiting_proxy:
            self.limits.release(conn.peer)

    def descriptors_short(self, open_connections):
        self.out_of_descriptors = True
        self._shortage.report("%s: out of file descriptors with %d connections open; new "
                              "clients wait until some close", self.name, open_connections)

    def descriptors_back(self):
        self.out_of_descriptors = False
        lasted = self._shortage.end()
        if lasted is not None:
            log.info("%s: accepting again after %.1f s out of file descriptors", self.name,
                     lasted)


class _Client:
    """What ClientLimits knows of one client: its open connections, and the TokenBucket of
    its requests (None: no rate limit) for the `rate` it was made for."""
    __slots__ = ("open", "bucket", "rate")

    def __init__(self):
        self.open, self.bucket, self.rate = 0, None, 0


class ClientLimits:
    """Fairness between clients on one listener: per client address (IPv6: its /64),
    at most `connections` open at once and `rate` requests a second (a TokenBucket holding
    2 x rate); 0 turns either off.  Addresses in `exempt` (networks; by default loopback: local
    users and a proxy on this machine) are not limited.  The table of addresses is bounded
    (MAX_CLIENT_TABLE; the least recently seen idle ones go first).  Each address over a
    limit is logged once per CLIENT_EPISODE seconds, not per connection.  Thread-safe."""

    def __init__(self, name, connections=DEFAULT_PER_CLIENT_CONNECTIONS,
                 rate=DEFAULT_PER_CLIENT_RATE, exempt=DEFAULT_PER_CLIENT_EXEMPT):
        self.name = name
        self._clients = {}             # key -> _Client, the most recently seen last
        self._keys = {}                # host -> its key ('' when exempt), bounded likewise
        self._lock = threading.Lock()
        self._over = LogStreak(name, episode=CLIENT_EPISODE)
        self.configure(connections, rate, exempt)

    def admit(self, peer):
        """A new connection from `peer` (host, port): None, or why it is refused
        ("per-client connections" or "per-client rate"); an admitted one must be
        release()d when it closes."""
        return self._take(peer, opening=True)

    def request(self, peer):
        """One more request on an open connection: None, or "per-client rate"."""
        return self._take(peer, opening=False)

    def release(self, peer):
        key = self._key(peer)
        if key is None:
            return
        with self._lock:
            client = self._clients.get(key)
            if client is not None and client.open > 0:
                client.open -= 1

    def configure(self, connections, rate, exempt):
        """New limits (also on SIGHUP with --config); the counts of open connections stay."""
        import ipaddress
        with self._lock:
            self.connections, self.rate = connections, rate
            self.active = bool(connections or rate)      # else every client is let through
            self.exempt = [ipaddress.ip_network(net, strict=False) for net in exempt]
            self._keys.clear()

    def _take(self, peer, opening):
        key = self._key(peer)
        if key is None:
            return None
        with self._lock:
            client = self._clients.pop(key, None)
            if client is None:
                client = _Client()
                if len(self._clients) >= MAX_CLIENT_TABLE:
                    self._forget_idle()
            self._clients[key] = client
            if client.rate != self.rate:               # new, or the limits changed
                client.rate = self.rate
                client.bucket = TokenBucket(2.0 * self.rate, 1.0 / self.rate) \
                    if self.rate else None
            if opening and self.connections and client.open >= self.connections:
                refused = "per-client connections"
            elif client.bucket is not None and not client.bucket.take():
                refused = "per-client rate"
            else:
                client.open += opening
                return None
        self._over.report("%s: client %s over its limit (%s); refused, and not logged again "
                          "for %d s", self.name, key, refused, CLIENT_EPISODE, key=key)
        return refused

    def _forget_idle(self):
        """Make room: the least recently seen clients with no connection open go."""
        for key in [key for key, client in self._clients.items() if not client.open][
                :max(len(self._clients) // 4, 1)]:
            del self._clients[key]
        if len(self._clients) >= MAX_CLIENT_TABLE:       # all busy: forget the oldest
            for key in list(self._clients)[:len(self._clients) // 4]:
                del self._clients[key]

    def _key(self, peer):
        """The address a client is counted under, or None when it is not limited."""
        if type(peer) is not tuple or not self.active:
            return None
        key = self._keys.get(peer[0])
        if key is None:
            key = self._key_of(peer[0])
            if len(self._keys) >= MAX_CLIENT_TABLE:
                self._keys.clear()
            self._keys[peer[0]] = key
        return key or None

    def _key_of(self, host):
        """'a.b.c.d', or an IPv6 /64 as 'aaaa:bbbb:cccc:dddd::/64'; '' when exempt."""
        try:
            address = _plain_address(host)          # ::ffff:a.b.c.d counts as a.b.c.d
        except ValueError:
            return ""
        if any(address in net for net in self.exempt):
            return ""
        return str(address) if address.version == 4 else address.exploded[:19] + "::/64"


# -- the PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2) ---------------------

PROXY_V1_MAX = 107                # bytes of a version 1 header, CRLF included
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_MAX = 16 + 4096          # bytes of a version 2 header we take (addresses and TLVs)
PROXY_STARTS = (b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", PROXY_V2_SIGNATURE)


class ProxyHeaders:
    """Who may put a PROXY header in front of a connection: `networks` (CIDR strings; the
    load balancers).  From them a header is required; from anyone else it is refused (the
    connection dropped), never taken."""

    def __init__(self, networks):
        import ipaddress
        self.networks = [ipaddress.ip_network(net, strict=False) for net in networks]

    def expected_from(self, peer):
        """Whether `peer` ((host, port)) is a balancer that must send a header first."""
        if type(peer) is not tuple:
            return False
        try:
            address = _plain_address(peer[0])
        except ValueError:
            return False
        return any(address in net for net in self.networks)


def parse_proxy_header(data):
    """The PROXY header at the start of `data` (bytes): None while it is incomplete, else
    (its length, the client's (host, port), or None for a LOCAL connection or an unknown
    family: the balancer itself, health checks).  ValueError when it is no such header."""
    if data[:len(PROXY_V2_SIGNATURE)] == PROXY_V2_SIGNATURE[:len(data)]:
        return _proxy_v2(data)
    if data[:6] != b"PROXY "[:len(data)]:
        raise ValueError("no PROXY header")
    return _proxy_v1(data)


def _proxy_v2(data):
    """parse_proxy_header for the binary version 2."""
    import ipaddress
    if len(data) < 16:
        return None
    version, command, family = data[12] >> 4, data[12] & 15, data[13]
    length = 16 + int.from_bytes(data[14:16], "big")
    if version != 2 or command > 1 or length > PROXY_V2_MAX:
        raise ValueError("a PROXY version 2 header we do not take")
    if len(data) < length:
        return None
    body = data[16:length]
    if command == 0 or family >> 4 not in (1, 2) or family & 15 != 1:
        return length, None                       # LOCAL, or not TCP over IP
    size = 4 if family >> 4 == 1 else 16
    if len(body) < 2 * size + 4:
        raise ValueError("a PROXY version 2 header too short for its addresses")
    host = ipaddress.ip_address(body[:size])
    return length, (str(host), int.from_bytes(body[2 * size:2 * size + 2], "big"))


def _proxy_v1(data):
    """parse_proxy_header for the text version 1: "PROXY TCP4|TCP6 SRC DST SPORT DPORT"."""
    import ipaddress
    end = data.find(b"\r\n", 0, PROXY_V1_MAX)
    if end < 0:
        if len(data) >= PROXY_V1_MAX:
            raise ValueError("a PROXY version 1 header longer than %d bytes" % PROXY_V1_MAX)
        return None
    if re.search(rb"[^\x20-\x7e]", data[:end]):
        raise ValueError("a PROXY version 1 header with a control or non-ASCII character")
    words = data[:end].decode("ascii").split(" ")
    if words[1:2] == ["UNKNOWN"]:
        return end + 2, None
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6") or not all(
            word.isdigit() and word.isascii() and int(word) < 65536 for word in words[4:]):
        raise ValueError("a malformed PROXY version 1 header")
    try:
        if "%" in words[2] + words[3]:                 # a zone is no client's address
            raise ValueError
        host = ipaddress.ip_address(words[2])
        ipaddress.ip_address(words[3])
    except ValueError:
        raise ValueError("a PROXY version 1 header with a bad address") from None
    if host.version != (4 if words[1] == "TCP4" else 6):
        raise ValueError("a PROXY version 1 header whose address is not %s" % words[1])
    return end + 2, (str(host), int(words[4]))


def read_proxy_header(sock, received):
    """Take a balancer's PROXY header from `sock`, and not a byte past it (a TLS handshake
    may follow); `received` is what came of it before.  -> (what has come of it, None)
    while it is incomplete, or (b"", parse_proxy_header's answer) once it is whole.
    BlockingIOError: nothing is here yet; ValueError: it is no PROXY header, or the peer
    closed before it was whole."""
    peeked = sock.recv(PROXY_V2_MAX - len(received), socket.MSG_PEEK)
    if not peeked:
        raise ValueError("closed before its PROXY header")
    header = parse_proxy_header(received + peeked)
    received += sock.recv(len(peeked) if header is None else header[0] - len(received))
    return (received, None) if header is None else (b"", header)


# -- the transport: a non-blocking socket, plain or TLS, for both sides --------------------

class Transport:
    """A connected non-blocking socket, plain or TLS: accepted connections are one, and the
    IRC bot's connection holds one.  recv() -> the bytes here (b'' at the peer's end) or
    None when none are here yet; send(data) -> how many bytes the socket took (0 when it is
    full; `data` may be a list of chunks, sent in one call on a plain socket); after
    start_tls(), handshake() -> 0 once it is done, or the selector events it waits for.
    OSError (ssl.SSLError too) is the peer's trouble, for the caller to handle."""

    __slots__ = ("sock", "tls", "_would_block")

    def __init__(self, sock):
        self.sock, self.tls = sock, False
        self._would_block = (BlockingIOError, InterruptedError)

    def start_tls(self, context, **wrap_options):
        import ssl
        self.sock = context.wrap_socket(self.sock, do_handshake_on_connect=False,
                                        **wrap_options)
        self.tls = True
        self._would_block = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                             ssl.SSLWantWriteError)

    def handshake(self):
        import ssl
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            return selectors.EVENT_WRITE
        return 0

    def recv(self):
        try:
            data = self.sock.recv(RECV_SIZE)
        except self._would_block:
            return None
        while self.tls and self.sock.pending():      # the rest of a TLS record, decrypted
            data += self.sock.recv(self.sock.pending())
        return data

    def send(self, data):
        """TLS is given one record's worth at a time: Python's TLS send takes a buffer whole
        or not at all, and a large answer would show no progress to a deadline until its
        last byte."""
        try:
            if type(data) is list:
                if len(data) > 1:
                    return self.sock.sendmsg(data)
                data = data[0]
            return self.sock.send(data[:TLS_SEND_SIZE] if self.tls else data)
        except self._would_block:
            return 0

_REFUSING_TLS = []                 # a TLS server context with no certificate, made on first use


def _refuse_tls(sock):
    """Refuse a client of the TLS port the way TLS does: a context without a certificate
    fails the handshake with an alert, if the ClientHello is already here (we do not wait
    for it).  `sock` (non-blocking) stays open."""
    import ssl
    if not _REFUSING_TLS:
        _REFUSING_TLS.append(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    copy = socket.socket(fileno=os.dup(sock.fileno()))
    copy.setblocking(False)              # else ssl retries a handshake with no data forever
    tls = _REFUSING_TLS[0].wrap_socket(copy, server_side=True, do_handshake_on_connect=False)
    try:
        tls.do_handshake()
    except (OSError, ValueError):             # ssl.SSLError is an OSError
        pass
    finally:
        tls.close()


# -- connections: a request, or a session -------------------------------------------------

class Connection(Transport):
    """One accepted connection of a TCPService.  Its state is `handler`, what its socket's
    next readiness calls: the PROXY header, the TLS handshake, then its request or session
    (the subclasses), or lingering once turned away; `working` while a worker has its
    request, `closed` at the end.  Subclasses give start() (the peer is known and its TLS
    done), expired() (its deadline passed) and answer_coming() (for a stop)."""

    __slots__ = ("service", "peer", "inbuf", "outbuf", "deadline", "started", "handler",
                 "refusal", "awaiting_proxy", "events", "working", "lingering", "closed",
                 "session")

    def __init__(self, service, sock, peer, refusal=None):
        Transport.__init__(self, sock)
        self.service, self.peer = service, peer
        self.refusal = refusal         # (text, outcome): its request is read, then refused
        self.awaiting_proxy = False    # its PROXY header has yet to come
        self.inbuf = b""
        self.outbuf = b""
        self.deadline = None           # its Timer, made when it first has to wait
        self.started = time.monotonic()
        self.handler = None
        self.events = 0                # what the loop watches it for
        self.working = self.lingering = self.closed = False
        self.session = None            # a SessionConnection's, once it starts

    def begin(self, mask=None):
        """The peer is known: the TLS handshake, then start()."""
        context = self.service.tls_context
        if context is None:
            self.start()
            return
        self.service.loop.watch(self.sock, 0)          # the TLS socket takes it over
        self.events = 0
        self.start_tls(context, server_side=True)
        self.handler = self.shake_hands
        self.shake_hands()

    def shake_hands(self, mask=None):
        try:
            wanted = self.handshake()
        except (OSError, ValueError) as error:           # ssl.SSLError is an OSError
            self.service.warnings.report("%s %s: connection dropped: %s", self.service.name,
                                         format_peer(self.peer), str(error)[:MAX_ERROR_SHOWN])
            self.service.drop(self)
            return
        if wanted:
            self.service.wait(self, wanted)
        else:
            self.start()

    def read_proxy(self, mask=None):
        """A balancer's PROXY header: once whole, the client it names (or, for the
        balancer's own checks, the balancer) is the peer, and the connection begins."""
        service = self.service
        try:
            self.inbuf, header = read_proxy_header(self.sock, self.inbuf)
        except (BlockingIOError, InterruptedError):
            service.wait(self, selectors.EVENT_READ)
            return
        except ValueError as error:
            service.warnings.report("%s %s: dropped: %s", service.name,
                                    format_peer(self.peer), error)
            service.protocol.count("bad proxy header")
            service.drop(self)
            return
        except OSError:
            service.drop(self)
            return
        if header is None:
            service.wait(self, selectors.EVENT_READ)
        else:
            service.proxied(self, header[1] or self.peer)

    def linger(self, mask=None):
        try:
            data = self.recv()
        except OSError:
            data = b""
        if data == b"":
            self.service.drop(self)

    def start(self):
        raise NotImplementedError

    def expired(self):
        """Its deadline passed: what arrived is logged as a timeout, and it closes."""
        self.service.log(self, self.inbuf[:MAX_QUERY_BYTES], "timeout")
        self.service.drop(self)

    def answer_coming(self):
        """Whether an answer is on its way (a stop lets it finish)."""
        return self.working or bool(self.outbuf)


class RequestConnection(Connection):
    """A connection of a RequestProtocol: its request is read, answered (here, or in the
    worker pool when it may block), sent, and the connection closes."""

    __slots__ = ()

    def start(self):
        """Clients send the request as soon as they are connected, so it is usually here
        already: answered now, the connection never enters the selector."""
        self.handler = self.read
        self.read()

    def read(self, mask=None):
        service = self.service
        try:
            data = self.recv()
        except OSError:
            service.drop(self)
            return
        if data is None:
            service.wait(self, selectors.EVENT_READ)
            return
        self.inbuf += data
        if service.proxy_headers is not None and self.inbuf.startswith(PROXY_STARTS):
            service.warnings.report("%s %s: dropped: a PROXY header from an address not in "
                                    "%s", service.name, format_peer(self.peer),
                                    option_of_field("proxy_headers"))
            service.log(self, self.inbuf[:80], "proxy header refused")
            service.drop(self)
            return
        try:
            request = service.protocol.parse(self.inbuf, not data)
        except RequestError as error:
            service.log(self, self.inbuf[:80], error.outcome)
            self.reply(format_reply(error.reply))
            return
        if request is None:
            if data:
                service.wait(self, selectors.EVENT_READ)
            else:
                service.drop(self)
        elif self.refusal is not None:
            service.log(self, request, self.refusal[1])
            self.reply(format_reply(self.refusal[0]))
        elif service.protocol.needs_worker(request):
            if not service.in_worker(self, service.protocol.respond, (request, self.peer),
                                     functools.partial(self.answered, request)):
                service.log(self, request, "busy")
                self.reply(format_reply(SERVER_BUSY))
        else:
            reply, outcome = service.protocol.respond(request, self.peer)
            service.log(self, request, outcome)
            self.reply(reply)

    def answered(self, request, future):
        """A worker's answer is back (in the loop thread)."""
        service = self.service
        if self.closed:
            return
        self.working = False
        try:
            reply, outcome = future.result()
        except Exception:
            log.exception("%s: answering %r failed", service.name, request)
            reply, outcome = format_reply(INTERNAL_ERROR), "error"
        service.log(self, request, outcome)
        try:
            self.reply(reply)
        except Exception:
            log.exception("%s %s: dropped after an error", service.name, format_peer(self.peer))
            service.drop(self)

    def reply(self, data):
        """Send a reply and close; what the socket does not take now waits for EVENT_WRITE."""
        try:
            sent = self.send(data)
        except OSError:
            self.service.drop(self)
            return
        if sent == len(data):
            self.service.drop(self)
            return
        self.outbuf = memoryview(data)[sent:]        # a long answer is not copied each time
        self.handler = self.write
        self.service.wait(self, selectors.EVENT_WRITE, self.service.timeout)

    def write(self, mask=None):
        self.reply(self.outbuf)


class SessionConnection(Connection):
    """A connection of a SessionProtocol: it stays open, its Session fed what arrives and
    its answers queued in `outbuf` (memoryviews); with a back-end that may block, every
    feed runs in the worker pool (the connection is not read meanwhile, so its data stays
    in order).  Its deadline runs from its last whole message."""

    __slots__ = ()

    def start(self):
        service = self.service
        self.session = service.protocol.new_session(self.peer)
        self.outbuf = []
        self.handler = self.ready
        service.set_deadline(self)
        self.output(self.session.greeting())

    def ready(self, mask):
        if mask & selectors.EVENT_WRITE and self.outbuf:
            self.write()
            return
        try:
            data = self.recv()
        except OSError:
            data = b""
        if data is None:
            return
        if not data:
            self.service.drop(self)
        elif self.service.protocol.blocking:
            self.feed_in_worker(self.session.feed, data)
        else:
            self.fed(self.run(self.session.feed, data))

    def expired(self):
        if self.session is not None and self.session.idle and not self.outbuf:
            self.service.drop(self)            # an idle session: no timeout
        else:
            super().expired()

    def answer_coming(self):
        return self.working or bool(self.outbuf) or (self.session is not None
                                                     and self.session.pending)

    def feed_in_worker(self, method, *args):
        """Run a session's method in the pool; its deadline waits meanwhile (the time is the
        server's, not the peer's).  With every worker busy, the session answers busy()
        instead, or the connection is dropped."""
        if self.service.in_worker(self, self.run, (method,) + args,
                                  lambda future: self.fed(future.result())):
            if self.deadline is not None:
                self.deadline.cancel()
            return
        answer = self.session.busy()
        if answer is not None:
            self.fed(answer)
            return
        self.service.warnings.report("%s %s: dropped: every worker is busy",
                                     self.service.name, format_peer(self.peer))
        self.service.drop(self)

    def run(self, method, *args):
        """The session's reply, or None when it refused the data (logged)."""
        if self.closed:                        # dropped while this job waited
            return None
        try:
            return method(*args)
        except Exception as error:
            self.service.warnings.report("%s %s: dropped: %s", self.service.name,
                                         format_peer(self.peer), str(error)[:MAX_ERROR_SHOWN])
            return None

    def fed(self, reply):
        if self.closed:
            self.session.close()               # dropped while it was fed in a worker
            return
        was_working, self.working = self.working, False
        if reply is None:
            self.service.drop(self)
            return
        if self.session.idle or was_working:
            self.service.set_deadline(self)
        self.output(reply)

    def output(self, data):
        """Queue `data` (bytes, or a list of them: a body kept elsewhere, such as the users
        page, is sent from where it is, never copied) and send what the socket takes now;
        the rest waits for EVENT_WRITE, and the connection is not read meanwhile.  A peer
        that leaves more than the protocol's max_output unread is dropped."""
        self.outbuf.extend(memoryview(chunk) for chunk in (
            data if isinstance(data, list) else [data]) if chunk)
        limit = self.service.protocol.max_output
        if limit is not None and sum(map(len, self.outbuf)) > limit:
            self.service.warnings.report("%s %s: dropped: it does not read its answers",
                                         self.service.name, format_peer(self.peer))
            self.service.drop(self)
        else:
            self.write()

    def write(self):
        progress = False
        outbuf = self.outbuf
        while outbuf:
            chunks = outbuf[:SEND_CHUNKS] if not self.tls else outbuf[:1]
            try:
                sent = self.send(chunks)
            except OSError:
                self.service.drop(self)
                return
            progress = progress or sent > 0
            taken = sent
            while outbuf and taken >= len(outbuf[0]):
                taken -= len(outbuf.pop(0))
            if taken:
                outbuf[0] = outbuf[0][taken:]
            if sent < sum(map(len, chunks)):
                break                                # the socket is full
        if not outbuf:
            self.drained()
            return
        if progress:
            self.service.set_deadline(self)          # it takes its answer: time for the rest
        self.service.wait(self, selectors.EVENT_WRITE)

    def drained(self):
        """Everything is sent: close, answer the messages it holds, or read again."""
        session = self.session
        if session.closing:
            self.service.drop(self, linger=True)
        elif session.pending:
            if session.slow:
                self.feed_in_worker(session.resume)
            else:
                self.fed(self.run(session.resume))
        elif self.service.stopping:
            self.service.drop(self)
        else:
            self.service.wait(self, selectors.EVENT_READ)


# == 5. Finger and the setter: the tutorial's first front-ends ================================

class FingerProtocol(RequestProtocol):
    """RFC 1288 on top of a UserDatabase: turns a query line into a reply.

    Used by the event loop (TCPService) and by inetd mode alike; knows nothing about sockets.
    The empty query {C} is refused when the database is not `listable`; forwarding {Q2}
    is refused unless a `forwarder` is given.  With `forward_all_to` (the proxy) every
    query is forwarded, those without @host to that host."""

    name = "finger"
    max_request = MAX_QUERY_BYTES

    def __init__(self, db, forwarder=None, forward_all_to=None):
        super().__init__()
        self.db = db
        self.forwarder = forwarder
        self.forward_all_to = forward_all_to
        self._replies = VersionedCache(MAX_REPLY_CACHE_BYTES)   # query line -> answer
        self._lists = VersionedCache()                          # verbose -> the list

    @staticmethod
    def log_text(line):
        """What the query log shows of a request: the query line."""
        return line

    def needs_worker(self, line):
        """Whether answering `line` may block (a slow back-end, or a forwarded query) or
        take long: the list (a large one is built once per version, off the loop), and a
        query of several names (up to MAX_QUERY_NAMES long statuses, never remembered)."""
        if self._replies.get(getattr(self.db, "version", None), line) is not None:
            return False                   # remembered: answered without the back-end
        words = line.split()
        several_names = len(words) > (2 if words and words[0].upper() == b"/W" else 1)
        return self.db.blocking or several_names or self.forwarder is not None and (
            self.forward_all_to is not None or b"@" in line) or (
            self.db.listable and line.strip().upper() in (b"", b"/W"))

    def parse(self, data, eof):
        """Bytes received so far -> the query line (bytes, without its CRLF or LF), or None
        while it is incomplete.  A line over `max_request` bytes is refused."""
        end = data.find(b"\n", 0, self.max_request + 2)
        if end >= 0:
            line = data[:end - 1] if data[end - 1:end] == b"\r" else data[:end]
        elif len(data) > self.max_request + 1:
            raise RequestError(QUERY_TOO_LONG, "too long")
        else:
            line = data if eof and data else None
        if line is not None and len(line) > self.max_request:
            raise RequestError(QUERY_TOO_LONG, "too long")
        return line

    def respond(self, line, peer=None):
        """A query line (bytes) -> (reply bytes, outcome word for the log).

        Answers from a database with a `version` (memory, file) are remembered until the
        version changes: most queries are the same few names.  Answers to one name, of
        MAX_CACHED_REPLY bytes at most and MAX_REPLY_CACHE_BYTES in all; and the list, in
        its short and long form, whatever its size."""
        version = getattr(self.db, "version", None)
        known = self._replies.get(version, line)
        if known is not None:
            return known
        query = parse_query(line.decode("utf-8", "replace"))
        listing = not query.names and not query.hosts and not self.forward_all_to
        if listing:
            known = self._lists.get(version, query.verbose)
            if known is not None:
                return known
        try:
            text, outcome = self.answer(query)
        except Exception:
            log.exception("back-end failed answering %r", line)
            text, outcome = INTERNAL_ERROR, "error"
        answer = text if isinstance(text, bytes) else format_reply(text), outcome
        if version is None or version != self.db.version:
            pass                              # no version, or it changed meanwhile
        elif outcome == "list" and listing:
            self._lists.put(version, query.verbose, answer)
        elif (outcome in ("ok", "unknown") and len(query.names) == 1
                and len(answer[0]) <= MAX_CACHED_REPLY):
            self._replies.put(version, line, answer, len(line) + len(answer[0]))
        return answer

    def answer(self, query):
        """A Query -> (reply text, or reply bytes already formatted, outcome)."""
        if query.hosts or self.forward_all_to:
            if self.forwarder is None:
                return FORWARDING_DENIED, "denied"
            return self.forwarder.forward(query, self.forward_all_to)
        if not query.names:
            try:
                return self._lines(self.db.public_users(), query.verbose), "list"
            except ListRefused:
                return LIST_DENIED, "denied"
        if len(query.names) == 1:
            status = self._lookup(query.names[0], query.verbose)
            return (NO_SUCH_USER, "unknown") if status is None else (status, "ok")
        if len(query.names) > MAX_QUERY_NAMES:
            return QUERY_TOO_MANY, "too many"
        return self._lines(query.names, query.verbose), "ok"

    def _lookup(self, name, verbose):
        return self.db.get_user_verbose(name) if verbose else self.db.get_user(name)

    def _lines(self, names, verbose):
        """One 'user  status' line per name, as reply bytes, formatted REPLY_CHUNK_LINES lines
        at a time: a list of a million users takes no single long step."""
        chunks, lines = [], []
        for name in names:
            status = self._lookup(name, verbose)
            lines.append("%s  %s" % (name, NO_SUCH_USER if status is None else status))
            if len(lines) == REPLY_CHUNK_LINES:
                chunks.append(format_reply("\n".join(lines)))
                lines = []
        if lines or not chunks:
            chunks.append(format_reply("\n".join(lines)))
        return b"".join(chunks)


class SetterProtocol(RequestProtocol):
    """The tutorial's FingerSetterProtocol: the peer sends a user line and a status line and
    closes its side; with exactly two lines the status is set.  One line answers: OK or why
    not.  With `check_identity` (the unix socket), peers may set only their own status,
    except root.  A new user is added only while the database has fewer than `max_users`,
    and no set grows the users file past `max_bytes` (0: no limit, for either), so a client
    cannot grow the users file without bound; a set that does not grow it always works."""

    name = "setter"
    max_request = MAX_SETTER_BYTES

    def __init__(self, db, max_status=DEFAULT_MAX_STATUS, check_identity=False,
                 max_users=DEFAULT_MAX_USERS, max_bytes=DEFAULT_MAX_USERS_BYTES):
        super().__init__()
        self.db = db
        self.max_status = max_status
        self.check_identity = check_identity
        self.max_users = max_users
        self.max_bytes = max_bytes

    def parse(self, data, eof):
        """Everything the peer sent, once it has closed its side; None until then."""
        if len(data) > self.max_request:
            raise RequestError("Too much: send a user line and a status line", "too long")
        return data if eof else None

    @staticmethod
    def log_text(data):
        """What the query log shows of a request: the user line, never the status."""
        return data.partition(b"\n")[0].strip()

    def respond(self, data, peer=None):
        lines = data.decode("utf-8", "replace").split("\n")
        if lines[-1] == "":
            lines.pop()                    # the line end of the last line
        if len(lines) != 2:
            return format_reply("Expected two lines: a user, then a status"), "bad request"
        name, status = lines[0].strip(), clean_status(lines[1])   # clean_status drops a CR
        if not valid_user_name(name):
            return format_reply("Bad user name: letters, digits, '.', '_' and '-', at most "
                                "%d" % MAX_USER_NAME), "bad request"
        if name in RESERVED_NAMES:
            return format_reply("Reserved name: the web site serves /%s itself" % name), \
                "bad request"
        if len(status) > self.max_status:
            return format_reply("Status too long: at most %d characters"
                                % self.max_status), "bad request"
        if self.check_identity and not self._may_set(peer, name):
            return format_reply("Permission denied: you may set only your own status"), \
                "denied"
        if (self.max_users and self.db.count() >= self.max_users
                and self.db.get_user(name) is None):
            return format_reply("Too many users: at most %d; a status can be set only for "
                                "users there are" % self.max_users), "too many users"
        try:
            if self.max_bytes and self._grows_past_max_bytes(name, status):
                return format_reply("Users file full: at most %d bytes; a shorter status, or "
                                    "one for a user there is, may still fit"
                                    % self.max_bytes), "too many bytes"
            self.db.set_user(name, status)
        except OSError as error:
            log.error("setting the status of %r failed: %s", name, error)
            return format_reply("Could not save the status: %s" % error.strerror), "error"
        except FingerError as error:                  # a read-only back-end
            return format_reply("Could not save the status: %s" % error), "error"
        except Exception:
            log.exception("setting the status of %r failed", name)
            return format_reply(INTERNAL_ERROR), "error"
        log.info("setter: %s set the status of %s", format_peer(peer), name)
        return b"OK\r\n", "set"

    @staticmethod
    def needs_worker(data):
        return True            # setting may write the users file (fsync): off the loop

    def _grows_past_max_bytes(self, name, status):
        sizes = self.db.stored_bytes(name, status)
        return sizes is not None and sizes[1] > max(sizes[0], self.max_bytes)

    @staticmethod
    def _may_set(peer, name):
        if peer is None:
            return False
        if peer.uid == 0:
            return True
        try:
            return pwd.getpwuid(peer.uid).pw_name == name
        except KeyError:
            return False


def serve_inetd(protocol, timeout=DEFAULT_TIMEOUT, infd=0, outfd=1):
    """Answer one request read from `infd` (a socket or a pipe) on `outfd`, as inetd, xinetd
    and systemd's Accept=yes expect; returns the outcome word."""
    started = time.monotonic()
    deadline = started + timeout
    data = b""
    request = None
    outcome = "timeout"
    reply = b""
    try:
        while request is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selectors_wait(infd, remaining):
                break
            chunk = os.read(infd, RECV_SIZE)
            data += chunk
            request = protocol.parse(data, not chunk)
            if not chunk:
                break
        if request is not None:
            reply, outcome = protocol.respond(request)
    except RequestError as error:
        reply, outcome = format_reply(error.reply), error.outcome
    view = memoryview(reply)
    while view:
        view = view[os.write(outfd, view):]
    query_log.record(protocol.name + " inetd", "stdin",
                     protocol.log_text(data[:MAX_QUERY_BYTES] if request is None else request),
                     outcome if data else "closed", started)
    return outcome


def selectors_wait(fd, timeout):
    """True when `fd` becomes readable within `timeout` seconds: the one-shot wait of
    --inetd and of a command back-end's output.  A regular file (stdin redirected from one)
    is always readable, and epoll refuses it."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return True
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        return bool(selector.select(timeout))


# == 6. Observability: the query log, warnings, latency, /metrics =============================

_LOG_FIELD = dict(_CARET)          # a field of a query log line: one line, in quotes
_LOG_FIELD.update({ord("\n"): "^J", ord("\t"): "^I", ord('"'): '\\"', ord("\\"): "\\\\"})


class QueryLog:
    """One line per query, for every listener (--log-queries): off by default, as bsd
    in.fingerd logs queries only with -l; who asked for whom is a privacy matter.

    `record()` is what a front-end calls for each answer: when off, one attribute test;
    when on, the line is formatted at once (text, defanged, the request in quotes) and
    queued.  A writer thread writes the queue in batches, at least every FLUSH_INTERVAL
    seconds and at stop, so a slow disk never holds up a loop; past MAX_BACKLOG queued
    lines the new ones are counted and dropped.  Lines go where the log goes: appended as
    one write to a stream or file handler, one record each to any other handler (syslog)."""

    FLUSH_INTERVAL = 1.0
    MAX_BACKLOG = 100000

    def __init__(self):
        self.enabled = False
        self.dropped = 0
        self._queue = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = None
        self._flush_lock = threading.Lock()

    def record(self, service, peer, request, outcome, started=None):
        """Queue `service peer "request" outcome [N.Nms]`; `request` is bytes or text from
        the peer (defanged here), `started` a time.monotonic() for the time taken."""
        if not self.enabled:
            return
        if type(request) is bytes:
            request = request.decode("utf-8", "replace")
        if type(peer) is tuple:                   # inline format_address: it is per query
            peer = ("[%s]:%d" if ":" in peer[0] else "%s:%d") % peer[:2]
        else:
            peer = str(peer).translate(_LOG_FIELD)
        now = time.monotonic()                    # made a time of day when written
        if started is None:
            line = '%s %s "%s" %s' % (service, peer, request.translate(_LOG_FIELD), outcome)
        else:
            line = '%s %s "%s" %s %.1fms' % (service, peer, request.translate(_LOG_FIELD),
                                             outcome, (now - started) * 1000)
        if len(self._queue) < self.MAX_BACKLOG:
            self._queue.append((now, line))
        else:
            self.dropped += 1

    def start(self):
        """Turn the log on and start the writer thread."""
        self.enabled = True
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._write_forever, daemon=True,
                                            name="finger-query-log")
            self._thread.start()

    def stop(self):
        """Stop the writer thread and write what is queued."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join()
        self.flush()

    def _write_forever(self):
        while not self._stopping:
            self._wake.wait(self.FLUSH_INTERVAL)
            self._wake.clear()
            try:
                self.flush()
            except Exception:     # never let one bad write end the query log
                log.exception("writing the query log failed")

    def flush(self):
        """Write every queued line now."""
        with self._flush_lock:
            queue, entries = self._queue, []
            for _ in range(len(queue)):
                entries.append(queue.popleft())
            dropped, self.dropped = self.dropped, 0
            if not entries and not dropped:
                return
            if dropped:
                log.warning("query log: %d lines dropped: the log destination is slower "
                            "than the queries", dropped)
            to_wall_clock = time.time() - time.monotonic()
            text = None
            for handler in log.handlers:
                if getattr(handler, "stream", None) is not None:    # a file or stderr
                    text = text or self._format(entries, to_wall_clock)
                    with handler.lock:
                        handler.stream.write(text)     # the stream of now (SIGHUP reopens)
                        handler.stream.flush()
                else:
                    for when, line in entries:
                        record = log.makeRecord(log.name, logging.INFO, "", 0, "%s", (line,),
                                                None)
                        record.created = when + to_wall_clock
                        record.msecs = (record.created - int(record.created)) * 1000
                        handler.handle(record)

    @staticmethod
    def _format(entries, to_wall_clock):
        """The lines as logging's default format writes them: one time stamp each."""
        second, stamp, lines = None, "", []
        for when, line in entries:
            when += to_wall_clock
            if int(when) != second:
                second = int(when)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            lines.append("%s,%03d INFO %s\n" % (stamp, (when - second) * 1000, line))
        return "".join(lines)


query_log = QueryLog()


class LogStreak:
    """The one way a kind of trouble is logged without flooding the log.  Reports come in
    streaks (per `key`, when given): a streak lasts `episode` seconds (None: until end()).
    In each, the first `per_streak` reports are logged at `level`, the others at
    `repeat_level` or, when that is None, only counted; `summary` (a format taking the
    name and the count), when given, tells that count once the streak is over.
    At most MAX_CLIENT_TABLE keys are remembered.  Thread-safe."""

    def __init__(self, name, per_streak=1, episode=None, level=logging.WARNING,
                 repeat_level=None, summary=None):
        self.name, self.per_streak, self.episode = name, per_streak, episode
        self.level, self.repeat_level, self.summary = level, repeat_level, summary
        self._streaks = {}                 # key -> [when it started, reports]
        self._lock = threading.Lock()

    def report(self, message, *args, key=None):
        """Log (or count) one occurrence; True when it started a streak."""
        now = time.monotonic()
        with self._lock:
            streak = self._streaks.get(key)
            over = streak is not None and self.episode is not None and \
                now - streak[0] >= self.episode
            if streak is None or over:
                if len(self._streaks) >= MAX_CLIENT_TABLE:
                    self._streaks.clear()
                self._streaks[key] = [now, 1]
                reports = 1
            else:
                streak[1] += 1
                reports = streak[1]
        if over:
            self._tell_unlogged(streak)
        if reports <= self.per_streak:
            log.log(self.level, message, *args)
        elif self.repeat_level is not None:
            log.log(self.repeat_level, message, *args)
        return reports == 1

    def in_streak(self, key=None):
        return key in self._streaks

    def end(self, key=None):
        """End the streak of `key`: the seconds it lasted, or None when there was none."""
        now = time.monotonic()
        with self._lock:
            streak = self._streaks.pop(key, None)
        if streak is None:
            return None
        self._tell_unlogged(streak)
        return now - streak[0]

    def clear(self):
        """End every streak (a new start: what goes wrong next is news again)."""
        with self._lock:
            streaks, self._streaks = self._streaks, {}
        for streak in streaks.values():
            self._tell_unlogged(streak)

    def _tell_unlogged(self, streak):
        unlogged = streak[1] - self.per_streak
        if unlogged > 0 and self.summary is not None and self.repeat_level is None:
            log.warning(self.summary, self.name, unlogged)


def warning_throttle(name):
    """The warnings one service logs about its peers (dropped connections, timeouts): at
    most MAX_WARNINGS_PER_SECOND a second, then a count: a peer cannot fill the disk."""
    return LogStreak(name, MAX_WARNINGS_PER_SECOND, episode=1.0,
                     summary="%s: %d more warnings like these in a second, not logged")


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)            # seconds: the bounds of /metrics' histogram


class LatencyHistogram:
    """How long a service took to answer, in LATENCY_BUCKETS (a Prometheus histogram).
    Thread-safe; observe() costs a bisect and two additions."""

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds):
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self.counts[index] += 1
            self.total += seconds

    def lines(self, name, service):
        """The _bucket, _sum and _count lines of `service`."""
        with self._lock:
            counts, total = list(self.counts), self.total
        lines, running = [], 0
        for bound, count in zip(LATENCY_BUCKETS + ("+Inf",), counts):
            running += count
            lines.append('%s_bucket{service="%s",le="%s"} %d' % (name, service, bound, running))
        return lines + ['%s_sum{service="%s"} %.6f' % (name, service, total),
                        '%s_count{service="%s"} %d' % (name, service, running)]


# Outcomes that are a connection turned away -> the reason /metrics gives.
REJECTIONS = {"busy": "cap", "per-client connections": "per-client connections",
              "per-client rate": "per-client rate", "timeout": "deadline",
              "bad proxy header": "bad proxy header",
              "proxy header refused": "proxy header refused"}
STARTED_AT = time.time()          # process_start_time_seconds (the module's import)


def render_metrics(group):
    """Prometheus text: requests by service and outcome, connections turned away by
    reason, a latency histogram per service, open connections, users loaded, the last
    load of the users and whether it worked, the process's figures and the build.  Never
    a series per user or per client address."""
    lines = ["# HELP finger_requests_total Requests answered, by service and outcome.",
             "# TYPE finger_requests_total counter"]
    for service in group:
        for outcome, count in sorted(service.counts.items(), key=str):
            lines.append('finger_requests_total{service="%s",outcome="%s"} %d'
                         % (service.name, outcome, count))
    lines += ["# HELP finger_rejected_total Connections and requests turned away, by "
              "service and reason.", "# TYPE finger_rejected_total counter"]
    for service in group:
        rejected = collections.Counter()
        for outcome, count in list(service.counts.items()):
            if outcome in REJECTIONS:
                rejected[REJECTIONS[outcome]] += count
        lines += ['finger_rejected_total{service="%s",reason="%s"} %d'
                  % (service.name, reason, count) for reason, count in sorted(rejected.items())]
    lines += ["# HELP finger_request_duration_seconds Time to answer, by service.",
              "# TYPE finger_request_duration_seconds histogram"]
    for service in group:
        if service.latency is not None:
            lines += service.latency.lines("finger_request_duration_seconds", service.name)
    lines += ["# HELP finger_open_connections Connections open now.",
              "# TYPE finger_open_connections gauge"]
    lines += ['finger_open_connections{service="%s"} %d' % (service.name,
                                                            service.open_connections())
              for service in group]
    for db in group.databases:
        loaded_at, ok = db.health()
        lines += ["# HELP finger_users Users the database lists.", "# TYPE finger_users gauge",
                  "finger_users %d" % db.count(),
                  "# HELP finger_last_reload_success Whether the last load of the users "
                  "worked.", "# TYPE finger_last_reload_success gauge",
                  "finger_last_reload_success %d" % ok]
        if loaded_at is not None:
            lines += ["# HELP finger_last_reload_timestamp_seconds When the users were last "
                      "loaded.", "# TYPE finger_last_reload_timestamp_seconds gauge",
                      "finger_last_reload_timestamp_seconds %.3f" % loaded_at]
    return "\n".join(lines + _process_metrics()) + "\n"


def _process_metrics():
    """The process's figures, named as Prometheus's client libraries name them."""
    times = os.times()
    lines = ["# HELP process_cpu_seconds_total User and system CPU time spent.",
             "# TYPE process_cpu_seconds_total counter",
             "process_cpu_seconds_total %.2f" % (times.user + times.system),
             "# HELP process_start_time_seconds When the process started (Unix time).",
             "# TYPE process_start_time_seconds gauge",
             "process_start_time_seconds %.3f" % STARTED_AT]
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        lines += ["# HELP process_resident_memory_bytes Resident memory size.",
                  "# TYPE process_resident_memory_bytes gauge",
                  "process_resident_memory_bytes %d" % resident]
    with contextlib.suppress(OSError):
        lines += ["# HELP process_open_fds Open file descriptors.",
                  "# TYPE process_open_fds gauge",
                  "process_open_fds %d" % len(os.listdir("/proc/self/fd"))]
    return lines + ["# HELP finger_build_info The version of finger.py and of Python.",
                    "# TYPE finger_build_info gauge",
                    'finger_build_info{version="%s",python="%s"} 1'
                    % (__version__, ".".join(map(str, sys.version_info[:3])))]


# == 7. The web site: HTML pages, JSON, XML-RPC at /RPC2, HTTPS ===============================

WEB_TIMEOUT = 10.0                # seconds a web request may take to arrive, and an idle

DEFAULT_WEB_MAX_CONNECTIONS = 4096  # open web connections; more get 503
WEB_PREWARM_USERS = 10000         # users at most for the users page to be made at start
HTTP_BATCH = 64 * 1024            # bytes of pipelined answers made before they are sent
MAX_RPC_BODY = 64 * 1024         # bytes of XML-RPC request (a call is tiny); more get 413
MAX_REQUEST_HEAD = 128 * 1024     # bytes of request line and headers; more get 431
API_PAGE = 1000                   # users in one /api/users answer unless ?limit= says
API_MAX_PAGE = 10000              # ... and at most, whatever ?limit= says
DEFAULT_HSTS = 365 * 24 * 3600    # Strict-Transport-Security max-age on HTTPS (one year)
WEB_CACHE = "public, max-age=30"  # statuses change at most every reload (30 s by default)
GZIP_MIN_BYTES = 1024             # bodies at least this long are gzipped for clients that ask
CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")

PAGE_CSS = ("body{font:1.05rem/1.5 system-ui,sans-serif;margin:0;background:#f6f6f2;"
            "color:#222}main{max-width:40rem;margin:0 auto;padding:1rem}"
            "h1{font-size:1.5rem;border-bottom:2px solid #ccc}ul{padding:0;list-style:none}"
            "li{padding:.4rem 0;border-bottom:1px solid #ddd}a{color:#0645ad}"
            "li,.status{white-space:pre-wrap;overflow-wrap:anywhere}.note{color:#666;"
            "font-size:.9rem}")
_PAGE = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
         '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
         '<title>%s</title><style>$css</style></head>\n<body><main>\n%s\n</main></body></html>\n')
DEFAULT_TEMPLATES = {
    "users.html": _PAGE % ("$title", '<h1>$title</h1>\n<ul>\n$users</ul>\n'
                           '<p class="note">$count users. Also as <a href="/api/users">JSON'
                           '</a> and XML-RPC at /RPC2.</p>'),
    "user.html": _PAGE % ("$user", '<h1>$user</h1>\n<p class="status">$status</p>\n'
                          '<p class="note"><a href="/">All users</a></p>'),
    "error.html": _PAGE % ("$title", '<h1>$title</h1>\n<p>$message</p>\n'
                           '<p class="note"><a href="/">All users</a></p>'),
}
TEMPLATE_FIELDS = {"users.html": ("title", "users", "count", "css"),
                   "user.html": ("user", "status", "css"),
                   "error.html": ("title", "message", "css")}


def load_templates(template_dir=None):
    """The page templates (string.Template), the built-in ones or users.html and user.html
    from `template_dir`; a missing or broken one is a FieldError naming the file."""
    from string import Template
    templates = {name: Template(text) for name, text in DEFAULT_TEMPLATES.items()}
    for name in ("users.html", "user.html") if template_dir else ():
        path = os.path.join(template_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                template = Template(f.read())
            template.substitute(dict.fromkeys(TEMPLATE_FIELDS[name], "x"))
        except OSError as error:
            raise FieldError("template_dir", "cannot read %s: %s" % (path, error.strerror)) \
                from None
        except (ValueError, KeyError) as error:
            raise FieldError("template_dir", "%s is broken: %s (placeholders: %s)" % (
                path, error, ", ".join("$" + f for f in TEMPLATE_FIELDS[name]))) from None
        templates[name] = template
    return templates


class WebResponse:
    """What the site answers: status code, content type, body bytes, extra headers.  Its
    entity tag and gzipped body are made on first use, once for a response that is kept
    (the users page and users' pages, per version of the users); so are `variants` (its
    forms for clients that do or do not take gzip, made by WebSite._negotiate) and `head`
    (its response head for a second of Date, made by WebRequest.respond)."""
    __slots__ = ("status", "content_type", "body", "headers", "_etag", "_gzipped",
                 "variants", "head")

    def __init__(self, status, content_type, body, headers=()):
        self.status, self.content_type, self.body = status, content_type, body
        self.headers = list(headers)
        self._etag = self._gzipped = self.head = None
        self.variants = {}

    def etag(self):
        if self._etag is None:
            import zlib
            self._etag = '"%08x-%x"' % (zlib.crc32(self.body), len(self.body))
        return self._etag

    def gzipped(self):
        if self._gzipped is None:
            import gzip
            self._gzipped = gzip.compress(self.body, mtime=0)
        return self._gzipped


class WebSite:
    """The tutorial's UserStatusTree and UserStatus as one object that maps a request
    (method, path, body) to a WebResponse; its UserStatusXR (XMLRPCEndpoint) answers at
    /RPC2.  Knows the database, not the sockets.

    GET /             the users, each a link to its page (403 when the list is private)
    GET /NAME         that user's status (404 page for an unknown user); also /~NAME, which
                      is the only page of users named like the site's own paths (`routes`)
    GET /api/users    [{"user": ..., "status": ...}, ...] sorted by name, a page at a time
                      (?limit=N, ?after=NAME; Link: rel="next"); /api/users/NAME: one
    GET /metrics      Prometheus text, when `metrics` (a function returning it) is given
    GET /healthz      JSON: the users loaded, the age of the last good load, each service
                      alive; 503 when the last load failed or a service is down
    POST /RPC2        XML-RPC: getUser(name), getUsers(), system.listMethods, methodHelp
    Nothing is ever read from disk for a URL."""

    methods = ("GET", "HEAD", "POST")
    # First path segments the site serves itself -> the method serving them.  They are never
    # a user's page: the setter refuses them as names (RESERVED_NAMES).
    routes = {"api": "_api", "RPC2": "_rpc2", "metrics": "_metrics", "healthz": "_healthz"}

    def __init__(self, db, templates=None, metrics=None, title="Users", services=()):
        self.db = db
        self.templates = templates or load_templates()
        self.metrics = metrics
        self.services = services       # whose liveness /healthz reports
        self.title = title
        self.rpc = XMLRPCEndpoint(db)
        self._users_page = None        # (db version, WebResponse)
        self._rendering = threading.Lock()   # held while the users page is made
        self._pages = VersionedCache(MAX_REPLY_CACHE_BYTES)   # name -> its page's answer
        self._last_modified = None, None   # (db.changed_at, as an HTTP date)

    # -- routing

    def needs_worker(self, method, target):
        """Whether answering may block (a back-end that may) or take long: XML-RPC (getUsers
        of many users), the API's list, and the users page until it is made for the
        current version of the users."""
        if self.db.blocking or method == "POST":
            return True
        path = target.partition("?")[0]
        if path == "/":
            version, cached = getattr(self.db, "version", None), self._users_page
            return version is None or cached is None or (
                cached[0] != version and not self._rendering.locked())
        return path.rstrip("/") == "/api/users"

    def handle(self, method, target, body=b"", headers=None, may_block=True):
        """One request -> WebResponse.  `target` is the request target, query included;
        `headers` (a mapping) those of the request, for conditional requests and gzip;
        without `may_block` (on the event loop), the users page is never made here.
        A failing back-end is a 500 page (and one log line with the traceback)."""
        try:
            response = self._route(method, target, body, may_block)
        except Exception:
            log.exception("web: answering %s %r failed", method, target[:200])
            return self.error(500, INTERNAL_ERROR, "The user database failed; it is logged.")
        if method == "GET" and response.status == 200 and headers is not None:
            response = self._negotiate(response, headers)
        return response

    def _negotiate(self, response, headers):
        """A page or JSON answer as this client takes it: 304 when its If-None-Match (or
        If-Modified-Since) says it has it; gzipped when it accepts gzip and the body is
        long.  ETag from the body (per encoding), Last-Modified from the last change."""
        gzip = len(response.body) >= GZIP_MIN_BYTES and _accepts_gzip(
            headers.get("Accept-Encoding", ""))
        conditional = (headers.get("If-None-Match") is not None
                       or headers.get("If-Modified-Since") is not None)
        if not conditional and gzip in response.variants:
            return response.variants[gzip]
        etag = response.etag()[:-1] + '-gzip"' if gzip else response.etag()
        extra = [("ETag", etag)]
        changed_at = getattr(self.db, "changed_at", None)
        if changed_at is not None:
            if self._last_modified[0] != changed_at:     # formatted once per change
                self._last_modified = changed_at, _http_date(changed_at)
            extra.append(("Last-Modified", self._last_modified[1]))
        if len(response.body) >= GZIP_MIN_BYTES:
            extra.append(("Vary", "Accept-Encoding"))
        if _not_modified(headers, {etag, response.etag()}, changed_at):
            return WebResponse(304, response.content_type, b"", response.headers + extra)
        if gzip:
            extra.append(("Content-Encoding", "gzip"))
        variant = WebResponse(200, response.content_type,
                              response.gzipped() if gzip else response.body,
                              response.headers + extra)
        if not conditional:
            response.variants[gzip] = variant
        return variant

    def _route(self, method, target, body, may_block=True):
        path, _, query = target.split("#", 1)[0].partition("?")
        first, _, rest = path[1:].partition("/")
        route = self.routes.get(first)
        if method == "POST" and route == "_api":
            return self.json(405, {"error": "Method not allowed: /api takes GET and HEAD"},
                             [("Allow", "GET, HEAD")])
        if method == "POST" and route != "_rpc2":
            return self.error(405, "Method not allowed", "Only /RPC2 takes POST.",
                              [("Allow", "GET, HEAD")])
        if route is not None:
            return getattr(self, route)(method, rest, query, body)
        if path == "/":
            return self.users_page(may_block)
        name = _user_in_path(path[1:], tilde=True)
        return self.not_found() if name is None else self.user_page(name)

    # Each route: (method, the rest of the path after its segment, the query string, body)
    # -> WebResponse.

    def _rpc2(self, method, rest, query, body):
        if rest:
            return self.not_found()
        if method != "POST":
            return self.error(405, "Method not allowed", "XML-RPC takes POST.",
                              [("Allow", "POST")])
        return self.xmlrpc(body)

    def _metrics(self, method, rest, query, body):
        if self.metrics is None or rest:
            return self.not_found()
        return WebResponse(200, "text/plain; version=0.0.4; charset=utf-8",
                           self.metrics().encode("utf-8"), [("Cache-Control", "no-store")])

    def _healthz(self, method, rest, query, body):
        """For a load balancer's check: cheap (no lookup, no list), 200 or 503."""
        if rest:
            return self.not_found()
        loaded_at, loads = self.db.health()
        services = {service.name: service.alive() for service in self.services}
        ok = loads and all(services.values())
        report = {"status": "ok" if ok else "failing", "users": self.db.count(),
                  "users_file_loads": loads,
                  "last_load_age_seconds": None if loaded_at is None else
                  round(max(time.time() - loaded_at, 0.0), 3),
                  "services": services}
        return self.json(200 if ok else 503, report, [("Cache-Control", "no-store")])

    def _api(self, method, rest, query, body):
        """/api/users (the users, a page at a time) and /api/users/NAME (one user), as JSON;
        every error is JSON too."""
        if rest in ("users", "users/"):
            try:
                return self.users_json(query)
            except ListRefused:
                return self.json(403, {"error": LIST_DENIED})
        name = _user_in_path(rest[len("users/"):]) if rest.startswith("users/") else None
        if name is None:
            return self.json(404, {"error": "Not found"})
        status = self.db.get_user(name)
        if status is None:
            return self.json(404, {"error": NO_SUCH_USER, "user": name})
        return self.json(200, {"user": name, "status": defang(status)})

    # -- responses

    def users_json(self, query):
        """A page of the users with their statuses, sorted by name: `limit` of them
        (API_PAGE, at most API_MAX_PAGE) after the name `after`; a Link header names the
        next page when there is one."""
        from urllib.parse import parse_qs, urlencode
        try:
            fields = parse_qs(query, strict_parsing=bool(query), errors="strict")
            limit = fields.get("limit", [str(API_PAGE)])[-1]
            after = fields.get("after", [""])[-1]
        except (ValueError, UnicodeDecodeError):
            return self.json(400, {"error": "bad query string: ?limit=N&after=NAME"})
        if not (_ASCII_DIGITS.fullmatch(limit) and int(limit) > 0):
            return self.json(400, {"error": "limit: a whole number above 0, at most %d"
                                   % API_MAX_PAGE})
        limit = min(int(limit), API_MAX_PAGE)
        names = self.db.public_users()
        start = bisect.bisect_right(names, after) if after else 0
        page = names[start:start + limit]
        users = [{"user": name, "status": defang(self.db.get_user(name) or "")}
                 for name in page]
        headers = []
        if start + limit < len(names):
            headers.append(("Link", '</api/users?%s>; rel="next"'
                            % urlencode({"limit": limit, "after": page[-1]})))
        return self.json(200, users, headers)

    def users_page(self, may_block=True):
        """The list of users; made once per version of a database that has one, by one
        thread at a time.  While it is made, the page of the version before is answered
        (stale for that long, as with HTTP's stale-while-revalidate); without `may_block`,
        the page there is answered whatever its version."""
        try:
            names = self.db.public_users()
        except ListRefused:
            return self.error(403, LIST_DENIED, "The list of users is not public here; "
                              "a user's page is at /NAME.")
        version = getattr(self.db, "version", None)
        if version is None:
            return self._render_users_page(names)
        cached = self._users_page
        if cached is not None and (cached[0] == version or not may_block
                                   or self._rendering.locked()):
            return cached[1]
        with self._rendering:                  # one render per version, however many ask
            cached = self._users_page
            if cached is not None and cached[0] == version:
                return cached[1]
            response = self._render_users_page(names)
            if len(response.body) >= GZIP_MIN_BYTES:
                response.etag()                # both made here, in a worker, not on the loop
                response.gzipped()
            if version == self.db.version:
                self._users_page = version, response
            return response

    def _render_users_page(self, names):
        from html import escape
        from urllib.parse import quote
        items = []
        for name in names:
            status = self.db.get_user(name)
            page = ("~" if name in RESERVED_NAMES or name.startswith("~") else "") + name
            items.append('<li><a href="/%s">%s</a> %s</li>\n' % (    # CSS: li as .status
                escape(quote(page, safe="~")), escape(name), escape(defang(status or ""))))
        return self.page(200, "users.html", title=escape(self.title), users="".join(items),
                         count=str(len(items)))

    def user_page(self, name):
        """A user's page.  Pages are remembered per version of the users and of the
        templates (at most MAX_REPLY_CACHE_BYTES of them), as finger answers are: most
        requests are for the same few names."""
        version = getattr(self.db, "version", None)
        if version is not None:
            version = version, self.templates       # pages change with either
        page = self._pages.get(version, name)
        if page is not None:
            return page
        page = self._user_page(name)
        if version is not None and version[0] == self.db.version and page.status == 200:
            self._pages.put(version, name, page, len(page.body))
        return page

    def _user_page(self, name):
        from html import escape
        status = self.db.get_user(name)
        if status is None:
            return self.error(404, NO_SUCH_USER, "There is no user %s here." % escape(name))
        return self.page(200, "user.html", user=escape(name), status=escape(defang(status)))

    def not_found(self):
        return self.error(404, "Not found", "There is no such page.")

    def error(self, code, title, message, headers=()):
        """An error page; `message` is HTML, already escaped."""
        from html import escape
        response = self.page(code, "error.html", title=escape(title), message=message)
        response.headers.extend(headers)
        return response

    def page(self, code, template, **fields):
        """Fill a template; every value is already HTML-escaped."""
        html = self.templates[template].safe_substitute(fields, css=PAGE_CSS)
        return WebResponse(code, "text/html; charset=utf-8", html.encode("utf-8"))

    @staticmethod
    def json(code, value, headers=()):
        import json
        return WebResponse(code, "application/json; charset=utf-8",
                           json.dumps(value, ensure_ascii=False).encode("utf-8") + b"\n",
                           headers)

    def xmlrpc(self, body):
        """An XML-RPC call -> its answer (XMLRPCEndpoint.answer); a body with a DTD is
        refused before it is parsed."""
        if declares_dtd(body):
            return self.error(400, "Bad request", "XML-RPC requests have no DTD.")
        return WebResponse(200, "text/xml; charset=utf-8", self.rpc.answer(body),
                           [("Cache-Control", "no-store")])


# The first path segments of the web site: names the setter refuses and a load warns about.
RESERVED_NAMES = frozenset(WebSite.routes)

# XML-RPC fault codes, from the interoperability list of the xmlrpc-epi specification.
RPC_PARSE_ERROR = -32700
RPC_INVALID_REQUEST = -32600
RPC_METHOD_NOT_FOUND = -32601
RPC_INVALID_PARAMS = -32602
RPC_INTERNAL_ERROR = -32603
RPC_APPLICATION_ERROR = -32500


class _RPCFault(Exception):
    """An XML-RPC call fails with `code` (an RPC_* code) and a message for the caller."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class XMLRPCEndpoint:
    """The tutorial's UserStatusXR: getUser and getUsers on `db`, with the introspection
    methods (system.listMethods, methodHelp), behind xmlrpc.server's dispatcher."""

    def __init__(self, db):
        from xmlrpc.server import SimpleXMLRPCDispatcher
        self.db = db
        self.dispatcher = SimpleXMLRPCDispatcher(allow_none=False, encoding="utf-8")
        self.dispatcher.register_function(self.get_user, "getUser")
        self.dispatcher.register_function(self.get_users, "getUsers")
        self.dispatcher.register_introspection_functions()

    def get_user(self, name):
        """getUser(name): the user's status, or 'No such user'."""
        status = self.db.get_user(name)
        return NO_SUCH_USER if status is None else defang(status)

    def get_users(self):
        """getUsers(): the list of user names."""
        try:
            return list(self.db.public_users())
        except ListRefused:
            raise _RPCFault(RPC_APPLICATION_ERROR, LIST_DENIED) from None

    def answer(self, body):
        """An XML-RPC call (bytes, without a DTD) -> the XML of its answer, or of a fault
        with one of the codes of the XML-RPC interoperability list (RPC_*) and a short
        message, never a Python traceback."""
        from xml.parsers.expat import ExpatError
        from xmlrpc.client import Fault, dumps, loads
        try:
            try:
                params, method = loads(body)
            except ExpatError:
                raise _RPCFault(RPC_PARSE_ERROR, "not well-formed XML") from None
            except Exception:          # xmlrpc.client's or a value's own error
                raise _RPCFault(RPC_INVALID_REQUEST, "not an XML-RPC call") from None
            answer = dumps((self._call(method, params),), methodresponse=True,
                           encoding="utf-8")
        except _RPCFault as fault:
            answer = dumps(Fault(fault.code, str(fault)), encoding="utf-8")
        return answer.encode("utf-8")

    def _call(self, method, params):
        """Call a registered method with arguments that fit it."""
        import inspect
        if not isinstance(method, str):
            raise _RPCFault(RPC_INVALID_REQUEST, "a call without a methodName")
        function = self.dispatcher.funcs.get(method)
        if function is None:
            raise _RPCFault(RPC_METHOD_NOT_FOUND, "no method %.100r; system.listMethods "
                            "gives them" % method)
        try:
            inspect.signature(function).bind(*params)
            if not all(isinstance(param, str) for param in params):
                raise TypeError                 # every method here takes strings only
        except TypeError:
            raise _RPCFault(RPC_INVALID_PARAMS, "%s: wrong arguments (strings only); "
                            "system.methodHelp says which" % method) from None
        try:
            return self.dispatcher._dispatch(method, params)
        except _RPCFault:
            raise
        except Exception:
            log.exception("web: XML-RPC %s failed", method)
            raise _RPCFault(RPC_INTERNAL_ERROR, INTERNAL_ERROR) from None


class _DTDFound(Exception):
    pass


def declares_dtd(body):
    """Whether an XML document has a DTD (where entity tricks live), as expat itself sees
    it in whatever encoding the document uses."""
    from xml.parsers import expat

    def found(*args):
        raise _DTDFound

    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = found
    parser.EntityDeclHandler = found
    try:
        parser.Parse(body, True)
    except _DTDFound:
        return True
    except (expat.ExpatError, LookupError, ValueError):
        pass                    # not well-formed: the XML-RPC dispatcher answers a Fault
    return False


@functools.lru_cache(maxsize=4096)             # the same few names, asked again and again
def _user_in_path(segment, tilde=False):
    """The user name a %-encoded path segment names (after a '~' it may start with, with
    `tilde`), or None when it can name nobody."""
    from urllib.parse import unquote
    try:
        name = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        return None
    if tilde and name.startswith("~"):
        name = name[1:]
    return name if _safe_segment(name) else None


def _safe_segment(name):
    """A path segment that may name a user: not empty, no '/', no '..', no control characters."""
    return (name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and not _CONTROL_CHARS.search(name) and len(name) <= 256)


def _accepts_gzip(accept_encoding):
    """Whether an Accept-Encoding value takes gzip (or *) with a q above 0."""
    for item in accept_encoding.lower().split(","):
        coding, _, parameters = item.partition(";")
        if coding.strip() in ("gzip", "x-gzip", "*"):
            quality = parameters.strip()
            try:
                return not quality.startswith("q=") or float(quality[2:]) > 0
            except ValueError:
                return False
    return False


def _not_modified(headers, etags, changed_at):
    """RFC 9110 13.1.2-3: If-None-Match naming one of `etags` (weak comparison), or, without
    it, If-Modified-Since at or after `changed_at`."""
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        wanted = {tag.strip()[2:] if tag.strip().startswith("W/") else tag.strip()
                  for tag in if_none_match.split(",")}
        return "*" in wanted or bool(wanted & etags)
    if_modified_since = headers.get("If-Modified-Since")
    if if_modified_since is None or changed_at is None:
        return False
    from email.utils import parsedate_to_datetime
    try:
        return int(changed_at) <= parsedate_to_datetime(if_modified_since).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return False


def _http_date(timestamp=None):
    from email.utils import formatdate
    return formatdate(timestamp, usegmt=True)


_NOW = [None, ""]                 # the second of the last Date header, and that header


def _http_now():
    """The Date header for now: formatted once a second."""
    second = int(time.time())
    if _NOW[0] != second:
        _NOW[:] = second, _http_date(second)
    return _NOW[1]


class WebRequest:
    """One HTTP request on a web connection: its request line and headers are parsed by
    http.server's own parser (BaseHTTPRequestHandler.parse_request, run on this object; it
    needs only the attributes set here), and the WebSite answers it.  read_head() -> False
    when it was answered already (a malformed request: then close); answer() -> the
    response bytes; output() -> what was written so far (an interim 100 Continue)."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"   # errors before the version is read get one

    def __init__(self, protocol, peer, head, first):
        self.MessageClass = protocol.message_class
        self.protocol, self.client_address, self.first = protocol, peer, first
        self.head = head
        self.rfile = io.BytesIO(head)
        self.out = []
        self.close_connection = True
        self.requestline = self.command = self.path = self.request_version = ""
        self.headers = {}
        self.body_length = None
        self.body = None
        self.may_block = False         # answered in a worker: the users page may be made
        self.started = time.monotonic()

    def read_head(self):
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.send_error(414, "Request line too long")
            return False
        return (self.protocol.parse_request(self) and self.fields_ok()
                and self.framing_ok() and self.target_ok() and self.within_rate())

    def fields_ok(self):
        """RFC 9112 sections 2.2 and 5, on the bytes as they came: each field line is a
        token, a colon and a value without NUL or a bare CR, ended by CRLF or LF; no
        obs-fold, no line without a colon.  Else 400, and the connection closes: what one
        parser splits or joins differently from a proxy in front is how requests are
        smuggled."""
        head = self.head
        start = head.find(b"\n") + 1
        end = len(head) - (2 if head.endswith(b"\r\n") else 1)   # before the blank line
        if start < end and not _FIELD_LINES.fullmatch(head, start, end):
            self.send_error(400, "Bad request", "A header line is malformed.")
            return False
        return True

    def target_ok(self):
        """The target in origin form (/path?query); the absolute form (http://host/path),
        which RFC 9112 says a server must take, is turned into it.  Else 400."""
        if self.path.startswith("/"):
            return True
        if self.path.lower().startswith(("http://", "https://")):
            from urllib.parse import urlsplit
            parts = urlsplit(self.path)
            self.path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
            return True
        self.send_error(400, "Bad request", "The request target is not a path.")
        return False

    def body_wanted(self):
        """Bytes of body to read before the request is whole: a POST's within MAX_RPC_BODY
        (a longer one is answered 413 without it)."""
        if self.command == "POST" and self.body_length and self.body_length <= MAX_RPC_BODY:
            return self.body_length
        return 0

    def slow(self):
        return self.protocol.site.needs_worker(self.command, self.path)

    def output(self):
        """What was written so far, as a list of bytes (a body is never copied), taken."""
        out, self.out = self.out, []
        return out

    def within_rate(self):
        """The per-client rate, for each request after the connection's first (that
        one was counted when the connection was accepted): else 429."""
        limits = self.protocol.limits
        if self.first or limits is None or limits.request(self.client_address) is None:
            return True
        self.protocol.count("per-client rate")
        self.respond(self.protocol.site.error(429, "Too many requests", TOO_MANY_REQUESTS,
                                              [("Retry-After", "1")]), close=True)
        return False

    def framing_ok(self):
        """RFC 9112 section 6: one Content-Length of ASCII digits (repeats must agree),
        never with Transfer-Encoding, and a body only on POST.  Anything else gets 400
        and the connection is closed: a body must never be read as a second request.
        Sets `body_length` (None without a Content-Length)."""
        lengths = {value.strip(" \t") for value in self.headers.get_all("Content-Length", [])}
        chunked = self.headers.get("Transfer-Encoding") is not None
        if len(lengths) > 1 or lengths and (chunked or not all(
                _ASCII_DIGITS.fullmatch(value) for value in lengths)):
            self.send_error(400, "Bad request", "Content-Length must be one number (of "
                            "at most 18 digits), without Transfer-Encoding.")
            return False
        self.body_length = int(lengths.pop()) if lengths else None
        if self.command != "POST" and (chunked or self.body_length):
            self.send_error(400, "Bad request", "A %s request has no body." % self.command[:20])
            return False
        return True

    def handle_expect_100(self):
        """Expect: 100-continue: the interim answer, only for a request we will read."""
        if not self.framing_ok():
            return False
        if self.body_wanted():
            self.out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def answer(self):
        site = self.protocol.site
        if self.command in ("GET", "HEAD"):
            self.respond(site.handle("GET", self.path, headers=self.headers,
                                     may_block=self.may_block),
                         with_body=self.command == "GET")
        elif self.command != "POST":          # any other method: 405, not http.server's 501
            self.respond(site.error(405, "Method not allowed", "This site takes GET, HEAD "
                                    "and POST (/RPC2).", [("Allow", "GET, HEAD, POST")]))
        elif self.headers.get("Transfer-Encoding"):
            self.respond(site.error(411, "Length required", "Send a Content-Length, not "
                                    "chunks."), close=True)
        elif self.body_length is None:
            self.respond(site.error(411, "Length required", "Send a Content-Length."),
                         close=True)
        elif self.body_length > MAX_RPC_BODY:
            self.respond(site.error(413, "Request too large", "At most %d bytes."
                                    % MAX_RPC_BODY), close=True)
        else:
            self.respond(site.handle("POST", self.path, self.body or b""))
        return self.output()

    def respond(self, response, with_body=True, close=False):
        """Write `response` (a WebResponse) with the headers every answer has."""
        if close:
            self.close_connection = True
        if self.request_version != "HTTP/0.9":      # which has no status line nor headers
            key = _http_now(), self.close_connection, self.protocol
            if response.head is None or response.head[0] != key:
                response.head = key, self._head(response, key[0])
            self.out.append(response.head[1])
        if with_body and len(response.body) <= HTTP_JOIN_BYTES and self.out:
            self.out[-1] += response.body          # one send, one segment
        elif with_body:
            self.out.append(response.body)         # sent from where it is kept
        self.protocol.latency.observe(time.monotonic() - self.started)
        self.protocol.count(response.status)
        if query_log.enabled:
            query_log.record(self.protocol.name, self.client_address, self.requestline[:200],
                             "%s %s" % (response.status, len(response.body) if with_body
                                        else 0), self.started)

    def _head(self, response, date):
        """The status line and headers of `response`, encoded."""
        extra = self.protocol.headers + response.headers
        head = ["HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: %s\r\n" % (
            response.status, _status_phrase(response.status), date, response.content_type)]
        if response.status != 304:                 # a 304's length would be the page's
            head.append("Content-Length: %d\r\n" % len(response.body))
        if not any(name == "Cache-Control" for name, _ in extra):
            head.append("Cache-Control: %s\r\n" % (WEB_CACHE if response.status < 400
                                                    else "no-store"))
        head.extend("%s: %s\r\n" % item for item in extra)
        if self.close_connection:
            head.append("Connection: close\r\n")
        head.append(_FIXED_HEADERS)
        return "".join(head).encode("latin-1")

    def send_error(self, code, message=None, explain=None):
        """http.server's parser's errors (bad request line, headers too long) on our page."""
        from html import escape
        self.respond(self.protocol.site.error(
            405 if code == 501 else code, message or "Error",
            escape(explain or message or "Bad request")), close=True)


_BLANK_LINE = re.compile(rb"\n\r?\n")
# http.server splits its request line with str.split() of the Latin-1 text: these bytes
# are white space there too, not to bytes.split().
_LATIN1_SPACES = bytes.maketrans(b"\x1c\x1d\x1e\x1f\x85\xa0", b" " * 6)
# Field lines (RFC 9110 5.6.2's tchar for the name), each ended by CRLF or LF.
_FIELD_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00\r\n]*\r?\n)*")
_FIXED_HEADERS = ("Server: finger.py/%s\r\nX-Content-Type-Options: nosniff\r\n"
                  "Content-Security-Policy: %s\r\nReferrer-Policy: no-referrer\r\n\r\n"
                  % (__version__, CONTENT_SECURITY_POLICY))


@functools.lru_cache(maxsize=None)
def _status_phrase(status):
    from http import HTTPStatus
    return HTTPStatus(status).phrase


class HTTPSession(Session):
    """One web connection: HTTP/1.1 with keep-alive and pipelining.  The request line and
    headers (at most MAX_REQUEST_HEAD bytes) and the body must arrive within the
    connection's timeout (the deadline restarts only between requests); answers are
    given in order, HTTP_BATCH bytes of them at a time, a request the site answers slowly
    (needs_worker) in the worker pool.  Slots: an idle connection costs little."""
    __slots__ = ("protocol", "peer", "buffer", "scanned", "skipped_blank", "request",
                 "requests", "pending", "slow", "closing")

    def __init__(self, protocol, peer):
        self.protocol, self.peer = protocol, peer
        self.pending = self.slow = self.closing = False
        self.buffer = bytearray()
        self.scanned = 0               # bytes of buffer known to hold no blank line
        self.skipped_blank = False     # the one empty line allowed before this request
        self.request = None            # a WebRequest read in part, or not yet answered
        self.requests = 0

    @property
    def idle(self):
        return not self.buffer and self.request is None

    def feed(self, data):
        self.buffer += data
        return self._answer(allow_slow=False)

    def resume(self):
        return self._answer(allow_slow=self.slow)

    def busy(self):
        """Every worker is busy: the waiting request gets 503 and Retry-After: 1, and the
        connection goes on with the next one."""
        request, self.request = self.request, None
        if request is None:
            return None
        request.respond(self.protocol.site.error(503, "Busy", "Every worker is busy; try "
                                                 "again in a second.", [("Retry-After", "1")]))
        self.closing = request.close_connection
        self.slow = False
        self.pending = bool(self.buffer)
        return request.output()
    def _answer(self, allow_slow):
        """Answer the whole requests the buffer holds, in order, until one must run in a
        worker (unless allow_slow), HTTP_BATCH bytes are answered, or the connection is
        to close.  Sets `pending` when whole requests are left, `slow` when the next one
        is such."""
        out, size = [], 0
        self.pending = self.slow = False
        while not self.closing and (self.buffer or self.request is not None):
            request = self._whole_request(out)
            if request is None:
                break
            if not allow_slow and request.slow():
                self.pending = self.slow = True
                break
            self.request = None
            request.may_block = allow_slow
            answer = request.answer()
            out.extend(answer)
            size += sum(map(len, answer))
            self.closing = request.close_connection
            if size >= HTTP_BATCH and self.buffer and not self.closing:
                self.pending = True
                break
        return out

    def _whole_request(self, out):
        """The next request once it is whole (head and body), taken from the buffer; None
        meanwhile.  Answers to a malformed one, and a 100 Continue, go to `out`."""
        request = self.request
        if request is None:
            end = self._head_end()
            # Over the limit: not ended within it, or ended past it in a single read.
            if (len(self.buffer) if end is None else end) > MAX_REQUEST_HEAD:
                del self.buffer[:]
                request = WebRequest(self.protocol, self.peer, b"", self.requests == 0)
                request.send_error(431, "Request header fields too large",
                                   "At most %d bytes of request line and headers."
                                   % MAX_REQUEST_HEAD)
                out.extend(request.output())
                self.closing = True
                return None
            if end is None:
                return None
            head = bytes(self.buffer[:end])
            del self.buffer[:end]
            self.scanned = 0
            self.skipped_blank = False
            request = WebRequest(self.protocol, self.peer, head, self.requests == 0)
            self.requests += 1
            complete = request.read_head()
            out.extend(request.output())
            if not complete:
                self.closing = True
                return None
            self.request = request
        if request.body is None:
            length = request.body_wanted()
            if len(self.buffer) < length:
                return None
            request.body = bytes(self.buffer[:length])
            del self.buffer[:length]
        return request

    def _head_end(self):
        """Where the request line and headers end (after their blank line), or None while
        they are incomplete.  A request line of fewer than three words (blank, HTTP/0.9,
        malformed; split as http.server splits it) has no headers.  One empty line before
        a request is skipped (RFC 9112 section 2.2: a client may send one after a body)."""
        if not self.skipped_blank and self.buffer.startswith((b"\n", b"\r\n")):
            del self.buffer[:self.buffer.index(b"\n") + 1]
            self.skipped_blank = True
        line_end = self.buffer.find(b"\n", 0, MAX_REQUEST_HEAD)
        if line_end < 0:
            return None
        if len(self.buffer[:line_end].translate(_LATIN1_SPACES).split(None, 2)) < 3:
            return line_end + 1
        blank = _BLANK_LINE.search(self.buffer, max(self.scanned, line_end))
        if blank is None:
            self.scanned = max(len(self.buffer) - 2, line_end)
            return None
        return blank.end()


class HTTPProtocol(SessionProtocol):
    """The web site over HTTP/1.1, for TCPService: a session per connection (HTTPSession),
    answered by `site` (a WebSite).  `headers` go with every answer (HSTS); `limits` (a
    ClientLimits) applies its rate to every request after a connection's first."""

    max_output = None              # answers are sent before more requests are read

    def __init__(self, site, name="web", limits=None, headers=()):
        from http.client import HTTPMessage
        from http.server import BaseHTTPRequestHandler
        super().__init__()
        self.site, self.name, self.limits = site, name, limits
        self.headers = list(headers)
        self.parse_request = BaseHTTPRequestHandler.parse_request     # run on a WebRequest
        self.message_class = HTTPMessage

    def new_session(self, peer):
        return HTTPSession(self, peer)

    def refusal(self, text, outcome):
        status = b"503 Service Unavailable" if outcome == "busy" else b"429 Too Many Requests"
        return (b"HTTP/1.1 %s\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close"
                b"\r\n\r\n" % status)


_ASCII_DIGITS = re.compile("[0-9]{1,18}")   # what int() takes quickly; not other scripts' digits


def make_tls_context(cert, key=None):
    """A server TLS context (TLS 1.2 at least, the ssl module's defaults otherwise) with the
    certificate (and key) from PEM files; UsageError naming the file when they are unusable."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except (ssl.SSLError, UsageError, OSError) as error:
        if isinstance(error, ssl.SSLError):
            problem = _pem_problem(cert, key, error)
        else:
            problem = str(error) if isinstance(error, UsageError) else error.strerror or error
        raise FieldError("cert", "%s%s" % (problem, " (with {key} %s)" % key if key else ""),
                         cert) from None
    return context


def _no_passphrase():
    """The passphrase callback of make_tls_context: a server started unattended has none
    (without a callback OpenSSL would ask on the terminal)."""
    raise UsageError("the key is encrypted; give the server a key without a passphrase "
                     "(openssl pkey -in KEY -out PLAIN.key)")


def _pem_problem(cert, key, error):
    """What is wrong with a certificate and key OpenSSL refused, in a sentence."""
    def text_of(path):
        try:
            with open(path, "rb") as f:
                return f.read(1 << 20)
        except OSError:
            return b""
    cert_text = text_of(cert)
    key_text = text_of(key) if key else cert_text
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        return "%s holds no certificate (a PEM block BEGIN CERTIFICATE)" % cert
    if b"PRIVATE KEY-----" not in key_text:
        return ("%s holds no private key; give its file with {key} FILE, or append it to "
                "the certificate file" % (key or cert))
    if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
        return "the private key does not belong to the certificate"
    return "cannot load the certificate and key (OpenSSL: %s)" % (
        getattr(error, "reason", None) or error)


class WebService(TCPService):
    """The web site on one listener: HTTPProtocol on a TCPService, plain or TLS (`cert`,
    `key`); `reload()` re-reads the certificate.  Over TLS, `hsts` seconds (0: none) is the
    Strict-Transport-Security max-age."""

    def __init__(self, site, address=("127.0.0.1", 0), *, sock=None, name="web",
                 cert=None, key=None, timeout=WEB_TIMEOUT,
                 max_connections=DEFAULT_WEB_MAX_CONNECTIONS, limits=None,
                 hsts=DEFAULT_HSTS, proxy_headers=None, workers=DEFAULT_WORKERS,
                 clock=time.monotonic):
        headers = [("Strict-Transport-Security", "max-age=%d" % hsts)] if cert and hsts else []
        super().__init__(HTTPProtocol(site, name, limits, headers), address, sock=sock,
                         name=name, timeout=timeout, max_connections=max_connections,
                         workers=workers, limits=limits, proxy_headers=proxy_headers,
                         tls_context=make_tls_context(cert, key) if cert else None,
                         clock=clock)
        self.site = site
        self.cert, self.key = cert, key

    def relocate(self, inside):
        self.cert, self.key = inside(self.cert), inside(self.key)

    def serve(self):
        """A short users page is made first, in a worker, so that the first clients find it
        made; a long one (a second of CPU and hundreds of MB for a million users) only
        when someone asks for it."""
        db = self.site.db
        if getattr(db, "version", None) is not None and db.count() <= WEB_PREWARM_USERS:
            self.loop.run_in_worker(self.site.users_page, (), lambda future: None)
        super().serve()

    def reload(self):
        """Load the certificate again (renewals); a bad one is logged and the old one kept.
        New connections get the new one."""
        if self.cert:
            try:
                self.tls_context = make_tls_context(self.cert, self.key)
                log.info("%s: reloaded the certificate %s", self.name, self.cert)
            except UsageError as error:
                log.error("%s; keeping the certificate loaded before", error)


# == 8. Perspective Broker for Twisted clients (Banana and a Jelly subset) ====================
#
# A stock Twisted `pb.PBClientFactory` client calls `getUser(name)` and `getUsers()` on our
# root object, in the wire format of Twisted 22 and later; layers, bottom up:
#   Banana   framing: [base-128 prefix digits][type byte][payload] (banana_encode, BananaDecoder)
#   Jelly    Python values <-> Banana s-expressions, basic types only (jelly, unjelly)
#   PB       ["message", id, b"root", method, answerRequired, args, kwargs] -> ["answer", id,
#            value] or ["error", id, CopyableFailure] (PBProtocol, PBSession, FingerRoot)

PB_VERSION = 6                    # the only protocol version Twisted speaks; it checks ours
PB_DIALECTS = (b"pb", b"none")    # offered in this order; Twisted clients pick b"pb"
BANANA_MAX_PREFIX = 64            # digits in a number prefix (Twisted's limit): < 2**448
BANANA_SIZE_LIMIT = 640 * 1024    # longest LIST (elements) or STRING (bytes), as Twisted's
BANANA_MAX_DEPTH = 64             # lists open at once.  A getUser call nests 4 deep and


PB_MAX_MESSAGE = 1 << 20          # bytes one top-level expression may take (Twisted: no

PB_MAX_VALUES = 4096              # values in one call (Banana elements, and jelly values with


PB_MAX_CALL = 64 * 1024           # bytes of one expression from a PB client: a call is small,

PB_MAX_PENDING_TOTAL = 64 << 20   # bytes of unfinished calls buffered over all PB clients
PB_ELEMENT_COST = 64              # bytes of memory one decoded Banana element may take
PB_MAX_NAME_SHOWN = 100           # characters of a method name echoed in an error or the log

BANANA_LIST, BANANA_INT, BANANA_STRING, BANANA_NEG = 0x80, 0x81, 0x82, 0x83
BANANA_FLOAT, BANANA_LONGINT, BANANA_LONGNEG, BANANA_VOCAB = 0x84, 0x85, 0x86, 0x87
BANANA_INT_LIMIT = 1 << 31        # Twisted sends INT/NEG below this magnitude, LONG* above

# The PB dialect's vocabulary: index -> word.  Twisted sends these byte strings as VOCAB
# wherever they occur, user data included; we accept VOCAB in either dialect (a client's
# first message can share a read with its dialect pick) and send it only in dialect b"pb".
PB_VOCAB = (None, b"None", b"class", b"dereference", b"reference", b"dictionary", b"function",
            b"instance", b"list", b"module", b"persistent", b"tuple", b"unpersistable",
            b"copy", b"cache", b"cached", b"remote", b"local", b"lcache", b"version", b"login",
            b"password", b"challenge", b"logged_in", b"not_logged_in", b"cachemessage",
            b"message", b"answer", b"error", b"decref", b"decache", b"uncache")
_VOCAB_INDEX = {word: index for index, word in enumerate(PB_VOCAB) if word is not None}

# Failure types the client sees, with the class chain its `check()` walks: `parents` is
# required, without it the client's call hangs (spec section 5, traps).
_NO_SUCH_METHOD = ("twisted.spread.flavors.NoSuchMethod", "builtins.AttributeError")
_PB_ERROR = ("twisted.spread.pb.Error",)
_INSECURE_JELLY = ("twisted.spread.jelly.InsecureJelly",)
_INTERNAL = ("finger.InternalError",)
_BASE_CLASSES = ("builtins.Exception", "builtins.BaseException", "builtins.object")


class PBError(FingerError):
    """The peer broke the Banana/PB protocol (or a value cannot be sent): drop the connection."""


class PBRemoteError(Exception):
    """A call fails: sent to the caller as a CopyableFailure; `types` is the class chain."""

    def __init__(self, types, message):
        super().__init__(message)
        self.types = tuple(types) + _BASE_CLASSES

    @classmethod
    def from_exception(cls, error):
        """The same failure under the exception's own class names (builtins.TypeError...)."""
        chain = [kind.__module__ + "." + kind.__qualname__ for kind in type(error).__mro__]
        return cls([name for name in chain if name not in _BASE_CLASSES], str(error))


class JellyError(PBRemoteError):
    """Arguments we do not unjelly (Twisted's InsecureJelly): the call fails, the link stays."""

    def __init__(self, message):
        super().__init__(_INSECURE_JELLY, message)


# -- Banana ------------------------------------------------------------------------------------

def _banana_prefix(number):
    """A non-negative int -> its base-128 digits, least significant first."""
    if number >> (7 * BANANA_MAX_PREFIX):
        raise PBError("number too large for Banana: %d bits" % number.bit_length())
    digits = bytearray()
    while True:
        digits.append(number & 0x7F)
        number >>= 7
        if not number:
            return bytes(digits)


def banana_encode(value, vocab=False):
    """An s-expression -> Banana bytes.  Takes int, float, bytes and lists (or tuples) of
    them: jelly() first for anything else (str included).  With `vocab` (dialect b"pb"),
    byte strings of the vocabulary go as VOCAB, as Twisted sends them."""
    out = bytearray()
    _banana_append(out, value, vocab)
    return bytes(out)


def _banana_append(out, value, vocab):
    if isinstance(value, bytes):
        index = _VOCAB_INDEX.get(value) if vocab else None
        if index is not None:
            out += _banana_prefix(index)
            out.append(BANANA_VOCAB)
            return
        if len(value) > BANANA_SIZE_LIMIT:
            raise PBError("string of %d bytes: over Banana's limit" % len(value))
        out += _banana_prefix(len(value))
        out.append(BANANA_STRING)
        out += value
    elif isinstance(value, bool):
        raise PBError("bool is not a Banana type: jelly() it")
    elif isinstance(value, int):
        if value >= 0:
            kind = BANANA_INT if value < BANANA_INT_LIMIT else BANANA_LONGINT
        else:
            kind = BANANA_NEG if -value <= BANANA_INT_LIMIT else BANANA_LONGNEG
        out += _banana_prefix(abs(value))
        out.append(kind)
    elif isinstance(value, float):
        out.append(BANANA_FLOAT)
        out += struct.pack("!d", value)
    elif isinstance(value, (list, tuple)):
        if len(value) > BANANA_SIZE_LIMIT:
            raise PBError("list of %d elements: over Banana's limit" % len(value))
        out += _banana_prefix(len(value))
        out.append(BANANA_LIST)
        for item in value:
            _banana_append(out, item, vocab)
    else:
        raise PBError("%s is not a Banana type: jelly() it" % type(value).__name__)


_BANANA_OPENED = object()         # what a list that is not empty is until it is whole


class BananaDecoder:
    """Banana bytes, in pieces of any size -> complete top-level s-expressions.

    feed(data) returns the expressions completed by `data` (lists come out as lists, STRING
    and VOCAB as bytes); any split of a stream gives the same expressions.  Lists still
    open are kept on a stack, so nesting costs no recursion.  Raises PBError on anything
    Twisted refuses (prefix over 64 digits, LIST/STRING over BANANA_SIZE_LIMIT, unknown type
    byte or vocabulary index) and on what we add: nesting over BANANA_MAX_DEPTH, one
    expression over `max_message` bytes."""

    def __init__(self, max_message=PB_MAX_MESSAGE, max_elements=None):
        self.max_message = max_message
        self.max_elements = max_elements
        self._buffer = bytearray()      # bytes not parsed yet (an incomplete element)
        self._stack = []                # open lists: [elements expected, elements so far]
        self._taken = 0                 # bytes parsed into the expression being built
        self._elements = 0              # elements of the expression being built

    @property
    def pending(self):
        """Memory held by the unfinished expression, in bytes, roughly."""
        return len(self._buffer) + self._taken + self._elements * PB_ELEMENT_COST

    @property
    def idle(self):
        """True between expressions: nothing half received."""
        return not self._buffer and not self._stack

    def feed(self, data):
        buffer = self._buffer
        buffer += data
        done, readers = [], self._readers
        position, size = 0, len(buffer)
        while position < size:
            end, limit = position, min(size, position + BANANA_MAX_PREFIX + 1)
            while end < limit and buffer[end] < 0x80:
                end += 1
            if end - position > BANANA_MAX_PREFIX:
                raise PBError("Banana number prefix longer than %d digits" % BANANA_MAX_PREFIX)
            if end == size:
                break                   # the type byte has not arrived
            number = 0
            for digit in reversed(buffer[position:end]):
                number = (number << 7) | digit
            read = readers.get(buffer[end])
            if read is None:
                raise PBError("unknown Banana type byte 0x%02x" % buffer[end])
            element = read(self, number, end != position, buffer, end + 1, size)
            if element is None:
                break                   # its payload has not arrived
            item, start = element
            self._taken += start - position
            position = start
            if item is not _BANANA_OPENED:
                item = self._add(item)
                if item is not None:
                    done.append(item)
        del buffer[:position]
        if self._taken + len(buffer) > self.max_message:
            raise PBError("Banana expression over %d bytes" % self.max_message)
        return done

    def _add(self, item):
        """Count a finished element against the limits, add it to the list it belongs to
        and close every list it completes; returns the top-level expression this finishes,
        else None (Banana has no None, so it cannot be an expression)."""
        self._elements += 1
        if self._taken > self.max_message:
            raise PBError("Banana expression over %d bytes" % self.max_message)
        if self.max_elements is not None and self._elements > self.max_elements:
            raise PBError("Banana expression of over %d elements" % self.max_elements)
        stack = self._stack
        while stack:
            top = stack[-1]
            top[1].append(item)
            if len(top[1]) < top[0]:
                return None
            item = stack.pop()[1]
        self._taken = self._elements = 0
        return item

    # One reader per type byte (_readers): (the prefix number, whether there was one, the
    # buffer, where the payload starts, the buffer's size) -> (the element, where the next
    # one starts), or None until the payload has arrived.

    def _read_string(self, number, prefixed, buffer, start, size):
        if number > BANANA_SIZE_LIMIT:
            raise PBError("Banana string of %d bytes: over the limit" % number)
        if size - start < number:
            return None
        return bytes(buffer[start:start + number]), start + number

    def _read_list(self, number, prefixed, buffer, start, size):
        """An empty list is an element; a longer one is opened on the stack (the element is
        then _BANANA_OPENED)."""
        if number > BANANA_SIZE_LIMIT:
            raise PBError("Banana list of %d elements: over the limit" % number)
        if not number:
            return [], start
        if len(self._stack) >= BANANA_MAX_DEPTH:
            raise PBError("Banana lists nested over %d deep" % BANANA_MAX_DEPTH)
        self._stack.append([number, []])
        return _BANANA_OPENED, start

    def _read_int(self, number, prefixed, buffer, start, size):
        return number, start

    def _read_negative(self, number, prefixed, buffer, start, size):
        return -number, start

    def _read_float(self, number, prefixed, buffer, start, size):
        if prefixed:
            raise PBError("Banana float with a number prefix")
        if size - start < 8:
            return None
        return struct.unpack("!d", buffer[start:start + 8])[0], start + 8

    def _read_vocab(self, number, prefixed, buffer, start, size):
        if not 0 < number < len(PB_VOCAB):
            raise PBError("unknown Banana vocabulary index %d" % number)
        return PB_VOCAB[number], start

    _readers = {BANANA_STRING: _read_string, BANANA_LIST: _read_list,
                BANANA_INT: _read_int, BANANA_LONGINT: _read_int,
                BANANA_NEG: _read_negative, BANANA_LONGNEG: _read_negative,
                BANANA_FLOAT: _read_float, BANANA_VOCAB: _read_vocab}


# -- Jelly (the basic types only) --------------------------------------------------------------

def jelly(value):
    """A Python value -> its jelly s-expression: str as ["unicode", UTF-8], None, bool, int,
    float, bytes, list, tuple, dict, set.  Shared values are written out again each time
    (no "reference"), which every receiver accepts."""
    if isinstance(value, str):
        return [b"unicode", value.encode("utf-8")]
    if value is None:
        return [b"None"]
    if isinstance(value, bool):                         # before int: bool is an int
        return [b"boolean", b"true" if value else b"false"]
    if isinstance(value, (bytes, int, float)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        tag = {list: b"list", tuple: b"tuple", set: b"set", frozenset: b"frozenset"}[
            type(value)]
        return [tag] + [jelly(item) for item in value]
    if isinstance(value, dict):
        return [b"dictionary"] + [[jelly(key), jelly(item)] for key, item in value.items()]
    raise PBError("cannot jelly a %s" % type(value).__name__)


def unjelly(sexp):
    """A jelly s-expression (as BananaDecoder gives it) -> a Python value.  Basic types and
    non-circular "reference"/"dereference" only; anything else raises JellyError."""
    state = [PB_MAX_VALUES, {}]          # values still allowed, references by number
    return _unjelly(sexp, state)


def _unjelly(sexp, state):
    state[0] -= 1
    if state[0] < 0:
        raise JellyError("too many values")
    if not isinstance(sexp, list):
        return sexp                                  # bytes, int, float
    if not sexp or not isinstance(sexp[0], bytes):
        raise JellyError("a jelly list must start with a type name")
    tag, items = sexp[0], sexp[1:]
    unjelly_tagged = _UNJELLY.get(tag)
    try:
        value = _MALFORMED if unjelly_tagged is None else unjelly_tagged(tag, items, state)
    except (TypeError, UnicodeDecodeError) as error:     # unhashable key, bad UTF-8
        raise JellyError("bad %s: %s" % (tag.decode("ascii", "replace"), error)) from None
    if value is _MALFORMED:
        raise JellyError("cannot unjelly %r" % tag[:PB_MAX_NAME_SHOWN])
    return value


# One function per jelly type name (_UNJELLY): (the name, the items after it, the state of
# unjelly) -> the value, or _MALFORMED when the items do not fit the name.

_MALFORMED = object()


def _unjelly_unicode(tag, items, state):
    if len(items) == 1 and isinstance(items[0], bytes):
        return items[0].decode("utf-8")
    return _MALFORMED


def _unjelly_none(tag, items, state):
    return _MALFORMED if items else None


def _unjelly_boolean(tag, items, state):
    return items == [b"true"] if items in ([b"true"], [b"false"]) else _MALFORMED


def _unjelly_sequence(tag, items, state):
    values = [_unjelly(item, state) for item in items]
    return values if tag == b"list" else tuple(values)


def _unjelly_set(tag, items, state):
    values = [_hashable(_unjelly(item, state)) for item in items]
    return set(values) if tag == b"set" else frozenset(values)


def _unjelly_dictionary(tag, items, state):
    result = {}
    for pair in items:
        if not isinstance(pair, list) or len(pair) != 2:
            raise JellyError("a dictionary item must be a [key, value] pair")
        result[_hashable(_unjelly(pair[0], state))] = _unjelly(pair[1], state)
    return result


def _unjelly_reference(tag, items, state):
    """["reference", number, value]: the value, kept with what it cost for "dereference"."""
    if not (len(items) == 2 and isinstance(items[0], int) and 0 < items[0] <= PB_MAX_VALUES):
        return _MALFORMED
    before = state[0]
    value = _unjelly(items[1], state)
    state[1][items[0]] = (value, before - state[0])
    return value


def _unjelly_dereference(tag, items, state):
    """["dereference", number]: a value referenced before, counted again at its cost."""
    if not (len(items) == 1 and items[0] in state[1]):
        return _MALFORMED
    value, cost = state[1][items[0]]
    state[0] -= cost
    if state[0] < 0:
        raise JellyError("too many values")
    return value


_UNJELLY = {b"unicode": _unjelly_unicode, b"None": _unjelly_none,
            b"boolean": _unjelly_boolean, b"list": _unjelly_sequence,
            b"tuple": _unjelly_sequence, b"set": _unjelly_set, b"frozenset": _unjelly_set,
            b"dictionary": _unjelly_dictionary, b"reference": _unjelly_reference,
            b"dereference": _unjelly_dereference}


def _shown(value):
    """A value from the peer as an error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= PB_MAX_NAME_SHOWN else text[:PB_MAX_NAME_SHOWN] + "..."


def _hashable(value):
    """A set element or dictionary key from the wire: text, bytes or an int below 2**60.

    A peer chooses these, and values whose hashes are all equal make each insertion cost as
    much as all the ones before (85,000 of them: a minute of CPU).  The hashes of text and
    bytes are keyed per process; an int below 2**60 is its own hash, so distinct ones never
    collide; larger ints (k * (2**61 - 1) all hash to 0), floats and tuples are refused."""
    if isinstance(value, (str, bytes)) or isinstance(value, int) and abs(value) < 1 << 60:
        return value
    raise JellyError("set elements and dictionary keys must be strings or ints below 2**60, "
                     "not %s" % type(value).__name__)


# -- Perspective Broker ------------------------------------------------------------------------

def _text_argument(value, what):
    """A str argument, or bytes taken as UTF-8 (Twisted clients may send either)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise TypeError("%s must be str or bytes, not %s" % (what, type(value).__name__))
    return value


class FingerRoot:
    """The root object of the tutorial's PB service: its remote methods, adapting the
    database.  Only the names in `methods` can be called from the network."""

    methods = {"getUser": "remote_getUser", "getUsers": "remote_getUsers"}

    def __init__(self, db):
        self.db = db

    def remote_getUser(self, username):
        status = self._ask(self.db.get_user, _text_argument(username, "username"))
        return defang(NO_SUCH_USER if status is None else status)

    def remote_getUsers(self):
        try:
            return [defang(name) for name in self._ask(self.db.public_users)]
        except ListRefused:
            raise PBRemoteError(_PB_ERROR, LIST_DENIED) from None

    @staticmethod
    def _ask(lookup, *args):
        """Call the database; its failures are logged here, the caller is told only
        INTERNAL_ERROR (as on the finger port)."""
        try:
            return lookup(*args)
        except ListRefused:
            raise
        except Exception:
            log.exception("pb: back-end failed in %s%.100r", lookup.__name__, args)
            raise PBRemoteError(_INTERNAL, INTERNAL_ERROR) from None


class PBProtocol(SessionProtocol):
    """Perspective Broker on top of a UserDatabase, for TCPService: a session protocol (the
    connection stays open for many calls).  Each connection gets a PBSession."""

    name = "pb"

    def __init__(self, db, limits=None):
        super().__init__()
        self.db = db
        self.blocking = db.blocking    # then TCPService feeds sessions in its worker pool
        self.root = FingerRoot(db)
        self.pending = ByteBudget(PB_MAX_PENDING_TOTAL)   # unfinished calls, all clients
        self.limits = limits           # ClientLimits: its rate applies to each call

    def new_session(self, peer):
        return PBSession(self.root, peer, self.pending, self.limits, self.latency)

    @staticmethod
    def log_text(data):
        """Sessions log their calls themselves (PBSession); a connection's end shows nothing."""
        return b""


class ByteBudget:
    """Bytes that many connections hold together, with a cap (thread-safe: PB sessions may be
    fed in worker threads)."""

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def charge(self, delta):
        """Add `delta` (may be negative); False when a positive one goes over the cap (it is
        counted all the same: the caller gives it back when it drops the holder)."""
        with self._lock:
            self.used += delta
            return delta <= 0 or self.used <= self.limit


class PBSession(Session):
    """One PB connection: the server offers its dialects, the client picks one, both send
    ["version", 6], then the client sends calls.  feed(data) -> the bytes to send back;
    PBError means drop the connection (Twisted does the same on a protocol error).  close()
    gives back what its unfinished call held of the shared `budget`; each call's time goes
    to `latency` (a LatencyHistogram)."""

    def __init__(self, root, peer=None, budget=None, limits=None, latency=None):
        self.root = root
        self.peer = peer
        self.limits = limits
        self.latency = latency
        self.dialect = None
        self.failures = 0              # CopyableFailure "count": errors sent so far
        self._decoder = BananaDecoder(PB_MAX_CALL, PB_MAX_VALUES)
        self._budget = budget or ByteBudget(PB_MAX_PENDING_TOTAL)
        self._held = 0                 # bytes charged to the budget

    @property
    def idle(self):
        return self._decoder.idle

    def greeting(self):
        return banana_encode(list(PB_DIALECTS))

    def feed(self, data):
        try:
            expressions = self._decoder.feed(data)
        finally:
            held, self._held = self._held, self._decoder.pending
            within = self._budget.charge(self._held - held)
        if not within:
            raise PBError("the unfinished calls of all PB clients are over %d bytes"
                          % self._budget.limit)
        replies = []
        for sexp in expressions:
            reply = self._received(sexp)
            if reply is not None:
                replies.append(reply if isinstance(reply, bytes) else self._encode(reply))
        return b"".join(replies)

    def close(self):
        """Give back the share of the budget, and let go of the unfinished call."""
        self._budget.charge(-self._held)
        self._held = 0
        self._decoder = BananaDecoder(PB_MAX_CALL, PB_MAX_VALUES)

    def _encode(self, sexp):
        return banana_encode(sexp, vocab=self.dialect == b"pb")

    def _received(self, sexp):
        """One top-level expression -> the reply (an s-expression, or bytes) or None."""
        if self.dialect is None:
            if sexp not in PB_DIALECTS:
                raise PBError("unknown dialect %s" % _shown(sexp))
            self.dialect = sexp
            return [b"version", PB_VERSION]
        if not isinstance(sexp, list) or not sexp:
            raise PBError("a PB message must be a non-empty list")
        command, fields = sexp[0], sexp[1:]
        if command in (b"message", b"cachemessage"):
            if len(fields) != 6 or not isinstance(fields[0], int):
                raise PBError("a %s must have 6 fields, the first an int"
                              % command.decode())
            return self._call(command, *fields)
        if command == b"version":
            if fields != [PB_VERSION]:
                raise PBError("PB version %s, not %d" % (_shown(fields), PB_VERSION))
            return None
        if command in (b"decref", b"decache", b"uncache", b"didNotUnderstand"):
            log.debug("pb %s: %r ignored", format_peer(self.peer), command)
            return None
        return [b"didNotUnderstand", command]

    def _call(self, command, request_id, object_id, method, answer_required, args, kwargs):
        """A "message": call a method of the root object -> the answer or the error
        (encoded: an answer over Banana's limits becomes an error), or None."""
        name = (method.decode("utf-8", "replace") if isinstance(method, bytes)
                else "<%s>" % type(method).__name__)
        shown = name[:PB_MAX_NAME_SHOWN]
        failure = None
        started = time.monotonic()
        try:
            if self.limits is not None and self.limits.request(self.peer) is not None:
                raise PBRemoteError(_PB_ERROR, TOO_MANY_REQUESTS)
            if command == b"cachemessage":
                raise PBRemoteError(_PB_ERROR, "No cached objects here")
            if object_id != b"root":
                raise PBRemoteError(_PB_ERROR, "Invalid Object ID")
            attribute = self.root.methods.get(name)
            if attribute is None:
                raise PBRemoteError(_NO_SUCH_METHOD, "No such method: remote_" + shown)
            args, kwargs = unjelly(args), unjelly(kwargs)
            if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
                raise JellyError("arguments must be a tuple and a dictionary")
            kwargs = {_text_argument(key, "a keyword"): value
                      for key, value in kwargs.items()}
            result = getattr(self.root, attribute)(*args, **kwargs)
            reply = self._encode([b"answer", request_id, jelly(result)])
        except TypeError as error:                  # wrong arguments, as Python words it
            failure = PBRemoteError.from_exception(error)
        except PBRemoteError as error:
            failure = error
        except PBError as error:                    # an answer over Banana's limits
            log.error("pb %s: cannot answer %r: %s", format_peer(self.peer), shown, error)
            failure = PBRemoteError(_INTERNAL, INTERNAL_ERROR)
        except Exception:
            log.exception("pb %s: %r failed", format_peer(self.peer), shown)
            failure = PBRemoteError(_INTERNAL, INTERNAL_ERROR)
        if failure is not None:
            reply = self._encode(self._error(request_id, failure))
        query_log.record("pb", self.peer, shown, "ok" if failure is None else "error",
                         started)
        if self.latency is not None:
            self.latency.observe(time.monotonic() - started)
        return reply if answer_required else None

    def _error(self, request_id, failure):
        """["error", id, CopyableFailure] for a PBRemoteError: the client makes a
        CopiedFailure of it, which `await` raises as pb.RemoteError (remoteType: the first
        class name, as bytes; str(): the message).  Twisted's 11 keys; `parents` is the one
        that must be there."""
        self.failures += 1
        state = [("count", self.failures),
                 ("type", failure.types[0].encode("utf-8")),   # bytes, as Twisted sends it
                 ("value", defang(str(failure))),
                 ("captureVars", False), ("tb", None), ("unsafeTracebacks", False),
                 ("parents", list(failure.types)), ("frames", []), ("stack", []),
                 ("traceback", "Traceback unavailable\n")]
        return [b"error", request_id,
                [b"twisted.spread.pb.CopyableFailure",
                 [b"dictionary"] + [[jelly(key), jelly(value)] for key, value in state]]]


# == 9. The finger client =====================================================================

def parse_target(arg, verbose=False):
    """One client argument -> (query line, host, port).

    'user' asks localhost; 'user@host' asks host; '@host' lists host's users; 'user@h1@h2'
    asks h2 to forward 'user@h1' (RFC 1288 section 2.4: the rightmost host is asked).
    Hosts may be 'host:port' or '[v6]:port'; 'finger://host[:port]/user' works too."""
    if arg.startswith("finger://"):
        host, _, user = arg[len("finger://"):].partition("/")
        arg = "%s@%s" % (user, host)
    line, at, host = arg.rpartition("@")
    if not at:
        line, host = arg, "localhost"
    host, port = split_host_port(host, FINGER_PORT)
    if not host:
        raise ValueError("no host in %r" % arg)
    return ("/W " + line if verbose else line), host, port


def finger(line, host, port=FINGER_PORT, timeout=DEFAULT_TIMEOUT, max_bytes=MAX_REPLY_BYTES):
    """Send one query line to host:port and return the reply bytes.

    `timeout` bounds the whole exchange, not each read, so a server that drips bytes
    cannot hold the client; at most `max_bytes` are read.  Raises OSError."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(line.encode("utf-8") + b"\r\n")
        chunks, size = [], 0
        while size < max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(remaining)
            chunk = sock.recv(min(65536, max_bytes - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)


class Forwarder:
    """Answers a forwarding query {Q2} by fingering its rightmost host with our client
    (RFC 1288 section 2.4), for --forward and the --proxy listener.  Outbound rules: only
    the `ports` allowed (79), at most `max_hops` hosts in a query, `timeout` seconds for the
    whole exchange, `max_reply` bytes of answer.

    A forward waits for another server while it holds a worker; so at most `max_concurrent`
    run at once (more are answered busy), and one to our own `listener` (the service whose
    queries we forward, once bound) is refused: fingering ourselves would take a worker per
    hop, and a few such queries would hold every worker until they time out."""

    def __init__(self, ports=(FINGER_PORT,), timeout=DEFAULT_BACKEND_TIMEOUT,
                 max_reply=MAX_FORWARD_REPLY, max_hops=MAX_FORWARD_HOPS,
                 max_concurrent=DEFAULT_WORKERS):
        self.ports = frozenset(ports)
        self.timeout, self.max_reply, self.max_hops = timeout, max_reply, max_hops
        self.listener = None
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def forward(self, query, default_host=None):
        """(reply text, outcome).  A query with no @host goes to `default_host`."""
        hosts = list(query.hosts)
        if len(hosts) > self.max_hops:
            return "Too many hops: at most %d" % self.max_hops, "denied"
        target = hosts.pop() if hosts else default_host
        try:
            host, port = split_host_port(target, FINGER_PORT)
        except (ValueError, TypeError):
            return "Bad host name: %s" % target, "denied"
        if port not in self.ports:
            return "Forwarding to port %d is not allowed" % port, "denied"
        if self._is_ourselves(host, port):
            return "Forwarding to this server itself is not allowed", "denied"
        if not self._slots.acquire(blocking=False):
            return SERVER_BUSY, "busy"
        line = " ".join(query.names) + "".join("@" + rest for rest in hosts)
        try:
            reply = finger(("/W " if query.verbose else "") + line, host, port, self.timeout,
                           self.max_reply)
        except OSError as error:
            log.warning("forwarding %r to %s failed: %s", line, target, error)
            return COULD_NOT_CONNECT, "forward failed"
        finally:
            self._slots.release()
        return reply.decode("utf-8", "replace"), "forwarded"

    def _is_ourselves(self, host, port):
        """Whether host:port is our listener: its port, and its address or (a listener on
        every address) any address of this machine; 0.0.0.0 and :: reach this machine,
        and ::ffff:a.b.c.d is a.b.c.d."""
        own = self.listener.address if self.listener is not None else None
        if own is None or port != own[1]:
            return False
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return False                       # the connect will fail and say so
        everywhere = _plain_address(own[0] or "::")
        for _, _, _, _, sockaddr in found:
            address = _plain_address(sockaddr[0])
            if address.is_unspecified or address == everywhere or (
                    everywhere.is_unspecified and _is_local_address(address)):
                return True
        return False


def set_status(status, path=DEFAULT_SETTER_SOCKET, timeout=DEFAULT_TIMEOUT):
    """Set the caller's own status through the server's unix-socket setter; returns the
    server's one-line answer ('OK' or why not).  Raises OSError."""
    name = pwd.getpwuid(os.getuid()).pw_name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(("%s\n%s\n" % (name, status)).encode("utf-8"))
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < RECV_SIZE:
            chunk = sock.recv(RECV_SIZE)
            if not chunk:
                break
            reply += chunk
    return defang(reply.decode("utf-8", "replace")).strip()


# == 10. IRC: the tutorial's IRCReplyBot, a good citizen on real networks =====================
#
# ssl, random and base64 are imported inside the functions that use them, so the finger
# client never loads them.

IRC_PORT = 6667                   # plain IRC
IRC_TLS_PORT = 6697               # IRC over TLS from the first byte (RFC 7194)
IRC_DEFAULT_NICK = "fingerbot"
IRC_USER = "finger"               # the user name sent in USER (shown as ~finger without ident)
IRC_PASSWORD_ENV = "FINGER_IRC_PASSWORD"   # the SASL password, never on the command line
IRC_MAX_LINE = 512                # bytes in a line we send, CRLF included (RFC 1459 2.3)
IRC_SPLIT_BYTES = 400             # text bytes per PRIVMSG when a long reply is split
IRC_RELAY_ROOM = 100              # bytes kept free for the ":nick!user@host " a server puts

IRC_MAX_INPUT_LINE = 8191         # longest line taken from the server (IRCv3 tags allow 8191

IRC_MAX_REPLY_LINES = 5           # lines of one reply at most (one burst); the rest is cut
IRC_MAX_QUEUE = 100               # lines waiting for the flood limiter; replies beyond: dropped
IRC_WORKERS = 4                   # threads for the server's lookup and a slow back-end's
IRC_MAX_OUTPUT = 64 * 1024        # bytes the server may leave unread before we hang up
IRC_DEFAULT_NICKLEN = 9           # RFC 1459's limit, assumed after a 432 until 005 tells
IRC_NICK_TRIES = 10               # other nicks tried on one connection before giving up
IRC_FIRST_DELAY = 1.0             # seconds before the first reconnect; doubles each attempt
IRC_LOOKUP_AT_BIND = 2.0          # seconds bind() waits for the server's address (chroot)
IRC_QUIT_GRACE = 0.5              # seconds the QUIT gets to leave and be answered on close()
IRC_QUIT_MESSAGE = "finger.py stopping"
IRC_CTCP_ECHO = 64                # characters of a CTCP PING argument echoed back
IRC_THROTTLE_DELAY = 20.0         # seconds (plus up to half again) before coming back after

IRC_BAN_DELAY = 600.0             # seconds (less up to 20 %) before coming back after a ban
IRC_CAP_WAIT = 5.0                # seconds CAP LS may go unanswered before SASL is given up
IRC_JOIN_WAIT = 5.0               # seconds after 001 we wait for the end of the MOTD (and

IRC_RECLAIM_INTERVAL = 60.0       # seconds between ISONs for the wanted nick (no MONITOR)
# ERROR reasons: the server throttles reconnections (come back on its terms), or bans us
# (come back much later).
IRC_THROTTLED = re.compile(r"throttl|too fast|try again", re.IGNORECASE)
IRC_BANNED = re.compile(r"\bbann?(ed)?\b|\b[kgzd]-?lined?\b|\btoo many\b|\bflood",
                        re.IGNORECASE)         # a ban's words win over "try again"
IRC_STABLE = 60.0                 # seconds a welcomed connection must last to reset the back-off
IRC_MAX_CAPS = 256                # capabilities kept from CAP LS
IRC_MAX_CHANNELS = 256            # channels the bot keeps track of being in

_IRC_COMMAND = re.compile(r"[A-Za-z]+\Z|[0-9]{3}\Z")
_IRC_UNSAFE = re.compile("[\r\n\0]")
# CASEMAPPING (005) -> how nicks and channels fold; rfc1459 until the server says otherwise.
_IRC_CASEMAPS = {
    "ascii": str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"),
    "rfc1459": str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ[]\\~", "abcdefghijklmnopqrstuvwxyz{}|^"),
    "strict-rfc1459": str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ[]\\",
                                    "abcdefghijklmnopqrstuvwxyz{}|"),
}
_IRC_UNICODE_CASEMAPS = ("rfc8265", "precis", "rfc7613")   # Ergo's: Unicode case folding
_IRC_NICK = re.compile(r"[A-Za-z\[\]\\`^{}|_][A-Za-z0-9\[\]\\`^{}|_-]{0,63}\Z")   # RFC 2812
_IRC_NOT_NICK_CHARS = re.compile(r"[^A-Za-z0-9\[\]\\`^{}|_-]")
_IRC_CHANNEL = re.compile(r"[#&+!][^\0\a\r\n ,]{1,199}\Z")                        # RFC 2812
_IRC_MENTION = re.compile(r"([^\s:,]+)\s*[:,]\s*(\S+)\Z")   # "nick: name", "nick, name"


class IRCMessage:
    """One line from the server: `prefix` ('' when there is none), `command` (upper case) and
    `params` (a list; the trailing parameter, spaces and all, is the last one)."""

    __slots__ = ("prefix", "command", "params")

    def __init__(self, prefix, command, params):
        self.prefix, self.command, self.params = prefix, command, params

    @property
    def nick(self):
        """The sender's nick: the prefix up to '!' or '@'."""
        return self.prefix.split("!", 1)[0].split("@", 1)[0]

    def __repr__(self):
        return "IRCMessage(%r, %r, %r)" % (self.prefix, self.command, self.params)


def parse_irc_line(line):
    """A line from the server (str) -> IRCMessage, or None when it is malformed.

    Tolerant: IRCv3 message tags are skipped, a line end left on is ignored, runs of spaces
    count as one."""
    line = line.rstrip("\r\n")
    if line.startswith("@"):
        line = line.partition(" ")[2]
    line = line.lstrip(" ")
    prefix = ""
    if line.startswith(":"):
        prefix, _, line = line[1:].partition(" ")
        if not prefix:
            return None
    head, colon, trailing = (" " + line).partition(" :")
    words = [word for word in head.split(" ") if word]
    if not words or not _IRC_COMMAND.match(words[0]):
        return None
    return IRCMessage(prefix, words[0].upper(), words[1:] + ([trailing] if colon else []))


def irc_lower(text, casemapping="rfc1459"):
    """`text` folded by an IRC case mapping (005 CASEMAPPING): rfc1459, the default, takes
    A-Z and []\\~ for a-z and {}|^; strict-rfc1459 leaves ~ and ^ apart; ascii folds A-Z
    only; rfc8265 (PRECIS) folds Unicode letters.  An unknown mapping folds as rfc1459."""
    if casemapping in _IRC_UNICODE_CASEMAPS:
        return text.casefold()
    return text.translate(_IRC_CASEMAPS.get(casemapping, _IRC_CASEMAPS["rfc1459"]))


def _utf8_prefix(data, limit):
    """The longest start of the UTF-8 bytes `data` that is at most `limit` bytes and does not
    end inside a character."""
    if len(data) <= limit:
        return data
    cut = limit
    while cut > 0 and data[cut] & 0xC0 == 0x80:    # data[cut] continues a character
        cut -= 1
    return data[:cut]


def format_irc_line(command, *params, trailing=False):
    """A line to send -> bytes ending in CRLF, at most 512 of them.

    CR, LF and NUL are removed from every parameter, so no text can start a command of its
    own.  The last parameter goes as the trailing one (after ':') when it must or when
    `trailing` is true, and is cut on a UTF-8 boundary if the line would be too long.  The
    other parameters must be single non-empty words: ValueError otherwise."""
    params = [_IRC_UNSAFE.sub("", param) for param in params]
    for param in params[:-1]:
        if not param or " " in param or param.startswith(":"):
            raise ValueError("IRC parameter %r is not a single word" % param)
    head = " ".join([_IRC_UNSAFE.sub("", command)] + params[:-1]).encode("utf-8")
    if not params:
        return _utf8_prefix(head, IRC_MAX_LINE - 2) + b"\r\n"
    last = params[-1]
    marker = b" :" if trailing or not last or " " in last or last.startswith(":") else b" "
    room = IRC_MAX_LINE - 2 - len(head) - len(marker)
    if room < 0:
        raise ValueError("IRC line %r is too long" % head[:40])
    return head + marker + _utf8_prefix(last.encode("utf-8"), room) + b"\r\n"


def split_irc_text(text, limit=IRC_SPLIT_BYTES):
    """Text -> the lines of one or more PRIVMSGs: split at line ends (CR, LF and NUL never
    get through), then into pieces of at most `limit` UTF-8 bytes, at a space when there is
    one in the second half of a piece, and never inside a character.  Blank lines are left
    out."""
    limit = max(limit, 4)            # room for any character
    pieces = []
    for line in re.split("[\r\n]+", text.replace("\0", "")):
        data = line.encode("utf-8")
        while len(data) > limit:
            piece = _utf8_prefix(data, limit)
            space = piece.rfind(b" ", limit // 2)
            if space > 0:
                piece = piece[:space]
            pieces.append(piece.decode("utf-8"))
            data = data[len(piece) + (1 if space > 0 else 0):]
        pieces.append(data.decode("utf-8"))
    return [piece.rstrip(" ") for piece in pieces if piece.strip()]


def irc_backoff(attempt, cap=60.0, first=IRC_FIRST_DELAY, rand=None):
    """Seconds to wait before reconnect `attempt` (1 for the first retry): `first`, doubled
    each attempt, at most `cap`, less up to 20 % jitter so that bots cut off together do not
    come back together (and the cap is never passed).  Depends on the attempt number only:
    ClientService's model, not ReconnectingClientFactory's."""
    if rand is None:
        import random
        rand = random.random
    base = min(cap, first * 2.0 ** min(max(attempt - 1, 0), 32))
    return base * (1 - 0.2 * rand())


def alternate_nick(nick, attempt, nicklen=None):
    """The nick to try after `attempt` refusals (433 taken, 436, 437): nick_, nick2, nick3...,
    `nick` cut so that the whole fits in `nicklen` characters (when known)."""
    suffix = "_" if attempt <= 1 else str(attempt)
    if nicklen:
        nick = nick[:max(1, nicklen - len(suffix))]
    return nick + suffix


def reshape_nick(nick, nicklen=None):
    """A nick of another shape after 432 (erroneous nickname): RFC 2812's characters only,
    not starting with a digit or '-', within `nicklen` (RFC 1459's 9 when unknown)."""
    nick = _IRC_NOT_NICK_CHARS.sub("", nick)
    if not _IRC_NICK.match(nick[:1] or "0"):
        nick = "f" + nick
    return nick[:nicklen or IRC_DEFAULT_NICKLEN]


def irc_tls_context(cafile=None):
    """The bot's TLS context: the server's certificate and host name are checked against the
    system's CAs, or only against those in `cafile` (PEM); TLS 1.2 at least.  There is no
    way to turn the checks off."""
    import ssl
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as error:
        raise FieldError("cafile", "cannot load the certificates: %s"
                         % (getattr(error, "strerror", None) or error), cafile) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _SessionEnd(Exception):
    """Ends the connection to the server; the bot reconnects after the back-off, or after
    the pause `pause` names ("ban" or "throttle").  `logged`: already told at ERROR."""

    def __init__(self, reason, pause=None, logged=False):
        super().__init__(reason)
        self.pause, self.logged = pause, logged


class IRCRegistration:
    """IRCSession's registration: CAP and SASL PLAIN, PASS, NICK and USER, other nicks
    while the wanted one is refused, the welcome, the 005 lines, the channels to join, and
    the server's refusals (ERROR, bans, throttles) that end the connection."""

    def _register(self):
        if self.bot.account:
            self._send("CAP", "LS", "302")
            self._cap_pending = True
            self._cap_due = self.now + self.bot.cap_wait
        if self.bot._server_password:
            self._send("PASS", self.bot._server_password)
        self._send("NICK", self.nick)
        self._send("USER", IRC_USER, "0", "*", self.bot.realname)

    def _cap_end(self):
        if self._cap_pending:
            self._cap_pending = False
            self._send("CAP", "END")

    def _on_ping(self, message):
        self._send("PONG", message.params[-1] if message.params else "")

    def _on_welcome(self, message):
        if self.bot.account and not (self._logged_in or self._sasl_failed):
            self._no_sasl("the server welcomed us without answering CAP LS (no IRCv3 "
                          "capabilities)")
        self.registered = True
        self.welcomed_at = self.now
        self.bot.trouble.clear()
        self._cap_pending = False
        if message.params and _IRC_NICK.match(message.params[0]):
            self.nick = message.params[0]
        log.info("irc: registered on %s as %s", format_address(self.bot.address), self.nick)
        self._join_due = self.now + self.bot.join_wait

    def _on_end_of_motd(self, message):
        """376 (end of the MOTD) or 422 (no MOTD): registration is over, and the 005 lines
        with it."""
        if self.registered:
            self._settle()

    def _settle(self):
        """Once registered and the 005 lines read: the bot mode, the channels, and watching
        for the wanted nick if we are under another one."""
        self._join_due = None
        if self._settled:
            return
        self._settled = True
        if self._bot_mode:
            self._send("MODE", self.nick, "+" + self._bot_mode)
        channels = []
        for channel in self.bot.channels:
            if channel[0] in self._chantypes:
                channels.append(channel)
            else:
                log.warning("irc: %s is no channel name here (CHANTYPES=%s); not joining it",
                            channel, self._chantypes)
        while channels:                 # as few JOIN lines as fit, through the limiter
            batch = [channels.pop(0)]
            while (channels and len(",".join(batch + channels[:1])) <= IRC_SPLIT_BYTES
                   and len(batch) < (self._join_max or len(self.bot.channels))):
                batch.append(channels.pop(0))
            self._queue_lines([format_irc_line("JOIN", ",".join(batch))], "a JOIN")
        if self.bot.nicklen and len(self.bot.wanted_nick) > self.bot.nicklen:
            self._reclaimable = False          # the server could never give it to us
        if not self._is_me(self.bot.wanted_nick) and self._reclaimable:
            if self._monitor:
                self._send("MONITOR", "+", self.bot.wanted_nick)
            else:
                self._reclaim_due = self.now

    def _on_isupport(self, message):
        for token in message.params[1:-1]:
            key, _, value = token.partition("=")
            key = key.upper()
            if key == "NICKLEN" and value.isdigit() and int(value) > 0:
                self.bot.nicklen = int(value)
            elif key == "CASEMAPPING" and value:
                self.casemapping = value.lower()
                self._joined = {self._fold(channel): channel
                                for channel in self._joined.values()}
            elif key == "CHANTYPES":
                self._chantypes = value
            elif key == "TARGMAX":
                for limit in value.split(","):
                    command, _, count = limit.partition(":")
                    if command.upper() == "JOIN" and count.isdigit() and int(count) > 0:
                        self._join_max = int(count)
            elif key == "MONITOR":
                self._monitor = True
            elif key == "BOT" and value:
                self._bot_mode = value[0]

    def _on_try_again(self, message):
        """263: the server is too busy for what we asked; during registration, come back
        later on its terms."""
        if not self.registered:
            raise _SessionEnd("the server asks us to try again later: %s"
                              % (message.params[-1] if message.params else ""),
                              pause="throttle")

    def _on_nick_refused(self, message):
        """433 (in use), 436 (collision), 437 (unavailable) and 432 (erroneous)."""
        if self.registered:
            if len(message.params) > 1 and self._fold(message.params[1]) == \
                    self._fold(self.bot.wanted_nick):
                log.debug("irc: %s is still taken", self.bot.wanted_nick)   # reclaim: later
                self._reclaiming = False
            else:
                log.warning("irc: the server refused a nick: %s", " ".join(message.params[1:]))
            return
        if len(self._nicks_tried) > IRC_NICK_TRIES:
            raise _SessionEnd("no nick accepted after %d tries (%s)"
                              % (len(self._nicks_tried), ", ".join(self._nicks_tried)))
        refused = self.nick
        if message.command == "432":       # bad shape or too long: change the shape
            self._reclaimable = False
            self._nick_limit = self.bot.nicklen or IRC_DEFAULT_NICKLEN
            self._nick_base = reshape_nick(self._nick_base, self._nick_limit)
        limit = self.bot.nicklen or self._nick_limit
        nick, attempt = self._nick_base, 0
        while nick in self._nicks_tried:
            attempt += 1
            nick = alternate_nick(self._nick_base, attempt, limit)
        self._nicks_tried.append(nick)
        self.nick = nick
        log.info("irc: nick %s refused (%s %s); trying %s", refused, message.command,
                 message.params[-1] if message.params else "", nick)
        self._send("NICK", nick)

    def _on_error(self, message):
        reason = message.params[-1] if message.params else ""
        if IRC_BANNED.search(reason):
            self._banned(reason)
        if IRC_THROTTLED.search(reason):
            raise _SessionEnd("the server throttles our connections: ERROR %s" % reason,
                              pause="throttle")
        raise _SessionEnd("the server closed the link: ERROR %s" % reason)

    def _on_refused(self, message):
        """464 (bad server password), 465 (banned): no point in coming back soon."""
        reason = message.params[-1] if message.params else ""
        if message.command == "464":
            reason = "it refused the server password: " + reason
        self._banned(reason)

    def _banned(self, reason):
        self.bot.trouble.report("irc: %s banned us: %s; trying again in about %d minutes",
                                format_address(self.bot.address), reason,
                                self.bot.ban_delay // 60, key="ban")
        raise _SessionEnd("banned: %s" % reason, pause="ban", logged=True)

    def _on_not_registered(self, message):
        log.warning("irc: sent a command before 001 (a bug): %s", " ".join(message.params))

    # -- CAP and SASL ----------------------------------------------------------------------

    def _on_cap(self, message):
        params = message.params
        if len(params) < 3:
            return
        sub = params[1].upper()
        if not self._cap_pending:
            return                        # we asked nothing (more): nothing to answer
        if sub == "LS":
            for cap in params[-1].split():          # bounded, but sasl is always kept
                name, _, value = cap.partition("=")
                if name.lower() == "sasl" or len(self._caps) < IRC_MAX_CAPS:
                    self._caps[name.lower()] = value
            if len(params) >= 4 and params[2] == "*":
                return                    # more CAP LS lines follow (302)
            self._cap_due = None
            mechanisms = self._caps.get("sasl")
            if mechanisms is None:
                self._no_sasl("the server offers no SASL (CAP LS: %s)"
                              % (" ".join(sorted(self._caps)) or "nothing"))
            elif mechanisms and "PLAIN" not in mechanisms.upper().split(","):
                self._no_sasl("the server's SASL has no PLAIN (%s)" % mechanisms)
            else:
                self._send("CAP", "REQ", "sasl")
        elif sub == "ACK" and "sasl" in params[-1].lower().split():
            self._sasl_started = True
            self._send("AUTHENTICATE", "PLAIN")
        elif sub == "NAK":
            self._no_sasl("the server refused the capability %s" % params[-1])

    def _on_unknown_command(self, message):
        """421: a server without IRCv3 does not know CAP."""
        if len(message.params) > 1 and message.params[1].upper() == "CAP" and self.bot.account:
            self._no_sasl("the server does not know CAP (no IRCv3 capabilities)")

    def _no_sasl(self, why):
        """The login as `account` cannot happen on this connection: say so once, at ERROR;
        then go on without it, or (require_sasl) leave and back off."""
        self._cap_due = None
        if self._sasl_failed or self._logged_in:
            return
        self._sasl_failed = True
        self.bot.trouble.report("irc: not logged in as %s on %s: %s; %s", self.bot.account,
                                format_address(self.bot.address), why,
                                "disconnecting (%s)" % option_of_field("require_sasl")
                                if self.bot.require_sasl else "going on without the account "
                                "(%s refuses that)" % option_of_field("require_sasl"), key="sasl")
        if self.bot.require_sasl:
            raise _SessionEnd("not logged in as %s" % self.bot.account, logged=True)
        self._cap_end()

    def _on_authenticate(self, message):
        if message.params[:1] != ["+"] or not self._sasl_started:
            return
        self._sasl_started = False          # the password goes once, and only when asked
        import base64
        payload = base64.b64encode(("\0%s\0%s" % (self.bot.account, self.bot._password))
                                   .encode("utf-8")).decode("ascii")
        chunks = [payload[start:start + 400] for start in range(0, len(payload), 400)]
        for chunk in chunks:
            self._send("AUTHENTICATE", chunk)
        if len(chunks[-1]) == 400:
            self._send("AUTHENTICATE", "+")

    def _on_sasl_done(self, message):
        """903 success, 907 already logged in, 902/904/905/906 failure: CAP END in any case."""
        reason = message.params[-1] if message.params else ""
        if message.command in ("903", "907"):
            self._logged_in = True
            log.info("irc: SASL login as %s: %s", self.bot.account, reason)
            self._cap_end()
        else:
            self._no_sasl("the login was refused (%s %s)" % (message.command, reason))


class IRCNickKeeper:
    """IRCSession's taking back of the wanted nick: by MONITOR where the server has it,
    else by ISON every `reclaim_interval` seconds, and when its holder quits or changes."""

    def _reclaim(self):
        """The wanted nick looks free: ask for it, through the flood limiter, and not again
        before the server has answered (a user toggling that nick cannot make us flood)."""
        if (not self._is_me(self.bot.wanted_nick) and self._reclaimable and self.registered
                and not self._reclaiming):
            line = format_irc_line("NICK", self.bot.wanted_nick)
            self._reclaiming = self._queue_lines([line], "a NICK")

    def _on_ison(self, message):
        """303: which of the nicks we asked about are online."""
        online = {self._fold(nick) for nick in (message.params[-1] if message.params
                                                 else "").split()}
        if self._fold(self.bot.wanted_nick) not in online:
            self._reclaim()

    def _on_monitor_offline(self, message):
        """731: MONITORed nicks that went (or are) offline."""
        nicks = [target.split("!")[0] for target in (message.params[-1] if message.params
                                                      else "").split(",")]
        if self._fold(self.bot.wanted_nick) in map(self._fold, nicks):
            self._reclaim()

    def _on_quit(self, message):
        if self._fold(message.nick) == self._fold(self.bot.wanted_nick):
            self._reclaim()

    def _on_nick(self, message):
        if not message.params:
            return
        if self._is_me(message.nick) and _IRC_NICK.match(message.params[0]):
            self.nick = message.params[0]
            self._reclaiming = False
            if self._is_me(self.bot.wanted_nick) and self.registered:
                log.info("irc: took the nick %s back", self.nick)
                self._reclaim_due = None
                if self._monitor:
                    self._send("MONITOR", "-", self.bot.wanted_nick)
        elif self._fold(message.nick) == self._fold(self.bot.wanted_nick):
            self._reclaim()                # its holder took another nick


class IRCConversation:
    """IRCSession's channels and messages: the channels it is in, the PRIVMSGs it answers
    ("Status of NAME: STATUS") and the CTCPs."""

    def _on_join(self, message):
        if message.params and self._is_me(message.nick):
            for channel in message.params[0].split(","):
                if len(self._joined) >= IRC_MAX_CHANNELS:
                    self.bot.warnings.report("irc: in %d channels already; not answering in %s",
                                        len(self._joined), channel[:64])
                    break
                self._joined[self._fold(channel)] = channel
                log.info("irc: joined %s", channel)

    def _on_part(self, message):
        if message.params and self._is_me(message.nick):
            for channel in message.params[0].split(","):
                self._joined.pop(self._fold(channel), None)

    def _on_kick(self, message):
        if len(message.params) >= 2 and self._is_me(message.params[1]):
            self._joined.pop(self._fold(message.params[0]), None)
            log.warning("irc: %s kicked us from %s: %s", message.nick, message.params[0],
                        message.params[-1])

    def _on_cannot_join(self, message):
        log.warning("irc: cannot join %s: %s", " ".join(message.params[1:-1]),
                    message.params[-1] if message.params else "")

    def _on_privmsg(self, message):
        """PRIVMSG to us: the text is a user name (or a CTCP); in a joined channel we answer
        "NICK: NAME" and "NICK, NAME".  Our own messages are never answered, nor NOTICEs
        (RFC 1459 4.4.2: no automatic replies to NOTICE), which have no handler at all.
        Text of more than one word is no user name and gets no answer: as every answer has
        several words, two bots (or a bot and a service) can never answer each other forever."""
        if len(message.params) < 2 or not self.registered:
            return
        target, text, sender = message.params[0], message.params[-1], message.nick
        if not _IRC_NICK.match(sender) or self._is_me(sender):
            return                 # a server, or no nick we could send an answer to
        if self._is_me(target):
            if text.startswith("\x01"):
                self._ctcp(sender, text)
            elif len(text.split()) == 1:
                self._answer(sender, sender, text.strip())
        elif self._fold(target) in self._joined and not text.startswith("\x01"):
            mention = _IRC_MENTION.match(text.strip())
            if mention and self._is_me(mention.group(1)):
                self._answer(sender, target, mention.group(2), prefix=sender + ": ")

    def _answer(self, sender, target, name, prefix=""):
        """Look the user up (IRCBot.look_up: maybe in a worker), then answer."""
        self.bot.look_up(name, functools.partial(self._answered, sender, target, name, prefix))

    def _answered(self, sender, target, name, prefix, status, outcome):
        if outcome == "dropped":
            self.bot.warnings.report("irc: %d lookups already wait for the back-end; dropped "
                                     "the answer to %s", IRC_MAX_QUEUE, target)
        else:
            text = defang("%sStatus of %s: %s" % (prefix, name, NO_SUCH_USER if status is None
                                                   else status))
            room = (IRC_MAX_LINE - IRC_RELAY_ROOM
                    - len(("PRIVMSG %s :\r\n" % target).encode("utf-8")))
            lines = split_irc_text(text, min(IRC_SPLIT_BYTES, room))
            if len(lines) > IRC_MAX_REPLY_LINES:
                lines = lines[:IRC_MAX_REPLY_LINES]
                lines[-1] += " [...]"
            if not self._enqueue("PRIVMSG", target, lines):
                outcome = "dropped"
        self.bot.counts[outcome] += 1
        query_log.record("irc", sender if target == sender else "%s in %s" % (sender, target),
                         name, outcome)

    def _ctcp(self, sender, text):
        """CTCP VERSION and PING are answered by NOTICE; other CTCPs are ignored."""
        command, _, argument = text.strip("\x01").partition(" ")
        command = command.upper()
        if command == "VERSION":
            reply = "VERSION finger.py %s (the Twisted finger tutorial's bot, Python %d.%d)" % (
                __version__, sys.version_info[0], sys.version_info[1])
        elif command == "PING":
            reply = ("PING " + argument.replace("\x01", "")[:IRC_CTCP_ECHO]).rstrip()
        else:
            return
        if self._enqueue("NOTICE", sender, ["\x01%s\x01" % defang(reply)]):
            self.bot.counts["ctcp"] += 1


class IRCSession(IRCRegistration, IRCNickKeeper, IRCConversation):
    """One connection's IRC, the tutorial's IRCReplyBot without a socket: bytes from the
    server go in (feed), and step() does what is due and gives the bytes to send with the
    seconds until it must be called again.  It registers (CAP, SASL PLAIN, PASS, NICK,
    USER), answers PING, sends its own PING after `keepalive` seconds of silence and ends
    the connection when no answer comes within `keepalive_timeout` (or no welcome within
    `register_timeout`), follows 005, joins, takes its nick back, and answers through the
    flood limiter.  _SessionEnd from feed() or step() ends the connection.  `bot` (an
    IRCBot) holds the configuration and what outlives a connection; every time is a
    time.monotonic() value passed in, so tests drive the clock."""

    def __init__(self, bot, now):
        self.bot = bot
        self.now = now
        self.nick = bot.wanted_nick
        self.registered = False
        self.welcomed_at = None       # when this connection got its 001
        self._nick_base, self._nicks_tried = bot.wanted_nick, [bot.wanted_nick]
        self._nick_limit = None       # RFC 1459's 9 once a 432 says the nick is too long
        self._inbuf, self._skipping = b"", False
        self._outbuf, self._queue = b"", []
        self._bucket = TokenBucket(bot.burst, bot.line_interval, clock=lambda: self.now)
        self._caps, self._cap_pending, self._sasl_started = {}, False, False
        self._cap_due = None          # when an unanswered CAP LS means no SASL
        self._logged_in, self._sasl_failed = False, False
        self.casemapping = "rfc1459"  # until 005 says otherwise
        self._chantypes, self._join_max = "#&", None
        self._monitor, self._bot_mode = False, None
        self._join_due = None         # when to join without the end of the MOTD
        self._settled = False         # joined, bot mode set, nick reclaim started
        self._reclaim_due = None      # when to ask ISON for the wanted nick
        self._reclaimable = True      # False once a 432 has changed the nick's shape
        self._reclaiming = False      # our NICK for it is on its way
        self._joined = {}             # folded channel -> channel
        self._last_received, self._ping_sent = now, None
        self._register_by = now + bot.register_timeout
        self._register()

    @property
    def joined(self):
        return sorted(self._joined.values())

    def feed(self, data, now):
        """Bytes from the server: its lines are handled (CRLF or LF; too long ones
        skipped)."""
        self.now = self._last_received = now
        self._ping_sent = None
        self._inbuf += data
        while True:
            end = self._inbuf.find(b"\n")
            if end < 0:
                if len(self._inbuf) > IRC_MAX_INPUT_LINE:
                    if not self._skipping:
                        log.warning("irc: skipped a line of more than %d bytes from the server",
                                    IRC_MAX_INPUT_LINE)
                    self._inbuf, self._skipping = b"", True
                return
            line, self._inbuf = self._inbuf[:end], self._inbuf[end + 1:]
            if self._skipping:          # the end of a line already skipped
                self._skipping = False
                continue
            if len(line) > IRC_MAX_INPUT_LINE:
                log.warning("irc: skipped a line of %d bytes from the server", len(line))
                continue
            text = line.rstrip(b"\r").decode("utf-8", "replace")
            if text.strip():
                self._handle(text)

    def step(self, now):
        """Do what is due at `now`: (the bytes to send, seconds until the next step)."""
        self.now = now
        due = self._due(now)
        while self._queue and self._bucket.take(now):
            self._outbuf += self._queue.pop(0)
        if self._queue:
            due = min(due, self._bucket.delay(now))
        data, self._outbuf = self._outbuf, b""
        return data, max(due, 0.001)

    def quit(self):
        """The QUIT line; nothing queued goes after it."""
        self._queue = []
        return format_irc_line("QUIT", IRC_QUIT_MESSAGE, trailing=True)

    def _due(self, now):
        """Seconds until something is due; does what is due now, and ends the session when
        a deadline has passed."""
        if self._cap_due is not None and now >= self._cap_due:
            self._no_sasl("the server did not answer CAP LS within %g s" % self.bot.cap_wait)
        if not self.registered:
            if now >= self._register_by:
                raise _SessionEnd("no welcome (001) within %g s" % self.bot.register_timeout)
            return min(self._register_by, self._cap_due or self._register_by) - now
        if self._join_due is not None and now >= self._join_due:
            self._settle()
        if self._reclaim_due is not None and now >= self._reclaim_due:
            self._queue_lines([format_irc_line("ISON", self.bot.wanted_nick)], "an ISON")
            self._reclaim_due = now + self.bot.reclaim_interval
        if self._ping_sent is not None:
            waited = now - self._ping_sent
            if waited >= self.bot.keepalive_timeout:
                raise _SessionEnd("no answer to our PING within %g s (silent for %.1f s); "
                                  "the server or the link is down"
                                  % (self.bot.keepalive_timeout, now - self._last_received))
            due = self.bot.keepalive_timeout - waited
        elif now - self._last_received >= self.bot.keepalive:
            self._send("PING", "finger.py")
            self._ping_sent = now
            due = self.bot.keepalive_timeout
        else:
            due = self.bot.keepalive - (now - self._last_received)
        for when in (self._join_due, self._reclaim_due):
            if when is not None:
                due = min(due, when - now)
        return due

    def _handle(self, text):
        message = parse_irc_line(text)
        if message is None:
            log.warning("irc: skipped a malformed line from the server: %r", text[:200])
            return
        log.debug("irc <- %s", text)
        handler = self._HANDLERS.get(message.command)
        if handler is None:
            return
        try:
            getattr(self, handler)(message)
        except _SessionEnd:
            raise
        except Exception:
            log.exception("irc: handling %r failed", text[:200])


    # -- output ----------------------------------------------------------------------------

    def _send(self, command, *params):
        """Send a line now (protocol lines: registration, PONG, PING)."""
        line = format_irc_line(command, *params)
        if log.isEnabledFor(logging.DEBUG):
            shown = line if command not in ("PASS", "AUTHENTICATE") else command.encode()
            log.debug("irc -> %s", shown.rstrip().decode("utf-8", "replace"))
        self._outbuf += line

    def _enqueue(self, command, target, texts):
        """Queue messages for the flood limiter; False when the queue is full."""
        return self._queue_lines([format_irc_line(command, target, text, trailing=True)
                                  for text in texts], "the answer to %s" % target)

    def _queue_lines(self, lines, what):
        """The one way into the flood limiter's queue: it never holds more than
        IRC_MAX_QUEUE lines; what would pass that is dropped (logged, throttled)."""
        if len(self._queue) + len(lines) > IRC_MAX_QUEUE:
            self.bot.warnings.report("irc: %d lines already wait to be sent; dropped %s",
                                     len(self._queue), what)
            return False
        self._queue += lines
        return True

    def _fold(self, text):
        return irc_lower(text, self.casemapping)

    def _is_me(self, nick):
        return self._fold(nick) == self._fold(self.nick)

    # command -> the name of the method that handles it
    _HANDLERS = {
        "PING": "_on_ping", "001": "_on_welcome", "005": "_on_isupport",
        "376": "_on_end_of_motd", "422": "_on_end_of_motd", "263": "_on_try_again",
        "432": "_on_nick_refused", "433": "_on_nick_refused", "436": "_on_nick_refused",
        "437": "_on_nick_refused", "ERROR": "_on_error", "464": "_on_refused",
        "465": "_on_refused", "451": "_on_not_registered",
        "CAP": "_on_cap", "421": "_on_unknown_command", "AUTHENTICATE": "_on_authenticate",
        "902": "_on_sasl_done", "903": "_on_sasl_done", "904": "_on_sasl_done",
        "905": "_on_sasl_done", "906": "_on_sasl_done", "907": "_on_sasl_done",
        "303": "_on_ison", "731": "_on_monitor_offline", "QUIT": "_on_quit",
        "NICK": "_on_nick",
        "JOIN": "_on_join", "PART": "_on_part", "KICK": "_on_kick",
        "403": "_on_cannot_join", "405": "_on_cannot_join", "471": "_on_cannot_join",
        "473": "_on_cannot_join", "474": "_on_cannot_join", "475": "_on_cannot_join",
        "PRIVMSG": "_on_privmsg",
    }


class IRCLink:
    """IRCBot's connection to its server, one at a time, on the bot's Loop: the lookup (in
    a worker: a slow resolver never holds the loop), a non-blocking connect to each address
    in turn, the TLS handshake, the session's reads, writes and timers, and after the end
    the pause before the next one (the back-off, a throttle or a ban).  `_phase` is where
    it is: lookup, connect, handshake, session, quitting or waiting."""

    def _dial(self):
        """Look the server up (in the loop's worker: a slow resolver never holds the loop),
        then connect."""
        self._attempt += 1
        log.info("irc: connecting to %s%s (attempt %d)", format_address(self.address),
                 " (TLS)" if self.tls else "", self._failures + 1)
        self._phase = "lookup"
        self.loop.schedule(self._timer, self.register_timeout)
        host, port = self.address
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            self.loop.run_in_worker(socket.getaddrinfo, (host, port, 0, socket.SOCK_STREAM),
                                    functools.partial(self._looked_up, self._attempt))
            return
        self._connect(list(addresses))

    def _looked_up(self, attempt, future):
        if attempt != self._attempt or self._phase != "lookup":
            return                          # too late: that attempt is over
        try:
            self._addresses = future.result()
        except OSError as error:
            if not self._addresses:
                self._end(error)
                return
            log.warning("irc: cannot look up %s (%s); using the address found before",
                        self.host, error)
        self._connect(list(self._addresses))

    def _connect(self, addresses):
        """Connect to the first of `addresses` that takes it, without blocking."""
        self._phase = "connect"
        error = OSError("no address for %s" % self.host)
        while addresses:
            family, kind, proto, _, sockaddr = addresses.pop(0)
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            code = sock.connect_ex(sockaddr)
            if code in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                self._link, self._rest, self._sockaddr = Transport(sock), addresses, sockaddr
                self.loop.watch(sock, selectors.EVENT_WRITE, self._guarded, self._on_ready)
                return
            sock.close()
            error = OSError(code, "connecting to %s: %s" % (format_address(sockaddr),
                                                            os.strerror(code)))
        self._end(error)

    def _connected(self):
        sock = self._link.sock
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._drop()
            if self._rest:
                self._connect(self._rest)
                return
            raise OSError(code, "connecting to %s: %s" % (format_address(self._sockaddr),
                                                          os.strerror(code)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self.ssl_context is None:
            self._start_session()
            return
        self.loop.watch(sock, 0)                    # the TLS socket takes it over
        self._link.start_tls(self.ssl_context, server_hostname=self.host)
        self._phase = "handshake"
        self._handshake()

    def _handshake(self):
        wanted = self._link.handshake()
        if wanted:
            self.loop.watch(self._link.sock, wanted, self._guarded, self._on_ready)
        else:
            self._start_session()

    def _start_session(self):
        self._phase = "session"
        self.session = IRCSession(self, self.clock())
        self._pump()

    def _on_ready(self, mask):
        if self._phase == "connect":
            self._connected()
        elif self._phase == "handshake":
            self._handshake()
        elif self._phase == "quitting":
            self._flush()
            if mask & selectors.EVENT_READ and self._receive() is None:
                self.loop.stop()               # the server hung up after our QUIT
        else:
            if mask & selectors.EVENT_READ:
                if self._receive() is None:
                    raise _SessionEnd("the server closed the connection")
            self._pump()

    def _on_timer(self, _=None):
        if self._phase == "waiting":
            self._dial()
        elif self._phase == "session":
            self._pump()
        elif self._phase != "quitting":
            raise socket.timeout("timed out connecting (limit %g s)" % self.register_timeout)

    def _receive(self):
        """Read until the socket has nothing more (TLS may hold decrypted bytes a select
        cannot see); None when the server has closed."""
        while True:
            data = self._link.recv()
            if data is None:
                return True
            if not data:
                return None
            if self._phase == "session":
                self.session.feed(data, self.clock())

    def _pump(self):
        """Send what the session has to say; be woken when it is next due."""
        data, due = self.session.step(self.clock())
        self._outbuf += data
        self._flush()
        if len(self._outbuf) > IRC_MAX_OUTPUT:
            raise _SessionEnd("the server reads nothing of what we send")
        self.loop.schedule(self._timer, due)

    def _flush(self):
        while self._outbuf:
            sent = self._link.send(self._outbuf)
            if not sent:
                break                              # the socket is full
            self._outbuf = self._outbuf[sent:]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._outbuf else 0)
        self.loop.watch(self._link.sock, events, self._guarded, self._on_ready)

    def _guarded(self, step, mask=None):
        """Run a step of the connection; an error ends the connection (and, but for a
        stop, the bot reconnects): it never ends the bot."""
        try:
            step(mask)
        except (_SessionEnd, OSError) as error:    # ssl.SSLError and socket.timeout too
            self._end(error)
        except Exception:                          # a bug: log it, and reconnect
            log.exception("irc: %s: the connection failed", format_address(self.address))
            self._end(None)

    def _end(self, error):
        """The connection is over: say why, and come back after the pause it calls for."""
        where = format_address(self.address)
        if self._stopping:
            self._drop()
            self.loop.stop()
            return
        if isinstance(error, _SessionEnd):
            log.log(logging.INFO if error.logged else logging.WARNING, "irc: %s: %s", where,
                    error)
        elif getattr(error, "verify_message", None):
            self.trouble.report("irc: %s: the server's certificate was refused (%s); %s",
                                where, error.verify_message, self._tls_fix(error), key="tls")
        elif error is not None:
            log.warning("irc: %s: %s", where, getattr(error, "strerror", None) or error)
        welcomed_at = self.session.welcomed_at if self.session is not None else None
        self._drop()
        if welcomed_at is not None and self.clock() - welcomed_at >= self.stable_after:
            self._failures = 0                 # it worked for a while: start over
        self._failures += 1
        delay = self._pause(getattr(error, "pause", None))
        log.info("irc: reconnecting to %s in %.1f s (attempt %d)", where, delay,
                 self._failures + 1)
        self._phase = "waiting"
        self.loop.schedule(self._timer, delay)

    def _drop(self):
        """Close the socket of the connection, if any; the session goes with it."""
        self.session = None
        if self._link is not None:
            self.loop.watch(self._link.sock, 0)
            self._link.sock.close()
            self._link = None
        self._outbuf = b""
        self._phase = None

    def _pause(self, ended_by):
        """Seconds to wait before the next connection, after how the last one ended: a ban,
        a throttle, or anything else (the back-off)."""
        import random
        if ended_by == "ban":
            return self.ban_delay * (1 - 0.2 * random.random())
        if ended_by == "throttle":
            return self.throttle_delay * (1 + 0.5 * random.random())
        return irc_backoff(self._failures, self.backoff_cap)

    def _tls_fix(self, error):
        """What to do about a certificate the TLS check refused."""
        if "hostname" in error.verify_message.lower() or "IP address mismatch" in \
                error.verify_message:
            return ("connect by a name the certificate carries (%s %s is not one of them)"
                    % (option_of_field("host"), self.host))
        if self.cafile:
            return "%s %s holds no CA that signed it" % (option_of_field("cafile"), self.cafile)
        return ("name the CA that signed it with %s FILE (a self-signed server: its own "
                "certificate)" % option_of_field("cafile"))


class IRCBot(IRCLink, Service):
    """The tutorial's IRCReplyBot on plain sockets: it answers a private message NAME (or
    "NICK: NAME" / "NICK, NAME" in a joined channel) with "Status of NAME: STATUS".

    Unlike Twisted's IRCClient it sends its own PING after `keepalive` seconds of silence and
    reconnects when nothing comes back within `keepalive_timeout`; it gives up on a
    connection that is not welcomed (001) within `register_timeout`; it reconnects with
    attempt-based exponential back-off (`backoff_cap`), reset once a connection has lasted
    `stable_after` seconds after its 001; it limits its output
    to `burst` lines, then one per `line_interval` seconds; over TLS it checks the
    certificate and host name.  SASL PLAIN is used when `account` and `password` are given
    (with `require_sasl`, the bot disconnects rather than stay without its account), PASS
    when `server_password` is.  It follows the server's 005: CASEMAPPING for every
    comparison of nicks and channels, NICKLEN, CHANTYPES, TARGMAX for JOIN, BOT (it sets
    that mode), MONITOR (to take its nick back when the holder leaves; else ISON every
    `reclaim_interval` seconds).  A throttled reconnection waits `throttle_delay`, a ban
    `ban_delay`; a ban, a refused certificate and a failed login are logged once per streak.

    The protocol is an IRCSession per connection; this class is the connection, on a Loop
    in the bot's thread: the server's lookup and a back-end's that may block in the loop's
    workers, a non-blocking connect, a Transport (TLS too), the session's timers, the
    back-off between connections (IRCLink).  Its times come from `clock` (tests drive it).
    Methods for the caller: those of Service (start, stop, ...).  `address` is the server's
    (host, port); `nick` the nick in use; `registered` whether the server welcomed the bot;
    `joined` its channels; `counts` the answers by outcome (for the metrics).  close() ends
    it within a second in any state: looking up, connecting, registered, or waiting."""

    name = "irc"

    def __init__(self, db, host, port=None, *, nick=IRC_DEFAULT_NICK, channels=(), tls=False,
                 cafile=None, account=None, password=None, server_password=None,
                 realname="finger.py bot", keepalive=120.0, keepalive_timeout=60.0,
                 register_timeout=60.0, burst=5, line_interval=2.0, backoff_cap=60.0,
                 require_sasl=False, throttle_delay=IRC_THROTTLE_DELAY,
                 ban_delay=IRC_BAN_DELAY, reclaim_interval=IRC_RECLAIM_INTERVAL,
                 cap_wait=IRC_CAP_WAIT, join_wait=IRC_JOIN_WAIT, stable_after=IRC_STABLE,
                 clock=time.monotonic):
        super().__init__()
        if not _IRC_NICK.match(nick or ""):
            raise FieldError("nick", "a nick is a letter or one of []\\`^{}|_ followed by "
                             "at most 63 letters, digits or those", repr(nick))
        for channel in channels:
            if not _IRC_CHANNEL.match(channel):
                raise FieldError("channels", "a channel starts with #, &, + or ! and has no "
                                 "space, comma or control character", repr(channel))
        if bool(account) != bool(password):
            raise FieldError("account", "SASL needs both {account} and a {password}")
        if any("\0" in (text or "") for text in (account, password)):
            raise FieldError("account", "the account and the password cannot contain NUL")
        if cafile and not tls:
            raise FieldError("cafile", "needs {tls}")
        if require_sasl and not account:
            raise FieldError("require_sasl", "needs {account}")
        if account and not tls:
            log.warning("irc: SASL PLAIN without %s sends the password in clear text",
                        option_of_field("tls"))
        self.db = db
        self.host = host
        self.address = (host, port or (IRC_TLS_PORT if tls else IRC_PORT))
        self.wanted_nick, self.channels = nick, list(channels)
        self.tls, self.cafile = tls, cafile
        self.ssl_context = irc_tls_context(cafile) if tls else None
        self.account, self._password = account, password
        self._server_password, self.realname = server_password, realname
        self.keepalive, self.keepalive_timeout = keepalive, keepalive_timeout
        self.register_timeout, self.backoff_cap = register_timeout, backoff_cap
        self.burst, self.line_interval = burst, line_interval
        self.require_sasl = require_sasl
        self.throttle_delay, self.ban_delay = throttle_delay, ban_delay
        self.reclaim_interval, self.cap_wait, self.join_wait = reclaim_interval, cap_wait, \
            join_wait
        self.stable_after = stable_after
        self.clock = clock
        # What goes wrong is logged at ERROR once a streak (a 001 ends it), then at INFO.
        self.trouble = LogStreak("irc", level=logging.ERROR, repeat_level=logging.INFO)
        # Fixed keys: render_metrics may iterate while the bot thread counts.
        self.counts = dict.fromkeys(("ok", "unknown", "error", "dropped", "ctcp"), 0)
        self.nicklen = None           # NICKLEN from 005, kept across connections
        self._addresses = None        # the server's addresses as last looked up
        self._failures = 0            # connections that ended since one lasted IRC_STABLE s
        self.warnings = warning_throttle("irc")
        self.loop = None              # made by bind()
        self.session = None           # the IRCSession of the connection, once connected
        self._link = None             # the Transport of the connection
        self._outbuf = b""
        self._phase = None            # lookup, connect, handshake, session, quitting, waiting
        self._attempt = 0             # connections tried: a late lookup is told apart
        self._timer = None            # the one Timer: a deadline, the session's, the back-off
        self._stopping = False

    def __repr__(self):
        return "<IRCBot %s on %s>" % (self.nick, format_address(self.address))

    @property
    def nick(self):
        return self.session.nick if self.session is not None else self.wanted_nick

    @property
    def registered(self):
        return self.session is not None and self.session.registered

    @property
    def joined(self):
        """The channels the bot is in now, sorted."""
        return self.session.joined if self.session is not None else []

    def open_connections(self):
        return 1 if self._link is not None else 0

    def reload(self):
        """SIGHUP: load --irc-cafile again (used from the next connection on)."""
        if self.tls and self.cafile:
            try:
                self.ssl_context = irc_tls_context(self.cafile)
                log.info("irc: reloaded the CA file %s", self.cafile)
            except UsageError as error:
                log.error("%s; keeping the CAs loaded before", error)

    def relocate(self, inside):
        self.cafile = inside(self.cafile)

    def bind(self):
        """Look the server up now, while the resolver is in reach (before a chroot); later
        lookups that fail fall back to this answer."""
        if self.loop is None or self.loop.closed:
            self.loop = Loop("irc", workers=IRC_WORKERS, clock=self.clock)
        if self._addresses is None:
            from concurrent.futures import TimeoutError as Late
            host, port = self.address
            try:
                self._addresses = self.loop.submit(
                    socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM).result(
                        IRC_LOOKUP_AT_BIND)
            except (OSError, Late) as error:
                log.warning("irc: cannot look up %s yet: %s", host, error or "no answer")

    def serve(self):
        self._stopping = False
        self._timer = self.loop.timer(self._guarded, self._on_timer)
        self.loop.call_soon(self._dial)
        try:
            self.loop.run()
        finally:
            self._drop()
            self.session = None
            self.loop.close()

    def close(self):
        self.loop.call_soon(self._begin_stop)

    def _begin_stop(self):
        """Say QUIT and give the server IRC_QUIT_GRACE seconds to take it and hang up."""
        self._stopping = True
        self._timer.cancel()
        if self._phase != "session":
            self.loop.stop()
            return
        self._phase = "quitting"
        self._outbuf += self.session.quit()
        self._flush()
        self.loop.call_later(IRC_QUIT_GRACE, self.loop.stop)

    def look_up(self, name, then):
        """then(status, outcome) for the user `name`: at once from a back-end that answers
        from memory; from one that may block, in the loop's workers (the loop never waits
        for it), then for the session that asked if it is still the one of now.  With
        IRC_MAX_QUEUE lookups waiting already, then(None, "dropped") at once."""
        if not self.db.blocking or self.loop is None:
            then(*self._status_of(name))
        elif self.loop.in_flight >= IRC_MAX_QUEUE:
            then(None, "dropped")
        else:
            self.loop.run_in_worker(self._status_of, (name,), functools.partial(
                self._looked_up_user, self.session, then))

    def _looked_up_user(self, session, then, future):
        if session is self.session and self._phase == "session":
            then(*future.result())
            self._guarded(self._on_timer)          # send the answer now

    def _status_of(self, name):
        try:
            status = self.db.get_user(name)
        except Exception:
            log.exception("irc: back-end failed answering %r", name)
            return INTERNAL_ERROR, "error"
        return status, "unknown" if status is None else "ok"


# == 11. Services and assembly ================================================================

# The listener options of --serve: name -> (default, what it serves).
LISTENERS = {
    "finger": (":79", "RFC 1288 finger"),
    "web": (":8000", "HTML pages, JSON, XML-RPC at /RPC2"),
    "setter": ("127.0.0.1:1079", 'status setter: "user\\r\\nstatus\\r\\n", then EOF'),
    "https": ("off", "the web site over TLS; needs --cert"),
    "pb": ("off", "Perspective Broker for Twisted clients, e.g. :8889"),
    "proxy": ("off", 'finger proxy answering "user@host", e.g. :7779'),
}


class ServiceGroup(Service):
    """Services started in order and stopped in reverse; itself a Service."""

    name = "group"

    def __init__(self, services=(), databases=()):
        super().__init__()
        self.services = list(services)
        self.databases = list(databases)

    def __iter__(self):
        return iter(self.services)

    def by_name(self, name):
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)

    def bind(self):
        """Bind every listener; if one fails, close those already bound and re-raise."""
        try:
            for service in self.services:
                service.bind()
        except BaseException:
            for service in self.services:
                service.close_listener()
            raise

    def start(self):
        self.bind()
        for db in self.databases:
            db.start()
        for service in self.services:
            service.start()

    def stop(self):
        for service in reversed(self.services):
            service.stop()
        for db in self.databases:
            db.stop()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()


def _file_database(options):
    try:
        return FileDatabase(options.users, options.reload)
    except UsersFileError as error:
        raise UsageError("%s (copy users.example from finger.py's source to start one, or "
                         "name another file with --users FILE)" % error) from None


class Entry:
    """A registry entry (bottle's server_names): `make` builds the thing from the options,
    `takes` names the options (dests) that only it uses: given without it, they are warned
    about (OPTIONS_NEEDING)."""
    __slots__ = ("make", "takes")

    def __init__(self, make, takes=()):
        self.make, self.takes = make, takes


# --backend NAME -> its Entry; any other NAME with a ':' is a plugin, MODULE:CLASS.  The
# help text and the error for an unknown NAME come from here.
BACKENDS = {
    "file": Entry(_file_database, ("users", "reload")),
    "memory": Entry(lambda options: MemoryDatabase(options.status), ("status",)),
    "plan": Entry(lambda options: PlanDatabase(options.list_plan_users), ("list_plan_users",)),
    "command": Entry(lambda options: CommandDatabase(options.command, options.backend_timeout),
                     ("command",)),
    "web": Entry(lambda options: WebDatabase(options.web_prefix, options.backend_timeout),
                 ("web_prefix",)),
    "proxy": Entry(lambda options: ProxyDatabase(build_forwarder(options),
                                                 options.proxy_target)),
}
SHARED_BACKEND_OPTIONS = ("backend_timeout", "proxy_target")   # back-ends' and others'
PLUGIN_KEYWORDS = {"backend_timeout": "timeout"}     # an option's name for a plugin


def plugin_arguments(options):
    """The keyword arguments a plugin's class is called with: every back-end's options.  A
    plugin takes those it uses, and the others with **rest."""
    names = [name for entry in BACKENDS.values() for name in entry.takes]
    return {PLUGIN_KEYWORDS.get(name, name): getattr(options, name)
            for name in names + list(SHARED_BACKEND_OPTIONS)}


def load_plugin(spec, options):
    """--backend MODULE:CLASS: the class, imported from any importable module, is called with
    plugin_arguments(options) and must give a UserDatabase (get_user, get_users)."""
    import importlib
    module_name, _, class_name = spec.partition(":")
    try:
        database = getattr(importlib.import_module(module_name), class_name)(
            **plugin_arguments(options))
    except Exception as error:
        raise UsageError("--backend %s: %s: %s" % (spec, type(error).__name__,
                                                   " ".join(str(error).split()))) from None
    if not callable(getattr(database, "get_user", None)):
        raise UsageError("--backend %s: %r has no get_user(name)" % (spec, database))
    return database if isinstance(database, UserDatabase) else PluginDatabase(database)


def build_database(options):
    """The user database named by `options.backend` (UsageError when it cannot be built)."""
    backend = options.backend
    if backend in BACKENDS:
        return BACKENDS[backend].make(options)
    if ":" in backend:
        return load_plugin(backend, options)
    raise UsageError("--backend %s: unknown; use %s or MODULE:CLASS"
                     % (backend, ", ".join(BACKENDS)))


def build_forwarder(options, max_concurrent=None):
    """The forwarder of --forward, --proxy and --backend proxy; the proxy target's port
    must be one forwarding may use."""
    uses_target = options.proxy or options.backend == "proxy"
    if uses_target:
        try:
            _, port = split_host_port(options.proxy_target, FINGER_PORT)
        except ValueError as error:
            raise UsageError("--proxy-target %s: %s" % (options.proxy_target, error)) from None
        if port not in options.forward_ports:
            raise UsageError("--proxy-target %s: port %d is not in --forward-ports (%s)" % (
                options.proxy_target, port, ",".join(map(str, options.forward_ports))))
    return Forwarder(options.forward_ports, options.backend_timeout,
                     max_concurrent=max_concurrent or options.workers)


def irc_bot_from_options(options, db, environ=None):
    """The IRCBot that `options` ask for (None without --irc); UsageError when it cannot be
    made.  The password is read here, before privileges are dropped."""
    if not options.irc:
        return None
    environ = os.environ if environ is None else environ
    try:
        host, port = split_host_port(options.irc, IRC_TLS_PORT if options.irc_tls else IRC_PORT)
    except ValueError as error:
        raise UsageError("--irc %s: expected HOST[:PORT] (%s)" % (options.irc, error)) from None
    password = None
    if options.irc_password_file:
        path = options.irc_password_file
        try:
            with open(path, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
                mode = os.fstat(f.fileno()).st_mode
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError("--irc-password-file %s: %s" % (
                path, getattr(error, "strerror", None) or error)) from None
        if not password:
            raise UsageError("--irc-password-file %s: the first line is empty" % path)
        if mode & 0o077:
            log.warning("--irc-password-file %s: others may read it (chmod 600 it)", path)
    elif options.irc_account:
        password = environ.get(IRC_PASSWORD_ENV) or None
    if password and not options.irc_account:
        raise UsageError("--irc-password-file needs --irc-account")
    if options.irc_account and not password:
        raise UsageError("--irc-account %s needs a password: set $%s or use "
                         "--irc-password-file" % (options.irc_account, IRC_PASSWORD_ENV))
    return IRCBot(db, host, port, nick=options.irc_nick, channels=options.irc_channel,
                  tls=options.irc_tls, cafile=options.irc_cafile,
                  account=options.irc_account, password=password,
                  require_sasl=options.irc_require_sasl)


def build_services(options, db=None, sockets=None):
    """The tutorial's makeService: build (not start) every service `options` asks for.

    `options` is what build_parser() parses (see default_options()); `db` overrides the
    database the options name; `sockets` maps listener names to listening sockets made
    elsewhere (systemd socket activation), served whatever the options say.  Returns a
    ServiceGroup; start() binds and runs it."""
    sockets = dict(sockets or {})
    wanted = wanted_listeners(options, sockets)
    if "https" in wanted and not options.cert:
        raise UsageError("--https needs --cert FILE (PEM with the certificate and key)")
    db = build_database(options) if db is None else db
    db.listable = not options.no_list         # the one place the list is made private
    site = None
    if "web" in wanted or "https" in wanted:
        site = WebSite(db, load_templates(options.templates))
    services = [_listener_service(name, address, sockets.get(name), db, site, options)
                for name, address in wanted.items()]
    bot = irc_bot_from_options(options, db)
    if bot is not None:
        services.append(bot)
    group = ServiceGroup(services, [db])
    if site is not None:
        site.metrics = functools.partial(render_metrics, group)
        site.services = group.services
    return group


def wanted_listeners(options, sockets=()):
    """{listener name: address or None} of the listeners to run: those the options turn on
    and those `sockets` (systemd's) name, which then need no address."""
    wanted = {name: getattr(options, name) for name in LISTENERS}
    wanted["setter-socket"] = options.setter_socket
    unknown = sorted(set(sockets) - set(wanted))
    if unknown:
        raise UsageError("passed sockets named %s; the names finger.py knows: %s"
                         % (", ".join(unknown), ", ".join(wanted)))
    return {name: address for name, address in wanted.items()
            if address is not None or name in sockets}


def _backend_is(options, name):
    """Whether the back-end is `name`, or a plugin (it is given every back-end option)."""
    return options.backend == name or ":" in options.backend


def configuration_warnings(options, identity, sockets=()):
    """What in `options` will not work as meant, one sentence each with the fix: options
    that do nothing here, and files the server cannot use once it runs as `identity` (see
    resolve_identity).  --serve logs them; --check-config counts them as problems."""
    given = getattr(options, "given", ())
    run = wanted_listeners(options, sockets) if options.serve else {}
    warnings = []
    for names, applies, needs in OPTIONS_NEEDING:
        idle = [name for name in names if name in given]
        if idle and not applies(options, run):
            warnings.append("%s: ignored, %s only with %s" % (
                ", ".join(idle), "it applies" if len(idle) == 1 else "they apply", needs))
    if "--timeout" in given and (options.serve or options.inetd):
        warnings.append("--timeout is the client's option; the server's is --request-timeout "
                        "(taken as it this time)")
    who = run_as_name(identity)
    for option in ("cert", "key") if "https" in run else ():
        path = getattr(options, option)
        if path and os.path.exists(path) and not may_access(path, identity, os.R_OK):
            warnings.append("--%s %s: %s cannot read it, so SIGHUP cannot reload it; fix: "
                            "chgrp the file to a group of %s and chmod g+r it"
                            % (option, path, who, who))
    if options.backend == "file" and os.path.exists(options.users):
        if not may_access(options.users, identity, os.R_OK):
            warnings.append("users file %s: %s cannot read it, so it is loaded at start only, "
                            "never again; fix: chmod o+r it, or --user its owner"
                            % (options.users, who))
        problem = replace_problem(options.users, identity) \
            if {"setter", "setter-socket"} & set(run) else None
        if problem:
            warnings.append("setter: %s cannot replace %s: %s; every status set would fail. "
                            "Fix: %s" % ((who, options.users) + problem))
    return warnings


def _web_listener(name, address, sock, db, site, options, limits, proxy_headers):
    return WebService(site, address, sock=sock, name=name, timeout=options.timeout,
                      max_connections=options.web_max_connections, workers=options.workers,
                      cert=options.cert if name == "https" else None, key=options.key,
                      limits=limits, hsts=options.hsts, proxy_headers=proxy_headers)


def _tcp_listener(protocol, name, address, sock, options, limits, proxy_headers):
    return TCPService(protocol, address, sock=sock, name=name, limits=limits,
                      proxy_headers=proxy_headers, **_limits(options, protocol))


def _finger_listener(name, address, sock, db, site, options, limits, proxy_headers):
    # Forwarded queries may take half the workers: local ones never wait for them.
    forwarder = build_forwarder(options, max(options.workers // 2, 1)) \
        if options.forward else None
    service = _tcp_listener(FingerProtocol(db, forwarder=forwarder), name, address, sock,
                            options, limits, proxy_headers)
    if forwarder is not None:
        forwarder.listener = service            # what it must not forward to
    return service


def _proxy_listener(name, address, sock, db, site, options, limits, proxy_headers):
    forwarder = build_forwarder(options)
    protocol = FingerProtocol(db, forwarder=forwarder, forward_all_to=options.proxy_target)
    service = _tcp_listener(protocol, name, address, sock, options, limits, proxy_headers)
    forwarder.listener = service
    return service


def _setter_listener(name, address, sock, db, site, options, limits, proxy_headers):
    protocol = SetterProtocol(db, options.max_status, check_identity=name == "setter-socket",
                              max_users=options.max_users, max_bytes=options.max_users_bytes)
    return _tcp_listener(protocol, name, address, sock, options, limits, proxy_headers)


def _pb_listener(name, address, sock, db, site, options, limits, proxy_headers):
    return _tcp_listener(PBProtocol(db, limits), name, address, sock, options, limits,
                         proxy_headers)


# Listener name (its option: LISTENERS, and --setter-socket) -> the Entry making its
# service.
LISTENER_SERVICES = {
    "finger": Entry(_finger_listener), "web": Entry(_web_listener, ("templates",
                                                                     "web_max_connections")),
    "https": Entry(_web_listener, ("templates", "web_max_connections", "cert", "key", "hsts")),
    "setter": Entry(_setter_listener, ("max_status", "max_users", "max_users_bytes")),
    "setter-socket": Entry(_setter_listener, ("max_status", "max_users", "max_users_bytes")),
    "pb": Entry(_pb_listener), "proxy": Entry(_proxy_listener),
}


def _flag(dest):
    return "--" + dest.replace("_", "-")


def _needing_rows():
    """OPTIONS_NEEDING's rows that the registries declare: the options only some listeners
    or one back-end take."""
    rows, takers = [], {}
    for name, entry in LISTENER_SERVICES.items():
        for dest in entry.takes:
            takers.setdefault(dest, []).append(name)
    for listeners in sorted({tuple(names) for names in takers.values()}, key=len):
        dests = [dest for dest, names in takers.items() if tuple(names) == listeners]
        rows.append((tuple(map(_flag, dests)), lambda o, run, wanted=set(listeners):
                     wanted & set(run), " or ".join(map(_flag, listeners))))
    for name, entry in BACKENDS.items():
        if entry.takes:
            rows.append((tuple(map(_flag, entry.takes)), lambda o, run, name=name:
                         _backend_is(o, name), "--backend %s (or a plugin)" % name))
    return rows


# Options that do something only beside another: (options, whether they apply given the
# options and the listeners that run, what they need).  Given without it, they are warned
# about, not refused.
OPTIONS_NEEDING = tuple(_needing_rows()) + (
    (("--proxy-target",), lambda o, run: "proxy" in run or o.backend == "proxy",
     "--proxy or --backend proxy"),
    (("--forward-ports",), lambda o, run: o.forward or "proxy" in run or o.backend == "proxy",
     "--forward, --proxy or --backend proxy"),
    (("--backend-timeout",), lambda o, run: o.backend in ("command", "web", "proxy")
     or o.forward or "proxy" in run, "--backend command, web or proxy, --forward or --proxy"),
    (("--prefix",), lambda o, run: o.syslog or o.inetd, "--syslog (or --inetd)"),
    (("--irc-nick", "--irc-channel", "--irc-tls", "--irc-cafile", "--irc-account",
      "--irc-password-file", "--irc-require-sasl"), lambda o, run: o.irc, "--irc"),
    (("--irc-cafile",), lambda o, run: o.irc_tls, "--irc-tls"),
    (tuple("--" + name for name in LISTENERS) + (
        "--setter-socket", "--irc", "--user", "--group", "--daemon", "--pidfile", "--rundir",
        "--chroot", "--stop-timeout", "--max-connections", "--workers",
        "--per-client-connections", "--per-client-rate", "--per-client-exempt",
        "--proxy-protocol"),
     lambda o, run: o.serve, "--serve (inetd runs one query and its own user)"),
)


def _listener_service(name, address, sock, db, site, options):
    """The service behind listener `name`, with its per-client limits and PROXY headers."""
    limits = ClientLimits(name, options.per_client_connections, options.per_client_rate,
                          options.per_client_exempt)
    proxy_headers = ProxyHeaders(options.proxy_protocol) if options.proxy_protocol else None
    return LISTENER_SERVICES[name].make(name, address, sock, db, site, options, limits,
                                        proxy_headers)


def _limits(options, protocol):
    """The limits of a TCPService from the options.  Setter requests may all wait for the
    writer (they are few and short), and up to SETTER_WORKERS of them at once, so that
    writes that arrive together go to the file together; finger answers at most 2 x
    workers."""
    limits = dict(timeout=options.timeout, max_connections=options.max_connections,
                  workers=options.workers)
    if isinstance(protocol, SetterProtocol):
        limits.update(max_pending=options.max_connections,
                      workers=max(options.workers, SETTER_WORKERS))
    return limits


# What SIGHUP changes in a running server when --config says so; the rest needs a restart.
RELOADABLE = ("log_level", "log_queries", "no_list", "templates", "timeout", "max_status",
              "max_users", "max_users_bytes", "backend_timeout", "per_client_connections",
              "per_client_rate", "per_client_exempt")


def apply_options(group, options, new):
    """Make the running `group` follow the options `new` in what can change without binding
    again (RELOADABLE), and record them in `options`.  Returns the names of the other
    options that differ: they wait for a restart.  Templates are read again (edited in
    place, or another directory); a broken one is a UsageError before anything changes."""
    changed = [key for key, value in vars(new).items() if key not in ("given", "command_line")
               and getattr(options, key, value) != value]
    templates = load_templates(new.templates) \
        if new.templates or "templates" in changed else None
    for key in changed:
        if key in RELOADABLE:
            setattr(options, key, getattr(new, key))
    if templates is not None:
        for site in {service.site for service in group if isinstance(service, WebService)}:
            site.templates = templates
    log.setLevel(options.log_level.upper())
    if options.log_queries:
        query_log.start()
    else:
        query_log.enabled = False
    _reconfigure_databases(group, options)
    _reconfigure_services(group, options)
    return [key for key in changed if key not in RELOADABLE]


def _reconfigure_databases(group, options):
    """apply_options for the back-ends and the forwarders."""
    forwarders = [getattr(db, "forwarder", None) for db in group.databases] + [
        getattr(getattr(service, "protocol", None), "forwarder", None) for service in group]
    for forwarder in filter(None, forwarders):      # --forward, --proxy, --backend proxy
        forwarder.timeout = options.backend_timeout
    for db in group.databases:
        db.listable = not options.no_list
        if hasattr(db, "timeout"):                  # command and web back-ends
            db.timeout = options.backend_timeout


def _reconfigure_services(group, options):
    """apply_options for the listeners: deadlines, per-client limits, the setter's caps."""
    for service in group:
        if getattr(service, "limits", None) is not None:
            service.limits.configure(options.per_client_connections, options.per_client_rate,
                                     options.per_client_exempt)
        if isinstance(service, TCPService):
            service.timeout = options.timeout
            if isinstance(service.protocol, SetterProtocol):
                service.protocol.max_status = options.max_status
                service.protocol.max_users = options.max_users
                service.protocol.max_bytes = options.max_users_bytes


def default_options(**overrides):
    """The options of `--serve` with no arguments, with `overrides` applied (Python API)."""
    options = build_parser().parse_intermixed_args(["--serve"])
    for key, value in overrides.items():
        if not hasattr(options, key):
            raise TypeError("no option %r" % key)
        setattr(options, key, parse_listen(value) if key in LISTENERS and
                isinstance(value, str) else value)
    return options


# == 12. Process: privileges, daemon, pidfile, logging, systemd, signals ======================

CAP_NET_BIND_SERVICE = 10        # the capability bit that allows ports below 1024
MAX_OPEN_FILES = 1 << 20          # the soft limit raise_file_limit asks for at most (Linux's

SYSLOG_SOCKET = "/dev/log"
SD_LISTEN_FDS_START = 3           # systemd passes activated sockets from this descriptor on
UNPRIVILEGED_USER = "nobody"      # who root becomes without --user (the tutorial used uid 1)
DEFAULT_STOP_TIMEOUT = 5.0        # seconds SIGTERM may take, in-flight answers included
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class DefangingFormatter(logging.Formatter):
    """Log lines with control characters made harmless: text from the network (request
    lines, IRC reasons) never reaches a terminal or a log viewer raw."""

    def format(self, record):
        return defang(super().format(record))


class ReopenableFileHandler(logging.FileHandler):
    """A log file that SIGHUP reopens, so logrotate can move it away."""

    def reopen(self):
        with self.lock:
            try:
                stream = self._open()
            except OSError as error:
                log.error("cannot reopen the log file %s: %s; still writing to the old one",
                          self.baseFilename, error.strerror)
                return
            if self.stream is not None:
                self.stream.close()
            self.stream = stream


def setup_logging(options, to_stderr=True):
    """Log lines to --logfile, --syslog (with --prefix), else stderr.  Without `to_stderr`
    (inetd put the client's socket there) syslog is used when /dev/log exists."""
    level = options.log_level.upper()
    if options.logfile:
        handler = ReopenableFileHandler(os.path.abspath(options.logfile), encoding="utf-8")
        handler.setFormatter(DefangingFormatter(LOG_FORMAT))
    elif options.syslog or not to_stderr:
        try:
            handler = syslog_handler(options.prefix)
        except UsageError:
            if options.syslog:
                raise
            handler = logging.NullHandler()   # inetd, no syslog: stderr is the client's
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(DefangingFormatter(LOG_FORMAT))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def syslog_handler(prefix):
    """A handler sending to the syslog daemon at SYSLOG_SOCKET; UsageError without one."""
    from logging.handlers import SysLogHandler
    problem = syslog_problem()
    if problem:
        raise UsageError(problem)
    handler = SysLogHandler(SYSLOG_SOCKET, SysLogHandler.LOG_DAEMON)
    handler.setFormatter(DefangingFormatter(prefix + "[%(process)d]: %(message)s"))
    return handler


def syslog_problem():
    """Why --syslog would log nothing (no daemon listening at SYSLOG_SOCKET), or None."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(SYSLOG_SOCKET)
                return None
            except OSError as error:
                reason = error.strerror or str(error)
    return ("--syslog: no syslog daemon listens at %s (%s); use --logfile FILE, or neither "
            "to log to stderr (which systemd's journal keeps)" % (SYSLOG_SOCKET, reason))


def reopen_logs():
    for handler in log.handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()


def resolve_identity(user=None, group=None):
    """Who to become after binding -> (name, uid, gid), or None to stay as we are.

    Looked up before any chroot.  Root without --user becomes nobody; `--user root` stays
    root (logged as a warning).  Others may only name themselves."""
    if os.geteuid() != 0:
        if user and user != pwd.getpwuid(os.geteuid()).pw_name or group:
            raise UsageError("--user/--group: only root can change user or group")
        return None
    if user == "root" and not group:
        return None
    name = user or UNPRIVILEGED_USER
    try:
        entry = pwd.getpwnam(name)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError:
        raise UsageError("--user %s --group %s: no such user or group" % (name, group)) from None
    return name, entry.pw_uid, gid


def run_as_name(identity):
    """The name of the user the server runs as: `identity`'s (resolve_identity), or ours."""
    if identity is not None:
        return identity[0]
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def may_access(path, identity, mode):
    """Whether the server, once it runs as `identity` (resolve_identity's answer; None: as
    now), may access `path` with `mode` (os.R_OK, os.W_OK, os.X_OK or'ed).  For another
    user, the permission bits of the path and of every directory above it (no ACLs)."""
    if identity is None:
        return os.access(path, mode)
    name, uid, gid = identity
    if uid == 0:
        return True
    groups = set(os.getgrouplist(name, gid))
    path = os.path.realpath(path)
    checks = [(path, mode)]
    parent = os.path.dirname(path)
    while True:
        checks.append((parent, os.X_OK))
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    for where, wanted in checks:
        try:
            info = os.stat(where)
        except OSError:
            return False
        shift = 6 if info.st_uid == uid else 3 if info.st_gid in groups else 0
        if (info.st_mode >> shift) & wanted != wanted:
            return False
    return True


def replace_problem(path, identity):
    """Why the server, running as `identity`, could not replace the file `path` the way
    write_file_atomically does (a new file in its directory, renamed over it), and the
    fix; None if it can."""
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    who = run_as_name(identity)
    if not may_access(directory, identity, os.W_OK | os.X_OK):
        return ("it may not write in the directory %s, where the setter writes the new file "
                "before renaming it over the old one" % directory,
                "chown %s that directory (e.g. keep the file in /var/lib/finger/), or --user "
                "the directory's owner, or --setter off" % who)
    uid = os.geteuid() if identity is None else identity[1]
    info, dir_info = os.stat(path), os.stat(directory)
    if (dir_info.st_mode & stat.S_ISVTX and uid not in (0, info.st_uid, dir_info.st_uid)):
        return ("%s is sticky, and only the file's owner may rename over it" % directory,
                "chown %s the file, or move it to a directory of its own" % who)
    return None


def drop_privileges(identity):
    """Become (name, uid, gid): supplementary groups first, then the group, then the user;
    then make sure root cannot be regained."""
    if identity is None:
        return
    name, uid, gid = identity
    os.setgroups([])
    os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        log.info("running as %s (uid %d, gid %d)", name, uid, gid)
        return
    raise FingerError("root could be regained after dropping privileges; refusing to run")


def daemonize(rundir):
    """Detach like twistd: fork, setsid, fork, chdir, umask 022, stdio on /dev/null.

    The first parent waits on a pipe and exits 0 only when the daemon reports that it is
    serving (`report(None)`), else 1 with the reason.  Returns `report` for the daemon."""
    reader, writer = os.pipe()
    if os.fork() > 0:
        os.close(writer)
        with os.fdopen(reader, "rb") as pipe:
            message = pipe.read().decode("utf-8", "replace").strip()
        if message == "ok":
            os._exit(0)
        print("finger.py: error: %s" % (message or "the daemon died before serving"),
              file=sys.stderr)
        os._exit(1)
    os.close(reader)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir(rundir or "/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

    def report(error):
        with contextlib.suppress(OSError):
            os.write(writer, b"ok\n" if error is None else str(error).encode("utf-8") + b"\n")
            os.close(writer)
    return report


def write_pidfile(path):
    """Create the pidfile exclusively.  One left by a dead process is replaced; one of a
    live process means another server runs: FingerError."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid = _read_pid(path)
            if pid and _alive(pid):
                raise FingerError("pidfile %s: process %d is running" % (path, pid)) from None
            log.warning("pidfile %s: replacing the stale one of process %s", path, pid)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        except OSError as error:
            raise FingerError("pidfile %s: %s" % (path, error.strerror)) from None
        with os.fdopen(fd, "w") as f:
            f.write("%d\n" % os.getpid())
        return
    raise FingerError("pidfile %s: cannot create it" % path)


def remove_pidfile(path):
    """Remove the pidfile if it is still ours."""
    if _read_pid(path) == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def enter_chroot(directory, group):
    """chroot after binding: the users file and certificates, named by their paths outside,
    are then read at the same place inside."""
    directory = os.path.realpath(directory)
    os.chroot(directory)
    os.chdir("/")
    for thing in list(group.databases) + list(group):
        thing.relocate(lambda path: "/" + os.path.relpath(os.path.realpath(path), directory)
                       if path else path)
    log.info("chrooted to %s", directory)


def systemd_sockets(environ=None):
    """Listening sockets passed by systemd socket activation, by name -> socket.

    The name is FileDescriptorName= (by default the unit's name, '.socket' dropped).  The
    variables are removed, so that programs we might start do not take them for theirs."""
    environ = os.environ if environ is None else environ
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    sockets = {}
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else "finger"
        name = name[:-len(".socket")] if name.endswith(".socket") else name
        os.set_inheritable(fd, False)
        sockets[name] = socket.socket(fileno=fd)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    return sockets


def sd_notify(message, environ=None):
    """Tell systemd (Type=notify) how we are: 'READY=1', 'STOPPING=1', 'STATUS=...'."""
    environ = os.environ if environ is None else environ
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(message.encode("utf-8"))
    except OSError as error:
        log.warning("cannot notify systemd at %s: %s", path, error)
        return False
    return True


# Modules the server imports on first use; run_server imports them before a chroot or the
# privilege drop can make the standard library unreadable.
SERVER_MODULES = ("base64", "concurrent.futures", "concurrent.futures.thread", "email.utils",
                  "gzip", "html", "html.parser", "http", "http.client", "http.server",
                  "importlib", "inspect", "io", "ipaddress",
                  "json", "random", "ssl", "string", "subprocess", "tempfile", "urllib.error",
                  "urllib.parse", "urllib.request", "xml.parsers.expat", "zlib")


def preload_server_modules():
    import importlib
    for name in SERVER_MODULES:
        with contextlib.suppress(ImportError):       # ssl may be missing: HTTPS then fails
            importlib.import_module(name)


def raise_file_limit():
    """Raise the soft limit on open files to the hard one (at most MAX_OPEN_FILES): the soft
    one is often 1024 (systemd's default), fewer than --max-connections on one listener."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as error:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, wanted,
                        error)


def file_problems(options):
    """Problems with the files the process options name: the log file, the pidfile's
    directory, the chroot (the users file and the certificate are checked by building)."""
    problems = []
    if options.syslog:
        problems.append(syslog_problem())
    if options.logfile and not os.access(options.logfile if os.path.exists(options.logfile)
                                         else os.path.dirname(options.logfile), os.W_OK):
        problems.append("--logfile %s: not writable" % options.logfile)
    if options.pidfile and not os.access(os.path.dirname(options.pidfile), os.W_OK | os.X_OK):
        problems.append("--pidfile %s: its directory is not writable" % options.pidfile)
    if options.chroot and not os.path.isdir(options.chroot):
        problems.append("--chroot %s: not a directory" % options.chroot)
    return [problem for problem in problems if problem]


def port_problems(options):
    """Listeners on ports this process may not bind: below 1024 without root or
    CAP_NET_BIND_SERVICE (or below net.ipv4.ip_unprivileged_port_start)."""
    if os.geteuid() == 0 or _has_capability(CAP_NET_BIND_SERVICE):
        return []
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            lowest = int(f.read())
    except (OSError, ValueError):
        lowest = 1024
    return ["--%s %s: a port below %d needs root or CAP_NET_BIND_SERVICE; take a higher "
            "port, or start as root (the server drops to --user after binding)"
            % (name, format_address(address), lowest)
            for name, address in wanted_listeners(options).items()
            if name != "setter-socket" and address and 0 < address[1] < lowest]


def _has_capability(bit):
    """Whether this process has capability `bit` in its effective set (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def run_server(options):
    """--serve: build, (daemonize), bind, chroot, drop privileges, start, wait for
    SIGTERM/SIGINT, stop.  Returns the exit code."""
    group, identity = _prepare_server(options)
    report = daemonize(options.rundir) if options.daemon else None
    if options.log_queries:            # its thread after the fork of --daemon
        query_log.start()
    if options.rundir and not options.daemon:
        os.chdir(options.rundir)
    stopping, failures = _start_server(options, group, identity, report)
    for service in group:
        log.info("serving %s on %s", service.name, format_peer(service.address))
    if report:
        report(None)
    sd_notify("READY=1\nSTATUS=serving %s" % ", ".join(s.name for s in group))
    while not stopping.wait(3600):
        pass
    return _stop_server(options, group, failures)


def _prepare_server(options):
    """Before the fork of --daemon: the process settings, the modules a chroot would hide,
    the services built (not bound yet) -> (their ServiceGroup, the identity to run as)."""
    raise_file_limit()
    # Each service's loop gives the GIL up at every system call: with CPython's default
    # switch interval (5 ms), one busy thread makes every other loop wait that long at each
    # of its system calls.  A shorter interval bounds that wait (the figures are in the
    # history of this line).
    sys.setswitchinterval(SERVER_SWITCH_INTERVAL)
    preload_server_modules()
    sockets = systemd_sockets()
    group = build_services(options, sockets=sockets)
    if not group.services:
        raise UsageError("every listener is off: nothing to serve")
    identity = resolve_identity(options.user, options.group)
    if os.geteuid() == 0 and identity is None:
        log.warning("staying root (--user root): a bug in finger.py would be a root bug")
    for warning in configuration_warnings(options, identity, sockets):
        log.warning("%s", warning)
    return group, identity


def _start_server(options, group, identity, report):
    """Write the pidfile, bind, chroot, drop privileges, start -> (the Event SIGTERM and
    SIGINT set, the list a failing service adds to).  A failure to start is logged, told
    to the parent of --daemon (`report`), and raised."""
    try:
        if options.pidfile:
            write_pidfile(options.pidfile)
        group.bind()
        if options.chroot:
            enter_chroot(options.chroot, group)
        drop_privileges(identity)
        stopping = _install_signal_handlers(group, options)
        failures = []
        for service in group:          # a service that dies takes the process down with it
            service.on_failure = lambda: (failures.append(1), stopping.set())
        group.start()
    except (FingerError, OSError) as error:
        if options.daemon or options.logfile or options.syslog:   # else stderr says it
            log.error("cannot start: %s", error)
        if options.pidfile:
            remove_pidfile(options.pidfile)
        if report:
            report(error)
        raise
    return stopping, failures


def _stop_server(options, group, failures):
    """Stop the services within --stop-timeout and remove the pidfile -> the exit code: 1
    when a service failed or stopping did."""
    log.info("stopping")
    sd_notify("STOPPING=1")
    deadline = time.monotonic() + options.stop_timeout

    def stop():
        try:
            group.stop()
        except Exception:
            log.exception("stopping failed")
            failures.append(1)

    stopper = threading.Thread(target=stop, name="finger-stop", daemon=True)
    stopper.start()
    stopper.join(options.stop_timeout)
    query_log.stop()
    if options.pidfile:
        remove_pidfile(options.pidfile)
    code = 1 if failures else 0
    _exit_without_stragglers(deadline, code, options.stop_timeout)
    return code


def _exit_without_stragglers(deadline, code, stop_timeout):
    """Worker threads still in a lookup would be waited for at exit: give them until the
    deadline, then leave without them (os._exit with `code`)."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    for thread in others:
        thread.join(max(deadline - time.monotonic(), 0))
    if any(thread.is_alive() for thread in others):
        log.warning("a back-end lookup is still running after %g s: exiting without it",
                    stop_timeout)
        for process in list(RUNNING_COMMANDS):
            with contextlib.suppress(OSError):
                process.kill()
        logging.shutdown()
        os._exit(code)


def _install_signal_handlers(group, options=None):
    """SIGTERM and SIGINT set the returned Event; SIGHUP reloads."""
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGHUP, lambda signum, frame: _reload_all(group, options))
    return stopping


def _stderr_is_stdout():
    """True when stderr is the very file stdout is (inetd passes the socket as both)."""
    try:
        out, err = os.fstat(1), os.fstat(2)
    except OSError:
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


def _reload_all(group, options=None):
    """SIGHUP: reopen the log file, re-read the --config file (reload_configuration), the
    users file and certificates (in a thread, not in the signal handler)."""
    def reload():
        configuration = [functools.partial(reload_configuration, group, options)] \
            if options is not None and options.config else []
        for step in [reopen_logs] + configuration + [
                functools.partial(db.reload, force=True) for db in group.databases] + [
                s.reload for s in group]:
            try:
                step()
            except Exception:
                log.exception("SIGHUP: reloading failed")
    threading.Thread(target=reload, daemon=True, name="finger-sighup").start()


def run_inetd(options):
    """--inetd: one query on stdin, its answer on stdout."""
    db = build_database(options)
    for warning in configuration_warnings(options, None):
        log.warning("%s", warning)
    forwarder = build_forwarder(options) if options.forward else None
    query_log.enabled = options.log_queries
    db.listable = not options.no_list
    serve_inetd(FingerProtocol(db, forwarder=forwarder),
                options.timeout)
    query_log.flush()
    return 0


# == 13. Command line =========================================================================

def _listen_option(text):
    try:
        return parse_listen(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError("expected [HOST:]PORT, [V6]:PORT or off (%s)"
                                         % error) from None


def _seconds(text, zero=False):
    """A number of seconds above 0 (or, with `zero`, 0 or more) for argparse."""
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not (value >= 0 if zero else value > 0):        # NaN is neither
        raise argparse.ArgumentTypeError("expected a number of seconds %s, got %r" % (
            "0 or more" if zero else "above 0", text))
    return value


_seconds_or_zero = functools.partial(_seconds, zero=True)


def _count(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("expected a whole number above 0, got %r" % text)
    return int(text)


def _count_or_zero(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError("expected a whole number, 0 or more, got %r" % text)
    return int(text)


def _networks(text):
    """'CIDR,CIDR' or 'none' -> a tuple of network strings (checked)."""
    import ipaddress
    if isinstance(text, tuple):
        return text
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(str(ipaddress.ip_network(net.strip(), strict=False))
                     for net in text.split(",") if net.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _port_list(text):
    try:
        ports = tuple(int(port) for port in text.split(",") if port.strip())
    except ValueError:
        ports = ()
    if not ports or not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError("expected ports like 79,7979, got %r" % text)
    return ports


def _status_pair(text):
    name, equals, status = text.partition("=")
    if not equals or not valid_user_name(name):
        raise argparse.ArgumentTypeError("expected USER=TEXT with a valid user name, got %r"
                                         % text)
    return name, clean_status(status)


CLIENT_USAGE = """finger.py [-l] [--timeout SECONDS] [QUERY ...]
       finger.py --set STATUS
       finger.py --serve --help     (the server's options)"""
CLIENT_EPILOG = """examples:
  finger.py moshez@example.org
  finger.py -l @[::1]:7979
  finger.py --set "Hacking on finger.py"
"""
SERVER_USAGE = """finger.py --serve [OPTIONS]          run the services
       finger.py --inetd [OPTIONS]          answer one query on stdin (inetd)
       finger.py --check-config [OPTIONS]   check them, serve nothing
       finger.py --help                     (the client's options)"""
SERVER_EPILOG = """examples:
  finger.py --serve --users users.example --finger 127.0.0.1:7979 --web off
  finger.py --serve --config /etc/finger.ini
  finger.py --check-config --config /etc/finger.ini
  finger.py --print-config --users /etc/users > /etc/finger.ini
"""


def _irc_server(text):
    """--irc HOST[:PORT]: checked here, the port filled in by irc_bot_from_options (it
    depends on --irc-tls)."""
    try:
        host, _ = split_host_port(text, IRC_PORT)
    except ValueError as error:
        raise argparse.ArgumentTypeError("expected HOST[:PORT] (%s)" % error) from None
    if not host:
        raise argparse.ArgumentTypeError("expected HOST[:PORT], got %r" % text)
    return text


def add_irc_options(parser):
    """The IRC bot's options, in their own group of build_parser's parser."""
    irc = parser.add_argument_group("IRC bot")
    irc.add_argument("--irc", type=_irc_server, metavar="HOST[:PORT]",
                     help="run the tutorial's IRCReplyBot on this IRC server (port %d, or %d "
                          "with --irc-tls): it answers a private message NAME with 'Status "
                          "of NAME: STATUS'" % (IRC_PORT, IRC_TLS_PORT))
    irc.add_argument("--irc-nick", default=IRC_DEFAULT_NICK, metavar="NICK",
                     help="the bot's nick; another is tried when it is taken "
                          "(default: %(default)s)")
    irc.add_argument("--irc-channel", action="append", default=[], metavar="CHANNEL",
                     help="join CHANNEL and answer 'NICK: NAME' there (repeatable)")
    irc.add_argument("--irc-tls", action="store_true",
                     help="connect with TLS; the certificate and host name are checked")
    irc.add_argument("--irc-cafile", metavar="FILE",
                     help="--irc-tls: trust only the CA certificates in this PEM file")
    irc.add_argument("--irc-account", metavar="NAME",
                     help="log in by SASL PLAIN as NAME (password: $%s, or "
                          "--irc-password-file)" % IRC_PASSWORD_ENV)
    irc.add_argument("--irc-require-sasl", action="store_true",
                     help="with --irc-account: disconnect and try again later rather than "
                          "stay on the network without the account")
    irc.add_argument("--irc-password-file", metavar="FILE",
                     help="file whose first line is the SASL password (never the command "
                          "line: every user can read that)")


def run_client(args, verbose, timeout, out=None, err=None):
    """The finger(1) command: ask each query, print '[host]' and the defanged reply.
    Returns 0, 1 when any query failed on the network, 2 for a malformed query."""
    out = out or sys.stdout
    err = err or sys.stderr
    targets = []
    for arg in args or ["@localhost"]:
        try:
            targets.append(parse_target(arg, verbose))
        except ValueError as error:
            print("finger.py: bad query %r: %s" % (arg, error), file=err)
            return 2
    status = 0
    for line, host, port in targets:
        try:
            reply = finger(line, host, port, timeout)
        except OSError as error:
            reason = "timed out" if isinstance(error, socket.timeout) else (
                error.strerror or str(error))
            print("finger.py: %s: %s" % (format_address((host, port)), reason), file=err)
            status = 1
            continue
        print("[%s]" % host, file=out)
        text = defang(reply.decode("utf-8", "replace"))
        out.write(text if text.endswith("\n") or not text else text + "\n")
    out.flush()
    return status


def run_set(status, path, timeout):
    """--set STATUS: 0 when the server answered OK, else 1 with the reason on stderr."""
    path = path or DEFAULT_SETTER_SOCKET
    try:
        answer = set_status(status, path, timeout)
    except OSError as error:
        print("finger.py: cannot reach the setter at %s: %s (is finger.py --serve running "
              "with --setter-socket %s?)" % (path, error.strerror or error, path),
              file=sys.stderr)
        return 1
    if answer != "OK":
        print("finger.py: %s" % answer, file=sys.stderr)
        return 1
    print(answer)
    return 0


# Keyword arguments of the classes -> the option that gives them, for FieldError's message.
OPTION_OF_FIELD = {
    "program": "command", "prefix": "web-prefix", "template_dir": "templates",
    "cert": "cert", "key": "key", "cafile": "irc-cafile", "tls": "irc-tls",
    "nick": "irc-nick", "channels": "irc-channel", "account": "irc-account",
    "password": "irc-password-file", "require_sasl": "irc-require-sasl", "host": "irc",
    "proxy_headers": "proxy-protocol",
}


def option_of_field(field):
    """How an error names a field: the option that gives it, or the field itself."""
    option = OPTION_OF_FIELD.get(field)
    return field if option is None else "--" + option


class OptionParser(argparse.ArgumentParser):
    """argparse with a usage error of one line and a hint, instead of the whole usage."""

    hint = "finger.py --help"

    def error(self, message):
        self.exit(2, "finger.py: error: %s\ntry '%s'\n" % (message, self.hint))


def build_parser(server=False):
    """The one parser of finger.py, client and server.  They parse alike; `server` picks
    the help: the server's options in groups, or only the client's."""
    parser = OptionParser(
        prog="finger.py", allow_abbrev=False, usage=SERVER_USAGE if server else CLIENT_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("The finger.py server: the Twisted finger tutorial's services, stdlib "
                     "only." if server else "RFC 1288 finger client (the server: finger.py "
                     "--serve --help)."),
        epilog=SERVER_EPILOG if server else CLIENT_EPILOG)
    parser.hint = "finger.py --serve --help" if server else "finger.py --help"
    client = [
        parser.add_argument("queries", nargs="*", metavar="QUERY",
                            help="user, user@host, @host or user@host1@host2; host may be "
                                 "host:port or [v6]:port (default: list localhost's users)"),
        parser.add_argument("-l", dest="verbose", action="store_true",
                            help="ask for the long form (sends /W)"),
        parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT,
                            metavar="SECONDS", help="limit for the whole exchange: "
                            "connecting, asking, reading (default: %(default)s)"),
        parser.add_argument("--set", metavar="STATUS",
                            help="set your own status through the server's unix-socket "
                                 "setter (--setter-socket PATH, default %s)"
                                 % DEFAULT_SETTER_SOCKET)]
    both = [parser._actions[0],        # -h, --help
            parser.add_argument("--version", action="version",
                                version="finger.py " + __version__)]
    modes = parser.add_argument_group("server modes")
    modes.add_argument("--serve", action="store_true", help="run the services")
    modes.add_argument("--inetd", action="store_true",
                       help="answer one finger query on stdin/stdout (inetd, systemd "
                            "Accept=yes)")
    modes.add_argument("--check-config", action="store_true",
                       help="check the options, the --config file, the files as the user "
                            "the server runs as, the certificate and the back-end; print "
                            "every problem; exit 0 (none) or 2, serving nothing")
    modes.add_argument("--print-config", action="store_true",
                       help="print the effective configuration as a --config file, and exit")

    listeners = parser.add_argument_group("listeners, each [HOST:]PORT, [V6]:PORT or off")
    for name, (default, what) in LISTENERS.items():
        listeners.add_argument("--" + name, type=_listen_option, default=default,
                               metavar="ADDR", help="%s (default: %s)" % (what, default))

    listeners.add_argument("--cert", metavar="FILE",
                           help="--https: PEM file with the certificate (and the key)")
    listeners.add_argument("--key", metavar="FILE",
                           help="--https: PEM file with the key, if not in --cert")
    listeners.add_argument("--hsts", type=_count_or_zero, default=DEFAULT_HSTS,
                           metavar="SECONDS", help="--https: the Strict-Transport-Security "
                           "max-age; 0: none; never sent on plain HTTP (default: %(default)s, "
                           "a year)")
    listeners.add_argument("--setter-socket", metavar="PATH",
                           help="also take statuses on this unix socket, where local users "
                                "may set only their own (default: off)")

    data = parser.add_argument_group("data")
    data.add_argument("--users", default=DEFAULT_USERS_FILE, metavar="FILE",
                      help="users file, lines 'user: status' (default: %(default)s)")
    data.add_argument("--reload", type=_seconds_or_zero, default=DEFAULT_RELOAD,
                      metavar="SECONDS",
                      help="check the users file for changes this often; 0: never "
                           "(default: %(default)s)")
    data.add_argument("--backend", default="file", metavar="NAME",
                      help="%s or MODULE:CLASS (default: %%(default)s)" % ", ".join(BACKENDS))
    data.add_argument("--web-prefix", metavar="URL",
                      help="--backend web: the status of NAME is the page at URL+NAME")
    data.add_argument("--command", default="finger", metavar="PROGRAM",
                      help="--backend command: the program run as PROGRAM -- NAME "
                           "(default: %(default)s)")
    data.add_argument("--backend-timeout", type=_seconds,
                      default=DEFAULT_BACKEND_TIMEOUT, metavar="SECONDS",
                      help="limit for a command, web lookup or forwarded query (default: "
                           "%(default)s)")
    data.add_argument("--list-plan-users", action="store_true",
                      help="--backend plan: answer the empty query with the users who have "
                           "a uid of 1000 or more")
    data.add_argument("--forward", action="store_true",
                      help="answer user@host queries on --finger by asking host (RFC 1288 "
                           "forwarding; off by default)")
    data.add_argument("--forward-ports", type=_port_list, default=(FINGER_PORT,),
                      metavar="PORTS", help="ports forwarding may connect to, comma-separated "
                      "(default: 79)")
    data.add_argument("--proxy-target", default="127.0.0.1:%d" % FINGER_PORT,
                      metavar="HOST[:PORT]", help="--proxy and --backend proxy: where names "
                      "without @host are asked (default: %(default)s)")
    data.add_argument("--templates", metavar="DIR",
                      help="users.html and user.html replacing the built-in pages")
    data.add_argument("--no-list", action="store_true",
                      help="keep the list of users private on every front-end: the empty "
                           "finger query, /, /api/users, XML-RPC and PB getUsers; a user "
                           "asked for by name is still answered")
    data.add_argument("--status", action="append", type=_status_pair, default=[],
                      metavar="USER=TEXT", help="--backend memory: a status to start with "
                      "(repeatable)")
    data.add_argument("--max-status", type=_count, default=DEFAULT_MAX_STATUS, metavar="N",
                      help="longest status the setter accepts, in characters (default: "
                           "%(default)s)")
    data.add_argument("--max-users", type=_count_or_zero, default=DEFAULT_MAX_USERS,
                      metavar="N", help="the setter adds no user past N users (a status can "
                      "still be set for those there are); 0: no limit (default: %(default)s)")
    data.add_argument("--max-users-bytes", type=_count_or_zero,
                      default=DEFAULT_MAX_USERS_BYTES, metavar="N",
                      help="the setter grows the users file to N bytes at most (a set that "
                      "does not grow it still works); 0: no limit (default: %(default)s)")

    limits = parser.add_argument_group("limits")
    limits.add_argument("--request-timeout", dest="timeout", type=_seconds,
                        default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="time a client has to send its query and take its answer; "
                             "between two reads on the web (default: %(default)s)")
    limits.add_argument("--max-connections", type=_count, default=DEFAULT_MAX_CONNECTIONS,
                        metavar="N", help="open connections per listener (default: "
                        "%(default)s)")
    limits.add_argument("--web-max-connections", type=_count,
                        default=DEFAULT_WEB_MAX_CONNECTIONS, metavar="N",
                        help="web connections open at once, idle keep-alive ones included "
                             "(none takes a thread); more get 503 (default: %(default)s)")
    limits.add_argument("--workers", type=_count, default=DEFAULT_WORKERS, metavar="N",
                        help="threads for back-ends that may block (default: %(default)s)")
    limits.add_argument("--per-client-connections", type=_count_or_zero,
                        default=DEFAULT_PER_CLIENT_CONNECTIONS, metavar="N",
                        help="connections one client address (IPv6: its /64) may have open "
                             "on a listener; 0: no limit (default: %(default)s)")
    limits.add_argument("--per-client-rate", type=_count_or_zero,
                        default=int(DEFAULT_PER_CLIENT_RATE), metavar="N",
                        help="requests a second one client address may make on a listener, "
                             "in bursts of 2 N; 0: no limit (default: %(default)s)")
    limits.add_argument("--proxy-protocol", type=_networks, default="none",
                        metavar="CIDR[,...]",
                        help="load balancers that put a PROXY header (version 1 or 2) in "
                             "front of each connection, on every listener: from them it is "
                             "required, and its client counts as the peer (log, limits); "
                             "from anyone else it is never taken (default: none)")
    limits.add_argument("--per-client-exempt", type=_networks,
                        default=",".join(DEFAULT_PER_CLIENT_EXEMPT), metavar="CIDR[,...]",
                        help="client networks the per-client limits do not apply to, or "
                             "'none' (default: %(default)s, this machine)")

    add_irc_options(parser)

    process = parser.add_argument_group("process (twistd's options)")
    process.add_argument("--config", metavar="FILE",
                         help="read options from an INI file, section [finger], keys the long "
                              "option names; the command line overrides it")
    process.add_argument("--user", metavar="NAME",
                         help="drop to this user after binding (root's default: %s)"
                              % UNPRIVILEGED_USER)
    process.add_argument("--group", metavar="NAME",
                         help="drop to this group after binding (default: the user's)")
    process.add_argument("--daemon", action="store_true",
                         help="detach into the background once the ports are bound")
    process.add_argument("--pidfile", metavar="FILE", help="write the process id here")
    process.add_argument("--logfile", metavar="FILE",
                         help="log to this file (reopened on SIGHUP); default: stderr")
    process.add_argument("--syslog", action="store_true", help="log to syslog (/dev/log)")
    process.add_argument("--prefix", default="finger", metavar="NAME",
                         help="--syslog: the name log lines carry (default: %(default)s)")
    process.add_argument("--rundir", metavar="DIR", help="change to this directory")
    process.add_argument("--chroot", metavar="DIR",
                         help="chroot here after binding (see README: what it needs)")
    process.add_argument("--stop-timeout", type=_seconds, default=DEFAULT_STOP_TIMEOUT,
                         metavar="SECONDS", help="at SIGTERM, how long answers in flight may "
                         "take before the process exits without them (default: %(default)s)")
    process.add_argument("--log-level", default="info",
                         choices=["debug", "info", "warning", "error"],
                         help="least important log lines shown (default: %(default)s)")
    process.add_argument("--log-queries", action="store_true",
                         help="one log line per query on every listener: service, client, "
                              "what it asked, outcome, time taken (never a status); off by "
                              "default, as in.fingerd without -l")
    for action in parser._actions:     # argparse has no public list of its actions
        if action not in both and (action in client) == server:
            action.help = argparse.SUPPRESS
    # What the client takes (--set uses --setter-socket), and the words of a server mode.
    parser.client_options = {word for action in client + both
                             for word in action.option_strings} | {"--setter-socket"}
    parser.mode_options = {word for action in modes._group_actions
                           for word in action.option_strings}
    return parser


# Options that are not configuration: modes, one-shot actions and the client's.
NOT_CONFIGURABLE = {"help", "version", "serve", "inetd", "set", "config", "print-config",
                    "check-config"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _configurable_options(parser):
    """{long option name without '--': argparse action} of the options a config may set."""
    options = {}
    for action in parser._actions:       # argparse has no public list of its actions
        for option in action.option_strings:
            if option.startswith("--") and option[2:] not in NOT_CONFIGURABLE:
                options[option[2:]] = action
    return options


def config_arguments(path, parser):
    """The options of an INI file, as command-line arguments to put before the real ones.
    Unknown keys and bad values are a UsageError naming the file, the line and the key of
    each, one line apiece."""
    import configparser
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise UsageError("--config %s: %s" % (path, error.strerror)) from None
    # Comments start in the first column: an indented '#' is a value (an IRC channel).
    config = configparser.ConfigParser(interpolation=None, delimiters=("=",),
                                       comment_prefixes=(),
                                       default_section="\0no default section")
    config.optionxform = str
    uncommented = "\n".join("" if line.startswith(("#", ";")) else line
                            for line in text.splitlines())
    try:
        config.read_string(uncommented, source=path)
    except configparser.Error as error:
        raise UsageError("--config: %s" % " ".join(str(error).split())) from None
    extra = [name for name in config.sections() if name != "finger"]
    if extra:
        raise UsageError("%s:%d: unknown section [%s]; options go in [finger]"
                         % (path, _line_of(text, "[" + extra[0]), extra[0]))
    known = _configurable_options(parser)
    arguments, problems = [], []
    for key, value in config.items("finger") if config.has_section("finger") else ():
        where = "%s:%d: %s" % (path, _line_of(text, key), key)
        action = known.get(key)
        try:
            if action is None:
                import difflib
                close = difflib.get_close_matches(key, list(known), 1)
                raise UsageError("%s: unknown key; %s" % (where, "did you mean %s?" % close[0]
                                 if close else "keys are long option names, e.g. users"))
            arguments += _config_value(action, "--" + key, value.strip(), where)
        except UsageError as error:
            problems.append(str(error))
    if problems:
        raise UsageError("\nfinger.py: error: ".join(problems))
    return arguments


def _config_value(action, option, value, where):
    """One config entry -> arguments, after checking the value as argparse would."""
    if action.nargs == 0:
        if value.lower() not in _TRUE + _FALSE:
            raise UsageError("%s: expected true or false, got %r" % (where, value))
        return [option] if value.lower() in _TRUE else []
    values = value.splitlines() if isinstance(action.default, list) else [value]
    arguments = []
    for item in filter(None, (v.strip() for v in values)):
        try:
            checked = action.type(item) if action.type else item
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise UsageError("%s: %s" % (where, error)) from None
        if action.choices and checked not in action.choices:
            raise UsageError("%s: expected one of %s" % (where, ", ".join(action.choices)))
        arguments += [option, item]
    return arguments


def _line_of(text, key):
    """The line number where `key` (or a section header) is first written."""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(key) and (stripped[len(key):].lstrip()[:1] in ("=", "]", "")
                                         or key.startswith("[")):
            return number
    return 0


def format_config(options, parser):
    """The effective configuration as a --config file: every option, those at their
    default commented out (so the file shows the defaults and sets only the rest)."""
    lines = ["# finger.py %s configuration: python3 finger.py --serve --config FILE" % __version__,
             "[finger]"]
    defaults = parser.parse_intermixed_args([])
    # One key per option: the last spelling added (--request-timeout, not the client's).
    keys = {action.dest: key for key, action in _configurable_options(parser).items()}
    for key, action in _configurable_options(parser).items():
        if keys[action.dest] != key:
            continue
        value = getattr(options, action.dest)
        comment = "# " if value == getattr(defaults, action.dest) else ""
        if key in LISTENERS:
            value = "off" if value is None else format_address(value)
        elif action.nargs == 0:
            value = "true" if value else "false"
        elif isinstance(value, tuple):
            value = ",".join(map(str, value))
        elif isinstance(value, list):
            value = "".join("\n    %s" % ("=".join(item) if isinstance(item, tuple) else item)
                            for item in value)
        elif value is None:
            lines.append("# %s =" % key)
            continue
        lines.append("%s%s = %s" % (comment, key, value))
    return "\n".join(lines) + "\n"


def man_page():
    """finger.py(1) in troff (man(7) macros), from the parsers that make both --help
    texts: `make man` writes it to build/finger.py.1."""
    def text(value):
        value = value.replace("\\", "\\e").replace("-", "\\-")
        return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                         for line in value.splitlines())

    def options(parser, skip=()):
        lines = []
        for group in parser._action_groups:    # argparse has no public list of them
            if group.title in skip:
                continue
            shown = [action for action in group._group_actions
                     if action.help is not argparse.SUPPRESS and action.option_strings]
            if not shown:
                continue
            lines.append(".SS %s" % text(group.title.capitalize()))
            for action in shown:
                names = ", ".join("\\fB%s\\fR" % text(name) for name in action.option_strings)
                if action.nargs != 0:
                    names += " \\fI%s\\fR" % text(action.metavar or (
                        "{%s}" % ",".join(action.choices) if action.choices
                        else action.dest.upper()))
                help_text = action.help % dict(vars(action), prog="finger.py")
                lines += [".TP", names, text(help_text)]
        return lines

    client, server = build_parser(), build_parser(server=True)
    lines = [
        '.TH FINGER.PY 1 "" "finger.py %s" "User Commands"' % __version__,
        ".SH NAME", "finger.py \\- RFC 1288 finger client and server (the Twisted finger "
        "tutorial's services, standard library only)",
        ".SH SYNOPSIS"]
    for usage in (CLIENT_USAGE + "\n" + SERVER_USAGE).splitlines():
        words = re.split(" {2,}", usage.strip())[0].split()   # the form, not its comment
        if words[0] == "finger.py" and "--help" not in words:
            lines += [".B finger.py", text(" ".join(words[1:])), ".br"]
    lines += [".SH DESCRIPTION",
              "As a client, like finger(1): each QUERY is asked of its host and the answer "
              "printed after a [host] line, control characters shown as ^X.",
              ".PP", "As a server, with \\fB\\-\\-serve\\fR: the services of the Twisted "
              "finger tutorial in one process: RFC 1288 finger, a status setter, a web site "
              "with JSON and XML-RPC, HTTPS, Perspective Broker, a finger proxy and an IRC "
              "bot, over user databases read from a file, ~/.plan files, a command or the "
              "web.",
              ".SH CLIENT OPTIONS"] + options(client)[1:] + [".SH SERVER OPTIONS"] + \
        options(server, skip=("options",))
    lines += [".SH EXAMPLES", ".nf"] + [text(line.strip()) for line in (
        CLIENT_EPILOG + SERVER_EPILOG).splitlines() if line.startswith("  ")] + [".fi",
        ".SH FILES", ".TP", text(DEFAULT_USERS_FILE),
        "the users file: lines \\(lquser: status\\(rq, # comments",
        ".SH EXIT STATUS", "0 on success; 1 on a network error (client) or a failure to "
        "start (server); 2 on bad usage or a configuration that \\fB\\-\\-check\\-config"
        "\\fR refuses.",
        ".SH SEE ALSO", "finger(1), fingerd(8), RFC 1288; the README of finger.py."]
    return "\n".join(lines) + "\n"


# Words that choose a server mode (the parser's "server modes"; a --config file is the
# server's): read before the parser is built, which they choose.
SERVER_WORDS = ("--serve", "--inetd", "--check-config", "--print-config", "--config")


def main(argv=None):
    """Run finger.py with `argv` (default sys.argv[1:]); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    server = any(word.partition("=")[0] in SERVER_WORDS for word in argv)
    parser = build_parser(server)
    config_file = _config_file(argv)
    try:
        arguments = config_arguments(config_file, parser) if config_file else []
    except UsageError as error:
        print("finger.py: error: %s\ntry '%s'" % (error, parser.hint), file=sys.stderr)
        return error.exit_code
    options = parser.parse_intermixed_args(arguments + argv)
    options.given = given_options(parser, argv) + _config_changes(parser, arguments)
    options.command_line = argv                 # for SIGHUP, which reads --config again
    if options.print_config:
        sys.stdout.write(format_config(options, parser))
        return 0
    if not server:
        return _main_client(options, parser)
    if options.queries:
        parser.error("queries are for the client; --serve and --inetd take none")
    misplaced = [name for name in options.given if name in ("-l", "--set")]
    if misplaced:
        parser.error("%s: the client's, not the server's" % ", ".join(misplaced))
    if not (options.serve or options.inetd or options.check_config):
        parser.error("--config is the server's: add --serve, --inetd or --check-config")
    _absolute_paths(options)
    options.serve = options.serve or options.check_config and not options.inetd
    try:
        if options.check_config:
            return run_check_config(options)
        setup_logging(options, to_stderr=not (options.inetd and _stderr_is_stdout()))
        return run_inetd(options) if options.inetd else run_server(options)
    except FingerError as error:
        print("finger.py: error: %s" % error, file=sys.stderr)
        if isinstance(error, UsageError):
            print("try '%s'" % parser.hint, file=sys.stderr)
        return error.exit_code
    except OSError as error:
        print("finger.py: error: %s" % error, file=sys.stderr)
        return 1


def _main_client(options, parser):
    """main without a server mode: a query or --set, with the client's options only (any
    other is a usage error) -> the exit code."""
    misplaced = [name for name in options.given if name not in parser.client_options]
    if misplaced:
        parser.hint = "finger.py --serve --help"
        parser.error("%s %s the server's: did you mean finger.py --serve?" % (
            ", ".join(misplaced), "is" if len(misplaced) == 1 else "are"))
    if options.set is not None:
        return run_set(options.set, options.setter_socket, options.timeout)
    return run_client(options.queries, options.verbose, options.timeout)


def given_options(parser, words):
    """The options named in `words` (command-line words), as they were spelt."""
    actions = parser._option_string_actions    # argparse has no public table of them
    given, value_next = [], False
    for word in words:
        if value_next:
            value_next = False
            continue
        if word == "--":
            break
        option, equals, _ = word.partition("=")
        action = actions.get(option)
        if action is not None:
            given.append(option)
            value_next = action.nargs != 0 and not equals
    return given


def reload_configuration(group, options):
    """SIGHUP with --config: read the file again (with the same command line on top) and
    apply what can change now; log once which changed options need a restart."""
    parser = build_parser(server=True)
    try:
        arguments = config_arguments(options.config, parser)
        new = parser.parse_intermixed_args(arguments + getattr(options, "command_line", []))
    except UsageError as error:
        log.error("SIGHUP: %s; the configuration in use stays", error)
        return
    except SystemExit:                 # argparse said why on stderr
        log.error("SIGHUP: %s cannot be used; the configuration in use stays", options.config)
        return
    _absolute_paths(new)
    spelling = {action.dest: action.option_strings[-1] for action in parser._actions
                if action.option_strings}
    try:
        later = apply_options(group, options, new)
    except UsageError as error:
        log.error("SIGHUP: %s; the configuration in use stays", error)
        return
    log.info("SIGHUP: read %s again", options.config)
    if later:
        log.warning("SIGHUP: %s changed in %s; they take effect at the next start",
                    ", ".join(spelling.get(key, key) for key in later), options.config)


def _config_changes(parser, arguments):
    """The options a config file (as `arguments`) sets to other than their defaults: a file
    written by --print-config names them all."""
    configured = parser.parse_intermixed_args(arguments)
    actions = parser._option_string_actions
    return [name for name in given_options(parser, arguments)
            if getattr(configured, actions[name].dest) != actions[name].default]


def run_check_config(options):
    """--check-config: every problem of the configuration on stderr, one line each; exit 2
    when there is any (warnings count), else 0 and one line on what would run."""
    problems = []
    # What building logs at WARNING or above (skipped lines of the users file, a password
    # file others may read, ...) is a problem too.
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: problems.append(record.getMessage())
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    try:
        identity = resolve_identity(options.user, options.group)
    except FingerError as error:
        problems.append(str(error))
        identity = None
    try:
        group = build_services(options) if options.serve else None
        if options.inetd:
            build_database(options)
    except (FingerError, OSError) as error:
        problems.append(str(error))
        group = None
    log.removeHandler(handler)
    problems += file_problems(options)
    if options.serve:
        problems += port_problems(options)
    problems += configuration_warnings(options, identity)
    for problem in problems:
        print("finger.py: %s" % problem, file=sys.stderr)
    if problems:
        print("finger.py: --check-config: %d problem%s" % (
            len(problems), "" if len(problems) == 1 else "s"), file=sys.stderr)
        return 2
    what = ("inetd" if options.inetd else
            ", ".join(service.name for service in group) or "no listener of its own (systemd "
            "passes the sockets at start)")
    print("finger.py: the configuration is fine: %s, as %s" % (
        what, run_as_name(identity)))
    return 0


PATH_METAVARS = ("FILE", "DIR", "PATH")     # the metavars of options that name files


def _absolute_paths(options):
    """Options naming files (by their metavar) made absolute at start, since --daemon and
    --rundir change directory (and SIGHUP reads --config again); --rundir itself is used
    before that."""
    for action in build_parser(server=True)._actions:
        value = getattr(options, action.dest, None)
        if action.metavar in PATH_METAVARS and action.dest != "rundir" and value:
            setattr(options, action.dest, os.path.abspath(value))


def _config_file(argv):
    """The --config FILE in argv, if any (read before the other options)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    return pre.parse_known_args(argv)[0].config


if __name__ == "__main__":
    sys.exit(main())
