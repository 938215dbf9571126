"""Perplexity by the Wanda/SparseGPT protocol.

The held-out text joined, tokenized once, cut into non-overlapping windows of ``seqlen`` tokens (the
remainder dropped); ppl = exp(mean next-token NLL over all predicted tokens of all windows).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .arch import context_length
from .data import eval_windows, load_corpus
from .errors import UsageError
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
def perplexity(model, windows: torch.Tensor, device: torch.device, batch_size: int = 1,
               reporter: Reporter | None = None) -> tuple[float, int]:
    """(mean NLL, number of predicted tokens) of ``windows`` [n, seqlen]."""
    reporter = reporter or Reporter()
    total, tokens = 0.0, 0
    batches = windows.split(batch_size)
    for batch in reporter.track(batches, "evaluating", total=len(batches)):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits      # [B, S, V]
        total += float(window_nll(logits, batch))
        tokens += batch.shape[0] * (batch.shape[1] - 1)
    return total / tokens, tokens


@torch.inference_mode()
def blockwise_perplexity(model, arch, windows: torch.Tensor, device: torch.device, batch_size: int = 1,
                         reporter: Reporter | None = None, placement=None) -> tuple[float, int]:
    """``perplexity`` computed block by block (``blockwise.BlockRunner``): for a model dispatched with a device
    map, only one block on the device at a time. The final hidden states go through the model's own head."""
    from .blockwise import BlockRunner

    total, tokens = 0.0, 0
    with BlockRunner(model, arch, windows, device, batch_size, placement, reporter) as runner:
        for _, block, dev in runner.blocks("evaluating (blocks)"):
            runner.run(block, dev, keep=True)
        with runner.head() as head:
            for i, (s, e) in enumerate(runner.slices):
                logits = head(i).logits
                batch = windows[s:e].to(logits.device)
                total += float(window_nll(logits, batch))
                tokens += batch.shape[0] * (batch.shape[1] - 1)
    return total / tokens, tokens


def evaluate(model: str, dataset: str = "wikitext2", seqlen: int | None = None, max_windows: int | None = None,
             device: str = "auto", dtype: str = "auto", batch_size: int = 1,
             reporter: Reporter | None = None, placement=None) -> dict:
    """Perplexity of ``model`` (a checkpoint dir or hub id) on the held-out split of ``dataset``.

    With a ``placement`` that has a device map the model is dispatched by accelerate and run block by block.
    """
    reporter = reporter or Reporter()
    check_batch_size(batch_size)
    rt = Runtime.of(model, device, dtype)
    dev = rt.device
    windows = eval_windows(rt.tokenizer(), load_corpus(dataset, "evaluation"), seqlen, context_length(rt.config),
                           max_windows)
    if len(windows) == 0:
        raise UsageError("no evaluation window fits the text")
    with rt.model(placement) as net:
        t0 = time.perf_counter()
        if placement is not None and placement.dispatched:
            from .arch import describe

            nll, tokens = blockwise_perplexity(net, describe(net), windows, dev, batch_size, reporter, placement)
        else:
            nll, tokens = perplexity(net, windows, dev, batch_size, reporter)
    extra = {"placement": placement.describe()} if placement is not None and placement.dispatched else {}
    return {"model": rt.source.ref, "dataset": dataset, "ppl": math.exp(nll), "nll": nll, **extra,
            "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "tokens": tokens,
            "device": str(dev), "dtype": rt.dtype_name,
            "seconds": round(time.perf_counter() - t0, 2)}
