"""What ``make dist`` built, installed the way a user installs it.

- The repaired wheel for the Python running these tests goes into a fresh venv
  inside a mount namespace where the system libblkio is hidden (``/dev/null``
  bound over the library file): an io_uring round trip must work with the
  bundled copy mapped (``/proc/self/maps``), the ``blkio`` console command must
  run, and the host suite's API modules (``WHEEL_SUITE``) must pass against it,
  run from a copy of ``tests/`` outside the source tree.
- Every other wheel in dist/: a fresh venv with its Python, same namespace,
  import + round trip with the bundled copy.
- The sdist: a fresh venv, ``pip install`` as a user does (it builds against
  the system libblkio-dev), import + round trip.
- dist/'s files themselves: tags, bundled library, license texts, metadata.

They need ``make dist`` first (it writes build/dist/manifest.json, naming the
Python of each wheel).  Without it, or where ``unshare -m`` is not permitted,
they skip with the reason; with CI=true they fail (conftest.require).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "build" / "dist" / "manifest.json"
PROBE = Path(__file__).resolve().parent / "wheel_probe.py"
THIS_TAG = "cp%d%d" % sys.version_info[:2]
GLIBC_FLOOR = (2, 34)


def _load_manifest() -> Dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}


def _other_tags() -> List[str]:
    return [w["tag"] for w in _load_manifest().get("wheels", []) if w["tag"] != THIS_TAG]


def _run(cmd, *, timeout=900, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(kw.pop("env", {}))
    return subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, env=env, **kw)


def _ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc.stdout


# ---------------------------------------------------------------------------
# Fixtures: the manifest, the namespace, the venvs


@pytest.fixture(scope="module")
def manifest() -> Dict:
    require(MANIFEST.is_file(), f"no {MANIFEST.relative_to(ROOT)}: run `make dist` first")
    data = _load_manifest()
    for path in [data["sdist"]] + [w["wheel"] for w in data["wheels"]]:
        assert Path(path).is_file(), f"{path} is in the manifest but missing: run `make dist`"
    return data


def _system_libblkio() -> List[Path]:
    """Every libblkio file the dynamic loader could find (the real files)."""
    out = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        m = re.match(r"\s*libblkio\.so\S* \(.*\) => (\S+)", line)
        if m:
            found.add(Path(m.group(1)).resolve())
    return sorted(p for p in found if p.is_file())


class Namespace:
    """Runs commands in a new mount namespace with the system libblkio hidden."""

    def __init__(self, libs: List[Path]):
        self.libs = libs
        mounts = "".join(f"mount --bind /dev/null {shlex.quote(str(p))} && " for p in libs)
        self.prefix = ["unshare", "--mount", "--propagation", "private",
                       "sh", "-c", mounts + 'exec "$@"', "sh"]

    def run(self, cmd, **kw) -> subprocess.CompletedProcess:
        return _run(self.prefix + [str(c) for c in cmd], **kw)


@pytest.fixture(scope="module")
def hidden() -> Namespace:
    ns = Namespace(_system_libblkio())
    try:
        probe = ns.run(["true"], timeout=60)
        reason = probe.stdout.strip()
    except FileNotFoundError as e:
        probe, reason = None, str(e)
    require(probe is not None and probe.returncode == 0,
            f"cannot hide the system libblkio: `unshare --mount` + `mount --bind` "
            f"not permitted here ({reason})")
    return ns


def _fresh_venv(python: str, where: Path, ns: Namespace = None) -> Path:
    run = ns.run if ns else _run
    _ok(run([python, "-m", "venv", where], timeout=300), f"{python} -m venv")
    return where / "bin" / "python"


def _probe(py: Path, workdir: Path, ns: Namespace = None) -> Dict:
    workdir.mkdir(exist_ok=True)
    run = ns.run if ns else _run
    out = _ok(run([py, "-I", PROBE, workdir], cwd=workdir, timeout=300), "the round-trip probe")
    return json.loads(out.strip().splitlines()[-1])


def _assert_uses_bundled(report: Dict, venv: Path, version: str) -> None:
    site = Path(report["prefix"]).resolve()
    assert site == venv.resolve(), f"probe ran in {site}, not the fresh venv {venv}"
    assert Path(report["blkio_file"]).resolve().is_relative_to(venv.resolve()), report
    maps = report["libblkio_maps"]
    assert maps, "no libblkio mapped after a round trip"
    for path in maps:
        assert "/site-packages/blkio.libs/libblkio-" in path and path.startswith(str(venv)), \
            f"{path} is mapped, not the wheel's bundled copy"
    assert report["round_trip_bytes"] == 64 * 1024
    assert report["version"] == report["dist_version"] == version, report


def _wheel_version(wheel: str) -> str:
    return Path(wheel).name.split("-")[1]


@pytest.fixture(scope="module")
def this_wheel(manifest) -> Dict:
    entries = [w for w in manifest["wheels"] if w["tag"] == THIS_TAG]
    require(entries, f"dist/ has no wheel for {THIS_TAG} (the Python running the tests): "
                     "run `make dist`")
    return entries[0]


@pytest.fixture(scope="module")
def wheel_venv(this_wheel, hidden, tmp_path_factory) -> Path:
    """A fresh venv holding this Python's repaired wheel with its test extra."""
    venv = tmp_path_factory.mktemp("wheel") / "venv"
    py = _fresh_venv(sys.executable, venv, hidden)
    _ok(hidden.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"{this_wheel['wheel']}[test,cli]"], timeout=900),
        f"pip install {Path(this_wheel['wheel']).name}[test,cli]")
    return venv


