"""The per-driver steps of ``open()``, as QEMU's block/blkio.c has them.

Owns: the per-driver argument rules (checked before a Device exists), one
connect function per driver family (io_uring; nvme-io_uring; the virtio-blk
family, with fd passing, the EINVAL retry for libblkio <= 1.3 and, where
the path is a backend daemon's socket (vhost-user), the connect bounded by
``connect_timeout`` and the backend's sockets to watch), the table that
picks one by driver, the driver's max-transfer cap, and which drivers may
``reconnect``.  The socket itself
(what it is, who waits on it, cutting a handshake) is ``_vhost_socket``'s.
What differs between drivers is read from ``_drivers.DRIVER_FACTS``, never
from a driver name.
It may not: touch a device other than through its core's lifecycle
primitives (``set``, ``get``, ``connect``), nor do any step common to all
drivers (those are ``open()``'s).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

from ._drivers import DRIVER_FACTS, DRIVERS, driver_properties
from .errors import Error, error_for
from ._limits import nvme_max_transfer
from ._vhost_socket import Handshake, check_connect_timeout

if TYPE_CHECKING:
    from ._device import DeviceCore

__all__ = ["CONNECT", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_RECONNECT_TIMEOUT", "check_arguments",
           "check_connect_timeout", "check_reconnect", "max_transfer_cap"]

#: open()'s default ``connect_timeout`` (seconds): ample for a backend that
#: answers late (a socket-activated daemon starting, a previous client of a
#: one-client export disconnecting), short enough that a busy export is an
#: error, not a hang.
DEFAULT_CONNECT_TIMEOUT = 30.0

#: open()'s default ``reconnect_timeout`` (seconds): a daemon restarted by a
#: service manager or an upgrade is back within seconds; a device that waits
#: longer holds every caller's requests for that long before failing them.
DEFAULT_RECONNECT_TIMEOUT = 30.0

#: A connect function: (device, driver, path, user fd, direct, connect
#: timeout in seconds or None) -> the device's backend fds.  Called when the
#: device is created and its created-stage properties are set; it leaves the
#: device connected, or raises.
ConnectFunction = Callable[["DeviceCore", str, Optional[str], Optional[int], Optional[bool],
                            Optional[float]], Tuple[int, ...]]


def check_arguments(driver: str, path: Optional[str], fd: Optional[int],
                    direct: Optional[bool]) -> None:
    """The driver's rules for ``path``, ``fd`` and ``direct`` (ValueError)."""
    facts = DRIVER_FACTS[driver]
    if path is None and (fd is None or not facts.fd_instead_of_path):
        alternative = " (or 'fd')" if facts.fd_instead_of_path else ""
        raise ValueError(f"driver {driver!r} needs 'path'{alternative}")
    if path is not None and fd is not None and facts.fd_instead_of_path:
        raise ValueError(f"driver {driver!r} takes 'path' or 'fd', not both")
    if direct is False and facts.refuses_buffered:
        raise ValueError(f"driver {driver!r} cannot run with direct=False "
                         f"(it always bypasses the page cache)")
    if fd is not None and not facts.fd_instead_of_path:
        raise ValueError(f"driver {driver!r}: pass 'path'; blkio opens it and passes an fd "
                         f"itself where libblkio accepts one")


def check_reconnect(driver: str, reconnect: object, timeout: object) -> Optional[float]:
    """open()'s ``reconnect`` (a bool, True only where the path is a
    daemon's socket: there is nothing to reconnect to elsewhere) and
    ``reconnect_timeout`` (seconds, or None); returns the timeout."""
    if not isinstance(reconnect, bool):
        raise TypeError(f"reconnect takes a bool, got {type(reconnect).__name__}")
    seconds = check_connect_timeout(timeout, "reconnect_timeout")
    if reconnect and not DRIVER_FACTS[driver].path_is_daemon_socket:
        daemons = ", ".join(d for d in DRIVERS if DRIVER_FACTS[d].path_is_daemon_socket)
        raise ValueError(f"reconnect=True: driver {driver!r} has no backend daemon to reconnect "
                         f"to (drivers that have one: {daemons})")
    return seconds


def max_transfer_cap(driver: str, path: Optional[str]) -> int:
    """What lowers the driver's max-transfer below libblkio's (bytes, 0: none)."""
    if DRIVER_FACTS[driver].nvme_max_transfer_cap and path:
        return nvme_max_transfer(path)
    return 0


# ---- connect functions ------------------------------------------------------

