"""blkio: fast block I/O from Python through libblkio.

    import blkio
    with blkio.open("io_uring", path="disk.img", direct=True) as dev:
        buf = dev.alloc(4096)            # numpy uint8, mapped into the device
        dev.readinto(0, buf)             # GIL released while waiting
        dev.write(4096, buf, fua=True)
        print(dev.capacity, dev.limits.request_alignment)

``open`` applies keyword properties in the stage libblkio allows them (the
catalogue in ``blkio._drivers`` knows each one), connects and starts the
device.  ``Device`` has blocking I/O on queue 0, ``queue(i)`` for many requests
in flight, ``alloc``/``register`` for zero-copy memory and a bounce pool for
memory the driver cannot use directly.  Per-driver steps of ``open`` are in
``blkio._connect``.  A ``Device`` holds its Cython core (``_device.DeviceCore``)
by composition; the core is the only code that touches libblkio (see
docs/architecture.md).
"""

from __future__ import annotations

import os as _os
import warnings as _warnings
from typing import Any, Dict, NamedTuple, Optional, Union

from . import _connect, errors
from ._checks import LIBBLKIO_VERSION, REQ_FUA, REQ_NO_FALLBACK, REQ_NO_UNMAP, Op
from ._device import DeviceCore as _DeviceCore
from ._drivers import DRIVER_FACTS, DRIVERS, STATES, PropertySpec, driver_properties, lookup as _lookup
from ._engine import Completion
from ._handle import State
from ._limits import Limits, nvme_max_transfer as _nvme_max_transfer, read_limits as _read_limits
from ._memory import Buffer
from ._public import (BouncePool, DeviceFront as _DeviceFront, Queue, add_queue as _add_queue,
                      bind as _bind, core_of as _core_of, remove_queue as _remove_queue)
from ._zoneops import ZONED_MODELS as _ZONED_MODELS
from ._zones import (NOT_ZONED as _NOT_ZONED, ZONE_DTYPE, ZoneInfo, ZoneState, ZoneType, ZoneWriter,
                     ZonedMixin as _ZonedMixin, read_zone_info as _read_zone_info)
from .errors import Error, ReadOnlyError

__all__ = [
    "DRIVERS", "STATES", "LIBBLKIO_VERSION", "Buffer", "BouncePool", "Completion",
    "Device", "Error", "Limits", "Op", "PropertySpec", "Queue", "ReadOnlyError", "REQ_FUA",
    "REQ_NO_FALLBACK", "REQ_NO_UNMAP", "State", "Stats", "ZONE_DTYPE", "ZoneInfo", "ZoneState",
    "ZoneType", "ZoneWriter", "driver_properties", "errors", "open",
]
from ._version import version as __version__


def __getattr__(name: str) -> Any:
    # ``import blkio`` is enough to reach ``blkio.aio``; asyncio is imported
    # only when it is used.
    if name == "aio":
        import importlib
        return importlib.import_module(".aio", __name__)
    raise AttributeError(f"module 'blkio' has no attribute {name!r}")

_INT32 = (-(2**31), 2**31 - 1)
_UINT64 = (0, 2**64 - 1)


class Stats(NamedTuple):
    """Counters of a device since it was opened."""

    requests: int        #: requests handed to libblkio
    bounced_requests: int  #: of which went through the bounce pool
    bounced_bytes: int   #: bytes copied through the bounce pool
    split_requests: int  #: pieces of requests split at max-transfer / bounce size
    reconnects: int = 0  #: times the device reconnected to a restarted backend (``reconnect=True``)
    resubmitted: int = 0  #: requests in flight at a hang-up, handed to the new connection


