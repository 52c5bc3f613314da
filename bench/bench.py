#!/usr/bin/env python3
"""`make bench`: how fast, how big and how steady finger.py's server is, on this machine,
as shipped: every finger.py server runs with its default options, plus only what a row needs
(its ports, the users file, and the two limits each idle-connection row needs).

    python3 bench/bench.py               # 3 runs, about 4½ minutes; prints one Markdown
                                         # table and puts it in bench/RESULTS.md
    python3 bench/bench.py --quick       # 1 short run, a smoke test (under a minute);
                                         # bench/RESULTS.md is left as it is
    python3 bench/bench.py --runs 5 --no-results

Every figure is the median over the runs, with the min-max beside it; the stall rows of the
reload section are judged on the worst run.  The throughput rows (bare server, finger with
and without --log-queries, idle connections, web and its bare `http.server` baseline,
bench/bare_http.py) run the server on one CPU and the load generator (bench/load.py) on the
others, when the machine has two or more.  Rows that are compared with each other (finger
and its baseline, web and its baseline) are measured with their servers up together, in
slices taken in turn, and each keeps its cleanest slice (see compare()): on a shared
machine the neighbours come and go within seconds.  The reload section runs the way an outsider
would see it: server and client unpinned, the server with the web site, Perspective Broker
and the TCP setter on, one client asking for random users while the 1,000,000-line users
file is replaced, reloaded by SIGHUP and written by the setter.
Loopback only (127.0.0.1); every load is bounded in count and time; every process the
bench starts is stopped by its PID.  It reports and never fails: the exit status is 0 once
the table is printed, whatever the figures are.  Linux only (it reads /proc).
Standard library only; Python 3.9 or newer.
"""

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FINGER = os.path.join(ROOT, "finger.py")
LOAD = os.path.join(HERE, "load.py")
BARE = os.path.join(HERE, "bare_server.py")
BARE_HTTP = os.path.join(HERE, "bare_http.py")
PYTHON = sys.executable          # the real interpreter, not a wrapper script around it
HOST = "127.0.0.1"
NAMES = "u%07d"                  # user names in the generated users files
ALL_CPUS = sorted(os.sched_getaffinity(0))   # before main() pins the bench to the load CPUs
SETTER_REQUEST = b"u0000001\r\nset by the bench\r\n"

sys.path.insert(0, HERE)
from load import (machine_cpu_jiffies, proc_fd_count, proc_status_kb,  # noqa: E402
                  raise_nofile)
import results  # noqa: E402


class Settings:
    """How long and how big; --quick shortens the windows, not the sizes."""

    def __init__(self, quick):
        self.warmup = 0.2 if quick else 0.5        # seconds of load before measuring
        self.slice_warmup = 0.2 if quick else 0.3  # ... before each slice of a comparison
        self.window = 1.0 if quick else 3.0        # measured seconds per load row
        self.slices = 2 if quick else 6            # compared rows: slices of the window,
                                                   # taken in turn with the others
        self.new_query_window = 1.0 if quick else 2.0
        self.concurrency = 50
        self.small_users = 1000
        self.big_users = 1000000
        self.some_idle = 1000
        self.many_idle = 10000
        self.cold_starts = 5 if quick else 10      # of each command, interleaved
        self.reload_check = 0.05                   # --reload of the 1,000,000-user server
        self.max_reload_wait = 60.0                # seconds
        self.before_event = 0.5                    # plain queries before each reload event
        self.after_event = 0.5                     # and after it is over
        self.event_margin = 1.5 if quick else 2.0  # SIGHUP and setter windows: this many
                                                   # times the rename reload's time
        self.web_skip = None                       # why the web site is off, if it is
        self.baseline_first = True                 # the order of compared rows: turned every run


def log(message):
    print(message, file=sys.stderr, flush=True)


# == the machine =============================================================================

def cpu_plan():
    """(server CPU or None, load CPUs or None): split the CPUs we may use."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1:]


def machine_facts(server_cpu, load_cpus):
    busy = busy_fraction(0.5)
    facts = results.run_facts(len(ALL_CPUS)) + [    # ALL_CPUS: before the bench pinned itself
        "placement: " + ("server on CPU %d, load generator on CPU %s; the reload rows' "
                         "server and client on any CPU" % (
                             server_cpu, ",".join(map(str, load_cpus)))
                         if server_cpu is not None else
                         "one CPU: server and load generator share it"),
        "other activity on the machine just before the runs: %.0f %% of its CPUs busy, "
        "load average %s" % (busy * 100, open("/proc/loadavg").read().split()[0]),
    ]
    return facts


def busy_fraction(seconds):
    """Share of all CPUs busy (or stolen by the hypervisor) over `seconds`."""
    busy0, total0 = machine_cpu_jiffies()
    time.sleep(seconds)
    busy1, total1 = machine_cpu_jiffies()
    return (busy1 - busy0) / max(total1 - total0, 1)


# == users files =============================================================================

def write_users(path, count, version):
    """`count` lines 'uNNNNNNN: version V status of user N'."""
    with open(path, "w", encoding="utf-8") as out:
        for start in range(0, count, 100000):
            out.write("".join("%s: version %d status of user %d\n" % (NAMES % i, version, i)
                              for i in range(start, min(start + 100000, count))))


# == processes ===============================================================================

def free_port():
    return free_ports(1)[0]


def free_ports(count):
    """`count` different free ports: all bound at once, then let go."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            socks.append(sock)
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def child_setup(cpu):
    """preexec_fn of a server: its own CPU (None: every CPU the bench was given, not just
    the load generator's), and file descriptors for 10,000 connections."""
    def setup():
        os.sched_setaffinity(0, {cpu} if cpu is not None else set(ALL_CPUS))
        raise_nofile(20000 + 1024)
    return setup


class Server:
    """A server process on HOST:port, started with `argv` (+ the port); stopped by PID."""

    def __init__(self, name, argv, cpu, tmp, port=None, ready_timeout=60.0):
        self.name = name
        self.port = port or free_port()
        self.log_path = os.path.join(tmp, "%s-%d.log" % (name, self.port))
        self.argv = [arg.replace("{port}", str(self.port)) for arg in argv]
        self.cpu = cpu
        self.ready_timeout = ready_timeout
        self.proc = None

    def __enter__(self):
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=child_setup(self.cpu), cwd=ROOT)
        try:
            self.wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def pid(self):
        return self.proc.pid

    def wait_listening(self):
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with status %d: %s" % (
                    self.name, self.proc.returncode, self.log_tail()))
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("%s not listening after %.0f s: %s" % (
                    self.name, self.ready_timeout, self.log_tail()))
            time.sleep(0.02)

    def log_tail(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as err:
                return " | ".join(err.read().strip().splitlines()[-3:]) or "(no output)"
        except OSError:
            return "(no log)"

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)

    def wait_fds(self, at_most, timeout=15.0):
        """Wait until the server holds at most `at_most` file descriptors (idle ones gone)."""
        deadline = time.monotonic() + timeout
        while proc_fd_count(self.pid) > at_most and time.monotonic() < deadline:
            time.sleep(0.02)


