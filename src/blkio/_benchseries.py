"""``blkio bench`` over time: the ``--log-interval`` JSON lines (requests,
IOPS, bandwidth and latency percentiles of each interval, from the threads'
counts and folded latency histograms) and the ``--plot`` picture (IOPS over
time and the latency CDF; matplotlib, the ``plot`` extra).  Reads the
threads' ``Stats`` from a thread of its own; never touches a device."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO

from ._benchloops import GiB, Stats
from ._histogram import LatencyHistogram, merged

__all__ = ["SeriesLogger", "plot", "check_plot_support"]


class SeriesLogger:
    """Every ``interval`` seconds, the figures of the interval just ended,
    kept in ``points`` and (with ``stream``) written as one JSON line each."""

    def __init__(self, stats: Sequence[Stats], interval: float, blocksize: int,
                 stream: Optional[TextIO]) -> None:
        self.stats = stats
        self.interval = interval
        self.bs = blocksize
        self.stream = stream
        self.points: List[Dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blkio-bench-series", daemon=True)
        self._start = 0.0
        self._last_t = 0.0
        self._last_n = 0
        self._last_h: Dict[str, LatencyHistogram] = {}

    def _snapshot(self) -> Dict[str, LatencyHistogram]:
        out: Dict[str, List[LatencyHistogram]] = {}
        for s in self.stats:
            for op, rec in s.recs.items():
                out.setdefault(op, []).append(rec.snapshot())
        return {op: merged(hs) for op, hs in out.items()}

    def start(self) -> None:
        # the workers fold their latencies often enough for the intervals
        for s in self.stats:
            for rec in s.recs.values():
                rec.fold_every = min(0.05, self.interval / 4)
        self._start = self._last_t = time.perf_counter()
        self._last_h = self._snapshot()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Close the interval now: one point (and line)."""
        t = time.perf_counter()
        n = sum(s.progress for s in self.stats)
        hists = self._snapshot()
        dt = t - self._last_t
        if dt <= 0:
            return
        interval = {op: h.since(self._last_h[op]) if op in self._last_h else h
                    for op, h in hists.items()}
        requests = n - self._last_n
        point: Dict[str, Any] = {
            "t": round(t - self._start, 3), "interval_s": round(dt, 3), "requests": requests,
            "kiops": round(requests / dt / 1000.0, 3),
            "gips": round(requests * self.bs / dt / GiB, 3),
            "lat_us": merged(interval.values()).lat_us()}
        if len(interval) > 1:
            for op, h in interval.items():
                point[op] = {"requests": h.count, "kiops": round(h.count / dt / 1000.0, 3),
                             "lat_us": h.lat_us()}
        self.points.append(point)
        self._last_t, self._last_n, self._last_h = t, n, hists
        if self.stream is not None:
            try:
                self.stream.write(json.dumps(point) + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                self.stream = None

    def stop(self) -> None:
        """Stop, and close the last (partial) interval if it holds requests."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if sum(s.progress for s in self.stats) > self._last_n:
            self.sample()


def check_plot_support() -> Optional[str]:
    """None if --plot can draw, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'blkio[plot]'"
    return None


def plot(path: str, points: Sequence[Dict[str, Any]], hists: Dict[str, LatencyHistogram],
         title: str) -> None:
    """IOPS over time and the latency CDF (one line per op), to ``path``
    (any format matplotlib writes: png, svg, pdf ...)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    fig.suptitle(title, fontsize=10)
    ts = [p["t"] for p in points]
    if any(op in p for p in points for op in ("read", "write")):
        for op in ("read", "write"):
            ax1.plot(ts, [p.get(op, {}).get("kiops", 0.0) for p in points], marker=".", label=op)
        ax1.legend()
    ax1.plot(ts, [p["kiops"] for p in points], marker=".", color="black",
             label="all" if len(ax1.get_lines()) else None)
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("kIOPS")
    ax1.set_ylim(bottom=0)
    ax1.set_title("IOPS over time")
    ax1.grid(alpha=0.3)
    for op, h in hists.items():
        x, y = h.cdf()
        if len(x):
            ax2.step(x, y * 100.0, where="post", label=f"{op} ({h.count:,} requests)")
    ax2.set_xscale("log")
    ax2.set_xlabel("latency (µs)")
    ax2.set_ylabel("percent of requests at or below")
    ax2.set_ylim(0, 100)
    ax2.set_title("latency CDF")
    ax2.grid(alpha=0.3, which="both")
    if hists:
        ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
