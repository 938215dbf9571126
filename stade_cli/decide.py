"""The decide stage: what becomes of each target layer, as ``LayerDecision``s handed to the writer.

``decide_layer`` is the pure per-layer step (weight, method, pattern, statistics → new weight, mask, bias
change). Two producers use it: ``one_shot`` (from the dense model's cached moments, one tensor at a time
as the writer streams the shards; it calibrates first when there are no stats) and ``sequential.py``
(block by block on the pruned model's own activations, all decided before writing).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .arch import Target
from .experts import TargetStats, fallbacks, plan_removal, summary
from .rewrite import Rewrite
from .metrics import LayerContext, LayerStats, Metric
from .owl import owl_block_sparsity
from .runtime import Reporter
from .tensors import apply_mask, bias_delta, pruned_contribution, unpack_mask


@dataclass(frozen=True)
class LayerDecision:
    """One layer's outcome: the original weight with ``mask`` (packed, one bit per weight) zeroed, or the new
    ``weight`` a solver computed; and the change to add to its bias (float64 [out]) or None."""

    mask: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias_delta: torch.Tensor | None = None

    def weight_for(self, original: torch.Tensor) -> torch.Tensor:
        """The pruned tensor, in the original's dtype (masked: kept bits unchanged)."""
        if self.weight is not None:
            return self.weight.to(original.dtype)
        return apply_mask(original, unpack_mask(self.mask, original.shape))


@dataclass(frozen=True)
class Decisions:
    """What the decide stage hands the writer: which layers are bias-corrected (known before the first shard
    is written), each layer's role, the per-block sparsities (OWL), the stats used, and the per-layer
    decision for a target given its dense tensor (computed then, or looked up)."""

    corrected: frozenset
    reads_norm: Mapping[str, bool]
    block_sparsity: Mapping[int, float] | None
    stats_manifest: dict | None
    layer: Callable[[Target, torch.Tensor], LayerDecision] | None     # None: no target is pruned (--experts alone)
    rewrite: Rewrite | None = None         # --experts, --structure: how the checkpoint's tensors and config change
    fallback: dict | None = None           # experts on fallback statistics (experts.summary), for the report
    refined: dict | None = None            # --refine: its settings and each block's output error before/after


def select(weight: torch.Tensor, metric: Metric, pattern, moments, ctx: LayerContext) -> torch.Tensor:
    """The prune mask (True = zero it) of weight [out, in] under a scoring ``metric`` and ``pattern``."""
    scores = metric.score(weight.float(), moments.to(weight.device) if moments is not None else None, ctx)
    return pattern.mask(scores)


