"""Memory of our own: memfd-backed buffers and the allocator that carves them.

``Buffer`` is page-aligned memory with a file descriptor (memfd + mmap), so a
driver that needs a memory-region fd (vhost-user) can map it.
``RangeAllocator`` is a first-fit allocator in O(log n) used by the alloc
arena and the bounce pool (single granules on a faster bitmap path); ``ArenaSlice`` is one allocation, viewed by numpy.
``resident_pages`` asks mincore(2) which pages of a file are in the page cache.
This module knows nothing of devices and never calls libblkio (the modules
that map memory into a device are ``_handle`` and ``_pool``).
"""

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.ref cimport Py_INCREF
from libc.errno cimport errno
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from posix.mman cimport mmap, munmap, mincore, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.unistd cimport close as c_close

cimport numpy as cnp
from ._checks cimport as_u64
from ._posix cimport memfd_create, MFD_CLOEXEC, ftruncate, sysconf, _SC_PAGESIZE

import os

cnp.import_array()

PAGE = <size_t>sysconf(_SC_PAGESIZE)
# Larger than any mapping can be (a 64-bit user address space): sizes past
# it are refused before rounding to pages could wrap around.
MAX_BYTES = <size_t>1 << 56


@cython.final
cdef class Buffer:
    """Page-aligned memory of our own: ``memfd_create`` + ``mmap``.

    ``Buffer(nbytes)`` exposes ``nbytes`` through the buffer protocol
    (``numpy.frombuffer(buf, numpy.uint8)``).  The memory has a file descriptor
    (``fd``), so drivers that need one (vhost-user) can map it.  It is freed
    only when no Python object views it any more: a device that had it mapped
    unmaps it on close, and the arrays stay valid.
    """

    def __cinit__(self, nbytes_arg, *, str name not None="blkio-buffer"):
        self.addr = NULL
        self.fd = -1
        cdef size_t nbytes = as_u64(nbytes_arg, "nbytes")
        if nbytes == 0:
            raise ValueError("Buffer size must be positive")
        if nbytes > MAX_BYTES:
            raise ValueError(f"Buffer size {nbytes} is more than a process can map")
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

    def __reduce__(self):
        raise TypeError("a blkio.Buffer cannot be pickled: it is memory of this process "
                        "(copy its contents, e.g. bytes(buf), to send them)")

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


cdef extern from *:
    int _ctz64 "__builtin_ctzll" (unsigned long long x) noexcept nogil


