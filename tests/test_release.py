"""`labkit.release`: master -> student notebooks, and `python -m labkit release --check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

from labkit.release import ReleaseError, main, release, strip_solutions, student_notebook

REPO = Path(__file__).resolve().parents[1]

FUNCTION_CELL = """\
def causal_mask(n):
    \"\"\"Lower-triangular boolean mask.\"\"\"
    ### BEGIN SOLUTION
    i = jnp.arange(n)
    return i[:, None] >= i[None, :]
    ### END SOLUTION
"""

TWO_REGIONS_CELL = """\
import jax.numpy as jnp

### BEGIN SOLUTION
scale = 0.5
### END SOLUTION
x = jnp.ones(3)
for row in range(2):
        ### BEGIN SOLUTION
        x = x * scale
        ### END SOLUTION
print(x)"""


def code_cell(source: str, *, tags: list[str] | None = None) -> nbformat.NotebookNode:
    """A code cell with an output and an execution count, as a run master has."""
    cell = v4.new_code_cell(source, execution_count=3, outputs=[v4.new_output("stream", text="out\n")])
    cell.metadata["execution"] = {"iopub.execute_input": "2025-01-01T00:00:00Z"}
    if tags:
        cell.metadata["tags"] = tags
    return cell


def master(*cells: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A small master notebook with kernel metadata and cell ids `c-0`, `c-1`, ... (nbformat's are random)."""
    nb = v4.new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["title"] = "Lab 1"
    for index, cell in enumerate(nb.cells):
        cell.id = f"c-{index}"
    return nb


def sample_master() -> nbformat.NotebookNode:
    """A master using every feature the release handles."""
    return master(
        v4.new_markdown_cell("# Lab 1\nBuild a causal mask."),
        code_cell(FUNCTION_CELL),
        code_cell(TWO_REGIONS_CELL, tags=["hide-input"]),
        code_cell("print('instructor only')", tags=["remove-student"]),
        v4.new_raw_cell("raw text"),
        code_cell("labkit.check('lab01.causal_mask', causal_mask)"),
    )


