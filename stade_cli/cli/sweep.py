"""`stade sweep MODEL --metrics wanda,stade --sparsities 0.5,0.6,0.7 -o OUT`: perplexity against sparsity.
stdout: the table (or JSON)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..sweep import DEFAULT_METRICS, DEFAULT_SPARSITIES
from .options import Device, EvalDataset, Force, Json, MaxWindows, ModelArg, NSamples, Quiet, Seed
from .output import emit_json, state


def sweep(
    ctx: typer.Context,
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for sweep.json and sweep.md (and stats/ when it calibrates), written atomically.", show_default=False)],
    metrics: Annotated[str, typer.Option(help="Comma-separated methods; NAME:key=value,... sets an option (e.g. 'wanda,stade:bias_correction=false').")] = ",".join(DEFAULT_METRICS),
    sparsities: Annotated[str, typer.Option(help="Comma-separated unstructured sparsities.")] = ",".join(map(str, DEFAULT_SPARSITIES)),
    patterns: Annotated[str, typer.Option(help="Comma-separated: unstructured (the --sparsities) and/or N:M patterns such as 2:4.")] = "unstructured",
    stats: Annotated[Optional[Path], typer.Option(help="Reuse this STATS directory from `stade calibrate` \\[default: calibrate on --calibration].", show_default=False)] = None,
    dataset: EvalDataset = "wikitext2",
    calibration: Annotated[str, typer.Option(help="Calibration text when there is no --stats (as calibrate's --dataset).")] = "c4",
    nsamples: NSamples = 128,
    seqlen: Annotated[Optional[int], typer.Option(help="Tokens per window \\[default: the stats' window length].", show_default=False)] = None,
    max_windows: MaxWindows = None,
    seed: Seed = 0,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw perplexity against sparsity into this .png (needs matplotlib).", show_default=False)] = None,
    device: Device = "auto",
    force: Force = False,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Prune MODEL with each method at each sparsity, evaluate every result, and tabulate perplexity."""
    st = state(ctx, json_out, quiet)
    from ..sweep import markdown, numbers, split_entries, sweep as run_sweep  # lazy: keeps `stade --help` fast

    if plot is not None:
        from ..plots import check_plot_path, need_matplotlib

        need_matplotlib()
        plot = check_plot_path(plot, output)
    result = run_sweep(model, output, split_entries(metrics), numbers(sparsities, "--sparsities"),
                       [p for p in patterns.split(",") if p.strip()], stats=stats, dataset=dataset,
                       calibration=calibration, nsamples=nsamples, seqlen=seqlen, seed=seed, max_windows=max_windows,
                       device=device, force=force, reporter=st.reporter, on_cell=_progress(st.reporter))
    st.reporter.log(f"wrote {output}/sweep.json and {output}/sweep.md")
    if plot is not None:
        from ..plots import sweep_plot

        st.reporter.log(f"drew {sweep_plot(result, plot)}")
    if st.json:
        from pathlib import Path

        emit_json({"output": str(Path(output).expanduser().resolve()), **result})
    else:
        import sys

        sys.stdout.write(markdown(result))


def _progress(reporter):
    def show(result: dict) -> None:
        if result["rows"]:
            row = result["rows"][-1]
            label, cell = list(row["cells"].items())[-1]
            reporter.log(f"{row['label']} at {label}: perplexity {cell['ppl']:.2f} "
                         f"(dense {result['dense']['ppl']:.2f}; prune {cell['prune_seconds']:.0f} s, "
                         f"eval {cell['eval_seconds']:.0f} s)")
        else:
            reporter.log(f"dense: perplexity {result['dense']['ppl']:.2f} ({result['dense']['windows']} windows × "
                         f"{result['dense']['seqlen']} tokens)")
    return show
