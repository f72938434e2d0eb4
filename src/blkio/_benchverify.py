"""``blkio bench --verify``: the verify workload, in rounds.

A thread's ``VerifyRunner`` hands out rounds of up to ``--iodepth`` requests
on distinct blocks (its own slice of the region: no two requests in flight
on one block, no two threads on one block), fills the blocks each round
writes (``_verify.BlockFormat``), and checks the blocks each round read once
the round is complete.  What it expects of a block: written earlier in this
run -- this run's generation and the sequence number of its last write;
read-only workloads and ``--verify-only`` -- a valid block of any run.  In a
mixed workload a read of a block this run has not written yet is not
checked (counted as unchecked).

``--verify-backlog=N``: after every N blocks written, the runner waits for
the writes, reads those blocks back and checks them (these reads are part of
the timed run, as fio counts its verify reads).  After a timed run that
wrote, every block it wrote is read back and checked once more, outside the
timed figures.  ``--verify-only`` reads the thread's whole slice once, in
order, and checks every block.

The API drivers below issue one round each through blkio's blocking, queue,
batch and asyncio APIs and record its latencies; the runner's generator
checks the round when the driver asks for the next one.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from ._benchloops import READ, WRITE, Stats, Workload, batch_dtype, get_queue, require
from ._verify import BlockFormat

__all__ = ["Round", "VerifyRunner", "run_sync", "run_async"]


class Round:
    """Up to ``iodepth`` requests on distinct blocks: ``offsets``,
    ``writes`` (which of them write), ``rows`` (their buffers, filled for
    the writes), and where their latencies go (``stats``)."""

    __slots__ = ("offsets", "writes", "rows", "stats", "positions", "expect_gen",
                 "expect_seq", "checked")

    def __init__(self, offsets: np.ndarray, writes: np.ndarray, rows: np.ndarray,
                 stats: Stats) -> None:
        self.offsets = offsets
        self.writes = writes
        self.rows = rows
        self.stats = stats
        self.positions: Optional[np.ndarray] = None
        self.expect_gen: Optional[np.ndarray] = None
        self.expect_seq: Optional[np.ndarray] = None
        self.checked: Optional[np.ndarray] = None      # reads to check (bool), or None: all


class VerifyRunner:
    """One thread's verify workload (see the module's docstring)."""

    def __init__(self, fmt: BlockFormat, wl: Workload, thread: int, st: Stats,
                 bufs: np.ndarray, *, backlog: int = 0, verify_only: bool = False,
                 final_stats: Optional[Stats] = None) -> None:
        self.fmt = fmt
        self.wl = wl
        self.thread = thread
        self.st = st
        self.final_stats = final_stats if final_stats is not None else Stats(wl.depth, (READ,))
        self.bufs = bufs
        self.backlog = backlog
        self.verify_only = verify_only
        self.table = wl.offsets(thread)
        self.wtab = wl.writes(thread, len(self.table))
        self.seq = np.zeros(len(self.table), dtype=np.uint32)   # writes per table entry
        self.gen = np.uint64(fmt.generation)
        self.reads_checked = 0
        self.reads_unchecked = 0
        self.final_checked = 0
        self.final_seconds = 0.0

    # -- rounds ------------------------------------------------------------

    def _round(self, positions: np.ndarray, writes: np.ndarray, stats: Stats) -> Round:
        k = len(positions)
        r = Round(self.table[positions], writes, self.bufs[:k], stats)
        r.positions = positions
        if writes.all():
            self.seq[positions] += 1
            self.fmt.fill(r.rows, r.offsets, self.seq[positions])
        elif writes.any():
            pw = positions[writes]
            self.seq[pw] += 1
            blocks = r.rows[writes]          # a copy (boolean index): filled, then put back
            self.fmt.fill(blocks, r.offsets[writes], self.seq[pw])
            r.rows[writes] = blocks
        reads = ~writes
        if reads.any():
            written = self.seq[positions] > 0
            if self.wtab.any():
                # this run writes: check what it wrote, against what it wrote
                r.checked = reads & written
                r.expect_seq = self.seq[positions]
                r.expect_gen = np.full(k, self.gen, dtype=np.uint64)
        return r

    def _check(self, r: Round) -> None:
        reads = ~r.writes
        check = reads if r.checked is None else r.checked
        n = int(np.count_nonzero(check))
        self.reads_unchecked += int(np.count_nonzero(reads)) - n
        if not n:
            return
        self.fmt.check(r.rows[check], r.offsets[check],
                       None if r.expect_gen is None else r.expect_gen[check],
                       None if r.expect_seq is None else r.expect_seq[check])
        if r.stats is self.final_stats:
            self.final_checked += n
        else:
            self.reads_checked += n

    def _count(self, st: Stats, r: Round) -> None:
        k = len(r.offsets)
        nw = int(np.count_nonzero(r.writes))
        st.count += k
        st.progress = st.count
        st.op_counts[WRITE] = st.op_counts.get(WRITE, 0) + nw
        st.op_counts[READ] = st.op_counts.get(READ, 0) + k - nw

    def _read_back(self, positions: np.ndarray, stats: Stats) -> Iterator[Round]:
        """Rounds reading ``positions`` back (checked against this run)."""
        D = self.wl.depth
        for at in range(0, len(positions), D):
            part = positions[at:at + D]
            r = self._round(part, np.zeros(len(part), dtype=bool), stats)
            yield r
            self._check(r)
            self._count(stats, r)

    def rounds(self) -> Iterator[Round]:
        """The rounds of this thread's run, checked as they complete."""
        if self.verify_only:
            yield from self._verify_all()
            return
        st, wl = self.st, self.wl
        L = len(self.table)
        D = min(wl.depth, L)
        limit = wl.requests or 0
        cpu0 = time.thread_time()
        start = time.perf_counter()
        deadline = start + wl.runtime
        pos = 0
        since_backlog: List[np.ndarray] = []
        nbacklog = 0
        while True:
            k = min(D, limit - st.count) if limit else D
            positions = (np.arange(pos, pos + k) % L).astype(np.int64)
            pos = (pos + k) % L
            r = self._round(positions, self.wtab[positions], st)
            yield r
            self._check(r)
            self._count(st, r)
            if self.backlog and r.writes.any():
                since_backlog.append(positions[r.writes])
                nbacklog += int(np.count_nonzero(r.writes))
                if nbacklog >= self.backlog:
                    yield from self._read_back(np.unique(np.concatenate(since_backlog)), st)
                    since_backlog.clear()
                    nbacklog = 0
            t = time.perf_counter()
            if (limit and st.count >= limit) or t >= deadline:
                break
            st.maybe_fold(t)
        st.finish(st.count, st.calls, start, cpu0)
        if self.wtab.any():
            # every block this run wrote, once more, outside the timed figures
            t0 = time.perf_counter()
            yield from self._read_back(np.flatnonzero(self.seq).astype(np.int64),
                                       self.final_stats)
            self.final_seconds = time.perf_counter() - t0
            self.final_stats.finish(self.final_stats.count, self.final_stats.calls, t0, 0.0)

    def _verify_all(self) -> Iterator[Round]:
        """--verify-only: every block of the thread's slice, in order."""
        st, wl = self.st, self.wl
        first, nblocks = wl.thread_blocks(self.thread)
        D = wl.depth
        bs = np.uint64(wl.bs)
        cpu0 = time.thread_time()
        start = time.perf_counter()
        for at in range(0, nblocks, D):
            k = min(D, nblocks - at)
            blocks = np.arange(first + at, first + at + k, dtype=np.uint64)
            r = Round(blocks * bs + np.uint64(wl.offset), np.zeros(k, dtype=bool),
                      self.bufs[:k], st)
            yield r
            self._check(r)
            self._count(st, r)
            st.maybe_fold(time.perf_counter())
        st.finish(st.count, st.calls, start, cpu0)

    def summary(self) -> Dict[str, Any]:
        return {"blocks_written": int(np.count_nonzero(self.seq)),
                "reads_checked": self.reads_checked,
                "reads_unchecked": self.reads_unchecked,
                "final_pass_blocks": self.final_checked,
                "final_pass_seconds": round(self.final_seconds, 6)}


