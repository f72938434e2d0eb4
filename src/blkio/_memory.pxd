# Memory of our own: memfd-backed ``Buffer``s, the first-fit ``RangeAllocator``
# that carves them up, and ``ArenaSlice``s (pieces of a Buffer handed out as
# numpy arrays).  It knows nothing of devices and never calls libblkio.

cdef size_t PAGE
cdef size_t MAX_BYTES


cdef class Buffer:
    cdef object __weakref__
    cdef char *addr
    cdef size_t size          # bytes mapped (whole pages)
    cdef size_t nbytes        # bytes exposed
    cdef int fd               # memfd; stays open until the memory is freed


cdef enum:
    MAX_LEVELS = 8            # of the free bitmap: 64**8 granules, more than an int counts


cdef class RangeAllocator:
    cdef size_t n            # granules managed
    cdef size_t leaves       # power of two >= n
    # The segment tree, for allocations of more than one granule (first-fit
    # over runs).  Single-granule allocations and releases leave its leaves
    # stale and list them in `stale`; the next multi-granule allocation (or
    # largest_free) brings them up to date first.
    cdef int *best
    cdef int *pref
    cdef int *suf
    cdef int *sizes          # granules of the allocation starting at each index
    cdef int *stale          # granules whose tree leaf may be out of date (a stack)
    cdef size_t nstale
    cdef unsigned char *is_stale
    # The free bitmap (1: free), always exact: level 0 one bit per granule,
    # each level above one bit per word below (set: that word is not 0), so
    # the lowest free granule is found in one descent of `nlevels` words.
    cdef unsigned long long *bits
    cdef size_t level_at[MAX_LEVELS]   # word offset of each level in `bits`
    cdef int nlevels
    cdef size_t used
    cdef Py_ssize_t alloc(self, size_t count) noexcept nogil
    cdef void free(self, size_t start) noexcept nogil
    cdef void _set(self, size_t start, size_t count, bint used) noexcept nogil
    cdef void _mark(self, size_t start, size_t count, bint free) noexcept nogil
    cdef void _mark_one(self, size_t g, bint free) noexcept nogil
    cdef void _carry(self, size_t idx, bint free) noexcept nogil
    cdef void _touch(self, size_t g) noexcept nogil
    cdef void _sync(self) noexcept nogil


cdef class ArenaSlice:
    """A piece of a Buffer handed out by an arena; gives it back when collected."""
    cdef Buffer buffer
    cdef size_t offset
    cdef size_t nbytes
    cdef RangeAllocator allocator
    cdef size_t granule


cdef object owner_of(object obj)
cdef object bytes_array(object owner, char *addr, size_t nbytes)