def _check_value(driver: str, spec: PropertySpec, value: Any) -> Any:
    """Type- and range-check a property value; ValueError names the property."""
    want = spec.python_type
    if spec.name == "path" and isinstance(value, _os.PathLike):
        value = _os.fspath(value)
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
        raise ValueError(f"property {spec.name!r} of driver {driver!r} takes a {spec.type}, "
                         f"got {type(value).__name__} {value!r}")
    if spec.type == "int" and not _INT32[0] <= value <= _INT32[1]:
        raise ValueError(f"property {spec.name!r} of driver {driver!r}: {value} is out of int range")
    if spec.type == "uint64" and not _UINT64[0] <= value <= _UINT64[1]:
        raise ValueError(f"property {spec.name!r} of driver {driver!r}: {value} is out of uint64 range")
    return value


def _writable_spec(driver: str, name: str) -> PropertySpec:
    spec = _lookup(driver, name)
    if not spec.writable:
        raise ValueError(f"property {spec.name!r} of driver {driver!r} is read-only")
    return spec


_OPENER = object()     # the token open() passes to Device()


class Device(_DeviceFront, _ZonedMixin):
    """An open libblkio device (created → connected → started → closed).

    Made by :func:`open`.  Blocking I/O (``read``, ``readinto``, ``write``,
    ``readv``, ``writev``, ``write_zeroes``, ``discard``, ``flush``) runs on
    the calling thread's queue with the GIL released; offsets and lengths
    must be multiples of ``limits.request_alignment`` and stay within
    ``capacity`` (ValueError otherwise; a device that can grow takes writes
    past its end).  Any buffer works; memory the driver cannot use directly
    is bounced through ``bounce_pool``, and ``alloc``/``register`` avoid
    that.  Zoned devices: ``zoned``, ``zone_info``, ``report_zones``,
    ``open_zone``/``close_zone``/``finish_zone``/``reset_zone`` and their
    ``*_all_zones`` forms, ``zone_writer``.  A device belongs to the process
    that opened it: after ``fork()`` the child must open its own.
    """

    path: Optional[str]
    _limits: Optional[Limits]

    def __init__(self, *args: Any, _opener: object = None, **kwargs: Any) -> None:
        # Only open() makes devices (it drives the core through its
        # lifecycle): a Device built directly would be a half-made object.
        if _opener is not _OPENER:
            raise TypeError("blkio.Device cannot be built directly; use blkio.open()")
        self.path = kwargs.get("path")
        self._limits = None
        self._zone_info = _NOT_ZONED

    # ---- properties ------------------------------------------------------

    def get(self, name: str) -> Union[bool, int, str]:
        """Read a libblkio property (``"num-entries"`` or ``"num_entries"``)."""
        spec = self._spec_now(name, writing=False)
        return _core_of(self).get(spec.name, spec.type)

    def set(self, name: str, value: Union[bool, int, str]) -> None:
        """Write a libblkio property, in a state where libblkio allows it."""
        spec = self._spec_now(name, writing=True)
        _core_of(self).set(spec.name, spec.type, _check_value(self.driver, spec, value))

    def _spec_now(self, name: str, writing: bool) -> PropertySpec:
        """The catalogue's entry for ``name``, if it can be read (or written)
        in the device's present state."""
        self._ensure_open()
        spec = _writable_spec(self.driver, name) if writing else _lookup(self.driver, name)
        states = spec.writable if writing else spec.readable
        if self.state not in states:
            raise ValueError(f"property {spec.name!r} of driver {self.driver!r} can only be "
                             f"{'set' if writing else 'read'} when the device is "
                             f"{'/'.join(sorted(states)) or 'never'}; it is {self.state}")
        return spec

    def properties(self) -> Dict[str, Union[bool, int, str]]:
        """Every property readable in the current state, by libblkio name."""
        self._ensure_open()
        core = _core_of(self)
        out: Dict[str, Union[bool, int, str]] = {}
        for name, spec in driver_properties(self.driver).items():
            if self.state in spec.readable:
                try:
                    out[name] = core.get(name, spec.type)
                except OSError:
                    pass    # e.g. may-pin-mem-regions on drivers that lack it
        return out

    @property
    def limits(self) -> Limits:
        """The device's validated :class:`Limits` (read at start)."""
        if self._limits is None:
            raise ValueError("device is not started")
        return self._limits

    def refresh_limits(self) -> Limits:
        """Re-read and re-validate the limits and the capacity."""
        self._ensure_open()
        core = _core_of(self)
        cap = _nvme_max_transfer(self.path) if self.driver == "nvme-io_uring" and self.path else 0
        limits = _read_limits(self._get_named, cap)
        self._limits = limits
        core.refresh(core.get("capacity", "uint64"))
        return limits

    def _set_zone_info(self, info: ZoneInfo) -> None:
        """The zone geometry (read at open), for the facade and the core's checks."""
        self._zone_info = info
        _core_of(self).configure_zones(_ZONED_MODELS.index(info.model), info.zone_size,
                                       info.nr_zones)

    def _get_named(self, name: str) -> Any:
        return _core_of(self).get(name, _lookup(self.driver, name).type)

    def _ensure_open(self) -> None:
        if self.closed:
            _core_of(self).get("capacity", "uint64")    # raises the reason (closed, forked)
            raise ValueError(f"{self.driver} device is closed")

    @property
    def stats(self) -> Stats:
        """Request and bounce counters."""
        return Stats(*_core_of(self).stats)

    # ---- queues ----------------------------------------------------------

    def add_queue(self) -> Queue:
        """Add a queue at run time (drivers with ``can-add-queues``)."""
        self._require_can_add()
        return _add_queue(self, False)

    def add_poll_queue(self) -> Queue:
        """Add a poll queue at run time (drivers with ``can-add-queues``)."""
        self._require_can_add()
        if not self.limits.supports_poll_queues:
            raise ValueError(f"driver {self.driver!r} does not support poll queues here")
        return _add_queue(self, True)

    def remove_queue(self, queue: Queue, timeout: float = 10.0) -> None:
        """Remove a queue; requests in flight are waited for (up to
        ``timeout`` seconds) first."""
        if not isinstance(queue, Queue):
            raise TypeError(f"remove_queue takes a blkio.Queue, not {type(queue).__name__}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
        _remove_queue(self, queue, float(timeout))

    def _require_can_add(self) -> None:
        self._ensure_open()
        if not _core_of(self).get("can-add-queues", "bool"):
            raise ValueError(f"driver {self.driver!r} cannot add queues (can-add-queues is false)")

    # ---- lifecycle -------------------------------------------------------

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not self.closed:
            _warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        where = f" path={self.path!r}" if self.path is not None else ""
        try:
            state = self.state
        except ValueError:
            return f"<blkio.Device (not opened)>"
        if state == "started":
            return f"<blkio.Device {self.driver}{where} capacity={self.capacity} started>"
        return f"<blkio.Device {self.driver}{where} {state}>"


def open(driver: str, path: Optional[Union[str, "_os.PathLike[str]"]] = None, *,
         fd: Optional[int] = None, read_only: bool = False, direct: Optional[bool] = None,
         num_queues: int = 1, num_poll_queues: int = 0, spin_us: int = 0,
         poll_us: Optional[int] = None,
         connect_timeout: Optional[float] = _connect.DEFAULT_CONNECT_TIMEOUT,
         reconnect: bool = False,
         reconnect_timeout: Optional[float] = _connect.DEFAULT_RECONNECT_TIMEOUT,
         **properties: Any) -> Device:
    """Create, connect and start a libblkio device; returns a :class:`Device`.

    ``driver`` is one of :data:`DRIVERS`.  ``path`` is a file or block device
    (io_uring), a ``/dev/ngXnY`` char device (nvme-io_uring), a sysfs PCI
    directory (virtio-blk-vfio-pci), a unix socket (virtio-blk-vhost-user) or a
    ``/dev/vhost-vdpa-N`` device.  Other libblkio properties are keyword
    arguments with ``_`` for ``-`` (``num_entries=256``, ``queue_size=512``);
    each is set in the stage where libblkio accepts it.  Bad names, types,
    stages and per-driver rules raise ValueError before libblkio runs.
    ``spin_us`` sets :attr:`Device.spin_us` (busy-polling before waits sleep;
    ``poll_us`` is its deprecated name).

    ``connect_timeout`` (seconds, default 30; ``None``: no limit) bounds the
    wait for a virtio-blk-vhost-user backend to answer.  A vhost-user-blk
    export of qemu-storage-daemon serves one client at a time: another
    ``open`` of it waits until the current client disconnects, and past the
    timeout raises ``TimeoutError`` (``blkio.Error``, errno ETIMEDOUT) naming
    the socket.  Ctrl-C interrupts the wait (of an ``open`` in the main
    thread, where Python handles signals).  The socket must exist when
    ``open`` is called (``FileNotFoundError``, ENOENT, at once; ``open`` does
    not wait for a starting daemon to create it); a path that is not a unix
    socket is ``blkio.Error`` with errno ENOTSOCK, and a socket nobody
    listens on ``ConnectionRefusedError``.  The other drivers wait for no
    peer when connecting (vhost-vdpa and vfio-pci refuse a device in use
    with EBUSY at once), so the timeout does not apply to them.

    ``reconnect=True`` (virtio-blk-vhost-user only) survives a restart of
    the backend daemon: when it hangs up, the device waits up to
    ``reconnect_timeout`` seconds (default 30; ``None``: no limit) for the
    socket to come back, connects a new libblkio instance with the same
    properties, maps the same memory and resubmits every request that had
    not completed; calls in progress and new calls wait meanwhile, and see
    their requests complete.  Past the timeout everything in flight fails
    with EIO and the device is broken, as without ``reconnect``.  What a
    restart can lose (a daemon's own write cache) is in the drivers guide,
    "Daemon restarts".  ``Device.stats`` counts ``reconnects`` and
    ``resubmitted`` requests.
    """
    if poll_us is not None:
        _warnings.warn("poll_us is deprecated; use spin_us", DeprecationWarning, stacklevel=2)
        spin_us = poll_us
    path = _check_arguments(driver, path, fd, direct, num_queues, num_poll_queues, spin_us,
                            connect_timeout)
    reconnect_timeout = _connect.check_reconnect(driver, reconnect, reconnect_timeout)
    bring_up = _BringUp(driver, path, fd, direct, read_only, num_queues, num_poll_queues,
                        _stage_properties(driver, properties))
    dev = Device(_opener=_OPENER, path=path)
    core = _DeviceCore()
    _bind(dev, core)
    try:
        backend_fds = bring_up(core, connect_timeout)
        # Capacity is read once here: on vhost-user it is a daemon round trip.
        limits = bring_up.limits(core)
        dev._limits = limits
        depth = DRIVER_FACTS[driver].queue_depth_property
        core.configure(limits, core.get("capacity", "uint64"), core.get("read-only", "bool"),
                       backend_fds, core.get(depth, "int"))
        zone_info = _read_zone_info(dev._get_named, "zoned" in driver_properties(driver),
                                     dev.capacity, limits.request_alignment)
        dev._set_zone_info(zone_info)
        dev.spin_us = spin_us
        if reconnect:
            core.enable_reconnect(bring_up.reconnector(), reconnect_timeout)
        return dev
    except BaseException:
        core.close()
        raise


class _BringUp:
    """How ``open()`` brings an instance up -- create, the typed property
    writes of each stage, the driver's connect, start -- kept so that a
    device that reconnects brings up the next instance the same way."""

    def __init__(self, driver: str, path: Optional[str], fd: Optional[int],
                 direct: Optional[bool], read_only: bool, num_queues: int,
                 num_poll_queues: int, staged: Dict[str, list]) -> None:
        self.driver, self.path, self.fd, self.direct = driver, path, fd, direct
        self.read_only, self.num_queues, self.num_poll_queues = read_only, num_queues, num_poll_queues
        self.staged = staged

    def __call__(self, core: _DeviceCore, connect_timeout: Optional[float]) -> tuple:
        """Create, connect and start ``core``; returns its backend fds."""
        driver, path = self.driver, self.path
        core.create(driver)
        if self.read_only:
            core.set("read-only", "bool", True)   # must precede connect
        for spec, value in self.staged["created"]:
            core.set(spec.name, spec.type, value)
        backend_fds = _connect.CONNECT[driver](core, driver, path, self.fd, self.direct,
                                               connect_timeout)
        if self.num_poll_queues and not core.get("supports-poll-queues", "bool"):
            raise ValueError(f"driver {driver!r} does not support poll queues for {path!r} "
                             f"(supports-poll-queues is false); use num_poll_queues=0")
        core.set("num-queues", "int", self.num_queues)
        core.set("num-poll-queues", "int", self.num_poll_queues)
        for spec, value in self.staged["connected"]:
            core.set(spec.name, spec.type, value)
        core.start()
        return backend_fds

    def limits(self, core: _DeviceCore) -> Limits:
        return _read_limits(lambda name: core.get(name, _lookup(self.driver, name).type),
                            _connect.max_transfer_cap(self.driver, self.path))

    def reconnector(self) -> Any:
        """The connector a device that reconnects is given (see
        ``DeviceCore.enable_reconnect``): a new core brought up within the
        seconds it is given, with what its checks compare."""
        def connect(seconds: float) -> tuple:
            core = _DeviceCore()
            try:
                fds = self(core, seconds)
                return (core, fds, self.limits(core), core.get("capacity", "uint64"),
                        core.get("read-only", "bool"))
            except BaseException:
                core.close()
                raise
        return connect


def _check_arguments(driver: str, path: Optional[Union[str, "_os.PathLike[str]"]],
                     fd: Optional[int], direct: Optional[bool], num_queues: int,
                     num_poll_queues: int, spin_us: int,
                     connect_timeout: Optional[float] = None) -> Optional[str]:
    """Check open()'s own arguments (ValueError; TypeError for a wrong
    type); returns ``path`` as a str."""
    if not isinstance(driver, str):
        raise TypeError(f"a driver name is a str, not {type(driver).__name__}")
    if driver not in DRIVERS:
        raise ValueError(f"unknown driver {driver!r}; libblkio drivers are: {', '.join(DRIVERS)}")
    if path is not None:
        path = _os.fspath(path)
        if not isinstance(path, str):
            raise ValueError(f"property 'path' of driver {driver!r} takes a str")
    _connect.check_arguments(driver, path, fd, direct)
    if direct is not None and not isinstance(direct, bool):
        raise ValueError(f"property 'direct' of driver {driver!r} takes a bool")
    for name, value in (("num-queues", num_queues), ("num-poll-queues", num_poll_queues)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"property {name!r} of driver {driver!r} takes an int >= 0, got {value!r}")
    if isinstance(spin_us, bool) or not isinstance(spin_us, int) or spin_us < 0:
        raise ValueError(f"spin_us takes an int >= 0 (microseconds), got {spin_us!r}")
    if fd is not None and (isinstance(fd, bool) or not isinstance(fd, int)):
        raise TypeError(f"property 'fd' of driver {driver!r} takes an int (an open file "
                        f"descriptor), not {type(fd).__name__}")
    if fd is not None and not 0 <= fd < 2**31:
        raise ValueError(f"property 'fd' of driver {driver!r} takes an open file descriptor, "
                         f"got {fd}")
    _connect.check_connect_timeout(connect_timeout)
    return path


def _stage_properties(driver: str, properties: Dict[str, Any]) -> Dict[str, list]:
    """open()'s keyword properties, checked and sorted into the stage
    (created, connected) in which libblkio accepts them."""
    staged: Dict[str, list] = {"created": [], "connected": []}
    for key, value in properties.items():
        spec = _writable_spec(driver, key)
        if spec.name in ("path", "fd", "direct", "read-only", "num-queues", "num-poll-queues"):
            raise ValueError(f"pass {spec.name!r} of driver {driver!r} as open()'s own argument")
        stage = spec.set_stage
        if stage not in staged:
            raise ValueError(f"property {spec.name!r} of driver {driver!r} cannot be set at open")
        staged[stage].append((spec, _check_value(driver, spec, value)))
    return staged
