#!/usr/bin/env python3
"""Load generator for `make bench`: asynchronous (epoll), loopback only, bounded.

    python3 bench/load.py --port 7979 --names u%07d:1000 --concurrency 50 --duration 3

Modes:
    finger   each client connects, sends one query line, reads the reply to EOF, and starts
             over (RFC 1288: one query per connection)
    http     each client keeps one HTTP/1.1 connection and sends GET requests on it
             (--paths '/{name},/'); for the web rows once the web site exists
    xmlrpc   one client calls getUser(name) over one keep-alive connection

Before the load it can open --idle connections that send nothing and stay open until the
end; with --server-pid it waits until the server has accepted them (its count of open file
descriptors) and reads the server's CPU time (/proc/PID/stat) at the start and the end of
the measured window.  --procs N splits the clients over N forked processes.

Everything is bounded: --duration seconds (hard cap 120), --max-queries per process,
--timeout per query, --max-errors.  Prints one JSON object on stdout.
Standard library only; Python 3.9 or newer.
"""

import argparse
import errno
import json
import math
import os
import random
import resource
import select
import signal
import socket
import sys
import time

HOST = "127.0.0.1"         # loopback only, by design
MAX_DURATION = 120.0
RECV_SIZE = 65536
IDLE_BATCH = 256
BAD_REPLIES = (b"No such user", b"Server busy", b"Internal error", b"Query too long",
               b"Finger ")

now = time.monotonic       # CLOCK_MONOTONIC: the same clock in every process of the bench


# == /proc readers, shared with bench.py =====================================================

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid):
    """utime + stime of every thread of process `pid`, in seconds."""
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_status_kb(pid, key):
    """A 'kB' line of /proc/PID/status, such as VmRSS or VmHWM, in kB."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def machine_cpu_jiffies():
    """(busy, total) clock ticks of all CPUs together, from /proc/stat; time stolen by
    the hypervisor counts as busy."""
    with open("/proc/stat") as stat:
        values = [int(value) for value in stat.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def proc_fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def raise_nofile(wanted):
    """Raise RLIMIT_NOFILE's soft limit towards `wanted`; returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# == names and requests ======================================================================

def name_picker(spec):
    """'u%07d:1000' -> a function rng -> one of u0000000 .. u0000999."""
    pattern, _, count = spec.rpartition(":")
    count = int(count)
    return lambda rng: pattern % rng.randrange(count)


# == idle connections ========================================================================

def open_idle(address, count, server_pid=None, timeout=30.0):
    """Open `count` connections that send nothing; with `server_pid`, return once the server
    holds them all.  Returns the list of sockets (the caller closes them)."""
    socks = []
    deadline = now() + timeout
    base = proc_fd_count(server_pid) if server_pid else 0
    try:
        while len(socks) < count:
            batch = []
            for _ in range(min(IDLE_BATCH, count - len(socks))):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                batch.append(sock)
                socks.append(sock)
                error = sock.connect_ex(address)
                if error not in (0, errno.EINPROGRESS):
                    raise OSError(error, "idle connection: %s" % os.strerror(error))
            poller = select.poll()
            for sock in batch:
                poller.register(sock, select.POLLOUT)
            pending = len(batch)
            while pending:
                if now() > deadline:
                    raise TimeoutError("idle connections: %d of %d connected in %.0f s"
                                       % (len(socks) - pending, count, timeout))
                for fd, _ in poller.poll(100):
                    poller.unregister(fd)
                    pending -= 1
            for sock in batch:
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, "idle connection: %s" % os.strerror(error))
            while server_pid and proc_fd_count(server_pid) < base + len(socks):
                if now() > deadline:
                    raise TimeoutError("idle connections: the server accepted %d of %d in "
                                       "%.0f s" % (proc_fd_count(server_pid) - base,
                                                   len(socks), timeout))
                time.sleep(0.005)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


# == protocols: what a client sends and when its answer is complete ==========================

class FingerMode:
    """One query per connection; the reply ends at EOF."""
    keep_alive = False

    def __init__(self, pick):
        self.pick = pick

    def request(self, rng):
        return ("%s\r\n" % self.pick(rng)).encode()

    @staticmethod
    def complete(data, eof):
        """-> None (read on), or (error or None, bytes used)."""
        if not eof:
            return None
        if not data.endswith(b"\r\n"):
            return "truncated reply", len(data)
        if data.startswith(BAD_REPLIES):
            return "reply: " + data[:30].decode("ascii", "replace").strip(), len(data)
        return None, len(data)


