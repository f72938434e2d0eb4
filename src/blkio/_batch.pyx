"""The batch ring and the checks of a batch submission.

``BatchRing`` is what the batch API keeps per queue instead of a Python
object per request: a table of slots (one per batch request in flight: its
tag, and the memory it uses, so that ``unregister`` can tell whether memory
is still in use), found by index through a free list, so that growing the
table never moves a request in flight; the ring of (tag, ret) pairs
completed and not yet reaped; and the layout of the caller's ``out`` array,
checked once and reused while the same array comes back.

``batch_arrays`` holds one submission's arrays (offsets, the buffers or a
region with offsets into it, the tags), reading an exact numpy array
directly (numpy's buffer export is most of a batch's own cost) and turning
anything else into one through the one checker of integer arrays
(``_checks.int_array``); ``check_batch`` validates the whole batch before
anything is enqueued.  The queue engine (``_engine``) enqueues, and hands
each completion back with ``BatchRing.complete``.
"""

cimport cython
cimport numpy as cnp
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_FORMAT,
                             PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE)
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from libc.stdint cimport UINT64_MAX

import numpy as np

from ._checks cimport (READ, WRITE, MISALIGNED, PAST_END, CROSSES_ZONE, BUF_PAST_REGION,
                       BUF_MISALIGNED, NO_PROBLEM, range_problem, request_problem,
                       problem_error, HotLimits)
from ._checks import int_array
from ._held cimport batch_array

cnp.import_array()     # numpy's C API: _held's inline helpers use it


@cython.final
cdef class BatchRing:
    """The batch requests of one queue (internal)."""

    def __cinit__(self):
        self.slots = NULL
        self.tags = NULL
        self.rets = NULL
        self.free_head = -1

    def __dealloc__(self):
        free(self.slots)
        free(self.tags)
        free(self.rets)

    cdef int reserve(self, Py_ssize_t n) except -1:
        """Room for ``n`` more requests in flight: free slots, and a ring that
        holds every completion they and those in flight can bring."""
        cdef Py_ssize_t old, newcap, i, j
        cdef BatchSlot *t
        if self.nfree < n:
            old = self.slots_cap
            newcap = max(2 * old, old + n - self.nfree, 256)
            t = <BatchSlot *>realloc(self.slots, newcap * sizeof(BatchSlot))
            if t == NULL:
                raise MemoryError()
            self.slots = t
            i = newcap - 1
            while i >= old:
                t[i].length = 0
                t[i].next = self.free_head
                self.free_head = i
                i -= 1
            self.nfree += newcap - old
            self.slots_cap = newcap
        cdef Py_ssize_t need = self.ready + self.in_flight + n
        if need <= self.ring_cap:
            return 0
        newcap = max(2 * self.ring_cap, need, 256)
        cdef int64_t *tags = <int64_t *>malloc(newcap * sizeof(int64_t))
        cdef int *rets = <int *>malloc(newcap * sizeof(int))
        if tags == NULL or rets == NULL:
            free(tags)
            free(rets)
            raise MemoryError()
        for i in range(self.ready):
            j = (self.head + i) % self.ring_cap
            tags[i] = self.tags[j]
            rets[i] = self.rets[j]
        free(self.tags)
        free(self.rets)
        self.tags = tags
        self.rets = rets
        self.ring_cap = newcap
        self.head = 0
        return 0

    cdef void fail_all(self, int err) noexcept:
        """Every request in flight completes with -err (its backend is gone,
        or its queue): nothing can touch its memory any more."""
        cdef Py_ssize_t i
        for i in range(self.slots_cap):
            if self.slots[i].length:
                complete(self, i, -err)

    cdef Py_ssize_t using(self, uintptr_t start, uintptr_t end) noexcept:
        """Requests in flight whose memory overlaps [start, end)."""
        cdef Py_ssize_t n = 0, i
        for i in range(self.slots_cap):
            if (self.slots[i].length and self.slots[i].addr < end
                    and self.slots[i].addr + self.slots[i].length > start):
                n += 1
        return n

    cdef int set_out(self, object out) except -1:
        """Check ``out`` once and remember where its fields live."""
        if not isinstance(out, np.ndarray) or out.ndim != 1:
            raise TypeError("out must be a 1-D numpy structured array")
        fields = out.dtype.fields
        if (fields is None or "user_data" not in fields or "ret" not in fields
                or fields["user_data"][0] != np.int64 or fields["ret"][0] != np.int32):
            raise TypeError("out needs fields user_data (int64) and ret (int32)")
        if not out.flags.writeable:
            raise ValueError("out must be writable")
        self.out = out          # our reference keeps its memory in place
        self.out_base = <char *><uintptr_t>out.ctypes.data
        self.out_stride = out.strides[0]
        self.out_len = out.shape[0]
        self.off_user_data = fields["user_data"][1]
        self.off_ret = fields["ret"][1]
        return 0

    cdef Py_ssize_t copy_out(self) noexcept:
        """Move up to ``len(out)`` completions from the ring into ``out``."""
        cdef Py_ssize_t k = self.ready if self.ready < self.out_len else self.out_len
        cdef Py_ssize_t i, j = self.head, cap = self.ring_cap, failed = 0
        cdef char *row = self.out_base
        # the fields in locals: a store into ``out`` could alias any of them
        cdef int64_t *tags = self.tags
        cdef int *rets = self.rets
        cdef Py_ssize_t off_user_data = self.off_user_data, off_ret = self.off_ret
        cdef Py_ssize_t stride = self.out_stride
        for i in range(k):
            # memcpy: fields of a packed structured dtype may be misaligned
            memcpy(row + off_user_data, &tags[j], sizeof(int64_t))
            memcpy(row + off_ret, &rets[j], sizeof(int))
            if rets[j] < 0:
                failed += 1
            row += stride
            j += 1
            if j == cap:
                j = 0
        self.head = j
        self.ready -= k
        self.failed += failed
        return k


