"""Python peers of blkio, each a small benchmark with blkio-bench's CLI and JSON.

    python bench/contenders.py KIND [--num-threads=N] [--iodepth=N]
        [--readwrite=read|write|randread|randwrite] [--blocksize=BYTES]
        [--runtime=SECONDS] [--requests=N] [--loop=asyncio|uvloop]
        [--direct] [--flush] [--resolve=batch|each] [PATH]

KIND is one of:
  preadv    plain os.preadv/os.pwritev loop, one request at a time per thread
            (--iodepth must be 1)
  liburing  PyPI "liburing" (2024.5.3, built from source: see bench/README.md):
            iodepth requests in flight per thread, one ring per thread;
            submit_and_wait(1), then reap every ready completion
            (peek_cqe + cq_advance), resubmitting as they come
  caio      PyPI "caio" AsyncioContext (its default backend), iodepth
            coroutines on one event loop
  aiofile   PyPI "aiofile" AIOFile.read_bytes/write_bytes (on caio), iodepth
            coroutines on one event loop
  ping      bare asyncio, no I/O and no PATH: iodepth coroutines each awaiting
            a future that a loop callback resolves (--resolve=batch: one
            call_soon callback resolves every pending future, as a completion
            fd reader would; each: one call_soon(set_result) per future). The
            most a per-request asyncio API can reach on this loop.
  call      no I/O and no PATH: the blocking closed loop calling a C function
            of two arguments that does nothing (operator.is_) per request,
            --iodepth 1. What a Python call per request costs at least (with
            C ref_blocking: the floor of the blocking API at QD1).
  fromfile  numpy.fromfile(PATH, count=blocksize, offset=...) per request
            (buffered; the array is allocated by numpy inside the call)
  readinto  file.readinto(buf) on open(PATH, "rb") per request (buffered;
            buf a numpy array touched before the clock starts)
  tofile    ndarray.tofile(f) on open(PATH, "r+b") per request
  write     file.write(buf) on open(PATH, "r+b") per request
            (--flush: os.fsync at the end, inside the timed run)

Every kind is timed by the loops of blkio._bench (what `python -m blkio
bench` runs): closed_loop for the one-at-a-time kinds, aio_workers for the
asyncio ones, so the Python contenders differ only in the call they make.

Output: the JSON of libblkio's blkio-bench (aggregate and per-thread kiops,
gips, latencies in microseconds, calls, completions per call), so run.py
parses every contender the same way. mean_lat_us is iodepth * runtime / count
(Little's law); min and max latency are timed on one request in 64.
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import operator
import os
import sys
import threading

import numpy as np

from blkio._bench import (BenchError, InflightClock, OffsetRuns, Stats, Workload,
                          add_workload_arguments, aio_workers, closed_loop,
                          offset_stream, results_json, run_event_loop,
                          run_threads, touch)

KINDS = ("preadv", "liburing", "caio", "aiofile", "ping", "call",
         "fromfile", "readinto", "tofile", "write")
ASYNC_KINDS = ("caio", "aiofile", "ping")
FILE_OBJECT_KINDS = ("fromfile", "readinto", "tofile", "write")


def aligned(nbytes: int, is_read: bool) -> np.ndarray:
    """Page-aligned anonymous memory (good for O_DIRECT), touched."""
    m = mmap.mmap(-1, max(nbytes, mmap.PAGESIZE))
    return touch(np.frombuffer(m, dtype=np.uint8, count=nbytes), is_read)


def open_fd(args) -> int:
    flags = os.O_RDONLY if args.readwrite in ("read", "randread") else os.O_RDWR
    if args.direct:
        flags |= os.O_DIRECT
    return os.open(args.path, flags | os.O_CLOEXEC)


def capacity_of(fd: int) -> int:
    st = os.fstat(fd)
    if st.st_size:
        return st.st_size
    return os.lseek(fd, 0, os.SEEK_END)       # block device


# --------------------------------------------------------------------------
# one request at a time per thread


def run_preadv(args, wl: Workload, fd: int, t: int, st: Stats, ready) -> None:
    if wl.depth != 1:
        raise BenchError("preadv runs one request at a time: use --iodepth=1")
    bufs = [aligned(wl.bs, wl.is_read)]
    op = os.preadv if wl.is_read else os.pwritev
    take = OffsetRuns(wl.offsets(t).tolist()).take

    def run_n(k: int) -> None:
        for off in take(k):
            op(fd, bufs, off)

    closed_loop(run_n, st, wl, ready)


def run_call(args, wl: Workload, fd: int, t: int, st: Stats, ready) -> None:
    """The blocking loop with no I/O: blkio's closed loop (the same offsets
    and list runs) calling a C function of two arguments that does nothing
    (operator.is_).  What any Python call per request costs at least: with
    C ref_blocking it makes the floor of the blocking API's QD1 rate."""
    if wl.depth != 1:
        raise BenchError("call runs one call at a time: use --iodepth=1")
    buf = np.empty(wl.bs, dtype=np.uint8)
    op = operator.is_
    take = OffsetRuns(wl.offsets(t).tolist()).take

    def run_n(k: int) -> None:
        for off in take(k):
            op(off, buf)

    closed_loop(run_n, st, wl, ready)


