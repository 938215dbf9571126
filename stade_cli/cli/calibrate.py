"""`stade calibrate MODEL -o STATS`: cache per-layer input moments. stdout: the STATS path."""
from __future__ import annotations

from pathlib import Path

from typing import Annotated

import typer

from .options import (BatchSize, Dataset, Device, DeviceMap, DType, Force, Json, MaxMemory, ModelArg, NSamples, OffloadDir,
                      Output, Quiet, SeqLen, Seed, Spill, placement)
from .output import state, emit_json, emit_line


def calibrate(
    ctx: typer.Context,
    model: ModelArg,
    output: Output,
    dataset: Dataset = "c4",
    nsamples: NSamples = 128,
    seqlen: SeqLen = None,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: DType = "auto",
    batch_size: BatchSize = 1,
    gram: Annotated[bool, typer.Option("--gram", help="Also accumulate the Gram matrix Σxxᵀ per distinct input (for sparsegpt, --update admm). MoE: one per expert input and intermediate (Mixtral-8x7B: about 8 GB a block); prune --sequential needs none.")] = False,
    force: Force = False,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_dir: OffloadDir = None,
    spill: Spill = "auto",
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Run calibration text through MODEL and cache per-layer input-activation moments in OUTPUT."""
    st = state(ctx, json_out, quiet)
    from ..calibration.runner import calibrate as calibrate_model  # lazy: keeps `stade --help` fast

    path = calibrate_model(model, output, dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed,
                           device=device, dtype=dtype, batch_size=batch_size, force=force, gram=gram,
                           reporter=st.reporter, placement=placement(device_map, max_memory, offload_dir, spill))
    # "output", as prune's --json names its own; "stats", as earlier versions named it
    emit_json({"output": str(Path(path).resolve()), "stats": str(Path(path).resolve())}) if st.json \
        else emit_line(str(path))
