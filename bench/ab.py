#!/usr/bin/env python3
"""A/B: two builds of blkio, the same workload, interleaved in one run.

    python bench/ab.py --a .venv-before/bin/python --b .venv/bin/python \\
        [--reps 5] [--runtime 2] [--cpu 0] [--case NAME ...] [--path FILE]

Both interpreters run the *same* benchmark code (this tree's
src/blkio/_bench.py, copied with what it imports into a package of its own),
so only the library under it differs: what
a change on the hot path costs or gains, without the noise of comparing runs
made at different times on this shared machine.  Cases alternate A, B, B, A,
... so that a drift in the machine's load hits both alike; the figure is the
median IOPS of the repetitions and the ratio B/A of the medians.

Cases (4 KiB random reads on a page-cached file):
  blocking-qd1   Device.readinto, one request at a time
  queue-qd32     Queue.read + Queue.wait, 32 in flight
  batch-qd32     Queue.submit_reads + Queue.reap, 32 in flight
  batch-qd32-t2  the same with 2 threads (a queue each)
  asyncio-qd32   blkio.aio, 32 awaits in flight
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src" / "blkio"
BENCH_FILES = ("_bench.py", "_cliprops.py")     # the bench and what it imports

CASES = {
    "blocking-qd1": ["--api=blocking", "--iodepth=1"],
    "queue-qd32": ["--api=queue", "--iodepth=32"],
    "batch-qd32": ["--api=batch", "--iodepth=32"],
    "batch-qd32-t2": ["--api=batch", "--iodepth=32", "--num-threads=2"],
    "asyncio-qd32": ["--api=asyncio", "--iodepth=32"],
}


def bench_package(tmp: Path) -> Path:
    """A copy of this tree's bench code as package ``abbench`` in ``tmp``."""
    pkg = tmp / "abbench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in BENCH_FILES:
        (pkg / name).write_text((SRC / name).read_text())
    return tmp


def run_once(python: str, case: str, path: str, runtime: float, cpu: int | None,
             pkgdir: Path) -> float:
    cmd = [python, "-m", "abbench._bench", *CASES[case], "--readwrite=randread", "--blocksize=4096",
           f"--runtime={runtime}", "io_uring", f"path={path}"]
    if cpu is not None and "--num-threads=2" not in CASES[case]:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 10 + 60,
                         cwd=pkgdir)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return float(json.loads(out.stdout)["aggregate"]["kiops"]) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="python of build A (before)")
    ap.add_argument("--b", required=True, help="python of build B (after)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--runtime", type=float, default=2.0)
    ap.add_argument("--cpu", type=int, default=None, help="pin single-thread cases to this CPU")
    ap.add_argument("--case", action="append", choices=sorted(CASES))
    ap.add_argument("--path", help="file to read (default: a new 1 GiB file of random data)")
    args = ap.parse_args()
    args.a, args.b = os.path.abspath(args.a), os.path.abspath(args.b)
    cases = args.case or list(CASES)
    tmp = None
    path = args.path
    if path is None:
        tmp = tempfile.NamedTemporaryFile(prefix="blkio-ab-", suffix=".raw", delete=False)
        with open(tmp.name, "wb") as f:
            for _ in range(1024):
                f.write(os.urandom(1 << 20))
        path = tmp.name
    with open(path, "rb") as f:            # page-cache it
        while f.read(1 << 24):
            pass
    pkgdir = bench_package(Path(tempfile.mkdtemp(prefix="blkio-ab-")))
    try:
        results = {c: {"a": [], "b": []} for c in cases}
        for rep in range(args.reps):
            order = ("a", "b") if rep % 2 == 0 else ("b", "a")
            for c in cases:
                for side in order:
                    py = args.a if side == "a" else args.b
                    v = run_once(py, c, path, args.runtime, args.cpu, pkgdir)
                    results[c][side].append(v)
                    print(f"  rep {rep + 1} {c:14s} {side}: {v / 1000:8.1f}k", file=sys.stderr)
        print(f"\n| case | A median IOPS | B median IOPS | B / A | A range | B range |")
        print("|---|---:|---:|---:|---:|---:|")
        for c in cases:
            a, b = results[c]["a"], results[c]["b"]
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"| {c} | {ma / 1000:.1f}k | {mb / 1000:.1f}k | {mb / ma:.3f} | "
                  f"{min(a) / 1000:.0f}k-{max(a) / 1000:.0f}k | {min(b) / 1000:.0f}k-{max(b) / 1000:.0f}k |")
        print(json.dumps(results))
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
        shutil.rmtree(pkgdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
