"""Run calibration text through the model and accumulate the input moments of every target linear.

A forward pre-hook on each target ``nn.Linear`` sees its input x: [batch, seq, in]. Linears that read the
same tensor (q/k/v, gate/up) are detected by identity: the moments of that tensor are computed once
and shared, and the groups are recorded in the manifest.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path

import torch

from safetensors.torch import save_file

from ..arch import HIDDEN_SIZE_KEYS, Architecture, bias_flag_table, config_value, coverage, describe, meta_model
from ..checkpoint import ModelSource, tensor_shapes
from ..distributed import World, claimed, current, staged
from ..errors import StatsError, check_types
from ..estimate import GRAM_FLOAT64_MAX_WIDTH, calibration_needs
from ..loading import STREAM, CalibrationSpec, Runtime, resolve_for, run_inputs
from ..outputs import Output, check_space
from ..runtime import Reporter, available_bytes, human_bytes
from .experts import ExpertCapture, ExpertStats
from .moments import Moments, block_distance
from .store import FORMAT, GRAM_DIR, Stats, gram_file, write_stats


def is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm, RMSNorm and their per-model subclasses (LlamaRMSNorm, GemmaRMSNorm, ...)."""
    return "norm" in type(module).__name__.lower()


class MomentCapture:
    """Forward pre-hooks that accumulate Moments per target linear, and note which linears read a norm's output.

    A linear reads a norm's output when the tensor it receives is the very tensor a normalisation
    module returned; norm outputs are remembered only until the end of their decoder block.
    """

    def __init__(self, model: torch.nn.Module, arch: Architecture, device: torch.device, gram: bool = False):
        modules = dict(model.named_modules())
        self.arch = arch
        self.moments = {name: Moments.zeros(t.in_features, device) for name, t in arch.targets.items()}
        self.gram = gram
        self.grams: dict[str, torch.Tensor] = {}       # by leader (first linear reading that input): Σ x xᵀ
        self.leader: dict[str, str] = {}
        self.reads_norm: dict[str, bool] = {}
        self.experts: dict[int, ExpertStats] = {}      # by block: routing statistics of its experts
        self.distance = torch.zeros(2, dtype=torch.float64)   # Σ (1 − cos(block input, output)) over tokens, tokens
        self._last_x: torch.Tensor | None = None
        self._last: Moments | None = None
        self._last_name = ""
        self._norm_outputs: dict[int, torch.Tensor] = {}
        linears = [n for n in arch.targets if isinstance(modules.get(n), torch.nn.Linear)]
        self._handles = [modules[name].register_forward_pre_hook(self._hook(name)) for name in linears]
        self._captures: list[ExpertCapture] = []
        for b, moe in arch.experts.items():             # experts held as fused 3-D parameters: run by us
            if moe.fused_runtime:
                self.experts[b] = ExpertStats.zeros(moe.num_experts)
                self._captures.append(ExpertCapture(modules[moe.module], self.experts[b],
                                                    self._routed(moe.inputs), self._routed(moe.middles)))
        for block_name in arch.blocks:
            block = modules[block_name]
            self._handles += [m.register_forward_hook(self._norm_hook) for m in block.modules() if is_norm(m)]
            self._handles.append(block.register_forward_hook(self._block_done))

    def block_output(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """How much the block changes its input, token by token: 1 − cos(x, y) (ShortGPT's block importance)."""
        total, tokens = block_distance(x, y)
        self.distance[0] += total
        self.distance[1] += tokens

    def _routed(self, groups: tuple[tuple[str, ...], ...]):
        """Recorder of what expert e's targets in ``groups[e]`` read: x [tokens routed to it, in]."""
        def record(e: int, x: torch.Tensor) -> None:
            names = [n for n in groups[e] if n in self.moments]
            if not names:
                return
            m = Moments.of(x)
            for n in names:
                self.moments[n].count += m.count
                self.moments[n].sum += m.sum
                self.moments[n].sumsq += m.sumsq
                self.leader.setdefault(n, names[0])
                self.reads_norm.setdefault(n, False)
            if self.gram:
                self._add_gram(names[0], x)
        return record

    def _norm_hook(self, module, args, output):
        if isinstance(output, torch.Tensor):
            self._norm_outputs[id(output)] = output  # keep it alive so its id stays unique

    def _block_done(self, module, args, output):
        self._norm_outputs.clear()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]  # [batch, seq, in]
            if x is not self._last_x:  # a new input tensor: its moments (and Gram) once
                self._last_x, self._last, self._last_name = x, Moments.of(x), name
                if self.gram:
                    self._add_gram(name, x)
            m = self.moments[name]
            m.count += self._last.count
            m.sum += self._last.sum
            m.sumsq += self._last.sumsq
            self.leader.setdefault(name, self._last_name)
            self.reads_norm.setdefault(name, self._norm_outputs.get(id(x)) is x)
        return hook

    def _add_gram(self, leader: str, x: torch.Tensor) -> None:
        """H += Σ xxᵀ: the batch's product in float32, accumulated in float64 where the width allows."""
        x2 = x.detach().reshape(-1, x.shape[-1]).float()               # [tokens, in]
        if leader not in self.grams:
            dtype = torch.float64 if x2.shape[1] <= GRAM_FLOAT64_MAX_WIDTH else torch.float32
            self.grams[leader] = torch.zeros(x2.shape[1], x2.shape[1], dtype=dtype, device=x2.device)
        self.grams[leader] += (x2.T @ x2).to(self.grams[leader].dtype)

    def end_batch(self) -> None:
        self._last_x = self._last = None  # release the activation
        self._norm_outputs.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for c in self._captures:
            c.remove()
        self._captures = []

    def finish(self) -> None:
        """Experts that are plain linears (transformers 4.x): their token counts, from their inputs' moments; the
        router weights they carried are not seen there."""
        for b, moe in self.arch.experts.items():
            if not moe.fused_runtime:
                count = torch.tensor([float(self.moments[x[0]].count) if x and x[0] in self.moments else 0.0
                                      for x in moe.inputs], dtype=torch.float64)
                self.experts[b] = ExpertStats(count, None, None)

    def shared_inputs(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for name, leader in self.leader.items():
            groups.setdefault(leader, []).append(name)
        return groups


class Collected:
    """What calibration gathered over all blocks, on the CPU: the union of the per-block captures."""

    def __init__(self):
        self.moments: dict[str, Moments] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.leader: dict[str, str] = {}
        self.reads_norm: dict[str, bool] = {}
        self.experts: dict[int, ExpertStats] = {}
        self.distances: dict[int, torch.Tensor] = {}     # by block: [Σ (1 − cos), tokens]

    def add(self, capture: MomentCapture, index: int | None = None) -> None:
        capture.finish()
        if index is not None:
            self.distances[index] = capture.distance
        self.moments.update({n: m.to("cpu") for n, m in capture.moments.items()})
        self.grams.update({n: h.cpu() for n, h in capture.grams.items()})
        self.leader.update(capture.leader)
        self.reads_norm.update(capture.reads_norm)
        self.experts.update(capture.experts)

    shared_inputs = MomentCapture.shared_inputs


def collect_moments(model, arch: Architecture, windows: torch.Tensor, device: torch.device,
                    batch_size: int = 1, reporter: Reporter | None = None, gram: bool = False,
                    placement=None, after_block=None) -> Collected:
    """Run ``windows`` [n, seqlen] through the decoder block by block with moment hooks on every target.

    Each block sees all windows before the next one runs (``blockwise.BlockRunner``), so only one block
    has to be on the device; the LM head never runs. ``after_block(index, capture)`` sees each block's capture
    before it is collected (``compute_stats`` writes its Gram matrices to disk there and drops them).
    """
    from ..blockwise import BlockRunner

    reporter = reporter or Reporter()
    collected = Collected()
    last = len(arch.blocks) - 1
    with BlockRunner(model, arch, windows, device, batch_size, placement, reporter) as runner:
        for index, block, dev in runner.blocks("calibrating"):
            capture = MomentCapture(model, arch.block(index), dev, gram=gram)
            try:
                runner.run(block, dev, keep=index < last, after_batch=capture.end_batch, on_output=capture.block_output)
            finally:
                capture.remove()
            if after_block is not None:
                after_block(index, capture)
            collected.add(capture, index)
    return collected


def sum_over_ranks(collected: "Collected | MomentCapture", world: World) -> None:
    """Each rank's moments and Gram matrices summed in place (float64, on the CPU for gloo, then back where they
    were): afterwards every rank holds the stats of all windows. The moments of all layers travel as one
    tensor; each Gram matrix on its own."""
    if not world.several:
        return
    names = sorted(collected.moments)
    flat = torch.cat([torch.cat([torch.tensor([float(collected.moments[n].count)], dtype=torch.float64),
                                 collected.moments[n].sum.cpu(), collected.moments[n].sumsq.cpu()]) for n in names])
    world.sum_(flat)
    at = 0
    for n in names:
        m, width = collected.moments[n], collected.moments[n].sum.numel()
        m.count = int(flat[at])
        m.sum = flat[at + 1: at + 1 + width].to(m.sum.device, copy=True)
        m.sumsq = flat[at + 1 + width: at + 1 + 2 * width].to(m.sumsq.device, copy=True)
        at += 1 + 2 * width
    for leader in sorted(collected.grams):
        h = collected.grams[leader]
        total = world.sum_(h.to("cpu", torch.float64, copy=True))
        collected.grams[leader] = total.to(h.device, h.dtype)
    for b in sorted(collected.experts):
        for t in collected.experts[b].tensors():
            t.copy_(world.sum_(t.to("cpu", torch.float64, copy=True)))
    for b in sorted(getattr(collected, "distances", {})):
        d = collected.distances[b]
        d.copy_(world.sum_(d.to("cpu", torch.float64, copy=True)))


def compute_stats(model: str | ModelSource, dataset: str = "c4", nsamples: int = 128, seqlen: int | None = None,
                  seed: int = 0, device: str = "auto", dtype: str = "auto", batch_size: int = 1,
                  reporter: Reporter | None = None, only: str | None = None, skip: str | None = None,
                  gram: bool = False, placement=None, world: World | None = None,
                  gram_dir: Path | None = None) -> Stats:
    """Calibrate: the Stats that ``calibrate`` writes. Moments in memory; Gram matrices in memory, or with
    ``gram_dir`` written there block by block as each block is done (``gram/block_NNNN.safetensors``, by rank 0),
    so that only one block's are ever held.

    Under a launcher (``world``, default: this process's) each rank runs its contiguous share of the windows
    and the sums are added up, so every rank returns the stats of all windows.
    """
    reporter = reporter or Reporter()
    world = world or current()
    rt = Runtime.of(model, device, dtype)
    spec = CalibrationSpec(dataset, nsamples, seqlen, seed, batch_size)
    spec.check()
    placement = rt.settle(placement, reporter)        # the blocks streamed when the model would not fit
    windows = spec.windows(rt)                        # the same windows on every rank: sampled from the seed
    start, stop = world.windows(len(windows))
    disk = tensor_shapes(rt.source.path)              # targets are named as the checkpoint stores them
    needs = _needs(rt, describe(meta_model(rt.config), only=only, skip=skip, disk=disk), placement, stop - start,
                   int(windows.shape[1]), gram)
    reporter.log(needs.line(str(rt.device)))
    if gram and gram_dir is not None:
        check_space(gram_dir, needs.moments + needs.gram)
    elif gram and needs.gram > available_bytes(torch.device("cpu")) // 2:
        raise StatsError(f"calibrating here keeps every Gram matrix in memory ({human_bytes(needs.gram)}; "
                         f"{human_bytes(available_bytes(torch.device('cpu')))} free)",
                         "write them to disk with `stade calibrate --gram` first and prune with --stats, or prune "
                         "--sequential, which needs none")
    ranks = f"; {world.size} ranks, windows {start}-{stop - 1} here" if world.several else ""
    reporter.log(f"calibrating {rt.source.ref} on {dataset}: {nsamples} × {windows.shape[1]} tokens, "
                 f"{rt.device}, {rt.dtype_name}{ranks}")
    t0 = time.perf_counter()
    written: dict[str, int] = {}                      # Gram leader → its block, once written to gram_dir
    written_bytes = [0]

    def to_disk(index: int, capture: MomentCapture) -> None:
        """A block's Gram matrices summed over the ranks and written by rank 0, then dropped from memory."""
        grams = {}
        for leader in sorted(capture.grams):
            h = capture.grams[leader]
            grams[leader] = (world.sum_(h.to("cpu", torch.float64, copy=True)).to(h.dtype) if world.several
                             else h.cpu()).contiguous()
            written[leader] = index
            written_bytes[0] += h.numel() * h.element_size()
        capture.grams.clear()
        if grams and world.main:
            (Path(gram_dir) / GRAM_DIR).mkdir(exist_ok=True)
            save_file(grams, str(Path(gram_dir) / GRAM_DIR / gram_file(index)), metadata={"format": FORMAT})

    with world.together():
        with rt.model(placement) as net:
            arch = describe(net, only=only, skip=skip, disk=disk)
            unknown = coverage(arch, disk, skip).unknown
            if unknown:
                reporter.log(f"note: {unknown[0]} ({len(disk[unknown[0]])}-D) is neither a layer stade prunes nor "
                             "one known to stay dense; prune will refuse it unless --skip accepts it")
            capture = collect_moments(net, arch, windows[start:stop], rt.device, batch_size, reporter, gram=gram,
                                      placement=placement,
                                      after_block=to_disk if gram and gram_dir is not None else None)
            whole = describe(net, disk=disk)            # unfiltered: prune applies its own --only/--skip
    sum_over_ranks(capture, world)
    seconds = time.perf_counter() - t0
    whole.bias_flags = bias_flag_table(rt.config)
    manifest = {
        "model": rt.source.identity(),
        "architecture": whole.to_data(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **spec.manifest(windows, rt), "tokens": int(windows.numel()),
        "seconds": round(seconds, 2), "world_size": world.size,
        "modules": {n: {"in_features": t.in_features, "block": t.block,
                        "reads_norm": capture.reads_norm.get(n, False)} for n, t in arch.targets.items()},
        "shared_inputs": capture.shared_inputs(),
    }
    if placement is not None and placement.dispatched:
        manifest["placement"] = placement.describe()
    moments = capture.moments
    grams = capture.grams
    if gram:
        blocks = {leader: arch.targets[leader].block for leader in grams} if gram_dir is None else written
        manifest["gram"] = {"groups": capture.shared_inputs(), "blocks": blocks}
        if gram_dir is not None:
            manifest["gram"]["bytes"] = written_bytes[0]
    if capture.experts:
        manifest["experts"] = {"blocks": sorted(capture.experts),
                               "reap": all(e.reap is not None for e in capture.experts.values()),
                               "router_weights": all(e.gate is not None for e in capture.experts.values())}
    if capture.distances:
        manifest["blocks"] = {"distance": "mean over tokens of 1 − cos(block input, block output)"}
    return Stats(manifest, moments, grams=grams, experts=capture.experts, distances=capture.distances,
                 path=Path(gram_dir) if gram and gram_dir is not None else None)


def _needs(rt: Runtime, arch: Architecture, placement, windows: int, seqlen: int, gram: bool):
    """What this calibration will need (``estimate.py``), from the model's description and the run's options."""
    from ..blockwise import HiddenCache

    fp = rt.footprint()
    hidden_size = config_value(rt.config, HIDDEN_SIZE_KEYS) or 0
    spill = getattr(placement, "spill", "auto")
    hidden = HiddenCache.nbytes((windows, seqlen, hidden_size), rt.dtype)
    on_disk = spill == "disk" or (spill == "auto" and hidden > available_bytes(rt.device) // 2)
    itemsize = torch.empty((), dtype=rt.dtype).element_size()
    return calibration_needs(arch, fp.total, fp.block, fp.rest, placement.device_map == STREAM, windows, seqlen,
                             hidden_size, itemsize, on_disk, gram)


def calibrate(model: str, out: str | Path, dataset: str = "c4", nsamples: int = 128, seqlen: int | None = None,
              seed: int = 0, device: str = "auto", dtype: str = "auto", batch_size: int = 1, force: bool = False,
              gram: bool = False, reporter: Reporter | None = None, placement=None) -> Path:
    """Calibrate ``model`` and write the STATS directory ``out``; returns its path.

    ``force`` replaces an empty directory or stats that stade wrote, never anything else (``outputs.py``).
    """
    reporter = reporter or Reporter()
    model, dataset = os.fspath(model), dataset and os.fspath(dataset)     # a Path is as good as a string
    check_types(calibrate, dict(locals()), skip=("device",))     # sparsity="0.5": named, not a TypeError
    world = current()
    out = Path(out).expanduser()
    dest = Output(out, "stats", force, reporter.log)
    with claimed(dest, world, run_inputs(model, dataset, placement)):   # checked and locked before the work
        source = resolve_for(model, dest, world, dataset, placement)
        with staged(dest, world) as tmp:              # Gram matrices go straight into it, block by block
            stats = compute_stats(source, dataset, nsamples, seqlen, seed, device, dtype, batch_size, reporter,
                                  gram=gram, placement=placement, world=world, gram_dir=tmp)
            with world.together():
                if world.main:
                    write_stats(tmp, stats)
    return out
