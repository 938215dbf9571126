#!/usr/bin/env python
"""Beyond layer-wise reconstruction: each entry × cell pruned once from cached stats, timed alone, and evaluated
on several held-out texts separately (perplexity relative to the dense model on the same text).

    python bench/beyond.py --model ~/.cache/stade-assets/smollm2-135m --stats STATS \
        --eval pride=$A/prideprejudice.txt sherlock=/work/texts/sherlock.txt \
        --entries 'wanda:update=admm,admm_gradual=true' 'wanda:recipe=best' \
        --sparsities 0.5 0.6 0.7 0.8 --patterns unstructured 2:4 4:8 --out bench/results/smollm2/beyond-layerwise

A text given as ``NAME=draw:SPEC@SEED`` is not read from its start: its windows are drawn from SPEC (a file,
directory or comma list, as ``calibrate --dataset`` takes it) the way ``calibrate`` draws its own, with SEED instead
of the stats' seed: held-out windows of the calibration text itself, on which a setting can be chosen without
looking at the texts the table reports (``austen=draw:$A/emma.txt,$A/mansfieldpark.txt,...@12345``).

Entries are ``quality.py``'s (``name:key=value,...``: method options or ``prune()`` keywords such as
``sequential``, ``layer_sparsity``, ``refine``, ``recipe``). Writes OUT/beyond.json and OUT/beyond.md (one table
per text, ppl and × dense; one of prune seconds, wall and CPU) and OUT/beyond-NAME.png per text (needs
matplotlib). A failing cell is recorded and the run goes on. ``--peer NAME=peer.json`` adds a peer's rows (from
``bench/peer.py`` on the same windows: its dense perplexity must agree) to text NAME's table and plot;
``--render`` only re-renders OUT from its beyond.json (with the ``--peer`` files given); ``--render --merge RUN ...``
first copies into it the cells of other runs of this script (cells a stopped run left out, measured alone later):
same model, stats, windows and seed, the same dense perplexity on every text; a cell OUT already has is refused;
``merged`` in beyond.json lists what came from where.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _results import ResultFiles  # noqa: E402

RESULTS = ResultFiles("bench/beyond.py", "beyond", ("settings", "texts", "rows"), ("beyond.md",))


def _peer_rows(result: dict, text: str) -> list[dict]:
    """The peer rows for ``text`` as this script's rows (ppl of that text only)."""
    rows = []
    for row in result.get("peers", {}).get(text, []):
        rows.append({"entry": row["label"], "cells": {c: ({"ppl": {text: v["ppl"]}} if "ppl" in v else v)
                                                       for c, v in row["cells"].items()}, "peer": True})
    return rows


def _same_dense(result: dict, text: str, theirs: float, source) -> None:
    """Refuse results from ``source`` whose dense perplexity on ``text`` is not this table's (to 1e-3): they did
    not measure the same windows of the same model."""
    ours = result["texts"][text]["ppl"]
    if abs(ours - theirs) > 1e-3 * ours:
        raise SystemExit(f"error: {source} has dense perplexity {theirs:.4f} on {text}, not {ours:.4f}: "
                         "another text or protocol")


def add_peer(result: dict, text: str, path: str) -> None:
    import json

    peer = json.loads(Path(path).read_text())
    _same_dense(result, text, peer["dense"]["ppl"], path)
    result.setdefault("peers", {})[text] = [{"label": r["label"], "cells": r["cells"]} for r in peer["rows"]]


_SAME = ("model", "stats", "seqlen", "max_windows", "seed")


def merge(result: dict, run: Path) -> dict:
    """Copy the cells of another run (its OUT directory) into ``result``; returns what was merged. Refused (nothing
    changed) if the run measured something else or a cell is in both."""
    import json

    other = json.loads((run / RESULTS.json).read_text())
    for key in _SAME:
        if other["settings"][key] != result["settings"][key]:
            raise SystemExit(f"error: {run} has {key} {other['settings'][key]!r}, not {result['settings'][key]!r}: "
                             "another protocol")
    if set(other["texts"]) != set(result["texts"]):
        raise SystemExit(f"error: {run} evaluates {', '.join(sorted(other['texts']))}, this table "
                         f"{', '.join(sorted(result['texts']))}")
    for text, dense in other["texts"].items():
        _same_dense(result, text, dense["ppl"], run)
    rows = {r["entry"]: r for r in result["rows"]}
    for row in other["rows"]:
        clash = sorted(set(row["cells"]) & set(rows.get(row["entry"], {"cells": {}})["cells"]))
        if clash:
            raise SystemExit(f"error: {row['entry']} @ {', '.join(clash)} is in both {run} and this table "
                             "(remove one first)")
    labels = {c["label"] for c in result["cells"]}
    result["cells"] += [c for c in other["cells"] if c["label"] not in labels]
    merged = {"from": str(run), "started": other["started"], "settings": other["settings"], "cells": {}}
    for row in other["rows"]:
        if row["entry"] not in rows:
            rows[row["entry"]] = {"entry": row["entry"], "cells": {}}
            result["rows"].append(rows[row["entry"]])
        rows[row["entry"]]["cells"].update(row["cells"])
        merged["cells"][row["entry"]] = sorted(row["cells"])
    order = [c["label"] for c in result["cells"]]
    for row in result["rows"]:
        row["cells"] = dict(sorted(row["cells"].items(), key=lambda kv: order.index(kv[0])))
    result.setdefault("merged", []).append(merged)
    return merged


