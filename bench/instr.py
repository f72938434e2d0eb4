#!/usr/bin/env python3
"""Instructions per request: every blkio path beside the C program doing the
same and the Python floor, counted by callgrind; the budget those counts are
held to; where each path's instructions go.

    make bench-instr                      # every row, table + JSON (~15 min)
    make bench-instr BENCH_INSTR_ARGS="--only 'blocking|batch' --repeat 2"
    .venv/bin/python bench/instr.py --budgeted --write-budget   # new budget
    .venv/bin/python bench/instr.py --budgeted --profile DIR    # by function
    .venv/bin/python bench/instr.py --list

The figure: user-space instructions of the whole process under ``valgrind
--tool=callgrind --cache-sim=no --branch-sim=no`` (OPENBLAS_NUM_THREADS=1:
numpy's OpenBLAS threads otherwise spin and the counts swing by 2x;
PYTHONHASHSEED=0 and no .pyc writing, so two runs differ only in their
size), per unit of work = (total at size N2 - total at N1) / (units done at
N2 - at N1): start-up and teardown cancel. Python programs run a fixed
number of requests (``--requests=N``); the C programs are timed, so their
units are ``calls x mean_completions`` from their JSON (their kiops is
meaningless under valgrind), differenced between ``--runtime=1`` and 3.

Beside each blkio path (ROWS below): the C program doing the same
(bench/ref_blocking.c, libblkio's blkio-bench and blkio-copy), and the
Python floor: the Python calls the path makes per unit (one per request for
the blocking calls; enqueue + wait for the queue API; submit + reap per
batch) times the cost of one call in a bare loop (``contenders.py call``:
the blocking API's closed loop calling ``operator.is_``, a builtin C
function of two arguments that does nothing); for asyncio, a bare future
round trip on the same loop (``contenders.py ping``). Every row says
ours, C, floor and (ours - floor) / C.

Output: bench/results/instr-<time>.json and .md (``--docs`` also writes
docs/instructions.md), and the table on stdout. ``--write-budget`` stores
the budgeted rows' figures in bench/instr-budget.json, which
tests/test_instr_budget.py holds each path to (within 3% either way).
``--profile DIR`` keeps the callgrind files of blkio's runs and splits each
row's instructions per unit by object (binding, libblkio, libpython, numpy,
libc, ...) and function (``callgrind_annotate --inclusive=no`` of both
runs, differenced).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import dataclasses
import datetime
import glob
import json
import mmap
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _load_bench_run():
    """bench/run.py (the suite's C builds, files, daemon), as the module
    ``bench_run`` (the name tests/test_bench_suite.py loads it under)."""
    mod = sys.modules.get("bench_run")
    if mod is None:
        import importlib.util
        spec = importlib.util.spec_from_file_location("bench_run",
                                                      HERE / "run.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_run"] = mod      # dataclasses look it up
        spec.loader.exec_module(mod)
    return mod


bench_run = _load_bench_run()

BUDGET_FILE = HERE / "instr-budget.json"
DOCS_FILE = ROOT / "docs" / "instructions.md"
TOLERANCE = 0.03
MiB = 1 << 20
IMAGE_MIB = 256          # the random-read file (offsets stay one-digit ints)
BIG_MIB = 1024           # the sequential-read file, also the large copy's input
VALGRIND = ["valgrind", "--tool=callgrind", "--cache-sim=no",
            "--branch-sim=no"]
CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
             "PYTHONDONTWRITEBYTECODE": "1"}
RUN_TIMEOUT = 1200       # seconds for one run under valgrind


class InstrError(Exception):
    """A run that failed or gave figures that cannot be used."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# what is measured


@dataclasses.dataclass(frozen=True)
class Program:
    """One command, run under callgrind at two sizes.

    ``kind`` says what a size is and how the units done are counted:
    requests -- ``--requests=N`` of a Python bench (units: its JSON's count);
    seconds  -- ``--runtime=N`` of a C bench (units: calls x completions);
    bytes    -- ``--requests=N`` calls of ``--blocksize`` bytes (units: MiB);
    copy     -- a copy of an N MiB file (units: MiB)."""
    key: str
    kind: str
    sizes: tuple
    args: tuple          # the command, with {py} {image} {n} ... to fill in
    backend: str = "file"  # file, vhost (the daemon's export), copy

    def argv(self, env: "Env", n: int) -> List[str]:
        fill = env.fill(n)
        return [a.format(**fill) for a in self.args]


PY_BENCH = ("{py}", "-m", "blkio", "bench", "--readwrite=randread",
            "--requests={n}", "--runtime=600", "--lat-sample=1000000000")
FILE_DEV = ("io_uring", "path={image}")
VHOST_DEV = ("virtio-blk-vhost-user", "path={vhost_sock}")
C_TIMED = ("--readwrite=randread", "--runtime={n}")
CONTENDER = ("{py}", "{bench}/contenders.py")
LOOPS = ("{py}", "{bench}/api_loops.py")
PY_N = (20000, 60000)          # blocking-style paths, per-request sizes
AIO_N = (3200, 9600)           # asyncio per request (about 10x dearer)
BATCH_N = (32000, 160000)      # batch paths (about 500 instructions each)
C_S = (1, 3)

P = {p.key: p for p in [
    Program("blkio blocking", "requests", PY_N,
            PY_BENCH + ("--api=blocking",) + FILE_DEV),
    Program("blkio queue QD32", "requests", PY_N,
            PY_BENCH + ("--api=queue", "--iodepth=32") + FILE_DEV),
    Program("blkio batch QD32", "requests", BATCH_N,
            PY_BENCH + ("--api=batch", "--iodepth=32") + FILE_DEV),
    Program("blkio asyncio QD32", "requests", AIO_N,
            PY_BENCH + ("--api=asyncio", "--iodepth=32") + FILE_DEV),
    Program("blkio asyncio QD32 uvloop", "requests", AIO_N,
            PY_BENCH + ("--api=asyncio", "--iodepth=32", "--loop=uvloop")
            + FILE_DEV),
    Program("blkio asyncio batch QD32", "requests", BATCH_N,
            PY_BENCH + ("--api=asyncio-batch", "--iodepth=32") + FILE_DEV),
    Program("blkio Device.read", "requests", PY_N,
            LOOPS + ("read", "--readwrite=randread", "--requests={n}",
                     "--runtime=600", "--lat-sample=1000000000", "{image}")),
    Program("blkio Device.readv 4 iovecs", "requests", PY_N,
            LOOPS + ("readv", "--iovecs=4", "--readwrite=randread",
                     "--requests={n}", "--runtime=600",
                     "--lat-sample=1000000000", "{image}")),
    Program("blkio blocking vhost-user", "requests", PY_N,
            PY_BENCH + ("--api=blocking",) + VHOST_DEV, backend="vhost"),
    Program("blkio batch QD32 vhost-user", "requests", BATCH_N,
            PY_BENCH + ("--api=batch", "--iodepth=32") + VHOST_DEV,
            backend="vhost"),
    Program("blkio 1 GiB read", "bytes", (1, 17),
            ("{py}", "-m", "blkio", "bench", "--api=blocking",
             "--readwrite=read", f"--blocksize={BIG_MIB * MiB}",
             "--requests={n}", "--runtime=600", "--lat-sample=1000000000",
             "io_uring", "path={big}")),
    Program("blkio copy", "copy", (IMAGE_MIB, BIG_MIB),
            ("{py}", "-m", "blkio", "copy", "--progress=none", "--json",
             "--input-file={copy_in}", "--output-file={copy_out}"),
            backend="copy"),
    # the C programs doing the same
    Program("C ref_blocking", "seconds", C_S,
            ("{c_ref}",) + C_TIMED + FILE_DEV),
    Program("C ref_blocking --iovecs=4", "seconds", C_S,
            ("{c_ref}", "--iovecs=4") + C_TIMED + FILE_DEV),
    Program("C blkio-bench QD32", "seconds", C_S,
            ("{c_bench}", "--iodepth=32") + C_TIMED + FILE_DEV),
    Program("C ref_blocking vhost-user", "seconds", C_S,
            ("{c_ref}",) + C_TIMED + VHOST_DEV, backend="vhost"),
    Program("C blkio-bench QD32 vhost-user", "seconds", C_S,
            ("{c_bench}", "--iodepth=32") + C_TIMED + VHOST_DEV,
            backend="vhost"),
    Program("C blkio-bench 1 MiB QD8", "seconds", C_S,
            ("{c_bench}", "--readwrite=read", f"--blocksize={MiB}",
             "--iodepth=8", "--runtime={n}", "io_uring", "path={big}")),
    Program("C blkio-copy", "copy", (IMAGE_MIB, BIG_MIB),
            ("{c_copy}", "--input-blkio=io_uring", "path={copy_in}",
             "direct=true", "--output-blkio=io_uring", "path={copy_out}",
             "direct=true"), backend="copy"),
    # the Python floors
    Program("bare call loop", "requests", PY_N,
            CONTENDER + ("call", "--readwrite=randread", "--requests={n}",
                         "--runtime=600", "--lat-sample=1000000000")),
    Program("bare future ping QD32", "requests", AIO_N,
            CONTENDER + ("ping", "--iodepth=32", "--requests={n}",
                         "--runtime=600", "--lat-sample=1000000000")),
    Program("bare future ping QD32 uvloop", "requests", AIO_N,
            CONTENDER + ("ping", "--iodepth=32", "--loop=uvloop",
                         "--requests={n}", "--runtime=600",
                         "--lat-sample=1000000000")),
]}


def _one(res: dict) -> float:
    return 1.0


def _enqueue_and_wait(res: dict) -> float:
    """The queue API: one read() per request, one wait() per reap."""
    return 1.0 + res["calls"] / res["units"]


def _submit_and_reap(res: dict) -> float:
    """The batch API: one submit and one reap per batch."""
    return 2.0 * res["calls"] / res["units"]


def _per_call(res: dict) -> float:
    """One call per ``calls``."""
    return res["calls"] / res["units"]


@dataclasses.dataclass(frozen=True)
class Row:
    """A line of the table: a blkio path, the C program doing the same, and
    the Python floor (``floor`` program's figure x ``floor_calls(ours at
    N2)``: how many of the floor's units the path needs per unit)."""
    key: str                # the budget's name for it
    title: str
    unit: str               # "request" or "MiB"
    ours: str               # Program keys
    c: Optional[str]
    floor: Optional[str]
    floor_calls: Callable[[dict], float] = _one
    floor_note: str = ""
    c_note: str = ""
    budgeted: bool = False
    main: bool = False      # the six paths: what `make bench` runs


ROWS = [
    Row("blocking-qd1", "blocking QD1 (Device.readinto)", "request",
        "blkio blocking", "C ref_blocking", "bare call loop",
        floor_note="1 call", budgeted=True, main=True),
    Row("queue-qd32", "queue API QD32 (Queue.read + wait)", "request",
        "blkio queue QD32", "C blkio-bench QD32", "bare call loop",
        _enqueue_and_wait, "read + wait per reap", budgeted=True,
        main=True),
    Row("batch-qd32", "batch QD32 (submit_reads + reap)", "request",
        "blkio batch QD32", "C blkio-bench QD32", "bare call loop",
        _submit_and_reap, "submit + reap per batch", budgeted=True,
        main=True),
    Row("asyncio-qd32", "asyncio per request QD32, asyncio's loop",
        "request", "blkio asyncio QD32", "C blkio-bench QD32",
        "bare future ping QD32", floor_note="future round trip",
        budgeted=True, main=True),
    Row("asyncio-uvloop-qd32", "asyncio per request QD32, uvloop", "request",
        "blkio asyncio QD32 uvloop", "C blkio-bench QD32",
        "bare future ping QD32 uvloop", floor_note="future round trip",
        budgeted=True, main=True),
    Row("asyncio-batch-qd32", "asyncio batch QD32 (await read_batch, "
        "done during submission)", "request", "blkio asyncio batch QD32",
        "C blkio-bench QD32", "bare call loop", _submit_and_reap,
        "submit + reap per batch", budgeted=True, main=True),
    Row("read-qd1", "Device.read QD1 (allocating)", "request",
        "blkio Device.read", "C ref_blocking", "bare call loop",
        floor_note="1 call"),
    Row("readv-qd1", "Device.readv QD1, 4 x 1 KiB", "request",
        "blkio Device.readv 4 iovecs", "C ref_blocking --iovecs=4",
        "bare call loop", floor_note="1 call"),
    Row("vhost-blocking-qd1", "vhost-user blocking QD1", "request",
        "blkio blocking vhost-user", "C ref_blocking vhost-user",
        "bare call loop", floor_note="1 call"),
    Row("vhost-batch-qd32", "vhost-user batch QD32", "request",
        "blkio batch QD32 vhost-user", "C blkio-bench QD32 vhost-user",
        "bare call loop", _submit_and_reap, "submit + reap per batch"),
    Row("read-1g", "1 GiB pipelined read (one readinto)", "MiB",
        "blkio 1 GiB read", "C blkio-bench 1 MiB QD8", "bare call loop",
        _per_call, "1 call per GiB"),
    Row("copy", "blkio copy, file to file (O_DIRECT)", "MiB", "blkio copy",
        "C blkio-copy", None, floor_note="-",
        c_note="nearly all of it the memcpy between its two devices' "
        "regions: valgrind counts each byte of a `rep movsb`"),
]
ROW_BY_KEY = {r.key: r for r in ROWS}


def programs_of(rows: Sequence[Row],
                parts: Sequence[str] = ("ours", "c", "floor")) -> List[str]:
    keys: List[str] = []
    for r in rows:
        for part in ("ours", "c", "floor"):
            k = getattr(r, part)
            if k and part in parts and k not in keys:
                keys.append(k)
    return keys


# --------------------------------------------------------------------------
# the environment: files, C builds, the daemon


class PinnedFile:
    """A file's pages held in the page cache (mmap + mlock) while the runs
    read it. This machine reclaims pages idle for about a minute, and a read
    that misses the cache completes later instead of inside the submission:
    then reaps come back partial, and the queue, batch and asyncio paths run
    other code (a batch run's total moved by 14 million instructions between
    two identical runs so). Without the privilege to lock (not root, small
    RLIMIT_MEMLOCK) ``locked`` is False and the runs only warm the file."""

    def __init__(self, path: Path):
        self.size = path.stat().st_size
        self.addr = None
        self.locked = False
        self.why = ""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc = libc
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED,
                             fd, 0)
        finally:
            os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            self.why = f"mmap: {os.strerror(ctypes.get_errno())}"
            return
        self.addr = addr
        if libc.mlock(addr, self.size) == 0:
            self.locked = True
        else:
            self.why = f"mlock: {os.strerror(ctypes.get_errno())}"

    def release(self) -> None:
        if self.addr is not None:
            self.libc.munmap(self.addr, self.size)     # unlocks too
            self.addr = None
            self.locked = False


