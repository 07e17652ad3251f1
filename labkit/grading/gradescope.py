"""Gradescope autograder: `python -m labkit grade --export gradescope --lab NN -o autograder.zip`.

The zip holds, at its root, what Gradescope's autograder expects:

* `setup.sh`: installs the pinned Python packages (`requirements.txt`, pip only) and labkit itself from
  `labkit-src/` in the zip; nothing else is downloaded;
* `run_autograder`: grades `$AUTOGRADER_ROOT/submission/*.ipynb` (default root `/autograder`) with labkit's
  batch grader, in the same sandboxed kernels and limits as `python -m labkit grade`, and writes
  `$AUTOGRADER_ROOT/results/results.json`;
* `labkit-autograder.json` (the lab and the limits), the lab's student notebook (which names the graded
  functions and the cells grading skips), `requirements.txt`, and `labkit-src/`.

`results.json` follows Gradescope's specification: `score`, `execution_time`, `output` (status and
detail), `stdout_visibility: "hidden"`, and `tests`, two per exercise: its visible cases (`visibility:
"visible"`, `output`: the learner's report) and its hidden cases (`"after_published"`). Their points add up
to what `python -m labkit grade` gives.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from pathlib import Path

import labkit
from labkit.grading import batch
from labkit.grading.gradebook import atomic_write_text, content_hash
from labkit.grading.report import Report
from labkit.grading.sandbox.runner import Limits

CONFIG = "labkit-autograder.json"
SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image: Python packages only, pinned.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v python3.11 >/dev/null && command -v apt-get >/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-pip python3-venv
fi
PYTHON=$(command -v python3.11 || command -v python3)
"$PYTHON" -m pip install --disable-pip-version-check -q -r requirements.txt
"$PYTHON" -m pip install --disable-pip-version-check -q --no-deps ./labkit-src
"""
RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission; AUTOGRADER_ROOT (default /autograder) lets tests use a folder.
export AUTOGRADER_ROOT="${AUTOGRADER_ROOT:-/autograder}"
PYTHON="${LABKIT_PYTHON:-$(command -v python3.11 || command -v python3)}"
exec "$PYTHON" -m labkit.grading.gradescope "$AUTOGRADER_ROOT"
"""
PYPROJECT = """[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "labkit"
version = "{version}"
requires-python = ">=3.10"

[tool.setuptools.packages.find]
include = ["labkit*"]
"""


def _package_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in (".pyc", ".pyo"))


def build_zip(lab: str, notebook: Path, requirements: Path, output: Path, limits: dict) -> list[str]:
    """Write the autograder zip; returns the names of the files in it."""
    package = Path(labkit.__file__).resolve().parent
    config = {"lab": lab, "notebook": notebook.name, "limits": limits}
    entries: dict[str, tuple[bytes, int]] = {
        "setup.sh": (SETUP_SH.encode(), 0o755), "run_autograder": (RUN_AUTOGRADER.encode(), 0o755),
        CONFIG: (json.dumps(config, indent=1).encode(), 0o644), notebook.name: (notebook.read_bytes(), 0o644),
        "requirements.txt": (requirements.read_bytes(), 0o644),
        "labkit-src/pyproject.toml": (PYPROJECT.format(version=labkit.__version__).encode(), 0o644)}
    for path in _package_files(package):
        entries[f"labkit-src/labkit/{path.relative_to(package).as_posix()}"] = (path.read_bytes(), 0o644)
    output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, (data, mode) in entries.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o100000 | mode) << 16  # regular file with its permission bits
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return list(entries)


def _split(report: Report, visible: bool) -> Report:
    """The part of `report` from its visible (or hidden) cases, with its share of the points."""
    cases = [c for c in report.cases if c.hidden != visible]
    share = report.max_score * len(cases) / len(report.cases) if report.cases else 0.0
    return Report(report.exercise_id, report.description, share, cases, note=report.note)


def results(graded: batch.Graded | None, seconds: float, message: str = "") -> dict:
    """Gradescope's results.json for one graded submission (None: nothing could be graded)."""
    if graded is None:
        return {"score": 0, "execution_time": round(seconds), "output": message,
                "stdout_visibility": "hidden", "tests": []}
    tests = []
    for report in graded.reports:
        for visible in (True, False):
            part = _split(report, visible)
            if not part.cases and not (visible and not report.cases):
                continue
            shown = batch.feedback_report(part)
            tests.append({"name": f"{report.exercise_id}{'' if visible else ' (hidden cases)'}",
                          "score": round(part.max_score * part.n_passed / len(part.cases), 4) if part.cases else 0,
                          "max_score": round(part.max_score, 4), "output": shown.text(),
                          "status": "passed" if part.passed else "failed",
                          "visibility": "visible" if visible else "after_published"})
    output = f"{graded.total:g}/{sum(r.max_score for r in graded.reports):g} points, status {graded.status}"
    return {"score": round(sum(t["score"] for t in tests), 4), "execution_time": round(seconds),
            "output": output + (f"\n{graded.detail}" if graded.detail else ""),
            "stdout_visibility": "hidden", "tests": tests}


def run(root: Path) -> int:
    """Grade the submission under `root` (laid out like /autograder) and write results/results.json."""
    started = time.monotonic()
    source = root / "source"
    config = json.loads((source / CONFIG).read_text(encoding="utf-8"))
    settings = batch.make_settings(config["lab"], source / config["notebook"], Limits(**config["limits"]))
    found = sorted(p for p in (root / "submission").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    graded, message = None, "no .ipynb notebook was submitted"
    if found:
        preferred = [p for p in found if p.name == config["notebook"]] or found
        data = preferred[0].read_bytes()
        graded = batch.grade_submission(batch.Submission(preferred[0], data, content_hash(data)), settings)
    out = results(graded, time.monotonic() - started, message)
    atomic_write_text(root / "results" / "results.json", json.dumps(out, indent=1) + "\n")
    for line in batch.sandbox_lines(settings.sandbox):
        print(line)  # in Gradescope's log; stdout is hidden from learners
    return 0


def main_export(args) -> int:
    """`--export gradescope`: write the zip for `args.lab`; exit 2 on bad usage."""
    if not args.lab or not args.output:
        print("grade --export gradescope: give --lab NN and -o autograder.zip", file=sys.stderr)
        return 2
    lab = batch.lab_id(args.lab)
    notebook = batch.lab_notebook(lab[3:], args.notebook)
    requirements = Path("requirements.txt")
    if notebook is None or not notebook.is_file() or not requirements.is_file():
        print("grade --export gradescope: run it in the course folder (notebooks/student/, requirements.txt), "
              "or give --notebook", file=sys.stderr)
        return 2
    limits = {"notebook_timeout": args.timeout, "cell_timeout": args.cell_timeout or min(120.0, args.timeout),
              "case_timeout": args.case_timeout, "memory_bytes": args.memory, "max_processes": args.max_processes}
    names = build_zip(lab, notebook, requirements, args.output, limits)
    print(f"wrote {args.output}: {len(names)} files ({', '.join(n for n in names if '/' not in n)})")
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("AUTOGRADER_ROOT", "/autograder"))))
