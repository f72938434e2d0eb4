"""Command-line property arguments: ``prop=value`` words as libblkio's example
programs take them (``path=/x direct=1 num-entries=256``), turned into the
keywords of ``blkio.open``.  Shared by ``info``, ``bench`` and ``copy``; it may
not open devices or know any subcommand's other options."""

from __future__ import annotations

__all__ = ["PropertyError", "parse_properties"]

_BOOL_WORDS = {"true": True, "on": True, "yes": True,
               "false": False, "off": False, "no": False}
_BOOL_PROPS = {"direct", "read_only"}


class PropertyError(ValueError):
    """A ``prop=value`` word that cannot be read."""


def parse_properties(items: list[str]) -> dict:
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
