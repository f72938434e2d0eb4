"""Connecting to a vhost-user backend: ``connect_timeout`` and the path checks.

qemu-storage-daemon's vhost-user-blk export serves one client at a time: a
second client waits unanswered in the listener's queue until the first
disconnects, and once more clients wait than the listen backlog allows,
connect(2) itself blocks.  ``blkio.open(..., connect_timeout=S)`` bounds that
wait (ETIMEDOUT naming the socket), Ctrl-C interrupts it, and a path that is
no socket is refused before libblkio connects.  Waits that could hang if the
code were wrong run in a child interpreter with a bound.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import blkio
from blkio import _vhost_socket
from conftest import require, sigint_default, tool_env, write_image

DRIVER = "virtio-blk-vhost-user"
#: Far above any timeout used here: a call that has not returned by then hung.
HANG = 30.0


def _assert_timed_out(e: BaseException, sock: str) -> None:
    assert isinstance(e, TimeoutError) and isinstance(e, blkio.Error), type(e).__mro__
    assert e.errno == errno.ETIMEDOUT
    assert e.filename == sock
    assert "one client at a time" in str(e) and "connect_timeout" in str(e), str(e)


@contextlib.contextmanager
def _held(daemon):
    """The export in use by a first device.  Should an open that must time
    out wait forever instead, a watchdog closes this device after ``HANG``
    seconds: the open then succeeds, and the test fails instead of hanging."""
    first = blkio.open(DRIVER, daemon.socket)
    watchdog = threading.Timer(HANG, first.close)
    watchdog.start()
    try:
        yield first
    finally:
        watchdog.cancel()
        watchdog.join()
        first.close()


def _open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def _child(code: str, timeout: float = HANG) -> dict:
    """Run ``code`` in a child interpreter; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=sigint_default)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# A busy export


def test_open_of_a_busy_export_times_out_naming_the_socket_then_opens_once_it_is_free(qsd):
    daemon = qsd()
    with _held(daemon):
        start = time.monotonic()
        with pytest.raises(OSError) as ei:
            blkio.open(DRIVER, daemon.socket, connect_timeout=0.5)
        waited = time.monotonic() - start
    _assert_timed_out(ei.value, daemon.socket)
    assert 0.5 <= waited < HANG
    # The cut connection waited in the daemon's queue: the daemon drops it and
    # serves the next client.
    with blkio.open(DRIVER, daemon.socket, connect_timeout=HANG) as dev:
        assert dev.read(0, 4096).tobytes() == daemon.raw.pread(0, 4096)


def test_a_timed_out_open_leaves_no_fd_and_no_thread(qsd):
    daemon = qsd()
    with _held(daemon):
        gc.collect()        # earlier tests' garbage closes its fds now, not midway
        fds, threads = _open_fds(), threading.enumerate()
        for _ in range(3):
            with pytest.raises(TimeoutError):
                blkio.open(DRIVER, daemon.socket, connect_timeout=0.2)
        # none opened and left (one closed meanwhile is not a leak: under ASan
        # an earlier test's objects were still being collected)
        assert _open_fds() - fds == set()
        assert threading.enumerate() == threads


def test_busy_export_freed_within_the_timeout_opens(qsd):
    daemon = qsd()
    first = blkio.open(DRIVER, daemon.socket)
    timer = threading.Timer(0.5, first.close)
    timer.start()
    try:
        with blkio.open(DRIVER, daemon.socket, connect_timeout=HANG) as dev:
            assert first.closed
            assert dev.read(4096, 4096).tobytes() == daemon.raw.pread(4096, 4096)
    finally:
        timer.join()


def test_full_listener_queue_times_out_instead_of_blocking_in_connect(qsd):
    # One client served, two waiting (backlog 1 + 1): a fourth connect(2)
    # would block where no timeout reaches it.  The child must still time out.
    daemon = qsd()
    with blkio.open(DRIVER, daemon.socket):
        waiting = [socket.socket(socket.AF_UNIX) for _ in range(2)]
        try:
            for s in waiting:
                s.connect(daemon.socket)
            out = _child(f"""
import json, time, blkio
start = time.monotonic()
try:
    blkio.open({DRIVER!r}, {daemon.socket!r}, connect_timeout=0.5)
    print(json.dumps({{"error": None}}))
except OSError as e:
    print(json.dumps({{"error": e.errno, "waited": time.monotonic() - start, "msg": str(e)}}))
""")
        finally:
            for s in waiting:
                s.close()
    assert out["error"] == errno.ETIMEDOUT, out
    assert "queue of waiting clients is full" in out["msg"]


