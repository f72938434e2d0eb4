"""Zoned devices (NVMe ZNS through nvme-io_uring), as the facade sees them.

It owns ``ZoneInfo`` (the zone geometry, read once at open and validated),
the blocking zone methods of ``blkio.Device`` (``ZonedMixin``: report, open,
close, finish and reset of one zone or all zones, a count of zones by state),
the same awaited on ``blkio.aio.AsyncDevice`` (``AsyncZonedMixin``; one
report's requests, ``_Report``, are the same for both) and ``ZoneWriter``,
which appends at the write pointer across zones.  The
requests themselves, and every check made before one is submitted, are the
core's (``_public.zone_request``, ``Queue.report_zones`` & co.;
``_checks.zone_problem`` and ``request_problem``); this module never calls
libblkio.

What blkio checks before submitting, since a zoned device answers EIO to
every refusal: the device is zoned; a management offset is a zone start
inside the device; a write to a host-managed device stays inside one zone.
What it cannot check without a report (the device does, and says EIO): that
a write starts at the zone's write pointer, ends within the zone's capacity,
goes to a zone that is not FULL, or that an open stays within the open and
active zone limits.  ``ZoneWriter`` tracks the write pointer itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, SupportsIndex, Tuple, cast

import numpy as np
import numpy.typing as npt

from .errors import Error
from ._checks import Op
from ._public import check_zone as _check_zone, zone_request as _zone_request
from ._zoneops import ZONE_DTYPE, ZONED_MODELS, ZoneState, ZoneType

if TYPE_CHECKING:
    from . import Device

__all__ = ["ZONE_DTYPE", "AsyncZonedMixin", "ZoneInfo", "ZoneState", "ZoneType", "ZoneWriter",
           "ZonedMixin", "read_zone_info"]

_ZONED_PROPERTIES = ("zoned", "zone-size", "nr-zones", "max-open-zones", "max-active-zones",
                     "append-support", "zone-append-max-bytes")


@dataclass(frozen=True)
class ZoneInfo:
    """A device's zone geometry (libblkio's zoned properties); sizes in bytes.

    ``model`` is "none", "host-aware" or "host-managed".  The limits on open
    and active zones are 0 when the device sets none (and on a device that
    is not zoned).  Every zone has ``zone_size`` bytes of address space, of
    which its reported ``capacity`` is writable.
    """

    model: str
    zone_size: int
    nr_zones: int
    max_open_zones: int
    max_active_zones: int
    append_support: bool
    zone_append_max_bytes: int

    @property
    def zoned(self) -> bool:
        """True unless the model is "none"."""
        return self.model != "none"


NOT_ZONED = ZoneInfo("none", 0, 0, 0, 0, False, 0)


def read_zone_info(get: Callable[[str], Any], has_zone_properties: bool, capacity: int,
                   request_alignment: int) -> ZoneInfo:
    """Read the zoned properties with ``get(name)`` (drivers whose catalogue
    has them; the others are not zoned) and validate them: an invalid value
    is a ``blkio.Error`` naming it."""
    if not has_zone_properties:
        return NOT_ZONED
    v = {name: get(name) for name in _ZONED_PROPERTIES}
    model = v["zoned"]
    if not 0 <= model < len(ZONED_MODELS):
        raise Error(22, f'invalid "zoned" value {model}, must be 0, 1 or 2')
    if model == 0:
        return NOT_ZONED
    zs, nr = v["zone-size"], v["nr-zones"]
    if zs <= 0 or zs % request_alignment:
        raise Error(22, f'invalid "zone-size" value {zs}, must be a positive multiple of '
                        f'request-alignment ({request_alignment})')
    if nr <= 0 or nr * zs > capacity:
        raise Error(22, f'invalid "nr-zones" value {nr}: {nr} zones of {zs} bytes must fit '
                        f'the capacity ({capacity})')
    for name in ("max-open-zones", "max-active-zones"):
        if v[name] < 0:
            raise Error(22, f'invalid "{name}" value {v[name]}, must be >= 0')
    return ZoneInfo(ZONED_MODELS[model], zs, nr, v["max-open-zones"], v["max-active-zones"],
                    bool(v["append-support"]), v["zone-append-max-bytes"])


class _Report:
    """One report's requests, for the blocking and the asyncio face alike:
    ``next()`` is the zones array the next request fills at ``pos`` (None:
    done), ``took(got)`` records its count, ``result()`` joins the parts."""

    def __init__(self, device: Any, offset: int, nr_zones: Optional[int]) -> None:
        self.device = device
        self.pos, self.left, self.per_request = _report_plan(device, offset, nr_zones)
        self.parts: List[np.ndarray] = []
        self.zones = np.empty(0, ZONE_DTYPE)

    def next(self) -> Optional[np.ndarray]:
        if self.left <= 0:
            return None
        n = min(self.left, self.per_request)
        self.zones = self.device.alloc(n * ZONE_DTYPE.itemsize).view(ZONE_DTYPE)
        return self.zones

    def took(self, got: int) -> None:
        zones = self.zones
        self.parts.append(zones[:got])
        if got < len(zones) or got == 0:
            self.left = 0
            return
        self.left -= got
        last = zones[got - 1]
        self.pos = int(last["start"]) + int(last["len"])

    def result(self) -> np.ndarray:
        if len(self.parts) == 1:
            return self.parts[0]
        return np.concatenate(self.parts) if self.parts else np.empty(0, ZONE_DTYPE)


def _report_plan(device: Any, offset: int, nr_zones: Optional[int]) -> Tuple[int, int, int]:
    """Where a report starts (a zone start, bytes), how many zones it
    covers, and how many one request may ask for (its reply must fit
    max-transfer: 64 bytes per zone on NVMe, and one more for the header)."""
    info = device.zone_info
    _check_zone(device, Op.REPORT_ZONES, offset)   # zoned, an offset inside the device
    first = offset // info.zone_size
    left = info.nr_zones - first
    if nr_zones is not None:
        if isinstance(nr_zones, bool) or not isinstance(nr_zones, int):
            raise TypeError(f"nr_zones must be an int or None, not {type(nr_zones).__name__}")
        if nr_zones < 0:
            raise ValueError(f"nr_zones must be >= 0, got {nr_zones!r}")
        left = min(left, nr_zones)
    per_request = left
    max_transfer = device.limits.max_transfer
    if max_transfer:
        per_request = max(1, min(left, max_transfer // ZONE_DTYPE.itemsize - 1))
    return first * info.zone_size, left, per_request


class ZonedMixin:
    """Zone methods of ``blkio.Device`` (blocking, on the calling thread's
    queue, GIL released while waiting).  Offsets are bytes."""

    _zone_info: ZoneInfo

    if TYPE_CHECKING:      # provided by blkio.Device and the core
        @property
        def capacity(self) -> int: ...
        @property
        def limits(self) -> Any: ...
        def alloc(self, nbytes: SupportsIndex) -> npt.NDArray[np.uint8]: ...

    @property
    def zone_info(self) -> ZoneInfo:
        """The device's :class:`ZoneInfo` (read at open)."""
        return self._zone_info

    @property
    def zoned(self) -> bool:
        """True on a zoned device (host-aware or host-managed); the model as a
        string is ``zone_info.model``."""
        return self._zone_info.zoned

    def report_zones(self, offset: int = 0, nr_zones: Optional[int] = None) -> np.ndarray:
        """Report zones from the one holding ``offset`` (bytes; rounded down
        to that zone's start), at most ``nr_zones`` of them (None: all to
        the end of the device).  Returns a numpy array of ``ZONE_DTYPE``
        records: start, len, capacity, write_pointer (bytes, uint64), type
        (``ZoneType``), state (``ZoneState``), reset (bool).  A FULL zone's
        write_pointer is start + len, as libblkio reports it.  A report
        longer than one request allows (max-transfer) takes several."""
        report = _Report(self, offset, nr_zones)
        while (zones := report.next()) is not None:
            report.took(_zone_request(cast(Any, self), Op.REPORT_ZONES, report.pos, zones))
        return report.result()

    def zone_states(self) -> Dict[str, int]:
        """How many zones are in each state: {"empty": n, "imp_open": n, ...},
        every ``ZoneState`` listed (one report of all zones)."""
        states = self.report_zones()["state"]
        return {str(s): int(np.count_nonzero(states == s)) for s in ZoneState}

    def open_zone(self, offset: int) -> None:
        """Open the zone starting at ``offset`` explicitly (it then counts
        against max-open-zones until closed, finished or full)."""
        # (a ZonedMixin is always a blkio.Device: the core takes its compiled base)
        _zone_request(cast(Any, self), Op.OPEN_ZONE, offset)

    def close_zone(self, offset: int) -> None:
        """Close the open zone starting at ``offset`` (it stays active)."""
        _zone_request(cast(Any, self), Op.CLOSE_ZONE, offset)

    def finish_zone(self, offset: int) -> None:
        """Finish the zone starting at ``offset``: it becomes FULL."""
        _zone_request(cast(Any, self), Op.FINISH_ZONE, offset)

    def reset_zone(self, offset: int) -> None:
        """Reset the zone starting at ``offset``: EMPTY, its data gone (reads
        give zeroes), the write pointer back at its start."""
        _zone_request(cast(Any, self), Op.RESET_ZONE, offset)

    # The all-zones forms are methods of their own, like libblkio's
    # blkioq_*_all_zones, not a flag of the one-zone calls: a forgotten
    # offset must never mean "every zone".
    def open_all_zones(self) -> None:
        """Open every CLOSED zone.  Beyond max-open-zones the device refuses
        with EIO after opening some of them (check with ``report_zones``)."""
        _zone_request(cast(Any, self), Op.OPEN_ALL_ZONES)

    def close_all_zones(self) -> None:
        """Close every open zone."""
        _zone_request(cast(Any, self), Op.CLOSE_ALL_ZONES)

    def finish_all_zones(self) -> None:
        """Finish every open or closed zone (they become FULL)."""
        _zone_request(cast(Any, self), Op.FINISH_ALL_ZONES)

    def reset_all_zones(self) -> None:
        """Reset every zone that is not EMPTY."""
        _zone_request(cast(Any, self), Op.RESET_ALL_ZONES)

    def zone_writer(self, zone_offset: int, nr_zones: int = 1) -> "ZoneWriter":
        """A :class:`ZoneWriter` appending at the write pointer of the zone
        starting at ``zone_offset`` and, once it is full, of the next ones
        (``nr_zones`` zones in all)."""
        return ZoneWriter(self, zone_offset, nr_zones)


