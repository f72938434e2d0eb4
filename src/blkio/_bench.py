"""``blkio bench``: libblkio's blkio-bench, through blkio's Python APIs, with
latency percentiles, mixed workloads, verification and a time series.

This module owns the command line (blkio-bench's options and ours), the
run (opening the device, one thread per ``--num-threads``, the progress
line) and the output: blkio-bench's JSON on stdout, a text summary on
stderr.  The loops and statistics are ``_benchloops``' (shared with
bench/contenders.py, which imports them from here), the verify rounds
``_benchverify``'s, the time series and plot ``_benchseries``'.  It uses
only blkio's public API, numpy, and the optional extras named in the help.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from ._benchloops import (GiB, READ, WRITE, BenchError, InflightClock, OffsetRuns, Stats,  # noqa: F401
                          UsageError, Workload, aio_thread, aio_workers, closed_loop,
                          offset_stream, require, results_json, run_blocking, run_event_loop,
                          run_batch, run_queue, run_threads, touch)
from ._cliparse import (CONNECT_TIMEOUT_HELP, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE,
                        SuggestingParser, connect_timeout_type, int_type, open_failure,
                        seconds_type)
from ._cliprops import PropertyError, check_properties, parse_properties
from ._histogram import merged
from ._sizes import format_bytes, size_type

APIS = ("batch", "queue", "blocking", "asyncio", "asyncio-batch")
PURE_PATTERNS = ("read", "write", "randread", "randwrite")
PATTERNS = PURE_PATTERNS + ("rw", "randrw")
DEFAULT_RUNTIME = 5.0

DESCRIPTION = """\
Measure a block device (or file) through blkio's Python APIs: the options and
the JSON of libblkio's blkio-bench, with fio's habits on top -- latency
percentiles of every request, mixed reads and writes, verification of what
was written, a time series and a plot.

Latency: every request is timed (its submission to its completion, as C
blkio-bench times it: one clock reading per reap on the queue and batch APIs)
into a log-linear histogram (buckets at most 0.8% wide); the JSON has the
percentiles under "lat_us" (p50, p90, p99, p99.9, p99.99, max), in
"aggregate" and for each thread, and a text summary goes to stderr.
--lat-sample=N times one request (or batch) in N instead.

