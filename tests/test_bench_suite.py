"""The benchmark suite's own machinery: ``python -m blkio bench``'s options
for one-call I/O, the Python peers in ``bench/contenders.py`` (timed by the
same code as blkio), and ``bench/run.py``'s goals, verdicts and --compare.
No timings are asserted: only that each piece measures what it says."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from test_cli import STAT_KEYS, _blkio, _bench_json

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run_py():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod          # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


run = _run_py()


def _contender(cwd, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(BENCH / "contenders.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


# --------------------------------------------------------------------------
# python -m blkio bench


def test_bench_one_call_over_the_device_is_one_request(tmp_path, image):
    proc = _blkio(tmp_path, "bench", "--api=blocking", "--readwrite=read",
                  f"--blocksize={image.size}", "--requests=1", "--runtime=30",
                  "io_uring", f"path={image.path}", "direct=on")
    agg = _bench_json(proc)["aggregate"]
    assert agg["calls"] == 1
    assert agg["min_lat_us"] == agg["max_lat_us"] > 0


def test_bench_flush_writes_and_counts_the_requests(tmp_path, make_image):
    img = make_image(4 << 20)
    proc = _blkio(tmp_path, "bench", "--api=blocking", "--readwrite=write",
                  "--blocksize=1048576", "--requests=4", "--flush", "--runtime=30",
                  "io_uring", f"path={img.path}")
    assert _bench_json(proc)["aggregate"]["calls"] == 4
    assert img.pread(0, 4 << 20) == b"\xa5" * (4 << 20)


def test_bench_flush_with_the_batch_api_is_a_usage_error(tmp_path, image):
    proc = _blkio(tmp_path, "bench", "--api=batch", "--flush", "--readwrite=write",
                  "io_uring", f"path={image.path}")
    assert proc.returncode == 2
    assert "--flush" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_asyncio_batch_runs_or_says_it_is_not_available(tmp_path, image):
    import blkio.aio
    proc = _blkio(tmp_path, "bench", "--api=asyncio-batch", "--iodepth=8", "--runtime=0.5",
                  "--readwrite=randread", "io_uring", f"path={image.path}")
    if hasattr(blkio.aio.AsyncDevice, "read_batch"):
        agg = _bench_json(proc)["aggregate"]
        assert agg["mean_completions"] == 8
    else:
        assert proc.returncode == 1 and proc.stdout == ""
        assert "not available" in proc.stderr and "read_batch" in proc.stderr


# --------------------------------------------------------------------------
# bench/contenders.py


@pytest.mark.parametrize("kind, opts", [
    ("preadv", ["--readwrite=randread", "--num-threads=2"]),
    ("ping", ["--iodepth=8"]),
    ("ping", ["--iodepth=8", "--resolve=each"]),
    ("call", ["--requests=1000"]),
    ("readinto", ["--readwrite=read", "--blocksize=1048576", "--requests=3"]),
    ("fromfile", ["--readwrite=read", "--blocksize=1048576", "--requests=3"]),
])
def test_contender_prints_blkio_bench_json(tmp_path, image, kind, opts):
    args = [kind, "--runtime=0.3", *opts] + ([] if kind in ("ping", "call") else [image.path])
    proc = _contender(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert list(res["aggregate"]) == STAT_KEYS
    assert res["aggregate"]["calls"] > 0
    for o in opts:
        if o.startswith("--requests="):
            assert res["aggregate"]["calls"] == int(o.split("=")[1])


@pytest.mark.parametrize("kind", ["write", "tofile"])
def test_file_object_writers_write_and_fsync(tmp_path, make_image, kind):
    img = make_image(2 << 20, random=False)
    proc = _contender(tmp_path, kind, "--readwrite=write", "--blocksize=1048576",
                      "--requests=2", "--flush", img.path)
    assert proc.returncode == 0, proc.stderr
    assert img.pread(0, 2 << 20) == b"\xa5" * (2 << 20)


def test_contender_refuses_a_reader_asked_to_write(tmp_path, image):
    proc = _contender(tmp_path, "readinto", "--readwrite=write", image.path)
    assert proc.returncode == 1
    assert "readinto goes with --readwrite=read" in proc.stderr


# --------------------------------------------------------------------------
# bench/run.py: goals and verdicts


def _summary(figures: dict) -> dict:
    """A run's summary with the given medians (requests/s), 3 reps each."""
    out = {}
    for key, v in figures.items():
        if v is None:
            out[key] = {"contender": key.rsplit("/", 1)[1], "errors": ["boom"],
                        "skipped": False, "workload": {"bs": 4096}}
        else:
            out[key] = {"contender": key.rsplit("/", 1)[1], "iops_median": v,
                        "iops_by_rep": [v, v * 1.1, v * 0.9], "workload": {"bs": 4096}}
    return out


