"""ADMM weight reconstruction after any mask (Boža, "Fast and Effective Weight Update for Pruned Large Language
Models", 2024): ``--update admm``.

For one layer with dense weight W₀ [out, in], the prune mask M (True = zero it) and the Gram matrix
H = Σ x xᵀ of its input, the update solves, row by row,

    min_W  (W₀ − W) G (W₀ − W)ᵀ   subject to  W_ij = 0 where M_ij,     G = H + δ·I

which is ‖X W₀ᵀ − X Wᵀ‖² (the layer's output error on the calibration tokens) plus a pull δ‖W₀ − W‖² toward
the dense weights. It is convex with a fixed mask; ADMM splits W (unconstrained) from Z (masked):

    V ← (V₀ G + ρ (Z − U)) (G + ρI)⁻¹      Z ← (V + U) ⊙ ¬M      U ← U + V − Z

in coordinates where H has a unit diagonal (column j scaled by d_j = sqrt(H_jj); dead inputs, H_jj = 0,
get d_j = 1 and only the pull, so they keep their dense value). δ = ``admm_damp`` · mean(diag), ρ =
``admm_rho``: one factorisation of G + ρI per distinct input (q/k/v and gate/up share it), then one matrix
product per iteration. The answer is Z: zeros exactly where M says. A row whose answer is worse than plain
masking (possible after very few iterations) keeps the plain masked row, so the error never exceeds masking's.

``--admm-gradual``: the mask is re-chosen over the first ``admm_gradual_steps`` iterations from the metric's
own scores of the current weights (V + U), at sparsities rising on a cubic schedule, S·(1 − (1 − t/T)³), to
the pattern's target; under N:M only weights that N:M would prune are candidates, so it ends on the pattern.

With bias correction the fit is done on the centred Gram H − N μμᵀ and the bias absorbs the mean: that is the
exact least-squares optimum of weights and bias together (the bias change is (W₀ − W) μ, as for STADE).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..masks import NM, Unstructured
from ..runtime import PRODUCTS
from ..runtime import product_dtype as _product_dtype
from .base import LayerContext, LayerStats, MethodError, update


@dataclass(frozen=True)
class Options:
    admm_iterations: int = field(default=20, metadata={"help": "admm: iterations per layer."})
    admm_rho: float = field(default=1.0, metadata={"help": "admm: penalty ρ (Gram scaled to a unit diagonal)."})
    admm_damp: float = field(default=0.1, metadata={
        "help": "admm: dampening, × mean(diag H): a pull toward the dense weights."})
    admm_gradual: bool = field(default=False, metadata={
        "help": "admm: re-choose the mask while iterating (cubic schedule)."})
    admm_gradual_steps: int = field(default=15, metadata={
        "help": "admm: iterations that re-choose the mask."})
    admm_precision: str = field(default="auto", metadata={
        "help": "admm: auto | float32 | bfloat16 products (auto: bfloat16 on CUDA, AMX or AVX512-BF16)."})




def product_dtype(options: Options, device: torch.device) -> torch.dtype:
    return _product_dtype(options.admm_precision, device)


def validate(options: Options, pattern=None) -> None:
    if options.admm_iterations < 1:
        raise MethodError(f"{{admm_iterations}} must be at least 1 (got {options.admm_iterations})")
    if not (options.admm_rho > 0 and math.isfinite(options.admm_rho)):
        raise MethodError(f"{{admm_rho}} must be positive (got {options.admm_rho})")
    if not (options.admm_damp >= 0 and math.isfinite(options.admm_damp)):
        raise MethodError(f"{{admm_damp}} must be non-negative (got {options.admm_damp})")
    if options.admm_gradual and not 1 <= options.admm_gradual_steps <= options.admm_iterations:
        raise MethodError(f"{{admm_gradual_steps}} must be between 1 and {{admm_iterations}} "
                          f"(got {options.admm_gradual_steps} of {options.admm_iterations})")
    if options.admm_precision not in PRODUCTS:
        raise MethodError(f"{{admm_precision}} must be auto, float32 or bfloat16 (got {options.admm_precision!r})")


@dataclass(frozen=True)
class Factor:
    """What one input's Gram gives every layer that reads it: the scale d, G = Hn + δI and ρ(G + ρI)⁻¹."""

    scale: torch.Tensor      # [in] d_j (1 for dead inputs)
    g: torch.Tensor          # [in, in] normalised Gram plus dampening
    step: torch.Tensor       # [in, in] ρ(G + ρI)⁻¹, in the iterations' product precision


