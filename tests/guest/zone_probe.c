/*
 * zone-probe: libblkio's zoned-storage calls, straight from C, for the guest
 * tests (blkio's Python API does not wrap them yet).
 *
 * Usage: zone-probe DRIVER PATH OP [ARGS]... [-- OP [ARGS]...]...
 *
 * Creates, connects and starts one instance, runs the operations in order on
 * queue 0 and prints one JSON object per line:
 *
 *   props                    zoned properties, read in each state (printed
 *                            before connect, after connect and after start)
 *   report OFFSET NR         blkioq_report_zones into NR zones
 *   open|close|finish|reset OFFSET
 *   open-all|close-all|finish-all|reset-all
 *   write OFFSET LEN BYTE    write LEN bytes of BYTE
 *   read OFFSET LEN          read; prints whether all bytes are zero
 *
 * Each line has "op", "ret" (the completion's ret, or the call's return
 * value) and "msg" (blkio_get_error_msg() or the completion's error_msg).
 * The exit status is 0 when every operation was issued (whatever it
 * returned), 2 on a usage or set-up error.
 */

#include <blkio.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const ZONE_PROPS[][2] = {
    {"zoned", "int"},
    {"max-open-zones", "int"},
    {"max-active-zones", "int"},
    {"zone-size", "uint64"},
    {"nr-zones", "uint64"},
    {"append-support", "bool"},
    {"zone-append-max-bytes", "uint64"},
    /* The spellings of libblkio's manual (blkio(3)), to show they fail. */
    {"max_open_zones", "int"},
    {"zone_size", "uint64"},
};

static void json_str(const char *s)
{
    putchar('"');
    for (; s && *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", *s);
        else
            putchar(*s);
    }
    putchar('"');
}

static void print_props(struct blkio *b, const char *state)
{
    printf("{\"op\": \"props\", \"state\": \"%s\", \"values\": {", state);
    for (size_t i = 0; i < sizeof(ZONE_PROPS) / sizeof(ZONE_PROPS[0]); i++) {
        const char *name = ZONE_PROPS[i][0], *type = ZONE_PROPS[i][1];
        int ret;
        printf("%s", i ? ", " : "");
        json_str(name);
        printf(": ");
        if (!strcmp(type, "int")) {
            int v;
            ret = blkio_get_int(b, name, &v);
            if (ret == 0) printf("%d", v);
        } else if (!strcmp(type, "bool")) {
            bool v;
            ret = blkio_get_bool(b, name, &v);
            if (ret == 0) printf("%s", v ? "true" : "false");
        } else {
            uint64_t v;
            ret = blkio_get_uint64(b, name, &v);
            if (ret == 0) printf("%" PRIu64, v);
        }
        if (ret != 0) {
            /* {"errno": N, "msg": "..."} for a property that cannot be read. */
            printf("{\"errno\": %d, \"msg\": ", -ret);
            json_str(blkio_get_error_msg());
            printf("}");
        }
    }
    printf("}}\n");
    fflush(stdout);
}

static int wait_one(struct blkioq *q, const char *op, const char *extra)
{
    struct blkio_completion c;
    int n = blkioq_do_io(q, &c, 1, 1, NULL);
    printf("{\"op\": \"%s\"%s, ", op, extra);
    if (n != 1) {
        printf("\"ret\": %d, \"msg\": ", n);
        json_str(blkio_get_error_msg());
        printf(", \"do_io_failed\": true");
        return n < 0 ? n : -EIO;
    }
    printf("\"ret\": %d, \"msg\": ", c.ret);
    json_str(c.error_msg);
    return c.ret;
}