class AsyncZonedMixin:
    """Zone methods of ``blkio.aio.AsyncDevice``: the requests of ZonedMixin,
    awaited (``_zone`` is the AsyncDevice's: one request on the loop)."""

    if TYPE_CHECKING:      # provided by AsyncDevice
        device: Device

        def _zone(self, op: int, offset: int = 0, zones: Any = None) -> Awaitable[int]: ...

    async def report_zones(self, offset: int = 0, nr_zones: Optional[int] = None) -> np.ndarray:
        """Report zones from the one holding ``offset`` (see
        ``Device.report_zones``): a numpy array of ``blkio._ZONE_DTYPE``."""
        report = _Report(self.device, offset, nr_zones)
        while (zones := report.next()) is not None:
            report.took(await self._zone(Op.REPORT_ZONES, report.pos, zones))
        return report.result()

    async def open_zone(self, offset: int) -> None:
        """Open the zone starting at ``offset`` explicitly."""
        await self._zone(Op.OPEN_ZONE, offset)

    async def close_zone(self, offset: int) -> None:
        """Close the open zone starting at ``offset``."""
        await self._zone(Op.CLOSE_ZONE, offset)

    async def finish_zone(self, offset: int) -> None:
        """Finish the zone starting at ``offset`` (it becomes FULL)."""
        await self._zone(Op.FINISH_ZONE, offset)

    async def reset_zone(self, offset: int) -> None:
        """Reset the zone starting at ``offset`` (EMPTY, reads give zeroes)."""
        await self._zone(Op.RESET_ZONE, offset)

    async def open_all_zones(self) -> None:
        """Open every CLOSED zone."""
        await self._zone(Op.OPEN_ALL_ZONES)

    async def close_all_zones(self) -> None:
        """Close every open zone."""
        await self._zone(Op.CLOSE_ALL_ZONES)

    async def finish_all_zones(self) -> None:
        """Finish every open or closed zone."""
        await self._zone(Op.FINISH_ALL_ZONES)

    async def reset_all_zones(self) -> None:
        """Reset every zone that is not EMPTY."""
        await self._zone(Op.RESET_ALL_ZONES)


