"""Mixtures of experts at prune time: statistics for experts that saw too few tokens, and whole-expert removal.

Pure functions of the architecture (``arch.MoE``) and the calibration statistics; the methods never learn what
an expert is. Two things live here:

* **Fallbacks.** An expert that received fewer than ``min_tokens`` calibration tokens has unreliable moments.
  Its matrices that read the expert's input (gate, up) use the block's pooled input instead: the sum over its
  experts of what each received, every routed token once per expert that took it (the mean and the mean square
  are those of the block's input). Its matrices that read its own intermediate activation have nothing to pool
  with (channel j of one expert is not channel j of another): they use unit statistics (mean 0, ‖X_j‖ = σ_j =
  1, Gram = I), under which every method reduces to magnitude pruning and no update moves a kept weight.
* **Removal** (``--experts K``). In every block, the K experts with the highest score stay (ties: the lower
  index), the others go with their router rows: REAP, the mean over the tokens routed to expert j of router
  weight × ‖expert output‖₂ (Lasby et al. 2025); frequency, how many tokens the router sent to it; or random.
  ``Rewrite`` says which checkpoint tensors are dropped, renamed (per-expert keys renumbered 0..K−1) or cut
  along dim 0 (routers, fused expert tensors), and which config keys change.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from .arch import EXPERT_COUNT_KEYS, EXPERT_TOP_K_KEYS, Architecture, MoE, Target
from .calibration.experts import ExpertStats
from .calibration.moments import Moments
from .errors import StatsError, UsageError
from .rewrite import Rewrite

SCORES = ("reap", "frequency", "random")
POOLED, MAGNITUDE = "pooled", "magnitude"


# ------------------------------------------------------------------------------------------------ fallbacks
def starved(arch: Architecture, experts: Mapping[int, ExpertStats], min_tokens: int) -> dict[tuple[int, int], int]:
    """(block, expert) → tokens routed to it, for every expert below ``min_tokens`` (and any that saw none)."""
    out = {}
    for b, moe in arch.experts.items():
        if b not in experts:
            continue
        for e in range(moe.num_experts):
            n = int(experts[b].count[e])
            if n < max(min_tokens, 1) and any(name in arch.targets for name in moe.members(e)):
                out[(b, e)] = n
    return out


def fallbacks(arch: Architecture, experts: Mapping[int, ExpertStats], min_tokens: int) -> dict[str, str]:
    """target name → POOLED or MAGNITUDE for the targets of experts below ``min_tokens``."""
    out = {}
    for (b, e) in starved(arch, experts, min_tokens):
        moe = arch.experts[b]
        out.update({n: POOLED for n in moe.inputs[e] if n in arch.targets})
        out.update({n: MAGNITUDE for n in moe.middles[e] if n in arch.targets})
    return out


def unit_moments(width: int) -> Moments:
    """Statistics under which every scorer is magnitude: mean 0, ‖X_j‖₂ = σ_j = 1."""
    return Moments(1, torch.zeros(width, dtype=torch.float64), torch.ones(width, dtype=torch.float64))


def pooled_moments(moe: MoE, moments: Mapping[str, Moments]) -> Moments:
    """The block's pooled expert input: the sum of every expert's input moments."""
    leaders = _leaders(moe, moments)
    total = Moments.zeros(moments[leaders[0]].sum.numel())
    for name in leaders:
        total = total.merge(moments[name])
    return total


def _leaders(moe: MoE, moments: Mapping[str, Moments]) -> list[str]:
    """One measured target per expert input (the first of its gate/up that --only/--skip kept)."""
    return [n for n in (next((m for m in x if m in moments), None) for x in moe.inputs) if n is not None]


def pooled_gram(moe: MoE, gram_of, moments: Mapping[str, Moments]) -> torch.Tensor:
    """Σ over the experts of their input Gram matrices (``gram_of(name)`` reads one)."""
    total = None
    for name in _leaders(moe, moments):
        h = gram_of(name).double()
        total = h.clone() if total is None else total.add_(h)
    return total


def summary(arch: Architecture, experts: Mapping[int, ExpertStats], min_tokens: int,
            kept: Mapping[str, list[int]] | None = None) -> dict:
    """The report's account of the fallbacks: [block, expert, tokens] each, the expert numbered as in the output
    (``kept``: block → the input's experts kept by ``--experts``, which the output numbers 0, 1, ...)."""
    low = starved(arch, experts, min_tokens)
    chosen = fallbacks(arch, experts, min_tokens)
    if kept:
        low = {(b, kept[str(b)].index(e)): n for (b, e), n in low.items()}
    return {"min_tokens": min_tokens, "experts": [[b, e, n] for (b, e), n in sorted(low.items())],
            "targets": {"pooled": sum(v == POOLED for v in chosen.values()),
                        "magnitude": sum(v == MAGNITUDE for v in chosen.values())}}


# ------------------------------------------------------------------------------------------------ removal
def expert_scores(stats: ExpertStats, how: str, seed: int = 0, block: int = 0) -> torch.Tensor:
    """float64 [E], higher = keep."""
    count = stats.count.double()
    if how == "frequency":
        return count / max(float(count.sum()), 1.0)
    if how == "reap":
        if stats.reap is None:
            raise StatsError("these stats hold no router-weighted expert activations (REAP): they were made where "
                             "the experts are separate linears (transformers 4.x), which do not see the router weights",
                             "use --expert-score frequency, or calibrate with transformers 5")
        return torch.where(count > 0, stats.reap.double() / count.clamp_min(1), torch.zeros_like(count))
    if how == "random":
        g = torch.Generator().manual_seed(seed * 100003 + block)
        return torch.rand(count.numel(), generator=g, dtype=torch.float64)
    raise UsageError(f"--expert-score must be one of {', '.join(SCORES)} (got {how})")


def keep_top(scores: torch.Tensor, k: int) -> list[int]:
    """The indices of the ``k`` highest scores, ascending; ties go to the lower index."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def config_entries(config: dict, moes: list[MoE], k: int) -> dict[str, int]:
    """The config.json entries that say K experts and at most K per token (dotted keys for nested configs)."""
    n = {m.num_experts for m in moes}
    if len(n) != 1:
        raise UsageError(f"the MoE blocks have different numbers of experts ({sorted(n)}); --experts needs one")
    n = n.pop()
    out: dict[str, int] = {}
    for prefix, part in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(part, dict):
            continue
        for key in EXPERT_COUNT_KEYS:
            if part.get(key) == n:
                out[prefix + key] = k
        for key in EXPERT_TOP_K_KEYS:
            if isinstance(part.get(key), int) and part[key] > k:
                out[prefix + key] = k
        groups = part.get("n_group")
        if isinstance(groups, int) and groups > 1:          # DeepSeek: a group's score is its top two experts'
            chosen = part.get("topk_group") or groups
            top_k = min(part.get("num_experts_per_tok") or 1, k)
            if k % groups or k // groups < 2 or chosen * (k // groups) < top_k:
                raise UsageError(f"this model routes within {groups} groups of experts (a group scored by its best "
                                 f"two, {chosen} groups chosen per token): --experts must be a multiple of {groups}, "
                                 f"at least {2 * groups}, with {chosen} groups holding the {top_k} experts a token "
                                 f"uses (got {k})")
    if not any(key.rsplit(".", 1)[-1] in EXPERT_COUNT_KEYS for key in out):
        raise UsageError(f"the config says nowhere that there are {n} experts ({', '.join(EXPERT_COUNT_KEYS)}); "
                         "stade cannot write a config with fewer")
    return out


def check_removal(arch: Architecture, k: int) -> None:
    """What --experts K needs from the model, checked before any work."""
    if not arch.experts:
        raise UsageError("--experts removes experts of a mixture-of-experts model, and this model has none")
    for b, moe in arch.experts.items():
        if not 1 <= k <= moe.num_experts:
            raise UsageError(f"--experts must be between 1 and {moe.num_experts} (got {k})")
        if not moe.router:
            raise UsageError(f"cannot find the router of block {b}'s experts in the checkpoint, whose rows must go "
                             "with the experts", "please report this model")
        if not moe.prefix and not moe.fused:
            raise UsageError(f"cannot tell how block {b}'s experts are stored", "please report this model")


def plan_removal(arch: Architecture, keys: Mapping[str, tuple], config: dict, experts: Mapping[int, ExpertStats],
                 k: int, how: str, seed: int = 0) -> Rewrite:
    """Which experts stay in every block, and the rewrite of the checkpoint that removes the others.

    ``keys``: every checkpoint tensor's shape by key (``checkpoint.tensor_shapes``)."""
    check_removal(arch, k)
    drop: set[str] = set()
    rename: dict[str, str] = {}
    rows: dict[str, tuple] = {}
    kept_by: dict[int, tuple] = {}
    removed_by: dict[int, tuple] = {}
    for b, moe in sorted(arch.experts.items()):
        if b not in experts:
            raise StatsError(f"the stats hold no routing statistics for block {b}'s experts",
                             "re-run `stade calibrate` with this version")
        kept = keep_top(expert_scores(experts[b], how, seed, b), k)
        kept_by[b] = tuple(kept)
        removed_by[b] = tuple(e for e in range(moe.num_experts) if e not in kept)
        for key in (*moe.router, *moe.fused):
            rows[key] = tuple(kept)
        if moe.prefix:
            pattern = re.compile(re.escape(moe.prefix) + r"(\d+)\.(.+)$")
            new_index = {e: i for i, e in enumerate(kept)}
            for key in keys:
                m = pattern.match(key)
                if not m:
                    continue
                e = int(m[1])
                if e not in new_index:
                    drop.add(key)
                elif new_index[e] != e:
                    rename[key] = f"{moe.prefix}{new_index[e]}.{m[2]}"
    entries = config_entries(config, list(arch.experts.values()), k)
    return Rewrite("experts", frozenset(drop), rename, rows, config=entries,
                   facts={"score": how, "kept": {str(b): list(v) for b, v in kept_by.items()},
                          "removed": {str(b): list(v) for b, v in removed_by.items()}, "config": dict(entries)})


# ------------------------------------------------------------------------------------------------ statistics
class TargetStats:
    """A target's ``LayerStats`` for the methods, with the fallbacks applied; safe for the writer's thread pool.

    ``moments``: by target name; ``gram_of(name)``: its input's Gram matrix (None: no Gram needed);
    ``input_of(name)``: the key of its input (layers reading one input share work through it)."""

    def __init__(self, arch: Architecture, moments: Mapping[str, Moments], gram_of=None, input_of=None,
                 fallback: Mapping[str, str] | None = None):
        import threading

        self.arch, self.moments, self.gram_of = arch, moments, gram_of
        self.input_of = input_of
        self.fallback = dict(fallback or {})
        self._pooled: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def __call__(self, t: Target):
        from .metrics import LayerStats

        kind = self.fallback.get(t.name)
        if kind is None:
            return LayerStats(self.moments[t.name], self.gram_of(t.name) if self.gram_of else None,
                              self.input_of(t.name) if self.input_of else None)
        if kind == MAGNITUDE:
            eye = torch.eye(t.in_features, dtype=torch.float32) if self.gram_of else None
            return LayerStats(unit_moments(t.in_features), eye, f"unit statistics:{t.in_features}")
        with self._lock:
            if t.block not in self._pooled:
                moe = self.arch.experts[t.block]
                self._pooled[t.block] = (pooled_moments(moe, self.moments),
                                         pooled_gram(moe, self.gram_of, self.moments) if self.gram_of else None)
        moments, gram = self._pooled[t.block]
        return LayerStats(moments, gram, f"pooled input of block {t.block}")
