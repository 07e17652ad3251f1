"""Export a JAX function (e.g. a labkit layer's forward pass) to TensorFlow and TFLite, and run the result.

The path: `jax.experimental.jax2tf.convert(fn, enable_xla=False)` turns the JAX computation into ordinary
TensorFlow ops (no XLA-only ops, which TFLite cannot run), `tf.function` traces it for the example inputs'
shapes and dtypes, and `tf.lite.TFLiteConverter.from_concrete_functions` writes a flatbuffer that
`tf.lite.Interpreter` (or `ai_edge_litert`) runs on a phone or microcontroller. Loops (`lax.scan`/`lax.map`)
become TF while loops, so the chunked, memory-efficient attention stays chunked in the exported model.

The converter handles at most 5-dimensional tensors and its interpreter runs no conditionals inside loops:
build a `MemoryEfficientSelfAttention` for export with `use_reference_code=True` (Trax loops over examples
and heads instead of adding two `vmap` dimensions) and `skip_blocks=False` (no `lax.switch`). Typical use
(weights baked in as constants):

    layer = MemoryEfficientSelfAttention(n_heads=2, d_qk=8, d_v=8, mode="eval", use_reference_code=True,
                                         skip_blocks=False)
    layer.init(trax.shapes.signature(x))
    forward = lambda x: layer.pure_fn(x, layer.weights, layer.state, jax.random.PRNGKey(0))[0]
    model = to_tflite(forward, [x])
    (y,) = run_tflite(model, [x])
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def to_tf(fn: Callable, example_inputs: Sequence[np.ndarray]):
    """A TF concrete function computing `fn` for inputs shaped and typed like `example_inputs`."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    converted = jax2tf.convert(fn, enable_xla=False)
    signature = [tf.TensorSpec(np.shape(x), np.asarray(x).dtype) for x in example_inputs]
    return tf.function(converted, autograph=False, input_signature=signature).get_concrete_function()


def to_tflite(fn: Callable, example_inputs: Sequence[np.ndarray]) -> bytes:
    """The TFLite flatbuffer (bytes) of `fn` for inputs shaped like `example_inputs` (jax2tf, no XLA ops)."""
    import tensorflow as tf

    concrete = to_tf(fn, example_inputs)
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete]).convert()


def run_tflite(model: bytes, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run a TFLite flatbuffer on `inputs` (in signature order) with `tf.lite.Interpreter`; returns the outputs."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=model)
    interpreter.allocate_tensors()
    for detail, x in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], np.asarray(x, detail["dtype"]))
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
