"""The queue engine: one libblkio queue and what is in flight on it.

``Completion`` is one request: what libblkio is given (segments, flags, and
the one ``blkioq_*`` call that hands it over: ``hand_to``), the memory it
holds until it is reaped, and, once finished, what its caller sees
(``user_data``, ``ret``, ``error_msg``, ``check()``: ``finish``).
``InFlight`` is the list of requests handed to libblkio and not yet reaped
(it holds the references libblkio's user_data borrows).  ``QueueEngine``
hands requests to libblkio (every ``blkioq_*`` call of the package is in
this module), dispatches completions (to their caller, to the batch ring, or
to whoever routes them: ``Route``), drives the queue -- submit, reap, waits
cut into slices that notice Ctrl-C, a closing device, a removed queue and a
dead backend (and park while the device reconnects) -- and lets several
threads wait on one queue without holding its lock (``wait_shared``, over
``_sharedwait``).  When the backend or the queue is gone, ``abandon``
completes everything in flight with an error (one routine for both), and
``keep_undrained`` keeps the memory of requests that never completed; after
a reconnect, ``resume`` hands everything in flight to the new instance's
queue.

It calls only downward: the handle (whose state it observes), the bounce
space (to give space back), the batch ring, held buffers and the shared
wait.  The device core (``_device``) creates engines and drives their
removal, the reconnect (``_reconnect``) their resumption; the transfer
engine (``_transfer``) and the public ``Queue`` (``_public``) call into
them.
"""

cimport cython
cimport numpy as cnp
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.ref cimport PyObject
from libc.errno cimport EINTR, EIO, ETIME
from libc.stdint cimport uint32_t, uint64_t, int64_t, uintptr_t
from libc.stdlib cimport free
from posix.time cimport timespec
from posix.unistd cimport read

from . cimport _libblkio as lb
from ._checks cimport (READ, WRITE, WRITE_ZEROES, DISCARD, FLUSH, REPORT_ZONES, OPEN_ZONE,
                       CLOSE_ZONE, FINISH_ZONE, RESET_ZONE, OPEN_ALL_ZONES, CLOSE_ALL_ZONES,
                       FINISH_ALL_ZONES, libblkio_error, request_error, broken_error,
                       removed_error, unraisable, BACKEND_HUNG_UP)
from ._handle cimport ST_BROKEN
from ._held cimport scatter
from ._sharedwait cimport SharedWait
from ._posix cimport (pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
                      pthread_mutex_unlock, clock_gettime, CLOCK_MONOTONIC)

import os
import time

from ._checks import OP_NAMES

#: What requests that never completed were holding (close, remove_queue or a
#: failed reconnect gave up waiting for them): the device may still write
#: that memory, so it is never given back.
kept_for_the_kernel = []

# Waits are cut into slices so that Python signal handlers run, timeouts are
# honoured, a closing device and a dead backend are noticed, whatever the
# driver does with signals.
cdef double WAIT_SLICE = 0.1
# How often a blocking wait that holds its queue's lock looks whether another
# thread came to the queue (only once the device has seen a second thread).
cdef double SHARE_CHECK = 0.01
# Completions fetched per blkioq_do_io call (into an array on the caller's stack).
cdef enum:
    NCOMPS = 64
# Batch requests travel in user_data as their slot index with the low bit
# set; Completion pointers have it clear.
cdef uintptr_t TAG_BIT = 1

cnp.import_array()     # numpy's C API: _held's inline helpers use it


# --------------------------------------------------------------------------
# Requests and completions

cdef inline bint _release_hot(Completion c) noexcept:
    """``release_memory`` for the hot paths' requests, which hold nothing
    allocated (at most an array): True when that was all.  Inlined into
    dispatch, which every request passes."""
    if (c.views is None and c.space is None
            and (c.user_iov == NULL or c.user_iov == &c.user1)
            and (c.iov == NULL or c.iov == &c.iov1 or c.iov == &c.user1)):
        c.iov = NULL
        c.user_iov = NULL
        if c.array is not None:
            c.array = None
        return True
    return False


