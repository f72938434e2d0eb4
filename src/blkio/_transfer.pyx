"""The transfer engine: one caller request, as libblkio requests.

``prepare`` makes one request from the caller's memory where the driver can
use it (``direct_ok``), else from bounce space (acquired here: at once, or
waiting in the space's FIFO while reaping the caller's queue,
``wait_for_space``).  A ``Transfer`` is a request cut into pieces (at
max-transfer, or the bounce chunk for bounced memory) and, for a large read
or write, pipelined: ``depth`` pieces of ``chunk`` bytes in flight, refilled
as the oldest finishes.  Its outcome is the first failed piece in offset
order, raised once every piece in flight has finished (``failure_error``:
discard is advisory, a request cancelled by close is a ValueError saying so).

Blocking calls drive a Transfer synchronously (``blocking_io``, with
``blocking_one`` as the hot path for one buffer that needs no split or
bounce); ``blkio.aio`` drives the same Transfer from the event loop: its
pieces complete through the loop (``route_async``), which refills them and
resolves the transfer's future.  The queue API's per-request path is
``enqueue_request``.  This module calls only downward (queue engine, bounce
space, held buffers, checks) and never parses user options.
"""

cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyBuffer_Release
from cpython.exc cimport PyErr_CheckSignals, PyErr_Clear
from cpython.pythread cimport PyThread_get_thread_ident
from libc.errno cimport EOPNOTSUPP
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport free

from . cimport _libblkio as lb
from ._checks cimport (READ, WRITE, WRITE_ZEROES, DISCARD, FLUSH, REPORT_ZONES,
                       OPEN_ALL_ZONES, NO_PROBLEM, TOO_LONG, HotLimits, check_request,
                       zone_problem, problem_error, range_problem, request_error, CANCELLED)
from ._engine cimport (Route, TO_CALLER, INTERNAL, TO_FUTURE, TO_TRANSFER, new_completion,
                       set_request, queue_use, queue_use_as, queue_unuse)
from ._handle cimport GUARD_THREADS, ST_STARTED
from ._held cimport hold_buffers, array_memory, view_flags, slice_iov, gather
from ._posix cimport ENOTSUP, ECANCELED

import time

from ._checks import OP_NAMES
from ._pool import ThreadWaiter

cdef extern from "Python.h":
    # PyObject_GetBuffer without Cython's exception check: the hot path
    # clears the error and lets the general path raise the clear message,
    # and needs no try/except (whose set-up costs on every call).
    int _get_buffer_or_minus_one "PyObject_GetBuffer" (object obj, Py_buffer *view, int flags)

# Waits for bounce space are cut into slices, as every wait of the core.
cdef double WAIT_SLICE = 0.1
# Once a blocking call is interrupted (Ctrl-C, a closing device), how long it
# waits for its other pieces in flight before leaving them to the queue (their
# Completions hold the caller's buffers, so no memory is freed under them).
cdef double SETTLE_TIMEOUT = 0.25

cnp.import_array()     # numpy's C API: _held's inline helpers use it


# ---- one request ------------------------------------------------------------

cdef bint direct_ok(DeviceHandle h, iovec *iov, int iovcnt) noexcept nogil:
    """Can libblkio use the caller's segments as they are (else: bounce)?"""
    if iovcnt > h.lim.max_segments:
        return False
    cdef int i
    cdef uintptr_t a
    for i in range(iovcnt):
        a = <uintptr_t>iov[i].iov_base
        if (a | iov[i].iov_len) & h.lim.buf_mask:
            return False
        if h.lim.max_segment_len and iov[i].iov_len > h.lim.max_segment_len:
            return False
        if h.lim.needs_mem_regions and not h.regions.covers(a, iov[i].iov_len):
            return False
    return True


