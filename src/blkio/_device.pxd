# The device: one libblkio instance's lifecycle as the facade sees it -- the
# queue list, memory (alloc, register, unregister), the blocking I/O methods,
# adding and removing queues, and close.  It calls libblkio only through the
# device handle and the request path (``_handle``, ``_requests``).

from ._handle cimport DeviceHandle
from ._pool cimport Arena, BouncePool
from ._requests cimport Queue


cdef class _DeviceCore:
    cdef object __weakref__
    cdef DeviceHandle handle
    cdef list _queues
    cdef list _poll_queues
    cdef list blocking             # the queues blocking calls use, one per thread's slot
    cdef Arena arena
    cdef BouncePool _bounce_pool
    cdef list close_callbacks
    cdef double close_timeout
    cdef int keep_undrained(self, Queue queue) except -1
    cdef list orphans(self, Queue queue, int kept)
    cdef int call_close_callbacks(self, Queue queue, list orphans) except -1
