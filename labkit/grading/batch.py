"""Grade a folder of submitted notebooks: `python -m labkit grade SUBMISSION... --lab 01`.

For each submission (a notebook, or a folder searched for `*.ipynb`):

1. it is read once and hashed; a submission whose hash is unchanged since the gradebook's row for it
   was written is skipped (resumable runs). Files that are not JSON, not a notebook, or not a valid
   nbformat notebook get the status `invalid notebook` and zero points, without a kernel;
2. its code cells run in a fresh kernel in a separate process (`labkit.grading.sandbox.runner`): memory
   limit, per-cell and per-notebook time limits, a scratch working directory, writes confined to it
   where the OS allows (Landlock), a minimal environment. Cells that only call `labkit.check(...)` are
   not run: their verdict would come from the learner's own process;
3. that kernel is asked to run the learner's functions (found by the names the lab's check cells pass,
   e.g. `labkit.check("lab01.attention", attention)`) on the grader's inputs, hidden cases included,
   built fresh here; the outputs come back as `.npy` files and are compared here with labkit's
   references by the same code `labkit.check` uses, so what the learner printed, patched or redefined in
   their kernel does not count;
4. its row (points per exercise, total, status, detail) replaces the old one in the gradebook, which is
   rewritten atomically after every submission; with `--feedback DIR`, the learner's HTML report goes to
   `DIR/<learner>.html`, hidden cases summarised without their inputs.

Statuses, most severe first: invalid notebook, crashed (the kernel died: `os._exit`, a fatal signal,
grader trouble), timeout (a cell, a case or the whole notebook ran out of time), memory limit (a
MemoryError under `--memory`), missing function (an exercise's function or class is not defined), ok.
Exercises a problem did not affect are still graded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import html
import json
import re
import sys
import time
import warnings
from pathlib import Path

import nbformat

from labkit.grading.sandbox import kernel_side
from labkit.grading.check import Grader, candidate_problem
from labkit.grading.exercise import Case, Exercise, registry
from labkit.grading.gradebook import Gradebook, atomic_write_text, content_hash
from labkit.grading.sandbox.runner import Execution, ExerciseRun, Job, Limits, run_submission
from labkit.grading.report import CaseResult, Report
from labkit.notebook import SKIP_GRADING_TAG, check_calls_in, is_check_cell, resolve_skips

STATUSES = ("invalid notebook", "crashed", "timeout", "memory limit", "missing function", "ok")
GRADER_ERROR = "grader error"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


# ------------------------------------------------------------------ reading notebooks

class InvalidNotebook(ValueError):
    """A submission that is not a readable, valid notebook."""


def load_notebook(data: bytes) -> nbformat.NotebookNode:
    """Parse and validate a submission; InvalidNotebook says what is wrong with it."""
    try:
        text = data.decode("utf-8")
        raw = json.loads(text)
    except (UnicodeDecodeError, ValueError) as err:
        raise InvalidNotebook(f"not JSON ({str(err)[:80]})") from None
    if not isinstance(raw, dict) or "cells" not in raw or "nbformat" not in raw:
        raise InvalidNotebook("JSON, but not a notebook (no 'cells' / 'nbformat')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            notebook = nbformat.reads(text, as_version=4)
            nbformat.validate(notebook)
    except Exception as err:  # noqa: BLE001 - nbformat raises several kinds for broken notebooks
        message = getattr(err, "message", None) or str(err)
        raise InvalidNotebook(f"not a valid notebook: {str(message).splitlines()[0][:120]}") from None
    return notebook


def check_calls(notebook: nbformat.NotebookNode) -> dict[str, str]:
    """Exercise id -> the name of the learner's function/class, from the notebook's check cells."""
    found: dict[str, str] = {}
    for cell in notebook.cells:
        for exercise_id, name in check_calls_in(cell.source) if cell.cell_type == "code" else []:
            found.setdefault(exercise_id, name)
    return found


def skippable_cells(notebook: nbformat.NotebookNode) -> dict[str, str]:
    """Cell id -> source of the lab notebook's cells tagged `skip-grading` (plots, benchmarks, demos)."""
    return {cell.get("id", ""): cell.source for cell in notebook.cells
            if cell.cell_type == "code" and SKIP_GRADING_TAG in cell.get("metadata", {}).get("tags", [])}


