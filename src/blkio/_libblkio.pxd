# The C API of libblkio 1.5.0 (blkio.h), declared once.  Every libblkio call in
# this package goes through `from . cimport _libblkio as lb` and reads `lb.blkio_*`.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from posix.time cimport timespec
from posix.signal cimport sigset_t
from posix.uio cimport iovec


cdef extern from "<stdbool.h>":
    # C's 1-byte bool: Cython's bint is an int, which must not be passed as bool*.
    ctypedef bint cbool "bool"


cdef extern from "blkio.h" nogil:
    struct blkio:
        pass

    struct blkioq:
        pass

    struct blkio_mem_region:
        void *addr
        size_t len
        uint64_t iova
        int64_t fd_offset
        int fd
        uint32_t flags

    struct blkio_completion:
        void *user_data
        const char *error_msg
        int ret
        uint8_t reserved_[12]

    const char *blkio_get_error_msg()

    int blkio_create(const char *driver, blkio **bp)
    int blkio_connect(blkio *b)
    int blkio_start(blkio *b)
    void blkio_destroy(blkio **bp)

    int blkio_get_bool(blkio *b, const char *name, cbool *value)
    int blkio_get_int(blkio *b, const char *name, int *value)
    int blkio_get_uint64(blkio *b, const char *name, uint64_t *value)
    int blkio_get_str(blkio *b, const char *name, char **value)

    int blkio_set_bool(blkio *b, const char *name, cbool value)
    int blkio_set_int(blkio *b, const char *name, int value)
    int blkio_set_uint64(blkio *b, const char *name, uint64_t value)
    int blkio_set_str(blkio *b, const char *name, const char *value)

    int blkio_alloc_mem_region(blkio *b, blkio_mem_region *region, size_t len)
    void blkio_free_mem_region(blkio *b, const blkio_mem_region *region)
    int blkio_map_mem_region(blkio *b, const blkio_mem_region *region)
    void blkio_unmap_mem_region(blkio *b, const blkio_mem_region *region)

    blkioq *blkio_get_queue(blkio *b, int index)
    blkioq *blkio_get_poll_queue(blkio *b, int index)

    int blkio_add_queue(blkio *b)
    int blkio_add_poll_queue(blkio *b)

    int blkio_remove_queue(blkio *b, int index)
    int blkio_remove_poll_queue(blkio *b, int index)

    enum:
        BLKIO_REQ_FUA
        BLKIO_REQ_NO_UNMAP
        BLKIO_REQ_NO_FALLBACK

    void blkioq_read(blkioq *q, uint64_t start, void *buf, size_t len, void *user_data, uint32_t flags)
    void blkioq_write(blkioq *q, uint64_t start, const void *buf, size_t len, void *user_data, uint32_t flags)
    void blkioq_readv(blkioq *q, uint64_t start, const iovec *iov, int iovcnt, void *user_data, uint32_t flags)
    void blkioq_writev(blkioq *q, uint64_t start, iovec *iov, int iovcnt, void *user_data, uint32_t flags)
    void blkioq_write_zeroes(blkioq *q, uint64_t start, uint64_t len, void *user_data, uint32_t flags)
    void blkioq_discard(blkioq *q, uint64_t start, uint64_t len, void *user_data, uint32_t flags)
    void blkioq_flush(blkioq *q, void *user_data, uint32_t flags)

    enum:
        BLKIO_ZONE_TYPE_CONVENTIONAL
        BLKIO_ZONE_TYPE_SEQWRITE_REQ
        BLKIO_ZONE_TYPE_SEQWRITE_PREF

    enum:
        BLKIO_ZONE_STATE_EMPTY
        BLKIO_ZONE_STATE_IMP_OPEN
        BLKIO_ZONE_STATE_EXP_OPEN
        BLKIO_ZONE_STATE_CLOSED
        BLKIO_ZONE_STATE_READONLY
        BLKIO_ZONE_STATE_FULL
        BLKIO_ZONE_STATE_OFFLINE

    struct blkio_zone:
        uint64_t start
        uint64_t len
        uint64_t capacity
        uint64_t write_pointer
        uint8_t zone_type
        uint8_t zone_state
        uint8_t reset
        uint8_t reserved_[29]

    void blkioq_report_zones(blkioq *q, uint64_t offset, blkio_zone *zones, uint32_t nr_zones, void *user_data, uint32_t flags)
    void blkioq_close_zone(blkioq *q, uint64_t offset, void *user_data, uint32_t flags)
    void blkioq_finish_zone(blkioq *q, uint64_t offset, void *user_data, uint32_t flags)
    void blkioq_open_zone(blkioq *q, uint64_t offset, void *user_data, uint32_t flags)
    void blkioq_reset_zone(blkioq *q, uint64_t offset, void *user_data, uint32_t flags)
    void blkioq_close_all_zones(blkioq *q, void *user_data, uint32_t flags)
    void blkioq_finish_all_zones(blkioq *q, void *user_data, uint32_t flags)
    void blkioq_open_all_zones(blkioq *q, void *user_data, uint32_t flags)
    void blkioq_reset_all_zones(blkioq *q, void *user_data, uint32_t flags)

    int blkioq_do_io(blkioq *q, blkio_completion *completions, int min_completions, int max_completions, timespec *timeout)
    int blkioq_do_io_interruptible(blkioq *q, blkio_completion *completions, int min_completions, int max_completions, timespec *timeout, const sigset_t *sig)
    int blkioq_get_completion_fd(blkioq *q)
    void blkioq_set_completion_fd_enabled(blkioq *q, cbool enable)
