"""Byte counts on the command line: ``4096``, ``4K``, ``4k``, ``1M``, ``2MiB``,
``1G``, ``0x1000`` (binary units, as fio and dd read them: K is 1024).  Shared
by ``bench`` and ``copy``; it knows nothing else of either."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["parse_size", "size_type", "format_bytes"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"4K"`` -> 4096: an integer (decimal or 0x hex) with an optional unit
    K, M, G or T (also spelled KiB, KB, k, ...; all binary).  ValueError
    says what was wrong."""
    s = text.strip()
    upper = s.upper()
    for suffix in ("IB", "B"):
        if upper.endswith(suffix) and len(upper) > len(suffix) and upper[-len(suffix) - 1] in "KMGT":
            upper = upper[:-len(suffix)]
            break
    unit = upper[-1:] if upper[-1:] in ("K", "M", "G", "T") else ""
    number = s[:len(upper) - len(unit)]
    try:
        value = int(number, 0)
    except ValueError:
        raise ValueError(f"not a size in bytes: {text!r} (examples: 4096, 4K, 1M, 2GiB)") from None
    return value * _UNITS[unit]


def size_type(minimum: int = 1) -> Callable[[str], int]:
    """An argparse ``type=`` for sizes of at least ``minimum`` bytes."""
    def convert(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if value < minimum:
            what = "must be positive" if minimum == 1 else f"must be at least {minimum}"
            raise argparse.ArgumentTypeError(f"{what}: {text!r}")
        return value
    convert.__name__ = "size"        # argparse names the type in its messages
    return convert


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"      # not reached
