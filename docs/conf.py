"""Sphinx configuration for the blkio documentation.

Built by ``make docs`` (warnings are errors: ``-W --keep-going``) from the
package installed in the development venv, never from ``src/``: the API
reference shows what users import, compiled core included.  Guides are MyST
Markdown; the reference pages are reStructuredText with autodoc.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import blkio  # noqa: E402  (the installed package)

if Path(blkio.__file__).resolve().is_relative_to(HERE.parent / "src"):
    raise RuntimeError("the docs must be built from the installed package, not src/ "
                       "(run make docs, which uses the .venv made by make install)")

project = "blkio"
author = "the blkio authors"
copyright = "the blkio authors; MIT OR Apache-2.0"
release = blkio.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",      # NumPy-style sections; not for attributes (setup below)
    "myst_parser",
    "stubsig",          # types for the compiled core, from its .pyi stubs
    "blkio_pages",      # generated pages: CLI, errors table, performance
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated/*.md"]
templates_path: list = []

# Every cross-reference must resolve.  Names of Python, typing and numpy
# cannot (their inventories are not reachable from this machine: no network
# but the package registries); _ext/stubsig.py shows those as plain short
# names, so every other unresolved reference is an error.
nitpicky = True

autodoc_typehints = "signature"
autodoc_typehints_format = "short"
python_use_unqualified_type_names = True
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = False
autodoc_inherit_docstrings = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True

# Option names (--input-file) and code stay as typed: no en dashes.
smartquotes = False

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"blkio {release}"
html_static_path: list = []
html_show_sourcelink = False


def setup(app):
    """napoleon reads an attribute's first line as "type: description", which
    mangles prose docstrings such as "True once close() has begun: ...".
    Run it on everything but attributes and properties."""
    from sphinx.ext import napoleon
    for listener in list(app.events.listeners.get("autodoc-process-docstring", [])):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)

    def process(app, what, name, obj, options, lines):
        if what not in ("attribute", "property", "data"):
            napoleon._process_docstring(app, what, name, obj, options, lines)

    app.connect("autodoc-process-docstring", process)