def stop_process(proc):
    """SIGTERM, then SIGKILL after 5 s: by PID, through our own Popen object."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Options of the finger-only servers besides --users and --finger: the other listeners off
# (their defaults would bind :8000 and :1079), and what the idle-connection rows need:
# 10,000 idle connections at once (default limit: 4096 per listener), held open longer
# than the default 10 s a peer has to send its query.  Everything else is the default:
# log level info, --reload 30, no query log.
FINGER_ONLY = ["--web", "off", "--setter", "off",
               "--max-connections", "20000", "--request-timeout", "120"]


def finger_server(users, tmp, cpu, options=FINGER_ONLY, port=None):
    """finger.py --serve on HOST:{port} with `users`, default options but `options`."""
    return Server("finger.py", [PYTHON, FINGER, "--serve", "--users", users,
                                "--finger", HOST + ":{port}"] + list(options), cpu, tmp, port)


def run_load(server, load_cpus, names, concurrency, warmup, window, idle=0, extra=()):
    """bench/load.py against `server`; returns its JSON result."""
    procs = 1 if concurrency < 2 or not load_cpus else min(len(load_cpus), 4)
    argv = [PYTHON, LOAD, "--port", str(server.port), "--server-pid", str(server.pid),
            "--names", names, "--concurrency", str(concurrency), "--procs", str(procs),
            "--warmup", str(warmup), "--duration", str(window), "--idle", str(idle)]
    if load_cpus:
        argv += ["--cpus", ",".join(map(str, load_cpus))]
    return finish_load(subprocess.Popen(argv + list(extra), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE), warmup + window + 60)


def finish_load(proc, timeout):
    """Wait for a load.py process (stopped by PID if it overruns) and parse its result."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise RuntimeError("load generator overran %.0f s" % timeout) from None
    except BaseException:          # interrupted: do not leave it running
        stop_process(proc)
        raise
    if proc.returncode != 0 or not out.strip():
        lines = err.decode(errors="replace").strip().splitlines()
        raise RuntimeError("load generator failed: %s" % (lines[-1] if lines else
                                                          "status %d" % proc.returncode))
    return json.loads(out)


# == the sections: each fills `m` (figure name -> value) for one run =========================

def record_load(m, prefix, result):
    m[prefix + ".rps"] = result["rps"]
    m[prefix + ".p50"] = result["p50_ms"]
    m[prefix + ".p99"] = result["p99_ms"]
    m[prefix + ".errors"] = sum(result["errors"].values())
    m[prefix + ".error_kinds"] = result["errors"]
    m[prefix + ".cpu_us"] = result.get("server_us_per_query")
    m[prefix + ".server_util"] = result.get("server_cpu_util")
    m[prefix + ".load_util"] = result.get("load_cpu_util")
    m[prefix + ".rss_mb"] = result["server_rss_kb"] / 1024
    m[prefix + ".other_cpus"] = result.get("other_busy_cpus")


def step(m, prefix, function, *args):
    """Run one part of a section; a failure is noted under `prefix` and the rest goes on."""
    try:
        function(*args)
    except Exception as error:
        m["error." + prefix] = describe(error)
        log("  %s failed: %s" % (prefix, m["error." + prefix]))


def describe(error):
    lines = str(error).strip().splitlines()
    return "%s: %s" % (type(error).__name__, lines[-1] if lines else "")


def compare(m, s, plan, names, rows):
    """Rows that are compared with each other (server, prefix, load.py arguments, idle
    connections), each measured in `s.slices` slices of the window, taken in turn: A B C,
    C B A, A B C (the other way round every other run).  A row keeps its cleanest slice,
    the one in which the server spent the least CPU per answer (other processes on a shared
    machine only ever add to that), with the errors of all its slices; the p99 of every
    slice goes to the notes."""
    slices = {prefix: [] for _, prefix, _, _ in rows}
    order = rows if s.baseline_first else rows[::-1]
    try:
        for number in range(s.slices):
            for server, prefix, extra, idle in order if number % 2 == 0 else order[::-1]:
                base_fds = proc_fd_count(server.pid)
                slices[prefix].append(run_load(server, plan[1], names, s.concurrency,
                                               s.slice_warmup, s.window / s.slices, idle,
                                               extra))
                server.wait_fds(base_fds)       # its idle connections are gone again
    except Exception as error:
        for prefix in slices:
            m["error." + prefix] = describe(error)
        log("  %s failed: %s" % ("/".join(slices), describe(error)))
        return
    for prefix, results in slices.items():
        best = min(results, key=lambda result: result.get("server_us_per_query") or 1e9)
        record_load(m, prefix, best)
        m[prefix + ".idle"] = best["idle"]
        m[prefix + ".p99_slices"] = [result["p99_ms"] for result in results]
        kinds = {}
        for result in results:
            for kind, count in result["errors"].items():
                kinds[kind] = kinds.get(kind, 0) + count
        m[prefix + ".error_kinds"], m[prefix + ".errors"] = kinds, sum(kinds.values())
        m[prefix + ".answered_all"] = sum(result.get("answered_total") or 0
                                          for result in results)


