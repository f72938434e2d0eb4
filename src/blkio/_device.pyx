"""The device as the facade sees it: lifecycle, queues, memory, blocking I/O, close.

``_DeviceCore`` (``blkio.Device`` is its Python subclass) owns a
``DeviceHandle`` (the libblkio instance), the list of its queues, the alloc
arena and the bounce pool.  Blocking calls enter the device's guard and hand
the request to the request path in ``_requests``; ``close()`` and
``remove_queue()`` are the guard's other half (see ``_handle``).  This module
calls libblkio only through those two modules, and it never parses user
options: the facade turns keywords into typed property calls.
"""

from libc.stdint cimport uint64_t, int64_t, uintptr_t
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_ANY_CONTIGUOUS, Py_buffer

from ._args cimport as_u64, as_index
from ._posix cimport ECANCELED
from libc.errno cimport EIO
from ._libblkio cimport blkioq
from cpython.pythread cimport PyThread_get_thread_ident
from ._handle cimport (DeviceHandle, GUARD_THREADS, ST_BROKEN, guard_own, handle_enter,
                       handle_leave, unraisable, check_io_depth)
from ._memory cimport Buffer, ArenaSlice, owner_of
from ._requests cimport (Completion, HeldBuffers, Queue, READ, WRITE, WRITE_ZEROES, DISCARD,
                         FLUSH, blocking_io, blocking_one, blocking_zone, check_request,
                         hold_buffers, pipeline_depth, set_ret, zero_flags)

import time
import warnings

import numpy as np

from ._handle import State
from ._requests import REQ_FUA as _REQ_FUA, kept_for_the_kernel as _kept_for_the_kernel

# close() and remove_queue() wait for calls to leave a little longer than a
# wait slice of _requests (0.1 s), so that a wait in progress can notice.
cdef double LEAVE_SLACK = 0.25


cdef inline Queue _blocking_queue(_DeviceCore d, Py_ssize_t slot):
    """The queue of a thread's blocking calls: each thread (by its slot in
    the device's guard) gets a queue of its own while the device has enough,
    and threads beyond that share (``Queue.wait_shared``).  None when no
    queue is left."""
    cdef list qs = d.blocking
    cdef Py_ssize_t n = len(qs)
    if n == 1:
        return <Queue>qs[0]
    if n == 0:
        return None
    if slot >= GUARD_THREADS:        # a thread the guard does not track
        slot = <Py_ssize_t>(PyThread_get_thread_ident() % <unsigned long>n)
    return <Queue>qs[slot % n]


cdef void _warn_kept(DeviceHandle h, int kept):
    # Said once the queue or device is gone: warnings may be errors, and a
    # close must not stop halfway.
    if kept:
        warnings.warn(f"{h.driver}: {kept} request(s) did not complete before the device "
                      f"(or queue) went away; their memory is kept until the process exits",
                      ResourceWarning, stacklevel=3)


cdef int _check_queues_open(DeviceHandle h) except -1:
    if h.closing or h.b == NULL:
        raise h.closed_error()
    if h.state != ST_BROKEN:      # a broken device still shows its queues
        h.ensure_started()
    return 0


