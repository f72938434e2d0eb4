"""Boot a small QEMU guest that runs the in-guest pytest suite.

Three libblkio drivers need kernel features this host lacks (NVMe, VFIO,
vDPA).  QEMU emulates the three devices in a guest that boots a Debian 6.12
kernel and the host's own root filesystem (read-only, over virtio-9p), so the
Python interpreter, the installed ``blkio`` package and libblkio are the same
inside the guest as outside.

What this module does:

* ``prepare()`` -- once per cache: fetch the kernel package with apt into
  ``tests/guest/.cache/``, unpack it with ``dpkg-deb -x``, index its modules with
  ``depmod -b``, build a tiny busybox initramfs (with the decompressed 9p
  modules), compile libblkio's ``blkio-info`` example and ``zone_probe.c``
  (libblkio's zone calls, for the zoned tests), and probe whether KVM
  really boots a guest (else TCG).  Later runs reuse all of it.
* ``run_guest()`` -- boot ONE guest with two NVMe controllers (a plain
  namespace; two zoned namespaces, ``ZONED_NAMESPACES``), a virtio-blk-pci
  device behind an emulated Intel IOMMU (for vfio-pci) and, inside the guest, a
  VDUSE export for vhost-vdpa; run pytest on ``tests/guest/in_guest`` there and
  return the junit XML it wrote on a read-write 9p share.  The boot is bounded
  by a timeout; QEMU is killed on timeout or error.

Run it by hand to debug::

    python tests/guest/launcher.py [-k EXPR] [--keep] [--timeout S]

Nothing here hard-codes the repository location or a package mirror.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

HERE = Path(__file__).resolve().parent
IN_GUEST_DIR = HERE / "in_guest"
CACHE = Path(os.environ.get("BLKIO_GUEST_CACHE", HERE / ".cache")).resolve()

# linux-image-6.12.<N>+deb<R>-amd64-unsigned (not -rt, not -cloud): 6.12 has
# VDUSE and vhost_vdpa as modules; bookworm's 6.1 has no vDPA.
KERNEL_PKG_RE = re.compile(r"^linux-image-6\.12\.(\d+)\+deb(\d+)-amd64-unsigned$")
# Modules the initramfs loads itself (the rest come from the unpacked tree,
# through modprobe, after switch_root).
INITRAMFS_MODULES = ("9p", "9pnet_virtio")
BUSYBOX = Path("/bin/busybox")
BLKIO_INFO_SRC = Path("/usr/share/doc/libblkio-dev/examples/blkio-info.c")

GUEST_MEM = "2G"
GUEST_SMP = "2"
DEFAULT_TIMEOUT = float(os.environ.get("BLKIO_GUEST_TIMEOUT", "600"))
DISK_SIZE = 64 * 1024 * 1024
MiB = 1024 * 1024
# NVMe controllers, found in the guest by serial (names like /dev/ng0n1 depend
# on the order in which the kernel probes them, which is asynchronous).
NVME_SERIAL = "deadbeef"    # one plain namespace (nsid 1) over nvme.img
ZNS_SERIAL = "zns0"         # the zoned namespaces below


@dataclasses.dataclass(frozen=True)
class ZonedNamespace:
    """A zoned (ZNS) namespace on the ZNS_SERIAL controller (sizes in bytes)."""
    nsid: int
    image: str
    size: int
    zone_size: int
    zone_capacity: int
    max_open: int       # 0: no limit
    max_active: int     # 0: no limit

    def qemu_args(self, share: Path) -> list[str]:
        drive = f"zn{self.nsid}"
        return [
            "-drive", f"file={share / self.image},if=none,id={drive},format=raw",
            "-device", (f"nvme-ns,drive={drive},bus=nvme1,nsid={self.nsid},zoned=on,"
                        f"zoned.zone_size={self.zone_size},"
                        f"zoned.zone_capacity={self.zone_capacity},"
                        f"zoned.max_open={self.max_open},zoned.max_active={self.max_active}"),
        ]


ZONED_NAMESPACES = (
    # 16 zones of 4 MiB, at most 4 open / 4 active.
    ZonedNamespace(1, "zns.img", 64 * MiB, 4 * MiB, 4 * MiB, 4, 4),
    # Zone capacity < zone size: 8 zones of 4 MiB that hold 3 MiB each; fewer
    # open than active zones, so that open-all can run into max-open.
    ZonedNamespace(2, "zns-cap.img", 32 * MiB, 4 * MiB, 3 * MiB, 2, 3),
)
# Zone Append Size Limit: 2^5 * 4 KiB = 128 KiB (0 would mean MDTS, 512 KiB).
ZNS_ZASL = 5
# Marks printed on the serial console.
DONE_MARK = "BLKIO-GUEST-DONE"
INIT_FAIL_MARK = "BLKIO-GUEST-INIT-FAILED"
PROBE_MARK = "BLKIO-GUEST-PROBE-OK"


class GuestUnavailable(Exception):
    """The guest cannot be built or booted here (missing tool, kernel...)."""


class GuestError(Exception):
    """The guest booted (or tried to) but the run failed."""


def log(msg: str) -> None:
    if os.environ.get("BLKIO_GUEST_VERBOSE", "1") != "0":
        print(f"[guest] {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    try:
        return subprocess.run(list(cmd), **kw)
    except subprocess.CalledProcessError as e:
        raise GuestUnavailable(
            f"command failed ({e.returncode}): {shlex.join(cmd)}\n{e.stdout or ''}{e.stderr or ''}"
        ) from None
    except FileNotFoundError:
        raise GuestUnavailable(f"command not found: {cmd[0]}") from None


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive flock on a file in the cache (several pytest runs at once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise GuestUnavailable(
            "missing tools: " + ", ".join(missing)
            + " (scripts/install-system-deps.sh installs them)"
        )


# --------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kernel:
    root: Path       # unpacked package; modprobe -d looks in its lib/modules
    version: str     # uname -r of the guest

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return _module_tree(self.root) / self.version


def _module_tree(root: Path) -> Path:
    """The package's modules folder: usr/lib/modules in trixie's merged-/usr
    packages, lib/modules in bookworm's (bookworm-security ships 6.12 too)."""
    usr = root / "usr" / "lib" / "modules"
    return usr if usr.is_dir() else root / "lib" / "modules"