def section_finger(m, s, plan, files, tmp):
    """Finger at 50 concurrent clients against three servers up at once on the same CPU,
    compared (see compare()): the bare baseline (bench/bare_server.py, row bare), finger.py
    with its defaults (f50), the same with 1,000 idle connections open (f1k), and with the
    query log (f50log).  Then, on the default one, a new query with 10,000 idle connections
    open and the client's cold start; and the lines the logging one wrote, counted once it
    has stopped (it flushes every second, and at exit)."""
    server_cpu, load_cpus = plan
    names = "%s:%d" % (NAMES, s.small_users)
    log_path = os.path.join(tmp, "queries.log")
    if os.path.exists(log_path):
        os.unlink(log_path)                 # this run's lines only

    def idle_row(prefix, server, concurrency, warmup, window, idle):
        base_fds = proc_fd_count(server.pid)
        result = run_load(server, load_cpus, names, concurrency, warmup, window, idle)
        record_load(m, prefix, result)
        m[prefix + ".idle"] = result["idle"]
        server.wait_fds(base_fds)

    with Server("bare_server.py", [PYTHON, BARE, "--users", files["small"], "--port",
                                   "{port}"], server_cpu, tmp) as bare, \
            finger_server(files["small"], tmp, server_cpu) as server, \
            finger_server(files["small"], tmp, server_cpu, FINGER_ONLY + [
                "--log-queries", "--logfile", log_path]) as logged:
        rows = [(bare, "bare", (), 0), (server, "f50", (), 0), (server, "f1k", (), s.some_idle),
                (logged, "f50log", (), 0)]
        compare(m, s, plan, names, rows)
        step(m, "f10k", idle_row, "f10k", server, 1, 0.2, s.new_query_window, s.many_idle)
        step(m, "cold", cold_start, m, s, server)
    if m.get("f50log.answered_all"):
        with open(log_path, encoding="utf-8", errors="replace") as lines:
            # query lines quote the request: 'INFO finger 127.0.0.1:PORT "u0000001" ok 0.1ms'
            m["f50log.log_lines"] = sum(1 for line in lines if '"' in line)
        m["f50log.lines_ratio"] = m["f50log.log_lines"] / m["f50log.answered_all"]


def cold_start(m, s, server):
    """Wall time of the client answering one query, and of `python3 -c pass`: the best of
    `s.cold_starts` each, interleaved.  Once as the issue says, once with -S: a site-packages
    .pth file that imports something slows `python3 -c pass` as much as the client, and
    flatters the ratio."""
    query = "%s@%s:%d" % (NAMES % 1, HOST, server.port)
    commands = {"client": [PYTHON, FINGER, query], "pass": [PYTHON, "-c", "pass"],
                "client_S": [PYTHON, "-S", FINGER, query], "pass_S": [PYTHON, "-S", "-c", "pass"]}
    times = {kind: [] for kind in commands}
    for _ in range(s.cold_starts):
        for kind, argv in commands.items():
            started = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=True, timeout=30)
            times[kind].append(time.perf_counter() - started)
    for kind, got in times.items():      # the best: other processes only ever add time
        m["cold.%s_ms" % kind] = min(got) * 1e3
    m["cold.ratio"] = m["cold.client_ms"] / m["cold.pass_ms"]
    m["cold.ratio_S"] = m["cold.client_S_ms"] / m["cold.pass_S_ms"]


def section_reload(m, s, plan, files, tmp):
    """The middle one of a run's three parse samples (parse_sample).  Then a server with
    1,000,000 users as an outsider runs it: default options plus the web site, Perspective
    Broker, the TCP setter and --reload 0.05; server and client not pinned to any CPU.  One
    client asks for random users throughout three load windows, one per event: the file
    replaced by rename, SIGHUP (a forced reload of the same file), a setter write.  For each:
    the longest answer and when it ended, and the peak RSS; steady RSS before them."""
    server_cpu, _ = plan
    step(m, "parse", parse_sample, m, files, server_cpu)
    directory = server_writable_dir(os.path.join(tmp, "reload"))
    users = os.path.join(directory, "users-1m")
    new = users + ".new"
    for source, target in ((files["big1"], users), (files["big2"], new)):
        shutil.copyfile(source, target)
        give_to_server(target)
    port, web_port, pb_port, setter_port = free_ports(4)
    options = ["--web", "off" if s.web_skip else "%s:%d" % (HOST, web_port),
               "--pb", "%s:%d" % (HOST, pb_port), "--setter", "%s:%d" % (HOST, setter_port),
               "--reload", str(s.reload_check)]
    peaks = {}
    with finger_server(users, tmp, None, options, port) as server:
        time.sleep(0.5)                               # let the first table settle
        m["mem.steady_mb"] = proc_status_kb(server.pid, "VmRSS") / 1024
        step(m, "reload", event_rename, m, s, server, users, new, peaks)
        step(m, "sighup", event_sighup, m, s, server, peaks)
        step(m, "setter", event_setter, m, s, server, setter_port, peaks)
        m["mem.after_mb"] = proc_status_kb(server.pid, "VmRSS") / 1024
    for event, peak in peaks.items():
        m["mem.peak_%s_mb" % event] = peak
    if peaks:
        m["mem.peak_mb"] = max(peaks.values())


def server_writable_dir(path):
    """A directory finger.py may write (the setter writes through to the users file, by a
    temp file and a rename): a server started as root runs as nobody."""
    os.makedirs(path, exist_ok=True)
    give_to_server(path)
    return path


def give_to_server(path):
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            return
        os.chown(path, nobody.pw_uid, nobody.pw_gid)


def event_window(m, prefix, s, server, duration, event, extra=()):
    """One client (load.py --concurrency 1, on any CPU) asks for random users of the
    1,000,000 for `duration` seconds after a 0.3 s warm-up; `event()` runs after about
    `s.before_event` s of plain queries and returns once the event is over.  Records the
    longest answer of the window, when it ended, and the server's peak RSS.
    Returns (event's start, its end, its return value, load.py's result); notes under
    PREFIX.outlasted when the event was not over before the load window ended."""
    m["mem.hwm_reset"] = reset_peak(server.pid) and m.get("mem.hwm_reset", True)
    argv = [PYTHON, LOAD, "--port", str(server.port), "--server-pid", str(server.pid),
            "--names", "%s:%d" % (NAMES, s.big_users), "--concurrency", "1",
            "--warmup", "0.3", "--duration", str(duration)] + list(extra)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=child_setup(None))
    try:
        time.sleep(0.05 + 0.3 + s.before_event)      # load.py's start, warm-up, plain queries
        began = time.monotonic()
        value = event()
        ended = time.monotonic()
        m[prefix + ".outlasted"] = proc.poll() is not None
    except BaseException:
        stop_process(proc)
        raise
    result = finish_load(proc, duration + 60)
    m[prefix + ".errors"] = sum(result["errors"].values())
    m[prefix + ".error_kinds"] = result["errors"]
    m[prefix + ".stall_ms"] = result["max_ms"]
    m[prefix + ".stall_after_s"] = (result["max_at"] - began) if result["max_at"] else None
    m[prefix + ".p99_ms"] = result["p99_ms"]
    m[prefix + ".answered"] = result["answered"]
    return began, ended, value, result


