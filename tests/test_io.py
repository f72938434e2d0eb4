"""Blocking I/O on queue 0: round trips checked with os.pread, alignment and
range errors, buffers of every kind, memory that outlives the device, and
Ctrl-C during a wait."""

from __future__ import annotations

import gc
import mmap
import os
import signal
import threading
import time

import numpy as np
import pytest

import blkio

KiB = 1024
MiB = 1 << 20


def _buffers(nbytes: int, fill: int):
    """One buffer of each kind, filled with ``fill``."""
    arr = np.full(nbytes, fill, np.uint8)
    odd = np.zeros(nbytes + 1, np.uint8)[1:]      # numpy slice at an odd address
    odd[:] = fill
    ba = bytearray([fill]) * nbytes
    mv = memoryview(bytearray([fill]) * nbytes)
    mm = mmap.mmap(-1, nbytes)
    mm.write(bytes([fill]) * nbytes)
    return {"numpy": arr, "numpy-odd": odd, "bytearray": ba, "memoryview": mv, "mmap": mm,
            "bytes": bytes([fill]) * nbytes}


@pytest.fixture(params=["buffered", "direct-file", "loop-direct"])
def target(request, image):
    """(open kwargs, Image whose file backs the device)."""
    if request.param == "buffered":
        return dict(path=image.path), image
    if request.param == "direct-file":
        return dict(path=image.path, direct=True), image
    loop = request.getfixturevalue("loopdev")
    return dict(path=loop.path, direct=True), loop.backing


@pytest.mark.parametrize("kind", ["numpy", "numpy-odd", "bytearray", "memoryview", "mmap", "bytes"])
def test_write_then_read_back_matches_os_pread(target, kind):
    kwargs, backing = target
    with blkio.open("io_uring", **kwargs) as dev:
        ra = dev.limits.request_alignment
        offset = 37 * max(ra, 512)
        n = 8 * KiB
        buf = _buffers(n, 0xA5)[kind]
        assert dev.write(offset, buf) == n
        dev.flush()
        assert backing.pread(offset, n) == b"\xa5" * n
        if kind != "bytes":
            out = _buffers(n, 0)[kind]
            assert dev.readinto(offset, out) == n
            assert bytes(out) == b"\xa5" * n
        assert bytes(dev.read(offset, n)) == b"\xa5" * n
        assert dev.bounce_pool.in_use == 0


def test_vectored_round_trip_with_mixed_buffers(target):
    kwargs, backing = target
    with blkio.open("io_uring", **kwargs) as dev:
        rng = np.random.default_rng(1)
        segs = [rng.integers(0, 256, 512 * k, dtype=np.uint8) for k in (1, 3, 2, 8)]
        payload = b"".join(s.tobytes() for s in segs)
        bufs = [segs[0], bytearray(segs[1].tobytes()), memoryview(segs[2].tobytes()), segs[3]]
        assert dev.writev(4096, bufs) == len(payload)
        dev.flush()
        assert backing.pread(4096, len(payload)) == payload
        outs = [np.zeros(512 * k, np.uint8) for k in (2, 1, 3, 8)]
        outs[1] = np.zeros(513, np.uint8)[1:]        # misaligned segment
        assert dev.readv(4096, outs) == len(payload)
        assert b"".join(o.tobytes() for o in outs) == payload


def test_vectored_io_with_more_segments_than_max_segments(image):
    with blkio.open("io_uring", path=image.path) as dev:
        nseg = dev.limits.max_segments + 10
        segs = [np.full(512, i % 256, np.uint8) for i in range(nseg)]
        assert dev.writev(0, segs) == 512 * nseg
        dev.flush()
        assert image.pread(0, 512 * nseg) == b"".join(s.tobytes() for s in segs)
        outs = [np.zeros(512, np.uint8) for _ in range(nseg)]
        dev.readv(0, outs)
        assert all((o == i % 256).all() for i, o in enumerate(outs))


def test_read_returns_a_new_numpy_array(image):
    with blkio.open("io_uring", path=image.path) as dev:
        out = dev.read(8192, 4096)
        assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (4096,)
        assert out.tobytes() == image.data[8192:8192 + 4096]


