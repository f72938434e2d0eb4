"""Device limits: read once after start, validated as QEMU's refresh_limits does."""

from __future__ import annotations

from dataclasses import dataclass, fields
import os
from typing import Any, Callable, Dict

from .errors import Error

__all__ = ["Limits", "read_limits"]

_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """What a started device allows; sizes and alignments in bytes.

    Each field is the libblkio property of the same name with ``_`` for ``-``
    (``request_alignment`` is "request-alignment").
    """

    request_alignment: int
    optimal_io_alignment: int
    optimal_io_size: int
    buf_alignment: int
    optimal_buf_alignment: int
    mem_region_alignment: int
    max_transfer: int
    max_segments: int
    max_segment_len: int
    max_write_zeroes_len: int
    discard_alignment: int
    discard_alignment_offset: int
    max_discard_len: int
    max_mem_regions: int
    needs_mem_regions: bool
    needs_mem_region_fd: bool
    may_pin_mem_regions: bool
    supports_fua_natively: bool
    flush_needed: bool
    can_grow: bool
    supports_poll_queues: bool
    max_queues: int

    @staticmethod
    def property_name(field: str) -> str:
        """libblkio's property name for a field: ``max_transfer`` -> ``max-transfer``."""
        if not isinstance(field, str):
            raise TypeError(f"a Limits field name is a str, not {type(field).__name__}")
        if field not in Limits.__dataclass_fields__:
            raise ValueError(f"{field!r} is not a field of blkio.Limits")
        return field.replace("_", "-")


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _invalid(field: str, value: int, why: str) -> Error:
    return Error(22, f'invalid "{Limits.property_name(field)}" value {value}, {why}')


def read_limits(get: Callable[[str], object], max_transfer_cap: int = 0) -> Limits:
    """Read every field with ``get(property_name)`` and validate them.

    ``may-pin-mem-regions`` is missing in old drivers; like QEMU we then assume
    pinning wherever memory regions are needed.  ``max_transfer_cap`` (bytes,
    0: none) lowers max-transfer where the kernel knows better than libblkio.
    """
    values: Dict[str, Any] = {}
    for f in fields(Limits):
        name = Limits.property_name(f.name)
        if f.name == "may_pin_mem_regions":
            try:
                values[f.name] = bool(get(name))
            except OSError:
                values[f.name] = None  # filled in below from needs-mem-regions
            continue
        values[f.name] = get(name)
    if values["may_pin_mem_regions"] is None:
        values["may_pin_mem_regions"] = bool(values["needs_mem_regions"])
    if max_transfer_cap > 0:
        unit = max(values["request_alignment"], values["optimal_io_size"] or 1)
        cap = max_transfer_cap - max_transfer_cap % unit
        if cap > 0 and (values["max_transfer"] == 0 or values["max_transfer"] > cap):
            values["max_transfer"] = cap
    limits = Limits(**values)
    validate(limits)
    return limits


def validate(limits: Limits) -> None:
    """Raise blkio.Error naming the field and value that a device got wrong."""
    align = limits.request_alignment
    if not (_power_of_two(align) and align < _INT_MAX):
        raise _invalid("request_alignment", align, "must be a power of 2 less than INT_MAX")
    opt = limits.optimal_io_size
    if opt < 0 or opt > _INT_MAX or opt % align:
        raise _invalid("optimal_io_size", opt, f"must be a multiple of {align}")
    mt = limits.max_transfer
    if mt < 0 or mt % align or (opt and mt % opt):
        raise _invalid("max_transfer", mt, f"must be a multiple of {align} and {opt} (if non-zero)")
    for name in ("buf_alignment", "optimal_buf_alignment", "max_segments"):
        value = getattr(limits, name)
        if value < 1:
            raise _invalid(name, value, "must be positive")
    mra = limits.mem_region_alignment
    if not _power_of_two(mra):
        raise _invalid("mem_region_alignment", mra, "must be a power of 2")
    if not _power_of_two(limits.buf_alignment):
        raise _invalid("buf_alignment", limits.buf_alignment, "must be a power of 2")


def nvme_max_transfer(path: str) -> int:
    """The kernel's per-command limit for an NVMe generic char device, in bytes.

    libblkio 1.5.0's nvme-io_uring reports max-transfer 32 MiB whatever the
    controller's MDTS; a longer command fails with EINVAL.  ``/dev/ngXnY``
    shares its limits with the block device ``nvmeXnY``.  0 when unknown.
    """
    name = os.path.basename(os.path.realpath(path))
    if not name.startswith("ng"):
        return 0
    try:
        with open(f"/sys/block/nvme{name[2:]}/queue/max_hw_sectors_kb") as f:
            return int(f.read()) * 1024
    except (OSError, ValueError):
        return 0