Verify (--verify=KIND): every block written carries a 48-byte header (magic,
offset, generation: the run's random seed, sequence: the block's write count,
length, kind, checksum) and a pattern derived from them; every block read
back is checked, and a mismatch names the block's offset and the expected
and found header fields, and exits 1.  Threads get disjoint slices of the
region, and requests go out in rounds of --iodepth distinct blocks.  A run
that writes reads every block it wrote back at the end (outside the timed
figures); --verify-backlog=N also does so after every N blocks written.
--verify-only reads the whole region once and checks every block: the
blocks an earlier run with the same --offset, --size and --blocksize wrote
(so write all of it first, e.g. --readwrite=write --requests=BLOCKS; the
header's generation may be any run's).
crc32c and xxh64 use google-crc32c and xxhash when installed (pip install
'blkio[verify]'), else numpy versions that are much slower per block;
pattern needs neither."""

EPILOG = """\
Sizes take K, M, G, T (binary: 4K is 4096; KiB, MiB ... also work).
Exit status: 0 done, 1 runtime failure (I/O error, verify mismatch, device
missing), 2 bad command line, 130 interrupted."""

def add_workload_arguments(p: argparse.ArgumentParser, mixed: bool = False) -> None:
    """The workload options of blkio-bench (shared with bench/contenders.py,
    whose kinds read or write only: ``mixed`` adds rw/randrw and
    --rwmixread), plus --lat-sample, --loop and --requests."""
    p.add_argument("--num-threads", type=int_type(), default=1, metavar="N",
                   help="threads, one queue each (default: 1)")
    p.add_argument("--iodepth", type=int_type(), default=1, metavar="N",
                   help="requests in flight per thread (default: 1)")
    p.add_argument("--readwrite", default="read", choices=PATTERNS if mixed else PURE_PATTERNS,
                   help="access pattern; rw and randrw mix reads and writes by --rwmixread "
                        "(default: read)")
    if mixed:
        p.add_argument("--rwmixread", type=int_type(0, 100), default=None, metavar="PERCENT",
                       help="rw/randrw: the share of reads, 0 to 100 (default: 50)")
    p.add_argument("--blocksize", type=size_type(), default=4096, metavar="BYTES",
                   help="bytes per request (default: 4K)")
    p.add_argument("--runtime", type=seconds_type, default=DEFAULT_RUNTIME, metavar="SECONDS",
                   help=f"seconds (fractions allowed; default: {DEFAULT_RUNTIME:g}, where "
                        "blkio-bench takes 30: enough for a first figure; use more for "
                        "steady-state numbers)")
    p.add_argument("--requests", type=int_type(), default=None, metavar="N",
                   help="stop each thread after N requests, or at --runtime, whichever comes "
                        "first; with --iodepth > 1, at the reap that reaches N (at most one "
                        "batch more; default: no limit)")
    p.add_argument("--lat-sample", type=int_type(), default=None, metavar="N",
                   help="time one request (or batch) in N instead of every one: the "
                        "percentiles then come from that sample (default: every request)")
    p.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"),
                   help="event loop for the asyncio APIs (default: asyncio's own)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of blkio-bench, plus blkio's own (--api, --verify, ...)."""
    add_workload_arguments(p, mixed=True)
    p.add_argument("--connect-timeout", type=connect_timeout_type, default=30.0,
                   metavar="SECONDS", help=CONNECT_TIMEOUT_HELP)
    region = p.add_argument_group("region")
    region.add_argument("--offset", type=size_type(0), default=0, metavar="BYTES",
                        help="where the region starts (default: 0)")
    region.add_argument("--size", type=size_type(), default=None, metavar="BYTES",
                        help="the region's length (default: to the end of the device)")
    api = p.add_argument_group("API")
    api.add_argument("--api", default="batch", choices=APIS,
                     help="which blkio API issues the requests (default: batch): batch is "
                          "Queue.submit_reads/submit_writes + reap (numpy arrays, no Python "
                          "object per request); queue is Queue.read/write + wait; blocking "
                          "is Device.readinto/write (--iodepth 1; threads share the device); "
                          "asyncio is blkio.aio, --iodepth coroutines; asyncio-batch is "
                          "blkio.aio's read_batch/write_batch")
    api.add_argument("--buffers", default="alloc", choices=("alloc", "numpy"),
                     help="alloc: Device.alloc() (mapped, zero copy; default); numpy: plain "
                          "numpy arrays (bounced where the driver needs it; the batch API "
                          "refuses them there)")
    api.add_argument("--poll", action="store_true",
                     help="busy-poll for completions instead of waiting")
    api.add_argument("--poll-queues", action="store_true",
                     help="poll on poll queues (num_poll_queues); implies --poll")
    api.add_argument("--flush", action="store_true",
                     help="--api=blocking: each thread ends with Device.flush(), inside the "
                          "timed run")
    api.add_argument("--chunk", type=size_type(), default=None, metavar="BYTES",
                     help="--api=blocking: pass chunk=BYTES to readinto/write (the "
                          "pipelining knob for big requests)")
    api.add_argument("--chunk-depth", type=int_type(), default=None, metavar="N",
                     help="--api=blocking: pass depth=N to readinto/write (chunks in "
                          "flight for big requests)")
    ver = p.add_argument_group("verify")
    ver.add_argument("--verify", choices=("crc32c", "xxh64", "pattern"), default=None,
                     help="write blocks with a header and check every block read back")
    ver.add_argument("--verify-only", action="store_true",
                     help="read the region once and check every block (written by an "
                          "earlier --verify run); needs --verify")
    ver.add_argument("--verify-backlog", type=int_type(), default=None, metavar="N",
                     help="check the blocks written after every N of them, during the run")
    out = p.add_argument_group("output")
    out.add_argument("--log-interval", type=seconds_type, default=None, metavar="SECONDS",
                     help="write a JSON line to stderr every SECONDS: requests, kiops, gips "
                          "and lat_us of the interval (read/write apart in mixed runs); "
                          "replaces the progress line")
    out.add_argument("--plot", default=None, metavar="FILE",
                     help="draw IOPS over time and the latency CDF to FILE (png, svg, pdf; "
                          "needs matplotlib: pip install 'blkio[plot]')")
    p.add_argument("driver", help="libblkio driver, e.g. io_uring")
    p.add_argument("properties", nargs="*", metavar="property=value",
                   help="driver properties, e.g. path=/tmp/disk.img direct=1 "
                        "num-entries=256")


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.api == "blocking" and args.iodepth != 1:
        p.error("--api=blocking runs one request at a time per thread: "
                "use --iodepth=1 (and --num-threads for parallelism)")
    if args.api != "blocking" and (args.flush or args.chunk or args.chunk_depth):
        p.error("--flush, --chunk and --chunk-depth go with --api=blocking")
    mixed = args.readwrite in ("rw", "randrw")
    if args.rwmixread is not None and not mixed:
        p.error("--rwmixread goes with --readwrite=rw or randrw")
    if args.rwmixread is None:
        args.rwmixread = 50
    if args.verify_only and not args.verify:
        p.error("--verify-only needs --verify=KIND (the kind the blocks were written with)")
    if args.verify_backlog and not args.verify:
        p.error("--verify-backlog needs --verify=KIND")
    if args.verify_backlog and (args.verify_only or args.readwrite in ("read", "randread")):
        p.error("--verify-backlog checks blocks a run writes: use a write workload")
    if args.verify and args.blocksize < 64:
        p.error("--verify needs --blocksize of at least 64 (a 48-byte header and a pattern)")
    if args.verify and (args.chunk or args.chunk_depth or args.flush):
        p.error("--verify runs its own rounds: leave out --flush, --chunk and --chunk-depth")
    if args.poll_queues:
        args.poll = True


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = SuggestingParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _parse_args(argv: Sequence[str], prog: str) -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_intermixed_args(argv)
    _check_args(p, args)
    return args


