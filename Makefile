# Two commands do everything on a fresh Debian 12/13 machine (as root):
#   make bench   install what is missing, then run the benchmark suite
#   make test    install what is missing, then run the tests
# A second run finds everything in place and only runs the command.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
SOURCES := meson.build pyproject.toml $(wildcard src/blkio/*.py src/blkio/*.pyx src/blkio/*.pxd src/blkio/*.pyi src/blkio/meson.build src/blkio/py.typed)

.PHONY: test bench bench-full system install clean

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

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
	rm -rf $(VENV) build .mesonpy-* bench/.build
