"""Latency histograms for ``blkio bench``: HDR-style log-linear buckets over
nanoseconds, filled in bulk with numpy, mergeable across threads.

Values below ``2 * SUB`` ns get a bucket each; above, every power of two is
cut into ``SUB`` equal buckets, so a bucket is never wider than 1/SUB of the
values in it (0.8 %).  A percentile is the upper edge of its bucket (never
below the true value, as HdrHistogram reports), clamped to the largest value
seen; ``max`` and ``min`` are exact.

The hot path never builds the histogram request by request: a
``LatencyRecorder`` collects values in a list (per-request APIs, one int per
request) or a numpy array (the batch API, a slice per reap) and folds them
into its histogram in one vectorised pass every ``FOLD_AT`` values, and
every ``fold_every`` seconds when another thread reads the histogram while
the run goes on (a time series), at the loops' clock checks.  This module knows nothing of
devices or of the bench's options.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["SUB_BITS", "NBUCKETS", "PERCENTILES", "LatencyHistogram", "LatencyRecorder",
           "bucket_index", "bucket_bounds"]

SUB_BITS = 7
SUB = 1 << SUB_BITS
#: values from 2**47 ns (39 hours) on share the last bucket (max stays exact)
TOP_BIT = 47
LIMIT = 1 << TOP_BIT
NBUCKETS = (TOP_BIT - SUB_BITS) * SUB + SUB
#: the JSON keys and the percentiles they stand for
PERCENTILES: Tuple[Tuple[str, float], ...] = (
    ("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9), ("p99.99", 99.99))

FOLD_AT = 1 << 16          # values collected before a fold, at the latest


def bucket_index(ns: np.ndarray) -> np.ndarray:
    """The bucket of each value (int64 nanoseconds; negatives count as 0)."""
    v = np.clip(np.asarray(ns, dtype=np.int64), 0, LIMIT - 1)
    # the bit length from float64's exponent field (exact below 2**53)
    bits = (v.astype(np.float64).view(np.int64) >> 52) - 1022
    shift = np.maximum(bits - (SUB_BITS + 1), 0)
    return (shift << SUB_BITS) + (v >> shift)


def bucket_bounds(index: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) value of each bucket, in ns."""
    i = np.asarray(index, dtype=np.int64)
    shift = np.maximum((i >> SUB_BITS) - 1, 0)
    low = (i - (shift << SUB_BITS)) << shift
    return low, low + (np.int64(1) << shift) - 1


def _scalar_index(ns: int) -> int:
    if ns < 2 * SUB:
        return ns if ns > 0 else 0
    if ns >= LIMIT:
        ns = LIMIT - 1
    shift = ns.bit_length() - SUB_BITS - 1
    return (shift << SUB_BITS) + (ns >> shift)


