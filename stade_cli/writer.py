"""The write stage: stream the input shards tensor by tensor into the output checkpoint.

Each shard is read one tensor at a time; a target's decision is made (or looked up) on a small thread pool,
and its pruned tensor written as soon as it is ready, in the shard's order; untouched tensors are copied as
raw bytes. Then the index, the side files (config with any bias switches turned on, tokenizer, ...) and
``stade_report.json``, all inside the output's staging directory, which ``outputs.Output`` puts in place.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import math
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from ._version import __version__
from .arch import Target, bias_switches
from .checkpoint import (_SAFETENSORS_DTYPES, BIN_INDEX_NAME, INDEX_NAME, REPORT_NAME, ShardReader, ShardWriter,
                         TensorEntry, copy_side_files, output_name, read_header, tensor_bytes)
from .decide import Decisions
from .distributed import World
from .errors import ModelError, OutputError
from .metrics import flat_options
from .outputs import Output
from .plan import Plan
from .runtime import Reporter
from .tensors import count_zeros


@dataclass(frozen=True)
class Layout:
    """How the output differs from the input beyond the weights: bias-corrected layers, the config switches
    turned on for their biases, and the linears that gain a bias tensor (zeros or the correction)."""

    corrected: frozenset
    bias_flags: dict
    new_biases: frozenset


def _output_plan(entries: list[TensorEntry], layout: Layout, by_key: dict[str, Target]) -> list[tuple[str, str, tuple, int]]:
    """The output shard's tensors in write order: a target's bias right after its weight."""
    names = {e.name for e in entries}
    moved = {f"{by_key[e.name].name}.bias" for e in entries if e.name in by_key
             and by_key[e.name].name in layout.corrected and f"{by_key[e.name].name}.bias" in names}
    out = []
    by_name = {e.name: e for e in entries}
    for e in entries:
        if e.name in moved:
            continue
        out.append((e.name, e.dtype, e.shape, e.nbytes))
        owner = e.name[: -len(".weight")] if e.name.endswith(".weight") else None
        bias_key = f"{owner}.bias"
        if owner is None:
            continue
        if bias_key in moved:
            b = by_name[bias_key]
            out.append((b.name, b.dtype, b.shape, b.nbytes))
        elif owner in layout.new_biases and bias_key not in names:
            itemsize = e.nbytes // max(math.prod(e.shape), 1)
            out.append((bias_key, e.dtype, (e.shape[0],), e.shape[0] * itemsize))
    for target in (by_key[e.name] for e in entries if e.name in by_key):
        if target.name in layout.corrected and target.has_bias and target.bias_key not in names:
            raise ModelError(f"the bias of {target.name} is stored in another shard than its weight; "
                             "bias correction cannot update it", "pass --no-bias-correction")
    return out


def write(plan: Plan, decisions: Decisions, dest: Output, reporter: Reporter) -> dict | None:
    """Read each shard tensor by tensor, decide targets on a small thread pool, write in order into
    ``dest``'s staging directory, which is put in place when complete; returns the report.

    Untouched tensors are copied as raw bytes; a pruned tensor is written as soon as it is ready, so
    reading, computing and writing overlap and only a few tensors are in memory at once. Under several ranks
    (``plan.world``) each writes its own shards (balanced by bytes) into rank 0's staging directory; rank 0
    writes the rest and returns the report, the others None.
    """
    src, dev, world = plan.source.path, plan.device, plan.world
    needed = {n for n in decisions.corrected if not plan.arch.targets[n].has_bias}
    bias_flags, new_biases = bias_switches(plan.bias_table, plan.arch.model_type, needed)
    layout = Layout(decisions.corrected, bias_flags, frozenset(new_biases))
    workers = 2 if dev.type != "cpu" else max(1, min(4, torch.get_num_threads()))
    sizes = [(src / f).stat().st_size for f in plan.files]
    mine = world.pick(sizes)
    total = sum(sizes[i] for i in mine)
    with _one_thread_per_worker(dev, workers), _staging(dest, world) as tmp:
        with world.together():                   # this rank's shards
            with ThreadPoolExecutor(workers, thread_name_prefix="stade-prune") as pool, \
                    _disk_full_is_an_error(dest.path, total):
                stream = _Stream(plan, decisions, layout, pool, ahead=2 * workers)
                with reporter.task("pruning", total=total) as advance:
                    for i in mine:
                        stream.shard(plan.files[i], tmp / output_name(plan.files[i]), advance)
        parts = world.gather((stream.layers, stream.added)) if world.several else []
        report = None
        with world.together():                   # rank 0: the rest, the report last
            if world.main:
                for layers, added in parts[1:]:
                    stream.layers.update(layers)
                    stream.added.update(added)
                order = {output_name(f): i for i, f in enumerate(plan.files)}   # new tensors as one process adds them
                stream.added = dict(sorted(stream.added.items(), key=lambda item: order[item[1]]))
                stream.check_complete()
                copy_side_files(src, tmp)
                _write_index(src, tmp, stream.added)
                if layout.bias_flags:
                    config = json.loads((tmp / "config.json").read_text())
                    config.update(layout.bias_flags)
                    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                report = json.dumps(_report(plan, decisions, layout, stream.layers), indent=2) + "\n"
                (tmp / REPORT_NAME).write_text(report)     # the report last: a checkpoint with a report is complete
    return json.loads(report) if report is not None else None


@contextmanager
def _staging(dest: Output, world: World):
    """``dest.staging()`` on rank 0, its path told to every rank; it is published (rank 0) only when every rank's
    part succeeded, and all ranks learn whether publishing did."""
    if not world.several:
        with dest.staging() as tmp:
            yield tmp
        return
    stack = ExitStack()
    tmp = None
    with world.together():
        if world.main:
            tmp = stack.enter_context(dest.staging())
    try:
        yield Path(world.broadcast(str(tmp) if tmp is not None else None))
    except BaseException:
        if not stack.__exit__(*sys.exc_info()):
            raise
        return
    with world.together():
        stack.close()                            # rank 0: record, flush, rename


class _Stream:
    """One pass over the input shards: targets decided ``ahead`` tensors in advance on ``pool``."""

    def __init__(self, plan: Plan, decisions: Decisions, layout: Layout, pool: ThreadPoolExecutor, ahead: int):
        self.plan, self.decisions, self.layout, self.pool, self.ahead = plan, decisions, layout, pool, ahead
        self.by_key = plan.arch.by_weight_key()
        self.layers: dict[str, dict] = {}          # per-layer report entries
        self.added: dict[str, str] = {}            # new tensor → shard (for the index)

    def _job(self, target: Target, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        decision = self.decisions.layer(target, tensor)
        pruned = decision.weight_for(tensor)
        return pruned, decision.bias_delta, _layer_info(target, pruned, self.plan, self.decisions, self.layout)

    def shard(self, fname: str, out: Path, advance) -> None:
        src = self.plan.source.path / fname
        try:
            with ShardReader(src) as f:
                out_plan = _output_plan(f.entries, self.layout, self.by_key)
                with ShardWriter(out, out_plan, f.metadata) as writer:
                    self._tensors(out.name, out_plan, f, writer, advance)
        except SafetensorError as exc:
            raise ModelError(f"cannot read weight shard {src}: {exc}",
                             "the file is truncated or corrupt; re-download it") from None

    def _tensors(self, out_name: str, out_plan, f: ShardReader, writer: ShardWriter, advance) -> None:
        """Every tensor of the output shard, in order: pruned targets, their biases, copies of the rest."""
        entry_by_name = {e.name: e for e in f.entries}
        queued = iter([e for e in f.entries if e.name in self.by_key])
        futures: dict[str, Future] = {}
        biases: dict[str, torch.Tensor] = {}       # bias tensors to write next
        for name, *_ in out_plan:
            while len(futures) < self.ahead and (nxt := next(queued, None)) is not None:
                futures[nxt.name] = self.pool.submit(self._job, self.by_key[nxt.name], f.get_tensor(nxt.name))
            entry = entry_by_name.get(name)
            if name in futures:
                tensor, delta, info = futures.pop(name).result()
                target = self.by_key[name]
                self.layers[target.name] = info
                writer.write(name, tensor_bytes(tensor))
                bias = _new_bias(target, delta, tensor.dtype, self.layout, f)
                if bias is not None:
                    biases[target.bias_key] = bias
            elif name in biases:
                writer.write(name, tensor_bytes(biases.pop(name)))
            elif entry is None:                    # a zero bias for a sibling that is not pruned
                weight = entry_by_name[f"{name[: -len('.bias')]}.weight"]
                writer.write(name, tensor_bytes(torch.zeros(weight.shape[0], dtype=_torch_dtype(weight.dtype))))
            else:
                f.copy(entry, writer)
            if entry is None:
                self.added[name] = out_name
            else:
                advance(entry.nbytes)

    def check_complete(self) -> None:
        missing = [t.weight_key for t in self.plan.arch.targets.values() if t.name not in self.layers]
        if missing:
            raise ModelError(f"the weight shards hold no tensor {missing[0]}",
                             "the checkpoint does not match its config")
        lost = sorted(f"{n}.bias" for n in self.layout.new_biases if f"{n}.bias" not in self.added)
        if lost:
            raise ModelError(f"no weight found for the new bias {lost[0]}")


@contextmanager
def _one_thread_per_worker(dev: torch.device, workers: int):
    """On the CPU the pool already keeps every core busy: torch's own intra-op threads would oversubscribe."""
    if dev.type != "cpu" or workers < 2:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _disk_full_is_an_error(out: Path, needed: int):
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise OutputError(f"the disk filled up while writing {out}; it needs about {needed:,} bytes",
                          "free some space and run again; nothing was left behind") from None


