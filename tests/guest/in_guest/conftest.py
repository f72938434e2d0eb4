"""Guest-side fixtures: bring up the three devices (only inside the guest).

The launcher (tests/guest/launcher.py) runs pytest on this directory inside a
QEMU guest with BLKIO_GUEST=1.  Each driver's device is set up once per session
by a fixture here, so a set-up failure shows as an error of every test of that
driver, with the reason.
"""

from __future__ import annotations

import faulthandler
import glob
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest

IN_GUEST = os.environ.get("BLKIO_GUEST") == "1"
DISK_SIZE = int(os.environ.get("BLKIO_GUEST_DISK_SIZE", str(64 << 20)))

NVME = "nvme-io_uring"
VFIO = "virtio-blk-vfio-pci"
VDPA = "virtio-blk-vhost-vdpa"
DRIVERS = (NVME, VFIO, VDPA)


def pytest_collection_modifyitems(config, items):
    if IN_GUEST:
        return
    skip = pytest.mark.skip(reason="runs only inside the QEMU guest (tests/guest/launcher.py)")
    for item in items:
        item.add_marker(skip)


TEST_TIMEOUT = int(os.environ.get("BLKIO_GUEST_TEST_TIMEOUT", "120"))


@pytest.fixture(autouse=True)
def _per_test_timeout():
    """A hung request must not hang the whole guest: interrupt the test (the
    package's waits run Python signal handlers) and dump stacks to the console."""
    if not IN_GUEST:
        yield
        return

    def on_alarm(signum, frame):
        try:
            with open("/dev/console", "w") as con:
                con.write(f"\n*** in-guest test timeout ({TEST_TIMEOUT} s), stacks:\n")
                con.flush()
                faulthandler.dump_traceback(file=con, all_threads=True)
        except OSError:
            pass
        raise TimeoutError(f"test still running after {TEST_TIMEOUT} s in the guest "
                           f"(a request never completed?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sh(*cmd: str, timeout: float = 60, check: bool = True) -> str:
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout.strip()}")
    return r.stdout


def wait_for(pred, what: str, timeout: float = 60.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _pci_read(dev: Path, name: str) -> str:
    return (dev / name).read_text().strip()


@pytest.fixture(scope="session")
def nvme_path() -> str:
    sh("modprobe", "nvme")
    return wait_for(lambda: os.path.exists("/dev/ng0n1") and "/dev/ng0n1",
                    "/dev/ng0n1 (the NVMe generic char device)")


@pytest.fixture(scope="session")
def vfio_path() -> str:
    sh("modprobe", "vfio-pci")
    devs = [Path(d) for d in sorted(glob.glob("/sys/bus/pci/devices/*"))
            if _pci_read(Path(d), "vendor") == "0x1af4"
            and _pci_read(Path(d), "device") == "0x1042"]
    if len(devs) != 1:
        raise RuntimeError(f"expected one virtio-blk (1af4:1042) PCI device, found {devs}")
    dev = devs[0]
    addr = dev.name
    drv = dev / "driver"
    if drv.exists() and os.path.basename(os.readlink(drv)) != "vfio-pci":
        (drv / "unbind").write_text(addr)
    (dev / "driver_override").write_text("vfio-pci")
    if not drv.exists():
        Path("/sys/bus/pci/drivers_probe").write_text(addr)
    wait_for(lambda: drv.exists() and os.path.basename(os.readlink(drv)) == "vfio-pci",
             f"{addr} bound to vfio-pci", timeout=30)
    group = os.path.basename(os.readlink(dev / "iommu_group"))
    wait_for(lambda: os.path.exists(f"/dev/vfio/{group}"), f"/dev/vfio/{group}", timeout=30)
    return str(dev)


@pytest.fixture(scope="session")
def vdpa_path():
    sh("modprobe", "vduse")
    sh("modprobe", "vhost_vdpa")
    img = "/run/vdpa.img"
    with open(img, "wb") as f:
        f.truncate(DISK_SIZE)
    log = open("/run/qsd-vduse.log", "w")
    env = dict(os.environ, TMPDIR="/run")
    qsd = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,filename={img},node-name=d0",
         "--export", "type=vduse-blk,id=e0,node-name=d0,name=vduse0,writable=on"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    added = False
    try:
        def ready():
            if qsd.poll() is not None:
                raise RuntimeError("qemu-storage-daemon exited: "
                                   + Path("/run/qsd-vduse.log").read_text())
            return os.path.exists("/dev/vduse/vduse0")
        wait_for(ready, "/dev/vduse/vduse0 (qemu-storage-daemon vduse-blk export)")
        sh("vdpa", "dev", "add", "name", "vduse0", "mgmtdev", "vduse")
        added = True
        path = wait_for(lambda: sorted(glob.glob("/dev/vhost-vdpa-*")),
                        "/dev/vhost-vdpa-*")[0]
        yield path
    finally:
        if added:
            sh("vdpa", "dev", "del", "vduse0", check=False)
        qsd.terminate()
        try:
            qsd.wait(timeout=30)
        except subprocess.TimeoutExpired:
            qsd.kill()
            qsd.wait()
        log.close()


class Target(NamedTuple):
    driver: str
    path: str
    image: str      # the backing file, readable in the guest


IMAGES = {
    NVME: os.environ.get("BLKIO_GUEST_NVME_IMAGE", ""),
    VFIO: os.environ.get("BLKIO_GUEST_VFIO_IMAGE", ""),
    VDPA: "/run/vdpa.img",
}


@pytest.fixture(params=DRIVERS)
def target(request) -> Target:
    """One of the three drivers with its device path, set up on first use."""
    name = {NVME: "nvme_path", VFIO: "vfio_path", VDPA: "vdpa_path"}[request.param]
    return Target(request.param, request.getfixturevalue(name), IMAGES[request.param])