# --------------------------------------------------------------------------
# one round through each API


def run_sync(runner: VerifyRunner, issue) -> None:
    for r in runner.rounds():
        issue(r)


async def run_async(runner: VerifyRunner, issue) -> None:
    for r in runner.rounds():
        await issue(r)


def _record(st: Stats, writes: np.ndarray, idx: Any, ns: int) -> None:
    """The reaped requests ``idx`` of a round took ``ns`` each."""
    w = writes[idx]
    nw = int(np.count_nonzero(w))
    n = len(w)
    if nw:
        st.recs[WRITE].batched.append(ns)
        st.recs[WRITE].batch_n.append(nw)
    if n - nw:
        st.recs[READ].batched.append(ns)
        st.recs[READ].batch_n.append(n - nw)


def blocking_issuer(dev):
    readinto = require(dev, "readinto", "blocking")
    write = require(dev, "write", "blocking")
    pc = time.perf_counter_ns

    def issue(r: Round) -> None:
        recs = r.stats.recs
        for i in range(len(r.offsets)):
            is_write = bool(r.writes[i])
            t0 = pc()
            (write if is_write else readinto)(int(r.offsets[i]), r.rows[i])
            recs[WRITE if is_write else READ].values.append(pc() - t0)
            r.stats.calls += 1
        r.stats.comp(1)
    return issue


