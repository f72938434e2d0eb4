"""The public objects of the core: what users hold, each holding the device
core and entering its guard for every call.

``DeviceFront`` is the compiled base of ``blkio.Device`` (the facade adds the
property catalogue, limits, zones and ``open``): blocking I/O on the calling
thread's queue, memory, queues, close.  ``Queue`` is one queue's API (per
request, batch, zones, the completion fd); ``BouncePool`` the public face of
the bounce space.  None of them can be built from Python (TypeError) or
pickled; each method checks its arguments (``_checks``), enters the guard,
calls down (transfer engine, queue engine, device core) and leaves.  No
pointer work happens above this module but in ``_asyncport`` (the asyncio
port), which cimports the types and the guard entry from ``_public.pxd``.
"""

cimport cython
from . cimport _libblkio as lb
cimport numpy as cnp
from libc.stdint cimport uint64_t, int64_t

from ._checks cimport (READ, WRITE, WRITE_ZEROES, DISCARD, FLUSH, REPORT_ZONES, OPEN_ZONE,
                       CLOSE_ZONE, FINISH_ZONE, RESET_ZONE, OPEN_ALL_ZONES, CLOSE_ALL_ZONES,
                       FINISH_ALL_ZONES, RESET_ALL_ZONES, op_in, as_u64, as_index, zero_flags,
                       no_device_error, removed_error, zone_problem, problem_error)
from ._device cimport DeviceCore, core_enter, core_leave, blocking_engine_of
from ._engine cimport Completion, QueueEngine, queue_use
from ._handle cimport DeviceHandle, GUARD_THREADS, check_io_depth, guard_thread
from ._batch cimport BatchArrays, batch_arrays, check_batch
from ._transfer cimport (blocking_io, blocking_one, blocking_zone, zone_completion,
                         enqueue_request, wait_for_space)
from ._engine cimport TO_CALLER
from ._pool cimport BounceSpace
from ._held cimport HeldBuffers, hold_buffers
from ._zoneops import ZONE_DTYPE

import warnings

import numpy as np

from ._pool import AsyncWaiter

cnp.import_array()     # numpy's C API: _held's inline helpers use it


cdef str _NOT_BUILT = "{} cannot be built directly; {}"


# ---- the device --------------------------------------------------------------------

