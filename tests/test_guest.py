"""nvme-io_uring, virtio-blk-vfio-pci and virtio-blk-vhost-vdpa, in a QEMU guest.

This host has no NVMe, VFIO or vDPA, so tests/guest/launcher.py boots ONE
guest per session (TCG unless KVM really boots) with the three devices, and
runs the in-guest suite (tests/guest/in_guest) there with the same Python and
the same installed blkio.  Each in-guest test shows up here as one test,
``test_in_guest[<module>:<test>[<driver>]]``, passing, failing (with the
in-guest failure message) or skipping as it did in the guest.

The in-guest test ids come from a host-side ``--collect-only`` of that
directory (cheap; nothing boots at collection).  The guest boots only when at
least one of these tests is selected, and runs only the selected ones.

Where the kernel package or qemu-system-x86 cannot be had, the tests skip with
the reason; with CI=true they fail instead.  BLKIO_SKIP_GUEST=1 skips them on
purpose.  BLKIO_GUEST_KEEP=1 keeps the guest's work directory (console log,
junit XML, images) for debugging.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

GUEST_DIR = Path(__file__).resolve().parent / "guest"
IN_GUEST_DIR = GUEST_DIR / "in_guest"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _load_launcher():
    name = "blkio_tests_guest_launcher"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, GUEST_DIR / "launcher.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


launcher = _load_launcher()


def _unavailable(reason: str):
    """Skip, or fail when CI=true (CI must run these tests)."""
    if CI:
        pytest.fail(f"guest tests cannot run (CI=true, so this fails): {reason}",
                    pytrace=False)
    pytest.skip(reason)


# ---------------------------------------------------------------------------
# Collection: the in-guest test ids, from a host-side --collect-only.
# ---------------------------------------------------------------------------

PYTEST_BASE = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark",
               f"--confcutdir={IN_GUEST_DIR}", f"--rootdir={IN_GUEST_DIR}",
               "-o", "addopts=", "--import-mode=importlib"]


def _collect_in_guest() -> tuple[list[str], str]:
    """(node ids relative to in_guest/, error text)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("BLKIO_GUEST", None)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", *PYTEST_BASE,
             str(IN_GUEST_DIR)],
            cwd=IN_GUEST_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return [], "collecting the in-guest tests on the host timed out"
    ids = [line.strip() for line in r.stdout.splitlines()
           if "::" in line and not line.startswith(("=", " "))]
    if r.returncode != 0 or not ids:
        return ids, f"collecting the in-guest tests failed (rc {r.returncode}):\n{r.stdout}"
    return ids, ""


def _short_id(nodeid: str) -> str:
    """'test_drivers_in_guest.py::test_x[nvme-io_uring]' -> 'drivers:test_x[nvme-io_uring]'."""
    path, _, rest = nodeid.partition("::")
    mod = Path(path).name[:-3] if path.endswith(".py") else path
    if mod.startswith("test_"):
        mod = mod[5:]
    if mod.endswith("_in_guest"):
        mod = mod[:-9]
    return f"{mod}:{rest.replace('::', '.')}"


def _junit_key(nodeid: str) -> tuple[str, str]:
    """The (classname, name) pytest writes to junit XML for a node id."""
    parts = nodeid.split("::")
    path = parts[0]
    mod = path[:-3] if path.endswith(".py") else path
    classname = ".".join([mod.replace("/", "."), *parts[1:-1]])
    return classname, parts[-1]


_IDS, _COLLECT_ERROR = _collect_in_guest()


def pytest_generate_tests(metafunc):
    if "in_guest_nodeid" in metafunc.fixturenames:
        ids = _IDS or ["<collection>"]
        metafunc.parametrize("in_guest_nodeid", ids, ids=[_short_id(i) for i in ids])


# ---------------------------------------------------------------------------
# The guest: booted once per session, for the selected in-guest tests.
# ---------------------------------------------------------------------------

class _Results:
    def __init__(self, run=None, cases=None, unavailable=None, kernel=""):
        self.run = run
        self.cases = cases or {}      # (classname, name) -> Element
        self.unavailable = unavailable
        self.kernel = kernel


