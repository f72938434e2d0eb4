# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The C boundary: the only module that calls libblkio.

It owns the blkio instance and its queues, the memory mapped into devices
(``Buffer``, the alloc arena, the bounce pool), and the request path that
splits, bounces, submits and waits.  It never parses user options: the facade
(``blkio/__init__.py``) turns keyword arguments into typed property calls.

Lifetime under threads (one mechanism for every entry point)
-------------------------------------------------------------
libblkio gives no protection against destroying an instance (or removing a
queue) while another thread is inside a call on it: it reads freed memory or
panics.  So every public call that touches the instance or a queue enters a
guard first and leaves it last:

* ``_dev_enter()`` refuses a closing device (``ValueError: ... device
  is closed``) and counts the call in ``users``; ``_q_enter()`` does the
  same for the device and then for the queue (``... was removed``).  The counts
  are plain integers protected by the GIL: entering and leaving happen with it
  held, so the hot path pays two increments, not a lock.
* Waits are cut into slices of ``WAIT_SLICE`` seconds; between slices a wait
  notices ``closing``/``removing`` and returns with that ValueError.  Its
  request stays in flight, holding its memory, for close to drain.
* ``close()`` sets ``closing`` (new calls fail at once), waits -- GIL released,
  on a condition variable that leaving calls signal -- until no call is inside
  (calls of its own thread excepted, see below), drains the requests in flight
  (bounded), unmaps memory and destroys the instance.  ``remove_queue()`` does
  the same for one queue.  A use count plus a condition, rather than a
  reader-writer lock: glibc's rwlock prefers readers, so a thread looping on
  I/O would starve the closer, and the count costs nothing while the GIL is held.
* A thread-local stack records the guards this thread is inside, so a close
  from inside a call on the same device (a signal handler, a destructor) does
  not wait for itself: it marks the device closing and the last call to leave
  destroys it.
* Requests that do not complete within the drain bound keep their memory
  forever (``_kept_for_the_kernel``) rather than have it freed under the kernel.
* Instance-level calls (properties, memory map/unmap, adding and removing
  queues) are serialised by ``ctl_lock``: libblkio's vhost-user connection is
  corrupted by two threads reading properties at once.  Queues have their own
  locks (``Queue.lock``) for the data path.
"""

cimport cython
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBuffer_FillInfo,
                             PyBUF_SIMPLE, PyBUF_WRITABLE, PyBUF_ANY_CONTIGUOUS,
                             PyBUF_FORMAT, PyBUF_C_CONTIGUOUS)
from cpython.exc cimport PyErr_CheckSignals, PyErr_Occurred, PyErr_Clear
from cpython.ref cimport PyObject
from cpython.pythread cimport (PyThread_get_thread_ident, PyThread_type_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock,
                               WAIT_LOCK, NOWAIT_LOCK)
from libc.errno cimport errno, EINTR, EINVAL, EIO, EBADF, EOPNOTSUPP, ETIME, ENOMEM

cdef extern from "<errno.h>":
    int ENOTSUP
    int ECANCELED
from libc.stdint cimport uint64_t, int64_t, uintptr_t, UINT64_MAX
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memset, strlen
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.time cimport timespec
from posix.unistd cimport close as c_close
from posix.uio cimport iovec

from . cimport _libblkio as lb

import os
import threading
import time
from collections import deque

import numpy as np

from ._errors import Error, ReadOnlyError, error_for

cdef extern from "<sys/mman.h>" nogil:
    int memfd_create(const char *name, unsigned int flags)
    unsigned int MFD_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, long length)
    long sysconf(int name)
    int _SC_PAGESIZE

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int c_poll "poll"(pollfd *fds, unsigned long nfds, int timeout)
    short POLLHUP
    short POLLERR

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)
    int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const timespec *t)

cdef extern from *:
    """
    /* The lifetime guards this thread is inside, innermost last (see the
       module docstring): close() and remove_queue() must not wait for calls
       of their own thread. */
    #define BLKIO_PY_MAX_NEST 8
    /* initial-exec: a plain %fs-relative access on the hot path instead of a
       __tls_get_addr call (72 bytes of the static TLS surplus). */
    static __thread __attribute__((tls_model("initial-exec")))
        void *blkio_py_entered[BLKIO_PY_MAX_NEST];
    static __thread __attribute__((tls_model("initial-exec"))) int blkio_py_depth;
    static inline void blkio_py_push(void *guard) {
        if (blkio_py_depth < BLKIO_PY_MAX_NEST)
            blkio_py_entered[blkio_py_depth] = guard;
        blkio_py_depth++;
    }
    static inline void blkio_py_pop(void) { blkio_py_depth--; }
    static inline int blkio_py_held(void *guard) {
        int i, n = 0;
        int d = blkio_py_depth < BLKIO_PY_MAX_NEST ? blkio_py_depth : BLKIO_PY_MAX_NEST;
        for (i = 0; i < d; i++)
            n += blkio_py_entered[i] == guard;
        return n;
    }
    """
    void blkio_py_push(void *guard) nogil
    void blkio_py_pop() nogil
    int blkio_py_held(void *guard) nogil

cdef extern from *:
    """
    #ifndef BLKIO_PY_LIBBLKIO_VERSION
    #define BLKIO_PY_LIBBLKIO_VERSION "unknown"
    #endif
    """
    const char *BLKIO_PY_LIBBLKIO_VERSION

#: libblkio version this extension was built against (from pkg-config).
LIBBLKIO_VERSION = BLKIO_PY_LIBBLKIO_VERSION.decode()

cdef size_t PAGE = <size_t>sysconf(_SC_PAGESIZE)

# Request kinds.
cdef enum:
    OP_READ = 0
    OP_WRITE = 1
    OP_WRITE_ZEROES = 2
    OP_DISCARD = 3
    OP_FLUSH = 4

_OP_NAMES = ("read", "write", "write_zeroes", "discard", "flush")

REQ_FUA = lb.BLKIO_REQ_FUA
REQ_NO_UNMAP = lb.BLKIO_REQ_NO_UNMAP
REQ_NO_FALLBACK = lb.BLKIO_REQ_NO_FALLBACK

# Waits are cut into slices so that Python signal handlers run, timeouts are
# honoured and a dead backend is noticed, whatever the driver does with signals.
cdef double WAIT_SLICE = 0.1
# Completions fetched per blkioq_do_io call (into an array on the caller's stack).
cdef enum:
    NCOMPS = 64
# Bounced requests are cut into pieces of at most this many bytes.
cdef uint64_t BOUNCE_CHUNK = 4 << 20
# Batch requests travel in user_data as their slot index with the low bit
# set; Completion pointers have it clear.
cdef uintptr_t TAG_BIT = 1

# What requests that never completed were holding (close or remove_queue gave
# up waiting for them): the device may still write that memory, so it is
# never given back.
_kept_for_the_kernel = []


# --------------------------------------------------------------------------
# Errors: one converter, reading libblkio's per-thread message at once.

cdef object _libblkio_error(int ret, str what, object filename=None):
    cdef const char *msg = lb.blkio_get_error_msg()
    text = what
    if msg != NULL and msg[0] != 0:
        text = f"{what}: {msg.decode('utf-8', 'replace')}"
    return error_for(-ret, text, filename)


cdef void _unraisable(object where) noexcept:
    """Report an exception that cannot propagate (as Python does for __del__)."""
    try:
        import sys
        import traceback
        print(f"Exception ignored in {where!r}:", file=sys.stderr)
        traceback.print_exc()
    except BaseException:
        pass


cdef inline int _check(int ret, str what) except -1:
    if ret < 0:
        raise _libblkio_error(ret, what)
    return ret


cdef object _request_error(int ret, object msg, str what, bint read_only):
    code = -ret
    if code == EBADF and read_only:
        return ReadOnlyError(EBADF, f"{what} failed: device is read-only")
    text = f"{what} failed" + (f": {msg}" if msg else "")
    return error_for(code, text)


# --------------------------------------------------------------------------
# Arguments: offsets and lengths are integers >= 0 (numpy integers too); a
# float, a bool or a negative value is refused with the argument's name.

cdef uint64_t _u64_slow(object value, str name) except? -1:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    value = value.__index__()
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{name} is too large: {value}")
    return <uint64_t>value


cdef Py_ssize_t _index(object value, str name) except? -1:
    """An int argument (a count or index): float and bool are TypeErrors."""
    if type(value) is not int:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
        value = value.__index__()
    return value


cdef extern from "Python.h":
    # Without Cython's exception check: _u64 looks at PyErr_Occurred itself.
    unsigned long long _PyLong_AsU64 "PyLong_AsUnsignedLongLong"(object value)


cdef inline uint64_t _u64(object value, str name) except? -1:
    """``value`` as a uint64 byte count or offset, checked."""
    cdef uint64_t r
    if type(value) is int:
        r = _PyLong_AsU64(value)
        if r != UINT64_MAX or PyErr_Occurred() == NULL:
            return r
        PyErr_Clear()       # negative or too large: say which below
    return _u64_slow(value, name)


# --------------------------------------------------------------------------
# Memory

@cython.final
cdef class Buffer:
    """Page-aligned memory of our own: ``memfd_create`` + ``mmap``.

    ``Buffer(nbytes)`` exposes ``nbytes`` through the buffer protocol
    (``numpy.frombuffer(buf, numpy.uint8)``).  The memory has a file descriptor
    (``fd``), so drivers that need one (vhost-user) can map it.  It is freed
    only when no Python object views it any more: a device that had it mapped
    unmaps it on close, and the arrays stay valid.
    """

    def __cinit__(self, nbytes_arg, *, str name="blkio-buffer"):
        self.addr = NULL
        self.fd = -1
        cdef size_t nbytes = _u64(nbytes_arg, "nbytes")
        if nbytes == 0:
            raise ValueError("Buffer size must be positive")
        self.nbytes = nbytes
        self.size = (nbytes + PAGE - 1) // PAGE * PAGE
        self.shape[0] = <Py_ssize_t>nbytes
        cdef bytes bname = name.encode()
        self.fd = memfd_create(bname, MFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(errno, f"memfd_create: {os.strerror(errno)}")
        if ftruncate(self.fd, <long>self.size) < 0:
            code = errno
            c_close(self.fd)
            self.fd = -1
            raise OSError(code, f"ftruncate memfd to {self.size} bytes: {os.strerror(code)}")
        cdef void *p = mmap(NULL, self.size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if p == MAP_FAILED:
            code = errno
            c_close(self.fd)
            self.fd = -1
            raise OSError(code, f"mmap {self.size} bytes: {os.strerror(code)}")
        self.addr = <char *>p

    def __dealloc__(self):
        # Nothing can view the memory any more, and no device has it mapped
        # (a mapping holds a reference), so the fd may close now.
        if self.addr != NULL:
            munmap(self.addr, self.size)
            self.addr = NULL
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.addr, <Py_ssize_t>self.nbytes, 0, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __len__(self):
        return self.nbytes

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        return self.nbytes

    @property
    def fd(self) -> int:
        """The memfd backing this memory (owned by the Buffer)."""
        return self.fd

    @property
    def address(self) -> int:
        """Start address (page aligned)."""
        return <uintptr_t>self.addr

    def __repr__(self):
        return f"<blkio.Buffer {self.nbytes} bytes at {<uintptr_t>self.addr:#x} fd={self.fd}>"


@cython.final
cdef class RangeAllocator:
    """First-fit allocator over ``n`` granules, O(log n) per operation.

    A segment tree keeps, for every node, the longest free run inside it and
    the free runs touching its two ends, so the lowest-addressed hole that fits
    is found by one descent instead of a scan over live allocations.
    """

    def __cinit__(self, size_t n):
        self.n = n
        self.leaves = 1
        while self.leaves < n:
            self.leaves <<= 1
        cdef size_t total = 2 * self.leaves
        self.best = <int *>calloc(total, sizeof(int))
        self.pref = <int *>calloc(total, sizeof(int))
        self.suf = <int *>calloc(total, sizeof(int))
        self.sizes = <int *>calloc(self.leaves, sizeof(int))
        if not (self.best and self.pref and self.suf and self.sizes):
            raise MemoryError()
        self.used = 0
        # Leaves past n stay "used" (0); the real ones start free.
        self._set(0, n, False)

    def __dealloc__(self):
        free(self.best)
        free(self.pref)
        free(self.suf)
        free(self.sizes)

    cdef void _set(self, size_t start, size_t count, bint used) noexcept nogil:
        if count == 0:
            return
        cdef size_t lo = start + self.leaves, hi = start + count - 1 + self.leaves
        cdef size_t i, l, r
        cdef int v = 0 if used else 1
        cdef int half = 1, a
        for i in range(lo, hi + 1):
            self.best[i] = v
            self.pref[i] = v
            self.suf[i] = v
        lo >>= 1
        hi >>= 1
        while lo >= 1:
            for i in range(lo, hi + 1):
                l = 2 * i
                r = l + 1
                self.pref[i] = self.pref[l] if self.pref[l] < half else half + self.pref[r]
                self.suf[i] = self.suf[r] if self.suf[r] < half else half + self.suf[l]
                a = self.best[l] if self.best[l] > self.best[r] else self.best[r]
                if self.suf[l] + self.pref[r] > a:
                    a = self.suf[l] + self.pref[r]
                self.best[i] = a
            lo >>= 1
            hi >>= 1
            half <<= 1

    cdef Py_ssize_t alloc(self, size_t count) noexcept nogil:
        """Lowest start of ``count`` free granules, or -1."""
        if count == 0 or <size_t>self.best[1] < count:
            return -1
        cdef size_t i = 1, base = 0, half = self.leaves, l, r
        cdef Py_ssize_t start = -1
        while i < self.leaves:
            half >>= 1
            l = 2 * i
            r = l + 1
            if <size_t>self.best[l] >= count:
                i = l
            elif <size_t>(self.suf[l] + self.pref[r]) >= count:
                start = <Py_ssize_t>(base + half - self.suf[l])
                break
            else:
                i = r
                base += half
        if start < 0:
            start = <Py_ssize_t>base
        self._set(start, count, True)
        self.sizes[start] = <int>count
        self.used += count
        return start

    cdef void free(self, size_t start) noexcept nogil:
        cdef size_t count = self.sizes[start]
        if count:
            self.sizes[start] = 0
            self.used -= count
            self._set(start, count, False)

    # Python access, for tests and for the pool's bookkeeping
    def allocate(self, size_t count):
        """Reserve ``count`` granules; return the first index or -1."""
        return self.alloc(count)

    def release(self, size_t start):
        """Give back the allocation that starts at ``start``."""
        if start >= self.n or self.sizes[start] == 0:
            raise ValueError(f"no allocation starts at granule {start}")
        self.free(start)

    @property
    def used(self) -> int:
        return self.used

    @property
    def largest_free(self) -> int:
        return self.best[1]

    def __len__(self):
        return self.n


@cython.final
cdef class _Slice:
    """Memory carved out of an arena chunk; returned to the arena when collected."""

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.buffer.addr + self.offset,
                          <Py_ssize_t>self.nbytes, 0, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        if self.allocator is not None:
            self.allocator.free(self.offset // self.granule)

    @property
    def buffer(self):
        return self.buffer

    @property
    def offset(self):
        return self.offset


@cython.final
cdef class _Arena:
    """Memory for ``Device.alloc``: large mapped chunks carved into arrays.

    Drivers limit the number of mapped regions (32 on vhost-user), so arrays
    are cut out of a few big regions instead of mapping one region each.
    """

    def __cinit__(self, _DeviceCore device, size_t granule, size_t chunk_size):
        self.device = device
        self.chunks = []
        self.granule = granule
        self.chunk_size = chunk_size

    def alloc(self, size_t nbytes):
        cdef size_t g = self.granule
        cdef size_t count = (nbytes + g - 1) // g
        cdef Py_ssize_t start
        cdef Buffer buf
        cdef RangeAllocator ra
        for buf, ra in self.chunks:
            start = ra.alloc(count)
            if start >= 0:
                return self._slice(buf, ra, start, nbytes)
        size = max(self.chunk_size, count * g)
        buf = Buffer(size, name="blkio-arena")
        ra = RangeAllocator(size // g)
        self.device._map(<uintptr_t>buf.addr, buf.size, buf.fd, 0, buf)
        self.chunks.append((buf, ra))
        start = ra.alloc(count)
        return self._slice(buf, ra, start, nbytes)

    cdef object _slice(self, Buffer buf, RangeAllocator ra, Py_ssize_t start, size_t nbytes):
        cdef _Slice s = _Slice.__new__(_Slice)
        s.buffer = buf
        s.offset = <size_t>start * self.granule
        s.nbytes = nbytes
        s.allocator = ra
        s.granule = self.granule
        return np.frombuffer(s, dtype=np.uint8)


cdef object _owner_of(object obj):
    """The Buffer or _Slice behind an array (walking .base / .obj), or None."""
    seen = 0
    while obj is not None and seen < 32:
        if isinstance(obj, (Buffer, _Slice)):
            return obj
        nxt = getattr(obj, "base", None)
        if nxt is None and isinstance(obj, memoryview):
            nxt = obj.obj
        obj = nxt
        seen += 1
    return None


# --------------------------------------------------------------------------
# Caller memory held for requests

@cython.final
@cython.freelist(64)
cdef class _Views:

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


cdef int _VIEW_FLAGS[2]
_VIEW_FLAGS[0] = PyBUF_ANY_CONTIGUOUS
_VIEW_FLAGS[1] = PyBUF_ANY_CONTIGUOUS | PyBUF_WRITABLE


cdef _Views _acquire_one(object obj, bint writable):
    """The Py_buffer of one object, in inline storage (the hot path)."""
    cdef _Views v = _Views.__new__(_Views)
    try:
        PyObject_GetBuffer(obj, &v.buf1, _VIEW_FLAGS[writable])
    except (BufferError, TypeError, ValueError):
        return _acquire_views((obj,), writable, False)   # for its error message
    v.bufs = &v.buf1
    v.iov = &v.iov1
    v.n = 1
    v.iov1.iov_base = v.buf1.buf
    v.iov1.iov_len = <size_t>v.buf1.len
    v.total = <size_t>v.buf1.len
    return v


cdef _Views _acquire_views(object objs, bint writable, bint single):
    """Py_buffers for one object (``single``) or a sequence of them."""
    if single:
        return _acquire_one(objs, writable)
    if not isinstance(objs, (list, tuple)):
        objs = tuple(objs)
    cdef Py_ssize_t n = len(objs)
    if n == 0:
        raise ValueError("no buffers given")
    if n > 1 << 20:
        raise ValueError(f"too many buffers ({n})")
    cdef _Views v = _Views.__new__(_Views)
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

@cython.final
@cython.freelist(256)      # one per request in flight: recycle, don't malloc
cdef class Completion:
    """A finished request: ``user_data``, ``ret`` (0 or a negative errno),
    ``error_msg`` and ``check()``, which raises the matching ``OSError``."""

    def __cinit__(self):
        self.user_iov = NULL
        self.iov = NULL
        self.bounce_start = -1

    def __dealloc__(self):
        self._release_memory()

    cdef void _release_memory(self):
        # Called once the request is reaped (or its device destroyed): only
        # then may its caller memory and bounce space be reused.
        if (self.views is None and self.pool is None and self.user_iov == NULL
                and (self.iov == NULL or self.iov == &self.iov1)):
            self.iov = NULL             # the hot path's request: nothing held
            return
        if self.iov != NULL and self.iov != &self.iov1:
            if self.iov != self.user_iov:
                free(self.iov)
        if self.user_iov != NULL and (self.views is None or self.user_iov != self.views.iov):
            if self.user_iov != &self.iov1:
                free(self.user_iov)
        self.iov = NULL
        self.user_iov = NULL
        if self.bounce_start >= 0 and self.pool is not None:
            self.pool._release(self.bounce_start, self.bounce_buffer)
        self.bounce_start = -1
        self.bounce_buffer = None
        self.pool = None
        self.views = None

    @property
    def error_msg(self):
        """libblkio's message for a failed request, or None."""
        return self._error_msg

    @property
    def op(self) -> str:
        """The request kind: read, write, write_zeroes, discard or flush."""
        return _OP_NAMES[self.op]

    @property
    def length(self) -> int:
        """Bytes the request covers (0 for flush)."""
        return self.length

    def check(self):
        """Raise the ``OSError`` for a failed request; return ``ret`` otherwise."""
        if self.ret < 0:
            raise _request_error(self.ret, self._error_msg, _OP_NAMES[self.op], False)
        return self.ret

    def __repr__(self):
        state = "done" if self.done else "in flight"
        return (f"<blkio.Completion {_OP_NAMES[self.op]} offset={self.offset} "
                f"length={self.length} ret={self.ret} user_data={self.user_data!r} {state}>")


