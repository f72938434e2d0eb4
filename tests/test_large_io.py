"""Large blocking reads and writes: cut into chunks, several in flight.

Every size around a boundary (chunk, max-transfer, the bounce pool's chunk,
the end of the device) is read and written through the pipeline and compared
byte for byte with ``os.pread`` of the backing file; on io_uring (buffered
and O_DIRECT, 4 KiB), a loop device (512-byte alignment) and vhost-user
(qemu-storage-daemon), with alloc'd memory and plain numpy memory (bounced
where the driver cannot use it).  A blkdebug fault in the middle of a big
read and Ctrl-C during one must leave the queue idle.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import blkio
from blkio._public import large_io_plan
from conftest import Inject, convert_to_qcow2, qcow2_host_offset

KiB, MiB = 1 << 10, 1 << 20


def _pread(path, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def _buffer(dev, n: int, kind: str) -> np.ndarray:
    if kind == "alloc":
        return dev.alloc(n)
    # plain numpy memory, deliberately off any page boundary the driver
    # might want: bounced on O_DIRECT and vhost-user
    raw = np.zeros(n + 64, dtype=np.uint8)
    return raw[64:]


def _sizes(chunk: int, align: int, capacity: int) -> list:
    return sorted({align, chunk - align, chunk, chunk + align, 2 * chunk, 3 * chunk - align,
                   8 * chunk + align, 9 * chunk, min(capacity, 21 * chunk + 3 * align)})


def _round_trip(dev, path, align: int, kind: str, rng) -> int:
    """Read and write every boundary size at the start and the end of the
    device; returns how many sizes were checked."""
    chunk = dev.large_io_chunk
    cap = dev.capacity
    checked = 0
    for n in _sizes(chunk, align, cap):
        for offset in (align, cap - n):
            if offset < 0 or offset + n > cap:
                continue
            buf = _buffer(dev, n, kind)
            assert dev.readinto(offset, buf) == n
            assert buf.tobytes() == _pread(path, offset, n), (n, offset, kind)
            data = rng.integers(0, 256, n, dtype=np.uint8)
            out = _buffer(dev, n, kind)
            out[:] = data
            assert dev.write(offset, out) == n
            dev.flush()
            assert _pread(path, offset, n) == data.tobytes(), (n, offset, kind)
            checked += 1
    return checked


@pytest.mark.parametrize("kind", ["alloc", "plain"])
@pytest.mark.parametrize("direct", [False, True])
def test_io_uring_file_round_trip_at_every_boundary(make_image, kind, direct):
    img = make_image(48 * MiB)
    rng = np.random.default_rng(1)
    with blkio.open("io_uring", path=str(img.path), direct=direct) as dev:
        dev.large_io_chunk = 256 * KiB        # many chunks without a huge image
        before = dev.stats.split_requests
        assert _round_trip(dev, img.path, 4096, kind, rng) >= 16
        assert dev.stats.split_requests > before
        assert dev.queue(0).in_flight == 0


@pytest.mark.parametrize("kind", ["alloc", "plain"])
def test_loop_device_round_trip_with_512_byte_alignment(loopdev, kind):
    rng = np.random.default_rng(2)
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        assert dev.limits.request_alignment == 512
        dev.large_io_chunk = 64 * KiB + 512   # an odd multiple of the alignment
        assert _round_trip(dev, loopdev.backing.path, 512, kind, rng) >= 16
        assert dev.queue(0).in_flight == 0


@pytest.mark.parametrize("kind", ["alloc", "plain"])
def test_vhost_user_round_trip_through_the_bounce_pool(qsd, image, kind):
    daemon = qsd(image=image)
    rng = np.random.default_rng(3)
    with blkio.open("virtio-blk-vhost-user", daemon.socket) as dev:
        dev.large_io_chunk = 512 * KiB
        assert _round_trip(dev, image.path, 4096, kind, rng) >= 16
        assert dev.bounce_pool.in_use == 0
        if kind == "plain":
            assert dev.stats.bounced_requests > 0
        assert dev.queue(0).in_flight == 0


def test_bounced_pieces_beyond_the_pool_size_wait_for_space(qsd, image):
    # A pool of 2 MiB and 8 chunks of 1 MiB in flight: the pipeline must wait
    # for its own earlier chunks to free pool space (FIFO), not deadlock.
    daemon = qsd(image=image)
    with blkio.open("virtio-blk-vhost-user", daemon.socket) as dev:
        dev.bounce_pool.max_size = 2 * MiB
        buf = np.zeros(40 * MiB, np.uint8)
        assert dev.readinto(0, buf, chunk=MiB, depth=8) == 40 * MiB
        assert buf.tobytes() == image.data[:40 * MiB]
        assert dev.bounce_pool.in_use == 0


def test_readv_and_writev_pipeline_across_buffer_boundaries(make_image):
    img = make_image(16 * MiB)
    with blkio.open("io_uring", path=str(img.path)) as dev:
        parts = [np.zeros(n, np.uint8) for n in (12 * KiB, 700 * KiB, 4 * KiB, 3 * MiB + 4 * KiB)]
        total = sum(p.nbytes for p in parts)
        assert dev.readv(8 * KiB, parts, chunk=256 * KiB, depth=4) == total
        assert b"".join(p.tobytes() for p in parts) == img.data[8 * KiB:8 * KiB + total]
        for i, p in enumerate(parts):
            p[:] = i + 1
        assert dev.writev(MiB, parts, chunk=128 * KiB, depth=3) == total
        assert _pread(img.path, MiB, total) == b"".join(p.tobytes() for p in parts)


def test_read_of_a_whole_device_into_a_new_array(make_image):
    img = make_image(24 * MiB)
    with blkio.open("io_uring", path=str(img.path), direct=True) as dev:
        out = dev.read(0, dev.capacity, chunk=MiB, depth=16)
        assert out.tobytes() == img.data


def test_knobs_are_checked_before_anything_is_submitted(make_image):
    img = make_image(8 * MiB)
    with blkio.open("io_uring", path=str(img.path), direct=True) as dev:
        buf = dev.alloc(4 * MiB)
        n = dev.stats.requests
        align = dev.limits.request_alignment
        with pytest.raises(ValueError, match=f"chunk=1000: .*multiple.*alignment \\({align} bytes"):
            dev.readinto(0, buf, chunk=1000)
        with pytest.raises(ValueError, match="chunk=0"):
            dev.readinto(0, buf, chunk=0)
        with pytest.raises(ValueError, match="depth=0"):
            dev.write(0, buf, depth=0)
        with pytest.raises(ValueError, match="depth=4096"):
            dev.readv(0, [buf], depth=4096)
        with pytest.raises(TypeError):
            dev.readinto(0, buf, depth=2.0)
        with pytest.raises(TypeError):
            dev.large_io_chunk = "1M"
        with pytest.raises(ValueError):
            dev.large_io_depth = -1
        assert dev.stats.requests == n          # nothing reached the device
        dev.large_io_chunk = 512 * KiB
        dev.large_io_depth = 2
        assert (dev.large_io_chunk, dev.large_io_depth) == (512 * KiB, 2)


def test_default_chunk_is_at_least_256_KiB_where_the_device_allows(make_image, qsd, image):
    img = make_image(8 * MiB)
    with blkio.open("io_uring", path=str(img.path)) as dev:
        assert dev.large_io_chunk >= 256 * KiB and dev.large_io_depth > 1
    daemon = qsd(image=image)
    with blkio.open("virtio-blk-vhost-user", daemon.socket) as dev:
        assert dev.large_io_chunk >= min(256 * KiB, dev.limits.max_transfer or 1 << 62)


# ---------------------------------------------------------------------------
# Failures and interruptions


def test_fault_in_the_middle_of_a_big_read_raises_eio_and_leaves_the_queue_idle(
        qsd, image, tmp_path):
    target = 13 * MiB + 4 * KiB
    qcow2 = convert_to_qcow2(image, tmp_path / "mid.qcow2")
    sector = qcow2_host_offset(qcow2, target) // 512
    daemon = qsd(image=qcow2, faults=[Inject("read_aio", once=True, sector=sector)])
    with blkio.open("virtio-blk-vhost-user", daemon.socket) as dev:
        buf = dev.alloc(32 * MiB)
        with pytest.raises(OSError) as ei:
            dev.readinto(0, buf, chunk=MiB, depth=8)
        assert ei.value.errno == errno.EIO
        assert "at offset 13631488" in str(ei.value), str(ei.value)   # the 1 MiB chunk at 13 MiB
        assert dev.queue(0).in_flight == 0
        assert dev.bounce_pool.in_use == 0
        assert dev.readinto(0, buf) == 32 * MiB                       # the rule fired once
        assert buf.tobytes() == image.data[:32 * MiB]


CTRL_C_CHILD = textwrap.dedent(r"""
    import os, signal, sys, threading, time
    import numpy as np
    import blkio
    path, size = sys.argv[1], int(sys.argv[2])
    # Python's own handler even when SIGINT came in ignored (a run started
    # in the background by a shell, as `nohup ... &` does): Python keeps an
    # inherited SIG_IGN, and the Ctrl-C below would never arrive.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with blkio.open("io_uring", path=path, direct=True) as dev:
        # plain memory off the buffer alignment: every chunk is bounced
        buf = np.zeros(size + 64, np.uint8)[64:]
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        reads = 0
        try:
            while time.monotonic() - t0 < 30:
                dev.readinto(0, buf, chunk=1 << 20, depth=8)
                reads += 1
        except KeyboardInterrupt:
            late = time.monotonic() - t0 - 0.3
            q = dev.queue(0)
            print("interrupted", reads, f"{late:.3f}", q.in_flight, dev.bounce_pool.in_use)
            dev.readinto(0, buf[:1 << 20])
            with open(path, "rb") as f:
                assert buf[:1 << 20].tobytes() == f.read(1 << 20)
            print("still works")
            sys.exit(0)
    print("not interrupted")
    sys.exit(1)
