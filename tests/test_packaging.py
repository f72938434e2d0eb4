"""The source checkout as a developer uses it, after ``make test``: commands run
from the repository root get the installed package (src/ layout: no ``blkio/``
at the root to shadow it), the ``blkio`` console command is ``python -m blkio``,
and the version is the one in meson.build everywhere."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import blkio

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _installed_dirs():
    paths = sysconfig.get_paths()
    return {Path(paths["platlib"]).resolve(), Path(paths["purelib"]).resolve()}


def _from_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _image(tmp_path: Path, size: int = 4 << 20) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_blkio_imported_here_is_the_installed_one():
    where = Path(blkio.__file__).resolve().parent.parent
    assert where in _installed_dirs(), \
        f"blkio comes from {where}, not site-packages: the source tree shadows it"


def test_import_from_repository_root_gets_the_installed_package():
    proc = _from_root("-c", "import blkio, json; print(json.dumps(blkio.__file__))")
    assert proc.returncode == 0, proc.stderr
    where = Path(json.loads(proc.stdout)).resolve().parent.parent
    assert where in _installed_dirs(), f"`import blkio` at {ROOT} found {where}"


def test_python_m_blkio_info_from_repository_root(tmp_path):
    image = _image(tmp_path)
    proc = _from_root("-m", "blkio", "info", "io_uring", f"path={image}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["capacity"] == 4 << 20


def test_python_m_pytest_from_repository_root():
    test = "tests/test_packaging.py::test_blkio_imported_here_is_the_installed_one"
    proc = _from_root("-m", "pytest", "-q", "-p", "no:cacheprovider", test)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr


def test_console_command_is_python_m_blkio(tmp_path):
    image = _image(tmp_path)
    script = subprocess.run([BIN / "blkio", "info", "io_uring", f"path={image}"],
                            capture_output=True, text=True, timeout=120)
    module = subprocess.run([sys.executable, "-m", "blkio", "info", "io_uring", f"path={image}"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert script.returncode == 0 and module.returncode == 0, script.stderr + module.stderr
    assert json.loads(script.stdout) == json.loads(module.stdout)
    usage = subprocess.run([BIN / "blkio", "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: blkio "), usage.stdout


def test_console_command_reports_a_missing_file_by_name(tmp_path):
    missing = tmp_path / "nope.img"
    proc = subprocess.run([BIN / "blkio", "info", "io_uring", f"path={missing}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1          # a runtime failure (2 is a bad command line)
    assert proc.stderr.startswith("blkio info: ") and "nope.img" in proc.stderr, proc.stderr


def test_version_is_meson_projects_everywhere():
    project = re.search(r"project\([^)]*?version:\s*'([^']+)'", (ROOT / "meson.build").read_text(),
                        re.S)
    assert project, "meson.build's project() sets no version"
    from blkio import _version
    assert _version.version == project.group(1)
    assert importlib.metadata.version("blkio") == project.group(1)
    assert blkio.__version__ == project.group(1)
