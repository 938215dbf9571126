"""Which MLP channels or decoder blocks go, and the ``Rewrite`` that writes the smaller model.

Channels: in every block the MLP's channels are the rows of its producers (gate/up, fc1) and the columns of its
consumer (down, fc2). The same number goes in every block (a multiple of 8), the lowest-scored by the metric
(``scores.py``); STADE folds the removed channels' mean output into the consumer's bias (a bias the config switches
on where the model has none, as bias correction does); the update refits the kept columns from the Gram matrix.
Blocks: the ones that change their input least (mean 1 − cos over the calibration tokens) go; the rest are
renumbered and the config's layer count and per-layer lists follow.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..arch import (LAYER_COUNT_KEYS, MLP_CONSUMERS, MLP_PRODUCERS, MLP_WIDTH_KEYS, Architecture, Target,
                    bias_switches)
from ..errors import ModelError, StatsError, UsageError
from ..rewrite import Added, Rewrite
from . import scores

INDEX_LISTS = ("mlp_only_layers",)      # config lists of block indices (renumbered), not one entry per block
MULTIPLE = 8


@dataclass(frozen=True)
class MLP:
    """One block's MLP: the targets whose rows are its channels, and the one whose columns are."""

    block: int
    producers: tuple[Target, ...]
    consumer: Target

    @property
    def width(self) -> int:
        return self.consumer.in_features


def find_mlps(arch: Architecture) -> dict[int, MLP]:
    """Every block's MLP, or a refusal naming the block where none is found (or several)."""
    out: dict[int, MLP] = {}
    for b in range(len(arch.blocks)):
        if b in arch.experts:
            raise UsageError("--structure channels removes a dense MLP's channels; this model's MLPs are experts",
                             "remove whole experts with --experts K")
        parents: dict[str, dict[str, Target]] = {}
        for t in arch.targets.values():
            if t.block == b and t.expert is None and t.index is None:
                parent, _, leaf = t.name.rpartition(".")
                parents.setdefault(parent, {})[leaf] = t
        found = []
        for parent, leaves in parents.items():
            consumer = next((leaves[n] for n in MLP_CONSUMERS if n in leaves), None)
            producers = tuple(leaves[n] for n in MLP_PRODUCERS if n in leaves)
            if consumer is not None and producers and all(p.out_features == consumer.in_features for p in producers):
                found.append(MLP(b, producers, consumer))
        if len(found) != 1:
            raise ModelError(f"cannot tell the MLP of block {b} ({arch.blocks[b]}): "
                             f"{'none' if not found else len(found)} found among its layers",
                             "--structure channels knows gate/up/down and fc1/fc2 MLPs")
        out[b] = found[0]
    return out


def removed_count(width: int, fraction: float) -> int:
    """The channels each MLP loses: the fraction of its width, to a multiple of 8; refused when none or all."""
    n = int(round(width * fraction / MULTIPLE)) * MULTIPLE
    if n <= 0:
        raise UsageError(f"--sparsity {fraction} of {width} channels rounds to no channel (a multiple of {MULTIPLE})",
                         "give a larger --sparsity")
    if n >= width:
        raise UsageError(f"--sparsity {fraction} would remove every one of the {width} channels",
                         "give a smaller --sparsity")
    return n


def removed_blocks(total: int, fraction: float) -> int:
    """The blocks --structure blocks removes; refused when none or all."""
    n = int(round(total * fraction))
    if n <= 0:
        raise UsageError(f"--sparsity {fraction} of {total} blocks rounds to no block", "give a larger --sparsity")
    if n >= total:
        raise UsageError(f"--sparsity {fraction} would remove every one of the {total} blocks",
                         "give a smaller --sparsity")
    return n


def channel_width(mlps: Mapping[int, MLP]) -> int:
    widths = {m.width for m in mlps.values()}
    if len(widths) != 1:
        raise UsageError(f"the blocks' MLPs have different widths ({sorted(widths)}); --structure channels needs one")
    return widths.pop()


