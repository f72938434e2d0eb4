"""Requests and queues: everything between a caller's buffer and libblkio.

It owns the op codes (``Op``) and request flags, ``Completion``, the caller
memory held while a request is in flight (``HeldBuffers``), ``Queue``
(enqueue, submit, wait, the batch path, the completion fd), and the request
path used by every API: the one request check (``check_request``), the
direct-or-bounce decision (``prepare``), the splitter and the blocking calls
(``blocking_io``, and ``blocking_one``, the single-buffer hot path).  Every
``blkioq_*`` call of the package is in this module.  It does not create,
configure or destroy an instance (``_handle``, ``_device``) and never parses
user options.

The hot per-request chains -- blocking_one -> Queue.enqueue_one ->
Queue.dispatch, and the batch path -- stay inside this module: a call into
another Cython module is a pointer call, made once per call at most.
"""

cimport cython
cimport numpy as cnp
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE,
                             PyBUF_WRITABLE, PyBUF_ANY_CONTIGUOUS, PyBUF_FORMAT,
                             PyBUF_C_CONTIGUOUS)
from cpython.exc cimport PyErr_CheckSignals, PyErr_Clear
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport PyObject
from libc.errno cimport EINTR, EIO, EBADF, EOPNOTSUPP, ETIME
from libc.stdint cimport uint32_t, uint64_t, int64_t, uintptr_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memset
from posix.time cimport timespec
from posix.uio cimport iovec

from . cimport _libblkio as lb
from ._args cimport as_u64, as_index
from ._posix cimport (ENOTSUP, ECANCELED, pthread_mutex_init, pthread_mutex_destroy,
                      pthread_mutex_lock, pthread_mutex_trylock, pthread_mutex_unlock,
                      pthread_cond_init, pthread_cond_destroy, pthread_cond_broadcast,
                      pthread_cond_timedwait, clock_gettime, CLOCK_MONOTONIC, realtime_after,
                      pollfd, poll, POLLIN)
from libc.errno cimport errno
from posix.unistd cimport read
from ._handle cimport (HotLimits, libblkio_error, request_error, unraisable, ST_STARTED)

import enum
import os
import time
import warnings

import numpy as np

from ._errors import Error, ReadOnlyError
from ._handle import LIBBLKIO_VERSION as _LIBBLKIO_VERSION

#: Request names, by op code.
OP_NAMES = ("read", "write", "write_zeroes", "discard", "flush", "report_zones", "open_zone",
            "close_zone", "finish_zone", "reset_zone", "open_all_zones", "close_all_zones",
            "finish_all_zones", "reset_all_zones")

#: Request flags (libblkio's BLKIO_REQ_*).
REQ_FUA = lb.BLKIO_REQ_FUA
REQ_NO_UNMAP = lb.BLKIO_REQ_NO_UNMAP
REQ_NO_FALLBACK = lb.BLKIO_REQ_NO_FALLBACK

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

#: What requests that never completed were holding (close or remove_queue
#: gave up waiting for them): the device may still write that memory, so it
#: is never given back.
kept_for_the_kernel = []


def write_zeroes_flags(bint fua=False, bint may_unmap=True, bint no_fallback=False):
    """The request flags of a write-zeroes request (``Queue.enqueue``)."""
    return zero_flags(fua, may_unmap, no_fallback)


cdef unsigned int zero_flags(bint fua, bint may_unmap, bint no_fallback) except? 0xFFFFFFFF:
    cdef unsigned int flags = 0
    if fua:
        if _LIBBLKIO_VERSION != "unknown" and tuple(int(x) for x in _LIBBLKIO_VERSION.split(".")[:2]) < (1, 4):
            raise ValueError("fua=True on write_zeroes needs libblkio >= 1.4.0 "
                             f"(built against {_LIBBLKIO_VERSION})")
        flags |= REQ_FUA
    if not may_unmap:
        flags |= REQ_NO_UNMAP
    if no_fallback:
        flags |= REQ_NO_FALLBACK
    return flags

# --------------------------------------------------------------------------
# Caller memory held for requests

@cython.final
@cython.freelist(64)
cdef class HeldBuffers:

    def __cinit__(self):
        self.bufs = NULL
        self.iov = NULL
        self.n = 0
        self.total = 0

    def __dealloc__(self):
        self.release()

    cdef void release(self) noexcept:
        cdef int i
        if self.bufs != NULL:
            for i in range(self.n):
                PyBuffer_Release(&self.bufs[i])
            if self.bufs != &self.buf1:
                free(self.bufs)
                free(self.iov)
        self.bufs = NULL
        self.iov = NULL
        self.n = 0
        self.array = None


cdef extern from "Python.h":
    # PyObject_GetBuffer without Cython's exception check: the hot path
    # clears the error and lets the general path raise the clear message,
    # and needs no try/except (whose set-up costs on every call).
    int _get_buffer_or_minus_one "PyObject_GetBuffer" (object obj, Py_buffer *view, int flags)


cnp.import_array()


cdef int _VIEW_FLAGS[2]
_VIEW_FLAGS[0] = PyBUF_ANY_CONTIGUOUS
_VIEW_FLAGS[1] = PyBUF_ANY_CONTIGUOUS | PyBUF_WRITABLE

# asyncio.Future and two of its methods, for resolve_futures (set on its
# first call: the core does not import asyncio for those who never use it)
cdef object _Future = None, _future_done = None, _future_set_result = None


cdef inline bint _array_memory(object obj, bint writable, iovec *out) noexcept:
    """For an exact numpy array that is contiguous (and writable, for a
    read): its memory, read from the array instead of through a buffer
    export, which numpy makes expensive (it builds and compares a
    buffer-info record each time; more instructions than the rest of a
    blocking call).  The caller keeps a reference to the array for as long
    as a request uses the memory.  False for anything else (the export then
    takes it, or raises the clear error)."""
    if type(obj) is not cnp.ndarray:
        return False
    cdef int flags = cnp.PyArray_FLAGS(<cnp.ndarray>obj)
    if not flags & (cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_F_CONTIGUOUS):
        return False
    if writable and not flags & cnp.NPY_ARRAY_WRITEABLE:
        return False
    out.iov_base = cnp.PyArray_DATA(<cnp.ndarray>obj)
    out.iov_len = <size_t>cnp.PyArray_NBYTES(<cnp.ndarray>obj)
    return True


cdef inline bint _batch_array(object obj, Py_buffer *view, int ndim, char kind,
                              bint writable) noexcept:
    """The batch API's view of an exact numpy array, read from the array
    (see _array_memory: numpy's export is most of a batch's own cost) when it
    is what the export would accept: ``ndim`` dimensions, C-contiguous,
    aligned, native byte order, writable if asked, of the dtype that ``kind``
    (the first of the export formats accepted: 'L' uint64, 'l' int64, 'B'
    uint8) names.  ``view.obj`` stays NULL, so PyBuffer_Release leaves it
    alone; the caller's reference keeps the array alive.  False for anything
    else: the export then takes it, or raises the clear error."""
    if type(obj) is not cnp.ndarray:
        return False
    cdef cnp.ndarray a = <cnp.ndarray>obj
    cdef int need = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED
    if writable:
        need |= cnp.NPY_ARRAY_WRITEABLE
    if cnp.PyArray_NDIM(a) != ndim or cnp.PyArray_FLAGS(a) & need != need \
            or not cnp.PyArray_ISNOTSWAPPED(a):
        return False
    cdef int t = cnp.PyArray_TYPE(a)
    if kind == b'L':
        if t != cnp.NPY_ULONG and t != cnp.NPY_ULONGLONG or cnp.PyArray_ITEMSIZE(a) != 8:
            return False
    elif kind == b'l':
        if t != cnp.NPY_LONG and t != cnp.NPY_LONGLONG or cnp.PyArray_ITEMSIZE(a) != 8:
            return False
    elif kind != b'B' or t != cnp.NPY_UBYTE:
        return False
    memset(view, 0, sizeof(Py_buffer))        # obj, format, strides: NULL
    view.buf = cnp.PyArray_DATA(a)
    view.len = cnp.PyArray_NBYTES(a)
    view.itemsize = cnp.PyArray_ITEMSIZE(a)
    view.readonly = not cnp.PyArray_ISWRITEABLE(a)
    view.ndim = ndim
    view.shape = <Py_ssize_t *>cnp.PyArray_DIMS(a)
    return True


cdef HeldBuffers _hold_one(object obj, bint writable):
    """The memory of one object, in inline storage (the hot path)."""
    cdef HeldBuffers v = HeldBuffers.__new__(HeldBuffers)
    if _array_memory(obj, writable, &v.iov1):
        v.array = obj
        v.iov = &v.iov1
        v.n = 1
        v.total = v.iov1.iov_len
        return v
    try:
        PyObject_GetBuffer(obj, &v.buf1, _VIEW_FLAGS[writable])
    except (BufferError, TypeError, ValueError):
        return hold_buffers((obj,), writable, False)   # for its error message
    v.bufs = &v.buf1
    v.iov = &v.iov1
    v.n = 1
    v.iov1.iov_base = v.buf1.buf
    v.iov1.iov_len = <size_t>v.buf1.len
    v.total = <size_t>v.buf1.len
    return v


cdef HeldBuffers hold_buffers(object objs, bint writable, bint single):
    """Py_buffers for one object (``single``) or a sequence of them."""
    if single:
        return _hold_one(objs, writable)
    if not isinstance(objs, (list, tuple)):
        objs = tuple(objs)
    cdef Py_ssize_t n = len(objs)
    if n == 0:
        raise ValueError("no buffers given")
    if n > 1 << 20:
        raise ValueError(f"too many buffers ({n})")
    cdef HeldBuffers v = HeldBuffers.__new__(HeldBuffers)
    v.bufs = <Py_buffer *>calloc(n, sizeof(Py_buffer))
    v.iov = <iovec *>calloc(n, sizeof(iovec))
    if v.bufs == NULL or v.iov == NULL:
        raise MemoryError()
    cdef int flags = PyBUF_ANY_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0)
    cdef Py_ssize_t i
    for i in range(n):
        try:
            PyObject_GetBuffer(objs[i], &v.bufs[i], flags)
        except (BufferError, ValueError) as e:
            kind = "a writable" if writable else "a"
            raise TypeError(f"buffer {i} must be {kind} contiguous buffer "
                            f"(numpy array, bytearray, memoryview, mmap): {e}") from None
        except TypeError:
            raise TypeError(f"buffer {i} ({type(objs[i]).__name__}) does not support "
                            f"the buffer protocol") from None
        v.n = <int>(i + 1)
        v.iov[i].iov_base = v.bufs[i].buf
        v.iov[i].iov_len = <size_t>v.bufs[i].len
        v.total += <size_t>v.bufs[i].len
    return v