cdef Py_ssize_t wait_for_space(BounceSpace space, QueueEngine e, size_t nbytes,
                               double timeout) except -2:
    """Bounce space for ``nbytes`` (a granule index), first come first
    served; ``timeout`` < 0 waits forever, else TimeoutError.  Between turns
    the caller's queue ``e`` (if any) is reaped, so that its own completed
    requests give their space back."""
    cdef size_t size = space.checked_size(nbytes)
    cdef Py_ssize_t start = space.try_acquire(size)
    if start >= 0:
        return start                # the common case: no waiter object at all
    waiter = ThreadWaiter()
    start = space.fifo_enter(size, waiter)
    if start >= 0:
        return start
    deadline = time.monotonic() + timeout if timeout >= 0 else None
    try:
        while True:
            space.check_open(True)
            start = space.fifo_turn(size, waiter)
            if start >= 0:
                return start
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no bounce buffer space for {nbytes} bytes "
                                   f"within {timeout} s")
            if e is not None and e.unreaped > 0:
                # our own completed requests give their space back
                try:
                    e.drive(1, WAIT_SLICE, None)
                except TimeoutError:
                    pass
            else:
                left = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
                waiter.event.wait(max(left, 0))
    except BaseException:
        space.fifo_leave(waiter)
        raise


cdef Completion prepare(QueueEngine e, int op, uint64_t offset, uint64_t length,
                        HeldBuffers views, object array, iovec *iov, int iovcnt,
                        unsigned int flags, int route, object user_data, object bounce,
                        bint nowait):
    """One request: the caller's memory where the driver can use it, else a
    bounce buffer (``bounce``: space the caller already acquired; else
    acquired here, waiting FIFO while reaping ``e``; with ``nowait``, None
    when the space cannot serve it at once).  The caller's memory is held by
    ``views``, or, for one numpy array read without an export
    (``array_memory``), by ``array``: its one segment ``iov[0]`` is copied
    into the Completion, which keeps the array until the request is reaped."""
    cdef Completion c = new_completion(op, offset, length, flags, route, user_data)
    if op != READ and op != WRITE:
        return c
    c.views = views
    if array is not None:
        c.array = array
        c.user1 = iov[0]
        iov = &c.user1
    c.user_iov = iov
    c.user_iovcnt = iovcnt
    cdef Py_ssize_t start
    cdef BounceSpace space
    if direct_ok(e.handle, iov, iovcnt):
        c.iov = iov
        c.iovcnt = iovcnt
        return c
    space = e.space
    if bounce is not None:
        start = space.start_of(bounce, length)      # acquired by the caller (asyncio)
    elif nowait:
        start = space.try_acquire(length)
        if start < 0:
            c.user_iov = NULL       # the caller keeps its segments
            c.views = None
            c.array = None
            return None
    else:
        start = wait_for_space(space, e, length, -1.0)
    c.space = space
    c.bounce_buffer = space.buffer
    c.bounce_start = start
    c.iov1.iov_base = space.buffer.addr + <size_t>start * space.granule
    c.iov1.iov_len = length
    c.iov = &c.iov1
    c.iovcnt = 1
    if op == WRITE:
        gather(iov, iovcnt, <char *>c.iov1.iov_base)
    return c


cdef object failure_error(Completion c, str what, bint read_only):
    """The exception for a failed request: a ValueError for one that close
    (or remove_queue) cancelled, else the OSError of its errno.  None for a
    discard the device cannot do (advisory: that is success)."""
    if c.op == DISCARD and (c.ret == -ENOTSUP or c.ret == -EOPNOTSUPP):
        return None
    if c.ret == -ECANCELED and c._error_msg == CANCELLED:
        return ValueError(f"the device was closed (or its queue removed) before this "
                          f"{OP_NAMES[c.op]} completed")
    return request_error(c.ret, c._error_msg, what, read_only)


cdef str _what(int op, uint64_t length, uint64_t offset):
    return f"{OP_NAMES[op]} of {length} bytes at offset {offset}"


# ---- a transfer: pieces, pipelined ----------------------------------------------

