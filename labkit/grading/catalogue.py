"""`exercises()`: the list of graded exercises, as a table in Jupyter and text in a terminal."""

from __future__ import annotations

import dataclasses
import html

from labkit.grading.exercise import registry


@dataclasses.dataclass(frozen=True)
class ExerciseInfo:
    """One row of the catalogue."""

    id: str
    points: int
    n_cases: int  # the cases a learner's `check` runs
    n_hidden: int  # the further cases only instructors' batch grading runs
    description: str


class Catalogue(list):
    """A list of `ExerciseInfo` that displays itself as a table."""

    def __str__(self) -> str:
        width = max((len(e.id) for e in self), default=10)
        return "\n".join(f"{e.id:<{width}}  {e.points:>2} pts  {e.n_cases:>2} cases  {e.n_hidden:>2} hidden  "
                         f"{e.description}" for e in self)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td><code>{html.escape(e.id)}</code></td><td>{e.points}</td><td>{e.n_cases}</td>"
                       f"<td>{e.n_hidden}</td><td style='text-align:left'>{html.escape(e.description)}</td></tr>"
                       for e in self)
        return ("<table><thead><tr><th>exercise</th><th>points</th><th>cases</th><th>hidden cases</th>"
                f"<th>what it asks</th></tr></thead><tbody>{rows}</tbody></table>")


def exercises(lab: str | None = None) -> Catalogue:
    """All graded exercises (or one lab's, e.g. `exercises("lab01")`) with points and a one-line description."""
    rows = Catalogue()
    for e in registry().values():
        if lab is None or e.lab == lab:
            hidden = sum(c.hidden for c in e.cases)
            rows.append(ExerciseInfo(e.id, e.points, len(e.cases) - hidden, hidden, e.description))
    return rows
