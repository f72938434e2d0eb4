#!/usr/bin/env python3
"""blkio benchmark suite: our APIs against C, fio, qemu-img, dd and Python peers.

    make bench        # short default (about 6 minutes): every goal's cases
    make bench-full   # every workload and contender (long)
    .venv/bin/python bench/run.py [--full] [--runtime S] [--reps N]
                                  [--only REGEX] [--list] [--no-vhost]
    .venv/bin/python bench/run.py --compare A.json B.json

Workloads: 4 KiB random I/O at several depths and thread counts, on a 1 GiB
file of random data in the page cache (io_uring), on a second file with
O_DIRECT, and on a qemu-storage-daemon vhost-user-blk export of the first
(the suite starts and stops the daemon itself); one-call 1 GiB sequential
reads and writes into numpy arrays, cold (O_DIRECT, the file's page cache
dropped before every run); 1 GiB copies raw file -> raw file (O_DIRECT) and
file -> vhost-user.

Each case runs in its own process, interleaved: repetition 1 of every case,
then repetition 2, ...; within a workload the contenders' order rotates from
one repetition to the next. Each figure is the median of the repetitions,
with min and max. The goals of the open issues are data (GOALS below): each
is a ratio of two cases' medians (or of one case to the best of several)
with a threshold, and the run ends with a one-line verdict per goal. The
JSON in bench/results/ keeps every repetition's raw figure, every ratio
(median/median and per repetition) and every command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

HERE = Path(__file__).resolve().parent
BUILD = HERE / ".build"
RESULTS = HERE / "results"
EXAMPLES = Path("/usr/share/doc/libblkio-dev/examples")
GiB = 1 << 30
MiB = 1 << 20
MB = 1_000_000
K4 = 4096
THREAD_COUNTS = (1, 2, 4, 8)
SEQ_DEPTH = 8           # the vhost-user 1 MiB sequential read's depth
EXPORT_QUEUES = max(THREAD_COUNTS)


# --------------------------------------------------------------------------
# workloads, contenders, cases


@dataclasses.dataclass(frozen=True)
class Workload:
    """backend: "file" (page-cached, io_uring), "direct" (O_DIRECT file),
    "vhost" (vhost-user export of the page-cached file), "cold" (one call
    over the whole O_DIRECT file, its page cache dropped first), "copy"
    (raw file -> raw file), "vcopy" (raw file -> vhost-user).
    bs: bytes per request; depth 0: chosen by each contender."""
    backend: str
    rw: str               # randread, randwrite, read, write, copy
    bs: int
    depth: int
    threads: int = 1

    @property
    def key(self) -> str:
        qd = f"/qd{self.depth}" if self.depth else ""
        return f"{self.backend}/{self.rw}/{_size(self.bs)}{qd}/t{self.threads}"

    @property
    def is_read(self) -> bool:
        return self.rw in ("read", "randread")

    @property
    def bulk(self) -> bool:
        """Figures in MB/s rather than IOPS."""
        return self.bs >= MiB

    def title(self) -> str:
        bk = {"file": "io_uring, page-cached file",
              "direct": "io_uring, O_DIRECT file",
              "vhost": "virtio-blk-vhost-user (qemu-storage-daemon)",
              "cold": "O_DIRECT file, page cache dropped before each run",
              "copy": "raw file -> raw file, O_DIRECT both sides",
              "vcopy": "raw file -> virtio-blk-vhost-user",
              **PLAIN_COPY_TITLES}[self.backend]
        if self.rw == "copy":
            return f"copy {_size(self.bs, True)} - {bk}"
        if self.backend == "cold":
            return (f"{_size(self.bs, True)} sequential {self.rw} into numpy "
                    f"in one call - {bk}")
        qd = f", iodepth {self.depth}" if self.depth else ""
        return (f"{_size(self.bs, True)} {self.rw}{qd}, {self.threads} "
                f"thread{'s' if self.threads > 1 else ''} - {bk}")


def _size(n: int, long: bool = False) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB" if long else f"{n // GiB}G"
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB" if long else f"{n // MiB}M"
    return f"{n // 1024} KiB" if long else f"{n // 1024}k"


@dataclasses.dataclass(frozen=True)
class Case:
    wl: Workload
    contender: str

    @property
    def key(self) -> str:
        return f"{self.wl.key}/{self.contender}"


C_BENCH = "C blkio-bench"
# The same command as C_BENCH, run again as a contender of its own: the A/A
# control.  Its ratio to C_BENCH is what this machine's noise alone does to
# a ratio in the same run, the yardstick for reading the goals beside it.
C_AA = "C blkio-bench again (A/A)"
C_POLL = "C blkio-bench --poll"
C_REF = "C ref_blocking"
C_COPY = "C blkio-copy"
FIO = "fio io_uring"
FIO_QD = {d: f"fio io_uring qd{d}" for d in (1, 8, 32)}
QEMU_IMG = "qemu-img convert"
# qemu-img cannot write to vhost-user; the closest real path for "raw file
# -> the daemon's export" is the same daemon's NBD export of the same file
QEMU_IMG_NBD = "qemu-img convert -> NBD export"
NBD_EXPORT = "copy"
DD = "dd"
PREADV = "py os.preadv"
LIBURING = "liburing (PyPI)"
CAIO = "caio (PyPI)"
AIOFILE = "aiofile (PyPI)"
PING = "bare asyncio"
PING_UV = "bare asyncio uvloop"
PING_EACH = "bare asyncio, a callback per future"
PY_CALL = "bare Python call loop"
NP_FROMFILE = "np.fromfile"
FILE_READINTO = "file.readinto"
NP_TOFILE = "ndarray.tofile + fsync"
FILE_WRITE = "file.write + fsync"
B_BATCH = "blkio batch"
B_QUEUE = "blkio queue"
B_BLOCK = "blkio blocking"
B_AIO = "blkio asyncio"
B_AIO_UV = "blkio asyncio uvloop"
B_AIO_BATCH = "blkio asyncio batch"
B_BATCH_NP = "blkio batch numpy-mem"
B_QUEUE_NP = "blkio queue numpy-mem"
B_BLOCK_NP = "blkio blocking numpy-mem"
B_BLOCK_POLL = "blkio blocking --poll"
B_BIG = "blkio one call"                       # alloc'd memory, defaults
B_BIG_NP = "blkio one call numpy-mem"          # plain numpy memory
B_BIG_KNOBS = f"blkio 8 MiB calls depth={SEQ_DEPTH} chunk=1M"
B_COPY = "blkio copy"
B_COPY_BLKIO = "blkio copy --input-blkio/--output-blkio"
# plain file copies as people run them (issue 30, item 5; plain_copy_* below)
DD_FSYNC = "dd bs=1M conv=fsync"
QEMU_IMG_WB = "qemu-img convert -t writeback"
PLAIN_COPY_CONTENDERS = (QEMU_IMG_WB, DD_FSYNC, B_COPY)
PLAIN_COPY_TITLES = {
    "warmcopy": "file in the page cache -> new file, flushed",
    "coldcopy": "file -> new file, flushed, every cache dropped before each run"}
PLAIN_COPY_SMALL = 256 * MiB

# python -m blkio bench: (api, buffers, extra options)
BLKIO_BENCH = {
    B_BATCH: ("batch", "alloc", []), B_BATCH_NP: ("batch", "numpy", []),
    B_QUEUE: ("queue", "alloc", []), B_QUEUE_NP: ("queue", "numpy", []),
    B_BLOCK: ("blocking", "alloc", []), B_BLOCK_NP: ("blocking", "numpy", []),
    B_BLOCK_POLL: ("blocking", "alloc", ["--poll"]),
    B_AIO: ("asyncio", "alloc", []),
    B_AIO_UV: ("asyncio", "alloc", ["--loop=uvloop"]),
    B_AIO_BATCH: ("asyncio-batch", "alloc", []),
    B_BIG: ("blocking", "alloc", []), B_BIG_NP: ("blocking", "numpy", []),
    B_BIG_KNOBS: ("blocking", "alloc", [f"--chunk={MiB}",
                                        f"--chunk-depth={SEQ_DEPTH}"]),
}
# bench/contenders.py: (kind, extra options)
PEERS = {
    PREADV: ("preadv", []), LIBURING: ("liburing", []), CAIO: ("caio", []),
    AIOFILE: ("aiofile", []), PING: ("ping", []),
    PING_UV: ("ping", ["--loop=uvloop"]),
    PING_EACH: ("ping", ["--resolve=each"]), PY_CALL: ("call", []),
    NP_FROMFILE: ("fromfile", []), FILE_READINTO: ("readinto", []),
    NP_TOFILE: ("tofile", ["--flush"]), FILE_WRITE: ("write", ["--flush"]),
}
# what a contender needs, checked once at setup (Env.probe)
NEEDS = {B_AIO_BATCH: "aio_batch", B_AIO_UV: "uvloop", PING_UV: "uvloop",
         LIBURING: "liburing", B_COPY: "copy", B_COPY_BLKIO: "copy",
         QEMU_IMG: "qemu-img", QEMU_IMG_NBD: "qemu-img", DD: "dd",
         C_COPY: "c_copy", DD_FSYNC: "dd", QEMU_IMG_WB: "qemu-img",
         **{f: "fio" for f in (FIO, *FIO_QD.values())}}


def contenders_for(wl: Workload) -> list[str]:
    """Every contender that makes sense for a workload (the full suite)."""
    qd1 = wl.depth == 1
    asyncio_ok = wl.threads == 1
    if wl.backend == "cold":
        if wl.is_read:
            return [*FIO_QD.values(), NP_FROMFILE, FILE_READINTO, B_BIG,
                    B_BIG_NP]
        return [*FIO_QD.values(), NP_TOFILE, FILE_WRITE, B_BIG, B_BIG_NP]
    if wl.backend == "copy":
        return [QEMU_IMG, DD, C_COPY, B_COPY, B_COPY_BLKIO]
    if wl.backend == "vcopy":
        return [QEMU_IMG_NBD, C_COPY, B_COPY]
    if wl.backend in PLAIN_COPY_TITLES:
        return list(PLAIN_COPY_CONTENDERS)
    if wl.bs >= MiB:                  # sequential 1 MiB
        out = [C_BENCH]
        if wl.backend != "vhost":
            out += [FIO]
        out += [B_BATCH]
        if wl.backend == "vhost" and wl.depth == SEQ_DEPTH:
            out += [B_BIG, B_BIG_KNOBS]
        return out
    if wl.threads > 1 and qd1:        # thread pool rows
        return [C_BENCH, B_BLOCK] + ([C_AA] if aa_control(wl) else [])
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
        if asyncio_ok and wl.depth > 1 and wl.is_read:
            out += [PING, PING_UV, PING_EACH]
        out += [B_BATCH, B_QUEUE]
        if qd1:
            out += [B_BLOCK, PY_CALL]
        if asyncio_ok:
            out += [B_AIO, B_AIO_UV]
        if asyncio_ok and wl.depth > 1:
            out += [B_AIO_BATCH]
        if aa_control(wl):
            out += [C_AA]
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
    if aa_control(wl):
        out += [C_AA]
    return out


def aa_control(wl: Workload) -> bool:
    """The workloads that run the A/A control: those of the 4 KiB goals
    against C blkio-bench (the thread rows: at 2 threads, for each backend
    and direction)."""
    if wl.bs != K4:
        return False
    if wl.threads > 1 and wl.depth == 1:
        return wl.threads == 2
    if wl.backend == "file":
        return wl.rw == "randread" and wl.depth in (1, 32)
    return wl.backend == "vhost" and wl.rw == "randread" and wl.depth == 32 \
        and wl.threads == 1


def thread_workloads(backends=("vhost", "direct"),
                     rws=("randread", "randwrite")) -> list[Workload]:
    return [Workload(b, rw, K4, 1, n) for b in backends for rw in rws
            for n in THREAD_COUNTS]


def bulk_workloads(size: int) -> list[Workload]:
    return [Workload("cold", "read", size, 0), Workload("cold", "write", size, 0),
            Workload("vhost", "read", MiB, SEQ_DEPTH),
            Workload("copy", "copy", size, 0), Workload("vcopy", "copy", size, 0)]


def short_cases(size: int) -> list[Case]:
    """The cases every goal needs, and a few references beside them."""
    F, V = "file", "vhost"
    spec: list[tuple[Workload, list[str]]] = [
        (Workload(F, "randread", K4, 1), [C_BENCH, C_REF, B_BLOCK, PY_CALL, FIO]),
        (Workload(F, "randread", K4, 32),
         [C_BENCH, B_BATCH, PING, PING_UV, B_AIO, B_AIO_UV, B_AIO_BATCH, FIO]),
        (Workload(F, "randread", K4, 32, threads=2), [C_BENCH, B_BATCH]),
        (Workload(V, "randread", K4, 1), [C_BENCH, C_REF, B_BLOCK]),
        (Workload(V, "randread", K4, 32), [C_BENCH, B_BATCH, B_QUEUE_NP]),
        # np.fromfile and ndarray.tofile (3x and 6x slower than file.readinto
        # and file.write here, 30 s a repetition) run in the full suite
        (Workload("cold", "read", size, 0),
         [*FIO_QD.values(), FILE_READINTO, B_BIG]),
        (Workload("cold", "write", size, 0),
         [*FIO_QD.values(), FILE_WRITE, B_BIG]),
        (Workload(V, "read", MiB, SEQ_DEPTH), [C_BENCH, B_BIG_KNOBS]),
        (Workload("copy", "copy", size, 0), [QEMU_IMG, DD, B_COPY]),
        (Workload("vcopy", "copy", size, 0), [QEMU_IMG_NBD, B_COPY]),
    ]
    spec += [(wl, list(PLAIN_COPY_CONTENDERS)) for wl in plain_copy_workloads(size)]
    # the O_DIRECT write rows run in the full suite
    for wl in thread_workloads(rws=("randread",)) + thread_workloads(
            backends=("vhost",), rws=("randwrite",)):
        if wl.backend == V and wl.threads == 1 and wl.rw == "randread":
            continue                   # the same as the vhost qd1 row above
        spec.append((wl, [C_BENCH, B_BLOCK]))
    return [Case(wl, c) for wl, cs in spec
            for c in cs + ([C_AA] if aa_control(wl) else [])]


def full_cases(size: int) -> list[Case]:
    wls: list[Workload] = []
    for rw in ("randread", "randwrite"):
        for qd in (1, 8, 32, 128):
            wls.append(Workload("file", rw, K4, qd))
    for qd in (1, 8):
        wls.append(Workload("file", "read", MiB, qd))
    for qd in (1, 32):
        wls.append(Workload("file", "randread", K4, qd, threads=2))
    for qd in (1, 32):
        wls.append(Workload("direct", "randread", K4, qd))
    for qd in (1, 32):
        wls.append(Workload("vhost", "randread", K4, qd))
    wls.append(Workload("vhost", "randwrite", K4, 32))
    wls.append(Workload("vhost", "randread", K4, 32, threads=2))
    wls += [wl for wl in thread_workloads() if wl not in wls]
    wls += bulk_workloads(size)
    wls += plain_copy_workloads(size)
    return [Case(wl, c) for wl in wls for c in contenders_for(wl)]


# --------------------------------------------------------------------------
# goals (issues 12, 13, 15): each one ratio of case medians and a threshold


@dataclasses.dataclass(frozen=True)
class Serial:
    """Several cases' work done one after the other for each request: the
    rate 1 / sum(1 / rate_i).  An asyncio await of a request costs at least
    an await with no I/O (bare future-ping) plus the I/O with no Python (C
    blkio-bench): on a page-cached file both run on the caller's CPU.
    A part may be a tuple: the best of those cases."""
    keys: tuple


CaseRef = Union[str, tuple, Serial]   # one case key; a tuple: the best of them


@dataclasses.dataclass(frozen=True)
class Goal:
    """numerator / denominator >= threshold (the denominator a case, or the
    best of several); with ``floor``, also numerator >= that case (e.g. N
    threads never below 1 thread). threshold None: tracked, no verdict."""
    name: str
    issue: int
    num: str
    den: CaseRef
    threshold: Optional[float]
    floor: Optional[str] = None


def _k(wl: Workload, contender: str) -> str:
    return Case(wl, contender).key


def goals(size: int) -> list[Goal]:
    F, V = "file", "vhost"
    f1 = Workload(F, "randread", K4, 1)
    f32 = Workload(F, "randread", K4, 32)
    f32t2 = Workload(F, "randread", K4, 32, threads=2)
    v1 = Workload(V, "randread", K4, 1)
    v32 = Workload(V, "randread", K4, 32)
    cr, cw = Workload("cold", "read", size, 0), Workload("cold", "write", size, 0)
    vseq = Workload(V, "read", MiB, SEQ_DEPTH)
    cp, vcp = Workload("copy", "copy", size, 0), Workload("vcopy", "copy", size, 0)
    out = [
        Goal("batch 4K randread QD32 / C blkio-bench, page-cached file", 13,
             _k(f32, B_BATCH), _k(f32, C_BENCH), 0.97),
        Goal("blocking 4K randread QD1 / C ref_blocking, page-cached file", 13,
             _k(f1, B_BLOCK), _k(f1, C_REF), 0.92),
        Goal("blocking 4K randread QD1 / its floor: a bare Python call loop "
             "then C ref_blocking, 1/(1/loop + 1/C)", 13, _k(f1, B_BLOCK),
             Serial((_k(f1, PY_CALL), _k(f1, C_REF))), None),
        Goal("vhost-user QD32 batch, alloc'd memory / C blkio-bench", 13,
             _k(v32, B_BATCH), _k(v32, C_BENCH), 0.95),
        Goal("vhost-user QD32 queue API, plain numpy (bounced) / C blkio-bench",
             13, _k(v32, B_QUEUE_NP), _k(v32, C_BENCH), 0.90),
        Goal("2 threads, batch QD32 / C --num-threads=2, page-cached file", 13,
             _k(f32t2, B_BATCH), _k(f32t2, C_BENCH), 0.95),
        Goal("asyncio per request QD32 / bare asyncio future-ping QD32", 13,
             _k(f32, B_AIO), _k(f32, PING), 0.9),
        Goal("asyncio per request QD32 / its floor: bare asyncio future-ping "
             "then C blkio-bench QD32, 1/(1/ping + 1/C)", 13, _k(f32, B_AIO),
             Serial((_k(f32, PING), _k(f32, C_BENCH))), None),
        Goal("asyncio per request QD32 on uvloop / bare uvloop future-ping",
             13, _k(f32, B_AIO_UV), _k(f32, PING_UV), None),
        Goal("asyncio batch await QD32 / C blkio-bench QD32", 13,
             _k(f32, B_AIO_BATCH), _k(f32, C_BENCH), 0.8),
        Goal("vhost-user blocking QD1 / C ref_blocking", 13,
             _k(v1, B_BLOCK), _k(v1, C_REF), None),
        Goal(f"{_size(size, True)} read into numpy, O_DIRECT cold / best fio "
             "qd1/8/32 at 1 MiB", 12,
             _k(cr, B_BIG), tuple(_k(cr, f) for f in FIO_QD.values()), 0.95),
        Goal(f"{_size(size, True)} read into numpy, O_DIRECT cold / best of "
             "np.fromfile, file.readinto (cold)", 12,
             _k(cr, B_BIG), (_k(cr, NP_FROMFILE), _k(cr, FILE_READINTO)), 1.5),
        Goal(f"{_size(size, True)} write from numpy + flush, O_DIRECT / best "
             "fio qd1/8/32 at 1 MiB + fsync", 12,
             _k(cw, B_BIG), tuple(_k(cw, f) for f in FIO_QD.values()), 0.95),
        Goal(f"{_size(size, True)} write from numpy + flush, O_DIRECT / best "
             "of ndarray.tofile, file.write (+ fsync)", 12,
             _k(cw, B_BIG), (_k(cw, NP_TOFILE), _k(cw, FILE_WRITE)), 1.5),
        Goal(f"vhost-user 1 MiB sequential read, 8 MiB calls depth={SEQ_DEPTH} / "
             f"C blkio-bench --blocksize=1M --iodepth={SEQ_DEPTH}", 12,
             _k(vseq, B_BIG_KNOBS), _k(vseq, C_BENCH), 0.95),
        Goal("copy raw -> raw, O_DIRECT / best of qemu-img convert, dd", 12,
             _k(cp, B_COPY), (_k(cp, QEMU_IMG), _k(cp, DD)), 1.0),
        Goal("copy raw file -> vhost-user / best of qemu-img convert, dd "
             "(raw -> raw: neither writes to vhost-user)", 12,
             _k(vcp, B_COPY), (_k(cp, QEMU_IMG), _k(cp, DD)), 1.0),
        Goal("copy raw file -> vhost-user / qemu-img convert of the same "
             "file into the same daemon's NBD export of the same target", 12,
             _k(vcp, B_COPY), _k(vcp, QEMU_IMG_NBD), 1.0),
    ]
    # Tracked: a copy on one disk reads and writes every byte; the best fio
    # read and the best fio write of the same size, one after the other,
    # say what the disk allows a copier, dd included.
    disk = Serial((tuple(_k(cr, f) for f in FIO_QD.values()),
                   tuple(_k(cw, f) for f in FIO_QD.values())))
    out += plain_copy_goals(size)
    for who, key in (("copy", _k(cp, B_COPY)), ("dd", _k(cp, DD))):
        out.append(Goal(
            f"{who} raw -> raw / its floor: the best fio {_size(size, True)} "
            "read then the best fio write, 1/(1/read + 1/write)", 12,
            key, disk, None))
    # A/A controls: C blkio-bench against itself, same command, same run.
    # Tracked, not goals: how far apart two identical contenders land here.
    for wl in (f1, f32, f32t2, v32):
        out.append(_aa_goal(wl, 13))
    for wl in thread_workloads():
        what = {"vhost": "vhost-user", "direct": "O_DIRECT file"}[wl.backend]
        one = dataclasses.replace(wl, threads=1)
        out.append(Goal(
            f"{wl.threads} thread{'s' if wl.threads > 1 else ''} blocking "
            f"{wl.rw} on one device / C --num-threads={wl.threads} "
            f"--iodepth=1, {what}", 15,
            _k(wl, B_BLOCK), _k(wl, C_BENCH), 0.9,
            floor=_k(one, B_BLOCK) if wl.threads > 1 else None))
        if aa_control(wl):
            out.append(_aa_goal(wl, 15))
    return out


def _aa_goal(wl: Workload, issue: int) -> Goal:
    where = {"file": "page-cached file", "vhost": "vhost-user",
             "direct": "O_DIRECT file"}[wl.backend]
    return Goal(f"A/A control: C blkio-bench / the same command again, 4K "
                f"{wl.rw} QD{wl.depth}, {wl.threads} thread"
                f"{'s' if wl.threads > 1 else ''}, {where}", issue,
                _k(wl, C_AA), _k(wl, C_BENCH), None)


def _fig(summary: dict, key: str) -> tuple[Optional[float], str]:
    """A case's median (requests/s in its workload's unit), or why not."""
    e = summary.get(key)
    if e is None:
        return None, f"not run in this suite ({key})"
    if "iops_median" in e:
        return e["iops_median"], ""
    why = "; ".join(e.get("errors", ["no result"]))
    return None, f"{e['contender']}: {why}"


def _own_fig(summary: dict, key: str) -> Optional[float]:
    """blkio copy's figure from its own timing (opening the ends to the
    flush, no process start), in the unit of _fig."""
    e = summary.get(key) or {}
    if "own_mbps_median" not in e:
        return None
    return e["own_mbps_median"] * MB / e["workload"]["bs"]


def _rep_figs(summary: dict, key: str) -> list[Optional[float]]:
    e = summary.get(key) or {}
    return list(e.get("iops_by_rep", []))


def _best(summary: dict, ref: CaseRef) -> tuple[Optional[float], str, str]:
    """(figure, which case, why not): the best of a tuple of cases, among
    those this suite runs; one that ran and failed leaves no denominator."""
    if isinstance(ref, Serial):
        total, chosen = 0.0, []
        for part in ref.keys:
            v, which, why = _best(summary, part)
            if v is None or v <= 0:
                return None, "", why or f"no figure for {part}"
            total += 1.0 / v
            chosen.append(which)
        return 1.0 / total, " then ".join(chosen), ""
    keys = ref if isinstance(ref, tuple) else (ref,)
    best, which = None, ""
    ran = [k for k in keys if k in summary]
    if not ran:
        return None, "", f"not run in this suite ({', '.join(keys)})"
    for k in ran:
        v, why = _fig(summary, k)
        if v is None:
            return None, "", why
        if best is None or v > best:
            best, which = v, k
    return best, which, ""


def _den_reps(summary: dict, ref: CaseRef) -> list[list[Optional[float]]]:
    """The denominator's figures per repetition, one list per case it takes
    the best of (a Serial: one list, combined rep by rep)."""
    if isinstance(ref, Serial):
        # each part's best case rep by rep, then the parts in series
        reps = [_best_by_rep(_den_reps(summary, part)) for part in ref.keys]
        n = min((len(r) for r in reps), default=0)
        return [[1.0 / sum(1.0 / r[i] for r in reps)
                 if all(r[i] for r in reps) else None for i in range(n)]]
    keys = ref if isinstance(ref, tuple) else (ref,)
    return [_rep_figs(summary, k) for k in keys if k in summary]


def _best_by_rep(lists: list[list[Optional[float]]]) -> list[Optional[float]]:
    """Rep i: the best of the lists' rep i, or None where one lacks it."""
    n = min((len(r) for r in lists), default=0)
    return [max(r[i] for r in lists) if all(r[i] for r in lists) else None
            for i in range(n)]