# ---------------------------------------------------------------------------
# The namespace really hides the library (else nothing below could fail)


def test_system_libblkio_cannot_be_loaded_in_the_namespace(hidden):
    load = [sys.executable, "-I", "-c", "import ctypes; ctypes.CDLL('libblkio.so.1')"]
    inside = hidden.run(load, timeout=60)
    assert inside.returncode != 0, "libblkio.so.1 still loads inside the namespace"
    assert "libblkio.so.1" in inside.stdout, inside.stdout
    if hidden.libs:  # outside, the same load works: the namespace is the difference
        _ok(_run(load, timeout=60), "loading the system libblkio outside the namespace")


# ---------------------------------------------------------------------------
# The wheel for this Python


def test_wheel_round_trip_uses_the_bundled_libblkio(wheel_venv, hidden, this_wheel, tmp_path):
    report = _probe(wheel_venv / "bin" / "python", tmp_path, hidden)
    _assert_uses_bundled(report, wheel_venv, _wheel_version(this_wheel["wheel"]))


def test_console_command_matches_python_m_blkio(wheel_venv, hidden, tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    script = _ok(hidden.run([wheel_venv / "bin" / "blkio", "info", "io_uring", f"path={image}"],
                            cwd=tmp_path, timeout=120), "blkio info")
    module = _ok(hidden.run([wheel_venv / "bin" / "python", "-m", "blkio", "info", "io_uring",
                             f"path={image}"], cwd=tmp_path, timeout=120), "python -m blkio info")
    assert json.loads(script)["capacity"] == 8 << 20
    assert json.loads(script) == json.loads(module)
    bad = hidden.run([wheel_venv / "bin" / "blkio", "info", "io_uring", f"path={tmp_path / 'nope'}"],
                     cwd=tmp_path, timeout=120)
    # a device that cannot be opened is a runtime failure (1); 2 is a bad command line
    assert bad.returncode == 1 and bad.stdout.startswith("blkio info: "), bad.stdout


# The modules run against the wheel: every API and driver the host has, the
# CLI and the stubs, through the wheel's extension and bundled libblkio.  The
# rest of the host suite (lifetime torture, fuzzer, threads, faults, copy and
# bench CLIs, docs) runs the same compiled sources in the main run and under
# ASan; run here too it doubled the suite's time.
WHEEL_SUITE = ("test_device.py", "test_io.py", "test_queue.py", "test_batch.py",
               "test_aio.py", "test_aio_batch.py", "test_large_io.py", "test_pool.py",
               "test_surface.py", "test_vhost_user.py", "test_zoned.py", "test_cli.py",
               "test_typing.py")


def _copy_suite(dest: Path) -> Path:
    """tests/ and the pytest settings, without the source package."""
    shutil.copytree(ROOT / "tests", dest / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", ".cache", ".pytest_cache"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")  # [tool.pytest.ini_options]
    return dest


def test_host_suite_passes_against_the_wheel(wheel_venv, hidden, tmp_path, capsys):
    suite = _copy_suite(tmp_path / "suite")
    assert not (suite / "blkio").exists() and not (suite / "src").exists()
    proc = hidden.run(
        [wheel_venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *(f"tests/{name}" for name in WHEEL_SUITE)],
        cwd=suite, env={"BLKIO_SKIP_GUEST": "1"}, timeout=3600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    _ok(proc, "the host suite against the wheel")
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, summary
    with capsys.disabled():
        print(f"\n[host suite against the {THIS_TAG} wheel, system libblkio hidden] {summary}")


# ---------------------------------------------------------------------------
# Every other wheel


@pytest.mark.parametrize("tag", _other_tags())
def test_other_wheel_round_trip_uses_the_bundled_libblkio(tag, manifest, hidden, tmp_path):
    entry = next(w for w in manifest["wheels"] if w["tag"] == tag)
    venv = tmp_path / "venv"
    py = _fresh_venv(entry["python"], venv, hidden)
    _ok(hidden.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    entry["wheel"]], timeout=900), f"pip install {Path(entry['wheel']).name}")
    report = _probe(py, tmp_path / "work", hidden)
    _assert_uses_bundled(report, venv, _wheel_version(entry["wheel"]))


