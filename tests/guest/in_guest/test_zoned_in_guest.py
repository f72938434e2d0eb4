"""Zoned namespaces (NVMe ZNS) on nvme-io_uring, inside the QEMU guest.

Two parts (issue 10):

* what blkio's public API does with a zoned namespace today: the zoned
  properties, the sysfs max-transfer cap, plain writes (which must land on
  the zone's write pointer), reads;
* what libblkio 1.5.0's zone calls (``blkioq_report_zones``, open/close/
  finish/reset of one zone or all zones) return, through the C helper
  tests/guest/zone_probe.c, until blkio wraps them: the facts the wrapper
  will rely on.

The launcher gives the guest two zoned namespaces on a second controller
(serial ``zns0``; see launcher.ZONED_NAMESPACES): nsid 1 with 16 zones of 4 MiB
(capacity 4 MiB, 4 open / 4 active), nsid 2 with 8 zones of 4 MiB holding
3 MiB each (2 open / 3 active).  Tests that write start from all zones EMPTY
(``reset-all`` through the probe).  Device-reported zone errors all come back
from libblkio as EIO.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

NVME = "nvme-io_uring"
KiB, MiB = 1 << 10, 1 << 20

# blkio.h: enum values of struct blkio_zone's zone_type and zone_state.
TYPE_SEQWRITE_REQ = 0x2
EMPTY, IMP_OPEN, EXP_OPEN, CLOSED, FULL = 0x1, 0x2, 0x3, 0x4, 0xE
# QEMU's zoned.zasl=5 on the ZNS controller: 2^5 * 4 KiB.
ZONE_APPEND_MAX = 128 * KiB

ZONED_PROPERTIES = ("zoned", "max-open-zones", "max-active-zones", "zone-size", "nr-zones",
                    "append-support", "zone-append-max-bytes")


@pytest.fixture(scope="session")
def blkio():
    import blkio as mod
    return mod


def expected_properties(z) -> dict:
    return {"zoned": 2, "max-open-zones": z.max_open, "max-active-zones": z.max_active,
            "zone-size": z.zone_size, "nr-zones": z.nr_zones, "append-support": True,
            "zone-append-max-bytes": ZONE_APPEND_MAX}


@pytest.fixture
def zdev(blkio, zoned, zone_probe):
    """A blkio device on a zoned namespace whose zones are all EMPTY."""
    zone_probe.reset_all(zoned.path)
    d = blkio.open(NVME, path=zoned.path, direct=True)
    try:
        yield d
    finally:
        d.close()


def pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def zone_start(z, index: int) -> int:
    return index * z.zone_size


# --------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------

def test_zoned_properties(blkio, zoned):
    """Device.get reads each zoned property by libblkio's (hyphenated) name;
    the values agree with QEMU's geometry and with the guest kernel's sysfs."""
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
    # The kernel's view of the same namespace.
    ns = zoned.ns
    assert ns.queue_attr("zoned") == "host-managed"
    assert int(ns.queue_attr("nr_zones")) == got["nr-zones"]
    assert int(ns.queue_attr("chunk_sectors")) * 512 == got["zone-size"]
    assert int(ns.queue_attr("max_open_zones")) == got["max-open-zones"]
    assert int(ns.queue_attr("max_active_zones")) == got["max-active-zones"]
    assert int(ns.queue_attr("zone_append_max_bytes")) == got["zone-append-max-bytes"]


def test_plain_namespace_is_not_zoned(blkio, nvme_path):
    with blkio.open(NVME, path=nvme_path, direct=True) as dev:
        got = {name: dev.get(name) for name in ZONED_PROPERTIES}
    assert got == {"zoned": 0, "max-open-zones": 0, "max-active-zones": 0, "zone-size": 0,
                   "nr-zones": 0, "append-support": False, "zone-append-max-bytes": 0}


def test_zoned_properties_by_state(zoned, zone_probe):
    """libblkio answers 0 for every zoned property before connect, even on a
    zoned namespace: the catalogue makes them readable from connect on.  After
    connect they already hold the values start gives.  The underscore
    spellings of libblkio's manual are unknown names (ENOENT)."""
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

def test_max_transfer_cap_applies_to_zoned_namespace(zdev, zoned, zone_probe):
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
    (zone,) = zone_probe.report(zoned.path, start, 1)
    assert zone["write_pointer"] == start + n
    assert np.array_equal(zdev.read(start, n), data)


# --------------------------------------------------------------------------
# plain writes and reads through blkio
# --------------------------------------------------------------------------