# --------------------------------------------------------------------------
# the run


def _progress(stats: List[Stats], t_start: float, stop: threading.Event) -> None:
    """A progress line on a terminal: seconds, requests, and the rate since
    the start (the figure the summary gives at the end)."""
    while not stop.wait(0.5):
        t = time.perf_counter() - t_start
        n = sum(s.progress for s in stats)
        sys.stderr.write(f"\r{t:6.1f} s  {n:>12,d} requests  "
                         f"{n / t / 1000 if t > 0 else 0.0:10.1f} kIOPS ")
        sys.stderr.flush()
    sys.stderr.write("\r" + " " * 60 + "\r")
    sys.stderr.flush()


def _open_keywords(args: argparse.Namespace) -> Dict[str, Any]:
    """blkio.open()'s keywords: the properties, read_only for workloads
    that only read, the queues the API needs."""
    try:
        props = parse_properties(args.properties)
        check_properties(args.driver, props)
    except PropertyError as e:
        raise UsageError(str(e)) from None
    props.setdefault("connect_timeout", getattr(args, "connect_timeout", 30.0))
    reads_only = args.readwrite in ("read", "randread") or args.verify_only
    if reads_only:
        props.setdefault("read_only", True)
    if args.api in ("batch", "queue"):
        if args.poll_queues:
            props["num_poll_queues"] = args.num_threads
            props.setdefault("num_queues", 1)
        else:
            props["num_queues"] = args.num_threads
    return props


def _device_name(args: argparse.Namespace, props: Dict[str, Any]) -> str:
    path = props.get("path")
    return f"{args.driver} device {path}" if path else f"{args.driver} device"