def _new_bias(target: Target, delta: torch.Tensor | None, dtype: torch.dtype, layout: Layout, f) -> torch.Tensor | None:
    """The bias to write for a pruned target: old bias (or zeros) + delta; None when the old one stays as is."""
    if delta is None and target.name not in layout.new_biases:
        return None
    bias = f.get_tensor(target.bias_key).double() if target.has_bias else torch.zeros(target.out_features,
                                                                                       dtype=torch.float64)
    return (bias + delta if delta is not None else bias).to(dtype)


def _torch_dtype(safetensors_dtype: str) -> torch.dtype:
    return getattr(torch, _SAFETENSORS_DTYPES[safetensors_dtype])


def _write_index(src: Path, tmp: Path, added: dict[str, str]) -> None:
    """The output's safetensors index: the input's (a .bin index with the shards renamed) plus the new
    tensors; none for a single-file checkpoint."""
    for name in (INDEX_NAME, BIN_INDEX_NAME):
        if (src / name).is_file():
            index = json.loads((src / name).read_text())
            break
    else:
        return
    weight_map = {k: output_name(v) for k, v in index.get("weight_map", {}).items()}
    weight_map.update(added)
    index["weight_map"] = weight_map
    files = sorted(set(weight_map.values()))
    index.setdefault("metadata", {})["total_size"] = sum(
        sum(e.nbytes for e in read_header(tmp / f)[0]) for f in files)
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _layer_info(target: Target, weight: torch.Tensor, plan: Plan, decisions: Decisions, layout: Layout) -> dict:
    zeros = count_zeros(weight)
    return {"block": target.block, "shape": [target.out_features, target.in_features],
            "zeros": zeros, "sparsity": zeros / weight.numel(),
            "target_sparsity": plan.pattern_for(target, decisions.block_sparsity).target_sparsity,
            "bias_corrected": target.name in layout.corrected,
            "reads_norm": decisions.reads_norm.get(target.name, False)}


