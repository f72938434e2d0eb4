"""Memory mapped into a device: the bounce space and the alloc arena.

``BounceSpace`` holds memory for data the driver cannot use where it is
(unregistered memory where regions are needed, misaligned buffers): first-fit
in O(log n), one FIFO of waiters for threads and asyncio, grown only when idle,
bounded by ``max_size``.  Waiting is its callers' (``_transfer.wait_for_space``
reaps a queue between turns; the public ``blkio.BouncePool`` of ``_public``
and ``blkio.aio`` wait on it): the space offers the steps (``try_acquire``,
``fifo_enter``, ``fifo_turn``, ``fifo_leave``) and never calls back.
``Arena`` carves ``Device.alloc`` arrays out of a few large mapped chunks
(vhost-user maps at most 32 regions).  Both map memory through the device
handle (their callers are inside the device's guard); neither calls libblkio
itself, and neither knows requests.
"""

cimport cython
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, Py_buffer
from cpython.pythread cimport PyThread_get_thread_ident
from libc.stdint cimport uintptr_t

from ._checks cimport as_u64, closed_error
from ._memory cimport ArenaSlice, MAX_BYTES, bytes_array
from ._posix cimport (pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
                      pthread_mutex_trylock, pthread_mutex_unlock)

import threading
import time
from collections import deque


class ThreadWaiter:
    __slots__ = ("event",)

    def __init__(self):
        self.event = threading.Event()

    def wake(self):
        self.event.set()

    def reset(self):
        self.event.clear()


class AsyncWaiter:
    __slots__ = ("loop", "future")

    def __init__(self, loop):
        self.loop = loop
        self.future = loop.create_future()

    def reset(self):
        if self.future.done():
            self.future = self.loop.create_future()

    def wake(self):
        def _set(fut=self.future):
            if not fut.done():
                fut.set_result(None)
        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # loop closed
            pass


