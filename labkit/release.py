"""Build the student notebooks from the solved masters: `python -m labkit release [--check]`.

Every master `notebooks/NN_slug.ipynb` becomes `notebooks/student/NN_slug.ipynb`:

* in code cells, each region from a `### BEGIN SOLUTION` line to a `### END SOLUTION` line (nbgrader's
  markers; they may be indented) becomes `# YOUR CODE HERE` + `raise NotImplementedError()` at the BEGIN
  marker's indentation;
* cells tagged `remove-student` are dropped;
* outputs, execution counts and execution timing metadata are cleared; all other metadata is kept.

Cells tagged `skip-grading` (plots, benchmarks, demonstrations) are kept, tag included, but batch grading
and the Gradescope autograder do not run them. The release refuses a tag on a cell holding a solution
region or a check call, and on a cell defining a name that a later untagged cell reads (static analysis,
`labkit.notebook.skip_conflicts`): skipping must never change what is graded.

The output is deterministic (same master -> byte-identical file), so `--check` can compare the would-be
content with the file on disk and fail when a student notebook is missing or out of date.

`--nbgrader COURSE_DIR` also writes nbgrader *source* notebooks, `COURSE_DIR/source/labNN/NN_slug.ipynb`,
for instructors who grade with nbgrader: the master with outputs cleared and `remove-student` cells
dropped, its solution regions kept (nbgrader strips the same markers itself), and nbgrader cell metadata:
cells with solution markers are autograded-answer cells (`solution`), each `labkit.check("labNN.x", f)`
cell becomes a locked autograder-test cell (`grade`, `locked`, the exercise's points) that displays the
report and ends with the report's score, which nbgrader takes as partial credit.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from labkit.notebook import (BEGIN_MARKER, END_MARKER, SKIP_GRADING_TAG, MarkerError, check_calls_in, defined_names,
                             is_check_cell, marker_in, skip_conflicts)

STUB_LINES = ("# YOUR CODE HERE", "raise NotImplementedError()")
REMOVE_TAG = "remove-student"
MASTER_NAME = re.compile(r"^\d{2}_[\w-]+\.ipynb$")
NBGRADER_SCHEMA = 3
# Cell metadata that records a run of the solved master (nbclient timings, output view state).
RUN_METADATA_KEYS = ("execution", "collapsed", "scrolled")


class ReleaseError(ValueError):
    """A master notebook cannot be turned into a student notebook."""


def strip_solutions(source: str) -> str:
    """Replace every BEGIN/END SOLUTION region of a code cell's source with the stub, keeping indentation."""
    lines_out: list[str] = []
    begin_line = None
    for number, line in enumerate(source.split("\n"), start=1):
        try:
            marker = marker_in(line)
        except MarkerError as error:
            raise ReleaseError(str(error)) from None
        if marker == BEGIN_MARKER:
            if begin_line is not None:
                raise ReleaseError(f"line {number}: nested {BEGIN_MARKER!r} (region opened at line {begin_line})")
            begin_line = number
            indent = line[: len(line) - len(line.lstrip())]
            lines_out.extend(indent + stub for stub in STUB_LINES)
        elif marker == END_MARKER:
            if begin_line is None:
                raise ReleaseError(f"line {number}: {END_MARKER!r} without {BEGIN_MARKER!r}")
            begin_line = None
        elif begin_line is None:
            lines_out.append(line)
    if begin_line is not None:
        raise ReleaseError(f"line {begin_line}: {BEGIN_MARKER!r} without {END_MARKER!r}")
    return "\n".join(lines_out)


def _student_cell(cell: NotebookNode, *, name: str, index: int) -> NotebookNode:
    """The student version of one master cell (a copy); raises ReleaseError naming notebook and cell."""
    cell = copy.deepcopy(cell)
    # Masters older than nbformat 4.5 have no ids; a fixed one (not nbformat's random one) keeps output stable.
    cell.setdefault("id", f"cell-{index}")
    where = f"{name}: cell {index} (id {cell.id})"
    if cell.cell_type != "code":
        if BEGIN_MARKER in cell.source or END_MARKER in cell.source:
            raise ReleaseError(f"{where}: solution marker in a {cell.cell_type} cell; only code cells may have one")
        return cell
    try:
        cell.source = strip_solutions(cell.source)
    except ReleaseError as error:
        raise ReleaseError(f"{where}: {error}") from None
    cell.outputs = []
    cell.execution_count = None
    for key in RUN_METADATA_KEYS:
        cell.metadata.pop(key, None)
    return cell


