"""The learner's path, for every lab (and any lab added later): DESIGN.md's rules, enforced.

* exercises are numbered "Exercise N.k" in the order the registry lists them, each region at most 15 lines;
* nothing before an exercise answers it (no use of the labkit names it registers in `answered_by`);
* `labkit.use` never rebinds a checked name, so batch grading still grades the learner's own code;
* no hint below an exercise's last level contains a line of its solution; every exercise has 3 levels;
* a plausible wrong answer (zeros of the right shape) fails, names its case and gives one hint;
* nbval's markers are cell tags, not comments the learner reads; every lab opens with a note for the stuck;
* the untouched student notebook runs top to bottom without a single error; its `skip-grading` cells
  (measurements, plots) are the master's own, reach an exercise only through `labkit.use`, and so run as in the
  master, which nbval runs in full: the student run leaves them out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import nbformat
import pytest

import labkit
from labkit.grading import registry
from labkit.notebook import (BEGIN_MARKER, END_MARKER, SKIP_GRADING_TAG, cell_names, check_calls_in, defined_names,
                             parse_code)

ROOT = Path(__file__).resolve().parent.parent
MASTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
LABS = {f"lab{path.name[:2]}": path for path in MASTERS}
EXERCISES = list(registry().values())
MAX_SOLUTION_LINES = 15


def _cells(lab: str, student: bool = False) -> list:
    path = LABS[lab] if not student else ROOT / "notebooks" / "student" / LABS[lab].name
    return nbformat.read(path, as_version=4).cells


def _solution_regions(source: str) -> list[list[str]]:
    regions, current = [], None
    for line in source.splitlines():
        if BEGIN_MARKER in line:
            current = []
        elif END_MARKER in line:
            regions.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return regions


def _check_positions(cells) -> list[tuple[int, str, str]]:
    """`(cell index, exercise id, checked name)` for every check cell, in notebook order."""
    return [(i, ex, name) for i, cell in enumerate(cells) if cell.cell_type == "code"
            for ex, name in check_calls_in(cell.source)]


def _solutions_by_exercise(lab: str) -> dict[str, list[str]]:
    """Each exercise's solution lines: the regions between the previous check cell and its own."""
    cells, found, start = _cells(lab), {}, 0
    for index, exercise_id, _ in _check_positions(cells):
        lines = [line for cell in cells[start:index] if cell.cell_type == "code"
                 for region in _solution_regions(cell.source) for line in region]
        found.setdefault(exercise_id, lines)
        start = index + 1
    return found


@pytest.mark.parametrize("lab", LABS)
def test_solution_regions_are_a_few_lines(lab):
    for index, cell in enumerate(_cells(lab)):
        for region in _solution_regions(cell.source) if cell.cell_type == "code" else []:
            assert len(region) <= MAX_SOLUTION_LINES, f"{lab} cell {index}: a {len(region)}-line solution region"


@pytest.mark.parametrize("lab", LABS)
def test_exercises_are_numbered_in_registry_order(lab):
    cells = _cells(lab)
    checked = [ex for _, ex, _ in _check_positions(cells)]
    listed = [e.id for e in EXERCISES if e.lab == lab]
    assert checked == listed, "the notebook's check cells and labkit.exercises() list the exercises alike"
    number = int(lab[3:])
    text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    numbers = [int(k) for k in re.findall(rf"\*\*Exercise {number}\.(\d+)", text)]
    assert numbers == list(range(1, len(listed) + 1)), f"expected Exercise {number}.1 .. {number}.{len(listed)}"


