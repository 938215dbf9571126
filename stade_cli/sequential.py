"""``--sequential``: the reference Wanda flow. Prune block by block; the calibration inputs of block l are
the outputs of the already pruned blocks 0..l−1.

The inputs of the first block are captured with a forward pre-hook while the decoder runs with its
block list cut to that one block (so nothing raises and nothing past block 0 runs). Each block then
runs on the cached inputs with moment hooks on its linears, is pruned in memory, and runs again to
produce the next block's inputs. The masks (one bit per weight) and bias changes are returned, and
the writer applies them to the original checkpoint tensors, so kept weights stay bit-identical.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .arch import Architecture, context_length
from .calibration.runner import MomentCapture, load_model, load_tokenizer
from .checkpoint import ModelSource, checkpoint_dtype, load_config
from .data import calibration_windows, load_corpus
from .errors import UsageError
from .metrics import LayerContext, LayerStats, MethodOptions
from .runtime import Reporter, resolve_dtype


@contextmanager
def only_first_block(model: nn.Module, arch: Architecture):
    """Temporarily cut the decoder's block list to its first block."""
    modules = dict(model.named_modules())
    list_name = arch.blocks[0].rsplit(".", 1)[0]                 # e.g. "model.layers"
    owner_name, _, attr = list_name.rpartition(".")
    owner = modules[owner_name] if owner_name else model
    full = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList([full[0]]))
    try:
        yield full[0]
    finally:
        setattr(owner, attr, full)


def first_block_inputs(model: nn.Module, arch: Architecture, windows: torch.Tensor, device: torch.device,
                       batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """[(hidden_states [B, S, D], the other keyword arguments of the block call)] per batch of windows."""
    records: list[tuple[torch.Tensor, dict]] = []

    def record(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        records.append((hidden, kwargs))

    with only_first_block(model, arch) as first:
        handle = first.register_forward_pre_hook(record, with_kwargs=True)
        try:
            for batch in windows.split(batch_size):
                model.base_model(input_ids=batch.to(device), use_cache=False)
        finally:
            handle.remove()
    return records


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.inference_mode()
def prune_sequential(source: ModelSource, plan, options: MethodOptions, bias_correction: bool | None,
                     dataset: str, nsamples: int, seqlen: int | None, seed: int, device: torch.device,
                     dtype: str, batch_size: int, reporter: Reporter, gram: bool = False):
    """Returns ({layer: (packed mask, bias delta or None)}, {layer: reads_norm}, a manifest of the run)."""
    from .pruning import decide_layer, pack_mask

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    config = load_config(source.path)
    dt = resolve_dtype(dtype, checkpoint_dtype(config), device)
    windows = calibration_windows(load_tokenizer(source), load_corpus(dataset, "calibration"), nsamples, seqlen,
                                  seed, context_length(config))
    model = load_model(source, device, dt)
    modules = dict(model.named_modules())
    arch = plan.arch
    reporter.log(f"sequential pruning: {len(arch.blocks)} blocks, {nsamples} × {windows.shape[1]} tokens")
    records = first_block_inputs(model, arch, windows, device, batch_size)
    decisions: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    reads_norm: dict[str, bool] = {}
    for index, block_name in enumerate(reporter.track(arch.blocks, "pruning blocks", total=len(arch.blocks))):
        block = modules[block_name]
        sub = Architecture(arch.model_type, [block_name],
                           {n: t for n, t in arch.targets.items() if t.block == index})
        capture = MomentCapture(model, sub, device, gram=gram)
        try:
            for hidden, kwargs in records:
                block(hidden, **kwargs)
                capture.end_batch()
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
                    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=weight.dtype, device=device),
                                               requires_grad=False)
                linear.bias.add_(delta.to(linear.bias.dtype))
            kept = pack_mask(mask) if plan.metric.solve is None else new.cpu()
            decisions[name] = (kept, delta.cpu() if delta is not None else None)
        records = [(_hidden(block(hidden, **kwargs)), kwargs) for hidden, kwargs in records]
    manifest = {"dataset": dataset, "nsamples": nsamples, "seqlen": int(windows.shape[1]), "seed": seed,
                "dtype": str(dt).replace("torch.", ""), "device": str(device)}
    del model, records
    return decisions, reads_norm, manifest
