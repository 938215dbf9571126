"""The metric registry: name → Metric. One module per metric registers itself on import.

A metric declares which moments it needs and gives a pure ``score(weight, moments) -> scores``:
weight [out, in] float32, moments the layer's input Moments (or None when it needs none), scores
[out, in] where higher means keep.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..calibration.moments import Moments
from ..errors import UsageError

ScoreFn = Callable[[torch.Tensor, "Moments | None"], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    name: str
    score: ScoreFn
    needs_stats: bool      # False: no calibration at all (magnitude)
    summary: str


REGISTRY: dict[str, Metric] = {}


def register(name: str, needs_stats: bool, summary: str):
    def wrap(fn: ScoreFn) -> ScoreFn:
        REGISTRY[name] = Metric(name, fn, needs_stats, summary)
        return fn
    return wrap


def get_metric(name: str) -> Metric:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown metric '{name}'", f"choose one of {', '.join(sorted(REGISTRY))}") from None


from . import magnitude, stade, wanda  # noqa: E402,F401  (registration)
