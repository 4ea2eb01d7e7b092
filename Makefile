# Two set-up commands: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
OPA_BINDINGS = opa-golib-python-bindings==0.4.4

.PHONY: venv venv-demo venv-test run test test-python test-rego typecheck bench bench-smoke clean system-deps fuzz mcp-clients

# Three stamps: the runtime, the runtime plus the demo extra (`make run`: the MCP SDK for the demo's
# MCP server and client), and the runtime plus the test extras (`make test`; they include the demo
# extra). Each is redone when pyproject.toml changes; the other two build on the runtime one.
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	@# Debian ships venv's ensurepip separately (python3.11-venv).
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || bash scripts/install-python-venv.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# The embedded OPA engine: metadata says Python 3.14, the ctypes wrapper runs on 3.11.
	# Wheels exist for Linux x86_64 only; elsewhere the sidecar runs with the OPA REST engine.
	-$(PIP) install -q --ignore-requires-python --no-deps $(OPA_BINDINGS)
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[demo]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

venv-demo: $(VENV)/.installed-demo

venv-test: $(VENV)/.installed-test

run: venv-demo
	GOGC=$${GOGC:-400} $(PY) -m sidecar.demo

system-deps:
	bash scripts/install-system-deps.sh

# The mcp 1.x SDK (.venv-mcp1) and the TypeScript SDK (tests/mcp_clients/ts) for tests/test_mcp_clients.py;
# a no-op when installed. An install that fails skips that client's tests (with the reason), not the suite.
mcp-clients:
	-PYTHON=$(PYTHON) bash scripts/install-mcp-clients.sh

test: venv-test system-deps mcp-clients
	$(VENV)/bin/agent-sidecar policy test rego/
	$(PY) -m mypy
	$(PY) -m pytest -q

# The property-based differential tests of request parsing (tests/adversarial), far longer than in `make test`:
# random examples (FUZZ_EXAMPLES, default 5000), printing what each outcome was.
fuzz: venv-test
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/adversarial/test_differential.py --hypothesis-show-statistics

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .state .pytest_cache .mypy_cache
