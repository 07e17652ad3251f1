"""A learner's first cells: no start-up noise from TensorFlow/gym, and plots still show after Trax loads."""

import subprocess
import sys

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook


def test_first_cell_is_quiet_and_plots_survive_trax():
    nb = new_notebook(cells=[
        new_code_cell("import labkit\nfrom trax import layers as tl\nimport trax"),
        new_code_cell("import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()"),
    ])
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    first, second = nb.cells
    printed = "".join(o.get("text", "") for o in first.outputs if o.output_type == "stream")
    for noise in ("cudart", "Gym has been unmaintained", "absl::InitializeLog", "TF-TRT"):
        assert noise not in printed, printed
    assert any("image/png" in o.get("data", {}) for o in second.outputs), second.outputs
    nbformat.validate(nb)


def test_importing_labkit_or_its_maths_loads_no_framework_and_no_grader(record_property):
    # labkit.attention is the whole registry: every family module and FAMILIES.
    code = ("import sys, time; t = time.perf_counter(); import labkit, labkit.attention; "
            "print(time.perf_counter() - t, [m for m in ('trax', 'tensorflow', 'keras', 'labkit.grading', "
            "'labkit.bench', 'labkit.layers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
    assert out[1].strip() == "[]", f"imported: {out[1]}"
    record_property("import_labkit_attention_s", float(out[0]))
    print(f"import labkit, labkit.attention: {float(out[0]):.2f} s")
    import labkit

    assert callable(labkit.check) and callable(labkit.use), "the graders load on first use"


def _names_trax_init_binds() -> set[str]:
    """What Trax's own trax/__init__.py binds at top level, read from its source (not from labkit)."""
    import ast
    import importlib.util

    source = open(importlib.util.find_spec("trax").origin, encoding="utf-8").read()
    return {(alias.asname or alias.name).split(".")[0] for node in ast.parse(source).body
            if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}


def test_import_trax_is_lean_and_binds_what_trax_binds():
    code = ("import sys, labkit\nfrom trax import layers as tl\nimport trax\n"
            "print([m for m in ('trax.data', 'trax.models', 'trax.supervised', 'trax.rl', 'gym') if m in sys.modules])\n"
            "import trax.supervised.lr_schedules as lr, trax.trax2keras as k\n"
            "assert trax.lr is lr and trax.AsKeras is k.AsKeras and trax.layers is tl\n"
            "assert trax.models.ReformerLM and trax.data.inputs and trax.optimizers.Adam and trax.shapes.signature\n"
            "print(sorted(n for n in dir(trax) if not n.startswith('_')))")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[0] == "[]", f"`from trax import layers` loaded {lines[0]}"
    assert _names_trax_init_binds() <= set(eval(lines[1])), "a name trax/__init__.py binds is missing"