class HTTPMode:
    """HTTP/1.1 keep-alive GETs of --paths ('{name}' becomes a user name); the response is
    complete after its Content-Length bytes."""
    keep_alive = True

    def __init__(self, pick, paths):
        self.pick = pick
        self.paths = paths

    def request(self, rng):
        path = rng.choice(self.paths).replace("{name}", self.pick(rng))
        return ("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, HOST)).encode()

    @staticmethod
    def complete(data, eof):
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            return ("closed before the headers", len(data)) if eof else None
        head = data[:head_end].decode("latin-1").split("\r\n")
        status = head[0].split(" ", 2)
        length = None
        for line in head[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value)
        if length is None:
            return "no Content-Length", len(data)
        used = head_end + 4 + length
        if len(data) < used:
            return ("closed in the body", len(data)) if eof else None
        if len(status) < 2 or status[1] != "200":
            return "HTTP " + " ".join(status[1:]), used
        return None, used


# == the load loop ===========================================================================

def load_loop(mode, args, measure_at, deadline, stop_fd, seed):
    """Closed loop of `args.concurrency` clients until `deadline`, until `stop_fd` is
    readable, or until a bound is reached.  Returns this process's result.

    epoll directly rather than `selectors`: the load generator is usually the bottleneck,
    and closing a socket removes it from the epoll set without another system call."""
    address = (args.host, args.port)
    rng = random.Random(seed)
    watch = args.watch.encode() if args.watch else None
    poller = select.epoll()
    poller.register(stop_fd, select.EPOLLIN)
    EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
    complete, keep_alive, request = mode.complete, mode.keep_alive, mode.request
    active = {}                  # fd -> [sock, started, inbuf]
    latencies = []               # µs, requests answered inside the measured window
    errors = {}
    counts = [0, 0]              # answered, failed (warm-up included)
    worst = [0.0, None]          # longest latency in the window, and when it ended
    first_watch = None
    cpu_start = None
    end = deadline

    def fail(kind):
        errors[kind] = errors.get(kind, 0) + 1
        counts[1] += 1

    def launch():
        if counts[0] >= args.max_queries or counts[1] >= args.max_errors:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        started = now()
        error = sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS):
            sock.close()
            fail("connect: " + os.strerror(error))
            return
        fd = sock.fileno()
        try:                     # on loopback the connection is usually up at once
            sock.send(request(rng))
            poller.register(fd, EPOLLIN)
        except (BlockingIOError, InterruptedError):
            poller.register(fd, EPOLLOUT)   # not yet: send when writable
        except OSError as error:
            sock.close()
            fail("connect: " + (error.strerror or str(error)))
            return
        active[fd] = [sock, started, b""]

    def drop(fd, kind=None):
        active.pop(fd)[0].close()         # closing also takes it out of the epoll set
        if kind is not None:
            fail(kind)
            launch()

    for _ in range(args.concurrency):
        launch()
    next_check = now() + 0.1
    stopping = False
    while active and not stopping:
        for fd, events in poller.poll(0.1):
            client = active.get(fd)
            if client is None:
                if fd == stop_fd:
                    stopping = True
                continue
            sock = client[0]
            if not events & EPOLLIN:     # writable: connected (or refused), send
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    drop(fd, "connect: " + os.strerror(error))
                    continue
                try:
                    sock.send(request(rng))
                except OSError as error:
                    drop(fd, "send: " + (error.strerror or str(error)))
                    continue
                poller.modify(fd, EPOLLIN)
                continue
            inbuf = client[2]
            try:                         # read on until EOF or nothing more is there yet
                while True:
                    data = sock.recv(RECV_SIZE)
                    inbuf += data
                    outcome = complete(inbuf, not data)
                    if outcome is not None:
                        break
            except (BlockingIOError, InterruptedError):
                client[2] = inbuf
                continue
            except OSError as error:
                drop(fd, "recv: " + (error.strerror or str(error)))
                continue
            kind, used = outcome
            if kind is not None:
                drop(fd, kind)
                continue
            done = now()
            counts[0] += 1
            if done >= measure_at:
                latency = done - client[1]
                latencies.append(int(latency * 1e6))
                if latency > worst[0]:
                    worst[0], worst[1] = latency, done
            if watch is not None and first_watch is None and watch in inbuf:
                first_watch = done
                end = min(end, done + args.stop_after_watch)
            if keep_alive and data and counts[0] < args.max_queries:
                client[1], client[2] = done, inbuf[used:]
                try:
                    sock.send(request(rng))
                    continue
                except OSError as error:
                    drop(fd, "send: " + (error.strerror or str(error)))
                    continue
            drop(fd)
            launch()
        t = now()
        if cpu_start is None and t >= measure_at:
            cpu_start = os.times()
        if t >= end:
            break
        if t >= next_check:
            next_check = t + 0.1
            for fd, client in list(active.items()):
                if t - client[1] > args.timeout:
                    drop(fd, "timeout")
    finished = now()
    cpu_end = os.times()
    for fd in list(active):
        drop(fd)
    poller.close()
    return {"latencies": latencies, "errors": errors, "end": finished,
            "answered_total": counts[0], "max": worst[0], "max_at": worst[1],
            "first_watch": first_watch,
            "load_cpu": None if cpu_start is None else
            cpu_end.user + cpu_end.system - cpu_start.user - cpu_start.system}


