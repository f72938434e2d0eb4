"""Lifetime under threads: another thread closes the device (or removes the
queue) while workers are inside calls on it.  No call may crash the process,
hang, or fail with anything but ValueError (naming the cause) or OSError.

Each race runs in a child interpreter (tests/race_child.py), several times,
so that a crash fails one test instead of killing the run.  Backends: a
page-cached file and an O_DIRECT loop device through io_uring, and a
qemu-storage-daemon vhost-user export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).resolve().parent / "race_child.py"
REPS = int(os.environ.get("BLKIO_RACE_REPS", "3"))

BLOCKING_OPS = ["read", "readinto", "readinto_numpy", "write", "readv", "writev",
                "flush", "write_zeroes", "discard"]
QUEUE_OPS = ["queue", "batch", "poll", "aio"]
DEVICE_OPS = ["register", "properties", "alloc", "pool"]


@pytest.fixture(params=["file", "loop", "vhost"])
def backend(request):
    """(driver, properties) of a real device for the child to open."""
    if request.param == "file":
        img = request.getfixturevalue("image")
        return "io_uring", {"path": str(img.path)}
    if request.param == "loop":
        loop = request.getfixturevalue("loopdev")
        return "io_uring", {"path": loop.path, "direct": True}
    daemon = request.getfixturevalue("qsd")(num_queues=2)
    return "virtio-blk-vhost-user", {"path": daemon.socket}


def run_race(backend, op: str, action: str, threads: int = 3, reps: int = REPS,
             timeout: float = 120.0) -> dict:
    driver, props = backend
    cfg = {"driver": driver, "props": props, "op": op, "action": action,
           "threads": threads, "reps": reps}
    proc = subprocess.run([sys.executable, str(CHILD), json.dumps(cfg)],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=str(CHILD.parent))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    summary = json.loads(lines[-1]) if lines else {}
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode} ({op}, {action}, {driver})\n"
        f"summary: {summary}\nstderr:\n{proc.stderr[-4000:]}")
    assert summary.get("reps") == reps
    assert summary.get("ops", 0) >= threads * reps, summary
    return summary


@pytest.mark.parametrize("op", BLOCKING_OPS + QUEUE_OPS + DEVICE_OPS)
def test_close_while_threads_use_the_device(backend, op):
    summary = run_race(backend, op, "close")
    # Every worker ended, and every one of them through an error.
    assert sum(summary["errors"].values()) == 3 * REPS, summary


@pytest.mark.parametrize("op", BLOCKING_OPS + QUEUE_OPS)
def test_remove_queue_while_threads_use_it(backend, op):
    summary = run_race(backend, op, "remove_queue")
    assert sum(summary["errors"].values()) == 3 * REPS, summary


# ---------------------------------------------------------------------------
# Behaviours of the guard that need no race: in-process tests.

import asyncio  # noqa: E402
import gc  # noqa: E402
import signal  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402

import numpy as np  # noqa: E402

import blkio  # noqa: E402

MiB = 1 << 20
OUT_DTYPE = [("user_data", np.int64), ("ret", np.int32)]


def test_unregister_refuses_while_requests_in_flight_use_the_memory(qsd):
    daemon = qsd()
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket, queue_size=256) as dev:
        mem = np.frombuffer(blkio.Buffer(64 * 4096), np.uint8)
        assert dev.register(mem) is True
        q = dev.queue(0)
        for i in range(64):
            q.read(i * 4096, mem[i * 4096:(i + 1) * 4096], user_data=i)
        q.submit()
        with pytest.raises(ValueError, match=r"64 request\(s\) in flight still use it"):
            dev.unregister(mem)
        done = []
        while len(done) < 64:
            done += q.wait(min=1, timeout=10)
        assert all(c.ret == 0 for c in done)
        assert dev.unregister(mem) is True
        assert dev.unregister(mem) is False          # once only


def test_unregister_refuses_while_batch_requests_use_the_memory(slow_socket):
    with blkio.open("virtio-blk-vhost-user", path=slow_socket) as dev:
        mem = np.frombuffer(blkio.Buffer(8 * MiB), np.uint8)
        other = np.frombuffer(blkio.Buffer(4096), np.uint8)
        assert dev.register(mem) and dev.register(other)
        q = dev.queue(0)
        q.submit_reads(np.arange(8, dtype=np.uint64) * MiB, mem.reshape(8, MiB))
        in_flight = q.in_flight          # 8 MiB at 4 MiB/s: most still in flight
        assert in_flight > 0
        with pytest.raises(ValueError, match=rf"{in_flight} request\(s\) in flight"):
            dev.unregister(mem)
        assert dev.unregister(other) is True         # memory nobody uses goes
        out = np.zeros(8, OUT_DTYPE)
        got = 0
        while got < 8:
            got += q.reap(out, min=1, timeout=30)
        assert dev.unregister(mem) is True


def _every_call(dev, q, buf, adev_loop):
    """(name, call) for every public call that touches the instance."""
    offs = np.zeros(1, np.uint64)
    bufs = buf[:4096].reshape(1, 4096)
    out = np.zeros(1, OUT_DTYPE)
    return [
        ("read", lambda: dev.read(0, 4096)), ("readinto", lambda: dev.readinto(0, buf)),
        ("write", lambda: dev.write(0, buf)), ("readv", lambda: dev.readv(0, [buf])),
        ("writev", lambda: dev.writev(0, [buf])), ("flush", dev.flush),
        ("write_zeroes", lambda: dev.write_zeroes(0, 4096)), ("discard", lambda: dev.discard(0, 4096)),
        ("alloc", lambda: dev.alloc(4096)), ("register", lambda: dev.register(buf)),
        ("unregister", lambda: dev.unregister(buf)), ("get", lambda: dev.get("capacity")),
        ("set", lambda: dev.set("read-only", True)), ("properties", dev.properties),
        ("refresh_limits", dev.refresh_limits), ("queue", lambda: dev.queue(0)),
        ("add_queue", dev.add_queue), ("remove_queue", lambda: dev.remove_queue(q)),
        ("q.read", lambda: q.read(0, buf)), ("q.write", lambda: q.write(0, buf)),
        ("q.flush", q.flush), ("q.submit", q.submit), ("q.wait", lambda: q.wait(min=0)),
        ("q.completions", q.completions), ("q.submit_reads", lambda: q.submit_reads(offs, bufs)),
        ("q.submit_writes", lambda: q.submit_writes(offs, bufs)), ("q.reap", lambda: q.reap(out)),
        ("q.completion_fd", lambda: q.completion_fd),
        ("q.completion_fd_enabled", lambda: setattr(q, "completion_fd_enabled", True)),
        ("bounce_pool.acquire", lambda: dev.bounce_pool.acquire(4096)),
    ]


def test_every_call_after_close_says_the_device_is_closed(image):
    dev = blkio.open("io_uring", path=image.path)
    q = dev.queue(0)
    buf = dev.alloc(4096)
    dev.close()
    for name, call in _every_call(dev, q, buf, None):
        with pytest.raises(ValueError, match="closed") as info:
            call()
        assert "closed" in str(info.value), name


def test_every_queue_call_after_remove_queue_says_it_was_removed(image):
    with blkio.open("io_uring", path=image.path, num_queues=2) as dev:
        q = dev.queue(1)
        buf = dev.alloc(4096)
        dev.remove_queue(q)
        assert q.removed
        calls = [(n, c) for n, c in _every_call(dev, q, buf, None) if n.startswith("q.")]
        assert len(calls) == 11
        for name, call in calls:
            with pytest.raises(ValueError, match="queue 1 was removed"):
                call()
        dev.readinto(0, buf)                         # the device itself still works


def test_aio_after_close_says_the_device_is_closed(image):
    async def main():
        async with blkio.aio.open("io_uring", path=image.path) as adev:
            buf = adev.alloc(4096)
            adev.device.close()                      # closed under the AsyncDevice
            with pytest.raises(ValueError, match="closed"):
                await adev.readinto(0, buf)
            with pytest.raises(ValueError, match="closed"):
                await adev.flush()
    asyncio.run(main())


def test_aio_requests_in_flight_when_another_thread_closes_end(slow_socket):
    async def main():
        adev = await blkio.aio.open("virtio-blk-vhost-user", path=slow_socket)
        bufs = [adev.alloc(MiB) for _ in range(8)]
        futs = [adev.readinto(i * MiB, b) for i, b in enumerate(bufs)]
        closer = threading.Thread(target=adev.device.close)
        await asyncio.sleep(0.2)
        closer.start()
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
        closer.join(30)
        await adev.aclose()
        return results
    results = asyncio.run(main())
    # Close drains: requests end with their byte count, or (cut off) ValueError.
    assert all(r == MiB or isinstance(r, ValueError) for r in results), results


def test_aio_requests_cut_off_by_a_close_that_times_out_fail(slow_socket):
    # 8 MiB at 4 MiB/s: a close that waits 0.3 s cuts most of them off, and
    # each of those fails (their completions carry -ECANCELED), none
    # reports its byte count.
    async def main():
        adev = await blkio.aio.open("virtio-blk-vhost-user", path=slow_socket)
        bufs = [adev.alloc(MiB) for _ in range(8)]
        futs = [adev.readinto(i * MiB, b) for i, b in enumerate(bufs)]
        await asyncio.sleep(0.1)
        with pytest.warns(ResourceWarning, match="did not complete"):
            adev.device.close(timeout=0.3)
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
        await adev.aclose()
        return results
    results = asyncio.run(main())
    cut = [r for r in results if isinstance(r, ValueError)]
    assert all(r == MiB or isinstance(r, ValueError) for r in results), results
    assert len(cut) >= 4, results
    assert all("closed" in str(r) for r in cut), cut


@pytest.mark.parametrize("call,kind,pattern", [
    (lambda d, b: d.read(-1, 4096), ValueError, "offset must be >= 0"),
    (lambda d, b: d.read(0, -4096), ValueError, "nbytes must be >= 0"),
    (lambda d, b: d.read(4096.0, 4096), TypeError, "offset must be an integer, not float"),
    (lambda d, b: d.readinto(-4096, b), ValueError, "offset must be >= 0"),
    (lambda d, b: d.readinto(True, b), TypeError, "not bool"),
    (lambda d, b: d.write(-512, b), ValueError, "offset must be >= 0"),
    (lambda d, b: d.readv(0.5, [b]), TypeError, "offset must be an integer"),
    (lambda d, b: d.writev(-1, [b]), ValueError, "offset must be >= 0"),
    (lambda d, b: d.write_zeroes(0, -1), ValueError, "length must be >= 0"),
    (lambda d, b: d.discard(-1, 4096), ValueError, "offset must be >= 0"),
    (lambda d, b: d.write_zeroes(0, 2 ** 64), ValueError, "length is too large"),
    (lambda d, b: d.alloc(-1), ValueError, "nbytes must be >= 0"),
    (lambda d, b: d.alloc(4096.0), TypeError, "nbytes must be an integer"),
    (lambda d, b: d.queue(0).read(-1, b), ValueError, "offset must be >= 0"),
    (lambda d, b: d.queue(0).write(1.0, b), TypeError, "offset must be an integer"),
    (lambda d, b: d.queue(0).discard(0, -4096), ValueError, "length must be >= 0"),
    (lambda d, b: d.queue(0).wait(min=1.5), TypeError, "min must be an integer"),
    (lambda d, b: d.queue(0.0), TypeError, "index must be an integer"),
    (lambda d, b: d.bounce_pool.acquire(-1), ValueError, "nbytes must be >= 0"),
    (lambda d, b: blkio.Buffer(-4096), ValueError, "nbytes must be >= 0"),
    (lambda d, b: blkio.Buffer(4096.0), TypeError, "nbytes must be an integer"),
])
def test_bad_offsets_and_lengths_name_the_argument(image, call, kind, pattern):
    with blkio.open("io_uring", path=image.path) as dev:
        buf = dev.alloc(4096)
        with pytest.raises(kind, match=pattern):
            call(dev, buf)
        assert dev.stats.requests == 0                 # nothing was submitted


def test_numpy_integers_are_accepted_as_offsets_and_lengths(image):
    with blkio.open("io_uring", path=image.path) as dev:
        out = dev.read(np.int64(4096), np.uint32(4096))
        assert bytes(out) == image.data[4096:8192]
        buf = dev.alloc(np.uint64(4096))
        assert dev.readinto(np.uint16(0), buf) == 4096
        q = dev.queue(np.int8(0))
        q.read(np.int32(0), buf)
        assert len(q.wait(min=np.int64(1))) == 1


def test_blkio_aio_is_reachable_after_import_blkio():
    code = "import blkio, sys; assert 'blkio.aio' not in sys.modules; print(blkio.aio.open.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(CHILD.parent))
    assert out.returncode == 0 and out.stdout.strip() == "open", out.stderr


def test_close_from_a_signal_handler_inside_a_blocking_read(slow_socket):
    """The handler runs inside the read's wait (same thread): close must not
    wait for itself; the read ends with 'closed' and the last call out
    destroys the instance."""
    code = textwrap.dedent(f"""
        import signal, sys, numpy as np, blkio
        dev = blkio.open("virtio-blk-vhost-user", path={slow_socket!r})
        signal.signal(signal.SIGALRM, lambda *a: dev.close())
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        buf = np.zeros(8 << 20, np.uint8)
        try:
            dev.readinto(0, buf)
            print("no error")
        except ValueError as e:
            print("error:", e)
        print("state:", dev.state, dev.closed)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "error: virtio-blk-vhost-user device is closed" in out.stdout, out.stdout
    assert "state: closed True" in out.stdout, out.stdout


