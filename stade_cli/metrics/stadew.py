"""STADE-W: STADE (with bias correction) where a layer's input is not a normalisation layer's output
(attention output and MLP down projections: Llama o_proj/down_proj, OPT out_proj/fc2), Wanda elsewhere
(q/k/v, gate/up, fc1).

Which linears read a norm's output is observed during calibration (the tensor a norm module returned
is the very tensor the linear receives) and recorded in the stats manifest.
"""
from __future__ import annotations

import torch

from ..calibration.moments import Moments
from .base import LayerContext, scorer
from .stade import score as stade_score
from .wanda import score as wanda_score


@scorer("stadew", "Wanda after norms, bias-corrected STADE elsewhere", corrects_bias=lambda ctx: not ctx.reads_norm,
        needs_roles=True, order=40)
def score(weight: torch.Tensor, moments: Moments, ctx: LayerContext) -> torch.Tensor:
    return (wanda_score if ctx.reads_norm else stade_score)(weight, moments, ctx)
