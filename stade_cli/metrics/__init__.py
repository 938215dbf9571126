"""The metric registry: name → Metric. One module per metric registers itself on import.

A metric declares whether it needs calibration moments and gives a pure
``score(weight, moments, ctx) -> scores``: weight [out, in] float32, moments the layer's input Moments
(None when it needs none), ctx the layer's context (name, role, method options); scores [out, in],
higher means keep. ``corrects_bias(ctx)`` says whether, by default, the layer's removed mean
contribution is folded into its bias (STADE's bias correction).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..calibration.moments import Moments
from ..errors import UsageError


@dataclass(frozen=True)
class MethodOptions:
    """Options of the scoring methods (the CLI's --ria-alpha, --stoch-beta, --seed)."""

    ria_alpha: float = 0.5
    stoch_beta: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class LayerContext:
    name: str = ""                 # module name, e.g. "model.layers.3.mlp.down_proj"
    reads_norm: bool = False       # its input is the output of a normalisation layer
    options: MethodOptions = field(default_factory=MethodOptions)


ScoreFn = Callable[[torch.Tensor, "Moments | None", LayerContext], torch.Tensor]


def _never(ctx: LayerContext) -> bool:
    return False


@dataclass(frozen=True)
class Metric:
    name: str
    score: ScoreFn
    needs_stats: bool                                   # False: no calibration at all (magnitude)
    summary: str
    corrects_bias: Callable[[LayerContext], bool] = _never


REGISTRY: dict[str, Metric] = {}


def register(name: str, needs_stats: bool, summary: str, corrects_bias: Callable[[LayerContext], bool] = _never):
    def wrap(fn: ScoreFn) -> ScoreFn:
        REGISTRY[name] = Metric(name, fn, needs_stats, summary, corrects_bias)
        return fn
    return wrap


def get_metric(name: str) -> Metric:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown metric '{name}'", f"choose one of {', '.join(sorted(REGISTRY))}") from None


from . import magnitude, ria, stade, stadew, stochria, wanda  # noqa: E402,F401  (registration)
