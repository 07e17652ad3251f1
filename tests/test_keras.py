"""labkit.keras.MemoryEfficientMultiHeadAttention against Keras's own MultiHeadAttention.

Each Keras backend needs a fresh process (KERAS_BACKEND is read once, when Keras is imported), so
tests/keras_worker.py runs once per backend and these tests read what it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import bench

WORKER = Path(__file__).resolve().parent / "keras_worker.py"
EXACT = 1e-5  # float32, the bound for "same outputs"


@pytest.fixture(scope="module", params=["tensorflow", "jax"])
def measured(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "results.json"
    done = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "KERAS_BACKEND": request.param})
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["backend"] == request.param
    return results


def test_transferred_weights_give_keras_outputs(measured):
    errors = measured["compare"]
    assert len(errors) >= 12, "configs x calls: cross, causal, masked, fully hidden rows, ..."
    assert all(error <= EXACT for error in errors.values()), errors


def test_a_layer_built_from_keras_config_is_the_same_layer(measured):
    assert measured["from_config"] <= EXACT


def test_dropout_drops_in_training_and_keeps_the_mean(measured):
    dropout = measured["dropout"]
    assert dropout["two calls differ"]
    # Averaging 10 calls shrinks the noise (~1/sqrt(10)); a biased dropout (say, no 1/(1-p)) would not.
    assert dropout["mean error"] < 0.6 * dropout["one call's error"], dropout


def test_scores_are_dense_with_a_warning_and_other_axes_are_refused(measured):
    refusals = measured["refusals"]
    assert refusals["warned"] and refusals["scores shape"] == [2, 2, 37, 29]
    assert "sequence axis" in refusals["attention_axes refused"]


def test_tflite_round_trip_matches_keras(measured):
    if measured["backend"] != "tensorflow":
        pytest.skip("TFLite conversion is a TensorFlow-backend path")
    assert measured["tflite"]["bytes"] > 0 and measured["tflite"]["max error"] <= EXACT


@pytest.mark.slow
def test_chunked_layer_needs_a_fraction_of_keras_memory_at_long_lengths():
    points = bench.sweep(["keras_mha", "keras_chunked"], [4096], heads=4, head_dim=64, repeats=1, warmup=1,
                         progress=False)
    by_impl = {m.impl: m for m in points}
    assert all(m.ok for m in points), bench.table(points)
    assert by_impl["keras_chunked"].peak_extra_mib < 0.5 * by_impl["keras_mha"].peak_extra_mib, bench.table(points)
