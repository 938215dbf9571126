"""Sparsity and stats summaries as plain data (the CLI renders them).

A checkpoint's sparsity is computed from the tensors themselves, not taken from its report; the
report, when present, is only compared against it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .arch import describe, meta_model
from .calibration.store import MANIFEST, load_stats, stats_summary
from .checkpoint import load_config, read_report, resolve_model, weight_files
from .errors import ModelError, StadeError
from .masks import parse_pattern


def nm_conforms(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of M consecutive inputs of every row has at most N non-zeros."""
    rows, width = weight.shape
    if width % m:
        return False
    return bool(((weight != 0).reshape(rows, width // m, m).sum(-1) <= n).all())


def checkpoint_summary(path: Path, pattern: str | None = None) -> dict:
    source = resolve_model(str(path))
    arch = describe(meta_model(load_config(source.path)))
    report = read_report(source.path)
    pattern = pattern or (report or {}).get("pattern")
    nm = parse_pattern(pattern, None) if pattern and ":" in pattern else None
    by_key = arch.by_weight_key()
    layers: dict[str, dict] = {}
    for fname in weight_files(source.path):
        try:
            with safe_open(str(source.path / fname), framework="pt") as f:
                for key in f.keys():
                    target = by_key.get(key)
                    if target is None:
                        continue
                    w = f.get_tensor(key)
                    zeros = int((w == 0).sum())
                    layers[target.name] = {"block": target.block, "shape": list(w.shape), "zeros": zeros,
                                           "params": w.numel(), "sparsity": zeros / w.numel()}
                    if nm is not None:
                        layers[target.name]["nm_ok"] = nm_conforms(w, nm.n, nm.m)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read weight shard {source.path / fname}: {exc}") from None
    layers = {name: layers[name] for name in arch.targets if name in layers}  # model order
    blocks: dict[int, dict] = {}
    for info in layers.values():
        b = blocks.setdefault(info["block"], {"block": info["block"], "zeros": 0, "params": 0})
        b["zeros"] += info["zeros"]
        b["params"] += info["params"]
    for b in blocks.values():
        b["sparsity"] = b["zeros"] / max(b["params"], 1)
    zeros = sum(l["zeros"] for l in layers.values())
    params = sum(l["params"] for l in layers.values())
    summary = {"kind": "checkpoint", "path": str(source.path), "pattern": pattern,
               "target_sparsity": (report or {}).get("target_sparsity"),
               "method": (report or {}).get("method"),
               "overall": {"zeros": zeros, "params": params, "sparsity": zeros / max(params, 1)},
               "blocks": [blocks[k] for k in sorted(blocks)], "layers": layers}
    if nm is not None:
        summary["nm_ok"] = all(l["nm_ok"] for l in layers.values())
    if report is not None:
        theirs = report.get("layers", {})
        summary["report_agrees"] = all(theirs.get(n, {}).get("zeros") == l["zeros"] for n, l in layers.items())
    return summary


def stats_report(path: Path) -> dict:
    stats = load_stats(path)
    return {"kind": "stats", "path": str(path), "manifest": stats.manifest, "layers": stats_summary(stats),
            "gram_bytes": stats.manifest.get("gram", {}).get("bytes", 0)}


def inspect(path: str | Path, pattern: str | None = None) -> dict:
    """A STATS dir (has manifest.json) or a checkpoint dir (has config.json), summarised."""
    p = Path(path).expanduser()
    if not p.exists():
        raise StadeError(f"{path} does not exist")
    if (p / MANIFEST).is_file():
        return stats_report(p)
    return checkpoint_summary(p, pattern)
