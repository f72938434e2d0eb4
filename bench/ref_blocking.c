// SPDX-License-Identifier: MIT
/*
 * ref_blocking - the C reference for blkio's blocking Python API.
 *
 * It does exactly what Device.readinto()/Device.write() do for each request,
 * minus Python: one request at a time per thread,
 *
 *     blkioq_read(q, offset, buf, len, NULL, 0);   (or blkioq_write)
 *     blkioq_do_io(q, &completion, 1, 1, NULL);
 *
 * so the ratio "Python blocking API / ref_blocking" isolates the cost of
 * Python and of the binding. Same command line and same JSON output as
 * libblkio's example blkio-bench, so the two can be swapped:
 *
 *   ref_blocking [--num-threads=<n>]  (default: 1; one queue per thread)
 *                [--iodepth=<n>]  (accepted for compatibility; must be 1)
 *                [--readwrite=read|write|randread|randwrite]  (default: read)
 *                [--blocksize=<bytes>]  (default: 4096)
 *                [--runtime=<seconds>]  (default: 30)
 *                [--poll]  (blkioq_do_io with min_completions=0 in a loop)
 *                [--iovecs=<n>]  (blkioq_readv/blkioq_writev of n equal
 *                                 segments of the block: Device.readv/writev)
 *                <driver> <property>=<value> ...
 *
 * Build: gcc -O2 -o ref_blocking ref_blocking.c $(pkg-config --cflags --libs blkio) -lpthread
 */
#include <blkio.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/uio.h>
#include <unistd.h>

#define GiB (1ULL << 30)

enum readwrite { RW_READ, RW_WRITE, RW_RANDREAD, RW_RANDWRITE };

struct config {
    unsigned num_threads;
    unsigned iodepth;
    enum readwrite readwrite;
    unsigned blocksize;
    unsigned runtime_secs;
    unsigned iovecs;        /* 1: blkioq_read/write; more: readv/writev */
    uint64_t capacity;
    bool poll;
};

struct io_stats {
    uint64_t count;
    double runtime_secs;
    uint64_t min_latency_ns;
    uint64_t max_latency_ns;
    uint64_t total_latency_ns;
    uint64_t calls;
    unsigned min_completions;
    unsigned max_completions;
};

