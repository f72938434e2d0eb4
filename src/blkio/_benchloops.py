"""The timed loops of ``blkio bench`` and what they measure: per-thread
``Stats`` (counts and latency recorders), the ``Workload`` (what to run: the
region, the offsets, the read/write mix), the loops over blkio's blocking,
queue, batch and asyncio APIs, and the JSON figures.

bench/contenders.py (the Python peers in the benchmark suite) times its
kinds with the same ``closed_loop``, ``InflightClock`` and ``aio_workers``,
so every Python contender is measured by the same code.  Uses only blkio's
public API and numpy; command-line parsing and output are ``_bench``'s,
verification ``_benchverify``'s.

Latency: by default every request is timed, as C blkio-bench does it: one
clock reading per reap (the latency of everything it returned, and the
submission time of what is resubmitted right after) and one pair per
request on the one-at-a-time APIs.  Values go to the thread's
``LatencyRecorder`` (``_histogram``), never as an object per request on the
batch path.  ``lat_sample=N`` times one request (or batch) in N instead.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._cliparse import open_failure
from ._histogram import LatencyHistogram, LatencyRecorder, merged

GiB = 1 << 30
_TABLE_LEN = 1 << 16          # random offsets precomputed per thread
_SEQ_TABLE_MAX = 1 << 20      # sequential offsets: at most this many, cycled
_CHECK_BYTES = 4 << 20        # blocking loops look at the clock every 4 MiB
_CHECK_REQUESTS = 64          # ... or every 64 requests (or calls), at most
READ, WRITE = "read", "write"


class BenchError(Exception):
    """A clear, user-facing failure (printed without a traceback; exit 1)."""


class UsageError(BenchError):
    """A command line that cannot run on this device (exit 2)."""


# --------------------------------------------------------------------------
# statistics


class Stats:
    """One thread's figures: counts, and a latency recorder per op
    (``recs``: "read" and/or "write"); ``progress`` is the count so far
    (for progress lines and the time series)."""

    __slots__ = ("count", "runtime", "min_comp", "max_comp", "calls", "iodepth", "progress",
                 "cpu", "recs", "op_counts", "main")

    def __init__(self, iodepth: int, ops: Sequence[str] = (READ,)):
        self.count = 0
        self.runtime = 0.0
        self.calls = 0
        self.min_comp: Optional[int] = None
        self.max_comp = 0
        self.iodepth = iodepth
        self.progress = 0
        self.cpu = 0.0       # the thread's CPU seconds (user + system) in the run
        self.recs: Dict[str, LatencyRecorder] = {op: LatencyRecorder() for op in ops}
        self.op_counts: Dict[str, int] = {op: 0 for op in ops}
        self.main = self.recs[ops[0]]

    def lat(self, ns: int) -> None:
        """Record one latency (a sampled request) for the workload's op."""
        self.main.values.append(ns)

    def comp(self, n: int) -> None:
        if self.min_comp is None or n < self.min_comp:
            self.min_comp = n
        if n > self.max_comp:
            self.max_comp = n

    def maybe_fold(self, now: float) -> None:
        for rec in self.recs.values():
            rec.maybe_fold(now)

    def finish(self, count: int, calls: int, start: float, cpu0: float) -> None:
        """End of the timed run (``start``: its perf_counter, ``cpu0``: its
        thread_time); a single-op workload's count is its op's."""
        self.runtime = time.perf_counter() - start
        self.cpu = time.thread_time() - cpu0
        self.count = count
        self.calls = calls
        self.progress = count
        if len(self.op_counts) == 1:
            self.op_counts[next(iter(self.op_counts))] = count
        for rec in self.recs.values():
            rec.fold()

    def histogram(self, op: Optional[str] = None) -> LatencyHistogram:
        """Everything folded so far, of one op or of all."""
        if op is not None:
            return self.recs[op].snapshot()
        return merged(r.snapshot() for r in self.recs.values())


def _stats_dict(count: int, runtime: float, hist: LatencyHistogram, calls: int, min_comp,
                max_comp, blocksize: int) -> dict:
    runtime = runtime if runtime > 0 else 1e-9
    return {
        "kiops": round(count / runtime / 1000.0, 3),
        "gips": round(count * blocksize / runtime / GiB, 3),
        "min_lat_us": round((hist.min_ns or 0) / 1000.0, 3),
        "mean_lat_us": round(hist.mean_ns / 1000.0, 3),
        "max_lat_us": round(hist.max_ns / 1000.0, 3),
        "calls": int(calls),
        "min_completions": round(float(min_comp or 0), 2),
        "mean_completions": round(count / calls if calls else 0.0, 2),
        "max_completions": round(float(max_comp), 2),
        "lat_us": hist.lat_us(),
    }


