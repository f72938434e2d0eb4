#!/usr/bin/env python3
"""blkio benchmark suite: our APIs against C and against Python peers.

    make bench        # short default (< 3 minutes): the key cases
    make bench-full   # every workload and contender (about 35 minutes on 2 CPUs)
    .venv/bin/python bench/run.py [--full] [--runtime S] [--reps N]
                                  [--only REGEX] [--list] [--no-vhost]

Workloads: 4 KiB randread and randwrite at iodepth 1, 8, 32, 128; 1 MiB
sequential read; 1 and 2 threads; on a temporary 1 GiB file (filled with
random data, page-cached) through io_uring, on the same file with O_DIRECT,
and on a qemu-storage-daemon vhost-user-blk export that the suite starts and
stops itself.

Contenders, each in its own process, interleaved (repetition 1 of every case,
then repetition 2, ...): blkio's batch, queue, blocking and asyncio APIs
(`python -m blkio bench`),
C blkio-bench (compiled here from libblkio-dev's examples, with and without
--poll), C bench/ref_blocking.c (what our blocking API does, in C), fio's
io_uring engine, a plain os.preadv/os.pwritev loop, PyPI liburing, caio and
aiofile (bench/contenders.py).

Each figure is the median of the repetitions, with min and max. Output: a
table with IOPS, MB/s and the ratio to C blkio-bench, the key ratios, a
markdown block for the README, bench/results/bench-<time>.json and a PNG
plot of IOPS against iodepth.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / ".build"
RESULTS = HERE / "results"
BLKIO_BENCH_C = Path("/usr/share/doc/libblkio-dev/examples/blkio-bench.c")
GiB = 1 << 30
MB = 1_000_000


# --------------------------------------------------------------------------
# cases


@dataclasses.dataclass(frozen=True)
class Workload:
    backend: str          # "file" (io_uring, page cache), "direct", "vhost"
    rw: str               # randread, randwrite, read, write
    bs: int
    depth: int
    threads: int = 1

    @property
    def key(self) -> str:
        bs = f"{self.bs // 1024}k" if self.bs < (1 << 20) else \
            f"{self.bs >> 20}M"
        return (f"{self.backend}/{self.rw}/{bs}/qd{self.depth}/"
                f"t{self.threads}")

    @property
    def is_read(self) -> bool:
        return self.rw in ("read", "randread")

    def title(self) -> str:
        bk = {"file": "io_uring, page-cached file",
              "direct": "io_uring, O_DIRECT file",
              "vhost": "virtio-blk-vhost-user (qemu-storage-daemon)"}
        bs = f"{self.bs // 1024} KiB" if self.bs < (1 << 20) else \
            f"{self.bs >> 20} MiB"
        return (f"{bs} {self.rw}, iodepth {self.depth}, "
                f"{self.threads} thread{'s' if self.threads > 1 else ''} "
                f"- {bk[self.backend]}")


@dataclasses.dataclass(frozen=True)
class Case:
    wl: Workload
    contender: str

    @property
    def key(self) -> str:
        return f"{self.wl.key}/{self.contender}"


C_BENCH = "C blkio-bench"
C_POLL = "C blkio-bench --poll"
C_REF = "C ref_blocking"
FIO = "fio io_uring"
PREADV = "py os.preadv"
LIBURING = "liburing (PyPI)"
CAIO = "caio (PyPI)"
AIOFILE = "aiofile (PyPI)"
B_BATCH = "blkio batch"
B_QUEUE = "blkio queue"
B_BLOCK = "blkio blocking"
B_AIO = "blkio asyncio"
B_BATCH_NP = "blkio batch numpy-mem"
B_QUEUE_NP = "blkio queue numpy-mem"
B_BLOCK_NP = "blkio blocking numpy-mem"
B_BLOCK_POLL = "blkio blocking --poll"

BLKIO_CONTENDERS = {B_BATCH, B_QUEUE, B_BLOCK, B_AIO, B_BATCH_NP, B_QUEUE_NP,
                    B_BLOCK_NP, B_BLOCK_POLL}
ASYNCIO_PEERS = (CAIO, AIOFILE)


def contenders_for(wl: Workload, full: bool) -> list[str]:
    """Which contenders make sense for a workload."""
    qd1 = wl.depth == 1
    asyncio_ok = wl.threads == 1
    if wl.backend == "file":
        out = [C_BENCH, C_POLL]
        if qd1:
            out += [C_REF]
        out += [FIO]
        if qd1:
            out += [PREADV]
        out += [LIBURING]
        if asyncio_ok:
            out += [CAIO, AIOFILE]
        out += [B_BATCH, B_QUEUE]
        if qd1:
            out += [B_BLOCK]
        if asyncio_ok:
            out += [B_AIO]
        return out
    if wl.backend == "direct":
        out = [C_BENCH, FIO]
        if qd1:
            out += [C_REF, PREADV]
        if asyncio_ok:
            out += [CAIO]
        out += [B_BATCH]
        if qd1:
            out += [B_BLOCK]
        if asyncio_ok:
            out += [B_AIO]
        return out
    # vhost-user
    out = [C_BENCH, C_POLL]
    if qd1:
        out += [C_REF]
    out += [B_BATCH, B_QUEUE, B_QUEUE_NP]
    if qd1:
        out += [B_BLOCK, B_BLOCK_NP, B_BLOCK_POLL]
    if asyncio_ok:
        out += [B_AIO]
    return out


def short_cases() -> list[Case]:
    F, D, V = "file", "direct", "vhost"
    k4 = 4096
    spec = [
        (Workload(F, "randread", k4, 1),
         [C_BENCH, C_POLL, C_REF, FIO, PREADV, LIBURING, B_BLOCK, B_QUEUE,
          B_BATCH, B_AIO]),
        (Workload(F, "randread", k4, 32),
         [C_BENCH, C_POLL, FIO, LIBURING, CAIO, AIOFILE, B_BATCH, B_QUEUE,
          B_AIO]),
        (Workload(F, "randread", k4, 32, threads=2), [C_BENCH, B_BATCH]),
        (Workload(D, "randread", k4, 32), [C_BENCH, CAIO, B_AIO]),
        (Workload(V, "randread", k4, 1), [C_BENCH, C_POLL, C_REF, B_BLOCK,
                                          B_BLOCK_NP, B_BLOCK_POLL]),
        (Workload(V, "randread", k4, 32), [C_BENCH, B_BATCH, B_QUEUE,
                                           B_QUEUE_NP]),
    ]
    return [Case(wl, c) for wl, cs in spec for c in cs]


def full_cases() -> list[Case]:
    k4 = 4096
    wls: list[Workload] = []
    for rw in ("randread", "randwrite"):
        for qd in (1, 8, 32, 128):
            wls.append(Workload("file", rw, k4, qd))
    for qd in (1, 8):
        wls.append(Workload("file", "read", 1 << 20, qd))
    for qd in (1, 32):
        wls.append(Workload("file", "randread", k4, qd, threads=2))
    for qd in (1, 32):
        wls.append(Workload("direct", "randread", k4, qd))
    for qd in (1, 32):
        wls.append(Workload("vhost", "randread", k4, qd))
    wls.append(Workload("vhost", "randwrite", k4, 32))
    wls.append(Workload("vhost", "randread", k4, 32, threads=2))
    return [Case(wl, c) for wl in wls for c in contenders_for(wl, True)]


# --------------------------------------------------------------------------
# environment: files, C programs, qemu-storage-daemon


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_image(path: Path, size: int) -> None:
    """A real (not sparse) file of random data, on disk and in the page cache."""
    t0 = time.perf_counter()
    chunk = 64 << 20
    seed = os.urandom(chunk)
    with open(path, "wb", buffering=0) as f:
        written = 0
        n = 0
        while written < size:
            k = min(chunk, size - written)
            # vary every chunk so no two 4 KiB blocks repeat
            head = n.to_bytes(8, "little") * 512
            f.write(head + seed[len(head):k] if k > len(head) else seed[:k])
            written += k
            n += 1
        os.fsync(f.fileno())
    with open(path, "rb", buffering=0) as f:     # read it once: page-cached
        while f.read(16 << 20):
            pass
    log(f"  {path} ({size >> 20} MiB) written and cached in "
        f"{time.perf_counter() - t0:.1f} s")


def compile_c(out: Path, src: Path) -> Path:
    BUILD.mkdir(exist_ok=True)
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "blkio"],
                           check=True, capture_output=True,
                           text=True).stdout.split()
    cmd = ["gcc", "-O2", "-o", str(out), str(src), *flags, "-lpthread"]
    log("  " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    return out


class StorageDaemon:
    """qemu-storage-daemon exporting a raw file as vhost-user-blk."""

    def __init__(self, image: Path, tmpdir: Path, num_queues: int = 2):
        self.sock = tmpdir / "vhost.sock"
        self.log_path = tmpdir / "qsd.log"
        # On a machine with few CPUs the daemon and the client fight for
        # them and vhost-user figures swing by 2x: give the daemon the last
        # CPU and single-threaded clients the first (the same for C and Python).
        self.cmd = [*_pin(-1), "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={image},"
                          "cache.direct=off",
            "--export", "type=vhost-user-blk,id=exp0,node-name=file0,"
                        f"addr.type=unix,addr.path={self.sock},writable=on,"
                        f"num-queues={num_queues}",
        ]
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.crashes: list[str] = []

    def start(self, timeout: float = 15.0) -> None:
        log("  " + " ".join(self.cmd))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log,
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("qemu-storage-daemon exited: " +
                                   self.log_path.read_text(errors="replace"))
            if self.sock.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(self.sock))
                    s.close()
                    log(f"  qemu-storage-daemon pid {self.proc.pid} listening "
                        f"on {self.sock}")
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            time.sleep(0.05)
        raise RuntimeError("qemu-storage-daemon did not create its socket")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def restart(self) -> None:
        self.stop()
        try:
            self.sock.unlink()
        except FileNotFoundError:
            pass
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None


# --------------------------------------------------------------------------
# running contenders


class Env:
    def __init__(self, args, tmpdir: Path, image: Path):
        self.args = args
        self.tmpdir = tmpdir
        self.image = image
        self.py = args.python
        self.c_bench: Path | None = None
        self.c_ref: Path | None = None
        self.qsd: StorageDaemon | None = None
        self.pybench: list[str] | None = None     # command prefix
        self.blkio_error: str | None = None

    def detect_blkio(self) -> None:
        r = subprocess.run([self.py, "-c", "import blkio"], capture_output=True,
                           text=True, cwd=self.tmpdir)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            self.blkio_error = f"blkio not importable ({last})"
            return
        self.pybench = [self.py, "-m", "blkio", "bench"]
        log(f"  blkio contenders run: {' '.join(self.pybench[1:])}")

    def device_args(self, wl: Workload) -> tuple[str, list[str]]:
        if wl.backend == "vhost":
            assert self.qsd is not None
            return "virtio-blk-vhost-user", [f"path={self.qsd.sock}"]
        props = [f"path={self.image}"]
        if wl.backend == "direct":
            props.append("direct=true")
        return "io_uring", props

    def command(self, case: Case, runtime: int) -> list[str] | str:
        """The command line, or a string saying why the case is skipped."""
        wl, c = case.wl, case.contender
        common = [f"--num-threads={wl.threads}", f"--iodepth={wl.depth}",
                  f"--readwrite={wl.rw}", f"--blocksize={wl.bs}",
                  f"--runtime={runtime}"]
        driver, props = self.device_args(wl)
        if c in (C_BENCH, C_POLL):
            extra = ["--poll"] if c == C_POLL else []
            return [str(self.c_bench), *common, *extra, driver, *props]
        if c == C_REF:
            return [str(self.c_ref), *common, driver, *props]
        if c in BLKIO_CONTENDERS:
            if self.pybench is None:
                return self.blkio_error or "blkio not available"
            api = {B_BATCH: "batch", B_BATCH_NP: "batch", B_QUEUE: "queue",
                   B_QUEUE_NP: "queue", B_BLOCK: "blocking",
                   B_BLOCK_NP: "blocking", B_BLOCK_POLL: "blocking",
                   B_AIO: "asyncio"}[c]
            mem = "numpy" if "numpy" in c else "alloc"
            extra = ["--poll"] if c == B_BLOCK_POLL else []
            return [*self.pybench, *common, f"--api={api}",
                    f"--buffers={mem}", *extra, driver, *props]
        if c == FIO:
            if wl.backend == "vhost":
                return "fio has no vhost-user engine here"
            cmd = ["fio", "--name=bench", f"--filename={self.image}",
                   "--ioengine=io_uring", f"--rw={wl.rw}", f"--bs={wl.bs}",
                   f"--iodepth={wl.depth}", f"--numjobs={wl.threads}",
                   "--thread", "--group_reporting", "--time_based",
                   f"--runtime={runtime}", "--invalidate=0",
                   "--norandommap", "--randrepeat=0",
                   f"--direct={1 if wl.backend == 'direct' else 0}",
                   "--output-format=json"]
            if wl.is_read:
                cmd.append("--readonly")
            return cmd
        kind = {PREADV: "preadv", LIBURING: "liburing", CAIO: "caio",
                AIOFILE: "aiofile"}[c]
        cmd = [self.py, str(HERE / "contenders.py"), kind, *common]
        if wl.backend == "direct":
            cmd.append("--direct")
        return [*cmd, str(self.image)]


def parse_output(contender: str, stdout: str, wl: Workload) -> float:
    """IOPS from a contender's JSON output."""
    if contender == FIO:
        # fio may print warnings before its JSON
        data = json.loads(stdout[stdout.index("{"):])
        job = data["jobs"][0]
        return float(job["read" if wl.is_read else "write"]["iops"])
    data = json.loads(stdout[stdout.index("{"):])
    return float(data["aggregate"]["kiops"]) * 1000.0