cdef uint64_t split_limit(DeviceHandle h, int op) noexcept:
    """Longest piece of one request of kind ``op`` (0: no limit), aligned."""
    cdef uint64_t limit = 0
    if op == READ or op == WRITE:
        limit = h.lim.max_transfer
    elif op == WRITE_ZEROES:
        limit = h.lim.max_write_zeroes_len
    elif op == DISCARD:
        limit = h.lim.max_discard_len
    if limit:
        limit -= limit % h.lim.request_alignment
    return limit


cdef int pipeline_depth(DeviceHandle h, int op, int depth) noexcept:
    """Pieces of a large ``op`` in flight at once: ``depth``, except for
    writes to a host-managed zoned device, which must reach each zone in
    order (pieces in flight together may be reordered): one at a time."""
    if op == WRITE and h.lim.zoned == 2:
        return 1
    return depth


@cython.final
@cython.freelist(8)
cdef class Transfer:
    """One caller request as pieces (internal)."""

    cdef int fill(self, object bounce=None) except -1:
        """Enqueue pieces while fewer than ``depth`` are in flight.  A
        blocking transfer submits each at once; an asynchronous one leaves
        submitting to the loop's next do_io, and stops when the bounce space
        has no room now (``need``: the bytes its next piece waits for;
        ``bounce``: space the caller acquired for it)."""
        cdef QueueEngine e = self.engine
        cdef DeviceHandle h = e.handle
        cdef uint64_t piece
        cdef iovec *sub
        cdef int subcnt
        cdef Completion c
        cdef bint data = self.op == READ or self.op == WRITE
        cdef int route = TO_TRANSFER if self.is_async else INTERNAL
        self.need = 0
        while (self.failed is None and len(self.inflight) - self.head < self.depth
               and (self.pos < self.length or (self.length == 0 and not self.inflight))):
            piece = self.length - self.pos
            if self.limit and piece > self.limit:
                piece = self.limit
            if data:
                if self.pos == 0 and piece == self.length:
                    sub = self.views.iov
                    subcnt = self.views.n
                else:
                    subcnt = slice_iov(self.views.iov, self.views.n, self.pos, piece, &sub)
                if not direct_ok(h, sub, subcnt) and piece > h.policy.bounce_chunk:
                    # Bounced pieces are cut to the chunk size: re-slice.
                    if sub != self.views.iov:
                        free(sub)
                    piece = h.policy.bounce_chunk - h.policy.bounce_chunk % h.lim.request_alignment
                    subcnt = slice_iov(self.views.iov, self.views.n, self.pos, piece, &sub)
                c = prepare(e, self.op, self.offset + self.pos, piece, self.views, None, sub,
                            subcnt, self.flags, route, self if self.is_async else None,
                            bounce, self.is_async)
                bounce = None
                if c is None:               # asynchronous, and no bounce space now
                    if sub != self.views.iov:
                        free(sub)
                    self.need = piece
                    return 0
            else:
                c = prepare(e, self.op, self.offset + self.pos, piece, None, None, NULL, 0,
                            self.flags, route, self if self.is_async else None, None, False)
            if piece != self.length:
                h.n_split += 1
            self.inflight.append(c)
            self.pos += piece
            e.enqueue_one(c, not self.is_async)
        return 0

    cdef bint settle(self) except -1:
        """Take the finished pieces at the head, in offset order; remember
        the first failure.  True when the transfer is over."""
        cdef Completion c
        while self.head < len(self.inflight) and (<Completion>self.inflight[self.head]).done:
            c = <Completion>self.inflight[self.head]
            self.head += 1
            if c.ret < 0 and self.failed is None:
                self.failed = c
        return self.finished()

    cdef bint finished(self) noexcept:
        return (self.head == len(self.inflight) and self.need == 0
                and (self.failed is not None or self.pos >= self.length))

    cdef object outcome(self):
        """The transfer's result, or raise its first failure."""
        cdef Completion c = self.failed
        if c is not None:
            err = failure_error(c, _what(self.op, c.length, c.offset), self.engine.handle.lim.read_only)
            if err is not None:
                raise err
            return 0
        return self.result_value


