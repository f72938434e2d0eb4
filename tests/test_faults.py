"""Backend failures over vhost-user: blkdebug-injected errors and a dead daemon.

qemu-storage-daemon stacks file -> blkdebug -> qcow2 -> vhost-user-blk export
(conftest ``qsd(faults=...)``).  virtio-blk reports every backend error as EIO.
Plain numpy memory is used throughout so that a bounce buffer is in play: the
pool must be idle again after every failure.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import numpy as np
import pytest

import blkio
from conftest import Inject, convert_to_qcow2, qcow2_host_offset

MiB = 1 << 20
DEAD_BACKEND_BOUND = 10.0      # seconds within which a dead daemon must be reported


def _plain(data: bytes) -> np.ndarray:
    """Plain numpy memory (no fd: bounced on vhost-user)."""
    a = np.empty(len(data), dtype=np.uint8)
    a[:] = np.frombuffer(data, dtype=np.uint8)
    return a


def _read(dev, offset: int, n: int) -> bytes:
    a = np.zeros(n, dtype=np.uint8)
    assert dev.readinto(offset, a) == n
    return a.tobytes()


def _assert_eio(excinfo) -> None:
    e = excinfo.value
    assert isinstance(e, OSError)
    assert e.errno == errno.EIO, (e.errno, str(e))


def _idle(dev) -> None:
    assert dev.bounce_pool.in_use == 0, dev.bounce_pool


@pytest.fixture
def open_faulty(qsd, image):
    """``open_faulty(*rules) -> (dev, image)``: a vhost-user device over a
    qcow2 copy of ``image`` under blkdebug rules; closed at teardown."""
    devs = []

    def opener(*rules, img=None):
        daemon = qsd(image=img if img is not None else image, faults=list(rules))
        dev = blkio.open("virtio-blk-vhost-user", daemon.socket)
        devs.append(dev)
        return dev, daemon

    yield opener
    for dev in devs:
        dev.close()


# ---------------------------------------------------------------------------
# Injected errors


def test_read_fault_raises_eio_and_next_request_works(open_faulty, image):
    dev, _ = open_faulty(Inject("read_aio", errno=errno.EIO, once=True))
    with pytest.raises(OSError) as ei:
        _read(dev, MiB, 64 * 1024)
    _assert_eio(ei)
    _idle(dev)
    assert _read(dev, MiB, 64 * 1024) == image.data[MiB:MiB + 64 * 1024]
    _idle(dev)


def test_data_written_before_read_fault_reads_back_intact(open_faulty, image):
    dev, _ = open_faulty(Inject("read_aio", once=True))
    data = np.random.default_rng(1).bytes(128 * 1024)
    dev.write(4 * MiB, _plain(data))              # writes do not trigger read_aio
    dev.flush()
    _idle(dev)
    with pytest.raises(OSError) as ei:
        _read(dev, 4 * MiB, len(data))
    _assert_eio(ei)
    _idle(dev)
    assert _read(dev, 4 * MiB, len(data)) == data
    assert _read(dev, 0, 4096) == image.data[:4096]
    _idle(dev)


def test_write_fault_raises_eio_and_next_request_works(open_faulty, image):
    dev, _ = open_faulty(Inject("write_aio", once=True))
    data = np.random.default_rng(2).bytes(64 * 1024)
    with pytest.raises(OSError) as ei:
        dev.write(2 * MiB, _plain(data))
    _assert_eio(ei)
    _idle(dev)
    assert dev.write(2 * MiB, _plain(data)) == len(data)
    _idle(dev)
    assert _read(dev, 2 * MiB, len(data)) == data
    assert _read(dev, 3 * MiB, 4096) == image.data[3 * MiB:3 * MiB + 4096]
    _idle(dev)


def test_data_written_before_write_fault_reads_back_intact(open_faulty, image, tmp_path):
    # The rule hits only the write that touches one sector: writes elsewhere
    # before it succeed, the faulting one fails, and all earlier data stays.
    target = 8 * MiB
    qcow2 = convert_to_qcow2(image, tmp_path / "targeted.qcow2")
    sector = qcow2_host_offset(qcow2, target) // 512
    dev, _ = open_faulty(Inject("write_aio", once=True, sector=sector), img=qcow2)
    rng = np.random.default_rng(3)
    before = {off: rng.bytes(32 * 1024) for off in (0, MiB, 5 * MiB, 12 * MiB)}
    for off, data in before.items():
        dev.write(off, _plain(data))
    _idle(dev)
    with pytest.raises(OSError) as ei:
        dev.write(target, _plain(rng.bytes(4096)))
    _assert_eio(ei)
    _idle(dev)
    for off, data in before.items():
        assert _read(dev, off, len(data)) == data, off
    # The failed write changed nothing we rely on; a retry succeeds.
    retry = rng.bytes(4096)
    dev.write(target, _plain(retry))
    assert _read(dev, target, 4096) == retry
    _idle(dev)


def test_flush_fault_raises_eio_and_next_request_works(open_faulty):
    dev, _ = open_faulty(Inject("flush_to_os", once=True))
    data = np.random.default_rng(4).bytes(16 * 1024)
    dev.write(MiB, _plain(data))
    _idle(dev)
    with pytest.raises(OSError) as ei:
        dev.flush()
    _assert_eio(ei)
    _idle(dev)
    dev.flush()                                   # once: the next flush works
    assert _read(dev, MiB, len(data)) == data
    _idle(dev)


def test_enospc_from_backend_is_reported_as_eio(open_faulty):
    dev, _ = open_faulty(Inject("write_aio", errno=errno.ENOSPC, once=True))
    with pytest.raises(OSError) as ei:
        dev.write(0, _plain(bytes(4096)))
    _assert_eio(ei)            # virtio-blk has one error status: EIO
    _idle(dev)
    dev.write(0, _plain(bytes(4096)))


def test_immediate_read_fault_raises_eio(open_faulty, image):
    dev, _ = open_faulty(Inject("read_aio", once=True, immediately=True))
    with pytest.raises(OSError) as ei:
        _read(dev, 0, 4096)
    _assert_eio(ei)
    _idle(dev)
    assert _read(dev, 0, 4096) == image.data[:4096]


def test_persistent_read_fault_fails_every_read_and_writes_still_work(open_faulty):
    dev, _ = open_faulty(Inject("read_aio", once=False, iotype="read"))
    for _ in range(3):
        with pytest.raises(OSError) as ei:
            _read(dev, 0, 4096)
        _assert_eio(ei)
        _idle(dev)
    dev.write(0, _plain(bytes(4096)))
    dev.flush()
    _idle(dev)


def test_fault_on_split_bounced_request_releases_pool(open_faulty):
    # 9 MiB of plain memory: several bounced pieces, one of them fails.
    dev, _ = open_faulty(Inject("read_aio", once=True))
    with pytest.raises(OSError) as ei:
        _read(dev, 0, 9 * MiB)
    _assert_eio(ei)
    _idle(dev)
    assert len(_read(dev, 0, 9 * MiB)) == 9 * MiB
    _idle(dev)


def test_read_fault_through_queue_completion(open_faulty, image):
    dev, _ = open_faulty(Inject("read_aio", once=True))
    q = dev.queue(0)
    bufs = [np.zeros(4096, np.uint8) for _ in range(2)]
    q.read(0, bufs[0], user_data="first")
    comps = q.wait(1, timeout=10)
    assert [c.user_data for c in comps] == ["first"]
    assert comps[0].ret == -errno.EIO
    with pytest.raises(OSError) as ei:
        comps[0].check()
    _assert_eio(ei)
    q.read(0, bufs[1], user_data="second")
    comps = q.wait(1, timeout=10)
    assert comps[0].ret == 0
    assert bufs[1].tobytes() == image.data[:4096]
    assert q.in_flight == 0
    _idle(dev)


# ---------------------------------------------------------------------------
# A dead daemon


def _bounded(fn, limit: float):
    """Run fn in a thread; return (finished, result_or_exception, seconds)."""
    box = {}

    def run():
        t0 = time.monotonic()
        try:
            box["result"] = fn()
        except BaseException as e:      # noqa: BLE001 - reported to the test
            box["result"] = e
        box["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    return (not t.is_alive()), box.get("result"), box.get("elapsed", limit)


@pytest.fixture
def vu_pair(qsd):
    daemon = qsd()
    dev = blkio.open("virtio-blk-vhost-user", daemon.socket)
    yield dev, daemon
    finished, _, _ = _bounded(dev.close, DEAD_BACKEND_BOUND)
    assert finished, "close() hung at teardown"


def test_read_after_daemon_killed_raises_oserror_within_bound(vu_pair):
    dev, daemon = vu_pair
    assert _read(dev, 0, 4096) == daemon.raw.data[:4096]
    daemon.kill(signal.SIGKILL)
    finished, result, elapsed = _bounded(lambda: _read(dev, 0, 4096), DEAD_BACKEND_BOUND)
    assert finished, f"read on a dead backend still blocked after {DEAD_BACKEND_BOUND} s"
    assert isinstance(result, OSError), f"expected OSError, got {result!r}"
    assert elapsed < DEAD_BACKEND_BOUND


def test_close_after_daemon_killed_does_not_hang(vu_pair):
    dev, daemon = vu_pair
    _read(dev, 0, 4096)
    daemon.kill(signal.SIGKILL)
    finished, result, elapsed = _bounded(dev.close, DEAD_BACKEND_BOUND)
    assert finished, f"close() after the daemon died hung for {DEAD_BACKEND_BOUND} s"
    assert not isinstance(result, BaseException), result
    assert dev.closed


def test_write_and_flush_after_daemon_killed_raise_oserror(vu_pair):
    dev, daemon = vu_pair
    daemon.kill(signal.SIGKILL)
    for call in (lambda: dev.write(0, _plain(bytes(4096))), dev.flush):
        finished, result, _ = _bounded(call, DEAD_BACKEND_BOUND)
        assert finished, "request on a dead backend hung"
        assert isinstance(result, OSError), result


def test_request_in_flight_when_daemon_dies_fails_within_bound(vu_pair):
    # Freeze the daemon so the read cannot complete, then kill it.
    dev, daemon = vu_pair
    _read(dev, 0, 4096)
    os.kill(daemon.pid, signal.SIGSTOP)
    killer = threading.Timer(0.5, lambda: daemon.kill(signal.SIGKILL))
    killer.start()
    try:
        finished, result, elapsed = _bounded(lambda: _read(dev, 0, 64 * 1024), DEAD_BACKEND_BOUND + 1)
    finally:
        killer.join()
    assert finished, "a read in flight when the daemon died never returned"
    assert isinstance(result, OSError), result


def test_failed_requests_on_dead_daemon_release_bounce_space(vu_pair):
    # DESIGN 9: detect the hang-up "and fail the requests in flight" -- a
    # failed request must not keep its bounce buffer (nor stay in flight).
    dev, daemon = vu_pair
    _read(dev, 0, 4096)
    daemon.kill(signal.SIGKILL)
    for _ in range(3):
        finished, result, _ = _bounded(lambda: _read(dev, 0, 4096), DEAD_BACKEND_BOUND)
        assert finished and isinstance(result, OSError), result
    _idle(dev)
    assert dev.queue(0).in_flight == 0


def test_large_read_on_dead_daemon_raises_oserror(vu_pair):
    # A 9 MiB bounced read needs the pool to grow (a new mapping): the
    # mapping itself fails on the dead socket; still an OSError, no hang.
    dev, daemon = vu_pair
    daemon.kill(signal.SIGKILL)
    finished, result, _ = _bounded(lambda: _read(dev, 0, 9 * MiB), DEAD_BACKEND_BOUND)
    assert finished and isinstance(result, OSError), result


def test_asyncio_read_fault_raises_eio_in_the_await_and_next_read_works(open_faulty, image):
    # blkio.aio's per-request path resolves successes in the core and hands
    # failures back to the facade, which raises them in the awaiting task.
    import asyncio
    import blkio.aio

    dev, _ = open_faulty(Inject("read_aio", errno=errno.EIO, once=True))

    async def main():
        adev = blkio.aio.AsyncDevice(dev)
        try:
            buf = dev.alloc(64 * 1024)
            with pytest.raises(OSError) as ei:
                await asyncio.wait_for(adev.readinto(MiB, buf), 30)
            _assert_eio(ei)
            assert await asyncio.wait_for(adev.readinto(MiB, buf), 30) == 64 * 1024
            assert buf.tobytes() == image.data[MiB:MiB + 64 * 1024]
        finally:
            adev.detach()

    asyncio.run(main())
    _idle(dev)


def test_bench_batch_loop_stops_with_the_failed_requests_error(qsd, image, tmp_path):
    # The batch bench checks Queue.failed after each reap instead of the
    # whole ret column: an injected EIO must still stop it with that error.
    import subprocess
    import sys
    daemon = qsd(image=image, faults=[Inject("read_aio", errno=errno.EIO, once=True)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "blkio", "bench", "--api=batch",
                           "--iodepth=8", "--readwrite=randread", "--runtime=5",
                           "virtio-blk-vhost-user", f"path={daemon.socket}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0, proc.stdout
    assert "I/O request failed" in proc.stderr and os.strerror(errno.EIO) in proc.stderr, \
        proc.stderr[-2000:]
