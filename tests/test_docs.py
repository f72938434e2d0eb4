"""The documentation site builds, warnings as errors, and its API reference
covers every public name, each with a docstring.

The public names: everything in ``blkio.__all__`` and ``blkio.aio.__all__``,
and every public method and property of the classes users hold (``Device``,
``Queue``, ``AsyncDevice``, ``BouncePool``, ``Buffer``, ``ZoneWriter``, and
the records they hand out).  "In the reference" means in the inventory
(``objects.inv``) of the site Sphinx built from the installed package: what a
reader can find, not what a page's source mentions.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

import blkio
import blkio.aio
from conftest import require

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SPHINX_ARGS = ["-W", "--keep-going", "-q", "-b", "html"]     # as `make docs`

CLASSES = [blkio.Device, blkio.Queue, blkio.aio.AsyncDevice, blkio.BouncePool, blkio.Buffer,
           blkio.ZoneWriter, blkio.Completion, blkio.Limits, blkio.ZoneInfo, blkio.PropertySpec]
# Values cannot carry a docstring: the reference documents them in its own words.
VALUES = (str, int, tuple, frozenset, type(blkio.ZONE_DTYPE))


def public_names() -> Iterator[Tuple[str, Any]]:
    """(documented name, object) for every public name."""
    for module in (blkio, blkio.aio):
        for name in module.__all__:
            yield f"{module.__name__}.{name}", getattr(module, name)
    for cls in CLASSES:
        public = "blkio.aio" if cls is blkio.aio.AsyncDevice else "blkio"
        for name in dir(cls):
            if name.startswith("_"):
                continue
            for klass in cls.__mro__:
                if klass is object or name in getattr(klass, "_fields", ()):
                    break
                if name in vars(klass):
                    yield f"{public}.{cls.__name__}.{name}", vars(klass)[name]
                    break


def docstring(obj: Any) -> str:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        return obj.__doc__ or (obj.fget.__doc__ if obj.fget else "") or ""
    if isinstance(obj, VALUES) or hasattr(obj, "_value_"):
        return "(a value)"
    return (obj.__doc__ or "") if not isinstance(obj, type) else (inspect.getdoc(obj) or "")


@pytest.fixture(scope="session")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once per session by the venv's Sphinx."""
    require(importlib.util.find_spec("sphinx"), "Sphinx is not installed (make test installs "
                                                "requirements/docs.txt into the venv)")
    out = tmp_path_factory.mktemp("docs-html")
    proc = subprocess.run([sys.executable, "-m", "sphinx", *SPHINX_ARGS, str(DOCS), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, (f"sphinx-build failed ({proc.returncode}):\n"
                                  f"{proc.stderr[-6000:]}\n{proc.stdout[-2000:]}")
    return out


def inventory(site: Path) -> Dict[str, str]:
    """name -> role (py:class, py:method ...) from the built objects.inv."""
    from sphinx.util.inventory import InventoryFile
    with open(site / "objects.inv", "rb") as f:
        inv = InventoryFile.load(f, "", lambda base, uri: uri)
    out: Dict[str, str] = {}
    data = inv.data if hasattr(inv, "data") else inv          # Sphinx >= 8.2: _Inventory
    for role, entries in data.items():
        if role.startswith("py:"):
            for name in entries:
                out[name] = role
    return out


def test_every_public_name_has_a_docstring() -> None:
    missing = [name for name, obj in public_names() if not docstring(obj).strip()]
    assert not missing, "public names without a docstring:\n  " + "\n  ".join(missing)


def test_every_public_name_is_in_the_reference(built_site: Path) -> None:
    documented = inventory(built_site)
    missing = [name for name, _ in public_names() if name not in documented]
    assert not missing, ("public names missing from the API reference (docs/reference/):\n  "
                         + "\n  ".join(missing))


def test_reference_signatures_carry_the_stubs_types(built_site: Path) -> None:
    """The compiled core's methods show their .pyi types, not bare names."""
    page = (built_site / "reference" / "blkio.html").read_text()
    for fragment in ("SupportsIndex", "Buffer", "NDArray"):
        assert fragment in page, fragment


def test_guides_and_pages_are_in_the_site(built_site: Path) -> None:
    pages: List[str] = ["getting-started", "guide/drivers", "guide/memory", "guide/threads",
                        "guide/asyncio", "guide/batch", "guide/large-io", "guide/zoned",
                        "guide/cli", "guide/errors", "guide/troubleshooting", "changelog",
                        "performance", "bench-history", "development", "architecture",
                        "reference/blkio", "reference/aio", "reference/errors"]
    for page in pages:
        assert (built_site / f"{page}.html").exists(), page
    # the plot that scripts/bench_page.py drew from docs/_data/bench.json
    assert re.search(r'<img [^>]*src="_images/bench\d*\.png"',
                     (built_site / "performance.html").read_text())
