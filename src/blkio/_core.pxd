# Declarations of the extension types in _core.pyx (the only code that calls
# libblkio).  Other Cython modules may cimport these.
from libc.stdint cimport uint64_t, int64_t, uintptr_t
from posix.uio cimport iovec
from cpython.buffer cimport Py_buffer
from cpython.pythread cimport PyThread_type_lock
from ._libblkio cimport blkio, blkioq, blkio_completion

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass


# One in-flight batch request: its tag and the memory it reads into or
# writes from (so that unregister can tell whether memory is still in use).
cdef struct BatchSlot:
    int64_t tag
    uintptr_t addr
    uint64_t length
    Py_ssize_t next        # free list / chain of a submission; -1 ends it


cdef class Buffer:
    cdef object __weakref__
    cdef char *addr
    cdef size_t size          # bytes mapped (whole pages)
    cdef size_t nbytes        # bytes exposed
    cdef int fd               # memfd; stays open until the memory is freed
    cdef Py_ssize_t shape[1]


cdef class _Slice:
    """A piece of a Buffer handed out by an _Arena; gives it back when collected."""
    cdef Buffer buffer
    cdef size_t offset
    cdef size_t nbytes
    cdef RangeAllocator allocator
    cdef size_t granule
    cdef Py_ssize_t shape[1]


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


cdef class _Views:
    """Py_buffers of caller memory, held while any request uses them."""
    cdef Py_buffer *bufs
    cdef iovec *iov
    cdef Py_buffer buf1      # inline storage for the common single buffer
    cdef iovec iov1
    cdef int n
    cdef size_t total
    cdef void release(self) noexcept


cdef class Completion:
    cdef readonly object user_data
    cdef readonly int ret
    cdef object _error_msg
    # request state, private to the core
    cdef int op
    cdef uint64_t offset
    cdef uint64_t length
    cdef unsigned int flags
    cdef bint internal
    cdef bint done
    cdef _Views views        # caller memory this request reads into / writes from
    cdef iovec *user_iov     # the caller segments this request covers
    cdef int user_iovcnt
    cdef iovec *iov          # what libblkio gets: caller segments or the bounce buffer
    cdef int iovcnt
    cdef iovec iov1
    cdef BouncePool pool
    cdef Py_ssize_t bounce_start
    cdef Buffer bounce_buffer
    cdef Completion prev      # links of the queue's in-flight list, which
    cdef Completion next      # holds the reference libblkio's user_data borrows
    cdef Queue queue
    cdef void _release_memory(self)


cdef class BouncePool:
    cdef object __weakref__
    cdef _DeviceCore device
    cdef Buffer buffer
    cdef RangeAllocator allocator
    cdef size_t granule
    cdef size_t _max_size
    cdef PyThread_type_lock plock   # taken without the GIL when contended
    cdef unsigned long owner        # thread holding plock, 0 if none
    cdef object waiters
    cdef void _lock(self)
    cdef void _unlock(self)
    cdef Py_ssize_t _try_locked(self, size_t size) except -2
    cdef Py_ssize_t _enter(self, size_t size, object waiter) except -2
    cdef Py_ssize_t _turn(self, size_t size, object waiter) except -2
    cdef Py_ssize_t _try_acquire(self, size_t nbytes) except -2
    cdef size_t _checked_size(self, size_t nbytes) except? 0
    cdef object _array(self, Py_ssize_t start, size_t nbytes)
    cdef Py_ssize_t _start_of(self, object array, size_t nbytes) except -1
    cdef Py_ssize_t _acquire_blocking(self, size_t nbytes, double timeout, Queue drive) except -2
    cdef int _check_open(self) except -1
    cdef void _release(self, Py_ssize_t start, Buffer buffer)
    cdef size_t _round(self, size_t nbytes)


cdef class _Arena:
    cdef _DeviceCore device
    cdef list chunks          # [(Buffer, RangeAllocator)]
    cdef size_t granule
    cdef size_t chunk_size
    cdef object _slice(self, Buffer buf, RangeAllocator ra, Py_ssize_t start, size_t nbytes)


