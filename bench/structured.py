#!/usr/bin/env python
"""A smaller, faster model: structured pruning against unstructured, by perplexity and by speed.

Quality (from one stats cache with Gram matrices): for each fraction p of the decoder blocks' weights, MLP channels
removed by each entry of ``--channels`` (so many channels that p of the blocks' weights go, a multiple of 8),
whole blocks (round(p × blocks)), and the unstructured ``--unstructured`` entries at sparsity p; each pruned into a
temporary directory, evaluated, removed. Speed (``--speed``): prefill tokens/s (1 × 512) and decode tokens/s
(``generate``, 128 new tokens) of the dense model against its channel- and block-pruned versions at ``--speed-at``,
in this process, one model at a time. Writes OUT/structured.json and OUT/structured.md.

    python bench/structured.py --model ~/.cache/stade-assets/smollm2-135m --stats STATS --eval A/prideprejudice.txt \\
        --fractions 0.1 0.2 0.3 --speed --out bench/results/smollm2/structured
"""
from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _results import ResultFiles  # noqa: E402

RESULTS = ResultFiles("bench/structured.py", "structured", ("settings", "dense", "rows"),
                      ("structured.md", "structured.png"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def shares(model: str) -> dict:
    """The blocks' weights, the MLPs' share of them and the block count, from the checkpoint's description."""
    from stade_cli.arch import describe, meta_model
    from stade_cli.checkpoint import load_config, resolve_model, tensor_shapes
    from stade_cli.structured.plan import find_mlps

    source = resolve_model(model)
    shapes = tensor_shapes(source.path)
    arch = describe(meta_model(load_config(source.path)), disk=shapes)
    prefixes = tuple(b + "." for b in arch.blocks)
    blocks = sum(__import__("math").prod(s) for k, s in shapes.items() if k.startswith(prefixes))
    mlps = find_mlps(arch)
    mlp = sum(t.in_features * t.out_features for m in mlps.values() for t in (*m.producers, m.consumer))
    width = next(iter(mlps.values())).width
    return {"block_params": blocks, "mlp_params": mlp, "blocks": len(arch.blocks), "width": width}


def speed(model: str, repeats: int = 3, prompt: int = 512, new: int = 128) -> dict:
    """Prefill tokens/s (1 × ``prompt``) and decode tokens/s (``new`` greedy tokens after a 16-token prompt)."""
    import torch
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    vocab = net.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt), generator=g)
    short = ids[:, :16]
    out = {}
    with torch.inference_mode():
        net(input_ids=ids)                                                     # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(input_ids=ids)
            times.append(time.perf_counter() - t0)
        out["prefill_tokens_per_s"] = prompt / statistics.median(times)
        net.generate(short, max_new_tokens=8, min_new_tokens=8, do_sample=False)   # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net.generate(short, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            times.append(time.perf_counter() - t0)
        out["decode_tokens_per_s"] = new / statistics.median(times)
    out["params"] = sum(p.numel() for p in net.parameters())
    del net
    return out


