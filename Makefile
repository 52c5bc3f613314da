# finger.py: `make serve` to try it, `make test` to test it (python3 only),
# `make interop` to test it against real peers (installs them; Debian, as root).

PYTHON ?= python3
VENV   := build/venv
# Stock Twisted PB clients for the interop tests: the current release and the oldest one
# the README claims.
TWISTED_VENV     := build/twisted-venv
TWISTED_OLD      ?= 22.10.0
TWISTED_OLD_VENV := build/twisted-$(TWISTED_OLD)-venv
# Other interpreters the interop tests run the core tests with (pyenv's, when present).
PYTHONS ?= $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.*/bin/python3)
# As yourself, even as root: build/users must stay writable for the setter.
SERVE_ARGS ?= --users build/users --finger 127.0.0.1:7979 --setter 127.0.0.1:1079 \
              --web 127.0.0.1:8000 --user $(shell id -un)

VERSION := $(shell $(PYTHON) finger.py --version | cut -d' ' -f2)
PREFIX  ?= /usr/local
BINDIR   = $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
DOCDIR   = $(PREFIX)/share/doc/finger-py
MANDIR   = $(PREFIX)/share/man
UNITS    = finger.service finger.socket finger-inetd.socket finger-inetd@.service

.PHONY: serve test interop peers bench soak man install uninstall deb rpm clean

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
# the web site (a screenshot lands in build/artefacts/), ngircd (and gnutls-bin's certtool)
# for the IRC bot, Twisted in two venvs for Perspective Broker,
# vermin (PyPI, in a venv under build/) to check that finger.py needs no Python above 3.9,
# and prometheus-client (the same venv) whose parser reads /metrics.
peers:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    for attempt in 1 2 3; do \
	        apt-get update -qq >/dev/null && \
	        apt-get install -y -qq --no-install-recommends finger fingerd socat \
	            netcat-openbsd curl openssl chromium ngircd inspircd gnutls-bin rpm haproxy \
	            >/dev/null && break; \
	        [ $$attempt = 3 ] && exit 1; echo "peers: apt failed, trying again"; sleep 10; \
	    done; \
	else echo "peers: not root or no apt-get: Debian packages not installed"; fi
	@[ -x $(VENV)/bin/vermin ] && $(VENV)/bin/python -c "import prometheus_client" \
	    2>/dev/null || { $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install --quiet \
	    --disable-pip-version-check vermin prometheus-client; }
	@$(TWISTED_VENV)/bin/python -c "import twisted.spread.pb" 2>/dev/null || { \
	    $(PYTHON) -m venv $(TWISTED_VENV) && $(TWISTED_VENV)/bin/pip install --quiet \
	    --disable-pip-version-check --upgrade twisted; }
	@$(TWISTED_OLD_VENV)/bin/python -c "import twisted.spread.pb" 2>/dev/null || { \
	    $(PYTHON) -m venv $(TWISTED_OLD_VENV) && $(TWISTED_OLD_VENV)/bin/pip install \
	    --quiet --disable-pip-version-check "twisted==$(TWISTED_OLD)"; }

interop: peers
	FINGER_INTEROP=1 VERMIN=$(VENV)/bin/vermin FINGER_PYTHONS="$(PYTHONS)" \
	    PROMETHEUS_PYTHON=$(abspath $(VENV))/bin/python \
	    TWISTED_PYTHON=$(abspath $(TWISTED_VENV))/bin/python \
	    TWISTED_OLD_PYTHON=$(abspath $(TWISTED_OLD_VENV))/bin/python \
	    $(PYTHON) test_finger.py TestInterop TestWebInterop TestPackagingInterop \
	    TestProxyProtocolInterop \
	    TestPBInterop TestIRCInterop TestIRCInteropInspircd TestPythonVersions

bench:
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

# A bounded soak run of every service at once (not part of CI): SOAK_ARGS="--seconds 600".
soak:
	$(PYTHON) bench/soak.py $(SOAK_ARGS)

# finger.py(1), made from the parsers that make --help.
MAN_PAGE = $(PYTHON) -c 'import finger, sys; sys.stdout.write(finger.man_page())'
man:
	@mkdir -p build
	$(MAN_PAGE) > build/finger.py.1

# Installs the script, its man page and the unit files (their paths follow PREFIX);
# DESTDIR for staging.
install:
	install -D -m 0755 finger.py $(DESTDIR)$(BINDIR)/finger.py
	for unit in $(UNITS); do \
	    sed 's|/usr/local/bin/finger.py|$(BINDIR)/finger.py|' contrib/$$unit \
	        | install -D -m 0644 /dev/stdin $(DESTDIR)$(UNITDIR)/$$unit; done
	$(MAN_PAGE) | install -D -m 0644 /dev/stdin $(DESTDIR)$(MANDIR)/man1/finger.py.1
	@# The configuration the unit reads, every option shown with its default: made once,
	@# never replaced (it is the admin's).
	[ -e $(DESTDIR)/etc/finger/finger.ini ] || { $(PYTHON) finger.py --print-config \
	    --users /var/lib/finger/users --finger off --web off \
	    | install -D -m 0644 /dev/stdin $(DESTDIR)/etc/finger/finger.ini; }
	install -D -m 0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -D -m 0644 users.example $(DESTDIR)$(DOCDIR)/users.example
	for snippet in inetd.conf xinetd.finger; do \
	    sed 's|/usr/local/bin/finger.py|$(BINDIR)/finger.py|' contrib/$$snippet \
	        | install -D -m 0644 /dev/stdin $(DESTDIR)$(DOCDIR)/$$snippet; done

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/finger.py $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS)) \
	    $(DESTDIR)$(MANDIR)/man1/finger.py.1
	rm -rf $(DESTDIR)$(DOCDIR)

# A Debian package: the script in /usr/bin, the units in /lib/systemd/system,
# /etc/finger/finger.ini as a conffile; postinst makes the system user "finger" and an empty
# users file it owns, /var/lib/finger/users, so that the setter works at once.
deb:
	rm -rf build/deb && mkdir -p build/deb/DEBIAN
	$(MAKE) --no-print-directory install DESTDIR=build/deb PREFIX=/usr \
	    UNITDIR=/lib/systemd/system
	sed 's/@VERSION@/$(VERSION)/' contrib/debian/control > build/deb/DEBIAN/control
	install -m 0644 contrib/debian/conffiles build/deb/DEBIAN/conffiles
	install -m 0755 contrib/debian/postinst contrib/debian/postrm build/deb/DEBIAN/
	dpkg-deb --root-owner-group --build build/deb build/finger-py_$(VERSION)_all.deb

# The same as an RPM, with rpmbuild (Debian's rpm package has it): build/finger-py-*.rpm.
rpm:
	rm -rf build/rpm && mkdir -p build/rpm/SPECS
	sed -e 's/@VERSION@/$(VERSION)/' -e 's|@SOURCE@|$(CURDIR)|' contrib/rpm/finger-py.spec \
	    > build/rpm/SPECS/finger-py.spec
	rpmbuild --quiet --define "_topdir $(CURDIR)/build/rpm" \
	    --define "__os_install_post %{nil}" -bb build/rpm/SPECS/finger-py.spec
	cp build/rpm/RPMS/noarch/finger-py-$(VERSION)-1.noarch.rpm build/

clean:
	rm -rf build __pycache__ .ci/__pycache__
