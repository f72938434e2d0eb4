"""Batch API (issue 5): Queue.submit_reads/submit_writes + Queue.reap — data,
tags, whole-batch validation (nothing submitted on error), slots, reap's
min/timeout, failed completions, and no Python heap growth per request."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

import blkio
from conftest import Inject

KiB = 1024
MiB = 1 << 20
BS = 4096

OUT_DTYPE = np.dtype([("user_data", np.int64), ("ret", np.int32)])


def _offsets(n, capacity, bs=BS, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.permutation(capacity // bs)[:n] * bs).astype(np.uint64)


def _reap_all(q, n, out=None, timeout=30.0):
    """Reap exactly n batch completions; returns them as one structured array."""
    out = np.zeros(max(n, 1), OUT_DTYPE) if out is None else out
    got = []
    while sum(len(g) for g in got) < n:
        k = q.reap(out, min=1, timeout=timeout)
        got.append(out[:k].copy())
    res = np.concatenate(got) if got else np.zeros(0, OUT_DTYPE)
    assert len(res) == n
    return res


def _assert_nothing_submitted(dev, q, call, exc=(ValueError, TypeError), match=None):
    """``call()`` raises ``exc`` and leaves the queue and counters untouched."""
    before = (q.in_flight, dev.stats.requests)
    with pytest.raises(exc, match=match) as info:
        call()
    assert (q.in_flight, dev.stats.requests) == before, f"something was submitted: {info.value}"
    out = np.zeros(8, OUT_DTYPE)
    assert q.reap(out) == 0
    return info.value


# ---------------------------------------------------------------------------
# Data


@pytest.mark.parametrize("wrap", [np.asarray, memoryview], ids=["ndarray", "memoryview"])
def test_submit_reads_fill_alloc_buffers_with_file_data_io_uring(image, wrap):
    # memoryview: offsets, buffers and tags come through the buffer protocol
    n = 64
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(n * BS).reshape(n, BS)
        offs = _offsets(n, dev.capacity)
        tags = np.arange(100, 100 + n, dtype=np.int64)
        assert q.submit_reads(wrap(offs), wrap(bufs), user_data=wrap(tags)) == n
        res = _reap_all(q, n)
        assert (res["ret"] == 0).all()
        assert sorted(res["user_data"].tolist()) == tags.tolist()
        for i, off in enumerate(offs):
            assert bufs[i].tobytes() == image.data[int(off):int(off) + BS], f"row {i}"


def test_submit_writes_reach_file_io_uring(image):
    n = 64
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(n * BS).reshape(n, BS)
        bufs[:] = np.random.default_rng(1).integers(0, 256, bufs.shape, dtype=np.uint8)
        offs = _offsets(n, dev.capacity, seed=1)
        assert q.submit_writes(offs, bufs) == n
        res = _reap_all(q, n)
        assert (res["ret"] == 0).all()
        dev.flush()
        expected = bufs.copy()
    for i, off in enumerate(offs):
        assert image.pread(int(off), BS) == expected[i].tobytes(), f"row {i}"


def test_submit_writes_with_fua_reach_file_io_uring(image):
    n = 8
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(n * BS).reshape(n, BS)
        bufs[:] = 0x5A
        offs = (np.arange(n, dtype=np.uint64) * 2 * BS)
        assert q.submit_writes(offs, bufs, fua=True) == n
        assert (_reap_all(q, n)["ret"] == 0).all()
    for off in offs:
        assert image.pread(int(off), BS) == b"\x5a" * BS


def test_batch_reads_and_writes_match_backing_file_vhost_user(qsd):
    daemon = qsd()
    n = 64
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket) as dev:
        q = dev.queue(0)
        offs = _offsets(2 * n, dev.capacity, seed=2)
        roffs, woffs = offs[:n], offs[n:]
        rbufs = dev.alloc(n * BS).reshape(n, BS)
        wbufs = dev.alloc(n * BS).reshape(n, BS)
        wbufs[:] = np.random.default_rng(3).integers(0, 256, wbufs.shape, dtype=np.uint8)
        q.submit_reads(roffs, rbufs, user_data=np.arange(n, dtype=np.int64))
        q.submit_writes(woffs, wbufs, user_data=np.arange(n, 2 * n, dtype=np.int64))
        res = _reap_all(q, 2 * n)
        assert (res["ret"] == 0).all()
        assert sorted(res["user_data"].tolist()) == list(range(2 * n))
        dev.flush()
        assert dev.stats.bounced_requests == 0
        for i, off in enumerate(roffs):
            assert rbufs[i].tobytes() == daemon.raw.data[int(off):int(off) + BS], f"read {i}"
        expected = wbufs.copy()
    for i, off in enumerate(woffs):
        assert daemon.raw.pread(int(off), BS) == expected[i].tobytes(), f"write {i}"


def test_registered_numpy_memory_is_accepted_by_batch(image):
    n = 16
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        mem = blkio.Buffer(n * BS)
        arr = np.frombuffer(mem, dtype=np.uint8).reshape(n, BS)
        dev.register(arr)
        try:
            offs = _offsets(n, dev.capacity, seed=5)
            q.submit_reads(offs, arr)
            assert (_reap_all(q, n)["ret"] == 0).all()
            for i, off in enumerate(offs):
                assert arr[i].tobytes() == image.data[int(off):int(off) + BS]
        finally:
            dev.unregister(arr)
        del arr


# ---------------------------------------------------------------------------
# Tags


def test_default_user_data_tags_are_indices_returned_once_each(image):
    n = 100
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(n * BS).reshape(n, BS)
        q.submit_reads(_offsets(n, dev.capacity), bufs)
        res = _reap_all(q, n)
        assert sorted(res["user_data"].tolist()) == list(range(n))


def test_explicit_user_data_tags_returned_exactly_once_each(image):
    n = 100
    tags = np.random.default_rng(7).choice(np.arange(-2**40, 2**40, 2**30), n, replace=False)
    tags = tags.astype(np.int64)
    tags[0], tags[1] = -(2**62), 2**62 - 1             # the extremes of the range
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(n * BS).reshape(n, BS)
        q.submit_reads(_offsets(n, dev.capacity), bufs, user_data=tags)
        res = _reap_all(q, n)
        assert sorted(res["user_data"].tolist()) == sorted(tags.tolist())
        assert len(set(res["user_data"].tolist())) == n


def test_reap_into_small_out_returns_rest_on_next_reap(image):
    n = 50
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(n * BS).reshape(n, BS)
        q.submit_reads(_offsets(n, dev.capacity), bufs)
        out = np.zeros(8, OUT_DTYPE)
        seen = []
        while len(seen) < n:
            k = q.reap(out, min=1, timeout=10)
            assert 1 <= k <= len(out)
            seen += out[:k]["user_data"].tolist()
        assert sorted(seen) == list(range(n))
        assert q.reap(out) == 0


# ---------------------------------------------------------------------------
# Validation: a clear error, nothing submitted


@pytest.fixture
def dev_q(image):
    with blkio.open("io_uring", path=str(image.path)) as dev:
        yield dev, dev.queue(0)


def test_mismatched_offsets_and_buffers_lengths_submit_nothing(dev_q):
    dev, q = dev_q
    bufs = dev.alloc(8 * BS).reshape(8, BS)
    offs = np.arange(7, dtype=np.uint64) * BS
    _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), ValueError, "7 offsets but 8")
    _assert_nothing_submitted(dev, q, lambda: q.submit_writes(offs, bufs), ValueError, "7 offsets but 8")


def test_mismatched_user_data_length_submits_nothing(dev_q):
    dev, q = dev_q
    bufs = dev.alloc(8 * BS).reshape(8, BS)
    offs = np.arange(8, dtype=np.uint64) * BS
    tags = np.arange(9, dtype=np.int64)
    _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs, user_data=tags),
                              ValueError, "user_data")


def test_float_offsets_rejected_with_nothing_submitted(dev_q):
    dev, q = dev_q
    bufs = dev.alloc(4 * BS).reshape(4, BS)
    offs = np.arange(4, dtype=np.float64) * BS
    _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), TypeError, "offsets")


def test_int32_user_data_is_taken_as_int64_tags(dev_q):
    # Any integer array works for tags and offsets (the one checker of
    # integer arrays converts it); floats and bools do not (test_surface.py).
    dev, q = dev_q
    bufs = dev.alloc(4 * BS).reshape(4, BS)
    offs = np.arange(4, dtype=np.uint64) * BS
    tags = np.arange(100, 104, dtype=np.int32)
    assert q.submit_reads(offs, bufs, user_data=tags) == 4
    assert sorted(_reap_all(q, 4)["user_data"].tolist()) == [100, 101, 102, 103]


def test_uint16_buffers_rejected_with_nothing_submitted(dev_q):
    dev, q = dev_q
    bufs = dev.alloc(4 * BS).view(np.uint16).reshape(4, BS // 2)
    offs = np.arange(4, dtype=np.uint64) * BS
    _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), TypeError, "buffers")


def test_strided_buffers_view_rejected_with_nothing_submitted(dev_q):
    dev, q = dev_q
    bufs = dev.alloc(8 * BS).reshape(8, BS)[::2]           # rows 0, 2, 4, 6
    assert not bufs.flags.c_contiguous
    offs = np.arange(4, dtype=np.uint64) * BS
    _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), (TypeError, ValueError),
                              "contiguous|buffers")


def test_big_endian_offsets_are_read_as_their_values(dev_q, image):
    # An exact ndarray is read without a buffer export only when it already
    # has the right layout; a byte-swapped one is converted, never misread.
    dev, q = dev_q
    bufs = dev.alloc(4 * BS).reshape(4, BS)
    offs = (np.arange(4, dtype=np.uint64)[::-1] * BS).astype(">u8")
    assert q.submit_reads(offs, bufs) == 4
    assert (_reap_all(q, 4)["ret"] == 0).all()
    for i, off in enumerate(offs.tolist()):
        assert bufs[i].tobytes() == image.data[off:off + BS]


def test_fortran_order_buffers_rejected_with_nothing_submitted(dev_q):
    dev, q = dev_q
    bufs = dev.alloc(4 * BS).reshape(BS, 4).T        # alloc'd memory, F order
    assert bufs.shape == (4, BS) and not bufs.flags.c_contiguous
    offs = np.arange(4, dtype=np.uint64) * BS
    _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), TypeError, "buffers")


def test_read_only_buffers_rejected_for_reads_accepted_for_writes(dev_q):
    dev, q = dev_q
    bufs = dev.alloc(4 * BS).reshape(4, BS)
    bufs.flags.writeable = False
    offs = np.arange(4, dtype=np.uint64) * BS
    _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), TypeError, "buffers")
    assert q.submit_writes(offs, bufs) == 4
    assert (_reap_all(q, 4)["ret"] == 0).all()


def test_plain_numpy_buffers_rejected_with_value_error(dev_q):
    dev, q = dev_q
    bufs = np.zeros((4, BS), np.uint8)
    offs = np.arange(4, dtype=np.uint64) * BS
    _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), ValueError,
                              "alloc|register")
    _assert_nothing_submitted(dev, q, lambda: q.submit_writes(offs, bufs), ValueError,
                              "alloc|register")


def test_unaligned_offset_on_direct_loop_device_submits_nothing(loopdev):
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        q = dev.queue(0)
        assert dev.limits.request_alignment == 512
        bufs = dev.alloc(4 * BS).reshape(4, BS)
        offs = np.arange(4, dtype=np.uint64) * BS
        offs[2] += 256
        _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), ValueError,
                                  "request-alignment")
        _assert_nothing_submitted(dev, q, lambda: q.submit_writes(offs, bufs), ValueError,
                                  "request-alignment")


def test_offset_past_capacity_submits_nothing(loopdev):
    # A block device cannot grow (a regular file can, and takes writes past its end).
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(4 * BS).reshape(4, BS)
        for bad in (dev.capacity, dev.capacity - BS // 2, 2**63, 2**64 - BS):
            offs = np.arange(4, dtype=np.uint64) * BS
            offs[3] = bad
            _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), ValueError,
                                      "capacity|request-alignment")


def test_offsets_that_wrap_around_2_64_submit_nothing_even_where_the_device_grows(dev_q):
    dev, q = dev_q
    bufs = dev.alloc(4 * BS).reshape(4, BS)
    offs = np.arange(4, dtype=np.uint64) * BS
    offs[3] = 2**64 - BS // 2
    _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), ValueError, "pass the end")


def test_last_block_before_capacity_is_accepted(dev_q):
    dev, q = dev_q
    bufs = dev.alloc(BS).reshape(1, BS)
    q.submit_reads(np.array([dev.capacity - BS], np.uint64), bufs)
    assert _reap_all(q, 1)["ret"][0] == 0


def test_io_uring_full_queue_of_64_accepts_64_then_rejects_65(image):
    with blkio.open("io_uring", path=str(image.path), num_entries=64) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(65 * BS).reshape(65, BS)
        offs = np.arange(65, dtype=np.uint64) * BS
        _assert_nothing_submitted(dev, q, lambda: q.submit_reads(offs, bufs), ValueError, "64")
        assert q.submit_reads(offs[:64], bufs[:64]) == 64
        assert (_reap_all(q, 64)["ret"] == 0).all()
        assert bufs[63].tobytes() == image.data[63 * BS:64 * BS]


def test_batch_beyond_free_slots_while_queue_full_rejected(slow_socket):
    # Page-cached io_uring reads complete inside the submission; the
    # throttled vhost-user export keeps all 64 in flight for seconds.
    with blkio.open("virtio-blk-vhost-user", path=slow_socket, queue_size=64) as dev:
        q = dev.queue(0)
        assert q.depth == 64
        dev.read(0, 4 * MiB)                 # fills the throttle: the next reads wait ~1 s
        bufs = dev.alloc(64 * BS).reshape(64, BS)
        offs = np.arange(64, dtype=np.uint64) * BS
        assert q.submit_reads(offs, bufs) == 64
        assert q.in_flight == 64
        one = dev.alloc(BS).reshape(1, BS)
        _assert_nothing_submitted(dev, q, lambda: q.submit_reads(np.zeros(1, np.uint64), one),
                                  ValueError, "does not fit")
        assert (_reap_all(q, 64)["ret"] == 0).all()
        # With the queue drained, a batch fits again.
        assert q.submit_reads(np.zeros(1, np.uint64), one) == 1
        assert _reap_all(q, 1)["ret"][0] == 0


# ---------------------------------------------------------------------------
# reap: min, timeout, failures


def test_reap_timeout_raises_timeout_error_and_keeps_requests_tracked(slow_socket):
    n = 8
    with blkio.open("virtio-blk-vhost-user", path=slow_socket) as dev:
        q = dev.queue(0)
        dev.read(0, 8 * MiB)              # fills the throttle: the next requests wait ~2 s
        bufs = dev.alloc(n * 64 * KiB).reshape(n, 64 * KiB)
        offs = np.arange(n, dtype=np.uint64) * 64 * KiB
        q.submit_reads(offs, bufs, user_data=np.arange(100, 100 + n, dtype=np.int64))
        out = np.zeros(n, OUT_DTYPE)
        with pytest.raises(TimeoutError):
            q.reap(out, min=n, timeout=0.2)
        assert q.in_flight == n
        res = _reap_all(q, n, out=out)
        assert sorted(res["user_data"].tolist()) == list(range(100, 100 + n))
        assert (res["ret"] == 0).all()
        assert q.in_flight == 0


def test_reap_min_larger_than_in_flight_raises_value_error(image):
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        out = np.zeros(16, OUT_DTYPE)
        with pytest.raises(ValueError):
            q.reap(out, min=1)
        bufs = dev.alloc(4 * BS).reshape(4, BS)
        q.submit_reads(np.arange(4, dtype=np.uint64) * BS, bufs)
        with pytest.raises(ValueError):
            q.reap(out, min=5, timeout=5)
        assert len(_reap_all(q, 4, out=out)) == 4


def test_reap_min_larger_than_out_raises_value_error(image):
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(4 * BS).reshape(4, BS)
        q.submit_reads(np.arange(4, dtype=np.uint64) * BS, bufs)
        with pytest.raises(ValueError):
            q.reap(np.zeros(2, OUT_DTYPE), min=3)
        assert len(_reap_all(q, 4)) == 4


def test_reap_out_with_wrong_fields_rejected(image):
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        with pytest.raises(TypeError):
            q.reap(np.zeros(4, [("user_data", np.int32), ("ret", np.int32)]))
        with pytest.raises(TypeError):
            q.reap(np.zeros(4, np.int64))


def test_failed_counts_failed_batch_completions(qsd):
    # A list: conftest's isinstance(faults, Inject) does not match this
    # module's Inject under --import-mode=importlib (two module objects).
    daemon = qsd(faults=[Inject(event="read_aio", errno=5, once=True)])
    n = 4
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket) as dev:
        q = dev.queue(0)
        assert q.failed == 0
        bufs = dev.alloc(n * BS).reshape(n, BS)
        q.submit_reads(np.arange(n, dtype=np.uint64) * 64 * KiB, bufs)
        res = _reap_all(q, n)
        assert sorted(res["ret"].tolist()) == [-5] + [0] * (n - 1)
        assert q.failed == 1
        # once=True: the next batch succeeds and failed stays at 1.
        q.submit_reads(np.arange(n, dtype=np.uint64) * 64 * KiB, bufs)
        assert (_reap_all(q, n)["ret"] == 0).all()
        assert q.failed == 1


# ---------------------------------------------------------------------------
# No Python allocation per request


def test_100k_batched_reads_do_not_grow_python_heap(image):
    n, batches, warmup = 32, 3125, 200
    with blkio.open("io_uring", path=str(image.path)) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(n * BS).reshape(n, BS)
        nblocks = dev.capacity // BS
        offs = np.empty(n, np.uint64)
        table = (np.random.default_rng(9).integers(0, nblocks, (64, n)) * BS).astype(np.uint64)
        tags = np.arange(n, dtype=np.int64)
        out = np.zeros(n, OUT_DTYPE)

        def run(count):
            for b in range(count):
                offs[:] = table[b & 63]
                q.submit_reads(offs, bufs, user_data=tags)
                got = 0
                while got < n:
                    got += q.reap(out, min=1)
            return count * n

        run(warmup)
        gc.collect()
        tracemalloc.start()
        try:
            run(warmup)                         # warm up under tracing too
            gc.collect()
            snap_before = tracemalloc.take_snapshot()    # alive in both measurements
            before = tracemalloc.get_traced_memory()[0]
            done = run(batches)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            snap_after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        assert done == 100_000
        assert q.failed == 0
        growth = after - before
        top = "\n".join(str(s) for s in snap_after.compare_to(snap_before, "lineno")[:5])
        assert growth < 64 * KiB, f"traced heap grew by {growth} bytes over {done} requests:\n{top}"


# ---------------------------------------------------------------------------
# The indexed form: buffers as offsets into one registered region


def test_batch_with_buffer_offsets_into_one_region_reads_the_right_data(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        region = dev.alloc(64 * 4096)
        slots = np.array([5, 0, 63, 17], dtype=np.uint64) * 4096     # any order, any slot
        offsets = np.array([3, 9, 1000, 42], dtype=np.uint64) * 4096
        assert q.submit_reads(offsets, slots, region=region, blocksize=4096) == 4
        out = np.zeros(4, dtype=[("user_data", np.int64), ("ret", np.int32)])
        got = 0
        while got < 4:
            got += q.reap(out[got:], min=1)
        assert (out["ret"] == 0).all()
        for s, o in zip(slots.tolist(), offsets.tolist()):
            assert region[s:s + 4096].tobytes() == image.data[o:o + 4096]


def test_batch_with_buffer_offsets_writes_from_the_region(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        region = dev.alloc(8 * 4096)
        for i in range(8):
            region[i * 4096:(i + 1) * 4096] = i + 1
        slots = np.array([7, 2], dtype=np.uint64) * 4096
        offsets = np.array([0, 4096], dtype=np.uint64)
        q.submit_writes(offsets, slots, region=region, blocksize=4096)
        out = np.zeros(2, dtype=[("user_data", np.int64), ("ret", np.int32)])
        got = 0
        while got < 2:
            got += q.reap(out[got:], min=1)
        dev.flush()
    assert image.pread(0, 4096) == bytes([8]) * 4096
    assert image.pread(4096, 4096) == bytes([3]) * 4096


def test_batch_buffer_offset_past_the_region_is_refused_before_submission(image):
    with blkio.open("io_uring", path=image.path) as dev:
        q = dev.queue(0)
        region = dev.alloc(4 * 4096)
        before = dev.stats.requests
        with pytest.raises(ValueError, match=r"buffers\[1\].*passes the end of region"):
            q.submit_reads(np.zeros(2, np.uint64), np.array([0, 4 * 4096], np.uint64),
                           region=region, blocksize=4096)
        with pytest.raises(ValueError, match="blocksize"):
            q.submit_reads(np.zeros(1, np.uint64), np.array([0], np.uint64),
                           region=region, blocksize=0)
        with pytest.raises(ValueError, match="Device.alloc"):
            q.submit_reads(np.zeros(1, np.uint64), np.array([0], np.uint64),
                           region=np.zeros(4096, np.uint8), blocksize=4096)
        assert dev.stats.requests == before and q.in_flight == 0


@pytest.mark.parametrize("how", ["reap", "wait"])
def test_waiting_for_more_completions_than_one_libblkio_call_returns(qsd, how):
    """min above the 64 completions one blkioq_do_io call fills: the wait
    loops (libblkio would answer EINVAL to min_completions > max)."""
    n = 200
    daemon = qsd()
    with blkio.open("virtio-blk-vhost-user", daemon.socket, queue_size=256) as dev:
        q = dev.queue(0)
        bufs = dev.alloc(n * BS).reshape(n, BS)
        offs = _offsets(n, dev.capacity)
        if how == "reap":
            assert q.submit_reads(offs, bufs) == n
            out = np.zeros(n, OUT_DTYPE)
            assert q.reap(out, min=n, timeout=30) == n
            assert (out["ret"] == 0).all()
        else:
            for i in range(n):
                q.read(int(offs[i]), bufs[i], user_data=i)
            done = q.wait(min=n, timeout=30)
            assert sorted(c.user_data for c in done) == list(range(n))
        assert q.in_flight == 0