def event_rename(m, s, server, users, new, peaks):
    """(a) The users file replaced by rename; --reload notices it within 0.05 s.  The load
    stops s.after_event after the first answer with the new statuses."""
    def replace():
        os.replace(new, users)
    began, _, _, result = event_window(
        m, "reload", s, server, s.max_reload_wait, replace,
        ["--watch", "version 2", "--stop-after-watch", str(s.after_event)])
    peaks["reload"] = proc_status_kb(server.pid, "VmHWM") / 1024
    if result["first_watch"] is None:
        raise RuntimeError("the server did not serve the new statuses within %.0f s"
                           % s.max_reload_wait)
    m["reload.served_s"] = result["first_watch"] - began


def event_budget(m, s):
    """Seconds a SIGHUP reload or a setter write may need: twice what the rename reload
    took (1.5 times with --quick; at least 2 s), so the load window covers it whole."""
    return max(2.0, s.event_margin * (m.get("reload.served_s") or 2.0))


def loaded_lines(server):
    """How many 'loaded N users from FILE' lines the server has logged (stderr, info)."""
    try:
        with open(server.log_path, encoding="utf-8", errors="replace") as text:
            return sum(1 for line in text if " loaded " in line and " users from " in line)
    except OSError:
        return 0


def event_sighup(m, s, server, peaks):
    """(b) SIGHUP: the server re-reads the same file (forced).  Over when the server logs
    its next 'loaded N users' line."""
    budget = event_budget(m, s)
    before = loaded_lines(server)

    def hup():
        started = time.monotonic()
        os.kill(server.pid, signal.SIGHUP)
        while loaded_lines(server) <= before:
            if time.monotonic() - started > s.max_reload_wait:
                raise RuntimeError("no 'loaded' line %.0f s after SIGHUP" % s.max_reload_wait)
            time.sleep(0.01)
    began, ended, _, _ = event_window(m, "sighup", s, server,
                                           s.before_event + budget + s.after_event, hup)
    peaks["sighup"] = proc_status_kb(server.pid, "VmHWM") / 1024
    m["sighup.reload_s"] = ended - began


def event_setter(m, s, server, setter_port, peaks):
    """(c) A setter write into the 1,000,000-line file, as the tutorial's setter client does
    it: connect, send 'user CRLF status CRLF', close the sending side, read the answer."""
    budget = event_budget(m, s)

    def write():
        return exchange(setter_port, SETTER_REQUEST, s.max_reload_wait, half_close=True)
    began, ended, answer, _ = event_window(m, "setter", s, server,
                                           s.before_event + budget + s.after_event, write)
    peaks["setter"] = proc_status_kb(server.pid, "VmHWM") / 1024
    if answer != b"OK\r\n":
        raise RuntimeError("the setter answered %r" % answer[:80])
    m["setter.write_s"] = ended - began
    m["setter.served"] = b"set by the bench" in exchange(server.port,
                                                          (NAMES % 1).encode() + b"\r\n", 10)


def exchange(port, request, timeout, half_close=False):
    """Send `request` to HOST:port (then close our side, if asked) and read to EOF."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            data = sock.recv(4096)
            if not data:
                return reply
            reply += data


def parse_sample(m, files, cpu):
    """Seconds finger.FileDatabase takes to load the 1,000,000-line file in a process of its
    own, on the server's CPU.  Taken three times a run, at its start, middle and end; the
    row gives the best (other processes on the machine only ever add time, and a busy
    neighbour stays for seconds)."""
    code = ("import sys, time; sys.path.insert(0, %r); import finger\n"
            "t = time.perf_counter(); db = finger.FileDatabase(%r, 0)\n"
            "print(time.perf_counter() - t)\n"
            "assert db.get_user(%r) is not None" % (ROOT, files["big1"], NAMES % 0))
    seconds = float(subprocess.run([PYTHON, "-c", code], stdout=subprocess.PIPE, check=True,
                                   preexec_fn=child_setup(cpu), timeout=120).stdout)
    m.setdefault("parse.samples", []).append(seconds)
    m["parse.s"] = min(m["parse.samples"])


def reset_peak(pid):
    """Reset the process's VmHWM to its current RSS (Linux 4.0+); False where refused."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


# == web: rows that wait for the web site ====================================================

