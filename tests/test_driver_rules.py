"""Option rules of every driver (DESIGN 4), tested everywhere: they are checked
before libblkio runs, or answered by libblkio without hardware.  Also the
property catalogue and that failing opens leak no file descriptors."""

from __future__ import annotations

import dataclasses
import gc
import os

import pytest

import blkio
from blkio import _connect
from blkio._drivers import DRIVER_FACTS

DRIVERS = blkio.DRIVERS
NON_IO_URING = [d for d in DRIVERS if d != "io_uring"]
MISSING = "/nonexistent-blkio-test-dir/no-such-device"


@pytest.fixture(autouse=True)
def _collect_garbage():
    """Collect at each test's teardown, so that a Device a failing open left
    unclosed warns (ResourceWarning) in the test that made it, not later."""
    yield
    gc.collect()


def _open_error(driver: str, *args, **kwargs) -> BaseException:
    """The exception of an open that must fail.  Its traceback chain is
    dropped and garbage collected at once, so that a half-made Device the
    failure left unclosed warns (ResourceWarning -> error) in this test."""
    try:
        dev = blkio.open(driver, *args, **kwargs)
    except Exception as e:              # noqa: BLE001 - returned to the test
        err: BaseException = e
    else:
        dev.close()
        pytest.fail(f"blkio.open({driver!r}, {args}, {kwargs}) succeeded")
    seen = err
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    if not isinstance(err, ValueError):     # ValueErrors come before any Device exists
        gc.collect()
    return err


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_drivers_are_the_five_libblkio_drivers():
    assert set(DRIVERS) == {"io_uring", "nvme-io_uring", "virtio-blk-vfio-pci",
                            "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa"}


def test_unknown_driver_raises_value_error():
    with pytest.raises(ValueError, match="no-such-driver"):
        blkio.open("no-such-driver", "/dev/null")


@pytest.mark.parametrize("driver", DRIVERS)
def test_missing_path_raises_value_error_naming_the_driver(driver):
    with pytest.raises(ValueError) as ei:
        blkio.open(driver)
    assert driver in str(ei.value)
    assert "path" in str(ei.value)


@pytest.mark.parametrize("driver", NON_IO_URING)
def test_direct_false_raises_value_error_for_non_io_uring_drivers(driver):
    with pytest.raises(ValueError) as ei:
        blkio.open(driver, MISSING, direct=False)
    assert driver in str(ei.value)
    assert "direct" in str(ei.value)


def test_io_uring_accepts_direct_false(image):
    with blkio.open("io_uring", image.path, direct=False) as dev:
        assert dev.get("direct") is False


@pytest.mark.parametrize("driver", DRIVERS)
def test_unknown_property_raises_value_error_naming_property_and_driver(driver):
    with pytest.raises(ValueError) as ei:
        blkio.open(driver, MISSING, no_such_knob=1)
    msg = str(ei.value)
    assert "no_such_knob" in msg or "no-such-knob" in msg
    assert driver in msg


@pytest.mark.parametrize("driver", DRIVERS)
def test_wrong_type_num_entries_raises_value_error(driver):
    with pytest.raises(ValueError) as ei:
        blkio.open(driver, MISSING, num_entries="x")
    msg = str(ei.value)
    assert "num-entries" in msg or "num_entries" in msg
    assert driver in msg


@pytest.mark.parametrize("driver,prop", [
    ("io_uring", "num_entries"), ("nvme-io_uring", "num_entries"),
    ("virtio-blk-vfio-pci", "queue_size"), ("virtio-blk-vhost-user", "queue_size"),
    ("virtio-blk-vhost-vdpa", "queue_size"),
])
@pytest.mark.parametrize("bad", ["x", 1.5, True, 2**40])
def test_wrong_type_or_range_of_a_known_property_raises_value_error(driver, prop, bad):
    with pytest.raises(ValueError) as ei:
        blkio.open(driver, MISSING, **{prop: bad})
    msg = str(ei.value)
    assert prop.replace("_", "-") in msg and driver in msg


@pytest.mark.parametrize("driver", DRIVERS)
def test_read_only_property_raises_value_error(driver):
    with pytest.raises(ValueError) as ei:
        blkio.open(driver, MISSING, capacity=1)
    assert "capacity" in str(ei.value) and driver in str(ei.value)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("name", ["read-only", "num-queues", "num-poll-queues"])
def test_open_arguments_cannot_be_passed_as_properties(driver, name):
    value = True if name == "read-only" else 1
    with pytest.raises(ValueError) as ei:
        blkio.open(driver, MISSING, **{name: value})
    assert name in str(ei.value) and driver in str(ei.value)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("kwargs", [dict(num_queues=-1), dict(num_queues="2"),
                                    dict(num_poll_queues=-1), dict(direct="yes")])
def test_bad_open_arguments_raise_value_error(driver, kwargs):
    with pytest.raises(ValueError):
        blkio.open(driver, MISSING, **kwargs)


