"""Pages generated from the installed package and the committed bench JSON.

- ``.. blkio-cli:: info|bench|copy``: a command's usage, description and
  options, rendered from its argparse parser (the same object the command
  parses with), so the page cannot drift from ``--help``.
- ``.. blkio-errors::``: which exception class each errno raises, and its
  builtin bases, from ``blkio.errors.error_for`` (the one error path).
- On ``builder-inited``: ``scripts/bench_page.py`` writes the performance
  tables and plot from ``docs/_data/bench.json`` into ``docs/_generated/``.

Why not sphinx-argparse: ``bench`` and ``copy`` build their parsers inside
their own modules (``copy`` with a usage line of its own, since its
PROPERTY=VALUE arguments follow ``--input-blkio``), and a page of ~60 lines
here renders them with no further dependency.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import runpy
import textwrap
from pathlib import Path
from typing import Any, Dict, List

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.parsing import nested_parse_to_nodes

DOCS = Path(__file__).resolve().parent.parent
REPO = DOCS.parent
logger = logging.getLogger(__name__)


def cli_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``blkio COMMAND`` (``blkio`` itself for "blkio")."""
    from blkio import cli
    if command == "blkio":
        return cli.build_parser("blkio")
    if command == "info":
        top = cli.build_parser("blkio")
        for action in top._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices["info"]
        raise LookupError("blkio's parser has no info subcommand")
    if command == "bench":
        bench = importlib.import_module("blkio._bench")
        if hasattr(bench, "build_parser"):
            return bench.build_parser("blkio bench")
        p = argparse.ArgumentParser(prog="blkio bench", description=bench.DESCRIPTION,
                                    epilog=bench.EPILOG)
        bench.add_arguments(p)
        return p
    if command == "copy":
        copy = importlib.import_module("blkio._copy")
        p = copy.build_parser()
        p.prog = "blkio copy"
        return p
    raise ValueError(f"unknown command {command!r}")


def _option_text(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar if isinstance(action.metavar, str) else action.dest
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper())
    return ", ".join(f"{o}={metavar}" if o.startswith("--") else f"{o} {metavar}"
                     for o in action.option_strings)


def cli_rst(command: str) -> List[str]:
    """reStructuredText for one command: usage, description, options, epilog."""
    p = cli_parser(command)
    p.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=88)
    lines = ["::", ""] + ["   " + ln for ln in p.format_usage().rstrip().splitlines()] + [""]
    if p.description:
        lines += [ln for ln in textwrap.dedent(p.description).strip().splitlines()] + [""]
    for group in p._action_groups:
        actions = [a for a in group._group_actions
                   if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = {"positional arguments": "Arguments", "options": "Options",
                 "optional arguments": "Options"}.get(group.title or "", group.title or "")
        lines += [f".. rubric:: {title}", ""]
        for a in actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a._choices_actions:
                    lines += [f"``{sub.dest}``", f"   {sub.help or ''}", ""]
                continue
            lines.append(f"``{_option_text(a)}``")
            help_text = (a.help or "").replace("%(default)s", str(a.default)).replace("%%", "%")
            lines += [f"   {help_text or '(no help)'}".replace("*", r"\*"), ""]
    if p.epilog:
        lines += ["::", ""] + ["   " + ln for ln in textwrap.dedent(p.epilog).strip().splitlines()] + [""]
    return lines


class CliDirective(SphinxDirective):
    required_arguments = 1

    def run(self) -> List[nodes.Node]:
        return list(nested_parse_to_nodes(self.state, StringList(cli_rst(self.arguments[0]), self.get_source_info()[0])))


def errors_rst() -> List[str]:
    """A table: errno, the class raised, its bases (``error_for`` decides)."""
    import blkio
    from blkio import errors as _errors

    def public(cls: type) -> str:
        if cls.__module__ == "builtins":
            return cls.__qualname__
        if getattr(blkio, cls.__name__, None) is cls:
            return f"blkio.{cls.__name__}"
        return f"{cls.__module__}.{cls.__qualname__}"

    rows = []
    for code in sorted(errno.errorcode):
        cls = type(_errors.error_for(code, "x"))
        if cls is _errors.Error:
            continue
        bases = ", ".join(f"``{public(b)}``" for b in cls.__bases__)
        rows.append((f"``{errno.errorcode[code]}`` ({code})", f"``{cls.__name__}``", bases))
    lines = [".. list-table::", "   :header-rows: 1", "",
             "   * - errno", "     - class raised", "     - its bases"]
    for row in rows:
        lines += [f"   * - {row[0]}", f"     - {row[1]}", f"     - {row[2]}"]
    lines += ["   * - any other errno", "     - ``blkio.Error``", "     - ``OSError``"]
    return lines


class ErrorsDirective(SphinxDirective):
    def run(self) -> List[nodes.Node]:
        return list(nested_parse_to_nodes(self.state, StringList(errors_rst(), self.get_source_info()[0])))


def make_bench_page(app: Sphinx) -> None:
    """Run scripts/bench_page.py: tables and plot from the committed JSON."""
    script = REPO / "scripts" / "bench_page.py"
    data = DOCS / "_data" / "bench.json"
    if not data.exists():
        logger.warning("no committed bench run at %s: the performance page has no results", data)
        return
    runpy.run_path(str(script), run_name="blkio_docs")["build"](data, DOCS / "_generated")


def setup(app: Sphinx) -> Dict[str, Any]:
    app.add_directive("blkio-cli", CliDirective)
    app.add_directive("blkio-errors", ErrorsDirective)
    app.connect("builder-inited", make_bench_page)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