def test_readinto_needs_a_writable_buffer(image):
    with blkio.open("io_uring", path=image.path) as dev:
        with pytest.raises(TypeError, match="writable"):
            dev.readinto(0, b"\0" * 512)
        with pytest.raises(TypeError, match="buffer protocol"):
            dev.readinto(0, 12345)


def test_non_contiguous_array_is_refused(image):
    with blkio.open("io_uring", path=image.path) as dev:
        with pytest.raises(TypeError, match="contiguous"):
            dev.readinto(0, np.zeros(2048, np.uint8)[::2])


def test_misaligned_offset_or_length_raises_valueerror_before_submission(loopdev):
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        before = dev.stats.requests
        with pytest.raises(ValueError, match="request-alignment \\(512\\)"):
            dev.read(100, 512)
        with pytest.raises(ValueError, match="request-alignment"):
            dev.write(0, b"x" * 100)
        with pytest.raises(ValueError, match="request-alignment"):
            dev.write_zeroes(512, 100)
        assert dev.stats.requests == before


def test_io_past_capacity_raises_valueerror_before_submission(loopdev):
    # A block device cannot grow (a regular file can: test_surface.py).
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        assert not dev.limits.can_grow
        size = dev.capacity
        before = dev.stats.requests
        with pytest.raises(ValueError, match="capacity"):
            dev.read(size - 512, 1024)
        with pytest.raises(ValueError, match="capacity"):
            dev.write(size, dev.alloc(512))
        with pytest.raises(ValueError, match="capacity"):
            dev.discard(0, size + 4096)
        assert dev.stats.requests == before


def test_a_read_past_the_end_of_a_file_gives_zeroes(image):
    # A regular file can grow: libblkio reads past its end as zeroes.
    with blkio.open("io_uring", path=image.path) as dev:
        buf = np.full(4096, 0xFF, np.uint8)
        assert dev.readinto(image.size - 2048, buf) == 4096
        assert buf[:2048].tobytes() == image.data[-2048:]
        assert not buf[2048:].any()
    assert os.path.getsize(image.path) == image.size     # a read grows nothing


def test_misaligned_buffer_on_o_direct_is_bounced(loopdev):
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        odd = np.zeros(4097, np.uint8)[1:]
        odd[:] = 7
        dev.write(0, odd)
        assert dev.stats.bounced_bytes == 4096
        aligned = dev.alloc(4096)
        dev.readinto(0, aligned)
        assert dev.stats.bounced_bytes == 4096            # alloc'd memory goes direct
        assert (aligned == 7).all()


def test_large_request_round_trip(image):
    with blkio.open("io_uring", path=image.path, direct=True) as dev:
        data = np.random.default_rng(2).integers(0, 256, 20 * MiB, dtype=np.uint8)
        dev.write(MiB, data)
        out = np.zeros(20 * MiB + 1, np.uint8)[1:]        # bounced in pieces
        dev.readinto(MiB, out)
        assert np.array_equal(out, data)
        assert dev.bounce_pool.in_use == 0


def test_write_with_fua_is_on_disk(image):
    with blkio.open("io_uring", path=image.path) as dev:
        dev.write(0, b"\x11" * 4096, fua=True)
    assert image.pread(0, 4096) == b"\x11" * 4096


@pytest.mark.parametrize("may_unmap", [True, False])
def test_write_zeroes_zeroes_the_range(image, may_unmap):
    with blkio.open("io_uring", path=image.path) as dev:
        dev.write_zeroes(8192, 16384, may_unmap=may_unmap)
        dev.flush()
        assert bytes(dev.read(8192, 16384)) == bytes(16384)
    assert image.pread(8192, 16384) == bytes(16384)
    assert image.pread(4096, 4096) == image.data[4096:8192]


def test_write_zeroes_with_fua(image):
    with blkio.open("io_uring", path=image.path) as dev:
        dev.write_zeroes(0, 4096, fua=True)
    assert image.pread(0, 4096) == bytes(4096)


def test_discard_is_advisory_where_unsupported(image):
    with blkio.open("io_uring", path=image.path) as dev:
        assert dev.discard(0, 4096) is None      # io_uring answers EOPNOTSUPP: success


