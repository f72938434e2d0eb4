"""``blkio bench`` for storage engineers: latency percentiles from every
request, mixed workloads and a bounded region, verify (on io_uring and
vhost-user, through every API), the time series and plot; and the habits
every subcommand shares (--version, the program name, "did you mean", exit
statuses, open errors).

Commands run as subprocesses in a temp directory (the installed package,
not the source tree); the histogram, sizes and block format are also tested
directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest

from conftest import Image, require

from blkio import _histogram as H
from blkio import _verify as V
from blkio._sizes import parse_size

KiB = 1024
MiB = 1 << 20
PCT_KEYS = ["p50", "p90", "p99", "p99.9", "p99.99", "max"]
APIS = ["blocking", "queue", "batch", "asyncio", "asyncio-batch"]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(cwd, *args, timeout: float = 120, pre: str = "") -> subprocess.CompletedProcess:
    """``python -m blkio ARGS`` (``pre``: Python run first, in the same
    interpreter, e.g. to hide a package)."""
    if pre:
        cmd = [sys.executable, "-c",
               f"{pre}; import sys, runpy; sys.argv = ['blkio', *sys.argv[1:]]; "
               "runpy.run_module('blkio', run_name='__main__')", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "blkio", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=_env())


def _script() -> Path:
    """The ``blkio`` console script of this interpreter's environment."""
    path = Path(sys.executable).parent / "blkio"
    require(path.exists(), f"no blkio console script beside {sys.executable}")
    return path