def evaluate(goal: Goal, summary: dict) -> dict:
    """The goal's ratios and verdict: met, missed, info, n/a."""
    num, why = _fig(summary, goal.num)
    den, den_key, why_den = _best(summary, goal.den)
    out = {"name": goal.name, "issue": goal.issue, "numerator": goal.num,
           "denominator": (list(goal.den) if isinstance(goal.den, tuple)
                           else {"serial": list(goal.den.keys)}
                           if isinstance(goal.den, Serial) else goal.den),
           "threshold": goal.threshold,
           "numerator_figure": num, "denominator_figure": den,
           "denominator_best": den_key or None}
    if num is None or den is None or den == 0:
        why = why or why_den
        out.update(verdict="not run" if why.startswith("not run") else "n/a",
                   why=why)
        return out
    ratio = num / den
    out["ratio"] = round(ratio, 4)
    # per repetition: rep i of the numerator over the best of rep i's
    # denominators (interleaved, so rep i ran within the same minutes)
    nums = _rep_figs(summary, goal.num)
    dens = _best_by_rep(_den_reps(summary, goal.den))
    out["ratio_by_rep"] = [round(n / dens[i], 4) if n and i < len(dens) and dens[i]
                           else None for i, n in enumerate(nums)]
    own = _own_fig(summary, goal.num)
    if own is not None:
        out["ratio_without_start"] = round(own / den, 4)
    aa = _aa_ratio(goal, summary)
    if aa is not None:
        out["aa_ratio"] = aa
    short = []
    if goal.threshold is not None and ratio < goal.threshold:
        short.append(f"{ratio:.2f} < {goal.threshold:g} "
                     f"(short by {(1 - ratio / goal.threshold) * 100:.1f}%)")
    if goal.floor is not None:
        base, why_floor = _fig(summary, goal.floor)
        if base is None:
            out.update(verdict="n/a", why=why_floor)
            return out
        out["floor"] = goal.floor
        out["floor_figure"] = base
        out["floor_ratio"] = round(num / base, 4)
        if num < base:
            short.append(f"below the 1-thread figure ({num / base:.2f}x)")
    if goal.threshold is None and goal.floor is None:
        out["verdict"] = "info"
    else:
        out["verdict"] = "missed" if short else "met"
    if short:
        out["missed_by"] = "; ".join(short)
    return out


