# Requests and queues: the op codes, Completion, caller memory held for
# requests, Queue (enqueue, submit, wait, reap, the batch path, the completion
# fd), the one request check, the splitter and the blocking I/O path.  Every
# blkioq_* call of the package is here.  It may not create, configure or
# destroy an instance (``_handle``/``_device`` do) nor parse user options.

from libc.stdint cimport uint64_t, int64_t, uintptr_t
from posix.uio cimport iovec
from posix.time cimport timespec
from cpython.buffer cimport Py_buffer
from ._libblkio cimport blkioq, blkio_completion
from ._handle cimport (DeviceHandle, Guard, GUARD_THREADS, ST_BROKEN, guard_enter,
                       guard_leave, handle_enter, handle_leave)
from ._memory cimport Buffer
from ._pool cimport BouncePool

from ._posix cimport pthread_mutex_t, pthread_cond_t


cpdef enum Op:
    READ = 0
    WRITE = 1
    WRITE_ZEROES = 2
    DISCARD = 3
    FLUSH = 4
    # Zoned devices (blkioq_report_zones, blkioq_*_zone, blkioq_*_all_zones)
    REPORT_ZONES = 5
    OPEN_ZONE = 6
    CLOSE_ZONE = 7
    FINISH_ZONE = 8
    RESET_ZONE = 9
    OPEN_ALL_ZONES = 10
    CLOSE_ALL_ZONES = 11
    FINISH_ALL_ZONES = 12
    RESET_ALL_ZONES = 13


# One in-flight batch request: its tag and the memory it reads into or
# writes from (so that unregister can tell whether memory is still in use).
cdef struct BatchSlot:
    int64_t tag
    uintptr_t addr
    uint64_t length
    Py_ssize_t next        # free list; -1 ends it


cdef class HeldBuffers:
    """Py_buffers of caller memory, held while any request uses them (or,
    for one numpy array, the array itself: no export, see _array_memory)."""
    cdef object array
    cdef Py_buffer *bufs
    cdef iovec *iov
    cdef Py_buffer buf1      # inline storage for the common single buffer
    cdef iovec iov1
    cdef int n
    cdef size_t total
    cdef void release(self) noexcept


cdef class Completion:
    # user_data and ret_obj are what Python reads as ``user_data`` and
    # ``ret``: object members, not properties (see _expose_members)
    cdef object user_data
    cdef int ret             # what the core reads; set_ret keeps ret_obj equal
    cdef object ret_obj
    cdef object _error_msg
    # request state, private to the core
    cdef int op
    cdef uint64_t offset
    cdef uint64_t length
    cdef unsigned int flags
    cdef bint internal       # a blocking call's own request: not returned by wait()
    cdef bint done
    cdef HeldBuffers views   # caller memory this request reads into / writes from
    cdef object array        # or the numpy array it uses unexported (the hot paths)
    cdef iovec *user_iov     # the caller segments this request covers
    cdef iovec user1         # inline storage for the one segment of `array`
    cdef int user_iovcnt
    cdef iovec *iov          # what libblkio gets: caller segments or the bounce buffer
    cdef int iovcnt
    cdef iovec iov1
    cdef BouncePool pool
    cdef Py_ssize_t bounce_start
    cdef Buffer bounce_buffer
    cdef Completion prev     # links of the queue's in-flight list, which
    cdef Completion next     # holds the reference libblkio's user_data borrows
    cdef object release_memory(self)


cdef inline int set_ret(Completion c, int ret) except -1:
    c.ret = ret
    c.ret_obj = ret
    return 0


