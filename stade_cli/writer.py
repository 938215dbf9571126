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
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from ._version import __version__
from .arch import Target, bias_switches
from .card import CARD_NAME, base_facts, render as render_card
from .checkpoint import (_SAFETENSORS_DTYPES, BIN_INDEX_NAME, INDEX_NAME, REPORT_NAME, ShardReader, ShardWriter,
                         TensorEntry, copy_side_files, output_name, read_header, tensor_bytes)
from .decide import Decisions
from .distributed import staged
from .errors import ModelError, OutputError
from .rewrite import Rewrite
from .metrics import flat_options
from .outputs import Output
from .plan import Plan
from .runtime import Reporter, decision_workers, one_thread_per_worker, worker_pool
from .tensors import count_zeros


@dataclass(frozen=True)
class Layout:
    """How the output differs from the input beyond the weights: bias-corrected layers, the config switches
    turned on for their biases, and the linears that gain a bias tensor (zeros or the correction)."""

    corrected: frozenset
    bias_flags: dict
    new_biases: frozenset
    rewrite: Rewrite = Rewrite()      # --experts, --structure: tensors dropped, renamed, cut, computed, added


def _out_entry(e: TensorEntry, rw: Rewrite) -> tuple[str, str, tuple, int]:
    """An input tensor as the output holds it: its new name and shape (rows of the kept experts)."""
    shape = rw.shape(e.name, e.shape)
    nbytes = e.nbytes if shape == tuple(e.shape) else e.nbytes // max(math.prod(e.shape), 1) * math.prod(shape)
    return rw.out_key(e.name), e.dtype, shape, nbytes


def _output_plan(entries: list[TensorEntry], layout: Layout,
                 by_key: dict[str, list[Target]]) -> list[tuple[str, str, tuple, int]]:
    """The output shard's tensors in write order, by their output names: a target's bias right after its weight;
    nothing of a removed expert."""
    rw = layout.rewrite
    names = {e.name for e in entries}
    single = {k: ts[0] for k, ts in by_key.items() if len(ts) == 1 and ts[0].index is None}
    moved = {f"{single[e.name].name}.bias" for e in entries if e.name in single
             and single[e.name].name in layout.corrected and f"{single[e.name].name}.bias" in names}
    out = []
    by_name = {e.name: e for e in entries}
    following: dict[str, list[str]] = {}
    for key, added in rw.add.items():
        following.setdefault(added.after, []).append(key)
    for e in entries:
        if e.name in moved or e.name in rw.drop:
            continue
        out.append(_out_entry(e, rw))
        itemsize = e.nbytes // max(math.prod(e.shape), 1)
        for key in following.get(e.name, ()):
            shape = tuple(rw.add[key].shape)
            out.append((key, e.dtype, shape, math.prod(shape) * itemsize))
        owner = e.name[: -len(".weight")] if e.name.endswith(".weight") else None
        bias_key = f"{owner}.bias"
        if owner is None:
            continue
        if bias_key in moved:
            out.append(_out_entry(by_name[bias_key], rw))
        elif owner in layout.new_biases and bias_key not in names:
            itemsize = e.nbytes // max(math.prod(e.shape), 1)
            out.append((rw.out_key(bias_key), e.dtype, (e.shape[0],), e.shape[0] * itemsize))
    for target in (single[e.name] for e in entries if e.name in single):
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
    layout = Layout(decisions.corrected, bias_flags, frozenset(new_biases), decisions.rewrite or Rewrite())
    workers = decision_workers(dev)
    sizes = [(src / f).stat().st_size for f in plan.files]
    mine = world.pick(sizes)
    total = sum(sizes[i] for i in mine)
    with one_thread_per_worker(dev, workers), staged(dest, world) as tmp:
        with world.together():                   # this rank's shards
            with worker_pool(workers) as pool, _disk_full_is_an_error(dest.path, total):
                stream = _Stream(plan, decisions, layout, pool, ahead=2 * workers)
                with reporter.task("pruning", total=total) as advance:
                    for i in mine:
                        stream.shard(plan.files[i], tmp / output_name(plan.files[i]), advance)
        parts = world.gather((stream.layers, stream.added)) if world.several else []
        report = None
        with world.together(), _disk_full_is_an_error(dest.path, total):     # rank 0: the rest, the report last
            if world.main:
                for layers, added in parts[1:]:
                    stream.layers.update(layers)
                    stream.added.update(added)
                order = {output_name(f): i for i, f in enumerate(plan.files)}   # new tensors as one process adds them
                stream.added = dict(sorted(stream.added.items(), key=lambda item: order[item[1]]))
                stream.check_complete()
                copy_side_files(src, tmp)
                _write_index(src, tmp, stream.added, layout.rewrite)
                if layout.bias_flags or layout.rewrite.config:
                    config = json.loads((tmp / "config.json").read_text())
                    config.update(layout.bias_flags)
                    layout.rewrite.apply_config(config)
                    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                written = {"before": sum(sizes), "after": sum((tmp / output_name(f)).stat().st_size for f in plan.files)}
                facts = _report(plan, decisions, layout, stream.layers, written)
                (tmp / CARD_NAME).write_text(render_card(facts), encoding="utf-8")
                report = json.dumps(facts, indent=2) + "\n"
                (tmp / REPORT_NAME).write_text(report)     # the report last: a checkpoint with a report is complete
    return json.loads(report) if report is not None else None