def _ok(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def _fails(proc: subprocess.CompletedProcess, status: int) -> str:
    assert proc.returncode == status, f"rc={proc.returncode}\nstderr:\n{proc.stderr}"
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def _check_lat(lat: dict, where: str) -> None:
    assert list(lat) == PCT_KEYS, f"{where}: {list(lat)}"
    values = [lat[k] for k in PCT_KEYS]
    assert all(isinstance(v, float) and v > 0 for v in values), (where, lat)
    assert values == sorted(values), (where, lat)


def _counts_script(args: List[str]) -> str:
    """Run the bench in a child and print, per thread, the requests it
    counted and the latencies its histograms hold."""
    return ("import json, sys\n"
            "from blkio import _bench\n"
            f"args = _bench._parse_args({args!r}, 'blkio bench')\n"
            "run = _bench.Run(args)\n"
            "res = run.execute()\n"
            "print(json.dumps([[s.count, s.histogram().count, dict(s.op_counts),\n"
            "                   {op: s.histogram(op).count for op in s.recs}]\n"
            "                  for s in run.stats]))\n")


def _counts(cwd, args: List[str]) -> list:
    proc = subprocess.run([sys.executable, "-c", _counts_script(args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------
# the histogram


def test_buckets_are_contiguous_and_at_most_one_128th_wide():
    idx = np.arange(H.NBUCKETS)
    low, high = H.bucket_bounds(idx)
    assert low[0] == 0 and (low[1:] == high[:-1] + 1).all()
    assert (H.bucket_index(low) == idx).all() and (H.bucket_index(high) == idx).all()
    wide = low >= 2 * H.SUB
    assert ((high[wide] - low[wide] + 1) * H.SUB <= low[wide]).all()


def test_percentiles_are_the_true_ones_to_bucket_precision():
    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=10, sigma=1.5, size=200_000).astype(np.int64) + 1
    h = H.LatencyHistogram()
    h.add_values(values[:100_000])
    h.add_values(values[100_000:])
    got = h.percentiles([50, 90, 99, 99.9, 99.99])
    want = np.percentile(values, [50, 90, 99, 99.9, 99.99], method="inverted_cdf")
    for g, w in zip(got, want):
        assert w <= g <= w * (1 + 1 / H.SUB) + 1, (got, want)
    assert h.max_ns == values.max() and h.min_ns == values.min()
    assert h.count == len(values) and h.total_ns == values.sum()
    assert h.lat_us()["max"] == round(values.max() / 1000, 3)


def test_histograms_merge_as_if_filled_together():
    rng = np.random.default_rng(1)
    a, b = rng.integers(1, 10**7, 5000), rng.integers(10**5, 10**9, 3000)
    ha, hb, both = H.LatencyHistogram(), H.LatencyHistogram(), H.LatencyHistogram()
    ha.add_values(a)
    hb.add_weighted(list(b[:10]), [3] * 10)
    hb.add_values(b[10:])
    both.add_values(np.concatenate([a, b[10:], np.repeat(b[:10], 3)]))
    merged = H.merged([ha, hb])
    assert (merged.counts == both.counts).all()
    assert (merged.count, merged.total_ns, merged.min_ns, merged.max_ns) == \
        (both.count, both.total_ns, both.min_ns, both.max_ns)
    later = merged.copy()
    later.add_values(np.array([5_000]))
    interval = later.since(merged)
    assert interval.count == 1 and interval.percentiles([50])[0] == pytest.approx(5000, rel=0.01)


def test_recorder_folds_every_channel_into_its_histogram():
    rec = H.LatencyRecorder()
    append = rec.values.append       # the loops hold the bound method
    append(1000)
    rec.batched.append(2000)
    rec.batch_n.append(32)
    np.copyto(rec.ring_room(3), [10, 20, 30])
    rec.stamps.extend([-5000, 5100, 5400])           # a run: 100, 300
    rec.submitted.extend([100, 110, 120])            # reaped at 150, then 200 x 2
    rec.reaped.extend([150, 200])
    rec.reaped_n.extend([1, 2])
    rec.fold()
    rec.stamps.extend([5450, -9000, 9050])           # the run goes on: 50; a new one: 50
    append(4000)
    rec.fold()
    h = rec.hist
    assert h.count == 1 + 32 + 3 + 4 + 3 + 1 and rec.pending() == 1     # the run's start
    assert h.total_ns == 1000 + 32 * 2000 + 60 + 500 + (50 + 90 + 80) + 4000
    assert (h.min_ns, h.max_ns) == (10, 4000) and rec.snapshot().count == h.count


def test_stamps_of_a_batch_weigh_its_requests():
    rec = H.LatencyRecorder()
    rec.stamp_weight = 32
    rec.stamps.extend([-100, 300, 600])
    rec.fold()
    assert rec.hist.count == 64 and rec.hist.total_ns == 32 * (200 + 300)


# ---------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("text,value", [("4096", 4096), ("4K", 4096), ("4k", 4096),
                                        ("4KiB", 4096), ("4KB", 4096), ("1M", MiB),
                                        ("2MiB", 2 * MiB), ("1G", 1 << 30), ("0x1000", 4096),
                                        (" 8m ", 8 * MiB)])
def test_sizes_take_binary_suffixes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "4Q", "1.5M", "four", "4 K B"])
def test_bad_sizes_say_what_a_size_looks_like(text):
    with pytest.raises(ValueError, match="not a size in bytes"):
        parse_size(text)


# ---------------------------------------------------------------------------
# the verify block format


def test_numpy_checksums_match_the_published_check_values():
    # CRC-32C of "123456789" (RFC 3720's check value); XXH64 of "" seed 0
    row = np.frombuffer(b"123456789", np.uint8)[None, :]
    assert int(V.crc32c_numpy(row)[0]) == 0xE3069283
    assert int(V.xxh64_numpy(np.zeros((1, 0), np.uint8))[0]) == 0xEF46DB3751D8E999


@pytest.mark.parametrize("length", [1, 31, 32, 33, 255, 256, 257, 4096, 4100])
def test_numpy_checksums_match_the_packages(length):
    try:
        import google_crc32c
        import xxhash
    except ImportError:
        require(False, "google-crc32c or xxhash missing (pip install 'blkio[verify]')")
    blocks = np.random.default_rng(length).integers(0, 256, (4, length), dtype=np.uint8)
    crc, xxh = V.crc32c_numpy(blocks), V.xxh64_numpy(blocks)
    for i in range(4):
        assert int(crc[i]) == google_crc32c.value(blocks[i].tobytes())
        assert int(xxh[i]) == xxhash.xxh64_intdigest(blocks[i].tobytes())


def _filled(kind: str, n: int = 8, bs: int = 4096):
    fmt = V.BlockFormat(kind, bs, generation=0x1234)
    rows = np.zeros((n, bs), np.uint8)
    offs = (np.arange(n, dtype=np.uint64) + 10) * np.uint64(bs)
    fmt.fill(rows, offs, np.ones(n, np.uint32))
    return fmt, rows, offs


