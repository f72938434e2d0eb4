"""Device lifecycle, the property catalogue, limits and errors (io_uring on real files)."""

from __future__ import annotations

import dataclasses
import errno
import os

import numpy as np
import pytest

import blkio

MiB = 1 << 20
from blkio._limits import Limits, validate


def test_drivers_lists_the_five_libblkio_drivers():
    assert blkio.DRIVERS == ("io_uring", "nvme-io_uring", "virtio-blk-vfio-pci",
                             "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa")


def test_open_returns_a_started_device_with_capacity_and_repr(image):
    with blkio.open("io_uring", path=image.path) as dev:
        assert isinstance(dev, blkio.Device)
        assert dev.state == "started"
        assert dev.driver == "io_uring"
        assert dev.capacity == image.size
        assert not dev.read_only
        r = repr(dev)
        assert "io_uring" in r and str(image.path) in r and str(image.size) in r and "started" in r
    assert "closed" in repr(dev)


def test_open_accepts_pathlike(image):
    with blkio.open("io_uring", image.path) as dev:     # pathlib.Path, positional
        assert dev.capacity == image.size


def test_close_twice_is_harmless(image):
    dev = blkio.open("io_uring", path=image.path)
    dev.close()
    dev.close()
    assert dev.closed


def test_io_on_a_closed_device_raises_a_clear_error(image):
    dev = blkio.open("io_uring", path=image.path)
    dev.close()
    with pytest.raises(ValueError, match="closed"):
        dev.read(0, 512)
    with pytest.raises(ValueError, match="closed"):
        dev.write(0, b"x" * 512)
    with pytest.raises(ValueError, match="closed"):
        dev.get("capacity")


def test_unclosed_device_warns_resourcewarning(image):
    dev = blkio.open("io_uring", path=image.path)
    with pytest.warns(ResourceWarning, match="unclosed"):
        dev.__del__()
    assert dev.closed


# ---- the catalogue and typed properties -----------------------------------

def test_driver_properties_describes_types_and_stages():
    props = blkio.driver_properties("io_uring")
    assert props["num-entries"].type == "int"
    assert props["num-entries"].writable == {"connected"}
    assert props["num-entries"].readable == {"connected", "started"}
    assert props["read-only"].writable == {"created"}
    assert props["capacity"].type == "uint64" and not props["capacity"].writable
    assert props["direct"].type == "bool"
    assert "queue-size" in blkio.driver_properties("virtio-blk-vhost-user")
    assert "direct" not in blkio.driver_properties("virtio-blk-vhost-user")
    for driver in blkio.DRIVERS:
        for spec in blkio.driver_properties(driver).values():
            assert spec.type in ("bool", "int", "uint64", "str")
            assert spec.writable <= set(blkio.STATES) and spec.readable <= set(blkio.STATES)


def test_driver_properties_of_unknown_driver_raises_valueerror():
    with pytest.raises(ValueError, match="unknown driver 'nope'"):
        blkio.driver_properties("nope")


def test_get_returns_values_typed_by_the_catalogue(image):
    with blkio.open("io_uring", path=image.path, num_entries=64) as dev:
        assert dev.get("num-entries") == 64
        assert dev.get("num_entries") == 64          # underscore alias
        assert dev.get("direct") is False
        assert dev.get("path") == str(image.path)
        assert dev.get("capacity") == image.size
        assert isinstance(dev.get("can-add-queues"), bool)


def test_properties_returns_every_readable_property(image):
    with blkio.open("io_uring", path=image.path) as dev:
        props = dev.properties()
        assert props["capacity"] == image.size
        assert props["driver"] == "io_uring"
        assert set(props) >= {"request-alignment", "max-transfer", "num-queues", "fd"}