def test_io_uring_path_and_fd_together_raise_value_error(image):
    fd = os.open(image.path, os.O_RDWR)
    try:
        with pytest.raises(ValueError):
            blkio.open("io_uring", image.path, fd=fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("driver", NON_IO_URING)
def test_fd_is_refused_for_non_io_uring_drivers(driver):
    with pytest.raises(ValueError) as ei:
        blkio.open(driver, MISSING, fd=0)
    assert driver in str(ei.value)


def test_nonexistent_path_on_io_uring_raises_file_not_found_error():
    with pytest.raises(FileNotFoundError) as ei:
        blkio.open("io_uring", MISSING)
    assert MISSING in str(ei.value)
    assert isinstance(ei.value, blkio.Error)
    assert ei.value.errno == 2


@pytest.mark.parametrize("driver", DRIVERS)
def test_nonexistent_path_raises_oserror_containing_the_path(driver):
    with pytest.raises(OSError) as ei:
        blkio.open(driver, MISSING)
    assert MISSING in str(ei.value)


@pytest.mark.parametrize("driver", NON_IO_URING)
def test_wrong_kind_of_path_raises_oserror_containing_the_path(driver, tmp_path):
    # A regular file where a char device, sysfs dir, socket or vDPA node is
    # expected: libblkio refuses it; the error must say which path, and come
    # from libblkio (blkio.Error), not from cleaning up after it.
    regular = tmp_path / "regular.img"
    regular.write_bytes(bytes(1 << 20))
    err = _open_error(driver, regular)
    assert isinstance(err, OSError), repr(err)
    assert str(regular) in str(err), repr(err)
    assert isinstance(err, blkio.Error), repr(err)


def _failing_opens(driver: str, regular: str):
    """A mix of opens that fail: rule violations before libblkio, and
    libblkio refusing the path."""
    attempts = [
        lambda: _open_error(driver),
        lambda: _open_error(driver, MISSING, no_such_knob=1),
        lambda: _open_error(driver, MISSING, capacity=1),
        lambda: _open_error(driver, MISSING),
    ]
    if driver != "io_uring":
        attempts.append(lambda: _open_error(driver, MISSING, direct=False))
        attempts.append(lambda: _open_error(driver, regular))
    else:
        attempts.append(lambda: _open_error(driver, os.path.dirname(regular)))   # a directory
    return attempts


@pytest.mark.parametrize("driver", DRIVERS)
def test_failing_opens_leak_no_file_descriptors(driver, tmp_path):
    regular = tmp_path / "regular.img"
    regular.write_bytes(bytes(1 << 20))
    attempts = _failing_opens(driver, str(regular))
    for attempt in attempts:           # warm up lazy imports / caches
        attempt()
    before = _fd_count()
    for _ in range(20):
        for attempt in attempts:
            assert isinstance(attempt(), (ValueError, OSError))
    gc.collect()
    assert _fd_count() == before


def test_failing_opens_of_every_driver_leak_no_file_descriptors(tmp_path):
    regular = tmp_path / "regular.img"
    regular.write_bytes(bytes(1 << 20))
    gc.collect()
    before = _fd_count()
    for _ in range(20):
        for driver in DRIVERS:
            for attempt in _failing_opens(driver, str(regular)):
                assert isinstance(attempt(), (ValueError, OSError))
    gc.collect()
    assert _fd_count() == before


def test_open_and_close_leave_no_file_descriptors_behind(image):
    # close() must release the device's fds (file, io_uring, eventfd, and
    # the memfds of its bounce pool / arena) without waiting for the GC.
    with blkio.open("io_uring", image.path) as dev:
        dev.read(0, 4096)
    del dev
    gc.collect()
    before = _fd_count()
    for _ in range(20):
        dev = blkio.open("io_uring", image.path)
        dev.readinto(0, bytearray(4096))        # bounced: uses the pool
        dev.close()
    after_close = _fd_count()
    del dev
    gc.collect()
    assert _fd_count() == before, "fds leak even after garbage collection"
    assert after_close - before <= 1, (
        f"{after_close - before} fds still open after 20 open/close cycles "
        f"(released only by the cyclic garbage collector)")


# ---------------------------------------------------------------------------
# The property catalogue


@pytest.mark.parametrize("driver", DRIVERS)
def test_driver_properties_include_path_with_valid_types(driver):
    props = blkio.driver_properties(driver)
    assert "path" in props
    assert props["path"].type == "str"
    for name, spec in props.items():
        assert spec.name == name
        assert spec.type in ("bool", "int", "uint64", "str"), (name, spec.type)
        assert spec.python_type in (bool, int, str)
        assert set(spec.readable) <= set(blkio.STATES)
        assert set(spec.writable) <= set(blkio.STATES)


@pytest.mark.parametrize("driver", DRIVERS)
def test_driver_properties_mark_capacity_read_only_and_num_queues_writable(driver):
    props = blkio.driver_properties(driver)
    assert not props["capacity"].writable
    assert "started" in props["capacity"].readable
    assert props["num-queues"].writable == frozenset({"connected"})
    assert props["read-only"].writable == frozenset({"created"})


def test_driver_properties_is_a_copy():
    props = blkio.driver_properties("io_uring")
    props.pop("path")
    assert "path" in blkio.driver_properties("io_uring")


def test_driver_properties_of_unknown_driver_raises_value_error():
    with pytest.raises(ValueError):
        blkio.driver_properties("floppy")


def test_driver_specific_properties_are_where_they_belong():
    assert "direct" in blkio.driver_properties("io_uring")
    assert "num-entries" in blkio.driver_properties("nvme-io_uring")
    for d in ("virtio-blk-vfio-pci", "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa"):
        props = blkio.driver_properties(d)
        assert "queue-size" in props and "num-entries" not in props and "direct" not in props


def test_nvme_zoned_properties_use_libblkio_names():
    """libblkio 1.5.0 spells the zoned properties with hyphens (its manual's
    underscores are unknown to it: checked in the guest, test_zoned_in_guest)."""
    props = blkio.driver_properties("nvme-io_uring")
    expected = {"zoned": "int", "max-open-zones": "int", "max-active-zones": "int",
                "zone-size": "uint64", "nr-zones": "uint64", "append-support": "bool",
                "zone-append-max-bytes": "uint64"}
    for name, type_ in expected.items():
        spec = props[name]
        assert spec.type == type_, name
        assert not spec.writable, name
        # 0 before connect on a zoned namespace too: not readable when created.
        assert spec.readable == frozenset({"connected", "started"}), name
    assert blkio._drivers.lookup("nvme-io_uring", "zone_size").name == "zone-size"
    for d in DRIVERS:
        if d != "nvme-io_uring":
            assert not set(expected) & set(blkio.driver_properties(d)), d


# ---------------------------------------------------------------------------
# Driver facts and connect functions: the rules are data, one connect per family


def _with_facts(monkeypatch, driver: str, **changes) -> None:
    """Change one driver's facts for this test (the table, not the code)."""
    facts = blkio._drivers.DRIVER_FACTS[driver]
    monkeypatch.setitem(blkio._drivers.DRIVER_FACTS, driver, dataclasses.replace(facts, **changes))


def test_every_driver_has_facts_and_a_connect_function():
    assert set(DRIVER_FACTS) == set(DRIVERS)
    assert set(_connect.CONNECT) == set(DRIVERS)
    # One connect function per family, as QEMU's blkio_file_open table has them.
    families = {d: DRIVER_FACTS[d].family for d in DRIVERS}
    assert set(families.values()) == {"io_uring", "nvme-io_uring", "virtio-blk"}
    for driver in DRIVERS:
        same_family = [d for d in DRIVERS if families[d] == families[driver]]
        assert {_connect.CONNECT[d] for d in same_family} == {_connect.CONNECT[driver]}
    assert len(set(_connect.CONNECT.values())) == 3


@pytest.mark.parametrize("driver", DRIVERS)
def test_queue_depth_property_is_a_connected_stage_int_of_the_driver(driver):
    spec = blkio.driver_properties(driver)[DRIVER_FACTS[driver].queue_depth_property]
    assert spec.type == "int" and spec.writable == frozenset({"connected"})


def test_queue_slots_are_the_queue_depth_property(image):
    with blkio.open("io_uring", image.path, num_entries=64) as dev:
        assert dev.queue(0).depth == dev.get("num-entries") == 64


def test_fd_passing_drivers_take_a_path_and_no_fd():
    for driver in DRIVERS:
        facts = DRIVER_FACTS[driver]
        # blkio opens the path and passes the fd; a caller's fd has no place.
        assert not (facts.passes_fd and facts.fd_instead_of_path), driver


def test_refuses_buffered_fact_drives_the_direct_rule(monkeypatch, image):
    _with_facts(monkeypatch, "io_uring", refuses_buffered=True)
    err = _open_error("io_uring", image.path, direct=False)
    assert isinstance(err, ValueError) and "direct=False" in str(err)
    _with_facts(monkeypatch, "virtio-blk-vhost-vdpa", refuses_buffered=False)
    err = _open_error("virtio-blk-vhost-vdpa", MISSING, direct=False)
    assert isinstance(err, blkio.Error) and MISSING in str(err)     # libblkio's answer


def test_fd_instead_of_path_fact_drives_the_path_and_fd_rules(monkeypatch, image):
    fd = os.open(image.path, os.O_RDWR)
    try:
        with blkio.open("io_uring", fd=fd) as dev:
            assert bytes(dev.read(0, 4096)) == image.data[:4096]
        fd = -1                         # libblkio owned it and closed it
        _with_facts(monkeypatch, "io_uring", fd_instead_of_path=False)
        err = _open_error("io_uring", fd=0)
        assert isinstance(err, ValueError) and str(err) == "driver 'io_uring' needs 'path'"
        err = _open_error("io_uring", image.path, fd=0)
        assert isinstance(err, ValueError) and "pass 'path'" in str(err)
        with blkio.open("io_uring", image.path) as dev:
            assert bytes(dev.read(0, 4096)) == image.data[:4096]
    finally:
        if fd >= 0:
            os.close(fd)
