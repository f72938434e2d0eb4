"""Run by tests/test_wheels.py with an installed blkio (``python -I wheel_probe.py DIR``):
import it, write and read back 64 KiB through io_uring on a file in DIR, and
print as JSON where blkio was imported from, its versions and which libblkio
files the process has mapped (/proc/self/maps).  Exits non-zero when the data
read back (or found in the file) differs from what was written."""

import importlib.metadata
import json
import os
import sys

import numpy as np

import blkio

MiB = 1 << 20


def round_trip(directory: str) -> int:
    """Bytes written at an offset, read back through blkio and from the file."""
    path = os.path.join(directory, "probe.img")
    with open(path, "wb") as f:
        f.truncate(MiB)
    data = np.frombuffer(os.urandom(64 * 1024), dtype=np.uint8).copy()
    offset = 3 * 4096
    with blkio.open("io_uring", path=path) as dev:
        dev.write(offset, data)
        back = dev.read(offset, data.nbytes)
    if bytes(back) != data.tobytes():
        sys.exit("read back through blkio differs from what was written")
    fd = os.open(path, os.O_RDONLY)
    try:
        on_disk = os.pread(fd, data.nbytes, offset)
    finally:
        os.close(fd)
    if on_disk != data.tobytes():
        sys.exit("the file holds other bytes than blkio wrote")
    return data.nbytes


def mapped_libblkio() -> list:
    with open("/proc/self/maps") as f:
        paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    return sorted(p for p in paths if "libblkio" in os.path.basename(p))


def main() -> None:
    nbytes = round_trip(sys.argv[1])
    print(json.dumps({
        "blkio_file": blkio.__file__,
        "version": blkio.__version__,
        "dist_version": importlib.metadata.version("blkio"),
        "round_trip_bytes": nbytes,
        "libblkio_maps": mapped_libblkio(),
        "prefix": sys.prefix,
    }))


if __name__ == "__main__":
    main()
