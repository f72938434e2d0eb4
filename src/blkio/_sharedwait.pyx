"""Several threads waiting on one queue.

``SharedWait`` is the hand-off that lets blocking calls of several threads
wait on one libblkio queue without holding its lock: one of them, the
leader, sleeps in poll(2) on the queue's completion fd, then reaps for
everyone and wakes the others, the followers, who sleep on a condition
meanwhile.  It owns the leader flag, the condition and its mutex; it knows
nothing of queues or requests: the queue engine (``_engine``) drives it.
"""

cimport cython
from libc.errno cimport errno
from posix.time cimport timespec

from ._posix cimport (pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
                      pthread_mutex_unlock, pthread_cond_init, pthread_cond_destroy,
                      pthread_cond_broadcast, pthread_cond_timedwait, realtime_after,
                      pollfd, poll, POLLIN)

# A follower looks again after this many seconds even if nobody woke it (the
# queue engine's wait slice).
cdef double FOLLOW_SLICE = 0.1


@cython.final
cdef class SharedWait:
    """Blocking calls of several threads waiting on one queue (internal):
    one of them, the leader, sleeps on the completion fd holding neither the
    GIL nor the queue's lock, then reaps for everyone and wakes the others,
    the followers, who sleep on a condition meanwhile."""

    def __cinit__(self):
        pthread_mutex_init(&self.mutex, NULL)
        pthread_cond_init(&self.cond, NULL)

    def __dealloc__(self):
        pthread_mutex_destroy(&self.mutex)
        pthread_cond_destroy(&self.cond)

    cdef int lead(self, int fd, int ms) noexcept:
        """Become the leader and sleep (GIL released) until ``fd`` is
        readable or ``ms`` passed: poll(2)'s answer, or -errno."""
        cdef pollfd pfd
        cdef int r
        self.leader = True
        pfd.fd = fd
        pfd.events = POLLIN
        pfd.revents = 0
        with nogil:
            r = poll(&pfd, 1, ms)
            if r < 0:
                r = -errno
        return r

    cdef void end_lead(self) noexcept:
        self.leader = False

    cdef void follow(self, bint *done) noexcept:
        """Sleep (GIL released) until the leader wakes us, ``done[0]`` (the
        request waited for is done), or a wait slice passed."""
        cdef timespec ts
        realtime_after(&ts, FOLLOW_SLICE)
        pthread_mutex_lock(&self.mutex)
        if not done[0] and self.leader:
            with nogil:
                pthread_cond_timedwait(&self.cond, &self.mutex, &ts)
                pthread_mutex_unlock(&self.mutex)
        else:
            pthread_mutex_unlock(&self.mutex)

    cdef void wake(self) noexcept:
        pthread_mutex_lock(&self.mutex)
        pthread_cond_broadcast(&self.cond)
        pthread_mutex_unlock(&self.mutex)
