"""labkit installed from its wheel (not editable) into a fresh virtual environment outside the repository.

The wheel is built offline from a copy of the sources, installed with `--no-deps`; the pinned stack comes from
the test's own environment through a `.pth` line (a plain path entry: that environment's editable-install
finder is not run, so the repository's labkit cannot shadow the wheel's). Every command then runs from a
working directory outside the repository, with no PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

pytestmark = pytest.mark.slow  # builds a wheel and runs doctor (Trax), bench and the graders: about a minute

REPO = Path(__file__).resolve().parents[1]


def _run(python: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _build_wheel(work: Path) -> Path:
    """`pip wheel` of a copy of the sources (the build writes build/ and *.egg-info next to them)."""
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "labkit", src / "labkit", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", str(src), "-w", str(work / "dist")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (work / "dist").glob("labkit-*.whl")
    return wheel


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    """The python of a fresh venv holding labkit's wheel, and the pinned stack through a `.pth` file."""
    work = tmp_path_factory.mktemp("installed")
    assert REPO not in work.resolve().parents, "the venv must live outside the repository"
    wheel = _build_wheel(work)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                        cwd=work).stdout.strip())
    (purelib / "pinned-stack.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working directory outside the repository."""
    assert REPO not in tmp_path.resolve().parents
    return tmp_path


def test_the_wheel_is_what_imports_and_it_declares_its_extras(venv_python, outside):
    code = ("import json, labkit, labkit.bench.worker as w; from importlib import metadata; "
            "m = metadata.metadata('labkit'); print(json.dumps({'file': labkit.__file__, "
            "'worker_path': w.worker_env()['PYTHONPATH'], 'extras': m.get_all('Provides-Extra'), "
            "'requires': m.get_all('Requires-Dist')}))")
    done = _run(venv_python, "-c", code, cwd=outside)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.splitlines()[-1])
    venv = venv_python.parent.parent
    assert Path(info["file"]).resolve().is_relative_to(venv.resolve()), info["file"]
    assert Path(info["worker_path"].split(os.pathsep)[0]).is_relative_to(venv.resolve()), info["worker_path"]
    assert {"grading", "export", "dev"} <= set(info["extras"])
    grading = [r for r in info["requires"] if 'extra == "grading"' in r]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ ;\[]", r)[0]).lower() for r in grading}  # PEP 503 names
    assert names >= {"nbclient", "jupyter-client", "ipykernel"}
    assert any(r.startswith("jax==") for r in info["requires"]), "the tested versions travel with the wheel"


def test_doctor(venv_python, outside):
    done = _run(venv_python, "-m", "labkit", "doctor", cwd=outside)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout


def test_bench(venv_python, outside):
    done = _run(venv_python, "-m", "labkit", "bench", "--impl", "dense,memory_efficient", "--seq", "256",
                "--repeats", "1", "--json", "out.json", cwd=outside)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((outside / "out.json").read_text())
    assert [(r["impl"], r["status"]) for r in rows] == [("dense", "ok"), ("memory_efficient", "ok")], rows
    assert all(r["time_s"] > 0 for r in rows)


def test_release_with_root(venv_python, outside):
    course = outside / "course"
    (course / "notebooks").mkdir(parents=True)
    master = new_notebook(cells=[
        new_markdown_cell("# Lab 01"),
        new_code_cell("def add_one(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION"),
    ])
    nbformat.write(master, course / "notebooks" / "01_tiny.ipynb")
    elsewhere = outside / "elsewhere"
    elsewhere.mkdir()
    done = _run(venv_python, "-m", "labkit", "release", "--root", str(course), cwd=elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    student = nbformat.read(course / "notebooks" / "student" / "01_tiny.ipynb", as_version=4)
    assert "raise NotImplementedError()" in student.cells[1].source
    assert "return x + 1" not in student.cells[1].source
    check = _run(venv_python, "-m", "labkit", "release", "--root", str(course), "--check", cwd=elsewhere)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (elsewhere / "notebooks").exists(), "nothing is written relative to the working directory"


def test_grade_loads_the_graders(venv_python, outside):
    usage = _run(venv_python, "-m", "labkit", "grade", "--help", cwd=outside)
    assert usage.returncode == 0 and "--lab" in usage.stdout, usage.stderr
    (outside / "submissions").mkdir()
    unknown = _run(venv_python, "-m", "labkit", "grade", "submissions", "--lab", "99", cwd=outside)
    assert unknown.returncode == 2 and "no exercises registered for lab99" in unknown.stderr, unknown.stderr
