"""Batch grading's kernels: `runner` starts and drives one submission's Jupyter kernel in its limits
(`kernel`, the process that kernel runs as), and `kernel_side` is the code that runs inside it."""
