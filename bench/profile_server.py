#!/usr/bin/env python3
"""Where finger.py's server spends its time under the bench's load: cProfile of the
TCPService loop while bench/load.py sends queries at it.

    python3 bench/profile_server.py                 # 50 concurrent clients, 1,000 users
    python3 bench/profile_server.py --idle 1000     # with 1,000 idle connections open
    python3 bench/profile_server.py --bare          # the bare selectors loop, for comparison

The service loop runs in this process's main thread (cProfile sees one thread), on one CPU;
the load generator runs on the others.  cProfile slows Python code down more than system
calls, so read the table for proportions, not for the bench's µs per query.
Standard library only; Python 3.9 or newer.
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench            # noqa: E402  (the bench's users files, CPU plan and load runner)
import finger           # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured load")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--bare", action="store_true", help="profile bench/bare_server.py")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    server_cpu, load_cpus = bench.cpu_plan()
    if server_cpu is not None:
        os.sched_setaffinity(0, {server_cpu})
    bench.raise_nofile(20000 + 1024)
    with tempfile.TemporaryDirectory(prefix="finger-profile-") as tmp:
        users = os.path.join(tmp, "users")
        bench.write_users(users, args.users, 1)
        if args.bare:
            import bare_server
            service = None
            port = bench.free_port()
            target = lambda: bare_server.serve(bare_server.load_users(users), port)  # noqa
        else:
            options = finger.default_options(finger="127.0.0.1:0", web="off", setter="off",
                                             users=users, reload=0.5, timeout=120,
                                             max_connections=20000)
            group = finger.build_services(options)
            service = group.by_name("finger")
            service.bind()
            port = service.address[1]
            target = service.serve
        load = subprocess.Popen(
            [bench.PYTHON, bench.LOAD, "--port", str(port), "--server-pid", str(os.getpid()),
             "--names", "%s:%d" % (bench.NAMES, args.users), "--concurrency",
             str(args.concurrency), "--warmup", "0.5", "--duration", str(args.seconds),
             "--idle", str(args.idle)] +
            (["--cpus", ",".join(map(str, load_cpus))] if load_cpus else []),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stopper = threading.Thread(target=stop_after_load, args=(load, service), daemon=True)
        stopper.start()
        profile = cProfile.Profile()
        try:
            profile.runcall(target)
        except SystemExit:           # the bare server stops on SIGTERM
            pass
        finally:
            bench.stop_process(load)
        stopper.join()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(args.top)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    print("load:", getattr(stopper, "summary", "?"))
    return 0


def stop_after_load(load, service):
    """When the load generator is done, stop the profiled loop (SIGTERM for the bare one)."""
    out, err = load.communicate(timeout=600)
    try:
        result = json.loads(out)
        threading.current_thread().summary = "%.0f queries/s, %s errors, server %.0f %% CPU" % (
            result["rps"], sum(result["errors"].values()), result["server_cpu_util"] * 100)
    except ValueError:
        threading.current_thread().summary = err.decode(errors="replace")[-300:]
    if service is not None:
        service.close()
    else:
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
