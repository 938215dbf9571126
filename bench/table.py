#!/usr/bin/env python
"""One table from several result files of the same protocol: bench/quality.py's quality.json, stade sweep's
sweep.json and bench/peer.py's peer.json share their shape (settings, cells, dense, rows).

The dense perplexity of every file must agree (to 1e-6 relative): that is the check that they measured the same
windows of the same model. A row label may be renamed: ``--label 'wanda:update=admm -> wanda + admm'``. Rows keep
the order of first appearance; a later file's row with the same label adds its cells. Writes OUT/table.json, OUT/table.md
(perplexity, then the prune seconds: wall, and CPU where the file has it) and OUT/table.png.

    python bench/table.py bench/results/smollm2/sweep/sweep.json bench/results/smollm2/admm/quality.json \\
        --cells 50% 60% 70% 80% 2:4 4:8 --label 'wanda:update=admm -> wanda + admm' --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _results import ResultFiles  # noqa: E402
from stade_cli.sweep import markdown  # noqa: E402

RESULTS = ResultFiles("bench/table.py", "table", ("sources", "cells", "rows"), ("table.md", "table.png"))


def merge(results: list[dict], labels: dict[str, str], order: list[str] | None) -> dict:
    dense = [r["dense"]["ppl"] for r in results if r.get("dense")]
    if dense and max(dense) - min(dense) > 1e-6 * min(dense):
        raise SystemExit(f"error: the files' dense perplexities differ ({', '.join(f'{d:.4f}' for d in dense)}): "
                         "not the same protocol")
    cells: dict[str, dict] = {}
    for r in results:
        for c in r["cells"]:
            cells.setdefault(c["label"], c)
    if order:
        missing = [c for c in order if c not in cells]
        if missing:
            raise SystemExit(f"error: no file has the cell(s) {', '.join(missing)}")
        cells = {c: cells[c] for c in order}
    rows: dict[str, dict] = {}
    for r in results:
        for row in r["rows"]:
            label = labels.get(row["label"], row["label"])
            merged = rows.setdefault(label, {"label": label, "cells": {}})
            for name, cell in row["cells"].items():
                if name in cells:
                    merged["cells"][name] = cell
    return {"sources": [r.get("_path") for r in results], "settings": results[0]["settings"],
            "dense": results[0].get("dense"), "cells": list(cells.values()), "rows": list(rows.values())}


def seconds_table(result: dict) -> str:
    """Prune wall seconds per cell and CPU seconds where recorded (all of stade's threads during the prune; the
    peer's whole child process, which calibrates too)."""
    cells = result["cells"]
    lines = ["| prune seconds | " + " | ".join(c["label"] for c in cells) + " |", "|---|" + "---|" * len(cells)]
    for row in result["rows"]:
        vals = []
        for c in cells:
            cell = row["cells"].get(c["label"]) or {}
            wall = cell.get("prune_seconds", cell.get("oneshot_wall_seconds", cell.get("wall_seconds")))
            cpu = cell.get("cpu_seconds", cell.get("prune_cpu_seconds"))
            vals.append("" if wall is None else f"{wall:.0f}" + (f" (CPU {cpu:.0f})" if cpu is not None else ""))
        lines.append(f"| {row['label']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--cells", nargs="+", default=None, help="the columns, in order [default: every cell found]")
    p.add_argument("--label", action="append", default=[], help="'OLD -> NEW': rename a row")
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    labels = {}
    for spec in args.label:
        old, sep, new = spec.partition(" -> ")
        if not sep:
            raise SystemExit(f"error: --label {spec!r} is not 'OLD -> NEW'")
        labels[old.strip()] = new.strip()
    results = []
    for f in args.files:
        data = json.loads(Path(f).read_text())
        data["_path"] = f
        results.append(data)
    result = merge(results, labels, args.cells)
    out = Path(args.out)
    RESULTS.check(out)
    text = markdown(result) + "\n" + seconds_table(result)
    RESULTS.write(out, result, {"table.md": text})
    try:
        from stade_cli.plots import sweep_plot

        sweep_plot(result, out / "table.png", title=args.title, ours=lambda path: True)
    except Exception as exc:  # noqa: BLE001 - matplotlib missing: the table still counts
        print(f"note: no plot ({exc})", file=sys.stderr)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
