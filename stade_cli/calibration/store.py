"""The STATS directory: ``moments.safetensors`` (per module: count, sum, sumsq) and ``manifest.json``.

Written atomically and only over stats stade wrote (see ``outputs.py``). Loading validates everything a later prune relies
on, so a bad cache fails before any weight is touched.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..outputs import Output
from ..errors import StatsError
from .experts import ExpertStats
from .moments import Moments

FORMAT = "stade-stats"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MOMENTS_FILE = "moments.safetensors"
GRAM_DIR = "gram"
BLOCKS_PREFIX = "__blocks__.distance."   # by block, in the moments file: [Σ (1 − cos(in, out)), tokens]


def gram_file(block: int) -> str:
    return f"block_{block:04d}.safetensors"


@dataclass
class Stats:
    manifest: dict
    moments: dict[str, Moments] = field(default_factory=dict)   # by module name
    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # in memory, by leader (fresh calibration)
    path: Path | None = None                                      # on disk: Gram files read on demand
    experts: dict[int, ExpertStats] = field(default_factory=dict)  # by block: routing statistics of its experts
    distances: dict[int, torch.Tensor] = field(default_factory=dict)  # by block: [Σ (1 − cos(in, out)), tokens]

    def block_distance(self) -> dict[int, float] | None:
        """By block: the mean over tokens of 1 − cos(its input, its output); None if not recorded."""
        if not self.distances:
            return None
        return {b: float(d[0] / max(float(d[1]), 1.0)) for b, d in sorted(self.distances.items())}

    @property
    def has_gram(self) -> bool:
        return "gram" in self.manifest

    def input_of(self, name: str) -> str:
        """The linear whose input ``name`` reads (the first of q/k/v, of gate/up): the key its Gram is stored by."""
        groups = (self.manifest.get("gram") or {}).get("groups", {})
        return next((lead for lead, members in groups.items() if name in members), name)

    def gram(self, name: str) -> torch.Tensor:
        """H = Σ x xᵀ over the calibration tokens of layer ``name``'s input: [in, in] (shared by q/k/v, ...)."""
        info = self.manifest.get("gram")
        if info is None:
            raise StatsError("these stats hold no Gram matrices", "make them with `stade calibrate --gram`")
        leader = next((lead for lead, members in info["groups"].items() if name in members), None)
        if leader is None:
            raise StatsError(f"the stats hold no Gram matrix for {name}", "re-run `stade calibrate --gram`")
        if leader in self.grams:
            return self.grams[leader]
        file = self.path / GRAM_DIR / gram_file(info["blocks"][leader])
        try:
            with safe_open(str(file), framework="pt") as f:
                h = f.get_tensor(leader)
        except (OSError, SafetensorError) as exc:
            raise StatsError(f"cannot read the Gram matrix of {name} from {file}: {exc}") from None
        if not torch.isfinite(h).all():
            raise StatsError(f"the Gram matrix of {name} contains NaN or Inf", "re-calibrate in float32")
        return h

    def check_fingerprint(self, fingerprint: str) -> None:
        """Refuse stats made for another model (or another config of it)."""
        theirs = self.manifest.get("model", {}).get("fingerprint")
        if theirs != fingerprint:
            made_for = self.manifest.get("model", {}).get("ref", "?")
            raise StatsError(f"these stats were made for another model ({made_for}, fingerprint {theirs}; "
                             f"this model is {fingerprint})", "run `stade calibrate` on this model")

    def check_model(self, fingerprint: str, targets) -> None:
        """Refuse stats made for another model, or lacking a layer / with the wrong width."""
        self.check_fingerprint(fingerprint)
        for t in targets:
            m = self.moments.get(t.name)
            if m is None:
                raise StatsError(f"the stats hold no moments for layer {t.name}", "re-run `stade calibrate`")
            if m.sum.shape != (t.in_features,):
                raise StatsError(f"moments of {t.name} have width {tuple(m.sum.shape)}, the layer has {t.in_features}")


def save_stats(out: Path, stats: Stats, force: bool = False) -> Path:
    """Write ``stats`` to the new STATS directory ``out`` (``force``: replace stats that stade wrote there)."""
    out = Path(out).expanduser()
    with Output(out, "stats", force) as target, target.staging() as tmp:
        write_stats(tmp, stats)
    return out