def plots(result: dict, out: Path) -> list[str]:
    """One plot per text: perplexity against sparsity, entries and peers, dense as a line."""
    try:
        from stade_cli.errors import UsageError
        from stade_cli.plots import sweep_plot
    except ImportError:
        return []
    names = []
    for text, dense in result["texts"].items():
        rows = [{"label": r["entry"], "cells": {c: {"ppl": v["ppl"][text]} for c, v in r["cells"].items()
                                                if "ppl" in v}} for r in result["rows"] + _peer_rows(result, text)]
        try:
            sweep_plot({"dense": {"ppl": dense["ppl"]}, "rows": rows, "cells": result["cells"]},
                       out / f"beyond-{text}.png", title=f"SmolLM2, held-out text: {text}", ours=lambda p: True)
        except UsageError as exc:     # matplotlib missing: the table and JSON still count
            print(f"note: {exc}; skipping the plots", file=sys.stderr)
            return []
        names.append(f"beyond-{text}.png")
    return names


def drawn_windows(model: str, spec: str, args):
    """The windows of a ``draw:SPEC@SEED`` text (drawn from SPEC as ``calibrate`` draws them, with SEED; tokenized
    with ``model``'s tokenizer), or None for a file read from its start."""
    if not spec.startswith("draw:"):
        return None
    from stade_cli.arch import context_length
    from stade_cli.data import calibration_windows, load_corpus
    from stade_cli.loading import Runtime

    source, _, seed = spec[len("draw:"):].rpartition("@")
    if not source or not seed.isdigit():
        raise SystemExit(f"error: {spec!r}: a drawn text is draw:SPEC@SEED (SEED a whole number)")
    rt = Runtime.of(model, args.device)
    return calibration_windows(rt.tokenizer(), load_corpus(source, "calibration"), args.max_windows, args.seqlen,
                               int(seed), context_length(rt.config))


