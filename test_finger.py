"""Tests of finger.py: unittest only, real sockets on port 0, servers in threads.

    python3 -m unittest -v test_finger            (make test)
    FINGER_INTEROP=1 python3 -m unittest -v test_finger.TestInterop   (make interop)

Interop tests talk to peers we did not write (Debian's finger and fingerd); they are skipped,
with the reason, unless FINGER_INTEROP=1 and the peers are installed.
"""

import contextlib
import grp
import io
import json
import logging
import os
import pwd
import queue
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings

import finger

HERE = os.path.dirname(os.path.abspath(__file__))
FINGER_PY = os.path.join(HERE, "finger.py")
LOCALHOST = "127.0.0.1"
TIMEOUT = 5.0
USERS = "moshez: Happy and well\nshawn: alive\n"
INTEROP = os.environ.get("FINGER_INTEROP") == "1"
logging.getLogger("finger").addHandler(logging.NullHandler())   # tests read logs with assertLogs

# == helpers ==================================================================================

def _needs(*programs):
    missing = [p for p in programs if not shutil.which(p)]
    if not INTEROP:
        return unittest.skip("interop test: run with FINGER_INTEROP=1 (make interop)")
    if missing:
        return unittest.skip("not installed: %s" % ", ".join(missing))
    return lambda test: test


def wait_until(predicate, timeout=TIMEOUT, interval=0.01):
    """Poll `predicate` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %.1f s" % timeout)
        time.sleep(interval)


def ask(address, data, timeout=TIMEOUT):
    """Send raw bytes to a server, read until it closes, return what it sent."""
    with socket.create_connection(address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        return read_to_end(sock)


def read_to_end(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def connect(test, address):
    sock = socket.create_connection(address[:2], timeout=TIMEOUT)
    test.addCleanup(sock.close)
    return sock


def write_file(test, text, name="users", mode="w"):
    directory = tempfile.mkdtemp(prefix="finger-test-")
    test.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, name)
    with open(path, mode) as f:
        f.write(text)
    return path


def replace_file(path, data):
    """Write a new version of a file the way editors do: new inode, so reload notices."""
    with open(path + ".new", "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(path + ".new", path)


class TestClock:
    """A clock that moves only when the test says: the deadlines of a service's Loop."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, service, seconds):
        """Move on, and return once the service's loop has run the timers now due (a timer
        due now runs after them)."""
        self.now += seconds
        done = threading.Event()
        service.loop.call_soon(service.loop.call_later, 0, done.set)
        if not done.wait(TIMEOUT):
            raise AssertionError("the loop did not run its timers")


def start(test, service):
    service.start()
    test.addCleanup(service.stop)
    return service.address


@contextlib.contextmanager
def query_log_on(test):
    """The query log on for the block; yields assertLogs' record of the lines it wrote."""
    finger.query_log.enabled = True
    try:
        with test.assertLogs("finger", "INFO") as logs:
            yield logs
            finger.query_log.flush()
    finally:
        finger.query_log.enabled = False


def finger_service(test, db=None, **options):
    """A running finger TCPService on 127.0.0.1:0 with a memory database."""
    db = db if db is not None else finger.MemoryDatabase(
        {"moshez": "Happy and well", "shawn": "alive"})
    db.listable = options.pop("listable", True)
    service = finger.TCPService(finger.FingerProtocol(db), (LOCALHOST, 0), **options)
    start(test, service)
    return service


def run_finger(*args, timeout=15, **kwargs):
    return subprocess.run([sys.executable, FINGER_PY, *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def run_finger_all(*commands):
    """run_finger for each argument list of `commands`, at once; the results in order."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: run_finger(*args), commands))


class ServerProcess:
    """`finger.py --serve ...` in a child process; learns its ports from the log."""

    def __init__(self, test, *args, wrapper=(), **popen):
        if os.geteuid() == 0 and "--user" not in args:
            args += ("--user", "root")      # temp files are root's; privilege tests say --user
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, FINGER_PY, "--serve", *args], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, **popen)
        test.addCleanup(self.kill)
        self.lines = queue.Queue()
        self.log = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, pattern, timeout=TIMEOUT):
        """The first match of `pattern` in the log from now on (fails at exit or timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError("no %r in the log: %s" % (pattern, self.log)) from None
            if line is None:
                raise AssertionError("exited without %r: %s" % (pattern, self.log))
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def address(self, name="finger"):
        match = self.expect(r"serving %s on (\S+):(\d+)" % name)
        return match.group(1), int(match.group(2))

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stderr.close()


class SlowDatabase(finger.UserDatabase):
    """A back-end that blocks on `release` for the name 'slow' (stands for a remote lookup)."""
    blocking = True

    def __init__(self):
        self.release = threading.Event()
        self.waiting = threading.Semaphore(0)

    def get_user(self, name):
        if name == "slow":
            self.waiting.release()
            self.release.wait(TIMEOUT)
            return "finally"
        return {"moshez": "Happy and well"}.get(name)


class BrokenDatabase(finger.UserDatabase):
    def get_user(self, name):
        raise RuntimeError("the database is on fire")

# == 1. constants, errors and small helpers ===================================================

class TestAddresses(unittest.TestCase):
    def test_listen_values(self):
        self.assertEqual(finger.parse_listen("79"), ("", 79))
        self.assertEqual(finger.parse_listen(":79"), ("", 79))
        self.assertEqual(finger.parse_listen("127.0.0.1:1079"), ("127.0.0.1", 1079))
        self.assertEqual(finger.parse_listen("[::1]:0"), ("::1", 0))
        self.assertIsNone(finger.parse_listen("off"))
        for bad in ["", "host", "host:", "1.2.3.4:99999", "[::1", "[::1]x", "a:b"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                finger.parse_listen(bad)

    def test_client_targets(self):
        cases = {
            "moshez": ("moshez", "localhost", 79),
            "moshez@example.org": ("moshez", "example.org", 79),
            "@example.org:7979": ("", "example.org", 7979),
            "moshez@h1@h2": ("moshez@h1", "h2", 79),
            "moshez@[::1]:7979": ("moshez", "::1", 7979),
            "moshez@::1": ("moshez", "::1", 79),
            "finger://example.org/moshez": ("moshez", "example.org", 79),
        }
        for arg, expected in cases.items():
            with self.subTest(arg=arg):
                self.assertEqual(finger.parse_target(arg), expected)
        self.assertEqual(finger.parse_target("moshez@h", verbose=True)[0], "/W moshez")
        for bad in ["moshez@", "x@h:port", "x@[::1"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                finger.parse_target(bad)

# == 2. pure codecs ===========================================================================

class TestParseUsers(unittest.TestCase):
    def test_lines_comments_and_first_colon(self):
        users, problems = finger.parse_users(
            ["# comment\n", "\n", "  moshez :  Happy and well \n", "time: 12:30 lunch\n",
             "   # indented comment: with colon\n", "empty:\n"])
        self.assertEqual(users, {"moshez": "Happy and well", "time": "12:30 lunch",
                                 "empty": ""})
        self.assertEqual(problems, [])

    def test_malformed_lines_are_skipped_and_named_by_file_and_line(self):
        users, problems = finger.parse_users(
            ["moshez: ok\n", "no colon here\n", ": no name\n", "two words: x\n"], "/etc/users")
        self.assertEqual(users, {"moshez": "ok"})
        self.assertEqual([p.split(": ")[0] for p in problems],
                         ["/etc/users:2", "/etc/users:3", "/etc/users:4"])

    def test_duplicate_user_last_wins_with_a_warning(self):
        users, problems = finger.parse_users(["a: first\n", "a: second\n"], "f")
        self.assertEqual(users, {"a": "second"})
        self.assertEqual(len(problems), 1)
        self.assertIn("f:2: duplicate user 'a'", problems[0])

    def test_over_long_line_is_skipped(self):
        long_line = "big: " + "x" * finger.MAX_USERS_LINE_CHARS + "\n"
        users, problems = finger.parse_users(["ok: yes\n", long_line])
        self.assertEqual(users, {"ok": "yes"})
        self.assertIn(":2: line longer than", problems[0])

    def test_nul_byte_means_not_a_text_file(self):
        with self.assertRaises(finger.UsersFileError):
            finger.parse_users(["a: b\x00c\n"])

    def test_text_lines_are_the_lines_of_text_mode_across_chunks(self):
        pieces = ["plain: line\n", "crlf: line\r\n", "cr: line\r", "été: naïve ☃\n",
                  "\n", "  # comment\r\n", "form\x0cfeed: and \x85 next line\n"]
        rng = random.Random(7)
        data = finger.UTF8_BOM + b"".join(
            rng.choice(pieces).encode("utf-8") + (b"\xff\xfe bad: bytes\n" if n % 997 == 0
                                                  else b"")
            for n in range(3 * finger.USERS_DECODE_CHUNK // 12)) + b"last: no line end"
        self.assertGreater(len(data), 2 * finger.USERS_DECODE_CHUNK)   # several chunks
        text_mode = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="replace")
        expected = [line[:-1] if line.endswith("\n") else line for line in text_mode]
        self.assertEqual(list(finger.text_lines(io.BytesIO(data))), expected)
        self.assertEqual(list(finger.text_lines(io.BytesIO(b""))), [])
        self.assertEqual(list(finger.text_lines(io.BytesIO(finger.UTF8_BOM + b"a: b\r\n"))),
                         ["a: b"])
        long_line = b"long: " + b"x" * (2 * finger.USERS_DECODE_CHUNK) + b"\r\nnext: line"
        self.assertEqual(list(finger.text_lines(io.BytesIO(long_line))),
                         [long_line[:-12].decode(), "next: line"])


class TestParseQuery(unittest.TestCase):
    def test_rfc1288_grammar(self):
        Q = finger.Query
        cases = {
            "": Q(),
            "moshez": Q(False, ["moshez"]),
            "/W moshez": Q(True, ["moshez"]),
            "/w   moshez": Q(True, ["moshez"]),
            "/Wmoshez": Q(True, ["moshez"]),
            "/W": Q(True),
            "moshez shawn\t glyph": Q(False, ["moshez", "shawn", "glyph"]),
            "moshez@host": Q(False, ["moshez"], ["host"]),
            "@host": Q(False, [], ["host"]),
            "/W moshez@h1@h2": Q(True, ["moshez"], ["h1", "h2"]),
            " moshez \r": Q(False, ["moshez"]),
        }
        for line, expected in cases.items():
            with self.subTest(line=line):
                self.assertEqual(finger.parse_query(line), expected)


class TestDefangAndReplies(unittest.TestCase):
    def test_control_characters_become_caret_notation(self):
        self.assertEqual(finger.defang("a\x1b[31mred\x07\x7f"), "a^[[31mred^G^?")
        self.assertEqual(finger.defang("tab\tnew\nline\r\n"), "tab\tnew\nline\n")
        self.assertEqual(finger.defang("bare\rcr \x9b"), "bare^Mcr M-^[")
        self.assertEqual(finger.defang("caf\u00e9 \u202eevil"), "caf\u00e9 <U+202E>evil")

    def test_reply_is_utf8_with_crlf(self):
        self.assertEqual(finger.format_reply("caf\u00e9"), "caf\u00e9\r\n".encode())
        self.assertEqual(finger.format_reply("a\nb\n"), b"a\r\nb\r\n")
        self.assertEqual(finger.format_reply("evil\r\nQUIT\x1b"), b"evil\r\nQUIT^[\r\n")

# == 3. user databases (back-ends) ============================================================

class TestFileDatabase(unittest.TestCase):
    def test_a_users_file_that_is_no_regular_file_is_refused_at_once(self):
        directory = tempfile.mkdtemp(prefix="finger-test-")
        self.addCleanup(shutil.rmtree, directory)
        fifo = os.path.join(directory, "users")
        os.mkfifo(fifo)
        for path in (fifo, "/dev/zero", directory):
            started = time.monotonic()
            with self.assertRaisesRegex(finger.UsersFileError, "cannot read users file"):
                finger.FileDatabase(path)
            self.assertLess(time.monotonic() - started, 1.0, path)
        path = write_file(self, "moshez: hi\n")
        db = finger.FileDatabase(path)
        os.replace(fifo, path)                         # a FIFO where the file was
        with self.assertLogs("finger", "ERROR") as logs:
            self.assertFalse(db.reload())
            self.assertFalse(db.reload())
        self.assertEqual(len(logs.output), 1)
        self.assertIn("not a regular file", logs.output[0])
        self.assertEqual(db.get_user("moshez"), "hi")  # the last good users stay
        self.assertEqual(db.health()[1], False)

    def database(self, text=USERS, interval=0):
        path = write_file(self, text)
        db = finger.FileDatabase(path, interval)
        self.addCleanup(db.stop)
        return path, db

    def test_writes_that_arrive_together_are_written_together(self):
        path, db = self.database()
        names = ["user%02d" % number for number in range(40)]
        threads = [threading.Thread(target=db.set_user, args=(name, "status of " + name))
                   for name in names]
        with db._lock:                          # a write in progress: the others queue up
            for thread in threads:
                thread.start()
            # private: no public way to see it
            wait_until(lambda: len(db._queued) == len(names))
        for thread in threads:
            thread.join()
        self.assertEqual(db.rewrites, 1)
        with open(path, encoding="utf-8") as f:
            on_disk, _ = finger.parse_users(f)
        for name in names:
            self.assertEqual((on_disk.get(name), db.get_user(name)), ("status of " + name,) * 2)
        self.assertEqual(on_disk.get("moshez"), "Happy and well")

    def test_temp_files_left_by_a_crash_are_removed_at_start(self):
        path, db = self.database()
        directory = os.path.dirname(path)
        left = [tempfile.mkstemp(prefix=".users.", dir=directory) for _ in range(2)]
        for fd, _ in left:
            os.close(fd)
        others = [".users.backup", "users.bak", ".other.abcdefgh", ".users.abcdefghi"]
        for name in others:
            write_path = os.path.join(directory, name)
            with open(write_path, "w") as f:
                f.write("keep me")
        with self.assertLogs("finger", "WARNING") as logs:
            db.start()
        self.assertEqual(sorted(os.listdir(directory)), sorted(others + ["users"]))
        self.assertEqual(len(logs.output), 2)
        self.assertIn("left by a crash", logs.output[0])

    def test_a_reload_asked_elsewhere_is_done_by_the_reload_thread(self):
        path, db = self.database(interval=3600)
        db.start()
        replace_file(path, "moshez: Sleeping\n")
        with self.assertLogs("finger", "INFO") as logs:
            self.assertTrue(db.reload(force=True))          # as SIGHUP's thread asks
        self.assertEqual([record.threadName for record in logs.records
                          if record.getMessage().startswith("loaded ")], ["finger-reload"])
        self.assertEqual(db.get_user("moshez"), "Sleeping")
        self.assertFalse(db.reload())                       # unchanged: nothing to do
        callers = [threading.Thread(target=db.reload, args=(True,)) for _ in range(4)]
        for caller in callers:
            caller.start()
        db.stop()                               # asked before it, or answered by the caller
        for caller in callers:
            caller.join(TIMEOUT)
            self.assertFalse(caller.is_alive())
        replace_file(path, "moshez: Back\n")
        self.assertTrue(db.reload())                        # stopped: in this thread
        self.assertEqual(db.get_user("moshez"), "Back")

    def test_reloads_asked_together_are_done_once_also_without_an_interval(self):
        _, db = self.database(interval=0)
        db.start()
        first = db._asked              # the list the reload thread takes first, and keeps
        with self.assertLogs("finger", "INFO") as logs:
            with db._lock:                      # a reload or a write in progress
                callers = [threading.Thread(target=db.reload, args=(True,)) for _ in range(5)]
                for caller in callers:
                    caller.start()
                # private: no public way to see it
                wait_until(lambda: len(first) + (len(db._asked) if db._asked is not first
                                                 else 0) == 5)     # all five asked
            for caller in callers:
                caller.join(TIMEOUT)
                self.assertFalse(caller.is_alive())
        loads = [record for record in logs.records if record.getMessage().startswith("loaded ")]
        self.assertEqual(len(loads), 1 if len(first) == 5 else 2)     # one, or two batches

    def test_a_retired_table_is_empty(self):
        table = finger.UserTable({"u%04d" % number: "x" for number in range(3000)})
        table.retire()
        self.assertEqual((len(table), list(table), table.sorted_names()), (0, [], []))

    def test_lookup_and_list(self):
        _, db = self.database()
        self.assertEqual(db.get_user("moshez"), "Happy and well")
        self.assertIsNone(db.get_user("nobody"))
        self.assertEqual(db.get_users(), ["moshez", "shawn"])

    def test_invalid_utf8_is_replaced(self):
        path = write_file(self, b"bad: caf\xe9\n", mode="wb")
        self.assertEqual(finger.FileDatabase(path, 0).get_user("bad"), "caf\ufffd")

    def test_malformed_and_duplicate_lines_are_logged(self):
        with self.assertLogs("finger", "WARNING") as logs:
            path, db = self.database("a: 1\nbroken\na: 2\n")
        self.assertEqual(db.get_user("a"), "2")
        self.assertIn("%s:2: no ':'" % path, logs.output[0])
        self.assertIn("%s:3: duplicate user 'a'" % path, logs.output[1])

    def test_reload_only_when_changed(self):
        path, db = self.database()
        loaded_at = db.loaded_at
        self.assertFalse(db.reload())
        self.assertIs(db.loaded_at, loaded_at)
        replace_file(path, "moshez: Sleeping\n")
        self.assertTrue(db.reload())
        self.assertEqual(db.get_user("moshez"), "Sleeping")
        self.assertIsNone(db.get_user("shawn"))

    def test_failed_reloads_keep_last_good_data_and_log_once_per_streak(self):
        path, db = self.database()
        with self.assertLogs("finger", "ERROR") as logs:
            os.unlink(path)
            self.assertFalse(db.reload())
            os.mkdir(path)                                   # replaced by a directory
            self.assertFalse(db.reload())
            self.assertFalse(db.reload(force=True))
        self.assertEqual(len(logs.output), 1)
        self.assertIn(path, logs.output[0])
        self.assertEqual(db.get_user("moshez"), "Happy and well")
        os.rmdir(path)
        replace_file(path, "moshez: back\n")
        with self.assertLogs("finger", "INFO") as logs:
            self.assertTrue(db.reload())
        self.assertIn("usable again", logs.output[-1])
        self.assertEqual(db.get_user("moshez"), "back")
        replace_file(path, "moshez: nul\x00\n")              # not text: a new streak
        with self.assertLogs("finger", "ERROR"):
            self.assertFalse(db.reload())
        self.assertEqual(db.get_user("moshez"), "back")

    def test_unreadable_file_keeps_data(self):
        path = write_file(self, USERS)
        script = ("import os, sys, finger\n"
                  "db = finger.FileDatabase(sys.argv[1], 0)\n"
                  "os.replace(sys.argv[1] + '.new', sys.argv[1])\n"
                  "print(db.reload(), db.get_user('moshez'))\n")
        with open(path + ".new", "w") as f:
            f.write("x: y\n")
        os.chmod(path + ".new", 0)
        command = [sys.executable, "-c", script, path]
        if os.geteuid() == 0:          # root reads anything, unless it lacks the capabilities
            if not shutil.which("setpriv"):
                self.skipTest("running as root and setpriv (util-linux) is missing")
            drop = "-dac_override,-dac_read_search"
            command[:0] = ["setpriv", "--bounding-set", drop, "--inh-caps", drop]
        result = subprocess.run(command, capture_output=True, text=True, cwd=HERE, timeout=30)
        self.assertEqual(result.stdout, "False Happy and well\n", result.stderr)
        self.assertIn("Permission denied", result.stderr)

    def test_missing_file_at_start(self):
        with self.assertRaises(finger.UsersFileError) as caught:
            finger.FileDatabase("/nonexistent/users")
        self.assertIn("/nonexistent/users", str(caught.exception))

    def test_periodic_reload_thread_picks_up_edits_and_stops_promptly(self):
        path, db = self.database(interval=0.02)
        db.start()
        replace_file(path, "moshez: Edited\n")
        wait_until(lambda: db.get_user("moshez") == "Edited")
        started = time.monotonic()
        db.stop()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertFalse(any(t.name == "finger-reload" for t in threading.enumerate()))

    def test_lookups_never_miss_during_reloads(self):
        path, db = self.database("\n".join("user%d: status %d" % (i, i) for i in range(5000)))
        misses = []
        stop = threading.Event()

        def look():
            while not stop.is_set():
                if db.get_user("user4999") is None:
                    misses.append(1)

        def list_all():
            while not stop.is_set():
                if len(db.get_users()) != 5000:
                    misses.append(2)

        readers = [threading.Thread(target=look), threading.Thread(target=list_all)]
        for reader in readers:
            reader.start()
        for round_ in range(8):
            replace_file(path, "\n".join("user%d: round %d" % (i, round_) for i in range(5000)))
            self.assertTrue(db.reload())
        stop.set()
        for reader in readers:
            reader.join()
        self.assertEqual(misses, [])
        self.assertEqual(db.get_user("user4999"), "round 7")

    def test_users_file_with_a_byte_order_mark(self):
        path = write_file(self, "\ufeffmoshez: Happy and well\nshawn: alive\n", mode="w")
        db = finger.FileDatabase(path, 0)
        self.assertEqual(db.get_user("moshez"), "Happy and well")
        db.set_user("moshez", "Still happy")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"\xef\xbb\xbfmoshez: Still happy\nshawn: alive\n")


def make_user(test, gecos="Plan Tester,,,"):
    """A real account with a home directory (root only), removed after the test."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        test.skipTest("creating a real user needs root and useradd")
    name = "fingert%d" % (os.getpid() % 100000)
    subprocess.run(["userdel", "-r", name], capture_output=True)
    subprocess.run(["useradd", "-m", "-c", gecos, "-s", "/bin/sh", name], check=True,
                   capture_output=True)
    test.addCleanup(subprocess.run, ["userdel", "-r", name], capture_output=True)
    return pwd.getpwnam(name)


def write_home_file(entry, name, data, mode=0o644):
    path = os.path.join(entry.pw_dir, name)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, mode)
    return path


class TestPlanDatabase(unittest.TestCase):
    def test_plan_project_and_verbose(self):
        entry = make_user(self)
        db = finger.PlanDatabase()
        self.assertEqual(db.get_user(entry.pw_name), "No Plan.")
        write_home_file(entry, ".plan", "Testing plans\n\x1b[2J")
        write_home_file(entry, ".project", "finger.py\n")
        self.assertEqual(db.get_user(entry.pw_name), "Testing plans\n\x1b[2J")
        verbose = db.get_user_verbose(entry.pw_name)
        self.assertRegex(verbose, r"^Login: %s +Name: Plan Tester\n" % entry.pw_name)
        self.assertIn("Directory: %s" % entry.pw_dir, verbose)
        self.assertIn("Shell: /bin/sh", verbose)
        self.assertIn("Project: finger.py\nPlan:\nTesting plans", verbose)
        address = finger_service(self, db).address          # defanged on the wire
        self.assertEqual(ask(address, entry.pw_name.encode() + b"\r\n"),
                         b"Testing plans\r\n^[[2J\r\n")

    def test_unknown_hidden_and_odd_names(self):
        entry = make_user(self)
        db = finger.PlanDatabase()
        for name in ["no-such-user-at-all", "../etc", "root\n", ""]:
            self.assertIsNone(db.get_user(name), name)
        write_home_file(entry, ".nofinger", "")
        self.assertIsNone(db.get_user(entry.pw_name))
        self.assertIsNone(db.get_user_verbose(entry.pw_name))

    def test_links_to_files_of_others_reveal_nothing(self):
        entry = make_user(self)
        secret = write_file(self, "root's secret\n")
        os.chmod(secret, 0o600)
        db = finger.PlanDatabase()
        os.symlink(secret, os.path.join(entry.pw_dir, ".plan"))
        os.symlink(secret, os.path.join(entry.pw_dir, ".project"))
        self.assertEqual(db.get_user(entry.pw_name), "No Plan.")
        self.assertNotIn("secret", db.get_user_verbose(entry.pw_name))
        os.unlink(os.path.join(entry.pw_dir, ".plan"))
        os.link(secret, os.path.join(entry.pw_dir, ".plan"))      # a hard link: root's file
        with self.assertLogs("finger", "WARNING"):
            self.assertEqual(db.get_user(entry.pw_name), "No Plan.")
        os.unlink(os.path.join(entry.pw_dir, ".plan"))
        os.mkfifo(os.path.join(entry.pw_dir, ".plan"))            # must not hang
        os.chown(os.path.join(entry.pw_dir, ".plan"), entry.pw_uid, entry.pw_gid)
        with self.assertLogs("finger", "WARNING"):
            self.assertEqual(db.get_user(entry.pw_name), "No Plan.")

    def test_plan_size_cap_and_listing(self):
        entry = make_user(self)
        write_home_file(entry, ".plan", "p" * (finger.MAX_PLAN_BYTES + 100))
        self.assertEqual(len(finger.PlanDatabase().get_user(entry.pw_name)),
                         finger.MAX_PLAN_BYTES)
        self.assertEqual(finger.PlanDatabase().get_users(), [])
        self.assertIn(entry.pw_name, finger.PlanDatabase(list_users=True).get_users())


def write_script(test, body):
    """An executable shell script in a temp directory."""
    path = write_file(test, "#!/bin/sh\n" + body, name="fake-finger")
    os.chmod(path, 0o755)
    return path


class TestCommandDatabase(unittest.TestCase):
    def test_runs_the_program_with_the_name_after_double_dash(self):
        log_file = write_file(self, "")
        script = write_script(self, 'echo "$@" >> %s\nprintf "Login: %%s\\nPlan: runs\\n" "$2"\n'
                              % log_file)
        db = finger.CommandDatabase(script)
        self.assertEqual(db.get_user("moshez"), "Login: moshez\nPlan: runs")
        self.assertIsNone(db.get_user("-l; rm -rf /"))       # never reaches the program
        self.assertIsNone(db.get_user("$(reboot)"))
        self.assertEqual(_read(log_file), "-- moshez\n")

    def test_timeout_output_cap_and_missing_program(self):
        slow = finger.CommandDatabase(write_script(self, "sleep 10\n"), timeout=0.3)
        started = time.monotonic()
        with self.assertRaises(finger.FingerError):
            slow.get_user("moshez")
        self.assertLess(time.monotonic() - started, 3)
        chatty = finger.CommandDatabase(
            write_script(self, "head -c 1000000 /dev/zero | tr '\\\\0' x\n"), max_output=1000)
        self.assertEqual(len(chatty.get_user("moshez")), 1000)
        with self.assertRaises(finger.UsageError):
            finger.CommandDatabase("/nonexistent/finger")
        result = run_finger("--serve", "--backend", "command", "--command", "no-such-finger")
        self.assertEqual(result.returncode, 2)
        self.assertIn("no-such-finger", result.stderr)

    def test_a_slow_command_answers_internal_error_on_the_wire(self):
        db = finger.CommandDatabase(write_script(self, "sleep 10\n"), timeout=0.2)
        address = finger_service(self, db).address
        with self.assertLogs("finger", "ERROR") as logs:
            self.assertEqual(ask(address, b"moshez\r\n"), b"Internal error in server\r\n")
        self.assertIn("took longer", logs.output[0])


class StatusPages:
    """A local web server standing for the tutorial's LiveJournal."""

    def __init__(self, test):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                pages = {
                    "/moshez": (200, "text/html; charset=iso-8859-1",
                                "<html><head><title>t</title><script>alert(1)</script></head>"
                                "<body><p>Caf\u00e9   and\n well</p><p>second</p></body>"
                                "</html>".encode("latin-1")),
                    "/plain%20name": (200, "text/plain", b"spaces are quoted"),
                    "/big": (200, "text/plain", b"b" * (finger.MAX_WEB_LOOKUP_BYTES * 2)),
                    "/broken": (500, "text/plain", b"oops"),
                }
                if self.path == "/slow":
                    time.sleep(1)
                code, kind, body = pages.get(self.path, (404, "text/plain", b"no"))
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self.server.handle_error = lambda request, address: None   # clients that gave up
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        test.addCleanup(self.server.server_close)
        test.addCleanup(self.server.shutdown)
        self.prefix = "http://127.0.0.1:%d/" % self.server.server_address[1]


class TestWebDatabase(unittest.TestCase):
    def test_pages_become_statuses(self):
        db = finger.WebDatabase(StatusPages(self).prefix)
        self.assertEqual(db.get_user("moshez"), "Caf\u00e9 and well\nsecond")
        self.assertEqual(db.get_user("plain name"), "spaces are quoted")
        self.assertIsNone(db.get_user("nobody"))
        self.assertEqual(len(db.get_user("big")), finger.MAX_WEB_LOOKUP_BYTES)

    def test_failures_answer_internal_error_and_are_logged(self):
        db = finger.WebDatabase(StatusPages(self).prefix, timeout=0.3)
        address = finger_service(self, db).address
        for name in [b"broken", b"slow"]:
            with self.subTest(name=name), self.assertLogs("finger", "ERROR"):
                self.assertEqual(ask(address, name + b"\r\n"), b"Internal error in server\r\n")
        self.assertEqual(ask(address, b"moshez\r\n"), "Caf\u00e9 and well\r\nsecond\r\n".encode())

    def test_prefix_must_be_http(self):
        for prefix in [None, "", "file:///etc/", "ftp://x/"]:
            with self.assertRaises(finger.UsageError):
                finger.WebDatabase(prefix)

PLUGIN = """
import finger

class Shouting(finger.UserDatabase):
    def __init__(self, web_prefix=None, **rest):
        self.greeting = web_prefix or "HELLO"

    def get_user(self, name):
        return "%s, %s!" % (self.greeting, name.upper())
"""


class TestPlugins(unittest.TestCase):
    def test_module_colon_class(self):
        directory = os.path.dirname(write_file(self, PLUGIN, name="shouting.py"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([directory, HERE]))
        server = ServerProcess(self, "--backend", "shouting:Shouting", "--finger", "127.0.0.1:0",
                               "--web", "off", "--setter", "off", env=env)
        self.assertEqual(ask(server.address(), b"moshez\r\n"), b"HELLO, MOSHEZ!\r\n")

    def test_a_plugin_gets_the_back_end_options_as_keyword_arguments(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        with open(os.path.join(directory, "keys.py"), "w") as f:
            f.write("class Keys:\n"
                    "    def __init__(self, **settings):\n"
                    "        self.settings = settings\n"
                    "    def get_user(self, name):\n"
                    "        return ' '.join(sorted(self.settings))\n"
                    "class Old:\n"
                    "    def __init__(self, options):\n"
                    "        pass\n")
        env = dict(os.environ, PYTHONPATH=directory)
        server = ServerProcess(self, "--backend", "keys:Keys", "--finger", "127.0.0.1:0",
                               "--web", "off", "--setter", "off", env=env)
        expected = " ".join(sorted(finger.plugin_arguments(finger.default_options())))
        self.assertEqual(ask(server.address(), b"x\r\n"), expected.encode() + b"\r\n")
        result = run_finger("--serve", "--backend", "keys:Old", env=env)
        self.assertEqual(result.returncode, 2)
        self.assertIn("TypeError", result.stderr)            # named, in one line

    def test_bad_specs_exit_2_with_the_error_in_one_line(self):
        directory = os.path.dirname(write_file(self, PLUGIN, name="shouting.py"))
        env = dict(os.environ, PYTHONPATH=directory)
        for spec, error in [("no_such_module:X", "ModuleNotFoundError"),
                            ("shouting:NoClass", "AttributeError"),
                            ("shouting:", "AttributeError")]:
            with self.subTest(spec=spec):
                result = run_finger("--serve", "--backend", spec, env=env)
                self.assertEqual(result.returncode, 2)
                self.assertEqual(result.stderr.splitlines()[1:],  # one line, and the hint
                                 ["try 'finger.py --serve --help'"], result.stderr)
                self.assertIn(error, result.stderr)

    def test_plugin_that_is_not_a_userdatabase(self):
        directory = os.path.dirname(write_file(self, BARE_PLUGIN, name="bareplugin.py"))
        env = dict(os.environ, PYTHONPATH=directory)
        server = ServerProcess(self, "--backend", "bareplugin:Bare", "--finger", "127.0.0.1:0",
                               "--web", "off", "--setter", "127.0.0.1:0", env=env)
        finger_address, setter_address = server.address("finger"), server.address("setter")
        self.assertEqual(ask(finger_address, b"x\r\n"), b"bare x\r\n")
        self.assertEqual(set_over(setter_address, b"x\ny\n"),
                         b"Could not save the status: this user database is read-only\r\n")

# == 4. the event loop, listeners and connections =============================================

def _cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _try_web(address):
    try:
        return http(address, "GET", "/moshez")[0]
    except OSError:
        return None


class EchoLines(finger.SessionProtocol):
    """A session protocol for tests: greets, echoes each line upper-cased, 'boom' raises."""
    name = "echo"

    def new_session(self, peer):
        return EchoSession()


class EchoSession(finger.Session):
    def __init__(self):
        self.buffer = b""

    @property
    def idle(self):
        return not self.buffer

    def greeting(self):
        return b"hello\n"

    def feed(self, data):
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if b"boom" in lines:
            raise ValueError("boom")
        return b"".join(line.upper() + b"\n" for line in lines if line != b"flood") + b"".join(
            b"x" * 65536 for line in lines if line == b"flood")


class TestSessionConnections(unittest.TestCase):
    def test_greeting_many_messages_and_errors_drop_only_that_connection(self):
        service = finger.TCPService(EchoLines(), (LOCALHOST, 0))
        start(self, service)
        sock = connect(self, service.address)
        reader = sock.makefile("rb")
        self.assertEqual(reader.readline(), b"hello\n")
        sock.sendall(b"one\ntw")
        self.assertEqual(reader.readline(), b"ONE\n")
        sock.sendall(b"o\n")
        self.assertEqual(reader.readline(), b"TWO\n")
        other = connect(self, service.address)
        with self.assertLogs("finger", "WARNING"):
            other.sendall(b"boom\n")
            self.assertEqual(other.recv(100), b"hello\n")
            self.assertEqual(other.recv(100), b"")
        sock.sendall(b"three\n")
        self.assertEqual(reader.readline(), b"THREE\n")

    def test_half_a_message_is_dropped_at_the_timeout_whole_ones_keep_it_open(self):
        clock = TestClock()
        service = finger.TCPService(EchoLines(), (LOCALHOST, 0), timeout=10, clock=clock)
        start(self, service)
        sock = connect(self, service.address)
        reader = sock.makefile("rb")
        reader.readline()
        for _ in range(3):                      # active for longer than the timeout
            clock.advance(service, 6)
            sock.sendall(b"ping\n")
            self.assertEqual(reader.readline(), b"PING\n")
        sock.sendall(b"half a mess")
        wait_until(lambda: not service.connections()[0].session.idle)
        clock.advance(service, 9)
        self.assertEqual(service.open_connections(), 1)            # not yet
        clock.advance(service, 1)
        self.assertEqual(reader.readline(), b"")

    def test_a_peer_that_never_reads_is_dropped(self):
        service = finger.TCPService(EchoLines(), (LOCALHOST, 0))
        start(self, service)
        hog = socket.socket()
        self.addCleanup(hog.close)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.connect(service.address)
        with self.assertLogs("finger", "WARNING") as logs:
            with contextlib.suppress(OSError):
                for _ in range(200):
                    hog.sendall(b"flood\n")
            wait_until(lambda: logs.output)
        self.assertIn("does not read", logs.output[-1])


class TestLoop(unittest.TestCase):
    def run_loop(self, loop, seconds=TIMEOUT):
        guard = loop.call_later(seconds, loop.stop)
        loop.run()
        guard.cancel()
        loop.close()

    def test_timers_run_in_order_and_move(self):
        loop = finger.Loop("test")
        ran = []
        later = loop.call_later(0.01, ran.append, "moved later")
        loop.call_later(0.02, ran.append, "second")
        earlier = loop.call_later(0.5, ran.append, "moved earlier")
        cancelled = loop.call_later(0.01, ran.append, "cancelled")
        loop.schedule(later, 0.03)
        loop.schedule(earlier, 0.0)
        cancelled.cancel()
        loop.call_later(0.04, loop.stop)
        self.run_loop(loop)
        self.assertEqual(ran, ["moved earlier", "second", "moved later"])

    def test_calls_from_other_threads_and_workers_come_back_to_the_loop(self):
        loop = finger.Loop("test")
        seen = []

        def done(future):
            seen.append((future.result().name, threading.current_thread().name))
            loop.stop()

        def from_another_thread():
            loop.call_soon(loop.run_in_worker, threading.current_thread, (), done)

        threading.Thread(target=from_another_thread, name="other").start()
        self.run_loop(loop)
        (worker, ran_in), = seen
        self.assertIn("worker", worker)                         # ran in the pool
        self.assertEqual(ran_in, threading.current_thread().name)   # answered on the loop


class TestPerClientLimits(unittest.TestCase):
    """--per-client-connections and --per-client-rate; the tests' clients are on loopback,
    so nothing is exempt here."""
    remote = ("192.0.2.1", 4000)

    def test_the_table(self):
        limits = finger.ClientLimits("t", connections=2, rate=1, exempt=())
        with self.assertLogs("finger", "WARNING") as logs:
            self.assertEqual([limits.admit(self.remote) for _ in range(3)],
                             [None, None, "per-client connections"])
            limits.release(self.remote)
            self.assertEqual(limits.admit(self.remote), "per-client rate")   # burst of 2
            self.assertEqual(limits.request(self.remote), "per-client rate")
        self.assertEqual(len(logs.output), 1)                   # once per episode
        self.assertIn("192.0.2.1", logs.output[0])
        same = [("2001:db8::1", 1, 0, 0), ("2001:db8::ffff:2", 2, 0, 0)]
        limits = finger.ClientLimits("t", connections=1, rate=0, exempt=())
        self.assertEqual([limits.admit(peer) for peer in same],
                         [None, "per-client connections"])      # one /64
        self.assertIsNone(limits.admit(("2001:db8:0:1::1", 3, 0, 0)))
        self.assertIsNone(limits.admit(("::ffff:192.0.2.1", 4, 0, 0)))
        self.assertEqual(limits.admit(self.remote), "per-client connections")   # the same v4
        local = finger.ClientLimits("t", connections=1, rate=1)   # loopback is exempt
        for peer in [("127.0.0.1", 1), ("::1", 2, 0, 0), ("::ffff:127.0.0.2", 3, 0, 0)] * 3:
            self.assertIsNone(local.admit(peer))
        self.assertIsNone(limits.admit("/run/finger/setter.sock"))  # unix peers: not limited

    def test_the_table_is_bounded(self):
        limits = finger.ClientLimits("t", connections=1, rate=1, exempt=())
        for number in range(finger.MAX_CLIENT_TABLE + 100):
            peer = ("10.%d.%d.%d" % (number >> 16, number >> 8 & 255, number & 255), 1)
            self.assertIsNone(limits.admit(peer))
            limits.release(peer)
        # private: no public way to see it
        self.assertLessEqual(len(limits._clients), finger.MAX_CLIENT_TABLE)
        # private: no public way to see it
        self.assertLessEqual(len(limits._keys), finger.MAX_CLIENT_TABLE)

    def test_finger_answers_with_a_refusal_line(self):
        limits = finger.ClientLimits("finger", connections=2, rate=0, exempt=())
        service = finger_service(self, limits=limits)
        idle = [connect(self, service.address) for _ in range(2)]
        wait_until(lambda: service.open_connections() == 2)
        self.assertEqual(ask(service.address, b"moshez\r\n"),
                         b"Too many connections from your address, try again later\r\n")
        idle[0].close()
        wait_until(lambda: _try_ask(service.address) == b"Happy and well\r\n")
        self.assertGreaterEqual(service.counts["per-client connections"], 1)
        limits.connections, limits.rate = 0, 1
        replies = [ask(service.address, b"moshez\r\n") for _ in range(3)]
        self.assertEqual(replies[-1],
                         b"Too many requests from your address, try again later\r\n")

    def test_web_answers_429_with_retry_after(self):
        import http.client
        limits = finger.ClientLimits("web", connections=1, rate=1, exempt=())
        service = web_service(self, limits=limits)
        connection = http.client.HTTPConnection(*service.address, timeout=TIMEOUT)
        self.addCleanup(connection.close)
        statuses = []
        for _ in range(3):                      # one token at the accept, one more, none
            connection.request("GET", "/moshez")
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        self.assertEqual(statuses, [200, 200, 429])
        self.assertEqual(response.getheader("Retry-After"), "1")
        refused = ask_or_reset(service.address, b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(refused.startswith(b"HTTP/1.1 429 "), refused[:30])   # one open
        self.assertIn(b"Retry-After: 1", refused)

    def test_pb_calls_over_the_rate_get_an_error(self):
        limits = finger.ClientLimits("pb", connections=0, rate=1, exempt=())
        service = finger.TCPService(finger.PBProtocol(finger.MemoryDatabase(PB_USERS), limits),
                                    (LOCALHOST, 0), limits=limits)
        start(self, service)
        client = PBTestClient(self, service.address)
        self.assertEqual(client.call("getUser", "moshez")[0], "answer")
        kind, failure = client.call("getUser", "moshez")
        self.assertEqual((kind, failure["value"]),
                         ("error", "Too many requests from your address, try again later"))

    def test_the_options(self):
        options = finger.build_parser().parse_args(
            ["--serve", "--per-client-connections", "0", "--per-client-rate", "5",
             "--per-client-exempt", "10.0.0.0/8, 2001:db8::/32"])
        self.assertEqual((options.per_client_connections, options.per_client_rate,
                          options.per_client_exempt), (0, 5, ("10.0.0.0/8", "2001:db8::/32")))
        self.assertEqual(finger.default_options().per_client_exempt,
                         ("127.0.0.0/8", "::1/128"))
        self.assertEqual(finger.build_parser().parse_args(
            ["--per-client-exempt", "none"]).per_client_exempt, ())
        result = run_finger("--serve", "--per-client-exempt", "10.0.0.300/8")
        self.assertEqual(result.returncode, 2)


def proxy_v2(client, port=4444, command=1):
    """A PROXY version 2 header naming `client` (IPv4 or IPv6), or LOCAL (command 0)."""
    import ipaddress
    address = ipaddress.ip_address(client)
    family = 0x11 if address.version == 4 else 0x21
    body = address.packed * 2 + struct.pack("!HH", port, 79)
    return finger.PROXY_V2_SIGNATURE + bytes([0x20 | command, family]) + \
        struct.pack("!H", len(body)) + body


class TestProxyProtocol(unittest.TestCase):
    """--proxy-protocol: a balancer's PROXY header names the client, on every listener;
    from an address not listed it is never taken."""
    balancer = finger.ProxyHeaders(["127.0.0.0/8"])

    def test_headers_of_both_versions(self):
        parse = finger.parse_proxy_header
        self.assertEqual(parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 79\r\nmoshez\r\n"),
                         (44, ("192.0.2.1", 56324)))
        self.assertEqual(parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 79\r\n"),
                         (41, ("2001:db8::1", 1)))
        self.assertEqual(parse(b"PROXY UNKNOWN\r\n"), (15, None))
        self.assertEqual(parse(proxy_v2("203.0.113.7") + b"rest"),
                         (28, ("203.0.113.7", 4444)))
        self.assertEqual(parse(proxy_v2("2001:db8::7"))[1], ("2001:db8::7", 4444))
        self.assertEqual(parse(proxy_v2("203.0.113.7", command=0)), (28, None))   # LOCAL
        for partial in (b"", b"PRO", b"PROXY TCP4 192.0.2.1", proxy_v2("192.0.2.1")[:20]):
            self.assertIsNone(parse(partial), partial)
        for bad in (b"moshez\r\n", b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 "
                    b"99999\r\n", b"PROXY TCP4 ::1 ::1 1 2\r\n", b"PROXY TCP4 x y 1 2\r\n",
                    b"PROXY " + b"9" * 200, finger.PROXY_V2_SIGNATURE + b"\x31\x11\x00\x00",
                    b"PROXY TCP6 fe80::1%x\nFAKE ::1 5 79\r\n",      # no forged log line
                    b"PROXY TCP6 fe80::1%eth0 ::1 5 79\r\n",
                    finger.PROXY_V2_SIGNATURE + b"\x21\x11\xff\xff"):
            with self.assertRaises(ValueError, msg=bad):
                parse(bad)

    def test_finger_takes_the_client_from_the_header(self):
        service = finger_service(self, proxy_headers=self.balancer,
                                 limits=finger.ClientLimits("finger", 1, 0, exempt=()))
        with query_log_on(self) as logs:
            self.assertEqual(ask(service.address, b"PROXY TCP4 192.0.2.9 127.0.0.1 5000 79"
                                 b"\r\nmoshez\r\n"), b"Happy and well\r\n")
            sock = connect(self, service.address)
            for byte in proxy_v2("192.0.2.10"):             # a header in many pieces
                sock.send(bytes([byte]))
            sock.sendall(b"shawn\r\n")
            self.assertEqual(read_to_end(sock), b"alive\r\n")
        shown = "\n".join(logs.output)
        self.assertIn('192.0.2.9:5000 "moshez" ok', shown)
        self.assertIn('192.0.2.10:4444 "shawn" ok', shown)
        held = connect(self, service.address)                 # the client's one connection
        held.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 5001 79\r\n")
        wait_until(lambda: service.open_connections() == 1 and not
                   service.connections()[0].awaiting_proxy)
        self.assertEqual(ask(service.address, b"PROXY TCP4 192.0.2.9 127.0.0.1 5002 79\r\n"
                             b"moshez\r\n"), finger.TOO_MANY_CONNECTIONS.encode() + b"\r\n")
        self.assertEqual(ask(service.address, b"PROXY TCP4 192.0.2.11 127.0.0.1 5003 79\r\n"
                             b"moshez\r\n"), b"Happy and well\r\n")   # another client
        self.assertEqual(ask(service.address, b"PROXY UNKNOWN\r\nmoshez\r\n"),
                         b"Happy and well\r\n")                      # the balancer's check
        flood = [connect(self, service.address) for _ in range(finger.BUSY_BACKLOG + 20)]
        for sock in flood:                              # one client, refused again and again
            sock.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 5004 79\r\n")
        wait_until(lambda: service.admission.busy <= finger.BUSY_BACKLOG and all(
            not conn.awaiting_proxy for conn in service.connections()))
        self.assertLessEqual(service.open_connections(), finger.BUSY_BACKLOG + 1)   # not one each

    def test_the_option_puts_it_on_every_listener(self):
        server = ServerProcess(self, "--users", readable_users(self), "--finger", "127.0.0.1:0",
                               "--web", "127.0.0.1:0", "--setter", "127.0.0.1:0",
                               "--proxy-protocol", "127.0.0.1/32", "--log-queries")
        finger_address, web, setter = (server.address(name)
                                       for name in ("finger", "web", "setter"))
        header = b"PROXY TCP4 192.0.2.20 127.0.0.1 7000 79\r\n"
        self.assertEqual(ask(finger_address, header + b"moshez\r\n"), b"Happy and well\r\n")
        self.assertEqual(set_over(setter, header + b"moshez\r\nBehind a balancer\r\n"),
                         b"OK\r\n")
        sock = connect(self, web)
        sock.sendall(header + b"GET /moshez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b"Behind a balancer", read_to_end(sock))
        self.assertEqual(ask(finger_address, b"moshez\r\n"), b"")       # no header: dropped
        server.expect(r"setter: 192\.0\.2\.20:7000 set the status of moshez")   # at once
        server.expect(r'finger 192\.0\.2\.20:7000 "moshez" ok')       # the query log's batch
        server.expect(r'web 192\.0\.2\.20:7000 "GET /moshez HTTP/1\.1" 200')

    def test_a_balancer_must_send_one_and_nobody_else_may(self):
        service = finger_service(self, proxy_headers=self.balancer)
        self.assertEqual(ask(service.address, b"moshez\r\n"), b"")   # no header: dropped
        self.assertEqual(service.counts.get("bad proxy header"), 1)
        elsewhere = finger_service(self, proxy_headers=finger.ProxyHeaders(["192.0.2.0/24"]))
        with query_log_on(self) as logs:
            reply = ask(elsewhere.address, b"PROXY TCP4 192.0.2.9 127.0.0.1 5000 79\r\n"
                        b"moshez\r\n")
        self.assertEqual(reply, b"")                  # refused: dropped, never taken
        self.assertEqual(elsewhere.counts.get("proxy header refused"), 1)
        self.assertIn(":finger 127.0.0.1:", logs.output[0])    # the peer, not the header's
        self.assertEqual(ask(elsewhere.address, b"moshez\r\n"), b"Happy and well\r\n")
        web = web_service(self, proxy_headers=finger.ProxyHeaders(["192.0.2.0/24"]))
        sock = connect(self, web.address)
        sock.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 5000 80\r\nGET / HTTP/1.1\r\n\r\n")
        self.assertTrue(read_to_end(sock).startswith(b"HTTP/1.1 400 "))   # not taken either

    def test_perspective_broker_greets_after_the_header(self):
        service = pb_service(self, proxy_headers=self.balancer)
        sock = connect(self, service.address)
        sock.settimeout(0.2)
        with self.assertRaises(socket.timeout):                 # nothing before the header
            sock.recv(100)
        sock.sendall(b"PROXY TCP6 2001:db8::5 ::1 6000 8889\r\n")
        sock.settimeout(TIMEOUT)
        self.assertIn(b"pb", sock.recv(100))                    # the dialect offer
        pb_conn = service.connections()[0]
        self.assertEqual(pb_conn.peer, ("2001:db8::5", 6000))

    def test_web_and_https_take_the_client_from_the_header(self):
        web = web_service(self, proxy_headers=self.balancer,
                          limits=finger.ClientLimits("web", 1, 0, exempt=()))
        with query_log_on(self) as logs:
            sock = connect(self, web.address)
            sock.sendall(proxy_v2("198.51.100.4") + b"GET /moshez HTTP/1.1\r\nHost: x\r\n"
                         b"Connection: close\r\n\r\n")
            self.assertIn(b"Happy and well", read_to_end(sock))
        self.assertIn("198.51.100.4:4444", "\n".join(logs.output))
        held = connect(self, web.address)
        held.sendall(b"PROXY TCP4 198.51.100.4 127.0.0.1 1 80\r\n")
        wait_until(lambda: web.open_connections() == 1)         # admitted, and held
        sock = connect(self, web.address)
        sock.sendall(b"PROXY TCP4 198.51.100.4 127.0.0.1 2 80\r\n")   # no request yet:
        self.assertTrue(read_to_end(sock).startswith(b"HTTP/1.1 429 "))  # turned away at once
        sock = connect(self, web.address)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")      # a balancer without header
        self.assertEqual(read_to_end(sock), b"")
        if shutil.which("openssl"):
            directory = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, directory)
            pem = make_certificate(directory)
            import ssl
            https = web_service(self, cert=pem, name="https", proxy_headers=self.balancer)
            raw = socket.create_connection(https.address, timeout=TIMEOUT)
            raw.sendall(b"PROXY TCP4 198.51.100.5 127.0.0.1 1 443\r\n")
            with ssl.create_default_context(cafile=pem + ".crt").wrap_socket(
                    raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /shawn HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                self.assertIn(b"alive", read_to_end(tls))

# == 5. finger and the setter =================================================================

class TestFingerServer(unittest.TestCase):
    def test_what_is_answered_off_the_loop(self):
        protocol = finger.FingerProtocol(finger.MemoryDatabase({"a": "b"}))
        self.assertEqual([protocol.needs_worker(line) for line in (
            b"a", b"/W a", b"a b", b"/W a b", b"", b"/W")],
            [False, False, True, True, True, True])    # several names, and the list

    def test_known_and_unknown_user_then_server_closes(self):
        service = finger_service(self)
        self.assertEqual(ask(service.address, b"moshez\r\n"), b"Happy and well\r\n")
        self.assertEqual(ask(service.address, b"nobody\r\n"), b"No such user\r\n")

    def test_bare_lf_and_verbose(self):
        address = finger_service(self).address
        self.assertEqual(ask(address, b"moshez\n"), b"Happy and well\r\n")
        self.assertEqual(ask(address, b"/W moshez\r\n"), b"Happy and well\r\n")
        self.assertEqual(ask(address, b"/w shawn\r\n"), b"alive\r\n")

    def test_remembered_answers_follow_every_change(self):
        path = write_file(self, USERS)
        db = finger.FileDatabase(path, 0)
        address = finger_service(self, db).address
        self.assertEqual(ask(address, b"moshez\r\n"), b"Happy and well\r\n")
        self.assertEqual(ask(address, b"moshez\r\n"), b"Happy and well\r\n")   # remembered
        db.set_user("moshez", "Changed")
        self.assertEqual(ask(address, b"moshez\r\n"), b"Changed\r\n")
        replace_file(path, "moshez: Reloaded\n")
        db.reload()
        self.assertEqual(ask(address, b"moshez\r\n"), b"Reloaded\r\n")
        self.assertEqual(ask(address, b"shawn\r\n"), b"No such user\r\n")

    def test_remembered_answers_are_bounded_in_bytes(self):
        big = "\U0001f600" * finger.DEFAULT_MAX_STATUS                  # 4 KiB in UTF-8
        db = finger.MemoryDatabase({"x": big, "moshez": "Happy and well"})
        protocol = finger.FingerProtocol(db)
        names = b" ".join([b"x"] * finger.MAX_QUERY_NAMES)
        reply, outcome = protocol.respond(names)
        self.assertEqual((len(reply), outcome), (finger.MAX_QUERY_NAMES * (len(big.encode())
                                                                          + 5), "ok"))
        cache = protocol._replies        # a VersionedCache: no public way to what it holds
        self.assertEqual(cache.entries, {})                     # several names: not kept
        self.assertEqual(protocol.respond(names + b" x"),
                         (b"Too many names: at most 64 in one query\r\n", "too many"))
        for number in range(3000):                              # distinct lines, 4 KiB each
            protocol.respond(b"x" + b" " * (number % 100) + b"\t" * (number // 100))
        self.assertLessEqual(cache.used, finger.MAX_REPLY_CACHE_BYTES)
        self.assertEqual(cache.used, sum(
            len(line) + len(answer[0]) for line, answer in cache.entries.items()))
        self.assertEqual(protocol.respond(b"moshez"), (b"Happy and well\r\n", "ok"))
        db.set_user("moshez", "changed")                        # a new version: all forgotten
        self.assertEqual(protocol.respond(b"moshez"), (b"changed\r\n", "ok"))
        # private: no public way to see it
        self.assertEqual(protocol._replies.used, len(b"moshez") + len(b"changed\r\n"))

    def test_the_list_is_made_off_the_loop_once_per_version(self):
        users = {"u%05d" % number: "status \x1b %d" % number for number in range(2500)}
        db = finger.MemoryDatabase(users)
        protocol = finger.FingerProtocol(db)
        self.assertTrue(protocol.needs_worker(b""))
        self.assertTrue(protocol.needs_worker(b" /w "))
        self.assertFalse(protocol.needs_worker(b"u00001"))
        # private: no public way to see it
        self.assertEqual(db._users.sorted_names(), sorted(users))
        reply, outcome = protocol.respond(b"")
        self.assertEqual(outcome, "list")
        self.assertEqual(reply, "".join("%s  status ^[ %d\r\n" % (name, number) for number, name
                                        in enumerate(sorted(users))).encode())
        self.assertIs(protocol.respond(b"  ")[0], reply)           # any spelling of the list
        self.assertIsNot(protocol.respond(b"/W")[0], reply)
        db.set_user("u00000", "new")
        self.assertTrue(protocol.respond(b"")[0].startswith(b"u00000  new\r\nu00001  "))
        address = finger_service(self, db).address
        self.assertEqual(ask(address, b"\r\n"), protocol.respond(b"")[0])
        db.listable = False
        self.assertFalse(finger.FingerProtocol(db).needs_worker(b""))

    def test_several_names_and_the_user_list(self):
        address = finger_service(self).address
        self.assertEqual(ask(address, b"shawn nobody moshez\r\n"),
                         b"shawn  alive\r\nnobody  No such user\r\nmoshez  Happy and well\r\n")
        self.assertEqual(ask(address, b"\r\n"), b"moshez  Happy and well\r\nshawn  alive\r\n")
        self.assertEqual(ask(address, b"/W\r\n"), b"moshez  Happy and well\r\nshawn  alive\r\n")

    def test_list_refused_with_rfc_wording(self):
        address = finger_service(self, listable=False).address
        self.assertEqual(ask(address, b"\r\n"), b"Finger online user list denied\r\n")
        self.assertEqual(ask(address, b"moshez\r\n"), b"Happy and well\r\n")

    def test_forwarding_refused_with_rfc_wording(self):
        address = finger_service(self).address
        for query in [b"moshez@example.org\r\n", b"@example.org\r\n", b"/W a@b@c\r\n"]:
            self.assertEqual(ask(address, query), b"Finger forwarding service denied\r\n")

    def test_query_sent_without_newline_then_half_close(self):
        address = finger_service(self).address
        with socket.create_connection(address, timeout=TIMEOUT) as sock:
            sock.sendall(b"moshez")
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(sock.recv(100), b"Happy and well\r\n")

    def test_control_characters_and_utf8_in_statuses(self):
        db = finger.MemoryDatabase({"evil": "\x1b]0;owned\x07\x1b[2J", "cafe": "caf\u00e9"})
        address = finger_service(self, db).address
        self.assertEqual(ask(address, b"evil\r\n"), b"^[]0;owned^G^[[2J\r\n")
        self.assertEqual(ask(address, "cafe\r\n".encode()), "caf\u00e9\r\n".encode())

    def test_backend_exception_answers_internal_error_and_logs_traceback_once(self):
        address = finger_service(self, BrokenDatabase()).address
        with self.assertLogs("finger", "ERROR") as logs:
            self.assertEqual(ask(address, b"moshez\r\n"), b"Internal error in server\r\n")
        self.assertEqual(len(logs.records), 1)
        self.assertIn("the database is on fire", logs.output[0])
        self.assertIn("Traceback", logs.output[0])

    def test_one_log_line_per_query(self):
        address = finger_service(self).address
        with query_log_on(self) as logs:
            ask(address, b"moshez\r\n")
            ask(address, b"nobody\r\n")
            ask(address, b'/W "x\\\x1b[2J\r\n')
        self.assertEqual(len(logs.output), 3)
        self.assertRegex(logs.output[0], r'finger 127\.0\.0\.1:\d+ "moshez" ok \d+\.\dms$')
        self.assertRegex(logs.output[1], r'"nobody" unknown')
        self.assertIn(r'"/W \"x\\^[[2J" unknown', logs.output[2])

    def test_query_log_is_off_unless_asked_for(self):
        address = finger_service(self).address
        with self.assertLogs("finger", "DEBUG") as logs:
            ask(address, b"moshez\r\n")
            finger.query_log.flush()
            finger.log.debug("a line, so that assertLogs has one")
        self.assertEqual(len(logs.output), 1)

    def test_line_length_limit(self):
        address = finger_service(self).address
        limit = finger.MAX_QUERY_BYTES
        self.assertEqual(ask(address, b"x" * limit + b"\r\n"), b"No such user\r\n")
        self.assertEqual(ask(address, b"x" * (limit + 1) + b"\r\n"), b"Query too long\r\n")
        with socket.create_connection(address, timeout=TIMEOUT) as sock:  # never a newline
            sock.sendall(b"y" * (limit * 4))
            self.assertEqual(sock.recv(100), b"Query too long\r\n")

    def test_no_complete_line_within_timeout_closes(self):
        service = finger_service(self, timeout=0.2)
        sock = connect(self, service.address)
        with query_log_on(self) as logs:
            sock.sendall(b"mosh")                      # a slowloris: never finishes the line
            started = time.monotonic()
            self.assertEqual(sock.recv(100), b"")
            self.assertLess(time.monotonic() - started, TIMEOUT)
        self.assertIn('"mosh" timeout', "\n".join(logs.output))   # logged with what arrived
        self.assertEqual(service.counts.get("timeout"), 1)
        self.assertEqual(ask(service.address, b"moshez\r\n"), b"Happy and well\r\n")

    def test_connection_cap_answers_busy(self):
        service = finger_service(self, max_connections=2)
        idle = [connect(self, service.address) for _ in range(2)]
        wait_until(lambda: service.open_connections() == 2)
        self.assertEqual(ask(service.address, b"moshez\r\n"), b"Server busy, try again later\r\n")
        idle[0].close()
        wait_until(lambda: service.open_connections() < 2)
        self.assertEqual(ask(service.address, b"moshez\r\n"), b"Happy and well\r\n")

    def test_client_that_never_reads_does_not_block_others(self):
        db = finger.MemoryDatabase({"user%d" % i: "x" * 200 for i in range(50000)})
        service = finger_service(self, db, timeout=0.5)
        hog = socket.socket()
        self.addCleanup(hog.close)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.connect(service.address)
        hog.sendall(b"\r\n")                       # 10 MB of list, never read
        wait_until(lambda: any(c.outbuf for c in service.connections()))  # its answer waits
        self.assertEqual(ask(service.address, b"user1\r\n"), b"x" * 200 + b"\r\n")
        wait_until(lambda: not service.connections())      # the hog is dropped at its deadline

    def test_slow_backend_does_not_stall_the_loop(self):
        db = SlowDatabase()
        address = finger_service(self, db, workers=2).address
        slow = connect(self, address)
        slow.sendall(b"slow\r\n")
        self.assertTrue(db.waiting.acquire(timeout=TIMEOUT))
        self.assertEqual(ask(address, b"moshez\r\n"), b"Happy and well\r\n")  # answered meanwhile
        db.release.set()
        self.assertEqual(slow.recv(100), b"finally\r\n")

    def test_full_worker_pool_answers_busy(self):
        db = SlowDatabase()
        address = finger_service(self, db, workers=1).address
        waiting = []
        for _ in range(2):                       # one running, one queued: 2 x workers
            waiting.append(connect(self, address))
            waiting[-1].sendall(b"slow\r\n")
        self.assertTrue(db.waiting.acquire(timeout=TIMEOUT))
        self.assertEqual(ask(address, b"slow\r\n"), b"Server busy, try again later\r\n")
        db.release.set()
        for sock in waiting:
            self.assertEqual(sock.recv(100), b"finally\r\n")

    def test_stop_lets_answers_in_flight_finish(self):
        db = SlowDatabase()
        service = finger_service(self, db)
        slow = connect(self, service.address)
        slow.sendall(b"slow\r\n")
        self.assertTrue(db.waiting.acquire(timeout=TIMEOUT))
        stopper = threading.Thread(target=service.stop)
        stopper.start()
        wait_until(lambda: service._listener.fileno() == -1)     # no longer accepting
        db.release.set()
        self.assertEqual(slow.recv(100), b"finally\r\n")       # but the answer arrives
        stopper.join(TIMEOUT)
        self.assertFalse(stopper.is_alive())

    @unittest.skipUnless(socket.has_ipv6, "no IPv6")
    def test_ipv6_listener(self):
        service = finger.TCPService(finger.FingerProtocol(finger.MemoryDatabase({"a": "b"})),
                                    ("::1", 0))
        try:
            start(self, service)
        except finger.FingerError as error:
            self.skipTest("cannot bind ::1: %s" % error)
        self.assertEqual(ask(("::1", service.address[1]), b"a\r\n"), b"b\r\n")

    def test_stop_closes_sockets_and_threads(self):
        service = finger.TCPService(finger.FingerProtocol(finger.MemoryDatabase()),
                                    (LOCALHOST, 0))
        service.start()
        idle = connect(self, service.address)
        wait_until(lambda: service.open_connections() == 1)
        # private: no public way to see it
        listener, thread = service._listener, service._thread
        started = time.monotonic()
        service.stop()
        service.stop()                             # idempotent
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(listener.fileno(), -1)
        self.assertEqual(idle.recv(10), b"")       # open connections are closed too
        self.assertFalse(thread.is_alive())

    @unittest.skipUnless(hasattr(os, "fork"), "POSIX only")
    def test_running_out_of_file_descriptors_on_every_listener(self):
        users = write_file(self, USERS)
        server = ServerProcess(self, "--users", users, "--finger", "127.0.0.1:0", "--web",
                               "127.0.0.1:0", "--setter", "off", preexec_fn=_limit_files(48))
        finger_address, web_address = server.address(), server.address("web")
        flood = []
        for address in (finger_address, web_address) * 40:   # more than it may open
            with contextlib.suppress(OSError):
                flood.append(socket.create_connection(address, timeout=TIMEOUT))
        self.addCleanup(lambda: [sock.close() for sock in flood])
        for name in ("finger", "web"):             # in either order: one line each
            server.expect(r"(finger|web): out of file descriptors")
        busy = _cpu_seconds(server.process.pid)
        time.sleep(0.5)                            # a window to see it does not spin
        self.assertLess(_cpu_seconds(server.process.pid) - busy, 0.2)
        for sock in flood:
            sock.close()
        wait_until(lambda: _try_ask(finger_address) == b"Happy and well\r\n")
        wait_until(lambda: _try_web(web_address) == 200)
        self.assertIsNone(server.process.poll())
        self.assertEqual(sum("out of file descriptors" in line for line in server.log), 2)

    @unittest.skipUnless(hasattr(os, "fork"), "POSIX only")
    def test_the_soft_limit_on_open_files_is_raised_to_the_hard_one(self):
        def limits():
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 2048))
        server = self.server_process(preexec_fn=limits)
        server.address()
        with open("/proc/%d/limits" % server.process.pid) as f:
            line = [line for line in f if line.startswith("Max open files")][0]
        self.assertEqual(line.split()[3:5], ["2048", "2048"])

    def server_process(self, **popen):
        return ServerProcess(self, "--users", write_file(self, USERS), "--finger",
                             "127.0.0.1:0", "--web", "off", "--setter", "off", **popen)


def _limit_files(limit):
    def apply():
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


def _try_ask(address):
    try:
        return ask(address, b"moshez\r\n", timeout=1)
    except OSError:
        return None


def set_over(address, data, half_close=True, family=socket.AF_INET):
    """Send a setter request; with half_close, read the one-line answer."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(address)
        sock.sendall(data)
        if not half_close:
            return None
        sock.shutdown(socket.SHUT_WR)
        return read_to_end(sock)


def setter_service(test, db, **options):
    protocol = finger.SetterProtocol(db, options.pop("max_status", finger.DEFAULT_MAX_STATUS),
                                     check_identity=options.pop("check_identity", False),
                                     max_users=options.pop("max_users",
                                                           finger.DEFAULT_MAX_USERS),
                                     max_bytes=options.pop("max_bytes",
                                                           finger.DEFAULT_MAX_USERS_BYTES))
    address = options.pop("address", (LOCALHOST, 0))
    service = finger.TCPService(protocol, address, **options)
    start(test, service)
    return service

USERS_WITH_COMMENTS = ("# the users of this box\r\n"
                       "moshez: Happy and well\r\n"
                       "\n"
                       "  # shawn is next\n"
                       "shawn:alive\n"
                       "glyph: Writing Twisted")          # no newline at the end


def rewrite_users(data, name, status):
    """finger.rewrite_users, its pieces joined."""
    return b"".join(finger.rewrite_users(data, name, status))


class TestSetterRules(unittest.TestCase):
    def test_rewrite_keeps_every_other_byte(self):
        data = USERS_WITH_COMMENTS.encode()
        new = rewrite_users(data, "shawn", "Sleeping")
        self.assertEqual(new, data.replace(b"shawn:alive", b"shawn: Sleeping"))
        new = rewrite_users(data, "moshez", "caf\u00e9")
        self.assertEqual(new, data.replace(b"Happy and well", "caf\u00e9".encode()))
        new = rewrite_users(data, "radix", "new")
        self.assertEqual(new, data + b"\nradix: new\n")
        self.assertEqual(rewrite_users(b"", "a", "b"), b"a: b\n")

    def test_rewrite_finds_a_name_that_is_in_many_statuses(self):
        data = b"a: first\n" + b"b: a a a\n" * (finger.REWRITE_MAX_MISSES + 10) + b"c: x\n"
        self.assertEqual(rewrite_users(data, "a", "new"), data.replace(b"a: first", b"a: new"))
        self.assertTrue(rewrite_users(data, "b", "z").endswith(b"b: a a a\nb: z\nc: x\n"))

    def test_rewrite_replaces_the_line_that_wins(self):
        new = rewrite_users(b"a: 1\na: 2\n", "a", "3")
        self.assertEqual(new, b"a: 1\na: 3\n")

    def test_names_and_statuses(self):
        for name in ["moshez", "a.b_c-d", "x" * 32]:
            self.assertTrue(finger.valid_user_name(name), name)
        for name in ["", "x" * 33, "../etc", "a b", "a:b", "caf\u00e9", "a\n"]:
            self.assertFalse(finger.valid_user_name(name), name)
        self.assertEqual(finger.clean_status(" a\tb\x1b[2J\x00c\x9b\u202e "), "a b[2Jc")


class TestSetter(unittest.TestCase):
    def file_db(self, text=USERS_WITH_COMMENTS):
        path = write_file(self, text, mode="w")
        db = finger.FileDatabase(path, 0)
        self.addCleanup(db.stop)
        return path, db

    def test_two_lines_set_the_status_and_the_answer_is_ok(self):
        path, db = self.file_db()
        address = setter_service(self, db).address
        self.assertEqual(set_over(address, b"shawn\r\nSleeping\r\n"), b"OK\r\n")
        self.assertEqual(db.get_user("shawn"), "Sleeping")
        with open(path, "rb") as f:        # written through, all else preserved byte for byte
            self.assertEqual(f.read(), USERS_WITH_COMMENTS.replace(
                "shawn:alive", "shawn: Sleeping").encode())
        self.assertEqual(finger.FileDatabase(path, 0).get_user("shawn"), "Sleeping")  # restart

    def test_a_set_status_survives_the_periodic_reload(self):
        path, db = self.file_db()
        address = setter_service(self, db).address
        set_over(address, b"moshez\nAway\n")
        self.assertFalse(db.reload())
        self.assertTrue(db.reload(force=True))
        self.assertEqual(db.get_user("moshez"), "Away")

    def test_edits_not_yet_loaded_are_kept_and_loaded(self):
        path, db = self.file_db("a: 1\n")
        replace_file(path, "a: 1\nb: edited by hand\n")
        db.set_user("a", "2")
        self.assertTrue(db.reload())
        self.assertEqual((db.get_user("a"), db.get_user("b")), ("2", "edited by hand"))

    def test_nc_style_full_close_loses_nothing(self):
        _, db = self.file_db()
        address = setter_service(self, db).address
        set_over(address, b"glyph\nGone fishing\n", half_close=False)
        wait_until(lambda: db.get_user("glyph") == "Gone fishing")

    def test_anything_but_two_lines_changes_nothing(self):
        path, db = self.file_db()
        address = setter_service(self, db).address
        for data in [b"", b"shawn\n", b"shawn\nA\nB\n", b"shawn\nA\n\n"]:
            with self.subTest(data=data):
                self.assertEqual(set_over(address, data),
                                 b"Expected two lines: a user, then a status\r\n")
        self.assertEqual(db.get_user("shawn"), "alive")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), USERS_WITH_COMMENTS.encode())

    def test_bad_names_and_long_statuses_are_refused(self):
        _, db = self.file_db()
        address = setter_service(self, db, max_status=10).address
        for name in [b"../../etc/passwd", b"x" * 33, b"a b", b"#comment"]:
            with self.subTest(name=name):
                self.assertTrue(set_over(address, name + b"\nx\n").startswith(b"Bad user name"))
        self.assertEqual(set_over(address, b"shawn\n" + b"y" * 11 + b"\n"),
                         b"Status too long: at most 10 characters\r\n")
        self.assertEqual(set_over(address, b"shawn\n" + b"y" * 10 + b"\n"), b"OK\r\n")
        self.assertEqual(set_over(address, b"shawn\n" + b"x" * 9000),
                         b"Too much: send a user line and a status line\r\n")
        self.assertEqual(db.get_user("shawn"), "y" * 10)

    def test_control_characters_are_removed(self):
        _, db = self.file_db()
        address = setter_service(self, db).address
        set_over(address, b"shawn\n\x1b[2Jwiped\x07\r\n")
        self.assertEqual(db.get_user("shawn"), "[2Jwiped")

    def test_no_eof_within_timeout_sets_nothing(self):
        _, db = self.file_db()
        service = setter_service(self, db, timeout=0.2)
        sock = connect(self, service.address)
        sock.sendall(b"shawn\nNever\n")
        self.assertEqual(sock.recv(100), b"")
        self.assertEqual(db.get_user("shawn"), "alive")

    def test_write_failure_changes_nothing_and_is_answered(self):
        path, _ = self.file_db()
        directory = os.path.dirname(path)
        os.chmod(directory, 0o555)                    # read-only: no temp file can be made
        self.addCleanup(os.chmod, directory, 0o755)
        wrapper = ()
        if os.geteuid() == 0:          # root writes anywhere, unless it lacks the capability
            if not shutil.which("setpriv"):
                self.skipTest("running as root and setpriv (util-linux) is missing")
            wrapper = ("setpriv", "--bounding-set", "-dac_override", "--inh-caps",
                       "-dac_override")
        server = ServerProcess(self, "--users", path, "--finger", "127.0.0.1:0", "--web", "off",
                               "--setter", "127.0.0.1:0", wrapper=wrapper)
        finger_address, setter_address = server.address("finger"), server.address("setter")
        self.assertEqual(set_over(setter_address, b"shawn\nLost\n"),
                         b"Could not save the status: Permission denied\r\n")
        server.expect(r"ERROR setting the status of 'shawn' failed")
        self.assertEqual(ask(finger_address, b"shawn\r\n"), b"alive\r\n")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), USERS_WITH_COMMENTS.encode())

    @unittest.skipUnless(hasattr(os, "fork"), "POSIX only")
    def test_full_disk_changes_nothing_and_is_answered(self):
        path, db = self.file_db()
        # RLIMIT_FSIZE makes writing the new users file fail like a full disk, even for root.
        server = ServerProcess(self, "--users", path, "--finger", "127.0.0.1:0", "--web", "off",
                               "--setter", "127.0.0.1:0", preexec_fn=_limit_file_size(100))
        finger_address = server.address("finger")
        setter_address = server.address("setter")
        self.assertEqual(set_over(setter_address, b"shawn\nLost\n"),
                         b"Could not save the status: File too large\r\n")
        self.assertEqual(ask(finger_address, b"shawn\r\n"), b"alive\r\n")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), USERS_WITH_COMMENTS.encode())
        self.assertEqual([n for n in os.listdir(os.path.dirname(path)) if n != "users"], [])

    def test_concurrent_setters_racing_reloads_lose_nothing(self):
        path, db = self.file_db()
        address = setter_service(self, db, max_pending=200, workers=4).address
        stop = threading.Event()

        def reload_forever():
            while not stop.is_set():
                db.reload(force=True)

        reloader = threading.Thread(target=reload_forever)
        reloader.start()
        self.addCleanup(reloader.join)
        self.addCleanup(stop.set)
        answers = {}

        def setter(number):
            answers[number] = set_over(address, b"user%d\nstatus %d\n" % (number, number))

        threads = [threading.Thread(target=setter, args=(n,)) for n in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        self.assertEqual(set(answers.values()), {b"OK\r\n"})
        with open(path, encoding="utf-8") as f:
            on_disk, problems = finger.parse_users(f)
        self.assertEqual(problems, [])
        for number in range(100):
            self.assertEqual(on_disk["user%d" % number], "status %d" % number)
            self.assertEqual(db.get_user("user%d" % number), "status %d" % number)
        self.assertEqual(on_disk["moshez"], "Happy and well")

    def test_memory_backend_and_seed_statuses(self):
        users = write_file(self, "")
        server = ServerProcess(self, "--backend", "memory", "--status", "moshez=Happy and well",
                               "--finger", "127.0.0.1:0", "--web", "off", "--setter",
                               "127.0.0.1:0", "--users", users + ".not-read")
        finger_address = server.address("finger")
        setter_address = server.address("setter")
        self.assertEqual(ask(finger_address, b"moshez\r\n"), b"Happy and well\r\n")
        self.assertEqual(set_over(setter_address, b"shawn\nalive\n"), b"OK\r\n")
        self.assertEqual(ask(finger_address, b"shawn\r\n"), b"alive\r\n")

    def test_setter_listens_on_loopback_by_default(self):
        self.assertEqual(finger.default_options().setter, ("127.0.0.1", 1079))

    def test_setter_status_with_other_line_breaks_is_cleaned(self):
        db = finger.MemoryDatabase()
        address = setter_service(self, db).address
        status = "page\x0cbreak \x85next \u2028line".encode()
        self.assertEqual(set_over(address, b"moshez\n" + status + b"\n"), b"OK\r\n")
        self.assertEqual(db.get_user("moshez"), "pagebreak next line")


def _limit_file_size(limit):
    def apply():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply

SYSTEM_PYTHON = "/usr/bin/python3"

RAW_UNIX_SETTER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(sys.argv[2].encode() + b"\\n" + sys.argv[3].encode() + b"\\n")
sock.shutdown(socket.SHUT_WR)
print(sock.recv(1000).decode().strip())
"""


@unittest.skipUnless(hasattr(socket, "AF_UNIX") and hasattr(socket, "SO_PEERCRED"),
                     "needs unix sockets with SO_PEERCRED (Linux)")
class TestSetterUserCap(unittest.TestCase):
    def test_no_user_is_added_past_max_users(self):
        path = write_file(self, "moshez: hi\nshawn: there\n")
        db = finger.FileDatabase(path)
        address = setter_service(self, db, max_users=3).address
        self.assertEqual(set_over(address, b"alice\r\none\r\n"), b"OK\r\n")
        self.assertTrue(set_over(address, b"bob\r\ntwo\r\n").startswith(
            b"Too many users: at most 3;"))
        self.assertEqual(set_over(address, b"shawn\r\nstill works\r\n"), b"OK\r\n")
        self.assertEqual(db.count(), 3)
        self.assertNotIn("bob", _read(path))
        unlimited = setter_service(self, db, max_users=0).address
        self.assertEqual(set_over(unlimited, b"bob\r\ntwo\r\n"), b"OK\r\n")
        self.assertEqual(finger.DEFAULT_MAX_USERS, 100_000)


    def test_no_set_grows_the_users_file_past_max_users_bytes(self):
        path = write_file(self, "moshez: hi\nshawn: there\n")         # 24 bytes
        db = finger.FileDatabase(path)
        address = setter_service(self, db, max_bytes=40).address
        self.assertEqual(set_over(address, b"alice\r\nshort\r\n"), b"OK\r\n")     # 37 bytes
        self.assertEqual(set_over(address, b"bob\r\ntoo long to fit\r\n"),
                         b"Users file full: at most 40 bytes; a shorter status, or one for a "
                         b"user there is, may still fit\r\n")
        self.assertEqual(set_over(address, b"alice\r\nlonger\r\n"), b"OK\r\n")    # 38 bytes
        self.assertEqual(set_over(address, b"shawn\r\nx\r\n"), b"OK\r\n")         # shorter
        self.assertEqual(_read(path), "moshez: hi\nshawn: x\nalice: longer\n")
        with open(path, "a") as f:
            f.write("# an admin's note that passes the cap\n")
        db.reload()
        self.assertEqual(set_over(address, b"shawn\r\ny\r\n"), b"OK\r\n")   # grows nothing
        self.assertEqual(finger.DEFAULT_MAX_USERS_BYTES, 32 << 20)
        self.assertEqual(finger.default_options().max_users_bytes, 32 << 20)


class TestUnixSetter(unittest.TestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="finger-test-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        os.chmod(self.directory, 0o755)
        self.path = os.path.join(self.directory, "setter.sock")
        self.db = finger.MemoryDatabase({"moshez": "Happy and well"})
        self.service = setter_service(self, self.db, address=self.path, check_identity=True,
                                      name="setter-socket")

    def test_socket_file_mode_and_owner_and_removal(self):
        info = os.stat(self.path)
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o666)
        self.assertEqual(info.st_uid, os.geteuid())
        self.service.stop()
        self.assertFalse(os.path.exists(self.path))

    def test_the_mode_is_never_set_through_a_path_and_open_directories_are_refused(self):
        target = os.path.join(self.directory, "target")
        with open(target, "w"):
            pass
        os.chmod(target, 0o600)
        link = os.path.join(self.directory, "link.sock")
        os.symlink(target, link)
        with self.assertRaisesRegex(finger.UsageError, "exists and is not a socket"):
            finger.bind_unix(link)
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o600)   # not followed
        open_directory = os.path.join(self.directory, "open")
        os.mkdir(open_directory)
        os.chmod(open_directory, 0o777)
        with self.assertRaisesRegex(finger.UsageError, "no sticky bit"):
            finger.bind_unix(os.path.join(open_directory, "setter.sock"))
        os.chmod(open_directory, 0o1777)
        sock = finger.bind_unix(os.path.join(open_directory, "setter.sock"))
        sock.close()
        self.assertEqual(stat.S_IMODE(os.stat(open_directory + "/setter.sock").st_mode),
                         0o666)

    def test_set_command_sets_the_callers_own_status(self):
        me = pwd.getpwuid(os.getuid()).pw_name
        result = run_finger("--set", "Hacking \x1b[5m", "--setter-socket", self.path)
        self.assertEqual((result.returncode, result.stdout), (0, "OK\n"), result.stderr)
        self.assertEqual(self.db.get_user(me), "Hacking [5m")

    def test_root_may_set_anybody(self):
        if os.geteuid() != 0:
            self.skipTest("not root")
        reply = set_over(self.path, b"moshez\nSet by root\n", family=socket.AF_UNIX)
        self.assertEqual(reply, b"OK\r\n")
        self.assertEqual(self.db.get_user("moshez"), "Set by root")

    def test_a_user_may_set_only_their_own_status(self):
        if os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK):
            self.skipTest("needs root (to run a client as nobody) and %s" % SYSTEM_PYTHON)
        def as_nobody(name, status):
            return subprocess.run([SYSTEM_PYTHON, "-c", RAW_UNIX_SETTER, self.path, name,
                                   status], user="nobody", capture_output=True, text=True,
                                  timeout=15).stdout.strip()
        self.assertEqual(as_nobody("moshez", "hijacked"),
                         "Permission denied: you may set only your own status")
        self.assertEqual(self.db.get_user("moshez"), "Happy and well")
        self.assertEqual(as_nobody("nobody", "Just me"), "OK")
        self.assertEqual(self.db.get_user("nobody"), "Just me")

    def test_set_with_no_server_running_exits_1(self):
        self.service.stop()
        result = run_finger("--set", "x", "--setter-socket", self.path)
        self.assertEqual(result.returncode, 1)
        self.assertIn("cannot reach the setter at %s" % self.path, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1)

    def test_stale_socket_file_is_replaced_but_other_files_are_not(self):
        self.service.stop()
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()                                     # a dead server's leftover
        setter_service(self, self.db, address=self.path, check_identity=True)
        other = os.path.join(self.directory, "not-a-socket")
        open(other, "w").close()
        with self.assertRaises(finger.UsageError):
            finger.bind_unix(other)
        with self.assertRaises(finger.FingerError):     # a live server is not displaced
            finger.bind_unix(self.path)


class TestInetd(unittest.TestCase):
    def test_one_query_on_stdin_and_stdout(self):
        users = write_file(self, USERS)
        result = subprocess.run([sys.executable, FINGER_PY, "--inetd", "--users", users],
                                input=b"moshez\r\n", capture_output=True, timeout=15)
        self.assertEqual(result.stdout, b"Happy and well\r\n")
        self.assertEqual(result.returncode, 0)

    def test_socket_as_stdin_stdout_and_stderr_keeps_logs_off_the_wire(self):
        users = write_file(self, USERS)
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.sendall(b"/W moshez\r\n")
            process = subprocess.Popen([sys.executable, FINGER_PY, "--inetd", "--users", users],
                                       stdin=theirs, stdout=theirs, stderr=theirs)
            self.assertEqual(process.wait(TIMEOUT * 2), 0)
            theirs.close()
            ours.settimeout(TIMEOUT)
            self.assertEqual(ours.recv(1000), b"Happy and well\r\n")

    def test_a_query_from_a_regular_file(self):
        with open(write_file(self, "moshez\r\n", "query")) as query:  # epoll refuses files
            result = run_finger("--inetd", "--users", write_file(self, USERS), stdin=query)
        self.assertEqual((result.returncode, result.stdout), (0, "Happy and well\n"))

    def test_timeout_with_no_query(self):
        users = write_file(self, USERS)
        reader, writer = os.pipe()
        try:
            os.write(writer, b"mosh")                  # never a whole line
            result = run_finger("--inetd", "--users", users, "--request-timeout", "0.3",
                                "--log-queries", stdin=reader)
        finally:
            os.close(reader)
            os.close(writer)
        self.assertEqual((result.returncode, result.stdout), (0, ""))
        self.assertIn('finger inetd stdin "mosh" timeout', result.stderr)  # what arrived

# == 6. observability ========================================================================

class TestLogStreak(unittest.TestCase):
    """The one log-once-per-streak helper: what a flood of trouble leaves in the log."""

    def test_a_throttle_logs_a_few_a_second_then_a_count(self):
        throttle = finger.warning_throttle("finger")
        with self.assertLogs("finger", "WARNING") as logs:
            for number in range(50):
                throttle.report("finger %d: dropped", number)
            throttle.end()
        self.assertEqual(len(logs.output), finger.MAX_WARNINGS_PER_SECOND + 1)
        self.assertIn("finger: %d more warnings like these in a second, not logged"
                      % (50 - finger.MAX_WARNINGS_PER_SECOND), logs.output[-1])

    def test_once_a_streak_at_its_level_then_at_the_repeat_level(self):
        streak = finger.LogStreak("irc", level=logging.ERROR, repeat_level=logging.INFO)
        with self.assertLogs("finger", "INFO") as logs:
            self.assertTrue(streak.report("banned"))
            self.assertFalse(streak.report("banned"))
            streak.clear()                                # a welcome: news again
            self.assertTrue(streak.report("banned"))
        self.assertEqual([record.levelname for record in logs.records],
                         ["ERROR", "INFO", "ERROR"])

    def test_streaks_are_per_key_and_end(self):
        streak = finger.LogStreak("finger")
        with self.assertLogs("finger", "WARNING") as logs:
            for key in (1, 1, 2, 1):
                streak.report("client %s over its limit", key, key=key)
        self.assertEqual(len(logs.output), 2)
        self.assertTrue(streak.in_streak(1))
        self.assertIsNotNone(streak.end(1))
        self.assertFalse(streak.in_streak(1))
        self.assertIsNone(streak.end(1))


# == 7. the web site ==========================================================================

EVIL = '<img src=x onerror="document.title=\'pwned\'">'


def web_db(fillers=0):
    """The web tests' users, and `fillers` more (40 make a users page long enough to be
    gzipped)."""
    users = {"moshez": "Happy and well", "shawn": "alive", "evil": EVIL, "caf\u00e9": "ol\u00e9"}
    users.update(("user%03d" % number, "status %d" % number) for number in range(fillers))
    return finger.MemoryDatabase(users)


def web_service(test, db=None, **options):
    db = db if db is not None else web_db()
    site = finger.WebSite(db, finger.load_templates(options.pop("templates", None)))
    service = finger.WebService(site, (LOCALHOST, 0), **options)
    start(test, service)
    return service


def http(address, method, path, body=None, headers=None, context=None):
    """One request on a new connection -> (status, headers dict, body bytes)."""
    import http.client
    if context is None:
        connection = http.client.HTTPConnection(*address, timeout=TIMEOUT)
    else:
        connection = http.client.HTTPSConnection(*address, timeout=TIMEOUT, context=context)
    with contextlib.closing(connection):
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()


def ask_or_reset(address, data):
    """Like ask, but a connection reset counts as the server closing (b'')."""
    try:
        return ask(address, data)
    except ConnectionResetError:
        return b""


class TestWebSite(unittest.TestCase):
    def setUp(self):
        self.address = web_service(self, timeout=1.0).address

    def test_pipelined_answers_read_slowly_arrive_whole_and_in_order(self):
        size = 400000                                  # more than a socket takes at once
        db = finger.MemoryDatabase({"big%d" % n: chr(65 + n) * size for n in range(3)})
        address = web_service(self, db).address
        count = 9
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(TIMEOUT)
            sock.connect(address)
            sock.sendall(b"".join(b"GET /big%d HTTP/1.1\r\nHost: x\r\n\r\n" % (n % 3)
                                  for n in range(count)))
            data = bytearray()
            while data.count(b"HTTP/1.1 200 ") < count or not data.endswith(b"</html>\n"):
                chunk = sock.recv(65536)
                self.assertTrue(chunk, "closed after %d bytes" % len(data))
                data += chunk
        answers = bytes(data).split(b"HTTP/1.1 200 OK\r\n")[1:]
        self.assertEqual(len(answers), count)
        for number, answer in enumerate(answers):
            head, _, body = answer.partition(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            self.assertEqual(len(body), length)
            self.assertIn(bytes([65 + number % 3]) * size, body)

    def test_index_lists_users_as_links_escaped(self):
        status, headers, body = http(self.address, "GET", "/")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/html; charset=utf-8")
        page = body.decode()
        self.assertIn('<a href="/moshez">moshez</a>', page)
        self.assertIn('<a href="/caf%C3%A9">caf\u00e9</a>', page)
        self.assertIn('<meta name="viewport"', page)
        self.assertNotIn("<img", page)
        self.assertIn("&lt;img src=x onerror=&quot;document.title=&#x27;pwned&#x27;&quot;&gt;",
                      page)

    def test_framing_per_rfc_9112_no_body_read_as_a_request(self):
        call = (b"<?xml version='1.0'?><methodCall><methodName>getUsers</methodName>"
                b"</methodCall>")
        smuggled = b"GET /moshez HTTP/1.1\r\nHost: x\r\n\r\n"
        cases = {
            "two lengths": b"POST /RPC2 HTTP/1.1\r\nContent-Length: 4\r\n"
                           b"Content-Length: 200\r\n\r\n" + call,
            "not ASCII digits": "POST /RPC2 HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n"
                                .encode("utf-8") + b"ab",
            "a length of 5000 digits": b"POST /RPC2 HTTP/1.1\r\nContent-Length: "
                                       + b"9" * 5000 + b"\r\n\r\n" + call,
            "length and chunks": b"POST /RPC2 HTTP/1.1\r\nContent-Length: 5\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "a GET with a body": b"GET / HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                                 % len(smuggled) + smuggled,
            "a GET with chunks": b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"%x\r\n" % len(smuggled) + smuggled + b"\r\n0\r\n\r\n",
        }
        for case, request in cases.items():
            with self.subTest(case=case):
                answer = ask_or_reset(self.address, request)
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:40])
                self.assertEqual(answer.count(b"HTTP/1.1 "), 1)     # nothing after it
                self.assertIn(b"Connection: close", answer)
        same = b"POST /RPC2 HTTP/1.1\r\nContent-Length: %d\r\nContent-Length: %d\r\n" \
               b"Connection: close\r\n\r\n" % (len(call), len(call)) + call
        self.assertTrue(ask(self.address, same).startswith(b"HTTP/1.1 200 "))

    def test_request_head_is_bounded_in_bytes(self):
        header = b"X-Big: " + b"y" * 60000 + b"\r\n"         # each line under 64 KiB
        for count, expected in ((2, b"HTTP/1.1 200 "), (3, b"HTTP/1.1 431 ")):
            with self.subTest(headers=count):
                answer = ask_or_reset(self.address, b"GET /moshez HTTP/1.1\r\n" +
                                      header * count + b"Connection: close\r\n\r\n")
                self.assertTrue(answer.startswith(expected), answer[:40])
        self.assertGreater(3 * len(header), finger.MAX_REQUEST_HEAD)
        self.assertEqual(http(self.address, "GET", "/moshez")[0], 200)   # keeps serving

    def test_100_continue_is_sent_at_once(self):
        body = (b"<?xml version='1.0'?><methodCall><methodName>getUsers</methodName>"
                b"</methodCall>")
        sock = connect(self, self.address)
        sock.sendall(b"POST /RPC2 HTTP/1.1\r\nContent-Length: %d\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n" % len(body))
        self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")  # body unsent
        sock.sendall(body)
        self.assertTrue(read_to_end(sock).startswith(b"HTTP/1.1 200 OK"))
        sock = connect(self, self.address)                  # no 100 for what we refuse
        sock.sendall(b"POST /RPC2 HTTP/1.1\r\nContent-Length: %d\r\n"
                     b"Expect: 100-continue\r\n\r\n" % (finger.MAX_RPC_BODY + 1))
        self.assertTrue(read_to_end(sock).startswith(b"HTTP/1.1 413 "))

    def test_user_page_and_404(self):
        status, _, body = http(self.address, "GET", "/moshez")
        self.assertEqual(status, 200)
        self.assertIn("Happy and well", body.decode())
        status, _, body = http(self.address, "GET", "/caf%C3%A9")
        self.assertEqual((status, "ol\u00e9" in body.decode()), (200, True))
        status, headers, body = http(self.address, "GET", "/nobody")
        self.assertEqual(status, 404)
        self.assertIn("No such user", body.decode())
        self.assertEqual(headers["Cache-Control"], "no-store")
        status, _, body = http(self.address, "GET", "/%3Cscript%3E")
        self.assertEqual(status, 404)
        self.assertIn("&lt;script&gt;", body.decode())

    def test_security_headers_everywhere(self):
        for path in ["/", "/moshez", "/nobody", "/api/users", "/a/b"]:
            with self.subTest(path=path):
                _, headers, _ = http(self.address, "GET", path)
                self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
                self.assertIn("default-src 'none'", headers["Content-Security-Policy"])
                self.assertIn("charset=utf-8", headers["Content-Type"])
                self.assertIn("Cache-Control", headers)

    def test_json_api(self):
        import json
        status, headers, body = http(self.address, "GET", "/api/users")
        self.assertEqual(headers["Content-Type"], "application/json; charset=utf-8")
        self.assertEqual([user["user"] for user in json.loads(body)],
                         ["caf\u00e9", "evil", "moshez", "shawn"])
        self.assertEqual(json.loads(body)[2], {"user": "moshez", "status": "Happy and well"})
        status, _, body = http(self.address, "GET", "/api/users/moshez")
        self.assertEqual((status, json.loads(body)),
                         (200, {"user": "moshez", "status": "Happy and well"}))
        status, _, body = http(self.address, "GET", "/api/users/nobody")
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body)["error"], "No such user")
        for method, path, code in (("POST", "/api/users", 405), ("GET", "/api", 404),
                                   ("GET", "/api/nothing", 404),
                                   ("GET", "/api/users?limit=0", 400),
                                   ("GET", "/api/users?after=%ff", 400),
                                   ("GET", "/api/users?limit=" + "9" * 5000, 400)):
            status, headers, body = http(self.address, method, path, body=b"" if method ==
                                         "POST" else None)
            self.assertEqual((status, headers["Content-Type"]),
                             (code, "application/json; charset=utf-8"), path)
            self.assertIn("error", json.loads(body))

    def test_json_api_pages(self):
        import json
        db = finger.MemoryDatabase({"u%05d" % i: "status %d" % i for i in range(2500)})
        address = web_service(self, db).address
        seen, path, pages = [], "/api/users", 0
        while path:
            status, headers, body = http(address, "GET", path)
            self.assertEqual(status, 200)
            page = json.loads(body)
            self.assertLessEqual(len(page), finger.API_PAGE)
            seen += page
            pages += 1
            link = headers.get("Link")
            path = re.match(r'<([^>]+)>; rel="next"', link).group(1) if link else None
        self.assertEqual(pages, 3)
        self.assertEqual([user["user"] for user in seen], sorted(db.get_users()))
        self.assertEqual(seen[1234], {"user": "u01234", "status": "status 1234"})
        page = json.loads(http(address, "GET", "/api/users?limit=2&after=u00009")[2])
        self.assertEqual([user["user"] for user in page], ["u00010", "u00011"])
        self.assertEqual(len(json.loads(http(address, "GET", "/api/users?limit=99999")[2])),
                         2500)                              # under API_MAX_PAGE: all
        many = finger.WebSite(finger.MemoryDatabase(
            {"u%05d" % i: "s" for i in range(finger.API_MAX_PAGE + 1)}))
        response = many.handle("GET", "/api/users?limit=%d" % (finger.API_MAX_PAGE * 10))
        self.assertEqual(len(json.loads(response.body)), finger.API_MAX_PAGE)
        self.assertIn(("Link", '</api/users?limit=%d&after=u%05d>; rel="next"'
                       % (finger.API_MAX_PAGE, finger.API_MAX_PAGE - 1)), response.headers)

    def test_xmlrpc(self):
        import xmlrpc.client
        proxy = xmlrpc.client.ServerProxy("http://%s:%d/RPC2" % self.address)
        self.addCleanup(proxy("close"))
        self.assertEqual(proxy.getUser("moshez"), "Happy and well")
        self.assertEqual(proxy.getUser("nobody"), "No such user")
        self.assertEqual(proxy.getUsers(), ["caf\u00e9", "evil", "moshez", "shawn"])
        self.assertIn("getUser", proxy.system.listMethods())
        self.assertIn("status", proxy.system.methodHelp("getUser"))
        with self.assertRaises(xmlrpc.client.Fault):
            proxy.noSuchMethod()
        with self.assertRaises(xmlrpc.client.Fault):
            proxy.getUser(42)
        self.assertEqual(proxy.getUser("moshez"), "Happy and well")   # still serving

    def test_xmlrpc_limits(self):
        too_big = b"POST /RPC2 HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (finger.MAX_RPC_BODY + 1)
        self.assertTrue(ask_or_reset(self.address, too_big).startswith(
            b"HTTP/1.1 413 "))                    # answered without reading the body
        laughs = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa">]>'
                  b"<methodCall><methodName>getUser</methodName><params><param><value>"
                  b"<string>&a;</string></value></param></params></methodCall>")
        self.assertEqual(http(self.address, "POST", "/RPC2", body=laughs)[0], 400)
        status, _, body = http(self.address, "POST", "/RPC2", body=b"\xff garbage <<<")
        self.assertEqual(status, 200)
        self.assertIn(b"<fault>", body)
        self.assertEqual(http(self.address, "GET", "/RPC2")[1]["Allow"], "POST")

    def test_methods(self):
        status, headers, body = http(self.address, "HEAD", "/moshez")
        self.assertEqual((status, body), (200, b""))
        self.assertGreater(int(headers["Content-Length"]), 0)
        for method in ["PUT", "DELETE", "OPTIONS", "BREW"]:
            with self.subTest(method=method):
                status, headers, _ = http(self.address, method, "/")
                self.assertEqual(status, 405)
                self.assertEqual(headers["Allow"], "GET, HEAD, POST")
        self.assertEqual(http(self.address, "POST", "/moshez", body=b"")[0], 405)

    def test_odd_paths_are_404(self):
        for path in ["/moshez/", "/moshez/x", "/..", "/%2e%2e", "/%2E%2E/etc/passwd",
                     "/a%00b", "/%2Fetc%2Fpasswd", "//etc/passwd", "/..%2F..%2Fetc%2Fpasswd",
                     "/%ff", "/%0d%0aSet-Cookie:x", "/api/users/moshez/x", "/favicon.ico"]:
            with self.subTest(path=path):
                self.assertEqual(http(self.address, "GET", path)[0], 404)

    def test_access_log_line(self):
        with query_log_on(self) as logs:
            http(self.address, "GET", "/moshez")
        self.assertRegex(logs.output[-1],
                         r'web 127\.0\.0\.1:\d+ "GET /moshez HTTP/1\.1" 200 \d+ [0-9.]+ms$')

    def test_users_page_follows_changes(self):
        db = finger.MemoryDatabase({"moshez": "Happy and well"})
        address = web_service(self, db).address
        self.assertIn(b"Happy and well", http(address, "GET", "/")[2])
        db.set_user("shawn", "alive")
        page = http(address, "GET", "/")[2]
        self.assertIn(b"alive", page)
        self.assertIn(b"2 users", page)

    def test_keep_alive(self):
        import http.client
        connection = http.client.HTTPConnection(*self.address, timeout=TIMEOUT)
        with contextlib.closing(connection):
            for path in ["/moshez", "/shawn", "/api/users"]:
                connection.request("GET", path)
                response = connection.getresponse()
                response.read()
                self.assertEqual(response.status, 200)
                self.assertFalse(response.will_close)

    def test_conditional_requests_and_gzip(self):
        import gzip
        import http.client
        db = finger.MemoryDatabase({"u%03d" % i: "status %d" % i for i in range(100)})
        address = web_service(self, db).address
        connection = http.client.HTTPConnection(*address, timeout=TIMEOUT)
        self.addCleanup(connection.close)

        def get(path, method="GET", **headers):
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()

        status, headers, plain = get("/")
        self.assertEqual((status, headers.get("Vary")), (200, "Accept-Encoding"))
        self.assertNotIn("Content-Encoding", headers)
        status, zipped_headers, zipped = get("/", **{"Accept-Encoding": "br, gzip;q=0.8"})
        self.assertEqual(zipped_headers["Content-Encoding"], "gzip")
        self.assertEqual(gzip.decompress(zipped), plain)
        self.assertLess(len(zipped), len(plain) // 2)
        self.assertNotEqual(zipped_headers["ETag"], headers["ETag"])  # one per encoding
        self.assertNotIn("Content-Encoding", get("/", **{"Accept-Encoding": "gzip;q=0"})[1])
        status, head_headers, body = get("/", "HEAD", **{"Accept-Encoding": "gzip"})
        self.assertEqual((body, head_headers["Content-Length"]), (b"", str(len(zipped))))
        status, not_modified, body = get("/", **{"If-None-Match": 'W/' + headers["ETag"]})
        self.assertEqual((status, body), (304, b""))
        self.assertNotIn("Content-Length", not_modified)
        self.assertEqual(not_modified["ETag"], headers["ETag"])
        self.assertEqual(get("/", **{"If-Modified-Since": headers["Last-Modified"]})[0], 304)
        small = get("/u001", **{"Accept-Encoding": "gzip"})
        self.assertNotIn("Content-Encoding", small[1])                 # under 1 KB
        self.assertEqual(get("/api/users/u001", **{"If-None-Match": small[1]["ETag"]})[0], 200)
        db.set_user("u001", "changed")
        status, headers, body = get("/u001", **{"If-None-Match": small[1]["ETag"]})
        self.assertEqual(status, 200)                                  # a new version
        self.assertIn(b"changed", body)
        self.assertEqual(get("/nobody", **{"If-None-Match": "*"})[0], 404)   # errors: as is

    def test_malformed_requests_get_a_clean_error_and_the_site_keeps_serving(self):
        for raw in [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
                    b"\x16\x03\x01\x00\xa5\x01\x00\x00"]:
            with self.subTest(raw=raw[:20]):
                reply = ask_or_reset(self.address, raw)
                self.assertTrue(reply == b"" or reply.startswith(b"HTTP/1."), reply[:80])
        self.assertEqual(http(self.address, "GET", "/moshez")[0], 200)

    def test_log_lines_are_defanged(self):
        server = ServerProcess(self, "--users", write_file(self, USERS), "--finger", "off",
                               "--setter", "off", "--web", "127.0.0.1:0", "--log-queries")
        address = server.address("web")
        ask_or_reset(address, b"GET /\x1b[2J\x1b]0;owned\x07 HTTP/1.1\r\n"
                              b"Connection: close\r\n\r\n")
        line = server.expect(r"GET /").string
        self.assertNotIn("\x1b", line)
        self.assertIn("^[[2J", line)


class TestHTTPSession(unittest.TestCase):
    """The web's HTTP on a connection, without a socket: bytes in, answers out."""

    def setUp(self):
        self.db = finger.MemoryDatabase({"moshez": "Happy and well", "shawn": "alive"})
        self.protocol = finger.HTTPProtocol(finger.WebSite(self.db))
        self.session = self.protocol.new_session(("192.0.2.1", 4000))

    def feed(self, data):
        return b"".join(self.session.feed(data))

    def resume(self):
        return b"".join(self.session.resume())

    def statuses(self, data):
        return [int(code) for code in re.findall(rb"(?m)^HTTP/1\.1 (\d{3}) ", data)]

    def test_the_users_page_is_made_once_however_many_ask_at_once(self):
        db = finger.MemoryDatabase({"u%05d" % n: "status %d" % n for n in range(20000)})
        site = finger.WebSite(db)
        barrier = threading.Barrier(6)
        pages = []

        def ask():
            barrier.wait()
            pages.append(site.users_page())

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        self.assertEqual(len({id(page) for page in pages}), 1)      # one render, shared
        self.assertIsNotNone(pages[0]._gzipped)                      # gzipped off the loop

    def test_while_the_users_page_is_made_the_one_before_is_answered(self):
        site = self.protocol.site
        old = site.users_page()
        self.db.set_user("new", "here")
        self.assertTrue(site.needs_worker("GET", "/"))          # no one makes it yet
        with site._rendering:                                   # as a worker making it
            self.assertFalse(site.needs_worker("GET", "/"))
            self.assertIs(site.users_page(), old)
        fresh = site.users_page()
        self.assertIn(b"here", fresh.body)
        self.assertIs(site.users_page(may_block=False), fresh)

    def test_the_users_page_is_made_before_the_first_client_asks(self):
        service = web_service(self)
        # private: no public way to see it
        wait_until(lambda: service.site._users_page is not None)

    def test_pipelined_requests_are_answered_in_order(self):
        answer = self.feed(b"GET /moshez HTTP/1.1\r\nHost: x\r\n\r\n"
                                   b"GET /nobody HTTP/1.1\r\nHost: x\r\n\r\n"
                                   b"GET /shawn HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.statuses(answer), [200, 404, 200])
        self.assertLess(answer.index(b"Happy and well"), answer.index(b"alive"))
        self.assertTrue(self.session.idle)
        self.assertFalse(self.session.pending or self.session.closing)

    def test_a_request_dribbled_byte_by_byte_is_answered_once_whole(self):
        request = b"GET /moshez HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n" % (b"p" * 3000)
        for byte in range(len(request) - 1):
            self.assertEqual(self.feed(request[byte:byte + 1]), b"")
            self.assertFalse(self.session.idle)             # the deadline is not restarted
        self.assertEqual(self.statuses(self.feed(request[-1:])), [200])
        self.assertTrue(self.session.idle)

    def test_slow_requests_wait_for_a_worker(self):
        call = (b"<?xml version='1.0'?><methodCall><methodName>getUser</methodName><params>"
                b"<param><value><string>moshez</string></value></param></params></methodCall>")
        answer = self.feed(b"GET /shawn HTTP/1.1\r\n\r\nPOST /RPC2 HTTP/1.1\r\n"
                                   b"Content-Length: %d\r\n\r\n" % len(call) + call)
        self.assertEqual(self.statuses(answer), [200])      # what is quick, now
        self.assertTrue(self.session.pending and self.session.slow)
        answer = self.resume()                      # what a worker runs
        self.assertEqual(self.statuses(answer), [200])
        self.assertIn(b"Happy and well", answer)
        self.assertFalse(self.session.pending)

    def test_answers_to_a_pipelined_flood_come_a_batch_at_a_time(self):
        self.db.set_user("big", "b" * 8000)
        answer = self.feed(b"GET /big HTTP/1.1\r\n\r\n" * 100)
        self.assertLess(len(answer), finger.HTTP_BATCH + 10000)
        self.assertTrue(self.session.pending)
        answers = [answer]
        while self.session.pending:
            answers.append(self.resume())
        self.assertEqual(len(self.statuses(b"".join(answers))), 100)

    def test_100_continue_comes_before_the_body(self):
        answer = self.feed(b"POST /RPC2 HTTP/1.1\r\nExpect: 100-continue\r\n"
                                   b"Content-Length: 10\r\n\r\n")
        self.assertEqual(answer, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertFalse(self.session.idle)

    def test_a_head_whole_in_one_read_is_refused_past_its_limit_too(self):
        answer = self.feed(b"GET / HTTP/1.1\r\nX: " + b"y" * finger.MAX_REQUEST_HEAD +
                           b"\r\n\r\n")
        self.assertEqual(self.statuses(answer), [431])

    def test_malformed_header_lines_are_refused(self):
        for case in (b"Transfer-Encoding : chunked", b"X-Nul: a\0b", b"No colon here",
                     b" leading: space", b"X-A: a\rX-B: b"):       # a bare CR: two fields to some
            with self.subTest(case=case):
                session = self.protocol.new_session(("192.0.2.1", 4000))
                answer = b"".join(session.feed(b"POST /RPC2 HTTP/1.1\r\n" + case +
                                               b"\r\nContent-Length: 4\r\n\r\nabcd"))
                self.assertEqual(self.statuses(answer), [400])
                self.assertTrue(session.closing)

    def test_content_length_takes_only_space_and_tab_around_it(self):
        for value in (b"5\x85", b"5\x0c", b"\x0b5", b"5\xa0", b"5\x1c"):   # str.strip()'s
            with self.subTest(value=value):
                session = self.protocol.new_session(("192.0.2.1", 4000))
                answer = b"".join(session.feed(b"POST /RPC2 HTTP/1.1\r\nContent-Length: " +
                                               value + b"\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n"))
                self.assertEqual(self.statuses(answer), [400])
                self.assertTrue(session.closing)
        self.feed(b"POST /RPC2 HTTP/1.1\r\nContent-Length: \t4 \r\n\r\nabcd")
        self.assertEqual(self.statuses(self.resume()), [200])     # an XML-RPC fault, read

    def test_request_lines_are_split_as_http_server_splits_them(self):
        for space in b"\t\x0b\x0c\x1c\x1d\x1e\x1f \x85\xa0":     # str.split()'s, in Latin-1
            with self.subTest(space=space):
                session = self.protocol.new_session(("192.0.2.1", 4000))
                answer = b"".join(session.feed(b"GET%c/moshez%cHTTP/1.1\r\n" % (space, space)
                                               + b"GET /shawn HTTP/1.1\r\n\r\n"))
                self.assertEqual(len(self.statuses(answer)), 1)     # one request, never two
        # Fewer than three words (0x84 is no space): the line is the whole request.
        answer = self.feed(b"GET /moshez\x84HTTP/1.1\r\n")
        self.assertEqual(self.statuses(answer), [404])
        self.assertTrue(self.session.closing)

    def test_one_empty_line_before_a_request_and_the_absolute_form(self):
        answer = self.feed(b"\r\nGET http://example.org/moshez HTTP/1.1\r\n\r\n")
        self.assertEqual(self.statuses(answer), [200])
        self.assertIn(b"Happy and well", answer)

    def test_a_slow_request_gets_503_when_every_worker_is_busy(self):
        self.feed(b"POST /RPC2 HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd"
                  b"GET /shawn HTTP/1.1\r\n\r\n")
        self.assertTrue(self.session.slow)
        answer = b"".join(self.session.busy())
        self.assertEqual(self.statuses(answer), [503])
        self.assertIn(b"Retry-After: 1", answer)
        self.assertTrue(self.session.pending and not self.session.slow)
        self.assertIn(b"alive", self.resume())                # and the next one is answered

    def test_a_head_without_end_is_refused_past_its_limit(self):
        self.assertEqual(self.feed(b"GET / HTTP/1.1\r\n"), b"")
        answer = self.feed(b"X: " + b"y" * finger.MAX_REQUEST_HEAD)
        self.assertEqual(self.statuses(answer), [431])
        self.assertTrue(self.session.closing)


class TestWebLimitsAndTemplates(unittest.TestCase):
    def test_connection_cap_answers_503(self):
        service = web_service(self, max_connections=2)
        idle = [connect(self, service.address) for _ in range(2)]
        wait_until(lambda: service.open_connections() == 2)
        self.assertEqual(http(service.address, "GET", "/")[0], 503)
        idle[0].close()
        wait_until(lambda: service.open_connections() == 1)
        self.assertEqual(http(service.address, "GET", "/")[0], 200)

    def test_idle_keep_alive_connections_take_no_thread_each(self):
        service = web_service(self)
        threads = threading.active_count()
        idle = [connect(self, service.address) for _ in range(300)]     # more than 256
        wait_until(lambda: service.open_connections() == len(idle))
        self.assertEqual(http(service.address, "GET", "/moshez")[0], 200)
        self.assertLessEqual(threading.active_count(), threads + 1)

    def test_a_slow_back_end_holds_only_its_own_request(self):
        db = SlowDatabase()
        service = web_service(self, db=db)
        slow = connect(self, service.address)
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(db.waiting.acquire(timeout=TIMEOUT))      # in a worker now
        self.assertEqual(http(service.address, "GET", "/moshez")[0], 200)
        db.release.set()
        self.assertIn(b"finally", read_to_end(slow))

    def test_readers_of_a_big_page_share_the_copy_the_site_keeps(self):
        db = finger.MemoryDatabase({"big": "x" * 3000000})
        service = web_service(self, db=db)
        self.assertEqual(http(service.address, "GET", "/big")[0], 200)   # made, and kept
        for _ in range(3):
            sock = socket.socket()
            self.addCleanup(sock.close)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(service.address)
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")      # and reads nothing
        wait_until(lambda: service.open_connections() == 3 and all(
            conn.outbuf for conn in service.connections()))
        page = service.site._pages.entries["big"].body   # no public way to the cache
        for conn in service.connections():
            self.assertIs(conn.outbuf[-1].obj, page)           # a view of it, not a copy

    def test_a_slow_request_gets_503_when_every_worker_is_busy(self):
        db = SlowDatabase()
        service = web_service(self, db=db, workers=1)           # 2 may wait for it
        waiting = []
        for _ in range(2):
            sock = connect(self, service.address)
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            waiting.append(sock)
        self.assertTrue(db.waiting.acquire(timeout=TIMEOUT))
        wait_until(lambda: service.loop.in_flight == 2)
        status, headers, _ = http(service.address, "GET", "/moshez")
        self.assertEqual((status, headers.get("Retry-After")), (503, "1"))
        db.release.set()
        for sock in waiting:
            self.assertIn(b"finally", read_to_end(sock))

    def test_stop_closes_requests_not_yet_whole_at_once(self):
        service = web_service(self)
        for _ in range(50):
            connect(self, service.address).sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        wait_until(lambda: service.open_connections() == 50)
        started = time.monotonic()
        service.stop()
        self.assertLess(time.monotonic() - started, finger.STOP_GRACE / 2)

    def test_idle_connection_times_out(self):
        service = web_service(self, timeout=0.2)
        sock = connect(self, service.address)
        sock.sendall(b"GET / HTTP/1.1\r\n")           # never finishes its headers
        self.assertEqual(sock.recv(100), b"")
        wait_until(lambda: service.open_connections() == 0)

    def test_stop_closes_keep_alive_connections(self):
        service = web_service(self)
        sock = connect(self, service.address)
        sock.sendall(b"GET /moshez HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", sock.recv(4096))
        # private: no public way to see it
        thread = service._thread
        started = time.monotonic()
        service.stop()
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertFalse(thread.is_alive())
        self.assertEqual(sock.recv(100), b"")

    def test_templates_replace_the_pages_with_escaped_values(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        for name, text in [("users.html", "<ol>$users</ol> $count"),
                           ("user.html", "<b>$user</b> says <i>$status</i>")]:
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        address = web_service(self, templates=directory).address
        self.assertEqual(http(address, "GET", "/moshez")[2],
                         b"<b>moshez</b> says <i>Happy and well</i>")
        body = http(address, "GET", "/evil")[2].decode()
        self.assertEqual(body, "<b>evil</b> says <i>&lt;img src=x onerror=&quot;document.title="
                               "&#x27;pwned&#x27;&quot;&gt;</i>")
        self.assertTrue(http(address, "GET", "/")[2].decode().endswith("</ol> 4"))

    def test_missing_or_broken_template_exits_2_naming_the_file(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        users = write_file(self, USERS)
        args = ["--serve", "--users", users, "--finger", "off", "--setter", "off", "--web",
                "127.0.0.1:0", "--templates", directory]
        result = run_finger(*args)
        self.assertEqual(result.returncode, 2)
        self.assertIn(os.path.join(directory, "users.html"), result.stderr)
        with open(os.path.join(directory, "users.html"), "w") as f:
            f.write("$users $nonsense")
        with open(os.path.join(directory, "user.html"), "w") as f:
            f.write("$user")
        result = run_finger(*args)
        self.assertEqual(result.returncode, 2)
        self.assertIn("users.html is broken", result.stderr)

    def test_metrics(self):
        users = write_file(self, USERS)
        options = finger.default_options(finger="127.0.0.1:0", web="127.0.0.1:0", setter="off",
                                         users=users)
        with finger.build_services(options) as services:
            ask(services.by_name("finger").address, b"moshez\r\n")
            status, headers, body = http(services.by_name("web").address, "GET", "/metrics")
        text = body.decode()
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/plain; version=0.0.4"))
        self.assertIn('finger_requests_total{service="finger",outcome="ok"} 1', text)
        self.assertIn("finger_users 2", text)
        self.assertIn("finger_last_reload_success 1", text)
        self.assertRegex(text, r'finger_open_connections\{service="web"\} 1')

    def test_metrics_answer_questions(self):
        users = write_file(self, USERS)
        options = finger.default_options(finger="127.0.0.1:0", web="127.0.0.1:0", setter="off",
                                         pb="127.0.0.1:0", users=users, max_connections=1)
        with finger.build_services(options) as services:
            address = services.by_name("finger").address
            for _ in range(3):
                ask(address, b"moshez\r\n")
            PBTestClient(self, services.by_name("pb").address).call("getUser", "moshez")
            held = connect(self, address)               # the one connection the cap allows
            wait_until(lambda: services.by_name("finger").open_connections() == 1)
            self.assertEqual(ask(address, b"shawn\r\n"), finger.SERVER_BUSY.encode() + b"\r\n")
            held.close()
            text = http(services.by_name("web").address, "GET", "/metrics")[2].decode()
        self.assertIn('finger_request_duration_seconds_count{service="finger"} 4', text)
        self.assertIn('finger_request_duration_seconds_bucket{service="finger",le="+Inf"} 4',
                      text)
        self.assertIn('finger_request_duration_seconds_count{service="pb"} 1', text)
        self.assertIn("# TYPE finger_request_duration_seconds histogram", text)
        self.assertIn('finger_rejected_total{service="finger",reason="cap"} 1', text)
        buckets = [int(value) for value in re.findall(
            r'finger_request_duration_seconds_bucket\{service="finger",le="[^"]+"\} (\d+)', text)]
        self.assertEqual(buckets, sorted(buckets))                 # cumulative
        for name in ("process_resident_memory_bytes", "process_open_fds",
                     "process_cpu_seconds_total", "process_start_time_seconds"):
            self.assertRegex(text, r"(?m)^%s [0-9.]+$" % name)
        self.assertIn('finger_build_info{version="%s",python="' % finger.__version__, text)
        self.assertNotIn("moshez", text)                           # never a user's name
        self.assertNotIn("127.0.0.1", text)                        # nor a client's address

    def test_web_peer_dribbling_its_headers_is_dropped(self):
        clock = TestClock()
        service = web_service(self, timeout=10, clock=clock)
        cut_at_the_deadline(self, service, clock, b"GET / HTTP/1.1\r\n", b"X-Slow: z\r\n")
        self.assertEqual(http(service.address, "GET", "/moshez")[0], 200)
        self.assertGreaterEqual(service.counts.get("timeout", 0), 1)

    def test_a_slow_request_body_is_cut_at_the_deadline(self):
        clock = TestClock()
        service = web_service(self, timeout=10, clock=clock)
        cut_at_the_deadline(self, service, clock,
                            b"POST /RPC2 HTTP/1.1\r\nContent-Length: 1000\r\n\r\n", b"x")

    def test_metrics_do_not_grow_with_user_names(self):
        db = finger.MemoryDatabase()
        service = setter_service(self, db)
        for name in (b"a", b"b"):
            set_over(service.address, name + b"\nx\n")
        self.assertEqual(service.counts.get("set"), 2)


def make_certificate(directory, name="server.pem", days=1):
    """A self-signed certificate and key for 127.0.0.1 in one PEM file, made by openssl."""
    path = os.path.join(directory, name)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", path,
                    "-out", path + ".crt", "-days", str(days), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True,
                   timeout=60)
    with open(path, "a") as pem, open(path + ".crt") as crt:
        pem.write(crt.read())
    return path


@unittest.skipUnless(shutil.which("openssl"), "needs the openssl command to make a certificate")
class TestHTTPS(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="finger-test-")
        cls.pem = make_certificate(cls.directory)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.directory, True)

    def client_context(self, pem=None):
        import ssl
        return ssl.create_default_context(cafile=(pem or self.pem) + ".crt")

    def test_pages_over_tls(self):
        service = web_service(self, cert=self.pem, name="https")
        status, _, body = http(service.address, "GET", "/moshez", context=self.client_context())
        self.assertEqual((status, b"Happy and well" in body), (200, True))

    def test_strict_transport_security_on_https_only(self):
        https = web_service(self, cert=self.pem, name="https")
        _, headers, _ = http(https.address, "GET", "/", context=self.client_context())
        self.assertEqual(headers.get("Strict-Transport-Security"),
                         "max-age=%d" % finger.DEFAULT_HSTS)
        _, headers, _ = http(https.address, "GET", "/nobody", context=self.client_context())
        self.assertIn("Strict-Transport-Security", headers)               # errors too
        short = web_service(self, cert=self.pem, name="https", hsts=60)
        _, headers, _ = http(short.address, "GET", "/", context=self.client_context())
        self.assertEqual(headers.get("Strict-Transport-Security"), "max-age=60")
        off = web_service(self, cert=self.pem, name="https", hsts=0)
        self.assertNotIn("Strict-Transport-Security",
                         http(off.address, "GET", "/", context=self.client_context())[1])
        plain = web_service(self, hsts=60)
        self.assertNotIn("Strict-Transport-Security", http(plain.address, "GET", "/")[1])

    def test_old_tls_plain_http_and_stalled_handshakes_are_dropped(self):
        import ssl
        service = web_service(self, cert=self.pem, name="https", timeout=0.5)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.minimum_version = ssl.TLSVersion.TLSv1
        with self.assertLogs("finger", "WARNING"):
            with self.assertRaises((ssl.SSLError, OSError)):
                http(service.address, "GET", "/", context=old)
            self.assertEqual(ask_or_reset(service.address, b"GET / HTTP/1.1\r\n\r\n"), b"")
            stalled = connect(self, service.address)
            stalled.sendall(b"\x16\x03\x01")          # half a ClientHello, then nothing
            self.assertEqual(stalled.recv(10), b"")
        status, _, _ = http(service.address, "GET", "/", context=self.client_context())
        self.assertEqual(status, 200)

    def test_over_the_cap_tls_fails_like_tls_never_plain_text(self):
        import ssl
        service = web_service(self, cert=self.pem, name="https", max_connections=1)
        held = socket.create_connection(service.address, timeout=TIMEOUT)
        self.addCleanup(held.close)
        held = self.client_context().wrap_socket(held, server_hostname="127.0.0.1")
        wait_until(lambda: service.open_connections() == 1)
        with self.assertRaises((ssl.SSLError, ConnectionError)) as refused:
            http(service.address, "GET", "/", context=self.client_context())
        self.assertNotIsInstance(refused.exception, ssl.SSLCertVerificationError)
        raw = ask_or_reset(service.address, b"\x16\x03\x01\x00\x05hello")
        self.assertFalse(raw.startswith(b"HTTP"), raw[:20])
        half = connect(self, service.address)
        half.sendall(b"\x16\x03\x01")                  # half a ClientHello, held open
        wait_until(lambda: service.counts.get("busy") == 3)
        held.close()                                    # and the site still serves
        wait_until(lambda: service.open_connections() == 0)
        self.assertEqual(http(service.address, "GET", "/", context=self.client_context())[0],
                         200)

    def test_a_slow_reader_of_a_big_answer_is_not_cut(self):
        clock = TestClock()
        db = finger.MemoryDatabase({"big": "x" * 16000000})    # more than socket buffers
        service = web_service(self, db=db, cert=self.pem, name="https", timeout=10,
                              clock=clock)
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.settimeout(TIMEOUT)
        raw.connect(service.address)
        tls = self.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        self.addCleanup(tls.close)
        tls.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got, marks = 0, list(range(2000000, 16000000, 2000000))
        while True:                    # 42 s of the clock pass while it reads: each part
            chunk = tls.recv(65536)    # it takes restarts the deadline
            if not chunk:
                break
            got += len(chunk)
            while marks and got > marks[0]:
                marks.pop(0)
                clock.advance(service, 6)
        self.assertGreater(got, 16000000)

    def test_stop_ends_connections_still_in_their_handshake(self):
        service = web_service(self, cert=self.pem, name="https")
        for _ in range(5):
            connect(self, service.address).sendall(b"\x16\x03\x01")   # half a ClientHello
        wait_until(lambda: service.open_connections() == 5)
        started = time.monotonic()
        service.stop()
        self.assertLess(time.monotonic() - started, finger.STOP_GRACE + 1)
        self.assertEqual(service.open_connections(), 0)

    def test_a_stalled_handshake_holds_no_one_else(self):
        service = web_service(self, cert=self.pem, name="https")
        stalled = [connect(self, service.address) for _ in range(20)]
        for sock in stalled:
            sock.sendall(b"\x16\x03\x01")                   # half a ClientHello each
        self.assertEqual(http(service.address, "GET", "/moshez",
                              context=self.client_context())[0], 200)

    def test_reload_picks_up_a_renewed_certificate(self):
        import ssl
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        pem = os.path.join(directory, "server.pem")
        shutil.copy(self.pem, pem)
        service = web_service(self, cert=pem, name="https")
        renewed = make_certificate(directory, "renewed.pem")
        shutil.copy(renewed, pem)
        with self.assertRaises(ssl.SSLError):        # still the old one
            http(service.address, "GET", "/", context=self.client_context(renewed))
        service.reload()
        self.assertEqual(http(service.address, "GET", "/",
                              context=self.client_context(renewed))[0], 200)

    def test_sighup_reloads_the_certificate(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        pem = os.path.join(directory, "server.pem")
        shutil.copy(self.pem, pem)
        users = write_file(self, USERS)
        server = ServerProcess(self, "--users", users, "--finger", "off", "--setter", "off",
                               "--web", "off", "--https", "127.0.0.1:0", "--cert", pem)
        address = server.address("https")
        renewed = make_certificate(directory, "renewed.pem")
        shutil.copy(renewed, pem)
        server.process.send_signal(signal.SIGHUP)
        server.expect("reloaded the certificate")
        self.assertEqual(http(address, "GET", "/", context=self.client_context(renewed))[0], 200)

    def test_missing_or_bad_certificate_exits_2_naming_the_file(self):
        users = write_file(self, USERS)
        base = ["--serve", "--users", users, "--finger", "off", "--setter", "off", "--web", "off",
                "--https", "127.0.0.1:0"]
        result = run_finger(*base)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--https needs --cert", result.stderr)
        for cert in ["/nonexistent/server.pem", users]:
            with self.subTest(cert=cert):
                result = run_finger(*base, "--cert", cert)
                self.assertEqual(result.returncode, 2)
                self.assertIn(cert, result.stderr)


class TestReservedNames(unittest.TestCase):
    """User names and the web site's own paths never collide."""

    def test_every_path_the_site_serves_is_reserved(self):
        self.assertEqual(finger.RESERVED_NAMES, {"api", "RPC2", "metrics", "healthz"})
        site = finger.WebSite(finger.MemoryDatabase({name: "a user" for name in
                                                     finger.RESERVED_NAMES}),
                              metrics=lambda: "finger_users 4\n")
        for name in finger.RESERVED_NAMES:
            self.assertNotIn(b"a user", site.handle("GET", "/" + name).body, name)
            page = site.handle("GET", "/~" + name)
            self.assertEqual(page.status, 200, name)
            self.assertIn(b"a user", page.body)
            self.assertIn(b'href="/~%s"' % name.encode(), site.handle("GET", "/").body)
        self.assertIn(b'href="/moshez"', finger.WebSite(finger.MemoryDatabase(
            {"moshez": "x"})).handle("GET", "/").body)

    def test_the_setter_refuses_them_and_a_load_warns(self):
        path = write_file(self, "moshez: hi\nmetrics: old\n")
        with self.assertLogs(finger.log, "WARNING") as logs:
            db = finger.FileDatabase(path)
        self.assertIn("metrics", "\n".join(logs.output))
        self.assertIn("/~NAME", "\n".join(logs.output))
        address = setter_service(self, db).address
        for name in sorted(finger.RESERVED_NAMES):
            reply = set_over(address, b"%s\r\nsome status\r\n" % name.encode())
            self.assertTrue(reply.startswith(b"Reserved name"), reply)
        self.assertEqual(set_over(address, b"metrics2\r\nfine\r\n"), b"OK\r\n")
        self.assertEqual(db.get_user("metrics"), "old")
        self.assertNotIn("RPC2", db.get_users())

    def test_healthz_follows_the_last_load_and_the_services(self):
        path = write_file(self, "moshez: hi\nshawn: there\n")
        db = finger.FileDatabase(path, reload_interval=0)
        service = finger_service(self, db)
        site = finger.WebSite(db, services=[service])
        response = site.handle("GET", "/healthz")
        report = json.loads(response.body)
        self.assertEqual((response.status, report["status"], report["users"],
                          report["users_file_loads"], report["services"]),
                         (200, "ok", 2, True, {"finger": True}))
        self.assertLess(report["last_load_age_seconds"], 60)
        self.assertIn(("Cache-Control", "no-store"), response.headers)
        os.unlink(path)
        with self.assertLogs(finger.log, "ERROR"):
            db.reload(force=True)
        response = site.handle("GET", "/healthz")
        self.assertEqual((response.status, json.loads(response.body)["users_file_loads"]),
                         (503, False))
        replace_file(path, b"moshez: back\n")
        db.reload(force=True)
        self.assertEqual(site.handle("GET", "/healthz").status, 200)
        service.stop()
        response = site.handle("GET", "/healthz")
        self.assertEqual((response.status, json.loads(response.body)["services"]),
                         (503, {"finger": False}))


class TestXMLRPCFaults(unittest.TestCase):
    """Faults carry the interoperability codes and a short message, no Python internals."""

    def fault(self, body):
        import xmlrpc.client
        site = finger.WebSite(finger.MemoryDatabase({"moshez": "Happy and well"}))
        response = site.handle("POST", "/RPC2", body if isinstance(body, bytes)
                               else body.encode())
        self.assertEqual(response.status, 200)
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            xmlrpc.client.loads(response.body)
        fault = caught.exception
        for internal in ("<class", "Traceback", "TypeError", "positional", "Error"):
            self.assertNotIn(internal, fault.faultString)
        return fault.faultCode

    def test_codes(self):
        from xmlrpc.client import dumps
        self.assertEqual(self.fault(dumps((), "getUser")), finger.RPC_INVALID_PARAMS)
        self.assertEqual(self.fault(dumps(("a", "b"), "getUser")), finger.RPC_INVALID_PARAMS)
        self.assertEqual(self.fault(dumps((42,), "getUser")), finger.RPC_INVALID_PARAMS)
        self.assertEqual(self.fault(dumps((), "getUsers\u00e9")), finger.RPC_METHOD_NOT_FOUND)
        self.assertEqual(self.fault(dumps((), "__init__")), finger.RPC_METHOD_NOT_FOUND)
        self.assertEqual(self.fault(b"<methodCall><methodName>x"), finger.RPC_PARSE_ERROR)
        self.assertEqual(self.fault(b"<methodResponse/>"), finger.RPC_INVALID_REQUEST)
        self.assertEqual(self.fault(b"<methodCall><params/></methodCall>"),
                         finger.RPC_INVALID_REQUEST)
        self.assertEqual(self.fault(dumps(([1],), "system.methodHelp")),
                         finger.RPC_INVALID_PARAMS)
        self.assertEqual((finger.RPC_PARSE_ERROR, finger.RPC_INVALID_REQUEST,
                          finger.RPC_METHOD_NOT_FOUND, finger.RPC_INVALID_PARAMS,
                          finger.RPC_INTERNAL_ERROR), (-32700, -32600, -32601, -32602, -32603))

    def test_a_failing_back_end_is_an_internal_error(self):
        import xmlrpc.client
        site = finger.WebSite(BrokenDatabase())
        with self.assertLogs(finger.log, "ERROR"):
            body = site.handle("POST", "/RPC2", xmlrpc.client.dumps(("x",), "getUser")
                               .encode()).body
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            xmlrpc.client.loads(body)
        self.assertEqual((caught.exception.faultCode, caught.exception.faultString),
                         (finger.RPC_INTERNAL_ERROR, finger.INTERNAL_ERROR))

    def test_dtd_in_utf16_is_refused(self):
        address = web_service(self).address
        body = ('<?xml version="1.0" encoding="utf-16"?><!DOCTYPE x [<!ENTITY a "moshez">]>'
                "<methodCall><methodName>getUser</methodName><params><param><value>"
                "<string>&a;</string></value></param></params></methodCall>").encode("utf-16")
        self.assertEqual(http(address, "POST", "/RPC2", body=body)[0], 400)

# == 8. Perspective Broker ====================================================================

# Byte streams captured from a Twisted 26.10.0 client talking to a stock Twisted server,
# hex per send.  Needs no packages; TestPBInterop runs real Twisted.


PB_CAPTURE_CLIENT = [   # C>S, in order
    # b'pb'
    "02827062",
    # [b'version', 6]
    "028013870681",
    # [b'message', 1, b'root', b'getUser', 1, [b'tuple', [b'unicode', b'moshez']],...
    ("07801a8701810482726f6f74078267657455736572018102800b8702800782756e69636f646506826d6f7368"
     "657a01800587"),
    # [b'message', 2, b'root', b'getUsers', 1, [b'tuple'], [b'dictionary']]
    "07801a8702810482726f6f7408826765745573657273018101800b8701800587",
    # [b'message', 3, b'root', b'getUser', 1, [b'tuple'], [b'dictionary', [[b'unic...
    ("07801a8703810482726f6f74078267657455736572018101800b8702800587028002800782756e69636f6465"
     "0882757365726e616d6502800782756e69636f646506826d6f7368657a"),
    # [b'message', 4, b'root', b'getUser', 1, [b'tuple', [b'unicode', b'nobody']],...
    ("07801a8704810482726f6f74078267657455736572018102800b8702800782756e69636f646506826e6f626f"
     "647901800587"),
    # [b'message', 5, b'root', b'getUser', 1, [b'tuple', [b'unicode', b'moshez']],...
    ("07801a8705810482726f6f74078267657455736572018102800b8702800782756e69636f646506826d6f7368"
     "657a01800587"),
    # [b'message', 6, b'root', b'getUsers', 1, [b'tuple'], [b'dictionary']]
    "07801a8706810482726f6f7408826765745573657273018101800b8701800587",
    # [b'message', 7, b'root', b'noSuchMethod', 1, [b'tuple', 1], [b'dictionary']]
    "07801a8707810482726f6f740c826e6f537563684d6574686f64018102800b87018101800587",
    # [b'message', 8, b'root', b'getUser', 1, [b'tuple', [b'unicode', b'a'], [b'un...
    ("07801a8708810482726f6f74078267657455736572018104800b8702800782756e69636f6465018261028007"
     "82756e69636f646501826202800782756e69636f646501826301800587"),
    # [b'message', 9, b'root', b'echo', 1, [b'tuple', [b'None'], [b'boolean', b'tr...
    ("07801a8709810482726f6f7404826563686f018115800b870180018702800782626f6f6c65616e0482747275"
     "6502800782626f6f6c65616e058266616c7365008101817f8100018101837f7f7f7f07810000000008850000"
     "00000883010000000886843ff800000000000009827261772d6279746573088702800782756e69636f64650a"
     "82756e69636f64652dc3a903800887018102800887028103800b87018102800782756e69636f646501827403"
     "800587028002800782756e69636f646501826b01810280028101800187028003827365740781028005870280"
     "02800782756e69636f646502826b7702800782756e69636f6465018276"),
    # [b'message', 10, b'root', b'getUser', 1, [b'tuple', [b'unicode', b'moshez']]...
    ("07801a870a810482726f6f74078267657455736572018102800b8702800782756e69636f646506826d6f7368"
     "657a01800587"),
]

PB_CAPTURE_SERVER = [   # S>C, in order
    # [b'pb', b'none']
    "02800282706204826e6f6e65",
    # [b'version', 6]
    "028013870681",
    # [b'answer', 1, [b'unicode', b'Happy and well']]
    "03801b87018102800782756e69636f64650e82486170707920616e642077656c6c",
    # [b'answer', 2, [b'list', [b'unicode', b'moshez']]]
    "03801b8702810280088702800782756e69636f646506826d6f7368657a",
    # [b'answer', 3, [b'unicode', b'Happy and well']]
    "03801b87038102800782756e69636f64650e82486170707920616e642077656c6c",
    # [b'answer', 4, [b'unicode', b'No such user']]
    "03801b87048102800782756e69636f64650c824e6f20737563682075736572",
    # [b'answer', 5, [b'unicode', b'Happy and well']]
    "03801b87058102800782756e69636f64650e82486170707920616e642077656c6c",
    # [b'answer', 6, [b'list', [b'unicode', b'moshez']]]
    "03801b8706810280088702800782756e69636f646506826d6f7368657a",
    # [b'error', 7, [b'twisted.spread.pb.CopyableFailure', [b'dictionary', [[b'uni...
    ("03801c87078102802182747769737465642e7370726561642e70622e436f707961626c654661696c7572650b"
     "800587028002800782756e69636f64650582636f756e740581028002800782756e69636f6465048274797065"
     "2382747769737465642e7370726561642e666c61766f72732e4e6f537563684d6574686f6402800280078275"
     "6e69636f6465058276616c756502800782756e69636f646523824e6f2073756368206d6574686f643a207265"
     "6d6f74655f6e6f537563684d6574686f64028002800782756e69636f64650b82636170747572655661727302"
     "800782626f6f6c65616e058266616c7365028002800782756e69636f64650282746201800187028002800782"
     "756e69636f64651082756e7361666554726163656261636b7302800782626f6f6c65616e058266616c736502"
     "8002800782756e69636f64650782706172656e74730680088702800782756e69636f64652382747769737465"
     "642e7370726561642e666c61766f72732e4e6f537563684d6574686f6402800782756e69636f646517826275"
     "696c74696e732e4174747269627574654572726f7202800782756e69636f646512826275696c74696e732e45"
     "7863657074696f6e02800782756e69636f646516826275696c74696e732e42617365457863657074696f6e02"
     "800782756e69636f64650f826275696c74696e732e6f626a656374028002800782756e69636f646506826672"
     "616d657301800887028002800782756e69636f64650582737461636b01800887028002800782756e69636f64"
     "65098274726163656261636b02800782756e69636f6465168254726163656261636b20756e617661696c6162"
     "6c650a"),
    # [b'error', 8, [b'twisted.spread.pb.CopyableFailure', [b'dictionary', [[b'uni...
    ("03801c87088102802182747769737465642e7370726561642e70622e436f707961626c654661696c7572650b"
     "800587028002800782756e69636f64650582636f756e740781028002800782756e69636f6465048274797065"
     "12826275696c74696e732e547970654572726f72028002800782756e69636f6465058276616c756502800782"
     "756e69636f6465498246696e676572526f6f742e72656d6f74655f6765745573657228292074616b65732032"
     "20706f736974696f6e616c20617267756d656e7473206275742034207765726520676976656e028002800782"
     "756e69636f64650b82636170747572655661727302800782626f6f6c65616e058266616c7365028002800782"
     "756e69636f64650282746201800187028002800782756e69636f64651082756e736166655472616365626163"
     "6b7302800782626f6f6c65616e058266616c7365028002800782756e69636f64650782706172656e74730580"
     "088702800782756e69636f646512826275696c74696e732e547970654572726f7202800782756e69636f6465"
     "12826275696c74696e732e457863657074696f6e02800782756e69636f646516826275696c74696e732e4261"
     "7365457863657074696f6e02800782756e69636f64650f826275696c74696e732e6f626a6563740280028007"
     "82756e69636f646506826672616d657301800887028002800782756e69636f64650582737461636b01800887"
     "028002800782756e69636f6465098274726163656261636b02800782756e69636f6465168254726163656261"
     "636b20756e617661696c61626c650a"),
    # [b'answer', 9, [b'list', [b'list', [b'None'], [b'boolean', b'true'], [b'bool...
    ("03801b87098103800887158008870180018702800782626f6f6c65616e04827472756502800782626f6f6c65"
     "616e058266616c7365008101817f8100018101837f7f7f7f0781000000000885000000000883010000000886"
     "843ff800000000000009827261772d6279746573088702800782756e69636f64650a82756e69636f64652dc3"
     "a903800887018102800887028103800b87018102800782756e69636f64650182740380058702800280078275"
     "6e69636f646501826b0181028002810180018702800382736574078102800587028002800782756e69636f64"
     "6502826b7702800782756e69636f6465018276"),
    # [b'answer', 10, [b'unicode', b'Happy and well']]
    "03801b870a8102800782756e69636f64650e82486170707920616e642077656c6c",
]


def _unhex(text):
    return bytes.fromhex(text)


def _failure_state(expr):
    """["error", id, [CopyableFailure, dictionary]] -> the failure's state as a dict."""
    tag, state = expr[2]
    assert tag == b"twisted.spread.pb.CopyableFailure", tag
    return finger.unjelly(state)


def _decode_all(data):
    decoder = finger.BananaDecoder()
    expressions = decoder.feed(data)
    assert decoder.idle, "left over: %r" % data[-20:]
    return expressions

PB_USERS = {"moshez": "Happy and well"}


class PBTestClient:
    """A minimal stdlib PB client made of finger's codec, for the tests: dialect pick and
    version like Twisted's PBClientFactory, then calls on the root object."""

    def __init__(self, test, address, dialect=b"pb"):
        self.sock = connect(test, address)
        self.decoder = finger.BananaDecoder()
        self.received = []
        self.replies = {}
        self.next_id = 0
        self.greeting = self.read()
        self.sock.sendall(finger.banana_encode(dialect) +
                          finger.banana_encode([b"version", 6], vocab=True))

    def read(self):
        """The next expression from the server; None once it has closed the connection."""
        for _ in range(10000):
            if self.received:
                return self.received.pop(0)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.received.extend(self.decoder.feed(data))
        raise AssertionError("no whole expression in 10000 reads")

    def send_call(self, method, *args, answer=True, **kwargs):
        self.next_id += 1
        self.sock.sendall(finger.banana_encode(
            [b"message", self.next_id, b"root", method.encode(), int(answer),
             finger.jelly(args), finger.jelly(kwargs)], vocab=True))
        return self.next_id

    def reply(self, request_id):
        """("answer", value) or ("error", failure state) for `request_id`."""
        for _ in range(1000):
            if request_id in self.replies:
                return self.replies.pop(request_id)
            expr = self.read()
            if expr is None:
                raise EOFError("the server closed the connection")
            if expr[0] == b"answer":
                self.replies[expr[1]] = ("answer", finger.unjelly(expr[2]))
            elif expr[0] == b"error":
                self.replies[expr[1]] = ("error", _failure_state(expr))
        raise AssertionError("no reply to %d" % request_id)

    def call(self, method, *args, **kwargs):
        return self.reply(self.send_call(method, *args, **kwargs))


def pb_service(test, db=None, **options):
    db = db if db is not None else finger.MemoryDatabase(PB_USERS)
    service = finger.TCPService(finger.PBProtocol(db), (LOCALHOST, 0), **options)
    start(test, service)
    return service


def dropped(sock, timeout=TIMEOUT):
    """True when the server closes `sock` within `timeout` (what it sent is ignored)."""
    sock.settimeout(timeout)
    try:
        for _ in range(10000):
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return False


class TestBanana(unittest.TestCase):
    NUMBERS = [   # value, bytes Twisted sends (pb-wire.md section 1)
        (0, "0081"), (6, "0681"), (127, "7f81"), (128, "000181"), (300, "2c0281"),
        (2 ** 31 - 1, "7f7f7f7f0781"), (2 ** 31, "0000000008" "85"), (-1, "0183"),
        (-2 ** 31, "0000000008" "83"), (-2 ** 31 - 1, "0100000008" "86"),
        (1.5, "843ff8000000000000"), (2 ** 447, "00" * 63 + "40" "85")]

    def test_numbers_both_ways(self):
        for value, wire in self.NUMBERS:
            with self.subTest(value=value):
                self.assertEqual(finger.banana_encode(value).hex(), wire)
                self.assertEqual(_decode_all(_unhex(wire)), [value])

    def test_receiver_reads_int_and_longint_alike_and_neg_and_longneg_alike(self):
        self.assertEqual(_decode_all(_unhex("05000000088100000000088501830186")),
                         [2 ** 31 + 5, 2 ** 31, -1, -1])
        self.assertEqual(_decode_all(b"\x81"), [0])           # no digits: zero

    def test_numbers_of_448_bits_and_more_are_refused_when_sending(self):
        with self.assertRaises(finger.PBError):
            finger.banana_encode(2 ** 448)
        with self.assertRaises(finger.PBError):
            finger.banana_encode(-2 ** 448)

    def test_strings_lists_and_the_dialect_offer(self):
        offer = finger.banana_encode([b"pb", b"none"])
        self.assertEqual(offer.hex(), "0280" "02827062" "04826e6f6e65")
        self.assertEqual(_decode_all(offer), [[b"pb", b"none"]])
        self.assertEqual(finger.banana_encode([]).hex(), "0080")
        self.assertEqual(finger.banana_encode(b"").hex(), "0082")
        self.assertEqual(finger.banana_encode([[], [[b"x"]]]).hex(), "0280" "0080" "0180"
                         "0180" "018278")
        self.assertEqual(_decode_all(_unhex("0280008001800180018278")), [[[], [[b"x"]]]])
        self.assertEqual(_decode_all(b"\x00\x80\x00\x80"), [[], []])   # empty lists: at once

    def test_vocabulary(self):
        self.assertEqual(len(finger.PB_VOCAB), 32)
        for index, word in enumerate(finger.PB_VOCAB[1:], 1):
            with self.subTest(word=word):
                self.assertEqual(_decode_all(bytes([index, 0x87])), [word])
                self.assertEqual(finger.banana_encode(word, vocab=True), bytes([index, 0x87]))
                self.assertEqual(finger.banana_encode(word)[-len(word):], word)
        self.assertEqual(finger.banana_encode([b"version", 6], vocab=True).hex(),
                         "0280" "1387" "0681")
        self.assertEqual(finger.banana_encode([b"version", 6]).hex(),
                         "0280" "07827665727369" "6f6e" "0681")
        for word in (b"unicode", b"boolean", b"root"):       # not in the vocabulary
            self.assertEqual(finger.banana_encode(word, vocab=True)[1:2], b"\x82")

    def test_what_is_not_banana_is_refused_when_sending(self):
        for value in ("text", True, None, {1: 2}, object()):
            with self.subTest(value=value), self.assertRaises(finger.PBError):
                finger.banana_encode(value)

    def test_prefix_of_64_digits_is_accepted_65_refused_finished_or_not(self):
        self.assertEqual(_decode_all(b"\x00" * 63 + b"\x01\x81"), [2 ** 441])
        for data in (b"\x00" * 65 + b"\x81", b"\x00" * 65):
            with self.subTest(len=len(data)), self.assertRaises(finger.PBError):
                finger.BananaDecoder().feed(data)
        decoder = finger.BananaDecoder()
        self.assertEqual(decoder.feed(b"\x00" * 64), [])             # may still end
        self.assertFalse(decoder.idle)
        with self.assertRaises(finger.PBError):
            decoder.feed(b"\x00")

    def test_size_limit_on_lists_and_strings(self):
        limit = finger.BANANA_SIZE_LIMIT
        self.assertEqual(limit, 655360)
        string = finger.banana_encode(b"x" * limit)
        self.assertEqual(_decode_all(string), [b"x" * limit])
        for kind in (b"\x80", b"\x82"):
            with self.subTest(kind=kind), self.assertRaises(finger.PBError):
                finger.BananaDecoder().feed(finger.banana_encode(limit + 1)[:-1] + kind)
        with self.assertRaises(finger.PBError):
            finger.banana_encode(b"x" * (limit + 1))
        with self.assertRaises(finger.PBError):
            finger.banana_encode([0] * (limit + 1))

    def test_unknown_type_bytes_and_vocabulary_indices_are_refused(self):
        for data in (b"\x88", b"\x01\xff", b"\x00\x87", b"\x20\x87", b"\x01\x84" + b"\0" * 8):
            with self.subTest(data=data), self.assertRaises(finger.PBError):
                finger.BananaDecoder().feed(data)

    def test_nesting_is_capped(self):
        depth = finger.BANANA_MAX_DEPTH
        value = [b"deep"]
        for _ in range(depth - 1):
            value = [value]
        self.assertEqual(_decode_all(finger.banana_encode(value)), [value])
        with self.assertRaises(finger.PBError):
            finger.BananaDecoder().feed(finger.banana_encode([value]))
        with self.assertRaises(finger.PBError):
            finger.BananaDecoder().feed(b"\x01\x80" * 100000)   # no recursion either way

    def test_one_expression_is_capped_the_stream_is_not(self):
        decoder = finger.BananaDecoder(max_message=1000)
        small = finger.banana_encode([b"x" * 400])
        for _ in range(10):
            self.assertEqual(decoder.feed(small), [[b"x" * 400]])
        with self.assertRaises(finger.PBError):
            decoder.feed(finger.banana_encode([b"x" * 400, b"y" * 400, b"z" * 400]))
        with self.assertRaises(finger.PBError):                  # also when it is unfinished
            finger.BananaDecoder(max_message=1000).feed(b"\x03\x80" + small * 3)

    def test_capture_expressions_reencode_to_the_same_bytes(self):
        for chunk in PB_CAPTURE_CLIENT + PB_CAPTURE_SERVER:
            data = _unhex(chunk)
            expressions = _decode_all(data)
            self.assertEqual(b"".join(finger.banana_encode(e, vocab=True)
                                      for e in expressions), data)
            plain = b"".join(finger.banana_encode(e) for e in expressions)
            self.assertEqual(_decode_all(plain), expressions)


class TestBananaSplits(unittest.TestCase):
    def check_splits(self, stream):
        whole = _decode_all(stream)
        decoder = finger.BananaDecoder()
        one_by_one = []
        for index in range(len(stream)):
            one_by_one += decoder.feed(stream[index:index + 1])
        self.assertTrue(decoder.idle)
        self.assertEqual(one_by_one, whole)
        chance = random.Random(7)
        for _ in range(50):
            decoder, pieces, position = finger.BananaDecoder(), [], 0
            while position < len(stream):
                step = chance.randint(1, 40)
                pieces += decoder.feed(stream[position:position + step])
                position += step
            self.assertEqual(pieces, whole)
        return whole

    def test_the_captured_client_stream_byte_by_byte_and_in_random_pieces(self):
        whole = self.check_splits(_unhex("".join(PB_CAPTURE_CLIENT)))
        self.assertEqual(len(whole), 12)
        self.assertEqual(whole[0], b"pb")
        self.assertEqual(whole[2][:5], [b"message", 1, b"root", b"getUser", 1])

    def test_the_captured_server_stream_byte_by_byte_and_in_random_pieces(self):
        self.assertEqual(len(self.check_splits(_unhex("".join(PB_CAPTURE_SERVER)))), 12)

    def test_idle_only_between_expressions(self):
        decoder = finger.BananaDecoder()
        message = _unhex(PB_CAPTURE_CLIENT[2])
        for index in range(len(message) - 1):
            decoder.feed(message[index:index + 1])
            self.assertFalse(decoder.idle)
        decoder.feed(message[-1:])
        self.assertTrue(decoder.idle)


class TestJelly(unittest.TestCase):
    def test_the_captured_echo_arguments(self):
        message = _decode_all(_unhex(PB_CAPTURE_CLIENT[10]))[0]
        self.assertEqual(message[3], b"echo")
        self.assertEqual(finger.unjelly(message[5]), (
            None, True, False, 0, 1, 127, 128, -1, 2 ** 31 - 1, 2 ** 31, -2 ** 31,
            -2 ** 31 - 1, 1.5, b"raw-bytes", b"list", "unicode-\xe9", [1, [2]], (1, "t"),
            {"k": 1, 2: None}, {7}))
        self.assertEqual(finger.unjelly(message[6]), {"kw": "v"})

    def test_answers_jelly_as_twisted_does(self):
        self.assertEqual(finger.jelly("Happy and well"), [b"unicode", b"Happy and well"])
        self.assertEqual(finger.jelly(["moshez"]), [b"list", [b"unicode", b"moshez"]])
        self.assertEqual(finger.jelly([]), [b"list"])
        self.assertEqual(finger.jelly((None, True, {})),
                         [b"tuple", [b"None"], [b"boolean", b"true"], [b"dictionary"]])
        answer = finger.banana_encode([b"answer", 2, finger.jelly(["moshez"])], vocab=True)
        self.assertEqual(answer, _unhex(PB_CAPTURE_SERVER[3]))
        value = (None, True, False, -2 ** 40, 1.5, b"list", "\xe9", [1, [2]], {"k": (1,)},
                 {3}, frozenset([4]))
        self.assertEqual(finger.unjelly(finger.jelly(value)), value)

    def test_hashed_values_from_the_wire_cannot_be_chosen_to_collide(self):
        colliding = [k * (2 ** 61 - 1) for k in range(1, 4)]       # hash() is 0 for each
        self.assertEqual({hash(value) for value in colliding}, {0})
        for sexp in ([b"set"] + colliding, [b"frozenset"] + colliding,
                     [b"dictionary"] + [[value, 1] for value in colliding],
                     [b"dictionary", [[b"tuple", 1, 2], 1]], [b"set", 1.5],
                     [b"set", [b"reference", 10 ** 30, b"x"]]):
            with self.subTest(sexp=sexp[:2]), self.assertRaises(finger.JellyError):
                finger.unjelly(sexp)
        self.assertEqual(finger.unjelly([b"set", 7, b"b", [b"unicode", b"s"], -2 ** 59]),
                         {7, b"b", "s", -2 ** 59})

    def test_references_without_cycles(self):
        shared = [b"reference", 1, [b"list", 1, 2]]
        self.assertEqual(finger.unjelly([b"tuple", shared, [b"dereference", 1]]),
                         ([1, 2], [1, 2]))
        with self.assertRaises(finger.JellyError):      # a cycle: refused, not looped
            finger.unjelly([b"reference", 1, [b"list", [b"dereference", 1]]])

    def test_shared_values_count_at_each_use(self):
        bomb = [b"reference", 0, [b"tuple", 1]]
        for level in range(1, 40):
            bomb = [b"reference", level, [b"tuple", bomb] + [[b"dereference", level - 1]] * 9]
        started = time.monotonic()
        with self.assertRaises(finger.JellyError):
            finger.unjelly([b"dictionary", [bomb, 1]])
        self.assertLess(time.monotonic() - started, 2.0)

    def test_what_is_refused(self):
        for sexp in ([b"twisted.spread.pb.CopyableFailure", [b"dictionary"]],
                     [b"unicode", b"\xff"], [b"unicode"], [b"boolean", b"maybe"], [],
                     [1, 2], [b"dictionary", [[b"list"], 1]], [b"set", [b"list"]],
                     [b"dictionary", [1]], [b"dereference", 9]):
            with self.subTest(sexp=sexp), self.assertRaises(finger.JellyError):
                finger.unjelly(sexp)


class TestPBSession(unittest.TestCase):
    """The PB session fed bytes directly: no sockets."""

    def session(self, db=None):
        db = db if db is not None else finger.MemoryDatabase(PB_USERS)
        return finger.PBProtocol(db).new_session(("127.0.0.1", 1234))

    def test_one_call_is_bounded_in_bytes_and_elements(self):
        call = finger.banana_encode([b"message", 1, b"root", b"getUser", 1,
                                     [b"tuple", [b"unicode", b"x" * 60000]], [b"dictionary"]])
        self.assertLess(len(call), finger.PB_MAX_CALL)
        session = self.session()
        session.feed(b"\x02\x82pb" + finger.banana_encode([b"version", 6]))
        self.assertEqual(len(_decode_all(session.feed(call))), 1)          # an answer
        for data in (call[:-1] + b"x" * 6000,                               # too long
                     b"\x01\x80" * 2 + b"\x80" * (finger.PB_MAX_VALUES + 1)):   # too many
            with self.subTest(len=len(data)), self.assertRaises(finger.PBError):
                session = self.session()
                session.feed(b"\x02\x82pb")
                session.feed(data)

    def test_unfinished_calls_of_all_clients_share_one_budget(self):
        budget = finger.ByteBudget(100000)
        sessions = [finger.PBProtocol(finger.MemoryDatabase(PB_USERS)).new_session(None)
                    for _ in range(3)]
        for session in sessions:
            # private: no public way to see it
            session._budget = budget
        unfinished = b"\x02\x82pb" + b"\x01\x80" + finger.banana_encode(40000)[:-1] + b"\x82"
        sessions[0].feed(unfinished + b"x" * 39000)
        sessions[1].feed(unfinished + b"x" * 39000)
        self.assertGreater(budget.used, 78000)
        with self.assertRaises(finger.PBError):
            sessions[2].feed(unfinished + b"x" * 39000)         # over it: this one goes
        for session in sessions:
            session.close()
        self.assertEqual(budget.used, 0)

    def test_greeting_offers_pb_and_none(self):
        self.assertEqual(self.session().greeting(), _unhex(PB_CAPTURE_SERVER[0]))
        self.assertEqual(finger.PBProtocol.name, "pb")
        self.assertTrue(issubclass(finger.PBProtocol, finger.SessionProtocol))

    def test_replaying_the_capture_gives_twisteds_answers_byte_for_byte(self):
        session = self.session()
        replies = b"".join(session.feed(_unhex(chunk)) for chunk in PB_CAPTURE_CLIENT)
        expected = [_unhex(PB_CAPTURE_SERVER[i]) for i in (1, 2, 3, 4, 5, 6, 7)]
        ours = _decode_all(replies)
        self.assertEqual(len(ours), 11)                  # version, 6 answers, 3 errors, 1
        self.assertEqual(b"".join(finger.banana_encode(e, vocab=True) for e in ours[:7]),
                         b"".join(expected))
        self.assertEqual(finger.banana_encode(ours[10], vocab=True),
                         _unhex(PB_CAPTURE_SERVER[11]))
        theirs = _decode_all(_unhex(PB_CAPTURE_SERVER[8]))[0]
        self.assertEqual(ours[7][:2], [b"error", 7])
        mine, twisted = _failure_state(ours[7]), _failure_state(theirs)
        del mine["count"], twisted["count"]
        self.assertEqual(mine, twisted)
        state = _failure_state(ours[8])
        self.assertEqual(state["type"], b"builtins.TypeError")
        self.assertEqual(state["parents"], ["builtins.TypeError", "builtins.Exception",
                                            "builtins.BaseException", "builtins.object"])
        self.assertRegex(state["value"],
                         r"remote_getUser\(\) takes 2 positional arguments but 4 were given")
        self.assertEqual(_failure_state(ours[9])["value"], "No such method: remote_echo")
        self.assertTrue(session.idle)

    def test_the_whole_capture_in_one_read_and_byte_by_byte(self):
        stream = _unhex("".join(PB_CAPTURE_CLIENT))
        whole = self.session().feed(stream)
        session = self.session()
        self.assertEqual(b"".join(session.feed(stream[i:i + 1]) for i in range(len(stream))),
                         whole)

    def test_answer_required_false_gets_no_answer_and_housekeeping_is_silent(self):
        session = self.session()
        session.feed(_unhex(PB_CAPTURE_CLIENT[0] + PB_CAPTURE_CLIENT[1]))
        for message in ([b"message", 1, b"root", b"getUser", 0, [b"tuple", b"moshez"],
                         [b"dictionary"]],
                        [b"message", 2, b"root", b"nope", 0, [b"tuple"], [b"dictionary"]],
                        [b"decref", 3], [b"decache", 4], [b"uncache", 5],
                        [b"didNotUnderstand", b"x"], [b"version", 6]):
            with self.subTest(message=message):
                self.assertEqual(session.feed(finger.banana_encode(message, vocab=True)), b"")
        self.assertEqual(_decode_all(session.feed(finger.banana_encode([b"bogus", 1]))),
                         [[b"didNotUnderstand", b"bogus"]])

    def test_bytes_names_kwargs_and_defanged_statuses(self):
        db = finger.MemoryDatabase({"moshez": "Happy and well", "evil": "\x1b[2Jgone\r\nx",
                                    "caf\xe9": "ok"})
        session = self.session(db)
        session.feed(b"\x02\x82pb")

        def call(request_id, method, args, kwargs=()):
            expr = _decode_all(session.feed(finger.banana_encode(
                [b"message", request_id, b"root", method, 1, finger.jelly(tuple(args)),
                 finger.jelly(dict(kwargs))])))[-1]
            self.assertEqual(expr[:2], [b"answer", request_id])
            return finger.unjelly(expr[2])

        self.assertEqual(call(1, b"getUser", [b"moshez"]), "Happy and well")
        self.assertEqual(call(2, b"getUser", [], {"username": "moshez"}), "Happy and well")
        self.assertEqual(call(3, b"getUser", ["nobody"]), "No such user")
        self.assertEqual(call(4, b"getUser", ["evil"]), "^[[2Jgone\nx")
        self.assertEqual(call(5, b"getUser", ["caf\xe9".encode()]), "ok")
        self.assertEqual(call(6, b"getUsers", []), ["caf\xe9", "evil", "moshez"])
        kwargs = finger.jelly({"username": "moshez"})
        kwargs[1][0] = b"username"                       # a bytes key works as well
        expr = _decode_all(session.feed(finger.banana_encode(
            [b"message", 7, b"root", b"getUser", 1, [b"tuple"], kwargs])))[0]
        self.assertEqual(finger.unjelly(expr[2]), "Happy and well")

    def test_every_failing_call_is_answered_and_the_session_goes_on(self):
        session = self.session(BrokenDatabase())
        session.feed(b"\x02\x82pb")
        calls = [  # object id, method, args, kwargs -> type, value
            (b"root", b"getUser", [b"tuple", 1], [b"dictionary"],
             "builtins.TypeError", "username must be str or bytes, not int"),
            (b"root", b"getUser", [b"tuple"], [b"dictionary", [[b"unicode", b"x"], 1]],
             "builtins.TypeError", "unexpected keyword argument 'x'"),
            (b"root", b"getUser", [b"tuple", b"moshez"], [b"dictionary"],
             "finger.InternalError", finger.INTERNAL_ERROR),
            (b"root", b"get\x1bUser", [b"tuple"], [b"dictionary"],
             "twisted.spread.flavors.NoSuchMethod", "No such method: remote_get^[User"),
            (b"root", b"__init__", [b"tuple"], [b"dictionary"],
             "twisted.spread.flavors.NoSuchMethod", "No such method: remote___init__"),
            (7, b"getUser", [b"tuple"], [b"dictionary"],
             "twisted.spread.pb.Error", "Invalid Object ID"),
            (b"root", b"getUsers", [b"tuple", [b"os.system", b"rm"]], [b"dictionary"],
             "twisted.spread.jelly.InsecureJelly", "cannot unjelly"),
            (b"root", b"getUsers", [b"dictionary"], [b"dictionary"],
             "twisted.spread.jelly.InsecureJelly", "must be a tuple"),
        ]
        with self.assertLogs("finger", "ERROR") as logs:
            for request_id, (object_id, method, args, kwargs, kind, value) in enumerate(
                    calls, 1):
                with self.subTest(method=method, args=args):
                    expr = _decode_all(session.feed(finger.banana_encode(
                        [b"message", request_id, object_id, method, 1, args, kwargs])))[0]
                    self.assertEqual(expr[:2], [b"error", request_id])
                    state = _failure_state(expr)
                    self.assertEqual(state["type"], kind.encode())
                    self.assertIn(value, state["value"])
                    self.assertEqual(state["parents"][0], kind)
                    self.assertEqual(state["parents"][-1], "builtins.object")
                    self.assertEqual(state["traceback"], "Traceback unavailable\n")
        self.assertIn("the database is on fire", "\n".join(logs.output))
        expr = _decode_all(session.feed(finger.banana_encode(
            [b"cachemessage", 99, 1, b"x", 1, [b"tuple"], [b"dictionary"]])))[0]
        self.assertEqual(expr[:2], [b"error", 99])

    def test_protocol_errors_raise_pberror(self):
        for stream in (b"\x04\x82json",                              # unknown dialect
                       b"\x00\x81",                                  # not a dialect at all
                       b"\x02\x82pb\x02\x80\x13\x87\x05\x81",        # version 5
                       b"\x02\x82pb\x00\x80",                        # empty message
                       b"\x02\x82pb\x05\x81",                        # not a list
                       b"\x02\x82pb\x02\x80\x1a\x87\x01\x81"):       # message of 1 field
            with self.subTest(stream=stream), self.assertRaises(finger.PBError):
                self.session().feed(stream)

    def test_the_none_dialect_gets_no_vocabulary(self):
        session = self.session()
        self.assertEqual(session.feed(b"\x04\x82none"), _unhex("028007827665727369" "6f6e0681"))
        reply = session.feed(finger.banana_encode(
            [b"message", 1, b"root", b"getUsers", 1, [b"tuple"], [b"dictionary"]]))
        self.assertNotIn(b"\x87", reply)
        self.assertEqual(_decode_all(reply), [[b"answer", 1, [b"list", [b"unicode", b"moshez"]]]])


class TestPBServer(unittest.TestCase):
    """The PB front-end in a TCPService, over real sockets."""

    def test_the_captured_client_bytes_over_a_socket(self):
        service = pb_service(self)
        sock = connect(self, service.address)
        decoder, expressions = finger.BananaDecoder(), []
        for chunk in PB_CAPTURE_CLIENT:
            sock.sendall(_unhex(chunk))
        for _ in range(1000):
            if len(expressions) == 12:
                break
            data = sock.recv(65536)
            self.assertTrue(data, "closed after %d expressions" % len(expressions))
            expressions += decoder.feed(data)
        self.assertEqual(expressions[0], [b"pb", b"none"])
        self.assertEqual([e[:2] for e in expressions[1:]],
                         [[b"version", 6]] + [[b"answer", n] for n in range(1, 7)] +
                         [[b"error", 7], [b"error", 8], [b"error", 9], [b"answer", 10]])
        self.assertEqual(finger.banana_encode(expressions[2], vocab=True),
                         _unhex(PB_CAPTURE_SERVER[2]))
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(sock.recv(100), b"")

    def test_stdlib_client_calls_and_two_in_flight(self):
        client = PBTestClient(self, pb_service(self).address)
        self.assertEqual(client.greeting, [b"pb", b"none"])
        self.assertEqual(client.call("getUser", "moshez"), ("answer", "Happy and well"))
        self.assertEqual(client.call("getUsers"), ("answer", ["moshez"]))
        self.assertEqual(client.call("getUser", username="moshez"),
                         ("answer", "Happy and well"))
        first, second = client.send_call("getUsers"), client.send_call("getUser", b"nobody")
        self.assertEqual(client.reply(second), ("answer", "No such user"))
        self.assertEqual(client.reply(first), ("answer", ["moshez"]))
        kind, state = client.call("noSuchMethod", 1)
        self.assertEqual((kind, state["type"]), ("error", b"twisted.spread.flavors.NoSuchMethod"))
        client.send_call("getUser", "moshez", answer=False)
        self.assertEqual(client.call("getUser", "moshez"), ("answer", "Happy and well"))
        self.assertEqual((client.replies, client.received), ({}, []))   # none to pbanswer=0

    def test_a_dropped_client_gives_its_unfinished_call_back(self):
        service = pb_service(self, timeout=0.5)
        sock = connect(self, service.address)
        sock.sendall(b"\x02\x82pb\x01\x80" + finger.banana_encode(30000)[:-1] + b"\x82" +
                     b"x" * 20000)
        wait_until(lambda: service.protocol.pending.used >= 20000)
        sock.close()
        wait_until(lambda: service.protocol.pending.used == 0)
        sock = connect(self, service.address)                   # and at its deadline too
        sock.sendall(b"\x02\x82pb\x01\x80" + b"\x01\x80" * 50)
        wait_until(lambda: service.protocol.pending.used > 0)
        self.assertTrue(dropped(sock))
        wait_until(lambda: service.protocol.pending.used == 0)

    def test_warnings_about_peers_are_short_and_few(self):
        service = pb_service(self)
        garbage = finger.banana_encode(b"x" * 60000)          # an "unknown dialect"
        with self.assertLogs("finger", "WARNING") as logs:
            for _ in range(100):
                ask_or_reset(service.address, garbage)
        self.assertLess(len(logs.output), 50)
        self.assertLess(max(len(line) for line in logs.output), 400)
        self.assertIn("unknown dialect b'xxx", logs.output[0])

    def test_hostile_input_drops_only_that_connection(self):
        service = pb_service(self, timeout=1.0)
        bystander = PBTestClient(self, service.address)
        self.assertEqual(bystander.call("getUsers"), ("answer", ["moshez"]))
        limit = finger.BANANA_SIZE_LIMIT
        chance = random.Random(1288)
        garbage = bytes(chance.randrange(256) for _ in range(300))
        cases = {
            "prefix over 64 digits": b"\x02\x82pb" + b"\x01" * 65 + b"\x81",
            "unfinished prefix over 64 digits": b"\x02\x82pb" + b"\x01" * 80,
            "list over the limit": b"\x02\x82pb" + finger.banana_encode(limit + 1)[:-1] +
            b"\x80",
            "string over the limit": b"\x02\x82pb" + finger.banana_encode(limit + 1)[:-1] +
            b"\x82",
            "unknown type byte": b"\x02\x82pb\x01\x88",
            "unknown dialect": b"\x04\x82json",
            "too deep": b"\x02\x82pb" + b"\x01\x80" * (finger.BANANA_MAX_DEPTH + 1),
            "random garbage": garbage,
        }
        for name, data in cases.items():
            with self.subTest(name):
                sock = connect(self, service.address)
                with self.assertLogs("finger", "INFO"):
                    sock.sendall(data)
                    self.assertTrue(dropped(sock))
                self.assertEqual(bystander.call("getUser", "moshez"),
                                 ("answer", "Happy and well"))
        self.assertEqual(PBTestClient(self, service.address).call("getUsers"),
                         ("answer", ["moshez"]))

    def test_half_a_message_then_hang_up(self):
        service = pb_service(self)
        bystander = PBTestClient(self, service.address)
        sock = connect(self, service.address)
        stream = _unhex("".join(PB_CAPTURE_CLIENT[:3]))
        sock.sendall(stream[:-10])
        sock.shutdown(socket.SHUT_WR)
        self.assertTrue(dropped(sock))
        wait_until(lambda: service.open_connections() == 1)
        self.assertEqual(bystander.call("getUser", "moshez"), ("answer", "Happy and well"))
        self.assertEqual(PBTestClient(self, service.address).call("getUser", "moshez"),
                         ("answer", "Happy and well"))

    def test_a_dropped_client_leaves_nothing_behind(self):
        import gc
        import weakref
        service = pb_service(self)
        sock = connect(self, service.address)
        sock.sendall(b"\x02\x82pb" + b"\x01\x80" * 60)        # a call left unfinished
        wait_until(lambda: service.connections() and not service.connections()[0].session.idle)
        session = weakref.ref(service.connections()[0].session)
        gc.disable()                          # freed at once, not by a collection some day
        self.addCleanup(gc.enable)
        sock.close()
        wait_until(lambda: session() is None)

    def test_idle_and_slow_peers_are_dropped_at_the_timeout(self):
        clock = TestClock()
        service = pb_service(self, timeout=10, clock=clock)
        busy = PBTestClient(self, service.address)
        idle = PBTestClient(self, service.address)
        slow = connect(self, service.address)
        slow.sendall(_unhex(PB_CAPTURE_CLIENT[0] + PB_CAPTURE_CLIENT[1])[:3])
        web = connect(self, service.address)
        web.sendall(b"GET / HTTP/1.0\r\n\r\n")     # all prefix digits: waits for more
        for _ in range(4):                          # active for longer than the timeout
            clock.advance(service, 5)
            self.assertEqual(busy.call("getUsers"), ("answer", ["moshez"]))
        self.assertTrue(dropped(slow))
        self.assertTrue(dropped(web))
        self.assertEqual(idle.read(), [b"version", 6])
        self.assertIsNone(idle.read())

    def test_finger_py_serve_pb(self):
        server = ServerProcess(self, "--backend", "memory", "--status", "moshez=Happy and well",
                               "--finger", "off", "--web", "off", "--setter", "off",
                               "--pb", "127.0.0.1:0")
        client = PBTestClient(self, server.address("pb"))
        self.assertEqual(client.call("getUser", "moshez"), ("answer", "Happy and well"))
        self.assertEqual(client.call("getUsers"), ("answer", ["moshez"]))

    def test_many_clients_at_once(self):
        service = pb_service(self)
        results = []

        def run():
            client = PBTestClient(self, service.address)
            ids = [client.send_call("getUser", "moshez") for _ in range(10)]
            results.append([client.reply(i) for i in ids])

        threads = [threading.Thread(target=run) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        self.assertEqual(results, [[("answer", "Happy and well")] * 10] * 8)

    def test_pb_connection_over_the_cap_does_not_kill_the_service(self):
        service = pb_service(self, max_connections=1)
        first = PBTestClient(self, service.address)
        extra = connect(self, service.address)
        extra.sendall(b"\x02\x82pb")
        self.assertTrue(dropped(extra))
        self.assertEqual(first.call("getUser", "moshez"), ("answer", "Happy and well"))
        self.assertTrue(service.alive())

    def test_a_slow_pb_lookup_does_not_stall_other_pb_clients(self):
        db = SlowDatabase()
        service = pb_service(self, db)
        slow = PBTestClient(self, service.address)
        call = slow.send_call("getUser", "slow")
        self.assertTrue(db.waiting.acquire(timeout=TIMEOUT))
        other = PBTestClient(self, service.address)           # greeted meanwhile
        self.assertEqual(other.call("getUser", "moshez"), ("answer", "Happy and well"))
        db.release.set()
        self.assertEqual(slow.reply(call), ("answer", "finally"))
        self.assertEqual(slow.call("getUser", "moshez"), ("answer", "Happy and well"))

    def test_a_pb_call_after_idling_is_not_cut_by_a_slow_lookup(self):
        db = SlowDatabase()
        clock = TestClock()
        service = pb_service(self, db, timeout=10, clock=clock)
        client = PBTestClient(self, service.address)
        clock.advance(service, 8)                 # idle for most of the timeout
        call = client.send_call("getUser", "slow")
        self.assertTrue(db.waiting.acquire(timeout=TIMEOUT))
        clock.advance(service, 5)                 # the lookup runs past the old deadline
        db.release.set()
        self.assertEqual(client.reply(call), ("answer", "finally"))

# == 9. the finger client =====================================================================

class TestForwarding(unittest.TestCase):
    def setUp(self):
        self.target = finger_service(self, finger.MemoryDatabase(
            {"moshez": "Happy and well", "evil": "\x1b[2Jgone"})).address

    def forwarding_service(self, ports=None, **options):
        forwarder = finger.Forwarder(ports or (79, self.target[1]), timeout=2)
        protocol = finger.FingerProtocol(finger.MemoryDatabase({"local": "here"}),
                                         forwarder=forwarder, **options)
        service = finger.TCPService(protocol, (LOCALHOST, 0))
        start(self, service)
        return service.address

    def test_forward_user_at_host(self):
        address = self.forwarding_service()
        target = b"127.0.0.1:%d" % self.target[1]
        self.assertEqual(ask(address, b"moshez@" + target + b"\r\n"), b"Happy and well\r\n")
        self.assertEqual(ask(address, b"evil@" + target + b"\r\n"), b"^[[2Jgone\r\n")
        self.assertEqual(ask(address, b"@" + target + b"\r\n"),
                         b"evil  ^[[2Jgone\r\nmoshez  Happy and well\r\n")
        self.assertEqual(ask(address, b"local\r\n"), b"here\r\n")   # local names stay local

    def test_forwarding_to_ourselves_is_refused(self):
        port = free_port()
        options = finger.default_options(
            users=write_file(self, USERS), finger="127.0.0.1:%d" % port, web="off",
            setter="off", forward=True, forward_ports=(port,), workers=4)
        group = finger.build_services(options)
        group.start()
        self.addCleanup(group.stop)
        address = (LOCALHOST, port)
        for query in (b"moshez@127.0.0.1:%d" % port, b"moshez@localhost:%d" % port,
                      b"moshez@127.0.0.1:%d@127.0.0.1:%d@127.0.0.1:%d" % (port, port, port),
                      b"moshez@[::ffff:127.0.0.1]:%d" % port, b"moshez@0.0.0.0:%d" % port):
            with self.subTest(query=query):
                self.assertEqual(ask(address, query + b"\r\n"),
                                 b"Forwarding to this server itself is not allowed\r\n")
        # private: no public way to see it
        self.assertEqual(group.by_name("finger").protocol.forwarder._slots._value, 2)

    def test_forwards_waiting_on_other_servers_never_hold_every_worker(self):
        silent = socket.socket()                     # accepts (backlog), never answers
        self.addCleanup(silent.close)
        silent.bind((LOCALHOST, 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        forwarder = finger.Forwarder((port,), timeout=0.5, max_concurrent=1)
        protocol = finger.FingerProtocol(finger.MemoryDatabase({"local": "here"}),
                                         forwarder=forwarder)
        service = finger.TCPService(protocol, (LOCALHOST, 0), workers=2)
        start(self, service)
        waiting = threading.Thread(target=ask, args=(service.address,
                                                     b"a@127.0.0.1:%d\r\n" % port))
        waiting.start()
        self.addCleanup(waiting.join)
        # private: no public way to see it
        wait_until(lambda: forwarder._slots._value == 0)
        self.assertEqual(ask(service.address, b"b@127.0.0.1:%d\r\n" % port),
                         b"Server busy, try again later\r\n")
        self.assertEqual(ask(service.address, b"local\r\n"), b"here\r\n")

    def test_outbound_rules(self):
        address = self.forwarding_service(ports=(79,))
        target = b"127.0.0.1:%d" % self.target[1]
        self.assertEqual(ask(address, b"moshez@" + target + b"\r\n"),
                         b"Forwarding to port %d is not allowed\r\n" % self.target[1])
        self.assertEqual(ask(address, b"a@h1@h2@h3@h4\r\n"), b"Too many hops: at most 3\r\n")
        with socket.socket() as closed:
            closed.bind((LOCALHOST, 0))
            dead = closed.getsockname()[1]
        address = self.forwarding_service(ports=(dead,))
        with self.assertLogs("finger", "WARNING"):
            self.assertEqual(ask(address, b"moshez@127.0.0.1:%d\r\n" % dead),
                             b"Could not connect to remote host\r\n")

    def test_two_hops_through_two_servers(self):
        middle = self.forwarding_service()
        first = self.forwarding_service(ports=(79, middle[1]))
        query = b"moshez@127.0.0.1:%d@127.0.0.1:%d\r\n" % (self.target[1], middle[1])
        self.assertEqual(ask(first, query), b"Happy and well\r\n")

    def test_forward_option_on_the_command_line(self):
        server = ServerProcess(self, "--users", write_file(self, USERS), "--finger",
                               "127.0.0.1:0", "--web", "off", "--setter", "off", "--forward",
                               "--forward-ports", "79,%d" % self.target[1])
        address = server.address()
        self.assertEqual(ask(address, b"moshez@127.0.0.1:%d\r\n" % self.target[1]),
                         b"Happy and well\r\n")

    def test_proxy_listener_and_proxy_backend(self):
        target = "127.0.0.1:%d" % self.target[1]
        options = finger.default_options(finger="off", web="off", setter="off",
                                         proxy="127.0.0.1:0", proxy_target=target,
                                         forward_ports=(79, self.target[1]),
                                         backend="proxy")
        with finger.build_services(options) as services:
            proxy = services.by_name("proxy").address
            self.assertEqual(ask(proxy, b"moshez\r\n"), b"Happy and well\r\n")
            self.assertEqual(ask(proxy, b"moshez@%s\r\n" % target.encode()),
                             b"Happy and well\r\n")
            self.assertEqual(services.databases[0].get_user("moshez"), "Happy and well\r\n")

    def test_proxy_target_port_must_be_allowed(self):
        result = run_finger("--serve", "--backend", "memory", "--finger", "off", "--web", "off",
                            "--setter", "off", "--proxy", "127.0.0.1:0", "--proxy-target",
                            "127.0.0.1:7979")
        self.assertEqual(result.returncode, 2)
        self.assertIn("port 7979 is not in --forward-ports", result.stderr)


class CaptureServer:
    """A raw TCP server that records each query line and answers a fixed reply."""

    def __init__(self, test, reply=b"ok\r\n", family=socket.AF_INET, host=LOCALHOST):
        self.reply = reply
        self.queries = []
        self.listener = socket.socket(family)
        self.listener.bind((host, 0))
        self.listener.listen()
        self.address = self.listener.getsockname()[:2]
        test.addCleanup(self.listener.close)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock:
                sock.settimeout(TIMEOUT)
                self.queries.append(sock.makefile("rb").readline())
                sock.sendall(self.reply)


def client(*args):
    """Run the client in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = finger.main(list(args))
    return code, out.getvalue(), err.getvalue()


class TestClient(unittest.TestCase):
    def test_user_at_host_prints_host_line_and_reply(self):
        port = finger_service(self).address[1]
        self.assertEqual(client("moshez@127.0.0.1:%d" % port),
                         (0, "[127.0.0.1]\nHappy and well\n", ""))

    def test_several_queries_and_verbose(self):
        server = CaptureServer(self)
        target = "127.0.0.1:%d" % server.address[1]
        code, out, _ = client("-l", "moshez@" + target, "@" + target, "a@h1@" + target)
        self.assertEqual(code, 0)
        self.assertEqual(server.queries, [b"/W moshez\r\n", b"/W \r\n", b"/W a@h1\r\n"])
        self.assertEqual(out, "[127.0.0.1]\nok\n" * 3)

    def test_forwarding_form_sends_the_rest_to_the_rightmost_host(self):
        server = CaptureServer(self)
        client("moshez@example.org@127.0.0.1:%d" % server.address[1])
        self.assertEqual(server.queries, [b"moshez@example.org\r\n"])

    @unittest.skipUnless(socket.has_ipv6, "no IPv6")
    def test_ipv6_host(self):
        try:
            server = CaptureServer(self, family=socket.AF_INET6, host="::1")
        except OSError as error:
            self.skipTest("no ::1: %s" % error)
        self.assertEqual(client("moshez@[::1]:%d" % server.address[1]), (0, "[::1]\nok\n", ""))

    def test_control_characters_in_replies_are_made_harmless(self):
        server = CaptureServer(self, reply=b"\x1b[2Jhi\tthere\x07\r\nline2\xc2\x9b\r\n")
        _, out, _ = client("x@127.0.0.1:%d" % server.address[1])
        self.assertEqual(out, "[127.0.0.1]\n^[[2Jhi\tthere^G\nline2M-^[\n")

    def test_connection_refused_exits_1_with_one_line(self):
        with socket.socket() as unused:
            unused.bind((LOCALHOST, 0))
            port = unused.getsockname()[1]
        code, out, err = client("moshez@127.0.0.1:%d" % port, "--timeout", "2")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("127.0.0.1:%d" % port, err)

    def test_silent_server_times_out_with_exit_1(self):
        with socket.socket() as silent:
            silent.bind((LOCALHOST, 0))
            silent.listen()
            started = time.monotonic()
            code, _, err = client("x@127.0.0.1:%d" % silent.getsockname()[1],
                                  "--timeout", "0.3")
        self.assertEqual(code, 1)
        self.assertIn("timed out", err)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_reply_size_is_capped(self):
        server = CaptureServer(self, reply=b"z" * 5000)
        reply = finger.finger("x", LOCALHOST, server.address[1], max_bytes=1000)
        self.assertEqual(reply, b"z" * 1000)

    def test_bad_usage_exits_2(self):
        self.assertEqual(client("moshez@")[0], 2)
        self.assertEqual(run_finger("--no-such-option").returncode, 2)
        self.assertEqual(run_finger("--timeout", "-1", "x").returncode, 2)

    def test_client_does_not_import_server_only_modules(self):
        port = finger_service(self).address[1]
        code = ("import sys, finger; finger.main(['moshez@127.0.0.1:%d']); "
                "print(sorted(m for m in ('ssl', 'http.server', 'xmlrpc.server', "
                "'concurrent.futures', 'logging.handlers') if m in sys.modules))" % port)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=HERE, timeout=15)
        self.assertEqual(result.stdout, "[127.0.0.1]\nHappy and well\n[]\n")

# == 10. IRC ==================================================================================

# Needs, besides what test_finger.py imports: argparse (imported where used).

IRC_STATUSES = {"moshez": "Happy and well", "shawn": "alive",
                "evil": "ok\r\nQUIT :pwned\r\nPRIVMSG #victims :spam\0\x01",
                "long": ("word " * 150 + "\u00e9" * 150 + "\U0001F600" * 100).strip(),
                "huge": "x" * 10000}


class BrokenIRCDatabase(finger.UserDatabase):
    def get_user(self, name):
        raise RuntimeError("the back-end is down")


class ScriptedIRCServer:
    """An IRC server scripted by the test: a real socket on 127.0.0.1:0, a thread per
    connection.  expect() reads what the bot sent, send() answers; QUIT is answered as real
    servers do (ERROR, then hang up).  `context` makes it a TLS server."""

    def __init__(self, test, context=None):
        self.listener = socket.create_server((LOCALHOST, 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.context = context
        self.lines = queue.Queue()    # (connection number, line or None at EOF, time)
        self.raw = []                 # every line the bot sent, bytes with the line end
        self.seen = []
        self.connections = []
        self.when = None              # arrival time of the line expect() returned last
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()
        test.addCleanup(self.close)

    def _accept(self):
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            if self.context is not None:
                sock.settimeout(TIMEOUT)
                try:
                    sock = self.context.wrap_socket(sock, server_side=True)
                except (OSError, ValueError):
                    sock.close()
                    continue
            sock.settimeout(0.05)
            self.connections.append(sock)
            thread = threading.Thread(target=self._read, args=(sock, len(self.connections)),
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _read(self, sock, number):
        data = b""
        while not self._stop.is_set():
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                break
            data += chunk
            while b"\n" in data:
                line, data = data.split(b"\n", 1)
                self.raw.append(line + b"\n")
                text = line.rstrip(b"\r").decode("utf-8", "replace")
                self.lines.put((number, text, time.monotonic()))
                if text.startswith("QUIT"):
                    with contextlib.suppress(OSError):
                        sock.sendall(b"ERROR :Closing link (Quit: bye)\r\n")
                    self._hang_up(sock)
        self.lines.put((number, None, time.monotonic()))

    def expect(self, pattern, timeout=TIMEOUT, connection=None):
        """The next line the bot sent that matches `pattern` (on `connection`, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                number, line, when = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("the bot sent no line matching %r; the last lines: %r"
                                     % (pattern, self.seen[-8:])) from None
            self.seen.append(line)
            if line is not None and re.search(pattern, line) and connection in (None, number):
                self.when = when
                return line

    def expect_nothing(self, pattern, seconds):
        """No line matching `pattern` comes within `seconds`."""
        with contextlib.suppress(AssertionError):
            line = self.expect(pattern, timeout=seconds)
            raise ValueError("unexpected line from the bot: %r" % line)

    def send(self, *lines):
        """Lines (str or bytes, without line ends) to the bot's newest connection."""
        data = b"".join((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n"
                        for line in lines)
        self.connections[-1].sendall(data)

    def welcome(self, nick="fingerbot", isupport="NICKLEN=30 CHANTYPES=#"):
        """001, one 005 line with `isupport`, and the end of the MOTD."""
        self.send(":irc.test 001 %s :Welcome to the test network" % nick,
                  ":irc.test 005 %s %s :are supported by this server" % (nick, isupport),
                  ":irc.test 376 %s :End of /MOTD command." % nick)

    def hang_up(self):
        self._hang_up(self.connections[-1])

    @staticmethod
    def _hang_up(sock):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self):
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.listener.close()
        for sock in self.connections:
            self._hang_up(sock)


def irc_bot(test, server, db=None, **options):
    """A started IRCBot on `server`, with small intervals so that the tests are fast."""
    db = db if db is not None else finger.MemoryDatabase(IRC_STATUSES)
    options.setdefault("line_interval", 0.001)
    options.setdefault("backoff_cap", 0.05)
    options.setdefault("register_timeout", TIMEOUT)
    bot = finger.IRCBot(db, LOCALHOST, server.port, **options)
    start(test, bot)
    return bot


def registered_irc_bot(test, db=None, **options):
    server = ScriptedIRCServer(test)
    bot = irc_bot(test, server, db, **options)
    server.expect(r"^USER ")
    server.welcome(bot.wanted_nick)
    wait_until(lambda: bot.registered)
    return server, bot


class TestIRCHelpers(unittest.TestCase):
    def test_parse_irc_line(self):
        message = finger.parse_irc_line(":alice!al@example.org PRIVMSG fingerbot :moshez  x ")
        self.assertEqual((message.prefix, message.command, message.params),
                         ("alice!al@example.org", "PRIVMSG", ["fingerbot", "moshez  x "]))
        self.assertEqual(message.nick, "alice")
        message = finger.parse_irc_line("@time=2024-01-01T00:00:00Z :irc.test 001 bot :Hi\r\n")
        self.assertEqual((message.command, message.params), ("001", ["bot", "Hi"]))
        message = finger.parse_irc_line("ping   :x y")
        self.assertEqual((message.prefix, message.command, message.params), ("", "PING", ["x y"]))
        self.assertEqual(finger.parse_irc_line("CAP * LS :").params, ["*", "LS", ""])
        self.assertEqual(finger.parse_irc_line(":s 005 b A=1  B :ok").params,
                         ["b", "A=1", "B", "ok"])
        for bad in ["", "   ", ":", ":prefix", ":prefix ", "!!!", "12 x", "1234 x", ":p :x",
                    "PRIV-MSG x", "\ufffd\ufffd"]:
            self.assertIsNone(finger.parse_irc_line(bad), bad)

    def test_format_irc_line_never_lets_a_parameter_start_a_command(self):
        self.assertEqual(finger.format_irc_line("PRIVMSG", "alice", "hi there"),
                         b"PRIVMSG alice :hi there\r\n")
        self.assertEqual(finger.format_irc_line("NICK", "bot"), b"NICK bot\r\n")
        self.assertEqual(finger.format_irc_line("PONG", ""), b"PONG :\r\n")
        self.assertEqual(finger.format_irc_line("PONG", ":x"), b"PONG ::x\r\n")
        self.assertEqual(finger.format_irc_line("PRIVMSG", "a", "b", trailing=True),
                         b"PRIVMSG a :b\r\n")
        line = finger.format_irc_line("PRIVMSG", "al\r\nice", "ok\r\nQUIT :pwned\0")
        self.assertEqual(line, b"PRIVMSG alice :okQUIT :pwned\r\n")
        with self.assertRaises(ValueError):
            finger.format_irc_line("PRIVMSG", "two words", "text")
        with self.assertRaises(ValueError):
            finger.format_irc_line("PRIVMSG", "", "text")
        line = finger.format_irc_line("PRIVMSG", "alice", "\u00e9" * 600)
        self.assertLessEqual(len(line), 512)
        self.assertTrue(line.endswith(b"\r\n"))
        line.decode("utf-8")            # not cut inside a character

    def test_split_irc_text_on_utf8_boundaries(self):
        for text in [IRC_STATUSES["long"], "\U0001F600" * 333, "a" * 1000, "ab " * 400]:
            pieces = finger.split_irc_text(text, 400)
            self.assertGreater(len(pieces), 1)
            for piece in pieces:
                self.assertLessEqual(len(piece.encode("utf-8")), 400)
                self.assertLessEqual(len(finger.format_irc_line("PRIVMSG", "#a" * 40, piece)),
                                     512)
            self.assertEqual("".join(pieces).replace(" ", ""), text.replace(" ", ""))
        pieces = finger.split_irc_text("word " * 100, 42)
        self.assertTrue(all(not p.startswith(" ") and not p.endswith(" ") for p in pieces))
        self.assertEqual(finger.split_irc_text("one\r\ntwo\n\nthree\rfour\0!"),
                         ["one", "two", "three", "four!"])
        self.assertEqual(finger.split_irc_text(" \n "), [])

    def test_token_bucket(self):
        now = [100.0]
        bucket = finger.TokenBucket(burst=3, interval=2.0, clock=lambda: now[0])
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        self.assertAlmostEqual(bucket.delay(), 2.0)
        now[0] += 1.0
        self.assertAlmostEqual(bucket.delay(), 1.0)
        self.assertFalse(bucket.take())
        now[0] += 1.0
        self.assertTrue(bucket.take())
        now[0] += 3600
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        defaults = finger.TokenBucket()
        self.assertEqual((defaults.burst, defaults.interval), (5, 2.0))

    def test_backoff_doubles_with_jitter_and_stays_under_the_cap(self):
        highest = [finger.irc_backoff(n, 60.0, rand=lambda: 0.0) for n in range(1, 10)]
        self.assertEqual(highest, [1, 2, 4, 8, 16, 32, 60, 60, 60])
        lowest = [finger.irc_backoff(n, 60.0, rand=lambda: 0.999999) for n in range(1, 10)]
        for low, high in zip(lowest, highest):
            self.assertTrue(0.8 * high - 1e-6 <= low < high)
        self.assertLessEqual(max(finger.irc_backoff(n, 60.0) for n in range(1, 200)), 60.0)
        self.assertEqual(finger.irc_backoff(10 ** 6, 60.0, rand=lambda: 0.0), 60.0)

    def test_nicks(self):
        self.assertEqual(finger.alternate_nick("fingerbot", 1), "fingerbot_")
        self.assertEqual(finger.alternate_nick("fingerbot", 1, 9), "fingerbo_")
        self.assertEqual(finger.alternate_nick("fingerbot", 12, 9), "fingerb12")
        self.assertEqual(finger.alternate_nick("fingerbot", 2, 16), "fingerbot2")
        self.assertEqual(finger.reshape_nick("fingerbot_"), "fingerbot")
        self.assertEqual(finger.reshape_nick("1b\u00e9d-nick!"), "f1bd-nick")
        self.assertEqual(finger.reshape_nick("averyveryverylongnick", 16), "averyveryverylon")
        self.assertEqual(finger.irc_lower("Finger[Bot]~\\"), "finger{bot}^|")

    def test_bad_configuration_is_a_usage_error(self):
        db = finger.MemoryDatabase()
        for options in [dict(nick="two words"), dict(nick="1bot"), dict(nick=""),
                        dict(channels=["finger"]), dict(channels=["#a,#b"]),
                        dict(channels=["#a b"]), dict(account="bot"),
                        dict(password="secret"), dict(cafile="/nonexistent")]:
            with self.assertRaises(finger.UsageError, msg=options):
                finger.IRCBot(db, "irc.example", **options)
        with self.assertRaises(finger.UsageError):
            finger.IRCBot(db, "irc.example", tls=True, cafile="/nonexistent/ca.pem")
        self.assertEqual(finger.IRCBot(db, "h").address, ("h", 6667))
        self.assertEqual(finger.IRCBot(db, "h", tls=True).address, ("h", 6697))
        self.assertEqual(finger.IRCBot(db, "h", 7000, tls=True).address, ("h", 7000))

    def irc_options(self, *argv):
        return finger.build_parser().parse_intermixed_args(["--serve", *argv])

    def test_options(self):
        db = finger.MemoryDatabase()
        self.assertIsNone(finger.irc_bot_from_options(self.irc_options(), db))
        bot = finger.irc_bot_from_options(self.irc_options(
            "--irc", "irc.example", "--irc-channel", "#a", "--irc-channel", "#b",
            "--irc-nick", "statusbot"), db, environ={})
        self.assertEqual((bot.address, bot.nick, bot.channels, bot.tls),
                         (("irc.example", 6667), "statusbot", ["#a", "#b"], False))
        bot = finger.irc_bot_from_options(self.irc_options(
            "--irc", "[::1]", "--irc-tls", "--irc-account", "acct"), db,
            environ={"FINGER_IRC_PASSWORD": "sesame"})
        # private: no public way to see it
        self.assertEqual((bot.address, bot.tls, bot.account, bot._password),
                         (("::1", 6697), True, "acct", "sesame"))
        with self.assertRaises(finger.UsageError):     # no password anywhere
            finger.irc_bot_from_options(self.irc_options(
                "--irc", "irc.example", "--irc-tls", "--irc-account", "acct"), db, environ={})
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            self.irc_options("--irc", "irc.example:notaport")
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            self.irc_options("--irc-password", "secret")     # never on the command line

    def test_password_file(self):
        db = finger.MemoryDatabase()
        path = write_file(self, "open sesame\nsecond line\n", name="password")
        os.chmod(path, 0o600)
        bot = finger.irc_bot_from_options(self.irc_options(
            "--irc", "irc.example", "--irc-tls", "--irc-account", "acct",
            "--irc-password-file", path), db, environ={"FINGER_IRC_PASSWORD": "not this"})
        # private: no public way to see it
        self.assertEqual(bot._password, "open sesame")
        empty = write_file(self, "\n", name="empty")
        for bad in [path + ".missing", empty, os.path.dirname(path)]:
            with self.assertRaises(finger.UsageError) as caught:
                finger.irc_bot_from_options(self.irc_options(
                    "--irc", "irc.example", "--irc-tls", "--irc-account", "acct",
                    "--irc-password-file", bad), db, environ={})
            self.assertIn("--irc-password-file", str(caught.exception))
        with self.assertRaises(finger.UsageError):      # a password with no account
            finger.irc_bot_from_options(self.irc_options(
                "--irc", "irc.example", "--irc-password-file", path), db, environ={})


class TestIRCSession(unittest.TestCase):
    """The bot's IRC without a socket and on a clock the test drives."""

    def session(self, **options):
        bot = finger.IRCBot(finger.MemoryDatabase({"moshez": "Happy and well"}), "127.0.0.1",
                            **options)
        return finger.IRCSession(bot, now=1000.0)

    def lines(self, session, now):
        data, due = session.step(now)
        return data.decode().splitlines(), due

    def welcome(self, session, now=1000.0):
        session.feed(b":irc.test 001 fingerbot :Welcome\r\n:irc.test 376 fingerbot :End\r\n",
                     now)

    def test_registration_and_the_welcome_deadline(self):
        session = self.session(register_timeout=30)
        lines, due = self.lines(session, 1000.0)
        self.assertEqual(lines, ["NICK fingerbot", "USER finger 0 * :finger.py bot"])
        self.assertEqual(due, 30)
        with self.assertRaisesRegex(finger._SessionEnd, "no welcome"):
            session.step(1030.0)

    def test_ping_pong_and_the_keepalive(self):
        session = self.session(keepalive=120, keepalive_timeout=60)
        self.welcome(session)
        session.feed(b"PING :irc.test\r\n", 1000.0)
        self.assertIn("PONG irc.test", self.lines(session, 1000.0)[0])
        self.assertEqual(self.lines(session, 1119.0), ([], 1.0))     # not silent for long
        self.assertEqual(self.lines(session, 1120.0), (["PING finger.py"], 60))
        with self.assertRaisesRegex(finger._SessionEnd, "no answer to our PING"):
            session.step(1180.0)

    def test_answers_go_through_the_flood_limiter(self):
        session = self.session(burst=2, line_interval=2.0)
        self.welcome(session)
        self.lines(session, 1000.0)
        for n in range(4):
            session.feed(b":dave%d!d@h PRIVMSG fingerbot :moshez\r\n" % n, 1000.0)
        lines, due = self.lines(session, 1000.0)
        self.assertEqual(lines, ["PRIVMSG dave0 :Status of moshez: Happy and well",
                                 "PRIVMSG dave1 :Status of moshez: Happy and well"])
        self.assertEqual(due, 2.0)
        self.assertEqual(self.lines(session, 1001.0)[0], [])
        self.assertEqual(len(self.lines(session, 1002.0)[0]), 1)
        self.assertEqual(len(self.lines(session, 1004.0)[0]), 1)

    def test_a_nick_storm_never_grows_the_queue_past_its_bound(self):
        session = self.session(burst=1, line_interval=10)
        session.feed(b":irc.test 433 * fingerbot :Nickname is already in use\r\n", 1000.0)
        session.feed(b":irc.test 001 fingerbot_ :Welcome\r\n:irc.test 376 fingerbot_ :End\r\n",
                     1000.0)
        with self.assertLogs("finger", "WARNING") as logs:
            for number in range(1000):       # the wanted nick's holder leaves, and is back
                session.feed(b":fingerbot!u@h NICK :away%d\r\n:irc.test 433 fingerbot_ "
                             b"fingerbot :Nickname is already in use\r\n" % number, 1000.0)
        # private: no public way to the flood limiter's queue
        self.assertEqual(len(session._queue), finger.IRC_MAX_QUEUE)
        self.assertIn("dropped a NICK", logs.output[0])
        self.assertLessEqual(len(logs.output), finger.MAX_WARNINGS_PER_SECOND)

    def test_sasl_gives_up_when_cap_ls_goes_unanswered(self):
        session = self.session(account="fingerbot", password="pw", cap_wait=5)
        lines, due = self.lines(session, 1000.0)
        self.assertEqual(lines[0], "CAP LS 302")
        self.assertEqual(due, 5)
        with self.assertLogs("finger", "ERROR"):
            self.assertEqual(self.lines(session, 1005.0)[0], ["CAP END"])


class TestIRCBot(unittest.TestCase):
    """The bot against a scripted server: every test well under a second."""

    def test_registration_and_ping_before_and_after_001(self):
        server = ScriptedIRCServer(self)
        bot = irc_bot(self, server, channels=["#finger", "#Other"], realname="Finger Bot")
        self.assertEqual(server.expect(r"^NICK "), "NICK fingerbot")
        self.assertEqual(server.expect(r"^USER "), "USER finger 0 * :Finger Bot")
        self.assertNotIn("CAP LS 302", server.seen)       # no SASL: no CAP
        server.send("PING :cookie-1234")                  # before 001 (anti-spoof cookies)
        self.assertEqual(server.expect(r"^PONG"), "PONG cookie-1234")
        self.assertFalse(bot.registered)
        server.welcome("fingerbot")
        self.assertEqual(server.expect(r"^JOIN"), "JOIN #finger,#Other")
        wait_until(lambda: bot.registered)
        server.send("PING :irc.test")
        self.assertEqual(server.expect(r"^PONG"), "PONG irc.test")
        server.send(":fingerbot!f@h JOIN #finger", ":fingerbot!f@h JOIN :#Other")
        wait_until(lambda: bot.joined == ["#Other", "#finger"])

    def test_nick_taken_then_too_long(self):
        server = ScriptedIRCServer(self)
        bot = irc_bot(self, server)
        server.expect(r"^USER ")
        server.send(":irc.test 433 * fingerbot :Nickname is already in use")
        self.assertEqual(server.expect(r"^NICK "), "NICK fingerbot_")
        server.send(":irc.test 432 * fingerbot_ :Nickname too long, max. 9 characters")
        self.assertEqual(server.expect(r"^NICK "), "NICK fingerbo_")      # another shape
        server.send(":irc.test 437 * fingerbo_ :Nick/channel is temporarily unavailable")
        self.assertEqual(server.expect(r"^NICK "), "NICK fingerbo2")
        server.welcome("fingerbo2")
        wait_until(lambda: bot.registered)
        self.assertEqual(bot.nick, "fingerbo2")
        server.send(":alice!a@h PRIVMSG fingerbo2 :moshez")
        self.assertEqual(server.expect(r"^PRIVMSG"),
                         "PRIVMSG alice :Status of moshez: Happy and well")

    def test_gives_up_on_nicks_and_reconnects(self):
        server = ScriptedIRCServer(self)
        irc_bot(self, server)
        for _ in range(finger.IRC_NICK_TRIES + 1):
            nick = server.expect(r"^NICK ", connection=1).split()[1]
            server.send(":irc.test 433 * %s :Nickname is already in use" % nick)
        server.expect(r"^NICK fingerbot$", connection=2)

    def test_private_message_answered_with_the_tutorials_words(self):
        server, bot = registered_irc_bot(self)
        server.send(":alice!a@h PRIVMSG fingerbot :moshez",
                    ":NickServ!s@services PRIVMSG fingerbot :This nickname is registered.",
                    ":bob!b@h PRIVMSG FingerBot :  nobody  ")
        self.assertEqual(server.expect(r"^PRIVMSG"),
                         "PRIVMSG alice :Status of moshez: Happy and well")
        self.assertEqual(server.expect(r"^PRIVMSG"), "PRIVMSG bob :Status of nobody: No such user")
        self.assertEqual((bot.counts["ok"], bot.counts["unknown"]), (1, 1))

    def test_back_end_error_is_logged_and_answered(self):
        with self.assertLogs("finger", "ERROR") as logs:
            server, bot = registered_irc_bot(self, db=BrokenIRCDatabase())
            server.send(":alice!a@h PRIVMSG fingerbot :moshez")
            self.assertEqual(server.expect(r"^PRIVMSG"),
                             "PRIVMSG alice :Status of moshez: Internal error in server")
        self.assertIn("back-end failed", "\n".join(logs.output))

    def test_channel_mentions(self):
        server, bot = registered_irc_bot(self, channels=["#finger"])
        server.expect(r"^JOIN #finger$")
        server.send(":fingerbot!f@h JOIN #finger")
        wait_until(lambda: bot.joined == ["#finger"])
        server.send(":alice!a@h PRIVMSG #finger :fingerbot: moshez",
                    ":bob!b@h PRIVMSG #FINGER :FingerBot, shawn",
                    ":carol!c@h PRIVMSG #finger :moshez",                  # not addressed
                    ":carol!c@h PRIVMSG #finger :fingerbot: two words",
                    ":carol!c@h PRIVMSG #elsewhere :fingerbot: moshez",    # not joined
                    ":carol!c@h PRIVMSG #finger :\x01ACTION fingerbot: moshez\x01",
                    ":dave!d@h PRIVMSG fingerbot :shawn")                  # sentinel
        self.assertEqual(server.expect(r"^PRIVMSG"),
                         "PRIVMSG #finger :alice: Status of moshez: Happy and well")
        self.assertEqual(server.expect(r"^PRIVMSG"),
                         "PRIVMSG #FINGER :bob: Status of shawn: alive")
        self.assertEqual(server.expect(r"^PRIVMSG"), "PRIVMSG dave :Status of shawn: alive")
        server.send(":op!o@h KICK #finger fingerbot :bye", ":alice!a@h PRIVMSG #finger :"
                    "fingerbot: moshez", ":dave!d@h PRIVMSG fingerbot :moshez")
        self.assertEqual(server.expect(r"^PRIVMSG"),
                         "PRIVMSG dave :Status of moshez: Happy and well")

    def test_notices_own_messages_and_ctcp(self):
        server, bot = registered_irc_bot(self)
        server.send(":alice!a@h NOTICE fingerbot :moshez",
                    ":fingerbot!f@h PRIVMSG fingerbot :moshez",
                    ":alice!a@h PRIVMSG fingerbot :\x01ACTION moshez\x01",
                    ":alice!a@h PRIVMSG fingerbot :\x01VERSION\x01",
                    ":alice!a@h PRIVMSG fingerbot :\x01PING 1700000000 123\x01",
                    ":alice!a@h PRIVMSG fingerbot :\x01moshez\x01",
                    ":alice!a@h NOTICE fingerbot :\x01VERSION\x01",
                    ":dave!d@h PRIVMSG fingerbot :shawn")
        version = server.expect(r"^(PRIVMSG|NOTICE)")
        self.assertRegex(version, r"^NOTICE alice :\x01VERSION finger\.py [^\x01]+\x01$")
        self.assertEqual(server.expect(r"^(PRIVMSG|NOTICE)"),
                         "NOTICE alice :\x01PING 1700000000 123\x01")
        self.assertEqual(server.expect(r"^(PRIVMSG|NOTICE)"),
                         "PRIVMSG dave :Status of shawn: alive")
        self.assertEqual(bot.counts["ctcp"], 2)

    def test_status_cannot_inject_commands(self):
        server, bot = registered_irc_bot(self)
        count = len(server.raw)
        server.send(":alice!a@h PRIVMSG fingerbot :evil", ":dave!d@h PRIVMSG fingerbot :shawn")
        server.expect(r"^PRIVMSG dave ")
        sent = server.raw[count:]
        self.assertEqual(sent, [b"PRIVMSG alice :Status of evil: ok\r\n",
                                b"PRIVMSG alice :QUIT :pwned\r\n",
                                b"PRIVMSG alice :PRIVMSG #victims :spam^@^A\r\n",
                                b"PRIVMSG dave :Status of shawn: alive\r\n"])

    def test_long_replies_are_split_within_512_bytes(self):
        server, bot = registered_irc_bot(self)
        count = len(server.raw)
        server.send(":alice!a@h PRIVMSG fingerbot :long", ":alice!a@h PRIVMSG fingerbot :huge",
                    ":dave!d@h PRIVMSG fingerbot :shawn")
        server.expect(r"^PRIVMSG dave ")
        sent = server.raw[count:-1]
        for line in sent:
            self.assertLessEqual(len(line), 512)
            self.assertTrue(line.startswith(b"PRIVMSG alice :"))
            self.assertEqual(line.count(b"\r"), 1)
        texts = [line[len(b"PRIVMSG alice :"):-2].decode("utf-8") for line in sent]
        long_lines = [t for t in texts if not t.startswith(("x", "Status of huge"))]
        self.assertGreater(len(long_lines), 2)
        self.assertEqual("".join(long_lines).replace(" ", ""),
                         ("Status of long: " + IRC_STATUSES["long"]).replace(" ", ""))
        huge = [t for t in texts if t.startswith(("x", "Status of huge"))]
        self.assertEqual(len(huge), finger.IRC_MAX_REPLY_LINES)
        self.assertTrue(huge[-1].endswith(" [...]"))

    def test_malformed_and_overlong_lines_are_skipped(self):
        server, bot = registered_irc_bot(self)
        with self.assertLogs("finger", "WARNING") as logs:
            server.send(b"", b":", b":prefix.only", b"!!! what", b"\xff\xfe\x00 bad bytes",
                        b"PRIVMSG", b":alice!a@h PRIVMSG fingerbot",
                        b":alice!a@h PRIVMSG fingerbot :" + b"y" * 10240,
                        b"z" * 20000 + b" tail of a line with no end in sight")
            server.send(b":alice!a@h PRIVMSG fingerbot :mosh\xffez")
            server.connections[-1].sendall(b":bob!b@h PRIVMSG fingerbot :moshez\n")   # bare LF
            self.assertEqual(server.expect(r"^PRIVMSG alice"),
                             "PRIVMSG alice :Status of mosh\ufffdez: No such user")
            self.assertEqual(server.expect(r"^PRIVMSG bob"),
                             "PRIVMSG bob :Status of moshez: Happy and well")
        output = "\n".join(logs.output)
        self.assertIn("malformed", output)
        self.assertEqual(output.count("skipped a line of"), 2)
        self.assertTrue(bot.registered)

    def test_flood_limiter(self):
        clock = TestClock()
        server, bot = registered_irc_bot(self, burst=2, line_interval=10, clock=clock)
        wait_until(lambda: bot.registered)
        clock.advance(bot, 100)                           # the bucket refills after JOINs etc.
        server.send(*[":alice!a@h PRIVMSG fingerbot :moshez"] * 4)
        for _ in range(2):
            server.expect(r"^PRIVMSG alice")              # the burst
        wait_until(lambda: bot.counts["ok"] == 4)         # the other two wait in the queue
        clock.advance(bot, 0)                             # and the loop is done with them
        for _ in range(2):
            clock.advance(bot, 9)
            server.expect_nothing(r"^PRIVMSG alice", 0.2)
            clock.advance(bot, 2)
            server.expect(r"^PRIVMSG alice")              # then one line per 10 s
            clock.advance(bot, -1)

    def test_queue_is_bounded(self):
        server, bot = registered_irc_bot(self, burst=1, line_interval=10)
        with self.assertLogs("finger", "WARNING"):
            server.send(*[":alice!a@h PRIVMSG fingerbot :moshez"] * (finger.IRC_MAX_QUEUE + 5))
            wait_until(lambda: bot.counts["ok"] + bot.counts["dropped"] ==
                       finger.IRC_MAX_QUEUE + 5)
        self.assertIn(bot.counts["dropped"], (4, 5))      # 5 when all came in one read

    def test_keepalive_detects_a_silent_server(self):
        server, bot = registered_irc_bot(self, keepalive=0.2, keepalive_timeout=0.2)
        ping = server.expect(r"^PING", timeout=1)
        started = server.when
        server.send("PONG irc.test :" + ping.split(None, 1)[1].lstrip(":"))
        server.expect(r"^PING", timeout=1)                # answered: no reconnect, pings again
        self.assertGreater(server.when - started, 0.15)
        silent = server.when
        server.expect(r"^NICK fingerbot$", connection=2, timeout=2)   # not answered: reconnect
        self.assertLess(server.when - silent, 1.0)

    def test_reconnects_after_the_server_hangs_up(self):
        server, bot = registered_irc_bot(self)
        with self.assertLogs("finger", "INFO") as logs:
            server.hang_up()
            server.expect(r"^USER ", connection=2)
            server.welcome()
            wait_until(lambda: bot.registered)
        self.assertIn("reconnecting to 127.0.0.1:%d in" % server.port, "\n".join(logs.output))
        server.send(":alice!a@h PRIVMSG fingerbot :moshez")
        self.assertEqual(server.expect(r"^PRIVMSG"),
                         "PRIVMSG alice :Status of moshez: Happy and well")

    def test_registration_timeout(self):
        server = ScriptedIRCServer(self)
        irc_bot(self, server, register_timeout=0.2)
        server.expect(r"^USER ", connection=1)
        server.expect(r"^USER ", connection=2, timeout=1)

    def test_sasl_plain(self):
        server = ScriptedIRCServer(self)
        bot = irc_bot(self, server, account="fingerbot", password="s\u00e9same",
                      server_password="serverpass")
        self.assertEqual(server.expect(r"^CAP"), "CAP LS 302")
        self.assertEqual(server.expect(r"^PASS"), "PASS serverpass")
        server.expect(r"^USER ")
        server.send(":irc.test CAP * LS * :multi-prefix away-notify",
                    ":irc.test CAP * LS :sasl=EXTERNAL,PLAIN message-tags")
        self.assertEqual(server.expect(r"^CAP"), "CAP REQ sasl")
        server.send(":irc.test CAP * ACK :sasl")
        self.assertEqual(server.expect(r"^AUTHENTICATE"), "AUTHENTICATE PLAIN")
        server.send("AUTHENTICATE +")
        import base64
        self.assertEqual(server.expect(r"^AUTHENTICATE"), "AUTHENTICATE " + base64.b64encode(
            "\0fingerbot\0s\u00e9same".encode()).decode())
        server.send(":irc.test 900 * * fingerbot :You are now logged in as fingerbot",
                    ":irc.test 903 * :SASL authentication successful")
        self.assertEqual(server.expect(r"^CAP"), "CAP END")
        server.welcome()
        wait_until(lambda: bot.registered)
        server.send("AUTHENTICATE +")                     # never the password twice
        server.send(":alice!a@h PRIVMSG fingerbot :shawn")
        self.assertEqual(server.expect(r"^(PRIVMSG|AUTH)"),
                         "PRIVMSG alice :Status of shawn: alive")

    def test_cap_end_after_sasl_failure_or_without_sasl(self):
        server = ScriptedIRCServer(self)
        with self.assertLogs("finger", "WARNING") as logs:
            irc_bot(self, server, account="fingerbot", password="wrong")
            server.expect(r"^USER ")
            server.send(":irc.test CAP * LS :sasl")
            server.expect(r"^CAP REQ")
            server.send(":irc.test CAP * ACK :sasl")
            server.expect(r"^AUTHENTICATE PLAIN")
            server.send("AUTHENTICATE +")
            server.expect(r"^AUTHENTICATE ")
            server.send(":irc.test 904 * :SASL authentication failed")
            self.assertEqual(server.expect(r"^CAP"), "CAP END")
            server.hang_up()
            server.expect(r"^USER ", connection=2)
            server.send(":irc.test CAP * LS :multi-prefix")       # ngircd: no sasl
            self.assertEqual(server.expect(r"^CAP"), "CAP END")
        self.assertIn("SASL authentication failed", "\n".join(logs.output))

    def test_a_ban_is_logged_and_waited_out(self):
        server = ScriptedIRCServer(self)
        with self.assertLogs("finger", "INFO") as logs:
            bot = irc_bot(self, server, backoff_cap=0.05, ban_delay=60)
            server.expect(r"^USER ")
            server.send(":irc.test 465 fingerbot :You are banned from this server (spam)",
                        "ERROR :Closing Link: K-Lined")
            wait_until(lambda: "reconnecting" in "\n".join(logs.output))
        output = "\n".join(logs.output)
        self.assertIn("banned us: You are banned from this server (spam)", output)
        delay = float(re.search(r"reconnecting to \S+ in ([0-9.]+) s", output).group(1))
        self.assertGreaterEqual(delay, 48)
        started = time.monotonic()
        bot.stop()                                        # prompt, even in a 60 s back-off
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(bot.loop.closed)

    def test_error_reason_is_logged(self):
        server, bot = registered_irc_bot(self)
        with self.assertLogs("finger", "WARNING") as logs:
            server.send("ERROR :Closing connection: Server going down")
            server.expect(r"^NICK", connection=2)
        self.assertIn("ERROR Closing connection: Server going down", "\n".join(logs.output))

    def test_stop_is_prompt_and_says_quit(self):
        server, bot = registered_irc_bot(self)
        started = time.monotonic()
        bot.stop()
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual(server.expect(r"^QUIT"), "QUIT :finger.py stopping")
        # private: no public way to see it
        self.assertIsNone(bot._thread)
        self.assertEqual(bot.open_connections(), 0)
        self.assertFalse(bot.registered)

    def test_stop_is_prompt_when_the_server_hangs(self):
        with socket.create_server((LOCALHOST, 0)) as hung:    # accepts (kernel), never reads
            bot = finger.IRCBot(finger.MemoryDatabase(), LOCALHOST, hung.getsockname()[1])
            start(self, bot)
            wait_until(lambda: bot.open_connections() == 1)
            started = time.monotonic()
            bot.stop()
            self.assertLess(time.monotonic() - started, 1.0)

    def test_stopping_the_irc_bot_logs_no_error(self):
        server, bot = registered_irc_bot(self)
        with self.assertLogs("finger", "INFO") as logs:
            finger.log.info("stopping the bot")
            bot.stop()
        self.assertEqual([r for r in logs.records if r.levelno >= logging.ERROR], [])
        self.assertFalse(any("reconnecting" in line for line in logs.output))


class TestIRCOnEveryNetwork(unittest.TestCase):
    """What the bot learns from each server (005), throttles against bans, SASL failures
    that are never silent, taking its nick back, bot mode."""

    def bot_with(self, isupport, nick="fingerbot", **options):
        server = ScriptedIRCServer(self)
        bot = irc_bot(self, server, nick=nick, **options)
        server.expect(r"^USER ")
        server.welcome(nick, isupport)
        wait_until(lambda: bot.registered)
        return server, bot

    def test_casemapping_ascii(self):
        server, bot = self.bot_with("CASEMAPPING=ascii CHANTYPES=#", nick="fb[x]",
                                    channels=["#c"])
        server.expect(r"^JOIN #c$")
        server.send(":fb[x]!f@h JOIN #c")
        wait_until(lambda: bot.joined == ["#c"])
        server.send(":fb{x}!u@h PRIVMSG fb[x] :moshez",            # another user, not us
                    ":carol!c@h PRIVMSG #c :fb{x}: shawn",          # not addressed to us
                    ":carol!c@h PRIVMSG #C :FB[X]: shawn")          # ascii folds letters
        self.assertEqual(server.expect(r"^PRIVMSG"),
                         "PRIVMSG fb{x} :Status of moshez: Happy and well")
        self.assertEqual(server.expect(r"^PRIVMSG"), "PRIVMSG #C :carol: Status of shawn: alive")
        self.assertEqual(finger.irc_lower("fb[X]~", "strict-rfc1459"), "fb{x}~")

    def test_casemapping_rfc1459_by_default(self):
        server, bot = self.bot_with("NICKLEN=30", nick="fb[x]")
        server.send(":fb{x}!u@h PRIVMSG fb[x] :moshez",             # that is us: not answered
                    ":dave!d@h PRIVMSG FB{X} :shawn")
        self.assertEqual(server.expect(r"^PRIVMSG"), "PRIVMSG dave :Status of shawn: alive")

    def test_chantypes_and_targmax_bound_the_joins(self):
        server, bot = self.bot_with("CHANTYPES=# TARGMAX=JOIN:2,PRIVMSG:4",
                                    channels=["#a", "#b", "&local", "#c"])
        self.assertEqual(server.expect(r"^JOIN"), "JOIN #a,#b")
        self.assertEqual(server.expect(r"^JOIN"), "JOIN #c")

    def test_joins_without_the_end_of_the_motd_all_the_same(self):
        server = ScriptedIRCServer(self)
        irc_bot(self, server, channels=["#a"], join_wait=0.2)
        server.expect(r"^USER ")
        server.send(":irc.test 001 fingerbot :Welcome")
        self.assertEqual(server.expect(r"^JOIN"), "JOIN #a")

    def test_bot_mode(self):
        server, bot = self.bot_with("BOT=B NICKLEN=30")
        self.assertEqual(server.expect(r"^MODE"), "MODE fingerbot +B")
        server, bot = self.bot_with("NICKLEN=30", channels=["#a"])
        server.expect(r"^JOIN")
        self.assertNotIn("MODE", " ".join(server.seen))

    def test_throttled_comes_back_soon_banned_much_later(self):
        server = ScriptedIRCServer(self)
        with self.assertLogs("finger", "INFO") as logs:
            bot = irc_bot(self, server, throttle_delay=0.1, ban_delay=3600, backoff_cap=60)
            server.expect(r"^USER ", connection=1)
            server.send("ERROR :Your host is trying to (re)connect too fast -- throttled.")
            server.expect(r"^USER ", connection=2)          # after 0.1-0.15 s, not a ban's
            server.send(":irc.test 263 * :Server load is temporarily too heavy. Please wait")
            server.expect(r"^USER ", connection=3)
            server.send("ERROR :Closing Link: 127.0.0.1 (K-Lined: spam)")
            wait_until(lambda: "reconnecting" in logs.output[-1] and "attempt 4" in
                       logs.output[-1])
        output = "\n".join(logs.output)
        self.assertNotIn("banned us: Your host", output)
        delay = float(re.search(r"reconnecting to \S+ in ([0-9.]+) s \(attempt 4",
                                output).group(1))
        self.assertGreaterEqual(delay, 3600 * 0.8)
        bans = [r for r in logs.records if "banned us" in r.getMessage()]
        self.assertEqual([(r.levelname, r.getMessage().split(" ", 2)[2]) for r in bans],
                         [("ERROR", "banned us: Closing Link: 127.0.0.1 (K-Lined: spam); "
                           "trying again in about 60 minutes")])
        started = time.monotonic()
        bot.stop()                                         # prompt, even in a long pause
        self.assertLess(time.monotonic() - started, 1.0)

    def sasl_bot(self, **options):
        server = ScriptedIRCServer(self)
        bot = irc_bot(self, server, account="fingerbot", password="pw", **options)
        server.expect(r"^USER ")
        return server, bot

    def test_sasl_never_fails_silently(self):
        cases = [
            ("no CAP answer, then 001", [], "welcomed us without answering CAP LS"),
            ("CAP unknown", [":irc.test 421 * CAP :Unknown command"],
             "does not know CAP"),
            ("no sasl", [":irc.test CAP * LS :multi-prefix"], "offers no SASL"),
            ("no PLAIN", [":irc.test CAP * LS :sasl=EXTERNAL"], "has no PLAIN"),
        ]
        for what, lines, reason in cases:
            with self.subTest(what), self.assertLogs("finger", "ERROR") as logs:
                server, bot = self.sasl_bot()
                server.send(*lines)
                if lines and "CAP" in lines[0] and "421" not in lines[0]:
                    self.assertEqual(server.expect(r"^CAP"), "CAP END")
                server.welcome()
                wait_until(lambda: bot.registered)
                server.send(":dave!d@h PRIVMSG fingerbot :shawn")
                server.expect(r"^PRIVMSG dave")                # still serving
            self.assertEqual(len(logs.output), 1, logs.output)   # one line, at ERROR
            self.assertIn("not logged in as fingerbot", logs.output[0])
            self.assertIn(reason, logs.output[0])
            bot.stop()

    def test_a_refused_login_and_an_unanswered_cap(self):
        with self.assertLogs("finger", "ERROR") as logs:
            server, bot = self.sasl_bot(cap_wait=0.2)
            self.assertEqual(server.expect(r"^CAP END", timeout=2), "CAP END")
        self.assertIn("did not answer CAP LS within 0.2 s", logs.output[0])
        with self.assertLogs("finger", "ERROR") as logs:
            server, bot = self.sasl_bot()
            server.send(":irc.test CAP * LS :sasl", ":irc.test CAP * ACK :sasl")
            server.expect(r"^AUTHENTICATE PLAIN")
            server.send("AUTHENTICATE +")
            server.expect(r"^AUTHENTICATE ")
            server.send(":irc.test 904 * :SASL authentication failed")
            self.assertEqual(server.expect(r"^CAP"), "CAP END")
        self.assertEqual(len(logs.output), 1)
        self.assertIn("the login was refused (904 SASL authentication failed)", logs.output[0])

    def test_require_sasl_backs_off_instead_of_registering(self):
        with self.assertLogs("finger", "INFO") as logs:
            server, bot = self.sasl_bot(require_sasl=True)
            server.send(":irc.test CAP * LS :multi-prefix")
            server.expect(r"^USER ", connection=2)          # it left, and came back
            server.send(":irc.test CAP * LS :multi-prefix")
            server.expect(r"^USER ", connection=3)
        self.assertNotIn("CAP END", server.seen)
        self.assertFalse(bot.registered)
        told = [r.levelname for r in logs.records if "not logged in" in r.getMessage()
                and "offers no SASL" in r.getMessage()]
        self.assertEqual(told[:2], ["ERROR", "INFO"])          # once a streak at ERROR
        with self.assertRaises(finger.UsageError):
            finger.IRCBot(finger.MemoryDatabase(), LOCALHOST, 1, require_sasl=True)

    def test_nick_taken_back_with_monitor(self):
        server = ScriptedIRCServer(self)
        bot = irc_bot(self, server)
        server.expect(r"^NICK fingerbot$")
        server.send(":irc.test 433 * fingerbot :Nickname is already in use")
        server.expect(r"^NICK fingerbot_$")
        server.welcome("fingerbot_", "MONITOR=100 NICKLEN=30")
        self.assertEqual(server.expect(r"^MONITOR"), "MONITOR + fingerbot")
        server.send(":irc.test 730 fingerbot_ :fingerbot!u@h")          # online
        server.send(":irc.test 731 fingerbot_ :fingerbot")             # and gone
        self.assertEqual(server.expect(r"^NICK"), "NICK fingerbot")
        server.send(":fingerbot_!f@h NICK :fingerbot")
        self.assertEqual(server.expect(r"^MONITOR"), "MONITOR - fingerbot")
        wait_until(lambda: bot.nick == "fingerbot")

    def test_nick_taken_back_with_ison_or_when_its_holder_leaves(self):
        server = ScriptedIRCServer(self)
        bot = irc_bot(self, server, reclaim_interval=0.1)
        server.expect(r"^NICK fingerbot$")
        server.send(":irc.test 437 * fingerbot :Nick/channel is temporarily unavailable")
        server.expect(r"^NICK fingerbot_$")
        server.welcome("fingerbot_")
        self.assertEqual(server.expect(r"^ISON"), "ISON fingerbot")
        server.send(":irc.test 303 fingerbot_ :fingerbot")                # still there
        self.assertEqual(server.expect(r"^(ISON|NICK)"), "ISON fingerbot")  # asks again
        server.send(":fingerbot!u@h QUIT :bye")
        self.assertEqual(server.expect(r"^NICK"), "NICK fingerbot")
        server.send(":irc.test 433 fingerbot_ fingerbot :Nickname is already in use")
        server.send(":irc.test 303 fingerbot_ :")                         # gone for good
        self.assertEqual(server.expect(r"^NICK"), "NICK fingerbot")
        server.send(":fingerbot_!f@h NICK :fingerbot")
        wait_until(lambda: bot.nick == "fingerbot")
        server.expect_nothing(r"^ISON", 0.3)

    def test_what_a_hostile_server_sends_is_bounded(self):
        self.assertTrue(finger.IRC_BANNED.search("Closing Link: x (K-lined: spam; try again "
                                                  "in 24 hours)"))         # a ban, not a pause
        for innocent in ("Killed (oper (urban myth))", "missed the deadline",
                         "Your host is trying to (re)connect too fast -- throttled."):
            self.assertFalse(finger.IRC_BANNED.search(innocent), innocent)
        with self.assertLogs("finger", "DEBUG") as logs:
            server, bot = self.bot_with("NICKLEN=30", account=None)
            server.send(*[":irc.test CAP * LS :sasl=PLAIN cap%d" % n for n in range(50)])
            server.send(":" + "n" * 450 + "!u@h PRIVMSG fingerbot :moshez",   # no nick:
                        "::evil!u@h PRIVMSG fingerbot :moshez",               # no answer,
                        ":al,#chan!u@h PRIVMSG fingerbot :moshez",            # no error
                        ":irc.test NICK :not one word",
                        ":dave!d@h PRIVMSG fingerbot :shawn")
            self.assertEqual(server.expect(r"^(PRIVMSG|CAP|NOTICE)"),
                             "PRIVMSG dave :Status of shawn: alive")
        self.assertEqual(bot.session._caps, {})            # nothing asked, nothing kept
        self.assertFalse([line for line in logs.output if "ERROR" in line], logs.output)
        for number in range(finger.IRC_MAX_CHANNELS + 10):
            server.send(":fingerbot!f@h JOIN #c%d" % number)
        server.send(":dave!d@h PRIVMSG fingerbot :moshez")
        server.expect(r"^PRIVMSG dave")
        self.assertEqual(len(bot.joined), finger.IRC_MAX_CHANNELS)

    def test_a_server_that_welcomes_then_hangs_up_gets_a_growing_back_off(self):
        server = ScriptedIRCServer(self)
        with self.assertLogs("finger", "INFO") as logs:
            irc_bot(self, server, backoff_cap=60, register_timeout=TIMEOUT)
            for number in (1, 2):
                server.expect(r"^USER ", connection=number)
                server.welcome()
                server.hang_up()
                wait_until(lambda: "attempt %d)" % (number + 1) in logs.output[-1])
        delays = [float(d) for d in re.findall(r"reconnecting to \S+ in ([0-9.]+) s",
                                               "\n".join(logs.output))]
        self.assertEqual(len(delays), 2)
        self.assertGreater(delays[1], delays[0] * 1.5)      # not reset by each 001

    def test_a_connection_that_lasted_resets_the_back_off(self):
        server = ScriptedIRCServer(self)
        with self.assertLogs("finger", "INFO") as logs:
            clock = TestClock()
            bot = irc_bot(self, server, backoff_cap=60, stable_after=0.2, clock=clock)
            server.expect(r"^USER ")
            server.welcome()
            wait_until(lambda: bot.registered)
            clock.now += 0.3                  # longer than stable_after: the link was good
            server.hang_up()
            wait_until(lambda: "reconnecting" in logs.output[-1])
        self.assertIn("(attempt 2)", logs.output[-1])
        delay = float(re.search(r"in ([0-9.]+) s", logs.output[-1]).group(1))
        self.assertLessEqual(delay, finger.IRC_FIRST_DELAY)   # the first step again

    def test_capabilities_kept_are_bounded(self):
        server = ScriptedIRCServer(self)
        bot = irc_bot(self, server, account="fingerbot", password="pw")
        server.expect(r"^USER ")
        server.send(":irc.test CAP * LS * :" + " ".join("c%d" % n for n in range(300)),
                    ":irc.test CAP * LS :sasl")
        server.expect(r"^CAP REQ sasl")                     # the 301st is still seen
        # private: no public way to see it
        self.assertEqual(len(bot.session._caps), finger.IRC_MAX_CAPS + 1)

    def test_a_user_toggling_the_nick_cannot_make_the_bot_flood(self):
        server = ScriptedIRCServer(self)
        irc_bot(self, server, reclaim_interval=60)
        server.expect(r"^NICK fingerbot$")
        server.send(":irc.test 433 * fingerbot :Nickname is already in use")
        server.expect(r"^NICK fingerbot_$")
        server.welcome("fingerbot_")
        server.expect(r"^ISON")
        for number in range(50):                # the holder leaves and comes back, again
            server.send(":fingerbot!u@h NICK :away%d" % number,
                        ":away%d!u@h NICK :fingerbot" % number)
        self.assertEqual(server.expect(r"^NICK"), "NICK fingerbot")
        server.expect_nothing(r"^NICK", 0.3)   # one NICK until the server answers it
        server.send(":irc.test 433 fingerbot_ fingerbot :Nickname is already in use",
                    ":fingerbot!u@h QUIT :bye")
        self.assertEqual(server.expect(r"^NICK"), "NICK fingerbot")


def make_irc_ca(directory):
    """A self-signed CA certificate for 127.0.0.1 (openssl CLI): (cert.pem, key.pem)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    return cert, key


@unittest.skipUnless(shutil.which("openssl"), "needs the openssl command to make a certificate")
class TestIRCTLS(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="finger-test-")
        cls.cert, cls.key = make_irc_ca(cls.directory)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.directory, True)

    def tls_server(self):
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return ScriptedIRCServer(self, context)

    def test_tls_with_a_private_ca(self):
        server = self.tls_server()
        bot = irc_bot(self, server, tls=True, cafile=self.cert)
        server.expect(r"^USER ")
        server.welcome()
        wait_until(lambda: bot.registered)
        server.send(":alice!a@h PRIVMSG fingerbot :moshez")
        self.assertEqual(server.expect(r"^PRIVMSG"),
                         "PRIVMSG alice :Status of moshez: Happy and well")

    def test_unknown_certificate_is_refused(self):
        server = self.tls_server()
        with self.assertLogs("finger", "INFO") as logs:
            bot = irc_bot(self, server, tls=True)          # the system's CAs only
            wait_until(lambda: "attempt 3" in "\n".join(logs.output))
        self.assertFalse(bot.registered)
        self.assertEqual(server.seen, [])
        refused = [record for record in logs.records
                   if "certificate was refused" in record.getMessage()]
        self.assertGreaterEqual(len(refused), 2)
        self.assertEqual([record.levelname for record in refused][:2], ["ERROR", "INFO"])
        self.assertIn("--irc-cafile FILE", refused[0].getMessage())   # the fix, once a streak

    def test_wrong_ca_file_is_named(self):
        other = tempfile.mkdtemp(prefix="finger-ca-")
        self.addCleanup(shutil.rmtree, other)
        server = self.tls_server()
        with self.assertLogs("finger", "ERROR") as logs:
            irc_bot(self, server, tls=True, cafile=make_irc_ca(other)[0])
            wait_until(lambda: "certificate was refused" in "\n".join(logs.output))
        self.assertIn("holds no CA that signed it", "\n".join(logs.output))

    def test_wrong_host_name_is_refused(self):
        server = self.tls_server()
        with self.assertLogs("finger", "WARNING") as logs:
            bot = finger.IRCBot(finger.MemoryDatabase(), "localhost", server.port, tls=True,
                                cafile=self.cert, backoff_cap=0.05)
            start(self, bot)
            wait_until(lambda: "certificate was refused" in "\n".join(logs.output))
        self.assertIn("connect by a name the certificate carries (--irc localhost is not one",
                      "\n".join(logs.output))

# == 11. services and assembly ================================================================

class TestConfigFile(unittest.TestCase):
    def config(self, text):
        return write_file(self, text, name="finger.ini")

    def test_config_file_then_command_line(self):
        users = write_file(self, USERS)
        path = self.config("[finger]\nusers = %s\nfinger = 127.0.0.1:7979\nno-list = yes\n"
                           "status =\n    moshez=Happy\n    shawn=alive\n" % users)
        result = run_finger("--config", path, "--print-config", "--finger", "127.0.0.1:7980")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("users = %s\n" % users, result.stdout)
        self.assertIn("finger = 127.0.0.1:7980\n", result.stdout)    # the command line wins
        self.assertIn("no-list = true\n", result.stdout)
        self.assertIn("status = \n    moshez=Happy\n    shawn=alive\n", result.stdout)

    def test_comments_inside_a_repeated_value(self):
        path = self.config("[finger]\nstatus =\n    alice=hi\n# a comment\n    bob=yo\n")
        result = run_finger("--config", path, "--print-config")
        self.assertIn("status = \n    alice=hi\n    bob=yo\n", result.stdout, result.stderr)

    def test_printed_config_reads_back_the_same(self):
        first = run_finger("--print-config", "--web", "[::1]:8080", "--no-list").stdout
        again = run_finger("--config", self.config(first), "--print-config")
        self.assertEqual((again.returncode, again.stdout), (0, first), again.stderr)

    def test_config_serves(self):
        path = self.config("[finger]\nusers = %s\nfinger = 127.0.0.1:0\nweb = off\n"
                           "setter = off\n" % write_file(self, USERS))
        server = ServerProcess(self, "--config", path)
        self.assertEqual(ask(server.address(), b"shawn\r\n"), b"alive\r\n")

    def test_unknown_key_and_bad_values_name_file_line_and_key(self):
        cases = [("[finger]\n# comment\nuserz = /etc/users\n", ":3: userz: unknown key"),
                 ("[finger]\nfinger = nowhere\n", ":2: finger: expected [HOST:]PORT"),
                 ("[finger]\n\nlog-level = loud\n", ":3: log-level: expected one of"),
                 ("[finger]\nno-list = maybe\n", ":2: no-list: expected true or false"),
                 ("[finger]\nserve = true\n", ":2: serve: unknown key"),
                 ("[fingerd]\nusers = x\n", ":1: unknown section [fingerd]"),
                 ("users = x\n", "File contains no section headers")]
        results = run_finger_all(*(["--serve", "--config", self.config(text)]
                                   for text, _ in cases))
        for (text, message), result in zip(cases, results):
            with self.subTest(text=text):
                self.assertEqual(result.returncode, 2)
                self.assertIn(message, result.stderr)
        result = run_finger("--serve", "--config", "/nonexistent.ini")
        self.assertEqual(result.returncode, 2)
        self.assertIn("/nonexistent.ini", result.stderr)


class TestPrivacyOptions(unittest.TestCase):
    """--no-list keeps the list from every front-end; names asked one by one still work."""

    def test_no_list_holds_on_every_front_end(self):
        import json
        import xmlrpc.client
        server = ServerProcess(self, "--users", readable_users(self), "--finger", "127.0.0.1:0",
                               "--web", "127.0.0.1:0", "--pb", "127.0.0.1:0", "--setter",
                               "off", "--no-list")
        finger_address = server.address("finger")
        web = server.address("web")
        pb = server.address("pb")
        self.assertEqual(ask(finger_address, b"\r\n"), b"Finger online user list denied\r\n")
        self.assertEqual(ask(finger_address, b"/W\r\n"), b"Finger online user list denied\r\n")
        self.assertEqual(ask(finger_address, b"moshez\r\n"), b"Happy and well\r\n")
        status, _, body = http(web, "GET", "/")
        self.assertEqual(status, 403)
        self.assertNotIn(b"moshez", body)
        self.assertNotIn(b"shawn", body)
        status, _, body = http(web, "GET", "/api/users")
        self.assertEqual((status, json.loads(body)), (403, {"error": finger.LIST_DENIED}))
        self.assertEqual(http(web, "GET", "/moshez")[0], 200)
        self.assertEqual(http(web, "GET", "/api/users/moshez")[0], 200)
        with xmlrpc.client.ServerProxy("http://%s:%d/RPC2" % web) as proxy:
            with self.assertRaises(xmlrpc.client.Fault) as caught:
                proxy.getUsers()
            self.assertEqual(caught.exception.faultCode, finger.RPC_APPLICATION_ERROR)
            self.assertEqual(proxy.getUser("shawn"), "alive")
        client = PBTestClient(self, pb)
        kind, failure = client.call("getUsers")
        self.assertEqual(kind, "error")
        self.assertIn(finger.LIST_DENIED, str(failure))
        self.assertEqual(client.call("getUser", "moshez"), ("answer", "Happy and well"))

    def test_the_list_is_served_without_the_option(self):
        db = finger.MemoryDatabase({"moshez": "Happy and well"})
        site = finger.WebSite(db)
        self.assertEqual(site.handle("GET", "/api/users").body,
                         b'[{"user": "moshez", "status": "Happy and well"}]\n')
        db.listable = False
        self.assertEqual(site.handle("GET", "/api/users").status, 403)
        with self.assertRaises(finger.ListRefused):
            db.public_users()
        self.assertEqual(db.get_users(), ["moshez"])       # the server's own use


def check_config(test, *args):
    """finger.py --check-config ARGS -> (exit code, stderr)."""
    result = run_finger("--check-config", *args)
    return result.returncode, result.stderr


class TestCheckConfig(unittest.TestCase):
    """--check-config and the warnings --serve logs at start."""

    def setUp(self):
        self.users = readable_users(self, USERS)
        self.port = free_port()
        self.readme = ["--users", self.users, "--finger", "127.0.0.1:%d" % self.port,
                       "--web", "off", "--user", pwd.getpwuid(os.geteuid()).pw_name]

    def test_a_printed_configuration_passes(self):
        printed = run_finger("--print-config", *self.readme).stdout
        result = run_finger("--check-config", "--config", write_file(self, printed, "ini"))
        self.assertEqual((result.returncode, result.stderr), (0, ""))

    def test_the_readme_example_passes(self):
        result = run_finger("--check-config", *self.readme)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertIn("finger, setter", result.stdout)
        with self.assertRaises(OSError):
            ask((LOCALHOST, self.port), b"moshez\r\n")       # nothing was served

    def test_broken_cases_exit_2_with_one_line_each(self):
        cases = [
            (["--cert", "x.pem"], "--cert: ignored, it applies only with --https"),
            (["--status", "moshez=x"], "--status: ignored, it applies only with --backend "
                                       "memory"),
            (["--web-prefix", "http://x/"], "--web-prefix: ignored"),
            (["--irc-nick", "bot"], "--irc-nick: ignored, it applies only with --irc"),
            (["--users", "/nonexistent/users"], "cannot read users file"),
            (["--backend", "nosuch"], "--backend nosuch: unknown"),
        ]
        if not os.path.exists(finger.SYSLOG_SOCKET):
            cases.append((["--syslog"], "no syslog daemon listens at"))
        results = run_finger_all(*(["--check-config", *self.readme, *extra]
                                   for extra, _ in cases))
        for (extra, message), result in zip(cases, results):
            code, err = result.returncode, result.stderr
            self.assertEqual(code, 2, (extra, err))
            self.assertIn(message, err)
            self.assertTrue(all(line.startswith("finger.py: ") for line in err.splitlines()),
                            err)

    @unittest.skipUnless(os.geteuid() == 0, "running as another user needs root")
    def test_setter_that_cannot_replace_the_users_file(self):
        directory = os.path.dirname(self.users)        # root's, 0755
        args = ["--users", self.users, "--finger", "127.0.0.1:%d" % self.port, "--web",
                "off", "--setter", "127.0.0.1:0", "--user", "nobody"]
        code, err = check_config(self, *args)
        self.assertEqual(code, 2)
        self.assertIn("setter: nobody cannot replace %s" % self.users, err)
        self.assertIn("chown nobody that directory", err)
        self.assertIn(directory, err)
        self.assertIn("--setter off", err)
        self.assertEqual(check_config(self, *args[:4], "--web", "off", "--setter", "off",
                                      "--user", "nobody")[0], 0)
        os.chown(directory, pwd.getpwnam("nobody").pw_uid, -1)
        self.assertEqual(check_config(self, *args)[0], 0)
        os.chown(directory, 0, -1)
        os.chmod(self.users, 0o600)
        code, err = check_config(self, *args[:4], "--web", "off", "--setter", "off",
                                 "--user", "nobody")
        self.assertIn("nobody cannot read it", err)

    @unittest.skipUnless(os.geteuid() == 0, "running as another user needs root")
    def test_what_the_run_as_user_reaches_through_links_and_sticky_directories(self):
        nobody = ("nobody", pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
        hidden = tempfile.mkdtemp()                          # root's, 0700
        self.addCleanup(shutil.rmtree, hidden)
        target = os.path.join(hidden, "users")
        with open(target, "w") as f:
            f.write(USERS)
        os.chmod(target, 0o644)
        link = os.path.join(os.path.dirname(self.users), "link")
        os.symlink(target, link)
        self.assertTrue(finger.may_access(self.users, nobody, os.R_OK))
        self.assertFalse(finger.may_access(link, nobody, os.R_OK))
        sticky = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, sticky)
        os.chmod(sticky, 0o1777)
        in_sticky = os.path.join(sticky, "users")
        with open(in_sticky, "w") as f:
            f.write(USERS)
        reason, fix = finger.replace_problem(in_sticky, nobody)
        self.assertIn("sticky", reason)
        self.assertEqual(fix, "chown nobody the file, or move it to a directory of its own")
        os.chown(in_sticky, nobody[1], nobody[2])
        self.assertIsNone(finger.replace_problem(in_sticky, nobody))

    def test_a_plugin_may_use_any_back_end_option(self):
        directory = os.path.dirname(self.users)
        with open(os.path.join(directory, "fileplugin.py"), "w") as f:
            f.write("import finger\n"
                    "def Plugin(users, **rest):\n"
                    "    return finger.FileDatabase(users)\n")
        result = run_finger("--check-config", *self.readme, "--setter", "off", "--backend",
                            "fileplugin:Plugin", env=dict(os.environ, PYTHONPATH=directory))
        self.assertEqual((result.returncode, result.stderr), (0, ""))

    @unittest.skipUnless(os.geteuid() == 0, "running as another user needs root")
    def test_serve_warns_at_start(self):
        server = ServerProcess(self, "--users", self.users, "--finger", "127.0.0.1:0",
                               "--web", "off", "--setter", "127.0.0.1:0", "--user", "nobody",
                               "--cert", "x.pem")
        server.expect(r"WARNING --cert: ignored, it applies only with --https")
        server.expect(r"WARNING setter: nobody cannot replace")
        server.address("finger")

    def test_syslog_without_a_daemon_exits_2(self):
        if os.path.exists(finger.SYSLOG_SOCKET):
            self.skipTest("a syslog daemon is running")
        result = run_finger("--serve", *self.readme, "--syslog")
        self.assertEqual(result.returncode, 2)
        self.assertIn("no syslog daemon", result.stderr)

    @unittest.skipUnless(shutil.which("openssl"), "needs openssl to make certificates")
    def test_certificate_problems_are_sentences(self):
        directory = os.path.dirname(self.users)
        with open(make_certificate(directory, "both.pem")) as f:
            pem = f.read()
        cert_only = os.path.join(directory, "cert.pem")
        with open(cert_only, "w") as f:
            f.write(pem[pem.index("-----BEGIN CERTIFICATE-----"):])
        code, err = check_config(self, *self.readme, "--https", "127.0.0.1:0", "--cert",
                                 cert_only)
        self.assertEqual(code, 2)
        self.assertIn("holds no private key; give its file with --key FILE", err)
        self.assertNotIn("PEM lib", err)
        one, two = os.path.join(directory, "both.pem"), make_certificate(directory, "two.pem")
        with open(two) as f:
            text = f.read()
        key = os.path.join(directory, "two.key")
        with open(key, "w") as f:
            f.write(text[text.index("-----BEGIN PRIVATE KEY-----"):])
        with self.assertRaises(finger.UsageError) as caught:
            finger.make_tls_context(one, key)
        self.assertNotIn("_ssl.c", str(caught.exception))
        self.assertIn("the private key does not belong to the certificate",
                      str(caught.exception))
        encrypted = os.path.join(directory, "encrypted.key")
        subprocess.run(["openssl", "pkey", "-in", key, "-aes256", "-passout", "pass:x", "-out",
                        encrypted], check=True, capture_output=True, timeout=60)
        with self.assertRaises(finger.UsageError) as caught:     # never asks on a terminal
            finger.make_tls_context(one, encrypted)
        self.assertIn("the key is encrypted", str(caught.exception))


def copy_options(options, **changes):
    """Another namespace with the values of `options` and `changes`."""
    import argparse
    return argparse.Namespace(**dict(vars(options), **changes))


class TestReloadingTheConfiguration(unittest.TestCase):
    """SIGHUP reads --config again: what can change without binding changes now."""

    def test_sighup_applies_what_it_can_and_names_the_rest(self):
        users = readable_users(self)
        path = write_file(self, "[finger]\nusers = %s\nfinger = 127.0.0.1:0\nweb = off\n"
                                "setter = off\n" % users, "finger.ini")
        server = ServerProcess(self, "--config", path)
        address = server.address()
        self.assertIn(b"moshez", ask(address, b"\r\n"))
        replace_file(path, ("[finger]\nusers = %s\nfinger = 127.0.0.1:1\nweb = off\n"
                            "setter = off\nno-list = yes\nlog-queries = yes\n"
                            "request-timeout = 3\n" % users).encode())
        server.process.send_signal(signal.SIGHUP)
        server.expect(r"SIGHUP: --finger changed in \S+finger\.ini; they take effect at the "
                      r"next start")
        wait_until(lambda: ask(address, b"\r\n") == b"Finger online user list denied\r\n")
        self.assertEqual(ask(address, b"moshez\r\n"), b"Happy and well\r\n")  # same port
        server.expect(r'finger 127\.0\.0\.1:\d+ "moshez" ok')           # the query log is on
        replace_file(path, b"[finger]\nusres = x\n")
        server.process.send_signal(signal.SIGHUP)
        server.expect(r"ERROR SIGHUP: .*usres: unknown key; .* the configuration in use stays")
        self.assertEqual(ask(address, b"\r\n"), b"Finger online user list denied\r\n")

    def test_templates_are_read_again_and_a_broken_one_changes_nothing(self):
        directory = os.path.dirname(write_file(self, "<p>$users</p>", "users.html"))
        with open(os.path.join(directory, "user.html"), "w") as f:
            f.write("<p>one: $status</p>")
        db = finger.MemoryDatabase({"moshez": "hi"})
        options = finger.default_options(finger="127.0.0.1:0", web="127.0.0.1:0",
                                         setter="off", templates=directory)
        group = finger.build_services(options, db=db)
        site = group.by_name("web").site
        with open(os.path.join(directory, "user.html"), "w") as f:
            f.write("<p>two: $status</p>")                       # edited in place
        finger.apply_options(group, options, copy_options(options))
        self.assertIn(b"two: hi", site.handle("GET", "/moshez").body)
        with open(os.path.join(directory, "user.html"), "w") as f:
            f.write("<p>$nosuch</p>")
        with self.assertRaises(finger.UsageError):
            finger.apply_options(group, options, copy_options(options, no_list=True))
        self.assertIn(b"two: hi", site.handle("GET", "/moshez").body)
        self.assertTrue(db.listable and not options.no_list)       # nothing applied

    def test_forwarders_take_the_new_backend_timeout(self):
        options = finger.default_options(finger="127.0.0.1:0", web="off", setter="off",
                                         forward=True, proxy="127.0.0.1:0")
        group = finger.build_services(options, db=finger.MemoryDatabase())
        finger.apply_options(group, options, copy_options(options, backend_timeout=0.5))
        self.assertEqual([group.by_name(name).protocol.forwarder.timeout
                          for name in ("finger", "proxy")], [0.5, 0.5])

    def test_apply_options_changes_the_running_services(self):
        db = finger.MemoryDatabase({"moshez": "hi"})
        options = finger.default_options(finger="127.0.0.1:0", web="off", setter="127.0.0.1:0")
        group = finger.build_services(options, db=db)
        new = finger.default_options(finger="127.0.0.1:0", web="off", setter="127.0.0.1:0",
                                     no_list=True, max_status=10, per_client_rate=5,
                                     timeout=2.5, pb="127.0.0.1:0")
        self.assertEqual(finger.apply_options(group, options, new), ["pb"])
        setter = group.by_name("setter")
        self.assertEqual((db.listable, setter.protocol.max_status, setter.timeout,
                          setter.limits.rate), (False, 10, 2.5, 5))
        self.assertIsNone(options.pb)                    # still what runs


class TestServeCommand(unittest.TestCase):
    def serve(self, *args, **popen):
        users = write_file(self, USERS)
        return ServerProcess(self, "--users", users, "--finger", "127.0.0.1:0", "--web", "off",
                             "--setter", "off", *args, **popen)

    def test_query_log_off_by_default_on_with_the_option_and_flushed_at_stop(self):
        logfile = os.path.join(tempfile.mkdtemp(prefix="finger-test-"), "finger.log")
        self.addCleanup(shutil.rmtree, os.path.dirname(logfile), True)
        address, setter = (LOCALHOST, free_port()), (LOCALHOST, free_port())
        for option in ([], ["--log-queries"]):
            with self.subTest(option=option):
                server = self.serve("--logfile", logfile, "--finger", "%s:%d" % address,
                                    "--setter", "%s:%d" % setter, *option)
                wait_until(lambda: os.path.exists(logfile)
                           and "serving setter" in _read(logfile))
                for number in range(300):
                    ask(address, b"moshez\r\n" if number % 2 else b"nobody\r\n")
                self.assertEqual(set_over(setter, b"moshez\nTop secret plans\n"), b"OK\r\n")
                server.process.send_signal(signal.SIGTERM)       # at once: the stop flushes
                self.assertEqual(server.process.wait(TIMEOUT), 0)
                text = _read(logfile)
                os.unlink(logfile)
                queries = [line for line in text.splitlines() if '"' in line]
                self.assertNotIn("Top secret", text)
                if not option:
                    self.assertEqual(queries, [])
                    continue
                self.assertEqual(len(queries), 301, text[-500:])
                line = re.compile(r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO '
                                  r'(finger 127\.0\.0\.1:\d+ "(moshez" ok|nobody" unknown)'
                                  r'|setter 127\.0\.0\.1:\d+ "moshez" set) \d+\.\dms$')
                for query in queries:
                    self.assertRegex(query, line)

    def test_serves_logs_and_stops_on_sigterm_and_sigint(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum):
                server = self.serve("--log-queries")
                address = server.address()
                idle = connect(self, address)
                # answered after idle was accepted: the listener accepts in order
                self.assertEqual(ask(address, b"moshez\r\n"), b"Happy and well\r\n")
                server.expect(r'finger 127\.0\.0\.1:\d+ "moshez" ok [\d.]+ms')
                started = time.monotonic()
                server.process.send_signal(signum)
                self.assertEqual(server.process.wait(TIMEOUT), 0)
                self.assertLess(time.monotonic() - started, 2.0)
                self.assertEqual(idle.recv(10), b"")

    def test_users_file_is_reloaded(self):
        users = write_file(self, USERS)
        server = ServerProcess(self, "--users", users, "--finger", "127.0.0.1:0", "--web", "off",
                               "--setter", "off", "--reload", "0.05")
        address = server.address()
        replace_file(users, "moshez: Reloaded\n")
        wait_until(lambda: ask(address, b"moshez\r\n") == b"Reloaded\r\n")

    def test_sighup_reloads_now(self):
        users = write_file(self, USERS)
        server = ServerProcess(self, "--users", users, "--finger", "127.0.0.1:0", "--web", "off",
                               "--setter", "off", "--reload", "0")
        address = server.address()
        replace_file(users, "moshez: Hung up\n")
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: ask(address, b"moshez\r\n") == b"Hung up\r\n")

    def test_missing_users_file_exits_2_naming_it(self):
        result = run_finger("--serve", "--users", "/nonexistent/users", "--finger", "off")
        self.assertEqual(result.returncode, 2)
        self.assertIn("/nonexistent/users", result.stderr)
        self.assertIn("users.example", result.stderr)

    def test_bad_listener_value_exits_2_naming_the_option(self):
        results = run_finger_all(*(["--serve", option, "nonsense"]
                                   for option in LISTENER_OPTIONS))
        for option, result in zip(LISTENER_OPTIONS, results):
            with self.subTest(option=option):
                self.assertEqual(result.returncode, 2)
                self.assertIn("argument %s" % option, result.stderr)

    def test_every_listener_off_exits_2(self):
        users = write_file(self, USERS)
        args = ["--serve", "--users", users]
        for option in LISTENER_OPTIONS:
            args += [option, "off"]
        result = run_finger(*args)
        self.assertEqual(result.returncode, 2)
        self.assertIn("nothing to serve", result.stderr)

    def test_port_in_use_fails_with_a_message(self):
        with socket.socket() as taken:
            taken.bind((LOCALHOST, 0))
            taken.listen()
            users = write_file(self, USERS)
            result = run_finger("--serve", "--users", users, "--web", "off", "--setter", "off",
                                "--finger", "127.0.0.1:%d" % taken.getsockname()[1])
            self.assertEqual(result.returncode, 1)
            self.assertIn("--finger 127.0.0.1:%d: cannot listen" % taken.getsockname()[1],
                          result.stderr)

    @unittest.skipUnless(hasattr(os, "geteuid"), "POSIX only")
    def test_privileged_port_without_the_privilege_suggests_a_high_port(self):
        users = write_file(self, USERS)
        command = [sys.executable, FINGER_PY]
        if os.geteuid() == 0:     # root without CAP_NET_BIND_SERVICE is refused like anyone
            if not shutil.which("setpriv"):
                self.skipTest("running as root and setpriv (util-linux) is missing")
            command[:0] = ["setpriv", "--bounding-set", "-net_bind_service", "--inh-caps",
                           "-net_bind_service"]
        result = subprocess.run(command + ["--serve", "--users", users, "--web", "off",
                                           "--setter", "off", "--finger", "127.0.0.1:79"],
                                capture_output=True, text=True, timeout=15)
        self.assertEqual(result.returncode, 1)
        self.assertIn("ports below 1024 need root", result.stderr)
        self.assertIn("--finger 127.0.0.1:7979", result.stderr)

    def test_a_failed_bind_closes_the_listeners_already_bound(self):
        with socket.socket() as taken:
            taken.bind((LOCALHOST, 0))
            taken.listen()
            options = finger.default_options(finger="127.0.0.1:0", setter="off",
                                             web="127.0.0.1:%d" % taken.getsockname()[1])
            group = finger.build_services(options, finger.MemoryDatabase())
            with self.assertRaises(finger.FingerError):
                group.start()
        # private: no public way to see it
        self.assertEqual(group.services[0]._listener.fileno(), -1)
        self.assertIsNone(_try_ask(group.services[0].address))       # nobody listens

LISTENER_OPTIONS = ["--" + name for name in finger.LISTENERS]


class TestPythonAPI(unittest.TestCase):
    def test_build_services_from_options(self):
        options = finger.default_options(finger="127.0.0.1:0", web="off", setter="off")
        db = finger.MemoryDatabase({"moshez": "Happy and well"})
        with finger.build_services(options, db) as services:
            address = services.by_name("finger").address
            self.assertEqual(ask(address, b"moshez\r\n"), b"Happy and well\r\n")
        self.assertIsNone(_try_ask(address))

    def test_build_services_reads_the_users_file(self):
        users = write_file(self, USERS)
        options = finger.default_options(finger="127.0.0.1:0", web="off", setter="off",
                                         users=users, no_list=True)
        with finger.build_services(options) as services:
            address = services.by_name("finger").address
            self.assertEqual(ask(address, b"shawn\r\n"), b"alive\r\n")
            self.assertEqual(ask(address, b"\r\n"), b"Finger online user list denied\r\n")

    def test_unknown_option_is_an_error(self):
        with self.assertRaises(TypeError):
            finger.default_options(colour="blue")

# == 12. process: privileges, daemon, logging, systemd, signals ===============================

class TestSignals(unittest.TestCase):
    def serve(self):
        server = ServerProcess(self, "--users", write_file(self, USERS), "--finger",
                               "127.0.0.1:0", "--web", "off", "--setter", "off")
        return server, server.address()

    def test_sighup_storm(self):
        server, address = self.serve()
        for _ in range(100):
            server.process.send_signal(signal.SIGHUP)
        for _ in range(20):
            self.assertEqual(ask(address, b"moshez\r\n"), b"Happy and well\r\n")
        self.assertIsNone(server.process.poll())

    def test_sigterm_under_load_finishes_answers_and_exits_cleanly(self):
        server, address = self.serve()
        replies, stop = [], threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    replies.append(ask(address, b"moshez\r\n", timeout=2))
                except OSError:
                    replies.append(None)          # refused once the listener is closed

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(replies) > 200)
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(finger.DEFAULT_STOP_TIMEOUT), 0)
        stop.set()
        for thread in threads:
            thread.join()
        answered = [reply for reply in replies if reply is not None]
        self.assertGreater(len(answered), 200)
        self.assertLessEqual(set(answered), {b"Happy and well\r\n", b"",
                                              b"Server busy, try again later\r\n"})

    def test_sighup_with_a_memory_backend(self):
        server = ServerProcess(self, "--backend", "memory", "--status", "a=b", "--finger",
                               "127.0.0.1:0", "--web", "off", "--setter", "off")
        address = server.address()
        server.process.send_signal(signal.SIGHUP)
        self.assertEqual(ask(address, b"a\r\n"), b"b\r\n")
        server.process.terminate()
        self.assertEqual(server.process.wait(TIMEOUT), 0)
        self.assertFalse(any("Traceback" in line or "ERROR" in line for line in server.log))

    def test_sigterm_does_not_wait_for_a_stuck_lookup(self):
        directory = os.path.dirname(write_file(self, SLOW_PLUGIN, name="stuckplugin.py"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([directory, HERE]))
        server = ServerProcess(self, "--backend", "stuckplugin:Stuck", "--finger",
                               "127.0.0.1:0", "--web", "off", "--setter", "off",
                               "--stop-timeout", "1", env=env)
        stuck = connect(self, server.address())
        stuck.sendall(b"moshez\r\n")
        time.sleep(0.2)                                # the lookup is under way
        started = time.monotonic()
        server.process.terminate()
        self.assertEqual(server.process.wait(TIMEOUT), 0)
        self.assertLess(time.monotonic() - started, 3)
        server.expect("still running after 1 s")


class TestPrivileges(unittest.TestCase):
    def serve(self, *args):
        server = ServerProcess(self, "--users", readable_users(self), "--finger", "127.0.0.1:0",
                               "--web", "off", "--setter", "off", *args)
        return server, server.address()

    def test_root_without_user_becomes_nobody_after_binding(self):
        if os.geteuid() != 0:
            self.skipTest("privilege drop needs root")
        server, address = self.serve("--user", "nobody")
        nobody = pwd.getpwnam("nobody")
        self.assertEqual(proc_status(server.process.pid),
                         ([nobody.pw_uid] * 4, [nobody.pw_gid] * 4))
        self.assertEqual(ask(address, b"moshez\r\n"), b"Happy and well\r\n")
        self.assertTrue(any("running as nobody" in line for line in server.log))

    def test_default_is_nobody_and_root_must_be_asked_for(self):
        if os.geteuid() != 0:
            self.skipTest("privilege drop needs root")
        process = subprocess.Popen([sys.executable, FINGER_PY, "--serve", "--users",
                                    readable_users(self), "--finger", "127.0.0.1:0", "--web",
                                    "off", "--setter", "off"], stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        for line in process.stderr:
            if "serving finger" in line:
                break
        self.assertEqual(proc_status(process.pid)[0], [65534] * 4)
        server, _ = self.serve("--user", "root")
        self.assertEqual(proc_status(server.process.pid)[0], [0] * 4)

    def test_group_option_and_supplementary_groups(self):
        if os.geteuid() != 0:
            self.skipTest("privilege drop needs root")
        server, _ = self.serve("--user", "nobody", "--group", "daemon")
        self.assertEqual(proc_status(server.process.pid)[1], [grp.getgrnam("daemon").gr_gid] * 4)
        with open("/proc/%d/status" % server.process.pid) as f:
            groups = [line for line in f if line.startswith("Groups:")][0].split()[1:]
        self.assertNotIn("0", groups)

    def test_unknown_user_exits_2(self):
        result = run_finger("--serve", "--users", readable_users(self), "--finger",
                            "127.0.0.1:0", "--web", "off", "--setter", "off", "--user",
                            "no-such-user-here")
        self.assertEqual(result.returncode, 2)
        self.assertIn("no-such-user-here", result.stderr)


@unittest.skipUnless(sys.platform.startswith("linux"), "uses /proc")
class TestDaemon(unittest.TestCase):
    def daemon_args(self, *extra):
        self.directory = tempfile.mkdtemp(prefix="finger-test-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        os.chmod(self.directory, 0o755)
        self.pidfile = os.path.join(self.directory, "finger.pid")
        self.logfile = os.path.join(self.directory, "finger.log")
        self.port = free_port()
        return ["--serve", "--daemon", "--users", readable_users(self), "--finger",
                "127.0.0.1:%d" % self.port, "--web", "off", "--setter", "off", "--pidfile",
                self.pidfile, "--logfile", self.logfile, "--user", "root", *extra]

    def stop_daemon(self):
        pid = finger._read_pid(self.pidfile)
        if pid and finger._alive(pid):
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not finger._alive(pid))

    def test_daemon_detaches_once_serving_and_stops_on_sigterm(self):
        result = run_finger(*self.daemon_args("--rundir", "/tmp"))
        self.addCleanup(self.stop_daemon)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))
        pid = finger._read_pid(self.pidfile)
        self.assertTrue(pid and finger._alive(pid))
        self.assertEqual(ask((LOCALHOST, self.port), b"moshez\r\n"), b"Happy and well\r\n")
        self.assertEqual(os.readlink("/proc/%d/cwd" % pid), "/tmp")
        with open("/proc/%d/stat" % pid) as f:
            state, parent, group, session, tty = f.read().rsplit(")", 1)[1].split()[:5]
        self.assertEqual((group, tty), (session, "0"))   # in a session of its own, no tty,
        self.assertNotEqual(int(session), pid)           # not its leader: it cannot get one
        self.assertEqual(os.readlink("/proc/%d/fd/0" % pid), "/dev/null")
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not finger._alive(pid))
        self.assertFalse(os.path.exists(self.pidfile))
        with open(self.logfile) as f:
            log_text = f.read()
        self.assertIn("serving finger", log_text)
        self.assertIn("stopping", log_text)

    def test_daemon_that_cannot_bind_fails_in_the_foreground(self):
        with socket.socket() as taken:
            taken.bind((LOCALHOST, 0))
            taken.listen()
            args = self.daemon_args()
            args[args.index("127.0.0.1:%d" % self.port)] = "127.0.0.1:%d" % taken.getsockname()[1]
            result = run_finger(*args)
        self.assertEqual(result.returncode, 1)
        self.assertIn("cannot listen", result.stderr)
        self.assertFalse(os.path.exists(self.pidfile))       # no pidfile with a dead PID
        self.assertIn("cannot start: ", _read(self.logfile))   # and the log says why

    def test_pidfile_of_a_live_process_refuses_and_a_stale_one_is_replaced(self):
        args = self.daemon_args()
        with open(self.pidfile, "w") as f:
            f.write("%d\n" % os.getpid())              # alive: this test
        result = run_finger(*args)
        self.assertEqual(result.returncode, 1)
        self.assertIn("process %d is running" % os.getpid(), result.stderr)
        dead = subprocess.Popen(["true"])
        dead.wait()
        with open(self.pidfile, "w") as f:
            f.write("%d\n" % dead.pid)
        result = run_finger(*args)
        self.addCleanup(self.stop_daemon)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotEqual(finger._read_pid(self.pidfile), dead.pid)

    def test_logfile_is_reopened_on_sighup(self):
        result = run_finger(*self.daemon_args("--log-queries"))
        self.addCleanup(self.stop_daemon)
        self.assertEqual(result.returncode, 0, result.stderr)
        pid = finger._read_pid(self.pidfile)
        os.rename(self.logfile, self.logfile + ".1")           # what logrotate does
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: os.path.exists(self.logfile))
        ask((LOCALHOST, self.port), b"moshez\r\n")
        wait_until(lambda: '"moshez" ok' in _read(self.logfile))

    def test_every_option_naming_a_file_is_made_absolute(self):
        """--daemon and --rundir change directory: every option naming a file is made
        absolute (--rundir itself is used before that), found by its metavar."""
        parser = finger.build_parser(server=True)
        named = {action.dest for action in parser._actions
                 if action.metavar in ("FILE", "DIR", "PATH")} - {"rundir"}
        options = finger.default_options(**{name: "relative" for name in named})
        finger._absolute_paths(options)
        self.assertEqual({name for name in named
                          if getattr(options, name) != os.path.abspath("relative")}, set())
        self.assertEqual(parser.mode_options | {"--config"}, set(finger.SERVER_WORDS))

    def test_every_module_imported_on_first_use_is_loaded_before_the_chroot(self):
        """A module a function imports while serving must be in SERVER_MODULES, or it
        cannot be found inside a chroot without the standard library."""
        import ast
        with open(FINGER_PY) as f:
            tree = ast.parse(f.read())
        imported = set()
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef):
                for node in ast.walk(function):
                    if isinstance(node, ast.Import):
                        imported.update(alias.name for alias in node.names)
                    elif isinstance(node, ast.ImportFrom):
                        imported.add(node.module)
        at_start = {"configparser", "difflib", "resource", "shutil", "logging.handlers",
                    "http.server", "xmlrpc.server",             # imported before binding,
                    "http.client", "xmlrpc.client", "xml.parsers"}  # or by those
        self.assertEqual(imported - set(finger.SERVER_MODULES) - at_start, set())

    def test_chroot(self):
        if os.geteuid() != 0:
            self.skipTest("chroot needs root")
        jail = tempfile.mkdtemp(prefix="finger-jail-")
        self.addCleanup(shutil.rmtree, jail, True)
        os.chmod(jail, 0o755)
        users = os.path.join(jail, "users")
        with open(users, "w") as f:
            f.write(USERS)
        os.chmod(users, 0o644)
        os.chmod(jail, 0o777)                       # nobody writes the users file there
        server = ServerProcess(self, "--users", users, "--finger", "127.0.0.1:0", "--web",
                               "127.0.0.1:0", "--setter", "127.0.0.1:0", "--chroot", jail,
                               "--reload", "0.05", "--user", "nobody")
        address = server.address()
        web, setter = server.address("web"), server.address("setter")
        self.assertEqual(os.readlink("/proc/%d/root" % server.process.pid),
                         os.path.realpath(jail))
        replace_file(users, "moshez: Jailed\n")
        os.chmod(users, 0o644)
        wait_until(lambda: ask(address, b"moshez\r\n") == b"Jailed\r\n")
        # modules imported on first use were imported before the chroot
        self.assertEqual(http(web, "GET", "/api/users/moshez")[0], 200)
        os.chmod(users, 0o666)
        self.assertEqual(set_over(setter, b"shawn\nin jail\n"), b"OK\r\n")

    def test_relative_paths_survive_rundir(self):
        users = write_file(self, USERS)
        server = ServerProcess(self, "--users", os.path.basename(users), "--finger",
                               "127.0.0.1:0", "--web", "off", "--setter", "127.0.0.1:0",
                               "--rundir", "/", cwd=os.path.dirname(users))
        finger_address, setter_address = server.address("finger"), server.address("setter")
        self.assertEqual(set_over(setter_address, b"shawn\nmoved\n"), b"OK\r\n")
        self.assertEqual(ask(finger_address, b"shawn\r\n"), b"moved\r\n")


class TestSyslog(unittest.TestCase):
    def test_syslog_with_prefix(self):
        if os.path.exists("/dev/log"):
            self.skipTest("/dev/log belongs to a running syslog daemon")
        if os.geteuid() != 0:
            self.skipTest("making a /dev/log for the test needs root")
        syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(syslog.close)
        try:
            syslog.bind("/dev/log")
        except OSError as error:
            self.skipTest("cannot make /dev/log: %s" % error)
        self.addCleanup(os.unlink, "/dev/log")
        syslog.settimeout(TIMEOUT)
        process = subprocess.Popen([sys.executable, FINGER_PY, "--serve", "--users",
                                    write_file(self, USERS), "--finger", "127.0.0.1:0", "--web",
                                    "off", "--setter", "off", "--syslog", "--prefix",
                                    "fingertest", "--user", "root"], stderr=subprocess.PIPE)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        self.assertRegex(syslog.recv(1000), rb"^<30>fingertest\[%d\]: loaded 2 users"
                         % process.pid)
        while b"serving finger" not in syslog.recv(1000):
            pass
        process.terminate()
        self.assertEqual(process.wait(TIMEOUT), 0)
        self.assertEqual(process.stderr.read(), b"")     # nothing on stderr
        process.stderr.close()


class TestSystemd(unittest.TestCase):
    def test_socket_activation_by_name_and_readiness_notification(self):
        listeners = []
        for _ in range(2):
            sock = socket.socket()
            sock.bind((LOCALHOST, 0))
            sock.listen()
            self.addCleanup(sock.close)
            listeners.append(sock)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(notify.close)
        notify.bind(os.path.join(directory, "notify"))
        notify.settimeout(TIMEOUT)

        def pass_sockets():          # in the child: the sockets become fds 3 and 4
            import fcntl
            high = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 100) for sock in listeners]
            for number, fd in enumerate(high, 3):
                os.dup2(fd, number)
                os.set_inheritable(number, True)

        env = dict(os.environ, LISTEN_FDS="2", LISTEN_FDNAMES="finger:web",
                   NOTIFY_SOCKET=os.path.join(directory, "notify"))
        # LISTEN_PID must be the server's own pid: sh sets it to $$ and execs python there.
        process = subprocess.Popen(
            ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"', sys.executable, FINGER_PY,
             "--serve", "--users", write_file(self, USERS), "--setter", "off", "--user",
             "root" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name],
            env=env, preexec_fn=pass_sockets, close_fds=False, stderr=subprocess.DEVNULL)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        self.assertTrue(notify.recv(1000).startswith(b"READY=1\nSTATUS=serving finger, web"))
        self.assertEqual(ask(listeners[0].getsockname(), b"moshez\r\n"), b"Happy and well\r\n")
        self.assertEqual(http(listeners[1].getsockname(), "GET", "/shawn")[0], 200)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(notify.recv(1000), b"STOPPING=1")
        self.assertEqual(process.wait(TIMEOUT), 0)

    def test_sockets_for_another_process_or_unknown_names(self):
        env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
        self.assertEqual(finger.systemd_sockets(env), {})
        sock = socket.socket()
        self.addCleanup(sock.close)
        options = finger.default_options()
        with self.assertRaises(finger.UsageError):
            finger.build_services(options, finger.MemoryDatabase(), sockets={"gopher": sock})


class TestPackaging(unittest.TestCase):
    def test_make_install_and_uninstall_with_destdir(self):
        if not shutil.which("make"):
            self.skipTest("no make")
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        make = ["make", "-s", "-C", HERE, "DESTDIR=" + root, "PREFIX=/opt/finger"]
        subprocess.run(make + ["install"], check=True, capture_output=True, timeout=60)
        script = os.path.join(root, "opt/finger/bin/finger.py")
        self.assertTrue(os.access(script, os.X_OK))
        with open(os.path.join(root, "opt/finger/lib/systemd/system/finger.service")) as f:
            unit = f.read()
        self.assertIn("ExecStart=/usr/bin/python3 /opt/finger/bin/finger.py", unit)
        self.assertIn("ExecStartPre=/usr/bin/python3 /opt/finger/bin/finger.py --check-config",
                      unit)
        with open(os.path.join(root, "etc/finger/finger.ini")) as f:
            self.assertIn("\nusers = /var/lib/finger/users\n", f.read())
        page = os.path.join(root, "opt/finger/share/man/man1/finger.py.1")
        with open(page) as f:
            self.assertTrue(f.read().startswith(".TH FINGER.PY 1 "))
        subprocess.run(make + ["uninstall"], check=True, capture_output=True, timeout=60)
        self.assertFalse(os.path.exists(script))
        self.assertFalse(os.path.exists(page))
        self.assertFalse(os.path.exists(os.path.join(root, "opt/finger/share/doc/finger-py")))

    def test_man_page_has_every_option_from_the_parsers(self):
        page = finger.man_page()
        for parser in (finger.build_parser(), finger.build_parser(server=True)):
            for action in parser._actions:
                for name in action.option_strings:
                    self.assertIn("\\fB%s\\fR" % name.replace("-", "\\-"), page)
        for line in page.splitlines():        # no text line that troff takes for a request
            self.assertTrue(not line.startswith((".", "'")) or re.match(
                r"\.(TH|SH|SS|TP|PP|B|br|nf|fi)( |$)", line), line)
        if shutil.which("groff"):
            result = subprocess.run(["groff", "-man", "-Tutf8", "-ww"], input=page,
                                    capture_output=True, text=True, timeout=30)
            self.assertEqual(result.stderr, "")
            self.assertIn("--check-config", result.stdout.replace("\u2010", "-"))

# == 13. command line and the shape of the code ===============================================

def cut_at_the_deadline(test, service, clock, start, dribble):
    """A web request begun with `start` and dribbled (`dribble` every 3 s) is still open
    at 9 s and dropped once the service's timeout (10 s) is over, however it dribbles."""
    sock = connect(test, service.address)
    sock.sendall(start)
    wait_until(lambda: service.open_connections() == 1)
    for _ in range(3):
        clock.advance(service, 3)
        sock.sendall(dribble)
    test.assertEqual(service.open_connections(), 1)
    clock.advance(service, 1.5)
    test.assertTrue(dropped(sock))

SLOW_PLUGIN = """
import time, finger

class Stuck(finger.UserDatabase):
    blocking = True

    def __init__(self, **settings):
        pass

    def get_user(self, name):
        time.sleep(30)
        return "too late"
"""

BARE_PLUGIN = """
class Bare:
    def __init__(self, **settings):
        pass

    def get_user(self, name):
        return "bare " + name
"""


def proc_status(pid):
    """The Uid: and Gid: lines of /proc/PID/status, as lists of ints."""
    with open("/proc/%d/status" % pid) as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return [int(x) for x in fields["Uid"].split()], [int(x) for x in fields["Gid"].split()]


def readable_users(test, text=USERS):
    """A users file that an unprivileged user can read (in a 0755 directory)."""
    path = write_file(test, text)
    os.chmod(os.path.dirname(path), 0o755)
    os.chmod(path, 0o644)
    return path


def _read(path):
    with open(path) as f:
        return f.read()


def free_port():
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


@unittest.skipUnless(sys.platform.startswith("linux"), "uses /proc")
class TestCodeShape(unittest.TestCase):
    """What keeps finger.py in the shape its README describes."""

    def test_only_assembly_and_the_command_line_name_command_line_flags(self):
        import ast
        with open(finger.__file__, encoding="utf-8") as f:
            source = f.read()
        assembly_starts = source[:source.index("# == 11. ")].count("\n")
        tree = ast.parse(source)
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        naming = [(node.lineno, node.value[:60]) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in docstrings and node.lineno <= assembly_starts
                  and re.search(r"(^|[ (])--[a-z]", node.value)]
        self.assertEqual(naming, [])                  # FieldError and option_of_field do

    def test_every_listener_has_a_service_and_every_field_an_option(self):
        self.assertEqual(set(finger.LISTENER_SERVICES),
                         set(finger.LISTENERS) | {"setter-socket"})
        options = {action.dest.replace("_", "-") for action in
                   finger.build_parser(server=True)._actions}
        self.assertEqual(set(finger.OPTION_OF_FIELD.values()) - options, set())

    def test_a_field_error_names_the_option_that_gave_the_value(self):
        with self.assertRaises(finger.FieldError) as raised:
            finger.IRCBot(finger.MemoryDatabase(), "irc.example", nick="9lives")
        self.assertEqual(str(raised.exception), "--irc-nick '9lives': a nick is a letter or "
                         "one of []\\`^{}|_ followed by at most 63 letters, digits or those")
        with self.assertRaises(finger.FieldError) as raised:
            finger.IRCBot(finger.MemoryDatabase(), "irc.example", cafile="ca.pem")
        self.assertEqual(str(raised.exception), "--irc-cafile: needs --irc-tls")


class TestCommandLineErrors(unittest.TestCase):
    """Usage errors are one line and a hint; each audience gets its own help."""

    def test_server_options_without_a_mode(self):
        commands = (["--users", "users.example", "--finger", "127.0.0.1:7979"], ["--no-list"],
                    ["--cert=x.pem", "moshez"])
        for args, result in zip(commands, run_finger_all(*commands)):
            self.assertEqual(result.returncode, 2, args)
            self.assertIn("did you mean finger.py --serve?", result.stderr)
            self.assertEqual(result.stdout, "")
        result = run_finger("--config", write_file(self, "[finger]\nweb = off\n"))
        self.assertEqual(result.returncode, 2)
        self.assertIn("add --serve", result.stderr)

    def test_a_usage_error_is_one_line_and_a_hint(self):
        cases = ((["--serve", "--finger", "::1:7979"], "finger.py --serve --help"),
                 (["--no-such-option"], "finger.py --help"),
                 (["--timeout", "-1", "x"], "finger.py --help"))
        for (args, hint), result in zip(cases, run_finger_all(*(args for args, _ in cases))):
            self.assertEqual(result.returncode, 2)
            lines = result.stderr.splitlines()
            self.assertEqual(len(lines), 2, result.stderr)
            self.assertTrue(lines[0].startswith("finger.py: error: "))
            self.assertEqual(lines[1], "try '%s'" % hint)
        self.assertIn("[::1]:7979", run_finger("--serve", "--finger", "::1:7979").stderr)
        result = run_finger("moshez@::1:7979")
        self.assertEqual(result.returncode, 2)
        self.assertIn("[::1]:7979", result.stderr)

    def test_client_and_server_help(self):
        client, server, server_too = (result.stdout for result in run_finger_all(
            ["--help"], ["--serve", "--help"], ["--help", "--serve"]))
        self.assertEqual(server_too, server)
        self.assertIn("--timeout SECONDS", client)
        self.assertIn("--serve --help", client)
        for option in ("--users", "--finger", "--no-list", "--irc", "--request-timeout"):
            self.assertNotIn(option, client)
            self.assertIn(option, server)
        self.assertNotIn("--timeout", server)
        self.assertNotIn("QUERY", server)
        self.assertIn("\n  finger.py --serve --users users.example", server)   # own line
        self.assertIn("\n  finger.py moshez@example.org\n", client)
        for group in ("listeners", "data", "limits", "IRC bot", "process"):
            self.assertIn("\n%s" % group, server)
        self.assertLess(len(client.splitlines()), 30)

    def test_config_errors_are_all_told_with_the_nearest_key(self):
        path = write_file(self, "[finger]\nusres = x\nfinger = ::1:79\nreload = -1\n"
                                "request-timeout = 3\n")
        result = run_finger("--serve", "--config", path)
        self.assertEqual(result.returncode, 2)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 4, lines)
        self.assertIn(":2: usres: unknown key; did you mean users?", lines[0])
        self.assertIn(":3: finger: ", lines[1])
        self.assertIn("[::1]:79", lines[1])
        self.assertIn(":4: reload: expected a number of seconds 0 or more", lines[2])
        self.assertEqual(lines[3], "try 'finger.py --serve --help'")

    def test_operating_system_errors_are_one_line(self):
        result = run_finger("--serve", "--backend", "memory", "--finger", "127.0.0.1:0",
                            "--web", "off", "--setter", "off", "--rundir", "/nonexistent")
        self.assertEqual(result.returncode, 1)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("/nonexistent", result.stderr)

# == across sections: hostile input, fuzzing with a fixed seed, regressions ===================

FUZZ_SEED = 1288

FUZZ_PIECES = [b"moshez", b"/W", b"/w ", b"@", b"@@", b"\r\n", b"\n", b"\r", b"\x00", b"\xff\xfe",
               b"\xc3\x28", b"\xed\xa0\x80", b"\x1b[2J", b"\x1b]0;x\x07", b"%s%n", b"../../",
               b"<script>", b" " * 50, b"\t", b"A" * 1100, "\u202e".encode()]


def fuzz_inputs(count, seed=FUZZ_SEED):
    """`count` hostile byte strings: random bytes, and random mixes of nasty pieces."""
    rng = random.Random(seed)
    for number in range(count):
        if number % 3 == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        else:
            yield b"".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randrange(1, 8)))


def send_and_read(address, data, timeout=TIMEOUT):
    """Send, half-close, read to the end; a reset counts as the end."""
    with socket.create_connection(address[:2], timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return read_to_end(sock)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def raw_controls(data):
    """Control bytes other than tab, CR and LF: what must never reach a terminal."""
    return [byte for byte in data if byte < 32 and byte not in (9, 10, 13) or byte == 127]


class TestFuzz(unittest.TestCase):
    def assert_threads_alive(self, *services):
        for service in services:
            self.assertTrue(service.alive(), service.name)

    def test_finger_port(self):
        db = finger.MemoryDatabase({"moshez": "Happy and well", "evil": "\x1b[2J\x9b\u202e"})
        service = finger_service(self, db, timeout=0.5)
        for data in fuzz_inputs(2000):
            reply = send_and_read(service.address, data)
            self.assertTrue(reply.endswith(b"\r\n") or not data, (data, reply))
            self.assertEqual(raw_controls(reply), [], (data, reply))
            reply.decode("utf-8")                                   # always valid UTF-8
        self.assertEqual(ask(service.address, b"moshez\r\n"), b"Happy and well\r\n")
        self.assert_threads_alive(service)
        self.assertFalse(service.connections())

    def test_setter(self):
        db = finger.MemoryDatabase({"moshez": "Happy and well"})
        service = setter_service(self, db, timeout=0.5)
        for data in fuzz_inputs(2000, FUZZ_SEED + 1):
            reply = send_and_read(service.address, data)
            self.assertTrue(reply.endswith(b"\r\n"), (data, reply))
        for name in db.get_users():
            self.assertTrue(finger.valid_user_name(name), name)
            self.assertEqual(raw_controls(db.get_user(name).encode()), [])
            self.assertNotIn("\t", db.get_user(name))
        self.assertEqual(set_over(service.address, b"moshez\nfine\n"), b"OK\r\n")
        self.assert_threads_alive(service)

    @unittest.skipUnless(hasattr(socket, "SO_PEERCRED"), "needs SO_PEERCRED (Linux)")
    def test_unix_socket_setter(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "setter.sock")
        db = finger.MemoryDatabase()
        service = setter_service(self, db, address=path, check_identity=True, timeout=0.5)
        for data in fuzz_inputs(500, FUZZ_SEED + 6):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(path)
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                self.assertTrue(read_to_end(sock).endswith(b"\r\n"), data)
        for name in db.get_users():
            self.assertTrue(finger.valid_user_name(name), name)
        self.assertEqual(set_over(path, b"moshez\nfine\n", family=socket.AF_UNIX),
                         b"OK\r\n" if os.geteuid() == 0 else
                         b"Permission denied: you may set only your own status\r\n")
        self.assert_threads_alive(service)

    def test_web_requests(self):
        service = web_service(self, timeout=0.5)
        rng = random.Random(FUZZ_SEED + 2)
        for number, garbage in enumerate(fuzz_inputs(400, FUZZ_SEED + 2)):
            method = rng.choice([b"GET", b"POST", b"HEAD", b"G\x00T", garbage[:8]])
            request = method + b" /" + garbage[:200] + b" HTTP/1.1\r\n" + (
                b"Content-Length: %d\r\n" % len(garbage) if number % 2 else b"") + (
                b"X-Junk: " + garbage[:300] + b"\r\n\r\n" + garbage)
            reply = send_and_read(service.address, request)
            self.assertTrue(reply == b"" or reply.startswith(b"HTTP/1."), (request, reply[:100]))
        self.assertEqual(http(service.address, "GET", "/moshez")[0], 200)
        self.assert_threads_alive(service)
        wait_until(lambda: service.open_connections() == 0)

    def test_xmlrpc_bodies(self):
        import xmlrpc.client
        service = web_service(self)
        valid = xmlrpc.client.dumps(("moshez",), "getUser").encode()
        rng = random.Random(FUZZ_SEED + 3)
        for _ in range(300):
            body = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):              # flip, cut or insert
                spot = rng.randrange(len(body))
                choice = rng.randrange(3)
                if choice == 0:
                    body[spot] = rng.randrange(256)
                elif choice == 1:
                    del body[spot:spot + rng.randrange(1, 20)]
                else:
                    body[spot:spot] = rng.choice(FUZZ_PIECES)
            status, _, reply = http(service.address, "POST", "/RPC2", body=bytes(body))
            self.assertIn(status, (200, 400), reply[:100])
        with xmlrpc.client.ServerProxy("http://%s:%d/RPC2" % service.address) as proxy:
            self.assertEqual(proxy.getUser("moshez"), "Happy and well")
        self.assert_threads_alive(service)

    def test_perspective_broker(self):
        service = pb_service(self)
        preamble = finger.banana_encode(b"pb") + finger.banana_encode([b"version", 6], vocab=True)
        rng = random.Random(FUZZ_SEED + 4)
        pieces = [b"\x80", b"\x81", b"\x82", b"\x87", b"\x7f" * 70, b"\x00\x00\x00\x08\x80",
                  b"\x05\x80", b"\x1a\x87", b"\x06\x82moshez", b"\xff", b"\x84\x3f"]
        for number, garbage in enumerate(fuzz_inputs(600, FUZZ_SEED + 4)):
            if number % 2:
                garbage = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
            send_and_read(service.address, (preamble if number % 3 else b"") + garbage)
        client = PBTestClient(self, service.address)
        self.assertEqual(client.call("getUser", "moshez"), ("answer", "Happy and well"))
        self.assert_threads_alive(service)
        wait_until(lambda: service.open_connections() == 1)

    def test_irc_server_sending_garbage(self):
        server, bot = registered_irc_bot(self)
        rng = random.Random(FUZZ_SEED + 5)
        lines = [b":x PRIVMSG fingerbot :" + b"A" * 10000, b"PING :" + b"p" * 10000,
                 b"\x00\x01\x02", b":", b"::::", b"001", b":irc.test 433", b"PRIVMSG",
                 b":a!b@c PRIVMSG fingerbot", b":a!b@c NOTICE fingerbot :moshez", b"\xff\xfe"]
        for number, garbage in enumerate(fuzz_inputs(1500, FUZZ_SEED + 5)):
            line = rng.choice(lines) if number % 2 else garbage
            server.connections[-1].sendall(line + rng.choice([b"\r\n", b"\n", b"", b"\r"]))
        server.send(":tester!t@host PRIVMSG %s :moshez" % bot.nick)
        server.expect(r"^PRIVMSG tester :Status of moshez: Happy and well$")
        self.assertTrue(bot.alive())
        self.assertEqual(len(server.connections), 1)            # never dropped and redialled

    def test_users_file_faults(self):
        path = write_file(self, USERS)
        db = finger.FileDatabase(path, 0)
        address = finger_service(self, db).address
        faults = [lambda: os.unlink(path),
                  lambda: replace_file(path, ""),                       # truncated to nothing
                  lambda: replace_file(path, "moshez: Happy and well\nshawn"),  # cut mid-line
                  lambda: (os.unlink(path), os.mkdir(path)),
                  lambda: (os.rmdir(path), replace_file(path, "x" * 10_000_000)),
                  lambda: replace_file(path, b"\x00\x01\x02" * 1000),
                  lambda: replace_file(path, b"\xff\xfe" * 1000 + b"\nmoshez: Happy and well\n")]
        with self.assertLogs("finger", "WARNING"):
            for fault in faults:
                fault()
                db.reload()
                self.assertIn(ask(address, b"moshez\r\n"),
                              (b"Happy and well\r\n", b"No such user\r\n"))
        self.assertEqual(db.get_user("moshez"), "Happy and well")


class TestAbuse(unittest.TestCase):
    """Floods and slow peers: the normal clients are still answered (figures: make soak)."""

    def test_a_thousand_idle_connections_and_slow_senders(self):
        service = finger_service(self, timeout=3)
        idle = []
        for _ in range(1000):
            idle.append(socket.create_connection(service.address, timeout=TIMEOUT))
        self.addCleanup(lambda: [sock.close() for sock in idle])
        slow = idle[:100]
        for round_ in range(3):                  # 100 of them dribble a byte at a time
            for sock in slow:
                sock.send(b"m")
            for _ in range(20):
                self.assertEqual(ask(service.address, b"moshez\r\n"), b"Happy and well\r\n")
        wait_until(lambda: service.open_connections() == 1000)
        self.assertTrue(service.alive())

    def test_connection_flood_past_the_cap(self):
        service = finger_service(self, max_connections=50)
        flood = [socket.create_connection(service.address, timeout=TIMEOUT) for _ in range(400)]
        self.addCleanup(lambda: [sock.close() for sock in flood])
        answers = set()
        for sock in flood[-100:]:                # beyond the cap and the busy backlog
            sock.sendall(b"moshez\r\n")
            try:
                answers.add(read_to_end(sock))
            except ConnectionResetError:
                answers.add(b"reset")
        self.assertLessEqual(answers, {b"Server busy, try again later\r\n", b"", b"reset"})
        for sock in flood:
            sock.close()
        wait_until(lambda: _try_ask(service.address) == b"Happy and well\r\n")

# == interop with peers we did not write (make interop) =======================================

# -- real Twisted clients (make interop) --------------------------------------------------------

# The tutorial's PB client (howto/tutorial, "Use Perspective Broker"), ported to Python 3; the
# host and port come from argv, and a watchdog ends a hang.
PB_TUTORIAL_CLIENT = r'''
import os, sys
from twisted.internet import reactor
from twisted.spread import pb

def gotObject(object):
    print("got object:", object)
    object.callRemote("getUser", "moshez").addCallback(gotData)
    # or
    # object.callRemote("getUsers").addCallback(gotData)

def gotData(data):
    print("server sent:", data)
    reactor.stop()

def gotNoObject(reason):
    print("no object:", reason)
    reactor.stop()

factory = pb.PBClientFactory()
reactor.connectTCP(sys.argv[1], int(sys.argv[2]), factory)
factory.getRootObject().addCallbacks(gotObject, gotNoObject)
reactor.callLater(20, lambda: (print("watchdog: no answer"), os._exit(3)))
reactor.run()
'''

# Everything else a Twisted user does; prints one JSON object.
PB_CHECKS_CLIENT = r'''
import json, os, sys, time
import twisted
from twisted.internet import defer, reactor, task
from twisted.spread import flavors, pb

async def main(reactor, host, port):
    reactor.callLater(20, lambda: (print("watchdog: hung"), os._exit(3)))
    factory = pb.PBClientFactory()
    reactor.connectTCP(host, int(port), factory)
    root = await factory.getRootObject()
    out = {"twisted": twisted.__version__}
    out["getUser"] = await root.callRemote("getUser", "moshez")
    out["bytes"] = await root.callRemote("getUser", b"moshez")
    out["unknown user"] = await root.callRemote("getUser", "nobody")
    out["getUsers"] = await root.callRemote("getUsers")
    out["kwargs"] = await root.callRemote("getUser", username="moshez")
    first = root.callRemote("getUser", "moshez")
    second = root.callRemote("getUsers")
    out["in flight"] = await defer.gatherResults([first, second])
    started = time.monotonic()
    try:
        await root.callRemote("noSuchMethod", 1)
    except pb.RemoteError as error:
        out["unknown method"] = [error.remoteType.decode(), str(error),
                                 time.monotonic() - started]
    failures = await root.callRemote("noSuchMethod").addErrback(lambda failure: [failure])
    out["check"] = bool(failures[0].check(flavors.NoSuchMethod, AttributeError))
    try:
        await root.callRemote("getUser", "a", "b", "c")
    except pb.RemoteError as error:
        out["arity"] = [error.remoteType.decode(), str(error)]
    root.callRemote("getUser", "moshez", pbanswer=False)
    out["after errors"] = await root.callRemote("getUser", "moshez")
    print(json.dumps(out))
    factory.disconnect()

task.react(lambda reactor, *args: defer.ensureDeferred(main(reactor, *args)), sys.argv[1:])
'''


def _twisted_pythons():
    """{Twisted version: python} from TWISTED_PYTHON and TWISTED_OLD_PYTHON (venvs)."""
    found = {}
    for variable in ("TWISTED_PYTHON", "TWISTED_OLD_PYTHON"):
        python = os.environ.get(variable)
        if not python or not os.access(python, os.X_OK):
            continue
        result = subprocess.run([python, "-c", "import twisted; print(twisted.__version__)"],
                                capture_output=True, text=True, timeout=60)
        if result.returncode == 0:
            found[result.stdout.strip()] = python
    return found


class TestPBInterop(unittest.TestCase):
    """Stock Twisted PB clients (PyPI twisted, in the venvs `make peers` builds) against us."""

    @classmethod
    def setUpClass(cls):
        if not INTEROP:
            raise unittest.SkipTest("interop test: run with FINGER_INTEROP=1 (make interop)")
        cls.pythons = _twisted_pythons()
        if not cls.pythons:
            raise unittest.SkipTest("no Twisted: set TWISTED_PYTHON to a venv's python "
                                    "with twisted (make peers builds one)")

    def run_client(self, python, script, address):
        result = subprocess.run([python, "-c", script, address[0], str(address[1])],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr[-3000:])
        return result.stdout

    def test_the_tutorials_client_against_finger_py_pb(self):
        server = ServerProcess(self, "--backend", "memory", "--status", "moshez=Happy and well",
                               "--finger", "off", "--web", "off", "--setter", "off",
                               "--pb", "127.0.0.1:0")
        address = server.address("pb")
        for version, python in sorted(self.pythons.items()):
            with self.subTest(twisted=version):
                out = self.run_client(python, PB_TUTORIAL_CLIENT, address)
                self.assertIn("got object:", out)
                self.assertTrue(out.endswith("server sent: Happy and well\n"), out)

    def test_calls_kwargs_in_flight_and_remote_errors(self):
        address = pb_service(self).address
        for version, python in sorted(self.pythons.items()):
            with self.subTest(twisted=version):
                out = self.run_client(python, PB_CHECKS_CLIENT, address)
                result = json.loads(out.splitlines()[-1])
                self.assertEqual(result["twisted"], version)
                for key in ("getUser", "bytes", "kwargs", "after errors"):
                    self.assertEqual(result[key], "Happy and well", key)
                self.assertEqual(result["unknown user"], "No such user")
                self.assertEqual(result["getUsers"], ["moshez"])
                self.assertEqual(result["in flight"], ["Happy and well", ["moshez"]])
                kind, message, seconds = result["unknown method"]
                self.assertEqual(kind, "twisted.spread.flavors.NoSuchMethod")
                self.assertEqual(message, "No such method: remote_noSuchMethod")
                self.assertLess(seconds, 1.0)
                self.assertTrue(result["check"])
                self.assertEqual(result["arity"][0], "builtins.TypeError")

# -- against ngircd -----------------------------------------------------------------------------

class IRCServerProcess:
    """An IRC server in the foreground on 127.0.0.1, for the interop tests; a subclass
    writes its configuration and gives its command line."""

    name = "ircd"

    def __init__(self, test, directory):
        self.directory, self.port, self.tls_port = directory, free_port(), None
        os.chmod(directory, 0o755)
        self.process = None
        test.addCleanup(self.stop)

    def command(self):
        raise NotImplementedError

    def start(self):
        """Start it; returns once its ports accept connections."""
        self.log = open(os.path.join(self.directory, "%s-%d.log" % (self.name, self.port)),
                        "ab")
        self.process = subprocess.Popen(self.command(), stdout=self.log,
                                        stderr=subprocess.STDOUT)
        ports = [port for port in (self.port, self.tls_port) if port]
        wait_until(lambda: self.process.poll() is not None or
                   all(_port_open(port) for port in ports), timeout=15)
        if self.process.poll() is not None:
            raise AssertionError("%s exited with %s" % (self.name, self.process.returncode))
        return time.monotonic()

    def send_signal(self, signum):
        self.process.send_signal(signum)

    def stop(self, signum=signal.SIGTERM):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signum)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.log.close()
        self.process = None


class Ngircd(IRCServerProcess):
    """ngircd with a test recipe: plain and TLS ports, nicks up to 30
    characters."""

    name = "ngircd"

    def __init__(self, test, directory, cert, key):
        super().__init__(test, directory)
        self.tls_port = free_port()
        os.makedirs(os.path.join(directory, "conf.d"), exist_ok=True)
        dh = os.path.join(directory, "dh.pem")
        if shutil.which("certtool") and not os.path.exists(dh):
            subprocess.run(["certtool", "--get-dh-params", "--sec-param", "medium",
                            "--outfile", dh], capture_output=True, timeout=60)
        self.config = os.path.join(directory, "ngircd-%d.conf" % self.port)
        with open(self.config, "w") as f:
            f.write("[Global]\n Name = irc.test\n Info = finger test server\n"
                    " AdminInfo1 = test\n AdminInfo2 = test\n AdminEMail = test@invalid\n"
                    " Listen = 127.0.0.1\n Ports = %d\n MotdPhrase = \"test server\"\n"
                    "[Limits]\n MaxConnectionsIP = 0\n MaxNickLength = 30\n"
                    " MaxPenaltyTime = 0\n PingTimeout = 120\n PongTimeout = 20\n"
                    "[Options]\n DNS = no\n Ident = no\n PAM = no\n IncludeDir = %s\n"
                    "[SSL]\n CertFile = %s\n KeyFile = %s\n Ports = %d\n%s"
                    % (self.port, os.path.join(directory, "conf.d"), cert, key, self.tls_port,
                       " DHFile = %s\n" % dh if os.path.exists(dh) else ""))

    def command(self):
        return ["ngircd", "--nodaemon", "--config", self.config]


class Inspircd(IRCServerProcess):
    """InspIRCd 3 (Debian's inspircd) with a test recipe, its flood
    controls off, and the botmode and monitor modules: 005 says BOT=B and MONITOR."""

    name = "inspircd"

    def __init__(self, test, directory):
        super().__init__(test, directory)
        self.config = os.path.join(directory, "inspircd-%d.conf" % self.port)
        motd = os.path.join(directory, "motd.txt")
        with open(motd, "w") as f:
            f.write("test server\n")
        with open(self.config, "w") as f:
            f.write('<server name="irc.test" description="finger test server" '
                    'network="TestNet">\n<admin name="test" nick="test" email="test@invalid">\n'
                    '<bind address="127.0.0.1" port="%d" type="clients">\n'
                    '<connect allow="*" timeout="60" pingfreq="120" threshold="1000" '
                    'commandrate="100000" fakelag="no" localmax="100" globalmax="100" '
                    'resolvehostnames="no" useident="no">\n'
                    '<dns server="127.0.0.1" timeout="1">\n<performance clonesonconnect="no">\n'
                    '<files motd="%s">\n<module name="botmode">\n<module name="monitor">\n'
                    % (self.port, motd))

    def command(self):
        return ["inspircd", "--config=" + self.config, "--nofork", "--nopid"] + (
            ["--runasroot"] if os.geteuid() == 0 else [])


class IRCTestClient:
    """A raw IRC client for the interop tests (a person talking to the bot)."""

    def __init__(self, test, port, nick):
        self.nick = nick
        self.sock = socket.create_connection((LOCALHOST, port), timeout=TIMEOUT)
        test.addCleanup(self.close)
        self.data = b""
        self.send("NICK " + nick, "USER tester 0 * :finger.py test client")
        self.expect(r"^:\S+ 001 ")

    def send(self, *lines):
        self.sock.sendall("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def expect(self, pattern, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.data:
                line, self.data = self.data.split(b"\n", 1)
                text = line.rstrip(b"\r").decode("utf-8", "replace")
                if text.startswith("PING "):
                    self.send("PONG " + text[5:])
                if re.search(pattern, text):
                    return text
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no line matching %r from the IRC server" % pattern)
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError("the IRC server closed the connection")
            self.data += chunk

    def ask(self, bot_nick, name="moshez", status="Happy and well"):
        """PRIVMSG the bot a name; returns the seconds the answer took."""
        started = time.monotonic()
        self.send("PRIVMSG %s :%s" % (bot_nick, name))
        self.expect(r"^:%s!\S+ PRIVMSG %s :Status of %s: %s$"
                    % (re.escape(bot_nick), re.escape(self.nick), name, status))
        return time.monotonic() - started

    def close(self):
        with contextlib.suppress(OSError):
            self.send("QUIT :done")
        self.sock.close()


def _report(text):
    sys.stderr.write("\n    measured: %s " % text)


class IRCInteropTests:
    """The bot against a real IRC server (make interop): what it must do on every network.
    A TestCase subclass names the server's `programs` and makes it in new_server()."""

    programs = ()

    def setUp(self):
        if not INTEROP:
            self.skipTest("interop test: run with FINGER_INTEROP=1 (make interop)")
        missing = [program for program in self.programs if not shutil.which(program)]
        if missing:
            self.skipTest("not installed: %s" % ", ".join(missing))
        self.db = finger.MemoryDatabase({"moshez": "Happy and well", "shawn": "alive"})

    def server(self):
        server = self.new_server()
        server.start()
        return server

    def bot(self, server, nick, **options):
        options.setdefault("register_timeout", 5)
        tls = options.get("tls")
        bot = finger.IRCBot(self.db, LOCALHOST, server.tls_port if tls else server.port,
                            nick=nick, **options)
        start(self, bot)
        return bot

    def test_answers_a_private_message(self):
        server = self.server()
        bot = self.bot(server, "fbotpm")
        wait_until(lambda: bot.registered)
        client = IRCTestClient(self, server.port, "tpm")
        _report("%s: PRIVMSG answered in %.3f s" % (server.name, client.ask("fbotpm")))
        client.ask("fbotpm", "nobody", "No such user")

    def test_taken_nick_is_taken_back_when_freed(self):
        server = self.server()
        holder = IRCTestClient(self, server.port, "fbotnk")
        bot = self.bot(server, "fbotnk", reclaim_interval=0.5)
        wait_until(lambda: bot.registered)
        self.assertEqual(bot.nick, "fbotnk_")
        holder.ask("fbotnk_", "shawn", "alive")
        freed = time.monotonic()
        holder.close()
        wait_until(lambda: bot.nick == "fbotnk")
        _report("%s: nick taken back %.2f s after its holder quit" % (
            server.name, time.monotonic() - freed))
        IRCTestClient(self, server.port, "tnk").ask("fbotnk", "shawn", "alive")

    def test_channel_mention(self):
        server = self.server()
        bot = self.bot(server, "fbotch", channels=["#finger"])
        wait_until(lambda: bot.joined == ["#finger"])
        client = IRCTestClient(self, server.port, "tch")
        client.send("JOIN #finger")
        client.expect(r" 353 tch . #finger :.*fbotch")
        client.send("PRIVMSG #finger :fbotch: moshez", "PRIVMSG #FINGER :FBotCh, shawn")
        client.expect(r"^:fbotch!\S+ PRIVMSG #finger :tch: Status of moshez: Happy and well$")
        client.expect(r"^:fbotch!\S+ PRIVMSG #(finger|FINGER) :tch: Status of shawn: alive$")

    def test_server_killed_and_restarted(self):
        server = self.server()
        bot = self.bot(server, "fbotrs", backoff_cap=4)
        wait_until(lambda: bot.registered)
        killed = time.monotonic()
        server.stop(signal.SIGKILL)
        wait_until(lambda: not bot.registered, timeout=5)
        detected = time.monotonic() - killed
        time.sleep(3)                                  # down for a while: the back-off grows
        ready = server.start()
        wait_until(lambda: bot.registered, timeout=4 + 2)
        back = time.monotonic() - ready
        latency = IRCTestClient(self, server.port, "trs").ask("fbotrs")
        _report("%s: SIGKILL detected in %.3f s; registered %.2f s after the restart "
                "(back-off cap 4 s); answered in %.3f s" % (server.name, detected, back,
                                                            latency))
        self.assertLess(back, 4 + 2)         # the cap, and the server's own registration


class TestIRCInteropInspircd(IRCInteropTests, unittest.TestCase):
    """The bot against Debian's InspIRCd 3, whose 005 has BOT=B and MONITOR."""

    programs = ("inspircd",)

    def new_server(self):
        directory = tempfile.mkdtemp(prefix="finger-inspircd-")
        self.addCleanup(shutil.rmtree, directory, True)
        return Inspircd(self, directory)

    def test_bot_mode_is_set(self):
        server = self.server()
        bot = self.bot(server, "fbotbm")
        wait_until(lambda: bot.registered)
        client = IRCTestClient(self, server.port, "tbm")
        deadline = time.monotonic() + TIMEOUT
        while True:                     # 335: "is a bot", once the bot has set its mode
            client.send("WHOIS fbotbm")
            if " 335 " in client.expect(r" (335|318) tbm fbotbm "):
                break
            self.assertLess(time.monotonic(), deadline, "WHOIS never says fbotbm is a bot")


class TestIRCInterop(IRCInteropTests, unittest.TestCase):
    """The bot against Debian's ngircd, also over TLS and through a SIGSTOP."""

    programs = ("ngircd", "openssl")

    @classmethod
    def setUpClass(cls):
        if not (INTEROP and shutil.which("ngircd") and shutil.which("openssl")):
            return
        cls.directory = tempfile.mkdtemp(prefix="finger-ngircd-")
        cls.cert, cls.key = make_irc_ca(cls.directory)
        for path in (cls.cert, cls.key):
            os.chmod(path, 0o644)          # ngircd may read them after dropping to nobody

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "directory", None):
            shutil.rmtree(cls.directory, True)

    def new_server(self):
        return Ngircd(self, self.directory, self.cert, self.key)

    @_needs("ngircd", "openssl")
    def test_tls_with_a_self_signed_ca(self):
        server = self.server()
        bot = self.bot(server, "fbottls", tls=True, cafile=self.cert)
        wait_until(lambda: bot.registered)
        IRCTestClient(self, server.port, "ttls").ask("fbottls")
        with self.assertLogs("finger", "WARNING") as logs:
            refused = self.bot(server, "fbotbad", tls=True, backoff_cap=0.5)
            wait_until(lambda: "certificate was refused" in "\n".join(logs.output))
        self.assertFalse(refused.registered)

    @_needs("ngircd", "openssl")
    def test_stopped_server_detected_by_keepalive(self):
        server = self.server()
        bot = self.bot(server, "fbotst", keepalive=1.0, keepalive_timeout=1.0,
                       register_timeout=2.0, backoff_cap=2.0)
        wait_until(lambda: bot.registered)
        client = IRCTestClient(self, server.port, "tst")
        client.ask("fbotst")                           # the last bytes the bot gets
        stopped = time.monotonic()
        server.send_signal(signal.SIGSTOP)
        wait_until(lambda: not bot.registered, timeout=5)
        detected = time.monotonic() - stopped
        self.assertLess(detected, 1.0 + 1.0 + 0.5)
        time.sleep(1)
        resumed = time.monotonic()
        server.send_signal(signal.SIGCONT)
        wait_until(lambda: bot.registered, timeout=10)
        back = time.monotonic() - resumed
        client = IRCTestClient(self, server.port, "tst2")
        latency = client.ask("fbotst")
        _report("SIGSTOP detected in %.2f s (keepalive 1 s + 1 s); registered %.2f s after "
                "SIGCONT; answered in %.3f s" % (detected, back, latency))


class TestInterop(unittest.TestCase):
    @_needs("finger")
    def test_debian_finger_client_against_our_server_on_port_79(self):
        if os.geteuid() != 0:
            self.skipTest("binding port 79 needs root")
        db = finger.MemoryDatabase({"moshez": "Happy and well", "evil": "\x1b[2Jgone"})
        service = finger.TCPService(finger.FingerProtocol(db), (LOCALHOST, 79))
        try:
            start(self, service)
        except finger.FingerError as error:
            self.skipTest("port 79 is taken: %s" % error)
        result = subprocess.run(["finger", "moshez@127.0.0.1"], capture_output=True,
                                text=True, timeout=15)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "Happy and well\n")    # bsd finger prints no [host]
        result = subprocess.run(["finger", "-l", "@127.0.0.1"], capture_output=True,
                                text=True, timeout=15)
        self.assertIn("moshez  Happy and well", result.stdout)
        result = subprocess.run(["finger", "evil@127.0.0.1"], capture_output=True,
                                text=True, timeout=15)
        self.assertNotIn("\x1b", result.stdout)

    def fingerd(self):
        """bsd in.fingerd behind socat (as inetd would run it) and a user with a ~/.plan
        -> (user entry, port)."""
        fingerd = shutil.which("in.fingerd") or "/usr/sbin/in.fingerd"
        if not os.path.exists(fingerd):
            self.skipTest("in.fingerd not installed (Debian package fingerd)")
        entry = make_user(self)
        write_home_file(entry, ".plan", "Testing plans\n")
        port = free_port()
        socat = subprocess.Popen(["socat", "TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork" % port,
                                  "EXEC:%s,nofork,stderr" % fingerd],
                                 stderr=subprocess.DEVNULL)
        self.addCleanup(socat.wait)
        self.addCleanup(socat.terminate)
        wait_until(lambda: _port_open(port))
        return entry, port

    @_needs("socat", "useradd")
    def test_our_client_against_bsd_in_fingerd(self):
        entry, port = self.fingerd()
        code, out, err = client("%s@127.0.0.1:%d" % (entry.pw_name, port))
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("[127.0.0.1]\n"))
        self.assertIn("Plan Tester", out)
        self.assertIn("Testing plans", out)
        self.assertNotIn("\r", out)

    @_needs("socat", "useradd")
    def test_our_proxy_in_front_of_bsd_in_fingerd(self):
        entry, port = self.fingerd()
        target = "127.0.0.1:%d" % port
        options = finger.default_options(finger="off", web="off", setter="off",
                                         proxy="127.0.0.1:0", proxy_target=target,
                                         forward_ports=(port,))
        with finger.build_services(options, finger.MemoryDatabase()) as services:
            proxy = services.by_name("proxy").address
            for query in [entry.pw_name, "%s@%s" % (entry.pw_name, target)]:
                with self.subTest(query=query):
                    reply = ask(proxy, query.encode() + b"\r\n").decode()
                    self.assertIn("Testing plans", reply)
                    self.assertIn("Name: Plan Tester", reply)

    @_needs("finger", "useradd")
    def test_command_backend_runs_debians_finger(self):
        entry = make_user(self)
        write_home_file(entry, ".plan", "Testing plans\n")
        db = finger.CommandDatabase("finger")
        reply = ask(finger_service(self, db).address, entry.pw_name.encode() + b"\r\n")
        self.assertIn(b"Plan:\r\nTesting plans", reply)
        self.assertIn(b"Name: Plan Tester", reply)

    @_needs("nc")
    def test_the_tutorials_nc_session_with_the_setter(self):
        db = finger.MemoryDatabase()
        address = setter_service(self, db).address
        result = subprocess.run(["nc", "-N", LOCALHOST, str(address[1])],   # half-closes
                                input=b"moshez\nHappy and well\n", capture_output=True,
                                timeout=15)
        self.assertEqual(result.stdout, b"OK\r\n")
        self.assertEqual(db.get_user("moshez"), "Happy and well")
        subprocess.run(["nc", "-q", "0", LOCALHOST, str(address[1])],     # closes at once
                       input=b"shawn\nalive\n", capture_output=True, timeout=15)
        wait_until(lambda: db.get_user("shawn") == "alive")


class TestPackagingInterop(unittest.TestCase):
    """The unit files against systemd-analyze, the .deb against dpkg."""

    @_needs("systemd-analyze")
    def test_unit_files_verify(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        units = [name for name in os.listdir(os.path.join(HERE, "contrib"))
                 if name.endswith((".service", ".socket"))]
        for name in units:
            shutil.copy(os.path.join(HERE, "contrib", name), directory)
        result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                                 *[os.path.join(directory, name) for name in units]],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(len(units), 4)
        for name in ("finger.service", "finger-inetd@.service"):
            result = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                                     os.path.join(directory, name)],
                                    capture_output=True, text=True, timeout=60)
            score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)",
                                    result.stdout).group(1))
            _report("%s: systemd-analyze security %.1f" % (name, score))
            self.assertLessEqual(score, 2.0, result.stdout[-2000:])

    @_needs("rpmbuild", "rpm", "make")
    def test_rpm_has_the_same_layout(self):
        subprocess.run(["make", "-s", "-C", HERE, "rpm"], check=True, capture_output=True,
                       timeout=120)
        package = os.path.join(HERE, "build", "finger-py-%s-1.noarch.rpm" % finger.__version__)
        listing = subprocess.run(["rpm", "-qp", "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]",
                                  package], capture_output=True, text=True, timeout=60).stdout
        files = dict(reversed(line.split(" ", 1)) for line in listing.splitlines())
        for path in ("/usr/bin/finger.py", "/usr/share/man/man1/finger.py.1",
                     "/usr/lib/systemd/system/finger.service", "/var/lib/finger",
                     "/usr/lib/systemd/system/finger-inetd@.service"):
            self.assertIn(path, files)
        self.assertEqual(files["/etc/finger/finger.ini"], "cn")   # %config(noreplace)
        scripts = subprocess.run(["rpm", "-qp", "--scripts", package], capture_output=True,
                                 text=True, timeout=60).stdout
        self.assertIn("useradd --system", scripts)
        self.assertIn("/var/lib/finger/users", scripts)

    @_needs("dpkg", "dpkg-deb", "make")
    def test_deb_installs_and_removes_cleanly(self):
        if os.geteuid() != 0:
            self.skipTest("dpkg -i needs root")
        if subprocess.run(["dpkg", "-s", "finger-py"], capture_output=True).returncode == 0:
            self.skipTest("finger-py is installed on this machine already")
        subprocess.run(["make", "-s", "-C", HERE, "deb"], check=True, capture_output=True,
                       timeout=120)
        deb = [name for name in os.listdir(os.path.join(HERE, "build"))
               if name.startswith("finger-py_") and name.endswith(".deb")][0]
        self.addCleanup(subprocess.run, ["dpkg", "-P", "finger-py"], capture_output=True)
        result = subprocess.run(["dpkg", "-i", os.path.join(HERE, "build", deb)],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("the configuration is fine", result.stdout)     # postinst checked it
        self.assertTrue(os.access("/usr/bin/finger.py", os.X_OK))
        self.assertTrue(os.path.exists("/lib/systemd/system/finger.socket"))
        self.assertEqual(pwd.getpwnam("finger").pw_shell, "/usr/sbin/nologin")
        info = os.stat("/var/lib/finger/users")
        self.assertEqual((pwd.getpwuid(info.st_uid).pw_name, stat.S_IMODE(info.st_mode)),
                         ("finger", 0o644))
        with open("/etc/finger/finger.ini") as f:
            self.assertIn("\nusers = /var/lib/finger/users\n", f.read())
        with open("/lib/systemd/system/finger.service") as f:
            unit = f.read()
        for field in ("ExecStart=/usr/bin/python3 /usr/bin/finger.py --serve --config "
                      "/etc/finger/finger.ini", "ExecStartPre=/usr/bin/python3 "
                      "/usr/bin/finger.py --check-config --config /etc/finger/finger.ini",
                      "StateDirectory=finger", "User=finger", "LimitNOFILE=",
                      "ExecReload=/bin/kill -HUP $MAINPID",
                      "Documentation=man:finger.py(1)"):
            self.assertIn(field, unit)
        check = subprocess.run(["runuser", "-u", "finger", "--", "/usr/bin/python3",
                                "/usr/bin/finger.py", "--check-config", "--config",
                                "/etc/finger/finger.ini"], capture_output=True, text=True,
                               timeout=60)
        self.assertEqual((check.returncode, check.stderr), (0, ""))
        with open("/var/lib/finger/users", "a") as f:                # the admin's users...
            f.write("alice: mine\n")
        result = subprocess.run(["dpkg", "-i", os.path.join(HERE, "build", deb)],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)        # ...kept by an upgrade
        self.assertIn("alice: mine\n", _read("/var/lib/finger/users"))
        # As the unit runs it, as finger: the setter can write the packaged users file.
        server = ServerProcess(self, "--config", "/etc/finger/finger.ini", "--finger",
                               "127.0.0.1:0", "--setter", "127.0.0.1:0", "--user", "finger")
        finger_address, setter = server.address("finger"), server.address("setter")
        self.assertEqual(set_over(setter, b"moshez\r\nPackaged\r\n"), b"OK\r\n")
        self.assertEqual(ask(finger_address, b"moshez\r\n"), b"Packaged\r\n")
        server.kill()
        version = subprocess.run(["/usr/bin/finger.py", "--version"], capture_output=True,
                                 text=True, timeout=30).stdout
        self.assertTrue(version.startswith("finger.py "))
        result = subprocess.run(["dpkg", "-r", "finger-py"], capture_output=True, text=True,
                                timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(os.path.exists("/usr/bin/finger.py"))
        self.assertTrue(os.path.exists("/etc/finger/finger.ini"))  # a conffile, until purge
        self.assertTrue(os.path.exists("/var/lib/finger/users"))   # the admin's users too
        subprocess.run(["dpkg", "-P", "finger-py"], check=True, capture_output=True,
                       timeout=120)
        self.assertFalse(os.path.exists("/etc/finger/finger.ini"))
        self.assertFalse(os.path.exists("/var/lib/finger"))


class TestProxyProtocolInterop(unittest.TestCase):
    """finger.py behind Debian's HAProxy, which sends PROXY headers (v2 to the finger port,
    v1 to the web port): the log shows the real client's address and port."""

    @_needs("haproxy")
    def test_behind_haproxy(self):
        directory = tempfile.mkdtemp(prefix="finger-haproxy-")
        self.addCleanup(shutil.rmtree, directory, True)
        ports = {name: free_port() for name in ("finger", "web", "front", "front_web")}
        server = ServerProcess(self, "--users", readable_users(self), "--finger",
                               "127.0.0.1:%d" % ports["finger"], "--web",
                               "127.0.0.1:%d" % ports["web"], "--setter", "off",
                               "--proxy-protocol", "127.0.0.1/32", "--log-queries")
        server.address("finger")
        config = os.path.join(directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write("defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10s\n"
                    "  timeout server 10s\n"
                    "listen finger\n  bind 127.0.0.1:%d\n  server f 127.0.0.1:%d send-proxy-v2\n"
                    "listen web\n  bind 127.0.0.1:%d\n  server w 127.0.0.1:%d send-proxy\n"
                    % (ports["front"], ports["finger"], ports["front_web"], ports["web"]))
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", config], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        self.addCleanup(haproxy.wait)
        self.addCleanup(haproxy.kill)
        wait_until(lambda: _port_open(ports["front"]) and _port_open(ports["front_web"]))
        sources = []
        for port, request, answer in (
                (ports["front"], b"moshez\r\n", b"Happy and well\r\n"),
                (ports["front_web"], b"GET /shawn HTTP/1.1\r\nHost: x\r\nConnection: "
                                     b"close\r\n\r\n", b"HTTP/1.1 200 ")):
            with socket.create_connection((LOCALHOST, port), timeout=TIMEOUT) as client:
                client.sendall(request)
                self.assertTrue(read_to_end(client).startswith(answer))
                sources.append(client.getsockname()[1])
        # The log names each client's own port, not HAProxy's connection.
        server.expect(r'finger 127\.0\.0\.1:%d "moshez" ok' % sources[0])
        server.expect(r'web 127\.0\.0\.1:%d "GET /shawn HTTP/1\.1" 200' % sources[1])

ARTEFACTS = os.path.join(HERE, "build", "artefacts")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1024,768"]


class TestWebInterop(unittest.TestCase):
    """The web site against curl, openssl s_client and headless Chromium."""

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="finger-test-")
        cls.pem = make_certificate(cls.directory) if shutil.which("openssl") else None

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.directory, True)

    def curl(self, *args):
        result = subprocess.run(["curl", "-s", "--max-time", "10", *args], capture_output=True,
                                text=True, timeout=30)
        return result.stdout

    @_needs("curl")
    def test_curl_pages_json_errors(self):
        base = "http://%s:%d" % web_service(self, web_db(fillers=40)).address
        self.assertIn("Happy and well", self.curl(base + "/moshez"))
        self.assertEqual(self.curl(base + "/api/users/shawn"),
                         '{"user": "shawn", "status": "alive"}\n')
        self.assertEqual(self.curl("-o", "/dev/null", "-w", "%{http_code}", base + "/nobody"),
                         "404")
        headers = self.curl("-X", "DELETE", "-D", "-", "-o", "/dev/null", base + "/moshez")
        self.assertIn("HTTP/1.1 405", headers)
        self.assertIn("Allow: GET, HEAD, POST", headers)
        plain, zipped = self.curl(base + "/"), self.curl("--compressed", base + "/")
        self.assertEqual(zipped, plain)                       # curl undid our gzip
        headers = self.curl("--compressed", "-D", "-", "-o", "/dev/null", base + "/")
        self.assertIn("content-encoding: gzip", headers.lower())
        etag = re.search(r"(?im)^etag: (\S+)", headers).group(1)
        self.assertEqual(self.curl("--compressed", "-H", "If-None-Match: " + etag, "-o",
                                   "/dev/null", "-w", "%{http_code}", base + "/"), "304")

    def test_prometheus_parses_the_metrics(self):
        python = os.environ.get("PROMETHEUS_PYTHON")
        if not INTEROP or not python:
            self.skipTest("interop test: make interop installs prometheus-client")
        users = write_file(self, USERS)
        options = finger.default_options(finger="127.0.0.1:0", web="127.0.0.1:0", setter="off",
                                         pb="127.0.0.1:0", users=users)
        with finger.build_services(options) as services:
            ask(services.by_name("finger").address, b"moshez\r\n")
            text = http(services.by_name("web").address, "GET", "/metrics")[2]
        result = subprocess.run([python, "-c", "import sys\n"
                                 "from prometheus_client.parser import "
                                 "text_string_to_metric_families as parse\n"
                                 "for family in parse(sys.stdin.read()):\n"
                                 "    print(family.name, family.type, len(family.samples))"],
                                input=text.decode(), capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        families = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
        self.assertEqual(families["finger_request_duration_seconds"][0], "histogram")
        self.assertEqual(families["finger_requests"][0], "counter")
        for name in ("process_resident_memory_bytes", "process_open_fds", "finger_build_info"):
            self.assertEqual(families[name][0], "gauge")

    @_needs("curl", "openssl")
    def test_curl_over_https_with_cacert(self):
        base = "https://127.0.0.1:%d" % web_service(self, cert=self.pem, name="https").address[1]
        self.assertIn("Happy and well", self.curl("--cacert", self.pem + ".crt", base + "/moshez"))
        self.assertEqual(self.curl(base + "/moshez"), "")         # not trusted without it

    @_needs("openssl")
    def test_openssl_s_client_refuses_tls_1_0_and_1_1(self):
        port = web_service(self, cert=self.pem, name="https").address[1]

        def handshake(version):
            # SECLEVEL=0 lets the client offer old versions: the refusal must be the server's.
            return subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port,
                                   version, "-cipher", "DEFAULT@SECLEVEL=0"],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=30)

        for version in ["-tls1", "-tls1_1"]:
            with self.subTest(version=version):
                result = handshake(version)
                self.assertNotEqual(result.returncode, 0)
                self.assertRegex(result.stdout + result.stderr,
                                 r"alert protocol version|unsupported protocol")
        result = handshake("-tls1_2")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Protocol  : TLSv1.2", result.stdout)

    @_needs("chromium")
    def test_chromium_renders_the_site_and_runs_no_injected_script(self):
        service = web_service(self, web_db(fillers=40))
        base = "http://%s:%d" % service.address
        os.makedirs(ARTEFACTS, exist_ok=True)
        shot = os.path.join(ARTEFACTS, "users.png")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shot)
        profile = tempfile.mkdtemp(prefix="finger-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)

        def chromium(*args):
            return subprocess.run(["chromium", *CHROMIUM_FLAGS, "--user-data-dir=" + profile,
                                   *args], capture_output=True, text=True, timeout=120)

        with query_log_on(self) as logs:
            chromium("--screenshot=" + shot, base + "/")
        with open(shot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        plain = service.site.handle("GET", "/").body
        sent = [int(size) for size in re.findall(r'"GET / HTTP/1\.1" 200 (\d+)',
                                                  "\n".join(logs.output))]
        self.assertTrue(sent and all(size < len(plain) for size in sent), sent)   # gzipped
        dom = chromium("--dump-dom", base + "/evil").stdout
        self.assertIn("<title>evil</title>", dom)                 # the title was not changed
        self.assertNotIn("pwned</title>", dom)
        self.assertNotIn("<img", dom)


class TestPythonVersions(unittest.TestCase):
    """finger.py must run on CPython 3.9: vermin (PyPI) finds the minimum version it needs."""

    def test_needs_no_python_newer_than_3_9(self):
        vermin = os.environ.get("VERMIN") or shutil.which("vermin")
        if not INTEROP or not vermin or not os.path.exists(vermin):
            self.skipTest("needs vermin and FINGER_INTEROP=1 (make interop installs it)")
        result = subprocess.run([vermin, "-q", "-t=3.9-", "--no-tips", "--violations",
                                 FINGER_PY],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_core_tests_pass_on_every_python_from_3_9_to_3_13_found(self):
        if not INTEROP:
            self.skipTest("interop test: run with FINGER_INTEROP=1 (make interop)")
        found = _pythons_3_9_to_3_13()
        if not found:
            self.skipTest("no Python 3.9 to 3.13 found (FINGER_PYTHONS or python3.N on PATH)")
        for version, python in sorted(found.items()):
            with self.subTest(python="3.%d" % version):
                result = subprocess.run(
                    [python, "-m", "unittest", "test_finger.TestParseUsers",
                     "test_finger.TestParseQuery", "test_finger.TestFileDatabase",
                     "test_finger.TestFingerServer", "test_finger.TestClient"],
                    cwd=HERE, capture_output=True, text=True, timeout=120,
                    env=dict(os.environ, FINGER_INTEROP="0"))
                self.assertEqual(result.returncode, 0, result.stderr[-2000:])


def _pythons_3_9_to_3_13():
    """{minor version: interpreter} from FINGER_PYTHONS (paths) and python3.N on PATH."""
    candidates = os.environ.get("FINGER_PYTHONS", "").split()
    candidates += ["python3.%d" % minor for minor in range(9, 14)]
    found = {}
    for python in candidates:
        try:
            result = subprocess.run([python, "-c", "import sys; print(sys.version_info[1])"],
                                    capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if result.returncode == 0 and result.stdout.strip().isdigit():
            minor = int(result.stdout)
            if 9 <= minor <= 13:
                found.setdefault(minor, python)
    return found


def _port_open(port):
    try:
        socket.create_connection((LOCALHOST, port), timeout=1).close()
        return True
    except OSError:
        return False

# Test classes that use something of the whole machine (/dev/log): they run in one shard.
SHARED_STATE = ("TestSyslog", "TestCheckConfig")

SHARDS = 2                        # processes running the whole suite (the machine has 2 cores)


def run_shards():
    """The whole suite in SHARDS processes at once, the test classes dealt out in turn (most
    tests wait on sockets, timeouts and child processes, not on the CPU); each shard's
    output is printed whole, then the sum.  Returns the exit status."""
    classes = [name for name, value in globals().items()
               if isinstance(value, type) and issubclass(value, unittest.TestCase)]
    shards = [[] for _ in range(SHARDS)]
    for number, name in enumerate(name for name in classes if name not in SHARED_STATE):
        shards[number % SHARDS].append(name)
    shards[0] += SHARED_STATE
    environ = dict(os.environ, FINGER_TEST_SHARD="1")    # its line is not the sum CI reads
    processes = [subprocess.Popen([sys.executable, __file__, *shard], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=environ)
                 for shard in shards]
    totals = [0, 0, 0]
    for process in processes:
        output = process.communicate()[0]
        sys.stdout.write(output)
        found = re.search(r"^shard results: (\d+) passed, (\d+) failed, (\d+) skipped$",
                          output, re.MULTILINE)
        counts = [int(n) for n in found.groups()] if found else [0, 1, 0]
        totals = [total + count for total, count in zip(totals, counts)]
    print("results: %d passed, %d failed, %d skipped" % tuple(totals))
    return 1 if totals[1] or any(process.returncode for process in processes) else 0


def main(argv):
    """Run the tests named in argv (all by default, in shards) and end with one line that
    CI reads: 'results: N passed, N failed, N skipped'.  Exit status 1 when any failed."""
    if len(argv) == 1:
        return run_shards()
    program = unittest.main(module=__name__, argv=[argv[0], "-v", *argv[1:]], exit=False)
    result = program.result
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    print("%sresults: %d passed, %d failed, %d skipped"
          % ("shard " if os.environ.get("FINGER_TEST_SHARD") else "",
             result.testsRun - failed - skipped, failed, skipped))
    return 1 if failed or not result.testsRun else 0

if __name__ == "__main__":
    sys.exit(main(sys.argv))
