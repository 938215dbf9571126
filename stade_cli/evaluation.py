"""Perplexity by the Wanda/SparseGPT protocol.

The held-out text joined, tokenized once, cut into non-overlapping windows of ``seqlen`` tokens (the
remainder dropped); ppl = exp(mean next-token NLL over all predicted tokens of all windows).
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from .arch import context_length
from .data import eval_windows, load_corpus
from .distributed import World, current
from .errors import UsageError, check_types
from .loading import Runtime, check_batch_size
from .runtime import Reporter


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of ids: [B, S] under logits: [B, S, V] (float32 softmax).

    The last position has no next token: its target is ignored rather than its logits sliced off, which
    would copy the [B, S−1, V] logits.
    """
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)     # [B, S]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


@torch.inference_mode()
def batch_nlls(model, windows: torch.Tensor, device: torch.device, batch_size: int = 1,
               reporter: Reporter | None = None) -> list[float]:
    """The summed next-token NLL of each batch of ``batch_size`` windows of ``windows`` [n, seqlen], in order."""
    reporter = reporter or Reporter()
    out = []
    batches = windows.split(batch_size)
    for batch in reporter.track(batches, "evaluating", total=len(batches)):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits      # [B, S, V]
        out.append(float(window_nll(logits, batch)))
    return out


@torch.inference_mode()
def blockwise_batch_nlls(model, arch, windows: torch.Tensor, device: torch.device, batch_size: int = 1,
                         reporter: Reporter | None = None, placement=None) -> list[float]:
    """``batch_nlls`` computed block by block (``blockwise.BlockRunner``): for a model dispatched with a device
    map, only one block on the device at a time. The final hidden states go through the model's own head."""
    from .blockwise import BlockRunner

    out = []
    with BlockRunner(model, arch, windows, device, batch_size, placement, reporter) as runner:
        for _, block, dev in runner.blocks("evaluating (blocks)"):
            runner.run(block, dev, keep=True)
        with runner.head() as head:
            for i, (s, e) in enumerate(runner.slices):
                logits = head(i).logits
                out.append(float(window_nll(logits, windows[s:e].to(logits.device))))
    return out


def mean_nll(nlls: list[float], windows: torch.Tensor) -> tuple[float, int]:
    """(mean NLL, predicted tokens): the batches' sums added in order, over n × (seqlen − 1) tokens."""
    total = 0.0
    for x in nlls:
        total += x
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return total / tokens, tokens


def perplexity(model, windows: torch.Tensor, device: torch.device, batch_size: int = 1,
               reporter: Reporter | None = None) -> tuple[float, int]:
    """(mean NLL, number of predicted tokens) of ``windows`` [n, seqlen]."""
    return mean_nll(batch_nlls(model, windows, device, batch_size, reporter), windows)


def blockwise_perplexity(model, arch, windows: torch.Tensor, device: torch.device, batch_size: int = 1,
                         reporter: Reporter | None = None, placement=None) -> tuple[float, int]:
    """``perplexity`` block by block (see ``blockwise_batch_nlls``)."""
    return mean_nll(blockwise_batch_nlls(model, arch, windows, device, batch_size, reporter, placement), windows)


def evaluate(model: str, dataset: str = "wikitext2", seqlen: int | None = None, max_windows: int | None = None,
             device: str = "auto", dtype: str = "auto", batch_size: int = 1,
             reporter: Reporter | None = None, placement=None, world: World | None = None) -> dict:
    """Perplexity of ``model`` (a checkpoint dir or hub id) on the held-out split of ``dataset``.

    With a ``placement`` that has a device map the model is dispatched by accelerate and run block by block.
    """
    reporter = reporter or Reporter()
    model, dataset = os.fspath(model), dataset and os.fspath(dataset)     # a Path is as good as a string
    check_types(evaluate, dict(locals()), skip=("device",))     # sparsity="0.5": named, not a TypeError
    check_batch_size(batch_size)
    rt = Runtime.of(model, device, dtype)
    placement = rt.settle(placement, reporter)
    dev = rt.device
    windows = eval_windows(rt.tokenizer(), load_corpus(dataset, "evaluation"), seqlen, context_length(rt.config),
                           max_windows)
    if len(windows) == 0:
        raise UsageError("no evaluation window fits the text")
    # under a launcher each rank scores a contiguous share of the batches; the sums are added in batch order
    world = world or current()
    start, stop = world.share(math.ceil(len(windows) / batch_size))
    mine = windows[start * batch_size: stop * batch_size]
    with world.together():
        with rt.model(placement) as net:
            t0 = time.perf_counter()
            if len(mine) == 0:
                nlls = []
            elif placement is not None and placement.dispatched:
                from .arch import describe

                nlls = blockwise_batch_nlls(net, describe(net), mine, dev, batch_size, reporter, placement)
            else:
                nlls = batch_nlls(net, mine, dev, batch_size, reporter)
    nll, tokens = mean_nll([x for part in world.gather(nlls) for x in part], windows)
    extra = {"placement": placement.describe()} if placement is not None and placement.dispatched else {}
    if world.several:
        extra["world_size"] = world.size
    return {"model": rt.source.ref, "dataset": dataset, "ppl": math.exp(nll), "nll": nll, **extra,
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "tokens": tokens,
            "device": str(dev), "dtype": rt.dtype_name,
            "seconds": round(time.perf_counter() - t0, 2)}
