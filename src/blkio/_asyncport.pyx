"""blkio.aio's one way into the core (package-private): ``AsyncPort``.

It owns the part of driving one queue from an event loop that is not the
loop's own wiring: a request's hot path in one call (its future made on the
loop the port is bound to, the request enqueued, the loop's flush
scheduled), longer transfers and those waiting for bounce space, reaping and
routing completions with the completion fd kept quiet meanwhile, batches
(submitted whole or in waves; the ones in flight, their tags, accounting
and first failure in a ``BatchBook``), what a closed device or a removed
queue leaves unresolved, and whether a reconnect ended since the loop last
looked.  Every call enters the queue's guard (``_public``) and calls down:
transfer engine, queue engine, batch ring, device core.  It never waits:
while the device reconnects its calls raise ``Reconnecting``.  Readers,
tasks, events and awaits are blkio.aio's (``_aioloop``); the port reaches
the loop only through what ``bind`` handed it (the loop, the flush to run
once per iteration, the coroutine that feeds a transfer bounce space),
never through the AsyncDevice's attributes.
"""

cimport cython
cimport numpy as cnp
from libc.stdint cimport uint64_t, int64_t

from ._checks cimport READ, WRITE, FLUSH, op_in, as_u64, as_index
from ._device cimport DeviceCore, core_enter, core_leave
from ._engine cimport QueueEngine, TO_FUTURE
from ._handle cimport ST_BROKEN
from ._batch cimport BatchArrays, BatchRing, batch_arrays, check_batch
from ._transfer cimport Transfer, zone_completion, start_async, route_async
from ._public cimport (DeviceFront, Queue, _queue_of, _enter, _leave, _enter_even_broken,
                       _chunk, _depth)

import asyncio

import numpy as np

from ._checks import int_array
from .errors import error_for

cnp.import_array()     # numpy's C API: _held's inline helpers use it


cdef object _running_loop = asyncio.get_running_loop

# A batch request's user_data: its batch's number << 32 | its index in the batch.
cdef enum:
    TAG_SHIFT = 32
cdef int64_t INDEX_MASK = (<int64_t>1 << TAG_SHIFT) - 1
cdef int64_t BATCH_IDS = <int64_t>1 << 31    # numbers wrap (tags stay positive int64)

# The rows batch completions are taken into: an aligned copy of the reap
# dtype, so that the port reads them as C structs.
cdef struct ReapRow:
    int64_t user_data
    int ret

REAP_ROWS = 256
REAP_DTYPE = np.dtype([("user_data", np.int64), ("ret", np.int32)], align=True)
assert REAP_DTYPE.itemsize == sizeof(ReapRow)


class Reconnecting(Exception):
    """What the asyncio port's calls raise while the device reconnects,
    instead of waiting for it at the guard's gate as other calls do: the
    loop must keep running (blkio.aio waits on the reconnect eventfd)."""


cdef inline int _not_reconnecting(AsyncPort port) except -1:
    # With the GIL held from here into the guard, no reconnect can begin
    # in between: a call that passes enters without waiting.
    if port.engine.handle.reconnecting:
        raise Reconnecting(port.core.driver)
    return 0


def async_port(DeviceFront front not None, index):
    """The port through which blkio.aio drives queue ``index`` (package-private)."""
    cdef DeviceCore core = front._live()
    cdef QueueEngine e = core.engine_at(as_index(index, "queue"), False)
    cdef AsyncPort port = AsyncPort.__new__(AsyncPort)
    port.core = core
    port.engine = e
    port.queue = _queue_of(core, e)
    port.stuck = []
    port.book = BatchBook.__new__(BatchBook)
    return port


