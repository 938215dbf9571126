"""RIA, Relative Importance and Activations (Zhang et al., 2024):

    S_ij = (|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|) · (‖X_j‖₂)^a

the first sum over column j (all outputs reading input j), the second over row i; a = ria_alpha
(default 0.5). The reference scales ‖X_j‖₂ by a per-layer constant, which changes no ranking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..calibration.moments import Moments
from .base import LayerContext, MethodError, scorer


@dataclass(frozen=True)
class Options:
    ria_alpha: float = field(default=0.5, metadata={"help": "RIA: exponent a of the activation norm."})


def validate(options: Options, pattern=None) -> None:
    if not math.isfinite(options.ria_alpha):
        raise MethodError(f"{{ria_alpha}} must be a finite number (got {options.ria_alpha})")


def relative_importance(absw: torch.Tensor, col_sum: torch.Tensor, row_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij|/colsum_j + |W_ij|/rowsum_i, with empty sums (all-zero rows/columns) treated as 1."""
    # absw: [out, in]; col_sum: [in]; row_sum: [out]
    col = torch.where(col_sum > 0, col_sum, torch.ones_like(col_sum))
    row = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return (absw / col).add_(absw / row[:, None])


@scorer("ria", "(|W|/colsum + |W|/rowsum) · ‖X‖₂^a", options=Options, validate=validate, order=50)
def score(weight: torch.Tensor, moments: Moments, ctx: LayerContext) -> torch.Tensor:
    absw = weight.abs()
    act = moments.norm.to(weight.device, weight.dtype).pow(ctx.options.ria_alpha)
    return relative_importance(absw, absw.sum(0), absw.sum(1)).mul_(act)
