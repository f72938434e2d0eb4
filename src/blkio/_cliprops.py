"""Command-line property arguments: ``prop=value`` words as libblkio's example
programs take them (``path=/x direct=1 num-entries=256``), turned into the
keywords of ``blkio.open``, and checked against the driver's catalogue (a
misspelled driver or property gets a suggestion and the list of valid
names).  Shared by ``info``, ``bench`` and ``copy``; it may not open devices
or know any subcommand's other options."""

from __future__ import annotations

import inspect
from typing import Dict, List

from ._cliparse import did_you_mean

__all__ = ["PropertyError", "parse_properties", "check_driver", "check_properties",
           "settable_properties"]

_BOOL_WORDS = {"true": True, "on": True, "yes": True,
               "false": False, "off": False, "no": False}
_BOOL_PROPS = {"direct", "read_only"}
# open()'s parameters that are not properties a command line gives
_NOT_PROPERTIES = {"driver", "properties", "poll_us", "connect_timeout", "reconnect",
                   "reconnect_timeout"}   # blkio's own: the commands' --options


class PropertyError(ValueError):
    """A ``prop=value`` word that cannot be read, or a property or driver
    that does not exist (a usage error)."""


def parse_properties(items: List[str]) -> dict:
    """``["path=/x", "direct=1", "num-entries=256"]`` -> open() keywords
    (``-`` becomes ``_``; integers become ``int``; true/false/on/off/yes/no,
    and 0/1 for the bool properties, become ``bool``)."""
    props: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise PropertyError(f"{item}: missing property value (expected property=value)")
        key = name.replace("-", "_")
        low = value.lower()
        conv: object
        if low in _BOOL_WORDS:
            conv = _BOOL_WORDS[low]
        elif key in _BOOL_PROPS and value in ("0", "1"):
            conv = value == "1"
        else:
            try:
                conv = int(value, 0)
            except ValueError:
                conv = value
        props[key] = conv
    return props


def check_driver(driver: str) -> None:
    """PropertyError naming the drivers when ``driver`` is not one."""
    import blkio
    if driver not in blkio.DRIVERS:
        raise PropertyError(f"unknown driver {driver!r}{did_you_mean(driver, blkio.DRIVERS)} "
                            f"(libblkio drivers: {', '.join(blkio.DRIVERS)})")


def settable_properties(driver: str) -> List[str]:
    """What a command line may give ``driver``: its writable libblkio
    properties and ``blkio.open``'s own keywords, spelled with ``-``."""
    import blkio
    names = {name for name, spec in blkio.driver_properties(driver).items() if spec.writable}
    for param in inspect.signature(blkio.open).parameters.values():
        if param.kind is param.KEYWORD_ONLY or param.kind is param.POSITIONAL_OR_KEYWORD:
            if param.name not in _NOT_PROPERTIES:
                names.add(param.name.replace("_", "-"))
    return sorted(names)


def check_properties(driver: str, props: Dict[str, object]) -> None:
    """PropertyError for a property ``driver`` does not have, with the
    closest name and every valid one (open() checks values and stages)."""
    check_driver(driver)
    valid = settable_properties(driver)
    for key in props:
        name = key.replace("_", "-")
        if name not in valid:
            raise PropertyError(f"unknown property {name!r} for driver {driver!r}"
                                f"{did_you_mean(name, valid)} (properties of {driver}: "
                                f"{', '.join(valid)})")
