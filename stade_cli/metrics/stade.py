"""STADE: S_ij = |W_ij| · std(X_j), the population standard deviation of input channel j.

std(X_j) = sqrt(sumsq_j/N − (sum_j/N)²), clamped at 0. Unlike Wanda's ‖X_j‖₂ it ignores the channel's
mean; that mean's contribution through the pruned weights is put back into the bias (bias
correction, on by default: b_i += Σ_j (W_ij − W'_ij) μ_j), so the layer's mean output is unchanged.
"""
from __future__ import annotations

import torch

from ..calibration.moments import Moments
from .base import LayerContext, scorer


@scorer("stade", "|W| · std(X), bias-corrected", corrects_bias=lambda ctx: True, order=30)
def score(weight: torch.Tensor, moments: Moments, ctx: LayerContext | None = None) -> torch.Tensor:
    # weight: [out, in]; std: [in]
    return weight.abs().mul_(moments.std.to(weight.device, weight.dtype))   # in place on the fresh |W|
