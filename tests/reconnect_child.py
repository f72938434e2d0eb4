"""Child process of the reconnect tests (tests/test_reconnect.py).

Starts its own qemu-storage-daemon exporting a raw image over vhost-user,
opens the export with ``reconnect=True``, runs one API's write-heavy workload
and, ``cycles`` times while it runs, kills the daemon with SIGKILL, removes
the socket and starts the daemon again on the same socket and image (after
a random short downtime).  A shadow model records every acknowledged write
(the generation each block holds); every read is checked against it, and at
the end every block of the image file -- and of the device, read back -- must
hold exactly what the model says.  A crash kills only this process.

Prints one JSON line and exits 0 when everything held, else 1 (with
``errors``).  Timings are reported (``reconnect_ms``: from the daemon's
restart to the first request completed after it), never judged here.

    python reconnect_child.py '{"scenario": "blocking", "dir": "/tmp/x", "cycles": 10}'

Scenarios: blocking (threads), queue (QD32), batch, aio (per request),
aio_batch, copy (``blkio copy --verify`` onto the export), gone (the daemon
never comes back: everything ends in the reconnect_timeout error),
close_during (close() while reconnecting), sigint (Ctrl-C while a call waits
for the reconnect), differs (the daemon comes back with another disk),
aio_dead (no reconnect: the loop notices the dead daemon).
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional

import numpy as np

import blkio
import blkio.aio

DRIVER = "virtio-blk-vhost-user"
BS = 4096
NBLK = 2048                     # an 8 MiB image
HANG = 30.0                     # nothing here may take longer


def pattern(block: int, gen: int) -> np.ndarray:
    """What generation ``gen`` of ``block`` holds (generation 0: the image as made)."""
    return np.full(BS // 8, (gen << 32) | block, np.uint64).view(np.uint8)


class Daemon:
    """qemu-storage-daemon exporting ``image`` on ``sock`` (started again on
    the same socket and image after a kill)."""

    def __init__(self, d: str, image: str, num_queues: int = 1) -> None:
        self.sock, self.image = os.path.join(d, "vhost.sock"), image
        self.num_queues = num_queues
        self.proc: Optional[subprocess.Popen] = None
        self.env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}

    def start(self) -> float:
        """Start it; returns when it was started (time.monotonic)."""
        if os.path.lexists(self.sock):
            os.unlink(self.sock)
        t = time.monotonic()
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=file0,filename={self.image}",
             "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
                         f"addr.path={self.sock},writable=on,num-queues={self.num_queues}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=self.env)
        deadline = time.monotonic() + HANG
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not start")
            time.sleep(0.001)
        return t

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(HANG)
        os.unlink(self.sock)          # rm -f: what it left behind refuses connects

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(HANG)


def open_when_listening(sock: str, **kwargs: Any) -> blkio.Device:
    """The socket appears a moment before the daemon listens."""
    deadline = time.monotonic() + HANG
    while True:
        try:
            return blkio.open(DRIVER, sock, **kwargs)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


class Shadow:
    """The generation of the last acknowledged write of each block; the
    blocks with a request in flight (one at a time per block)."""

    def __init__(self) -> None:
        self.gen = np.zeros(NBLK, np.int64)
        self.next_gen = 1
        self.lock = threading.Lock()
        self.errors: List[str] = []
        self.writes = self.reads = self.flushes = 0
        self.restarted_at: Optional[float] = None     # a restart waiting for its first completion
        self.reconnect_ms: List[float] = []

    def new_gen(self) -> int:
        with self.lock:
            g = self.next_gen
            self.next_gen += 1
            return g

    def completed(self) -> None:
        t = self.restarted_at
        if t is not None:
            with self.lock:
                if self.restarted_at is not None:
                    self.reconnect_ms.append((time.monotonic() - self.restarted_at) * 1e3)
                    self.restarted_at = None

    def acked_write(self, block: int, gen: int) -> None:
        self.gen[block] = gen
        self.writes += 1
        self.completed()

    def check_read(self, block: int, data: np.ndarray, what: str) -> None:
        self.reads += 1
        self.completed()
        want = pattern(block, int(self.gen[block]))
        if not np.array_equal(data, want):
            got = int(data.view(np.uint64)[0])
            self.error(f"{what}: block {block} read generation {got >> 32} (block {got & 0xffffffff}), "
                       f"acknowledged {int(self.gen[block])}")

    def error(self, msg: str) -> None:
        with self.lock:
            if len(self.errors) < 20:
                self.errors.append(msg)


class Killer(threading.Thread):
    """Kills the daemon ``cycles`` times while the workload runs, restarting
    it after a random downtime; waits for each reconnect before the next."""

    def __init__(self, daemon: Daemon, shadow: Shadow, dev_stats: Any, cycles: int,
                 seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.daemon_, self.shadow, self.stats, self.cycles = daemon, shadow, dev_stats, cycles
        self.rng = random.Random(seed)
        self.stop = stop
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            for cycle in range(self.cycles):
                time.sleep(self.rng.uniform(0.02, 0.06))       # the workload runs
                self.daemon_.kill()
                time.sleep(self.rng.choice((0.0, 0.0, 0.005, 0.03)))    # downtime
                self.shadow.restarted_at = None
                t = self.daemon_.start()
                self.shadow.restarted_at = t
                deadline = time.monotonic() + HANG
                while self.stats().reconnects < cycle + 1:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no reconnect after restart {cycle + 1}")
                    time.sleep(0.001)
            time.sleep(0.02)
        except BaseException as e:      # noqa: BLE001 - reported by the main thread
            self.error = e
        finally:
            self.stop.set()


# ---- workloads: each runs until ``stop`` is set ---------------------------------

def blocking(dev: blkio.Device, shadow: Shadow, stop: threading.Event, nthreads: int = 4) -> None:
    def worker(tid: int) -> None:
        rng = np.random.default_rng(tid)
        # thread 0 uses plain numpy memory (bounced), the others mapped memory
        buf = np.zeros(BS, np.uint8) if tid == 0 else dev.alloc(BS)
        mine = np.arange(tid, NBLK, nthreads)
        while not stop.is_set():
            b = int(rng.choice(mine))
            r = rng.random()
            if r < 0.7:
                g = shadow.new_gen()
                buf[:] = pattern(b, g)
                dev.write(b * BS, buf)
                shadow.acked_write(b, g)
            elif r < 0.97:
                dev.readinto(b * BS, buf)
                shadow.check_read(b, buf, "readinto")
            else:
                dev.flush()
                shadow.flushes += 1
                shadow.completed()
    run_threads(worker, nthreads, shadow)


def run_threads(worker: Any, n: int, shadow: Shadow) -> None:
    def guarded(i: int) -> None:
        try:
            worker(i)
        except BaseException as e:      # noqa: BLE001
            shadow.error(f"worker {i}: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG * 4)
        if t.is_alive():
            shadow.error("a worker thread hung")


def queue_qd32(dev: blkio.Device, shadow: Shadow, stop: threading.Event) -> None:
    def worker(_: int) -> None:
        q = dev.queue(0)
        bufs = dev.alloc(32 * BS).reshape(32, BS)
        free_slots = list(range(32))
        busy: set = set()
        rng = np.random.default_rng(7)
        while True:
            while free_slots and not stop.is_set():
                s = free_slots.pop()
                b = int(rng.integers(NBLK))
                while b in busy:
                    b = int(rng.integers(NBLK))
                r = rng.random()
                if r < 0.02:
                    q.flush(user_data=("flush", s, -1, 0))
                    continue
                busy.add(b)
                if r < 0.75:
                    g = shadow.new_gen()
                    bufs[s] = pattern(b, g)
                    q.write(b * BS, bufs[s], user_data=("write", s, b, g))
                else:
                    q.read(b * BS, bufs[s], user_data=("read", s, b, 0))
            if q.in_flight == 0:
                break
            for c in q.wait(min=1, timeout=HANG):
                op, s, b, g = c.user_data
                c.check()
                free_slots.append(s)
                if op == "write":
                    shadow.acked_write(b, g)
                elif op == "read":
                    shadow.check_read(b, bufs[s], "queue read")
                else:
                    shadow.flushes += 1
                    shadow.completed()
                busy.discard(b)
    run_threads(worker, 1, shadow)


def batch(dev: blkio.Device, shadow: Shadow, stop: threading.Event) -> None:
    def worker(_: int) -> None:
        q = dev.queue(0)
        rows = dev.alloc(32 * BS).reshape(32, BS)
        out = np.zeros(64, dtype=[("user_data", np.int64), ("ret", np.int32)])
        rng = np.random.default_rng(11)
        while not stop.is_set():
            blocks = rng.choice(NBLK, 32, replace=False)
            gens = [shadow.new_gen() for _ in blocks]
            for i, (b, g) in enumerate(zip(blocks, gens)):
                rows[i] = pattern(int(b), g)
            q.submit_writes(blocks.astype(np.uint64) * BS, rows)
            got = 0
            while got < 32:
                n = q.reap(out, min=1, timeout=HANG)
                for ud, ret in out[:n]:
                    if ret != 0:
                        shadow.error(f"batch write {ud} failed: {ret}")
                    shadow.acked_write(int(blocks[ud]), gens[ud])
                got += n
            blocks = rng.choice(NBLK, 32, replace=False)
            q.submit_reads(blocks.astype(np.uint64) * BS, rows)
            got = 0
            while got < 32:
                n = q.reap(out, min=1, timeout=HANG)
                for ud, ret in out[:n]:
                    if ret != 0:
                        shadow.error(f"batch read {ud} failed: {ret}")
                    shadow.check_read(int(blocks[ud]), rows[ud], "batch read")
                got += n
    run_threads(worker, 1, shadow)


def aio(sock: str, shadow: Shadow, stop: threading.Event, started: Any, batches: bool) -> None:
    async def main() -> None:
        async with blkio.aio.open(DRIVER, sock, reconnect=True, reconnect_timeout=HANG) as adev:
            started(adev.device)

            async def task(k: int, ntasks: int) -> None:
                rng = np.random.default_rng(100 + k)
                mine = np.arange(k, NBLK, ntasks)
                buf = adev.alloc(BS)
                while not stop.is_set():
                    b = int(rng.choice(mine))
                    r = rng.random()
                    if r < 0.7:
                        g = shadow.new_gen()
                        buf[:] = pattern(b, g)
                        await adev.write(b * BS, buf)
                        shadow.acked_write(b, g)
                    elif r < 0.98:
                        await adev.readinto(b * BS, buf)
                        shadow.check_read(b, buf, "aio readinto")
                    else:
                        await adev.flush()
                        shadow.flushes += 1
                        shadow.completed()

            async def batch_task(k: int, ntasks: int) -> None:
                rng = np.random.default_rng(200 + k)
                mine = np.arange(k, NBLK, ntasks)
                rows = adev.alloc(16 * BS).reshape(16, BS)
                while not stop.is_set():
                    blocks = rng.choice(mine, 16, replace=False)
                    gens = [shadow.new_gen() for _ in blocks]
                    for i, (b, g) in enumerate(zip(blocks, gens)):
                        rows[i] = pattern(int(b), g)
                    await adev.write_batch(blocks.astype(np.uint64) * BS, rows)
                    for b, g in zip(blocks, gens):
                        shadow.acked_write(int(b), g)
                    blocks = rng.choice(mine, 16, replace=False)
                    await adev.read_batch(blocks.astype(np.uint64) * BS, rows)
                    for i, b in enumerate(blocks):
                        shadow.check_read(int(b), rows[i], "aio read_batch")

            async def guarded(coro: Any) -> None:
                try:
                    await coro
                except BaseException as e:      # noqa: BLE001
                    shadow.error(f"task: {type(e).__name__}: {e}")
                    stop.set()

            if batches:
                await asyncio.gather(*(guarded(batch_task(k, 3)) for k in range(3)))
            else:
                await asyncio.gather(*(guarded(task(k, 16)) for k in range(16)))
    asyncio.run(main())


# ---- the scenarios --------------------------------------------------------------

def make_image(path: str) -> None:
    data = np.concatenate([pattern(b, 0) for b in range(NBLK)])
    with open(path, "wb") as f:
        f.write(data.tobytes())


def check_image(image: str, shadow: Shadow, dev: Optional[blkio.Device]) -> None:
    """Every acknowledged write is on the image (the file, and the device)."""
    with open(image, "rb") as f:
        disk = np.frombuffer(f.read(), np.uint8)
    views = [("image file", disk)]
    if dev is not None:
        views.append(("device", dev.read(0, NBLK * BS)))
    for name, data in views:
        for b in range(NBLK):
            want = pattern(b, int(shadow.gen[b]))
            if not np.array_equal(data[b * BS:(b + 1) * BS], want):
                got = int(data[b * BS:b * BS + 8].view(np.uint64)[0])
                shadow.error(f"{name}: block {b} holds generation {got >> 32}, the last "
                             f"acknowledged write was {int(shadow.gen[b])}")


def run_workload(cfg: Dict[str, Any]) -> Dict[str, Any]:
    d, scenario, cycles = cfg["dir"], cfg["scenario"], cfg["cycles"]
    image = os.path.join(d, "disk.raw")
    make_image(image)
    nq = cfg.get("num_queues", 1)
    daemon = Daemon(d, image, nq)
    daemon.start()
    shadow = Shadow()
    stop = threading.Event()
    box: Dict[str, Any] = {}
    killer: Optional[Killer] = None

    def start_killer(dev: blkio.Device) -> None:
        nonlocal killer
        box["dev"] = dev
        killer = Killer(daemon, shadow, lambda: dev.stats, cycles, cfg.get("seed", 1), stop)
        killer.start()

    try:
        if scenario in ("aio", "aio_batch"):
            # wait until the socket listens, then hand over to the loop's open
            open_when_listening(daemon.sock).close()
            aio(daemon.sock, shadow, stop, start_killer, scenario == "aio_batch")
            dev = None
            stats = box["dev"].stats
        else:
            dev = open_when_listening(daemon.sock, reconnect=True, reconnect_timeout=HANG,
                                      num_queues=nq)
            start_killer(dev)
            {"blocking": blocking, "queue": queue_qd32, "batch": batch}[scenario](dev, shadow, stop)
            stats = dev.stats
        assert killer is not None
        killer.join(HANG)
        if killer.error is not None:
            shadow.error(f"killer: {killer.error!r}")
        if dev is None:
            dev = open_when_listening(daemon.sock)
        check_image(image, shadow, dev)
        dev.close()
    finally:
        stop.set()
        daemon.stop()
    return {"reconnects": stats.reconnects, "resubmitted": stats.resubmitted,
            "writes": shadow.writes, "reads": shadow.reads, "flushes": shadow.flushes,
            "reconnect_ms": [round(x, 2) for x in shadow.reconnect_ms],
            "errors": shadow.errors}


def run_copy(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``blkio copy --verify`` of a file onto the export, the daemon killed
    and restarted in the middle of each copy."""
    from blkio import cli
    d, cycles = cfg["dir"], cfg["cycles"]
    rng = random.Random(cfg.get("seed", 1))
    image = os.path.join(d, "disk.raw")
    src = os.path.join(d, "src.raw")
    size = 8 << 20
    errors: List[str] = []
    mid_copy = 0
    for cycle in range(cycles):
        with open(image, "wb") as f:
            f.truncate(size)
        data = np.random.default_rng(cycle).integers(0, 256, size, dtype=np.uint8)
        data[: 1 << 20] = 0                         # a zero chunk: write-zeroes (--sparse)
        with open(src, "wb") as f:
            f.write(data.tobytes())
        daemon = Daemon(d, image)
        daemon.start()
        open_when_listening(daemon.sock).close()
        state = {"done": False, "mid_copy": False}

        def killer() -> None:
            # The copy runs in the main thread (it sets a SIGINT handler).
            # Once its first data chunk is on the image, a little later: kill.
            deadline = time.monotonic() + HANG
            with open(image, "rb") as f:
                while not state["done"] and time.monotonic() < deadline:
                    if os.pread(f.fileno(), 8, 1 << 20) != bytes(8):
                        break
                    time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.05))
            alive = not state["done"]
            daemon.kill()
            time.sleep(rng.choice((0.0, 0.01)))
            daemon.start()
            state["mid_copy"] = alive and not state["done"]
        k = threading.Thread(target=killer)
        k.start()
        try:
            rc = cli.main(["copy", f"--input-file={src}", f"--output-blkio={DRIVER}",
                           f"path={daemon.sock}", "--reconnect", f"--reconnect-timeout={HANG:g}",
                           "--blocksize=64K", "--depth=4", "--sparse", "--verify",
                           "--progress=none"])
            state["done"] = True
            k.join(HANG)
            mid_copy += state["mid_copy"]
            if rc != 0:
                errors.append(f"copy {cycle}: exit status {rc}")
            with open(image, "rb") as f:
                if f.read() != data.tobytes():
                    errors.append(f"copy {cycle}: the image differs from the source")
        finally:
            k.join(HANG)
            daemon.stop()
    return {"copies": cycles, "mid_copy": mid_copy, "errors": errors}


