"""DSnoT, Dynamic Sparse No Training (Zhang et al., 2023): refine an initial mask, row by row, by swapping
a pruned weight back in for a kept one, so that the row's expected output error shrinks.

For row i with prune mask M (from init, default wanda), D_ij = W_ij μ_j and the expected error of the
row's output is e_i = Σ_{j pruned} D_ij. Each cycle (at most dsnot_cycles, default 50), vectorised
over rows:
- regrow r: among pruned, not yet swapped weights, the one with the largest sign(e_i) · D_ir / σ_r^p
  (p = dsnot_pow, default 1: it moves e toward 0 most, per unit of the channel's spread);
- prune p: among kept, not yet swapped weights whose D_ip has the opposite sign of e_i (unstructured), or
  among kept weights of r's own M-group (N:M), the one with the lowest Wanda score |W_ip| ‖X_p‖₂;
- the swap is accepted while |e_i| > dsnot_threshold (default 0.1) and the new error
  e_i + D_ip − D_ir keeps e_i's sign and is smaller in size; a row that rejects a swap stops.
Every row keeps its number of pruned weights (and N:M its groups) by construction.
Differences from the reference code, on purpose: every target linear is refined (the reference skips
the MLP); under N:M, where the pruned weight is not sign-constrained, a swap must also shrink |e_i|
(the reference can let it grow); its growth score divides by var^pow = σ^(2·pow) (dsnot_pow 2);
its mean x̄ is a per-sequence sum (seqlen × ours), so its threshold 0.1 corresponds to 0.1/seqlen here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..masks import NM
from .base import LayerContext, LayerStats, MethodError, get_metric, solver

REFINERS = ("dsnot", "r2dsnot")   # methods that start from another method's mask


@dataclass(frozen=True)
class Options:
    init: str = field(default="wanda", metadata={
        "help": "dsnot/r2dsnot: the method giving the initial mask (wanda, stade, sparsegpt, ...)."})
    dsnot_pow: float = field(default=1.0, metadata={"help": "dsnot: regrow by W·μ / σ^pow."})
    dsnot_threshold: float = field(default=0.1, metadata={
        "help": "dsnot: stop a row once its expected error |e| is this small."})
    dsnot_cycles: int = field(default=50, metadata={"help": "dsnot: at most this many swaps per row."})


def validate(options: Options, pattern=None) -> None:
    if options.dsnot_cycles < 0 or not options.dsnot_threshold >= 0:
        raise MethodError("{dsnot_cycles} and {dsnot_threshold} must be non-negative")
    if pattern is not None and options.init in REFINERS:   # it runs: its init must give a mask of its own
        raise MethodError(f"{{init}} {options.init} would refine itself; choose a scoring metric or sparsegpt")


def runs_with(options: Options) -> tuple[str, ...]:
    """The method whose mask DSnoT refines (none when init names a refiner: validate refuses that)."""
    return () if options.init in REFINERS else (options.init,)


def initial(weight: torch.Tensor, stats: LayerStats, pattern, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, mask) to start from: init's mask; a solver's updated kept weights, dense values elsewhere."""
    init = get_metric(ctx.options.init)
    if init.name in REFINERS:
        raise MethodError(f"{{init}} {init.name} would refine itself; choose a scoring metric or sparsegpt")
    if init.solve is not None:
        new, mask = init.solve(weight, stats, pattern, ctx)
        return torch.where(mask, weight, new), mask
    scores = init.score(weight, stats.moments if init.needs_stats else None, ctx)
    return weight, pattern.mask(scores)


def refine(w: torch.Tensor, mask: torch.Tensor, grow: torch.Tensor, keep_score: torch.Tensor, d: torch.Tensor,
           pattern, threshold: torch.Tensor | float, cycles: int) -> torch.Tensor:
    """The DSnoT swap loop. w, mask, grow (regrow priority), keep_score (prune the lowest), d = W·μ: [out, in]."""
    mask = mask.clone()
    rows = torch.arange(w.shape[0], device=w.device)
    e = (d * mask).sum(1)                                           # [out] expected error of each row
    sign = torch.sign(e)
    active = e.abs() > threshold
    touched = torch.zeros_like(mask)
    nm = pattern if isinstance(pattern, NM) else None
    neg_inf, pos_inf = float("-inf"), float("inf")
    cols = torch.arange(w.shape[1], device=w.device)
    for _ in range(cycles):
        if not bool(active.any()):
            break
        g = torch.where(mask & ~touched, grow * sign[:, None], neg_inf)
        r = g.argmax(1)
        ok = torch.isfinite(g[rows, r])
        if nm is None:
            candidates = ~mask & ~touched & (d * sign[:, None] < 0)
        else:
            start = (r // nm.m) * nm.m
            candidates = ~mask & ~touched & (cols[None, :] >= start[:, None]) & (cols[None, :] < start[:, None] + nm.m)
        s = torch.where(candidates, keep_score, pos_inf)
        p = s.argmin(1)
        ok &= torch.isfinite(s[rows, p])
        e_new = e + d[rows, p] - d[rows, r]
        accept = active & ok & (torch.sign(e_new) == sign) & (e_new.abs() < e.abs())
        idx = rows[accept]
        mask[idx, r[accept]] = False
        mask[idx, p[accept]] = True
        touched[idx, r[accept]] = True
        touched[idx, p[accept]] = True
        e = torch.where(accept, e_new, e)
        active = accept & (e.abs() > threshold)
    return mask


@dataclass
class Start:
    """What the DSnoT family starts from: weight values, initial mask, channel statistics, D and its growth score."""

    values: torch.Tensor    # [out, in]
    mask: torch.Tensor      # [out, in] True = pruned
    std: torch.Tensor       # [in]
    norm: torch.Tensor      # [in]
    d: torch.Tensor         # [out, in] W_ij μ_j
    grow: torch.Tensor      # [out, in] D_ij / σ_j^pow

    def finish(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.where(mask, torch.zeros((), device=self.values.device), self.values), mask


def start(weight: torch.Tensor, stats: LayerStats, pattern, ctx: LayerContext) -> Start:
    values, mask = initial(weight, stats, pattern, ctx)
    m = stats.moments
    mean, std, norm = (t.to(weight.device, torch.float32) for t in (m.mean, m.std, m.norm))
    d = values * mean
    return Start(values, mask, std, norm, d, d / std.clamp_min(1e-8).pow(ctx.options.dsnot_pow))


@solver("dsnot", "DSnoT mask refinement from init (Zhang et al.)", options=Options, validate=validate,
        runs_with=runs_with, order=80)
def solve(weight: torch.Tensor, stats: LayerStats, pattern, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    s = start(weight, stats, pattern, ctx)
    wanda = s.values.abs() * s.norm
    opts = ctx.options
    return s.finish(refine(s.values, s.mask, s.grow, wanda, s.d, pattern, opts.dsnot_threshold, opts.dsnot_cycles))
