"""`stade sweep`: perplexity against sparsity for several methods on one model, from one calibration.

Prunes once per method × cell (an unstructured sparsity or an N:M pattern) into a scratch folder inside the
output's staging directory, evaluates, removes the pruned checkpoint, and records the perplexity. The
output is a folder of stade's own (kind ``sweep``): ``sweep.json`` (settings, dense and per-cell results),
``sweep.md`` (the table) and, when calibration ran here, ``stats/`` for reuse. ``bench/quality.py`` runs
the same cells through the same functions.

A method entry is ``NAME`` or ``NAME:key=value,key=value``: keys naming a method option (``ria_alpha``,
``init``, ...) set it, the others are ``prune()`` keywords (``bias_correction``, ``layer_sparsity``, ...).
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UsageError, as_percent

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_value(text: str):
    """``true``/``false``/``none``, an int, a float, else the text."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_entry(entry: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` → (name, options)."""
    name, _, opts = entry.partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"empty method name in {entry!r}", "e.g. --metrics wanda,stade")
    kwargs = {}
    for part in filter(None, (p.strip() for p in opts.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"method option {part!r} in {entry!r} is not key=value",
                             "e.g. --metrics 'wanda,stade:bias_correction=false'")
        kwargs[key.strip()] = parse_value(value)
    return name, kwargs


def split_entries(text: str) -> list[str]:
    """``wanda,stade:bias_correction=false,layer_sparsity=owl,ria`` → three entries: a comma piece that holds
    ``=`` but no ``:`` belongs to the entry before it (method names never hold ``=``)."""
    entries: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece and entries:
            entries[-1] += "," + piece
        else:
            entries.append(piece)
    if not entries:
        raise UsageError("--metrics is empty", "e.g. --metrics wanda,stade")
    return entries


def numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated numbers (got {text!r})", f"e.g. {what} 0.5,0.6,0.7") from None
    return values


def cell_specs(sparsities: list[float], patterns: list[str]) -> list[dict]:
    """The columns: one per unstructured sparsity, one per N:M pattern, in the order given, without repeats."""
    cells = []
    for pat in patterns:
        m = _NM.match(pat)
        if m:
            n, mm = int(m[1]), int(m[2])
            if not 0 < n < mm:
                raise UsageError(f"pattern {pat!r} needs 0 < N < M", "e.g. 2:4 or 4:8")
            cells.append({"label": f"{n}:{mm}", "pattern": f"{n}:{mm}", "sparsity": None,
                          "implied_sparsity": (mm - n) / mm})
        elif pat.strip().lower() == "unstructured":
            for s in sparsities:
                if not 0 <= s < 1:
                    raise UsageError(f"sparsity {s:g} is not in [0, 1)",
                                     "; ".join(filter(None, (as_percent(s), "e.g. --sparsities 0.5,0.6,0.7"))))
                cells.append({"label": f"{s * 100:g}%", "pattern": "unstructured", "sparsity": s,
                              "implied_sparsity": s})
        else:
            raise UsageError(f"unknown pattern {pat!r}", "use unstructured or N:M, e.g. 2:4")
    seen: set[str] = set()
    return [c for c in cells if not (c["label"] in seen or seen.add(c["label"]))]


def prune_kwargs(kwargs: dict, seed: int) -> dict:
    """An entry's options split: method options (``metrics.option_specs()``) become ``options=``, the rest
    stay ``prune()`` keywords. With a ``recipe``, ``given`` names what the entry sets (its metric and every key),
    so that a value the entry spells out wins even where it equals ``prune()``'s default
    (``wanda:recipe=best,refine_lr=0.001``)."""
    from .metrics import option_specs

    names = set(option_specs())
    method = {k: v for k, v in kwargs.items() if k in names}
    rest = {k: v for k, v in kwargs.items() if k not in names}
    if method:
        rest["options"] = {"seed": seed, **method}
    if "recipe" in kwargs:
        rest["given"] = {"metric", *(k for k in kwargs if k != "recipe")}
    return rest


def fmt_ppl(value) -> str:
    if value is None:
        return "error"
    return f"{value:.2f}" if math.isfinite(value) else str(value)


def markdown(result: dict) -> str:
    """The result as a markdown table: a row per method entry, a column per cell, dense on top."""
    cells = result["cells"]
    lines = ["| method | " + " | ".join(c["label"] for c in cells) + " |", "|---|" + "---|" * len(cells)]
    dense = (result.get("dense") or {}).get("ppl")
    lines.append("| dense | " + " | ".join(fmt_ppl(dense) for _ in cells) + " |")
    for row in result["rows"]:
        vals = [fmt_ppl(row["cells"][c["label"]].get("ppl")) if c["label"] in row["cells"] else "" for c in cells]
        lines.append(f"| {row['label']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def run_cell(model: str, scratch: Path, name: str, kwargs: dict, cell: dict, stats, evaluation: dict, seed: int,
             device: str, reporter) -> dict:
    """Prune one cell into ``scratch`` (stade's own checkpoint, replaced each time), evaluate it, remove it."""
    from .evaluation import evaluate
    from .outputs import remove_output
    from .pruning import prune

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        metric = None if kwargs.get("structure") == "blocks" else name     # blocks are ranked by their own score
        report = prune(model, scratch, metric=metric, sparsity=cell["sparsity"], pattern=cell["pattern"], stats=stats,
                       device=device, force=True, reporter=reporter, **prune_kwargs(kwargs, seed))
        t1, c1 = time.perf_counter(), time.process_time()
        res = evaluate(str(scratch), device=device, reporter=reporter, **evaluation)
        t2 = time.perf_counter()
    finally:
        remove_output(scratch, "checkpoint")   # disk: one pruned checkpoint at a time
    return {"ppl": res["ppl"], "nll": res["nll"], "achieved_sparsity": report["overall"]["sparsity"],
            "params_removed": (report.get("params") or {}).get("removed"),
            "prune_seconds": round(t1 - t0, 2), "prune_cpu_seconds": round(c1 - c0, 2), "eval_seconds": round(t2 - t1, 2), "seconds": round(t2 - t0, 2)}


# the prune() keywords an entry may set (the sweep sets the model, the cell, the stats, the text and the device)
ENTRY_KEYWORDS = ("bias_correction", "layer_sparsity", "owl_m", "owl_lambda", "group", "only", "skip", "update",
                  "expert_min_tokens", "structure", "sequential", "refine", "refine_lr", "refine_batch",
                  "refine_samples", "refine_seqlen", "refine_precision", "refine_warmup", "refine_loss", "recipe")


@dataclass(frozen=True)
class Reads:
    """What the cells read from the stats: moments, and Gram matrices (``gram_for``: the first method that needs them)."""

    moments: bool = False
    gram_for: str | None = None


def check_entries(entries: list[tuple[str, str, dict]], cells: list[dict], seed: int) -> Reads:
    """Every method × cell checked as prune would, before any work (a typo fails now, not an hour in): the request
    prune itself makes of the same arguments (a recipe applied, the defaults filled in), checked by the same
    function; and what the cells read from the stats."""
    from .plan import check_request, reads
    from .pruning import request

    moments, gram_for = False, None
    for label, name, kwargs in entries:
        extra = prune_kwargs(kwargs, seed)
        unknown = sorted(set(extra) - set(ENTRY_KEYWORDS) - {"options", "given"})
        if unknown:
            raise UsageError(f"{label}: unknown option {unknown[0]!r}",
                             "method options (see stade prune --help-method NAME) or " + ", ".join(ENTRY_KEYWORDS))
        for cell in cells:
            req = request("", metric=None if extra.get("structure") == "blocks" else name, sparsity=cell["sparsity"],
                          pattern=cell["pattern"], seed=seed, device="cpu", **extra)
            checked = check_request(req)
            m, g = reads(req, checked)
            moments = moments or m
            if not req.sequential:                                  # --sequential computes its own
                gram_for = gram_for or g
    return Reads(moments, gram_for)


DEFAULT_METRICS = ("wanda", "stade")          # the command line's defaults too
DEFAULT_SPARSITIES = (0.5, 0.6, 0.7)


def sweep(model: str, out: str | Path, metrics: list[str] = DEFAULT_METRICS,
          sparsities: list[float] = DEFAULT_SPARSITIES,
          patterns: list[str] = ("unstructured",), stats: str | Path | None = None, dataset: str = "wikitext2",
          calibration: str = "c4", nsamples: int = 128, seqlen: int | None = None, seed: int = 0,
          max_windows: int | None = None, device: str = "auto", force: bool = False, reporter=None,
          on_cell: Callable[[dict], None] | None = None) -> dict:
    """Perplexity of ``model`` dense and pruned by every entry of ``metrics`` at every cell; writes ``out``.

    ``stats``: reuse a STATS dir (its seqlen is the evaluation's unless ``seqlen`` is given); without it the
    methods that need moments get a calibration on ``calibration`` here, kept in ``out/stats``. ``on_cell``
    sees the result after every cell (a CLI can print progress). Returns the result written to
    ``out/sweep.json``.
    """
    from .distributed import one_process
    from .loading import local_paths, run_inputs
    from .outputs import Output
    from .runtime import Reporter

    one_process("stade sweep")                  # it claims an output of its own: every rank would claim the same
    reporter = reporter or Reporter()
    plan = plan_sweep(model, metrics, sparsities, patterns, stats, seed)       # every check before any work
    started = time.perf_counter()
    result = {"settings": {"model": model, "metrics": list(metrics), "sparsities": list(sparsities),
                           "patterns": list(patterns), "dataset": dataset,
                           "seqlen": seqlen or (plan.manifest or {}).get("seqlen"), "max_windows": max_windows,
                           "seed": seed, "device": device, "stats": str(stats) if stats is not None else None,
                           "started": _dt.datetime.now().isoformat(timespec="seconds")},
              "cells": plan.cells, "calibration": None, "dense": None, "rows": [], "errors": 0}
    dest = Output(out, "sweep", force, reporter.log)
    dest.check_inputs(run_inputs(model, calibration, None, stats)
                      + [("the evaluation data", p) for p in local_paths(dataset)])
    with dest, dest.staging() as tmp:
        stats_dir = _statistics(plan, result, model, out, tmp, stats, calibration, nsamples, seqlen, seed, device,
                                reporter)
        evaluation = {"dataset": dataset, "seqlen": result["settings"]["seqlen"], "max_windows": max_windows}
        result["dense"] = _dense(model, evaluation, device, reporter)
        result["settings"]["seqlen"] = evaluation["seqlen"] = result["dense"]["seqlen"]
        if on_cell:
            on_cell(result)
        for label, name, kwargs in plan.entries:
            row = {"label": label, "metric": name, "options": kwargs, "cells": {}}
            result["rows"].append(row)
            for cell in plan.cells:
                reporter.log(f"{label} at {cell['label']}: pruning and evaluating")
                row["cells"][cell["label"]] = run_cell(model, tmp / ".pruned", name, kwargs, cell, stats_dir,
                                                       evaluation, seed, device, reporter)
                if on_cell:
                    on_cell(result)
        result["settings"]["total_seconds"] = round(time.perf_counter() - started, 2)
        tabulate(result, tmp)
    return result


@dataclass(frozen=True)
class SweepPlan:
    entries: list          # (label, method, keyword arguments) per entry
    cells: list            # cell_specs: sparsity × pattern
    reads: Reads           # what the cells read from the stats
    manifest: dict | None  # the reused stats' manifest

    @property
    def needs_stats(self) -> bool:
        return self.reads.moments

    @property
    def needs_gram(self) -> bool:
        return self.reads.gram_for is not None


def plan_sweep(model: str, metrics: list[str], sparsities, patterns, stats, seed: int) -> SweepPlan:
    """The entries and cells, every one checked as prune would (a typo fails now, not an hour in)."""
    from .calibration.store import load_stats

    entries = [(e, *parse_entry(e)) for e in metrics]
    cells = cell_specs(list(sparsities), list(patterns))
    if not cells:
        raise UsageError("no cells to sweep", "give --sparsities and/or --patterns")
    needs = check_entries(entries, cells, seed)
    manifest = load_stats(Path(stats).expanduser()).manifest if stats is not None else None
    plan = SweepPlan(entries, cells, needs, manifest)
    if plan.manifest is not None and plan.needs_gram and not plan.manifest.get("gram"):
        raise UsageError(f"the stats in {stats} have no Gram matrices, which {needs.gram_for} needs",
                         f"stade calibrate {model} -o STATS --gram, then --stats STATS")
    return plan


def _statistics(plan: SweepPlan, result: dict, model, out, tmp: Path, stats, calibration, nsamples, seqlen, seed,
                device, reporter) -> Path | None:
    """The stats the cells use: the given ones, or a calibration now (kept in the output); recorded in
    ``result``."""
    from .calibration.runner import calibrate
    from .calibration.store import load_stats

    if stats is not None:
        m = plan.manifest
        result["calibration"] = {"stats": str(stats), "dataset": m.get("dataset"), "reused": True,
                                 "nsamples": m.get("nsamples"), "seqlen": m.get("seqlen")}
        return Path(stats).expanduser()
    if not plan.needs_stats:
        return None
    reporter.log(f"calibrating on {calibration} ({nsamples} windows); the stats stay in {out}/stats")
    t0 = time.perf_counter()
    stats_dir = calibrate(model, tmp / "stats", dataset=calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                          device=device, gram=plan.needs_gram, reporter=reporter)
    manifest = load_stats(stats_dir).manifest
    result["settings"]["seqlen"] = seqlen or manifest.get("seqlen")
    result["calibration"] = {"seconds": round(time.perf_counter() - t0, 2), "stats": f"{out}/stats",
                             "dataset": calibration, "nsamples": nsamples, "seqlen": manifest.get("seqlen")}
    return stats_dir


def _dense(model: str, evaluation: dict, device: str, reporter) -> dict:
    from .evaluation import evaluate

    reporter.log("evaluating the dense model")
    t0 = time.perf_counter()
    dense = evaluate(model, device=device, reporter=reporter, **evaluation)
    return {"ppl": dense["ppl"], "nll": dense["nll"], "windows": dense["windows"], "seqlen": dense["seqlen"],
            "tokens": dense["tokens"], "seconds": round(time.perf_counter() - t0, 2)}


def tabulate(result: dict, folder: Path) -> None:
    """sweep.json and sweep.md in ``folder``."""
    import json

    (folder / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "sweep.md").write_text(markdown(result))

