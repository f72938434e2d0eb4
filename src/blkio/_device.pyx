"""The device core: one device's parts and the one state machine of its lifetime.

``DeviceCore`` owns the handle (the libblkio instance), the queue engines,
the alloc arena and the bounce space.  The facade (``blkio.open``) drives its
lifecycle primitives -- create, properties, connect, start, configure -- and
the public objects of ``_public`` (``Device``'s compiled base, ``Queue``,
``BouncePool``, the asyncio port) hold it and enter its guard for every call
(``core_enter``/``core_leave`` in the ``.pxd``).

The state machine, in one place: a call enters (refused once the device is
closing, or in the child of a fork()), and leaves; ``close()`` marks the
device closing, waits for the calls inside, drains, unmaps and destroys --
or, when a call of its own thread is inside (a signal handler closing the
device it interrupted), the last call to leave does (``after_leave``);
``remove_queue()`` does the same for one queue.  A dead backend is a state
of the handle that engines observe (``_engine``); in the child of a fork()
``close()`` releases nothing of the parent's.  Everything here calls
downward: handle, engines, bounce space, arena.

Reconnecting (``open(reconnect=True)``, vhost-user): a thread of the core
sleeps in poll(2) on the backend's sockets, which report nothing but a
hang-up, and runs ``recover`` when one comes: new calls wait at the guard's
gate; the connector -- the one thing from above the core calls, given by
``open()``: it brings up a new instance with the same typed property writes
as the first -- is retried until ``reconnect_timeout``; the new instance
must be the same device (capacity, limits); once every call inside is parked
between its wait slices, the old queues are reaped, every memory region is
mapped into the new instance, the handle and the engines take the new
instance and queues, every request still in flight is resubmitted
(``QueueEngine.resume``) and the old instance is destroyed.  Past the
timeout the device is broken as without reconnecting: everything in flight
fails with EIO, saying why.
"""

cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_ANY_CONTIGUOUS, Py_buffer
from libc.stdint cimport uint64_t, int64_t, uintptr_t
from libc.errno cimport EIO, errno

from ._checks cimport (as_u64, as_index, closed_error, no_device_error, unraisable, CANCELLED,
                       BACKEND_HUNG_UP, reconnect_failed)
from ._engine cimport Completion, new_engine, set_ret
from ._handle cimport GUARD_THREADS, ST_BROKEN, guard_own, guard_enter
from ._libblkio cimport blkioq
from ._memory cimport Buffer, ArenaSlice, owner_of
from ._posix cimport ECANCELED, eventfd, EFD_NONBLOCK, EFD_CLOEXEC
from posix.unistd cimport write as c_write

import os
import threading
import time
import warnings
import weakref

from ._handle import State

#: What requests that never completed were holding (close or remove_queue
#: gave up waiting for them): the device may still write that memory, so it
#: is never given back.
kept_for_the_kernel = []

# close() and remove_queue() wait for calls to leave a little longer than a
# wait slice of the engine (0.1 s), so that a wait in progress can notice.
cdef double LEAVE_SLACK = 0.25
# A reconnect's connect attempts: each is cut after this many seconds (a
# close() meanwhile waits for the attempt in progress); between them a pause
# that starts short (a restarted daemon creates its socket a moment before
# it listens: the first connect may be refused) and doubles up to a bound.
cdef double CONNECT_ATTEMPT = 1.0
cdef double RETRY_FIRST = 0.001
cdef double RETRY_MAX = 0.01

cnp.import_array()     # numpy's C API: _held's inline helpers use it


cdef void _warn_kept(DeviceHandle h, int kept):
    # Said once the queue or device is gone: warnings may be errors, and a
    # close must not stop halfway.
    if kept:
        warnings.warn(f"{h.driver}: {kept} request(s) did not complete before the device "
                      f"(or queue) went away; their memory is kept until the process exits",
                      ResourceWarning, stacklevel=3)


