"""The loop side of one ``blkio.aio.AsyncDevice``: what it wires into the event loop.

It owns the readers the device's queue needs on the loop -- the completion
fd (a duplicate), the backend's hang-up (an epoll set of its sockets) or the
reconnect eventfd -- and what they set off: reaping through the port, the
flush once per loop iteration, tasks feeding bounce space, following a
reconnect (no call into the device meanwhile), moving to another loop, the
device closed by another thread; and the awaits of requests that cannot take
the hot path, of zone requests and of batches.  Checks, memory, requests and
the batches' accounting are the port's (``_asyncport.AsyncPort``); this
module touches no pointer and makes no decision about a request.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
import types
import weakref
from asyncio import get_running_loop as _running_loop
from typing import Any, List, Optional

from ._asyncport import AsyncBatch, AsyncPort, Reconnecting

# A batch that completes during submission does not wait for the loop; such
# awaits yield to it once per this many bytes (a count, not a clock: the
# same program makes the same calls, however fast the machine runs it).
SYNC_BYTES = 1 << 20


@types.coroutine
def _yield_once() -> Any:
    """Let the loop run one iteration (``asyncio.sleep(0)`` minus its coroutine)."""
    yield


class LoopLink:
    """One AsyncDevice's queue tied to the running event loop."""

    def __init__(self, device: Any, port: AsyncPort, spin_us: int) -> None:
        self.device = device
        self.port = port
        self.spin_us = spin_us
        self.loop = _running_loop()
        self.closed = False
        self.fd = -1
        self.room: Optional[asyncio.Event] = None   # queue room freed (batch waves wait)
        self.sync_bytes = 0             # completed during submission since the last yield
        self.backend: Optional[select.epoll] = None   # the backend's sockets, for their hang-up
        self.events = -1                # a duplicate of the device's reconnect eventfd
        self.reconnected: Optional[asyncio.Event] = None   # set: a reconnect is in progress
        self._watch(self.loop)
        self._listen()

    def _listen(self) -> None:
        """Be told (on our loop) when the device is closed or the queue
        removed by someone else."""
        ref = weakref.ref(self)

        def queue_gone(orphans: List[Any]) -> None:
            link = ref()
            if link is not None:
                try:
                    link.loop.call_soon_threadsafe(link._device_gone, orphans)
                except RuntimeError:        # the loop is closed
                    pass
        self.port.on_gone(queue_gone)

    # ---- the loop's readers ------------------------------------------------------------

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.port.bind(loop, self._flush, self._feed)
        self._watch_completions()
        self._watch_backend()

    def _watch_completions(self) -> None:
        # A duplicate: libblkio closes its fd when the device goes (or
        # reconnects), possibly from another thread, and the loop must never
        # watch a reused number.
        self.port.enable_fd()
        self.fd = os.dup(self.port.fd)
        self.loop.add_reader(self.fd, self._on_completion_fd)

    def _watch_backend(self) -> None:
        """A device that reconnects tells its reconnects' start and end on
        an eventfd (a duplicate is watched: its watcher thread sees the
        hang-up).  Otherwise the loop watches the backend's sockets through
        an epoll set of its own that asks for no events: it becomes readable
        only at a hang-up, libblkio's own messages never wake it, and no
        flag of the sockets changes (uvloop would make a socket handed to it
        non-blocking under libblkio)."""
        port = self.port
        if port.reconnects:
            self.events = os.dup(port.reconnect_fd)
            self.loop.add_reader(self.events, self._on_reconnect_event)
        elif port.backend_fds:
            self.backend = select.epoll()
            for fd in port.backend_fds:
                self.backend.register(fd, 0)
            self.loop.add_reader(self.backend.fileno(), self._on_backend)

    def _unwatch_backend(self) -> None:
        if self.backend is not None:
            if not self.loop.is_closed():
                self.loop.remove_reader(self.backend.fileno())
            self.backend.close()
            self.backend = None
        self.events = self._close_reader(self.events)

    def _release_completion_fd(self) -> None:
        self.fd = self._close_reader(self.fd)

    def _close_reader(self, fd: int) -> int:
        """Stop watching ``fd`` (our own descriptor, -1: none) and close it;
        returns -1 for the attribute that held it."""
        if fd >= 0:
            if not self.loop.is_closed():
                self.loop.remove_reader(fd)
            os.close(fd)
        return -1

    def release(self) -> None:
        """Let go of the loop: no reader, no notice, the port bound to none."""
        self.port.on_gone(None)
        self.port.bind(None, None, None)
        self._release_completion_fd()
        self._unwatch_backend()

    def stop(self) -> None:
        """The AsyncDevice is done with the loop (detached or closing)."""
        self.closed = True
        self.release()

    def on_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, which this link follows there when nothing is
        in flight on the one it watched."""
        loop = _running_loop()
        if loop is self.loop and not self.closed:
            return loop
        if self.closed:
            raise ValueError(f"{self.device.driver} device is closed")
        if self.port.in_flight and not self.loop.is_closed():
            raise ValueError(f"this AsyncDevice has {self.port.in_flight} request(s) in flight "
                             f"on another event loop; await them there first")
        self.release()
        self.room = None
        self._watch(loop)
        self._listen()
        return loop

    def _device_gone(self, orphans: List[Any]) -> None:
        """The device was closed (or our queue removed) by someone else:
        what close drained was routed; the rest fail, and the fd goes."""
        self.release()
        self.closed = True
        self.port.orphaned(orphans)
        if self.room is not None:
            self.room.set()

    # ---- the backend's hang-up, and reconnecting --------------------------------

    def _on_backend(self) -> None:
        """The backend's socket hung up (a device that does not reconnect):
        everything in flight fails; route it."""
        if self.backend is None or not self.backend.poll(0):
            return
        self._unwatch_backend()
        self.port.hang_up()
        self.reap()

    def _on_reconnect_event(self) -> None:
        try:
            os.read(self.events, 8)
        except BlockingIOError:
            pass
        self.follow_reconnect()

    def follow_reconnect(self) -> None:
        """Keep up with the device's reconnects: while one is in progress
        the loop makes no call into the device (the port's calls raise
        Reconnecting instead of waiting); once it is over -- seen or not --
        the new instance's completion fd is watched and what completed (or
        failed) meanwhile is routed."""
        port = self.port
        if port.reconnect_over(self.reconnected is not None):
            event, self.reconnected = self.reconnected, None
            port.pause(False)
            if not self.closed:
                self._release_completion_fd()
                try:
                    if port.usable:
                        self._watch_completions()
                except Reconnecting:
                    pass                    # the next one began: below
                else:
                    self.reap()
            if event is not None:
                event.set()
        if port.reconnecting and self.reconnected is None and not self.closed:
            self.reconnected = asyncio.Event()
            port.pause(True)
            self._release_completion_fd()   # the old instance's: it signals nothing more

    async def until_reconnected(self) -> None:
        """Before calling into the device: wait out a reconnect in progress."""
        while self.reconnected is not None:
            await self.reconnected.wait()

    async def _after_reconnect(self, submit: Any) -> Any:
        await self.until_reconnected()
        return await submit()

    async def _call(self, fn: Any, *args: Any) -> Any:
        """A port call from a coroutine: after a reconnect in progress."""
        while True:
            if self.reconnected is not None:
                await self.until_reconnected()
            try:
                return fn(*args)
            except Reconnecting:
                self.follow_reconnect()

    # ---- completions ------------------------------------------------------------

    def _on_completion_fd(self) -> None:
        self.port.reset_fd(self.fd)
        self.reap()

    def reap(self) -> None:
        port = self.port
        if self.reconnected is not None or port.reconnecting:
            self.follow_reconnect()     # its end reaps
            return
        try:
            stuck, more = port.reap(self.fd)
        except Reconnecting:
            self.follow_reconnect()     # its end reaps
            return
        except ValueError:
            if not (self.device.closed or port.gone):
                raise
            return                      # closed by another thread: queue_gone resolves the rest
        for t in stuck:
            self.loop.create_task(self._feed(t))
        if more:
            port.schedule_flush()
        if self.room is not None:
            self.room.set()

    def _flush(self) -> None:
        # Runs once per loop iteration in which requests were enqueued: one
        # blkioq_do_io submits them all (QEMU's plug/unplug).
        if self.closed or self.reconnected is not None:
            return
        if self.spin_us > 0 and self.port.in_flight:
            deadline = time.perf_counter() + self.spin_us / 1e6
            while time.perf_counter() < deadline:
                self.reap()
                if not self.port.in_flight:
                    break
        self.reap()

    async def _feed(self, t: Any) -> None:
        """A transfer waits for bounce space: await it in the pool's FIFO,
        then let the transfer go on (its future carries any failure)."""
        pool = self.device.bounce_pool
        port = self.port
        while port.need(t):
            try:
                await self.until_reconnected()
                bounce = await pool.acquire_async(port.need(t))
                await self._call(port.refill, t, bounce)
            except BaseException as e:
                port.fail(t, e)
                return
            port.schedule_flush()

    # ---- requests off the hot path ---------------------------------------------------

    def submit(self, op: int, offset: Any, buf: Any, flags: int, length: Any = 0,
               chunk: Any = None, depth: Any = None, vectored: bool = False) -> Any:
        """A request's future (or, during a reconnect, a task awaiting it)."""
        loop = self.on_loop()
        if self.reconnected is None:
            try:
                return self.port.submit(op, offset, buf, flags, length, chunk, depth, vectored)
            except Reconnecting:
                self.follow_reconnect()
        return loop.create_task(self._after_reconnect(
            lambda: self.submit(op, offset, buf, flags, length, chunk, depth, vectored)))

    async def zone(self, op: int, offset: int = 0, zones: Any = None) -> int:
        loop = self.on_loop()
        fut = loop.create_future()
        need = await self._call(self.port.zone, op, offset, zones, fut)
        if need < 0:
            bounce = await self.device.bounce_pool.acquire_async(-need)
            try:
                await self._call(self.port.zone, op, offset, zones, fut, bounce)
            except BaseException:
                self.device.bounce_pool.release(bounce)
                raise
        self.port.schedule_flush()
        return await fut

    async def batch(self, op: int, offsets: Any, buffers: Any, flags: int, region: Any,
                    blocksize: int) -> int:
        """Await a batch: the port submits the common one at once; others go
        in waves as the queue has room (AsyncPort keeps their accounting)."""
        if _running_loop() is not self.loop or self.closed:
            self.on_loop()
        if self.reconnected is not None:
            await self.until_reconnected()
        port = self.port
        try:
            b = port.start_batch(op, offsets, buffers, flags, region, blocksize)
        except Reconnecting:
            self.follow_reconnect()
            b = await self._call(port.start_batch, op, offsets, buffers, flags, region, blocksize)
        batch: Optional[AsyncBatch] = None      # None: done during the submission
        if isinstance(b, int):
            nbytes = b
        else:
            batch = b
            error: Optional[BaseException] = None
            waited = False
            try:
                if b.submitted:
                    self.reap()         # the solo batch: route what is done, arm the fd
                while not b.submitted:
                    while port.batch_room == 0:
                        await self._wait_room()
                        if self.closed:
                            raise port.closed_during(b)
                    try:
                        await self._call(port.wave, b)
                    except Exception as e:
                        port.wave_failed(b, e)
                        error = e       # nothing of this wave was submitted
                        break
                    if b.left:
                        self.reap()
                    elif port.reconnecting:
                        self.follow_reconnect()     # the reconnect's end takes the rest
                if b.left:
                    if self.closed:
                        raise port.closed_during(b)
                    fut = self.loop.create_future()
                    port.await_batch(b, fut)
                    await fut
                    waited = True
            finally:
                port.end_batch(b)       # cancelled: reaping drops it at its end
            if error is not None:
                raise error
            if waited:
                self.sync_bytes = 0
                return port.batch_result(b)
            nbytes = b.nbytes
        self.sync_bytes += nbytes       # yield now and then: cached reads never wait
        if self.sync_bytes >= SYNC_BYTES:
            self.sync_bytes = 0
            await _yield_once()
        return nbytes if batch is None else port.batch_result(batch)

    async def _wait_room(self) -> None:
        """Until a reap may have freed room in the queue (a batch wave waits)."""
        if self.room is None:
            self.room = asyncio.Event()
        self.room.clear()
        await self.room.wait()
