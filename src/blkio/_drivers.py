"""The property catalogue: every property libblkio 1.5.0 documents, per driver.

libblkio has no introspection API, so this table is ours: each property's
libblkio name, its C type (which selects ``blkio_get_bool/int/uint64/str``),
and the instance states in which it can be read and written.  ``open()`` uses it
to apply each keyword argument in the stage it belongs to, and to reject bad
names, types and stages before libblkio runs.  Next to it, ``DRIVER_FACTS``:
what ``open()`` must know of each driver beyond its properties (the rules of
QEMU's per-driver connect functions), read by ``blkio._connect``.  It is data,
not logic.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Tuple

from ._handle import State

__all__ = ["DRIVERS", "DRIVER_FACTS", "STATES", "DriverFacts", "PropertySpec",
           "driver_properties", "lookup"]

DRIVERS: Tuple[str, ...] = (
    "io_uring",
    "nvme-io_uring",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
)

#: The states in which libblkio reads and writes properties, in order: after
#: blkio_create, blkio_connect, blkio_start (the values of the core's State,
#: which adds broken and closed: no property is used there).
STATES: Tuple[str, ...] = (State.CREATED.value, State.CONNECTED.value, State.STARTED.value)

_C, _N, _S = STATES
_ALL = frozenset(STATES)
_AFTER_CONNECT = frozenset((_N, _S))
_NONE: FrozenSet[str] = frozenset()


@dataclass(frozen=True)
class PropertySpec:
    """One libblkio property: its name, C type and where it can be used."""

    name: str                    #: libblkio's name, e.g. ``"num-entries"``
    type: str                    #: ``"bool"``, ``"int"``, ``"uint64"`` or ``"str"``
    readable: FrozenSet[str]     #: states in which ``blkio_get_*`` works
    writable: FrozenSet[str]     #: states in which ``blkio_set_*`` works
    doc: str = ""

    @property
    def python_type(self) -> builtins.type:
        """The Python type of values: bool, int or str."""
        return {"bool": bool, "int": int, "uint64": int, "str": str}[self.type]

    @property
    def set_stage(self) -> str | None:
        """The first state in which the property can be written, if any."""
        for state in STATES:
            if state in self.writable:
                return state
        return None


def _ro(name: str, type_: str, doc: str, readable: FrozenSet[str] = _AFTER_CONNECT) -> PropertySpec:
    return PropertySpec(name, type_, readable, _NONE, doc)


def _rw(name: str, type_: str, stage: str, doc: str) -> PropertySpec:
    # "rw <stage>, r <later stages>": readable from the stage it is set in onwards.
    readable = frozenset(STATES[STATES.index(stage):])
    return PropertySpec(name, type_, readable, frozenset((stage,)), doc)


_COMMON = (
    _ro("can-add-queues", "bool", "Queues can be added with add_queue()/add_poll_queue().", _ALL),
    _ro("driver", "str", "The driver name given to blkio_create().", _ALL),
    _rw("read-only", "bool", _C, "Requests other than read and flush fail with EBADF."),
    _ro("capacity", "uint64", "Size of the device in bytes."),
    _ro("max-queues", "int", "Maximum number of queues, poll queues included."),
    _rw("num-queues", "int", _N, "Number of queues (default 1)."),
    _rw("num-poll-queues", "int", _N, "Number of poll queues (default 0)."),
    _ro("supports-poll-queues", "bool", "The driver supports poll queues."),
    _ro("max-mem-regions", "uint64", "Maximum number of memory regions mapped at once."),
    _ro("may-pin-mem-regions", "bool", "The driver may pin memory-region pages."),
    _ro("mem-region-alignment", "uint64", "Alignment of memory-region address, iova and size (bytes)."),
    _ro("needs-mem-regions", "bool", "I/O buffers must lie in mapped memory regions."),
    _ro("needs-mem-region-fd", "bool", "Memory regions must be backed by a file descriptor."),
    _ro("optimal-io-alignment", "int", "Ideal request start/length alignment (bytes)."),
    _ro("optimal-io-size", "int", "Ideal request length (bytes), 0 if unspecified."),
    _ro("request-alignment", "int", "Request start and length must be multiples of this (bytes)."),
    _ro("flush-needed", "bool", "A flush is needed after writes for persistence."),
    _ro("buf-alignment", "int", "Buffer address and length alignment (bytes)."),
    _ro("can-grow", "bool", "I/O past the end grows the device (reads return zeros)."),
    _ro("max-segments", "int", "Maximum iovcnt of a request."),
    _ro("max-segment-len", "int", "Maximum length of one iovec (bytes), 0 if unspecified."),
    _ro("max-transfer", "int", "Maximum read/write length (bytes), 0 if unspecified."),
    _ro("optimal-buf-alignment", "int", "Ideal buffer alignment (bytes)."),
    _ro("supports-fua-natively", "bool", "Writes support BLKIO_REQ_FUA natively."),
    _ro("max-write-zeroes-len", "uint64", "Maximum write-zeroes length (bytes), 0 if unspecified."),
    _ro("discard-alignment", "int", "Discard start/length alignment (bytes)."),
    _ro("discard-alignment-offset", "int", "Offset of the first discardable block (bytes)."),
    _ro("max-discard-len", "uint64", "Maximum discard length (bytes), 0 if unspecified."),
)

_PATH = _rw("path", "str", _C, "Path of the file, device node, sysfs directory or socket.")
_FD = _rw("fd", "int", _C, "An open file descriptor; libblkio owns it after connect.")
_NUM_ENTRIES = _rw("num-entries", "int", _N, "Minimum io_uring SQ/CQ entries per queue (default 128).")
_VIRTIO = (
    _PATH,
    _ro("max-queue-size", "int", "Maximum virtqueue size of the device."),
    _rw("queue-size", "int", _N, "Virtqueue size (default 256)."),
)

_PER_DRIVER: Dict[str, Tuple[PropertySpec, ...]] = {
    "io_uring": (
        _rw("direct", "bool", _C, "Bypass the page cache with O_DIRECT (default false)."),
        _FD,
        _PATH,
        _NUM_ENTRIES,
    ),
    "nvme-io_uring": (
        _FD,
        _PATH,
        _NUM_ENTRIES,
        # Zoned storage (ZNS).  Names and types checked against libblkio 1.5.0
        # in the guest (tests/guest/in_guest/test_zoned_in_guest.py): hyphens,
        # not the underscores of its manual.  libblkio answers 0 for each of
        # them before connect, even on a zoned namespace, so they are readable
        # from connect on; connect and start give the same values.
        _ro("zoned", "int", "Zoned model: 0 none, 1 host-aware, 2 host-managed."),
        _ro("max-open-zones", "int", "Zones that can be open at once, 0 if unlimited."),
        _ro("max-active-zones", "int", "Zones that can be open or closed at once, 0 if unlimited."),
        _ro("zone-size", "uint64", "Bytes in each zone (0 if not zoned)."),
        _ro("nr-zones", "uint64", "Number of zones (0 if not zoned)."),
        _ro("append-support", "bool", "Zone append requests are supported."),
        _ro("zone-append-max-bytes", "uint64", "Maximum zone append length (bytes)."),
    ),
    "virtio-blk-vfio-pci": _VIRTIO,
    "virtio-blk-vhost-user": _VIRTIO,
    # Only vhost-vdpa accepts an fd among the virtio-blk drivers (libblkio 1.5.0).
    "virtio-blk-vhost-vdpa": _VIRTIO + (_FD,),
}



@dataclass(frozen=True)
class DriverFacts:
    """What ``open()`` must know of a driver beyond its property catalogue."""

    #: Selects the connect function (QEMU's three): ``"io_uring"``,
    #: ``"nvme-io_uring"`` or ``"virtio-blk"``.
    family: str
    #: ``open(fd=...)`` may stand in for ``path``; without it, ``path`` is
    #: required and ``fd`` refused (blkio opens the path itself).
    fd_instead_of_path: bool
    #: The driver always bypasses the page cache: ``direct=False`` is refused.
    refuses_buffered: bool
    #: blkio opens ``path`` (O_RDWR) and hands libblkio the fd, as QEMU does,
    #: where the driver has an ``fd`` property and accepts the ``fd = -1`` probe.
    passes_fd: bool
    #: The property giving the per-queue depth (request slots of a queue).
    queue_depth_property: str
    #: ``path`` is a backend daemon's unix socket (vhost-user): it is checked
    #: to be one before connecting, the handshake is bounded by open()'s
    #: ``connect_timeout``, and the device keeps the numbers of the sockets
    #: connect opened to tell a dead backend.
    path_is_daemon_socket: bool
    #: max-transfer is capped by the kernel's limit for the NVMe namespace
    #: (``_limits.nvme_max_transfer``): libblkio 1.5.0 reports 32 MiB regardless.
    nvme_max_transfer_cap: bool


def _virtio_blk(path_is_daemon_socket: bool = False) -> DriverFacts:
    return DriverFacts("virtio-blk", fd_instead_of_path=False, refuses_buffered=True,
                       passes_fd=True, queue_depth_property="queue-size",
                       path_is_daemon_socket=path_is_daemon_socket,
                       nvme_max_transfer_cap=False)


DRIVER_FACTS: Mapping[str, DriverFacts] = {
    # The path goes to libblkio so that it applies direct and read-only itself.
    "io_uring": DriverFacts("io_uring", fd_instead_of_path=True, refuses_buffered=False,
                            passes_fd=False, queue_depth_property="num-entries",
                            path_is_daemon_socket=False, nvme_max_transfer_cap=False),
    "nvme-io_uring": DriverFacts("nvme-io_uring", fd_instead_of_path=False,
                                 refuses_buffered=True, passes_fd=True,
                                 queue_depth_property="num-entries",
                                 path_is_daemon_socket=False, nvme_max_transfer_cap=True),
    "virtio-blk-vfio-pci": _virtio_blk(),
    "virtio-blk-vhost-user": _virtio_blk(path_is_daemon_socket=True),
    "virtio-blk-vhost-vdpa": _virtio_blk(),
}

_CATALOGUE: Dict[str, Dict[str, PropertySpec]] = {
    driver: {spec.name: spec for spec in _COMMON + _PER_DRIVER[driver]} for driver in DRIVERS
}


def _check_driver(driver: str) -> None:
    if not isinstance(driver, str):
        raise TypeError(f"a driver name is a str, not {type(driver).__name__}")
    if driver not in _CATALOGUE:
        raise ValueError(f"unknown driver {driver!r}; libblkio drivers are: {', '.join(DRIVERS)}")


def driver_properties(driver: str) -> Mapping[str, PropertySpec]:
    """Every property of ``driver``: name -> :class:`PropertySpec`.

    libblkio offers no way to list properties; this catalogue of the
    documented ones (libblkio 1.5.0) does.
    """
    _check_driver(driver)
    return dict(_CATALOGUE[driver])


def lookup(driver: str, name: str) -> PropertySpec:
    """The property ``name`` of ``driver``; ``_`` may stand for ``-``.

    Raises ValueError naming the property and the driver when it is unknown.
    """
    _check_driver(driver)
    if not isinstance(name, str):
        raise TypeError(f"a property name is a str, not {type(name).__name__}")
    props = _CATALOGUE[driver]
    spec = props.get(name) or props.get(name.replace("_", "-"))
    if spec is None:
        alias = name.replace("_", "-")
        shown = f"{name!r}" + (f" ({alias!r})" if alias != name else "")
        raise ValueError(
            f"unknown property {shown} for driver {driver!r}; "
            f"see blkio.driver_properties({driver!r})"
        )
    return spec
