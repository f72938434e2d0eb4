"""The public surface refuses ordinary mistakes cleanly (issue 28).

Classes built directly, out-of-range op codes, wrong types, pickling, a
device used in the child of a fork(), Ctrl-C in long blocking calls, batch
offsets of the wrong type, zero-length requests, ``zoned`` as a bool, and
devices that can grow.  Anything that crashed before the fix runs in a child
interpreter, so that a regression fails one test, not the run.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import blkio
import blkio.aio
import blkio.errors

from conftest import require

KiB = 1024
MiB = 1 << 20
GiB = 1 << 30
BS = 4096


def run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; a crash shows as a negative returncode."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def dev(image):
    with blkio.open("io_uring", path=image.path) as d:
        yield d


# ---- classes built directly -------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: blkio.Queue(),
    lambda: blkio.Completion(),
    lambda: blkio.Device(),
    lambda: blkio.BouncePool(None, 4096, 4096, 8192),
    lambda: blkio.ZoneWriter(0, 0),
], ids=["Queue", "Completion", "Device", "BouncePool", "ZoneWriter"])
def test_a_public_class_built_directly_is_a_type_error(make):
    with pytest.raises(TypeError):
        make()


def test_a_queue_made_without_a_device_refuses_every_call_in_a_child():
    proc = run_child("""
        import blkio
        q = blkio.Queue.__new__(blkio.Queue)
        for call in (q.submit, lambda: q.read(0, bytearray(4096)), lambda: q.completion_fd,
                     lambda: q.wait(0), lambda: q.completions(), lambda: q.reap(None)):
            try:
                call()
            except ValueError as e:
                assert "belongs to no device" in str(e), e
            else:
                raise SystemExit("accepted")
        assert q.removed
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.parametrize("call,says", [
    ("enqueue_zone(-1)", "is not a zone request"), ("enqueue(-1, 0, bytearray(4096))", "unknown op"),
    ("enqueue_zone(2**31 - 1)", "is not a zone request"), ("enqueue(99)", "unknown op"),
], ids=["zone-minus-1", "enqueue-minus-1", "zone-big", "enqueue-99"])
def test_an_op_code_out_of_range_is_a_value_error_not_a_crash(image, call, says):
    # -1 used to pass the range check (Cython compared it as an unsigned enum)
    # and index the op names out of bounds: a segfault.
    proc = run_child(f"""
        import sys, blkio
        with blkio.open("io_uring", path=sys.argv[1]) as dev:
            try:
                dev.queue(0).{call}
            except ValueError as e:
                print("ValueError", e)
    """, str(image.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ValueError"), proc.stdout + proc.stderr
    # the op check itself, not a later one (on a device that is not zoned,
    # the zone check refused -1 too, with "not zoned", and hid a gap here)
    assert says in proc.stdout, proc.stdout


# ---- wrong types --------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda d: d.get(None),
    lambda d: d.set(None, 1),
    lambda d: d.get(4096),
    lambda d: blkio.Limits.property_name(None),
    lambda d: blkio.driver_properties(None),
    lambda d: blkio.open(None),
    lambda d: blkio.ZoneWriter(0, 0),
    lambda d: d.read(0.0, BS),
    lambda d: d.readinto(True, bytearray(BS)),
], ids=["get", "set", "get-int", "property_name", "driver_properties", "open", "ZoneWriter",
        "read-float", "readinto-bool"])
def test_a_wrong_type_is_a_type_error(dev, call):
    with pytest.raises(TypeError):
        call(dev)


def test_limits_property_name_refuses_a_name_that_is_not_a_field():
    assert blkio.Limits.property_name("max_transfer") == "max-transfer"
    with pytest.raises(ValueError, match="not a field"):
        blkio.Limits.property_name("capacity")


# ---- zoned is a bool ------------------------------------------------------------

def test_zoned_is_a_bool_and_the_model_a_string(dev):
    assert dev.zoned is False
    assert not dev.zoned
    assert dev.zone_info.model == "none"