def _aa_ratio(goal: Goal, summary: dict) -> Optional[float]:
    """The A/A control's ratio in the numerator's workload, where it ran:
    how far apart two identical C programs landed beside this goal."""
    m = re.match(r"^(.*?/t\d+)/", goal.num)
    if not m or goal.num.endswith(C_AA):
        return None
    a, _ = _fig(summary, f"{m.group(1)}/{C_AA}")
    c, _ = _fig(summary, f"{m.group(1)}/{C_BENCH}")
    return round(a / c, 4) if a and c else None


def verdict_line(g: dict, unit_of) -> str:
    v = g["verdict"]
    tag = {"met": "met   ", "missed": "MISSED", "info": "info  ",
           "n/a": "n/a   ", "not run": "-     "}[v]
    if v == "n/a":
        return f"  {tag}  {g['name']}: not available ({g['why']})"
    if v == "not run":
        return f"  {tag}  {g['name']}: not in this suite (make bench-full)"
    figs = (f"[{unit_of(g['numerator'], g['numerator_figure'])} / "
            f"{unit_of(g['denominator_best'], g['denominator_figure'])}]")
    head = f"  {tag}  {g['ratio']:.2f}"
    if g["threshold"] is not None:
        head += f" (goal {g['threshold']:g})"
    if "floor_ratio" in g:
        head += f", {g['floor_ratio']:.2f}x the 1-thread figure"
    line = f"{head}  {g['name']}  {figs}"
    reps = [r for r in g.get("ratio_by_rep") or [] if r is not None]
    if len(reps) > 1:
        line += f"  reps {' '.join(f'{r:.2f}' for r in reps)}"
    if g.get("ratio_without_start") is not None:
        line += f"  (without its process start: {g['ratio_without_start']:.2f})"
    if g.get("aa_ratio") is not None:
        line += f"  (A/A here: {g['aa_ratio']:.2f})"
    if v == "missed":
        line += f"  -- missed: {g['missed_by']}"
    return line


# --------------------------------------------------------------------------
# environment: files, C programs, qemu-storage-daemon


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_image(path: Path, size: int, cache: bool) -> None:
    """A real (not sparse) file of random data; in the page cache or not."""
    t0 = time.perf_counter()
    chunk = 64 << 20
    seed = os.urandom(chunk)
    with open(path, "wb", buffering=0) as f:
        written = 0
        n = 0
        while written < size:
            k = min(chunk, size - written)
            # vary every chunk so no two 4 KiB blocks repeat
            head = (n + (hash(path.name) & 0xFFFF) * 65536).to_bytes(
                8, "little") * 512
            f.write(head + seed[len(head):k] if k > len(head) else seed[:k])
            written += k
            n += 1
        os.fsync(f.fileno())
    if cache:
        warm(path)
    else:
        drop_cache(path)
    log(f"  {path} ({size >> 20} MiB) written"
        f"{' and cached' if cache else ''} in {time.perf_counter() - t0:.1f} s")