def xmlrpc_loop(args, measure_at, deadline, seed):
    """getUser(name) calls, one at a time, over one keep-alive connection."""
    import xmlrpc.client
    pick = name_picker(args.names)
    rng = random.Random(seed)
    proxy = xmlrpc.client.ServerProxy("http://%s:%d%s" % (args.host, args.port, args.rpc_path))
    latencies, errors, answered = [], {}, 0
    cpu_start = None
    while answered < args.max_queries and sum(errors.values()) < args.max_errors:
        started = now()
        if started >= deadline:
            break
        if cpu_start is None and started >= measure_at:
            cpu_start = os.times()
        try:
            proxy.getUser(pick(rng))
        except (OSError, xmlrpc.client.Error) as error:
            kind = type(error).__name__
            errors[kind] = errors.get(kind, 0) + 1
            continue
        done = now()
        answered += 1
        if done >= measure_at:
            latencies.append(int((done - started) * 1e6))
    cpu_end = os.times()
    return {"latencies": latencies, "errors": errors, "end": now(), "answered_total": answered,
            "max": max(latencies, default=0) / 1e6, "max_at": None, "first_watch": None,
            "load_cpu": None if cpu_start is None else
            cpu_end.user + cpu_end.system - cpu_start.user - cpu_start.system}


# == processes ===============================================================================

def run_worker(args, index, measure_at, deadline, stop_fd):
    if args.cpus:
        cpus = [int(cpu) for cpu in args.cpus.split(",")]
        os.sched_setaffinity(0, {cpus[index % len(cpus)]})
    seed = args.seed * 1000 + index
    if args.mode == "xmlrpc":
        return xmlrpc_loop(args, measure_at, deadline, seed)
    pick = name_picker(args.names)
    mode = FingerMode(pick) if args.mode == "finger" else HTTPMode(pick, args.paths.split(","))
    return load_loop(mode, args, measure_at, deadline, stop_fd, seed)


