# The queue engine: one libblkio queue and what is in flight on it.  It owns
# Completion (a request -- how it is handed to libblkio -- and what its
# caller sees once it finished), InFlight (the list of requests in flight,
# which holds the references libblkio's user_data borrows), and QueueEngine:
# enqueueing (every blkioq_* call of the package), dispatching completions,
# driving the queue (submit, reap, the sliced waits, the shared wait over
# _sharedwait), the completion fd, the queue's own guard and removal flags,
# abandoning what is in flight when the backend or the queue is gone, the
# memory kept for requests that never completed, and resubmitting on a new
# queue after a reconnect (resume).  It calls only downward: the handle
# (state it observes), the bounce space (giving space back), the batch ring,
# held buffers and the shared wait.

from libc.stdint cimport uint64_t, int64_t, uintptr_t
from posix.uio cimport iovec
from posix.time cimport timespec
from ._libblkio cimport blkioq, blkio_completion
from ._handle cimport DeviceHandle, Guard, GUARD_THREADS, guard_enter, guard_enter_as, guard_leave
from ._memory cimport Buffer
from ._pool cimport BounceSpace
from ._held cimport HeldBuffers
from ._sharedwait cimport SharedWait
from ._batch cimport BatchRing, BatchArrays, BatchSlot, take_slots, complete
from ._checks cimport removed_error
from ._posix cimport (pthread_mutex_t, pthread_mutex_lock, pthread_mutex_trylock,
                     pthread_mutex_unlock)


# Where a completion goes once dispatched.
cdef enum Route:
    TO_CALLER = 0          # Queue.wait()/completions() return it
    INTERNAL = 1           # a blocking call's own: Python never sees it
    TO_FUTURE = 2          # blkio.aio: its user_data is an asyncio future
    TO_TRANSFER = 3        # blkio.aio: a piece of a transfer (its user_data)


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
    cdef int route
    cdef bint done
    cdef bint linked         # in its queue's in-flight list (the hot path links lazily)
    cdef HeldBuffers views   # caller memory this request reads into / writes from
    cdef object array        # or the numpy array it uses unexported (the hot paths)
    cdef iovec *user_iov     # the caller segments this request covers
    cdef iovec user1         # inline storage for the one segment of `array`
    cdef int user_iovcnt
    cdef iovec *iov          # what libblkio gets: caller segments or the bounce buffer
    cdef int iovcnt
    cdef iovec iov1
    cdef BounceSpace space
    cdef Py_ssize_t bounce_start
    cdef Buffer bounce_buffer
    cdef Completion prev     # links of the queue's in-flight list, which
    cdef Completion next     # holds the reference libblkio's user_data borrows
    cdef object release_memory(self)
    cdef void hand_to(self, blkioq *q, void *ud) noexcept nogil
    cdef int finish(self, int ret, const char *error_msg) except -1


cdef inline int set_ret(Completion c, int ret) except -1:
    c.ret = ret
    c.ret_obj = ret
    return 0


cdef inline void set_request(Completion c, int op, uint64_t offset, uint64_t length,
                             unsigned int flags) noexcept:
    """What ``c`` asks for, not done yet: a new Completion's or a recycled
    one's (a recycled one is internal, so its ``ret_obj`` is never read)."""
    c.op = op
    c.offset = offset
    c.length = length
    c.flags = flags
    c.done = False
    c.ret = 0


cdef Completion new_completion(int op, uint64_t offset, uint64_t length, unsigned int flags,
                               int route, object user_data)


cdef class InFlight:
    # The requests handed to libblkio and not yet reaped, newest first
    # (doubly linked through Completion.prev/next).  The list holds the
    # reference each request's libblkio user_data borrows.
    cdef Completion head
    cdef void link(self, Completion c) noexcept
    cdef void unlink(self, Completion c) noexcept
    cdef Py_ssize_t hand_to(self, blkioq *q) noexcept
    cdef Py_ssize_t using(self, uintptr_t start, uintptr_t end)
    cdef list requests(self)
    cdef object fail_all(self, int err, str msg, bint release, list ready)


