"""bench/RESULTS.md: where `make bench` and `make soak` leave their tables.

Each script owns one section of the file, between `<!-- NAME -->` and `<!-- /NAME -->`, and
a run replaces that section only: the header of the file and the other section stay as they
are.  A section that is not there yet is appended.  The file is written to a temp file and
renamed over the old one, so an interrupted write never leaves half a table.

Standard library only; Python 3.9 or newer.
"""

import datetime
import os
import platform
import re
import shlex
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")
HEADER = ("# Benchmark and soak results\n\n"
          "`make bench` and `make soak` write their tables here; each run replaces its "
          "own section.\n")


def command_line(script, argv):
    """The command that was run, as it can be typed again."""
    return " ".join(["python3", "bench/" + script] + [shlex.quote(arg) for arg in argv])


def cpu_model():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(usable=None):
    """One line: CPU model, how many CPUs (and how many the run may use, when fewer: by
    default, those this process may run on), kernel, Python."""
    count = os.cpu_count() or 0
    if usable is None:
        try:
            usable = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            usable = count
    return "machine: %s, %d CPU%s%s, %s %s, %s %s" % (
        cpu_model(), count, "" if count == 1 else "s",
        " (%d usable)" % usable if usable != count else "",
        platform.system(), platform.release(),
        platform.python_implementation(), platform.python_version())


def code():
    """The finger.py that was measured: its version and the commit, when in git."""
    version = "?"
    try:
        with open(os.path.join(ROOT, "finger.py"), encoding="utf-8") as f:
            found = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
        if found:
            version = found.group(1)
    except OSError:
        pass
    line = "code: finger.py %s" % version
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5)
        changed = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--",
                                  "finger.py", "bench"], capture_output=True, text=True,
                                 timeout=5)
    except (OSError, subprocess.SubprocessError):
        return line
    if commit.returncode == 0 and commit.stdout.strip():
        line += ", commit %s" % commit.stdout.strip()
        # RESULTS.md itself changes with every run: it is not the code measured.
        dirty = [entry for entry in changed.stdout.splitlines()
                 if not entry.endswith("RESULTS.md")]
        if changed.returncode == 0 and dirty:
            line += " with uncommitted changes (%s)" % ", ".join(
                entry[3:] for entry in dirty[:4])
    return line


def run_facts(usable=None):
    """The lines that open a section: when, what code, on what machine."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return ["date: " + now.strftime("%Y-%m-%d %H:%M UTC"), code(), machine(usable)]


def replace_section(name, body, path=RESULTS):
    """Put `body` (Markdown, without the markers) in section `name` of `path`, replacing
    what the section held; append the section if the file has none.  Returns the path."""
    start, end = "<!-- %s -->" % name, "<!-- /%s -->" % name
    block = "%s\n%s\n%s\n" % (start, body.strip("\n"), end)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = HEADER
    first = text.find(start + "\n")
    last = text.find(end, first + 1) if first >= 0 else -1
    if first >= 0 and last >= 0:
        after = last + len(end)
        if text[after:after + 1] == "\n":
            after += 1
        text = text[:first] + block + text[after:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".RESULTS.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            os.chmod(temp, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    return path


def shown(path):
    """`path` relative to the repository when it is inside it, for log lines."""
    relative = os.path.relpath(os.path.abspath(path), ROOT)
    return path if relative.startswith("..") else relative