def run_gone(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The daemon never comes back: every kind of wait ends in the
    reconnect_timeout error, and the device is broken (closing works)."""
    d = cfg["dir"]
    image = os.path.join(d, "disk.raw")
    make_image(image)
    timeout = cfg.get("timeout", 0.5)
    errors: List[str] = []
    out: Dict[str, Any] = {}

    def expect_gone(what: str, e: BaseException) -> None:
        if not (isinstance(e, OSError) and e.errno == 5 and "reconnect_timeout" in str(e)):
            errors.append(f"{what}: expected EIO naming reconnect_timeout, got {e!r}")

    for api in ("blocking", "queue", "batch", "aio"):
        daemon = Daemon(d, image)
        daemon.start()
        try:
            dev = open_when_listening(daemon.sock, reconnect=True, reconnect_timeout=timeout)
            buf = dev.alloc(32 * BS)
            q = dev.queue(0)
            os.kill(daemon.proc.pid, signal.SIGSTOP)     # requests stay in flight
            t0 = time.monotonic()
            if api == "blocking":
                def killer() -> None:
                    time.sleep(0.05)
                    daemon.kill()
                threading.Thread(target=killer).start()
                try:
                    dev.write(0, buf[:BS])
                    errors.append("blocking: write succeeded")
                except BaseException as e:      # noqa: BLE001
                    expect_gone("blocking write", e)
            elif api == "queue":
                for i in range(8):
                    q.write(i * BS, buf[i * BS:(i + 1) * BS], user_data=i)
                q.submit()
                daemon.kill()
                try:
                    comps = q.wait(min=8, timeout=HANG)
                    errors.append(f"queue: wait returned {comps!r}")
                except BaseException as e:      # noqa: BLE001
                    expect_gone("queue wait", e)
            elif api == "batch":
                q.submit_writes(np.arange(8, dtype=np.uint64) * BS, buf[:8 * BS].reshape(8, BS))
                daemon.kill()
                rec = np.zeros(8, dtype=[("user_data", np.int64), ("ret", np.int32)])
                try:
                    n = q.reap(rec, min=8, timeout=HANG)
                    errors.append(f"batch: reap returned {n}")
                except BaseException as e:      # noqa: BLE001
                    expect_gone("batch reap", e)
            else:
                async def main() -> None:
                    adev = blkio.aio.AsyncDevice(dev)
                    try:
                        futs = [adev.write(i * BS, buf[i * BS:(i + 1) * BS]) for i in range(4)]
                        bat = asyncio.ensure_future(adev.write_batch(
                            np.arange(8, 16, dtype=np.uint64) * BS, buf[8 * BS:16 * BS].reshape(8, BS)))
                        await asyncio.sleep(0.05)
                        daemon.kill()
                        for f in futs + [bat]:
                            try:
                                await asyncio.wait_for(f, HANG)
                                errors.append("aio: an await succeeded")
                            except BaseException as e:      # noqa: BLE001
                                expect_gone("aio await", e)
                    finally:
                        adev.detach()
                asyncio.run(main())
            out[api + "_s"] = round(time.monotonic() - t0, 3)
            if dev.state != "broken":
                errors.append(f"{api}: the device is {dev.state}, not broken")
            try:
                dev.read(0, BS)
                errors.append(f"{api}: a read on the broken device succeeded")
            except OSError as e:
                expect_gone(f"{api}: read after", e)
            dev.close()
        finally:
            daemon.stop()
    out["errors"] = errors
    return out


def run_close_during(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """close() while the device waits for a daemon that is not back: it
    returns soon, the parked calls end with "closed", the watcher thread
    ends, and the requests in flight are cancelled."""
    d = cfg["dir"]
    image = os.path.join(d, "disk.raw")
    make_image(image)
    errors: List[str] = []
    daemon = Daemon(d, image)
    daemon.start()
    try:
        dev = open_when_listening(daemon.sock, reconnect=True, reconnect_timeout=HANG)
        buf = dev.alloc(2 * BS)
        q = dev.queue(0)
        seen: Dict[str, Any] = {}
        os.kill(daemon.proc.pid, signal.SIGSTOP)        # requests stay in flight

        def write() -> None:
            try:
                dev.write(0, buf[:BS])
                seen["write"] = "succeeded"
            except BaseException as e:      # noqa: BLE001
                seen["write"] = e

        def wait() -> None:
            try:
                seen["wait"] = q.wait(min=1, timeout=HANG)
            except BaseException as e:      # noqa: BLE001
                seen["wait"] = e
        q.write(BS, buf[BS:], user_data="queued")
        threads = [threading.Thread(target=write), threading.Thread(target=wait)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        daemon.kill()
        time.sleep(0.2)                 # the reconnect is retrying now
        t0 = time.monotonic()
        dev.close()
        out = {"close_s": round(time.monotonic() - t0, 3)}
        for t in threads:
            t.join(HANG)
            if t.is_alive():
                errors.append("a parked call did not end after close()")
        for what in ("write", "wait"):
            e = seen.get(what)
            if not (isinstance(e, ValueError) and "closed" in str(e)):
                errors.append(f"{what}: expected ValueError saying closed, got {e!r}")
        time.sleep(0.05)
        left = [t.name for t in threading.enumerate() if "reconnect" in t.name]
        if left:
            errors.append(f"threads left after close(): {left}")
        if dev.stats.reconnects != 0:
            errors.append(f"reconnects: {dev.stats.reconnects}")
    finally:
        daemon.stop()
    out["errors"] = errors
    return out


def run_sigint(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Ctrl-C while a blocking write waits for the reconnect: it raises
    KeyboardInterrupt at once; the request stays in flight, is resubmitted
    when the daemon is back, and the device goes on working."""
    d = cfg["dir"]
    image = os.path.join(d, "disk.raw")
    make_image(image)
    errors: List[str] = []
    out: Dict[str, Any] = {}
    daemon = Daemon(d, image)
    daemon.start()
    try:
        dev = open_when_listening(daemon.sock, reconnect=True, reconnect_timeout=HANG)
        buf = dev.alloc(BS)
        buf[:] = pattern(5, 77)
        os.kill(daemon.proc.pid, signal.SIGSTOP)

        def interrupt() -> None:
            time.sleep(0.1)
            daemon.kill()
            time.sleep(0.2)             # parked by now
            out["sigint_at"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=interrupt).start()
        try:
            dev.write(5 * BS, buf)
            errors.append("the write returned")
        except KeyboardInterrupt:
            out["interrupt_s"] = round(time.monotonic() - out["sigint_at"], 3)
        daemon.start()
        deadline = time.monotonic() + HANG
        while dev.stats.reconnects < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        # The resubmitted write has no caller waiting for it, and a read
        # issued meanwhile may overtake it (a device orders no two requests
        # in flight): it must land, not land first.
        while (not np.array_equal(dev.read(5 * BS, BS), pattern(5, 77))
               and time.monotonic() < deadline):
            time.sleep(0.001)
        if not np.array_equal(dev.read(5 * BS, BS), pattern(5, 77)):
            errors.append("the interrupted write was not resubmitted")
        dev.write(6 * BS, buf)
        if not np.array_equal(dev.read(6 * BS, BS), pattern(5, 77)):
            errors.append("a write after the reconnect did not read back")
        out["stats"] = list(dev.stats)
        dev.close()
    finally:
        daemon.stop()
    out["errors"] = errors
    return out


def run_differs(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The daemon comes back with another disk (another size): the reconnect
    gives up at once, saying what differs; everything in flight fails."""
    d = cfg["dir"]
    image = os.path.join(d, "disk.raw")
    make_image(image)
    errors: List[str] = []
    daemon = Daemon(d, image)
    daemon.start()
    try:
        dev = open_when_listening(daemon.sock, reconnect=True, reconnect_timeout=HANG)
        buf = dev.alloc(BS)
        os.kill(daemon.proc.pid, signal.SIGSTOP)

        def swap() -> None:
            time.sleep(0.1)
            daemon.kill()
            with open(image, "ab") as f:
                f.truncate(2 * NBLK * BS)
            daemon.start()
        threading.Thread(target=swap).start()
        t0 = time.monotonic()
        try:
            dev.write(0, buf)
            errors.append("the write succeeded")
        except OSError as e:
            if e.errno != 5 or "capacity" not in str(e) or "differs" not in str(e):
                errors.append(f"expected EIO naming the capacity that differs, got {e!r}")
        out = {"failed_after_s": round(time.monotonic() - t0, 3)}
        if dev.state != "broken":
            errors.append(f"the device is {dev.state}, not broken")
        dev.close()
    finally:
        daemon.stop()
    out["errors"] = errors
    return out


def run_aio_dead(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Without reconnect, the loop notices the dead daemon: awaits of single
    requests and of a batch end with EIO, and the device is broken."""
    d = cfg["dir"]
    image = os.path.join(d, "disk.raw")
    make_image(image)
    errors: List[str] = []
    out: Dict[str, Any] = {}
    daemon = Daemon(d, image)
    daemon.start()
    open_when_listening(daemon.sock).close()

    async def main() -> None:
        async with blkio.aio.open(DRIVER, daemon.sock) as adev:
            buf = adev.alloc(32 * BS)
            await adev.write(0, buf[:BS])
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            futs = [adev.readinto(i * BS, buf[i * BS:(i + 1) * BS]) for i in range(8)]
            bat = asyncio.ensure_future(adev.read_batch(np.arange(8, 24, dtype=np.uint64) * BS,
                                                        buf[8 * BS:24 * BS].reshape(16, BS)))
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            daemon.kill()
            for f in futs + [bat]:
                try:
                    await asyncio.wait_for(f, HANG)
                    errors.append("an await succeeded")
                except OSError as e:
                    if e.errno != 5:
                        errors.append(f"expected EIO, got {e!r}")
                except BaseException as e:      # noqa: BLE001
                    errors.append(f"expected EIO, got {e!r}")
            out["failed_after_s"] = round(time.monotonic() - t0, 3)
            if adev.device.state != "broken":
                errors.append(f"the device is {adev.device.state}, not broken")
    try:
        asyncio.run(main())
    finally:
        daemon.stop()
    out["errors"] = errors
    return out


SCENARIOS = {"copy": run_copy, "gone": run_gone, "close_during": run_close_during,
             "sigint": run_sigint, "differs": run_differs, "aio_dead": run_aio_dead}


def main() -> int:
    cfg = json.loads(sys.argv[1])
    scenario = cfg["scenario"]
    # A hang shows where every thread was (the parent's timeout is later).
    faulthandler.dump_traceback_later(cfg.get("hang", 4 * HANG), exit=True)
    try:
        out = SCENARIOS.get(scenario, run_workload)(cfg)
    except BaseException as e:      # noqa: BLE001
        out = {"errors": [f"{type(e).__name__}: {e}\n{traceback.format_exc()}"]}
    out["scenario"] = scenario
    print(json.dumps(out), flush=True)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
