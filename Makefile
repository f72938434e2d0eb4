# Two commands do everything on a fresh Debian 12/13 machine (as root):
#   make bench   install what is missing, then run the benchmark suite
#   make test    install what is missing, build dist/, then run the tests
# Also: make dist (sdist + manylinux wheels), make test-wheels (only the
# tests of what dist/ holds, tests/test_wheels.py), make docs (the Sphinx
# site into build/docs/html).
# A second run finds everything in place and only runs the command.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
TOOLS  := build/dist/tools
SOURCES := meson.build pyproject.toml $(wildcard src/blkio/*.py src/blkio/*.in src/blkio/*.pyx src/blkio/*.pxd src/blkio/*.h src/blkio/*.pyi src/blkio/meson.build src/blkio/py.typed)

.PHONY: test test-quick test-asan test-wheels dist docs bench bench-full bench-instr system install clean

# With PYTEST_ARGS (a selection, while developing) dist/ is not rebuilt and
# the sanitizer run is left out; the plain command runs everything, the docs
# build (tests/test_docs.py) and every example of README and docs/
# (tests/test_examples.py) included.
test: install $(VENV)/.docs-deps $(if $(PYTEST_ARGS),,dist)
	$(VENV)/bin/pytest $(PYTEST_ARGS)
	$(if $(PYTEST_ARGS),,$(MAKE) test-asan)

# The edit-test loop (a few minutes): the API modules against the dev venv,
# stopping at the first failure; no dist/, docs, guest VM, wheels, budget,
# CLIs' harness or sanitizers.  The modules are the ones the wheel runs.
QUICK_TESTS := test_device test_io test_queue test_batch test_aio test_aio_batch \
	test_large_io test_pool test_surface test_vhost_user test_zoned
test-quick: install
	$(VENV)/bin/pytest -x -q -p no:cacheprovider -m 'not soak' \
	  $(addprefix tests/,$(addsuffix .py,$(QUICK_TESTS))) $(PYTEST_ARGS)

# The extension built with AddressSanitizer and UBSan (its own venv and build
# folder), running the host suite, the lifetime torture suite included, with
# the sanitizer runtimes preloaded into the (uninstrumented) interpreter.  Any
# report fails the run: UBSan halts on error, ASan always does.  Leak checks are
# off (CPython's own allocations would drown them); PYTHONMALLOC=malloc makes
# Python objects visible to ASan.  The guest suite and mypy run only above,
# and so do the CLIs' and bench harness's tests: Python over the same API,
# whose core paths the API modules drive here.
ASAN_VENV := .venv-asan
ASAN_LOG  := $(CURDIR)/build/asan-reports
ASAN_ENV  := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$(ASAN_LOG)/asan PYTHONMALLOC=malloc \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(ASAN_LOG)/ubsan
# Reports go to files (pytest would swallow a dying process's stderr, and a
# child interpreter's report would be lost): any file there fails the run.
test-asan: system $(ASAN_VENV)/.installed
	rm -rf $(ASAN_LOG) && mkdir -p $(ASAN_LOG)
	$(ASAN_ENV) $(ASAN_VENV)/bin/pytest -p no:cacheprovider --ignore=tests/test_guest.py \
	  --ignore=tests/test_typing.py --ignore=tests/test_wheels.py \
	  --ignore=tests/test_packaging.py --ignore=tests/test_docs.py \
	  --ignore=tests/test_examples.py --ignore=tests/test_instr_budget.py \
	  --ignore=tests/test_cli.py --ignore=tests/test_copy.py \
	  --ignore=tests/test_bench_cli.py --ignore=tests/test_bench_suite.py \
	  -m 'not soak' $(ASAN_PYTEST_ARGS); rc=$$?; \
	if [ -n "$$(ls -A $(ASAN_LOG))" ]; then \
	  cat $(ASAN_LOG)/*; echo "test-asan: sanitizer reports above"; exit 1; fi; exit $$rc

$(ASAN_VENV)/.installed: requirements/build.txt $(SOURCES)
	$(PYTHON) -m venv $(ASAN_VENV)
	$(ASAN_VENV)/bin/python -m pip install -q -r requirements/build.txt
	$(ASAN_VENV)/bin/python -m pip install -q --no-build-isolation -Cbuild-dir=build/asan \
	  -Csetup-args=-Db_sanitize=address,undefined -Csetup-args=-Db_lundef=false '.[test,cli]'
	touch $@

test-wheels: install dist
	$(VENV)/bin/pytest tests/test_wheels.py $(PYTEST_ARGS)

# sdist + one repaired manylinux wheel per CPython here, with exact tools;
# scripts/dist.py reuses what it built for the same inputs.
dist: system $(TOOLS)/.pinned
	$(TOOLS)/bin/python scripts/dist.py

$(TOOLS)/.pinned: requirements/build.txt requirements/dist.txt
	rm -rf $(TOOLS)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q -r requirements/build.txt -r requirements/dist.txt
	touch $@

# The documentation site, from the package installed in .venv (docs/conf.py
# refuses src/), into build/docs/html; warnings are errors.
docs: install $(VENV)/.docs-deps
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs build/docs/html
	@echo "docs: build/docs/html/index.html"

$(VENV)/.docs-deps: $(VENV)/.build-deps requirements/docs.txt
	$(VPY) -m pip install -q -r requirements/docs.txt
	touch $@

# The instruction table of the six API paths comes first (bench/instr.py
# --main, a few minutes under callgrind; BENCH_INSTR=0 leaves it out), then
# the timed suite, whose report prints it above its own tables.
BENCH_INSTR ?= 1
INSTR_LATEST := bench/results/instr-latest.json
bench: install $(VENV)/.bench-deps
	rm -f $(INSTR_LATEST)
	$(if $(filter 1,$(BENCH_INSTR)),-$(VPY) bench/instr.py --main --latest $(INSTR_LATEST) $(BENCH_INSTR_ARGS))
	$(VPY) bench/run.py $(if $(filter 1,$(BENCH_INSTR)),--instr $(INSTR_LATEST)) $(BENCH_ARGS)

# User-space instructions per request under callgrind, every path beside the
# C program doing the same and the Python floor (bench/instr.py; about 15
# minutes).  BENCH_INSTR_ARGS: --only REGEX, --repeat 2, --profile DIR,
# --docs (docs/instructions.md), --budgeted --write-budget (the budget that
# tests/test_instr_budget.py holds).
bench-instr: install
	$(VPY) bench/instr.py $(BENCH_INSTR_ARGS)

bench-full: install $(VENV)/.bench-deps
	$(VPY) bench/run.py --full $(BENCH_ARGS)

# System packages (apt): exits at once when everything is there.
system:
	@bash scripts/install-system-deps.sh

install: system $(VENV)/.installed

$(VENV)/.build-deps: requirements/build.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements/build.txt
	touch $@

# The package itself, built by meson-python, with its test dependencies and
# the CLI's optional one (tqdm: copy's progress bar, tested on a pty).
$(VENV)/.installed: $(VENV)/.build-deps $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation -Cbuild-dir=build/dev '.[test,cli]'
	touch $@

# Benchmark-only peers (pyproject's bench extra). PyPI liburing 2026.x wheels
# use AVX-512 instructions and die with SIGILL on CPUs without them, so the
# suite pins 2024.5.3, which PyPI has only as source (a few minutes to build
# once; pip caches the wheel). A failed build only costs liburing's rows.
$(VENV)/.bench-deps: $(VENV)/.build-deps pyproject.toml
	$(VPY) -m pip install -q 'matplotlib' 'aiofile' 'caio' 'uvloop'
	$(VPY) -m pip install -q 'liburing==2024.5.3' || \
	  echo "liburing 2024.5.3 did not build: the liburing rows will say not available"
	touch $@

clean:
	rm -rf $(VENV) $(ASAN_VENV) build dist .mesonpy-* bench/.build
