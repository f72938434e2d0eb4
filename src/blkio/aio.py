"""asyncio glue: one queue of a device driven by the event loop.

    async with blkio.aio.open("io_uring", path="disk.img") as adev:
        data = await adev.read(0, 4096)
        await asyncio.gather(*(adev.write(i * 4096, data) for i in range(256)))

Everything a request needs -- checks, direct or bounced memory, splitting and
pipelining, the first-failure rule, advisory discard -- is the core's
transfer engine, the same as for blocking calls; this module only ties it to
the loop, through the core's one asyncio port (``_asyncport.AsyncPort``,
which also keeps the accounting of the batches in flight); the loop's side
-- readers, reaping, reconnects, awaits off the hot path -- is
``_aioloop.LoopLink``.  A request is enqueued when its method is called (bad arguments raise there);
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
from asyncio import get_running_loop as _running_loop
from typing import Any, Awaitable, Optional, Sequence

import numpy as np

# (imported under private names: this module's public names are __all__'s)
from . import Device as _Device, Op as _Op, REQ_FUA as _REQ_FUA, open as _open_device
from ._checks import write_zeroes_flags as _write_zeroes_flags
from ._connect import (DEFAULT_CONNECT_TIMEOUT as _DEFAULT_CONNECT_TIMEOUT,
                       DEFAULT_RECONNECT_TIMEOUT as _DEFAULT_RECONNECT_TIMEOUT)
from ._aioloop import LoopLink as _LoopLink
from ._asyncport import async_port as _async_port
from ._zones import AsyncZonedMixin as _AsyncZonedMixin

__all__ = ["AsyncDevice", "open"]

_READ, _WRITE, _WRITE_ZEROES, _DISCARD, _FLUSH = _Op.READ, _Op.WRITE, _Op.WRITE_ZEROES, _Op.DISCARD, _Op.FLUSH


def _spin_us(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"spin_us takes an int >= 0 (microseconds), got {value!r}")
    return value


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
        spin_us = _spin_us(spin_us)
        self.device = device
        self._port = _async_port(device, queue)
        self.queue = self._port.queue
        self._link = _LoopLink(device, self._port, spin_us)

    @property
    def spin_us(self) -> int:
        """Microseconds the loop busy-polls the queue after submitting (0: never)."""
        return self._link.spin_us

    @spin_us.setter
    def spin_us(self, value: int) -> None:
        self._link.spin_us = _spin_us(value)

    def __reduce__(self) -> Any:
        raise TypeError("a blkio.aio.AsyncDevice cannot be pickled: its device belongs to "
                        "this process; open the device in the other process")

    # ---- requests -------------------------------------------------------------------

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
        return self._link.submit(_READ, offset, buf, 0, 0, chunk, depth)

    async def read(self, offset: int, nbytes: int, *, chunk: Optional[int] = None,
                   depth: Optional[int] = None) -> np.ndarray:
        """Read ``nbytes`` at ``offset`` into a new array of mapped memory."""
        if self._link.reconnected is not None:
            await self._link.until_reconnected()
        if type(nbytes) is int and nbytes == 0:
            out = np.empty(0, np.uint8)
        else:
            out = self.device.alloc(nbytes)
        await self._link.submit(_READ, offset, out, 0, 0, chunk, depth)
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
        return self._link.submit(_WRITE, offset, buf, flags, 0, chunk, depth)

    def readv(self, offset: int, bufs: Sequence[Any], *, chunk: Optional[int] = None,
              depth: Optional[int] = None) -> Awaitable[int]:
        """Vectored read (split and pipelined like ``readinto``); awaits the count."""
        return self._link.submit(_READ, offset, bufs, 0, 0, chunk, depth, True)

    def writev(self, offset: int, bufs: Sequence[Any], *, fua: bool = False,
               chunk: Optional[int] = None, depth: Optional[int] = None) -> Awaitable[int]:
        """Vectored write (split and pipelined like ``write``); awaits the count."""
        return self._link.submit(_WRITE, offset, bufs, _REQ_FUA if fua else 0, 0, chunk, depth, True)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                           may_unmap: bool = True, no_fallback: bool = False) -> None:
        """Write ``length`` zero bytes at ``offset``."""
        await self._link.submit(_WRITE_ZEROES, offset, None,
                           _write_zeroes_flags(fua, may_unmap, no_fallback), length)

    async def discard(self, offset: int, length: int) -> None:
        """Discard ``length`` bytes at ``offset`` (advisory: unsupported is success)."""
        await self._link.submit(_DISCARD, offset, None, 0, length)

    async def flush(self) -> None:
        """Make completed writes durable."""
        await self._link.submit(_FLUSH, 0, None, 0)

    # ---- zoned devices (the methods: _zones.AsyncZonedMixin) ----------------------

    def _zone(self, op: int, offset: int = 0, zones: Any = None) -> Awaitable[int]:
        return self._link.zone(op, offset, zones)

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
        return self._link.batch(_READ, offsets, buffers, 0, region, blocksize)

    def write_batch(self, offsets: Any, buffers: Any, *, fua: bool = False, region: Any = None,
                    blocksize: int = 0) -> Awaitable[int]:
        """Write row i of ``buffers`` at ``offsets[i]`` for every i; awaits the
        bytes written.  As ``read_batch`` otherwise (``fua``: each write is
        durable when it completes)."""
        return self._link.batch(_WRITE, offsets, buffers, _REQ_FUA if fua else 0, region,
                                blocksize)

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
        self._link.stop()

    async def aclose(self) -> None:
        """Wait for requests in flight, then close the device."""
        if self._link.closed:
            self._link.stop()
            return
        while self._port.in_flight and not self.device.closed:
            await asyncio.sleep(0.01)
            self._link.reap()
        self._link.stop()
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