static uint64_t num(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || !*s) {
        fprintf(stderr, "zone-probe: bad number %s\n", s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    struct blkio *b;
    if (argc < 3) {
        fprintf(stderr, "usage: zone-probe DRIVER PATH OP [ARGS]... [-- OP ...]...\n");
        return 2;
    }
    if (blkio_create(argv[1], &b) < 0) {
        fprintf(stderr, "blkio_create: %s\n", blkio_get_error_msg());
        return 2;
    }
    if (blkio_set_str(b, "path", argv[2]) < 0) {
        fprintf(stderr, "path: %s\n", blkio_get_error_msg());
        return 2;
    }
    print_props(b, "created");
    if (blkio_connect(b) < 0) {
        fprintf(stderr, "blkio_connect: %s\n", blkio_get_error_msg());
        return 2;
    }
    print_props(b, "connected");
    if (blkio_start(b) < 0) {
        fprintf(stderr, "blkio_start: %s\n", blkio_get_error_msg());
        return 2;
    }
    print_props(b, "started");
    struct blkioq *q = blkio_get_queue(b, 0);

    for (int i = 3; i < argc;) {
        const char *op = argv[i];
        int nargs = 0;
        while (i + 1 + nargs < argc && strcmp(argv[i + 1 + nargs], "--"))
            nargs++;
        char **a = argv + i + 1;
        char extra[128] = "";
        int ret;
        if (!strcmp(op, "props") && nargs == 0) {
            print_props(b, "started");
        } else if (!strcmp(op, "report") && nargs == 2) {
            uint64_t off = num(a[0]);
            uint32_t nr = (uint32_t)num(a[1]);
            struct blkio_zone *z = calloc(nr ? nr : 1, sizeof(*z));
            /* Poison the array: entries libblkio does not fill stay 0xaa. */
            memset(z, 0xaa, (nr ? nr : 1) * sizeof(*z));
            blkioq_report_zones(q, off, z, nr, NULL, 0);
            snprintf(extra, sizeof(extra), ", \"offset\": %" PRIu64 ", \"nr\": %u", off, nr);
            ret = wait_one(q, op, extra);
            printf(", \"zones\": [");
            for (uint32_t k = 0; k < nr; k++) {
                printf("%s{\"start\": %" PRIu64 ", \"len\": %" PRIu64 ", \"capacity\": %" PRIu64
                       ", \"write_pointer\": %" PRIu64 ", \"type\": %u, \"state\": %u, \"reset\": %u}",
                       k ? ", " : "", z[k].start, z[k].len, z[k].capacity, z[k].write_pointer,
                       z[k].zone_type, z[k].zone_state, z[k].reset);
            }
            printf("]}\n");
            free(z);
        } else if (nargs == 1 && (!strcmp(op, "open") || !strcmp(op, "close") ||
                                  !strcmp(op, "finish") || !strcmp(op, "reset"))) {
            uint64_t off = num(a[0]);
            if (!strcmp(op, "open")) blkioq_open_zone(q, off, NULL, 0);
            else if (!strcmp(op, "close")) blkioq_close_zone(q, off, NULL, 0);
            else if (!strcmp(op, "finish")) blkioq_finish_zone(q, off, NULL, 0);
            else blkioq_reset_zone(q, off, NULL, 0);
            snprintf(extra, sizeof(extra), ", \"offset\": %" PRIu64, off);
            wait_one(q, op, extra);
            printf("}\n");
        } else if (nargs == 0 && (!strcmp(op, "open-all") || !strcmp(op, "close-all") ||
                                  !strcmp(op, "finish-all") || !strcmp(op, "reset-all"))) {
            if (!strcmp(op, "open-all")) blkioq_open_all_zones(q, NULL, 0);
            else if (!strcmp(op, "close-all")) blkioq_close_all_zones(q, NULL, 0);
            else if (!strcmp(op, "finish-all")) blkioq_finish_all_zones(q, NULL, 0);
            else blkioq_reset_all_zones(q, NULL, 0);
            wait_one(q, op, "");
            printf("}\n");
        } else if ((!strcmp(op, "write") && nargs == 3) || (!strcmp(op, "read") && nargs == 2)) {
            uint64_t off = num(a[0]);
            size_t len = num(a[1]);
            void *buf;
            if (posix_memalign(&buf, 4096, len ? len : 4096)) {
                fprintf(stderr, "zone-probe: out of memory\n");
                return 2;
            }
            snprintf(extra, sizeof(extra), ", \"offset\": %" PRIu64 ", \"len\": %zu", off, len);
            if (op[0] == 'w') {
                memset(buf, (int)num(a[2]), len);
                blkioq_write(q, off, buf, len, NULL, 0);
                wait_one(q, op, extra);
            } else {
                memset(buf, 0xaa, len);
                blkioq_read(q, off, buf, len, NULL, 0);
                ret = wait_one(q, op, extra);
                size_t k = 0;
                while (k < len && ((unsigned char *)buf)[k] == 0)
                    k++;
                printf(", \"zeroes\": %s", ret == 0 && k == len ? "true" : "false");
            }
            printf("}\n");
            free(buf);
        } else {
            fprintf(stderr, "zone-probe: bad operation %s with %d arguments\n", op, nargs);
            return 2;
        }
        fflush(stdout);
        i += 1 + nargs + 1;     /* the op, its arguments, the "--" */
    }
    blkio_destroy(&b);
    return 0;
}