def test_two_threads_closing_at_once_both_return_closed(image):
    dev = blkio.open("io_uring", path=image.path)
    buf = dev.alloc(4096)
    stop = threading.Event()

    def io():
        while not stop.is_set():
            try:
                dev.readinto(0, buf)
            except ValueError:
                return
    worker = threading.Thread(target=io)
    worker.start()
    time.sleep(0.05)
    closers = [threading.Thread(target=dev.close) for _ in range(2)]
    for t in closers:
        t.start()
    for t in closers + [worker]:
        t.join(10)
    stop.set()
    assert not any(t.is_alive() for t in closers + [worker])
    assert dev.state == "closed"


def test_close_that_times_out_keeps_the_memory_of_requests_in_flight(slow_socket):
    dev = blkio.open("virtio-blk-vhost-user", path=slow_socket)
    mem = blkio.Buffer(16 * MiB)
    alive = weakref.ref(mem)
    arr = np.frombuffer(mem, np.uint8)
    assert dev.register(arr)
    q = dev.queue(0)
    for i in range(4):
        q.read(i * 4 * MiB, arr[i * 4 * MiB:(i + 1) * 4 * MiB])   # ~4 s at 4 MiB/s
    q.submit()
    with pytest.warns(ResourceWarning, match="did not complete"):
        dev.close(timeout=0.2)
    assert dev.closed
    del arr, mem
    gc.collect()
    assert alive() is not None, "memory of requests in flight was given back"