class Env:
    """Files and programs the rows run against, in ``tmpdir``. ``image``
    may be given (the budget test passes its own page-cached file)."""

    def __init__(self, tmpdir: Path, python: str = sys.executable,
                 image: Optional[Path] = None):
        self.tmpdir = tmpdir
        self.python = python
        self.image = image or tmpdir / "instr.img"
        self.big = tmpdir / "instr-big.img"
        self.c: Dict[str, Path] = {}
        self.qsd = None
        self.missing: Dict[str, str] = {}     # backend or program -> why not
        self.pinned: List[PinnedFile] = []
        self.procs: set = set()               # the valgrind runs going on

    def prepare(self, programs: Sequence[Program]) -> None:
        if not shutil.which("valgrind"):
            raise InstrError("valgrind is not installed (apt-get install "
                             "valgrind)")
        needs = {a for p in programs for a in p.args}
        for name, src in (("c_ref", HERE / "ref_blocking.c"),
                          ("c_bench", bench_run.EXAMPLES / "blkio-bench.c"),
                          ("c_copy", bench_run.EXAMPLES / "blkio-copy.c")):
            if "{%s}" % name in needs:
                try:
                    self.c[name] = bench_run.compile_c(
                        bench_run.BUILD / src.stem, src)
                except (subprocess.CalledProcessError, OSError) as e:
                    self.missing[name] = f"{src.name} did not compile ({e})"
        if not self.image.exists():
            bench_run.make_image(self.image, IMAGE_MIB * MiB, cache=True)
        files = [self.image]
        if any("{big}" in p.args or p.backend == "copy" for p in programs):
            if not self.big.exists():
                bench_run.make_image(self.big, BIG_MIB * MiB, cache=True)
            files.append(self.big)
        for f in files:
            pin = PinnedFile(f)
            self.pinned.append(pin)
            if not pin.locked:
                log(f"  {f}: pages not locked in the page cache ({pin.why}): "
                    "partial reaps may make the figures swing")
        if any(p.backend == "vhost" for p in programs):
            target = self.tmpdir / "qsd-target.img"
            target.write_bytes(b"\0" * MiB)
            self.qsd = bench_run.StorageDaemon(self.image, target,
                                               self.tmpdir)
            try:
                self.qsd.start()
            except (RuntimeError, OSError) as e:
                self.missing["vhost"] = f"qemu-storage-daemon: {e}"
                self.qsd.stop()
                self.qsd = None

    def stop(self) -> None:
        for proc in list(self.procs):      # interrupted: our runs end too
            proc.kill()
            proc.wait()
        if self.qsd is not None:
            self.qsd.stop()
            self.qsd = None
        for pin in self.pinned:
            pin.release()
        self.pinned = []

    @property
    def pages_locked(self) -> bool:
        return bool(self.pinned) and all(p.locked for p in self.pinned)

    def fill(self, n: int) -> Dict[str, str]:
        return {"py": self.python, "bench": str(HERE), "n": str(n),
                "image": str(self.image), "big": str(self.big),
                "copy_in": str(self.image if n == IMAGE_MIB else self.big),
                "copy_out": str(self.tmpdir / f"copy-out-{n}.img"),
                "vhost_sock": str(self.qsd.sock) if self.qsd else "",
                **{k: str(v) for k, v in self.c.items()}}

    def why_not(self, prog: Program) -> Optional[str]:
        for name, why in self.missing.items():
            if "{%s}" % name in prog.args or name == prog.backend:
                return why
        return None

    def before_run(self, prog: Program, n: int) -> None:
        """Page-cached inputs stay cached (the machine reclaims idle pages
        within minutes, and a read that misses the cache completes
        asynchronously: other code, other counts); a copy's output exists
        at its size, as blkio-copy needs."""
        if prog.backend == "copy":
            out = self.tmpdir / f"copy-out-{n}.img"
            with open(out, "ab") as f:
                f.truncate(n * MiB)
            return
        bench_run.warm(self.image)
        if "{big}" in prog.args:
            bench_run.warm(self.big)


