"""Zoned-device API on the host: what blkio checks before a zone request or a
write is submitted, and the errors of zone calls on a device that is not
zoned (io_uring on temp files).  Real zoned namespaces are tested in the
guest (tests/guest/in_guest/test_zoned_in_guest.py).

Some tests give an io_uring file device a zone geometry through
``Device._set_zone_info`` (what open() does with the zoned properties of a
ZNS namespace), so that the checks run on the host: a request that passes
them reaches libblkio's io_uring driver, which answers ENOTSUP to zone
requests, and a write that passes them lands in the file.
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import blkio
from blkio._public import large_io_plan
from blkio._zones import NOT_ZONED, read_zone_info

KiB, MiB = 1 << 10, 1 << 20
ZONE = 1 * MiB
GEOMETRY = blkio.ZoneInfo("host-managed", ZONE, 64, 4, 4, False, 0)

DEVICE_CALLS = {
    "report_zones": lambda d: d.report_zones(),
    "open_zone": lambda d: d.open_zone(0),
    "close_zone": lambda d: d.close_zone(0),
    "finish_zone": lambda d: d.finish_zone(0),
    "reset_zone": lambda d: d.reset_zone(0),
    "open_all_zones": lambda d: d.open_all_zones(),
    "close_all_zones": lambda d: d.close_all_zones(),
    "finish_all_zones": lambda d: d.finish_all_zones(),
    "reset_all_zones": lambda d: d.reset_all_zones(),
    "report_zones ": lambda d: d.zone_writer(0),    # the writer starts with a report
}

QUEUE_CALLS = {
    "report_zones": lambda q: q.report_zones(0, np.empty(4, blkio.ZONE_DTYPE), user_data=1),
    "open_zone": lambda q: q.open_zone(0, user_data=1),
    "close_zone": lambda q: q.close_zone(0),
    "finish_zone": lambda q: q.finish_zone(0),
    "reset_zone": lambda q: q.reset_zone(0),
    "open_all_zones": lambda q: q.open_all_zones(),
    "close_all_zones": lambda q: q.close_all_zones(),
    "finish_all_zones": lambda q: q.finish_all_zones(),
    "reset_all_zones": lambda q: q.reset_all_zones(user_data="x"),
}


@pytest.fixture
def dev(image):
    with blkio.open("io_uring", path=image.path) as d:
        yield d


@pytest.fixture
def zdev(dev):
    """The file device with 64 zones of 1 MiB, host-managed, as the checks see it."""
    assert dev.capacity == 64 * ZONE
    dev._set_zone_info(GEOMETRY)
    return dev


def test_a_file_is_not_zoned(dev):
    assert dev.zoned is False and dev.zone_info.model == "none"
    assert dev.zone_info == NOT_ZONED
    assert not dev.zone_info.zoned
    assert (dev.zone_info.zone_size, dev.zone_info.nr_zones) == (0, 0)


@pytest.mark.parametrize("name", list(DEVICE_CALLS))
def test_zone_calls_on_a_device_that_is_not_zoned(dev, name):
    """A clear ValueError before anything is submitted, not libblkio's ENOTSUP."""
    before = dev.stats.requests
    with pytest.raises(ValueError, match=rf"{name.strip()}: the io_uring device is not zoned"):
        DEVICE_CALLS[name](dev)
    assert dev.stats.requests == before


@pytest.mark.parametrize("name", list(QUEUE_CALLS))
def test_queue_zone_requests_on_a_device_that_is_not_zoned(dev, name):
    q = dev.queue(0)
    with pytest.raises(ValueError, match=rf"{name}: the io_uring device is not zoned"):
        QUEUE_CALLS[name](q)
    assert q.in_flight == 0 and q.requests == 0


def test_asyncio_zone_calls_on_a_device_that_is_not_zoned(image):
    async def main():
        async with blkio.aio.open("io_uring", path=image.path) as adev:
            for call in (adev.report_zones(), adev.open_zone(0), adev.reset_all_zones()):
                with pytest.raises(ValueError, match="not zoned"):
                    await call
            assert adev.queue.requests == 0
    asyncio.run(main())


def test_enqueue_zone_takes_zone_ops_only(dev):
    q = dev.queue(0)
    with pytest.raises(ValueError, match="not a zone request"):
        q.enqueue_zone(blkio.Op.READ, 0)
    with pytest.raises(ValueError, match="unknown op"):
        q.enqueue(blkio.Op.RESET_ZONE, 0)


