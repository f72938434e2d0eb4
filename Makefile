# Two commands do everything on a fresh Debian 12/13 machine (as root):
#   make bench   install what is missing, then run the benchmark suite
#   make test    install what is missing, then run the tests
# A second run finds everything in place and only runs the command.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
SOURCES := meson.build pyproject.toml $(wildcard src/blkio/*.py src/blkio/*.pyx src/blkio/*.pxd src/blkio/*.pyi src/blkio/meson.build src/blkio/py.typed)

.PHONY: test test-asan bench bench-full system install clean

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)
	$(MAKE) test-asan

# The extension built with AddressSanitizer and UBSan (its own venv and build
# folder), running the host suite, the lifetime torture suite included, with
# the sanitizer runtimes preloaded into the (uninstrumented) interpreter.  Any
# report fails the run: UBSan halts on error, ASan always does.  Leak checks are
# off (CPython's own allocations would drown them); PYTHONMALLOC=malloc makes
# Python objects visible to ASan.  The guest suite and mypy run only above.
ASAN_VENV := .venv-asan
ASAN_ENV  := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 PYTHONMALLOC=malloc \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
test-asan: system $(ASAN_VENV)/.installed
	$(ASAN_ENV) $(ASAN_VENV)/bin/pytest -p no:cacheprovider --ignore=tests/test_guest.py \
	  --ignore=tests/test_typing.py $(ASAN_PYTEST_ARGS)

$(ASAN_VENV)/.installed: $(VENV)/.build-deps $(SOURCES)
	$(PYTHON) -m venv $(ASAN_VENV)
	$(ASAN_VENV)/bin/python -m pip install -q 'meson-python>=0.15' 'meson>=1.1' 'Cython>=3.0' ninja
	$(ASAN_VENV)/bin/python -m pip install -q --no-build-isolation -Cbuild-dir=build/asan \
	  -Csetup-args=-Db_sanitize=address,undefined -Csetup-args=-Db_lundef=false '.[test,cli]'
	touch $@

bench: install $(VENV)/.bench-deps
	$(VPY) bench/run.py $(BENCH_ARGS)

bench-full: install $(VENV)/.bench-deps
	$(VPY) bench/run.py --full $(BENCH_ARGS)

# System packages (apt): exits at once when everything is there.
system:
	@bash scripts/install-system-deps.sh

install: system $(VENV)/.installed

$(VENV)/.build-deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q 'meson-python>=0.15' 'meson>=1.1' 'Cython>=3.0' ninja
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
	rm -rf $(VENV) $(ASAN_VENV) build .mesonpy-* bench/.build
