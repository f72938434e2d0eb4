"""Command line: ``blkio info|bench <driver> prop=value ...`` (the console
script) or, the same, ``python -m blkio info|bench ...``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from . import _bench


def cmd_info(args: argparse.Namespace) -> int:
    import blkio
    try:
        props = _bench.parse_properties(args.props)
        with blkio.open(args.driver, **props) as dev:
            info = {"driver": dev.driver, "capacity": dev.capacity,
                    "limits": dev.limits.__dict__, "properties": dev.properties()}
    except (_bench.BenchError, ValueError, OSError) as e:
        print(f"{args.prog} info: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def main(argv: Optional[List[str]] = None, prog: str = "blkio") -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns
    the exit status.  ``prog`` is the name that help and errors show."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.set_defaults(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="open a device and print its limits and properties as JSON")
    p.add_argument("driver")
    p.add_argument("props", nargs="*", help="libblkio property=value (path=/dev/sdb ...)")
    p.set_defaults(func=cmd_info)
    _bench.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
