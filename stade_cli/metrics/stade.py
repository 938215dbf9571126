"""STADE: S_ij = |W_ij| · std(X_j), the population standard deviation of input channel j.

std(X_j) = sqrt(sumsq_j/N − (sum_j/N)²), clamped at 0. Unlike Wanda's ‖X_j‖₂, it ignores the channel's
mean, whose contribution a bias can carry instead.
"""
from __future__ import annotations

import torch

from ..calibration.moments import Moments
from . import register


@register("stade", needs_stats=True, summary="|W| · std(X)")
def score(weight: torch.Tensor, moments: Moments) -> torch.Tensor:
    # weight: [out, in]; std: [in]
    return weight.abs() * moments.std.to(weight.device, weight.dtype)