def warm(path: Path) -> None:
    """Read a file once so that it is (back) in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def resident(path: Path) -> Optional[float]:
    """The share of the file's pages in the page cache (mincore on a
    mapping of it), or None where that cannot be asked."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in bytes(vec)) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_cache(path: Path) -> None:
    """Write back and drop the file's pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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


def _pin(cpu: int) -> list[str]:
    """``taskset -c N`` for CPU ``cpu`` (negative: from the end), or nothing
    when there is no taskset or only one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(cpus[cpu])]


class StorageDaemon:
    """qemu-storage-daemon exporting raw files as vhost-user-blk: the
    page-cached benchmark image (EXPORT_QUEUES queues, for the thread rows)
    and the copy target."""

    def __init__(self, image: Path, copy_target: Path, tmpdir: Path):
        self.sock = tmpdir / "vhost.sock"
        self.copy_sock = tmpdir / "vhost-copy.sock"
        self.nbd_sock = tmpdir / "nbd.sock"
        self.log_path = tmpdir / "qsd.log"
        # On a machine with few CPUs the daemon and the client fight for
        # them and vhost-user figures swing by 2x: give the daemon the last
        # CPU and single-threaded clients the first (the same for C and Python).
        self.cmd = [*_pin(-1), "qemu-storage-daemon"]
        for i, (img, sock, nq) in enumerate(((image, self.sock, EXPORT_QUEUES),
                                             (copy_target, self.copy_sock, 1))):
            self.cmd += [
                "--blockdev", f"driver=file,node-name=file{i},filename={img},"
                              "cache.direct=off" + (",locking=off" if i else ""),
                "--export", f"type=vhost-user-blk,id=exp{i},node-name=file{i},"
                            f"addr.type=unix,addr.path={sock},writable=on,"
                            f"num-queues={nq}"]
        # the copy target over NBD too, for qemu-img (QEMU_IMG_NBD).  An NBD
        # export takes the file's write lock at once, and the raw -> raw
        # copiers write the same file while the daemon idles: no lock on it
        self.cmd += ["--nbd-server",
                     f"addr.type=unix,addr.path={self.nbd_sock}",
                     "--export", "type=nbd,id=nbd1,node-name=file1,"
                                 f"name={NBD_EXPORT},writable=on"]
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
            if all(self._listening(s) for s in
                   (self.sock, self.copy_sock, self.nbd_sock)):
                log(f"  qemu-storage-daemon pid {self.proc.pid} listening")
                return
            time.sleep(0.05)
        raise RuntimeError("qemu-storage-daemon did not create its sockets")

    @staticmethod
    def _listening(path: Path) -> bool:
        if not path.exists():
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> Optional[float]:
        """The daemon's CPU time so far, all threads (user + system)."""
        if not self.alive():
            return None
        assert self.proc is not None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # utime and stime: fields 14 and 15 of proc(5), counted after the
        # command name's closing parenthesis from field 3
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def ensure_alive(self, why: str) -> Optional[str]:
        """Restart a dead daemon; an error message if that fails."""
        if self.alive():
            return None
        # QEMU 7.2's daemon aborts (vhost_user_server_ref: Assertion
        # `!server->wait_idle' failed) when a client that used several
        # queues disconnects: start a fresh one
        self.crashes.append(self.log_tail())
        log(f"  qemu-storage-daemon died {why} ({self.log_tail()}); "
            "restarting")
        self.stop()
        for s in (self.sock, self.copy_sock, self.nbd_sock):
            try:
                s.unlink()
            except FileNotFoundError:
                pass
        self.restarts += 1
        try:
            self.start()
        except (RuntimeError, OSError) as e:
            return f"qemu-storage-daemon restart failed: {e}"
        return None

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


@dataclasses.dataclass
class Command:
    argv: list[str]
    unit: int                 # bytes per request in the contender's output
    parse: str                # "bench" (blkio-bench JSON), "fio", "wall"


class Env:
    def __init__(self, args, tmpdir: Path):
        self.args = args
        self.tmpdir = tmpdir
        self.size = args.size << 20
        self.image = tmpdir / "disk.img"        # page-cached
        self.cold = tmpdir / "cold.img"         # O_DIRECT cases, copy input
        self.copy_out = tmpdir / "copy-out.img"   # both copies' target
        self.py = args.python
        self.c_bench: Path | None = None
        self.c_ref: Path | None = None
        self.c_copy: Path | None = None
        self.qsd: StorageDaemon | None = None
        self.missing: dict[str, str] = {}       # feature -> why not

    def probe(self, cases: Sequence[Case]) -> None:
        """Find out once what this machine and this build can run."""
        wanted = {NEEDS[c.contender] for c in cases if c.contender in NEEDS}
        wanted.add("blkio")

        def py_ok(code: str) -> tuple[bool, str]:
            r = subprocess.run([self.py, "-c", code], capture_output=True,
                               text=True, cwd=self.tmpdir, timeout=60)
            if r.returncode < 0:
                return False, f"dies with {signal.Signals(-r.returncode).name}"
            last = (r.stderr.strip().splitlines() or [""])[-1]
            return r.returncode == 0, last or r.stdout.strip()

        ok, why = py_ok("import blkio")
        if not ok:
            self.missing["blkio"] = f"blkio not importable ({why})"
        if "aio_batch" in wanted:
            ok, why = py_ok("import blkio.aio as a, sys; sys.exit(0 if "
                            "hasattr(a.AsyncDevice, 'read_batch') else 3)")
            if not ok:
                self.missing["aio_batch"] = (
                    "blkio.aio.AsyncDevice has no read_batch in this build")
        if "uvloop" in wanted:
            ok, why = py_ok("import uvloop")
            if not ok:
                self.missing["uvloop"] = f"uvloop not installed ({why})"
        if "liburing" in wanted:
            ok, why = py_ok(LIBURING_PROBE)
            if not ok:
                if "SIGILL" in why:
                    why += (" (PyPI liburing 2026.x wheels are built with "
                            "AVX-512 instructions, which this CPU lacks; the "
                            "Makefile builds 2024.5.3 from source instead)")
                self.missing["liburing"] = f"PyPI liburing: {why}"
        if "copy" in wanted:
            r = subprocess.run([self.py, "-m", "blkio", "copy", "--help"],
                               capture_output=True, text=True,
                               cwd=self.tmpdir, timeout=60)
            if r.returncode != 0:
                self.missing["copy"] = ("`python -m blkio copy` is not in this "
                                        "build")
        for tool in ("qemu-img", "dd", "fio"):
            if tool in wanted and not shutil.which(tool):
                self.missing[tool] = f"{tool} is not installed"
        if "c_copy" in wanted and self.c_copy is None:
            self.missing["c_copy"] = "blkio-copy.c did not compile"
        for feature, why in self.missing.items():
            log(f"  not available: {why}")

    def device_args(self, wl: Workload) -> tuple[str, list[str]]:
        if wl.backend == "vhost":
            assert self.qsd is not None
            return "virtio-blk-vhost-user", [f"path={self.qsd.sock}"]
        if wl.backend in ("direct", "cold"):
            return "io_uring", [f"path={self.cold}", "direct=true"]
        return "io_uring", [f"path={self.image}"]

    def command(self, case: Case, runtime: int) -> Command | str:
        """The command line, or a string saying why the case is skipped."""
        wl, c = case.wl, case.contender
        need = NEEDS.get(c)
        if need in self.missing:
            return self.missing[need]
        if wl.backend in ("vhost", "vcopy") and self.qsd is None:
            return "qemu-storage-daemon is not running"
        if wl.rw == "copy":
            return self.copy_command(wl, c)
        bs = wl.bs
        if wl.backend == "cold":
            # one call over the whole file (--requests=1): the library (or
            # the peer) does what it does with 1 GiB; fio: 1 MiB requests
            rw = wl.rw
            common = ["--readwrite=" + rw, f"--blocksize={bs}",
                      "--requests=1", f"--runtime={runtime + 60}"]
        else:
            rw = wl.rw
            common = [f"--num-threads={wl.threads}", f"--iodepth={wl.depth}",
                      f"--readwrite={rw}", f"--blocksize={bs}",
                      f"--runtime={runtime}"]
        driver, props = self.device_args(wl)
        if c in (C_BENCH, C_POLL, C_AA):
            extra = ["--poll"] if c == C_POLL else []
            return Command([str(self.c_bench), *common, *extra, driver,
                            *props], bs, "bench")
        if c == C_REF:
            return Command([str(self.c_ref), *common, driver, *props], bs,
                           "bench")
        if c in BLKIO_BENCH:
            if "blkio" in self.missing:
                return self.missing["blkio"]
            api, mem, extra = BLKIO_BENCH[c]
            unit = bs
            if c == B_BIG_KNOBS:
                # one call of depth x chunk bytes (8 MiB) after another: the
                # memory the daemon copies into is C blkio-bench's size
                # (depth x blocksize).  With a call over the whole 1 GiB the
                # destination is out of cache and both this and the batch API
                # fall to ~0.5 of C (2026-11-30), memory, not the pipeline.
                unit = SEQ_DEPTH * MiB
                common = [f"--readwrite={rw}", f"--blocksize={unit}",
                          f"--runtime={runtime}"]
            elif c in (B_BIG, B_BIG_NP) and wl.backend != "cold":
                # sequential: each request one call over the whole device
                unit = self.size
                common = [f"--readwrite={rw}", f"--blocksize={unit}",
                          f"--runtime={runtime}"]
            if wl.backend == "cold" and not wl.is_read:
                extra = [*extra, "--flush"]
            if api == "blocking" and wl.threads > 1:
                # a queue per thread where the library uses them (issue 15)
                props = [*props, f"num-queues={wl.threads}"]
            return Command([self.py, "-m", "blkio", "bench", *common,
                            f"--api={api}", f"--buffers={mem}", *extra,
                            driver, *props], unit, "bench")
        if c == FIO or c in FIO_QD.values():
            depth = wl.depth or int(c.rsplit("qd", 1)[1])
            path = self.image if wl.backend == "file" else self.cold
            cmd = ["fio", "--name=bench", f"--filename={path}",
                   "--ioengine=io_uring", f"--rw={rw}", f"--bs={min(bs, MiB)}",
                   f"--iodepth={depth}", f"--numjobs={wl.threads}",
                   "--thread", "--group_reporting",
                   "--norandommap", "--randrepeat=0",
                   f"--direct={0 if wl.backend == 'file' else 1}",
                   "--output-format=json"]
            if wl.backend == "cold":
                # one pass over the file; the fsync is inside fio's runtime
                cmd += [f"--size={bs}"] + ([] if wl.is_read
                                           else ["--end_fsync=1"])
            else:
                cmd += ["--time_based", f"--runtime={runtime}",
                        "--invalidate=0"]       # the page cache stays warm
            if wl.is_read:
                cmd.append("--readonly")
            cmd += fio_percentile_args()
            return Command(cmd, min(bs, MiB), "fio")
        kind, extra = PEERS[c]
        cmd = [self.py, str(HERE / "contenders.py"), kind, *common, *extra]
        if kind in ("ping", "call"):
            return Command(cmd, bs, "bench")
        if wl.backend == "direct":
            cmd.append("--direct")
        path = self.image if wl.backend == "file" else self.cold
        return Command([*cmd, str(path)], bs, "bench")

    def copy_command(self, wl: Workload, c: str) -> Command | str:
        if wl.backend in PLAIN_COPY_TITLES:
            return plain_copy_command(self, wl, c)
        src, dst = str(self.cold), str(self.copy_out)
        if wl.backend == "vcopy":
            assert self.qsd is not None
            out_blkio = ["virtio-blk-vhost-user", f"path={self.qsd.copy_sock}"]
            if c == QEMU_IMG_NBD:
                # the issue's qemu-img command, into the same daemon's
                # export of the same file, over NBD
                return Command(["qemu-img", "convert", "-f", "raw", "-O",
                                "raw", "-t", "none", "-T", "none", "-m", "8",
                                "-W", "-n", src,
                                f"nbd+unix:///{NBD_EXPORT}?socket="
                                f"{self.qsd.nbd_sock}"], wl.bs, "wall")
            if c == B_COPY:
                return Command([self.py, "-m", "blkio", "copy", *COPY_OPTS,
                                f"--input-file={src}",
                                f"--output-blkio={out_blkio[0]}",
                                *out_blkio[1:]], wl.bs, "wall")
            return Command([str(self.c_copy), "--input-blkio=io_uring",
                            f"path={src}", "direct=true",
                            f"--output-blkio={out_blkio[0]}", *out_blkio[1:]],
                           wl.bs, "wall")
        if c == B_COPY:
            # --input-file/--output-file with O_DIRECT through io_uring, as
            # the others here (by default a file to a file is copied by the
            # kernel through the page cache: the plain_copy rows)
            return Command([self.py, "-m", "blkio", "copy", *COPY_OPTS,
                            "--file-direct=on", f"--input-file={src}",
                            f"--output-file={dst}"], wl.bs, "wall")
        if c == B_COPY_BLKIO:
            return Command([self.py, "-m", "blkio", "copy", *COPY_OPTS,
                            "--input-blkio=io_uring", f"path={src}",
                            "direct=true", "--output-blkio=io_uring",
                            f"path={dst}", "direct=true"], wl.bs, "wall")
        if c == QEMU_IMG:
            # -n: into the existing (preallocated) output, as the others do
            return Command(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                            "-t", "none", "-T", "none", "-m", "8", "-W", "-n",
                            src, dst], wl.bs, "wall")
        if c == DD:
            # conv=notrunc: the existing output; fsync: flushed at the end
            # as the others are
            return Command(["dd", f"if={src}", f"of={dst}", "bs=1M",
                            "iflag=direct", "oflag=direct",
                            "conv=notrunc,fsync"], wl.bs, "wall")
        return Command([str(self.c_copy), "--input-blkio=io_uring",
                        f"path={src}", "direct=true", "--output-blkio=io_uring",
                        f"path={dst}", "direct=true"], wl.bs, "wall")


