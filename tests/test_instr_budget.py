"""The instruction budget: each budgeted path's user-space instructions per
request, counted by callgrind (bench/instr.py: the difference of two runs of
``python -m blkio bench --requests=N``), stays within 3% of its figure in
bench/instr-budget.json -- above it fails (find what added the instructions),
and so does below it: lowering a figure lowers the budget, in the same commit
(``make bench-instr BENCH_INSTR_ARGS='--budgeted --write-budget'``).

Counts, unlike timings, do not swing (two runs agree to a few hundredths of a
percent), so this is a real check; but they belong to one environment: on a
machine or software the budget was not measured with, the test skips naming
the difference -- except with CI=true on the budget's machine type, where it
fails.  About three minutes (16 runs under valgrind, two at a time); left out
of the sanitizer run and of the wheel's host-suite run.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from conftest import CI, require

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load_instr():
    spec = importlib.util.spec_from_file_location("bench_instr", BENCH / "instr.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_instr"] = mod        # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


instr = _load_instr()
BUDGET = instr.load_budget()
BUDGETED = [r for r in instr.ROWS if r.budgeted]


def _environment_problem(row) -> str:
    """Why this row's budget does not apply here ("" when it does)."""
    now = instr.environment()
    recorded = BUDGET["environment"]
    diffs = instr.environment_differences(recorded, now,
                                          uses_uvloop="uvloop" in row.ours)
    if not diffs:
        return ""
    reason = ("bench/instr-budget.json was measured in another environment: "
              + "; ".join(diffs) + ". Measure this one's with `make bench-instr "
              "BENCH_INSTR_ARGS='--budgeted --write-budget'`")
    if CI and instr.same_machine_type(recorded, now):
        pytest.fail(reason + " (CI=true on the budget's machine type: the "
                    "budget must hold here)", pytrace=False)
    return reason


@pytest.fixture(scope="module")
def instr_env(tmp_path_factory):
    """The page-cached file the paths read (256 MiB of random data, its pages
    locked in the cache), once."""
    require(shutil.which("valgrind"), "valgrind is not installed (apt-get install valgrind)")
    env = instr.Env(tmp_path_factory.mktemp("instr"))
    try:
        env.prepare([instr.P[r.ours] for r in BUDGETED])
        # unlocked, pages the machine reclaims make reaps partial: other code
        require(env.pages_locked, "cannot lock the read file's pages in the page cache "
                f"(mlock: {'; '.join(p.why for p in env.pinned)}; run as root)")
        yield env
    finally:
        env.stop()


@pytest.mark.parametrize("row", BUDGETED, ids=[r.key for r in BUDGETED])
def test_path_stays_within_its_instruction_budget(instr_env, row):
    reason = _environment_problem(row)
    if reason:
        pytest.skip(reason)
    # its two runs (N1 and N2 requests) side by side
    fig = instr.measure(instr_env, [row.ours], jobs=2)[row.ours]
    assert fig.get("per_unit") is not None, f"{row.title}: not measured: {fig.get('error')}"
    verdict = instr.budget_verdict(fig["per_unit"], BUDGET["budgets"][row.key],
                                   BUDGET["tolerance"])
    assert verdict is None, f"{row.title}: {verdict}"


# --------------------------------------------------------------------------
# the budget file and the verdict themselves (no valgrind)


def test_budget_holds_a_figure_for_every_budgeted_path_and_its_environment():
    assert set(BUDGET["budgets"]) == {r.key for r in BUDGETED}
    assert all(isinstance(v, int) and v > 0 for v in BUDGET["budgets"].values())
    assert set(BUDGET["environment"]) == set(instr.environment())
    assert BUDGET["tolerance"] == instr.TOLERANCE == 0.03


@pytest.mark.parametrize("measured_figure, ok", [
    (1000, True), (1030, True), (970, True),
    (1031, False), (969, False), (2000, False), (500, False)])
def test_verdict_fails_three_percent_either_side_of_the_budget(measured_figure, ok):
    verdict = instr.budget_verdict(measured_figure, 1000, 0.03)
    assert (verdict is None) == ok
    if measured_figure < 970:
        assert "lowering a figure lowers the budget" in verdict
    elif measured_figure > 1030:
        assert "over the budget" in verdict


def test_environment_difference_names_what_differs():
    recorded = dict(instr.environment(), numpy="0.0.1", uvloop="0.0.2")
    diffs = instr.environment_differences(recorded, instr.environment(), uses_uvloop=False)
    assert len(diffs) == 1 and diffs[0].startswith("numpy ") and "0.0.1" in diffs[0]
    assert len(instr.environment_differences(recorded, instr.environment())) == 2
    assert instr.same_machine_type(recorded, instr.environment())
