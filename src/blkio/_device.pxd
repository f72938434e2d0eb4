# The device core: one device's parts (the handle, its queue engines in a
# QueueTable, the alloc arena, the bounce space, the Reconnector of a device
# that reconnects) and the one state machine of its lifetime -- entering and
# leaving calls, close and shutdown, queue removal, a dead backend, the
# child of a fork() -- with the lifecycle primitives the facade drives
# (create, properties, connect, start, configure) and memory registration.
# The public objects (``_public``) hold it; it never parses user options and
# never calls up, save one thing: the connector ``open(reconnect=True)``
# gives it (``_reconnect`` calls it), which brings up a new instance the way
# open() brought up the first.

from ._handle cimport DeviceHandle, handle_enter, handle_leave
from ._pool cimport Arena, BounceSpace
from ._engine cimport QueueEngine
from ._reconnect cimport Reconnector


cdef class QueueTable:
    cdef list regular              # regular queues by index (None where removed)
    cdef list poll                 # poll queues by index (None where removed)
    cdef list blocking             # the engines blocking calls use, by the thread's entry
    cdef QueueEngine for_blocking(self, Py_ssize_t entry, str driver)
    cdef QueueEngine at(self, Py_ssize_t index, bint poll)
    cdef list live(self)
    cdef Py_ssize_t first_depth(self)
    cdef int put(self, QueueEngine e) except -1
    cdef int drop(self, QueueEngine e) except -1
    cdef list clear(self)


cdef class DeviceCore:
    cdef object __weakref__
    cdef readonly DeviceHandle handle  # readonly: a reconnect reads a new core's
    cdef QueueTable queues
    cdef Arena arena
    cdef BounceSpace space
    cdef object pool_api           # the public BouncePool of the space (made once)
    cdef object front              # a weak reference to the blkio.Device (Queue.device)
    cdef double close_timeout
    cdef bint destroy_pending      # close() ran inside a call: the last to leave finishes it
    cdef Py_ssize_t removals_pending
    cdef object limits             # the blkio.Limits configure() was given
    # reconnecting (open(reconnect=True)): see recover()
    cdef Reconnector reconnector   # None: the device does not reconnect
    cdef int monitor_wake          # the backend watcher's wake pipe (write end; -1: none)

    cdef void after_leave(self) noexcept
    cdef QueueEngine blocking_engine(self, Py_ssize_t entry)
    cdef QueueEngine engine_at(self, Py_ssize_t index, bint poll)
    cdef int finish_remove(self, QueueEngine e) except -1
    cdef int shutdown(self) except -1
    cdef void forget(self) noexcept
    cdef list orphans(self, QueueEngine e, int kept)
    cdef void tell_gone(self, QueueEngine e, list orphans) noexcept
    cdef void stop_watching(self) noexcept


cdef inline Py_ssize_t core_enter(DeviceCore core) except -1:
    """Enter the device's guard (see _handle): every public call does."""
    return handle_enter(core.handle)


cdef inline void core_leave(DeviceCore core, Py_ssize_t entry) noexcept:
    cdef DeviceHandle h = core.handle
    handle_leave(h, entry)
    if h.closing or core.removals_pending:
        core.after_leave()


cdef inline QueueEngine blocking_engine_of(DeviceCore core, Py_ssize_t entry):
    """DeviceCore.blocking_engine, with the common case of one queue inline."""
    cdef list qs = core.queues.blocking
    if qs is not None and len(qs) == 1:
        return <QueueEngine>qs[0]
    return core.blocking_engine(entry)