cdef int _slice_iov(iovec *src, int n, size_t pos, size_t length, iovec **out) except -1:
    """Point *out at a new array covering bytes [pos, pos+length) of src."""
    cdef int i = 0, first, count = 0
    cdef size_t skip = pos, left = length, take
    while i < n and skip >= src[i].iov_len:
        skip -= src[i].iov_len
        i += 1
    first = i
    cdef size_t s = skip
    cdef int j = i
    while j < n and left > 0:
        take = src[j].iov_len - s
        if take > left:
            take = left
        left -= take
        s = 0
        j += 1
        count += 1
    out[0] = <iovec *>malloc(count * sizeof(iovec) if count else sizeof(iovec))
    if out[0] == NULL:
        raise MemoryError()
    left = length
    s = skip
    for j in range(count):
        take = src[first + j].iov_len - s
        if take > left:
            take = left
        out[0][j].iov_base = <char *>src[first + j].iov_base + s
        out[0][j].iov_len = take
        left -= take
        s = 0
    return count


cdef void _gather(iovec *iov, int n, char *dst) noexcept nogil:
    cdef int i
    for i in range(n):
        memcpy(dst, iov[i].iov_base, iov[i].iov_len)
        dst += iov[i].iov_len


cdef void _scatter(char *src, iovec *iov, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        memcpy(iov[i].iov_base, src, iov[i].iov_len)
        src += iov[i].iov_len

# --------------------------------------------------------------------------
# Requests and completions

cdef inline bint _release_hot(Completion c) noexcept:
    """``release_memory`` for the hot paths' requests, which hold nothing
    allocated (at most an array): True when that was all.  Inlined into
    dispatch, which every request passes (a method call there cost about
    40 instructions a request)."""
    if (c.views is None and c.pool is None
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
        if self.bounce_start >= 0 and self.pool is not None:
            try:
                self.pool.release_range(self.bounce_start, self.bounce_buffer)
            except BaseException as e:
                err = e
        self.bounce_start = -1
        self.bounce_buffer = None
        self.pool = None
        self.views = None
        return err

    @property
    def error_msg(self):
        """libblkio's message for a failed request, or None."""
        return self._error_msg

    @property
    def op(self) -> str:
        """The request kind: read, write, write_zeroes, discard or flush."""
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

# ``Completion.user_data`` and ``ret`` are object members (structmember's
# T_OBJECT_EX), added to the type here, rather than Cython's properties:
# CPython specializes reading an object member (LOAD_ATTR_SLOT, a load and
# an incref) but not a property, which takes the generic lookup every time
# -- about 130 instructions per read, and a queue loop reads both for every
# request (callgrind, 2026-12-05).
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
        doc=b"The object passed as user_data= when the request was enqueued",
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
# Queues

cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return <int64_t>t.tv_sec * 1000000000 + t.tv_nsec


cdef inline void _set_timeout(timespec *ts, double seconds) noexcept nogil:
    if seconds < 0:
        seconds = 0
    ts.tv_sec = <long>seconds
    ts.tv_nsec = <long>((seconds - <double>ts.tv_sec) * 1e9)


@cython.final
cdef class Queue:
    """One libblkio queue.  Enqueue requests, then ``submit``/``wait``/``completions``.

    Each queue serialises its own use with a lock taken without the GIL, so
    several threads may share one; one queue per thread is the fast way.
    """

    def __cinit__(self):
        self.q = NULL
        self.lock_ready = False
        self.batch_tags = NULL
        self.batch_rets = NULL
        self.slots_table = NULL
        self.slots_free = -1

    def __dealloc__(self):
        if self.lock_ready:
            pthread_mutex_destroy(&self.lock)
            pthread_mutex_destroy(&self.wait_mutex)
            pthread_cond_destroy(&self.wait_cond)
        free(self.batch_tags)
        free(self.batch_rets)
        free(self.slots_table)

    @staticmethod
    cdef Queue new(DeviceHandle handle, BouncePool pool, object device, lb.blkioq *q,
                   int index, bint poll, Py_ssize_t slots):
        cdef Queue self = Queue.__new__(Queue)
        self.q = q
        self.handle = handle
        self.pool = pool
        self._device = device
        self.index = index
        self.is_poll_queue = poll
        self.slots = slots
        pthread_mutex_init(&self.lock, NULL)
        pthread_mutex_init(&self.wait_mutex, NULL)
        pthread_cond_init(&self.wait_cond, NULL)
        self.lock_ready = True
        self.ready = []
        return self

    # ---- lifetime guard (see _handle; the hot half is queue_enter and
    # friends in _requests.pxd) ------------------------------------------

    cdef void left_while_removing(self) noexcept:
        self.handle.wake_waiters()
        if self.guard.users == 0 and self.remove_pending:
            # remove_queue() ran inside a call of this thread: finish it now
            self.remove_pending = False
            try:
                self._device._finish_remove(self)
            except BaseException:
                unraisable(self)

    cdef int check_not_closing(self) except -1:
        """Between wait slices: give up when the device or queue is going away
        (close/remove_queue itself drains, so it passes)."""
        cdef DeviceHandle h = self.handle
        if h.draining or self.draining:
            return 0
        if h.closing:
            raise h.closed_error()
        if self.removing:
            raise ValueError(f"queue {self.index} was removed")
        return 0

    def _drive_slice(self, double seconds):
        """Reap this queue for up to ``seconds`` (a bounce-pool wait calls it,
        so that our own completed requests give their space back); False when
        nothing is in flight."""
        if self.unreaped == 0:
            return False
        try:
            self.drive(1, seconds, None)
        except TimeoutError:
            pass
        return True

    cdef Py_ssize_t using(self, uintptr_t start, uintptr_t end):
        """Requests in flight whose device-visible memory overlaps [start, end)."""
        cdef Py_ssize_t n = 0, i
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
        for i in range(self.slots_cap):
            if (self.slots_table[i].length and self.slots_table[i].addr < end
                    and self.slots_table[i].addr + self.slots_table[i].length > start):
                n += 1
        return n

    # ---- enqueue: the one place that hands requests to libblkio ----------

    cdef int enqueue_one(self, Completion c, bint reap, bint wait_first=False) except -1:
        """Hand ``c`` to libblkio and submit it; with ``reap``, take what is
        already complete.  ``wait_first``: the caller waits for ``c`` next
        (``drive``), so a call alone on its queue while other threads run
        also sleeps a first short slice in the same GIL-free section as the
        submit: with threads every GIL release hands the GIL over, and
        taking it back is a wait of its own (one a request instead of two)."""
        # Link first: the list holds the reference libblkio's user_data borrows.
        c.next = self.head
        if self.head is not None:
            self.head.prev = c
        self.head = c
        self.unreaped += 1
        self.handle.n_requests += 1
        self.n_requests += 1
        cdef void *ud = <void *>c
        cdef int n = 0
        cdef bint waited = False
        cdef timespec ts
        cdef lb.blkio_completion comps[NCOMPS]
        # With several threads, the submit releases the GIL even when the
        # queue is free: io_uring_enter may sleep on an O_DIRECT file (keeping
        # the GIL there took 8 threads from 67k to 38k IOPS, 2026-12-04).
        if self.handle.threaded or pthread_mutex_trylock(&self.lock) != 0:
            if wait_first:
                wait_first = (self.handle.threaded and self.guard.users == 1
                              and self.handle.spin_ns == 0 and not self.is_poll_queue)
                if wait_first:
                    _set_timeout(&ts, SHARE_CHECK)
            with nogil:
                pthread_mutex_lock(&self.lock)
                if wait_first:
                    n = self._enqueue_wait_locked(c, ud, comps, &ts)
                    waited = True
                else:
                    n = self._enqueue_locked(c, ud, reap, comps)
                pthread_mutex_unlock(&self.lock)
        else:
            # One thread only, lock free: this call never sleeps (min_completions
            # is 0), and releasing the GIL would cost more than the call itself.
            n = self._enqueue_locked(c, ud, reap, comps)
            pthread_mutex_unlock(&self.lock)
        if reap:
            if waited and (n == -EINTR or n == -ETIME):
                # the caller's drive() goes on waiting (and raises for Ctrl-C)
                if n == -EINTR:
                    PyErr_CheckSignals()
                return 0
            if n < 0:
                raise libblkio_error(n, "blkioq_do_io")
            self.dispatch(comps, n)
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
        if c.op == READ:
            if c.iovcnt == 1:
                lb.blkioq_read(q, c.offset, c.iov[0].iov_base, c.iov[0].iov_len, ud, c.flags)
            else:
                lb.blkioq_readv(q, c.offset, c.iov, c.iovcnt, ud, c.flags)
        elif c.op == WRITE:
            if c.iovcnt == 1:
                lb.blkioq_write(q, c.offset, c.iov[0].iov_base, c.iov[0].iov_len, ud, c.flags)
            else:
                lb.blkioq_writev(q, c.offset, c.iov, c.iovcnt, ud, c.flags)
        elif c.op == WRITE_ZEROES:
            lb.blkioq_write_zeroes(q, c.offset, c.length, ud, c.flags)
        elif c.op == DISCARD:
            lb.blkioq_discard(q, c.offset, c.length, ud, c.flags)
        elif c.op >= REPORT_ZONES:
            _enqueue_zone(q, c, ud)
        else:
            lb.blkioq_flush(q, ud, c.flags)
        self.in_libblkio += 1
        if reap:
            n = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
            if n > 0:
                self.in_libblkio -= n
        return n

    cdef int fail_all(self, int err) except -1:
        """Complete every request in flight with -err, without libblkio (its
        backend is gone, so nothing can touch their memory any more)."""
        cdef Completion c
        raised = None
        while self.head is not None:
            c = self.head
            self.unlink(c)
            set_ret(c, -err)
            c._error_msg = "the backend hung up"
            c.done = True
            released = c.release_memory()
            if released is not None and raised is None:
                raised = released
            if not c.internal:
                self.ready.append(c)
        # Batch requests in flight complete with the same error.
        cdef Py_ssize_t i, ring
        self._ensure_batch(self.batch_unreaped)
        for i in range(self.slots_cap):
            if self.slots_table[i].length:
                ring = (self.batch_head + self.batch_ready) % self.batch_cap
                self.batch_tags[ring] = self.slots_table[i].tag
                self.batch_rets[ring] = -err
                self.batch_ready += 1
                self._free_slot(i)
        self.batch_unreaped = 0
        self.unreaped = 0
        self.in_libblkio = 0
        if raised is not None:
            raise raised
        return 0

    cdef int _ensure_slots(self, Py_ssize_t need) except -1:
        """At least ``need`` free batch slots (GIL held).  Slots are found by
        index, so growing the table never moves a request in flight."""
        if self.slots_nfree >= need:
            return 0
        cdef Py_ssize_t old = self.slots_cap, i
        cdef Py_ssize_t newcap = max(2 * old, old + need - self.slots_nfree, 256)
        cdef BatchSlot *t = <BatchSlot *>realloc(self.slots_table, newcap * sizeof(BatchSlot))
        if t == NULL:
            raise MemoryError()
        self.slots_table = t
        i = newcap - 1
        while i >= old:
            t[i].length = 0
            t[i].next = self.slots_free
            self.slots_free = i
            i -= 1
        self.slots_nfree += newcap - old
        self.slots_cap = newcap
        return 0

    cdef void _free_slot(self, Py_ssize_t i) noexcept:
        self.slots_table[i].length = 0
        self.slots_table[i].next = self.slots_free
        self.slots_free = i
        self.slots_nfree += 1

    cdef void unlink(self, Completion c) noexcept:
        if c.prev is not None:
            c.prev.next = c.next
        else:
            self.head = c.next
        if c.next is not None:
            c.next.prev = c.prev
        c.prev = None
        c.next = None

    # ---- reaping -------------------------------------------------------

    cdef int dispatch(self, lb.blkio_completion *comps, int n) except -1:
        """Hand out n completions (GIL held).  Each caller reaps into its own
        array: a shared one would be overwritten by another thread's do_io
        between the unlock and this dispatch."""
        cdef int i
        cdef uintptr_t ud
        cdef Completion c
        cdef Py_ssize_t ring, slot
        err = None
        for i in range(n):
            ud = <uintptr_t>comps[i].user_data
            self.unreaped -= 1
            if ud & TAG_BIT:
                slot = <Py_ssize_t>(ud >> 1)
                ring = (self.batch_head + self.batch_ready) % self.batch_cap
                self.batch_tags[ring] = self.slots_table[slot].tag
                self.batch_rets[ring] = comps[i].ret
                self.batch_ready += 1
                self.batch_unreaped -= 1
                self._free_slot(slot)
                continue
            c = <Completion><PyObject *>comps[i].user_data
            self.unlink(c)
            c.ret = comps[i].ret
            if not c.internal:      # a blocking call's own: Python never sees it
                c.ret_obj = c.ret
            if c.ret < 0 and comps[i].error_msg != NULL:
                c._error_msg = comps[i].error_msg.decode("utf-8", "replace")
            if c.bounce_start >= 0 and (c.ret == 0 and c.op == READ
                                        or c.ret > 0 and c.op == REPORT_ZONES):
                _scatter(<char *>c.iov[0].iov_base, c.user_iov, c.user_iovcnt)
            if c.bounce_start >= 0:
                self.handle.bounced_bytes += c.length
                self.handle.n_bounced += 1
            c.done = True
            if not _release_hot(c):
                released = c.release_memory()
                if released is not None and err is None:
                    err = released   # raised once every completion is handed out
            if not c.internal:
                self.ready.append(c)
        if err is not None:
            raise err
        return 0

    cdef int collect_locked(self, lb.blkio_completion *comps) except -1:
        """With the queue's lock held: submit what is queued and take what is
        done without waiting; releases the lock, dispatches, returns the count."""
        cdef int n = lb.blkioq_do_io(self.q, comps, 0, NCOMPS, NULL)
        if n > 0:
            self.in_libblkio -= n
        pthread_mutex_unlock(&self.lock)
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
        if until is None and min_completions <= 0:
            # Non-blocking: submit, and reap what is already there.
            while True:
                if pthread_mutex_trylock(&self.lock) != 0:
                    with nogil:
                        pthread_mutex_lock(&self.lock)
                n = self.collect_locked(comps)
                got += n
                if n < NCOMPS:
                    return got
        if until is None and self.in_libblkio > 0 and pthread_mutex_trylock(&self.lock) == 0:
            # What is done already, keeping the GIL: when that is enough (a
            # page-cached batch completes inside its submit), no GIL-free
            # section -- with threads, each one is a GIL hand-off.
            got = self.collect_locked(comps)
            if got >= min_completions:
                return got
        deadline = time.monotonic() + timeout if timeout >= 0 else None
        cdef double max_slice = WAIT_SLICE
        if self.handle.threaded:
            # Another thread may come to this queue while we sleep holding its
            # lock: look again soon (wait_shared then takes over).
            max_slice = SHARE_CHECK
        while True:
            if until is not None:
                if until.done:
                    return 0
                if self.guard.users > 1 and not self.is_poll_queue:
                    # Other calls use this queue too: wait without holding it.
                    return self.wait_shared(until)
                self.check_not_closing()
                want = 1 if self.unreaped > 0 else 0
            else:
                self.check_not_closing()
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
            with nogil:
                pthread_mutex_lock(&self.lock)
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
            if n >= 0:
                got += n
                self.dispatch(comps, n)
                if until is None and (got >= min_completions or want == 0):
                    return got
                if until is not None and want == 0 and not until.done:
                    # Another thread holds our completion's turn; let it run.
                    time.sleep(0)
                continue
            if n == -EINTR:
                PyErr_CheckSignals()
            elif n == -ETIME:
                if self.handle.backend_dead():
                    inflight = self.unreaped
                    self._device._fail_backend()
                    raise Error(EIO, f"{self.handle.driver}: the backend hung up "
                                     f"with {inflight} request(s) in flight")
                PyErr_CheckSignals()
            else:
                raise libblkio_error(n, "blkioq_do_io")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no completion within {timeout} s "
                                   f"({self.unreaped} request(s) still in flight)")

    cdef int wait_shared(self, Completion until) except -1:
        """Wait for ``until`` while other calls use this queue too.  Waiting
        inside blkioq_do_io would hold the queue's lock, and every other thread
        would stop submitting until this request completed.  Instead one
        waiter (the leader) sleeps on the completion fd with neither the GIL
        nor the queue lock, reaps for everyone and wakes the others, who wait
        for that on ``wait_cond``; so N threads keep N requests in flight."""
        cdef int fd, r, err
        cdef pollfd pfd
        cdef uint64_t counter
        cdef timespec ts
        cdef int slice_ms = <int>(WAIT_SLICE * 1000)
        if not self.fd_enabled:
            self._set_fd_enabled(True)
        fd = lb.blkioq_get_completion_fd(self.q)
        while True:
            self.drive(0, 0.0, None)            # submit, reap what is there
            if until.done:
                return 0
            self.check_not_closing()
            if not self.leader:
                self.leader = True
                pfd.fd = fd
                pfd.events = POLLIN
                pfd.revents = 0
                with nogil:
                    r = poll(&pfd, 1, slice_ms)
                    err = errno
                if r > 0:
                    self.reset_fd(fd)           # under the queue lock, then reap
                self.leader = False
                self.drive(0, 0.0, None)
                self.wake_followers()
                if r < 0 and err != EINTR:
                    raise OSError(err, f"poll on the completion fd: {os.strerror(err)}")
                if r == 0 and self.handle.backend_dead():
                    inflight = self.unreaped
                    self._device._fail_backend()
                    raise Error(EIO, f"{self.handle.driver}: the backend hung up "
                                     f"with {inflight} request(s) in flight")
                PyErr_CheckSignals()
            else:
                # A follower: the leader reaps; wait for its call (or a slice).
                realtime_after(&ts, WAIT_SLICE)
                pthread_mutex_lock(&self.wait_mutex)
                if not until.done and self.leader:
                    with nogil:
                        pthread_cond_timedwait(&self.wait_cond, &self.wait_mutex, &ts)
                        pthread_mutex_unlock(&self.wait_mutex)
                else:
                    pthread_mutex_unlock(&self.wait_mutex)
                PyErr_CheckSignals()

    cdef void wake_followers(self) noexcept:
        pthread_mutex_lock(&self.wait_mutex)
        pthread_cond_broadcast(&self.wait_cond)
        pthread_mutex_unlock(&self.wait_mutex)

    def _set_fd_enabled(self, bint value):
        if pthread_mutex_trylock(&self.lock) != 0:
            with nogil:
                pthread_mutex_lock(&self.lock)
        lb.blkioq_set_completion_fd_enabled(self.q, value)
        pthread_mutex_unlock(&self.lock)
        self.fd_enabled = value

    # ---- public API ------------------------------------------------------

    def enqueue(self, op, offset=0, buf=None, length=0, unsigned int flags=0,
                user_data=None, bint vectored=False, bounce=None, bint nowait=False):
        """Enqueue one request of any kind without waiting for it: ``op``
        (an ``Op``), ``offset`` and ``buf`` (a buffer, or a sequence of them
        with ``vectored=True``) for reads and writes, ``length`` for
        write-zeroes and discard; ``flags`` (``REQ_FUA`` ...).  The request is
        sent with the next ``submit()``/``wait()``/``completions()``.

        Returns the request's length in bytes.  Memory the driver cannot use
        where it is goes through the bounce pool; with ``nowait=True``, when
        the pool has no room right now nothing is enqueued and the return
        value is minus the bytes needed: acquire them with
        ``bounce_pool.acquire_async()`` and call again with ``bounce=`` that
        array (the request then owns it).  This is what ``blkio.aio`` does."""
        cdef int code = as_index(op, "op")
        if not READ <= code <= FLUSH:
            raise ValueError(f"unknown op {op!r}")
        return self._enqueue(code, offset, buf, as_u64(length, "length"), flags,
                             user_data, vectored, bounce, nowait)

    cdef object _enqueue(self, int op, object offset, object buf, uint64_t length,
                         unsigned int flags, object user_data, bint vectored,
                         object bounce, bint nowait):
        # The methods below call this, not enqueue(): a Python-level call
        # would convert ``op`` to an ``Op`` enum member (~850 instructions,
        # more than the rest of a request's enqueue) and parse keywords.
        cdef uint64_t off = as_u64(offset, "offset")
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            return self.enqueue_request(op, off, buf, vectored, flags, user_data, length,
                                        bounce, nowait)
        finally:
            queue_leave(self, slots)

    cdef object enqueue_request(self, int op, uint64_t offset, object buf, bint vectored,
                                unsigned int flags, object user_data, uint64_t length,
                                object bounce, bint nowait, uint64_t pipeline_over=0):
        """Check and enqueue one request (inside the queue's guard).  With
        ``pipeline_over``, a read or write longer than that is not enqueued:
        None (the caller pipelines it)."""
        cdef DeviceHandle h = self.handle
        cdef HeldBuffers views = None
        cdef object array = None
        cdef iovec one
        cdef iovec *iov = NULL
        cdef int iovcnt = 0
        if op == READ or op == WRITE:
            if not vectored and _array_memory(buf, op == READ, &one):
                array = buf         # no HeldBuffers: the Completion holds the array
                iov = &one
                iovcnt = 1
                length = one.iov_len
            else:
                views = hold_buffers(buf, op == READ, not vectored)
                iov = views.iov
                iovcnt = views.n
                length = views.total
            if pipeline_over and length > pipeline_over:
                return None
        check_request(h, op, offset, length)
        if (op == READ or op == WRITE) and h.lim.max_transfer and length > h.lim.max_transfer:
            raise ValueError(f"{OP_NAMES[op]} of {length} bytes exceeds max-transfer "
                             f"({h.lim.max_transfer}); split it, or use the Device's blocking "
                             f"methods, which split")
        cdef Completion c = prepare(self, op, offset, length, views, array, iov, iovcnt,
                                    flags, user_data, False, bounce, nowait)
        if c is None:
            return -<int64_t>length
        self.enqueue_one(c, False)
        if length != self.spare_len or self.spare_len_obj is None:
            self.spare_len = length         # an int object less per request
            self.spare_len_obj = length
        return self.spare_len_obj

    def read(self, offset, buf, *, user_data=None):
        """Enqueue a read into ``buf`` (a writable contiguous buffer)."""
        return self._enqueue(READ, offset, buf, 0, 0, user_data, False, None, False)

    def write(self, offset, buf, *, user_data=None, bint fua=False):
        """Enqueue a write of ``buf``."""
        return self._enqueue(WRITE, offset, buf, 0, REQ_FUA if fua else 0, user_data,
                             False, None, False)

    def readv(self, offset, bufs, *, user_data=None):
        """Enqueue a vectored read into the buffers of ``bufs``."""
        return self._enqueue(READ, offset, bufs, 0, 0, user_data, True, None, False)

    def writev(self, offset, bufs, *, user_data=None, bint fua=False):
        """Enqueue a vectored write of the buffers of ``bufs``."""
        return self._enqueue(WRITE, offset, bufs, 0, REQ_FUA if fua else 0, user_data,
                             True, None, False)

    def write_zeroes(self, offset, length, *, user_data=None, bint fua=False,
                     bint may_unmap=True, bint no_fallback=False):
        """Enqueue a write-zeroes request of ``length`` bytes at ``offset``."""
        return self._enqueue(WRITE_ZEROES, offset, None, as_u64(length, "length"),
                             zero_flags(fua, may_unmap, no_fallback), user_data,
                             False, None, False)

    def discard(self, offset, length, *, user_data=None):
        """Enqueue a discard request of ``length`` bytes at ``offset``."""
        return self._enqueue(DISCARD, offset, None, as_u64(length, "length"), 0,
                             user_data, False, None, False)

    def flush(self, *, user_data=None):
        """Enqueue a flush request."""
        return self._enqueue(FLUSH, 0, None, 0, 0, user_data, False, None, False)

    def submit(self):
        """Submit enqueued requests without waiting.  Completions that are
        already there (cached reads complete during submission) are kept for
        the next ``wait()`` or ``completions()``."""
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            self.drive(0, 0.0, None)
        finally:
            queue_leave(self, slots)

    def wait(self, min=1, max=None, timeout=None):
        """Submit, then wait for at least ``min`` completions; return up to
        ``max`` of them as ``Completion`` objects.  The GIL is released while
        waiting; Ctrl-C interrupts.  ``timeout`` (seconds) raises TimeoutError,
        leaving requests in flight and tracked."""
        cdef Py_ssize_t nmin = as_index(min, "min")
        if max is not None:
            max = as_index(max, "max")
        if nmin < 0:
            raise ValueError("min must be >= 0")
        if max is not None and max < nmin:
            raise ValueError(f"max ({max}) must be >= min ({nmin})")
        cdef double t = -1.0 if timeout is None else float(timeout)
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            have = len(self.ready)
            if nmin > have + self.unreaped:
                raise ValueError(f"min={nmin} but only {have + self.unreaped} request(s) "
                                 f"are in flight or completed")
            if nmin > have:
                self.drive(nmin - have, t, None)
            else:
                self.drive(0, 0.0, None)
            return self.take(max)
        finally:
            queue_leave(self, slots)

    def completions(self, max=None):
        """Submit what is enqueued and return the completions available now
        (up to ``max``), without waiting."""
        if max is not None:
            max = as_index(max, "max")
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            self.drive(0, 0.0, None)
            return self.take(max)
        finally:
            queue_leave(self, slots)

    # ---- futures: blkio.aio's per-request path ----------------------------
    # One call each way per request, no Python frame in between: the
    # interpreter's frames were most of the per-request cost of the asyncio
    # front (its await is asyncio's own, which no binding can make cheaper).

    def enqueue_future(self, int op, offset, buf, unsigned int flags, future):
        """Enqueue a read (``op`` READ) into or a write (WRITE) of one buffer
        with ``future`` as its ``user_data``, for ``resolve_futures()``.
        Returns the length; None, enqueueing nothing, when the request is
        longer than the device's ``large_io_chunk`` (the caller pipelines it);
        minus the bytes needed when the bounce pool has no room now (as
        ``enqueue(..., nowait=True)``)."""
        if op != READ and op != WRITE:
            raise ValueError(f"enqueue_future takes a read or a write, not op {op!r}")
        cdef uint64_t off = as_u64(offset, "offset")
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            return self.enqueue_request(op, off, buf, False, flags, future, 0, None, True,
                                        self.handle.lim.io_chunk)
        finally:
            queue_leave(self, slots)

    def resolve_futures(self):
        """Submit, reap what is done, and set each successful read's or
        write's ``user_data`` future's result to its length (unless the
        future is done already: its await was cancelled).  Returns the other
        completions (failures, other kinds of request) for the caller."""
        global _Future, _future_done, _future_set_result
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            self.drive(0, 0.0, None)
        finally:
            queue_leave(self, slots)
        cdef list ready = self.ready, rest = []
        cdef Completion c
        cdef Py_ssize_t i = 0, n = len(ready)
        self.ready = []
        if _Future is None:
            from asyncio import Future as _Future
            _future_done = _Future.done
            _future_set_result = _Future.set_result
        try:
            while i < n:
                c = <Completion>ready[i]
                i += 1
                if c.ret >= 0 and (c.op == READ or c.op == WRITE):
                    fut = c.user_data
                    if type(fut) is _Future:
                        # asyncio's own future: its methods, looked up once
                        # (about 250 instructions a request less)
                        if _future_done(fut) is False:
                            _future_set_result(fut, c.length)
                    elif not fut.done():
                        fut.set_result(c.length)
                else:
                    rest.append(c)
        except BaseException:
            # Not a future after all, or a closed loop: the completion that
            # failed and those after it stay ready (for completions()).
            self.ready = rest + ready[i - 1:] + self.ready
            raise
        return rest

    def poll(self, max=None):
        """Deprecated alias of ``completions()`` (``poll`` also names
        libblkio's poll queues and busy-polling)."""
        warnings.warn("Queue.poll() is deprecated; use Queue.completions()",
                      DeprecationWarning, stacklevel=2)
        return self.completions(max)

    cdef list take(self, object max):
        if max is None or max >= len(self.ready):
            out = self.ready
            self.ready = []
        else:
            out = self.ready[:max]
            del self.ready[:max]
        return out

    # ---- batch API: no Python object per request -------------------------

    cdef int _ensure_batch(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap = self.batch_cap, i, j
        if self.batch_ready + need <= cap:
            return 0
        cdef Py_ssize_t newcap = max(2 * cap, self.batch_ready + need, 256)
        cdef int64_t *tags = <int64_t *>malloc(newcap * sizeof(int64_t))
        cdef int *rets = <int *>malloc(newcap * sizeof(int))
        if tags == NULL or rets == NULL:
            free(tags)
            free(rets)
            raise MemoryError()
        for i in range(self.batch_ready):
            j = (self.batch_head + i) % cap
            tags[i] = self.batch_tags[j]
            rets[i] = self.batch_rets[j]
        free(self.batch_tags)
        free(self.batch_rets)
        self.batch_tags = tags
        self.batch_rets = rets
        self.batch_cap = newcap
        self.batch_head = 0
        return 0

    cdef int _batch_view(self, object obj, Py_buffer *view, int ndim, const char *kinds,
                         bint writable, str what) except -1:
        """A C-contiguous buffer of ``ndim`` dimensions and format in ``kinds``."""
        if _batch_array(obj, view, ndim, kinds[0], writable):
            return 0
        cdef int flags = PyBUF_FORMAT | PyBUF_C_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0)
        try:
            PyObject_GetBuffer(obj, view, flags)
        except (BufferError, ValueError, TypeError) as e:
            raise TypeError(f"{what}: {e}") from None
        cdef const char *f = view.format
        if f == NULL:
            f = "B"
        while f[0] == b'@' or f[0] == b'=' or f[0] == b'<':
            f += 1
        cdef bint ok = view.ndim == ndim and f[0] != 0 and f[1] == 0
        if ok:
            ok = False
            while kinds[0] != 0:
                if kinds[0] == f[0]:
                    ok = True
                kinds += 1
        if not ok:
            PyBuffer_Release(view)
            raise TypeError(f"{what} has the wrong dtype or shape")
        return 0

    cdef object _submit_batch(self, int op, offsets, buffers, user_data, unsigned int flags,
                              region, uint64_t blocksize):
        cdef DeviceHandle h = self.handle
        check_request(h, op, 0, 0)      # started, and writable for writes
        cdef Py_buffer ob, bb, tb, xb
        cdef bint has_tags = user_data is not None
        cdef bint indexed = region is not None      # buffers = offsets into region
        cdef Py_ssize_t n, nbufs, i, bad = -1
        cdef uint64_t bs, cap = h.lim.capacity, ra = h.lim.request_alignment
        cdef uint64_t ba = h.lim.buf_alignment, rlen
        cdef uint64_t *offs
        cdef uint64_t *boffs = NULL
        cdef int64_t *tags = NULL
        cdef int problem = 0
        self._batch_view(offsets, &ob, 1, b"LQ", False, "offsets (a 1-D uint64 array)")
        try:
            # whole literals, not a concatenation: this runs on every call
            if indexed:
                self._batch_view(region, &bb, 1, b"B", op == READ,
                                 "region (a C-contiguous 1-D uint8 array, writable for reads)"
                                 if op == READ else "region (a C-contiguous 1-D uint8 array)")
            else:
                self._batch_view(buffers, &bb, 2, b"B", op == READ,
                                 "buffers (a C-contiguous uint8 array of shape (n, blocksize), "
                                 "writable for reads)" if op == READ else
                                 "buffers (a C-contiguous uint8 array of shape (n, blocksize))")
            try:
                if has_tags:
                    self._batch_view(user_data, &tb, 1, b"lq", False, "user_data (a 1-D int64 array)")
                try:
                    if indexed:
                        self._batch_view(buffers, &xb, 1, b"LQ", False,
                                         "buffers (with region: a 1-D uint64 array of offsets into it)")
                    try:
                        n = ob.shape[0]
                        if indexed:
                            nbufs = xb.shape[0]
                            bs = blocksize
                            boffs = <uint64_t *>xb.buf
                        else:
                            nbufs = bb.shape[0]
                            bs = <uint64_t>bb.shape[1]
                            if blocksize and blocksize != bs:
                                raise ValueError(f"blocksize={blocksize} but buffers have {bs} columns")
                        if nbufs != n:
                            raise ValueError(f"{n} offsets but {nbufs} buffers")
                        if has_tags and tb.shape[0] != n:
                            raise ValueError(f"{n} offsets but {tb.shape[0]} user_data tags")
                        if n == 0:
                            return 0
                        if self.slots and self.in_libblkio + n > self.slots:
                            raise ValueError(
                                f"batch of {n} requests does not fit: {self.in_libblkio} in flight, "
                                f"queue holds {self.slots} (raise num_entries / queue_size at open)")
                        offs = <uint64_t *>ob.buf
                        if has_tags:
                            tags = <int64_t *>tb.buf
                        rlen = <uint64_t>bb.len
                        # Whole-batch validation before anything is enqueued.
                        if bs == 0 or bs % ra:
                            raise ValueError(f"blocksize {bs} must be a positive multiple of "
                                             f"request-alignment ({ra})")
                        if h.lim.max_transfer and bs > h.lim.max_transfer:
                            raise ValueError(f"blocksize {bs} exceeds max-transfer ({h.lim.max_transfer})")
                        if <uintptr_t>bb.buf % ba or bs % ba:
                            raise ValueError(f"buffers must be aligned to buf-alignment ({ba})")
                        if not h.in_range(<uintptr_t>bb.buf, <size_t>bb.len):
                            raise ValueError("buffers must lie in memory from Device.alloc() or "
                                             "Device.register() (the batch API never copies)")
                        # Without the GIL only for big batches: for a few dozen
                        # requests the hand-off would cost more than the loop,
                        # and with threads it lets another one in mid-call.
                        if n > 4096:
                            with nogil:
                                problem = batch_problem(&h.lim, offs, boffs, n, bs, rlen, &bad)
                        else:
                            problem = batch_problem(&h.lim, offs, boffs, n, bs, rlen, &bad)
                        if problem == MISALIGNED:
                            raise ValueError(f"offsets[{bad}] = {offs[bad]} is not a multiple of "
                                             f"request-alignment ({ra})")
                        if problem == PAST_END:
                            raise ValueError(f"offsets[{bad}] = {offs[bad]} + {bs} passes the device "
                                             f"capacity ({cap})")
                        if problem == 4:
                            raise ValueError(f"buffers[{bad}] = {boffs[bad]} + {bs} passes the end "
                                             f"of region ({rlen} bytes)")
                        if problem == 5:
                            raise ValueError(f"buffers[{bad}] = {boffs[bad]} is not aligned to "
                                             f"buf-alignment ({ba})")
                        if op == WRITE and h.lim.zone_size:
                            for i in range(n):
                                check_zone_write(h, op, offs[i], bs)
                        self._ensure_batch(n + self.unreaped)
                        self._ensure_slots(n)
                        self._enqueue_batch(op, offs, tags, <char *>bb.buf, boffs, bs, n, flags)
                        return n
                    finally:
                        if indexed:
                            PyBuffer_Release(&xb)
                finally:
                    if has_tags:
                        PyBuffer_Release(&tb)
            finally:
                # The memory is the device's (alloc/register) and stays alive
                # until close, which drains requests first.
                PyBuffer_Release(&bb)
        finally:
            PyBuffer_Release(&ob)

    cdef int _enqueue_batch(self, int op, uint64_t *offs, int64_t *tags, char *base,
                            uint64_t *boffs, uint64_t bs, Py_ssize_t n, unsigned int flags) except -1:
        """Enqueue n requests and submit them in one GIL-free section.  Each
        takes a batch slot (its tag and memory, for reap and unregister);
        libblkio's user_data is the slot index with TAG_BIT set."""
        cdef Py_ssize_t i, s
        cdef lb.blkioq *q = self.q
        cdef int got
        cdef Py_ssize_t stack_idx[64]
        cdef Py_ssize_t *idx = &stack_idx[0]
        cdef BatchSlot *slot
        cdef lb.blkio_completion comps[NCOMPS]
        if n > 64:
            idx = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
            if idx == NULL:
                raise MemoryError()
        # Slots are taken with the GIL held (dispatch frees them with it held);
        # the GIL-free section below only reads this call's own index list.
        for i in range(n):
            s = self.slots_free
            slot = &self.slots_table[s]
            self.slots_free = slot.next
            slot.tag = tags[i] if tags != NULL else i
            slot.addr = <uintptr_t>(base + (boffs[i] if boffs != NULL else <uint64_t>i * bs))
            slot.length = bs
            idx[i] = s
        self.slots_nfree -= n
        with nogil:
            pthread_mutex_lock(&self.lock)
            for i in range(n):
                if op == READ:
                    lb.blkioq_read(q, offs[i], <void *>(base + (boffs[i] if boffs != NULL else <uint64_t>i * bs)),
                                   bs, <void *>((<uintptr_t>idx[i] << 1) | TAG_BIT), flags)
                else:
                    lb.blkioq_write(q, offs[i], <void *>(base + (boffs[i] if boffs != NULL else <uint64_t>i * bs)),
                                    bs, <void *>((<uintptr_t>idx[i] << 1) | TAG_BIT), flags)
            self.in_libblkio += n
            got = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
            if got > 0:
                self.in_libblkio -= got
            pthread_mutex_unlock(&self.lock)
        if idx != &stack_idx[0]:
            free(idx)
        self.unreaped += n
        self.batch_unreaped += n
        self.handle.n_requests += n
        self.n_requests += n
        if got < 0:
            raise libblkio_error(got, "blkioq_do_io")
        self.dispatch(comps, got)
        return 0

    def submit_reads(self, offsets, buffers, *, user_data=None, region=None,
                     uint64_t blocksize=0):
        """Enqueue and submit n reads in one GIL-free call.

        ``offsets``: uint64[n] device offsets; ``buffers``: a C-contiguous
        uint8[n, blocksize] view of memory from ``Device.alloc`` or
        ``Device.register`` -- or, with ``region`` (such memory, 1-D uint8)
        and ``blocksize``, a uint64[n] of byte offsets into ``region``;
        ``user_data``: optional int64[n] tags (default 0..n-1).  The whole
        batch is validated before anything is enqueued; no Python object is
        made per request.  Returns n."""
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            return self._submit_batch(READ, offsets, buffers, user_data, 0, region, blocksize)
        finally:
            queue_leave(self, slots)

    def submit_writes(self, offsets, buffers, *, bint fua=False, user_data=None, region=None,
                      uint64_t blocksize=0):
        """Like ``submit_reads``, for writes."""
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            return self._submit_batch(WRITE, offsets, buffers, user_data,
                                      REQ_FUA if fua else 0, region, blocksize)
        finally:
            queue_leave(self, slots)

    cdef int _reap_layout(self, object out) except -1:
        """Check ``out`` once and remember where its fields live."""
        if not isinstance(out, np.ndarray) or out.ndim != 1:
            raise TypeError("out must be a 1-D numpy structured array")
        fields = out.dtype.fields
        if (fields is None or "user_data" not in fields or "ret" not in fields
                or fields["user_data"][0] != np.int64 or fields["ret"][0] != np.int32):
            raise TypeError("out needs fields user_data (int64) and ret (int32)")
        if not out.flags.writeable:
            raise ValueError("out must be writable")
        self.reap_out = out        # our reference keeps its memory in place
        self.reap_base = <char *><uintptr_t>out.ctypes.data
        self.reap_stride = out.strides[0]
        self.reap_len = out.shape[0]
        self.reap_off_ud = fields["user_data"][1]
        self.reap_off_ret = fields["ret"][1]
        return 0

    def reap(self, out, min=0, timeout=None):
        """Fill ``out`` (a structured array with int64 ``user_data`` and int32
        ``ret`` fields) with completions of batch requests, waiting for at
        least ``min`` (``timeout`` seconds: TimeoutError).  Returns the count."""
        cdef Py_ssize_t nmin = as_index(min, "min")
        if nmin < 0:
            raise ValueError("min must be >= 0")
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            return self._reap(out, nmin, timeout)
        finally:
            queue_leave(self, slots)

    cdef object _reap(self, out, Py_ssize_t min, timeout):
        if out is not self.reap_out:
            self._reap_layout(out)
        cdef Py_ssize_t cap = self.reap_len
        if min > cap:
            raise ValueError(f"min={min} exceeds the size of out ({cap})")
        if min > self.batch_ready + self.batch_unreaped:
            raise ValueError(f"min={min} but only {self.batch_ready + self.batch_unreaped} "
                             f"batch request(s) are in flight or completed")
        cdef double t = -1.0 if timeout is None else float(timeout)
        if self.batch_ready < min:
            while self.batch_ready < min:
                self.drive(min - <int>self.batch_ready, t, None)
        elif self.batch_ready == 0:
            self.drive(0, 0.0, None)
        cdef Py_ssize_t k = self.batch_ready if self.batch_ready < cap else cap
        cdef Py_ssize_t i, j = self.batch_head
        cdef char *row = self.reap_base
        for i in range(k):
            # memcpy: fields of a packed structured dtype may be misaligned
            memcpy(row + self.reap_off_ud, &self.batch_tags[j], sizeof(int64_t))
            memcpy(row + self.reap_off_ret, &self.batch_rets[j], sizeof(int))
            if self.batch_rets[j] < 0:
                self.batch_failed += 1
            row += self.reap_stride
            j += 1
            if j == self.batch_cap:
                j = 0
        self.batch_head = j
        self.batch_ready -= k
        return k

    @property
    def failed(self) -> int:
        """Batch completions reaped with ret < 0 so far (check ``ret`` in
        ``out`` for which)."""
        return self.batch_failed


    # ---- event-driven mode -----------------------------------------------

    @property
    def completion_fd(self) -> int:
        """The queue's completion fd (-1 on poll queues).  Enable it with
        ``completion_fd_enabled = True`` before waiting on it; reset it with
        ``reset_completion_fd()``, then call ``completions()``."""
        if self.is_poll_queue:
            return -1
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            return lb.blkioq_get_completion_fd(self.q)
        finally:
            queue_leave(self, slots)

    def reset_completion_fd(self, int fd=-1):
        """Reset the completion fd (read its 8-byte count) while holding the
        queue's lock: libblkio's virtio drivers read the same eventfd inside
        ``blkioq_do_io`` and fail with EAGAIN when another thread drained it
        first.  ``fd``: a dup of ``completion_fd`` to read instead (one that
        outlives the device, as asyncio keeps).  Returns True if it was set."""
        if fd < 0:
            fd = self.completion_fd
            if fd < 0:
                raise ValueError("poll queues have no completion fd")
        return self.reset_fd(fd)

    cdef bint reset_fd(self, int fd) noexcept:
        cdef uint64_t counter
        cdef ssize_t r
        with nogil:
            pthread_mutex_lock(&self.lock)
            r = read(fd, &counter, 8)       # non-blocking: libblkio made it so
            pthread_mutex_unlock(&self.lock)
        return r == 8

    @property
    def completion_fd_enabled(self) -> bool:
        """Whether the driver signals completions on ``completion_fd``.
        libblkio (after 1.3) leaves it disabled by default."""
        if self.is_poll_queue:
            raise ValueError("poll queues have no completion fd")
        return self.fd_enabled

    @completion_fd_enabled.setter
    def completion_fd_enabled(self, bint value):
        if self.is_poll_queue:
            raise ValueError("poll queues have no completion fd")
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            self._set_fd_enabled(value)
        finally:
            queue_leave(self, slots)

    @property
    def in_flight(self) -> int:
        """Requests submitted or enqueued and not yet reaped."""
        return self.unreaped

    @property
    def requests(self) -> int:
        """Requests handed to libblkio through this queue so far."""
        return self.n_requests

    @property
    def removed(self) -> bool:
        """True once the queue is being removed, or its device closed."""
        return self.removed or self.removing or self.q == NULL or self.handle.closing

    @property
    def device(self):
        """The Device this queue belongs to."""
        return self._device

    def __repr__(self):
        kind = "poll queue" if self.is_poll_queue else "queue"
        return f"<blkio.Queue {kind} {self.index} in_flight={self.unreaped}>"

    # ---- zoned devices (the request path is the one above: enqueue_one,
    # dispatch; _enqueue_zone hands the request to libblkio) --------------

    cdef Completion zone_completion(self, int op, uint64_t offset, object zones,
                                    object user_data, bint internal, object bounce,
                                    bint nowait):
        """Check one zone request and make its Completion (inside the queue's
        guard).  A report's zone array goes where the driver can use it, or
        through the bounce pool like a read (copied back on completion);
        with ``nowait``, None when the pool has no room right now."""
        check_zone_request(self.handle, op, offset)
        cdef Completion c
        cdef HeldBuffers views
        cdef uint64_t nbytes, nzones
        if op != REPORT_ZONES:
            c = Completion.__new__(Completion)
            c.op = op
            c.offset = offset
            c.internal = internal
            c.user_data = user_data
            return c
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
        c = prepare(self, READ, offset, nbytes, views, None, views.iov, views.n, 0, user_data,
                    internal, bounce, nowait)
        if c is not None:
            c.op = REPORT_ZONES
            if c.bounce_start >= 0:
                # The device fills in only ret records and the whole bounce
                # buffer is copied back: start it as the caller's buffer.
                _gather(c.user_iov, c.user_iovcnt, <char *>c.iov1.iov_base)
        return c

    def enqueue_zone(self, op, offset=0, zones=None, *, user_data=None, bounce=None,
                     bint nowait=False):
        """Enqueue one zone request without waiting for it: ``op`` is one of
        ``Op.REPORT_ZONES`` .. ``Op.RESET_ALL_ZONES``; ``offset`` (bytes) a
        zone start (a report rounds it down to its zone's start); ``zones``
        the report's buffer.  Checked before anything is enqueued: a device
        that is not zoned, an offset that is not a zone start or past the
        end, a read-only device (ValueError / ReadOnlyError).

        Returns the number of zones a report asks for (0 for the others);
        with ``nowait=True`` (reports only) and no room in the bounce pool,
        nothing is enqueued and the return value is minus the bytes needed,
        as for ``enqueue``."""
        cdef int code = as_index(op, "op")
        if not REPORT_ZONES <= code <= RESET_ALL_ZONES:
            raise ValueError(f"{op!r} is not a zone request (Op.REPORT_ZONES .. Op.RESET_ALL_ZONES)")
        cdef uint64_t off = as_u64(offset, "offset")
        cdef Completion c
        cdef Py_ssize_t slots = queue_enter(self)
        try:
            c = self.zone_completion(code, off, zones, user_data, False, bounce, nowait)
            if c is None:
                return -<int64_t>(memoryview(zones).nbytes)
            self.enqueue_one(c, False)
            return c.length // sizeof(lb.blkio_zone)
        finally:
            queue_leave(self, slots)

    def report_zones(self, offset, zones, *, user_data=None):
        """Enqueue a report of the zones from the one holding ``offset``
        (bytes; libblkio rounds it down to that zone's start) into ``zones``,
        a writable buffer of ``blkio.ZONE_DTYPE`` records (64 bytes, one per
        zone wanted).  The buffer is held until the completion is reaped; its
        ``ret`` is the number of zones filled in (fewer near the end of the
        device).  Returns the number of zones asked for."""
        return self.enqueue_zone(REPORT_ZONES, offset, zones, user_data=user_data)

    def open_zone(self, offset, *, user_data=None):
        """Enqueue an explicit open of the zone starting at ``offset`` (bytes)."""
        return self.enqueue_zone(OPEN_ZONE, offset, user_data=user_data)

    def close_zone(self, offset, *, user_data=None):
        """Enqueue a close of the open zone starting at ``offset`` (bytes)."""
        return self.enqueue_zone(CLOSE_ZONE, offset, user_data=user_data)

    def finish_zone(self, offset, *, user_data=None):
        """Enqueue a finish (make FULL) of the zone starting at ``offset`` (bytes)."""
        return self.enqueue_zone(FINISH_ZONE, offset, user_data=user_data)

    def reset_zone(self, offset, *, user_data=None):
        """Enqueue a reset (make EMPTY, write pointer to its start) of the
        zone starting at ``offset`` (bytes)."""
        return self.enqueue_zone(RESET_ZONE, offset, user_data=user_data)

    def open_all_zones(self, *, user_data=None):
        """Enqueue an open of every CLOSED zone (the device's "select all")."""
        return self.enqueue_zone(OPEN_ALL_ZONES, user_data=user_data)

    def close_all_zones(self, *, user_data=None):
        """Enqueue a close of every open zone."""
        return self.enqueue_zone(CLOSE_ALL_ZONES, user_data=user_data)

    def finish_all_zones(self, *, user_data=None):
        """Enqueue a finish of every open or closed zone."""
        return self.enqueue_zone(FINISH_ALL_ZONES, user_data=user_data)

    def reset_all_zones(self, *, user_data=None):
        """Enqueue a reset of every open, closed or full zone."""
        return self.enqueue_zone(RESET_ALL_ZONES, user_data=user_data)

    # ---- for event-driven batch reaping (blkio.aio) -----------------------

    @property
    def batch_ready(self) -> int:
        """Batch completions already collected from libblkio and waiting for
        ``reap()`` (which then copies them without calling into libblkio).
        An event loop checks it after ``completions()``: that call collects
        batch completions too, and no completion-fd event will announce them."""
        return self.batch_ready


# --------------------------------------------------------------------------
# The request path, shared by the blocking, queue, batch and asyncio APIs

cdef enum:
    MISALIGNED = 1
    PAST_END = 2


cdef int batch_problem(HotLimits *lim, uint64_t *offs, uint64_t *boffs, Py_ssize_t n,
                       uint64_t bs, uint64_t rlen, Py_ssize_t *bad) noexcept nogil:
    """The first problem of a batch (range_problem's codes; 4: a buffer
    offset past the region's end, 5: one not aligned), its index in ``bad``."""
    cdef Py_ssize_t i
    cdef int problem
    for i in range(n):
        problem = range_problem(lim, offs[i], bs)
        if problem == 0 and boffs != NULL:
            if boffs[i] > rlen or bs > rlen - boffs[i]:
                problem = 4
            elif boffs[i] & lim.buf_mask:
                problem = 5
        if problem:
            bad[0] = i
            return problem
    return 0


cdef inline int range_problem(HotLimits *lim, uint64_t offset, uint64_t length) noexcept nogil:
    """0, MISALIGNED or PAST_END: the check every request passes (the batch
    path runs it on each request of a batch, in ``batch_problem``)."""
    if (offset | length) & lim.request_mask:
        return MISALIGNED
    if offset > lim.capacity or length > lim.capacity - offset:
        return PAST_END
    return 0


cdef int check_request(DeviceHandle h, int op, uint64_t offset, uint64_t length) except -1:
    """The one request check: the device is started, writable for anything
    but reads and flushes, and [offset, offset+length) is aligned and inside
    the device.  A ValueError (or ReadOnlyError) names what is wrong."""
    if h.state != ST_STARTED:
        h.ensure_started()
    if op != READ and op != FLUSH and h.lim.read_only:
        raise ReadOnlyError(EBADF, f"{OP_NAMES[op]} refused: device is read-only ({h.driver})")
    if op == FLUSH:
        return 0
    cdef int problem = range_problem(&h.lim, offset, length)
    if problem == MISALIGNED:
        raise ValueError(f"{OP_NAMES[op]}: offset {offset} and length {length} must be multiples "
                         f"of request-alignment ({h.lim.request_alignment}) on {h.driver}")
    if problem == PAST_END:
        raise ValueError(f"{OP_NAMES[op]}: {length} bytes at offset {offset} pass the end of the "
                         f"device (capacity {h.lim.capacity})")
    if h.lim.zone_size and (op == WRITE or op == WRITE_ZEROES):
        check_zone_write(h, op, offset, length)
    return 0


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
        if h.lim.needs_mem_regions and not h.in_range(a, iov[i].iov_len):
            return False
    return True


cdef Completion prepare(Queue q, int op, uint64_t offset, uint64_t length, HeldBuffers views,
                        object array, iovec *iov, int iovcnt, unsigned int flags,
                        object user_data, bint internal, object bounce, bint nowait):
    """One request: the caller's memory where the driver can use it, else a
    bounce buffer from the pool (acquired here, FIFO, reaping ``q`` while
    waiting; with ``nowait``, None when the pool cannot serve it at once;
    ``bounce``: space the caller already acquired).  The caller's memory is
    held by ``views``, or, for one numpy array read without an export
    (``_array_memory``), by ``array``: its one segment ``iov[0]`` is copied
    into the Completion, which keeps the array until the request is reaped."""
    cdef Completion c = Completion.__new__(Completion)
    c.op = op
    c.offset = offset
    c.length = length
    c.flags = flags
    c.internal = internal
    c.user_data = user_data
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
    cdef BouncePool pool
    if direct_ok(q.handle, iov, iovcnt):
        c.iov = iov
        c.iovcnt = iovcnt
        return c
    pool = q.pool
    if bounce is not None:
        start = pool.start_of(bounce, length)   # acquired by the caller (asyncio)
    elif nowait:
        start = pool.try_acquire(length)
        if start < 0:
            return None
    else:
        # try first: the bound method for the wait is made only when waiting
        start = pool.try_acquire(length)
        if start < 0:
            start = pool.acquire_blocking(length, -1.0, q._drive_slice)
    c.pool = pool
    c.bounce_buffer = pool.buffer
    c.bounce_start = start
    c.iov1.iov_base = pool.buffer.addr + <size_t>start * pool.granule
    c.iov1.iov_len = length
    c.iov = &c.iov1
    c.iovcnt = 1
    if op == WRITE:
        _gather(iov, iovcnt, <char *>c.iov1.iov_base)
    return c


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


cdef object blocking_io(DeviceHandle h, Queue q, int op, uint64_t offset, uint64_t length,
                        HeldBuffers views, unsigned int flags, uint64_t chunk=0, int depth=0):
    """The blocking path (inside the device's guard): check, cut into
    pieces, bounce where needed, submit on ``q`` and wait (GIL released,
    Ctrl-C honoured).  Returns the byte count.  ``chunk``/``depth``: the
    caller's large-I/O pipeline (0: the device's defaults)."""
    check_request(h, op, offset, length)
    if q is None:
        raise ValueError(f"{h.driver} device has no queue left for blocking I/O "
                         f"(num_queues=0, or its queues were removed)")
    cdef Py_ssize_t slot = queue_use(q)
    try:
        return _blocking_pieces(h, q, op, offset, length, views, flags, chunk, depth)
    finally:
        queue_unuse(q, slot)


# Once a blocking call is interrupted (Ctrl-C, a closing device), how long it
# waits for its other pieces in flight before leaving them to the queue (their
# Completions hold the caller's buffers, so no memory is freed under them).
cdef double SETTLE_TIMEOUT = 0.25


cdef object _blocking_pieces(DeviceHandle h, Queue q, int op, uint64_t offset, uint64_t length,
                             HeldBuffers views, unsigned int flags, uint64_t chunk, int depth):
    """Submit ``length`` bytes as pieces and wait for all of them.  Pieces
    are at most max-transfer (or the op's limit) and, for bounced memory, the
    bounce chunk; a read or write longer than ``chunk`` is pipelined: pieces
    of ``chunk`` bytes, ``depth`` of them in flight, refilled as the oldest
    completes.  The first failed piece (in offset order) is raised once every
    piece in flight has finished; an interruption waits for them, bounded."""
    cdef uint64_t limit = split_limit(h, op), pos = 0, piece
    cdef iovec *sub
    cdef int subcnt
    cdef Completion c, failed = None
    cdef bint data = op == READ or op == WRITE
    if length == 0 and op != FLUSH:
        return 0
    if data and length > (chunk or h.lim.io_chunk):
        if chunk == 0:
            chunk = h.lim.io_chunk
        if limit == 0 or chunk < limit:
            limit = chunk
        depth = pipeline_depth(h, op, depth or h.lim.io_depth)
        if q.slots and depth > q.slots:
            depth = <int>q.slots
    else:
        depth = 1
    cdef list inflight = []
    cdef Py_ssize_t head = 0          # inflight[head:] are not yet settled
    try:
        while True:
            while (failed is None and len(inflight) - head < depth
                   and (pos < length or (length == 0 and not inflight))):
                piece = length - pos
                if limit and piece > limit:
                    piece = limit
                if data:
                    if pos == 0 and piece == length:
                        sub = views.iov
                        subcnt = views.n
                    else:
                        subcnt = _slice_iov(views.iov, views.n, pos, piece, &sub)
                    if not direct_ok(h, sub, subcnt) and piece > h.lim.bounce_chunk:
                        # Bounced pieces are cut to the chunk size: re-slice.
                        if sub != views.iov:
                            free(sub)
                        piece = h.lim.bounce_chunk - h.lim.bounce_chunk % h.lim.request_alignment
                        subcnt = _slice_iov(views.iov, views.n, pos, piece, &sub)
                    c = prepare(q, op, offset + pos, piece, views, None, sub, subcnt, flags,
                                None, True, None, False)
                else:
                    c = prepare(q, op, offset + pos, piece, None, None, NULL, 0, flags, None,
                                True, None, False)
                if piece != length:
                    h.n_split += 1
                inflight.append(c)
                pos += piece
                q.enqueue_one(c, True)
            if head == len(inflight):
                break
            c = <Completion>inflight[head]
            if not c.done:
                q.drive(0, -1.0, c)
            while head < len(inflight) and (<Completion>inflight[head]).done:
                c = <Completion>inflight[head]
                head += 1
                if c.ret < 0 and failed is None:
                    failed = c
    except BaseException:
        _settle(q, inflight, head)
        raise
    if failed is not None:
        if op == DISCARD and (failed.ret == -ENOTSUP or failed.ret == -EOPNOTSUPP):
            return 0    # discard is advisory
        raise request_error(failed.ret, failed._error_msg,
                            f"{OP_NAMES[op]} of {failed.length} bytes at offset {failed.offset}",
                            h.lim.read_only)
    return length


cdef int pipeline_depth(DeviceHandle h, int op, int depth) noexcept:
    """Chunks of a large ``op`` in flight at once: ``depth``, except for
    writes to a host-managed zoned device, which must reach each zone in
    order (chunks in flight together may be reordered): one at a time."""
    if op == WRITE and h.lim.zoned == 2:
        return 1
    return depth


cdef void _settle(Queue q, list inflight, Py_ssize_t head):
    """After an interruption: wait (bounded) for this call's pieces still in
    flight, so that normally none outlives the call; the rest keep their
    buffers through their Completions until the queue reaps them."""
    cdef Completion c
    cdef double deadline = time.monotonic() + SETTLE_TIMEOUT, left
    for i in range(head, len(inflight)):
        c = <Completion>inflight[i]
        left = deadline - time.monotonic()
        if c.done:
            continue
        if left <= 0:
            return
        try:
            q.drive(0, left, c)
        except BaseException:
            return      # a second Ctrl-C, a closing device: leave them held


cdef object blocking_one(DeviceHandle h, Queue q, int op, uint64_t offset, object buf,
                         unsigned int flags, uint64_t chunk=0, int depth=0):
    """One buffer, blocking (inside the device's guard): the hot path.  When
    the request needs no split and no bounce, it goes straight from the
    caller's buffer with a recycled Completion; anything else takes the
    general path (``blocking_io``)."""
    cdef HeldBuffers v
    if q is None:
        v = hold_buffers(buf, op == READ, True)
        return blocking_io(h, q, op, offset, v.total, v, flags, chunk, depth)
    cdef Py_ssize_t slot = queue_use(q)
    # the guard has just looked up this thread's id: reuse it
    cdef unsigned long tid = (q.guard.tid[slot] if slot < GUARD_THREADS
                              else PyThread_get_thread_ident())
    try:
        return _blocking_one_on(h, q, op, offset, buf, flags, chunk, depth, tid)
    finally:
        queue_unuse(q, slot)


cdef object _blocking_one_on(DeviceHandle h, Queue q, int op, uint64_t offset, object buf,
                             unsigned int flags, uint64_t chunk, int depth, unsigned long tid):
    cdef Py_buffer view
    cdef uint64_t length
    cdef HeldBuffers v
    cdef iovec one
    cdef bint exported = False
    if _array_memory(buf, op == READ, &one):
        # No export: the call's reference keeps the array alive, and a
        # request left in flight by an exception keeps one of its own
        # (Completion.array).
        length = <uint64_t>one.iov_len
    else:
        if _get_buffer_or_minus_one(buf, &view, _VIEW_FLAGS[op == READ]) < 0:
            PyErr_Clear()
            v = hold_buffers(buf, op == READ, True)     # raises the clear error
            check_request(h, op, offset, v.total)
            return _blocking_pieces(h, q, op, offset, v.total, v, flags, chunk, depth)
        exported = True
        one.iov_base = view.buf
        length = <uint64_t>view.len
    one.iov_len = <size_t>length
    if (h.state != ST_STARTED or length == 0 or range_problem(&h.lim, offset, length)
            or (h.lim.max_transfer and length > h.lim.max_transfer)
            or length > (chunk or h.lim.io_chunk)
            or (op != READ and h.lim.read_only) or not direct_ok(h, &one, 1)
            or (op == WRITE and h.lim.zone_size)):
        if exported:
            PyBuffer_Release(&view)
        v = hold_buffers(buf, op == READ, True)
        check_request(h, op, offset, v.total)
        return _blocking_pieces(h, q, op, offset, v.total, v, flags, chunk, depth)
    if tid != h.owner_thread:
        if h.owner_thread == 0:
            h.owner_thread = tid
        else:
            h.threaded = True    # from now on every submission releases the GIL
    cdef Completion c = q.spare
    if c is None:
        c = Completion.__new__(Completion)
        c.internal = True
    else:
        q.spare = None
    c.op = op
    c.offset = offset
    c.length = length
    c.flags = flags
    c.done = False
    c.ret = 0           # internal: ret_obj is never read
    c.iov1 = one
    c.iov = &c.iov1
    c.iovcnt = 1
    try:
        q.enqueue_one(c, True, True)
        if not c.done:
            q.drive(0, -1.0, c)
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
        raise request_error(c.ret, c._error_msg,
                            f"{OP_NAMES[op]} of {length} bytes at offset {offset}",
                            h.lim.read_only)
    if c._error_msg is not None:
        c._error_msg = None
    q.spare = c
    if length != q.spare_len or q.spare_len_obj is None:
        q.spare_len = length
        q.spare_len_obj = length
    return q.spare_len_obj


# --------------------------------------------------------------------------
# Zoned devices: zone types and states, the report's record layout, the
# checks made before a zone request or a write is submitted.

class ZoneType(enum.IntEnum):
    """``type`` of a reported zone (blkio.h's BLKIO_ZONE_TYPE_*)."""

    CONVENTIONAL = lb.BLKIO_ZONE_TYPE_CONVENTIONAL
    SEQWRITE_REQ = lb.BLKIO_ZONE_TYPE_SEQWRITE_REQ
    SEQWRITE_PREF = lb.BLKIO_ZONE_TYPE_SEQWRITE_PREF

    def __str__(self) -> str:
        return self.name.lower()


class ZoneState(enum.IntEnum):
    """``state`` of a reported zone (blkio.h's BLKIO_ZONE_STATE_*)."""

    EMPTY = lb.BLKIO_ZONE_STATE_EMPTY
    IMP_OPEN = lb.BLKIO_ZONE_STATE_IMP_OPEN
    EXP_OPEN = lb.BLKIO_ZONE_STATE_EXP_OPEN
    CLOSED = lb.BLKIO_ZONE_STATE_CLOSED
    READONLY = lb.BLKIO_ZONE_STATE_READONLY
    FULL = lb.BLKIO_ZONE_STATE_FULL
    OFFLINE = lb.BLKIO_ZONE_STATE_OFFLINE

    def __str__(self) -> str:
        return self.name.lower()


#: Zoned models by the value of libblkio's ``zoned`` property.
ZONED_MODELS = ("none", "host-aware", "host-managed")

cdef lb.blkio_zone _zone_layout

#: One reported zone: libblkio's struct blkio_zone as a numpy record.
#: start, len, capacity and write_pointer are bytes; type is a ZoneType,
#: state a ZoneState; reset says a reset is recommended.
ZONE_DTYPE = np.dtype({
    "names": ["start", "len", "capacity", "write_pointer", "type", "state", "reset"],
    "formats": [np.uint64, np.uint64, np.uint64, np.uint64, np.uint8, np.uint8, np.bool_],
    "offsets": [<char *>&_zone_layout.start - <char *>&_zone_layout,
                <char *>&_zone_layout.len - <char *>&_zone_layout,
                <char *>&_zone_layout.capacity - <char *>&_zone_layout,
                <char *>&_zone_layout.write_pointer - <char *>&_zone_layout,
                <char *>&_zone_layout.zone_type - <char *>&_zone_layout,
                <char *>&_zone_layout.zone_state - <char *>&_zone_layout,
                <char *>&_zone_layout.reset - <char *>&_zone_layout],
    "itemsize": sizeof(lb.blkio_zone),
})


cdef void _enqueue_zone(lb.blkioq *q, Completion c, void *ud) noexcept nogil:
    """Hand one zone request to libblkio (the queue's lock held)."""
    cdef int op = c.op
    if op == REPORT_ZONES:
        lb.blkioq_report_zones(q, c.offset, <lb.blkio_zone *>c.iov[0].iov_base,
                               <uint32_t>(c.length // sizeof(lb.blkio_zone)), ud, 0)
    elif op == OPEN_ZONE:
        lb.blkioq_open_zone(q, c.offset, ud, 0)
    elif op == CLOSE_ZONE:
        lb.blkioq_close_zone(q, c.offset, ud, 0)
    elif op == FINISH_ZONE:
        lb.blkioq_finish_zone(q, c.offset, ud, 0)
    elif op == RESET_ZONE:
        lb.blkioq_reset_zone(q, c.offset, ud, 0)
    elif op == OPEN_ALL_ZONES:
        lb.blkioq_open_all_zones(q, ud, 0)
    elif op == CLOSE_ALL_ZONES:
        lb.blkioq_close_all_zones(q, ud, 0)
    elif op == FINISH_ALL_ZONES:
        lb.blkioq_finish_all_zones(q, ud, 0)
    else:
        lb.blkioq_reset_all_zones(q, ud, 0)


cdef int check_zone_request(DeviceHandle h, int op, uint64_t offset) except -1:
    """What blkio can check before a zone request (the device answers only
    EIO, or ENOTSUP for a zone start it does not like): a zoned, started
    device, writable unless reporting; a zone start inside the device."""
    if h.state != ST_STARTED:
        h.ensure_started()
    name = OP_NAMES[op]
    if not h.lim.zoned:
        raise ValueError(f"{name}: the {h.driver} device is not zoned (zoned model 'none'); "
                         f"zone requests need a zoned device, such as an NVMe ZNS namespace "
                         f"on nvme-io_uring")
    if op != REPORT_ZONES and h.lim.read_only:
        raise ReadOnlyError(EBADF, f"{name} refused: device is read-only ({h.driver})")
    if op >= OPEN_ALL_ZONES:
        return 0
    cdef uint64_t zs = h.lim.zone_size
    if offset >= h.lim.capacity:
        raise ValueError(f"{name}: offset {offset} is not inside the device (capacity "
                         f"{h.lim.capacity}: {h.lim.nr_zones} zones of {zs} bytes)")
    if op != REPORT_ZONES and offset % zs:
        raise ValueError(f"{name}: offset {offset} is not the start of a zone (zone size {zs} "
                         f"bytes; the zone holding it starts at {offset - offset % zs})")
    return 0


cdef int check_zone_write(DeviceHandle h, int op, uint64_t offset, uint64_t length) except -1:
    """A write to a host-managed device must stay inside one zone.  (That it
    starts at the zone's write pointer and ends within the zone's capacity
    needs a zone report: the device checks it, and answers EIO.)"""
    cdef uint64_t zs = h.lim.zone_size, end_of_zone
    if h.lim.zoned != 2 or length == 0:
        return 0
    end_of_zone = offset - offset % zs + zs
    if length > end_of_zone - offset:
        raise ValueError(f"{OP_NAMES[op]} of {length} bytes at offset {offset} crosses the zone "
                         f"boundary at {end_of_zone} (zone size {zs} bytes): writes to a "
                         f"host-managed zoned device must stay inside one zone (split them "
                         f"there, or use Device.zone_writer)")
    return 0


cdef object blocking_zone(DeviceHandle h, Queue q, int op, uint64_t offset, object zones):
    """One zone request, blocking (inside the device's guard): check, submit
    on ``q``, wait (GIL released, Ctrl-C honoured).  Returns its ``ret``:
    the zones filled in, for a report."""
    if q is None:
        raise ValueError(f"{h.driver} device has no queue left for blocking I/O "
                         f"(num_queues=0, or its queues were removed)")
    cdef Py_ssize_t slot = queue_use(q)
    cdef Completion c
    try:
        c = q.zone_completion(op, offset, zones, None, True, None, False)
        q.enqueue_one(c, True, True)
        if not c.done:
            q.drive(0, -1.0, c)
        if c.ret < 0:
            what = OP_NAMES[op] if op >= OPEN_ALL_ZONES else f"{OP_NAMES[op]} at offset {offset}"
            msg = c._error_msg
            if c.ret == -EIO and op != REPORT_ZONES:
                # The device says only EIO ("Nvme Error") for every refusal.
                msg = (f"{msg or 'I/O error'}; a zoned device refuses an invalid zone "
                       f"state transition, or opening more zones than it allows open/active")
            raise request_error(c.ret, msg, what, h.lim.read_only)
        return c.ret
    finally:
        queue_unuse(q, slot)