def _check_unique_ids(notebook: NotebookNode, *, name: str) -> None:
    """Raise ReleaseError on a repeated cell id (nbformat.validate would replace it with a random one)."""
    seen = set()
    for cell in notebook.cells:
        if cell.id in seen:
            raise ReleaseError(f"{name}: cell id {cell.id!r} is used by more than one cell")
        seen.add(cell.id)


def check_skip_tags(notebook: NotebookNode, *, name: str) -> None:
    """Raise ReleaseError where a `skip-grading` cell holds graded code or defines a name a kept cell reads."""
    sources = [cell.source if cell.cell_type == "code" else "" for cell in notebook.cells]
    skipped = {index for index, cell in enumerate(notebook.cells)
               if SKIP_GRADING_TAG in cell.get("metadata", {}).get("tags", [])}
    for index in sorted(skipped):
        if BEGIN_MARKER in sources[index] or check_calls_in(sources[index]):
            raise ReleaseError(f"{name}: cell {index} is tagged {SKIP_GRADING_TAG!r} but holds a solution region "
                               "or a labkit.check call: grading needs it")
    conflicts = skip_conflicts(sources, skipped)
    if conflicts:
        index, used, provider = conflicts[0]
        raise ReleaseError(f"{name}: cell {index} reads `{used}`, last defined by cell {provider}, which is tagged "
                           f"{SKIP_GRADING_TAG!r}: untag that cell, or define `{used}` in an untagged cell")


def student_notebook(master: NotebookNode, *, name: str) -> NotebookNode:
    """The student version of `master` (left unchanged); `name` identifies it in error messages."""
    check_skip_tags(master, name=name)
    student = copy.deepcopy(NotebookNode({key: value for key, value in master.items() if key != "cells"}))
    student.nbformat_minor = max(student.nbformat_minor, 5)  # cell ids are required from 4.5 on
    student.cells = [
        _student_cell(cell, name=name, index=index)
        for index, cell in enumerate(master.cells)
        if REMOVE_TAG not in cell.get("metadata", {}).get("tags", [])
    ]
    _check_unique_ids(student, name=name)
    try:
        nbformat.validate(student)
    except nbformat.ValidationError as error:
        raise ReleaseError(f"{name}: student notebook is not valid: {error.message}") from None
    return student


def _render(notebook: NotebookNode) -> str:
    """The exact text `nbformat.write` puts on disk: sorted-key JSON plus a trailing newline."""
    text = nbformat.writes(notebook)
    return text if text.endswith("\n") else text + "\n"


def master_paths(masters_dir: Path) -> list[Path]:
    """The master notebooks `NN_slug.ipynb` directly in `masters_dir`, sorted by name."""
    if not masters_dir.is_dir():
        raise ReleaseError(f"masters directory {masters_dir} does not exist")
    return sorted(p for p in masters_dir.iterdir() if p.is_file() and MASTER_NAME.match(p.name))


def release(masters_dir: str | Path, out_dir: str | Path, *, check: bool = False) -> list[str]:
    """Write (or with `check`, only compare) every student notebook; return the paths written / out of date."""
    masters_dir, out_dir = Path(masters_dir), Path(out_dir)
    changed = []
    for master_path in master_paths(masters_dir):
        master = nbformat.read(master_path, as_version=4)
        text = _render(student_notebook(master, name=str(master_path)))
        target = out_dir / master_path.name
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        changed.append(str(target))
        if not check:
            out_dir.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8", newline="\n")
    return changed


def _nbgrader_meta(grade_id: str, *, solution: bool, grade: bool, points: float = 0) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": grade, "schema_version": NBGRADER_SCHEMA,
            "solution": solution, "task": False}
    if grade:
        meta["points"] = points
    return meta


