# What _public shares with _asyncport (blkio.aio's port, the one module above
# it): the public DeviceFront and Queue as types, and a queue call's entry
# into the device's guard and the queue's.  Inline: the asyncio hot path
# enters and leaves through them once per request.

cimport cython
from libc.stdint cimport uint64_t
from ._checks cimport no_device_error, removed_error
from ._device cimport DeviceCore, core_enter, core_leave
from ._engine cimport QueueEngine, queue_use_as, queue_unuse
from ._handle cimport GUARD_THREADS, ST_BROKEN, check_io_depth, guard_thread


cdef class DeviceFront:
    cdef DeviceCore core

    cdef DeviceCore _live(self)
    cdef object _one(self, int op, object offset, object buf, unsigned int flags,
                     object chunk, object depth)
    cdef object _vectored(self, int op, object offset, object bufs, unsigned int flags,
                          object chunk, object depth)
    cdef object _plain(self, int op, object offset, object length, unsigned int flags)


@cython.final
cdef class Queue:
    cdef DeviceCore core
    cdef QueueEngine engine

    cdef object _enqueue(self, int op, object offset, object buf, uint64_t length,
                         unsigned int flags, object user_data, bint vectored)
    cdef object _submit_batch(self, int op, offsets, buffers, user_data, unsigned int flags,
                              region, blocksize)


cdef Queue _queue_of(DeviceCore core, QueueEngine e)
cdef Py_ssize_t _enter_even_broken(Queue q) except -1


cdef inline uint64_t _chunk(DeviceCore core, object chunk) except? 0xFFFFFFFFFFFFFFFF:
    return 0 if chunk is None else core.handle.check_io_chunk(chunk)


cdef inline int _depth(object depth) except -1:
    return 0 if depth is None else check_io_depth(depth)


cdef inline Py_ssize_t _enter(Queue q) except -1:
    """The device's guard, then the queue's; refuses a closed device, a
    removed queue and a broken backend.  Returns both entries, packed."""
    if q is None or q.core is None:
        raise no_device_error()
    cdef DeviceCore core = q.core
    cdef Py_ssize_t dentry = core_enter(core)
    cdef QueueEngine e = q.engine
    if e.removing or e.q == NULL:
        core_leave(core, dentry)
        raise removed_error(e.index)
    if e.handle.state == ST_BROKEN:
        core_leave(core, dentry)
        e.check_usable()        # fails what it had in flight, raises
    return dentry * (GUARD_THREADS + 1) + queue_use_as(e, guard_thread(&core.handle.guard,
                                                                       dentry))


cdef inline void _leave(Queue q, Py_ssize_t entries) noexcept:
    queue_unuse(q.engine, entries % (GUARD_THREADS + 1))
    core_leave(q.core, entries // (GUARD_THREADS + 1))
