/* The process a blkio object belongs to, compared on every call without a
 * system call (glibc's getpid() is one).  Each extension module that includes
 * this header keeps its own copy of the current pid: set when the module is
 * loaded and again in the child of every fork(), by a pthread_atfork handler
 * (getpid() is async-signal-safe, as a child handler must be). */
#ifndef BLKIO_FORK_H
#define BLKIO_FORK_H
#include <pthread.h>
#include <unistd.h>

static int blkio_current_pid;

static void blkio_after_fork_in_child(void) { blkio_current_pid = (int)getpid(); }

__attribute__((constructor)) static void blkio_watch_forks(void)
{
    blkio_current_pid = (int)getpid();
    pthread_atfork(NULL, NULL, blkio_after_fork_in_child);
}
#endif
