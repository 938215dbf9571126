#!/usr/bin/env python
"""Quality benchmark: perplexity of every metric × sparsity/pattern, through the stade library.

Calibrates once, then for each metric entry and each cell (an unstructured sparsity or an N:M pattern)
prunes into a temporary directory, evaluates, and deletes the pruned checkpoint. The dense model is
evaluated once. stdout: a markdown table; stderr: progress. Writes OUT/quality.json (settings, per-cell
perplexity and wall time), OUT/quality.md and OUT/quality.png (needs matplotlib; skipped without it).

    python bench/quality.py --model ~/.cache/stade-assets/smollm2-135m \
        --calib A/emma.txt A/mansfieldpark.txt --eval A/prideprejudice.txt \
        --metrics magnitude wanda stade stade:bias_correction=false --sparsities 0.5 0.6 --patterns unstructured 2:4

A metric entry is ``name`` or ``name:key=value,key=value`` (values parsed as bool, int, float, else str):
keys naming a method option (``init``, ``percdamp``, ``dsnot_threshold``, ``ria_alpha``, ...) set
the method's options, the others are passed to ``stade_cli.pruning.prune`` as keyword arguments
(``bias_correction``, ``layer_sparsity``, ...). Metric names are not checked here: the library's registry
decides. ``dsnot:init=stade`` refines STADE's mask.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as `python bench/quality.py` without installing the package
    sys.path.insert(0, str(ROOT))

from _results import ResultFiles, protocol_arguments  # noqa: E402
from stade_cli.outputs import remove_output  # noqa: E402

from stade_cli.errors import UsageError  # noqa: E402
from stade_cli.sweep import cell_specs, markdown, parse_entry, run_cell  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def needs_stats(names: list[str]) -> bool:
    """False only when every metric is known to need no calibration (e.g. magnitude alone)."""
    from stade_cli.metrics import get_metric

    return any(get_metric(n).needs_stats for n in names)


def plot(result: dict, path: Path) -> bool:
    try:
        from stade_cli.plots import sweep_plot

        sweep_plot(result, path, ours=lambda p: True)   # RESULTS.check vouched for the results folder
    except UsageError as exc:   # matplotlib missing: the table and JSON still count
        print(f"note: {exc}; skipping the plot", file=sys.stderr)
        return False
    return True


RESULTS = ResultFiles("bench/quality.py", "quality", ("settings", "cells", "rows"), ("quality.md", "quality.png"))


def write_outputs(result: dict, out: Path) -> None:
    RESULTS.write(out, result, {"quality.md": markdown(result)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    protocol_arguments(p)
    p.add_argument("--metrics", nargs="+", default=["magnitude", "wanda", "stade"],
                   help="metric entries: NAME or NAME:key=value,... (default: magnitude wanda stade)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality"))
    p.add_argument("--stats", default=None,
                   help="reuse this stats directory (from `stade calibrate`) instead of calibrating; its manifest "
                        "must match --calib/--nsamples/--seqlen/--seed, which are then only recorded")
    p.add_argument("--workdir", default=None,
                   help="where the stats and temporary pruned checkpoints go (default: a temp dir, removed)")
    args = p.parse_args(argv)

    from stade_cli.calibration.runner import calibrate
    from stade_cli.evaluation import evaluate
    from stade_cli.runtime import StderrReporter

    reporter = StderrReporter()
    try:
        entries = [(e, *parse_entry(e)) for e in args.metrics]
        cells = cell_specs(args.sparsities, args.patterns)
    except UsageError as exc:
        raise SystemExit(f"error: {exc}") from None
    calib = ",".join(str(Path(f).expanduser()) for f in args.calib)
    evalset = ",".join(str(Path(f).expanduser()) for f in args.eval)
    out = Path(args.out).expanduser()
    RESULTS.check(out)
    started = time.perf_counter()

    result = {
        "settings": {"model": args.model, "calib": args.calib, "eval": args.eval, "metrics": args.metrics,
                     "sparsities": args.sparsities, "patterns": args.patterns, "nsamples": args.nsamples,
                     "seqlen": args.seqlen, "max_windows": args.max_windows, "seed": args.seed,
                     "device": args.device, "started": _dt.datetime.now().isoformat(timespec="seconds")},
        "cells": cells, "calibration": None, "dense": None, "rows": [], "errors": 0,
    }
    work = Path(args.workdir).expanduser() if args.workdir else Path(tempfile.mkdtemp(prefix="stade-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    errors = 0
    try:
        stats_dir = None
        if args.stats:
            from stade_cli.calibration.store import load_stats

            stats_dir = Path(args.stats).expanduser()
            manifest = load_stats(stats_dir).manifest
            given = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}
            differ = {k: manifest.get(k) for k, v in given.items() if manifest.get(k) != v}
            if differ:
                raise SystemExit(f"error: --stats {stats_dir} was made with {differ}, not {given}")
            result["calibration"] = {"seconds": manifest.get("seconds"), "stats": str(stats_dir),
                                     "dataset": manifest.get("dataset"), "reused": True}
            log(f"reusing the stats in {stats_dir} ({manifest.get('nsamples')} × {manifest.get('seqlen')})")
        elif needs_stats([name for _, name, _ in entries]):
            stats_dir = work / "stats"
            log(f"calibrating {args.model} on {calib}: {args.nsamples} × {args.seqlen}")
            t0 = time.perf_counter()
            calibrate(args.model, stats_dir, dataset=calib, nsamples=args.nsamples, seqlen=args.seqlen,
                      seed=args.seed, device=args.device, force=True, reporter=reporter)
            result["calibration"] = {"seconds": round(time.perf_counter() - t0, 2),
                                     "stats": str(stats_dir) if args.workdir else None}  # a temp dir is removed
            log(f"calibrated in {result['calibration']['seconds']} s")

        log("evaluating the dense model")
        t0 = time.perf_counter()
        dense = evaluate(args.model, dataset=evalset, seqlen=args.seqlen, max_windows=args.max_windows,
                         device=args.device, reporter=reporter)
        result["dense"] = {"ppl": dense["ppl"], "nll": dense["nll"], "windows": dense["windows"],
                           "tokens": dense["tokens"], "seconds": round(time.perf_counter() - t0, 2)}
        log(f"dense: ppl {dense['ppl']:.2f} ({dense['windows']} windows × {dense['seqlen']})")
        write_outputs(result, out)

        for label, name, kwargs in entries:
            row = {"label": label, "metric": name, "options": kwargs, "cells": {}}
            result["rows"].append(row)
            for c in cells:
                log(f"{label} @ {c['label']}: pruning")
                t0 = time.perf_counter()
                try:
                    cell = run_cell(args.model, work / "pruned", name, kwargs, c, stats_dir,
                                    {"dataset": evalset, "seqlen": args.seqlen, "max_windows": args.max_windows},
                                    args.seed, args.device, reporter)
                    log(f"{label} @ {c['label']}: ppl {cell['ppl']:.2f} "
                        f"(sparsity {cell['achieved_sparsity']:.2%}, {cell['seconds']} s)")
                except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the others
                    errors += 1
                    cell = {"ppl": None, "error": f"{type(exc).__name__}: {exc}",
                            "seconds": round(time.perf_counter() - t0, 2)}
                    log(f"{label} @ {c['label']}: FAILED: {cell['error']}")
                    if os.environ.get("STADE_DEBUG"):
                        traceback.print_exc()
                row["cells"][c["label"]] = cell
                result["errors"] = errors
                write_outputs(result, out)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            remove_output(work / "pruned", "checkpoint")

    result["settings"]["total_seconds"] = round(time.perf_counter() - started, 2)
    write_outputs(result, out)
    if plot(result, out / "quality.png"):
        log(f"wrote {out / 'quality.png'}")
    log(f"wrote {out / 'quality.json'} and {out / 'quality.md'}")
    sys.stdout.write(markdown(result))
    sys.stdout.flush()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
