#!/usr/bin/env python3
"""The docs' performance results, from one `make bench` JSON: goal table,
per-workload tables and the plot, written as Markdown and PNG.

    python scripts/bench_page.py [bench/results/bench-STAMP.json [OUTDIR]]

Defaults: docs/_data/bench.json (the committed run the site shows) into
docs/_generated/.  `make docs` runs it (through docs/_ext/blkio_pages.py).
The tables and the plot come from bench/run.py's own functions, so the page
shows what `make bench` prints.  To publish a new run: copy its JSON over
docs/_data/bench.json and add a dated entry to docs/bench-history.md.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parent.parent


def _bench_run() -> Any:
    """bench/run.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("blkio_bench_run", REPO / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def goal_table(run: Any, doc: Dict[str, Any]) -> List[str]:
    """One row per goal: the ratio of medians, the goal, the verdict, and
    each repetition's ratio."""
    unit_of = run.unit_formatter(doc["results"])
    lines = ["| issue | ratio | goal | this run | verdict | each repetition | figures |",
             "|---|---|---:|---:|---|---|---|"]
    for g in doc["goals"]:
        verdict = g["verdict"]
        if verdict in ("n/a", "not run"):
            lines.append(f"| {g['issue']} | {_cell(g['name'])} | "
                         f"{g['threshold'] if g['threshold'] is not None else '-'} | - | "
                         f"{verdict}: {_cell(g.get('why', ''))} | - | - |")
            continue
        reps = " ".join(f"{r:.2f}" for r in g.get("ratio_by_rep") or [] if r is not None)
        figs = (f"{unit_of(g['numerator'], g['numerator_figure'])} / "
                f"{unit_of(g['denominator_best'], g['denominator_figure'])}")
        ratio = f"{g['ratio']:.2f}"
        if verdict == "missed":
            ratio = f"**{ratio}**"
        goal = f"≥ {g['threshold']:g}" if g["threshold"] is not None else "-"
        lines.append(f"| {g['issue']} | {_cell(g['name'])} | {goal} | {ratio} | {verdict} | "
                     f"{reps or '-'} | {_cell(figs)} |")
    return lines


def build(json_path: Path, out_dir: Path) -> None:
    """Write out_dir/bench-results.md and out_dir/bench.png."""
    run = _bench_run()
    doc = json.loads(Path(json_path).read_text())
    summary = doc["results"]
    cases = [run.Case(run.Workload(**e["workload"]), e["contender"]) for e in summary.values()]
    m = doc["machine"]
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"Run of {m['date']}: `make bench` ({m['suite']} suite), {m['nproc']} CPUs "
          f"({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, libblkio "
          f"{m['libblkio']}; each figure the median of {m['reps']} interleaved repetitions of "
          f"{m['runtime_s']} s (one call of {m['size_bytes'] >> 20} MiB for the sequential and "
          f"copy rows); the run took {m['elapsed_s'] / 60:.0f} min.", ""]
    if m.get("note"):
        md += [m["note"], ""]
    if m.get("not_available"):
        md += ["Not available in this run: " + "; ".join(
            f"{k} ({v})" for k, v in sorted(m["not_available"].items())) + ".", ""]
    md += ["### Goals", "",
           "Each ratio is the median of the numerator over the median of the denominator; "
           "**bold** is a miss. \"Each repetition\" divides repetition *i* of one by "
           "repetition *i* of the other (they ran within the same minutes). The A/A rows "
           "run C blkio-bench against itself: what this machine's noise alone does to a "
           "ratio.", ""]
    md += goal_table(run, doc)
    md += ["", "### Every workload", ""]
    # bench/run.py's tables use ###: one level down under "Every workload"
    md += ["#" + ln if ln.startswith("### ") else ln for ln in run.table_lines(cases, summary)]
    if run.plot(summary, cases, out_dir / "bench.png"):
        md += ["", "### Plot", "", "![IOPS against iodepth and threads; MB/s of the one-call "
               "rows](bench.png)", ""]
    (out_dir / "bench-results.md").write_text("\n".join(md) + "\n")


def main(argv: List[str]) -> int:
    src = Path(argv[0]) if argv else REPO / "docs" / "_data" / "bench.json"
    out = Path(argv[1]) if len(argv) > 1 else REPO / "docs" / "_generated"
    build(src, out)
    print(out / "bench-results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