cdef class QueueEngine:
    cdef object __weakref__
    cdef blkioq *q
    cdef DeviceHandle handle
    cdef BounceSpace space
    cdef readonly int index
    cdef readonly bint is_poll_queue
    cdef readonly Py_ssize_t depth  # the driver's queue depth (num-entries / queue-size), 0: unknown
    cdef pthread_mutex_t lock       # libblkio queues are not thread-safe
    cdef bint lock_ready
    cdef Py_ssize_t nogil_users     # threads in a GIL-free section that takes the lock
                                    # (changed with the GIL held: see take_queue)
    cdef SharedWait shared         # several threads waiting on this queue
    # What is in flight, counted three ways (the batch ring counts its own):
    cdef Py_ssize_t unreaped       # enqueued and not yet reaped (Queue.in_flight)
    cdef Py_ssize_t in_libblkio    # enqueued and not yet returned by do_io (as libblkio counts;
                                   # changed only under the lock)
    cdef list ready                # reaped Completions not yet handed out
    cdef InFlight in_flight        # the Completions handed to libblkio
    cdef Completion spare          # a finished internal Completion, recycled by the hot path
    cdef uint64_t spare_len        # the hot path's last length, and it as an int:
    cdef object spare_len_obj      # most calls return what the one before did
    cdef BatchRing ring
    cdef bint fd_enabled
    cdef uint64_t n_requests       # requests handed to libblkio through this queue
    # lifetime: the queue's own guard and removal (driven by the device core)
    cdef Guard guard
    cdef bint removing
    cdef bint removed
    cdef bint draining
    cdef bint remove_pending
    cdef double remove_timeout
    cdef object api                # the public blkio.Queue of this engine (made once)
    cdef list gone_listeners       # told when the queue goes: blkio.aio's callbacks

    cdef int check_usable(self) except -1
    cdef Py_ssize_t using(self, uintptr_t start, uintptr_t end)
    cdef int enqueue_one(self, Completion c, bint reap, bint wait_first=*,
                         bint lazy_link=*) except -1
    cdef int _enqueue_locked(self, Completion c, void *ud, bint reap,
                             blkio_completion *comps) noexcept nogil
    cdef int _enqueue_wait_locked(self, Completion c, void *ud, blkio_completion *comps,
                                  timespec *ts) noexcept nogil
    cdef int enqueue_batch(self, int op, BatchArrays a, unsigned int flags) except -1
    cdef int _enqueue_slots(self, int op, BatchArrays a, Py_ssize_t *idx, unsigned int flags,
                            blkio_completion *comps) noexcept nogil
    cdef int dispatch(self, blkio_completion *comps, int n) except -1
    cdef int collect(self, blkio_completion *comps, int held) except -1
    cdef int drive(self, int min_completions, double timeout, Completion until) except -1
    cdef int wait_shared(self, Completion until) except -1
    cdef int hung_up(self) except -1
    cdef int set_fd_enabled(self, bint value) except -1
    cdef int completion_fd(self) noexcept
    cdef bint reset_fd(self, int fd) noexcept
    cdef list take(self, object max)
    cdef object abandon(self, int err, str msg, bint release)
    cdef bint drain(self, double timeout)
    cdef int keep_undrained(self) except -1
    cdef Py_ssize_t resume(self, blkioq *q) except -1


cdef QueueEngine new_engine(DeviceHandle handle, BounceSpace space, blkioq *q, int index,
                            bint poll, Py_ssize_t depth)


# ---- a queue's own guard (callers are inside the device's) ------------------

cdef inline Py_ssize_t queue_use(QueueEngine e) except -1:
    if e.removing or e.q == NULL:
        raise removed_error(e.index)
    return guard_enter(&e.guard)


cdef inline Py_ssize_t queue_use_as(QueueEngine e, unsigned long tid) except -1:
    """queue_use for the thread ``tid`` (the calling one, looked up already)."""
    if e.removing or e.q == NULL:
        raise removed_error(e.index)
    return guard_enter_as(&e.guard, tid)


cdef inline void queue_unuse(QueueEngine e, Py_ssize_t entry) noexcept:
    guard_leave(&e.guard, entry)
    if e.removing:
        e.handle.wake_waiters()     # a remover may be waiting for this call


# ---- the queue's lock, taken with the GIL held --------------------------------
# Every GIL-free section that takes a queue's lock counts itself in
# ``nogil_users`` (with the GIL, before and after).  A thread holding the GIL
# that sees no such section knows no other thread can hold the lock -- one
# holding the GIL now would be itself, and a GIL holder always releases the
# lock before it can release the GIL -- so it skips the lock: the common case
# of one thread per queue pays no mutex.

cdef inline int take_queue(QueueEngine e) noexcept:
    """With the GIL held: 0 when the queue is ours without its lock, 1 when
    its lock was free and is now ours, -1 when another thread holds it."""
    if e.nogil_users == 0:
        return 0
    return 1 if pthread_mutex_trylock(&e.lock) == 0 else -1


cdef inline int hold_queue(QueueEngine e) noexcept:
    """take_queue, waiting (GIL released) while another thread holds the
    lock; returns what give_queue takes (0 or 1)."""
    cdef int held = take_queue(e)
    if held < 0:
        e.nogil_users += 1
        with nogil:
            pthread_mutex_lock(&e.lock)
        e.nogil_users -= 1      # the lock is ours, with the GIL
        held = 1
    return held


cdef inline void give_queue(QueueEngine e, int held) noexcept:
    """Undo take_queue (``held`` 1: unlock)."""
    if held == 1:
        pthread_mutex_unlock(&e.lock)
