"""Command line: ``python -m blkio bench`` (the JSON of libblkio's C
blkio-bench) and ``python -m blkio info``.  Run as subprocesses in a temp
directory, so that the installed package is used, not the source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# The keys print_stats() writes in libblkio's examples/blkio-bench.c, in order,
# and ours: the latency percentiles (issue 33).
STAT_KEYS = ["kiops", "gips", "min_lat_us", "mean_lat_us", "max_lat_us", "calls",
             "min_completions", "mean_completions", "max_completions", "lat_us"]
LAT_KEYS = ["p50", "p90", "p99", "p99.9", "p99.99", "max"]
APIS = ["batch", "queue", "blocking", "asyncio"]


def _blkio(cwd, *args, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "blkio", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _check_stats(stats, where):
    assert list(stats) == STAT_KEYS, f"{where}: keys {list(stats)}"
    for key in STAT_KEYS[:-1]:
        assert isinstance(stats[key], (int, float)) and not isinstance(stats[key], bool), \
            f"{where}.{key} = {stats[key]!r}"
    assert list(stats["lat_us"]) == LAT_KEYS, f"{where}.lat_us = {stats['lat_us']!r}"
    assert isinstance(stats["calls"], int)
    assert stats["calls"] > 0 and stats["kiops"] > 0


def _bench_json(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout)


def _check_cpu(res, runtime, nthreads=1):
    """The "cpu" key (ours, not blkio-bench's): the measuring threads' CPU
    time in their timed runs, and that per request."""
    cpu = res["cpu"]
    count = sum(round(t["kiops"] * 1000 * runtime) for t in res["threads"])
    assert 0 < cpu["seconds"] <= nthreads * runtime * 1.5, cpu
    assert cpu["us_per_request"] == pytest.approx(cpu["seconds"] / count * 1e6, rel=0.1), \
        (cpu, count)


@pytest.mark.parametrize("api", APIS)
def test_bench_prints_blkio_bench_json(tmp_path, image, api):
    proc = _blkio(tmp_path, "bench", "--runtime=1", f"--api={api}", "io_uring", f"path={image.path}")
    res = _bench_json(proc)
    assert list(res) == ["aggregate", "threads", "cpu"]
    _check_stats(res["aggregate"], "aggregate")
    assert isinstance(res["threads"], list) and len(res["threads"]) == 1
    _check_stats(res["threads"][0], "threads[0]")
    _check_cpu(res, 1)


@pytest.mark.parametrize("api", APIS + ["asyncio-batch"])
def test_bench_requests_stops_each_api_after_n(tmp_path, image, api):
    # --runtime far beyond the timeout: only --requests can end the run.
    depth = 1 if api == "blocking" else 8
    n = 3000
    proc = _blkio(tmp_path, "bench", "--runtime=600", f"--requests={n}",
                  f"--iodepth={depth}", "--readwrite=randread", f"--api={api}",
                  "io_uring", f"path={image.path}", timeout=60)
    agg = _bench_json(proc)["aggregate"]
    done = round(agg["calls"] * agg["mean_completions"])
    # an in-flight loop stops at the reap that reaches n: at most a batch more
    assert n <= done <= n + depth, f"{done} requests for --requests={n}"


@pytest.mark.parametrize("api", APIS)
def test_bench_num_threads_2_reports_two_threads(tmp_path, image, api):
    proc = _blkio(tmp_path, "bench", "--runtime=1", "--num-threads=2", f"--api={api}",
                  "io_uring", f"path={image.path}")
    res = _bench_json(proc)
    assert list(res) == ["aggregate", "threads", "cpu"]
    assert len(res["threads"]) == 2
    _check_cpu(res, 1, 2)
    for i, t in enumerate(res["threads"]):
        _check_stats(t, f"threads[{i}]")
    _check_stats(res["aggregate"], "aggregate")
    agg = res["aggregate"]
    assert agg["calls"] == sum(t["calls"] for t in res["threads"])
    assert agg["min_lat_us"] == min(t["min_lat_us"] for t in res["threads"])
    assert agg["max_lat_us"] == max(t["max_lat_us"] for t in res["threads"])
    assert agg["lat_us"]["max"] == max(t["lat_us"]["max"] for t in res["threads"])
    # the aggregate's percentiles are those of both threads' requests together
    assert min(t["lat_us"]["p50"] for t in res["threads"]) <= agg["lat_us"]["p50"] \
        <= max(t["lat_us"]["p50"] for t in res["threads"])


def test_bench_no_progress_line_when_stderr_piped(tmp_path, image):
    proc = _blkio(tmp_path, "bench", "--runtime=1.5", "--api=batch", "io_uring", f"path={image.path}")
    _bench_json(proc)
    assert "\r" not in proc.stderr
    assert "\r" not in proc.stdout


def test_bench_bad_property_prints_clear_error_and_exits_nonzero(tmp_path, image):
    proc = _blkio(tmp_path, "bench", "--runtime=1", "io_uring", f"path={image.path}", "bogus-prop=1")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "bogus" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_info_prints_json_with_capacity(tmp_path, image):
    proc = _blkio(tmp_path, "info", "io_uring", f"path={image.path}")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["capacity"] == image.size
    assert info["driver"] == "io_uring"


def test_info_bad_property_prints_clear_error_and_exits_nonzero(tmp_path, image):
    proc = _blkio(tmp_path, "info", "io_uring", f"path={image.path}", "bogus-prop=1")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "bogus" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr



def test_info_does_not_import_the_bench_or_copy(tmp_path, image):
    code = ("import sys, blkio.cli; rc = blkio.cli.main(['info', 'io_uring', "
            f"'path={image.path}']); "
            "print(sorted(m for m in sys.modules if m in ('blkio._bench', 'blkio._copy'))); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_bench_batch_loop_resubmits_what_came_back_at_the_next_offsets(qsd, make_image, tmp_path):
    # On vhost-user a reap returns part of the batch; the loop resubmits just
    # those rows, in one call (the region form), at the next offsets of its
    # table.  Sequential writes with --requests=n: the first n blocks are
    # written, and nothing past what can still have been in flight.
    img = make_image(8 << 20)
    daemon = qsd(image=img)
    n, depth, bs = 1000, 32, 4096
    proc = _blkio(tmp_path, "bench", "--api=batch", f"--iodepth={depth}", "--readwrite=write",
                  f"--requests={n}", "--runtime=600", "virtio-blk-vhost-user",
                  f"path={daemon.socket}", timeout=60)
    agg = _bench_json(proc)["aggregate"]
    done = round(agg["calls"] * agg["mean_completions"])
    assert n <= done <= n + depth
    assert agg["mean_completions"] < depth, "no partial reap: the path under test did not run"
    data = img.pread(0, len(img.data))
    assert data[:done * bs] == b"\xa5" * (done * bs)
    assert data[(done + depth) * bs:] == img.data[(done + depth) * bs:]


def test_bench_blocking_loop_walks_its_offsets_in_order(make_image, tmp_path):
    # The closed loop hands out its table of offsets in runs (OffsetRuns):
    # sequential writes with --requests=n write exactly the first n blocks.
    img = make_image(1 << 20)
    n, bs = 100, 4096
    proc = _blkio(tmp_path, "bench", "--api=blocking", "--readwrite=write", f"--requests={n}",
                  "--runtime=600", "io_uring", f"path={img.path}")
    assert _bench_json(proc)["aggregate"]["calls"] == n
    data = img.pread(0, len(img.data))
    assert data[:n * bs] == b"\xa5" * (n * bs)
    assert data[n * bs:] == img.data[n * bs:]


def test_offset_runs_cycle_through_the_table_in_runs_of_any_length():
    from blkio._bench import OffsetRuns
    table = list(range(10))
    runs = OffsetRuns(table)
    got = [off for k in (3, 7, 1, 25, 10, 4) for off in runs.take(k)]
    assert got == [i % 10 for i in range(50)]
