"""How the bench scripts lay a synthetic checkpoint's tensors into shards, as the hub's sharded checkpoints do."""
from __future__ import annotations

import math


def split(tensors: list[tuple[str, tuple]], itemsize: int, limit: float) -> list[list[tuple[str, tuple]]]:
    """(name, shape) pairs in order, grouped into shards of at most ``limit`` bytes (a tensor larger than the limit
    gets a shard of its own)."""
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for key, dims in tensors:
        nbytes = math.prod(dims) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, dims))
        size += nbytes
    return shards