# --------------------------------------------------------------------------
# Bounce pool

class _ThreadWaiter:
    __slots__ = ("event",)

    def __init__(self):
        self.event = threading.Event()

    def wake(self):
        self.event.set()

    def reset(self):
        self.event.clear()


class _AsyncWaiter:
    __slots__ = ("loop", "future")

    def __init__(self, loop):
        self.loop = loop
        self.future = loop.create_future()

    def reset(self):
        if self.future.done():
            self.future = self.loop.create_future()

    def wake(self):
        def _set(fut=self.future):
            if not fut.done():
                fut.set_result(None)
        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # loop closed
            pass


@cython.final
cdef class BouncePool:
    """Mapped memory for data the driver cannot use where it is.

    ``acquire(nbytes)`` returns a numpy uint8 array of pool memory (sizes are
    rounded up to the pool's granule, a multiple of mem-region-alignment);
    ``release(array)`` gives it back.  Allocation is first-fit over the holes
    between live buffers (O(log n)).  When nothing is in use and a request does
    not fit, the pool is replaced by a larger one, up to ``max_size``; a
    request larger than ``max_size`` fails at once.  Waiters are served first
    come, first served; a woken waiter that still does not fit keeps its place
    at the front.  Thread-safe; ``acquire_async`` waits on the same queue.
    """

    def __cinit__(self, _DeviceCore device, size_t granule, size_t initial, size_t max_size):
        self.device = device
        self.granule = granule
        self._max_size = max_size
        self.plock = PyThread_allocate_lock()
        if self.plock == NULL:
            raise MemoryError()
        self.waiters = deque()
        self.buffer = None
        self.allocator = None
        self._replace(initial)

    cdef size_t _round(self, size_t nbytes):
        if nbytes == 0:
            nbytes = 1
        return (nbytes + self.granule - 1) // self.granule * self.granule

    def _replace(self, size_t size):
        # Only when nothing is allocated: no live buffer is moved.
        size = self._round(size)
        new = Buffer(size, name="blkio-bounce")
        if self.device is not None:
            self.device._map(<uintptr_t>(<Buffer>new).addr, (<Buffer>new).size,
                             (<Buffer>new).fd, 0, new)
        old = self.buffer
        self.buffer = new
        self.allocator = RangeAllocator(size // self.granule)
        if old is not None and self.device is not None:
            self.device._unmap(<uintptr_t>(<Buffer>old).addr)

    cdef Py_ssize_t _try_locked(self, size_t size) except -2:
        cdef size_t count = size // self.granule
        if self.buffer.size > self._max_size and self.allocator.used == 0:
            self._replace(self._max_size)       # max_size was lowered: shrink when idle
        if (self.allocator.used + count) * self.granule > self._max_size:
            return -1                           # over the bound until buffers come back
        cdef Py_ssize_t start = self.allocator.alloc(count)
        if start < 0 and self.allocator.used == 0:
            cur = self.buffer.size
            grow = max(size + (1 << 20), 2 * cur)
            self._replace(min(grow, self._max_size))
            start = self.allocator.alloc(count)
        return start

    cdef Py_ssize_t _try_acquire(self, size_t nbytes) except -2:
        """Granule index of a new allocation, -1 if it must wait."""
        cdef size_t size = self._checked_size(nbytes)
        self._lock()
        try:
            if self.waiters:
                return -1
            return self._try_locked(size)
        finally:
            self._unlock()

    cdef size_t _checked_size(self, size_t nbytes) except? 0:
        cdef size_t size = self._round(nbytes)
        if size > self._max_size:
            raise ValueError(f"bounce buffer of {nbytes} bytes exceeds the pool's "
                             f"max_size of {self._max_size} bytes")
        return size

    # One FIFO of waiters serves threads and coroutines alike: _enter either
    # allocates at once or queues the waiter; _turn tries for the waiter at the
    # head (keeping its place if it still does not fit); _leave drops it.

    cdef Py_ssize_t _enter(self, size_t size, object waiter) except -2:
        self._lock()
        try:
            if not self.waiters:
                start = self._try_locked(size)
                if start >= 0:
                    return start
            self.waiters.append(waiter)
            return -1
        finally:
            self._unlock()

    cdef Py_ssize_t _turn(self, size_t size, object waiter) except -2:
        self._lock()
        try:
            if self.waiters[0] is waiter:
                start = self._try_locked(size)
                if start >= 0:
                    self.waiters.popleft()
                    self._wake_head()
                    return start
            waiter.reset()
            return -1
        finally:
            self._unlock()

    def _leave(self, waiter):
        self._lock()
        try:
            try:
                self.waiters.remove(waiter)
            except ValueError:
                pass
            self._wake_head()
        finally:
            self._unlock()

    cdef Py_ssize_t _acquire_blocking(self, size_t nbytes, double timeout, Queue drive) except -2:
        """Wait (FIFO) for space; timeout < 0 waits forever.  While waiting,
        ``drive`` (the caller's queue) is reaped so its own completed requests
        give their bounce space back."""
        cdef size_t size = self._checked_size(nbytes)
        cdef Py_ssize_t start = self._try_acquire(size)
        if start >= 0:
            return start                # the common case: no waiter object at all
        waiter = _ThreadWaiter()
        start = self._enter(size, waiter)
        if start >= 0:
            return start
        deadline = time.monotonic() + timeout if timeout >= 0 else None
        try:
            while True:
                self._check_open()
                start = self._turn(size, waiter)
                if start >= 0:
                    return start
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no bounce buffer space for {nbytes} bytes "
                                       f"within {timeout} s")
                if drive is not None and drive.inflight > 0:
                    drive._drive(1, WAIT_SLICE, None)
                else:
                    left = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
                    waiter.event.wait(max(left, 0))
        except BaseException:
            self._leave(waiter)
            raise

    cdef int _check_open(self) except -1:
        if self.device is None or self.device.closing:
            raise ValueError("the bounce pool's device is closed")
        return 0

    def _device_closed(self):
        """The device is gone: waiters wake up and fail (their next turn
        sees no device)."""
        self.device = None
        self._wake_all()

    def _wake_all(self):
        self._lock()
        try:
            for waiter in self.waiters:
                waiter.wake()
        finally:
            self._unlock()

    async def acquire_async(self, nbytes):
        """Coroutine form of ``acquire``: waits in the same FIFO without
        blocking the event loop.  Returns the array."""
        import asyncio
        self._check_open()
        cdef size_t size = self._checked_size(_u64(nbytes, "nbytes"))
        cdef Py_ssize_t start = self._try_acquire(size)
        if start >= 0:
            return self._array(start, nbytes)
        waiter = _AsyncWaiter(asyncio.get_running_loop())
        start = self._enter(size, waiter)
        if start >= 0:
            return self._array(start, nbytes)
        try:
            while True:
                self._check_open()
                start = self._turn(size, waiter)
                if start >= 0:
                    return self._array(start, nbytes)
                await waiter.future
        except BaseException:
            self._leave(waiter)
            raise

    cdef void _lock(self):
        # The GIL is released only when the lock is contended, so that a
        # holder that needs the GIL can always get it.
        if not PyThread_acquire_lock(self.plock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.plock, WAIT_LOCK)
        self.owner = PyThread_get_thread_ident()

    cdef void _unlock(self):
        self.owner = 0
        PyThread_release_lock(self.plock)

    def __dealloc__(self):
        if self.plock != NULL:
            PyThread_free_lock(self.plock)

    def _wake_head(self):
        if self.waiters:
            self.waiters[0].wake()

    cdef void _release(self, Py_ssize_t start, Buffer buffer):
        if self.owner == PyThread_get_thread_ident():
            # Re-entered from a destructor (the garbage collector ran inside
            # a locked section of this thread): the allocator is consistent
            # between its C calls, so free directly; waiters are woken at the
            # next release.
            if buffer is self.buffer:
                self.allocator.free(<size_t>start)
            return
        self._lock()
        try:
            if buffer is self.buffer:
                self.allocator.free(<size_t>start)
            self._wake_head()
        finally:
            self._unlock()

    cdef Py_ssize_t _start_of(self, object array, size_t nbytes) except -1:
        """Granule index of a live allocation from acquire(), checked."""
        cdef Py_buffer view
        PyObject_GetBuffer(array, &view, PyBUF_SIMPLE)
        cdef uintptr_t addr = <uintptr_t>view.buf
        cdef size_t n = <size_t>view.len
        PyBuffer_Release(&view)
        cdef uintptr_t base = <uintptr_t>self.buffer.addr
        if addr < base or addr - base >= self.buffer.size or (addr - base) % self.granule or n < nbytes:
            raise ValueError("array was not acquired from this bounce pool (or is too small)")
        cdef Py_ssize_t start = <Py_ssize_t>((addr - base) // self.granule)
        if self.allocator.sizes[start] == 0:
            raise ValueError("array was already released to the bounce pool")
        return start

    cdef object _array(self, Py_ssize_t start, size_t nbytes):
        return np.frombuffer(self.buffer, dtype=np.uint8, count=<Py_ssize_t>nbytes,
                             offset=<Py_ssize_t>(<size_t>start * self.granule))

    def acquire(self, nbytes, timeout=None):
        """A uint8 array of ``nbytes`` of pool memory (mapped into the device).

        Waits, first come first served, until space is free; ``timeout``
        seconds (None: forever) bound the wait (``TimeoutError``).  A request
        larger than ``max_size`` raises ``ValueError``.
        """
        cdef double t = -1.0 if timeout is None else float(timeout)
        cdef size_t n = _u64(nbytes, "nbytes")
        self._check_open()
        cdef _DeviceCore d = self.device
        cdef Py_ssize_t start
        _dev_enter(d)       # growing the pool maps memory into the device
        try:
            start = self._acquire_blocking(n, t, None)
        finally:
            _dev_leave(d)
        return self._array(start, n)

    def release(self, array):
        """Give back an array from ``acquire``."""
        self._lock()
        try:
            self.allocator.free(<size_t>self._start_of(array, 0))
            self._wake_head()
        finally:
            self._unlock()

    @property
    def size(self) -> int:
        """Current pool size in bytes."""
        return self.buffer.size

    @property
    def in_use(self) -> int:
        """Bytes currently handed out."""
        return self.allocator.used * self.granule

    @property
    def granule(self) -> int:
        """Allocation unit in bytes (a multiple of mem-region-alignment)."""
        return self.granule

    @property
    def max_size(self) -> int:
        """Upper bound of the pool size in bytes (settable)."""
        return self._max_size

    @max_size.setter
    def max_size(self, value_arg):
        cdef size_t value = _u64(value_arg, "max_size")
        if value < self.granule:
            raise ValueError(f"max_size must be at least {self.granule} bytes")
        self._max_size = self._round(value)

    @property
    def waiting(self) -> int:
        """Number of callers waiting for space."""
        return len(self.waiters)

    def __repr__(self):
        return (f"<blkio.BouncePool size={self.size} in_use={self.in_use} "
                f"max_size={self._max_size} waiting={len(self.waiters)}>")


# --------------------------------------------------------------------------
# Queues

cdef extern from "<time.h>" nogil:
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_MONOTONIC
    int CLOCK_REALTIME


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return <int64_t>t.tv_sec * 1000000000 + t.tv_nsec


cdef inline void _set_timeout(timespec *ts, double seconds) noexcept nogil:
    if seconds < 0:
        seconds = 0
    ts.tv_sec = <long>seconds
    ts.tv_nsec = <long>((seconds - <double>ts.tv_sec) * 1e9)


cdef inline void _realtime_after(timespec *ts, double seconds) noexcept nogil:
    """The CLOCK_REALTIME instant ``seconds`` from now (pthread_cond_timedwait)."""
    clock_gettime(CLOCK_REALTIME, ts)
    cdef int64_t ns = ts.tv_nsec + <int64_t>(seconds * 1e9)
    ts.tv_sec += <long>(ns // 1000000000)
    ts.tv_nsec = <long>(ns % 1000000000)


# ---- the lifetime guard's hot half (see the module docstring) ------------
# Module-level inline functions, not methods: _DeviceCore is subclassed, so
# its cdef methods are vtable calls; these compile into the caller.

cdef inline int _dev_enter(_DeviceCore d) except -1:
    """Enter the device's guard: refuses a closing device, counts the call."""
    if d.closing or d.b == NULL:
        raise d._closed_error()
    d.users += 1
    blkio_py_push(<void *>d)
    return 0


cdef inline void _dev_leave(_DeviceCore d) noexcept:
    blkio_py_pop()
    d.users -= 1
    if d.closing:
        d._left_while_closing()


cdef inline int _q_use(Queue q) except -1:
    """A queue's guard alone, for a caller inside its device's."""
    if q.removing or q.q == NULL:
        raise ValueError(f"queue {q.index} was removed")
    q.users += 1
    blkio_py_push(<void *>q)
    return 0


cdef inline void _q_unuse(Queue q) noexcept:
    blkio_py_pop()
    q.users -= 1
    if q.removing:
        q._left_while_removing()


cdef inline int _q_enter(Queue q) except -1:
    """The device's guard, then the queue's; refuses a closed device, a
    removed queue and a broken backend."""
    cdef _DeviceCore d = q.device
    if d is None:
        raise ValueError(f"queue {q.index}: its device is closed")
    _dev_enter(d)
    if q.removing or q.q == NULL:
        _dev_leave(d)
        raise ValueError(f"queue {q.index} was removed")
    if d.state == "broken":
        _dev_leave(d)
        raise Error(EIO, f"{d.driver}: the backend hung up; close the device")
    q.users += 1
    blkio_py_push(<void *>q)
    return 0


cdef inline void _q_leave(Queue q) noexcept:
    cdef _DeviceCore d = q.device
    _q_unuse(q)
    _dev_leave(d)


@cython.final
cdef class Queue:
    """One libblkio queue.  Enqueue requests, then ``submit``/``wait``/``poll``.

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
        free(self.batch_tags)
        free(self.batch_rets)
        free(self.slots_table)

    @staticmethod
    cdef Queue _new(_DeviceCore device, lb.blkioq *q, int index, bint poll):
        cdef Queue self = Queue.__new__(Queue)
        self.q = q
        self.device = device
        self.index = index
        self.is_poll_queue = poll
        pthread_mutex_init(&self.lock, NULL)
        self.lock_ready = True
        self.ready = []
        self.inflight = 0
        self.queued = 0
        return self

    # ---- lifetime guard (see the module docstring; the hot half is the
    # inline functions _q_enter/_q_leave/_q_use/_q_unuse) ----------------

    cdef void _left_while_removing(self) noexcept:
        self.device._wake_closers()
        if self.users == 0 and self.remove_pending:
            # remove_queue() ran inside a call of this thread: finish it now
            self.remove_pending = False
            try:
                self.device._finish_remove(self)
            except BaseException:
                _unraisable(self)

    cdef int _check_not_closing(self) except -1:
        """Between wait slices: give up when the device or queue is going away
        (close/remove_queue itself drains, so it passes)."""
        cdef _DeviceCore d = self.device
        if d.draining or self.draining:
            return 0
        if d.closing:
            raise d._closed_error()
        if self.removing:
            raise ValueError(f"queue {self.index} was removed")
        return 0

    cdef Py_ssize_t _using(self, uintptr_t start, uintptr_t end):
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

    cdef int _enqueue(self, Completion c, bint reap) except -1:
        # Link first: the list holds the reference libblkio's user_data borrows.
        c.queue = self
        c.next = self.head
        if self.head is not None:
            self.head.prev = c
        self.head = c
        self.inflight += 1
        self.queued += 1
        self.device.n_requests += 1
        cdef void *ud = <void *>c
        cdef int n = 0
        cdef lb.blkio_completion comps[NCOMPS]
        if self.device.threaded or pthread_mutex_trylock(&self.lock) != 0:
            with nogil:
                pthread_mutex_lock(&self.lock)
                n = self._enqueue_locked(c, ud, reap, comps)
                pthread_mutex_unlock(&self.lock)
        else:
            # One thread only, lock free: this call never sleeps (min_completions
            # is 0), and releasing the GIL would cost more than the call itself.
            n = self._enqueue_locked(c, ud, reap, comps)
            pthread_mutex_unlock(&self.lock)
        if reap:
            if n < 0:
                raise _libblkio_error(n, "blkioq_do_io")
            self.queued = 0
            self._dispatch(comps, n)
        return 0

    cdef int _enqueue_locked(self, Completion c, void *ud, bint reap,
                             lb.blkio_completion *comps) noexcept nogil:
        """Hand one request to libblkio (queue lock held); with ``reap``,
        submit and collect completions that are already there."""
        cdef lb.blkioq *q = self.q
        cdef int n = 0
        if c.op == OP_READ:
            if c.iovcnt == 1:
                lb.blkioq_read(q, c.offset, c.iov[0].iov_base, c.iov[0].iov_len, ud, c.flags)
            else:
                lb.blkioq_readv(q, c.offset, c.iov, c.iovcnt, ud, c.flags)
        elif c.op == OP_WRITE:
            if c.iovcnt == 1:
                lb.blkioq_write(q, c.offset, c.iov[0].iov_base, c.iov[0].iov_len, ud, c.flags)
            else:
                lb.blkioq_writev(q, c.offset, c.iov, c.iovcnt, ud, c.flags)
        elif c.op == OP_WRITE_ZEROES:
            lb.blkioq_write_zeroes(q, c.offset, c.length, ud, c.flags)
        elif c.op == OP_DISCARD:
            lb.blkioq_discard(q, c.offset, c.length, ud, c.flags)
        else:
            lb.blkioq_flush(q, ud, c.flags)
        self.outstanding += 1
        if reap:
            n = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
            if n > 0:
                self.outstanding -= n
        return n

    cdef int _fail_all(self, int err) except -1:
        """Complete every request in flight with -err, without libblkio (its
        backend is gone, so nothing can touch their memory any more)."""
        cdef Completion c
        while self.head is not None:
            c = self.head
            self._unlink(c)
            c.ret = -err
            c._error_msg = "the backend hung up"
            c.done = True
            c._release_memory()
            if not c.internal:
                self.ready.append(c)
        # Batch requests in flight complete with the same error.
        cdef Py_ssize_t i, ring
        self._ensure_batch(self.batch_inflight)
        for i in range(self.slots_cap):
            if self.slots_table[i].length:
                ring = (self.batch_head + self.batch_count) % self.batch_cap
                self.batch_tags[ring] = self.slots_table[i].tag
                self.batch_rets[ring] = -err
                self.batch_count += 1
                self._free_slot(i)
        self.batch_inflight = 0
        self.inflight = 0
        self.outstanding = 0
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

    cdef void _unlink(self, Completion c):
        if c.prev is not None:
            c.prev.next = c.next
        else:
            self.head = c.next
        if c.next is not None:
            c.next.prev = c.prev
        c.prev = None
        c.next = None

    # ---- reaping -------------------------------------------------------

    cdef int _dispatch(self, lb.blkio_completion *comps, int n) except -1:
        """Hand out n completions (GIL held).  Each caller reaps into its own
        array: a shared one would be overwritten by another thread's do_io
        between the unlock and this dispatch."""
        cdef int i
        cdef uintptr_t ud
        cdef Completion c
        cdef Py_ssize_t ring, slot
        for i in range(n):
            ud = <uintptr_t>comps[i].user_data
            self.inflight -= 1
            if ud & TAG_BIT:
                slot = <Py_ssize_t>(ud >> 1)
                ring = (self.batch_head + self.batch_count) % self.batch_cap
                self.batch_tags[ring] = self.slots_table[slot].tag
                self.batch_rets[ring] = comps[i].ret
                self.batch_count += 1
                self.batch_inflight -= 1
                self._free_slot(slot)
                continue
            c = <Completion><PyObject *>comps[i].user_data
            self._unlink(c)
            c.ret = comps[i].ret
            if c.ret < 0 and comps[i].error_msg != NULL:
                c._error_msg = comps[i].error_msg.decode("utf-8", "replace")
            if c.ret == 0 and c.op == OP_READ and c.bounce_start >= 0:
                _scatter(<char *>c.iov[0].iov_base, c.user_iov, c.user_iovcnt)
            if c.bounce_start >= 0:
                self.device.bounced_bytes += c.length
                self.device.n_bounced += 1
            c.done = True
            c._release_memory()
            if not c.internal:
                self.ready.append(c)
        return 0

    cdef int _drive(self, int min_completions, double timeout, Completion until) except -1:
        """Submit what is queued and reap.  Returns when ``until`` is done (if
        given), else once ``min_completions`` were reaped; ``timeout`` seconds
        (< 0: none) bound the wait, then TimeoutError."""
        cdef int n, want, got = 0
        cdef timespec ts
        cdef lb.blkio_completion comps[NCOMPS]
        cdef double slice_
        cdef lb.blkioq *q = self.q
        cdef bint interruptible = not self.is_poll_queue
        cdef int64_t poll_ns = self.device.poll_ns, spin_end
        if until is None and min_completions <= 0:
            # Non-blocking: submit, and reap what is already there.
            while True:
                if pthread_mutex_trylock(&self.lock) != 0:
                    with nogil:
                        pthread_mutex_lock(&self.lock)
                n = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
                if n > 0:
                    self.outstanding -= n
                pthread_mutex_unlock(&self.lock)
                if n < 0:
                    raise _libblkio_error(n, "blkioq_do_io")
                self.queued = 0
                got += n
                self._dispatch(comps, n)
                if n < NCOMPS:
                    return got
        deadline = time.monotonic() + timeout if timeout >= 0 else None
        while True:
            if until is not None:
                if until.done:
                    return 0
                self._check_not_closing()
                want = 1 if self.inflight > 0 else 0
            else:
                self._check_not_closing()
                want = min_completions - got
                if want <= 0:
                    want = 0
                if want > self.inflight:
                    want = <int>self.inflight
            if deadline is None:
                slice_ = WAIT_SLICE
            else:
                slice_ = min(WAIT_SLICE, deadline - time.monotonic())
            _set_timeout(&ts, slice_)
            with nogil:
                pthread_mutex_lock(&self.lock)
                # Other threads may have reaped meanwhile: never ask libblkio
                # for more than is outstanding (it answers EINVAL).
                if want > self.outstanding:
                    want = <int>self.outstanding
                if want > 0:
                    # Collect what is done without sleeping first (cheap), then
                    # busy-poll up to poll_ns (like QEMU's poll handler: a
                    # sleeping backend wake-up costs tens of µs), then wait.
                    n = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
                    if n == 0 and poll_ns > 0:
                        spin_end = _now_ns() + poll_ns
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
                    self.outstanding -= n
                pthread_mutex_unlock(&self.lock)
            if n >= 0:
                self.queued = 0
                got += n
                self._dispatch(comps, n)
                if until is None and (got >= min_completions or want == 0):
                    return got
                if until is not None and want == 0 and not until.done:
                    # Another thread holds our completion's turn; let it run.
                    time.sleep(0)
                continue
            if n == -EINTR:
                PyErr_CheckSignals()
            elif n == -ETIME:
                if self.device._backend_dead():
                    inflight = self.inflight
                    self.device._fail_backend()
                    raise Error(EIO, f"{self.device.driver}: the backend hung up "
                                     f"with {inflight} request(s) in flight")
                PyErr_CheckSignals()
            else:
                raise _libblkio_error(n, "blkioq_do_io")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no completion within {timeout} s "
                                   f"({self.inflight} request(s) still in flight)")

    # ---- public API ------------------------------------------------------

    def _submit_one(self, int op, offset, object buf, bint vectored, unsigned int flags,
                    object user_data, length=0, object bounce=None, bint nowait=False):
        """Validate and enqueue one request.  Returns its length in bytes, or,
        with ``nowait``, minus the bounce space it needs when the pool has
        none free right now (nothing is enqueued then; asyncio waits for the
        space with ``acquire_async`` and passes it back as ``bounce``)."""
        cdef uint64_t off = _u64(offset, "offset"), n = _u64(length, "length")
        _q_enter(self)
        try:
            return self._submit_one_c(op, off, buf, vectored, flags, user_data, n,
                                      bounce, nowait)
        finally:
            _q_leave(self)

    cdef object _submit_one_c(self, int op, uint64_t offset, object buf, bint vectored,
                              unsigned int flags, object user_data, uint64_t length,
                              object bounce, bint nowait):
        cdef _DeviceCore d = self.device
        cdef _Views views = None
        if op == OP_READ or op == OP_WRITE:
            views = _acquire_views(buf, op == OP_READ, not vectored)
            length = views.total
        if op != OP_READ and op != OP_FLUSH:
            d._check_writable(_OP_NAMES[op])
        if op != OP_FLUSH:
            d._check_range(offset, length, _OP_NAMES[op])
        if (op == OP_READ or op == OP_WRITE) and d.max_transfer and length > d.max_transfer:
            raise ValueError(f"{_OP_NAMES[op]} of {length} bytes exceeds max-transfer "
                             f"({d.max_transfer}); split it, or use the Device's blocking "
                             f"methods, which split")
        cdef Completion c = d._prepare(op, offset, length, views,
                                       views.iov if views is not None else NULL,
                                       views.n if views is not None else 0,
                                       flags, user_data, False, self, bounce, nowait)
        if c is None:
            return -<int64_t>length
        self._enqueue(c, False)
        return length

    def _submit_buffer(self, int op, offset_arg, object buf, unsigned int flags,
                       object user_data):
        """``_submit_one`` for one buffer, without waiting for bounce space
        (asyncio's per-request call, kept short)."""
        cdef uint64_t offset = _u64(offset_arg, "offset")
        _q_enter(self)
        cdef _DeviceCore d = self.device
        cdef _Views views
        cdef uint64_t length
        cdef Completion c
        try:
            views = _acquire_one(buf, op == OP_READ)
            length = views.total
            if op == OP_WRITE and d.read_only:
                d._check_writable("write")
            d._check_range(offset, length, _OP_NAMES[op])
            if d.max_transfer and length > d.max_transfer:
                raise ValueError(f"{_OP_NAMES[op]} of {length} bytes exceeds max-transfer "
                                 f"({d.max_transfer})")
            c = d._prepare(op, offset, length, views, views.iov, 1,
                           flags, user_data, False, self, None, True)
            if c is None:
                return -<int64_t>length
            self._enqueue(c, False)
            return length
        finally:
            _q_leave(self)

    def _zero_flags(self, bint fua, bint may_unmap, bint no_fallback):
        return _zero_flags(fua, may_unmap, no_fallback)

    def read(self, offset, buf, *, user_data=None):
        """Enqueue a read into ``buf`` (a writable contiguous buffer)."""
        return self._submit_one(OP_READ, _u64(offset, "offset"), buf, False, 0, user_data)

    def write(self, offset, buf, *, user_data=None, bint fua=False):
        """Enqueue a write of ``buf``."""
        return self._submit_one(OP_WRITE, _u64(offset, "offset"), buf, False,
                                REQ_FUA if fua else 0, user_data)

    def readv(self, offset, bufs, *, user_data=None):
        """Enqueue a vectored read into the buffers of ``bufs``."""
        return self._submit_one(OP_READ, _u64(offset, "offset"), bufs, True, 0, user_data)

    def writev(self, offset, bufs, *, user_data=None, bint fua=False):
        """Enqueue a vectored write of the buffers of ``bufs``."""
        return self._submit_one(OP_WRITE, _u64(offset, "offset"), bufs, True,
                                REQ_FUA if fua else 0, user_data)

    def write_zeroes(self, offset, length, *, user_data=None, bint fua=False,
                     bint may_unmap=True, bint no_fallback=False):
        """Enqueue a write-zeroes request of ``length`` bytes at ``offset``."""
        cdef unsigned int flags = _zero_flags(fua, may_unmap, no_fallback)
        return self._submit_one(OP_WRITE_ZEROES, _u64(offset, "offset"), None, False, flags,
                                user_data, _u64(length, "length"))

    def discard(self, offset, length, *, user_data=None):
        """Enqueue a discard request of ``length`` bytes at ``offset``."""
        return self._submit_one(OP_DISCARD, _u64(offset, "offset"), None, False, 0, user_data,
                                _u64(length, "length"))

    def flush(self, *, user_data=None):
        """Enqueue a flush request."""
        return self._submit_one(OP_FLUSH, 0, None, False, 0, user_data, 0)

    def submit(self):
        """Submit enqueued requests without waiting.  Completions that are
        already there (cached reads complete during submission) are kept for
        the next ``wait()`` or ``poll()``."""
        _q_enter(self)
        try:
            self._drive(0, 0.0, None)
        finally:
            _q_leave(self)

    def wait(self, min=1, max=None, timeout=None):
        """Submit, then wait for at least ``min`` completions; return up to
        ``max`` of them as ``Completion`` objects.  The GIL is released while
        waiting; Ctrl-C interrupts.  ``timeout`` (seconds) raises TimeoutError,
        leaving requests in flight and tracked."""
        cdef Py_ssize_t nmin = _index(min, "min")
        if max is not None:
            max = _index(max, "max")
        if nmin < 0:
            raise ValueError("min must be >= 0")
        if max is not None and max < nmin:
            raise ValueError(f"max ({max}) must be >= min ({nmin})")
        cdef double t = -1.0 if timeout is None else float(timeout)
        _q_enter(self)
        try:
            have = len(self.ready)
            if nmin > have + self.inflight:
                raise ValueError(f"min={nmin} but only {have + self.inflight} request(s) "
                                 f"are in flight or completed")
            if nmin > have:
                self._drive(nmin - have, t, None)
            else:
                self._drive(0, 0.0, None)
            return self._take(max)
        finally:
            _q_leave(self)

    def poll(self, max=None):
        """Submit and return the completions available now, without waiting."""
        _q_enter(self)
        try:
            self._drive(0, 0.0, None)
            return self._take(max)
        finally:
            _q_leave(self)

    cdef list _take(self, object max):
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
        if self.batch_count + need <= cap:
            return 0
        cdef Py_ssize_t newcap = max(2 * cap, self.batch_count + need, 256)
        cdef int64_t *tags = <int64_t *>malloc(newcap * sizeof(int64_t))
        cdef int *rets = <int *>malloc(newcap * sizeof(int))
        if tags == NULL or rets == NULL:
            free(tags)
            free(rets)
            raise MemoryError()
        for i in range(self.batch_count):
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

    def _submit_batch(self, int op, offsets, buffers, user_data, unsigned int flags,
                      region, uint64_t blocksize):
        _q_enter(self)
        try:
            return self._submit_batch_c(op, offsets, buffers, user_data, flags, region, blocksize)
        finally:
            _q_leave(self)

    cdef object _submit_batch_c(self, int op, offsets, buffers, user_data, unsigned int flags,
                                region, uint64_t blocksize):
        cdef _DeviceCore d = self.device
        if op == OP_WRITE:
            d._check_writable("write")
        cdef Py_buffer ob, bb, tb, xb
        cdef bint has_tags = user_data is not None
        cdef bint indexed = region is not None      # buffers = offsets into region
        cdef Py_ssize_t n, nbufs, i, bad = -1
        cdef uint64_t bs, o, cap = d.capacity, ra = d.request_alignment
        cdef uint64_t ba = d.buf_alignment, rlen
        cdef uint64_t *offs
        cdef uint64_t *boffs = NULL
        cdef int64_t *tags = NULL
        cdef int problem = 0
        self._batch_view(offsets, &ob, 1, b"LQ", False, "offsets (a 1-D uint64 array)")
        try:
            if indexed:
                self._batch_view(region, &bb, 1, b"B", op == OP_READ,
                                 "region (a C-contiguous 1-D uint8 array"
                                 + (", writable for reads)" if op == OP_READ else ")"))
            else:
                self._batch_view(buffers, &bb, 2, b"B", op == OP_READ,
                                 "buffers (a C-contiguous uint8 array of shape (n, blocksize)"
                                 + (", writable for reads)" if op == OP_READ else ")"))
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
                        if self.slots and self.outstanding + n > self.slots:
                            raise ValueError(
                                f"batch of {n} requests does not fit: {self.outstanding} in flight, "
                                f"queue holds {self.slots} (raise num_entries / queue_size at open)")
                        offs = <uint64_t *>ob.buf
                        if has_tags:
                            tags = <int64_t *>tb.buf
                        rlen = <uint64_t>bb.len
                        # Whole-batch validation before anything is enqueued.
                        if bs == 0 or bs % ra:
                            raise ValueError(f"blocksize {bs} must be a positive multiple of "
                                             f"request-alignment ({ra})")
                        if d.max_transfer and bs > d.max_transfer:
                            raise ValueError(f"blocksize {bs} exceeds max-transfer ({d.max_transfer})")
                        if <uintptr_t>bb.buf % ba or bs % ba:
                            raise ValueError(f"buffers must be aligned to buf-alignment ({ba})")
                        if not d.in_range(<uintptr_t>bb.buf, <size_t>bb.len):
                            raise ValueError("buffers must lie in memory from Device.alloc() or "
                                             "Device.register() (the batch API never copies)")
                        with nogil:
                            for i in range(n):
                                o = offs[i]
                                if o % ra:
                                    problem = 1
                                elif o > cap or bs > cap - o:
                                    problem = 2
                                elif boffs != NULL and (boffs[i] > rlen or bs > rlen - boffs[i]):
                                    problem = 4
                                elif boffs != NULL and boffs[i] % ba:
                                    problem = 5
                                if problem:
                                    bad = i
                                    break
                        if problem == 1:
                            raise ValueError(f"offsets[{bad}] = {offs[bad]} is not a multiple of "
                                             f"request-alignment ({ra})")
                        if problem == 2:
                            raise ValueError(f"offsets[{bad}] = {offs[bad]} + {bs} passes the device "
                                             f"capacity ({cap})")
                        if problem == 4:
                            raise ValueError(f"buffers[{bad}] = {boffs[bad]} + {bs} passes the end "
                                             f"of region ({rlen} bytes)")
                        if problem == 5:
                            raise ValueError(f"buffers[{bad}] = {boffs[bad]} is not aligned to "
                                             f"buf-alignment ({ba})")
                        self._ensure_batch(n + self.inflight)
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
                if op == OP_READ:
                    lb.blkioq_read(q, offs[i], <void *>(base + (boffs[i] if boffs != NULL else <uint64_t>i * bs)),
                                   bs, <void *>((<uintptr_t>idx[i] << 1) | TAG_BIT), flags)
                else:
                    lb.blkioq_write(q, offs[i], <void *>(base + (boffs[i] if boffs != NULL else <uint64_t>i * bs)),
                                    bs, <void *>((<uintptr_t>idx[i] << 1) | TAG_BIT), flags)
            self.outstanding += n
            got = lb.blkioq_do_io(q, comps, 0, NCOMPS, NULL)
            if got > 0:
                self.outstanding -= got
            pthread_mutex_unlock(&self.lock)
        if idx != &stack_idx[0]:
            free(idx)
        self.inflight += n
        self.batch_inflight += n
        self.device.n_requests += n
        if got < 0:
            raise _libblkio_error(got, "blkioq_do_io")
        self._dispatch(comps, got)
        return 0

    def submit_reads(self, offsets, buffers, *, user_data=None, region=None,
                     uint64_t blocksize=0):
        """Enqueue and submit n reads in one GIL-free call.

        ``offsets``: uint64[n] device offsets; ``buffers``: a C-contiguous
        uint8[n, blocksize] view of memory from ``Device.alloc`` or
        ``Device.register`` -- or, with ``region`` (such memory, 1-D uint8)
        and ``blocksize``, a uint64[n] of byte offsets into ``region``;
        ``user_data``: optional int64[n] tags (default 0..n-1).  The whole batch is validated before anything is enqueued;
        no Python object is made per request.  Returns n."""
        return self._submit_batch(OP_READ, offsets, buffers, user_data, 0, region, blocksize)

    def submit_writes(self, offsets, buffers, *, bint fua=False, user_data=None, region=None,
                      uint64_t blocksize=0):
        """Like ``submit_reads``, for writes."""
        return self._submit_batch(OP_WRITE, offsets, buffers, user_data,
                                  REQ_FUA if fua else 0, region, blocksize)

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
        cdef Py_ssize_t nmin = _index(min, "min")
        if nmin < 0:
            raise ValueError("min must be >= 0")
        _q_enter(self)
        try:
            return self._reap_c(out, nmin, timeout)
        finally:
            _q_leave(self)

    cdef object _reap_c(self, out, int min, timeout):
        if out is not self.reap_out:
            self._reap_layout(out)
        cdef Py_ssize_t cap = self.reap_len
        if min > cap:
            raise ValueError(f"min={min} exceeds the size of out ({cap})")
        if min > self.batch_count + self.batch_inflight:
            raise ValueError(f"min={min} but only {self.batch_count + self.batch_inflight} "
                             f"batch request(s) are in flight or completed")
        cdef double t = -1.0 if timeout is None else float(timeout)
        if self.batch_count < min:
            while self.batch_count < min:
                self._drive(min - <int>self.batch_count, t, None)
        elif self.batch_count == 0:
            self._drive(0, 0.0, None)
        cdef Py_ssize_t k = self.batch_count if self.batch_count < cap else cap
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
        self.batch_count -= k
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
        ``completion_fd_enabled = True`` before waiting on it; read 8 bytes to
        reset it, then call ``poll()``."""
        if self.is_poll_queue:
            return -1
        _q_enter(self)
        try:
            return lb.blkioq_get_completion_fd(self.q)
        finally:
            _q_leave(self)

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
        _q_enter(self)
        try:
            if pthread_mutex_trylock(&self.lock) != 0:
                with nogil:
                    pthread_mutex_lock(&self.lock)
            lb.blkioq_set_completion_fd_enabled(self.q, value)
            pthread_mutex_unlock(&self.lock)
            self.fd_enabled = value
        finally:
            _q_leave(self)

    @property
    def in_flight(self) -> int:
        """Requests submitted or enqueued and not yet reaped."""
        return self.inflight

    @property
    def removed(self) -> bool:
        """True once the queue is being removed, or its device closed."""
        return self.removed or self.removing or self.q == NULL or self.device.closing

    @property
    def device(self):
        return self.device

    def __repr__(self):
        kind = "poll queue" if self.is_poll_queue else "queue"
        return f"<blkio.Queue {kind} {self.index} in_flight={self.inflight}>"


cdef unsigned int _zero_flags(bint fua, bint may_unmap, bint no_fallback):
    cdef unsigned int flags = 0
    if fua:
        if LIBBLKIO_VERSION != "unknown" and tuple(int(x) for x in LIBBLKIO_VERSION.split(".")[:2]) < (1, 4):
            raise ValueError("fua=True on write_zeroes needs libblkio >= 1.4.0 "
                             f"(built against {LIBBLKIO_VERSION})")
        flags |= REQ_FUA
    if not may_unmap:
        flags |= REQ_NO_UNMAP
    if no_fallback:
        flags |= REQ_NO_FALLBACK
    return flags


# --------------------------------------------------------------------------
# The device

cdef class _DeviceCore:
    """The blkio instance, its memory and its request path.  Use ``blkio.open``."""

    def __cinit__(self, *args, **kwargs):
        self.b = NULL
        self.state = "closed"
        self.reg_start = NULL
        self.reg_end = NULL
        self.nreg = 0
        self.capreg = 0
        self.regions = {}
        self._queues = []
        self._poll_queues = []
        self.backend_fds = ()
        self.close_callbacks = []
        self.close_timeout = 10.0
        pthread_mutex_init(&self.guard_mutex, NULL)
        pthread_cond_init(&self.guard_cond, NULL)
        pthread_mutex_init(&self.ctl_lock, NULL)
        self.locks_ready = True

    def __dealloc__(self):
        # Unreachable, so no call is inside (a call holds a reference).
        if self.b != NULL:
            lb.blkio_destroy(&self.b)
        free(self.reg_start)
        free(self.reg_end)
        if self.locks_ready:
            pthread_mutex_destroy(&self.guard_mutex)
            pthread_cond_destroy(&self.guard_cond)
            pthread_mutex_destroy(&self.ctl_lock)

    # ---- lifetime guard (see the module docstring) ----------------------

    cdef object _closed_error(self):
        return ValueError(f"{self.driver or 'blkio'} device is closed")

    cdef void _left_while_closing(self) noexcept:
        self._wake_closers()
        if self.users == 0 and self.destroy_pending:
            # close() ran inside a call (or gave up waiting for one): the
            # last call out destroys the instance.
            self.destroy_pending = False
            try:
                self._destroy()
            except BaseException:
                _unraisable(self)

    cdef void _wake_closers(self) noexcept:
        pthread_mutex_lock(&self.guard_mutex)
        pthread_cond_broadcast(&self.guard_cond)
        pthread_mutex_unlock(&self.guard_mutex)

    cdef bint _wait_users(self, Queue queue, Py_ssize_t own, double timeout):
        """Wait, GIL released, until the calls inside this device (or inside
        ``queue``) are only the ``own`` ones of this thread; False on timeout.
        A leaving call signals the condition while holding the mutex that
        this check holds, so no wake-up is lost."""
        cdef timespec ts
        cdef double left
        deadline = time.monotonic() + timeout
        while (queue.users if queue is not None else self.users) > own:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _realtime_after(&ts, left if left < 0.05 else 0.05)
            pthread_mutex_lock(&self.guard_mutex)
            if (queue.users if queue is not None else self.users) > own:
                with nogil:
                    pthread_cond_timedwait(&self.guard_cond, &self.guard_mutex, &ts)
                    pthread_mutex_unlock(&self.guard_mutex)
            else:
                pthread_mutex_unlock(&self.guard_mutex)
        return True

    cdef void _ctl_lock(self) noexcept:
        # Without the GIL only when contended, so that a holder that needs
        # the GIL back can always get it.
        if pthread_mutex_trylock(&self.ctl_lock) != 0:
            with nogil:
                pthread_mutex_lock(&self.ctl_lock)

    cdef void _ctl_unlock(self) noexcept:
        pthread_mutex_unlock(&self.ctl_lock)

    def _on_close(self, callback):
        """Call ``callback(queue, completions)`` for each queue when the
        device is closed or the queue removed, with the completions nobody
        collected (drained, or failed because they never completed)."""
        self.close_callbacks.append(callback)

    # ---- lifecycle primitives used by the facade ------------------------

    def _create(self, str driver):
        cdef bytes bdriver = driver.encode()
        cdef int ret = lb.blkio_create(bdriver, &self.b)
        if ret < 0:
            raise _libblkio_error(ret, f"blkio_create({driver!r})")
        self.driver = driver
        self.state = "created"

    def _get(self, str name, str kind):
        """Read property ``name`` with the getter for C type ``kind``."""
        _dev_enter(self)
        self._ctl_lock()
        try:
            return self._get_locked(name, kind)
        finally:
            self._ctl_unlock()
            _dev_leave(self)

    cdef object _get_locked(self, str name, str kind):
        cdef bytes bname = name.encode()
        cdef const char *cname = bname
        cdef lb.cbool bv
        cdef int iv
        cdef uint64_t uv
        cdef char *sv = NULL
        cdef int ret
        if kind == "bool":
            ret = lb.blkio_get_bool(self.b, bname, &bv)
            _check(ret, f"get {name!r}")
            return bool(bv)
        if kind == "int":
            ret = lb.blkio_get_int(self.b, bname, &iv)
            _check(ret, f"get {name!r}")
            return iv
        if kind == "uint64":
            with nogil:   # "capacity" is a round trip to a vhost-user daemon
                ret = lb.blkio_get_uint64(self.b, cname, &uv)
            _check(ret, f"get {name!r}")
            return uv
        ret = lb.blkio_get_str(self.b, bname, &sv)
        _check(ret, f"get {name!r}")
        try:
            return sv.decode("utf-8", "replace")
        finally:
            free(sv)

    def _set(self, str name, str kind, object value):
        """Write property ``name`` with the setter for C type ``kind``."""
        _dev_enter(self)
        self._ctl_lock()
        try:
            self._set_locked(name, kind, value)
        finally:
            self._ctl_unlock()
            _dev_leave(self)

    cdef object _set_locked(self, str name, str kind, object value):
        cdef bytes bname = name.encode()
        cdef bytes bvalue
        cdef int ret
        if kind == "bool":
            ret = lb.blkio_set_bool(self.b, bname, <lb.cbool>bool(value))
        elif kind == "int":
            ret = lb.blkio_set_int(self.b, bname, <int>value)
        elif kind == "uint64":
            ret = lb.blkio_set_uint64(self.b, bname, <uint64_t>value)
        else:
            bvalue = str(value).encode()
            ret = lb.blkio_set_str(self.b, bname, bvalue)
        if ret < 0:
            raise _libblkio_error(ret, f"set {name!r} = {value!r}")

    def _connect(self):
        cdef int ret
        with nogil:
            ret = lb.blkio_connect(self.b)
        if ret < 0:
            raise _libblkio_error(ret, f"cannot connect {self.driver} device")
        self.state = "connected"

    def _start(self):
        cdef int ret
        with nogil:
            ret = lb.blkio_start(self.b)
        if ret < 0:
            raise _libblkio_error(ret, "blkio_start")
        self.state = "started"
        self.started = True

    def _configure(self, limits, uint64_t capacity, bint read_only, backend_fds=(), int slots=0):
        """Copy the validated limits to C and set up queues and memory."""
        self.capacity = capacity
        self.read_only = read_only
        self.request_alignment = limits.request_alignment
        self.buf_alignment = limits.buf_alignment
        self.mem_region_alignment = limits.mem_region_alignment
        self.max_transfer = limits.max_transfer
        self.max_segments = limits.max_segments
        self.max_segment_len = limits.max_segment_len
        self.max_write_zeroes_len = limits.max_write_zeroes_len
        self.max_discard_len = limits.max_discard_len
        self.needs_mem_regions = limits.needs_mem_regions
        self.needs_mem_region_fd = limits.needs_mem_region_fd
        # Map memory where the driver needs it or pins it (IOMMU mappings are
        # set up once instead of per request); elsewhere mapping buys nothing.
        self.maps_memory = limits.needs_mem_regions or limits.may_pin_mem_regions
        self.backend_fds = tuple(backend_fds)
        granule = max(PAGE, limits.mem_region_alignment)
        self.bounce_chunk = BOUNCE_CHUNK
        if self.max_transfer and self.max_transfer < self.bounce_chunk:
            self.bounce_chunk = self.max_transfer
        self.arena = _Arena(self, granule, 64 << 20)
        self._bounce_pool = BouncePool(self, granule, 1 << 20, 256 << 20)
        cdef int i
        cdef lb.blkioq *q
        i = 0
        while True:
            q = lb.blkio_get_queue(self.b, i)
            if q == NULL:
                break
            self._queues.append(Queue._new(self, q, i, False))
            (<Queue>self._queues[i]).slots = slots
            i += 1
        self.q0 = self._queues[0] if self._queues else None
        i = 0
        while True:
            q = lb.blkio_get_poll_queue(self.b, i)
            if q == NULL:
                break
            self._poll_queues.append(Queue._new(self, q, i, True))
            (<Queue>self._poll_queues[i]).slots = slots
            i += 1

    def _refresh(self, limits, uint64_t capacity):
        self.capacity = capacity

    # ---- state -----------------------------------------------------------

    def _fail_backend(self):
        """The backend died: fail what is in flight, refuse further I/O."""
        for q in self._queues + self._poll_queues:
            if q is not None:
                (<Queue>q)._fail_all(EIO)
        self.started = False
        self.state = "broken"

    cdef int _ensure_started(self) except -1:
        if self.closing or self.b == NULL:
            raise self._closed_error()
        if self.state == "broken":
            raise Error(EIO, f"{self.driver}: the backend hung up; close the device")
        if not self.started:
            raise ValueError(f"{self.driver} device is {self.state}, not started")
        return 0

    @property
    def closed(self) -> bool:
        """True once close() has begun: no new call is accepted."""
        return self.closing or self.b == NULL

    # ---- memory regions --------------------------------------------------

    cdef int _map(self, uintptr_t addr, size_t length, int fd, int64_t fd_offset, object owner) except -1:
        """Hold ``owner``'s memory for the device's lifetime (or until
        unregister), mapping it with libblkio where the driver needs or pins
        memory regions.  The table of held memory is also what the batch API
        and the direct path check buffers against."""
        cdef lb.blkio_mem_region r
        memset(&r, 0, sizeof(r))
        r.addr = <void *>addr
        r.len = length
        r.fd = fd
        r.fd_offset = fd_offset
        cdef int ret = 0
        cdef bint mapped = self.maps_memory
        if addr in self.regions:
            raise ValueError(f"memory at {addr:#x} is already registered with this device")
        if mapped:
            self._ctl_lock()
            with nogil:
                ret = lb.blkio_map_mem_region(self.b, &r)
            self._ctl_unlock()
            if ret < 0:
                raise _libblkio_error(ret, f"blkio_map_mem_region({length} bytes at {addr:#x})")
        # The owner reference keeps the memory and its fd alive while mapped:
        # unmapping after the fd closed corrupts data on vhost-user.
        self.regions[addr] = (length, fd, fd_offset, owner, mapped)
        self._table_insert(addr, addr + length)
        return 0

    cdef int _unmap(self, uintptr_t addr) except -1:
        length, fd, fd_offset, owner, mapped = self.regions.pop(addr)
        cdef lb.blkio_mem_region r
        memset(&r, 0, sizeof(r))
        r.addr = <void *>addr       # exactly the values given to map
        r.len = <size_t>length
        r.fd = <int>fd
        r.fd_offset = <int64_t>fd_offset
        # Out of the lookup table first: no request can be validated against
        # the region while it is being unmapped (``owner`` keeps it alive).
        self._table_remove(addr)
        if mapped and self.b != NULL:
            self._ctl_lock()
            with nogil:
                lb.blkio_unmap_mem_region(self.b, &r)
            self._ctl_unlock()
        return 0

    def _table_insert(self, uintptr_t start, uintptr_t end):
        cdef Py_ssize_t i, j
        if self.nreg == self.capreg:
            newcap = max(16, 2 * self.capreg)
            s = <uintptr_t *>realloc(self.reg_start, newcap * sizeof(uintptr_t))
            if s == NULL:
                raise MemoryError()
            self.reg_start = s
            e = <uintptr_t *>realloc(self.reg_end, newcap * sizeof(uintptr_t))
            if e == NULL:
                raise MemoryError()
            self.reg_end = e
            self.capreg = newcap
        i = 0
        while i < self.nreg and self.reg_start[i] < start:
            i += 1
        j = self.nreg
        while j > i:
            self.reg_start[j] = self.reg_start[j - 1]
            self.reg_end[j] = self.reg_end[j - 1]
            j -= 1
        self.reg_start[i] = start
        self.reg_end[i] = end
        self.nreg += 1

    def _table_remove(self, uintptr_t start):
        cdef Py_ssize_t i = 0
        while i < self.nreg and self.reg_start[i] != start:
            i += 1
        if i == self.nreg:
            return
        while i + 1 < self.nreg:
            self.reg_start[i] = self.reg_start[i + 1]
            self.reg_end[i] = self.reg_end[i + 1]
            i += 1
        self.nreg -= 1

    cdef bint in_range(self, uintptr_t start, size_t length) noexcept nogil:
        """Does [start, start+length) lie inside one mapped region?"""
        cdef Py_ssize_t lo = 0, hi = self.nreg, mid
        while lo < hi:       # last region starting at or before `start`
            mid = (lo + hi) // 2
            if self.reg_start[mid] <= start:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return False
        return start + length <= self.reg_end[lo - 1]

    def alloc(self, nbytes):
        """A numpy uint8 array of ``nbytes`` mapped into this device.

        Aligned to mem-region-alignment and at least 4096 bytes.  I/O on it is
        zero-copy on every driver.  The memory outlives the device; it returns
        to the device's arena when the array (and every view of it) is gone.
        """
        cdef uint64_t n = _u64(nbytes, "nbytes")
        if n == 0:
            raise ValueError("alloc size must be positive")
        _dev_enter(self)
        try:
            self._ensure_started()
            return self.arena.alloc(n)
        finally:
            _dev_leave(self)

    def register(self, array):
        """Register caller memory with the device so I/O on it goes direct.

        Follows QEMU's register_buf: address and size must be multiples of
        mem-region-alignment (ValueError); the memory is mapped with libblkio
        only where the driver needs or pins memory regions; where the driver
        needs an fd and the memory has none (plain numpy memory) nothing is
        registered and I/O on it is bounced.  The device holds a reference
        to the memory until ``unregister`` or close.  Returns True when the
        memory is registered (usable by the batch API and never bounced).
        """
        _dev_enter(self)
        try:
            self._ensure_started()
            return self._register(array)
        finally:
            _dev_leave(self)

    cdef object _register(self, object array):
        cdef Py_buffer view
        PyObject_GetBuffer(array, &view, PyBUF_ANY_CONTIGUOUS)
        cdef uintptr_t addr = <uintptr_t>view.buf
        cdef size_t length = <size_t>view.len
        PyBuffer_Release(&view)
        if length == 0 or addr % self.mem_region_alignment or length % self.mem_region_alignment:
            raise ValueError(f"cannot register {length} bytes at {addr:#x}: address and size must be "
                             f"multiples of mem-region-alignment ({self.mem_region_alignment})")
        if self.in_range(addr, length):
            return True         # already inside registered memory (alloc arena, a Buffer)
        owner = _owner_of(array)
        cdef int fd = -1
        cdef int64_t fd_offset = 0
        cdef Buffer buf
        if owner is not None:
            buf = owner.buffer if isinstance(owner, _Slice) else owner
            fd = buf.fd
            fd_offset = <int64_t>(addr - <uintptr_t>buf.addr)
        elif self.needs_mem_region_fd:
            return False        # no fd: bounced at I/O time
        self._map(addr, length, fd, fd_offset, [array])    # a list marks a user registration
        return True

    def unregister(self, array):
        """Undo ``register``: unmap exactly the region that was mapped.

        Refuses (ValueError) while requests in flight still use the memory:
        the device could still read or write it.  Returns False when the
        memory was not registered."""
        cdef Py_buffer view
        PyObject_GetBuffer(array, &view, PyBUF_ANY_CONTIGUOUS)
        cdef uintptr_t addr = <uintptr_t>view.buf
        PyBuffer_Release(&view)
        cdef Py_ssize_t users = 0
        _dev_enter(self)
        try:
            entry = self.regions.get(addr)
            if entry is None or not isinstance(entry[3], list):
                return False        # not registered, or an arena chunk / the pool
            length = entry[0]
            for q in self._queues + self._poll_queues:
                if q is not None:
                    users += (<Queue>q)._using(addr, addr + length)
            if users:
                raise ValueError(f"cannot unregister {length} bytes at {addr:#x}: {users} "
                                 f"request(s) in flight still use it; wait for them first")
            # Nothing in flight uses it, and nothing new can: the check and the
            # removal from the table below happen with the GIL held.
            self._unmap(addr)
            return True
        finally:
            _dev_leave(self)

    @property
    def poll_us(self) -> int:
        """Microseconds that waits busy-poll for a completion before sleeping
        (0, the default: never).  A few tens of µs cut the latency of
        backends whose wake-ups are slow (vhost-user) at the cost of CPU."""
        return self.poll_ns // 1000

    @poll_us.setter
    def poll_us(self, value_arg):
        cdef Py_ssize_t value = _index(value_arg, "poll_us")
        if value < 0:
            raise ValueError("poll_us must be >= 0")
        self.poll_ns = <int64_t>value * 1000

    @property
    def bounce_pool(self):
        """The device's ``BouncePool``."""
        return self._bounce_pool

    @property
    def mapped_regions(self) -> int:
        """Number of memory regions mapped into the device."""
        return len(self.regions)

    # ---- the request path ------------------------------------------------

    cdef int _check_range(self, uint64_t offset, uint64_t length, str what) except -1:
        self._ensure_started()
        cdef uint64_t ra = self.request_alignment
        if offset % ra or length % ra:
            raise ValueError(f"{what}: offset {offset} and length {length} must be multiples of "
                             f"request-alignment ({ra}) on {self.driver}")
        if offset > self.capacity or length > self.capacity - offset:
            raise ValueError(f"{what}: {length} bytes at offset {offset} pass the end of the "
                             f"device (capacity {self.capacity})")
        return 0

    cdef int _check_writable(self, str what) except -1:
        if self.read_only:
            raise ReadOnlyError(EBADF, f"{what} refused: device is read-only ({self.driver})")
        return 0

    cdef bint _direct_ok(self, iovec *iov, int iovcnt) noexcept nogil:
        if iovcnt > self.max_segments:
            return False
        cdef int i
        cdef uintptr_t a
        for i in range(iovcnt):
            a = <uintptr_t>iov[i].iov_base
            if a % self.buf_alignment or iov[i].iov_len % self.buf_alignment:
                return False
            if self.max_segment_len and iov[i].iov_len > self.max_segment_len:
                return False
            if self.needs_mem_regions and not self.in_range(a, iov[i].iov_len):
                return False
        return True

    cdef Completion _prepare(self, int op, uint64_t offset, uint64_t length, _Views views,
                             iovec *iov, int iovcnt, unsigned int flags, object user_data,
                             bint internal, Queue drive, object bounce=None, bint nowait=False):
        """One request: use the caller's memory where the driver can, else
        a bounce buffer from the pool (acquired here, FIFO; with ``nowait``
        None is returned when the pool cannot serve it at once)."""
        cdef Completion c = Completion.__new__(Completion)
        c.op = op
        c.offset = offset
        c.length = length
        c.flags = flags
        c.internal = internal
        c.user_data = user_data
        if op != OP_READ and op != OP_WRITE:
            return c
        c.views = views
        c.user_iov = iov
        c.user_iovcnt = iovcnt
        cdef Py_ssize_t start
        cdef BouncePool pool
        if self._direct_ok(iov, iovcnt):
            c.iov = iov
            c.iovcnt = iovcnt
            return c
        pool = self._bounce_pool
        if bounce is not None:
            start = pool._start_of(bounce, length)   # acquired by the caller (asyncio)
        elif nowait:
            start = pool._try_acquire(length)
            if start < 0:
                return None
        else:
            start = pool._acquire_blocking(length, -1.0, drive)
        c.pool = pool
        c.bounce_buffer = pool.buffer
        c.bounce_start = start
        c.iov1.iov_base = pool.buffer.addr + <size_t>start * pool.granule
        c.iov1.iov_len = length
        c.iov = &c.iov1
        c.iovcnt = 1
        if op == OP_WRITE:
            _gather(iov, iovcnt, <char *>c.iov1.iov_base)
        return c

    cdef object _run(self, int op, uint64_t offset, uint64_t length, _Views views, unsigned int flags):
        """The blocking path: split into pieces, bounce where needed, submit
        each on queue 0 and wait for it (GIL released, Ctrl-C honoured)."""
        if op != OP_READ and op != OP_FLUSH:
            self._check_writable(_OP_NAMES[op])
        if op != OP_FLUSH:
            self._check_range(offset, length, _OP_NAMES[op])
        else:
            self._ensure_started()
        cdef Queue q = self._queues[0] if self._queues else None
        if q is None:
            raise ValueError(f"{self.driver} device has no queue 0 (num_queues=0, "
                             f"or queue 0 was removed)")
        _q_use(q)
        try:
            return self._run_on(q, op, offset, length, views, flags)
        finally:
            _q_unuse(q)

    cdef object _run_on(self, Queue q, int op, uint64_t offset, uint64_t length, _Views views,
                        unsigned int flags):
        cdef uint64_t limit = 0, pos = 0, piece
        cdef iovec *sub
        cdef int subcnt
        cdef Completion c
        if op == OP_READ or op == OP_WRITE:
            limit = self.max_transfer
        elif op == OP_WRITE_ZEROES:
            limit = self.max_write_zeroes_len
        elif op == OP_DISCARD:
            limit = self.max_discard_len
        if limit:
            limit -= limit % self.request_alignment
        if length == 0 and op != OP_FLUSH:
            return 0
        while True:
            piece = length - pos
            if limit and piece > limit:
                piece = limit
            if op == OP_READ or op == OP_WRITE:
                if pos == 0 and piece == length:
                    sub = views.iov
                    subcnt = views.n
                else:
                    subcnt = _slice_iov(views.iov, views.n, pos, piece, &sub)
                if not self._direct_ok(sub, subcnt) and piece > self.bounce_chunk:
                    # Bounced pieces are cut to the chunk size: re-slice.
                    if sub != views.iov:
                        free(sub)
                    piece = self.bounce_chunk - self.bounce_chunk % self.request_alignment
                    subcnt = _slice_iov(views.iov, views.n, pos, piece, &sub)
                c = self._prepare(op, offset + pos, piece, views, sub, subcnt, flags, None, True, q)
            else:
                c = self._prepare(op, offset + pos, piece, None, NULL, 0, flags, None, True, q)
            if piece != length:
                self.n_split += 1
            q._enqueue(c, True)
            if not c.done:
                q._drive(0, -1.0, c)
            if c.ret < 0:
                if op == OP_DISCARD and (c.ret == -ENOTSUP or c.ret == -EOPNOTSUPP):
                    return 0    # discard is advisory
                raise _request_error(c.ret, c._error_msg,
                                     f"{_OP_NAMES[op]} of {piece} bytes at offset {offset + pos}",
                                     self.read_only)
            pos += piece
            if pos >= length:
                return length

    # ---- blocking I/O on queue 0 ----------------------------------------

    def read(self, offset, nbytes):
        """Read ``nbytes`` at ``offset`` into a new numpy uint8 array (mapped
        memory from ``alloc``, so no copy on any driver)."""
        cdef uint64_t off = _u64(offset, "offset"), n = _u64(nbytes, "nbytes")
        _dev_enter(self)
        try:
            self._check_range(off, n, "read")
            if n == 0:
                return np.empty(0, dtype=np.uint8)
            out = self.arena.alloc(n)
            self._run(OP_READ, off, n, _acquire_views(out, True, True), 0)
            return out
        finally:
            _dev_leave(self)

    cdef object _single(self, int op, uint64_t offset, object buf, unsigned int flags):
        """One buffer (inside the device's guard): the hot path."""
        cdef Queue q = self.q0
        cdef _Views v
        if q is None:
            v = _acquire_views(buf, op == OP_READ, True)
            return self._run(op, offset, v.total, v, flags)
        _q_use(q)
        try:
            return self._single_on(q, op, offset, buf, flags)
        finally:
            _q_unuse(q)

    cdef object _single_on(self, Queue q, int op, uint64_t offset, object buf, unsigned int flags):
        """When the request needs no split and no bounce, submit it straight
        from the caller's buffer with a recycled Completion; anything else
        takes the general path (``_run_on``)."""
        cdef Py_buffer view
        cdef uint64_t length, ra = self.request_alignment
        cdef _Views v
        try:
            PyObject_GetBuffer(buf, &view, _VIEW_FLAGS[op == OP_READ])
        except Exception:
            v = _acquire_views(buf, op == OP_READ, True)     # raises the clear error
            return self._checked_run_on(q, op, offset, v, flags)
        length = <uint64_t>view.len
        cdef iovec one
        one.iov_base = view.buf
        one.iov_len = <size_t>length
        if (not self.started or length == 0 or offset % ra or length % ra
                or offset > self.capacity or length > self.capacity - offset
                or (self.max_transfer and length > self.max_transfer)
                or (op != OP_READ and self.read_only) or not self._direct_ok(&one, 1)):
            PyBuffer_Release(&view)
            v = _acquire_views(buf, op == OP_READ, True)
            return self._checked_run_on(q, op, offset, v, flags)
        cdef unsigned long tid = PyThread_get_thread_ident()
        if tid != self.owner_thread:
            if self.owner_thread == 0:
                self.owner_thread = tid
            else:
                self.threaded = True    # from now on every submission releases the GIL
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
        c.ret = 0
        c.iov1 = one
        c.iov = &c.iov1
        c.iovcnt = 1
        try:
            q._enqueue(c, True)
            if not c.done:
                q._drive(0, -1.0, c)
        except BaseException:
            if not c.done:
                # Still in flight: the request keeps the caller's buffer.
                v = _Views.__new__(_Views)
                v.buf1 = view
                v.bufs = &v.buf1
                v.iov = &v.iov1
                v.iov1 = one
                v.n = 1
                c.views = v
                raise
            PyBuffer_Release(&view)
            raise
        PyBuffer_Release(&view)
        if c.ret < 0:
            raise _request_error(c.ret, c._error_msg,
                                 f"{_OP_NAMES[op]} of {length} bytes at offset {offset}",
                                 self.read_only)
        c._error_msg = None
        q.spare = c
        return length

    cdef object _checked_run_on(self, Queue q, int op, uint64_t offset, _Views v, unsigned int flags):
        if op != OP_READ and op != OP_FLUSH:
            self._check_writable(_OP_NAMES[op])
        self._check_range(offset, v.total, _OP_NAMES[op])
        return self._run_on(q, op, offset, v.total, v, flags)

    def readinto(self, offset, buf):
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (any writable
        contiguous buffer); returns the number of bytes read."""
        cdef uint64_t off = _u64(offset, "offset")
        _dev_enter(self)
        try:
            return self._single(OP_READ, off, buf, 0)
        finally:
            _dev_leave(self)

    def write(self, offset, buf, *, bint fua=False):
        """Write ``buf`` (any contiguous buffer, bytes included) at ``offset``;
        ``fua=True`` makes it durable before returning.  Returns bytes written."""
        cdef uint64_t off = _u64(offset, "offset")
        _dev_enter(self)
        try:
            return self._single(OP_WRITE, off, buf, REQ_FUA if fua else 0)
        finally:
            _dev_leave(self)

    def readv(self, offset, bufs):
        """Read consecutive bytes at ``offset`` into each buffer of ``bufs`` in
        turn; returns the total."""
        cdef uint64_t off = _u64(offset, "offset")
        cdef _Views v
        _dev_enter(self)
        try:
            v = _acquire_views(bufs, True, False)
            return self._run(OP_READ, off, v.total, v, 0)
        finally:
            _dev_leave(self)

    def writev(self, offset, bufs, *, bint fua=False):
        """Write the buffers of ``bufs`` back to back at ``offset``."""
        cdef uint64_t off = _u64(offset, "offset")
        cdef _Views v
        _dev_enter(self)
        try:
            v = _acquire_views(bufs, False, False)
            return self._run(OP_WRITE, off, v.total, v, REQ_FUA if fua else 0)
        finally:
            _dev_leave(self)

    def write_zeroes(self, offset, length, *, bint fua=False,
                     bint may_unmap=True, bint no_fallback=False):
        """Write ``length`` zero bytes at ``offset``.  ``may_unmap=False``
        keeps the blocks allocated; ``no_fallback=True`` fails rather than
        writing zeroes the slow way."""
        cdef uint64_t off = _u64(offset, "offset"), n = _u64(length, "length")
        cdef unsigned int flags = _zero_flags(fua, may_unmap, no_fallback)
        _dev_enter(self)
        try:
            self._run(OP_WRITE_ZEROES, off, n, None, flags)
        finally:
            _dev_leave(self)

    def discard(self, offset, length):
        """Discard ``length`` bytes at ``offset`` (advisory: a device that
        cannot discard answers success)."""
        cdef uint64_t off = _u64(offset, "offset"), n = _u64(length, "length")
        _dev_enter(self)
        try:
            self._run(OP_DISCARD, off, n, None, 0)
        finally:
            _dev_leave(self)

    def flush(self):
        """Make completed writes durable."""
        _dev_enter(self)
        try:
            self._run(OP_FLUSH, 0, 0, None, 0)
        finally:
            _dev_leave(self)

    # ---- queues ----------------------------------------------------------

    def queue(self, index=0):
        """Queue ``index`` (0 .. num_queues-1)."""
        index = _index(index, "index")
        if self.closing or self.b == NULL:
            raise self._closed_error()
        if self.state != "broken":      # a broken device still shows its queues
            self._ensure_started()
        if not 0 <= index < len(self._queues) or self._queues[index] is None:
            raise IndexError(f"queue {index} does not exist or was removed "
                             f"({len(self._queues)} queue slot(s))")
        return self._queues[index]

    def poll_queue(self, index=0):
        """Poll queue ``index`` (0 .. num_poll_queues-1)."""
        index = _index(index, "index")
        if self.closing or self.b == NULL:
            raise self._closed_error()
        if self.state != "broken":
            self._ensure_started()
        if not 0 <= index < len(self._poll_queues) or self._poll_queues[index] is None:
            raise IndexError(f"poll queue {index} does not exist or was removed "
                             f"({len(self._poll_queues)} poll queue slot(s))")
        return self._poll_queues[index]

    @property
    def queues(self):
        """The device's queues (regular, then poll queues)."""
        return tuple(q for q in self._queues + self._poll_queues if q is not None)

    def _add_queue(self, bint poll):
        cdef int idx
        cdef lb.blkioq *q
        _dev_enter(self)
        try:
            self._ensure_started()
            self._ctl_lock()
            idx = lb.blkio_add_poll_queue(self.b) if poll else lb.blkio_add_queue(self.b)
            if idx >= 0:
                q = lb.blkio_get_poll_queue(self.b, idx) if poll else lb.blkio_get_queue(self.b, idx)
            self._ctl_unlock()
            if idx < 0:
                raise _libblkio_error(idx, "blkio_add_poll_queue" if poll else "blkio_add_queue")
            if q == NULL:
                raise Error(EIO, f"libblkio added queue {idx} but does not return it")
            qq = Queue._new(self, q, idx, poll)
            lst = self._poll_queues if poll else self._queues
            while len(lst) <= idx:
                lst.append(None)
            lst[idx] = qq
            return qq
        finally:
            _dev_leave(self)

    def _remove_queue(self, Queue queue, double timeout):
        """Remove ``queue``: refuse new calls on it, wait for the calls in
        progress to leave (their waits give up within a slice), drain its
        requests (``timeout`` seconds), then remove it from libblkio."""
        _dev_enter(self)
        try:
            self._ensure_started()
            if queue.device is not self or queue.removing:
                raise ValueError("queue is not a live queue of this device")
            queue.removing = True
            queue.remove_timeout = timeout
            own = blkio_py_held(<void *>queue)
            if not self._wait_users(queue, own, timeout + 2 * WAIT_SLICE) or own:
                # A call of this thread (or one stuck inside libblkio) is still
                # in the queue: the last one to leave removes it.
                queue.remove_pending = True
                return
            self._finish_remove(queue)
        finally:
            _dev_leave(self)

    def _finish_remove(self, Queue queue):
        """Drain and remove a queue nobody is inside any more."""
        queue.draining = True
        interrupted = None
        try:
            self._drain(queue, queue.remove_timeout)
        except BaseException as e:      # Ctrl-C: stop draining, still remove
            interrupted = e
        kept = self._keep_undrained(queue)
        self._ctl_lock()
        cdef int ret = (lb.blkio_remove_poll_queue(self.b, queue.index) if queue.is_poll_queue
                        else lb.blkio_remove_queue(self.b, queue.index))
        self._ctl_unlock()
        orphans = self._orphans(queue, kept)
        queue.removed = True
        queue.q = NULL
        lst = self._poll_queues if queue.is_poll_queue else self._queues
        lst[queue.index] = None
        if queue is self.q0:
            self.q0 = None
        while lst and lst[len(lst) - 1] is None:
            lst.pop()
        self._call_close_callbacks(queue, orphans)
        if ret < 0:
            raise _libblkio_error(ret, "blkio_remove_queue")
        if interrupted is not None:
            raise interrupted

    def _drain(self, Queue queue, double timeout):
        """Wait (bounded) for the queue's requests in flight.  Only close()
        and remove_queue() call it, once no other call is inside."""
        deadline = time.monotonic() + timeout
        while queue.inflight > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                queue._drive(<int>queue.inflight, left, None)
            except TimeoutError:
                return False
            except OSError:
                return False
        return True

    cdef int _keep_undrained(self, Queue queue) except -1:
        """Requests still in flight after the drain: unless the backend is
        gone, the device may still write their memory after the instance or
        queue is destroyed, so that memory is never given back."""
        if queue.inflight == 0:
            return 0
        if self.state == "broken" or self._backend_dead():
            return 0
        kept = []
        cdef Completion c = queue.head
        while c is not None:
            kept.append(c)
            c = c.next
        if queue.batch_inflight:
            kept.append([entry[3] for entry in self.regions.values()])
        _kept_for_the_kernel.append(kept)
        import warnings
        warnings.warn(f"{self.driver}: {queue.inflight} request(s) did not complete before the "
                      f"queue went away; their memory is kept until the process exits",
                      ResourceWarning, stacklevel=2)
        return <int>queue.inflight

    cdef list _orphans(self, Queue queue, int kept):
        """Completions nobody collected: those drained into ``ready`` and those
        that never completed (failed with ECANCELED; their memory is released
        only when nothing can touch it any more)."""
        cdef Completion c
        orphans = queue.ready
        queue.ready = []
        while queue.head is not None:
            c = queue.head
            queue._unlink(c)
            c.ret = -ECANCELED
            c._error_msg = "the device was closed (or the queue removed) before it completed"
            c.done = True
            if not kept:
                c._release_memory()
            if not c.internal:
                orphans.append(c)
        queue.inflight = 0
        queue.outstanding = 0
        queue.batch_inflight = 0
        queue.spare = None
        queue.reap_out = None
        return orphans

    cdef int _call_close_callbacks(self, Queue queue, list orphans) except -1:
        for cb in list(self.close_callbacks):
            try:
                cb(queue, orphans)
            except BaseException:
                _unraisable(cb)
        return 0

    # ---- backend liveness (vhost-user) ----------------------------------

    cdef int _backend_dead(self):
        """Has the peer of a backend socket hung up?  (vhost-user never
        reports a dead daemon: requests just never complete.)"""
        cdef pollfd p
        for fd in self.backend_fds:
            p.fd = fd
            p.events = 0
            p.revents = 0
            if c_poll(&p, 1, 0) > 0 and (p.revents & (POLLHUP | POLLERR)):
                return 1
        return 0

    # ---- close -----------------------------------------------------------

    def _close(self, double drain_timeout=10.0):
        """Refuse new calls, wait for the calls in progress to leave, drain
        requests in flight (bounded), unmap memory, destroy.  See the module
        docstring for the whole mechanism."""
        if self.b == NULL:
            self.state = "closed"
            return
        cdef Py_ssize_t own = blkio_py_held(<void *>self)
        if self.closing:
            # Another thread is closing it, or a call of ours will destroy it
            # as it leaves: wait for the first (never for ourselves).
            if own == 0:
                self._wait_destroyed(self.close_timeout + 5.0)
            return
        self.closing = True
        self.close_timeout = drain_timeout
        if self._bounce_pool is not None:
            self._bounce_pool._wake_all()
        if not self._wait_users(None, own, drain_timeout + 2 * WAIT_SLICE) or own:
            # A call of this thread (a signal handler or destructor closing the
            # device it interrupted), or one stuck inside libblkio: the last
            # call to leave destroys the instance.
            self.destroy_pending = True
            return
        self._destroy()

    def _wait_destroyed(self, double timeout):
        cdef timespec ts
        deadline = time.monotonic() + timeout
        while self.b != NULL and time.monotonic() < deadline:
            _realtime_after(&ts, 0.05)
            pthread_mutex_lock(&self.guard_mutex)
            if self.b != NULL:
                with nogil:
                    pthread_cond_timedwait(&self.guard_cond, &self.guard_mutex, &ts)
                    pthread_mutex_unlock(&self.guard_mutex)
            else:
                pthread_mutex_unlock(&self.guard_mutex)

    def _destroy(self):
        """Drain, unmap, destroy; no call is inside the device any more."""
        self.draining = True
        interrupted = None
        queues = [q for q in self._queues + self._poll_queues if q is not None]
        deadline = time.monotonic() + self.close_timeout
        if self.state != "broken" and not self._backend_dead():
            for q in queues:
                try:
                    self._drain(q, max(0.0, deadline - time.monotonic()))
                except BaseException as e:      # Ctrl-C: stop draining, still close
                    interrupted = e
                    break
        kept = [self._keep_undrained(q) for q in queues]
        for addr in sorted(self.regions):
            self._unmap(addr)
        with nogil:
            lb.blkio_destroy(&self.b)
        self.b = NULL
        self.state = "closed"
        self.started = False
        orphans = [self._orphans(q, k) for q, k in zip(queues, kept)]
        for q in queues:
            (<Queue>q).q = NULL
            (<Queue>q).removed = True
        self._queues = []
        self._poll_queues = []
        self.q0 = None
        # Break the reference cycles through the device so that memory (and
        # its memfd) nobody views is freed now, not by the cyclic collector.
        if self.arena is not None:
            self.arena.device = None
            self.arena.chunks = []
        if self._bounce_pool is not None:
            self._bounce_pool._device_closed()
        for q, o in zip(queues, orphans):
            self._call_close_callbacks(q, o)
        self.close_callbacks = []
        self._wake_closers()
        if interrupted is not None:
            raise interrupted

    def _stats(self):
        return (self.n_requests, self.n_bounced, self.bounced_bytes, self.n_split)