@cython.final
@cython.freelist(8)
cdef class BatchArrays:
    """The arrays of one batch submission (internal)."""

    def __dealloc__(self):
        self.release()

    cdef void release(self) noexcept:
        # The memory itself is the device's (alloc/register) and stays
        # alive until close, which drains requests first.
        if self.has_offsets:
            PyBuffer_Release(&self.offsets_view)
            self.has_offsets = False
        if self.has_memory:
            PyBuffer_Release(&self.memory_view)
            self.has_memory = False
        if self.has_tags:
            PyBuffer_Release(&self.tags_view)
            self.has_tags = False
        if self.has_boffs:
            PyBuffer_Release(&self.boffs_view)
            self.has_boffs = False
        self.keep = None


cdef int _view(object obj, Py_buffer *view, int ndim, const char *kinds, bint writable,
               str what) except -1:
    """A C-contiguous buffer of ``ndim`` dimensions and a format in ``kinds``."""
    if batch_array(obj, view, ndim, kinds[0], writable):
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


cdef BatchArrays batch_arrays(int op, object offsets, object buffers, object user_data,
                              object region, uint64_t blocksize):
    """Hold the arrays of one submission.  Anything but an exact 1-D
    uint64 (tags: int64) vector goes through ``int_array`` (floats and
    bools refused, negatives named) before its view is taken."""
    cdef BatchArrays a = BatchArrays.__new__(BatchArrays)
    cdef Py_buffer probe
    cdef bint indexed = region is not None
    # converted arrays are kept alive with the views (a list only then: the
    # usual batch is exact arrays, and this runs on every submit)
    if not batch_array(offsets, &a.offsets_view, 1, b'L', False):
        offsets = int_array(offsets, "offsets", False)
        a.keep = [offsets]
        _view(offsets, &a.offsets_view, 1, b"LQ", False, "offsets (a 1-D uint64 array)")
    a.has_offsets = True
    if user_data is not None and not batch_array(user_data, &probe, 1, b'l', False):
        user_data = int_array(user_data, "user_data", True)
        a.keep = [user_data] if a.keep is None else a.keep + [user_data]
    if indexed and not batch_array(buffers, &probe, 1, b'L', False):
        buffers = int_array(buffers, "buffers (offsets into region)", False)
        a.keep = [buffers] if a.keep is None else a.keep + [buffers]
    # whole literals, not a concatenation: this runs on every call
    if indexed:
        _view(region, &a.memory_view, 1, b"B", op == READ,
              "region (a C-contiguous 1-D uint8 array, writable for reads)"
              if op == READ else "region (a C-contiguous 1-D uint8 array)")
    else:
        _view(buffers, &a.memory_view, 2, b"B", op == READ,
              "buffers (a C-contiguous uint8 array of shape (n, blocksize), "
              "writable for reads)" if op == READ else
              "buffers (a C-contiguous uint8 array of shape (n, blocksize))")
    a.has_memory = True
    if user_data is not None:
        _view(user_data, &a.tags_view, 1, b"lq", False, "user_data (a 1-D int64 array)")
        a.has_tags = True
        a.tags = <int64_t *>a.tags_view.buf
    if indexed:
        _view(buffers, &a.boffs_view, 1, b"LQ", False,
              "buffers (with region: a 1-D uint64 array of offsets into it)")
        a.has_boffs = True
        a.boffs = <uint64_t *>a.boffs_view.buf
    a.n = a.offsets_view.shape[0]
    a.offs = <uint64_t *>a.offsets_view.buf
    a.base = <char *>a.memory_view.buf
    a.memory_len = <uint64_t>a.memory_view.len
    cdef Py_ssize_t nbufs
    if indexed:
        nbufs = a.boffs_view.shape[0]
        a.blocksize = blocksize
    else:
        nbufs = a.memory_view.shape[0]
        a.blocksize = <uint64_t>a.memory_view.shape[1]
        if blocksize and blocksize != a.blocksize:
            raise ValueError(f"blocksize={blocksize} but buffers have {a.blocksize} columns")
    if nbufs != a.n:
        raise ValueError(f"{a.n} offsets but {nbufs} buffers")
    if a.has_tags and a.tags_view.shape[0] != a.n:
        raise ValueError(f"{a.n} offsets but {a.tags_view.shape[0]} user_data tags")
    return a