cdef class Queue:
    cdef object __weakref__
    cdef blkioq *q
    cdef _DeviceCore device
    cdef readonly int index
    cdef readonly bint is_poll_queue
    cdef pthread_mutex_t lock
    cdef bint lock_ready
    cdef Py_ssize_t inflight   # enqueued and not yet reaped
    cdef Py_ssize_t outstanding  # the same, as libblkio counts it: changed only under the lock
    cdef Py_ssize_t queued     # enqueued since the last do_io
    cdef list ready            # reaped Completions not yet returned by wait()/poll()
    cdef Completion head       # in-flight Completions (doubly linked)
    cdef Completion spare      # a finished internal Completion, recycled by the hot path
    cdef int64_t *batch_tags
    cdef int *batch_rets
    cdef Py_ssize_t batch_head, batch_count, batch_cap
    cdef bint fd_enabled
    cdef bint removed
    # lifetime guard of this queue (see _DeviceCore); protected by the GIL
    cdef Py_ssize_t users
    cdef bint removing
    cdef bint draining
    cdef bint remove_pending
    cdef double remove_timeout
    cdef BatchSlot *slots_table
    cdef Py_ssize_t slots_cap, slots_free, slots_nfree
    cdef Py_ssize_t batch_inflight
    cdef Py_ssize_t batch_failed
    cdef readonly Py_ssize_t slots   # driver queue depth (num-entries / queue-size), 0: unknown
    cdef object reap_out       # layout of the last `out` given to reap()
    cdef char *reap_base
    cdef Py_ssize_t reap_stride, reap_len, reap_off_ud, reap_off_ret
    cdef int _reap_layout(self, object out) except -1
    cdef object _reap_c(self, out, int min, timeout)
    cdef object _submit_one_c(self, int op, uint64_t offset, object buf, bint vectored,
                              unsigned int flags, object user_data, uint64_t length,
                              object bounce, bint nowait)
    cdef object _submit_batch_c(self, int op, offsets, buffers, user_data, unsigned int flags,
                                region, uint64_t blocksize)
    cdef int _batch_view(self, object obj, Py_buffer *view, int ndim, const char *kinds,
                         bint writable, str what) except -1
    @staticmethod
    cdef Queue _new(_DeviceCore device, blkioq *q, int index, bint poll)
    cdef void _left_while_removing(self) noexcept
    cdef int _check_not_closing(self) except -1
    cdef Py_ssize_t _using(self, uintptr_t start, uintptr_t end)
    cdef int _ensure_slots(self, Py_ssize_t need) except -1
    cdef void _free_slot(self, Py_ssize_t i) noexcept
    cdef int _enqueue(self, Completion c, bint reap) except -1
    cdef int _enqueue_locked(self, Completion c, void *ud, bint reap,
                             blkio_completion *comps) noexcept nogil
    cdef int _fail_all(self, int err) except -1
    cdef void _unlink(self, Completion c)
    cdef list _take(self, object max)
    cdef int _ensure_batch(self, Py_ssize_t need) except -1
    cdef int _enqueue_batch(self, int op, uint64_t *offs, int64_t *tags, char *base,
                            uint64_t *boffs, uint64_t bs, Py_ssize_t n, unsigned int flags) except -1
    cdef int _dispatch(self, blkio_completion *comps, int n) except -1
    cdef int _drive(self, int min_completions, double timeout, Completion until) except -1


cdef class _DeviceCore:
    cdef object __weakref__
    cdef blkio *b
    # lifetime guard: calls in progress (protected by the GIL) and the state
    # close() moves through; see the module docstring of _core
    cdef Py_ssize_t users
    cdef bint closing
    cdef bint draining
    cdef bint destroy_pending
    cdef double close_timeout
    cdef pthread_mutex_t guard_mutex
    cdef pthread_cond_t guard_cond
    cdef pthread_mutex_t ctl_lock   # serialises instance calls: properties, map, queues
    cdef bint locks_ready
    cdef list close_callbacks
    cdef readonly str driver
    cdef readonly str state
    cdef bint started
    cdef readonly uint64_t capacity
    cdef readonly bint read_only
    # limits copied to C for the hot path
    cdef uint64_t request_alignment
    cdef uint64_t buf_alignment
    cdef uint64_t mem_region_alignment
    cdef uint64_t max_transfer
    cdef int max_segments
    cdef uint64_t max_segment_len
    cdef uint64_t max_write_zeroes_len
    cdef uint64_t max_discard_len
    cdef bint needs_mem_regions
    cdef bint needs_mem_region_fd
    cdef bint maps_memory
    cdef uint64_t bounce_chunk
    # mapped memory regions: sorted [start, end) for lookups, and the exact
    # region values plus an owner reference for unmapping
    cdef uintptr_t *reg_start
    cdef uintptr_t *reg_end
    cdef Py_ssize_t nreg, capreg
    cdef dict regions
    cdef list _queues
    cdef Queue q0
    cdef unsigned long owner_thread   # first thread to do blocking I/O
    cdef bint threaded                # a second thread has: always release the GIL
    cdef int64_t poll_ns              # busy-poll before sleeping in a wait (0: off)
    cdef list _poll_queues
    cdef _Arena arena
    cdef BouncePool _bounce_pool
    cdef uint64_t n_requests, n_bounced, bounced_bytes, n_split
    cdef object backend_fds
    cdef bint in_range(self, uintptr_t start, size_t length) noexcept nogil
    cdef void _left_while_closing(self) noexcept
    cdef object _closed_error(self)
    cdef void _wake_closers(self) noexcept
    cdef bint _wait_users(self, Queue queue, Py_ssize_t own, double timeout)
    cdef void _ctl_lock(self) noexcept
    cdef void _ctl_unlock(self) noexcept
    cdef object _get_locked(self, str name, str kind)
    cdef object _set_locked(self, str name, str kind, object value)
    cdef int _ensure_started(self) except -1
    cdef int _map(self, uintptr_t addr, size_t length, int fd, int64_t fd_offset, object owner) except -1
    cdef int _unmap(self, uintptr_t addr) except -1
    cdef bint _direct_ok(self, iovec *iov, int iovcnt) noexcept nogil
    cdef Completion _prepare(self, int op, uint64_t offset, uint64_t length, _Views views,
                             iovec *iov, int iovcnt, unsigned int flags, object user_data,
                             bint internal, Queue drive, object bounce=*, bint nowait=*)
    cdef int _check_range(self, uint64_t offset, uint64_t length, str what) except -1
    cdef int _check_writable(self, str what) except -1
    cdef object _single(self, int op, uint64_t offset, object buf, unsigned int flags)
    cdef object _single_on(self, Queue q, int op, uint64_t offset, object buf, unsigned int flags)
    cdef object _checked_run_on(self, Queue q, int op, uint64_t offset, _Views v, unsigned int flags)
    cdef object _run(self, int op, uint64_t offset, uint64_t length, _Views views, unsigned int flags)
    cdef object _run_on(self, Queue q, int op, uint64_t offset, uint64_t length, _Views views,
                        unsigned int flags)
    cdef object _register(self, object array)
    cdef int _keep_undrained(self, Queue queue) except -1
    cdef list _orphans(self, Queue queue, int kept)
    cdef int _call_close_callbacks(self, Queue queue, list orphans) except -1
    cdef int _backend_dead(self)
