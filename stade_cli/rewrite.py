"""How an output checkpoint differs from its input beyond the values of pruned weights: the writer applies it.

Expert removal (``experts.py``) and structured pruning (``structured/``) describe their outputs as a ``Rewrite``:
tensors not written, tensors renamed (experts or blocks renumbered), tensors cut to some indices of their first
or second dimension (router rows, MLP channels), tensors computed anew from their old value (a refitted down
projection), new tensors written after a given one (a bias that takes a folded mean), and config entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .arch import Target


@dataclass(frozen=True)
class Added:
    """A new tensor, written right after ``after`` (in the same shard), in its dtype."""

    after: str
    shape: tuple
    value: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Rewrite:
    kind: str = ""                                                  # "experts", "channels", "blocks"; "" none
    drop: frozenset = frozenset()
    rename: Mapping[str, str] = field(default_factory=dict)
    rows: Mapping[str, tuple] = field(default_factory=dict)         # keep these indices of dim 0
    cols: Mapping[str, tuple] = field(default_factory=dict)         # keep these indices of dim 1
    compute: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)  # new from old
    shapes: Mapping[str, tuple] = field(default_factory=dict)       # the shape of each computed tensor
    add: Mapping[str, Added] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)         # dotted keys for nested configs
    facts: Mapping[str, Any] = field(default_factory=dict)          # what the report says of it

    def out_key(self, key: str) -> str | None:
        return None if key in self.drop else self.rename.get(key, key)

    def shape(self, key: str, shape: tuple) -> tuple:
        if key in self.shapes:
            return tuple(self.shapes[key])
        shape = tuple(shape)
        if key in self.rows:
            shape = (len(self.rows[key]), *shape[1:])
        if key in self.cols:
            shape = (shape[0], len(self.cols[key]), *shape[2:])
        return shape

    def value(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The output's tensor for input ``key``, from its input value."""
        if key in self.compute:
            return self.compute[key](tensor).contiguous()
        if key in self.rows:
            tensor = tensor[list(self.rows[key])]
        if key in self.cols:
            tensor = tensor[:, list(self.cols[key])]
        return tensor.contiguous()

    def changes(self, key: str) -> bool:
        return key in self.compute or key in self.rows or key in self.cols

    def keeps(self, t: Target) -> bool:
        """Whether target ``t`` is in the output (its expert, its block were not removed)."""
        if t.weight_key in self.drop:
            return False
        if t.index is not None and t.weight_key in self.rows:
            return t.index in self.rows[t.weight_key]
        return True

    def target_name(self, t: Target) -> str:
        """The name ``t`` has in the output (experts or blocks renumbered)."""
        if t.index is not None and t.weight_key in self.rows:
            key = self.rename.get(t.weight_key, t.weight_key)
            return f"{key}[{self.rows[t.weight_key].index(t.index)}]"
        new = self.rename.get(t.weight_key)
        return new[: -len(".weight")] if new is not None and new.endswith(".weight") else t.name

    def apply_config(self, config: dict) -> dict:
        for dotted, value in self.config.items():
            where = config
            *path, last = dotted.split(".")
            for p in path:
                where = where[p]
            where[last] = value
        return config