def _parse_junit(path: Path) -> dict:
    cases = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        cases[(tc.get("classname", ""), tc.get("name", ""))] = tc
    return cases


@pytest.fixture(scope="session")
def guest_results(request):
    if os.environ.get("BLKIO_SKIP_GUEST") == "1":
        yield _Results(unavailable="BLKIO_SKIP_GUEST=1")
        return
    try:
        prep = launcher.prepare()
    except launcher.GuestUnavailable as e:
        yield _Results(unavailable=str(e))
        return
    selected = sorted({
        item.callspec.params["in_guest_nodeid"]
        for item in request.session.items
        if getattr(item, "callspec", None) and "in_guest_nodeid" in item.callspec.params
    } - {"<collection>"})
    args = [str(IN_GUEST_DIR / nid) for nid in selected] if selected != sorted(_IDS) else []
    timeout = launcher.DEFAULT_TIMEOUT if prep.accel == "tcg" else min(launcher.DEFAULT_TIMEOUT, 300)
    run = launcher.run_guest(args, timeout=timeout, prepared=prep)
    sys.stderr.write(f"\n[guest] {prep.kernel.version}, {run.accel}: boot + suite "
                     f"{run.seconds:.1f} s{', ' + run.message if run.message else ''}\n")
    cases = _parse_junit(run.junit) if run.junit else {}
    yield _Results(run, cases, kernel=prep.kernel.version)
    keep = os.environ.get("BLKIO_GUEST_KEEP") == "1" or not run.ok
    if not keep:
        shutil.rmtree(run.workdir, ignore_errors=True)
    else:
        sys.stderr.write(f"[guest] work directory kept: {run.workdir}\n")


_LOG_LINE = re.compile(r"(?:^|/)([^/\s]+\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def _log_outcomes(log: str) -> dict:
    """{'test_x.py::test_y[...]': 'PASSED', ...} from the in-guest -v log."""
    out = {}
    for line in log.splitlines():
        m = _LOG_LINE.search(line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def _text(el) -> str:
    if el is None:
        return ""
    return "\n".join(x for x in (el.get("message", ""), (el.text or "").strip()) if x)


def _tail(s: str, n: int = 4000) -> str:
    return s if len(s) <= n else "...\n" + s[-n:]


def test_in_guest(guest_results, in_guest_nodeid):
    if _COLLECT_ERROR:
        pytest.fail(_COLLECT_ERROR, pytrace=False)
    if guest_results.unavailable:
        _unavailable(guest_results.unavailable)
    run = guest_results.run
    where = f"in the guest ({run.accel}, kernel {guest_results.kernel})"
    tc = guest_results.cases.get(_junit_key(in_guest_nodeid))
    if tc is None:
        # No junit entry (the in-guest pytest was killed): the -v log may still
        # have the outcome.
        outcome = _log_outcomes(run.pytest_log).get(in_guest_nodeid)
        if outcome == "PASSED":
            return
        if outcome == "SKIPPED":
            pytest.skip(f"skipped {where} (no junit entry; see the in-guest log)")
        why = run.message or "the in-guest pytest did not report this test"
        why += f" (guest logs kept in {run.workdir})"
        pytest.fail(f"{in_guest_nodeid}: no result {where}: {why}\n"
                    f"--- in-guest pytest log (tail) ---\n{_tail(run.pytest_log, 3000)}\n"
                    f"--- guest console (tail) ---\n{run.tail(40)}", pytrace=False)
    out = tc.find("system-out")
    err = tc.find("system-err")
    captured = "\n".join(x.text for x in (out, err) if x is not None and x.text)
    if re.sub(r"-+ Captured \w+ -+", "", captured).strip():
        print(_tail(captured))            # shown by -rA / on failure
    for tag in ("failure", "error"):
        el = tc.find(tag)
        if el is not None:
            pytest.fail(f"{in_guest_nodeid} {'failed' if tag == 'failure' else 'errored'} "
                        f"{where}:\n{_text(el)}", pytrace=False)
    sk = tc.find("skipped")
    if sk is not None:
        pytest.skip(f"skipped {where}: {sk.get('message', '')}")
