"""Orchestration: stats + shards → scores → masks → output shards, one tensor at a time.

Pruning from cached moments needs no forward pass: every input shard is read tensor by tensor, target
weights are scored and masked on the device, and the output shard is written before the next is read,
so peak memory is about one shard whatever the model's size.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .arch import Architecture, Target, describe, meta_model
from .calibration.moments import Moments
from .calibration.runner import compute_stats
from .calibration.store import Stats, load_stats
from .checkpoint import (INDEX_NAME, REPORT_NAME, atomic_dir, check_output, copy_side_files, load_config,
                         resolve_model, weight_files)
from .errors import ModelError, UsageError
from .masks import Pattern, parse_pattern
from .metrics import Metric, get_metric
from .runtime import Reporter, resolve_device


def prune_weight(weight: torch.Tensor, metric: Metric, pattern: Pattern, moments: Moments | None,
                 device: torch.device) -> torch.Tensor:
    """The masked weight, same dtype as ``weight``; kept weights are bit-identical."""
    w = weight.to(device)                                  # [out, in]
    scores = metric.score(w.float(), moments.to(device) if moments is not None else None)
    mask = pattern.mask(scores)                            # True = prune
    return w.masked_fill(mask, 0).cpu()


def prune(model: str, out: str | Path, metric: str = "wanda", sparsity: float | None = 0.5,
          pattern: str = "unstructured", group: str = "row", stats: str | Path | None = None,
          dataset: str = "c4", nsamples: int = 128, seqlen: int | None = None, seed: int = 0,
          device: str = "auto", dtype: str = "auto", batch_size: int = 1, only: str | None = None,
          skip: str | None = None, force: bool = False, reporter: Reporter | None = None) -> dict:
    """Prune ``model`` into the checkpoint directory ``out``; returns the report written beside it."""
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    met = get_metric(metric)
    pat = parse_pattern(pattern, sparsity, group)
    dev = resolve_device(device)
    out = Path(out).expanduser()
    check_output(out, force)
    source = resolve_model(model)
    files = weight_files(source.path)
    arch = describe(meta_model(load_config(source.path)), only=only, skip=skip)
    if not arch.targets:
        raise UsageError("no layer left to prune", "check --only/--skip")
    for t in arch.targets.values():
        pat.check_width(t.in_features, t.name)

    st: Stats | None = None
    if met.needs_stats:
        if stats is not None:
            st = load_stats(Path(stats))
            st.check_model(source.identity()["fingerprint"], arch.targets.values())
        else:
            st = compute_stats(source, dataset, nsamples, seqlen, seed, device, dtype, batch_size, reporter,
                               only=only, skip=skip)

    _stream(source.path, files, out, arch, met, pat, st, dev, force, reporter,
            lambda layers: _report(met, pat, source, st, layers, t0))
    return json.loads((out / REPORT_NAME).read_text())


def _stream(src: Path, files: list[str], out: Path, arch: Architecture, met: Metric, pat: Pattern,
            st: Stats | None, dev: torch.device, force: bool, reporter: Reporter, make_report) -> dict:
    by_key = arch.by_weight_key()
    layers: dict[str, dict] = {}
    with atomic_dir(out, force) as tmp:
        for fname in reporter.track(files, "pruning", total=len(files)):
            tensors, metadata = {}, None
            try:
                with safe_open(str(src / fname), framework="pt") as f:
                    metadata = f.metadata()
                    for key in f.keys():
                        tensor = f.get_tensor(key)
                        target = by_key.get(key)
                        if target is not None:
                            tensor = prune_weight(tensor, met, pat, st.moments[target.name] if st else None, dev)
                            layers[target.name] = _layer_info(target, tensor)
                        tensors[key] = tensor
            except (SafetensorError, OSError) as exc:
                raise ModelError(f"cannot read weight shard {src / fname}: {exc}",
                                 "the file is truncated or corrupt; re-download it") from None
            save_file(tensors, str(tmp / fname), metadata=metadata)
            del tensors
        missing = [t.weight_key for t in arch.targets.values() if t.name not in layers]
        if missing:
            raise ModelError(f"the weight shards hold no tensor {missing[0]}",
                             "the checkpoint does not match its config")
        if (src / INDEX_NAME).is_file():
            shutil.copy2(src / INDEX_NAME, tmp / INDEX_NAME)
        copy_side_files(src, tmp)
        # the report is written last, inside the temp dir: a checkpoint with a report is complete
        (tmp / REPORT_NAME).write_text(json.dumps(make_report(layers), indent=2) + "\n")
    return layers


def _layer_info(target: Target, weight: torch.Tensor) -> dict:
    zeros = int((weight == 0).sum())
    return {"block": target.block, "shape": [target.out_features, target.in_features],
            "zeros": zeros, "sparsity": zeros / weight.numel()}


def _report(met: Metric, pat: Pattern, source, st: Stats | None, layers: dict, t0: float) -> dict:
    zeros = sum(l["zeros"] for l in layers.values())
    params = sum(l["shape"][0] * l["shape"][1] for l in layers.values())
    return {
        "tool": "stade", "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": met.name, "pattern": pat.name, "group": getattr(pat, "group", None),
        "target_sparsity": pat.target_sparsity,
        "mode": "one-shot",  # scores from the dense model's moments (no pruned-model forward passes)
        "model": source.identity(), "stats": st.manifest if st is not None else None,
        "overall": {"zeros": zeros, "params": params, "sparsity": zeros / max(params, 1)},
        "seconds": round(time.perf_counter() - t0, 2),
        "layers": layers,
    }