def decide_layer(weight: torch.Tensor, metric: Metric, pattern, stats: LayerStats, ctx: LayerContext,
                 correct_bias: bool, update: Metric | None = None, update_ctx: LayerContext | None = None,
                 cache=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(new weight in weight's dtype, prune mask, bias change or None) for one layer, on weight's device.

    Scoring metrics only zero weights (kept ones keep their bits); solvers (SparseGPT, DSnoT) may
    also change the kept weights. A weight ``update`` (``--update admm``) then reconstructs the kept weights
    of the dense layer under the method's mask from the Gram matrix (and may re-choose the mask: gradual),
    sharing its factorisations through ``cache`` between the layers that read one input; with bias correction
    it fits on the centred Gram, so weights and bias are the joint least-squares optimum.
    """
    dev = weight.device
    moments = stats.moments.to(dev) if stats.moments is not None else None
    if metric.solve is not None:
        gram = stats.gram.to(dev) if stats.gram is not None else None
        solved, mask = metric.solve(weight.float(), LayerStats(moments, gram, stats.input), pattern, ctx)
        new = apply_mask(solved.to(weight.dtype), mask)
    else:
        mask = select(weight, metric, pattern, moments, ctx)
        new = apply_mask(weight, mask)
    if update is not None:
        score = (lambda w: metric.score(w.float(), moments, ctx)) if metric.score is not None else None
        # the Gram matrix goes to the device inside the factorisation, only where the input's is not shared yet
        rebuilt, mask = update.update(weight.float(), mask, LayerStats(moments, stats.gram, stats.input),
                                      pattern, update_ctx, score=score, centred=correct_bias, cache=cache,
                                      key=stats.input)
        new = apply_mask(rebuilt.to(weight.dtype), mask)
    if not correct_bias:
        delta = None
    elif metric.solve is None and update is None:
        delta = pruned_contribution(weight, mask, stats.moments.mean)
    else:
        delta = bias_delta(weight, new, stats.moments.mean)
    return new, mask, delta


class Factorisations:
    """The weight update's factorisations, by input: a block's q/k/v and gate/up share theirs. Safe for the
    writer's thread pool (each input is factorised once, the others wait for it); only the last two blocks'
    are kept, so memory stays at a few factorisations while the pool works across a block boundary."""

    def __init__(self, keep_blocks: int = 2):
        import threading

        self._lock = threading.Lock()
        self._entries: dict = {}          # key → (block, Future)
        self._blocks: list[int] = []      # distinct blocks, in the order first seen
        self._keep = keep_blocks

    def at(self, block: int) -> "_BlockView":
        return _BlockView(self, block)

    def shared(self, block: int, key, compute):
        from concurrent.futures import Future

        with self._lock:
            entry = self._entries.get(key)
            owner = entry is None
            if owner:
                entry = self._entries[key] = (block, Future())
                if block not in self._blocks:
                    self._blocks.append(block)
                    while len(self._blocks) > self._keep:
                        old = self._blocks.pop(0)
                        for k in [k for k, (b, _) in self._entries.items() if b == old]:
                            del self._entries[k]
        if owner:
            try:
                entry[1].set_result(compute())
            except BaseException as exc:
                entry[1].set_exception(exc)
                with self._lock:
                    self._entries.pop(key, None)
                raise
        return entry[1].result()


def sole_inputs(targets, input_of, fallback=None) -> frozenset:
    """The input keys (``input_of(name)``) that one target alone reads, among ``targets`` (names; those with
    ``fallback`` statistics read pooled or unit ones, shared, and are left out): a factorisation of such an input
    serves no other layer, so it is not kept (a down projection's ADMM factorisation is 1 GB at 7B, 6.6 GB at
    70B, and two blocks' were kept)."""
    from collections import Counter

    fallback = fallback or {}
    counts = Counter(input_of(n) for n in targets if n not in fallback)
    return frozenset(k for k, c in counts.items() if c == 1)


@dataclass(frozen=True)
class _BlockView:
    cache: Factorisations
    block: int

    def shared(self, key, compute):
        """``compute()``'s result for ``key``, computed once while this block's entries are kept."""
        return self.cache.shared(self.block, key, compute)


def dense_inputs(plan, reporter: Reporter):
    """(the dense model's stats: cached, calibrated now, or None; OWL's per-block sparsities or None; the expert
    removal of --experts or None)."""
    from .calibration.runner import compute_stats

    st = plan.stats
    if st is None and plan.calibrate_first:
        cal = plan.calibration
        st = compute_stats(plan.source, cal.dataset, cal.nsamples, cal.seqlen, cal.seed, plan.request.device,
                           plan.request.dtype, cal.batch_size, reporter, only=plan.request.only,
                           skip=plan.request.skip, gram=plan.needs_gram, placement=plan.request.placement,
                           world=plan.world)
    removal = None
    arch = plan.arch
    if plan.request.experts is not None:
        removal = plan_removal(arch, plan.shapes, dict(plan.config_json), st.experts, plan.request.experts,
                               plan.request.expert_score, plan.calibration.seed)
        kept = {n: t for n, t in arch.targets.items() if removal.keeps(t)}
        arch = dataclasses.replace(arch, targets=kept)
        reporter.log(f"experts: keeping {plan.request.experts} of {next(iter(arch.experts.values())).num_experts} in "
                     f"each of {len(arch.experts)} MoE block(s), ranked by {plan.request.expert_score}")
    block_sparsity = None
    if plan.request.layer_sparsity == "owl":
        block_sparsity = owl_block_sparsity(plan.source.path, plan.files, arch, st,
                                            plan.pattern.target_sparsity, plan.request.owl_m,
                                            plan.request.owl_lambda, plan.device,
                                            fallback=_fallback(plan, arch, st))
        reporter.log("OWL block sparsities: " + ", ".join(f"{s:.3f}" for s in block_sparsity.values()))
    return st, block_sparsity, removal


def _fallback(plan, arch, st) -> dict[str, str]:
    """target → the fallback statistics it uses (experts that saw fewer than --expert-min-tokens tokens)."""
    if st is None or not st.experts:
        return {}
    return fallbacks(arch, st.experts, plan.request.expert_min_tokens)


def structured(plan, reporter: Reporter) -> Decisions:
    """--structure: no weight is zeroed; the rewrite removes MLP channels or whole blocks (``structured/``)."""
    from .checkpoint import tensor_reader
    from .structured.plan import plan_blocks, plan_channels
    from .structured.scores import folds

    st, _, _ = dense_inputs(plan, reporter)
    fraction = plan.request.sparsity
    if plan.request.structure == "blocks":
        rewrite = plan_blocks(plan.arch, plan.config_json, st.block_distance(), fraction, plan.shapes)
        removed = rewrite.facts["removed"]
        reporter.log(f"removing {len(removed)} of {len(plan.arch.blocks)} blocks, those that change their input "
                     f"least: {', '.join(map(str, removed))}")
    else:
        read = tensor_reader(plan.source.path, plan.files)
        fold = folds(plan.request.bias_correction, plan.method.name)
        rewrite = plan_channels(plan.arch, plan.config_json, read, st, plan.method.name, fraction,
                                plan.update is not None, fold, plan.bias_table, plan.shapes)
        f = rewrite.facts
        tokens = min((st.moments[m].count for m in st.moments), default=0) if st is not None else 0
        if plan.update is not None and tokens < f["kept_per_block"]:
            reporter.log(f"note: the refit fits the {f['kept_per_block']} kept channels of each MLP from {tokens:,} "
                         "calibration tokens, fewer than the channels: it can do worse than no refit (calibrate "
                         f"with --nsamples × --seqlen of at least {f['kept_per_block']}, better many times that)")
        reporter.log(f"removing {f['removed_per_block']} of {f['width']} channels (a multiple of 8) in each of "
                     f"{len(plan.arch.blocks)} MLPs, ranked by {f['metric']}"
                     + ("; their mean folded into the down projection's bias" if fold else "")
                     + ("; the kept channels refitted from the Gram matrix" if plan.update is not None else ""))
    return Decisions(frozenset(), {}, None, st.manifest if st is not None else None, None, rewrite)


def one_shot(plan, reporter: Reporter) -> Decisions:
    """Decisions from the dense model's moments (cached, or calibrated now), made per tensor as it streams."""
    if plan.request.structure is not None:
        return structured(plan, reporter)
    st, block_sparsity, removal = dense_inputs(plan, reporter)
    arch = plan.arch
    if removal is not None:
        arch = dataclasses.replace(arch, targets={n: t for n, t in arch.targets.items() if removal.keeps(t)})
    if not plan.request.unstructured:
        return Decisions(frozenset(), {}, None, st.manifest if st is not None else None, None, removal)
    reads_norm = plan.roles(st)
    contexts = {n: plan.context(n, reads_norm.get(n, False)) for n in arch.targets}
    corrected = frozenset(n for n, t in arch.targets.items()
                          if st is not None and not t.fused and plan.corrects(contexts[n]))
    fallback = _fallback(plan, arch, st)
    gram = st is not None and plan.needs_gram
    stats_of = (TargetStats(arch, st.moments, st.gram if gram else None, st.input_of if gram else None, fallback)
                if st is not None else None)
    if fallback:
        n_experts = len({(arch.targets[n].block, arch.targets[n].expert) for n in fallback})
        reporter.log(f"{n_experts} expert(s) saw fewer than {plan.request.expert_min_tokens} calibration tokens: "
                     "their gate/up use the block's pooled input, their down projections magnitude")

    cache = Factorisations()
    sole = sole_inputs(arch.targets, st.input_of, fallback) if gram else frozenset()

    def layer(target: Target, tensor: torch.Tensor) -> LayerDecision:
        stats = stats_of(target) if stats_of is not None else LayerStats()
        pattern = plan.pattern_for(target, block_sparsity)
        new, _, delta = decide_layer(tensor.to(plan.device), plan.method, pattern, stats, contexts[target.name],
                                     target.name in corrected, plan.update, plan.update_context(target.name),
                                     cache.at(target.block) if stats.input not in sole else None)
        return LayerDecision(weight=new.cpu(), bias_delta=delta.cpu() if delta is not None else None)

    report = (summary(arch, st.experts, plan.request.expert_min_tokens,
                      removal.facts["kept"] if removal is not None else None)
              if st is not None and st.experts else None)
    return Decisions(corrected, reads_norm, block_sparsity, st.manifest if st is not None else None, layer, removal,
                     report)
