"""Reports: what `check` returns, shown as an HTML table in Jupyter and as text in a terminal."""

from __future__ import annotations

import dataclasses
import html

STATUS_LABEL = {"ok": "ok", "fail": "FAIL", "error": "ERROR", "timeout": "TIMEOUT",
                "todo": "TODO", "skipped": "SKIP"}


@dataclasses.dataclass
class CaseResult:
    """The outcome of one case: `status` is ok, fail, error, timeout, todo (not implemented) or skipped."""

    name: str
    status: str
    lines: list[str] = dataclasses.field(default_factory=list)
    hint: str = ""
    hidden: bool = False
    mistake: str = ""  # id of the registered mistake recognised, if any

    @property
    def passed(self) -> bool:
        """True when the case passed."""
        return self.status == "ok"


@dataclasses.dataclass
class Report:
    """Case-by-case result of grading one exercise."""

    exercise_id: str
    description: str
    max_score: float
    cases: list[CaseResult]
    note: str = ""  # a message about the whole run (unknown exercise, not a function, ...)

    @property
    def n_passed(self) -> int:
        """How many cases passed."""
        return sum(c.passed for c in self.cases)

    @property
    def passed(self) -> bool:
        """True when every case passed."""
        return bool(self.cases) and self.n_passed == len(self.cases)

    @property
    def score(self) -> float:
        """Points earned: the exercise's points times the fraction of cases passed."""
        return round(self.max_score * self.n_passed / len(self.cases), 2) if self.cases else 0.0

    @property
    def summary(self) -> str:
        """One line, e.g. "lab01.attention: 3/5 cases passed (1.2/2 points)"."""
        if self.cases and all(c.status == "todo" for c in self.cases):
            return f"{self.exercise_id}: not implemented yet (0/{self.max_score:g} points)"
        if self.passed:
            return f"{self.exercise_id}: all {len(self.cases)} cases passed ({self.score:g}/{self.max_score:g} points)"
        return (f"{self.exercise_id}: {self.n_passed}/{len(self.cases)} cases passed "
                f"({self.score:g}/{self.max_score:g} points)")

    @property
    def hints(self) -> list[str]:
        """The distinct hints of the failing cases, in case order: one line per mistake, not per case."""
        seen: list[str] = []
        for case in self.cases:
            if case.hint and case.hint not in seen:
                seen.append(case.hint)
        return seen

    @property
    def more_help(self) -> str:
        """Where deeper help is, shown under a report that did not pass."""
        if self.passed or not self.cases or all(c.status == "todo" for c in self.cases):
            return ""
        return f"more help: labkit.hint({self.exercise_id!r}) (run it again for the next level)"

    def text(self) -> str:
        """The report as plain text: one block per case, then each distinct hint once."""
        out = [self.summary]
        if self.note:
            out.append(f"  {self.note}")
        for case in self.cases:
            out.append(f"  {STATUS_LABEL[case.status]:<8}{case.name}")
            out += [f"          {line}" for line in case.lines]
        out += [f"  hint: {hint}" for hint in self.hints]
        if self.more_help:
            out.append(f"  {self.more_help}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        colour = "#1a7f37" if self.passed else "#cf222e"
        rows = []
        for case in self.cases:
            detail = "<br>".join(html.escape(line) for line in case.lines)
            mark = "&#10004;" if case.passed else "&#10008;"
            rows.append(f"<tr><td style='text-align:center'>{mark}</td><td>{html.escape(case.name)}</td>"
                        f"<td style='text-align:left;font-family:monospace;white-space:pre-wrap'>{detail}</td></tr>")
        note = f"<p>{html.escape(self.note)}</p>" if self.note else ""
        hints = "".join(f"<p><b>hint:</b> {html.escape(hint)}</p>" for hint in self.hints)
        more = f"<p><i>{html.escape(self.more_help)}</i></p>" if self.more_help else ""
        return (f"<div class='labkit-report'><p style='color:{colour};font-weight:bold'>"
                f"{html.escape(self.summary)}</p>{note}<table><thead><tr><th></th><th>case</th><th>details</th>"
                f"</tr></thead><tbody>{''.join(rows)}</tbody></table>{hints}{more}</div>")
