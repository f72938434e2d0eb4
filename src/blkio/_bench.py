"""``python -m blkio bench``: libblkio's blkio-bench, through blkio's Python APIs.

Same options and same JSON output as the C example program ``blkio-bench``
(libblkio-dev's examples), so one can be swapped for the other::

    python -m blkio bench [--num-threads=N] [--iodepth=N]
        [--readwrite=read|write|randread|randwrite] [--blocksize=BYTES]
        [--runtime=SECONDS] [--poll]
        [--api=batch|queue|blocking|asyncio|asyncio-batch]
        [--buffers=alloc|numpy] [--poll-queues] [--lat-sample=N]
        [--loop=asyncio|uvloop] [--requests=N] [--flush]
        [--chunk=BYTES] [--chunk-depth=N]
        <driver> <property>=<value> ...

Properties are given as libblkio spells them (``path=/tmp/x direct=1
num-entries=256``) and passed to ``blkio.open`` as keywords (``-`` becomes
``_``; integers become ``int``, ``true/false/on/off/yes/no`` become ``bool``).

APIs:
  batch          Queue.submit_reads/submit_writes + Queue.reap (numpy arrays,
                 no Python object per request). The fast path.
  queue          Queue.read/write(user_data=...) + Queue.wait/poll -> Completion.
  blocking       Device.readinto/Device.write, one request at a time per thread
                 (--iodepth must be 1; threads share the device). With a large
                 --blocksize (say 1 GiB) each request is one big call that the
                 library cuts into chunks itself; --chunk/--chunk-depth pass its
                 knobs, --flush adds a Device.flush() inside the timed run.
  asyncio        blkio.aio: --iodepth coroutines awaiting readinto/write on one
                 event loop per thread (--loop=uvloop: on uvloop's loop).
  asyncio-batch  blkio.aio: one coroutine awaiting read_batch/write_batch of
                 --iodepth requests at a time (one future per batch).

--poll busy-polls like blkio-bench --poll (reap/poll with min=0 in a loop on
the ordinary queues); with --poll-queues it uses poll queues instead
(num_poll_queues=N, Device.poll_queue(i)). --buffers=numpy uses plain numpy
memory (not mapped into the device: bounced where the driver needs it)
instead of Device.alloc(); either kind is touched once before the clock
starts. Latency figures are measured on one request (or one batch) in
--lat-sample (default 64), so timing costs nothing measurable; mean_lat_us
is iodepth * runtime / count (Little's law, exact for this closed loop).
A progress line goes to stderr only when stderr is a terminal.

The statistics, the offset tables and the timed loops here are also what
bench/contenders.py (the Python peers in the benchmark suite) runs, so every
Python contender is timed by the same code. This module uses only blkio's
public API, numpy and (for --loop=uvloop) uvloop.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import threading
import time

from typing import Any, Callable, List, Optional, Sequence

from ._cliprops import PropertyError, parse_properties

import numpy as np

GiB = 1 << 30
_TABLE_LEN = 1 << 16          # random offsets precomputed per thread
_CHECK_BYTES = 4 << 20        # blocking loops look at the clock every 4 MiB


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
APIS = ("batch", "queue", "blocking", "asyncio", "asyncio-batch")


def _positive(s: str) -> int:
    try:
        v = int(s, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {s!r}")
    return v


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """The workload options of blkio-bench (shared with bench/contenders.py),
    plus --lat-sample, --loop and --requests."""
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
    p.add_argument("--requests", type=_positive, default=None,
                   help="stop each thread after N requests, or at --runtime, "
                   "whichever comes first; with --iodepth > 1, at the reap "
                   "that reaches N (at most one batch more; default: no limit)")
    p.add_argument("--lat-sample", type=_positive, default=64,
                   help="time one request (or batch) in N (default: 64)")
    p.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"),
                   help="event loop for the asyncio contenders "
                   "(default: asyncio's own)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of blkio-bench, plus blkio's own (--api, --buffers, ...)."""
    add_workload_arguments(p)
    p.add_argument("--poll", action="store_true",
                   help="busy-poll for completions instead of waiting")
    p.add_argument("--poll-queues", action="store_true",
                   help="poll on poll queues (num_poll_queues); implies --poll")
    p.add_argument("--api", default="batch", choices=APIS,
                   help="which blkio API issues the requests (default: batch)")
    p.add_argument("--buffers", default="alloc", choices=("alloc", "numpy"),
                   help="alloc: Device.alloc() (mapped, zero copy; default); "
                   "numpy: plain numpy arrays (bounced where the driver "
                   "needs it; the batch API refuses them there)")
    p.add_argument("--flush", action="store_true",
                   help="--api=blocking: each thread ends with Device.flush(), "
                   "inside the timed run")
    p.add_argument("--chunk", type=_positive, default=None,
                   help="--api=blocking: pass chunk=BYTES to readinto/write "
                   "(the pipelining knob for big requests)")
    p.add_argument("--chunk-depth", type=_positive, default=None,
                   help="--api=blocking: pass depth=N to readinto/write "
                   "(chunks in flight for big requests)")
    p.add_argument("driver", help="libblkio driver, e.g. io_uring")
    p.add_argument("properties", nargs="*", metavar="property=value",
                   help="driver properties, e.g. path=/tmp/disk.img direct=1")


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.runtime <= 0:
        p.error("--runtime must be positive")
    if args.api == "blocking" and args.iodepth != 1:
        p.error("--api=blocking runs one request at a time per thread: "
                "use --iodepth=1 (and --num-threads for parallelism)")
    if args.api != "blocking" and (args.flush or args.chunk or
                                   args.chunk_depth):
        p.error("--flush, --chunk and --chunk-depth go with --api=blocking")
    if args.poll_queues:
        args.poll = True