class ZoneWriter:
    """Sequential writes to zones, each at the write pointer.

    Made by ``Device.zone_writer(zone_offset, nr_zones)``.  ``write(data)``
    appends ``data`` where the last write ended (at first: the write pointer
    the device reports), filling each zone up to its capacity and going on in
    the next one (a zone written to its capacity becomes FULL by itself, so
    at most one zone of the writer is open at a time).  Each request is at
    most max-transfer bytes and waited for before the next, so the device
    sees them in order.  ``finish()`` seals the current zone and moves on;
    ``reset()`` empties the writer's zones.  After a failed write the zone is
    reported again, so the write pointer stays the device's.
    """

    def __init__(self, device: Any, zone_offset: int, nr_zones: int = 1) -> None:
        from . import Device
        if not isinstance(device, Device):
            raise TypeError(f"ZoneWriter writes to a blkio.Device, not {type(device).__name__} "
                            f"(Device.zone_writer() makes one)")
        info = device.zone_info
        _check_zone(device, Op.REPORT_ZONES, 0)    # zoned
        zs = info.zone_size
        if isinstance(zone_offset, bool) or not isinstance(zone_offset, int):
            raise TypeError(f"zone_writer: zone_offset must be an int, not "
                            f"{type(zone_offset).__name__}")
        if isinstance(nr_zones, bool) or not isinstance(nr_zones, int):
            raise TypeError(f"zone_writer: nr_zones must be an int, not {type(nr_zones).__name__}")
        if zone_offset < 0 or zone_offset % zs or zone_offset >= info.nr_zones * zs:
            raise ValueError(f"zone_writer: {zone_offset!r} is not the start of a zone (zone size "
                             f"{zs} bytes, {info.nr_zones} zones)")
        first = zone_offset // zs
        if not 1 <= nr_zones <= info.nr_zones - first:
            raise ValueError(f"zone_writer: nr_zones must be 1 to {info.nr_zones - first} "
                             f"from zone {first}, got {nr_zones!r}")
        self.device = device
        self._align = device.limits.request_alignment
        self._piece = device.limits.max_transfer or (1 << 20)
        self._piece -= self._piece % self._align
        self._first = zone_offset
        self._nr = nr_zones
        self.sync()

    def sync(self) -> None:
        """Read the zones' write pointers and capacities from the device again."""
        zones = self.device.report_zones(self._first, self._nr).copy()
        if len(zones) != self._nr:
            raise Error(5, f"report_zones returned {len(zones)} zones, {self._nr} asked")
        for z in zones:
            if z["type"] == ZoneType.CONVENTIONAL:
                raise ValueError(f"zone at {int(z['start'])} is conventional: it has no write pointer")
            if z["state"] in (ZoneState.READONLY, ZoneState.OFFLINE):
                raise ValueError(f"zone at {int(z['start'])} is {ZoneState(z['state'])}")
        self._zones = zones
        # The first zone not yet full holds the write pointer.
        self._index = 0
        while self._index < self._nr - 1 and self._left_in(self._index) == 0:
            self._index += 1

    def _end(self, i: int) -> int:
        z = self._zones[i]
        return int(z["start"]) + int(z["capacity"])

    def _wp(self, i: int) -> int:
        z = self._zones[i]
        if z["state"] == ZoneState.FULL:
            return self._end(i)     # libblkio reports start + len
        return int(z["write_pointer"])

    def _left_in(self, i: int) -> int:
        return self._end(i) - self._wp(i)

    @property
    def write_pointer(self) -> int:
        """Where the next write goes (bytes)."""
        return self._wp(self._index)

    @property
    def zone(self) -> int:
        """Start of the zone the next write goes to (bytes)."""
        return int(self._zones[self._index]["start"])

    @property
    def remaining(self) -> int:
        """Bytes that can still be written, over the writer's zones."""
        return sum(self._left_in(i) for i in range(self._index, self._nr))

    def write(self, data: Any, *, fua: bool = False) -> int:
        """Append ``data`` (any contiguous buffer; a multiple of the request
        alignment) at the write pointer; returns the bytes written.  More
        than ``remaining`` is a ValueError before anything is written."""
        view = memoryview(data).cast("B")
        n = view.nbytes
        if n % self._align:
            raise ValueError(f"zone write of {n} bytes: must be a multiple of request-alignment "
                             f"({self._align})")
        if n > self.remaining:
            raise ValueError(f"zone write of {n} bytes: only {self.remaining} bytes are left in "
                             f"the writer's {self._nr} zone(s) from {self._first}")
        pos = 0
        while pos < n:
            room = self._left_in(self._index)
            if room == 0:
                self._index += 1
                continue
            take = min(room, n - pos, self._piece)
            wp = self._wp(self._index)
            try:
                self.device.write(wp, view[pos:pos + take], fua=fua)
            except OSError:
                self.sync()
                raise
            z = self._zones[self._index]
            z["write_pointer"] = wp + take
            z["state"] = ZoneState.FULL if wp + take == self._end(self._index) else ZoneState.IMP_OPEN
            pos += take
        while self._index < self._nr - 1 and self._left_in(self._index) == 0:
            self._index += 1
        return n

    def finish(self) -> None:
        """Seal the current zone if it is partly written (it becomes FULL;
        it no longer counts as open or active) and go on in the next one."""
        i = self._index
        z = self._zones[i]
        if z["state"] != ZoneState.EMPTY and self._left_in(i) > 0:
            self.device.finish_zone(int(z["start"]))
            z["state"] = ZoneState.FULL
        if self._index < self._nr - 1:
            self._index += 1

    def reset(self) -> None:
        """Reset the writer's zones that hold data; the next write goes to
        the start of the first."""
        for z in self._zones:
            if z["state"] != ZoneState.EMPTY:
                self.device.reset_zone(int(z["start"]))
        self.sync()

    def __repr__(self) -> str:
        return (f"<blkio.ZoneWriter zones {self._first}+{self._nr}x{self.device.zone_info.zone_size} "
                f"write_pointer={self.write_pointer} remaining={self.remaining}>")
