"""Token-by-token decoding with a recurrent attention state, shared by the linear families and LEAP.

`lax.scan` runs the steps inside one compiled program, so memory does not grow with the number of steps:
the carry is the attention state (constant size) and the current input.
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def decode(step: Callable, project: Callable, readout: Callable, first_input, num_steps: int, state: Any):
    """Run `num_steps` of `state, out = step(state, *project(x))`, `x = readout(x, out)`.

    Returns `(final_state, inputs, outputs)`: `inputs` stacks `x_0 .. x_{num_steps-1}` on a new leading time
    axis and `outputs` the attention outputs `[num_steps, batch..., N, Hv]`; `readout(inputs[-1],
    outputs[-1])` is the next input.
    """
    def one(carry, _):
        st, x = carry
        st, out = step(st, *project(x))
        return (st, readout(x, out)), (x, out)

    (final_state, _), (inputs, outputs) = jax.lax.scan(one, (state, first_input), None, length=num_steps)
    return final_state, inputs, outputs