def test_set_in_the_wrong_stage_raises_valueerror_naming_property(image):
    with blkio.open("io_uring", path=image.path) as dev:
        with pytest.raises(ValueError, match="'num-entries'.*io_uring.*connected.*started"):
            dev.set("num-entries", 32)
        with pytest.raises(ValueError, match="'capacity'.*read-only"):
            dev.set("capacity", 1)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"num_entries": "many"}, "'num-entries'.*io_uring.*int"),
    ({"num_entries": True}, "'num-entries'.*io_uring.*int"),
    ({"num_entries": 2**40}, "'num-entries'.*out of int range"),
    ({"bogus": 1}, "unknown property 'bogus' for driver 'io_uring'"),
    ({"capacity": 1}, "'capacity'.*io_uring.*read-only"),
    ({"direct": "yes"}, "'direct'.*io_uring.*bool"),
    ({"num_queues": -1}, "'num-queues'.*io_uring"),
])
def test_bad_open_arguments_raise_valueerror_before_libblkio(image, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        blkio.open("io_uring", path=image.path, **kwargs)


def test_missing_path_raises_valueerror_naming_the_driver():
    with pytest.raises(ValueError, match="'io_uring' needs 'path'"):
        blkio.open("io_uring")


def test_nonexistent_path_raises_filenotfounderror_with_the_path(tmp_path):
    missing = tmp_path / "no-such-file"
    with pytest.raises(FileNotFoundError) as info:
        blkio.open("io_uring", path=missing)
    assert info.value.errno == errno.ENOENT
    assert str(missing) in str(info.value)
    assert isinstance(info.value, blkio.Error)


def test_connect_stage_properties_are_applied(image):
    with blkio.open("io_uring", path=image.path, num_queues=2, num_entries=32) as dev:
        assert dev.get("num-queues") == 2
        assert len(dev.queues) == 2
        assert dev.get("num-entries") == 32


def test_poll_queues_on_a_regular_file_are_refused_at_open(image):
    with pytest.raises(ValueError, match="poll queues"):
        blkio.open("io_uring", path=image.path, num_poll_queues=1)


def test_open_with_fd_passes_ownership_to_libblkio(image):
    fd = os.open(image.path, os.O_RDWR | os.O_CLOEXEC)
    with blkio.open("io_uring", fd=fd) as dev:
        assert dev.capacity == image.size
        assert bytes(dev.read(0, 4096)) == image.data[:4096]
    with pytest.raises(OSError):        # libblkio closed it on destroy
        os.fstat(fd)


# ---- limits ------------------------------------------------------------------

def _check_limits_against_properties(dev):
    limits = dev.limits
    assert isinstance(limits, blkio.Limits)
    for field in dataclasses.fields(Limits):
        assert getattr(limits, field.name) == dev.get(Limits.property_name(field.name)), field.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.request_alignment = 7


def test_limits_match_libblkio_properties_on_a_buffered_file(image):
    with blkio.open("io_uring", path=image.path) as dev:
        _check_limits_against_properties(dev)
        assert dev.limits.needs_mem_regions is False


def test_limits_match_libblkio_properties_on_a_loop_device(loopdev):
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        _check_limits_against_properties(dev)
        assert dev.limits.request_alignment == 512
        assert dev.limits.buf_alignment == 512


def test_refresh_limits_rereads_limits_and_capacity(qsd, make_image):
    # vhost-user: capacity is a daemon round trip, read at open and cached
    # until refresh_limits() (a growable file's capacity follows the file).
    img = make_image(4 * MiB)
    daemon = qsd(image=img)
    with blkio.open("virtio-blk-vhost-user", path=daemon.socket) as dev:
        before = dev.limits
        assert dev.capacity == img.size
        assert dev.refresh_limits() == before
        assert dev.capacity == img.size


def test_the_capacity_of_a_file_follows_the_file(image):
    with blkio.open("io_uring", path=image.path) as dev:
        assert dev.limits.can_grow
        os.truncate(image.path, image.size * 2)
        assert dev.capacity == dev.get("capacity") == image.size * 2


@pytest.mark.parametrize("field, value, pattern", [
    ("request_alignment", 3, '"request-alignment" value 3, must be a power of 2'),
    ("optimal_io_size", 100, '"optimal-io-size" value 100, must be a multiple of 512'),
    ("max_transfer", 1000, '"max-transfer" value 1000'),
    ("buf_alignment", 0, '"buf-alignment" value 0, must be positive'),
    ("optimal_buf_alignment", 0, '"optimal-buf-alignment" value 0'),
    ("max_segments", 0, '"max-segments" value 0, must be positive'),
])
def test_invalid_limits_raise_blkio_error_naming_field_and_value(loopdev, field, value, pattern):
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        bad = dataclasses.replace(dev.limits, **{field: value})
    with pytest.raises(blkio.Error, match=pattern):
        validate(bad)


# ---- errors ------------------------------------------------------------------

def test_blkio_error_is_an_oserror_with_errno_and_builtin_subclass():
    assert issubclass(blkio.Error, OSError)
    err = blkio.errors.error_for(errno.ENOENT, "no such thing", "/x")
    assert isinstance(err, FileNotFoundError) and isinstance(err, blkio.Error)
    assert err.errno == errno.ENOENT and "/x" in str(err)


def test_write_to_read_only_device_raises_and_writes_nothing(image):
    with blkio.open("io_uring", path=image.path, read_only=True) as dev:
        assert dev.read_only
        for call in (lambda: dev.write(0, b"\0" * 4096),
                     lambda: dev.writev(0, [b"\0" * 512]),
                     lambda: dev.write_zeroes(0, 4096),
                     lambda: dev.discard(0, 4096)):
            with pytest.raises(OSError, match="read-only") as info:
                call()
            assert info.value.errno == errno.EBADF
            assert isinstance(info.value, PermissionError)
        assert bytes(dev.read(0, 4096)) == image.data[:4096]     # reads still work
        dev.flush()
    assert image.pread(0, 4096) == image.data[:4096]
