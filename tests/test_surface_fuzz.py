"""The public surface survives a hostile argument corpus (issue 28, item 10).

tests/surface_fuzz.py (the child) builds every state a user can reach, lists
the public attributes of every object there and calls each with hostile
arguments, logging each probe before it runs.  This parent runs it in a
child interpreter, starts a new child after a crash (a signal, a nonzero
exit) or a hang (no progress for HANG_TIMEOUT s: the child is killed), each
time at the probe after the one that died, and fails listing every bad
probe, grouped by what went wrong.

Reproduce one probe (or a group, a glob) through the test, with its
backends::

    BLKIO_FUZZ_ONLY='open:dev.read(offset=None)' .venv/bin/pytest tests/test_surface_fuzz.py
    BLKIO_FUZZ_GROUP='direct:*' .venv/bin/pytest tests/test_surface_fuzz.py

or by hand (io_uring groups need nothing else)::

    .venv/bin/python tests/surface_fuzz.py --only 'open:dev.read(offset=None)'

Under AddressSanitizer (``make test-asan``, detected from LD_PRELOAD) the
main groups use the short corpus too, and a probe may take longer.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

CHILD = Path(__file__).with_name("surface_fuzz.py")
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
HANG_TIMEOUT = 60.0 if UNDER_ASAN else 10.0     # seconds without progress on one probe
MAX_CHILDREN = 300                               # a run that needs more is broken beyond listing


@dataclasses.dataclass
class Finding:
    probe: str
    what: str                   # "crash", "hang", "bad"
    detail: str
    where: str = ""             # type.attribute ("Queue.read"), the same in every state
    alone: str = ""             # how the probe behaves run alone (crashes and hangs)


@dataclasses.dataclass
class Run:
    findings: List[Finding]
    probes: int                 # probes started
    enumerated: int             # probes the groups listed
    skipped: int                # left out: their attribute had crashed or hung before
    children: int               # child processes started
    seconds: float
    notes: List[str]


def _signal_name(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


_CRASH_LINES = re.compile(r"Fatal Python error|panicked at|AddressSanitizer|runtime error:|"
                          r"Assertion|ERROR: |SUMMARY: |Aborted|double free|corrupted")


def crash_lines(path: Path, start: int, pid: int) -> str:
    """What a dead child said about its death (faulthandler's first line,
    a libblkio panic), from its stderr since ``start``, and the summary of
    a sanitizer report it left (``make test-asan`` sends them to files)."""
    texts = []
    try:
        with open(path, "rb") as f:
            f.seek(start)
            texts.append(f.read().decode(errors="replace"))
    except OSError:
        pass
    for var in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):
        where = re.search(r"log_path=([^:]+)", os.environ.get(var, ""))
        if where:
            try:
                texts.append(Path(f"{where.group(1)}.{pid}").read_text(errors="replace"))
            except OSError:
                pass
    lines = [line.strip() for text in texts for line in text.splitlines() if _CRASH_LINES.search(line)]
    return "; ".join(dict.fromkeys(lines))[:600]


def child_command(args: List[str]) -> List[str]:
    return [sys.executable, str(CHILD), *args]


def run_fuzzer(backend_args: List[str], workdir: Path, *, only: Optional[List[str]] = None,
               group: Optional[str] = None, tier: Optional[str] = None,
               hang_timeout: float = HANG_TIMEOUT) -> Run:
    """Run the child until it has been through every probe; restart it after
    each crash or hang at the next probe."""
    log = workdir / "fuzz.jsonl"
    err = workdir / "child-stderr.txt"
    log.unlink(missing_ok=True)
    base = [*backend_args, "--log", str(log)]
    if tier:
        base += ["--tier", tier]
    if group:
        base += ["--group", group]
    for o in only or ():
        base += ["--only", o]
    findings: List[Finding] = []
    notes: List[str] = []
    skip: List[str] = []        # attributes left out after one of their probes died
    start = (0, 0)
    probes = children = skipped = 0
    sizes: Dict[int, int] = {}
    t0 = time.monotonic()
    offset = 0
    while True:
        children += 1
        if children > MAX_CHILDREN:
            notes.append(f"gave up after {MAX_CHILDREN} child processes")
            break
        err_start = err.stat().st_size if err.exists() else 0
        with open(err, "ab") as err_file:
            skips = [a for key in skip for a in ("--skip", key)]
            proc = subprocess.Popen(child_command([*base, *skips, "--start", f"{start[0]}:{start[1]}"]),
                                    stdin=subprocess.DEVNULL, stdout=err_file, stderr=err_file,
                                    cwd=workdir, start_new_session=True)
        last: Optional[dict] = None         # the last event read
        last_start: Optional[dict] = None
        last_seen = time.monotonic()
        done = hung = False
        buf = b""       # a line a killed child left half written is dropped with it
        while True:
            exited = proc.poll() is not None
            with open(log, "ab+") as f:
                f.seek(offset)
                chunk = f.read()
            if chunk:
                buf += chunk
                offset += len(chunk)
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        ev = json.loads(line)
                    except ValueError:      # the tail of a line a dead child began
                        continue
                    last = ev
                    last_seen = time.monotonic()
                    kind = ev["e"]
                    if kind == "start":
                        last_start = ev
                        probes += 1
                    elif kind == "end" and ev.get("bad"):
                        findings.append(Finding(ev["id"], "bad", ev["bad"], ev.get("w", "")))
                    elif kind == "warn":
                        w = last_start.get("w", "") if last_start and last_start["id"] == ev["id"] else ""
                        findings.append(Finding(ev["id"], "bad", f"warning: {ev['m']}", w))
                    elif kind == "note":
                        notes.append(f"{ev['id']}: {ev['m']}")
                    elif kind == "group":
                        sizes[ev["gpos"]] = ev["n"]
                    elif kind == "skipped":
                        skipped += ev["n"]
                    elif kind == "done":
                        done = True
            if exited:
                break
            if time.monotonic() - last_seen > hang_timeout:
                hung = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.02)
        if done and not hung and proc.returncode == 0:
            break
        how = f"no progress for {hang_timeout:.0f} s (killed)" if hung else _signal_name(proc.returncode)
        said = crash_lines(err, err_start, proc.pid) if not hung else ""
        detail = how + (f" ({said})" if said else "")
        if last is None:
            findings.append(Finding("(child start-up)", "hang" if hung else "crash", detail))
            break
        where = ""
        if last["e"] == "start":
            culprit, resume = last["id"], (last["gpos"], last["i"] + 1)
            where = last["w"]
            skip.append(last["key"])
        elif last["e"] == "step" and last.get("why") == "enumerate":
            culprit = f"{last['g']} (building: {last['m']})"
            resume = (last["gpos"] + 1, 0)
        elif last["e"] == "step":
            culprit = f"{last['why'].removeprefix('after ')} (then rebuilding: {last['m']})"
            resume = (last_start["gpos"], last_start["i"] + 1) if last_start else (start[0] + 1, 0)
        elif last["e"] == "end":
            culprit = f"{last['id']} (after it returned)"
            resume = (last["gpos"], last["i"] + 1)
        else:       # "group", "note", "warn": between probes
            culprit = f"(after {last.get('id') or last.get('g')})"
            resume = ((last_start["gpos"], last_start["i"] + 1) if last_start
                      else (start[0] + 1, 0))
        findings.append(Finding(culprit, "hang" if hung else "crash", detail, where))
        if resume <= start:
            resume = (start[0], start[1] + 1)
        start = resume
    if skipped:
        notes.append(f"{skipped} probe(s) left out: their attribute had crashed or hung before")
    return Run(findings, probes, sum(sizes.values()), skipped, children, time.monotonic() - t0, notes)


def check_alone(backend_args: List[str], workdir: Path, probe: str, timeout: float) -> str:
    """How one probe behaves in a child of its own (does a crash need the probes before it?)."""
    log = workdir / "alone.jsonl"
    log.unlink(missing_ok=True)
    try:
        proc = subprocess.run(child_command([*backend_args, "--only", probe, "--log", str(log)]),
                              capture_output=True, timeout=timeout, cwd=workdir,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "alone: hangs too"
    if proc.returncode == 0 and '"e": "done"' in log.read_text():
        return "alone: no crash (it needs the probes before it)"
    return f"alone: {_signal_name(proc.returncode)} too"


_NUMBER = re.compile(r"0x[0-9a-f]+|-?\d+(\.\d+)?")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|<[^>]*>")


def cause(f: Finding) -> str:
    """A key that puts probes failing the same way together, whatever the
    state: what went wrong (values blanked) and the type's attribute."""
    what = f.detail
    if what.startswith("accepts "):
        what = what.rsplit(": ", 1)[0]
    elif what.startswith("warning: "):
        what = _QUOTED.sub("'…'", re.sub(r"\(\w+\.py:\d+\)", "", what))
    else:
        what = _NUMBER.sub("N", _QUOTED.sub("'…'", what))
    if what.startswith(("warning: ", "closing its state")):
        return f"{f.what}: {what}"      # where it surfaced says little of where it comes from
    return f"{f.what}: {what} — in {f.where or f.probe}"