def test_flush_succeeds(image):
    with blkio.open("io_uring", path=image.path) as dev:
        dev.flush()


# ---- memory ------------------------------------------------------------------

def test_buffer_is_page_aligned_memfd_memory():
    buf = blkio.Buffer(10000)
    assert len(buf) == 10000 and buf.nbytes == 10000
    assert buf.address % 4096 == 0
    assert os.readlink(f"/proc/self/fd/{buf.fd}").startswith("/memfd:")
    arr = np.frombuffer(buf, np.uint8)
    arr[:] = 3
    assert memoryview(buf)[9999] == 3


def test_buffer_memory_lives_while_an_array_views_it():
    arr = np.frombuffer(blkio.Buffer(8192), np.uint8)
    arr[:] = 9          # the Buffer object is gone from our hands; its memory is not
    assert arr.sum() == 9 * 8192


def test_alloc_returns_aligned_mapped_numpy_memory(image):
    with blkio.open("io_uring", path=image.path) as dev:
        a = dev.alloc(10000)
        assert a.dtype == np.uint8 and a.shape == (10000,) and a.flags.c_contiguous
        assert a.ctypes.data % 4096 == 0


def test_memory_outlives_the_device(image):
    dev = blkio.open("io_uring", path=image.path)
    a = dev.alloc(4096)
    dev.readinto(0, a)
    expected = image.data[:4096]
    dev.close()
    assert a.tobytes() == expected     # still readable
    a[:] = 1                           # and writable
    assert int(a.sum()) == 4096


def test_alloc_carves_many_arrays_from_few_regions(qsd):
    daemon = qsd()
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket) as dev:
        arrays = [dev.alloc(64 * KiB) for _ in range(200)]     # more than max-mem-regions (32)
        assert dev.mapped_regions <= 3
        for i, a in enumerate(arrays[:8]):
            a[:] = i
            dev.write(i * 64 * KiB, a)
        assert dev.stats.bounced_bytes == 0


def test_alloc_memory_is_reused_after_arrays_are_collected(image):
    with blkio.open("io_uring", path=image.path) as dev:
        first = dev.alloc(MiB).ctypes.data
        for _ in range(200):              # 200 MiB through a 64 MiB arena chunk
            dev.alloc(MiB)
        assert dev.alloc(MiB).ctypes.data == first


# ---- Ctrl-C ----------------------------------------------------------------

def _interrupt_after(seconds):
    def handler(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return old


def test_ctrl_c_interrupts_a_blocking_wait_promptly(slow_socket):
    with blkio.open("virtio-blk-vhost-user", path=slow_socket) as dev:
        buf = dev.alloc(8 * MiB)
        old = _interrupt_after(0.3)
        t0 = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                for _ in range(10):        # 80 MiB at 4 MiB/s: about 20 s
                    dev.readinto(0, buf)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert time.monotonic() - t0 < 2.0
        # The read is pipelined (8 MiB in 1 MiB chunks); after a bounded wait
        # for its chunks, the ones the slow backend still holds stay tracked
        # (with the buffer they use); close waits for them.
        assert 1 <= dev.queue(0).in_flight <= 8
    assert dev.closed
    assert buf.size == 8 * MiB           # memory stays valid after close


def test_ctrl_c_interrupts_io_uring_wait(loopdev):
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        q = dev.queue(0)
        bufs = [dev.alloc(4 * MiB) for _ in range(16)]
        interrupted = 0
        old = _interrupt_after(0.001)
        try:
            for _ in range(50):           # until the signal lands (almost surely in a wait)
                try:
                    for i, b in enumerate(bufs):
                        q.read((i % 16) * 4 * MiB, b, user_data=i)
                    q.wait(min=q.in_flight)
                except KeyboardInterrupt:
                    interrupted += 1
                    break
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert interrupted == 1
        # Every request is still tracked and can be reaped afterwards.
        done = q.wait(min=q.in_flight) if q.in_flight else []
        assert all(c.ret == 0 for c in done)


def test_spin_us_busy_polls_waits_and_keeps_data_right(qsd):
    daemon = qsd()
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket, spin_us=50) as dev:
        assert dev.spin_us == 50
        buf = dev.alloc(4096)
        for i in range(200):
            dev.readinto(i * 4096, buf)
            assert buf.tobytes() == daemon.raw.data[i * 4096:(i + 1) * 4096]
        dev.spin_us = 0
        dev.readinto(0, buf)
        with pytest.raises(ValueError, match="spin_us"):
            dev.spin_us = -1
        with pytest.raises(TypeError, match="spin_us"):
            dev.spin_us = 1.5
    with pytest.raises(ValueError, match="spin_us"):
        blkio.open("virtio-blk-vhost-user", path=daemon.socket, spin_us=-5)