def write_stats(tmp: Path, stats: Stats) -> None:
    """The STATS files into the (staging) directory ``tmp``."""
    tensors = {}
    for name, m in stats.moments.items():
        tensors[f"{name}.count"] = torch.tensor([m.count], dtype=torch.int64)
        tensors[f"{name}.sum"] = m.sum.detach().cpu().contiguous()
        tensors[f"{name}.sumsq"] = m.sumsq.detach().cpu().contiguous()
    for block, e in stats.experts.items():
        tensors.update(e.to_tensors(block))
    for block, d in stats.distances.items():
        tensors[f"{BLOCKS_PREFIX}{block}"] = d.detach().cpu().to(torch.float64).contiguous()
    manifest = dict(stats.manifest, format=FORMAT, format_version=FORMAT_VERSION, tool_version=__version__,
                    files=[MOMENTS_FILE], block_arguments="each block its own")   # (see plan.attention_kinds)
    save_file(tensors, str(tmp / MOMENTS_FILE), metadata={"format": FORMAT})
    if stats.grams:  # one file per block, so that prune can stream them (compute_stats may have written them)
        (tmp / GRAM_DIR).mkdir()
        by_block: dict[int, dict[str, torch.Tensor]] = {}
        for leader, h in stats.grams.items():
            by_block.setdefault(manifest["gram"]["blocks"][leader], {})[leader] = h.contiguous()
        for block, grams in sorted(by_block.items()):
            save_file(grams, str(tmp / GRAM_DIR / gram_file(block)), metadata={"format": FORMAT})
        manifest["gram"] = dict(manifest["gram"], bytes=sum(h.numel() * h.element_size()
                                                            for h in stats.grams.values()))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: Path) -> dict:
    path = Path(path).expanduser()
    if not path.exists():
        raise StatsError(f"stats directory {path} does not exist", "make one with `stade calibrate MODEL -o DIR`")
    if not path.is_dir():
        raise StatsError(f"stats path {path} is not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise StatsError(f"{path} has no {MANIFEST}; it is not a stats directory",
                         "make one with `stade calibrate MODEL -o DIR`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise StatsError(f"{manifest_path} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise StatsError(f"{manifest_path} has format {manifest.get('format')!r} version "
                         f"{manifest.get('format_version')!r}; this stade reads {FORMAT} version {FORMAT_VERSION}",
                         "re-run `stade calibrate` with this version")
    return manifest


def load_stats(path: Path) -> Stats:
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    try:
        tensors = load_file(str(path / MOMENTS_FILE))
    except (OSError, SafetensorError) as exc:
        raise StatsError(f"cannot read {path / MOMENTS_FILE}: {exc}") from None
    moments = {}
    for name, info in manifest.get("modules", {}).items():
        try:
            count, s, sq = (tensors[f"{name}.{k}"] for k in ("count", "sum", "sumsq"))
        except KeyError:
            raise StatsError(f"{path / MOMENTS_FILE} lacks the moments of {name}", "re-run `stade calibrate`") from None
        width = info.get("in_features")
        if s.shape != (width,) or sq.shape != (width,):
            raise StatsError(f"moments of {name} have shape {tuple(s.shape)}, expected ({width},)")
        if not (torch.isfinite(s).all() and torch.isfinite(sq).all()):
            raise StatsError(f"moments of {name} contain NaN or Inf", "re-calibrate, e.g. in float32 (--dtype float32)")
        moments[name] = Moments(int(count.reshape(-1)[0]), s.to(torch.float64), sq.to(torch.float64))
    experts = {}
    for block in (manifest.get("experts") or {}).get("blocks", []):
        e = ExpertStats.from_tensors(tensors, int(block))
        if e is None:
            raise StatsError(f"{path / MOMENTS_FILE} lacks the routing statistics of block {block}'s experts",
                             "re-run `stade calibrate`")
        experts[int(block)] = e
    distances = {int(k[len(BLOCKS_PREFIX):]): v.double() for k, v in tensors.items() if k.startswith(BLOCKS_PREFIX)}
    if "gram" in manifest:
        missing = [b for b in set(manifest["gram"]["blocks"].values()) if not (path / GRAM_DIR / gram_file(b)).is_file()]
        if missing:
            raise StatsError(f"{path / GRAM_DIR} lacks {gram_file(min(missing))}", "re-run `stade calibrate --gram`")
        _check_gram_files(path, manifest["gram"]["blocks"])
    return Stats(manifest, moments, path=path, experts=experts, distances=distances)


def _check_gram_files(path: Path, blocks: dict[str, int]) -> None:
    """Every Gram file complete, and holding the matrices the manifest puts in it: read from their headers (a few
    bytes each), so that a truncated file is refused before the work, not when prune reaches its block."""
    from ..checkpoint import read_header
    from ..errors import ModelError

    wanted: dict[int, set[str]] = {}
    for leader, block in blocks.items():
        wanted.setdefault(block, set()).add(leader)
    for block, leaders in sorted(wanted.items()):
        file = path / GRAM_DIR / gram_file(block)
        try:
            held = {e.name for e in read_header(file)[0]}
        except ModelError:
            raise StatsError(f"{file} is truncated or corrupt", "re-run `stade calibrate --gram`") from None
        if not leaders <= held:
            raise StatsError(f"{file} lacks the Gram matrix of {min(leaders - held)}", "re-run `stade calibrate --gram`")


def stats_summary(stats: Stats) -> list[dict]:
    """Per layer: mean |μ|, mean σ, max σ and max |μ| over the input channels."""
    rows = []
    for name, m in stats.moments.items():
        mean_abs, std = m.mean.abs(), m.std
        rows.append({"name": name, "in_features": int(m.sum.numel()), "count": m.count,
                     "mean_abs_mean": float(mean_abs.mean()), "mean_std": float(std.mean()),
                     "max_std": float(std.max()), "max_abs_mean": float(mean_abs.max()),
                     "mean_rms": float((m.sumsq / max(m.count, 1)).sqrt().mean())})
    return rows