class Run:
    """One ``blkio bench`` run: the parsed options, the threads' Stats, and
    the verify runners (when verifying)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.verify = args.verify is not None
        ops = ((READ, WRITE) if self.verify or args.readwrite in ("rw", "randrw")
               else (READ,) if args.readwrite in ("read", "randread") else (WRITE,))
        self.stats = [Stats(args.iodepth, ops) for _ in range(args.num_threads)]
        self.final_stats = [Stats(args.iodepth, (READ,)) for _ in range(args.num_threads)]
        self.runners: List[Any] = []
        self.fmt: Any = None
        self.series: Any = None
        self.workload: Optional[Workload] = None
        self.limits: Any = None

    # -- verify ----------------------------------------------------------

    def _runner(self, wl: Workload, thread: int, bufs: Any) -> Any:
        from ._benchverify import VerifyRunner
        r = VerifyRunner(self.fmt, wl, thread, self.stats[thread], bufs,
                         backlog=self.args.verify_backlog or 0,
                         verify_only=self.args.verify_only,
                         final_stats=self.final_stats[thread])
        self.runners.append(r)
        return r

    def _verify_sync(self, dev: Any, wl: Workload, thread: int, ready: Any) -> None:
        from . import _benchverify as bv
        from ._benchloops import make_buffers
        args = self.args
        bufs = make_buffers(dev, wl, args.buffers, wl.depth)
        if args.api == "blocking":
            issue = bv.blocking_issuer(dev)
        elif args.api == "queue":
            issue = bv.queue_issuer(dev, thread, args.poll_queues)
        else:
            issue = bv.batch_issuer(dev, thread, args.poll_queues, bufs)
        runner = self._runner(wl, thread, bufs)
        if ready is not None:
            ready.wait()
        bv.run_sync(runner, issue)

    def _verify_async(self, thread: int) -> Any:
        from . import _benchverify as bv

        async def verify(adev: Any, wl: Workload, bufs: Any) -> None:
            issue = (bv.aio_batch_issuer(adev, bufs) if self.args.api == "asyncio-batch"
                     else bv.aio_issuer(adev))
            await bv.run_async(self._runner(wl, thread, bufs), issue)
        return verify

    # -- threads -----------------------------------------------------------

    def targets(self, props: Dict[str, Any], ready: Any) -> tuple:
        """(the device or None, the threads' targets)."""
        import blkio
        args = self.args
        if args.api in ("asyncio", "asyncio-batch"):
            def aio_main(t: int) -> None:
                verify = self._verify_async(t) if self.verify else None
                run_event_loop(aio_thread(args, props, t, self.stats[t], ready, verify),
                               args.loop)
            return None, [(aio_main, t) for t in range(args.num_threads)]
        open_ = require(blkio, "open", "open")
        dev = open_(args.driver, **props)
        try:
            wl = self.workload = Workload(args, int(dev.capacity))
            self.limits = dev.limits
            wl.check_alignment(dev.limits)
        except BaseException:
            dev.close()
            raise
        if args.api == "blocking" and args.poll:
            # Busy-poll each wait until the completion arrives, as C
            # blkio-bench --poll does (bounded to 1 ms per wait).
            dev.spin_us = 1000
        if self.verify:
            return dev, [(self._verify_sync, dev, wl, t, ready)
                         for t in range(args.num_threads)]
        fn = {"blocking": run_blocking, "queue": run_queue, "batch": run_batch}[args.api]
        return dev, [(fn, dev, wl, t, self.stats[t], args, ready)
                     for t in range(args.num_threads)]

    def execute(self) -> dict:
        args = self.args
        props = _open_keywords(args)
        if self.verify:
            from ._verify import BlockFormat
            self.fmt = BlockFormat(args.verify, args.blocksize)
        ready = threading.Barrier(args.num_threads) if args.num_threads > 1 else None
        try:
            dev, targets = self.targets(props, ready)
        except (ValueError, TypeError) as e:
            raise UsageError(open_failure(_device_name(args, props), e)) from None
        except OSError as e:
            raise BenchError(open_failure(_device_name(args, props), e)) from None
        stop_progress = threading.Event()
        prog = None
        if args.log_interval or args.plot:
            from ._benchseries import SeriesLogger
            interval = args.log_interval or max(0.1, args.runtime / 100.0)
            self.series = SeriesLogger(self.stats, interval, args.blocksize,
                                       sys.stderr if args.log_interval else None)
            self.series.start()
        elif sys.stderr.isatty():
            prog = threading.Thread(target=_progress, daemon=True,
                                    args=(self.stats, time.perf_counter(), stop_progress))
            prog.start()
        try:
            run_threads(targets, ready)
        finally:
            stop_progress.set()
            if prog is not None:
                prog.join()
            if self.series is not None:
                self.series.stop()
            if dev is not None:
                dev.close()
        res = results_json(self.stats, args.blocksize)
        if self.verify:
            res["verify"] = self.verify_summary()
        return res

    def verify_summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self.fmt.describe())
        out["backlog"] = self.args.verify_backlog or 0
        out["verify_only"] = self.args.verify_only
        for key in ("blocks_written", "reads_checked", "reads_unchecked",
                    "final_pass_blocks"):
            out[key] = sum(r.summary()[key] for r in self.runners)
        out["final_pass_seconds"] = round(max((r.final_seconds for r in self.runners),
                                              default=0.0), 6)
        return out