class LatencyHistogram:
    """Counts of latencies (ns) in log-linear buckets, with exact count,
    sum, min and max.  ``merge`` adds another one in (threads, intervals)."""

    __slots__ = ("counts", "count", "total_ns", "min_ns", "max_ns")

    def __init__(self) -> None:
        self.counts = np.zeros(NBUCKETS, dtype=np.int64)
        self.count = 0
        self.total_ns = 0
        self.min_ns: Optional[int] = None
        self.max_ns = 0

    def add_values(self, ns: np.ndarray, weight: int = 1) -> None:
        """Record each value of an int64 array ``weight`` times."""
        if len(ns) == 0:
            return
        self.counts += weight * np.bincount(bucket_index(ns), minlength=NBUCKETS)
        self._extend(weight * len(ns), weight * int(ns.sum()), int(ns.min()), int(ns.max()))

    def add_weighted(self, ns: Any, weights: Any) -> None:
        """Record ``ns[i]`` ``weights[i]`` times (a whole batch of requests
        that shared one latency is one value)."""
        values = np.asarray(ns, dtype=np.int64)
        if len(values) == 0:
            return
        w = np.asarray(weights, dtype=np.int64)
        np.add.at(self.counts, bucket_index(values), w)
        # the sum as float64: values * weights may pass 2**63 (it serves the mean)
        total = int(round(float(values.astype(np.float64) @ w.astype(np.float64))))
        self._extend(int(w.sum()), total, int(values.min()), int(values.max()))

    def add(self, ns: int, n: int = 1) -> None:
        """Record one value ``n`` times (not for hot loops: use a recorder)."""
        self.counts[_scalar_index(ns)] += n
        self._extend(n, ns * n, ns, ns)

    def _extend(self, n: int, total: int, lo: int, hi: int) -> None:
        self.count += n
        self.total_ns += total
        if self.min_ns is None or lo < self.min_ns:
            self.min_ns = lo
        if hi > self.max_ns:
            self.max_ns = hi

    def merge(self, other: "LatencyHistogram") -> "LatencyHistogram":
        """Add ``other``'s values to this one; returns self."""
        self.counts += other.counts
        if other.count:
            self._extend(other.count, other.total_ns, other.min_ns or 0, other.max_ns)
        return self

    def copy(self) -> "LatencyHistogram":
        out = LatencyHistogram()
        out.merge(self)
        return out

    def since(self, earlier: "LatencyHistogram") -> "LatencyHistogram":
        """The values recorded after ``earlier`` (a copy of this histogram
        taken before): one interval of a time series.  Its min and max are
        the edges of the lowest and highest bucket used (bucket precision)."""
        out = LatencyHistogram()
        out.counts = self.counts - earlier.counts
        out.count = self.count - earlier.count
        out.total_ns = self.total_ns - earlier.total_ns
        used = np.flatnonzero(out.counts)
        if len(used):
            low, _ = bucket_bounds(used[:1])
            _, high = bucket_bounds(used[-1:])
            out.min_ns = max(int(low[0]), self.min_ns or 0)
            out.max_ns = min(int(high[0]), self.max_ns)
        return out

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0

    def percentiles(self, ps: Sequence[float]) -> List[int]:
        """The value (ns) at each percentile: the upper edge of the bucket
        holding the ``ceil(p/100 * count)``-th smallest value, within the
        exact min and max."""
        if not self.count:
            return [0 for _ in ps]
        cum = np.cumsum(self.counts)
        ranks = np.ceil(np.asarray(ps, dtype=np.float64) / 100.0 * self.count)
        ranks = np.clip(ranks, 1, self.count).astype(np.int64)
        idx = np.searchsorted(cum, ranks, side="left")
        _, high = bucket_bounds(idx)
        lo = self.min_ns or 0
        return [int(min(max(h, lo), self.max_ns)) for h in high]

    def lat_us(self) -> Dict[str, float]:
        """The JSON ``lat_us`` record: p50 ... p99.99 and max, microseconds."""
        values = self.percentiles([p for _, p in PERCENTILES])
        out = {key: round(v / 1000.0, 3) for (key, _), v in zip(PERCENTILES, values)}
        out["max"] = round(self.max_ns / 1000.0, 3)
        return out

    def cdf(self) -> Tuple[np.ndarray, np.ndarray]:
        """(upper edge of each used bucket in µs, fraction of values at or
        below it): the latency CDF, for plots."""
        used = np.flatnonzero(self.counts)
        if not len(used) or not self.count:
            return np.zeros(0), np.zeros(0)
        _, high = bucket_bounds(used)
        high = np.minimum(high, self.max_ns)
        return high / 1000.0, np.cumsum(self.counts[used]) / self.count


