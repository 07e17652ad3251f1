"""`python -m labkit grade`: isolation, scores computed outside the learner's kernel, bad input, resuming.

The fixture submissions are generated at test time from the lab 01 master (tests/fixtures/make_submissions.py),
so they follow the lab. One in-process run grades all of them (two kernels at a time); the other tests need
no kernel, or a small one that does not import Trax.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import numpy as np
from nbformat import v4
import pytest

import labkit
from labkit.grading import batch, registry
from labkit.grading.exercise import Exercise
from labkit.grading.gradebook import Gradebook, atomic_write_text
from labkit.grading.sandbox import kernel_side
from labkit.grading.sandbox.runner import TOKEN_VARIABLE, ExerciseRun, Job, Limits, run_submission
from labkit.grading.sandbox.kernel import landlock_abi
from labkit.grading.sandbox import processes
from labkit.notebook import SKIP_GRADING_TAG, cell_names, is_check_cell
from labkit.release import check_skip_tags, student_notebook

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
LAB01 = [e for e in registry().values() if e.lab == "lab01"]
MAX_TOTAL = sum(e.points for e in LAB01)


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_submissions", FIXTURES / "make_submissions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_submissions = _load_generator()


def read_gradebook(path: Path) -> dict[str, dict[str, str]]:
    """Gradebook rows by file name."""
    with open(path, newline="", encoding="utf-8") as stream:
        return {Path(row["file"]).name: row for row in csv.DictReader(stream)}


def grading_processes() -> list[int]:
    """Live processes started for any submission (their environment carries a grading token) since this
    module was imported: on a shared machine, other runs' kernels are not this test's leftovers."""
    return [pid for pid in _all_grading_processes() if pid not in _BEFORE]


def _all_grading_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(v.startswith(TOKEN_VARIABLE.encode()) for v in (entry / "environ").read_bytes().split(b"\0")):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


_BEFORE = set(_all_grading_processes())


# ------------------------------------------------------------------ reading submissions (no kernel)

def test_bad_files_are_classified_without_a_kernel():
    fixtures = make_submissions.submissions()
    for name in ("not_json.ipynb", "not_a_notebook.ipynb", "invalid_nbformat.ipynb"):
        with pytest.raises(batch.InvalidNotebook):
            batch.load_notebook(fixtures[name])
    assert batch.cells_to_run(batch.load_notebook(fixtures["empty.ipynb"])) == []


def test_functions_are_found_from_the_check_cells_and_check_cells_are_not_run():
    student = make_submissions.student()
    assert batch.check_calls(student) == {
        "lab01.attention": "attention", "lab01.causal_mask": "causal_mask",
        "lab01.self_attention_layer": "MySelfAttention", "lab01.local_attention": "local_attention",
        "lab01.score_memory": "score_matrix_bytes"}
    run = [source for _, source in batch.cells_to_run(student)]
    assert run and not any("labkit.check(" in source for source in run)
    assert batch.is_check_cell('# NBVAL_CHECK_OUTPUT\nlabkit.check("lab01.attention", attention)')
    assert not batch.is_check_cell('labkit.check("lab01.attention", attention)\nx = 1')


def test_learner_id_from_metadata_folder_or_file_name():
    nb = nbformat.v4.new_notebook()
    assert batch.learner_id(Path("subs/bob.ipynb"), nb, "01_dot") == "bob"
    assert batch.learner_id(Path("subs/carol/01_dot.ipynb"), nb, "01_dot") == "carol"
    nb.metadata["labkit"] = {"learner": "ada"}
    assert batch.learner_id(Path("subs/bob.ipynb"), nb, "01_dot") == "ada"


def test_memory_sizes():
    assert batch.parse_memory("4G") == 4 << 30 and batch.parse_memory("512M") == 512 << 20
    assert batch.parse_memory("none") is None


# ------------------------------------------------------------------ the exchange with the kernel, in-process

def _serve_here(tmp_path: Path, exercise: Exercise, candidate, name: str = "candidate") -> ExerciseRun:
    """What `run_submission` does around the kernel, with `kernel_side.serve` run in this process."""
    from labkit.grading.sandbox.runner import _collect, _prepare_jobs

    scratch = tmp_path / "scratch"
    scratch.mkdir(parents=True)
    job = Job(exercise.id, name, [c.inputs() for c in exercise.cases], exercise.timeout)
    (_, job_file, results), = _prepare_jobs(scratch, [job])
    kernel_side.serve(str(job_file), {name: candidate})
    return _collect(results, job)


@pytest.mark.parametrize("which", ["reference", "mistake", "stub", "wrong type"])
def test_remote_reports_equal_the_ones_check_gives(tmp_path, which):
    exercise = registry()["lab01.attention"]
    candidate = {"reference": exercise.reference, "mistake": exercise.mistakes[0].candidate,
                 "stub": exercise.stub, "wrong type": lambda q, k, v, mask=None: "not an array"}[which]
    run = _serve_here(tmp_path, exercise, candidate)
    remote = batch.exercise_report(exercise, "candidate", run, exercise.timeout)
    local = labkit.check(exercise.id, candidate, include_hidden=True)
    assert remote.text() == local.text()


def test_in_place_changes_and_errors_inside_layers_come_back(tmp_path):
    def scribbles(q, k, v, mask=None):
        q[...] = 0
        return q

    attention = registry()["lab01.attention"]
    report = batch.exercise_report(attention, "f", _serve_here(tmp_path, attention, scribbles), 60)
    assert "changed input argument #1 in place" in report.text()

    from labkit.grading.check import _error_result
    from labkit.grading.safe_call import CallResult

    record = {"type": "ValueError", "builtin": True, "message": "shapes differ", "layer": True}
    text = _error_result("case", CallResult(error=kernel_side._rebuild_error(record)), attention).lines[0]
    assert text == "raised ValueError: shapes differ (inside the Trax layer)"


def test_kernel_answers_are_never_unpickled(tmp_path):
    """A malicious kernel can only make its own answer unreadable, not run code in the grader."""
    import pickle

    (tmp_path / "case0.json").write_text(json.dumps({"value": {"kind": "array", "file": 0}}))
    np.save(tmp_path / "case0_0.npy", np.array([object()], dtype=object), allow_pickle=True)
    result, _ = kernel_side.read_case(tmp_path, 0)
    assert isinstance(result.error, kernel_side.RemoteError)
    (tmp_path / "case1.json").write_bytes(pickle.dumps(os.system))
    result, _ = kernel_side.read_case(tmp_path, 1)
    assert "could not be read" in str(result.error)


def test_hidden_cases_are_summarised_in_feedback():
    exercise = registry()["lab01.causal_mask"]
    secret = dataclasses.replace(exercise.cases[0], name="n = 47, the secret case", hidden=True)
    report = labkit.check(exercise.id, exercise.mistakes[0].candidate, include_hidden=False)
    report.cases.append(labkit.grading.CaseResult(secret.name, "fail", ["expected row 3: [1 1 0]"], "a hint", True))
    shown = batch.feedback_report(report)._repr_html_()
    assert "secret" not in shown and "expected row 3" not in shown
    assert "hidden case 1" in shown and "Hidden cases (inputs not shown): 0/1 passed." in shown


# ------------------------------------------------------------------ gradebook

def test_gradebook_is_replaced_atomically_and_keeps_other_rows(tmp_path, monkeypatch):
    path = tmp_path / "gradebook.csv"
    book = Gradebook(path, ["lab01.a"])
    book.set("x.ipynb", {"file": "x.ipynb", "learner": "x", "lab01.a": "1", "sha256": "abc", "status": "ok"})
    book.save()
    before = path.read_text()

    def broken_replace(src, dst):
        raise KeyboardInterrupt  # interrupted between writing the temporary file and renaming it

    monkeypatch.setattr(os, "replace", broken_replace)
    book.set("y.ipynb", {"file": "y.ipynb", "learner": "y", "lab01.a": "0", "sha256": "def", "status": "ok"})
    with pytest.raises(KeyboardInterrupt):
        book.save()
    monkeypatch.undo()
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["gradebook.csv"]

    again = Gradebook(path, ["lab01.a"])
    assert again.is_current("x.ipynb", "abc") and not again.is_current("x.ipynb", "changed")
    assert not Gradebook(path, ["lab01.a", "lab01.b"]).is_current("x.ipynb", "abc"), "new exercise: regrade"
    atomic_write_text(tmp_path / "f.html", "<p>hi</p>")
    assert (tmp_path / "f.html").read_text() == "<p>hi</p>"


# ------------------------------------------------------------------ a small kernel (no Trax): time-outs and crashes

def test_cells_that_hang_or_kill_the_kernel_cost_only_themselves():
    score = registry()["lab01.score_memory"]
    cells = [
        (0, "import os, time\nimport numpy as np"),
        (1, "def score_matrix_bytes(batch, heads, seq_len, bytes_per_value=4):\n"
            "    return batch * heads * seq_len * seq_len * bytes_per_value"),
        (2, "time.sleep(600)"),
        (3, "os._exit(1)"),
        (4, "def causal_mask(n):\n    return np.tril(np.ones((n, n), bool))"),
    ]
    jobs = [Job(score.id, "score_matrix_bytes", [c.inputs() for c in score.cases], 10),
            Job("lab01.causal_mask", "causal_mask", [c.inputs() for c in registry()["lab01.causal_mask"].cases], 10)]
    execution = run_submission(cells, jobs, Limits(cell_timeout=6, notebook_timeout=400))
    assert execution.timed_out_cells == [2] and execution.crashed_cells == [3]
    assert execution.kernels_started == 2
    for exercise_id, name in (("lab01.score_memory", "f"), ("lab01.causal_mask", "g")):
        exercise = registry()[exercise_id]
        assert batch.exercise_report(exercise, name, execution.exercises[exercise_id], 10).passed
    assert grading_processes() == []



def test_a_cell_that_exhausts_memory_is_skipped_in_a_fresh_kernel():
    score = registry()["lab01.score_memory"]
    cells = [
        (0, "import numpy as np"),
        (1, "hog = [np.ones(2**28, np.uint8) for _ in range(64)]  # 16 GiB, far over the limit"),
        (2, "def score_matrix_bytes(batch, heads, seq_len, bytes_per_value=4):\n"
            "    return batch * heads * seq_len * seq_len * bytes_per_value"),
    ]
    jobs = [Job(score.id, "score_matrix_bytes", [c.inputs() for c in score.cases], 10)]
    execution = run_submission(cells, jobs, Limits(cell_timeout=60, notebook_timeout=300, memory_bytes=3 << 30))
    assert execution.cell_errors == [(1, "MemoryError")] and execution.crashed_cells == []
    assert execution.kernels_started == 2
    assert batch.exercise_report(score, "score_matrix_bytes", execution.exercises[score.id], 10).passed
    assert grading_processes() == []


def test_the_notebook_time_limit_stops_everything():
    score = registry()["lab01.score_memory"]
    cells = [(0, "import time"), (1, "time.sleep(4)"), (2, "time.sleep(4)"), (3, "time.sleep(4)")]
    jobs = [Job(score.id, "score_matrix_bytes", [c.inputs() for c in score.cases], 10)]
    execution = run_submission(cells, jobs, Limits(cell_timeout=30, notebook_timeout=7))
    assert execution.notebook_timed_out and execution.kernels_started == 1
    assert execution.seconds < 30
    assert execution.exercises[score.id].not_run == "the notebook ran out of time"
    assert grading_processes() == []

# ------------------------------------------------------------------ the full run on every fixture

# Thirteen notebooks, ten of which import Trax in a fresh kernel: ~5 minutes on an idle 2-core machine,
# far longer when the machine is shared, hence a longer limit than the suite's default.
def FULL_RUN(test):
    """A test of the full run: a long time limit, and left out of `make test-fast`."""
    return pytest.mark.slow(pytest.mark.timeout(3600)(test))


def process_limit_available() -> bool:
    """Whether this machine can cap a submission's processes (a pids cgroup, or a non-root grader)."""
    group = processes.create_pids_cgroup(f"labkit-test-{os.getpid()}", 64)
    processes.remove_pids_cgroup(group)
    return group is not None or os.geteuid() != 0


