"""The throughput benchmark's submissions (`labkit.grading.throughput.copies`): varied, and graded as varied."""

from pathlib import Path

import nbformat

from labkit.grading.throughput import KINDS, copies

MASTER = Path(__file__).resolve().parent.parent / "notebooks" / "01_dot_product_attention.ipynb"
STUB = "raise NotImplementedError()"


def test_copies_cycle_through_solved_unfilled_and_half_solved():
    master = nbformat.read(MASTER, as_version=4)
    solutions = [c.source for c in master.cells if "### BEGIN SOLUTION" in c.source]
    made = copies(MASTER, 7)
    assert [kind for kind, _ in made.values()] == [KINDS[n % 3] for n in range(7)]
    learners = {notebook.metadata["labkit"]["learner"] for _, notebook in made.values()}
    assert len(learners) == 7
    for kind, notebook in made.values():
        answered = [c.source in solutions for c in notebook.cells if c.source in solutions or STUB in c.source]
        assert len(answered) == len(solutions) > 1
        expected = {"solved": [True] * len(answered), "unfilled": [False] * len(answered),
                    "half": [n % 2 == 0 for n in range(len(answered))]}[kind]
        assert answered == expected, kind
