# mcp-privsep: run these as root on a Debian machine.
#   make demo   install, start the broker, and make a real brokered call as an agent user
#   make test   install everything the tests need, then run unit and privileged e2e tests
SHELL := /bin/bash
PREFIX_VENV ?= /opt/mcp-privsep/venv
PYTHON_SYS  ?= /usr/bin/python3
AGENT       ?= moltbot
VENV_PY      = $(PREFIX_VENV)/bin/python
PIP          = $(VENV_PY) -m pip --disable-pip-version-check -q
CTL          = /usr/local/sbin/mcp-brokerctl

.PHONY: deps venv install demo test unit e2e lint coverage bench clean-demo

# System packages: sudo (the boundary), venv support, the user tools, and git (the package
# tests build the previous release from its history). make itself comes first, by hand:
# apt-get install -y make git
deps:
	@command -v sudo >/dev/null && command -v visudo >/dev/null && command -v git >/dev/null \
	  && $(PYTHON_SYS) -c 'import venv, ensurepip' 2>/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sudo python3-venv passwd git >/dev/null; }

# The root-owned virtualenv the daemon, the admin CLI and the gate's code live in.
venv: deps
	umask 022; test -x $(VENV_PY) || $(PYTHON_SYS) -m venv $(PREFIX_VENV)
	umask 022; $(PIP) install -c constraints.txt $(EXTRAS_SPEC)
	rm -rf build *.egg-info  # a stale build/ of another layout would end up in the wheel
	umask 022; $(PIP) install --no-deps --force-reinstall .
	chmod -R a+rX,go-w $(dir $(PREFIX_VENV))

# Install (idempotent). AGENT= names the agent user; it is created if missing.
install: EXTRAS_SPEC = .
install: venv
	@test -z "$(AGENT)" || id -u $(AGENT) >/dev/null 2>&1 || useradd --create-home --shell /bin/bash $(AGENT)
	$(PREFIX_VENV)/bin/mcp-brokerctl install $(if $(AGENT),--agent $(AGENT))

demo: install
	$(CTL) check
	@# restart, so a re-run of the demo serves the code just installed (stop reads the pid file: it also
	@# stops a daemon of an older version, which may not speak this version's protocol)
	@$(CTL) stop 2>/dev/null || true
	/usr/local/sbin/mcp-brokerd --daemon
	@echo; echo "== as root: the operator reviews the allowlisted tools' definitions and pins what it saw"
	$(CTL) pins accept --yes demo.echo demo.whoami demo.add
	@echo; echo "== as $(AGENT): mcp list"
	runuser -u $(AGENT) -- /usr/local/bin/mcp list
	@echo; echo "== as $(AGENT): mcp call demo.echo text=hello   (allowed)"
	runuser -u $(AGENT) -- /usr/local/bin/mcp call demo.echo text=hello
	@echo; echo "== as $(AGENT): mcp call demo.whoami   (runs as its own user, mcp-srv-demo: neither the agent nor the broker)"
	runuser -u $(AGENT) -- /usr/local/bin/mcp call demo.whoami
	@echo; echo "== as $(AGENT): mcp call demo.secret   (not allowlisted: denied, exit 77)"
	@runuser -u $(AGENT) -- /usr/local/bin/mcp call demo.secret; rc=$$?; echo "exit code: $$rc"; test $$rc -eq 77
	@echo; echo "demo: done. The broker keeps running; 'mcp-brokerctl status' shows it."

test: EXTRAS_SPEC = .[test]
test: venv
	$(VENV_PY) -m pytest -q tests

unit: EXTRAS_SPEC = .[test]
unit: venv
	$(VENV_PY) -m pytest -q tests/unit

# Unit-test branch coverage (no root needed). The daemon's decision side is a standing gate:
# decision, approvals, pins, results, policy and the audit trail stay at or above 90 %.
COVERAGE_GATE = broker/daemon/decision.py,broker/daemon/approvals.py,broker/daemon/pins.py,broker/daemon/results.py,broker/daemon/policy.py,broker/daemon/audit/*.py
coverage: EXTRAS_SPEC = .[test]
coverage: venv
	$(VENV_PY) -m coverage erase
	$(VENV_PY) -m coverage run -m pytest -q -p no:cacheprovider tests/unit
	@echo "== the daemon's decision side (gate: 90 %)"
	$(VENV_PY) -m coverage report --include='$(COVERAGE_GATE)' --fail-under=90
	@echo "== every unit-tested module"
	$(VENV_PY) -m coverage report --format=total | sed 's/^/overall unit branch coverage: /; s/$$/ %/'

lint: EXTRAS_SPEC = .[test,lint]
lint: venv
	$(VENV_PY) -m ruff check broker agent mcp_servers tests
	$(VENV_PY) -m mypy

# Measure it (root, after 'make demo'): a table on stdout, JSON in bench/results/latest.json.
# BENCH_ARGS=--quick for a smoke run; bench/soak.py is the long run (not part of this target).
bench: EXTRAS_SPEC = .
bench: venv
	$(VENV_PY) bench/bench.py $(BENCH_ARGS)

# Debian package: $(DEB_OUT)/mcp-privsep_VERSION-REVISION_ARCH.deb, built with dpkg-deb: the code
# as a virtualenv in /usr/lib/mcp-privsep/venv (the project and its pinned dependencies), the
# commands in /usr/bin and /usr/sbin; install it with 'apt install ./dist/mcp-privsep_*.deb'.
# dpkg-dev gives dpkg-shlibdeps (the Depends of the dependencies' shared libraries).
# See packaging/deb/build.sh.
DEB_OUT ?= dist
.PHONY: deb
deb: deps
	@command -v dpkg-shlibdeps >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev >/dev/null; }
	PYTHON_SYS=$(PYTHON_SYS) bash packaging/deb/build.sh $(DEB_OUT)
