"""`python -m labkit grade --export gradescope`: the autograder zip, and its run_autograder in a simulated
/autograder root (AUTOGRADER_ROOT) on a few fixture submissions, with the points `labkit grade` gives."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from labkit.grading import batch, gradescope, registry
from labkit.grading.report import CaseResult, Report

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
LAB01 = [e for e in registry().values() if e.lab == "lab01"]
# A handful: full marks, a cheater, an unreadable file, a crash in one exercise (each needs a Trax kernel).
SIMULATED = ["ada.ipynb", "cheater.ipynb", "not_json.ipynb", "os_exit.ipynb"]


def _generator():
    spec = importlib.util.spec_from_file_location("make_submissions", FIXTURES / "make_submissions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def autograder_zip(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradescope") / "autograder.zip"
    cwd = os.getcwd()
    os.chdir(REPO)  # the course folder: notebooks/student/ and requirements.txt
    try:
        assert batch.main(["--export", "gradescope", "--lab", "01", "-o", str(out)]) == 0
    finally:
        os.chdir(cwd)
    return out


def test_zip_has_gradescopes_files_at_its_root_and_downloads_nothing_else(autograder_zip):
    with zipfile.ZipFile(autograder_zip) as archive:
        names = archive.namelist()
        for name in ("setup.sh", "run_autograder"):
            mode = archive.getinfo(name).external_attr >> 16
            assert mode & stat.S_IXUSR, f"{name} must be executable"
        setup = archive.read("setup.sh").decode()
        assert archive.read("requirements.txt") == (REPO / "requirements.txt").read_bytes()
        config = json.loads(archive.read(gradescope.CONFIG))
    assert {"01_dot_product_attention.ipynb", "labkit-src/pyproject.toml",
            "labkit-src/labkit/__init__.py"} <= set(names)
    assert config["lab"] == "lab01" and config["notebook"] == "01_dot_product_attention.ipynb"
    assert "pip install" in setup and "-r requirements.txt" in setup and "./labkit-src" in setup
    assert not any(word in setup for word in ("curl", "wget", "git ", "http"))


def _report(points: float, statuses: list[tuple[str, bool]]) -> Report:
    cases = [CaseResult(f"case {i}", status, [], hidden=hidden) for i, (status, hidden) in enumerate(statuses)]
    return Report("lab01.x", "an exercise", points, cases)


def test_results_split_visible_and_hidden_cases_and_add_up():
    report = _report(3, [("ok", False), ("fail", False), ("ok", False), ("fail", True)])
    submission = batch.Submission(Path("x.ipynb"), b"", "0")
    graded = batch.Graded(submission, "x", "ok", "", [report])
    out = gradescope.results(graded, 12.3)
    assert out["stdout_visibility"] == "hidden" and out["execution_time"] == 12
    visible, hidden = out["tests"]
    assert (visible["visibility"], hidden["visibility"]) == ("visible", "after_published")
    assert (visible["score"], visible["max_score"], visible["status"]) == (1.5, 2.25, "failed")
    assert (hidden["score"], hidden["max_score"], hidden["status"]) == (0, 0.75, "failed")
    assert abs(out["score"] - report.score) < 0.01
    assert "case 3" not in hidden["output"] and "hidden case 1" in hidden["output"]
    assert gradescope.results(None, 1, "no notebook")["tests"] == []


def _expected_total(name: str) -> float:
    status, zeros = _generator().EXPECTED[name]
    return 0.0 if zeros is None else sum(e.points for e in LAB01 if e.id not in zeros)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", SIMULATED)
def test_run_autograder_in_a_simulated_root(autograder_zip, tmp_path, name):
    root = tmp_path / "autograder"
    with zipfile.ZipFile(autograder_zip) as archive:
        archive.extractall(root / "source")
    (root / "submission").mkdir()
    (root / "submission" / name).write_bytes(_generator().submissions()[name])
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "LABKIT_PYTHON": sys.executable}
    done = subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((root / "results" / "results.json").read_text())
    assert set(results) == {"score", "execution_time", "output", "stdout_visibility", "tests"}
    assert abs(results["score"] - _expected_total(name)) < 0.02, results["output"]
    names = {e.id for e in LAB01}
    assert {t["name"].split(" ")[0] for t in results["tests"]} == names
    for test in results["tests"]:
        assert set(test) == {"name", "score", "max_score", "output", "status", "visibility"}
        assert test["visibility"] in ("visible", "after_published") and test["status"] in ("passed", "failed")
        assert 0 <= test["score"] <= test["max_score"] + 1e-9
    shutil.rmtree(root)
