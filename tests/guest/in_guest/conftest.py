"""Guest-side fixtures: bring up the three devices (only inside the guest).

The launcher (tests/guest/launcher.py) runs pytest on this directory inside a
QEMU guest with BLKIO_GUEST=1.  Each driver's device is set up once per session
by a fixture here, so a set-up failure shows as an error of every test of that
driver, with the reason.

NVMe namespaces are found by their controller's serial and their namespace id,
never by name: the kernel probes the two controllers asynchronously, so the
plain namespace is /dev/ng0n1 in one boot and /dev/ng1n1 in the next.
"""

from __future__ import annotations

import faulthandler
import fcntl
import glob
import json
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


# --------------------------------------------------------------------------
# NVMe namespaces, by controller serial and namespace id
# --------------------------------------------------------------------------

NVME_SERIAL = os.environ.get("BLKIO_GUEST_NVME_SERIAL", "deadbeef")
ZNS_SERIAL = os.environ.get("BLKIO_GUEST_ZNS_SERIAL", "zns0")
# The zoned namespaces the launcher gave the guest (launcher.ZONED_NAMESPACES).
ZONED = json.loads(os.environ.get("BLKIO_GUEST_ZONED", "[]"))
ZONE_PROBE = os.environ.get("BLKIO_GUEST_ZONE_PROBE", "")
NVME_IOCTL_ID = 0x4E40      # _IO('N', 0x40): the namespace id of an NVMe device node


class NvmeNamespace(NamedTuple):
    path: str       # /dev/ngXnY (the generic char device nvme-io_uring takes)
    serial: str     # the controller's serial number
    nsid: int
    sysfs: str      # /sys/block/nvmeXnY ("" when the kernel made no block device)

    def queue_attr(self, name: str) -> str:
        """A /sys/block/nvmeXnY/queue attribute ("" when absent)."""
        try:
            return Path(self.sysfs, "queue", name).read_text().strip()
        except OSError:
            return ""


def nvme_namespaces() -> dict:
    """{(serial, nsid): NvmeNamespace} of every NVMe namespace present now."""
    found = {}
    for cls in sorted(glob.glob("/sys/class/nvme-generic/ng*n*")):
        name = os.path.basename(cls)
        try:
            serial = Path(cls, "device", "serial").read_text().strip()
            fd = os.open(f"/dev/{name}", os.O_RDONLY)
        except OSError:
            continue        # still appearing
        try:
            nsid = fcntl.ioctl(fd, NVME_IOCTL_ID)
        finally:
            os.close(fd)
        block = f"/sys/block/nvme{name[2:]}"    # ngXnY and nvmeXnY share XnY
        found[(serial, nsid)] = NvmeNamespace(f"/dev/{name}", serial, nsid,
                                              block if os.path.isdir(block) else "")
    return found


@pytest.fixture(scope="session")
def nvme_devices() -> dict:
    """Every namespace the launcher gave the guest, once all have appeared."""
    t0 = time.monotonic()
    sh("modprobe", "nvme")
    want = {(NVME_SERIAL, 1)} | {(ZNS_SERIAL, z["nsid"]) for z in ZONED}

    def all_there():
        now = nvme_namespaces()
        return now if want <= now.keys() else None

    found = wait_for(all_there, f"NVMe namespaces (serial, nsid) {sorted(want)}")
    print(f"NVMe namespaces {time.monotonic() - t0:.2f} s after modprobe nvme: "
          + ", ".join(f"{k[0]}/{k[1]}={v.path}" for k, v in sorted(found.items())))
    return found


@pytest.fixture(scope="session")
def nvme_path(nvme_devices) -> str:
    """The plain (not zoned) namespace: nsid 1 of the NVME_SERIAL controller."""
    return nvme_devices[(NVME_SERIAL, 1)].path


class ZonedTarget(NamedTuple):
    """A zoned namespace and the geometry the launcher gave it (bytes)."""
    ns: NvmeNamespace
    image: str
    size: int
    zone_size: int
    zone_capacity: int
    max_open: int       # 0: no limit
    max_active: int     # 0: no limit

    @property
    def path(self) -> str:
        return self.ns.path

    @property
    def nr_zones(self) -> int:
        return self.size // self.zone_size


def _zoned_target(nvme_devices, spec: dict) -> ZonedTarget:
    ns = nvme_devices[(ZNS_SERIAL, spec["nsid"])]
    zt = ZonedTarget(ns, spec["image"], spec["size"], spec["zone_size"],
                     spec["zone_capacity"], spec["max_open"], spec["max_active"])
    model = ns.queue_attr("zoned")
    if model != "host-managed":
        raise RuntimeError(f"{ns.path} (serial {ZNS_SERIAL}, nsid {ns.nsid}) is not "
                           f"host-managed: /sys/block/.../queue/zoned = {model!r}")
    return zt


def _zoned_spec(pred, what: str) -> dict:
    for spec in ZONED:
        if pred(spec):
            return spec
    pytest.fail(f"the launcher gave the guest no {what} (BLKIO_GUEST_ZONED={ZONED})")


@pytest.fixture(scope="session")
def zns(nvme_devices) -> ZonedTarget:
    """The zoned namespace whose zones hold their whole size (capacity == size)."""
    return _zoned_target(nvme_devices, _zoned_spec(
        lambda z: z["zone_capacity"] == z["zone_size"], "zoned namespace with capacity == size"))


@pytest.fixture(scope="session")
def zns_small_capacity(nvme_devices) -> ZonedTarget:
    """The zoned namespace whose zone capacity is smaller than its zone size."""
    return _zoned_target(nvme_devices, _zoned_spec(
        lambda z: z["zone_capacity"] < z["zone_size"], "zoned namespace with capacity < size"))


@pytest.fixture(params=["zns", "zns_small_capacity"],
                ids=["zns", "zns-small-cap"])
def zoned(request) -> ZonedTarget:
    """Each zoned namespace in turn."""
    return request.getfixturevalue(request.param)


class ZoneProbe:
    """libblkio from C (tests/guest/zone_probe.c, built by the launcher):
    what blkio's API cannot show, such as property values before connect
    (blkio.open connects and starts)."""

    def __init__(self, exe: str):
        self.exe = exe

    def run(self, path: str, *ops: str, props: bool = False) -> list:
        """Run ops ("report 0 4", "reset-all", ...) in one libblkio instance;
        one dict per op (plus the three "props" lines when props=True)."""
        argv = [self.exe, "nvme-io_uring", path]
        for i, op in enumerate(ops):
            argv += (["--"] if i else []) + op.split()
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"zone-probe {' '.join(argv[1:])} failed ({r.returncode}): "
                               f"{r.stderr.strip()}")
        out = [json.loads(line) for line in r.stdout.splitlines()]
        # The probe reads the properties before connect, after connect and
        # after start, then runs the ops.
        assert [d.get("state") for d in out[:3]] == ["created", "connected", "started"], out
        return out if props else out[3:]


@pytest.fixture(scope="session")
def zone_probe() -> ZoneProbe:
    if not ZONE_PROBE:
        pytest.skip("zone-probe was not built on the host (needs gcc, pkg-config, libblkio-dev)")
    return ZoneProbe(ZONE_PROBE)


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
