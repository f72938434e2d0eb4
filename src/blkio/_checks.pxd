# Checks and errors, the bottom of the core: the request kinds (Op) and flags,
# the limits every request is checked against (HotLimits), each problem a
# request can have with its one message (Problem, problem_error), the words
# for a device or queue that cannot be used, argument checks, and the
# conversion of libblkio's errors.  It touches no device; it calls libblkio
# only for its per-thread error message.

from libc.stdint cimport uint64_t, UINT64_MAX
from cpython.exc cimport PyErr_Occurred, PyErr_Clear


cpdef enum Op:
    READ = 0
    WRITE = 1
    WRITE_ZEROES = 2
    DISCARD = 3
    FLUSH = 4
    # Zoned devices (blkioq_report_zones, blkioq_*_zone, blkioq_*_all_zones)
    REPORT_ZONES = 5
    OPEN_ZONE = 6
    CLOSE_ZONE = 7
    FINISH_ZONE = 8
    RESET_ZONE = 9
    OPEN_ALL_ZONES = 10
    CLOSE_ALL_ZONES = 11
    FINISH_ALL_ZONES = 12
    RESET_ALL_ZONES = 13


cdef inline bint op_in(int op, int first, int last) noexcept nogil:
    # plain int comparisons: Cython compares against an enum as unsigned,
    # so -1 would pass ``READ <= op``
    return first <= op <= last


cdef struct HotLimits:
    # What the request path checks, copied from the validated blkio.Limits.
    uint64_t capacity
    uint64_t request_alignment
    uint64_t buf_alignment
    # Both are powers of two (_limits.validate): the hot checks mask, not divide.
    uint64_t request_mask          # request_alignment - 1
    uint64_t buf_mask              # buf_alignment - 1
    uint64_t mem_region_alignment
    uint64_t max_transfer
    uint64_t max_segment_len
    uint64_t max_write_zeroes_len
    uint64_t max_discard_len
    int max_segments
    bint read_only
    bint can_grow                  # I/O past the end grows the device: no end to check
    bint needs_mem_regions
    bint needs_mem_region_fd
    bint maps_memory               # map memory with libblkio (needed or pinned regions)
    # Zoned devices (0 everywhere else): what zone requests and writes are checked against.
    int zoned                      # 0 none, 1 host-aware, 2 host-managed
    uint64_t zone_size             # bytes
    uint64_t nr_zones


cdef struct IoPolicy:
    # How blkio cuts requests (not device limits; Device.large_io_* set them).
    uint64_t bounce_chunk          # bounced requests are cut into pieces of at most this
    uint64_t io_chunk              # large reads/writes: pieces of this size ...
    int io_depth                   # ... this many in flight


cdef enum Problem:
    NO_PROBLEM = 0
    MISALIGNED              # offset or length off request-alignment
    PAST_END                # beyond the capacity
    TOO_LONG                # one queue request longer than max-transfer
    READ_ONLY               # a write, write-zeroes or discard on a read-only device
    CROSSES_ZONE            # a write across a zone boundary of a host-managed device
    NOT_ZONED               # a zone request on a device that is not zoned
    NOT_IN_DEVICE           # a zone request's offset past the end
    NOT_ZONE_START          # a zone request's offset that is not a zone start
    BUF_PAST_REGION         # batch with a region: a buffer offset past its end
    BUF_MISALIGNED          # batch with a region: a buffer offset off buf-alignment


cdef inline int range_problem(HotLimits *lim, uint64_t offset, uint64_t length) noexcept nogil:
    """The check every request passes: aligned, and inside the device
    (anywhere a 64-bit offset reaches on a device that grows)."""
    if (offset | length) & lim.request_mask:
        return MISALIGNED
    if lim.can_grow:
        return PAST_END if length > UINT64_MAX - offset else NO_PROBLEM
    if offset > lim.capacity or length > lim.capacity - offset:
        return PAST_END
    return NO_PROBLEM


cdef int request_problem(HotLimits *lim, int op, uint64_t offset, uint64_t length) noexcept nogil
cdef int zone_problem(HotLimits *lim, int op, uint64_t offset) noexcept nogil
cdef object problem_error(int problem, str driver, HotLimits *lim, int op, uint64_t offset,
                          uint64_t length, str where=*)
cdef int check_request(str driver, HotLimits *lim, int op, uint64_t offset,
                       uint64_t length) except -1

# Why a device or queue cannot take a call: the words of the lifetime guard.
cdef object closed_error(str driver)
cdef object forked_error(str driver, int pid)
cdef object not_started_error(str driver, str state)
cdef object removed_error(int index)
cdef object no_device_error()
cdef object broken_error(str driver, Py_ssize_t in_flight, str why=*)
cdef str reconnect_failed(object timeout, object cause, bint timed_out)
cdef str BACKEND_HUNG_UP
cdef str CANCELLED

cdef object libblkio_error(int ret, str what, object filename=*)
cdef object request_error(int ret, object msg, str what, bint read_only)
cdef void unraisable(object where, object exc=*) noexcept
cdef unsigned int zero_flags(bint fua, bint may_unmap, bint no_fallback) except? 0xFFFFFFFF


# ---- argument checks (inline: every entry point runs them) ------------------
# Offsets, lengths and counts are integers >= 0 -- numpy integers too; a
# float or a bool is a TypeError and a negative value a ValueError, both
# naming the argument.

cdef extern from "Python.h":
    # Without Cython's exception checks: as_u64 and as_index look at
    # PyErr_Occurred themselves.
    unsigned long long _PyLong_AsU64 "PyLong_AsUnsignedLongLong"(object value)
    Py_ssize_t _PyLong_AsSsize "PyLong_AsSsize_t"(object value)


cdef uint64_t as_u64_slow(object value, str name) except? 0xFFFFFFFFFFFFFFFF


cdef inline uint64_t as_u64(object value, str name) except? 0xFFFFFFFFFFFFFFFF:
    """``value`` as a uint64 byte count or offset, checked."""
    cdef uint64_t r
    if type(value) is int:
        r = _PyLong_AsU64(value)
        if r != UINT64_MAX or PyErr_Occurred() == NULL:
            return r
        PyErr_Clear()       # negative or too large: say which below
    return as_u64_slow(value, name)


cdef Py_ssize_t as_index_slow(object value, str name) except? -1


cdef inline Py_ssize_t as_index(object value, str name) except? -1:
    """An int argument (a count or an index): float and bool are TypeErrors,
    one too large for an index a ValueError."""
    cdef Py_ssize_t r
    if type(value) is int:
        r = _PyLong_AsSsize(value)
        if r != -1 or PyErr_Occurred() == NULL:
            return r
        PyErr_Clear()
    return as_index_slow(value, name)