@pytest.mark.parametrize("kind", V.KINDS)
def test_filled_blocks_check_clean_and_carry_their_header(kind):
    fmt, rows, offs = _filled(kind)
    fmt.check(rows, offs, np.full(8, 0x1234, np.uint64), np.ones(8, np.uint32))
    hdr = fmt.headers(rows)
    assert (hdr["magic"] == V.MAGIC).all() and (hdr["offset"] == offs).all()
    assert (hdr["length"] == 4096).all() and (hdr["generation"] == 0x1234).all()
    assert len(np.unique(rows[:, V.HEADER_LEN:], axis=0)) == 8      # every payload differs


@pytest.mark.parametrize("kind", V.KINDS)
@pytest.mark.parametrize("where", [3, 47, 1000, 4095])
def test_a_flipped_byte_is_named(kind, where):
    fmt, rows, offs = _filled(kind)
    rows[5, where] ^= 0x10
    with pytest.raises(V.VerifyMismatch) as e:
        fmt.check(rows, offs)
    assert e.value.offset == int(offs[5])
    if where >= V.HEADER_LEN:
        assert f"byte {where} of the block" in str(e.value)


@pytest.mark.parametrize("kind", V.KINDS)
def test_misplaced_torn_and_stale_blocks_are_caught(kind):
    fmt, rows, offs = _filled(kind)
    moved = rows.copy()
    moved[2] = rows[6]                                  # block 6's data at block 2's place
    with pytest.raises(V.VerifyMismatch, match="misplaced") as e:
        fmt.check(moved, offs)
    assert e.value.found["offset"] == int(offs[6]) and e.value.expected["offset"] == int(offs[2])
    second = rows.copy()
    fmt.fill(second, offs, np.full(8, 2, np.uint32))    # the blocks written again
    torn = second.copy()
    torn[4, 2048:] = rows[4, 2048:]                     # only the first half landed
    with pytest.raises(V.VerifyMismatch) as e:
        fmt.check(torn, offs)
    assert e.value.offset == int(offs[4])
    with pytest.raises(V.VerifyMismatch, match="expected write 2") as e:
        fmt.check(rows, offs, None, np.full(8, 2, np.uint32))   # the second write was lost
    assert e.value.offset == int(offs[0])


# ---------------------------------------------------------------------------
# latency percentiles


@pytest.mark.parametrize("api", APIS)
def test_every_request_is_timed_by_default(tmp_path, image, api):
    depth = 1 if api == "blocking" else 8
    rows = _counts(tmp_path, ["--requests=4000", "--runtime=60", f"--iodepth={depth}",
                              "--readwrite=randread", f"--api={api}", "io_uring",
                              f"path={image.path}"])
    for count, timed, _, _ in rows:
        assert count >= 4000 and timed == count, rows


@pytest.mark.parametrize("api", ["blocking", "batch"])
def test_lat_sample_times_one_request_in_n(tmp_path, image, api):
    depth = 1 if api == "blocking" else 8
    rows = _counts(tmp_path, ["--requests=8000", "--runtime=60", f"--iodepth={depth}",
                              "--lat-sample=16", f"--api={api}", "io_uring",
                              f"path={image.path}"])
    count, timed, _, _ = rows[0]
    assert 0 < timed <= count // 16 + 2, rows


@pytest.mark.parametrize("api", APIS)
def test_percentiles_in_the_json_and_the_text_summary(tmp_path, image, api):
    depth = 1 if api == "blocking" else 4
    proc = _run(tmp_path, "bench", "--runtime=0.5", "--num-threads=2", f"--iodepth={depth}",
                f"--api={api}", "io_uring", f"path={image.path}")
    res = _ok(proc)
    _check_lat(res["aggregate"]["lat_us"], "aggregate")
    for i, t in enumerate(res["threads"]):
        _check_lat(t["lat_us"], f"threads[{i}]")
    agg = res["aggregate"]["lat_us"]
    assert agg["max"] == max(t["lat_us"]["max"] for t in res["threads"])
    assert res["aggregate"]["max_lat_us"] == agg["max"]
    text = proc.stderr
    assert f"{api} API" in text and "read" in text
    assert f"p99.99 " in text and "latency µs" in text