class Listener:
    """A TCP server on 127.0.0.1 that records every connection (the socket fixture aims at it)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                try:
                    self.received.append(connection.recv(1000) or b"(connected)")
                except OSError:
                    self.received.append(b"(connected)")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade every fixture submission once (jobs 2); the fork bomb only where processes can be capped."""
    root = tmp_path_factory.mktemp("grading")
    target = root / "out"  # the gradebook's folder, which hostile notebooks attack
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    listener = Listener()
    paths = make_submissions.write(root / "submissions", str(target), listener.port)
    if not process_limit_available():
        paths = [p for p in paths if p.name != "fork_bomb.ipynb"]
    argv = [*map(str, paths), "--lab", "01", "--out", str(target / "gradebook.csv"),
            "--feedback", str(root / "feedback"), "--jobs", "2", "--cell-timeout", "300", "--timeout", "900",
            "--quiet"]  # generous limits: a shared machine can take minutes to import Trax
    sandbox: dict = {}
    real_grade = batch.grade_submission

    def grade_and_record(submission, settings):
        result = real_grade(submission, settings)
        sandbox.update(settings.sandbox)
        return result

    batch.grade_submission = grade_and_record
    try:
        code = batch.main(argv)
    finally:
        batch.grade_submission = real_grade
    listener.server.close()
    return {"root": root, "target": target, "paths": paths, "argv": argv, "code": code, "sandbox": sandbox,
            "rows": read_gradebook(target / "gradebook.csv"), "received": listener.received}