struct thread_data {
    pthread_t thread;
    const struct config *config;
    struct blkioq *q;
    void *buf;
    uint64_t offset;
    pthread_barrier_t *go;
    atomic_bool *should_stop;
    struct io_stats stats;
    uint64_t rng;
};

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* xorshift64*: cheap, good enough for offsets */
static uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static void *thread_main(void *opaque)
{
    struct thread_data *td = opaque;
    const struct config *cfg = td->config;
    uint64_t nblocks = cfg->capacity / cfg->blocksize;
    bool is_read = cfg->readwrite == RW_READ || cfg->readwrite == RW_RANDREAD;
    bool is_rand = cfg->readwrite == RW_RANDREAD ||
                   cfg->readwrite == RW_RANDWRITE;
    struct blkio_completion c;
    struct iovec iov[cfg->iovecs];
    size_t seg = cfg->blocksize / cfg->iovecs;
    uint64_t start, end;

    for (unsigned i = 0; i < cfg->iovecs; i++) {
        iov[i].iov_base = (char *)td->buf + i * seg;
        iov[i].iov_len = seg;
    }

    blkioq_set_completion_fd_enabled(td->q, false);

    /*
     * Start together. A barrier rather than a spin on a flag: under
     * valgrind (bench/instr.py counts instructions) a spin's length is
     * whatever the scheduler makes it, and it would count.
     */
    pthread_barrier_wait(td->go);

    start = now_ns();
    while (!atomic_load_explicit(td->should_stop, memory_order_relaxed)) {
        uint64_t offset, t0, lat;
        int n;

        if (is_rand) {
            offset = (next_random(&td->rng) % nblocks) * cfg->blocksize;
        } else {
            offset = td->offset;
            td->offset += cfg->blocksize;
            if (td->offset + cfg->blocksize > cfg->capacity) {
                td->offset = 0;
            }
        }

        t0 = now_ns();
        if (cfg->iovecs > 1) {
            if (is_read) {
                blkioq_readv(td->q, offset, iov, (int)cfg->iovecs, NULL, 0);
            } else {
                blkioq_writev(td->q, offset, iov, (int)cfg->iovecs, NULL, 0);
            }
        } else if (is_read) {
            blkioq_read(td->q, offset, td->buf, cfg->blocksize, NULL, 0);
        } else {
            blkioq_write(td->q, offset, td->buf, cfg->blocksize, NULL, 0);
        }
        if (cfg->poll) {
            do {
                td->stats.calls++;
                n = blkioq_do_io(td->q, &c, 0, 1, NULL);
            } while (n == 0);
        } else {
            td->stats.calls++;
            n = blkioq_do_io(td->q, &c, 1, 1, NULL);
        }
        if (n != 1) {
            fprintf(stderr, "blkioq_do_io: %s: %s\n",
                    n < 0 ? strerror(-n) : "no completion",
                    blkio_get_error_msg());
            exit(EXIT_FAILURE);
        }
        if (c.ret != 0) {
            fprintf(stderr, "I/O request failed: %s\n", strerror(-c.ret));
            exit(EXIT_FAILURE);
        }
        lat = now_ns() - t0;
        td->stats.count++;
        td->stats.total_latency_ns += lat;
        if (lat < td->stats.min_latency_ns) {
            td->stats.min_latency_ns = lat;
        }
        if (lat > td->stats.max_latency_ns) {
            td->stats.max_latency_ns = lat;
        }
    }
    end = now_ns();
    td->stats.runtime_secs = (end - start) / 1e9;
    td->stats.min_completions = 1;
    td->stats.max_completions = 1;
    return NULL;
}

static void print_stats(const struct config *cfg, const struct io_stats *s,
                        const char *indent)
{
    double count = s->count ? (double)s->count : 1.0;
    double calls = s->calls ? (double)s->calls : 1.0;

    printf("%s  \"kiops\": %.3f,\n", indent,
           (double)s->count / s->runtime_secs / 1000.);
    printf("%s  \"gips\": %.3f,\n", indent,
           (double)s->count * cfg->blocksize / s->runtime_secs / GiB);
    printf("%s  \"min_lat_us\": %.3f,\n", indent,
           s->count ? s->min_latency_ns / 1000. : 0.0);
    printf("%s  \"mean_lat_us\": %.3f,\n", indent,
           s->total_latency_ns / count / 1000.);
    printf("%s  \"max_lat_us\": %.3f,\n", indent, s->max_latency_ns / 1000.);
    printf("%s  \"calls\": %" PRIu64 ",\n", indent, s->calls);
    printf("%s  \"min_completions\": %.2f,\n", indent,
           (double)s->min_completions);
    printf("%s  \"mean_completions\": %.2f,\n", indent, s->count / calls);
    printf("%s  \"max_completions\": %.2f\n", indent,
           (double)s->max_completions);
}

static void print_results(const struct config *cfg,
                          const struct thread_data *tds)
{
    struct io_stats agg = {
        .min_latency_ns = UINT64_MAX,
        .min_completions = UINT_MAX,
    };

    for (unsigned i = 0; i < cfg->num_threads; i++) {
        const struct io_stats *s = &tds[i].stats;

        agg.count += s->count;
        agg.runtime_secs += s->runtime_secs;
        agg.total_latency_ns += s->total_latency_ns;
        agg.calls += s->calls;
        if (s->min_latency_ns < agg.min_latency_ns) {
            agg.min_latency_ns = s->min_latency_ns;
        }
        if (s->max_latency_ns > agg.max_latency_ns) {
            agg.max_latency_ns = s->max_latency_ns;
        }
        if (s->min_completions < agg.min_completions) {
            agg.min_completions = s->min_completions;
        }
        if (s->max_completions > agg.max_completions) {
            agg.max_completions = s->max_completions;
        }
    }
    agg.runtime_secs /= cfg->num_threads;

    printf("{\n  \"aggregate\": {\n");
    print_stats(cfg, &agg, "    ");
    printf("  },\n  \"threads\": [\n");
    for (unsigned i = 0; i < cfg->num_threads; i++) {
        printf("    {\n");
        print_stats(cfg, &tds[i].stats, "    ");
        printf("    }%s\n", i == cfg->num_threads - 1 ? "" : ",");
    }
    printf("  ]\n}\n");
}