def run(args):
    """Open the idle connections, run the workers, and merge their results."""
    args.concurrency = max(args.concurrency, args.procs)
    idle = []
    result = {"idle": 0}
    if args.idle:
        started = now()
        idle = open_idle((args.host, args.port), args.idle, args.server_pid)
        result.update(idle=len(idle), idle_open_s=now() - started)
    stop_r, stop_w = os.pipe()
    children = []               # (pid, result pipe)
    try:
        start = now() + 0.05
        measure_at = start + args.warmup
        deadline = measure_at + min(args.duration, MAX_DURATION)
        per_proc = [args.concurrency // args.procs + (i < args.concurrency % args.procs)
                    for i in range(args.procs)]
        for index in range(args.procs):
            out_r, out_w = os.pipe()
            pid = os.fork()
            if pid == 0:         # the worker: run, write its result, exit
                code = 0
                try:
                    os.close(out_r)
                    os.close(stop_w)
                    args.concurrency = per_proc[index]
                    args.max_queries = args.max_queries // args.procs
                    time.sleep(max(start - now(), 0))
                    data = json.dumps(run_worker(args, index, measure_at, deadline,
                                                 stop_r)).encode()
                    with os.fdopen(out_w, "wb") as out:
                        out.write(data)
                except BaseException as error:   # report it, never return into the parent
                    code = 1
                    sys.stderr.write("load worker %d: %r\n" % (index, error))
                finally:
                    os._exit(code)
            os.close(out_w)
            children.append((pid, out_r))
        time.sleep(max(measure_at - now(), 0))
        machine_start = machine_cpu_jiffies()
        if args.server_pid:
            result["server_cpu_start"] = proc_cpu_seconds(args.server_pid)
        waiting = select.poll()                # a worker that ends early starts writing
        for _, out in children:
            waiting.register(out, select.POLLIN)
        left = len(children)
        while left and now() < deadline:
            for out, _ in waiting.poll(max(deadline - now(), 0) * 1000):
                waiting.unregister(out)
                left -= 1
        machine_end = machine_cpu_jiffies()
        result["machine_busy_cpus"] = ((machine_end[0] - machine_start[0])
                                       / max(machine_end[1] - machine_start[1], 1)
                                       * os.cpu_count())
        if args.server_pid:
            result["server_cpu_end"] = proc_cpu_seconds(args.server_pid)
            result["server_rss_kb"] = proc_status_kb(args.server_pid, "VmRSS")
            result["server_fds"] = proc_fd_count(args.server_pid)
        os.close(stop_w)
        stop_w = None
        parts = []
        for pid, out in children:
            with os.fdopen(out, "rb") as reader:
                data = reader.read()
            if data:
                parts.append(json.loads(data))
        for pid, _ in children:
            os.waitpid(pid, 0)
        children = []
    finally:
        for pid, _ in children:          # only after an error: stop our own workers
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except OSError:
                pass
        if stop_w is not None:
            os.close(stop_w)
        os.close(stop_r)
        for sock in idle:
            sock.close()
    return merge(result, parts, measure_at, args)


def percentile(values, fraction):
    """Nearest-rank percentile of a sorted list."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(fraction * len(values)) - 1))]


def merge(result, parts, measure_at, args):
    if len(parts) < args.procs:
        result.setdefault("errors", {})["load worker died"] = args.procs - len(parts)
    latencies = sorted(value for part in parts for value in part["latencies"])
    errors = result.setdefault("errors", {})
    for part in parts:
        for kind, count in part["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    end = max((part["end"] for part in parts), default=measure_at)
    window = max(end - measure_at, 1e-9)
    result.update(
        procs=args.procs, concurrency=args.concurrency, window_s=window,
        answered=len(latencies), rps=len(latencies) / window,
        answered_total=sum(part["answered_total"] for part in parts),
        p50_ms=percentile(latencies, 0.50) / 1e3 if latencies else None,
        p99_ms=percentile(latencies, 0.99) / 1e3 if latencies else None,
        max_ms=max((part["max"] for part in parts), default=0) * 1e3,
        max_at=max((part["max_at"] for part in parts if part["max_at"]), default=None),
        first_watch=min((part["first_watch"] for part in parts if part["first_watch"]),
                        default=None),
        load_cpu_util=sum(part["load_cpu"] or 0 for part in parts) / window / args.procs)
    if "server_cpu_end" in result and latencies:
        server_cpu = result["server_cpu_end"] - result["server_cpu_start"]
        result["server_cpu_util"] = server_cpu / window
        result["server_us_per_query"] = server_cpu / len(latencies) * 1e6
        result["other_busy_cpus"] = max(0.0, result["machine_busy_cpus"]
                                        - result["server_cpu_util"]
                                        - result["load_cpu_util"] * args.procs)
    return result


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default=HOST, choices=[HOST], help="loopback only")
    parser.add_argument("--mode", default="finger", choices=["finger", "http", "xmlrpc"])
    parser.add_argument("--names", default="u%07d:1000", metavar="FORMAT:COUNT",
                        help="user names asked for (default: %(default)s)")
    parser.add_argument("--paths", default="/{name}", help="http: comma-separated paths")
    parser.add_argument("--rpc-path", default="/RPC2", help="xmlrpc: the endpoint")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--procs", type=int, default=1, help="worker processes")
    parser.add_argument("--cpus", default="", help="comma-separated CPUs for the workers")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--max-queries", type=int, default=1000000)
    parser.add_argument("--max-errors", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    parser.add_argument("--idle", type=int, default=0, help="idle connections to hold open")
    parser.add_argument("--server-pid", type=int, help="read its CPU time, RSS, open fds")
    parser.add_argument("--watch", help="note when a reply first contains this text")
    parser.add_argument("--stop-after-watch", type=float, default=0.5, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=1)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    raise_nofile(args.idle + args.concurrency + 256)
    json.dump(run(args), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
