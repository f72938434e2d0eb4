"""``reconnect=True``: a vhost-user device survives a restart of its daemon.

The restarts are real: qemu-storage-daemon killed with SIGKILL during a
write-heavy workload, its socket removed, and the daemon started again on
the same socket and image.  Each workload runs in a child interpreter
(tests/reconnect_child.py: a crash fails one test) through 10 restarts,
with a shadow model of every acknowledged write checked against every read
and, at the end, against the image file and the device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import blkio
import blkio.aio
from conftest import require, sigint_default

CHILD = Path(__file__).resolve().parent / "reconnect_child.py"
DRIVER = "virtio-blk-vhost-user"
CYCLES = 10


def _child(tmp_path: Path, scenario: str, **cfg: object) -> dict:
    require(shutil.which("qemu-storage-daemon"),
            "qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    cfg = dict(cfg, scenario=scenario, dir=str(tmp_path))
    proc = subprocess.run([sys.executable, str(CHILD), json.dumps(cfg)], capture_output=True,
                          text=True, timeout=300, cwd=str(CHILD.parent),
                          preexec_fn=sigint_default)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {}
    assert proc.returncode == 0 and not out.get("errors"), (
        f"child exited with {proc.returncode}\nsummary: {out}\nstderr:\n{proc.stderr[-6000:]}")
    return out


# ---------------------------------------------------------------------------
# Every API through 10 restarts, nothing lost


@pytest.mark.parametrize("scenario", ["blocking", "queue", "batch", "aio", "aio_batch"])
def test_every_acknowledged_write_survives_ten_daemon_restarts(tmp_path, scenario):
    # blocking: 4 threads on 2 queues (one bouncing plain numpy memory);
    # queue: QD32 with Completions and user_data; batch: submit_writes/reads
    # and reap; aio: 16 tasks awaiting single requests; aio_batch: 3 tasks
    # awaiting write_batch/read_batch.
    out = _child(tmp_path, scenario, cycles=CYCLES, num_queues=2 if scenario == "blocking" else 1)
    assert out["reconnects"] == CYCLES
    assert out["resubmitted"] > 0          # requests were in flight at the kills
    assert out["writes"] > CYCLES and out["reads"] > 0


def test_blkio_copy_verify_finishes_across_a_daemon_restart(tmp_path):
    # `blkio copy --reconnect --verify` onto the export; the daemon killed
    # and restarted in the middle of each copy.
    out = _child(tmp_path, "copy", cycles=CYCLES)
    assert out["copies"] == CYCLES
    assert out["mid_copy"] >= CYCLES // 2, out      # not a vacuous race


def test_a_daemon_that_never_comes_back_fails_every_wait_with_the_reconnect_error(tmp_path):
    # Blocking write, Queue.wait, Queue.reap, asyncio awaits (per request and
    # batch): EIO naming reconnect_timeout; the device is broken, then closes.
    out = _child(tmp_path, "gone", timeout=0.5)
    assert set(out) >= {"blocking_s", "queue_s", "batch_s", "aio_s"}


def test_close_during_a_reconnect_ends_the_parked_calls_and_the_watcher(tmp_path):
    _child(tmp_path, "close_during")


def test_ctrl_c_while_waiting_for_a_reconnect_interrupts_and_the_request_survives(tmp_path):
    out = _child(tmp_path, "sigint")
    assert out["stats"][4] == 1 and out["stats"][5] >= 1      # reconnects, resubmitted


def test_a_daemon_back_with_another_disk_fails_the_reconnect_saying_what_differs(tmp_path):
    _child(tmp_path, "differs")


def test_asyncio_without_reconnect_fails_awaits_when_the_daemon_dies(tmp_path):
    # Before, the loop never noticed: the awaits hung.
    _child(tmp_path, "aio_dead")


# ---------------------------------------------------------------------------
# Arguments and the watcher thread


@pytest.fixture
def image(make_image):
    return make_image(1 << 20)


def test_reconnect_is_refused_where_there_is_no_daemon(image):
    with pytest.raises(ValueError, match="no backend daemon"):
        blkio.open("io_uring", image.path, reconnect=True)


@pytest.mark.parametrize("value, error", [("yes", TypeError), (1, TypeError), (None, TypeError)])
def test_reconnect_takes_a_bool(image, value, error):
    with pytest.raises(error, match="reconnect takes a bool"):
        blkio.open("io_uring", image.path, reconnect=value)


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1.5, ValueError),
                                          ("5", TypeError), (True, TypeError)])
def test_reconnect_timeout_takes_positive_seconds_or_none(image, value, error):
    with pytest.raises(error, match="reconnect_timeout"):
        blkio.open("io_uring", image.path, reconnect_timeout=value)


def _watchers():
    return [t for t in threading.enumerate() if t.name.endswith("reconnect")]


def test_only_a_device_that_reconnects_has_a_watcher_thread_and_close_ends_it(qsd):
    daemon = qsd()
    before = len(_watchers())
    with blkio.open(DRIVER, daemon.socket) as dev:
        assert len(_watchers()) == before
        assert dev.stats.reconnects == 0 and dev.stats.resubmitted == 0
    with blkio.open(DRIVER, daemon.socket, reconnect=True, reconnect_timeout=5) as dev:
        assert len(_watchers()) == before + 1
        assert dev.read(0, 4096).tobytes() == daemon.raw.pread(0, 4096)
    for t in _watchers():
        t.join(5)
    assert len(_watchers()) == before


def test_stats_name_the_reconnect_counters_last(image):
    assert blkio.Stats._fields[-2:] == ("reconnects", "resubmitted")
    with blkio.open("io_uring", image.path) as dev:
        assert dev.stats.reconnects == 0 and dev.stats.resubmitted == 0
