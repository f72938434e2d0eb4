"""Queues: many requests in flight, completions, the completion fd, poll queues,
threads, timeouts and close with requests in flight."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import select
import threading
import time

import numpy as np
import pytest

import blkio

KiB = 1024
MiB = 1 << 20


def _random_io_at_depth(dev, backing, depth=32, total=1000, bs=4096, seed=0):
    """total random reads/writes, depth in flight, each user_data seen once."""
    rng = np.random.default_rng(seed)
    q = dev.queue(0)
    nblocks = dev.capacity // bs
    model = {}
    seen = set()
    issued = 0
    pending = {}
    while issued < total or pending:
        while issued < total and len(pending) < depth:
            off = int(rng.integers(0, nblocks)) * bs
            if off in {p[1] for p in pending.values()}:
                continue
            if rng.random() < 0.5:
                buf = np.full(bs, issued % 251, np.uint8)
                q.write(off, buf, user_data=("w", issued))
                pending[("w", issued)] = ("w", off, buf)
            else:
                buf = dev.alloc(bs)
                q.read(off, buf, user_data=("r", issued))
                pending[("r", issued)] = ("r", off, buf)
            issued += 1
        for c in q.wait(min=1):
            assert c.user_data not in seen
            seen.add(c.user_data)
            c.check()
            kind, off, buf = pending.pop(c.user_data)
            if kind == "w":
                model[off] = buf.tobytes()
            else:
                expected = model.get(off, backing.data[off:off + bs])
                assert buf.tobytes() == expected
    assert len(seen) == total
    dev.flush()
    for off, data in model.items():
        assert backing.pread(off, bs) == data


def test_1000_random_requests_at_depth_32_on_a_file(image):
    with blkio.open("io_uring", path=image.path) as dev:
        _random_io_at_depth(dev, image)


def test_1000_random_requests_at_depth_32_on_a_loop_device(loopdev):
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        _random_io_at_depth(dev, loopdev.backing)


def test_1000_random_requests_at_depth_32_on_vhost_user(qsd):
    daemon = qsd()
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket) as dev:
        _random_io_at_depth(dev, daemon.raw)


def test_completion_has_user_data_ret_and_check(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        token = object()
        q.read(0, bytearray(512), user_data=token)
        [c] = q.wait()
        assert c.user_data is token and c.ret == 0 and c.error_msg is None
        assert c.check() == 0
        assert "read" in repr(c)


def test_completion_user_data_and_ret_are_read_only_object_members(image):
    # Object members (not properties): CPython specializes reading them, a
    # property takes the generic attribute lookup on every read.
    for name in ("user_data", "ret"):
        assert type(blkio.Completion.__dict__[name]).__name__ == "member_descriptor", name
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        q.read(0, bytearray(512), user_data=[7])
        [c] = q.wait()
        assert (c.ret, c.user_data) == (0, [7]) and type(c.ret) is int
        for name in ("user_data", "ret"):
            with pytest.raises(AttributeError):
                setattr(c, name, 1)


def test_failed_completion_check_raises_the_errno_oserror(image):
    with blkio.open("io_uring", path=image.path, read_only=True) as dev:
        q = dev.queue(0)
        # The queue API hands requests to libblkio as they are: read-only is
        # still checked first, so provoke a device error with a flag instead.
        with pytest.raises(PermissionError, match="read-only"):
            q.write(0, b"x" * 512)
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        q.write_zeroes(0, 4096, no_fallback=True, may_unmap=False, user_data=1)
        [c] = q.wait()
        if c.ret < 0:
            with pytest.raises(OSError) as info:
                c.check()
            assert info.value.errno == -c.ret
        else:
            assert c.check() == 0


def test_wait_with_min_above_in_flight_raises_valueerror(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        q.read(0, bytearray(512))
        with pytest.raises(ValueError, match="min=2"):
            q.wait(min=2)
        assert len(q.wait(min=1)) == 1


def test_poll_returns_without_waiting(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        assert q.completions() == []
        for i in range(8):
            q.read(i * 4096, bytearray(4096), user_data=i)
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 8 and time.monotonic() < deadline:
            got += q.completions()
        assert sorted(c.user_data for c in got) == list(range(8))


def test_wait_max_limits_the_completions_returned(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        for i in range(10):
            q.read(i * 512, bytearray(512), user_data=i)
        first = q.wait(min=4, max=4)
        assert len(first) == 4
        with pytest.raises(ValueError, match="max"):
            q.wait(min=5, max=4)
        rest = q.wait(min=6)
        assert sorted(c.user_data for c in first + rest) == list(range(10))


def test_request_buffer_stays_alive_until_reaped(image):
    import gc
    import weakref
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        buf = np.zeros(4096, np.uint8)
        ref = weakref.ref(buf)
        q.read(0, buf, user_data="x")
        del buf
        gc.collect()
        assert ref() is not None          # held by the request
        q.wait()
        gc.collect()
        assert ref() is None              # released once reaped


def test_every_request_kind_on_a_queue(qsd):
    daemon = qsd()
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket) as dev:
        q = dev.queue(0)
        data = np.full(8192, 0x5A, np.uint8)
        q.writev(0, [data[:4096], data[4096:]], user_data="writev", fua=True)
        q.write_zeroes(65536, 8192, user_data="zeroes")
        q.discard(131072, 4096, user_data="discard")
        q.flush(user_data="flush")
        done = {c.user_data: c for c in q.wait(min=4)}
        assert set(done) == {"writev", "zeroes", "discard", "flush"}
        for c in done.values():
            c.check()
        outs = [np.zeros(4096, np.uint8), np.zeros(4096, np.uint8)]
        q.readv(0, outs, user_data="readv")
        q.wait()[0].check()
        assert all((o == 0x5A).all() for o in outs)
    assert daemon.raw.pread(65536, 8192) == bytes(8192)


def test_timeout_raises_timeouterror_and_keeps_requests_tracked(slow_socket):
    with blkio.open("virtio-blk-vhost-user", path=slow_socket) as dev:
        q = dev.queue(0)
        bufs = [dev.alloc(4 * MiB) for _ in range(4)]
        for i, b in enumerate(bufs):
            q.read(i * 4 * MiB, b, user_data=i)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="in flight"):
            q.wait(min=4, timeout=0.3)
        assert 0.25 < time.monotonic() - t0 < 2
        # Still tracked: nothing is lost, whatever completed during the wait
        # comes back with the next one.
        assert q.in_flight >= 1
        done = []
        while len(done) < 4:
            done += q.wait(min=1, timeout=30)
        assert sorted(c.user_data for c in done) == [0, 1, 2, 3]


def test_close_with_requests_in_flight_waits_for_them(slow_socket):
    dev = blkio.open("virtio-blk-vhost-user", path=slow_socket)
    q = dev.queue(0)
    buf = np.zeros(2 * MiB, np.uint8)     # plain memory: bounced, pool held
    q.read(0, buf, user_data=1)
    q.submit()
    dev.close()
    assert dev.closed
    assert buf.shape == (2 * MiB,)


# ---- the completion fd ------------------------------------------------------

def test_completion_fd_must_be_enabled_and_becomes_readable(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        assert q.completion_fd_enabled is False       # libblkio's default since 1.3
        fd = q.completion_fd
        assert fd >= 0
        q.completion_fd_enabled = True
        assert q.completion_fd_enabled is True
        for i in range(4):
            q.read(i * 4096, bytearray(4096), user_data=i)
        assert q.submit() is None    # cached reads may complete here: kept for poll()
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 4 and time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 1.0)
            if r:
                try:
                    os.read(fd, 8)        # reset before reaping
                except BlockingIOError:
                    pass                  # spurious wake-up: tolerated
                got += q.completions()
        assert sorted(c.user_data for c in got) == [0, 1, 2, 3]


def test_completion_fd_drain_pattern(qsd):
    """Suppress events while draining, re-enable, poll once more."""
    daemon = qsd()
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket) as dev:
        q = dev.queue(0)
        q.completion_fd_enabled = True
        fd = q.completion_fd
        for i in range(64):
            q.read(i * 4096, dev.alloc(4096), user_data=i)
        q.submit()
        got = q.completions()
        deadline = time.monotonic() + 10
        while len(got) < 64 and time.monotonic() < deadline:
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            try:
                os.read(fd, 8)
            except BlockingIOError:
                pass
            q.completion_fd_enabled = False
            while True:
                batch = q.completions()
                if not batch:
                    break
                got += batch
            q.completion_fd_enabled = True
            got += q.completions()
        assert sorted(c.user_data for c in got) == list(range(64))


def test_spurious_completion_fd_wakeups_are_harmless(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        q.completion_fd_enabled = True
        fd = q.completion_fd
        os.write(fd, (1).to_bytes(8, "little"))       # a wake-up with nothing done
        assert select.select([fd], [], [], 0)[0]
        os.read(fd, 8)
        assert q.completions() == []


# ---- poll queues ------------------------------------------------------------

def test_poll_queue_on_vhost_user(qsd):
    daemon = qsd(num_queues=2)
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket, num_queues=1,
                    num_poll_queues=1) as dev:
        pq = dev.poll_queue(0)
        assert pq.is_poll_queue
        assert pq.completion_fd == -1
        with pytest.raises(ValueError, match="no completion fd"):
            pq.completion_fd_enabled = True
        bufs = [dev.alloc(4096) for _ in range(16)]
        for i, b in enumerate(bufs):
            pq.read(i * 4096, b, user_data=i)
        done = pq.wait(min=16)
        assert sorted(c.user_data for c in done) == list(range(16))
        for i, b in enumerate(bufs):
            assert b.tobytes() == daemon.raw.data[i * 4096:(i + 1) * 4096]
        assert len(dev.queues) == 2


def test_poll_queue_on_a_loop_device_with_direct_io(loopdev):
    with blkio.open("io_uring", path=loopdev.path, direct=True) as probe:
        supported = probe.limits.supports_poll_queues
    if not supported:
        pytest.skip("io_uring on this loop device does not support poll queues")
    try:
        dev = blkio.open("io_uring", path=loopdev.path, direct=True, num_poll_queues=1)
    except OSError as e:
        pytest.skip(f"kernel refused io_uring poll queues here: {e}")
    with dev:
        pq = dev.poll_queue(0)
        buf = dev.alloc(4096)
        pq.read(0, buf, user_data="r")
        [c] = pq.wait(min=1, timeout=10)
        if c.ret == -errno.EOPNOTSUPP:
            pytest.skip("polled reads answer EOPNOTSUPP on this loop device (DESIGN 9)")
        c.check()
        assert buf.tobytes() == loopdev.backing.data[:4096]


def test_add_queue_where_unsupported_is_a_clear_error(image):
    with blkio.open("io_uring", path=image.path) as dev:
        if dev.get("can-add-queues"):
            q = dev.add_queue()
            q.read(0, bytearray(512), user_data=0)
            assert q.wait()[0].ret == 0
            dev.remove_queue(q)
        else:
            with pytest.raises(ValueError, match="cannot add queues"):
                dev.add_queue()


def test_remove_queue_waits_for_its_requests(image):
    with blkio.open("io_uring", path=image.path, num_queues=2) as dev:
        q1 = dev.queue(1)
        q1.read(0, bytearray(4096), user_data=1)
        q1.submit()
        dev.remove_queue(q1)
        with pytest.raises(ValueError, match="removed"):
            q1.read(0, bytearray(512))
        assert len(dev.queues) == 1


# ---- threads ----------------------------------------------------------------

def _thread_worker(dev, q, backing, region, rounds=200):
    base, size = region
    rng = np.random.default_rng(base)
    for r in range(rounds):
        off = base + int(rng.integers(0, size // 4096)) * 4096
        data = np.full(4096, (base // 4096 + r) % 256, np.uint8)
        q.write(off, data, user_data=("w", r))
        [c] = q.wait()
        c.check()
        out = dev.alloc(4096)
        q.read(off, out, user_data=("r", r))
        [c] = q.wait()
        c.check()
        assert np.array_equal(out, data)


def test_two_threads_with_a_queue_each(image):
    with blkio.open("io_uring", path=image.path, num_queues=2) as dev:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(_thread_worker, dev, dev.queue(i), image, (i * 16 * MiB, 16 * MiB))
                    for i in range(2)]
            for f in futs:
                f.result()


def test_four_threads_sharing_one_queue(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        lock = threading.Lock()
        results = {i: [] for i in range(4)}

        def worker(t):
            for r in range(200):
                off = (t * 1000 + r) * 4096
                data = np.full(4096, (t * 7 + r) % 256, np.uint8)
                dev.write(off, data)        # the blocking API shares queue 0
                out = np.zeros(4096, np.uint8)
                dev.readinto(off, out)
                with lock:
                    results[t].append(np.array_equal(out, data))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for f in [pool.submit(worker, t) for t in range(4)]:
                f.result()
        assert all(len(v) == 200 and all(v) for v in results.values())


def test_four_threads_on_one_queue_with_the_queue_api(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        mine = {t: [] for t in range(4)}

        def worker(t):
            for r in range(100):
                q.read((t * 100 + r) * 4096, bytearray(4096), user_data=(t, r))
                # Completions of other threads may come back here: collect all.
                for c in q.wait(min=0) if q.in_flight == 0 else q.completions():
                    mine[c.user_data[0]].append(c.user_data[1])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and sum(map(len, mine.values())) < 400:
                for c in q.completions():
                    mine[c.user_data[0]].append(c.user_data[1])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for f in [pool.submit(worker, t) for t in range(4)]:
                f.result()
        for t in range(4):
            assert sorted(mine[t]) == list(range(100))


def test_waits_release_the_gil(slow_socket):
    with blkio.open("virtio-blk-vhost-user", path=slow_socket) as dev:
        buf = dev.alloc(8 * MiB)
        dev.readinto(0, buf)              # spend the throttle's burst allowance
        progress = []
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                progress.append(1)
                time.sleep(0.001)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            spinner = pool.submit(spin)
            t0 = time.monotonic()
            pool.submit(dev.readinto, 0, buf).result()     # about 2 s at 4 MiB/s
            elapsed = time.monotonic() - t0
            stop.set()
            spinner.result()
        assert elapsed > 0.5
        assert len(progress) > 50         # the other thread ran during the wait


def test_device_queues_lists_them(image):
    with blkio.open("io_uring", path=image.path, num_queues=3) as dev:
        assert [q.index for q in dev.queues] == [0, 1, 2]
        assert all(isinstance(q, blkio.Queue) for q in dev.queues)
