"""asyncio batch awaits (AsyncDevice.read_batch / write_batch, issue 13 4c):
data byte for byte against the backing file, waves beyond the queue's slots,
many batches and single-request awaits in flight at once, injected failures,
cancellation, close during a batch, loop fairness; on asyncio's loop and on
uvloop's."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading
import time
import traceback
import weakref

import numpy as np
import pytest

import blkio.aio
from conftest import Inject, convert_to_qcow2, qcow2_host_offset, require

KiB = 1024
MiB = 1 << 20
BS = 4096


def _backend(request, kind):
    """(driver, open kwargs, Image whose file holds the device's bytes)."""
    if kind == "io_uring":
        img = request.getfixturevalue("image")
        return "io_uring", {"path": str(img.path)}, img
    daemon = request.getfixturevalue("qsd")()
    return "virtio-blk-vhost-user", {"path": daemon.socket}, daemon.raw


def _offsets(size: int, n: int, seed: int, bs: int = BS) -> np.ndarray:
    """n distinct block offsets in random order."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(size // bs)[:n] * bs).astype(np.uint64)


def _fill(rows: np.ndarray, seed: int) -> None:
    rows[:] = np.random.default_rng(seed).integers(0, 256, rows.shape, dtype=np.uint8)


def _check_rows(backing, offsets, rows) -> None:
    bs = rows.shape[1]
    for i, off in enumerate(offsets.tolist()):
        assert rows[i].tobytes() == backing.pread(off, bs), f"row {i}, offset {off}"


# ---------------------------------------------------------------------------
# Data


@pytest.mark.parametrize("kind", ["io_uring", "vhost-user"])
def test_read_batch_fills_every_row_from_its_offset(request, run, kind):
    driver, kw, backing = _backend(request, kind)
    offs = _offsets(backing.size, 64, seed=1)

    async def main():
        async with blkio.aio.open(driver, **kw) as adev:
            rows = adev.alloc(len(offs) * BS).reshape(-1, BS)
            assert await adev.read_batch(offs, rows) == len(offs) * BS
            assert adev.queue.in_flight == 0
            return rows
    _check_rows(backing, offs, run(main()))


@pytest.mark.parametrize("kind", ["io_uring", "vhost-user"])
def test_write_batch_lands_every_row_at_its_offset(request, run, kind):
    driver, kw, backing = _backend(request, kind)
    offs = _offsets(backing.size, 48, seed=2)

    async def main():
        async with blkio.aio.open(driver, **kw) as adev:
            rows = adev.alloc(len(offs) * BS).reshape(-1, BS)
            _fill(rows, 3)
            assert await adev.write_batch(offs, rows) == len(offs) * BS
            # fua: durable at completion, same data path
            assert await adev.write_batch(offs[:8], rows[:8], fua=True) == 8 * BS
            return rows.copy()
    _check_rows(backing, offs, run(main()))


def test_read_batch_with_region_and_row_offsets(image, run):
    offs = _offsets(image.size, 16, seed=4, bs=8 * KiB)

    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            region = adev.alloc(16 * 8 * KiB)
            slots = (np.arange(16, dtype=np.uint64)[::-1] * 8 * KiB).copy()   # rows reversed
            n = await adev.read_batch(offs, slots, region=region, blocksize=8 * KiB)
            assert n == 16 * 8 * KiB
            return region.reshape(16, 8 * KiB)[::-1]
    _check_rows(image, offs, run(main()))


@pytest.mark.parametrize("kind", ["io_uring", "vhost-user"])
def test_batch_larger_than_the_queue_goes_in_waves(request, run, kind):
    driver, kw, backing = _backend(request, kind)
    depth = {"io_uring": "num_entries", "vhost-user": "queue_size"}[kind]
    offs = _offsets(backing.size, 300, seed=5)

    async def main():
        async with blkio.aio.open(driver, **kw, **{depth: 16}) as adev:
            q = adev.queue
            assert q.depth == 16
            # The core refuses a batch beyond the queue's slots ...
            rows = adev.alloc(len(offs) * BS).reshape(-1, BS)
            with pytest.raises(ValueError, match="does not fit"):
                q.submit_reads(offs, rows)
            # ... the await submits it in waves.
            before = q.requests
            assert await adev.read_batch(offs, rows) == len(offs) * BS
            assert q.requests - before == len(offs)
            assert q.in_flight == 0
            wrows = adev.alloc(len(offs) * BS).reshape(-1, BS)
            _fill(wrows, 6)
            assert await adev.write_batch(offs, wrows) == len(offs) * BS
            return rows, wrows.copy()
    rows, wrows = run(main())
    # read first (the file's original bytes), then overwritten
    for i, off in enumerate(offs.tolist()):
        assert rows[i].tobytes() == backing.data[off:off + BS], f"read row {i}"
    _check_rows(backing, offs, wrows)


def test_empty_batch_returns_zero(image, run):
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            empty = adev.alloc(BS).reshape(1, BS)[:0]
            assert await adev.read_batch(np.zeros(0, np.uint64), empty) == 0
    run(main())


# ---------------------------------------------------------------------------
# Many in flight at once


@pytest.mark.parametrize("kind", ["io_uring", "vhost-user"])
def test_batches_and_single_awaits_in_flight_together(request, run, kind):
    driver, kw, backing = _backend(request, kind)
    offs = _offsets(backing.size, 600, seed=7)
    sizes = [1, 5, 32, 64, 100, 7, 33, 200]            # 442 batch requests
    singles = offs[442:522].tolist()                   # 80 single reads
    written = offs[522:600]                            # one write batch

    async def main():
        async with blkio.aio.open(driver, **kw) as adev:
            rows = adev.alloc(442 * BS).reshape(-1, BS)
            wrows = adev.alloc(len(written) * BS).reshape(-1, BS)
            _fill(wrows, 8)
            sbufs = [adev.alloc(BS) if i % 2 else np.zeros(BS, np.uint8)
                     for i in range(len(singles))]
            ops, pos = [], 0
            for n in sizes:
                ops.append(adev.read_batch(offs[pos:pos + n], rows[pos:pos + n]))
                pos += n
            ops += [adev.readinto(o, b) for o, b in zip(singles, sbufs)]
            ops.append(adev.write_batch(written, wrows))
            order = np.random.default_rng(9).permutation(len(ops))
            results = await asyncio.gather(*(ops[i] for i in order))
            by_op = dict(zip(order.tolist(), results))
            assert [by_op[i] for i in range(len(sizes))] == [n * BS for n in sizes]
            assert all(by_op[len(sizes) + j] == BS for j in range(len(singles)))
            assert by_op[len(ops) - 1] == len(written) * BS
            assert adev.queue.in_flight == 0
            assert not adev._port.batches_in_flight
            return rows, sbufs, wrows.copy()
    rows, sbufs, wrows = run(main())
    _check_rows(backing, offs[:442], rows)
    for off, buf in zip(singles, sbufs):
        assert buf.tobytes() == backing.pread(off, BS), f"single read at {off}"
    _check_rows(backing, written, wrows)


@pytest.mark.parametrize("n", [32, 100])
def test_loop_keeps_running_during_a_loop_of_cached_batches(image, run, n):
    # Cached reads complete during submission: the awaits return at once,
    # but must still let other tasks run (n=100 goes in waves of 64).
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path), num_entries=64) as adev:
            offs = _offsets(image.size, n, seed=10)
            rows = adev.alloc(n * BS).reshape(-1, BS)
            await adev.read_batch(offs, rows)           # now page-cached
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0)
                    ticks += 1
            t = asyncio.ensure_future(ticker())
            await asyncio.sleep(0)
            ticks = 0
            # 0.3 s of this thread's CPU time, not of the wall clock: on a
            # shared machine the process may run a fraction of the time.
            end = time.thread_time() + 0.3
            batches = 0
            while time.thread_time() < end:
                await adev.read_batch(offs, rows)
                batches += 1
            t.cancel()
            return ticks, batches
    ticks, batches = run(main())
    # At least one yield per millisecond of batches (0.3 s); not a timing
    # assertion on the batches themselves.
    assert ticks >= 100, (ticks, batches)


# ---------------------------------------------------------------------------
# Failures


def _faulty(qsd, image, tmp_path, event, target):
    """A vhost-user export whose blkdebug fails the first request touching
    guest offset ``target`` (once)."""
    qcow2 = convert_to_qcow2(image, tmp_path / "faulty.qcow2")
    sector = qcow2_host_offset(qcow2, target) // 512
    return qsd(image=qcow2, faults=[Inject(event, once=True, sector=sector)])


@pytest.mark.parametrize("op", ["read", "write"])
def test_failed_request_raises_oserror_naming_its_offset_after_the_batch(
        qsd, image, tmp_path, run, op):
    offs = _offsets(image.size, 64, seed=11, bs=64 * KiB)
    bad = 0                             # fails first, while the others still run
    daemon = _faulty(qsd, image, tmp_path, f"{op}_aio", int(offs[bad]))

    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", path=daemon.socket) as adev:
            rows = adev.alloc(len(offs) * 64 * KiB).reshape(-1, 64 * KiB)
            _fill(rows, 12)
            call = adev.read_batch if op == "read" else adev.write_batch
            with pytest.raises(OSError) as ei:
                await call(offs, rows)
            # Raised only once every request of the batch finished.
            assert adev.queue.in_flight == 0
            assert not adev._port.batches_in_flight
            if op == "read":
                _check_rows(image, offs[1:], rows[1:])
            e = ei.value
            assert e.errno == errno.EIO
            assert (e.index, e.offset, e.failed) == (bad, int(offs[bad]), 1)
            assert f"offset {int(offs[bad])}" in str(e)
            assert f"request {bad} of a batch of {len(offs)}" in str(e)
            # once: the same batch now succeeds
            assert await call(offs, rows) == len(offs) * 64 * KiB
            return rows.copy()
    rows = run(main())
    if op == "read":
        _check_rows(image, offs, rows)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs mount (root only): writes into a sparse file on it
    fail with ENOSPC during io_uring's inline submission."""
    import subprocess
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    require(r.returncode == 0, f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_failures_during_submission_raise_after_the_batch(tiny_fs, run):
    # The batch completes inside its submission (the cheap path): 64 pages
    # fit, the rest fail with ENOSPC.
    path = tiny_fs / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    offs = np.arange(128, dtype=np.uint64) * BS

    async def main():
        async with blkio.aio.open("io_uring", path=str(path)) as adev:
            rows = adev.alloc(128 * BS).reshape(-1, BS)
            _fill(rows, 15)
            with pytest.raises(OSError) as ei:
                await adev.write_batch(offs, rows)
            assert adev.queue.in_flight == 0 and not adev._port.batches_in_flight
            return ei.value, rows.copy()
    e, rows = run(main())
    assert e.errno == errno.ENOSPC
    assert 0 < e.failed < 128
    assert e.index == 128 - e.failed            # in order: the first that did not fit
    assert e.offset == e.index * BS and f"offset {e.offset}" in str(e)
    with open(path, "rb") as f:
        for i in range(e.index):
            assert os.pread(f.fileno(), BS, i * BS) == rows[i].tobytes(), i


def test_failure_in_one_batch_leaves_the_others_alone(qsd, image, tmp_path, run):
    offs = _offsets(image.size, 40, seed=13)
    daemon = _faulty(qsd, image, tmp_path, "read_aio", int(offs[25]))

    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", path=daemon.socket) as adev:
            rows = adev.alloc(len(offs) * BS).reshape(-1, BS)
            results = await asyncio.gather(
                adev.read_batch(offs[:20], rows[:20]),
                adev.read_batch(offs[20:30], rows[20:30]),      # holds offs[25]
                adev.read_batch(offs[30:], rows[30:]),
                return_exceptions=True)
            assert results[0] == 20 * BS and results[2] == 10 * BS, results
            assert isinstance(results[1], OSError) and results[1].index == 5, results
            return rows
    rows = run(main())
    _check_rows(image, offs[:20], rows[:20])
    _check_rows(image, offs[30:], rows[30:])


def test_bad_batches_are_refused_before_anything_is_submitted(image, run):
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path), num_entries=16) as adev:
            q = adev.queue
            rows = adev.alloc(64 * BS).reshape(-1, BS)
            offs = _offsets(image.size, 64, seed=14)
            before = q.requests
            with pytest.raises(ValueError, match="64 offsets but 63 buffers"):
                await adev.read_batch(offs, rows[:63])
            with pytest.raises(TypeError, match="1-D"):
                await adev.read_batch(offs.reshape(8, 8), rows)
            with pytest.raises(ValueError, match="Device.alloc"):
                await adev.read_batch(offs[:4], np.zeros((4, BS), np.uint8))
            late = offs.copy()
            late[50] = 2**64 - BS // 2      # wraps past 2**64, in a later wave
            with pytest.raises(ValueError, match=r"offsets\[50\] = .* pass the end"):
                await adev.read_batch(late, rows)
            assert q.requests == before and q.in_flight == 0
            adev.device.close()
            with pytest.raises(ValueError, match="closed"):
                await adev.read_batch(offs, rows)
    run(main())


