"""asyncio front (blkio.aio): opening and closing, many awaits in flight on one
queue, every request kind, cancellation, bounce-pool fairness, spin_us, loop
responsiveness and O_DIRECT with misaligned memory (issue 4)."""

from __future__ import annotations

import asyncio
import select
import time

import numpy as np
import pytest

import blkio
import blkio.aio

KiB = 1024
MiB = 1 << 20
BS = 4096


def _run(coro, timeout=60.0):
    """Run ``coro`` on a fresh loop, bounded so that a hang fails the test."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def _pattern(i: int, n: int = BS) -> np.ndarray:
    """Plain numpy memory (not mapped into any device) with a per-i pattern."""
    buf = np.empty(n, np.uint8)
    buf[:] = (np.arange(n, dtype=np.uint32) * 7 + i * 13 + 1) % 251
    return buf


def _backend(request, kind):
    """(open kwargs, Image whose file holds the device's bytes)."""
    if kind == "io_uring":
        img = request.getfixturevalue("image")
        return ("io_uring", {"path": str(img.path)}), img
    if kind == "loop-direct":
        loop = request.getfixturevalue("loopdev")
        return ("io_uring", {"path": loop.path, "direct": True}), loop.backing
    if kind == "vhost-user":
        daemon = request.getfixturevalue("qsd")()
        return ("virtio-blk-vhost-user", {"path": daemon.socket}), daemon.raw
    raise AssertionError(kind)


async def _warm_up_throttle(adev, nbytes=4 * MiB):
    """Fill the throttle's bucket: the request after this one waits about
    (nbytes - burst) / 4 MiB/s before the daemon starts it."""
    await adev.read(0, nbytes)


# ---------------------------------------------------------------------------
# Opening and closing


def test_async_with_open_reads_and_closes_device(image):
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            assert isinstance(adev, blkio.aio.AsyncDevice)
            data = await adev.read(8192, BS)
            assert data.tobytes() == image.data[8192:8192 + BS]
            dev = adev.device
        return dev
    dev = _run(main())
    assert dev.closed


def test_await_open_then_aclose_closes_device(image):
    async def main():
        adev = await blkio.aio.open("io_uring", path=str(image.path))
        try:
            assert (await adev.read(0, BS)).tobytes() == image.data[:BS]
        finally:
            await adev.aclose()
        assert adev.device.closed
        await adev.aclose()          # a second aclose is harmless
    _run(main())


# ---------------------------------------------------------------------------
# Many awaits in flight on one device


@pytest.mark.parametrize("kind", ["io_uring", "loop-direct", "vhost-user"])
def test_gather_256_reads_and_writes_match_backing_file(request, kind):
    (driver, kwargs), backing = _backend(request, kind)
    n = 256
    rng = np.random.default_rng(4)
    blocks = rng.permutation(backing.size // BS)[:n] * BS
    write_offs = [int(o) for o in blocks[: n // 2]]
    read_offs = [int(o) for o in blocks[n // 2:]]

    async def main():
        async with blkio.aio.open(driver, **kwargs) as adev:
            wbufs = [_pattern(i) for i in range(len(write_offs))]
            rbufs = [adev.device.alloc(BS) if i % 2 else np.zeros(BS, np.uint8)
                     for i in range(len(read_offs))]
            ops = [adev.write(o, b) for o, b in zip(write_offs, wbufs)]
            ops += [adev.readinto(o, b) for o, b in zip(read_offs, rbufs)]
            results = await asyncio.gather(*ops)
            assert results == [BS] * n
            await adev.flush()
            assert adev.queue.in_flight == 0
            assert adev.device.bounce_pool.in_use == 0
            return wbufs, rbufs

    wbufs, rbufs = _run(main())
    for off, buf in zip(read_offs, rbufs):
        assert buf.tobytes() == backing.data[off:off + BS], f"read at {off}"
    for off, buf in zip(write_offs, wbufs):
        assert backing.pread(off, BS) == buf.tobytes(), f"write at {off}"


# ---------------------------------------------------------------------------
# Each request kind


def test_readinto_fills_plain_numpy_buffer(image):
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            buf = np.zeros(3 * BS, np.uint8)
            assert await adev.readinto(5 * BS, buf) == 3 * BS
            return buf
    assert _run(main()).tobytes() == image.data[5 * BS:8 * BS]


def test_read_returns_mapped_array_with_file_data(image):
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            out = await adev.read(MiB, 64 * KiB)
            assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.size == 64 * KiB
            return out.tobytes()
    assert _run(main()) == image.data[MiB:MiB + 64 * KiB]


def test_write_with_fua_reaches_file(image):
    buf = _pattern(9, 2 * BS)

    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            assert await adev.write(3 * BS, buf) == 2 * BS
            assert await adev.write(10 * BS, buf, fua=True) == 2 * BS
            await adev.flush()
    _run(main())
    assert image.pread(3 * BS, 2 * BS) == buf.tobytes()
    assert image.pread(10 * BS, 2 * BS) == buf.tobytes()


def test_readv_scatters_into_several_buffers(image):
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            bufs = [np.zeros(BS, np.uint8), adev.device.alloc(2 * BS), bytearray(BS)]
            assert await adev.readv(7 * BS, bufs) == 4 * BS
            return b"".join(bytes(b) for b in bufs)
    assert _run(main()) == image.data[7 * BS:11 * BS]


def test_writev_gathers_several_buffers(image):
    bufs = [_pattern(1), _pattern(2, 2 * BS), bytes(_pattern(3))]

    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            assert await adev.writev(20 * BS, bufs) == 4 * BS
            await adev.flush()
    _run(main())
    assert image.pread(20 * BS, 4 * BS) == b"".join(bytes(b) for b in bufs)


def test_write_zeroes_zeroes_range(image):
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            await adev.write_zeroes(64 * KiB, 128 * KiB)
            await adev.flush()
    _run(main())
    assert image.pread(64 * KiB, 128 * KiB) == bytes(128 * KiB)
    assert image.pread(192 * KiB, BS) == image.data[192 * KiB:192 * KiB + BS]


def test_discard_succeeds_and_leaves_device_usable(image):
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            await adev.discard(MiB, 256 * KiB)
            await adev.flush()
            after = (await adev.read(MiB, 256 * KiB)).tobytes()
            other = (await adev.read(0, BS)).tobytes()
            return after, other
    after, other = _run(main())
    assert after in (bytes(256 * KiB), image.data[MiB:MiB + 256 * KiB])
    assert other == image.data[:BS]


def test_flush_after_writes_completes(image):
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            await adev.write(0, _pattern(5))
            assert await adev.flush() is None
            assert adev.queue.in_flight == 0
    _run(main())
    assert image.pread(0, BS) == _pattern(5).tobytes()


# ---------------------------------------------------------------------------
# Cancellation


def test_cancelled_read_task_is_cancelled_and_device_still_works(slow_socket):
    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", path=slow_socket) as adev:
            await _warm_up_throttle(adev)
            big = np.zeros(4 * MiB, np.uint8)          # plain memory: bounced
            task = asyncio.ensure_future(adev.readinto(0, big))
            await asyncio.sleep(0.1)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled()
            # The device still serves requests (behind the cancelled one).
            small = np.full(BS, 0xEE, np.uint8)
            assert await adev.readinto(64 * MiB - BS, small) == BS
            assert small.tobytes() == bytes(BS)
    _run(main())


def test_cancelled_read_releases_bounce_space_once_completion_arrives(slow_socket):
    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", path=slow_socket) as adev:
            pool = adev.device.bounce_pool
            await _warm_up_throttle(adev, 8 * MiB)
            assert pool.in_use == 0
            task = asyncio.ensure_future(adev.readinto(0, np.zeros(2 * MiB, np.uint8), chunk=2 * MiB))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Still in flight: its bounce space is still held.
            assert adev.queue.in_flight == 1
            assert pool.in_use >= 2 * MiB
            deadline = time.monotonic() + 20
            while adev.queue.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert adev.queue.in_flight == 0
            assert pool.in_use == 0
    _run(main())


def test_cancelled_read_bounce_range_not_reused_while_in_flight(slow_socket):
    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", path=slow_socket) as adev:
            pool = adev.device.bounce_pool
            await _warm_up_throttle(adev, 8 * MiB)     # the next read waits ~2 s
            nbytes = 2 * MiB
            task = asyncio.ensure_future(adev.readinto(0, np.zeros(nbytes, np.uint8), chunk=nbytes))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert adev.queue.in_flight == 1
            held = pool.in_use
            assert held >= nbytes
            # A new request is bounced beside, not over, the cancelled one.
            newbuf = np.zeros(BS, np.uint8)
            new = asyncio.ensure_future(adev.readinto(nbytes, newbuf))
            await asyncio.sleep(0.02)
            assert adev.queue.in_flight == 2
            assert pool.in_use == held + pool.granule
            # All the pool's free space, taken while the cancelled read is in
            # flight, lies outside its range: the device's (zero) data for the
            # cancelled read must not land in it.
            free = pool.size - pool.in_use
            assert free > 0
            mine = pool.acquire(free, timeout=0)
            assert pool.in_use == pool.size
            mine[:] = 0xA5
            assert adev.queue.in_flight == 2, "the cancelled read finished too early to test this"
            await new
            deadline = time.monotonic() + 20
            while adev.queue.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert adev.queue.in_flight == 0
            assert bool((mine == 0xA5).all()), "the cancelled read wrote into reused bounce space"
            pool.release(mine)
            assert pool.in_use == 0
    _run(main())


# ---------------------------------------------------------------------------
# Bounce pool fairness


def test_small_bounce_pool_serves_64_concurrent_requests_correctly(qsd):
    daemon = qsd()
    n, size = 64, 64 * KiB
    offs = [i * 2 * size for i in range(n)]       # reads at even, writes at odd slots

    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", path=daemon.socket) as adev:
            pool = adev.device.bounce_pool
            pool.max_size = 256 * KiB
            rbufs = [np.zeros(size, np.uint8) for _ in range(n // 2)]
            wbufs = [_pattern(i, size) for i in range(n // 2)]
            ops = [adev.readinto(offs[i], rbufs[i]) for i in range(n // 2)]
            ops += [adev.write(offs[i] + size, wbufs[i]) for i in range(n // 2)]
            order = list(range(n))
            np.random.default_rng(1).shuffle(order)
            results = await asyncio.gather(*(ops[i] for i in order))
            assert results == [size] * n
            await adev.flush()
            assert pool.in_use == 0
            assert pool.waiting == 0
            assert adev.device.stats.bounced_requests >= n
            return rbufs, wbufs

    rbufs, wbufs = _run(main())
    raw = daemon.raw
    for i in range(n // 2):
        assert rbufs[i].tobytes() == raw.data[offs[i]:offs[i] + size], f"read {i}"
        assert raw.pread(offs[i] + size, size) == wbufs[i].tobytes(), f"write {i}"


def test_small_bounce_pool_in_use_never_exceeds_max_size(qsd):
    daemon = qsd()
    n, size, limit = 64, 64 * KiB, 256 * KiB

    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", path=daemon.socket) as adev:
            pool = adev.device.bounce_pool
            pool.max_size = limit
            peak = 0
            stop = False

            async def sampler():
                nonlocal peak
                while not stop:
                    peak = max(peak, pool.in_use)
                    await asyncio.sleep(0)

            s = asyncio.ensure_future(sampler())
            await asyncio.gather(*(adev.readinto(i * size, np.zeros(size, np.uint8))
                                   for i in range(n)))
            stop = True
            await s
            return peak, pool.size

    peak, size_after = _run(main())
    assert peak > 0
    assert peak <= limit, f"{peak} bytes of bounce space in use with max_size={limit}"
    assert size_after <= limit


def test_large_bounce_request_queued_behind_small_ones_is_not_starved(qsd):
    daemon = qsd()
    # 32 workers x 64 KiB is more than the pool holds (1 MiB at first, and
    # max_size 256 KiB): small requests are always waiting for space.
    small, large, workers, rounds = 64 * KiB, 256 * KiB, 32, 40

    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", path=daemon.socket) as adev:
            pool = adev.device.bounce_pool
            pool.max_size = 256 * KiB
            events = []            # ("start"|"end", who) in the order they happen

            async def small_worker(w):
                buf = np.zeros(small, np.uint8)
                for r in range(rounds):
                    events.append(("start", (w, r)))
                    await adev.readinto(((w * rounds + r) * small) % (32 * MiB), buf)
                    events.append(("end", (w, r)))

            async def big():
                # Start once the pool is contended: small requests are waiting.
                for _ in range(100000):
                    if pool.waiting:
                        break
                    await asyncio.sleep(0)
                assert pool.waiting, "the pool never had waiters: nothing to be fair about"
                buf = np.zeros(large, np.uint8)
                events.append(("start", "big"))
                await adev.readinto(32 * MiB, buf)
                events.append(("end", "big"))
                return buf

            results = await asyncio.gather(big(), *(small_worker(w) for w in range(workers)))
            assert pool.in_use == 0
            return events, results[0]

    events, bigbuf = _run(main())
    assert bigbuf.tobytes() == daemon.raw.data[32 * MiB:32 * MiB + large]
    start = events.index(("start", "big"))
    end = events.index(("end", "big"))
    started_after = {who for kind, who in events[start + 1:] if kind == "start"}
    overtook = [who for kind, who in events[start + 1:end] if kind == "end" and who in started_after]
    # FIFO: the ones queued after it get space only after it does; a few may
    # still complete first (the device reorders), but not a worker's whole run.
    assert len(overtook) < workers, (
        f"{len(overtook)} small requests queued after the large one finished first")
    # Not starved: it finished while the small workers still had work to do.
    assert sum(1 for kind, _ in events[end:] if kind == "end") > 0


# ---------------------------------------------------------------------------
# spin_us, loop responsiveness, O_DIRECT


def test_spin_us_50_completes_reads_correctly(image):
    offs = [i * 3 * BS for i in range(64)]

    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path), spin_us=50) as adev:
            assert adev.spin_us == 50
            outs = await asyncio.gather(*(adev.read(o, BS) for o in offs))
            await adev.write(0, _pattern(2))
            await adev.flush()
            return [o.tobytes() for o in outs]
    outs = _run(main())
    for off, data in zip(offs, outs):
        assert data == image.data[off:off + BS]
    assert image.pread(0, BS) == _pattern(2).tobytes()


def test_event_loop_stays_responsive_during_slow_reads(slow_socket):
    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", path=slow_socket) as adev:
            await _warm_up_throttle(adev)
            ticks_in_flight = 0
            stop = False

            async def ticker():
                nonlocal ticks_in_flight
                while not stop:
                    await asyncio.sleep(0)
                    if adev.queue.in_flight:
                        ticks_in_flight += 1

            t = asyncio.ensure_future(ticker())
            t0 = time.monotonic()
            await asyncio.gather(*(adev.read(i * 64 * KiB, 64 * KiB) for i in range(64)))
            elapsed = time.monotonic() - t0
            stop = True
            await t
            return ticks_in_flight, elapsed

    ticks, elapsed = _run(main())
    assert elapsed > 0.2, "the throttle did not slow the reads down; the test proves nothing"
    assert ticks >= 100, f"only {ticks} loop iterations in {elapsed:.2f} s of I/O"


def test_direct_loop_device_misaligned_numpy_buffers_are_bounced(loopdev):
    backing = loopdev.backing
    raw_r = np.zeros(8 * BS + 1, np.uint8)
    rbuf = raw_r[1:]                       # misaligned for O_DIRECT
    raw_w = np.zeros(2 * BS + 3, np.uint8)
    wbuf = raw_w[3:]
    wbuf[:] = _pattern(6, 2 * BS)
    assert rbuf.ctypes.data % 512 and wbuf.ctypes.data % 512

    async def main():
        async with blkio.aio.open("io_uring", path=loopdev.path, direct=True) as adev:
            assert adev.device.limits.buf_alignment >= 512
            assert await adev.readinto(16 * BS, rbuf) == 8 * BS
            assert await adev.write(40 * BS, wbuf) == 2 * BS
            await adev.flush()
            assert adev.device.stats.bounced_requests >= 2
            assert adev.device.bounce_pool.in_use == 0
    _run(main())
    assert rbuf.tobytes() == backing.data[16 * BS:24 * BS]
    assert backing.pread(40 * BS, 2 * BS) == wbuf.tobytes()


def test_per_request_awaits_work_under_either_loop(run, image):
    """The same per-request path on asyncio's loop and on uvloop (the fixture
    runs it on both): many awaits in flight, data checked, a write read back."""
    async def main():
        async with blkio.aio.open("io_uring", path=str(image.path)) as adev:
            bufs = [np.zeros(4096, np.uint8) for _ in range(64)]
            await asyncio.gather(*(adev.readinto(i * 8192, b) for i, b in enumerate(bufs)))
            for i, b in enumerate(bufs):
                assert b.tobytes() == image.data[i * 8192:i * 8192 + 4096], i
            data = np.full(4096, 7, np.uint8)
            assert await adev.write(4096, data) == 4096
            await adev.flush()
            assert (await adev.read(4096, 4096)).tobytes() == data.tobytes()
    run(main())