def run_file_object(args, wl: Workload, fd: int, t: int, st: Stats,
                    ready) -> None:
    """numpy.fromfile / ndarray.tofile / file.readinto / file.write."""
    kind = args.kind
    if (kind in ("fromfile", "readinto")) != wl.is_read:
        raise BenchError(f"{kind} goes with --readwrite="
                         f"{'read' if kind in ('fromfile', 'readinto') else 'write'}")
    take = OffsetRuns(wl.offsets(t).tolist()).take
    bs = wl.bs
    path = args.path
    f = open(path, "rb" if wl.is_read else "r+b")
    buf = touch(np.empty(bs, dtype=np.uint8), wl.is_read)
    seek = f.seek
    if kind == "fromfile":
        fromfile = np.fromfile
        u8 = np.uint8

        def run_n(k: int) -> None:
            for off in take(k):
                if fromfile(path, dtype=u8, count=bs, offset=off).size != bs:
                    raise OSError(5, "numpy.fromfile: short read")
    else:
        call = {"readinto": functools.partial(f.readinto, buf),
                "tofile": functools.partial(buf.tofile, f),
                "write": functools.partial(f.write, buf)}[kind]

        def run_n(k: int) -> None:
            for off in take(k):
                seek(off)
                done = call()
                if done is not None and done != bs:
                    raise OSError(5, f"{kind}: {done} of {bs} bytes")

    def flush() -> None:
        f.flush()
        os.fsync(f.fileno())

    try:
        closed_loop(run_n, st, wl, ready, flush if args.flush else None)
    finally:
        f.close()


# --------------------------------------------------------------------------
# several requests in flight


LIBURING_NAMES = ("io_uring", "io_uring_cqe", "io_uring_queue_init",
                  "io_uring_queue_exit", "io_uring_get_sqe",
                  "io_uring_prep_read", "io_uring_prep_write",
                  "io_uring_sqe_set_data64", "io_uring_submit_and_wait",
                  "io_uring_peek_cqe", "io_uring_cq_advance")


def import_liburing():
    """PyPI liburing, its names resolved in this thread (2024.5.3 imports
    them lazily, which is not safe from several threads at once)."""
    import liburing as L_
    missing = [n for n in LIBURING_NAMES if not hasattr(L_, n)]
    if missing:
        raise BenchError("liburing: this contender uses the API of PyPI "
                         f"liburing 2024.5.3; {', '.join(missing)} missing "
                         f"in {getattr(L_, '__version__', '?')}")
    return L_


def run_liburing(args, wl: Workload, fd: int, t: int, st: Stats,
                 ready) -> None:
    L_ = import_liburing()
    D = wl.depth
    bs = wl.bs
    flat = aligned(D * bs, wl.is_read)
    bufs = [flat[j * bs:(j + 1) * bs] for j in range(D)]
    prep = L_.io_uring_prep_read if wl.is_read else L_.io_uring_prep_write
    ring = L_.io_uring()
    cqe = L_.io_uring_cqe()
    L_.io_uring_queue_init(max(8, 1 << (D - 1).bit_length()), ring)
    get_sqe = L_.io_uring_get_sqe
    set_data = L_.io_uring_sqe_set_data64
    submit_and_wait = L_.io_uring_submit_and_wait
    peek = L_.io_uring_peek_cqe
    advance = L_.io_uring_cq_advance
    offs = offset_stream(wl.offsets(t).tolist())
    nxt = offs.__next__
    try:
        if ready is not None:
            ready.wait()
        clock = InflightClock(st, wl)
        for j in range(1, D + 1):   # user_data 0 reads as "no cqe" in 2024.5.3
            sqe = get_sqe(ring)
            prep(sqe, fd, bufs[j - 1], bs, nxt())
            set_data(sqe, j)
        count = calls = 0
        while True:
            submit_and_wait(ring, 1)
            calls += 1
            n = 0
            while peek(ring, cqe) == 0:
                j = cqe.user_data
                res = cqe.res
                advance(ring, 1)
                if res != bs:
                    raise OSError(-res if res < 0 else 5,
                                  f"liburing request returned {res}")
                if j == clock.slot:
                    clock.done()
                sqe = get_sqe(ring)
                prep(sqe, fd, bufs[j - 1], bs, nxt())
                set_data(sqe, j)
                n += 1
            st.comp(n)
            count += n
            if clock.tick(calls, count, j):
                break
        clock.finish(count, calls)
        # drain: submit what was prepared, reap everything
        inflight = D
        while inflight > 0:
            submit_and_wait(ring, 1)
            while peek(ring, cqe) == 0:
                advance(ring, 1)
                inflight -= 1
    finally:
        L_.io_uring_queue_exit(ring)


