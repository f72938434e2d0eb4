"""Command line: ``blkio info|bench|copy ...`` (the console script) or, the
same, ``python -m blkio info|bench|copy ...``: the subcommands, their
dispatch, ``--version``.  ``info`` is here; ``bench`` (``_bench``) and
``copy`` (``_copy``) parse their own arguments and are imported only when
they run.  Every subcommand names the program as it was invoked and exits
1 for a runtime failure, 2 for a bad command line (``_cliparse``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from ._cliparse import (CONNECT_TIMEOUT_HELP, EXIT_FAILURE, EXIT_USAGE, SuggestingParser,
                        connect_timeout_type, open_failure, program_name)
from ._cliprops import PropertyError, check_properties, parse_properties


def zone_summary(dev: Any) -> Dict[str, Any]:
    """The zoned model, the zone geometry and how many zones are in each
    state (one zone report), for ``info``; only the model when not zoned."""
    zone_info = dev.zone_info
    if not zone_info.zoned:
        return {"model": zone_info.model}
    out: Dict[str, Any] = dict(zone_info.__dict__)
    out["states"] = {state: n for state, n in dev.zone_states().items() if n}
    return out


def cmd_info(args: argparse.Namespace) -> int:
    import blkio
    prog = f"{args.prog} info"
    try:
        props = parse_properties(args.props)
        check_properties(args.driver, props)
    except PropertyError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_USAGE
    what = f"{args.driver} device" + (f" {props['path']}" if "path" in props else "")
    try:
        props.setdefault("connect_timeout", args.connect_timeout)
        with blkio.open(args.driver, **props) as dev:
            info = {"driver": dev.driver, "capacity": dev.capacity,
                    "limits": dev.limits.__dict__, "properties": dev.properties(),
                    "zones": zone_summary(dev)}
    except (ValueError, TypeError) as e:
        print(f"{prog}: {open_failure(what, e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"{prog}: {open_failure(what, e)}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def version_text() -> str:
    import blkio
    return f"blkio {blkio.__version__} (libblkio {blkio.LIBBLKIO_VERSION})"


def build_parser(prog: str = "blkio") -> argparse.ArgumentParser:
    """The top-level parser and ``info``'s (``bench`` and ``copy`` parse
    their own arguments; the docs' CLI page renders all three)."""
    parser = SuggestingParser(prog=prog, description="blkio: block I/O through libblkio.")
    parser.add_argument("--version", action="version", version=version_text())
    parser.set_defaults(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,bench,copy}",
                                parser_class=SuggestingParser)
    p = sub.add_parser("info", help="open a device and print its limits, properties and zones "
                                    "(zoned devices: model, geometry, zones by state) as JSON")
    p.add_argument("driver", help="libblkio driver, e.g. io_uring")
    p.add_argument("props", nargs="*", help="libblkio property=value (path=/dev/sdb ...)")
    p.add_argument("--connect-timeout", type=connect_timeout_type, default=30.0,
                   metavar="SECONDS", help=CONNECT_TIMEOUT_HELP)
    p.set_defaults(func=cmd_info)
    sub.add_parser("bench", add_help=False,
                   help=f"benchmark a device: blkio-bench's options and JSON, latency "
                        f"percentiles, mixed workloads, verify ({prog} bench --help)")
    sub.add_parser("copy", add_help=False,
                   help=f"copy a device or file to another, pipelined (libblkio's blkio-copy; "
                        f"{prog} copy --help)")
    return parser


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns
    the exit status.  ``prog`` is the name that help and errors show
    (default: as invoked, ``blkio`` or ``python -m blkio``)."""
    if argv is None:
        argv = sys.argv[1:]
    if prog is None:
        prog = program_name()
    if argv[:1] == ["copy"]:
        # copy parses its own arguments: PROPERTY=VALUE belongs to the
        # --input-blkio/--output-blkio before it (libblkio's blkio-copy).
        from . import _copy
        return _copy.main(argv[1:], prog=f"{prog} copy")
    if argv[:1] == ["bench"]:
        from . import _bench
        return _bench.main(argv[1:], prog=f"{prog} bench")
    args = build_parser(prog).parse_args(argv)
    return int(args.func(args) or 0)
