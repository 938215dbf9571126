"""Wanda (Sun et al., 2023): S_ij = |W_ij| · ‖X_j‖₂, the input channel's L2 norm over all calibration tokens."""
from __future__ import annotations

import torch

from ..calibration.moments import Moments
from .base import LayerContext, scorer


@scorer("wanda", "|W| · ‖X‖₂", order=20)
def score(weight: torch.Tensor, moments: Moments, ctx: LayerContext | None = None) -> torch.Tensor:
    # weight: [out, in]; norm: [in] → broadcast over rows
    return weight.abs().mul_(moments.norm.to(weight.device, weight.dtype))   # in place on the fresh |W|
