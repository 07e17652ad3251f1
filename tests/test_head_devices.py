"""memory_efficient_attention(devices=...): heads spread over devices give dense attention's numbers."""

import os
from pathlib import Path

import pytest

from labkit.attention.head_devices import resolve_devices, spread_over_heads
from labkit.bench.worker import finish_worker, start_worker, worker_env


def test_heads_over_two_cpu_devices_match_dense_outputs_and_gradients():
    env = {"PYTHONPATH": os.pathsep.join([worker_env()["PYTHONPATH"], str(Path(__file__).resolve().parent)])}
    result = finish_worker(start_worker("head_devices_probe:compare", {}, env=env), timeout_s=600)
    assert result.ok, result.error
    assert result.value["devices"] == 2 and result.value["sharded"]
    assert len(result.value["errors"]) == 10
    for case, error in result.value["errors"].items():
        assert error < 1e-5, (case, error)


def test_one_device_means_no_spreading_and_too_many_says_how_to_get_them():
    import jax

    assert resolve_devices(None) is None and resolve_devices(1) is None
    assert resolve_devices(jax.local_devices()[:1]) is None
    with pytest.raises(ValueError, match="jax_num_cpu_devices"):
        resolve_devices(len(jax.local_devices()) + 1)
    with pytest.raises(ValueError, match="3 heads cannot be split evenly over 2 devices"):
        spread_over_heads(lambda *a: a, [object(), object()], 3, None, None)
