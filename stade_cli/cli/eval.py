"""`stade eval MODEL_OR_DIR`: perplexity. stdout: the number, or JSON with --json."""
from __future__ import annotations

import typer

from .app import app, handle_errors, state
from .options import BatchSize, Dataset, Device, DType, MaxWindows, ModelArg, SeqLen, Json, Quiet
from .output import emit_json, emit_line


@app.command("eval")
@handle_errors
def eval_command(
    ctx: typer.Context,
    model: ModelArg,
    dataset: Dataset = "wikitext2",
    seqlen: SeqLen = None,
    max_windows: MaxWindows = None,
    device: Device = "auto",
    dtype: DType = "auto",
    batch_size: BatchSize = 1,
    json_out: Json = False,
    quiet: Quiet = False,
) -> None:
    """Perplexity of MODEL on the held-out split of DATASET (non-overlapping windows, Wanda protocol)."""
    st = state(ctx, json_out, quiet)
    from ..evaluate import evaluate  # lazy: keeps `stade --help` fast

    result = evaluate(model, dataset=dataset, seqlen=seqlen, max_windows=max_windows, device=device,
                      dtype=dtype, batch_size=batch_size, reporter=st.reporter)
    st.reporter.log(f"{result['windows']} windows × {result['seqlen']} tokens in {result['seconds']:.1f}s")
    emit_json(result) if st.json else emit_line(f"{result['ppl']:.4f}")
