"""Block sizes of exact chunked attention chosen per machine: a small JSON cache written by `labkit bench --tune`.

The fastest `(query_chunk_size, key_chunk_size)` depends on the CPU (cache sizes, vector width): 512 x 512 was the
fastest on the course's AMD EPYC, 1024 x 1024 on a Xeon with AVX-512. `python -m labkit bench --tune` measures a
few candidates and records the winner per CPU model and shape class (head dim, and the sequence length rounded
to a power of two) in `$LABKIT_CACHE_DIR/chunk_sizes.json` (default `~/.cache/labkit/`, or under
`$XDG_CACHE_HOME`). `memory_efficient_attention` reads it when the caller gives no chunk sizes; with no entry
for this CPU and head dim it uses its defaults. Only reading lives here, so `labkit.attention` stays free of
the benchmark; the file is plain JSON, `{"<cpu> | dim <H> | seq <2^k>": [query_chunk, key_chunk], ...}`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

from labkit.machine import cpu_model

FILE_NAME = "chunk_sizes.json"


def cache_dir() -> Path:
    """Where labkit keeps per-machine choices: `$LABKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/labkit`, else ~/.cache."""
    if os.environ.get("LABKIT_CACHE_DIR"):
        return Path(os.environ["LABKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "labkit"


def seq_class(seq_len: int) -> int:
    """The power of two nearest to `seq_len` (in log scale): lengths that share tuned block sizes."""
    return 2 ** max(0, round(math.log2(max(seq_len, 1))))


def entry_name(cpu: str, head_dim: int, seq_len: int) -> str:
    """The cache key of one shape class on one CPU."""
    return f"{cpu} | dim {head_dim} | seq {seq_class(seq_len)}"


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int) -> dict:
    """The cache's entries (re-read only when the file changes: the mtime is part of the memo key)."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def read_cache(path: Path | None = None) -> dict:
    """All cached entries, `{}` when there is no readable cache."""
    path = Path(path) if path is not None else cache_dir() / FILE_NAME
    try:
        return _read(str(path), path.stat().st_mtime_ns)
    except OSError:
        return {}


def write_entries(entries: dict, path: Path | None = None) -> Path:
    """Merge `{entry_name: [query_chunk, key_chunk]}` into the cache file; returns its path."""
    path = Path(path) if path is not None else cache_dir() / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**read_cache(path), **{k: [int(a), int(b)] for k, (a, b) in entries.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, never half of one
    return path


def tuned_chunk_sizes(q_len: int, kv_len: int, head_dim: int) -> tuple[int, int] | None:
    """Cached `(query_chunk, key_chunk)` for this CPU and head dim at the nearest tuned length, or None."""
    prefix = f"{cpu_model()} | dim {head_dim} | seq "
    tuned = {}
    for name, sizes in read_cache().items():
        if name.startswith(prefix) and name[len(prefix):].isdigit() and isinstance(sizes, list) and len(sizes) == 2:
            tuned[int(name[len(prefix):])] = sizes
    if not tuned:
        return None
    target = math.log2(seq_class(max(q_len, kv_len)))
    nearest = min(tuned, key=lambda n: (abs(math.log2(n) - target), n))
    qc, kc = tuned[nearest]
    return int(qc), int(kc)