class LatencyRecorder:
    """One thread's latencies on their way into its histogram.

    The hot loops only append Python ints to lists (or fill a numpy slice);
    ``fold()`` turns them into latencies in a few vectorised passes.  The
    channels, one per kind of loop:

    - ``values``: latencies (ns), one per request (asyncio, samples);
    - ``batched`` / ``batch_n``: one latency shared by ``n`` requests (a
      batch awaited as one);
    - ``ring_room(n)``: a reap's latencies, written with numpy (the batch
      API when a reap returns part of what is in flight);
    - ``stamps``: clock readings, each ending a request (or a batch of
      ``stamp_weight`` requests) that started at the stamp before; a
      negative stamp (its absolute value) only starts a run.  The blocking
      API reads the clock once per request, the batch API once per reap;
    - ``submitted`` / ``reaped`` / ``reaped_n``: each completion's
      submission time, and each reap's time and count, in order (the queue
      API: times the loop has anyway, no arithmetic per request).

    ``maybe_fold(now)`` at the loop's clock checks folds every ``FOLD_AT``
    values, and every ``fold_every`` seconds once set (a time series reads
    the histogram while the run goes on: ``snapshot()``, under ``lock``).
    A fold keeps the last stamp as the start of what follows."""

    __slots__ = ("hist", "values", "batched", "batch_n", "ring", "ring_pos", "stamps",
                 "stamp_weight", "submitted", "reaped", "reaped_n", "lock", "next_fold",
                 "fold_every")

    RING = 1 << 16

    def __init__(self) -> None:
        self.hist = LatencyHistogram()
        self.values: List[int] = []
        self.batched: List[int] = []
        self.batch_n: List[int] = []
        self.ring = np.zeros(0, dtype=np.int64)      # made on first use (batch API)
        self.ring_pos = 0
        self.stamps: List[int] = []
        self.stamp_weight = 1
        self.submitted: List[int] = []
        self.reaped: List[int] = []
        self.reaped_n: List[int] = []
        self.lock = threading.Lock()
        self.next_fold = 0.0
        self.fold_every: Optional[float] = None

    def ring_room(self, n: int) -> np.ndarray:
        """A slice of ``n`` values of the ring to fill (folds a full ring)."""
        if self.ring_pos + n > len(self.ring):
            if len(self.ring) < n:
                self.ring = np.zeros(max(self.RING, 2 * n), dtype=np.int64)
            self.fold()
        pos = self.ring_pos
        self.ring_pos = pos + n
        return self.ring[pos:pos + n]

    def pending(self) -> int:
        return (len(self.values) + len(self.batched) + self.ring_pos + len(self.stamps)
                + len(self.submitted))

    def maybe_fold(self, now: float) -> None:
        """At a clock check (``now``: time.perf_counter()): fold when enough
        values wait, or (with ``fold_every``) enough time passed."""
        if self.pending() >= FOLD_AT or (self.fold_every is not None and now >= self.next_fold):
            self.fold()
            if self.fold_every is not None:
                self.next_fold = now + self.fold_every

    def fold(self) -> None:
        """Move everything collected into ``hist`` (the lists are emptied in
        place: the loops hold their bound ``append``)."""
        with self.lock:
            hist = self.hist
            if self.values:
                hist.add_values(np.array(self.values, dtype=np.int64))
                self.values.clear()
            if self.batched:
                hist.add_weighted(np.array(self.batched, dtype=np.int64),
                                  np.array(self.batch_n, dtype=np.int64))
                self.batched.clear()
                self.batch_n.clear()
            if self.ring_pos:
                hist.add_values(self.ring[:self.ring_pos])
                self.ring_pos = 0
            stamps = self.stamps
            if len(stamps) > 1:
                t = np.array(stamps, dtype=np.int64)
                ends = t[1:] > 0
                hist.add_values(t[1:][ends] - np.abs(t[:-1][ends]), self.stamp_weight)
                last = stamps[-1]
                stamps.clear()
                stamps.append(-abs(last))      # what follows starts there
            if self.submitted:
                done = np.repeat(np.array(self.reaped, dtype=np.int64),
                                 np.array(self.reaped_n, dtype=np.int64))
                hist.add_values(done - np.array(self.submitted, dtype=np.int64))
                self.submitted.clear()
                self.reaped.clear()
                self.reaped_n.clear()

    def snapshot(self) -> LatencyHistogram:
        """A copy of what is folded so far (from any thread)."""
        with self.lock:
            return self.hist.copy()


def merged(hists: Iterable[LatencyHistogram]) -> LatencyHistogram:
    """One histogram holding all of ``hists``' values."""
    out = LatencyHistogram()
    for h in hists:
        out.merge(h)
    return out