@FULL_RUN
def test_every_submission_gets_its_status_and_zero_only_where_affected(graded):
    assert graded["code"] == 0
    rows = graded["rows"]
    assert sorted(rows) == sorted(p.name for p in graded["paths"])
    for name, (status, zeros) in make_submissions.EXPECTED.items():
        if name not in rows:
            continue  # the fork bomb, on a machine that cannot cap processes
        if name == "reads_sibling.ipynb" and not graded["sandbox"].get("reads"):
            zeros = []  # reads are not confined here: it copies ada's answers (the summary says so)
        row = rows[name]
        assert row["status"] == status, (name, row["detail"])
        for exercise in LAB01:
            points = float(row[exercise.id])
            if zeros is None or exercise.id in zeros:
                assert points == 0, (name, exercise.id, row["detail"])
            else:
                assert points == exercise.points, (name, exercise.id, row["detail"])
    assert float(rows["ada.ipynb"]["total"]) == MAX_TOTAL and rows["ada.ipynb"]["learner"] == "ada"
    assert rows["cheater.ipynb"]["total"] == "0"


@FULL_RUN
def test_hostile_notebooks_cannot_touch_files_outside_scratch_or_leave_processes(graded):
    target = graded["target"]
    assert grading_processes() == [], "forked children must be killed"
    assert (target / "keep.txt").read_text() == "precious"
    if landlock_abi() > 0:
        assert not (target / "written-by-a-submission.txt").exists()
        # The row writes_outside tries to forge (a bare "999" can occur inside a sha256 column by chance).
        assert "writes_outside,999" not in (target / "gradebook.csv").read_text()