def test_goal_met_missed_and_short_by():
    g = run.Goal("g", 13, "w/a", "w/c", 0.9)
    met = run.evaluate(g, _summary({"w/a": 95.0, "w/c": 100.0}))
    assert (met["verdict"], met["ratio"]) == ("met", 0.95)
    assert met["ratio_by_rep"] == [0.95, 0.95, 0.95]
    missed = run.evaluate(g, _summary({"w/a": 45.0, "w/c": 100.0}))
    assert missed["verdict"] == "missed"
    assert "short by 50.0%" in missed["missed_by"]


def test_goal_against_the_best_of_several_needs_all_of_them():
    g = run.Goal("g", 12, "w/a", ("w/f1", "w/f8"), 0.95)
    res = run.evaluate(g, _summary({"w/a": 100.0, "w/f1": 50.0, "w/f8": 200.0}))
    assert res["ratio"] == 0.5 and res["denominator_best"] == "w/f8"
    res = run.evaluate(g, _summary({"w/a": 100.0, "w/f1": 50.0, "w/f8": None}))
    assert res["verdict"] == "n/a" and "boom" in res["why"]


def test_goal_floor_catches_threads_slower_than_one_thread():
    g = run.Goal("g", 15, "w/t4", "w/c4", 0.9, floor="w/t1")
    res = run.evaluate(g, _summary({"w/t4": 95.0, "w/c4": 100.0, "w/t1": 120.0}))
    assert res["verdict"] == "missed"
    assert "below the 1-thread figure" in res["missed_by"]


def test_goal_against_work_done_one_after_the_other():
    # An await (600k/s alone) plus the I/O (1.2M/s alone): at most 400k/s.
    g = run.Goal("g", 13, "w/aio", run.Serial(("w/ping", "w/c")), 0.9)
    res = run.evaluate(g, _summary({"w/aio": 300.0e3, "w/ping": 600.0e3, "w/c": 1.2e6}))
    assert res["denominator_figure"] == pytest.approx(400.0e3) and res["ratio"] == 0.75
    assert res["verdict"] == "missed"
    assert res["ratio_by_rep"] == [0.75, 0.75, 0.75]
    assert res["denominator"] == {"serial": ["w/ping", "w/c"]}
    json.dumps(res)
    res = run.evaluate(g, _summary({"w/aio": 300.0e3, "w/ping": 600.0e3, "w/c": None}))
    assert res["verdict"] == "n/a" and "boom" in res["why"]


def test_goal_in_series_takes_the_best_case_of_each_part():
    # the disk's best read (3/s) then its best write (6/s): 2 copies/s
    g = run.Goal("g", 12, "w/copy", run.Serial((("w/r1", "w/r8"), ("w/w1", "w/w8"))), None)
    res = run.evaluate(g, _summary({"w/copy": 1.0, "w/r1": 2.0, "w/r8": 3.0,
                                    "w/w1": 6.0, "w/w8": 1.0}))
    assert res["denominator_figure"] == pytest.approx(2.0) and res["ratio"] == 0.5
    assert res["denominator_best"] == "w/r8 then w/w1"
    assert res["ratio_by_rep"] == [0.5, 0.5, 0.5] and res["verdict"] == "info"
    json.dumps(res)
    res = run.evaluate(g, _summary({"w/copy": 1.0, "w/r1": None, "w/r8": 3.0,
                                    "w/w1": 6.0, "w/w8": 1.0}))
    assert res["verdict"] == "n/a" and "boom" in res["why"]