@cython.final
@cython.freelist(256)      # one per request in flight: recycle, don't malloc
cdef class Completion:
    """A finished request: ``user_data``, ``ret`` (0 or a negative errno),
    ``error_msg`` and ``check()``, which raises the matching ``OSError``."""

    def __cinit__(self):
        self.user_iov = NULL
        self.iov = NULL
        self.bounce_start = -1
        self.ret_obj = 0

    def __init__(self, *args, **kwargs):
        raise TypeError("blkio.Completion cannot be built directly; Queue.wait() and "
                        "Queue.completions() return them")

    def __reduce__(self):
        raise TypeError("a blkio.Completion cannot be pickled: it may hold the memory of a "
                        "request of this process; send its user_data and ret instead")

    def __dealloc__(self):
        if _release_hot(self):
            return
        released = self.release_memory()
        if released is not None:
            unraisable(self, released)

    cdef object release_memory(self):
        """Let go of the request's memory: called once it is reaped (or its
        device destroyed), only then may its caller memory and bounce space
        be reused.  Never raises: returns the exception that giving back the
        bounce space raised (a waiter's wake-up runs Python, and Ctrl-C may
        land there), or None, so that a caller finishes its loop over
        completions first and raises it after."""
        if _release_hot(self):
            return None
        err = None
        if self.iov != NULL and self.iov != &self.iov1:
            if self.iov != self.user_iov:
                free(self.iov)
        if self.user_iov != NULL and (self.views is None or self.user_iov != self.views.iov):
            if self.user_iov != &self.iov1 and self.user_iov != &self.user1:
                free(self.user_iov)
        self.iov = NULL
        self.user_iov = NULL
        self.array = None
        if self.bounce_start >= 0 and self.space is not None:
            try:
                self.space.release_range(self.bounce_start, self.bounce_buffer)
            except BaseException as e:
                err = e
        self.bounce_start = -1
        self.bounce_buffer = None
        self.space = None
        self.views = None
        return err

    cdef void hand_to(self, lb.blkioq *q, void *ud) noexcept nogil:
        """Enqueue this request on ``q`` with ``ud`` as libblkio's user_data
        (the queue is the caller's: its lock held, or no other thread)."""
        cdef int op = self.op
        if op == READ:
            if self.iovcnt == 1:
                lb.blkioq_read(q, self.offset, self.iov[0].iov_base, self.iov[0].iov_len, ud,
                               self.flags)
            else:
                lb.blkioq_readv(q, self.offset, self.iov, self.iovcnt, ud, self.flags)
        elif op == WRITE:
            if self.iovcnt == 1:
                lb.blkioq_write(q, self.offset, self.iov[0].iov_base, self.iov[0].iov_len, ud,
                                self.flags)
            else:
                lb.blkioq_writev(q, self.offset, self.iov, self.iovcnt, ud, self.flags)
        elif op == WRITE_ZEROES:
            lb.blkioq_write_zeroes(q, self.offset, self.length, ud, self.flags)
        elif op == DISCARD:
            lb.blkioq_discard(q, self.offset, self.length, ud, self.flags)
        elif op == FLUSH:
            lb.blkioq_flush(q, ud, self.flags)
        elif op == REPORT_ZONES:
            lb.blkioq_report_zones(q, self.offset, <lb.blkio_zone *>self.iov[0].iov_base,
                                   <uint32_t>(self.length // sizeof(lb.blkio_zone)), ud, 0)
        elif op == OPEN_ZONE:
            lb.blkioq_open_zone(q, self.offset, ud, 0)
        elif op == CLOSE_ZONE:
            lb.blkioq_close_zone(q, self.offset, ud, 0)
        elif op == FINISH_ZONE:
            lb.blkioq_finish_zone(q, self.offset, ud, 0)
        elif op == RESET_ZONE:
            lb.blkioq_reset_zone(q, self.offset, ud, 0)
        elif op == OPEN_ALL_ZONES:
            lb.blkioq_open_all_zones(q, ud, 0)
        elif op == CLOSE_ALL_ZONES:
            lb.blkioq_close_all_zones(q, ud, 0)
        elif op == FINISH_ALL_ZONES:
            lb.blkioq_finish_all_zones(q, ud, 0)
        else:
            lb.blkioq_reset_all_zones(q, ud, 0)

    cdef int finish(self, int ret, const char *error_msg) except -1:
        """libblkio completed the request with ``ret``: what its caller sees,
        and a bounced read's data copied to the caller's memory (which the
        dispatcher lets go of next)."""
        self.ret = ret
        if self.route != INTERNAL:      # a blocking call's own: Python never sees it
            self.ret_obj = ret
        if ret < 0 and error_msg != NULL:
            self._error_msg = error_msg.decode("utf-8", "replace")
        if self.bounce_start >= 0 and (ret == 0 and self.op == READ
                                       or ret > 0 and self.op == REPORT_ZONES):
            scatter(<char *>self.iov[0].iov_base, self.user_iov, self.user_iovcnt)
        self.done = True
        return 0

    @property
    def error_msg(self):
        """libblkio's message for a failed request, or None."""
        return self._error_msg

    @property
    def op(self) -> str:
        """The request kind: read, write, write_zeroes, discard, flush or a zone request."""
        return OP_NAMES[self.op]

    @property
    def offset(self) -> int:
        """Device offset of the request (bytes)."""
        return self.offset

    @property
    def length(self) -> int:
        """Bytes the request covers (0 for flush)."""
        return self.length

    def check(self):
        """Raise the ``OSError`` for a failed request; return ``ret`` otherwise."""
        if self.ret < 0:
            raise request_error(self.ret, self._error_msg, OP_NAMES[self.op], False)
        return self.ret

    def __repr__(self):
        state = "done" if self.done else "in flight"
        return (f"<blkio.Completion {OP_NAMES[self.op]} offset={self.offset} "
                f"length={self.length} ret={self.ret} user_data={self.user_data!r} {state}>")


cdef Completion new_completion(int op, uint64_t offset, uint64_t length, unsigned int flags,
                               int route, object user_data):
    cdef Completion c = Completion.__new__(Completion)
    set_request(c, op, offset, length, flags)
    c.route = route
    c.user_data = user_data
    return c

# ``Completion.user_data`` and ``ret`` are object members (structmember's
# T_OBJECT_EX), added to the type here, rather than Cython's properties:
# CPython specializes reading an object member (a load and an incref) but not
# a property, which takes the generic lookup every time, and a queue loop
# reads both for every request.
cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        const char *name
        int type
        Py_ssize_t offset
        int flags
        const char *doc
    enum:
        T_OBJECT_EX
        READONLY

cdef extern from "Python.h":
    object PyDescr_NewMember(PyTypeObject *type, PyMemberDef *member)
    void PyType_Modified(PyTypeObject *type)
    ctypedef struct PyTypeObject:
        PyObject *tp_dict

cdef PyMemberDef _completion_members[2]   # the descriptors point here: static


cdef int _expose_members() except -1:
    cdef Completion probe = Completion.__new__(Completion)
    cdef char *base = <char *><PyObject *>probe
    cdef PyTypeObject *tp = <PyTypeObject *>Completion
    _completion_members[0] = PyMemberDef(
        name=b"user_data", type=T_OBJECT_EX, flags=READONLY,
        doc=b"the object given with the request (any object)",
        offset=<char *>&probe.user_data - base)
    _completion_members[1] = PyMemberDef(
        name=b"ret", type=T_OBJECT_EX, flags=READONLY,
        doc=b"0, or a negative errno if the request failed",
        offset=<char *>&probe.ret_obj - base)
    cdef dict attrs = <dict>tp.tp_dict
    for i in range(2):
        attrs[_completion_members[i].name.decode()] = PyDescr_NewMember(tp, &_completion_members[i])
    PyType_Modified(tp)
    return 0


_expose_members()

# --------------------------------------------------------------------------
# Batch requests, handed to libblkio (the queue is the caller's)

cdef inline void _hand_slot(lb.blkioq *q, int op, uint64_t offset, char *addr, uint64_t length,
                            Py_ssize_t slot, unsigned int flags) noexcept nogil:
    """One batch request: its libblkio user_data is its slot with TAG_BIT."""
    cdef void *ud = <void *>((<uintptr_t>slot << 1) | TAG_BIT)
    if op == READ:
        lb.blkioq_read(q, offset, <void *>addr, length, ud, flags)
    else:
        lb.blkioq_write(q, offset, <void *>addr, length, ud, flags)


cdef inline void _hand_batch(lb.blkioq *q, int op, BatchArrays a, Py_ssize_t *idx,
                             unsigned int flags) noexcept nogil:
    """A checked batch, its requests in the slots ``idx``."""
    # the arrays in locals: libblkio's calls could change any field
    cdef Py_ssize_t i, n = a.n
    cdef uint64_t bs = a.blocksize
    cdef uint64_t *offs = a.offs
    cdef uint64_t *boffs = a.boffs
    cdef char *base = a.base
    for i in range(n):
        _hand_slot(q, op, offs[i], base + (boffs[i] if boffs != NULL else <uint64_t>i * bs), bs,
                   idx[i], flags)


cdef Py_ssize_t _hand_ring(lb.blkioq *q, BatchRing ring) noexcept:
    """Every batch request in flight, to ``q`` again (a reconnect; they are
    all in flight at once: no order among them).  Returns how many."""
    cdef BatchSlot *slot
    cdef Py_ssize_t i, n = 0
    for i in range(ring.slots_cap):
        slot = &ring.slots[i]
        if slot.length != 0:
            _hand_slot(q, slot.op, slot.offset, <char *>slot.addr, slot.length, i, slot.flags)
            n += 1
    return n


# --------------------------------------------------------------------------
# What is in flight

@cython.final
cdef class InFlight:
    """The requests of one queue handed to libblkio and not yet reaped
    (internal).  The list holds the reference each request's libblkio
    user_data borrows; close, unregister and abandon look at it."""

    cdef void link(self, Completion c) noexcept:
        c.next = self.head
        if self.head is not None:
            self.head.prev = c
        self.head = c
        c.linked = True

    cdef void unlink(self, Completion c) noexcept:
        c.linked = False
        if c.prev is not None:
            c.prev.next = c.next
        else:
            self.head = c.next
        if c.next is not None:
            c.next.prev = c.prev
        c.prev = None
        c.next = None

    cdef Py_ssize_t hand_to(self, lb.blkioq *q) noexcept:
        """Hand every request to ``q`` again (a reconnect), in the order they
        were submitted -- a flush after every write submitted before it.
        Returns how many."""
        cdef Completion c = self.head
        cdef Py_ssize_t n = 0
        while c is not None and c.next is not None:     # the oldest is last
            c = c.next
        while c is not None:
            c.hand_to(q, <void *>c)
            n += 1
            c = c.prev
        return n

    cdef Py_ssize_t using(self, uintptr_t start, uintptr_t end):
        """Requests whose device-visible memory overlaps [start, end)."""
        cdef Py_ssize_t n = 0
        cdef Completion c = self.head
        cdef int k
        cdef uintptr_t a
        while c is not None:
            for k in range(c.iovcnt if c.iov != NULL else 0):
                a = <uintptr_t>c.iov[k].iov_base
                if a < end and a + c.iov[k].iov_len > start:
                    n += 1
                    break
            c = c.next
        return n

    cdef list requests(self):
        """Every request in flight, newest first."""
        out = []
        cdef Completion c = self.head
        while c is not None:
            out.append(c)
            c = c.next
        return out

    cdef object fail_all(self, int err, str msg, bint release, list ready):
        """Complete every request with -err and ``msg``, without libblkio,
        emptying the list; those of callers go to ``ready``.  ``release``:
        their memory goes back now.  Returns the first exception giving
        memory back raised (after finishing the loop), or None."""
        cdef Completion c
        raised = None
        while self.head is not None:
            c = self.head
            self.unlink(c)
            set_ret(c, -err)
            c._error_msg = msg
            c.done = True
            if release:
                released = c.release_memory()
                if released is not None and raised is None:
                    raised = released
            if c.route != INTERNAL:
                ready.append(c)
        return raised


# --------------------------------------------------------------------------
# The engine

cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return <int64_t>t.tv_sec * 1000000000 + t.tv_nsec


cdef inline void _set_timeout(timespec *ts, double seconds) noexcept nogil:
    if seconds < 0:
        seconds = 0
    ts.tv_sec = <long>seconds
    ts.tv_nsec = <long>((seconds - <double>ts.tv_sec) * 1e9)


cdef QueueEngine new_engine(DeviceHandle handle, BounceSpace space, lb.blkioq *q, int index,
                            bint poll, Py_ssize_t depth):
    cdef QueueEngine e = QueueEngine.__new__(QueueEngine)
    e.q = q
    e.handle = handle
    e.space = space
    e.index = index
    e.is_poll_queue = poll
    e.depth = depth
    e.ring = BatchRing.__new__(BatchRing)
    e.in_flight = InFlight.__new__(InFlight)
    e.shared = SharedWait.__new__(SharedWait)
    pthread_mutex_init(&e.lock, NULL)
    e.lock_ready = True
    e.ready = []
    e.gone_listeners = []
    return e


@cython.final
cdef class QueueEngine:
    """One libblkio queue and what is in flight on it (internal)."""

    def __dealloc__(self):
        if self.lock_ready:
            pthread_mutex_destroy(&self.lock)

    cdef int check_usable(self) except -1:
        """Between wait slices: give up when the device or queue is going
        away (close/remove_queue itself drains, so it passes), or when the
        backend hung up (another queue noticed; this one's requests fail)."""
        cdef DeviceHandle h = self.handle
        if h.draining or self.draining:
            return 0
        if h.reconnecting:
            h.park()            # until the instance and this queue are replaced
        if h.closing or h.forked():
            raise h.unusable_error()
        if self.removing:
            raise removed_error(self.index)
        if h.state == ST_BROKEN:
            inflight = self.unreaped
            self.abandon(EIO, BACKEND_HUNG_UP, True)
            raise h.broken(inflight)
        return 0

    cdef int hung_up(self) except -1:
        """The backend is gone: every queue of the device fails what it has
        in flight (nothing can touch that memory any more) and the device
        refuses further I/O -- unless the device reconnects: then the wait
        goes on, and parks once the device core's reconnect has begun."""
        cdef DeviceHandle h = self.handle
        if h.reconnect_enabled and h.state != ST_BROKEN:
            return 0
        inflight = self.unreaped
        h.set_broken(None)
        for e in h.engines:
            (<QueueEngine>e).abandon(EIO, BACKEND_HUNG_UP, True)
        raise broken_error(h.driver, inflight)

    cdef Py_ssize_t using(self, uintptr_t start, uintptr_t end):
        """Requests in flight whose device-visible memory overlaps [start, end)."""
        return self.in_flight.using(start, end) + self.ring.using(start, end)

    # ---- enqueue: the one place that hands requests to libblkio ----------

    cdef int enqueue_one(self, Completion c, bint reap, bint wait_first=False,
                         bint lazy_link=False) except -1:
        """Hand ``c`` to libblkio and submit it; with ``reap``, take what is
        already complete.  ``wait_first``: the caller waits for ``c`` next
        (``drive``), so a call alone on its queue while other threads run
        also sleeps a first short slice in the same GIL-free section as the
        submit: with threads every GIL release hands the GIL over, and
        taking it back is a wait of its own (one a request instead of two).
        ``lazy_link`` (with ``reap``): a caller that holds ``c`` itself lets
        it into the in-flight list only if it is still in flight after the
        submit (nothing else can look at the list while the GIL is held)."""
        self.unreaped += 1
        self.handle.n_requests += 1
        self.n_requests += 1
        cdef void *ud = <void *>c
        cdef int n = 0
        cdef bint waited = False
        cdef timespec ts
        cdef lb.blkio_completion comps[NCOMPS]
        cdef int held = -1
        # With several threads, the submit releases the GIL even when the
        # queue is free: io_uring_enter may sleep on an O_DIRECT file.
        if not self.handle.threaded:
            held = take_queue(self)
        if held < 0 or not (lazy_link and reap):
            # the list holds the reference libblkio's user_data borrows
            self.in_flight.link(c)
        if held < 0:
            if wait_first:
                wait_first = (self.handle.threaded and self.guard.users == 1
                              and self.handle.spin_ns == 0 and not self.is_poll_queue)
                if wait_first:
                    _set_timeout(&ts, SHARE_CHECK)
            self.nogil_users += 1
            with nogil:
                pthread_mutex_lock(&self.lock)
                if wait_first:
                    n = self._enqueue_wait_locked(c, ud, comps, &ts)
                    waited = True
                else:
                    n = self._enqueue_locked(c, ud, reap, comps)
                pthread_mutex_unlock(&self.lock)
            self.nogil_users -= 1
        else:
            # One thread only, the queue ours: this call never sleeps
            # (min_completions is 0), and releasing the GIL would cost more
            # than the call itself.
            n = self._enqueue_locked(c, ud, reap, comps)
            give_queue(self, held)
        if reap:
            if waited and (n == -EINTR or n == -ETIME):
                # the caller's drive() goes on waiting (and raises for Ctrl-C)
                if n == -EINTR:
                    PyErr_CheckSignals()
                return 0
            try:
                if n < 0:
                    raise libblkio_error(n, "blkioq_do_io")
                self.dispatch(comps, n)
            finally:
                if not c.done and not c.linked:
                    self.in_flight.link(c)        # still in flight: the list holds it now
        return 0

    cdef int _enqueue_wait_locked(self, Completion c, void *ud, lb.blkio_completion *comps,
                                  timespec *ts) noexcept nogil:
        """``_enqueue_locked`` with reap, then, if nothing is complete yet,
        one wait of ``ts`` for a completion (queue lock held)."""
        cdef int n = self._enqueue_locked(c, ud, True, comps)
        if n == 0:      # in_libblkio >= 1: ours was just submitted
            n = lb.blkioq_do_io_interruptible(self.q, comps, 1, NCOMPS, ts, NULL)
            if n > 0:
                self.in_libblkio -= n
        return n

    cdef int _enqueue_locked(self, Completion c, void *ud, bint reap,
                             lb.blkio_completion *comps) noexcept nogil:
        """Hand one request to libblkio (queue lock held); with ``reap``,
        submit and collect completions that are already there."""
        cdef lb.blkioq *q = self.q
        cdef int n = 0
        c.hand_to(q, ud)
        self.in_libblkio += 1
        if reap:
            n = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
            if n > 0:
                self.in_libblkio -= n
        return n

    cdef int enqueue_batch(self, int op, BatchArrays a, unsigned int flags) except -1:
        """Enqueue a checked batch and submit it (one do_io).  Each request
        takes a batch slot (its tag and memory, for reap and unregister);
        libblkio's user_data is the slot index with TAG_BIT."""
        cdef Py_ssize_t n = a.n
        cdef int got
        cdef Py_ssize_t stack_idx[64]
        cdef Py_ssize_t *idx = &stack_idx[0]
        cdef lb.blkio_completion comps[NCOMPS]
        cdef BatchRing ring = self.ring
        if n == 0:
            return 0
        ring.reserve(n)
        if n > 64:
            idx = <Py_ssize_t *>PyMem_Malloc(n * sizeof(Py_ssize_t))
            if idx == NULL:
                raise MemoryError()
        # Slots are taken with the GIL held (dispatch frees them with it
        # held); a GIL-free section only reads this call's index list.
        take_slots(ring, op, a, flags, idx)
        cdef int held = -1
        if not self.handle.threaded:
            held = take_queue(self)
        if held >= 0:
            # One thread, the queue ours with the GIL: submitting never sleeps
            # long enough to be worth a GIL release (with threads,
            # io_uring_enter may: the path below releases it).
            got = self._enqueue_slots(op, a, idx, flags, comps)
            give_queue(self, held)
        else:
            self.nogil_users += 1
            with nogil:
                pthread_mutex_lock(&self.lock)
                got = self._enqueue_slots(op, a, idx, flags, comps)
                pthread_mutex_unlock(&self.lock)
            self.nogil_users -= 1
        if idx != &stack_idx[0]:
            PyMem_Free(idx)
        self.unreaped += n
        self.handle.n_requests += n
        self.n_requests += n
        if got < 0:
            raise libblkio_error(got, "blkioq_do_io")
        self.dispatch(comps, got)
        return 0

    cdef int _enqueue_slots(self, int op, BatchArrays a, Py_ssize_t *idx, unsigned int flags,
                            lb.blkio_completion *comps) noexcept nogil:
        """Hand a batch's requests to libblkio and submit them (the queue
        ours); returns what do_io returned."""
        cdef lb.blkioq *q = self.q
        cdef int got
        _hand_batch(q, op, a, idx, flags)
        self.in_libblkio += a.n
        got = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
        if got > 0:
            self.in_libblkio -= got
        return got

    cdef object abandon(self, int err, str msg, bint release):
        """Complete every request in flight with -err, without libblkio: its
        backend or queue is gone.  ``release``: nothing can touch the
        requests' memory any more, so it goes back now (else the caller keeps
        it).  The caller's completions are left in ``ready``."""
        raised = self.in_flight.fail_all(err, msg, release, self.ready)
        self.ring.fail_all(err)
        self.unreaped = 0
        self.in_libblkio = 0
        self.spare = None
        if raised is not None:
            unraisable(self, raised)

    # ---- reaping -------------------------------------------------------

    cdef int dispatch(self, lb.blkio_completion *comps, int n) except -1:
        """Hand out n completions (GIL held).  Each caller reaps into its own
        array: a shared one would be overwritten by another thread's do_io
        between the unlock and this dispatch."""
        cdef int i
        cdef uintptr_t ud
        cdef Completion c
        cdef BatchRing ring = self.ring
        err = None
        self.unreaped -= n
        for i in range(n):
            ud = <uintptr_t>comps[i].user_data
            if ud & TAG_BIT:
                complete(ring, <Py_ssize_t>(ud >> 1), comps[i].ret)
                continue
            c = <Completion><PyObject *>comps[i].user_data
            if c.linked:
                self.in_flight.unlink(c)
            if c.bounce_start >= 0:
                self.handle.bounced_bytes += c.length
                self.handle.n_bounced += 1
            c.finish(comps[i].ret, comps[i].error_msg)
            if not _release_hot(c):
                released = c.release_memory()
                if released is not None and err is None:
                    err = released   # raised once every completion is handed out
            if c.route != INTERNAL:
                self.ready.append(c)
        if err is not None:
            raise err
        return 0

    cdef int collect(self, lb.blkio_completion *comps, int held) except -1:
        """With the queue ours (``held`` from take_queue, 1 for a lock
        taken): submit what is queued and take what is done without waiting;
        gives the queue back, dispatches, returns the count."""
        cdef int n = lb.blkioq_do_io(self.q, comps, 0, NCOMPS, NULL)
        if n > 0:
            self.in_libblkio -= n
        give_queue(self, held)
        if n < 0:
            raise libblkio_error(n, "blkioq_do_io")
        self.dispatch(comps, n)
        return n

    cdef int drive(self, int min_completions, double timeout, Completion until) except -1:
        """Submit what is queued and reap.  Returns when ``until`` is done (if
        given), else once ``min_completions`` were reaped; ``timeout`` seconds
        (< 0: none) bound the wait, then TimeoutError."""
        cdef int n, want, got = 0
        cdef timespec ts
        cdef lb.blkio_completion comps[NCOMPS]
        cdef double slice_
        cdef lb.blkioq *q = self.q
        cdef bint interruptible = not self.is_poll_queue
        cdef int64_t spin_ns = self.handle.spin_ns, spin_end
        cdef int held
        if until is None and min_completions <= 0:
            # Non-blocking: submit, and reap what is already there.
            while True:
                held = hold_queue(self)
                n = self.collect(comps, held)
                got += n
                if n < NCOMPS:
                    return got
        if until is None and self.in_libblkio > 0:
            held = take_queue(self)
            if held >= 0:
                # What is done already, keeping the GIL: when that is enough
                # (a page-cached batch completes inside its submit), no
                # GIL-free section -- with threads, each one is a GIL hand-off.
                got = self.collect(comps, held)
                if got >= min_completions:
                    return got
        deadline = time.monotonic() + timeout if timeout >= 0 else None
        cdef double max_slice = WAIT_SLICE
        if self.handle.threaded or self.handle.reconnect_enabled:
            # Another thread may come to this queue while we sleep holding its
            # lock: look again soon (wait_shared then takes over).  A reconnect
            # waits for the waits in progress to park: soon, too.
            max_slice = SHARE_CHECK
        while True:
            if until is not None:
                if until.done:
                    return 0
                if self.guard.users > 1 and not self.is_poll_queue:
                    # Other calls use this queue too: wait without holding it.
                    return self.wait_shared(until)
                self.check_usable()
                want = 1 if self.unreaped > 0 else 0
            else:
                self.check_usable()
                want = min_completions - got
                if want <= 0:
                    want = 0
                if want > self.unreaped:
                    want = <int>self.unreaped
                if want > NCOMPS:
                    want = NCOMPS       # one call fills at most the array; loop for the rest
            if deadline is None:
                slice_ = max_slice
            else:
                slice_ = min(max_slice, deadline - time.monotonic())
            _set_timeout(&ts, slice_)
            self.nogil_users += 1
            with nogil:
                pthread_mutex_lock(&self.lock)
                q = self.q          # a reconnect replaces it (while this call is parked)
                # Other threads may have reaped meanwhile: never ask libblkio
                # for more than is outstanding (it answers EINVAL).
                if want > self.in_libblkio:
                    want = <int>self.in_libblkio
                if want > 0:
                    # Collect what is done without sleeping first (cheap), then
                    # busy-poll up to spin_ns (like QEMU's poll handler: a
                    # sleeping backend wake-up costs tens of µs), then wait.
                    n = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
                    if n == 0 and spin_ns > 0:
                        spin_end = _now_ns() + spin_ns
                        while n == 0 and _now_ns() < spin_end:
                            n = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
                    if n == 0:
                        if interruptible:
                            n = lb.blkioq_do_io_interruptible(q, comps, want, NCOMPS, &ts, NULL)
                        else:
                            n = lb.blkioq_do_io(q, comps, want, NCOMPS, &ts)
                else:
                    n = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
                if n > 0:
                    self.in_libblkio -= n
                pthread_mutex_unlock(&self.lock)
            self.nogil_users -= 1
            if n >= 0:
                got += n
                self.dispatch(comps, n)
                if until is None and (got >= min_completions or want == 0):
                    return got
                if until is not None and want == 0 and not until.done:
                    # Another thread holds our completion's turn; let it run.
                    time.sleep(0)
                # Completions that keep coming never make libblkio wait, so
                # it never returns EINTR: look for Ctrl-C here too.
                PyErr_CheckSignals()
                continue
            if n == -EINTR:
                PyErr_CheckSignals()
            elif n == -ETIME:
                if self.handle.backend_dead():
                    self.hung_up()
                PyErr_CheckSignals()
            else:
                raise libblkio_error(n, "blkioq_do_io")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no completion within {timeout} s "
                                   f"({self.unreaped} request(s) still in flight)")

    cdef int wait_shared(self, Completion until) except -1:
        """Wait for ``until`` while other calls use this queue too, without
        holding its lock (``SharedWait``): waiting inside blkioq_do_io would
        stop every other thread's submits until this request completed."""
        cdef int fd, r
        cdef SharedWait sw = self.shared
        cdef int slice_ms = <int>((SHARE_CHECK if self.handle.reconnect_enabled else WAIT_SLICE)
                                  * 1000)
        if not self.fd_enabled:
            self.set_fd_enabled(True)
        while True:
            self.drive(0, 0.0, None)            # submit, reap what is there
            if until.done:
                return 0
            self.check_usable()
            fd = lb.blkioq_get_completion_fd(self.q)    # a new one after a reconnect
            if not sw.leader:
                r = sw.lead(fd, slice_ms)
                if r > 0:
                    self.reset_fd(fd)           # under the queue lock, then reap
                sw.end_lead()
                self.drive(0, 0.0, None)
                sw.wake()
                if r < 0 and r != -EINTR:
                    raise OSError(-r, f"poll on the completion fd: {os.strerror(-r)}")
                if r == 0 and self.handle.backend_dead():
                    self.hung_up()
            else:
                sw.follow(&until.done)      # the leader reaps for us
            PyErr_CheckSignals()

    # ---- the completion fd ------------------------------------------------

    cdef int set_fd_enabled(self, bint value) except -1:
        cdef int held = hold_queue(self)
        lb.blkioq_set_completion_fd_enabled(self.q, value)
        give_queue(self, held)
        self.fd_enabled = value
        return 0

    cdef int completion_fd(self) noexcept:
        return -1 if self.is_poll_queue else lb.blkioq_get_completion_fd(self.q)

    cdef bint reset_fd(self, int fd) noexcept:
        """Read the completion fd's 8-byte count under the queue's lock:
        libblkio's virtio drivers read the same eventfd inside blkioq_do_io
        and fail with EAGAIN when another thread drained it first."""
        cdef uint64_t counter
        cdef ssize_t r
        self.nogil_users += 1
        with nogil:
            pthread_mutex_lock(&self.lock)
            r = read(fd, &counter, 8)       # non-blocking: libblkio made it so
            pthread_mutex_unlock(&self.lock)
        self.nogil_users -= 1
        return r == 8

    cdef list take(self, object max):
        if max is None or max >= len(self.ready):
            out = self.ready
            self.ready = []
        else:
            out = self.ready[:max]
            del self.ready[:max]
        return out

    # ---- close and removal (the device core drives them) -------------------

    cdef bint drain(self, double timeout):
        """Wait (bounded) for the requests in flight; False when some are
        left.  Only close() and remove_queue() call it, once no other call
        is inside."""
        deadline = time.monotonic() + timeout
        while self.unreaped > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self.drive(<int>self.unreaped, left, None)
            except (TimeoutError, OSError):
                return False
        return True

    cdef int keep_undrained(self) except -1:
        """Requests still in flight after a drain: unless the backend is
        gone, the device may still write their memory after the instance or
        queue is destroyed, so that memory is never given back.  Returns how
        many."""
        if self.unreaped == 0:
            return 0
        if self.handle.state == ST_BROKEN or self.handle.backend_dead():
            return 0
        kept = self.in_flight.requests()
        if self.ring.in_flight:
            kept.append(self.handle.regions.owners())
        kept_for_the_kernel.append(kept)
        return <int>self.unreaped

    # ---- a reconnect (the device core drives it) ------------------------------

    cdef Py_ssize_t resume(self, lb.blkioq *q) except -1:
        """Go on with queue ``q`` of a new instance (the old one died with its
        backend, and every call inside is parked): hand it every request
        still in flight (batch requests first, then the others in the order
        they were submitted), and submit them.  Their memory is where it
        was, mapped into the new instance.  Returns how many."""
        cdef lb.blkio_completion comps[NCOMPS]
        cdef Py_ssize_t n
        cdef int got
        cdef int held = hold_queue(self)
        self.q = q
        if self.fd_enabled:
            lb.blkioq_set_completion_fd_enabled(q, True)
        n = _hand_ring(q, self.ring) + self.in_flight.hand_to(q)
        self.in_libblkio = n
        got = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
        if got > 0:
            self.in_libblkio -= got
        give_queue(self, held)
        if got < 0:
            raise libblkio_error(got, "blkioq_do_io")
        self.dispatch(comps, got)
        return n
