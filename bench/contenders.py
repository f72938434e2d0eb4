"""Python peers of blkio, each a small benchmark with blkio-bench's CLI and JSON.

    python bench/contenders.py KIND [--num-threads=N] [--iodepth=N]
        [--readwrite=read|write|randread|randwrite] [--blocksize=BYTES]
        [--runtime=SECONDS] [--direct] PATH

KIND is one of:
  preadv   plain os.preadv/os.pwritev loop, one request at a time per thread
           (--iodepth must be 1)
  liburing PyPI "liburing": iodepth requests in flight per thread, one ring per
           thread; submit_and_wait(1) then reap every ready completion in one
           batch (cqe iterator + cq_advance), resubmitting as they come
  caio     PyPI "caio" AsyncioContext (its default backend), iodepth
           coroutines on one event loop
  aiofile  PyPI "aiofile" AIOFile.read_bytes/write_bytes (on caio), iodepth
           coroutines on one event loop

Output: the JSON of libblkio's blkio-bench (aggregate and per-thread kiops,
gips, latencies in microseconds, calls, completions per call), so run.py
parses every contender the same way. mean_lat_us is iodepth * runtime / count
(Little's law); min and max latency are timed on one request in 64.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import random
import sys
import threading
import time

GiB = 1 << 30
TABLE_LEN = 1 << 16
SAMPLE = 64


class Stats:
    def __init__(self, depth: int):
        self.depth = depth
        self.count = 0
        self.runtime = 0.0
        self.calls = 0
        self.min_ns = None
        self.max_ns = 0
        self.min_comp = None
        self.max_comp = 0

    def lat(self, ns: int) -> None:
        if self.min_ns is None or ns < self.min_ns:
            self.min_ns = ns
        if ns > self.max_ns:
            self.max_ns = ns

    def comp(self, n: int) -> None:
        if self.min_comp is None or n < self.min_comp:
            self.min_comp = n
        if n > self.max_comp:
            self.max_comp = n


def _d(count, runtime, min_ns, mean_us, max_ns, calls, min_c, max_c, bs):
    runtime = runtime or 1e-9
    return {
        "kiops": round(count / runtime / 1000.0, 3),
        "gips": round(count * bs / runtime / GiB, 3),
        "min_lat_us": round((min_ns or 0) / 1000.0, 3),
        "mean_lat_us": round(mean_us, 3),
        "max_lat_us": round(max_ns / 1000.0, 3),
        "calls": int(calls),
        "min_completions": round(float(min_c or 0), 2),
        "mean_completions": round(count / calls if calls else 0.0, 2),
        "max_completions": round(float(max_c), 2),
    }


def results(stats: list[Stats], bs: int) -> dict:
    th = []
    for s in stats:
        mean = s.depth * s.runtime / s.count * 1e6 if s.count else 0.0
        th.append(_d(s.count, s.runtime, s.min_ns, mean, s.max_ns, s.calls,
                     s.min_comp, s.max_comp, bs))
    count = sum(s.count for s in stats)
    mins = [s.min_ns for s in stats if s.min_ns is not None]
    minc = [s.min_comp for s in stats if s.min_comp is not None]
    tot = sum(t["mean_lat_us"] * s.count for t, s in zip(th, stats))
    agg = _d(count, sum(s.runtime for s in stats) / len(stats),
             min(mins) if mins else None, tot / count if count else 0.0,
             max(s.max_ns for s in stats), sum(s.calls for s in stats),
             min(minc) if minc else None, max(s.max_comp for s in stats), bs)
    return {"aggregate": agg, "threads": th}


def offsets(args, thread: int, capacity: int) -> list[int]:
    bs = args.blocksize
    nblocks = capacity // bs
    if args.readwrite.startswith("rand"):
        rng = random.Random((os.getpid() << 8) + thread)
        return [rng.randrange(nblocks) * bs for _ in range(TABLE_LEN)]
    first = capacity // args.num_threads * thread // bs
    n = min(nblocks, 1 << 20)
    return [((first + k) % nblocks) * bs for k in range(n)]


def aligned(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory (good for O_DIRECT)."""
    m = mmap.mmap(-1, max(nbytes, mmap.PAGESIZE))
    return m


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


