"""Zoned namespaces (NVMe ZNS) on nvme-io_uring, inside the QEMU guest.

Every zone call of blkio's API against real (QEMU-emulated) zoned
namespaces: properties and ``Device.zone_info``, ``report_zones`` before and
after writes, writes at / behind / ahead of the write pointer, finish, reset,
open and close of one zone and of all zones, the open and active zone
limits, zone capacity < zone size, report offsets, the queue and asyncio
forms, ``ZoneWriter`` and ``python -m blkio info``.  One test still runs the C
helper tests/guest/zone_probe.c: libblkio's values of the zoned properties
before connect, which blkio's API cannot read (open() connects and starts).

The launcher gives the guest two zoned namespaces on a second controller
(serial ``zns0``; see launcher.ZONED_NAMESPACES): nsid 1 with 16 zones of 4 MiB
(capacity 4 MiB, 4 open / 4 active), nsid 2 with 8 zones of 4 MiB holding
3 MiB each (2 open / 3 active).  Tests that write start from all zones EMPTY
(``reset_all_zones``).  Device-reported zone errors all come back from
libblkio as EIO; what blkio can check itself (a zone start, a write crossing
a zone boundary, a device that is not zoned) is a ValueError before
submission.
"""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
import sys

import numpy as np
import pytest

NVME = "nvme-io_uring"
KiB, MiB = 1 << 10, 1 << 20

# QEMU's zoned.zasl=5 on the ZNS controller: 2^5 * 4 KiB.
ZONE_APPEND_MAX = 128 * KiB

ZONED_PROPERTIES = ("zoned", "max-open-zones", "max-active-zones", "zone-size", "nr-zones",
                    "append-support", "zone-append-max-bytes")


@pytest.fixture(scope="session")
def blkio():
    import blkio as mod
    return mod


@pytest.fixture(scope="session")
def S(blkio):
    return blkio.ZoneState


def expected_properties(z) -> dict:
    return {"zoned": 2, "max-open-zones": z.max_open, "max-active-zones": z.max_active,
            "zone-size": z.zone_size, "nr-zones": z.nr_zones, "append-support": True,
            "zone-append-max-bytes": ZONE_APPEND_MAX}


@pytest.fixture
def zdev(blkio, zoned):
    """A blkio device on a zoned namespace whose zones are all EMPTY."""
    d = blkio.open(NVME, path=zoned.path, direct=True)
    try:
        d.reset_all_zones()
        yield d
    finally:
        d.close()


def pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def zone_start(z, index: int) -> int:
    return index * z.zone_size


def one_zone(dev, offset: int) -> dict:
    """The report of the zone holding ``offset`` as a dict of ints."""
    (zone,) = dev.report_zones(offset, 1)
    return {name: int(zone[name]) for name in zone.dtype.names}


def states(dev, offset: int = 0, n=None) -> list:
    return [int(s) for s in dev.report_zones(offset, n)["state"]]


# --------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------

def test_zoned_properties(blkio, zoned):
    """Device.get reads each zoned property by libblkio's (hyphenated) name;
    the values agree with QEMU's geometry, with the guest kernel's sysfs and
    with Device.zone_info."""
    with blkio.open(NVME, path=zoned.path, direct=True) as dev:
        got = {name: dev.get(name) for name in ZONED_PROPERTIES}
        print(f"{zoned.path} (nsid {zoned.ns.nsid}): {got}")
        assert got == expected_properties(zoned)
        assert dev.capacity == zoned.size
        # The Python spelling is an alias of the libblkio name.
        assert dev.get("zone_size") == zoned.zone_size
        props = dev.properties()
        assert {name: props[name] for name in ZONED_PROPERTIES} == got
        with pytest.raises(ValueError, match="read-only"):
            dev.set("zone-size", 8 * MiB)
        assert dev.zoned is True and dev.zone_info.model == "host-managed"
        assert dev.zone_info == blkio.ZoneInfo(
            "host-managed", zoned.zone_size, zoned.nr_zones, zoned.max_open, zoned.max_active,
            True, ZONE_APPEND_MAX)
    # The kernel's view of the same namespace.
    ns = zoned.ns
    assert ns.queue_attr("zoned") == "host-managed"
    assert int(ns.queue_attr("nr_zones")) == got["nr-zones"]
    assert int(ns.queue_attr("chunk_sectors")) * 512 == got["zone-size"]
    assert int(ns.queue_attr("max_open_zones")) == got["max-open-zones"]
    assert int(ns.queue_attr("max_active_zones")) == got["max-active-zones"]
    assert int(ns.queue_attr("zone_append_max_bytes")) == got["zone-append-max-bytes"]