def _op_dicts(counts: Dict[str, int], hists: Dict[str, LatencyHistogram], runtime: float,
              blocksize: int) -> dict:
    """Per-op figures of a run that did both reads and writes."""
    if len([op for op, n in counts.items() if n]) < 2:
        return {}
    runtime = runtime if runtime > 0 else 1e-9
    return {op: {"count": counts[op],
                 "kiops": round(counts[op] / runtime / 1000.0, 3),
                 "gips": round(counts[op] * blocksize / runtime / GiB, 3),
                 "mean_lat_us": round(hists[op].mean_ns / 1000.0, 3),
                 "lat_us": hists[op].lat_us()} for op in (READ, WRITE) if op in counts}


def results_json(stats: Sequence[Stats], blocksize: int) -> dict:
    """blkio-bench's JSON (``aggregate`` and ``threads``, each with its
    latency percentiles, ``lat_us``; ``read``/``write`` figures when the run
    did both), and ``cpu``."""
    threads = []
    per_op: Dict[str, List[LatencyHistogram]] = {}
    for s in stats:
        hists = {op: s.histogram(op) for op in s.recs}
        for op, h in hists.items():
            per_op.setdefault(op, []).append(h)
        t = _stats_dict(s.count, s.runtime, merged(hists.values()), s.calls, s.min_comp,
                        s.max_comp, blocksize)
        t.update(_op_dicts(s.op_counts, hists, s.runtime, blocksize))
        threads.append(t)
    count = sum(s.count for s in stats)
    runtime = sum(s.runtime for s in stats) / len(stats)
    mincomp = [s.min_comp for s in stats if s.min_comp is not None]
    agg_hists = {op: merged(hs) for op, hs in per_op.items()}
    agg = _stats_dict(count, runtime, merged(agg_hists.values()), sum(s.calls for s in stats),
                      min(mincomp) if mincomp else None, max(s.max_comp for s in stats),
                      blocksize)
    op_counts: Dict[str, int] = {}
    for s in stats:
        for op, n in s.op_counts.items():
            op_counts[op] = op_counts.get(op, 0) + n
    agg.update(_op_dicts(op_counts, agg_hists, runtime, blocksize))
    # Not in blkio-bench's output (so a key of its own): the CPU time the
    # measuring threads used in their timed runs, which shows whether the
    # client was the busy side or waited (bench/run.py measures C's from
    # outside the process).
    cpu = sum(s.cpu for s in stats)
    return {"aggregate": agg, "threads": threads,
            "cpu": {"seconds": round(cpu, 4),
                    "us_per_request": round(cpu / count * 1e6, 3) if count else 0.0}}


# --------------------------------------------------------------------------
# workloads