# --------------------------------------------------------------------------
# running under callgrind


def child_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LD_PRELOAD")}
    env.update(CHILD_ENV)
    return env


def callgrind_total(out_files: Sequence[str]) -> int:
    """The Ir total of a run (summed over its files: a forked child writes
    one of its own)."""
    total = 0
    for f in out_files:
        found = None
        with open(f, errors="replace") as fh:
            for line in fh:
                if line.startswith(("summary:", "totals:")):
                    found = int(line.split()[1])
        if found is None:
            raise InstrError(f"{f}: no totals line")
        total += found
    return total


def units_done(prog: Program, n: int, out: str) -> tuple:
    """(units, calls, exact, the JSON's aggregate) from a run's stdout.

    The count is ``calls x mean_completions``: blkio-bench's ``calls``
    counts every reaping call, those that reaped nothing too (after each
    wake-up it reaps until a call returns 0), while min/max_completions see
    only the calls that reaped some, so min = max does not make the count
    calls x min. The mean has two decimals: the count is off by at most
    calls / 200 -- except for a Python bench run to ``--requests=N`` whose
    every reap was whole, which did exactly N."""
    if prog.kind == "copy":
        return float(n), 0, True, {}
    try:
        agg = json.loads(out[out.index("{"):])["aggregate"]
    except (ValueError, KeyError) as e:
        raise InstrError(f"{prog.key}: no blkio-bench JSON in its output "
                         f"({e}): {out[-300:]!r}")
    calls = int(agg["calls"])
    mean = float(agg["mean_completions"])
    count, exact = calls * mean, mean == 1.0
    if prog.kind == "requests" and count < n - calls * 0.005:
        raise InstrError(f"{prog.key}: {count:.0f} requests done of {n} "
                         "asked (the run hit its --runtime)")
    if (prog.kind == "requests" and abs(count - n) <= calls * 0.005 and
            agg["min_completions"] == agg["max_completions"] == mean):
        count, exact = float(n), True
    if prog.kind == "bytes":
        block = int(next(a.split("=")[1] for a in prog.args
                         if a.startswith("--blocksize=")))
        return count * block / MiB, calls, exact, agg
    return count, calls, exact, agg


