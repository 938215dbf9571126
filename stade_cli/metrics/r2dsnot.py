"""R²-DSnoT (Symmetric Pruning, Yi & Richtárik, arXiv 2501.18980): DSnoT with relative-importance
reweighting and a regularised decision boundary.

The paper's own definition (its Section 4 and Appendix D) could not be read from where this was built:
only its abstract and the peer reviews of its conference version were reachable. What those say of
R²-DSnoT, verbatim: "DSnoT with three additional improvements"; "incorporating relative importance,
regularizing, and taking the square root of the activation"; "extends DSnoT with a few heuristic terms
(relative importance, lₚ regularizer)"; hyperparameters "γ₁, γ₂, and the relative-importance scaling
factor"; the paper, quoted by a reviewer: "Applying relative reweighting during either the growing or
pruning phase improves performance significantly [...] However applying reweighting to both phases
simultaneously leads to substantial performance degradation"; "the regularization tradeoff has limited
impact". Our reading of those three terms (one phase reweighted, a γ-regularised stopping boundary, the
activation under a square root), not a verified transcription of the paper's formulas and defaults.
The rule implemented here, exactly:
- prune criterion (which kept weight leaves): a blend of Wanda and RIA, each normalised by its layer
  mean, c_ij = (1 − γ₁) · |W_ij| ‖X_j‖₂ / mean + γ₁ · RI_ij / mean with
  RI_ij = (|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|) · ‖X_j‖₂^½  (r2_gamma1, default 0.5);
- regrow criterion: DSnoT's, D_ij / σ_j^p with D_ij = W_ij μ_j (reweighting only the prune phase);
- decision boundary: a row keeps swapping while |e_i| > τ + γ₂ · s_i, where τ = dsnot_threshold and
  s_i = sqrt(Σ_j W_ij² σ_j²) is the standard deviation of the row's dense output (r2_gamma2, default
  0.1): rows whose output varies widely stop at a proportionally larger error, instead of one absolute
  threshold for every row of every layer; the sign rule and cycle limit are DSnoT's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import dsnot
from .base import LayerContext, LayerStats, solver
from .dsnot import refine, start
from .ria import relative_importance


@dataclass(frozen=True)
class Options(dsnot.Options):
    r2_gamma1: float = field(default=0.5, metadata={
        "help": "r2dsnot: weight of relative importance in the prune criterion."})
    r2_gamma2: float = field(default=0.1, metadata={
        "help": "r2dsnot: margin of the regularised decision boundary (× a row's output std)."})


@solver("r2dsnot", "R²-DSnoT: DSnoT with relative importance and a regularised boundary", options=Options,
        validate=dsnot.validate, runs_with=dsnot.runs_with, order=90)
def solve(weight: torch.Tensor, stats: LayerStats, pattern, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    opts = ctx.options
    s = start(weight, stats, pattern, ctx)
    absw = s.values.abs()
    wanda = absw * s.norm
    ri = relative_importance(absw, absw.sum(0), absw.sum(1)) * s.norm.sqrt()
    g1 = opts.r2_gamma1
    keep = (1 - g1) * wanda / wanda.mean().clamp_min(1e-30) + g1 * ri / ri.mean().clamp_min(1e-30)
    spread = (s.values.square() @ s.std.square()).sqrt()             # [out] std of each row's dense output
    threshold = opts.dsnot_threshold + opts.r2_gamma2 * spread
    return s.finish(refine(s.values, s.mask, s.grow, keep, s.d, pattern, threshold, opts.dsnot_cycles))
