"""asyncio glue: one queue of a device driven by the event loop.

    async with blkio.aio.open("io_uring", path="disk.img") as adev:
        data = await adev.read(0, 4096)
        await asyncio.gather(*(adev.write(i * 4096, data) for i in range(256)))

Everything a request needs -- checks, direct or bounced memory, splitting and
pipelining, the first-failure rule, advisory discard -- is the core's
transfer engine, the same as for blocking calls; this module only ties it to
the loop, through the core's one asyncio port (``_asyncport.AsyncPort``,
which also keeps the accounting of the batches in flight).  A
request is enqueued when its method is called (bad arguments raise there);
requests enqueued during one loop iteration go to libblkio in one
``blkioq_do_io`` call (like QEMU's plug/unplug); completions come through
the queue's completion fd (``loop.add_reader`` on a duplicate of it, so the
number the loop watches stays ours).  Bounce space is awaited in the pool's
FIFO without blocking the loop.  A cancelled await leaves its request in
flight, its memory held by the core until its completion arrives.

``read_batch``/``write_batch`` await a whole batch with one future and no
Python object per request: the queue's batch path, tagged with the batch's
number in the high 32 bits of ``user_data``.

A vhost-user backend that hangs up is noticed on the loop too.  Without
``reconnect``, the loop watches the backend's socket (through an epoll set
that asks for no events: readable only at a hang-up) and fails everything
in flight with EIO at once.  A device opened with ``reconnect=True``
reconnects on its own watcher thread and tells its reconnects' start and
end on an eventfd the loop watches: meanwhile the loop keeps running and
makes no call into the device (requests made then wait for the reconnect);
afterwards it watches the new completion fd, and everything that was in
flight completes as if nothing happened.

An AsyncDevice follows the running loop: awaited from another loop while
nothing is in flight, it moves its reader there (pytest-asyncio's loop per
test, notebooks); with requests in flight on a live loop it refuses.  Another
thread may close the device (or remove the queue) while requests are in
flight: their awaits then end with the result of the request if close
drained it, else with ``ValueError`` saying the device is closed.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
import types
import weakref
from asyncio import get_running_loop as _running_loop
from typing import Any, Awaitable, List, Optional, Sequence

import numpy as np

# (imported under private names: this module's public names are __all__'s)
from . import Device as _Device, Op as _Op, REQ_FUA as _REQ_FUA, open as _open_device
from ._checks import write_zeroes_flags as _write_zeroes_flags
from ._connect import (DEFAULT_CONNECT_TIMEOUT as _DEFAULT_CONNECT_TIMEOUT,
                       DEFAULT_RECONNECT_TIMEOUT as _DEFAULT_RECONNECT_TIMEOUT)
from ._asyncport import Reconnecting as _Reconnecting, async_port as _async_port
from ._zones import AsyncZonedMixin as _AsyncZonedMixin

__all__ = ["AsyncDevice", "open"]

_READ, _WRITE, _WRITE_ZEROES, _DISCARD, _FLUSH = _Op.READ, _Op.WRITE, _Op.WRITE_ZEROES, _Op.DISCARD, _Op.FLUSH

# A batch that completes during submission does not wait for the loop; such
# awaits yield to it once per this many bytes (a count, not a clock: the
# same program makes the same calls, however fast the machine runs it).
_SYNC_BYTES = 1 << 20


@types.coroutine
def _yield_once() -> Any:
    """Let the loop run one iteration (``asyncio.sleep(0)`` minus its coroutine)."""
    yield


class AsyncDevice(_AsyncZonedMixin):
    """Coroutine I/O on one queue of a :class:`blkio.Device`.

    ``spin_us`` > 0 busy-polls the queue for that many microseconds after
    submitting, before the loop sleeps on the completion fd (lower latency,
    more CPU; QEMU's poll handler does the same).
    """

    def __init__(self, device: _Device, queue: int = 0, *, spin_us: int = 0,
                 poll_us: Optional[int] = None) -> None:
        if not isinstance(device, _Device):
            raise TypeError(f"AsyncDevice drives a blkio.Device, not {type(device).__name__}")
        if poll_us is not None:
            import warnings
            warnings.warn("poll_us is deprecated; use spin_us", DeprecationWarning, stacklevel=2)
            spin_us = poll_us
        if isinstance(spin_us, bool) or not isinstance(spin_us, int) or spin_us < 0:
            raise ValueError(f"spin_us takes an int >= 0 (microseconds), got {spin_us!r}")
        self.device = device
        self._port = _async_port(device, queue)
        self.queue = self._port.queue
        self.spin_us = spin_us
        self._loop = _running_loop()
        self._closed = False
        self._fd = -1
        self._room: Optional[asyncio.Event] = None   # queue room freed (batch waves wait)
        self._sync_bytes = 0             # completed during submission since the last yield
        self._backend: Optional[select.epoll] = None   # the backend's sockets, for their hang-up
        self._events = -1               # a duplicate of the device's reconnect eventfd
        self._reconnected: Optional[asyncio.Event] = None   # set: a reconnect is in progress
        self._watch(self._loop)
        self._listen()

    def _listen(self) -> None:
        """Be told (on our loop) when the device is closed or the queue
        removed by someone else."""
        ref = weakref.ref(self)

        def queue_gone(orphans: List[Any]) -> None:
            adev = ref()
            if adev is not None:
                try:
                    adev._loop.call_soon_threadsafe(adev._device_gone, orphans)
                except RuntimeError:        # the loop is closed
                    pass
        self._port.on_gone(queue_gone)

    def __reduce__(self) -> Any:
        raise TypeError("a blkio.aio.AsyncDevice cannot be pickled: its device belongs to "
                        "this process; open the device in the other process")

    # ---- the loop ------------------------------------------------------------

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._port.bind(loop, self._flush, self._feed)
        self._watch_completions()
        self._watch_backend()

    def _watch_completions(self) -> None:
        # A duplicate: libblkio closes its fd when the device goes (or
        # reconnects), possibly from another thread, and the loop must never
        # watch a reused number.
        self._port.enable_fd()
        self._fd = os.dup(self._port.fd)
        self._loop.add_reader(self._fd, self._on_completion_fd)

    def _watch_backend(self) -> None:
        """A device that reconnects tells its reconnects' start and end on
        an eventfd (a duplicate is watched: its watcher thread sees the
        hang-up).  Otherwise the loop watches the backend's sockets through
        an epoll set of its own that asks for no events: it becomes readable
        only at a hang-up, libblkio's own messages never wake it, and no
        flag of the sockets changes (uvloop would make a socket handed to it
        non-blocking under libblkio)."""
        port = self._port
        if port.reconnects:
            self._events = os.dup(port.reconnect_fd)
            self._loop.add_reader(self._events, self._on_reconnect_event)
        elif port.backend_fds:
            self._backend = select.epoll()
            for fd in port.backend_fds:
                self._backend.register(fd, 0)
            self._loop.add_reader(self._backend.fileno(), self._on_backend)

    def _unwatch_backend(self) -> None:
        if self._backend is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._backend.fileno())
            self._backend.close()
            self._backend = None
        self._events = self._close_reader(self._events)

    def _release_completion_fd(self) -> None:
        self._fd = self._close_reader(self._fd)

    def _close_reader(self, fd: int) -> int:
        """Stop watching ``fd`` (our own descriptor, -1: none) and close it;
        returns -1 for the attribute that held it."""
        if fd >= 0:
            if not self._loop.is_closed():
                self._loop.remove_reader(fd)
            os.close(fd)
        return -1

    def _release_fd(self) -> None:
        self._port.on_gone(None)
        self._port.bind(None, None, None)
        self._release_completion_fd()
        self._unwatch_backend()

    def _follow(self, loop: asyncio.AbstractEventLoop) -> None:
        """Awaited from another loop than the one watching the fd: move
        there when nothing is in flight."""
        if self._closed:
            raise ValueError(f"{self.device.driver} device is closed")
        if self._port.in_flight and not self._loop.is_closed():
            raise ValueError(f"this AsyncDevice has {self._port.in_flight} request(s) in flight "
                             f"on another event loop; await them there first")
        self._release_fd()
        self._room = None
        self._watch(loop)
        self._listen()

    def _device_gone(self, orphans: List[Any]) -> None:
        """The device was closed (or our queue removed) by someone else:
        what close drained was routed; the rest fail, and the fd goes."""
        self._release_fd()
        self._closed = True
        self._port.orphaned(orphans)
        if self._room is not None:
            self._room.set()

    # ---- the backend's hang-up, and reconnecting --------------------------------

    def _on_backend(self) -> None:
        """The backend's socket hung up (a device that does not reconnect):
        everything in flight fails; route it."""
        if self._backend is None or not self._backend.poll(0):
            return
        self._unwatch_backend()
        self._port.hang_up()
        self._reap()

    def _on_reconnect_event(self) -> None:
        try:
            os.read(self._events, 8)
        except BlockingIOError:
            pass
        self._follow_reconnect()

    def _follow_reconnect(self) -> None:
        """Keep up with the device's reconnects: while one is in progress
        the loop makes no call into the device (the port's calls raise
        Reconnecting instead of waiting); once it is over -- seen or not --
        the new instance's completion fd is watched and what completed (or
        failed) meanwhile is routed."""
        port = self._port
        if port.reconnect_over(self._reconnected is not None):
            event, self._reconnected = self._reconnected, None
            port.pause(False)
            if not self._closed:
                self._release_completion_fd()
                try:
                    if port.usable:
                        self._watch_completions()
                except _Reconnecting:
                    pass                    # the next one began: below
                else:
                    self._reap()
            if event is not None:
                event.set()
        if port.reconnecting and self._reconnected is None and not self._closed:
            self._reconnected = asyncio.Event()
            port.pause(True)
            self._release_completion_fd()   # the old instance's: it signals nothing more

    async def _until_reconnected(self) -> None:
        """Before calling into the device: wait out a reconnect in progress."""
        while self._reconnected is not None:
            await self._reconnected.wait()

    async def _after_reconnect(self, submit: Any) -> Any:
        await self._until_reconnected()
        return await submit()

    async def _call(self, fn: Any, *args: Any) -> Any:
        """A port call from a coroutine: after a reconnect in progress."""
        while True:
            if self._reconnected is not None:
                await self._until_reconnected()
            try:
                return fn(*args)
            except _Reconnecting:
                self._follow_reconnect()

    # ---- completions ------------------------------------------------------------

    def _on_completion_fd(self) -> None:
        self._port.reset_fd(self._fd)
        self._reap()

    def _reap(self) -> None:
        port = self._port
        if self._reconnected is not None or port.reconnecting:
            self._follow_reconnect()    # its end reaps
            return
        try:
            stuck, more = port.reap(self._fd)
        except _Reconnecting:
            self._follow_reconnect()    # its end reaps
            return
        except ValueError:
            if not (self.device.closed or port.gone):
                raise
            return                      # closed by another thread: queue_gone resolves the rest
        for t in stuck:
            self._loop.create_task(self._feed(t))
        if more:
            port.schedule_flush()
        if self._room is not None:
            self._room.set()

    def _flush(self) -> None:
        # Runs once per loop iteration in which requests were enqueued: one
        # blkioq_do_io submits them all (QEMU's plug/unplug).
        if self._closed or self._reconnected is not None:
            return
        if self.spin_us > 0 and self._port.in_flight:
            deadline = time.perf_counter() + self.spin_us / 1e6
            while time.perf_counter() < deadline:
                self._reap()
                if not self._port.in_flight:
                    break
        self._reap()

    async def _feed(self, t: Any) -> None:
        """A transfer waits for bounce space: await it in the pool's FIFO,
        then let the transfer go on (its future carries any failure)."""
        pool = self.device.bounce_pool
        while self._port.need(t):
            try:
                await self._until_reconnected()
                bounce = await pool.acquire_async(self._port.need(t))
                await self._call(self._port.refill, t, bounce)
            except BaseException as e:
                self._port.fail(t, e)
                return
            self._port.schedule_flush()

    # ---- requests -------------------------------------------------------------------

    def _submit(self, op: int, offset: Any, buf: Any, flags: int, length: Any = 0,
                chunk: Any = None, depth: Any = None, vectored: bool = False) -> "asyncio.Future[Any]":
        loop = _running_loop()
        if loop is not self._loop or self._closed:
            self._follow(loop)
        if self._reconnected is None:
            try:
                return self._port.submit(op, offset, buf, flags, length, chunk, depth, vectored)
            except _Reconnecting:
                self._follow_reconnect()
        return loop.create_task(self._after_reconnect(
            lambda: self._submit(op, offset, buf, flags, length, chunk, depth, vectored)))

    def readinto(self, offset: int, buf: Any, *, chunk: Optional[int] = None,
                 depth: Optional[int] = None) -> Awaitable[int]:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``; awaits the count.

        The request is enqueued when this is called (bad arguments raise
        here); the returned awaitable is a future, not a coroutine (wrap it
        in a coroutine for ``create_task``).  A read longer than a chunk is
        pipelined as in ``Device.readinto`` (``chunk``, ``depth``)."""
        if chunk is None and depth is None:
            fut = self._port.io(_READ, offset, buf, 0)     # the hot path: one call
            if fut is not None:
                return fut
        return self._submit(_READ, offset, buf, 0, 0, chunk, depth)

    async def read(self, offset: int, nbytes: int, *, chunk: Optional[int] = None,
                   depth: Optional[int] = None) -> np.ndarray:
        """Read ``nbytes`` at ``offset`` into a new array of mapped memory."""
        if self._reconnected is not None:
            await self._until_reconnected()
        if type(nbytes) is int and nbytes == 0:
            out = np.empty(0, np.uint8)
        else:
            out = self.device.alloc(nbytes)
        await self._submit(_READ, offset, out, 0, 0, chunk, depth)
        return out

    def write(self, offset: int, buf: Any, *, fua: bool = False, chunk: Optional[int] = None,
              depth: Optional[int] = None) -> Awaitable[int]:
        """Write ``buf`` at ``offset``; awaits the count.  Pipelined like
        ``readinto`` when longer than a chunk."""
        flags = _REQ_FUA if fua else 0
        if chunk is None and depth is None:
            fut = self._port.io(_WRITE, offset, buf, flags)     # the hot path, as in readinto
            if fut is not None:
                return fut
        return self._submit(_WRITE, offset, buf, flags, 0, chunk, depth)

    def readv(self, offset: int, bufs: Sequence[Any], *, chunk: Optional[int] = None,
              depth: Optional[int] = None) -> Awaitable[int]:
        """Vectored read (split and pipelined like ``readinto``); awaits the count."""
        return self._submit(_READ, offset, bufs, 0, 0, chunk, depth, True)

    def writev(self, offset: int, bufs: Sequence[Any], *, fua: bool = False,
               chunk: Optional[int] = None, depth: Optional[int] = None) -> Awaitable[int]:
        """Vectored write (split and pipelined like ``write``); awaits the count."""
        return self._submit(_WRITE, offset, bufs, _REQ_FUA if fua else 0, 0, chunk, depth, True)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                           may_unmap: bool = True, no_fallback: bool = False) -> None:
        """Write ``length`` zero bytes at ``offset``."""
        await self._submit(_WRITE_ZEROES, offset, None,
                           _write_zeroes_flags(fua, may_unmap, no_fallback), length)

    async def discard(self, offset: int, length: int) -> None:
        """Discard ``length`` bytes at ``offset`` (advisory: unsupported is success)."""
        await self._submit(_DISCARD, offset, None, 0, length)

    async def flush(self) -> None:
        """Make completed writes durable."""
        await self._submit(_FLUSH, 0, None, 0)

    # ---- zoned devices (the methods: _zones.AsyncZonedMixin) ----------------------

    async def _zone(self, op: int, offset: int = 0, zones: Any = None) -> int:
        loop = _running_loop()
        if loop is not self._loop or self._closed:
            self._follow(loop)
        fut = loop.create_future()
        need = await self._call(self._port.zone, op, offset, zones, fut)
        if need < 0:
            bounce = await self.device.bounce_pool.acquire_async(-need)
            try:
                await self._call(self._port.zone, op, offset, zones, fut, bounce)
            except BaseException:
                self.device.bounce_pool.release(bounce)
                raise
        self._port.schedule_flush()
        return await fut

    # ---- batches ---------------------------------------------------------------------

    def read_batch(self, offsets: Any, buffers: Any, *, region: Any = None,
                   blocksize: int = 0) -> Awaitable[int]:
        """Read one block per offset, all in flight at once; awaits the bytes read.

        ``offsets``: device offsets in bytes (any integer array or sequence;
        floats and bools are a TypeError); ``buffers``: a C-contiguous
        uint8[n, blocksize] array of memory from ``Device.alloc`` or
        ``Device.register``, row i receiving the block at ``offsets[i]`` --
        or, with ``region`` (such memory, 1-D uint8) and ``blocksize``,
        n byte offsets into ``region`` (see ``Queue.submit_reads``).
        One future for the whole batch, no Python object per request.

        Returns ``n * blocksize`` when every request succeeded.  If any
        failed, the await raises the ``OSError`` (``blkio.Error``) of the one
        with the lowest index, once all of the batch's requests have
        finished; its message names that offset, and the exception carries
        ``index``, ``offset`` and ``failed`` (how many failed).  Batches
        larger than the queue's free room are submitted in waves.  A
        cancelled await submits no further waves; requests already in flight
        stay there, and the batch keeps a reference to ``buffers`` (or
        ``region``) until the last of them completes.  Closing the device
        while a batch is awaited makes the await raise ``ValueError``."""
        return self._batch(_READ, offsets, buffers, 0, region, blocksize)

    def write_batch(self, offsets: Any, buffers: Any, *, fua: bool = False, region: Any = None,
                    blocksize: int = 0) -> Awaitable[int]:
        """Write row i of ``buffers`` at ``offsets[i]`` for every i; awaits the
        bytes written.  As ``read_batch`` otherwise (``fua``: each write is
        durable when it completes)."""
        return self._batch(_WRITE, offsets, buffers, _REQ_FUA if fua else 0, region, blocksize)

    async def _batch(self, op: int, offsets: Any, buffers: Any, flags: int, region: Any,
                     blocksize: int) -> int:
        loop = _running_loop()
        if loop is not self._loop or self._closed:
            self._follow(loop)
        if self._reconnected is not None:
            await self._until_reconnected()
        port = self._port
        try:
            # The common one is submitted here at once (see AsyncPort.start_batch).
            b = port.start_batch(op, offsets, buffers, flags, region, blocksize)
        except _Reconnecting:
            self._follow_reconnect()
            b = await self._call(port.start_batch, op, offsets, buffers, flags, region, blocksize)
        if type(b) is int:
            nbytes = b
        else:
            error: Optional[BaseException] = None
            waited = False
            try:
                if b.submitted:
                    self._reap()        # the solo batch: route what is done, arm the fd
                while not b.submitted:
                    while port.batch_room == 0:
                        await self._wait_room()
                        if self._closed:
                            raise port.closed_during(b)
                    try:
                        await self._call(port.wave, b)
                    except Exception as e:
                        port.wave_failed(b, e)
                        error = e       # nothing of this wave was submitted
                        break
                    if b.left:
                        self._reap()
                    elif port.reconnecting:
                        self._follow_reconnect()    # the reconnect's end takes the rest
                if b.left:
                    if self._closed:
                        raise port.closed_during(b)
                    fut = self._loop.create_future()
                    port.await_batch(b, fut)
                    await fut
                    waited = True
            finally:
                port.end_batch(b)       # cancelled: reaping drops it at its end
            if error is not None:
                raise error
            if waited:
                self._sync_bytes = 0
                return port.batch_result(b)
            nbytes = b.nbytes
        self._sync_bytes += nbytes      # yield now and then: cached reads never wait
        if self._sync_bytes >= _SYNC_BYTES:
            self._sync_bytes = 0
            await _yield_once()
        return b if type(b) is int else port.batch_result(b)

    async def _wait_room(self) -> None:
        """Until a reap may have freed room in the queue (a batch wave waits)."""
        if self._room is None:
            self._room = asyncio.Event()
        self._room.clear()
        await self._room.wait()

    # ---- memory and lifecycle -------------------------------------------------------

    def alloc(self, nbytes: int) -> np.ndarray:
        """Memory mapped into the device (see ``Device.alloc``)."""
        return self.device.alloc(nbytes)

    @property
    def capacity(self) -> int:
        """Device size in bytes."""
        return self.device.capacity

    def detach(self) -> None:
        """Stop driving the queue from this event loop, leaving the device
        open (for blocking use).  Requests must not be in flight (ValueError)."""
        if self._port.in_flight and not self.device.closed:
            raise ValueError(f"{self._port.in_flight} request(s) still in flight; "
                             f"await them before detaching")
        self._closed = True
        self._release_fd()

    async def aclose(self) -> None:
        """Wait for requests in flight, then close the device."""
        if self._closed:
            self._release_fd()
            return
        while self._port.in_flight and not self.device.closed:
            await asyncio.sleep(0.01)
            self._reap()
        self._closed = True
        self._release_fd()
        await _running_loop().run_in_executor(None, self.device.close)

    async def __aenter__(self) -> "AsyncDevice":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<blkio.aio.AsyncDevice {self.device!r} queue={self.queue.index}>"


