"""``--sequential``: the reference Wanda flow. Prune block by block; the calibration inputs of block l are
the outputs of the already pruned blocks 0..l−1.

``blockwise.BlockRunner`` captures the first block's inputs with a forward pre-hook (no exception, no
block run), then each block runs on the cached inputs with moment hooks on its linears, is pruned in
place, and runs again to produce the next block's inputs. Only the current block has to be on the device
(``--device-map``/``--max-memory``/``--offload-dir``), the cached inputs spill to disk when they do not fit.
The masks (one bit per weight) and bias changes are returned, and the writer applies them to the
original checkpoint tensors, so kept weights stay bit-identical.
"""
from __future__ import annotations

import torch
from torch import nn

from .arch import context_length
from .blockwise import BlockRunner, Placement
from .calibration.runner import MomentCapture, load_model, load_tokenizer, release_model
from .checkpoint import ModelSource, checkpoint_dtype, load_config
from .data import calibration_windows, load_corpus
from .errors import UsageError
from .metrics import LayerContext, LayerStats, MethodOptions
from .runtime import Reporter, resolve_dtype


@torch.inference_mode()
def prune_sequential(source: ModelSource, plan, options: MethodOptions, bias_correction: bool | None,
                     dataset: str, nsamples: int, seqlen: int | None, seed: int, device: torch.device,
                     dtype: str, batch_size: int, reporter: Reporter, gram: bool = False,
                     placement: Placement | None = None):
    """Returns ({layer: (packed mask, bias delta or None)}, {layer: reads_norm}, a manifest of the run)."""
    from .pruning import decide_layer, pack_mask

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    placement = placement or Placement()
    config = load_config(source.path)
    dt = resolve_dtype(dtype, checkpoint_dtype(config), device)
    windows = calibration_windows(load_tokenizer(source), load_corpus(dataset, "calibration"), nsamples, seqlen,
                                  seed, context_length(config))
    model = load_model(source, device, dt, placement)
    modules = dict(model.named_modules())
    arch = plan.arch
    reporter.log(f"sequential pruning: {len(arch.blocks)} blocks, {nsamples} × {windows.shape[1]} tokens")
    decisions: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    reads_norm: dict[str, bool] = {}
    with BlockRunner(model, arch, windows, device, batch_size, placement, reporter) as runner:
        last = len(arch.blocks) - 1
        for index, block, dev in runner.blocks("pruning blocks"):
            sub = arch.block(index)
            capture = MomentCapture(model, sub, dev, gram=gram)
            try:
                runner.run(block, dev, keep=False, after_batch=capture.end_batch)
            finally:
                capture.remove()
            for name, target in sub.targets.items():
                linear = modules[name]
                ctx = LayerContext(name, capture.reads_norm.get(name, False), options)
                reads_norm[name] = ctx.reads_norm
                moments = capture.moments[name]
                gram_matrix = capture.grams.get(capture.leader.get(name, name)) if gram else None
                weight = linear.weight
                correct = plan.metric.corrects_bias(ctx) if bias_correction is None else bias_correction
                new, mask, delta = decide_layer(weight, plan.metric, plan.pattern_for(target),
                                                LayerStats(moments, gram_matrix), ctx, correct)
                linear.weight.copy_(new)
                if delta is not None:  # the next blocks see the corrected layer, as the checkpoint will
                    if linear.bias is None:
                        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=dev),
                                                   requires_grad=False)
                    linear.bias.add_(delta.to(linear.bias.dtype))
                kept = pack_mask(mask) if plan.metric.solve is None else new.cpu()
                decisions[name] = (kept, delta.cpu() if delta is not None else None)
            if index < last:
                runner.run(block, dev, keep=True)
    manifest = {"dataset": dataset, "nsamples": nsamples, "seqlen": int(windows.shape[1]), "seed": seed,
                "dtype": str(dt).replace("torch.", ""), "device": str(device)}
    if placement.dispatched:
        manifest["placement"] = placement.describe()
    release_model(model)    # accelerate's offload folder now (on an error: when the model is collected)
    return decisions, reads_norm, manifest
