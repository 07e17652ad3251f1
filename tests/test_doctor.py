"""`python -m labkit doctor`: versions, backend, and Trax vs labkit attention on a tiny input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import doctor

REPO = Path(__file__).resolve().parents[1]


def test_doctor_passes_on_the_pinned_stack():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "labkit", "doctor"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "trax 1.4.1" in result.stdout
    assert "jax 0.10.2" in result.stdout and "jaxlib 0.10.2" in result.stdout
    assert re.search(r"jax backend \w+: \S+", result.stdout)
    difference = float(re.search(r"max \|difference\| = (\S+)", result.stdout).group(1))
    assert difference <= doctor.TOLERANCE
    assert "all checks passed" in result.stdout


def test_missing_package_fails_with_one_line_naming_it(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "PACKAGES", ("numpy", "no_such_package_xyz"))

    assert doctor.main([]) == 1

    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("doctor: FAILED: cannot import no_such_package_xyz: ModuleNotFoundError")


@pytest.mark.parametrize("difference", [1e-3, float("nan")])
def test_mismatch_above_tolerance_fails(monkeypatch, capsys, difference):
    monkeypatch.setattr(doctor, "PACKAGES", ())
    monkeypatch.setattr(doctor, "attention_difference", lambda: difference)

    assert doctor.main([]) == 1

    err = capsys.readouterr().err
    assert "labkit DotProductSelfAttention differs from trax SelfAttention" in err
    assert "> 1e-05" in err
