# The transfer engine: how one caller request becomes libblkio requests --
# the caller's memory where the driver can use it or a bounce buffer
# (prepare), pieces cut at max-transfer and the bounce chunk, large reads and
# writes pipelined (Transfer: depth pieces in flight, refilled as the oldest
# finish), the first-failure rule and advisory discard (failure_error).
# Blocking calls drive a Transfer synchronously (run_blocking, and the hot
# path blocking_one); blkio.aio drives the same Transfer from the event loop
# (start_async, route_async).  It calls only downward: the queue engine, the
# bounce space, held buffers, checks.

from libc.stdint cimport uint64_t
from posix.uio cimport iovec
from ._handle cimport DeviceHandle
from ._held cimport HeldBuffers
from ._pool cimport BounceSpace
from ._engine cimport QueueEngine, Completion


cdef class Transfer:
    cdef QueueEngine engine
    cdef int op
    cdef uint64_t offset
    cdef uint64_t length
    cdef HeldBuffers views       # the caller's memory (reads and writes), else None
    cdef unsigned int flags
    cdef uint64_t limit          # longest piece (0: none)
    cdef int depth               # pieces in flight at once
    cdef uint64_t pos            # bytes handed to pieces so far
    cdef list inflight           # pieces in offset order; inflight[head:] not yet settled
    cdef Py_ssize_t head
    cdef Completion failed       # the first failed piece (lowest offset)
    cdef bint is_async           # pieces go to the loop (TO_TRANSFER), not waited for here
    cdef object future           # asyncio: resolved when the transfer ends
    cdef uint64_t need           # asyncio: bounce bytes the next piece waits for
    cdef object result_value     # what the transfer returns (its length, or a report's count)

    cdef int fill(self, object bounce=*) except -1
    cdef bint settle(self) except -1
    cdef bint finished(self) noexcept
    cdef object outcome(self)


cdef bint direct_ok(DeviceHandle h, iovec *iov, int iovcnt) noexcept nogil
cdef Completion prepare(QueueEngine e, int op, uint64_t offset, uint64_t length,
                        HeldBuffers views, object array, iovec *iov, int iovcnt,
                        unsigned int flags, int route, object user_data, object bounce,
                        bint nowait)
cdef Py_ssize_t wait_for_space(BounceSpace space, QueueEngine e, size_t nbytes,
                               double timeout) except -2
cdef object failure_error(Completion c, str what, bint read_only)

cdef object blocking_io(QueueEngine e, int op, uint64_t offset, uint64_t length,
                        HeldBuffers views, unsigned int flags, uint64_t chunk=*, int depth=*)
cdef object blocking_one(QueueEngine e, int op, uint64_t offset, object buf,
                         unsigned int flags, uint64_t chunk, int depth, unsigned long tid)
cdef Completion zone_completion(QueueEngine e, int op, uint64_t offset, object zones,
                                int route, object user_data, object bounce, bint nowait)
cdef object blocking_zone(QueueEngine e, int op, uint64_t offset, object zones)
cdef object enqueue_request(QueueEngine e, int op, uint64_t offset, object buf, bint vectored,
                            unsigned int flags, object user_data, uint64_t length)
cdef object start_async(QueueEngine e, int op, uint64_t offset, object buf, bint vectored,
                        unsigned int flags, object future, uint64_t length, uint64_t chunk,
                        int depth)
cdef int route_async(QueueEngine e, list done) except -1
