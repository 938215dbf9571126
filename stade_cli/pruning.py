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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import __version__
from .arch import Architecture, Target, describe, meta_model
from .calibration.moments import Moments
from .calibration.runner import compute_stats
from .calibration.store import Stats, load_stats
from .checkpoint import (INDEX_NAME, REPORT_NAME, ShardWriter, atomic_dir, check_output, copy_side_files,
                         load_config, read_header, resolve_model, tensor_bytes, weight_files)
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
    return torch.where(mask, torch.zeros((), dtype=w.dtype, device=w.device), w).cpu()


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
    """Read each shard tensor by tensor, prune targets on a small thread pool, write in the same order.

    Untouched tensors are copied as raw bytes; a pruned tensor is written as soon as it is ready, so
    reading, computing and writing overlap and only a few tensors are in memory at once.
    """
    by_key = arch.by_weight_key()
    layers: dict[str, dict] = {}
    workers = 2 if dev.type != "cpu" else max(1, min(4, torch.get_num_threads()))
    ahead = 2 * workers                                            # target tensors in flight

    def job(target: Target, tensor: torch.Tensor) -> tuple[torch.Tensor, dict]:
        pruned = prune_weight(tensor, met, pat, st.moments[target.name] if st else None, dev)
        return pruned, _layer_info(target, pruned)

    with atomic_dir(out, force) as tmp, ThreadPoolExecutor(workers, thread_name_prefix="stade-prune") as pool:
        total = sum((src / f).stat().st_size for f in files)
        with reporter.task("pruning", total=total) as advance:
            for fname in files:
                entries, metadata, data_start = read_header(src / fname)
                targets = [e for e in entries if e.name in by_key]
                plan = [(e.name, e.dtype, e.shape, e.nbytes) for e in entries]
                try:
                    with safe_open(str(src / fname), framework="pt") as f, open(src / fname, "rb") as raw, \
                            ShardWriter(tmp / fname, plan, metadata) as writer:
                        futures: dict[str, Future] = {}
                        queued = iter(targets)
                        for entry in entries:
                            while len(futures) < ahead and (nxt := next(queued, None)) is not None:
                                futures[nxt.name] = pool.submit(job, by_key[nxt.name], f.get_tensor(nxt.name))
                            if entry.name in futures:
                                tensor, info = futures.pop(entry.name).result()
                                layers[by_key[entry.name].name] = info
                                writer.write(entry.name, tensor_bytes(tensor))
                            else:
                                writer.copy(entry.name, raw, data_start + entry.begin, entry.nbytes)
                            advance(entry.nbytes)
                except SafetensorError as exc:
                    raise ModelError(f"cannot read weight shard {src / fname}: {exc}",
                                     "the file is truncated or corrupt; re-download it") from None
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
