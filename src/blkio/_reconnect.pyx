"""The reconnect of a device after its vhost-user backend hung up.

``Reconnector`` owns what a device opened with ``reconnect=True`` needs
beyond any other: the connector ``open()`` gave (the one call that goes up:
it brings up a new instance with the same typed property writes as the
first), the limits every new instance must match, the timeout, the eventfd
that tells blkio.aio's loop a reconnect began or ended, and the sequence
(``run``): retry the connector until the timeout; check the new instance is
the same device (capacity, read-only, limits); wait until every call inside
is parked between its wait slices; reap the old queues; map every memory
region into the new instance; swap the handle's instance and the engines'
queues; resubmit what was in flight (``QueueEngine.resume``); destroy the
old instance.  Past the timeout the device is broken as without
reconnecting (``give_up``): everything in flight fails with EIO, saying why.

The device core (``_device``) owns it: its watcher thread notices the
hang-up, shuts the guard's gate and runs the sequence inside the guard,
handing it the live engines.  It calls only downward -- the handle, the
engines -- and never touches another class's private fields.
"""

cimport cython
cimport numpy as cnp
from libc.errno cimport EIO, errno
from libc.stdint cimport uint64_t, uintptr_t
from posix.unistd cimport write as c_write

from ._checks cimport BACKEND_HUNG_UP, reconnect_failed
from ._engine cimport QueueEngine
from ._libblkio cimport blkioq
from ._posix cimport eventfd, EFD_NONBLOCK, EFD_CLOEXEC

import os
import time

# Each connect attempt is cut after this many seconds (a close() meanwhile
# waits for the attempt in progress); between them a pause that starts short
# (a restarted daemon creates its socket a moment before it listens: the
# first connect may be refused) and doubles up to a bound.
cdef double CONNECT_ATTEMPT = 1.0
cdef double RETRY_FIRST = 0.001
cdef double RETRY_MAX = 0.01

cnp.import_array()     # numpy's C API: _held's inline helpers (through _engine) use it


cdef Reconnector new_reconnector(DeviceHandle handle, object connector, object timeout,
                                 object limits):
    """The reconnect of ``handle``'s device (its eventfd made here)."""
    cdef Reconnector r = Reconnector.__new__(Reconnector)
    r.handle = handle
    r.connector = connector
    r.timeout = timeout
    r.limits = limits
    r.events_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if r.events_fd < 0:
        r.events_fd = -1
        raise OSError(errno, f"eventfd for reconnect notices: {os.strerror(errno)}")
    return r


@cython.final
cdef class Reconnector:
    """How a device reconnects after its backend hung up (internal: the
    device core makes it)."""

    def __cinit__(self):
        self.events_fd = -1

    def __dealloc__(self):
        self.close()

    cdef void tell(self) noexcept:
        """A reconnect began or ended: ``events_fd`` becomes readable
        (blkio.aio's loop watches a duplicate; the count never fills)."""
        cdef uint64_t one = 1
        if self.events_fd >= 0:
            c_write(self.events_fd, &one, 8)

    cdef void close(self) noexcept:
        if self.events_fd >= 0:
            try:
                os.close(self.events_fd)
            except OSError:
                pass
        self.events_fd = -1

    cdef int run(self, list engines, Py_ssize_t own) except -1:
        """The sequence (the gate is shut: no new call enters; ``own``: the
        calls of this thread inside the device, the reconnect's own)."""
        cdef DeviceHandle h = self.handle
        cdef QueueEngine e
        cdef blkioq *q
        cdef list queues
        cdef bint quiet = False
        cdef Py_ssize_t resubmitted = 0
        timeout = self.timeout
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        pause = RETRY_FIRST
        last = None
        while True:
            if h.closing:
                return 0                # close() fails what is in flight
            left = deadline - time.monotonic()
            if left <= 0:
                return self.give_up(engines, reconnect_failed(
                    timeout, last or "none finished in time", True))
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
                    return self.give_up(engines, reconnect_failed(timeout, why, False))
                if not quiet:
                    # Every call inside parked between its slices: none holds
                    # a pointer into the old instance any more.
                    quiet = h.wait_quiet(own, deadline)
                    if not quiet:
                        if h.closing:
                            return 0
                        return self.give_up(engines, reconnect_failed(
                            timeout, "calls inside the device did not stop", True))
                    # Completions the daemon posted before it died: successes.
                    for e in engines:
                        e.drive(0, 0.0, None)
                queues = []
                for e in engines:
                    q = (<DeviceHandle>fresh.handle).get_queue(e.index, e.is_poll_queue)
                    if q == NULL:
                        return self.give_up(engines, reconnect_failed(
                            timeout, f"it has no {'poll ' if e.is_poll_queue else ''}queue "
                                     f"{e.index}", False))
                    queues.append(<uintptr_t>q)
                try:
                    h.map_regions_into(fresh.handle)
                except OSError as err:
                    last = err          # it died again: start over
                    continue
                # The switch: from here the old instance is fresh's, to destroy.
                h.take_instance(fresh.handle, tuple(fds))
                try:
                    for e, qp in zip(engines, queues):
                        resubmitted += e.resume(<blkioq *><uintptr_t>qp)
                except BaseException as err:
                    # The new daemon may hold some of them: their memory stays.
                    for e in engines:
                        e.keep_undrained()
                    self.give_up(engines, f"{BACKEND_HUNG_UP}; resubmitting after the reconnect "
                                          f"failed: {err}", False)
                    raise
                h.n_reconnects += 1         # the device's counters (Device.stats)
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

    cdef int give_up(self, list engines, str why, bint release=True) except -1:
        """The backend will not come back: the device is broken, everything
        in flight fails with ``why``; its memory goes back (``release``)
        when nothing can touch it any more (the daemon that had it is dead)."""
        cdef DeviceHandle h = self.handle
        cdef QueueEngine e
        h.set_broken(why)
        for e in engines:
            e.abandon(EIO, why, release)
        return 0
