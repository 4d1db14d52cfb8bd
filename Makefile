# Set-up and checks. `make bench` runs the main job, `make test` everything CI runs.
PYTHON ?= python3
VENV ?= .venv
# A pinned torch keeps set-up fast where a local wheel exists; a GPU host may pass TORCH=torch.
TORCH ?= torch==2.13.0
BENCH_OUT ?= bench-out
# The quick look `make bench` takes (under a minute on 2 cores); `make bench BENCH_ARGS=` runs the full set.
BENCH_ARGS ?= --count small=200 mid=32 mapping=32 --durability none file
BIN := $(VENV)/bin
# The C extensions' sources (setup.py): a change to any of them rebuilds them.
C_SOURCES := $(wildcard src/tensorsink/engine/_native/*.[ch] src/tensorsink/_crc.c src/tensorsink/bench/_bare.c)

.PHONY: install lint typecheck test docs bench clean

# One virtualenv; each target installs what its purpose needs, once: `make bench` the package and the
# bench extra (matplotlib, tqdm), `make test` everything CI checks (every extra and the tools).
$(VENV)/.made:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	touch $@

$(VENV)/.bench: $(VENV)/.made pyproject.toml setup.py $(C_SOURCES)
	$(BIN)/python -m pip install -q -e ".[bench]"
	@$(BIN)/python -c "import tensorsink.engine._native" 2>/dev/null || echo "NOTE: the C extensions were not built (no C compiler?): tensorsink runs its pure-Python engine, slower"
	touch $@

$(VENV)/.ci: $(VENV)/.made pyproject.toml setup.py $(C_SOURCES) | $(VENV)/.fuse
	$(BIN)/python -m pip install -q -e ".[ci]"
	@$(BIN)/python -c "import tensorsink.engine._native" 2>/dev/null || echo "NOTE: the C extensions were not built (no C compiler?): tensorsink runs its pure-Python engine, slower"
	touch $@ $(VENV)/.bench $(VENV)/.docs

$(VENV)/.docs: $(VENV)/.made pyproject.toml setup.py $(C_SOURCES)
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

# The FUSE fault harness (tests/faultfs.py) needs libfuse.so.2 and fusermount. As root on Debian or Ubuntu
# they come from the distribution: libfuse2 (libfuse2t64 on newer releases), and fuse, or fuse3 where fuse
# is not offered. Elsewhere nothing is installed and its tests skip, or fail under CI=true. Runs once:
# remove $(VENV)/.fuse to try again.
$(VENV)/.fuse: | $(VENV)/.made
	@export PATH="$$PATH:/sbin:/usr/sbin" DEBIAN_FRONTEND=noninteractive; missing=; \
	ldconfig -p 2>/dev/null | grep -q 'libfuse\.so\.2 ' || missing="$$missing libfuse.so.2"; \
	command -v fusermount >/dev/null || command -v fusermount3 >/dev/null || missing="$$missing fusermount"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "FUSE harness: missing$$missing, not root with apt-get: its tests will skip (fail under CI=true)"; \
	else \
	  apt-get update -qq >/dev/null 2>&1; \
	  offered() { apt-cache policy "$$1" 2>/dev/null | grep -q 'Candidate: [^(]'; }; \
	  packages=; \
	  case "$$missing" in *libfuse*) if offered libfuse2t64; then packages=libfuse2t64; \
	    else packages=libfuse2; fi;; esac; \
	  case "$$missing" in *fusermount*) if offered fuse; then packages="$$packages fuse"; \
	    else packages="$$packages fuse3"; fi;; esac; \
	  echo "FUSE harness: missing$$missing, installing $$packages"; \
	  apt-get install -y -qq --no-install-recommends $$packages >/dev/null 2>&1 \
	    || echo "FUSE harness: could not install $$packages: its tests will skip (fail under CI=true)"; \
	fi; \
	touch $@

install: $(VENV)/.ci

lint: $(VENV)/.ci
	$(BIN)/ruff check src tests benchmarks conftest.py
	$(BIN)/ruff format --check src tests benchmarks conftest.py
	$(BIN)/hadolint docker/Dockerfile.gpu docker/Dockerfile.cpu
	$(BIN)/python -m json.tool docker/cufile.json > /dev/null

typecheck: $(VENV)/.ci
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest --markdown-docs --markdown-docs-syntax=superfences -p no:cacheprovider README.md docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site-check

# The docs site, into site/ (strict: a broken link or reference fails the build).
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
bench: $(VENV)/.bench
	mkdir -p $(BENCH_OUT)
	$(BIN)/tensorsink bench $(BENCH_ARGS) --json $(BENCH_OUT)/bench.json --plot $(BENCH_OUT)/bench.png

clean:
	rm -rf $(VENV) $(BENCH_OUT) site
