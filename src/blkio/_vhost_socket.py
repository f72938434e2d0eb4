"""A vhost-user backend's unix socket, as the kernel shows it to us.

Owns: the check that ``path`` is a unix socket before libblkio connects to it,
the kernel's view of the listener and of our connections to it (sock_diag),
and ``Handshake``, which bounds libblkio's connect by a deadline.  It may not
call libblkio nor close an fd libblkio owns: at the deadline it shuts the
socket down (through a duplicate), which makes libblkio's blocked read return
an error, and leaves the fd to libblkio.

Why connecting can block: libblkio 1.5.0 connects to the socket itself (no
``fd`` property, no timeout) and then reads the answer to its first message.
A vhost-user-blk export of qemu-storage-daemon serves one client at a time:
the next client waits in the listener's queue, unanswered, until the current
one disconnects.  When more clients wait than the listen backlog allows,
connect(2) itself blocks, where only a signal reaches it; so libblkio is not
called while the queue is full.
"""

from __future__ import annotations

import errno
import math
import numbers
import os
import socket
import stat
import struct
import threading
import time
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from .errors import Error, error_for

__all__ = ["Handshake", "check_connect_timeout", "check_socket_path", "connected_to"]

#: How often a wait re-checks the listener's queue, or looks for libblkio's
#: socket when connect(2) has not returned at the deadline (seconds).
POLL_INTERVAL = 0.05


def check_connect_timeout(timeout: object, name: str = "connect_timeout") -> Optional[float]:
    """``connect_timeout`` (or the timeout ``name``) as seconds, or None for
    no limit (TypeError, ValueError)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{name} takes seconds (a real number) or None, "
                        f"got {type(timeout).__name__}")
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"{name} must be > 0 seconds (None: no limit), got {timeout!r}")
    return None if math.isinf(timeout) else timeout


_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"))


def check_socket_path(driver: str, path: str) -> os.stat_result:
    """``path``'s stat when it is a unix socket; otherwise an OSError naming
    it: ENOENT when nothing is there (no waiting for it to appear), ENOTSOCK
    when it is something else."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error_for(errno.ENOENT, f"{driver}: no socket at this path (is the vhost-user "
                                      f"backend running? blkio does not wait for the socket "
                                      f"to appear)", path) from None
    except OSError as e:
        raise error_for(e.errno or errno.EIO, f"{driver}: cannot reach the socket", path) from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a socket")
        raise error_for(errno.ENOTSOCK, f"{driver}: the path is {kind}, not a unix socket "
                                        f"(a vhost-user backend's socket, e.g. qemu-storage-"
                                        f"daemon --export type=vhost-user-blk,addr.path=...)",
                        path)
    return st


# ---- the kernel's view: sock_diag ---------------------------------------------
# Linux's NETLINK_SOCK_DIAG for AF_UNIX (linux/sock_diag.h, linux/unix_diag.h):
# what `ss -x` shows.  Sockets bound to a path carry that file's inode.

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_UDIAG_SHOW_VFS, _UDIAG_SHOW_PEER, _UDIAG_SHOW_ICONS, _UDIAG_SHOW_RQLEN = 0x2, 0x4, 0x8, 0x10
_UNIX_DIAG_VFS, _UNIX_DIAG_PEER, _UNIX_DIAG_ICONS, _UNIX_DIAG_RQLEN = 1, 2, 3, 4
_TCP_LISTEN = 10
_NLMSG_HDR = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBHIIIII")
_DIAG_MSG = struct.Struct("=BBBBIII")
_RTATTR = struct.Struct("=HH")


class UnixSocket(NamedTuple):
    """One unix socket as sock_diag reports it."""

    listening: bool
    file: Optional[Tuple[int, int]]   #: (inode, kernel dev_t) of the file it is bound to
    peer: int                         #: its peer's socket inode (0: none)
    pending: Tuple[int, ...]          #: a listener's waiting clients (their socket inodes)
    queued: int                       #: a listener's number of them
    backlog: int                      #: a listener's listen() backlog