@cython.final
cdef class AsyncBatch:
    """One awaited batch (blkio.aio's handle on it): its requests in flight,
    its first failure, and the memory they use (held until the last of them
    is reaped, even when the awaiting task was cancelled: the device may
    still write it)."""

    cdef readonly Py_ssize_t n          # requests
    cdef readonly Py_ssize_t pos        # requests submitted so far
    cdef readonly Py_ssize_t left       # submitted and not yet completed
    cdef readonly object nbytes         # n * blocksize: what the await returns
    cdef int op
    cdef unsigned int flags
    cdef int64_t bid                    # the batch's number (the high half of its tags)
    cdef object offsets, buffers, region, blocksize, bs
    cdef object fut                     # resolved when the last request is in
    cdef bint abandoned                 # its await ended before its requests did
    cdef Py_ssize_t nfail, fail_index
    cdef int fail_ret

    def __init__(self, *args, **kwargs):
        raise TypeError("AsyncBatch is blkio.aio's")

    @property
    def submitted(self):
        """Every request of the batch has been submitted."""
        return self.pos == self.n

    cdef object error(self, str why):
        """The OSError of the failed request with the lowest index."""
        cdef Py_ssize_t i = self.fail_index
        offset = int(self.offsets[i])
        others = f"; {self.nfail} of {self.n} requests failed" if self.nfail > 1 else ""
        e = error_for(-self.fail_ret, f"{'read' if self.op == READ else 'write'} of {self.bs} "
                                      f"bytes at offset {offset} (request {i} of a batch of "
                                      f"{self.n}) failed{others}{': ' + why if why else ''}")
        e.index = i
        e.offset = offset
        e.failed = self.nfail
        return e


@cython.final
cdef class BatchBook:
    """The batches one port has in flight, by number, and their accounting
    as their completions come in: each batch's count, its lowest failed
    index, its future resolved with the last (package-private)."""

    cdef dict batches
    cdef int64_t next_id
    cdef object reap_out             # REAP_DTYPE rows the ring's completions are taken into
    cdef ReapRow *rows

    def __cinit__(self):
        self.batches = {}
        self.next_id = 1                # batch 0: the solo batch (see AsyncPort.start_batch)
        self.reap_out = np.zeros(REAP_ROWS, REAP_DTYPE)
        self.rows = <ReapRow *>cnp.PyArray_DATA(self.reap_out)

    def __init__(self, *args, **kwargs):
        raise TypeError("BatchBook is blkio.aio's")

    cdef int64_t new_id(self) except -1:
        cdef int64_t bid = self.next_id
        while bid in self.batches or bid == 0:     # 0: the solo batch's
            bid = bid % (BATCH_IDS - 1) + 1
        self.next_id = bid % (BATCH_IDS - 1) + 1
        return bid

    cdef int take(self, BatchRing ring) except -1:
        """Credit the batch completions waiting in ``ring`` to their batches:
        with one batch in flight and no failure, in one step."""
        cdef Py_ssize_t k, failed_before
        if self.reap_out is not ring.out:
            ring.set_out(self.reap_out)
        while ring.ready:
            failed_before = ring.failed
            k = ring.copy_out()
            if len(self.batches) == 1 and ring.failed == failed_before:
                for only in self.batches.values():
                    break
                self.credit(<AsyncBatch>only, k)
            else:
                self.credit_rows(k, ring.failed != failed_before)
            if k < REAP_ROWS:
                break
        return 0

    cdef int credit_rows(self, Py_ssize_t k, bint failed) except -1:
        """Credit rows[:k] to their batches, each run of one batch's tags
        at once; with ``failed``, the lowest failed index of each is kept."""
        cdef ReapRow *rows = self.rows
        cdef Py_ssize_t i = 0, j, r
        cdef int64_t bid, idx
        cdef AsyncBatch b
        while i < k:
            bid = rows[i].user_data >> TAG_SHIFT
            j = i + 1
            while j < k and rows[j].user_data >> TAG_SHIFT == bid:
                j += 1
            found = self.batches.get(bid)
            if found is not None:        # else not submitted through this port
                b = <AsyncBatch>found
                if failed:
                    for r in range(i, j):
                        if rows[r].ret != 0:
                            idx = rows[r].user_data & INDEX_MASK
                            if b.nfail == 0 or idx < b.fail_index:
                                b.fail_index = idx
                                b.fail_ret = rows[r].ret
                            b.nfail += 1
                self.credit(b, j - i)
            i = j
        return 0

    cdef int credit(self, AsyncBatch b, Py_ssize_t count) except -1:
        b.left -= count
        if b.left == 0:
            if b.fut is not None and not b.fut.done():
                b.fut.set_result(None)
            if b.abandoned:
                del self.batches[b.bid]
        return 0