def test_copy_goal_shows_its_ratio_without_the_process_start():
    s = _summary({"w/copy": 0.8, "w/dd": 1.0})
    s["w/copy"]["own_mbps_median"] = 1.1 * 4096 / 1e6     # 1.1 copies/s by its own clock
    res = run.evaluate(run.Goal("g", 12, "w/copy", "w/dd", 1.0), s)
    assert res["ratio"] == 0.8 and res["ratio_without_start"] == pytest.approx(1.1)
    assert res["verdict"] == "missed"             # the goal stays the wall clock's
    line = run.verdict_line(res, lambda key, fig: f"{fig:g}")
    assert "without its process start: 1.10" in line
    res = run.evaluate(run.Goal("g", 12, "w/dd", "w/copy", 1.0), s)
    assert "ratio_without_start" not in res


def test_goal_not_run_says_so():
    g = run.Goal("g", 13, "w/a", "w/c", 0.9)
    res = run.evaluate(g, _summary({"w/c": 1.0}))
    assert res["verdict"] == "not run" and "not run" in res["why"]


def test_goal_against_the_best_of_the_cases_this_suite_ran():
    g = run.Goal("g", 12, "w/a", ("w/slow", "w/fast"), 1.5)
    res = run.evaluate(g, _summary({"w/a": 300.0, "w/fast": 100.0}))
    assert res["ratio"] == 3.0 and res["denominator_best"] == "w/fast"


def _goal_cases(g):
    """(cases the goal needs, groups of which it needs one case each)."""
    needed = [g.num, *([g.floor] if g.floor else [])]
    if isinstance(g.den, run.Serial):       # every part is needed
        return needed, [p if isinstance(p, tuple) else (p,) for p in g.den.keys]
    return needed, [g.den if isinstance(g.den, tuple) else (g.den,)]


def test_full_suite_runs_every_case_every_goal_needs():
    size = 1 << 30
    keys = {c.key for c in run.full_cases(size)}
    for g in run.goals(size):
        needed, groups = _goal_cases(g)
        missing = [k for k in [*needed, *(k for grp in groups for k in grp)] if k not in keys]
        assert not missing, f"{g.name}: {missing}"


def test_short_suite_covers_every_goal_but_the_o_direct_thread_writes():
    size = 1 << 30
    keys = {c.key for c in run.short_cases(size)}
    for g in run.goals(size):
        if g.issue == 15 and "O_DIRECT" in g.name and "randwrite" in g.name:
            continue
        needed, groups = _goal_cases(g)
        assert all(k in keys for k in needed), g.name
        assert all(any(k in keys for k in grp) for grp in groups), g.name


def test_plot_draws_every_workload_of_the_full_suite(tmp_path):
    """Each case with figures is drawn: a workload kind the plot has no
    label for failed the short suite after its last run (KeyError)."""
    require(importlib.util.find_spec("matplotlib") is not None,
            "matplotlib is not installed (the bench's optional plot)")
    cases = run.full_cases(1 << 30)
    summary = {c.key: {"iops_median": 2.0, "iops_min": 1.0, "iops_max": 3.0} for c in cases}
    png = tmp_path / "bench.png"
    assert run.plot(summary, cases, png) is True
    assert png.stat().st_size > 0


def test_full_suite_includes_the_short_one():
    size = 1 << 30
    full = {c.key for c in run.full_cases(size)}
    assert {c.key for c in run.short_cases(size)} <= full


def test_compare_prints_ratios_and_figures_side_by_side(tmp_path, capsys):
    size = 1 << 30
    g = run.goals(size)[0]
    docs = []
    for num in (90.0, 99.0):
        summary = _summary({g.num: num, g.den: 100.0})
        doc = {"machine": {"date": "d", "size_bytes": size}, "results": summary,
               "ratios": {g.name: num / 100}}
        path = tmp_path / f"{num}.json"
        path.write_text(json.dumps(doc))
        docs.append(str(path))
    assert run.main(["--compare", *docs]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.endswith(g.name))
    assert "0.90" in line and "0.99" in line and "+10.0%" in line
    assert any(ln.endswith(g.num) and "+10.0%" in ln for ln in out.splitlines())


def _env(tmp_path, size=8 << 20):
    import argparse
    args = argparse.Namespace(size=size >> 20, python=sys.executable)
    env = run.Env(args, tmp_path)
    env.c_bench = tmp_path / "blkio-bench"
    return env