def unix_sockets() -> Optional[Dict[int, UnixSocket]]:
    """Every unix socket of this network namespace, by socket inode; None
    when the kernel does not answer (no unix_diag)."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    except OSError:
        return None
    with nl:
        req = _DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0,
                             _UDIAG_SHOW_VFS | _UDIAG_SHOW_PEER | _UDIAG_SHOW_ICONS
                             | _UDIAG_SHOW_RQLEN, 0xFFFFFFFF, 0xFFFFFFFF)
        try:
            nl.sendto(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY,
                                      _NLM_F_REQUEST_DUMP, 1, 0) + req, (0, 0))
            socks: Dict[int, UnixSocket] = {}
            while True:
                data = nl.recv(1 << 16)
                off = 0
                while off + _NLMSG_HDR.size <= len(data):
                    length, kind = _NLMSG_HDR.unpack_from(data, off)[:2]
                    if kind == _NLMSG_DONE:
                        return socks
                    if kind == _NLMSG_ERROR or length < _NLMSG_HDR.size:
                        return None
                    ino, sock = _parse(data, off + _NLMSG_HDR.size, off + length)
                    socks[ino] = sock
                    off += (length + 3) & ~3
                if not data:
                    return None
        except OSError:
            return None


def _parse(data: bytes, start: int, end: int) -> Tuple[int, UnixSocket]:
    _, _, state, _, ino, _, _ = _DIAG_MSG.unpack_from(data, start)
    file, peer, pending, queued, backlog = None, 0, (), 0, 0
    at = start + _DIAG_MSG.size
    while at + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, at)
        if length < _RTATTR.size:
            break
        payload = data[at + _RTATTR.size:at + length]
        if kind == _UNIX_DIAG_VFS and len(payload) >= 8:
            file = struct.unpack_from("=II", payload)
        elif kind == _UNIX_DIAG_PEER and len(payload) >= 4:
            peer = struct.unpack_from("=I", payload)[0]
        elif kind == _UNIX_DIAG_ICONS:
            pending = struct.unpack_from(f"={len(payload) // 4}I", payload)
        elif kind == _UNIX_DIAG_RQLEN and len(payload) >= 8:
            queued, backlog = struct.unpack_from("=II", payload)
        at += (length + 3) & ~3
    return ino, UnixSocket(state == _TCP_LISTEN, file, peer, pending, queued, backlog)


def _file_key(st: os.stat_result) -> Tuple[int, int]:
    """A socket file's (inode, dev_t) as sock_diag reports it: the kernel's
    dev_t packs major and minor as 12:20 bits, stat's st_dev as glibc's."""
    return (st.st_ino & 0xFFFFFFFF,
            (os.major(st.st_dev) << 20 | os.minor(st.st_dev)) & 0xFFFFFFFF)


def listener_queue_full(st: os.stat_result) -> bool:
    """Would connect(2) to the socket file block (its listener's queue of
    clients not yet accepted is full)?  False when unknown."""
    socks = unix_sockets()
    key = _file_key(st)
    for sock in (socks or {}).values():
        if sock.listening and sock.file == key:
            # unix_recvq_full(): the kernel queues one more than the backlog.
            return sock.queued > sock.backlog
    return False


def connected_to(fds: Iterable[int], st: os.stat_result, path: str) -> List[int]:
    """Those of ``fds`` (sockets of this process) connected to the listener
    of socket file ``st``: waiting in its queue or accepted by it."""
    fds = list(fds)
    socks = unix_sockets()
    if socks is None:
        return [fd for fd in fds if _peer_name_matches(fd, path)]
    key = _file_key(st)
    pending = {ino for sock in socks.values() if sock.listening and sock.file == key
               for ino in sock.pending}
    out = []
    for fd in fds:
        try:
            ino = os.fstat(fd).st_ino & 0xFFFFFFFF
        except OSError:
            continue
        mine = socks.get(ino)
        peer = socks.get(mine.peer) if mine is not None and mine.peer else None
        # A listener lists its waiting clients' sockets; the socket of an
        # accepted connection is bound to the listener's file.
        if ino in pending or (peer is not None and peer.file == key):
            out.append(fd)
    return out


def _peer_name_matches(fd: int, path: str) -> bool:
    """Without sock_diag: the peer's address (the path the backend bound,
    maybe relative to its directory) ends with our path's file name."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            if s.family != socket.AF_UNIX:
                return False
            name = s.getpeername()
    except OSError:
        return False
    if isinstance(name, bytes):
        name = os.fsdecode(name.rstrip(b"\0"))
    return bool(name) and os.path.basename(name) == os.path.basename(path)


def socket_inodes() -> Dict[int, int]:
    """This process's open sockets: fd -> socket inode."""
    out: Dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out[int(name)] = int(target[8:-1])
    return out


# ---- the handshake ---------------------------------------------------------------

# One connect at a time per socket file in this process: every connection to
# the same listener looks alike, so a concurrent one would be cut with ours.
_connecting_lock = threading.Lock()
_connecting: Dict[Tuple[int, int], List] = {}     # file key -> [lock, users]


