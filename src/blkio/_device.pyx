"""The device core: one device's parts and the one state machine of its lifetime.

``DeviceCore`` owns the handle (the libblkio instance), the queue engines
(in a ``QueueTable``: by index and kind, and which one each thread's
blocking calls use), the alloc arena, the bounce space and, on a device that
reconnects, its ``Reconnector`` (``_reconnect``).  The facade
(``blkio.open``) drives its lifecycle primitives -- create, properties,
connect, start, configure -- and the public objects of ``_public``
(``Device``'s compiled base, ``Queue``, ``BouncePool``, the asyncio port)
hold it and enter its guard for every call (``core_enter``/``core_leave`` in
the ``.pxd``).

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
hang-up, and runs ``recover`` when one comes: it shuts the guard's gate (new
calls wait there), enters the guard as a call of its own (so that close()
waits for it) and runs the ``Reconnector``'s sequence, which swaps the
instance under the device or breaks it.
"""

cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_ANY_CONTIGUOUS, Py_buffer
from libc.stdint cimport uint64_t, int64_t, uintptr_t
from libc.errno cimport EIO

from ._checks cimport unraisable, CANCELLED, BACKEND_HUNG_UP
from ._engine cimport new_engine
from ._handle cimport GUARD_THREADS, ST_BROKEN, guard_own, guard_enter
from ._libblkio cimport blkioq
from ._memory cimport Buffer, ArenaSlice, owner_of
from ._posix cimport ECANCELED
from ._reconnect cimport new_reconnector

import os
import threading
import time
import warnings
import weakref

from ._engine import kept_for_the_kernel   # what requests that never completed held
from ._handle import State

# close() and remove_queue() wait for calls to leave a little longer than a
# wait slice of the engine (0.1 s), so that a wait in progress can notice.
cdef double LEAVE_SLACK = 0.25

cnp.import_array()     # numpy's C API: _held's inline helpers use it


cdef void _warn_kept(DeviceHandle h, int kept):
    # Said once the queue or device is gone: warnings may be errors, and a
    # close must not stop halfway.
    if kept:
        warnings.warn(f"{h.driver}: {kept} request(s) did not complete before the device "
                      f"(or queue) went away; their memory is kept until the process exits",
                      ResourceWarning, stacklevel=3)


@cython.final
cdef class QueueTable:
    """A device's queue engines (internal): regular and poll queues by
    index (None where removed; trailing holes trimmed), and the engines
    blocking calls use, one per thread while there are enough."""

    def __cinit__(self):
        self.regular = []
        self.poll = []
        self.blocking = []

    cdef QueueEngine for_blocking(self, Py_ssize_t entry, str driver):
        """The queue of a thread's blocking calls: each thread (by its entry
        in the device's guard) gets one of its own while the device has
        enough, and threads beyond that share (``QueueEngine.wait_shared``)."""
        cdef list qs = self.blocking
        cdef Py_ssize_t n = len(qs)
        if n == 1:
            return <QueueEngine>qs[0]
        if n == 0:
            raise ValueError(f"{driver} device has no queue left for blocking I/O "
                             f"(num_queues=0, or its queues were removed)")
        if entry >= GUARD_THREADS:        # a thread the guard does not track
            entry = threading.get_ident() % n
        return <QueueEngine>qs[entry % n]

    cdef QueueEngine at(self, Py_ssize_t index, bint poll):
        lst = self.poll if poll else self.regular
        kind = "poll queue" if poll else "queue"
        if not 0 <= index < len(lst) or lst[index] is None:
            raise IndexError(f"{kind} {index} does not exist or was removed "
                             f"({len(lst)} {kind} slot(s))")
        return lst[index]

    cdef list live(self):
        return [e for e in self.regular + self.poll if e is not None]

    cdef Py_ssize_t first_depth(self):
        """The queue depth of regular queue 0 (what a new queue gets), 0: unknown."""
        if self.regular and self.regular[0] is not None:
            return (<QueueEngine>self.regular[0]).depth
        return 0

    cdef int put(self, QueueEngine e) except -1:
        lst = self.poll if e.is_poll_queue else self.regular
        while len(lst) <= e.index:
            lst.append(None)
        lst[e.index] = e
        if not e.is_poll_queue:
            self.blocking.append(e)
        return 0

    cdef int drop(self, QueueEngine e) except -1:
        lst = self.poll if e.is_poll_queue else self.regular
        lst[e.index] = None
        if e in self.blocking:
            self.blocking.remove(e)
        while lst and lst[len(lst) - 1] is None:
            lst.pop()
        return 0

    cdef list clear(self):
        """Forget every queue (the device is gone); returns the live ones."""
        live = self.live()
        self.regular = []
        self.poll = []
        self.blocking = []
        return live