def test_aa_control_runs_the_very_command_it_is_compared_with(tmp_path):
    # The A/A control is C blkio-bench again: same argv, its own case, and a
    # tracked row (no threshold) in every workload of a 4 KiB goal against C.
    env = _env(tmp_path)
    size = 1 << 30
    short = {c.key for c in run.short_cases(size)}
    aa = [g for g in run.goals(size) if g.name.startswith("A/A control")]
    full = {c.key for c in run.full_cases(size)}
    assert len(aa) == 8         # 4 workloads of issue 13, 2 threads x 4 of issue 15
    for g in aa:
        assert g.threshold is None and g.num.endswith(run.C_AA) and g.den.endswith(run.C_BENCH)
        assert g.num in full and g.den in full
        if not ("O_DIRECT" in g.name and "randwrite" in g.name):   # full suite only
            assert g.num in short and g.den in short
        assert g.num[:-len(run.C_AA)] == g.den[:-len(run.C_BENCH)]      # same workload
    for wl in (run.Workload("file", "randread", run.K4, 32),
               run.Workload("file", "randread", run.K4, 1)):
        a = env.command(run.Case(wl, run.C_AA), 1)
        b = env.command(run.Case(wl, run.C_BENCH), 1)
        assert a.argv == b.argv and a.parse == b.parse == "bench"


def test_goal_shows_the_aa_control_of_its_workload():
    wl = "vhost/randread/4k/qd32/t1"
    g = run.Goal("g", 13, f"{wl}/{run.B_BATCH}", f"{wl}/{run.C_BENCH}", 0.95)
    res = run.evaluate(g, _summary({f"{wl}/{run.B_BATCH}": 90.0, f"{wl}/{run.C_BENCH}": 100.0,
                                    f"{wl}/{run.C_AA}": 80.0}))
    assert res["aa_ratio"] == 0.8
    assert "(A/A here: 0.80)" in run.verdict_line(res, lambda k, v: f"{v}")
    other = run.evaluate(g, _summary({f"{wl}/{run.B_BATCH}": 90.0, f"{wl}/{run.C_BENCH}": 100.0}))
    assert "aa_ratio" not in other and "A/A" not in run.verdict_line(other, lambda k, v: f"{v}")


def test_verdict_line_shows_each_repetitions_ratio():
    g = run.Goal("g", 13, "w/a", "w/c", None)
    res = run.evaluate(g, _summary({"w/a": 95.0, "w/c": 100.0}))
    line = run.verdict_line(res, lambda k, v: f"{v}")
    assert res["verdict"] == "info" and line.rstrip().endswith("reps 0.95 0.95 0.95")


def test_qemu_img_copies_into_the_daemons_nbd_export(tmp_path, monkeypatch):
    # The like-for-like contender of the copy to vhost-user: the suite's
    # daemon exports the copy target over NBD too, and qemu-img's command
    # (the issue's options) writes the input there, byte for byte.
    from conftest import tool_env, write_image
    require(shutil.which("qemu-storage-daemon"), "qemu-storage-daemon is not installed")
    require(shutil.which("qemu-img"), "qemu-img is not installed")
    # The daemon inherits our environment: not the sanitizer runtimes that
    # make test-asan preloads (qemu hangs under them), as conftest's tools.
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = _env(tmp_path)
    src = write_image(env.cold, 8 << 20)
    write_image(env.copy_out, 8 << 20, random=False)
    write_image(env.image, 1 << 20, random=False)
    env.qsd = run.StorageDaemon(env.image, env.copy_out, tmp_path)
    env.qsd.start()
    try:
        wl = run.Workload("vcopy", "copy", 8 << 20, 0)
        cmd = env.command(run.Case(wl, run.QEMU_IMG_NBD), 1)
        assert cmd.parse == "wall" and cmd.argv[:2] == ["qemu-img", "convert"]
        assert "-m" in cmd.argv and "-W" in cmd.argv and cmd.argv[-1].startswith("nbd+unix://")
        r = subprocess.run(cmd.argv, capture_output=True, text=True, timeout=60, env=tool_env())
        assert r.returncode == 0, r.stderr
        assert env.copy_out.read_bytes() == src.data
        # the raw -> raw copiers write the same target while the daemon runs
        write_image(env.copy_out, 8 << 20, random=False)
        raw = env.command(run.Case(run.Workload("copy", "copy", 8 << 20, 0), run.QEMU_IMG), 1)
        r = subprocess.run(raw.argv, capture_output=True, text=True, timeout=60, env=tool_env())
        assert r.returncode == 0, r.stderr
        assert env.copy_out.read_bytes() == src.data
    finally:
        env.qsd.stop()


