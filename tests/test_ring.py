"""Ring attention (labkit.attention.ring) against dense attention, and the multi-process `labkit ring` command.

In this process the ring runs under `jax.vmap(..., axis_name=...)`, which executes the same collectives
(`ppermute`, `axis_index`) on one device, so these tests run whatever device count pytest's process started
with. The real thing, `jax.shard_map` over 8 simulated devices, needs its own process (the device count is
fixed when JAX's backend starts): tests/ring_worker.py, read by the tests marked "shard_map". The 2-process
run starts two OS processes joined by `jax.distributed.initialize`.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labkit.attention import FAMILIES
from labkit.attention.dense import dot_product_attention
from labkit.attention.ring import (LAYOUTS, layout_order, ring_attention, sharded_ring_attention, tile_kinds,
                                   work_per_device)
from labkit.ring import main as ring_main

WORKER = Path(__file__).resolve().parent / "ring_worker.py"
EXACT = 1e-5  # float32, the bound


def _qkv(seed, *shape):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))


@functools.partial(jax.jit, static_argnames=("n", "is_causal", "layout", "seq_len"))
def _ring_by_vmap(q, k, v, n, *, is_causal, layout, seq_len=None):
    """Global `[B, T, N, H]` -> per-device shards in layout order -> vmapped ring -> global output."""
    order = layout_order(q.shape[1], n, layout)
    stack = lambda x: x[:, order].reshape(x.shape[0], n, -1, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    ring = functools.partial(ring_attention, axis_name="ring", is_causal=is_causal, layout=layout,
                             seq_len=seq_len, return_work=True)
    out, work = jax.vmap(ring, axis_name="ring")(stack(q), stack(k), stack(v))
    out = out.swapaxes(0, 1).reshape(q.shape[0], -1, *out.shape[3:])
    return out[:, np.argsort(order)], work


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_equals_dense(n, is_causal, layout):
    q, k, v = _qkv(n, 2, 32, 3, 8)
    out, work = _ring_by_vmap(q, k, v, n=n, is_causal=is_causal, layout=layout)
    assert float(jnp.abs(out - dot_product_attention(q, k, v, is_causal=is_causal)).max()) <= EXACT
    np.testing.assert_array_equal(work, work_per_device(n, layout, is_causal))


def test_padding_is_hidden_with_seq_len():
    # 18 real positions padded to 24: 4 devices in zigzag hold 8 chunks of 3, the last two all padding or partly.
    q, k, v = (jnp.pad(x[:, :18], ((0, 0), (0, 6), (0, 0), (0, 0))) for x in _qkv(0, 1, 18, 2, 4))
    for causal in (False, True):
        out, _ = _ring_by_vmap(q, k, v, n=4, is_causal=causal, layout="zigzag", seq_len=18)
        want = dot_product_attention(q[:, :18], k[:, :18], v[:, :18], is_causal=causal)
        assert float(jnp.abs(out[:, :18] - want).max()) <= EXACT


def test_gradients_equal_dense_gradients():
    q, k, v = _qkv(1, 2, 24, 2, 4)
    cotangent = _qkv(2, 2, 24, 2, 4)[0]
    # Contiguous here; the zigzag layout's gradients are checked under shard_map (tests/ring_worker.py).
    def ring_loss(q, k, v):
        return jnp.sum(_ring_by_vmap(q, k, v, n=4, is_causal=True, layout="contiguous")[0] * cotangent)

    def dense_loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, is_causal=True) * cotangent)

    got = jax.jit(jax.grad(ring_loss, argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(dense_loss, argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert float(jnp.abs(g - w).max()) <= EXACT


def test_causal_work_contiguous_grows_and_zigzag_is_balanced():
    for n in (2, 4, 8):
        np.testing.assert_array_equal(work_per_device(n, "contiguous"), np.arange(1, n + 1))
        # Zigzag: the diagonal's 2P tiles, and half of the other 4P^2 - 2P, shared out evenly (1/4 block each).
        np.testing.assert_array_equal(work_per_device(n, "zigzag"), np.full(n, n / 2 + 1 / 4))
    # Every tile above the diagonal is skipped, every tile on it masked: half the 4P^2 tiles, plus the diagonal.
    kinds = tile_kinds(4, "zigzag")
    assert (kinds == 0).sum() == (4 * 16 - 8) // 2 and (kinds == 2).sum() == 8


def test_wrapper_on_one_device_handles_batch_dims_lengths_and_dtypes():
    q, k, v = _qkv(3, 2, 3, 13, 2, 4)
    for causal in (False, True):
        got = jax.jit(functools.partial(sharded_ring_attention, is_causal=causal))(q, k, v)
        assert float(jnp.abs(got - dot_product_attention(q, k, v, is_causal=causal)).max()) <= EXACT
    half = sharded_ring_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert half.dtype == jnp.bfloat16 and half.shape == q.shape
    assert FAMILIES["ring"].function is sharded_ring_attention and FAMILIES["ring"].exact


def test_clear_errors():
    q, k, v = _qkv(4, 1, 8, 2, 4)
    with pytest.raises(ValueError, match="neither bias nor mask"):
        sharded_ring_attention(q, k, v, mask=jnp.ones((8, 8), bool))
    with pytest.raises(ValueError, match="query and key lengths must match"):
        sharded_ring_attention(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="layout must be one of"):
        sharded_ring_attention(q, k, v, layout="striped")
    with pytest.raises(ValueError, match="must be a multiple of 8"):
        layout_order(12, 4, "zigzag")
    with pytest.raises(ValueError, match="local shards"):
        jax.vmap(functools.partial(ring_attention, axis_name="r", layout="zigzag"), axis_name="r")(
            *(x[None, :, :3] for x in (q, k, v)))


@pytest.fixture(scope="module")
def on_eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("ring") / "results.json"
    done = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_shard_map_on_8_devices_equals_dense(on_eight_devices):
    assert on_eight_devices["devices"] == 8
    results = on_eight_devices["outputs"]
    assert len(results) == 20
    for name, found in results.items():
        assert found["error"] <= EXACT, name
        n, causal, layout = int(name.split()[0][2:]), "causal=True" in name, name.split()[-1]
        np.testing.assert_array_equal(found["work"], work_per_device(n, layout, causal), err_msg=name)


def test_shard_map_gradients_equal_dense(on_eight_devices):
    assert len(on_eight_devices["gradients"]) == 4
    for name, error in on_eight_devices["gradients"].items():
        assert error <= EXACT, name


def test_two_processes_command(capsys):
    assert ring_main(["--processes", "2", "--local-devices", "2", "--seq", "512", "--causal", "--json",
                      "--repeats", "1", "--heads", "2", "--head-dim", "16"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["global_devices"] == 4 and len(r["devices"]) == 2 for r in results)
    assert max(r["max_abs_error"] for r in results) <= EXACT
    assert [w for r in results for w in r["work_blocks"]] == list(work_per_device(4, "zigzag"))
    assert all(r["peak_rss_bytes"] > 0 and r["seconds"] > 0 for r in results)