def _config_key(config: Mapping[str, Any], keys: tuple[str, ...], value: int) -> str:
    for prefix, part in (("", config), ("text_config.", config.get("text_config"))):
        if isinstance(part, dict):
            for key in keys:
                if part.get(key) == value:
                    return prefix + key
    raise UsageError(f"the config says nowhere that the value is {value} ({', '.join(keys)}); stade cannot write a "
                     "config for the smaller model")


def plan_channels(arch: Architecture, config: Mapping[str, Any], read: Callable[[str], torch.Tensor],
                  stats, how: str, fraction: float, refit: bool, fold: bool, bias_table: Mapping[str, list],
                  keys: Mapping[str, tuple], damp: float = 0.01) -> Rewrite:
    """The rewrite that removes ``fraction`` of every MLP's channels, scored by ``how``.

    ``read(key)``: a checkpoint tensor; ``stats``: the calibration stats (moments, and Gram for ``refit``); ``fold``:
    the removed channels' mean into the consumer's bias (switched on by ``bias_table``'s flags when needed);
    ``keys``: every checkpoint tensor's shape."""
    mlps = find_mlps(arch)
    width = channel_width(mlps)
    n = removed_count(width, fraction)
    kept_width = width - n
    flags, gained = {}, set()
    if fold:
        needed = {m.consumer.name for m in mlps.values() if f"{m.consumer.name}.bias" not in keys}
        flags, gained = bias_switches(bias_table, arch.model_type, needed)
    rows: dict[str, tuple] = {}
    cols: dict[str, tuple] = {}
    compute: dict[str, Callable] = {}
    shapes: dict[str, tuple] = {}
    add: dict[str, Added] = {}
    per_block = {}
    for b, mlp in mlps.items():
        c = mlp.consumer
        down = read(c.weight_key)
        moments = stats.moments.get(c.name) if stats is not None else None
        removed = scores.lowest(scores.channel_scores(how, down.float(), moments), n)
        kept = scores.kept_after(width, removed)
        per_block[b] = [int(i) for i in removed]
        idx = tuple(int(i) for i in kept)
        for p in mlp.producers:
            rows[p.weight_key] = idx
            if f"{p.name}.bias" in keys:
                rows[f"{p.name}.bias"] = idx
            elif p.name in gained:                          # a sibling of the switched-on bias: zeros
                add[f"{p.name}.bias"] = Added(p.weight_key, (kept_width,),
                                              functools.partial(torch.zeros, kept_width, dtype=torch.float64))
        consumer = _Consumer(c, read, kept, moments, stats, refit, damp,
                             scores.folded_bias(down.float(), removed, moments.mean) if fold and not refit else None,
                             fold)
        if refit:
            compute[c.weight_key] = consumer.weight
            shapes[c.weight_key] = (c.out_features, kept_width)
        else:
            cols[c.weight_key] = idx
        if fold:
            bias_key = f"{c.name}.bias"
            if bias_key in keys:
                compute[bias_key] = lambda old, s=consumer: (old.double() + s.bias()).to(old.dtype)
            else:
                add[bias_key] = Added(c.weight_key, (c.out_features,), consumer.bias)
        del down
    entries = {_config_key(config, MLP_WIDTH_KEYS, width): kept_width, **flags}
    facts = {"kind": "channels", "metric": how, "width": width, "removed_per_block": n, "kept_per_block": kept_width,
             "refit": refit, "folded": fold, "bias_flags": flags, "removed": {str(b): r for b, r in per_block.items()}}
    return Rewrite("channels", rows=rows, cols=cols, compute=compute, shapes=shapes, add=add, config=entries,
                   facts=facts)


