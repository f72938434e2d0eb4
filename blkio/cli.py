"""Command line: ``python -m blkio info <driver> prop=value ...``."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional


def parse_props(items: List[str]) -> Dict[str, Any]:
    """``path=/x direct=true num-entries=256`` -> keyword arguments for open()."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"property {item!r} is not name=value")
        name, value = item.split("=", 1)
        key = name.replace("-", "_")
        low = value.lower()
        v: Any = value
        if low in ("true", "on", "yes"):
            v = True
        elif low in ("false", "off", "no"):
            v = False
        else:
            try:
                v = int(value, 0)
            except ValueError:
                v = value
        if key in ("path",):
            v = value
        elif key in ("direct", "read_only") and isinstance(v, int):
            v = bool(v)
        out[key] = v
    return out


def cmd_info(args: argparse.Namespace) -> int:
    import blkio
    props = parse_props(args.props)
    with blkio.open(args.driver, **props) as dev:
        info = {"driver": dev.driver, "capacity": dev.capacity,
                "properties": dev.properties()}
        print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blkio")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="open a device and print its properties as JSON")
    p.add_argument("driver")
    p.add_argument("props", nargs="*", help="name=value")
    p.set_defaults(func=cmd_info)
    try:
        from . import _bench
    except ImportError:
        _bench = None
    if _bench is not None:
        _bench.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