cdef class Queue:
    cdef object __weakref__
    cdef blkioq *q
    cdef DeviceHandle handle
    cdef BouncePool pool
    cdef object _device            # the Device (Queue.device; removal callbacks)
    cdef readonly int index
    """The queue's number among the device's queues (or its poll queues)."""
    cdef readonly bint is_poll_queue
    """True for a poll queue (``Device.poll_queue``): no completion fd."""
    cdef readonly Py_ssize_t slots # driver queue depth (num-entries / queue-size), 0: unknown
    """Requests the driver's queue holds at once (num-entries or queue-size;
    0: unknown): the most a batch call submits in one go."""
    cdef pthread_mutex_t lock      # libblkio queues are not thread-safe
    cdef bint lock_ready
    # Blocking calls of several threads on one queue: one of them (the
    # leader) sleeps on the completion fd, the others on this condition.
    cdef bint leader
    cdef pthread_mutex_t wait_mutex
    cdef pthread_cond_t wait_cond
    # What is in flight, counted four ways:
    cdef Py_ssize_t unreaped       # enqueued and not yet reaped (Queue.in_flight)
    cdef Py_ssize_t in_libblkio    # enqueued and not yet returned by do_io (as libblkio counts;
                                   # changed only under the lock)
    cdef Py_ssize_t batch_unreaped # of unreaped, the batch requests
    cdef Py_ssize_t batch_ready    # batch completions reaped, waiting for reap()
    cdef list ready                # reaped Completions not yet returned by wait()
    cdef Completion head           # in-flight Completions (doubly linked)
    cdef Completion spare          # a finished internal Completion, recycled by the hot path
    cdef uint64_t spare_len        # the hot path's last length, and it as an int:
    cdef object spare_len_obj      # most calls return what the one before did
    cdef int64_t *batch_tags       # ring of batch completions: tags and rets
    cdef int *batch_rets
    cdef Py_ssize_t batch_head, batch_cap
    cdef BatchSlot *slots_table
    cdef Py_ssize_t slots_cap, slots_free, slots_nfree
    cdef bint fd_enabled
    cdef Py_ssize_t batch_failed
    cdef uint64_t n_requests       # requests handed to libblkio through this queue
    cdef object reap_out           # layout of the last `out` given to reap()
    cdef char *reap_base
    cdef Py_ssize_t reap_stride, reap_len, reap_off_ud, reap_off_ret
    # lifetime guard of this queue (see _handle)
    cdef Guard guard
    cdef bint removing
    cdef bint removed
    cdef bint draining
    cdef bint remove_pending
    cdef double remove_timeout

    @staticmethod
    cdef Queue new(DeviceHandle handle, BouncePool pool, object device, blkioq *q,
                   int index, bint poll, Py_ssize_t slots)
    cdef void left_while_removing(self) noexcept
    cdef int check_not_closing(self) except -1
    cdef Py_ssize_t using(self, uintptr_t start, uintptr_t end)
    cdef int enqueue_one(self, Completion c, bint reap, bint wait_first=*) except -1
    cdef int _enqueue_locked(self, Completion c, void *ud, bint reap,
                             blkio_completion *comps) noexcept nogil
    cdef int _enqueue_wait_locked(self, Completion c, void *ud, blkio_completion *comps,
                                  timespec *ts) noexcept nogil
    cdef int fail_all(self, int err) except -1
    cdef void unlink(self, Completion c) noexcept
    cdef list take(self, object max)
    cdef int _ensure_batch(self, Py_ssize_t need) except -1
    cdef int _ensure_slots(self, Py_ssize_t need) except -1
    cdef void _free_slot(self, Py_ssize_t i) noexcept
    cdef int _batch_view(self, object obj, Py_buffer *view, int ndim, const char *kinds,
                         bint writable, str what) except -1
    cdef object _submit_batch(self, int op, offsets, buffers, user_data, unsigned int flags,
                              region, uint64_t blocksize)
    cdef int _enqueue_batch(self, int op, uint64_t *offs, int64_t *tags, char *base,
                            uint64_t *boffs, uint64_t bs, Py_ssize_t n,
                            unsigned int flags) except -1
    cdef int _reap_layout(self, object out) except -1
    cdef object _reap(self, out, Py_ssize_t min, timeout)
    cdef int dispatch(self, blkio_completion *comps, int n) except -1
    cdef int collect_locked(self, blkio_completion *comps) except -1
    cdef int drive(self, int min_completions, double timeout, Completion until) except -1
    cdef bint reset_fd(self, int fd) noexcept
    cdef int wait_shared(self, Completion until) except -1
    cdef void wake_followers(self) noexcept
    cdef object _enqueue(self, int op, object offset, object buf, uint64_t length,
                         unsigned int flags, object user_data, bint vectored,
                         object bounce, bint nowait)
    cdef object enqueue_request(self, int op, uint64_t offset, object buf, bint vectored,
                                unsigned int flags, object user_data, uint64_t length,
                                object bounce, bint nowait, uint64_t pipeline_over=*)
    cdef Completion zone_completion(self, int op, uint64_t offset, object zones,
                                    object user_data, bint internal, object bounce,
                                    bint nowait)


# ---- a queue's guard (the device's first; see _handle) --------------------

cdef inline Py_ssize_t queue_use(Queue q) except -1:
    """The queue's guard alone, for a caller inside its device's."""
    if q.removing or q.q == NULL:
        raise ValueError(f"queue {q.index} was removed")
    return guard_enter(&q.guard)


cdef inline void queue_unuse(Queue q, Py_ssize_t slot) noexcept:
    guard_leave(&q.guard, slot)
    if q.removing:
        q.left_while_removing()


cdef inline Py_ssize_t queue_enter(Queue q) except -1:
    """The device's guard, then the queue's; refuses a closed device, a removed
    queue and a broken backend.  Returns both slots for queue_leave."""
    cdef DeviceHandle h = q.handle
    cdef Py_ssize_t dslot = handle_enter(h)
    if q.removing or q.q == NULL:
        handle_leave(h, dslot)
        raise ValueError(f"queue {q.index} was removed")
    if h.state == ST_BROKEN:
        handle_leave(h, dslot)
        raise h.broken_error()
    return dslot * (GUARD_THREADS + 1) + guard_enter(&q.guard)


cdef inline void queue_leave(Queue q, Py_ssize_t slots) noexcept:
    cdef DeviceHandle h = q.handle
    queue_unuse(q, slots % (GUARD_THREADS + 1))
    handle_leave(h, slots // (GUARD_THREADS + 1))


# ---- the request path (inside the device's guard) ---------------------------

cdef HeldBuffers hold_buffers(object objs, bint writable, bint single)
cdef int check_request(DeviceHandle h, int op, uint64_t offset, uint64_t length) except -1
cdef object blocking_io(DeviceHandle h, Queue q, int op, uint64_t offset, uint64_t length,
                        HeldBuffers views, unsigned int flags, uint64_t chunk=*, int depth=*)
cdef int pipeline_depth(DeviceHandle h, int op, int depth) noexcept
cdef object blocking_one(DeviceHandle h, Queue q, int op, uint64_t offset, object buf,
                         unsigned int flags, uint64_t chunk=*, int depth=*)
cdef unsigned int zero_flags(bint fua, bint may_unmap, bint no_fallback) except? 0xFFFFFFFF
cdef int check_zone_request(DeviceHandle h, int op, uint64_t offset) except -1
cdef object blocking_zone(DeviceHandle h, Queue q, int op, uint64_t offset, object zones)
cdef int check_zone_write(DeviceHandle h, int op, uint64_t offset, uint64_t length) except -1
cdef void _enqueue_zone(blkioq *q, Completion c, void *ud) noexcept nogil
