"""A faster causal attention for the refinement's passes on the CPU, where it is the same function.

PyTorch's CPU kernel for ``scaled_dot_product_attention`` (a flash-attention loop) is slow for the refinement's short
windows: on SmolLM2's blocks (9 query heads sharing 3 key/value heads, 256 tokens, bfloat16 products) it takes
about 12 ms of a 50 ms forward and backward step, for 4% of the step's arithmetic. Written out as two batched
products and a softmax, grouped so that the query heads sharing a key/value head make one product, the same
attention takes about 7 ms (``causal_attention``). So, during the refinement on a CPU with bfloat16 products, a
block's attention modules that dispatch through transformers' attention registry are switched from ``sdpa`` to
this function (``faster``), which computes the causal case itself and hands every other case (an attention mask, a
position bias, dropout, a cache longer than the queries, a score matrix too large to hold) to ``sdpa`` unchanged.

``faster`` switches a block only where, on a probe window, every attention call of the block went through this
function's own case and agreed with ``sdpa``'s answer to bfloat16 rounding, and so did the block's output: a model
whose code reads the setting in some other way keeps its own attention.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Iterator

import torch

_probing = threading.local()    # ``faster``'s probe: a list that causal_attention adds its differences to
NAME = "stade_causal"
LARGEST = 1 << 26          # query-key scores computed at once (batch × heads × queries × keys): 256 MiB in float32
AGREE = 2e-2               # the probe's relative difference allowed: bfloat16 keeps 8 bits (4e-3 a product)


def grouped_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale, causal) v for query [B, H, T, D] and key/value [B, KV, T, D], H a multiple of KV
    (query head h reads key/value head h // (H / KV), as transformers' ``repeat_kv`` does): the G = H / KV query
    heads of a group are stacked into one [G·T, D] operand, so no key or value is copied. Returns [B, H, T, D].
    The products run in the ambient precision (autocast's, if on), the softmax in float32."""
    b, h, t, d = query.shape
    kv = key.shape[1]
    g = h // kv
    scores = torch.matmul(query.reshape(b, kv, g * t, d), key.transpose(-1, -2)) * scale     # [B, KV, G·T, T]
    future = torch.ones(t, t, dtype=torch.bool, device=query.device).triu(1)
    scores = scores.view(b, kv, g, t, t).masked_fill(future, float("-inf"))
    wide = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    weights = torch.softmax(wide, dim=-1)
    if value.dtype in (torch.bfloat16, torch.float16):
        weights = weights.to(value.dtype)
    return torch.matmul(weights.view(b, kv, g * t, t), value).view(b, h, t, value.shape[-1])


def _bfloat16_products(t: torch.Tensor) -> bool:
    if t.dtype == torch.bfloat16:
        return True
    try:
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    except TypeError:                                                   # torch < 2.4
        return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16


def causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' attention-function signature: (output [B, T, H, D], None). The causal case without a mask
    on the CPU in bfloat16 is ``grouped_causal``; everything else is ``sdpa``'s, as it would have been."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    b, h, t, _ = query.shape
    if (attention_mask is None and causal and not dropout and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
            and query.device.type == "cpu" and t > 1 and key.shape[2] == t and value.shape[2] == t
            and h % key.shape[1] == 0 and b * h * t * t <= LARGEST and _bfloat16_products(query)):
        scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
        out = grouped_causal(query, key, value, scale).transpose(1, 2).contiguous()
        checks = getattr(_probing, "differences", None)
        if checks is not None:          # ``faster``'s probe: sdpa's answer beside it
            theirs, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, is_causal=is_causal, **kwargs)
            gap = float((out.float() - theirs.float()).norm()) / max(float(theirs.float().norm()), 1e-30)
            checks.append(gap if math.isfinite(gap) and bool(torch.isfinite(out).all()) else math.inf)
        return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _registered() -> bool:
    """Whether this transformers dispatches attention through its registry (≥ 4.48); registers the function."""
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, causal_attention)
    return True


def _configs(block: torch.nn.Module) -> list:
    """The configs of ``block``'s modules that choose sdpa, each once."""
    seen: dict[int, object] = {}
    for m in block.modules():
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            seen.setdefault(id(config), config)
    return list(seen.values())


def _settings(configs: list) -> list[tuple[object, object]]:
    """(config, its attention setting) for ``configs`` and their sub-configs, parents first: setting a config's
    also sets its sub-configs', so they are put back in this order."""
    out: list[tuple[object, object]] = []
    stack = list(reversed(configs))
    while stack:
        c = stack.pop()
        if any(c is o for o, _ in out):
            continue
        out.append((c, getattr(c, "_attn_implementation", None)))
        subs = [getattr(c, k, None) for k in getattr(c, "sub_configs", None) or ()]
        stack.extend(reversed([x for x in subs if x is not None and hasattr(x, "_attn_implementation")]))
    return out


def _put_back(settings: list[tuple[object, object]]) -> None:
    for c, value in settings:
        c._attn_implementation = value


@contextlib.contextmanager
def faster(block: torch.nn.Module, probe: Callable[[], torch.Tensor], products: torch.dtype,
           device: torch.device) -> Iterator[bool]:
    """Within it ``block`` attends with ``causal_attention`` where that helps and agrees (module docstring); yields
    whether it does. ``probe()`` runs the block on a window or two and returns its output. Every setting changed
    is put back on the way out."""
    configs = _configs(block) if device.type == "cpu" and products == torch.bfloat16 else []
    if not configs or not _registered():
        yield False
        return
    settings = _settings(configs)
    reference = probe()
    try:
        try:
            for c in configs:
                c._attn_implementation = NAME
        except (AttributeError, TypeError, ValueError, KeyError):      # a config that will not take the name
            on = False
        else:
            _probing.differences = differences = []
            try:
                out = probe()
            finally:
                _probing.differences = None
            # every attention call of the probe went through causal_attention's own case, each within bfloat16's
            # rounding of sdpa's answer, and so did the block's output
            on = bool(differences) and max(differences) <= AGREE and bool(torch.isfinite(out).all()) and \
                float((out.float() - reference.float()).norm()) <= AGREE * float(reference.float().norm())
        if not on:
            _put_back(settings)
        yield on
    finally:
        _put_back(settings)
