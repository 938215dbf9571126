"""Magnitude pruning: S_ij = |W_ij|. Needs no calibration."""
from __future__ import annotations

import torch

from .base import LayerContext, scorer


@scorer("magnitude", "|W|", needs_stats=False, order=10)
def score(weight: torch.Tensor, moments=None, ctx: LayerContext | None = None) -> torch.Tensor:
    # weight: [out, in]
    return weight.abs()