static void usage(FILE *f, const char *prog)
{
    fprintf(f, "Usage: %s [--num-threads=<n>] [--iodepth=1] "
               "[--readwrite=read|write|randread|randwrite] "
               "[--blocksize=<bytes>] [--runtime=<seconds>] [--poll] "
               "[--iovecs=<n>] <driver> <property>=<value> ...\n", prog);
}

static unsigned parse_uint(const char *prog, const char *arg, const char *what)
{
    char *end;
    unsigned long v = strtoul(arg, &end, 10);

    if (*arg == '\0' || *end != '\0' || v == 0 || v > UINT_MAX) {
        fprintf(stderr, "Invalid %s: %s\n", what, arg);
        usage(stderr, prog);
        exit(EXIT_FAILURE);
    }
    return (unsigned)v;
}

enum {
    OPT_NUM_THREADS = 256, OPT_IODEPTH, OPT_READWRITE, OPT_BLOCKSIZE,
    OPT_RUNTIME, OPT_POLL, OPT_IOVECS,
};

static const struct option options[] = {
    { "help", no_argument, NULL, 'h' },
    { "num-threads", required_argument, NULL, OPT_NUM_THREADS },
    { "iodepth", required_argument, NULL, OPT_IODEPTH },
    { "readwrite", required_argument, NULL, OPT_READWRITE },
    { "blocksize", required_argument, NULL, OPT_BLOCKSIZE },
    { "runtime", required_argument, NULL, OPT_RUNTIME },
    { "poll", no_argument, NULL, OPT_POLL },
    { "iovecs", required_argument, NULL, OPT_IOVECS },
    { NULL, 0, NULL, 0 },
};

static void check(int ret, const char *what)
{
    if (ret < 0) {
        fprintf(stderr, "%s: %s: %s\n", what, strerror(-ret),
                blkio_get_error_msg());
        exit(EXIT_FAILURE);
    }
}