cdef Transfer new_transfer(QueueEngine e, int op, uint64_t offset, uint64_t length,
                           HeldBuffers views, unsigned int flags, uint64_t chunk, int depth,
                           bint is_async):
    cdef DeviceHandle h = e.handle
    cdef Transfer t = Transfer.__new__(Transfer)
    t.engine = e
    t.op = op
    t.offset = offset
    t.length = length
    t.views = views
    t.flags = flags
    t.is_async = is_async
    t.inflight = []
    t.result_value = length
    t.limit = split_limit(h, op)
    if (op == READ or op == WRITE) and length > (chunk or h.policy.io_chunk):
        chunk = chunk or h.policy.io_chunk
        if t.limit == 0 or chunk < t.limit:
            t.limit = chunk
        depth = pipeline_depth(h, op, depth or h.policy.io_depth)
        if e.depth and depth > e.depth:
            depth = <int>e.depth
        t.depth = depth
    else:
        t.depth = 1
    return t


# ---- blocking calls -----------------------------------------------------------------

cdef void _settle_interrupted(QueueEngine e, Transfer t):
    """After an interruption: wait (bounded) for the transfer's pieces still
    in flight, so that normally none outlives the call; the rest keep their
    buffers through their Completions until the queue reaps them."""
    cdef Completion c
    cdef double deadline = time.monotonic() + SETTLE_TIMEOUT, left
    if e.handle.reconnecting:
        return      # nothing completes before the reconnect is over
    for i in range(t.head, len(t.inflight)):
        c = <Completion>t.inflight[i]
        left = deadline - time.monotonic()
        if c.done:
            continue
        if left <= 0:
            return
        try:
            e.drive(0, left, c)
        except BaseException:
            return      # a second Ctrl-C, a closing device: leave them held


cdef object _run_blocking(Transfer t):
    """Drive a transfer to its end on this thread (GIL released while
    waiting; Ctrl-C noticed after every wait, completions or not)."""
    cdef QueueEngine e = t.engine
    cdef Completion c
    try:
        while True:
            t.fill()
            if t.head == len(t.inflight):
                break
            c = <Completion>t.inflight[t.head]
            if not c.done:
                e.drive(0, -1.0, c)
            t.settle()
            # Pieces of cached data complete inside their submit, and the
            # waits above may never sleep: Ctrl-C is noticed here.
            PyErr_CheckSignals()
    except BaseException:
        _settle_interrupted(e, t)
        raise
    return t.outcome()


cdef object blocking_io(QueueEngine e, int op, uint64_t offset, uint64_t length,
                        HeldBuffers views, unsigned int flags, uint64_t chunk=0, int depth=0):
    """The blocking path (inside the device's guard): check, cut into
    pieces, bounce where needed, submit on ``e`` and wait.  Returns the byte
    count.  ``chunk``/``depth``: the caller's large-I/O pipeline (0: the
    device's defaults)."""
    cdef DeviceHandle h = e.handle
    check_request(h.driver, &h.lim, op, offset, length)
    cdef Py_ssize_t entry = queue_use(e)
    try:
        if length == 0 and op != FLUSH:
            return 0
        return _run_blocking(new_transfer(e, op, offset, length, views, flags, chunk, depth,
                                          False))
    finally:
        queue_unuse(e, entry)


cdef object blocking_one(QueueEngine e, int op, uint64_t offset, object buf,
                         unsigned int flags, uint64_t chunk, int depth, unsigned long tid):
    """One buffer, blocking (inside the device's guard, entered by thread
    ``tid``): the hot path.  When the request needs no split and no bounce,
    it goes straight from the caller's buffer with a recycled Completion;
    anything else takes the general path."""
    cdef Py_ssize_t entry = queue_use_as(e, tid)
    try:
        return _blocking_one_on(e, op, offset, buf, flags, chunk, depth, tid)
    finally:
        queue_unuse(e, entry)


cdef object _general(QueueEngine e, int op, uint64_t offset, object buf, unsigned int flags,
                     uint64_t chunk, int depth):
    cdef HeldBuffers v = hold_buffers(buf, op == READ, True)     # raises the clear error
    cdef DeviceHandle h = e.handle
    check_request(h.driver, &h.lim, op, offset, v.total)
    if v.total == 0:
        return 0
    return _run_blocking(new_transfer(e, op, offset, v.total, v, flags, chunk, depth, False))