def nbgrader_notebook(master: NotebookNode, *, name: str, points: dict[str, float]) -> NotebookNode:
    """The nbgrader source version of `master`: solutions kept, outputs cleared, nbgrader cell metadata.

    `points` maps exercise ids to points (from `labkit.exercises()`); a check cell of an unknown exercise
    raises ReleaseError.
    """
    student = student_notebook(master, name=name)  # validates markers and ids, drops remove-student cells
    by_id = {cell.get("id"): cell for cell in master.cells}
    source = copy.deepcopy(student)
    checked = {fn: ex for cell in source.cells if cell.cell_type == "code" for ex, fn in check_calls_in(cell.source)}
    for index, cell in enumerate(source.cells):
        if cell.cell_type != "code":
            continue
        cell.source = by_id[cell.id].source
        if BEGIN_MARKER in cell.source:
            exercises = sorted(checked[n] for n in defined_names(cell.source) if n in checked)
            grade_id = f"{exercises[0].replace('.', '-')}-solution" if exercises else f"solution-{cell.id}"
            cell.metadata["nbgrader"] = _nbgrader_meta(grade_id, solution=True, grade=False)
        elif is_check_cell(cell.source):
            calls = check_calls_in(cell.source)
            if len(calls) != 1:
                raise ReleaseError(f"{name}: cell {index} (id {cell.id}): one labkit.check per test cell, got {len(calls)}")
            exercise_id, function = calls[0]
            if exercise_id not in points:
                raise ReleaseError(f"{name}: cell {index} (id {cell.id}): unknown exercise {exercise_id!r}")
            kept = [line for line in cell.source.splitlines()
                    if line.lstrip().startswith("#") and "NBVAL" not in line]  # nbval markers mean nothing there
            cell.source = "\n".join(kept + [
                f"_report = labkit.check({exercise_id!r}, {function})",
                "display(_report)",
                "_report.score  # nbgrader gives partial credit from this number",
            ])
            cell.metadata["nbgrader"] = _nbgrader_meta(exercise_id.replace(".", "-"), solution=False, grade=True,
                                                       points=points[exercise_id])
    try:
        nbformat.validate(source)
    except nbformat.ValidationError as error:
        raise ReleaseError(f"{name}: nbgrader notebook is not valid: {error.message}") from None
    return source


def nbgrader_release(masters_dir: str | Path, course_dir: str | Path, *, check: bool = False) -> list[str]:
    """Write (or with `check`, compare) `course_dir/source/labNN/NN_slug.ipynb` for every master."""
    from labkit.grading import registry  # only here: it imports jax

    points = {exercise_id: exercise.points for exercise_id, exercise in registry().items()}
    changed = []
    for master_path in master_paths(Path(masters_dir)):
        master = nbformat.read(master_path, as_version=4)
        text = _render(nbgrader_notebook(master, name=str(master_path), points=points))
        target = Path(course_dir) / "source" / f"lab{master_path.name[:2]}" / master_path.name
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        changed.append(str(target))
        if not check:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8", newline="\n")
    return changed


def _parser() -> argparse.ArgumentParser:
    """Command-line options of `python -m labkit release`."""
    parser = argparse.ArgumentParser(
        prog="python -m labkit release",
        description="Build student notebooks (solutions stripped, outputs cleared) from the solved masters.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a student notebook is missing or out of date")
    parser.add_argument("--root", default=Path("."), type=Path,
                        help="the course folder holding notebooks/ (default: the current directory)")
    parser.add_argument("--masters", type=Path, help="master notebooks (default: ROOT/notebooks)")
    parser.add_argument("--out", type=Path, help="student notebooks (default: ROOT/notebooks/student)")
    parser.add_argument("--nbgrader", type=Path, metavar="COURSE_DIR",
                        help="also write nbgrader source notebooks to COURSE_DIR/source/labNN/")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `release`; exit 0 when done / up to date, 1 when `--check` finds stale files, 2 on bad masters."""
    args = _parser().parse_args(argv)
    args.masters = args.masters or args.root / "notebooks"
    args.out = args.out or args.root / "notebooks" / "student"
    try:
        changed = release(args.masters, args.out, check=args.check)
        if args.nbgrader is not None:
            changed += nbgrader_release(args.masters, args.nbgrader, check=args.check)
    except ReleaseError as error:
        print(f"release: {error}", file=sys.stderr)
        return 2
    if args.check:
        for path in changed:
            state = "out of date" if Path(path).exists() else "missing"
            print(f"{state}: {path} (run `python -m labkit release`)")
        if not changed:
            print(f"student notebooks in {args.out} are up to date")
        return 1 if changed else 0
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print(f"student notebooks in {args.out} are already up to date")
    return 0