class _Consumer:
    """A block's down projection in the output: its refitted weight, computed when the writer reaches it (a 70B
    model's are never all held), and the bias change, kept as one [H] vector (computed with the refit, or now)."""

    def __init__(self, c: Target, read, kept, moments, stats, refit: bool, damp: float, delta, fold: bool):
        self.c, self.read, self.kept, self.moments, self.stats = c, read, kept, moments, stats
        self.refit, self.damp, self.delta, self.fold = refit, damp, delta, fold

    def weight(self, old: torch.Tensor) -> torch.Tensor:
        if self.stats is None or not self.stats.has_gram:
            raise StatsError("the refit needs Gram matrices", "make them with `stade calibrate --gram`")
        new, delta = scores.refit(old.float(), self.kept, self.stats.gram(self.c.name), self.moments,
                                  centred=self.fold, damp=self.damp)
        if self.fold:
            self.delta = delta
        return new.to(old.dtype)

    def bias(self) -> torch.Tensor:
        if self.delta is None:          # the bias comes before its weight in the shard: refit from the checkpoint
            self.weight(self.read(self.c.weight_key))
        return self.delta


def plan_blocks(arch: Architecture, config: Mapping[str, Any], distances: Mapping[int, float] | None,
                fraction: float, keys: Mapping[str, tuple]) -> Rewrite:
    """The rewrite that removes ``fraction`` of the decoder blocks, those that change their input least."""
    if distances is None:
        raise StatsError("these stats do not record how much each block changes its input",
                         "re-run `stade calibrate` with this version")
    total = len(arch.blocks)
    n = removed_blocks(total, fraction)
    order = sorted(range(total), key=lambda b: (distances.get(b, float("inf")), b))
    removed = sorted(order[:n])
    kept = [b for b in range(total) if b not in removed]
    new_index = {b: i for i, b in enumerate(kept)}
    drop, rename = set(), {}
    for key in keys:
        b = next((i for i, name in enumerate(arch.blocks) if key.startswith(name + ".")), None)
        if b is None:
            continue
        if b in removed:
            drop.add(key)
        elif new_index[b] != b:
            head, _, _ = arch.blocks[b].rpartition(".")
            rename[key] = f"{head}.{new_index[b]}{key[len(arch.blocks[b]):]}"
    entries: dict[str, Any] = {_config_key(config, LAYER_COUNT_KEYS, total): total - n}
    for prefix, part in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(part, dict):
            continue
        for key, value in part.items():
            if isinstance(value, list) and len(value) == total and key not in INDEX_LISTS:
                entries[prefix + key] = [v for i, v in enumerate(value) if i in new_index]
            elif key in INDEX_LISTS and isinstance(value, list):
                entries[prefix + key] = [new_index[i] for i in value if i in new_index]
    entries.update(_mlp_layout(config, [b in arch.experts for b in kept]))
    facts = {"kind": "blocks", "blocks": total, "removed": removed, "kept": kept,
             "distance": {str(b): distances.get(b) for b in range(total)}}
    return Rewrite("blocks", frozenset(drop), rename, config=entries, facts=facts)


def _mlp_layout(config: Mapping[str, Any], moe: list[bool]) -> dict[str, Any]:
    """The config entries that say again which of the kept blocks (in their new order; ``moe[i]``: block i's MLP is
    a mixture of experts) have experts, where the config states it by a rule rather than a list per block: Qwen2/3-MoE's
    ``decoder_sparse_step`` (every step-th block, but those in ``mlp_only_layers``) becomes a step of 1 and the list
    of the dense ones; DeepSeek's ``first_k_dense_replace`` (the first k blocks dense) the kept dense blocks' count,
    which still come first. A layout no key can state is refused."""
    entries: dict[str, Any] = {}
    dense = [i for i, m in enumerate(moe) if not m]
    for prefix, part in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(part, dict):
            continue
        if part.get("decoder_sparse_step") is not None:
            entries[prefix + "decoder_sparse_step"] = 1
            entries[prefix + "mlp_only_layers"] = dense
        if part.get("first_k_dense_replace") is not None:
            freq = part.get("moe_layer_freq", 1)
            if dense != list(range(len(dense))) or (freq != 1 and any(moe)):
                raise UsageError("the blocks that would stay cannot be described by this model's config "
                                 f"(first_k_dense_replace{', moe_layer_freq' if freq != 1 else ''}): its dense and "
                                 "expert blocks would no longer follow its rule", "remove experts (--experts K) or "
                                 "channels instead, or fewer blocks")
            entries[prefix + "first_k_dense_replace"] = len(dense)
    return entries