cdef class _DeviceCore:
    """The libblkio instance, its queues and memory.  Use ``blkio.open``."""

    def __cinit__(self, *args, **kwargs):
        self.handle = DeviceHandle()
        self._queues = []
        self._poll_queues = []
        self.close_callbacks = []
        self.close_timeout = 10.0
        self.handle.on_last_leave = self._destroy

    # ---- lifecycle primitives used by the facade -------------------------

    def _create(self, str driver):
        self.handle.create(driver)

    def _get(self, str name, str kind):
        """Read property ``name`` with the getter for C type ``kind``."""
        return self.handle.get(name, kind)

    def _set(self, str name, str kind, object value):
        """Write property ``name`` with the setter for C type ``kind``."""
        self.handle.set(name, kind, value)

    def _connect(self):
        self.handle.connect()

    def _start(self):
        self.handle.start()

    def _configure(self, limits, uint64_t capacity, bint read_only, backend_fds=(), int slots=0):
        """Copy the validated limits to C and set up queues and memory."""
        cdef DeviceHandle h = self.handle
        cdef blkioq *q
        cdef int i
        h.configure(limits, capacity, read_only, backend_fds)
        granule = h.granule
        self.arena = Arena(h, granule, 64 << 20)
        self._bounce_pool = BouncePool(h, granule, 1 << 20, 256 << 20)
        for poll, lst in ((False, self._queues), (True, self._poll_queues)):
            i = 0
            while True:
                q = h.get_queue(i, poll)
                if q == NULL:
                    break
                lst.append(Queue.new(h, self._bounce_pool, self, q, i, poll, slots))
                i += 1
        self.blocking = list(self._queues)

    def _refresh(self, limits, uint64_t capacity):
        self.handle.set_capacity(capacity)

    def _fail_backend(self):
        """The backend died: fail what is in flight, refuse further I/O."""
        for q in self._queues + self._poll_queues:
            if q is not None:
                (<Queue>q).fail_all(EIO)
        self.handle.mark_broken()

    # ---- state -------------------------------------------------------------

    @property
    def driver(self) -> str:
        """The libblkio driver's name (one of ``blkio.DRIVERS``)."""
        return self.handle.driver

    @property
    def state(self):
        """The device's ``blkio.State`` (compares equal to its name)."""
        if self.handle.closing:
            return State.CLOSED
        return self.handle.state_name

    @property
    def capacity(self) -> int:
        """The device's size in bytes, read once at start (``refresh_limits()``
        reads it again)."""
        return self.handle.lim.capacity

    @property
    def read_only(self) -> bool:
        """True when the device was opened read-only (``read_only=True``) or
        libblkio reports it so: writes raise ``ReadOnlyError``."""
        return self.handle.lim.read_only

    @property
    def closed(self) -> bool:
        """True once close() has begun: no new call is accepted."""
        return self.handle.closing or self.handle.b == NULL

    @property
    def spin_us(self) -> int:
        """Microseconds that waits busy-poll for a completion before sleeping
        (0, the default: never).  A few tens of µs cut the latency of
        backends whose wake-ups are slow (vhost-user) at the cost of CPU."""
        return self.handle.spin_ns // 1000

    @spin_us.setter
    def spin_us(self, value):
        cdef Py_ssize_t v = as_index(value, "spin_us")
        if v < 0:
            raise ValueError("spin_us must be >= 0")
        self.handle.spin_ns = <int64_t>v * 1000

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
        """The device's ``BouncePool``."""
        return self._bounce_pool

    @property
    def mapped_regions(self) -> int:
        """Number of memory regions the device holds (mapped where the driver
        needs or pins memory regions)."""
        return len(self.handle.regions)

    def _stats(self):
        cdef DeviceHandle h = self.handle
        return (h.n_requests, h.n_bounced, h.bounced_bytes, h.n_split)

    def _on_close(self, callback):
        """Call ``callback(queue, completions)`` for each queue when the
        device is closed or the queue removed, with the completions nobody
        collected (drained, or failed because they never completed)."""
        self.close_callbacks.append(callback)

    # ---- memory ------------------------------------------------------------

    def alloc(self, nbytes):
        """A numpy uint8 array of ``nbytes`` mapped into this device.

        Aligned to mem-region-alignment and at least 4096 bytes.  I/O on it is
        zero-copy on every driver.  The memory outlives the device; it returns
        to the device's arena when the array (and every view of it) is gone.
        """
        cdef uint64_t n = as_u64(nbytes, "nbytes")
        if n == 0:
            raise ValueError("alloc size must be positive")
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            h.ensure_started()
            return self.arena.alloc(n)
        finally:
            handle_leave(h, slot)

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
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t slot = handle_enter(h)
        cdef Py_buffer view
        cdef uintptr_t addr
        cdef size_t length
        cdef int fd = -1
        cdef int64_t fd_offset = 0
        cdef Buffer buf
        try:
            h.ensure_started()
            PyObject_GetBuffer(array, &view, PyBUF_ANY_CONTIGUOUS)
            addr = <uintptr_t>view.buf
            length = <size_t>view.len
            PyBuffer_Release(&view)
            align = h.lim.mem_region_alignment
            if length == 0 or addr % align or length % align:
                raise ValueError(f"cannot register {length} bytes at {addr:#x}: address and size "
                                 f"must be multiples of mem-region-alignment ({align})")
            if h.in_range(addr, length):
                return True     # already inside registered memory (alloc arena, a Buffer)
            owner = owner_of(array)
            if owner is not None:
                buf = owner.buffer if isinstance(owner, ArenaSlice) else owner
                fd = buf.fd
                fd_offset = <int64_t>(addr - <uintptr_t>buf.addr)
            elif h.lim.needs_mem_region_fd:
                return False    # no fd: bounced at I/O time
            h.map(addr, length, fd, fd_offset, array, True)
            return True
        finally:
            handle_leave(h, slot)

    def unregister(self, array):
        """Undo ``register``: unmap exactly the region that was mapped.

        Refuses (ValueError) while requests in flight still use the memory:
        the device could still read or write it.  Returns False when the
        memory was not registered."""
        cdef Py_buffer view
        PyObject_GetBuffer(array, &view, PyBUF_ANY_CONTIGUOUS)
        cdef uintptr_t addr = <uintptr_t>view.buf
        PyBuffer_Release(&view)
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t slot = handle_enter(h)
        cdef Py_ssize_t users = 0
        cdef uintptr_t length
        try:
            region = h.user_region(addr)
            if region is None:
                return False        # not registered, or an arena chunk / the pool
            length = region[1]
            for q in self._queues + self._poll_queues:
                if q is not None:
                    users += (<Queue>q).using(addr, addr + length)
            if users:
                raise ValueError(f"cannot unregister {length} bytes at {addr:#x}: {users} "
                                 f"request(s) in flight still use it; wait for them first")
            # Nothing in flight uses it, and nothing new can: the check and the
            # removal from the table below happen with the GIL held.
            h.unmap(addr)
            return True
        finally:
            handle_leave(h, slot)

    # ---- blocking I/O ------------------------------------------------------

    @property
    def large_io_chunk(self) -> int:
        """Reads and writes longer than this (bytes) are cut into chunks of
        this size with ``large_io_depth`` in flight.  Default: 1 MiB (or the
        device's optimal-io-size), within max-transfer; settable."""
        return self.handle.large_io[0]

    @large_io_chunk.setter
    def large_io_chunk(self, value):
        self.handle.set_large_io(value, None)

    @property
    def large_io_depth(self) -> int:
        """Chunks of a large read or write in flight at once (default 8)."""
        return self.handle.large_io[1]

    @large_io_depth.setter
    def large_io_depth(self, value):
        self.handle.set_large_io(None, value)

    def large_io_plan(self, nbytes, chunk=None, depth=None, *, bint write=False):
        """How a read (or, with ``write=True``, a write) of ``nbytes`` is cut:
        ``(chunk bytes, chunks in flight)``, or ``(nbytes, 1)`` when it goes
        as one request.  ``chunk`` and ``depth`` override the device's
        defaults (checked here: a chunk must be a multiple of
        request-alignment within max-transfer).  Writes to a host-managed
        zoned device go one chunk at a time."""
        cdef uint64_t n = as_u64(nbytes, "nbytes")
        cdef DeviceHandle h = self.handle
        cdef uint64_t ck = h.lim.io_chunk if chunk is None else h.check_io_chunk(chunk)
        cdef int dp = h.lim.io_depth if depth is None else check_io_depth(depth)
        if n <= ck:
            return n, 1
        return ck, pipeline_depth(h, WRITE if write else READ, dp)

    def read(self, offset, nbytes, *, chunk=None, depth=None):
        """Read ``nbytes`` at ``offset`` into a new numpy uint8 array (mapped
        memory from ``alloc``, so no copy on any driver).  Reads longer than
        ``chunk`` bytes are pipelined, ``depth`` chunks in flight (default:
        ``large_io_chunk`` and ``large_io_depth``)."""
        cdef uint64_t off = as_u64(offset, "offset"), n = as_u64(nbytes, "nbytes")
        cdef DeviceHandle h = self.handle
        cdef uint64_t ck = 0 if chunk is None else h.check_io_chunk(chunk)
        cdef int dp = 0 if depth is None else check_io_depth(depth)
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            check_request(h, READ, off, n)
            if n == 0:
                return np.empty(0, dtype=np.uint8)
            out = self.arena.alloc(n)
            blocking_io(h, _blocking_queue(self, slot), READ, off, n, hold_buffers(out, True, True), 0,
                        ck, dp)
            return out
        finally:
            handle_leave(h, slot)

    def readinto(self, offset, buf, *, chunk=None, depth=None):
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (any writable
        contiguous buffer); returns the number of bytes read.  ``chunk`` and
        ``depth``: the pipeline for large reads, as in ``read``."""
        cdef uint64_t off = as_u64(offset, "offset")
        cdef DeviceHandle h = self.handle
        cdef uint64_t ck = 0 if chunk is None else h.check_io_chunk(chunk)
        cdef int dp = 0 if depth is None else check_io_depth(depth)
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            return blocking_one(h, _blocking_queue(self, slot), READ, off, buf, 0, ck, dp)
        finally:
            handle_leave(h, slot)

    def write(self, offset, buf, *, bint fua=False, chunk=None, depth=None):
        """Write ``buf`` (any contiguous buffer, bytes included) at ``offset``;
        ``fua=True`` makes it durable before returning.  Returns bytes written.
        ``chunk`` and ``depth``: the pipeline for large writes, as in ``read``
        (on a host-managed zoned device the chunks go one at a time, in order)."""
        cdef uint64_t off = as_u64(offset, "offset")
        cdef DeviceHandle h = self.handle
        cdef uint64_t ck = 0 if chunk is None else h.check_io_chunk(chunk)
        cdef int dp = 0 if depth is None else check_io_depth(depth)
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            return blocking_one(h, _blocking_queue(self, slot), WRITE, off, buf,
                                _REQ_FUA if fua else 0, ck, dp)
        finally:
            handle_leave(h, slot)

    def readv(self, offset, bufs, *, chunk=None, depth=None):
        """Read consecutive bytes at ``offset`` into each buffer of ``bufs`` in
        turn; returns the total.  Pipelined like ``read``."""
        cdef uint64_t off = as_u64(offset, "offset")
        cdef DeviceHandle h = self.handle
        cdef HeldBuffers v
        cdef uint64_t ck = 0 if chunk is None else h.check_io_chunk(chunk)
        cdef int dp = 0 if depth is None else check_io_depth(depth)
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            v = hold_buffers(bufs, True, False)
            return blocking_io(h, _blocking_queue(self, slot), READ, off, v.total, v, 0, ck, dp)
        finally:
            handle_leave(h, slot)

    def writev(self, offset, bufs, *, bint fua=False, chunk=None, depth=None):
        """Write the buffers of ``bufs`` back to back at ``offset``.
        Pipelined like ``write``."""
        cdef uint64_t off = as_u64(offset, "offset")
        cdef DeviceHandle h = self.handle
        cdef HeldBuffers v
        cdef uint64_t ck = 0 if chunk is None else h.check_io_chunk(chunk)
        cdef int dp = 0 if depth is None else check_io_depth(depth)
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            v = hold_buffers(bufs, False, False)
            return blocking_io(h, _blocking_queue(self, slot), WRITE, off, v.total, v,
                               _REQ_FUA if fua else 0, ck, dp)
        finally:
            handle_leave(h, slot)

    def write_zeroes(self, offset, length, *, bint fua=False,
                     bint may_unmap=True, bint no_fallback=False):
        """Write ``length`` zero bytes at ``offset``.  ``may_unmap=False``
        keeps the blocks allocated; ``no_fallback=True`` fails rather than
        writing zeroes the slow way."""
        cdef uint64_t off = as_u64(offset, "offset"), n = as_u64(length, "length")
        cdef unsigned int flags = zero_flags(fua, may_unmap, no_fallback)
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            blocking_io(h, _blocking_queue(self, slot), WRITE_ZEROES, off, n, None, flags)
        finally:
            handle_leave(h, slot)

    def discard(self, offset, length):
        """Discard ``length`` bytes at ``offset`` (advisory: a device that
        cannot discard answers success)."""
        cdef uint64_t off = as_u64(offset, "offset"), n = as_u64(length, "length")
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            blocking_io(h, _blocking_queue(self, slot), DISCARD, off, n, None, 0)
        finally:
            handle_leave(h, slot)

    def flush(self):
        """Make completed writes durable."""
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            blocking_io(h, _blocking_queue(self, slot), FLUSH, 0, 0, None, 0)
        finally:
            handle_leave(h, slot)

    # ---- zoned devices (the public methods are blkio._zones.ZonedMixin's) ---

    def _configure_zones(self, int model, uint64_t zone_size, uint64_t nr_zones):
        """Copy the validated zone geometry to C for the request checks."""
        self.handle.configure_zones(model, zone_size, nr_zones)

    def _zone_request(self, int op, offset=0, zones=None):
        """One zone request on this thread's blocking queue, waited for (GIL
        released); returns its ``ret`` (the zones filled in, for a report)."""
        cdef uint64_t off = as_u64(offset, "offset")
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            return blocking_zone(h, _blocking_queue(self, slot), op, off, zones)
        finally:
            handle_leave(h, slot)

    # ---- queues ------------------------------------------------------------

    def queue(self, index=0):
        """Queue ``index`` (0 .. num_queues-1)."""
        index = as_index(index, "index")
        _check_queues_open(self.handle)
        if not 0 <= index < len(self._queues) or self._queues[index] is None:
            raise IndexError(f"queue {index} does not exist or was removed "
                             f"({len(self._queues)} queue slot(s))")
        return self._queues[index]

    def poll_queue(self, index=0):
        """Poll queue ``index`` (0 .. num_poll_queues-1)."""
        index = as_index(index, "index")
        _check_queues_open(self.handle)
        if not 0 <= index < len(self._poll_queues) or self._poll_queues[index] is None:
            raise IndexError(f"poll queue {index} does not exist or was removed "
                             f"({len(self._poll_queues)} poll queue slot(s))")
        return self._poll_queues[index]

    @property
    def queues(self):
        """The device's queues (regular, then poll queues)."""
        return tuple(q for q in self._queues + self._poll_queues if q is not None)

    def _add_queue(self, bint poll):
        cdef DeviceHandle h = self.handle
        cdef blkioq *q
        cdef int idx
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            h.ensure_started()
            idx = h.add_queue(poll)
            q = h.get_queue(idx, poll)
            if q == NULL:
                raise OSError(EIO, f"libblkio added queue {idx} but does not return it")
            qq = Queue.new(h, self._bounce_pool, self, q, idx, poll,
                           self._queues[0].slots if self._queues else 0)
            lst = self._poll_queues if poll else self._queues
            while len(lst) <= idx:
                lst.append(None)
            lst[idx] = qq
            if not poll:
                self.blocking.append(qq)
            return qq
        finally:
            handle_leave(h, slot)

    def _remove_queue(self, Queue queue, double timeout):
        """Remove ``queue``: refuse new calls on it, wait for the calls in
        progress to leave (their waits give up within a slice), drain its
        requests (``timeout`` seconds), then remove it from libblkio."""
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t slot = handle_enter(h)
        try:
            h.ensure_started()
            if queue._device is not self or queue.removing:
                raise ValueError("queue is not a live queue of this device")
            queue.removing = True
            queue.remove_timeout = timeout
            own = guard_own(&queue.guard)
            if not h.wait_guard(&queue.guard, own, timeout + LEAVE_SLACK) or own:
                # A call of this thread (or one stuck inside libblkio) is still
                # in the queue: the last one to leave removes it.
                queue.remove_pending = True
                return
            self._finish_remove(queue)
        finally:
            handle_leave(h, slot)

    def _finish_remove(self, Queue queue):
        """Drain and remove a queue nobody is inside any more."""
        queue.draining = True
        interrupted = None
        try:
            self._drain(queue, queue.remove_timeout)
        except BaseException as e:      # Ctrl-C: stop draining, still remove
            interrupted = e
        kept = self.keep_undrained(queue)
        try:
            self.handle.remove_queue(queue.index, queue.is_poll_queue)
        finally:
            orphans = self.orphans(queue, kept)
            queue.removed = True
            queue.q = NULL
            lst = self._poll_queues if queue.is_poll_queue else self._queues
            lst[queue.index] = None
            if queue in self.blocking:
                self.blocking.remove(queue)
            while lst and lst[len(lst) - 1] is None:
                lst.pop()
            self.call_close_callbacks(queue, orphans)
        if interrupted is not None:
            raise interrupted
        _warn_kept(self.handle, kept)

    def _drain(self, Queue queue, double timeout):
        """Wait (bounded) for the queue's requests in flight.  Only close()
        and remove_queue() call it, once no other call is inside."""
        deadline = time.monotonic() + timeout
        while queue.unreaped > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                queue.drive(<int>queue.unreaped, left, None)
            except TimeoutError:
                return False
            except OSError:
                return False
        return True

    cdef int keep_undrained(self, Queue queue) except -1:
        """Requests still in flight after the drain: unless the backend is
        gone, the device may still write their memory after the instance or
        queue is destroyed, so that memory is never given back."""
        if queue.unreaped == 0:
            return 0
        if self.handle.state == ST_BROKEN or self.handle.backend_dead():
            return 0
        kept = []
        cdef Completion c = queue.head
        while c is not None:
            kept.append(c)
            c = c.next
        if queue.batch_unreaped:
            kept.append(self.handle.region_owners())
        _kept_for_the_kernel.append(kept)
        return <int>queue.unreaped

    cdef list orphans(self, Queue queue, int kept):
        """Completions nobody collected: those drained into ``ready`` and those
        that never completed (failed with ECANCELED; their memory is released
        only when nothing can touch it any more)."""
        cdef Completion c
        orphans = queue.ready
        queue.ready = []
        while queue.head is not None:
            c = queue.head
            queue.unlink(c)
            set_ret(c, -ECANCELED)
            c._error_msg = "the device was closed (or the queue removed) before it completed"
            c.done = True
            if not kept:
                released = c.release_memory()
                if released is not None:     # a close does not stop halfway
                    unraisable(self, released)
            if not c.internal:
                orphans.append(c)
        queue.unreaped = 0
        queue.in_libblkio = 0
        queue.batch_unreaped = 0
        queue.spare = None
        queue.reap_out = None
        return orphans

    cdef int call_close_callbacks(self, Queue queue, list orphans) except -1:
        for cb in list(self.close_callbacks):
            try:
                cb(queue, orphans)
            except BaseException:
                unraisable(cb)
        return 0

    # ---- close -------------------------------------------------------------

    def _close(self, double drain_timeout=10.0):
        """Refuse new calls, wait for the calls in progress to leave, drain
        requests in flight (bounded), unmap memory, destroy.  See ``_handle``
        for the whole mechanism."""
        cdef DeviceHandle h = self.handle
        if h.b == NULL:
            return
        cdef Py_ssize_t own = guard_own(&h.guard)
        if h.closing:
            # Another thread is closing it, or a call of ours will destroy it
            # as it leaves: wait for the first (never for ourselves).
            if own == 0:
                h.wait_destroyed(self.close_timeout + 5.0)
            return
        h.closing = True
        self.close_timeout = drain_timeout
        if self._bounce_pool is not None:
            self._bounce_pool.wake_all()
        if not h.wait_guard(&h.guard, own, drain_timeout + LEAVE_SLACK) or own:
            # A call of this thread (a signal handler or destructor closing the
            # device it interrupted), or one stuck inside libblkio: the last
            # call to leave destroys the instance.
            h.destroy_pending = True
            return
        self._destroy()

    def _destroy(self):
        """Drain, unmap, destroy; no call is inside the device any more."""
        cdef DeviceHandle h = self.handle
        if h.b == NULL:
            return
        h.draining = True
        interrupted = None
        queues = [q for q in self._queues + self._poll_queues if q is not None]
        deadline = time.monotonic() + self.close_timeout
        if h.state != ST_BROKEN and not h.backend_dead():
            for q in queues:
                try:
                    self._drain(q, max(0.0, deadline - time.monotonic()))
                except BaseException as e:      # Ctrl-C: stop draining, still close
                    interrupted = e
                    break
        kept = [self.keep_undrained(q) for q in queues]
        try:
            h.unmap_all()
        finally:
            # Whatever happened above, the instance goes and every waiter is
            # told: a half-closed device would be destroyed by the garbage
            # collector with requests and mappings still in it.
            h.destroy()
            orphans = [self.orphans(q, k) for q, k in zip(queues, kept)]
            for q in queues:
                (<Queue>q).q = NULL
                (<Queue>q).removed = True
            self._queues = []
            self._poll_queues = []
            self.blocking = []
            # Break the reference cycles through the device so that memory (and
            # its memfd) nobody views is freed now, not by the cyclic collector.
            if self.arena is not None:
                self.arena.handle = None
                self.arena.chunks = []
            if self._bounce_pool is not None:
                self._bounce_pool.device_closed()
            h.on_last_leave = None
            for q, o in zip(queues, orphans):
                self.call_close_callbacks(q, o)
            self.close_callbacks = []
            h.wake_waiters()
        if interrupted is not None:
            raise interrupted
        _warn_kept(h, sum(kept))