# ---------------------------------------------------------------------------
# The sdist


def test_sdist_installs_with_pip_and_round_trips(manifest, tmp_path):
    venv = tmp_path / "venv"
    py = _fresh_venv(sys.executable, venv)
    _ok(_run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", manifest["sdist"]],
             timeout=1800), f"pip install {Path(manifest['sdist']).name}")
    report = _probe(py, tmp_path / "work")
    assert Path(report["blkio_file"]).resolve().is_relative_to(venv.resolve()), report
    assert report["round_trip_bytes"] == 64 * 1024
    # Built from source, it links the system libblkio, not a bundled copy.
    assert report["libblkio_maps"] and all("blkio.libs" not in p for p in report["libblkio_maps"])
    version = Path(manifest["sdist"]).name[len("blkio-"):-len(".tar.gz")]
    assert report["version"] == report["dist_version"] == version, report


# ---------------------------------------------------------------------------
# The files in dist/


def test_each_wheel_is_manylinux_2_34_with_libblkio_and_licenses(manifest):
    for entry in manifest["wheels"]:
        name = Path(entry["wheel"]).name
        assert f"-{entry['tag']}-{entry['tag']}-" in name, name
        floors = [(int(a), int(b)) for a, b in re.findall(r"manylinux_(\d+)_(\d+)_x86_64", name)]
        assert floors and max(floors) <= GLIBC_FLOOR, f"{name}: needs a newer glibc than 2.34"
        with zipfile.ZipFile(entry["wheel"]) as zf:
            names = zf.namelist()
            assert [n for n in names if re.fullmatch(r"blkio\.libs/libblkio-\w+\.so[.\d]*", n)], \
                f"{name} bundles no libblkio"
            info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
            for lic in ("LICENSE-MIT", "LICENSE-APACHE", "LICENSES/libblkio/copyright",
                        "LICENSES/libblkio/Apache-2.0"):
                assert f"{info}/licenses/{lic}" in names, f"{name}: no {lic}"
            copyright_text = zf.read(f"{info}/licenses/LICENSES/libblkio/copyright").decode()
            assert "BSD-3-Clause" in copyright_text and "Upstream-Name: libblkio" in copyright_text
            meta = zf.read(f"{info}/METADATA").decode()
            entry_points = zf.read(f"{info}/entry_points.txt").decode()
        minor = f"{entry['tag'][2]}.{entry['tag'][3:]}"
        assert f"Classifier: Programming Language :: Python :: {minor}\n" in meta, name
        assert "Requires-Python: >=3.9\n" in meta and "License-Expression: MIT OR Apache-2.0" in meta
        assert "Description-Content-Type: text/markdown" in meta and "# blkio for Python" in meta
        assert re.search(r"^blkio = blkio\.cli:main$", entry_points, re.M), entry_points


def test_sdist_holds_the_sources_and_licenses(manifest):
    with tarfile.open(manifest["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("PKG-INFO", "pyproject.toml", "meson.build", "LICENSE-MIT", "LICENSE-APACHE",
                   "LICENSES/libblkio/copyright", "src/blkio/_handle.pyx", "src/blkio/_engine.pyx", "src/blkio/_fork.h",
                   "src/blkio/_libblkio.pxd", "src/blkio/_version.py.in", "src/blkio/meson.build"):
        assert needed in names, f"the sdist lacks {needed}"
    assert not [n for n in names if n.startswith((".venv/", "build/", "dist/"))]


def test_a_wheel_for_every_python_make_dist_found(manifest):
    """One wheel per CPython tag, none twice (the list comes from the machine)."""
    tags = [w["tag"] for w in manifest["wheels"]]
    assert tags and len(tags) == len(set(tags))
    assert THIS_TAG in tags, f"no wheel for the Python running the tests ({THIS_TAG})"
    for entry in manifest["wheels"]:
        assert Path(entry["python"]).exists(), entry
