"""The capstone comparison: each family trained the same way on each task and length, one fresh process per run.

A run (`run_point`, in a `labkit.bench` worker) trains a small model for `steps` Adam steps on freshly generated
batches, then reports held-out accuracy (recall: at query positions only; ListOps: per expression), the median
training-step time after compilation, the peak extra resident memory of one more training step (`PeakMemory`),
and the number of parameters. `run_sweep` runs the missing runs of a grid, appending each finished row to a CSV
at once (so an interrupted sweep resumes where it stopped), and `plot_sweep` draws the CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Iterable

from labkit.bench.worker import run_in_worker
from labkit.machine import cpu_model

TARGET = "labkit.capstone.sweep:run_point"
KEY = ("task", "family", "seq_len", "seed")
COLUMNS = (*KEY, "steps", "batch", "d_model", "n_layers", "accuracy", "final_loss", "step_ms", "peak_mib",
           "params", "error", "cpu", "command")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One sweep's grid: families per task, lengths, seeds, and the training budget every run gets."""

    recall_families: tuple[str, ...]
    listops_families: tuple[str, ...]
    recall_lengths: tuple[int, ...]
    listops_lengths: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    steps: int = 200
    batch: int = 16
    d_model: int = 32
    n_layers: int = 2

    def specs(self) -> list[dict]:
        """Every run of the grid as a JSON-able spec for `run_point`."""
        base = dict(steps=self.steps, batch=self.batch, d_model=self.d_model, n_layers=self.n_layers)
        grid = [("recall", f, n) for n in self.recall_lengths for f in self.recall_families]
        grid += [("listops", f, n) for n in self.listops_lengths for f in self.listops_families]
        return [dict(base, task=task, family=family, seq_len=n, seed=seed)
                for task, family, n in grid for seed in self.seeds]


def _task(spec: dict):
    """`(make_batch(seed), model)` for the spec's task: recall with an LM, ListOps with a classifier."""
    from labkit.capstone import models, tasks

    common = dict(d_model=spec["d_model"], n_layers=spec["n_layers"], max_len=spec["seq_len"])
    if spec["task"] == "recall":
        shape = dict(n_pairs=4, n_queries=4, n_keys=8, n_values=8)
        model = models.language_model(spec["family"], tasks.recall_vocab(8, 8), **common)
        return (lambda seed: tasks.associative_recall(seed, spec["batch"], spec["seq_len"], **shape)), model
    model = models.classifier(spec["family"], tasks.LISTOPS_VOCAB, 10, **common)
    return (lambda seed: tasks.listops(seed, spec["batch"], spec["seq_len"], max_depth=3)), model


def run_point(spec: dict) -> dict:
    """Worker side: train one family on one task and length; accuracy, step time, peak memory, parameters."""
    import numpy as np

    from labkit.bench.memory import MIB, PeakMemory
    from labkit.capstone import models, tasks

    make_batch, model = _task(spec)
    trainer = models.Trainer(model, seed=spec["seed"])
    base = 1000 * spec["seed"]
    trainer.init(make_batch(base))
    first = make_batch(base)
    peak = PeakMemory()
    peak.start()  # the first run of the compiled step: later runs reuse the allocator's freed pages
    losses = [trainer.step(first)]
    peak_mib = peak.stop() / MIB
    losses += trainer.fit(lambda i: make_batch(base + 1 + i), spec["steps"] - 1)
    held_out = make_batch(10**6 + spec["seed"])
    logits = np.asarray(trainer.predict(held_out))
    accuracy = tasks.query_accuracy(logits, held_out.targets, held_out.weights)
    return {"accuracy": accuracy, "final_loss": float(np.mean(losses[-10:])),
            "step_ms": float(np.median(trainer.step_times[1:]) * 1e3), "peak_mib": peak_mib,
            "params": models.count_params(trainer.weights)}


def read_rows(path: Path) -> list[dict]:
    """The rows of a sweep CSV (empty if there is none yet)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _key(row: dict) -> tuple[str, ...]:
    return tuple(str(row[name]) for name in KEY)


def run_sweep(specs: Iterable[dict], csv_path: Path, *, progress: bool = True, timeout_s: float = 600,
              command: str | None = None) -> list[dict]:
    """Run every spec whose row is not in `csv_path` yet (one fresh worker each), appending rows; all rows."""
    from tqdm.auto import tqdm

    csv_path.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(row) for row in read_rows(csv_path) if not row.get("error")}
    todo = [spec for spec in specs if _key(spec) not in done]
    command = command or shlex.join(["python", "-m", "labkit", *sys.argv[1:]])
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        for spec in tqdm(todo, desc="capstone sweep", disable=not progress):
            result = run_in_worker(TARGET, spec, timeout_s=timeout_s)
            outcome = result.value if result.ok else {"error": result.error}
            writer.writerow({**spec, **outcome, "cpu": cpu_model(), "command": command})
            handle.flush()
    return read_rows(csv_path)


def plot_sweep(rows: list[dict], path: Path | None = None, *, task: str = "recall"):
    """Accuracy, step time and peak memory against length, one line per family; saved to `path` if given."""
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["task"] == task and not row.get("error")]
    metrics = (("accuracy", "held-out accuracy"), ("step_ms", "training step (ms)"), ("peak_mib", "peak MiB"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for family in dict.fromkeys(row["family"] for row in rows):
        mine = sorted((row for row in rows if row["family"] == family), key=lambda row: int(row["seq_len"]))
        lengths = sorted({int(row["seq_len"]) for row in mine})
        for axis, (metric, label) in zip(axes, metrics):
            means = [sum(float(r[metric]) for r in mine if int(r["seq_len"]) == n) /
                     sum(1 for r in mine if int(r["seq_len"]) == n) for n in lengths]
            axis.plot(lengths, means, marker="o", label=family)
            axis.set(xlabel="sequence length", ylabel=label, xscale="log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task}: every family trained the same steps (mean over seeds)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
