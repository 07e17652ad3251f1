"""Attention heads spread over several devices: the opt-in concurrency of exact chunked attention on a CPU.

XLA's CPU backend runs a loop's iterations one after another and parallelises only inside each operation; with
4 heads of 64 and 512 x 512 blocks that kept about 1.85 of 2 cores busy. Heads are independent, so `shard_map`
over the heads axis gives each device its own loop, and the devices' programs run at the same time. On a 2-core
AMD EPYC (Zen 5), 2 simulated CPU devices against 1 (4 heads of 64, medians of interleaved calls in one
process): forward 0.95x the time at 4,096 tokens and 0.85x at 16,384; forward + backward 0.90x and 0.84x;
causal forward + backward 0.82x at 4,096. On a 2-core Xeon the forward went from 1.46x torch SDPA's time to 1.16x.
It costs memory: the first call's peak extra memory at 16,384 tokens rose from 82 to 199 MiB (forward) and from
220 to 288 MiB (forward + backward) (`python -m labkit bench --option memory_efficient:devices=2`, same
machine; where the extra memory goes was not traced).

A CPU has one device unless JAX is told otherwise before it starts: `jax.config.update("jax_num_cpu_devices", 2)`
(or `JAX_NUM_CPU_DEVICES=2`) before the first array is made. That choice is the caller's: it changes
`jax.devices()` for the whole process, and Trax's training loops then split batches across the devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

AXIS = "heads"


def resolve_devices(devices: int | Sequence | None) -> list | None:
    """The devices to spread heads over: None or 1 -> None (no spreading); n -> the first n local devices."""
    if devices is None:
        return None
    if isinstance(devices, int):
        available = jax.local_devices()
        if devices < 1 or devices > len(available):
            raise ValueError(
                f"devices={devices}, but this process has {len(available)} local device(s); on a CPU, make more "
                f"with jax.config.update('jax_num_cpu_devices', {max(devices, 1)}) before JAX creates any array")
        devices = available[:devices]
    devices = list(devices)
    return devices if len(devices) > 1 else None


def spread_over_heads(attend: Callable, devices: list, heads: int, bias, mask) -> Callable:
    """`attend(q, k, v, bias, mask)` on chunked operands (heads on axis 2 `[n, B, N, c, H]`; bias/mask heads on
    axis 1 `[B, N or 1, T, S]`), run by `shard_map` with each device holding `heads / len(devices)` heads."""
    if heads % len(devices):
        raise ValueError(f"{heads} heads cannot be split evenly over {len(devices)} devices")
    chunks = PartitionSpec(None, None, AXIS)

    def operand(x):
        return None if x is None else PartitionSpec(None, AXIS) if x.shape[1] == heads else PartitionSpec()

    # check_vma=False: the loops' carries start as unsharded zeros, which the varying-axes check rejects.
    return jax.shard_map(attend, mesh=Mesh(np.array(devices), (AXIS,)), check_vma=False,
                         in_specs=(chunks, chunks, chunks, operand(bias), operand(mask)), out_specs=chunks)
