#!/usr/bin/env python
"""Whole-expert removal on a mixture of experts: perplexity and size on disk, one row per way of ranking experts.

From one stats cache (``stade calibrate``: the routing statistics of every expert), for each ``--scores`` entry
(reap, frequency, random) prunes ``--experts K`` into a temporary directory, measures its size on disk, evaluates
it and deletes it; the full model is evaluated once. ``--then`` adds rows that also prune the kept experts and the
other layers in the same run (a metric entry as in quality.py, at ``--sparsity``). stdout: a markdown table;
stderr: progress. Writes OUT/experts.json and OUT/experts.md.

    python bench/experts.py --model ~/.cache/stade-assets/smollm2-moe --stats STATS \\
        --calib A/emma.txt A/mansfieldpark.txt A/sensesensibility.txt --eval A/prideprejudice.txt \\
        --experts 4 --scores reap frequency random --then wanda
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as `python bench/experts.py` without installing the package
    sys.path.insert(0, str(ROOT))

from _results import ResultFiles  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def markdown(result: dict) -> str:
    s = result["settings"]
    full = result["full"]
    lines = [f"| experts kept (of {full['experts']}) | ranked by | then | ppl | weights on disk | prune s |",
             "|---|---|---|---|---|---|",
             f"| {full['experts']} (the model) | – | – | {full['ppl']:.2f} | {full['bytes'] / 2**20:.1f} MiB | – |"]
    for r in result["rows"]:
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") is not None else f"failed: {r.get('error', '?')}"
        size = f"{r['bytes'] / 2**20:.1f} MiB" if r.get("bytes") else "–"
        lines.append(f"| {s['experts']} | {r['score']} | {r.get('then') or '–'} | {ppl} | {size} | "
                     f"{r.get('prune_seconds', '–')} |")
    return "\n".join(lines) + "\n"


RESULTS = ResultFiles("bench/experts.py", "experts", ("settings", "full", "rows"), ("experts.md",))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--stats", required=True, help="stats of the model from `stade calibrate`")
    p.add_argument("--calib", nargs="+", default=[], help="recorded only: the text the stats were made from")
    p.add_argument("--eval", nargs="+", required=True, help="held-out evaluation text files")
    p.add_argument("--experts", type=int, required=True, help="experts to keep in every MoE block")
    p.add_argument("--scores", nargs="+", default=["reap", "frequency", "random"])
    p.add_argument("--then", nargs="*", default=[],
                   help="metric entries (NAME or NAME:key=value,...) that also prune what is kept, at --sparsity")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "experts"))
    args = p.parse_args(argv)

    from stade_cli.arch import describe, meta_model
    from stade_cli.checkpoint import load_config, resolve_model, tensor_shapes
    from stade_cli.evaluation import evaluate
    from stade_cli.outputs import remove_output
    from stade_cli.pruning import prune
    from stade_cli.runtime import StderrReporter
    from stade_cli.sweep import parse_entry, prune_kwargs

    reporter = StderrReporter()
    out = Path(args.out).expanduser()
    RESULTS.check(out)
    evalset = ",".join(str(Path(f).expanduser()) for f in args.eval)
    evaluation = {"dataset": evalset, "seqlen": args.seqlen, "max_windows": args.max_windows, "device": args.device}
    source = resolve_model(args.model)
    arch = describe(meta_model(load_config(source.path)), disk=tensor_shapes(source.path))
    if not arch.experts:
        raise SystemExit(f"error: {args.model} has no mixture of experts")
    started = time.perf_counter()
    result = {"settings": {**{k: v for k, v in vars(args).items() if k != "out"},
                           "started": _dt.datetime.now().isoformat(timespec="seconds")},
              "full": None, "rows": [], "errors": 0}
    log("evaluating the full model")
    full = evaluate(args.model, reporter=reporter, **evaluation)
    result["full"] = {"ppl": full["ppl"], "experts": next(iter(arch.experts.values())).num_experts,
                      "bytes": disk_bytes(source.path)}
    RESULTS.write(out, result, {"experts.md": markdown(result)})
    plans = [(score, None) for score in args.scores] + [(args.scores[0], entry) for entry in args.then]
    with tempfile.TemporaryDirectory(prefix="stade-experts-") as work:
        scratch = Path(work) / "pruned"
        for score, entry in plans:
            row = {"score": score, "then": entry}
            result["rows"].append(row)
            extra: dict = {"sparsity": None}
            if entry is not None:
                name, kwargs = parse_entry(entry)
                extra = {"metric": name, "sparsity": args.sparsity, **prune_kwargs(kwargs, args.seed)}
            log(f"keeping {args.experts} experts by {score}" + (f", then {entry}" if entry else ""))
            try:
                t0 = time.perf_counter()
                prune(args.model, scratch, stats=args.stats, experts=args.experts, expert_score=score, seed=args.seed,
                      device=args.device, force=True, reporter=reporter, **extra)
                row["prune_seconds"] = round(time.perf_counter() - t0, 2)
                row["bytes"] = disk_bytes(scratch)
                row["ppl"] = evaluate(str(scratch), reporter=reporter, **evaluation)["ppl"]
                log(f"{score}{' + ' + entry if entry else ''}: ppl {row['ppl']:.2f}, {row['bytes'] / 2**20:.1f} MiB")
            except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
                result["errors"] += 1
                row["error"] = f"{type(exc).__name__}: {exc}"
                log(f"FAILED: {row['error']}")
            finally:
                remove_output(scratch, "checkpoint")
            RESULTS.write(out, result, {"experts.md": markdown(result)})
    result["settings"]["total_seconds"] = round(time.perf_counter() - started, 2)
    RESULTS.write(out, result, {"experts.md": markdown(result)})
    sys.stdout.write(markdown(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
