# Several threads waiting on one queue: the leader sleeps on the completion
# fd, the followers on a condition (see _sharedwait.pyx).  It knows nothing
# of queues or requests; the queue engine drives it.

from ._posix cimport pthread_mutex_t, pthread_cond_t


cdef class SharedWait:
    cdef bint leader               # a thread sleeps on the completion fd
    cdef pthread_mutex_t mutex
    cdef pthread_cond_t cond
    cdef int lead(self, int fd, int ms) noexcept
    cdef void end_lead(self) noexcept
    cdef void follow(self, bint *done) noexcept
    cdef void wake(self) noexcept