def _parse_args(argv: list[str], prog: str = "python -m blkio bench") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


# --------------------------------------------------------------------------
# statistics (the shape of blkio-bench's JSON)


class Stats:
    """One thread's figures; ``progress`` is the count so far (for the
    progress line)."""

    __slots__ = ("count", "runtime", "min_lat_ns", "max_lat_ns", "calls",
                 "min_comp", "max_comp", "iodepth", "progress", "cpu")

    def __init__(self, iodepth: int):
        self.count = 0
        self.runtime = 0.0
        self.min_lat_ns: Optional[int] = None
        self.max_lat_ns = 0
        self.calls = 0
        self.min_comp: Optional[int] = None
        self.max_comp = 0
        self.iodepth = iodepth
        self.progress = 0
        self.cpu = 0.0       # the thread's CPU seconds (user + system) in the run

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


def results_json(stats: Sequence[Stats], blocksize: int) -> dict:
    """blkio-bench's JSON: ``aggregate`` and ``threads``."""
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
    # Not in blkio-bench's output (so a key of its own): the CPU time the
    # measuring threads used in their timed runs, which shows whether the
    # client was the busy side or waited (bench/run.py measures C's from
    # outside the process).
    cpu = sum(s.cpu for s in stats)
    return {"aggregate": agg, "threads": threads,
            "cpu": {"seconds": round(cpu, 4),
                    "us_per_request": round(cpu / count * 1e6, 3) if count else 0.0}}


# --------------------------------------------------------------------------
# workloads and the timed loops (shared with bench/contenders.py)