@cython.final
cdef class AsyncPort:
    """blkio.aio's one way into the core (package-private): submit requests
    and transfers with futures, reap and route their completions, batches,
    the completion fd, and the notice that the queue is gone."""

    cdef DeviceCore core
    cdef QueueEngine engine
    cdef readonly object queue       # the public Queue of the engine
    cdef list stuck                  # transfers waiting for bounce space, from the last reap
    cdef object listener             # this port's gone_listeners entry
    # the loop it is bound to (None: none; the hot path then declines)
    cdef object loop, create_future, call_soon, create_task
    cdef object flush                # blkio.aio's, run once per iteration with requests
    cdef object feed                 # blkio.aio's coroutine feeding a transfer bounce space
    cdef bint paused                 # a reconnect in progress: the hot path declines
    cdef bint flush_scheduled
    cdef object seen_generation      # the device's reconnects when the loop last looked
    cdef BatchBook book              # the batches in flight
    cdef Py_ssize_t solo_taken       # completions of the solo batch taken at its submission

    def __init__(self, *args, **kwargs):
        raise TypeError("AsyncPort is blkio.aio's; use blkio.aio.open()")

    def __reduce__(self):
        raise TypeError("an asyncio port cannot be pickled")

    # ---- the loop --------------------------------------------------------------------

    def bind(self, loop, flush, feed):
        """Drive the queue from ``loop`` (None: from no loop): ``flush()``
        runs once per iteration in which requests were enqueued, and
        ``feed(t)`` is a coroutine waiting bounce space for transfer ``t``."""
        self.loop = loop
        self.create_future = None if loop is None else loop.create_future
        self.call_soon = None if loop is None else loop.call_soon
        self.create_task = None if loop is None else loop.create_task
        self.flush = flush
        self.feed = feed
        self.flush_scheduled = False
        self.paused = False
        self.seen_generation = self.core.generation

    def pause(self, bint paused):
        """While a reconnect is in progress the hot path declines every request."""
        self.paused = paused

    def schedule_flush(self):
        """Run the loop's flush in this iteration (once, however often asked)."""
        if not self.flush_scheduled and self.loop is not None:
            self.flush_scheduled = True
            self.call_soon(self.run_flush)

    def run_flush(self):
        self.flush_scheduled = False
        if self.flush is not None:
            self.flush()

    cdef int _after_submit(self, object t, object fut) except -1:
        if t is not None and (<Transfer>t).need and not fut.done():
            self.create_task(self.feed(t))      # a piece waits for bounce space
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.call_soon(self.run_flush)
        return 0

    # ---- requests ----------------------------------------------------------------------

    def io(self, int op, offset, buf, unsigned int flags):
        """The hot path: a read or write of one buffer with the default
        chunk and depth, on the running loop the port is bound to.  Returns
        its future (the flush scheduled, bounce space awaited if a piece
        waits for it), or None when the general path (``submit``) must take
        it: another loop, none bound, or a reconnect in progress."""
        if self.loop is None or self.paused or _running_loop() is not self.loop:
            return None
        if op != READ and op != WRITE:
            raise ValueError(f"io takes a read or a write, not op {op!r}")
        cdef uint64_t off = as_u64(offset, "offset")
        if self.engine.handle.reconnecting:
            return None
        fut = self.create_future()
        cdef Py_ssize_t entries = _enter(<Queue>self.queue)
        try:
            t = start_async(self.engine, op, off, buf, False, flags, fut, 0, 0, 0)
        finally:
            _leave(<Queue>self.queue, entries)
        self._after_submit(t, fut)
        return fut

    def submit(self, int op, offset, buf, flags, length=0, chunk=None, depth=None,
               bint vectored=False):
        """Enqueue a read, write, write-zeroes, discard or flush on the bound
        loop; returns its future (the flush scheduled, bounce space awaited
        if a piece waits for it)."""
        if not op_in(op, READ, FLUSH):
            raise ValueError(f"unknown op {op!r}")
        cdef uint64_t off = as_u64(offset, "offset"), n = as_u64(length, "length")
        cdef uint64_t ck = _chunk(self.core, chunk)
        cdef int dp = _depth(depth)
        _not_reconnecting(self)
        fut = self.create_future()
        cdef Py_ssize_t entries = _enter(<Queue>self.queue)
        try:
            t = start_async(self.engine, op, off, buf, vectored, flags, fut, n, ck, dp)
        finally:
            _leave(<Queue>self.queue, entries)
        self._after_submit(t, fut)
        return fut

    def need(self, Transfer t not None):
        """Bounce bytes ``t`` waits for before its next piece (0: none)."""
        return t.need

    def refill(self, Transfer t not None, bounce):
        """Go on with ``t`` now that ``bounce`` (space acquired for its next
        piece) is there; space it did not use goes back."""
        _not_reconnecting(self)
        cdef Py_ssize_t entries = _enter(<Queue>self.queue)
        try:
            if t.future is None or t.future.done():
                self.engine.space.release(bounce)
                return
            t.fill(bounce)
        finally:
            _leave(<Queue>self.queue, entries)

    def fail(self, Transfer t not None, exc):
        """End ``t`` with ``exc`` (its bounce space could not be had)."""
        if t.future is not None and not t.future.done():
            t.future.set_exception(exc)
        t.future = None

    def zone(self, int op, offset, zones, future, bounce=None):
        """Enqueue a zone request resolving ``future`` with its ret; minus
        the bounce bytes a report waits for (nothing enqueued), else 0."""
        cdef uint64_t off = as_u64(offset, "offset")
        _not_reconnecting(self)
        cdef Py_ssize_t entries = _enter(<Queue>self.queue)
        try:
            c = zone_completion(self.engine, op, off, zones, TO_FUTURE, future, bounce,
                                bounce is None)
            if c is None:
                return -memoryview(zones).nbytes
            self.engine.enqueue_one(c, False)
            return 0
        finally:
            _leave(<Queue>self.queue, entries)

    # ---- completions -------------------------------------------------------------------

    def reap(self, int fd):
        """Submit what is enqueued, take what is complete and route it --
        futures resolved, transfers refilled and their new pieces submitted,
        batches credited -- with the completion fd disabled meanwhile, then
        enabled again if anything is still in flight (``fd``, the loop's
        duplicate of it, is reset when nothing is).  Returns (the transfers
        now waiting for bounce space with nothing in flight, True when more
        is left for another round of the loop)."""
        cdef QueueEngine e = self.engine
        _not_reconnecting(self)
        cdef Py_ssize_t entries = _enter_even_broken(<Queue>self.queue)
        stuck = []
        try:
            if e.fd_enabled:            # no fd events while we reap in a loop
                e.set_fd_enabled(False)
            more = self._reap_into(stuck)
            while e.ring.ready:
                self.book.take(e.ring)
                more = self._reap_into(stuck)
            if e.unreaped:
                e.set_fd_enabled(True)
                if self._reap_into(stuck):      # what completed before the fd was on
                    more = True
                if e.ring.ready:
                    self.book.take(e.ring)
            else:
                # An event on the fd now is spurious (io_uring signals it even
                # while disabled, for completions reaped during the submit).
                e.reset_fd(fd)
            return stuck, more
        finally:
            _leave(<Queue>self.queue, entries)

    cdef bint _reap_into(self, list stuck) except -1:
        """One reap (inside the guard): True when more is left for another
        round of the loop; the transfers waiting for bounce space join ``stuck``."""
        cdef QueueEngine e = self.engine
        cdef uint64_t before
        cdef int rounds = 0
        if e.handle.state == ST_BROKEN:
            # The backend hung up: what it had in flight failed (abandon);
            # resolve those futures, submit nothing.
            route_async(e, self.stuck)
            stuck.extend(self.stuck)
            return False
        while True:
            e.drive(0, 0.0, None)
            if not e.ready:
                return False
            before = e.n_requests
            route_async(e, self.stuck)
            stuck.extend(self.stuck)
            if e.n_requests == before:
                return False
            rounds += 1
            if rounds == 8:         # cached pieces: let the loop run too
                e.drive(0, 0.0, None)
                return True

    @property
    def in_flight(self):
        return self.engine.unreaped

    @property
    def fd(self):
        _not_reconnecting(self)
        cdef Py_ssize_t entries = _enter(<Queue>self.queue)
        try:
            return self.engine.completion_fd()
        finally:
            _leave(<Queue>self.queue, entries)

    def enable_fd(self):
        """Let the completion fd signal (the loop watches it from now on)."""
        if self.engine.fd_enabled:
            return
        _not_reconnecting(self)
        cdef Py_ssize_t entries = _enter_even_broken(<Queue>self.queue)
        try:
            self.engine.set_fd_enabled(True)
        finally:
            _leave(<Queue>self.queue, entries)

    def reset_fd(self, int fd):
        """Read the count of ``fd`` (a dup of the completion fd) under the
        queue's lock."""
        return self.engine.reset_fd(fd)

    # ---- batches -----------------------------------------------------------------------

    def start_batch(self, int op, offsets, buffers, unsigned int flags, region, blocksize):
        """Begin a batch of reads or writes (checked whole first).  The
        common one -- nothing else of the loop's in flight, fitting the
        queue's room -- is submitted at once: its bytes when it completed
        during the submission, the OSError of its first failure raised when
        some of it failed there.  Otherwise an AsyncBatch, in flight
        (``submitted``) or to be submitted in waves (``wave``)."""
        cdef Py_ssize_t solo = -2
        cdef AsyncBatch b
        if not self.book.batches:
            solo = self._solo_batch(op, offsets, buffers, flags, region, blocksize)
            if solo >= 0:
                return solo
        offs = int_array(offsets, "offsets")     # checked already when solo was tried
        if not isinstance(buffers, np.ndarray):
            buffers = np.asarray(buffers)
        b = AsyncBatch.__new__(AsyncBatch)
        b.n = offs.shape[0]
        b.op, b.flags, b.offsets, b.buffers, b.region, b.blocksize = (op, flags, offs, buffers,
                                                                     region, blocksize)
        b.bs = blocksize if region is not None else (buffers.shape[1] if buffers.ndim == 2
                                                     else 0)
        b.nbytes = b.n * b.bs
        b.fail_index = -1
        if b.n == 0:
            return 0
        if solo == -3:                          # some failed during the submission
            b.pos = b.n
            b.left = self.solo_taken
            self.book.batches[0] = b
            self.book.credit_rows(self.solo_taken, True)
            del self.book.batches[0]
            raise b.error(self.engine.handle.broken_why)
        if solo == -1:                          # in flight, tags 0..n-1
            b.pos = b.left = b.n
            b.bid = 0
        else:
            self._check_batch(b)                # all of it before the first wave
            b.bid = self.book.new_id()
        self.book.batches[b.bid] = b
        return b

    cdef Py_ssize_t _solo_batch(self, int op, offsets, buffers, unsigned int flags, region,
                                blocksize) except -4:
        """The only batch in flight, in one wave, tags 0..n-1: its bytes when
        every request completed during the submission without failure;
        -1 when it is in flight; -3 when some failed at once (their
        completions taken into the reap rows, their count in ``solo_taken``);
        -2 when it does not fit (nothing submitted)."""
        cdef QueueEngine e = self.engine
        cdef BatchArrays a
        cdef Py_ssize_t room, failed
        cdef uint64_t bs = as_u64(blocksize, "blocksize")
        _not_reconnecting(self)
        cdef Py_ssize_t entries = _enter(<Queue>self.queue)
        try:
            a = batch_arrays(op, offsets, buffers, None, region, bs)
            room = e.depth - e.in_libblkio if e.depth else -1
            if self.book.reap_out is not e.ring.out:
                e.ring.set_out(self.book.reap_out)
            if (room >= 0 and a.n > room) or a.n > e.ring.out_len or e.ring.in_flight \
                    or e.ring.ready:
                return -2
            check_batch(a, e.handle, op, room)
            if a.n == 0:
                return 0
            e.enqueue_batch(op, a, flags)
            if e.ring.ready != a.n:
                return -1
            failed = e.ring.failed
            self.solo_taken = e.ring.copy_out()
            if e.ring.failed == failed:
                return a.n * a.blocksize
            return -3
        finally:
            _leave(<Queue>self.queue, entries)

    cdef int _check_batch(self, AsyncBatch b) except -1:
        cdef BatchArrays a
        cdef uint64_t bs = as_u64(b.blocksize, "blocksize")
        _not_reconnecting(self)
        cdef Py_ssize_t entries = _enter(<Queue>self.queue)
        try:
            a = batch_arrays(b.op, b.offsets, b.buffers, None, b.region, bs)
            check_batch(a, self.engine.handle, b.op, -1)
        finally:
            _leave(<Queue>self.queue, entries)
        return 0

    @property
    def batch_room(self):
        """Batch requests the queue can take now (a batch's next wave; -1: no bound)."""
        cdef QueueEngine e = self.engine
        if not e.depth:
            return -1
        return max(0, e.depth - e.unreaped)

    def wave(self, AsyncBatch b not None):
        """Submit the batch's next wave (as much of the rest as the queue
        has room for), then take the batch completions that are in."""
        cdef QueueEngine e = self.engine
        cdef Py_ssize_t k = b.n - b.pos
        if e.depth:
            k = min(k, e.depth - e.unreaped)
        cdef int64_t first = (b.bid << TAG_SHIFT) + b.pos
        tags = np.arange(first, first + k, dtype=np.int64)
        _not_reconnecting(self)
        (<Queue>self.queue)._submit_batch(b.op, b.offsets[b.pos:b.pos + k],
                                          b.buffers[b.pos:b.pos + k], tags, b.flags, b.region,
                                          b.blocksize)
        b.left += k
        b.pos += k
        if e.ring.ready and not e.handle.reconnecting:
            self.take_batches()

    def wave_failed(self, AsyncBatch b not None, exc):
        """A wave could not be submitted (nothing of it was): raise the
        closed-device error when the device or queue went with requests of
        ``b`` in flight; otherwise ``exc`` ends the batch after those."""
        if b.left and (self.core.closed or self.queue.removed):
            raise self.closed_during(b) from exc

    def await_batch(self, AsyncBatch b not None, fut):
        """``fut`` is resolved when the last request of ``b`` is in."""
        b.fut = fut

    def end_batch(self, AsyncBatch b not None):
        """The await of ``b`` ended (or was cancelled): forget it once its
        last request is in."""
        if b.left == 0:
            if self.book.batches.get(b.bid) is b:
                del self.book.batches[b.bid]
        else:
            b.abandoned = True      # reaping drops it at its end

    def batch_result(self, AsyncBatch b not None):
        """The batch's bytes, or the OSError of its first failure raised."""
        if b.nfail:
            raise b.error(self.engine.handle.broken_why)
        return b.nbytes

    def closed_during(self, AsyncBatch b not None):
        return ValueError(f"the {self.core.driver} device was closed (or its queue removed) "
                          f"while a batch of {b.n} request(s) was in flight")

    @property
    def batches_in_flight(self):
        return len(self.book.batches)

    def take_batches(self):
        """Credit the batch completions waiting in the ring to their batches
        (no waiting; on a broken device too, for the requests its backend's
        hang-up failed): with one batch in flight and no failure, in one step."""
        _not_reconnecting(self)
        cdef Py_ssize_t entries = _enter_even_broken(<Queue>self.queue)
        try:
            self.book.take(self.engine.ring)
        finally:
            _leave(<Queue>self.queue, entries)

    # ---- the queue's end -----------------------------------------------------------------

    def on_gone(self, callback):
        """``callback(orphans)`` when the queue is removed or the device
        closed (the completions nobody collected); None: no more notice
        for this port."""
        if self.listener is not None:
            try:
                self.engine.gone_listeners.remove(self.listener)
            except ValueError:
                pass
        self.listener = callback
        if callback is not None:
            self.engine.gone_listeners.append(callback)

    def orphaned(self, list orphans not None):
        """The device was closed (or the queue removed) by someone else: the
        futures of what close drained get its result, the rest and every
        batch awaited fail with ValueError."""
        for c in orphans:
            fut = c.user_data
            if isinstance(fut, asyncio.Future) and not fut.done():
                if c.ret >= 0:
                    fut.set_result(c.length)
                else:
                    fut.set_exception(ValueError(f"the device was closed (or its queue "
                                                 f"removed) before this {c.op} completed"))
        batches, self.book.batches = self.book.batches, {}
        for b in batches.values():
            fut = (<AsyncBatch>b).fut
            if fut is not None and not fut.done():
                fut.set_exception(self.closed_during(b))

    @property
    def gone(self):
        return self.queue.removed

    @property
    def usable(self):
        """Neither closed, nor its queue removed, nor its backend gone for good."""
        return not (self.core.closed or self.queue.removed
                    or self.engine.handle.state == ST_BROKEN)

    # ---- the backend (vhost-user): its hang-up, and reconnecting --------------------

    @property
    def backend_fds(self):
        """The sockets whose hang-up means the backend died (the loop
        watches duplicates of them)."""
        return self.core.backend_fds

    @property
    def reconnects(self):
        """Does the device reconnect when its backend hangs up?"""
        return self.engine.handle.reconnect_enabled

    @property
    def reconnecting(self):
        return self.engine.handle.reconnecting

    def reconnect_over(self, bint waiting):
        """Did a reconnect end since the loop last looked (``waiting``: the
        loop saw it begin)?  Remembers the reconnects it answered for."""
        if self.engine.handle.reconnecting:
            return False
        if not waiting and self.core.generation == self.seen_generation:
            return False
        self.seen_generation = self.core.generation
        return True

    def hang_up(self):
        """The loop saw the backend hang up, on a device that does not
        reconnect: everything in flight fails, the device is broken."""
        cdef Py_ssize_t entry = core_enter(self.core)
        try:
            self.core.hang_up()
        finally:
            core_leave(self.core, entry)

    @property
    def reconnect_fd(self):
        """An eventfd readable when a reconnect began or ended (the loop
        watches a duplicate; -1 when the device does not reconnect)."""
        return self.core.reconnect_fd
