"""One LMS gradebook from labkit's per-lab gradebooks: `python -m labkit grade --format canvas|csv BOOK.csv... -o OUT`.

Each input is a gradebook CSV written by `python -m labkit grade` (one lab each; the lab is read from its
exercise columns, `labNN.x`). The output has one row per learner and one column per lab with the lab's total
points; a learner with several rows for a lab (several files) gets the best total.

* `--format canvas`: Canvas's gradebook import layout, as Canvas exports it: `Student, ID, SIS User ID,
  SIS Login ID, Section`, then one column per lab ("Lab 01", ...), and a second row `Points Possible` with
  each lab's maximum. The learner id goes to `SIS User ID` (and `Student`); with `--roster` (a gradebook
  exported from Canvas) the identity columns come from the roster row whose SIS User ID, SIS Login ID or
  ID equals the learner id.
* `--format csv`: `learner`, then one column per lab.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path

from labkit.grading.gradebook import atomic_write_text

CANVAS_IDENTITY = ["Student", "ID", "SIS User ID", "SIS Login ID", "Section"]
_EXERCISE = re.compile(r"^(lab\d+)\.")


def read_gradebook(path: Path) -> tuple[str, float, dict[str, float]]:
    """`(lab, max points, learner -> best total)` of one labkit gradebook."""
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        labs = {m.group(1) for c in reader.fieldnames or [] if (m := _EXERCISE.match(c))}
        if len(labs) != 1:
            raise ValueError(f"{path}: expected the exercise columns of one lab, found {sorted(labs) or 'none'}")
        totals: dict[str, float] = {}
        maximum = 0.0
        for row in reader:
            learner = (row.get("learner") or "").strip()
            if not learner:
                continue
            total = float(row.get("total") or 0)
            totals[learner] = max(total, totals.get(learner, total))
            maximum = max(maximum, float(row.get("max_total") or 0))
    return labs.pop(), maximum, totals


def lab_title(lab: str) -> str:
    """"lab01" -> "Lab 01": the assignment's column name."""
    return f"Lab {lab[3:]}"


def _roster(path: Path | None) -> dict[str, dict[str, str]]:
    """Learner id -> Canvas identity columns, from a Canvas gradebook export (any of its id columns)."""
    if path is None:
        return {}
    found: dict[str, dict[str, str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as stream:
        for row in csv.DictReader(stream):
            if (row.get("Student") or "").strip() in ("", "Points Possible"):
                continue
            identity = {c: row.get(c, "") or "" for c in CANVAS_IDENTITY}
            for column in ("SIS User ID", "SIS Login ID", "ID"):
                if identity[column]:
                    found.setdefault(identity[column], identity)
    return found


def render(books: list[Path], form: str, roster: Path | None = None) -> str:
    """The LMS gradebook as CSV text (`form`: "canvas" or "csv")."""
    labs: dict[str, tuple[float, dict[str, float]]] = {}
    for path in books:
        lab, maximum, totals = read_gradebook(path)
        old_max, old = labs.get(lab, (0.0, {}))
        labs[lab] = (max(maximum, old_max), {**old, **{k: max(v, old.get(k, v)) for k, v in totals.items()}})
    order = sorted(labs)
    learners = sorted({learner for _, totals in labs.values() for learner in totals})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    scores = [[f"{labs[lab][1][learner]:g}" if learner in labs[lab][1] else "" for lab in order]
              for learner in learners]
    if form == "csv":
        writer.writerow(["learner", *order])
        writer.writerows([learner, *row] for learner, row in zip(learners, scores))
        return out.getvalue()
    people = _roster(roster)
    writer.writerow([*CANVAS_IDENTITY, *map(lab_title, order)])
    writer.writerow(["Points Possible", "", "", "", "", *(f"{labs[lab][0]:g}" for lab in order)])
    for learner, row in zip(learners, scores):
        identity = people.get(learner, {"Student": learner, "ID": "", "SIS User ID": learner, "SIS Login ID": "",
                                        "Section": ""})
        writer.writerow([*(identity[c] for c in CANVAS_IDENTITY), *row])
    return out.getvalue()


def main_export(args) -> int:
    """`--format canvas|csv GRADEBOOK.csv... -o OUT`; exit 2 on bad usage or an unreadable gradebook."""
    if not args.submissions or not args.output:
        print(f"grade --format {args.format}: give the labs' gradebook CSVs and -o OUT.csv", file=sys.stderr)
        return 2
    try:
        text = render([Path(p) for p in args.submissions], args.format, getattr(args, "roster", None))
    except (OSError, ValueError) as err:
        print(f"grade --format {args.format}: {err}", file=sys.stderr)
        return 2
    atomic_write_text(args.output, text)
    print(f"wrote {args.output}: {text.count(chr(10)) - (2 if args.format == 'canvas' else 1)} learner(s)")
    return 0