int main(int argc, char **argv)
{
    struct config cfg = {
        .num_threads = 1, .iodepth = 1, .readwrite = RW_READ,
        .blocksize = 4096, .runtime_secs = 30, .iovecs = 1, .poll = false,
    };
    struct blkio_mem_region region;
    struct thread_data *tds;
    struct blkio *b;
    pthread_barrier_t go;
    atomic_bool should_stop;
    const char *driver;
    unsigned remaining;
    int opt;

    while ((opt = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        switch (opt) {
        case 'h':
            usage(stdout, argv[0]);
            return EXIT_SUCCESS;
        case OPT_NUM_THREADS:
            cfg.num_threads = parse_uint(argv[0], optarg, "number of threads");
            break;
        case OPT_IODEPTH:
            cfg.iodepth = parse_uint(argv[0], optarg, "iodepth");
            if (cfg.iodepth != 1) {
                fprintf(stderr, "ref_blocking runs one request at a time: "
                                "only --iodepth=1 is meaningful\n");
                return EXIT_FAILURE;
            }
            break;
        case OPT_READWRITE:
            if (strcmp(optarg, "read") == 0) {
                cfg.readwrite = RW_READ;
            } else if (strcmp(optarg, "write") == 0) {
                cfg.readwrite = RW_WRITE;
            } else if (strcmp(optarg, "randread") == 0) {
                cfg.readwrite = RW_RANDREAD;
            } else if (strcmp(optarg, "randwrite") == 0) {
                cfg.readwrite = RW_RANDWRITE;
            } else {
                fprintf(stderr, "Invalid readwrite option\n");
                return EXIT_FAILURE;
            }
            break;
        case OPT_BLOCKSIZE:
            cfg.blocksize = parse_uint(argv[0], optarg, "blocksize");
            break;
        case OPT_RUNTIME:
            cfg.runtime_secs = parse_uint(argv[0], optarg, "runtime");
            break;
        case OPT_POLL:
            cfg.poll = true;
            break;
        case OPT_IOVECS:
            cfg.iovecs = parse_uint(argv[0], optarg, "iovecs");
            break;
        default:
            usage(stderr, argv[0]);
            return EXIT_FAILURE;
        }
    }
    if (optind == argc) {
        fprintf(stderr, "Missing blkio driver name argument\n");
        usage(stderr, argv[0]);
        return EXIT_FAILURE;
    }

    if (cfg.blocksize % cfg.iovecs != 0) {
        fprintf(stderr, "--iovecs must divide --blocksize\n");
        return EXIT_FAILURE;
    }
    driver = argv[optind++];
    check(blkio_create(driver, &b), "blkio_create");
    for (; optind < argc; optind++) {
        char *prop = argv[optind];
        char *value = strchr(prop, '=');

        if (!value) {
            fprintf(stderr, "%s: missing property value\n", prop);
            return EXIT_FAILURE;
        }
        *value++ = '\0';
        check(blkio_set_str(b, prop, value), prop);
    }
    if (cfg.readwrite == RW_READ || cfg.readwrite == RW_RANDREAD) {
        check(blkio_set_bool(b, "read-only", true), "read-only");
    }
    check(blkio_connect(b), "blkio_connect");
    check(blkio_get_uint64(b, "capacity", &cfg.capacity), "capacity");
    if (cfg.capacity < cfg.blocksize) {
        fprintf(stderr, "Device smaller than one block\n");
        return EXIT_FAILURE;
    }
    check(blkio_set_int(b, "num-queues", (int)cfg.num_threads), "num-queues");
    check(blkio_start(b), "blkio_start");
    check(blkio_alloc_mem_region(b, &region,
                                 (size_t)cfg.num_threads * cfg.blocksize),
          "blkio_alloc_mem_region");
    check(blkio_map_mem_region(b, &region), "blkio_map_mem_region");

    tds = calloc(cfg.num_threads, sizeof(*tds));
    if (!tds) {
        perror("calloc");
        return EXIT_FAILURE;
    }
    pthread_barrier_init(&go, NULL, cfg.num_threads + 1);
    atomic_init(&should_stop, false);
    for (unsigned i = 0; i < cfg.num_threads; i++) {
        struct thread_data *td = &tds[i];
        int ret;

        td->config = &cfg;
        td->q = blkio_get_queue(b, (int)i);
        td->buf = (char *)region.addr + (size_t)i * cfg.blocksize;
        memset(td->buf, 0xa5, cfg.blocksize);
        td->offset = (cfg.capacity / cfg.num_threads * i) /
                     cfg.blocksize * cfg.blocksize;
        td->go = &go;
        td->should_stop = &should_stop;
        td->stats.min_latency_ns = UINT64_MAX;
        td->rng = 0x9E3779B97F4A7C15ull * (i + 1) ^ (uint64_t)getpid();
        ret = pthread_create(&td->thread, NULL, thread_main, td);
        if (ret != 0) {
            errno = ret;
            perror("pthread_create");
            return EXIT_FAILURE;
        }
    }
    pthread_barrier_wait(&go);

    remaining = sleep(cfg.runtime_secs);
    if (remaining > 0) {
        fprintf(stderr, "Stopped early by a signal...\n");
    }
    atomic_store_explicit(&should_stop, true, memory_order_relaxed);
    for (unsigned i = 0; i < cfg.num_threads; i++) {
        pthread_join(tds[i].thread, NULL);
    }

    print_results(&cfg, tds);
    free(tds);
    blkio_destroy(&b);
    return EXIT_SUCCESS;
}
