"""One benchmark point's record, and the dense-equivalent FLOP count its GFLOP/s figure uses."""

from __future__ import annotations

import dataclasses

from labkit.attention import Problem


@dataclasses.dataclass
class Measurement:
    """One benchmark point: its parameters, status (`ok`, `skipped`, `failed`) and numbers."""

    impl: str
    seq_len: int
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    causal: bool = False
    backward: bool = False
    options: dict = dataclasses.field(default_factory=dict)
    status: str = "ok"
    time_s: float | None = None
    times_s: list = dataclasses.field(default_factory=list)
    gflops: float | None = None
    peak_extra_mib: float | None = None  # the first call's high-water mark
    steady_extra_mib: float | None = None  # over all calls, the allocator's cache included
    need_mib: float | None = None
    available_mib: float | None = None
    memory_method: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the point ran and was measured."""
        return self.status == "ok"

    @property
    def problem(self) -> Problem:
        """The point's problem size, as the memory models take it."""
        return Problem(self.batch, self.seq_len, self.heads, self.head_dim, self.causal, self.backward)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Measurement":
        """Inverse of `to_dict` (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def attention_flops(problem: Problem) -> float:
    """FLOPs of one call: `4 b N T S H` forward (two matmuls), x2.5 with backward, halved when causal."""
    flops = 4.0 * problem.batch * problem.heads * problem.seq_len * problem.seq_len * problem.head_dim
    if problem.backward:
        flops *= 2.5
    if problem.causal:
        flops /= 2
    return flops
