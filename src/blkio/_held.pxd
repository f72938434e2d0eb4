# Caller memory held for requests: the Py_buffers (or, for an exact numpy
# array, the array itself) a request reads into or writes from, kept until
# the request is reaped, and the iovec arithmetic over them (slicing,
# gathering into and scattering from a bounce buffer).  It knows nothing of
# devices, queues or libblkio.

cimport numpy as cnp
from libc.string cimport memset
from posix.uio cimport iovec
from cpython.buffer cimport Py_buffer, PyBUF_ANY_CONTIGUOUS, PyBUF_WRITABLE


cdef class HeldBuffers:
    """Py_buffers of caller memory, held while any request uses them (or,
    for one numpy array, the array itself: no export, see array_memory)."""
    cdef object array
    cdef Py_buffer *bufs
    cdef iovec *iov
    cdef Py_buffer buf1      # inline storage for the common single buffer
    cdef iovec iov1
    cdef int n
    cdef size_t total
    cdef void release(self) noexcept


cdef HeldBuffers hold_buffers(object objs, bint writable, bint single)
cdef int slice_iov(iovec *src, int n, size_t pos, size_t length, iovec **out) except -1
cdef void gather(iovec *iov, int n, char *dst) noexcept nogil
cdef void scatter(char *src, iovec *iov, int n) noexcept nogil


cdef inline int view_flags(bint writable) noexcept:
    """Buffer-export flags for a write's source, or a read's target."""
    return PyBUF_ANY_CONTIGUOUS | PyBUF_WRITABLE if writable else PyBUF_ANY_CONTIGUOUS


cdef inline bint array_memory(object obj, bint writable, iovec *out) noexcept:
    """For an exact numpy array that is contiguous (and writable, for a
    read): its memory, read from the array instead of through a buffer
    export, which numpy makes expensive (it builds and compares a
    buffer-info record each time; more than the rest of a blocking call).
    The caller keeps a reference to the array for as long as a request uses
    the memory.  False for anything else (the export then takes it, or
    raises the clear error)."""
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


cdef inline bint batch_array(object obj, Py_buffer *view, int ndim, char kind,
                             bint writable) noexcept:
    """The batch API's view of an exact numpy array, read from the array
    (see array_memory) when it is what the export would accept: ``ndim``
    dimensions, C-contiguous, aligned, native byte order, writable if asked,
    of the dtype ``kind`` names ('L' uint64, 'l' int64, 'B' uint8).
    ``view.obj`` stays NULL, so PyBuffer_Release leaves it alone; the
    caller's reference keeps the array alive.  False for anything else."""
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
