# Memory of our own: memfd-backed ``Buffer``s, the first-fit ``RangeAllocator``
# that carves them up, and ``ArenaSlice``s (pieces of a Buffer handed out as
# numpy arrays).  It knows nothing of devices and never calls libblkio.

cdef size_t PAGE


cdef class Buffer:
    cdef object __weakref__
    cdef char *addr
    cdef size_t size          # bytes mapped (whole pages)
    cdef size_t nbytes        # bytes exposed
    cdef int fd               # memfd; stays open until the memory is freed


cdef class RangeAllocator:
    cdef size_t n            # granules managed
    cdef size_t leaves       # power of two >= n
    cdef int *best
    cdef int *pref
    cdef int *suf
    cdef int *sizes          # granules of the allocation starting at each index
    cdef size_t used
    cdef Py_ssize_t alloc(self, size_t count) noexcept nogil
    cdef void free(self, size_t start) noexcept nogil
    cdef void _set(self, size_t start, size_t count, bint used) noexcept nogil


cdef class ArenaSlice:
    """A piece of a Buffer handed out by an arena; gives it back when collected."""
    cdef Buffer buffer
    cdef size_t offset
    cdef size_t nbytes
    cdef RangeAllocator allocator
    cdef size_t granule


cdef object owner_of(object obj)
