"""The device handle: the one owner of a libblkio instance (``blkio *``).

It holds the instance's state, its limits as a C struct for the request path
(and blkio's own policy for cutting requests, apart), typed property access,
memory-region map/unmap (the memory the device holds is a ``RegionTable`` of
``Region`` records, which the request checks search), and the counters and
flags of the lifetime guard.
It never parses user options, knows nothing of requests, and never calls up:
the device core (``_device``) drives the lifetime, queues (``_engine``)
observe the state (closing, broken, forked) between their wait slices.

Lifetime under threads (one mechanism for every entry point)
-------------------------------------------------------------
libblkio gives no protection against destroying an instance (or removing a
queue) while another thread is inside a call on it: it reads freed memory or
panics.  So every public call that touches the instance or a queue enters a
guard first and leaves it last (``DeviceCore.enter``/``leave`` in
``_device``, built on ``handle_enter``/``handle_leave`` here, and the
queue's own guard in ``_engine``):

* entering refuses a closing device (``ValueError: ... device is closed``)
  and a device of the parent process after fork(), and counts the call in
  ``guard.users``.  The counts are protected by the GIL: entering and leaving
  happen with it held, so the hot path pays a few increments, not a lock.
* Waits are cut into slices (``_engine``); between slices a wait notices
  ``closing`` and returns with that ValueError.  Its request stays in
  flight, holding its memory, for close to drain.
* ``close()`` sets ``closing`` (new calls fail at once), waits -- GIL
  released, on ``guard_cond``, which leaving calls signal -- until no call is
  inside (calls of its own thread excepted, see below), drains the requests
  in flight (bounded), unmaps memory and destroys the instance.
  ``remove_queue()`` does the same for one queue.  A use count plus a
  condition rather than a reader-writer lock: glibc's rwlock prefers
  readers, so a thread looping on I/O would starve the closer, and the count
  costs nothing while the GIL is held.
* Each guard counts calls per thread too (``Guard.tid/count``), so a close
  from inside a call on the same device (a signal handler, a destructor)
  does not wait for itself: the last call to leave finishes it.
* Requests that do not complete within the drain bound keep their memory
  forever rather than have it freed under the kernel.
* Instance-level calls (properties, memory map/unmap, adding and removing
  queues) are serialised by ``ctl_lock``: libblkio's vhost-user connection is
  corrupted by two threads reading properties at once.  Queues have their
  own locks for the data path.
* While the device reconnects (``reconnecting``: the device core replaces
  the instance after its vhost-user backend hung up), entering waits at the
  gate instead of failing (``handle_enter_slow``), and waits in progress
  ``park`` between their slices; the reconnect swaps the instance only once
  every call inside is parked (``wait_quiet``), so no call holds a pointer
  into the old one.  ``close()`` ends the waits of both.
"""

import enum
import time

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint64_t, int64_t, uintptr_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset
from posix.time cimport timespec

from . cimport _libblkio as lb
from ._memory cimport PAGE
from ._checks cimport (as_u64, as_index, libblkio_error, closed_error, forked_error,
                       not_started_error, broken_error)
from ._posix cimport (pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
                      pthread_mutex_trylock, pthread_mutex_unlock, pthread_cond_init,
                      pthread_cond_destroy, pthread_cond_broadcast, pthread_cond_timedwait,
                      realtime_after, pollfd, poll as c_poll, POLLHUP, POLLERR)

# Bounced requests are cut into pieces of at most this many bytes.
cdef uint64_t BOUNCE_CHUNK = 4 << 20
# Reads and writes longer than a chunk are pipelined: chunks of 1 MiB (or the
# device's optimal-io-size, within max-transfer), 8 in flight (see the
# performance docs for the measurements behind these defaults).
cdef uint64_t IO_CHUNK = 1 << 20
cdef int IO_DEPTH = 8
# Deepest pipeline a large read or write may ask for.
cdef int IO_DEPTH_MAX = 1024