async def _caio(args, wl: Workload, fd: int, st: Stats) -> None:
    from caio import AsyncioContext

    bs = wl.bs
    ctx = AsyncioContext(max_requests=max(wl.depth, 1))
    try:
        if wl.is_read:
            async def op(off, buf):
                data = await ctx.read(bs, fd, off)
                if len(data) != bs:
                    raise OSError(5, f"caio read returned {len(data)} bytes")
        else:
            payload = b"\xa5" * bs

            async def op(off, buf):
                n = await ctx.write(payload, fd, off)
                if n != bs:
                    raise OSError(5, f"caio write returned {n}")
        try:
            await aio_workers(op, [None] * wl.depth, wl.offsets(0).tolist(),
                              st, wl)
        except (SystemError, OSError) as e:
            if args.direct:
                raise BenchError(f"caio fails on O_DIRECT ({e}; likely its "
                                 "buffers are not aligned for O_DIRECT)")
            raise
    finally:
        ctx.close()


async def _aiofile(args, wl: Workload, fd: int, st: Stats) -> None:
    from aiofile import AIOFile

    bs = wl.bs
    # AIOFile opens the path itself; O_DIRECT is not one of its modes.
    if args.direct:
        raise BenchError("aiofile: AIOFile has no O_DIRECT mode")
    async with AIOFile(args.path, "rb" if wl.is_read else "r+b") as af:
        if wl.is_read:
            async def op(off, buf):
                data = await af.read_bytes(bs, off)
                if len(data) != bs:
                    raise OSError(5, f"aiofile read returned {len(data)}")
        else:
            payload = b"\xa5" * bs

            async def op(off, buf):
                await af.write_bytes(payload, off)
        await aio_workers(op, [None] * wl.depth, wl.offsets(0).tolist(),
                          st, wl)


async def _ping(args, wl: Workload, fd: int, st: Stats) -> None:
    import asyncio
    loop = asyncio.get_running_loop()
    new_future = loop.create_future
    call_soon = loop.call_soon
    bs = wl.bs
    if args.resolve == "each":
        def op(off, buf):
            fut = new_future()
            call_soon(fut.set_result, bs)
            return fut
    else:
        pending: list = []
        scheduled = [False]

        def resolve_all() -> None:
            scheduled[0] = False
            ready = pending[:]
            pending.clear()
            for fut in ready:
                fut.set_result(bs)

        def op(off, buf):
            fut = new_future()
            pending.append(fut)
            if not scheduled[0]:
                scheduled[0] = True
                call_soon(resolve_all)
            return fut
    await aio_workers(op, [None] * wl.depth, wl.offsets(0).tolist(), st, wl)


# --------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="contenders.py")
    p.add_argument("kind", choices=KINDS)
    add_workload_arguments(p)
    p.add_argument("--direct", action="store_true", help="open with O_DIRECT")
    p.add_argument("--flush", action="store_true",
                   help="fsync at the end, inside the timed run "
                   "(tofile, write)")
    p.add_argument("--resolve", default="batch", choices=("batch", "each"),
                   help="ping: one callback for every pending future "
                   "(default) or one per future")
    p.add_argument("path", nargs="?", help="file or block device "
                   "(not for ping)")
    args = p.parse_intermixed_args(argv)
    if args.kind not in ("ping", "call") and not args.path:
        p.error(f"{args.kind} needs a PATH")
    if args.flush and args.kind not in ("tofile", "write"):
        p.error("--flush goes with tofile and write")

    fd = -1
    try:
        if args.kind in ("ping", "call"):
            cap = args.blocksize * max(args.iodepth, 1 << 18)   # offsets only
        else:
            fd = open_fd(args)
            cap = capacity_of(fd)
        wl = Workload(args, cap)
        stats = [Stats(args.iodepth) for _ in range(args.num_threads)]
        if args.kind in ASYNC_KINDS:
            if args.num_threads != 1:
                raise BenchError(f"{args.kind}: one event loop, one thread")
            coro = {"caio": _caio, "aiofile": _aiofile, "ping": _ping}[args.kind]
            run_event_loop(coro(args, wl, fd, stats[0]), args.loop)
        else:
            fn = {"preadv": run_preadv, "liburing": run_liburing,
                  "call": run_call}.get(
                args.kind, run_file_object)
            if args.kind == "liburing":
                import_liburing()
            ready = (threading.Barrier(args.num_threads)
                     if args.num_threads > 1 else None)
            run_threads([(fn, args, wl, fd, t, stats[t], ready)
                         for t in range(args.num_threads)], ready)
    except BenchError as e:
        print(f"contenders.py {args.kind}: {e}", file=sys.stderr)
        return 1
    finally:
        if fd >= 0:
            os.close(fd)
    print(json.dumps(results_json(stats, args.blocksize), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
