"""blkio's blocking calls that ``python -m blkio bench`` has no --api for,
run by the same closed loop, with blkio-bench's CLI and JSON.

    python bench/api_loops.py KIND [--blocksize=BYTES] [--iovecs=N]
        [--requests=N] [--runtime=SECONDS] [--lat-sample=N]
        [--readwrite=read|randread] PATH

KIND is one of:
  read   Device.read(offset, blocksize): the allocating read (a new numpy
         array per request)
  readv  Device.readv(offset, bufs): vectored, --iovecs buffers of
         blocksize / iovecs bytes each, carved out of one Device.alloc()

One request at a time on an io_uring device opened read-only over PATH (the
file's page cache, no O_DIRECT). The loop is blkio._bench.closed_loop over
the same offset tables as ``--api=blocking``, so the two differ only in the
call. bench/instr.py counts these runs' instructions per request beside
``blkio bench --api=blocking`` and C ref_blocking (``--iovecs`` for readv).
"""

from __future__ import annotations

import argparse
import json
import sys

import blkio
from blkio._bench import (BenchError, OffsetRuns, Stats, Workload,
                          add_workload_arguments, closed_loop, results_json,
                          touch)

KINDS = ("read", "readv")


def run_read(dev, wl: Workload, st: Stats, args) -> None:
    read = dev.read
    bs = wl.bs
    take = OffsetRuns(wl.offsets(0).tolist()).take

    def run_n(k: int) -> None:
        for off in take(k):
            read(off, bs)

    closed_loop(run_n, st, wl, None)


def run_readv(dev, wl: Workload, st: Stats, args) -> None:
    n = args.iovecs
    if wl.bs % n:
        raise BenchError(f"--iovecs={n} does not divide --blocksize={wl.bs}")
    seg = wl.bs // n
    flat = touch(dev.alloc(wl.bs), True)
    bufs = [flat[i * seg:(i + 1) * seg] for i in range(n)]
    readv = dev.readv
    take = OffsetRuns(wl.offsets(0).tolist()).take

    def run_n(k: int) -> None:
        for off in take(k):
            readv(off, bufs)

    closed_loop(run_n, st, wl, None)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=KINDS)
    add_workload_arguments(p)
    p.add_argument("--iovecs", type=int, default=4,
                   help="readv: buffers per request (default: 4)")
    p.add_argument("path", help="the file to read (page-cached)")
    args = p.parse_args(argv)
    if args.iodepth != 1 or args.num_threads != 1:
        p.error("one request at a time: --iodepth=1 and --num-threads=1")
    if args.readwrite not in ("read", "randread"):
        p.error("reads only: --readwrite=read or randread")
    st = Stats(1)
    try:
        with blkio.open("io_uring", path=args.path, read_only=True) as dev:
            wl = Workload(args, int(dev.capacity))
            {"read": run_read, "readv": run_readv}[args.kind](dev, wl, st,
                                                              args)
    except BenchError as e:
        print(f"api_loops: {e}", file=sys.stderr)
        return 1
    print(json.dumps(results_json([st], args.blocksize), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
