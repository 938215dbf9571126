"""What a run will need, said before it starts: memory on the device and on the host, disk for stats or outputs.

Pure arithmetic on the model's description (``arch.Architecture``), the weights' footprint and the run's
options; ``calibrate`` and ``prune`` print the lines and refuse a ``--gram`` cache that the disk cannot hold.
The input groups follow the projections that read one tensor in every family stade knows (q/k/v; gate/up; each
expert's gate/up): calibration finds the real groups by identity, so for a family that shares inputs otherwise
the Gram estimate is an upper bound.
"""
from __future__ import annotations

from dataclasses import dataclass

from .arch import SHARED_INPUTS, Architecture, Target
from .runtime import human_bytes

GRAM_FLOAT64_MAX_WIDTH = 8192   # a float64 Gram of width 8192 is 512 MiB; wider ones are kept in float32
PRUNE_OVERHEAD = int(0.6e9)     # prune from stats, beyond its two shards: the interpreter, torch, a few layers


def gram_width_bytes(width: int) -> int:
    """One Gram matrix [width, width]: float64 up to GRAM_FLOAT64_MAX_WIDTH, float32 beyond."""
    return width * width * (8 if width <= GRAM_FLOAT64_MAX_WIDTH else 4)


def input_groups(arch: Architecture) -> list[list[Target]]:
    """The targets that read one input tensor (each group holds one Gram matrix)."""
    grouped: dict[tuple, list[Target]] = {}
    in_moe = {}
    for moe in arch.experts.values():
        for e in range(moe.num_experts):
            for side, names in (("in", moe.inputs[e]), ("mid", moe.middles[e])):
                for n in names:
                    in_moe[n] = (moe.block, e, side)
    for t in arch.targets.values():
        if t.name in in_moe:
            key = ("expert", *in_moe[t.name])
        else:
            parent, _, leaf = t.name.rpartition(".")
            family = next((i for i, names in enumerate(SHARED_INPUTS) if leaf in names), None)
            key = (parent, family) if family is not None else (t.name,)
        grouped.setdefault(key, []).append(t)
    return list(grouped.values())


def gram_bytes(arch: Architecture) -> int:
    return sum(gram_width_bytes(g[0].in_features) for g in input_groups(arch))


def gram_bytes_per_block(arch: Architecture) -> dict[int, int]:
    out: dict[int, int] = {}
    for g in input_groups(arch):
        out[g[0].block] = out.get(g[0].block, 0) + gram_width_bytes(g[0].in_features)
    return out


def moments_bytes(arch: Architecture) -> int:
    """count, sum and sumsq (float64) of every target's input."""
    return sum(8 + 16 * t.in_features for t in arch.targets.values())


@dataclass(frozen=True)
class CalibrationNeeds:
    weights: int           # on the device: the whole model, or one block and the rest when streamed
    streamed: bool
    hidden: int            # the cached block inputs, in and out
    hidden_on_disk: bool
    moments: int
    gram: int              # 0 without --gram
    gram_block: int        # the largest block's Gram matrices, in memory while it runs

    def line(self, device: str) -> str:
        weights = (f"{human_bytes(self.weights)} of weights (one block at a time)" if self.streamed
                   else f"{human_bytes(self.weights)} of weights")
        hidden = f"{human_bytes(self.hidden)} of cached block inputs" + (" (on disk)" if self.hidden_on_disk else "")
        gram = (f", {human_bytes(self.gram_block)} of Gram matrices for the largest block" if self.gram else "")
        disk = f"stats: {human_bytes(self.moments + self.gram)} on disk" + (
            f" ({human_bytes(self.gram)} of it Gram matrices)" if self.gram else "")
        return f"needs about {weights}, {hidden}{gram} on {device}; {disk}"


def calibration_needs(arch: Architecture, weights_total: int, weights_block: int, weights_rest: int,
                      streamed: bool, windows: int, seqlen: int, hidden_size: int, itemsize: int,
                      hidden_on_disk: bool, gram: bool) -> CalibrationNeeds:
    per_block = gram_bytes_per_block(arch) if gram else {}
    return CalibrationNeeds(weights_block + weights_rest if streamed else weights_total, streamed,
                            2 * windows * seqlen * hidden_size * itemsize, hidden_on_disk, moments_bytes(arch),
                            sum(per_block.values()), max(per_block.values(), default=0))


