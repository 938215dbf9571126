"""`stade prune MODEL --metric NAME --sparsity S -o OUT`: write a pruned checkpoint. stdout: OUT."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app, handle_errors, state
from .options import (BatchSize, Dataset, Device, DeviceMap, DType, Force, Json, MaxMemory, ModelArg, NSamples, OffloadDir,
                      Output, Quiet, SeqLen, Seed, Spill, placement)
from .output import emit_json, emit_line


@app.command()
@handle_errors
def prune(
    ctx: typer.Context,
    model: ModelArg,
    output: Output,
    metric: Annotated[str, typer.Option(help="magnitude | wanda | stade | stadew | ria | stochria | sparsegpt | dsnot | r2dsnot.")] = "wanda",
    sparsity: Annotated[Optional[float], typer.Option(help="Fraction of weights to zero, in [0, 1) \\[default: 0.5; implied by an N:M pattern].", show_default=False)] = None,
    pattern: Annotated[str, typer.Option(help="unstructured, or N:M (e.g. 2:4): keep N of every M consecutive inputs.")] = "unstructured",
    group: Annotated[str, typer.Option(help="Comparison group for unstructured sparsity: row (per output row) or layer.")] = "row",
    bias_correction: Annotated[Optional[bool], typer.Option("--bias-correction/--no-bias-correction", help="Fold the pruned weights' mean contribution into the bias \\[default: on for stade and stadew, off otherwise].", show_default=False)] = None,
    layer_sparsity: Annotated[str, typer.Option(help="uniform, or owl (Outlier Weighted Layerwise: blocks with more outliers keep more).")] = "uniform",
    owl_m: Annotated[float, typer.Option(help="OWL: a score is an outlier above this many times its block's mean.")] = 5.0,
    owl_lambda: Annotated[float, typer.Option(help="OWL: block sparsities span 2 × lambda around a mean of --sparsity.")] = 0.08,
    sequential: Annotated[bool, typer.Option("--sequential", help="Prune block by block, calibrating each block on the already pruned blocks' outputs.")] = False,
    ria_alpha: Annotated[float, typer.Option(help="RIA: exponent a of the activation norm.")] = 0.5,
    stoch_beta: Annotated[float, typer.Option(help="stochria: fraction of each row/column sampled for its sum.")] = 0.1,
    percdamp: Annotated[float, typer.Option(help="sparsegpt: dampening, a fraction of mean(diag H).")] = 0.01,
    blocksize: Annotated[int, typer.Option(help="sparsegpt: columns per lazy-update block.")] = 128,
    init: Annotated[str, typer.Option(help="dsnot/r2dsnot: the method giving the initial mask (wanda, stade, sparsegpt, ...).")] = "wanda",
    dsnot_pow: Annotated[float, typer.Option(help="dsnot: regrow by W·μ / σ^pow.")] = 1.0,
    dsnot_threshold: Annotated[float, typer.Option(help="dsnot: stop a row once its expected error |e| is this small.")] = 0.1,
    dsnot_cycles: Annotated[int, typer.Option(help="dsnot: at most this many swaps per row.")] = 50,
    r2_gamma1: Annotated[float, typer.Option(help="r2dsnot: weight of relative importance in the prune criterion.")] = 0.5,
    r2_gamma2: Annotated[float, typer.Option(help="r2dsnot: margin of the regularised decision boundary (× a row's output std).")] = 0.1,
    stats: Annotated[Optional[Path], typer.Option(help="STATS directory from `stade calibrate` \\[default: calibrate now].", show_default=False)] = None,
    only: Annotated[Optional[str], typer.Option(help="Regex: prune only the linears whose name matches.", show_default=False)] = None,
    skip: Annotated[Optional[str], typer.Option(help="Regex: keep the linears whose name matches dense.", show_default=False)] = None,
    dataset: Dataset = "c4",
    nsamples: NSamples = 128,
    seqlen: SeqLen = None,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: DType = "auto",
    batch_size: BatchSize = 1,
    force: Force = False,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_dir: OffloadDir = None,
    spill: Spill = "auto",
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Score every target linear of MODEL, zero the lowest-scored weights, and write OUTPUT."""
    st = state(ctx, json_out, quiet)
    from ..metrics import MethodOptions
    from ..pruning import prune as prune_model  # lazy: keeps `stade --help` fast

    if sparsity is None and ":" not in pattern:
        sparsity = 0.5
    report = prune_model(model, output, metric=metric, sparsity=sparsity, pattern=pattern, group=group,
                         stats=stats, bias_correction=bias_correction, layer_sparsity=layer_sparsity, owl_m=owl_m,
                         owl_lambda=owl_lambda, sequential=sequential,
                         options=MethodOptions(ria_alpha=ria_alpha, stoch_beta=stoch_beta, seed=seed, percdamp=percdamp,
                                               blocksize=blocksize, init=init, dsnot_pow=dsnot_pow,
                                               dsnot_threshold=dsnot_threshold, dsnot_cycles=dsnot_cycles,
                                               r2_gamma1=r2_gamma1, r2_gamma2=r2_gamma2),
                         dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
                         dtype=dtype, batch_size=batch_size, only=only, skip=skip, force=force,
                         reporter=st.reporter, placement=placement(device_map, max_memory, offload_dir, spill))
    st.reporter.log(f"pruned {len(report['layers'])} layers with {report['method']} ({report['pattern']}, "
                    f"{report['mode']}): {report['overall']['sparsity']:.2%} of their weights are zero; "
                    f"{report['bias_correction']['layers']} bias-corrected")
    if st.json:
        emit_json({"output": str(output), "overall": report["overall"], "method": report["method"],
                   "pattern": report["pattern"], "target_sparsity": report["target_sparsity"]})
    else:
        emit_line(str(output))
