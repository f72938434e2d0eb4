# The device handle: the one owner of a ``blkio *`` -- its state, its limits
# (as a C struct for the hot path), typed property access, memory-region
# map/unmap and the table of memory held by the device, libblkio's error
# conversion, and the lifetime guard every call enters.  It may not parse user
# options (the facade does) and knows nothing of queues' requests (``_requests``).

from libc.stdint cimport uint64_t, int64_t, uintptr_t
from cpython.pythread cimport PyThread_get_thread_ident
from ._libblkio cimport blkio, blkioq

from ._posix cimport pthread_mutex_t, pthread_cond_t


# ---- the lifetime guard ---------------------------------------------------
# A call counts itself in ``users`` and in its thread's slot, so that close()
# (or remove_queue()) called from inside a call of the same thread -- a signal
# handler, a destructor -- knows not to wait for itself.  Protected by the GIL:
# entering and leaving happen with it held.

cdef enum:
    GUARD_THREADS = 8      # threads tracked per guard; more still count in users

cdef struct Guard:
    Py_ssize_t users
    unsigned long tid[GUARD_THREADS]
    Py_ssize_t count[GUARD_THREADS]


cdef inline Py_ssize_t guard_enter(Guard *g) noexcept:
    """Count a call of this thread; returns the slot to give to guard_leave.
    A thread keeps its slot while it has one (a slot never used goes to a new
    thread before one that is merely idle), so the device's slot is also the
    thread's index for its blocking queue (``_device``)."""
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef Py_ssize_t i
    g.users += 1
    for i in range(GUARD_THREADS):
        if g.tid[i] == me:
            g.count[i] += 1
            return i
    for i in range(GUARD_THREADS):
        if g.tid[i] == 0:
            g.tid[i] = me
            g.count[i] = 1
            return i
    for i in range(GUARD_THREADS):
        if g.count[i] == 0:
            g.tid[i] = me
            g.count[i] = 1
            return i
    return GUARD_THREADS         # untracked: more threads inside than slots


cdef inline void guard_leave(Guard *g, Py_ssize_t slot) noexcept:
    g.users -= 1
    if slot < GUARD_THREADS:
        g.count[slot] -= 1


cdef inline Py_ssize_t guard_own(Guard *g) noexcept:
    """Calls of this thread inside the guard."""
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef Py_ssize_t i
    for i in range(GUARD_THREADS):
        if g.tid[i] == me:
            return g.count[i]
    return 0


# ---- state and limits -----------------------------------------------------

cdef enum StateCode:
    ST_CREATED
    ST_CONNECTED
    ST_STARTED
    ST_BROKEN           # the backend hung up: every call raises EIO
    ST_CLOSED


cdef struct HotLimits:
    # What the request path checks, copied from the validated blkio.Limits.
    uint64_t capacity
    uint64_t request_alignment
    uint64_t buf_alignment
    # Both are powers of two (_limits.validate): the hot checks mask, not divide.
    uint64_t request_mask          # request_alignment - 1
    uint64_t buf_mask              # buf_alignment - 1
    uint64_t mem_region_alignment
    uint64_t max_transfer
    uint64_t max_segment_len
    uint64_t max_write_zeroes_len
    uint64_t max_discard_len
    uint64_t bounce_chunk          # bounced requests are cut into pieces of at most this
    uint64_t io_chunk              # large reads/writes: pieces of this size ...
    int io_depth                   # ... this many in flight (Device.large_io_*)
    int max_segments
    bint read_only
    bint needs_mem_regions
    bint needs_mem_region_fd
    bint maps_memory               # map memory with libblkio (needed or pinned regions)
    # Zoned devices (0 everywhere else): what zone requests and writes are checked against.
    int zoned                      # 0 none, 1 host-aware, 2 host-managed
    uint64_t zone_size             # bytes
    uint64_t nr_zones


cdef class DeviceHandle:
    cdef object __weakref__
    cdef blkio *b
    cdef readonly str driver
    cdef StateCode state
    cdef HotLimits lim
    # lifetime guard
    cdef Guard guard
    cdef bint closing              # close() has begun: no new call enters
    cdef bint draining             # close() is draining: its own waits may run
    cdef bint destroy_pending      # the last call to leave destroys the instance
    cdef object on_last_leave      # what that last call runs (set by the device)
    cdef pthread_mutex_t guard_mutex
    cdef pthread_cond_t guard_cond
    cdef pthread_mutex_t ctl_lock  # serialises instance calls: properties, map, queues
    cdef bint locks_ready
    # memory held by the device: sorted [start, end) for lookups, and, per
    # start address, (length, fd, fd_offset, owner, mapped, user)
    cdef uintptr_t *reg_start
    cdef uintptr_t *reg_end
    cdef Py_ssize_t nreg, capreg
    cdef dict regions
    cdef tuple backend_fds         # vhost-user sockets whose hang-up means a dead daemon
    # blocking calls
    cdef int64_t spin_ns           # busy-poll before a wait sleeps (0: never)
    cdef unsigned long owner_thread
    cdef bint threaded             # a second thread did blocking I/O: always release the GIL
    # counters (Device.stats)
    cdef uint64_t n_requests, n_bounced, bounced_bytes, n_split

    cdef object closed_error(self)
    cdef object broken_error(self)
    cdef void left_while_closing(self) noexcept
    cdef void wake_waiters(self) noexcept
    cdef bint wait_guard(self, Guard *g, Py_ssize_t own, double timeout)
    cdef void ctl_acquire(self) noexcept
    cdef void ctl_release(self) noexcept
    cdef int map(self, uintptr_t addr, size_t length, int fd, int64_t fd_offset,
                 object owner, bint user) except -1
    cdef int unmap(self, uintptr_t addr) except -1
    cdef bint in_range(self, uintptr_t start, size_t length) noexcept nogil
    cdef int ensure_started(self) except -1
    cdef uint64_t default_io_chunk(self, uint64_t optimal) noexcept
    cdef uint64_t io_chunk_cap(self) noexcept
    cdef uint64_t check_io_chunk(self, object chunk) except 0
    cdef blkioq *get_queue(self, int index, bint poll) noexcept
    cdef int add_queue(self, bint poll) except -1
    cdef int remove_queue(self, int index, bint poll) except -1
    cdef bint backend_dead(self)
    cdef void destroy(self) noexcept


cdef object libblkio_error(int ret, str what, object filename=*)
cdef object request_error(int ret, object msg, str what, bint read_only)
cdef void unraisable(object where, object exc=*) noexcept


cdef inline Py_ssize_t handle_enter(DeviceHandle h) except -1:
    """Enter the device's guard: refuses a closing device, counts the call.
    Returns the slot for handle_leave."""
    if h.closing or h.b == NULL:
        raise h.closed_error()
    return guard_enter(&h.guard)


cdef inline void handle_leave(DeviceHandle h, Py_ssize_t slot) noexcept:
    guard_leave(&h.guard, slot)
    if h.closing:
        h.left_while_closing()

cdef int check_io_depth(object depth) except 0