class State(str, enum.Enum):
    """A device's state: libblkio's created -> connected -> started, then
    closed; broken when its backend hung up.  Compares equal to its name."""

    CREATED = "created"
    CONNECTED = "connected"
    STARTED = "started"
    BROKEN = "broken"
    CLOSED = "closed"

    def __str__(self) -> str:
        return self.value


_STATES = (State.CREATED, State.CONNECTED, State.STARTED, State.BROKEN, State.CLOSED)


cdef class Region:
    """Memory the device holds (internal)."""

    cdef void describe(self, uintptr_t addr, lb.blkio_mem_region *r) noexcept:
        """The libblkio region for this memory at ``addr``: exactly the
        values it was mapped with (unmap needs the same)."""
        memset(r, 0, sizeof(r[0]))
        r.addr = <void *>addr
        r.len = self.length
        r.fd = self.fd
        r.fd_offset = self.fd_offset


@cython.final
cdef class RegionTable:
    """The memory a device holds (internal): a Region record per start
    address, and sorted [start, end) arrays for the request checks."""

    def __cinit__(self):
        self.by_start = {}
        self.start = NULL
        self.end = NULL

    def __dealloc__(self):
        free(self.start)
        free(self.end)

    cdef int add(self, uintptr_t addr, Region region) except -1:
        cdef Py_ssize_t i, j, newcap
        cdef uintptr_t *s
        cdef uintptr_t *e
        if self.n == self.cap:
            newcap = max(16, 2 * self.cap)
            s = <uintptr_t *>realloc(self.start, newcap * sizeof(uintptr_t))
            if s == NULL:
                raise MemoryError()
            self.start = s
            e = <uintptr_t *>realloc(self.end, newcap * sizeof(uintptr_t))
            if e == NULL:
                raise MemoryError()
            self.end = e
            self.cap = newcap
        self.by_start[addr] = region
        i = 0
        while i < self.n and self.start[i] < addr:
            i += 1
        j = self.n
        while j > i:
            self.start[j] = self.start[j - 1]
            self.end[j] = self.end[j - 1]
            j -= 1
        self.start[i] = addr
        self.end[i] = addr + region.length
        self.n += 1
        return 0

    cdef Region remove(self, uintptr_t addr):
        """Take the region at ``addr`` out (KeyError: none there)."""
        cdef Region region = self.by_start.pop(addr)
        cdef Py_ssize_t i = 0
        while i < self.n and self.start[i] != addr:
            i += 1
        while i + 1 < self.n:
            self.start[i] = self.start[i + 1]
            self.end[i] = self.end[i + 1]
            i += 1
        if i < self.n:
            self.n -= 1
        return region

    cdef bint holds(self, uintptr_t addr):
        return addr in self.by_start

    cdef list addresses(self):
        return sorted(self.by_start)

    cdef void forget(self) noexcept:
        self.by_start = {}
        self.n = 0

    cdef bint covers(self, uintptr_t start, size_t length) noexcept nogil:
        """Does [start, start+length) lie inside one region?"""
        cdef Py_ssize_t lo = 0, hi = self.n, mid
        while lo < hi:       # last region starting at or before `start`
            mid = (lo + hi) // 2
            if self.start[mid] <= start:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return False
        return start + length <= self.end[lo - 1]

    def user_region(self, uintptr_t addr):
        """(start, length) of the memory ``register``ed at ``addr``, or None."""
        cdef Region region = self.by_start.get(addr)
        if region is None or not region.user:
            return None
        return addr, region.length

    def owners(self):
        """What keeps each region's memory alive."""
        return [(<Region>region).owner for region in self.by_start.values()]

    def __len__(self):
        return self.n