def connect_io_uring(dev: "DeviceCore", driver: str, path: Optional[str],
                     fd: Optional[int], direct: Optional[bool],
                     connect_timeout: Optional[float]) -> Tuple[int, ...]:
    """Give libblkio the path (it applies direct and read-only) or the caller's
    fd.  Opening a file waits for no peer: no timeout applies."""
    if direct:
        dev.set("direct", "bool", True)
    if fd is not None:
        dev.set("fd", "int", fd)
    else:
        dev.set("path", "str", path)
    try:
        dev.connect()
    except Error as e:
        # libblkio's errno for a missing file varies; name it for what it is.
        missing = not os.path.exists(path) if path else False
        raise _connect_error(e, path, fd, errno.ENOENT if missing else None) from None
    return ()


def connect_nvme_io_uring(dev: "DeviceCore", driver: str, path: Optional[str],
                          fd: Optional[int], direct: Optional[bool],
                          connect_timeout: Optional[float]) -> Tuple[int, ...]:
    """The char device is opened here and passed as an fd where libblkio takes
    one.  No timeout applies: opening it waits for no peer."""
    assert path is not None     # check_arguments
    _connect_passing_fd(dev, driver, path)
    return ()


def connect_virtio_blk(dev: "DeviceCore", driver: str, path: Optional[str],
                       fd: Optional[int], direct: Optional[bool],
                       connect_timeout: Optional[float]) -> Tuple[int, ...]:
    """vfio-pci, vhost-user, vhost-vdpa: fd passing where libblkio takes an fd.
    Where the path is a daemon's socket (vhost-user), it must be a socket,
    the handshake is bounded by ``connect_timeout`` and the sockets connect
    opened are the backend's.  vfio-pci and vhost-vdpa wait for no peer (a
    device in use is EBUSY at once): no timeout applies."""
    assert path is not None     # check_arguments
    if not DRIVER_FACTS[driver].path_is_daemon_socket:
        _connect_passing_fd(dev, driver, path)
        return ()
    with Handshake(driver, path, connect_timeout) as handshake:
        try:
            _connect_passing_fd(dev, driver, path)
        except Error as e:
            raise handshake.error(e) from None
        handshake.check()
        return handshake.backend_fds()


_BY_FAMILY: Dict[str, ConnectFunction] = {
    "io_uring": connect_io_uring,
    "nvme-io_uring": connect_nvme_io_uring,
    "virtio-blk": connect_virtio_blk,
}

#: The connect function of each driver (QEMU's blkio_file_open table).
CONNECT: Dict[str, ConnectFunction] = {
    driver: _BY_FAMILY[DRIVER_FACTS[driver].family] for driver in DRIVERS
}


# ---- helpers ----------------------------------------------------------------

def _connect_error(e: Error, path: Optional[str], fd: Optional[int] = None,
                   code: Optional[int] = None) -> Error:
    """libblkio's connect error (its errno unless ``code`` is given), naming
    what was connected to."""
    where = f"path={path!r}" if path is not None else f"fd={fd}"
    code = code if code is not None else e.errno or errno.EIO   # the core always sets errno
    return error_for(code, f"{e.strerror} ({where})", path)


def _connect_passing_fd(dev: "DeviceCore", driver: str, path: str) -> None:
    """Connect with an fd we open (QEMU does, for fd passing; read-only is
    enforced by the read-only property), else with the path.  Our fd is
    libblkio's once connect succeeds; on failure it is closed."""
    fd, identity = -1, None
    if DRIVER_FACTS[driver].passes_fd and "fd" in driver_properties(driver) and _fd_supported(dev):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise error_for(errno.ENOENT, f"{driver}: no such path", path) from None
        except OSError:
            fd = -1     # not openable as a file (a socket...): let libblkio try
    try:
        if fd >= 0:
            identity = _fd_identity(fd)
            dev.set("fd", "int", fd)
        else:
            dev.set("path", "str", path)
        try:
            try:
                dev.connect()
            except Error as e:
                if e.errno != errno.EINVAL or fd < 0:
                    raise
                # libblkio <= 1.3 can only refuse an fd at connect: retry with the path.
                _close_if_ours(fd, identity)
                fd = -1
                dev.set("fd", "int", -1)
                dev.set("path", "str", path)
                dev.connect()
        except Error as e:
            raise _connect_error(e, path) from None
    except BaseException:
        if fd >= 0:
            _close_if_ours(fd, identity)
        raise


def _fd_supported(dev: "DeviceCore") -> bool:
    """Probe as QEMU does: a driver that accepts ``fd = -1`` takes fds."""
    try:
        dev.set("fd", "int", -1)
    except OSError:
        return False
    return True


def _fd_identity(fd: int) -> Tuple[int, int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_rdev)


def _close_if_ours(fd: int, identity: Optional[Tuple[int, int, int]]) -> None:
    """Close an fd we opened, unless libblkio already closed it on a failed
    connect (the number may have been reused since: compare identities)."""
    try:
        if identity is not None and _fd_identity(fd) != identity:
            return
        os.close(fd)
    except OSError:
        pass

