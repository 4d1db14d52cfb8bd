# Set-up and checks. `make bench` runs the main job, `make test` everything CI runs.
PYTHON ?= python3
VENV ?= .venv
# A pinned torch keeps set-up fast where a local wheel exists; a GPU host may pass TORCH=torch.
TORCH ?= torch==2.13.0
BENCH_OUT ?= bench-out
# The quick look `make bench` takes (under a minute on 2 cores); `make bench BENCH_ARGS=` runs the full set.
BENCH_ARGS ?= --count small=200 mid=32 mapping=32 --durability none file
BIN := $(VENV)/bin

.PHONY: install lint typecheck test bench clean

# One virtualenv; each target installs what its purpose needs, once: `make bench` the package and the
# bench extra (matplotlib, tqdm), `make test` everything CI checks (every extra and the tools).
$(VENV)/.made:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	touch $@

$(VENV)/.bench: $(VENV)/.made pyproject.toml setup.py src/tensorsink/engine/_native.c
	$(BIN)/python -m pip install -q -e ".[bench]"
	touch $@

$(VENV)/.ci: $(VENV)/.made pyproject.toml setup.py src/tensorsink/engine/_native.c
	$(BIN)/python -m pip install -q -e ".[ci]"
	touch $@ $(VENV)/.bench

install: $(VENV)/.ci

lint: $(VENV)/.ci
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/hadolint docker/Dockerfile.gpu docker/Dockerfile.cpu
	$(BIN)/python -m json.tool docker/cufile.json > /dev/null

typecheck: $(VENV)/.ci
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest

bench: $(VENV)/.bench
	mkdir -p $(BENCH_OUT)
	$(BIN)/tensorsink bench $(BENCH_ARGS) --json $(BENCH_OUT)/bench.json --plot $(BENCH_OUT)/bench.png

clean:
	rm -rf $(VENV) $(BENCH_OUT)