def run_preadv(args, fd, cap, t, st: Stats, barrier) -> None:
    if args.iodepth != 1:
        raise SystemExit("preadv runs one request at a time: use --iodepth=1")
    mem = aligned(args.blocksize)
    buf = [memoryview(mem)[:args.blocksize]]
    if args.readwrite in ("read", "randread"):
        op = os.preadv
    else:
        mem[:] = b"\xa5" * len(mem)
        op = os.pwritev
    offs = offsets(args, t, cap)
    L = len(offs)
    i = 0
    K = SAMPLE - 1
    pc = time.perf_counter_ns
    if barrier:
        barrier.wait()
    t0 = time.perf_counter()
    deadline = t0 + args.runtime
    count = 0
    while True:
        for _ in range(K):
            op(fd, buf, offs[i])
            i += 1
            if i == L:
                i = 0
        a = pc()
        op(fd, buf, offs[i])
        st.lat(pc() - a)
        i += 1
        if i == L:
            i = 0
        count += K + 1
        if time.perf_counter() >= deadline:
            break
    st.runtime = time.perf_counter() - t0
    st.count = st.calls = count
    st.min_comp = st.max_comp = 1


def run_liburing(args, fd, cap, t, st: Stats, barrier) -> None:
    import liburing as L_

    D = args.iodepth
    bs = args.blocksize
    is_read = args.readwrite in ("read", "randread")
    if args.direct:
        raise SystemExit("liburing: its prep_read takes only bytearray "
                         "buffers, which are not aligned for O_DIRECT")
    if is_read:
        bufs = [bytearray(bs) for _ in range(D)]
        prep = L_.io_uring_prep_read
    else:
        bufs = [bytes(b"\xa5" * bs) for _ in range(D)]
        prep = L_.io_uring_prep_write
    ring = L_.Ring()
    cqe = L_.Cqe()
    L_.io_uring_queue_init(max(8, 1 << (D - 1).bit_length()), ring)
    get_sqe = L_.io_uring_get_sqe
    set_data = L_.io_uring_sqe_set_data64
    submit_and_wait = L_.io_uring_submit_and_wait
    iter_init = L_.io_uring_cqe_iter_init
    iter_next = L_.io_uring_cqe_iter_next
    advance = L_.io_uring_cq_advance
    offs = offsets(args, t, cap)
    NL = len(offs)
    i = 0
    pc = time.perf_counter_ns
    t_sub = [0] * D
    sampled = -1
    try:
        if barrier:
            barrier.wait()
        t0 = time.perf_counter()
        deadline = t0 + args.runtime
        now = time.perf_counter
        for j in range(D):
            sqe = get_sqe(ring)
            prep(sqe, fd, bufs[j], offs[i])
            set_data(sqe, j)
            i += 1
            if i == NL:
                i = 0
        count = calls = 0
        inflight = D
        while True:
            submit_and_wait(ring, 1)
            calls += 1
            it = iter_init(ring)
            n = 0
            while iter_next(it, cqe):
                e = cqe[0]
                j = e.user_data
                res = e.res
                if res != bs:
                    raise OSError(-res if res < 0 else 5,
                                  f"liburing request returned {res}")
                if j == sampled:
                    st.lat(pc() - t_sub[j])
                    sampled = -1
                sqe = get_sqe(ring)
                prep(sqe, fd, bufs[j], offs[i])
                set_data(sqe, j)
                i += 1
                if i == NL:
                    i = 0
                n += 1
            advance(ring, n)
            st.comp(n)
            count += n
            if calls % SAMPLE == 0:
                if sampled < 0:
                    sampled = j
                    t_sub[j] = pc()
                if now() >= deadline:
                    break
        st.runtime = now() - t0
        st.count = count
        st.calls = calls
        # drain: submit what was prepared, reap everything
        while inflight > 0:
            submit_and_wait(ring, 1)
            it = iter_init(ring)
            n = 0
            while iter_next(it, cqe):
                n += 1
            advance(ring, n)
            inflight -= n
    finally:
        L_.io_uring_queue_exit(ring)


