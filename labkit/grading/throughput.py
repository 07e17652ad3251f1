"""Batch grading throughput, measured: `python -m labkit.grading.throughput [--labs 01 02] [--before 2] [--after 6]`.

A benchmark, not a test. For each lab it writes copies of the solved and the student notebook (solved,
unfilled, and solved with every other exercise left as the stub, each with its own learner id), grades
them with `python -m labkit grade --jobs J` twice: every cell ("before", `--all-cells`) and without the
cells tagged `skip-grading` ("after"), and times one submission's fixed cost alone: a kernel started, the
notebook's two set-up cells (installation check, imports) run, the grading harness called once. It prints seconds per
submission (wall time of the run / submissions) and the mean points per kind of copy, which must be the
same before and after, and writes everything as JSON to `--json`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import tempfile
import time
from pathlib import Path

import nbformat

from labkit.grading import batch
from labkit.grading.sandbox.runner import Job, Limits, run_submission
from labkit.machine import cpu_model
from labkit.release import student_notebook

KINDS = ("solved", "unfilled", "half")


def copies(master_path: Path, count: int) -> dict[str, tuple[str, nbformat.NotebookNode]]:
    """`count` submissions of one lab: file name -> (kind, notebook), the kinds in turn."""
    master = nbformat.read(master_path, as_version=4)
    student = student_notebook(master, name=str(master_path))
    solutions = {cell.id: cell.source for cell in master.cells}
    out = {}
    for number in range(count):
        kind = KINDS[number % len(KINDS)]
        notebook = copy.deepcopy(student)
        stubs = [cell for cell in notebook.cells if "raise NotImplementedError()" in cell.source]
        for position, cell in enumerate(stubs):
            if kind == "solved" or (kind == "half" and position % 2 == 0):
                cell.source = solutions[cell.id]
        notebook.metadata["labkit"] = {"learner": f"learner{number:03d}"}
        out[f"learner{number:03d}.ipynb"] = (kind, notebook)
    return out


def _grade(folder: Path, lab: str, jobs: int, all_cells: bool, notebook: Path) -> tuple[float, dict[str, float]]:
    """Seconds for grading every notebook in `folder`, and each learner's total."""
    book = folder / "gradebook.csv"
    argv = [str(folder), "--lab", lab, "--jobs", str(jobs), "--out", str(book), "--quiet", "--force",
            "--notebook", str(notebook), "--cell-timeout", "600", "--timeout", "1200"] + (["--all-cells"] * all_cells)
    started = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        batch.main(argv)
    seconds = time.monotonic() - started
    import csv

    with open(book, newline="", encoding="utf-8") as stream:
        totals = {row["learner"]: float(row["total"]) for row in csv.DictReader(stream)}
    return seconds, totals


def fixed_cost(master_path: Path, lab: str) -> float:
    """Seconds for one submission's fixed part: kernel start, the two set-up cells, the harness called once."""
    notebook = nbformat.read(master_path, as_version=4)
    code = [(i, c.source) for i, c in enumerate(notebook.cells) if c.cell_type == "code"][:2]
    exercise = next(e for e in batch.registry().values() if e.lab == lab)
    case = next(c for c in exercise.cases if not c.hidden)
    job = Job(exercise.id, "_not_defined", [case.inputs()], exercise.timeout)
    started = time.monotonic()
    run_submission(code, [job], Limits(cell_timeout=600, notebook_timeout=1200))
    return time.monotonic() - started


def measure_lab(master_path: Path, before: int, after: int, jobs: int) -> dict:
    """Before/after seconds per submission, fixed cost and mean totals per kind, for one lab."""
    lab = f"lab{master_path.name[:2]}"
    student = master_path.parent / "student" / master_path.name
    result = {"lab": lab, "fixed_cost_s": round(fixed_cost(master_path, lab), 1)}
    for label, count, all_cells in (("before", before, True), ("after", after, False)):
        if not count:
            continue
        with tempfile.TemporaryDirectory(prefix="labkit-throughput-") as tmp:
            subs = copies(master_path, count)
            for name, (_, notebook) in subs.items():
                nbformat.write(notebook, Path(tmp) / name)
            seconds, totals = _grade(Path(tmp), lab, jobs, all_cells, student)
        kinds = {kind: [totals[n[:-6]] for n, (k, _) in subs.items() if k == kind and n[:-6] in totals]
                 for kind in KINDS}
        result[label] = {"submissions": count, "seconds": round(seconds, 1),
                         "per_submission_s": round(seconds / count, 1),
                         "mean_total": {k: round(sum(v) / len(v), 2) for k, v in kinds.items() if v}}
    if before and after:
        result["speedup"] = round(result["before"]["per_submission_s"] / result["after"]["per_submission_s"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    """Measure the labs named (default: every master in --masters) and print one line per lab."""
    parser = argparse.ArgumentParser(prog="python -m labkit.grading.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--masters", type=Path, default=Path("notebooks"))
    parser.add_argument("--labs", nargs="*", help="lab numbers (default: all)")
    parser.add_argument("--before", type=int, default=2, help="submissions graded with every cell (0: skip)")
    parser.add_argument("--after", type=int, default=6, help="submissions graded without skip-grading cells (0: skip)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    masters = sorted(args.masters.glob("[0-9][0-9]_*.ipynb"))
    masters = [m for m in masters if not args.labs or m.name[:2] in args.labs]
    results = {"cpu": cpu_model(), "jobs": args.jobs, "labs": []}
    for master in masters:
        lab = measure_lab(master, args.before, args.after, args.jobs)
        results["labs"].append(lab)
        print(json.dumps(lab), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
