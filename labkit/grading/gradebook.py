"""The gradebook CSV of `python -m labkit grade`: one row per submission, written atomically, resumable.

Columns: `file, learner, <exercise ids...>, total, max_total, status, detail, sha256, graded_at`. Every
write goes to a temporary file in the same directory that then replaces the gradebook (`os.replace`), so
an interrupted run leaves either the previous gradebook or the new one, never half of one. Rows of
submissions that are not part of the current run are kept as they were.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tempfile
from pathlib import Path

LEADING = ["file", "learner"]
TRAILING = ["total", "max_total", "status", "detail", "sha256", "graded_at"]


def content_hash(data: bytes) -> str:
    """sha256 of a submission's bytes: what decides whether a re-run grades it again."""
    return hashlib.sha256(data).hexdigest()


def key(path: str | Path) -> str:
    """The identity of a submission in the gradebook: its normalised absolute path."""
    return os.path.normpath(os.path.abspath(path))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Gradebook:
    """Rows by submission key, in insertion order; `save()` rewrites the whole CSV atomically."""

    def __init__(self, path: Path, exercise_ids: list[str]):
        self.path, self.exercise_ids = Path(path), list(exercise_ids)
        self.rows: dict[str, dict[str, str]] = {}
        self.extra_columns: list[str] = []  # exercise columns of other labs found in an existing gradebook
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8", newline="") as stream:
            reader = csv.DictReader(stream)
            known = set(LEADING + TRAILING + self.exercise_ids)
            self.extra_columns = [c for c in reader.fieldnames or [] if c not in known]
            for row in reader:
                if row.get("file"):
                    self.rows[key(row["file"])] = {k: v or "" for k, v in row.items() if k}

    @property
    def columns(self) -> list[str]:
        """All CSV columns in order."""
        return LEADING + self.exercise_ids + self.extra_columns + TRAILING

    def is_current(self, path: str | Path, sha256: str) -> bool:
        """True when `path` was graded with this content and every exercise of this lab has a score."""
        row = self.rows.get(key(path))
        return (row is not None and row.get("sha256") == sha256 and row.get("status") != "grader error"
                and all(row.get(e, "") != "" for e in self.exercise_ids))

    def set(self, path: str | Path, row: dict[str, str]) -> None:
        """Add or replace the row of `path`."""
        self.rows[key(path)] = dict(row)

    def render(self) -> str:
        """The gradebook as CSV text."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows.values():
            writer.writerow({c: row.get(c, "") for c in self.columns})
        return out.getvalue()

    def save(self) -> None:
        """Rewrite the gradebook atomically."""
        atomic_write_text(self.path, self.render())