def test_zone_record_layout_is_struct_blkio_zone():
    dt = blkio.ZONE_DTYPE
    assert dt.itemsize == 64
    assert dt.names == ("start", "len", "capacity", "write_pointer", "type", "state", "reset")
    assert [dt.fields[n][1] for n in dt.names] == [0, 8, 16, 24, 32, 33, 34]
    assert [dt.fields[n][0] for n in dt.names] == [np.dtype(np.uint64)] * 4 + [
        np.dtype(np.uint8), np.dtype(np.uint8), np.dtype(np.bool_)]


def test_zone_enums_are_blkio_h():
    """The values come from the header we build against; check them against
    the installed header text where there is one."""
    try:
        with open("/usr/include/blkio.h") as f:
            header = f.read()
    except OSError:
        pytest.skip("no /usr/include/blkio.h (libblkio-dev) to compare with")
    found = dict(re.findall(r"BLKIO_ZONE_(?:TYPE|STATE)_(\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)", header))
    want = {m.name: m.value for m in (*blkio.ZoneType, *blkio.ZoneState)}
    assert {k: int(v, 0) for k, v in found.items()} == want
    assert str(blkio.ZoneState.IMP_OPEN) == "imp_open"


# --------------------------------------------------------------------------
# the checks, with a zone geometry
# --------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["open_zone", "close_zone", "finish_zone", "reset_zone"])
def test_management_offset_must_be_a_zone_start(zdev, op):
    with pytest.raises(ValueError, match=rf"{op}: offset {ZONE + 4096} is not the start of a "
                                         rf"zone \(zone size {ZONE} bytes; the zone holding it "
                                         rf"starts at {ZONE}\)"):
        getattr(zdev, op)(ZONE + 4096)
    with pytest.raises(ValueError, match=rf"{op}: offset {zdev.capacity} is not inside the device"):
        getattr(zdev.queue(0), op)(zdev.capacity)
    assert zdev.stats.requests == 0
    # A zone start passes the checks and reaches the driver, which has no zones.
    with pytest.raises(OSError) as ei:
        getattr(zdev, op)(3 * ZONE)
    assert ei.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL)
    assert zdev.stats.requests == 1


def test_report_offsets(zdev):
    with pytest.raises(ValueError, match="not inside the device"):
        zdev.report_zones(zdev.capacity)
    with pytest.raises(ValueError, match="nr_zones must be"):
        zdev.report_zones(0, -1)
    assert len(zdev.report_zones(0, 0)) == 0
    assert zdev.stats.requests == 0
    # Inside a zone is fine (libblkio rounds it down): it reaches the driver.
    with pytest.raises(OSError):
        zdev.report_zones(ZONE + 4096, 1)
    q = zdev.queue(0)
    with pytest.raises(ValueError, match="whole records of 64 bytes"):
        q.report_zones(0, bytearray(100))
    with pytest.raises(ValueError, match="at least one"):
        q.report_zones(0, bytearray(0))
    with pytest.raises(TypeError, match="writable"):
        q.report_zones(0, bytes(64))


def test_report_completion_through_a_queue(zdev):
    """A report is a queue request like any other: a Completion with the
    user_data, whose ret is the driver's answer."""
    q = zdev.queue(0)
    zones = np.zeros(4, blkio.ZONE_DTYPE)
    assert q.report_zones(0, zones, user_data="r") == 4
    (c,) = q.wait(min=1, timeout=10)
    assert (c.user_data, c.op, c.offset, c.length) == ("r", "report_zones", 0, 4 * 64)
    assert c.ret < 0
    with pytest.raises(OSError):
        c.check()


def test_write_crossing_a_zone_boundary(zdev, image):
    data = np.full(8 * KiB, 7, np.uint8)
    before = zdev.stats.requests
    msg = rf"crosses the zone boundary at {2 * ZONE} \(zone size {ZONE} bytes\)"
    with pytest.raises(ValueError, match=msg):
        zdev.write(2 * ZONE - 4 * KiB, data)
    with pytest.raises(ValueError, match=msg):
        zdev.writev(2 * ZONE - 4 * KiB, [data[:4096], data[4096:]])
    with pytest.raises(ValueError, match=msg):
        zdev.write_zeroes(2 * ZONE - 4 * KiB, 8 * KiB)
    with pytest.raises(ValueError, match=msg):
        zdev.queue(0).write(2 * ZONE - 4 * KiB, data)
    buffers = zdev.alloc(2 * 8 * KiB).reshape(2, 8 * KiB)
    with pytest.raises(ValueError, match=msg):
        zdev.queue(0).submit_writes(np.array([0, 2 * ZONE - 4 * KiB], np.uint64), buffers)
    assert zdev.stats.requests == before and zdev.queue(0).in_flight == 0
    # Reads may cross; writes that end at the boundary pass.
    assert zdev.read(2 * ZONE - 4 * KiB, 8 * KiB).nbytes == 8 * KiB
    assert zdev.write(2 * ZONE - 8 * KiB, data) == data.nbytes
    assert image.pread(2 * ZONE - 8 * KiB, 8 * KiB) == data.tobytes()
    # A whole zone in one call (split at max-transfer, each piece inside it).
    assert zdev.write(5 * ZONE, np.ones(ZONE, np.uint8)) == ZONE


