"""asyncio front: many requests in flight on one queue, driven by the event loop.

    async with blkio.aio.open("io_uring", path="disk.img") as adev:
        data = await adev.read(0, 4096)
        await asyncio.gather(*(adev.write(i * 4096, data) for i in range(256)))

The queue's completion fd is watched with ``loop.add_reader``; each request's
future is its ``user_data`` and is resolved when its completion is reaped.
Submissions made during one loop iteration go to libblkio in one
``blkioq_do_io`` call (like QEMU's plug/unplug).  Memory the driver cannot use
directly is bounced through the device's pool, waiting for space fairly (FIFO)
without blocking the loop.  A cancelled coroutine's request stays in flight,
its buffer held, until its completion arrives.

``read_batch``/``write_batch`` await a whole batch of block requests with
one future and no Python object per request: they go through the queue's
batch path (``Queue.submit_reads``/``submit_writes``), tagged with their
batch's number in the high 32 bits of ``user_data``, and ``Queue.reap``
collects them on the same completion fd as the single requests, which are
told apart by their ``Completion`` objects.

Another thread may close the device (or remove the queue) while requests are
in flight: their awaits then end with the result of the request if close
drained it, else with ``ValueError`` saying the device is closed.  The loop
watches a duplicate of the completion fd, so the fd number it watches stays
ours until the AsyncDevice lets it go.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
import types
import warnings
import weakref
from typing import Any, Awaitable, Dict, List, Optional, Sequence

import numpy as np

from . import Device, Op, Queue, REQ_FUA, open as _open_device
from ._connect import DEFAULT_CONNECT_TIMEOUT
from ._errors import error_for
from ._requests import write_zeroes_flags
from ._zones import ZONE_DTYPE, _report_plan

__all__ = ["AsyncDevice", "open"]

_READ, _WRITE, _WRITE_ZEROES, _DISCARD, _FLUSH = Op.READ, Op.WRITE, Op.WRITE_ZEROES, Op.DISCARD, Op.FLUSH

# A batch request's user_data: its batch's number << 32 | its index in the batch.
_TAG_SHIFT = 32
_INDEX_MASK = (1 << _TAG_SHIFT) - 1
_BATCH_IDS = 1 << 31                # numbers wrap (tags stay positive int64)
_REAP_DTYPE = np.dtype([("user_data", np.int64), ("ret", np.int32)])


# A batch that completes during submission does not wait for the loop; such
# awaits yield to it at least once per this many seconds.
_SYNC_SLICE = 0.001


@types.coroutine
def _yield_once() -> Any:
    """Let the loop run one iteration (what ``asyncio.sleep(0)`` does, minus
    its own coroutine)."""
    yield


class _Batch:
    """One awaited batch: its requests in flight, its first failure, and the
    memory they use (held until the last of them is reaped, even when the
    awaiting task was cancelled: the device may still write it)."""

    __slots__ = ("n", "left", "fut", "memory", "offsets", "abandoned",
                 "nfail", "fail_index", "fail_ret")

    def __init__(self, n: int, memory: Any, offsets: np.ndarray) -> None:
        self.n = n
        self.left = 0                   # submitted, not yet reaped
        self.fut: "Optional[asyncio.Future[None]]" = None
        self.memory = memory
        self.offsets = offsets
        self.abandoned = False          # its task ended (cancelled) with requests in flight
        self.nfail = 0
        self.fail_index = -1
        self.fail_ret = 0


class AsyncDevice:
    """Coroutine I/O on one queue of a :class:`blkio.Device`.

    ``spin_us`` > 0 busy-polls the queue for that many microseconds after
    submitting, before the loop sleeps on the completion fd (lower latency,
    more CPU; QEMU's poll handler does the same).  ``poll_us`` is its
    deprecated name.
    """

    def __init__(self, device: Device, queue: int = 0, *, spin_us: int = 0,
                 poll_us: Optional[int] = None) -> None:
        if poll_us is not None:
            warnings.warn("poll_us is deprecated; use spin_us", DeprecationWarning, stacklevel=2)
            spin_us = poll_us
        self.device = device
        self.queue: Queue = device.queue(queue)
        self.spin_us = spin_us
        self._loop = asyncio.get_running_loop()
        # (The hot path calls self._loop.create_future and
        # self.queue.enqueue_future through their attributes: Python
        # specializes those lookups, not a call of a bound method kept in an
        # instance attribute -- about 340 instructions a request less.)
        self._flush_scheduled = False
        self._closed = False
        # libblkio (after 1.3) leaves the completion fd disabled: we enable it
        # whenever requests are in flight and we are about to sleep.
        self.queue.completion_fd_enabled = True
        self._fd_on = True
        # Batches in flight by number, and where their completions are reaped to.
        self._batches: Dict[int, _Batch] = {}
        self._next_batch = 1            # batch 0: the solo batch (see _batch)
        self._reap_out = np.zeros(256, _REAP_DTYPE)
        self._reap_ud = self._reap_out["user_data"]
        self._reap_ret = self._reap_out["ret"]
        self._room: Optional[asyncio.Event] = None   # queue slots freed (batch waves wait)
        self._room_waiters = 0
        self._last_yield = 0.0          # when a batch await last let the loop run
        # A duplicate: libblkio closes its fd when the device goes, possibly
        # from another thread, and the loop must never watch a reused number.
        self._fd = os.dup(self.queue.completion_fd)
        self._loop.add_reader(self._fd, self._on_completion_fd)
        ref = weakref.ref(self)

        def device_gone(queue: Queue, orphans: List[Any]) -> None:
            adev = ref()
            if adev is not None and queue is adev.queue:
                try:
                    adev._loop.call_soon_threadsafe(adev._device_gone, orphans)
                except RuntimeError:        # the loop is closed
                    pass
        device._on_close(device_gone)

    def _device_gone(self, orphans: List[Any]) -> None:
        """The device was closed (or our queue removed) by someone else:
        resolve what was in flight and stop watching the fd."""
        self._release_fd()
        self._closed = True
        self._resolve(orphans)
        # Close drained (or gave up on, keeping their memory) the batch
        # requests too, but their completions can no longer be reaped.
        batches, self._batches = self._batches, {}
        for rec in batches.values():
            if rec.fut is not None and not rec.fut.done():
                rec.fut.set_exception(self._closed_during_batch(rec))
        if self._room is not None:
            self._room.set()

    def _closed_during_batch(self, rec: _Batch) -> ValueError:
        return ValueError(f"the {self.device.driver} device was closed (or its queue removed) "
                          f"while a batch of {rec.n} request(s) was in flight")

    def _release_fd(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    # ---- completion handling ---------------------------------------------

    def _on_completion_fd(self) -> None:
        # Reset the eventfd before reaping, under the queue's lock (a
        # blocking call of another thread may be inside libblkio on it).
        self.queue.reset_completion_fd(self._fd)
        self._reap()

    def _reap(self) -> None:
        try:
            self._reap_queue()
        except ValueError:
            if not (self.device.closed or self.queue.removed):
                raise
            # Closed by another thread: its callback resolves what is left.

    def _reap_queue(self) -> None:
        # Suppress-while-draining: no fd events while we reap in a loop; the
        # fd is re-enabled only while requests remain in flight, and polled
        # once more after that for what completed in between.
        # completions() collects batch completions too (into the queue's
        # ring, announced by no fd event): take them after every call.
        q = self.queue
        if self._fd_on:
            q.completion_fd_enabled = False
            self._fd_on = False
        # resolve_futures() reaps all that is there and resolves the plain
        # reads and writes in the core; the rest (failures, other kinds) come
        # back for _resolve.
        while True:
            rest = q.resolve_futures()
            if rest:
                self._resolve(rest)
            if not q.batch_ready:
                break
            self._take_batches()
        if q.in_flight:
            q.completion_fd_enabled = True
            self._fd_on = True
            rest = q.resolve_futures()
            if rest:
                self._resolve(rest)
            if q.batch_ready:
                self._take_batches()
        else:
            # Nothing in flight: an event on the fd now is spurious (io_uring
            # signals it even while disabled, for completions we reaped during
            # the submit).  Clear it here rather than let it wake the loop
            # for a callback and a reap that find nothing.
            q.reset_completion_fd(self._fd)
        if self._room_waiters:
            self._room.set()            # type: ignore[union-attr]

    def _take_batches(self) -> None:
        """Route the batch completions waiting in the queue's ring to their
        batches.  Nothing per request: with one batch in flight (the common
        case) and ``Queue.failed`` unchanged, not even a numpy call; else
        numpy over the reaped rows.  Batch requests on this queue are all
        ours: the AsyncDevice drives it."""
        q = self.queue
        cap = len(self._reap_out)
        while q.batch_ready:
            failed_before = q.failed
            k = q.reap(self._reap_out)
            failed = q.failed != failed_before
            if len(self._batches) == 1 and not failed:
                self._credit(next(iter(self._batches)), k, None, None)
            else:
                ud = self._reap_ud[:k]
                rets = self._reap_ret[:k]
                ids = ud >> _TAG_SHIFT
                uniq, counts = np.unique(ids, return_counts=True)
                for bid, cnt in zip(uniq.tolist(), counts.tolist()):
                    if failed:
                        mine = ids == bid
                        self._credit(bid, cnt, ud[mine], rets[mine])
                    else:
                        self._credit(bid, cnt, None, None)
            if k < cap:
                break

    def _credit(self, bid: int, count: int, ud: Optional[np.ndarray],
                rets: Optional[np.ndarray]) -> None:
        rec = self._batches.get(bid)
        if rec is None:
            return                      # not submitted through this AsyncDevice
        if ud is not None and rets is not None:
            bad = np.flatnonzero(rets)
            if bad.size:
                idx = ud[bad] & _INDEX_MASK
                j = int(np.argmin(idx))
                if rec.nfail == 0 or int(idx[j]) < rec.fail_index:
                    rec.fail_index = int(idx[j])
                    rec.fail_ret = int(rets[bad[j]])
                rec.nfail += int(bad.size)
        rec.left -= count
        if rec.left == 0:
            if rec.fut is not None and not rec.fut.done():
                rec.fut.set_result(None)
            if rec.abandoned:
                del self._batches[bid]

    @staticmethod
    def _resolve(completions: List[Any]) -> None:
        for c in completions:
            fut = c.user_data
            if fut.done():              # cancelled: nothing to tell
                continue
            if c.ret >= 0:
                # a report's result is the number of zones filled in
                fut.set_result(c.ret if c.op == "report_zones" else c.length)
            elif c.op == "discard" and c.ret == -errno.EOPNOTSUPP:
                fut.set_result(0)       # discard is advisory
            elif c.ret == -errno.ECANCELED:
                fut.set_exception(ValueError(f"the device was closed (or its queue removed) "
                                             f"before this {c.op} completed"))
            else:
                try:
                    c.check()
                except OSError as e:
                    fut.set_exception(e)

    def _flush(self) -> None:
        # Runs once per loop iteration in which requests were enqueued: one
        # blkioq_do_io submits them all (QEMU's plug/unplug).
        self._flush_scheduled = False
        if self._closed:
            return
        q = self.queue
        try:
            if self.spin_us > 0 and q.in_flight:
                self._resolve(q.completions())
                deadline = time.perf_counter() + self.spin_us / 1e6
                while q.in_flight and time.perf_counter() < deadline:
                    done = q.completions()
                    if done:
                        self._resolve(done)
                        break
        except ValueError:
            if not (self.device.closed or q.removed):
                raise
            return
        self._reap()

    def _request(self, op: int, offset: int, buf: Any, vectored: bool, flags: int,
                 length: int = 0) -> "Awaitable[int]":
        """Enqueue now; return a future of the byte count (or, when bounce
        space must be waited for, a coroutine that enqueues once it has it).
        A cancelled await leaves the request in flight: the core holds its
        buffer and bounce space until the completion is reaped."""
        if self._closed:
            raise ValueError(f"{self.device.driver} device is closed")
        q = self.queue
        fut = self._loop.create_future()
        n = q.enqueue(op, offset, buf, length, flags, fut, vectored, None, True)
        if n < 0:
            return self._enqueue_bounced(-n, op, offset, buf, length, flags, fut, vectored)
        if not self._flush_scheduled:       # _schedule_flush, inlined: the hot path
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    def _enqueue_bounced(self, need: int, op: int, offset: int, buf: Any, length: int,
                         flags: int, fut: "asyncio.Future[int]", vectored: bool) -> "Awaitable[int]":
        # A function of its own: a lambda in the hot path's function would
        # make each of its calls allocate a cell per captured variable, taken
        # or not (six cells: about 1,400 instructions a request, callgrind
        # 2026-12-05).
        q = self.queue
        return self._bounced(need, lambda bounce: q.enqueue(
            op, offset, buf, length, flags, fut, vectored, bounce), fut)

    async def _bounced(self, need: int, enqueue: Any, fut: "asyncio.Future[int]") -> int:
        # The pool is full (or others wait first): wait in its FIFO without
        # blocking the loop, then enqueue with the space we got
        # (``enqueue(bounce)``); a failed enqueue gives the space back.
        pool = self.device.bounce_pool
        bounce = await pool.acquire_async(need)
        try:
            enqueue(bounce)
        except BaseException:
            pool.release(bounce)
            raise
        self._schedule_flush()
        return await fut

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _one(self, op: int, offset: int, buf: Any, flags: int, chunk: Optional[int],
             depth: Optional[int]) -> "Awaitable[int]":
        """A read or write of one buffer that ``readinto``/``write`` did not
        enqueue on their hot path: the pipeline when longer than a chunk,
        else one request."""
        return (self._large(op, offset, buf, flags, chunk, depth)
                or self._request(op, offset, buf, False, flags))

    def _not_enqueued(self, op: int, offset: int, buf: Any, flags: int,
                      fut: "asyncio.Future[int]", n: Optional[int]) -> "Awaitable[int]":
        """What ``enqueue_future`` left to us: ``n`` < 0, bounce space to wait
        for; None, a request to pipeline."""
        if n is not None:
            return self._enqueue_bounced(-n, op, offset, buf, 0, flags, fut, False)
        return self._one(op, offset, buf, flags, None, None)

    def _large(self, op: int, offset: int, buf: Any, flags: int, chunk: Optional[int],
               depth: Optional[int]) -> "Optional[Awaitable[int]]":
        """The pipelined form of a read or write longer than a chunk (None
        when the request goes as one): the device's plan, as for blocking I/O."""
        n = buf.nbytes if type(buf) is np.ndarray else memoryview(buf).nbytes
        if chunk is None and depth is None and n <= self.device.large_io_chunk:
            return None
        size, inflight = self.device.large_io_plan(n, chunk, depth, write=op == _WRITE)
        if size >= n:
            return None
        return self._pipelined(op, offset, buf, flags, size, inflight)

    async def _pipelined(self, op: int, offset: int, buf: Any, flags: int, chunk: int,
                         depth: int) -> int:
        # ``depth`` chunks in flight, refilled as they finish; the first
        # failed chunk (lowest offset) is raised once all sent have finished.
        # A cancelled await leaves its chunks in flight, their memory held
        # by the core until they are reaped (as for one request).
        view = memoryview(buf).cast("B")
        n = view.nbytes
        pending: "dict[asyncio.Future[int], int]" = {}
        failed: "Optional[tuple[int, BaseException]]" = None
        pos = 0
        while pending or (failed is None and pos < n):
            while failed is None and pos < n and len(pending) < depth:
                piece = view[pos:pos + chunk]
                pending[asyncio.ensure_future(
                    self._request(op, offset + pos, piece, False, flags))] = offset + pos
                pos += chunk
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                at = pending.pop(fut)
                exc = fut.exception()
                if exc is not None and (failed is None or at < failed[0]):
                    failed = (at, exc)
        if failed is not None:
            raise failed[1]
        return n

    # ---- public coroutines -------------------------------------------------

    def readinto(self, offset: int, buf: Any, *, chunk: Optional[int] = None,
                 depth: Optional[int] = None) -> Awaitable[int]:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``; awaits the count.

        The request is enqueued when this is called (bad arguments raise
        here); the returned awaitable is a future, not a coroutine, which
        saves a coroutine per request on the hot path.  A read longer than
        a chunk is pipelined as in ``Device.readinto`` (``chunk``, ``depth``)."""
        if chunk is None and depth is None and not self._closed:
            # the hot path: one call into the core, no Python frame but this
            fut = self._loop.create_future()
            n = self.queue.enqueue_future(_READ, offset, buf, 0, fut)
            if n is not None and n >= 0:
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self._loop.call_soon(self._flush)
                return fut
            return self._not_enqueued(_READ, offset, buf, 0, fut, n)
        return self._one(_READ, offset, buf, 0, chunk, depth)

    async def read(self, offset: int, nbytes: int, *, chunk: Optional[int] = None,
                   depth: Optional[int] = None) -> np.ndarray:
        """Read ``nbytes`` at ``offset`` into a new array of mapped memory."""
        out = self.device.alloc(nbytes)
        await self.readinto(offset, out, chunk=chunk, depth=depth)
        return out

    def write(self, offset: int, buf: Any, *, fua: bool = False, chunk: Optional[int] = None,
              depth: Optional[int] = None) -> Awaitable[int]:
        """Write ``buf`` at ``offset``; awaits the count.  Pipelined like
        ``readinto`` when longer than a chunk."""
        flags = REQ_FUA if fua else 0
        if chunk is None and depth is None and not self._closed:
            # the hot path, as in readinto
            fut = self._loop.create_future()
            n = self.queue.enqueue_future(_WRITE, offset, buf, flags, fut)
            if n is not None and n >= 0:
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self._loop.call_soon(self._flush)
                return fut
            return self._not_enqueued(_WRITE, offset, buf, flags, fut, n)
        return self._one(_WRITE, offset, buf, flags, chunk, depth)

    def readv(self, offset: int, bufs: Sequence[Any]) -> Awaitable[int]:
        """Vectored read (one request; at most max-transfer bytes); awaits the count."""
        return self._request(_READ, offset, list(bufs), True, 0)

    def writev(self, offset: int, bufs: Sequence[Any], *, fua: bool = False) -> Awaitable[int]:
        """Vectored write (one request; at most max-transfer bytes); awaits the count."""
        return self._request(_WRITE, offset, list(bufs), True, REQ_FUA if fua else 0)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                           may_unmap: bool = True, no_fallback: bool = False) -> None:
        """Write ``length`` zero bytes at ``offset``."""
        flags = write_zeroes_flags(fua, may_unmap, no_fallback)
        await self._request(_WRITE_ZEROES, offset, None, False, flags, length)

    async def discard(self, offset: int, length: int) -> None:
        """Discard ``length`` bytes at ``offset`` (advisory: unsupported is success)."""
        await self._request(_DISCARD, offset, None, False, 0, length)

    async def flush(self) -> None:
        """Make completed writes durable."""
        await self._request(_FLUSH, 0, None, False, 0, 0)

    # ---- zoned devices (see Device.report_zones & co.; offsets in bytes) ----

    def _zone(self, op: int, offset: int = 0, zones: Any = None) -> "Awaitable[int]":
        """Enqueue one zone request now; a future of its ret (the zones
        filled in, for a report)."""
        if self._closed:
            raise ValueError(f"{self.device.driver} device is closed")
        fut = self._loop.create_future()
        n = self.queue.enqueue_zone(op, offset, zones, user_data=fut, nowait=True)
        if n < 0:
            return self._bounced(-n, lambda bounce: self.queue.enqueue_zone(
                op, offset, zones, user_data=fut, bounce=bounce), fut)
        self._schedule_flush()
        return fut

    async def report_zones(self, offset: int = 0, nr_zones: Optional[int] = None) -> np.ndarray:
        """Report zones from the one holding ``offset`` (see
        ``Device.report_zones``): a numpy array of ``blkio.ZONE_DTYPE``."""
        pos, left, per_request = _report_plan(self.device, offset, nr_zones)
        parts = []
        while left > 0:
            n = min(left, per_request)
            zones = self.device.alloc(n * ZONE_DTYPE.itemsize).view(ZONE_DTYPE)
            got = await self._zone(Op.REPORT_ZONES, pos, zones)
            parts.append(zones[:got])
            if got < n or got == 0:
                break
            left -= got
            pos = int(zones[got - 1]["start"]) + int(zones[got - 1]["len"])
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, ZONE_DTYPE)

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

    # ---- batches ---------------------------------------------------------

    def read_batch(self, offsets: Any, buffers: Any, *, region: Any = None,
                   blocksize: int = 0) -> Awaitable[int]:
        """Read one block per offset, all in flight at once; awaits the bytes read.

        ``offsets``: device offsets in bytes (uint64[n], or anything
        ``numpy.asarray`` turns into it); ``buffers``: a C-contiguous
        uint8[n, blocksize] array of memory from ``Device.alloc`` or
        ``Device.register``, row i receiving the block at ``offsets[i]`` --
        or, with ``region`` (such memory, 1-D uint8) and ``blocksize``,
        uint64[n] byte offsets into ``region`` (see ``Queue.submit_reads``).
        One future for the whole batch, no Python object per request.

        Returns ``n * blocksize`` when every request succeeded.  If any
        failed, the await raises the ``OSError`` (``blkio.Error``) of the one
        with the lowest index, once all of the batch's requests have
        finished; its message names that offset, and the exception carries
        ``index``, ``offset`` and ``failed`` (how many failed).  Batches
        larger than the queue's free slots are submitted in waves.  A
        cancelled await submits no further waves; requests already in flight
        stay there, and the batch keeps a reference to ``buffers`` (or
        ``region``) until the last of them completes, so dropping the array
        cannot give its memory to another ``alloc`` while the device may
        still write it.  Closing the device while a batch is awaited makes
        the await raise ``ValueError``."""
        return self._batch(_READ, offsets, buffers, 0, region, blocksize)

    def write_batch(self, offsets: Any, buffers: Any, *, fua: bool = False, region: Any = None,
                    blocksize: int = 0) -> Awaitable[int]:
        """Write row i of ``buffers`` at ``offsets[i]`` for every i; awaits the
        bytes written.  As ``read_batch`` otherwise (``fua``: each write is
        durable when it completes)."""
        return self._batch(_WRITE, offsets, buffers, REQ_FUA if fua else 0, region, blocksize)

    async def _batch(self, op: int, offsets: Any, buffers: Any, flags: int, region: Any,
                     blocksize: int) -> int:
        if self._closed:
            raise ValueError(f"{self.device.driver} device is closed")
        q = self.queue
        offs = np.asarray(offsets, dtype=np.uint64)
        if offs.ndim != 1:
            raise TypeError(f"offsets must be 1-D, not of shape {offs.shape}")
        if not isinstance(buffers, np.ndarray):
            buffers = np.asarray(buffers)
        n = offs.shape[0]
        if buffers.ndim < 1 or buffers.shape[0] != n:
            raise ValueError(f"{n} offsets but {buffers.shape[0] if buffers.ndim else 0} buffers")
        if region is None:
            bs = buffers.shape[1] if buffers.ndim == 2 else 0
            memory = buffers
            kw: Dict[str, Any] = {}
        else:
            bs = blocksize
            memory = region
            kw = {"region": region, "blocksize": blocksize}
        if flags:
            kw["fua"] = True
        if n == 0:
            return 0
        submit = q.submit_reads if op == _READ else q.submit_writes
        slots = q.slots
        fits = not slots or n <= slots - q.in_flight
        if not fits:
            self._check_offsets(op, offs, bs)    # all of it, before the first wave
        if not self._batches and fits and n <= len(self._reap_out):
            # The common case, kept cheap: the only batch in flight, in one
            # wave, tagged with the core's default tags 0..n-1 (batch 0).
            submit(offs, buffers, **kw)
            if q.batch_ready == n:          # all done during submission
                failed = q.failed
                q.reap(self._reap_out)
                if q.failed == failed:
                    # Return at once, but let the loop run at least once a
                    # slice (a loop of cached reads would starve other tasks).
                    now = time.monotonic()
                    if now - self._last_yield >= _SYNC_SLICE:
                        self._last_yield = now
                        await _yield_once()
                    return n * bs
                rec = _Batch(n, memory, offs)
                rec.left = n
                self._batches[0] = rec
                self._credit(0, n, self._reap_ud[:n], self._reap_ret[:n])
                del self._batches[0]
                raise self._batch_error(op, rec, bs)
            bid, pos = 0, n
        else:
            bid = self._next_batch
            while bid in self._batches or bid == 0:   # 0: the solo batch's
                bid = bid % (_BATCH_IDS - 1) + 1
            self._next_batch = bid % (_BATCH_IDS - 1) + 1
            pos = 0
        base = bid << _TAG_SHIFT
        rec = _Batch(n, memory, offs)
        rec.left = pos
        self._batches[bid] = rec
        error: Optional[BaseException] = None
        try:
            if pos:
                # The solo batch, submitted above and not done: route what is
                # done, arm the completion fd for the rest.
                self._reap()
            while pos < n:
                k = n - pos
                if slots:
                    room = slots - q.in_flight
                    while room <= 0:
                        await self._wait_room()
                        if self._closed:
                            raise self._closed_during_batch(rec)
                        room = slots - q.in_flight
                    k = min(k, room)
                tags = np.arange(base + pos, base + pos + k, dtype=np.int64)
                try:
                    submit(offs[pos:pos + k], buffers[pos:pos + k], user_data=tags, **kw)
                except Exception as e:
                    if rec.left and (self.device.closed or q.removed):
                        raise self._closed_during_batch(rec) from e
                    error = e           # nothing of this wave was submitted
                    break
                rec.left += k
                pos += k
                # Collect what completed during submission (page-cached reads
                # do); arm the completion fd for the rest.
                if q.batch_ready:
                    self._take_batches()
                if rec.left:
                    self._reap()
            if rec.left:
                if self._closed:
                    raise self._closed_during_batch(rec)
                rec.fut = self._loop.create_future()
                await rec.fut
                self._last_yield = time.monotonic()
            elif error is None:
                now = time.monotonic()
                if now - self._last_yield >= _SYNC_SLICE:
                    self._last_yield = now
                    await _yield_once()
        finally:
            if rec.left == 0:
                self._batches.pop(bid, None)
            else:
                rec.abandoned = True    # cancelled: reaping drops it at the end
        if error is not None:
            raise error
        if rec.nfail:
            raise self._batch_error(op, rec, bs)
        return n * bs

    def _batch_error(self, op: int, rec: _Batch, bs: int) -> OSError:
        i = rec.fail_index
        offset = int(rec.offsets[i])
        code = -rec.fail_ret
        others = f"; {rec.nfail} of {rec.n} requests failed" if rec.nfail > 1 else ""
        e = error_for(code, f"{'read' if op == _READ else 'write'} of {bs} bytes at offset "
                            f"{offset} (request {i} of a batch of {rec.n}) failed{others}")
        e.index = i                     # type: ignore[attr-defined]
        e.offset = offset               # type: ignore[attr-defined]
        e.failed = rec.nfail            # type: ignore[attr-defined]
        return e

    def _check_offsets(self, op: int, offs: np.ndarray, bs: int) -> None:
        """The whole batch's offsets, before a first wave is submitted (each
        wave is checked again by the core)."""
        lim = self.device.limits
        align = lim.request_alignment
        cap = self.device.capacity
        if bs <= 0 or bs % align:
            return                      # the core's check names the problem
        name = f"{'read' if op == _READ else 'write'}_batch"
        misaligned = np.flatnonzero(offs % align != 0)
        if misaligned.size:
            i = int(misaligned[0])
            raise ValueError(f"{name}: offsets[{i}] = {int(offs[i])} is not a multiple of "
                             f"request-alignment ({align})")
        past = np.flatnonzero(offs > cap - bs) if bs <= cap else np.arange(1)
        if past.size:
            i = int(past[0])
            raise ValueError(f"{name}: offsets[{i}] = {int(offs[i])} + {bs} passes the device "
                             f"capacity ({cap})")

    async def _wait_room(self) -> None:
        """Until a reap may have freed queue slots (a batch wave waits)."""
        if self._room is None:
            self._room = asyncio.Event()
        self._room.clear()
        self._room_waiters += 1
        try:
            await self._room.wait()
        finally:
            self._room_waiters -= 1

    def alloc(self, nbytes: int) -> np.ndarray:
        """Memory mapped into the device (see ``Device.alloc``)."""
        return self.device.alloc(nbytes)

    @property
    def capacity(self) -> int:
        """Device size in bytes."""
        return self.device.capacity

    # ---- lifecycle -------------------------------------------------------

    def detach(self) -> None:
        """Stop driving the queue from this event loop, leaving the device
        open (for blocking use, or another loop).  Requests must not be in
        flight (ValueError)."""
        if self.queue.in_flight and not self.device.closed:
            raise ValueError(f"{self.queue.in_flight} request(s) still in flight; "
                             f"await them before detaching")
        self._closed = True
        self._release_fd()

    async def aclose(self) -> None:
        """Wait for requests in flight, then close the device."""
        if self._closed:
            self._release_fd()
            return
        while self.queue.in_flight and not self.device.closed:
            await asyncio.sleep(0.01)
            self._reap()
        self._closed = True
        self._release_fd()
        await self._loop.run_in_executor(None, self.device.close)

    async def __aenter__(self) -> "AsyncDevice":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<blkio.aio.AsyncDevice {self.device!r} queue={self.queue.index}>"


class _Opener:
    """``open(...)`` is both awaitable and an async context manager."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self._args = args
        self._kwargs = kwargs
        self._adev: Optional[AsyncDevice] = None

    async def _open(self) -> AsyncDevice:
        spin_us = self._kwargs.pop("spin_us", 0)
        poll_us = self._kwargs.pop("poll_us", None)
        queue = self._kwargs.pop("queue", 0)
        loop = asyncio.get_running_loop()
        # Connecting can block (a vhost-user handshake): do it off the loop.
        dev = await loop.run_in_executor(None, lambda: _open_device(*self._args, **self._kwargs))
        try:
            return AsyncDevice(dev, queue, spin_us=spin_us, poll_us=poll_us)
        except BaseException:
            dev.close()
            raise

    def __await__(self):
        return self._open().__await__()

    async def __aenter__(self) -> AsyncDevice:
        self._adev = await self._open()
        return self._adev

    async def __aexit__(self, *exc: Any) -> None:
        assert self._adev is not None
        await self._adev.aclose()


def open(driver: str, path: Optional[str] = None, *, spin_us: int = 0,
         poll_us: Optional[int] = None, queue: int = 0,
         connect_timeout: Optional[float] = DEFAULT_CONNECT_TIMEOUT, **kwargs: Any) -> _Opener:
    """Open a device for asyncio: ``async with blkio.aio.open(...) as adev``
    (or ``adev = await blkio.aio.open(...)`` and ``await adev.aclose()``).
    Arguments are those of :func:`blkio.open`, plus ``spin_us`` (``poll_us``,
    deprecated) and ``queue``.  The device is opened in the loop's default
    executor, so a vhost-user handshake that waits (``connect_timeout``, as
    in :func:`blkio.open`) does not block the loop."""
    return _Opener((driver, path), dict(kwargs, spin_us=spin_us, poll_us=poll_us, queue=queue,
                                        connect_timeout=connect_timeout))
