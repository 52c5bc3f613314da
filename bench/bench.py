#!/usr/bin/env python3
"""`make bench`: how fast, how big and how steady finger.py's server is, on this machine.

    python3 bench/bench.py            # 3 runs, about 2 minutes; prints one Markdown table
    python3 bench/bench.py --quick    # 1 short run, a smoke test (under 30 s)
    python3 bench/bench.py --runs 5

Every figure is the median over the runs, with the min-max beside it.  Servers run on one
CPU and the load generator (bench/load.py) on the others, when the machine has two or more.
Loopback only (127.0.0.1); every load is bounded in count and time; every process the
bench starts is stopped by its PID.  It reports and never fails: the exit status is 0 once
the table is printed, whatever the figures are.  Linux only (it reads /proc).
Standard library only; Python 3.9 or newer.
"""

import argparse
import json
import os
import platform
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
PYTHON = sys.executable          # the real interpreter, not a wrapper script around it
HOST = "127.0.0.1"
NAMES = "u%07d"                  # user names in the generated users files

sys.path.insert(0, HERE)
from load import (machine_cpu_jiffies, proc_fd_count, proc_status_kb,  # noqa: E402
                  raise_nofile)


class Settings:
    """How long and how big; --quick shortens the windows, not the sizes."""

    def __init__(self, quick):
        self.warmup = 0.2 if quick else 0.5        # seconds of load before measuring
        self.window = 1.0 if quick else 3.0        # measured seconds per load row
        self.new_query_window = 1.0 if quick else 2.0
        self.concurrency = 50
        self.small_users = 1000
        self.big_users = 1000000
        self.some_idle = 1000
        self.many_idle = 10000
        self.cold_starts = 5 if quick else 10      # of each command, interleaved
        self.reload_check = 0.05                   # --reload of the 1,000,000-user server
        self.max_reload_wait = 60.0                # seconds


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
    model = ""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    busy = busy_fraction(0.5)
    facts = [
        "machine: %d CPUs%s, %s %s, %s %s" % (
            os.cpu_count(), " (%s)" % model if model else "", platform.system(),
            platform.release(), platform.python_implementation(), platform.python_version()),
        "placement: " + ("server on CPU %d, load generator on CPU %s" % (
            server_cpu, ",".join(map(str, load_cpus))) if server_cpu is not None else
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
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def child_setup(cpu):
    """preexec_fn of a server: its own CPU, and file descriptors for 10,000 connections."""
    def setup():
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        raise_nofile(20000 + 1024)
    return setup


class Server:
    """A server process on HOST:port, started with `argv` (+ the port); stopped by PID."""

    def __init__(self, name, argv, cpu, tmp, ready_timeout=60.0):
        self.name = name
        self.port = free_port()
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


def finger_server(users, tmp, cpu, reload_interval="0.5"):
    return Server("finger.py", [
        PYTHON, FINGER, "--serve", "--users", users, "--finger", HOST + ":{port}",
        "--web", "off", "--setter", "off", "--log-level", "warning",
        "--max-connections", "20000", "--reload", reload_interval,
        # idle connections must outlive the rows that hold them (default: 10 s)
        "--timeout", "120"], cpu, tmp)


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


def section_bare(m, s, plan, files, tmp):
    server_cpu, load_cpus = plan
    with Server("bare_server.py", [PYTHON, BARE, "--users", files["small"], "--port",
                                   "{port}"], server_cpu, tmp) as server:
        record_load(m, "bare", run_load(server, load_cpus, "%s:%d" % (NAMES, s.small_users),
                                        s.concurrency, s.warmup, s.window))


def section_finger(m, s, plan, files, tmp):
    server_cpu, load_cpus = plan
    names = "%s:%d" % (NAMES, s.small_users)
    with finger_server(files["small"], tmp, server_cpu) as server:
        base_fds = proc_fd_count(server.pid)

        def load(prefix, concurrency, warmup, window, idle=0):
            result = run_load(server, load_cpus, names, concurrency, warmup, window, idle)
            record_load(m, prefix, result)
            m[prefix + ".idle"] = result["idle"]
            server.wait_fds(base_fds)        # the idle connections are gone again

        step(m, "f50", load, "f50", s.concurrency, s.warmup, s.window)
        step(m, "f1k", load, "f1k", s.concurrency, s.warmup, s.window, s.some_idle)
        step(m, "f10k", load, "f10k", 1, 0.2, s.new_query_window, s.many_idle)
        step(m, "cold", cold_start, m, s, server)


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
    """Parse alone; then a server with 1,000,000 users, one client querying throughout
    while the file is replaced: time until the new statuses are served, longest stall,
    steady RSS and the peak during the reload."""
    server_cpu, load_cpus = plan
    step(m, "parse", lambda: m.__setitem__("parse.s", parse_alone(files["big1"], server_cpu)))
    users = os.path.join(tmp, "users-1m")
    shutil.copyfile(files["big1"], users)
    new = users + ".new"
    shutil.copyfile(files["big2"], new)
    with finger_server(users, tmp, server_cpu, str(s.reload_check)) as server:
        time.sleep(0.5)                               # let the first table settle
        m["mem.steady_mb"] = proc_status_kb(server.pid, "VmRSS") / 1024
        m["mem.hwm_reset"] = reset_peak(server.pid)
        argv = [PYTHON, LOAD, "--port", str(server.port), "--server-pid", str(server.pid),
                "--names", "%s:%d" % (NAMES, s.big_users), "--concurrency", "1",
                "--warmup", "0.3", "--duration", str(s.max_reload_wait),
                "--watch", "version 2", "--stop-after-watch", "0.5"]
        if load_cpus:
            argv += ["--cpus", ",".join(map(str, load_cpus))]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(0.3 + 0.05 + 0.5)              # warm-up, then 0.5 s of plain queries
            replaced = time.monotonic()
            os.replace(new, users)
        except BaseException:
            stop_process(proc)
            raise
        result = finish_load(proc, s.max_reload_wait + 60)
        time.sleep(0.2)
        m["mem.peak_mb"] = proc_status_kb(server.pid, "VmHWM") / 1024
        m["mem.after_mb"] = proc_status_kb(server.pid, "VmRSS") / 1024
    m["reload.errors"] = sum(result["errors"].values())
    m["reload.error_kinds"] = result["errors"]
    m["reload.stall_ms"] = result["max_ms"]
    m["reload.stall_after_s"] = (result["max_at"] - replaced) if result["max_at"] else None
    m["reload.p99_ms"] = result["p99_ms"]
    if result["first_watch"] is None:
        raise RuntimeError("the server did not serve the new statuses within %.0f s"
                           % s.max_reload_wait)
    m["reload.served_s"] = result["first_watch"] - replaced


def parse_alone(path, cpu):
    """Seconds finger.FileDatabase takes to load `path` in a process of its own."""
    code = ("import sys, time; sys.path.insert(0, %r); import finger\n"
            "t = time.perf_counter(); db = finger.FileDatabase(%r, 0)\n"
            "print(time.perf_counter() - t)\n"
            "assert db.get_user(%r) is not None" % (ROOT, path, NAMES % 0))
    out = subprocess.run([PYTHON, "-c", code], stdout=subprocess.PIPE, check=True,
                         preexec_fn=child_setup(cpu), timeout=120).stdout
    return float(out)


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
    return Server("finger.py-web", [
        PYTHON, FINGER, "--serve", "--users", users, "--finger", "off", "--setter", "off",
        "--web", HOST + ":{port}", "--log-level", "warning", "--max-connections", "20000",
        "--reload", "0.5"], cpu, tmp)


def section_web(m, s, plan, files, tmp):
    """/NAME and / with 50 keep-alive clients; XML-RPC getUser over one connection."""
    server_cpu, load_cpus = plan
    names = "%s:%d" % (NAMES, s.small_users)
    with web_server(files["small"], tmp, server_cpu) as server:
        def load(prefix, concurrency, *extra):
            record_load(m, prefix, run_load(server, load_cpus, names, concurrency, s.warmup,
                                            s.window, extra=extra))

        step(m, "web_name", load, "web_name", s.concurrency, "--mode", "http",
             "--paths", "/{name}")
        step(m, "web_index", load, "web_index", s.concurrency, "--mode", "http",
             "--paths", "/")
        step(m, "xmlrpc", load, "xmlrpc", 1, "--mode", "xmlrpc")


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
# (figure, target, metric keys, formatter, check on the medians or None, "sum" to add runs)
ROWS = [
    ("bare `selectors` server (bench/bare_server.py): server CPU per query, 50 concurrent",
     "reference", ["bare.cpu_us"], US, None),
    ("bare server: req/s; p50 / p99 latency", "reference",
     ["bare.rps", "bare.p50", "bare.p99"], [COUNT, MS, MS], None),
    ("finger: server CPU per query, 50 concurrent clients", "≤ 25 µs",
     ["f50.cpu_us"], US, lambda v: v["f50.cpu_us"] <= 25),
    ("finger ÷ bare server CPU per query, same run", "≤ 1.1 ×",
     ["ratio.cpu"], TIMES, lambda v: v["ratio.cpu"] <= 1.1),
    ("finger: req/s at 50 concurrent", "report", ["f50.rps"], COUNT, None),
    ("finger: p50 / p99 latency at 50 concurrent", "p99 ≤ 5 ms",
     ["f50.p50", "f50.p99"], MS, lambda v: v["f50.p99"] <= 5),
    ("finger: errors at 50 concurrent (sum of runs)", "0", ["f50.errors"], COUNT,
     lambda v: v["f50.errors"] == 0, "sum"),
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
    ("1,000,000-line users file: parse alone (FileDatabase load, own process)", "≤ 1.0 s",
     ["parse.s"], SECONDS, lambda v: v["parse.s"] <= 1.0),
    ("reload in the server, queries running: file replaced → new statuses served "
     "(includes ≤ 0.05 s of --reload polling)", "report", ["reload.served_s"], SECONDS, None),
    ("longest lookup stall during that reload (one client querying throughout)",
     "≤ 20 ms", ["reload.stall_ms"], MS, lambda v: v["reload.stall_ms"] <= 20),
    ("memory with 1,000,000 users: steady RSS", "≤ 250 MB", ["mem.steady_mb"], MB,
     lambda v: v["mem.steady_mb"] <= 250),
    ("memory with 1,000,000 users: peak RSS during the reload (VmHWM)", "≤ 450 MB",
     ["mem.peak_mb"], MB, lambda v: v["mem.peak_mb"] <= 450),
    ("web: /NAME, 50 keep-alive clients: req/s; p50 / p99; errors",
     "p99 ≤ 10 ms, no timeouts", ["web_name.rps", "web_name.p50", "web_name.p99",
                                  "web_name.errors"], [COUNT, MS, MS, COUNT],
     lambda v: v["web_name.p99"] <= 10 and v["web_name.errors"] == 0, "web"),
    ("web: / (1,000 users), 50 keep-alive clients: req/s; p50 / p99; errors",
     "p99 ≤ 10 ms, no timeouts", ["web_index.rps", "web_index.p50", "web_index.p99",
                                  "web_index.errors"], [COUNT, MS, MS, COUNT],
     lambda v: v["web_index.p99"] <= 10 and v["web_index.errors"] == 0, "web"),
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


def derive(m):
    """Ratios computed inside one run."""
    pairs = {"ratio.cpu": ("f50.cpu_us", "bare.cpu_us"),
             "ratio.idle_rps": ("f1k.rps", "f50.rps"),
             "ratio.idle_cpu": ("f1k.cpu_us", "f50.cpu_us")}
    for key, (top, bottom) in pairs.items():
        if m.get(top) is not None and m.get(bottom):
            m[key] = m[top] / m[bottom]


def why_missing(runs, keys):
    """The errors that kept `keys` from being measured."""
    prefixes = {key.split(".")[0] for key in keys}
    if "ratio" in prefixes:
        prefixes |= {"bare", "f50", "f1k"}
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
        cells = " / ".join(f(medians[key]) for f, key in zip(formatters, keys))
        spans = " / ".join(f.span(got) for f, got in zip(formatters, values))
        result = "report" if check is None else "met" if check(medians) else "**missed**"
        lines.append("| %s | %s | %s | %s | %s |" % (figure, target, cells, spans, result))
    return "\n".join(lines)


def notes(runs, settings):
    """What the figures depend on: who was the bottleneck, what was clamped."""
    out = []
    for prefix, what in (("bare", "bare server"), ("f50", "finger, 50 concurrent"),
                         ("f1k", "finger, 1,000 idle")):
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
    for prefix in ("f50", "f1k", "f10k", "reload", "web_name", "web_index", "xmlrpc"):
        kinds = {}
        for run in runs:
            for kind, count in (run.get(prefix + ".error_kinds") or {}).items():
                kinds[kind] = kinds.get(kind, 0) + count
        if kinds:
            out.append("%s errors: %s" % (prefix, ", ".join(
                "%s × %d" % item for item in sorted(kinds.items()))))
    idle = [r["f10k.idle"] for r in runs if r.get("f10k.idle") is not None]
    if idle and min(idle) < settings.many_idle:
        out.append("only %d idle connections could be opened (RLIMIT_NOFILE)" % min(idle))
    stall = [r["reload.stall_after_s"] for r in runs
             if r.get("reload.stall_after_s") is not None]
    served = [r["reload.served_s"] for r in runs if r.get("reload.served_s") is not None]
    if stall and served:
        out.append("the longest stall ended %s s after the file was replaced (new statuses "
                   "served after %s s)" % (", ".join("%.2f" % v for v in stall),
                                           ", ".join("%.2f" % v for v in served)))
    if any(r.get("mem.hwm_reset") is False for r in runs):
        out.append("/proc/PID/clear_refs refused: the peak RSS is the process's lifetime "
                   "peak, start-up included")
    out.append("latency is measured by the load generator from connect() to the reply's "
               "EOF; at 50 concurrent clients it includes time queued in the load "
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
    log("run %d/%d: bare %s µs/q, finger %s µs/q (%s q/s, p99 %s ms); 1k idle %s q/s; "
        "10k idle p99 %s ms, RSS %s MB; parse %s s, reload stall %s ms, RSS %s/%s MB; "
        "cold start %s ×" % (
            number, runs, get("bare.cpu_us"), get("f50.cpu_us"), get("f50.rps", 0),
            get("f50.p99", 2), get("f1k.rps", 0), get("f10k.p99", 2), get("f10k.rss_mb", 0),
            get("parse.s", 2), get("reload.stall_ms", 1), get("mem.steady_mb", 0),
            get("mem.peak_mb", 0), get("cold.ratio", 2)))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=None,
                        help="runs to take medians over (default: 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="one short run: a smoke test, not figures to quote")
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
    command = "python3 bench/bench.py" + "".join(" " + arg for arg in sys.argv[1:])
    facts = machine_facts(server_cpu, load_cpus)
    log("bench: %s runs; %s" % (runs_wanted, "; ".join(facts)))
    runs = []
    with tempfile.TemporaryDirectory(prefix="finger-bench-") as tmp:
        os.chmod(tmp, 0o755)      # finger.py started as root serves as nobody: let it read
        files = make_files(tmp, s)
        web_skip = web_probe(files, tmp)
        sections = [(section_bare, ["bare"]),
                    (section_finger, ["f50", "f1k", "f10k", "cold"]),
                    (section_reload, ["parse", "reload", "mem"])]
        if web_skip is None:
            sections.append((section_web, ["web_name", "web_index", "xmlrpc"]))
        for number in range(1, runs_wanted + 1):
            m = {}
            order = sections if number % 2 else [sections[1], sections[0]] + sections[2:]
            for section, prefixes in order:   # bare and finger swap places every other run
                try:
                    section(m, s, plan, files, tmp)
                except Exception as error:
                    log("run %d: %s failed: %s" % (number, section.__name__, describe(error)))
                    for prefix in prefixes:
                        m.setdefault("error." + prefix, describe(error))
            derive(m)
            runs.append(m)
            progress(number, runs_wanted, m)
    print()
    print("## `make bench`")
    print()
    print("```")
    print("$ " + command)
    for fact in facts:
        print(fact)
    print("%d run%s, %.0f s in all; medians, with the min–max over the runs"
          % (runs_wanted, "" if runs_wanted == 1 else "s", time.monotonic() - started))
    print("```")
    print()
    print(table(runs, web_skip))
    print()
    print("\n".join(notes(runs, s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