def web_probe(files, tmp):
    """None when finger.py serves the web site, else why the web rows are skipped."""
    log_path = os.path.join(tmp, "web-probe.log")
    with open(log_path, "wb") as err:
        proc = subprocess.Popen([
            PYTHON, FINGER, "--serve", "--users", files["small"], "--finger", "off",
            "--setter", "off", "--web", HOST + ":0", "--log-level", "info"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            exited = proc.poll() is not None
            with open(log_path, encoding="utf-8", errors="replace") as err:
                text = err.read()
            if "not implemented yet" in text:
                return "web not built yet"
            if "serving web on" in text:
                return None
            if exited:
                return "web server exited: " + " | ".join(text.strip().splitlines()[-2:])
            time.sleep(0.05)
        return "web server did not start in 10 s"
    finally:
        stop_process(proc)


def web_server(users, tmp, cpu):
    """The web site alone, default options otherwise (its listeners' defaults would bind
    :79 and :1079)."""
    return Server("finger.py-web", [
        PYTHON, FINGER, "--serve", "--users", users, "--finger", "off", "--setter", "off",
        "--web", HOST + ":{port}"], cpu, tmp)


def section_web(m, s, plan, files, tmp):
    """/NAME and / with 50 keep-alive clients against the bare `http.server` baseline
    (bench/bare_http.py, rows bare_web_*) and against finger.py's web site, both up at
    once on the same CPU, compared (see compare()).  Then XML-RPC getUser over one
    connection."""
    server_cpu, load_cpus = plan
    names = "%s:%d" % (NAMES, s.small_users)
    with Server("bare_http.py", [PYTHON, BARE_HTTP, "--users", files["small"], "--port",
                                 "{port}"], server_cpu, tmp) as bare, \
            web_server(files["small"], tmp, server_cpu) as site:
        compare(m, s, plan, names, [
            (bare, "bare_web_name", ("--mode", "http", "--paths", "/{name}"), 0),
            (site, "web_name", ("--mode", "http", "--paths", "/{name}"), 0),
            (site, "web_index", ("--mode", "http", "--paths", "/"), 0),
            (bare, "bare_web_index", ("--mode", "http", "--paths", "/"), 0)])
        step(m, "xmlrpc", lambda: record_load(m, "xmlrpc", run_load(
            site, load_cpus, names, 1, s.warmup, s.window, extra=("--mode", "xmlrpc"))))


def section_web_idle(m, s, plan, files, tmp):
    """The web site with 10,000 idle keep-alive connections open (load.py --idle: connected,
    and accepted by the server, before the load starts): a new /NAME request from one
    client (w10k), then /NAME from 50 keep-alive clients (w10k50), each with its own 10,000
    idle connections.  The server's options besides the default: room for the idle
    connections and the clients at once (--web-max-connections; loopback has no
    per-client limit by default), and an idle keep-alive timeout (--request-timeout,
    10 s by default) far longer than opening them and the load take."""
    server_cpu, load_cpus = plan
    names = "%s:%d" % (NAMES, s.small_users)
    options = ["--web-max-connections", str(s.many_idle + s.concurrency),
               "--request-timeout", "120"]
    with Server("finger.py-web-idle", [
            PYTHON, FINGER, "--serve", "--users", files["small"], "--finger", "off",
            "--setter", "off", "--web", HOST + ":{port}"] + options,
            server_cpu, tmp) as server:
        time.sleep(0.2)            # the connection Server made to see it listening is closed
        base_fds = proc_fd_count(server.pid)

        def load(prefix, concurrency, warmup, window):
            result = run_load(server, load_cpus, names, concurrency, warmup, window,
                              s.many_idle, ["--mode", "http", "--paths", "/{name}"])
            record_load(m, prefix, result)
            m[prefix + ".idle"] = result["idle"]
            # idle connections the server still held when the window ended (its own
            # descriptors apart): fewer than .idle, it closed some during the load
            m[prefix + ".idle_held"] = result["server_fds"] - base_fds
            server.wait_fds(base_fds)        # the idle connections are gone again

        step(m, "w10k", load, "w10k", 1, 0.2, s.new_query_window)
        step(m, "w10k50", load, "w10k50", s.concurrency, s.warmup, s.window)


# == the table ===============================================================================

class Fmt:
    """How a figure is written: digits after the point, unit, thousands separators."""

    def __init__(self, digits, unit="", thousands=False):
        self.digits, self.unit, self.thousands = digits, unit, thousands

    def number(self, value):
        return ("{:,.%df}" if self.thousands else "{:.%df}").replace("%d", str(self.digits)) \
            .format(value)

    def __call__(self, value):
        return self.number(value) + self.unit

    def span(self, values):
        return "%s–%s%s" % (self.number(min(values)), self.number(max(values)), self.unit)


COUNT, US, MS, MB = Fmt(0, thousands=True), Fmt(1, " µs"), Fmt(2, " ms"), Fmt(0, " MB")
SECONDS, TIMES = Fmt(2, " s"), Fmt(2, " ×")
# (figure, target, metric keys, formatter, check or None[, flag]).  The check is given the
# medians over the runs; flag "sum": the sum of the runs instead; "max": the table still
# shows the median, but the check is given the worst (largest) run; "web": skipped without
# the web site.
ROWS = [
    ("bare `selectors` server (bench/bare_server.py): server CPU per query, 50 concurrent",
     "reference", ["bare.cpu_us"], US, None),
    ("bare server: req/s; p50 / p99 latency", "reference",
     ["bare.rps", "bare.p50", "bare.p99"], [COUNT, MS, MS], None),
    ("finger, default options: server CPU per query, 50 concurrent clients", "report",
     ["f50.cpu_us"], US, None),
    ("finger ÷ bare server CPU per query, same run", "≤ 1.0 ×",
     ["ratio.cpu"], TIMES, lambda v: v["ratio.cpu"] <= 1.0),
    ("finger: req/s at 50 concurrent", "report", ["f50.rps"], COUNT, None),
    ("finger: p50 / p99 latency at 50 concurrent", "p99 ≤ 5 ms",
     ["f50.p50", "f50.p99"], MS, lambda v: v["f50.p99"] <= 5),
    ("finger: errors at 50 concurrent (sum of runs)", "0", ["f50.errors"], COUNT,
     lambda v: v["f50.errors"] == 0, "sum"),
    ("finger --log-queries --logfile FILE: server CPU per query, 50 concurrent", "report",
     ["f50log.cpu_us"], US, None),
    ("finger --log-queries ÷ bare server CPU per query, same run", "≤ 1.1 ×",
     ["ratio.cpu_log"], TIMES, lambda v: v["ratio.cpu_log"] <= 1.1),
    ("cost of the query log: server CPU per query with --log-queries − without, same run",
     "≤ 5 µs", ["log.cost_us"], US, lambda v: v["log.cost_us"] <= 5),
    ("finger --log-queries: req/s; p50 / p99 latency; errors", "report",
     ["f50log.rps", "f50log.p50", "f50log.p99", "f50log.errors"], [COUNT, MS, MS, COUNT],
     None),
    ("query log lines written (counted once the server stopped); ÷ queries answered, "
     "warm-up included", "≈ 1 ×, a sanity check", ["f50log.log_lines", "f50log.lines_ratio"],
     [COUNT, TIMES], lambda v: 0.95 <= v["f50log.lines_ratio"] <= 1.05),
    ("with 1,000 idle connections open: req/s; ÷ the line without", "within 10 %",
     ["f1k.rps", "ratio.idle_rps"], [COUNT, TIMES],
     lambda v: abs(v["ratio.idle_rps"] - 1) <= 0.1),
    ("with 1,000 idle connections open: server CPU per query; ÷ the line without",
     "within 10 %", ["f1k.cpu_us", "ratio.idle_cpu"], [US, TIMES],
     lambda v: abs(v["ratio.idle_cpu"] - 1) <= 0.1),
    ("with 1,000 idle connections open: p50 / p99 latency; errors", "report",
     ["f1k.p50", "f1k.p99", "f1k.errors"], [MS, MS, COUNT], None),
    ("a new query with 10,000 idle connections open (one client): p50 / p99", "p99 ≤ 5 ms",
     ["f10k.p50", "f10k.p99"], MS, lambda v: v["f10k.p99"] <= 5),
    ("server RSS with 10,000 idle connections open", "≤ 64 MB", ["f10k.rss_mb"], MB,
     lambda v: v["f10k.rss_mb"] <= 64),
    ("1,000,000-line users file: parse alone (FileDatabase load, own process, pinned; best "
     "of 3 a run: at its start, middle and end)",
     "≤ 1.0 s", ["parse.s"], SECONDS, lambda v: v["parse.s"] <= 1.0),
    ("reload in the server (defaults + web, PB, TCP setter, --reload 0.05; not pinned): "
     "file replaced by rename → new statuses served", "report", ["reload.served_s"],
     SECONDS, None),
    ("longest answer during a rename reload (one client asking for random users of the "
     "1,000,000 throughout)", "≤ 20 ms in every run", ["reload.stall_ms"], MS,
     lambda v: v["reload.stall_ms"] <= 20, "max"),
    ("longest answer during a SIGHUP reload (the same file, re-read)",
     "≤ 20 ms in every run", ["sighup.stall_ms"], MS,
     lambda v: v["sighup.stall_ms"] <= 20, "max"),
    ("longest answer during a setter write into the 1,000,000-line file",
     "≤ 20 ms in every run", ["setter.stall_ms"], MS,
     lambda v: v["setter.stall_ms"] <= 20, "max"),
    ("setter write round trip into a 1,000,000-line file (connect → OK)", "report",
     ["setter.write_s"], SECONDS, None),
    ("memory with 1,000,000 users: steady RSS", "≤ 250 MB", ["mem.steady_mb"], MB,
     lambda v: v["mem.steady_mb"] <= 250),
    ("memory with 1,000,000 users: peak RSS during the reloads and the setter write "
     "(VmHWM, the highest of the three events)", "≤ 450 MB", ["mem.peak_mb"], MB,
     lambda v: v["mem.peak_mb"] <= 450),
    ("that peak RSS ÷ steady RSS", "≤ 2.0 ×", ["mem.peak_ratio"], TIMES,
     lambda v: v["mem.peak_ratio"] <= 2.0),
    ("bare `http.server` (bench/bare_http.py: ThreadingHTTPServer, keep-alive): /NAME, "
     "50 keep-alive clients: req/s; p50 / p99; errors", "reference",
     ["bare_web_name.rps", "bare_web_name.p50", "bare_web_name.p99", "bare_web_name.errors"],
     [COUNT, MS, MS, COUNT], None, "web"),
    ("web: /NAME, 50 keep-alive clients: req/s; p50 / p99; errors",
     "p99 ≤ 10 ms, 0 errors", ["web_name.rps", "web_name.p50", "web_name.p99",
                               "web_name.errors"], [COUNT, MS, MS, COUNT],
     lambda v: v["web_name.p99"] <= 10 and v["web_name.errors"] == 0, "web"),
    ("web /NAME: finger ÷ bare http.server req/s, same run; p99 finger / bare",
     "≥ 1.0 ×", ["ratio.web_name_rps", "web_name.p99", "bare_web_name.p99"],
     [TIMES, MS, MS], lambda v: v["ratio.web_name_rps"] >= 1.0, "web"),
    ("bare `http.server`: / (1,000 users), 50 keep-alive clients: req/s; p50 / p99; errors",
     "reference", ["bare_web_index.rps", "bare_web_index.p50", "bare_web_index.p99",
                   "bare_web_index.errors"], [COUNT, MS, MS, COUNT], None, "web"),
    ("web: / (1,000 users), 50 keep-alive clients: req/s; p50 / p99; errors",
     "p99 ≤ 10 ms, 0 errors", ["web_index.rps", "web_index.p50", "web_index.p99",
                               "web_index.errors"], [COUNT, MS, MS, COUNT],
     lambda v: v["web_index.p99"] <= 10 and v["web_index.errors"] == 0, "web"),
    ("web /: finger ÷ bare http.server req/s, same run; p99 finger / bare",
     "≥ 1.0 ×", ["ratio.web_index_rps", "web_index.p99", "bare_web_index.p99"],
     [TIMES, MS, MS], lambda v: v["ratio.web_index_rps"] >= 1.0, "web"),
    ("web with 10,000 idle keep-alive connections open: a new /NAME request (one client): "
     "p50 / p99", "p99 ≤ 5 ms", ["w10k.p50", "w10k.p99"], MS,
     lambda v: v["w10k.p99"] <= 5, "web"),
    ("web: server RSS with 10,000 idle keep-alive connections open", "≤ 64 MB",
     ["w10k.rss_mb"], MB, lambda v: v["w10k.rss_mb"] <= 64, "web"),
    ("web with 10,000 idle keep-alive connections open: /NAME, 50 keep-alive clients "
     "(after the line above, same server): req/s; ÷ the line without; p50 / p99; errors; "
     "server RSS", "report", ["w10k50.rps", "ratio.web_idle_rps", "w10k50.p50",
                              "w10k50.p99", "w10k50.errors", "w10k50.rss_mb"],
     [COUNT, TIMES, MS, MS, COUNT, MB], None, "web"),
    ("XML-RPC getUser over one keep-alive connection: calls/s", "report",
     ["xmlrpc.rps"], COUNT, None, "web"),
    ("client cold start: `finger.py user@127.0.0.1:PORT` ÷ `python3 -c pass`", "≤ 1.5 ×",
     ["cold.ratio"], TIMES, lambda v: v["cold.ratio"] <= 1.5),
    ("the same with `python3 -S` (no site-packages)", "≤ 1.5 ×", ["cold.ratio_S"], TIMES,
     lambda v: v["cold.ratio_S"] <= 1.5),
    ("client cold start, each the best of 10 (5 with --quick): client; python3 -c pass; "
     "the same with -S", "report", ["cold.client_ms", "cold.pass_ms", "cold.client_S_ms",
                                    "cold.pass_S_ms"], Fmt(0, " ms"), None),
]

# Figures computed inside one run: key -> (operation, first figure, second figure).
DERIVED = {"ratio.cpu": ("/", "f50.cpu_us", "bare.cpu_us"),
           "ratio.cpu_log": ("/", "f50log.cpu_us", "bare.cpu_us"),
           "log.cost_us": ("-", "f50log.cpu_us", "f50.cpu_us"),
           "ratio.idle_rps": ("/", "f1k.rps", "f50.rps"),
           "ratio.idle_cpu": ("/", "f1k.cpu_us", "f50.cpu_us"),
           "mem.peak_ratio": ("/", "mem.peak_mb", "mem.steady_mb"),
           "ratio.web_name_rps": ("/", "web_name.rps", "bare_web_name.rps"),
           "ratio.web_index_rps": ("/", "web_index.rps", "bare_web_index.rps"),
           "ratio.web_idle_rps": ("/", "w10k50.rps", "web_name.rps")}


def derive(m):
    for key, (operation, first, second) in DERIVED.items():
        if m.get(first) is None or m.get(second) is None:
            continue
        if operation == "-":
            m[key] = m[first] - m[second]
        elif m[second]:
            m[key] = m[first] / m[second]


def why_missing(runs, keys):
    """The errors that kept `keys` from being measured."""
    sources = set()
    for key in keys:
        sources |= set(DERIVED[key][1:]) if key in DERIVED else {key}
    prefixes = {key.split(".")[0] for key in sources}
    if "mem" in prefixes:              # the peaks are taken in the three reload events
        prefixes |= {"reload", "sighup", "setter"}
    found = {run["error." + prefix] for run in runs for prefix in prefixes
             if run.get("error." + prefix)}
    return "; ".join(sorted(found)) or "not measured"


def table(runs, web_skip):
    lines = ["| figure | target | median | min – max | result |", "|---|---|---|---|---|"]
    for row in ROWS:
        figure, target, keys, formatter, check = row[:5]
        flag = row[5] if len(row) > 5 else None
        formatters = formatter if isinstance(formatter, list) else [formatter] * len(keys)
        if flag == "web" and web_skip:
            lines.append("| %s | %s | %s | | skipped |" % (figure, target, web_skip))
            continue
        values = [[run[key] for run in runs if run.get(key) is not None] for key in keys]
        if not all(values):
            lines.append("| %s | %s | failed: %s | | not measured |"
                         % (figure, target, why_missing(runs, keys).replace("|", "/")))
            continue
        medians = {key: (sum(got) if flag == "sum" else statistics.median(got))
                   for key, got in zip(keys, values)}
        judged = {key: max(got) for key, got in zip(keys, values)} if flag == "max" \
            else medians
        cells = " / ".join(f(medians[key]) for f, key in zip(formatters, keys))
        spans = " / ".join(f.span(got) for f, got in zip(formatters, values))
        result = "report" if check is None else "met" if check(judged) else "**missed**"
        lines.append("| %s | %s | %s | %s | %s |" % (figure, target, cells, spans, result))
    return "\n".join(lines)


def notes(runs, settings):
    """What the figures depend on: who was the bottleneck, what was clamped."""
    out = []
    for prefix, what in (("bare", "bare server"), ("f50", "finger, 50 concurrent"),
                         ("f50log", "finger --log-queries, 50 concurrent"),
                         ("f1k", "finger, 1,000 idle"),
                         ("bare_web_name", "bare http.server, /NAME"),
                         ("web_name", "finger web, /NAME"),
                         ("bare_web_index", "bare http.server, /"),
                         ("web_index", "finger web, /"),
                         ("w10k50", "finger web, /NAME with 10,000 idle")):
        def median(key):
            got = [r[key] for r in runs if r.get(key) is not None]
            return statistics.median(got) if got else None
        server, load = median(prefix + ".server_util"), median(prefix + ".load_util")
        other = median(prefix + ".other_cpus")
        if server is None or load is None:
            continue
        if server >= 0.85 and load >= 0.85:
            verdict = "both near saturation"
        elif server >= 0.85:
            verdict = "the server was the bottleneck"
        elif load >= 0.85:
            verdict = "**the load generator, not the server, was the bottleneck**"
        else:
            verdict = "neither was saturated"
        out.append("%s: server CPU %.0f %%, load generator CPU %.0f %% of its cores, other "
                   "processes %.2f CPUs: %s." % (what, server * 100, load * 100, other or 0,
                                                 verdict))
    for prefix in ("f50", "f50log", "f1k", "f10k", "reload", "sighup", "setter", "web_name",
                   "web_index", "xmlrpc", "bare_web_name", "bare_web_index", "w10k", "w10k50"):
        kinds = {}
        for run in runs:
            for kind, count in (run.get(prefix + ".error_kinds") or {}).items():
                kinds[kind] = kinds.get(kind, 0) + count
        if kinds:
            out.append("%s errors: %s" % (prefix, ", ".join(
                "%s × %d" % item for item in sorted(kinds.items()))))
    for prefix, what in (("f50", "finger"), ("f1k", "finger, 1,000 idle"),
                         ("f50log", "finger --log-queries"), ("web_name", "web /NAME"),
                         ("web_index", "web /")):
        if any(r.get(prefix + ".p99_slices") for r in runs):
            out.append("%s: p99 of every slice, ms (the rows give the cleanest's): %s" % (
                what, "; ".join(", ".join("%.1f" % p99 for p99 in r.get(prefix + ".p99_slices")
                                          or []) for r in runs)))
    if any(r.get("parse.samples") for r in runs):
        out.append("parse of 1,000,000 lines, every sample, s (start, middle, end of each "
                   "run): %s" % "; ".join(", ".join("%.2f" % seconds for seconds in
                                                    r.get("parse.samples") or []) for r in runs))
    idle = [r["f10k.idle"] for r in runs if r.get("f10k.idle") is not None]
    if idle and min(idle) < settings.many_idle:
        out.append("only %d idle connections could be opened (RLIMIT_NOFILE)" % min(idle))
    for prefix in ("w10k", "w10k50"):
        held = [(r[prefix + ".idle_held"], r[prefix + ".idle"]) for r in runs
                if r.get(prefix + ".idle_held") is not None]
        if any(got < wanted for got, wanted in held):
            out.append("**%s: the server closed idle web connections during the load**: it "
                       "held %s of them at the end" % (prefix, ", ".join(
                           "%d of %d" % pair for pair in held)))
    lines = [r["f50log.log_lines"] for r in runs if r.get("f50log.log_lines") is not None]
    if lines and min(lines) == 0:
        out.append("**the query log stayed empty** in %d of %d runs: --log-queries wrote no "
                   "query lines to --logfile" % (lines.count(0), len(lines)))

    def each_run(key, digits=2):
        return ", ".join("?" if r.get(key) is None else "%.*f" % (digits, r[key])
                         for r in runs)
    for prefix, event, over, over_key in (
            ("reload", "the file was replaced", "new statuses served", "reload.served_s"),
            ("sighup", "SIGHUP", "the reload logged", "sighup.reload_s"),
            ("setter", "the setter connection opened", "its OK", "setter.write_s")):
        if any(r.get(prefix + ".stall_ms") is not None for r in runs):
            out.append("%s: longest answer %s ms, ending %s s after %s (%s after %s s)" % (
                {"reload": "rename reload", "sighup": "SIGHUP reload",
                 "setter": "setter write"}[prefix], each_run(prefix + ".stall_ms", 1),
                each_run(prefix + ".stall_after_s"), event, over, each_run(over_key)))
        if any(r.get(prefix + ".outlasted") for r in runs):
            out.append("**%s outlasted its load window**: its longest answer may be missing"
                       % prefix)
    if any(r.get("setter.served") is False for r in runs):
        out.append("**after the setter's OK, finger did not answer the new status**")
    if any(r.get("mem.peak_mb") is not None for r in runs):
        out.append("peak RSS by event (MB, each run): rename %s; SIGHUP %s; setter write %s"
                   % tuple(each_run("mem.peak_%s_mb" % event, 0)
                           for event in ("reload", "sighup", "setter")))
    if any(r.get("mem.hwm_reset") is False for r in runs):
        out.append("/proc/PID/clear_refs refused: the peak RSS is the process's lifetime "
                   "peak, start-up included")
    out.append("latency is measured by the load generator from connect() to the reply's "
               "EOF (web: from sending a request to the end of its answer, on a keep-alive "
               "connection); at 50 concurrent clients it includes time queued in the load "
               "generator (p50 ≈ 50 ÷ req/s)")
    return ["- " + note for note in out]


# == main ====================================================================================

def make_files(tmp, s):
    files = {"small": os.path.join(tmp, "users-1k"), "big1": os.path.join(tmp, "users-1m-v1"),
             "big2": os.path.join(tmp, "users-1m-v2")}
    write_users(files["small"], s.small_users, 1)
    write_users(files["big1"], s.big_users, 1)
    write_users(files["big2"], s.big_users, 2)
    return files


def progress(number, runs, m):
    def get(key, digits=1):
        value = m.get(key)
        return "?" if value is None else "%.*f" % (digits, value)
    log("run %d/%d: bare %s µs/q, finger %s µs/q (%s q/s, p99 %s ms), with --log-queries "
        "%s µs/q; 1k idle %s q/s; 10k idle p99 %s ms, RSS %s MB; parse %s s; longest answer "
        "during rename/SIGHUP/setter %s/%s/%s ms; RSS %s/%s MB; cold start %s ×; web /NAME %s "
        "q/s (bare http.server %s), p99 %s ms; 10k idle web p99 %s ms, RSS %s MB" % (
            number, runs, get("bare.cpu_us"), get("f50.cpu_us"), get("f50.rps", 0),
            get("f50.p99", 2), get("f50log.cpu_us"), get("f1k.rps", 0), get("f10k.p99", 2),
            get("f10k.rss_mb", 0), get("parse.s", 2), get("reload.stall_ms", 1),
            get("sighup.stall_ms", 1), get("setter.stall_ms", 1), get("mem.steady_mb", 0),
            get("mem.peak_mb", 0), get("cold.ratio", 2), get("web_name.rps", 0),
            get("bare_web_name.rps", 0), get("web_name.p99", 2), get("w10k.p99", 2),
            get("w10k.rss_mb", 0)))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=None,
                        help="runs to take medians over (default: 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="one short run: a smoke test, not figures to quote (it leaves "
                             "bench/RESULTS.md as it is)")
    parser.add_argument("--no-results", action="store_true",
                        help="print the table only; do not write it into bench/RESULTS.md")
    parser.add_argument("--results", metavar="FILE", default=results.RESULTS,
                        help="the file whose 'bench' section the table replaces (default: "
                             "bench/RESULTS.md)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs_wanted = max(1, args.runs or (1 if args.quick else 3))
    if not sys.platform.startswith("linux"):
        log("bench: needs Linux (/proc); nothing measured")
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    s = Settings(args.quick)
    nofile = raise_nofile(20000 + 1024)
    if nofile < s.many_idle + 500:
        s.many_idle = max(nofile - 500, 100)
    plan = cpu_plan()
    server_cpu, load_cpus = plan
    if load_cpus:
        os.sched_setaffinity(0, set(load_cpus))   # the bench and its clients stay off the
    started = time.monotonic()                    # server's CPU
    command = results.command_line("bench.py", sys.argv[1:] if argv is None else argv)
    facts = machine_facts(server_cpu, load_cpus)
    log("bench: %s runs; %s" % (runs_wanted, "; ".join(facts)))
    runs = []
    with tempfile.TemporaryDirectory(prefix="finger-bench-") as tmp:
        os.chmod(tmp, 0o755)      # finger.py started as root serves as nobody: let it read
        files = make_files(tmp, s)
        web_skip = s.web_skip = web_probe(files, tmp)
        sections = [(section_finger, ["bare", "f50", "f50log", "f1k", "f10k", "cold"]),
                    (section_reload, ["parse", "reload", "sighup", "setter", "mem"])]
        if web_skip is None:
            sections.append((section_web, ["bare_web_name", "bare_web_index",
                                           "web_name", "web_index", "xmlrpc"]))
            sections.append((section_web_idle, ["w10k", "w10k50"]))
        for number in range(1, runs_wanted + 1):
            m = {}
            s.baseline_first = number % 2 == 1      # each comparison the other way round
            step(m, "parse", parse_sample, m, files, server_cpu)    # the middle one: reload
            for section, prefixes in sections:
                try:
                    section(m, s, plan, files, tmp)
                except Exception as error:
                    log("run %d: %s failed: %s" % (number, section.__name__, describe(error)))
                    for prefix in prefixes:
                        m.setdefault("error." + prefix, describe(error))
            step(m, "parse", parse_sample, m, files, server_cpu)
            derive(m)
            runs.append(m)
            progress(number, runs_wanted, m)
    section = "\n".join(
        ["## `make bench`", "", "```", "$ " + command] + facts +
        ["%d run%s, %.0f s in all; medians, with the min–max over the runs"
         % (runs_wanted, "" if runs_wanted == 1 else "s", time.monotonic() - started),
         "```", "", table(runs, web_skip), ""] + notes(runs, s))
    print()
    print(section)
    sys.stdout.flush()
    if args.quick or args.no_results:
        log("bench: %s: %s left as it is" % ("--quick" if args.quick else "--no-results",
                                              results.shown(args.results)))
    else:
        try:
            results.replace_section("bench", section, args.results)
            log("bench: the table replaces the 'bench' section of %s"
                % results.shown(args.results))
        except OSError as error:
            log("bench: could not write %s: %s" % (results.shown(args.results), error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