# --------------------------------------------------------------------------
# plain file copies as people run them (issue 30, item 5): a file in the page
# cache ("warm") or with every cache dropped first ("cold") copied to a new
# file and flushed, by blkio copy's defaults and by dd and qemu-img doing the
# same; whole commands, process start included.


def plain_copy_workloads(size: int) -> list[Workload]:
    """256 MiB warm, and the suite's size warm and cold (cold first: it
    drops the caches the warm rows then load again)."""
    out = [Workload("coldcopy", "copy", size, 0), Workload("warmcopy", "copy", size, 0)]
    if size != PLAIN_COPY_SMALL:
        out.append(Workload("warmcopy", "copy", PLAIN_COPY_SMALL, 0))
    return out


def plain_copy_goals(size: int) -> list[Goal]:
    small = Workload("warmcopy", "copy", PLAIN_COPY_SMALL, 0)
    out = [Goal("copy 256 MiB page-cached file -> new file / dd bs=1M conv=fsync "
                "(wall time within 1.5x)", 30, _k(small, B_COPY), _k(small, DD_FSYNC),
                1 / 1.5)]
    for wl in plain_copy_workloads(size)[:2]:
        state = "page-cached" if wl.backend == "warmcopy" else "cold (caches dropped)"
        out.append(Goal(f"copy {_size(size, True)} {state} file -> new file / best of "
                        "dd bs=1M conv=fsync, qemu-img convert -t writeback", 30,
                        _k(wl, B_COPY), (_k(wl, DD_FSYNC), _k(wl, QEMU_IMG_WB)), 1.0))
    return out


def plain_copy_source(env: Env, wl: Workload) -> Path:
    return env.tmpdir / f"plain-copy-{wl.bs >> 20}M.img"


def make_plain_copy_sources(env: Env, cases: Sequence[Case]) -> None:
    for wl in {c.wl for c in cases if c.wl.backend in PLAIN_COPY_TITLES}:
        src = plain_copy_source(env, wl)
        if not src.exists():
            make_image(src, wl.bs, cache=False)


def plain_copy_command(env: Env, wl: Workload, c: str) -> Command | str:
    src, dst = plain_copy_source(env, wl), env.tmpdir / "plain-copy-out.img"
    if c == DD_FSYNC:
        return Command(["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync"],
                       wl.bs, "wall")
    if c == QEMU_IMG_WB:
        # -t writeback: flushed at the end (its default cache mode never is)
        return Command(["qemu-img", "convert", "-f", "raw", "-O", "raw", "-t",
                        "writeback", str(src), str(dst)], wl.bs, "wall")
    if c == B_COPY:
        # the console script, as people type it, where there is one
        script = Path(env.py).parent / "blkio"
        cmd = [str(script)] if script.exists() else [env.py, "-m", "blkio"]
        return Command([*cmd, "copy", *COPY_OPTS, f"--input-file={src}",
                        f"--output-file={dst}"], wl.bs, "wall")
    return f"{c} is not a plain copy contender"


def drop_all_caches() -> bool:
    """echo 3 > /proc/sys/vm/drop_caches (after a sync); False where that
    is not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def prepare_plain_copy(env: Env, wl: Workload) -> None:
    """A new output every time; the source (and for warm rows every
    contender's program and libraries) in the page cache, or nothing."""
    (env.tmpdir / "plain-copy-out.img").unlink(missing_ok=True)
    src = plain_copy_source(env, wl)
    if wl.backend == "coldcopy":
        if not drop_all_caches():
            env.missing.setdefault("drop_caches", "/proc/sys/vm/drop_caches is not "
                                   "writable: cold copies dropped only the source's pages")
            drop_cache(src)
        return
    os.sync()
    warm(src)
    for argv in (["dd", "--version"], ["qemu-img", "--version"],
                 [env.py, "-c", "import blkio._copy"]):
        subprocess.run(argv, capture_output=True, cwd=env.tmpdir)


# blkio copy: no progress output (qemu-img without -p prints none either);
# its JSON summary goes into the raw figures beside the wall-clock one
COPY_OPTS = ["--progress=none", "--json"]

# Builds of PyPI liburing 2026.x are compiled for AVX-512 (their Ring()
# constructor zeroes memory with vmovups %zmm0) and die with SIGILL on CPUs
# without it; bench/README.md says more.
LIBURING_PROBE = ("import liburing as L\n"
                  "ring = L.io_uring() if hasattr(L, 'io_uring') else L.Ring()\n"
                  "assert hasattr(L, 'io_uring_peek_cqe'), "
                  "'not the 2024.5.3 API: ' + getattr(L, '__version__', '?')")


def parse_output(cmd: Command, stdout: str, wall: float,
                 wl: Workload) -> tuple[float, dict]:
    """Bytes per second, and the raw figures worth keeping."""
    if cmd.parse == "wall":
        raw: dict = {"wall_s": round(wall, 4)}
        if stdout.lstrip().startswith("{"):       # blkio copy --json
            own = json.loads(stdout)
            raw.update(own_seconds=own.get("seconds"),
                       own_mib_per_s=own.get("mib_per_s"))
        return wl.bs / wall, raw
    data = json.loads(stdout[stdout.index("{"):])   # fio may warn first
    if cmd.parse == "fio":
        job = data["jobs"][0]
        part = job["read" if wl.is_read else "write"]
        return float(part["bw_bytes"]), {
            "iops": part["iops"], "runtime_ms": part["runtime"],
            "bw_bytes": part["bw_bytes"],
            "clat_mean_us": round(part.get("clat_ns", {}).get("mean", 0)
                                  / 1000, 3),
            **fio_percentiles(part)}
    agg = dict(data["aggregate"])
    if "cpu" in data:       # blkio's and the Python peers' own CPU figure
        agg["cpu_us_per_request"] = data["cpu"]["us_per_request"]
    if cmd.unit >= MiB:
        bps = float(agg["gips"]) * GiB     # kiops has too few digits here
    else:
        bps = float(agg["kiops"]) * 1000.0 * cmd.unit
    return bps, agg


def run_case(env: Env, case: Case, runtime: int) -> dict:
    cmd = env.command(case, runtime)
    if isinstance(cmd, str):
        return {"ok": False, "error": cmd, "skipped": True}
    wl = case.wl
    if wl.backend in ("vhost", "vcopy"):
        assert env.qsd is not None
        err = env.qsd.ensure_alive("before this case")
        if err:
            return {"ok": False, "skipped": True, "error": err}
    cache_before = None
    if wl.backend in ("file", "vhost"):
        # The page-cached image (which the vhost-user daemon exports too)
        # is read back in before each case: this machine's proactive
        # reclaim (DAMON pageout of pages idle for about a minute) takes
        # back pages while other cases run, and the first contender after
        # that would read from the disk.  The share found resident is kept.
        cache_before = resident(env.image)
        if cache_before is None or cache_before < 1.0:
            warm(env.image)
    if wl.backend in PLAIN_COPY_TITLES:
        prepare_plain_copy(env, wl)
    elif wl.backend == "cold" or wl.rw == "copy":
        drop_cache(env.cold)
        if wl.rw == "copy":
            drop_cache(env.copy_out)
    argv = cmd.argv
    if wl.backend in ("vhost", "vcopy"):
        # every vhost-user client on the first CPU, the daemon on the last
        # (StorageDaemon): the same placement for C and Python, and for 1
        # thread and N threads, so the thread rows compare like with like
        argv = [*_pin(0), *argv]
    timeout = runtime + 60 if not (wl.bulk and wl.depth == 0) else 300
    # CPU use of the client (this child: the run waits for it) and of the
    # vhost-user daemon: whether a side was busy or waiting for the other
    daemon = env.qsd if wl.backend in ("vhost", "vcopy") else None
    d0 = daemon.cpu_seconds() if daemon else None
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL,
                           cwd=env.tmpdir)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s",
                "cmd": argv}
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    d1 = daemon.cpu_seconds() if daemon else None
    cpu = {"client_cpu_s": round(ru1.ru_utime + ru1.ru_stime
                                 - ru0.ru_utime - ru0.ru_stime, 4),
           "runtime": runtime}
    if d0 is not None and d1 is not None:
        cpu["daemon_cpu_s"] = round(d1 - d0, 4)
    if wl.backend == "vhost" and wl.threads > 1 and env.qsd:
        # see ensure_alive: the daemon dies a moment after a multi-queue
        # client leaves; restart it now so the next case finds it listening
        time.sleep(0.2)
        env.qsd.ensure_alive(f"after a {wl.threads}-queue client")
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else f"exit status {r.returncode}"
        if r.returncode < 0:
            msg = f"killed by {signal.Signals(-r.returncode).name}: {msg}"
        return {"ok": False, "error": msg[:300], "cmd": argv, "wall": wall}
    try:
        bps, raw = parse_output(cmd, r.stdout, wall, wl)
    except (ValueError, KeyError, IndexError) as e:
        return {"ok": False, "error": f"unparsable output ({e})", "cmd": argv,
                "wall": wall}
    if case.contender in (DD, DD_FSYNC):
        m = re.search(r"copied, ([\d.]+) s", r.stderr)
        if m:
            raw["dd_own_seconds"] = float(m.group(1))
    out = {"ok": True, "iops": bps / wl.bs, "bps": bps, "raw": raw,
           "cmd": argv, "wall": round(wall, 3), **cpu}
    if cache_before is not None:
        out["image_resident_before"] = round(cache_before, 4)
    return out