def _imported_names(tree: ast.AST, aliases: dict[str, str]) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _used_paths(tree: ast.AST, aliases: dict[str, str]) -> set[str]:
    """Full dotted paths of every name and attribute chain in `tree`, through the imports seen so far."""
    paths = set(aliases.values())
    for node in ast.walk(tree):
        dotted = _dotted(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if dotted:
            head, _, rest = dotted.partition(".")
            if head in aliases:
                paths.add(aliases[head] + ("." + rest if rest else ""))
    return paths


@pytest.mark.parametrize("lab", LABS)
def test_nothing_answers_an_exercise_before_it(lab):
    cells = _cells(lab, student=True)
    exercises = {e.id: e for e in EXERCISES if e.lab == lab}
    aliases: dict[str, str] = {}
    used: list[set[str]] = []  # per cell, the paths used up to and including it
    for cell in cells:
        paths = set()
        if cell.cell_type == "code":
            tree = parse_code(cell.source)
            _imported_names(tree, aliases)
            paths = _used_paths(tree, aliases)
        used.append((used[-1] if used else set()) | paths)
    for index, exercise_id, _ in _check_positions(cells):
        before = used[index - 1] if index else set()
        for answer in exercises[exercise_id].answered_by:
            hits = sorted(p for p in before if p == answer or p.startswith(answer + "."))
            assert not hits, f"{exercise_id}: {hits} is used before the exercise is done"


@pytest.mark.parametrize("lab", LABS)
def test_use_never_rebinds_a_checked_name(lab):
    cells = _cells(lab)
    checked = {name for _, _, name in _check_positions(cells)}
    for index, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        for node in ast.walk(parse_code(cell.source)):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                    (_dotted(node.value.func) or "").endswith("use"):
                targets = {t.id for t in node.targets if isinstance(t, ast.Name)}
                assert not targets & checked, f"{lab} cell {index}: labkit.use rebinds {targets & checked}"


@pytest.mark.parametrize("lab", LABS)
def test_nbval_markers_are_tags_and_the_lab_opens_with_help(lab):
    cells = _cells(lab)
    for index, cell in enumerate(cells):
        assert "NBVAL_" not in cell.source, f"{lab} cell {index}: use the nbval-* cell tags, not a comment"
    assert cells[0].cell_type == "markdown" and "labkit.hint(" in cells[0].source, \
        "the first cell says what to do when stuck (labkit.hint)"
    text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    assert "## Summary" in text and "## References" in text


def _fragments(lines: list[str]) -> set[str]:
    """Code fragments of a solution worth protecting: each line, its right-hand side, without spaces."""
    out = set()
    for line in lines:
        code = line.split("#", 1)[0].strip()
        for piece in (code, code.removeprefix("return "), code.split("=", 1)[-1] if "=" in code else ""):
            squeezed = re.sub(r"\s+", "", piece)
            if len(squeezed) >= 12:
                out.add(squeezed)
    return out


def _hints_below_last_level(exercise) -> list[str]:
    return [*exercise.hint_levels[:-1], exercise.nan_hint, *(m.hint for m in exercise.mistakes)]


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.id)
def test_hints_are_graduated_and_hold_no_solution_code(exercise):
    assert len(exercise.hint_levels) >= 3, "three levels of help: what is wrong, where to look, then code"
    solution = _fragments(_solutions_by_exercise(exercise.lab).get(exercise.id, []))
    assert solution, f"no solution region found for {exercise.id}"
    for hint in _hints_below_last_level(exercise):
        squeezed = re.sub(r"\s+", "", hint)
        leaked = sorted(f for f in solution if f in squeezed)
        assert not leaked, f"{exercise.id}: a hint below the last level gives away {leaked}: {hint!r}"


def _zeros_like_reference(exercise):
    """A plausible wrong answer: the right structure and shape, all zeros."""
    if exercise.expects_class:
        base = exercise.fallback() if exercise.fallback else exercise.reference

        class Zeros(base):
            def forward_unbatched(self, x, mask=None, *, weights, state, rng, update_state):
                return jnp.zeros_like(x), state

        return Zeros

    def zeros(*args, **kwargs):
        return jax.tree_util.tree_map(jnp.zeros_like, exercise.reference(*args, **kwargs))

    return zeros


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.id)
def test_a_plausible_wrong_answer_fails_with_one_hint_per_mistake(exercise):
    report = labkit.check(exercise.id, _zeros_like_reference(exercise))
    text = report.text()
    assert not report.passed, text
    failing = [c for c in report.cases if not c.passed]
    assert failing and all(c.name in text for c in failing)
    assert report.hints, f"no hint:\n{text}"
    for hint in report.hints:
        assert text.count(hint) == 1, f"a hint repeated:\n{text}"
    assert f"labkit.hint({exercise.id!r})" in text


def _skipped(cell) -> bool:
    return cell.cell_type == "code" and SKIP_GRADING_TAG in cell.metadata.get("tags", [])


def _names_outside_use(source: str) -> set[str]:
    """Names a cell reads, leaving out the arguments of its `labkit.use(...)` calls."""
    tree = parse_code(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("labkit.use", "use"):
            node.args, node.keywords = [], []
    return cell_names(ast.unparse(tree))[1]


@pytest.mark.parametrize("lab", LABS)
def test_skipped_cells_run_as_in_the_master(lab):
    master, student = _cells(lab), _cells(lab, student=True)
    exercise_names = {name for cell in master if cell.cell_type == "code" and BEGIN_MARKER in cell.source
                      for name in defined_names(cell.source)}
    by_id = {cell.id: cell for cell in master}
    skipped = [cell for cell in student if _skipped(cell)]
    for cell in skipped:
        assert cell.source == by_id[cell.id].source, f"{lab}: skipped cell {cell.id} differs from the master's"
        direct = _names_outside_use(cell.source) & exercise_names
        assert not direct, f"{lab}: skipped cell {cell.id} calls {sorted(direct)} directly, not through labkit.use"


@pytest.mark.slow
@pytest.mark.parametrize("lab", LABS)
def test_untouched_student_notebook_runs_without_an_error(lab, tmp_path):
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "student" / LABS[lab].name, as_version=4)
    notebook.cells = [cell for cell in notebook.cells if not _skipped(cell)]  # run in full by nbval, as master
    NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [(i, o.get("ename"), o.get("evalue", "")[:200]) for i, cell in enumerate(notebook.cells)
              if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{lab}: the untouched student notebook fails in cells {errors}"
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "not implemented yet" in text