# ---------------------------------------------------------------------------
# Cancellation and close


async def _slow_start(adev):
    """Fill the throttle's bucket so that the next requests wait seconds."""
    await adev.read(0, 8 * MiB)


def test_cancelled_batch_keeps_its_memory_until_its_requests_complete(slow_socket, run):
    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", path=slow_socket,
                                  queue_size=8) as adev:
            q = adev.queue
            await _slow_start(adev)
            rows = adev.alloc(20 * 64 * KiB).reshape(20, 64 * KiB)
            rows[:] = 0xA5
            alive = weakref.ref(rows.base)
            before = q.requests
            offs = (np.arange(20, dtype=np.uint64) * 64 * KiB) + 16 * MiB
            task = asyncio.ensure_future(adev.read_batch(offs, rows))
            await asyncio.sleep(0.1)
            assert q.in_flight == 8                     # the first wave of 8
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as ei:
                await task
            assert task.cancelled()
            # The caller lets go of everything (a traceback would keep the
            # batch's frame, and so the memory, alive by accident).
            traceback.clear_frames(ei.value.__traceback__)
            del ei, task, rows
            gc.collect()
            # Still in flight: the batch holds the memory the device writes,
            # so a new alloc cannot get it.
            assert q.in_flight == 8
            assert alive() is not None
            fresh = adev.alloc(20 * 64 * KiB)
            fresh[:] = 0x5A
            deadline = time.monotonic() + 30
            while q.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert q.in_flight == 0
            assert bool((fresh == 0x5A).all()), "the cancelled batch wrote into reused memory"
            # No wave after the cancel; the memory is let go once done.
            assert q.requests - before == 8
            gc.collect()
            assert alive() is None
            assert not adev._port.batches_in_flight
            # The device still serves batches.
            more = adev.alloc(2 * BS).reshape(2, BS)
            more[:] = 0xEE
            assert await adev.read_batch(np.array([0, BS], np.uint64), more) == 2 * BS
            assert not more.any()                       # the throttled file is all zeros
    run(main())


def test_close_from_another_thread_during_a_batch_raises_valueerror(slow_socket, run):
    async def main():
        adev = await blkio.aio.open("virtio-blk-vhost-user", path=slow_socket)
        await _slow_start(adev)
        rows = adev.alloc(8 * 256 * KiB).reshape(8, 256 * KiB)
        offs = np.arange(8, dtype=np.uint64) * 256 * KiB
        task = asyncio.ensure_future(adev.read_batch(offs, rows))
        single = adev.readinto(4 * MiB, adev.alloc(BS))
        await asyncio.sleep(0.2)
        assert not task.done()
        closer = threading.Thread(target=adev.device.close)
        closer.start()
        with pytest.raises(ValueError, match="closed .* while a batch of 8 request"):
            await task
        await asyncio.gather(single, return_exceptions=True)
        closer.join(30)
        assert adev.device.closed
        with pytest.raises(ValueError, match="closed"):
            await adev.read_batch(offs, rows)
        await adev.aclose()
    run(main())