def _cached_kernel() -> Optional[Kernel]:
    kdir = CACHE / "kernel"
    found = []
    for ready in kdir.glob("*/.ready"):
        root = ready.parent
        mods = list(_module_tree(root).iterdir())
        if len(mods) == 1 and (root / "boot" / f"vmlinuz-{mods[0].name}").is_file():
            found.append(Kernel(root, mods[0].name))
    if not found:
        return None
    # Newest 6.12.N first.
    def key(k: Kernel):
        m = re.match(r"6\.12\.(\d+)\+deb(\d+)", k.version)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return max(found, key=key)


def _find_kernel_package() -> str:
    """The newest linux-image-6.12.*-amd64-unsigned apt can download."""
    out = _run(["apt-cache", "search", "--names-only",
                r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$"]).stdout
    names = []
    for line in out.splitlines():
        name = line.split(" - ", 1)[0].strip()
        m = KERNEL_PKG_RE.match(name)
        if m:
            names.append(((int(m.group(1)), int(m.group(2))), name))
    for _, name in sorted(names, reverse=True):
        pol = _run(["apt-cache", "policy", name]).stdout
        m = re.search(r"Candidate:\s*(\S+)", pol)
        if m and m.group(1) != "(none)":
            return name
    raise GuestUnavailable(
        "no linux-image-6.12.*-amd64-unsigned package known to apt "
        "(scripts/install-system-deps.sh adds Debian trixie; run apt-get update)"
    )


def ensure_kernel() -> Kernel:
    k = _cached_kernel()
    if k:
        return k
    _need_tools("apt-get", "apt-cache", "dpkg-deb", "depmod")
    pkg = _find_kernel_package()
    kdir = CACHE / "kernel"
    kdir.mkdir(parents=True, exist_ok=True)
    log(f"downloading {pkg} with apt-get (once; cached in {kdir})")
    with tempfile.TemporaryDirectory(dir=kdir) as tmp:
        _run(["apt-get", "download", "-q", pkg], cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise GuestUnavailable(f"apt-get download {pkg} gave {debs}")
        root = kdir / debs[0].stem
        if root.exists():
            shutil.rmtree(root)
        log(f"unpacking {debs[0].name}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    mods = list(_module_tree(root).iterdir())
    if len(mods) != 1:
        raise GuestUnavailable(f"unexpected module tree in {root}: {mods}")
    version = mods[0].name
    # modprobe -d / depmod -b look for <base>/lib/modules.
    if not (root / "lib").exists():
        (root / "lib").symlink_to("usr/lib")
    _run(["depmod", "-b", str(root), version])
    (root / ".ready").write_text(pkg + "\n")
    return Kernel(root, version)


# --------------------------------------------------------------------------
# initramfs
# --------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/busybox sh
# Tiny init: mount the host root (9p, read-only) and the result share, then
# switch_root into the job script on the share.
/bin/busybox --install -s /bin
export PATH=/bin
fail() {
    echo "@INIT_FAIL_MARK@: $*"
    echo o > /proc/sysrq-trigger
    sleep 30
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/sysrq
for m in @MODULES@; do
    insmod /modules/$m.ko || fail "insmod $m"
done
if grep -q blkio_guest.probe /proc/cmdline; then
    echo "@PROBE_MARK@"
    echo o > /proc/sysrq-trigger
    sleep 30
fi
mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose,ro rootfs /newroot \
    || fail "mount rootfs"
mount -t tmpfs -o mode=755 tmpfs /newroot/run || fail "tmpfs /run"
mkdir -p /newroot/run/share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 share /newroot/run/share \
    || fail "mount share"
# /tmp and /var/tmp stay the host's (read-only): the project and its venv may
# live there (CI clones anywhere); the job uses TMPDIR=/run.
for d in dev proc sys; do
    mount -o move /$d /newroot/$d || fail "move /$d"
done
exec switch_root /newroot /bin/sh /run/share/job.sh
fail "switch_root"
"""


def _module_chain(kernel: Kernel, names: Sequence[str]) -> list[Path]:
    """Module files to insmod, dependencies first, without duplicates."""
    chain: list[Path] = []
    for name in names:
        out = _run(["modprobe", "-d", str(kernel.root), "-S", kernel.version,
                    "--show-depends", name]).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod":
                p = Path(parts[1])
                if p not in chain:
                    chain.append(p)
    return chain


def ensure_initramfs(kernel: Kernel) -> Path:
    out = CACHE / f"initramfs-{kernel.version}.cpio"
    init_text = (INIT_SCRIPT.replace("@INIT_FAIL_MARK@", INIT_FAIL_MARK)
                 .replace("@PROBE_MARK@", PROBE_MARK))
    stamp = out.with_suffix(".stamp")
    # Rebuild when the init script changes.
    digest = hashlib.sha256(init_text.encode()).hexdigest()
    if out.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return out
    _need_tools("cpio", "modprobe")
    if not BUSYBOX.is_file():
        raise GuestUnavailable("no /bin/busybox (install busybox-static)")
    log(f"building {out.name}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        t = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "modules", "newroot"):
            (t / d).mkdir()
        shutil.copy2(BUSYBOX, t / "bin" / "busybox")
        (t / "bin" / "sh").symlink_to("busybox")
        mods = []
        for ko in _module_chain(kernel, INITRAMFS_MODULES):
            name = ko.name.split(".ko")[0]
            data = ko.read_bytes()
            if ko.name.endswith(".xz"):
                data = lzma.decompress(data)
            elif ko.name.endswith(".zst"):
                raise GuestUnavailable(f"zstd module {ko} not supported")
            (t / "modules" / f"{name}.ko").write_bytes(data)
            mods.append(name)
        init = t / "init"
        init.write_text(init_text.replace("@MODULES@", " ".join(mods)))
        init.chmod(0o755)
        files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=t, check=True,
                               stdout=subprocess.PIPE).stdout
        with open(str(out) + ".tmp", "wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=t,
                           input=files, stdout=f, check=True)
        os.replace(str(out) + ".tmp", out)
    stamp.write_text(digest)
    return out


# --------------------------------------------------------------------------
# blkio-info (libblkio's C example), for the smoke test in the guest
# --------------------------------------------------------------------------

def ensure_blkio_info() -> Optional[Path]:
    out = CACHE / "bin" / "blkio-info"
    if out.is_file():
        return out
    src = BLKIO_INFO_SRC
    if not src.is_file() and Path(str(src) + ".gz").is_file():
        import gzip
        CACHE.joinpath("bin").mkdir(parents=True, exist_ok=True)
        plain = CACHE / "bin" / "blkio-info.c"
        plain.write_bytes(gzip.decompress(Path(str(src) + ".gz").read_bytes()))
        src = plain
    if not src.is_file():
        return None
    return _compile_against_libblkio(src, out)


def _compile_against_libblkio(src: Path, out: Path) -> Optional[Path]:
    """gcc src -> out with libblkio's flags; None (logged) when it cannot."""
    if shutil.which("gcc") is None or shutil.which("pkg-config") is None:
        return None
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "blkio"],
                           stdout=subprocess.PIPE, text=True)
    if flags.returncode != 0:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    r = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(src), *flags.stdout.split()],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        log(f"cannot build {out.name}: {r.stdout}")
        return None
    os.replace(tmp, out)
    return out


def ensure_zone_probe() -> Optional[Path]:
    """zone_probe.c (libblkio's zone calls from C), rebuilt when it changes."""
    src = HERE / "zone_probe.c"
    out = CACHE / "bin" / "zone-probe"
    stamp = out.with_suffix(".stamp")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    if out.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return out
    if _compile_against_libblkio(src, out) is None:
        return None
    stamp.write_text(digest)
    return out


# --------------------------------------------------------------------------
# QEMU
# --------------------------------------------------------------------------

def _qemu() -> str:
    name = os.environ.get("BLKIO_GUEST_QEMU", "qemu-system-x86_64")
    q = shutil.which(name)
    if q is None:
        raise GuestUnavailable(f"{name} not found (install qemu-system-x86)")
    return q


def _child_setup() -> None:
    """In the QEMU child: own process group (killed as a group), and die
    with the parent if the test process is killed."""
    os.setsid()
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except OSError:
        pass


def _qemu_base(accel: str, kernel: Kernel, initrd: Path, console: Path,
               append: str) -> list[str]:
    machine = "q35,accel=kvm,kernel-irqchip=split" if accel == "kvm" else "q35,accel=tcg"
    return [
        _qemu(), "-M", machine, "-cpu", "host" if accel == "kvm" else "max",
        "-m", GUEST_MEM, "-smp", GUEST_SMP,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 {append}",
    ]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _boot(cmd: list[str], console: Path, timeout: float,
          done: Optional[str] = None) -> tuple[Optional[int], float]:
    """Run QEMU until it exits (or `done` shows on the console and QEMU still
    runs 10 s later), killing it on timeout.  Returns (exit code or None on
    timeout, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=_child_setup)
    try:
        done_at = None
        while True:
            try:
                proc.wait(timeout=0.5)
                return proc.returncode, time.monotonic() - start
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - start > timeout:
                return None, now - start
            if done and done_at is None and console.exists():
                try:
                    if done in console.read_text(errors="replace"):
                        done_at = now
                except OSError:
                    pass
            if done_at is not None and now - done_at > 10:
                return None, now - start
    finally:
        _kill(proc)
        if proc.stdout:
            qout = proc.stdout.read().decode(errors="replace")
            proc.stdout.close()
            if qout.strip():
                with open(console, "a") as f:
                    f.write("\n[qemu] " + qout)


def _kvm_usable(kernel: Kernel, initrd: Path) -> bool:
    """Does a KVM guest really boot here?  Cached per host kernel and QEMU."""
    if os.environ.get("BLKIO_GUEST_ACCEL") in ("kvm", "tcg"):
        return os.environ["BLKIO_GUEST_ACCEL"] == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    qver = _run([_qemu(), "--version"]).stdout.splitlines()[0]
    key = f"{os.uname().release} | {qver} | {kernel.version}"
    cache = CACHE / "kvm-probe.json"
    try:
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return bool(data["kvm"])
    except (OSError, ValueError, KeyError):
        pass
    log("probing whether KVM boots a guest here (once)")
    with tempfile.TemporaryDirectory() as tmp:
        console = Path(tmp) / "console.log"
        cmd = _qemu_base("kvm", kernel, initrd, console, "blkio_guest.probe")
        rc, secs = _boot(cmd, console, timeout=20)
        text = console.read_text(errors="replace") if console.exists() else ""
        ok = PROBE_MARK in text
    log(f"KVM {'works' if ok else 'does not boot a guest'} (probe {secs:.1f} s)")
    cache.write_text(json.dumps({"key": key, "kvm": ok}))
    return ok


@dataclasses.dataclass
class Prepared:
    kernel: Kernel
    initrd: Path
    accel: str
    blkio_info: Optional[Path]
    zone_probe: Optional[Path] = None


def prepare() -> Prepared:
    """Fetch/build everything a boot needs (cached).  Raises GuestUnavailable."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise GuestUnavailable("the guest harness needs an x86_64 Linux host")
    _qemu()
    with _locked("prepare.lock"):
        kernel = ensure_kernel()
        initrd = ensure_initramfs(kernel)
        info = ensure_blkio_info()
        probe = ensure_zone_probe()
        accel = "kvm" if _kvm_usable(kernel, initrd) else "tcg"
    return Prepared(kernel, initrd, accel, info, probe)


JOB_SCRIPT = r"""#!/bin/sh
# Runs in the guest as PID 1 after switch_root; powers the guest off at the end.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/run TMPDIR=/run PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
S=/run/share
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# Kernel modules come from the unpacked package in the (read-only) cache; the
# host has no /lib/modules to mount over, so wrap modprobe.
cat > /run/modprobe <<EOF
#!/bin/sh
exec /sbin/modprobe -d @KROOT@ "\$@"
EOF
chmod 755 /run/modprobe
echo /run/modprobe > /proc/sys/kernel/modprobe
mkdir -p /run/bin
ln -s /run/modprobe /run/bin/modprobe
export PATH=/run/bin:$PATH
@ENV@
echo "guest userspace up after $(cut -d' ' -f1 /proc/uptime) s"
cd /run
(
  # SIGINT before the host's deadline makes pytest stop and still write junit.
  timeout -s INT -k 20 @SUITE_TIMEOUT@ @PYTHON@ -m pytest -p no:cacheprovider -p no:hypothesispytest -p no:benchmark --confcutdir=@TESTDIR@ --rootdir=@TESTDIR@ \
      -o addopts= -o 'filterwarnings=error' -o junit_logging=out-err --import-mode=importlib \
      -v -rA --tb=short --junitxml=$S/junit.xml @PYTEST_ARGS@ @TESTDIR@ ; echo $? > $S/pytest.rc
) 2>&1 | tee $S/pytest.log
dmesg > $S/dmesg.log 2>&1
sync
echo "@DONE_MARK@ rc=$(cat $S/pytest.rc 2>/dev/null) uptime=$(cut -d' ' -f1 /proc/uptime)"
echo o > /proc/sysrq-trigger
while :; do :; done    # (the root fs goes away under power-off; no external sleep)
"""


@dataclasses.dataclass
class GuestRun:
    ok: bool                 # pytest ran to the end in the guest
    junit: Optional[Path]    # junit XML written by the in-guest pytest
    console: str             # serial console text
    pytest_log: str
    seconds: float
    accel: str
    workdir: Path
    message: str = ""

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-n:])


