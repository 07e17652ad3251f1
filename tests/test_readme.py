"""The README's table of attention families stays true to the registry and the code."""

import importlib
import re
from pathlib import Path

import labkit.layers
from labkit.attention import FAMILIES

README = Path(__file__).resolve().parents[1] / "README.md"


def _family_rows() -> dict[str, list[str]]:
    """`family name -> [lab, functions; layer, features]` from the README's families table."""
    text = README.read_text(encoding="utf-8").split("## The attention families", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_every_registered_family_is_in_the_table_with_its_lab():
    rows = _family_rows()
    assert set(rows) == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert rows[name][0] == (family.lab[3:] if family.lab else "-"), name


def test_the_names_the_table_gives_exist():
    """Every backticked identifier in the function/layer column is the family's function module's or a layer."""
    for name, (_, names, _) in _family_rows().items():
        module = importlib.import_module(FAMILIES[name].function.__module__)
        functions, _, layer = names.partition(";")
        for identifier in re.findall(r"`(\w+)(?:`|\()", functions):
            assert hasattr(module, identifier), f"{name}: {module.__name__} has no {identifier}"
        for identifier in re.findall(r"`(\w+)(?:`|\()", layer):
            assert hasattr(labkit.layers, identifier), f"{name}: labkit.layers has no {identifier}"
        if FAMILIES[name].layer:
            assert FAMILIES[name].layer in layer, f"{name}: the table does not name its layer"
