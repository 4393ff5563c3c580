# bios — two entry points for a fresh machine: `make demo` and `make test`.
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/bios/v1/*.proto)
PROTO_OUT := clients/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install proto demo lint test test-fast bench serve-render serve-train clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip install -q --disable-pip-version-check --no-deps tinker-cookbook==0.6.1
	touch $(STAMP)

install: $(STAMP) proto

# Stubs are generated, never committed: a fresh clone builds them here.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $(PROTO_SRC)

demo: install
	$(PY) -m bios_server.demo

# ruff (lint + format check), mypy on the packages, import-linter's boundary contracts (pyproject.toml)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p bios -p bios_server -p bios_cookbook -p render_service -p train_service -p tinker_gateway
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q --durations=20 tests

# The inner loop: lint, then the tests not marked slow or network (pytest.ini markers; under 2 minutes)
test-fast: lint
	$(PY) -m pytest -q -m "not slow and not network" tests

bench: install
	$(PY) -m benchmarks

serve-render: install
	$(PY) -m render_service

serve-train: install
	$(PY) -m train_service

clean:
	rm -rf $(VENV) $(PROTO_OUT)/bios/v1/*_pb2*.py $(PROTO_OUT)/bios/v1/*_pb2.pyi
