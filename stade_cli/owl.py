"""OWL, Outlier Weighted Layerwise sparsity: blocks with more outlier scores keep more of their weights.

For block l, D_l = the fraction of the Wanda scores |W_ij|·‖X_j‖₂ of its linears above m times their mean;
the block sparsities are S_l = S − (D̂_l − mean D̂) with D̂_l = 2λ (D_l − min D) / (max D − min D).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .arch import Architecture
from .checkpoint import ShardReader
from .calibration.store import Stats
from .errors import MethodError

def owl_outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """D = the fraction of all the scores that exceed m times their mean."""
    total = sum(float(s.sum(dtype=torch.float64)) for s in scores)
    count = sum(s.numel() for s in scores)
    threshold = m * total / count
    return sum(int((s > threshold).sum()) for s in scores) / count


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """S_l = S − (D̂_l − mean D̂), D̂_l = 2λ (D_l − min D) / (max D − min D).

    The mean is S and max − min = 2λ; each S_l lies within S ± 2λ (within S ± λ only when mean D̂ = λ,
    e.g. outlier ratios spread symmetrically). As in the OWL reference code.
    """
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [sparsity] * len(ratios)
    scaled = [2 * lam * (d - lo) / (hi - lo) for d in ratios]
    mean = sum(scaled) / len(scaled)
    return [sparsity - (d - mean) for d in scaled]


def owl_block_sparsity(src: Path, files: list[str], arch: Architecture, st: Stats, sparsity: float,
                       m: float, lam: float, device: torch.device, fallback=None) -> dict[int, float]:
    """OWL from the dense model's Wanda scores |W_ij|·‖X_j‖₂, block by block (``fallback``: experts' targets on
    fallback statistics, ``experts.fallbacks``). A block's scores are held until its last target is read, then
    reduced to its outlier ratio: one block's scores at a time, whichever shard holds which tensors."""
    from collections import Counter

    from .experts import TargetStats

    stats_of = TargetStats(arch, st.moments, fallback=fallback)
    by_key = arch.by_key()
    left = Counter(t.block for t in arch.targets.values())       # targets of each block not yet scored
    per_block: dict[int, list[torch.Tensor]] = {}
    ratio: dict[int, float] = {}
    for fname in files:
        with ShardReader(src / fname) as f:
            for key in (k for k in f.keys() if k in by_key):
                tensor = f.get_tensor(key)
                for t in by_key[key]:
                    w = t.matrix(tensor).to(device).float()
                    norm = stats_of(t).moments.norm
                    per_block.setdefault(t.block, []).append(w.abs() * norm.to(device, w.dtype))
                    left[t.block] -= 1
                    if not left[t.block]:
                        ratio[t.block] = owl_outlier_ratio(per_block.pop(t.block), m)
    ratio.update({b: owl_outlier_ratio(scores, m) for b, scores in per_block.items()})   # (none: all were read)
    blocks = sorted(ratio)
    out = dict(zip(blocks, owl_sparsities([ratio[b] for b in blocks], sparsity, lam)))
    bad = {b: s for b, s in out.items() if not 0 <= s < 1}
    if bad:
        b, s = next(iter(bad.items()))
        raise MethodError(f"OWL gives block {b} sparsity {s:.3f}, outside [0, 1) ({{sparsity}} {sparsity}, "
                          f"{{owl_lambda}} {lam}; the block sparsities span 2 × lambda)", "lower {owl_lambda}")
    return out