cdef class DeviceHandle:
    """The libblkio instance of one device (internal: the device core makes it)."""

    def __cinit__(self):
        self.b = NULL
        self.pid = blkio_current_pid
        self.state = ST_CLOSED
        self.regions = RegionTable()
        self.backend_fds = ()
        self.engines = []
        pthread_mutex_init(&self.guard_mutex, NULL)
        pthread_cond_init(&self.guard_cond, NULL)
        pthread_mutex_init(&self.ctl_lock, NULL)
        self.locks_ready = True

    def __dealloc__(self):
        # Unreachable, so no call is inside (a call holds a reference).  In
        # the child of a fork() the instance is the parent's: never destroyed.
        if self.b != NULL and not self.forked():
            lb.blkio_destroy(&self.b)
        if self.locks_ready:
            pthread_mutex_destroy(&self.guard_mutex)
            pthread_cond_destroy(&self.guard_cond)
            pthread_mutex_destroy(&self.ctl_lock)

    # ---- state ---------------------------------------------------------------

    cdef object unusable_error(self):
        """Why no call may enter: the device belongs to the parent of this
        process (a fork() copied it), or it is closed."""
        if self.forked():
            return forked_error(self.driver, self.pid)
        return closed_error(self.driver)

    cdef bint forked(self) noexcept:
        return self.pid != blkio_current_pid

    cdef void forget(self) noexcept:
        """In the child of a fork(): let go of the parent's instance without
        calling libblkio or taking a lock (another thread of the parent may
        have held it when the process was copied).  The parent's device,
        which shares the instance's kernel objects, is left as it was."""
        self.b = NULL
        self.closing = True
        self.state = ST_CLOSED
        self.regions.forget()

    cdef int ensure_started(self) except -1:
        if self.closing or self.b == NULL or self.forked():
            raise self.unusable_error()
        if self.state == ST_BROKEN:
            raise self.broken(-1)
        if self.state != ST_STARTED:
            raise not_started_error(self.driver, _STATES[<int>self.state].value)
        return 0

    @property
    def state_name(self):
        return _STATES[<int>self.state]

    def mark_broken(self):
        self.set_broken(None)

    cdef void set_broken(self, str why) noexcept:
        """The backend hung up and will not come back (``why``: after a
        failed reconnect, else None): every call raises EIO from now on."""
        self.state = ST_BROKEN
        if why is not None:
            self.broken_why = why

    # ---- the lifetime guard: waiting for calls to leave ------------------------

    cdef void wake_waiters(self) noexcept:
        pthread_mutex_lock(&self.guard_mutex)
        pthread_cond_broadcast(&self.guard_cond)
        pthread_mutex_unlock(&self.guard_mutex)

    cdef bint wait_guard(self, Guard *g, Py_ssize_t own, double timeout):
        """Wait, GIL released, until the calls inside guard ``g`` (the
        device's or a queue's) are only the ``own`` ones of this thread;
        False on timeout.  A leaving call signals the condition while holding
        the mutex this check holds, so no wake-up is lost."""
        cdef timespec ts
        cdef double left
        deadline = time.monotonic() + timeout
        while g.users > own:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            realtime_after(&ts, left if left < 0.05 else 0.05)
            pthread_mutex_lock(&self.guard_mutex)
            if g.users > own:
                with nogil:
                    pthread_cond_timedwait(&self.guard_cond, &self.guard_mutex, &ts)
                    pthread_mutex_unlock(&self.guard_mutex)
            else:
                pthread_mutex_unlock(&self.guard_mutex)
        return True

    # ---- reconnecting: the gate and the parked calls ---------------------------

    cdef object broken(self, Py_ssize_t in_flight):
        """The EIO of a broken device: its backend hung up (and, after a
        failed reconnect, why it will not come back)."""
        return broken_error(self.driver, in_flight if self.broken_why is None else -1,
                            self.broken_why)

    cdef int park(self) except -1:
        """A wait of a call inside the device, between its slices, while the
        device reconnects: wait until the reconnect is over (or the device
        closing).  Ctrl-C raises here; the call's request stays in flight
        and is resubmitted with the others."""
        cdef Py_ssize_t n = guard_own(&self.guard)
        self.wait_reconnected(n if n > 0 else 1)
        return 0

    cdef int wait_reconnected(self, Py_ssize_t waiting) except -1:
        """Wait (GIL released, in slices that run signal handlers) until no
        reconnect is in progress or the device is closing.  ``waiting``:
        the calls of this thread inside the device, counted as parked so
        that the reconnect does not wait for them."""
        cdef timespec ts
        self.parked += waiting
        if waiting:
            self.wake_waiters()         # the reconnect may be waiting for this one
        try:
            while self.reconnecting and not self.closing:
                realtime_after(&ts, 0.1)
                pthread_mutex_lock(&self.guard_mutex)
                if self.reconnecting and not self.closing:
                    with nogil:
                        pthread_cond_timedwait(&self.guard_cond, &self.guard_mutex, &ts)
                        pthread_mutex_unlock(&self.guard_mutex)
                else:
                    pthread_mutex_unlock(&self.guard_mutex)
                PyErr_CheckSignals()
        finally:
            self.parked -= waiting
        return 0

    cdef bint wait_quiet(self, Py_ssize_t own, double deadline):
        """The reconnect (``own``: its calls inside) waits until every other
        call inside is parked; False when the device is closing or the
        ``deadline`` (time.monotonic) passed first.  Parking wakes it;
        leaving does not, hence the short slices."""
        cdef timespec ts
        cdef double left
        while self.guard.users - own > self.parked:
            left = deadline - time.monotonic()
            if self.closing or left <= 0:
                return False
            realtime_after(&ts, left if left < 0.005 else 0.005)
            pthread_mutex_lock(&self.guard_mutex)
            if self.guard.users - own > self.parked:
                with nogil:
                    pthread_cond_timedwait(&self.guard_cond, &self.guard_mutex, &ts)
                    pthread_mutex_unlock(&self.guard_mutex)
            else:
                pthread_mutex_unlock(&self.guard_mutex)
        return not self.closing

    cdef int map_regions_into(self, DeviceHandle other) except -1:
        """Map every region this device maps with libblkio into ``other``'s
        instance too, with the same values (a reconnect: the new instance
        reaches the same memory, which this device keeps holding)."""
        cdef lb.blkio_mem_region r
        cdef Region region
        cdef int ret
        for addr in self.regions.addresses():
            region = self.regions.by_start[addr]
            if not region.mapped:
                continue
            region.describe(addr, &r)
            other.ctl_acquire()
            with nogil:
                ret = lb.blkio_map_mem_region(other.b, &r)
            other.ctl_release()
            if ret < 0:
                raise libblkio_error(ret, f"blkio_map_mem_region({region.length} bytes at "
                                          f"{addr:#x}) on reconnect")
        return 0

    cdef void take_instance(self, DeviceHandle other, tuple backend_fds) noexcept:
        """Swap instances with ``other`` (a reconnect: this device goes on
        with the new one and its backend's sockets, ``other`` is left
        holding the old one to destroy)."""
        cdef lb.blkio *b = self.b
        self.b = other.b
        other.b = b
        self.backend_fds = backend_fds

    def wait_destroyed(self, double timeout):
        """Wait (GIL released) until another thread finished destroying."""
        cdef timespec ts
        deadline = time.monotonic() + timeout
        while self.b != NULL and time.monotonic() < deadline:
            realtime_after(&ts, 0.05)
            pthread_mutex_lock(&self.guard_mutex)
            if self.b != NULL:
                with nogil:
                    pthread_cond_timedwait(&self.guard_cond, &self.guard_mutex, &ts)
                    pthread_mutex_unlock(&self.guard_mutex)
            else:
                pthread_mutex_unlock(&self.guard_mutex)

    cdef void ctl_acquire(self) noexcept:
        # Without the GIL only when contended, so that a holder that needs
        # the GIL back can always get it.
        if pthread_mutex_trylock(&self.ctl_lock) != 0:
            with nogil:
                pthread_mutex_lock(&self.ctl_lock)

    cdef void ctl_release(self) noexcept:
        pthread_mutex_unlock(&self.ctl_lock)

    # ---- lifecycle primitives -----------------------------------------------

    def create(self, str driver):
        cdef bytes bdriver = driver.encode()
        cdef int ret = lb.blkio_create(bdriver, &self.b)
        if ret < 0:
            raise libblkio_error(ret, f"blkio_create({driver!r})")
        self.driver = driver
        self.state = ST_CREATED

    def connect(self):
        cdef int ret
        with nogil:
            ret = lb.blkio_connect(self.b)
        if ret < 0:
            raise libblkio_error(ret, f"cannot connect {self.driver} device")
        self.state = ST_CONNECTED

    def start(self):
        cdef int ret
        with nogil:
            ret = lb.blkio_start(self.b)
        if ret < 0:
            raise libblkio_error(ret, "blkio_start")
        self.state = ST_STARTED

    def configure(self, limits, uint64_t capacity, bint read_only, backend_fds=()):
        """Copy the validated limits to C for the request path."""
        self.lim.capacity = capacity
        self.lim.read_only = read_only
        self.lim.request_alignment = limits.request_alignment
        self.lim.buf_alignment = limits.buf_alignment
        self.lim.request_mask = self.lim.request_alignment - 1
        self.lim.buf_mask = self.lim.buf_alignment - 1
        self.lim.mem_region_alignment = limits.mem_region_alignment
        self.lim.max_transfer = limits.max_transfer
        self.lim.max_segments = limits.max_segments
        self.lim.max_segment_len = limits.max_segment_len
        self.lim.max_write_zeroes_len = limits.max_write_zeroes_len
        self.lim.max_discard_len = limits.max_discard_len
        self.lim.can_grow = limits.can_grow
        self.lim.needs_mem_regions = limits.needs_mem_regions
        self.lim.needs_mem_region_fd = limits.needs_mem_region_fd
        # Map memory where the driver needs it or pins it (IOMMU mappings are
        # set up once instead of per request); elsewhere mapping buys nothing.
        self.lim.maps_memory = limits.needs_mem_regions or limits.may_pin_mem_regions
        self.policy.bounce_chunk = BOUNCE_CHUNK
        if self.lim.max_transfer and self.lim.max_transfer < BOUNCE_CHUNK:
            self.policy.bounce_chunk = self.lim.max_transfer
        self.policy.io_chunk = self.default_io_chunk(limits.optimal_io_size)
        self.policy.io_depth = IO_DEPTH
        self.backend_fds = tuple(backend_fds)

    def configure_zones(self, int model, uint64_t zone_size, uint64_t nr_zones):
        """The zone geometry of a validated ``blkio.ZoneInfo`` (model 0: not
        zoned), for the checks of zone requests and of writes."""
        self.lim.zoned = model
        self.lim.zone_size = zone_size if model else 0
        self.lim.nr_zones = nr_zones if model else 0

    def set_capacity(self, uint64_t capacity):
        self.lim.capacity = capacity

    @property
    def capacity(self):
        """The capacity the checks use; on a device that can grow, read
        again from libblkio (a file's size: cheap) so that it follows the
        writes past the end."""
        if self.lim.can_grow and self.b != NULL and not self.closing and not self.forked():
            self.lim.capacity = self.get_property("capacity", "uint64")
        return self.lim.capacity

    @property
    def granule(self) -> int:
        """Allocation unit of mapped memory: a page, or mem-region-alignment."""
        return max(PAGE, self.lim.mem_region_alignment)

    cdef void destroy(self) noexcept:
        with nogil:
            lb.blkio_destroy(&self.b)
        self.b = NULL
        self.state = ST_CLOSED

    # ---- large I/O policy ----------------------------------------------------

    def default_io_chunk(self, uint64_t optimal):
        cdef uint64_t align = self.lim.request_alignment or 1
        cdef uint64_t chunk = IO_CHUNK, cap = self.io_chunk_cap()
        if optimal and chunk % optimal:
            chunk += optimal - chunk % optimal
        if cap and chunk > cap:
            chunk = cap
        chunk -= chunk % align
        return chunk if chunk else align

    cdef uint64_t io_chunk_cap(self) noexcept:
        """The largest chunk that is still one request and one segment of
        contiguous memory (0: no limit)."""
        cdef uint64_t cap = self.lim.max_transfer
        if self.lim.max_segment_len and (cap == 0 or self.lim.max_segment_len < cap):
            cap = self.lim.max_segment_len
        return cap - cap % (self.lim.request_alignment or 1)

    def set_large_io(self, chunk, depth):
        """Set the defaults for large reads and writes (None: keep)."""
        if chunk is not None:
            self.policy.io_chunk = self.check_io_chunk(chunk)
        if depth is not None:
            self.policy.io_depth = check_io_depth(depth)

    cdef uint64_t check_io_chunk(self, object chunk) except 0:
        cdef uint64_t n = as_u64(chunk, "chunk"), cap = self.io_chunk_cap()
        cdef uint64_t align = self.lim.request_alignment or 1
        if n == 0 or n % align:
            raise ValueError(f"chunk={n}: must be a positive multiple of the device's "
                             f"request alignment ({align} bytes)")
        if cap and n > cap:
            raise ValueError(f"chunk={n}: more than one request can carry "
                             f"(max-transfer / max-segment-len: {cap} bytes)")
        return n

    @property
    def large_io(self):
        return self.policy.io_chunk, self.policy.io_depth

    # ---- properties (the caller is inside the device's guard) -----------------

    cdef object get_property(self, str name, str kind):
        """Read property ``name`` with the getter for C type ``kind``."""
        cdef bytes bname = name.encode()
        cdef const char *cname = bname
        cdef lb.cbool bv
        cdef int iv
        cdef uint64_t uv
        cdef char *sv = NULL
        cdef int ret
        self.ctl_acquire()
        try:
            if kind == "bool":
                ret = lb.blkio_get_bool(self.b, cname, &bv)
                if ret < 0:
                    raise libblkio_error(ret, f"get {name!r}")
                return bool(bv)
            if kind == "int":
                ret = lb.blkio_get_int(self.b, cname, &iv)
                if ret < 0:
                    raise libblkio_error(ret, f"get {name!r}")
                return iv
            if kind == "uint64":
                with nogil:   # "capacity" is a round trip to a vhost-user daemon
                    ret = lb.blkio_get_uint64(self.b, cname, &uv)
                if ret < 0:
                    raise libblkio_error(ret, f"get {name!r}")
                return uv
            ret = lb.blkio_get_str(self.b, cname, &sv)
            if ret < 0:
                raise libblkio_error(ret, f"get {name!r}")
            try:
                return sv.decode("utf-8", "replace")
            finally:
                free(sv)
        finally:
            self.ctl_release()

    cdef int set_property(self, str name, str kind, object value) except -1:
        """Write property ``name`` with the setter for C type ``kind``."""
        cdef bytes bname = name.encode()
        cdef bytes bvalue
        cdef int ret
        self.ctl_acquire()
        try:
            if kind == "bool":
                ret = lb.blkio_set_bool(self.b, bname, <lb.cbool>bool(value))
            elif kind == "int":
                ret = lb.blkio_set_int(self.b, bname, <int>value)
            elif kind == "uint64":
                ret = lb.blkio_set_uint64(self.b, bname, <uint64_t>value)
            else:
                bvalue = str(value).encode()
                ret = lb.blkio_set_str(self.b, bname, bvalue)
        finally:
            self.ctl_release()
        if ret < 0:
            raise libblkio_error(ret, f"set {name!r} = {value!r}")
        return 0

    # ---- memory held by the device ---------------------------------------------

    cdef int map(self, uintptr_t addr, size_t length, int fd, int64_t fd_offset,
                 object owner, bint user) except -1:
        """Hold ``owner``'s memory for the device's lifetime (or until
        unregister), mapping it with libblkio where the driver needs or pins
        memory regions.  The table of held memory is also what the batch API
        and the direct path check buffers against."""
        if self.regions.holds(addr):
            raise ValueError(f"memory at {addr:#x} is already registered with this device")
        # The owner reference keeps the memory and its fd alive while mapped:
        # unmapping after the fd closed corrupts data on vhost-user (DESIGN 9).
        cdef Region region = Region.__new__(Region)
        region.length = length
        region.fd = fd
        region.fd_offset = fd_offset
        region.owner = owner
        region.mapped = self.lim.maps_memory
        region.user = user
        cdef lb.blkio_mem_region r
        cdef int ret = 0
        if region.mapped:
            region.describe(addr, &r)
            self.ctl_acquire()
            with nogil:
                ret = lb.blkio_map_mem_region(self.b, &r)
            self.ctl_release()
            # A device that reconnects keeps memory its dead backend refused:
            # the reconnect maps every region it holds into the new instance.
            if ret < 0 and not (self.reconnect_enabled and self.backend_dead()):
                raise libblkio_error(ret, f"blkio_map_mem_region({length} bytes at {addr:#x})")
        self.regions.add(addr, region)
        return 0

    cdef int unmap(self, uintptr_t addr) except -1:
        # Out of the table first: no request can be validated against the
        # region while it is being unmapped (``owner`` keeps it alive).
        cdef Region region = self.regions.remove(addr)
        cdef lb.blkio_mem_region r
        if region.mapped and self.b != NULL:
            region.describe(addr, &r)
            self.ctl_acquire()
            with nogil:
                lb.blkio_unmap_mem_region(self.b, &r)
            self.ctl_release()
        return 0

    cdef int unmap_all(self) except -1:
        for addr in self.regions.addresses():
            self.unmap(addr)
        return 0

    # ---- queues ------------------------------------------------------------------

    cdef lb.blkioq *get_queue(self, int index, bint poll) noexcept:
        return lb.blkio_get_poll_queue(self.b, index) if poll else lb.blkio_get_queue(self.b, index)

    cdef int add_queue(self, bint poll) except -1:
        self.ctl_acquire()
        cdef int idx = lb.blkio_add_poll_queue(self.b) if poll else lb.blkio_add_queue(self.b)
        self.ctl_release()
        if idx < 0:
            raise libblkio_error(idx, "blkio_add_poll_queue" if poll else "blkio_add_queue")
        return idx

    cdef int remove_queue(self, int index, bint poll) except -1:
        self.ctl_acquire()
        cdef int ret = (lb.blkio_remove_poll_queue(self.b, index) if poll
                        else lb.blkio_remove_queue(self.b, index))
        self.ctl_release()
        if ret < 0:
            raise libblkio_error(ret, "blkio_remove_queue")
        return 0

    # ---- backend liveness (vhost-user) ------------------------------------------

    cdef bint backend_dead(self):
        """Has the peer of a backend socket hung up?  (vhost-user never
        reports a dead daemon: requests just never complete.)"""
        cdef pollfd p
        for fd in self.backend_fds:
            p.fd = fd
            p.events = 0
            p.revents = 0
            if c_poll(&p, 1, 0) > 0 and (p.revents & (POLLHUP | POLLERR)):
                return True
        return False


cdef Py_ssize_t handle_enter_slow(DeviceHandle h) except -1:
    """``handle_enter`` when the fast way is barred: wait while the device
    reconnects (a call of this thread already inside -- a signal handler's
    -- counts as parked meanwhile), then enter, or raise why no call may."""
    while h.reconnecting and not h.closing and not h.forked():
        h.wait_reconnected(guard_own(&h.guard))
    if h.closing or h.b == NULL or h.forked():
        raise h.unusable_error()
    return guard_enter(&h.guard)


cdef int check_io_depth(object depth) except 0:
    """A large-I/O depth: 1..IO_DEPTH_MAX requests in flight."""
    cdef Py_ssize_t n = as_index(depth, "depth")
    if n < 1 or n > IO_DEPTH_MAX:
        raise ValueError(f"depth={n}: must be 1 to {IO_DEPTH_MAX} requests in flight")
    return <int>n