def estimate_s(prog: Program, n: int) -> float:
    """Rough seconds of one run under callgrind on this machine (start-up
    about 15 s), to order the runs."""
    if prog.kind == "seconds":
        return 15.0 + n
    if prog.kind == "copy":
        return 20.0 + n / 100
    if prog.kind == "bytes":
        return 20.0 + 3 * n
    return 15.0 + n * (5e-3 if "asyncio" in prog.key or "ping" in prog.key
                       else 2.5e-4)


def run_once(env: Env, prog: Program, n: int, out_dir: Path,
             tag: str, keep: bool = False) -> dict:
    """One run under callgrind: its total, units and command (and its
    callgrind files, when ``keep``)."""
    argv = prog.argv(env, n)
    stem = out_dir / f"{re.sub(r'[^A-Za-z0-9]+', '-', prog.key)}-{n}-{tag}"
    for old in glob.glob(f"{stem}.*"):
        os.unlink(old)
    env.before_run(prog, n)
    cmd = VALGRIND + [f"--callgrind-out-file={stem}.%p.out"] + argv
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=env.tmpdir)
    env.procs.add(proc)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise InstrError(f"{prog.key} at {n}: no end after {RUN_TIMEOUT} s")
    finally:
        env.procs.discard(proc)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-8:])
        raise InstrError(f"{prog.key} at {n}: exit {proc.returncode}:\n"
                         f"{tail}")
    files = sorted(glob.glob(f"{stem}.*.out"))
    units, calls, exact, agg = units_done(prog, n, out)
    total = callgrind_total(files)
    if not keep:
        for f in files:
            os.unlink(f)
        files = []
    return {"size": n, "instructions": total, "units": units, "calls": calls,
            "exact": exact, "aggregate": agg, "wall_s": round(wall, 1),
            "files": files, "argv": argv}


