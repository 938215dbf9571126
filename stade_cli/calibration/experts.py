"""Mixtures of experts at calibration time: each expert's inputs are the tokens its router sends to it.

Under transformers ≥ 5 a block's experts are one module with fused 3-D parameters (``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I], or transposed), called as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights
[T, k])``. ``ExpertCapture`` runs that call itself, expert by expert, from the interface's own description of the
module (``has_gate``, ``is_transposed``, ``has_bias``, ``_apply_gate``, ``act_fn``, ``has_post_expert_norm``), and
hands each expert's input and intermediate activation to a recorder: the same arithmetic as the library's eager
path, computed once. On its first call it also runs the module's own forward and refuses to go on if the two
disagree, so a family whose experts compute something else is never measured wrongly.

Under transformers 4.x the experts are plain linears: the ordinary linear hooks see exactly the routed tokens.

``ExpertStats`` are the per-expert routing statistics whole-expert removal ranks by: tokens routed, the sum of
the router weights they carried, and (REAP) the sum of router weight × ‖expert output‖₂.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError


@dataclass
class ExpertStats:
    """One block's routing statistics, float64 [E]; ``reap`` is None where it could not be measured."""

    count: torch.Tensor           # tokens routed to each expert
    gate: torch.Tensor | None     # Σ router weight over those tokens
    reap: torch.Tensor | None     # Σ router weight · ‖expert output‖₂ over those tokens

    @classmethod
    def zeros(cls, n: int, reap: bool = True) -> "ExpertStats":
        z = torch.zeros(n, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone() if reap else None)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.count, self.gate, self.reap) if t is not None]

    def to_tensors(self, block: int) -> dict[str, torch.Tensor]:
        """Their entries in the stats' moments file."""
        return {f"{EXPERTS_PREFIX}{block}.{k}": t.contiguous() for k, t in
                (("count", self.count), ("gate", self.gate), ("reap", self.reap)) if t is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], block: int) -> "ExpertStats | None":
        get = lambda k: tensors.get(f"{EXPERTS_PREFIX}{block}.{k}")   # noqa: E731
        count = get("count")
        if count is None:
            return None
        gate, reap = get("gate"), get("reap")
        return cls(count.double(), gate.double() if gate is not None else None,
                   reap.double() if reap is not None else None)


EXPERTS_PREFIX = "__experts__."     # keys of the routing statistics in the moments file: __experts__.BLOCK.count


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) from the call, whatever the parameters are named."""
    sig = inspect.signature(type(module).forward)
    bound = sig.bind(module, *args, **kwargs)
    values = [v for k, v in list(bound.arguments.items())[1:] if isinstance(v, torch.Tensor)]
    if len(values) < 3:
        raise ModelError(f"{type(module).__name__} is called without (hidden states, expert indices, router weights)",
                         "please report this model")
    return values[0], values[1], values[2]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ w if transposed else F.linear(x, w)
    return y + b if b is not None else y


def experts_forward(module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                    on_input: Callable | None = None, on_middle: Callable | None = None,
                    on_output: Callable | None = None) -> torch.Tensor:
    """The experts module's output, expert by expert; ``on_input(e, x)``, ``on_middle(e, h)`` and
    ``on_output(e, y, w)`` see each expert's routed tokens x [n, H], its intermediate activation h [n, I], its
    output y [n, H] and the router weights w [n] those tokens carry."""
    has_gate = bool(getattr(module, "has_gate", True))
    tr = bool(getattr(module, "is_transposed", False))
    has_bias = bool(getattr(module, "has_bias", False))
    up = module.gate_up_proj if has_gate else module.up_proj
    up_bias = (module.gate_up_proj_bias if has_gate else module.up_proj_bias) if has_bias else None
    down_bias = module.down_proj_bias if has_bias else None
    out = torch.zeros_like(hidden)
    for e in range(int(up.shape[0])):
        tokens, slot = torch.where(index == e)            # each token at most once per expert
        if tokens.numel() == 0:
            continue
        x = hidden[tokens]                                # [n, H]
        if on_input is not None:
            on_input(e, x)
        y = _linear(x, up[e], up_bias[e] if up_bias is not None else None, tr)
        h = module._apply_gate(y) if has_gate else module.act_fn(y)      # [n, I]
        if on_middle is not None:
            on_middle(e, h)
        y = _linear(h, module.down_proj[e], down_bias[e] if down_bias is not None else None, tr)
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        w = weights[tokens, slot]
        if on_output is not None:
            on_output(e, y, w)
        out.index_add_(0, tokens, (y * w[:, None].to(y.dtype)).to(out.dtype))
    return out


class ExpertCapture:
    """Replaces a fused experts module's forward while calibration runs (``remove`` puts it back)."""

    def __init__(self, module: nn.Module, stats: ExpertStats, on_input: Callable, on_middle: Callable,
                 check: bool = True):
        self.module, self.stats, self.check = module, stats, check
        self._had = "forward" in module.__dict__
        self._previous = module.__dict__.get("forward")
        self._on_input, self._on_middle = on_input, on_middle
        module.forward = self._forward

    def _on_output(self, e: int, y: torch.Tensor, w: torch.Tensor) -> None:
        s = self.stats
        s.count[e] += y.shape[0]
        s.gate[e] += float(w.double().sum())
        if s.reap is not None:
            s.reap[e] += float((w.double() * y.double().norm(dim=-1)).sum())

    def _forward(self, *args, **kwargs):
        hidden, index, weights = _bound(self.module, args, kwargs)
        ours = experts_forward(self.module, hidden, index, weights, self._on_input, self._on_middle, self._on_output)
        if self.check:
            self.check = False
            theirs = type(self.module).forward(self.module, *args, **kwargs)
            check_same(self.module, ours, theirs)
        return ours

    def remove(self) -> None:
        if self._had:
            self.module.forward = self._previous
        else:
            self.module.__dict__.pop("forward", None)


def check_same(module: nn.Module, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Refuse to calibrate a family whose experts compute something else than ``experts_forward``."""
    if isinstance(theirs, (tuple, list)):
        theirs = theirs[0]
    scale = float(theirs.detach().abs().max()) if theirs.numel() else 0.0
    tol = (1e-4 if theirs.dtype in (torch.float32, torch.float64) else 2e-2) * max(scale, 1e-6)
    diff = float((ours.detach().float() - theirs.detach().float()).abs().max()) if theirs.numel() else 0.0
    if ours.shape != theirs.shape or not diff <= tol:
        raise ModelError(f"stade's per-expert calibration does not reproduce {type(module).__name__}'s forward "
                         f"(largest difference {diff:.3g} against values up to {scale:.3g}); its experts' "
                         "statistics would be wrong", "please report this model")
