"""``python -m blkio bench``: libblkio's blkio-bench, through blkio's Python APIs.

Same options and same JSON output as the C example program ``blkio-bench``
(libblkio-dev's examples), so one can be swapped for the other::

    python -m blkio bench [--num-threads=N] [--iodepth=N]
        [--readwrite=read|write|randread|randwrite] [--blocksize=BYTES]
        [--runtime=SECONDS] [--poll] [--api=batch|queue|blocking|asyncio]
        [--buffers=alloc|numpy] [--poll-queues] [--lat-sample=N]
        <driver> <property>=<value> ...

Properties are given as libblkio spells them (``path=/tmp/x direct=1
num-entries=256``) and passed to ``blkio.open`` as keywords (``-`` becomes
``_``; integers become ``int``, ``true/false/on/off/yes/no`` become ``bool``).

APIs:
  batch     Queue.submit_reads/submit_writes + Queue.reap (numpy arrays, no
            Python object per request). The fast path.
  queue     Queue.read/write(user_data=...) + Queue.wait/poll -> Completion.
  blocking  Device.readinto/Device.write, one request at a time per thread
            (--iodepth must be 1; threads share the device).
  asyncio   blkio.aio: --iodepth coroutines awaiting readinto/write on one
            event loop per thread.

--poll busy-polls like blkio-bench --poll (reap/poll with min=0 in a loop on
the ordinary queues); with --poll-queues it uses poll queues instead
(num_poll_queues=N, Device.poll_queue(i)). --buffers=numpy uses plain numpy
memory (not mapped into the device: bounced where the driver needs it)
instead of Device.alloc(). Latency figures are measured on one request (or
one batch) in --lat-sample (default 64), so timing costs nothing measurable;
mean_lat_us is iodepth * runtime / count (Little's law, exact for this closed
loop). A progress line goes to stderr only when stderr is a terminal.

This module uses only blkio's public API and numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from typing import List, Optional

import numpy as np

GiB = 1 << 30
_TABLE_LEN = 1 << 16          # random offsets precomputed per thread
_BOOL_WORDS = {"true": True, "on": True, "yes": True,
               "false": False, "off": False, "no": False}
_BOOL_PROPS = {"direct", "read_only"}


class BenchError(Exception):
    """A clear, user-facing failure (printed without a traceback)."""


# --------------------------------------------------------------------------
# command line


DESCRIPTION = ("Measure performance statistics for a given I/O workload "
               "through blkio's Python APIs (the options and the JSON output "
               "of libblkio's blkio-bench).")
EPILOG = ("Results are printed as JSON: aggregate and per-thread kiops, gips "
          "(GiB/s), min/mean/max latency in microseconds, and completions "
          "per call.")


def _positive(s: str) -> int:
    try:
        v = int(s, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {s!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of blkio-bench, plus --api, --buffers, --poll-queues."""
    p.add_argument("--num-threads", type=_positive, default=1,
                   help="threads, one queue each (default: 1)")
    p.add_argument("--iodepth", type=_positive, default=1,
                   help="requests in flight per thread (default: 1)")
    p.add_argument("--readwrite", default="read",
                   choices=("read", "write", "randread", "randwrite"),
                   help="access pattern (default: read)")
    p.add_argument("--blocksize", type=_positive, default=4096,
                   help="bytes per request (default: 4096)")
    p.add_argument("--runtime", type=float, default=30.0,
                   help="seconds (fractions allowed; default: 30)")
    p.add_argument("--poll", action="store_true",
                   help="busy-poll for completions instead of waiting")
    p.add_argument("--poll-queues", action="store_true",
                   help="poll on poll queues (num_poll_queues); implies --poll")
    p.add_argument("--api", default="batch",
                   choices=("batch", "queue", "blocking", "asyncio"),
                   help="which blkio API issues the requests (default: batch)")
    p.add_argument("--buffers", default="alloc", choices=("alloc", "numpy"),
                   help="alloc: Device.alloc() (mapped, zero copy; default); "
                   "numpy: plain numpy arrays (bounced where the driver "
                   "needs it; the batch API refuses them there)")
    p.add_argument("--lat-sample", type=_positive, default=64,
                   help="time one request (or batch) in N (default: 64)")
    p.add_argument("driver", help="libblkio driver, e.g. io_uring")
    p.add_argument("properties", nargs="*", metavar="property=value",
                   help="driver properties, e.g. path=/tmp/disk.img direct=1")


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.runtime <= 0:
        p.error("--runtime must be positive")
    if args.api == "blocking" and args.iodepth != 1:
        p.error("--api=blocking runs one request at a time per thread: "
                "use --iodepth=1 (and --num-threads for parallelism)")
    if args.poll_queues:
        args.poll = True


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m blkio bench",
                                description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the subparsers of ``python -m blkio``; the
    parsed namespace's ``func(args)`` runs it and returns the exit status."""
    p = subparsers.add_parser("bench", help="benchmark a device (the options "
                              "and JSON of libblkio's blkio-bench)",
                              description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    p.set_defaults(func=lambda args: _cmd(p, args))
    return p


def _cmd(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    _check_args(p, args)
    return _run_and_print(args)


def parse_properties(items: list[str]) -> dict:
    """``["path=/x", "direct=1", "num-entries=256"]`` -> open() keywords."""
    props: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BenchError(f"{item}: missing property value "
                             "(expected property=value)")
        key = name.replace("-", "_")
        low = value.lower()
        conv: object
        if low in _BOOL_WORDS:
            conv = _BOOL_WORDS[low]
        elif key in _BOOL_PROPS and value in ("0", "1"):
            conv = value == "1"
        else:
            try:
                conv = int(value, 0)
            except ValueError:
                conv = value
        props[key] = conv
    return props


# --------------------------------------------------------------------------
# statistics (the shape of blkio-bench's JSON)


class Stats:
    __slots__ = ("count", "runtime", "min_lat_ns", "max_lat_ns", "calls",
                 "min_comp", "max_comp", "iodepth", "progress")

    def __init__(self, iodepth: int):
        self.count = 0
        self.runtime = 0.0
        self.min_lat_ns: Optional[int] = None
        self.max_lat_ns = 0
        self.calls = 0
        self.min_comp: Optional[int] = None
        self.max_comp = 0
        self.iodepth = iodepth
        self.progress = 0          # count so far, for the progress line

    def lat(self, ns: int) -> None:
        if self.min_lat_ns is None or ns < self.min_lat_ns:
            self.min_lat_ns = ns
        if ns > self.max_lat_ns:
            self.max_lat_ns = ns

    def comp(self, n: int) -> None:
        if self.min_comp is None or n < self.min_comp:
            self.min_comp = n
        if n > self.max_comp:
            self.max_comp = n


def _stats_dict(count: int, runtime: float, min_ns, mean_us: float,
                max_ns: int, calls: int, min_comp, max_comp,
                blocksize: int) -> dict:
    runtime = runtime if runtime > 0 else 1e-9
    return {
        "kiops": round(count / runtime / 1000.0, 3),
        "gips": round(count * blocksize / runtime / GiB, 3),
        "min_lat_us": round((min_ns or 0) / 1000.0, 3),
        "mean_lat_us": round(mean_us, 3),
        "max_lat_us": round(max_ns / 1000.0, 3),
        "calls": int(calls),
        "min_completions": round(float(min_comp or 0), 2),
        "mean_completions": round(count / calls if calls else 0.0, 2),
        "max_completions": round(float(max_comp), 2),
    }


def results_json(stats: list[Stats], blocksize: int) -> dict:
    threads = []
    for s in stats:
        mean_us = (s.iodepth * s.runtime / s.count * 1e6) if s.count else 0.0
        threads.append(_stats_dict(s.count, s.runtime, s.min_lat_ns, mean_us,
                                   s.max_lat_ns, s.calls, s.min_comp,
                                   s.max_comp, blocksize))
    count = sum(s.count for s in stats)
    runtime = sum(s.runtime for s in stats) / len(stats)
    mins: List[int] = [s.min_lat_ns for s in stats if s.min_lat_ns is not None]
    mincomp: List[int] = [s.min_comp for s in stats if s.min_comp is not None]
    # blkio-bench's aggregate mean latency: total latency / total count
    tot_lat_us = sum(t["mean_lat_us"] * s.count for t, s in zip(threads, stats))
    agg = _stats_dict(count, runtime, min(mins) if mins else None,
                      tot_lat_us / count if count else 0.0,
                      max(s.max_lat_ns for s in stats),
                      sum(s.calls for s in stats),
                      min(mincomp) if mincomp else None,
                      max(s.max_comp for s in stats), blocksize)
    return {"aggregate": agg, "threads": threads}


# --------------------------------------------------------------------------
# workloads


class Workload:
    def __init__(self, args: argparse.Namespace, capacity: int):
        self.bs = args.blocksize
        self.depth = args.iodepth
        self.is_read = args.readwrite in ("read", "randread")
        self.is_rand = args.readwrite.startswith("rand")
        self.capacity = capacity
        self.nthreads = args.num_threads
        self.poll = args.poll
        self.lat_sample = args.lat_sample
        self.runtime = args.runtime
        if capacity < self.bs:
            raise BenchError(f"device capacity {capacity} is smaller than "
                             f"one block ({self.bs})")

    def offsets(self, thread: int) -> np.ndarray:
        """A table of offsets (uint64) for one thread, cycled through."""
        nblocks = self.capacity // self.bs
        if self.is_rand:
            rng = np.random.default_rng((os.getpid() << 8) + thread)
            blocks = rng.integers(0, nblocks, size=_TABLE_LEN,
                                  dtype=np.uint64)
        else:
            first = (self.capacity // self.nthreads * thread) // self.bs
            n = min(nblocks, 1 << 20)
            blocks = (np.arange(n, dtype=np.uint64) + first) % nblocks
        return np.ascontiguousarray(blocks * np.uint64(self.bs))


def _require(obj, name: str, api: str):
    fn = getattr(obj, name, None)
    if fn is None:
        raise BenchError(f"API {api} not available in this build "
                         f"({type(obj).__name__}.{name} is missing)")
    return fn


class _Clock:
    """Deadline checks spaced so that they cost nothing measurable."""

    __slots__ = ("deadline", "start")

    def __init__(self, runtime: float):
        self.start = time.perf_counter()
        self.deadline = self.start + runtime


def _buffers(dev, wl: Workload, kind: str, nbufs: int) -> np.ndarray:
    nbytes = nbufs * wl.bs
    if kind == "alloc":
        alloc = _require(dev, "alloc", "alloc")
        flat = alloc(nbytes)
    else:
        flat = np.zeros(nbytes, dtype=np.uint8)
    if not wl.is_read:
        flat[:] = 0xA5
    return flat.reshape(nbufs, wl.bs)


def run_blocking(dev, wl: Workload, thread: int, st: Stats, bufkind: str,
                 ready: threading.Barrier | None) -> None:
    op = _require(dev, "readinto" if wl.is_read else "write", "blocking")
    buf = _buffers(dev, wl, bufkind, 1)[0]
    offs = wl.offsets(thread).tolist()
    L = len(offs)
    i = 0
    K = wl.lat_sample - 1
    pc = time.perf_counter_ns
    if ready is not None:
        ready.wait()
    clock = _Clock(wl.runtime)
    count = 0
    while True:
        for _ in range(K):
            op(offs[i], buf)
            i += 1
            if i == L:
                i = 0
        t0 = pc()
        op(offs[i], buf)
        st.lat(pc() - t0)
        i += 1
        if i == L:
            i = 0
        count += K + 1
        st.progress = count
        if time.perf_counter() >= clock.deadline:
            break
    st.runtime = time.perf_counter() - clock.start
    st.count = count
    st.calls = count
    st.min_comp = st.max_comp = 1


def _get_queue(dev, wl: Workload, thread: int, poll_queues: bool):
    if poll_queues:
        return _require(dev, "poll_queue", "poll queues")(thread)
    return _require(dev, "queue", "queue")(thread)


def run_queue(dev, wl: Workload, thread: int, st: Stats, bufkind: str,
              poll_queues: bool, ready: threading.Barrier | None) -> None:
    q = _get_queue(dev, wl, thread, poll_queues)
    op = _require(q, "read" if wl.is_read else "write", "queue")
    _require(q, "submit", "queue")
    wait = _require(q, "wait", "queue")
    poll = _require(q, "poll", "queue") if wl.poll else None
    D = wl.depth
    bufs = _buffers(dev, wl, bufkind, D)
    rows = [bufs[j] for j in range(D)]
    offs = wl.offsets(thread).tolist()
    L = len(offs)
    i = 0
    pc = time.perf_counter_ns
    sample_every = wl.lat_sample
    t_sub = [0] * D
    sampled = -1            # slot whose latency is being timed, or -1
    if ready is not None:
        ready.wait()
    clock = _Clock(wl.runtime)
    deadline = clock.deadline
    now = time.perf_counter
    for j in range(D):
        op(offs[i], rows[j], user_data=j)
        i += 1
        if i == L:
            i = 0
    # no submit() here: wait()/poll() submit what is queued
    count = calls = 0
    while True:
        if poll is None:
            comps = wait(1)
        else:
            comps = poll()
        calls += 1
        n = len(comps)
        if n == 0:
            if now() >= deadline:
                break
            continue
        st.comp(n)
        for c in comps:
            if c.ret:
                c.check()
            j = c.user_data
            if j == sampled:
                st.lat(pc() - t_sub[j])
                sampled = -1
            op(offs[i], rows[j], user_data=j)
            i += 1
            if i == L:
                i = 0
        count += n
        if calls % sample_every == 0:
            st.progress = count
            if sampled < 0:
                sampled = j
                t_sub[j] = pc()
            if now() >= deadline:
                break
    st.runtime = now() - clock.start
    # drain what is in flight so close() has nothing to wait for
    _drain_queue(q, wait, D)
    st.count = count
    st.calls = calls


def _drain_queue(q, wait, depth: int) -> None:
    left = depth
    t_end = time.perf_counter() + 10.0
    while left > 0 and time.perf_counter() < t_end:
        left -= len(wait(1, timeout=1.0))


def _batch_dtype():
    return np.dtype([("user_data", np.int64), ("ret", np.int32)])


def run_batch(dev, wl: Workload, thread: int, st: Stats, bufkind: str,
              poll_queues: bool, ready: threading.Barrier | None) -> None:
    q = _get_queue(dev, wl, thread, poll_queues)
    submit = _require(q, "submit_reads" if wl.is_read else "submit_writes",
                      "batch")
    reap = _require(q, "reap", "batch")
    D = wl.depth
    bufs = _buffers(dev, wl, bufkind, D)
    table = wl.offsets(thread)
    L = len(table) - (len(table) % D) if len(table) >= D else len(table)
    if L < D:                      # tiny device: repeat the table
        table = np.resize(table, D)
        L = D
    tags = np.arange(D, dtype=np.int64)
    out = np.zeros(D, dtype=_batch_dtype())
    ud = out["user_data"]
    rets = out["ret"]
    t_sub = np.zeros(D, dtype=np.int64)
    pc = time.perf_counter_ns
    sample_every = wl.lat_sample
    sampled = -1
    min_reap = 0 if wl.poll else 1
    if ready is not None:
        ready.wait()
    clock = _Clock(wl.runtime)
    deadline = clock.deadline
    now = time.perf_counter
    submit(table[0:D], bufs, user_data=tags)
    pos = D
    if pos >= L:
        pos = 0
    inflight = D
    count = calls = 0
    while True:
        n = reap(out, min=min_reap)
        calls += 1
        if n == 0:
            if now() >= deadline:
                break
            continue
        st.comp(n)
        if rets[:n].any():
            bad = int(np.flatnonzero(rets[:n])[0])
            err = -int(rets[bad])
            raise OSError(err, f"I/O request failed: {os.strerror(err)}")
        count += n
        if sampled >= 0:
            hit = np.flatnonzero(ud[:n] == sampled)
            if hit.size:
                st.lat(pc() - int(t_sub[sampled]))
                sampled = -1
        # Resubmit one request per freed slot, each into its own buffer.
        if n == inflight:
            # everything came back (the usual case on a page-cached file)
            if pos + D > L:
                pos = 0
            submit(table[pos:pos + D], bufs, user_data=tags)
            pos += D
            first_slot = 0
        else:
            done = np.sort(ud[:n])
            breaks = np.flatnonzero(np.diff(done) != 1) + 1
            start = 0
            for end in (*breaks.tolist(), n):
                a = int(done[start])
                k = end - start
                if pos + k > L:
                    pos = 0
                submit(table[pos:pos + k], bufs[a:a + k],
                       user_data=tags[a:a + k])
                pos += k
                start = end
            first_slot = int(done[0])
        if calls % sample_every == 0:
            st.progress = count
            if sampled < 0:
                sampled = first_slot
                t_sub[sampled] = pc()
            if now() >= deadline:
                break
    st.runtime = now() - clock.start
    # drain
    t_end = now() + 10.0
    while inflight > 0 and now() < t_end:
        inflight -= reap(out, min=1, timeout=1.0)
    st.count = count
    st.calls = calls


def _aio_capacity(adev) -> int:
    for obj in (adev, getattr(adev, "device", None), getattr(adev, "dev", None)):
        cap = getattr(obj, "capacity", None) if obj is not None else None
        if cap is not None:
            return int(cap)
    raise BenchError("API asyncio not available in this build "
                     "(the asyncio device has no capacity)")


async def _aio_thread(args, props, thread: int, st: Stats, ready) -> None:
    import asyncio
    try:
        import blkio.aio as baio
    except ImportError as e:
        raise BenchError(f"API asyncio not available in this build ({e})")
    open_ = _require(baio, "open", "asyncio")
    async with open_(args.driver, **props) as adev:
        wl = Workload(args, _aio_capacity(adev))
        D = wl.depth
        op = _require(adev, "readinto" if wl.is_read else "write", "asyncio")
        if args.buffers == "alloc" and hasattr(adev, "alloc"):
            flat = adev.alloc(D * wl.bs)
        else:
            flat = np.zeros(D * wl.bs, dtype=np.uint8)
        if not wl.is_read:
            flat[:] = 0xA5
        bufs = flat.reshape(D, wl.bs)
        table = wl.offsets(thread).tolist()
        L = len(table)
        stop = [False]
        counts = [0] * D
        pc = time.perf_counter_ns
        K = wl.lat_sample

        async def worker(j: int) -> None:
            buf = bufs[j]
            i = (j * L) // D
            c = 0
            while not stop[0]:
                if c % K == 0:
                    t0 = pc()
                    await op(table[i], buf)
                    st.lat(pc() - t0)
                else:
                    await op(table[i], buf)
                c += 1
                i += 1
                if i == L:
                    i = 0
                if c & 255 == 0:
                    counts[j] = c
                    st.progress = sum(counts)
            counts[j] = c

        if ready is not None:
            await asyncio.get_running_loop().run_in_executor(None, ready.wait)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        loop.call_later(wl.runtime, stop.__setitem__, 0, True)
        await asyncio.gather(*(worker(j) for j in range(D)))
        st.runtime = time.perf_counter() - t0
        st.count = sum(counts)
        st.calls = st.count
        st.min_comp = st.max_comp = 1


# --------------------------------------------------------------------------
# driver


def _progress(stats: list[Stats], t_start: float, stop: threading.Event,
              enabled: bool) -> None:
    last_n, last_t = 0, t_start
    while not stop.wait(0.5):
        if not enabled:
            continue
        t = time.perf_counter()
        n = sum(s.progress for s in stats)
        rate = (n - last_n) / (t - last_t) if t > last_t else 0.0
        sys.stderr.write(f"\r{t - t_start:6.1f} s  {n:>12,d} requests  "
                         f"{rate / 1000:10.1f} kIOPS ")
        sys.stderr.flush()
        last_n, last_t = n, t
    if enabled:
        sys.stderr.write("\r" + " " * 60 + "\r")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> dict:
    try:
        import blkio
    except ImportError as e:
        raise BenchError(f"cannot import blkio: {e}")
    props = parse_properties(args.properties)
    open_kw = dict(props)
    if args.readwrite in ("read", "randread"):
        open_kw.setdefault("read_only", True)
    if args.api in ("batch", "queue"):
        if args.poll_queues:
            open_kw["num_poll_queues"] = args.num_threads
            open_kw.setdefault("num_queues", 1)
        else:
            open_kw["num_queues"] = args.num_threads

    stats = [Stats(args.iodepth) for _ in range(args.num_threads)]
    errors: list[BaseException] = []
    ready = (threading.Barrier(args.num_threads)
             if args.num_threads > 1 else None)
    tty = sys.stderr.isatty()
    stop_progress = threading.Event()

    def guarded(fn, *a) -> None:
        try:
            fn(*a)
        except BaseException as e:   # re-raised in the main thread
            errors.append(e)
            if ready is not None:
                ready.abort()

    prog = threading.Thread(target=_progress, daemon=True,
                            args=(stats, time.perf_counter(), stop_progress,
                                  tty))
    if args.api == "asyncio":
        import asyncio

        def aio_main(t: int) -> None:
            asyncio.run(_aio_thread(args, open_kw, t, stats[t], ready))

        targets: List[tuple] = [(aio_main, t) for t in range(args.num_threads)]
        dev = None
    else:
        open_ = _require(blkio, "open", "open")
        try:
            dev = open_(args.driver, **open_kw)
        except (ValueError, TypeError) as e:
            raise BenchError(str(e))
        wl = Workload(args, int(dev.capacity))
        if args.api == "blocking":
            if args.poll:
                # Busy-poll each wait until the completion arrives, as C
                # blkio-bench --poll does (bounded to 1 ms per wait).
                dev.poll_us = 1000
            targets = [(run_blocking, dev, wl, t, stats[t], args.buffers,
                        ready) for t in range(args.num_threads)]
        elif args.api == "queue":
            targets = [(run_queue, dev, wl, t, stats[t], args.buffers,
                        args.poll_queues, ready)
                       for t in range(args.num_threads)]
        else:
            targets = [(run_batch, dev, wl, t, stats[t], args.buffers,
                        args.poll_queues, ready)
                       for t in range(args.num_threads)]
    try:
        prog.start()
        if len(targets) == 1:
            guarded(*targets[0])
        else:
            ths = [threading.Thread(target=guarded, args=tg) for tg in targets]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
    finally:
        stop_progress.set()
        prog.join()
        if dev is not None:
            dev.close()
    for err in errors:
        if not isinstance(err, threading.BrokenBarrierError):
            raise err
    if errors:
        raise errors[0]
    return results_json(stats, args.blocksize)


def _run_and_print(args: argparse.Namespace) -> int:
    try:
        res = run(args)
    except BenchError as e:
        print(f"blkio bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("blkio bench: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError) as e:
        print(f"blkio bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(res, indent=2))
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m blkio bench ARGS``: returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    return _run_and_print(_parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