def estimate_s(case: Case, runtime: int) -> float:
    """A rough duration per repetition, for the log (fitted to the wall
    times of a short-suite run on the 2-CPU machine, 2026-12-04)."""
    wl = case.wl
    gib = wl.bs / GiB
    if wl.rw == "copy":
        return 1.1 * gib + 0.2
    if wl.backend == "cold":
        return (3.3 if case.contender == FILE_READINTO
                else 1.7 if case.contender == FILE_WRITE
                else 1.0 if case.contender in (B_BIG, B_BIG_NP)
                else 0.6) * gib + 0.2
    if case.contender in (B_BIG, B_BIG_NP, B_BIG_KNOBS):
        return runtime + 0.15
    python = case.contender.startswith(("blkio", "py", "bare", "caio",
                                        "aiofile", "liburing"))
    return runtime + (0.17 if python else 0.01)


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
                 "iops_all": good,
                 "iops_by_rep": [r["iops"] if r.get("ok") else None
                                 for r in rs],
                 "mbps_all": [round(r["bps"] / MB, 2) for r in rs
                              if r.get("ok")]}
        own = [r["raw"]["own_mib_per_s"] * MiB / MB for r in rs
               if r.get("ok") and r.get("raw", {}).get("own_mib_per_s")]
        if own:         # blkio copy's own figure, without process start
            entry["own_mbps_median"] = round(statistics.median(own), 1)
        if not case.wl.bulk:
            entry.update(cpu_figures(rs))
            entry.update(latency_figures(rs))
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


def cpu_figures(rs: list[dict]) -> dict:
    """Medians over the good repetitions of a timed-run case: the client's
    CPU microseconds per request (blkio's own figure for its timed run;
    for the others, the whole process's, whose start costs them a few
    milliseconds) and the vhost-user daemon's share of one CPU and its
    microseconds per request."""
    client, busy, daemon = [], [], []
    for r in rs:
        if not r.get("ok") or not r.get("iops"):
            continue
        n = r["iops"] * r["runtime"]
        own = r["raw"].get("cpu_us_per_request")
        if own:
            client.append(own)
        elif "client_cpu_s" in r:
            client.append(r["client_cpu_s"] / n * 1e6)
        if "daemon_cpu_s" in r:
            busy.append(r["daemon_cpu_s"] / r["runtime"])
            daemon.append(r["daemon_cpu_s"] / n * 1e6)
    out = {}
    for name, vs in (("client_cpu_us_per_request", client),
                     ("daemon_busy", busy),
                     ("daemon_cpu_us_per_request", daemon)):
        if vs:
            out[name] = round(statistics.median(vs), 3)
    return out


# --------------------------------------------------------------------------
# latency percentiles beside fio's (issue 33)

#: the percentiles kept from every run that reports them (blkio's lat_us
#: keys; fio's clat and lat percentiles under the same names)
LAT_KEYS = ("p50", "p99")
#: (the workload, the blkio API timed at its depth) of the percentile rows
LATENCY_ROWS = ((Workload("file", "randread", K4, 1), B_BLOCK),
                (Workload("file", "randread", K4, 32), B_BATCH))


def fio_percentile_args() -> list[str]:
    """fio reports completion latency (clat: from the request's submission
    to its completion) and total latency (lat: from before the submit call
    on, as blkio times a request) at these percentiles."""
    return ["--clat_percentiles=1", "--lat_percentiles=1",
            "--percentile_list=50:90:99:99.9:99.99"]


def fio_percentiles(part: dict) -> dict:
    """fio's clat and lat p50/p99 from one direction of its JSON, in µs."""
    out = {}
    for kind in ("clat", "lat"):
        pct = part.get(f"{kind}_ns", {}).get("percentile", {})
        for key in LAT_KEYS:
            v = pct.get(f"{float(key[1:]):.6f}")
            if v is not None:
                out[f"{kind}_{key}_us"] = round(v / 1000, 3)
    return out


def latency_figures(rs: list[dict]) -> dict:
    """Medians over the good repetitions of a case's latency percentiles:
    blkio's ``lat_us`` (every request timed), fio's clat and lat."""
    found: dict[str, list[float]] = {}
    for r in rs:
        if not r.get("ok"):
            continue
        raw = r.get("raw", {})
        for key in LAT_KEYS:
            figures = {f"lat_{key}_us": raw.get("lat_us", {}).get(key)}
            if "clat_p50_us" in raw:         # fio: clat and lat
                figures = {f"clat_{key}_us": raw.get(f"clat_{key}_us"),
                           f"lat_{key}_us": raw.get(f"lat_{key}_us")}
            for name, v in figures.items():
                if v is not None:
                    found.setdefault(name, []).append(v)
    return {f"{name}_median": round(statistics.median(vs), 3)
            for name, vs in found.items() if vs}


def latency_rows(summary: dict) -> list[dict]:
    """blkio's p50/p99 beside fio's at 4 KiB randread QD1 and QD32, same
    file, with the ratios blkio / fio (below 1: blkio's requests complete
    sooner)."""
    rows = []
    for wl, contender in LATENCY_ROWS:
        b = summary.get(Case(wl, contender).key)
        f = summary.get(Case(wl, FIO).key)
        if not b or not f:
            continue
        row = {"workload": wl.key, "blkio": contender}
        for key in LAT_KEYS:
            ours = b.get(f"lat_{key}_us_median")
            row[f"blkio_{key}_us"] = ours
            for kind in ("clat", "lat"):
                theirs = f.get(f"{kind}_{key}_us_median")
                row[f"fio_{kind}_{key}_us"] = theirs
                row[f"ratio_{kind}_{key}"] = (round(ours / theirs, 3)
                                              if ours and theirs else None)
        rows.append(row)
    return rows