def shared_factor_bytes_per_block(arch: Architecture) -> dict[int, int]:
    """By block: the weight update's factorisations kept for the layers that share an input (q/k/v, gate/up, an
    expert's gate/up): two float32 matrices [in, in] each (``metrics.admm.Factor``). An input that one layer alone
    reads is factorised, used and dropped."""
    out: dict[int, int] = {}
    for g in input_groups(arch):
        if len(g) > 1:
            out[g[0].block] = out.get(g[0].block, 0) + 2 * g[0].in_features ** 2 * 4
    return out


def prune_memory(largest_shard: int, arch: Architecture | None = None, gram: bool = False, workers: int = 1) -> int:
    """prune from stats: two shards in flight (read and written), the interpreter, and for Gram methods the
    largest Gram matrix per worker (and the update's factorisations of shared inputs, for two blocks)."""
    need = 2 * largest_shard + PRUNE_OVERHEAD
    if gram and arch is not None and arch.targets:
        widest = max(t.in_features for t in arch.targets.values())
        shared = shared_factor_bytes_per_block(arch)
        need += workers * factorising_bytes(widest) + 2 * max(shared.values(), default=0)
    return need


def factorising_bytes(width: int) -> int:
    """What one layer's factorisation holds at its peak, for an input ``width`` wide: the Gram matrix as read
    (``gram_width_bytes``) and 16 bytes per entry of working matrices (ADMM's float64 copy and the scale's outer
    product while it normalises, or its float32 G, system, Cholesky factor and inverse; SparseGPT's float64
    system, factor and inverse on the CPU)."""
    return gram_width_bytes(width) + 16 * width * width


# --refine: bytes per trained weight of a block while it is refined: the float32 weight, its gradient, Adam's two
# moments, its value before the steps, the frozen-entry masks (bool and uint8) and the layer-wise fit kept in case
# the steps do not help (the checkpoint's dtype; 2 bytes for bfloat16)
REFINE_BYTES_PER_WEIGHT = 4 + 4 + 8 + 4 + 1 + 1 + 2


@dataclass(frozen=True)
class RefineNeeds:
    block: int             # one block's trained weights, with gradients, Adam's state and the copies
    hidden: int            # the windows' hidden states: dense inputs, pruned inputs, dense outputs, next inputs
    activations: int       # what one step's backward pass keeps, for a batch of windows

    @property
    def total(self) -> int:
        return self.block + self.hidden + self.activations


def hidden_width(arch: Architecture) -> int:
    """The hidden size: the input width most targets read (q/k/v, the MLP's or experts' gate and up)."""
    from collections import Counter

    widths = Counter(t.in_features for t in arch.targets.values())
    return widths.most_common(1)[0][0] if widths else 0


def refine_needs_of(arch: Architecture, heads: int, samples: int, seqlen: int, batch: int) -> RefineNeeds:
    """``refine_needs`` for ``arch``: its largest block's targets (a mixture's: every expert), its
    ``hidden_width`` and its widest output (the MLP's)."""
    per_block: dict[int, int] = {}
    for t in arch.targets.values():
        per_block[t.block] = per_block.get(t.block, 0) + t.in_features * t.out_features
    return refine_needs(max(per_block.values(), default=0), hidden_width(arch),
                        max((t.out_features for t in arch.targets.values()), default=0), heads, samples, seqlen,
                        batch)


def refined_bytes(arch: Architecture, itemsize: int) -> int:
    """The refined weights waiting for the writer (``refine.RefinedWeights``): every target's matrix, at
    ``itemsize`` bytes a weight (the checkpoint's dtype)."""
    return sum(t.in_features * t.out_features for t in arch.targets.values()) * itemsize


def refine_needs(block_weights: int, hidden: int, intermediate: int, heads: int, samples: int, seqlen: int,
                 batch: int) -> RefineNeeds:
    """What ``--refine`` holds on its device beyond the model's weights (``refine.py``): the largest block's
    ``block_weights`` trained weights at ``REFINE_BYTES_PER_WEIGHT``; four float32 hidden-state tensors of
    ``samples`` × ``seqlen`` × ``hidden``; and per step, for ``batch`` windows, about 8 hidden-size and 4
    intermediate-size float32 values a token and the attention scores (``heads`` × ``seqlen`` a token, twice)."""
    tokens = samples * seqlen
    per_token = 8 * hidden + 4 * intermediate + 2 * heads * seqlen
    return RefineNeeds(block_weights * REFINE_BYTES_PER_WEIGHT, 4 * tokens * hidden * 4,
                       batch * seqlen * per_token * 4)