def test_plain_namespace_is_not_zoned(blkio, nvme_path):
    """Every zoned property reads 0; blkio refuses zone calls before
    submission, and libblkio itself answers ENOTSUP to each zone request
    (sent by giving the device a zone geometry it does not have)."""
    with blkio.open(NVME, path=nvme_path, direct=True) as dev:
        got = {name: dev.get(name) for name in ZONED_PROPERTIES}
        assert got == {"zoned": 0, "max-open-zones": 0, "max-active-zones": 0, "zone-size": 0,
                       "nr-zones": 0, "append-support": False, "zone-append-max-bytes": 0}
        assert dev.zoned is False and not dev.zone_info.zoned
        calls = (lambda: dev.report_zones(), lambda: dev.open_zone(0), lambda: dev.close_zone(0),
                 lambda: dev.finish_zone(0), lambda: dev.reset_zone(0),
                 lambda: dev.open_all_zones(), lambda: dev.close_all_zones(),
                 lambda: dev.finish_all_zones(), lambda: dev.reset_all_zones())
        for call in calls:
            with pytest.raises(ValueError, match="is not zoned"):
                call()
        assert dev.stats.requests == 0
        zs = 4 * MiB
        dev._set_zone_info(blkio.ZoneInfo("host-managed", zs, dev.capacity // zs, 0, 0, False, 0))
        for call in calls:
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.ENOTSUP, ei.value
        assert dev.stats.requests == len(calls)


def test_zoned_properties_by_state(zoned, zone_probe):
    """libblkio answers 0 for every zoned property before connect, even on a
    zoned namespace: the catalogue makes them readable from connect on.  After
    connect they already hold the values start gives.  The underscore
    spellings of libblkio's manual are unknown names (ENOENT).  (Through
    zone_probe.c: blkio.open connects and starts, so the API never sees a
    device in the created state.)"""
    created, connected, started = zone_probe.run(zoned.path, props=True)
    want = expected_properties(zoned)
    assert {k: created["values"][k] for k in want} == {k: type(v)(0) for k, v in want.items()}
    assert {k: connected["values"][k] for k in want} == want
    assert {k: started["values"][k] for k in want} == want
    for wrong in ("max_open_zones", "zone_size"):
        assert started["values"][wrong]["errno"] == errno.ENOENT, started["values"][wrong]


# --------------------------------------------------------------------------
# max-transfer
# --------------------------------------------------------------------------

def test_max_transfer_cap_applies_to_zoned_namespace(zdev, zoned):
    """blkio caps libblkio's max-transfer (32 MiB) with the controller's limit
    from sysfs for the zoned namespace too, whatever its /dev/ngXnY name, so a
    1 MiB blocking write is split into sequential pieces that each land on
    the write pointer."""
    sysfs_cap = int(zoned.ns.queue_attr("max_hw_sectors_kb")) * KiB
    assert sysfs_cap > 0
    assert zdev.limits.max_transfer == sysfs_cap
    assert zdev.get("max-transfer") > sysfs_cap, "libblkio got it right: drop the cap?"
    with pytest.raises(ValueError, match="max-transfer"):
        zdev.queue(0).write(0, zdev.alloc(sysfs_cap + 4 * KiB))
    n = 1 * MiB
    assert n > sysfs_cap
    start = zone_start(zoned, 2)
    data = zdev.alloc(n)
    data[:] = pattern(n, 1)
    splits = zdev.stats.split_requests
    assert zdev.write(start, data) == n
    assert zdev.stats.split_requests > splits
    assert one_zone(zdev, start)["write_pointer"] == start + n
    assert np.array_equal(zdev.read(start, n), data)


# --------------------------------------------------------------------------
# writes, reads and the write pointer
# --------------------------------------------------------------------------

def test_sequential_writes_move_the_write_pointer(zdev, zoned, blkio, S):
    start = zone_start(zoned, 1)
    empty = {"start": start, "len": zoned.zone_size, "capacity": zoned.zone_capacity,
             "write_pointer": start, "type": blkio.ZoneType.SEQWRITE_REQ, "state": S.EMPTY,
             "reset": 0}
    assert one_zone(zdev, start) == empty
    a, b = pattern(4 * KiB, 2), pattern(8 * KiB, 3)
    assert zdev.write(start, a) == a.nbytes
    assert one_zone(zdev, start) == dict(empty, write_pointer=start + 4 * KiB, state=S.IMP_OPEN)
    assert zdev.write(start + a.nbytes, b) == b.nbytes
    assert np.array_equal(zdev.read(start, 12 * KiB), np.concatenate([a, b]))
    assert one_zone(zdev, start) == dict(empty, write_pointer=start + 12 * KiB, state=S.IMP_OPEN)


def test_write_not_at_write_pointer_fails_with_eio(zdev, zoned):
    """The device refuses it ("Nvme Error"), and libblkio says only EIO:
    blkio cannot tell (it does not know the write pointer without a report)."""
    start = zone_start(zoned, 3)
    zdev.write(start, pattern(8 * KiB, 4))
    for where, off in (("behind", start), ("ahead of", start + 16 * KiB)):
        with pytest.raises(OSError) as ei:
            zdev.write(off, pattern(4 * KiB, 5))
        assert ei.value.errno == errno.EIO, (where, ei.value)
    # The same through a queue: the completion carries -EIO.
    q = zdev.queue(0)
    q.write(start + 4 * KiB, zdev.alloc(4 * KiB), user_data="behind")
    (c,) = q.wait(min=1, timeout=30)
    assert c.ret == -errno.EIO, c
    assert one_zone(zdev, start)["write_pointer"] == start + 8 * KiB, \
        "a failed write moved the write pointer"


def test_write_crossing_a_zone_boundary_is_refused_before_submission(zdev, zoned, S):
    requests = zdev.stats.requests
    with pytest.raises(ValueError, match=f"crosses the zone boundary at {zoned.zone_size}"):
        zdev.write(zoned.zone_size - 4 * KiB, pattern(8 * KiB, 6))
    with pytest.raises(ValueError, match="crosses the zone boundary"):
        zdev.queue(0).write(zoned.zone_size - 4 * KiB, zdev.alloc(8 * KiB))
    with pytest.raises(ValueError, match="crosses the zone boundary"):
        zdev.write(0, zdev.alloc(zoned.zone_size + 4 * KiB))
    assert zdev.stats.requests == requests
    assert states(zdev, 0, 2) == [S.EMPTY, S.EMPTY]


def test_write_past_the_zone_capacity_fails_with_eio(zdev, zoned, S):
    """A write at the write pointer that runs past the zone's capacity but not
    its size fails with EIO (blkio cannot check: the capacity is per zone);
    one that ends at the capacity fills the zone."""
    start = zone_start(zoned, 0)
    fill = zoned.zone_capacity - 4 * KiB
    zdev.write(start, zdev.alloc(fill))
    if zoned.zone_capacity < zoned.zone_size:
        with pytest.raises(OSError) as ei:
            zdev.write(start + fill, pattern(8 * KiB, 6))
        assert ei.value.errno == errno.EIO
        zone, after = zdev.report_zones(start, 2)
        assert zone["write_pointer"] == start + fill, "the failed write moved the write pointer"
        assert after["state"] == S.EMPTY
    zdev.write(start + fill, pattern(4 * KiB, 7))
    zone = one_zone(zdev, start)
    assert zone["state"] == S.FULL
    # A FULL zone's write pointer is reported at start + len (the next zone's
    # start), also where the capacity is smaller than the size.
    assert zone["write_pointer"] == start + zoned.zone_size
    # Nothing more goes into a FULL zone, nor into its blocks past the capacity.
    for off in {start + fill, start + zoned.zone_capacity - 4 * KiB,
                start + zoned.zone_size - 4 * KiB}:
        with pytest.raises(OSError) as ei:
            zdev.write(off, pattern(4 * KiB, 8))
        assert ei.value.errno == errno.EIO, off


def test_reads_of_unwritten_blocks_give_zeroes(zdev, zoned):
    """An EMPTY zone reads as zeroes (one blocking read of the whole zone,
    split at max-transfer); so does a written zone past its write pointer,
    and, where capacity < size, the blocks past the capacity."""
    start = zone_start(zoned, 4)
    whole = zdev.read(start, zoned.zone_size)
    assert whole.nbytes == zoned.zone_size and not whole.any()
    zdev.write(start, pattern(4 * KiB, 9))
    assert not zdev.read(start + 4 * KiB, 64 * KiB).any()
    if zoned.zone_capacity < zoned.zone_size:
        assert not zdev.read(start + zoned.zone_capacity,
                             zoned.zone_size - zoned.zone_capacity).any()


# --------------------------------------------------------------------------
# report_zones
# --------------------------------------------------------------------------

def test_report_zones(zdev, zoned, blkio, S):
    z = zoned
    full = zdev.report_zones()
    assert full.dtype == blkio.ZONE_DTYPE and len(full) == z.nr_zones
    assert [{n: int(r[n]) for n in full.dtype.names} for r in full] == [
        {"start": i * z.zone_size, "len": z.zone_size, "capacity": z.zone_capacity,
         "write_pointer": i * z.zone_size, "type": blkio.ZoneType.SEQWRITE_REQ,
         "state": S.EMPTY, "reset": 0} for i in range(z.nr_zones)]
    # More zones asked than exist: the ones there are.
    assert len(zdev.report_zones(0, z.nr_zones + 2)) == z.nr_zones
    # An offset inside a zone is rounded down to its start.
    (inside,) = zdev.report_zones(z.zone_size + 5000, 1)
    assert inside["start"] == z.zone_size
    tail = zdev.report_zones(z.size - z.zone_size, 4)
    assert [int(t["start"]) for t in tail] == [z.size - z.zone_size]
    assert len(zdev.report_zones(3 * z.zone_size, 0)) == 0
    # Past the end: refused before submission (libblkio would say EINVAL).
    with pytest.raises(ValueError, match="not inside the device"):
        zdev.report_zones(z.size)


def test_report_zones_through_a_queue(zdev, zoned, blkio, S):
    """ret is the number of zones filled in; the rest of the buffer is
    untouched.  Any writable buffer works, one at an odd address too
    (bounced and copied back where the driver's buf-alignment asks)."""
    z = zoned
    q = zdev.queue(0)
    zones = np.zeros(z.nr_zones + 2, blkio.ZONE_DTYPE)
    zones["start"] = 0xAAAAAAAAAAAAAAAA
    assert q.report_zones(0, zones, user_data="all") == z.nr_zones + 2
    print(f"buf-alignment {zdev.limits.buf_alignment}, zones at {zones.ctypes.data:#x}")
    raw = bytearray(3 * 64 + 1)
    odd = np.frombuffer(memoryview(raw)[1:], blkio.ZONE_DTYPE)
    assert q.report_zones(z.size - 2 * z.zone_size, odd, user_data="odd") == 3
    done = {c.user_data: c for c in q.wait(min=2, timeout=30)}
    assert done["all"].ret == z.nr_zones and done["all"].op == "report_zones"
    assert list(zones["start"][:z.nr_zones]) == [i * z.zone_size for i in range(z.nr_zones)]
    assert list(zones["start"][z.nr_zones:]) == [0xAAAAAAAAAAAAAAAA] * 2
    assert done["odd"].ret == 2
    assert list(odd["start"][:2]) == [z.size - 2 * z.zone_size, z.size - z.zone_size]
    assert list(odd["state"][:2]) == [S.EMPTY, S.EMPTY]


# --------------------------------------------------------------------------
# zone management
# --------------------------------------------------------------------------

def test_zone_management(zdev, zoned, S):
    z = zoned
    s = zone_start(z, 1)
    requests = zdev.stats.requests
    for op in ("open_zone", "close_zone", "finish_zone", "reset_zone"):
        # Not a zone start (libblkio: ENOTSUP) or past the end (EINVAL):
        # refused before submission, naming the zone size.
        with pytest.raises(ValueError, match=f"not the start of a zone \\(zone size {z.zone_size}"):
            getattr(zdev, op)(s + 4096)
        with pytest.raises(ValueError, match="not inside the device"):
            getattr(zdev, op)(z.size)
    assert zdev.stats.requests == requests
    # EMPTY -> CLOSED is not a valid transition: the device says EIO.
    with pytest.raises(OSError) as ei:
        zdev.close_zone(s)
    assert ei.value.errno == errno.EIO and "state transition" in str(ei.value)
    zdev.open_zone(s)
    assert one_zone(zdev, s)["state"] == S.EXP_OPEN
    # QEMU keeps an explicitly opened zone that was never written CLOSED
    # (not EMPTY) when it is closed.
    zdev.close_zone(s)
    assert one_zone(zdev, s)["state"] == S.CLOSED
    assert one_zone(zdev, s)["write_pointer"] == s
    zdev.write(s, pattern(8 * KiB, 11))
    zdev.finish_zone(s)
    assert one_zone(zdev, s)["state"] == S.FULL
    assert one_zone(zdev, s)["write_pointer"] == s + z.zone_size
    with pytest.raises(OSError) as ei:
        zdev.write(s + 8 * KiB, pattern(4 * KiB, 12))
    assert ei.value.errno == errno.EIO
    zdev.reset_zone(s)
    assert one_zone(zdev, s)["state"] == S.EMPTY
    assert one_zone(zdev, s)["write_pointer"] == s
    assert not zdev.read(s, 16 * KiB).any()


def test_all_zones_variants(zdev, zoned, S):
    """close/open/finish/reset of all zones act on the active zones only;
    EMPTY zones stay EMPTY."""
    for i in (1, 2):
        zdev.write(zone_start(zoned, i), pattern(4 * KiB, 30 + i))
    seen = []
    for op in ("close_all_zones", "open_all_zones", "finish_all_zones", "reset_all_zones"):
        getattr(zdev, op)()
        seen.append(states(zdev, 0, 3))
    assert seen == [[S.EMPTY, S.CLOSED, S.CLOSED], [S.EMPTY, S.EXP_OPEN, S.EXP_OPEN],
                    [S.EMPTY, S.FULL, S.FULL], [S.EMPTY, S.EMPTY, S.EMPTY]]


def test_active_zone_limit(zdev, zoned, S):
    """Writes open zones implicitly; with max-active zones open or closed, a
    write to one more EMPTY zone fails with EIO."""
    limit = zdev.zone_info.max_active_zones
    assert 0 < limit < zoned.nr_zones
    for i in range(limit):
        zdev.write(zone_start(zoned, i), pattern(4 * KiB, 10 + i))
    with pytest.raises(OSError) as ei:
        zdev.write(zone_start(zoned, limit), pattern(4 * KiB, 20))
    assert ei.value.errno == errno.EIO
    got = states(zdev, 0, limit + 1)
    assert [s in (S.IMP_OPEN, S.CLOSED) for s in got] == [True] * limit + [False]
    assert got[limit] == S.EMPTY


def test_open_limit_and_open_all_beyond_it(blkio, zns_small_capacity, S):
    """Explicit opens past max-open fail with EIO; open_all_zones with more
    CLOSED zones than max-open fails with EIO after opening max-open of them."""
    z = zns_small_capacity
    assert 0 < z.max_open < z.max_active
    with blkio.open(NVME, path=z.path, direct=True) as dev:
        dev.reset_all_zones()
        for i in range(z.max_open):
            dev.open_zone(zone_start(z, i))
        with pytest.raises(OSError) as ei:
            dev.open_zone(zone_start(z, z.max_open))
        assert ei.value.errno == errno.EIO
        dev.reset_all_zones()
        for i in range(z.max_active):
            dev.write(zone_start(z, i), pattern(4 * KiB, 40 + i))
        dev.close_all_zones()
        with pytest.raises(OSError) as ei:
            dev.open_all_zones()
        assert ei.value.errno == errno.EIO
        got = states(dev, 0, z.max_active)
        assert sorted(got) == sorted([S.EXP_OPEN] * z.max_open
                                     + [S.CLOSED] * (z.max_active - z.max_open))
        counts = dev.zone_states()
        assert counts["exp_open"] == z.max_open
        assert counts["closed"] == z.max_active - z.max_open
        assert counts["empty"] == z.nr_zones - z.max_active
        assert sum(counts.values()) == z.nr_zones
        dev.reset_all_zones()


# --------------------------------------------------------------------------
# queue requests and asyncio
# --------------------------------------------------------------------------

def test_zone_management_as_queue_requests(zdev, zoned, S):
    q = zdev.queue(0)
    s = zone_start(zoned, 2)
    q.open_zone(s, user_data="open")
    q.open_zone(s + zoned.zone_size, user_data="open2")
    done = {c.user_data: c for c in q.wait(min=2, timeout=30)}
    assert {k: c.ret for k, c in done.items()} == {"open": 0, "open2": 0}
    assert states(zdev, s, 2) == [S.EXP_OPEN, S.EXP_OPEN]
    q.finish_zone(s, user_data="finish")
    q.close_all_zones(user_data="close-all")
    done = {c.user_data: c for c in q.wait(min=2, timeout=30)}
    assert {k: (c.op, c.ret) for k, c in done.items()} == {
        "finish": ("finish_zone", 0), "close-all": ("close_all_zones", 0)}
    assert states(zdev, s, 2) == [S.FULL, S.CLOSED]
    q.close_zone(s + 2 * zoned.zone_size, user_data="bad")    # EMPTY: EIO
    (c,) = q.wait(min=1, timeout=30)
    assert c.ret == -errno.EIO
    q.reset_all_zones(user_data="reset")
    assert q.wait(min=1, timeout=30)[0].ret == 0
    assert states(zdev, s, 2) == [S.EMPTY, S.EMPTY]


def test_zone_calls_in_asyncio(blkio, zoned, S):
    async def main():
        async with blkio.aio.open(NVME, path=zoned.path, direct=True) as adev:
            await adev.reset_all_zones()
            zs = zoned.zone_size
            s = zone_start(zoned, 1)
            assert zoned.max_open >= 2
            await asyncio.gather(adev.open_zone(s), adev.open_zone(s + zs))
            zones = await adev.report_zones(s, 3)
            assert [int(x) for x in zones["state"]] == [S.EXP_OPEN, S.EXP_OPEN, S.EMPTY]
            # A write longer than max-transfer goes piece by piece, in order.
            n = 2 * adev.device.limits.max_transfer
            data = pattern(n, 50)
            assert await adev.write(s, data) == n
            await adev.close_zone(s + zs)
            await adev.finish_zone(s)
            zones = await adev.report_zones(s, 3)
            assert [int(x) for x in zones["state"]] == [S.FULL, S.CLOSED, S.EMPTY]
            assert np.array_equal(await adev.read(s, n), data)
            with pytest.raises(OSError) as ei:
                await adev.close_zone(s + 2 * zs)       # EMPTY -> CLOSED
            assert ei.value.errno == errno.EIO
            with pytest.raises(ValueError, match="not the start of a zone"):
                await adev.reset_zone(s + 4096)
            await adev.open_all_zones()
            assert int((await adev.report_zones(s + zs, 1))[0]["state"]) == S.EXP_OPEN
            await adev.close_all_zones()
            await adev.finish_all_zones()
            zones = await adev.report_zones(s, 3)
            assert [int(x) for x in zones["state"]] == [S.FULL, S.FULL, S.EMPTY]
            await adev.reset_zone(s)
            assert int((await adev.report_zones(s, 1))[0]["state"]) == S.EMPTY
            await adev.reset_all_zones()
            assert [int(x) for x in (await adev.report_zones())["state"]] == \
                [S.EMPTY] * zoned.nr_zones
    asyncio.run(main())


# --------------------------------------------------------------------------
# ZoneWriter and python -m blkio info
# --------------------------------------------------------------------------

def test_zone_writer_appends_across_zones(zdev, zoned, S):
    z = zoned
    first = zone_start(z, 5)
    zdev.write(first, pattern(8 * KiB, 60))        # the writer starts at the write pointer
    w = zdev.zone_writer(first, nr_zones=2)
    assert (w.zone, w.write_pointer) == (first, first + 8 * KiB)
    assert w.remaining == 2 * z.zone_capacity - 8 * KiB
    # Fill the first zone up to its capacity and go on into the second.
    n = z.zone_capacity - 8 * KiB + 64 * KiB
    data = pattern(n, 61)
    assert w.write(data) == n
    second = first + z.zone_size
    assert (w.zone, w.write_pointer) == (second, second + 64 * KiB)
    assert states(zdev, first, 2) == [S.FULL, S.IMP_OPEN]
    assert np.array_equal(zdev.read(first + 8 * KiB, z.zone_capacity - 8 * KiB),
                          data[:z.zone_capacity - 8 * KiB])
    assert np.array_equal(zdev.read(second, 64 * KiB), data[z.zone_capacity - 8 * KiB:])
    # The device's report agrees with what the writer tracked.
    assert one_zone(zdev, second)["write_pointer"] == w.write_pointer
    with pytest.raises(ValueError, match=f"only {w.remaining} bytes are left"):
        w.write(np.zeros(w.remaining + 4 * KiB, np.uint8))
    # A write behind the writer's back: the writer's next write fails with
    # EIO and it takes the device's write pointer again.
    zdev.write(w.write_pointer, pattern(4 * KiB, 62))
    with pytest.raises(OSError):
        w.write(pattern(4 * KiB, 63))
    assert w.write_pointer == second + 68 * KiB
    w.write(pattern(4 * KiB, 64))
    w.finish()
    assert states(zdev, first, 2) == [S.FULL, S.FULL]
    assert w.remaining == 0
    w.reset()
    assert states(zdev, first, 2) == [S.EMPTY, S.EMPTY]
    assert (w.write_pointer, w.remaining) == (first, 2 * z.zone_capacity)


def test_info_shows_the_zones(zdev, zoned):
    for i in range(3):
        zdev.write(zone_start(zoned, i), pattern(4 * KiB, 70 + i))
    zdev.finish_zone(zone_start(zoned, 0))
    r = subprocess.run([sys.executable, "-m", "blkio", "info", NVME, f"path={zoned.path}"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    zones = json.loads(r.stdout)["zones"]
    print(json.dumps(zones))
    assert zones["model"] == "host-managed"
    assert (zones["zone_size"], zones["nr_zones"]) == (zoned.zone_size, zoned.nr_zones)
    assert (zones["max_open_zones"], zones["max_active_zones"]) == (zoned.max_open, zoned.max_active)
    assert zones["states"] == {"empty": zoned.nr_zones - 3, "imp_open": 2, "full": 1}