def _lingering(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@FULL_RUN
def test_no_network_no_sight_of_other_submissions_no_process_left(graded):
    sandbox = graded["sandbox"]
    if sandbox.get("namespaces") or sandbox.get("tcp"):
        assert graded["received"] == [], "the socket notebook reached the test's server"
    if sandbox.get("reads"):
        assert float(graded["rows"]["reads_sibling.ipynb"]["total"]) == 0, "it copied ada's answers"
    assert _lingering("labkit-background-child") == [], "the background child outlived its submission"
    assert grading_processes() == []
    if "fork_bomb.ipynb" in graded["rows"]:  # contained: it scores what it earned, and nobody else lost a point
        assert float(graded["rows"]["fork_bomb.ipynb"]["total"]) == MAX_TOTAL
        assert float(graded["rows"]["ada.ipynb"]["total"]) == MAX_TOTAL


@FULL_RUN
def test_feedback_pages_show_reports_but_not_hidden_inputs(graded):
    feedback = graded["root"] / "feedback"
    ada = (feedback / "ada.html").read_text()
    for exercise in LAB01:
        hidden = [case for case in exercise.cases if case.hidden]
        assert hidden, f"{exercise.id} has no hidden case: the run would not show that they are graded"
        assert f"{exercise.id}: all {len(exercise.cases)} cases passed" in ada
        assert f"Hidden cases (inputs not shown): {len(hidden)}/{len(hidden)} passed." in ada
        assert all(html.escape(case.name) not in ada for case in hidden)
    cheater = (feedback / "cheater.html").read_text()
    assert "All tests passed" not in cheater.split("<table>")[0]
    attention = registry()["lab01.attention"]
    assert f"lab01.attention: 0/{len(attention.cases)} cases passed" in cheater


@FULL_RUN
def test_rerun_skips_unchanged_submissions_and_regrades_changed_ones(graded, capsys):
    argv = graded["argv"]
    assert batch.main(argv) == 0
    assert "graded 0 submission(s)" in capsys.readouterr().out
    assert read_gradebook(graded["target"] / "gradebook.csv") == graded["rows"]
    changed = next(p for p in graded["paths"] if p.name == "not_json.ipynb")
    changed.write_bytes(b"still not JSON\n")
    assert batch.main(argv) == 0
    out = capsys.readouterr().out
    assert "graded 1 submission(s)" in out and f"{len(graded['paths']) - 1} unchanged" in out
    rows = read_gradebook(graded["target"] / "gradebook.csv")
    assert rows["not_json.ipynb"]["sha256"] != graded["rows"]["not_json.ipynb"]["sha256"]
    assert {k: v for k, v in rows.items() if k != "not_json.ipynb"} == {
        k: v for k, v in graded["rows"].items() if k != "not_json.ipynb"}


# ------------------------------------------------------------------ the command line and the shipped fixtures

def test_python_m_labkit_grade(tmp_path):
    subs = make_submissions.submissions()
    for name in ("not_json.ipynb", "empty.ipynb"):
        (tmp_path / name).write_bytes(subs[name])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    lab = REPO / "notebooks" / "student" / "01_dot_product_attention.ipynb"  # names the graded functions
    result = subprocess.run([sys.executable, "-m", "labkit", "grade", str(tmp_path), "--lab", "01", "--out",
                             str(tmp_path / "book.csv"), "--notebook", str(lab), "--quiet"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "graded 2 submission(s)" in result.stdout
    rows = read_gradebook(tmp_path / "book.csv")
    assert rows["not_json.ipynb"]["status"] == "invalid notebook"
    assert rows["empty.ipynb"]["status"] == "missing function"


def test_shipped_fixture_submissions_are_up_to_date():
    shipped = FIXTURES / "submissions"
    expected = make_submissions.submissions()
    assert sorted(p.name for p in shipped.glob("*.ipynb")) == sorted(expected)
    for name, data in expected.items():
        assert (shipped / name).read_bytes() == data, f"run: python {FIXTURES / 'make_submissions.py'}"


# ------------------------------------------------------------------ cells grading skips (no kernel)

MASTERS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("master", MASTERS, ids=lambda p: p.name[:2])
def test_skipped_cells_define_nothing_that_graded_or_checked_cells_read(master):
    """Run without the skip-grading cells, every name a check cell, solution or labkit.use cell reads is
    still defined, by the same cell as with them (static analysis over the cells, in order)."""
    notebook = nbformat.read(master, as_version=4)
    check_skip_tags(notebook, name=master.name)  # the release's own check: raises on a conflict
    solved = student_notebook(notebook, name=master.name)
    kept_cells = [c for c in notebook.cells if "remove-student" not in c.metadata.get("tags", [])]
    for cell, original in zip(solved.cells, kept_cells):
        cell.source = original.source
    skippable = batch.skippable_cells(solved)
    if int(master.name[:2]) <= 7:  # the labs whose plots and benchmarks are tagged (issue 22)
        assert skippable, f"{master.name}: no cell is tagged {SKIP_GRADING_TAG!r}"
    kept = dict(batch.cells_to_run(solved, skippable))
    assert set(kept) <= set(dict(batch.cells_to_run(solved)))
    defined_by_kept: dict[str, int] = {}
    defined_by_all: dict[str, int] = {}
    for index, cell in enumerate(solved.cells):
        if cell.cell_type != "code":
            continue
        bound, free = cell_names(cell.source)
        needs = index in kept or is_check_cell(cell.source)
        for name in free if needs else ():
            if name in defined_by_all:
                assert defined_by_kept.get(name) == defined_by_all[name], (master.name, index, name)
        defined_by_all.update(dict.fromkeys(bound, index))
        if index in kept:
            defined_by_kept.update(dict.fromkeys(bound, index))
    for exercise_id, name in batch.check_calls(solved).items():
        assert name in defined_by_kept, (master.name, exercise_id, name)


def test_a_skippable_cell_runs_when_a_learner_cell_needs_it_or_the_learner_changed_it():
    cells = [v4.new_code_cell("import numpy as np"), v4.new_code_cell("table = np.ones(3)\nprint(table)"),
             v4.new_code_cell("plot = 1"), v4.new_code_cell("def f(x):\n    return x + table")]
    for index, cell in enumerate(cells):
        cell.id = f"c{index}"
    notebook = v4.new_notebook(cells=cells)
    skippable = {"c1": cells[1].source, "c2": cells[2].source}
    assert [i for i, _ in batch.cells_to_run(notebook, skippable)] == [0, 1, 3], "f reads table at call time"
    cells[3].source = "def f(x):\n    return x"
    assert [i for i, _ in batch.cells_to_run(notebook, skippable)] == [0, 3]
    cells[2].source = "plot = 2  # the learner's own change"
    assert [i for i, _ in batch.cells_to_run(notebook, skippable)] == [0, 2, 3]
    assert [i for i, _ in batch.cells_to_run(notebook)] == [0, 1, 2, 3]


def test_missing_isolation_is_said_once_in_the_summary():
    full = {"namespaces": "net+pid", "writes": True, "reads": True, "processes": "cgroup", "tcp": False}
    assert batch.sandbox_lines(full) == [] and batch.sandbox_lines({}) == []
    lines = batch.sandbox_lines({"namespaces": "", "writes": True, "reads": False, "processes": "", "tcp": True})
    assert len(lines) == 3 and all("instructor guide" in line for line in lines)
    assert "TCP connections were refused" in lines[0] and "other submissions" in lines[1]
