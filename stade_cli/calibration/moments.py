"""Streaming first and second moments of a linear layer's input channels, in float64.

For input channel j over all N calibration tokens: count = N, sum_j = Σ x_j, sumsq_j = Σ x_j².
Nothing per token is stored; two Moments of the same layer merge by addition.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    count: int
    sum: torch.Tensor     # [in] float64
    sumsq: torch.Tensor   # [in] float64

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str = "cpu") -> "Moments":
        z = torch.zeros(dim, dtype=torch.float64, device=device)
        return cls(0, z, z.clone())

    @classmethod
    def of(cls, x: torch.Tensor) -> "Moments":
        """Moments of a batch of activations x: [..., in]."""
        m = cls.zeros(x.shape[-1], x.device)
        m.update(x)
        return m

    def update(self, x: torch.Tensor) -> None:
        """Add activations x: [..., in]. Squares in float32 (no overflow even near float16's 65504), sums in float64."""
        x = x.detach().reshape(-1, x.shape[-1])
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()                                       # half types upcast: x² ≤ 65504² fits easily
        self.count += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)               # reductions accumulate in float64
        self.sumsq += x.square().sum(0, dtype=torch.float64)

    def merge(self, other: "Moments") -> "Moments":
        return Moments(self.count + other.count, self.sum + other.sum.to(self.sum.device),
                       self.sumsq + other.sumsq.to(self.sumsq.device))

    def to(self, device) -> "Moments":
        return Moments(self.count, self.sum.to(device), self.sumsq.to(device))

    @property
    def mean(self) -> torch.Tensor:
        """μ_j"""
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Population variance σ_j² = sumsq_j/N − μ_j², clamped at 0 (rounding can make it slightly negative)."""
        return (self.sumsq / max(self.count, 1) - self.mean.square()).clamp_min(0)

    @property
    def std(self) -> torch.Tensor:
        """σ_j"""
        return self.var.sqrt()

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ = sqrt(sumsq_j)"""
        return self.sumsq.sqrt()


def block_distance(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(Σ over tokens of 1 − cos(x_t, y_t), tokens): how much a block changes its input (ShortGPT)."""
    cos = torch.nn.functional.cosine_similarity(x.double().reshape(-1, x.shape[-1]),
                                                y.double().reshape(-1, y.shape[-1]), dim=-1)
    return float((1 - cos).sum()), cos.numel()
