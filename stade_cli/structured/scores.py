"""Pure math of structured pruning: which MLP channels matter, what removing them costs, and how to compensate.

An MLP computes y = W h with h = act(gate x) ⊙ (up x) [I channels], W = down [H, I]. Removing channel j drops
column W_:,j and rows j of gate and up. On the calibration tokens the error it adds is
    E‖W_:,j h_j‖² = ‖W_:,j‖² · E[h_j²]                          with nothing to compensate,
    E‖W_:,j (h_j − μ_j)‖² = ‖W_:,j‖² · Var(h_j)                   when W_:,j μ_j goes into the bias,
which are the squares of the channel scores below (Wanda-sp; STADE's variance score, as FLAP's fluctuation).
(How much a whole block changes its input, for --structure blocks, is measured during calibration:
``calibration.moments.block_distance``.) Removing a set R at once adds the cross terms too; the refit minimises
the whole error over the kept columns K:
    W'_K = W Σ_{:,K} (Σ_{K,K} + δ I)⁻¹,   Σ = E[h hᵀ] (or the covariance C, with the bias taking W μ − W'_K μ_K).
"""
from __future__ import annotations

import torch

from ..calibration.moments import Moments
from ..errors import UsageError

CHANNEL_SCORES = ("magnitude", "wanda", "stade")


def channel_scores(how: str, down: torch.Tensor, moments: Moments | None) -> torch.Tensor:
    """float64 [I], higher = keep: ‖W_:,j‖ (magnitude), ‖h_j‖₂ · ‖W_:,j‖ (wanda), σ_j · ‖W_:,j‖ (stade)."""
    norm = down.double().norm(dim=0)                                    # [I]
    if how == "magnitude":
        return norm
    if moments is None:
        raise UsageError(f"{how} needs the activation statistics of the down projection's input")
    m = moments.to(down.device)
    if how == "wanda":
        return norm * m.norm
    if how == "stade":
        return norm * m.std
    raise UsageError(f"{how} has no channel score", f"use one of {', '.join(CHANNEL_SCORES)}")


def folds(bias_correction: bool | None, score: str) -> bool:
    """Whether the removed channels' mean goes into the down projection's bias: as ``--bias-correction`` says; by
    default with the stade score, which ranks the channels by what the bias cannot take (their variance)."""
    return bias_correction is True or (bias_correction is None and score == "stade")


def removal_error(down: torch.Tensor, moments: Moments, folded: bool) -> torch.Tensor:
    """float64 [I]: the mean squared error added to y by removing each channel alone (per token)."""
    second = moments.var if folded else moments.sumsq / max(moments.count, 1)
    return down.double().square().sum(0) * second.to(down.device)


def lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The n lowest-scored indices (ties: the lower index first), sorted."""
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return torch.tensor(sorted(order[:n]), dtype=torch.long)


def kept_after(width: int, removed: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(width, dtype=torch.bool)
    keep[removed] = False
    return torch.nonzero(keep).squeeze(1)


def folded_bias(down: torch.Tensor, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """float64 [H]: what the removed channels added on average, W_:,R μ_R (goes into the bias)."""
    return down.double()[:, removed] @ mean.double().to(down.device)[removed]


def refit(down: torch.Tensor, kept: torch.Tensor, gram: torch.Tensor, moments: Moments, centred: bool,
          damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W'_K [H, |K|] float64, the bias change float64 [H] or None): the least-squares refit of the kept columns on
    the calibration tokens, on the covariance when ``centred`` (then the bias takes W μ − W'_K μ_K).

    ``damp`` adds δ = damp · mean(diag) to the kept block's diagonal (dead or duplicate channels stay solvable)."""
    n = max(moments.count, 1)
    mean = moments.mean.double().to(down.device)
    sigma = gram.double().to(down.device) / n
    if centred:
        sigma = sigma - torch.outer(mean, mean)
    w = down.double()
    block = sigma[kept][:, kept]
    block = block + damp * float(block.diagonal().mean().clamp_min(1e-12)) * torch.eye(len(kept), dtype=block.dtype,
                                                                                         device=block.device)
    rhs = w @ sigma[:, kept]                                            # [H, |K|]
    new = torch.linalg.solve(block, rhs.T).T                          # W Σ_{:,K} (Σ_KK + δI)⁻¹ (Σ_KK symmetric)
    delta = (w @ mean - new @ mean[kept]) if centred else None
    return new, delta