def measure(env: Env, keys: Sequence[str], jobs: int = 2, repeat: int = 1,
            out_dir: Optional[Path] = None) -> Dict[str, dict]:
    """Each program's figure per unit (the mean of ``repeat`` pairs of
    runs), with every run's raw figures. ``jobs`` runs at a time (the
    daemon's export serves one client at a time: its runs go one by one).
    With ``out_dir`` the callgrind files stay there (for ``profile``)."""
    keep = out_dir is not None
    out_dir = out_dir or env.tmpdir
    progs = [P[k] for k in keys]
    results: Dict[str, dict] = {}
    todo = []
    for p in progs:
        why = env.why_not(p)
        if why:
            results[p.key] = {"error": why, "skipped": True}
            continue
        for rep in range(repeat):
            for n in p.sizes:
                todo.append((p, n, rep))
    # the longest first, so that the pool's runs end together
    todo.sort(key=lambda t: -estimate_s(t[0], t[1]))
    runs: Dict[tuple, dict] = {}
    vhost_lock = threading.Lock()
    errors: Dict[str, str] = {}

    def one(p: Program, n: int, rep: int) -> None:
        if p.key in errors:
            return
        try:
            if p.backend == "vhost":
                with vhost_lock:
                    r = run_once(env, p, n, out_dir, f"r{rep}", keep)
            else:
                r = run_once(env, p, n, out_dir, f"r{rep}", keep)
        except InstrError as e:
            errors.setdefault(p.key, str(e))
            log(f"  {p.key} at {n}: FAILED: {e}")
            return
        runs[(p.key, n, rep)] = r
        log(f"  {p.key} at {n}: {r['instructions']:,} instructions, "
            f"{r['units']:g} units, {r['wall_s']} s")

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        for f in [pool.submit(one, *t) for t in todo]:
            f.result()
    except BaseException:       # Ctrl-C, SIGTERM: end the runs going on
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(env.procs):
            proc.kill()
        raise
    finally:
        pool.shutdown(wait=True)
    for p in progs:
        if p.key in results:
            continue
        if p.key in errors:
            results[p.key] = {"error": errors[p.key]}
            continue
        reps = []
        for rep in range(repeat):
            a, b = (runs[(p.key, n, rep)] for n in p.sizes)
            du = b["units"] - a["units"]
            if du <= 0:
                results[p.key] = {"error": f"no more units at {b['size']} "
                                           f"than at {a['size']}"}
                break
            reps.append({"per_unit": (b["instructions"] - a["instructions"])
                         / du, "runs": [a, b]})
        else:
            figs = [r["per_unit"] for r in reps]
            mean = sum(figs) / len(figs)
            results[p.key] = {
                "per_unit": mean, "by_rep": figs,
                "spread": (max(figs) - min(figs)) / mean if mean else 0.0,
                "exact": all(r["exact"] for x in reps for r in x["runs"]),
                "reps": reps}
    return results


def evaluate(rows: Sequence[Row], figs: Dict[str, dict]) -> List[dict]:
    """Each row's ours, C, floor and (ours - floor) / C."""
    out = []
    for row in rows:
        ours = figs.get(row.ours, {})
        d: dict = {"key": row.key, "title": row.title, "unit": row.unit,
                   "ours_program": row.ours, "c_program": row.c,
                   "floor_program": row.floor, "floor_note": row.floor_note,
                   "c_note": row.c_note,
                   "ours": ours.get("per_unit"), "ours_error": ours.get("error"),
                   "ours_spread": ours.get("spread"),
                   "ours_by_rep": ours.get("by_rep")}
        if row.c:
            c = figs.get(row.c, {})
            d.update(c=c.get("per_unit"), c_error=c.get("error"),
                     c_spread=c.get("spread"))
        if row.floor and ours.get("per_unit") is not None:
            fl = figs.get(row.floor, {})
            last = ours["reps"][0]["runs"][1]
            calls = row.floor_calls(last)
            if fl.get("per_unit") is not None:
                d.update(floor=fl["per_unit"] * calls, floor_calls=calls,
                         floor_per_call=fl["per_unit"])
            else:
                d.update(floor_error=fl.get("error"))
        if d.get("ours") is not None and d.get("c") and \
                (d.get("floor") is not None or not row.floor):
            d["over_c"] = (d["ours"] - (d.get("floor") or 0.0)) / d["c"]
        out.append(d)
    return out


# --------------------------------------------------------------------------
# profiles: instructions per unit by function and object


_NAMED = re.compile(r"\((\d+)\)(?: (.*))?")


def exclusive_costs(files: Sequence[str]) -> Dict[tuple, int]:
    """{(function, object): exclusive Ir} of one run, its files summed: what
    ``callgrind_annotate --inclusive=no`` lists, read from the files
    themselves because callgrind_annotate merges functions of one name
    across objects (every Cython module has its own ``__Pyx_*`` helpers).
    Recursion levels (``fn'2``) count as their function."""
    out: Dict[tuple, int] = {}
    for f in files:
        names: Dict[str, Dict[str, str]] = {"ob": {}, "fl": {}, "fn": {}}
        space = {"ob": "ob", "cob": "ob", "fl": "fl", "fi": "fl", "fe": "fl",
                 "cfi": "fl", "cfl": "fl", "fn": "fn", "cfn": "fn"}
        ob = fn = ""
        skip_next = False
        key = None
        with open(f, errors="replace") as fh:
            for line in fh:
                c = line[:1]
                if c.isdigit() or c in "+-*":
                    if skip_next:          # the inclusive cost of a call
                        skip_next = False
                        continue
                    parts = line.split()
                    if len(parts) > 1 and key is not None:
                        out[key] = out.get(key, 0) + int(parts[1])
                    continue
                if "=" not in line:
                    continue
                tag, _, val = line.rstrip("\n").partition("=")
                if tag == "calls":
                    skip_next = True
                    continue
                if tag not in space:
                    continue
                m = _NAMED.match(val)
                table = names[space[tag]]
                if m:
                    if m.group(2) is not None:
                        table[m.group(1)] = m.group(2)
                    val = table.get(m.group(1), val)
                if tag == "ob":
                    ob = val
                elif tag == "fn":
                    fn = re.sub(r"'\d+$", "", val)
                    key = (fn, ob)
    return out


def object_group(obj: str) -> str:
    name = os.path.basename(obj)
    if "/bench/.build/" in obj:
        return "program (" + name + ")"
    if "/blkio/" in obj and ".so" in name:
        return "binding (" + name.split(".")[0] + ")"
    if name.startswith("libblkio"):
        return "libblkio"
    if name.startswith("libpython") or re.fullmatch(r"python3[.\d]*", name):
        return "libpython"
    if "lib-dynload" in obj:
        return "CPython C modules (" + name.split(".")[0] + ")"
    if "/numpy" in obj:
        return "numpy"
    if "uvloop" in obj:
        return "uvloop"
    if re.match(r"libc[.-]", name):
        return "libc"
    return "other (" + name + ")"