class _Opener:
    """``open(...)`` is both awaitable and an async context manager."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self._args, self._kwargs = args, kwargs
        self._adev: Optional[AsyncDevice] = None

    async def _open(self) -> AsyncDevice:
        kwargs = dict(self._kwargs)
        spin_us, poll_us, queue = kwargs.pop("spin_us"), kwargs.pop("poll_us"), kwargs.pop("queue")
        # Connecting can block (a vhost-user handshake): do it off the loop.
        dev = await _running_loop().run_in_executor(None, lambda: _open_device(*self._args, **kwargs))
        try:
            return AsyncDevice(dev, queue, spin_us=spin_us, poll_us=poll_us)
        except BaseException:
            dev.close()
            raise

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncDevice:
        self._adev = await self._open()
        return self._adev

    async def __aexit__(self, *exc: Any) -> None:
        assert self._adev is not None
        await self._adev.aclose()


def open(driver: str, path: Optional[str] = None, *, spin_us: int = 0,
         poll_us: Optional[int] = None, queue: int = 0,
         connect_timeout: Optional[float] = _DEFAULT_CONNECT_TIMEOUT, reconnect: bool = False,
         reconnect_timeout: Optional[float] = _DEFAULT_RECONNECT_TIMEOUT,
         **kwargs: Any) -> _Opener:
    """Open a device for asyncio: ``async with blkio.aio.open(...) as adev``
    (or ``adev = await blkio.aio.open(...)`` and ``await adev.aclose()``).
    Arguments are those of :func:`blkio.open`, plus ``spin_us`` (``poll_us``,
    deprecated) and ``queue``.  The device is opened in the loop's default
    executor, so a vhost-user handshake that waits (``connect_timeout``, as
    in :func:`blkio.open`) does not block the loop; with ``reconnect=True``
    a daemon restart is waited out there too (``reconnect_timeout``)."""
    return _Opener((driver, path), dict(kwargs, spin_us=spin_us, poll_us=poll_us, queue=queue,
                                        connect_timeout=connect_timeout, reconnect=reconnect,
                                        reconnect_timeout=reconnect_timeout))