def test_sequential_writes_at_write_pointer(zdev, zoned, zone_probe):
    start = zone_start(zoned, 1)
    a, b = pattern(4 * KiB, 2), pattern(8 * KiB, 3)
    assert zdev.write(start, a) == a.nbytes
    assert zdev.write(start + a.nbytes, b) == b.nbytes
    assert np.array_equal(zdev.read(start, 12 * KiB), np.concatenate([a, b]))
    (zone,) = zone_probe.report(zoned.path, start, 1)
    assert zone == {"start": start, "len": zoned.zone_size, "capacity": zoned.zone_capacity,
                    "write_pointer": start + 12 * KiB, "type": TYPE_SEQWRITE_REQ,
                    "state": IMP_OPEN, "reset": 0}


def test_write_not_at_write_pointer_fails_with_eio(zdev, zoned, zone_probe):
    """The device refuses it ("Nvme Error"), and libblkio says only EIO."""
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
    (zone,) = zone_probe.report(zoned.path, start, 1)
    assert zone["write_pointer"] == start + 8 * KiB, "a failed write moved the write pointer"


def test_write_crossing_the_zone_capacity_fails_with_eio(zdev, zoned, zone_probe):
    """A write at the write pointer that runs past the zone's capacity (into
    the next zone, or into the unusable rest of this one) fails with EIO;
    one that ends at the capacity fills the zone."""
    start = zone_start(zoned, 0)
    fill = zoned.zone_capacity - 4 * KiB
    zdev.write(start, zdev.alloc(fill))
    with pytest.raises(OSError) as ei:
        zdev.write(start + fill, pattern(8 * KiB, 6))
    assert ei.value.errno == errno.EIO
    zone, after = zone_probe.report(zoned.path, start, 2)
    assert zone["write_pointer"] == start + fill, "the failed write moved the write pointer"
    assert after["state"] == EMPTY, "the failed write went on into the next zone"
    zdev.write(start + fill, pattern(4 * KiB, 7))
    (zone,) = zone_probe.report(zoned.path, start, 1)
    assert zone["state"] == FULL
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


def test_active_zone_limit(zdev, zoned, zone_probe):
    """Writes open zones implicitly; with max-active zones open or closed, a
    write to one more EMPTY zone fails with EIO."""
    limit = zdev.get("max-active-zones")
    assert 0 < limit < zoned.nr_zones
    for i in range(limit):
        zdev.write(zone_start(zoned, i), pattern(4 * KiB, 10 + i))
    with pytest.raises(OSError) as ei:
        zdev.write(zone_start(zoned, limit), pattern(4 * KiB, 20))
    assert ei.value.errno == errno.EIO
    zones = zone_probe.report(zoned.path, 0, limit + 1)
    assert [z["state"] in (IMP_OPEN, CLOSED) for z in zones] == [True] * limit + [False]
    assert zones[limit]["state"] == EMPTY


# --------------------------------------------------------------------------
# libblkio's zone calls (through zone_probe.c)
# --------------------------------------------------------------------------

def test_report_zones(zoned, zone_probe):
    z, path = zoned, zoned.path
    zone_probe.reset_all(path)
    full, inside, tail, past, none = zone_probe.run(
        path,
        f"report 0 {z.nr_zones + 2}",            # more zones asked than exist
        f"report {z.zone_size + 5000} 1",        # an offset inside zone 1
        f"report {z.size - z.zone_size} 4",      # the last zone, 4 asked
        f"report {z.size} 1",                    # at the end
        "report 0 0")
    # ret is the number of zones filled in; the rest of the array is untouched.
    assert full["ret"] == z.nr_zones, full
    assert full["zones"][:z.nr_zones] == [
        {"start": i * z.zone_size, "len": z.zone_size, "capacity": z.zone_capacity,
         "write_pointer": i * z.zone_size, "type": TYPE_SEQWRITE_REQ, "state": EMPTY,
         "reset": 0} for i in range(z.nr_zones)]
    assert full["zones"][z.nr_zones]["start"] == 0xAAAAAAAAAAAAAAAA
    # The offset is rounded down to its zone's start.
    assert inside["ret"] == 1 and inside["zones"][0]["start"] == z.zone_size
    assert tail["ret"] == 1 and tail["zones"][0]["start"] == z.size - z.zone_size
    assert past["ret"] == -errno.EINVAL, past
    assert none["ret"] == 0


