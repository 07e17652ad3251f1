"""Reading lab notebooks: solution markers, check cells and the names they grade.

Shared by `labkit.release` (master -> student notebooks) and batch grading (which learner function each
exercise grades). Pure Python: nothing here imports JAX or the graders.
"""

from __future__ import annotations

import ast
import threading

BEGIN_MARKER = "### BEGIN SOLUTION"
END_MARKER = "### END SOLUTION"


class MarkerError(ValueError):
    """A solution marker that is not alone at the start of its line."""


# CPython 3.11 keeps one recursion counter for turning parsed code into `ast` objects per interpreter, not per
# thread: two threads parsing at once (batch grading with --jobs) can fail with "SystemError: AST constructor
# recursion depth mismatch" (python/cpython#106905), and a right answer would score 0 as a grader error.
_PARSE_LOCK = threading.Lock()


def parse_code(source: str) -> ast.Module | None:
    """A code cell's syntax tree, IPython magics and shell lines read as `pass`; None if it does not parse."""
    lines = [line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
             for line in source.splitlines()]
    try:
        with _PARSE_LOCK:
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


# ------------------------------------------------------------------ cells grading does not need

SKIP_GRADING_TAG = "skip-grading"


def _nested_locals(statement: ast.stmt) -> set[str]:
    """Names local to the functions, lambdas and comprehensions inside `statement` (not module names)."""
    local: set[str] = set()
    for node in ast.walk(statement):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local |= {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
            local |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        elif isinstance(node, ast.comprehension):
            local |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
    return local


def _top_level_bound(statement: ast.stmt, nested: set[str]) -> set[str]:
    """Module-level names a statement binds: assignments, loop/with targets, imports, defs, classes."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    bound = {(a.asname or a.name).split(".")[0] for a in ast.walk(statement) if isinstance(a, ast.alias)}
    bound |= {n.id for n in ast.walk(statement) if isinstance(n, ast.Name)
              and isinstance(n.ctx, (ast.Store, ast.Del)) and n.id not in nested}
    bound |= {n.name for n in ast.walk(statement) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
              and statement is not n and n.name not in nested}
    return bound


def _loads(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _scan(statements: list[ast.stmt], bound: set[str], free: set[str]) -> None:
    """Walk statements in execution order: reads of names not yet bound go to `free`, bindings to `bound`."""
    for statement in statements:
        if isinstance(statement, (ast.For, ast.AsyncFor)):
            free |= _loads(statement.iter) - bound
            bound |= {n.id for n in ast.walk(statement.target) if isinstance(n, ast.Name)}
            _scan(statement.body + statement.orelse, bound, free)
        elif isinstance(statement, (ast.With, ast.AsyncWith)):
            for item in statement.items:
                free |= _loads(item.context_expr) - bound
                targets = ast.walk(item.optional_vars) if item.optional_vars else ()
                bound |= {n.id for n in targets if isinstance(n, ast.Name)}
            _scan(statement.body, bound, free)
        elif isinstance(statement, (ast.If, ast.While)):
            free |= _loads(statement.test) - bound
            _scan(statement.body + statement.orelse, bound, free)
        elif isinstance(statement, ast.Try):
            bound |= {h.name for h in statement.handlers if h.name}
            _scan(statement.body + [s for h in statement.handlers for s in h.body] + statement.orelse
                  + statement.finalbody, bound, free)
        else:
            nested = _nested_locals(statement)
            free |= _loads(statement) - nested - bound
            bound |= _top_level_bound(statement, nested)


def cell_names(source: str) -> tuple[set[str], set[str]]:
    """`(bound, free)` module-level names of a code cell: what it defines, and what it reads from earlier
    cells (read before the cell binds it; reads inside function bodies count: they happen at call time)."""
    tree = parse_code(source)
    bound: set[str] = set()
    free: set[str] = set()
    _scan(tree.body if tree else [], bound, free)
    return bound, free


def skip_conflicts(sources: list[str], skipped: set[int]) -> list[tuple[int, str, int]]:
    """`(cell, name, skipped cell)` for each name a kept cell reads whose latest definition, in the cells
    before it, is a skipped cell: running without the skipped cells would change or lose that name."""
    last_binder: dict[str, int] = {}
    conflicts = []
    for index, source in enumerate(sources):
        bound, free = cell_names(source)
        if index not in skipped:
            conflicts += [(index, name, last_binder[name]) for name in sorted(free)
                          if last_binder.get(name) in skipped]
        for name in bound:
            last_binder[name] = index
    return conflicts


def resolve_skips(sources: list[str], skipped: set[int]) -> set[int]:
    """`skipped` without every cell whose names a kept cell needs (repeated until nothing conflicts)."""
    skipped = set(skipped)
    while conflicts := skip_conflicts(sources, skipped):
        skipped -= {provider for _, _, provider in conflicts}
    return skipped