class Workload:
    """What to run, from the parsed options and the device's capacity: the
    region (``--offset``/``--size``), the offsets each thread walks, and for
    mixed workloads which requests write."""

    def __init__(self, args: argparse.Namespace, capacity: int):
        self.bs = args.blocksize
        self.depth = args.iodepth
        rw = args.readwrite
        self.mixed = rw in ("rw", "randrw")
        self.is_read = rw in ("read", "randread")
        self.is_rand = rw.startswith("rand")
        self.read_pct = getattr(args, "rwmixread", 50)
        self.capacity = capacity
        self.nthreads = args.num_threads
        self.poll = getattr(args, "poll", False)
        self.lat_sample: Optional[int] = args.lat_sample     # None: every request
        self.runtime = args.runtime
        self.requests = args.requests or 0      # 0: no limit
        # verify: each thread has a slice of the region of its own, and its
        # offsets never repeat within a table (no two requests in flight on
        # one block)
        self.disjoint = bool(getattr(args, "verify", None))
        # requests between two looks at the clock in the one-at-a-time loops
        self.check_every = max(1, min(self.lat_sample or _CHECK_REQUESTS, _CHECK_BYTES // self.bs))
        self.ops: Tuple[str, ...] = ((READ, WRITE) if self.mixed
                                     else (READ,) if self.is_read else (WRITE,))
        offset = getattr(args, "offset", 0) or 0
        size = getattr(args, "size", None)
        if offset >= capacity:
            raise UsageError(f"--offset={offset} is not below the device's capacity "
                             f"({capacity} bytes)")
        if size is None:
            size = capacity - offset
        elif offset + size > capacity:
            raise UsageError(f"--offset={offset} --size={size} ends past the device's capacity "
                             f"({capacity} bytes)")
        self.offset = offset
        self.nblocks = size // self.bs
        if self.nblocks < 1:
            raise UsageError(f"the region ({size} bytes from offset {offset}) is smaller than "
                             f"one block ({self.bs} bytes)")
        self.size = self.nblocks * self.bs

    def check_alignment(self, limits: Any) -> None:
        """UsageError when --blocksize or --offset is not a multiple of the
        device's request-alignment (``limits``: its Limits, or None)."""
        align = getattr(limits, "request_alignment", 1) or 1
        for name, value in (("--blocksize", self.bs), ("--offset", self.offset)):
            if value % align:
                raise UsageError(f"{name}={value} is not a multiple of the device's "
                                 f"request-alignment ({align} bytes)")

    def thread_blocks(self, thread: int) -> Tuple[int, int]:
        """(first block, block count) a thread may use: the whole region, or
        its own slice of it when the threads must not share blocks."""
        if not self.disjoint:
            return 0, self.nblocks
        first = self.nblocks * thread // self.nthreads
        end = self.nblocks * (thread + 1) // self.nthreads
        return first, end - first

    def offsets(self, thread: int) -> np.ndarray:
        """A table of offsets (uint64) for one thread, cycled through.  With
        ``disjoint`` the entries are distinct blocks of the thread's slice."""
        first, nblocks = self.thread_blocks(thread)
        if nblocks < 1:
            raise UsageError(f"thread {thread} has no block of its own: the region holds "
                             f"{self.nblocks} blocks for {self.nthreads} threads")
        rng = np.random.default_rng((os.getpid() << 8) + thread)
        if self.is_rand:
            if self.disjoint:
                n = min(nblocks, _SEQ_TABLE_MAX)
                blocks = (rng.permutation(nblocks)[:n] if n == nblocks
                          else rng.choice(nblocks, size=n, replace=False)).astype(np.uint64)
            else:
                blocks = rng.integers(0, nblocks, size=_TABLE_LEN, dtype=np.uint64)
        else:
            start = 0 if self.disjoint else (nblocks // self.nthreads * thread)
            n = min(nblocks, _SEQ_TABLE_MAX)
            blocks = (np.arange(n, dtype=np.uint64) + np.uint64(start)) % np.uint64(nblocks)
        return np.ascontiguousarray((blocks + np.uint64(first)) * np.uint64(self.bs)
                                    + np.uint64(self.offset))

    def writes(self, thread: int, n: int) -> np.ndarray:
        """Which of a table's ``n`` requests write (bool), by --rwmixread."""
        if not self.mixed:
            return np.full(n, not self.is_read)
        rng = np.random.default_rng((os.getpid() << 8) + thread + (1 << 7))
        return rng.random(n) * 100.0 >= self.read_pct


def touch(flat: np.ndarray, is_read: bool) -> np.ndarray:
    """Fill a buffer (0xA5 to write, zeroes to read into) so that its pages
    are faulted in before the clock starts, for every contender alike."""
    flat[:] = 0 if is_read else 0xA5
    return flat


# --------------------------------------------------------------------------
# the timed loops (shared with bench/contenders.py)


def closed_loop(run_n: Callable[[int], Any], st: Stats, wl: Workload,
                ready: Optional[threading.Barrier],
                finish: Optional[Callable[[], Any]] = None, *,
                self_timed: bool = False) -> None:
    """One request at a time: ``run_n(k)`` issues the next ``k`` requests.
    Runs until ``wl.runtime`` (or ``wl.requests``), looking at the clock
    every ``wl.check_every`` requests; ``finish()`` (e.g. a flush) is
    inside the timed run.  ``self_timed``: ``run_n`` records the latency of
    each of its requests itself; else one request in each ``check_every``
    is timed here."""
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
    lat = st.lat
    while True:
        k = min(step, limit - count) if limit else step
        if self_timed:
            run_n(k)
        else:
            if k > 1:
                run_n(k - 1)
            t0 = pc()
            run_n(1)
            lat(pc() - t0)
        count += k
        st.progress = count
        t = now()
        if count == limit or t >= deadline:
            break
        st.maybe_fold(t)
    if finish is not None:
        finish()
    st.finish(count, count, start, cpu0)
    st.min_comp = st.max_comp = 1


class InflightClock:
    """Pacing for loops that keep several requests in flight: ``tick`` once
    per call (every ``every`` calls -- ``wl.lat_sample`` or 64 -- it records
    progress, folds latencies and says whether ``wl.runtime`` is over).
    With ``sample`` (loops that do not time every request themselves) it
    also times one request -- ``slot`` -- at a time: the loop calls
    ``done()`` when it comes back."""

    __slots__ = ("st", "every", "limit", "slot", "t_sub", "start", "deadline",
                 "cpu0", "sample")

    def __init__(self, st: Stats, wl: Workload, sample: bool = True):
        self.st = st
        self.every = wl.lat_sample or _CHECK_REQUESTS
        self.sample = sample
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
        if self.sample and self.slot < 0:
            self.slot = slot
            self.t_sub = time.perf_counter_ns()
        t = time.perf_counter()
        self.st.maybe_fold(t)
        return t >= self.deadline

    def over(self) -> bool:
        return time.perf_counter() >= self.deadline

    def finish(self, count: int, calls: int) -> None:
        self.st.finish(count, calls, self.start, self.cpu0)


def offset_stream(offsets: Sequence[Any], start: int = 0):
    """The offsets (or any items) from index ``start`` on, cycled forever."""
    offs = list(offsets)
    return itertools.cycle(offs[start:] + offs[:start])


class OffsetRuns:
    """The offsets (or any items) cycled forever, handed out as lists of
    ``k``: a closed loop then iterates a plain list, as a user's ``for off
    in offsets:`` does (pulling each offset through islice over a cycle
    costs more than the rest of the loop's own work)."""

    __slots__ = ("offs", "pos")

    def __init__(self, offsets: Sequence[Any]):
        self.offs = list(offsets)
        self.pos = 0

    def take(self, k: int) -> List[Any]:
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
                      table: Sequence[Any], st: Stats, wl: Workload, *,
                      ops: Optional[Sequence[Tuple[Callable[[int, Any], Any], str]]] = None
                      ) -> None:
    """``len(bufs)`` coroutines (bufs: a sequence or a 2-D array, one row
    each) on the running loop, each awaiting ``op(offset, its buffer)`` one
    request after another until ``wl.runtime`` (or ``wl.requests`` in
    all), timing each (one in ``wl.lat_sample`` with that option).  A mixed
    workload passes ``ops``: (op, "read"/"write") for each table entry."""
    import asyncio
    depth = len(bufs)
    L = len(table)
    stop = [False]
    counts = [0] * depth
    pc = time.perf_counter_ns
    K = wl.lat_sample
    items: Sequence[Any] = table
    if ops is not None:
        recs = {name: st.recs[name].values.append for name in st.recs}
        items = [(fn, off, recs[name], name == WRITE) for (fn, name), off in zip(ops, table)]
    rec = st.main.values.append
    writes = [0] * depth

    # --requests: the workers' quotas add up to it
    limit = wl.requests
    quotas = [limit // depth + (j < limit % depth) if limit else sys.maxsize
              for j in range(depth)]

    def progress(j: int, c: int) -> None:      # every 256 requests of a worker
        counts[j] = c
        st.progress = sum(counts)
        st.maybe_fold(time.perf_counter())

    async def worker(j: int) -> None:
        buf = bufs[j]
        c = 0
        quota = quotas[j]
        stream = offset_stream(items, (j * L) // depth)
        if ops is not None:
            w = 0
            for fn, off, record, is_write in stream:
                if stop[0] or c >= quota:
                    break
                t0 = pc()
                await fn(off, buf)
                record(pc() - t0)
                w += is_write
                c += 1
                if c & 255 == 0:
                    progress(j, c)
            writes[j] = w
        elif K is None:
            for off in stream:
                if stop[0] or c >= quota:
                    break
                t0 = pc()
                await op(off, buf)
                rec(pc() - t0)
                c += 1
                if c & 255 == 0:
                    progress(j, c)
        else:
            for off in stream:
                if stop[0] or c >= quota:
                    break
                if c % K == 0:
                    t0 = pc()
                    await op(off, buf)
                    rec(pc() - t0)
                else:
                    await op(off, buf)
                c += 1
                if c & 255 == 0:
                    progress(j, c)
        counts[j] = c

    loop = asyncio.get_running_loop()
    cpu0 = time.thread_time()
    t0 = time.perf_counter()
    loop.call_later(wl.runtime, stop.__setitem__, 0, True)
    await asyncio.gather(*(worker(j) for j in range(depth)))
    stop[0] = True
    total = sum(counts)
    st.finish(total, total, t0, cpu0)
    if ops is not None:
        st.op_counts[WRITE] = sum(writes)
        st.op_counts[READ] = total - sum(writes)
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


def require(obj, name: str, api: str):
    fn = getattr(obj, name, None)
    if fn is None:
        raise BenchError(f"API {api} not available in this build "
                         f"({type(obj).__name__}.{name} is missing)")
    return fn


def make_buffers(dev, wl: Workload, kind: str, nbufs: int) -> np.ndarray:
    """``nbufs`` rows of ``wl.bs`` bytes: Device.alloc() memory, or plain
    numpy memory (``kind`` "numpy"), touched."""
    nbytes = nbufs * wl.bs
    if kind == "alloc" and hasattr(dev, "alloc"):
        flat = require(dev, "alloc", "alloc")(nbytes)
    else:
        flat = np.zeros(nbytes, dtype=np.uint8)
    return touch(flat, wl.is_read).reshape(nbufs, wl.bs)


def op_table(dev_or_queue, wl: Workload, thread: int, n: int, api: str,
             read: str = "read", write: str = "write") -> List[Tuple[Callable, str]]:
    """(the read or write method, its op) for each of a table's ``n``
    entries (mixed workloads)."""
    fns = {READ: require(dev_or_queue, read, api), WRITE: require(dev_or_queue, write, api)}
    return [(fns[WRITE], WRITE) if w else (fns[READ], READ) for w in wl.writes(thread, n)]


def run_blocking(dev, wl: Workload, thread: int, st: Stats, args,
                 ready: threading.Barrier | None) -> None:
    knobs = {k: v for k, v in (("chunk", args.chunk),
                               ("depth", args.chunk_depth)) if v}
    read = require(dev, "readinto", "blocking")
    write = require(dev, "write", "blocking")
    if knobs:       # a library without them raises TypeError on first use
        read = functools.partial(read, **knobs)
        write = functools.partial(write, **knobs)
    buf = make_buffers(dev, wl, args.buffers, 1)[0]
    table = wl.offsets(thread).tolist()
    pc = time.perf_counter_ns
    if wl.mixed:
        recs = {name: st.recs[name].values.append for name in st.recs}
        fns = {READ: read, WRITE: write}
        ops = [(fns[WRITE], off, recs[WRITE], 1) if w else (fns[READ], off, recs[READ], 0)
               for off, w in zip(table, wl.writes(thread, len(table)))]
        take = OffsetRuns(ops).take
        writes = [0]

        def run_n(k: int) -> None:
            w = 0
            for op, off, rec, is_write in take(k):
                t0 = pc()
                op(off, buf)
                rec(pc() - t0)
                w += is_write
            writes[0] += w
    else:
        op = read if wl.is_read else write
        take = OffsetRuns(table).take
        if wl.lat_sample is None:
            # One clock reading per request: each request ends at its stamp
            # and starts at the one before (the loop's own step between two
            # requests, a store and an add, counts in); a run starts at a
            # negative stamp.
            stamp = st.main.stamps.append

            def run_n(k: int) -> None:
                stamp(-pc())
                for off in take(k):
                    op(off, buf)
                    stamp(pc())
        else:
            def run_n(k: int) -> None:
                for off in take(k):
                    op(off, buf)

    closed_loop(run_n, st, wl, ready,
                require(dev, "flush", "flush") if args.flush else None,
                self_timed=wl.mixed or wl.lat_sample is None)
    if wl.mixed:
        st.op_counts[WRITE] = writes[0]
        st.op_counts[READ] = st.count - writes[0]


def get_queue(dev, thread: int, poll_queues: bool):
    if poll_queues:
        return require(dev, "poll_queue", "poll queues")(thread)
    return require(dev, "queue", "queue")(thread)


def _drain_queue(wait, left: int) -> None:
    """Wait for what is in flight so close() has nothing to wait for."""
    t_end = time.perf_counter() + 10.0
    while left > 0 and time.perf_counter() < t_end:
        left -= len(wait(1, timeout=1.0))


def run_queue(dev, wl: Workload, thread: int, st: Stats, args,
              ready: threading.Barrier | None) -> None:
    q = get_queue(dev, thread, args.poll_queues)
    require(q, "submit", "queue")
    wait = require(q, "wait", "queue")
    poll = require(q, "poll", "queue") if wl.poll else None
    D = wl.depth
    bufs = make_buffers(dev, wl, args.buffers, D)
    rows = [bufs[j] for j in range(D)]
    table = wl.offsets(thread).tolist()
    pc = time.perf_counter_ns
    tsub = [0] * D                       # each slot's submission time (ns)
    if wl.mixed:
        recs = {name: st.recs[name].values.append for name in st.recs}
        ops = [(fn, off, recs[name], name == WRITE) for (fn, name), off in
               zip(op_table(q, wl, thread, len(table), "queue"), table)]
        nxt = offset_stream(ops).__next__
        slot_rec: List[Any] = [None] * D
        slot_w = [False] * D
        writes = 0
        if ready is not None:
            ready.wait()
        clock = InflightClock(st, wl, sample=False)
        t = pc()
        for j in range(D):
            fn, off, slot_rec[j], slot_w[j] = nxt()
            tsub[j] = t
            fn(off, rows[j], user_data=j)
        count = 0
        reaps = _Reaps((lambda: wait(1)) if poll is None else poll, clock)
        for comps in reaps:
            now = pc()
            n = len(comps)
            st.comp(n)
            for c in comps:
                if c.ret:
                    c.check()
                j = c.user_data
                slot_rec[j](now - tsub[j])
                writes += slot_w[j]
                fn, off, slot_rec[j], slot_w[j] = nxt()
                tsub[j] = now
                fn(off, rows[j], user_data=j)
            count += n
            if clock.tick(reaps.calls, count, j):
                break
        clock.finish(count, reaps.calls)
        st.op_counts[WRITE] = writes
        st.op_counts[READ] = count - writes
        _drain_queue(wait, D)
        return
    op = require(q, "read" if wl.is_read else "write", "queue")
    nxt = offset_stream(table).__next__
    full = wl.lat_sample is None
    # every request's latency: its slot's submission time, and the reap's
    # time with its count, stored as they are (folded later)
    submitted = st.main.submitted.append
    reaped, reaped_n = st.main.reaped.append, st.main.reaped_n.append
    if ready is not None:
        ready.wait()
    clock = InflightClock(st, wl, sample=not full)
    t = pc()
    for j in range(D):
        tsub[j] = t
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
        if full:
            now = pc()
            reaped(now)
            reaped_n(n)
            for c in comps:
                if c.ret:
                    c.check()
                j = c.user_data
                submitted(tsub[j])
                tsub[j] = now
                op(nxt(), rows[j], user_data=j)
        else:
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
    _drain_queue(wait, D)


def batch_dtype():
    return np.dtype([("user_data", np.int64), ("ret", np.int32)])


def _raise_failed(rets: np.ndarray, n: int) -> None:
    bad = int(np.flatnonzero(rets[:n])[0])
    err = -int(rets[bad])
    raise OSError(err, f"I/O request failed: {os.strerror(err)}")


class _Reaps:
    """A mixed loop's reaps: each non-empty result of ``fetch()`` (a reap's
    count, or a list of completions) until the clock's time is over;
    ``calls`` counts every fetch, empty ones too.  (The plain loops keep
    this inline: theirs are the loops the instruction budget holds.)"""

    def __init__(self, fetch: Callable[[], Any], clock: "InflightClock"):
        self.fetch, self.clock = fetch, clock
        self.calls = 0

    def __iter__(self) -> "_Reaps":
        return self

    def __next__(self) -> Any:
        while True:
            got = self.fetch()
            self.calls += 1
            if got:
                return got
            if self.clock.over():
                raise StopIteration


def _drain_batch(reap, out: np.ndarray, inflight: int) -> None:
    t_end = time.perf_counter() + 10.0
    while inflight > 0 and time.perf_counter() < t_end:
        inflight -= reap(out, min=1, timeout=1.0)


def _batch_table(wl: Workload, thread: int) -> Tuple[np.ndarray, int]:
    """The thread's offsets, at least a batch of them, and the length of
    its whole batches (a batch never wraps around the table)."""
    table = wl.offsets(thread)
    D = wl.depth
    L = len(table) - (len(table) % D) if len(table) >= D else len(table)
    if L < D:                      # tiny region: repeat the table
        table = np.resize(table, D)
        L = D
    return table, L


def run_batch(dev, wl: Workload, thread: int, st: Stats, args,
              ready: threading.Barrier | None) -> None:
    q = get_queue(dev, thread, args.poll_queues)
    if wl.mixed:
        return run_batch_mixed(dev, q, wl, thread, st, args, ready)
    submit = require(q, "submit_reads" if wl.is_read else "submit_writes", "batch")
    reap = require(q, "reap", "batch")
    D = wl.depth
    bufs = make_buffers(dev, wl, args.buffers, D)
    table, L = _batch_table(wl, thread)
    tags = np.arange(D, dtype=np.int64)
    region = bufs.reshape(-1)               # row j at byte j * bs
    bs = wl.bs
    back_tags = np.zeros(D, dtype=np.int64)     # the tags that came back
    back_rows = np.zeros(D, dtype=np.uint64)    # ... and their rows' offsets
    out = np.zeros(D, dtype=batch_dtype())
    ud = out["user_data"]
    rets = out["ret"]
    min_reap = 0 if wl.poll else 1
    # Latency of every request: the clock is read once per reap.  While
    # every request in flight went out in one submit (``uniform``: a whole
    # batch back, the usual case on a page-cached file), a reap's requests
    # share one latency: the reap's stamp less the one before (the recorder
    # weighs each by the batch); otherwise each slot's submission time
    # (``t_sub``) is subtracted from the reap's, a numpy operation over the
    # reaped tags into the recorder's ring.
    full = wl.lat_sample is None
    rec = st.main
    rec.stamp_weight = D
    stamp = rec.stamps.append
    t_sub = np.zeros(D, dtype=np.int64)
    pc = time.perf_counter_ns
    if ready is not None:
        ready.wait()
    # The loop holds the GIL between its GIL-free calls (submit, reap):
    # with two threads, every microsecond of it is one the other may wait
    # for, so the usual case (a whole batch back) is kept to a few
    # operations: the batch's offsets are views made once, and the
    # every-call bookkeeping (Stats.comp, InflightClock.tick) is inlined.
    views: dict = {}
    whole = False
    clock = InflightClock(st, wl, sample=not full)
    every = clock.every
    limit = clock.limit
    t_batch = pc()
    uniform = True
    if full:
        stamp(-t_batch)
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
        if full:
            now = pc()
        if n != D:
            st.comp(n)
        else:
            whole = True
        if q.failed:
            # Queue.failed counts failed batch completions: one attribute
            # read per reap, instead of a numpy pass over ``rets``.
            _raise_failed(rets, n)
        count += n
        # Resubmit one request per freed slot, each into its own buffer.
        if n == inflight:
            # everything came back (the usual case on a page-cached file)
            if full:
                if uniform:
                    stamp(now)          # ends this batch, starts the next
                else:
                    np.subtract(now, t_sub, out=rec.ring_room(n))
                    stamp(-now)         # the next batch starts a run
                    uniform = True
                t_batch = now
            elif clock.slot >= 0:
                clock.done()
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
            if full:
                if uniform:
                    t_sub.fill(t_batch)
                    uniform = False
                lat = rec.ring_room(n)
                np.take(t_sub, rtags, out=lat)
                np.subtract(now, lat, out=lat)
                t_sub[rtags] = now
            elif clock.slot >= 0 and (rtags == clock.slot).any():
                clock.done()
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
    _drain_batch(reap, out, inflight)


def run_batch_mixed(dev, q, wl: Workload, thread: int, st: Stats, args,
                    ready: threading.Barrier | None) -> None:
    """The batch API with reads and writes mixed (--rwmixread): each reap
    frees some slots; their next requests go out as up to two submits (the
    reads, the writes) in the region form, and every request's latency is
    its slot's submission time subtracted from the reap's."""
    submit_reads = require(q, "submit_reads", "batch")
    submit_writes = require(q, "submit_writes", "batch")
    reap = require(q, "reap", "batch")
    D = wl.depth
    bs = wl.bs
    bufs = make_buffers(dev, wl, args.buffers, D)
    region = bufs.reshape(-1)
    table, L = _batch_table(wl, thread)
    wtab = wl.writes(thread, len(table))
    out = np.zeros(D, dtype=batch_dtype())
    t_sub = np.zeros(D, dtype=np.int64)
    slot_write = np.zeros(D, dtype=bool)
    rec_r, rec_w = st.recs[READ], st.recs[WRITE]
    pc = time.perf_counter_ns
    writes = 0

    def issue(tags: np.ndarray, pos: int, now: int) -> None:
        n = len(tags)
        offs = table[pos:pos + n]
        w = wtab[pos:pos + n]
        slot_write[tags] = w
        t_sub[tags] = now
        rows = tags.astype(np.uint64) * np.uint64(bs)
        nw = int(np.count_nonzero(w))
        if nw < n:
            r = ~w
            submit_reads(offs[r], rows[r], region=region, blocksize=bs, user_data=tags[r])
        if nw:
            submit_writes(offs[w], rows[w], region=region, blocksize=bs, user_data=tags[w])

    if ready is not None:
        ready.wait()
    clock = InflightClock(st, wl, sample=False)
    issue(np.arange(D, dtype=np.int64), 0, pc())
    pos = D % L
    count = 0
    min_reap = 0 if wl.poll else 1
    reaps = _Reaps(lambda: reap(out, min=min_reap), clock)
    for n in reaps:
        now = pc()
        st.comp(n)
        if q.failed:
            _raise_failed(out["ret"], n)
        tags = out["user_data"][:n].copy()
        lat = now - t_sub[tags]
        w = slot_write[tags]
        nw = int(np.count_nonzero(w))
        if nw:
            np.copyto(rec_w.ring_room(nw), lat[w])
        if nw < n:
            np.copyto(rec_r.ring_room(n - nw), lat[~w])
        writes += nw
        count += n
        if pos + n > L:
            pos = 0
        issue(tags, pos, now)
        pos += n
        if clock.tick(reaps.calls, count, 0):
            break
    clock.finish(count, reaps.calls)
    st.op_counts[WRITE] = writes
    st.op_counts[READ] = count - writes
    _drain_batch(reap, out, D)


def aio_capacity(adev) -> int:
    for obj in (adev, getattr(adev, "device", None), getattr(adev, "dev", None)):
        cap = getattr(obj, "capacity", None) if obj is not None else None
        if cap is not None:
            return int(cap)
    raise BenchError("API asyncio not available in this build "
                     "(the asyncio device has no capacity)")


def aio_buffers(adev, wl: Workload, kind: str) -> np.ndarray:
    nbytes = wl.depth * wl.bs
    if kind == "alloc" and hasattr(adev, "alloc"):
        flat = adev.alloc(nbytes)
    else:
        flat = np.zeros(nbytes, dtype=np.uint8)
    return touch(flat, wl.is_read).reshape(wl.depth, wl.bs)


async def aio_batches(adev, table: np.ndarray, bufs: np.ndarray, st: Stats, wl: Workload,
                      thread: int) -> None:
    """One coroutine awaiting batches of ``wl.depth`` requests (read_batch
    or write_batch; both, gathered, in a mixed workload), every batch timed
    (one in ``wl.lat_sample`` with that option)."""
    import asyncio
    D = wl.depth
    L = len(table) - (len(table) % D)
    if L < D:
        table = np.resize(table, D)
        L = D
    read_batch = require(adev, "read_batch", "asyncio-batch")
    write_batch = require(adev, "write_batch", "asyncio-batch")
    pc = time.perf_counter_ns
    now = time.perf_counter
    K = wl.lat_sample or 1
    limit = wl.requests or sys.maxsize
    pos = count = calls = writes = 0
    region = bufs.reshape(-1)
    recs = st.recs
    if wl.mixed:
        wtab = wl.writes(thread, len(table))
        rows = np.arange(D, dtype=np.uint64) * np.uint64(wl.bs)

        async def timed(fn, offs: np.ndarray, at: np.ndarray, op: str) -> None:
            t0 = pc()
            await fn(offs, at, region=region, blocksize=wl.bs)
            dt = pc() - t0
            recs[op].batched.append(dt)
            recs[op].batch_n.append(len(offs))

        async def one(p: int) -> int:
            w = wtab[p:p + D]
            offs = table[p:p + D]
            parts = []
            if not w.all():
                parts.append(timed(read_batch, offs[~w], rows[~w], READ))
            if w.any():
                parts.append(timed(write_batch, offs[w], rows[w], WRITE))
            await asyncio.gather(*parts)
            return int(np.count_nonzero(w))
    else:
        submit_batch = read_batch if wl.is_read else write_batch
        rec = st.main
    cpu0 = time.thread_time()
    start = now()
    deadline = start + wl.runtime
    while True:
        if wl.mixed:
            writes += await one(pos)
        elif calls % K == 0:
            t0 = pc()
            await submit_batch(table[pos:pos + D], bufs)
            rec.batched.append(pc() - t0)
            rec.batch_n.append(D if wl.lat_sample is None else 1)
        else:
            await submit_batch(table[pos:pos + D], bufs)
        calls += 1
        count += D
        pos += D
        if pos >= L:
            pos = 0
        st.progress = count
        t = now()
        if t >= deadline or count >= limit:
            break
        st.maybe_fold(t)
    st.finish(count, calls, start, cpu0)
    if wl.mixed:
        st.op_counts[WRITE] = writes
        st.op_counts[READ] = count - writes
    st.min_comp = st.max_comp = D


async def aio_thread(args, props, thread: int, st: Stats, ready, verify=None) -> None:
    """One thread of the asyncio APIs: open the device on this thread's
    loop, then run the workload (or ``verify(adev, wl)``)."""
    import asyncio
    try:
        import blkio.aio as baio
    except ImportError as e:
        raise BenchError(f"API asyncio not available in this build ({e})")
    open_ = require(baio, "open", "asyncio")
    what = f"{args.driver} device" + (f" {props['path']}" if props.get("path") else "")
    try:
        adev = await open_(args.driver, **props)
    except (ValueError, TypeError) as e:
        raise UsageError(open_failure(what, e)) from None
    except OSError as e:
        raise BenchError(open_failure(what, e)) from None
    try:
        wl = Workload(args, aio_capacity(adev))
        wl.check_alignment(getattr(getattr(adev, "device", None), "limits", None))
        bufs = aio_buffers(adev, wl, args.buffers)
        if ready is not None:
            await asyncio.get_running_loop().run_in_executor(None, ready.wait)
        if verify is not None:
            await verify(adev, wl, bufs)
        elif args.api == "asyncio-batch":
            await aio_batches(adev, wl.offsets(thread), bufs, st, wl, thread)
        else:
            table = wl.offsets(thread).tolist()
            read = require(adev, "readinto", "asyncio")
            write = require(adev, "write", "asyncio")
            if wl.mixed:
                ops = op_table(adev, wl, thread, len(table), "asyncio", read="readinto")
                await aio_workers(read, bufs, table, st, wl, ops=ops)
            else:
                await aio_workers(read if wl.is_read else write, bufs, table, st, wl)
    finally:
        await adev.aclose()