cdef class DeviceFront:
    """The compiled base of ``blkio.Device``: blocking I/O, memory, queues."""

    def __reduce__(self):
        raise TypeError(f"a blkio.Device cannot be pickled: it is a libblkio instance of this "
                        f"process; open the device in each process that needs it (pickle its "
                        f"driver, path and properties instead)")

    cdef DeviceCore _live(self):
        if self.core is None:
            raise no_device_error()
        return self.core

    # ---- state -------------------------------------------------------------

    @property
    def driver(self) -> str:
        """The libblkio driver (one of ``blkio.DRIVERS``)."""
        return self._live().driver

    @property
    def state(self):
        """The device's ``blkio.State`` (compares equal to its name)."""
        return self._live().state

    @property
    def capacity(self) -> int:
        """Size in bytes (read again on a device that can grow)."""
        return self._live().handle.capacity

    @property
    def read_only(self) -> bool:
        """True when the device refuses writes, write-zeroes and discards."""
        return self._live().handle.lim.read_only

    @property
    def closed(self) -> bool:
        """True once close() has begun (or, in the child of a fork(), for a
        device the parent opened): no new call is accepted."""
        return self.core is None or self.core.closed

    @property
    def spin_us(self) -> int:
        """Microseconds that waits busy-poll for a completion before sleeping
        (0, the default: never).  A few tens of µs cut the latency of
        backends whose wake-ups are slow (vhost-user) at the cost of CPU."""
        return self._live().handle.spin_ns // 1000

    @spin_us.setter
    def spin_us(self, value):
        cdef Py_ssize_t v = as_index(value, "spin_us")
        if v < 0:
            raise ValueError("spin_us must be >= 0")
        self._live().handle.spin_ns = <int64_t>v * 1000

    @property
    def poll_us(self) -> int:
        """Deprecated alias of ``spin_us``."""
        warnings.warn("Device.poll_us is deprecated; use Device.spin_us", DeprecationWarning,
                      stacklevel=2)
        return self.spin_us

    @poll_us.setter
    def poll_us(self, value):
        warnings.warn("Device.poll_us is deprecated; use Device.spin_us", DeprecationWarning,
                      stacklevel=2)
        self.spin_us = value

    @property
    def bounce_pool(self):
        """The device's :class:`BouncePool`."""
        cdef DeviceCore core = self._live()
        if core.pool_api is None:
            core.pool_api = _make_pool(core)
        return core.pool_api

    @property
    def mapped_regions(self) -> int:
        """Number of memory regions the device holds (mapped where the driver
        needs or pins memory regions)."""
        return len(self._live().handle.regions)

    # ---- memory --------------------------------------------------------------

    def alloc(self, nbytes):
        """A numpy uint8 array of ``nbytes`` mapped into this device.

        Aligned to mem-region-alignment and at least 4096 bytes.  I/O on it is
        zero-copy on every driver.  The memory outlives the device; it returns
        to the device's arena when the array (and every view of it) is gone.
        """
        cdef uint64_t n = as_u64(nbytes, "nbytes")
        if n == 0:
            raise ValueError("alloc size must be positive")
        return self._live().alloc(n)

    def register(self, array):
        """Register caller memory with the device so I/O on it goes direct.

        Follows QEMU's register_buf: address and size must be multiples of
        mem-region-alignment (ValueError); the memory is mapped with libblkio
        only where the driver needs or pins memory regions; where the driver
        needs an fd and the memory has none (plain numpy memory) nothing is
        registered and I/O on it is bounced.  The device holds a reference
        to the memory until ``unregister`` or close.  Returns True when the
        memory is registered (usable by the batch API and never bounced).
        """
        return self._live().register(array)

    def unregister(self, array):
        """Undo ``register``: unmap exactly the region that was mapped.

        Refuses (ValueError) while requests in flight still use the memory:
        the device could still read or write it.  Returns False when the
        memory was not registered."""
        return self._live().unregister(array)

    # ---- blocking I/O ----------------------------------------------------------

    @property
    def large_io_chunk(self) -> int:
        """Reads and writes longer than this (bytes) are cut into chunks of
        this size with ``large_io_depth`` in flight.  Default: 1 MiB (or the
        device's optimal-io-size), within max-transfer; settable."""
        return self._live().handle.large_io[0]

    @large_io_chunk.setter
    def large_io_chunk(self, value):
        self._live().handle.set_large_io(value, None)

    @property
    def large_io_depth(self) -> int:
        """Chunks of a large read or write in flight at once (default 8)."""
        return self._live().handle.large_io[1]

    @large_io_depth.setter
    def large_io_depth(self, value):
        self._live().handle.set_large_io(None, value)

    def read(self, offset, nbytes, *, chunk=None, depth=None):
        """Read ``nbytes`` at ``offset`` into a new numpy uint8 array (mapped
        memory from ``alloc``, so no copy on any driver).  Reads longer than
        ``chunk`` bytes are pipelined, ``depth`` chunks in flight (default:
        ``large_io_chunk`` and ``large_io_depth``)."""
        cdef DeviceCore core = self._live()
        cdef uint64_t off = as_u64(offset, "offset"), n = as_u64(nbytes, "nbytes")
        cdef uint64_t ck = _chunk(core, chunk)
        cdef int dp = _depth(depth)
        cdef Py_ssize_t entry = core_enter(core)
        try:
            if n == 0:
                blocking_io(core.blocking_engine(entry), READ, off, 0, None, 0)  # the checks
                return np.empty(0, dtype=np.uint8)
            out = core.arena.alloc(n)
            # readinto's path: one recycled Completion where no split is needed
            blocking_one(blocking_engine_of(core, entry), READ, off, out, 0, ck, dp,
                         guard_thread(&core.handle.guard, entry))
            return out
        finally:
            core_leave(core, entry)

    def readinto(self, offset, buf, *, chunk=None, depth=None):
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (any writable
        contiguous buffer); returns the number of bytes read.  ``chunk`` and
        ``depth``: the pipeline for large reads, as in ``read``."""
        return self._one(READ, offset, buf, 0, chunk, depth)

    def write(self, offset, buf, *, bint fua=False, chunk=None, depth=None):
        """Write ``buf`` (any contiguous buffer, bytes included) at ``offset``;
        ``fua=True`` makes it durable before returning.  Returns bytes written.
        ``chunk`` and ``depth``: the pipeline for large writes, as in ``read``
        (on a host-managed zoned device the chunks go one at a time, in order)."""
        return self._one(WRITE, offset, buf, lb.BLKIO_REQ_FUA if fua else 0, chunk, depth)

    cdef object _one(self, int op, object offset, object buf, unsigned int flags,
                     object chunk, object depth):
        """readinto and write: one buffer, the hot path (blocking_one)."""
        cdef DeviceCore core = self.core
        if core is None:
            raise no_device_error()
        cdef uint64_t off = as_u64(offset, "offset")
        cdef uint64_t ck = 0 if chunk is None else core.handle.check_io_chunk(chunk)
        cdef int dp = 0 if depth is None else check_io_depth(depth)
        cdef Py_ssize_t entry = core_enter(core)
        try:
            return blocking_one(blocking_engine_of(core, entry), op, off, buf, flags, ck, dp,
                                guard_thread(&core.handle.guard, entry))
        finally:
            core_leave(core, entry)

    def readv(self, offset, bufs, *, chunk=None, depth=None):
        """Read consecutive bytes at ``offset`` into each buffer of ``bufs`` in
        turn; returns the total.  Pipelined like ``read``."""
        return self._vectored(READ, offset, bufs, 0, chunk, depth)

    def writev(self, offset, bufs, *, bint fua=False, chunk=None, depth=None):
        """Write the buffers of ``bufs`` back to back at ``offset``.
        Pipelined like ``write``."""
        return self._vectored(WRITE, offset, bufs, lb.BLKIO_REQ_FUA if fua else 0, chunk, depth)

    cdef object _vectored(self, int op, object offset, object bufs, unsigned int flags,
                          object chunk, object depth):
        cdef DeviceCore core = self._live()
        cdef uint64_t off = as_u64(offset, "offset")
        cdef uint64_t ck = _chunk(core, chunk)
        cdef int dp = _depth(depth)
        cdef HeldBuffers v
        cdef Py_ssize_t entry = core_enter(core)
        try:
            v = hold_buffers(bufs, op == READ, False)
            return blocking_io(core.blocking_engine(entry), op, off, v.total, v, flags, ck, dp)
        finally:
            core_leave(core, entry)

    def write_zeroes(self, offset, length, *, bint fua=False,
                     bint may_unmap=True, bint no_fallback=False):
        """Write ``length`` zero bytes at ``offset``.  ``may_unmap=False``
        keeps the blocks allocated; ``no_fallback=True`` fails rather than
        writing zeroes the slow way."""
        self._plain(WRITE_ZEROES, offset, length, zero_flags(fua, may_unmap, no_fallback))

    def discard(self, offset, length):
        """Discard ``length`` bytes at ``offset`` (advisory: a device that
        cannot discard answers success)."""
        self._plain(DISCARD, offset, length, 0)

    def flush(self):
        """Make completed writes durable."""
        self._plain(FLUSH, 0, 0, 0)

    cdef object _plain(self, int op, object offset, object length, unsigned int flags):
        cdef DeviceCore core = self._live()
        cdef uint64_t off = as_u64(offset, "offset"), n = as_u64(length, "length")
        cdef Py_ssize_t entry = core_enter(core)
        try:
            blocking_io(core.blocking_engine(entry), op, off, n, None, flags)
        finally:
            core_leave(core, entry)

    # ---- queues --------------------------------------------------------------

    def queue(self, index=0):
        """Queue ``index`` (0 .. num_queues-1)."""
        cdef DeviceCore core = self._live()
        return _queue_of(core, core.engine_at(as_index(index, "index"), False))

    def poll_queue(self, index=0):
        """Poll queue ``index`` (0 .. num_poll_queues-1)."""
        cdef DeviceCore core = self._live()
        return _queue_of(core, core.engine_at(as_index(index, "index"), True))

    @property
    def queues(self):
        """The device's queues (regular, then poll queues)."""
        cdef DeviceCore core = self._live()
        return tuple(_queue_of(core, e) for e in core.live_engines())

    def close(self, timeout=10.0):
        """Close the device; safe to call twice, and from any thread.

        New calls raise ``ValueError`` at once; calls in progress in other
        threads return with that error within a fraction of a second (their
        requests stay in flight); requests in flight are waited for (up to
        ``timeout`` seconds); then memory is unmapped and the instance
        destroyed.  Arrays from ``alloc`` stay valid.  Memory of requests that
        never completed is kept, never freed under the device.  In the child
        of a fork(), close() releases nothing of the parent's."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
        if self.core is not None:
            self.core.close(float(timeout))


def bind(DeviceFront front not None, DeviceCore core not None):
    """Give a new blkio.Device its core (``blkio.open`` does, once)."""
    if front.core is not None:
        raise ValueError("this device already has its core")
    front.core = core
    core.set_front(front)


def zone_request(DeviceFront front not None, int op, offset=0, zones=None):
    """One zone request on the calling thread's queue, waited for (GIL
    released); returns its ``ret`` (the zones filled in, for a report).
    For blkio._zones, which gives it its public forms."""
    cdef DeviceCore core = front._live()
    cdef uint64_t off = as_u64(offset, "offset")
    cdef Py_ssize_t entry = core_enter(core)
    try:
        return blocking_zone(core.blocking_engine(entry), op, off, zones)
    finally:
        core_leave(core, entry)


def check_zone(DeviceFront front not None, int op, offset):
    """Raise what is wrong with a zone request of ``op`` at ``offset`` (a
    device that is not zoned, an offset that is not a zone start...)."""
    cdef DeviceCore core = front._live()
    cdef uint64_t off = as_u64(offset, "offset")
    cdef DeviceHandle h = core.handle
    cdef int problem = zone_problem(&h.lim, op, off)
    if problem:
        raise problem_error(problem, h.driver, &h.lim, op, off, 0)


def add_queue(DeviceFront front not None, bint poll):
    """A new queue of the device (the facade checked can-add-queues)."""
    cdef DeviceCore core = front._live()
    return _queue_of(core, core.add_queue(poll))


def remove_queue(DeviceFront front not None, Queue queue not None, double timeout):
    """Remove ``queue`` from the device (see ``Device.remove_queue``)."""
    cdef DeviceCore core = front._live()
    if queue.core is not core or queue.engine is None:
        raise ValueError("queue is not a live queue of this device")
    core.remove_queue(queue.engine, timeout)


def large_io_plan(DeviceFront front not None, nbytes, chunk=None, depth=None, bint write=False):
    """How a read (or write) of ``nbytes`` is cut: (chunk bytes, pieces in
    flight), or (nbytes, 1) when it goes as one request (for tests and tools)."""
    cdef DeviceCore core = front._live()
    cdef DeviceHandle h = core.handle
    cdef uint64_t n = as_u64(nbytes, "nbytes"), ck = _chunk(core, chunk) or h.policy.io_chunk
    cdef int dp = _depth(depth) or h.policy.io_depth
    if n <= ck:
        return n, 1
    return ck, (1 if write and h.lim.zoned == 2 else dp)


def core_of(DeviceFront front not None):
    """The core of a blkio.Device, for the facade's own modules."""
    if front.core is None:
        raise no_device_error()
    return front.core