cdef object _blocking_one_on(QueueEngine e, int op, uint64_t offset, object buf,
                             unsigned int flags, uint64_t chunk, int depth, unsigned long tid):
    cdef DeviceHandle h = e.handle
    cdef Py_buffer view
    cdef uint64_t length
    cdef HeldBuffers v
    cdef iovec one
    cdef bint exported = False
    if array_memory(buf, op == READ, &one):
        # No export: the call's reference keeps the array alive, and a
        # request left in flight by an exception keeps one of its own
        # (Completion.array).
        length = <uint64_t>one.iov_len
    else:
        if _get_buffer_or_minus_one(buf, &view, view_flags(op == READ)) < 0:
            PyErr_Clear()
            return _general(e, op, offset, buf, flags, chunk, depth)
        exported = True
        one.iov_base = view.buf
        length = <uint64_t>view.len
    one.iov_len = <size_t>length
    if (h.state != ST_STARTED or length == 0 or range_problem(&h.lim, offset, length)
            or (h.lim.max_transfer and length > h.lim.max_transfer)
            or length > (chunk or h.policy.io_chunk)
            or (op != READ and h.lim.read_only) or not direct_ok(h, &one, 1)
            or (op == WRITE and h.lim.zone_size)):
        if exported:
            PyBuffer_Release(&view)
        return _general(e, op, offset, buf, flags, chunk, depth)
    if tid != h.owner_thread:
        if h.owner_thread == 0:
            h.owner_thread = tid
        else:
            h.threaded = True    # from now on every submission releases the GIL
    cdef Completion c = e.spare
    if c is None:
        c = new_completion(op, offset, length, flags, INTERNAL, None)
    else:
        e.spare = None
        set_request(c, op, offset, length, flags)
    c.iov1 = one
    c.iov = &c.iov1
    c.iovcnt = 1
    try:
        e.enqueue_one(c, True, True, True)
        if not c.done:
            e.drive(0, -1.0, c)
    finally:
        # try/finally, not except: no set-up cost on the hot path.  Raised
        # (Ctrl-C, a closing device) while still in flight: the request
        # keeps the caller's buffer until it is reaped.
        if not exported:
            if not c.done:
                c.array = buf
        elif c.done:
            PyBuffer_Release(&view)
        else:
            v = HeldBuffers.__new__(HeldBuffers)
            v.buf1 = view
            v.bufs = &v.buf1
            v.iov = &v.iov1
            v.iov1 = one
            v.n = 1
            c.views = v
    if c.ret < 0:
        raise request_error(c.ret, c._error_msg, _what(op, length, offset), h.lim.read_only)
    if c._error_msg is not None:
        c._error_msg = None
    e.spare = c
    if length != e.spare_len or e.spare_len_obj is None:
        e.spare_len = length
        e.spare_len_obj = length
    return e.spare_len_obj


# ---- zone requests -------------------------------------------------------------------