def report(run: Run) -> str:
    by_cause: Dict[str, List[Finding]] = collections.OrderedDict()
    for f in run.findings:
        by_cause.setdefault(cause(f), []).append(f)
    out = [f"{len(run.findings)} bad probe(s) of {run.probes} in {run.seconds:.0f} s "
           f"({run.children} child process(es)); {len(by_cause)} distinct cause(s)."]
    out.append("Reproduce one: BLKIO_FUZZ_ONLY='<probe>' .venv/bin/pytest tests/test_surface_fuzz.py"
               "  (io_uring groups also: .venv/bin/python tests/surface_fuzz.py --only '<probe>')")
    for key, items in by_cause.items():
        out.append(f"\n[{len(items)}] {key}")
        out.append(f"    e.g. {items[0].detail}")
        for f in items:
            extra = f"  [{f.alone}]" if f.alone else ""
            out.append(f"    {f.probe}{extra}")
    if run.notes:
        out.append("\nNotes:")
        out += [f"    {n}" for n in run.notes]
    return "\n".join(out)


def _optional_backend(notes: List[str], name: str, make):
    """A backend, or None with a note when its fixture skips (with CI=true it fails)."""
    try:
        return make()
    except pytest.skip.Exception as e:
        notes.append(f"{name} groups left out: {e.msg}")
        return None


