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
    """Options of the methods (the CLI's --ria-alpha, --stoch-beta, --seed, --percdamp, --dsnot-*, ...)."""

    ria_alpha: float = 0.5
    stoch_beta: float = 0.1
    seed: int = 0
    percdamp: float = 0.01          # SparseGPT: dampening, a fraction of mean(diag H)
    blocksize: int = 128            # SparseGPT: columns per lazy-update block
    init: str = "wanda"             # DSnoT: the metric giving the initial mask
    dsnot_pow: float = 1.0          # DSnoT: regrow by W_ij μ_j / σ_j^pow
    dsnot_threshold: float = 0.1    # DSnoT: stop once |e_i| is this small
    dsnot_cycles: int = 50          # DSnoT: at most this many swaps per row
    r2_gamma1: float = 0.5          # R²-DSnoT: weight of relative importance in the prune criterion
    r2_gamma2: float = 0.1          # R²-DSnoT: margin of the regularised decision boundary


@dataclass(frozen=True)
class LayerStats:
    """What the calibration measured at one layer's input."""

    moments: "Moments | None" = None
    gram: "torch.Tensor | None" = None     # H = Σ x xᵀ [in, in], for methods that need it


@dataclass(frozen=True)
class LayerContext:
    name: str = ""                 # module name, e.g. "model.layers.3.mlp.down_proj"
    reads_norm: bool = False       # its input is the output of a normalisation layer
    options: MethodOptions = field(default_factory=MethodOptions)


ScoreFn = Callable[[torch.Tensor, "Moments | None", LayerContext], torch.Tensor]
# A method that computes the pruned weight itself (SparseGPT's update, DSnoT's swaps):
# (weight [out, in] float32, stats, pattern, ctx) -> (new weight [out, in] float32, prune mask [out, in] bool)
SolveFn = Callable[[torch.Tensor, LayerStats, "object", LayerContext], "tuple[torch.Tensor, torch.Tensor]"]


def _never(ctx: LayerContext) -> bool:
    return False


@dataclass(frozen=True)
class Metric:
    name: str
    score: ScoreFn | None                               # None for methods that only solve
    needs_stats: bool                                   # False: no calibration at all (magnitude)
    summary: str
    corrects_bias: Callable[[LayerContext], bool] = _never
    solve: SolveFn | None = None                        # set: the method updates weights / refines masks
    needs_gram: bool = False
    needs_roles: bool = False                           # reads which linears read a norm's output (stadew)


REGISTRY: dict[str, Metric] = {}


def register(name: str, needs_stats: bool, summary: str, corrects_bias: Callable[[LayerContext], bool] = _never,
             needs_roles: bool = False):
    """Register a scoring metric: ``score(weight, moments, ctx) -> scores``."""
    def wrap(fn: ScoreFn) -> ScoreFn:
        REGISTRY[name] = Metric(name, fn, needs_stats, summary, corrects_bias, needs_roles=needs_roles)
        return fn
    return wrap


def register_solver(name: str, summary: str, needs_gram: bool = False):
    """Register a method that computes the pruned weight: ``solve(weight, stats, pattern, ctx) -> (weight, mask)``."""
    def wrap(fn: SolveFn) -> SolveFn:
        REGISTRY[name] = Metric(name, None, True, summary, _never, solve=fn, needs_gram=needs_gram)
        return fn
    return wrap


def get_metric(name: str) -> Metric:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown metric '{name}'", f"choose one of {', '.join(sorted(REGISTRY))}") from None


from . import dsnot, magnitude, r2dsnot, ria, sparsegpt, stade, stadew, stochria, wanda  # noqa: E402,F401
