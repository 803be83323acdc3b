# Two commands do everything on a fresh machine with Python 3.11+:
#   make up     install into .venv and run the platform (embedded broker + 4 services)
#   make test   install into .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: schemas-check asyncapi-check up test test-browser test-slow test-pulsar test-all bench install services clean

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
	$(MAKE) --no-print-directory schemas-check asyncapi-check
	$(BIN)/pytest -m "not slow and not pulsar and not browser" -q --durations=15

# Every new version of an event is backward and forward compatible with the previous one (Avro
# resolution rules); a break names the event, the versions and the field.
schemas-check: install
	$(BIN)/alpes schemas check

# docs/asyncapi.json is what `alpes asyncapi` generates from the contract and the schemas, and the
# official AsyncAPI parser (with its Avro schema parser, tools/asyncapi-validate) finds no error in it.
asyncapi-check: install
	$(BIN)/alpes asyncapi --check
	npm ci --prefix tools/asyncapi-validate --ignore-scripts --no-audit --no-fund --loglevel=error
	node tools/asyncapi-validate/validate.mjs docs/asyncapi.json

# The console in Debian's Chromium through Playwright (tests/browser; about 1–2 minutes).
test-browser: install services
	$(BIN)/pytest -m browser -q $(PYTEST_ARGS)

test-slow: install services
	$(BIN)/pytest -m slow -q $(PYTEST_ARGS)

# The platform on a real Apache Pulsar standalone (needs Java 17 and Maven; the first run resolves
# ~270 MB of jars into ~/.m2): tests/test_real_pulsar.py.
test-pulsar: install services
	$(BIN)/pytest -m pulsar -q $(PYTEST_ARGS)

test-all: test test-browser test-pulsar test-slow

bench: install
	$(BIN)/alpes bench

clean:
	rm -rf $(VENV) .alpes