def factor(gram: torch.Tensor, options: Options, device: torch.device | None = None,
           mean: torch.Tensor | None = None, count: int = 0, dtype: torch.dtype = torch.float32,
           products: torch.dtype | None = None) -> Factor:
    """The factorisation for a Gram matrix H (centred as H − count·μμᵀ when ``mean`` is given): centred and
    normalised in float64 (the centring cancels), factorised in ``dtype`` (the iterations' precision); the step
    matrix is kept in ``products`` (default ``dtype``)."""
    # in place on one float64 copy (at most one more matrix at a time: 4096 wide, 0.13 GB each; 28672, 6.6 GB), with
    # the same operations, so the same values, as the plain expressions in the comments
    device = device or gram.device
    h = gram.to(device, torch.float64, copy=True)
    if mean is not None:
        mu = mean.to(device, torch.float64)
        h.sub_(torch.outer(mu, mu).mul_(count))                       # H − count·μμᵀ
    diag = torch.diagonal(h).clamp(min=0)
    live = diag > diag.max() * 1e-12 if diag.numel() and diag.max() > 0 else torch.zeros_like(diag, dtype=torch.bool)
    scale = torch.where(live, diag.sqrt(), torch.ones_like(diag))
    hn = h.div_(torch.outer(scale, scale))                            # Hn = H / (d dᵀ)
    hn[~live, :] = 0
    hn[:, ~live] = 0
    hn.diagonal().add_(options.admm_damp * float(torch.diagonal(hn).mean()))    # G = Hn + δI
    g = hn.to(dtype)
    del h, hn
    # G + ρI has a diagonal ≥ ρ and eigenvalues ≥ ρ: well conditioned, so it is factorised in ``dtype``
    system = g.clone()
    system.diagonal().add_(options.admm_rho)
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(system))
    except torch.linalg.LinAlgError:  # pragma: no cover - ρ > 0 makes it positive definite
        raise MethodError("the Gram matrix could not be factorised", "raise {admm_rho}") from None
    del system
    step = inverse.mul_(options.admm_rho).to(products or dtype)       # ρ(G + ρI)⁻¹
    return Factor(scale.to(dtype), g, step)


def schedule(step: int, steps: int, sparsity: float) -> float:
    """The gradual mask's sparsity after iteration ``step`` (0-based) of ``steps``: S·(1 − (1 − (t+1)/T)³)."""
    if step >= steps - 1:
        return sparsity
    return sparsity * (1 - (1 - (step + 1) / steps) ** 3)


def gradual_mask(scores: torch.Tensor, pattern, sparsity: float) -> torch.Tensor:
    """The prune mask at ``sparsity`` (≤ the pattern's): under N:M, the lowest-scored of the weights N:M prunes."""
    if isinstance(pattern, NM):
        candidates = pattern.mask(scores)
        if sparsity >= pattern.target_sparsity:
            return candidates
        return Unstructured(sparsity, "row").mask(torch.where(candidates, scores, torch.inf))
    return pattern.with_sparsity(sparsity).mask(scores)


def reconstruct(weight: torch.Tensor, mask: torch.Tensor, f: Factor, iterations: int,
                score: Callable[[torch.Tensor], torch.Tensor] | None = None, pattern=None,
                gradual_steps: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight [out, in] float32 with zeros exactly where the final mask is, the final mask).

    ``weight`` the dense W₀, ``mask`` True = prune. With ``gradual_steps`` > 0 the mask is re-chosen from
    ``score`` (original coordinates) over those iterations, ending at ``pattern``'s sparsity.
    """
    d = f.scale.to(weight.device)
    v0 = weight.to(f.g.dtype) * d                         # normalised coordinates: H has a unit diagonal
    step_dtype = f.step.dtype                     # ρ(G + ρI)⁻¹; and G(G + ρI)⁻¹ = I − ρ(G + ρI)⁻¹, so
    keep = ~mask
    if gradual_steps:
        z, u = v0.clone(), torch.zeros_like(v0)
        target = pattern.target_sparsity
    else:
        z, u = v0 * keep, torch.zeros_like(v0)
    for step in range(iterations):
        # (V₀G + ρ(Z − U))(G + ρI)⁻¹: one product an iteration (in bfloat16 only the correction is rounded)
        v = v0 + ((z - u - v0).to(step_dtype) @ f.step).to(v0.dtype)
        if gradual_steps and step < gradual_steps:
            keep = ~gradual_mask(score((v + u) / d), pattern, schedule(step, gradual_steps, target))
        z = (v + u) * keep
        u = u + v - z
    # keep z only where it beats plain masking p: with a = v₀ − p and b = p − z, err(z) − err(p) = b·G(2a + b)
    plain = v0 * keep
    b = plain - z
    worse = ((b @ f.g) * (2 * (v0 - plain) + b)).sum(1) > 0
    z = torch.where(worse[:, None], plain, z)
    return z / d, ~keep


@update("admm", "ADMM reconstruction of the kept weights from the Gram matrix, after any mask (Boža)",
        options=Options, validate=validate, needs_gram=True, order=100, needs_scores=lambda o: o.admm_gradual)
def admm(weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats, pattern, ctx: LayerContext,
         score: Callable[[torch.Tensor], torch.Tensor] | None = None, centred: bool = False,
         cache=None, key=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache.shared(key, compute)`` (decide.Factorisations) shares one factorisation between the layers
    reading the input ``key``."""
    opts = ctx.options
    if opts.admm_gradual and score is None:
        raise MethodError("--admm-gradual re-chooses the mask from the metric's scores, and this method has none",
                          "use a scoring metric (magnitude, wanda, stade, stadew, ria, stochria)")
    def compute() -> Factor:
        return factor(stats.gram, opts, weight.device, stats.moments.mean if centred else None,
                      stats.moments.count if centred else 0, products=product_dtype(opts, weight.device))

    f = cache.shared((key, centred), compute) if cache is not None and key is not None else compute()
    return reconstruct(weight, mask, f, opts.admm_iterations, score, pattern,
                       opts.admm_gradual_steps if opts.admm_gradual else 0)
