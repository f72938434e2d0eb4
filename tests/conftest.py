"""Shared fixtures: real backends for blkio tests (DESIGN section 6).

- ``image``: a 64 MiB raw file of random bytes (``Image`` with ``.path`` and
  ``.data``; ``.pread(offset, n)`` reads the file as it is now).
- ``make_image``: factory for more such files (any size, optionally zeroed).
- ``loopdev``: a loop block device (``losetup --direct-io=on``) over a fresh
  64 MiB random file, detached at teardown.
- ``qsd``: factory starting ``qemu-storage-daemon`` exporting a raw file (or a
  qcow2 image under blkdebug fault rules) as ``vhost-user-blk`` on a unix
  socket; every daemon is stopped at teardown.

Missing backends skip the test with the reason, except when ``CI=true``: then
they fail, because CI must run every test.  That policy lives in ``require``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

import pytest

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB
CI = os.environ.get("CI") == "true"


def tool_env() -> dict:
    """The environment for system tools (qemu-storage-daemon, qemu-img,
    losetup): without the sanitizer runtimes that ``make test-asan`` preloads
    into Python, which would slow them down or hang them."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


def sigint_default() -> None:
    """``preexec_fn`` for a child that is sent SIGINT: Python turns SIGINT
    into KeyboardInterrupt only when it is not ignored at start-up, and a
    run started in the background by a shell without job control (``cmd &``,
    nohup) ignores it in every process it starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def require(condition: object, reason: str) -> None:
    """Skip the test unless ``condition`` holds; with CI=true, fail instead."""
    if condition:
        return
    if CI:
        pytest.fail(f"{reason} (CI=true: backends must be available)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """``run(coro, timeout=60)``: run it to completion on a fresh event loop
    of the param's kind (asyncio's own, or uvloop's: a test dependency),
    bounded so that a hang fails the test."""
    uvloop = None
    if request.param == "uvloop":
        try:
            import uvloop
        except ImportError:
            require(False, "uvloop is not installed (a test dependency: pip install '.[test]')")

    def runner(coro, timeout=60.0):
        async def bounded():
            return await asyncio.wait_for(coro, timeout)
        if uvloop is not None:
            loop = uvloop.new_event_loop()
            try:
                return loop.run_until_complete(bounded())
            finally:
                loop.close()
        return asyncio.run(bounded())
    return runner


# ---------------------------------------------------------------------------
# Image files


@dataclasses.dataclass
class Image:
    """A raw image file and the bytes it was created with."""

    path: Path
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, offset: int, nbytes: int) -> bytes:
        """The file's current bytes at ``offset`` (read with os.pread)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            out = bytearray()
            while len(out) < nbytes:
                chunk = os.pread(fd, nbytes - len(out), offset + len(out))
                if not chunk:
                    break
                out += chunk
            return bytes(out)
        finally:
            os.close(fd)

    def __fspath__(self) -> str:
        return str(self.path)


def write_image(path: Union[str, Path], size: int = IMAGE_SIZE, *, random: bool = True) -> Image:
    """Create ``path`` with ``size`` random (or zero) bytes; returns an Image."""
    data = os.urandom(size) if random else bytes(size)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Image(path, data)


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Image]:
    """Factory: ``make_image(size=64 MiB, name=None, random=True) -> Image``."""
    counter = [0]

    def make(size: int = IMAGE_SIZE, name: Optional[str] = None, *, random: bool = True) -> Image:
        counter[0] += 1
        return write_image(tmp_path / (name or f"image{counter[0]}.raw"), size, random=random)

    return make


@pytest.fixture
def image(make_image: Callable[..., Image]) -> Image:
    """A 64 MiB raw temp file of random bytes."""
    return make_image(IMAGE_SIZE, "image.raw")


# ---------------------------------------------------------------------------
# Loop device


@dataclasses.dataclass
class LoopDevice:
    """A loop block device over ``backing`` (opened with direct I/O)."""

    path: str
    backing: Image

    def __fspath__(self) -> str:
        return self.path


