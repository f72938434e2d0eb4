"""Child process for the lifetime torture tests (tests/test_lifetime.py).

Runs one race, several times: N worker threads loop one public operation on a
device while the main thread calls ``close()`` (or ``remove_queue()``) on it.
A crash (segfault, a libblkio panic) kills only this process; the parent test
sees the exit status.  Prints one JSON line with what happened and exits:

    0  every worker ended within the bound and saw only ValueError/OSError,
       with ValueErrors naming the cause ("closed" / "removed")
    3  a worker saw another exception, or a ValueError that names no cause
    4  a worker was still running after the bound (a hang)
    5  a worker never completed an operation before the close (a vacuous race)

    python race_child.py '{"driver": ..., "props": {...}, "op": "readinto",
                           "action": "close", "threads": 3, "reps": 3}'
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import traceback

import numpy as np

import blkio
import blkio.aio

BS = 4096


class Stop(Exception):
    pass


def _offsets(dev, n):
    span = max(1, min(dev.capacity, 16 << 20) // BS)
    return [(i * 7919 % span) * BS for i in range(n)]


# Each op factory runs in the worker thread: it prepares what it needs (memory,
# a queue) while the device is open, then returns a function doing one step.

def _blocking(kind):
    def make(dev, qi, wi):
        buf = dev.alloc(BS) if kind != "readinto_numpy" else np.zeros(BS, np.uint8)
        offs = _offsets(dev, 64)
        state = {"i": wi}

        def step():
            state["i"] += 1
            off = offs[state["i"] % len(offs)]
            if kind in ("readinto", "readinto_numpy"):
                dev.readinto(off, buf)
            elif kind == "read":
                dev.read(off, BS)
            elif kind == "write":
                dev.write(off, buf)
            elif kind == "readv":
                dev.readv(off, [buf[:BS // 2], buf[BS // 2:]])
            elif kind == "writev":
                dev.writev(off, [buf[:BS // 2], buf[BS // 2:]])
            elif kind == "flush":
                dev.flush()
            elif kind == "write_zeroes":
                dev.write_zeroes(off, BS)
            elif kind == "discard":
                dev.discard(off, BS)
        return step
    return make


def _shared_wait(wait):
    """Workers share the queue, so another one may have taken every
    completion between our look and our wait: that ValueError means retry."""
    try:
        return wait()
    except ValueError as e:
        if "are in flight or completed" in str(e):
            return 0
        raise


def _queue_io(dev, qi, wi):
    q = dev.queue(qi)
    bufs = [dev.alloc(BS) for _ in range(8)]
    offs = _offsets(dev, 8)

    def step():
        for i, b in enumerate(bufs):
            q.read(offs[i], b, user_data=i)
        while q.in_flight:
            _shared_wait(lambda: q.wait(min=1, timeout=30))
    return step


def _batch(dev, qi, wi):
    q = dev.queue(qi)
    n = 16
    bufs = dev.alloc(n * BS).reshape(n, BS)
    offs = np.array(_offsets(dev, n), dtype=np.uint64)
    out = np.zeros(n, dtype=[("user_data", np.int64), ("ret", np.int32)])

    def step():
        q.submit_reads(offs, bufs)
        while q.in_flight:
            _shared_wait(lambda: q.reap(out, min=1, timeout=30))
    return step


def _register(dev, qi, wi):
    mem = np.frombuffer(blkio.Buffer(64 * 1024), np.uint8)

    def step():
        dev.register(mem)
        dev.unregister(mem)
    return step


def _properties(dev, qi, wi):
    def step():
        dev.get("capacity")
        dev.properties()
        dev.refresh_limits()
    return step


def _alloc(dev, qi, wi):
    def step():
        dev.alloc(BS)
    return step


def _pool(dev, qi, wi):
    pool = dev.bounce_pool

    def step():
        a = pool.acquire(BS, timeout=30)
        pool.release(a)
    return step


def _poll(dev, qi, wi):
    q = dev.queue(qi)
    buf = dev.alloc(BS)

    def step():
        q.read(0, buf)
        while q.in_flight:
            q.completions()
    return step


OPS = {
    "read": _blocking("read"), "readinto": _blocking("readinto"),
    "readinto_numpy": _blocking("readinto_numpy"), "write": _blocking("write"),
    "readv": _blocking("readv"), "writev": _blocking("writev"),
    "flush": _blocking("flush"), "write_zeroes": _blocking("write_zeroes"),
    "discard": _blocking("discard"), "queue": _queue_io, "batch": _batch,
    "register": _register, "properties": _properties, "alloc": _alloc,
    "pool": _pool, "poll": _poll,
}
# Operations on a queue of their own (the others use queue 0 through Device).
QUEUE_OPS = {"queue", "batch", "poll", "aio"}


class Worker(threading.Thread):
    def __init__(self, dev, op, qi, wi, started):
        super().__init__(daemon=True)
        self.dev, self.op, self.qi, self.wi = dev, op, qi, wi
        self.started_evt = started
        self.count = 0
        self.error: BaseException | None = None
        self.tb = ""

    def run(self):
        try:
            if self.op == "aio":
                asyncio.run(self._aio())
            else:
                step = OPS[self.op](self.dev, self.qi, self.wi)
                while True:
                    step()
                    self.count += 1
                    if self.count == 1:
                        self.started_evt.release()
        except BaseException as e:     # noqa: BLE001 - every outcome is recorded
            self.error = e
            self.tb = traceback.format_exc()
        finally:
            if self.count == 0:
                self.started_evt.release()

    async def _aio(self):
        adev = blkio.aio.AsyncDevice(self.dev, self.qi)
        try:
            bufs = [self.dev.alloc(BS) for _ in range(16)]
            offs = _offsets(self.dev, 16)
            while True:
                await asyncio.gather(*(adev.readinto(o, b) for o, b in zip(offs, bufs)))
                self.count += 1
                if self.count == 1:
                    self.started_evt.release()
        finally:
            await adev.aclose()


def one_race(cfg) -> dict:
    op, action = cfg["op"], cfg["action"]
    nthreads = cfg.get("threads", 3)
    kwargs = dict(cfg["props"])
    if op in QUEUE_OPS:
        kwargs.setdefault("num_queues", 2)
    dev = blkio.open(cfg["driver"], **kwargs)
    try:
        # Queue ops use queue 1 (so removing it is the race); blocking ops
        # share the device's one queue (more threads than queues), which
        # remove_queue then takes away from them.
        qi = 1 if op in QUEUE_OPS else 0
        started = threading.Semaphore(0)
        workers = [Worker(dev, op, qi, i, started) for i in range(nthreads)]
        for w in workers:
            w.start()
        for _ in workers:
            started.acquire(timeout=30)
        time.sleep(cfg.get("delay", 0.1))
        t0 = time.monotonic()
        if action == "close":
            dev.close()
        else:
            dev.remove_queue(dev.queue(qi))
        close_s = time.monotonic() - t0
        bound = cfg.get("bound", 10.0)
        deadline = time.monotonic() + bound
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        return {"workers": workers, "close_s": close_s}
    finally:
        if not dev.closed:
            dev.close()


def main() -> int:
    cfg = json.loads(sys.argv[1])
    cause = "closed" if cfg["action"] == "close" else "removed"
    summary = {"reps": 0, "ops": 0, "errors": {}, "close_s_max": 0.0}
    status = 0
    problems = []
    for rep in range(cfg.get("reps", 3)):
        r = one_race(cfg)
        summary["reps"] += 1
        summary["close_s_max"] = max(summary["close_s_max"], r["close_s"])
        for w in r["workers"]:
            summary["ops"] += w.count
            if w.is_alive():
                problems.append(f"rep {rep}: worker {w.wi} still running after the bound")
                status = max(status, 4)
                continue
            if w.count == 0:
                problems.append(f"rep {rep}: worker {w.wi} completed no operation "
                                f"({type(w.error).__name__}: {w.error})")
                status = max(status, 5)
            e = w.error
            name = type(e).__name__
            summary["errors"][name] = summary["errors"].get(name, 0) + 1
            if isinstance(e, ValueError) and not isinstance(e, OSError):
                if cause not in str(e) and "closed" not in str(e):
                    problems.append(f"rep {rep}: ValueError without the cause: {e}")
                    status = max(status, 3)
            elif not isinstance(e, OSError):
                problems.append(f"rep {rep}: unexpected {name}: {e}\n{w.tb}")
                status = max(status, 3)
    summary["problems"] = problems
    print(json.dumps(summary), flush=True)
    if status == 4:
        os._exit(4)        # a stuck daemon thread must not hang interpreter exit
    return status


if __name__ == "__main__":
    sys.exit(main())