def test_zone_management(zoned, zone_probe):
    z, path = zoned, zoned.path
    zone_probe.reset_all(path)
    s = zone_start(z, 1)
    res = zone_probe.run(
        path,
        *[f"{op} {s + 4096}" for op in ("open", "close", "finish", "reset")],
        *[f"{op} {z.size}" for op in ("open", "reset")],
        f"close {s}",                            # EMPTY -> CLOSED: invalid transition
        f"open {s}", f"report {s} 1",
        f"close {s}", f"report {s} 1",
        f"finish {s}", f"report {s} 1",
        f"write {s} 4096 1",
        f"reset {s}", f"report {s} 1", f"read {s} 4096")
    by = iter(res)
    for op in ("open", "close", "finish", "reset"):
        r = next(by)
        # Not a zone start: ENOTSUP (not EINVAL).
        assert r["ret"] == -errno.ENOTSUP, r
    for op in ("open", "reset"):
        r = next(by)
        assert r["ret"] == -errno.EINVAL, r     # past the end: "LBA out of range"
    r = next(by)
    assert r["ret"] == -errno.EIO, r
    opened, rep_open, closed, rep_closed, finished, rep_full, write_full, reset, rep_reset, \
        read = by
    for r in (opened, closed, finished, reset):
        assert r["ret"] == 0, r
    assert rep_open["zones"][0]["state"] == EXP_OPEN
    # QEMU keeps an explicitly opened zone that was never written CLOSED
    # (not EMPTY) when it is closed.
    assert rep_closed["zones"][0]["state"] == CLOSED
    assert rep_closed["zones"][0]["write_pointer"] == s
    assert rep_full["zones"][0]["state"] == FULL
    assert rep_full["zones"][0]["write_pointer"] == s + z.zone_size
    assert write_full["ret"] == -errno.EIO, write_full
    assert rep_reset["zones"][0]["state"] == EMPTY
    assert rep_reset["zones"][0]["write_pointer"] == s
    assert read["ret"] == 0 and read["zeroes"]


def test_all_zones_variants(zoned, zone_probe, blkio):
    """close/open/finish/reset of all zones act on the active zones only;
    EMPTY zones stay EMPTY."""
    z, path = zoned, zoned.path
    zone_probe.reset_all(path)
    with blkio.open(NVME, path=path, direct=True) as dev:
        for i in (1, 2):
            dev.write(zone_start(z, i), pattern(4 * KiB, 30 + i))
    states = []
    for op in ("close-all", "open-all", "finish-all", "reset-all"):
        r, rep = zone_probe.run(path, op, "report 0 3")
        assert r["ret"] == 0, r
        states.append([zz["state"] for zz in rep["zones"][:3]])
    assert states == [[EMPTY, CLOSED, CLOSED], [EMPTY, EXP_OPEN, EXP_OPEN],
                      [EMPTY, FULL, FULL], [EMPTY, EMPTY, EMPTY]]


def test_open_limit_and_open_all_beyond_it(zns_small_capacity, zone_probe, blkio):
    """Explicit opens past max-open fail with EIO; open-all with more CLOSED
    zones than max-open fails with EIO after opening max-open of them."""
    z, path = zns_small_capacity, zns_small_capacity.path
    assert 0 < z.max_open < z.max_active
    zone_probe.reset_all(path)
    res = zone_probe.run(path, *[f"open {zone_start(z, i)}" for i in range(z.max_open + 1)])
    assert [r["ret"] for r in res] == [0] * z.max_open + [-errno.EIO]
    zone_probe.reset_all(path)
    with blkio.open(NVME, path=path, direct=True) as dev:
        for i in range(z.max_active):
            dev.write(zone_start(z, i), pattern(4 * KiB, 40 + i))
    res = zone_probe.run(path, "close-all", "open-all", f"report 0 {z.max_active}")
    assert res[0]["ret"] == 0, res[0]
    assert res[1]["ret"] == -errno.EIO, res[1]
    states = [zz["state"] for zz in res[2]["zones"][:z.max_active]]
    assert sorted(states) == sorted([EXP_OPEN] * z.max_open + [CLOSED] * (z.max_active - z.max_open))


def test_plain_namespace_refuses_zone_requests(nvme_path, zone_probe):
    res = zone_probe.run(nvme_path, "report 0 1",
                         *[f"{op} 0" for op in ("open", "close", "finish", "reset")],
                         "open-all", "close-all", "finish-all", "reset-all")
    assert [r["ret"] for r in res] == [-errno.ENOTSUP] * 9, res