def markdown(result: dict) -> str:
    fr = result["settings"]["fractions"]
    lines = [] if result["dense"] is None else [       # None: --speed-only
        "| entry | " + " | ".join(f"{p:.0%} of the blocks' weights" for p in fr) + " |",
        "|---|" + "---|" * len(fr),
        "| dense | " + " | ".join(f"{result['dense']['ppl']:.2f}" for _ in fr) + " |"]
    for row in result["rows"]:
        cells = []
        for p in fr:
            c = row["cells"].get(f"{p:g}") or {}
            cells.append(f"{c['ppl']:.2f}" if c.get("ppl") is not None else c.get("error", "")[:40])
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if result.get("speed"):
        lines += ["", "| model | parameters | prefill tokens/s (1 × 512) | decode tokens/s (128 new) | prefill × | "
                      "decode × |", "|---|---|---|---|---|---|"]
        for s in result["speed"]:
            base = next(x for x in result["speed"] if x["model"] == s["of"] and x["label"] == "dense")
            lines.append(f"| {s['model']}: {s['label']} | {s['params'] / 1e6:,.1f}M | {s['prefill_tokens_per_s']:,.0f} | "
                         f"{s['decode_tokens_per_s']:,.1f} | "
                         f"{s['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f} | "
                         f"{s['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """Perplexity (log scale) against the share of the blocks' weights removed, one line per entry, dense dashed.
    False (with a note) without matplotlib or quality rows."""
    from stade_cli.errors import UsageError
    from stade_cli.plots import need_matplotlib, save

    if result["dense"] is None or not result["rows"]:
        return False
    try:
        plt = need_matplotlib()
    except UsageError as exc:
        log(f"note: {exc}; skipping the plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 10 * result["dense"]["ppl"]           # an entry that breaks the model would flatten the others: named only
    for row in result["rows"]:
        points = sorted((c["params_removed_of_blocks"], c["ppl"]) for c in row["cells"].values()
                        if c.get("ppl") is not None)
        style = "--" if row["label"].startswith("unstructured") else "-"
        if points and min(p for _, p in points) > top:
            ax.plot([], [], style, label=f"{row['label']}: off the chart (ppl ≥ {min(p for _, p in points):,.0f})")
        elif points:
            ax.plot(*zip(*points), style, marker="o", label=row["label"])
    ax.axhline(result["dense"]["ppl"], color="black", linestyle=":", label="dense")
    ax.set_yscale("log")
    ax.set_ylim(top=top)
    ax.set_xlabel("share of the decoder blocks' weights removed (unstructured: zeroed)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(f"{Path(result['settings']['model']).name}: structured against unstructured, no retraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path, ours=lambda p: True)      # RESULTS.check vouched for the results folder
    plt.close(fig)
    return True


CHANNELS = ["magnitude", "wanda", "stade", "stade:update=admm"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--stats", required=True, help="stats with Gram matrices (stade calibrate --gram)")
    p.add_argument("--eval", nargs="+", required=True)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--channels", nargs="+", default=CHANNELS, help="channel entries: METRIC or METRIC:update=admm")
    p.add_argument("--unstructured", nargs="+", default=["wanda", "wanda:update=admm"])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--speed", action="store_true", help="also prefill and decode tokens/s")
    p.add_argument("--speed-only", action="store_true", help="only the speed (on a quiet machine; its own --out)")
    p.add_argument("--speed-at", type=float, default=0.2)
    p.add_argument("--speed-models", nargs="*", default=[], help="more checkpoints to time (e.g. a 7B-width slice; "
                                                                 "channels by magnitude, blocks from --speed-stats)")
    p.add_argument("--speed-stats", nargs="*", default=[], help="stats for each of --speed-models (for blocks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "structured"))
    a = p.parse_args(argv)

    from stade_cli.errors import UsageError
    from stade_cli.evaluation import evaluate
    from stade_cli.outputs import remove_output
    from stade_cli.pruning import prune
    from stade_cli.runtime import StderrReporter
    from stade_cli.structured.plan import MULTIPLE
    from stade_cli.sweep import parse_entry, prune_kwargs

    reporter = StderrReporter()
    out = Path(a.out).expanduser()
    RESULTS.check(out)
    evalset = ",".join(str(Path(f).expanduser()) for f in a.eval)
    evaluation = {"dataset": evalset, "seqlen": a.seqlen, "max_windows": a.max_windows, "device": a.device}
    info = shares(a.model)
    result = {"settings": {**vars(a), "started": _dt.datetime.now().isoformat(timespec="seconds"), **info},
              "dense": None, "rows": [], "errors": 0}
    a.speed = a.speed or a.speed_only
    if not a.speed_only:
        log("evaluating the dense model")
        result["dense"] = {"ppl": evaluate(a.model, reporter=reporter, **evaluation)["ppl"]}
        RESULTS.write(out, result, {"structured.md": markdown(result)})

    def channel_fraction(p: float) -> float:
        """The channel fraction that removes p of the blocks' weights, on the multiple of 8 nearest to it."""
        n = round(p * info["block_params"] / info["mlp_params"] * info["width"] / MULTIPLE) * MULTIPLE
        return n / info["width"]

    plans = ([(f"channels: {e}", dict(structure="channels", **_entry(e, parse_entry, prune_kwargs)), channel_fraction)
              for e in a.channels]
             + [("blocks", dict(structure="blocks", metric=None), lambda p: p)]
             + [(f"unstructured: {e}", _entry(e, parse_entry, prune_kwargs), lambda p: p) for e in a.unstructured])
    plans = [] if a.speed_only else plans
    with tempfile.TemporaryDirectory(prefix="stade-structured-") as work:
        scratch = Path(work) / "pruned"
        for label, kwargs, fraction in plans:
            row = {"label": label, "cells": {}}
            result["rows"].append(row)
            for p in a.fractions:
                log(f"{label} at {p:.0%}")
                cell: dict = {}
                try:
                    t0 = time.perf_counter()
                    report = prune(a.model, scratch, sparsity=fraction(p), stats=a.stats, device=a.device, force=True,
                                   reporter=reporter, **kwargs)
                    cell["prune_seconds"] = round(time.perf_counter() - t0, 2)
                    cell["params_removed_of_blocks"] = ((report["params"]["before"] - report["params"]["after"])
                                                        / info["block_params"]) if kwargs.get("structure") else (
                        report["overall"]["zeros"] / info["block_params"])
                    cell["ppl"] = evaluate(str(scratch), reporter=reporter, **evaluation)["ppl"]
                    log(f"{label} at {p:.0%}: ppl {cell['ppl']:.2f} ({cell['params_removed_of_blocks']:.1%} removed)")
                except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the others
                    result["errors"] += 1
                    cell["error"] = f"{type(exc).__name__}: {exc}"
                    log(f"FAILED: {cell['error']}")
                finally:
                    remove_output(scratch, "checkpoint")
                row["cells"][f"{p:g}"] = cell
                RESULTS.write(out, result, {"structured.md": markdown(result)})
        if a.speed:
            result["speed"] = []
            models = [(a.model, a.stats, "stade")] + [(m, s, "magnitude") for m, s in
                                                      zip(a.speed_models, a.speed_stats or [None] * len(a.speed_models))]
            for model, stats, metric in models:
                name = Path(model).name
                for label, kwargs in (("dense", None),
                                      (f"channels ({metric}) at {a.speed_at:.0%}",
                                       dict(structure="channels", metric=metric,
                                            sparsity=_fraction_for(model, a.speed_at, MULTIPLE))),
                                      (f"blocks at {a.speed_at:.0%}", dict(structure="blocks", metric=None,
                                                                          sparsity=a.speed_at))):
                    if kwargs is not None and stats is None and kwargs["structure"] == "blocks":
                        continue
                    path = model
                    if kwargs is not None:
                        try:
                            prune(model, scratch, stats=stats, device=a.device, force=True, reporter=reporter,
                                  **kwargs)
                        except UsageError as exc:     # e.g. too few blocks for the fraction
                            log(f"{name}: {label}: {exc}")
                            continue
                        path = str(scratch)
                    log(f"timing {name}: {label}")
                    result["speed"].append({"model": name, "of": name, "label": label, **speed(path)})
                    if kwargs is not None:
                        remove_output(scratch, "checkpoint")
                    RESULTS.write(out, result, {"structured.md": markdown(result)})
    result["settings"]["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    RESULTS.write(out, result, {"structured.md": markdown(result)})
    if plot(result, out / "structured.png"):
        log(f"wrote {out / 'structured.png'}")
    sys.stdout.write(markdown(result))
    return 1 if result["errors"] else 0


def _entry(entry: str, parse_entry, prune_kwargs) -> dict:
    name, kwargs = parse_entry(entry)
    return {"metric": name, **prune_kwargs(kwargs, 0)}


def _fraction_for(model: str, p: float, multiple: int) -> float:
    info = shares(model)
    n = round(p * info["block_params"] / info["mlp_params"] * info["width"] / multiple) * multiple
    return n / info["width"]


if __name__ == "__main__":
    sys.exit(main())