""")


def test_ctrl_c_interrupts_a_big_read_promptly_and_leaves_nothing_in_flight(make_image):
    img = make_image(64 * MiB)
    proc = subprocess.run([sys.executable, "-c", CTRL_C_CHILD, str(img.path), str(64 * MiB)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split("\n")
    words = lines[0].split()
    assert words[0] == "interrupted", proc.stdout
    late, inflight, pool = float(words[2]), int(words[3]), int(words[4])
    assert (inflight, pool) == (0, 0), proc.stdout
    assert late < 5.0, f"Ctrl-C took {late:.1f} s to interrupt the read"
    assert lines[1] == "still works"


# ---------------------------------------------------------------------------
# asyncio: the same pipeline, as awaits


def test_asyncio_big_read_and_write_are_pipelined(make_image):
    import asyncio
    img = make_image(24 * MiB)
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, 9 * MiB + 4 * KiB, dtype=np.uint8)

    async def main():
        async with blkio.aio.open("io_uring", path=str(img.path), direct=True) as adev:
            assert large_io_plan(adev.device, 9 * MiB, chunk=MiB, depth=4) == (MiB, 4)
            assert large_io_plan(adev.device, MiB) == (MiB, 1)
            before = adev.device.queue(0).requests
            out = await adev.read(4 * KiB, 9 * MiB + 4 * KiB, chunk=MiB, depth=4)
            assert out.tobytes() == img.data[4 * KiB:4 * KiB + out.nbytes]
            assert adev.device.queue(0).requests - before == 10     # 9 chunks + 4 KiB
            plain = np.zeros(data.nbytes + 64, np.uint8)[64:]          # bounced
            plain[:] = data
            assert await adev.write(2 * MiB, plain) == data.nbytes
            await adev.flush()
            with pytest.raises(ValueError, match="depth=0"):
                adev.readinto(0, out, depth=0)

    asyncio.run(main())
    assert _pread(img.path, 2 * MiB, data.nbytes) == data.tobytes()


def test_asyncio_fault_in_a_big_read_raises_after_every_chunk_finished(qsd, image, tmp_path):
    import asyncio
    target = 5 * MiB
    qcow2 = convert_to_qcow2(image, tmp_path / "amid.qcow2")
    sector = qcow2_host_offset(qcow2, target) // 512
    daemon = qsd(image=qcow2, faults=[Inject("read_aio", once=True, sector=sector)])

    async def main():
        async with blkio.aio.open("virtio-blk-vhost-user", daemon.socket) as adev:
            buf = adev.alloc(16 * MiB)
            with pytest.raises(OSError) as ei:
                await adev.readinto(0, buf, chunk=MiB, depth=8)
            assert ei.value.errno == errno.EIO
            assert adev.device.queue(0).in_flight == 0
            assert await adev.readinto(0, buf) == 16 * MiB
            assert buf.tobytes() == image.data[:16 * MiB]

    asyncio.run(main())
