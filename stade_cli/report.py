"""Sparsity and stats summaries as plain data (the CLI renders them).

A checkpoint's sparsity is computed from the tensors themselves, not taken from its report; the
report, when present, is only compared against it.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from safetensors import SafetensorError

from .arch import Architecture, coverage, describe, meta_model
from .calibration.store import MANIFEST, load_stats, stats_summary
from .checkpoint import ShardReader, load_config, read_report, resolve_model, tensor_shapes, weight_files
from .errors import ModelError, StadeError, UsageError
from .masks import parse_pattern


def nm_conforms(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of M consecutive inputs of every row has at most N non-zeros."""
    rows, width = weight.shape
    if width % m:
        return False
    return bool(((weight != 0).reshape(rows, width // m, m).sum(-1) <= n).all())


def describe_checkpoint(path: Path) -> tuple[Architecture, dict]:
    """A checkpoint's blocks and targets, named as its shards store them, and every tensor's shape."""
    shapes = tensor_shapes(path)
    return describe(meta_model(load_config(path)), disk=shapes), shapes


def _matrices(path: Path, arch: Architecture):
    """(target, its [out, in] matrix) for every target of the checkpoint at ``path``, shard by shard."""
    by_key = arch.by_key()
    for fname in weight_files(path):
        try:
            with ShardReader(path / fname) as f:
                for key in (k for k in f.keys() if k in by_key):
                    tensor = f.get_tensor(key)
                    for target in by_key[key]:
                        yield target, target.matrix(tensor)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read weight shard {path / fname}: {exc}") from None


def checkpoint_summary(path: Path, pattern: str | None = None) -> dict:
    source = resolve_model(str(path))
    arch, shapes = describe_checkpoint(source.path)
    report = read_report(source.path)
    pattern = pattern or (report or {}).get("pattern")
    nm = parse_pattern(pattern, None) if pattern and ":" in pattern else None
    layers: dict[str, dict] = {}
    for target, w in _matrices(source.path, arch):
        zeros = int((w == 0).sum())
        layers[target.name] = {"block": target.block, "role": arch.role(target.name),
                               "shape": list(w.shape), "zeros": zeros,
                               "params": w.numel(), "sparsity": zeros / w.numel()}
        expected = ((report or {}).get("layers", {}).get(target.name) or {}).get(
            "target_sparsity", (report or {}).get("target_sparsity"))
        if expected is not None:  # floor(S·width) per row: within one weight per row of S
            layers[target.name]["off_target"] = abs(zeros / w.numel() - expected) > 1 / w.shape[1] + 1e-9
        if nm is not None:
            layers[target.name]["nm_ok"] = nm_conforms(w, nm.n, nm.m)
    layers = {name: layers[name] for name in arch.targets if name in layers}  # model order
    blocks: dict[int, dict] = {}
    for info in layers.values():
        b = blocks.setdefault(info["block"], {"block": info["block"], "zeros": 0, "params": 0})
        b["zeros"] += info["zeros"]
        b["params"] += info["params"]
    block_targets = ((report or {}).get("layer_sparsity") or {}).get("blocks") or {}
    widths: dict[int, int] = {}
    for info in layers.values():
        widths[info["block"]] = min(widths.get(info["block"], 1 << 30), info["shape"][1])
    for b in blocks.values():
        b["sparsity"] = b["zeros"] / max(b["params"], 1)
        target = block_targets.get(str(b["block"]), (report or {}).get("target_sparsity"))
        if target is not None:   # each block's own under OWL; floor(S·width) per row: within one weight a row
            b["target"] = target
            b["off_target"] = abs(b["sparsity"] - target) > 1 / widths[b["block"]] + 1e-9
    zeros = sum(l["zeros"] for l in layers.values())
    params = sum(l["params"] for l in layers.values())
    summary = {"kind": "checkpoint", "path": str(source.path), "pattern": pattern,
               "target_sparsity": (report or {}).get("target_sparsity"),
               "method": (report or {}).get("method"), "update": (report or {}).get("update"),
               "refine": {k: v for k, v in ((report or {}).get("refine") or {}).items() if k != "blocks"} or None,
               "recipe": ((report or {}).get("recipe") or {}).get("name"),
               "overall": {"zeros": zeros, "params": params, "sparsity": zeros / max(params, 1)},
               "coverage": _pruned_coverage(arch, shapes, report),
               "experts": _experts_summary(arch, report),
               "structure": (report or {}).get("structure"), "params": (report or {}).get("params"),
               "blocks": [blocks[k] for k in sorted(blocks)], "layers": layers}
    if nm is not None:
        summary["nm_ok"] = all(l["nm_ok"] for l in layers.values())
    if report is not None:
        theirs = report.get("layers", {})
        agrees = set(theirs) <= set(layers) and all(      # what it pruned, as the tensors say
            theirs[n].get("zeros") == layers[n]["zeros"] for n in theirs)
        after = (report.get("params") or {}).get("after")
        if after is not None:                           # what it removed (--structure, --experts), as the shapes say
            agrees = agrees and after == sum(math.prod(shape) for shape in shapes.values())
        structure = report.get("structure") or {}
        if structure.get("kind") == "blocks":
            agrees = agrees and len(arch.blocks) == len(structure.get("kept") or ())
        summary["report_agrees"] = agrees
    return summary


def _pruned_coverage(arch: Architecture, shapes: dict, report: dict | None) -> dict:
    """The share of the decoder blocks' weights that are targets: the ones the report says were pruned (all
    targets without a report)."""
    pruned = arch
    if report is not None:
        names = set(report.get("layers") or {})
        pruned = dataclasses.replace(arch, targets={n: t for n, t in arch.targets.items() if n in names})
        added = set((report.get("bias_correction") or {}).get("added") or ())     # biases stade gave the output
        shapes = {k: s for k, s in shapes.items() if k not in added}
    return coverage(pruned, shapes).to_data()


def _experts_summary(arch: Architecture, report: dict | None) -> dict | None:
    """Experts per MoE block, and from the report: the experts on fallback statistics, the removal."""
    if not arch.experts:
        return None
    reported = (report or {}).get("experts") or {}
    return {"blocks": len(arch.experts), "per_block": sorted({m.num_experts for m in arch.experts.values()}),
            "fallback": reported.get("fallback"), "removal": reported.get("removal")}


def compare_checkpoints(a: Path, b: Path) -> dict:
    """Which target layers differ between two checkpoints of the same architecture, and by how many weights."""
    sa, sb = resolve_model(str(a)), resolve_model(str(b))
    arch, _ = describe_checkpoint(sa.path)
    other, _ = describe_checkpoint(sb.path)
    if set(arch.targets) != set(other.targets):
        raise StadeError(f"{a} and {b} do not have the same layers; they cannot be compared")
    where_b = {k: f for f in weight_files(sb.path) for k in _keys(sb.path / f)}
    layers = {}
    for target, wa in _matrices(sa.path, arch):
        key = target.weight_key
        with ShardReader(sb.path / where_b[key]) as fb:
            wb = target.matrix(fb.get_tensor(key))
        if wa.shape != wb.shape:
            raise StadeError(f"{key} has shape {tuple(wa.shape)} in {a} but {tuple(wb.shape)} in {b}")
        za, zb = wa == 0, wb == 0
        layers[target.name] = {"block": target.block, "params": wa.numel(),
                               "changed": int((wa != wb).sum()), "mask_changed": int((za != zb).sum()),
                               "sparsity_a": float(za.float().mean()), "sparsity_b": float(zb.float().mean())}
    layers = {n: layers[n] for n in arch.targets if n in layers}
    ra, rb = read_report(sa.path) or {}, read_report(sb.path) or {}
    return {"kind": "comparison", "a": str(sa.path), "b": str(sb.path),
            "a_method": _how(ra), "a_pattern": ra.get("pattern"),
            "b_method": _how(rb), "b_pattern": rb.get("pattern"),
            "mask_changed": sum(l["mask_changed"] for l in layers.values()),
            "differing_layers": [n for n, l in layers.items() if l["changed"]],
            "changed": sum(l["changed"] for l in layers.values()),
            "params": sum(l["params"] for l in layers.values()), "layers": layers}


def _how(report: dict) -> str | None:
    """A report's method with its weight update and refinement: ``wanda + admm + refine (8 steps a block)``."""
    method = report.get("method")
    if not method:
        return method
    refine = report.get("refine")
    return (method + (f" + {report['update']}" if report.get("update") else "")
            + (f" + refine ({refine['steps']} steps a block)" if refine else ""))


def _keys(path: Path) -> list[str]:
    with ShardReader(path) as f:
        return f.keys()


def stats_report(path: Path) -> dict:
    """The manifest, per-block and per-layer input statistics. |μ|/σ per block says where STADE (σ) and Wanda
    (‖X‖ = sqrt(σ² + μ²) per token) rank weights differently: the larger, the more they disagree."""
    stats = load_stats(path)
    arch = Architecture.from_data(stats.manifest.get("architecture"))
    rows = stats_summary(stats)
    for i, r in enumerate(rows):
        r["index"] = i                    # model order (the list below is sorted by mean |μ|)
        if arch is not None and r["name"] in arch.targets:
            r["block"], r["role"] = arch.targets[r["name"]].block, arch.role(r["name"])
    blocks: dict[int, list[dict]] = {}
    for r in rows:
        if "block" in r:
            blocks.setdefault(r["block"], []).append(r)
    per_block = []
    for b in sorted(blocks):
        mean_std = sum(r["mean_std"] for r in blocks[b]) / len(blocks[b])
        mean_mu = sum(r["mean_abs_mean"] for r in blocks[b]) / len(blocks[b])
        per_block.append({"block": b, "layers": len(blocks[b]), "mean_std": mean_std, "mean_abs_mean": mean_mu,
                          "mean_over_std": mean_mu / mean_std if mean_std > 0 else 0.0,
                          "max_std": max(r["max_std"] for r in blocks[b])})
    # the layers whose inputs have the largest means first: there STADE (σ) and Wanda (‖X‖) disagree most
    layers = sorted(rows, key=lambda r: -r["mean_abs_mean"])
    experts = None
    if stats.experts:
        counts = sorted(int(c) for e in stats.experts.values() for c in e.count.tolist())
        experts = {"blocks": len(stats.experts), "per_block": sorted({e.count.numel() for e in stats.experts.values()}),
                   "tokens_min": counts[0], "tokens_median": counts[len(counts) // 2], "tokens_max": counts[-1],
                   "reap": all(e.reap is not None for e in stats.experts.values())}
    return {"kind": "stats", "path": str(Path(path).resolve()), "manifest": stats.manifest, "blocks": per_block, "layers": layers,
            "gram_bytes": stats.manifest.get("gram", {}).get("bytes", 0), "experts": experts}


def inspect(path: str | Path, pattern: str | None = None, against: str | Path | None = None) -> dict:
    """A STATS dir (has manifest.json) or a checkpoint dir (has config.json), summarised; or two checkpoints compared."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{path} does not exist", "give a checkpoint directory or a STATS directory")
    if pattern is not None:
        parse_pattern(pattern, None if ":" in pattern else 0.5)     # refuses what prune would refuse
        if against is not None or (p / MANIFEST).is_file():
            raise UsageError("--pattern checks a checkpoint's rows; it does not apply to "
                             + ("a comparison" if against is not None else "a STATS directory"), "drop --pattern")
    if against is not None:
        return compare_checkpoints(p, Path(against).expanduser())
    if (p / MANIFEST).is_file():
        return stats_report(p)
    return checkpoint_summary(p, pattern if pattern is None or ":" in pattern else None)
