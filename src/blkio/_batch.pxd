# The batch ring: what the batch API needs and no per-request Python object --
# one slot per batch request in flight (its tag and memory), the ring of
# completed (tag, ret) pairs waiting for reap(), the layout of the caller's
# ``out`` array, and the arrays of one submission, checked (BatchArrays).  It
# never calls libblkio: the queue engine enqueues what a BatchArrays holds and
# hands each completion back to the ring.

from libc.stdint cimport uint64_t, int64_t, uintptr_t
from cpython.buffer cimport Py_buffer
from ._handle cimport DeviceHandle


# One batch request in flight: its tag, where it goes on the device and the
# memory it reads into or writes from (so that unregister can tell whether
# memory is still in use).
cdef struct BatchSlot:
    int64_t tag
    uintptr_t addr
    uint64_t length
    uint64_t offset
    int op
    unsigned int flags
    Py_ssize_t next        # free list; -1 ends it


cdef class BatchRing:
    cdef BatchSlot *slots
    cdef Py_ssize_t slots_cap, free_head, nfree
    cdef int64_t *tags            # ring of completions: tags and rets
    cdef int *rets
    cdef Py_ssize_t head, ready, ring_cap
    cdef Py_ssize_t in_flight     # batch requests enqueued and not yet completed
    cdef Py_ssize_t failed        # completions reaped with ret < 0
    # the layout of the last ``out`` given to reap()
    cdef object out
    cdef char *out_base
    cdef Py_ssize_t out_stride, out_len, off_user_data, off_ret

    cdef int reserve(self, Py_ssize_t n) except -1
    cdef void fail_all(self, int err) noexcept
    cdef Py_ssize_t using(self, uintptr_t start, uintptr_t end) noexcept
    cdef int set_out(self, object out) except -1
    cdef Py_ssize_t copy_out(self) noexcept


cdef class BatchArrays:
    """One submission's arrays, held and checked: n requests of ``blocksize``
    bytes at ``offs[i]``, to or from ``base + i * blocksize`` (or, with a
    region, ``base + boffs[i]``), tagged ``tags[i]`` (or i)."""
    cdef Py_buffer offsets_view, memory_view, tags_view, boffs_view
    cdef bint has_offsets, has_memory, has_tags, has_boffs
    cdef object keep             # converted arrays, alive while the views are
    cdef Py_ssize_t n
    cdef uint64_t *offs
    cdef int64_t *tags
    cdef uint64_t *boffs
    cdef char *base
    cdef uint64_t memory_len
    cdef uint64_t blocksize
    cdef void release(self) noexcept


cdef inline void take_slots(BatchRing r, int op, BatchArrays a, unsigned int flags,
                            Py_ssize_t *idx) noexcept:
    """A slot for each request of ``a`` (``reserve`` made room; GIL held),
    their indexes into ``idx``.  Inline, with the arrays in locals: every
    batch request passes here."""
    cdef Py_ssize_t i, s = r.free_head, n = a.n
    cdef BatchSlot *slots = r.slots
    cdef BatchSlot *slot
    cdef uint64_t *offs = a.offs
    cdef int64_t *tags = a.tags
    cdef uint64_t *boffs = a.boffs
    cdef char *base = a.base
    cdef uint64_t bs = a.blocksize
    for i in range(n):
        slot = &slots[s]
        idx[i] = s
        s = slot.next
        slot.tag = tags[i] if tags != NULL else i
        slot.addr = <uintptr_t>(base + (boffs[i] if boffs != NULL else <uint64_t>i * bs))
        slot.length = bs
        slot.offset = offs[i]
        slot.op = op
        slot.flags = flags
    r.free_head = s
    r.nfree -= n
    r.in_flight += n


cdef inline void complete(BatchRing r, Py_ssize_t s, int ret) noexcept:
    """The request of slot ``s`` completed with ``ret``: its (tag, ret)
    joins the ring and the slot is free again."""
    cdef Py_ssize_t at = r.head + r.ready
    if at >= r.ring_cap:
        at -= r.ring_cap
    r.tags[at] = r.slots[s].tag
    r.rets[at] = ret
    r.ready += 1
    r.in_flight -= 1
    r.slots[s].length = 0
    r.slots[s].next = r.free_head
    r.free_head = s
    r.nfree += 1


cdef BatchArrays batch_arrays(int op, object offsets, object buffers, object user_data,
                              object region, uint64_t blocksize)
cdef int check_batch(BatchArrays a, DeviceHandle h, int op, Py_ssize_t room) except -1
