"""Memory of our own: memfd-backed buffers and the allocator that carves them.

``Buffer`` is page-aligned memory with a file descriptor (memfd + mmap), so a
driver that needs a memory-region fd (vhost-user) can map it.
``RangeAllocator`` is a first-fit allocator in O(log n) used by the alloc
arena and the bounce pool; ``ArenaSlice`` is one allocation, viewed by numpy.
This module knows nothing of devices and never calls libblkio (the modules
that map memory into a device are ``_handle`` and ``_pool``).
"""

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from libc.errno cimport errno
from libc.stdint cimport uintptr_t
from libc.stdlib cimport calloc, free
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.unistd cimport close as c_close

from ._args cimport as_u64
from ._posix cimport memfd_create, MFD_CLOEXEC, ftruncate, sysconf, _SC_PAGESIZE

import os

PAGE = <size_t>sysconf(_SC_PAGESIZE)


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
        cdef size_t nbytes = as_u64(nbytes_arg, "nbytes")
        if nbytes == 0:
            raise ValueError("Buffer size must be positive")
        self.nbytes = nbytes
        self.size = (nbytes + PAGE - 1) // PAGE * PAGE
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
        cdef int half = 1, a, p, s
        cdef bint changed
        for i in range(lo, hi + 1):
            self.best[i] = v
            self.pref[i] = v
            self.suf[i] = v
        lo >>= 1
        hi >>= 1
        while lo >= 1:
            changed = False
            for i in range(lo, hi + 1):
                l = 2 * i
                r = l + 1
                p = self.pref[l] if self.pref[l] < half else half + self.pref[r]
                s = self.suf[r] if self.suf[r] < half else half + self.suf[l]
                a = self.best[l] if self.best[l] > self.best[r] else self.best[r]
                if self.suf[l] + self.pref[r] > a:
                    a = self.suf[l] + self.pref[r]
                if p != self.pref[i] or s != self.suf[i] or a != self.best[i]:
                    self.pref[i] = p
                    self.suf[i] = s
                    self.best[i] = a
                    changed = True
            if not changed:
                break       # a node's values depend only on its children's
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
cdef class ArenaSlice:
    """Memory carved out of an arena chunk; returned to the arena when collected.

    numpy arrays from ``Device.alloc`` view one of these."""

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


cdef object owner_of(object obj):
    """The Buffer or ArenaSlice behind an array (walking .base / .obj), or None."""
    seen = 0
    while obj is not None and seen < 32:
        if isinstance(obj, (Buffer, ArenaSlice)):
            return obj
        nxt = getattr(obj, "base", None)
        if nxt is None and isinstance(obj, memoryview):
            nxt = obj.obj
        obj = nxt
        seen += 1
    return None