# ---------------------------------------------------------------------------
# mixed workloads, the region


@pytest.mark.parametrize("api", APIS)
def test_randrw_mixes_reads_and_writes_by_rwmixread(tmp_path, make_image, api):
    img = make_image(16 * MiB)
    depth = 1 if api == "blocking" else 8
    rows = _counts(tmp_path, ["--requests=6000", "--runtime=60", f"--iodepth={depth}",
                              "--readwrite=randrw", "--rwmixread=70", f"--api={api}",
                              "io_uring", f"path={img.path}"])
    count, timed, ops, per_op = rows[0]
    assert ops["read"] + ops["write"] == count and timed == count
    assert per_op == ops
    assert 0.64 < ops["read"] / count < 0.76, ops


def test_rw_json_has_read_and_write_figures(tmp_path, make_image):
    img = make_image(8 * MiB)
    res = _ok(_run(tmp_path, "bench", "--runtime=0.5", "--iodepth=4", "--readwrite=rw",
                   "--rwmixread=50", "io_uring", f"path={img.path}"))
    for where in (res["aggregate"], res["threads"][0]):
        for op in ("read", "write"):
            assert list(where[op]) == ["count", "kiops", "gips", "mean_lat_us", "lat_us"]
            _check_lat(where[op]["lat_us"], op)
        assert where["read"]["count"] > 0 and where["write"]["count"] > 0


@pytest.mark.parametrize("mix,reads", [("0", False), ("100", True)])
def test_rwmixread_0_writes_only_and_100_reads_only(tmp_path, make_image, mix, reads):
    img = make_image(4 * MiB)
    _ok(_run(tmp_path, "bench", "--requests=2000", "--runtime=60", "--readwrite=randrw",
             f"--rwmixread={mix}", "io_uring", f"path={img.path}"))
    assert (img.pread(0, img.size) == img.data) == reads


@pytest.mark.parametrize("api", APIS)
def test_offset_and_size_bound_the_writes(tmp_path, make_image, api):
    img = make_image(8 * MiB)
    depth = 1 if api == "blocking" else 8
    # 1 MiB from 2 MiB on: 256 blocks; 2000 random writes cover it
    _ok(_run(tmp_path, "bench", "--offset=2M", "--size=1MiB", "--blocksize=4K",
             "--requests=2000", "--runtime=60", "--readwrite=randwrite",
             f"--iodepth={depth}", f"--api={api}", "io_uring", f"path={img.path}"))
    data = img.pread(0, img.size)
    assert data[:2 * MiB] == img.data[:2 * MiB]
    assert data[3 * MiB:] == img.data[3 * MiB:]
    assert data[2 * MiB:3 * MiB].count(0xA5) > 0.9 * MiB


@pytest.mark.parametrize("args,message", [
    (["--offset=64M"], "is not below the device's capacity"),
    (["--offset=60M", "--size=8M"], "ends past the device's capacity"),
    (["--size=1K"], "smaller than one block"),
    (["--offset=1000"], "not a multiple of the device's request-alignment")])
def test_a_region_the_device_cannot_hold_is_a_usage_error(tmp_path, loopdev, args, message):
    proc = _run(tmp_path, "bench", "--runtime=1", *args, "io_uring", f"path={loopdev.path}",
                "direct=1")
    assert message in _fails(proc, 2)


# ---------------------------------------------------------------------------
# verify


def _device(kind: str, make_image, qsd, size: int = 4 * MiB):
    """(image, driver args) for an io_uring file or a vhost-user export."""
    img = make_image(size)
    if kind == "io_uring":
        return img, ["io_uring", f"path={img.path}"]
    daemon = qsd(image=img)
    return img, ["virtio-blk-vhost-user", f"path={daemon.socket}"]


def _write_region(tmp_path, dev: List[str], api: str, kind: str = "crc32c",
                  size: int = 1 * MiB, bs: int = 4096) -> dict:
    depth = 1 if api == "blocking" else 8
    return _ok(_run(tmp_path, "bench", "--readwrite=write", f"--verify={kind}",
                    f"--size={size}", f"--blocksize={bs}", f"--requests={size // bs}",
                    "--runtime=600", f"--iodepth={depth}", f"--api={api}", *dev))


