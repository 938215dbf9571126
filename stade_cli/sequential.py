"""``--sequential``: the reference Wanda flow, as a producer of the decide stage. Prune block by block; the
calibration inputs of block l are the outputs of the already pruned blocks 0..l−1.

``blockwise.BlockRunner`` captures the first block's inputs with a forward pre-hook (no exception, no
block run), then each block runs on the cached inputs with moment hooks on its linears, is pruned in
place, and runs again to produce the next block's inputs. Only the current block has to be on the device
(``--device-map``/``--max-memory``/``--offload-dir``), the cached inputs spill to disk when they do not fit.
The decisions (a packed mask, one bit per weight, or a solver's new weight; and the bias change) are all
made before writing, and the writer applies them to the original checkpoint tensors, so kept weights stay
bit-identical.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .arch import describe
from .blockwise import BlockRunner
from .calibration.runner import MomentCapture, sum_over_ranks
from .checkpoint import tensor_dtypes
from .decide import Decisions, Factorisations, LayerDecision, decide_layer, dense_inputs, sole_inputs
from .errors import ModelError
from .experts import TargetStats, fallbacks, summary
from .loading import Runtime
from .runtime import Reporter
from .tensors import pack_mask


@torch.inference_mode()
def sequential(plan, reporter: Reporter) -> Decisions:
    """Every target's decision, block by block on the pruned model's activations."""
    st, block_sparsity, _ = dense_inputs(plan, reporter)   # stats only for OWL (or as given)
    spec = plan.calibration
    spec.check()
    rt = Runtime.of(plan.source, plan.device, plan.request.dtype)
    placement = rt.settle(plan.request.placement, reporter)
    windows = spec.windows(rt)
    world = plan.world         # under a launcher: each rank runs its share of the windows; sums are shared
    start, stop = world.windows(len(windows))
    arch = plan.arch
    ranks = f"; {world.size} ranks, windows {start}-{stop - 1} here" if world.several else ""
    reporter.log(f"sequential pruning: {len(arch.blocks)} blocks, {spec.nsamples} × {windows.shape[1]} tokens{ranks}")
    decisions: dict[str, LayerDecision] = {}
    reads_norm: dict[str, bool] = {}
    cache = Factorisations()
    stored = tensor_dtypes(plan.source.path, plan.files)   # what the writer casts each new weight to
    min_tokens = plan.request.expert_min_tokens
    routing: dict = {}          # by block: its experts' routing statistics
    with rt.model(placement) as model, BlockRunner(model, arch, windows[start:stop], rt.device, spec.batch_size,
                                                   placement, reporter) as runner:
        modules = dict(model.named_modules())
        loaded = describe(model, disk=plan.shapes)     # where each target lives in this transformers version
        missing = [n for n in arch.targets if n not in loaded.places]
        if missing:
            raise ModelError(f"cannot find where {missing[0]} lives in the loaded model, so --sequential cannot "
                             "update it", "prune without --sequential, or --skip it")
        runtime = dataclasses.replace(arch, experts=loaded.experts, places=loaded.places)
        last = len(arch.blocks) - 1
        for index, block, dev in runner.blocks("pruning blocks"):
            sub = runtime.block(index)
            capture = MomentCapture(model, sub, dev, gram=plan.needs_gram)
            try:
                with world.together():
                    runner.run(block, dev, keep=False, after_batch=capture.end_batch)
            finally:
                capture.remove()
            capture.finish()
            sum_over_ranks(capture, world)     # every rank now decides the same, from the stats of all windows
            routing.update(capture.experts)
            gram_of = (lambda name: capture.grams[capture.leader.get(name, name)]) if plan.needs_gram else None
            fallback = fallbacks(sub, capture.experts, min_tokens)
            input_of = lambda name: capture.leader.get(name, name)     # noqa: E731
            stats_of = TargetStats(sub, capture.moments, gram_of, input_of, fallback)
            sole = sole_inputs(sub.targets, input_of, fallback)
            for name, target in sub.targets.items():
                place = runtime.places[name]
                ctx = plan.context(name, capture.reads_norm.get(name, False))
                reads_norm[name] = ctx.reads_norm
                weight = place.view(modules)
                correct = plan.corrects(ctx) and not target.fused
                stats = stats_of(target)
                new, mask, delta = decide_layer(weight, plan.method, plan.pattern_for(target, block_sparsity),
                                                stats, ctx, correct, plan.update, plan.update_context(name),
                                                cache.at(index) if stats.input not in sole else None)
                weight.copy_(new)
                if delta is not None:  # the next blocks see the corrected layer, as the checkpoint will
                    linear = modules[name]
                    if linear.bias is None:
                        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=dev),
                                                   requires_grad=False)
                    linear.bias.add_(delta.to(linear.bias.dtype))
                delta = delta.cpu() if delta is not None else None
                masked_only = plan.method.solve is None and plan.update is None
                # a new weight waits for the writer in the dtype it will be written in (the same bits as casting
                # then; a 7B model's are 13 GB in bfloat16, 26 GB in the float32 the CPU computes in)
                decisions[name] = (LayerDecision(mask=pack_mask(mask), bias_delta=delta) if masked_only
                                   else LayerDecision(weight=new.to("cpu", stored.get(target.weight_key, new.dtype)),
                                                      bias_delta=delta))
            if index < last:
                runner.run(block, dev, keep=True)
    manifest = spec.manifest(windows, rt)
    if placement.dispatched:
        manifest["placement"] = placement.describe()
    stats_manifest = dict(st.manifest if st is not None else {}, sequential=manifest)
    corrected = frozenset(n for n, d in decisions.items() if d.bias_delta is not None)
    report = summary(arch, routing, min_tokens) if routing else None
    return Decisions(corrected, reads_norm, block_sparsity, stats_manifest,
                     lambda target, tensor: decisions[target.name], None, report)
