"""Smoke test without the Python package: libblkio's own blkio-info example
(compiled on the host by the launcher) connects to each device."""

import os
import subprocess

import pytest

INFO = os.environ.get("BLKIO_GUEST_INFO", "")
PROPS = ("capacity", "request-alignment", "buf-alignment", "mem-region-alignment",
         "max-segments", "max-transfer", "needs-mem-regions", "max-queues")


def test_blkio_info(target):
    if not INFO:
        pytest.skip("blkio-info was not built on the host (needs gcc, libblkio-dev)")
    driver, path = target.driver, target.path
    r = subprocess.run([INFO, "--output=json", driver, f"path={path}", *PROPS],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    print(r.stdout)
    assert r.returncode == 0, r.stdout
    assert '"capacity"' in r.stdout