def profile(fig: dict) -> dict:
    """Per unit, by object group and by function, from the first pair."""
    a, b = fig["reps"][0]["runs"]
    du = b["units"] - a["units"]
    pa, pb = exclusive_costs(a["files"]), exclusive_costs(b["files"])
    per = {k: (pb.get(k, 0) - pa.get(k, 0)) / du for k in set(pa) | set(pb)}
    groups: Dict[str, float] = {}
    for (fn, obj), v in per.items():
        g = object_group(obj)
        groups[g] = groups.get(g, 0.0) + v
    funcs = sorted(((v, fn, object_group(obj)) for (fn, obj), v in per.items()
                    if abs(v) >= 0.05), reverse=True)
    return {"by_object": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "top_functions": [{"function": fn, "object": g, "per_unit": v}
                              for v, fn, g in funcs[:20]],
            "total": sum(per.values())}


def python_calls(env: Env, prog: Program, top: int = 15) -> dict:
    """Python-level calls per unit, by function (bench/pycalls.py at both
    sizes, natively: call counts do not need valgrind)."""
    got = []
    for n in prog.sizes:
        argv = prog.argv(env, n)
        out = env.tmpdir / f"pycalls-{n}.json"
        env.before_run(prog, n)
        proc = subprocess.run([argv[0], str(HERE / "pycalls.py"), str(out),
                               *argv[1:]], capture_output=True, text=True,
                              env=child_env(), cwd=env.tmpdir,
                              timeout=RUN_TIMEOUT)
        if proc.returncode != 0:
            raise InstrError(f"{prog.key} at {n} under pycalls.py: exit "
                             f"{proc.returncode}: {proc.stderr[-500:]}")
        units = units_done(prog, n, proc.stdout)[0]
        got.append((json.loads(out.read_text()), units))
    (a, ua), (b, ub) = got
    per = {k: (b.get(k, 0) - a.get(k, 0)) / (ub - ua) for k in set(a) | set(b)}
    ranked = sorted(per.items(), key=lambda kv: -kv[1])
    return {"per_unit": {k: round(v, 3) for k, v in ranked[:top] if v > 0},
            "total": round(sum(per.values()), 3)}