class Handshake:
    """``with Handshake(driver, path, timeout) as h:`` around libblkio's
    connect to a vhost-user socket.

    On entry: the path must be a socket (``check_socket_path``); waits, up
    to the deadline, for other connects of this process to the same socket
    and for room in the listener's queue.  While inside, a watcher thread cuts
    the connection at the deadline (shutdown through a duplicate fd: libblkio's
    read returns an error; its fd stays its own).  ``h.error(e)`` turns
    libblkio's connect error into the one to raise, ``h.check()`` raises
    ETIMEDOUT if the cut came after all, ``h.backend_fds()`` are the sockets
    connect opened to the backend.  Exit stops and joins the watcher."""

    def __init__(self, driver: str, path: str, timeout: Optional[float]) -> None:
        self.driver, self.path = driver, path
        self.timeout = check_connect_timeout(timeout)
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self.cut = False
        self._done = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self._lock: Optional[List] = None
        self._before: frozenset = frozenset()

    def __enter__(self) -> "Handshake":
        self.st = check_socket_path(self.driver, self.path)
        self._key = _file_key(self.st)
        self._take_lock()
        try:
            if self.deadline is not None:
                while listener_queue_full(self.st):
                    self._sleep_until_deadline("its queue of waiting clients is full")
            self._before = frozenset(socket_inodes().values())
            if self.deadline is not None:
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name=f"blkio connect_timeout {self.path}")
                self._watcher.start()
        except BaseException:
            self._drop_lock()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stop()
        finally:
            self._drop_lock()

    # ---- what connect's caller asks ----------------------------------------

    def error(self, e: Error) -> Error:
        """The error to raise for libblkio's connect error ``e``."""
        self._stop()
        if self.cut:
            return self.timeout_error()
        if e.errno == errno.ECONNREFUSED:
            return error_for(errno.ECONNREFUSED, f"{self.driver}: nothing listens on the socket "
                                                 f"(left behind by a backend that exited?)",
                             self.path)
        return e

    def check(self) -> None:
        """After a connect that succeeded: ETIMEDOUT if the deadline cut it."""
        self._stop()
        if self.cut:
            raise self.timeout_error()

    def backend_fds(self) -> Tuple[int, ...]:
        """The sockets the connect opened to the backend (their hang-up
        means the backend died)."""
        new = [fd for fd, ino in socket_inodes().items() if ino not in self._before]
        return tuple(sorted(connected_to(new, self.st, self.path)))

    def timeout_error(self, why: str = "") -> Error:
        return error_for(
            errno.ETIMEDOUT,
            f"{self.driver}: no answer from the vhost-user backend within connect_timeout="
            f"{self.timeout:g} s{' (' + why + ')' if why else ''}.  An export may serve one "
            f"client at a time (qemu-storage-daemon's vhost-user-blk export does) and answer "
            f"the next only when the current one disconnects: is another program, or another "
            f"device of this one, using it?  connect_timeout=None waits without limit",
            self.path)

    # ---- inside ------------------------------------------------------------------

    def _stop(self) -> None:
        self._done.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None

    def _watch(self) -> None:
        """At the deadline, shut down our connection to the backend; if
        connect(2) has not returned yet, as soon as it has."""
        assert self.deadline is not None
        wait = self.deadline - time.monotonic()
        while not self._done.wait(max(wait, 0.0)):
            dups = []
            try:
                for fd, ino in socket_inodes().items():
                    if ino in self._before:
                        continue
                    try:
                        dup = os.dup(fd)
                    except OSError:
                        continue
                    dups.append(dup)
                    # The number may have been reused since it was listed.
                    if os.fstat(dup).st_ino != ino:
                        dups.pop()
                        os.close(dup)
                mine = connected_to(dups, self.st, self.path)
                if mine:
                    self.cut = True
                    for dup in mine:
                        try:
                            _shutdown(dup)
                        except OSError:
                            pass
                    return
            finally:
                for dup in dups:
                    os.close(dup)
            wait = POLL_INTERVAL

    def _take_lock(self) -> None:
        with _connecting_lock:
            entry = _connecting.setdefault(self._key, [threading.Lock(), 0])
            entry[1] += 1
        self._lock = entry
        try:
            ok = entry[0].acquire(timeout=-1 if self.deadline is None
                                  else max(self.deadline - time.monotonic(), 0.0))
        except BaseException:
            self._release_user()
            raise
        if not ok:
            self._release_user()
            raise self.timeout_error("another thread of this process is connecting to it")

    def _drop_lock(self) -> None:
        if self._lock is not None:
            self._lock[0].release()
            self._release_user()

    def _release_user(self) -> None:
        entry, self._lock = self._lock, None
        assert entry is not None
        with _connecting_lock:
            entry[1] -= 1
            if entry[1] == 0 and _connecting.get(self._key) is entry:
                del _connecting[self._key]

    def _sleep_until_deadline(self, why: str) -> None:
        assert self.deadline is not None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.timeout_error(why)
        time.sleep(min(left, POLL_INTERVAL))


def _shutdown(fd: int) -> None:
    """shutdown(2) both directions of the socket behind ``fd`` (not closing it)."""
    s = socket.socket(fileno=fd)
    try:
        s.shutdown(socket.SHUT_RDWR)
    finally:
        s.detach()