def test_public_surface_survives_a_hostile_argument_corpus(request, make_image, tmp_path):
    notes: List[str] = []
    image = make_image(1 << 20, "fuzz.raw")
    backend = ["--image", str(image.path)]
    loop = _optional_backend(notes, "loop device", lambda: request.getfixturevalue("loopdev"))
    if loop is not None:
        backend += ["--loop-device", loop.path]
    # Two queues: one plain, one for polling.
    daemon = _optional_backend(notes, "vhost-user",
                               lambda: request.getfixturevalue("qsd")(num_queues=2, size=1 << 20))
    if daemon is not None:
        backend += ["--vhost-socket", daemon.socket]
    only = [p for p in os.environ.get("BLKIO_FUZZ_ONLY", "").split("\n") if p]
    tier = "short" if UNDER_ASAN else None
    run = run_fuzzer(backend, tmp_path, only=only or None,
                     group=os.environ.get("BLKIO_FUZZ_GROUP"), tier=tier)
    run.notes[:0] = notes
    # Does the first crash or hang of each cause happen alone too?
    checked = set()
    for f in run.findings:
        if f.what in ("crash", "hang") and f.where and cause(f) not in checked:
            checked.add(cause(f))
            f.alone = check_alone(backend, tmp_path, f.probe, HANG_TIMEOUT + 5)
    print(f"surface fuzzer: {run.probes} probes, {run.children} child process(es), "
          f"{run.seconds:.1f} s{' (ASan, short corpus)' if UNDER_ASAN else ''}")
    text = report(run)
    (tmp_path / "report.txt").write_text(text + "\n")
    group = os.environ.get("BLKIO_FUZZ_GROUP")
    assert run.probes > (0 if only or group else 1000), text
    assert not run.findings, text


def test_the_fuzzer_names_each_crash_hang_and_wrong_outcome_and_goes_on(tmp_path):
    """The harness itself, on SelfCheck's methods (surface_fuzz.py --selfcheck):
    an abort, a hang, an await that never ends, a task left pending, a
    coroutine never awaited, an exception outside the contract, a float
    accepted for an int, a ResourceWarning, a probe that closes every fd (the
    log among them); and the probes after each still run."""
    run = run_fuzzer(["--selfcheck"], tmp_path, hang_timeout=3.0)
    found = {(f.probe, f.what): f.detail for f in run.findings}
    assert "SIGABRT" in found[("selfcheck:check.aborts(<valid>)", "crash")], report(run)
    assert ("selfcheck:check.hangs(<valid>)", "hang") in found, report(run)
    assert found[("selfcheck:check.raises_runtime_error(<valid>)", "bad")].startswith(
        "raised RuntimeError: outside the contract"), report(run)
    assert found[("selfcheck:check.accepts_floats(offset=4096.5)", "bad")].startswith(
        "accepts floats for the int parameter 'offset'"), report(run)
    assert "ResourceWarning" in found[("selfcheck:check.leaks(<valid>)", "bad")], report(run)
    assert found[("selfcheck:check.awaits_forever(<valid>)", "bad")].startswith("hang: await"), report(run)
    assert "task(s) pending" in found[("selfcheck:check.leaves_a_task(<valid>)", "bad")], report(run)
    assert "never awaited" in found[("selfcheck:check.drops_a_coroutine(<valid>)", "bad")], report(run)
    assert not [f for f in run.findings if "refuses_floats" in f.probe or "abandons_fds" in f.probe], report(run)
    # One child, one after the abort, one after the hang; every probe ran or
    # belonged to the attribute that had died.
    assert run.children == 3, report(run)
    assert run.probes + run.skipped == run.enumerated, report(run)