@pytest.fixture
def loopdev(make_image: Callable[..., Image]) -> Iterator[LoopDevice]:
    """``losetup --find --show --direct-io=on`` on a fresh 64 MiB random file."""
    losetup = shutil.which("losetup") or ("/usr/sbin/losetup" if os.path.exists("/usr/sbin/losetup") else None)
    require(losetup, "losetup is not installed (util-linux/mount)")
    require(os.path.exists("/dev/loop-control"), "no /dev/loop-control: loop devices unavailable here")
    require(os.access("/dev/loop-control", os.R_OK | os.W_OK),
            "no permission on /dev/loop-control (loop devices need root or the disk group)")
    backing = make_image(IMAGE_SIZE, "loop-backing.raw")
    proc = subprocess.run([losetup, "--find", "--show", "--direct-io=on", str(backing.path)],
                          capture_output=True, text=True, timeout=30, env=tool_env())
    require(proc.returncode == 0 and proc.stdout.strip().startswith("/dev/"),
            f"losetup failed (rc={proc.returncode}): {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        require(os.access(dev, os.R_OK | os.W_OK), f"no read/write permission on {dev}")
        yield LoopDevice(dev, backing)
    finally:
        subprocess.run([losetup, "-d", dev], capture_output=True, timeout=30, env=tool_env())


# ---------------------------------------------------------------------------
# qemu-storage-daemon (vhost-user-blk export)


@dataclasses.dataclass
class Inject:
    """One blkdebug ``inject-error`` rule.

    ``event`` is a blkdebug event (``read_aio``, ``write_aio``,
    ``flush_to_os``, ...); the error hits the next request of the node after
    the event (with ``immediately`` without a coroutine yield).  ``once``
    removes the rule after its first error; ``sector`` limits it to requests
    touching that 512-byte sector of the qcow2 file; ``iotype`` (``read``,
    ``write``, ``flush``, ...) to requests of that kind (default: any kind).
    """

    event: str = "read_aio"
    errno: int = 5
    once: bool = True
    immediately: bool = False
    sector: Optional[int] = None
    iotype: Optional[str] = None

    def options(self, index: int) -> List[str]:
        p = f"inject-error.{index}."
        opts = [f"{p}event={self.event}", f"{p}errno={self.errno}",
                f"{p}once={'on' if self.once else 'off'}",
                f"{p}immediately={'on' if self.immediately else 'off'}"]
        if self.sector is not None:
            opts.append(f"{p}sector={self.sector}")
        if self.iotype is not None:
            opts.append(f"{p}iotype={self.iotype}")
        return opts


@dataclasses.dataclass
class StorageDaemon:
    """A running qemu-storage-daemon with a vhost-user-blk export."""

    socket: str                 #: the vhost-user unix socket (the blkio path)
    image: Path                 #: the backing file (raw, or qcow2 in fault mode)
    pid: int
    proc: subprocess.Popen
    dir: Path
    num_queues: int
    raw: Optional[Image]        #: the raw backing file (None in fault mode)
    source: Optional[Image]     #: the data the export started with (when known)
    faults: Sequence[Inject] = ()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Kill the daemon (SIGKILL by default) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.pid, sig)
            self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL."""
        if self.proc.poll() is not None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            self.proc.wait(10)

    def stderr(self) -> str:
        try:
            return (self.dir / "stderr").read_text(errors="replace")
        except OSError:
            return ""

    def __fspath__(self) -> str:
        return self.socket


def _qemu_img() -> str:
    qemu_img = shutil.which("qemu-img")
    require(qemu_img, "qemu-img is not installed (Debian: qemu-utils)")
    return qemu_img


def convert_to_qcow2(source: Union[Image, str, Path], dest: Union[str, Path]) -> Path:
    """``qemu-img convert`` a raw file into a (fully allocated) qcow2 image."""
    subprocess.run([_qemu_img(), "convert", "-q", "-f", "raw", "-O", "qcow2",
                    os.fspath(source), os.fspath(dest)], check=True, capture_output=True, timeout=60,
                   env=tool_env())
    return Path(dest)


def qcow2_host_offset(qcow2: Union[str, Path], guest_offset: int) -> int:
    """Where guest byte ``guest_offset`` lives in the qcow2 file (qemu-img map),
    e.g. for ``Inject(sector=qcow2_host_offset(img, off) // 512)``."""
    out = subprocess.run([_qemu_img(), "map", "-U", "--output=json", "-f", "qcow2", os.fspath(qcow2)],
                         check=True, capture_output=True, text=True, timeout=60,
                         env=tool_env()).stdout
    for ext in json.loads(out):
        if ext["start"] <= guest_offset < ext["start"] + ext["length"]:
            if not ext.get("data") or "offset" not in ext:
                raise ValueError(f"guest offset {guest_offset} is not allocated in {qcow2}")
            return ext["offset"] + guest_offset - ext["start"]
    raise ValueError(f"guest offset {guest_offset} is outside {qcow2}")


@pytest.fixture
def qsd(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., StorageDaemon]:
    """Factory: ``qsd(num_queues=1, image=None, faults=None, size=64 MiB)``.

    Without ``faults`` it exports a raw file (``image``, an Image or path, or
    a fresh 64 MiB random file) directly.  With ``faults`` (a list of
    ``Inject`` rules, or one) it stacks file -> blkdebug -> qcow2 -> export
    over a qcow2 image: ``image`` itself when it is a ``.qcow2`` path, else
    one converted from ``image`` (so its data is there before the daemon
    starts).  Every daemon is stopped at teardown (SIGTERM, then SIGKILL).
    """
    binary = shutil.which("qemu-storage-daemon")
    daemons: List[StorageDaemon] = []

    def start(num_queues: int = 1, image: Union[Image, str, Path, None] = None,
              faults: Union[Inject, Sequence[Inject], None] = None,
              size: int = IMAGE_SIZE, timeout: float = 10.0) -> StorageDaemon:
        require(binary, "qemu-storage-daemon is not installed (Debian: qemu-system-common)")
        d = tmp_path_factory.mktemp("qsd")
        raw: Optional[Image] = None
        if image is None:
            raw = write_image(d / "disk.raw", size)
            backing = raw.path
        elif isinstance(image, Image):
            raw, backing = image, image.path
        else:
            backing = Path(image)
        if hasattr(faults, "options"):      # one rule (any copy of Inject)
            faults = [faults]
        faults = list(faults or ())
        sock = d / "vhost.sock"
        args = [binary]
        if faults:
            if Path(backing).suffix == ".qcow2":
                qcow2 = Path(backing)
            else:
                qcow2 = convert_to_qcow2(backing, d / "disk.qcow2")
            rules = [o for i, rule in enumerate(faults) for o in rule.options(i)]
            args += ["--blockdev", f"driver=file,node-name=file0,filename={qcow2}",
                     "--blockdev", ",".join(["driver=blkdebug,node-name=dbg0,image=file0"] + rules),
                     "--blockdev", "driver=qcow2,node-name=fmt0,file=dbg0"]
            node, exported = "fmt0", qcow2
        else:
            args += ["--blockdev", f"driver=file,node-name=file0,filename={backing}"]
            node, exported = "file0", Path(backing)
        args += ["--export", f"type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,"
                             f"addr.path={sock},writable=on,num-queues={num_queues}",
                 "--pidfile", str(d / "pid")]
        with open(d / "stderr", "wb") as err:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    close_fds=True, env=tool_env())
        daemon = StorageDaemon(str(sock), exported, proc.pid, proc, d, num_queues,
                               raw if not faults else None, raw, tuple(faults))
        daemons.append(daemon)
        deadline = time.monotonic() + timeout
        while not (sock.exists() and (d / "pid").exists()):
            if proc.poll() is not None:
                pytest.fail(f"qemu-storage-daemon exited with {proc.returncode} before "
                            f"creating {sock}:\n{daemon.stderr()}\nargs: {args}", pytrace=False)
            if time.monotonic() > deadline:
                daemon.stop()
                pytest.fail(f"qemu-storage-daemon did not create {sock} within {timeout} s:\n"
                            f"{daemon.stderr()}\nargs: {args}", pytrace=False)
            time.sleep(0.02)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def slow_socket(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A vhost-user export throttled to 4 MiB/s (after a short burst), so
    that reads take seconds: for Ctrl-C, timeout and close-in-flight tests.
    Two queues, for a device that gives each thread its own."""
    binary = shutil.which("qemu-storage-daemon")
    require(binary, "qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    d = tmp_path_factory.mktemp("slow")
    img = d / "slow.raw"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    sock = d / "slow.sock"
    with open(d / "stderr", "wb") as err:
        proc = subprocess.Popen([
            binary, "--object",
            '{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":4194304}}',
            "--blockdev", f"driver=file,node-name=file0,filename={img}",
            "--blockdev", "driver=throttle,node-name=thr0,throttle-group=tg0,file=file0",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=thr0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues=2"],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=tool_env())
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"throttled qemu-storage-daemon did not start: "
                            f"{(d / 'stderr').read_text(errors='replace')}", pytrace=False)
            time.sleep(0.02)
        yield str(sock)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