cdef int _first_problem(HotLimits *lim, int op, BatchArrays a, Py_ssize_t *bad) noexcept nogil:
    """The first problem of a batch, its index in ``bad``."""
    cdef Py_ssize_t i
    cdef int problem
    cdef uint64_t bs = a.blocksize, last
    cdef uint64_t *offs = a.offs
    if a.boffs == NULL and lim.zoned != 2 and (lim.can_grow or bs <= lim.capacity):
        # the common batch: one test a request (the loop below then says
        # which failed and why)
        last = UINT64_MAX - bs if lim.can_grow else lim.capacity - bs
        for i in range(a.n):
            if (offs[i] & lim.request_mask) or offs[i] > last:
                break
        else:
            return NO_PROBLEM
    for i in range(a.n):
        problem = range_problem(lim, a.offs[i], bs)
        if problem == NO_PROBLEM and op == WRITE and lim.zoned == 2:
            problem = request_problem(lim, op, a.offs[i], bs)
        if problem == NO_PROBLEM and a.boffs != NULL:
            if a.boffs[i] > a.memory_len or bs > a.memory_len - a.boffs[i]:
                problem = BUF_PAST_REGION
            elif a.boffs[i] & lim.buf_mask:
                problem = BUF_MISALIGNED
        if problem:
            bad[0] = i
            return problem
    return NO_PROBLEM


cdef int check_batch(BatchArrays a, DeviceHandle h, int op, Py_ssize_t room) except -1:
    """The whole batch, before anything is enqueued: ``room`` requests fit
    in the queue (-1: no bound known)."""
    cdef HotLimits *lim = &h.lim
    cdef uint64_t bs = a.blocksize, ra = lim.request_alignment, ba = lim.buf_alignment
    cdef Py_ssize_t bad = -1
    cdef int problem
    if op == WRITE and lim.read_only:
        raise problem_error(request_problem(lim, WRITE, 0, 0), h.driver, lim, op, 0, 0)
    if a.n == 0:
        return 0
    if room >= 0 and a.n > room:
        raise ValueError(f"batch of {a.n} requests does not fit: the queue has room for "
                         f"{room} more (raise num_entries / queue_size at open)")
    if bs == 0 or bs % ra:
        raise ValueError(f"blocksize {bs} must be a positive multiple of "
                         f"request-alignment ({ra})")
    if lim.max_transfer and bs > lim.max_transfer:
        raise ValueError(f"blocksize {bs} exceeds max-transfer ({lim.max_transfer})")
    if <uintptr_t>a.base % ba or bs % ba:
        raise ValueError(f"buffers must be aligned to buf-alignment ({ba})")
    if not h.regions.covers(<uintptr_t>a.base, <size_t>a.memory_len):
        raise ValueError("buffers must lie in memory from Device.alloc() or "
                         "Device.register() (the batch API never copies)")
    # Without the GIL only for big batches: for a few dozen requests the
    # hand-off would cost more than the loop, and with threads it lets
    # another one in mid-call.
    if a.n > 4096:
        with nogil:
            problem = _first_problem(lim, op, a, &bad)
    else:
        problem = _first_problem(lim, op, a, &bad)
    if problem == BUF_PAST_REGION or problem == BUF_MISALIGNED:
        raise problem_error(problem, h.driver, lim, op, a.boffs[bad], bs, f"buffers[{bad}]")
    if problem:
        raise problem_error(problem, h.driver, lim, op, a.offs[bad], bs, f"offsets[{bad}]")
    return 0
