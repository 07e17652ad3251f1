"""Run in a fresh process with KERAS_BACKEND set: compare labkit's Keras drop-in with Keras's own layer.

    KERAS_BACKEND=jax python tests/keras_worker.py OUT.json

Writes, per named check, the max |labkit - keras| of the outputs (or a description), plus what the
backend-specific checks found. tests/test_keras.py reads the file and asserts.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings

import numpy as np

import keras
from labkit.keras import MemoryEfficientMultiHeadAttention

RNG = np.random.default_rng(0)
B, T, S, D = 2, 37, 29, 16


def _pair(**kwargs):
    """A Keras layer and labkit's, built alike, with the Keras layer's weights copied over."""
    vanilla = keras.layers.MultiHeadAttention(**kwargs)
    chunked = MemoryEfficientMultiHeadAttention(**kwargs, query_chunk_size=8, key_chunk_size=5)
    x, y = _inputs()
    vanilla(x, y)
    chunked(x, y)
    chunked.set_weights(vanilla.get_weights())
    return vanilla, chunked


def _inputs():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(B, T, D)).astype("float32"), rng.normal(size=(B, S, D)).astype("float32"))


def _calls(x, y):
    cross = RNG.random((B, T, S)) > 0.3
    cross[:, np.arange(T), RNG.integers(0, S, T)] = True  # every row keeps a key
    own = RNG.random((B, T, T)) > 0.3
    own[:, np.arange(T), np.arange(T)] = True
    hidden = own.copy()
    hidden[:, 5] = False  # a row whose keys are all hidden
    return {"cross": dict(query=x, value=y), "cross, key given": dict(query=x, value=y, key=y * 0.5),
            "self, causal": dict(query=x, value=x, use_causal_mask=True),
            "cross, masked": dict(query=x, value=y, attention_mask=cross),
            "self, masked and causal": dict(query=x, value=x, attention_mask=own, use_causal_mask=True),
            "self, a fully hidden row": dict(query=x, value=x, attention_mask=hidden)}


def compare() -> dict:
    """Max |labkit - keras| per layer config and call."""
    configs = {"3 heads, key_dim 8": dict(num_heads=3, key_dim=8),
               "dropout 0.3 (inference)": dict(num_heads=2, key_dim=4, dropout=0.3)}
    if keras.backend.backend() != "jax":
        # Keras's own layer fails on JAX when value_dim != key_dim (jax.nn.dot_product_attention needs one size).
        configs["value_dim 6, output_shape 10, no bias"] = dict(num_heads=2, key_dim=4, value_dim=6,
                                                                output_shape=10, use_bias=False)
    errors = {}
    for config_name, kwargs in configs.items():
        vanilla, chunked = _pair(**kwargs)
        for call_name, call in _calls(*_inputs()).items():
            errors[f"{config_name}: {call_name}"] = float(np.abs(np.asarray(vanilla(**call)) -
                                                               np.asarray(chunked(**call))).max())
    return errors


def from_config() -> float:
    """A layer rebuilt from the vanilla layer's config (plus chunk sizes) with its weights gives its outputs."""
    vanilla = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)
    x, y = _inputs()
    vanilla(x, y)
    config = {**vanilla.get_config(), "query_chunk_size": 16, "key_chunk_size": 16}
    chunked = MemoryEfficientMultiHeadAttention.from_config(config)
    chunked(x, y)
    chunked.set_weights(vanilla.get_weights())
    again = MemoryEfficientMultiHeadAttention.from_config(chunked.get_config())
    assert again.query_chunk_size == 16
    return float(np.abs(np.asarray(vanilla(x, y)) - np.asarray(chunked(x, y))).max())


def dropout_in_training() -> dict:
    """Training calls differ, have the eval output as their mean, and zero the hidden positions' weight."""
    _, chunked = _pair(num_heads=2, key_dim=4, dropout=0.5)
    x, y = _inputs()
    runs = np.stack([np.asarray(chunked(x, y, training=True)) for _ in range(10)])
    inference = np.asarray(chunked(x, y))
    return {"two calls differ": bool(np.abs(runs[0] - runs[1]).max() > 1e-3),
            "mean error": float(np.abs(runs.mean(0) - inference).mean()),
            "one call's error": float(np.abs(runs[0] - inference).mean())}


def refusals() -> dict:
    """Scores are computed densely with a warning; attention over other axes is refused."""
    _, chunked = _pair(num_heads=2, key_dim=4)
    x, y = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, scores = chunked(x, y, return_attention_scores=True)
    axes = MemoryEfficientMultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(1, 2))
    try:
        axes(np.zeros((1, 4, 4, 8), "float32"), np.zeros((1, 4, 4, 8), "float32"))
        refused = ""
    except ValueError as error:
        refused = str(error)
    return {"scores shape": list(np.asarray(scores).shape),
            "warned": any("densely" in str(w.message) for w in caught), "attention_axes refused": refused}


def tflite() -> dict:
    """A small Keras model with the layer -> SavedModel -> TFLite (builtin ops only) -> LiteRT's interpreter."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    t, d = 64, 16
    inp = keras.Input((t, d), batch_size=1)
    attention = MemoryEfficientMultiHeadAttention(num_heads=2, key_dim=8, query_chunk_size=24, key_chunk_size=20)
    model = keras.Model(inp, keras.layers.Dense(4)(attention(inp, inp, use_causal_mask=True)))
    x = np.random.default_rng(2).normal(size=(1, t, d)).astype("float32")
    folder = tempfile.mkdtemp()
    model.export(folder, format="tf_saved_model", verbose=False,
                 input_signature=[tf.TensorSpec((1, t, d), tf.float32)])
    converter = tf.lite.TFLiteConverter.from_saved_model(folder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    blob = converter.convert()
    interpreter = Interpreter(model_content=blob)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    return {"bytes": len(blob), "max error": float(np.abs(got - np.asarray(model(x))).max())}


def main(out_path: str) -> None:
    """Run every check for this backend and write the JSON results."""
    results = {"backend": keras.backend.backend(), "compare": compare(), "from_config": from_config(),
               "dropout": dropout_in_training(), "refusals": refusals()}
    if keras.backend.backend() == "tensorflow":
        results["tflite"] = tflite()
    with open(out_path, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