@cython.final
cdef class BounceSpace:
    """Mapped memory for data the driver cannot use where it is (internal;
    users see it through ``blkio.BouncePool``).

    Sizes are rounded up to the granule, a multiple of mem-region-alignment.
    Allocation is first-fit over the holes between live buffers (O(log n)).
    When nothing is in use and a request does not fit, the space is replaced
    by a larger one, up to ``max_size``; a request larger than ``max_size``
    fails at once.  Waiters are served first come, first served; a woken
    waiter that still does not fit keeps its place at the front.
    """

    def __cinit__(self, DeviceHandle handle not None, size_t granule, size_t initial,
                  size_t max_size):
        self.handle = handle
        self.granule = granule
        self._max_size = max_size
        pthread_mutex_init(&self.plock, NULL)
        self.waiters = deque()
        self.buffer = None
        self.allocator = None
        self._replace(initial)

    cdef size_t _round(self, size_t nbytes):
        if nbytes == 0:
            nbytes = 1
        return (nbytes + self.granule - 1) // self.granule * self.granule

    cdef int _replace(self, size_t size) except -1:
        # Only when nothing is allocated: no live buffer is moved.
        size = self._round(size)
        new = Buffer(size, name="blkio-bounce")
        if self.handle is not None:
            self.handle.map(<uintptr_t>(<Buffer>new).addr, (<Buffer>new).size,
                            (<Buffer>new).fd, 0, new, False)
        old = self.buffer
        self.buffer = new
        self.allocator = RangeAllocator(size // self.granule)
        if old is not None and self.handle is not None:
            self.handle.unmap(<uintptr_t>(<Buffer>old).addr)
        return 0

    cdef Py_ssize_t _try_locked(self, size_t size) except -2:
        cdef size_t count = size // self.granule
        if self.buffer.size > self._max_size and self.allocator.used == 0:
            self._replace(self._max_size)       # max_size was lowered: shrink when idle
        if (self.allocator.used + count) * self.granule > self._max_size:
            return -1                           # over the bound until buffers come back
        cdef Py_ssize_t start = self.allocator.alloc(count)
        if start < 0 and self.allocator.used == 0:
            cur = self.buffer.size
            grow = max(size + (1 << 20), 2 * cur)
            self._replace(min(grow, self._max_size))
            start = self.allocator.alloc(count)
        return start

    cdef Py_ssize_t try_acquire(self, size_t nbytes) except -2:
        """Granule index of a new allocation, -1 if it must wait."""
        cdef size_t size = self.checked_size(nbytes)
        self._lock()
        try:
            if self.waiters:
                return -1
            return self._try_locked(size)
        finally:
            self._unlock()

    cdef size_t checked_size(self, size_t nbytes) except? 0:
        if nbytes > self._max_size:         # before rounding, which could wrap
            raise ValueError(f"bounce buffer of {nbytes} bytes exceeds the pool's "
                             f"max_size of {self._max_size} bytes")
        cdef size_t size = self._round(nbytes)
        if size > self._max_size:
            raise ValueError(f"bounce buffer of {nbytes} bytes exceeds the pool's "
                             f"max_size of {self._max_size} bytes")
        return size

    # One FIFO of waiters serves threads and coroutines alike: fifo_enter
    # either allocates at once or queues the waiter; fifo_turn tries for the
    # waiter at the head (keeping its place if it still does not fit);
    # fifo_leave drops it.

    cdef Py_ssize_t fifo_enter(self, size_t size, object waiter) except -2:
        self._lock()
        try:
            if not self.waiters:
                start = self._try_locked(size)
                if start >= 0:
                    return start
            self.waiters.append(waiter)
            return -1
        finally:
            self._unlock()

    cdef Py_ssize_t fifo_turn(self, size_t size, object waiter) except -2:
        self._lock()
        try:
            if self.waiters[0] is waiter:
                start = self._try_locked(size)
                if start >= 0:
                    self.waiters.popleft()
                    self._wake_head()
                    return start
            waiter.reset()
            return -1
        finally:
            self._unlock()

    cdef void fifo_leave(self, object waiter) noexcept:
        self._lock()
        try:
            try:
                self.waiters.remove(waiter)
            except ValueError:
                pass
            self._wake_head()
        finally:
            self._unlock()

    cdef int check_open(self, bint inside=False) except -1:
        """Between a waiter's turns: the device may be gone (raises); a
        waiter ``inside`` the device's guard parks while it reconnects."""
        if self.handle is None:
            raise closed_error(None)
        if inside and self.handle.reconnecting:
            self.handle.park()
        if self.handle.closing or self.handle.forked():
            raise self.handle.unusable_error()
        return 0

    cdef void device_closed(self) noexcept:
        """The device is gone: waiters wake up and fail (their next turn
        sees no device)."""
        self.handle = None
        self.wake_all()

    cdef void wake_all(self) noexcept:
        self._lock()
        try:
            for waiter in self.waiters:
                waiter.wake()
        finally:
            self._unlock()

    cdef void _lock(self):
        # The GIL is released only when the lock is contended, so that a
        # holder that needs the GIL can always get it.  A pthread mutex: its
        # uncontended trylock is a few instructions (PyThread's reads the
        # clock), and every bounced request takes it twice.
        if pthread_mutex_trylock(&self.plock) != 0:
            with nogil:
                pthread_mutex_lock(&self.plock)
        self.owner = PyThread_get_thread_ident()

    cdef void _unlock(self):
        self.owner = 0
        pthread_mutex_unlock(&self.plock)

    def __dealloc__(self):
        pthread_mutex_destroy(&self.plock)

    cdef void _wake_head(self):
        if self.waiters:
            self.waiters[0].wake()

    cdef void release_range(self, Py_ssize_t start, Buffer buffer):
        if self.owner == PyThread_get_thread_ident():
            # Re-entered from a destructor (the garbage collector ran inside
            # a locked section of this thread): the allocator is consistent
            # between its C calls, so free directly; waiters are woken at the
            # next release.
            if buffer is self.buffer:
                self.allocator.free(<size_t>start)
            return
        self._lock()
        try:
            if buffer is self.buffer:
                self.allocator.free(<size_t>start)
            self._wake_head()
        finally:
            self._unlock()

    cdef Py_ssize_t start_of(self, object array, size_t nbytes) except -1:
        """Granule index of a live allocation from acquire(), checked."""
        cdef Py_buffer view
        PyObject_GetBuffer(array, &view, PyBUF_SIMPLE)
        cdef uintptr_t addr = <uintptr_t>view.buf
        cdef size_t n = <size_t>view.len
        PyBuffer_Release(&view)
        cdef uintptr_t base = <uintptr_t>self.buffer.addr
        if addr < base or addr - base >= self.buffer.size or (addr - base) % self.granule or n < nbytes:
            raise ValueError("array was not acquired from this bounce pool (or is too small)")
        cdef Py_ssize_t start = <Py_ssize_t>((addr - base) // self.granule)
        if self.allocator.sizes[start] == 0:
            raise ValueError("array was already released to the bounce pool")
        return start

    cdef object array(self, Py_ssize_t start, size_t nbytes):
        return bytes_array(self.buffer, self.buffer.addr + <size_t>start * self.granule, nbytes)

    cdef int release(self, object array) except -1:
        """Give back an array of this space (``blkio.BouncePool.release``)."""
        self._lock()
        try:
            self.allocator.free(<size_t>self.start_of(array, 0))
            self._wake_head()
        finally:
            self._unlock()
        return 0

    cdef int set_max_size(self, size_t value) except -1:
        if value < self.granule:
            raise ValueError(f"max_size must be at least {self.granule} bytes")
        self._max_size = self._round(value)
        return 0


@cython.final
cdef class Arena:
    """Memory for ``Device.alloc``: large mapped chunks carved into arrays.

    Drivers limit the number of mapped regions (32 on vhost-user), so arrays
    are cut out of a few big regions instead of mapping one region each.
    """

    def __cinit__(self, DeviceHandle handle, size_t granule, size_t chunk_size):
        self.handle = handle
        self.chunks = []
        self.granule = granule
        self.chunk_size = chunk_size

    cpdef object alloc(self, size_t nbytes):
        if nbytes > MAX_BYTES:
            raise ValueError(f"alloc of {nbytes} bytes: more than a process can map")
        cdef size_t g = self.granule
        cdef size_t count = (nbytes + g - 1) // g
        cdef Py_ssize_t start
        cdef Buffer buf
        cdef RangeAllocator ra
        for buf, ra in self.chunks:
            start = ra.alloc(count)
            if start >= 0:
                return self._slice(buf, ra, start, nbytes)
        size = max(self.chunk_size, count * g)
        buf = Buffer(size, name="blkio-arena")
        ra = RangeAllocator(size // g)
        self.handle.map(<uintptr_t>buf.addr, buf.size, buf.fd, 0, buf, False)
        self.chunks.append((buf, ra))
        start = ra.alloc(count)
        return self._slice(buf, ra, start, nbytes)

    cdef object _slice(self, Buffer buf, RangeAllocator ra, Py_ssize_t start, size_t nbytes):
        cdef ArenaSlice s = ArenaSlice.__new__(ArenaSlice)
        s.buffer = buf
        s.offset = <size_t>start * self.granule
        s.nbytes = nbytes
        s.allocator = ra
        s.granule = self.granule
        return bytes_array(s, buf.addr + s.offset, nbytes)
