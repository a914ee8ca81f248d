# The README's commands. `make up` runs the system on its embedded defaults; `make test` runs
# the lint and the tests. Both create .venv and install into it when needed, at the exact
# versions of constraints.txt (the dev extra includes the server extra: `pip install linkedblob`
# alone gives the client and its CLI commands, 'linkedblob[server]' the services).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRCS := $(shell find protos -name '*.proto')

.PHONY: up test lint protos bench bench-gc clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/linkedblob up $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint

# The tests run on TEST_WORKERS processes (pytest-xdist), each taking whole test files (a file's
# module-scoped servers start once): much of the suite waits on the servers it starts, so two
# workers nearly halve it on two cores. Files are handed out in collection order, where
# tests/conftest.py puts the longest first (--no-loadscope-reorder: not by their test count).
# TEST_WORKERS=0 runs them all in pytest's own process. The 20 slowest tests are listed at the
# end (the suite must stay under 15 minutes in .ci/run).
TEST_WORKERS ?= 2

test: lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 \
	  $(PYTEST_ARGS)

# Regenerates the committed gRPC modules (and their .pyi stubs) from protos/ into linkedblob/.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
	  --python_out=. --grpc_python_out=. \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=quiet:. \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=quiet:. \
	  $(PROTO_SRCS)

bench: $(STAMP)
	$(BIN)/python -m bench

# The collector's figures (mark and sweep of 100k blobs, push with GC looping): ~20 minutes.
bench-gc: $(STAMP)
	$(BIN)/python -m bench.gc

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