class _Stream:
    """One pass over the input shards: targets decided ``ahead`` tensors in advance on ``pool``."""

    def __init__(self, plan: Plan, decisions: Decisions, layout: Layout, pool: ThreadPoolExecutor, ahead: int):
        self.plan, self.decisions, self.layout, self.pool, self.ahead = plan, decisions, layout, pool, ahead
        rw = layout.rewrite
        self.by_key = {} if decisions.layer is None else {     # what is decided: the kept experts' targets
            k: kept for k, ts in plan.arch.by_key().items() if (kept := [t for t in ts if rw.keeps(t)])}
        self.layers: dict[str, dict] = {}          # per-layer report entries, by output name
        self.added: dict[str, str] = {}            # new tensor → shard (for the index)

    def _job(self, targets: list[Target], tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """The pruned tensor, its bias change (a lone linear's) and the report entries of the targets it holds."""
        layer = self.decisions.layer
        rw = self.layout.rewrite
        if len(targets) == 1 and targets[0].index is None and not targets[0].transposed:
            target = targets[0]
            decision = layer(target, tensor)
            pruned = decision.weight_for(tensor)
            return pruned, decision.bias_delta, {rw.target_name(target): _layer_info(target, pruned, self.plan,
                                                                                   self.decisions, self.layout)}
        out = tensor.clone()                       # several experts in one tensor: each slice is its own matrix
        infos = {}
        for t in targets:
            matrix = t.matrix(tensor)
            new = layer(t, matrix).weight_for(matrix)
            t.store(out, new)
            infos[rw.target_name(t)] = _layer_info(t, new, self.plan, self.decisions, self.layout)
        return out, None, infos

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
        rw = self.layout.rewrite
        entry_by_out = {rw.out_key(e.name): e for e in f.entries if e.name not in rw.drop}
        added = {key: entry_by_out[rw.out_key(a.after)] for key, a in rw.add.items() if rw.out_key(a.after) in entry_by_out}
        queued = iter([e for e in f.entries if e.name in self.by_key])
        futures: dict[str, Future] = {}            # by input key
        biases: dict[str, torch.Tensor] = {}       # bias tensors to write next, by output name
        for e in f.entries:
            if e.name in rw.drop:
                advance(e.nbytes)
        for name, *_ in out_plan:
            while len(futures) < self.ahead and (nxt := next(queued, None)) is not None:
                futures[nxt.name] = self.pool.submit(self._job, self.by_key[nxt.name], f.get_tensor(nxt.name))
            entry = entry_by_out.get(name)
            key = entry.name if entry is not None else None
            if key in futures:
                tensor, delta, infos = futures.pop(key).result()
                self.layers.update(infos)
                if rw.changes(key):
                    tensor = rw.value(key, tensor)
                writer.write(name, tensor_bytes(tensor))
                target = self.by_key[key][0]
                bias = _new_bias(target, delta, tensor.dtype, self.layout, f) if len(self.by_key[key]) == 1 else None
                if bias is not None:
                    biases[rw.out_key(target.bias_key)] = bias
            elif name in biases:
                writer.write(name, tensor_bytes(biases.pop(name)))
            elif name in added:                    # a new tensor of the rewrite, in its predecessor's dtype
                value = rw.add[name].value().to(_torch_dtype(added[name].dtype)).contiguous()
                writer.write(name, tensor_bytes(value))
            elif entry is None:                    # a zero bias for a sibling that is not pruned
                weight = entry_by_out[f"{name[: -len('.bias')]}.weight"]
                writer.write(name, tensor_bytes(torch.zeros(weight.shape[0], dtype=_torch_dtype(weight.dtype))))
            elif rw.changes(key):                  # kept rows or columns (experts, channels), or a computed value
                writer.write(name, tensor_bytes(rw.value(key, f.get_tensor(key))))
            else:
                f.copy(entry, writer, name)
            if entry is None:
                self.added[name] = out_name
            else:
                advance(entry.nbytes)

    def check_complete(self) -> None:
        if self.decisions.layer is None:
            return
        rw = self.layout.rewrite
        missing = [t.weight_key for t in self.plan.arch.targets.values()
                   if rw.keeps(t) and rw.target_name(t) not in self.layers]
        if missing:
            raise ModelError(f"the weight shards hold no tensor {missing[0]}",
                             "the checkpoint does not match its config")
        lost = sorted(f"{n}.bias" for n in self.layout.new_biases
                      if rw.out_key(f"{n}.bias") not in self.added and f"{n}.bias" not in self.added)
        if lost:
            raise ModelError(f"no weight found for the new bias {lost[0]}")


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


def _write_index(src: Path, tmp: Path, added: dict[str, str], rw: Rewrite = Rewrite()) -> None:
    """The output's safetensors index: the input's (a .bin index with the shards renamed; removed experts' tensors
    out, kept ones renumbered) plus the new tensors; none for a single-file checkpoint."""
    for name in (INDEX_NAME, BIN_INDEX_NAME):
        if (src / name).is_file():
            index = json.loads((src / name).read_text())
            break
    else:
        return
    weight_map = {rw.out_key(k): output_name(v) for k, v in index.get("weight_map", {}).items() if k not in rw.drop}
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


def _coverage(plan: Plan, layout: Layout, layers: dict) -> dict:
    """The pruned targets' share of the output's decoder-block weights (after any expert removal)."""
    rw = layout.rewrite
    prefixes = tuple(b + "." for b in plan.arch.blocks)
    blocks = sum(math.prod(rw.shape(k, s)) for k, s in plan.shapes.items() if k.startswith(prefixes)
                 and k not in rw.drop)
    targets = sum(l["shape"][0] * l["shape"][1] for l in layers.values())
    return {"target_params": targets, "block_params": blocks, "share": targets / max(blocks, 1)}


def _params(plan: Plan, layout: Layout) -> dict:
    """The checkpoint's parameter count (every tensor) before and after: smaller after removing experts, channels or
    blocks; a new bias adds its few."""
    rw = layout.rewrite
    before = sum(math.prod(s) for s in plan.shapes.values())
    after = sum(math.prod(rw.shape(k, s)) for k, s in plan.shapes.items() if k not in rw.drop)
    after += sum(math.prod(a.shape) for a in rw.add.values())
    after += sum(plan.arch.targets[n].out_features for n in layout.new_biases if n in plan.arch.targets)
    return {"before": before, "after": after, "removed": 1 - after / max(before, 1)}


def _report(plan: Plan, decisions: Decisions, layout: Layout, layers: dict, written: dict | None = None) -> dict:
    zeros = sum(l["zeros"] for l in layers.values())
    params = sum(l["shape"][0] * l["shape"][1] for l in layers.values())
    rw = layout.rewrite
    order = [rw.target_name(t) for t in plan.arch.targets.values() if rw.keeps(t)]
    layers = {name: layers[name] for name in order if name in layers}
    req = plan.request
    pruned = decisions.layer is not None
    experts = None
    if plan.arch.experts:
        experts = {"blocks": len(plan.arch.experts), "fallback": decisions.fallback,
                   "removal": dict(rw.facts) if rw.kind == "experts" else None}
    return {
        "tool": "stade", "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": plan.method.name if pruned else None,
        "update": plan.update.name if plan.update is not None and pruned else None,
        "pattern": plan.pattern.name if pruned else None, "group": getattr(plan.pattern, "group", None),
        "target_sparsity": plan.pattern.target_sparsity if pruned else None,
        "mode": "sequential" if req.sequential else "one-shot",
        "refine": decisions.refined,
        "recipe": dict(req.recipe) if req.recipe else None,
        "options": flat_options(plan.options),
        "bias_correction": {"layers": len(layout.corrected), "config_flags": layout.bias_flags,
                            "new_bias_tensors": len(layout.new_biases),
                            # the bias tensors the output has and the model had not (inspect's coverage leaves
                            # them out, as the report's own does)
                            "added": sorted(f"{n}.bias" for n in layout.new_biases if f"{n}.bias" not in plan.shapes)},
        "layer_sparsity": {"method": req.layer_sparsity,
                           **(dict(owl_m=req.owl_m, owl_lambda=req.owl_lambda) if req.layer_sparsity == "owl" else {}),
                           "blocks": {str(b): s for b, s in (decisions.block_sparsity or {}).items()}},
        "model": plan.source.identity(), "base": _base(plan), "command": req.command,
        "stats": decisions.stats_manifest,
        "overall": {"zeros": zeros, "params": params, "sparsity": zeros / max(params, 1)},
        "coverage": _coverage(plan, layout, layers),
        "params": _params(plan, layout),
        "experts": experts,
        "structure": dict(rw.facts) if rw.kind in ("channels", "blocks") else None,
        "weight_bytes": written,
        "seconds": round(time.perf_counter() - plan.started, 2),
        "evaluations": [],                  # `stade eval OUT --record` appends here (and to the card)
        "layers": layers,
    }


def _base(plan: Plan) -> dict:
    src = plan.source
    return base_facts(src.path, src.ref, src.revision, from_hub=not Path(src.ref).expanduser().exists())
