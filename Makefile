# Two commands do everything on a fresh machine with Python 3.11+:
#   make up     install into .venv and run the platform (embedded broker + 4 services)
#   make test   install into .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: up test test-slow test-pulsar test-all bench install services clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

# MariaDB and Redis for the tests, installed from Debian's packages and started on loopback.
# Needs root; elsewhere start them yourself (the MariaDB tests skip when the server is absent).
services:
	@if [ "$$(id -u)" = 0 ]; then bash tools/test-services.sh; \
	 else echo "not root: start MariaDB (user alpes/alpes) and Redis yourself, see tools/test-services.sh"; fi

up: install
	$(BIN)/alpes up

test: install services
	$(BIN)/lint-imports
	$(BIN)/pytest -m "not slow and not pulsar" -q

test-slow: install services
	$(BIN)/pytest -m slow -q $(PYTEST_ARGS)

# The platform on a real Apache Pulsar standalone (needs Java 17 and Maven; the first run resolves
# ~270 MB of jars into ~/.m2): tests/test_real_pulsar.py.
test-pulsar: install services
	$(BIN)/pytest -m pulsar -q $(PYTEST_ARGS)

test-all: test test-pulsar test-slow

bench: install
	$(BIN)/alpes bench

clean:
	rm -rf $(VENV) .alpes