@cython.final
cdef class RangeAllocator:
    """First-fit allocator over ``n`` granules, O(log n) per operation.

    A segment tree keeps, for every node, the longest free run inside it and
    the free runs touching its two ends, so the lowest-addressed hole that fits
    is found by one descent instead of a scan over live allocations.

    Single granules (the bounce pool's 4 KiB requests) take a faster path with
    the same answer: a bitmap of free granules with one summary bit per word
    on each level above, whose lowest set bit is the lowest free granule.  It
    leaves the tree's leaves stale; they are brought up to date, each once,
    before the tree is next read (amortized, no more work than updating the
    tree at once).
    """

    def __cinit__(self, size_t n):
        self.best = self.pref = self.suf = self.sizes = self.stale = NULL
        self.is_stale = NULL
        self.bits = NULL
        if n > 0x7FFFFFFF:
            raise ValueError(f"RangeAllocator: {n} granules, at most 2**31-1")
        self.n = n
        self.leaves = 1
        while self.leaves < n:
            self.leaves <<= 1
        cdef size_t total = 2 * self.leaves
        self.best = <int *>calloc(total, sizeof(int))
        self.pref = <int *>calloc(total, sizeof(int))
        self.suf = <int *>calloc(total, sizeof(int))
        self.sizes = <int *>calloc(self.leaves, sizeof(int))
        self.stale = <int *>calloc(self.leaves, sizeof(int))
        self.is_stale = <unsigned char *>calloc(self.leaves, 1)
        # The bitmap's levels, from one bit per granule up to a single word.
        cdef size_t words = (n + 63) // 64 if n else 1, nwords = 0
        self.nlevels = 0
        while True:
            self.level_at[self.nlevels] = nwords
            nwords += words
            self.nlevels += 1
            if words == 1:
                break
            words = (words + 63) // 64
        self.bits = <unsigned long long *>calloc(nwords, sizeof(unsigned long long))
        if not (self.best and self.pref and self.suf and self.sizes and self.stale
                and self.is_stale and self.bits):
            raise MemoryError()
        self.nstale = 0
        self.used = 0
        # Leaves past n stay "used" (0); the real ones start free.
        self._set(0, n, False)
        self._mark(0, n, True)

    def __dealloc__(self):
        free(self.best)
        free(self.pref)
        free(self.suf)
        free(self.sizes)
        free(self.stale)
        free(self.is_stale)
        free(self.bits)

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

    cdef void _mark(self, size_t start, size_t count, bint free) noexcept nogil:
        """Set granules [start, start+count) free or used in the bitmap, a
        word at a time."""
        cdef size_t end = start + count, take
        cdef unsigned long long mask, old, new
        while start < end:
            take = 64 - (start & 63)
            if take > end - start:
                take = end - start
            mask = (~0ULL >> (64 - take)) << (start & 63)
            old = self.bits[start >> 6]
            new = old | mask if free else old & ~mask
            self.bits[start >> 6] = new
            if (old == 0) != (new == 0):
                self._carry(start >> 6, free)
            start += take

    cdef inline void _mark_one(self, size_t g, bint free) noexcept nogil:
        """_mark of one granule (the fast path's)."""
        cdef unsigned long long mask = 1ULL << (g & 63)
        cdef unsigned long long old = self.bits[g >> 6]
        cdef unsigned long long new = old | mask if free else old & ~mask
        self.bits[g >> 6] = new
        if (old == 0) != (new == 0):
            self._carry(g >> 6, free)

    cdef void _carry(self, size_t idx, bint free) noexcept nogil:
        """Word ``idx`` of level 0 turned zero or non-zero: its bit in the
        level above follows, and so on up while words keep turning."""
        cdef unsigned long long mask, old, new
        cdef unsigned long long *word
        cdef int level = 1
        while level < self.nlevels:
            word = &self.bits[self.level_at[level] + (idx >> 6)]
            mask = 1ULL << (idx & 63)
            old = word[0]
            new = old | mask if free else old & ~mask
            word[0] = new
            if (old == 0) == (new == 0):
                break
            idx >>= 6
            level += 1

    cdef void _touch(self, size_t g) noexcept nogil:
        """The tree's leaf for granule g may now be out of date."""
        if not self.is_stale[g]:
            self.is_stale[g] = 1
            self.stale[self.nstale] = <int>g
            self.nstale += 1

    cdef void _sync(self) noexcept nogil:
        """Bring the tree's stale leaves up to date with the bitmap."""
        cdef size_t g
        cdef int v
        while self.nstale:
            self.nstale -= 1
            g = <size_t>self.stale[self.nstale]
            self.is_stale[g] = 0
            v = <int>((self.bits[g >> 6] >> (g & 63)) & 1)
            if self.best[g + self.leaves] != v:
                self._set(g, 1, not v)

    cdef Py_ssize_t alloc(self, size_t count) noexcept nogil:
        """Lowest start of ``count`` free granules, or -1."""
        cdef size_t i = 1, base = 0, half = self.leaves, l, r
        cdef Py_ssize_t start = -1
        cdef unsigned long long w
        cdef int level
        if count == 1:
            # The lowest free granule: one descent through the bitmap's levels.
            i = 0
            level = self.nlevels - 1
            while level >= 0:
                w = self.bits[self.level_at[level] + i]
                if w == 0:
                    return -1
                i = i * 64 + <size_t>_ctz64(w)
                level -= 1
            self._mark_one(i, False)
            self._touch(i)
            self.sizes[i] = 1
            self.used += 1
            return <Py_ssize_t>i
        self._sync()
        if count == 0 or <size_t>self.best[1] < count:
            return -1
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
        self._mark(start, count, False)
        self.sizes[start] = <int>count
        self.used += count
        return start

    cdef void free(self, size_t start) noexcept nogil:
        cdef size_t count = self.sizes[start]
        if count:
            self.sizes[start] = 0
            self.used -= count
            if count == 1:
                self._mark_one(start, True)
                self._touch(start)
            else:
                self._mark(start, count, True)
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
        self._sync()
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


cdef object bytes_array(object owner, char *addr, size_t nbytes):
    """A writable 1-D uint8 array of the ``nbytes`` at ``addr``, whose base
    is ``owner`` (which keeps the memory alive).  Made with numpy's C API:
    ``numpy.frombuffer`` costs a Python call with keywords and a buffer
    export, several times what a blocking read does."""
    cdef cnp.npy_intp n = <cnp.npy_intp>nbytes
    cdef cnp.ndarray arr = cnp.PyArray_SimpleNewFromData(1, &n, cnp.NPY_UINT8, addr)
    Py_INCREF(owner)            # PyArray_SetBaseObject steals a reference
    cnp.PyArray_SetBaseObject(arr, owner)
    return arr


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


def resident_pages(int fd, offsets):
    """How many of the pages at ``offsets`` (page-aligned byte offsets into
    the file ``fd``, open for reading) are in the page cache.

    Each page is mapped alone and asked with mincore(2), which reads
    nothing: a read probe, even with RWF_NOWAIT, starts the read it cannot
    wait for, so it warms the very pages it measures.  The kernel answers
    for pages not mapped here only to a caller that owns the file or may
    write it; for anyone else every page looks absent.  OSError when a page
    cannot be mapped (a file system without mmap)."""
    cdef size_t page = PAGE
    cdef unsigned char vec
    cdef void *addr
    cdef uint64_t off
    cdef Py_ssize_t hits = 0
    for o in offsets:
        try:
            off = as_u64(o, "offset")       # TypeError for floats and bools
        except ValueError:
            off = 1                         # negative: not an offset at all
        if off % page or off >= (<uint64_t>1 << 62):
            raise ValueError(f"resident_pages: offset {o} is not a page-aligned offset")
        addr = mmap(NULL, page, PROT_READ, MAP_SHARED, fd, <long long>off)
        if addr == MAP_FAILED:
            raise OSError(errno, os.strerror(errno))
        vec = 0
        if mincore(addr, page, &vec) != 0:
            err = errno
            munmap(addr, page)
            raise OSError(err, os.strerror(err))
        munmap(addr, page)
        hits += vec & 1
    return hits
