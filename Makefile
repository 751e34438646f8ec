# resnet-pipeline: `make demo` and `make test` work on a fresh machine (each runs `setup` first).
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test bench-prep bench-loader clean

setup: $(STAMP)

# DS_BUILD_OPS=0: DeepSpeed compiles its ops on first use instead of at install (no GPU needed here).
$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PYTHON) -m pip install -q -e ".[gpu,test,demo]"
	touch $(STAMP)

demo: setup
	$(PYTHON) -m pipeline.demo

# Two test files at a time (pytest-xdist, whole files per worker: a file's module fixtures are built once).
# Most tests start training processes that spend seconds importing on one core: two at a time use both
# cores of a CI machine. TEST_WORKERS=0 runs them one by one in this process. The 25 slowest tests are
# listed at the end: where CI's minutes go. A worker that crashes (a segfault, or pytest-timeout ending a test
# that hung) ends the run with that test failed, not restarted (pyproject.toml says why).
TEST_WORKERS ?= 2
test: setup
	$(PYTHON) -m pytest -q --durations=25 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

bench-prep: setup
	$(PYTHON) bench/prep.py

bench-loader: setup
	$(PYTHON) bench/loader.py

# the demo's shards and run, and the build caches: never runs/ itself, where the configs' real runs go
clean:
	rm -rf runs/demo data/demo .cache
