"""Static typing: the stubs of the core's compiled modules and the facade,
checked with mypy, and the stubs checked against the modules with stubtest.

mypy runs in a subprocess against the *installed* package (cwd is tmp_path,
so the source tree does not shadow it).  A typed program using the public API
of DESIGN.md section 4 must pass; a program with deliberate mistakes must be
rejected on exactly the lines that contain them; and the facade modules
themselves (``-p blkio``) must type-check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Tuple

import pytest

pytest.importorskip("mypy", reason="mypy is a test dependency (pip install '.[test]')")

GOOD = '''
from __future__ import annotations

import asyncio
import mmap
from typing import Any

from typing_extensions import assert_type  # mypy ships its stubs; never run

import numpy as np
import numpy.typing as npt

import blkio
import blkio.aio
from blkio import Buffer, BouncePool, Completion, Limits, Queue


def blocking(path: str) -> None:
    with blkio.open("io_uring", path=path, direct=True, num_entries=256) as dev:
        assert_type(dev, blkio.Device)
        assert_type(dev.driver, str)
        assert_type(dev.capacity, int)
        assert_type(dev.read_only, bool)
        assert_type(dev.closed, bool)

        limits = dev.limits
        assert_type(limits, Limits)
        align: int = limits.request_alignment
        max_transfer: int = limits.max_transfer
        pins: bool = limits.may_pin_mem_regions
        needs: bool = limits.needs_mem_regions

        buf = dev.alloc(4096)
        assert_type(buf, npt.NDArray[np.uint8])
        assert_type(dev.readinto(0, buf), int)
        assert_type(dev.readinto(0, bytearray(4096)), int)
        assert_type(dev.write(4096, buf, fua=True), int)
        dev.write(0, b"\\0" * 4096)
        dev.write(0, memoryview(bytearray(4096)))
        data = dev.read(0, 4096)
        assert_type(data, npt.NDArray[np.uint8])
        assert_type(dev.readv(0, [bytearray(512), buf[:512]]), int)
        assert_type(dev.writev(0, (b"x" * 512, data), fua=False), int)
        dev.write_zeroes(0, 4096, fua=False, may_unmap=False, no_fallback=True)
        dev.discard(0, 4096)
        dev.flush()

        mem = Buffer(8192)
        assert_type(len(mem), int)
        assert_type(mem.nbytes + mem.fd + mem.address, int)
        # numpy's stubs take any Buffer only for Python >= 3.12: go through memoryview
        view = np.frombuffer(memoryview(mem), dtype=np.uint8)
        ok: bool = dev.register(view)
        dev.readinto(0, mem)
        with mmap.mmap(-1, 4096) as m:
            dev.readinto(0, m)
        dev.unregister(view)
        assert_type(dev.mapped_regions, int)

        value = dev.get("num-entries")
        assert_type(value, bool | int | str)
        props: dict[str, bool | int | str] = dev.properties()
        stats: blkio.Stats = dev.stats
        requests: int = stats.requests

        q = dev.queue(0)
        assert_type(q, Queue)
        q.read(0, buf, user_data="first")
        q.write(4096, buf, user_data=("second", 2), fua=True)
        q.readv(0, [bytearray(4096)], user_data=3)
        q.writev(0, [b"y" * 4096], fua=False)
        q.write_zeroes(0, 4096, user_data=None, may_unmap=True)
        q.discard(0, 4096)
        q.flush(user_data=object())
        q.submit()
        done = q.wait(min=1, max=None, timeout=5.0)
        assert_type(done, list[Completion])
        for c in done:
            tag: Any = c.user_data
            assert_type(c.ret, int)
            assert_type(c.check(), int)
            assert_type(c.error_msg, str | None)
            assert_type(c.op, str)
        assert_type(q.completions(), list[Completion])
        assert_type(q.poll(max=4), list[Completion])
        q.completion_fd_enabled = True
        assert_type(q.completion_fd_enabled, bool)
        assert_type(q.completion_fd, int)
        assert_type(q.in_flight + q.index + q.depth, int)
        assert_type(q.is_poll_queue, bool)
        queues: tuple[Queue, ...] = dev.queues

        n = 8
        blocks = dev.alloc(n * 4096).reshape(n, 4096)
        offsets = np.arange(n, dtype=np.uint64) * np.uint64(4096)
        tags = np.arange(n, dtype=np.int64)
        assert_type(q.submit_reads(offsets, blocks, user_data=tags), int)
        out = np.zeros(n, dtype=np.dtype([("user_data", np.int64), ("ret", np.int32)]))
        got: int = q.reap(out, min=n, timeout=5.0)
        rets = out["ret"][:got]
        q.submit_writes(offsets, blocks, fua=True)
        q.reap(out)
        assert_type(q.failed, int)

        pool = dev.bounce_pool
        assert_type(pool, BouncePool)
        tmp = pool.acquire(4096, timeout=1.0)
        assert_type(tmp, npt.NDArray[np.uint8])
        pool.release(tmp)
        pool.max_size = 64 << 20
        assert_type(pool.size + pool.in_use + pool.granule + pool.max_size + pool.waiting, int)

        extra: Queue = dev.add_queue()
        dev.remove_queue(extra, timeout=1.0)
    driver_list: tuple[str, ...] = blkio.DRIVERS
    version: str = blkio.LIBBLKIO_VERSION
    try:
        blkio.open("virtio-blk-vhost-user", path="/tmp/sock", queue_size=512).close()
    except blkio.Error as e:
        code: int | None = e.errno


async def asynchronous(path: str) -> None:
    async with blkio.aio.open("io_uring", path=path, spin_us=10) as adev:
        assert_type(adev, blkio.aio.AsyncDevice)
        data = await adev.read(0, 4096)
        n: int = await adev.readinto(0, bytearray(4096))
        n = await adev.write(4096, data, fua=True)
        await asyncio.gather(*(adev.write(i * 4096, data) for i in range(4)))
        await adev.write_zeroes(0, 4096)
        await adev.discard(0, 4096)
        await adev.flush()
        arr = await adev.device.bounce_pool.acquire_async(4096)
        assert_type(arr, npt.NDArray[np.uint8])
        adev.device.bounce_pool.release(arr)


def zoned(path: str) -> None:
    with blkio.open("nvme-io_uring", path=path) as dev:
        model: str = dev.zone_info.model
        info = dev.zone_info
        assert_type(info, blkio.ZoneInfo)
        zone_size: int = info.zone_size
        zones = dev.report_zones(0, 4)
        assert_type(zones, np.ndarray)
        full = zones["state"] == blkio.ZoneState.FULL
        dev.open_zone(0)
        dev.close_zone(0)
        dev.finish_zone(0)
        dev.reset_zone(0)
        dev.reset_all_zones()
        counts: dict[str, int] = dev.zone_states()
        w = dev.zone_writer(0, nr_zones=2)
        assert_type(w, blkio.ZoneWriter)
        written: int = w.write(dev.alloc(4096))
        wp: int = w.write_pointer
        q = dev.queue(0)
        asked: int = q.report_zones(0, np.empty(4, blkio.ZONE_DTYPE), user_data="r")
        q.reset_zone(zone_size, user_data=1)
        q.finish_all_zones()


async def zoned_async(path: str) -> None:
    async with blkio.aio.open("nvme-io_uring", path=path) as adev:
        zones = await adev.report_zones()
        await adev.open_zone(0)
        await adev.reset_all_zones()


def run(path: str) -> None:
    blocking(path)
    asyncio.run(asynchronous(path))
'''

# Each line marked "# E" must draw a mypy error (and no other line may).
BAD = '''
from __future__ import annotations

import blkio


def wrong(path: str) -> None:
    with blkio.open("io_uring", path=path) as dev:
        buf = dev.alloc(4096)
        dev.readinto("x", buf)  # E
        dev.readinto(0, "not a buffer")  # E
        dev.write(0, buf, True)  # E
        length: str = dev.read(0, 4096)  # E
        q = dev.queue(0)
        q.read(0, buf, "positional user_data")  # E
        name: bytes = q.wait()[0].error_msg  # E
        q.completion_fd_enabled = "yes"  # E
        dev.bounce_pool.size = 4096  # E
        q.submit_reads([0.5, 4096.0], buf)  # E
        dev.limits.request_alignment = 512  # E
        dev.reset_zone()  # E
        dev.report_zones(nr_zones="all")  # E
'''


CORE_MODULES = ("_checks", "_memory", "_handle", "_pool", "_held", "_zoneops", "_batch",
                "_sharedwait", "_engine", "_reconnect", "_transfer", "_device", "_public",
                "_asyncport")
STUBS = tuple(f"{m}.pyi" for m in CORE_MODULES)
ALLOWLIST = Path(__file__).resolve().parent / "stubtest-allowlist.txt"


def test_stubs_match_the_compiled_modules(tmp_path: Path) -> None:
    """stubtest fails when a .pyi and its extension module disagree (a
    method missing from either, different parameters, a class that became
    final...).  What it may find different, and why, is in the allowlist."""
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", *(f"blkio.{m}" for m in CORE_MODULES),
         "--allowlist", str(ALLOWLIST), f"--mypy-config-file={tmp_path / 'none.ini'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _mypy(cwd: Path, *args: str) -> Tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-incremental",
         f"--cache-dir={cwd / '.mypy_cache'}", "--no-error-summary", "--show-error-codes",
         "--python-executable", sys.executable, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _error_lines(output: str, filename: str) -> List[int]:
    return sorted({int(m.group(1)) for m in
                   re.finditer(rf"^{re.escape(filename)}:(\d+): error:", output, re.M)})


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_installed_package_is_used(tmp_path: Path) -> None:
    """The check runs against site-packages, where the stubs are installed."""
    import blkio
    pkg = Path(blkio.__file__).parent
    assert pkg != Path(__file__).resolve().parent.parent / "src" / "blkio", \
        "blkio is imported from the source tree; install it (make install)"
    for name in STUBS + ("py.typed",):
        assert (pkg / name).is_file(), f"{name} is not installed in {pkg}"
    assert all((pkg / name).stat().st_size > 0 for name in STUBS)


def test_public_api_typechecks(tmp_path: Path) -> None:
    _write(tmp_path, "good.py", GOOD)
    rc, out = _mypy(tmp_path, "good.py")
    assert rc == 0, f"mypy rejected a correct program:\n{out}"


def test_type_errors_are_caught(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.py", BAD)
    expected = [i for i, line in enumerate(path.read_text().splitlines(), 1)
                if line.rstrip().endswith("# E")]
    rc, out = _mypy(tmp_path, "bad.py")
    assert rc != 0, f"mypy accepted a program with type errors:\n{out}"
    assert _error_lines(out, "bad.py") == expected, out
    assert re.search(r'bad\.py:\d+: error: Argument 1 to "readinto" of "DeviceFront" '
                     r'has incompatible type "str"; expected "SupportsIndex"', out), out


def test_facade_typechecks(tmp_path: Path) -> None:
    rc, out = _mypy(tmp_path, "-p", "blkio")
    assert rc == 0, f"mypy found type errors in the installed blkio package:\n{out}"