# ---- queues ---------------------------------------------------------------------------

cdef Queue _queue_of(DeviceCore core, QueueEngine e):
    if e.api is None:
        q = Queue.__new__(Queue)
        (<Queue>q).core = core
        (<Queue>q).engine = e
        e.api = q
    return <Queue>e.api


cdef Py_ssize_t _enter_even_broken(Queue q) except -1:
    """``_enter`` for what a broken device still does: hand out what failed
    (the asyncio port's routing of what its backend's hang-up failed)."""
    cdef DeviceCore core = q.core
    if core is None:
        raise no_device_error()
    cdef Py_ssize_t dentry = core_enter(core)
    cdef QueueEngine e = q.engine
    if e.removing or e.q == NULL:
        core_leave(core, dentry)
        raise removed_error(e.index)
    return dentry * (GUARD_THREADS + 1) + queue_use(e)


@cython.final
cdef class Queue:
    """One libblkio queue.  Enqueue requests, then ``submit``/``wait``/``completions``.

    Each queue serialises its own use with a lock taken without the GIL, so
    several threads may share one; one queue per thread is the fast way.
    Made by ``Device.queue()``, ``Device.poll_queue()``, ``Device.add_queue()``.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("blkio.Queue cannot be built directly; use Device.queue(), "
                        "Device.poll_queue() or Device.add_queue()")

    def __reduce__(self):
        raise TypeError("a blkio.Queue cannot be pickled: it belongs to a device of this "
                        "process; open the device in the other process and use its queues")

    # ---- per request ---------------------------------------------------------

    cdef object _enqueue(self, int op, object offset, object buf, uint64_t length,
                         unsigned int flags, object user_data, bint vectored):
        cdef uint64_t off = as_u64(offset, "offset")
        cdef Py_ssize_t entries = _enter(self)
        try:
            return enqueue_request(self.engine, op, off, buf, vectored, flags, user_data, length)
        finally:
            _leave(self, entries)

    def enqueue(self, op, offset=0, buf=None, length=0, flags=0,
                user_data=None, bint vectored=False):
        """Enqueue one request of any kind without waiting for it: ``op``
        (an ``Op``: READ .. FLUSH), ``offset`` and ``buf`` (a buffer, or a
        sequence of them with ``vectored=True``) for reads and writes,
        ``length`` for write-zeroes and discard; ``flags`` (``REQ_FUA`` ...).
        The request is sent with the next ``submit()``/``wait()``/
        ``completions()``.  Returns the request's length in bytes."""
        cdef Py_ssize_t code = as_index(op, "op")
        if not op_in(code, READ, FLUSH):
            raise ValueError(f"unknown op {op!r} (Op.READ .. Op.FLUSH; zone requests: "
                             f"enqueue_zone)")
        return self._enqueue(<int>code, offset, buf, as_u64(length, "length"),
                             request_flags(flags), user_data, vectored)

    def read(self, offset, buf, *, user_data=None):
        """Enqueue a read into ``buf`` (a writable contiguous buffer)."""
        return self._enqueue(READ, offset, buf, 0, 0, user_data, False)

    def write(self, offset, buf, *, user_data=None, bint fua=False):
        """Enqueue a write of ``buf``."""
        return self._enqueue(WRITE, offset, buf, 0, lb.BLKIO_REQ_FUA if fua else 0, user_data, False)

    def readv(self, offset, bufs, *, user_data=None):
        """Enqueue a vectored read into the buffers of ``bufs``."""
        return self._enqueue(READ, offset, bufs, 0, 0, user_data, True)

    def writev(self, offset, bufs, *, user_data=None, bint fua=False):
        """Enqueue a vectored write of the buffers of ``bufs``."""
        return self._enqueue(WRITE, offset, bufs, 0, lb.BLKIO_REQ_FUA if fua else 0, user_data, True)

    def write_zeroes(self, offset, length, *, user_data=None, bint fua=False,
                     bint may_unmap=True, bint no_fallback=False):
        """Enqueue a write-zeroes request of ``length`` bytes at ``offset``."""
        return self._enqueue(WRITE_ZEROES, offset, None, as_u64(length, "length"),
                             zero_flags(fua, may_unmap, no_fallback), user_data, False)

    def discard(self, offset, length, *, user_data=None):
        """Enqueue a discard request of ``length`` bytes at ``offset``."""
        return self._enqueue(DISCARD, offset, None, as_u64(length, "length"), 0,
                             user_data, False)

    def flush(self, *, user_data=None):
        """Enqueue a flush request."""
        return self._enqueue(FLUSH, 0, None, 0, 0, user_data, False)

    def submit(self):
        """Submit enqueued requests without waiting.  Completions that are
        already there (cached reads complete during submission) are kept for
        the next ``wait()`` or ``completions()``."""
        cdef Py_ssize_t entries = _enter(self)
        try:
            self.engine.drive(0, 0.0, None)
        finally:
            _leave(self, entries)

    def wait(self, min=1, max=None, timeout=None):
        """Submit, then wait for at least ``min`` completions; return up to
        ``max`` of them as ``Completion`` objects.  The GIL is released while
        waiting; Ctrl-C interrupts.  ``timeout`` (seconds) raises TimeoutError,
        leaving requests in flight and tracked."""
        cdef Py_ssize_t nmin = as_index(min, "min")
        if max is not None:
            max = as_index(max, "max")
        if nmin < 0:
            raise ValueError("min must be >= 0")
        if max is not None and max < nmin:
            raise ValueError(f"max ({max}) must be >= min ({nmin})")
        cdef double t = _seconds(timeout)
        cdef Py_ssize_t entries = _enter(self)
        cdef QueueEngine e = self.engine
        try:
            have = len(e.ready)
            if nmin > have + e.unreaped:
                raise ValueError(f"min={nmin} but only {have + e.unreaped} "
                                 f"request(s) are in flight or completed")
            if nmin > have:
                e.drive(nmin - have, t, None)
            else:
                e.drive(0, 0.0, None)
            return e.take(max)
        finally:
            _leave(self, entries)

    def completions(self, max=None):
        """Submit what is enqueued and return the completions available now
        (up to ``max``), without waiting."""
        if max is not None:
            max = as_index(max, "max")
        cdef Py_ssize_t entries = _enter(self)
        try:
            self.engine.drive(0, 0.0, None)
            return self.engine.take(max)
        finally:
            _leave(self, entries)

    def poll(self, max=None):
        """Deprecated alias of ``completions()`` (``poll`` also names
        libblkio's poll queues and busy-polling)."""
        warnings.warn("Queue.poll() is deprecated; use Queue.completions()",
                      DeprecationWarning, stacklevel=2)
        return self.completions(max)

    # ---- batch: no Python object per request -----------------------------------

    cdef object _submit_batch(self, int op, offsets, buffers, user_data, unsigned int flags,
                              region, blocksize):
        cdef uint64_t bs = as_u64(blocksize, "blocksize")
        cdef Py_ssize_t entries = _enter(self)
        cdef QueueEngine e = self.engine
        cdef BatchArrays a
        try:
            a = batch_arrays(op, offsets, buffers, user_data, region, bs)
            check_batch(a, e.handle, op, e.depth - e.in_libblkio if e.depth else -1)
            e.enqueue_batch(op, a, flags)
            return a.n
        finally:
            _leave(self, entries)

    def submit_reads(self, offsets, buffers, *, user_data=None, region=None, blocksize=0):
        """Enqueue and submit n reads in one GIL-free call.

        ``offsets``: n device offsets (a uint64 array, or any integer array
        or sequence); ``buffers``: a C-contiguous uint8[n, blocksize] view of
        memory from ``Device.alloc`` or ``Device.register`` -- or, with
        ``region`` (such memory, 1-D uint8) and ``blocksize``, n byte offsets
        into ``region``; ``user_data``: optional n int64 tags (default
        0..n-1).  The whole batch is validated before anything is enqueued;
        no Python object is made per request.  Returns n."""
        return self._submit_batch(READ, offsets, buffers, user_data, 0, region, blocksize)

    def submit_writes(self, offsets, buffers, *, bint fua=False, user_data=None, region=None,
                      blocksize=0):
        """Like ``submit_reads``, for writes."""
        return self._submit_batch(WRITE, offsets, buffers, user_data,
                                  lb.BLKIO_REQ_FUA if fua else 0, region, blocksize)

    def reap(self, out, min=0, timeout=None):
        """Fill ``out`` (a structured array with int64 ``user_data`` and int32
        ``ret`` fields) with completions of batch requests, waiting for at
        least ``min`` (``timeout`` seconds: TimeoutError).  Returns the count."""
        cdef Py_ssize_t nmin = as_index(min, "min")
        if nmin < 0:
            raise ValueError("min must be >= 0")
        cdef double t = _seconds(timeout)
        cdef Py_ssize_t entries = _enter(self)
        cdef QueueEngine e = self.engine
        try:
            if out is not e.ring.out:
                e.ring.set_out(out)
            if nmin > e.ring.out_len:
                raise ValueError(f"min={nmin} exceeds the size of out ({e.ring.out_len})")
            if nmin > e.ring.ready + e.ring.in_flight:
                raise ValueError(f"min={nmin} but only {e.ring.ready + e.ring.in_flight} "
                                 f"batch request(s) are in flight or completed")
            if e.ring.ready < nmin:
                while e.ring.ready < nmin:
                    e.drive(<int>(nmin - e.ring.ready), t, None)
            elif e.ring.ready == 0:
                e.drive(0, 0.0, None)
            return e.ring.copy_out()
        finally:
            _leave(self, entries)

    @property
    def failed(self) -> int:
        """Batch completions reaped with ret < 0 so far (check ``ret`` in
        ``out`` for which)."""
        return self.engine.ring.failed if self.engine is not None else 0

    # ---- zoned devices ------------------------------------------------------------

    def enqueue_zone(self, op, offset=0, zones=None, *, user_data=None):
        """Enqueue one zone request without waiting for it: ``op`` is one of
        ``Op.REPORT_ZONES`` .. ``Op.RESET_ALL_ZONES``; ``offset`` (bytes) a
        zone start (a report rounds it down to its zone's start); ``zones``
        the report's buffer.  Checked before anything is enqueued: a device
        that is not zoned, an offset that is not a zone start or past the
        end, a read-only device (ValueError / ReadOnlyError).  Returns the
        number of zones a report asks for (0 for the others)."""
        cdef Py_ssize_t code = as_index(op, "op")
        if not op_in(code, REPORT_ZONES, RESET_ALL_ZONES):
            raise ValueError(f"{op!r} is not a zone request (Op.REPORT_ZONES .. Op.RESET_ALL_ZONES)")
        cdef uint64_t off = as_u64(offset, "offset")
        cdef Completion c
        cdef Py_ssize_t entries = _enter(self)
        try:
            c = zone_completion(self.engine, <int>code, off, zones, TO_CALLER, user_data,
                                None, False)
            self.engine.enqueue_one(c, False)
            return c.length // ZONE_DTYPE.itemsize
        finally:
            _leave(self, entries)

    def report_zones(self, offset, zones, *, user_data=None):
        """Enqueue a report of the zones from the one holding ``offset``
        (bytes; libblkio rounds it down to that zone's start) into ``zones``,
        a writable buffer of ``blkio.ZONE_DTYPE`` records (64 bytes, one per
        zone wanted).  The buffer is held until the completion is reaped; its
        ``ret`` is the number of zones filled in (fewer near the end of the
        device).  Returns the number of zones asked for."""
        return self.enqueue_zone(REPORT_ZONES, offset, zones, user_data=user_data)

    def open_zone(self, offset, *, user_data=None):
        """Enqueue an explicit open of the zone starting at ``offset`` (bytes)."""
        return self.enqueue_zone(OPEN_ZONE, offset, user_data=user_data)

    def close_zone(self, offset, *, user_data=None):
        """Enqueue a close of the open zone starting at ``offset`` (bytes)."""
        return self.enqueue_zone(CLOSE_ZONE, offset, user_data=user_data)

    def finish_zone(self, offset, *, user_data=None):
        """Enqueue a finish (make FULL) of the zone starting at ``offset`` (bytes)."""
        return self.enqueue_zone(FINISH_ZONE, offset, user_data=user_data)

    def reset_zone(self, offset, *, user_data=None):
        """Enqueue a reset (make EMPTY, write pointer to its start) of the
        zone starting at ``offset`` (bytes)."""
        return self.enqueue_zone(RESET_ZONE, offset, user_data=user_data)

    def open_all_zones(self, *, user_data=None):
        """Enqueue an open of every CLOSED zone (the device's "select all")."""
        return self.enqueue_zone(OPEN_ALL_ZONES, user_data=user_data)

    def close_all_zones(self, *, user_data=None):
        """Enqueue a close of every open zone."""
        return self.enqueue_zone(CLOSE_ALL_ZONES, user_data=user_data)

    def finish_all_zones(self, *, user_data=None):
        """Enqueue a finish of every open or closed zone."""
        return self.enqueue_zone(FINISH_ALL_ZONES, user_data=user_data)

    def reset_all_zones(self, *, user_data=None):
        """Enqueue a reset of every open, closed or full zone."""
        return self.enqueue_zone(RESET_ALL_ZONES, user_data=user_data)

    # ---- the completion fd -----------------------------------------------------------

    @property
    def completion_fd(self) -> int:
        """The queue's completion fd (-1 on poll queues).  Enable it with
        ``completion_fd_enabled = True`` before waiting on it; reset it with
        ``reset_completion_fd()``, then call ``completions()``."""
        if self.engine is not None and self.engine.is_poll_queue:
            return -1
        cdef Py_ssize_t entries = _enter(self)
        try:
            return self.engine.completion_fd()
        finally:
            _leave(self, entries)

    def reset_completion_fd(self):
        """Reset the completion fd (read its 8-byte count) while holding the
        queue's lock: libblkio's virtio drivers read the same eventfd inside
        ``blkioq_do_io`` and fail with EAGAIN when another thread drained it
        first.  Returns True if it was set."""
        cdef Py_ssize_t entries = _enter(self)
        try:
            if self.engine.is_poll_queue:
                raise ValueError("poll queues have no completion fd")
            return self.engine.reset_fd(self.engine.completion_fd())
        finally:
            _leave(self, entries)

    @property
    def completion_fd_enabled(self) -> bool:
        """Whether the driver signals completions on ``completion_fd``.
        libblkio (after 1.3) leaves it disabled by default."""
        if self.engine is None:
            raise no_device_error()
        if self.engine.is_poll_queue:
            raise ValueError("poll queues have no completion fd")
        return self.engine.fd_enabled

    @completion_fd_enabled.setter
    def completion_fd_enabled(self, bint value):
        cdef Py_ssize_t entries = _enter(self)
        try:
            if self.engine.is_poll_queue:
                raise ValueError("poll queues have no completion fd")
            self.engine.set_fd_enabled(value)
        finally:
            _leave(self, entries)

    # ---- state ---------------------------------------------------------------------------

    @property
    def index(self) -> int:
        """The queue's index among the device's queues (or poll queues)."""
        return self.engine.index if self.engine is not None else -1

    @property
    def is_poll_queue(self) -> bool:
        """True for a poll queue (completions only by polling; no fd)."""
        return self.engine is not None and self.engine.is_poll_queue

    @property
    def depth(self) -> int:
        """The driver's queue depth (num-entries / queue-size); 0 when unknown."""
        return self.engine.depth if self.engine is not None else 0

    @property
    def slots(self) -> int:
        """Deprecated alias of ``depth``."""
        warnings.warn("Queue.slots is deprecated; use Queue.depth", DeprecationWarning,
                      stacklevel=2)
        return self.depth

    @property
    def in_flight(self) -> int:
        """Requests submitted or enqueued and not yet reaped."""
        return self.engine.unreaped if self.engine is not None else 0

    @property
    def requests(self) -> int:
        """Requests handed to libblkio through this queue so far."""
        return self.engine.n_requests if self.engine is not None else 0

    @property
    def removed(self) -> bool:
        """True once the queue is being removed, or its device closed."""
        cdef QueueEngine e = self.engine
        return (e is None or e.removed or e.removing or e.q == NULL or e.handle.closing
                or e.handle.forked())

    @property
    def device(self):
        """The Device this queue belongs to (None once it is gone)."""
        if self.core is None or self.core.front is None:
            return None
        return self.core.front()

    def __repr__(self):
        if self.engine is None:
            return "<blkio.Queue of no device>"
        kind = "poll queue" if self.engine.is_poll_queue else "queue"
        return f"<blkio.Queue {kind} {self.engine.index} in_flight={self.engine.unreaped}>"