@cython.final
cdef class DeviceCore:
    """One device's parts and lifetime (internal: ``blkio.open`` makes it)."""

    def __cinit__(self):
        self.handle = DeviceHandle()
        self.engines = []
        self.poll_engines = []
        self.blocking = []
        self.close_timeout = 10.0
        self.monitor_wake = -1
        self.reconnect_fd = -1

    def __dealloc__(self):
        self.stop_watching()

    def __reduce__(self):
        raise TypeError("a blkio device core cannot be pickled")

    # ---- lifecycle primitives (the facade drives them) --------------------

    def create(self, str driver):
        self.handle.create(driver)

    def get(self, str name, str kind):
        """Read property ``name`` with the getter for C type ``kind``."""
        cdef Py_ssize_t entry = core_enter(self)
        try:
            return self.handle.get_property(name, kind)
        finally:
            core_leave(self, entry)

    def set(self, str name, str kind, object value):
        """Write property ``name`` with the setter for C type ``kind``."""
        cdef Py_ssize_t entry = core_enter(self)
        try:
            self.handle.set_property(name, kind, value)
        finally:
            core_leave(self, entry)

    def connect(self):
        self.handle.connect()

    def start(self):
        self.handle.start()

    def configure(self, limits, uint64_t capacity, bint read_only, backend_fds=(),
                  int depth=0):
        """Copy the validated limits to C and set up queues and memory."""
        cdef DeviceHandle h = self.handle
        cdef blkioq *q
        cdef int i
        h.configure(limits, capacity, read_only, backend_fds)
        self.limits = limits
        granule = h.granule
        self.arena = Arena(h, granule, 64 << 20)
        self.space = BounceSpace(h, granule, 1 << 20, 256 << 20)
        for poll, lst in ((False, self.engines), (True, self.poll_engines)):
            i = 0
            while True:
                q = h.get_queue(i, poll)
                if q == NULL:
                    break
                lst.append(new_engine(h, self.space, q, i, poll, depth))
                i += 1
        self.blocking = list(self.engines)
        h.engines = self.engines + self.poll_engines

    def configure_zones(self, int model, uint64_t zone_size, uint64_t nr_zones):
        """Copy the validated zone geometry to C for the request checks."""
        self.handle.configure_zones(model, zone_size, nr_zones)

    def refresh(self, uint64_t capacity):
        self.handle.set_capacity(capacity)

    def set_front(self, front):
        """The blkio.Device of this core, weakly (``Queue.device``)."""
        import weakref
        self.front = weakref.ref(front)

    # ---- state ---------------------------------------------------------------

    @property
    def driver(self):
        return self.handle.driver

    @property
    def state(self):
        if self.handle.closing or self.handle.forked():
            return State.CLOSED
        return self.handle.state_name

    @property
    def closed(self):
        return self.handle.closing or self.handle.b == NULL or self.handle.forked()

    @property
    def stats(self):
        cdef DeviceHandle h = self.handle
        return (h.n_requests, h.n_bounced, h.bounced_bytes, h.n_split, h.n_reconnects,
                h.n_resubmitted)

    # ---- the state machine ------------------------------------------------------

    cdef void after_leave(self) noexcept:
        """A call left a closing device, or one with a removal pending:
        finish what was left to the last call (a close or removal made from
        inside a call of the same thread, or one that gave up waiting)."""
        cdef QueueEngine e
        if self.removals_pending:
            for e in list(self.engines) + list(self.poll_engines):
                if e is not None and e.remove_pending and e.guard.users == 0:
                    e.remove_pending = False
                    self.removals_pending -= 1
                    try:
                        self.finish_remove(e)
                    except BaseException:
                        unraisable(self)
        if self.destroy_pending and self.handle.guard.users == 0:
            self.destroy_pending = False
            try:
                self.shutdown()
            except BaseException:
                unraisable(self)

    def close(self, double drain_timeout=10.0):
        """Refuse new calls, wait for the calls in progress to leave, drain
        requests in flight (bounded), unmap memory, destroy."""
        cdef DeviceHandle h = self.handle
        if h.b == NULL:
            return
        if h.forked():
            self.forget()
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
        h.wake_waiters()            # calls parked while the device reconnects
        if self.space is not None:
            self.space.wake_all()
        if not h.wait_guard(&h.guard, own, drain_timeout + LEAVE_SLACK) or own:
            # A call of this thread (a signal handler or destructor closing the
            # device it interrupted), or one stuck inside libblkio: the last
            # call to leave destroys the instance.
            self.destroy_pending = True
            return
        self.shutdown()

    cdef int shutdown(self) except -1:
        """Drain, unmap, destroy; no call is inside the device any more."""
        cdef DeviceHandle h = self.handle
        cdef QueueEngine e
        if h.b == NULL:
            return 0
        self.stop_watching()
        h.draining = True
        interrupted = None
        engines = [e for e in self.engines + self.poll_engines if e is not None]
        deadline = time.monotonic() + self.close_timeout
        if h.state != ST_BROKEN and not h.backend_dead():
            for e in engines:
                try:
                    e.drain(max(0.0, deadline - time.monotonic()))
                except BaseException as err:      # Ctrl-C: stop draining, still close
                    interrupted = err
                    break
        kept = [self.keep_undrained(e) for e in engines]
        try:
            h.unmap_all()
        finally:
            # Whatever happened above, the instance goes and every waiter is
            # told: a half-closed device would be destroyed by the garbage
            # collector with requests and mappings still in it.
            h.destroy()
            orphans = [self.orphans(e, k) for e, k in zip(engines, kept)]
            for e in engines:
                e.q = NULL
                e.removed = True
            self.engines = []
            self.poll_engines = []
            self.blocking = []
            h.engines = []
            # Break the reference cycles through the device so that memory (and
            # its memfd) nobody views is freed now, not by the cyclic collector.
            if self.arena is not None:
                self.arena.handle = None
                self.arena.chunks = []
            if self.space is not None:
                self.space.device_closed()
            for e, o in zip(engines, orphans):
                self.tell_gone(e, o)
            h.wake_waiters()
        if interrupted is not None:
            raise interrupted
        _warn_kept(h, sum(kept))
        return 0

    cdef void forget(self) noexcept:
        """close() in the child of a fork(): release nothing of the parent's
        (no libblkio call, no lock, no unmap), just stop being usable."""
        cdef QueueEngine e
        self.handle.forget()
        self.stop_watching()        # the child's copies of the fds; no thread watches here
        for e in self.engines + self.poll_engines:
            if e is not None:
                e.q = NULL
                e.removed = True
        self.engines = []
        self.poll_engines = []
        self.blocking = []
        self.handle.engines = []

    cdef int keep_undrained(self, QueueEngine e) except -1:
        """Requests still in flight after the drain: unless the backend is
        gone, the device may still write their memory after the instance or
        queue is destroyed, so that memory is never given back."""
        if e.unreaped == 0:
            return 0
        if self.handle.state == ST_BROKEN or self.handle.backend_dead():
            return 0
        kept = []
        cdef Completion c = e.head
        while c is not None:
            kept.append(c)
            c = c.next
        if e.ring.in_flight:
            kept.append(self.handle.region_owners())
        kept_for_the_kernel.append(kept)
        return <int>e.unreaped

    cdef list orphans(self, QueueEngine e, int kept):
        """Completions nobody collected: those reaped and not handed out, and
        those that never completed (cancelled; their memory is released only
        when nothing can touch it any more)."""
        e.abandon(ECANCELED, CANCELLED, not kept)
        out = e.ready
        e.ready = []
        e.ring.out = None
        return out

    cdef void tell_gone(self, QueueEngine e, list orphans) noexcept:
        for listener in list(e.gone_listeners):
            try:
                listener(orphans)
            except BaseException:
                unraisable(listener)
        e.gone_listeners = []

    # ---- the backend hung up ------------------------------------------------------

    def hang_up(self):
        """The backend's socket reported a hang-up (``blkio.aio`` watches it
        on the loop; blocking waits find it between slices themselves):
        without a reconnect, fail everything in flight and break the device.
        Nothing happens unless the backend is really gone."""
        cdef DeviceHandle h = self.handle
        cdef QueueEngine e
        if (h.closing or h.b == NULL or h.forked() or h.state == ST_BROKEN
                or h.reconnect_enabled or not h.backend_dead()):
            return
        h.state = ST_BROKEN
        for e in self.live_engines():
            e.abandon(EIO, BACKEND_HUNG_UP, True)

    def enable_reconnect(self, connector, timeout):
        """Reconnect when the backend hangs up (``open(reconnect=True)``).

        ``connector(seconds)`` brings up a new instance as ``open()`` did
        the first, within ``seconds``, and returns ``(core, backend_fds,
        limits, capacity, read_only)``: a new ``DeviceCore``, created,
        connected and started, not configured.  It raises OSError when the
        backend is not there (yet).  ``timeout``: seconds a reconnect may
        take, or None.  A thread of the device watches the backend's
        sockets from now on and runs ``recover`` on a hang-up."""
        cdef DeviceHandle h = self.handle
        if not h.backend_fds:
            raise ValueError(f"{h.driver} device has no backend socket to watch; "
                             f"only a daemon's device can reconnect")
        self.reconnect_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.reconnect_fd < 0:
            self.reconnect_fd = -1
            raise OSError(errno, f"eventfd for reconnect notices: {os.strerror(errno)}")
        self.connector = connector
        self.reconnect_timeout = timeout
        h.reconnect_enabled = True
        wake, self.monitor_wake = os.pipe()
        threading.Thread(target=_watch_backend, args=(weakref.ref(self), wake), daemon=True,
                         name=f"blkio {h.driver} reconnect").start()

    cdef void stop_watching(self) noexcept:
        """End the backend watcher (it wakes when the pipe's write end
        closes) and the reconnect notices (a watcher holds its own copy)."""
        for fd in (self.monitor_wake, self.reconnect_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.monitor_wake = -1
        self.reconnect_fd = -1

    cdef void tell_reconnect(self) noexcept:
        """A reconnect began or ended: ``reconnect_fd`` becomes readable
        (blkio.aio's loop watches a duplicate; the count never fills)."""
        cdef uint64_t one = 1
        if self.reconnect_fd >= 0:
            c_write(self.reconnect_fd, &one, 8)

    @property
    def reconnect_fd(self):
        """The eventfd whose count goes up when a reconnect begins and when
        it ends (-1: the device does not reconnect)."""
        return self.reconnect_fd

    @property
    def generation(self):
        """Reconnects so far: what ``recover`` is given, to name the hang-up
        it is called for."""
        return self.handle.n_reconnects

    @property
    def reconnecting(self):
        return self.handle.reconnecting

    @property
    def backend_fds(self):
        return self.handle.backend_fds

    def recover(self, uint64_t generation):
        """Reconnect after the backend of ``generation`` (reconnects so far)
        hung up, or wait for the reconnect already in progress.  Runs on the
        backend watcher thread (or blkio.aio's executor, whichever sees the
        hang-up first); returns once the device works again, or is broken,
        or closing.  The reconnect counts as a call inside the device, so
        that close() waits for it (and it gives up when close() begins)."""
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t entry
        if (self.connector is None or h.closing or h.b == NULL or h.forked()
                or h.state == ST_BROKEN or h.n_reconnects != generation):
            return
        if h.reconnecting:
            h.wait_reconnected(0)
            return
        if not h.backend_dead():
            return
        h.reconnecting = True
        self.tell_reconnect()
        entry = guard_enter(&h.guard)
        try:
            self.reconnect(1)       # its own entry: the only call of this thread
        except BaseException as e:
            # A failure of our own (the backend's are handled inside): the
            # device must not be left half-switched; everything fails.
            if h.state != ST_BROKEN:
                try:
                    self.give_up(f"{BACKEND_HUNG_UP} and reconnecting failed: "
                                 f"{type(e).__name__}: {e}")
                except BaseException:
                    pass
            unraisable(self, e)
        finally:
            h.reconnecting = False
            h.wake_waiters()
            self.tell_reconnect()
            core_leave(self, entry)

    cdef int reconnect(self, Py_ssize_t own) except -1:
        """The sequence of ``recover`` (the gate is shut: no new call enters)."""
        cdef DeviceHandle h = self.handle
        cdef DeviceCore fresh
        cdef QueueEngine e
        cdef blkioq *q
        cdef list engines, queues
        cdef bint quiet = False
        cdef Py_ssize_t resubmitted = 0
        timeout = self.reconnect_timeout
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        pause = RETRY_FIRST
        last = None
        while True:
            if h.closing:
                return 0                # close() fails what is in flight
            left = deadline - time.monotonic()
            if left <= 0:
                return self.give_up(reconnect_failed(timeout, last or "none finished in time",
                                                     True))
            try:
                fresh, fds, limits, capacity, read_only = self.connector(min(left, CONNECT_ATTEMPT))
            except OSError as err:
                last = err
                time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                pause = min(2 * pause, RETRY_MAX)
                continue
            try:
                why = self.differs(limits, capacity, read_only)
                if why is not None:
                    return self.give_up(reconnect_failed(timeout, why, False))
                if not quiet:
                    # Every call inside parked between its slices: none holds
                    # a pointer into the old instance any more.
                    quiet = h.wait_quiet(own, deadline)
                    if not quiet:
                        if h.closing:
                            return 0
                        return self.give_up(reconnect_failed(
                            timeout, "calls inside the device did not stop", True))
                    # Completions the daemon posted before it died: successes.
                    for e in self.live_engines():
                        e.drive(0, 0.0, None)
                engines = self.live_engines()
                queues = []
                for e in engines:
                    q = fresh.handle.get_queue(e.index, e.is_poll_queue)
                    if q == NULL:
                        return self.give_up(reconnect_failed(
                            timeout, f"it has no {'poll ' if e.is_poll_queue else ''}queue "
                                     f"{e.index}", False))
                    queues.append(<uintptr_t>q)
                try:
                    h.map_regions_into(fresh.handle)
                except OSError as err:
                    last = err          # it died again: start over
                    continue
                # The switch: from here the old instance is fresh's, to destroy.
                h.take_instance(fresh.handle)
                h.backend_fds = tuple(fds)
                try:
                    for e, qp in zip(engines, queues):
                        resubmitted += e.resume(<blkioq *><uintptr_t>qp)
                except BaseException as err:
                    # The new daemon may hold some of them: their memory stays.
                    for e in engines:
                        self.keep_undrained(e)
                    self.give_up(f"{BACKEND_HUNG_UP}; resubmitting after the reconnect failed: "
                                 f"{err}", False)
                    raise
                h.n_reconnects += 1
                h.n_resubmitted += resubmitted
                return 0
            finally:
                fresh.close(0.0)        # the new instance on failure, the old one after the switch

    cdef str differs(self, object limits, object capacity, object read_only):
        """What makes the instance a reconnect found another device than
        the first (None: the same capacity, read-only flag and limits)."""
        cdef DeviceHandle h = self.handle
        if capacity != h.lim.capacity:
            return f"capacity {capacity} bytes, was {h.lim.capacity}"
        if bool(read_only) != h.lim.read_only:
            return f"read-only is {bool(read_only)}, was {bool(h.lim.read_only)}"
        if limits != self.limits:
            names = getattr(self.limits, "__dataclass_fields__", None) or ()
            changed = [f"{n} {getattr(limits, n, None)} (was {getattr(self.limits, n)})"
                       for n in names if getattr(limits, n, None) != getattr(self.limits, n)]
            return "limits differ: " + (", ".join(changed) or repr(limits))
        return None

    cdef int give_up(self, str why, bint release=True) except -1:
        """The backend will not come back: the device is broken, everything
        in flight fails with ``why``; its memory goes back (``release``)
        when nothing can touch it any more (the daemon that had it is dead)."""
        cdef DeviceHandle h = self.handle
        cdef QueueEngine e
        h.state = ST_BROKEN
        h.broken_why = why
        for e in self.live_engines():
            e.abandon(EIO, why, release)
        return 0

    # ---- queues ----------------------------------------------------------------

    cdef QueueEngine blocking_engine(self, Py_ssize_t entry):
        """The queue of a thread's blocking calls: each thread (by its entry
        in the device's guard) gets one of its own while the device has
        enough, and threads beyond that share (``QueueEngine.wait_shared``)."""
        cdef list qs = self.blocking
        cdef Py_ssize_t n = len(qs)
        if n == 1:
            return <QueueEngine>qs[0]
        if n == 0:
            raise ValueError(f"{self.handle.driver} device has no queue left for blocking I/O "
                             f"(num_queues=0, or its queues were removed)")
        if entry >= GUARD_THREADS:        # a thread the guard does not track
            import threading
            entry = threading.get_ident() % n
        return <QueueEngine>qs[entry % n]

    cdef QueueEngine engine_at(self, Py_ssize_t index, bint poll):
        cdef DeviceHandle h = self.handle
        if h.closing or h.b == NULL or h.forked():
            raise h.unusable_error()
        if h.state != ST_BROKEN:      # a broken device still shows its queues
            h.ensure_started()
        lst = self.poll_engines if poll else self.engines
        kind = "poll queue" if poll else "queue"
        if not 0 <= index < len(lst) or lst[index] is None:
            raise IndexError(f"{kind} {index} does not exist or was removed "
                             f"({len(lst)} {kind} slot(s))")
        return lst[index]

    def live_engines(self):
        return [e for e in self.engines + self.poll_engines if e is not None]

    def add_queue(self, bint poll):
        cdef DeviceHandle h = self.handle
        cdef blkioq *q
        cdef int idx
        cdef QueueEngine e
        cdef Py_ssize_t entry = core_enter(self)
        try:
            h.ensure_started()
            idx = h.add_queue(poll)
            q = h.get_queue(idx, poll)
            if q == NULL:
                raise OSError(EIO, f"libblkio added queue {idx} but does not return it")
            e = new_engine(h, self.space, q, idx, poll,
                           (<QueueEngine>self.engines[0]).depth if self.engines and self.engines[0] is not None else 0)
            lst = self.poll_engines if poll else self.engines
            while len(lst) <= idx:
                lst.append(None)
            lst[idx] = e
            h.engines.append(e)
            if not poll:
                self.blocking.append(e)
            return e
        finally:
            core_leave(self, entry)

    def remove_queue(self, QueueEngine e, double timeout):
        """Remove a queue: refuse new calls on it, wait for the calls in
        progress to leave (their waits give up within a slice), drain its
        requests (``timeout`` seconds), then remove it from libblkio."""
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t entry = core_enter(self)
        try:
            h.ensure_started()
            if e.handle is not h or e.removing:
                raise ValueError("queue is not a live queue of this device")
            e.removing = True
            e.remove_timeout = timeout
            own = guard_own(&e.guard)
            if not h.wait_guard(&e.guard, own, timeout + LEAVE_SLACK) or own:
                # A call of this thread (or one stuck inside libblkio) is still
                # in the queue: the last one to leave removes it.
                e.remove_pending = True
                self.removals_pending += 1
                return
            self.finish_remove(e)
        finally:
            core_leave(self, entry)

    cdef int finish_remove(self, QueueEngine e) except -1:
        """Drain and remove a queue nobody is inside any more."""
        e.draining = True
        interrupted = None
        try:
            e.drain(e.remove_timeout)
        except BaseException as err:      # Ctrl-C: stop draining, still remove
            interrupted = err
        kept = self.keep_undrained(e)
        try:
            self.handle.remove_queue(e.index, e.is_poll_queue)
        finally:
            orphans = self.orphans(e, kept)
            e.removed = True
            e.q = NULL
            lst = self.poll_engines if e.is_poll_queue else self.engines
            lst[e.index] = None
            if e in self.blocking:
                self.blocking.remove(e)
            if e in self.handle.engines:
                self.handle.engines.remove(e)
            while lst and lst[len(lst) - 1] is None:
                lst.pop()
            self.tell_gone(e, orphans)
        if interrupted is not None:
            raise interrupted
        _warn_kept(self.handle, kept)
        return 0

    # ---- memory ------------------------------------------------------------------

    def alloc(self, uint64_t n):
        """A numpy uint8 array of ``n`` bytes of the arena (n > 0)."""
        cdef Py_ssize_t entry = core_enter(self)
        try:
            self.handle.ensure_started()
            return self.arena.alloc(n)
        finally:
            core_leave(self, entry)

    def register(self, array):
        """Map caller memory (see ``Device.register``)."""
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t entry = core_enter(self)
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
            core_leave(self, entry)

    def unregister(self, array):
        """Unmap memory ``register`` mapped (see ``Device.unregister``)."""
        cdef Py_buffer view
        PyObject_GetBuffer(array, &view, PyBUF_ANY_CONTIGUOUS)
        cdef uintptr_t addr = <uintptr_t>view.buf
        PyBuffer_Release(&view)
        cdef DeviceHandle h = self.handle
        cdef Py_ssize_t entry = core_enter(self)
        cdef Py_ssize_t users = 0
        cdef uintptr_t length
        cdef QueueEngine e
        try:
            region = h.user_region(addr)
            if region is None:
                return False        # not registered, or an arena chunk / the pool
            length = region[1]
            for e in self.live_engines():
                users += e.using(addr, addr + length)
            if users:
                raise ValueError(f"cannot unregister {length} bytes at {addr:#x}: {users} "
                                 f"request(s) in flight still use it; wait for them first")
            # Nothing in flight uses it, and nothing new can: the check and the
            # removal from the table below happen with the GIL held.
            h.unmap(addr)
            return True
        finally:
            core_leave(self, entry)


def _watch_backend(core_ref, int wake):
    """The backend watcher of a device that reconnects (its own thread):
    sleeps in poll(2) on the backend's sockets, which report nothing but a
    hang-up, and on the wake pipe, which ``shutdown`` closes; runs the
    reconnect on a hang-up.  Holds the device only weakly."""
    import select
    cdef DeviceCore core
    cdef DeviceHandle h
    try:
        while True:
            core = core_ref()
            if core is None:
                return
            h = core.handle
            if h.closing or h.b == NULL or h.forked() or h.state == ST_BROKEN:
                return
            fds = h.backend_fds
            generation = h.n_reconnects
            core = None
            h = None
            p = select.poll()
            p.register(wake, select.POLLIN)
            for fd in fds:
                p.register(fd, 0)
            events = p.poll()
            if any(fd == wake or ev & select.POLLNVAL for fd, ev in events):
                return
            core = core_ref()
            if core is None:
                return
            core.recover(generation)
            core = None
    finally:
        os.close(wake)