def test_concurrent_opens_of_one_busy_export_each_time_out(qsd):
    # Connections to one listener look alike: one open's deadline must not cut
    # another's connection (which would fail with EIO instead).
    daemon = qsd()
    results = {}

    def opener(timeout):
        try:
            blkio.open(DRIVER, daemon.socket, connect_timeout=timeout).close()
            results[timeout] = None
        except OSError as e:
            results[timeout] = e

    with _held(daemon):
        threads = [threading.Thread(target=opener, args=(t,)) for t in (0.5, 1.0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG)
    assert set(results) == {0.5, 1.0}
    for e in results.values():
        _assert_timed_out(e, daemon.socket)


def test_aio_open_honours_connect_timeout(qsd, run):
    daemon = qsd()

    async def main():
        with pytest.raises(TimeoutError) as ei:
            await blkio.aio.open(DRIVER, daemon.socket, connect_timeout=0.5)
        return ei.value

    with _held(daemon):
        e = run(main())
    _assert_timed_out(e, daemon.socket)

    async def after():
        async with blkio.aio.open(DRIVER, daemon.socket, connect_timeout=HANG) as adev:
            return bytes(await adev.read(0, 4096))

    assert run(after()) == daemon.raw.pread(0, 4096)


# ---------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.parametrize("connect_timeout", [None, 300.0], ids=["no-limit", "300s"])
@pytest.mark.parametrize("queue", ["waiting-for-an-answer", "queue-full"])
def test_ctrl_c_interrupts_an_open_waiting_for_a_busy_export(qsd, connect_timeout, queue):
    daemon = qsd()
    with blkio.open(DRIVER, daemon.socket):
        waiting = [socket.socket(socket.AF_UNIX) for _ in range(2 if queue == "queue-full" else 0)]
        try:
            for s in waiting:
                s.connect(daemon.socket)
            out = _child(f"""
import json, os, signal, threading, time, blkio
fds = set(os.listdir("/proc/self/fd"))
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
start = time.monotonic()
try:
    blkio.open({DRIVER!r}, {daemon.socket!r}, connect_timeout={connect_timeout!r})
    got = "opened"
except KeyboardInterrupt:
    got = "KeyboardInterrupt"
waited = time.monotonic() - start
time.sleep(0.1)     # the timer thread ends
print(json.dumps({{"got": got, "waited": waited, "threads": threading.active_count(),
                  "fds_left": sorted(set(os.listdir("/proc/self/fd")) - fds)}}))
""")
        finally:
            for s in waiting:
                s.close()
    assert out["got"] == "KeyboardInterrupt", out
    assert out["threads"] == 1 and out["fds_left"] == [], out
    assert out["waited"] < HANG


# ---------------------------------------------------------------------------
# A daemon that starts after open() is called


def _socket_activated_daemon(listener: socket.socket, image: Path) -> subprocess.Popen:
    """qemu-storage-daemon serving on a listening socket it inherits (as
    under systemd socket activation)."""
    fd = listener.fileno()
    return subprocess.Popen(
        [shutil.which("qemu-storage-daemon"),
         "--blockdev", f"driver=file,node-name=file0,filename={image}",
         "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=fd,"
                     f"addr.str={fd},writable=on"],
        pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=tool_env())


@pytest.mark.parametrize("starts", [True, False], ids=["starts-within", "never-starts"])
def test_daemon_starting_on_an_existing_socket_is_waited_for(tmp_path, starts):
    # The socket exists (socket activation); the daemon starts 0.5 s later.
    require(shutil.which("qemu-storage-daemon"),
            "qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    image = write_image(tmp_path / "disk.raw", 1 << 20)
    path = str(tmp_path / "vhost.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    daemons = []
    timer = threading.Timer(0.5, lambda: daemons.append(_socket_activated_daemon(listener, image.path)))
    # Should the open wait forever, closing the listener makes it fail instead.
    watchdog = threading.Timer(HANG, listener.close)
    watchdog.start()
    if starts:
        timer.start()
    try:
        if starts:
            with blkio.open(DRIVER, path, connect_timeout=HANG) as dev:
                assert dev.read(0, 4096).tobytes() == image.data[:4096]
        else:
            with pytest.raises(TimeoutError) as ei:
                blkio.open(DRIVER, path, connect_timeout=1.0)
            _assert_timed_out(ei.value, path)
    finally:
        watchdog.cancel()
        watchdog.join()
        if starts:
            timer.join()
        for d in daemons:
            d.terminate()
            d.wait(10)
        listener.close()


# ---------------------------------------------------------------------------
# Paths that are no listening socket: said before libblkio connects


def test_missing_socket_is_file_not_found_at_once(tmp_path):
    path = str(tmp_path / "no.sock")
    with pytest.raises(FileNotFoundError) as ei:
        blkio.open(DRIVER, path, connect_timeout=HANG)
    assert isinstance(ei.value, blkio.Error)
    assert ei.value.errno == errno.ENOENT and ei.value.filename == path
    assert "no socket" in str(ei.value)


@pytest.mark.parametrize("kind", ["regular file", "directory"])
def test_path_that_is_no_socket_is_enotsock(tmp_path, kind):
    path = tmp_path / "thing"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\0" * 4096)
    with pytest.raises(blkio.Error) as ei:
        blkio.open(DRIVER, str(path))
    e = ei.value
    assert e.errno == errno.ENOTSOCK and e.filename == str(path)
    assert f"is a {kind}, not a unix socket" in str(e)


def test_socket_nobody_listens_on_is_connection_refused(tmp_path):
    # What a daemon that exited leaves behind.
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    with pytest.raises(ConnectionRefusedError) as ei:
        blkio.open(DRIVER, path)
    assert isinstance(ei.value, blkio.Error) and ei.value.filename == path
    assert "nothing listens on the socket" in str(ei.value)


# ---------------------------------------------------------------------------
# The argument


@pytest.mark.parametrize("bad", ["1", b"1", [1], True])
def test_connect_timeout_of_the_wrong_type_is_a_type_error(image, bad):
    with pytest.raises(TypeError, match="connect_timeout"):
        blkio.open("io_uring", image.path, connect_timeout=bad)


@pytest.mark.parametrize("bad", [0, 0.0, -1, math.nan, -math.inf])
def test_connect_timeout_that_is_not_positive_is_a_value_error(image, bad):
    with pytest.raises(ValueError, match="connect_timeout"):
        blkio.open("io_uring", image.path, connect_timeout=bad)


@pytest.mark.parametrize("good", [None, math.inf, 2, 0.25, Fraction(1, 2), np.float32(3)])
def test_connect_timeout_takes_seconds_or_none_on_every_driver(image, good):
    with blkio.open("io_uring", image.path, connect_timeout=good) as dev:
        assert dev.read(0, 512).tobytes() == image.data[:512]


# ---------------------------------------------------------------------------
# Which sockets lead to the backend


def test_only_sockets_connected_to_the_export_are_the_backends(qsd, monkeypatch):
    daemon = qsd()
    st = os.stat(daemon.socket)
    others = socket.socketpair()
    with blkio.open(DRIVER, daemon.socket) as dev:
        waiting = socket.socket(socket.AF_UNIX)
        waiting.connect(daemon.socket)
        try:
            fds = list(_vhost_socket.socket_inodes())
            found = _vhost_socket.connected_to(fds, st, daemon.socket)
            # The device's accepted connection and the waiting client, nothing else.
            assert waiting.fileno() in found and len(found) == 2
            assert not {s.fileno() for s in others} & set(found)
            # Without sock_diag: the peer's bound name.
            monkeypatch.setattr(_vhost_socket, "unix_sockets", lambda: None)
            assert sorted(_vhost_socket.connected_to(fds, st, daemon.socket)) == sorted(found)
        finally:
            waiting.close()
        assert dev.read(0, 512).tobytes() == daemon.raw.pread(0, 512)
    for s in others:
        s.close()


# ---------------------------------------------------------------------------
# A daemon killed and started again on the same socket and image


def _start_daemon(image: Path, path: str) -> subprocess.Popen:
    if os.path.lexists(path):
        os.unlink(path)
    proc = subprocess.Popen(
        [shutil.which("qemu-storage-daemon"),
         "--blockdev", f"driver=file,node-name=file0,filename={image}",
         "--export", f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
                     f"addr.path={path},writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=tool_env())
    deadline = time.monotonic() + HANG
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.005)
    return proc


def _open_when_listening(path: str) -> blkio.Device:
    """The socket file appears when the daemon binds it, a moment before it
    listens: until then a connect is refused."""
    deadline = time.monotonic() + HANG
    while True:
        try:
            return blkio.open(DRIVER, path)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def test_device_on_the_restarted_daemon_maps_the_memory_a_dead_device_holds(tmp_path):
    # What a reconnect does by hand: the writes in flight when the daemon died
    # are written again through a new device, from the same memory, which the
    # dead device still has mapped.
    require(shutil.which("qemu-storage-daemon"),
            "qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    image = write_image(tmp_path / "disk.raw", 4 << 20, random=False)
    path = str(tmp_path / "vhost.sock")
    daemon = _start_daemon(image.path, path)
    daemons = [daemon]
    try:
        dead = blkio.open(DRIVER, path)
        buf = blkio.Buffer(1 << 20)
        data = np.frombuffer(buf, dtype=np.uint8)
        data[:] = np.random.default_rng(7).integers(0, 256, data.size, dtype=np.uint8)
        assert dead.register(buf)
        chunk = 64 << 10
        q = dead.queue(0)
        for k in range(16):
            q.write(k * chunk, data[k * chunk:(k + 1) * chunk])
        q.submit()
        daemon.kill()
        daemon.wait(HANG)
        with pytest.raises(OSError) as ei:
            q.wait(min=16, timeout=HANG)
        assert ei.value.errno == errno.EIO
        with pytest.raises(ConnectionRefusedError):
            blkio.open(DRIVER, path)            # the socket file the dead daemon left
        daemons.append(_start_daemon(image.path, path))
        with _open_when_listening(path) as dev:
            assert dev.register(buf)            # mapped into both devices now
            q2 = dev.queue(0)
            for k in range(16):
                q2.write(k * chunk, data[k * chunk:(k + 1) * chunk])
            for c in q2.wait(min=16, timeout=HANG):
                c.check()
            assert dev.stats.bounced_requests == 0
            dead.close()                        # unmaps on a dead connection: leaves dev's alone
            assert dev.read(0, 1 << 20).tobytes() == data.tobytes()
            dev.flush()
        assert image.pread(0, 1 << 20) == data.tobytes()
    finally:
        for d in daemons:
            d.kill()
            d.wait(HANG)
