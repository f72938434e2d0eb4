# Memory mapped into a device: the bounce space (for data the driver cannot use
# where it is) and the alloc arena (for Device.alloc).  Both map their memory
# through the device handle; neither calls libblkio itself nor knows requests,
# and neither waits or calls back: their callers drive the waits.

from ._posix cimport pthread_mutex_t
from ._memory cimport Buffer, RangeAllocator
from ._handle cimport DeviceHandle


cdef class BounceSpace:
    cdef object __weakref__
    cdef DeviceHandle handle      # None once the device is closed
    cdef Buffer buffer
    cdef RangeAllocator allocator
    cdef size_t granule
    cdef size_t _max_size
    cdef pthread_mutex_t plock     # taken without the GIL when contended
    cdef unsigned long owner       # thread holding plock, 0 if none
    cdef object waiters            # FIFO of ThreadWaiter / AsyncWaiter
    cdef void _lock(self)
    cdef void _unlock(self)
    cdef void _wake_head(self)
    cdef size_t _round(self, size_t nbytes)
    cdef Py_ssize_t _try_locked(self, size_t size) except -2
    cdef size_t checked_size(self, size_t nbytes) except? 0
    cdef int check_open(self, bint inside=*) except -1
    cdef Py_ssize_t try_acquire(self, size_t size) except -2
    cdef Py_ssize_t fifo_enter(self, size_t size, object waiter) except -2
    cdef Py_ssize_t fifo_turn(self, size_t size, object waiter) except -2
    cdef void fifo_leave(self, object waiter) noexcept
    cdef int _replace(self, size_t size) except -1
    cdef void release_range(self, Py_ssize_t start, Buffer buffer)
    cdef Py_ssize_t start_of(self, object array, size_t nbytes) except -1
    cdef object array(self, Py_ssize_t start, size_t nbytes)
    cdef int release(self, object array) except -1
    cdef int set_max_size(self, size_t value) except -1
    cdef void device_closed(self) noexcept
    cdef void wake_all(self) noexcept


cdef class Arena:
    cdef DeviceHandle handle
    cdef list chunks          # [(Buffer, RangeAllocator)]
    cdef size_t granule
    cdef size_t chunk_size
    cpdef object alloc(self, size_t nbytes)
    cdef object _slice(self, Buffer buf, RangeAllocator ra, Py_ssize_t start, size_t nbytes)