async def _aio_loop(args, op, cap, st: Stats) -> None:
    D = args.iodepth
    offs = offsets(args, 0, cap)
    L = len(offs)
    stop = [False]
    counts = [0] * D
    pc = time.perf_counter_ns

    async def worker(j: int) -> None:
        i = (j * L) // D
        c = 0
        while not stop[0]:
            if c % SAMPLE == 0:
                a = pc()
                await op(offs[i])
                st.lat(pc() - a)
            else:
                await op(offs[i])
            c += 1
            i += 1
            if i == L:
                i = 0
        counts[j] = c

    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    loop.call_later(args.runtime, stop.__setitem__, 0, True)
    await asyncio.gather(*(worker(j) for j in range(D)))
    st.runtime = time.perf_counter() - t0
    st.count = st.calls = sum(counts)
    st.min_comp = st.max_comp = 1


async def _caio(args, fd, cap, st: Stats) -> None:
    from caio import AsyncioContext

    bs = args.blocksize
    ctx = AsyncioContext(max_requests=max(args.iodepth, 1))
    try:
        if args.readwrite in ("read", "randread"):
            async def op(off):
                data = await ctx.read(bs, fd, off)
                if len(data) != bs:
                    raise OSError(5, f"caio read returned {len(data)} bytes")
        else:
            payload = b"\xa5" * bs

            async def op(off):
                n = await ctx.write(payload, fd, off)
                if n != bs:
                    raise OSError(5, f"caio write returned {n}")
        try:
            await _aio_loop(args, op, cap, st)
        except (SystemError, OSError) as e:
            if args.direct:
                raise SystemExit(f"caio fails on O_DIRECT ({e}; likely its "
                                 "buffers are not aligned for O_DIRECT)")
            raise
    finally:
        ctx.close()


async def _aiofile(args, fd, cap, st: Stats) -> None:
    from aiofile import AIOFile

    bs = args.blocksize
    is_read = args.readwrite in ("read", "randread")
    # AIOFile opens the path itself; O_DIRECT is not one of its modes.
    if args.direct:
        raise SystemExit("aiofile: AIOFile has no O_DIRECT mode")
    async with AIOFile(args.path, "rb" if is_read else "r+b") as af:
        if is_read:
            async def op(off):
                data = await af.read_bytes(bs, off)
                if len(data) != bs:
                    raise OSError(5, f"aiofile read returned {len(data)}")
        else:
            payload = b"\xa5" * bs

            async def op(off):
                await af.write_bytes(payload, off)
        await _aio_loop(args, op, cap, st)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="contenders.py")
    p.add_argument("kind", choices=("preadv", "liburing", "caio", "aiofile"))
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--iodepth", type=int, default=1)
    p.add_argument("--readwrite", default="read",
                   choices=("read", "write", "randread", "randwrite"))
    p.add_argument("--blocksize", type=int, default=4096)
    p.add_argument("--runtime", type=float, default=30.0)
    p.add_argument("--direct", action="store_true", help="open with O_DIRECT")
    p.add_argument("path")
    args = p.parse_args(argv)

    fd = open_fd(args)
    cap = capacity_of(fd)
    stats = [Stats(args.iodepth) for _ in range(args.num_threads)]
    try:
        if args.kind in ("caio", "aiofile"):
            if args.num_threads != 1:
                raise SystemExit(f"{args.kind}: one event loop, one thread")
            coro = _caio if args.kind == "caio" else _aiofile
            asyncio.run(coro(args, fd, cap, stats[0]))
        else:
            fn = run_preadv if args.kind == "preadv" else run_liburing
            if args.num_threads == 1:
                fn(args, fd, cap, 0, stats[0], None)
            else:
                barrier = threading.Barrier(args.num_threads)
                errs: list[BaseException] = []

                def target(t):
                    try:
                        fn(args, fd, cap, t, stats[t], barrier)
                    except BaseException as e:
                        errs.append(e)
                        barrier.abort()

                ths = [threading.Thread(target=target, args=(t,))
                       for t in range(args.num_threads)]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join()
                real = [e for e in errs
                        if not isinstance(e, threading.BrokenBarrierError)]
                if real or errs:
                    raise (real or errs)[0]
    finally:
        os.close(fd)
    print(json.dumps(results(stats, args.blocksize), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