@pytest.mark.parametrize("backend, contenders", [
    ("warmcopy", list(run.PLAIN_COPY_CONTENDERS)),
    ("coldcopy", [run.B_COPY]),        # each cold run drops every cache: one is enough
])
def test_plain_copy_rows_copy_the_source_to_a_new_file(tmp_path, backend, contenders):
    # The issue-30 copy rows as the suite runs them (a new output each time,
    # the source warm, or every cache dropped): each contender's command
    # copies the source byte for byte; blkio copy's defaults take the
    # kernel copy and report their own timing.
    from conftest import require
    require(shutil.which("qemu-img"), "qemu-img is not installed")
    env = _env(tmp_path)
    wl = run.Workload(backend, "copy", 8 << 20, 0)
    cases = [run.Case(wl, c) for c in contenders]
    run.make_plain_copy_sources(env, cases)
    src = run.plain_copy_source(env, wl).read_bytes()
    for case in cases:
        r = run.run_case(env, case, 1)
        assert r["ok"], r
        assert (tmp_path / "plain-copy-out.img").read_bytes() == src, case.contender
        if case.contender == run.B_COPY:
            assert r["raw"]["own_seconds"] > 0
            assert any(a.startswith("--input-file=") for a in r["cmd"])


def test_cpu_figures_per_request_and_the_daemons_share():
    # blkio reports its own timed run's CPU; for C the child's whole CPU
    # time (getrusage) counts; the daemon's share is of the run's seconds.
    reps = [{"ok": True, "iops": 100e3, "runtime": 2, "client_cpu_s": 0.4,
             "daemon_cpu_s": 1.6, "raw": {"cpu_us_per_request": 1.5}},
            {"ok": True, "iops": 200e3, "runtime": 2, "client_cpu_s": 0.4,
             "daemon_cpu_s": 1.0, "raw": {}},
            {"ok": False, "error": "boom"}]
    got = run.cpu_figures(reps)
    assert got["client_cpu_us_per_request"] == pytest.approx((1.5 + 1.0) / 2)
    assert got["daemon_busy"] == pytest.approx((0.8 + 0.5) / 2)
    assert got["daemon_cpu_us_per_request"] == pytest.approx((8.0 + 2.5) / 2)
    assert run.cpu_figures([{"ok": True, "iops": 1.0, "runtime": 1, "raw": {}}]) == {}


# ---------------------------------------------------------------------------
# make bench: the percentile rows beside fio


def test_bench_suite_puts_blkio_percentiles_beside_fio(tmp_path):
    import argparse
    suite = run
    require(shutil.which("fio"), "fio is not installed")
    env = suite.Env(argparse.Namespace(size=16, python=sys.executable), tmp_path)
    with open(env.image, "wb") as f:
        f.write(os.urandom(16 << 20))
    cases = [suite.Case(wl, c) for wl, blkio_api in suite.LATENCY_ROWS
             for c in (blkio_api, suite.FIO)]
    assert set(c.key for c in cases) <= {c.key for c in suite.short_cases(1 << 30)}
    runs = {}
    for case in cases:
        cmd = env.command(case, 1)
        if case.contender == suite.FIO:
            assert "--lat_percentiles=1" in cmd.argv and f"--filename={env.image}" in cmd.argv
        r = suite.run_case(env, case, 1)
        assert r["ok"], r
        runs[case.key] = [r]
    rows = suite.latency_rows(suite.summarize(cases, runs))
    assert [r["blkio"] for r in rows] == [suite.B_BLOCK, suite.B_BATCH]
    for r in rows:
        for key in ("p50", "p99"):
            ours, clat, lat = r[f"blkio_{key}_us"], r[f"fio_clat_{key}_us"], r[f"fio_lat_{key}_us"]
            assert ours > 0 and clat > 0 and lat >= clat
            assert r[f"ratio_clat_{key}"] == round(ours / clat, 3)
            assert r[f"ratio_lat_{key}"] == round(ours / lat, 3)
    table = "\n".join(suite.latency_table(suite.summarize(cases, runs)))
    assert "| 1 | blkio blocking |" in table and "| 32 | blkio batch |" in table