cdef Completion zone_completion(QueueEngine e, int op, uint64_t offset, object zones,
                                int route, object user_data, object bounce, bint nowait):
    """Check one zone request and make its Completion.  A report's zone
    array goes where the driver can use it, or through bounce space like a
    read (copied back on completion); with ``nowait``, None when the space
    has no room right now."""
    cdef DeviceHandle h = e.handle
    cdef int problem = zone_problem(&h.lim, op, offset)
    if problem:
        raise problem_error(problem, h.driver, &h.lim, op, offset, 0)
    cdef Completion c
    cdef HeldBuffers views
    cdef uint64_t nbytes, nzones
    if op != REPORT_ZONES:
        return new_completion(op, offset, 0, 0, route, user_data)
    if zones is None:
        raise TypeError("report_zones needs a writable buffer for the zones "
                        "(numpy.empty(n, blkio.ZONE_DTYPE))")
    views = hold_buffers(zones, True, True)
    nbytes = views.total
    nzones = nbytes // sizeof(lb.blkio_zone)
    if nzones == 0 or nbytes % sizeof(lb.blkio_zone):
        raise ValueError(f"report_zones: the zones buffer holds {nbytes} bytes; it must hold "
                         f"whole records of {sizeof(lb.blkio_zone)} bytes "
                         f"(blkio.ZONE_DTYPE), at least one")
    if nzones > 0xFFFFFFFF:
        raise ValueError(f"report_zones: {nzones} zones asked, at most 2**32-1 per request")
    # Memory-wise a report is a read of nbytes into the caller's buffer.
    c = prepare(e, READ, offset, nbytes, views, None, views.iov, views.n, 0, route, user_data,
                bounce, nowait)
    if c is not None:
        c.op = REPORT_ZONES
        if c.bounce_start >= 0:
            # The device fills in only ret records and the whole bounce
            # buffer is copied back: start it as the caller's buffer.
            gather(c.user_iov, c.user_iovcnt, <char *>c.iov1.iov_base)
    return c


cdef object blocking_zone(QueueEngine e, int op, uint64_t offset, object zones):
    """One zone request, blocking (inside the device's guard).  Returns its
    ``ret``: the zones filled in, for a report."""
    cdef DeviceHandle h = e.handle
    cdef Py_ssize_t entry = queue_use(e)
    cdef Completion c
    try:
        c = zone_completion(e, op, offset, zones, INTERNAL, None, None, False)
        e.enqueue_one(c, True, True)
        if not c.done:
            e.drive(0, -1.0, c)
        if c.ret < 0:
            what = OP_NAMES[op] if op >= OPEN_ALL_ZONES else f"{OP_NAMES[op]} at offset {offset}"
            msg = c._error_msg
            if c.ret == -5 and op != REPORT_ZONES:
                # The device says only EIO ("Nvme Error") for every refusal.
                msg = (f"{msg or 'I/O error'}; a zoned device refuses an invalid zone "
                       f"state transition, or opening more zones than it allows open/active")
            raise request_error(c.ret, msg, what, h.lim.read_only)
        return c.ret
    finally:
        queue_unuse(e, entry)


# ---- one request of the queue API or of asyncio ------------------------------------------

cdef Completion single_request(QueueEngine e, int op, uint64_t offset, object buf,
                               bint vectored, unsigned int flags, int route, object user_data,
                               uint64_t length, uint64_t longest, bint nowait,
                               uint64_t *length_out):
    """Check one request and make its Completion: the caller's memory held
    (an exact numpy array without an export), direct or bounced.  None,
    with ``length_out`` set, when a read or write is longer than ``longest``
    (0: no bound) or, with ``nowait``, when bounce space is not free now."""
    cdef DeviceHandle h = e.handle
    cdef HeldBuffers views = None
    cdef object array = None
    cdef iovec one
    cdef iovec *iov = NULL
    cdef int iovcnt = 0
    cdef bint data = op == READ or op == WRITE
    if data:
        if not vectored and array_memory(buf, op == READ, &one):
            array = buf         # no HeldBuffers: the Completion holds the array
            iov = &one
            iovcnt = 1
            length = one.iov_len
        else:
            views = hold_buffers(buf, op == READ, not vectored)
            iov = views.iov
            iovcnt = views.n
            length = views.total
    length_out[0] = length
    check_request(h.driver, &h.lim, op, offset, length)
    if data and longest and length > longest:
        return None
    return prepare(e, op, offset, length, views, array, iov, iovcnt, flags, route, user_data,
                   None, nowait)


cdef object enqueue_request(QueueEngine e, int op, uint64_t offset, object buf, bint vectored,
                            unsigned int flags, object user_data, uint64_t length):
    """Check and enqueue one request for the caller to reap (inside the
    queue's guard); returns its length."""
    cdef DeviceHandle h = e.handle
    cdef Completion c = single_request(e, op, offset, buf, vectored, flags, TO_CALLER,
                                       user_data, length, h.lim.max_transfer, False, &length)
    if c is None:
        raise problem_error(TOO_LONG, h.driver, &h.lim, op, offset, length)
    e.enqueue_one(c, False)
    if length != e.spare_len or e.spare_len_obj is None:
        e.spare_len = length         # an int object less per request
        e.spare_len_obj = length
    return e.spare_len_obj