def write_masters(directory: Path, notebooks: dict[str, nbformat.NotebookNode]) -> Path:
    """Write `notebooks` into `directory` (created) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, nb in notebooks.items():
        nbformat.write(nb, directory / name)
    return directory


# strip_solutions


def test_region_in_function_body_keeps_indentation():
    assert strip_solutions(FUNCTION_CELL) == (
        "def causal_mask(n):\n"
        '    """Lower-triangular boolean mask."""\n'
        "    # YOUR CODE HERE\n"
        "    raise NotImplementedError()\n"
    )


def test_two_regions_in_one_cell_each_at_its_own_indentation():
    assert strip_solutions(TWO_REGIONS_CELL) == (
        "import jax.numpy as jnp\n"
        "\n"
        "# YOUR CODE HERE\n"
        "raise NotImplementedError()\n"
        "x = jnp.ones(3)\n"
        "for row in range(2):\n"
        "        # YOUR CODE HERE\n"
        "        raise NotImplementedError()\n"
        "print(x)"
    )


def test_source_without_markers_is_unchanged():
    source = "x = 1\n\n  y = 2  # BEGIN SOLUTION is only a marker with ###\n"
    assert strip_solutions(source) == source


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("### BEGIN SOLUTION\nx = 1\n", r"line 1: '### BEGIN SOLUTION' without '### END SOLUTION'"),
        ("x = 1\n### END SOLUTION\n", r"line 2: '### END SOLUTION' without '### BEGIN SOLUTION'"),
        ("### BEGIN SOLUTION\n  ### BEGIN SOLUTION\n### END SOLUTION\n", r"line 2: nested"),
        ("x = 1  ### BEGIN SOLUTION\n### END SOLUTION\n", r"must start its line"),
    ],
)
def test_malformed_regions_raise(source, expected):
    with pytest.raises(ReleaseError, match=expected):
        strip_solutions(source)


# student_notebook


def test_student_notebook_strips_drops_clears_and_keeps_metadata():
    original = sample_master()
    before = nbformat.writes(original)
    student = student_notebook(original, name="01_masks.ipynb")

    assert nbformat.writes(original) == before, "the master must not be modified"
    assert [c.id for c in student.cells] == ["c-0", "c-1", "c-2", "c-4", "c-5"]
    assert "instructor only" not in nbformat.writes(student)
    assert student.cells[1].source == strip_solutions(FUNCTION_CELL)
    assert student.cells[2].source == strip_solutions(TWO_REGIONS_CELL)
    assert student.cells[2].metadata["tags"] == ["hide-input"]
    assert student.cells[0].source == original.cells[0].source
    assert student.cells[3].source == "raw text"
    assert student.cells[4].source == original.cells[5].source
    for cell in student.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert "execution" not in cell.metadata
    assert student.metadata == original.metadata
    nbformat.validate(student)


def test_release_is_idempotent():
    student = student_notebook(sample_master(), name="01_masks.ipynb")
    again = student_notebook(student, name="student/01_masks.ipynb")
    assert nbformat.writes(again) == nbformat.writes(student)


def test_master_without_cell_ids_gets_stable_ids():
    old = sample_master()
    old.nbformat_minor = 4
    for cell in old.cells:
        del cell["id"]
    first = student_notebook(old, name="01_masks.ipynb")
    second = student_notebook(old, name="/elsewhere/notebooks/01_masks.ipynb")

    assert first.nbformat_minor >= 5
    assert all(cell.id for cell in first.cells)
    assert nbformat.writes(first) == nbformat.writes(second)
    nbformat.validate(first)


@pytest.mark.parametrize(
    ("bad_cell", "expected"),
    [
        (code_cell("### BEGIN SOLUTION\nx = 1\n"), "without '### END SOLUTION'"),
        (code_cell("x = 1\n    ### END SOLUTION\n"), "without '### BEGIN SOLUTION'"),
        (code_cell("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n"), "nested"),
        (v4.new_markdown_cell("### BEGIN SOLUTION\nanswer\n### END SOLUTION"), "markdown cell"),
        (v4.new_raw_cell("### END SOLUTION"), "raw cell"),
    ],
)
def test_errors_name_notebook_and_cell(bad_cell, expected):
    nb = master(v4.new_markdown_cell("intro"), bad_cell)
    with pytest.raises(ReleaseError, match=expected) as raised:
        student_notebook(nb, name="notebooks/03_lsh.ipynb")
    assert "notebooks/03_lsh.ipynb: cell 1 (id c-1)" in str(raised.value)


def test_duplicate_cell_ids_are_an_error_not_silently_renamed():
    nb = master(code_cell("x = 1"), code_cell("y = 2"))
    nb.cells[1].id = nb.cells[0].id = "c-same"  # after new_notebook, whose validation would rename one
    with pytest.raises(ReleaseError, match=r"03_lsh.ipynb: cell id 'c-same' is used by more than one cell"):
        student_notebook(nb, name="03_lsh.ipynb")


# release() and the command line


def test_release_writes_valid_deterministic_student_notebooks(tmp_path):
    masters = write_masters(tmp_path / "nb", {"01_masks.ipynb": sample_master(), "02_local.ipynb": sample_master()})
    nbformat.write(v4.new_notebook(), masters / "scratch.ipynb")  # not NN_slug: not a master
    out = tmp_path / "nb" / "student"

    written = release(masters, out)

    assert written == [str(out / "01_masks.ipynb"), str(out / "02_local.ipynb")]
    assert sorted(p.name for p in out.iterdir()) == ["01_masks.ipynb", "02_local.ipynb"]
    first = (out / "01_masks.ipynb").read_bytes()
    assert first.endswith(b"}\n")
    student = nbformat.read(out / "01_masks.ipynb", as_version=4)
    nbformat.validate(student)
    assert "raise NotImplementedError()" in student.cells[1].source
    assert "jnp.arange" not in first.decode()

    assert release(masters, out) == [], "a second release has nothing to write"
    (out / "01_masks.ipynb").unlink()
    release(masters, out)
    assert (out / "01_masks.ipynb").read_bytes() == first, "same master -> byte-identical student notebook"


def test_check_exit_codes(tmp_path, capsys):
    masters = write_masters(tmp_path / "nb", {"01_masks.ipynb": sample_master(), "02_local.ipynb": sample_master()})
    out = tmp_path / "student"
    args = ["--masters", str(masters), "--out", str(out)]

    assert main(["--check", *args]) == 1
    stdout = capsys.readouterr().out
    assert f"missing: {out / '01_masks.ipynb'}" in stdout and f"missing: {out / '02_local.ipynb'}" in stdout
    assert not out.exists(), "--check writes nothing"

    assert main(args) == 0
    assert f"wrote {out / '01_masks.ipynb'}" in capsys.readouterr().out
    assert main(["--check", *args]) == 0
    assert "up to date" in capsys.readouterr().out

    changed = sample_master()
    changed.cells[0].source = "# Lab 1, revised"
    nbformat.write(changed, masters / "02_local.ipynb")
    assert main(["--check", *args]) == 1
    stdout = capsys.readouterr().out
    assert f"out of date: {out / '02_local.ipynb'}" in stdout
    assert "01_masks" not in stdout

    # A new output or execution count in the master does not change the student notebook.
    rerun = sample_master()
    rerun.cells[1].outputs = [v4.new_output("stream", text="different\n")]
    rerun.cells[1].execution_count = 42
    nbformat.write(rerun, masters / "02_local.ipynb")
    assert main(["--check", *args]) == 0


def test_bad_master_exits_2_naming_it(tmp_path, capsys):
    masters = write_masters(tmp_path / "nb", {"04_bad.ipynb": master(code_cell("### BEGIN SOLUTION\n"))})
    assert main(["--masters", str(masters), "--out", str(tmp_path / "student")]) == 2
    assert "04_bad.ipynb: cell 0" in capsys.readouterr().err
    assert not (tmp_path / "student").exists()


def test_missing_masters_directory_exits_2(tmp_path, capsys):
    assert main(["--masters", str(tmp_path / "nowhere"), "--out", str(tmp_path / "student")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def run_labkit(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m labkit ARGS` from the repository root with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "labkit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_check_via_python_m_labkit(tmp_path):
    masters = write_masters(tmp_path / "nb", {"01_masks.ipynb": sample_master()})
    out = tmp_path / "student"
    args = ["release", "--check", "--masters", str(masters), "--out", str(out)]

    stale = run_labkit(*args)
    assert stale.returncode == 1, stale.stderr
    assert "01_masks.ipynb" in stale.stdout

    release(masters, out)
    fresh = run_labkit(*args)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr


def test_repository_student_notebooks_are_up_to_date():
    result = run_labkit("release", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("args", [[], ["frobnicate"]])
def test_unknown_or_missing_command_prints_usage_and_exits_2(args):
    result = run_labkit(*args)
    assert result.returncode == 2
    for command in ("release", "doctor", "bench", "grade"):
        assert command in result.stderr
