"""SparseGPT (Frantar & Alistarh, 2023): prune with an OBS weight update that feeds each pruned weight's
error back into the not-yet-processed columns.

With H = 2/N · Σ x xᵀ over the N calibration tokens of the layer's input:
- dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0;
- dampening: H += percdamp · mean(diag H) · I (percdamp, default 0.01);
- U = the upper Cholesky factor of H⁻¹ (computed once per layer, on the device);
- columns are processed in blocks of blocksize (default 128). Unstructured: the block's mask zeros
  the floor(S · rows · cols) entries with the lowest w² / U_jj² over all rows × the block's columns;
  N:M: per row, in every M columns, the M−N lowest. Column by column: q = w with the mask applied,
  err = (w − q) / U_jj, and the block's remaining columns get −err · U_j,j: ; after the block, the
  remaining columns get −Err · U_block,rest (lazy batch update).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..masks import NM, lowest_k
from .base import LayerContext, LayerStats, MethodError, solver


@dataclass(frozen=True)
class Options:
    percdamp: float = field(default=0.01, metadata={"help": "sparsegpt: dampening, a fraction of mean(diag H)."})
    blocksize: int = field(default=128, metadata={"help": "sparsegpt: columns per lazy-update block."})


def validate(options: Options, pattern=None) -> None:
    """Ranges always; with the ``pattern`` it will run under, that its blocks hold whole N:M groups."""
    if not options.percdamp >= 0:
        raise MethodError(f"{{percdamp}} must be non-negative (got {options.percdamp})")
    if options.blocksize < 1:
        raise MethodError(f"{{blocksize}} must be at least 1 (got {options.blocksize})")
    if isinstance(pattern, NM) and options.blocksize % pattern.m:
        raise MethodError(f"{{blocksize}} {options.blocksize} must be a multiple of M = {pattern.m} for {pattern.name}")


def inverse_hessian_factor(gram: torch.Tensor, count: int, percdamp: float, device: torch.device,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (2/N·H + damp·I)⁻¹ with dead inputs fixed, dead [in] bool."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    h = gram.to(device, dtype) * (2.0 / max(count, 1))
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(h.shape[0], dtype=dtype, device=device)
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError:
        raise MethodError("the Gram matrix is not positive definite even after dampening",
                          "raise {percdamp} (e.g. 0.1) or calibrate on more tokens") from None
    u = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    return u.float(), dead


@solver("sparsegpt", "OBS update from the Gram matrix (Frantar & Alistarh)", options=Options, validate=validate,
        needs_gram=True, order=70)
def solve(weight: torch.Tensor, stats: LayerStats, pattern, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    opts = ctx.options
    w = weight.clone().float()                                      # [out, in]
    rows, cols = w.shape
    u, dead = inverse_hessian_factor(stats.gram, stats.moments.count, opts.percdamp, w.device)
    w[:, dead] = 0
    nm = pattern if isinstance(pattern, NM) else None
    validate(opts, pattern)
    bs = opts.blocksize
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        w1 = w[:, i1:i2].clone()                                    # [out, b]
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]                                        # [b, b]
        d1 = torch.diag(u1)                                         # [b]
        if nm is None:
            saliency = w1.square() / d1.square()
            mask1 = lowest_k(saliency.reshape(1, -1), math.floor(pattern.sparsity * saliency.numel())).view_as(w1)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            if nm is not None and i % nm.m == 0:
                saliency = w1[:, i:i + nm.m].square() / d1[i:i + nm.m].square()
                mask1[:, i:i + nm.m] = lowest_k(saliency, nm.m - nm.n)
            q = col.masked_fill(mask1[:, i], 0.0)                    # one kernel a column, no scalar allocated
            q1[:, i] = q
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w, mask | (w == 0) & dead[None, :]