def test_write_crossing_a_zone_in_asyncio(image):
    async def main():
        async with blkio.aio.open("io_uring", path=image.path) as adev:
            adev.device._set_zone_info(GEOMETRY)
            with pytest.raises(ValueError, match="crosses the zone boundary"):
                await adev.write(ZONE - 4 * KiB, bytes(8 * KiB))
            assert await adev.write(ZONE, bytes(8 * KiB)) == 8 * KiB
    asyncio.run(main())


def test_zone_management_on_a_read_only_device(image):
    with blkio.open("io_uring", path=image.path, read_only=True) as d:
        d._set_zone_info(GEOMETRY)
        for call in (lambda: d.reset_zone(0), lambda: d.finish_all_zones(),
                     lambda: d.queue(0).open_zone(ZONE)):
            with pytest.raises(blkio.ReadOnlyError, match="read-only"):
                call()


def test_zone_writer_checks_its_zone(zdev):
    with pytest.raises(ValueError, match="is not the start of a zone"):
        zdev.zone_writer(ZONE + 4096)
    with pytest.raises(ValueError, match="nr_zones must be 1 to 2"):
        zdev.zone_writer(62 * ZONE, nr_zones=3)


# --------------------------------------------------------------------------
# reading the geometry
# --------------------------------------------------------------------------

GOOD = {"zoned": 2, "zone-size": 4 * MiB, "nr-zones": 16, "max-open-zones": 4,
        "max-active-zones": 4, "append-support": True, "zone-append-max-bytes": 128 * KiB}


def test_read_zone_info():
    info = read_zone_info(GOOD.__getitem__, True, 64 * MiB, 4096)
    assert info == blkio.ZoneInfo("host-managed", 4 * MiB, 16, 4, 4, True, 128 * KiB)
    assert read_zone_info(GOOD.__getitem__, False, 64 * MiB, 4096) == NOT_ZONED
    assert read_zone_info(dict(GOOD, zoned=0).__getitem__, True, 64 * MiB, 4096) == NOT_ZONED


@pytest.mark.parametrize("bad, why", [
    ({"zoned": 3}, r'"zoned" value 3'),
    ({"zone-size": 4 * MiB + 512}, r'"zone-size" value \d+, must be a positive multiple of '
                                   r'request-alignment \(4096\)'),
    ({"zone-size": 0}, r'"zone-size" value 0'),
    ({"nr-zones": 17}, r'"nr-zones" value 17: 17 zones of 4194304 bytes must fit'),
    ({"max-open-zones": -1}, r'"max-open-zones" value -1'),
])
def test_read_zone_info_refuses_nonsense(bad, why):
    with pytest.raises(blkio.Error, match=why):
        read_zone_info(dict(GOOD, **bad).__getitem__, True, 64 * MiB, 4096)


def test_info_of_a_file_says_not_zoned(tmp_path, image):
    proc = subprocess.run([sys.executable, "-m", "blkio", "info", "io_uring", f"path={image.path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["zones"] == {"model": "none"}


def test_large_writes_to_a_host_managed_device_go_one_chunk_at_a_time(zdev):
    """Chunks in flight together may reach a zone reordered: the plan (used
    by the blocking path and asyncio alike) keeps writes at depth 1 there,
    reads stay pipelined."""
    chunk = 256 * 1024
    zdev.large_io_chunk = chunk
    assert large_io_plan(zdev, ZONE, write=True) == (chunk, 1)
    assert large_io_plan(zdev, ZONE, depth=8, write=True) == (chunk, 1)
    assert large_io_plan(zdev, ZONE, depth=8) == (chunk, 8)
    q = zdev.queue(0)
    before = q.requests
    assert zdev.write(0, zdev.alloc(ZONE), depth=8) == ZONE    # inside zone 0
    assert q.requests - before == ZONE // chunk