# ---- pickling -------------------------------------------------------------------

def test_devices_queues_pools_buffers_and_completions_refuse_pickling_saying_why(dev):
    q = dev.queue(0)
    q.read(0, dev.alloc(BS))
    completion = q.wait()[0]
    for obj, word in ((dev, "open the device"), (q, "queue"), (dev.bounce_pool, "device"),
                      (blkio.Buffer(BS), "memory"), (completion, "user_data")):
        with pytest.raises(TypeError, match="cannot be pickled") as ei:
            pickle.dumps(obj)
        assert word in str(ei.value)


def test_an_async_device_refuses_pickling(image):
    async def main():
        async with blkio.aio.open("io_uring", path=image.path) as adev:
            with pytest.raises(TypeError, match="cannot be pickled"):
                pickle.dumps(adev)
    asyncio.run(main())


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC] + sorted(blkio.errors.ERRNO_CLASSES))
def test_every_error_round_trips_through_pickle_with_class_errno_and_message(code):
    e = blkio.errors.error_for(code, "read of 4096 bytes at offset 0 failed")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is type(e)
    assert (back.errno, str(back)) == (e.errno, str(e))
    assert isinstance(back, blkio.Error)
    # importable by the name it pickles under
    module = sys.modules[type(e).__module__]
    assert getattr(module, type(e).__qualname__) is type(e)


def test_read_only_error_and_batch_error_attributes_round_trip():
    e = blkio.ReadOnlyError(errno.EBADF, "write refused: device is read-only (io_uring)")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is blkio.ReadOnlyError and back.errno == errno.EBADF and str(back) == str(e)
    e = blkio.errors.error_for(errno.EIO, "read failed")
    e.index, e.offset = 3, 12288
    back = pickle.loads(pickle.dumps(e))
    assert (back.index, back.offset) == (3, 12288)


def test_an_error_crosses_a_process_pool(image):
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(FileNotFoundError) as ei:
            pool.submit(blkio.open, "io_uring", str(image.path) + ".missing").result(60)
    assert isinstance(ei.value, blkio.Error) and ei.value.errno == errno.ENOENT


# ---- fork -------------------------------------------------------------------------

FORK_CHILD = """
    import os, sys, threading, time
    import numpy as np
    import blkio
    driver, path = sys.argv[1], sys.argv[2]
    dev = blkio.open(driver, path=path)
    q = dev.queue(0)
    buf = dev.alloc(4096)
    expect = dev.read(0, 4096).copy()
    stop = threading.Event()
    errors = []

    def parent_io():        # the parent keeps reading while the child tries
        try:
            while not stop.is_set():
                dev.readinto(0, buf)
                assert (buf == expect).all()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=parent_io)
    t.start()
    time.sleep(0.05)
    pid = os.fork()
    if pid == 0:
        code = 0
        calls = [lambda: dev.read(0, 4096), lambda: dev.readinto(0, buf), lambda: dev.write(0, buf),
                 lambda: q.read(0, buf), lambda: q.submit(), lambda: q.wait(0),
                 lambda: dev.alloc(4096), lambda: dev.get("capacity"), lambda: dev.queue(0),
                 lambda: dev.flush(), lambda: dev.bounce_pool.acquire(4096, timeout=1)]
        for i, call in enumerate(calls):
            try:
                call()
                print("child: call", i, "was accepted", flush=True)
                code = 3
            except ValueError as e:
                if "before a fork()" not in str(e) or "open the device again" not in str(e):
                    print("child: call", i, "said", e, flush=True)
                    code = 4
        if not dev.closed:
            print("child: not closed", flush=True)
            code = 5
        dev.close()          # releases nothing of the parent's
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    time.sleep(0.2)          # the parent goes on after the child's exit
    stop.set()
    t.join(10)
    assert not errors, errors
    assert (dev.read(0, 4096) == expect).all()
    q.read(0, buf)
    assert q.wait()[0].ret == 0
    dev.close()
    print("child status", os.waitstatus_to_exitcode(status))
"""


