"""Magnitude pruning: S_ij = |W_ij|. Needs no calibration."""
from __future__ import annotations

import torch

from . import LayerContext, register


@register("magnitude", needs_stats=False, summary="|W|")
def score(weight: torch.Tensor, moments=None, ctx: LayerContext | None = None) -> torch.Tensor:
    # weight: [out, in]
    return weight.abs()
