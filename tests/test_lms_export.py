"""`python -m labkit grade --format canvas|csv`: per-lab gradebooks -> one LMS gradebook (no kernel)."""

from __future__ import annotations

import csv
from pathlib import Path

from labkit.grading import batch
from labkit.grading.gradebook import Gradebook


def _book(path: Path, lab: str, rows: list[tuple[str, str, float, float]]) -> Path:
    """A labkit gradebook for `lab` with rows (file, learner, total, max_total)."""
    book = Gradebook(path, [f"{lab}.a", f"{lab}.b"])
    for file, learner, total, maximum in rows:
        book.set(file, {"file": file, "learner": learner, f"{lab}.a": "1", f"{lab}.b": "0",
                        "total": f"{total:g}", "max_total": f"{maximum:g}", "status": "ok"})
    book.save()
    return path


def _read(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.reader(stream))


def _books(tmp_path: Path) -> list[str]:
    one = _book(tmp_path / "lab01.csv", "lab01", [("a.ipynb", "ada", 11, 11), ("b.ipynb", "bob", 4.5, 11),
                                                  ("b2.ipynb", "bob", 6, 11)])
    two = _book(tmp_path / "lab02.csv", "lab02", [("c.ipynb", "ada", 7, 9), ("d.ipynb", "cy", 0, 9)])
    return [str(one), str(two)]


def test_canvas_layout_one_column_per_lab_with_points_possible(tmp_path):
    out = tmp_path / "canvas.csv"
    assert batch.main(["--format", "canvas", *_books(tmp_path), "-o", str(out)]) == 0
    rows = _read(out)
    assert rows[0] == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", "Lab 01", "Lab 02"]
    assert rows[1] == ["Points Possible", "", "", "", "", "11", "9"]
    assert rows[2:] == [["ada", "", "ada", "", "", "11", "7"], ["bob", "", "bob", "", "", "6", ""],
                        ["cy", "", "cy", "", "", "", "0"]]  # bob's best file; no row, no score


def test_canvas_identities_come_from_a_roster(tmp_path):
    roster = tmp_path / "roster.csv"
    roster.write_text("Student,ID,SIS User ID,SIS Login ID,Section,Quiz 1\n"
                      "    Points Possible,,,,,5\n"
                      "\"Lovelace, Ada\",101,S-1,ada,Monday,5\n", encoding="utf-8")
    out = tmp_path / "canvas.csv"
    assert batch.main(["--format", "canvas", *_books(tmp_path), "--roster", str(roster), "-o", str(out)]) == 0
    assert _read(out)[2] == ["Lovelace, Ada", "101", "S-1", "ada", "Monday", "11", "7"]


def test_plain_csv_keyed_by_learner(tmp_path):
    out = tmp_path / "plain.csv"
    assert batch.main(["--format", "csv", *_books(tmp_path), "-o", str(out)]) == 0
    assert _read(out) == [["learner", "lab01", "lab02"], ["ada", "11", "7"], ["bob", "6", ""], ["cy", "", "0"]]


def test_a_file_that_is_not_a_labkit_gradebook_is_refused(tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("name,score\nada,3\n", encoding="utf-8")
    assert batch.main(["--format", "canvas", str(other), "-o", str(tmp_path / "x.csv")]) == 2
    assert "exercise columns of one lab" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
