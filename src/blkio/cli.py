"""Command line: ``blkio info|bench|copy ...`` (the console script) or, the
same, ``python -m blkio info|bench|copy ...``: the subcommands and their
dispatch.  ``info`` is here; ``bench`` (``_bench``) and ``copy`` (``_copy``)
parse their own arguments and are imported only when they run."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from ._cliprops import parse_properties


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
    try:
        props = parse_properties(args.props)
        with blkio.open(args.driver, **props) as dev:
            info = {"driver": dev.driver, "capacity": dev.capacity,
                    "limits": dev.limits.__dict__, "properties": dev.properties(),
                    "zones": zone_summary(dev)}
    except (ValueError, OSError) as e:
        print(f"{args.prog} info: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def build_parser(prog: str = "blkio") -> argparse.ArgumentParser:
    """The top-level parser and ``info``'s (``bench`` and ``copy`` parse
    their own arguments; the docs' CLI page renders all three)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.set_defaults(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="open a device and print its limits, properties and zones "
                                    "(zoned devices: model, geometry, zones by state) as JSON")
    p.add_argument("driver", help="libblkio driver, e.g. io_uring")
    p.add_argument("props", nargs="*", help="libblkio property=value (path=/dev/sdb ...)")
    p.set_defaults(func=cmd_info)
    sub.add_parser("bench", add_help=False,
                   help="benchmark a device (the options and JSON of libblkio's blkio-bench; "
                        "bench --help)")
    sub.add_parser("copy", add_help=False,
                   help="copy a device or file to another, pipelined (libblkio's blkio-copy; "
                        "python -m blkio copy --help)")
    return parser


def main(argv: Optional[List[str]] = None, prog: str = "blkio") -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns
    the exit status.  ``prog`` is the name that help and errors show."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["copy"]:
        # copy parses its own arguments: PROPERTY=VALUE belongs to the
        # --input-blkio/--output-blkio before it (libblkio's blkio-copy).
        from . import _copy
        return _copy.main(argv[1:])
    if argv[:1] == ["bench"]:
        from . import _bench
        return _bench.main(argv[1:], prog=f"{prog} bench")
    args = build_parser(prog).parse_args(argv)
    return int(args.func(args) or 0)
