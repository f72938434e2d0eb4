# POSIX declarations the core needs that Cython's own libc/posix packages
# lack: pthread mutexes and condition variables, clocks, poll(2), memfd,
# eventfd and the errnos libblkio returns.  Declarations only; no module of its own.

from libc.stdint cimport int64_t
from posix.time cimport timespec

cdef extern from "<errno.h>":
    int ENOTSUP
    int ECANCELED

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)
    int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const timespec *t)

cdef extern from "<time.h>" nogil:
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_MONOTONIC
    int CLOCK_REALTIME

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN
    short POLLHUP
    short POLLERR

cdef extern from "<sys/mman.h>" nogil:
    int memfd_create(const char *name, unsigned int flags)
    unsigned int MFD_CLOEXEC

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, long length)
    long sysconf(int name)
    int _SC_PAGESIZE


cdef inline void realtime_after(timespec *ts, double seconds) noexcept nogil:
    """The CLOCK_REALTIME instant ``seconds`` from now (pthread_cond_timedwait)."""
    clock_gettime(CLOCK_REALTIME, ts)
    cdef int64_t ns = ts.tv_nsec + <int64_t>(seconds * 1e9)
    ts.tv_sec += <long>(ns // 1000000000)
    ts.tv_nsec = <long>(ns % 1000000000)