def _verify_only(tmp_path, dev: List[str], api: str, kind: str = "crc32c",
                 size: int = 1 * MiB, pre: str = "") -> subprocess.CompletedProcess:
    depth = 1 if api == "blocking" else 8
    return _run(tmp_path, "bench", "--verify-only", f"--verify={kind}", f"--size={size}",
                f"--iodepth={depth}", f"--api={api}", *dev, pre=pre)


def _flip(img: Image, offset: int) -> None:
    with open(img.path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("backend", ["io_uring", "vhost-user"])
@pytest.mark.parametrize("api", APIS)
def test_clean_data_verifies_and_a_flipped_byte_names_its_block(tmp_path, make_image, qsd,
                                                                backend, api):
    img, dev = _device(backend, make_image, qsd)
    res = _write_region(tmp_path, dev, api)
    v = res["verify"]
    assert v["blocks_written"] == 256 and v["final_pass_blocks"] == 256
    assert res["aggregate"]["kiops"] > 0
    res = _ok(_verify_only(tmp_path, dev, api))
    assert res["verify"]["reads_checked"] == 256
    assert "no mismatch" in _verify_only(tmp_path, dev, api).stderr
    _flip(img, 77 * 4096 + 1234)          # behind the bench's back
    err = _fails(_verify_only(tmp_path, dev, api), 1)
    assert f"block at offset {77 * 4096}:" in err, err
    assert "checksum mismatch" in err and "byte 1234 of the block" in err
    assert "expected: magic=" in err and "found:    magic=" in err


@pytest.mark.parametrize("backend", ["io_uring", "vhost-user"])
@pytest.mark.parametrize("kind", V.KINDS)
def test_a_block_copied_to_the_wrong_offset_is_caught_by_its_header(tmp_path, make_image, qsd,
                                                                    backend, kind):
    img, dev = _device(backend, make_image, qsd)
    _write_region(tmp_path, dev, "batch", kind)
    block = img.pread(10 * 4096, 4096)
    with open(img.path, "r+b") as f:
        f.seek(200 * 4096)
        f.write(block)
    err = _fails(_verify_only(tmp_path, dev, "queue", kind), 1)
    assert f"block at offset {200 * 4096}:" in err
    assert f"the header says offset {10 * 4096} (a misplaced block)" in err
    assert f"offset={200 * 4096} " in err.split("expected:")[1].split("found:")[0]


@pytest.mark.parametrize("kind", V.KINDS)
def test_a_torn_write_is_caught(tmp_path, make_image, qsd, kind):
    """Two runs write the region; block 33 keeps the second run's first
    sector and the first run's rest, as if the write stopped half way."""
    img, dev = _device("io_uring", make_image, qsd)
    _write_region(tmp_path, dev, "batch", kind)
    old = img.pread(33 * 4096, 4096)
    _write_region(tmp_path, dev, "batch", kind)
    with open(img.path, "r+b") as f:
        f.seek(33 * 4096 + 512)
        f.write(old[512:])
    err = _fails(_verify_only(tmp_path, dev, "blocking", kind), 1)
    assert f"block at offset {33 * 4096}:" in err and "byte 512 of the block" in err


def test_unwritten_blocks_fail_verify_only(tmp_path, make_image):
    img, dev = _device("io_uring", make_image, None)
    _write_region(tmp_path, dev, "batch", size=MiB // 2)
    err = _fails(_verify_only(tmp_path, dev, "batch", size=MiB), 1)
    assert f"block at offset {MiB // 2}:" in err and "no verify header" in err


@pytest.mark.parametrize("api", APIS)
def test_verify_during_a_mixed_run_with_backlog(tmp_path, make_image, qsd, api):
    img, dev = _device("io_uring", make_image, qsd)
    depth = 1 if api == "blocking" else 8
    res = _ok(_run(tmp_path, "bench", "--readwrite=randrw", "--verify=xxh64",
                   "--verify-backlog=64", "--size=512K", "--requests=1500", "--runtime=600",
                   "--num-threads=2", f"--iodepth={depth}", f"--api={api}", *dev))
    v = res["verify"]
    assert v["blocks_written"] > 0 and v["final_pass_blocks"] == v["blocks_written"]
    assert v["reads_checked"] >= v["blocks_written"]     # the backlog read them back
    agg = res["aggregate"]
    assert agg["read"]["count"] > 0 and agg["write"]["count"] > 0


def test_blocks_written_with_the_packages_verify_with_numpy(tmp_path, make_image):
    img, dev = _device("io_uring", make_image, None)
    for kind in ("crc32c", "xxh64"):
        res = _write_region(tmp_path, dev, "batch", kind, size=256 * KiB)
        require(res["verify"]["checksum"] != "numpy",
                "google-crc32c/xxhash missing (pip install 'blkio[verify]')")
        hide = "import sys; sys.modules['google_crc32c'] = None; sys.modules['xxhash'] = None"
        res = _ok(_verify_only(tmp_path, dev, "batch", kind, 256 * KiB, pre=hide))
        assert res["verify"]["checksum"] == "numpy" and res["verify"]["reads_checked"] == 64
        _flip(img, 5 * 4096 + 100)
        err = _fails(_verify_only(tmp_path, dev, "batch", kind, 256 * KiB, pre=hide), 1)
        assert f"block at offset {5 * 4096}:" in err
        _flip(img, 5 * 4096 + 100)


@pytest.mark.parametrize("args,message", [
    (["--verify-only"], "--verify-only needs --verify"),
    (["--verify-backlog=4"], "--verify-backlog needs --verify"),
    (["--verify=crc32c", "--verify-backlog=4"], "use a write workload"),
    (["--verify=pattern", "--blocksize=32"], "at least 64"),
    (["--rwmixread=30"], "--rwmixread goes with --readwrite=rw or randrw"),
    (["--rwmixread=130", "--readwrite=rw"], "must be 0 to 100"),
    (["--verify=crc33"], "did you mean 'crc32c'?")])
def test_verify_and_mix_options_that_do_not_fit_are_usage_errors(tmp_path, image, args, message):
    proc = _run(tmp_path, "bench", *args, "io_uring", f"path={image.path}")
    assert message in _fails(proc, 2)


# ---------------------------------------------------------------------------
# time series, plot


def test_log_interval_writes_json_lines_to_stderr(tmp_path, image):
    proc = _run(tmp_path, "bench", "--runtime=1.2", "--log-interval=0.25", "--iodepth=4",
                "--readwrite=randrw", "io_uring", f"path={image.path}")
    res = _ok(proc)
    lines = [json.loads(l) for l in proc.stderr.splitlines() if l.startswith("{")]
    assert len(lines) >= 4, proc.stderr
    for p in lines:
        assert list(p)[:6] == ["t", "interval_s", "requests", "kiops", "gips", "lat_us"]
        assert set(p["lat_us"]) == set(PCT_KEYS)
    assert [p["t"] for p in lines] == sorted(p["t"] for p in lines)
    total = sum(t["calls"] * t["mean_completions"] for t in res["threads"])
    assert sum(p["requests"] for p in lines) == pytest.approx(total, rel=0.02)
    assert any("read" in p and "write" in p for p in lines)


def test_plot_draws_a_png(tmp_path, image):
    require(__import__("importlib").util.find_spec("matplotlib"),
            "matplotlib missing (pip install 'blkio[plot]')")
    out = tmp_path / "bench.png"
    _ok(_run(tmp_path, "bench", "--runtime=0.5", "--iodepth=4", f"--plot={out}",
             "io_uring", f"path={image.path}"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, image):
    proc = _run(tmp_path, "bench", "--runtime=0.5", f"--plot={tmp_path / 'x.png'}",
                "io_uring", f"path={image.path}", pre="import sys; sys.modules['matplotlib'] = None")
    assert "pip install 'blkio[plot]'" in _fails(proc, 1)
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------
# command-line habits


def test_version_from_the_script_and_the_module(tmp_path):
    import blkio
    for cmd in ([str(_script())], [sys.executable, "-m", "blkio"]):
        proc = subprocess.run([*cmd, "--version"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env=_env())
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == \
            f"blkio {blkio.__version__} (libblkio {blkio.LIBBLKIO_VERSION})"


@pytest.mark.parametrize("sub", ["bench", "copy", "info"])
def test_usage_and_messages_name_the_program_as_invoked(tmp_path, sub):
    extra = {"bench": ["--bogus", "io_uring"], "copy": ["--bogus"], "info": []}[sub]
    for cmd, name in (([str(_script())], "blkio"),
                      ([sys.executable, "-m", "blkio"], "python -m blkio")):
        proc = subprocess.run([*cmd, sub, *extra], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env=_env())
        assert proc.returncode == 2, proc.stderr
        assert f"{name} {sub}:" in proc.stderr or f"usage: {name} {sub}" in proc.stderr, \
            proc.stderr
        other = "python -m blkio" if name == "blkio" else "blkio "
        assert not proc.stderr.startswith(other)


@pytest.mark.parametrize("args,hint", [
    (["bench", "--iodpeth=4", "io_uring"], "did you mean '--iodepth'?"),
    (["bench", "--readwrite=randrd", "io_uring"], "did you mean 'randread'?"),
    (["bench", "io_urin", "path=x"], "did you mean 'io_uring'?"),
    (["bench", "io_uring", "path=x", "num-entrie=8"], "did you mean 'num-entries'?"),
    (["info", "io_uring", "path=x", "num_entrie=8"], "did you mean 'num-entries'?"),
    (["info", "virtio-blk-vhost-usr", "path=x"], "did you mean 'virtio-blk-vhost-user'?"),
    (["copy", "--input-blkio=io_urng", "path=x", "--output-file=y"], "did you mean 'io_uring'?"),
    (["copy", "--input-blkio=io_uring", "pth=x", "--output-file=y"], "did you mean 'path'?"),
    (["copy", "--input-file=x", "--output-file=y", "--blocksze=1M"],
     "did you mean '--blocksize'?"),
    (["bnech"], "did you mean 'bench'?")])
def test_misspellings_get_a_suggestion_and_exit_2(tmp_path, args, hint):
    err = _fails(_run(tmp_path, *args), 2)
    assert hint in err, err


def test_an_unknown_property_lists_the_valid_ones(tmp_path):
    err = _fails(_run(tmp_path, "info", "virtio-blk-vhost-user", "path=x", "bogus=1"), 2)
    assert "unknown property 'bogus' for driver 'virtio-blk-vhost-user'" in err
    assert "(properties of virtio-blk-vhost-user: " in err
    for name in ("num-queues", "path", "queue-size", "read-only"):
        assert name in err.split("properties of")[1]


@pytest.mark.parametrize("sub", ["info", "bench", "copy"])
def test_a_missing_device_is_one_message_naming_the_path_once_and_exits_1(tmp_path, sub):
    missing = tmp_path / "no-such.img"
    args = {"info": ["info", "io_uring", f"path={missing}"],
            "bench": ["bench", "--runtime=1", "io_uring", f"path={missing}"],
            "copy": ["copy", "--input-blkio=io_uring", f"path={missing}",
                     f"--output-file={tmp_path / 'out'}"]}[sub]
    err = _fails(_run(tmp_path, *args), 1)
    assert len(err.strip().splitlines()) == 1, err
    assert err.count(str(missing)) == 1, err
    assert "cannot open" in err and "No such file or directory" in err


def test_blocksize_takes_suffixes_in_bench_as_in_copy(tmp_path, image):
    res = _ok(_run(tmp_path, "bench", "--blocksize=8K", "--requests=100", "--runtime=60",
                   "--api=blocking", "io_uring", f"path={image.path}"))
    assert res["aggregate"]["calls"] == 100
    assert res["aggregate"]["gips"] == pytest.approx(
        res["aggregate"]["kiops"] * 1000 * 8192 / (1 << 30), rel=0.01, abs=0.002)


def test_default_runtime_is_short_and_said_in_help(tmp_path):
    from blkio import _bench
    assert _bench._parse_args(["io_uring"], "blkio bench").runtime == 5.0
    out = _run(tmp_path, "bench", "--help").stdout
    assert "default: 5" in " ".join(out.split())