class Workload:
    """What to run, from the parsed options and the device's capacity."""

    def __init__(self, args: argparse.Namespace, capacity: int):
        self.bs = args.blocksize
        self.depth = args.iodepth
        self.is_read = args.readwrite in ("read", "randread")
        self.is_rand = args.readwrite.startswith("rand")
        self.capacity = capacity
        self.nthreads = args.num_threads
        self.poll = getattr(args, "poll", False)
        self.lat_sample = args.lat_sample
        self.runtime = args.runtime
        self.requests = args.requests or 0      # 0: no limit
        # requests between two looks at the clock in the one-at-a-time
        # loops: --lat-sample for small blocks, fewer for big ones
        self.check_every = max(1, min(self.lat_sample, _CHECK_BYTES // self.bs))
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


def touch(flat: np.ndarray, is_read: bool) -> np.ndarray:
    """Fill a buffer (0xA5 to write, zeroes to read into) so that its pages
    are faulted in before the clock starts, for every contender alike."""
    flat[:] = 0 if is_read else 0xA5
    return flat


def closed_loop(run_n: Callable[[int], Any], st: Stats, wl: Workload,
                ready: Optional[threading.Barrier],
                finish: Optional[Callable[[], Any]] = None) -> None:
    """One request at a time: ``run_n(k)`` issues the next ``k`` requests.
    Runs until ``wl.runtime`` (or ``wl.requests``), timing one request in
    each ``wl.check_every``; ``finish()`` (e.g. a flush) is inside the timed
    run."""
    step = wl.check_every
    limit = wl.requests
    pc = time.perf_counter_ns
    now = time.perf_counter
    if ready is not None:
        ready.wait()
    cpu0 = time.thread_time()
    start = now()
    deadline = start + wl.runtime
    count = 0
    while True:
        k = min(step, limit - count) if limit else step
        if k > 1:
            run_n(k - 1)
        t0 = pc()
        run_n(1)
        st.lat(pc() - t0)
        count += k
        st.progress = count
        if count == limit or now() >= deadline:
            break
    if finish is not None:
        finish()
    st.runtime = now() - start
    st.cpu = time.thread_time() - cpu0
    st.count = st.calls = count
    st.min_comp = st.max_comp = 1


class InflightClock:
    """Pacing for loops that keep several requests in flight: ``tick`` once
    per call (every ``wl.lat_sample`` calls it records progress, starts
    timing one request -- ``slot`` -- when none is being timed, and says
    whether ``wl.runtime`` is over); ``done()`` when the timed request
    comes back."""

    __slots__ = ("st", "every", "limit", "slot", "t_sub", "start", "deadline",
                 "cpu0")

    def __init__(self, st: Stats, wl: Workload):
        self.st = st
        self.every = wl.lat_sample
        self.limit = wl.requests or sys.maxsize    # --requests, else none
        self.slot = -1                 # the request being timed, or -1
        self.t_sub = 0
        self.cpu0 = time.thread_time()
        self.start = time.perf_counter()
        self.deadline = self.start + wl.runtime

    def done(self) -> None:
        self.st.lat(time.perf_counter_ns() - self.t_sub)
        self.slot = -1

    def tick(self, calls: int, count: int, slot: int) -> bool:
        if calls % self.every and count < self.limit:
            return False
        self.st.progress = count
        if count >= self.limit:
            return True
        if self.slot < 0:
            self.slot = slot
            self.t_sub = time.perf_counter_ns()
        return time.perf_counter() >= self.deadline

    def over(self) -> bool:
        return time.perf_counter() >= self.deadline

    def finish(self, count: int, calls: int) -> None:
        self.st.runtime = time.perf_counter() - self.start
        self.st.cpu = time.thread_time() - self.cpu0
        self.st.count = count
        self.st.calls = calls


def offset_stream(offsets: Sequence[int], start: int = 0):
    """The offsets from index ``start`` on, cycled forever."""
    offs = list(offsets)
    return itertools.cycle(offs[start:] + offs[:start])


class OffsetRuns:
    """The offsets cycled forever, handed out as lists of ``k``: a closed
    loop then iterates a plain list, as a user's ``for off in offsets:``
    does.  (Pulling each offset through islice over a cycle cost about 120
    instructions per request, 2026-12-04 callgrind, a sixth of the binding's
    own cost; C computes its offsets in a few.)"""

    __slots__ = ("offs", "pos")

    def __init__(self, offsets: Sequence[int]):
        self.offs = list(offsets)
        self.pos = 0

    def take(self, k: int) -> List[int]:
        offs, pos = self.offs, self.pos
        end = pos + k
        if end <= len(offs):
            self.pos = end
            return offs[pos:end]
        out = offs[pos:]
        while len(out) < k:         # wrap around (as often as k asks)
            out += offs[:k - len(out)]
        self.pos = (pos + k) % len(offs)
        return out


async def aio_workers(op: Callable[[int, Any], Any], bufs: Any,
                      table: Sequence[int], st: Stats, wl: Workload) -> None:
    """``len(bufs)`` coroutines (bufs: a sequence or a 2-D array, one row
    each) on the running loop, each awaiting
    ``op(offset, its buffer)`` one request after another until
    ``wl.runtime`` (or ``wl.requests`` in all); one request in
    ``wl.lat_sample`` is timed."""
    import asyncio
    depth = len(bufs)
    L = len(table)
    stop = [False]
    counts = [0] * depth
    pc = time.perf_counter_ns
    K = wl.lat_sample

    # --requests: the workers' quotas add up to it
    limit = wl.requests
    quotas = [limit // depth + (j < limit % depth) if limit else sys.maxsize
              for j in range(depth)]

    async def worker(j: int) -> None:
        buf = bufs[j]
        c = 0
        quota = quotas[j]
        for off in offset_stream(table, (j * L) // depth):
            if stop[0] or c >= quota:
                break
            if c % K == 0:
                t0 = pc()
                await op(off, buf)
                st.lat(pc() - t0)
            else:
                await op(off, buf)
            c += 1
            if c & 255 == 0:
                counts[j] = c
                st.progress = sum(counts)
        counts[j] = c

    loop = asyncio.get_running_loop()
    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    loop.call_later(wl.runtime, stop.__setitem__, 0, True)
    await asyncio.gather(*(worker(j) for j in range(depth)))
    st.runtime = time.perf_counter() - t0
    st.cpu = time.thread_time() - cpu0
    st.count = st.calls = sum(counts)
    st.min_comp = st.max_comp = 1


def run_event_loop(main, loop_kind: str):
    """``asyncio.run(main)``, or on uvloop's loop."""
    import asyncio
    if loop_kind == "uvloop":
        try:
            import uvloop
        except ImportError as e:
            raise BenchError(f"--loop=uvloop: uvloop is not installed ({e})")
        if hasattr(uvloop, "run"):
            return uvloop.run(main)
        loop = uvloop.new_event_loop()
        try:
            return loop.run_until_complete(main)
        finally:
            loop.close()
    return asyncio.run(main)


def run_threads(targets: Sequence[tuple], ready: Optional[threading.Barrier]
                ) -> None:
    """Run each ``(fn, *args)`` in a thread of its own (in this thread when
    there is one) and re-raise the first real error."""
    errors: list[BaseException] = []

    def guarded(fn, *a) -> None:
        try:
            fn(*a)
        except BaseException as e:   # re-raised in the main thread
            errors.append(e)
            if ready is not None:
                ready.abort()

    if len(targets) == 1:
        guarded(*targets[0])
    else:
        ths = [threading.Thread(target=guarded, args=tg) for tg in targets]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    for err in errors:
        if not isinstance(err, threading.BrokenBarrierError):
            raise err
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------
# blkio's APIs


def _require(obj, name: str, api: str):
    fn = getattr(obj, name, None)
    if fn is None:
        raise BenchError(f"API {api} not available in this build "
                         f"({type(obj).__name__}.{name} is missing)")
    return fn


def _buffers(dev, wl: Workload, kind: str, nbufs: int) -> np.ndarray:
    nbytes = nbufs * wl.bs
    if kind == "alloc":
        flat = _require(dev, "alloc", "alloc")(nbytes)
    else:
        flat = np.zeros(nbytes, dtype=np.uint8)
    return touch(flat, wl.is_read).reshape(nbufs, wl.bs)


def run_blocking(dev, wl: Workload, thread: int, st: Stats, args,
                 ready: threading.Barrier | None) -> None:
    op = _require(dev, "readinto" if wl.is_read else "write", "blocking")
    knobs = {k: v for k, v in (("chunk", args.chunk),
                               ("depth", args.chunk_depth)) if v}
    if knobs:       # a library without them raises TypeError on first use
        op = functools.partial(op, **knobs)
    buf = _buffers(dev, wl, args.buffers, 1)[0]
    take = OffsetRuns(wl.offsets(thread).tolist()).take

    def run_n(k: int) -> None:
        for off in take(k):
            op(off, buf)

    closed_loop(run_n, st, wl, ready,
                _require(dev, "flush", "flush") if args.flush else None)


def _get_queue(dev, wl: Workload, thread: int, poll_queues: bool):
    if poll_queues:
        return _require(dev, "poll_queue", "poll queues")(thread)
    return _require(dev, "queue", "queue")(thread)


def run_queue(dev, wl: Workload, thread: int, st: Stats, args,
              ready: threading.Barrier | None) -> None:
    q = _get_queue(dev, wl, thread, args.poll_queues)
    op = _require(q, "read" if wl.is_read else "write", "queue")
    _require(q, "submit", "queue")
    wait = _require(q, "wait", "queue")
    poll = _require(q, "poll", "queue") if wl.poll else None
    D = wl.depth
    bufs = _buffers(dev, wl, args.buffers, D)
    rows = [bufs[j] for j in range(D)]
    offs = offset_stream(wl.offsets(thread).tolist())
    nxt = offs.__next__
    if ready is not None:
        ready.wait()
    clock = InflightClock(st, wl)
    for j in range(D):
        op(nxt(), rows[j], user_data=j)
    # no submit() here: wait()/poll() submit what is queued
    count = calls = 0
    while True:
        comps = wait(1) if poll is None else poll()
        calls += 1
        n = len(comps)
        if n == 0:
            if clock.over():
                break
            continue
        st.comp(n)
        for c in comps:
            if c.ret:
                c.check()
            j = c.user_data
            if j == clock.slot:
                clock.done()
            op(nxt(), rows[j], user_data=j)
        count += n
        if clock.tick(calls, count, j):
            break
    clock.finish(count, calls)
    # drain what is in flight so close() has nothing to wait for
    left = D
    t_end = time.perf_counter() + 10.0
    while left > 0 and time.perf_counter() < t_end:
        left -= len(wait(1, timeout=1.0))


def _batch_dtype():
    return np.dtype([("user_data", np.int64), ("ret", np.int32)])


def run_batch(dev, wl: Workload, thread: int, st: Stats, args,
              ready: threading.Barrier | None) -> None:
    q = _get_queue(dev, wl, thread, args.poll_queues)
    submit = _require(q, "submit_reads" if wl.is_read else "submit_writes",
                      "batch")
    reap = _require(q, "reap", "batch")
    D = wl.depth
    bufs = _buffers(dev, wl, args.buffers, D)
    table = wl.offsets(thread)
    L = len(table) - (len(table) % D) if len(table) >= D else len(table)
    if L < D:                      # tiny device: repeat the table
        table = np.resize(table, D)
        L = D
    tags = np.arange(D, dtype=np.int64)
    region = bufs.reshape(-1)               # row j at byte j * bs
    bs = wl.bs
    back_tags = np.zeros(D, dtype=np.int64)     # the tags that came back
    back_rows = np.zeros(D, dtype=np.uint64)    # ... and their rows' offsets
    out = np.zeros(D, dtype=_batch_dtype())
    ud = out["user_data"]
    rets = out["ret"]
    min_reap = 0 if wl.poll else 1
    if ready is not None:
        ready.wait()
    # The loop holds the GIL between its GIL-free calls (submit, reap):
    # with two threads, every microsecond of it is one the other may wait
    # for, so the usual case (a whole batch back) is kept to a few
    # operations: the batch's offsets are views made once, and the
    # every-call bookkeeping (Stats.comp, InflightClock.tick) is inlined.
    views: dict = {}
    whole = False
    every = wl.lat_sample
    clock = InflightClock(st, wl)
    limit = clock.limit
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
            if clock.over():
                break
            continue
        if n != D:
            st.comp(n)
        else:
            whole = True
        if q.failed:
            # Queue.failed counts failed batch completions: one attribute
            # read per reap, instead of a numpy pass over ``rets``.
            bad = int(np.flatnonzero(rets[:n])[0])
            err = -int(rets[bad])
            raise OSError(err, f"I/O request failed: {os.strerror(err)}")
        count += n
        if clock.slot >= 0 and (ud[:n] == clock.slot).any():
            clock.done()
        # Resubmit one request per freed slot, each into its own buffer.
        if n == inflight:
            # everything came back (the usual case on a page-cached file)
            if pos + D > L:
                pos = 0
            batch = views.get(pos)
            if batch is None:
                batch = views[pos] = table[pos:pos + D]
            submit(batch, bufs, user_data=tags)
            pos += D
            first_slot = 0
        else:
            # Some came back (the usual case on vhost-user): one submit for
            # all of them, each into the row its tag names -- the batch API's
            # region form (buffers as byte offsets into one region), rather
            # than a submit per run of adjacent rows.
            if pos + n > L:
                pos = 0
            rtags = back_tags[:n]
            np.copyto(rtags, ud[:n])
            rows = back_rows[:n]
            np.multiply(rtags, bs, out=rows, casting="unsafe")
            submit(table[pos:pos + n], rows, region=region, blocksize=bs,
                   user_data=rtags)
            pos += n
            first_slot = int(rtags[0])
        if (calls % every == 0 or count >= limit) and \
                clock.tick(calls, count, first_slot):
            break
    if whole:
        st.comp(D)      # the whole batches above, counted once
    clock.finish(count, calls)
    # drain
    t_end = time.perf_counter() + 10.0
    while inflight > 0 and time.perf_counter() < t_end:
        inflight -= reap(out, min=1, timeout=1.0)


def _aio_capacity(adev) -> int:
    for obj in (adev, getattr(adev, "device", None), getattr(adev, "dev", None)):
        cap = getattr(obj, "capacity", None) if obj is not None else None
        if cap is not None:
            return int(cap)
    raise BenchError("API asyncio not available in this build "
                     "(the asyncio device has no capacity)")


def _aio_buffers(adev, wl: Workload, kind: str) -> np.ndarray:
    nbytes = wl.depth * wl.bs
    if kind == "alloc" and hasattr(adev, "alloc"):
        flat = adev.alloc(nbytes)
    else:
        flat = np.zeros(nbytes, dtype=np.uint8)
    return touch(flat, wl.is_read).reshape(wl.depth, wl.bs)


async def _aio_batches(submit_batch, table: np.ndarray, bufs: np.ndarray,
                       st: Stats, wl: Workload) -> None:
    """One coroutine awaiting batches of ``wl.depth`` requests."""
    D = wl.depth
    L = len(table) - (len(table) % D)
    if L < D:
        table = np.resize(table, D)
        L = D
    pc = time.perf_counter_ns
    now = time.perf_counter
    K = wl.lat_sample
    limit = wl.requests or sys.maxsize
    pos = count = calls = 0
    cpu0 = time.thread_time()
    start = now()
    deadline = start + wl.runtime
    while True:
        if calls % K == 0:
            t0 = pc()
            res = await submit_batch(table[pos:pos + D], bufs)
            st.lat(pc() - t0)
        else:
            res = await submit_batch(table[pos:pos + D], bufs)
        if isinstance(res, np.ndarray) and res.dtype.kind in "iu" and res.any():
            err = -int(res[np.flatnonzero(res)[0]])
            if err > 0:
                raise OSError(err, f"I/O request failed: {os.strerror(err)}")
        calls += 1
        count += D
        pos += D
        if pos >= L:
            pos = 0
        st.progress = count
        if now() >= deadline or count >= limit:
            break
    st.runtime = now() - start
    st.cpu = time.thread_time() - cpu0
    st.count = count
    st.calls = calls
    st.min_comp = st.max_comp = D


async def _aio_thread(args, props, thread: int, st: Stats, ready) -> None:
    import asyncio
    try:
        import blkio.aio as baio
    except ImportError as e:
        raise BenchError(f"API asyncio not available in this build ({e})")
    open_ = _require(baio, "open", "asyncio")
    async with open_(args.driver, **props) as adev:
        wl = Workload(args, _aio_capacity(adev))
        if args.api == "asyncio-batch":
            submit_batch = _require(
                adev, "read_batch" if wl.is_read else "write_batch",
                "asyncio-batch")
        else:
            op = _require(adev, "readinto" if wl.is_read else "write",
                          "asyncio")
        bufs = _aio_buffers(adev, wl, args.buffers)
        if ready is not None:
            await asyncio.get_running_loop().run_in_executor(None, ready.wait)
        if args.api == "asyncio-batch":
            await _aio_batches(submit_batch, wl.offsets(thread), bufs, st, wl)
        else:
            await aio_workers(op, bufs, wl.offsets(thread).tolist(), st, wl)


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
    try:
        props = parse_properties(args.properties)
    except PropertyError as e:
        raise BenchError(str(e)) from None
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
    ready = (threading.Barrier(args.num_threads)
             if args.num_threads > 1 else None)
    stop_progress = threading.Event()
    prog = threading.Thread(target=_progress, daemon=True,
                            args=(stats, time.perf_counter(), stop_progress,
                                  sys.stderr.isatty()))
    dev = None
    if args.api in ("asyncio", "asyncio-batch"):
        def aio_main(t: int) -> None:
            run_event_loop(_aio_thread(args, open_kw, t, stats[t], ready),
                           args.loop)

        targets: List[tuple] = [(aio_main, t) for t in range(args.num_threads)]
    else:
        open_ = _require(blkio, "open", "open")
        try:
            dev = open_(args.driver, **open_kw)
        except (ValueError, TypeError) as e:
            raise BenchError(str(e))
        wl = Workload(args, int(dev.capacity))
        if args.api == "blocking" and args.poll:
            # Busy-poll each wait until the completion arrives, as C
            # blkio-bench --poll does (bounded to 1 ms per wait).
            dev.spin_us = 1000
        fn = {"blocking": run_blocking, "queue": run_queue,
              "batch": run_batch}[args.api]
        targets = [(fn, dev, wl, t, stats[t], args, ready)
                   for t in range(args.num_threads)]
    try:
        prog.start()
        run_threads(targets, ready)
    finally:
        stop_progress.set()
        prog.join()
        if dev is not None:
            dev.close()
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


def main(argv: list[str] | None = None, prog: str = "python -m blkio bench") -> int:
    """``python -m blkio bench ARGS``: returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    return _run_and_print(_parse_args(argv, prog))


if __name__ == "__main__":
    sys.exit(main())
