"""labkit.export: a MemoryEfficientSelfAttention layer through jax2tf and TFLite gives JAX's numbers."""

import jax
import numpy as np
from trax import shapes

from labkit.export import run_tflite, to_tflite
from labkit.layers import MemoryEfficientSelfAttention


def test_tflite_interpreter_matches_jax():
    # Length 10 with chunks of 4: padding, several key chunks and the causal mask all go through the export.
    x = np.random.default_rng(0).normal(size=(2, 10, 8)).astype(np.float32)
    layer = MemoryEfficientSelfAttention(n_heads=2, d_qk=4, d_v=4, causal=True, mode="eval",
                                         use_reference_code=True, skip_blocks=False,
                                         query_chunk_size=4, key_chunk_size=4)
    layer.init(shapes.signature(x), rng=jax.random.PRNGKey(0))

    def forward(x):
        return layer.pure_fn(x, layer.weights, layer.state, jax.random.PRNGKey(0))[0]

    model = to_tflite(forward, [x])
    assert isinstance(model, bytes) and len(model) > 1000
    (out,) = run_tflite(model, [x])
    np.testing.assert_allclose(out, forward(x), atol=1e-5)