def queue_issuer(dev, thread: int, poll_queues: bool):
    q = get_queue(dev, thread, poll_queues)
    wait = require(q, "wait", "queue")
    pc = time.perf_counter_ns

    def issue(r: Round) -> None:
        k = len(r.offsets)
        recs = r.stats.recs
        t0 = pc()
        for i in range(k):
            (q.write if r.writes[i] else q.read)(int(r.offsets[i]), r.rows[i], user_data=i)
        left = k
        while left:
            comps = wait(1)
            now = pc()
            r.stats.calls += 1
            r.stats.comp(len(comps))
            for c in comps:
                c.check()
                recs[WRITE if r.writes[c.user_data] else READ].values.append(now - t0)
            left -= len(comps)
    return issue


def batch_issuer(dev, thread: int, poll_queues: bool, bufs: np.ndarray):
    q = get_queue(dev, thread, poll_queues)
    submit_reads = require(q, "submit_reads", "batch")
    submit_writes = require(q, "submit_writes", "batch")
    reap = require(q, "reap", "batch")
    D, bs = bufs.shape
    region = bufs.reshape(-1)
    out = np.zeros(D, dtype=batch_dtype())
    rows = np.arange(D, dtype=np.uint64) * np.uint64(bs)
    tags = np.arange(D, dtype=np.int64)
    pc = time.perf_counter_ns

    def issue(r: Round) -> None:
        k = len(r.offsets)
        w = r.writes
        t0 = pc()
        if w.any():
            submit_writes(r.offsets[w], rows[:k][w], region=region, blocksize=bs,
                          user_data=tags[:k][w])
        if not w.all():
            submit_reads(r.offsets[~w], rows[:k][~w], region=region, blocksize=bs,
                         user_data=tags[:k][~w])
        left = k
        while left:
            n = reap(out, min=1)
            now = pc()
            r.stats.calls += 1
            r.stats.comp(n)
            rets = out["ret"][:n]
            if rets.any():
                bad = int(np.flatnonzero(rets)[0])
                err = -int(rets[bad])
                off = int(r.offsets[int(out["user_data"][bad])])
                raise OSError(err, f"I/O request at offset {off} failed")
            _record(r.stats, w, out["user_data"][:n], now - t0)
            left -= n
    return issue


def aio_issuer(adev):
    import asyncio
    readinto = require(adev, "readinto", "asyncio")
    write = require(adev, "write", "asyncio")
    pc = time.perf_counter_ns

    async def one(r: Round, i: int) -> None:
        is_write = bool(r.writes[i])
        t0 = pc()
        await (write if is_write else readinto)(int(r.offsets[i]), r.rows[i])
        r.stats.recs[WRITE if is_write else READ].values.append(pc() - t0)

    async def issue(r: Round) -> None:
        await asyncio.gather(*(one(r, i) for i in range(len(r.offsets))))
        r.stats.calls += len(r.offsets)
        r.stats.comp(1)
    return issue


def aio_batch_issuer(adev, bufs: np.ndarray):
    import asyncio
    read_batch = require(adev, "read_batch", "asyncio-batch")
    write_batch = require(adev, "write_batch", "asyncio-batch")
    D, bs = bufs.shape
    region = bufs.reshape(-1)
    rows = np.arange(D, dtype=np.uint64) * np.uint64(bs)
    pc = time.perf_counter_ns

    async def timed(fn, r: Round, mask: np.ndarray) -> None:
        t0 = pc()
        await fn(r.offsets[mask], rows[:len(mask)][mask], region=region, blocksize=bs)
        _record(r.stats, r.writes, np.flatnonzero(mask), pc() - t0)

    async def issue(r: Round) -> None:
        w = r.writes
        parts = []
        if w.any():
            parts.append(timed(write_batch, r, w))
        if not w.all():
            parts.append(timed(read_batch, r, ~w))
        await asyncio.gather(*parts)
        r.stats.calls += len(parts)
        r.stats.comp(len(r.offsets))
    return issue