cdef object start_async(QueueEngine e, int op, uint64_t offset, object buf, bint vectored,
                        unsigned int flags, object future, uint64_t length, uint64_t chunk,
                        int depth):
    """Enqueue (not submit: the loop's next do_io does) what a coroutine
    asked for, resolving ``future`` when it is over.  Returns None when it
    went as one request; else its Transfer, whose ``need`` says the bounce
    bytes its next piece waits for (the caller awaits them, then refills)."""
    cdef DeviceHandle h = e.handle
    cdef bint data = op == READ or op == WRITE
    cdef uint64_t longest = chunk or h.policy.io_chunk
    if h.lim.max_transfer and h.lim.max_transfer < longest:
        longest = h.lim.max_transfer
    cdef Completion c = None
    if data:
        # the hot path: one request, resolved by route_async
        c = single_request(e, op, offset, buf, vectored, flags, TO_FUTURE, future, length,
                           longest, True, &length)
        if c is not None and length:
            e.enqueue_one(c, False)
            return None
    else:
        check_request(h.driver, &h.lim, op, offset, length)
    if length == 0 and op != FLUSH:
        future.set_result(0)
        return None
    # longer than a chunk, waiting for bounce space, or not a read or write
    cdef Transfer t = new_transfer(e, op, offset, length,
                                   hold_buffers(buf, op == READ, not vectored) if data else None,
                                   flags, chunk, depth, True)
    t.future = future
    t.fill()
    return t


cdef int route_async(QueueEngine e, list done) except -1:
    """Resolve what the loop's reap took from ``e.ready``: futures of single
    requests, and pieces of transfers (settled, refilled; the transfer's
    future resolved when it is over).  Transfers that stopped for bounce
    space with nothing in flight are appended to ``done`` (cleared first)
    for the caller to await space for."""
    global _Future, _future_done, _future_set_result
    cdef list ready = e.ready, rest = []
    cdef Completion c
    cdef Transfer t
    cdef Py_ssize_t i = 0, n = len(ready)
    done.clear()
    e.ready = []
    if _Future is None:
        from asyncio import Future as _Future
        _future_done = _Future.done
        _future_set_result = _Future.set_result
    while i < n:
        c = <Completion>ready[i]
        i += 1
        if c.route == TO_FUTURE:
            fut = c.user_data
            if c.ret >= 0 and (c.op == READ or c.op == WRITE) and type(fut) is _Future:
                # asyncio's own future: its methods, looked up once
                if _future_done(fut) is False:
                    _future_set_result(fut, c.length)
            elif not fut.done():
                if c.ret >= 0:
                    fut.set_result(c.ret if c.op == REPORT_ZONES else c.length)
                else:
                    err = failure_error(c, _what(c.op, c.length, c.offset), e.handle.lim.read_only)
                    if err is None:
                        fut.set_result(0)
                    else:
                        fut.set_exception(err)
        elif c.route == TO_TRANSFER:
            t = <Transfer>c.user_data
            c.user_data = None
            if t.future is None:
                continue            # already over
            if not t.settle():
                if t.failed is None and not t.future.done():
                    t.fill()
                    if t.need and t.head == len(t.inflight):
                        done.append(t)
                continue
            fut = t.future
            t.future = None
            if fut.done():
                continue            # cancelled
            try:
                fut.set_result(t.outcome())
            except BaseException as err:
                fut.set_exception(err)
        else:
            rest.append(c)          # the caller's own queue requests: for wait()
    if rest:
        e.ready = rest + e.ready
    return 0


# asyncio.Future and two of its methods, for route_async (set on its first
# call: the core does not import asyncio for those who never use it)
cdef object _Future = None, _future_done = None, _future_set_result = None