def run_guest(pytest_args: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT,
              workdir: Optional[Path] = None, prepared: Optional[Prepared] = None) -> GuestRun:
    """Boot one guest, run the in-guest suite, return the results.

    Raises GuestUnavailable when the guest cannot be built here; otherwise
    returns a GuestRun (ok=False when the guest did not finish)."""
    prep = prepared or prepare()
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="blkio-guest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    share = workdir / "share"
    share.mkdir(exist_ok=True)
    console = workdir / "console.log"
    console.unlink(missing_ok=True)
    # The images live on the read-write share, so that in-guest tests can
    # check that data written through a driver reached the backing file.
    for name in ("nvme.img", "vfio.img"):
        with open(share / name, "wb") as f:
            f.truncate(DISK_SIZE)
    for zns in ZONED_NAMESPACES:
        with open(share / zns.image, "wb") as f:
            f.truncate(zns.size)

    env = {
        "BLKIO_GUEST": "1",
        "BLKIO_GUEST_KROOT": str(prep.kernel.root),
        "BLKIO_GUEST_SHARE": "/run/share",
        "BLKIO_GUEST_INFO": str(prep.blkio_info or ""),
        "BLKIO_GUEST_DISK_SIZE": str(DISK_SIZE),
        "BLKIO_GUEST_NVME_IMAGE": "/run/share/nvme.img",
        "BLKIO_GUEST_VFIO_IMAGE": "/run/share/vfio.img",
        "BLKIO_GUEST_NVME_SERIAL": NVME_SERIAL,
        "BLKIO_GUEST_ZNS_SERIAL": ZNS_SERIAL,
        "BLKIO_GUEST_ZONED": json.dumps([
            dict(dataclasses.asdict(z), image=f"/run/share/{z.image}")
            for z in ZONED_NAMESPACES]),
        "BLKIO_GUEST_ZONE_PROBE": str(prep.zone_probe or ""),
    }
    job = (JOB_SCRIPT
           .replace("@KROOT@", shlex.quote(str(prep.kernel.root)))
           .replace("@ENV@", "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))
           .replace("@TESTDIR@", shlex.quote(str(IN_GUEST_DIR)))
           .replace("@PYTHON@", shlex.quote(sys.executable))
           .replace("@PYTEST_ARGS@", " ".join(shlex.quote(a) for a in pytest_args))
           .replace("@DONE_MARK@", DONE_MARK)
           .replace("@SUITE_TIMEOUT@", str(max(30, int(timeout) - 60))))
    (share / "job.sh").write_text(job)
    (share / "job.sh").chmod(0o755)

    cmd = _qemu_base(prep.accel, prep.kernel, prep.initrd, console,
                     "intel_iommu=on iommu=pt loglevel=4")
    # The IOMMU comes before the PCI devices.
    cmd += [
        "-device", "intel-iommu",
        "-fsdev", "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=r,mount_tag=rootfs",
        "-fsdev", f"local,id=s,path={share},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=s,mount_tag=share",
        "-drive", f"file={share / 'nvme.img'},if=none,id=nv0,format=raw",
        "-device", f"nvme,serial={NVME_SERIAL},drive=nv0",
        # Zoned namespaces on a second controller.
        *(["-device", f"nvme,id=nvme1,serial={ZNS_SERIAL},zoned.zasl={ZNS_ZASL}"]
          if ZONED_NAMESPACES else []),
        *[arg for zns in ZONED_NAMESPACES for arg in zns.qemu_args(share)],
        "-drive", f"file={share / 'vfio.img'},if=none,id=vb0,format=raw",
        "-device", "virtio-blk-pci,drive=vb0,disable-legacy=on,iommu_platform=on",
    ]
    (workdir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
    log(f"booting guest ({prep.accel}, timeout {timeout:.0f} s) in {workdir}")
    with _locked("guest.lock"):   # one guest at a time per cache
        rc, secs = _boot(cmd, console, timeout, done=DONE_MARK)
    text = console.read_text(errors="replace") if console.exists() else ""
    plog = share / "pytest.log"
    pytest_log = plog.read_text(errors="replace") if plog.exists() else ""
    junit = share / "junit.xml"
    finished = DONE_MARK in text
    msg = ""
    if rc is None and not finished:
        msg = f"guest timed out after {secs:.0f} s (QEMU killed)"
    elif INIT_FAIL_MARK in text:
        msg = "guest init failed: " + text.split(INIT_FAIL_MARK, 1)[1].splitlines()[0]
    elif not finished:
        msg = f"guest stopped before the suite finished (QEMU exit {rc})"
    log(f"guest done in {secs:.1f} s" + (f": {msg}" if msg else ""))
    return GuestRun(ok=finished and junit.exists(), junit=junit if junit.exists() else None,
                    console=text, pytest_log=pytest_log, seconds=secs, accel=prep.accel,
                    workdir=workdir, message=msg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("pytest_args", nargs="*", help="extra in-guest pytest args (after --)")
    a = ap.parse_args(argv)
    try:
        prep = prepare()
    except GuestUnavailable as e:
        print(f"guest unavailable: {e}", file=sys.stderr)
        return 2
    print(f"kernel {prep.kernel.version}, accel {prep.accel}, blkio-info {prep.blkio_info}")
    if a.prepare_only:
        return 0
    run = run_guest(a.pytest_args, timeout=a.timeout, prepared=prep)
    print(run.pytest_log or run.tail())
    print(f"--- {run.seconds:.1f} s, ok={run.ok} {run.message}; workdir {run.workdir}")
    if not a.keep and run.ok:
        shutil.rmtree(run.workdir, ignore_errors=True)
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