cdef unsigned int request_flags(object flags) except? 0xFFFFFFFF:
    """``flags`` of Queue.enqueue: REQ_FUA, REQ_NO_UNMAP, REQ_NO_FALLBACK or'ed."""
    cdef uint64_t f = as_u64(flags, "flags")
    if f & ~<uint64_t>(lb.BLKIO_REQ_FUA | lb.BLKIO_REQ_NO_UNMAP | lb.BLKIO_REQ_NO_FALLBACK):
        raise ValueError(f"flags={f:#x}: only blkio.REQ_FUA, REQ_NO_UNMAP and REQ_NO_FALLBACK")
    return <unsigned int>f


cdef double _seconds(object timeout) except? -2.0:
    """A wait's timeout in seconds (-1: none)."""
    if timeout is None:
        return -1.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
    return float(timeout)


# ---- the bounce pool ---------------------------------------------------------------------

cdef BouncePool _make_pool(DeviceCore core):
    cdef BouncePool p = BouncePool.__new__(BouncePool)
    p.core = core
    p.space = core.space
    return p


@cython.final
cdef class BouncePool:
    """Mapped memory for data the driver cannot use where it is.

    ``acquire(nbytes)`` returns a numpy uint8 array of pool memory (sizes are
    rounded up to the pool's granule, a multiple of mem-region-alignment);
    ``release(array)`` gives it back.  Allocation is first-fit over the holes
    between live buffers (O(log n)).  When nothing is in use and a request does
    not fit, the pool is replaced by a larger one, up to ``max_size``; a
    request larger than ``max_size`` fails at once.  Waiters are served first
    come, first served; a woken waiter that still does not fit keeps its place
    at the front.  Thread-safe; ``acquire_async`` waits on the same queue.
    Made by the device: ``Device.bounce_pool``.
    """

    cdef DeviceCore core
    cdef BounceSpace space

    def __init__(self, *args, **kwargs):
        raise TypeError("blkio.BouncePool cannot be built directly; use Device.bounce_pool")

    def __reduce__(self):
        raise TypeError("a blkio.BouncePool cannot be pickled: it is memory mapped into a "
                        "device of this process")

    cdef BounceSpace _live(self):
        if self.space is None or self.core is None:
            raise no_device_error()
        return self.space

    def acquire(self, nbytes, timeout=None):
        """A uint8 array of ``nbytes`` of pool memory (mapped into the device).

        Waits, first come first served, until space is free; ``timeout``
        seconds (None: forever) bound the wait (``TimeoutError``).  A request
        larger than ``max_size`` raises ``ValueError``.
        """
        cdef uint64_t n = as_u64(nbytes, "nbytes")
        cdef double t = _seconds(timeout)
        self._live().check_open()
        cdef Py_ssize_t entry = core_enter(self.core)   # growing the pool maps memory
        cdef Py_ssize_t start
        try:
            start = wait_for_space(self.space, None, n, t)
        finally:
            core_leave(self.core, entry)
        return self.space.array(start, n)

    async def acquire_async(self, nbytes):
        """Coroutine form of ``acquire``: waits in the same FIFO without
        blocking the event loop.  Returns the array."""
        import asyncio
        cdef uint64_t n = as_u64(nbytes, "nbytes")
        cdef BounceSpace space = self._live()
        space.check_open()
        cdef size_t size = space.checked_size(n)
        cdef Py_ssize_t start = self._step(size, None)
        if start >= 0:
            return space.array(start, n)
        waiter = AsyncWaiter(asyncio.get_running_loop())
        start = space.fifo_enter(size, waiter)
        if start >= 0:
            return space.array(start, n)
        try:
            while True:
                space.check_open()
                start = self._step(size, waiter)
                if start >= 0:
                    return space.array(start, n)
                await waiter.future
        except BaseException:
            space.fifo_leave(waiter)
            raise

    cdef Py_ssize_t _step(self, size_t size, object waiter) except -2:
        """One try for space, inside the device's guard (growing the space
        maps memory): at once (no ``waiter``), or at the waiter's turn."""
        cdef Py_ssize_t entry = core_enter(self.core)
        try:
            if waiter is None:
                return self.space.try_acquire(size)
            return self.space.fifo_turn(size, waiter)
        finally:
            core_leave(self.core, entry)

    def release(self, array):
        """Give back an array from ``acquire``."""
        self._live().release(array)

    @property
    def size(self) -> int:
        """Current pool size in bytes."""
        return self._live().buffer.size

    @property
    def in_use(self) -> int:
        """Bytes currently handed out."""
        cdef BounceSpace space = self._live()
        return space.allocator.used * space.granule

    @property
    def granule(self) -> int:
        """Allocation unit in bytes (a multiple of mem-region-alignment)."""
        return self._live().granule

    @property
    def max_size(self) -> int:
        """Upper bound of the pool size in bytes (settable)."""
        return self._live()._max_size

    @max_size.setter
    def max_size(self, value):
        self._live().set_max_size(as_u64(value, "max_size"))

    @property
    def waiting(self) -> int:
        """Number of callers waiting for space."""
        return len(self._live().waiters)

    def __repr__(self):
        if self.space is None:
            return "<blkio.BouncePool of no device>"
        return (f"<blkio.BouncePool size={self.size} in_use={self.in_use} "
                f"max_size={self.max_size} waiting={self.waiting}>")