# --------------------------------------------------------------------------
# output


def _fmt_us(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def summary_lines(args: argparse.Namespace, res: dict) -> List[str]:
    """The text summary (stderr): the workload, then IOPS, bandwidth and
    percentiles, per op in a mixed run."""
    agg = res["aggregate"]
    props = " ".join(args.properties)
    threads = f"{args.num_threads} thread{'s' if args.num_threads > 1 else ''}"
    what = ("verify-only" if args.verify_only else args.readwrite
            + (f" {args.rwmixread}% reads" if args.readwrite in ("rw", "randrw") else ""))
    lines = [f"{args.driver} {props}: {what}, {format_bytes(args.blocksize)} blocks, "
             f"iodepth {args.iodepth}, {threads}, {args.api} API"
             + (f", --verify={args.verify}" if args.verify else "")]

    def line(name: str, d: dict) -> str:
        lat = d["lat_us"]
        pct = ", ".join(f"{k} {_fmt_us(v)}" for k, v in lat.items())
        iops = d["kiops"] * 1000
        rate = f"{iops / 1e6:.2f}M" if iops >= 1e6 else f"{iops / 1e3:.1f}k" \
            if iops >= 1e3 else f"{iops:.0f}"
        mib = d["gips"] * 1024
        return (f"  {name:5s} {rate} IOPS, {mib:.1f} MiB/s; latency µs: {pct}")
    ops = [op for op in (READ, WRITE) if op in agg]
    if ops:
        for op in ops:
            lines.append(line(op, agg[op]))
    else:
        reads = args.verify_only or args.readwrite in ("read", "randread")
        lines.append(line(READ if reads else WRITE, agg))
    if "verify" in res:
        v = res["verify"]
        text = (f"  verify {v['kind']} ({v['checksum']}): {v['reads_checked']} reads checked"
                + (f", {v['reads_unchecked']} unchecked (blocks not yet written)"
                   if v["reads_unchecked"] else ""))
        if v["blocks_written"]:
            text += (f"; {v['blocks_written']} blocks written, all read back and checked in "
                     f"{v['final_pass_seconds']:.2f} s")
        lines.append(text + ": no mismatch")
    return lines


def _run_and_print(args: argparse.Namespace, prog: str) -> int:
    mismatch: tuple = ()
    if args.verify:
        from ._verify import VerifyMismatch
        mismatch = (VerifyMismatch,)
    if args.plot:
        from ._benchseries import check_plot_support
        why = check_plot_support()
        if why:
            print(f"{prog}: {why}", file=sys.stderr)
            return EXIT_FAILURE
    run = Run(args)
    try:
        res = run.execute()
    except mismatch as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except UsageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BenchError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, ValueError, TypeError) as e:
        print(f"{prog}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        print(json.dumps(res, indent=2))
        sys.stdout.flush()
        print("\n".join(summary_lines(args, res)), file=sys.stderr)
    except BrokenPipeError:
        pass
    if args.plot:
        from ._benchseries import plot
        hists = {op: merged(s.histogram(op) for s in run.stats if s.op_counts.get(op))
                 for op in run.stats[0].recs}
        hists = {op: h for op, h in hists.items() if h.count}
        plot(args.plot, run.series.points if run.series else [], hists,
             summary_lines(args, res)[0])
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, prog: str = "blkio bench") -> int:
    """``blkio bench ARGS``: returns the exit status (argparse exits 2 on a
    bad command line)."""
    if argv is None:
        argv = sys.argv[1:]
    return _run_and_print(_parse_args(argv, prog), prog)


if __name__ == "__main__":
    sys.exit(main())
