"""Stochastic RIA (Symmetric Pruning, Yi & Richtárik, arXiv 2501.18980): RIA whose row and column sums of
|W| are estimated from a random subset of each row's / column's entries.

Estimator implemented here, with β = stoch_beta (default 0.1):
- for every row i, draw m_r = max(1, ceil(β · in)) distinct column indices S_i uniformly at random
  (without replacement, independently per row); for every column j, draw m_c = max(1, ceil(β · out))
  distinct row indices T_j likewise;
- row_sum_i ≈ (in / m_r) · Σ_{k∈S_i} |W_ik| and col_sum_j ≈ (out / m_c) · Σ_{k∈T_j} |W_kj|
  (the unbiased, 1/β-rescaled subset sums, so that β = 1 gives RIA exactly);
- S_ij = (|W_ij| / col_sum_j + |W_ij| / row_sum_i) · (‖X_j‖₂)^a, as in RIA.
The draws come from a generator seeded with the run's seed and the layer's name, so a run is reproducible.
The paper's text was not available to check the rescaling; with equal-size subsets per row (and
per column) rescaling by the subset size or not changes no ranking within a row, but it does set
the balance between the row and column terms, so we keep the unbiased form.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from ..calibration.moments import Moments
from . import ria
from .base import LayerContext, MethodError, scorer
from .ria import relative_importance


@dataclass(frozen=True)
class Options(ria.Options):
    stoch_beta: float = field(default=0.1, metadata={"help": "stochria: fraction of each row/column sampled for its sum."})
    seed: int = 0                    # the run's seed


def validate(options: Options, pattern=None) -> None:
    ria.validate(options, pattern)
    if not 0 < options.stoch_beta <= 1:
        raise MethodError(f"{{stoch_beta}} must be in (0, 1] (got {options.stoch_beta})")


def subset_sums(absw: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """For each row of absw [rows, n]: (n/m) · the sum of m distinct entries drawn uniformly at random."""
    rows, n = absw.shape
    keys = torch.rand(rows, n, generator=generator).to(absw.device)
    picks = keys.topk(m, dim=1).indices                       # m distinct random columns per row
    return absw.gather(1, picks).sum(1) * (n / m)


@scorer("stochria", "RIA with sampled row/column sums", options=Options, validate=validate, order=60)
def score(weight: torch.Tensor, moments: Moments, ctx: LayerContext) -> torch.Tensor:
    beta = ctx.options.stoch_beta
    out_f, in_f = weight.shape
    g = torch.Generator().manual_seed((ctx.options.seed * 1_000_003 + zlib.crc32(ctx.name.encode())) % 2**63)
    absw = weight.abs()
    row_sum = subset_sums(absw, max(1, math.ceil(beta * in_f)), g)         # [out]
    col_sum = subset_sums(absw.t(), max(1, math.ceil(beta * out_f)), g)    # [in]
    act = moments.norm.to(weight.device, weight.dtype).pow(ctx.options.ria_alpha)
    return relative_importance(absw, col_sum, row_sum).mul_(act)
