"""House rules that keep labkit readable: no function over 60 lines (its docstring not counted)."""

import ast
import pathlib

MAX_LINES = 60
PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "labkit"


def _long_functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                doc = body[0] if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str) else None
                lines = node.end_lineno - node.lineno + 1
                if doc is not None:
                    lines -= doc.end_lineno - doc.lineno + 1
                if lines > MAX_LINES:
                    yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines"


def test_no_function_is_over_60_lines():
    assert list(_long_functions()) == []