def test_poll_us_is_a_deprecated_alias_of_spin_us(image):
    with pytest.warns(DeprecationWarning, match="spin_us"):
        dev = blkio.open("io_uring", path=image.path, poll_us=20)
    with dev:
        assert dev.spin_us == 20
        with pytest.warns(DeprecationWarning, match="spin_us"):
            assert dev.poll_us == 20
        with pytest.warns(DeprecationWarning, match="spin_us"):
            dev.poll_us = 5
        assert dev.spin_us == 5
        q = dev.queue(0)
        q.read(0, bytearray(4096))
        with pytest.warns(DeprecationWarning, match="completions"):
            done = q.poll()
        done += q.wait(min=1 - len(done)) if not done else []
        assert len(done) == 1


# ---- numpy arrays on the hot path (read without a buffer export) -----------

def test_readinto_and_write_take_numpy_arrays_of_every_contiguous_layout(image):
    with blkio.open("io_uring", path=image.path) as dev:
        c2d = np.zeros((4, 1024), np.uint8)                    # C-contiguous, 2-D
        f2d = np.asfortranarray(np.zeros((1024, 4), np.uint8))  # F-contiguous
        wide = np.zeros(1024, np.uint32)                        # itemsize 4
        for off, arr in ((0, c2d), (8192, f2d), (16384, wide)):
            assert dev.readinto(off, arr) == 4096
            assert arr.tobytes(order="A") == image.data[off:off + 4096]
        empty = np.zeros(0, np.uint8)
        assert dev.readinto(0, empty) == 0
        data = np.arange(4096, dtype=np.uint8)
        data.flags.writeable = False                # read-only: fine to write from
        assert dev.write(4096, data) == 4096
        with pytest.raises(TypeError, match="read-only"):
            dev.readinto(0, data)
        strided = np.zeros(8192, np.uint8)[::2]
        with pytest.raises(TypeError, match="contiguous"):
            dev.readinto(0, strided)
    assert image.pread(4096, 4096) == bytes(range(256)) * 16


def test_an_interrupted_read_keeps_its_numpy_array_until_the_request_completes(slow_socket):
    # The hot path holds no buffer export: when Ctrl-C leaves its request in
    # flight, the request keeps a reference to the array, so dropping it
    # does not hand its memory (here an alloc'd slice) to the next alloc
    # while the device may still write there.
    with blkio.open("virtio-blk-vhost-user", path=slow_socket) as dev:
        dev.readinto(0, dev.alloc(4 * MiB))        # use up the throttle's burst
        # one request (the hot path), long enough at 4 MiB/s (>= 0.12 s) to
        # be in flight when Ctrl-C lands at 0.05 s
        size = min(MiB, dev.large_io_chunk, dev.limits.max_transfer or MiB)
        assert size >= 512 * KiB
        buf = dev.alloc(size)
        addr = buf.ctypes.data
        old = _interrupt_after(0.05)
        try:
            with pytest.raises(KeyboardInterrupt):
                dev.readinto(0, buf)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert dev.queue(0).in_flight == 1          # the read, still at the daemon
        del buf
        gc.collect()
        other = dev.alloc(size)
        assert other.ctypes.data != addr           # still held by the request
        deadline = time.monotonic() + 10
        while dev.queue(0).in_flight and time.monotonic() < deadline:
            dev.readinto(size, dev.alloc(4096))    # reaps the old request too
            time.sleep(0.05)
        assert dev.queue(0).in_flight == 0
