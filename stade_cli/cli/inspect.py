"""`stade inspect PATH`: per-layer sparsity of a checkpoint, or the activation statistics of a STATS dir."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import app, handle_errors, state
from .options import Json, Quiet
from .output import emit_json, stdout_console


@app.command()
@handle_errors
def inspect(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A checkpoint directory or a STATS directory.", show_default=False)],
    pattern: Annotated[Optional[str], typer.Option(help="N:M pattern to check conformance against [default: the report's].", show_default=False)] = None,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Report per-layer sparsity (computed from the tensors) or per-layer activation statistics."""
    st = state(ctx, json_out, quiet)
    from ..report import inspect as inspect_path  # lazy: keeps `stade --help` fast

    summary = inspect_path(path, pattern)
    if st.json:
        emit_json(summary)
    elif summary["kind"] == "stats":
        render_stats(summary)
    else:
        render_checkpoint(summary)


def render_checkpoint(s: dict) -> None:
    console = stdout_console()
    nm = s.get("nm_ok") is not None
    table = Table(title=f"{s['path']}  ({s.get('method') or 'no stade report'}, {s.get('pattern') or 'dense'})")
    for col, justify in (("layer", "left"), ("shape", "right"), ("zeros", "right"), ("sparsity", "right")):
        table.add_column(col, justify=justify)
    if nm:
        table.add_column(s["pattern"], justify="center")
    for name, l in s["layers"].items():
        row = [name, "×".join(map(str, l["shape"])), f"{l['zeros']:,}", f"{l['sparsity']:.2%}"]
        if nm:
            row.append("ok" if l["nm_ok"] else "[red]no[/]")
        table.add_row(*row)
    console.print(table)
    blocks = Table(title="per block")
    for col in ("block", "zeros", "params", "sparsity"):
        blocks.add_column(col, justify="right")
    for b in s["blocks"]:
        blocks.add_row(str(b["block"]), f"{b['zeros']:,}", f"{b['params']:,}", f"{b['sparsity']:.2%}")
    console.print(blocks)
    o = s["overall"]
    line = f"overall: {o['zeros']:,} / {o['params']:,} zero ({o['sparsity']:.2%})"
    if "report_agrees" in s:
        line += "; report agrees" if s["report_agrees"] else "; [red]report disagrees with the tensors[/]"
    console.print(line)


def render_stats(s: dict) -> None:
    console = stdout_console()
    m = s["manifest"]
    console.print(f"stats for {m['model']['ref']} (fingerprint {m['model']['fingerprint']}): "
                  f"{m['dataset']}, {m['nsamples']} × {m['seqlen']} tokens, seed {m['seed']}, {m['dtype']}",
                  highlight=False, markup=False)
    table = Table()
    for col, justify in (("layer", "left"), ("in", "right"), ("mean |μ|", "right"), ("mean σ", "right"),
                         ("max σ", "right"), ("max |μ|", "right")):
        table.add_column(col, justify=justify)
    for r in s["layers"]:
        table.add_row(r["name"], str(r["in_features"]), f"{r['mean_abs_mean']:.4g}", f"{r['mean_std']:.4g}",
                      f"{r['max_std']:.4g}", f"{r['max_abs_mean']:.4g}")
    console.print(table)