def test_a_device_used_after_fork_refuses_in_the_child_and_the_parent_goes_on(image):
    proc = run_child(FORK_CHILD, "io_uring", str(image.path), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "child status 0" in proc.stdout, proc.stdout + proc.stderr


def test_a_vhost_user_device_used_after_fork_refuses_in_the_child_and_the_parent_goes_on(qsd):
    daemon = qsd()
    proc = run_child(FORK_CHILD, "virtio-blk-vhost-user", daemon.socket, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "child status 0" in proc.stdout, proc.stdout + proc.stderr


def test_a_child_that_exits_without_closing_leaves_the_parent_device_working(image):
    proc = run_child("""
        import os, sys, warnings
        import blkio
        warnings.simplefilter("error")
        dev = blkio.open("io_uring", path=sys.argv[1])
        if os.fork() == 0:
            del dev          # the child's finalizer: no warning, no libblkio call
            import gc; gc.collect()
            sys.exit(0)
        _, status = os.wait()
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(dev.read(0, 4096)) == 4096
        dev.close()
        print("ok")
    """, str(image.path))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# ---- Ctrl-C within a fraction of a second, on every long blocking path ------------

CTRL_C_CHILD = """
    import os, signal, sys, threading, time
    import numpy as np
    import blkio
    driver, path, how = sys.argv[1], sys.argv[2], sys.argv[3]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    props = {"direct": True} if how == "direct" else {}
    with blkio.open(driver, path=path, **props) as dev:
        sent = []
        def interrupt():
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)
        threading.Timer(0.5, interrupt).start()
        t0 = time.monotonic()
        try:
            if how == "buffered":
                buf = np.empty(1 << 30, np.uint8)
                for i in range(16):
                    dev.readinto(i << 30, buf)
            else:
                dev.read(0, 2 << 30)
            print("finished", f"{time.monotonic() - t0:.3f}")
        except KeyboardInterrupt:
            print("interrupted", f"{time.monotonic() - sent[0]:.3f}",
                  dev.queue(0).in_flight, dev.bounce_pool.in_use)
"""


@pytest.mark.parametrize("how", ["buffered", "direct"])
def test_ctrl_c_interrupts_a_long_io_uring_read_within_a_fraction_of_a_second(tmp_path, how):
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(16 * GiB)         # holes: read as fast as the page cache allows
    proc = run_child(CTRL_C_CHILD, "io_uring", str(path), how)
    words = proc.stdout.split()
    assert proc.returncode == 0 and words and words[0] == "interrupted", proc.stdout + proc.stderr
    late, inflight, pool = float(words[1]), int(words[2]), int(words[3])
    # The goal is 0.25 s; a loose bound here (the machine is shared), and
    # the figures go to the docs.  Before the fix: 2.4 s, or the whole read.
    assert late < 1.0, f"Ctrl-C took {late:.3f} s"
    assert (inflight, pool) == (0, 0), proc.stdout


def test_ctrl_c_interrupts_a_long_vhost_user_read_within_a_fraction_of_a_second(qsd, tmp_path):
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(4 * GiB)
    daemon = qsd(image=str(path))
    proc = run_child(CTRL_C_CHILD, "virtio-blk-vhost-user", daemon.socket, "direct")
    words = proc.stdout.split()
    assert proc.returncode == 0 and words and words[0] == "interrupted", proc.stdout + proc.stderr
    assert float(words[1]) < 1.0, f"Ctrl-C took {words[1]} s"


# ---- one checker for batch offsets, blocking and asyncio ---------------------------

BAD_OFFSETS = [
    (np.array([0.0, 4096.7]), TypeError),
    ([0.0, 4096], TypeError),
    ([True, 4096], TypeError),
    (np.array([True, False]), TypeError),
    ([-1, 4096], ValueError),
    (np.array([-4096, 0]), ValueError),
    ([2**64, 0], ValueError),
    ("ab", TypeError),
    (None, TypeError),
    ([[0], [4096]], TypeError),
]


@pytest.mark.parametrize("offsets,exc", BAD_OFFSETS, ids=[repr(o) for o, _ in BAD_OFFSETS])
def test_bad_batch_offsets_are_refused_alike_by_submit_reads_and_read_batch(image, offsets, exc):
    with blkio.open("io_uring", path=image.path) as dev:
        rows = dev.alloc(2 * BS).reshape(2, BS)
        with pytest.raises(exc):
            dev.queue(0).submit_reads(offsets, rows)
        assert dev.queue(0).in_flight == 0

    async def main():
        async with blkio.aio.open("io_uring", path=image.path) as adev:
            rows = adev.alloc(2 * BS).reshape(2, BS)
            with pytest.raises(exc):
                await adev.read_batch(offsets, rows)
            assert adev.queue.in_flight == 0
    asyncio.run(main())


@pytest.mark.parametrize("offsets", [[0, 4096], np.array([0, 4096], np.int32),
                                     np.array([0, 4096], np.uint64), range(0, 8192, 4096)],
                         ids=["list", "int32", "uint64", "range"])
def test_integer_offsets_of_any_kind_keep_working(image, offsets):
    with blkio.open("io_uring", path=image.path) as dev:
        rows = dev.alloc(2 * BS).reshape(2, BS)
        q = dev.queue(0)
        assert q.submit_reads(offsets, rows) == 2
        out = np.zeros(2, [("user_data", np.int64), ("ret", np.int32)])
        assert q.reap(out, 2) == 2 and (out["ret"] == 0).all()
        assert rows.tobytes() == image.data[:2 * BS]

    async def main():
        async with blkio.aio.open("io_uring", path=image.path) as adev:
            rows = adev.alloc(2 * BS).reshape(2, BS)
            assert await adev.read_batch(offsets, rows) == 2 * BS
            assert rows.tobytes() == image.data[:2 * BS]
    asyncio.run(main())


# ---- zero-length requests behave alike -----------------------------------------------

def test_zero_length_reads_are_empty_in_every_api(image):
    with blkio.open("io_uring", path=image.path) as dev:
        assert dev.read(BS, 0).size == 0
        assert dev.readinto(BS, bytearray(0)) == 0
        q = dev.queue(0)
        assert q.read(BS, bytearray(0)) == 0
        assert q.wait()[0].ret == 0

    async def main():
        async with blkio.aio.open("io_uring", path=image.path) as adev:
            out = await adev.read(BS, 0)
            assert isinstance(out, np.ndarray) and out.size == 0
            assert await adev.readinto(BS, bytearray(0)) == 0
            with pytest.raises(TypeError):
                await adev.read(1.5, 0)      # the offset is still checked
    asyncio.run(main())


# ---- a growing file grows ----------------------------------------------------------

def test_a_file_that_can_grow_takes_writes_past_its_end(tmp_path):
    path = tmp_path / "grow.raw"
    path.write_bytes(b"")
    with blkio.open("io_uring", path=path) as dev:
        assert dev.limits.can_grow
        assert dev.capacity == 0
        data = np.arange(BS, dtype=np.uint8)
        assert dev.write(64 * KiB, data) == BS
        assert dev.capacity == dev.get("capacity") == 64 * KiB + BS
        assert dev.read(64 * KiB, BS).tobytes() == data.tobytes()
        dev.write_zeroes(128 * KiB, BS)     # submitted; libblkio does not grow the file for it
        assert dev.capacity == dev.get("capacity")
        assert not dev.read(128 * KiB, BS).any()
        q = dev.queue(0)
        q.write(256 * KiB, data)
        assert q.wait()[0].ret == 0
        assert dev.capacity == 256 * KiB + BS
    assert path.stat().st_size == 256 * KiB + BS


def test_a_device_that_cannot_grow_still_refuses_io_past_its_end(loopdev):
    with blkio.open("io_uring", path=loopdev.path, direct=True) as dev:
        assert not dev.limits.can_grow
        with pytest.raises(ValueError, match="pass the end"):
            dev.write(dev.capacity, dev.alloc(BS))


# ---- asyncio: vectored I/O is pipelined; an AsyncDevice follows its loop ------------

def test_async_readv_and_writev_are_split_and_pipelined_like_the_blocking_ones(image):
    async def main():
        async with blkio.aio.open("io_uring", path=image.path) as adev:
            q = adev.queue
            parts = [adev.alloc(MiB) for _ in range(4)] + [np.zeros(3 * BS, np.uint8)]
            total = sum(p.nbytes for p in parts)
            before = q.requests
            assert await adev.readv(BS, parts, chunk=MiB // 2, depth=4) == total
            assert q.requests - before == -(-total // (MiB // 2))      # pieces of chunk bytes
            assert b"".join(p.tobytes() for p in parts) == image.data[BS:BS + total]
            data = [np.full(MiB, i, np.uint8) for i in range(3)]
            before = q.requests
            assert await adev.writev(8 * MiB, data, chunk=MiB // 4, depth=2) == 3 * MiB
            assert q.requests - before == 12
            return data
    data = asyncio.run(main())
    assert image.pread(8 * MiB, 3 * MiB) == b"".join(d.tobytes() for d in data)


def test_an_async_device_opened_in_one_loop_is_awaited_in_the_next(image):
    async def opened():
        return await blkio.aio.open("io_uring", path=image.path)

    async def use(adev):
        out = await adev.read(0, BS)
        assert out.tobytes() == image.data[:BS]
        assert await adev.read_batch([BS, 2 * BS], adev.alloc(2 * BS).reshape(2, BS)) == 2 * BS

    adev = asyncio.run(opened())            # its loop is closed when run() returns
    try:
        asyncio.run(use(adev))
        asyncio.run(use(adev))              # and again, in a third loop
        import uvloop
        loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(use(adev))
        finally:
            loop.close()
    finally:
        asyncio.run(adev.aclose())


def test_an_async_device_follows_its_loop_when_completions_come_later(qsd):
    # On a page-cached file a read completes inside its submit, so the test
    # above passes even if the completion-fd reader stays on the dead loop;
    # a vhost-user read completes later, and only the moved reader sees it.
    daemon = qsd()
    expect = daemon.source.data[:MiB]

    async def opened():
        return await blkio.aio.open("virtio-blk-vhost-user", path=daemon.socket)

    async def use(adev):
        # a bound against a hang (the completion never seen), not a timing
        out = await asyncio.wait_for(adev.read(0, MiB), 30)
        assert out.tobytes() == expect

    adev = asyncio.run(opened())
    try:
        asyncio.run(use(adev))
        asyncio.run(use(adev))
    finally:
        asyncio.run(adev.aclose())


def test_an_async_device_busy_on_a_live_loop_refuses_another(slow_socket):
    import threading
    started, release = threading.Event(), threading.Event()
    box = {}

    def first_loop():
        async def main():
            adev = await blkio.aio.open("virtio-blk-vhost-user", path=slow_socket)
            box["adev"] = adev
            pending = asyncio.ensure_future(adev.read(0, 8 * MiB))  # throttled: seconds
            await asyncio.sleep(0.05)
            started.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 60)
            await pending
            await adev.aclose()
        asyncio.run(main())

    t = threading.Thread(target=first_loop)
    t.start()
    try:
        assert started.wait(30)

        async def second():
            with pytest.raises(ValueError, match="in flight on another event loop"):
                await box["adev"].read(0, BS)
        asyncio.run(second())
    finally:
        release.set()
        t.join(60)
    assert not t.is_alive()
