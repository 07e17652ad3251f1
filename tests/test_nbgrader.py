"""`python -m labkit release --nbgrader COURSE_DIR`: nbgrader source notebooks, checked by nbgrader itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat import v4
from nbgrader.nbgraderformat import MetadataValidator

from labkit.grading import registry
from labkit.release import ReleaseError, main, master_paths, nbgrader_notebook, nbgrader_release, student_notebook

REPO = Path(__file__).resolve().parents[1]
POINTS = {exercise_id: exercise.points for exercise_id, exercise in registry().items()}

SOLUTION = '''\
def causal_mask(n):
    """Lower-triangular boolean mask."""
    ### BEGIN SOLUTION
    i = jnp.arange(n)
    return i[:, None] >= i[None, :]
    ### END SOLUTION
'''


def small_master() -> nbformat.NotebookNode:
    """Markdown, a set-up cell, a solution cell, its check cell and an instructor-only cell."""
    cells = [v4.new_markdown_cell("# Lab 1"), v4.new_code_cell("import labkit\nimport jax.numpy as jnp"),
             v4.new_code_cell(SOLUTION, metadata={"tags": ["hide-input"]}),
             v4.new_code_cell('# NBVAL_CHECK_OUTPUT\nlabkit.check("lab01.causal_mask", causal_mask)',
                              outputs=[v4.new_output("stream", text="ok\n")], execution_count=4),
             v4.new_code_cell("print('answers')", metadata={"tags": ["remove-student"]})]
    nb = v4.new_notebook(cells=cells)
    for index, cell in enumerate(nb.cells):
        cell.id = f"c-{index}"
    return nb


def test_cells_get_nbgrader_metadata_that_nbgrader_accepts():
    nb = nbgrader_notebook(small_master(), name="01_masks.ipynb", points=POINTS)
    MetadataValidator().validate_nb(nb)
    assert [c.id for c in nb.cells] == ["c-0", "c-1", "c-2", "c-3"], "remove-student cells are dropped"
    solution, test = nb.cells[2], nb.cells[3]
    assert solution.source == SOLUTION, "solutions stay: nbgrader strips the same markers itself"
    assert solution.metadata.nbgrader == {"grade": False, "grade_id": "lab01-causal_mask-solution", "locked": False,
                                          "schema_version": 3, "solution": True, "task": False}
    assert test.metadata.nbgrader == {"grade": True, "grade_id": "lab01-causal_mask", "locked": True,
                                      "points": POINTS["lab01.causal_mask"], "schema_version": 3,
                                      "solution": False, "task": False}
    assert "_report.score" in test.source.splitlines()[-1] and "NBVAL" not in test.source
    assert test.outputs == [] and "nbgrader" not in nb.cells[1].metadata


def test_unknown_exercise_in_a_check_cell_is_an_error():
    nb = small_master()
    nb.cells[3].source = 'labkit.check("lab01.nonexistent", causal_mask)'
    with pytest.raises(ReleaseError, match="unknown exercise 'lab01.nonexistent'"):
        nbgrader_notebook(nb, name="01_masks.ipynb", points=POINTS)


def test_release_option_writes_and_checks_the_course_tree(tmp_path, capsys):
    masters = tmp_path / "nb"
    masters.mkdir()
    nbformat.write(small_master(), masters / "01_masks.ipynb")
    args = ["--masters", str(masters), "--out", str(tmp_path / "student"), "--nbgrader", str(tmp_path / "course")]
    assert main(["--check", *args]) == 1
    assert main(args) == 0
    assert (tmp_path / "course" / "source" / "lab01" / "01_masks.ipynb").is_file()
    assert main(["--check", *args]) == 0
    capsys.readouterr()


def test_every_lab_imports_into_nbgrader(tmp_path):
    """nbgrader's own generate_assignment accepts the labs and strips them to our student notebooks."""
    course = tmp_path / "course"
    written = nbgrader_release(REPO / "notebooks", course)
    assert written
    for path in written:
        MetadataValidator().validate_nb(nbformat.read(path, as_version=4))
    (course / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.root = {str(course)!r}\n"
        f"c.CourseDirectory.db_url = 'sqlite:///{course / 'gradebook.db'}'\n")
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    result = subprocess.run([str(Path(sys.executable).parent / "nbgrader"), "generate_assignment", "lab01",
                             "--create", "--force"], cwd=course, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    master = next(p for p in master_paths(REPO / "notebooks") if p.name.startswith("01_"))
    released = nbformat.read(course / "release" / "lab01" / master.name, as_version=4)
    student = student_notebook(nbformat.read(master, as_version=4), name=str(master))
    by_id = {cell.id: cell for cell in released.cells}
    for cell in student.cells:
        if "labkit.check(" not in cell.source:
            assert by_id[cell.id].source == cell.source, cell.id
