"""Batch grading reads submissions in several threads: labkit's code analysis must not fail there."""

import concurrent.futures
import time

from labkit.notebook import cell_names

SOURCE = "\n".join(f"def f{i}(x):\n    return [[(a, b) for a in range({i})] for b in x if (lambda y: y + {i})(b)]"
                   for i in range(30))


class _Finalised:
    """Freed by the cycle collector, whose `__del__` lets another thread run in the middle of a parse."""

    def __init__(self):
        self.me = self

    def __del__(self):
        time.sleep(0)


def _parse_many(_) -> int:
    failures = 0
    for _ in range(150):
        for _ in range(50):
            _Finalised()
        try:
            cell_names(SOURCE)
        except SystemError:  # "AST constructor recursion depth mismatch" (python/cpython#106905)
            failures += 1
    return failures


def test_cells_are_analysed_safely_in_parallel_threads():
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        failures = sum(pool.map(_parse_many, range(8)))
    assert failures == 0, f"{failures} parses failed with a SystemError"
