# The device handle: the one owner of a ``blkio *`` -- its state (which
# queues and waits observe: started, broken, closing, reconnecting, the
# process it belongs to), its limits as a C struct for the request path,
# typed property access, memory-region map/unmap with the table of memory
# the device holds (RegionTable, Region records), and the counters of the
# lifetime guard.  It may not parse user options, knows
# nothing of requests, and never calls up: the device core (``_device``)
# drives its transitions.

from libc.stdint cimport uint64_t, int64_t, uintptr_t
from cpython.pythread cimport PyThread_get_thread_ident
from ._libblkio cimport blkio, blkioq, blkio_mem_region
from ._checks cimport HotLimits, IoPolicy
from ._posix cimport pthread_mutex_t, pthread_cond_t

cdef extern from "_fork.h":
    # this process's pid, kept current across fork() (see _fork.h)
    int blkio_current_pid


# ---- the lifetime guard's counters -----------------------------------------
# A call counts itself in ``users`` and in its thread's entry, so that close()
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
    """Count a call of this thread; returns its entry (the thread's index in
    the guard) for guard_leave.  A thread keeps its entry while it has one
    (an entry never used goes to a new thread before one that is merely
    idle), so a device's entry is also the thread's index for its blocking
    queue."""
    return guard_enter_as(g, PyThread_get_thread_ident())


cdef inline unsigned long guard_thread(Guard *g, Py_ssize_t entry) noexcept:
    """The thread of an entry guard_enter returned (its id, looked up once)."""
    return g.tid[entry] if entry < GUARD_THREADS else PyThread_get_thread_ident()


cdef inline Py_ssize_t guard_enter_as(Guard *g, unsigned long me) noexcept:
    """guard_enter for the thread ``me`` (the calling one, looked up already)."""
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
    return GUARD_THREADS         # untracked: more threads inside than entries


cdef inline void guard_leave(Guard *g, Py_ssize_t entry) noexcept:
    g.users -= 1
    if entry < GUARD_THREADS:
        g.count[entry] -= 1


cdef inline Py_ssize_t guard_own(Guard *g) noexcept:
    """Calls of this thread inside the guard."""
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef Py_ssize_t i
    for i in range(GUARD_THREADS):
        if g.tid[i] == me:
            return g.count[i]
    return 0


# ---- state -----------------------------------------------------------------

cdef enum StateCode:
    ST_CREATED
    ST_CONNECTED
    ST_STARTED
    ST_BROKEN           # the backend hung up: every call raises EIO
    ST_CLOSED


cdef class Region:
    """Memory the device holds: exactly what was given to map (unmap needs
    the same values), and its owner, which keeps it (and its fd) alive."""
    cdef size_t length
    cdef int fd
    cdef int64_t fd_offset
    cdef object owner
    cdef bint mapped            # mapped with libblkio (else only held)
    cdef bint user              # from Device.register (else the arena or the pool)
    cdef void describe(self, uintptr_t addr, blkio_mem_region *r) noexcept


cdef class RegionTable:
    # the Region of each start address, and sorted [start, end) for lookups
    cdef dict by_start
    cdef uintptr_t *start
    cdef uintptr_t *end
    cdef Py_ssize_t n, cap
    cdef int add(self, uintptr_t addr, Region region) except -1
    cdef Region remove(self, uintptr_t addr)
    cdef bint holds(self, uintptr_t addr)
    cdef list addresses(self)
    cdef void forget(self) noexcept
    cdef bint covers(self, uintptr_t start, size_t length) noexcept nogil


cdef class DeviceHandle:
    cdef object __weakref__
    cdef blkio *b
    cdef int pid                   # the process that created the instance (fork safety)
    cdef readonly str driver
    cdef StateCode state
    cdef HotLimits lim
    cdef IoPolicy policy
    # lifetime: the guard's counters and the flags the device core sets
    cdef Guard guard
    cdef bint closing              # close() has begun: no new call enters
    cdef bint draining             # close() is draining: its own waits may run
    cdef pthread_mutex_t guard_mutex
    cdef pthread_cond_t guard_cond
    cdef pthread_mutex_t ctl_lock  # serialises instance calls: properties, map, queues
    cdef bint locks_ready
    cdef RegionTable regions       # the memory the device holds
    cdef tuple backend_fds         # vhost-user sockets whose hang-up means a dead daemon
    cdef list engines              # the queue engines of the instance (the device core keeps it)
    # blocking calls
    cdef int64_t spin_ns           # busy-poll before a wait sleeps (0: never)
    cdef unsigned long owner_thread
    cdef bint threaded             # a second thread did blocking I/O: always release the GIL
    # counters (Device.stats)
    cdef uint64_t n_requests, n_bounced, bounced_bytes, n_split
    # reconnecting after the backend hung up (the device core drives it):
    # new calls wait at the gate, waits in progress park between slices
    cdef bint reconnect_enabled    # a hang-up starts a reconnect (else: broken at once)
    cdef bint reconnecting         # a reconnect is in progress
    cdef Py_ssize_t parked         # calls inside that wait for it to end (the reconnect waits for them)
    cdef str broken_why            # why a broken device will not come back, or None
    cdef uint64_t n_reconnects, n_resubmitted

    cdef object unusable_error(self)
    cdef bint forked(self) noexcept
    cdef void forget(self) noexcept
    cdef int ensure_started(self) except -1
    cdef void wake_waiters(self) noexcept
    cdef bint wait_guard(self, Guard *g, Py_ssize_t own, double timeout)
    cdef void ctl_acquire(self) noexcept
    cdef void ctl_release(self) noexcept
    cdef object get_property(self, str name, str kind)
    cdef int set_property(self, str name, str kind, object value) except -1
    cdef int map(self, uintptr_t addr, size_t length, int fd, int64_t fd_offset,
                 object owner, bint user) except -1
    cdef int unmap(self, uintptr_t addr) except -1
    cdef int unmap_all(self) except -1
    cdef uint64_t io_chunk_cap(self) noexcept
    cdef uint64_t check_io_chunk(self, object chunk) except 0
    cdef blkioq *get_queue(self, int index, bint poll) noexcept
    cdef int add_queue(self, bint poll) except -1
    cdef int remove_queue(self, int index, bint poll) except -1
    cdef bint backend_dead(self)
    cdef object broken(self, Py_ssize_t in_flight)
    cdef int park(self) except -1
    cdef int wait_reconnected(self, Py_ssize_t waiting) except -1
    cdef bint wait_quiet(self, Py_ssize_t own, double deadline)
    cdef int map_regions_into(self, DeviceHandle other) except -1
    cdef void take_instance(self, DeviceHandle other, tuple backend_fds) noexcept
    cdef void set_broken(self, str why) noexcept
    cdef void destroy(self) noexcept


cdef Py_ssize_t handle_enter_slow(DeviceHandle h) except -1


cdef inline Py_ssize_t handle_enter(DeviceHandle h) except -1:
    """Enter the device's guard: refuses a closing device and a device of
    the parent process after fork(), waits while the device reconnects,
    counts the call.  Returns the entry for handle_leave."""
    if h.closing or h.b == NULL or h.pid != blkio_current_pid or h.reconnecting:
        return handle_enter_slow(h)
    return guard_enter(&h.guard)


cdef inline void handle_leave(DeviceHandle h, Py_ssize_t entry) noexcept:
    guard_leave(&h.guard, entry)
    if h.closing:
        h.wake_waiters()        # a closer may be waiting for this call


cdef int check_io_depth(object depth) except 0
