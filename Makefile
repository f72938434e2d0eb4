# Two commands do everything on a fresh Debian 12/13 machine (as root):
#   make bench   install what is missing, then run the benchmark suite
#   make test    install what is missing, build dist/, then run the tests
# Also: make dist (sdist + manylinux wheels), make test-wheels (only the
# tests of what dist/ holds, tests/test_wheels.py).
# A second run finds everything in place and only runs the command.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
TOOLS  := build/dist/tools
SOURCES := meson.build pyproject.toml $(wildcard src/blkio/*.py src/blkio/*.in src/blkio/*.pyx src/blkio/*.pxd src/blkio/*.pyi src/blkio/meson.build src/blkio/py.typed)

.PHONY: test test-wheels dist bench bench-full system install clean

test: install dist
	$(VENV)/bin/pytest $(PYTEST_ARGS)

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

bench: install $(VENV)/.bench-deps
	$(VPY) bench/run.py $(BENCH_ARGS)

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

# The package itself, built by meson-python, with its test dependencies.
$(VENV)/.installed: $(VENV)/.build-deps $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation '.[test]'
	touch $@

$(VENV)/.bench-deps: $(VENV)/.build-deps pyproject.toml
	$(VPY) -m pip install -q 'matplotlib' 'liburing' 'aiofile' 'caio'
	touch $@

clean:
	rm -rf $(VENV) build dist .mesonpy-* bench/.build