def perplexity_on(model: str, spec: str, args, reporter, windows=None) -> dict:
    """{"ppl", "windows"} of ``model`` on text ``spec``: a file read from its start (``stade eval``'s protocol), or
    ``draw:SPEC@SEED`` (its ``windows``, drawn here when not given: ``drawn_windows``)."""
    import math

    from stade_cli.evaluation import evaluate, perplexity
    from stade_cli.loading import Runtime

    if windows is None:
        windows = drawn_windows(model, spec, args)
    if windows is None:
        r = evaluate(model, dataset=spec, seqlen=args.seqlen, max_windows=args.max_windows, device=args.device,
                     reporter=reporter)
        return {"ppl": r["ppl"], "windows": r["windows"]}
    rt = Runtime.of(model, args.device)
    with rt.model(None) as net:
        nll, _ = perplexity(net, windows, rt.device, 1, reporter)
    return {"ppl": math.exp(nll), "windows": int(windows.shape[0])}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def table(result: dict) -> str:
    cells = [c["label"] for c in result["cells"]]
    out = []
    for text, dense in result["texts"].items():
        rows = result["rows"] + _peer_rows(result, text)
        out += [f"**{text}** (dense {dense['ppl']:.2f}): perplexity (× dense)", "",
                "| entry | " + " | ".join(cells) + " |", "|---|" + "---|" * len(cells)]
        for row in rows:
            vals = []
            for c in cells:
                r = row["cells"].get(c)
                vals.append("–" if r is None else "error" if "error" in r else
                            f"{r['ppl'][text]:.2f} ({r['ppl'][text] / dense['ppl']:.2f}×)")
            out.append(f"| {row['entry']} | " + " | ".join(vals) + " |")
        out.append("")
    out += ["prune seconds, wall (CPU)", "", "| entry | " + " | ".join(cells) + " |", "|---|" + "---|" * len(cells)]
    for row in result["rows"]:   # – : not measured (the run stopped before that cell)
        vals = [("–" if (r := row["cells"].get(c)) is None else "error" if "error" in r else
                 f"{r['prune_seconds']:.0f} ({r['prune_cpu_seconds']:.0f})") for c in cells]
        out.append(f"| {row['entry']} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--stats", required=True, help="stats directory (from `stade calibrate --gram`)")
    p.add_argument("--eval", nargs="+", required=True, help="NAME=FILE held-out texts, each evaluated alone (NAME=draw:SPEC@SEED: windows drawn "
                   "from SPEC as calibrate draws them, with SEED)")
    p.add_argument("--entries", nargs="+", required=True)
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5])
    p.add_argument("--patterns", nargs="+", default=["unstructured"])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--peer", nargs="*", default=[], help="NAME=peer.json: a peer's rows for text NAME")
    p.add_argument("--render", action="store_true", help="only re-render OUT from its beyond.json")
    p.add_argument("--merge", nargs="+", default=[], metavar="RUN",
                   help="with --render: first copy in the cells of these other runs' OUT directories")
    args = p.parse_args(argv)
    out = Path(args.out).expanduser()
    if args.merge and not args.render:
        p.error("--merge goes with --render")
    if args.render:
        import json

        result = json.loads((out / RESULTS.json).read_text())
        for run in args.merge:
            merged = merge(result, Path(run).expanduser())
            print(f"merged from {run}: " + "; ".join(f"{e} @ {', '.join(c)}" for e, c in merged["cells"].items()))
        for entry in args.peer:
            add_peer(result, *entry.split("=", 1))
        RESULTS.check(out)
        RESULTS.write(out, result, {"beyond.md": table(result)})
        plots(result, out)
        print(table(result))
        return 0

    from stade_cli.outputs import remove_output
    from stade_cli.pruning import prune
    from stade_cli.runtime import StderrReporter
    from stade_cli.sweep import cell_specs, check_entries, parse_entry, prune_kwargs

    texts = dict(e.split("=", 1) for e in args.eval)
    entries = [(e, *parse_entry(e)) for e in args.entries]
    cells = cell_specs(args.sparsities, args.patterns)
    check_entries(entries, cells, args.seed)
    RESULTS.check(out)
    reporter = StderrReporter()
    result = {"settings": {k: getattr(args, k) for k in ("model", "stats", "eval", "entries", "sparsities", "patterns",
                                                         "seqlen", "max_windows", "seed", "device")},
              "started": _dt.datetime.now().isoformat(timespec="seconds"), "cells": cells, "texts": {}, "rows": []}
    drawn = {name: drawn_windows(args.model, path, args) for name, path in texts.items()}   # once: every prune
    for name, path in texts.items():                                                        # keeps the tokenizer
        r = perplexity_on(args.model, path, args, reporter, drawn[name])
        result["texts"][name] = {"file": path, "ppl": r["ppl"], "windows": r["windows"]}
        log(f"dense on {name}: {r['ppl']:.2f}")
    work = Path(tempfile.mkdtemp(prefix="stade-beyond-"))
    try:
        for label, metric, kwargs in entries:
            row = {"entry": label, "cells": {}}
            result["rows"].append(row)
            for cell in cells:
                scratch = work / "pruned"
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    report = prune(args.model, scratch, metric=metric, sparsity=cell["sparsity"],
                                   pattern=cell["pattern"], stats=args.stats, device=args.device, force=True,
                                   reporter=reporter, **prune_kwargs(kwargs, args.seed))
                    t1, c1 = time.perf_counter(), time.process_time()
                    ppl = {n: perplexity_on(str(scratch), path, args, reporter, drawn[n])["ppl"]
                           for n, path in texts.items()}
                    row["cells"][cell["label"]] = {
                        "ppl": ppl, "sparsity": report["overall"]["sparsity"], "prune_seconds": round(t1 - t0, 2),
                        "prune_cpu_seconds": round(c1 - c0, 2), "recipe": report.get("recipe"),
                        "refine": {k: v for k, v in (report.get("refine") or {}).items() if k != "blocks"} or None}
                    log(f"{label} @ {cell['label']}: " + ", ".join(f"{n} {v:.2f}" for n, v in ppl.items())
                        + f" (prune {t1 - t0:.0f} s)")
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    traceback.print_exc()
                    row["cells"][cell["label"]] = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    if scratch.exists():
                        remove_output(scratch, "checkpoint")
                RESULTS.write(out, result, {"beyond.md": table(result)})
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    for entry in args.peer:
        add_peer(result, *entry.split("=", 1))
    RESULTS.write(out, result, {"beyond.md": table(result)})
    plots(result, out)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
