# finger.py: `make serve` to try it, `make test` to test it (python3 only),
# `make interop` to test it against real peers (installs them; Debian, as root).

PYTHON ?= python3
VENV   := build/venv
# Other interpreters the interop tests run the core tests with (pyenv's, when present).
PYTHONS ?= $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.*/bin/python3)
SERVE_ARGS ?= --users build/users --finger 127.0.0.1:7979 --setter 127.0.0.1:1079 \
              --web 127.0.0.1:8000

.PHONY: serve test interop peers bench clean

# Serves a copy of users.example (build/users), so statuses set through the setter
# change the copy, not the example.
serve:
	@mkdir -p build && [ -f build/users ] || cp users.example build/users
	@printf '%s\n' "finger.py: serving build/users (a copy of users.example). Try:" \
	    "  $(PYTHON) finger.py moshez@127.0.0.1:7979" "  open http://127.0.0.1:8000/" \
	    "  printf 'moshez\\nHacking\\n' | nc -N 127.0.0.1 1079" "Ctrl-C stops it."
	$(PYTHON) finger.py --serve $(SERVE_ARGS)

test:
	$(PYTHON) test_finger.py

# Test-only peers: Debian's finger client and bsd fingerd, socat to run fingerd like inetd,
# OpenBSD netcat for the tutorial's setter session, curl, openssl and headless Chromium for
# the web site (a screenshot lands in build/artefacts/),
# and vermin (PyPI, in a venv under build/) to check that finger.py needs no Python above 3.9.
peers:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq >/dev/null && \
	    apt-get install -y -qq --no-install-recommends finger fingerd socat \
	        netcat-openbsd curl openssl chromium >/dev/null; \
	else echo "peers: not root or no apt-get: Debian packages not installed"; fi
	@[ -x $(VENV)/bin/vermin ] || { $(PYTHON) -m venv $(VENV) && \
	    $(VENV)/bin/pip install --quiet --disable-pip-version-check vermin; }

interop: peers
	FINGER_INTEROP=1 VERMIN=$(VENV)/bin/vermin FINGER_PYTHONS="$(PYTHONS)" $(PYTHON) test_finger.py TestInterop TestWebInterop \
	    TestPythonVersions

bench:
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf build __pycache__ .ci/__pycache__