def cells_to_run(notebook: nbformat.NotebookNode, skippable: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """`(cell number, source)` of the code cells the grader runs: all but empty and check-only cells, and
    but the cells `skippable` names (by id, tagged in the lab's notebook) that the learner left unchanged,
    unless a cell that runs reads a name one of them defines."""
    sources = [cell.source if cell.cell_type == "code" else "" for cell in notebook.cells]
    skip = {index for index, cell in enumerate(notebook.cells)
            if skippable and cell.cell_type == "code" and skippable.get(cell.get("id", "")) == cell.source}
    skip = resolve_skips(sources, skip) if skip else skip
    return [(index, source) for index, source in enumerate(sources)
            if source.strip() and index not in skip and not is_check_cell(source)]


def learner_id(path: Path, notebook: nbformat.NotebookNode | None, lab_stem: str) -> str:
    """The learner: notebook metadata `labkit.learner`, else the folder of a file named like the lab, else
    the file name."""
    if notebook is not None:
        meta = notebook.metadata.get("labkit", {})
        learner = meta.get("learner") if isinstance(meta, dict) else None
        if isinstance(learner, str) and learner.strip():
            return learner.strip()[:100]
    if path.stem == lab_stem and path.parent.name:
        return path.parent.name
    return path.stem


# ------------------------------------------------------------------ grading outputs

class _RemoteGrader(Grader):
    """`check`'s grader, fed with the outputs the learner's kernel computed on the grader's inputs."""

    def __init__(self, exercise: Exercise, run: ExerciseRun, timeout: float, cache: dict | None = None):
        super().__init__(exercise, None, timeout)
        self.remote, self.cache = run, cache if cache is not None else {}

    def _index(self, case: Case) -> int:
        return next(i for i, c in enumerate(self.exercise.cases) if c is case)

    def expected(self, case: Case):
        # References are deterministic: compute each once per run, not once per submission.
        key = (self.exercise.id, self._index(case))
        if key not in self.cache:
            self.cache[key] = super().expected(case)
        return self.cache[key]

    def call(self, case: Case):
        return self.remote.calls[self._index(case)]

    def grade_case(self, case: Case) -> CaseResult:
        if self.remote.calls[self._index(case)] is None:
            why = ("the kernel died while running this case (os._exit, a fatal error or the memory limit)"
                   if self.remote.crashed else "the kernel returned no result for this case")
            return CaseResult(case.name, "error", [why], "never exit or crash the kernel from your function",
                              case.hidden)
        return super().grade_case(case)


def _not_run(exercise: Exercise, note: str, line: str = "not run") -> Report:
    cases = [CaseResult(c.name, "error", [line], hidden=c.hidden) for c in exercise.cases]
    return Report(exercise.id, exercise.description, exercise.points, cases, note=note)


def exercise_report(exercise: Exercise, name: str | None, run: ExerciseRun | None, timeout: float,
                    cache: dict | None = None) -> Report:
    """The `check`-style report of one exercise from what the kernel sent back (`cache`: expected values)."""
    if name is None:
        return _not_run(exercise, "the lab has no check cell for this exercise; cannot tell which function to run")
    if run is None or run.not_run:
        return _not_run(exercise, run.not_run if run else "not run")
    if run.candidate is None:
        why = "the kernel died before it could be run" if run.crashed else "the kernel did not answer"
        return _not_run(exercise, why)
    if not run.candidate.get("defined"):
        return _not_run(exercise, f"missing function: the notebook does not define `{name}`")
    if run.candidate.get("fallback"):
        return _not_run(exercise, f"`{name}` is labkit's reference, handed out by labkit.use, not your own code")
    problem = candidate_problem(exercise, kernel_side.candidate_stand_in(run.candidate))
    if problem:
        return _not_run(exercise, f"`{name}`: {problem}")
    grader = _RemoteGrader(exercise, run, timeout, cache)
    return Report(exercise.id, exercise.description, exercise.points, grader.grade(exercise.cases))


def feedback_report(report: Report) -> Report:
    """A copy of `report` for the learner: hidden cases keep their verdict and hint, not their name or data."""
    cases, hidden = [], 0
    for case in report.cases:
        if case.hidden:
            hidden += 1
            case = dataclasses.replace(case, name=f"hidden case {hidden}", lines=[])
        cases.append(case)
    note = report.note
    if hidden:
        passed = sum(c.passed for c in report.cases if c.hidden)
        note = (note + " " if note else "") + f"Hidden cases (inputs not shown): {passed}/{hidden} passed."
    return dataclasses.replace(report, cases=cases, note=note)


# ------------------------------------------------------------------ one submission

@dataclasses.dataclass
class Submission:
    """A submission read from disk (read once: the file may change or vanish while the run goes on)."""

    path: Path
    data: bytes
    sha256: str


@dataclasses.dataclass
class Graded:
    """The outcome for one submission: its gradebook row and the reports for its feedback page."""

    submission: Submission
    learner: str
    status: str
    detail: str
    reports: list[Report]

    @property
    def total(self) -> float:
        """Points over all exercises."""
        return round(sum(r.score for r in self.reports), 2)

    def row(self, exercises: list[Exercise]) -> dict[str, str]:
        """The gradebook row."""
        scores = {r.exercise_id: f"{r.score:g}" for r in self.reports}
        row = {"file": str(self.submission.path), "learner": self.learner,
               **{e.id: scores.get(e.id, "0") for e in exercises},
               "total": f"{self.total:g}", "max_total": f"{sum(e.points for e in exercises):g}",
               "status": self.status, "detail": self.detail, "sha256": self.submission.sha256,
               "graded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        return row


@dataclasses.dataclass
class Settings:
    """What every submission of the run is graded with."""

    exercises: list[Exercise]
    names: dict[str, str]  # exercise id -> learner's function name, from the lab's own notebook
    lab_stem: str
    limits: Limits
    expected: dict = dataclasses.field(default_factory=dict)  # (exercise id, case index) -> reference output
    skippable: dict[str, str] | None = None  # the lab's `skip-grading` cells (None: run every cell)
    sandbox: dict = dataclasses.field(default_factory=dict)  # what the last kernel reported in place


def _statuses(execution: Execution, reports: list[Report]) -> tuple[str, list[str]]:
    """The submission's status (the most severe problem) and the detail notes, from cells and cases."""
    found, notes = set(), []
    for index in execution.crashed_cells:
        found.add("crashed")
        notes.append(f"cell {index} ended the kernel; it was skipped in a fresh kernel")
    for index in execution.timed_out_cells:
        found.add("timeout")
        notes.append(f"cell {index} ran out of time" if index >= 0 else "grading code ran out of time")
    if execution.notebook_timed_out:
        found.add("timeout")
        notes.append("the notebook ran out of time")
    memory_cells = [index for index, name in execution.cell_errors if name == "MemoryError"]
    if memory_cells:
        found.add("memory limit")
        notes.append(f"MemoryError in cell {', '.join(map(str, memory_cells))}")
    other = [f"{name} in cell {index}" for index, name in execution.cell_errors if name != "MemoryError"]
    if other:
        notes.append(f"{len(other)} cell(s) raised errors: {', '.join(other[:4])}" + (" ..." if len(other) > 4 else ""))
    for report in reports:
        statuses = {c.status for c in report.cases}
        lines = " ".join(line for c in report.cases for line in c.lines)
        if report.note.startswith("missing function") or "does not define" in report.note:
            found.add("missing function")
            notes.append(f"{report.exercise_id}: {report.note}")
        elif "timeout" in statuses:
            found.add("timeout")
            notes.append(f"{report.exercise_id}: a case ran out of time")
        elif "the kernel died" in lines or "the kernel died" in report.note:
            found.add("crashed")
            notes.append(f"{report.exercise_id}: the kernel died while it ran")
        elif "MemoryError" in lines:
            found.add("memory limit")
            notes.append(f"{report.exercise_id}: MemoryError")
        elif report.note:
            notes.append(f"{report.exercise_id}: {report.note}")
    status = next(s for s in STATUSES if s in found or s == "ok")
    return status, notes


def grade_submission(submission: Submission, settings: Settings) -> Graded:
    """Grade one submission; problems of the submission become its status, never an exception."""
    try:
        notebook = load_notebook(submission.data)
    except InvalidNotebook as err:
        learner = learner_id(submission.path, None, settings.lab_stem)
        reports = [_not_run(e, "invalid notebook") for e in settings.exercises]
        return Graded(submission, learner, "invalid notebook", str(err), reports)
    learner = learner_id(submission.path, notebook, settings.lab_stem)
    names = {**check_calls(notebook), **settings.names}  # the lab's own check cells win over edited ones
    jobs, timeouts = [], {}
    for exercise in settings.exercises:
        timeouts[exercise.id] = settings.limits.case_timeout or exercise.timeout
        if exercise.id in names:
            jobs.append(Job(exercise.id, names[exercise.id], [case.inputs() for case in exercise.cases],
                            timeouts[exercise.id]))
    cells = cells_to_run(notebook, settings.skippable)
    execution = run_submission(cells, jobs, settings.limits) if cells and jobs else Execution()
    settings.sandbox.update(execution.sandbox)
    reports = [exercise_report(e, names.get(e.id), execution.exercises.get(e.id) if cells else
                               ExerciseRun(candidate={"defined": False}), timeouts[e.id], settings.expected)
               for e in settings.exercises]
    status, notes = _statuses(execution, reports)
    return Graded(submission, learner, status, "; ".join(notes), reports)


def _grade_safely(submission: Submission, settings: Settings) -> Graded:
    try:
        return grade_submission(submission, settings)
    except Exception as err:  # noqa: BLE001 - grader trouble costs this submission a re-run, not the run
        reports = [_not_run(e, "not graded: grader error") for e in settings.exercises]
        return Graded(submission, submission.path.stem, GRADER_ERROR, f"{type(err).__name__}: {err}"[:300], reports)


# ------------------------------------------------------------------ feedback pages

def feedback_html(graded: Graded) -> str:
    """The learner's feedback page: status, total and the case-by-case report of every exercise."""
    maximum = sum(r.max_score for r in graded.reports)
    parts = [f"<h1>Feedback for {html.escape(graded.learner)}</h1>",
             f"<p>Submission <code>{html.escape(graded.submission.path.name)}</code>: "
             f"<b>{graded.total:g}/{maximum:g} points</b>, status <b>{html.escape(graded.status)}</b></p>"]
    if graded.detail:
        parts.append(f"<p>{html.escape(graded.detail)}</p>")
    parts += [feedback_report(r)._repr_html_() for r in graded.reports]
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Feedback</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}td,th{border:1px solid #ccc;"
            "padding:.2em .5em}table{border-collapse:collapse;margin-bottom:1.5em}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def feedback_path(directory: Path, graded: Graded) -> Path:
    """`DIR/<learner>.html`, or `DIR/<learner>-<file>.html` when the learner id is not the file name."""
    stem = graded.learner if graded.learner == graded.submission.path.stem else (
        f"{graded.learner}-{graded.submission.path.stem}")
    return directory / f"{_SAFE_NAME.sub('_', stem)[:120] or 'submission'}.html"


# ------------------------------------------------------------------ the command

def find_submissions(paths: list[str]) -> tuple[list[Path], list[str]]:
    """Notebook files named or found (recursively) in folders, and warnings about paths that do not exist."""
    found, warnings_ = [], []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
        elif path.is_file():
            found.append(path)
        else:
            warnings_.append(f"no such file or folder: {name}")
    unique = list(dict.fromkeys(found))
    return unique, warnings_


def lab_notebook(lab: str, explicit: Path | None, folder: Path = Path("notebooks")) -> Path | None:
    """The lab's own notebook, whose check cells name the functions: `explicit`, else the first
    `NN_*.ipynb` in `folder/student`, then in `folder` (relative to the working directory)."""
    if explicit is not None:
        return explicit
    for place in (folder / "student", folder):
        matches = sorted(place.glob(f"{lab}_*.ipynb")) if place.is_dir() else []
        if matches:
            return matches[0]
    return None


def parse_memory(text: str) -> int | None:
    """"4G", "512M", "1.5G", "0"/"none" (no limit) -> bytes."""
    text = text.strip().lower()
    if text in ("0", "none", "off"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 4G, 512M)")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m labkit grade",
        description="Grade submitted notebooks in isolated kernels; write a gradebook and feedback pages. "
                    "Also: --export gradescope (an autograder zip) and --format canvas|csv (an LMS gradebook).")
    parser.add_argument("submissions", nargs="*", metavar="SUBMISSION",
                        help="notebooks, or folders of them (with --format: gradebook CSVs)")
    parser.add_argument("--lab", help="the lab number, e.g. 01")
    parser.add_argument("--out", default="gradebook.csv", type=Path, help="gradebook CSV (default: gradebook.csv)")
    parser.add_argument("--feedback", type=Path, help="folder for one HTML feedback page per submission")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per notebook (default: 300)")
    parser.add_argument("--cell-timeout", type=float, help="seconds per cell (default: min(120, --timeout))")
    parser.add_argument("--case-timeout", type=float, help="seconds per test case (default: the exercise's)")
    parser.add_argument("--memory", type=parse_memory, default=4 << 30, help="memory limit per kernel (default 4G)")
    parser.add_argument("--max-processes", type=int, default=512,
                        help="processes and threads per submission (default: 512)")
    parser.add_argument("--jobs", type=int, default=2, help="submissions graded at the same time (default: 2)")
    parser.add_argument("--notebook", type=Path, help="the lab's notebook whose check cells name the functions "
                                                      "(default: NN_*.ipynb in ./notebooks/student, then "
                                                      "./notebooks; without one, the graded names come from "
                                                      "each submission's own check cells)")
    parser.add_argument("--all-cells", action="store_true",
                        help=f"also run the cells the lab tags {SKIP_GRADING_TAG!r} (plots, benchmarks)")
    parser.add_argument("--force", action="store_true", help="grade again even if a submission is unchanged")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--export", choices=["gradescope"], help="write a Gradescope autograder zip for --lab")
    parser.add_argument("--format", choices=["canvas", "csv"],
                        help="turn gradebook CSVs (one per lab) into one LMS gradebook: a column per lab")
    parser.add_argument("--roster", type=Path, help="with --format canvas: a gradebook exported from Canvas, "
                                                    "for the learners' names, ids and sections")
    parser.add_argument("-o", "--output", type=Path, help="the file --export / --format writes")
    return parser


def sandbox_lines(sandbox: dict) -> list[str]:
    """One line per isolation mechanism the kernels did not have, with where to read how to get it."""
    if not sandbox:
        return []
    see = " (see the instructor guide, 'What the isolation covers')"
    lines = []
    if not sandbox.get("namespaces"):
        tcp = "TCP connections were refused (Landlock), other traffic was not" if sandbox.get("tcp") else (
            "learner code could reach the network")
        lines.append(f"sandbox: no network or PID namespace on this system: {tcp}{see}")
    if not sandbox.get("writes"):
        lines.append(f"sandbox: writes were not confined (no Landlock on this system){see}")
    if not sandbox.get("reads"):
        lines.append(f"sandbox: reads were not confined: learner code could read other submissions{see}")
    if not sandbox.get("processes"):
        lines.append(f"sandbox: processes were not limited (no pids cgroup; RLIMIT_NPROC does not bind root){see}")
    return lines


def _summary(done: list[Graded], skipped: int, exercises: list[Exercise], seconds: float) -> str:
    counts = {s: sum(g.status == s for g in done) for s in (*STATUSES, GRADER_ERROR)}
    problems = ", ".join(f"{n} {s}" for s, n in counts.items() if n and s != "ok")
    lines = [f"graded {len(done)} submission(s) in {seconds:.0f} s ({skipped} unchanged, skipped): "
             f"{counts['ok']} ok, {len(done) - counts['ok']} with problems" + (f" ({problems})" if problems else "")]
    if done:
        lines.append("mean score per exercise:")
        for exercise in exercises:
            scores = [r.score for g in done for r in g.reports if r.exercise_id == exercise.id]
            lines.append(f"  {exercise.id:<32} {sum(scores) / len(scores):5.2f} / {exercise.points}")
        total = sum(g.total for g in done) / len(done)
        lines.append(f"  {'total':<32} {total:5.2f} / {sum(e.points for e in exercises)}")
    return "\n".join(lines)


def lab_id(lab: str) -> str:
    """"01" / "1" / "lab01" -> "lab01"."""
    return f"lab{int(lab):02d}" if lab.isdigit() else lab


def make_settings(lab: str, notebook_path: Path | None, limits: Limits, *, all_cells: bool = False) -> Settings:
    """The run's settings: the lab's exercises, the names and skippable cells from its notebook.

    Raises ValueError (no exercises for `lab`) or InvalidNotebook / OSError (unreadable lab notebook)."""
    exercises = [e for e in registry().values() if e.lab == lab]
    if not exercises:
        raise ValueError(f"no exercises registered for {lab}")
    names, skippable = {}, None
    if notebook_path is not None:
        notebook = load_notebook(notebook_path.read_bytes())
        names = check_calls(notebook)
        skippable = None if all_cells else skippable_cells(notebook)
    return Settings(exercises, names, notebook_path.stem if notebook_path else "", limits, skippable=skippable)


def _read_todo(paths: list[Path], gradebook: Gradebook, force: bool) -> tuple[list[Submission], int]:
    todo, skipped = [], 0
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as err:
            print(f"grade: cannot read {path}: {err}", file=sys.stderr)
            continue
        submission = Submission(path, data, content_hash(data))
        if not force and gradebook.is_current(path, submission.sha256):
            skipped += 1
        else:
            todo.append(submission)
    return todo, skipped


def _grade_all(todo: list[Submission], settings: Settings, gradebook: Gradebook, args) -> list[Graded]:
    from tqdm import tqdm

    done: list[Graded] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool, \
            tqdm(total=len(todo), desc=f"grading {settings.exercises[0].lab}", unit="nb", disable=args.quiet,
                 file=sys.stderr) as bar:
        futures = [pool.submit(_grade_safely, s, settings) for s in todo]
        for future in concurrent.futures.as_completed(futures):
            graded = future.result()
            done.append(graded)
            gradebook.set(graded.submission.path, graded.row(settings.exercises))
            gradebook.save()
            if args.feedback:
                atomic_write_text(feedback_path(args.feedback, graded), feedback_html(graded))
            bar.set_postfix_str(f"{graded.learner}: {graded.status}", refresh=False)
            bar.update()
    return done


def _other_modes(args) -> int | None:
    """`--export gradescope` and `--format canvas|csv`: their exit code, or None for plain grading."""
    if args.export == "gradescope":
        from labkit.grading import gradescope

        return gradescope.main_export(args)
    if args.format:
        from labkit.grading import lms

        return lms.main_export(args)
    return None


def main(argv: list[str] | None = None) -> int:
    """Grade; exit 0 when every submission got a row, 1 if the grader itself failed on some, 2 on bad usage."""
    args = _parser().parse_args(argv)
    other = _other_modes(args)
    if other is not None:
        return other
    if not args.lab or not args.submissions:
        print("grade: give SUBMISSION... and --lab", file=sys.stderr)
        return 2
    lab = lab_id(args.lab)
    notebook_path = lab_notebook(lab[3:] if lab.startswith("lab") else lab, args.notebook)
    limits = Limits(notebook_timeout=args.timeout, cell_timeout=args.cell_timeout or min(120.0, args.timeout),
                    case_timeout=args.case_timeout, memory_bytes=args.memory, max_processes=args.max_processes)
    try:
        settings = make_settings(lab, notebook_path, limits, all_cells=args.all_cells)
    except (ValueError, OSError) as err:
        print(f"grade: {err} ({notebook_path})" if notebook_path else f"grade: {err}", file=sys.stderr)
        return 2
    paths, problems = find_submissions(args.submissions)
    for problem in problems:
        print(f"grade: {problem}", file=sys.stderr)
    gradebook = Gradebook(args.out, [e.id for e in settings.exercises])
    todo, skipped = _read_todo(paths, gradebook, args.force)
    started = time.monotonic()
    done = _grade_all(todo, settings, gradebook, args)
    if not todo:
        gradebook.save()
    print(_summary(done, skipped, settings.exercises, time.monotonic() - started))
    for line in sandbox_lines(settings.sandbox):
        print(line)
    print(f"gradebook: {args.out}" + (f"; feedback: {args.feedback}/" if args.feedback else ""))
    return 1 if any(g.status == GRADER_ERROR for g in done) else 0