@cython.final
cdef class DeviceCore:
    """One device's parts and lifetime (internal: ``blkio.open`` makes it)."""

    def __cinit__(self):
        self.handle = DeviceHandle()
        self.queues = QueueTable()
        self.close_timeout = 10.0
        self.monitor_wake = -1

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
        for poll in (False, True):
            i = 0
            while True:
                q = h.get_queue(i, poll)
                if q == NULL:
                    break
                self.queues.put(new_engine(h, self.space, q, i, poll, depth))
                i += 1
        h.engines = self.queues.live()

    def configure_zones(self, int model, uint64_t zone_size, uint64_t nr_zones):
        """Copy the validated zone geometry to C for the request checks."""
        self.handle.configure_zones(model, zone_size, nr_zones)

    def refresh(self, uint64_t capacity):
        self.handle.set_capacity(capacity)

    def set_front(self, front):
        """The blkio.Device of this core, weakly (``Queue.device``)."""
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
            for e in self.queues.live():
                if e.remove_pending and e.guard.users == 0:
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
        engines = self.queues.live()
        deadline = time.monotonic() + self.close_timeout
        if h.state != ST_BROKEN and not h.backend_dead():
            for e in engines:
                try:
                    e.drain(max(0.0, deadline - time.monotonic()))
                except BaseException as err:      # Ctrl-C: stop draining, still close
                    interrupted = err
                    break
        kept = [e.keep_undrained() for e in engines]
        try:
            h.unmap_all()
        finally:
            # Whatever happened above, the instance goes and every waiter is
            # told: a half-closed device would be destroyed by the garbage
            # collector with requests and mappings still in it.
            h.destroy()
            orphans = [self.orphans(e, k) for e, k in zip(engines, kept)]
            for e in self.queues.clear():
                e.q = NULL
                e.removed = True
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
        for e in self.queues.clear():
            e.q = NULL
            e.removed = True
        self.handle.engines = []

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
        h.set_broken(None)
        for e in self.queues.live():
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
        self.reconnector = new_reconnector(h, connector, timeout, self.limits)
        h.reconnect_enabled = True
        wake, self.monitor_wake = os.pipe()
        threading.Thread(target=_watch_backend, args=(weakref.ref(self), wake), daemon=True,
                         name=f"blkio {h.driver} reconnect").start()

    cdef void stop_watching(self) noexcept:
        """End the backend watcher (it wakes when the pipe's write end
        closes) and the reconnect notices (a watcher holds its own copy)."""
        if self.monitor_wake >= 0:
            try:
                os.close(self.monitor_wake)
            except OSError:
                pass
        self.monitor_wake = -1
        if self.reconnector is not None:
            self.reconnector.close()

    @property
    def reconnect_fd(self):
        """The eventfd whose count goes up when a reconnect begins and when
        it ends (-1: the device does not reconnect)."""
        return -1 if self.reconnector is None else self.reconnector.events_fd

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
        cdef Reconnector r = self.reconnector
        cdef Py_ssize_t entry
        if (r is None or h.closing or h.b == NULL or h.forked()
                or h.state == ST_BROKEN or h.n_reconnects != generation):
            return
        if h.reconnecting:
            h.wait_reconnected(0)
            return
        if not h.backend_dead():
            return
        h.reconnecting = True
        r.tell()
        entry = guard_enter(&h.guard)
        try:
            r.run(self.queues.live(), 1)    # its own entry: the only call of this thread
        except BaseException as e:
            # A failure of our own (the backend's are handled inside): the
            # device must not be left half-switched; everything fails.
            if h.state != ST_BROKEN:
                try:
                    r.give_up(self.queues.live(), f"{BACKEND_HUNG_UP} and reconnecting "
                                                  f"failed: {type(e).__name__}: {e}")
                except BaseException:
                    pass
            unraisable(self, e)
        finally:
            h.reconnecting = False
            h.wake_waiters()
            r.tell()
            core_leave(self, entry)

    # ---- queues ----------------------------------------------------------------

    cdef QueueEngine blocking_engine(self, Py_ssize_t entry):
        """The queue of a thread's blocking calls (``QueueTable.for_blocking``)."""
        return self.queues.for_blocking(entry, self.handle.driver)

    cdef QueueEngine engine_at(self, Py_ssize_t index, bint poll):
        cdef DeviceHandle h = self.handle
        if h.closing or h.b == NULL or h.forked():
            raise h.unusable_error()
        if h.state != ST_BROKEN:      # a broken device still shows its queues
            h.ensure_started()
        return self.queues.at(index, poll)

    def live_engines(self):
        return self.queues.live()

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
            e = new_engine(h, self.space, q, idx, poll, self.queues.first_depth())
            self.queues.put(e)
            h.engines.append(e)
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
        kept = e.keep_undrained()
        try:
            self.handle.remove_queue(e.index, e.is_poll_queue)
        finally:
            orphans = self.orphans(e, kept)
            e.removed = True
            e.q = NULL
            self.queues.drop(e)
            if e in self.handle.engines:
                self.handle.engines.remove(e)
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
            if h.regions.covers(addr, length):
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
            region = h.regions.user_region(addr)
            if region is None:
                return False        # not registered, or an arena chunk / the pool
            length = region[1]
            for e in self.queues.live():
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