def _report(plan: Plan, decisions: Decisions, layout: Layout, layers: dict) -> dict:
    zeros = sum(l["zeros"] for l in layers.values())
    params = sum(l["shape"][0] * l["shape"][1] for l in layers.values())
    layers = {name: layers[name] for name in plan.arch.targets if name in layers}
    req = plan.request
    return {
        "tool": "stade", "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": plan.method.name, "update": plan.update.name if plan.update is not None else None,
        "pattern": plan.pattern.name, "group": getattr(plan.pattern, "group", None),
        "target_sparsity": plan.pattern.target_sparsity,
        "mode": "sequential" if req.sequential else "one-shot",
        "options": flat_options(plan.options),
        "bias_correction": {"layers": len(layout.corrected), "config_flags": layout.bias_flags,
                            "new_bias_tensors": len(layout.new_biases)},
        "layer_sparsity": {"method": req.layer_sparsity,
                           **(dict(owl_m=req.owl_m, owl_lambda=req.owl_lambda) if req.layer_sparsity == "owl" else {}),
                           "blocks": {str(b): s for b, s in (decisions.block_sparsity or {}).items()}},
        "model": plan.source.identity(), "stats": decisions.stats_manifest,
        "overall": {"zeros": zeros, "params": params, "sparsity": zeros / max(params, 1)},
        "seconds": round(time.perf_counter() - plan.started, 2),
        "layers": layers,
    }
