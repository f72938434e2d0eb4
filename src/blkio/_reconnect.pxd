# The reconnect of a device after its vhost-user backend hung up
# (open(reconnect=True)): the connector, the limits the new instance must
# match, the timeout, the eventfd that tells blkio.aio a reconnect began or
# ended, and the sequence that swaps the instance under the device.  The
# device core owns it and runs it inside its guard; it calls only downward
# (the handle, the engines) and up only through the connector open() gave.

from ._handle cimport DeviceHandle


cdef class Reconnector:
    cdef DeviceHandle handle
    cdef object connector          # from the facade: a new instance, connected and started
    cdef object timeout            # seconds a reconnect may take, or None: no limit
    cdef object limits             # the first instance's blkio.Limits: later ones must match
    cdef readonly int events_fd    # an eventfd counting a reconnect's start and end (-1: closed)

    cdef void tell(self) noexcept
    cdef void close(self) noexcept
    cdef int run(self, list engines, Py_ssize_t own) except -1
    cdef str differs(self, object limits, object capacity, object read_only)
    cdef int give_up(self, list engines, str why, bint release=*) except -1


cdef Reconnector new_reconnector(DeviceHandle handle, object connector, object timeout,
                                 object limits)