def _pin(cpu: int) -> list[str]:
    """``taskset -c N`` for CPU ``cpu`` (negative: from the end), or nothing
    when there is no taskset or only one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(cpus[cpu])]


def run_case(env: Env, case: Case, runtime: int) -> dict:
    cmd = env.command(case, runtime)
    if isinstance(cmd, str):
        return {"ok": False, "error": cmd, "skipped": True}
    if case.wl.backend == "vhost":
        qsd = env.qsd
        if qsd is None:
            return {"ok": False, "error": "qemu-storage-daemon is not running",
                    "skipped": True}
        if not qsd.alive():
            # QEMU 7.2's daemon aborts (vhost_user_server_ref: Assertion
            # `!server->wait_idle' failed) when a client that used 2 queues
            # disconnects: start a fresh one
            qsd.crashes.append(qsd.log_tail())
            log(f"  qemu-storage-daemon died ({qsd.log_tail()}); restarting")
            try:
                qsd.restart()
            except (RuntimeError, OSError) as e:
                return {"ok": False, "skipped": True,
                        "error": f"qemu-storage-daemon restart failed: {e}"}
    if case.wl.backend == "vhost" and case.wl.threads == 1:
        cmd = [*_pin(0), *cmd]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=runtime + 60, stdin=subprocess.DEVNULL,
                           cwd=env.tmpdir)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {runtime + 60} s",
                "cmd": cmd}
    wall = time.perf_counter() - t0
    if case.wl.backend == "vhost" and case.wl.threads > 1 and env.qsd:
        # see above: the daemon dies a moment after a multi-queue client
        # leaves; restart it now so the next case finds it listening
        time.sleep(0.2)
        if not env.qsd.alive():
            env.qsd.crashes.append(env.qsd.log_tail())
            log(f"  qemu-storage-daemon died after a {case.wl.threads}-queue "
                f"client ({env.qsd.log_tail()}); restarting")
            try:
                env.qsd.restart()
            except (RuntimeError, OSError) as e:
                log(f"  restart failed: {e}")
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit status {r.returncode}"
        return {"ok": False, "error": msg[:300], "cmd": cmd, "wall": wall}
    try:
        iops = parse_output(case.contender, r.stdout, case.wl)
    except (ValueError, KeyError, IndexError) as e:
        return {"ok": False, "error": f"unparsable output ({e})", "cmd": cmd,
                "wall": wall}
    return {"ok": True, "iops": iops, "cmd": cmd, "wall": wall}


# --------------------------------------------------------------------------
# reporting


def summarize(cases: list[Case], runs: dict[str, list[dict]]) -> dict:
    out = {}
    for case in cases:
        rs = runs.get(case.key, [])
        good = [r["iops"] for r in rs if r.get("ok")]
        errs = [r["error"] for r in rs if not r.get("ok")]
        entry = {"workload": dataclasses.asdict(case.wl),
                 "contender": case.contender, "reps": len(good),
                 "iops_all": good}
        if good:
            entry.update(iops_median=statistics.median(good),
                         iops_min=min(good), iops_max=max(good))
            entry["mbps_median"] = entry["iops_median"] * case.wl.bs / MB
        if errs:
            entry["errors"] = sorted(set(errs))
            entry["skipped"] = all(r.get("skipped") for r in rs
                                   if not r.get("ok"))
        out[case.key] = entry
    return out


def fmt_iops(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def c_baseline(summary: dict, wl: Workload) -> float | None:
    e = summary.get(Case(wl, C_BENCH).key)
    return e.get("iops_median") if e else None


def table_lines(cases: list[Case], summary: dict) -> list[str]:
    lines = []
    seen: list[Workload] = []
    for c in cases:
        if c.wl not in seen:
            seen.append(c.wl)
    for wl in seen:
        base = c_baseline(summary, wl)
        lines.append("")
        lines.append(f"### {wl.title()}")
        lines.append("")
        lines.append("| contender | IOPS median | min - max | MB/s | "
                     "vs C blkio-bench |")
        lines.append("|---|---:|---:|---:|---:|")
        for c in cases:
            if c.wl != wl:
                continue
            e = summary[c.key]
            if "iops_median" not in e:
                why = "; ".join(e.get("errors", ["no result"]))
                if len(why) > 110:
                    why = why[:107] + "..."
                lines.append(f"| {c.contender} | - | - | - | "
                             f"{'skipped' if e.get('skipped') else 'failed'}:"
                             f" {why} |")
                continue
            ratio = f"{e['iops_median'] / base:.2f}x" if base else "-"
            lines.append(
                f"| {c.contender} | {fmt_iops(e['iops_median'])} | "
                f"{fmt_iops(e['iops_min'])} - {fmt_iops(e['iops_max'])} | "
                f"{e['mbps_median']:.0f} | {ratio} |")
    return lines


def key_ratios(summary: dict) -> list[tuple[str, str]]:
    """The ratios the project tracks (issue 5), as (label, value) pairs."""
    k4 = 4096

    def med(backend, rw, depth, contender, threads=1):
        e = summary.get(Case(Workload(backend, rw, k4, depth, threads),
                             contender).key)
        return e.get("iops_median") if e else None

    def ratio(a, b):
        if a is None or b is None or b == 0:
            return "n/a"
        return f"{a / b:.2f}  ({fmt_iops(a)} / {fmt_iops(b)} IOPS)"

    # (label, (backend, iodepth, contender, threads), denominator likewise)
    simple = [
        ("batch API, 4K randread qd32, 1 thread, page-cached file / C blkio-bench",
         ("file", 32, B_BATCH, 1), ("file", 32, C_BENCH, 1)),
        ("blocking API, 4K randread qd1 / C ref_blocking",
         ("file", 1, B_BLOCK, 1), ("file", 1, C_REF, 1)),
        ("blocking API, 4K randread qd1 / liburing (PyPI) qd1",
         ("file", 1, B_BLOCK, 1), ("file", 1, LIBURING, 1)),
        ("vhost-user qd1, blocking API, alloc'd memory / C blkio-bench",
         ("vhost", 1, B_BLOCK, 1), ("vhost", 1, C_BENCH, 1)),
        ("vhost-user qd1, blocking API, alloc'd memory / C ref_blocking",
         ("vhost", 1, B_BLOCK, 1), ("vhost", 1, C_REF, 1)),
        ("vhost-user qd1, blocking API with poll_us / C blkio-bench --poll",
         ("vhost", 1, B_BLOCK_POLL, 1), ("vhost", 1, C_POLL, 1)),
        ("vhost-user qd1, blocking API, plain numpy memory (bounced) / C blkio-bench",
         ("vhost", 1, B_BLOCK_NP, 1), ("vhost", 1, C_BENCH, 1)),
        ("vhost-user qd32, batch, alloc'd (registered) memory / C blkio-bench",
         ("vhost", 32, B_BATCH, 1), ("vhost", 32, C_BENCH, 1)),
        ("vhost-user qd32, queue API, plain numpy memory (bounced; the batch API "
         "never bounces) / C blkio-bench",
         ("vhost", 32, B_QUEUE_NP, 1), ("vhost", 32, C_BENCH, 1)),
        ("vhost-user qd32, queue API, numpy memory (bounced) / queue API, alloc'd "
         "memory (cost of the bounce)",
         ("vhost", 32, B_QUEUE_NP, 1), ("vhost", 32, B_QUEUE, 1)),
        ("2 threads on 2 queues, batch qd32 / C --num-threads=2",
         ("file", 32, B_BATCH, 2), ("file", 32, C_BENCH, 2)),
    ]
    out = [(label, ratio(med(nb, "randread", nd, nc, nt), med(db, "randread", dd, dc, dt)))
           for label, (nb, nd, nc, nt), (db, dd, dc, dt) in simple]
    peers = [(p, med("file", "randread", 32, p)) for p in ASYNCIO_PEERS]
    peers = [(p, v) for p, v in peers if v is not None]
    best = max(peers, key=lambda pv: pv[1]) if peers else (None, None)
    out.append((f"asyncio qd32 / best asyncio peer ({best[0] or 'none'})",
                ratio(med("file", "randread", 32, B_AIO), best[1])))
    aio_direct = summary.get(Case(Workload("direct", "randread", k4, 32),
                                  B_AIO).key)
    if aio_direct is None:
        val = "n/a"
    elif "iops_median" in aio_direct:
        caio_d = med("direct", "randread", 32, CAIO)
        val = (f"works: {fmt_iops(aio_direct['iops_median'])} IOPS"
               + (f"; caio on O_DIRECT: {fmt_iops(caio_d)} IOPS"
                  if caio_d else "; caio on O_DIRECT: fails"))
        cd = med("direct", "randread", 32, C_BENCH)
        if cd:
            val += f"; / C blkio-bench {aio_direct['iops_median'] / cd:.2f}"
    else:
        val = "FAILS: " + "; ".join(aio_direct.get("errors", []))
    out.append(("asyncio on O_DIRECT, 4K randread qd32", val))
    return out


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        blkio_ver = subprocess.run(["pkg-config", "--modversion", "blkio"],
                                   capture_output=True, text=True
                                   ).stdout.strip()
    except OSError:
        blkio_ver = "?"
    return {"date": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds"),
            "nproc": os.cpu_count(), "kernel": platform.release(),
            "cpu": cpu, "python": platform.python_version(),
            "libblkio": blkio_ver}


def plot(summary: dict, cases: list[Case], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return False
    groups = {}
    for c in cases:
        wl = c.wl
        if wl.bs != 4096 or wl.threads != 1 or wl.backend != "file":
            continue
        groups.setdefault(wl.rw, {}).setdefault(c.contender, [])
        e = summary[c.key]
        if "iops_median" in e:
            groups[wl.rw][c.contender].append(
                (wl.depth, e["iops_median"], e["iops_min"], e["iops_max"]))
    groups = {k: v for k, v in groups.items() if any(v.values())}
    if not groups:
        return False
    names = sorted({n for per in groups.values() for n, pts in per.items()
                    if pts})
    cmap = plt.get_cmap("tab20")
    colors = {n: cmap(i % 20) for i, n in enumerate(names)}
    markers = "osD^v<>phX*"
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups) + 2,
                                                      5.5), squeeze=False)
    for ax, (rw, per) in zip(axes[0], sorted(groups.items())):
        for name in names:
            pts = sorted(per.get(name, []))
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] / 1000 for p in pts]
            err = [[(p[1] - p[2]) / 1000 for p in pts],
                   [(p[3] - p[1]) / 1000 for p in pts]]
            ax.errorbar(xs, ys, yerr=err, label=name, color=colors[name],
                        linestyle="-" if name.startswith("blkio") else "--",
                        linewidth=2.2 if name.startswith("blkio") else 1.2,
                        marker=markers[names.index(name) % len(markers)],
                        capsize=3)
        ax.set_xscale("log", base=2)
        depths = sorted({p[0] for pts in per.values() for p in pts})
        ax.set_xticks(depths)
        ax.set_xticklabels([str(d) for d in depths])
        ax.set_xlabel("iodepth")
        ax.set_ylabel("kIOPS (median; bars: min-max)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"4 KiB {rw}, 1 thread, io_uring page-cached file",
                     fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.9 / (6.5 * len(groups) + 3), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true",
                   help="every workload and contender (long)")
    p.add_argument("--runtime", type=int, default=None,
                   help="seconds per run (default: 1 short, 2 full)")
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions per case (default: 3; at least 3 for "
                   "meaningful medians)")
    p.add_argument("--only", default=None,
                   help="regex on case keys, e.g. 'file/randread/4k/qd32'")
    p.add_argument("--list", action="store_true", help="list cases and exit")
    p.add_argument("--no-vhost", action="store_true",
                   help="skip the vhost-user cases")
    p.add_argument("--size", type=int, default=1024,
                   help="image size in MiB (default: 1024)")
    p.add_argument("--tmpdir", default=os.environ.get("BENCH_TMPDIR",
                                                      "/var/tmp"),
                   help="where the image goes (needs O_DIRECT support; "
                   "default: /var/tmp, or $BENCH_TMPDIR)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the Python contenders")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    runtime = args.runtime or (2 if args.full else 1)

    cases = full_cases() if args.full else short_cases()
    if args.no_vhost:
        cases = [c for c in cases if c.wl.backend != "vhost"]
    if args.only:
        rx = re.compile(args.only)
        cases = [c for c in cases if rx.search(c.key)]
    if args.list:
        for c in cases:
            print(c.key)
        return 0
    if not cases:
        log("no case selected")
        return 1

    n_runs = len(cases) * args.reps
    log(f"blkio bench: {'full' if args.full else 'short'} suite, "
        f"{len(cases)} cases x {args.reps} reps, {runtime} s each "
        f"(about {n_runs * (runtime + 0.35) / 60:.1f} min)")
    if not args.full:
        log("  (this is the short default; `make bench-full` runs every "
            "workload and contender)")

    tmpdir = Path(tempfile.mkdtemp(prefix="blkio-bench-", dir=args.tmpdir))
    image = tmpdir / "disk.img"
    env = Env(args, tmpdir, image)
    runs: dict[str, list[dict]] = {}
    t_start = time.perf_counter()
    try:
        log("setup:")
        env.c_bench = compile_c(BUILD / "blkio-bench", BLKIO_BENCH_C)
        env.c_ref = compile_c(BUILD / "ref_blocking", HERE / "ref_blocking.c")
        env.detect_blkio()
        if env.blkio_error:
            log(f"  {env.blkio_error}: blkio's own contenders are skipped")
        make_image(image, args.size << 20)
        if any(c.wl.backend == "vhost" for c in cases):
            env.qsd = StorageDaemon(image, tmpdir)
            try:
                env.qsd.start()
            except (RuntimeError, OSError) as e:
                log(f"  vhost-user backend unavailable: {e}")
        log("running:")
        for rep in range(args.reps):
            for i, case in enumerate(cases):
                r = run_case(env, case, runtime)
                runs.setdefault(case.key, []).append(r)
                status = (fmt_iops(r["iops"]) + " IOPS" if r["ok"]
                          else ("skipped: " if r.get("skipped") else
                                "FAILED: ") + r["error"])
                log(f"  [{rep + 1}/{args.reps} {i + 1:3d}/{len(cases)}] "
                    f"{case.key}: {status}")
    except KeyboardInterrupt:
        log("interrupted: reporting what ran")
    finally:
        if env.qsd is not None:
            env.qsd.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
    elapsed = time.perf_counter() - t_start

    summary = summarize(cases, runs)
    info = machine_info()
    info["suite"] = "full" if args.full else "short"
    info["runtime_s"] = runtime
    info["reps"] = args.reps
    info["elapsed_s"] = round(elapsed, 1)
    if env.qsd is not None:
        info["qsd_restarts"] = env.qsd.restarts
        info["qsd_crashes"] = sorted(set(c for c in env.qsd.crashes if c))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    png = out / f"bench-{stamp}.png"
    have_png = plot(summary, cases, png)
    ratios = key_ratios(summary)
    doc = {"machine": info, "results": summary,
           "ratios": {k: v for k, v in ratios},
           "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "cmd"}
                        for r in rs] for k, rs in runs.items()},
           "commands": {k: " ".join(rs[0]["cmd"]) for k, rs in runs.items()
                        if rs and "cmd" in rs[0]}}
    js = out / f"bench-{stamp}.json"
    js.write_text(json.dumps(doc, indent=2))

    md = [f"## blkio benchmarks ({info['suite']} suite)", "",
          f"{info['date']}; {info['nproc']} CPUs ({info['cpu']}), "
          f"Linux {info['kernel']}, Python {info['python']}, "
          f"libblkio {info['libblkio']}; median of {args.reps} runs of "
          f"{runtime} s each, interleaved; IOPS = requests per second."]
    md += table_lines(cases, summary)
    if info.get("qsd_restarts"):
        md += ["", f"Note: qemu-storage-daemon died {info['qsd_restarts']} "
               "time(s) during the run (" +
               "; ".join(info.get("qsd_crashes") or ["no message"]) +
               ") and was restarted. QEMU 7.2 aborts this way when a "
               "vhost-user client that used 2 queues disconnects."]
    md += ["", "### Key ratios (median / median)", ""]
    md += [f"- {k}: **{v}**" for k, v in ratios]
    print("\n".join(md))
    print()
    if not args.full:
        print("This was the short default subset. `make bench-full` runs "
              "every workload (4 KiB randread/randwrite at iodepth 1, 8, 32, "
              "128; 1 MiB sequential read; 1 and 2 threads; O_DIRECT and "
              "vhost-user) and every contender.")
    print(f"JSON: {js}" + (f"\nPlot: {png}" if have_png else ""))
    print(f"Elapsed: {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
