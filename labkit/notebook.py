"""Reading lab notebooks: solution markers, check cells and the names they grade.

Shared by `labkit.release` (master -> student notebooks) and batch grading (which learner function each
exercise grades). Pure Python: nothing here imports JAX or the graders.
"""

from __future__ import annotations

import ast

BEGIN_MARKER = "### BEGIN SOLUTION"
END_MARKER = "### END SOLUTION"


class MarkerError(ValueError):
    """A solution marker that is not alone at the start of its line."""


def parse_code(source: str) -> ast.Module | None:
    """A code cell's syntax tree, IPython magics and shell lines read as `pass`; None if it does not parse."""
    lines = [line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
             for line in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except (SyntaxError, ValueError):
        return None


def marker_in(line: str) -> str | None:
    """The solution marker `line` is (BEGIN_MARKER / END_MARKER), or None; a marker mid-line is an error."""
    for marker in (BEGIN_MARKER, END_MARKER):
        if marker in line:
            if not line.lstrip().startswith(marker):
                raise MarkerError(f"{marker!r} must start its line, got {line.strip()!r}")
            return marker
    return None


def check_calls_in(source: str) -> list[tuple[str, str]]:
    """`(exercise id, name)` of each `labkit.check("labNN.x", name, ...)` in a code cell's source."""
    tree = parse_code(source)
    calls = []
    for node in ast.walk(tree) if tree else ():
        if isinstance(node, ast.Call) and len(node.args) >= 2:
            func, (first, second) = node.func, node.args[:2]
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if (name == "check" and isinstance(first, ast.Constant) and isinstance(first.value, str)
                    and isinstance(second, ast.Name)):
                calls.append((first.value, second.id))
    return calls


def is_check_cell(source: str) -> bool:
    """True for a code cell whose statements are all `labkit.check(...)` calls (comments allowed)."""
    tree = parse_code(source)
    return bool(tree and tree.body) and all(isinstance(stmt, ast.Expr) and check_calls_in(ast.unparse(stmt))
                                            for stmt in tree.body)


def defined_names(source: str) -> set[str]:
    """Names of the functions and classes a code cell defines at its top level."""
    tree = parse_code(source)
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))} if tree else set()
