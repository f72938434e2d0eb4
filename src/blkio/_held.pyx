"""Caller memory held for requests.

``HeldBuffers`` keeps the Py_buffers of the caller's memory (or, for one
exact numpy array, a reference to it: ``array_memory`` reads its memory
without an export) for as long as any request uses them; ``hold_buffers``
makes one from a buffer or a sequence of them, with the clear TypeError for
anything else.  ``slice_iov``, ``gather`` and ``scatter`` are the iovec
arithmetic of splitting and bouncing.  It knows nothing of devices, queues or
libblkio.
"""

cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy

cnp.import_array()


@cython.final
@cython.freelist(64)
cdef class HeldBuffers:

    def __cinit__(self):
        self.bufs = NULL
        self.iov = NULL
        self.n = 0
        self.total = 0

    def __init__(self, *args, **kwargs):
        raise TypeError("HeldBuffers are made by the core")

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


cdef HeldBuffers _hold_one(object obj, bint writable):
    """The memory of one object, in inline storage (the hot path)."""
    cdef HeldBuffers v = HeldBuffers.__new__(HeldBuffers)
    if array_memory(obj, writable, &v.iov1):
        v.array = obj
        v.iov = &v.iov1
        v.n = 1
        v.total = v.iov1.iov_len
        return v
    try:
        PyObject_GetBuffer(obj, &v.buf1, view_flags(writable))
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
    if isinstance(objs, (bytes, bytearray, memoryview, str)) or not hasattr(objs, "__iter__"):
        raise TypeError(f"buffers must be a sequence of buffers, not {type(objs).__name__}")
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
    cdef int flags = view_flags(writable)
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


cdef int slice_iov(iovec *src, int n, size_t pos, size_t length, iovec **out) except -1:
    """Point *out at a new array covering bytes [pos, pos+length) of src;
    returns its count."""
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


cdef void gather(iovec *iov, int n, char *dst) noexcept nogil:
    cdef int i
    for i in range(n):
        memcpy(dst, iov[i].iov_base, iov[i].iov_len)
        dst += iov[i].iov_len


cdef void scatter(char *src, iovec *iov, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        memcpy(iov[i].iov_base, src, iov[i].iov_len)
        src += iov[i].iov_len