# --------------------------------------------------------------------------
# the environment a budget holds for


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _version_of(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment() -> dict:
    """What the counts depend on: the machine type (``machine``, ``os``,
    ``cpu``: glibc and numpy pick code by CPU) and the software."""
    try:
        vg = subprocess.run(["valgrind", "--version"], capture_output=True,
                            text=True).stdout.strip()
    except OSError:
        vg = None
    try:
        import blkio
        libblkio = blkio.LIBBLKIO_VERSION
    except (ImportError, AttributeError):
        libblkio = None
    return {"machine": platform.machine(), "os": _os_name(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "numpy": _version_of("numpy"), "libblkio": libblkio,
            "uvloop": _version_of("uvloop"), "valgrind": vg}


MACHINE_KEYS = ("machine", "os", "cpu")


def environment_differences(recorded: dict, now: dict,
                            uses_uvloop: bool = True) -> List[str]:
    keys = [k for k in recorded if uses_uvloop or k != "uvloop"]
    return [f"{k} {now.get(k)} (the budget's: {recorded[k]})"
            for k in keys if now.get(k) != recorded[k]]


def same_machine_type(recorded: dict, now: dict) -> bool:
    return all(recorded.get(k) == now.get(k) for k in MACHINE_KEYS)


def load_budget(path: Path = BUDGET_FILE) -> dict:
    return json.loads(path.read_text())


def budget_verdict(measured: float, budget: float,
                   tolerance: float = TOLERANCE) -> Optional[str]:
    """None when ``measured`` is within ``tolerance`` of ``budget``; else
    what to do about it."""
    change = measured / budget - 1.0
    allowed = tolerance * budget        # in instructions: 3% of 1,000 is 30, exactly
    if measured - budget > allowed:
        return (f"{measured:,.0f} instructions per unit, {change:+.1%} over "
                f"the budget of {budget:,.0f} (more than {tolerance:.0%}): "
                "find what added them (bench/instr.py --profile DIR), or, "
                "if the cost is wanted, raise the budget in "
                "bench/instr-budget.json in the same commit, saying why")
    if budget - measured > allowed:
        return (f"{measured:,.0f} instructions per unit, {change:+.1%} under "
                f"the budget of {budget:,.0f}: lowering a figure lowers the "
                "budget -- write the new figure into bench/instr-budget.json "
                "in the same commit (make bench-instr "
                "BENCH_INSTR_ARGS='--budgeted --write-budget')")
    return None


def write_budget(evaluated: List[dict], env_now: dict, meta: dict,
                 path: Path = BUDGET_FILE) -> None:
    old = json.loads(path.read_text()) if path.exists() else {}
    budgets = dict(old.get("budgets", {}))
    for d in evaluated:
        if ROW_BY_KEY[d["key"]].budgeted and d.get("ours") is not None:
            budgets[d["key"]] = round(d["ours"])
    missing = [r.key for r in ROWS if r.budgeted and r.key not in budgets]
    if missing:
        raise InstrError(f"no figure for budgeted rows {missing}: measure "
                         "them (--budgeted) before writing the budget")
    doc = {"about": ("User-space instructions per request under callgrind "
                     "(bench/instr.py), which tests/test_instr_budget.py "
                     "holds each path to, within the tolerance either way. "
                     "Written by `make bench-instr BENCH_INSTR_ARGS='--budgeted "
                     "--write-budget'`; valid for this environment only."),
           "tolerance": TOLERANCE, "environment": env_now,
           "measured": meta, "budgets": budgets}
    path.write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------
# output


def _n(v: Optional[float], digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short",
                              "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status",
                                "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def markdown(evaluated: List[dict], meta: dict,
             profiles: Optional[Dict[str, dict]] = None,
             budget: Optional[dict] = None) -> str:
    env = meta["environment"]
    lines = [
        "# Instructions per request",
        "",
        "User-space instructions of the whole process per request (per MiB "
        "for the sequential read and the copy) under callgrind, as the "
        "difference of two runs of different sizes, so start-up cancels "
        "(`make bench-instr`; method in `bench/instr.py`). Unlike timings on "
        "a shared machine these do not swing: two runs agree to well under "
        "1%.",
        "",
        f"{meta['date']}, commit {meta['commit']}; CPython {env['python']}, "
        f"numpy {env['numpy']}, libblkio {env['libblkio']}, uvloop "
        f"{env['uvloop']}, {env['valgrind']}; {env['cpu']} "
        f"({env['machine']}), {env['os']}.",
        "",
        "| path | unit | blkio | C doing the same | Python floor | "
        "(blkio - floor) / C |" + (" budget |" if budget else ""),
        "|---|---|---:|---:|---:|---:|" + ("---:|" if budget else ""),
    ]
    for d in evaluated:
        ours = _n(d["ours"]) if d["ours"] is not None else \
            f"not measured: {d['ours_error']}"
        c = (f"{_n(d.get('c'))} ({d['c_program']}"
             + (f"; {d['c_note']}" if d.get("c_note") else "") + ")"
             if d.get("c") is not None
             else (f"not measured: {d['c_error']}" if d.get("c_error")
                   else "-"))
        digits = 1 if (d.get("floor") or 0) < 100 else 0
        fl = (f"{_n(d.get('floor'), digits)} ({d['floor_note']})"
              if d.get("floor") is not None else d["floor_note"] or "-")
        ratio = f"{d['over_c']:.2f}" if d.get("over_c") is not None else "-"
        line = f"| {d['title']} | {d['unit']} | {ours} | {c} | {fl} | {ratio} |"
        if budget:
            b = budget.get("budgets", {}).get(d["key"])
            line += (f" {b:,} ({d['ours'] / b - 1:+.1%}) |"
                     if b and d["ours"] is not None else " - |")
        lines.append(line)
    lines += [
        "",
        "C doing the same: `bench/ref_blocking.c` (what the blocking calls do, "
        "in C; `--iovecs=4` for readv), libblkio's `blkio-bench` at the same "
        "depth and `blkio-copy`. The Python floor: the Python calls the path "
        "needs per unit times one call of a bare loop (`contenders.py call`: "
        "the blocking API's loop calling `operator.is_`, a builtin that does "
        f"nothing: {_n(meta.get('call_floor'))} instructions a call), or a "
        "bare future round trip on the same event loop (`contenders.py "
        "ping`: 32 tasks, each awaiting a future that one `call_soon` "
        "callback resolves for all). A batch that completes during submission "
        "lets the loop run once a MiB of such batches (`blkio._aioloop.SYNC_BYTES`, "
        "a count, so the same under callgrind); a batch that has to wait "
        "(vhost-user, O_DIRECT) adds a future round trip with one task.",
        "",
        "Rows whose requests complete outside the process (vhost-user: the "
        "daemon; the 1 GiB read and the copy: the kernel's pace) reap a "
        "varying number of completions per call, so their counts move by "
        "several percent from run to run; the budget holds only the others.",
    ]
    if any(d.get("ours_spread") is not None and d["ours_by_rep"] and
           len(d["ours_by_rep"]) > 1 for d in evaluated):
        lines += ["", "Spread between repetitions (max - min) / mean: " +
                  ", ".join(f"{d['key']} {d['ours_spread']:.2%}"
                            for d in evaluated if d.get("ours_spread")
                            is not None) + "."]
    if profiles:
        groups: List[str] = []
        for pr in profiles.values():
            for g in pr["by_object"]:
                short = _group_column(g)
                if short not in groups:
                    groups.append(short)
        lines += ["", "## Where the instructions go", "",
                  "Per unit, by object: exclusive instructions (what "
                  "`callgrind_annotate --inclusive=no` lists) of both runs, "
                  "differenced (`bench/instr.py --profile DIR` lists them by "
                  "function too):", "",
                  "| path | " + " | ".join(groups) + " |",
                  "|---|" + "---:|" * len(groups)]
        shown = [(d["title"], d["ours_program"]) for d in evaluated]
        shown += [(k, k) for k in dict.fromkeys(d["c_program"]
                                                for d in evaluated)
                  if k in profiles]
        for title, key in shown:
            if key not in profiles:
                continue
            cols = {g: 0.0 for g in groups}
            for g, v in profiles[key]["by_object"].items():
                cols[_group_column(g)] += v
            lines.append(f"| {title} | " +
                         " | ".join(_n(cols[g]) for g in groups) + " |")
    return "\n".join(lines) + "\n"


def _group_column(g: str) -> str:
    """Object groups as table columns: every binding module in one, every
    other small object in "other"."""
    if g.startswith("binding"):
        return "binding"
    if g.startswith("CPython C modules"):
        return "CPython C modules"
    if g.startswith(("other", "program")):
        return "other"
    return g


def profile_text(key: str, pr: dict) -> str:
    unit = "MiB" if P[key].kind in ("bytes", "copy") or "1 MiB" in key \
        else "request"
    lines = [f"{key}: {pr['total']:,.0f} instructions per {unit}",
             "  by object:"]
    for g, v in pr["by_object"].items():
        if abs(v) >= 0.5:
            lines.append(f"    {v:10,.1f}  {g}")
    lines.append("  top functions (exclusive):")
    for f in pr["top_functions"][:15]:
        lines.append(f"    {f['per_unit']:10,.1f}  {f['function']}  "
                     f"[{f['object']}]")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# command line


def select_rows(only: Optional[str], budgeted: bool = False,
                main: bool = False) -> List[Row]:
    rows = [r for r in ROWS if (r.budgeted or not budgeted) and
            (r.main or not main)]
    if only:
        rx = re.compile(only)
        rows = [r for r in rows if rx.search(r.key) or rx.search(r.title)]
    return rows


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="rows: " + ", ".join(r.key for r in ROWS))
    p.add_argument("--only", help="regex on the rows' keys or titles")
    p.add_argument("--budgeted", action="store_true",
                   help="only the rows the budget holds (what the test runs)")
    p.add_argument("--main", action="store_true",
                   help="only the six API paths of the issue (what `make "
                   "bench` runs first)")
    p.add_argument("--parts", default="ours,c,floor",
                   help="which programs of each row to run: a comma list of "
                   "ours, c, floor (default: all three)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each program N times (the spread shows "
                   "how stable the figures are; default 1)")
    p.add_argument("--jobs", type=int, default=2,
                   help="valgrind runs at a time (default 2)")
    p.add_argument("--profile", metavar="DIR",
                   help="keep the callgrind files in DIR and write each "
                   "profiled row's split by object and function")
    p.add_argument("--py-calls", action="store_true",
                   help="also count each Python path's Python-level calls "
                   "per request, by function (bench/pycalls.py, natively)")
    p.add_argument("--write-budget", action="store_true",
                   help="store the budgeted rows' figures in "
                   "bench/instr-budget.json, with this environment")
    p.add_argument("--docs", action="store_true",
                   help="also write the table to docs/instructions.md")
    p.add_argument("--out", default=str(bench_run.RESULTS),
                   help="where the JSON and Markdown go (default "
                   "bench/results)")
    p.add_argument("--latest", metavar="FILE",
                   help="also copy the JSON to FILE (make bench reads it)")
    p.add_argument("--tmpdir", default=os.environ.get("BENCH_TMPDIR",
                                                      "/var/tmp"))
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter blkio runs in")
    p.add_argument("--list", action="store_true",
                   help="list the rows and their programs")
    args = p.parse_args(argv)
    rows = select_rows(args.only, args.budgeted, args.main)
    if not rows:
        log("no row selected")
        return 1
    parts = set(args.parts.split(","))
    if not parts or parts - {"ours", "c", "floor"}:
        p.error("--parts: a comma list of ours, c, floor")
    keys = programs_of(rows, parts)
    if args.list:
        for r in rows:
            print(f"{r.key}: {r.ours} | C: {r.c or '-'} | floor: "
                  f"{r.floor or '-'}" + ("  [budgeted]" if r.budgeted else ""))
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    tmpdir = Path(tempfile.mkdtemp(prefix="blkio-instr-", dir=args.tmpdir))
    keep = Path(args.profile) if args.profile else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    env = Env(tmpdir, python=args.python)
    t0 = time.perf_counter()
    cpu0 = _children_cpu()
    try:
        log(f"bench/instr.py: {len(rows)} rows, {len(keys)} programs x 2 "
            f"sizes x {args.repeat}, {args.jobs} at a time under callgrind")
        env.prepare([P[k] for k in keys])
        pages_locked = env.pages_locked
        figs = measure(env, keys, jobs=args.jobs, repeat=args.repeat,
                       out_dir=keep)
        evaluated = evaluate(rows, figs)
        profiles: Dict[str, dict] = {}     # by program
        if keep:
            for k in keys:
                if figs.get(k, {}).get("per_unit") is not None:
                    profiles[k] = profile(figs[k])
        py_calls: Dict[str, dict] = {}
        if args.py_calls:
            for r in rows:
                if P[r.ours].args[0] == "{py}" and not env.why_not(P[r.ours]):
                    try:
                        py_calls[r.ours] = python_calls(env, P[r.ours])
                    except InstrError as e:
                        py_calls[r.ours] = {"error": str(e)}
    finally:
        env.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
    env_now = environment()
    call = figs.get("bare call loop", {}).get("per_unit")
    meta = {"date": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds"),
            "commit": git_commit(), "environment": env_now,
            "nproc": os.cpu_count(), "kernel": platform.release(),
            "call_floor": call, "repeat": args.repeat,
            "pages_locked": pages_locked,
            "elapsed_s": round(time.perf_counter() - t0, 1),
            # what the runs cost: on an idle machine, elapsed ~ this / jobs
            "children_cpu_s": round(_children_cpu() - cpu0, 1)}
    budget = load_budget() if BUDGET_FILE.exists() else None
    md = markdown(evaluated, meta, profiles, budget)
    doc = {"meta": meta, "rows": evaluated,
           "programs": {k: _strip_files(v) for k, v in figs.items()},
           "profiles": profiles, "python_calls": py_calls, "markdown": md}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    js = out / f"instr-{stamp}.json"
    js.write_text(json.dumps(doc, indent=2))
    (out / f"instr-{stamp}.md").write_text(md)
    if args.latest:
        shutil.copyfile(js, args.latest)
    print(md)
    if profiles:
        txt = "\n\n".join(profile_text(k, pr) for k, pr in profiles.items())
        (keep / "profile.txt").write_text(txt + "\n")
        print(txt)
        print(f"\nProfiles: {keep / 'profile.txt'} (callgrind files beside "
              "it: callgrind_annotate FILE)")
    for k, pc in py_calls.items():
        print(f"\n{k}: Python-level calls per unit" +
              (f": {pc['error']}" if "error" in pc else
               f" ({pc['total']:.2f} in all), the most frequent:"))
        for name, v in pc.get("per_unit", {}).items():
            print(f"    {v:8.3f}  {name}")
    if args.docs:
        DOCS_FILE.write_text(md)
        print(f"Docs: {DOCS_FILE}")
    if args.write_budget:
        write_budget(evaluated, env_now, {"date": meta["date"],
                                          "commit": meta["commit"]})
        print(f"Budget: {BUDGET_FILE}")
    failed = [d["key"] for d in evaluated if d["ours"] is None]
    print(f"JSON: {js}\nElapsed: {meta['elapsed_s']:.0f} s (the runs' CPU: "
          f"{meta['children_cpu_s']:.0f} s)")
    return 1 if failed else 0


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _terminate(signum, frame) -> None:
    raise SystemExit(f"bench/instr.py: terminated by signal {signum}")


def _strip_files(fig: dict) -> dict:
    fig = dict(fig)
    if "reps" in fig:
        fig["reps"] = [{"per_unit": r["per_unit"],
                        "runs": [{k: v for k, v in run.items()
                                  if k != "files"} for run in r["runs"]]}
                       for r in fig["reps"]]
    return fig


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