def latency_table(summary: dict) -> list[str]:
    """The percentile rows, as a markdown table (none if not run)."""
    rows = latency_rows(summary)
    if not rows:
        return []

    def us(v) -> str:
        return f"{v:.1f}" if v is not None else "-"

    def ratio(v) -> str:
        return f"{v:.2f}" if v is not None else "-"

    lines = ["", "### 4 KiB random read latency (µs), page-cached file: blkio "
             "beside fio io_uring", "",
             "blkio times every request from before its submit call to its "
             "reap (fio's lat); fio's clat starts after the submit call. "
             "C blkio-bench reports no percentiles.", "",
             "| iodepth | blkio API | blkio p50 | fio clat p50 | fio lat p50 | "
             "p50 / clat | p50 / lat | blkio p99 | fio clat p99 | fio lat p99 | "
             "p99 / clat | p99 / lat |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        depth = r["workload"].split("/qd")[1].split("/")[0]
        lines.append(
            f"| {depth} | {r['blkio']} | {us(r['blkio_p50_us'])} | "
            f"{us(r['fio_clat_p50_us'])} | {us(r['fio_lat_p50_us'])} | "
            f"{ratio(r['ratio_clat_p50'])} | {ratio(r['ratio_lat_p50'])} | "
            f"{us(r['blkio_p99_us'])} | {us(r['fio_clat_p99_us'])} | "
            f"{us(r['fio_lat_p99_us'])} | {ratio(r['ratio_clat_p99'])} | "
            f"{ratio(r['ratio_lat_p99'])} |")
    return lines


def fmt_iops(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def fmt_figure(bs: int, iops: Optional[float]) -> str:
    """IOPS for small requests, MB/s for big ones."""
    if iops is None:
        return "-"
    if bs >= MiB:
        return f"{iops * bs / MB:.0f} MB/s"
    return f"{fmt_iops(iops)} IOPS"


def unit_formatter(summary: dict):
    def unit_of(key: Optional[str], v: Optional[float]) -> str:
        e = summary.get((key or "").split(" then ")[0])
        bs = e["workload"]["bs"] if e else K4
        return fmt_figure(bs, v)
    return unit_of


def reference(wl: Workload, summary: dict) -> tuple[Optional[str],
                                                    Optional[float]]:
    """The row a workload's others are compared with in the tables: C
    blkio-bench; for the one-call rows the best fio; for copies qemu-img."""
    if wl.backend == "cold":
        names: Sequence[str] = list(FIO_QD.values())
    elif wl.backend in PLAIN_COPY_TITLES:
        names = [DD_FSYNC, QEMU_IMG_WB]
    elif wl.rw == "copy":
        names = [QEMU_IMG] if wl.backend == "copy" else [C_COPY]
    else:
        names = [C_BENCH]
    best: tuple[Optional[str], Optional[float]] = (None, None)
    for n in names:
        e = summary.get(Case(wl, n).key, {})
        v = e.get("iops_median")
        if v is not None and (best[1] is None or v > best[1]):
            best = (n, v)
    if wl.backend == "cold" and best[0]:
        return "best fio", best[1]
    return best


def thread_table(cases: list[Case], summary: dict) -> list[str]:
    """The thread-pool rows (issue 15) in one table."""
    rows = [wl for wl in thread_workloads()
            if any(c.wl == wl for c in cases)]
    if not rows:
        return []
    lines = ["", "### 4 KiB, N threads doing blocking I/O on one device, "
             "iodepth 1 each", "",
             "| backend | rw | threads | C blkio-bench | blkio blocking | "
             "blkio / C | blkio / blkio 1 thread |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for wl in rows:
        c = summary.get(Case(wl, C_BENCH).key, {}).get("iops_median")
        b = summary.get(Case(wl, B_BLOCK).key, {}).get("iops_median")
        one = summary.get(Case(dataclasses.replace(wl, threads=1),
                               B_BLOCK).key, {}).get("iops_median")
        lines.append(
            f"| {wl.backend} | {wl.rw} | {wl.threads} | "
            f"{fmt_iops(c) if c else '-'} | {fmt_iops(b) if b else '-'} | "
            f"{f'{b / c:.2f}' if b and c else '-'} | "
            f"{f'{b / one:.2f}' if b and one else '-'} |")
    return lines


def table_lines(cases: list[Case], summary: dict) -> list[str]:
    lines = []
    seen: list[Workload] = []
    # the thread rows go to thread_table, unless a workload has more
    # contenders than the two it compares
    only_threads = set(thread_workloads())
    for c in cases:
        if c.contender not in (C_BENCH, B_BLOCK):
            only_threads.discard(c.wl)
    for c in cases:
        if c.wl not in seen and c.wl not in only_threads:
            seen.append(c.wl)
    for wl in seen:
        ref, base = reference(wl, summary)
        lines += ["", f"### {wl.title()}", ""]
        if wl.bulk:
            lines.append(f"| contender | MB/s median | min - max | "
                         f"vs {ref or '-'} |")
            lines.append("|---|---:|---:|---:|")
        else:
            # client CPU: is the client the busy side, or waiting?  The
            # daemon's share of its CPU: was it kept busy?
            daemon_col = wl.backend == "vhost"
            lines.append(f"| contender | IOPS median | min - max | MB/s | "
                         f"vs {ref or '-'} | client CPU µs/request |"
                         + (" daemon busy |" if daemon_col else ""))
            lines.append("|---|---:|---:|---:|---:|---:|"
                         + ("---:|" if daemon_col else ""))
        for c in cases:
            if c.wl != wl:
                continue
            e = summary[c.key]
            if "iops_median" not in e:
                why = "; ".join(e.get("errors", ["no result"]))
                if len(why) > 110:
                    why = why[:107] + "..."
                state = ("not available" if e.get("skipped") else "failed")
                dashes = ("- | - |" if wl.bulk else "- | - | - | - |"
                          + (" - |" if wl.backend == "vhost" else ""))
                lines.append(f"| {c.contender} | {dashes} {state}: {why} |")
                continue
            ratio = f"{e['iops_median'] / base:.2f}x" if base else "-"
            if wl.bulk:
                mb = wl.bs / MB
                own = (f" (its own timing, without process start: "
                       f"{e['own_mbps_median']:.0f})"
                       if "own_mbps_median" in e else "")
                lines.append(
                    f"| {c.contender}{own} | {e['iops_median'] * mb:.0f} | "
                    f"{e['iops_min'] * mb:.0f} - {e['iops_max'] * mb:.0f} | "
                    f"{ratio} |")
            else:
                cpu = e.get("client_cpu_us_per_request")
                busy = e.get("daemon_busy")
                lines.append(
                    f"| {c.contender} | {fmt_iops(e['iops_median'])} | "
                    f"{fmt_iops(e['iops_min'])} - {fmt_iops(e['iops_max'])} | "
                    f"{e['mbps_median']:.0f} | {ratio} | "
                    f"{f'{cpu:.2f}' if cpu is not None else '-'} |"
                    + (f" {f'{busy:.2f}' if busy is not None else '-'} |"
                       if wl.backend == "vhost" else ""))
    return lines + thread_table(cases, summary)


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
    """IOPS against iodepth (4 KiB, page-cached file), IOPS against threads
    (blocking, one device), and MB/s of the 1 GiB reads, writes and copies."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return False

    def med(c: Case):
        e = summary.get(c.key, {})
        if "iops_median" not in e:
            return None
        return e["iops_median"], e["iops_min"], e["iops_max"]

    depth_lines: dict = {}
    thread_lines: dict = {}
    bars: list = []
    for c in cases:
        wl, m = c.wl, med(c)
        if m is None:
            continue
        if wl.backend == "file" and wl.bs == K4 and wl.threads == 1 and \
                wl.is_read:
            if c.contender == PY_CALL:
                # no I/O: ~25M calls/s would flatten every I/O line
                continue
            depth_lines.setdefault(c.contender, []).append((wl.depth, *m))
        elif wl.depth == 1 and wl.bs == K4 and c.contender in (C_BENCH,
                                                               B_BLOCK) and \
                wl.backend in ("vhost", "direct"):
            name = f"{wl.backend} {wl.rw}: {c.contender}"
            thread_lines.setdefault(name, []).append((wl.threads, *m))
        elif wl.bulk and wl.depth == 0:
            label = {"cold": f"{wl.rw}", "copy": "copy", "vcopy": "copy->vhost",
                     "coldcopy": f"cold copy {_size(wl.bs, True)}",
                     "warmcopy": f"warm copy {_size(wl.bs, True)}"}[wl.backend]
            bars.append((f"{label}: {c.contender}", m[0] * wl.bs / MB,
                         m[1] * wl.bs / MB, m[2] * wl.bs / MB))
    thread_lines = {k: v for k, v in thread_lines.items() if len(v) > 1}
    panels = [p for p in ("depth", "threads", "bulk")
              if {"depth": depth_lines, "threads": thread_lines,
                  "bulk": bars}[p]]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, panel in zip(axes[0], panels):
        if panel in ("depth", "threads"):
            lines = depth_lines if panel == "depth" else thread_lines
            # threads: one colour per backend and pattern, dashed for C
            groups = sorted({n.split(":")[0] for n in lines})
            for i, (name, pts) in enumerate(sorted(lines.items())):
                pts.sort()
                xs = [p[0] for p in pts]
                ys = [p[1] / 1000 for p in pts]
                err = [[(p[1] - p[2]) / 1000 for p in pts],
                       [(p[3] - p[1]) / 1000 for p in pts]]
                mine = name.split(": ")[-1].startswith("blkio ")
                colour = (cmap(groups.index(name.split(":")[0]) % 10)
                          if panel == "threads" else cmap(i % 10))
                ax.errorbar(xs, ys, yerr=err, label=name, color=colour,
                            linestyle="-" if mine else "--",
                            linewidth=2.2 if mine else 1.2, marker="osD^v<>p"
                            [i % 8], capsize=3)
            ax.set_xscale("log", base=2)
            xs = sorted({p[0] for pts in lines.values() for p in pts})
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.set_xlabel("iodepth" if panel == "depth" else
                          "threads (blocking, iodepth 1 each)")
            ax.set_ylabel("kIOPS (median; bars: min-max)")
            ax.set_ylim(bottom=0)
            ax.set_title("4 KiB random reads, page-cached file" if panel ==
                         "depth" else "4 KiB, threads sharing one device",
                         fontsize=10)
            ax.legend(fontsize=7)
        else:
            names = [b[0] for b in bars]
            vals = [b[1] for b in bars]
            err = [[b[1] - b[2] for b in bars], [b[3] - b[1] for b in bars]]
            colors = ["tab:blue" if "blkio" in n else "tab:gray"
                      for n in names]
            ax.barh(range(len(bars)), vals, xerr=err, color=colors, capsize=2)
            ax.set_yticks(range(len(bars)))
            ax.set_yticklabels(names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("MB/s (median; bars: min-max)")
            ax.set_title("1 GiB in one call, cold O_DIRECT; copies",
                         fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------
# comparing two runs


def _ratio_value(v) -> Optional[float]:
    """A ratio from either JSON format (a float, or an older run's text
    "0.97  (986k / 1.01M IOPS)")."""
    if isinstance(v, (int, float)):
        return float(v)
    m = re.match(r"\s*([\d.]+)", str(v))
    return float(m.group(1)) if m else None


def compare(a_path: str, b_path: str) -> int:
    """Each goal's ratio and each case's median, A beside B, with the
    change. Reads this script's JSON and the older one (text ratios)."""
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    print(f"A: {a_path} ({a.get('machine', {}).get('date', '?')})")
    print(f"B: {b_path} ({b.get('machine', {}).get('date', '?')})")

    def goals_of(doc: dict) -> dict:
        # evaluated again from the figures, so that a run from before the
        # goals table (or from another version of it) lines up by name
        size = doc.get("machine", {}).get("size_bytes", GiB)
        return {g.name: evaluate(g, doc.get("results", {}))
                for g in goals(size)}

    def ratios_of(doc: dict, gs: dict) -> dict:
        out = {k: g.get("ratio") for k, g in gs.items()
               if g["verdict"] != "n/a" or k in doc.get("ratios", {})}
        out.update({k: _ratio_value(v) for k, v in
                    doc.get("ratios", {}).items() if k not in gs})
        return out

    ga, gb = goals_of(a), goals_of(b)
    ra, rb = ratios_of(a, ga), ratios_of(b, gb)

    def change(x, y) -> str:
        return f"{(y - x) / x * 100:+6.1f}%" if x and y else "      -"

    def num(x) -> str:
        return f"{x:6.2f}" if x is not None else "     -"

    print("\nratios (median / median)")
    print(f"  {'A':>6}  {'B':>6}  {'change':>7}  {'goal':>6}  "
          f"{'verdict A/B':<14}  ratio")
    for n in dict.fromkeys([*ra, *rb]):
        x, y = ra.get(n), rb.get(n)
        goal = (gb.get(n) or ga.get(n) or {}).get("threshold")
        verdicts = "/".join(g.get(n, {}).get("verdict", "-")
                            for g in (ga, gb))
        print(f"  {num(x)}  {num(y)}  {change(x, y)}  "
              f"{'>=' + format(goal, 'g') if goal else '':>6}  "
              f"{verdicts:<14}  {n}")
    fa, fb = a.get("results", {}), b.get("results", {})
    print("\nfigures (median)")
    print(f"  {'A':>12}  {'B':>12}  {'change':>7}  case")
    for k in dict.fromkeys([*fa, *fb]):
        ea, eb = fa.get(k, {}), fb.get(k, {})
        bs = (eb or ea).get("workload", {}).get("bs", K4)
        x, y = ea.get("iops_median"), eb.get("iops_median")
        print(f"  {fmt_figure(bs, x):>12}  {fmt_figure(bs, y):>12}  "
              f"{change(x, y)}  {k}")
    return 0


# --------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true",
                   help="every workload and contender (long)")
    p.add_argument("--runtime", type=int, default=None,
                   help="seconds per timed run (default: 1 short, 2 full)")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions per case (default: 5 short, 3 full; at "
                   "least 3 for meaningful medians)")
    p.add_argument("--only", default=None,
                   help="regex on case keys, e.g. 'file/randread/4k/qd32'")
    p.add_argument("--list", action="store_true", help="list cases and exit")
    p.add_argument("--no-vhost", action="store_true",
                   help="skip the vhost-user cases")
    p.add_argument("--size", type=int, default=1024,
                   help="image size in MiB, also the size of the one-call "
                   "reads, writes and copies (default: 1024)")
    p.add_argument("--tmpdir", default=os.environ.get("BENCH_TMPDIR",
                                                      "/var/tmp"),
                   help="where the images go (needs O_DIRECT support; "
                   "default: /var/tmp, or $BENCH_TMPDIR)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the Python contenders")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--instr", metavar="JSON",
                   help="bench/instr.py's JSON: its instruction table is "
                   "printed first and kept in this run's JSON")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two runs' ratios and figures side by side")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    runtime = args.runtime or (2 if args.full else 1)
    # Five repetitions in the short suite: the A/A control showed identical
    # C programs 0.76-1.25 apart in a median of three (2026-12-04) on the
    # vhost-user and thread rows; the full suite's 232 cases keep three.
    args.reps = args.reps or (3 if args.full else 5)
    size = args.size << 20

    cases = full_cases(size) if args.full else short_cases(size)
    if args.no_vhost:
        cases = [c for c in cases
                 if c.wl.backend not in ("vhost", "vcopy")]
    if args.only:
        rx = re.compile(args.only)
        cases = [c for c in cases if rx.search(c.key)]
    if args.list:
        for c in cases:
            print(c.key)
        est = sum(estimate_s(c, runtime) for c in cases) * args.reps
        log(f"{len(cases)} cases x {args.reps} reps: about {est / 60:.1f} "
            "min plus setup")
        return 0
    if not cases:
        log("no case selected")
        return 1

    est = sum(estimate_s(c, runtime) for c in cases) * args.reps
    log(f"blkio bench: {'full' if args.full else 'short'} suite, "
        f"{len(cases)} cases x {args.reps} reps, {runtime} s per timed run "
        f"(about {est / 60:.1f} min plus setup)")
    if not args.full:
        log("  (this is the short default; `make bench-full` runs every "
            "workload and contender)")

    tmpdir = Path(tempfile.mkdtemp(prefix="blkio-bench-", dir=args.tmpdir))
    env = Env(args, tmpdir)
    runs: dict[str, list[dict]] = {}
    t_start = time.perf_counter()
    backends = {c.wl.backend for c in cases}
    try:
        log("setup:")
        env.c_bench = compile_c(BUILD / "blkio-bench",
                                EXAMPLES / "blkio-bench.c")
        env.c_ref = compile_c(BUILD / "ref_blocking", HERE / "ref_blocking.c")
        try:
            env.c_copy = compile_c(BUILD / "blkio-copy",
                                   EXAMPLES / "blkio-copy.c")
        except (subprocess.CalledProcessError, OSError) as e:
            log(f"  blkio-copy.c: {e}")
        env.probe(cases)
        make_image(env.image, size, cache=True)
        if backends & {"direct", "cold", "copy", "vcopy"}:
            make_image(env.cold, size, cache=False)
        if backends & {"copy", "vcopy", "vhost"}:
            # the daemon exports it (for vcopy) whenever it runs
            make_image(env.copy_out, size, cache=False)
        make_plain_copy_sources(env, cases)
        if backends & {"vhost", "vcopy"}:
            env.qsd = StorageDaemon(env.image, env.copy_out, tmpdir)
            try:
                env.qsd.start()
            except (RuntimeError, OSError) as e:
                log(f"  vhost-user backend unavailable: {e}")
                env.qsd.stop()
                env.qsd = None
        log("running:")
        groups: list[list[Case]] = []
        for c in cases:
            if groups and groups[-1][0].wl == c.wl:
                groups[-1].append(c)
            else:
                groups.append([c])
        for rep in range(args.reps):
            if rep:
                warm(env.image)     # in case the bulk rows pushed it out
            i = 0
            for group in groups:
                # rotate the contenders' order from one repetition to the
                # next, so that none always runs first or after the same one
                k = rep % len(group)
                for case in group[k:] + group[:k]:
                    i += 1
                    r = run_case(env, case, runtime)
                    r["rep"] = rep
                    runs.setdefault(case.key, []).append(r)
                    status = (fmt_figure(case.wl.bs, r["iops"]) if r["ok"]
                              else ("not available: " if r.get("skipped")
                                    else "FAILED: ") + r["error"])
                    log(f"  [{rep + 1}/{args.reps} {i:3d}/{len(cases)}] "
                        f"{case.key}: {status}")
    except KeyboardInterrupt:
        log("interrupted: reporting what ran")
    finally:
        if env.qsd is not None:
            env.qsd.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
    elapsed = time.perf_counter() - t_start

    for rs in runs.values():            # reps in order, for per-rep ratios
        rs.sort(key=lambda r: r["rep"])
    summary = summarize(cases, runs)
    info = machine_info()
    info.update(suite="full" if args.full else "short", runtime_s=runtime,
                reps=args.reps, size_bytes=size, elapsed_s=round(elapsed, 1),
                not_available=env.missing)
    if env.qsd is not None:
        info["qsd_restarts"] = env.qsd.restarts
        info["qsd_crashes"] = sorted(set(c for c in env.qsd.crashes if c))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    png = out / f"bench-{stamp}.png"
    have_png = plot(summary, cases, png)
    evaluated = [evaluate(g, summary) for g in goals(size)]
    run_keys = set(summary)
    evaluated = [g for g in evaluated
                 if g["numerator"] in run_keys or args.full or not args.only]
    doc = {"machine": info, "results": summary, "goals": evaluated,
           "latency_vs_fio": latency_rows(summary),
           "ratios": {g["name"]: g.get("ratio") for g in evaluated},
           "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "cmd"}
                        for r in rs] for k, rs in runs.items()},
           "commands": {k: " ".join(rs[0]["cmd"]) for k, rs in runs.items()
                        if rs and "cmd" in rs[0]}}
    if args.instr:
        try:
            doc["instructions"] = json.loads(Path(args.instr).read_text())
        except (OSError, ValueError) as e:
            log(f"--instr: no instruction table ({e})")
    js = out / f"bench-{stamp}.json"
    js.write_text(json.dumps(doc, indent=2))

    md = [f"## blkio benchmarks ({info['suite']} suite)", "",
          f"{info['date']}; {info['nproc']} CPUs ({info['cpu']}), "
          f"Linux {info['kernel']}, Python {info['python']}, "
          f"libblkio {info['libblkio']}; median of {args.reps} runs of "
          f"{runtime} s each (one call of {_size(size, True)} for the "
          "sequential and copy rows), interleaved."]
    md += table_lines(cases, summary)
    md += latency_table(summary)
    if "instructions" in doc:
        md[:0] = [doc["instructions"]["markdown"]]
    if info.get("qsd_restarts"):
        md += ["", f"Note: qemu-storage-daemon died {info['qsd_restarts']} "
               "time(s) during the run (" +
               "; ".join(info.get("qsd_crashes") or ["no message"]) +
               ") and was restarted. QEMU 7.2 aborts this way when a "
               "vhost-user client that used several queues disconnects."]
    print("\n".join(md))
    print()
    unit_of = unit_formatter(summary)
    print("Goals (median / median; every ratio and figure is in the JSON):")
    for issue in sorted({g["issue"] for g in evaluated}):
        print(f" issue {issue}:")
        for g in evaluated:
            if g["issue"] == issue:
                print(verdict_line(g, unit_of))
    counts = {v: sum(g["verdict"] == v for g in evaluated)
              for v in ("met", "missed", "n/a", "not run")}
    print(f"Goals met: {counts['met']}, missed: {counts['missed']}, "
          f"not available: {counts['n/a']}, not in this suite: "
          f"{counts['not run']}")
    print()
    if not args.full:
        print("This was the short suite. `make bench-full` runs every "
              "workload and contender.")
    print(f"JSON: {js}" + (f"\nPlot: {png}" if have_png else ""))
    print(f"Elapsed: {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
